//! A delta push: after the admission, the agent asks for the signed chunk index (data
//! frames), checks it, plans, answers with the need map, and takes the missing chunks from
//! the client's data frames ([`Frames`]). See `docs/protocol.md`, *Delta push*.

use std::sync::Arc;

use keel_proto::chunks::ChunkRef;
use keel_proto::manifest::SignedManifest;
use keel_proto::message::{ErrorCode, Response};
use keel_proto::wire::{KIND_DATA, KIND_MESSAGE};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::conn::{Conn, ReadError};
use crate::delta::{self, protocol, ChunkSource, Held, Prepare};
use crate::session::Outcome;
use crate::shared::Shared;

/// Admits `signed` and, when the device holds its bytes or the chunks of a signed index,
/// runs the exchange up to the need map (not sent). `Err`: the reply to send.
pub async fn prepare<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Conn<S>,
    sh: &Arc<Shared>,
    signed: &SignedManifest,
    resume: bool,
) -> Result<Prepare, Outcome> {
    let (sh2, s2) = (sh.clone(), signed.clone());
    let held = tokio::task::spawn_blocking(move || delta::look(&sh2, &s2))
        .await
        .expect("admit task")
        .map_err(Outcome::reply)?;
    let (seeds, cref) = match held {
        Held::Nothing => return Ok(Prepare::Full),
        Held::Same(path) => {
            let (sh2, s2) = (sh.clone(), signed.clone());
            let r = tokio::task::spawn_blocking(move || delta::begin_copy(&sh2, &s2, resume, path))
                .await
                .expect("plan task")
                .map_err(Outcome::reply)?;
            return Ok(r.map_or(Prepare::Full, |x| Prepare::Delta(Box::new(x))));
        }
        Held::Seeds(seeds, cref) => (seeds, cref),
    };
    if io
        .send(&Response::SendIndex { size: cref.size })
        .await
        .is_err()
    {
        return Err(Outcome::gone("client went away before the index"));
    }
    let bytes = match read_index(io, &cref).await {
        Ok(b) => b,
        Err(ReadError::Protocol(r)) if r.code == ErrorCode::BadIndex => {
            return Err(Outcome::reply(r.into()))
        }
        Err(e) => return Err(Outcome::cut(&e, io.idle, "the chunk index")),
    };
    let index =
        delta::decode_index(&bytes, &signed.manifest).map_err(|r| Outcome::reply(r.into()))?;
    let (sh2, s2, n) = (sh.clone(), signed.clone(), bytes.len() as u64);
    let r = tokio::task::spawn_blocking(move || {
        delta::begin_from_seeds(&sh2, &s2, resume, index, n, seeds)
    })
    .await
    .expect("plan task")
    .map_err(Outcome::reply)?;
    Ok(Prepare::Delta(Box::new(r)))
}

/// Reads exactly `cref.size` bytes of index in data frames and the empty end frame, and
/// checks them against the signed reference.
async fn read_index<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Conn<S>,
    cref: &ChunkRef,
) -> Result<Vec<u8>, ReadError> {
    let size = usize::try_from(cref.size).expect("capped at MAX_INDEX");
    let mut buf = vec![0u8; size];
    let mut f = Frames {
        io,
        left: 0,
        what: "the chunk index",
    };
    f.fill(&mut buf).await?;
    f.end().await?;
    cref.check(&buf)
        .map_err(|e| protocol(ErrorCode::BadIndex, e.to_string()))?;
    Ok(buf)
}

/// Bytes from data frames of any size, ended by an empty one.
#[derive(Debug)]
pub struct Frames<'a, S> {
    /// The connection.
    pub io: &'a mut Conn<S>,
    /// Bytes of the current frame not yet read.
    pub left: usize,
    /// What the bytes are, for errors.
    pub what: &'static str,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ChunkSource for Frames<'_, S> {
    async fn fill(&mut self, buf: &mut [u8]) -> Result<(), ReadError> {
        let mut filled = 0;
        while filled < buf.len() {
            if self.left == 0 {
                let (len, kind) = self.io.header().await?;
                if kind != KIND_DATA {
                    let got = if kind == KIND_MESSAGE {
                        "a message".to_string()
                    } else {
                        format!("a frame of unknown kind 0x{kind:02x}")
                    };
                    return Err(protocol(
                        ErrorCode::BadRequest,
                        format!("expected the bytes of {}, got {got}", self.what),
                    ));
                }
                if len == 0 {
                    return Err(protocol(
                        ErrorCode::SizeMismatch,
                        format!("{} ended early", self.what),
                    ));
                }
                self.left = len;
            }
            let k = self.left.min(buf.len() - filled);
            self.io.read_exact(&mut buf[filled..filled + k]).await?;
            filled += k;
            self.left -= k;
        }
        Ok(())
    }

    async fn end(&mut self) -> Result<(), ReadError> {
        let what = self.what;
        let over = |n: usize| {
            protocol(
                ErrorCode::SizeMismatch,
                format!("more bytes than {what} holds ({n} over)"),
            )
        };
        if self.left > 0 {
            return Err(over(self.left));
        }
        match self.io.header().await? {
            (0, KIND_DATA) => Ok(()),
            (n, KIND_DATA) => Err(over(n)),
            _ => Err(protocol(
                ErrorCode::BadRequest,
                format!("expected the end of {what}, got a message"),
            )),
        }
    }
}
