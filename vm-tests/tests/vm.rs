//! The update cycle in real QEMU boots of a Debian cloud kernel through keel's initramfs.
//! Run as root after `make vm-bins`; one scenario alone:
//! `cargo test -p keel-vm-tests --test vm -- update_cycle`.

use std::fs;
use std::path::Path;
use std::time::Duration;

use keel_proto::manifest::SigningKey;
use keel_vm_tests::*;

/// The key the agent on `port` shows in its TLS handshake (keelctl names it on first contact,
/// and each keelctl run here is a first contact), checked against the one status reports.
fn tls_key(port: u16) -> String {
    let out = keelctl(&["-e", &format!("tcp://127.0.0.1:{port}"), "status", "--json"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let st: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let shown = err
        .split_whitespace()
        .find(|w| w.starts_with("SHA256:"))
        .unwrap_or_else(|| panic!("no first-contact key in {err:?}"))
        .to_string();
    assert_eq!(st["identity"], shown.as_str(), "{st}");
    shown
}

/// Scenario 1: first boot of v1, `/persistent` visible, a file written to `/` in one boot is
/// gone in the next; and the same with the upper on tmpfs (`overlaytmpfs=yes`).
#[test]
fn first_boot_persistent_and_fresh_upper() {
    let d = scenario_dir("first-boot");
    let v1 = image(1, true, Fs::Squashfs);
    let disk = Disk::new(&d, &v1, "root-squashfs.img");
    let mut vm = Vm::start(&disk, "1", &Boot::default());
    vm.wait_for("KEEL booted version=1");
    assert!(vm.wait_for("KEEL persisted=").ends_with("kept"));
    let upper = vm.wait_for("KEEL upper=");
    assert!(upper.ends_with("/run/keel/overlay/upper"), "{upper}");
    assert!(vm.wait_for("KEEL scratch=").ends_with("absent"));
    // Every step's line reached the kernel log (initstage lifts /dev/kmsg's rate limit of
    // 10 lines per 5 s while it runs; a boot logs more than that).
    let steps = vm.wait_for("KEEL kmsg-steps=");
    assert!(
        steps.ends_with("load modules,find partitions,mount partitions,promotion,mount image and overlay,layer views,switch_root,"),
        "{steps}"
    );
    vm.wait_for("KEEL ready version=1");
    vm.kill();
    let state = disk
        .read("img", "keel-state.json")
        .expect("state after the first boot");
    let mut vm = Vm::start(&disk, "2", &Boot::default());
    vm.wait_for("KEEL booted version=1");
    assert!(
        vm.wait_for("KEEL scratch=").ends_with("absent"),
        "{}",
        vm.log()
    );
    vm.wait_for("KEEL ready version=1");
    vm.kill();
    // A boot that changed nothing wrote nothing to the image partition (a write would have
    // counted the boot).
    assert_eq!(
        disk.read("img", "keel-state.json").as_deref(),
        Some(&state[..]),
        "the second, plain boot rewrote the boot state"
    );
    for tag in ["3", "4"] {
        let mut vm = Vm::start(
            &disk,
            tag,
            &Boot {
                cmdline: "overlaytmpfs=yes".into(),
                ..Boot::default()
            },
        );
        vm.wait_for("KEEL booted version=1");
        assert!(vm.wait_for("KEEL persisted=").ends_with("kept"));
        assert!(
            vm.wait_for("KEEL scratch=").ends_with("absent"),
            "{}",
            vm.log()
        );
        vm.wait_for("KEEL ready version=1");
        let upper = vm.wait_for("KEEL upper=");
        assert!(upper.ends_with("/run/keel/rw/upper"), "{upper}");
        vm.kill();
    }
    let _ = fs::remove_dir_all(&d);
}

/// Scenarios 2, 6 and 4: bad pushes over TCP are refused and change nothing; a signed v2 over
/// TCP is staged, the guest reboots into it, v1 is kept as -old and the trial ends with
/// mark-good; then v3 never marks itself good and after keel.tries=2 boots the system is back
/// on v2, with the reason in the status.
#[test]
fn update_cycle_over_tcp_with_bad_pushes_and_rollback() {
    let d = scenario_dir("cycle");
    let v1 = image(1, true, Fs::Squashfs);
    // v2 is erofs: initstage probes the image's filesystem, whatever the file is called.
    let v2 = image(2, true, Fs::Erofs);
    let v3 = image(3, false, Fs::Squashfs);
    sign(&v2, 2);
    sign(&v3, 3);
    let disk = Disk::new(&d, &v1, "root-squashfs.img");
    let port = free_port();
    let mut vm = Vm::start(&disk, "v1", &tcp_boot(port));
    assert_eq!(vm.wait_for("KEEL fstype="), "KEEL fstype=squashfs");
    vm.wait_for("KEEL ready version=1");
    // The agent's TLS identity, made at this first boot on img: kept through every reboot,
    // update and rollback below.
    let identity = tls_key(port);

    // 6: bad pushes — unknown key, downgrade, flipped byte.
    let bad = d.join("bad.img");
    fs::copy(&v2, &bad).unwrap();
    let m = keel_proto::manifest::SignedManifest::from_json(
        &fs::read(format!("{}.manifest", v2.display())).unwrap(),
    )
    .unwrap();
    fs::write(
        d.join("bad.img.manifest"),
        m.manifest
            .clone()
            .sign(&SigningKey::from_bytes(&[9; 32]))
            .to_json(),
    )
    .unwrap();
    let out = push(port, &bad);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad-signature"),
        "{out:?}"
    );
    let mut down = m.manifest.clone();
    down.version = 0;
    fs::write(d.join("bad.img.manifest"), down.sign(&kit().key).to_json()).unwrap();
    let out = push(port, &bad);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("downgrade"),
        "{out:?}"
    );
    let mut bytes = fs::read(&v2).unwrap();
    bytes[4096] ^= 1;
    fs::write(&bad, &bytes).unwrap();
    fs::write(d.join("bad.img.manifest"), m.to_json()).unwrap();
    let out = push(port, &bad);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("hash-mismatch"),
        "{out:?}"
    );
    let st = status(port);
    assert_eq!(st["booted"]["version"], 1);
    assert!(st["staged"].is_null(), "{st}");
    assert!(st["partial"].is_null(), "{st}");

    // 2: a good push over TCP; the guest reboots into v2.
    let out = ok(&push(port, &v2));
    assert!(out.contains("staged version 2"), "{out}");
    vm.wait_for("KEEL staged: rebooting");
    vm.wait_exit();
    let mut vm = Vm::start(&disk, "v2", &tcp_boot(port));
    vm.wait_for("KEEL booted version=2");
    assert_eq!(vm.wait_for("KEEL fstype="), "KEEL fstype=erofs");
    vm.wait_for("KEEL marked-good version=2");
    vm.wait_for("KEEL ready version=2");
    let st = status(port);
    assert_eq!(st["booted"]["version"], 2);
    assert_eq!(st["old"]["version"], 1);
    assert!(st["trial"].is_null(), "{st}");
    assert!(st["staged"].is_null(), "{st}");
    assert_eq!(tls_key(port), identity);

    // 4: v3 never marks good.
    ok(&push(port, &v3));
    vm.wait_for("KEEL staged: rebooting");
    vm.wait_exit();
    for boot in 1..=2 {
        let mut vm = Vm::start(&disk, &format!("v3-{boot}"), &tcp_boot(port));
        vm.wait_for("KEEL booted version=3");
        vm.wait_for("KEEL not-marking-good version=3");
        vm.wait_for("KEEL ready version=3");
        let st = status(port);
        assert_eq!(st["trial"]["used"], boot, "{st}");
        vm.kill();
    }
    let mut vm = Vm::start(&disk, "back", &tcp_boot(port));
    vm.wait_for("KEEL booted version=2");
    vm.wait_for("KEEL ready version=2");
    let st = status(port);
    assert_eq!(st["booted"]["version"], 2);
    let why = st["boot_actions"].to_string();
    assert!(
        why.contains("rolled back") && why.contains("not marked good"),
        "{st}"
    );
    assert_eq!(tls_key(port), identity);
    vm.kill();
    // The disk afterwards: v2 current, v3 remembered as rejected.
    let state = disk.state();
    assert_eq!(state.current.as_ref().unwrap().version, 2);
    assert!(state.is_rejected(&sha256_file(&v3)));
    let _ = fs::remove_dir_all(&d);
}

