//! What every connection shares: settings, keys, the push lock, the exec slots, pull's state.

use std::sync::Arc;
use std::time::Duration;

use keel_proto::manifest::VerifyingKey;
use tokio::sync::{Mutex, Semaphore};

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
    /// Keys from `[exec] authorized_keys` (empty without the table).
    pub authorized: Vec<VerifyingKey>,
    /// One permit per process that may run at once.
    pub exec_slots: Arc<Semaphore>,
    /// `[exec] max_processes`.
    pub exec_slots_max: usize,
    /// The processes `exec` started.
    pub procs: crate::procs::Registry,
    /// The fingerprint of the agent's TLS identity, when it serves TCP.
    pub identity: Option<String>,
    /// Pull mode's state for `status` (`None` without `[pull]`).
    pub pull: std::sync::Mutex<Option<keel_proto::message::PullStatus>>,
    /// Wakes the pull loop for a poll now (`pull-now`).
    pub pull_now: tokio::sync::Notify,
    /// The chunks of the images the device holds, found so far (deltas).
    pub seeds: crate::seeds::SeedCache,
    /// How the last image staged since start came (push or pull, delta or full).
    pub last_transfer: std::sync::Mutex<Option<keel_proto::message::Transfer>>,
}

impl Shared {
    /// The shared state for `config`, the trusted `keys` and the `authorized` keys.
    pub fn new(config: Config, keys: Vec<VerifyingKey>, authorized: Vec<VerifyingKey>) -> Shared {
        let max = config.exec.as_ref().map_or(1, |e| e.max_processes);
        Shared {
            idle: Duration::from_secs(config.idle_timeout_secs),
            config,
            keys,
            push: Mutex::new(()),
            authorized,
            exec_slots: Arc::new(Semaphore::new(max)),
            exec_slots_max: max,
            procs: crate::procs::Registry::default(),
            identity: None,
            pull: std::sync::Mutex::new(None),
            pull_now: tokio::sync::Notify::new(),
            seeds: crate::seeds::SeedCache::default(),
            last_transfer: std::sync::Mutex::new(None),
        }
    }

    /// Remembers how the image just staged came, for `status`.
    pub fn record(&self, t: keel_proto::message::Transfer) {
        tracing::info!(
            "staged version {} by {}{}: {} bytes received, {} reused, {} of index",
            t.version,
            t.how,
            if t.delta { " (delta)" } else { "" },
            t.received,
            t.reused,
            t.index
        );
        *self.last_transfer.lock().expect("transfer state") = Some(t);
    }
}
