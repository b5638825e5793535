//! Delta pushes end to end: squashfs images from the real `mksquashfs`, signed with their
//! chunk index by `keelctl sign`, pushed by `keelctl push` over TCP to a real agent that
//! stages into ext4 on a loop device (private mount namespace), the current image in `img`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use keel_tests::agent::*;
use keel_tests::*;

/// Pseudo-random bytes: files that do not compress, like a root's binaries.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A tree of 24 files (96 KiB to 2.3 MiB), plus `extra` files of 1 MiB named `added-N`.
fn tree(sb: &mut Sandbox, extra: u64) -> PathBuf {
    let d = sb.rootfs(1);
    fs::create_dir_all(d.join("usr/lib")).unwrap();
    for i in 0..24u64 {
        let len = usize::try_from(((i + 1) * 96) << 10).unwrap();
        fs::write(d.join(format!("usr/lib/lib{i}.so")), noise(i + 1, len)).unwrap();
    }
    for i in 0..extra {
        fs::write(
            d.join(format!("usr/lib/added-{i}")),
            noise(100 + i, 1 << 20),
        )
        .unwrap();
    }
    d
}

/// `mksquashfs` with every time fixed, so unchanged files keep their bytes.
fn squash(sb: &mut Sandbox, tree: &Path) -> PathBuf {
    let out = sb.fresh("img").with_extension("squashfs");
    run(Command::new("mksquashfs").arg(tree).arg(&out).args([
        "-noappend",
        "-quiet",
        "-no-progress",
        "-all-root",
        "-mkfs-time",
        "0",
        "-all-time",
        "0",
    ]));
    out
}

/// `keelctl sign` as `demo` `version`: the manifest and its chunk index.
fn sign(sb: &mut Sandbox, image: &Path, version: u64) {
    keel_tests::channel::sign(sb, image, &version.to_string());
    assert!(PathBuf::from(format!("{}.chunks", image.display())).is_file());
}