/// Scenario 3: the same update over vsock (user-space `vhost-device-vsock`, the host side
/// through hybrid vsock): the agent's ready announce reaches the host, the push stages v2,
/// the guest reboots into it. No AF_VSOCK socket is opened on the host.
#[test]
fn update_over_vsock_with_ready_announce_then_exec_and_remote_mark_good() {
    let d = scenario_dir("vsock");
    let v1 = image(1, true, Fs::Squashfs);
    // v2 does not mark itself good: the host does, by key, over hybrid vsock.
    let v2 = image(2, false, Fs::Squashfs);
    sign(&v2, 2);
    // newimg holds the 256 MiB cp file (and its temporary) after the update.
    let disk = Disk::with_newimg(&d, &v1, "root-squashfs.img", 320);
    let dev = VsockDevice::start(&d);
    let boot = Boot {
        vsock: Some(dev.vhost.clone()),
        ..Boot::default()
    };
    let waiter = dev.wait_ready();
    let mut vm = Vm::start(&disk, "v1", &boot);
    let ready = waiter.join().unwrap();
    let ann: serde_json::Value = serde_json::from_str(&ok(&ready)).unwrap();
    assert_eq!(ann["op"], "ready");
    assert_eq!(ann["booted"]["version"], 1);
    assert!(
        ann["listening"].to_string().contains("vsock://any:7447"),
        "{ann}"
    );
    vm.wait_for("KEEL ready version=1");
    let ep = dev.endpoint();
    let out = ok(&keelctl(&[
        "-e",
        &ep,
        "--wait",
        "20",
        "push",
        v2.to_str().unwrap(),
    ]));
    assert!(out.contains("staged version 2"), "{out}");
    vm.wait_for("KEEL staged: rebooting");
    vm.wait_exit();
    let mut vm = Vm::start(&disk, "v2", &boot);
    vm.wait_for("KEEL ready version=2");
    let status = || -> serde_json::Value {
        serde_json::from_str(&ok(&keelctl(&[
            "-e", &ep, "--wait", "20", "status", "--json",
        ])))
        .unwrap()
    };
    let st = status();
    assert_eq!(st["booted"]["version"], 2);
    assert_eq!(st["old"]["version"], 1);
    assert!(!st["trial"].is_null(), "{st}");
    exec_over_hybrid_vsock(&d, &ep);
    // The host ends the trial: without a key refused, with the authorized key done.
    let out = keelctl(&["-e", &ep, "--wait", "20", "mark-good"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-authorized"));
    let key = kit().host_key.to_str().unwrap().to_string();
    let out = ok(&keelctl(&["-e", &ep, "--key", &key, "mark-good"]));
    assert!(out.contains("version 2 marked good"), "{out}");
    assert!(status()["trial"].is_null());
    vm.kill();
    let _ = fs::remove_dir_all(&d);
}

/// `keelctl exec` into the guest over hybrid vsock with the kit's host key: `uname -a`, 100 MiB
/// piped through the guest's `sha256sum`, 1 GiB of stdout, `cp` of 256 MiB both ways, a pty,
/// signals, a re-attach, an exit code and a missing key.
fn exec_over_hybrid_vsock(d: &Path, ep: &str) {
    let key = kit().host_key.to_str().unwrap().to_string();
    let exec = |args: &[&str]| {
        let mut a = vec!["-e", ep, "--wait", "20", "--key", &key, "exec"];
        if args.first() != Some(&"-t") {
            a.push("--");
        }
        a.extend_from_slice(args);
        keelctl(&a)
    };
    let out = exec(&["uname", "-a"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Linux "));
    let out = exec(&["sh", "-c", "echo to-stderr >&2; exit 5"]);
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(out.stderr, b"to-stderr\n");
    // 256 MiB of pseudo-random bytes: the first 100 MiB for sha256sum, all of it for cp.
    let mut bytes = vec![0u8; 256 << 20];
    let mut x: u64 = 1;
    for c in bytes.chunks_exact_mut(8) {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        c.copy_from_slice(&x.to_le_bytes());
    }
    let big = d.join("100m.bin");
    fs::write(&big, &bytes[..100 << 20]).unwrap();
    let t = std::time::Instant::now();
    let out = std::process::Command::new(kit().bins.join("keelctl"))
        .args(["-e", ep, "--key", &key, "exec", "--", "sha256sum"])
        .stdin(fs::File::open(&big).unwrap())
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{line}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(line, format!("{}  -\n", sha256_file(&big)));
    eprintln!(
        "100 MiB through the guest's sha256sum over hybrid vsock: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let _ = fs::remove_file(&big);
    // 1 GiB of stdout (busybox dd, 256 KiB writes), every byte counted and checked.
    let t = std::time::Instant::now();
    let mut c = std::process::Command::new(kit().bins.join("keelctl"))
        .args(["-e", ep, "--key", &key, "exec", "--"])
        .args(["dd", "if=/dev/zero", "bs=262144", "count=4096"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (mut total, mut nonzero) = (0u64, 0u64);
    let mut buf = vec![0u8; 1 << 20];
    let mut out = c.stdout.take().unwrap();
    loop {
        let n = std::io::Read::read(&mut out, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
        nonzero += buf[..n].iter().filter(|&&b| b != 0).count() as u64;
    }
    assert!(c.wait().unwrap().success());
    assert_eq!((total, nonzero), (1 << 30, 0));
    eprintln!(
        "1 GiB of stdout over hybrid vsock: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // cp of 256 MiB both ways through the guest's newimg partition (ext4 on the virtio
    // disk; empty after the promotion), hashes checked on both sides.
    let part = d.join("256m.bin");
    fs::write(&part, &bytes).unwrap();
    drop(bytes);
    let t = std::time::Instant::now();
    let cp = |from: &str, to: &str| ok(&keelctl(&["-e", ep, "--key", &key, "cp", from, to]));
    cp(part.to_str().unwrap(), ":/run/keel/newimg/cp.bin");
    let back = d.join("back.bin");
    cp(":/run/keel/newimg/cp.bin", back.to_str().unwrap());
    assert_eq!(sha256_file(&back), sha256_file(&part));
    let out = exec(&["sha256sum", "/run/keel/newimg/cp.bin"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&sha256_file(&part)));
    let _ = fs::remove_file(&back);
    let _ = fs::remove_file(&part);
    eprintln!(
        "256 MiB cp in and out over hybrid vsock: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    ok(&exec(&["rm", "/run/keel/newimg/cp.bin"]));
    // A pty: tty names one in the guest.
    let out = exec(&["-t", "--", "tty"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("/dev/pts/"),
        "{out:?}"
    );
    // SIGINT to keelctl ends the guest's sleep (130); a keelctl killed mid-exec leaves the
    // process for attach, which gets the rest and the code.
    let spawn = |args: &[&str]| {
        std::process::Command::new(kit().bins.join("keelctl"))
            .args(["-e", ep, "--key", &key])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut c = spawn(&["exec", "--", "sh", "-c", "echo up; exec sleep 60"]);
    let mut up = [0u8; 3];
    std::io::Read::read_exact(c.stdout.as_mut().unwrap(), &mut up).unwrap();
    run(std::process::Command::new("kill").args(["-INT", &c.id().to_string()]));
    assert_eq!(c.wait().unwrap().code(), Some(130));
    let mut c = spawn(&["exec", "--", "sh", "-c", "echo a; sleep 3; echo b; exit 4"]);
    let mut a = [0u8; 2];
    std::io::Read::read_exact(c.stdout.as_mut().unwrap(), &mut a).unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    let ps: serde_json::Value =
        serde_json::from_str(&ok(&keelctl(&["-e", ep, "--key", &key, "ps", "--json"]))).unwrap();
    let id = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["exit"].is_null() && p["argv"][0] == "sh")
        .expect("the lost process in ps")["id"]
        .to_string();
    let out = keelctl(&["-e", ep, "--key", &key, "attach", &id]);
    assert_eq!((out.status.code(), &out.stdout[..]), (Some(4), &b"b\n"[..]));
    // Without --key: refused, nothing runs.
    let out = keelctl(&["-e", ep, "exec", "--", "true"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--key"));
}

/// Pull: v1 boots with `[pull]` naming a channel on the host's nginx (10.0.2.2 from the
/// guest, 127.0.0.1 here); v2 published there is pulled by the guest, staged, and booted.
#[test]
fn update_pulled_from_the_host_then_booted() {
    let d = scenario_dir("pull");
    let v1 = image(1, true, Fs::Squashfs);
    let v2 = image(2, true, Fs::Squashfs);
    sign(&v2, 2);
    let www = d.join("www");
    let ch = www.join("ch");
    let nginx = keel_tests::nginx::Nginx::start(&www, &d.join("nginx"));
    let disk = Disk::new(&d, &v1, "root-squashfs.img");
    let port = free_port();
    let boot = Boot {
        cmdline: format!("keel_test.pull=http://10.0.2.2:{}/ch", nginx.port),
        ..tcp_boot(port)
    };
    let mut vm = Vm::start(&disk, "v1", &boot);
    vm.wait_for("KEEL ready version=1");
    let out = ok(&keelctl(&[
        "publish",
        v2.to_str().unwrap(),
        "--channel",
        ch.to_str().unwrap(),
    ]));
    assert!(out.contains("published"), "{out}");
    // The init script reboots once something is staged.
    vm.wait_for("KEEL staged: rebooting");
    vm.wait_exit();
    let img = format!("/ch/images/{}", sha256_file(&v2));
    let fetched: Vec<_> = nginx
        .requests()
        .into_iter()
        .filter(|(p, _, _)| *p == img)
        .collect();
    assert_eq!(fetched.len(), 1, "{:?}", nginx.requests());
    let mut vm = Vm::start(&disk, "v2", &boot);
    vm.wait_for("KEEL ready version=2");
    let st = status(port);
    assert_eq!(st["booted"]["version"], 2, "{st}");
    assert_eq!(
        st["pull"]["url"],
        format!("http://10.0.2.2:{}/ch", nginx.port),
        "{st}"
    );
    vm.kill();
    let _ = fs::remove_dir_all(&d);
}

/// Scenario 5: a correctly signed image that does not mount (a truncated squashfs) is
/// promoted, fails to mount, and the same boot falls back to the previous image.
#[test]
fn image_that_does_not_mount_falls_back_in_the_same_boot() {
    let d = scenario_dir("no-mount");
    let v1 = image(1, true, Fs::Squashfs);
    let v2 = image(2, true, Fs::Squashfs);
    let broken = d.join("truncated.img");
    let bytes = fs::read(&v2).unwrap();
    fs::write(&broken, &bytes[..bytes.len() / 2]).unwrap();
    sign(&broken, 2);
    let disk = Disk::new(&d, &v1, "root-squashfs.img");
    let port = free_port();
    let mut vm = Vm::start(&disk, "v1", &tcp_boot(port));
    vm.wait_for("KEEL ready version=1");
    ok(&push(port, &broken));
    vm.wait_for("KEEL staged: rebooting");
    vm.wait_exit();
    let mut vm = Vm::start(&disk, "fallback", &tcp_boot(port));
    vm.wait_for("KEEL booted version=1");
    vm.wait_for("KEEL ready version=1");
    let st = status(port);
    let why = st["boot_actions"].to_string();
    assert!(why.contains("rolled back"), "{st}");
    vm.kill();
    assert!(disk.state().is_rejected(&sha256_file(&broken)));
    let _ = fs::remove_dir_all(&d);
}

/// Compressed modules (issue 10, item 12) on Debian 12's kernel, which cannot decompress
/// modules: its own modules recompressed by the real tools. Packed as they are (xz as the
/// kernel's modules_install writes it, and gzip), initstage decodes each in user space and the
/// boot goes on; packed by default, keelctl unpacks every format, zstd included, and the boot
/// decodes nothing.
#[test]
fn compressed_modules_boot_a_kernel_that_cannot_decompress_them() {
    let d = scenario_dir("modz");
    let v1 = image(1, true, Fs::Squashfs);
    let kept = recompressed_modules(&d.join("kept"), &["xz", "gzip"]);
    let (kept_initramfs, said) =
        initramfs_with(&kept, &d.join("kept.cpio.gz"), &["--keep-compressed"]);
    assert!(!said.contains("unpacked"), "{said}");
    let all = recompressed_modules(&d.join("all"), &["xz", "gzip", "zstd"]);
    let (all_initramfs, said) = initramfs_with(&all, &d.join("all.cpio.gz"), &[]);
    let unpacked = said
        .lines()
        .find(|l| l.starts_with("unpacked compressed modules to .ko: "))
        .unwrap_or_else(|| panic!("{said}"));
    for f in ["gzip", "xz", "zstd"] {
        assert!(unpacked.contains(&format!(" {f}")), "{unpacked}");
    }
    let boots = [
        ("kept", kept_initramfs, true),
        ("all", all_initramfs, false),
    ];
    for (tag, p, _) in &boots {
        eprintln!("{tag}: initramfs {} bytes", fs::metadata(p).unwrap().len());
    }
    std::thread::scope(|s| {
        for (tag, initramfs, decoded) in &boots {
            let disk = Disk::new(&d.join(tag), &v1, "root-squashfs.img");
            s.spawn(move || {
                let boot = Boot {
                    initramfs: Some(initramfs.clone()),
                    cmdline: "keel.debug".into(),
                    ..Boot::default()
                };
                let mut vm = Vm::start(&disk, tag, &boot);
                vm.wait_for("KEEL booted version=1");
                let log = vm.log();
                vm.kill();
                for f in ["xz", "gzip"] {
                    let line = format!("({f}, decoded in user space: the kernel cannot)");
                    assert_eq!(log.contains(&line), *decoded, "{tag}: {line}\n{log}");
                }
                // Every module the boot needs went in: the block device was found.
                assert!(log.contains("module virtio_blk: "), "{tag}\n{log}");
                let ms: f64 = log
                    .lines()
                    .filter_map(|l| l.split("keel: module ").nth(1))
                    .filter_map(|l| {
                        l.split(": ")
                            .nth(1)?
                            .split(" ms")
                            .next()?
                            .parse::<f64>()
                            .ok()
                    })
                    .sum();
                eprintln!("{tag}: module loads took {ms:.0} ms in all");
            });
        }
    });
    let _ = fs::remove_dir_all(&d);
}

/// Scenario 7: power cuts. QEMU is killed (SIGKILL) at instants spread over a push, and
/// initstage is aborted at every write step of a promotion (keel.failpoint=N); after each,
/// the next boot starts an intact image and /persistent lost nothing. Two workers, each on
/// its own copy of the disk (at most two VMs at once).
#[test]
fn power_cuts_during_staging_and_at_every_promotion_step() {
    let d = scenario_dir("powercut");
    let v1 = image(1, true, Fs::Squashfs);
    let v2 = image(2, true, Fs::Squashfs);
    sign(&v2, 2);
    let base = Disk::new(&d, &v1, "root-squashfs.img");

    // During staging: from the same v1 disk each time, a push runs in the background and the
    // VM dies after a delay that moves through the transfer (and past its commit).
    let delays = [100u64, 200, 300, 400, 550, 800];
    let staging_kills = parallel(&d, &base, "stage", delays.to_vec(), |disk, i, delay_ms| {
        let port = free_port();
        let mut vm = Vm::start(disk, &format!("stage-{i}"), &tcp_boot(port));
        vm.wait_for("KEEL ready version=1");
        push_then_cut(&mut vm, port, &v2, Duration::from_millis(delay_ms));
        check_intact(disk, &format!("after-stage-{i}"));
        true
    });
    assert_eq!(staging_kills, delays.len());

    // Stage v2 cleanly on the v1 disk: the snapshot is the disk just before its promotion.
    let port = free_port();
    let mut vm = Vm::start(&base, "stage", &tcp_boot(port));
    vm.wait_for("KEEL ready version=1");
    ok(&push(port, &v2));
    vm.wait_for("KEEL staged: rebooting");
    vm.wait_exit();

    // Abort initstage at write step N, for every N until a boot needs no abort.
    let promotion_kills = parallel(&d, &base, "fp", (1..60).collect(), |disk, _, n| {
        let mut vm = Vm::start(
            disk,
            &format!("fp-{n}"),
            &Boot {
                cmdline: format!("keel.failpoint={n}"),
                ..Boot::default()
            },
        );
        // Either initstage dies at step N (the kernel panics, QEMU exits) or the boot goes on.
        vm.wait_exit_or("KEEL booted version=");
        let survived = vm.log().contains("KEEL booted version=");
        vm.kill();
        if survived {
            return false;
        }
        check_intact(disk, &format!("after-fp-{n}"));
        true
    });
    let kills = staging_kills + promotion_kills;
    eprintln!("power cuts: {kills} ({promotion_kills} promotion steps)");
    assert!(
        promotion_kills >= 10,
        "only {promotion_kills} promotion steps"
    );
    assert!(kills >= 20, "only {kills} power cuts");
    let _ = fs::remove_dir_all(&d);
}

/// Runs `f` over `items` on two workers, each restoring its own copy of `base` before every
/// item. `f` returns false to say "no more": later items are skipped. Returns how many
/// returned true.
fn parallel<T: Copy + Send>(
    dir: &Path,
    base: &Disk,
    tag: &str,
    items: Vec<T>,
    f: impl Fn(&Disk, usize, T) -> bool + Sync,
) -> usize {
    let next = std::sync::Mutex::new(items.into_iter().enumerate());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let count = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for w in 0..2 {
            let (next, stop, count, f) = (&next, &stop, &count, &f);
            let disk = Disk {
                path: dir.join(format!("{tag}-w{w}.img")),
                layout: base.layout.clone(),
            };
            s.spawn(move || loop {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Some((i, item)) = next.lock().unwrap().next() else {
                    return;
                };
                fs::copy(&base.path, &disk.path).unwrap();
                if f(&disk, i, item) {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                } else {
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    count.into_inner()
}
