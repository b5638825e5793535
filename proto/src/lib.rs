//! keel-proto: the types that keel's parts share, with no I/O.
//!
//! | module | what it is for |
//! |---|---|
//! | [`hex`] | lower-case hex for digests and signatures |
//! | [`manifest`] | the signed image manifest, its canonical bytes, key loading and verification |
//! | [`chunks`] | content-defined chunks, the chunk index and its signed binding: delta updates |
//! | [`imagecheck`] | an image's bytes against its manifest as they stream: SHA-256 and the verity tree |
//! | [`bootstate`] | the boot state on the `img` partition: current/old image, trial, events |
//! | [`report`] | `/run/keel/boot.json`: what initstage did this boot |
//! | [`endpoint`] | `tcp://`, `unix://`, `vsock://`, `hvsock://` endpoint strings |
//! | [`persist`] | changes to `persistent/` staged by `keelctl persist`, applied by initstage |
//! | [`layout`] | file names on the partitions, derived from the image name |
//! | [`wire`] | length-prefixed frames with a size limit: the one encoder and header check |
//! | [`message`] | the typed requests and responses carried in frames |
//! | [`exec`] | remote processes and key authentication: stream frame kinds, the signed challenge, key fingerprints |
//! | [`channel`] | a pull channel's files: the manifest's and the images' paths under its URL |
//! | [`runconfig`] | a container image's program: entrypoint, env, cwd, user, and what init starts |
//! | [`moddep`] | `modules.dep`: which kernel modules to load or pack, in order |
//!
//! Everything here is pure: callers read and write the bytes.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bootstate;
pub mod channel;
pub mod chunks;
pub mod endpoint;
pub mod exec;
pub mod hex;
pub mod imagecheck;
pub mod layout;
pub mod manifest;
pub mod message;
pub mod moddep;
pub mod persist;
pub mod report;
pub mod runconfig;
pub mod wire;
