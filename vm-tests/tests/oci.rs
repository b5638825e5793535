//! From container images to booted guests, in QEMU: a root image built by `keelctl build`
//! from a registry and booted from a `keelctl disk create` disk, and a microVM booted from a
//! `keelctl build --format initramfs` with keel as its init. Run as root after
//! `make vm-bins`; one alone: `cargo test -p keel-vm-tests --test oci -- microvm`.

use std::fs;

use keel_vm_tests::*;

/// From a container image to a booted device: the v1 root as an OCI image of two layers
/// (umoci), pushed to Debian's docker-registry on the host (skopeo), built by `keelctl build
/// --from docker://…` into a signed squashfs, put on a factory disk by `keelctl disk
/// create`, and booted: initstage adopts it, the agent answers, and `keelctl exec` reads the
/// image's run config in the guest.
#[test]
fn image_built_from_a_registry_boots_from_a_factory_disk() {
    let d = scenario_dir("oci");
    fs::create_dir_all(d.join("oci")).unwrap();
    let layout = oci_image(&d.join("oci"), 1);
    let reg = keel_tests::registry::Registry::start(&d.join("registry"), None);
    reg.push(&format!("oci:{}:1", layout.display()), "keel/vmdemo:1", &[]);
    let key = d.join("signing.pem");
    fs::write(&key, keel_proto::manifest::signing_key_to_pem(&kit().key)).unwrap();
    let img = d.join("v1.squashfs");
    ok(&keelctl(&[
        "build",
        "--from",
        &format!("docker://{}/keel/vmdemo:1", reg.host),
        "--insecure",
        "-o",
        img.to_str().unwrap(),
        "--sign",
        key.to_str().unwrap(),
        "--name",
        PRODUCT,
        "--version",
        "1",
    ]));
    let path = d.join("disk.img");
    let out = ok(&keelctl(&[
        "disk",
        "create",
        path.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--json",
    ]));
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let layout = j["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let label = match p["label"].as_str().unwrap() {
                "img" => "img",
                "overlay" => "overlay",
                "newimg" => "newimg",
                _ => "boot",
            };
            (label, p["size_mib"].as_u64().unwrap())
        })
        .collect();
    let disk = Disk { path, layout };
    let port = free_port();
    let mut vm = Vm::start(&disk, "v1", &tcp_boot(port));
    vm.wait_for("KEEL ready version=1");
    let st = status(port);
    assert_eq!(st["booted"]["version"], 1, "{st}");
    assert_eq!(st["booted"]["name"], PRODUCT, "{st}");
    let host_key = kit().host_key.to_str().unwrap().to_string();
    let out = ok(&keelctl(&[
        "-e",
        &format!("tcp://127.0.0.1:{port}"),
        "--key",
        &host_key,
        "exec",
        "--",
        "cat",
        "/etc/keel/image.json",
    ]));
    let cfg: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(cfg.is_object(), "{out}");
    vm.kill();
    let _ = fs::remove_dir_all(&d);
}

/// A microVM from a container image and RAM alone: `keelctl build --format initramfs
/// --compress zstd` (the kernel unpacks it) of an OCI image with no init and no keel, keel-agent added as its init with the vsock modules;
/// QEMU boots it with no disk: the agent announces itself over vsock, the image's
/// entrypoint runs with its Env and WorkingDir, `keelctl exec` answers in it, and when the
/// program is killed the VM powers off by itself.
#[test]
fn microvm_from_a_container_image_as_initramfs() {
    let d = scenario_dir("microvm");
    fs::create_dir_all(d.join("oci")).unwrap();
    let layout = app_oci_image(&d.join("oci"));
    let k = kit();
    let agent = k.bins.join("keel-agent");
    let initrd = microvm_initramfs(
        &d,
        "app.initramfs",
        &layout,
        &["--compress", "zstd", "--agent", agent.to_str().unwrap()],
    );
    let empty = d.join("empty.img");
    fs::write(&empty, vec![0u8; 1 << 20]).unwrap();
    let disk = Disk {
        path: empty,
        layout: Vec::new(),
    };
    let dev = VsockDevice::start(&d);
    let boot = Boot {
        vsock: Some(dev.vhost.clone()),
        initramfs: Some(initrd),
        ..Boot::default()
    };
    let waiter = dev.wait_ready();
    let mut vm = Vm::start(&disk, "microvm", &boot);
    let ready = waiter.join().unwrap();
    let ann: serde_json::Value = serde_json::from_str(&ok(&ready)).unwrap();
    assert_eq!(ann["op"], "ready", "{ann}");
    let line = vm.wait_for("APP started");
    assert!(line.contains("cwd=/app FOO=bar uid=0"), "{line}");
    let ep = dev.endpoint();
    let key = k.host_key.to_str().unwrap().to_string();
    let exec = |a: &[&str]| {
        let mut v = vec![
            "-e",
            ep.as_str(),
            "--wait",
            "20",
            "--key",
            key.as_str(),
            "exec",
            "--",
        ];
        v.extend(a);
        keelctl(&v)
    };
    let out = ok(&exec(&["cat", "/proc/1/cmdline"]));
    assert!(out.starts_with("/init"), "{out:?}");
    let out = ok(&exec(&[
        "sh",
        "-c",
        "cat /etc/keel/image.json; grep -c vsock /proc/modules",
    ]));
    assert!(out.contains("/app/run.sh"), "{out}");
    // The program ends: keel's init reports it and powers the VM off.
    // Its signal mask is empty (PID 1 blocks what it waits for; its children must not).
    let blk = ok(&exec(&[
        "sh",
        "-c",
        "grep SigBlk /proc/$(pidof sleep)/status",
    ]));
    assert!(blk.contains("0000000000000000"), "{blk}");
    // (The VM may power off before the reply to this exec gets out.)
    let _ = exec(&["sh", "-c", "kill $(pidof sleep)"]);
    vm.wait_exit();
    let log = vm.log();
    assert!(log.contains("the program was killed by signal 15"), "{log}");
    assert!(log.contains("powering off"), "{log}");
    let _ = fs::remove_dir_all(&d);
}
