//! An OCI image layout on disk (`oci:DIR[:TAG]`, as `umoci` and `skopeo` write): `index.json`,
//! blobs under `blobs/sha256/`. Every blob is opened without following symlinks, must be a
//! regular file, and is hashed in full against its digest before a byte of it is used.

use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::digest::{self, Digest};
use crate::error::{io, OciError};
use crate::spec::{self, Descriptor, ImageConfig, Index, Manifest, Platform, MAX_DOC};

/// The annotation that names a tag in a layout's index.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An image layout directory.
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

/// An image resolved to one platform's manifest.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The manifest's digest.
    pub digest: Digest,
    /// The manifest.
    pub manifest: Manifest,
    /// Its config.
    pub config: ImageConfig,
}

/// Opens `path` for reading: never through a symlink, and only a regular file.
pub(crate) fn open_regular(path: &Path) -> Result<File, OciError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits().cast_signed())
        .open(path)
        .map_err(io(path, "open"))?;
    let meta = f.metadata().map_err(io(path, "stat"))?;
    if !meta.is_file() {
        return Err(OciError::Io {
            path: path.to_path_buf(),
            op: "open",
            source: std::io::Error::other("not a regular file"),
        });
    }
    Ok(f)
}

impl Layout {
    /// Opens `dir`, which must hold an `oci-layout` file.
    pub fn open(dir: &Path) -> Result<Layout, OciError> {
        let marker = dir.join("oci-layout");
        let mut text = String::new();
        open_regular(&marker)?
            .take(4096)
            .read_to_string(&mut text)
            .map_err(io(&marker, "read"))?;
        if !text.contains("imageLayoutVersion") {
            return Err(OciError::Spec {
                what: marker.display().to_string(),
                why: "not an OCI image layout marker".into(),
            });
        }
        Ok(Layout {
            dir: dir.to_path_buf(),
        })
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(d.hex())
    }

    /// A blob, checked against its descriptor (digest and size), rewound to its start.
    pub fn blob(&self, desc: &Descriptor) -> Result<File, OciError> {
        let d = desc.digest()?;
        let path = self.blob_path(&d);
        let mut f = open_regular(&path)?;
        digest::check(&mut f, &d, Some(desc.size))?;
        f.rewind().map_err(io(&path, "seek"))?;
        Ok(f)
    }

    /// A small JSON document (index, manifest, config), checked.
    pub fn doc(&self, desc: &Descriptor) -> Result<Vec<u8>, OciError> {
        if desc.size > MAX_DOC {
            return Err(OciError::Spec {
                what: format!("blob {}", desc.digest),
                why: format!(
                    "{} bytes, more than a document may be ({MAX_DOC})",
                    desc.size
                ),
            });
        }
        let mut v = Vec::new();
        let path = self.blob_path(&desc.digest()?);
        self.blob(desc)?
            .read_to_end(&mut v)
            .map_err(io(path, "read"))?;
        Ok(v)
    }

    /// The image `tag` names (the index's only one without a tag), for `platform` when it
    /// is a multi-platform index.
    pub fn resolve(&self, tag: Option<&str>, platform: &Platform) -> Result<Resolved, OciError> {
        let path = self.dir.join("index.json");
        let mut bytes = Vec::new();
        open_regular(&path)?
            .take(MAX_DOC)
            .read_to_end(&mut bytes)
            .map_err(io(&path, "read"))?;
        let index: Index = spec::parse("index.json", &bytes)?;
        let entry = match tag {
            Some(t) => index
                .manifests
                .iter()
                .find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(t)),
            None if index.manifests.len() == 1 => index.manifests.first(),
            None => {
                return Err(OciError::Spec {
                    what: path.display().to_string(),
                    why: format!(
                        "{} images and no tag: name one (oci:DIR:TAG)",
                        index.manifests.len()
                    ),
                })
            }
        };
        let entry = entry.ok_or_else(|| OciError::Spec {
            what: path.display().to_string(),
            why: format!(
                "no image tagged {:?}; tags: {}",
                tag.unwrap_or(""),
                index
                    .manifests
                    .iter()
                    .filter_map(|d| d.annotations.get(REF_NAME).cloned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
        self.manifest(entry, platform)
    }

    /// Follows `desc` (an index: its entry for `platform`) to a manifest and its config.
    pub fn manifest(&self, desc: &Descriptor, platform: &Platform) -> Result<Resolved, OciError> {
        let mut desc = desc.clone();
        for _ in 0..4 {
            let bytes = self.doc(&desc)?;
            if spec::is_index(&desc.media_type, &bytes) {
                let idx: Index = spec::parse(&format!("index {}", desc.digest), &bytes)?;
                desc = spec::pick_platform(&idx, platform)?.clone();
                continue;
            }
            let manifest: Manifest = spec::parse(&format!("manifest {}", desc.digest), &bytes)?;
            let config: ImageConfig = spec::parse(
                &format!("config {}", manifest.config.digest),
                &self.doc(&manifest.config)?,
            )?;
            return Ok(Resolved {
                digest: desc.digest()?,
                manifest,
                config,
            });
        }
        Err(OciError::Spec {
            what: format!("index {}", desc.digest),
            why: "indexes nested more than 4 deep".into(),
        })
    }
}
