//! The VM half of `make bench`: boot stage time (initstage vs a busybox-script initramfs),
//! initramfs sizes, the update round trip vs a plain boot, and exec over hybrid vsock (round
//! trip vs its floor, stdout and cp throughput, the agent's RSS), dm-verity's costs, and a
//! microVM's start from a container image (keel-agent as init vs a busybox script). Prints
//! Markdown.
//!
//!     keel-vm-bench [RUNS] [boot|initramfs|roundtrip|exec|verity|microvm ...]
//!
//! RUNS per configuration (default 3); naming sections runs only those (all by default).
//! With `KEEL_BENCH_STEPS=1` the boot-stage runs print their serial log from `Run /init` on
//! (stderr); `KEEL_BENCH_CMDLINE` adds to the kernel command line (e.g. `keel.debug`, which
//! logs each module's load time).

use std::fs;
use std::time::Instant;

use keel_vm_tests::*;

mod exec;
mod microvm;
mod verity;

/// Medians with the min–max range, of seconds.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

fn fmt_ms(v: &[f64]) -> String {
    let (m, lo, hi) = stats(v);
    format!("{:.0} ms ({:.0}–{:.0})", m * 1e3, lo * 1e3, hi * 1e3)
}

fn num_after(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// `[    1.234567] message` → 1.234567.
fn kernel_timestamp(line: &str) -> Option<f64> {
    let inner = line.trim_start().strip_prefix('[')?.split(']').next()?;
    inner.trim().parse().ok()
}

/// The kernel's own mark of the real init's exec: TOMOYO (built into Debian's kernels) logs
/// this line when `/sbin/init` is executed.
const EXEC_INIT: &str = "Not activating Mandatory Access Control";

/// One boot (`extra` added to the kernel command line): (seconds from `Run /init` to the exec
/// of the real init, seconds of module loading). The exec's time is the kernel's timestamp of [`EXEC_INIT`]; a kernel without
/// that line falls back to the real init's first output (`KEEL t-init=`, its uptime).
fn stage_time(
    disk: &Disk,
    tag: &str,
    initramfs: Option<&std::path::Path>,
    cpus: u32,
    extra: &str,
) -> (f64, f64, Vec<(String, f64)>) {
    let mut vm = Vm::start(
        disk,
        tag,
        &Boot {
            initramfs: initramfs.map(|p| p.to_path_buf()),
            verbose: true,
            cpus,
            cmdline: format!(
                "{} {extra}",
                std::env::var("KEEL_BENCH_CMDLINE").unwrap_or_default()
            ),
            ..Boot::default()
        },
    );
    let t_init = num_after(&vm.wait_for("KEEL t-init="), "KEEL t-init=").unwrap();
    let log = vm.log();
    vm.kill();
    if std::env::var_os("KEEL_BENCH_STEPS").is_some() {
        for l in log
            .lines()
            .skip_while(|l| !l.contains("Run /init"))
            .take_while(|l| !l.contains("KEEL t-init="))
        {
            eprintln!("{tag}: {l}");
        }
    }
    let run_init = log
        .lines()
        .find(|l| l.contains("Run /init as init process"))
        .and_then(kernel_timestamp)
        .unwrap_or_else(|| panic!("no `Run /init` line:\n{log}"));
    let exec = log
        .lines()
        .find(|l| l.contains(EXEC_INIT))
        .and_then(kernel_timestamp)
        .unwrap_or(t_init);
    // keel's own steps: `keel: <step>: ok (<ms> ms)`, in order.
    let steps: Vec<(String, f64)> = log
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("keel: ")? + 6..];
            let (name, ms) = rest.split_once(": ok (")?;
            Some((name.to_string(), num_after(ms, "")?))
        })
        .collect();
    let modules = if initramfs.is_some() {
        let at = |step: &str| {
            log.lines()
                .find(|l| l.contains(&format!("KEEL-SH {step} ")))
                .and_then(|l| num_after(l, &format!("KEEL-SH {step} ")))
                .unwrap_or_else(|| panic!("no {step} step:\n{log}"))
        };
        at("modules") - at("start")
    } else {
        steps
            .iter()
            .find(|(name, _)| name == "load modules")
            .map(|(_, ms)| ms / 1e3)
            .unwrap_or_else(|| panic!("no module step:\n{log}"))
    };
    (exec - run_init, modules, steps)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(3);
    let sections: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    let want = |s: &str| sections.is_empty() || sections.contains(&s);
    let k = kit();
    let script = script_initramfs();
    let v1 = image(1, true, Fs::Squashfs);
    let dir = scenario_dir("bench");

    // 1. Boot stage time.
    if want("boot") {
        boot_stage(runs, &script, &v1, &dir);
    }
    if want("initramfs") {
        initramfs_sizes(&k.initramfs, &script);
    }
    if want("roundtrip") {
        round_trip(runs, &v1, &dir);
    }
    if want("exec") {
        exec::bench(runs, &v1, &dir);
    }
    if want("verity") {
        verity::bench(runs, &dir);
    }
    if want("microvm") {
        microvm::bench(runs, &dir);
    }
    let _ = fs::remove_dir_all(&dir);
}

