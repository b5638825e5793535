//! A delta push: the agent takes the image's signed chunk index, finds the chunks it already
//! holds ([`crate::seeds`]), asks for the rest, and assembles the image in order into the
//! same pipeline a full push uses — so the whole image is hashed against the signed manifest
//! (and its verity tree) before anything is committed, whatever its bytes' origin.
//!
//! [`plan`] is pure: which chunks come from where, and the need map sent to the client.
//! [`prepare`] runs the exchange up to the need map; [`receive`] fills the pipeline.

use std::sync::Arc;

use keel_proto::chunks::{ChunkRef, Index, NeedMap};
use keel_proto::manifest::SignedManifest;
use keel_proto::message::{ErrorCode, Response};
use keel_proto::wire::{KIND_DATA, KIND_MESSAGE};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::conn::{Conn, ReadError};
use crate::seeds::{Seeds, Source};
use crate::session::Outcome;
use crate::shared::Shared;
use crate::stage::{Chunk, Pipeline, Upload, CHUNK};
use crate::status::Facts;
use crate::verify::Refusal;

/// Where each chunk of the new image comes from, from `start` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The first chunk assembled (a resumed upload holds the ones before).
    pub start: usize,
    /// Per chunk: the seed that holds it, or `None` when the client sends it.
    pub from: Vec<Option<Source>>,
    /// The chunks the client sends.
    pub need: NeedMap,
    /// How many chunks that is.
    pub chunks: u64,
    /// How many bytes that is.
    pub bytes: u64,
    /// Bytes taken from seeds.
    pub reused: u64,
}

/// The plan for `index` from chunk `start`, given what the seeds hold.
pub fn plan(index: &Index, start: usize, from: Vec<Option<Source>>) -> Plan {
    let mut need = NeedMap::new(index.chunks.len());
    let (mut chunks, mut bytes, mut reused) = (0u64, 0u64, 0u64);
    for (i, c) in index.chunks.iter().enumerate().skip(start) {
        if from[i].is_some() {
            reused += u64::from(c.len);
        } else {
            need.set(i);
            chunks += 1;
            bytes += u64::from(c.len);
        }
    }
    Plan {
        start,
        from,
        need,
        chunks,
        bytes,
        reused,
    }
}

/// A delta ready to receive.
#[derive(Debug)]
pub struct Prepared {
    /// The new image's chunks.
    pub index: Arc<Index>,
    /// Where they come from.
    pub plan: Plan,
    /// The files reused chunks are read from.
    pub seeds: Arc<Seeds>,
    /// Bytes of the index received.
    pub index_bytes: u64,
}

/// What [`prepare`] decided.
#[derive(Debug)]
pub enum Prepare {
    /// No usable index or nothing to reuse: a full push.
    Full,
    /// The delta, its need map not yet sent, and the upload from the chunk boundary a
    /// resume reached.
    Delta(Box<(Upload, Prepared)>),
}

/// The current and old images on `img`: what [`crate::seeds::warm`] chunks after start.
pub fn held_images(sh: &Shared) -> Vec<std::path::PathBuf> {
    let config = &sh.config;
    let facts = Facts::read(config);
    let names = keel_proto::layout::Names::for_image(&facts.image_name(config));
    let img = config.img_dir();
    vec![img.join(&names.current), img.join(&names.old)]
}

/// The images that may hold chunks of a new one. The staged image counts only when the new
/// one fits beside it (else staging drops it, and its blocks must not stay held open).
fn seed_paths(sh: &Shared, size: u64) -> Vec<std::path::PathBuf> {
    let config = &sh.config;
    let facts = Facts::read(config);
    let names = keel_proto::layout::Names::for_image(&facts.image_name(config));
    let mut v = held_images(sh);
    let slot = crate::stage::Slot::new(config.newimg_dir(), &names.current);
    if slot.staged().is_some() && slot.free_bytes().is_ok_and(|f| f >= size) {
        v.push(slot.staged_path());
    }
    v
}

