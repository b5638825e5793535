//! A Debian root with systemd as init, booted through initstage under QEMU: the real
//! `systemd/keel-agent.service` (Type=notify, WatchdogSec=) and `keel-mark-good.service`
//! installed and enabled as a user would. Everything is asserted from the guest's own state
//! (`systemctl`, `/proc/self/mounts`, the agent's status over TCP), read with `keelctl exec`
//! by the kit's key. Run as root after `make vm-bins`: `cargo test -p keel-vm-tests --test
//! systemd` (the first run debootstraps the root: about a minute, cached after).

use std::fs;
use std::time::{Duration, Instant};

use keel_vm_tests::*;

/// img holds three copies of a ~37 MB root at a promotion's peak; newimg one.
const SIZES: [u64; 4] = [144, 32, 64, 8];

/// systemd's unit status lines on the console (the serial log says where a boot stopped).
fn boot(port: u16, extra: &str) -> Boot {
    Boot {
        cmdline: format!("systemd.show_status=1 {extra}"),
        ..tcp_boot(port)
    }
}

#[test]
fn systemd_root_notifies_marks_good_after_boot_complete_and_rolls_back_a_failed_check() {
    let d = scenario_dir("systemd");
    let DebScenario { v2, v3, disk, port } = deb_scenario(&d, Init::Systemd, SIZES);

    // v1: systemd runs the agent as a notify service with its watchdog.
    let mut vm = Vm::start(&disk, "v1", &boot(port, ""));
    let st = wait_agent(&mut vm, port);
    assert_eq!(st["booted"]["version"], 1, "{st}");
    let props = [
        "ActiveState",
        "SubState",
        "Type",
        "WatchdogUSec",
        "WatchdogTimestampMonotonic",
        "NRestarts",
        "StatusText",
    ];
    let a = show(port, "keel-agent.service", &props);
    let t0 = Instant::now();
    assert_eq!(a["ActiveState"], "active", "{a:?}");
    assert_eq!(a["SubState"], "running", "{a:?}");
    assert_eq!(a["Type"], "notify", "{a:?}");
    assert_eq!(a["WatchdogUSec"], "30s", "{a:?}");
    let mounts = exec_ok(port, &["cat", "/proc/self/mounts"]);
    assert!(
        mounts.lines().any(|l| l.starts_with("overlay / overlay ")),
        "{mounts}"
    );
    assert_eq!(
        exec_ok(port, &["cat", "/etc/keel-version"]).trim(),
        "1",
        "the image's own file"
    );

    // A delta push of v2 while it runs; then the agent's pings moved systemd's watchdog
    // timestamp on (one every 15 s) and it was never restarted.
    // keelctl persist works from inside the agent's sandbox (the overlay partition is under
    // /run/keel, the one writable path): /etc/hostname into persistent/.
    let out = exec_ok(port, &["keelctl", "persist", "--json", "/etc/hostname"]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (j["batch"].as_u64(), j["files"].as_u64()),
        (Some(1), Some(1)),
        "{j}"
    );
    let out = ok(&push(port, &v2));
    assert!(out.contains("staged"), "{out}");
    std::thread::sleep(Duration::from_secs(17).saturating_sub(t0.elapsed()));
    let b = show(port, "keel-agent.service", &props);
    let ts = |m: &std::collections::HashMap<String, String>| {
        m["WatchdogTimestampMonotonic"].parse::<u64>().unwrap()
    };
    assert!(ts(&b) > ts(&a), "no WATCHDOG=1 in 17 s: {a:?} then {b:?}");
    assert_eq!(b["NRestarts"], "0", "{b:?}");
    reboot(&mut vm, port);

    // v2's trial boot: keel-mark-good.service runs after boot-complete.target and ends the
    // trial with no one asking.
    let mut vm = Vm::start(&disk, "v2", &boot(port, ""));
    let st = wait_agent(&mut vm, port);
    assert_eq!(st["booted"]["version"], 2, "{st}");
    let st = status_until(port, "v2's trial never ended", |s| s["trial"].is_null());
    assert!(st["boot_actions"].to_string().contains("promoted"), "{st}");
    let active = exec_ok(
        port,
        &[
            "systemctl",
            "is-active",
            "boot-complete.target",
            "keel-mark-good.service",
        ],
    );
    assert_eq!(active, "active\nactive\n");
    let report: serde_json::Value =
        serde_json::from_str(&exec_ok(port, &["cat", "/run/keel/boot.json"])).unwrap();
    assert_eq!(
        report["persisted"][0]["applied"], 2,
        "/etc and /etc/hostname: {report}"
    );
    assert_eq!(
        exec_ok(port, &["cat", "/run/keel/overlay/persistent/etc/hostname"]),
        "keel-systemd\n"
    );
    ok(&push(port, &v3));
    reboot(&mut vm, port);

    // v3 has a health check that fails before boot-complete.target: the system is degraded,
    // mark-good never ran and the trial stays open (one try).
    let mut vm = Vm::start(&disk, "v3", &boot(port, "keel.tries=1"));
    let st = wait_agent(&mut vm, port);
    assert_eq!(st["booted"]["version"], 3, "{st}");
    let running = exec(port, &["systemctl", "is-system-running", "--wait"]);
    assert_eq!(String::from_utf8_lossy(&running.stdout), "degraded\n");
    let failed = exec_ok(port, &["systemctl", "--failed", "--plain", "--no-legend"]);
    assert!(failed.contains("keel-test-health.service"), "{failed}");
    let mg = show(
        port,
        "keel-mark-good.service",
        &["ActiveState", "ExecMainStartTimestampMonotonic"],
    );
    assert_eq!(mg["ActiveState"], "inactive", "{mg:?}");
    assert_eq!(
        mg["ExecMainStartTimestampMonotonic"], "0",
        "mark-good ran: {mg:?}"
    );
    let st = status(port);
    assert!(!st["trial"].is_null(), "{st}");
    reboot(&mut vm, port);

    // The next boot rolls back to v2, which is confirmed.
    let vm = Vm::start(&disk, "back", &boot(port, "keel.tries=1"));
    assert_rolled_back_to(vm, port, &disk, 2);
    let _ = fs::remove_dir_all(&d);
}
