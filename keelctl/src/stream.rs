//! Opening a byte stream to an agent: TCP, Unix socket, vsock, hybrid vsock.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use keel_proto::endpoint::Endpoint;
use keel_sys::vsock;

use crate::error::{Error, Result};

/// A connected byte stream.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix socket (also vsock and hybrid vsock).
    Unix(UnixStream),
}

impl Stream {
    /// A second handle on the same connection (for a writer thread).
    pub fn try_clone(&self) -> std::io::Result<Stream> {
        match self {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
    }

    /// Sets the read timeout alone (an exec's output may pause for as long as it likes).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Sets the read and write timeouts.
    pub fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
            Stream::Unix(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Opens the byte stream to `ep`; hybrid vsock retries `CONNECT` until `wait` has passed
/// (the guest may not listen yet).
pub fn open(ep: &Endpoint, wait: Duration) -> Result<Stream> {
    let cerr = |detail: String| Error::Connect {
        endpoint: ep.to_string(),
        detail,
    };
    let deadline = Instant::now() + wait;
    loop {
        let r = match ep {
            Endpoint::Tcp(a) => TcpStream::connect(a).map(|s| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
            Endpoint::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
            Endpoint::Vsock { cid, port } => {
                vsock::connect(*cid, *port).map(|fd| Stream::Unix(UnixStream::from(fd)))
            }
            Endpoint::Hybrid { path, port } => hybrid_connect(path, *port),
        };
        match r {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("connect {ep}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(cerr(e.to_string())),
        }
    }
}

fn hybrid_connect(path: &Path, port: u32) -> std::io::Result<Stream> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the reply byte by byte: nothing after the newline may be consumed.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!("no guest listening on vsock port {port} (closed without OK)"),
                ))
            }
            _ if b[0] == b'\n' => break,
            _ if line.len() > 64 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "hybrid vsock reply too long",
                ))
            }
            _ => line.push(b[0]),
        }
    }
    if !line.starts_with(b"OK") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("hybrid vsock answered {:?}", String::from_utf8_lossy(&line)),
        ));
    }
    s.set_read_timeout(None)?;
    Ok(Stream::Unix(s))
}