/// Admits `signed` and, when it carries a chunk index signed by a trusted key and the
/// device holds an image to take chunks from, receives and checks the index, begins the
/// upload at a chunk boundary and plans it. `Err`: the reply to send (a refusal).
pub async fn prepare<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Conn<S>,
    sh: &Arc<Shared>,
    signed: &SignedManifest,
    resume: bool,
) -> Result<Prepare, Outcome> {
    let cref = match signed.verified_chunks(&sh.keys) {
        Ok(c) => c.cloned(),
        Err(e) => {
            tracing::warn!("chunk index reference refused ({e}): no delta");
            None
        }
    };
    let (sh2, s2, want_seeds) = (sh.clone(), signed.clone(), cref.is_some());
    let (same, seeds) = tokio::task::spawn_blocking(move || {
        crate::intake::admitted(&sh2, &s2)?;
        let same = same_bytes(&sh2, &s2.manifest);
        let seeds = if same.is_none() && want_seeds {
            Seeds::open(&seed_paths(&sh2, s2.manifest.size))
        } else {
            Seeds::default()
        };
        Ok::<_, Response>((same, seeds))
    })
    .await
    .expect("admit task")
    .map_err(Outcome::reply)?;
    if let Some(path) = same {
        return copy(sh, signed, resume, path).await;
    }
    let Some(cref) = cref else {
        return Ok(Prepare::Full);
    };
    if seeds.is_empty() {
        return Ok(Prepare::Full);
    }
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
    let index = match Index::decode(&bytes) {
        Ok(i) if i.image_size == signed.manifest.size => Arc::new(i),
        Ok(i) => {
            return Err(Outcome::reply(Response::error(
                ErrorCode::BadIndex,
                format!(
                    "the chunk index describes {} bytes, the image is {}",
                    i.image_size, signed.manifest.size
                ),
            )))
        }
        Err(e) => {
            return Err(Outcome::reply(Response::error(
                ErrorCode::BadIndex,
                e.to_string(),
            )))
        }
    };
    let (sh2, s2, idx, seeds) = (sh.clone(), signed.clone(), index.clone(), Arc::new(seeds));
    let seeds2 = seeds.clone();
    let r = tokio::task::spawn_blocking(move || {
        let slot = crate::intake::admitted(&sh2, &s2)?;
        let align = |n: u64| {
            idx.chunks
                .get(idx.chunk_at(n))
                .map_or(idx.image_size, |c| c.offset)
        };
        let upload = slot.begin(&s2, resume, &align).map_err(Response::from)?;
        let start = idx.chunk_at(upload.offset());
        let found = seeds2.find(&idx, start, &sh2.seeds);
        Ok::<_, Response>((upload, plan(&idx, start, found)))
    })
    .await
    .expect("plan task");
    let (upload, plan) = r.map_err(Outcome::reply)?;
    Ok(Prepare::Delta(Box::new((
        upload,
        Prepared {
            index,
            plan,
            seeds,
            index_bytes: bytes.len() as u64,
        },
    ))))
}

/// An image the device holds whose record says it has exactly the new image's bytes (a
/// rebuild that changed nothing, a version bump): its path.
fn same_bytes(sh: &Shared, m: &keel_proto::manifest::Manifest) -> Option<std::path::PathBuf> {
    let config = &sh.config;
    let facts = Facts::read(config);
    let names = keel_proto::layout::Names::for_image(&facts.image_name(config));
    let img = config.img_dir();
    let slot = crate::stage::Slot::new(config.newimg_dir(), &names.current);
    let staged = slot
        .staged()
        .map(|s| keel_proto::bootstate::ImageRecord::from_manifest(&s.manifest));
    let st = facts.state.as_ref();
    [
        (st.and_then(|s| s.current.clone()), img.join(&names.current)),
        (st.and_then(|s| s.old.clone()), img.join(&names.old)),
        (staged, slot.staged_path()),
    ]
    .into_iter()
    .find_map(|(rec, path)| {
        let rec = rec?;
        let len = std::fs::symlink_metadata(&path)
            .ok()
            .filter(|md| md.file_type().is_file())?
            .len();
        (rec.sha256.eq_ignore_ascii_case(&m.sha256) && rec.size == m.size && len == m.size)
            .then_some(path)
    })
}

/// Pieces of a whole-image copy.
const COPY_PIECE: u32 = 1 << 20;

