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
    let h = keel_proto::wire::encode_header(kind, data.len()).map_err(io::Error::other)?;
    let mut f = Vec::with_capacity(h.len() + data.len());
    f.extend_from_slice(&h);
    f.extend_from_slice(data);
    match tokio::time::timeout(idle, w.write_all(&f)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer does not read",
        )),
    }
}