/// Boot stage time, keel vs the script: 1 vCPU with 0 and 100,000 files in the old upper, and
/// 2 vCPUs with none. `KEEL_BENCH_UPPER=N` / `KEEL_BENCH_CPUS=N` keep only those rows.
fn boot_stage(runs: usize, script: &std::path::Path, v1: &std::path::Path, dir: &std::path::Path) {
    println!("### Boot stage: `Run /init` → exec of the real init (kernel timestamps, QEMU TCG, median of {runs}, min–max)\n");
    println!("An ordinary boot: the image adopted on an earlier boot, nothing staged. Same kernel, disk, modules and QEMU settings for both.\n");
    println!("| initramfs | vCPUs | old upper | total | modules | excluding modules |");
    println!("|---|---|---|---|---|---|");
    let env_num = |k: &str| std::env::var(k).ok().map(|v| v.parse::<usize>().expect(k));
    let configs: Vec<(u32, usize)> = [(1, 0), (1, 100_000), (2, 0)]
        .into_iter()
        .filter(|&(c, f)| {
            env_num("KEEL_BENCH_UPPER").is_none_or(|n| n == f)
                && env_num("KEEL_BENCH_CPUS").is_none_or(|n| n == c as usize)
        })
        .collect();
    let mut totals = std::collections::HashMap::new();
    let mut bases = std::collections::HashMap::new();
    let mut steps: std::collections::BTreeMap<(u32, usize, String), Vec<f64>> = Default::default();
    for &(cpus, files) in &configs {
        let base = bases
            .entry(files)
            .or_insert_with(|| {
                Disk::steady(
                    &dir.join(format!("base-{files}")),
                    v1,
                    "root-squashfs.img",
                    files,
                )
            })
            .clone();
        // keel and the script take turns, so that a slow spell of the host hits both.
        let who = [("keel (initstage)", None), ("busybox script", Some(script))];
        let mut tot = vec![Vec::new(); 2];
        let mut mods = vec![Vec::new(); 2];
        let mut excl = vec![Vec::new(); 2];
        for r in 0..runs {
            for (w, (_, initrd)) in who.iter().enumerate() {
                let disk = Disk {
                    path: dir.join("run.img"),
                    layout: base.layout.clone(),
                };
                fs::copy(&base.path, &disk.path).unwrap();
                // Write the copy back now, not while the VM boots.
                run(&mut std::process::Command::new("sync"));
                let tag = format!(
                    "{}-{cpus}-{files}-{r}",
                    if initrd.is_some() { "script" } else { "keel" }
                );
                let (t, m, st) = stage_time(&disk, &tag, *initrd, cpus, "");
                tot[w].push(t);
                mods[w].push(m);
                excl[w].push(t - m);
                for (name, ms) in st {
                    steps.entry((cpus, files, name)).or_default().push(ms / 1e3);
                }
            }
        }
        for (w, (name, _)) in who.iter().enumerate() {
            println!(
                "| {name} | {cpus} | {files} files | {} | {} | {} |",
                fmt_ms(&tot[w]),
                fmt_ms(&mods[w]),
                fmt_ms(&excl[w])
            );
            totals.insert(
                (*name, cpus, files),
                (stats(&tot[w]).0, stats(&excl[w]).0, stats(&mods[w]).0),
            );
        }
    }
    println!();
    for &(cpus, files) in &configs {
        let (kt, ke, km) = totals[&("keel (initstage)", cpus, files)];
        let (st, se, _) = totals[&("busybox script", cpus, files)];
        // keel's module step alone, against the script's whole time: the lowest total ratio
        // any initramfs loading the same modules the same way could reach in this run.
        println!(
            "- {cpus} vCPU{}, {files} files in the old upper: keel takes **{:.2}×** the script's time in total, **{:.2}×** excluding module loading (its module loading alone is {:.2}× the script's total).",
            if cpus > 1 { "s" } else { "" },
            kt / st,
            ke / se,
            km / st
        );
    }
    // Where keel's time goes: its own step log.
    println!("\nkeel's steps (its own log, median ms):\n");
    println!("| vCPUs | old upper | step | time |");
    println!("|---|---|---|---|");
    for ((cpus, files, name), v) in &steps {
        println!("| {cpus} | {files} files | {name} | {} |", fmt_ms(v));
    }
    println!();
    if let (Some((k0, _, _)), Some((k1, _, _))) = (
        totals.get(&("keel (initstage)", 1, 0)),
        totals.get(&("keel (initstage)", 1, 100_000)),
    ) {
        println!(
            "- keel with 100,000 files left in the upper vs none: {:.2}×.",
            k1 / k0
        );
    }
    println!();
}

