//! `keelctl build` against the reference: images made by `umoci` from directory trees whose
//! later layers delete, replace and make opaque what earlier ones added, built by keel into
//! squashfs (read back with `unsquashfs`) and erofs (mounted in the test's private mount
//! namespace), compared entry by entry — type, mode, owner, size, sha256, link target,
//! device number, hard-link count, mtime, xattrs — with `umoci unpack` of the same image.
//! Then layers no tool would make: each refused, naming the entry or blob, nothing written.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use keel_tests::agent::keelctl;
use keel_tests::oci::{self, umoci};
use keel_tests::registry::Registry;
use keel_tests::*;

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

fn mode(p: &Path, m: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
}

fn write(root: &Path, rel: &str, data: &str) -> PathBuf {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, data).unwrap();
    p
}

/// An image `img:t` in `dir` of three layers: a tree with every kind of entry; one that
/// deletes a file and a directory, turns a file into a directory and changes contents; and
/// a hand-made one whose opaque marker clears a directory (its own new file kept).
fn reference_image(dir: &Path) -> PathBuf {
    umoci(dir, &["init", "--layout", "img"]);
    umoci(dir, &["new", "--image", "img:t"]);
    umoci(dir, &["unpack", "--image", "img:t", "bundle"]);
    let r = dir.join("bundle/rootfs");
    let conf = write(&r, "etc/conf", "v1\n");
    rustix::fs::setxattr(&conf, "user.keel", b"one", rustix::fs::XattrFlags::empty()).unwrap();
    let app = write(&r, "bin/app", "#!/bin/sh\necho app\n");
    mode(&app, 0o4755);
    let home = r.join("home/user");
    write(&r, "home/user/secret", "s\n");
    mode(&home.join("secret"), 0o600);
    chown(&home.join("secret"), 1000, 1000);
    mode(&home, 0o700);
    chown(&home, 1000, 1000);
    write(&r, "usr/lib/libx.so", "elf\n");
    symlink("usr/lib", r.join("lib")).unwrap();
    symlink("/etc/conf", r.join("abs")).unwrap();
    chown(&r.join("abs"), 7, 7);
    write(&r, "data/a", "linked\n");
    fs::hard_link(r.join("data/a"), r.join("data/b")).unwrap();
    fs::create_dir_all(r.join("dev")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        r.join("dev/null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    fs::create_dir_all(r.join("run")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        r.join("run/fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o620),
        0,
    )
    .unwrap();
    write(&r, "gone/file", "bye\n");
    write(&r, "gone-dir/sub/deep", "bye\n");
    write(&r, "opq/old1", "old\n");
    write(&r, "opq/sub/old2", "old\n");
    write(&r, "tc", "a file, then a directory\n");
    fs::create_dir_all(r.join("empty")).unwrap();
    umoci(
        dir,
        &["repack", "--refresh-bundle", "--image", "img:t", "bundle"],
    );

    fs::remove_file(r.join("gone/file")).unwrap();
    fs::remove_dir_all(r.join("gone-dir")).unwrap();
    fs::remove_file(r.join("tc")).unwrap();
    write(&r, "tc/inside", "now a directory\n");
    write(&r, "etc/conf", "v2\n");
    write(&r, "new/deep/x", "x\n");
    umoci(
        dir,
        &["repack", "--refresh-bundle", "--image", "img:t", "bundle"],
    );

    // The opaque marker first, as the image spec asks, then the layer's own new file.
    let layer = oci::raw_tar(&[
        oci::raw_entry(b"opq/", b'5', b"", b""),
        oci::raw_entry(b"opq/.wh..wh..opq", b'0', b"", b""),
        oci::raw_entry(b"opq/new", b'0', b"", b"new\n"),
    ]);
    fs::write(dir.join("layer3.tar"), layer).unwrap();
    umoci(dir, &["raw", "add-layer", "--image", "img:t", "layer3.tar"]);
    dir.join("img")
}

fn build(from: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut a = vec!["build", "--from", from, "-o", out.to_str().unwrap()];
    a.extend(extra);
    keelctl(&a)
}

fn built(from: &str, out: &Path, extra: &[&str]) -> String {
    let o = build(from, out, extra);
    assert!(o.status.success(), "{o:?}");
    sha256_file(out)
}

/// The listing without what keel adds (`/etc/keel`).
fn listing_of_build(root: &Path) -> std::collections::BTreeMap<String, oci::Entry> {
    let mut l = oci::list(root);
    l.remove("etc/keel/image.json");
    l.remove("etc/keel");
    l
}

