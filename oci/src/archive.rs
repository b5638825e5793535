//! A `docker save` archive (`docker-archive:FILE.tar`, as `docker save` and `skopeo copy …
//! docker-archive:` write): one tar holding `manifest.json`, the image's config and its
//! layers as uncompressed tars. The archive is scanned once for where each member's bytes
//! are (nothing is extracted); a member that is a symlink (the legacy `<id>/layer.tar ->
//! ../<digest>.tar`) is followed inside the archive only. There is no registry digest to
//! trust here, so what the archive says of itself is checked before use: the config must
//! hash to the name it is stored under when that name is a digest, and every layer must hash
//! to its `rootfs.diff_ids` entry in the config.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::digest::{self, Digest};
use crate::error::{io, OciError};
use crate::layout::open_regular;
use crate::spec::{self, ImageConfig, MAX_DOC};

/// Members an archive may hold (a real image has a few per layer).
const MAX_MEMBERS: usize = 100_000;
/// Symlinks followed to reach one member.
const MAX_HOPS: usize = 8;

/// One image of `manifest.json`.
#[derive(Debug, Clone, Deserialize)]
struct Entry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// Where a member is in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Member {
    /// A regular file: its data's offset and size.
    File { offset: u64, size: u64 },
    /// A symlink, its target already resolved against its directory.
    Link(String),
}

/// An opened archive with its one image.
#[derive(Debug)]
pub struct Archive {
    path: PathBuf,
    members: HashMap<String, Member>,
    /// The image's config, checked.
    pub config: ImageConfig,
    /// The config's digest: the image ID `docker images` shows.
    pub id: Digest,
    /// The image's tags, as the archive lists them.
    pub tags: Vec<String>,
    layers: Vec<(String, Digest)>,
}

