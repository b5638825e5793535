//! The signed image manifest.
//!
//! A manifest names an image (`name`), its monotonic integer `version`, its exact `size` and
//! `sha256`. What is signed is [`Manifest::canonical_bytes`], a fixed line-based text, so a
//! user can sign it with `openssl pkeyutl -sign -rawin` in their own CI. The signature is a
//! detached ed25519 signature; keys are the PEM files `openssl genpkey -algorithm ed25519`
//! makes (PKCS#8 private, SPKI public). Several trusted keys may be configured (rotation).
//!
//! Format 2 adds [`VerityInfo`]: the image carries a dm-verity tree after its data, and the
//! tree's root hash, salt and layout are signed with the rest, so every block the device
//! reads is checked against the signing key. Format 1 stays accepted.

use ed25519_dalek::pkcs8::DecodePrivateKey;
use ed25519_dalek::{Signature, Signer};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::hex;

/// The manifest format of an image without a verity tree.
pub const MANIFEST_FORMAT: u32 = 1;
/// The manifest format of an image that carries a dm-verity tree ([`Manifest::verity`]).
pub const MANIFEST_FORMAT_VERITY: u32 = 2;
/// The first line of the canonical encoding.
const CANONICAL_MAGIC: &str = "keel-manifest";
/// Longest product name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Why a manifest or key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The JSON did not parse.
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    /// The format version is not one this build knows.
    #[error(
        "manifest format {found} is not supported (this build reads formats {MANIFEST_FORMAT} and {MANIFEST_FORMAT_VERITY})"
    )]
    Format {
        /// Format found in the manifest.
        found: u32,
    },
    /// The name has characters outside `[A-Za-z0-9._-]` or is too long.
    #[error("manifest name {0:?} is not 1-64 characters of A-Z a-z 0-9 . _ -")]
    Name(String),
    /// The digest is not 64 hex digits.
    #[error("manifest sha256 {0:?} is not 64 hex digits")]
    Digest(String),
    /// The signature is not 128 hex digits.
    #[error("signature is not 128 hex digits")]
    SignatureEncoding,
    /// No trusted key verifies the signature.
    #[error("signature does not verify with any of the {keys} trusted key(s)")]
    BadSignature {
        /// How many keys were tried.
        keys: usize,
    },
    /// No trusted keys are configured.
    #[error("no trusted keys are configured")]
    NoKeys,
    /// A PEM key did not parse.
    #[error("key is not an ed25519 {kind} key in PEM form: {detail}")]
    Key {
        /// "public" or "private".
        kind: &'static str,
        /// The parser's message.
        detail: String,
    },
    /// The verity fields are missing, unexpected, or describe a layout that cannot be.
    #[error("manifest verity: {0}")]
    Verity(String),
    /// `min_version` is above `version`.
    #[error("min_version {min} is above version {version}")]
    MinVersion {
        /// The manifest's min_version.
        min: u64,
        /// The manifest's version.
        version: u64,
    },
}

/// An image manifest: what is signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format, [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Product name; a device accepts only images of its own name.
    pub name: String,
    /// Monotonic image version: a device accepts only higher versions.
    pub version: u64,
    /// Exact image size in bytes.
    pub size: u64,
    /// SHA-256 of the image, lower-case hex.
    pub sha256: String,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// If set, a device must run at least this version to install the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<u64>,
    /// The image's dm-verity tree (format 2 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<VerityInfo>,
}

/// Where an image's dm-verity tree is and what it hashes to (SHA-256, 4 KiB blocks, format
/// 1 of the kernel's `verity` target, the superblock `veritysetup` writes at `hash_offset`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerityInfo {
    /// Bytes of filesystem data the tree covers, from the image's start.
    pub data_size: u64,
    /// Offset of the verity superblock; the tree follows it, top level first.
    pub hash_offset: u64,
    /// The salt, hex.
    pub salt: String,
    /// The root hash, lower-case hex.
    pub root_hash: String,
}

impl VerityInfo {
    /// The salt's bytes (`None` when it is not hex).
    pub fn salt_bytes(&self) -> Option<Vec<u8>> {
        hex::decode_vec(&self.salt)
    }

