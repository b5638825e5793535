//! keel's dm-verity trees against the reference: `keelctl sign --verity` writes the bytes
//! `veritysetup format` writes for the same data, salt and UUID, `veritysetup verify` accepts
//! keel's images with the signed root hash, and refuses them after one flipped byte.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use keel_proto::manifest::{SignedManifest, MANIFEST_FORMAT_VERITY};
use keel_tests::{bin, run, sha256_file};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keel-verity-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn sign(d: &Path, image: &Path, version: u64) -> SignedManifest {
    let key = d.join("key.pem");
    if !key.exists() {
        run(Command::new(bin("keelctl")).arg("keygen").arg(&key));
    }
    run(Command::new(bin("keelctl"))
        .arg("sign")
        .arg(image)
        .arg("--key")
        .arg(&key)
        .args([
            "--name",
            "demo",
            "--version",
            &version.to_string(),
            "--verity",
        ]));
    let m = fs::read(image.with_extension("img.manifest")).unwrap();
    SignedManifest::from_json(&m).unwrap()
}

/// `veritysetup verify` with the manifest's root hash and offset: whether it accepts.
fn reference_verifies(image: &Path, m: &SignedManifest) -> bool {
    let v = m.manifest.verity.as_ref().unwrap();
    Command::new("veritysetup")
        .arg("verify")
        .arg(image)
        .arg(image)
        .arg(&v.root_hash)
        .arg(format!("--hash-offset={}", v.hash_offset))
        .output()
        .unwrap()
        .status
        .success()
}

/// The UUID of keel's superblock, as veritysetup spells it.
fn uuid_of(image: &Path, hash_offset: u64) -> String {
    let b = fs::read(image).unwrap();
    let off = usize::try_from(hash_offset).unwrap() + 16;
    let h = keel_proto::hex::encode(&b[off..off + 16]);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[test]
fn keel_trees_are_veritysetup_trees() {
    let d = dir("reference");
    // One block (no tree levels), one level, two levels, and a size that needs padding.
    for (i, size) in [4096usize, 128 * 4096, 300 * 4096, 1000 * 4096 + 123]
        .into_iter()
        .enumerate()
    {
        let image = d.join(format!("{i}.img"));
        let data: Vec<u8> = (0..size)
            .map(|j| u8::try_from((j * 31 + i) % 256).unwrap())
            .collect();
        fs::write(&image, &data).unwrap();
        let m = sign(&d, &image, 1);
        assert_eq!(m.manifest.format, MANIFEST_FORMAT_VERITY);
        let v = m.manifest.verity.clone().unwrap();
        assert_eq!(v.data_size, size.div_ceil(4096) as u64 * 4096);
        assert_eq!(m.manifest.size, fs::metadata(&image).unwrap().len());
        assert_eq!(m.manifest.sha256, sha256_file(&image));

        // The reference builds its tree over the same data with keel's salt and UUID.
        let reference = d.join(format!("{i}.ref"));
        let mut padded = data.clone();
        padded.resize(usize::try_from(v.data_size).unwrap(), 0);
        fs::write(&reference, &padded).unwrap();
        let out = run(Command::new("veritysetup")
            .arg("format")
            .arg(&reference)
            .arg(&reference)
            .arg(format!("--hash-offset={}", v.hash_offset))
            .arg(format!("--salt={}", v.salt))
            .arg(format!("--uuid={}", uuid_of(&image, v.hash_offset))));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let root = text
            .lines()
            .find_map(|l| l.strip_prefix("Root hash:"))
            .map(|r| r.trim().to_string())
            .unwrap_or_else(|| panic!("no root hash in {text}"));
        assert_eq!(root, v.root_hash, "size {size}");
        assert!(
            fs::read(&reference).unwrap() == fs::read(&image).unwrap(),
            "size {size}: keel's image differs from veritysetup's"
        );
        assert!(reference_verifies(&image, &m), "size {size}");
    }
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn signing_again_changes_nothing_and_a_flip_fails_the_reference() {
    let d = dir("again");
    let image = d.join("root.img");
    let data: Vec<u8> = (0..200 * 4096)
        .map(|j| u8::try_from(j % 251).unwrap())
        .collect();
    fs::write(&image, &data).unwrap();
    let first = sign(&d, &image, 1);
    let bytes = fs::read(&image).unwrap();
    // A second signature (a new version of the same bytes) reuses the tree and its salt.
    let second = sign(&d, &image, 2);
    assert_eq!(fs::read(&image).unwrap(), bytes);
    assert_eq!(first.manifest.verity, second.manifest.verity);
    assert_eq!(first.manifest.sha256, second.manifest.sha256);
    assert!(reference_verifies(&image, &second));
    // One flipped data byte: the reference refuses the signed root.
    let mut bad = bytes.clone();
    bad[4096 * 150 + 17] ^= 0x40;
    fs::write(&image, &bad).unwrap();
    assert!(!reference_verifies(&image, &second));
    fs::remove_dir_all(&d).unwrap();
}
