//! Crash safety: stop initstage after every write, rename and fsync of a promotion and of a
//! rollback (the `failpoints` build's `KEEL_FAILPOINT=N` aborts at the N-th step), boot
//! again, and check that an intact image boots: its bytes hash to the digest the boot state
//! records, the root shows that version, and `persistent/` lost nothing.

use std::fs;
use std::os::unix::process::ExitStatusExt;

use keel_tests::*;

/// A disk with v1 booted once and v2 staged (with `verity`, v2 carries a dm-verity tree and a
/// format-2 manifest: the promotion checks the tree as it copies).
fn disk_with_v1(sb: &mut Sandbox, verity: bool) -> (Disk, String, String) {
    let v1 = sb.squashfs(1);
    let m1 = manifest_for(&v1, "demo", 1);
    let disk = sb.disk(&[
        Part::new("img", 24)
            .file("root-squashfs.img", fs::read(&v1).unwrap())
            .file("root-squashfs.img.manifest", m1.to_json()),
        Part::new("overlay", 8).file("persistent/etc/persisted", b"kept\n".to_vec()),
        Part::new("newimg", 24),
    ]);
    let v2 = sb.squashfs(2);
    let m2 = if verity {
        verity_manifest_for(&v2, "demo", 2, None)
    } else {
        manifest_for(&v2, "demo", 2)
    };
    sb.prepare(&disk, "");
    sb.teardown();
    sb.with_partition(&disk, 3, |d| stage(d, &v2, &m2));
    (disk, m1.manifest.sha256, m2.manifest.sha256)
}

/// Boots normally and checks the booted image is intact; returns its version.
fn boot_and_check(sb: &mut Sandbox, disk: &Disk, line: &str, shas: &[String; 2]) -> u64 {
    let r = sb.prepare(disk, line);
    let on_disk = sha256_file(&sb.run_dir().join("img/root-squashfs.img"));
    assert_eq!(
        on_disk, r.booted.sha256,
        "booted image's bytes do not match the state"
    );
    let v = sb.booted_version();
    assert_eq!(v, r.booted.version);
    assert_eq!(
        shas[usize::try_from(v - 1).unwrap()],
        on_disk,
        "version {v} has another digest"
    );
    assert_eq!(
        fs::read_to_string(sb.sysroot().join("etc/persisted")).unwrap(),
        "kept\n"
    );
    v
}

/// Aborts the boot at step `n`; `false` when the boot has fewer steps.
fn boot_with_failpoint(sb: &mut Sandbox, disk: &Disk, line: &str, n: u64) -> bool {
    let out = sb.prepare_raw(disk, line, &[("KEEL_FAILPOINT", &n.to_string())]);
    sb.teardown();
    if out.status.success() {
        return false;
    }
    assert_eq!(
        out.status.signal(),
        Some(6),
        "step {n}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("failpoint {n} (")));
    true
}

#[test]
fn power_cut_at_every_step_of_a_promotion() {
    cut_every_promotion_step("cut-promote", false);
}

/// The same with an image that carries a verity tree (checked during the copy).
#[test]
fn power_cut_at_every_step_of_a_verity_promotion() {
    cut_every_promotion_step("cut-promote-verity", true);
}

fn cut_every_promotion_step(tag: &str, verity: bool) {
    if !privileged() {
        return;
    }
    let mut steps = 0;
    for n in 1.. {
        let mut sb = Sandbox::new(&format!("{tag}-{n}"));
        let (disk, sha1, sha2) = disk_with_v1(&mut sb, verity);
        if !boot_with_failpoint(&mut sb, &disk, "", n) {
            sb.finish();
            break;
        }
        steps = n;
        // The next boot starts an intact image; the one after has finished the promotion.
        let v = boot_and_check(&mut sb, &disk, "", &[sha1.clone(), sha2.clone()]);
        assert_eq!(
            v, 2,
            "cut at step {n}: the promotion did not complete on the next boot"
        );
        sb.teardown();
        assert_eq!(boot_and_check(&mut sb, &disk, "", &[sha1, sha2]), 2);
        sb.finish();
    }
    // copy, fsyncs, intent, link, renames, state, staged removal: the loop really covered them.
    assert!(steps >= 15, "only {steps} steps were cut");
    eprintln!("cut a promotion (verity: {verity}) at each of its {steps} steps");
}

#[test]
fn power_cut_at_every_step_of_a_rollback() {
    if !privileged() {
        return;
    }
    let mut steps = 0;
    for n in 1.. {
        let mut sb = Sandbox::new(&format!("cut-rollback-{n}"));
        let (disk, sha1, sha2) = disk_with_v1(&mut sb, false);
        // Promote v2 with one try; it is never marked good.
        sb.prepare(&disk, "keel.tries=1");
        sb.teardown();
        if !boot_with_failpoint(&mut sb, &disk, "keel.tries=1", n) {
            sb.finish();
            break;
        }
        steps = n;
        let v = boot_and_check(
            &mut sb,
            &disk,
            "keel.tries=1",
            &[sha1.clone(), sha2.clone()],
        );
        assert_eq!(
            v, 1,
            "cut at step {n}: the rollback did not complete on the next boot"
        );
        sb.finish();
    }
    assert!(steps >= 8, "only {steps} steps were cut");
    eprintln!("cut a rollback at each of its {steps} steps");
}

/// A privileged test run without root fails when CI requires it, and skips otherwise: a
/// green CI run has run every privileged test.
#[test]
fn a_privileged_test_without_root_fails_under_ci() {
    if !privileged() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let run = |require: &str| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&exe)
            .args([
                "--exact",
                "power_cut_at_every_step_of_a_promotion",
                "--nocapture",
            ])
            .env_remove("CI")
            .env("KEEL_REQUIRE_ROOT", require)
            .output()
            .unwrap()
    };
    let strict = run("1");
    let text = String::from_utf8_lossy(&strict.stdout).into_owned()
        + &String::from_utf8_lossy(&strict.stderr);
    assert!(!strict.status.success(), "{text}");
    assert!(text.contains("needs root"), "{text}");
    let lax = run("0");
    let text =
        String::from_utf8_lossy(&lax.stdout).into_owned() + &String::from_utf8_lossy(&lax.stderr);
    assert!(lax.status.success(), "{text}");
    assert!(text.contains("SKIP: needs root"), "{text}");
}
