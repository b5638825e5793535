//! microVM start: QEMU started → the agent's ready announce over vsock → the first `keelctl
//! exec` answered, for an initramfs built by `keelctl build --format initramfs` from the same
//! OCI image: keel-agent as its init (`--agent`), against a busybox-script `/init` that
//! mounts the same filesystems, loads the same modules in the same order and starts the same
//! agent and entrypoint (the way initramfs-builder's guests boot). Both gzip; keel's also as
//! zstd, for what the compression alone changes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use keel_vm_tests::*;

use super::{fmt_ms, stats};

/// The script's `/init`: what keel's init does before the agent answers, in shell.
const SCRIPT_INIT: &str = r#"#!/bin/sh
mkdir -p /proc /sys /dev /run /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
while read -r m; do insmod "$m"; done < /etc/keel/modules.load
/usr/sbin/keel-agent &
cd /app && FOO=bar /app/run.sh &
while :; do wait; done
"#;

/// (QEMU start → ready announce, → first exec answered), seconds.
fn one(dir: &Path, initrd: &Path, tag: &str) -> (f64, f64) {
    let empty = dir.join("empty.img");
    fs::write(&empty, vec![0u8; 1 << 20]).unwrap();
    let disk = Disk {
        path: empty,
        layout: Vec::new(),
    };
    fs::create_dir_all(dir.join(tag)).unwrap();
    let dev = VsockDevice::start(&dir.join(tag));
    let boot = Boot {
        vsock: Some(dev.vhost.clone()),
        initramfs: Some(initrd.to_path_buf()),
        ..Boot::default()
    };
    let waiter = dev.wait_ready();
    let t0 = Instant::now();
    let mut vm = Vm::start(&disk, tag, &boot);
    let ready = waiter.join().unwrap();
    let t_ready = t0.elapsed().as_secs_f64();
    assert!(ok(&ready).contains("\"ready\""), "{tag}: {ready:?}");
    let ep = dev.endpoint();
    let key = kit().host_key.to_str().unwrap().to_string();
    ok(&keelctl(&[
        "-e", &ep, "--wait", "20", "--key", &key, "exec", "--", "true",
    ]));
    let t_exec = t0.elapsed().as_secs_f64();
    vm.kill();
    (t_ready, t_exec)
}

/// The microVM rows of `make bench`.
pub fn bench(runs: usize, dir: &Path) {
    let d = dir.join("microvm");
    fs::create_dir_all(d.join("oci")).unwrap();
    let layout = app_oci_image(&d.join("oci"));
    let k = kit();
    let agent = k.bins.join("keel-agent");
    let script = d.join("init.sh");
    fs::write(&script, SCRIPT_INIT).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let a = agent.to_str().unwrap();
    let keel = microvm_initramfs(&d, "keel.initramfs", &layout, &["--agent", a]);
    let keel_z = microvm_initramfs(
        &d,
        "keel-zstd.initramfs",
        &layout,
        &["--agent", a, "--compress", "zstd"],
    );
    let inject_agent = format!("{a}:/usr/sbin/keel-agent");
    let inject_init = format!("{}:/init", script.display());
    let script_rd = microvm_initramfs(
        &d,
        "script.initramfs",
        &layout,
        &["--inject", &inject_agent, "--inject", &inject_init],
    );
    let who = [
        ("keel-agent as init (gzip)", &keel),
        ("busybox script (gzip)", &script_rd),
        ("keel-agent as init (zstd)", &keel_z),
    ];
    let mut ready = vec![Vec::new(); who.len()];
    let mut exec = vec![Vec::new(); who.len()];
    for r in 0..runs {
        // They take turns, so that a slow spell of the host hits all of them.
        for (w, (_, rd)) in who.iter().enumerate() {
            let (t, e) = one(&d, rd, &format!("mvm-{w}-{r}"));
            ready[w].push(t);
            exec[w].push(e);
        }
    }
    let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    println!("### microVM start from a container image (QEMU TCG, 1 vCPU, no disk, median of {runs}, min–max)\n");
    println!("The same OCI image, modules, agent and agent.toml; QEMU started → the agent's ready announce on the host (vsock) → the first `keelctl exec true` answered.\n");
    println!("| initramfs | bytes | → ready | → first exec |");
    println!("|---|---|---|---|");
    for (w, (name, rd)) in who.iter().enumerate() {
        println!(
            "| {name} | {} | {} | {} |",
            size(rd),
            fmt_ms(&ready[w]),
            fmt_ms(&exec[w])
        );
    }
    let m = |v: &Vec<f64>| stats(v).0;
    println!(
        "\n- keel-agent as init takes **{:.2}×** the script's time to the ready announce and **{:.2}×** to the first exec answered (goal ≤ 1.0×); as zstd, {:.2}× and {:.2}×.\n",
        m(&ready[0]) / m(&ready[1]),
        m(&exec[0]) / m(&exec[1]),
        m(&ready[2]) / m(&ready[1]),
        m(&exec[2]) / m(&exec[1]),
    );
    let _ = fs::remove_dir_all(&d);
}
