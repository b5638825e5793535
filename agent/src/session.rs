//! One connection: hello, then requests one at a time, each authorized by
//! [`authz::authorize`] before it is dispatched (pushes to [`intake`]). Every read is bounded
//! by the idle timeout and every frame by [`MAX_FRAME`]; a peer that breaks the protocol gets
//! an error naming what was wrong and is disconnected. Generic over the stream: the tests
//! drive it over `tokio::io::duplex`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_proto::message::{ErrorCode, Request, Response};
use keel_proto::wire::{MAX_FRAME, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::attach;
use crate::auth::{self, Challenge};
use crate::authz::{self, Caller};
use crate::conn::{Conn, ReadError};
use crate::control;
use crate::exec;
use crate::files;
use crate::intake;
use crate::shared::Shared;
use crate::status;
use crate::transport::Peer;

/// The outcome of one request, for the log line.
#[derive(Debug)]
pub struct Outcome {
    /// The reply.
    pub response: Response,
    /// Image bytes received.
    pub bytes: u64,
    /// Close the connection after the reply.
    pub close: bool,
    /// Reboot after the reply.
    pub reboot: bool,
}

impl Outcome {
    /// A plain reply.
    pub fn reply(response: Response) -> Outcome {
        Outcome {
            response,
            bytes: 0,
            close: false,
            reboot: false,
        }
    }

    /// The client left before the data: an error that closes the connection.
    pub fn gone(why: &str) -> Outcome {
        Outcome {
            close: true,
            ..Outcome::reply(Response::error(ErrorCode::Io, why))
        }
    }

    /// A read of `what` failed: a protocol error is the reply; a lost or silent client is
    /// told (if still there) why the connection closes.
    pub fn cut(e: &crate::conn::ReadError, idle: std::time::Duration, what: &str) -> Outcome {
        let response = match e {
            crate::conn::ReadError::Protocol(r) => Response::from(r.clone()),
            crate::conn::ReadError::Timeout => {
                Response::error(ErrorCode::Timeout, format!("{what}: {}", e.describe(idle)))
            }
            other => Response::error(ErrorCode::Io, format!("{what}: {}", other.describe(idle))),
        };
        Outcome {
            close: true,
            ..Outcome::reply(response)
        }
    }
}

fn summary(r: &Response) -> String {
    match r {
        Response::Error { code, message } => {
            format!("refused {code}: {message}")
        }
        Response::Staged { image, .. } => format!("staged version {}", image.version),
        Response::UpToDate { message } | Response::Done { message } => message.clone(),
        Response::Status(_) => "ok".into(),
        Response::Hello { .. } => "ok".into(),
        Response::Send { offset } => format!("send from {offset}"),
        Response::SendIndex { size } => format!("send the {size}-byte chunk index"),
        Response::SendChunks { chunks, bytes, .. } => {
            format!("send {chunks} chunks ({bytes} bytes)")
        }
        Response::Authenticated { key } => format!("authenticated as {key}"),
        Response::Started { pid, id } => format!("process {id}, pid {pid}"),
        Response::Dropped { bytes } => format!("{bytes} bytes dropped"),
        Response::Processes { processes } => format!("{} processes", processes.len()),
        Response::Sending { size, .. } => format!("sending {size} bytes"),
        Response::Exited(st) => match (st.code, st.signal) {
            (Some(c), _) => format!("exited {c}"),
            (None, Some(s)) if st.timed_out => format!("killed by signal {s} at its timeout"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "ended".into(),
        },
    }
}

/// What a session knows of its caller beyond the peer.
#[derive(Debug, Default)]
pub struct Session {
    /// This session's challenge (none if the kernel gave no random bytes).
    pub challenge: Option<Challenge>,
    /// The fingerprint of the key the session authenticated with.
    pub key: Option<String>,
    /// The transport's channel binding (TLS: exported keying material), which an `auth`
    /// signature must cover; empty where there is none (Unix socket, vsock).
    pub binding: Vec<u8>,
}

/// Serves one connection to its end. `binding` is the transport's channel binding (see
/// [`Session::binding`]).
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    peer: Peer,
    sh: Arc<Shared>,
    binding: Vec<u8>,
) {
    let mut io = Conn { s, idle: sh.idle };
    let mut session = Session {
        challenge: Challenge::new(),
        key: None,
        binding,
    };
    // Hello first.
    let t0 = Instant::now();
    match io.request().await {
        Ok(Request::Hello { protocol, client }) => {
            if protocol != PROTOCOL_VERSION {
                let r = Response::error(
                    ErrorCode::UnsupportedProtocol,
                    format!(
                        "client speaks protocol {protocol}, this agent speaks {PROTOCOL_VERSION}"
                    ),
                );
                tracing::info!(%peer, op = "hello", outcome = %summary(&r), "request");
                let _ = io.send(&r).await;
                return;
            }
            tracing::debug!(%peer, %client, "hello");
            let r = Response::Hello {
                protocol: PROTOCOL_VERSION,
                agent: env!("CARGO_PKG_VERSION").to_string(),
                max_frame: u32::try_from(MAX_FRAME).expect("the frame limit fits a u32"),
                challenge: session.challenge.as_ref().map(Challenge::hex),
            };
            if io.send(&r).await.is_err() {
                return;
            }
        }
        Ok(other) => {
            let r = Response::error(
                ErrorCode::BadRequest,
                format!("expected hello first, got {}", other.op()),
            );
            tracing::info!(%peer, op = other.op(), outcome = %summary(&r), "request");
            let _ = io.send(&r).await;
            return;
        }
        Err(e) => {
            log_read_error(&peer, &e, io.idle, t0);
            if let ReadError::Protocol(r) = e {
                let _ = io.send(&Response::from(r)).await;
            }
            return;
        }
    }
    // A remote connection lives at most max_session_secs (checked between requests: a push
    // in progress is not cut); the local socket is not limited.
    let lifetime = Duration::from_secs(sh.config.max_session_secs);
    let deadline =
        (!matches!(peer, Peer::Unix { .. })).then(|| tokio::time::Instant::from_std(t0) + lifetime);
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, io.request()).await {
                Ok(r) => r,
                Err(_) => {
                    let r = Response::error(
                        ErrorCode::Timeout,
                        format!(
                            "this connection is {} s old (max_session_secs): reconnect",
                            lifetime.as_secs()
                        ),
                    );
                    tracing::info!(%peer, op = "read", outcome = %summary(&r), "request");
                    let _ = io.send(&r).await;
                    return;
                }
            },
            None => io.request().await,
        };
        let req = match next {
            Ok(r) => r,
            Err(ReadError::Eof) => return,
            Err(e) => {
                log_read_error(&peer, &e, io.idle, Instant::now());
                match e {
                    ReadError::Protocol(r) => {
                        let _ = io.send(&Response::from(r)).await;
                    }
                    ReadError::Timeout => {
                        let _ = io
                            .send(&Response::error(
                                ErrorCode::Timeout,
                                format!("idle for {} s: disconnecting", io.idle.as_secs()),
                            ))
                            .await;
                    }
                    _ => {}
                }
                return;
            }
        };
        let t = Instant::now();
        let op = req.op();
        let out = handle(&mut io, &peer, &sh, &mut session, req).await;
        tracing::info!(
            %peer,
            who = session.key.as_deref().unwrap_or("-"),
            op,
            outcome = %summary(&out.response),
            bytes = out.bytes,
            ms = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
            "request"
        );
        let sent = io.send(&out.response).await;
        if out.reboot {
            // After the reply is out, so the client learns it was accepted.
            let _ = io.s.shutdown().await;
            let cmd = sh.config.reboot_command.clone();
            let r = tokio::task::spawn_blocking(move || control::reboot(cmd.as_deref()))
                .await
                .expect("reboot task");
            if let Err(r) = r {
                tracing::error!("reboot failed: {}", r.message);
            }
            return;
        }
        if sent.is_err() || out.close {
            return;
        }
    }
}

