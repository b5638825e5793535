//! Talking to a booted guest's agent from the host over its forwarded TCP port: wait for it,
//! run commands in the guest by the kit's key, reboot it, poll its status.

use std::collections::HashMap;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::*;

/// Waits until the agent in `vm` answers status on `port` (bounded: the boot timeout from the
/// VM's start, at least 30 s from now).
pub fn wait_agent(vm: &mut Vm, port: u16) -> serde_json::Value {
    let ep = format!("tcp://127.0.0.1:{port}");
    let deadline = (vm.started + BOOT_TIMEOUT).max(Instant::now() + Duration::from_secs(30));
    loop {
        let out = keelctl(&["-e", &ep, "--wait", "0", "status", "--json"]);
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        assert!(!vm.exited(), "the guest stopped:\n{}", vm.log());
        assert!(
            Instant::now() < deadline,
            "no agent after {:?}: {}\n{}",
            vm.started.elapsed(),
            String::from_utf8_lossy(&out.stderr),
            vm.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `keelctl exec -- ARGS` in the guest, by the kit's key.
pub fn exec(port: u16, args: &[&str]) -> Output {
    let key = kit().host_key.to_str().unwrap().to_string();
    let ep = format!("tcp://127.0.0.1:{port}");
    let mut a = vec!["-e", &ep, "--key", &key, "exec", "--"];
    a.extend_from_slice(args);
    keelctl(&a)
}

/// stdout of an exec that must succeed.
pub fn exec_ok(port: u16, args: &[&str]) -> String {
    ok(&exec(port, args))
}

/// `systemctl show UNIT -p …` as a map.
pub fn show(port: u16, unit: &str, props: &[&str]) -> HashMap<String, String> {
    let mut a = vec!["systemctl", "show", unit];
    for p in props {
        a.extend(["-p", p]);
    }
    exec_ok(port, &a)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `keelctl reboot` by the kit's key; the guest (systemd: an orderly shutdown) goes down.
pub fn reboot(vm: &mut Vm, port: u16) {
    let key = kit().host_key.to_str().unwrap().to_string();
    let ep = format!("tcp://127.0.0.1:{port}");
    ok(&keelctl(&["-e", &ep, "--key", &key, "reboot"]));
    vm.wait_shutdown(Duration::from_secs(60));
    let log = vm.log();
    assert!(log.contains("reboot: Restarting system"), "{log}");
}

/// Polls the agent's status until `done` holds (bounded: 60 s).
pub fn status_until(
    port: u16,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let st = status(port);
        if done(&st) {
            return st;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{what}: {st}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The boot `vm` runs rolled back to `version`: the agent says so and that the image is not
/// on trial, the image's own `/etc/keel-version` agrees, and once the VM is stopped the disk's
/// boot state names it as current.
pub fn assert_rolled_back_to(mut vm: Vm, port: u16, disk: &Disk, version: u64) {
    let st = wait_agent(&mut vm, port);
    assert_eq!(st["booted"]["version"], version, "{st}");
    assert!(
        st["boot_actions"].to_string().contains("rolled back"),
        "{st}"
    );
    assert!(st["trial"].is_null(), "{st}");
    assert_eq!(
        exec_ok(port, &["cat", "/etc/keel-version"]).trim(),
        version.to_string()
    );
    vm.kill();
    let state = disk.state();
    assert_eq!(
        state.current.as_ref().map(|c| c.version),
        Some(version),
        "{state:?}"
    );
}
