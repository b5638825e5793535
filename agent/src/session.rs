//! One connection: hello, then requests one at a time. Every read is bounded by the idle
//! timeout and every frame by [`MAX_FRAME`]; a peer that breaks the protocol gets an error
//! naming what was wrong and is disconnected.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_proto::manifest::SignedManifest;
use keel_proto::message::{
    message_frame, parse_request, ErrorCode, MessageError, Request, Response,
};
use keel_proto::wire::{KIND_DATA, KIND_MESSAGE, MAX_FRAME, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::control;
use crate::server::Shared;
use crate::stage::{Pipeline, Slot, CHUNK};
use crate::status::{self, Facts};
use crate::transport::Peer;
use crate::verify::{self, Admit, Context, Refusal};

/// Why reading from the peer stopped.
#[derive(Debug)]
enum ReadError {
    /// The peer closed the connection.
    Eof,
    /// The peer was silent for the idle timeout.
    Timeout,
    /// The socket failed.
    Io(io::Error),
    /// The peer sent something that is not the protocol.
    Protocol(Refusal),
    /// The writer thread stopped (its own error says why).
    WriterStopped,
}

impl ReadError {
    fn describe(&self, idle: Duration) -> String {
        match self {
            ReadError::Eof => "connection closed".into(),
            ReadError::Timeout => format!("no data for {} s", idle.as_secs()),
            ReadError::Io(e) => e.to_string(),
            ReadError::Protocol(r) => r.message.clone(),
            ReadError::WriterStopped => "writer stopped".into(),
        }
    }
}

struct Io<S> {
    s: S,
    idle: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadError> {
        match tokio::time::timeout(self.idle, self.s.read_exact(buf)).await {
            Err(_) => Err(ReadError::Timeout),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ReadError::Eof),
            Ok(Err(e)) => Err(ReadError::Io(e)),
        }
    }

    /// Reads a frame header: (body length, kind byte).
    async fn header(&mut self) -> Result<(usize, u8), ReadError> {
        let mut h = [0u8; 5];
        self.read_exact(&mut h[..4]).await?;
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len > MAX_FRAME {
            return Err(ReadError::Protocol(Refusal::new(
                ErrorCode::FrameTooLarge,
                format!(
                    "frame of {len} bytes exceeds the {MAX_FRAME}-byte limit (is this a keel client? header bytes {:02x?})",
                    &h[..4]
                ),
            )));
        }
        if len == 0 {
            return Err(ReadError::Protocol(Refusal::new(
                ErrorCode::BadRequest,
                "empty frame (no kind byte)",
            )));
        }
        self.read_exact(&mut h[4..]).await?;
        Ok((len - 1, h[4]))
    }

    async fn request(&mut self) -> Result<Request, ReadError> {
        let (len, kind) = self.header().await?;
        let mut body = vec![0u8; len + 1];
        body[0] = kind;
        self.read_exact(&mut body[1..]).await?;
        parse_request(&body).map_err(|e| {
            let what = match e {
                MessageError::UnexpectedData => {
                    "image data arrived where a request was expected".to_string()
                }
                other => other.to_string(),
            };
            ReadError::Protocol(Refusal::new(ErrorCode::BadRequest, what))
        })
    }

    async fn send(&mut self, r: &Response) -> io::Result<()> {
        let f = message_frame(r);
        match tokio::time::timeout(self.idle, self.s.write_all(&f)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "peer does not read",
            )),
        }
    }
}

/// The outcome of one request, for the log line.
struct Outcome {
    response: Response,
    bytes: u64,
    close: bool,
    reboot: bool,
}

impl Outcome {
    fn reply(response: Response) -> Outcome {
        Outcome {
            response,
            bytes: 0,
            close: false,
            reboot: false,
        }
    }
}

fn refusal(r: Refusal) -> Response {
    Response::error(r.code, r.message)
}

fn summary(r: &Response) -> String {
    match r {
        Response::Error { code, message } => {
            format!("refused {}: {message}", crate::error::Code(*code))
        }
        Response::Staged { image, .. } => format!("staged version {}", image.version),
        Response::UpToDate { message } | Response::Done { message } => message.clone(),
        Response::Status(_) => "ok".into(),
        Response::Hello { .. } => "ok".into(),
        Response::Send { offset } => format!("send from {offset}"),
    }
}

