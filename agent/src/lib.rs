//! keel's in-guest agent (`keel-agent`) and its host-side client (`keelctl`).
//!
//! | module | concern |
//! |---|---|
//! | [`config`] | `/etc/keel/agent.toml` |
//! | [`transport`] | listeners (TCP, Unix socket, vsock) and peers |
//! | [`vsock`] | AF_VSOCK through libc |
//! | [`session`] | one connection: hello, requests, timeouts, limits |
//! | [`verify`] | whether a manifest may be staged (pure) |
//! | [`stage`] | receiving into `newimg` crash-safely with constant memory |
//! | [`status`] | what the device runs and holds |
//! | [`control`] | mark-good and reboot |
//! | [`notify`] | sd_notify |
//! | [`server`] | the daemon: bind, announce, serve, shut down |
//! | [`client`] | the blocking client keelctl and the tests use |
//! | [`initramfs`] | `keelctl initramfs`: cpio newc + gzip, modules from `modules.dep` |
#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod control;
pub mod error;
pub mod initramfs;
pub mod notify;
pub mod server;
pub mod session;
pub mod stage;
pub mod status;
pub mod transport;
pub mod verify;
pub mod vsock;
