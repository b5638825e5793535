//! The blocking client: endpoints, hello, requests, and a push that resumes after a cut.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use keel_proto::manifest::SignedManifest;
use keel_proto::message::{
    data_header, message_frame, parse_response, ErrorCode, Request, Response,
};
use keel_proto::wire::{MAX_FRAME, PROTOCOL_VERSION};

use crate::error::{Code, Error, Result};
use crate::vsock;

/// Image bytes per data frame.
pub const DATA_FRAME: usize = 256 * 1024;

/// Where an agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp://HOST:PORT`
    Tcp(String),
    /// `unix:///PATH`
    Unix(PathBuf),
    /// `vsock://CID:PORT` (from inside a VM, or a host with vhost-vsock)
    Vsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
    },
    /// `hvsock:///PATH:PORT`: Firecracker / Cloud Hypervisor hybrid vsock (a Unix socket on
    /// the host; `CONNECT <port>\n` → `OK <n>\n`).
    Hybrid {
        /// The VMM's Unix socket.
        path: PathBuf,
        /// The guest port.
        port: u32,
    },
}

impl FromStr for Endpoint {
    type Err = Error;

    fn from_str(s: &str) -> Result<Endpoint> {
        let bad = || Error::Endpoint(s.to_string());
        if let Some(a) = s.strip_prefix("tcp://") {
            let (host, port) = a.rsplit_once(':').ok_or_else(bad)?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad());
            }
            Ok(Endpoint::Tcp(a.to_string()))
        } else if let Some(p) = s.strip_prefix("unix://") {
            if !p.starts_with('/') {
                return Err(bad());
            }
            Ok(Endpoint::Unix(p.into()))
        } else if let Some(a) = s.strip_prefix("vsock://") {
            let (cid, port) = a.split_once(':').ok_or_else(bad)?;
            Ok(Endpoint::Vsock {
                cid: cid.parse().map_err(|_| bad())?,
                port: port.parse().map_err(|_| bad())?,
            })
        } else if let Some(a) = s.strip_prefix("hvsock://") {
            let (path, port) = a.rsplit_once(':').ok_or_else(bad)?;
            if !path.starts_with('/') {
                return Err(bad());
            }
            Ok(Endpoint::Hybrid {
                path: path.into(),
                port: port.parse().map_err(|_| bad())?,
            })
        } else {
            Err(bad())
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Endpoint::Hybrid { path, port } => write!(f, "hvsock://{}:{port}", path.display()),
        }
    }
}

/// A connected byte stream.
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix socket (also vsock and hybrid vsock).
    Unix(UnixStream),
}

impl Stream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
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

/// A session with an agent.
pub struct Client {
    s: Stream,
    peer: String,
    /// The agent's version, from its hello.
    pub agent: String,
}

/// Reads one frame body (blocking).
pub fn read_frame(r: &mut impl Read, peer: &str) -> Result<Vec<u8>> {
    let mut h = [0u8; 4];
    r.read_exact(&mut h).map_err(|source| Error::Net {
        op: "read reply",
        peer: peer.to_string(),
        source,
    })?;
    let len = u32::from_be_bytes(h) as usize;
    if len > MAX_FRAME {
        return Err(Error::Protocol {
            peer: peer.to_string(),
            detail: format!("reply frame of {len} bytes exceeds {MAX_FRAME}"),
        });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|source| Error::Net {
        op: "read reply",
        peer: peer.to_string(),
        source,
    })?;
    Ok(body)
}

/// What a push achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    /// The image is staged.
    Staged {
        /// Version staged.
        version: u64,
        /// Bytes sent over all attempts.
        sent: u64,
        /// Connections used (1 unless resumed).
        attempts: u32,
    },
    /// The agent had it already.
    UpToDate(String),
}

impl Client {
    /// Connects and exchanges hellos. `timeout` bounds every read and write.
    pub fn connect(ep: &Endpoint, wait: Duration, timeout: Duration) -> Result<Client> {
        let s = open(ep, wait)?;
        Client::over(s, ep.to_string(), timeout)
    }

    /// Exchanges hellos over an open stream.
    pub fn over(s: Stream, peer: String, timeout: Duration) -> Result<Client> {
        s.set_timeout(Some(timeout)).map_err(|source| Error::Net {
            op: "set timeout",
            peer: peer.clone(),
            source,
        })?;
        let mut c = Client {
            s,
            peer,
            agent: String::new(),
        };
        match c.call(&Request::Hello {
            protocol: PROTOCOL_VERSION,
            client: format!("keelctl {}", env!("CARGO_PKG_VERSION")),
        })? {
            Response::Hello { agent, .. } => {
                c.agent = agent;
                Ok(c)
            }
            other => Err(c.unexpected(&other)),
        }
    }

