//! The daemon: bind the listeners, announce readiness, serve connections under the
//! [`crate::admission`] limits,
//! stop on SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use keel_proto::exec::{TLS_BINDING_LABEL, TLS_BINDING_LEN};
use keel_proto::manifest::VerifyingKey;
use keel_proto::message::{message_frame, Announce, ErrorCode, Response};
use keel_sys::vsock;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::admission::{Full, Gate};
use crate::config::Config;
use crate::error::Error;
use crate::identity::Identity;
use crate::shared::Shared;
use crate::status::Facts;
use crate::transport::{Conn, Listener, Peer};
use crate::{notify, session, tls};

/// Binds every configured listener; TCP needs the agent's identity for its TLS.
pub async fn bind(config: &Config, identity: Option<&Identity>) -> Result<Vec<Listener>, Error> {
    let mut ls = Vec::new();
    if !config.unix.is_empty() {
        ls.push(Listener::unix(std::path::Path::new(&config.unix))?);
    }
    if let Some(a) = &config.tcp {
        let id = identity.ok_or_else(|| Error::Identity {
            path: config.identity.clone(),
            detail: "TCP needs the agent's identity for TLS".into(),
        })?;
        ls.push(Listener::tcp(a, tls::acceptor(id)?).await?);
    }
    if let Some(p) = config.vsock_port {
        // A VM started without a vsock device must still be reachable over the others.
        match Listener::vsock(p) {
            Ok(l) => ls.push(l),
            Err(e) if !ls.is_empty() => tracing::error!("{e}: serving without vsock"),
            Err(e) => return Err(e),
        }
    }
    Ok(ls)
}

/// Serves until SIGTERM or SIGINT.
pub async fn run(
    config: Config,
    keys: Vec<VerifyingKey>,
    authorized: Vec<VerifyingKey>,
    identity: Option<Identity>,
) -> Result<(), Error> {
    // A bad ca_file, client certificate or secret stops the agent here, before it says it is ready.
    let pull_client = match &config.pull {
        Some(p) => Some(crate::pull::client(p).map_err(Error::Pull)?),
        None => None,
    };
    let listeners = bind(&config, identity.as_ref()).await?;
    let names: Vec<String> = listeners.iter().map(Listener::describe).collect();
    tracing::info!(listening = %names.join(" "), keys = keys.len(), "keel-agent ready");
    let mut shared = Shared::new(config, keys, authorized);
    shared.identity = identity.as_ref().map(Identity::fingerprint);
    let shared = Arc::new(shared);
    let gate = Gate::new(
        shared.config.max_connections,
        shared.config.max_connections_per_peer,
    );
    notify::notify(&format!("READY=1\nSTATUS=listening on {}", names.join(" ")));
    // systemd's WatchdogSec=: pinged from the runtime, so a runtime that hangs stops them and
    // systemd restarts the agent.
    if let Some(every) = notify::watchdog_interval() {
        tracing::info!(
            "systemd watchdog: WATCHDOG=1 every {} ms",
            every.as_millis()
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                notify::notify("WATCHDOG=1");
            }
        });
    }
    if let Some(to) = shared.config.announce.clone() {
        let config = shared.config.clone();
        let names = names.clone();
        tokio::spawn(async move { announce(&to, &config, names).await });
    }
    let mut tasks = Vec::new();
    if let Some(p) = shared.config.pull.clone() {
        let client = pull_client.clone().expect("made with the config");
        tracing::info!(url = %p.url, interval_secs = p.interval_secs, "pull: polling the channel");
        // Set before any listener accepts: `status` names the channel from the first request.
        *shared.pull.lock().expect("pull state") = Some(keel_proto::message::PullStatus {
            url: p.url.clone(),
            ..Default::default()
        });
        tasks.push(tokio::spawn(crate::pull::run(shared.clone(), p, client)));
    }
    for l in listeners {
        tasks.push(tokio::spawn(accept_loop(l, shared.clone(), gate.clone())));
    }
    // Chunk the images the device holds once, in the background: a delta then finds them
    // ready. A delta that comes first chunks them itself (the cache is shared).
    let warm = shared.clone();
    tokio::task::spawn_blocking(move || {
        crate::seeds::warm(&crate::delta::held_images(&warm), &warm.seeds)
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| Error::Listen {
            addr: "SIGTERM".into(),
            source,
        })?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    notify::notify("STOPPING=1");
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await; // drops the listeners (removes the Unix socket)
    }
    // A push in progress keeps its partial file: the client resumes it later.
    if tokio::time::timeout(Duration::from_secs(5), shared.push.lock())
        .await
        .is_err()
    {
        tracing::info!("push still running after 5 s: leaving it to be resumed");
    }
    Ok(())
}

