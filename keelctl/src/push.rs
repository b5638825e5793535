//! A push: the signed manifest offered, then the whole image — or, when the manifest carries
//! a chunk index and the agent can use it, the index and only the chunks the agent lacks.
//! A cut connection is reopened and the upload continues from what the agent holds; a delta
//! the agent could not assemble (a chunk or index it refused) is retried as a full push.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use keel_proto::chunks::{Index, NeedMap};
use keel_proto::endpoint::Endpoint;
use keel_proto::manifest::SignedManifest;
use keel_proto::message::{data_header, ErrorCode, Request, Response};

use crate::client::{Client, Dial, DATA_FRAME};
use crate::error::{Error, Result};

/// How to offer an image.
#[derive(Debug, Clone, Copy)]
pub struct Offer<'a> {
    /// Ask for a delta: the agent may reuse what it holds (and, with `index`, ask for the
    /// index and the chunks it lacks).
    pub delta: bool,
    /// The manifest's chunk index file (`IMAGE.chunks`).
    pub index: Option<&'a Path>,
}

impl Offer<'_> {
    /// The whole image, nothing reused.
    pub const FULL: Offer<'static> = Offer {
        delta: false,
        index: None,
    };

    /// A delta where the manifest allows it: with the index if there is one; without it only
    /// when the manifest names none (an agent would ask for it).
    pub fn delta<'a>(signed: &SignedManifest, index: Option<&'a Path>) -> Offer<'a> {
        Offer {
            delta: index.is_some() || signed.chunks.is_none(),
            index,
        }
    }
}

/// What a push achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    /// The image is staged.
    Staged {
        /// Version staged.
        version: u64,
        /// Image bytes sent over all attempts (not the index).
        sent: u64,
        /// Connections used (1 unless resumed or retried in full).
        attempts: u32,
        /// Bytes the agent took from images it holds (a delta).
        reused: u64,
        /// Whether the staging connection sent only missing chunks.
        delta: bool,
        /// Bytes of chunk index the staging connection sent.
        index: u64,
    },
    /// The agent had it already.
    UpToDate(String),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl Client {
    /// Streams `len` bytes of `f` from `from` in data frames; `sent(n)` after each frame.
    fn send_range(
        &mut self,
        f: &mut File,
        path: &Path,
        from: u64,
        len: u64,
        buf: &mut [u8],
        sent: &mut dyn FnMut(u64),
    ) -> Result<()> {
        f.seek(SeekFrom::Start(from))
            .map_err(io_err("seek image", path))?;
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
            f.read_exact(&mut buf[..n]).map_err(|source| Error::Io {
                op: "read image",
                path: path.to_path_buf(),
                source: if source.kind() == std::io::ErrorKind::UnexpectedEof {
                    std::io::Error::new(
                        source.kind(),
                        format!(
                            "file ends before byte {}, the manifest says more",
                            from + len
                        ),
                    )
                } else {
                    source
                },
            })?;
            let peer = self.peer().to_string();
            self.stream()
                .write_all(&data_header(n).expect("DATA_FRAME is under the frame limit"))
                .and_then(|()| self.stream().write_all(&buf[..n]))
                .map_err(|source| Error::Net {
                    op: "send image",
                    peer,
                    source,
                })?;
            left -= n as u64;
            sent(n as u64);
        }
        Ok(())
    }

    fn send_end(&mut self, what: &'static str) -> Result<()> {
        let peer = self.peer().to_string();
        self.stream()
            .write_all(&data_header(0).expect("an empty frame fits"))
            .map_err(|source| Error::Net {
                op: what,
                peer,
                source,
            })
    }

    /// Offers `signed` and, once accepted, sends `image` from the offset the agent asks for
    /// — or, with `index` (the manifest's chunk index file) and an agent that asks for it,
    /// the index and the chunks it lacks. `progress(done, total)` is called as bytes go out.
    pub fn push_once(
        &mut self,
        signed: &SignedManifest,
        image: &Path,
        resume: bool,
        offer: Offer<'_>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Pushed> {
        let size = signed.manifest.size;
        let mut f = File::open(image).map_err(io_err("open image", image))?;
        let mut buf = vec![0u8; DATA_FRAME];
        let reply = self.call(&Request::Push {
            manifest: signed.clone(),
            resume,
            delta: offer.delta,
        })?;
        let (sent, reused, index) = match reply {
            Response::Send { offset } => {
                let mut done = offset;
                progress(done, size);
                self.send_range(&mut f, image, offset, size - offset, &mut buf, &mut |n| {
                    done += n;
                    progress(done, size);
                })?;
                (size - offset, None, 0)
            }
            // The agent holds the image's bytes already: nothing to send.
            Response::SendChunks {
                chunks: 0, reused, ..
            } => (0, Some(reused), 0),
            Response::SendIndex { size: isize } => {
                let Some(path) = offer.index else {
                    return Err(
                        self.protocol("the agent asks for a chunk index, and none was offered")
                    );
                };
                let bytes = std::fs::read(path).map_err(io_err("read chunk index", path))?;
                if bytes.len() as u64 != isize {
                    return Err(Error::Input {
                        path: path.to_path_buf(),
                        detail: format!(
                            "the chunk index is {} bytes, the manifest signed one of {isize}: sign the image again",
                            bytes.len()
                        ),
                    });
                }
                let idx = Index::decode(&bytes).map_err(|e| Error::Input {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })?;
                for part in bytes.chunks(DATA_FRAME) {
                    self.send_raw(&data_header(part.len()).expect("under the frame limit"))?;
                    self.send_raw(part)?;
                }
                self.send_end("send end of index")?;
                let (need, total, reused) = match self.response()? {
                    Response::SendChunks {
                        need,
                        bytes,
                        reused,
                        ..
                    } => (need, bytes, reused),
                    other => return Err(self.unexpected_reply(&other)),
                };
                let need = NeedMap::from_base64(&need, idx.chunks.len())
                    .map_err(|e| self.protocol(&e.to_string()))?;
                let mut done = 0u64;
                progress(0, total);
                for (from, len) in ranges(&idx, &need) {
                    self.send_range(&mut f, image, from, len, &mut buf, &mut |n| {
                        done += n;
                        progress(done, total);
                    })?;
                }
                (done, Some(reused), isize)
            }
            Response::UpToDate { message } => return Ok(Pushed::UpToDate(message)),
            other => return Err(self.unexpected_reply(&other)),
        };
        self.send_end("send end of image")?;
        match self.response()? {
            Response::Staged { image, .. } => Ok(Pushed::Staged {
                version: image.version,
                sent,
                attempts: 1,
                reused: reused.unwrap_or(0),
                delta: reused.is_some(),
                index,
            }),
            other => Err(self.unexpected_reply(&other)),
        }
    }
}

