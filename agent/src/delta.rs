//! Deltas: a new image assembled from the chunks the device already holds
//! ([`crate::seeds`]) and the ones it lacks, in order, into the same pipeline a full
//! transfer uses — so the whole image is hashed against the signed manifest (and its verity
//! tree) before anything is committed, whatever its bytes' origin. Push
//! ([`crate::delta_push`]) and pull ([`crate::delta_pull`]) differ only in where the missing
//! chunks come from (`ChunkSource`).
//!
//! [`plan`] is pure: which chunks come from where. [`look`] finds what the device holds,
//! [`begin`] starts the upload at a chunk boundary and plans it, `receive` fills the
//! pipeline.

use std::path::PathBuf;
use std::sync::Arc;

use keel_proto::chunks::{Chunk as IndexChunk, ChunkRef, Index, NeedMap, Params};
use keel_proto::manifest::{Manifest, SignedManifest};
use keel_proto::message::{ErrorCode, Response};
use sha2::{Digest, Sha256};

use crate::conn::ReadError;
use crate::seeds::{Seeds, Source};
use crate::shared::Shared;
use crate::stage::{Chunk, Pipeline, Slot, Upload, CHUNK};
use crate::status::Facts;
use crate::verify::Refusal;

/// Where each chunk of the new image comes from, from `start` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The first chunk assembled (a resumed upload holds the ones before).
    pub start: usize,
    /// Per chunk: the seed that holds it, or `None` when it must be fetched.
    pub from: Vec<Option<Source>>,
    /// The chunks to fetch.
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

/// What a delta's preparation decided.
#[derive(Debug)]
pub enum Prepare {
    /// No usable index or nothing to reuse: a full transfer.
    Full,
    /// The delta, and the upload from the chunk boundary a resume reached.
    Delta(Box<(Upload, Prepared)>),
}

/// What the device holds for a new image, found before any byte of it moves.
#[derive(Debug)]
pub enum Held {
    /// A file with exactly the new image's bytes (by its record): staged by copy.
    Same(PathBuf),
    /// Images to take chunks from, and the new image's verified chunk index reference.
    Seeds(Seeds, ChunkRef),
    /// Nothing to reuse, or no index to reuse it by: a full transfer.
    Nothing,
}

/// The current and old images on `img`: what [`crate::seeds::warm`] chunks after start.
pub fn held_images(sh: &Shared) -> Vec<PathBuf> {
    let config = &sh.config;
    let facts = Facts::read(config);
    let names = keel_proto::layout::Names::for_image(&facts.image_name(config));
    let img = config.img_dir();
    vec![img.join(&names.current), img.join(&names.old)]
}

/// The images that may hold chunks of a new one: the current and old images, the staged
/// one, and a partial upload of another image (a cut one the new image supersedes; its file
/// is removed when the new upload begins, and read through the descriptor opened here). The
/// ones on `newimg` count only when the new image fits beside them (their blocks stay held
/// while they are read).
fn seed_paths(sh: &Shared, signed: &SignedManifest) -> Vec<PathBuf> {
    let config = &sh.config;
    let facts = Facts::read(config);
    let names = keel_proto::layout::Names::for_image(&facts.image_name(config));
    let mut v = held_images(sh);
    let slot = Slot::new(config.newimg_dir(), &names.current);
    let room = slot.free_bytes().is_ok_and(|f| f >= signed.manifest.size);
    if room && slot.staged().is_some() {
        v.push(slot.staged_path());
    }
    if room && slot.partial().is_some_and(|(m, _)| m != *signed) {
        v.push(slot.partial_path());
    }
    v
}

