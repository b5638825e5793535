//! initstage end to end: real disks, loop devices, squashfs/erofs, overlayfs, in a private
//! mount namespace per test. Run as root (`make test`).

use std::fs;

use keel_proto::bootstate::{EventKind, MarkGood, Trial};
use keel_tests::*;

const IMG: u32 = 1;
const NEWIMG: u32 = 3;

/// The usual disk: img with v1 (and its manifest), overlay with a persistent file, newimg.
fn standard_disk(sb: &mut Sandbox) -> Disk {
    let img = sb.img_with_v1(24);
    sb.disk(&[
        img,
        Part::new("overlay", 48).file("persistent/etc/persisted", b"kept\n".to_vec()),
        Part::new("newimg", 24),
    ])
}

fn stage_version(sb: &mut Sandbox, disk: &Disk, version: u64) -> String {
    let img = sb.squashfs(version);
    let m = manifest_for(&img, "demo", version);
    sb.with_partition(disk, NEWIMG, |d| stage(d, &img, &m));
    m.manifest.sha256
}

#[test]
fn first_boot_mounts_image_overlay_and_views() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("first-boot");
    let disk = standard_disk(&mut sb);
    let r = sb.prepare(&disk, "console=ttyS0 quiet");
    assert_eq!(sb.booted_version(), 1);
    assert_eq!(r.booted.version, 1);
    assert_eq!(r.booted.name, "demo");
    assert_eq!(r.image_fstype, "squashfs");
    assert_eq!(r.upper, "partition");
    assert_eq!(r.trial, None);
    let roles: Vec<&str> = r.partitions.iter().map(|p| p.role.as_str()).collect();
    assert_eq!(roles, ["img", "overlay", "newimg"]);
    assert!(
        r.actions[0].contains("adopted demo version 1"),
        "{:?}",
        r.actions
    );
    // persistent/ is a lower layer of the root.
    assert_eq!(
        fs::read_to_string(sb.sysroot().join("etc/persisted")).unwrap(),
        "kept\n"
    );
    // Alpine's views.
    assert!(sb.sysroot().join("media/root-ro/etc/keel-version").exists());
    assert!(sb.sysroot().join("media/root-rw/upper").is_dir());
    // The overlay line names both lowers, the upper and the work dir.
    let ov = sb.mount_line(&sb.sysroot()).expect("overlay mounted");
    assert!(ov.contains(" - overlay overlay "), "{ov}");
    let run = sb.run_dir();
    assert!(
        ov.contains(&format!(
            "lowerdir={}/overlay/persistent:{}/ro",
            run.display(),
            run.display()
        )),
        "{ov}"
    );
    // The image is read-only through a loop device.
    let ro = sb.mount_line(&run.join("ro")).unwrap();
    assert!(
        ro.contains(" ro,") && ro.contains("squashfs /dev/loop"),
        "{ro}"
    );
    sb.finish();
}

#[test]
fn upper_is_cleared_each_boot_but_persistent_stays() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("upper-cleared");
    let disk = standard_disk(&mut sb);
    sb.prepare(&disk, "");
    fs::write(sb.sysroot().join("etc/scratch"), b"boot 1\n").unwrap();
    assert!(sb.run_dir().join("overlay/upper/etc/scratch").exists());
    sb.teardown();
    let r = sb.prepare(&disk, "");
    assert!(
        !sb.sysroot().join("etc/scratch").exists(),
        "upper survived a boot"
    );
    assert_eq!(
        fs::read_to_string(sb.sysroot().join("etc/persisted")).unwrap(),
        "kept\n"
    );
    // The first boot adopted the image (counted, state written); the second changed nothing,
    // so it wrote nothing.
    assert_eq!(r.boot_count, 1);
    sb.finish();
}

