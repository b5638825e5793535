//! `keelctl persist` end to end on real disks: the running root (initstage prepare's
//! overlay, in the test's mount namespace) stages files, directories, symlinks and removals on
//! the overlay partition; the next `initstage prepare` applies them to `persistent/` before
//! mounting it, says so in boot.json, and refuses a tampered batch whole; a power cut at every
//! step of applying leaves a root that the boot after finishes. Run as root (`make test`).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use keel_tests::*;

fn disk(sb: &mut Sandbox) -> Disk {
    let img = sb.img_with_v1(24);
    sb.disk(&[
        img,
        Part::new("overlay", 24).file("persistent/etc/persisted", b"kept\n".to_vec()),
        Part::new("newimg", 8),
    ])
}

/// `keelctl persist ARGS` against the sandbox's running root.
fn persist(sb: &Sandbox, args: &[&str]) -> Output {
    Command::new(bin("keelctl"))
        .arg("persist")
        .arg("--run-dir")
        .arg(sb.run_dir())
        .arg("--root")
        .arg(sb.sysroot())
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// In the running root: `/etc/app` with a 0640 file owned by 1000:1000, a symlink and a
/// subdirectory (0700).
fn make_live_files(sb: &Sandbox) {
    let app = sb.sysroot().join("etc/app");
    fs::create_dir_all(app.join("d")).unwrap();
    fs::write(app.join("conf"), b"port = 8080\n").unwrap();
    fs::set_permissions(app.join("conf"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(app.join("conf"), Some(1000), Some(1000)).unwrap();
    std::os::unix::fs::symlink("conf", app.join("current")).unwrap();
    fs::write(app.join("d/x"), b"x\n").unwrap();
    fs::set_permissions(app.join("d"), fs::Permissions::from_mode(0o700)).unwrap();
}

fn check_applied(sb: &Sandbox) {
    let app = sb.sysroot().join("etc/app");
    assert_eq!(
        fs::read_to_string(app.join("conf")).unwrap(),
        "port = 8080\n"
    );
    let m = fs::symlink_metadata(app.join("conf")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, 1000, 1000));
    assert_eq!(
        fs::read_link(app.join("current")).unwrap().to_str(),
        Some("conf")
    );
    assert_eq!(fs::read_to_string(app.join("d/x")).unwrap(), "x\n");
    let d = fs::metadata(app.join("d")).unwrap();
    assert_eq!(d.mode() & 0o7777, 0o700);
    // From persistent/, not from an upper that survived.
    let p = sb.run_dir().join("overlay/persistent/etc/app/conf");
    assert_eq!(fs::read_to_string(p).unwrap(), "port = 8080\n");
    assert!(!sb.sysroot().join("etc/persisted").exists(), "the removal");
}

#[test]
fn files_persist_at_the_next_boot_and_a_removal_too() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("persist");
    let d = disk(&mut sb);
    sb.prepare(&d, "");
    make_live_files(&sb);
    let out = ok(&persist(&sb, &["/etc/app"]));
    assert!(out.contains("staged persist batch 1: "), "{out}");
    let out = ok(&persist(&sb, &["--json", "--remove", "/etc/persisted"]));
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (j["batch"].as_u64(), j["entries"].as_u64()),
        (Some(2), Some(1))
    );
    // Nothing changed in the mounted lower layer.
    assert!(!sb.run_dir().join("overlay/persistent/etc/app").exists());
    assert!(sb
        .run_dir()
        .join("overlay/persistent/etc/persisted")
        .exists());
    sb.teardown();

    let r = sb.prepare(&d, "");
    let got: Vec<(u64, Option<String>)> = r
        .persisted
        .iter()
        .map(|b| (b.batch, b.error.clone()))
        .collect();
    assert_eq!(got, [(1, None), (2, None)], "{:?}", r.persisted);
    // /etc and /etc/app (parents), conf, current, d, d/x.
    assert_eq!(r.persisted[0].applied, 6, "{:?}", r.persisted);
    assert!(
        r.actions
            .iter()
            .any(|a| a == "persisted batch 1: 6 entries"),
        "{:?}",
        r.actions
    );
    check_applied(&sb);
    let left: Vec<_> = fs::read_dir(sb.run_dir().join("overlay/persist"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    sb.teardown();
    // And the boot after has nothing to do, and keeps it.
    let r = sb.prepare(&d, "");
    assert!(r.persisted.is_empty());
    check_applied(&sb);
    sb.finish();
}

#[test]
fn bad_paths_and_systems_without_an_overlay_are_refused_with_the_reason() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("persist-bad");
    let d = disk(&mut sb);
    sb.prepare(&d, "");
    let root = sb.sysroot();
    fs::create_dir_all(root.join("srv/real")).unwrap();
    std::os::unix::fs::symlink("real", root.join("srv/link")).unwrap();
    fs::write(root.join("srv/real/f"), b"f").unwrap();
    let fifo = root.join("srv/fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for (args, want) in [
        (vec!["etc/x"], "give an absolute path"),
        (vec!["/etc/../etc/shadow"], "without \"..\""),
        (vec!["/srv/link/f"], "goes through the symlink /srv/link"),
        (
            vec!["/srv/fifo"],
            "not a regular file, directory or symlink",
        ),
        (vec!["/srv/missing"], "not in the running system"),
        (vec!["/"], "cannot be persisted"),
    ] {
        let e = err(&persist(&sb, &args));
        assert!(e.contains(want), "{args:?}: {e}");
    }
    assert!(
        !sb.run_dir().join("overlay/persist/1").exists(),
        "nothing staged"
    );
    sb.teardown();
    sb.finish();

    // No overlay partition: the upper is a tmpfs and there is no persistent/ to change.
    let mut sb = Sandbox::new("persist-nooverlay");
    let img = sb.img_with_v1(24);
    let d = sb.disk(&[img, Part::new("newimg", 8)]);
    sb.prepare(&d, "");
    let e = err(&persist(&sb, &["/etc/keel-version"]));
    assert!(e.contains("no overlay partition"), "{e}");
    sb.finish();
}

#[test]
fn a_tampered_batch_is_refused_whole_and_an_incomplete_one_dropped() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("persist-tampered");
    let d = disk(&mut sb);
    sb.prepare(&d, "");
    make_live_files(&sb);
    ok(&persist(&sb, &["/etc/app"]));
    // One byte of conf's copy changes on the partition (a bad cell, an attacker with it).
    let blob = sb.run_dir().join("overlay/persist/1/blobs/0");
    let mut b = fs::read(&blob).unwrap();
    b[0] ^= 1;
    fs::write(&blob, b).unwrap();
    // And a keelctl persist cut before its plan was written.
    fs::create_dir_all(sb.run_dir().join("overlay/persist/2/blobs")).unwrap();
    sb.teardown();

    let r = sb.prepare(&d, "");
    assert_eq!(r.persisted.len(), 2, "{:?}", r.persisted);
    let e = r.persisted[0].error.clone().unwrap();
    assert!(
        e.contains("/etc/app/conf: blob 0 does not match its SHA-256")
            && e.contains("nothing applied"),
        "{e}"
    );
    assert_eq!(r.persisted[0].applied, 0);
    assert!(r.persisted[1]
        .error
        .as_deref()
        .unwrap()
        .contains("incomplete"));
    // Nothing of it is in the root; the batch is kept for the user, the cut one gone.
    assert!(!sb.sysroot().join("etc/app").exists());
    assert!(sb.sysroot().join("etc/persisted").exists());
    let p = sb.run_dir().join("overlay/persist");
    assert!(p.join("rejected-1/plan").exists());
    assert!(!p.join("2").exists());
    // The next batch gets a number of its own (past the rejected one).
    fs::write(sb.sysroot().join("etc/later"), b"later\n").unwrap();
    let out = ok(&persist(&sb, &["/etc/later"]));
    assert!(out.contains("batch 2"), "{out}");
    sb.teardown();
    let r = sb.prepare(&d, "");
    assert_eq!(r.persisted.len(), 1, "{:?}", r.persisted);
    assert_eq!(
        fs::read_to_string(sb.sysroot().join("etc/later")).unwrap(),
        "later\n"
    );
    sb.finish();
}

