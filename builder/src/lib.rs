//! keel-build: what the host builds for a device. Host side only: `keel-agent` never links
//! this crate.
//!
//! | module | what it is for |
//! |---|---|
//! | [`initramfs`] | `keelctl initramfs`: cpio newc + gzip with initstage, modules from `modules.dep`, keys |
//! | [`rootimg`] | root images (squashfs, erofs) from a directory tree, reproducibly |
//! | [`error`] | the builders' errors, each naming the path and what was wrong |
#![warn(missing_docs)]

pub mod error;
pub mod initramfs;
pub mod rootimg;
