//! keel-build: what the host builds for a device. Host side only: `keel-agent` never links
//! this crate.
//!
//! | module | what it is for |
//! |---|---|
//! | [`initramfs`] | `keelctl initramfs`: cpio newc (gzip or zstd) with initstage, modules from `modules.dep`, keys |
//! | [`rootimg`] | root images (squashfs, erofs) from a directory tree, reproducibly |
//! | [`cpio_tree`] | a whole tree as a cpio newc initramfs, streamed, reproducibly |
//! | [`compress`] | gzip or zstd, into a temporary file renamed into place when complete |
//! | [`disk`] | factory disks: GPT, ext4 partitions labelled `img`, `overlay`, `newimg`, `boot` |
//! | [`error`] | the builders' errors, each naming the path and what was wrong |
#![warn(missing_docs)]

pub mod compress;
pub mod cpio_tree;
pub mod disk;
pub mod error;
pub mod initramfs;
pub mod rootimg;
