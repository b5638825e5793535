//! The daemon's errors, each naming what it was doing and on which path or address.

use std::path::PathBuf;

/// Errors of the daemon (config, listeners, keys).
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
    /// The authorized keys (`[exec] authorized_keys`) could not be loaded.
    #[error("authorized keys {path}: {detail} (fix or remove the [exec] table in agent.toml)")]
    AuthorizedKeys {
        /// The PEM file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The agent's own key (`identity`) could not be loaded or made.
    #[error("agent identity {path}: {detail}")]
    Identity {
        /// The private key file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The trusted keys could not be loaded.
    #[error("trusted keys {path}: {detail}")]
    Keys {
        /// The PEM file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Pull mode's TLS client could not be set up (`[pull] ca_file`).
    #[error("{0} (fix it or remove the [pull] table in agent.toml)")]
    Pull(String),
}

/// Shorthand.
pub type Result<T, E = Error> = std::result::Result<T, E>;
