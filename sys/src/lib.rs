//! keel-sys: the few file-system and socket calls that more than one of keel's binaries make,
//! written once.
//!
//! | module | what it is for |
//! |---|---|
//! | [`dm`] | device-mapper ioctls: create, load a table, resume, read the table, remove |
//! | [`durable`] | crash-safe writes (exclusive temp file, fsync, rename, fsync dir) and bounded reads of regular files only |
//! | [`random`] | random bytes from the kernel (auth challenges) |
//! | [`state`] | the one loader and writer of `keel-state.json` |
//! | [`vsock`] | AF_VSOCK through four libc calls |
//! | [`watchdog`] | `/dev/watchdog` armed for a trial boot, disarmed by its confirmation |
//!
//! Every write step takes a [`durable::Hook`], called after the step: initstage passes its
//! failpoint so tests can cut the power after each one; everyone else passes
//! [`durable::no_hook`].
#![warn(missing_docs)]

pub mod dm;
pub mod durable;
pub mod random;
pub mod state;
pub mod vsock;
pub mod watchdog;
