//! The OCI image-spec documents keel reads (index, manifest, config), with the Docker v2
//! media types registries still serve, and the pure choice of a platform's manifest.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::OciError;

/// An OCI image index's media type.
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// An OCI image manifest's media type.
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker's manifest list (an index).
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker's image manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Largest index, manifest or config read.
pub const MAX_DOC: u64 = 4 << 20;

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What it points to.
    #[serde(default)]
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// For an index entry: the platform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations (`org.opencontainers.image.ref.name` for a tag).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl Descriptor {
    /// The digest, parsed.
    pub fn digest(&self) -> Result<Digest, OciError> {
        Digest::parse(&self.digest)
    }
}

/// A platform: `linux/amd64`, `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Platform {
    /// `amd64`, `arm64`, …
    pub architecture: String,
    /// `linux`.
    pub os: String,
    /// `v8`, `v7`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `OS/ARCH[/VARIANT]`.
    pub fn parse(s: &str) -> Result<Platform, OciError> {
        let p: Vec<&str> = s.split('/').collect();
        match p.as_slice() {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: p.get(2).map(|v| v.to_string()),
            }),
            _ => Err(OciError::Spec {
                what: format!("platform {s:?}"),
                why: "expected OS/ARCH[/VARIANT], e.g. linux/amd64".into(),
            }),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image index (or Docker manifest list).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Its media type, when it says.
    #[serde(default)]
    pub media_type: Option<String>,
    /// The manifests it lists.
    pub manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Its media type, when it says.
    #[serde(default)]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layers, lowest first.
    pub layers: Vec<Descriptor>,
}

pub use keel_proto::runconfig::RunConfig;

/// An image config.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageConfig {
    /// Its architecture.
    #[serde(default)]
    pub architecture: String,
    /// Its OS.
    #[serde(default)]
    pub os: String,
    /// How to run it.
    #[serde(default)]
    pub config: RunConfig,
}

/// Parses a JSON document, naming it in the error.
pub fn parse<'a, T: Deserialize<'a>>(what: &str, bytes: &'a [u8]) -> Result<T, OciError> {
    serde_json::from_slice(bytes).map_err(|e| OciError::Spec {
        what: what.to_string(),
        why: e.to_string(),
    })
}

/// Whether a document is an index (by its media type, or by having `manifests`).
pub fn is_index(media_type: &str, bytes: &[u8]) -> bool {
    media_type == INDEX
        || media_type == DOCKER_LIST
        || (media_type.is_empty()
            && serde_json::from_slice::<serde_json::Value>(bytes)
                .is_ok_and(|v| v.get("manifests").is_some()))
}

/// The index entry for `want` (the variant only when both give one); an error listing
/// what the index has otherwise.
pub fn pick_platform<'a>(index: &'a Index, want: &Platform) -> Result<&'a Descriptor, OciError> {
    let fits = |p: &Platform| {
        p.os == want.os
            && p.architecture == want.architecture
            && (want.variant.is_none() || p.variant.is_none() || p.variant == want.variant)
    };
    index
        .manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(fits))
        .ok_or_else(|| OciError::Spec {
            what: "image index".into(),
            why: format!(
                "no image for {want}; it has {}",
                index
                    .manifests
                    .iter()
                    .map(|d| d
                        .platform
                        .as_ref()
                        .map_or("(no platform)".into(), |p| p.to_string()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms() {
        let idx: Index = parse(
            "index",
            br#"{"manifests":[
              {"mediaType":"x","digest":"sha256:a","size":1,"platform":{"architecture":"arm64","os":"linux","variant":"v8"}},
              {"mediaType":"x","digest":"sha256:b","size":1,"platform":{"architecture":"amd64","os":"linux"}}]}"#,
        )
        .unwrap();
        let amd = Platform::parse("linux/amd64").unwrap();
        assert_eq!(pick_platform(&idx, &amd).unwrap().digest, "sha256:b");
        let arm = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(pick_platform(&idx, &arm).unwrap().digest, "sha256:a");
        let e = pick_platform(&idx, &Platform::parse("linux/s390x").unwrap()).unwrap_err();
        assert!(e.to_string().contains("linux/arm64/v8, linux/amd64"), "{e}");
        assert!(Platform::parse("amd64").is_err());
        assert!(is_index("", br#"{"manifests":[]}"#));
        assert!(!is_index(MANIFEST, br#"{"manifests":[]}"#));
    }
}
