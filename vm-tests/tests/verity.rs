//! dm-verity in real QEMU boots (issue 16): a root pushed with its tree boots through the
//! verity device initstage sets up itself; a byte flipped on `img` afterwards is never booted
//! silently — at a block the mount reads, the same boot falls back to `-old`; at a block read
//! only later, dm-verity restarts the machine and the next boot, finding the boot
//! unconfirmed, checks every block and falls back. Run as root after `make vm-bins`:
//! `cargo test -p keel-vm-tests --test verity`.

use std::fs;
use std::path::Path;

use keel_proto::manifest::SignedManifest;
use keel_vm_tests::*;

/// The image file on `img` (the disk's image name).
const IMAGE: &str = "root-squashfs.img";

/// v1 (plain) boots, `v2` (signed with its tree) is pushed, and the reboot promotes and boots
/// it through dm-verity; checked from the kernel's own view. The VM is left running v2.
fn boot_verity_v2(d: &Path, v2: &Path, m2: &SignedManifest) -> (Disk, u16, Vm) {
    let v1 = image(1, true, Fs::Squashfs);
    let disk = Disk::new(d, &v1, IMAGE);
    let port = free_port();
    let mut vm = Vm::start(&disk, "v1", &tcp_boot(port));
    vm.wait_for("KEEL ready version=1");
    let st = status(port);
    assert!(st["verity"].is_null(), "v1 has no tree: {st}");
    let out = ok(&push(port, v2));
    assert!(out.contains("staged version 2"), "{out}");
    vm.wait_for("KEEL staged: rebooting");
    vm.wait_exit();
    let mut vm = Vm::start(&disk, "v2", &tcp_boot(port));
    vm.wait_for("KEEL booted version=2");
    vm.wait_for("KEEL marked-good version=2");
    vm.wait_for("KEEL ready version=2");
    let st = status(port);
    let root = &m2.manifest.verity.as_ref().unwrap().root_hash;
    let v = &st["verity"];
    assert_eq!(v["root_hash"], root.as_str(), "{st}");
    assert_eq!(v["on_corruption"], "restart_on_corruption", "{st}");
    let table = v["kernel_table"].as_str().unwrap_or_default();
    assert!(
        table.starts_with("verity 1 ")
            && table.contains(root)
            && table.contains("restart_on_corruption"),
        "the kernel's table: {st}"
    );
    assert_eq!(v["kernel_status"], "V", "{st}");
    assert!(
        !st["boot_actions"].to_string().contains("verity: not used"),
        "{st}"
    );
    (disk, port, vm)
}

/// A boot of `disk` that falls back from the corrupt v2 to v1 (plain): the reason names the
/// corrupt block, the disk's state has v1 current and v2 rejected. Returns the status and its
/// boot actions.
fn back_on_v1(
    disk: &Disk,
    port: u16,
    tag: &str,
    m2: &SignedManifest,
) -> (serde_json::Value, String) {
    let mut vm = Vm::start(disk, tag, &tcp_boot(port));
    vm.wait_for("KEEL booted version=1");
    vm.wait_for("KEEL ready version=1");
    let st = status(port);
    let why = st["boot_actions"].to_string();
    assert!(
        why.contains("rolled back") && why.contains("corrupt") && why.contains("dm-verity"),
        "{st}"
    );
    assert!(st["verity"].is_null(), "v1 is plain: {st}");
    vm.kill();
    let state = disk.state();
    assert_eq!(state.current.as_ref().unwrap().version, 1);
    assert!(state.is_rejected(&m2.manifest.sha256));
    (st, why)
}

/// Where `needle` (unique) is in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> u64 {
    let at: Vec<usize> = hay
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "{} matches", at.len());
    at[0] as u64
}

#[test]
fn verity_root_boots_and_a_block_corrupt_at_mount_falls_back_in_the_same_boot() {
    let d = scenario_dir("verity-mount");
    let v2 = d.join("v2.img");
    let m2 = sign_verity(&image(2, true, Fs::Squashfs), &v2, 2);
    let (disk, port, mut vm) = boot_verity_v2(&d, &v2, &m2);
    vm.kill();
    // Byte 8 of squashfs is its superblock's mkfs_time: the mount reads it, and without verity
    // nothing would notice the change.
    disk.flip("img", &format!("/{IMAGE}"), 8, 0x01);
    back_on_v1(&disk, port, "flipped", &m2);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn verity_corruption_met_at_run_time_restarts_and_the_next_boot_checks_and_falls_back() {
    let d = scenario_dir("verity-runtime");
    let src = d.join("v2-later.img");
    let later = verity_later_image(&src, 2);
    let v2 = d.join("v2.img");
    let m2 = sign_verity(&src, &v2, 2);
    let (disk, port, mut vm) = boot_verity_v2(&d, &v2, &m2);
    assert!(vm.log().contains("KEEL read-later"));
    vm.kill();
    // A byte of the file only the init script reads, well after the mount.
    let at = find(&fs::read(&v2).unwrap(), &later[100_000..100_064]);
    disk.flip("img", &format!("/{IMAGE}"), at, 0x80);
    // The mount succeeds; the read restarts the machine (QEMU runs with -no-reboot: it exits).
    let mut vm = Vm::start(&disk, "restart", &tcp_boot(port));
    vm.wait_for("KEEL booted version=2");
    vm.wait_exit();
    let log = vm.log();
    assert!(log.contains("is corrupted"), "dm-verity's report: {log}");
    assert!(
        !log.contains("KEEL read-later") && !log.contains("KEEL marked-good"),
        "{log}"
    );
    // The next boot finds the boot unconfirmed, reads every block, and boots v1 instead.
    let (st, why) = back_on_v1(&disk, port, "checked", &m2);
    assert!(
        why.contains("not confirmed") && why.contains("every block checked"),
        "{st}"
    );
    let _ = fs::remove_dir_all(&d);
}
