//! A small HTTP/1.1 client for pulling updates: one GET per connection (`Connection: close`),
//! `http://` or `https://` (TLS 1.3 through rustls; whom it trusts and the device identity it
//! shows in [`trust`]), the response head parsed by pure functions ([`parse_url`],
//! [`parse_head`]) and bounded ([`MAX_HEAD`]), the body read as its `Content-Length` says,
//! every step within a timeout. [`Client::get`] follows up to [`MAX_REDIRECTS`] redirects
//! ([`resolve_location`]: never from https down to http) and signs requests to the
//! channel's own origin for a private S3 bucket ([`crate::sigv4`]; never to another host a
//! redirect leads to). Enough for static files from any web server, CDN or object store;
//! chunked bodies are not decoded (a server that sends one is an error that says so).
//!
//! | module | what |
//! |---|---|
//! | [`url`] | URLs and where a `Location` leads |
//! | [`head`] | the status line and headers |
//! | [`trust`] | the TLS client: roots, `ca_file`, client certificate |

pub mod head;
pub mod trust;
pub mod url;

use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub use head::{parse_head, Head, MAX_HEAD};
pub use trust::{tls_connector, ClientIdentity, SYSTEM_ROOTS};
pub use url::{parse_url, resolve_location, Url};

use crate::sigv4::{self, Credentials};

/// Redirects followed for one request.
pub const MAX_REDIRECTS: usize = 5;

/// A connection, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

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
    /// A chain of redirects longer than [`MAX_REDIRECTS`].
    #[error("{url}: more than {MAX_REDIRECTS} redirects (a redirect loop?)")]
    Redirects {
        /// The URL first asked for.
        url: String,
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
    /// Where the answer came from (after redirects).
    pub fn url(&self) -> &str {
        &self.url
    }

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

/// What every request of one channel shares: the TLS client, the timeout, and the
/// credentials of a private bucket with the origin they belong to.
#[derive(Clone)]
pub struct Client {
    tls: TlsConnector,
    timeout: Duration,
    s3: Option<(Url, Credentials)>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("timeout", &self.timeout)
            .field("s3", &self.s3)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client whose every step takes at most `timeout`; with `s3`, requests to
    /// `s3.0`'s origin are signed with `s3.1`.
    pub fn new(tls: TlsConnector, timeout: Duration, s3: Option<(Url, Credentials)>) -> Client {
        Client { tls, timeout, s3 }
    }

    /// `GET url` with `headers`, following redirects (301, 302, 303, 307, 308) up to
    /// [`MAX_REDIRECTS`] with the same headers; the body is the caller's to read.
    pub async fn get(&self, url: &str, headers: &[(&str, String)]) -> Result<Response, HttpError> {
        let mut u = parse_url(url)?;
        for _ in 0..=MAX_REDIRECTS {
            let mut all: Vec<(&str, String)> = headers.to_vec();
            if let Some((origin, creds)) = &self.s3 {
                if origin.same_origin(&u) {
                    let unix = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    all.extend(sigv4::sign_get(
                        creds,
                        &u.host_header(),
                        &u.path,
                        headers,
                        unix,
                    ));
                }
            }
            let resp = get_once(&u, &all, self.timeout, &self.tls).await?;
            let location = match resp.head.status {
                301 | 302 | 303 | 307 | 308 => resp.head.header("location"),
                _ => None,
            };
            let Some(location) = location else {
                return Ok(resp);
            };
            let next = resolve_location(&u, location)?;
            tracing::info!(from = %u, to = %next, status = resp.head.status, "pull: redirected");
            u = next;
        }
        Err(HttpError::Redirects {
            url: url.to_string(),
        })
    }
}

/// Sends one `GET` of `u` with `headers` and reads the response head. Every step (connect,
/// handshake, send, head) within `timeout`.
async fn get_once(
    u: &Url,
    headers: &[(&str, String)],
    timeout: Duration,
    tls: &TlsConnector,
) -> Result<Response, HttpError> {
    let url = u.to_string();
    let url = url.as_str();
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
        let name = ServerName::try_from(bare).map_err(|_| HttpError::Url {
            url: url.to_string(),
            why: "the host is not a valid DNS name or IP address",
        })?;
        Box::new(within(url, "TLS handshake", timeout, tls.connect(name, tcp)).await?)
    } else {
        Box::new(tcp)
    };
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: keel-agent/{}\r\nAccept-Encoding: identity\r\nConnection: close\r\n",
        u.path,
        u.host_header(),
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
    let redirect = (300..400).contains(&head.status) && head.header("location").is_some();
    let bodiless =
        head.status == 304 || head.status == 204 || (100..200).contains(&head.status) || redirect;
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
