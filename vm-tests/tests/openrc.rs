//! A Debian root with OpenRC as its init system (Debian's `openrc` under sysvinit), booted
//! through initstage under QEMU with the upper layer on tmpfs (`overlaytmpfs=yes`, Alpine's
//! layout): the real `systemd/keel-agent.openrc` under supervise-daemon and
//! `systemd/keel-mark-good.openrc` added with `rc-update`. Asserted from the guest's own state
//! (`rc-service`, OpenRC's `/run/openrc`, `/proc/self/mounts`, the agent's status), read with
//! `keelctl exec` by the kit's key. Run as root after `make vm-bins`: `cargo test -p
//! keel-vm-tests --test openrc` (the first run debootstraps the root, cached after).

use std::fs;
use std::time::{Duration, Instant};

use keel_vm_tests::*;

/// img holds three copies of the root at a promotion's peak; newimg one.
const SIZES: [u64; 4] = [128, 32, 48, 8];

fn boot(port: u16, extra: &str) -> Boot {
    Boot {
        cmdline: format!("overlaytmpfs=yes {extra}"),
        ..tcp_boot(port)
    }
}

/// What OpenRC and the agent logged this boot (rc_logger's `/var/log/rc.log`, the agent's
/// `output_log`): said when a service did not end as it should.
fn logs(port: u16) -> String {
    let out = exec(
        port,
        &[
            "sh",
            "-c",
            "tail -n 60 /var/log/rc.log /var/log/keel-agent.log",
        ],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until OpenRC has run `service` to an end: `started`, or `failed` — not started once
/// the default runlevel is up (`softlevel` says default and `rc.starting` is gone: OpenRC
/// clears its `failed/` marks when the runlevel change ends). Bounded.
fn service_end(port: u16, service: &str) -> &'static str {
    let t = Instant::now();
    loop {
        let out = exec_ok(
            port,
            &[
                "sh",
                "-c",
                &format!(
                    "if [ -e /run/openrc/started/{service} ]; then echo started; \
                     elif [ \"$(cat /run/openrc/softlevel 2>/dev/null)\" = default ] \
                     && [ ! -e /run/openrc/rc.starting ]; then echo failed; fi"
                ),
            ],
        );
        match out.trim() {
            "started" => return "started",
            "failed" => return "failed",
            _ => {}
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{service} never ran");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn openrc_root_supervises_the_agent_marks_good_and_rolls_back_a_failed_check() {
    let d = scenario_dir("openrc");
    let DebScenario { v2, v3, disk, port } = deb_scenario(&d, Init::OpenRc, SIZES);

    // v1: supervise-daemon runs the agent; Alpine's layout with the upper on tmpfs.
    let mut vm = Vm::start(&disk, "v1", &boot(port, ""));
    let st = wait_agent(&mut vm, port);
    assert_eq!(st["booted"]["version"], 1, "{st}");
    let s = exec_ok(port, &["rc-service", "keel-agent", "status"]);
    assert!(s.contains("started"), "{s}");
    let parent = exec_ok(
        port,
        &[
            "sh",
            "-c",
            "tr '\\0' ' ' < /proc/$(cut -d' ' -f4 /proc/$(pidof keel-agent)/stat)/cmdline",
        ],
    );
    assert!(
        parent.starts_with("supervise-daemon keel-agent"),
        "{parent}"
    );
    let mounts = exec_ok(port, &["cat", "/proc/self/mounts"]);
    let on = |target: &str| -> Vec<&str> {
        mounts
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .find(|f| f[1] == target)
            .unwrap_or_else(|| panic!("nothing on {target}:\n{mounts}"))
    };
    assert_eq!(on("/")[2], "overlay", "{mounts}");
    // A file written to / lands in the tmpfs upper, seen at /media/root-rw as on Alpine.
    exec_ok(port, &["sh", "-c", "echo here > /probe"]);
    assert_eq!(
        exec_ok(port, &["cat", "/media/root-rw/upper/probe"]),
        "here\n"
    );
    assert_eq!(on("/media/root-ro")[2], "squashfs", "{mounts}");
    assert!(on("/media/root-ro")[3].starts_with("ro"), "{mounts}");
    assert_eq!(on("/media/root-rw")[2], "tmpfs", "{mounts}");

    // Not on trial: keel-mark-good has nothing to end, and ends well.
    let end = service_end(port, "keel-mark-good");
    assert_eq!(end, "started", "{}", logs(port));

    // The service stops and starts: OpenRC's view and the agent's answers follow.
    let pid = exec_ok(port, &["pidof", "keel-agent"]);
    exec_ok(
        port,
        &[
            "sh",
            "-c",
            "setsid -f sh -c 'rc-service keel-agent stop; rc-service keel-agent status; \
             sleep 1; rc-service keel-agent start' > /run/restart.log 2>&1 < /dev/null",
        ],
    );
    // Bounded: until the script got to its start (the agent is down in between).
    let t = Instant::now();
    let log = loop {
        let out = exec(port, &["cat", "/run/restart.log"]);
        let log = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && log.contains("Starting keel-agent") {
            break log;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{log}");
        std::thread::sleep(Duration::from_millis(500));
    };
    wait_agent(&mut vm, port);
    assert!(log.contains("status: stopped"), "{log}");
    assert_ne!(exec_ok(port, &["pidof", "keel-agent"]), pid, "{log}");

    // A file persisted from the running system (the upper is a tmpfs here) is there after
    // the reboot, from persistent/.
    let out = exec_ok(
        port,
        &[
            "sh",
            "-c",
            "echo 'listen 8080' > /etc/app.conf && keelctl persist /etc/app.conf",
        ],
    );
    assert!(out.contains("staged persist batch 1"), "{out}");
    ok(&push(port, &v2));
    reboot(&mut vm, port);

    // v2's trial: keel-mark-good ran its (passing) checks and ended the trial.
    let mut vm = Vm::start(&disk, "v2", &boot(port, ""));
    let st = wait_agent(&mut vm, port);
    assert_eq!(st["booted"]["version"], 2, "{st}");
    let end = service_end(port, "keel-mark-good");
    assert_eq!(end, "started", "{}", logs(port));
    let st = status(port);
    assert!(st["trial"].is_null(), "{st}");
    assert!(st["boot_actions"].to_string().contains("promoted"), "{st}");
    assert_eq!(exec_ok(port, &["cat", "/etc/app.conf"]), "listen 8080\n");
    let report = exec_ok(port, &["cat", "/run/keel/boot.json"]);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["persisted"][0]["batch"], 1, "{report}");
    assert!(report["persisted"][0]["error"].is_null(), "{report}");
    ok(&push(port, &v3));
    reboot(&mut vm, port);

    // v3's health check fails: keel-mark-good fails, the trial stays open (one try)…
    let mut vm = Vm::start(&disk, "v3", &boot(port, "keel.tries=1"));
    let st = wait_agent(&mut vm, port);
    assert_eq!(st["booted"]["version"], 3, "{st}");
    let end = service_end(port, "keel-mark-good");
    assert_eq!(end, "failed", "{}", logs(port));
    let st = status(port);
    assert!(!st["trial"].is_null(), "{st}");
    reboot(&mut vm, port);

    // …and the next boot is v2 again.
    let vm = Vm::start(&disk, "back", &boot(port, "keel.tries=1"));
    assert_rolled_back_to(vm, port, &disk, 2);
    let _ = fs::remove_dir_all(&d);
}