/// Stages the new image from `path`, which holds its bytes already: no index, nothing asked
/// of the client; the copy is hashed like any other staging.
async fn copy(
    sh: &Arc<Shared>,
    signed: &SignedManifest,
    resume: bool,
    path: std::path::PathBuf,
) -> Result<Prepare, Outcome> {
    let size = signed.manifest.size;
    let mut chunks = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let len = u32::try_from((size - offset).min(u64::from(COPY_PIECE))).expect("≤ 1 MiB");
        chunks.push(keel_proto::chunks::Chunk {
            offset,
            len,
            digest: [0; 32],
        });
        offset += u64::from(len);
    }
    let index = Arc::new(Index {
        params: keel_proto::chunks::Params::default(),
        image_size: size,
        chunks,
    });
    let seeds = Arc::new(Seeds::open(std::slice::from_ref(&path)));
    if seeds.is_empty() {
        return Ok(Prepare::Full);
    }
    tracing::info!(
        "{} holds the bytes of version {}: staged by copy",
        path.display(),
        signed.manifest.version
    );
    let (sh2, s2, idx) = (sh.clone(), signed.clone(), index.clone());
    let r = tokio::task::spawn_blocking(move || {
        let slot = crate::intake::admitted(&sh2, &s2)?;
        let align = |n: u64| n - n % u64::from(COPY_PIECE);
        let upload = slot.begin(&s2, resume, &align).map_err(Response::from)?;
        let start = idx.chunk_at(upload.offset());
        let from = idx
            .chunks
            .iter()
            .map(|c| {
                Some(Source {
                    seed: 0,
                    offset: c.offset,
                })
            })
            .collect();
        Ok::<_, Response>((upload, plan(&idx, start, from)))
    })
    .await
    .expect("plan task");
    let (upload, plan) = r.map_err(Outcome::reply)?;
    Ok(Prepare::Delta(Box::new((
        upload,
        Prepared {
            index,
            plan,
            seeds,
            index_bytes: 0,
        },
    ))))
}

/// Reads exactly `cref.size` bytes of index in data frames and the empty end frame, and
/// checks them against the signed reference.
async fn read_index<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Conn<S>,
    cref: &ChunkRef,
) -> Result<Vec<u8>, ReadError> {
    let size = usize::try_from(cref.size).expect("capped at MAX_INDEX");
    let mut buf = vec![0u8; size];
    let mut left = 0usize;
    read_data(io, &mut left, &mut buf, "the chunk index").await?;
    expect_end(io, left, "the chunk index").await?;
    cref.check(&buf)
        .map_err(|e| ReadError::Protocol(Refusal::new(ErrorCode::BadIndex, e.to_string())))?;
    Ok(buf)
}

fn protocol(code: ErrorCode, msg: String) -> ReadError {
    ReadError::Protocol(Refusal::new(code, msg))
}

/// Fills `buf` from data frames; `left` carries the bytes of the current frame not yet read.
async fn read_data<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Conn<S>,
    left: &mut usize,
    buf: &mut [u8],
    what: &str,
) -> Result<(), ReadError> {
    let mut filled = 0;
    while filled < buf.len() {
        if *left == 0 {
            let (len, kind) = io.header().await?;
            if kind != KIND_DATA {
                let got = if kind == KIND_MESSAGE {
                    "a message".to_string()
                } else {
                    format!("a frame of unknown kind 0x{kind:02x}")
                };
                return Err(protocol(
                    ErrorCode::BadRequest,
                    format!("expected the bytes of {what}, got {got}"),
                ));
            }
            if len == 0 {
                return Err(protocol(
                    ErrorCode::SizeMismatch,
                    format!("{what} ended early"),
                ));
            }
            *left = len;
        }
        let k = (*left).min(buf.len() - filled);
        io.read_exact(&mut buf[filled..filled + k]).await?;
        filled += k;
        *left -= k;
    }
    Ok(())
}

/// After the last byte expected: nothing left of the frame, then the empty end frame.
async fn expect_end<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Conn<S>,
    left: usize,
    what: &str,
) -> Result<(), ReadError> {
    let over = |n: usize| {
        protocol(
            ErrorCode::SizeMismatch,
            format!("more bytes than {what} holds ({n} over)"),
        )
    };
    if left > 0 {
        return Err(over(left));
    }
    match io.header().await? {
        (0, KIND_DATA) => Ok(()),
        (n, KIND_DATA) => Err(over(n)),
        _ => Err(protocol(
            ErrorCode::BadRequest,
            format!("expected the end of {what}, got a message"),
        )),
    }
}

/// The pipeline's current buffer.
struct Out<'a> {
    p: &'a mut Pipeline,
    cur: Option<Chunk>,
}

