//! Opening a byte stream to an agent: TCP (always TLS), Unix socket, vsock, hybrid vsock.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use keel_proto::endpoint::Endpoint;
use keel_sys::vsock;

use crate::error::{Error, Result};
use crate::known::Trust;
use crate::tls::TlsStream;

/// A connected byte stream.
#[derive(Debug)]
pub enum Stream {
    /// TCP, inside TLS.
    Tls(TlsStream),
    /// Unix socket (also vsock and hybrid vsock).
    Unix(UnixStream),
}

impl Stream {
    /// A second handle on the same connection (for a writer thread).
    pub fn try_clone(&self) -> std::io::Result<Stream> {
        match self {
            Stream::Tls(s) => s.try_clone().map(Stream::Tls),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
    }

    /// Sets the read timeout alone (an exec's output may pause for as long as it likes).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tls(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// The channel binding an `auth` signature covers (TLS); empty on the others.
    pub fn binding(&self) -> &[u8] {
        match self {
            Stream::Tls(s) => s.binding(),
            Stream::Unix(_) => &[],
        }
    }

    /// Sets the read and write timeouts.
    pub fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tls(s) => s.set_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tls(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tls(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Opens the byte stream to `ep`, retrying the connection until `wait` has passed (the agent
/// or guest may not listen yet); on TCP, then the TLS handshake with the agent's key judged
/// by `trust` (see [`crate::known`]), bounded by `timeout`.
pub fn open(ep: &Endpoint, wait: Duration, timeout: Duration, trust: &Trust) -> Result<Stream> {
    let cerr = |detail: String| Error::Connect {
        endpoint: ep.to_string(),
        detail,
    };
    let deadline = Instant::now() + wait;
    let tcp = loop {
        let r = match ep {
            Endpoint::Tcp(a) => TcpStream::connect(a).map(Ok),
            Endpoint::Unix(p) => UnixStream::connect(p).map(Err),
            Endpoint::Vsock { cid, port } => {
                vsock::connect(*cid, *port).map(|fd| Err(UnixStream::from(fd)))
            }
            Endpoint::Hybrid { path, port } => hybrid_connect(path, *port).map(Err),
        };
        match r {
            Ok(Ok(tcp)) => break tcp,
            Ok(Err(unix)) => return Ok(Stream::Unix(unix)),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("connect {ep}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(cerr(e.to_string())),
        }
    };
    let _ = tcp.set_nodelay(true);
    tcp.set_read_timeout(Some(timeout))
        .and(tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| cerr(e.to_string()))?;
    Ok(Stream::Tls(TlsStream::connect(
        tcp,
        &ep.to_string(),
        trust,
    )?))
}

fn hybrid_connect(path: &Path, port: u32) -> std::io::Result<UnixStream> {
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
    Ok(s)
}
