//! A systemd initrd built by Debian's `dracut` with keel's module (`systemd/dracut/90keel`)
//! boots the systemd root image: `keel-prepare.service` runs `initstage prepare` on `/sysroot`
//! before `initrd-root-fs.target`, so promotion, trial boots and rollback work exactly as under
//! initstage as PID 1 — and `keel-clean-trash.service` empties the old upper layers in the
//! booted system (no initstage process outlives a systemd initrd to do it). Everything is
//! asserted from the guest's own state. Run as root after `make vm-bins`: `cargo test -p
//! keel-vm-tests --test dracut` (the first run debootstraps dracut's tree and builds the
//! initramfs: a few minutes, cached after).

use std::fs;

use keel_vm_tests::*;

/// As the systemd scenario: img holds three copies of the root at a promotion's peak.
const SIZES: [u64; 4] = [144, 32, 64, 8];

fn boot(port: u16, initramfs: &std::path::Path, extra: &str) -> Boot {
    Boot {
        cmdline: format!("systemd.show_status=1 {extra}"),
        initramfs: Some(initramfs.to_path_buf()),
        ..tcp_boot(port)
    }
}

/// Asserts the running system came up through a systemd initrd with keel's unit in it.
fn assert_systemd_initrd(port: u16) {
    let root = exec_ok(port, &["systemctl", "show", "-P", "Type", "--", "-.mount"]);
    assert_eq!(root, "overlay\n", "systemd's root mount");
    let ts = exec_ok(
        port,
        &[
            "systemctl",
            "show",
            "-p",
            "InitRDTimestampMonotonic",
            "--value",
        ],
    );
    assert!(
        ts.trim().parse::<u64>().unwrap() > 0,
        "no systemd initrd ran: {ts:?}"
    );
    let mounts = exec_ok(port, &["cat", "/proc/self/mounts"]);
    assert!(
        mounts.lines().any(|l| l.starts_with("overlay / overlay ")),
        "{mounts}"
    );
    // initstage prepare's report, carried to the real root with /run.
    let report: serde_json::Value =
        serde_json::from_str(&exec_ok(port, &["cat", "/run/keel/boot.json"])).unwrap();
    assert_eq!(report["upper"], "partition", "{report}");
    assert_eq!(report["run_dir"], "/run/keel", "{report}");
}

#[test]
fn dracut_initramfs_promotes_confirms_and_rolls_back_a_keel_image() {
    let d = scenario_dir("dracut");
    let initramfs = dracut_initramfs();
    let DebScenario { v2, v3, disk, port } = deb_scenario(&d, Init::Systemd, SIZES);

    // v1 from the factory disk, through dracut's initrd.
    let mut vm = Vm::start(&disk, "v1", &boot(port, &initramfs, ""));
    let st = wait_agent(&mut vm, port);
    assert_eq!(st["booted"]["version"], 1, "{st}");
    assert_systemd_initrd(port);
    ok(&push(port, &v2));
    reboot(&mut vm, port);

    // keel-prepare.service promoted v2 in the initrd; the trial ends after boot-complete.target
    // as under initstage; the old upper layer went to .trash and keel-clean-trash emptied it.
    let mut vm = Vm::start(&disk, "v2", &boot(port, &initramfs, ""));
    let st = wait_agent(&mut vm, port);
    assert_eq!(st["booted"]["version"], 2, "{st}");
    let st = status_until(port, "v2's trial never ended", |s| s["trial"].is_null());
    assert!(st["boot_actions"].to_string().contains("promoted"), "{st}");
    assert_systemd_initrd(port);
    let running = exec(port, &["systemctl", "is-system-running", "--wait"]);
    assert_eq!(String::from_utf8_lossy(&running.stdout), "running\n");
    let trash = exec_ok(port, &["ls", "-A", "/run/keel/overlay/.trash"]);
    assert_eq!(trash, "", "old upper layers left in .trash");
    ok(&push(port, &v3));
    reboot(&mut vm, port);

    // v3 fails its check: the trial stays open; with one try the next boot rolls back.
    let mut vm = Vm::start(&disk, "v3", &boot(port, &initramfs, "keel.tries=1"));
    let st = wait_agent(&mut vm, port);
    assert_eq!(st["booted"]["version"], 3, "{st}");
    let running = exec(port, &["systemctl", "is-system-running", "--wait"]);
    assert_eq!(String::from_utf8_lossy(&running.stdout), "degraded\n");
    assert!(!status(port)["trial"].is_null());
    reboot(&mut vm, port);

    let vm = Vm::start(&disk, "back", &boot(port, &initramfs, "keel.tries=1"));
    assert_rolled_back_to(vm, port, &disk, 2);
    let _ = fs::remove_dir_all(&d);
}