#[test]
fn ten_thousand_files_in_old_upper_are_moved_aside_not_deleted() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("big-upper");
    let disk = standard_disk(&mut sb);
    sb.prepare(&disk, "");
    let many = sb.run_dir().join("overlay/upper/many");
    fs::create_dir_all(&many).unwrap();
    for i in 0..10_000 {
        fs::write(many.join(format!("f{i}")), b"x").unwrap();
    }
    sb.teardown();
    sb.prepare(&disk, "");
    // The boot path renamed the old upper (O(1)); not one file was deleted on it.
    let trash = sb.run_dir().join("overlay/.trash");
    let olds: Vec<_> = fs::read_dir(&trash)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("upper."))
        .map(|e| e.path())
        .collect();
    let counts: Vec<usize> = olds
        .iter()
        .filter(|p| p.join("many").exists())
        .map(|p| fs::read_dir(p.join("many")).unwrap().count())
        .collect();
    assert_eq!(counts, [10_000]);
    assert!(!sb.sysroot().join("many").exists());
    // The fresh upper holds only the mount points of the layer views made this boot.
    let upper: Vec<String> = fs::read_dir(sb.run_dir().join("overlay/upper"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(upper, ["media"]);
    // Off the boot path, `clean-trash` empties it.
    run(std::process::Command::new(bin("initstage"))
        .arg("clean-trash")
        .arg(&trash));
    assert_eq!(fs::read_dir(&trash).unwrap().count(), 0);
    sb.finish();
}

#[test]
fn promotion_keeps_old_and_starts_trial_then_mark_good_ends_it() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("promote");
    let disk = standard_disk(&mut sb);
    sb.prepare(&disk, "");
    sb.teardown();
    let sha2 = stage_version(&mut sb, &disk, 2);
    let r = sb.prepare(&disk, "keel.tries=3");
    assert_eq!(sb.booted_version(), 2);
    assert_eq!(r.booted.sha256, sha2);
    assert_eq!(r.trial, Some(Trial { tries: 3, used: 1 }));
    assert_eq!(r.tries_left, Some(2));
    assert!(
        r.actions
            .iter()
            .any(|a| a.contains("promoted version 1 -> 2")),
        "{:?}",
        r.actions
    );
    let img = sb.run_dir().join("img");
    assert_eq!(sha256_file(&img.join("root-squashfs.img")), sha2);
    assert!(img.join("root-squashfs-old.img").exists());
    assert!(!img.join("root-squashfs.img.new").exists());
    // The staged slot is empty again.
    assert_eq!(
        fs::read_dir(sb.run_dir().join("newimg"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name() != "lost+found")
            .count(),
        0
    );
    // mark-good through proto's state API, as the agent does.
    let mut st = read_state(&img);
    assert_eq!(st.mark_good(), Ok(MarkGood::Ended));
    write_state(&img, &st);
    sb.teardown();
    for _ in 0..4 {
        let r = sb.prepare(&disk, "keel.tries=3");
        assert_eq!(r.booted.version, 2);
        assert_eq!(r.trial, None);
        sb.teardown();
    }
    let st = sb.with_partition(&disk, IMG, read_state);
    assert_eq!(
        st.events
            .iter()
            .filter(|e| e.kind == EventKind::MarkedGood)
            .count(),
        1
    );
    assert_eq!(st.old.as_ref().unwrap().version, 1);
    sb.finish();
}

#[test]
fn unconfirmed_trial_rolls_back_after_tries() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("trial-expires");
    let disk = standard_disk(&mut sb);
    sb.prepare(&disk, "");
    sb.teardown();
    let v2 = sb.squashfs(2);
    let m2 = manifest_for(&v2, "demo", 2);
    let sha2 = m2.manifest.sha256.clone();
    sb.with_partition(&disk, NEWIMG, |d| stage(d, &v2, &m2));
    for used in 1..=2 {
        let r = sb.prepare(&disk, "keel.tries=2");
        assert_eq!(r.booted.version, 2);
        assert_eq!(r.trial, Some(Trial { tries: 2, used }));
        sb.teardown();
    }
    let r = sb.prepare(&disk, "keel.tries=2");
    assert_eq!(sb.booted_version(), 1);
    assert_eq!(r.booted.version, 1);
    assert_eq!(r.trial, None);
    assert!(
        r.actions.iter().any(|a| a
            .contains("rolled back version 2 -> 1: version 2 was not marked good within 2 boots")),
        "{:?}",
        r.actions
    );
    let img = sb.run_dir().join("img");
    assert!(!img.join("root-squashfs-old.img").exists());
    let st = read_state(&img);
    assert!(st.is_rejected(&sha2));
    assert_eq!(st.last_event().unwrap().kind, EventKind::RolledBack);
    sb.teardown();
    // The same failed image is never promoted again, even if staged again.
    sb.with_partition(&disk, NEWIMG, |d| stage(d, &v2, &m2));
    let r = sb.prepare(&disk, "keel.tries=2");
    assert_eq!(r.booted.version, 1);
    assert!(
        r.actions.iter().any(|a| a.contains("failed before")),
        "{:?}",
        r.actions
    );
    sb.finish();
}

