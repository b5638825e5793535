//! What every connection shares: settings, keys, the push lock.

use std::time::Duration;

use keel_proto::manifest::VerifyingKey;
use tokio::sync::Mutex;

use crate::config::Config;

/// What every connection shares.
#[derive(Debug)]
pub struct Shared {
    /// The settings.
    pub config: Config,
    /// Trusted public keys.
    pub keys: Vec<VerifyingKey>,
    /// Held for the duration of a push: one at a time.
    pub push: Mutex<()>,
    /// Idle-read timeout.
    pub idle: Duration,
}

impl Shared {
    /// The shared state for `config` and `keys`.
    pub fn new(config: Config, keys: Vec<VerifyingKey>) -> Shared {
        Shared {
            idle: Duration::from_secs(config.idle_timeout_secs),
            config,
            keys,
            push: Mutex::new(()),
        }
    }
}