    /// What a stream check of the `size`-byte image expects (after [`Manifest::validate`]).
    pub fn expected(&self, size: u64) -> Option<keel_verity::check::Expected> {
        Some(keel_verity::check::Expected {
            data_size: self.data_size,
            hash_offset: self.hash_offset,
            salt: self.salt_bytes()?,
            root: hex::decode::<32>(&self.root_hash)?,
            image_size: size,
        })
    }

    fn validate(&self, size: u64) -> Result<(), ManifestError> {
        let bad = |s: String| ManifestError::Verity(s);
        match self.salt_bytes() {
            Some(s) if !s.is_empty() && s.len() <= keel_verity::MAX_SALT_LEN => {}
            _ => {
                return Err(bad(format!(
                    "salt {:?} is not 1-256 bytes of hex",
                    self.salt
                )))
            }
        }
        if hex::decode::<32>(&self.root_hash).is_none() {
            return Err(bad(format!(
                "root hash {:?} is not 64 hex digits",
                self.root_hash
            )));
        }
        keel_verity::Geometry::new(self.data_size)
            .and_then(|g| g.check_layout(self.hash_offset, size))
            .map_err(|e| bad(e.to_string()))
    }
}

/// A manifest with its detached signature, as stored next to a staged image and sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// The manifest.
    pub manifest: Manifest,
    /// ed25519 signature over [`Manifest::canonical_bytes`], 128 hex digits.
    pub signature: String,
    /// The image's chunk index, signed apart ([`crate::chunks`]): what delta updates use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<crate::chunks::ChunkRef>,
}

impl Manifest {
    /// Checks the fields that have rules of their own (name, digest, min_version, format).
    pub fn validate(&self) -> Result<(), ManifestError> {
        match (self.format, &self.verity) {
            (MANIFEST_FORMAT, None) => {}
            (MANIFEST_FORMAT, Some(_)) => {
                return Err(ManifestError::Verity(format!(
                    "format {MANIFEST_FORMAT} has no verity fields (format {MANIFEST_FORMAT_VERITY} does)"
                )))
            }
            (MANIFEST_FORMAT_VERITY, None) => {
                return Err(ManifestError::Verity(format!(
                    "format {MANIFEST_FORMAT_VERITY} needs the verity fields"
                )))
            }
            (MANIFEST_FORMAT_VERITY, Some(v)) => v.validate(self.size)?,
            (found, _) => return Err(ManifestError::Format { found }),
        }
        if self.name.is_empty()
            || self.name.len() > MAX_NAME_LEN
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(ManifestError::Name(self.name.clone()));
        }
        if hex::decode::<32>(&self.sha256).is_none() {
            return Err(ManifestError::Digest(self.sha256.clone()));
        }
        if let Some(min) = self.min_version {
            if min > self.version {
                return Err(ManifestError::MinVersion {
                    min,
                    version: self.version,
                });
            }
        }
        Ok(())
    }

    /// The digest as bytes (after [`Manifest::validate`], never `None`).
    pub fn digest(&self) -> Option<[u8; 32]> {
        hex::decode::<32>(&self.sha256)
    }

    /// The exact bytes that are signed: one `key value` pair a line, fixed order, `\n` endings
    /// (format 2 appends the four `verity-*` lines).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let min = self
            .min_version
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".to_string());
        let verity = self.verity.as_ref().map_or_else(String::new, |v| {
            format!(
                "verity-data-size {}\nverity-hash-offset {}\nverity-salt {}\nverity-root {}\n",
                v.data_size,
                v.hash_offset,
                v.salt.to_ascii_lowercase(),
                v.root_hash.to_ascii_lowercase()
            )
        });
        format!(
            "{CANONICAL_MAGIC} {}\nname {}\nversion {}\nsize {}\nsha256 {}\ncreated {}\nmin-version {}\n",
            self.format,
            self.name,
            self.version,
            self.size,
            self.sha256.to_ascii_lowercase(),
            self.created,
            min
        )
        .into_bytes()
        .into_iter()
        .chain(verity.into_bytes())
        .collect()
    }

    /// Signs the manifest with `key`.
    pub fn sign(self, key: &SigningKey) -> SignedManifest {
        let sig = key.sign(&self.canonical_bytes());
        SignedManifest {
            manifest: self,
            signature: hex::encode(&sig.to_bytes()),
            chunks: None,
        }
    }
}

