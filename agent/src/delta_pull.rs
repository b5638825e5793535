//! A delta pull: the image's signed chunk index fetched beside it (`images/<sha256>.chunks`),
//! the chunks the device lacks fetched as a few single-range GETs ([`Ranges`]) — ranges of
//! adjacent chunks merged, small gaps of reusable bytes fetched too when that saves a request
//! — which any web server, CDN or S3 store serves (S3 refuses multi-range requests).
//!
//! [`merge`] is pure: the plan's missing chunks as ranges, and the chunks that become
//! fetched because a merged range covers them.

use keel_proto::channel;
use keel_proto::chunks::{ChunkRef, Index};
use keel_proto::manifest::SignedManifest;
use keel_proto::message::ErrorCode;

use crate::conn::ReadError;
use crate::delta::{self, protocol, ChunkSource, Plan};
use crate::http::{self, HttpError};

/// Reusable bytes between two missing runs that are fetched anyway, to save a request.
pub const MAX_GAP: u64 = 64 << 10;
/// At most this many requests per delta: beyond it, the smallest gaps are fetched too.
pub const MAX_RANGES: usize = 16;

/// The plan's missing chunks from its start as byte ranges `(offset, len)`: adjacent chunks
/// in one range, ranges closer than `max_gap` merged, then the closest merged until at most
/// `max_ranges` remain. Returns the ranges and the plan with every chunk inside a range
/// marked missing (its bytes come with the range).
pub fn merge(
    index: &Index,
    plan: &Plan,
    max_gap: u64,
    max_ranges: usize,
) -> (Vec<(u64, u64)>, Plan) {
    // Runs of missing chunks: (first chunk, last chunk).
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for i in plan.start..index.chunks.len() {
        if plan.from[i].is_some() {
            continue;
        }
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == i => *last = i,
            _ => runs.push((i, i)),
        }
    }
    let start = |r: &(usize, usize)| index.chunks[r.0].offset;
    let end = |r: &(usize, usize)| {
        let c = &index.chunks[r.1];
        c.offset + u64::from(c.len)
    };
    let gap = |a: &(usize, usize), b: &(usize, usize)| start(b) - end(a);
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for r in runs {
        match merged.last_mut() {
            Some(m) if gap(m, &r) <= max_gap => m.1 = r.1,
            _ => merged.push(r),
        }
    }
    while merged.len() > max_ranges.max(1) {
        let k = (0..merged.len() - 1)
            .min_by_key(|&k| gap(&merged[k], &merged[k + 1]))
            .expect("two ranges at least");
        merged[k].1 = merged[k + 1].1;
        merged.remove(k + 1);
    }
    let mut from = plan.from.clone();
    for r in &merged {
        for f in &mut from[r.0..=r.1] {
            *f = None;
        }
    }
    let ranges = merged
        .iter()
        .map(|r| (start(r), end(r) - start(r)))
        .collect();
    (ranges, delta::plan(index, plan.start, from))
}

/// Fetches and checks the chunk index the manifest signs: `None` (logged) when it cannot be
/// had or is not the signed one — the pull is then a full one.
pub async fn fetch_index(
    client: &http::Client,
    base: &str,
    signed: &SignedManifest,
    cref: &ChunkRef,
) -> Option<(Index, u64)> {
    let url = channel::join(base, &channel::index_path(&signed.manifest.sha256));
    let got = async {
        let resp = client.get(&url, &[]).await.map_err(|e| e.to_string())?;
        if resp.head.status != 200 {
            return Err(format!("HTTP {}", resp.head.status));
        }
        let max = usize::try_from(cref.size).expect("capped at MAX_INDEX");
        let b = resp.body(max).await.map_err(|e| e.to_string())?;
        cref.check(&b).map_err(|e| e.to_string())?;
        let idx = delta::decode_index(&b, &signed.manifest).map_err(|r| r.message)?;
        Ok::<_, String>((idx, b.len() as u64))
    }
    .await;
    match got {
        Ok(x) => Some(x),
        Err(e) => {
            tracing::warn!("chunk index {url}: {e}; fetching the whole image");
            None
        }
    }
}

/// The missing chunks' bytes as the responses to one `Range` GET per range, in order.
#[derive(Debug)]
pub struct Ranges<'a> {
    client: &'a http::Client,
    url: String,
    ranges: Vec<(u64, u64)>,
    next: usize,
    cur: Option<http::Response>,
}

