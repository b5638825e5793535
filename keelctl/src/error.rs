//! The client's errors, each naming what it was doing and with which peer or path.

use std::path::PathBuf;

use keel_proto::endpoint::EndpointError;
use keel_proto::message::ErrorCode;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A local file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An endpoint string did not parse.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// Connecting to an endpoint failed.
    #[error("connect to {endpoint}: {detail}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// What happened.
        detail: String,
    },
    /// The TLS session to an agent could not be set up.
    #[error("TLS with {endpoint}: {detail}")]
    Tls {
        /// The endpoint.
        endpoint: String,
        /// What happened.
        detail: String,
    },
    /// The agent's key is not the one expected (pinned, or remembered).
    #[error("{endpoint}: {detail}")]
    AgentKey {
        /// The endpoint.
        endpoint: String,
        /// Which key was seen and which expected, and what to do.
        detail: String,
    },
    /// `--agent-key FILE` could not be used.
    #[error("--agent-key {path}: {detail}")]
    AgentKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The known-agents file could not be read or written.
    #[error("known agents {path}: {detail}")]
    KnownAgents {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A local file is not what it should be (a chunk index that does not fit its manifest).
    #[error("{}: {detail}", path.display())]
    Input {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
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
        code: ErrorCode,
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

/// Shorthand.
pub type Result<T, E = Error> = std::result::Result<T, E>;
