//! The streaming tree builder: data blocks in, hash blocks out, memory of one block a level.

use sha2::{Digest, Sha256};

use crate::geometry::Geometry;
use crate::{VerityError, BLOCK_USIZE, DIGEST_LEN};

/// One level's block being filled.
#[derive(Debug, Clone)]
struct Level {
    block: Vec<u8>,
    filled: usize,
}

/// Builds a dm-verity tree over data fed in order with [`TreeBuilder::update`].
///
/// Every completed hash block is handed to the caller's sink with its level, in order within
/// each level (levels interleave); [`TreeBuilder::finish`] pads the last blocks and returns
/// the root hash. Memory: one block for the data and one per level, whatever the image size.
#[derive(Debug, Clone)]
pub struct TreeBuilder {
    salt: Vec<u8>,
    geometry: Geometry,
    data: Vec<u8>,
    data_filled: usize,
    levels: Vec<Level>,
    fed: u64,
    root: Option<[u8; DIGEST_LEN]>,
}

impl TreeBuilder {
    /// A builder for `data_size` bytes of data, hashing with `salt`.
    pub fn new(data_size: u64, salt: &[u8]) -> Result<Self, VerityError> {
        if salt.is_empty() || salt.len() > crate::MAX_SALT_LEN {
            return Err(VerityError::SaltLen(salt.len()));
        }
        let geometry = Geometry::new(data_size)?;
        let levels = (0..geometry.levels())
            .map(|_| Level {
                block: vec![0; BLOCK_USIZE],
                filled: 0,
            })
            .collect();
        Ok(TreeBuilder {
            salt: salt.to_vec(),
            geometry,
            data: vec![0; BLOCK_USIZE],
            data_filled: 0,
            levels,
            fed: 0,
            root: None,
        })
    }

    /// The tree's geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    fn hash(&self, block: &[u8]) -> [u8; DIGEST_LEN] {
        let mut h = Sha256::new();
        h.update(&self.salt);
        h.update(block);
        h.finalize().into()
    }

    /// Records the hash of a completed block of `level` (`None`: a data block) one level up.
    fn push(
        &mut self,
        mut level: Option<usize>,
        mut digest: [u8; DIGEST_LEN],
        sink: &mut impl FnMut(usize, &[u8]),
    ) {
        loop {
            let up = level.map_or(0, |l| l + 1);
            if up == self.levels.len() {
                self.root = Some(digest);
                return;
            }
            let l = &mut self.levels[up];
            l.block[l.filled..l.filled + DIGEST_LEN].copy_from_slice(&digest);
            l.filled += DIGEST_LEN;
            if l.filled < BLOCK_USIZE {
                return;
            }
            let block = std::mem::replace(&mut l.block, vec![0; BLOCK_USIZE]);
            l.filled = 0;
            sink(up, &block);
            digest = self.hash(&block);
            level = Some(up);
        }
    }

    /// Feeds data bytes; bytes past the data size are an error.
    pub fn update(
        &mut self,
        mut bytes: &[u8],
        sink: &mut impl FnMut(usize, &[u8]),
    ) -> Result<(), VerityError> {
        let size = self.geometry.data_blocks * crate::BLOCK;
        if self.fed + bytes.len() as u64 > size {
            return Err(VerityError::Length {
                found: self.fed + bytes.len() as u64,
                expected: size,
            });
        }
        self.fed += bytes.len() as u64;
        while !bytes.is_empty() {
            if self.data_filled == 0 && bytes.len() >= BLOCK_USIZE {
                let d = self.hash(&bytes[..BLOCK_USIZE]);
                self.push(None, d, sink);
                bytes = &bytes[BLOCK_USIZE..];
                continue;
            }
            let n = (BLOCK_USIZE - self.data_filled).min(bytes.len());
            self.data[self.data_filled..self.data_filled + n].copy_from_slice(&bytes[..n]);
            self.data_filled += n;
            bytes = &bytes[n..];
            if self.data_filled == BLOCK_USIZE {
                let d = self.hash(&self.data);
                self.data_filled = 0;
                self.push(None, d, sink);
            }
        }
        Ok(())
    }

    /// Pads and hands out the last block of each level; the root hash.
    pub fn finish(
        mut self,
        sink: &mut impl FnMut(usize, &[u8]),
    ) -> Result<[u8; DIGEST_LEN], VerityError> {
        let size = self.geometry.data_blocks * crate::BLOCK;
        if self.fed != size {
            return Err(VerityError::Length {
                found: self.fed,
                expected: size,
            });
        }
        for i in 0..self.levels.len() {
            if self.levels[i].filled > 0 {
                let l = &mut self.levels[i];
                let block = std::mem::replace(&mut l.block, vec![0; BLOCK_USIZE]);
                l.filled = 0;
                sink(i, &block);
                let d = self.hash(&block);
                self.push(Some(i), d, sink);
            }
        }
        Ok(self.root.expect("a complete tree has a root"))
    }
}

/// The whole tree over `data` in memory, as stored (top level first), and its root hash.
/// For signing on a host; devices use [`TreeBuilder`] with a sink that does not keep blocks.
pub fn build_in_memory(
    data: &[u8],
    salt: &[u8],
) -> Result<(Vec<u8>, [u8; DIGEST_LEN]), VerityError> {
    let mut b = TreeBuilder::new(data.len() as u64, salt)?;
    let mut levels: Vec<Vec<u8>> = vec![Vec::new(); b.geometry().levels()];
    let mut sink = |l: usize, block: &[u8]| levels[l].extend_from_slice(block);
    b.update(data, &mut sink)?;
    let root = b.finish(&mut sink)?;
    Ok((levels.into_iter().rev().flatten().collect(), root))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(blocks: usize) -> Vec<u8> {
        (0..blocks * BLOCK_USIZE)
            .map(|i| u8::try_from(i * 7 % 251).unwrap())
            .collect()
    }

    #[test]
    fn one_block_hashes_to_the_root() {
        let d = data(1);
        let (tree, root) = build_in_memory(&d, b"salt").unwrap();
        assert!(tree.is_empty());
        let mut h = Sha256::new();
        h.update(b"salt");
        h.update(&d);
        assert_eq!(root, <[u8; 32]>::from(h.finalize()));
    }

    #[test]
    fn feeding_in_odd_pieces_gives_the_same_tree() {
        for blocks in [2usize, 128, 129, 300] {
            let d = data(blocks);
            let (tree, root) = build_in_memory(&d, b"s").unwrap();
            let g = Geometry::new(d.len() as u64).unwrap();
            assert_eq!(tree.len() as u64, g.tree_blocks() * crate::BLOCK);
            let mut b = TreeBuilder::new(d.len() as u64, b"s").unwrap();
            let mut n = 0usize;
            let mut sink = |_: usize, _: &[u8]| n += 1;
            for piece in d.chunks(1000) {
                b.update(piece, &mut sink).unwrap();
            }
            assert_eq!(b.finish(&mut sink).unwrap(), root, "{blocks}");
            assert_eq!(n as u64, g.tree_blocks());
        }
    }

    #[test]
    fn short_and_long_data_are_refused() {
        let mut b = TreeBuilder::new(8192, b"s").unwrap();
        let mut sink = |_: usize, _: &[u8]| {};
        b.update(&[0; 4096], &mut sink).unwrap();
        assert!(matches!(
            b.clone().finish(&mut sink),
            Err(VerityError::Length { found: 4096, .. })
        ));
        assert!(b.update(&[0; 4097], &mut sink).is_err());
        assert_eq!(
            TreeBuilder::new(8192, b"").unwrap_err(),
            VerityError::SaltLen(0)
        );
    }
}
