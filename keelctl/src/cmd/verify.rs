//! `keelctl verify IMAGE --keys K`: signature, size and digest, as a device would check them,
//! and the chunk index the manifest signs, if any.

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
    // The chunk index the manifest signs: its signature, its bytes, and that it is this
    // image's (every chunk's digest, as a device assembling a delta would find them).
    let chunks = match signed
        .verified_chunks(&keys)
        .with_context(|| format!("chunk index reference in {}", mp.display()))?
    {
        None => String::new(),
        Some(c) => {
            let ip = super::sign::index_path(image);
            let b = fs::read(&ip).with_context(|| format!("read {}", ip.display()))?;
            c.check(&b).with_context(|| ip.display().to_string())?;
            let idx =
                keel_proto::chunks::Index::decode(&b).with_context(|| ip.display().to_string())?;
            let f = fs::File::open(image).with_context(|| format!("open {}", image.display()))?;
            let again = keel_proto::chunks::Index::build(
                &mut std::io::BufReader::with_capacity(1 << 20, f),
                idx.params,
            )
            .with_context(|| format!("read {}", image.display()))?;
            if again != idx {
                bail!(
                    "{} is not the chunk index of {}: sign the image again",
                    ip.display(),
                    image.display()
                );
            }
            format!(", chunk index of {} chunks", idx.chunks.len())
        }
    };
    out!(
        "ok: {} version {} signed by a trusted key, {} bytes, sha256 {}{chunks}",
        signed.manifest.name,
        signed.manifest.version,
        size,
        sha
    );
    Ok(())
}