#[test]
fn corrupt_staged_image_never_becomes_current() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("bad-hash");
    let disk = standard_disk(&mut sb);
    sb.prepare(&disk, "");
    sb.teardown();
    let v2 = sb.squashfs(2);
    let m = manifest_for(&v2, "demo", 2);
    sb.with_partition(&disk, NEWIMG, |d| {
        stage(d, &v2, &m);
        // Flip one byte of the staged image after signing.
        let p = d.join("root-squashfs.img");
        let mut b = fs::read(&p).unwrap();
        b[100] ^= 0xff;
        fs::write(&p, b).unwrap();
    });
    let r = sb.prepare(&disk, "");
    assert_eq!(sb.booted_version(), 1);
    assert_eq!(r.trial, None);
    let msg = r
        .actions
        .iter()
        .find(|a| a.contains("refused"))
        .expect("refusal recorded");
    assert!(
        msg.contains("sha256") && msg.contains(&m.manifest.sha256),
        "{msg}"
    );
    let img = sb.run_dir().join("img");
    assert!(!img.join("root-squashfs.img.new").exists());
    assert!(!img.join("root-squashfs-old.img").exists());
    assert!(!sb
        .run_dir()
        .join("newimg/root-squashfs.img.manifest")
        .exists());
    sb.finish();
}

#[test]
fn a_verity_root_that_is_not_the_trees_is_refused_at_promotion() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("verity-root");
    let disk = standard_disk(&mut sb);
    sb.prepare(&disk, "");
    sb.teardown();
    // Signed over exactly the staged bytes, but with a root hash the tree does not give.
    let v2 = sb.squashfs(2);
    let lie = "ab".repeat(32);
    let m = verity_manifest_for(&v2, "demo", 2, Some(&lie));
    sb.with_partition(&disk, NEWIMG, |d| stage(d, &v2, &m));
    let r = sb.prepare(&disk, "");
    assert_eq!(sb.booted_version(), 1);
    let msg = r
        .actions
        .iter()
        .find(|a| a.contains("refused"))
        .unwrap_or_else(|| panic!("no refusal in {:?}", r.actions));
    assert!(
        msg.contains("verity root hash") && msg.contains(&lie),
        "{msg}"
    );
    assert!(!sb.run_dir().join("img/root-squashfs.img.new").exists());
    sb.teardown();
    // The same image with its true root is promoted.
    let v3 = sb.squashfs(3);
    let m = verity_manifest_for(&v3, "demo", 3, None);
    sb.with_partition(&disk, NEWIMG, |d| stage(d, &v3, &m));
    let r = sb.prepare(&disk, "");
    assert_eq!(sb.booted_version(), 3, "{:?}", r.actions);
    sb.finish();
}

#[test]
fn unmountable_new_image_rolls_back_in_the_same_boot() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("unmountable");
    let disk = standard_disk(&mut sb);
    sb.prepare(&disk, "");
    sb.teardown();
    // A truncated squashfs with a valid signed manifest of exactly those bytes.
    let v2 = sb.squashfs(2);
    let bad = sb.path("truncated.squashfs");
    let bytes = fs::read(&v2).unwrap();
    fs::write(&bad, &bytes[..1024]).unwrap();
    let m = manifest_for(&bad, "demo", 2);
    sb.with_partition(&disk, NEWIMG, |d| stage(d, &bad, &m));
    let r = sb.prepare(&disk, "");
    assert_eq!(sb.booted_version(), 1);
    assert_eq!(r.booted.version, 1);
    assert!(
        r.actions
            .iter()
            .any(|a| a.contains("rolled back version 2 -> 1: image failed")),
        "{:?}",
        r.actions
    );
    let st = read_state(&sb.run_dir().join("img"));
    assert!(st.is_rejected(&m.manifest.sha256));
    assert_eq!(st.current.as_ref().unwrap().version, 1);
    sb.finish();
}

#[test]
fn image_without_init_rolls_back() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("no-init");
    let disk = standard_disk(&mut sb);
    sb.prepare(&disk, "");
    sb.teardown();
    let root = sb.rootfs(2);
    fs::remove_file(root.join("sbin/init")).unwrap();
    let img = sb.path("noinit.squashfs");
    run(std::process::Command::new("mksquashfs")
        .arg(&root)
        .arg(&img)
        .args(["-noappend", "-quiet"]));
    let m = manifest_for(&img, "demo", 2);
    sb.with_partition(&disk, NEWIMG, |d| stage(d, &img, &m));
    let r = sb.prepare(&disk, "");
    assert_eq!(sb.booted_version(), 1);
    assert!(
        r.actions
            .iter()
            .any(|a| a.contains("/sbin/init is not an executable file")),
        "{:?}",
        r.actions
    );
    sb.finish();
}