impl SignedManifest {
    /// Attaches a raw 64-byte signature (as `openssl pkeyutl -sign -rawin` writes it).
    pub fn with_raw_signature(manifest: Manifest, sig: &[u8]) -> Result<Self, ManifestError> {
        if sig.len() != 64 {
            return Err(ManifestError::SignatureEncoding);
        }
        Ok(SignedManifest {
            manifest,
            signature: hex::encode(sig),
            chunks: None,
        })
    }

    /// Parses the JSON form and validates the manifest's fields (not the signature).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        let m: SignedManifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        m.manifest.validate()?;
        Ok(m)
    }

    /// The JSON form, pretty-printed, newline-terminated.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serializes");
        v.push(b'\n');
        v
    }

    /// Verifies the signature against any of `keys` (strict ed25519) and the manifest's rules.
    pub fn verify(&self, keys: &[VerifyingKey]) -> Result<&Manifest, ManifestError> {
        self.manifest.validate()?;
        if keys.is_empty() {
            return Err(ManifestError::NoKeys);
        }
        let raw = hex::decode::<64>(&self.signature).ok_or(ManifestError::SignatureEncoding)?;
        let sig = Signature::from_bytes(&raw);
        let msg = self.manifest.canonical_bytes();
        if keys.iter().any(|k| k.verify_strict(&msg, &sig).is_ok()) {
            Ok(&self.manifest)
        } else {
            Err(ManifestError::BadSignature { keys: keys.len() })
        }
    }
}

/// The DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID
/// 1.3.101.112 }, BIT STRING (0 unused bits) } before the 32 key bytes. The encoding is fixed,
/// so a byte comparison decodes it (no DER parser linked into initstage).
const SPKI_ED25519_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The ed25519 key in the base64 body of one PEM `PUBLIC KEY` block.
fn spki_ed25519(body: &str) -> Result<VerifyingKey, String> {
    use base64ct::Encoding;
    let b64: String = body.split_ascii_whitespace().collect();
    let mut der = [0u8; 45];
    let der = base64ct::Base64::decode(&b64, &mut der)
        .map_err(|e| format!("not an ed25519 public key (base64: {e})"))?;
    let raw = der
        .strip_prefix(&SPKI_ED25519_PREFIX)
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| {
            format!(
                "not an ed25519 public key ({} DER bytes, expected the 44 of an ed25519 \
                 SubjectPublicKeyInfo)",
                der.len()
            )
        })?;
    VerifyingKey::from_bytes(&raw).map_err(|e| format!("not an ed25519 public key ({e})"))
}

/// Parses every `-----BEGIN PUBLIC KEY-----` block in `pem` (one file may hold several keys).
pub fn public_keys_from_pem(pem: &str) -> Result<Vec<VerifyingKey>, ManifestError> {
    const BEGIN: &str = "-----BEGIN ";
    const KEY_BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
    const END: &str = "-----END PUBLIC KEY-----";
    let mut keys = Vec::new();
    let mut rest = pem;
    let mut n = 0usize;
    // Every PEM block must be an ed25519 public key: one bad block refuses the whole file
    // (a device must never fall back to fewer checks than its owner configured).
    while let Some(start) = rest.find(BEGIN) {
        n += 1;
        let line = pem[..pem.len() - rest.len() + start].lines().count() + 1;
        let bad = |detail: String| ManifestError::Key {
            kind: "public",
            detail: format!("PEM block {n} (line {line}): {detail}"),
        };
        let after = &rest[start..];
        if !after.starts_with(KEY_BEGIN) {
            let label = after.lines().next().unwrap_or_default();
            return Err(bad(format!(
                "{label} is not an ed25519 public key (expected {KEY_BEGIN})"
            )));
        }
        let end = after
            .find(END)
            .ok_or_else(|| bad("unterminated PEM block".into()))?
            + END.len();
        let block = &after[..end];
        keys.push(spki_ed25519(&block[KEY_BEGIN.len()..block.len() - END.len()]).map_err(bad)?);
        rest = &after[end..];
    }
    if keys.is_empty() {
        return Err(ManifestError::Key {
            kind: "public",
            detail: "no PUBLIC KEY block found".into(),
        });
    }
    Ok(keys)
}

