//! Push intake: lock, read the device's facts, find the slot, admit, begin, receive, commit.
//! Generic over the connection's stream; the session hands a push here once it is
//! authorized. [`admit`] is also a pulled manifest's check ([`crate::pull`]).

use std::sync::Arc;

use keel_proto::manifest::SignedManifest;
use keel_proto::message::{ErrorCode, Response, Transfer};
use keel_proto::wire::{KIND_DATA, KIND_MESSAGE};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::conn::{Conn, ReadError};
use crate::delta::Prepare;
use crate::session::Outcome;
use crate::shared::Shared;
use crate::stage::{Pipeline, Slot, Upload, CHUNK};
use crate::status::Facts;
use crate::verify::{self, Admit, Context, Refusal};

/// Reads the device's facts, finds the slot, admits `signed` and begins the upload; the
/// error is the reply (a refusal, or up to date). Blocking.
pub fn admit(sh: &Shared, signed: &SignedManifest, resume: bool) -> Result<Upload, Response> {
    admitted(sh, signed)?
        .begin(signed, resume, &|n| n)
        .map_err(Response::from)
}

/// Reads the device's facts, finds the slot and admits `signed`: the slot to begin the
/// upload in, or the reply (a refusal, or up to date). Blocking.
pub fn admitted(sh: &Shared, signed: &SignedManifest) -> Result<Slot, Response> {
    let config = &sh.config;
    let facts = Facts::read(config);
    let slot = Slot::new(config.newimg_dir(), &facts.image_name(config));
    if !slot.available() {
        return Err(Response::error(
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
        name: facts.product_name(config),
        booted: facts.booted(),
        staged: staged.as_ref(),
        rejected: facts.rejected(),
    };
    match verify::admit(signed, &ctx) {
        Ok(Admit::Accept) => {}
        Ok(Admit::UpToDate(message)) => return Err(Response::UpToDate { message }),
        Err(r) => return Err(r.into()),
    }
    promotable(config, &facts, signed.manifest.size)?;
    Ok(slot)
}

/// Whether the next boot can promote an image of `size` bytes: initstage copies it to `img`
/// beside the current and old images (the old one goes only after the copy), so `img` needs
/// that much free (a leftover `.new` copy is removed first, so it counts as free).
fn promotable(config: &crate::config::Config, facts: &Facts, size: u64) -> Result<(), Response> {
    let img = config.img_dir();
    let Ok(st) = rustix::fs::statvfs(&img) else {
        // No img mounted (a test rig, a device not booted by initstage): nothing to promote to.
        return Ok(());
    };
    let names = keel_proto::layout::Names::for_image(&facts.image_name(config));
    let leftover = crate::stage::allocated(&img.join(&names.new_tmp));
    let free = st
        .f_bavail
        .saturating_mul(st.f_frsize)
        .saturating_add(leftover);
    if size > free {
        return Err(Response::error(
            ErrorCode::NoSpace,
            format!(
                "image is {size} bytes but {} has {free} bytes free: the next boot could not promote it (free room on img, or make the image smaller)",
                img.display()
            ),
        ));
    }
    Ok(())
}

/// Drops the staged image and any partial upload (not while a push runs).
pub async fn unstage(sh: &Arc<Shared>) -> Response {
    let Ok(_guard) = sh.push.try_lock() else {
        return Response::error(
            ErrorCode::Busy,
            "a push is in progress: try again when it ends",
        );
    };
    let sh2 = sh.clone();
    let r = tokio::task::spawn_blocking(move || {
        let facts = Facts::read(&sh2.config);
        let slot = Slot::new(sh2.config.newimg_dir(), &facts.image_name(&sh2.config));
        if !slot.available() {
            return Err(Refusal::new(
                ErrorCode::Unavailable,
                format!("{} is not there", slot.dir().display()),
            ));
        }
        slot.discard_partial()?;
        slot.unstage()
    })
    .await
    .expect("unstage task");
    match r {
        Ok(Some(v)) => Response::Done {
            message: format!("removed staged version {v}: it will not be installed"),
        },
        Ok(None) => Response::Done {
            message: "nothing was staged".into(),
        },
        Err(r) => r.into(),
    }
}

/// Runs one push to its end: the outcome's response is the reply to send. With `delta`, a
/// manifest that carries a chunk index is staged from the chunks the device holds and the
/// ones the client sends ([`crate::delta`]).
pub async fn push<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Conn<S>,
    sh: &Arc<Shared>,
    signed: SignedManifest,
    resume: bool,
    delta: bool,
) -> Outcome {
    let Ok(_guard) = sh.push.try_lock() else {
        return Outcome::reply(Response::error(
            ErrorCode::Busy,
            "another push is in progress: try again when it ends",
        ));
    };
    let size = signed.manifest.size;
    let version = signed.manifest.version;
    let prepared = if delta {
        match crate::delta_push::prepare(io, sh, &signed, resume).await {
            Ok(p) => p,
            Err(o) => return o,
        }
    } else {
        Prepare::Full
    };
    let (p, got, delta) = match prepared {
        Prepare::Delta(b) => {
            let (upload, d) = *b;
            let offset = upload.offset();
            let plan = &d.plan;
            let ask = Response::SendChunks {
                offset,
                need: plan.need.to_base64(),
                chunks: plan.chunks,
                bytes: plan.bytes,
                reused: plan.reused,
            };
            tracing::info!(
                "delta of version {version}: {} chunks ({} bytes) to receive, {} bytes reused, from {offset}",
                plan.chunks,
                plan.bytes,
                plan.reused
            );
            if io.send(&ask).await.is_err() {
                return Outcome::gone("client went away before the chunks");
            }
            crate::notify::notify(&format!(
                "STATUS=receiving version {version} ({} of {size} bytes)",
                plan.bytes
            ));
            let mut p = upload.start();
            let mut frames = crate::delta_push::Frames {
                io: &mut *io,
                left: 0,
                what: "the chunks",
            };
            let got = crate::delta::receive(&mut frames, &mut p, &d).await;
            (p, got, Some((plan.reused, d.index_bytes)))
        }
        Prepare::Full => {
            // Every file-system call of the admission (facts, slot, begin) runs off the
            // runtime thread: a hung file must not freeze the other connections.
            let sh2 = sh.clone();
            let s2 = signed.clone();
            let upload = match tokio::task::spawn_blocking(move || admit(&sh2, &s2, resume))
                .await
                .expect("admit task")
            {
                Ok(u) => u,
                Err(r) => return Outcome::reply(r),
            };
            let offset = upload.offset();
            if io.send(&Response::Send { offset }).await.is_err() {
                return Outcome::gone("client went away before the data");
            }
            crate::notify::notify(&format!(
                "STATUS=receiving version {version} ({size} bytes)"
            ));
            let mut p = upload.start();
            let got = receive(io, &mut p, size - offset).await;
            (p, got, None)
        }
    };
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
                    "upload cut after {n} bytes of version {version} arrived ({}); push again to resume",
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
    let (reused, index) = delta.unwrap_or((0, 0));
    let response = match (result, cut) {
        (Ok(image), _) => {
            sh.record(Transfer {
                version: image.version,
                how: "push".into(),
                delta: delta.is_some(),
                received: bytes,
                reused,
                index,
            });
            Response::Staged {
                image,
                received: bytes,
                resumed_from,
                reused,
            }
        }
        // The stream's own fault explains more than the finish's.
        (Err(_), Some(c)) => Response::from(c),
        (Err(r), None) => Response::from(r),
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
    io: &mut Conn<S>,
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
    io: &mut Conn<S>,
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