#[test]
fn missing_optional_partitions_fall_back_to_tmpfs() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("img-only");
    let v1 = sb.squashfs(1);
    let disk = sb.disk(&[Part::new("img", 16).file("root-squashfs.img", fs::read(&v1).unwrap())]);
    let out = sb.prepare_raw(&disk, "", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no partition labelled \"overlay\""), "{err}");
    assert!(
        err.contains("no newimg partition") && err.contains("no boot partition"),
        "{err}"
    );
    let r = keel_proto::report::BootReport::from_json(
        &fs::read(sb.run_dir().join("boot.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(r.upper, "tmpfs");
    assert_eq!(r.booted.version, 0, "no manifest: unknown version");
    assert_eq!(sb.booted_version(), 1);
    fs::write(sb.sysroot().join("etc/x"), b"x").unwrap();
    let rw = sb.mount_line(&sb.run_dir().join("rw")).unwrap();
    assert!(rw.contains(" - tmpfs "), "{rw}");
    sb.finish();
}

#[test]
fn boot_partition_is_found_and_mounted_read_only() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("boot-part");
    let v1 = sb.squashfs(1);
    let disk = sb.disk(&[
        Part::new("img", 16).file("root-squashfs.img", fs::read(&v1).unwrap()),
        Part::new("overlay", 8),
        Part::new("newimg", 8),
        Part::new("boot", 8).file("modules/README", b"modules/<version>/ go here\n".to_vec()),
    ]);
    let r = sb.prepare(&disk, "");
    assert_eq!(r.partitions.len(), 4);
    let line = sb.mount_line(&sb.run_dir().join("boot")).unwrap();
    assert!(line.split(' ').nth(5).unwrap().starts_with("ro"), "{line}");
    assert!(sb.run_dir().join("boot/modules/README").exists());
    sb.finish();
}

#[test]
fn overlaytmpfs_with_flags() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("overlaytmpfs");
    let disk = standard_disk(&mut sb);
    let r = sb.prepare(
        &disk,
        "overlaytmpfs=yes overlaytmpfsflags=size=8m,nr_inodes=4000",
    );
    assert_eq!(r.upper, "tmpfs");
    let rw = sb.mount_line(&sb.run_dir().join("rw")).unwrap();
    assert!(
        rw.contains(" - tmpfs ")
            && rw.contains("size=8192k")
            && rw.contains("nr_inodes=4000")
            && rw.contains("mode=755"),
        "{rw}"
    );
    // persistent still comes from the overlay partition.
    assert_eq!(
        fs::read_to_string(sb.sysroot().join("etc/persisted")).unwrap(),
        "kept\n"
    );
    fs::write(sb.sysroot().join("etc/scratch"), b"x").unwrap();
    assert!(sb.run_dir().join("rw/upper/etc/scratch").exists());
    assert!(!sb.run_dir().join("overlay/upper/etc/scratch").exists());
    sb.finish();
}

#[test]
fn erofs_image_and_custom_labels() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("erofs");
    let v1 = sb.erofs(7);
    let disk = sb.disk(&[
        Part::new("IMGX", 16).file("root.erofs", fs::read(&v1).unwrap()),
        Part::new("OVX", 8),
    ]);
    let r = sb.prepare(
        &disk,
        "keel.image=root.erofs keel.label.img=IMGX keel.label.overlay=OVX",
    );
    assert_eq!(r.image_fstype, "erofs");
    assert_eq!(r.upper, "partition");
    assert_eq!(sb.booted_version(), 7);
    sb.finish();
}

#[test]
fn missing_img_partition_is_a_clear_error() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("no-img");
    let disk = sb.disk(&[Part::new("overlay", 8)]);
    let out = sb.prepare_raw(&disk, "keel.wait=0", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no partition with filesystem label \"img\" (the img partition)"),
        "{err}"
    );
    assert!(err.contains("keel.label.img="), "{err}");
    assert!(
        sb.mounts().is_empty(),
        "a failed boot left mounts: {:?}",
        sb.mounts()
    );
    sb.finish();
}

