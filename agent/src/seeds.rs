//! The images a device already holds, as sources of chunks for a delta: the current and
//! old images on `img`, the staged one on `newimg`. Each is opened once (regular files only,
//! never through a symlink), chunked with the new index's sizes, and every chunk whose
//! digest the new image needs is remembered by where it lies. Memory: the new index's
//! digests and one chunking buffer, whatever the images' sizes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::BufReader;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use keel_proto::chunks::{chunk_stream, Index};

/// Where a chunk's bytes lie on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    /// Which seed file ([`Seeds::path`]).
    pub seed: usize,
    /// Offset in it.
    pub offset: u64,
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
    /// cannot be read to its end still gives the chunks found before the error.
    pub fn find(&self, index: &Index, from: usize) -> Vec<Option<Source>> {
        let mut found = vec![None; index.chunks.len()];
        let mut wanted: HashMap<[u8; 32], Vec<usize>> = HashMap::new();
        for (i, c) in index.chunks.iter().enumerate().skip(from) {
            wanted.entry(c.digest).or_default().push(i);
        }
        for (seed, (path, file)) in self.files.iter().enumerate() {
            if wanted.is_empty() {
                break;
            }
            let t = Instant::now();
            let mut hits = 0usize;
            let mut r = BufReader::with_capacity(1 << 20, file);
            let scanned = chunk_stream(&mut r, &index.params, &mut |c, _| {
                if let Some(is) = wanted.remove(&c.digest) {
                    hits += is.len();
                    for i in is {
                        found[i] = Some(Source {
                            seed,
                            offset: c.offset,
                        });
                    }
                }
            });
            match scanned {
                Ok(n) => tracing::info!(
                    "seed {}: {n} bytes chunked, {hits} chunks of the new image found ({} ms)",
                    path.display(),
                    t.elapsed().as_millis()
                ),
                Err(e) => tracing::warn!(
                    "seed {}: {e}; {hits} chunks found before it",
                    path.display()
                ),
            }
        }
        found
    }

    /// Reads `buf.len()` bytes of seed `src.seed` at `src.offset + skip`.
    pub fn read_at(&self, src: Source, skip: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.files[src.seed].1.read_exact_at(buf, src.offset + skip)
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
