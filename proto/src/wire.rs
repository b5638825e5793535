//! The wire protocol's framing (pure): every frame is a 4-byte big-endian length followed by
//! that many bytes of body. The body's first byte is its kind: [`KIND_MESSAGE`] (a JSON
//! [`crate::message`] follows) or [`KIND_DATA`] (image bytes follow). Frames above
//! [`MAX_FRAME`] are refused from the header, before any byte of their body is buffered, so a
//! peer cannot make the agent allocate more than that.
//!
//! Messages are framed by length, never by EOF: a half-closed hybrid-vsock socket loses the
//! reply otherwise. The whole exchange is described in `docs/protocol.md`.

/// Protocol version spoken in the hello.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame body accepted (image bytes travel in chunks below this).
pub const MAX_FRAME: usize = 1 << 20;

/// Body kind: a JSON message follows.
pub const KIND_MESSAGE: u8 = 0x01;
/// Body kind: image bytes follow.
pub const KIND_DATA: u8 = 0x02;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The announced body is larger than the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The header announces no body, so not even a kind byte.
    #[error("empty frame (no kind byte)")]
    Empty,
}

/// Bytes in a frame header: the length, then the kind byte that starts every body.
pub const HEADER: usize = 5;

/// Checks a received length prefix: the body's length (kind byte included), refused when it
/// is over [`MAX_FRAME`] or zero. Every reader of frames (the agent, the client, the
/// [`Decoder`]) calls this, before buffering a byte of the body.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    Ok(len)
}

/// The header of a frame of `kind` carrying `payload_len` bytes after the kind byte;
/// refused when the body would be over [`MAX_FRAME`].
pub fn encode_header(kind: u8, payload_len: usize) -> Result<[u8; HEADER], FrameError> {
    let len = payload_len.saturating_add(1);
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    // MAX_FRAME fits a u32, so the checked length does too.
    let h = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    Ok([h[0], h[1], h[2], h[3], kind])
}

/// A whole frame: header, kind byte, payload. The only frame encoder.
pub fn encode(kind: u8, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let h = encode_header(kind, payload.len())?;
    let mut v = Vec::with_capacity(HEADER + payload.len());
    v.extend_from_slice(&h);
    v.extend_from_slice(payload);
    Ok(v)
}

/// Incremental decoder over [`frame_len`]: feed bytes as they arrive, take whole frame
/// bodies (kind byte first) out.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame's body, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(prefix) = self.buf.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = frame_len(*prefix)?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(body))
    }

    /// Bytes received but not yet part of a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_split() {
        let mut stream = encode(KIND_MESSAGE, b"hello").unwrap();
        stream.extend(encode(KIND_DATA, b"").unwrap());
        stream.extend(encode(KIND_DATA, &[7u8; 1000]).unwrap());
        for chunk in [1, 2, 3, 5, 4096] {
            let mut d = Decoder::default();
            let mut out = Vec::new();
            for c in stream.chunks(chunk) {
                d.push(c);
                while let Some(f) = d.next_frame().unwrap() {
                    out.push(f);
                }
            }
            let mut big = vec![KIND_DATA];
            big.extend([7u8; 1000]);
            assert_eq!(out, vec![b"\x01hello".to_vec(), vec![KIND_DATA], big]);
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn oversized_frames_are_refused_from_the_header() {
        let mut d = Decoder::default();
        d.push(&(u32::try_from(MAX_FRAME).unwrap() + 1).to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge {
                len: MAX_FRAME + 1,
                max: MAX_FRAME
            })
        );
        assert!(encode(KIND_DATA, &vec![0u8; MAX_FRAME - 1]).is_ok());
        assert!(encode(KIND_DATA, &vec![0u8; MAX_FRAME]).is_err());
        assert_eq!(frame_len([0; 4]), Err(FrameError::Empty));
    }

    #[test]
    fn truncated_frame_waits() {
        let mut d = Decoder::default();
        let f = encode(KIND_MESSAGE, b"abcdef").unwrap();
        d.push(&f[..7]);
        assert_eq!(d.next_frame(), Ok(None));
        d.push(&f[7..]);
        assert_eq!(d.next_frame(), Ok(Some(b"\x01abcdef".to_vec())));
    }
}
