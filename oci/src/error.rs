//! What can go wrong reading an OCI image, each error naming the image, blob or entry.

use std::path::PathBuf;

/// Why an image could not be read or applied.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The image reference is not one keel reads.
    #[error("image reference {reference:?}: {why}")]
    Reference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        why: String,
    },
    /// A file could not be read or written.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The step.
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// An index, manifest or config that does not parse or is not what was expected.
    #[error("{what}: {why}")]
    Spec {
        /// Which document.
        what: String,
        /// What was wrong.
        why: String,
    },
    /// A blob's bytes do not hash to the digest that names it.
    #[error("blob {digest}: its bytes hash to {actual} ({size} bytes): corrupt or tampered")]
    Digest {
        /// The digest the manifest gave.
        digest: String,
        /// What the bytes hash to.
        actual: String,
        /// How many bytes were read.
        size: u64,
    },
    /// A layer entry that keel refuses (escapes the root, unsupported type, bad header).
    #[error("layer {layer}: entry {entry:?}: {why}")]
    Entry {
        /// The layer's digest.
        layer: String,
        /// The entry's path as the tar gives it.
        entry: String,
        /// Why it is refused.
        why: String,
    },
    /// A layer that is not a readable tar stream (truncated, bad compression).
    #[error("layer {layer}: {why}")]
    Layer {
        /// The layer's digest.
        layer: String,
        /// What was wrong.
        why: String,
    },
}

/// Shorthand for an [`OciError::Io`].
pub fn io(path: impl Into<PathBuf>, op: &'static str) -> impl FnOnce(std::io::Error) -> OciError {
    let path = path.into();
    move |source| OciError::Io { path, op, source }
}