#[test]
fn power_cut_at_every_step_of_applying_a_batch() {
    if !privileged() {
        return;
    }
    let mut steps = 0;
    for n in 1.. {
        let mut sb = Sandbox::new(&format!("persist-cut-{n}"));
        let d = disk(&mut sb);
        sb.prepare(&d, "");
        make_live_files(&sb);
        ok(&persist(&sb, &["/etc/app"]));
        ok(&persist(&sb, &["--remove", "/etc/persisted"]));
        sb.teardown();
        let out = sb.prepare_raw(&d, "", &[("KEEL_FAILPOINT", &n.to_string())]);
        sb.teardown();
        if out.status.success() {
            sb.finish();
            break;
        }
        assert_eq!(
            out.status.signal(),
            Some(6),
            "step {n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        steps = n;
        // The next boot finishes what the cut one began: the same root as without the cut.
        let r = sb.prepare(&d, "");
        assert!(
            r.persisted.iter().all(|b| b.error.is_none()),
            "cut at {n}: {:?}",
            r.persisted
        );
        check_applied(&sb);
        assert_eq!(
            fs::read_dir(sb.run_dir().join("overlay/persist"))
                .unwrap()
                .count(),
            0,
            "cut at {n}"
        );
        sb.finish();
    }
    // writes, fsyncs, renames, directories, the removal, each batch's end.
    assert!(steps >= 20, "only {steps} steps were cut");
    eprintln!("cut applying two persist batches at each of their {steps} steps");
}