fn push_json(ep: &str, image: &Path) -> serde_json::Value {
    let out = keelctl(&["-e", ep, "push", "--json", image.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_delta_push_sends_only_what_changed_and_falls_back_when_refused() {
    if !privileged() {
        return;
    }
    with_newimg("delta-e2e", 96, |sb, newimg| {
        let w = world(sb, newimg, 1);
        let key = sb.fresh("signing.pem");
        fs::write(&key, keel_proto::manifest::signing_key_to_pem(&test_key())).unwrap();
        let t1 = tree(sb, 0);
        let v1 = squash(sb, &t1);
        let t2 = tree(sb, 1);
        let v2 = squash(sb, &t2);
        sign(sb, &v2, 2);
        // The device runs v1.
        fs::copy(&v1, w.img.join("root-squashfs.img")).unwrap();
        let a = start(&w, "");
        let ep = a.tcp.to_string();

        let r = push_json(&ep, &v2);
        let size = fs::metadata(&v2).unwrap().len();
        let sent = r["sent"].as_u64().unwrap();
        let reused = r["reused"].as_u64().unwrap();
        assert_eq!(r["staged"], 2);
        assert_eq!(r["delta"], true, "{r}");
        assert_eq!(sent + reused, size, "{r}");
        // One 1 MiB file added to ~29 MiB: its bytes and the tables around them.
        assert!(sent < size / 4, "{sent} of {size} bytes sent");
        assert_eq!(slot(&w).0.unwrap(), sha256_file(&v2));
        let s = status(&a);
        let t = s.last_transfer.unwrap();
        assert!(t.delta && t.received == sent && t.reused == reused, "{t:?}");
        let out = keelctl(&["-e", &a.unix.to_string(), "status"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("last staged  version 2 by push (delta)"),
            "{text}"
        );

        // An index file that is not the signed one: the agent refuses it, keelctl sends the
        // whole image, and the staged bytes are still exactly v3's.
        let t3 = tree(sb, 2);
        let v3 = squash(sb, &t3);
        sign(sb, &v3, 3);
        let idx = PathBuf::from(format!("{}.chunks", v3.display()));
        let mut b = fs::read(&idx).unwrap();
        let n = b.len();
        b[n - 1] ^= 0xff;
        fs::write(&idx, b).unwrap();
        // keelctl verify says so before anything is pushed.
        let trusted = w.etc.join("trusted.pem");
        let out = keelctl(&[
            "verify",
            v3.to_str().unwrap(),
            "--keys",
            trusted.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(".chunks"), "{err}");
        let out = keelctl(&[
            "verify",
            v2.to_str().unwrap(),
            "--keys",
            trusted.to_str().unwrap(),
        ]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("chunk index of"),
            "{out:?}"
        );
        let r = push_json(&ep, &v3);
        assert_eq!(r["staged"], 3);
        assert_eq!(r["delta"], false, "{r}");
        assert_eq!(
            r["sent"].as_u64().unwrap(),
            fs::metadata(&v3).unwrap().len()
        );
        assert_eq!(slot(&w).0.unwrap(), sha256_file(&v3));
        assert!(a.log().contains("bad-index"), "{}", a.log());

        // The same bytes again as version 4 (a rebuild that changed nothing): the agent
        // copies the staged v3, nothing is sent.
        sign(sb, &v3, 4);
        let r = push_json(&ep, &v3);
        assert_eq!(r["staged"], 4);
        assert_eq!(r["sent"], 0, "{r}");
        assert_eq!(
            r["reused"].as_u64().unwrap(),
            fs::metadata(&v3).unwrap().len()
        );
        assert_eq!(slot(&w).0.unwrap(), sha256_file(&v3));
    });
}

#[test]
fn a_delta_pull_fetches_the_index_and_a_few_ranges_and_falls_back_without_the_index() {
    if !privileged() {
        return;
    }
    with_newimg("delta-pull", 96, |sb, newimg| {
        use keel_tests::channel::{asked, publish};
        use keel_tests::nginx::Nginx;
        let w = world(sb, newimg, 1);
        let t1 = tree(sb, 0);
        let v1 = squash(sb, &t1);
        fs::copy(&v1, w.img.join("root-squashfs.img")).unwrap();
        let t2 = tree(sb, 1);
        let v2 = squash(sb, &t2);
        sign(sb, &v2, 2);
        let www = sb.fresh("www");
        let ch = www.join("ch");
        fs::create_dir_all(&ch).unwrap();
        let out = publish(&v2, &ch);
        assert!(out.contains(".chunks"), "{out}");
        let nginx = Nginx::start(&www, &sb.fresh("nginx"));
        let a = start(
            &w,
            &format!(
                "[pull]\nurl = {:?}\ninterval_secs = 1\njitter_secs = 0\ntimeout_secs = 5\n",
                nginx.url("ch")
            ),
        );
        let sha2 = sha256_file(&v2);
        wait_for(|| slot(&w).0.as_deref() == Some(sha2.as_str()));
        let img = format!("/ch/images/{sha2}");
        assert_eq!(asked(&nginx, &format!("{img}.chunks")), vec![200]);
        let ranges = asked(&nginx, &img);
        assert!(
            !ranges.is_empty() && ranges.len() <= 16 && ranges.iter().all(|&s| s == 206),
            "{ranges:?}"
        );
        let sent: u64 = nginx
            .requests()
            .iter()
            .filter(|(p, _, _)| *p == img)
            .map(|(_, _, b)| b)
            .sum();
        let size = fs::metadata(&v2).unwrap().len();
        assert!(sent < size / 4, "{sent} of {size} bytes fetched");
        let t = status(&a).last_transfer.unwrap();
        assert!(t.delta && t.how == "pull" && t.reused > size / 2, "{t:?}");

        // v3 with its index missing from the server: the whole image, once, with a 200.
        let t3 = tree(sb, 2);
        let v3 = squash(sb, &t3);
        sign(sb, &v3, 3);
        let side = sb.fresh("side");
        publish(&v3, &side);
        let sha3 = sha256_file(&v3);
        fs::rename(
            side.join("images").join(&sha3),
            ch.join("images").join(&sha3),
        )
        .unwrap();
        fs::rename(side.join("manifest.json"), ch.join("manifest.json")).unwrap();
        wait_for(|| slot(&w).0.as_deref() == Some(sha3.as_str()));
        assert_eq!(asked(&nginx, &format!("/ch/images/{sha3}")), vec![200]);
        assert_eq!(
            asked(&nginx, &format!("/ch/images/{sha3}.chunks")),
            vec![404]
        );
        assert!(a.log().contains("fetching the whole image"), "{}", a.log());
    });
}
