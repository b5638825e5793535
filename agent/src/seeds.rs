//! The images a device already holds, as sources of chunks for a delta: the current and
//! old images on `img`, the staged one on `newimg`. Each is opened once (regular files only,
//! never through a symlink) and chunked with the new index's sizes; every chunk whose digest
//! the new image needs is remembered by where it lies.
//!
//! Chunking an image costs about as much as hashing it, so what it finds is kept
//! ([`SeedCache`]): per file (device, inode, size, modification time) and chunk sizes, its
//! chunks' digests and offsets (40 bytes a chunk: 2.4 MiB for a 1 GiB image at 16 KiB).
//! The agent fills it once after it starts ([`warm`]), so a delta does not wait for it. A
//! replaced image is a new inode and is chunked again.

use std::fs::{File, OpenOptions};
use std::io::BufReader;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use keel_proto::chunks::{chunk_stream, Index, Params};

/// Where a chunk's bytes lie on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    /// Which seed file ([`Seeds::path`]).
    pub seed: usize,
    /// Offset in it.
    pub offset: u64,
}

/// What identifies one version of a file's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

impl FileKey {
    fn of(f: &File) -> std::io::Result<FileKey> {
        let m = f.metadata()?;
        Ok(FileKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }
}

/// A file's chunks: (digest, offset), sorted by digest.
type ChunkList = Arc<Vec<([u8; 32], u64)>>;

/// One file's chunks: digests and offsets, sorted by digest.
#[derive(Debug)]
struct Chunked {
    key: FileKey,
    params: Params,
    chunks: ChunkList,
}

/// The chunks of the images chunked so far (a few entries: the files a device holds).
#[derive(Debug, Default)]
pub struct SeedCache {
    entries: Mutex<Vec<Chunked>>,
}

/// At most this many files are remembered (current, old, staged, and one replaced).
const CACHED: usize = 4;

impl SeedCache {
    /// The chunks of `f` at `params`: remembered, or chunked now and remembered.
    fn chunks_of(&self, path: &Path, f: &File, params: &Params) -> std::io::Result<ChunkList> {
        let key = FileKey::of(f)?;
        {
            let e = self.entries.lock().expect("seed cache");
            if let Some(c) = e.iter().find(|c| c.key == key && c.params == *params) {
                return Ok(c.chunks.clone());
            }
        }
        let t = Instant::now();
        let mut chunks = Vec::new();
        let mut r = BufReader::with_capacity(1 << 20, f);
        let n = chunk_stream(&mut r, params, &mut |c, _| {
            chunks.push((c.digest, c.offset))
        })?;
        chunks.sort_unstable();
        let chunks = Arc::new(chunks);
        tracing::info!(
            "seed {}: {n} bytes chunked into {} chunks ({} ms)",
            path.display(),
            chunks.len(),
            t.elapsed().as_millis()
        );
        let mut e = self.entries.lock().expect("seed cache");
        e.retain(|c| c.key != key);
        if e.len() >= CACHED {
            e.remove(0);
        }
        e.push(Chunked {
            key,
            params: *params,
            chunks: chunks.clone(),
        });
        Ok(chunks)
    }
}

/// The seed files that could be opened.
#[derive(Debug, Default)]
pub struct Seeds {
    files: Vec<(PathBuf, File)>,
}

impl Seeds {
    /// Opens each of `paths` that is a regular file; the others are skipped (logged).
    pub fn open(paths: &[PathBuf]) -> Seeds {
        let mut files = Vec::new();
        for p in paths {
            match open_regular(p) {
                Ok(Some(f)) => files.push((p.clone(), f)),
                Ok(None) => {}
                Err(e) => tracing::warn!("seed {}: {e}: not used", p.display()),
            }
        }
        Seeds { files }
    }

    /// Whether no seed could be opened.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The path of seed `i`.
    pub fn path(&self, i: usize) -> &Path {
        &self.files[i].0
    }

    /// Finds, for every chunk of `index` from `from` on, a seed that holds it. A seed that
    /// cannot be read is skipped.
    pub fn find(&self, index: &Index, from: usize, cache: &SeedCache) -> Vec<Option<Source>> {
        let mut found = vec![None; index.chunks.len()];
        for (seed, (path, file)) in self.files.iter().enumerate() {
            if found[from..].iter().all(Option::is_some) {
                break;
            }
            let chunks = match cache.chunks_of(path, file, &index.params) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("seed {}: {e}: not used", path.display());
                    continue;
                }
            };
            for (i, c) in index.chunks.iter().enumerate().skip(from) {
                if found[i].is_some() {
                    continue;
                }
                let at = chunks.partition_point(|(d, _)| *d < c.digest);
                if let Some((d, offset)) = chunks.get(at) {
                    if *d == c.digest {
                        found[i] = Some(Source {
                            seed,
                            offset: *offset,
                        });
                    }
                }
            }
        }
        found
    }

    /// Reads `buf.len()` bytes of seed `src.seed` at `src.offset + skip`.
    pub fn read_at(&self, src: Source, skip: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.files[src.seed].1.read_exact_at(buf, src.offset + skip)
    }
}

/// Chunks the files of `paths` that are there with the default sizes, into `cache`: run once
/// after the agent starts, off the runtime, so that a delta finds them ready.
pub fn warm(paths: &[PathBuf], cache: &SeedCache) {
    let seeds = Seeds::open(paths);
    for (path, f) in &seeds.files {
        if let Err(e) = cache.chunks_of(path, f, &Params::default()) {
            tracing::warn!("seed {}: {e}", path.display());
        }
    }
}

/// Opens `p` for reading if it is a regular file (`None` when there is nothing there).
fn open_regular(p: &Path) -> std::io::Result<Option<File>> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(p)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !f.metadata()?.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(Some(f))
}
