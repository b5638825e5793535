//! Framed reads and writes on one connection: every read bounded by the idle timeout, every
//! frame header checked by [`keel_proto::wire::frame_len`] before its body is read.

use std::io;
use std::time::Duration;

use keel_proto::message::{
    message_frame, parse_request, ErrorCode, MessageError, Request, Response,
};
use keel_proto::wire::{frame_len, FrameError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::verify::Refusal;

/// Why reading from the peer stopped.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection.
    Eof,
    /// The peer was silent for the idle timeout.
    Timeout,
    /// The socket failed.
    Io(io::Error),
    /// The peer sent something that is not the protocol.
    Protocol(Refusal),
    /// The writer thread stopped (its own error says why).
    WriterStopped,
}

impl ReadError {
    /// For the log line and the client.
    pub fn describe(&self, idle: Duration) -> String {
        match self {
            ReadError::Eof => "connection closed".into(),
            ReadError::Timeout => format!("no data for {} s", idle.as_secs()),
            ReadError::Io(e) => e.to_string(),
            ReadError::Protocol(r) => r.message.clone(),
            ReadError::WriterStopped => "writer stopped".into(),
        }
    }
}

/// One connection's stream and its idle timeout.
#[derive(Debug)]
pub struct Conn<S> {
    /// The stream.
    pub s: S,
    /// How long a read may wait.
    pub idle: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Reads exactly `buf.len()` bytes within the idle timeout.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadError> {
        match tokio::time::timeout(self.idle, self.s.read_exact(buf)).await {
            Err(_) => Err(ReadError::Timeout),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ReadError::Eof),
            Ok(Err(e)) => Err(ReadError::Io(e)),
        }
    }

    /// Reads a frame header: (payload length after the kind byte, kind byte).
    pub async fn header(&mut self) -> Result<(usize, u8), ReadError> {
        let mut h = [0u8; 4];
        self.read_exact(&mut h).await?;
        let len = frame_len(h).map_err(|e| {
            ReadError::Protocol(match e {
                FrameError::TooLarge { .. } => Refusal::new(
                    ErrorCode::FrameTooLarge,
                    format!("{e} (is this a keel client? header bytes {h:02x?})"),
                ),
                FrameError::Empty => Refusal::new(ErrorCode::BadRequest, e.to_string()),
            })
        })?;
        let mut kind = [0u8; 1];
        self.read_exact(&mut kind).await?;
        Ok((len - 1, kind[0]))
    }

    /// Reads one request frame.
    pub async fn request(&mut self) -> Result<Request, ReadError> {
        let (len, kind) = self.header().await?;
        let mut body = vec![0u8; len + 1];
        body[0] = kind;
        self.read_exact(&mut body[1..]).await?;
        parse_request(&body).map_err(|e| {
            let what = match e {
                MessageError::UnexpectedData => {
                    "image data arrived where a request was expected".to_string()
                }
                other => other.to_string(),
            };
            ReadError::Protocol(Refusal::new(ErrorCode::BadRequest, what))
        })
    }

    /// Sends one response within the idle timeout.
    pub async fn send(&mut self, r: &Response) -> io::Result<()> {
        let f = match message_frame(r) {
            Ok(f) => f,
            Err(e) => message_frame(&Response::error(
                ErrorCode::Io,
                format!("the reply to this request is too large to send: {e}"),
            ))
            .map_err(io::Error::other)?,
        };
        match tokio::time::timeout(self.idle, self.s.write_all(&f)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "peer does not read",
            )),
        }
    }
}

/// Writes one frame of `kind` carrying `data` within `idle` (output streams, file data): the
/// peer not reading for that long is an error.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    data: &[u8],
    idle: Duration,
) -> io::Result<()> {
    write_frame_parts(w, kind, &[data], idle).await
}

/// Writes one frame of `kind` whose body is `parts` one after the other, header and parts
/// in vectored writes: no byte of the body is copied on its way to the socket.
pub async fn write_frame_parts<W: AsyncWrite + Unpin, P: AsRef<[u8]>>(
    w: &mut W,
    kind: u8,
    parts: &[P],
    idle: Duration,
) -> io::Result<()> {
    let len = parts.iter().map(|p| p.as_ref().len()).sum();
    let h = keel_proto::wire::encode_header(kind, len).map_err(io::Error::other)?;
    let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
    all.push(&h);
    all.extend(parts.iter().map(AsRef::as_ref));
    match tokio::time::timeout(idle, write_all_vectored(w, &all)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer does not read",
        )),
    }
}

/// Writes every byte of `bufs` in order, as few `writev` calls as the stream takes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(w: &mut W, bufs: &[&[u8]]) -> io::Result<()> {
    /// Slices handed to one write (well under any IOV_MAX).
    const MAX_SLICES: usize = 64;
    let (mut i, mut off) = (0, 0);
    while i < bufs.len() {
        if off == bufs[i].len() {
            i += 1;
            off = 0;
            continue;
        }
        let mut slices = Vec::with_capacity(MAX_SLICES.min(bufs.len() - i));
        slices.push(io::IoSlice::new(&bufs[i][off..]));
        slices.extend(
            bufs[i + 1..]
                .iter()
                .take(MAX_SLICES - 1)
                .map(|b| io::IoSlice::new(b)),
        );
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 && i < bufs.len() {
            let left = bufs[i].len() - off;
            if n >= left {
                n -= left;
                i += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A writer that takes at most 3 bytes per call, vectored or not.
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = b.len().min(3);
            self.0.extend_from_slice(&b[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(3 - n);
                self.0.extend_from_slice(&b[..take]);
                n += take;
                if n == 3 {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_frame_of_parts_is_the_frame_of_their_concatenation() {
        let parts: Vec<Vec<u8>> = vec![b"ab".to_vec(), vec![], b"cdefg".to_vec(), b"h".to_vec()];
        let mut w = Trickle(Vec::new());
        write_frame_parts(&mut w, 7, &parts, Duration::from_secs(5))
            .await
            .unwrap();
        let mut one = Trickle(Vec::new());
        write_frame(&mut one, 7, b"abcdefgh", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(w.0, one.0);
        let h = keel_proto::wire::encode_header(7, 8).unwrap();
        assert_eq!(&w.0[..h.len()], &h[..]);
        assert_eq!(&w.0[h.len()..], b"abcdefgh");
    }
}