impl Out<'_> {
    async fn ensure(&mut self) -> Result<(), ReadError> {
        if self.cur.is_none() {
            self.cur = Some(self.p.take().await.ok_or(ReadError::WriterStopped)?);
        }
        Ok(())
    }

    fn advance(&mut self, n: usize) -> Result<(), ReadError> {
        let c = self.cur.as_mut().expect("buffer");
        c.len += n;
        if c.len == CHUNK && !self.p.put(self.cur.take().expect("buffer")) {
            return Err(ReadError::WriterStopped);
        }
        Ok(())
    }

    fn flush(&mut self) {
        if let Some(c) = self.cur.take() {
            if c.len > 0 {
                self.p.put(c);
            }
        }
    }
}

/// Assembles the image into `p` in order: reused chunks read from their seed, the others
/// from the client's data frames, each of those checked against its digest. Returns the
/// bytes received, or how many arrived before the failure.
pub async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Conn<S>,
    p: &mut Pipeline,
    d: &Prepared,
) -> Result<u64, (u64, ReadError)> {
    let mut out = Out { p, cur: None };
    let mut got = 0u64;
    let r = assemble(io, &mut out, d, &mut got).await;
    out.flush();
    r.map(|()| got).map_err(|e| (got, e))
}

async fn assemble<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Conn<S>,
    out: &mut Out<'_>,
    d: &Prepared,
    got: &mut u64,
) -> Result<(), ReadError> {
    let mut left = 0usize;
    let chunks = &d.index.chunks;
    let mut i = d.plan.start;
    while i < chunks.len() {
        let c = &chunks[i];
        let len = c.len as usize;
        let mut done = 0usize;
        match d.plan.from[i] {
            Some(src) => {
                // The run of reused chunks that lie one after the other in the same seed:
                // read as one.
                let mut run = u64::from(c.len);
                let mut next = i + 1;
                while let (Some(n), Some(Some(s))) = (chunks.get(next), d.plan.from.get(next)) {
                    if s.seed != src.seed || s.offset != src.offset + run {
                        break;
                    }
                    run += u64::from(n.len);
                    next += 1;
                }
                copy_run(out, d, src, run).await?;
                i = next;
                continue;
            }
            None => {
                let mut h = Sha256::new();
                while done < len {
                    out.ensure().await?;
                    let buf = out.cur.as_mut().expect("buffer");
                    let k = (CHUNK - buf.len).min(len - done);
                    let at = buf.len;
                    let dst = &mut buf.buf[at..at + k];
                    read_data(io, &mut left, dst, "the chunks").await?;
                    h.update(&*dst);
                    *got += k as u64;
                    out.advance(k)?;
                    done += k;
                }
                let found: [u8; 32] = h.finalize().into();
                if found != c.digest {
                    return Err(protocol(
                        ErrorCode::HashMismatch,
                        format!(
                            "chunk {i} (offset {}, {len} bytes) hashes to {}, the index says {}",
                            c.offset,
                            keel_proto::hex::encode(&found),
                            keel_proto::hex::encode(&c.digest)
                        ),
                    ));
                }
            }
        }
        i += 1;
    }
    expect_end(io, left, "the chunks").await
}

/// Copies `len` bytes of a seed from `src` into the pipeline, a buffer's room at a time, off
/// the runtime thread.
async fn copy_run(out: &mut Out<'_>, d: &Prepared, src: Source, len: u64) -> Result<(), ReadError> {
    let mut done = 0u64;
    while done < len {
        out.ensure().await?;
        let mut buf = out.cur.take().expect("buffer");
        let k = usize::try_from(len - done).map_or(CHUNK - buf.len, |l| l.min(CHUNK - buf.len));
        let seeds = d.seeds.clone();
        let skip = done;
        let (buf, r) = tokio::task::spawn_blocking(move || {
            let at = buf.len;
            let r = seeds.read_at(src, skip, &mut buf.buf[at..at + k]);
            (buf, r)
        })
        .await
        .expect("seed read task");
        out.cur = Some(buf);
        r.map_err(|e| {
            protocol(
                ErrorCode::Io,
                format!("read {}: {e}", d.seeds.path(src.seed).display()),
            )
        })?;
        out.advance(k)?;
        done += k as u64;
    }
    Ok(())
}