#[test]
fn image_that_is_not_squashfs_or_erofs_without_fallback_is_a_clear_error() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("not-an-image");
    let disk = sb.disk(&[Part::new("img", 8).file("root-squashfs.img", vec![0u8; 65536])]);
    let out = sb.prepare_raw(&disk, "", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("root-squashfs.img is no known filesystem, not squashfs or erofs"),
        "{err}"
    );
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());
    sb.finish();
}

#[test]
fn malformed_cmdline_values_warn_and_boot_with_defaults() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("malformed");
    let disk = standard_disk(&mut sb);
    let out = sb.prepare_raw(
        &disk,
        "keel.tries=lots keel.wait=soon overlaytmpfs=maybe keel.image=../x",
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    for w in [
        "keel.tries=lots: expected a whole number",
        "keel.wait=soon: expected whole seconds",
        "overlaytmpfs=maybe: expected yes or no",
        "keel.image=../x: expected a plain file name",
    ] {
        assert!(err.contains(w), "missing {w:?} in {err}");
    }
    assert_eq!(sb.booted_version(), 1);
    sb.finish();
}

#[test]
fn duplicate_labels_are_refused_by_full_scan() {
    if !privileged() {
        return;
    }
    // Labels unique to this test, so the whole-system scan (PID 1's) cannot see others.
    let label = format!("kd{}", std::process::id() % 100_000);
    let mut sb = Sandbox::new("dup-labels");
    let v1 = sb.squashfs(1);
    let a = sb.disk(&[Part::new(&label, 8).file("root-squashfs.img", fs::read(&v1).unwrap())]);
    // Full scan with one such disk works.
    let cl = sb.cmdline(&format!("keel.label.img={label} keel.wait=1"));
    let mut cmd = std::process::Command::new(bin("initstage"));
    cmd.arg("prepare")
        .arg("--sysroot")
        .arg(sb.sysroot())
        .arg("--cmdline")
        .arg(&cl)
        .arg("--run-dir")
        .arg(sb.run_dir());
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sb.teardown();
    let _b = sb.disk(&[Part::new(&label, 8)]);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "label {label:?} is on more than one device: /dev/{}",
            a.devs[0]
        )) || err.contains(&format!(", /dev/{}", a.devs[0])),
        "{err}"
    );
    sb.finish();
}

#[test]
fn modules_resolve_from_initramfs_then_boot_partition() {
    if !privileged() {
        return;
    }
    // Never load a module into the host kernel: every name here is a built-in or missing,
    // so the test walks the lookup (initramfs tree, then the boot partition) without finit_module.
    let mut sb = Sandbox::new("modules");
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let initramfs_mods = sb.path("lib-modules");
    fs::create_dir_all(&initramfs_mods).unwrap();
    fs::write(initramfs_mods.join("modules.dep"), "").unwrap();
    fs::write(
        initramfs_mods.join("modules.builtin"),
        "kernel/fs/squashfs/squashfs.ko\n",
    )
    .unwrap();
    let v1 = sb.squashfs(1);
    let disk = sb.disk(&[
        Part::new("img", 16).file("root-squashfs.img", fs::read(&v1).unwrap()),
        Part::new("boot", 8).file(
            &format!("modules/{release}/modules.builtin"),
            b"kernel/fs/overlayfs/overlay.ko\n".to_vec(),
        ),
    ]);
    let out = sb
        .prepare_cmd(&disk, "modules=squashfs,overlay,no_such_mod")
        .arg("--modules-dir")
        .arg(&initramfs_mods)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("load modules from boot: ok"), "{err}");
    assert!(
        err.contains(&format!(
            "module no_such_mod not found in the initramfs or {}",
            sb.run_dir().join("boot/modules").join(&release).display()
        )),
        "{err}"
    );
    assert!(
        !err.contains("module overlay not found") && !err.contains("module squashfs not found"),
        "{err}"
    );
    sb.finish();
}

