//! The constant-memory check of a verity image as it streams past: the data hashes to the
//! expected root with the expected salt, the superblock agrees, and every stored level is
//! the level the data gives. Used by the agent while an image arrives and by initstage while
//! it copies a staged image.

use sha2::{Digest, Sha256};

use crate::geometry::Geometry;
use crate::superblock::Superblock;
use crate::tree::TreeBuilder;
use crate::{hex, VerityError, BLOCK, BLOCK_USIZE, DIGEST_LEN};

/// What an image must be, from its signed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Data bytes (the filesystem, padded to whole blocks).
    pub data_size: u64,
    /// Where the superblock is.
    pub hash_offset: u64,
    /// The salt.
    pub salt: Vec<u8>,
    /// The root hash.
    pub root: [u8; DIGEST_LEN],
    /// The whole image's size.
    pub image_size: u64,
}

/// Checks an image fed in order with [`StreamCheck::update`].
#[derive(Debug)]
pub struct StreamCheck {
    want: Expected,
    geometry: Geometry,
    builder: Option<TreeBuilder>,
    /// SHA-256 of each level's blocks as the data gives them.
    computed: Vec<Sha256>,
    /// SHA-256 of each level's blocks as stored.
    stored: Vec<Sha256>,
    computed_root: Option<[u8; DIGEST_LEN]>,
    superblock: Vec<u8>,
    offset: u64,
    error: Option<VerityError>,
}

impl StreamCheck {
    /// A check of an image described by `want`; refuses a layout that cannot be.
    pub fn new(want: Expected) -> Result<Self, VerityError> {
        let geometry = Geometry::new(want.data_size)?;
        geometry.check_layout(want.hash_offset, want.image_size)?;
        let builder = TreeBuilder::new(want.data_size, &want.salt)?;
        let n = geometry.levels();
        Ok(StreamCheck {
            want,
            geometry,
            builder: Some(builder),
            computed: vec![Sha256::new(); n],
            stored: vec![Sha256::new(); n],
            computed_root: None,
            superblock: Vec::with_capacity(BLOCK_USIZE),
            offset: 0,
            error: None,
        })
    }

    /// Feeds the next bytes of the image. Errors are kept and reported by `finish`.
    pub fn update(&mut self, mut bytes: &[u8]) {
        if self.error.is_some() {
            return;
        }
        while !bytes.is_empty() {
            let (n, r) = self.step(bytes);
            if let Err(e) = r {
                self.error = Some(e);
                return;
            }
            bytes = &bytes[n..];
            self.offset += n as u64;
        }
    }

    /// Consumes a prefix of `bytes` lying in one region; how many bytes it took.
    fn step(&mut self, bytes: &[u8]) -> (usize, Result<(), VerityError>) {
        let w = &self.want;
        let off = self.offset;
        let take =
            |end: u64| usize::try_from(end - off).map_or(bytes.len(), |n| n.min(bytes.len()));
        let sb_end = w.hash_offset + BLOCK;
        if off < w.data_size {
            let n = take(w.data_size);
            let b = self
                .builder
                .as_mut()
                .expect("builder lives through the data");
            let computed = &mut self.computed;
            let r = b.update(&bytes[..n], &mut |l, blk| computed[l].update(blk));
            if r.is_ok() && off + n as u64 == w.data_size {
                let b = self.builder.take().expect("builder");
                return (
                    n,
                    b.finish(&mut |l, blk| computed[l].update(blk)).map(|root| {
                        self.computed_root = Some(root);
                    }),
                );
            }
            (n, r)
        } else if off < w.hash_offset {
            (take(w.hash_offset), Ok(()))
        } else if off < sb_end {
            let n = take(sb_end);
            self.superblock.extend_from_slice(&bytes[..n]);
            (n, Ok(()))
        } else if off < w.image_size {
            // Which level this block of the stored tree belongs to (top level first).
            let block = (off - sb_end) / BLOCK;
            let level = (0..self.geometry.levels())
                .find(|&l| {
                    let s = self.geometry.level_start(l);
                    block >= s && block < s + self.geometry.level_blocks[l]
                })
                .expect("offset inside the tree");
            let level_end = sb_end
                + (self.geometry.level_start(level) + self.geometry.level_blocks[level]) * BLOCK;
            let n = take(level_end);
            self.stored[level].update(&bytes[..n]);
            (n, Ok(()))
        } else {
            (
                bytes.len(),
                Err(VerityError::Length {
                    found: off + bytes.len() as u64,
                    expected: w.image_size,
                }),
            )
        }
    }

