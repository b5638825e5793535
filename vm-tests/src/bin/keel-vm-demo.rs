//! `make demo`: boots v1 under QEMU, pushes a signed v2 over TCP, reboots into it, pushes a v3
//! that never marks itself good, and shows the automatic rollback; then a host drives a
//! microVM over hybrid vsock: start, ready, exec, cp both ways, an update whose trial the host
//! ends with mark-good — as a timeline.

use std::fs;
use std::time::Instant;

use keel_vm_tests::*;

struct Timeline {
    t0: Instant,
}

impl Timeline {
    fn step<T>(&self, what: &str, f: impl FnOnce() -> (T, String)) -> T {
        let t = Instant::now();
        let (v, detail) = f();
        println!(
            "{:7.1} s  {:<58} ({:.1} s)",
            self.t0.elapsed().as_secs_f64(),
            what,
            t.elapsed().as_secs_f64()
        );
        if !detail.is_empty() {
            for l in detail.lines() {
                println!("           · {l}");
            }
        }
        v
    }
}

fn status(port: u16) -> serde_json::Value {
    let out = keelctl(&["-e", &format!("tcp://127.0.0.1:{port}"), "status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn push(port: u16, image: &std::path::Path) -> String {
    let out = keelctl(&[
        "-e",
        &format!("tcp://127.0.0.1:{port}"),
        "push",
        image.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn actions(st: &serde_json::Value) -> String {
    st["boot_actions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

fn main() {
    let tl = Timeline { t0: Instant::now() };
    println!("keel demo: QEMU (TCG) boots of a Debian cloud kernel through keel's initramfs\n");
    let k = tl.step("kernel, initramfs (keelctl initramfs), signing key", || {
        let k = kit();
        let size = fs::metadata(&k.initramfs).map(|m| m.len()).unwrap_or(0);
        (
            k,
            format!(
                "{} · initramfs {} KiB",
                k.kernel.file_name().unwrap().to_string_lossy(),
                size / 1024
            ),
        )
    });
    let (v1, v2, v3) = tl.step("root images v1, v2 (good), v3 (never marks good)", || {
        let v1 = image(1, true, Fs::Squashfs);
        let v2 = image(2, true, Fs::Squashfs);
        let v3 = image(3, false, Fs::Squashfs);
        sign(&v2, 2);
        sign(&v3, 3);
        ((v1, v2, v3), String::new())
    });
    let dir = scenario_dir("demo");
    let disk = tl.step("GPT disk: img (v1), overlay, newimg, boot", || {
        (Disk::new(&dir, &v1, "root-squashfs.img"), String::new())
    });
    let port = free_port();
    let boot = Boot {
        tcp_port: Some(port),
        ..Boot::default()
    };
    let mut vm = tl.step("boot 1: running v1", || {
        let mut vm = Vm::start(&disk, "1", &boot);
        vm.wait_for("KEEL ready version=1");
        let st = status(port);
        (vm, actions(&st))
    });
    tl.step("push signed v2 over TCP; the guest reboots", || {
        let out = push(port, &v2);
        vm.wait_for("KEEL staged: rebooting");
        vm.wait_exit();
        ((), out)
    });
    let mut vm = tl.step("boot 2: running v2, trial ends with mark-good", || {
        let mut vm = Vm::start(&disk, "2", &boot);
        vm.wait_for("KEEL marked-good version=2");
        vm.wait_for("KEEL ready version=2");
        let st = status(port);
        assert_eq!(st["booted"]["version"], 2);
        (
            vm,
            format!("{}\nold: version {}", actions(&st), st["old"]["version"]),
        )
    });
    tl.step("push signed v3 (bad); the guest reboots", || {
        let out = push(port, &v3);
        vm.wait_for("KEEL staged: rebooting");
        vm.wait_exit();
        ((), out)
    });
    for b in 1..=2 {
        tl.step(
            &format!("boot: running v3, trial {b}/2, not marked good"),
            || {
                let mut vm = Vm::start(&disk, &format!("v3-{b}"), &boot);
                vm.wait_for("KEEL not-marking-good version=3");
                vm.wait_for("KEEL ready version=3");
                let st = status(port);
                vm.kill();
                ((), actions(&st))
            },
        );
    }
    tl.step("boot: back on v2 (automatic rollback)", || {
        let mut vm = Vm::start(&disk, "back", &boot);
        vm.wait_for("KEEL ready version=2");
        let st = status(port);
        assert_eq!(st["booted"]["version"], 2);
        vm.kill();
        ((), actions(&st))
    });
    microvm(&tl, &v1, &v3);
    println!(
        "\nserial logs: {} (kernel {})",
        dir.display(),
        k.kernel.display()
    );
}

/// keelctl with the kit's host key on `ep`; its stdout, trimmed (the run must succeed).
fn keyed(ep: &str, args: &[&str]) -> String {
    let key = kit().host_key.to_str().unwrap().to_string();
    let mut a = vec!["-e", ep, "--wait", "20", "--key", &key];
    a.extend_from_slice(args);
    let out = keelctl(&a);
    assert!(
        out.status.success(),
        "keelctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The microVM host's part: no TCP, no shell in the guest; everything over hybrid vsock
/// (vhost-device-vsock's Unix socket) with the host's exec key.
fn microvm(tl: &Timeline, v1: &std::path::Path, v3: &std::path::Path) {
    println!("\na host driving a microVM over hybrid vsock (keelctl --key host.pem)\n");
    let dir = scenario_dir("demo-vsock");
    let disk = Disk::new(&dir, v1, "root-squashfs.img");
    let dev = VsockDevice::start(&dir);
    let ep = dev.endpoint();
    let boot = Boot {
        vsock: Some(dev.vhost.clone()),
        ..Boot::default()
    };
    let waiter = dev.wait_ready();
    let mut vm = tl.step("start the guest; its agent announces itself", || {
        let vm = Vm::start(&disk, "vsock-1", &boot);
        let out = waiter.join().unwrap();
        assert!(out.status.success(), "{out:?}");
        let ann: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            vm,
            format!(
                "keelctl wait-ready: ready, version {}, listening {}",
                ann["booted"]["version"], ann["listening"]
            ),
        )
    });
    vm.wait_for("KEEL ready version=1");
    tl.step("keelctl exec -- uname -sr", || {
        ((), keyed(&ep, &["exec", "--", "uname", "-sr"]))
    });
    let file = dir.join("app.bin");
    fs::write(
        &file,
        (0..8u32 << 20)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let hash = sha256_file(&file);
    tl.step(
        "keelctl cp app.bin :/run/keel/newimg/app.bin (8 MiB)",
        || {
            let out = keyed(
                &ep,
                &["cp", file.to_str().unwrap(), ":/run/keel/newimg/app.bin"],
            );
            let sum = keyed(
                &ep,
                &["exec", "--", "sha256sum", "/run/keel/newimg/app.bin"],
            );
            assert!(sum.starts_with(&hash), "{sum}");
            ((), format!("{out}\nsha256sum in the guest: {}", &sum[..16]))
        },
    );
    let back = dir.join("back.bin");
    tl.step("keelctl cp :/run/keel/newimg/app.bin back.bin", || {
        let out = keyed(
            &ep,
            &["cp", ":/run/keel/newimg/app.bin", back.to_str().unwrap()],
        );
        assert_eq!(sha256_file(&back), hash);
        keyed(&ep, &["exec", "--", "rm", "/run/keel/newimg/app.bin"]);
        ((), format!("{out}, same sha256 as sent"))
    });
    let waiter = dev.wait_ready();
    tl.step(
        "push signed v3 over vsock; the guest reboots into it",
        || {
            let out = keyed(&ep, &["push", v3.to_str().unwrap()]);
            vm.wait_for("KEEL staged: rebooting");
            vm.wait_exit();
            ((), out)
        },
    );
    let mut vm = tl.step("boot: v3 on trial, announced", || {
        let mut vm = Vm::start(&disk, "vsock-2", &boot);
        let out = waiter.join().unwrap();
        assert!(out.status.success(), "{out:?}");
        vm.wait_for("KEEL ready version=3");
        let st: serde_json::Value =
            serde_json::from_str(&keyed(&ep, &["status", "--json"])).unwrap();
        assert_eq!(st["booted"]["version"], 3);
        assert!(!st["trial"].is_null(), "{st}");
        (vm, actions(&st))
    });
    tl.step(
        "the host checks the guest and ends the trial: mark-good",
        || {
            keyed(&ep, &["exec", "--", "true"]);
            let out = keyed(&ep, &["mark-good"]);
            let st: serde_json::Value =
                serde_json::from_str(&keyed(&ep, &["status", "--json"])).unwrap();
            assert!(st["trial"].is_null(), "{st}");
            ((), out)
        },
    );
    vm.kill();
    let _ = fs::remove_dir_all(&dir);
}
