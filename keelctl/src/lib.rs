//! keelctl's library: the blocking client that `keelctl` and the tests use to talk to
//! keel-agent. Host side: the device agent never links it.
//!
//! | module | what it is for |
//! |---|---|
//! | [`stream`] | opening an endpoint: TCP, Unix socket, vsock, hybrid vsock (`CONNECT`/`OK`) |
//! | [`tls`] | TLS 1.3 on TCP: the agent's raw public key checked, a stream two threads share |
//! | [`known`] | which agent key to expect: pinned, or remembered on first use (known_agents) |
//! | [`client`] | hello, requests, frames, and a push that resumes after a cut |
//! | [`push`] | a push: whole, or only the chunks the agent lacks; resumed after a cut |
//! | [`exec`] | an exec: its streams both ways, signals, the exit status |
//! | [`files`] | `cp` both ways, streamed, written locally by temp file and rename |
//! | [`error`] | the client's errors, each naming the peer or path |
//!
//! The commands themselves are one file each under `src/cmd/` of the `keelctl` binary.
#![warn(missing_docs)]

pub mod client;
pub mod error;
pub mod exec;
pub mod files;
pub mod known;
pub mod push;
pub mod stream;
pub mod tls;

pub use keel_proto::endpoint::Endpoint;
