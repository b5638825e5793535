//! The agent's and client's errors, each naming what it was doing and on which path or peer.

use std::path::PathBuf;

use keel_proto::message::ErrorCode;

/// Errors of the agent library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file is wrong.
    #[error("config {path}: {detail}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A listener could not be set up.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The trusted keys could not be loaded.
    #[error("trusted keys {path}: {detail}")]
    Keys {
        /// The PEM file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// An endpoint string did not parse.
    #[error("endpoint {0:?}: expected tcp://HOST:PORT, unix:///PATH, vsock://CID:PORT or hvsock:///PATH:PORT")]
    Endpoint(String),
    /// Connecting to an endpoint failed.
    #[error("connect to {endpoint}: {detail}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// What happened.
        detail: String,
    },
    /// The peer broke the protocol.
    #[error("protocol error with {peer}: {detail}")]
    Protocol {
        /// The peer.
        peer: String,
        /// What was wrong.
        detail: String,
    },
    /// The agent refused a request.
    #[error("agent refused ({code}): {message}")]
    Refused {
        /// The class.
        code: Code,
        /// The agent's reason.
        message: String,
    },
    /// The connection failed mid-exchange.
    #[error("{op} with {peer}: {source}")]
    Net {
        /// What was being done.
        op: &'static str,
        /// The peer.
        peer: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// An [`ErrorCode`] that prints as its wire name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code(pub ErrorCode);

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_string(&self.0).unwrap_or_default();
        f.write_str(s.trim_matches('"'))
    }
}

/// Shorthand.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds the operation and path to an `io::Result`.
pub trait IoContext<T> {
    /// Wraps the error with `op` and `path`.
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            op,
            path: path.into(),
            source,
        })
    }
}