/// Parses a PKCS#8 `-----BEGIN PRIVATE KEY-----` ed25519 key.
pub fn signing_key_from_pem(pem: &str) -> Result<SigningKey, ManifestError> {
    SigningKey::from_pkcs8_pem(pem).map_err(|e| ManifestError::Key {
        kind: "private",
        detail: e.to_string(),
    })
}

/// The PKCS#8 PEM form of a private key (what `openssl genpkey -algorithm ed25519` writes).
pub fn signing_key_to_pem(key: &SigningKey) -> String {
    use ed25519_dalek::pkcs8::{spki::der::pem::LineEnding, EncodePrivateKey};
    key.to_pkcs8_pem(LineEnding::LF)
        .expect("ed25519 keys encode")
        .to_string()
}

/// The SPKI PEM form of a public key (what `openssl pkey -pubout` writes).
pub fn public_key_to_pem(key: &VerifyingKey) -> String {
    use ed25519_dalek::pkcs8::{spki::der::pem::LineEnding, EncodePublicKey};
    key.to_public_key_pem(LineEnding::LF)
        .expect("ed25519 keys encode")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip() {
        let k = SigningKey::from_bytes(&[5; 32]);
        let back = signing_key_from_pem(&signing_key_to_pem(&k)).unwrap();
        assert_eq!(back.to_bytes(), k.to_bytes());
        let pubs = public_keys_from_pem(&public_key_to_pem(&k.verifying_key())).unwrap();
        assert_eq!(pubs, vec![k.verifying_key()]);
    }

    fn sample() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            name: "demo".into(),
            version: 2,
            size: 4096,
            sha256: "ab".repeat(32),
            created: 1_700_000_000,
            min_version: None,
            verity: None,
        }
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn canonical_bytes_are_stable() {
        let text = String::from_utf8(sample().canonical_bytes()).unwrap();
        assert_eq!(
            text,
            format!(
                "keel-manifest 1\nname demo\nversion 2\nsize 4096\nsha256 {}\ncreated 1700000000\nmin-version -\n",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn sign_verify_and_tamper() {
        let k = key(7);
        let signed = sample().sign(&k);
        assert!(signed.verify(&[k.verifying_key()]).is_ok());
        // Rotation: any trusted key may verify.
        assert!(signed
            .verify(&[key(1).verifying_key(), k.verifying_key()])
            .is_ok());
        assert_eq!(
            signed.verify(&[key(1).verifying_key()]),
            Err(ManifestError::BadSignature { keys: 1 })
        );
        let mut tampered = signed.clone();
        tampered.manifest.version = 3;
        assert!(matches!(
            tampered.verify(&[k.verifying_key()]),
            Err(ManifestError::BadSignature { .. })
        ));
        let mut flipped = signed.clone();
        let c = if flipped.signature.starts_with('0') {
            "1"
        } else {
            "0"
        };
        flipped.signature.replace_range(0..1, c);
        assert!(flipped.verify(&[k.verifying_key()]).is_err());
        assert_eq!(signed.verify(&[]), Err(ManifestError::NoKeys));
    }

    #[test]
    fn json_round_trip_and_validation() {
        let signed = sample().sign(&key(3));
        let back = SignedManifest::from_json(&signed.to_json()).unwrap();
        assert_eq!(back, signed);
        let mut bad = sample();
        bad.name = "a b".into();
        assert!(matches!(bad.validate(), Err(ManifestError::Name(_))));
        let mut bad = sample();
        bad.sha256 = "xyz".into();
        assert!(matches!(bad.validate(), Err(ManifestError::Digest(_))));
        let mut bad = sample();
        bad.format = 9;
        assert_eq!(bad.validate(), Err(ManifestError::Format { found: 9 }));
        let mut bad = sample();
        bad.min_version = Some(5);
        assert!(matches!(
            bad.validate(),
            Err(ManifestError::MinVersion { .. })
        ));
        assert!(matches!(
            SignedManifest::from_json(b"{not json"),
            Err(ManifestError::Json(_))
        ));
    }

    fn verity_sample() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT_VERITY,
            size: 305 * 4096,
            verity: Some(VerityInfo {
                data_size: 300 * 4096,
                hash_offset: 300 * 4096,
                salt: "11".repeat(32),
                root_hash: "CD".repeat(32),
            }),
            ..sample()
        }
    }

    #[test]
    fn verity_fields_are_signed_and_checked() {
        let m = verity_sample();
        m.validate().unwrap();
        let text = String::from_utf8(m.canonical_bytes()).unwrap();
        assert!(text.starts_with("keel-manifest 2\n"), "{text}");
        assert!(
            text.ends_with(&format!(
                "min-version -\nverity-data-size 1228800\nverity-hash-offset 1228800\nverity-salt {}\nverity-root {}\n",
                "11".repeat(32),
                "cd".repeat(32)
            )),
            "{text}"
        );
        let k = key(4);
        let signed = m.clone().sign(&k);
        let back = SignedManifest::from_json(&signed.to_json()).unwrap();
        assert!(back.verify(&[k.verifying_key()]).is_ok());
        let mut t = signed.clone();
        t.manifest.verity.as_mut().unwrap().root_hash = "ab".repeat(32);
        assert!(matches!(
            t.verify(&[k.verifying_key()]),
            Err(ManifestError::BadSignature { .. })
        ));
        // Formats and fields must agree; the layout must be one the geometry gives.
        let mut bad = m.clone();
        bad.format = MANIFEST_FORMAT;
        assert!(matches!(bad.validate(), Err(ManifestError::Verity(_))));
        let mut bad = sample();
        bad.format = MANIFEST_FORMAT_VERITY;
        assert!(matches!(bad.validate(), Err(ManifestError::Verity(_))));
        let mut bad = m.clone();
        bad.size += 4096;
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("1253376"), "{e}");
        let mut bad = m;
        bad.verity.as_mut().unwrap().salt = "zz".into();
        assert!(bad.validate().unwrap_err().to_string().contains("salt"));
    }

    #[test]
    fn pem_errors_are_clear() {
        let e = public_keys_from_pem("hello").unwrap_err();
        assert!(e.to_string().contains("no PUBLIC KEY block"), "{e}");
        assert!(signing_key_from_pem("nope").is_err());
    }

    #[test]
    fn one_bad_block_refuses_the_whole_key_file_and_is_named() {
        let good = public_key_to_pem(&SigningKey::from_bytes(&[1; 32]).verifying_key());
        assert_eq!(public_keys_from_pem(&good).unwrap().len(), 1);
        // An RSA key added during a rotation, in either PEM flavour.
        let rsa =
            "-----BEGIN RSA PUBLIC KEY-----\nMAoCAwEAAQIDAQAB\n-----END RSA PUBLIC KEY-----\n";
        let e = public_keys_from_pem(&format!("{good}{rsa}")).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("PEM block 2") && msg.contains("RSA PUBLIC KEY"),
            "{msg}"
        );
        let spki_rsa =
            "-----BEGIN PUBLIC KEY-----\nMA0GCSqGSIb3DQEBAQUAAwIAAA==\n-----END PUBLIC KEY-----\n";
        let e = public_keys_from_pem(&format!("{spki_rsa}{good}")).unwrap_err();
        assert!(e.to_string().contains("PEM block 1 (line 1)"), "{e}");
        let e =
            public_keys_from_pem(&format!("{good}-----BEGIN PUBLIC KEY-----\nAAAA")).unwrap_err();
        assert!(e.to_string().contains("unterminated"), "{e}");
    }
}