/// The byte ranges of the chunks `need` marks, adjacent ones merged.
pub fn ranges(idx: &Index, need: &NeedMap) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = Vec::new();
    for (i, c) in idx.chunks.iter().enumerate() {
        if !need.get(i) {
            continue;
        }
        match v.last_mut() {
            Some((s, l)) if *s + *l == c.offset => *l += u64::from(c.len),
            _ => v.push((c.offset, u64::from(c.len))),
        }
    }
    v
}

/// Whether an error is a lost connection worth a resume.
pub fn is_cut(e: &Error) -> bool {
    match e {
        // A cut during the TLS handshake too; a refused agent key is not a cut.
        Error::Net { .. } | Error::Connect { .. } | Error::Tls { .. } => true,
        Error::Refused { code, .. } => matches!(code, ErrorCode::Timeout | ErrorCode::Busy),
        _ => false,
    }
}

/// Whether a delta failed in a way a full push avoids: the agent refused a chunk or the
/// index, or the assembled image did not hash to the manifest.
fn delta_refused(e: &Error) -> bool {
    matches!(e, Error::Refused { code, .. } if matches!(code, ErrorCode::HashMismatch | ErrorCode::BadIndex))
}

/// Pushes with resume: a cut connection is reopened (up to `retries` times, each connect
/// retried for `wait`) and the upload continues from what the agent has on disk. A delta the
/// agent refuses (a chunk, the index, the assembled image) is sent again in full.
pub fn push(
    ep: &Endpoint,
    dial: &Dial,
    signed: &SignedManifest,
    image: &Path,
    offer: Offer<'_>,
    retries: u32,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Pushed> {
    let mut attempts = 0;
    let mut sent = 0u64;
    let mut offer = offer;
    loop {
        attempts += 1;
        let mut last = 0u64;
        let mut start = None;
        let mut track = |done: u64, total: u64| {
            let s = *start.get_or_insert(done);
            last = done - s;
            progress(done, total);
        };
        let r = Client::connect(ep, dial)
            .and_then(|mut c| c.push_once(signed, image, true, offer, &mut track));
        sent += last;
        match r {
            Ok(Pushed::Staged {
                version,
                reused,
                delta,
                index,
                ..
            }) => {
                return Ok(Pushed::Staged {
                    version,
                    sent,
                    attempts,
                    reused,
                    delta,
                    index,
                })
            }
            Ok(up) => return Ok(up),
            Err(e) if offer.delta && delta_refused(&e) => {
                tracing::warn!("delta push to {ep} refused: {e}; sending the whole image");
                offer = Offer::FULL;
            }
            Err(e) if is_cut(&e) && attempts <= retries => {
                tracing::warn!("push to {ep}: {e}; resuming (attempt {})", attempts + 1);
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::chunks::{Chunk, Params};

    #[test]
    fn adjacent_needed_chunks_merge() {
        let lens = [10u32, 20, 30, 40, 50];
        let mut off = 0;
        let chunks = lens
            .iter()
            .map(|&len| {
                let c = Chunk {
                    offset: off,
                    len,
                    digest: [0; 32],
                };
                off += u64::from(len);
                c
            })
            .collect();
        let idx = Index {
            params: Params::default(),
            image_size: off,
            chunks,
        };
        let mut need = NeedMap::new(5);
        for i in [0, 1, 3] {
            need.set(i);
        }
        assert_eq!(ranges(&idx, &need), vec![(0, 30), (60, 40)]);
        assert!(ranges(&idx, &NeedMap::new(5)).is_empty());
    }
}
