//! `keelctl disk create OUT --image IMG`: the factory disk initstage boots — the image and
//! its signed manifest on `img` (adopted as version 1 at the first boot), `overlay`,
//! `newimg`, and `boot` when given a folder ([`keel_build::disk`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use keel_build::disk::{self, DiskSpec};
use keel_proto::layout::DEFAULT_IMAGE;

use super::{hash_file, manifest_path, out, read_manifest};

/// What to make.
#[derive(Debug)]
pub struct Create<'a> {
    /// The disk image to write.
    pub out: &'a Path,
    /// The root image.
    pub image: &'a Path,
    /// Its manifest (default IMAGE.manifest).
    pub manifest: &'a Option<PathBuf>,
    /// `img` size.
    pub img_size: Option<&'a str>,
    /// `overlay` size.
    pub overlay_size: Option<&'a str>,
    /// `newimg` size.
    pub newimg_size: Option<&'a str>,
    /// The whole disk.
    pub size: Option<&'a str>,
    /// A folder for the `boot` partition.
    pub boot: Option<&'a Path>,
    /// `boot` size.
    pub boot_size: Option<&'a str>,
    /// Print the layout as JSON.
    pub json: bool,
}

/// `N` MiB from `N`, `NM`, `NG`.
pub fn mib(what: &str, s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (num, mul) = match t.chars().last() {
        Some('G' | 'g') => (&t[..t.len() - 1], 1024),
        Some('M' | 'm') => (&t[..t.len() - 1], 1),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .map(|n| n * mul)
        .with_context(|| format!("{what} {s:?}: expected MiB, e.g. 256, 256M or 2G"))
}

/// Makes the disk.
pub fn create(c: &Create<'_>) -> anyhow::Result<()> {
    let mpath = manifest_path(c.image, c.manifest);
    let m = read_manifest(&mpath)?;
    let (size, sha) = hash_file(c.image)?;
    if size != m.manifest.size || sha != m.manifest.sha256 {
        bail!(
            "{} is not the image {} describes ({size} bytes, sha256 {sha}; the manifest says {} bytes, {})",
            c.image.display(),
            mpath.display(),
            m.manifest.size,
            m.manifest.sha256
        );
    }
    let opt = |what: &str, v: Option<&str>| v.map(|s| mib(what, s)).transpose();
    if let Some(b) = c.boot {
        if !b.is_dir() {
            bail!("--boot {}: not a folder", b.display());
        }
    }
    let spec = DiskSpec {
        image_bytes: size,
        img_mib: opt("--img-size", c.img_size)?,
        overlay_mib: opt("--overlay-size", c.overlay_size)?,
        newimg_mib: opt("--newimg-size", c.newimg_size)?,
        boot_mib: match (c.boot, opt("--boot-size", c.boot_size)?) {
            (Some(_), s) => Some(s.unwrap_or(64)),
            (None, Some(_)) => bail!("--boot-size without --boot"),
            (None, None) => None,
        },
        total_mib: opt("--size", c.size)?,
    };
    let parts = disk::plan(&spec).map_err(|e| anyhow::anyhow!("{e}"))?;
    let contents: Vec<disk::Contents> = parts
        .iter()
        .map(|p| match p.label {
            "img" => vec![
                (c.image.to_path_buf(), DEFAULT_IMAGE.to_string()),
                (mpath.clone(), format!("{DEFAULT_IMAGE}.manifest")),
            ],
            _ => Vec::new(),
        })
        .collect();
    let dirs: Vec<Option<PathBuf>> = parts
        .iter()
        .map(|p| {
            (p.label == "boot")
                .then(|| c.boot.map(Path::to_path_buf))
                .flatten()
        })
        .collect();
    let name = c.out.file_name().context("the disk must be a file name")?;
    let scratch = c.out.with_file_name(format!(
        ".{}.keel-disk-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    disk::create(c.out, &parts, &contents, &dirs, &scratch)?;
    if c.json {
        out!(
            "{}",
            serde_json::json!({
                "disk": c.out,
                "image": {"name": m.manifest.name, "version": m.manifest.version, "sha256": m.manifest.sha256},
                "partitions": parts,
            })
        );
    } else {
        out!(
            "wrote {}: {} version {} on img; {}",
            c.out.display(),
            m.manifest.name,
            m.manifest.version,
            parts
                .iter()
                .map(|p| format!("{} {} MiB", p.label, p.size_mib))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::mib("x", "256").unwrap(), 256);
        assert_eq!(super::mib("x", "2G").unwrap(), 2048);
        assert_eq!(super::mib("x", "64M").unwrap(), 64);
        assert!(super::mib("x", "0").is_err());
        assert!(super::mib("x", "1T").is_err());
    }
}
