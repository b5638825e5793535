//! Signing interop with OpenSSL: keys from `openssl genpkey -algorithm ed25519`, signatures
//! from `openssl pkeyutl -sign -rawin` verify in keel; keel's signatures verify in OpenSSL;
//! a flipped byte verifies in neither.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use keel_proto::manifest::{
    public_key_to_pem, public_keys_from_pem, signing_key_from_pem, Manifest, SignedManifest,
    MANIFEST_FORMAT,
};
use keel_tests::{bin, run, test_key};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keel-openssl-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn openssl_key(d: &Path) -> (PathBuf, PathBuf) {
    let key = d.join("key.pem");
    let public = d.join("pub.pem");
    run(Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key));
    run(Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public));
    (key, public)
}

fn manifest() -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        name: "demo".into(),
        version: 7,
        size: 1234,
        sha256: "5a".repeat(32),
        created: 1_700_000_000,
        min_version: Some(3),
        verity: None,
    }
}

#[test]
fn openssl_signature_verifies_and_a_flipped_one_does_not() {
    let d = dir("sig");
    let (key, public) = openssl_key(&d);
    let m = manifest();
    let canon = d.join("canonical");
    fs::write(&canon, m.canonical_bytes()).unwrap();
    let sig = d.join("sig.bin");
    run(Command::new("openssl")
        .args(["pkeyutl", "-sign", "-rawin", "-inkey"])
        .arg(&key)
        .arg("-in")
        .arg(&canon)
        .arg("-out")
        .arg(&sig));
    let raw = fs::read(&sig).unwrap();
    assert_eq!(raw.len(), 64);
    let keys = public_keys_from_pem(&fs::read_to_string(&public).unwrap()).unwrap();
    let signed = SignedManifest::with_raw_signature(m.clone(), &raw).unwrap();
    signed.verify(&keys).expect("openssl signature verifies");

    // Every single flipped bit of the signature is refused.
    for i in [0, 31, 32, 63] {
        let mut bad = raw.clone();
        bad[i] ^= 0x01;
        let s = SignedManifest::with_raw_signature(m.clone(), &bad).unwrap();
        assert!(s.verify(&keys).is_err(), "flipped byte {i} verified");
    }
    // So is a changed manifest under the original signature.
    let mut changed = m.clone();
    changed.version = 8;
    let s = SignedManifest::with_raw_signature(changed, &raw).unwrap();
    assert!(s.verify(&keys).is_err());

    // Rotation: a file with two public keys accepts signatures of either.
    let both = format!(
        "{}{}",
        fs::read_to_string(&public).unwrap(),
        public_key_to_pem(&test_key().verifying_key())
    );
    let two = public_keys_from_pem(&both).unwrap();
    assert_eq!(two.len(), 2);
    signed.verify(&two).unwrap();
    m.clone().sign(&test_key()).verify(&two).unwrap();
    // The private key loads in keel too.
    let sk = signing_key_from_pem(&fs::read_to_string(&key).unwrap()).unwrap();
    assert_eq!(sk.verifying_key(), keys[0]);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn keelctl_signs_with_an_openssl_key_and_openssl_verifies_it() {
    let d = dir("keelctl");
    let (key, public) = openssl_key(&d);
    let image = d.join("image.img");
    fs::write(&image, vec![0x5au8; 100_000]).unwrap();
    let keelctl = bin("keelctl");
    run(Command::new(&keelctl)
        .arg("sign")
        .arg(&image)
        .arg("--key")
        .arg(&key)
        .args(["--name", "demo", "--version", "3"]));
    let out = run(Command::new(&keelctl)
        .arg("verify")
        .arg(&image)
        .arg("--keys")
        .arg(&public));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok:"));

    // OpenSSL verifies keel's signature over the canonical bytes.
    let signed =
        SignedManifest::from_json(&fs::read(d.join("image.img.manifest")).unwrap()).unwrap();
    fs::write(d.join("canonical"), signed.manifest.canonical_bytes()).unwrap();
    let raw = keel_proto::hex::decode::<64>(&signed.signature).unwrap();
    fs::write(d.join("sig.bin"), raw).unwrap();
    let verify = |sigfile: &str| {
        Command::new("openssl")
            .args(["pkeyutl", "-verify", "-rawin", "-pubin", "-inkey"])
            .arg(&public)
            .arg("-sigfile")
            .arg(d.join(sigfile))
            .arg("-in")
            .arg(d.join("canonical"))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(verify("sig.bin"));
    let mut bad = raw;
    bad[10] ^= 0x80;
    fs::write(d.join("bad.bin"), bad).unwrap();
    assert!(!verify("bad.bin"));

    // A modified image fails keelctl verify with the reason.
    fs::write(&image, vec![0x5bu8; 100_000]).unwrap();
    let out = Command::new(&keelctl)
        .arg("verify")
        .arg(&image)
        .arg("--keys")
        .arg(&public)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("hashes to"));
    let _ = fs::remove_dir_all(&d);
}
