//! A small HTTP/1.1 client for pulling updates: one GET per connection (`Connection: close`),
//! `http://` or `https://` (TLS 1.3 through rustls, the server's certificate checked against
//! the system's roots and `[pull] ca_file`, [`tls_connector`]), the response head parsed by
//! pure functions ([`parse_url`], [`parse_head`]) and bounded ([`MAX_HEAD`]), the body read as
//! its `Content-Length` says, every step within a timeout. Enough for static files from any
//! web server or CDN; nothing here follows redirects or decodes chunked bodies (a server
//! that sends one is an error that says so).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The system's trust roots, as Debian's ca-certificates writes them.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The TLS client for `https://`: the roots in [`SYSTEM_ROOTS`] (when the file is there) and
/// every certificate in `ca_file` (which must read and hold at least one).
pub fn tls_connector(ca_file: Option<&Path>) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(pem) = std::fs::read(SYSTEM_ROOTS) {
        let certs = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok);
        roots.add_parsable_certificates(certs);
    }
    if let Some(f) = ca_file {
        let pem = keel_sys::durable::read_regular(f, 4 << 20)
            .map_err(|e| format!("[pull] ca_file: {e}"))?
            .ok_or_else(|| format!("[pull] ca_file {}: no such file", f.display()))?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("[pull] ca_file {}: {e}", f.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "[pull] ca_file {}: no PEM certificate in it",
                f.display()
            ));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("[pull] ca_file {}: {e}", f.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A connection, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Largest response head read.
pub const MAX_HEAD: usize = 16 << 10;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not one this client takes.
    #[error("URL {url:?}: {why}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Connecting, sending or reading failed.
    #[error("{url}: {op}: {source}")]
    Io {
        /// The URL.
        url: String,
        /// The step.
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A step took longer than the timeout.
    #[error("{url}: {op}: no answer within {secs} s")]
    Timeout {
        /// The URL.
        url: String,
        /// The step.
        op: &'static str,
        /// The timeout.
        secs: u64,
    },
    /// The server's answer is not HTTP this client reads.
    #[error("{url}: bad response: {why}")]
    Response {
        /// The URL.
        url: String,
        /// What was wrong.
        why: String,
    },
}

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https://`.
    pub tls: bool,
    /// Host name or address (brackets kept for IPv6).
    pub host: String,
    /// Port (80 unless given).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

/// Parses `http[s]://HOST[:PORT][/PATH]`.
pub fn parse_url(url: &str) -> Result<Url, HttpError> {
    let bad = |why| HttpError::Url {
        url: url.to_string(),
        why,
    };
    let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
        (Some(r), _) => (true, r),
        (_, Some(r)) => (false, r),
        _ => return Err(bad("not an http:// or https:// URL")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("no host, or user info (not supported)"));
    }
    if path.chars().any(|c| c.is_ascii_control() || c == ' ') {
        return Err(bad("the path has spaces or control characters"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => {
            (h, p.parse().map_err(|_| bad("the port is not a number"))?)
        }
        _ => (authority, if tls { 443 } else { 80 }),
    };
    Ok(Url {
        tls,
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

/// A response's status line and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The status code.
    pub status: u16,
    /// Header names (lower-case) and values, in order.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `Content-Length`, if present and a number.
    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length")?.parse().ok()
    }

    /// The start offset of a `Content-Range: bytes START-END/TOTAL`.
    pub fn range_start(&self) -> Option<u64> {
        let v = self.header("content-range")?.strip_prefix("bytes ")?;
        v.split('-').next()?.trim().parse().ok()
    }
}

/// Parses a response head from the start of `buf`: `Ok(None)` if more bytes are needed,
/// else the head and how many bytes of `buf` it took.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(format!("response head larger than {MAX_HEAD} bytes"));
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x status line: {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("no status code in {status_line:?}"))?;
    let mut headers = Vec::new();
    for l in lines {
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| format!("header line without a colon: {l:?}"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok(Some((Head { status, headers }, end + 4)))
}

/// A response whose body is still to be read.
pub struct Response {
    /// Status and headers.
    pub head: Head,
    /// Bytes of the body still to come (`Content-Length`).
    pub remaining: u64,
    body_start: Vec<u8>,
    stream: Box<dyn Io>,
    url: String,
    timeout: Duration,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("url", &self.url)
            .field("head", &self.head)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl Response {
    /// Reads the next part of the body into `buf` (0 at its end); each read within the
    /// timeout, a connection closed early an error.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<usize, HttpError> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = if !self.body_start.is_empty() {
            let n = want.min(self.body_start.len());
            buf[..n].copy_from_slice(&self.body_start[..n]);
            self.body_start.drain(..n);
            n
        } else {
            let n = within(
                &self.url,
                "read body",
                self.timeout,
                self.stream.read(&mut buf[..want]),
            )
            .await?;
            if n == 0 {
                return Err(HttpError::Response {
                    url: self.url.clone(),
                    why: format!(
                        "connection closed with {} bytes of the body to come",
                        self.remaining
                    ),
                });
            }
            n
        };
        self.remaining -= n as u64;
        Ok(n)
    }

    /// The whole body, if it is at most `max` bytes.
    pub async fn body(mut self, max: usize) -> Result<Vec<u8>, HttpError> {
        if self.remaining > max as u64 {
            return Err(HttpError::Response {
                url: self.url.clone(),
                why: format!("body of {} bytes, more than {max}", self.remaining),
            });
        }
        let mut v = vec![0u8; usize::try_from(self.remaining).unwrap_or(0)];
        let mut at = 0;
        while at < v.len() {
            at += self.read(&mut v[at..]).await?;
        }
        Ok(v)
    }
}

async fn within<T>(
    url: &str,
    op: &'static str,
    t: Duration,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, HttpError> {
    match tokio::time::timeout(t, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(HttpError::Io {
            url: url.to_string(),
            op,
            source,
        }),
        Err(_) => Err(HttpError::Timeout {
            url: url.to_string(),
            op,
            secs: t.as_secs(),
        }),
    }
}

/// Sends `GET url` with `headers` and reads the response head; the body is the caller's
/// to read. `https://` needs `tls`. Every step (connect, handshake, send, head) within
/// `timeout`.
pub async fn get(
    url: &str,
    headers: &[(&str, String)],
    timeout: Duration,
    tls: Option<&TlsConnector>,
) -> Result<Response, HttpError> {
    let u = parse_url(url)?;
    let bare = u.host.trim_matches(['[', ']']).to_string();
    let tcp = within(
        url,
        "connect",
        timeout,
        TcpStream::connect((bare.as_str(), u.port)),
    )
    .await?;
    let _ = tcp.set_nodelay(true);
    let mut s: Box<dyn Io> = if u.tls {
        let tls = tls.ok_or_else(|| HttpError::Url {
            url: url.to_string(),
            why: "https without a TLS client",
        })?;
        let name = ServerName::try_from(bare).map_err(|_| HttpError::Url {
            url: url.to_string(),
            why: "the host is not a valid DNS name or IP address",
        })?;
        Box::new(within(url, "TLS handshake", timeout, tls.connect(name, tcp)).await?)
    } else {
        Box::new(tcp)
    };
    let default_port = if u.tls { 443 } else { 80 };
    let host = if u.port == default_port {
        u.host.clone()
    } else {
        format!("{}:{}", u.host, u.port)
    };
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: keel-agent/{}\r\nAccept-Encoding: identity\r\nConnection: close\r\n",
        u.path,
        env!("CARGO_PKG_VERSION")
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    within(url, "send request", timeout, s.write_all(req.as_bytes())).await?;
    let (head, rest) = within(url, "read response head", timeout, read_head(&mut s))
        .await?
        .map_err(|why| HttpError::Response {
            url: url.to_string(),
            why,
        })?;
    let bodiless = head.status == 304 || head.status == 204 || (100..200).contains(&head.status);
    let remaining = if bodiless {
        0
    } else if head
        .header("transfer-encoding")
        .is_some_and(|t| !t.eq_ignore_ascii_case("identity"))
    {
        return Err(HttpError::Response {
            url: url.to_string(),
            why: "chunked transfer encoding is not supported: serve the channel as static files"
                .into(),
        });
    } else {
        head.content_length().ok_or_else(|| HttpError::Response {
            url: url.to_string(),
            why: format!("status {} without a Content-Length", head.status),
        })?
    };
    Ok(Response {
        head,
        remaining,
        body_start: rest,
        stream: s,
        url: url.to_string(),
        timeout,
    })
}

/// Reads until a whole head has arrived; returns it and the body bytes read past it.
async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Result<(Head, Vec<u8>), String>> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        match parse_head(&buf) {
            Err(e) => return Ok(Err(e)),
            Ok(Some((head, used))) => return Ok(Ok((head, buf[used..].to_vec()))),
            Ok(None) => {}
        }
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err(format!(
                "connection closed after {} bytes, before the end of the head",
                buf.len()
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("http://127.0.0.1:8080/ch/manifest.json").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8080, "/ch/manifest.json")
        );
        let u = parse_url("http://updates.example").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        let u = parse_url("http://[::1]:81/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("[::1]", 81));
        for bad in [
            "ftp://h/",
            "http://",
            "http://u@h/",
            "http://h:x/",
            "http://h/a b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        let u = parse_url("https://cdn.example/c").unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str()), (true, 443, "/c"));
    }

    #[test]
    fn heads() {
        let raw = b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\nContent-Range: bytes 90-99/100\r\nETag: \"ab\"\r\n\r\nBODY";
        let (h, used) = parse_head(raw).unwrap().unwrap();
        assert_eq!(h.status, 206);
        assert_eq!(&raw[used..], b"BODY");
        assert_eq!(h.content_length(), Some(10));
        assert_eq!(h.range_start(), Some(90));
        assert_eq!(h.header("etag"), Some("\"ab\""));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nA: b\r\n").unwrap(), None);
        assert!(parse_head(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n").is_err());
        assert!(parse_head(&vec![b'a'; MAX_HEAD + 1]).is_err());
    }
}