/// Serves one connection to its end.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(s: S, peer: Peer, sh: Arc<Shared>) {
    let mut io = Io { s, idle: sh.idle };
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
                max_frame: MAX_FRAME as u32,
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
                let _ = io.send(&refusal(r)).await;
            }
            return;
        }
    }
    loop {
        let req = match io.request().await {
            Ok(r) => r,
            Err(ReadError::Eof) => return,
            Err(e) => {
                log_read_error(&peer, &e, io.idle, Instant::now());
                match e {
                    ReadError::Protocol(r) => {
                        let _ = io.send(&refusal(r)).await;
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
        let out = handle(&mut io, &peer, &sh, req).await;
        tracing::info!(
            %peer,
            op,
            outcome = %summary(&out.response),
            bytes = out.bytes,
            ms = t.elapsed().as_millis() as u64,
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
            ms = t.elapsed().as_millis() as u64,
            "request"
        ),
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    peer: &Peer,
    sh: &Arc<Shared>,
    req: Request,
) -> Outcome {
    match req {
        Request::Hello { .. } => Outcome::reply(Response::error(
            ErrorCode::BadRequest,
            "hello was already exchanged",
        )),
        Request::Status => {
            let busy = sh.push.try_lock().is_err();
            let config = sh.config.clone();
            let rep = tokio::task::spawn_blocking(move || status::report(&config, busy))
                .await
                .expect("status task");
            Outcome::reply(Response::Status(Box::new(rep)))
        }
        Request::MarkGood | Request::Reboot if !peer.may_control() => {
            Outcome::reply(Response::error(
                ErrorCode::NotPermitted,
                format!(
                    "{} is allowed only to root on the local Unix socket (this peer: {peer})",
                    req.op()
                ),
            ))
        }
        Request::MarkGood => {
            let img = sh.config.img_dir();
            let r = tokio::task::spawn_blocking(move || control::mark_good(&img))
                .await
                .expect("mark-good task");
            Outcome::reply(match r {
                Ok(message) => Response::Done { message },
                Err(e) => refusal(e),
            })
        }
        Request::Reboot => Outcome {
            reboot: true,
            ..Outcome::reply(Response::Done {
                message: "rebooting".into(),
            })
        },
        Request::Push { manifest, resume } => push(io, sh, manifest, resume).await,
    }
}

async fn push<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    sh: &Arc<Shared>,
    signed: SignedManifest,
    resume: bool,
) -> Outcome {
    let Ok(_guard) = sh.push.try_lock() else {
        return Outcome::reply(Response::error(
            ErrorCode::Busy,
            "another push is in progress: try again when it ends",
        ));
    };
    let config = sh.config.clone();
    let facts = Facts::read(&config);
    let slot = Slot::new(config.newimg_dir(), &facts.image_name(&config));
    if !slot.available() {
        return Outcome::reply(Response::error(
            ErrorCode::Unavailable,
            format!(
                "{} is not there: is the newimg partition mounted?",
                slot.dir().display()
            ),
        ));
    }
    let staged = slot
        .staged()
        .map(|m| keel_proto::bootstate::ImageRecord::from_manifest(&m.manifest));
    let ctx = Context {
        keys: &sh.keys,
        name: facts.product_name(&config),
        booted: facts.booted(),
        staged: staged.as_ref(),
        rejected: facts.rejected(),
    };
    match verify::admit(&signed, &ctx) {
        Ok(Admit::Accept) => {}
        Ok(Admit::UpToDate(message)) => return Outcome::reply(Response::UpToDate { message }),
        Err(r) => return Outcome::reply(refusal(r)),
    }
    let size = signed.manifest.size;
    let version = signed.manifest.version;
    let s2 = slot.clone();
    let m2 = signed.clone();
    let upload = match tokio::task::spawn_blocking(move || s2.begin(&m2, resume))
        .await
        .expect("begin task")
    {
        Ok(u) => u,
        Err(r) => return Outcome::reply(refusal(r)),
    };
    let offset = upload.offset();
    if io.send(&Response::Send { offset }).await.is_err() {
        return Outcome {
            response: Response::error(ErrorCode::Io, "client went away before the data"),
            bytes: 0,
            close: true,
            reboot: false,
        };
    }
    crate::notify::notify(&format!(
        "STATUS=receiving version {version} ({size} bytes)"
    ));
    let mut p = upload.start();
    let got = receive(io, &mut p, size - offset).await;
    let (complete, keep, cut) = match &got {
        Ok(_) => (true, false, None),
        Err((_, ReadError::Protocol(r))) => (false, false, Some(r.clone())),
        Err((_, ReadError::WriterStopped)) => (false, false, None),
        Err((n, e)) => (
            false,
            true,
            Some(Refusal::new(
                if matches!(e, ReadError::Timeout) {
                    ErrorCode::Timeout
                } else {
                    ErrorCode::SizeMismatch
                },
                format!(
                    "upload cut after {} of {size} bytes ({}); push again to resume",
                    offset + n,
                    e.describe(io.idle)
                ),
            )),
        ),
    };
    let bytes = match &got {
        Ok(n) | Err((n, _)) => *n,
    };
    let resumed_from = p.resumed_from();
    let result = tokio::task::spawn_blocking(move || p.finish(complete, keep))
        .await
        .expect("finish task");
    crate::notify::notify("STATUS=idle");
    let response = match (result, cut) {
        (Ok(image), _) => Response::Staged {
            image,
            received: bytes,
            resumed_from,
        },
        // The stream's own fault explains more than the finish's.
        (Err(_), Some(c)) => refusal(c),
        (Err(r), None) => refusal(r),
    };
    Outcome {
        close: !complete,
        response,
        bytes,
        reboot: false,
    }
}

/// Reads data frames into the pipeline until the empty end frame. Returns the bytes
/// received, or how many arrived before the failure.
async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    p: &mut Pipeline,
    expect: u64,
) -> Result<u64, (u64, ReadError)> {
    let mut got = 0u64;
    let mut cur = None;
    let r = receive_into(io, p, expect, &mut got, &mut cur).await;
    if let Some(c) = cur.take() {
        if c.len > 0 {
            p.put(c);
        }
    }
    match r {
        Ok(()) => Ok(got),
        Err(e) => Err((got, e)),
    }
}

async fn receive_into<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    p: &mut Pipeline,
    expect: u64,
    got: &mut u64,
    cur: &mut Option<crate::stage::Chunk>,
) -> Result<(), ReadError> {
    let protocol = |code, msg: String| Err(ReadError::Protocol(Refusal::new(code, msg)));
    loop {
        let (len, kind) = io.header().await?;
        if kind != KIND_DATA {
            let what = if kind == KIND_MESSAGE {
                "a message".to_string()
            } else {
                format!("a frame of unknown kind 0x{kind:02x}")
            };
            return protocol(
                ErrorCode::BadRequest,
                format!("expected image data after {got} of {expect} bytes, got {what}"),
            );
        }
        if len == 0 {
            if *got < expect {
                return protocol(
                    ErrorCode::SizeMismatch,
                    format!("image ended after {got} of the {expect} bytes the manifest declares"),
                );
            }
            return Ok(());
        }
        if *got + len as u64 > expect {
            return protocol(
                ErrorCode::SizeMismatch,
                format!(
                    "more bytes than the {expect} the manifest declares ({} arrived)",
                    *got + len as u64
                ),
            );
        }
        let mut n = len;
        while n > 0 {
            if cur.is_none() {
                match p.take().await {
                    Some(c) => *cur = Some(c),
                    // The writer stopped: finish() reports its error.
                    None => return Err(ReadError::WriterStopped),
                }
            }
            let c = cur.as_mut().expect("buffer");
            let k = (CHUNK - c.len).min(n);
            io.read_exact(&mut c.buf[c.len..c.len + k]).await?;
            c.len += k;
            n -= k;
            *got += k as u64;
            if c.len == CHUNK {
                let full = cur.take().expect("buffer");
                if !p.put(full) {
                    return Err(ReadError::WriterStopped);
                }
            }
        }
    }
}
