//! `keel.watchdog=SECS` in real QEMU boots: a trial boot whose init never comes up is reset
//! by the watchdog initstage armed and counts as a failed trial (the next boot rolls back);
//! a trial boot that marks itself good disarms it and keeps running. The watchdog is the
//! kernel's `softdog` (Debian's cloud kernel has no `i6300esb` driver). Run as root after
//! `make vm-bins`: `cargo test -p keel-vm-tests --test watchdog`.

use std::fs;
use std::time::{Duration, Instant};

use keel_vm_tests::*;

/// Seconds the watchdog gets.
const SECS: u64 = 8;

/// A boot with the watchdog's driver loaded and `keel.watchdog=`; not `quiet`, so
/// initstage's own lines (and the kernel's) reach the serial log.
fn watchdog_boot(port: u16, extra: &str) -> Boot {
    Boot {
        cmdline: format!("modules={MODULES},{WATCHDOG_MODULES} keel.watchdog={SECS} {extra}"),
        verbose: true,
        ..tcp_boot(port)
    }
}

#[test]
fn a_hung_trial_boot_is_reset_and_rolled_back_a_good_one_disarms_it() {
    let d = scenario_dir("watchdog");
    let v1 = image(1, true, Fs::Squashfs);
    let v2 = image(2, true, Fs::Squashfs);
    let v3 = image(3, true, Fs::Squashfs);
    sign(&v2, 2);
    sign(&v3, 3);
    let disk = Disk::new(&d, &v1, "root-squashfs.img");
    let port = free_port();

    // Not on trial: nothing is armed.
    let mut vm = Vm::start(&disk, "v1", &watchdog_boot(port, ""));
    vm.wait_for("KEEL ready version=1");
    let st = status(port);
    assert!(!st["boot_actions"].to_string().contains("armed"), "{st}");
    ok(&push(port, &v2));
    vm.wait_for("KEEL staged: rebooting");
    vm.wait_exit();

    // v2's trial boot (one try) hangs: its init is `sleep`. The watchdog resets it.
    let t = Instant::now();
    let mut vm = Vm::start(
        &disk,
        "v2-hung",
        &watchdog_boot(port, "keel.tries=1 init=/bin/sleep init_args=600"),
    );
    vm.wait_for("booting vmdemo version 2 (trial boot 1 of 1)");
    vm.wait_exit();
    let log = vm.log();
    assert!(
        log.contains("watchdog: ok") && log.contains("softdog: Initiating system reboot"),
        "{log}"
    );
    assert!(
        t.elapsed() < BOOT_TIMEOUT - Duration::from_secs(10),
        "reset after {:?}",
        t.elapsed()
    );

    // The next boot counts it as a failed trial: back on v1.
    let mut vm = Vm::start(&disk, "back", &watchdog_boot(port, ""));
    vm.wait_for("KEEL booted version=1");
    vm.wait_for("KEEL ready version=1");
    let st = status(port);
    let why = st["boot_actions"].to_string();
    assert!(why.contains("rolled back"), "{st}");
    ok(&push(port, &v3));
    vm.wait_for("KEEL staged: rebooting");
    vm.wait_exit();

    // v3's trial boot comes up and marks itself good: the watchdog is disarmed and the
    // guest runs on well past its timeout.
    let mut vm = Vm::start(&disk, "v3", &watchdog_boot(port, ""));
    vm.wait_for("KEEL marked-good version=3");
    vm.wait_for("KEEL ready version=3");
    std::thread::sleep(Duration::from_secs(SECS + 6));
    assert!(!vm.exited(), "reset after mark-good:\n{}", vm.log());
    let st = status(port);
    assert_eq!(st["booted"]["version"], 3, "{st}");
    assert!(st["trial"].is_null(), "{st}");
    assert!(
        st["boot_actions"]
            .to_string()
            .contains("armed /dev/watchdog"),
        "{st}"
    );
    vm.kill();
    let _ = fs::remove_dir_all(&d);
}