async fn accept_loop(l: Listener, sh: Arc<Shared>, gate: Gate) {
    loop {
        let (conn, peer) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(listener = %l.describe(), "accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ticket = gate.admit(&peer);
        let sh = sh.clone();
        tokio::spawn(async move {
            match conn {
                Conn::Unix(s) => match ticket {
                    Ok(_ticket) => session::serve(s, peer, sh, Vec::new()).await,
                    Err(full) => refuse_busy(s, peer, full).await,
                },
                Conn::Tcp(s, tls) => {
                    // The handshake comes first even for a refusal: the answer must reach
                    // the client inside its TLS session to be read at all.
                    let s = match tokio::time::timeout(sh.idle, tls.accept(s)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!(%peer, op = "connect", outcome = %format!("refused: TLS handshake: {e}"), "request");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%peer, op = "connect", outcome = "refused: TLS handshake timed out", "request");
                            return;
                        }
                    };
                    let binding = s
                        .get_ref()
                        .1
                        .export_keying_material(vec![0u8; TLS_BINDING_LEN], TLS_BINDING_LABEL, None)
                        .unwrap_or_default();
                    match ticket {
                        Ok(_ticket) => session::serve(s, peer, sh, binding).await,
                        Err(full) => refuse_busy(s, peer, full).await,
                    }
                }
            }
            crate::memory::give_back();
        });
    }
}

/// Answers `busy` and lets the client read it: the agent's side is half-closed and what the
/// client sends (its hello) is drained for up to a second, so neither a reset (TCP) nor a
/// broken pipe (Unix socket) loses the answer.
async fn refuse_busy<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, peer: Peer, full: Full) {
    tracing::info!(%peer, op = "connect", outcome = %format!("refused busy: {full}"), "request");
    let Ok(f) = message_frame(&Response::error(
        ErrorCode::Busy,
        format!("{full}: try again later"),
    )) else {
        return;
    };
    let answer = async {
        s.write_all(&f).await?;
        s.shutdown().await?;
        let mut sink = [0u8; 4096];
        while s.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// Connects out to the host and says "ready", retrying until it listens (up to 2 minutes).
pub async fn announce(to: &str, config: &Config, listening: Vec<String>) {
    let facts = Facts::read(config);
    let msg = Announce::Ready {
        agent: env!("CARGO_PKG_VERSION").to_string(),
        booted: facts.booted().cloned(),
        boot_count: facts.report.as_ref().map(|r| r.boot_count),
        listening,
    };
    let frame = match message_frame(&msg) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(%to, "announce: {e}");
            return;
        }
    };
    for attempt in 1..=120u32 {
        match send_once(to, &frame).await {
            Ok(()) => {
                tracing::info!(%to, attempt, "announced ready");
                return;
            }
            Err(e) if attempt == 1 || attempt % 30 == 0 => {
                tracing::info!(%to, attempt, "announce: {e} (retrying)")
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::warn!(%to, "announce gave up after 120 attempts");
}

async fn send_once(to: &str, frame: &[u8]) -> std::io::Result<()> {
    if let Some(addr) = to.strip_prefix("tcp://") {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(frame).await?;
        s.shutdown().await
    } else if let Some(rest) = to.strip_prefix("vsock://") {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "vsock://CID:PORT");
        let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
        let cid: u32 = cid.parse().map_err(|_| bad())?;
        let port: u32 = port.parse().map_err(|_| bad())?;
        let frame = frame.to_vec();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let fd = vsock::connect(cid, port)?;
            let mut s = std::os::unix::net::UnixStream::from(fd);
            s.write_all(&frame)?;
            s.shutdown(std::net::Shutdown::Write)
        })
        .await
        .map_err(std::io::Error::other)?
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "unknown scheme",
        ))
    }
}