#[test]
fn built_images_match_umoci_unpack_entry_by_entry() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("build");
    let dir = sb.fresh("oci");
    fs::create_dir_all(&dir).unwrap();
    let img = reference_image(&dir);
    let from = format!("oci:{}:t", img.display());
    umoci(&dir, &["unpack", "--image", "img:t", "ref"]);
    let want = oci::list(&dir.join("ref/rootfs"));
    // What the layers did, seen in the reference itself (so the comparison means something).
    for gone in ["gone/file", "gone-dir", "opq/old1", "opq/sub"] {
        assert!(!want.contains_key(gone), "{gone} in umoci's tree");
    }
    assert_eq!(want["tc"].kind, 'd');
    assert_eq!(want["opq/new"].kind, 'f');
    assert_eq!(want["data/a"].nlink, 2);
    assert!(want.len() > 20, "{want:?}");

    // squashfs, read back by unsquashfs.
    let sq = sb.fresh("root").with_extension("squashfs");
    let o = build(&from, &sq, &["--json"]);
    assert!(o.status.success(), "{o:?}");
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["layers"], 3, "{j}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("layer 3/3"),
        "{o:?}"
    );
    let ext = sb.fresh("unsquashed");
    run(Command::new("unsquashfs")
        .args(["-q", "-n", "-d"])
        .arg(&ext)
        .arg(&sq));
    let got = listing_of_build(&ext);
    let d = oci::diff(&want, &got, true);
    assert!(
        d.is_empty(),
        "squashfs differs from umoci unpack:\n{}",
        d.join("\n")
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&fs::read(ext.join("etc/keel/image.json")).unwrap()).unwrap();
    assert!(cfg.is_object(), "{cfg}");

    // erofs, mounted here (a private mount namespace), all times fixed by mkfs.erofs 1.5.
    let ero = sb.fresh("root").with_extension("erofs");
    built(&from, &ero, &["--format", "erofs"]);
    let mnt = sb.fresh("mnt");
    fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-t", "erofs", "-o", "ro,loop"])
        .arg(&ero)
        .arg(&mnt));
    let got = listing_of_build(&mnt);
    run(Command::new("umount").arg(&mnt));
    let d = oci::diff(&want, &got, false);
    assert!(
        d.is_empty(),
        "erofs differs from umoci unpack:\n{}",
        d.join("\n")
    );

    // The same image with zstd layers (skopeo converts): the same tree.
    let z = dir.join("zimg");
    run(Command::new("skopeo")
        .args(["copy", "-q", "--dest-compress-format", "zstd"])
        .arg(format!("oci:{}:t", img.display()))
        .arg(format!("oci:{}:t", z.display())));
    let zs = sb.fresh("zroot").with_extension("squashfs");
    built(&format!("oci:{}:t", z.display()), &zs, &[]);
    let ext = sb.fresh("zunsquashed");
    run(Command::new("unsquashfs")
        .args(["-q", "-n", "-d"])
        .arg(&ext)
        .arg(&zs));
    let d = oci::diff(&want, &listing_of_build(&ext), true);
    assert!(d.is_empty(), "zstd layers differ:\n{}", d.join("\n"));
    sb.finish();
}

