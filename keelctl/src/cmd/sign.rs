//! `keelctl sign IMAGE`: the signed manifest of an image.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use keel_proto::manifest::{signing_key_from_pem, Manifest, MANIFEST_FORMAT};

use super::{hash_file, manifest_path, out};

/// What to sign.
#[derive(Debug)]
pub struct Sign<'a> {
    /// The image file.
    pub image: &'a Path,
    /// The private key (PEM).
    pub key: &'a Path,
    /// Product name.
    pub name: &'a str,
    /// Image version.
    pub version: u64,
    /// Devices must run at least this version.
    pub min_version: Option<u64>,
    /// Creation time (Unix seconds; default now).
    pub created: Option<u64>,
    /// Output file (default IMAGE.manifest).
    pub out: &'a Option<PathBuf>,
}

/// Hashes the image and writes its signed manifest.
pub fn run(s: &Sign<'_>) -> anyhow::Result<()> {
    let pem = fs::read_to_string(s.key).with_context(|| format!("read key {}", s.key.display()))?;
    let sk = signing_key_from_pem(&pem).with_context(|| format!("key {}", s.key.display()))?;
    let (size, sha256) = hash_file(s.image)?;
    let created = s.created.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let m = Manifest {
        format: MANIFEST_FORMAT,
        name: s.name.to_string(),
        version: s.version,
        size,
        sha256,
        created,
        min_version: s.min_version,
    };
    m.validate()?;
    let signed = m.sign(&sk);
    let out = manifest_path(s.image, s.out);
    fs::write(&out, signed.to_json()).with_context(|| format!("write {}", out.display()))?;
    out!(
        "signed {} version {} ({} bytes) -> {}",
        signed.manifest.name,
        signed.manifest.version,
        signed.manifest.size,
        out.display()
    );
    Ok(())
}
