//! keel's dm-verity hash trees, pure: no I/O, no syscalls.
//!
//! The layout is the one `veritysetup format` writes and the kernel's `verity` target reads
//! (format 1, SHA-256, 4 KiB data and hash blocks, a salt prepended to every hashed block):
//!
//! ```text
//! [ data: data_size bytes ][ gap ][ superblock: 4 KiB at hash_offset ][ tree, top level first ]
//! ```
//!
//! - [`geometry`]: how many levels and blocks a tree over `data_size` bytes has, and where
//!   each level lies.
//! - [`tree`]: the streaming builder: data in, hash blocks out level by level, then the root.
//! - [`superblock`]: the 512-byte veritysetup superblock (so `veritysetup verify` and
//!   `veritysetup open` work on keel images without extra arguments).
//! - [`check`]: a constant-memory check of a whole image stream (data, superblock, tree)
//!   against the root hash and salt of a signed manifest.

pub mod check;
pub mod geometry;
pub mod superblock;
pub mod tree;

pub use check::StreamCheck;
pub use geometry::Geometry;
pub use tree::TreeBuilder;

/// Data and hash block size, bytes.
pub const BLOCK: u64 = 4096;
/// [`BLOCK`] as a `usize`.
pub const BLOCK_USIZE: usize = 4096;
/// SHA-256 digest length.
pub const DIGEST_LEN: usize = 32;
/// The salt length keel writes (veritysetup's default).
pub const SALT_LEN: usize = 32;
/// Longest salt the superblock can hold.
pub const MAX_SALT_LEN: usize = 256;

/// Why a tree, superblock or image stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerityError {
    /// The data area is empty or not a whole number of blocks.
    #[error("verity data size {0} is not a positive multiple of 4096 bytes")]
    DataSize(u64),
    /// The superblock does not start at or after the end of the data, on a block boundary.
    #[error("verity hash offset {hash_offset} is not a multiple of 4096 at or after the data's end ({data_size})")]
    HashOffset {
        /// Where the superblock was said to be.
        hash_offset: u64,
        /// The data size.
        data_size: u64,
    },
    /// The image is not exactly data, superblock and tree.
    #[error("image is {found} bytes, a verity image with {data_size} data bytes and the superblock at {hash_offset} is {expected}")]
    ImageSize {
        /// The image size found.
        found: u64,
        /// The size the geometry gives.
        expected: u64,
        /// The data size.
        data_size: u64,
        /// The superblock offset.
        hash_offset: u64,
    },
    /// The salt is empty or longer than the superblock holds.
    #[error("verity salt is {0} bytes (1 to 256 allowed)")]
    SaltLen(usize),
    /// The superblock is not one this code reads, or disagrees with the manifest.
    #[error("verity superblock: {0}")]
    Superblock(String),
    /// The data does not hash to the expected root.
    #[error("the data's verity root hash is {computed}, the manifest says {expected}")]
    RootMismatch {
        /// Root computed from the data.
        computed: String,
        /// Root the manifest signed.
        expected: String,
    },
    /// A level of the stored tree is not the tree of the data.
    #[error("verity tree level {level} stored in the image does not match its data (corrupt or built with another salt)")]
    LevelMismatch {
        /// The level (0 hashes the data).
        level: usize,
    },
    /// The stream ended before the whole image or ran past it.
    #[error("verity check saw {found} bytes of a {expected}-byte image")]
    Length {
        /// Bytes seen.
        found: u64,
        /// Image size.
        expected: u64,
    },
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The parameters of the kernel's `verity` target for an image whose data and tree are on
/// the same device (`major:minor`), and its length in 512-byte sectors. `restart`: the
/// machine restarts when a corrupt block is read (`restart_on_corruption`); otherwise the
/// read fails with EIO.
pub fn table(
    device: &str,
    data_size: u64,
    hash_offset: u64,
    root_hex: &str,
    salt_hex: &str,
    restart: bool,
) -> (u64, String) {
    let mut p = format!(
        "1 {device} {device} {BLOCK} {BLOCK} {} {} sha256 {} {}",
        data_size / BLOCK,
        // The tree starts one block after the superblock.
        hash_offset / BLOCK + 1,
        root_hex.to_ascii_lowercase(),
        salt_hex.to_ascii_lowercase()
    );
    if restart {
        p.push_str(" 1 restart_on_corruption");
    }
    (data_size / 512, p)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_table_names_the_tree_after_the_superblock() {
        let (sectors, p) = super::table("7:0", 300 * 4096, 300 * 4096, "AB", "cd", true);
        assert_eq!(sectors, 2400);
        assert_eq!(
            p,
            "1 7:0 7:0 4096 4096 300 301 sha256 ab cd 1 restart_on_corruption"
        );
        assert!(!super::table("7:0", 4096, 8192, "a", "b", false)
            .1
            .contains("restart"));
    }
}