    fn unexpected(&self, r: &Response) -> Error {
        match r {
            Response::Error { code, message } => Error::Refused {
                code: Code(*code),
                message: message.clone(),
            },
            other => Error::Protocol {
                peer: self.peer.clone(),
                detail: format!("unexpected reply {other:?}"),
            },
        }
    }

    fn net(&self, op: &'static str) -> impl Fn(std::io::Error) -> Error + '_ {
        move |source| Error::Net {
            op,
            peer: self.peer.clone(),
            source,
        }
    }

    /// Reads one response.
    pub fn response(&mut self) -> Result<Response> {
        let body = read_frame(&mut self.s, &self.peer)?;
        parse_response(&body).map_err(|e| Error::Protocol {
            peer: self.peer.clone(),
            detail: e.to_string(),
        })
    }

    /// Sends a request and reads its response (an `Error` response is returned as is).
    pub fn call(&mut self, req: &Request) -> Result<Response> {
        let f = message_frame(req);
        self.s.write_all(&f).map_err(self.net("send request"))?;
        self.response()
    }

    /// Sends a request; an `Error` response becomes [`Error::Refused`].
    pub fn expect(&mut self, req: &Request) -> Result<Response> {
        match self.call(req)? {
            Response::Error { code, message } => Err(Error::Refused {
                code: Code(code),
                message,
            }),
            r => Ok(r),
        }
    }

    /// The raw stream (tests write malformed frames through it).
    pub fn stream(&mut self) -> &mut Stream {
        &mut self.s
    }

    /// Offers `signed` and, once accepted, sends `image` from the offset the agent asks for.
    /// `progress(done, total)` is called as bytes go out.
    pub fn push_once(
        &mut self,
        signed: &SignedManifest,
        image: &Path,
        resume: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Pushed> {
        let size = signed.manifest.size;
        let offset = match self.call(&Request::Push {
            manifest: signed.clone(),
            resume,
        })? {
            Response::Send { offset } => offset,
            Response::UpToDate { message } => return Ok(Pushed::UpToDate(message)),
            other => return Err(self.unexpected(&other)),
        };
        let mut f = File::open(image).map_err(|source| Error::Io {
            op: "open image",
            path: image.to_path_buf(),
            source,
        })?;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset)).map_err(|source| {
            Error::Io {
                op: "seek image",
                path: image.to_path_buf(),
                source,
            }
        })?;
        let mut r = BufReader::with_capacity(DATA_FRAME, f);
        let mut done = offset;
        progress(done, size);
        while done < size {
            let buf = r.fill_buf().map_err(|source| Error::Io {
                op: "read image",
                path: image.to_path_buf(),
                source,
            })?;
            if buf.is_empty() {
                return Err(Error::Io {
                    op: "read image",
                    path: image.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("file ends at {done}, the manifest says {size} bytes"),
                    ),
                });
            }
            let n = buf.len().min((size - done) as usize);
            self.s
                .write_all(&data_header(n))
                .and_then(|()| self.s.write_all(&buf[..n]))
                .map_err(|source| Error::Net {
                    op: "send image",
                    peer: self.peer.clone(),
                    source,
                })?;
            r.consume(n);
            done += n as u64;
            progress(done, size);
        }
        self.s
            .write_all(&data_header(0))
            .map_err(self.net("send end of image"))?;
        match self.response()? {
            Response::Staged {
                image, received, ..
            } => Ok(Pushed::Staged {
                version: image.version,
                sent: received,
                attempts: 1,
            }),
            other => Err(self.unexpected(&other)),
        }
    }
}

/// Whether an error is a lost connection worth a resume.
pub fn is_cut(e: &Error) -> bool {
    match e {
        Error::Net { .. } | Error::Connect { .. } => true,
        Error::Refused { code, .. } => matches!(code.0, ErrorCode::Timeout | ErrorCode::Busy),
        _ => false,
    }
}

/// Pushes with resume: a cut connection is reopened (up to `retries` times) and the upload
/// continues from what the agent has on disk.
pub fn push(
    ep: &Endpoint,
    signed: &SignedManifest,
    image: &Path,
    retries: u32,
    timeout: Duration,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Pushed> {
    let mut attempts = 0;
    let mut sent = 0u64;
    loop {
        attempts += 1;
        let mut last = 0u64;
        let mut start = None;
        let mut track = |done: u64, total: u64| {
            let s = *start.get_or_insert(done);
            last = done - s;
            progress(done, total);
        };
        let r = Client::connect(ep, Duration::from_secs(10), timeout)
            .and_then(|mut c| c.push_once(signed, image, true, &mut track));
        sent += last;
        match r {
            Ok(Pushed::Staged { version, .. }) => {
                return Ok(Pushed::Staged {
                    version,
                    sent,
                    attempts,
                })
            }
            Ok(up) => return Ok(up),
            Err(e) if is_cut(&e) && attempts <= retries => {
                tracing::warn!("push to {ep}: {e}; resuming (attempt {})", attempts + 1);
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
}
