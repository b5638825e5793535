//! keel-oci: container images in, for `keelctl build` (host side only; the device agent
//! never links it). Decisions are pure (what an entry does, which platform, what a reference
//! names); the network is in [`registry`], the file operations in [`unpack`], each relative to a directory fd that
//! cannot be left.
//!
//! | module | what |
//! |---|---|
//! | [`mod@reference`] | `docker://`, `oci:`, `docker-archive:`, `dir:` references |
//! | [`archive`] | a `docker save` archive: members located, config and layers checked |
//! | [`spec`] | index, manifest and config documents; platform choice |
//! | [`digest`] | `sha256:` digests, checked over a blob before it is used |
//! | [`layout`] | an OCI image layout on disk |
//! | [`registry`] | a registry (API v2): anonymous, basic or bearer auth, blobs checked as they arrive |
//! | [`entry`] | what a layer entry asks for: put, whiteout, opaque (pure) |
//! | [`unpack`] | layers applied to a directory tree |
//! | [`error`] | errors naming the image, blob or entry |
#![warn(missing_docs)]

pub mod archive;
pub mod digest;
pub mod entry;
pub mod error;
pub mod layout;
pub mod reference;
pub mod registry;
pub mod spec;
pub mod unpack;

pub use error::OciError;
