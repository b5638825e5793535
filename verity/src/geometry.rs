//! Tree geometry: levels, their sizes and their places, as the kernel's dm-verity computes them.

use crate::{VerityError, BLOCK, DIGEST_LEN};

/// Hashes one hash block holds (4096 / 32).
pub const HASHES_PER_BLOCK: u64 = BLOCK / DIGEST_LEN as u64;
const BITS: u32 = HASHES_PER_BLOCK.trailing_zeros();

/// The shape of a tree over `data_blocks` blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Data blocks hashed.
    pub data_blocks: u64,
    /// Blocks of each level, level 0 (hashing the data) first.
    pub level_blocks: Vec<u64>,
}

impl Geometry {
    /// The geometry over `data_size` bytes (a positive multiple of [`BLOCK`]).
    pub fn new(data_size: u64) -> Result<Self, VerityError> {
        if data_size == 0 || !data_size.is_multiple_of(BLOCK) {
            return Err(VerityError::DataSize(data_size));
        }
        let data_blocks = data_size / BLOCK;
        // The kernel's rule (dm-verity-target.c): the fewest levels whose fan-out covers
        // every block; one data block needs none (its hash is the root).
        let mut levels = 0u32;
        while BITS * levels < 64 && (data_blocks - 1) >> (BITS * levels) != 0 {
            levels += 1;
        }
        let level_blocks = (0..levels)
            .map(|i| {
                let shift = BITS * (i + 1);
                if shift >= 64 {
                    1
                } else {
                    data_blocks.div_ceil(1u64 << shift)
                }
            })
            .collect();
        Ok(Geometry {
            data_blocks,
            level_blocks,
        })
    }

    /// Number of levels.
    pub fn levels(&self) -> usize {
        self.level_blocks.len()
    }

    /// Hash blocks of the whole tree.
    pub fn tree_blocks(&self) -> u64 {
        self.level_blocks.iter().sum()
    }

    /// Block offset of `level` from the tree's start (the top level is stored first).
    pub fn level_start(&self, level: usize) -> u64 {
        self.level_blocks[level + 1..].iter().sum()
    }

    /// Size of an image whose superblock is at `hash_offset`: superblock and tree included.
    pub fn image_size(&self, hash_offset: u64) -> u64 {
        hash_offset + BLOCK + self.tree_blocks() * BLOCK
    }

    /// Checks that an image of `size` bytes is data, superblock at `hash_offset`, and tree.
    pub fn check_layout(&self, hash_offset: u64, size: u64) -> Result<(), VerityError> {
        let data_size = self.data_blocks * BLOCK;
        if hash_offset < data_size || !hash_offset.is_multiple_of(BLOCK) {
            return Err(VerityError::HashOffset {
                hash_offset,
                data_size,
            });
        }
        let expected = self.image_size(hash_offset);
        if size != expected {
            return Err(VerityError::ImageSize {
                found: size,
                expected,
                data_size,
                hash_offset,
            });
        }
        Ok(())
    }

    /// The data size of an image of `size` bytes whose tree directly follows its data,
    /// if one exists (used to recognise an image that already carries its tree).
    pub fn data_size_for_image(size: u64) -> Option<u64> {
        if !size.is_multiple_of(BLOCK) || size < 2 * BLOCK {
            return None;
        }
        let total = size / BLOCK - 1;
        // data + tree(data) = total, tree ~ data / 127: search near the estimate.
        let guess = total.saturating_mul(HASHES_PER_BLOCK - 1) / HASHES_PER_BLOCK;
        (guess.saturating_sub(16)..=(guess + 16).min(total)).find_map(|d| {
            let g = Geometry::new(d * BLOCK).ok()?;
            (d + g.tree_blocks() == total).then_some(d * BLOCK)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_the_kernel() {
        let g = |blocks: u64| Geometry::new(blocks * BLOCK).unwrap().level_blocks;
        assert_eq!(g(1), Vec::<u64>::new());
        assert_eq!(g(2), vec![1]);
        assert_eq!(g(128), vec![1]);
        assert_eq!(g(129), vec![2, 1]);
        assert_eq!(g(300), vec![3, 1]);
        assert_eq!(g(128 * 128), vec![128, 1]);
        assert_eq!(g(128 * 128 + 1), vec![129, 2, 1]);
        let big = Geometry::new(300 * BLOCK).unwrap();
        assert_eq!(big.tree_blocks(), 4);
        // Top level first.
        assert_eq!(big.level_start(1), 0);
        assert_eq!(big.level_start(0), 1);
        assert_eq!(big.image_size(300 * BLOCK), 305 * BLOCK);
    }

    #[test]
    fn bad_sizes_and_layouts_are_named() {
        assert_eq!(Geometry::new(0), Err(VerityError::DataSize(0)));
        assert_eq!(Geometry::new(4095), Err(VerityError::DataSize(4095)));
        let g = Geometry::new(300 * BLOCK).unwrap();
        assert!(g.check_layout(300 * BLOCK, 305 * BLOCK).is_ok());
        assert!(matches!(
            g.check_layout(299 * BLOCK, 304 * BLOCK),
            Err(VerityError::HashOffset { .. })
        ));
        let e = g.check_layout(300 * BLOCK, 306 * BLOCK).unwrap_err();
        assert!(e.to_string().contains("1253376"), "{e}");
    }

    #[test]
    fn an_appended_tree_is_recognised_by_size() {
        for blocks in [1u64, 2, 127, 128, 129, 300, 16_385, 40_000] {
            let g = Geometry::new(blocks * BLOCK).unwrap();
            let size = g.image_size(blocks * BLOCK);
            assert_eq!(
                Geometry::data_size_for_image(size),
                Some(blocks * BLOCK),
                "{blocks}"
            );
        }
        assert_eq!(Geometry::data_size_for_image(4096 * 7 + 1), None);
    }
}
