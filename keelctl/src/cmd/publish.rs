//! `keelctl publish IMAGE --channel DIR`: writes a pull channel ([`keel_proto::channel`]) that
//! any web server, CDN or bucket can serve as static files: the image under its digest first
//! (copied, fsynced, renamed into place), then the signed manifest under its fixed name, so a
//! device never reads a manifest whose image is not there yet. Earlier images stay (a device
//! may still be fetching one); the manifest is checked against the image before a byte is
//! written.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use keel_proto::channel;

use super::{hash_file, manifest_path, out, read_manifest};

/// Publishes `image` (with its manifest) into the channel folder `dir`.
pub fn run(image: &Path, manifest: &Option<PathBuf>, dir: &Path, json: bool) -> anyhow::Result<()> {
    let mp = manifest_path(image, manifest);
    let signed = read_manifest(&mp)?;
    let (size, sha) = hash_file(image)?;
    if size != signed.manifest.size || !sha.eq_ignore_ascii_case(&signed.manifest.sha256) {
        bail!(
            "{} ({size} bytes, sha256 {sha}) is not the image {} describes ({} bytes, sha256 {}): \
             sign the image again",
            image.display(),
            mp.display(),
            signed.manifest.size,
            signed.manifest.sha256
        );
    }
    let images = dir.join(channel::IMAGES);
    fs::create_dir_all(&images).with_context(|| format!("create {}", images.display()))?;
    let rel = channel::image_path(&sha);
    let dst = dir.join(&rel);
    let copied = match fs::symlink_metadata(&dst) {
        Ok(m) if m.is_file() && m.len() == size && hash_file(&dst)?.1 == sha => false,
        _ => {
            copy_durably(image, &images, &sha)?;
            true
        }
    };
    // The chunk index beside the image, before the manifest that names it.
    let index = match &signed.chunks {
        Some(c) => {
            let src = super::sign::index_path(image);
            let b = fs::read(&src).with_context(|| {
                format!(
                    "read {} (the manifest signs a chunk index: sign the image again, or with --no-chunks)",
                    src.display()
                )
            })?;
            c.check(&b)
                .with_context(|| format!("{}: sign the image again", src.display()))?;
            let name = format!("{sha}{}", channel::INDEX_SUFFIX);
            copy_durably(&src, &images, &name)?;
            Some(channel::index_path(&sha))
        }
        None => None,
    };
    keel_sys::durable::write_atomic(
        dir,
        ".manifest.json.tmp",
        channel::MANIFEST,
        &signed.to_json(),
        keel_sys::durable::no_hook,
    )
    .with_context(|| format!("write {}", dir.join(channel::MANIFEST).display()))?;
    let m = &signed.manifest;
    if json {
        out!(
            "{}",
            serde_json::json!({
                "name": m.name, "version": m.version, "size": m.size, "sha256": sha,
                "manifest": channel::MANIFEST, "image": rel, "copied": copied, "index": index,
            })
        );
    } else {
        out!(
            "published {} version {} ({} bytes) in {}: {}, {}{}{}",
            m.name,
            m.version,
            m.size,
            dir.display(),
            channel::MANIFEST,
            rel,
            if copied { "" } else { " (image already there)" },
            index.map(|i| format!(" and {i}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// Copies `src` to `dir/name` through a temporary file: written, fsynced, renamed, the
/// directory fsynced.
fn copy_durably(src: &Path, dir: &Path, name: &str) -> anyhow::Result<()> {
    let tmp = format!(".{name}.tmp");
    let _ = fs::remove_file(dir.join(&tmp));
    let mut f = keel_sys::durable::create_new(dir, &tmp)?;
    let mut r = fs::File::open(src).with_context(|| format!("open {}", src.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r
            .read(&mut buf)
            .with_context(|| format!("read {}", src.display()))?;
        if n == 0 {
            break;
        }
        f.write_all(&buf[..n])
            .with_context(|| format!("write {}", dir.join(&tmp).display()))?;
    }
    f.sync_all()
        .with_context(|| format!("fsync {}", dir.join(&tmp).display()))?;
    fs::rename(dir.join(&tmp), dir.join(name))
        .with_context(|| format!("rename into {}", dir.join(name).display()))?;
    keel_sys::durable::fsync_dir(dir, keel_sys::durable::no_hook)?;
    Ok(())
}
