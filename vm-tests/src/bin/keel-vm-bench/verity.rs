//! dm-verity's costs, each against the same image without it in the same run: the boot stage
//! (`keel.verity=auto`, the tree used, against `keel.verity=off` on the same disk), and a
//! sequential read of the whole image in the guest (the verity device against the loop
//! device under it). `KEEL_BENCH_QEMU_CPU=max` reads with QEMU's `max` CPU model (SSSE3 and
//! AVX2 emulated: the kernel's accelerated SHA-256 drivers load).

use std::fs;
use std::path::Path;

use keel_vm_tests::*;

use super::{fmt_ms, stage_time, stats};

/// Reads of the image per measurement in the guest (each after dropping the page cache).
const READS: u32 = 30;

/// The verity rows of `make bench`.
pub fn bench(runs: usize, dir: &Path) {
    let v = dir.join("verity.img");
    let m = sign_verity(&image(2, true, Fs::Squashfs), &v, 2);
    let info = m.manifest.verity.clone().unwrap();
    let base = Disk::steady_signed(&dir.join("verity-base"), &v, &m, "root-squashfs.img");
    let fresh = || {
        let disk = Disk {
            path: dir.join("verity-run.img"),
            layout: base.layout.clone(),
        };
        fs::copy(&base.path, &disk.path).unwrap();
        run(&mut std::process::Command::new("sync"));
        disk
    };

    println!("### dm-verity (QEMU TCG, 1 vCPU, median of {runs}, min–max)\n");
    println!(
        "The same disk and image ({} KiB of data, its tree after it), booted with the tree used and with `keel.verity=off`; they take turns.\n",
        info.data_size >> 10
    );
    println!("| boot | `Run /init` → exec of the real init | keel's verity steps |");
    println!("|---|---|---|");
    let who = [
        ("verity (auto)", ""),
        ("plain (keel.verity=off)", "keel.verity=off"),
    ];
    let mut tot = vec![Vec::new(); 2];
    let mut own = vec![Vec::new(); 2];
    for r in 0..runs {
        for (w, (_, extra)) in who.iter().enumerate() {
            let (t, _, steps) = stage_time(&fresh(), &format!("verity-{w}-{r}"), None, 1, extra);
            tot[w].push(t);
            own[w].push(
                steps
                    .iter()
                    .filter(|(n, _)| n.starts_with("verity"))
                    .map(|(_, ms)| ms / 1e3)
                    .sum::<f64>(),
            );
        }
    }
    for (w, (name, _)) in who.iter().enumerate() {
        println!("| {name} | {} | {} |", fmt_ms(&tot[w]), fmt_ms(&own[w]));
    }
    let boot = stats(&tot[0]).0 / stats(&tot[1]).0;
    println!("\n- Boot stage with verity against without: **{boot:.2}×** (goal ≤ 1.1×).\n");

    // Sequential reads in one guest: the verity device, then the loop device under it.
    let blocks = info.data_size / 4096;
    let script = format!(
        r#"N={blocks}; D=/dev/mapper/keel-root
for b in /sys/block/dm-*; do [ "$(cat $b/dm/name)" = keel-root ] && L=/dev/$(ls $b/slaves); done
t() {{ read a _ < /proc/uptime; i=0
  while [ $i -lt {READS} ]; do echo 3 > /proc/sys/vm/drop_caches; dd if=$1 of=/dev/null bs=4096 count=$N 2>/dev/null || exit 1; i=$((i+1)); done
  read b _ < /proc/uptime; echo "$a $b" | awk '{{print $2 - $1}}'; }}
grep -A4 '^name.*: sha256$' /proc/crypto | grep driver
for r in $(seq {runs}); do echo "verity $(t $D)"; echo "plain $(t $L)"; done"#
    );
    let disk = fresh();
    let port = free_port();
    let mut vm = Vm::start(
        &disk,
        "verity-read",
        &Boot {
            cpu: std::env::var("KEEL_BENCH_QEMU_CPU").ok(),
            ..tcp_boot(port)
        },
    );
    vm.wait_for("KEEL ready version=2");
    let key = kit().host_key.to_str().unwrap().to_string();
    let ep = format!("tcp://127.0.0.1:{port}");
    let out = ok(&keelctl(&[
        "-e", &ep, "--wait", "20", "--key", &key, "exec", "--", "sh", "-c", &script,
    ]));
    vm.kill();
    let col = |which: &str| -> Vec<f64> {
        out.lines()
            .filter_map(|l| l.strip_prefix(which)?.trim().parse().ok())
            .collect()
    };
    let (ver, plain) = (col("verity "), col("plain "));
    // /proc/crypto lists the best driver first.
    let driver = out
        .lines()
        .find_map(|l| l.strip_prefix("driver")?.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    assert!(
        !ver.is_empty() && ver.len() == plain.len(),
        "guest said: {out}"
    );
    let mib = (info.data_size * u64::from(READS)) as f64 / f64::from(1 << 20);
    println!(
        "Sequential read of the image's {} KiB in the guest, {READS} times (page cache dropped before each), median of {}; the guest kernel's SHA-256 is `{driver}` (QEMU's CPU model: {}):\n",
        info.data_size >> 10,
        ver.len(),
        std::env::var("KEEL_BENCH_QEMU_CPU").unwrap_or_else(|_| "qemu64, the default".into())
    );
    println!("| device | time | rate |");
    println!("|---|---|---|");
    for (name, v) in [
        ("the loop device (no verity)", &plain),
        ("/dev/mapper/keel-root (verity)", &ver),
    ] {
        let (m, lo, hi) = stats(v);
        println!(
            "| {name} | {:.2} s ({lo:.2}–{hi:.2}) | {:.0} MiB/s |",
            m,
            mib / m
        );
    }
    println!(
        "\n- Read throughput through verity against without: **{:.2}×** (goal ≥ 0.8×).\n",
        stats(&plain).0 / stats(&ver).0
    );
}
