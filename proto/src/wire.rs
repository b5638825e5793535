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
}

/// Prefixes `body` with its length.
pub fn encode(body: &[u8]) -> Result<Vec<u8>, FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_FRAME,
        });
    }
    let mut v = Vec::with_capacity(4 + body.len());
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(body);
    Ok(v)
}

/// A frame header for a body of `len` bytes (kind byte included).
pub fn header(len: usize) -> [u8; 4] {
    (len as u32).to_be_bytes()
}

/// Incremental decoder: feed bytes as they arrive, take whole frames out.
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
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge {
                len,
                max: MAX_FRAME,
            });
        }
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
        let mut stream = encode(b"hello").unwrap();
        stream.extend(encode(b"").unwrap());
        stream.extend(encode(&[7u8; 1000]).unwrap());
        for chunk in [1, 2, 3, 5, 4096] {
            let mut d = Decoder::default();
            let mut out = Vec::new();
            for c in stream.chunks(chunk) {
                d.push(c);
                while let Some(f) = d.next_frame().unwrap() {
                    out.push(f);
                }
            }
            assert_eq!(out, vec![b"hello".to_vec(), vec![], vec![7u8; 1000]]);
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn oversized_frames_are_refused_from_the_header() {
        let mut d = Decoder::default();
        d.push(&((MAX_FRAME as u32) + 1).to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge {
                len: MAX_FRAME + 1,
                max: MAX_FRAME
            })
        );
        assert!(encode(&vec![0u8; MAX_FRAME + 1]).is_err());
    }

    #[test]
    fn truncated_frame_waits() {
        let mut d = Decoder::default();
        let f = encode(b"abcdef").unwrap();
        d.push(&f[..7]);
        assert_eq!(d.next_frame(), Ok(None));
        d.push(&f[7..]);
        assert_eq!(d.next_frame(), Ok(Some(b"abcdef".to_vec())));
    }
}
