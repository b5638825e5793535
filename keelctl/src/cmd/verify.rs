//! `keelctl verify IMAGE --keys K`: signature, size and digest, as a device would check them.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use keel_proto::manifest::public_keys_from_pem;

use super::{hash_file, manifest_path, out, read_manifest};

/// Checks `image` against its manifest and `keys`.
pub fn run(image: &Path, keys: &Path, manifest: &Option<PathBuf>) -> anyhow::Result<()> {
    let pem = fs::read_to_string(keys).with_context(|| format!("read keys {}", keys.display()))?;
    let keys = public_keys_from_pem(&pem)?;
    let mp = manifest_path(image, manifest);
    let signed = read_manifest(&mp)?;
    signed
        .verify(&keys)
        .with_context(|| format!("manifest {}", mp.display()))?;
    let (size, sha) = hash_file(image)?;
    if size != signed.manifest.size {
        bail!(
            "{} is {size} bytes, its manifest says {}",
            image.display(),
            signed.manifest.size
        );
    }
    if !sha.eq_ignore_ascii_case(&signed.manifest.sha256) {
        bail!(
            "{} hashes to {sha}, its manifest says {}",
            image.display(),
            signed.manifest.sha256
        );
    }
    out!(
        "ok: {} version {} signed by a trusted key, {} bytes, sha256 {}",
        signed.manifest.name,
        signed.manifest.version,
        size,
        sha
    );
    Ok(())
}