fn log_read_error(peer: &Peer, e: &ReadError, idle: Duration, t: Instant) {
    match e {
        ReadError::Eof => {}
        _ => tracing::info!(
            %peer,
            op = "read",
            outcome = %format!("dropped: {}", e.describe(idle)),
            ms = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
            "request"
        ),
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Conn<S>,
    peer: &Peer,
    sh: &Arc<Shared>,
    session: &mut Session,
    req: Request,
) -> Outcome {
    let caller = Caller {
        peer,
        key: session.key.as_deref(),
    };
    let who = match authz::authorize(&req, caller, sh.config.exec.as_ref()) {
        Ok(w) => w.map(|p| p.to_string()).unwrap_or_default(),
        Err(r) => return Outcome::reply(Response::from(r)),
    };
    match req {
        Request::Auth {
            public_key,
            signature,
        } => {
            let checked = match &session.challenge {
                Some(c) => auth::check(
                    &public_key,
                    &signature,
                    c,
                    &session.binding,
                    &sh.authorized,
                    sh.config.exec.as_ref().map(|e| e.authorized_keys.as_path()),
                ),
                None => Err(crate::verify::Refusal::new(
                    ErrorCode::Unavailable,
                    "the kernel gave no random bytes for a challenge: no session can authenticate",
                )),
            };
            Outcome::reply(match checked {
                Ok(key) => {
                    session.key = Some(key.clone());
                    Response::Authenticated { key }
                }
                Err(r) => Response::from(r),
            })
        }
        Request::Exec(spec) => {
            let detach = spec.detach;
            match exec::start(sh, spec, who).await {
                Err(r) => Outcome::reply(Response::from(r)),
                Ok(p) if detach => Outcome::reply(Response::Started {
                    pid: p.pid,
                    id: p.id,
                }),
                Ok(p) => attach::serve(io, sh, p).await,
            }
        }
        Request::Attach { id } => match sh.procs.get(id) {
            None => Outcome::reply(Response::error(
                ErrorCode::NotFound,
                format!("no process {id} (keelctl ps lists them)"),
            )),
            Some(p) => match attach::claim(&p) {
                Err(r) => Outcome::reply(Response::from(r)),
                Ok(()) => attach::serve(io, sh, p).await,
            },
        },
        Request::Ps => Outcome::reply(Response::Processes {
            processes: sh.procs.list(),
        }),
        Request::Kill { id, signal } => Outcome::reply(match sh.procs.get(id) {
            _ if !(1..=64).contains(&signal) => Response::error(
                ErrorCode::BadRequest,
                format!("signal {signal} is not a signal number (1-64)"),
            ),
            None => Response::error(ErrorCode::NotFound, format!("no process {id}")),
            Some(p) if p.lock().exit.is_some() => {
                Response::error(ErrorCode::InvalidState, format!("process {id} has ended"))
            }
            Some(p) => {
                exec::kill_group(p.pid, signal);
                Response::Done {
                    message: format!("sent signal {signal} to process {id} (pid {})", p.pid),
                }
            }
        }),
        Request::CopyIn { path, mode, size } => files::copy_in(io, sh, &path, mode, size).await,
        Request::CopyOut { path } => files::copy_out(io, sh, &path).await,
        // authorize refused these outside an exec already.
        Request::CloseStdin | Request::Signal { .. } | Request::Resize(_) => {
            Outcome::reply(Response::error(ErrorCode::BadRequest, "out of order"))
        }
        Request::Hello { .. } => Outcome::reply(Response::error(
            ErrorCode::BadRequest,
            "hello was already exchanged",
        )),
        Request::Status => {
            let busy = sh.push.try_lock().is_err();
            let config = sh.config.clone();
            let mut rep = tokio::task::spawn_blocking(move || status::report(&config, busy))
                .await
                .expect("status task");
            rep.identity = sh.identity.clone();
            rep.pull = sh.pull.lock().expect("pull state").clone();
            rep.last_transfer = sh.last_transfer.lock().expect("transfer state").clone();
            Outcome::reply(Response::Status(Box::new(rep)))
        }
        Request::MarkGood => {
            let img = sh.config.img_dir();
            let config = sh.config.clone();
            let r = tokio::task::spawn_blocking(move || {
                // The watchdog initstage armed for this trial boot, if it did.
                let armed = crate::status::Facts::read(&config)
                    .report
                    .and_then(|r| r.watchdog)
                    .is_some();
                let dev = std::path::Path::new(keel_sys::watchdog::DEVICE);
                control::mark_good(&img, armed.then_some(dev))
            })
            .await
            .expect("mark-good task");
            Outcome::reply(match r {
                Ok(message) => Response::Done { message },
                Err(e) => Response::from(e),
            })
        }
        Request::Reboot => Outcome {
            reboot: true,
            ..Outcome::reply(Response::Done {
                message: "rebooting".into(),
            })
        },
        Request::Push {
            manifest,
            resume,
            delta,
        } => intake::push(io, sh, manifest, resume, delta).await,
        Request::Unstage => Outcome::reply(intake::unstage(sh).await),
        Request::PullNow => Outcome::reply(match &sh.config.pull {
            None => Response::error(
                ErrorCode::InvalidState,
                "pull is not configured: add a [pull] table to agent.toml",
            ),
            Some(p) => {
                sh.pull_now.notify_one();
                Response::Done {
                    message: format!("polling {} now", p.url),
                }
            }
        }),
    }
}
