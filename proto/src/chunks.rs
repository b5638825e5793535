//! Content-defined chunks of an image, their index, and the signature that binds the index
//! to a manifest: what delta updates are built on.
//!
//! **Chunking** is FastCDC's gear hash with normalized chunking: after `min` bytes each byte
//! shifts the hash left and adds a fixed random word; a cut falls where the top bits of the
//! hash are all zero — `log2(avg) + 2` of them before `avg` bytes, `log2(avg) - 2` after —
//! or at `max`. The hash's top bit depends on the last 64 bytes only, so cuts realign within
//! a few bytes after an insertion or a removal, and unchanged regions chunk the same in both
//! images. Defaults 8/16/64 KiB (casync's are 16/64/256).
//!
//! **The index** is binary: a 32-byte header (`KEELCIX1`, `min`, `avg`, `max` as u32 BE, 4
//! zero bytes, the image size as u64 BE), then one 36-byte entry per chunk in image order:
//! its length as u32 BE and its SHA-256. Offsets are the running sum of the lengths.
//!
//! **The binding** ([`ChunkRef`]) is a second ed25519 signature in the manifest file, over
//! [`ChunkRef::canonical_bytes`]: the image's name, version and SHA-256 with the index's
//! SHA-256 and size. The manifest's own canonical bytes and format do not change, so older
//! agents and initstage read a manifest that carries one, and ignore it.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hex;
use crate::manifest::{Manifest, ManifestError, SignedManifest};

/// Smallest chunk (but the last) by default.
pub const DEFAULT_MIN: u32 = 8 << 10;
/// Average chunk by default (on squashfs roots, 16 KiB moved fewer bytes, index included,
/// than 32 or 64 KiB: `make bench`).
pub const DEFAULT_AVG: u32 = 16 << 10;
/// Largest chunk by default.
pub const DEFAULT_MAX: u32 = 64 << 10;
/// The largest index a device takes: about 233,000 chunks, a 3.6 GiB image at the default
/// average (larger images take a larger `--chunk-size`).
pub const MAX_INDEX: u64 = 8 << 20;
/// Bytes of the index header.
pub const HEADER: usize = 32;
/// Bytes of one index entry.
pub const ENTRY: usize = 36;
const MAGIC: &[u8; 8] = b"KEELCIX1";
/// Smallest `min` accepted (a chunk smaller than a page is all overhead).
const MIN_MIN: u32 = 4 << 10;
/// Largest `max` accepted: one chunk fits a wire frame with room to spare.
const MAX_MAX: u32 = 1 << 20;

/// Why an index or its binding was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The index bytes are not an index.
    #[error("chunk index: {0}")]
    Format(String),
    /// The index does not describe the manifest's image.
    #[error("chunk index does not match the manifest: {0}")]
    Mismatch(String),
}

/// Chunk sizes: the smallest (but the last), the average the cut masks aim at, the largest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Smallest chunk but the last.
    pub min: u32,
    /// Target average, a power of two.
    pub avg: u32,
    /// Largest chunk.
    pub max: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            min: DEFAULT_MIN,
            avg: DEFAULT_AVG,
            max: DEFAULT_MAX,
        }
    }
}

/// splitmix64, to fill the gear table at compile time from a fixed seed.
const fn splitmix(state: u64) -> (u64, u64) {
    let s = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (s, z ^ (z >> 31))
}

/// One random word per byte value. Part of the index format: never change it.
const GEAR: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut state = 0x6b65_656c_6364_6331; // "keelcdc1"
    let mut i = 0;
    while i < 256 {
        let (s, v) = splitmix(state);
        state = s;
        t[i] = v;
        i += 1;
    }
    t
};

impl Params {
    /// Checks the sizes are ones a device chunks with: 4 KiB ≤ min ≤ avg ≤ max ≤ 1 MiB,
    /// avg a power of two.
    pub fn validate(&self) -> Result<(), ChunkError> {
        if self.min < MIN_MIN
            || self.min > self.avg
            || self.avg > self.max
            || self.max > MAX_MAX
            || !self.avg.is_power_of_two()
        {
            return Err(ChunkError::Format(format!(
                "chunk sizes {}/{}/{} are not 4 KiB <= min <= avg (a power of two) <= max <= 1 MiB",
                self.min, self.avg, self.max
            )));
        }
        Ok(())
    }

    /// The masks before and after `avg` bytes: the top `log2(avg) ± 2` bits.
    fn masks(&self) -> (u64, u64) {
        let bits = self.avg.trailing_zeros();
        (!0u64 << (64 - (bits + 2)), !0u64 << (64 - (bits - 2)))
    }