#[test]
fn builds_are_reproducible_signed_and_injected() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("build-repro");
    let dir = sb.fresh("oci");
    fs::create_dir_all(&dir).unwrap();
    let img = reference_image(&dir);
    let from = format!("oci:{}:t", img.display());
    for format in ["squashfs", "erofs"] {
        let a = built(&from, &sb.fresh("a"), &["--format", format]);
        let b = built(&from, &sb.fresh("b"), &["--format", format]);
        assert_eq!(a, b, "{format}: two builds of one image differ");
    }
    // An initramfs: reproducible too, keel-agent its /init; without an init, refused.
    let agent = bin("keel-agent");
    let ia = sb.fresh("a").with_extension("initramfs");
    let a = built(
        &from,
        &ia,
        &["--format", "initramfs", "--agent", agent.to_str().unwrap()],
    );
    let ib = sb.fresh("b").with_extension("initramfs");
    let b = built(
        &from,
        &ib,
        &["--format", "initramfs", "--agent", agent.to_str().unwrap()],
    );
    assert_eq!(a, b, "two initramfs builds differ");
    let list = run(Command::new("sh")
        .arg("-c")
        .arg(format!("zcat {} | cpio -itv --quiet", ia.display())));
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.contains("init -> usr/sbin/keel-agent"), "{list}");
    for want in [
        "data/a",
        "data/b",
        "dev/null",
        "opq/new",
        "etc/keel/image.json",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(want)),
            "{want} not in\n{list}"
        );
    }
    // zstd: reproducible, the same archive inside; not for a root image.
    let zargs = [
        "--format",
        "initramfs",
        "--compress",
        "zstd",
        "--agent",
        agent.to_str().unwrap(),
    ];
    let za = sb.fresh("za").with_extension("initramfs");
    let zb = sb.fresh("zb").with_extension("initramfs");
    assert_eq!(built(&from, &za, &zargs), built(&from, &zb, &zargs));
    assert_eq!(&fs::read(&za).unwrap()[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    let unz = |f: &Path, tool: &str| {
        run(Command::new("sh")
            .arg("-c")
            .arg(format!("{tool} -dc {} | sha256sum", f.display())))
        .stdout
    };
    assert_eq!(
        unz(&za, "zstd"),
        unz(&ia, "gzip"),
        "zstd and gzip archives differ"
    );
    let o = build(&from, &sb.fresh("z.squashfs"), &["--compress", "zstd"]);
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("--compress is for --format initramfs"),
        "{o:?}"
    );
    let o = build(
        &from,
        &sb.fresh("c").with_extension("initramfs"),
        &["--format", "initramfs"],
    );
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("add --agent"),
        "{o:?}"
    );
    let key = sb.fresh("key.pem");
    fs::write(&key, keel_proto::manifest::signing_key_to_pem(&test_key())).unwrap();
    let pubkey = sb.fresh("pub.pem");
    fs::write(
        &pubkey,
        keel_proto::manifest::public_key_to_pem(&test_key().verifying_key()),
    )
    .unwrap();
    let extra = sb.fresh("extra.txt");
    fs::write(&extra, "injected\n").unwrap();
    let out = sb.fresh("signed").with_extension("squashfs");
    let inject = format!("{}:/etc/keel/trusted.pem", pubkey.display());
    let inject2 = format!("{}:/opt/extra.txt", extra.display());
    built(
        &from,
        &out,
        &[
            "--agent",
            bin("keel-agent").to_str().unwrap(),
            "--inject",
            &inject,
            "--inject",
            &inject2,
            "--sign",
            key.to_str().unwrap(),
            "--name",
            "app",
            "--version",
            "3",
        ],
    );
    let v = keelctl(&[
        "verify",
        out.to_str().unwrap(),
        "--keys",
        pubkey.to_str().unwrap(),
    ]);
    assert!(v.status.success(), "{v:?}");
    let ext = sb.fresh("unsquashed");
    run(Command::new("unsquashfs")
        .args(["-q", "-n", "-d"])
        .arg(&ext)
        .arg(&out));
    let l = oci::list(&ext);
    assert_eq!(l["usr/sbin/keel-agent"].mode, 0o755);
    assert_eq!(
        l["usr/sbin/keel-agent"].sha256,
        sha256_file(&bin("keel-agent"))
    );
    assert_eq!(
        fs::read_to_string(ext.join("opt/extra.txt")).unwrap(),
        "injected\n"
    );
    assert_eq!(
        fs::read(ext.join("etc/keel/trusted.pem")).unwrap(),
        fs::read(&pubkey).unwrap()
    );
    sb.finish();
}

/// A layout of one gzip layer made of `entries`.
fn bad_layout(sb: &mut Sandbox, layers: &[Vec<Vec<u8>>]) -> String {
    let dir = sb.fresh("bad");
    fs::create_dir_all(&dir).unwrap();
    let blobs: Vec<(&str, Vec<u8>)> = layers
        .iter()
        .map(|l| {
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                oci::gzip(&dir, &oci::raw_tar(l)),
            )
        })
        .collect();
    oci::layout(&dir.join("img"), "t", &blobs);
    format!("oci:{}:t", dir.join("img").display())
}

