//! `keel-agent`: receives signed images and stages them on `newimg`; reports status;
//! ends trials and reboots for local root.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use keel_agent::config::{Config, DEFAULT_CONFIG};
use keel_agent::server;

/// keel's in-guest update agent.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Config file (a missing default file means all defaults).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Listen on this TCP address (HOST:PORT).
    #[arg(long)]
    tcp: Option<String>,
    /// Listen on this Unix socket ("" disables it).
    #[arg(long)]
    unix: Option<String>,
    /// Listen on this vsock port.
    #[arg(long)]
    vsock: Option<u32>,
    /// Trusted public keys (PEM).
    #[arg(long)]
    keys: Option<PathBuf>,
    /// The agent's own key for TLS on TCP (made when missing).
    #[arg(long)]
    identity: Option<PathBuf>,
    /// initstage's run directory.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Where newimg is mounted.
    #[arg(long)]
    newimg_dir: Option<PathBuf>,
    /// Where img is mounted.
    #[arg(long)]
    img_dir: Option<PathBuf>,
    /// initstage's boot report.
    #[arg(long)]
    boot_report: Option<PathBuf>,
    /// Product name images must carry.
    #[arg(long)]
    name: Option<String>,
    /// Seconds a silent peer is kept.
    #[arg(long)]
    idle_timeout: Option<u64>,
    /// Concurrent connections.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Announce readiness to vsock://CID:PORT or tcp://HOST:PORT.
    #[arg(long)]
    announce: Option<String>,
    /// Check the config and keys, then exit.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    // As a container image's init (the kernel's argv is not ours to parse).
    if rustix::process::getpid().is_init() {
        keel_agent::pid1::run();
    }
    keel_agent::memory::tune();
    let a = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .init();
    let path = a.config.clone().unwrap_or_else(|| DEFAULT_CONFIG.into());
    let mut c = Config::load(&path, a.config.is_some())?;
    if let Some(v) = a.tcp {
        c.tcp = Some(v);
    }
    if let Some(v) = a.unix {
        c.unix = v;
    }
    if let Some(v) = a.vsock {
        c.vsock_port = Some(v);
    }
    if let Some(v) = a.keys {
        c.trusted_keys = v;
    }
    if let Some(v) = a.identity {
        c.identity = v;
    }
    if let Some(v) = a.run_dir {
        c.run_dir = v;
    }
    if let Some(v) = a.newimg_dir {
        c.newimg_dir = Some(v);
    }
    if let Some(v) = a.img_dir {
        c.img_dir = Some(v);
    }
    if let Some(v) = a.boot_report {
        c.boot_report = Some(v);
    }
    if let Some(v) = a.name {
        c.name = Some(v);
    }
    if let Some(v) = a.idle_timeout {
        c.idle_timeout_secs = v;
    }
    if let Some(v) = a.max_connections {
        c.max_connections = v;
    }
    if let Some(v) = a.announce {
        c.announce = Some(v);
    }
    c.check(&path)?;
    let keys = match std::fs::read_to_string(&c.trusted_keys) {
        Ok(pem) => keel_proto::manifest::public_keys_from_pem(&pem)
            .with_context(|| format!("trusted keys {}", c.trusted_keys.display()))?,
        Err(e) => {
            // Status still works; every push is refused until keys are installed.
            tracing::error!(
                "trusted keys {}: {e}: every push will be refused",
                c.trusted_keys.display()
            );
            Vec::new()
        }
    };
    // Fail closed: an [exec] table whose keys cannot be read stops the agent, saying which.
    let authorized = match &c.exec {
        Some(e) => keel_agent::auth::load_authorized(&e.authorized_keys)?,
        None => Vec::new(),
    };
    // TCP is served over TLS only: its identity is made (first start) or loaded here.
    let identity = match &c.tcp {
        Some(_) => {
            let id = keel_agent::identity::Identity::load_or_create(&c.identity)?;
            tracing::info!(
                path = %id.path.display(),
                key = %id.fingerprint(),
                "{} agent identity",
                if id.created { "created" } else { "loaded" }
            );
            if let Some(fs) = keel_agent::identity::volatile(&id.path) {
                tracing::warn!(
                    path = %id.path.display(),
                    "the agent identity is on {fs}: if it does not survive a reboot, clients \
                     that remember this key will refuse the next one; set `identity` in \
                     agent.toml to a path on persistent storage (on a keel-booted device: \
                     /run/keel/img/keel-identity.pem)"
                );
            }
            Some(id)
        }
        None => None,
    };
    if a.check {
        println!(
            "config ok, {} trusted key(s), {} authorized key(s){}",
            keys.len(),
            authorized.len(),
            identity
                .as_ref()
                .map(|i| format!(", identity {}", i.fingerprint()))
                .unwrap_or_default()
        );
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(server::run(c, keys, authorized, identity))?;
    Ok(())
}
