//! Harness for keel's VM tests: builds real artefacts from the project's own code and boots
//! them under QEMU (TCG), one process per boot, serial log to a file, a hard timeout per boot,
//! at most two VMs at once.
//!
//!
//! | module | part |
//! |---|---|
//! | [`kit`](mod@kit) | kernel, static binaries, initramfs, signing key: built once per process |
//! | [`image`](mod@image) | root images with the agent and a `KEEL ...`-marking init; the script baseline |
//! | [`debroot`] | Debian roots with systemd or OpenRC as init and keel installed in them |
//! | [`dracut`](mod@dracut) | a systemd initramfs built by Debian's dracut with keel's module |
//! | [`guest`] | a booted guest's agent over TCP: wait, exec by key, reboot, status polls |
//! | [`disk`] | the GPT disk, built and read back without mounts |
//! | [`vm`] | one QEMU boot, at most two at once |
//! | [`vsock`] | `vhost-device-vsock` and hybrid vsock from the host |
#![allow(missing_docs)]

pub mod debroot;
pub mod disk;
pub mod dracut;
pub mod guest;
pub mod image;
pub mod kit;
pub mod vm;
pub mod vsock;

pub use debroot::*;
pub use disk::*;
pub use dracut::*;
pub use guest::*;
pub use image::*;
pub use kit::*;
pub use vm::*;
pub use vsock::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

/// Modules the guest needs, by name; `keelctl initramfs` adds their dependencies.
pub const MODULES: &str =
    "virtio_pci,virtio_blk,virtio_net,vmw_vsock_virtio_transport,loop,squashfs,overlay,erofs";
/// Packed into the kit's initramfs but not loaded at boot: initstage loads dm-verity (and
/// through its dependencies device-mapper) itself, when an image's manifest carries a tree
/// (with the accelerated SHA-256 driver it picks up when packed).
pub const VERITY_MODULES: &str = "dm_verity,sha256_ssse3";
/// Packed too, loaded by the watchdog scenario's `modules=`: Debian's cloud kernel has no
/// driver for QEMU's `i6300esb`, so the watchdog is the kernel's `softdog` (the same
/// `/dev/watchdog` interface; it resets the machine when it runs out).
pub const WATCHDOG_MODULES: &str = "softdog";
/// The product name of the test images.
pub const PRODUCT: &str = "vmdemo";
/// The agent's port in the guest (TCP and vsock).
pub const AGENT_PORT: u16 = 7447;
/// Hard limit for one boot.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn work() -> PathBuf {
    let w = workspace().join("vm-tests/work");
    fs::create_dir_all(&w).unwrap();
    w
}

pub use keel_tests::{gpt_disk, run, sha256_file, Part};

/// A keelctl command against the static binary. Each run has a known-agents file of its
/// own: every VM's agent makes its identity at its first boot, and a later VM may get an
/// earlier one's forwarded port, so a key is trusted on first use per run (the update
/// scenario checks the key stays the same across reboots from what keelctl reports).
pub fn keelctl(args: &[&str]) -> Output {
    keel_tests::agent::keelctl_with(&kit().bins.join("keelctl"), &work(), args)
}

/// stdout of a keelctl run that must succeed (its output in the panic otherwise).
pub fn ok(out: &std::process::Output) -> String {
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "keelctl failed: {s}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s
}

/// `keelctl push IMAGE` to the agent forwarded to `port`.
pub fn push(port: u16, image: &Path) -> Output {
    keelctl(&[
        "-e",
        &format!("tcp://127.0.0.1:{port}"),
        "--wait",
        "20",
        "push",
        image.to_str().unwrap(),
    ])
}

/// A power cut in the middle of a push: `keelctl push IMAGE` (no retries) to the agent on
/// `port` in the background, and QEMU killed `delay` later. The push's output.
pub fn push_then_cut(vm: &mut Vm, port: u16, image: &Path, delay: Duration) -> Output {
    let image = image.to_path_buf();
    let pusher = std::thread::spawn(move || {
        keelctl(&[
            "-e",
            &format!("tcp://127.0.0.1:{port}"),
            "--wait",
            "0",
            "push",
            image.to_str().unwrap(),
            "--retries",
            "0",
        ])
    });
    std::thread::sleep(delay);
    vm.kill();
    pusher.join().unwrap()
}

/// After a power cut: the next boot starts version 1 or 2, whole, with /persistent intact.
/// Its `KEEL booted version=` line.
pub fn check_intact(disk: &Disk, tag: &str) -> String {
    let mut vm = Vm::start(disk, tag, &Boot::default());
    let booted = vm.wait_for("KEEL booted version=");
    assert!(booted.ends_with('1') || booted.ends_with('2'), "{booted}");
    assert!(
        vm.wait_for("KEEL persisted=").ends_with("kept"),
        "{}",
        vm.log()
    );
    vm.wait_for("KEEL ready version=");
    vm.kill();
    booted
}

/// `keelctl status --json` of the agent forwarded to `port`.
pub fn status(port: u16) -> serde_json::Value {
    let out = keelctl(&["-e", &format!("tcp://127.0.0.1:{port}"), "status", "--json"]);
    serde_json::from_str(&ok(&out)).unwrap()
}

/// A boot whose agent's TCP port is forwarded to `port`.
pub fn tcp_boot(port: u16) -> Boot {
    Boot {
        tcp_port: Some(port),
        ..Boot::default()
    }
}

/// A scratch directory for one scenario.
pub fn scenario_dir(name: &str) -> PathBuf {
    let d = work()
        .join("runs")
        .join(format!("{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}
