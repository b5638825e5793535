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
        exec_bench(runs, &v1, &dir);
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

/// Milliseconds at the `per_mille`/1000 quantile of seconds `v`.
fn quantile_ms(v: &[f64], per_mille: usize) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[(s.len() - 1) * per_mille / 1000] * 1e3
}

/// exec over hybrid vsock in one guest: the round trip of `true` against its floor (a status
/// round trip over the same transport plus the guest's own fork/exec/wait of `true`), stdout
/// and cp throughput, and the agent's RSS idle and with 16 clients streaming at once.
fn exec_bench(runs: usize, v1: &std::path::Path, dir: &std::path::Path) {
    let d = dir.join("exec");
    // Version 1 with dropbear added: the ssh baseline runs in the same guest.
    let _ = v1;
    let (v1, ssh) = ssh_image();
    let disk = Disk::new(&d, &v1, "root-squashfs.img");
    let dev = VsockDevice::start(&d);
    let ssh_port = free_port();
    let boot = Boot {
        vsock: Some(dev.vhost.clone()),
        ssh_port: Some(ssh_port),
        ..Boot::default()
    };
    let mut vm = Vm::start(&disk, "exec", &boot);
    vm.wait_for("KEEL ready version=1");
    let ep = dev.endpoint();
    let key = kit().host_key.to_str().unwrap().to_string();
    let bins = kit().bins.join("keelctl");
    // keelctl on the guest's hybrid vsock with the host key.
    let ctl = || {
        let mut c = std::process::Command::new(&bins);
        c.args(["-e", &ep, "--key", &key]);
        c
    };
    let timed = |args: &[&str]| -> f64 {
        let t = Instant::now();
        let out = ctl()
            .args(["--wait", "20"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        t.elapsed().as_secs_f64()
    };
    let n = if runs <= 1 { 20 } else { 200 };
    let exec: Vec<f64> = (0..n).map(|_| timed(&["exec", "--", "true"])).collect();
    let status: Vec<f64> = (0..n).map(|_| timed(&["status"])).collect();
    // The ssh baseline: Debian's dropbear in the guest (started by exec), Debian's dbclient
    // on the host over the forwarded TCP port, key auth, no host key check, HOME here.
    timed(&[
        "exec",
        "--detach",
        "--",
        "dropbear",
        "-F",
        "-E",
        "-s",
        "-p",
        "22",
        "-r",
        "/etc/dropbear/host-ed25519",
    ]);
    let ssh_true = || -> Option<f64> {
        let t = Instant::now();
        let out = std::process::Command::new("dbclient")
            .args(["-y", "-y", "-i"])
            .arg(&ssh.client_key)
            .args(["-p", &ssh_port.to_string(), "root@127.0.0.1", "true"])
            .env("HOME", &d)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("dbclient (apt-get install dropbear-bin)");
        out.status.success().then(|| t.elapsed().as_secs_f64())
    };
    let mut up = false;
    for _ in 0..100 {
        if ssh_true().is_some() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        up,
        "dropbear in the guest did not answer dbclient within 20 s"
    );
    let ssh_runs: Vec<f64> = (0..n)
        .map(|_| ssh_true().expect("ssh guest true"))
        .collect();
    // Seconds `script` takes in the guest, timed there (between two /proc/uptime reads).
    let in_guest = |script: &str| -> f64 {
        let out = ctl()
            .args(["exec", "--", "sh", "-c"])
            .arg(format!(
                "s=$(cut -d' ' -f1 /proc/uptime); {script}; e=$(cut -d' ' -f1 /proc/uptime); echo $s $e"
            ))
            .output()
            .unwrap();
        let t = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut it = t
            .split_whitespace()
            .map(|x| x.parse::<f64>().unwrap_or(0.0));
        let (s, e) = (it.next().unwrap_or(0.0), it.next().unwrap_or(0.0));
        e - s
    };
    // The guest's own fork/exec/wait of `true`, 200 times.
    let spawn_ms =
        in_guest("i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done") / 200.0 * 1e3;
    let floor_p50 = quantile_ms(&status, 500) + spawn_ms;
    let floor_p99 = quantile_ms(&status, 990) + spawn_ms;
    // Throughput: 64 MiB of stdout; cp of 24 MiB into the guest's newimg and back; each
    // measured `runs` times, keel and its baseline in turn, medians shown.
    let mib = 64.0;
    let cp_mib = 24.0;
    let t_alone = in_guest("head -c 67108864 /dev/zero > /dev/null");
    // The raw byte stream over the same transport, both ways: keel-rawstream in the guest
    // (started by exec), the host on the hybrid socket, no protocol in between.
    let raw = |args: &[&str]| {
        let out = ctl()
            .args(["exec", "--detach", "--", "keel-rawstream"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "rawstream: {out:?}");
    };
    let raw_out = |port: u32| -> f64 {
        raw(&["send", &port.to_string(), "67108864"]);
        let t = Instant::now();
        let mut s = dev.connect(port);
        let got = std::io::copy(&mut s, &mut std::io::sink()).unwrap();
        assert_eq!(got, 64 << 20);
        t.elapsed().as_secs_f64()
    };
    let zeros = vec![0u8; 256 << 10];
    // Into the guest: to memory, or into a file on newimg, fsynced (cp's disk work). Timed
    // from the connection to the guest's end (its exec returns, the count it read checked):
    // the host's EOF alone can come before the guest has read it all.
    let raw_in = |port: u32, file: Option<&str>| -> f64 {
        let p = port.to_string();
        let child = ctl()
            .args(["exec", "--", "keel-rawstream", "recv"])
            .arg(&p)
            .args(file)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut s = dev.connect(port);
        let t = Instant::now();
        for _ in 0..(24 << 20) / zeros.len() {
            std::io::Write::write_all(&mut s, &zeros).unwrap();
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let out = child.wait_with_output().unwrap();
        let took = t.elapsed().as_secs_f64();
        assert!(out.status.success(), "rawstream recv: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            (24u64 << 20).to_string()
        );
        took
    };
    let blob = d.join("cp.bin");
    fs::write(&blob, vec![7u8; 24 << 20]).unwrap();
    let back = d.join("back.bin");
    let (mut v_out, mut v_raw_out, mut v_head) = (Vec::new(), Vec::new(), Vec::new());
    let (mut v_in, mut v_raw_in, mut v_raw_file, mut v_back) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..runs.max(1) {
        let port = 7500 + 10 * u32::try_from(round).unwrap();
        // The producer is keel-rawstream's own writer (256 KiB writes of zeros), the same
        // code that feeds the raw stream: the ratio is keel's cost, not the producer's.
        v_out.push(timed(&[
            "exec",
            "--",
            "keel-rawstream",
            "write",
            "67108864",
        ]));
        v_raw_out.push(raw_out(port));
        // busybox `head -c`, as a user would write it.
        v_head.push(timed(&[
            "exec",
            "--",
            "head",
            "-c",
            "67108864",
            "/dev/zero",
        ]));
        v_raw_in.push(raw_in(port + 1, None));
        v_raw_file.push(raw_in(port + 2, Some("/run/keel/newimg/raw.bin")));
        // newimg is small: the file goes before cp needs the room.
        // (sync: ext4 reuses freed blocks once the journal committed their release)
        timed(&[
            "exec",
            "--",
            "sh",
            "-c",
            "rm /run/keel/newimg/raw.bin && sync",
        ]);
        v_in.push(timed(&[
            "cp",
            blob.to_str().unwrap(),
            ":/run/keel/newimg/cp.bin",
        ]));
        v_back.push(timed(&[
            "cp",
            ":/run/keel/newimg/cp.bin",
            back.to_str().unwrap(),
        ]));
        timed(&[
            "exec",
            "--",
            "sh",
            "-c",
            "rm /run/keel/newimg/cp.bin && sync",
        ]);
    }
    let med = |v: &[f64]| stats(v).0;
    let (t_out, t_raw_out, t_head) = (med(&v_out), med(&v_raw_out), med(&v_head));
    let (t_in, t_raw_in, t_raw_file, t_back) =
        (med(&v_in), med(&v_raw_in), med(&v_raw_file), med(&v_back));
    // RSS of the agent, idle and with 16 clients streaming at once.
    let rss = || -> u64 {
        let out = ctl()
            .args(["exec", "--", "sh", "-c"])
            .arg("grep VmRSS /proc/$(pidof keel-agent)/status")
            .output()
            .unwrap();
        assert!(out.status.success(), "rss: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .and_then(|k| k.parse().ok())
            .unwrap_or(0)
    };
    let idle = rss();
    let streams: Vec<std::process::Child> = (0..16)
        .map(|_| {
            ctl()
                .args(["exec", "--", "sh", "-c", "yes | head -c 20000000"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let busy = rss();
    for mut c in streams {
        let _ = c.wait();
    }
    vm.kill();
    println!("### exec over hybrid vsock (QEMU TCG guest, {n} runs each)\n");
    println!("| what | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| `keelctl exec -- true` (connect, hello, auth, exec, exit) | {:.1} ms | {:.1} ms |",
        quantile_ms(&exec, 500),
        quantile_ms(&exec, 990)
    );
    println!(
        "| floor: `keelctl status` round trip + the guest's own fork/exec/wait of `true` ({spawn_ms:.1} ms) | {floor_p50:.1} ms | {floor_p99:.1} ms |"
    );
    println!(
        "| baseline: `dbclient root@guest true` (Debian's dropbear in the same guest, TCP through QEMU's user network, ed25519 key) | {:.1} ms | {:.1} ms |",
        quantile_ms(&ssh_runs, 500),
        quantile_ms(&ssh_runs, 990)
    );
    println!(
        "\nexec is {:.2}× its floor at p50, {:.2}× at p99 (goal ≤ 1.5×); {:.3}× ssh at p50, {:.3}× at p99 (goal ≤ 0.1×).\n",
        quantile_ms(&exec, 500) / floor_p50,
        quantile_ms(&exec, 990) / floor_p99,
        quantile_ms(&exec, 500) / quantile_ms(&ssh_runs, 500),
        quantile_ms(&exec, 990) / quantile_ms(&ssh_runs, 990),
    );
    println!("| transfer (median of {}) | MiB/s |", runs.max(1));
    println!("|---|---|");
    println!(
        "| exec stdout, 64 MiB (`keel-rawstream write`: 256 KiB writes) | {:.1} |",
        mib / t_out
    );
    println!(
        "| baseline: raw vsock stream out of the guest, 64 MiB (`keel-rawstream send`, the same writes) | {:.1} |",
        mib / t_raw_out
    );
    println!(
        "| exec stdout, 64 MiB of busybox `head -c` | {:.1} |",
        mib / t_head
    );
    println!(
        "| the same `head -c` into the guest's /dev/null, no exec | {:.1} |",
        mib / t_alone.max(1e-3)
    );
    println!(
        "| cp into the guest, 24 MiB (to newimg, fsynced) | {:.1} |",
        cp_mib / t_in
    );
    println!(
        "| baseline: raw vsock stream into the guest, 24 MiB (to memory) | {:.1} |",
        cp_mib / t_raw_in
    );
    println!(
        "| baseline: raw vsock stream into the guest, 24 MiB (to a file on newimg, fsynced) | {:.1} |",
        cp_mib / t_raw_file
    );
    println!("| cp out of the guest, 24 MiB | {:.1} |", cp_mib / t_back);
    println!(
        "\nexec stdout is {:.2}× the raw stream out (goal ≥ 0.8×); with `head -c` as the \
         producer, {:.2}× what `head -c` makes alone. cp out is {:.2}× the raw stream out; cp in \
         {:.2}× the raw stream in to memory, {:.2}× the raw stream in to a file (goal ≥ 0.9×). \
         keelctl runs are timed whole, connect and auth included.\n",
        t_raw_out / t_out,
        t_alone / t_head,
        (cp_mib / t_back) / (mib / t_raw_out),
        t_raw_in / t_in,
        t_raw_file / t_in,
    );
    println!("| agent RSS | KiB |");
    println!("|---|---|");
    println!("| idle (after the runs above) | {idle} |");
    println!("| 16 clients streaming at once | {busy} |");
}