/// Builds `from` into a fresh folder; asserts it failed naming `what` and wrote nothing.
fn refused(sb: &mut Sandbox, from: &str, what: &str) -> String {
    let outdir = sb.fresh("out");
    fs::create_dir_all(&outdir).unwrap();
    let o = build(from, &outdir.join("root.squashfs"), &[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{from}: built: {o:?}");
    assert!(err.contains(what), "{from}: {err}");
    let left: Vec<_> = fs::read_dir(&outdir).unwrap().collect();
    assert!(left.is_empty(), "{from}: left {left:?}");
    err
}

#[test]
fn malicious_and_broken_layers_are_refused_with_nothing_written() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("build-bad");
    let f = |name: &[u8]| oci::raw_entry(name, b'0', b"", b"x\n");
    let from = bad_layout(&mut sb, &[vec![f(b"ok"), f(b"../../escape")]]);
    refused(&mut sb, &from, "\"../../escape\"");
    let from = bad_layout(&mut sb, &[vec![f(b"/etc/keel-pwned")]]);
    refused(&mut sb, &from, "absolute path");
    assert!(!Path::new("/etc/keel-pwned").exists());
    // A symlink out of the tree, then a file through it (the same layer, and the next one).
    let outside = sb.fresh("outside");
    fs::create_dir_all(&outside).unwrap();
    let link = oci::raw_entry(b"evil", b'2', outside.to_str().unwrap().as_bytes(), b"");
    let rel = oci::raw_entry(b"up", b'2', b"../../../../../../../..", b"");
    let from = bad_layout(&mut sb, &[vec![link.clone(), f(b"evil/pwned")]]);
    refused(&mut sb, &from, "\"evil/pwned\"");
    let from = bad_layout(&mut sb, &[vec![rel], vec![f(b"up/tmp/pwned")]]);
    refused(&mut sb, &from, "leaves the tree");
    let from = bad_layout(&mut sb, &[vec![link], vec![f(b"evil/pwned")]]);
    let err = refused(&mut sb, &from, "leaves the tree");
    assert!(err.contains("evil/pwned"), "{err}");
    assert!(!outside.join("pwned").exists());
    // A hard link to a file outside the tree.
    let hl = oci::raw_entry(b"h", b'1', b"../../../etc/passwd", b"");
    let from = bad_layout(&mut sb, &[vec![hl]]);
    refused(&mut sb, &from, "hard link target");

    // A truncated gzip layer whose digest matches its (truncated) bytes.
    let dir = sb.fresh("trunc");
    fs::create_dir_all(&dir).unwrap();
    let big: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let mut gz = oci::gzip(
        &dir,
        &oci::raw_tar(&[oci::raw_entry(b"big", b'0', b"", &big)]),
    );
    gz.truncate(gz.len() / 2);
    oci::layout(
        &dir.join("img"),
        "t",
        &[("application/vnd.oci.image.layer.v1.tar+gzip", gz)],
    );
    refused(
        &mut sb,
        &format!("oci:{}:t", dir.join("img").display()),
        "truncated or corrupt",
    );

    // A layer blob changed after its manifest was written.
    let from = bad_layout(&mut sb, &[vec![f(b"fine")]]);
    let blobs =
        PathBuf::from(from.trim_start_matches("oci:").trim_end_matches(":t")).join("blobs/sha256");
    let layer_blob = fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| fs::read(p).unwrap().starts_with(&[0x1f, 0x8b]))
        .unwrap();
    let mut b = fs::read(&layer_blob).unwrap();
    let n = b.len();
    b[n - 5] ^= 0xff;
    fs::write(&layer_blob, b).unwrap();
    refused(&mut sb, &from, "corrupt or tampered");

    // A reference to a tag the layout does not have, and a platform it does not have.
    let from = bad_layout(&mut sb, &[vec![f(b"fine")]]);
    refused(
        &mut sb,
        &from.replace(":t", ":nope"),
        "no image tagged \"nope\"",
    );
    sb.finish();
}