    /// The verdict once the whole image was fed: its root hash, or what was wrong.
    pub fn finish(self) -> Result<[u8; DIGEST_LEN], VerityError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.offset != self.want.image_size {
            return Err(VerityError::Length {
                found: self.offset,
                expected: self.want.image_size,
            });
        }
        let root = self.computed_root.expect("data finished");
        if root != self.want.root {
            return Err(VerityError::RootMismatch {
                computed: hex(&root),
                expected: hex(&self.want.root),
            });
        }
        let sb = Superblock::decode(&self.superblock)?;
        if sb.data_blocks != self.geometry.data_blocks {
            return Err(VerityError::Superblock(format!(
                "it covers {} data blocks, the manifest {}",
                sb.data_blocks, self.geometry.data_blocks
            )));
        }
        if sb.salt != self.want.salt {
            return Err(VerityError::Superblock(
                "its salt is not the manifest's".into(),
            ));
        }
        for (level, (c, s)) in self.computed.into_iter().zip(self.stored).enumerate() {
            if c.finalize() != s.finalize() {
                return Err(VerityError::LevelMismatch { level });
            }
        }
        Ok(root)
    }
}

/// Appends to `data` (a whole number of blocks) its superblock and tree; the root hash.
pub fn append_tree(
    data: &mut Vec<u8>,
    salt: &[u8],
    uuid: [u8; 16],
) -> Result<[u8; DIGEST_LEN], VerityError> {
    let (tree, root) = crate::tree::build_in_memory(data, salt)?;
    let sb = Superblock {
        uuid,
        data_blocks: data.len() as u64 / BLOCK,
        salt: salt.to_vec(),
    };
    data.extend_from_slice(&sb.encode()?);
    data.extend_from_slice(&tree);
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(blocks: usize) -> (Vec<u8>, Expected) {
        let mut d: Vec<u8> = (0..blocks * BLOCK_USIZE)
            .map(|i| u8::try_from(i % 253).unwrap())
            .collect();
        let data_size = d.len() as u64;
        let root = append_tree(&mut d, &[9; 32], [1; 16]).unwrap();
        let want = Expected {
            data_size,
            hash_offset: data_size,
            salt: vec![9; 32],
            root,
            image_size: d.len() as u64,
        };
        (d, want)
    }

    fn check(img: &[u8], want: &Expected, piece: usize) -> Result<[u8; 32], VerityError> {
        let mut c = StreamCheck::new(want.clone())?;
        for p in img.chunks(piece) {
            c.update(p);
        }
        c.finish()
    }

    #[test]
    fn a_good_image_passes_in_any_pieces() {
        for blocks in [1, 2, 129, 300] {
            let (img, want) = image(blocks);
            for piece in [1usize << 20, 4096, 1000] {
                assert_eq!(
                    check(&img, &want, piece).unwrap(),
                    want.root,
                    "{blocks}/{piece}"
                );
            }
        }
    }

    #[test]
    fn a_flip_anywhere_is_found_and_named() {
        let (img, want) = image(300);
        let cases = [
            (5000usize, "root hash"),
            (300 * 4096 + 90, "salt"),
            (301 * 4096 + 5, "level 1"),
            (302 * 4096 + 7, "level 0"),
        ];
        for (at, what) in cases {
            let mut bad = img.clone();
            bad[at] ^= 1;
            let e = check(&bad, &want, 65536).unwrap_err();
            assert!(e.to_string().contains(what), "{at}: {e}");
        }
        let mut w = want.clone();
        w.root[0] ^= 1;
        assert!(matches!(
            check(&img, &w, 4096),
            Err(VerityError::RootMismatch { .. })
        ));
        assert!(matches!(
            check(&img[..img.len() - 1], &want, 4096),
            Err(VerityError::Length { .. })
        ));
    }
}
