//! Delta updates in real QEMU boots: v1 → v2 by a delta push over TCP, v2 → v3 by a delta
//! pull from nginx on the host, each booted; and power cuts (QEMU killed) while a delta is
//! being staged, each followed by a boot of a whole image. Run as root after `make vm-bins`:
//! `cargo test -p keel-vm-tests --test delta`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_vm_tests::*;

/// A copy of the v`version` image in `d`, signed with its chunk index.
fn chunked(d: &Path, version: u64) -> PathBuf {
    let p = d.join(format!("v{version}.img"));
    fs::copy(image(version, true, Fs::Squashfs), &p).unwrap();
    sign_chunked(&p, version);
    p
}

fn push_json(port: u16, image: &Path) -> serde_json::Value {
    let out = ok(&keelctl(&[
        "-e",
        &format!("tcp://127.0.0.1:{port}"),
        "--wait",
        "20",
        "push",
        "--json",
        image.to_str().unwrap(),
    ]));
    serde_json::from_str(&out).unwrap()
}

#[test]
fn update_by_delta_push_then_by_delta_pull_each_booted() {
    let d = scenario_dir("delta");
    let v1 = image(1, true, Fs::Squashfs);
    let v2 = chunked(&d, 2);
    let v3 = chunked(&d, 3);
    let www = d.join("www");
    let ch = www.join("ch");
    let nginx = keel_tests::nginx::Nginx::start(&www, &d.join("nginx"));
    let disk = Disk::new(&d, &v1, "root-squashfs.img");
    let port = free_port();
    let boot = tcp_boot(port);
    let mut vm = Vm::start(&disk, "v1", &boot);
    vm.wait_for("KEEL ready version=1");

    // v2 by a delta push: most of its bytes come from v1 on the device.
    let r = push_json(port, &v2);
    let size = fs::metadata(&v2).unwrap().len();
    assert_eq!(r["staged"], 2, "{r}");
    assert_eq!(r["delta"], true, "{r}");
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent < size / 2, "{sent} of {size} bytes sent: {r}");
    vm.wait_for("KEEL staged: rebooting");
    vm.wait_exit();
    let pull = Boot {
        cmdline: format!("keel_test.pull=http://10.0.2.2:{}/ch", nginx.port),
        ..tcp_boot(port)
    };
    let mut vm = Vm::start(&disk, "v2", &pull);
    vm.wait_for("KEEL booted version=2");
    vm.wait_for("KEEL ready version=2");
    let st = status(port);
    assert_eq!(st["booted"]["version"], 2, "{st}");
    assert_eq!(st["old"]["version"], 1, "{st}");

    // v3 by a delta pull: the index and a few ranges, then the guest reboots into it.
    let out = ok(&keelctl(&[
        "publish",
        v3.to_str().unwrap(),
        "--channel",
        ch.to_str().unwrap(),
    ]));
    assert!(out.contains(".chunks"), "{out}");
    vm.wait_for("KEEL staged: rebooting");
    vm.wait_exit();
    let img = format!("/ch/images/{}", sha256_file(&v3));
    let reqs = nginx.requests();
    let ranges: Vec<_> = reqs.iter().filter(|(p, _, _)| *p == img).collect();
    assert!(
        !ranges.is_empty() && ranges.iter().all(|(_, s, _)| *s == 206),
        "{reqs:?}"
    );
    let fetched: u64 = ranges.iter().map(|(_, _, b)| b).sum();
    let size = fs::metadata(&v3).unwrap().len();
    assert!(fetched < size / 2, "{fetched} of {size} bytes fetched");
    assert!(
        reqs.iter()
            .any(|(p, s, _)| *p == format!("{img}.chunks") && *s == 200),
        "{reqs:?}"
    );
    let mut vm = Vm::start(&disk, "v3", &tcp_boot(port));
    vm.wait_for("KEEL booted version=3");
    vm.wait_for("KEEL ready version=3");
    assert_eq!(status(port)["booted"]["version"], 3);
    vm.kill();
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn power_cuts_during_a_delta_staging_leave_a_bootable_device() {
    let d = scenario_dir("delta-powercut");
    let v1 = image(1, true, Fs::Squashfs);
    let v2 = chunked(&d, 2);
    // The delays cover the delta's exchange, its assembly and commit, and after (on this
    // machine a push of v2 over v1 takes about 0.3 s in the guest).
    let mut cut_mid_push = 0;
    for (i, delay_ms) in [120u64, 200, 280, 360, 700].into_iter().enumerate() {
        let disk = Disk::new(&d, &v1, "root-squashfs.img");
        let port = free_port();
        let mut vm = Vm::start(&disk, &format!("cut-{i}"), &tcp_boot(port));
        vm.wait_for("KEEL ready version=1");
        let out = push_then_cut(&mut vm, port, &v2, Duration::from_millis(delay_ms));
        if !String::from_utf8_lossy(&out.stdout).contains("staged version 2") {
            cut_mid_push += 1;
        }
        let booted = check_intact(&disk, &format!("after-cut-{i}"));
        eprintln!("cut {i} after {delay_ms} ms: {booted}");
    }
    assert!(cut_mid_push >= 1, "no power cut fell inside a delta push");
    let _ = fs::remove_dir_all(&d);
}