/// `keel.label.newimg=img` maps two roles to one filesystem: the factory manifest on `img`
/// would look like a staged image equal to the current one. The second role is refused and
/// the current image survives any number of boots, also after the cmdline is fixed.
#[test]
fn two_roles_on_one_device_are_refused_and_the_current_image_survives() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("two-roles");
    let disk = standard_disk(&mut sb);
    for _ in 0..2 {
        let r = sb.prepare(&disk, "keel.label.newimg=img");
        assert_eq!(sb.booted_version(), 1);
        assert!(
            r.actions
                .iter()
                .any(|a| a.contains("newimg partition refused")),
            "{:?}",
            r.actions
        );
        assert!(!r.partitions.iter().any(|p| p.role == "newimg"));
        sb.teardown();
    }
    let r = sb.prepare(&disk, "");
    assert_eq!(sb.booted_version(), 1);
    assert!(r.partitions.iter().any(|p| p.role == "newimg"));
    sb.teardown();
    sb.with_partition(&disk, IMG, |d| {
        assert!(d.join("root-squashfs.img").exists());
        assert!(d.join("root-squashfs.img.manifest").exists());
    });
    sb.finish();
}

/// A staged image that does not fit on `img` next to the current one is kept, not refused:
/// a full partition says nothing about the image.
#[test]
fn img_too_small_for_a_promotion_keeps_the_staged_image() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("img-full");
    let img = sb.img_with_v1(16);
    let disk = sb.disk(&[img, Part::new("overlay", 8), Part::new("newimg", 48)]);
    let big = sb.fresh("big.img");
    fs::write(&big, vec![0x5a; 24 << 20]).unwrap();
    let m = manifest_for(&big, "demo", 2);
    sb.with_partition(&disk, NEWIMG, |d| stage(d, &big, &m));
    let r = sb.prepare(&disk, "");
    assert_eq!(sb.booted_version(), 1);
    assert!(
        r.actions.iter().any(|a| a.contains("img is full")),
        "{:?}",
        r.actions
    );
    sb.teardown();
    sb.with_partition(&disk, NEWIMG, |d| {
        assert!(d.join("root-squashfs.img.manifest").exists());
        assert_eq!(sha256_file(&d.join("root-squashfs.img")), m.manifest.sha256);
    });
    let st = sb.with_partition(&disk, IMG, |d| {
        assert!(!d.join("root-squashfs.img.new").exists());
        read_state(d)
    });
    assert!(st.rejected.is_empty(), "{:?}", st.rejected);
    sb.finish();
}

/// `keel-state.json` lost after a promotion: the next boot adopts the promoted image's own
/// manifest (kept beside it on `img`), puts it on trial again because `-old` is there, and
/// never takes a manifest that does not describe the image's bytes.
#[test]
fn a_lost_state_file_neither_misreports_the_image_nor_forgets_the_trial() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("lost-state");
    let disk = standard_disk(&mut sb);
    sb.prepare(&disk, "");
    sb.teardown();
    let sha2 = stage_version(&mut sb, &disk, 2);
    assert_eq!(sb.prepare(&disk, "keel.tries=2").booted.version, 2);
    sb.teardown();
    sb.with_partition(&disk, IMG, |d| {
        fs::write(d.join("keel-state.json"), b"").unwrap()
    });
    let r = sb.prepare(&disk, "keel.tries=2");
    assert_eq!(r.booted.version, 2, "{:?}", r.actions);
    assert_eq!(r.booted.sha256, sha2);
    assert_eq!(
        r.trial,
        Some(Trial { tries: 2, used: 1 }),
        "{:?}",
        r.actions
    );
    sb.teardown();
    // Not marked good: rolled back to the previous image.
    let r = sb.prepare(&disk, "keel.tries=2");
    assert_eq!(r.trial, Some(Trial { tries: 2, used: 2 }));
    sb.teardown();
    let r = sb.prepare(&disk, "keel.tries=2");
    assert_eq!(r.booted.version, 1, "{:?}", r.actions);
    sb.teardown();
    // A manifest beside the image that does not describe it (the factory one beside v2):
    // the image is recorded as unknown, with its real digest.
    let sha1 = stage_version(&mut sb, &disk, 3);
    sb.prepare(&disk, "");
    sb.teardown();
    let factory = sb.squashfs(1);
    let m1 = manifest_for(&factory, "demo", 1);
    sb.with_partition(&disk, IMG, |d| {
        fs::write(d.join("root-squashfs.img.manifest"), m1.to_json()).unwrap();
        fs::remove_file(d.join("keel-state.json")).unwrap();
    });
    let r = sb.prepare(&disk, "");
    assert_eq!(r.booted.version, 0, "{:?}", r.actions);
    assert_eq!(r.booted.sha256, sha1);
    assert!(
        r.actions.iter().any(|a| a.contains("recorded as unknown")),
        "{:?}",
        r.actions
    );
    sb.finish();
}