impl<'a> Ranges<'a> {
    /// The ranges of `url` to fetch.
    pub fn new(client: &'a http::Client, url: String, ranges: Vec<(u64, u64)>) -> Ranges<'a> {
        Ranges {
            client,
            url,
            ranges,
            next: 0,
            cur: None,
        }
    }

    /// How many requests it makes.
    pub fn requests(&self) -> usize {
        self.ranges.len()
    }

    fn cut(e: &HttpError) -> ReadError {
        ReadError::Io(std::io::Error::other(e.to_string()))
    }

    async fn open(&mut self) -> Result<(), ReadError> {
        let Some(&(from, len)) = self.ranges.get(self.next) else {
            return Err(protocol(
                ErrorCode::SizeMismatch,
                format!("{}: more bytes asked than the ranges hold", self.url),
            ));
        };
        self.next += 1;
        let range = [("Range", format!("bytes={from}-{}", from + len - 1))];
        let resp = self
            .client
            .get(&self.url, &range)
            .await
            .map_err(|e| Self::cut(&e))?;
        if resp.head.status != 206 || resp.head.range_start() != Some(from) || resp.remaining != len
        {
            return Err(protocol(
                ErrorCode::Unavailable,
                format!(
                    "{}: asked for bytes {from}-{}, the server answered HTTP {} ({} bytes{}): a server that serves Range is needed for a delta",
                    self.url,
                    from + len - 1,
                    resp.head.status,
                    resp.remaining,
                    resp.head
                        .range_start()
                        .map(|s| format!(" from {s}"))
                        .unwrap_or_default()
                ),
            ));
        }
        self.cur = Some(resp);
        Ok(())
    }
}

impl ChunkSource for Ranges<'_> {
    async fn fill(&mut self, buf: &mut [u8]) -> Result<(), ReadError> {
        let mut filled = 0;
        while filled < buf.len() {
            if self.cur.as_ref().is_none_or(|r| r.remaining == 0) {
                self.open().await?;
            }
            let r = self.cur.as_mut().expect("a response");
            let n = r
                .read(&mut buf[filled..])
                .await
                .map_err(|e| Self::cut(&e))?;
            filled += n;
        }
        Ok(())
    }

    async fn end(&mut self) -> Result<(), ReadError> {
        let left = self.cur.as_ref().map_or(0, |r| r.remaining);
        if left > 0 || self.next < self.ranges.len() {
            return Err(protocol(
                ErrorCode::SizeMismatch,
                format!(
                    "{}: the chunks ended with {left} bytes and {} ranges left",
                    self.url,
                    self.ranges.len() - self.next
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds::Source;
    use keel_proto::chunks::{Chunk, Params};

    fn index(lens: &[u32]) -> Index {
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
        Index {
            params: Params::default(),
            image_size: off,
            chunks,
        }
    }

    fn have(n: usize, missing: &[usize]) -> Vec<Option<Source>> {
        (0..n)
            .map(|i| (!missing.contains(&i)).then_some(Source { seed: 0, offset: 0 }))
            .collect()
    }

    #[test]
    fn adjacent_chunks_one_range_small_gaps_merged_big_ones_kept() {
        let idx = index(&[100, 100, 100, 100, 1000, 100, 100]);
        let p = delta::plan(&idx, 0, have(7, &[0, 1, 3, 6]));
        // Gap of 100 (chunk 2) merged at max_gap 100; gap 1100 (chunks 4, 5) kept.
        let (r, p2) = merge(&idx, &p, 100, 16);
        assert_eq!(r, vec![(0, 400), (1500, 100)]);
        assert!(p2.from[2].is_none() && p2.from[4].is_some());
        assert_eq!(p2.bytes, 500);
        assert_eq!(p2.reused, 1100);
        // No gap merging: three ranges; at most two: the smallest gap goes.
        let (r, _) = merge(&idx, &p, 0, 16);
        assert_eq!(r, vec![(0, 200), (300, 100), (1500, 100)]);
        let (r, _) = merge(&idx, &p, 0, 2);
        assert_eq!(r, vec![(0, 400), (1500, 100)]);
        let (r, p3) = merge(&idx, &p, 0, 1);
        assert_eq!(r, vec![(0, 1600)]);
        assert_eq!(p3.reused, 0);
    }

    #[test]
    fn nothing_missing_or_resumed_past_it() {
        let idx = index(&[100, 100, 100]);
        let (r, p) = merge(
            &idx,
            &delta::plan(&idx, 0, have(3, &[])),
            MAX_GAP,
            MAX_RANGES,
        );
        assert!(r.is_empty());
        assert_eq!(p.bytes, 0);
        // Resumed at chunk 2: chunk 0, missing, is already on disk.
        let (r, _) = merge(&idx, &delta::plan(&idx, 2, have(3, &[0, 2])), 0, 16);
        assert_eq!(r, vec![(200, 100)]);
    }
}