    /// The length of the chunk that starts `data`, where `data` holds at least `max` bytes
    /// or runs to the end of the image.
    pub fn cut(&self, data: &[u8]) -> usize {
        let (min, avg, max) = (self.min as usize, self.avg as usize, self.max as usize);
        if data.len() <= min {
            return data.len();
        }
        let end = data.len().min(max);
        let (hard, easy) = self.masks();
        let mut h = 0u64;
        let normal = avg.min(end);
        for (i, b) in data[min..normal].iter().enumerate() {
            h = (h << 1).wrapping_add(GEAR[usize::from(*b)]);
            if h & hard == 0 {
                return min + i + 1;
            }
        }
        for (i, b) in data[normal..end].iter().enumerate() {
            h = (h << 1).wrapping_add(GEAR[usize::from(*b)]);
            if h & easy == 0 {
                return normal + i + 1;
            }
        }
        end
    }
}

/// One chunk of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Offset in the image.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// SHA-256 of its bytes.
    pub digest: [u8; 32],
}

/// Chunks a stream as it is read, with a buffer of twice `max` bytes: calls `each` with
/// every chunk and its bytes, in order. Returns the bytes read.
pub fn chunk_stream<R: std::io::Read>(
    r: &mut R,
    params: &Params,
    each: &mut dyn FnMut(&Chunk, &[u8]),
) -> std::io::Result<u64> {
    let max = params.max as usize;
    let mut buf = vec![0u8; 2 * max];
    let (mut start, mut end, mut eof) = (0usize, 0usize, false);
    let mut offset = 0u64;
    loop {
        while !eof && end - start < max {
            if end == buf.len() {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
            match r.read(&mut buf[end..]) {
                Ok(0) => eof = true,
                Ok(n) => end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if start == end {
            return Ok(offset);
        }
        let n = params.cut(&buf[start..end]);
        let bytes = &buf[start..start + n];
        let len = u32::try_from(n).expect("a chunk is at most 1 MiB");
        each(
            &Chunk {
                offset,
                len,
                digest: Sha256::digest(bytes).into(),
            },
            bytes,
        );
        offset += n as u64;
        start += n;
    }
}

/// A parsed chunk index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// The sizes it was cut with.
    pub params: Params,
    /// The image's size.
    pub image_size: u64,
    /// The chunks, in image order.
    pub chunks: Vec<Chunk>,
}

impl Index {
    /// Chunks a whole stream into an index.
    pub fn build<R: std::io::Read>(r: &mut R, params: Params) -> std::io::Result<Index> {
        let mut chunks = Vec::new();
        let image_size = chunk_stream(r, &params, &mut |c, _| chunks.push(*c))?;
        Ok(Index {
            params,
            image_size,
            chunks,
        })
    }

    /// The index's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER + ENTRY * self.chunks.len());
        v.extend_from_slice(MAGIC);
        for x in [self.params.min, self.params.avg, self.params.max, 0] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        v.extend_from_slice(&self.image_size.to_be_bytes());
        for c in &self.chunks {
            v.extend_from_slice(&c.len.to_be_bytes());
            v.extend_from_slice(&c.digest);
        }
        v
    }

    /// Parses index bytes: the header, sane sizes, whole entries whose lengths add up to the
    /// image size, none but the last under `min` or any over `max`.
    pub fn decode(b: &[u8]) -> Result<Index, ChunkError> {
        let bad = |s: String| Err(ChunkError::Format(s));
        if b.len() as u64 > MAX_INDEX {
            return bad(format!(
                "{} bytes, over the {MAX_INDEX}-byte limit",
                b.len()
            ));
        }
        if b.len() < HEADER || &b[..8] != MAGIC {
            return bad("no KEELCIX1 header".into());
        }
        let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let params = Params {
            min: u32_at(8),
            avg: u32_at(12),
            max: u32_at(16),
        };
        params.validate()?;
        let image_size = u64::from_be_bytes(b[24..32].try_into().expect("8 bytes"));
        let body = &b[HEADER..];
        if !body.len().is_multiple_of(ENTRY) {
            return bad(format!(
                "{} bytes of entries is not a whole number of {ENTRY}-byte entries",
                body.len()
            ));
        }
        let n = body.len() / ENTRY;
        let mut chunks = Vec::with_capacity(n);
        let mut offset = 0u64;
        for (i, e) in body.chunks_exact(ENTRY).enumerate() {
            let len = u32::from_be_bytes(e[..4].try_into().expect("4 bytes"));
            if len == 0 || len > params.max || (len < params.min && i + 1 != n) {
                return bad(format!(
                    "chunk {i} is {len} bytes, outside {}..={}",
                    params.min, params.max
                ));
            }
            chunks.push(Chunk {
                offset,
                len,
                digest: e[4..].try_into().expect("32 bytes"),
            });
            offset += u64::from(len);
        }
        if offset != image_size {
            return bad(format!(
                "chunks add up to {offset} bytes, the header says {image_size}"
            ));
        }
        Ok(Index {
            params,
            image_size,
            chunks,
        })
    }

    /// The first chunk that ends after `offset` — where a resume at `offset` restarts.
    pub fn chunk_at(&self, offset: u64) -> usize {
        self.chunks
            .partition_point(|c| c.offset + u64::from(c.len) <= offset)
    }
}

/// The signed binding of a chunk index to one image, kept in the manifest file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// SHA-256 of the index file, lower-case hex.
    pub sha256: String,
    /// Size of the index file.
    pub size: u64,
    /// ed25519 signature over [`ChunkRef::canonical_bytes`], 128 hex digits.
    pub signature: String,
}

