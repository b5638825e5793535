//! What an image's bytes are checked against as they stream past: the manifest's SHA-256,
//! and for a format 2 manifest its dm-verity tree (data to root hash, superblock, stored
//! levels). One check for the agent's staging and initstage's promotion copy.

use sha2::{Digest, Sha256};

use crate::hex;
use crate::manifest::{Manifest, VerityInfo};
use keel_verity::{StreamCheck, VerityError};

/// Why streamed bytes are not the manifest's image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The SHA-256 of the whole image differs.
    #[error("bytes hash to {found}, the manifest says {expected}")]
    Digest {
        /// Digest of the bytes.
        found: String,
        /// Digest the manifest signed.
        expected: String,
    },
    /// The verity tree or its root hash is not the manifest's.
    #[error("verity: {0}")]
    Verity(#[from] VerityError),
}

/// The running check of one image.
#[derive(Debug)]
pub struct ImageCheck {
    sha: Sha256,
    verity: Option<StreamCheck>,
    expected: String,
}

impl ImageCheck {
    /// A check of the image `m` describes (a validated manifest).
    pub fn new(m: &Manifest) -> Result<Self, CheckError> {
        Self::of(m.size, &m.sha256, m.verity.as_ref())
    }

    /// A check of a `size`-byte image with digest `sha256` and, if given, that verity tree.
    pub fn of(size: u64, sha256: &str, verity: Option<&VerityInfo>) -> Result<Self, CheckError> {
        let verity = match verity {
            Some(v) => {
                let want = v.expected(size).ok_or_else(|| {
                    VerityError::Superblock("the manifest's salt or root is not hex".into())
                })?;
                Some(StreamCheck::new(want)?)
            }
            None => None,
        };
        Ok(ImageCheck {
            sha: Sha256::new(),
            verity,
            expected: sha256.to_ascii_lowercase(),
        })
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        if let Some(v) = &mut self.verity {
            v.update(bytes);
        }
    }

    /// The verdict on everything fed: the verity root hash (hex) if the image has one.
    pub fn finish(self) -> Result<Option<String>, CheckError> {
        let found = hex::encode(&self.sha.finalize());
        if found != self.expected {
            return Err(CheckError::Digest {
                found,
                expected: self.expected,
            });
        }
        match self.verity {
            Some(v) => Ok(Some(hex::encode(&v.finish()?))),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{VerityInfo, MANIFEST_FORMAT, MANIFEST_FORMAT_VERITY};

    fn manifest(img: &[u8], verity: Option<VerityInfo>) -> Manifest {
        Manifest {
            format: if verity.is_some() {
                MANIFEST_FORMAT_VERITY
            } else {
                MANIFEST_FORMAT
            },
            name: "demo".into(),
            version: 1,
            size: img.len() as u64,
            sha256: hex::encode(&Sha256::digest(img)),
            created: 0,
            min_version: None,
            verity,
        }
    }

    fn run(img: &[u8], m: &Manifest) -> Result<Option<String>, CheckError> {
        let mut c = ImageCheck::new(m)?;
        for p in img.chunks(10_000) {
            c.update(p);
        }
        c.finish()
    }

    #[test]
    fn plain_and_verity_images() {
        let plain = vec![5u8; 9000];
        assert_eq!(run(&plain, &manifest(&plain, None)), Ok(None));
        let mut bad = plain.clone();
        bad[3] = 0;
        assert!(matches!(
            run(&bad, &manifest(&plain, None)),
            Err(CheckError::Digest { .. })
        ));

        let mut img = vec![7u8; 300 * 4096];
        let root = keel_verity::check::append_tree(&mut img, &[3; 32], [0; 16]).unwrap();
        let info = VerityInfo {
            data_size: 300 * 4096,
            hash_offset: 300 * 4096,
            salt: "03".repeat(32),
            root_hash: hex::encode(&root),
        };
        let m = manifest(&img, Some(info.clone()));
        m.validate().unwrap();
        assert_eq!(run(&img, &m), Ok(Some(hex::encode(&root))));
        // A manifest whose root does not match the tree, signed over the right bytes.
        let mut wrong = info;
        wrong.root_hash = "ab".repeat(32);
        let e = run(&img, &manifest(&img, Some(wrong))).unwrap_err();
        assert!(e.to_string().contains("verity root hash is"), "{e}");
    }
}