/// Compressed initramfs sizes, keel's vs the busybox script's.
fn initramfs_sizes(keel: &std::path::Path, script: &std::path::Path) {
    let size = |p: &std::path::Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    println!("### Initramfs (gzip, same 17 module files)\n");
    println!("| initramfs | bytes |");
    println!("|---|---|");
    println!("| keel: initstage + modules + key | {} |", size(keel));
    println!(
        "| busybox script + busybox-static + modules | {} |",
        size(script)
    );
    println!(
        "\nkeel's is {:.2}× the busybox one.\n",
        size(keel) as f64 / size(script) as f64
    );
}

/// The update round trip vs a plain boot.
fn round_trip(runs: usize, v1: &std::path::Path, dir: &std::path::Path) {
    let v2 = image(2, true, Fs::Squashfs);
    sign(&v2, 2);
    let mut plain = Vec::new();
    let mut update = Vec::new();
    for r in 0..runs {
        let disk = Disk::new(&dir.join(format!("rt-{r}")), v1, "root-squashfs.img");
        let port = free_port();
        let boot = Boot {
            tcp_port: Some(port),
            ..Boot::default()
        };
        // A plain boot of the same VM, QEMU start to "ready" (what a reboot costs here:
        // each boot is a QEMU process).
        let t = Instant::now();
        let mut vm = Vm::start(&disk, &format!("plain-{r}"), &boot);
        vm.wait_for("KEEL ready version=1");
        plain.push(t.elapsed().as_secs_f64());
        // The update: push v2, the guest reboots, v2 promoted, health-checked, marked good.
        let t = Instant::now();
        let out = keelctl(&[
            "-e",
            &format!("tcp://127.0.0.1:{port}"),
            "push",
            v2.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{out:?}");
        vm.wait_for("KEEL staged: rebooting");
        vm.wait_exit();
        let mut vm = Vm::start(&disk, &format!("update-{r}"), &boot);
        vm.wait_for("KEEL marked-good version=2");
        vm.wait_for("KEEL ready version=2");
        update.push(t.elapsed().as_secs_f64());
        vm.kill();
    }
    println!("### Update round trip in the VM (median of {runs}, min–max)\n");
    println!("| what | time |");
    println!("|---|---|");
    println!("| plain boot to ready (baseline) | {} |", fmt_ms(&plain));
    println!(
        "| push v2 → reboot → v2 promoted, marked good, ready | {} |",
        fmt_ms(&update)
    );
    println!(
        "\nThe update round trip is {:.2}× a plain boot.",
        stats(&update).0 / stats(&plain).0
    );
}