/// An image the device holds whose record says it has exactly the new image's bytes (a
/// rebuild that changed nothing, a version bump): its path.
fn same_bytes(sh: &Shared, m: &Manifest) -> Option<PathBuf> {
    let config = &sh.config;
    let facts = Facts::read(config);
    let names = keel_proto::layout::Names::for_image(&facts.image_name(config));
    let img = config.img_dir();
    let slot = Slot::new(config.newimg_dir(), &names.current);
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

/// Admits `signed` (the refusal, or up to date, is the error) and finds what the device
/// holds for it. A chunk reference that does not verify is ignored (a full transfer).
/// Blocking.
pub fn look(sh: &Shared, signed: &SignedManifest) -> Result<Held, Response> {
    crate::intake::admitted(sh, signed)?;
    if let Some(p) = same_bytes(sh, &signed.manifest) {
        return Ok(Held::Same(p));
    }
    let cref = match signed.verified_chunks(&sh.keys) {
        Ok(Some(c)) => c.clone(),
        Ok(None) => return Ok(Held::Nothing),
        Err(e) => {
            tracing::warn!("chunk index reference refused ({e}): a full transfer");
            return Ok(Held::Nothing);
        }
    };
    let seeds = Seeds::open(&seed_paths(sh, signed));
    Ok(if seeds.is_empty() {
        Held::Nothing
    } else {
        Held::Seeds(seeds, cref)
    })
}

/// Parses index bytes already checked against their signed reference, for `m`'s image.
pub fn decode_index(bytes: &[u8], m: &Manifest) -> Result<Index, Refusal> {
    match Index::decode(bytes) {
        Ok(i) if i.image_size == m.size => Ok(i),
        Ok(i) => Err(Refusal::new(
            ErrorCode::BadIndex,
            format!(
                "the chunk index describes {} bytes, the image is {}",
                i.image_size, m.size
            ),
        )),
        Err(e) => Err(Refusal::new(ErrorCode::BadIndex, e.to_string())),
    }
}

/// Begins the upload of `signed` (resuming at the chunk boundary at or before what a cut
/// one left) and plans it: `find` says which chunks from the first one on the seeds hold.
/// Blocking.
pub fn begin(
    sh: &Shared,
    signed: &SignedManifest,
    resume: bool,
    index: Arc<Index>,
    seeds: Arc<Seeds>,
    index_bytes: u64,
    find: impl FnOnce(&Index, usize) -> Vec<Option<Source>>,
) -> Result<(Upload, Prepared), Response> {
    let slot = crate::intake::admitted(sh, signed)?;
    let align = |n: u64| {
        index
            .chunks
            .get(index.chunk_at(n))
            .map_or(index.image_size, |c| c.offset)
    };
    let upload = slot.begin(signed, resume, &align).map_err(Response::from)?;
    let start = index.chunk_at(upload.offset());
    let from = find(&index, start);
    let plan = plan(&index, start, from);
    Ok((
        upload,
        Prepared {
            index,
            plan,
            seeds,
            index_bytes,
        },
    ))
}

/// Begins and plans a delta from `seeds` by the new image's `index`. Blocking.
pub fn begin_from_seeds(
    sh: &Shared,
    signed: &SignedManifest,
    resume: bool,
    index: Index,
    index_bytes: u64,
    seeds: Seeds,
) -> Result<(Upload, Prepared), Response> {
    let seeds = Arc::new(seeds);
    let s2 = seeds.clone();
    begin(
        sh,
        signed,
        resume,
        Arc::new(index),
        seeds,
        index_bytes,
        |idx, start| s2.find(idx, start, &sh.seeds),
    )
}

/// Pieces of a whole-image copy.
const COPY_PIECE: u32 = 1 << 20;

/// Begins staging the new image from `path`, which holds its bytes already: nothing to
/// fetch, the copy hashed like any other staging. `None` when `path` cannot be opened.
/// Blocking.
pub fn begin_copy(
    sh: &Shared,
    signed: &SignedManifest,
    resume: bool,
    path: PathBuf,
) -> Result<Option<(Upload, Prepared)>, Response> {
    let size = signed.manifest.size;
    let mut chunks = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let len = u32::try_from((size - offset).min(u64::from(COPY_PIECE))).expect("≤ 1 MiB");
        chunks.push(IndexChunk {
            offset,
            len,
            digest: [0; 32],
        });
        offset += u64::from(len);
    }
    let index = Arc::new(Index {
        params: Params::default(),
        image_size: size,
        chunks,
    });
    let seeds = Arc::new(Seeds::open(std::slice::from_ref(&path)));
    if seeds.is_empty() {
        return Ok(None);
    }
    tracing::info!(
        "{} holds the bytes of version {}: staged by copy",
        path.display(),
        signed.manifest.version
    );
    begin(sh, signed, resume, index, seeds, 0, |idx, _| {
        idx.chunks
            .iter()
            .map(|c| {
                Some(Source {
                    seed: 0,
                    offset: c.offset,
                })
            })
            .collect()
    })
    .map(Some)
}

/// A protocol-class read error: the transfer is wrong, nothing of it is kept.
pub fn protocol(code: ErrorCode, msg: String) -> ReadError {
    ReadError::Protocol(Refusal::new(code, msg))
}

/// Where the bytes of the chunks a device lacks come from: the chunks the plan marks, in
/// order, back to back.
pub(crate) trait ChunkSource {
    /// Fills `buf` with the next bytes.
    async fn fill(&mut self, buf: &mut [u8]) -> Result<(), ReadError>;
    /// Called after the last chunk: the source must hold nothing more.
    async fn end(&mut self) -> Result<(), ReadError>;
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
/// from `src`, each of those checked against its digest. Returns the bytes fetched, or how
/// many came before the failure.
pub(crate) async fn receive<S: ChunkSource>(
    src: &mut S,
    p: &mut Pipeline,
    d: &Prepared,
) -> Result<u64, (u64, ReadError)> {
    let mut out = Out { p, cur: None };
    let mut got = 0u64;
    let r = assemble(src, &mut out, d, &mut got).await;
    out.flush();
    r.map(|()| got).map_err(|e| (got, e))
}

async fn assemble<S: ChunkSource>(
    src: &mut S,
    out: &mut Out<'_>,
    d: &Prepared,
    got: &mut u64,
) -> Result<(), ReadError> {
    let chunks = &d.index.chunks;
    let mut i = d.plan.start;
    while i < chunks.len() {
        let c = &chunks[i];
        if let Some(from) = d.plan.from[i] {
            // The run of reused chunks that lie one after the other in the same seed: read
            // as one.
            let mut run = u64::from(c.len);
            let mut next = i + 1;
            while let (Some(n), Some(Some(s))) = (chunks.get(next), d.plan.from.get(next)) {
                if s.seed != from.seed || s.offset != from.offset + run {
                    break;
                }
                run += u64::from(n.len);
                next += 1;
            }
            copy_run(out, d, from, run).await?;
            i = next;
            continue;
        }
        let len = c.len as usize;
        let mut done = 0usize;
        let mut h = Sha256::new();
        while done < len {
            out.ensure().await?;
            let buf = out.cur.as_mut().expect("buffer");
            let k = (CHUNK - buf.len).min(len - done);
            let at = buf.len;
            let dst = &mut buf.buf[at..at + k];
            src.fill(dst).await?;
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
        i += 1;
    }
    src.end().await
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