/// `name` as a member path: `./` and `.` dropped, `..` resolved, never above the archive's
/// root (pure).
fn normalize(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// A symlink member's target, resolved against the member's directory (pure).
fn link_target(member: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let dir = member.rsplit_once('/').map_or("", |(d, _)| d);
    normalize(&format!("{dir}/{target}"))
}

fn bad(path: &Path, why: impl Into<String>) -> OciError {
    OciError::Spec {
        what: path.display().to_string(),
        why: why.into(),
    }
}

impl Archive {
    /// Opens `path` (a regular file, not followed if a symlink), reads its manifest and
    /// config, and checks the config. An archive of several images is refused: name one by
    /// converting it (`skopeo copy docker-archive:FILE:REPO:TAG oci:DIR:TAG`).
    pub fn open(path: &Path) -> Result<Archive, OciError> {
        let file = open_regular(path)?;
        let mut members = HashMap::new();
        let mut tar = tar::Archive::new(&file);
        let entries = tar
            .entries_with_seek()
            .map_err(|e| bad(path, format!("not a tar archive: {e}")))?;
        for e in entries {
            let e = e.map_err(|e| bad(path, format!("truncated or corrupt: {e}")))?;
            if members.len() >= MAX_MEMBERS {
                return Err(bad(path, format!("more than {MAX_MEMBERS} members")));
            }
            let raw = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            let Some(name) = normalize(&raw) else {
                continue;
            };
            let kind = e.header().entry_type();
            let member = if kind.is_file() {
                Member::File {
                    offset: e.raw_file_position(),
                    size: e.size(),
                }
            } else if kind.is_symlink() {
                let target = e
                    .link_name_bytes()
                    .map(|l| String::from_utf8_lossy(&l).into_owned())
                    .unwrap_or_default();
                match link_target(&name, &target) {
                    Some(t) => Member::Link(t),
                    None => continue,
                }
            } else {
                continue;
            };
            members.insert(name, member);
        }
        let mut a = Archive {
            path: path.to_path_buf(),
            members,
            config: ImageConfig::default(),
            id: digest::of(b""),
            tags: Vec::new(),
            layers: Vec::new(),
        };
        let manifest = a.small("manifest.json")?;
        let list: Vec<Entry> =
            spec::parse(&format!("{}: manifest.json", path.display()), &manifest)?;
        let entry = match list.as_slice() {
            [one] => one.clone(),
            [] => return Err(bad(path, "manifest.json lists no image")),
            many => {
                return Err(bad(
                    path,
                    format!(
                        "{} images in one archive; build from one: skopeo copy docker-archive:{}:REPO:TAG oci:DIR:TAG, then --from oci:DIR:TAG",
                        many.len(),
                        path.display()
                    ),
                ))
            }
        };
        let config = a.small(&entry.config)?;
        let id = digest::of(&config);
        let named = Path::new(&entry.config)
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()));
        if let Some(hex) = named {
            if hex != id.hex() {
                return Err(OciError::Digest {
                    digest: format!("sha256:{hex}"),
                    actual: id.to_string(),
                    size: config.len() as u64,
                });
            }
        }
        #[derive(Deserialize, Default)]
        struct RootFs {
            #[serde(default)]
            diff_ids: Vec<String>,
        }
        #[derive(Deserialize)]
        struct WithRootFs {
            #[serde(default)]
            rootfs: RootFs,
        }
        let what = format!("{}: config {}", path.display(), entry.config);
        a.config = spec::parse(&what, &config)?;
        let rootfs: WithRootFs = spec::parse(&what, &config)?;
        if rootfs.rootfs.diff_ids.len() != entry.layers.len() {
            return Err(bad(
                path,
                format!(
                    "manifest.json lists {} layers, the config's rootfs.diff_ids {}",
                    entry.layers.len(),
                    rootfs.rootfs.diff_ids.len()
                ),
            ));
        }
        a.layers = entry
            .layers
            .into_iter()
            .zip(rootfs.rootfs.diff_ids)
            .map(|(l, d)| Ok((l, Digest::parse(&d)?)))
            .collect::<Result<_, OciError>>()?;
        a.id = id;
        a.tags = entry.repo_tags.unwrap_or_default();
        Ok(a)
    }

    /// How many layers the image has.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Layer `i` (lowest first) as its diff ID and a reader of its bytes, which were first
    /// hashed in full against that diff ID.
    pub fn layer(&self, i: usize) -> Result<(Digest, std::io::Take<File>, u64), OciError> {
        let (name, diff_id) = self
            .layers
            .get(i)
            .ok_or_else(|| bad(&self.path, format!("no layer {i}")))?;
        let size = self.locate(name)?.1;
        digest::check(self.member(name)?, diff_id, Some(size)).map_err(|e| match e {
            OciError::Digest { actual, .. } => bad(
                &self.path,
                format!(
                    "layer {} ({name}) hashes to {actual}, the config's rootfs.diff_ids[{i}] is {diff_id}: the archive is corrupt, or the layer is compressed (docker save writes them uncompressed)",
                    i + 1
                ),
            ),
            e => e,
        })?;
        Ok((diff_id.clone(), self.member(name)?, size))
    }

    /// The data of member `name`: its offset and size, following symlinks inside.
    fn locate(&self, name: &str) -> Result<(u64, u64), OciError> {
        let mut at = normalize(name).ok_or_else(|| bad(&self.path, format!("member {name:?}")))?;
        for _ in 0..MAX_HOPS {
            match self.members.get(&at) {
                Some(Member::File { offset, size }) => return Ok((*offset, *size)),
                Some(Member::Link(t)) => at = t.clone(),
                None if at == name => {
                    return Err(bad(&self.path, format!("{name:?} is not in the archive")))
                }
                None => {
                    return Err(bad(
                        &self.path,
                        format!("{name:?} links to {at:?}, which is not in the archive"),
                    ))
                }
            }
        }
        Err(bad(
            &self.path,
            format!("member {name:?}: more than {MAX_HOPS} symlinks"),
        ))
    }

    /// A reader of member `name`'s bytes.
    fn member(&self, name: &str) -> Result<std::io::Take<File>, OciError> {
        let (offset, size) = self.locate(name)?;
        let mut f = open_regular(&self.path)?;
        f.seek(SeekFrom::Start(offset))
            .map_err(io(&self.path, "seek"))?;
        Ok(f.take(size))
    }

    /// A small member (a JSON document), capped.
    fn small(&self, name: &str) -> Result<Vec<u8>, OciError> {
        let (_, size) = self.locate(name)?;
        if size > MAX_DOC {
            return Err(bad(
                &self.path,
                format!("{name}: {size} bytes, more than a document may be ({MAX_DOC})"),
            ));
        }
        let mut v = Vec::new();
        self.member(name)?
            .read_to_end(&mut v)
            .map_err(io(&self.path, "read"))?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names() {
        assert_eq!(
            normalize("./manifest.json").as_deref(),
            Some("manifest.json")
        );
        assert_eq!(normalize("a/./b//c").as_deref(), Some("a/b/c"));
        assert_eq!(normalize("a/../b").as_deref(), Some("b"));
        assert_eq!(normalize("../x"), None);
        assert_eq!(normalize("./"), None);
        assert_eq!(
            link_target("id/layer.tar", "../abc.tar").as_deref(),
            Some("abc.tar")
        );
        assert_eq!(link_target("layer.tar", "../../etc/passwd"), None);
        assert_eq!(link_target("id/layer.tar", "/etc/passwd"), None);
    }
}
