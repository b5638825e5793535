//! The VM half of `make bench`: boot stage time (initstage vs a busybox-script initramfs),
//! initramfs sizes, and the update round trip vs a plain boot. Prints Markdown.
//!
//!     keel-vm-bench [RUNS]        (RUNS per configuration, default 3)

use std::fs;
use std::time::Instant;

use keel_vm_tests::*;

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

/// One boot: (seconds from `Run /init` to the real init, seconds of module loading).
fn stage_time(disk: &Disk, tag: &str, initramfs: Option<&std::path::Path>) -> (f64, f64) {
    let mut vm = Vm::start(
        disk,
        tag,
        &Boot {
            initramfs: initramfs.map(|p| p.to_path_buf()),
            verbose: true,
            ..Boot::default()
        },
    );
    let t_init = num_after(&vm.wait_for("KEEL t-init="), "KEEL t-init=").unwrap();
    let log = vm.log();
    vm.kill();
    let run_init = log
        .lines()
        .find(|l| l.contains("Run /init as init process"))
        .and_then(kernel_timestamp)
        .unwrap_or_else(|| panic!("no `Run /init` line:\n{log}"));
    let modules = if initramfs.is_some() {
        let at = |step: &str| {
            log.lines()
                .find(|l| l.contains(&format!("KEEL-SH {step} ")))
                .and_then(|l| num_after(l, &format!("KEEL-SH {step} ")))
                .unwrap_or_else(|| panic!("no {step} step:\n{log}"))
        };
        at("modules") - at("start")
    } else {
        log.lines()
            .find(|l| l.contains("load modules: ok ("))
            .and_then(|l| num_after(l, "ok ("))
            .map(|ms| ms / 1e3)
            .unwrap_or_else(|| panic!("no module step:\n{log}"))
    };
    (t_init - run_init, modules)
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let k = kit();
    let script = script_initramfs();
    let v1 = image(1, true, Fs::Squashfs);
    let dir = scenario_dir("bench");

    // 1. Boot stage time.
    println!("### Boot stage: `Run /init` → exec of the real init (kernel timestamps, QEMU TCG, median of {runs}, min–max)\n");
    println!("| initramfs | old upper | total | modules | excluding modules |");
    println!("|---|---|---|---|---|");
    let mut totals = std::collections::HashMap::new();
    for files in [0usize, 100_000] {
        let base = Disk::with_old_upper(
            &dir.join(format!("base-{files}")),
            &v1,
            "root-squashfs.img",
            files,
        );
        for (name, initrd) in [
            ("keel (initstage)", None),
            ("busybox script", Some(script.as_path())),
        ] {
            let mut tot = Vec::new();
            let mut mods = Vec::new();
            let mut excl = Vec::new();
            for r in 0..runs {
                let disk = Disk {
                    path: dir.join("run.img"),
                    layout: base.layout.clone(),
                };
                fs::copy(&base.path, &disk.path).unwrap();
                // Write the copy back now, not while the VM boots.
                run(&mut std::process::Command::new("sync"));
                let (t, m) = stage_time(&disk, &format!("{files}-{r}"), initrd);
                tot.push(t);
                mods.push(m);
                excl.push(t - m);
            }
            println!(
                "| {name} | {} files | {} | {} | {} |",
                files,
                fmt_ms(&tot),
                fmt_ms(&mods),
                fmt_ms(&excl)
            );
            totals.insert((name, files), (stats(&tot).0, stats(&excl).0));
        }
    }
    println!();
    for files in [0usize, 100_000] {
        let (kt, ke) = totals[&("keel (initstage)", files)];
        let (st, se) = totals[&("busybox script", files)];
        println!(
            "- {files} files in the old upper: keel takes **{:.2}×** the script's time in total, **{:.2}×** excluding module loading.",
            kt / st,
            ke / se
        );
    }
    let (k0, _) = totals[&("keel (initstage)", 0)];
    let (k1, _) = totals[&("keel (initstage)", 100_000)];
    println!(
        "- keel with 100,000 files left in the upper vs none: {:.2}×.\n",
        k1 / k0
    );

    // 2. Initramfs sizes.
    let size = |p: &std::path::Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    println!("### Initramfs (gzip, same 17 module files)\n");
    println!("| initramfs | bytes |");
    println!("|---|---|");
    println!(
        "| keel: initstage + modules + key | {} |",
        size(&k.initramfs)
    );
    println!(
        "| busybox script + busybox-static + modules | {} |",
        size(&script)
    );
    println!(
        "\nkeel's is {:.2}× the busybox one.\n",
        size(&k.initramfs) as f64 / size(&script) as f64
    );

    // 5. Update round trip vs a plain boot.
    let v2 = image(2, true, Fs::Squashfs);
    sign(&v2, 2);
    let mut plain = Vec::new();
    let mut update = Vec::new();
    for r in 0..runs {
        let disk = Disk::new(&dir.join(format!("rt-{r}")), &v1, "root-squashfs.img");
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
    let _ = fs::remove_dir_all(&dir);
}
