//! `make demo`: keel's update cycle on this machine, printed as a timeline.
//!
//! Builds a real disk (img, overlay, newimg partitions; ext4 made by mkfs.ext4), real
//! squashfs root images v1, v2 and a "bad" v3, and runs the real `initstage prepare` for each
//! boot, in a private mount namespace: first boot of v1, v2 staged and promoted, marked good,
//! v3 staged and never marked good, automatic rollback to v2.

use std::time::Instant;

use keel_proto::bootstate::MarkGood;
use keel_tests::*;

/// One timeline line: time since the start, what happened, how long it took.
fn tick(t0: Instant, what: &str, t: Instant) {
    println!(
        "{:>8.2} s  {:<58} ({:.0} ms)",
        t0.elapsed().as_secs_f64(),
        what,
        t.elapsed().as_secs_f64() * 1000.0
    );
}

fn main() {
    if !privileged() {
        std::process::exit(1);
    }
    let t0 = Instant::now();
    let mut sb = Sandbox::new("demo");
    let line = |what: &str, t: Instant| tick(t0, what, t);

    let t = Instant::now();
    let v1 = sb.squashfs(1);
    let m1 = manifest_for(&v1, "demo", 1);
    let disk = sb.disk(&[
        Part::new("img", 24)
            .file("root-squashfs.img", std::fs::read(&v1).unwrap())
            .file("root-squashfs.img.manifest", m1.to_json()),
        Part::new("overlay", 16).file("persistent/etc/hostname", b"appliance\n".to_vec()),
        Part::new("newimg", 24),
    ]);
    line("built disk: img (v1), overlay, newimg", t);

    let boot = |sb: &mut Sandbox, label: &str| {
        let t = Instant::now();
        let r = sb.prepare(&disk, "keel.tries=2");
        let trial = match r.trial {
            Some(tr) => format!(", trial {}/{}", tr.used, tr.tries),
            None => String::new(),
        };
        tick(
            t0,
            &format!("{label}: running v{}{trial}", sb.booted_version()),
            t,
        );
        for a in &r.actions {
            println!("{:>10}  · {a}", "");
        }
        sb.teardown();
        r
    };

    boot(&mut sb, "boot 1");
    for (v, good) in [(2u64, true), (3, false)] {
        let t = Instant::now();
        let img = sb.squashfs(v);
        let m = manifest_for(&img, "demo", v);
        sb.with_partition(&disk, 3, |d| stage(d, &img, &m));
        line(&format!("staged signed v{v} on newimg"), t);
        let r = boot(&mut sb, "reboot");
        if good {
            let t = Instant::now();
            sb.with_partition(&disk, 1, |d| {
                let mut s = read_state(d);
                assert_eq!(s.mark_good(), Ok(MarkGood::Ended));
                write_state(d, &s);
            });
            line(
                &format!("v{} health check passed: marked good", r.booted.version),
                t,
            );
        } else {
            line(
                &format!("v{v} never marks good (bad image)"),
                Instant::now(),
            );
            boot(&mut sb, "reboot");
            let r = boot(&mut sb, "reboot");
            assert_eq!(r.booted.version, 2, "rollback to v2 expected");
        }
    }
    println!(
        "done in {:.1} s: v1 → v2 (kept), v3 rolled back automatically",
        t0.elapsed().as_secs_f64()
    );
    sb.finish();
}