#[test]
fn built_from_a_registry_as_from_its_layout() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("build-registry");
    let dir = sb.fresh("oci");
    fs::create_dir_all(&dir).unwrap();
    let img = reference_image(&dir);
    let layout = format!("oci:{}:t", img.display());
    let want = built(&layout, &sb.fresh("layout"), &[]);

    // Anonymous: by tag, by digest, and with the layers recompressed as zstd.
    let reg = Registry::start(&sb.fresh("registry"), None);
    reg.push(&layout, "keel/app:t", &[]);
    reg.push(&layout, "keel/app:z", &["--dest-compress-format", "zstd"]);
    let by_tag = format!("docker://{}/keel/app:t", reg.host);
    assert_eq!(built(&by_tag, &sb.fresh("tag"), &["--insecure"]), want);
    let inspect = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(&by_tag)
        .output()
        .unwrap();
    let digest = serde_json::from_slice::<serde_json::Value>(&inspect.stdout).unwrap()["Digest"]
        .as_str()
        .unwrap()
        .to_string();
    let by_digest = format!("docker://{}/keel/app@{digest}", reg.host);
    assert_eq!(
        built(&by_digest, &sb.fresh("digest"), &["--insecure"]),
        want
    );
    let z = format!("docker://{}/keel/app:z", reg.host);
    assert_eq!(built(&z, &sb.fresh("zstd"), &["--insecure"]), want);
    let outdir = sb.fresh("out");
    fs::create_dir_all(&outdir).unwrap();
    let o = build(
        &format!("docker://{}/keel/app:nope", reg.host),
        &outdir.join("r.squashfs"),
        &["--insecure"],
    );
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("HTTP 404"),
        "{o:?}"
    );
    assert_eq!(fs::read_dir(&outdir).unwrap().count(), 0);

    // Basic auth: refused without or with wrong credentials, built with them.
    let private = Registry::start(&sb.fresh("private"), Some("keel:s3cret"));
    private.push(&layout, "keel/app:t", &[]);
    let from = format!("docker://{}/keel/app:t", private.host);
    let o = build(&from, &outdir.join("r.squashfs"), &["--insecure"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--creds"), "{err}");
    let o = build(
        &from,
        &outdir.join("r.squashfs"),
        &["--insecure", "--creds", "keel:wrong"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("HTTP 401"), "{err}");
    assert_eq!(fs::read_dir(&outdir).unwrap().count(), 0);
    assert_eq!(
        built(
            &from,
            &sb.fresh("private"),
            &["--insecure", "--creds", "keel:s3cret"]
        ),
        want
    );

    // Token auth: the registry's challenge names the realm; without credentials the realm
    // says 401 and keelctl says so; with them the token it hands out is what the registry
    // checks (signature, issuer, audience, expiry, access to keel/app).
    let tok = Registry::start_token(&sb.fresh("token"), "keel:t0ken", "keel/app");
    tok.push(&layout, "keel/app:t", &[]);
    let from = format!("docker://{}/keel/app:t", tok.host);
    let o = build(&from, &outdir.join("r.squashfs"), &["--insecure"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("token request: HTTP 401"),
        "{err}"
    );
    let o = build(
        &from,
        &outdir.join("r.squashfs"),
        &["--insecure", "--creds", "keel:wrong"],
    );
    assert!(!o.status.success(), "{o:?}");
    assert_eq!(fs::read_dir(&outdir).unwrap().count(), 0);
    assert_eq!(
        built(
            &from,
            &sb.fresh("token-built"),
            &["--insecure", "--creds", "keel:t0ken"]
        ),
        want
    );
    let realm = tok.realm.as_ref().unwrap();
    let asked: Vec<_> = realm
        .requests()
        .into_iter()
        .filter(|r| r.1 == 200)
        .collect();
    assert!(
        asked.iter().any(|r| r
            .0
            .contains("/token?service=keel-registry&scope=repository%3Akeel%2Fapp%3Apull")),
        "{asked:?}"
    );
    sb.finish();
}

/// `skopeo copy oci:… docker-archive:…` of the reference image, built as from its layout;
/// the legacy `<id>/layer.tar` symlinks followed inside the archive; a corrupt layer and a
/// missing one refused with nothing written.
#[test]
fn built_from_a_docker_archive_as_from_its_layout() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("build-archive");
    let dir = sb.fresh("oci");
    fs::create_dir_all(&dir).unwrap();
    let img = reference_image(&dir);
    let layout = format!("oci:{}:t", img.display());
    let want = built(&layout, &sb.fresh("layout"), &[]);
    let tar = dir.join("app.tar");
    let out = Command::new("skopeo")
        .args(["copy", "-q", &layout])
        .arg(format!("docker-archive:{}:keel/app:t", tar.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo copy: {out:?}");
    let from = format!("docker-archive:{}", tar.display());
    assert_eq!(built(&from, &sb.fresh("archive"), &[]), want);
    let o = build(&from, &sb.fresh("json.squashfs"), &["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["layers"], 3, "{v}");
    assert!(v["image"].as_str().unwrap().starts_with("sha256:"), "{v}");

    // The same archive with manifest.json naming each layer by its legacy symlink.
    let x = sb.fresh("x");
    fs::create_dir_all(&x).unwrap();
    run(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&x));
    let mut m: serde_json::Value =
        serde_json::from_slice(&fs::read(x.join("manifest.json")).unwrap()).unwrap();
    let mut links = Vec::new();
    for e in fs::read_dir(&x).unwrap() {
        let p = e.unwrap().path().join("layer.tar");
        if let Ok(t) = fs::read_link(&p) {
            links.push((t.file_name().unwrap().to_string_lossy().into_owned(), p));
        }
    }
    for l in m[0]["Layers"].as_array_mut().unwrap() {
        let (_, p) = links
            .iter()
            .find(|(t, _)| t == l.as_str().unwrap())
            .unwrap();
        *l = p
            .strip_prefix(&x)
            .unwrap()
            .to_string_lossy()
            .into_owned()
            .into();
    }
    assert_eq!(links.len(), 3);
    fs::write(x.join("manifest.json"), m.to_string()).unwrap();
    let legacy = dir.join("legacy.tar");
    run(Command::new("tar")
        .arg("-cf")
        .arg(&legacy)
        .arg("-C")
        .arg(&x)
        .arg("."));
    assert_eq!(
        built(
            &format!("docker-archive:{}", legacy.display()),
            &sb.fresh("legacy"),
            &[]
        ),
        want
    );

    // A flipped byte in the last layer's data; a layer the manifest names that is not there.
    let layer = links[0]
        .1
        .parent()
        .unwrap()
        .join(fs::read_link(&links[0].1).unwrap());
    let mut bytes = fs::read(&layer).unwrap();
    bytes[600] ^= 1;
    fs::write(&layer, bytes).unwrap();
    let corrupt = dir.join("corrupt.tar");
    run(Command::new("tar")
        .arg("-cf")
        .arg(&corrupt)
        .arg("-C")
        .arg(&x)
        .arg("."));
    refused(
        &mut sb,
        &format!("docker-archive:{}", corrupt.display()),
        "the config's rootfs.diff_ids",
    );
    fs::remove_file(&layer).unwrap();
    let missing = dir.join("missing.tar");
    run(Command::new("tar")
        .arg("-cf")
        .arg(&missing)
        .arg("-C")
        .arg(&x)
        .arg("."));
    refused(
        &mut sb,
        &format!("docker-archive:{}", missing.display()),
        "not in the archive",
    );
    refused(
        &mut sb,
        &format!("docker-archive:{}", img.display()),
        "not a regular file",
    );
    sb.finish();
}

#[test]
fn a_factory_disk_from_a_built_image_boots_it() {
    if !privileged() {
        return;
    }
    let mut sb = Sandbox::new("disk-create");
    let root = sb.rootfs(1);
    let key = sb.fresh("key.pem");
    fs::write(&key, keel_proto::manifest::signing_key_to_pem(&test_key())).unwrap();
    let img = sb.fresh("v1").with_extension("squashfs");
    let from = format!("dir:{}", root.display());
    built(
        &from,
        &img,
        &[
            "--sign",
            key.to_str().unwrap(),
            "--name",
            "demo",
            "--version",
            "1",
        ],
    );
    let boot = sb.fresh("boot");
    fs::create_dir_all(&boot).unwrap();
    fs::write(boot.join("vmlinuz"), b"not really a kernel").unwrap();
    let disk = sb.fresh("disk").with_extension("img");
    let o = keelctl(&[
        "disk",
        "create",
        disk.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--boot",
        boot.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{o:?}");
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let labels: Vec<&str> = j["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["img", "overlay", "newimg", "boot"], "{j}");
    // Sparse: far fewer blocks than its length.
    let m = fs::metadata(&disk).unwrap();
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&m) * 512 < m.len() / 2,
        "{m:?}"
    );
    let d = sb.attach_gpt(&disk);
    let r = sb.prepare(&d, "console=ttyS0");
    assert_eq!((r.booted.name.as_str(), r.booted.version), ("demo", 1));
    assert!(
        r.actions[0].contains("adopted demo version 1"),
        "{:?}",
        r.actions
    );
    assert_eq!(sb.booted_version(), 1);
    let roles: Vec<&str> = r.partitions.iter().map(|p| p.role.as_str()).collect();
    assert!(roles.contains(&"boot"), "{roles:?}");

    // An image that is not its manifest's, and sizes that cannot work: refused, no disk.
    fs::write(&img, b"other bytes").unwrap();
    let bad = sb.fresh("bad").with_extension("img");
    let o = keelctl(&[
        "disk",
        "create",
        bad.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("is not the image"),
        "{o:?}"
    );
    assert!(!bad.exists());
    sb.finish();
}