impl ChunkRef {
    /// The signed bytes: the image's identity and the index's.
    pub fn canonical_bytes(m: &Manifest, sha256: &str, size: u64) -> Vec<u8> {
        format!(
            "keel-chunks 1\nname {}\nversion {}\nimage-sha256 {}\nindex-sha256 {}\nindex-size {size}\n",
            m.name,
            m.version,
            m.sha256.to_ascii_lowercase(),
            sha256.to_ascii_lowercase()
        )
        .into_bytes()
    }

    /// Signs the index bytes `index` for manifest `m`.
    pub fn sign(m: &Manifest, index: &[u8], key: &SigningKey) -> ChunkRef {
        let sha256 = hex::encode(&Sha256::digest(index));
        let size = index.len() as u64;
        let sig = key.sign(&Self::canonical_bytes(m, &sha256, size));
        ChunkRef {
            sha256,
            size,
            signature: hex::encode(&sig.to_bytes()),
        }
    }

    /// Checks the index file's bytes against this reference (size, then digest).
    pub fn check(&self, index: &[u8]) -> Result<(), ChunkError> {
        if index.len() as u64 != self.size {
            return Err(ChunkError::Mismatch(format!(
                "it is {} bytes, the manifest says {}",
                index.len(),
                self.size
            )));
        }
        let found = hex::encode(&Sha256::digest(index));
        if !found.eq_ignore_ascii_case(&self.sha256) {
            return Err(ChunkError::Mismatch(format!(
                "it hashes to {found}, the manifest says {}",
                self.sha256
            )));
        }
        Ok(())
    }
}

impl SignedManifest {
    /// The chunk index reference, if the manifest carries one whose signature verifies with
    /// any of `keys` and whose size is one a device takes. `Ok(None)`: none carried.
    pub fn verified_chunks(
        &self,
        keys: &[VerifyingKey],
    ) -> Result<Option<&ChunkRef>, ManifestError> {
        let Some(c) = &self.chunks else {
            return Ok(None);
        };
        if hex::decode::<32>(&c.sha256).is_none() {
            return Err(ManifestError::Digest(c.sha256.clone()));
        }
        if c.size > MAX_INDEX || c.size < HEADER as u64 {
            return Err(ManifestError::Json(format!(
                "chunk index size {} is outside {HEADER}..={MAX_INDEX}",
                c.size
            )));
        }
        let raw = hex::decode::<64>(&c.signature).ok_or(ManifestError::SignatureEncoding)?;
        let sig = Signature::from_bytes(&raw);
        let msg = ChunkRef::canonical_bytes(&self.manifest, &c.sha256, c.size);
        if keys.iter().any(|k| k.verify_strict(&msg, &sig).is_ok()) {
            Ok(Some(c))
        } else {
            Err(ManifestError::BadSignature { keys: keys.len() })
        }
    }
}

/// Which chunks a device lacks, as sent on the wire: one bit per chunk, chunk `i` in byte
/// `i / 8`, bit `i % 8` (least significant first), set when the chunk must be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeedMap {
    bits: Vec<u8>,
    len: usize,
}

impl NeedMap {
    /// A map of `len` chunks, none needed.
    pub fn new(len: usize) -> NeedMap {
        NeedMap {
            bits: vec![0; len.div_ceil(8)],
            len,
        }
    }

    /// Marks chunk `i` needed.
    pub fn set(&mut self, i: usize) {
        self.bits[i / 8] |= 1 << (i % 8);
    }

    /// Whether chunk `i` is needed.
    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.bits[i / 8] & (1 << (i % 8)) != 0
    }

    /// How many chunks it covers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it covers no chunk.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Standard base64 of the bits, as the wire carries them.
    pub fn to_base64(&self) -> String {
        crate::exec::b64(&self.bits)
    }

    /// Parses the wire form for an index of `len` chunks.
    pub fn from_base64(s: &str, len: usize) -> Result<NeedMap, ChunkError> {
        use base64ct::Encoding;
        let bits = base64ct::Base64::decode_vec(s)
            .map_err(|e| ChunkError::Format(format!("need map is not base64: {e}")))?;
        if bits.len() != len.div_ceil(8) {
            return Err(ChunkError::Format(format!(
                "need map has {} bytes for {len} chunks",
                bits.len()
            )));
        }
        Ok(NeedMap { bits, len })
    }
}

#[cfg(test)]
mod tests;
