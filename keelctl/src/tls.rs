//! TLS 1.3 to an agent on TCP. The agent shows its identity as an RFC 7250 raw public key
//! (ed25519); the client accepts it only as [`crate::known`] judges (pinned, or remembered
//! on first use). A session's channel binding is exported from the TLS keys, so the `auth`
//! signature made inside it is good for this session only.
//!
//! [`TlsStream`] is a blocking stream that can be cloned for a second thread (exec's stdin
//! and signal writers beside its output reader): the handles share one rustls connection
//! behind a lock that is never held across a blocking socket read, and writes are ordered
//! by a second lock (taken first), so a reader waiting for data never stalls a writer.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keel_proto::exec::{fingerprint, TLS_BINDING_LABEL, TLS_BINDING_LEN};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature_with_raw_key, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

use crate::error::{Error, Result};
use crate::known::{self, Trust, Verdict};

/// The DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410); the key's 32 bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The ed25519 key in an SPKI, if that is what it is.
fn ed25519_key(spki: &[u8]) -> Option<[u8; 32]> {
    let rest = spki.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    rest.try_into().ok()
}

/// Checks the agent's raw public key as [`known::judge`] decides, and its handshake
/// signature with it. What it saw and why it refused are kept for the error message.
#[derive(Debug)]
struct Verifier {
    trust: Trust,
    known: Vec<known::Known>,
    endpoint: String,
    provider: Arc<CryptoProvider>,
    seen: Mutex<Option<([u8; 32], Verdict)>>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let key = ed25519_key(end_entity.as_ref()).ok_or_else(|| {
            rustls::Error::General("the agent's raw public key is not ed25519".into())
        })?;
        let verdict = known::judge(&self.trust, &self.known, &self.endpoint, &key);
        let ok = !matches!(verdict, Verdict::Refuse(_));
        *lock(&self.seen) = Some((key, verdict));
        if ok {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("agent key refused".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not spoken".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(cert.as_ref()),
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The shared half of a [`TlsStream`].
#[derive(Debug)]
struct Shared {
    conn: Mutex<ClientConnection>,
    /// The socket's write side; its lock orders records onto the wire.
    out: Mutex<TcpStream>,
}

impl Shared {
    /// Encrypts what rustls has queued and writes it; `out` is taken before `conn`.
    fn flush_queued(&self, out: &mut TcpStream) -> io::Result<()> {
        let mut records = Vec::new();
        {
            let mut c = lock(&self.conn);
            while c.wants_write() {
                c.write_tls(&mut records)?;
            }
        }
        out.write_all(&records)
    }
}

/// A blocking TLS session to an agent (see the module's note on threads).
#[derive(Debug)]
pub struct TlsStream {
    shared: Arc<Shared>,
    /// This handle's read side of the socket.
    sock: TcpStream,
    /// TLS bytes read from the socket: `raw[raw_at..raw_end]` not yet given to rustls.
    raw: Vec<u8>,
    raw_at: usize,
    raw_end: usize,
    /// The channel binding for `auth`.
    binding: Vec<u8>,
}

impl TlsStream {
    /// Runs the handshake with the agent at `endpoint` over `sock`, judging its key by
    /// `trust`. On first use under [`Trust::Remembered`] the key is appended to the file and
    /// said on stderr, as ssh does.
    pub fn connect(sock: TcpStream, endpoint: &str, trust: &Trust) -> Result<TlsStream> {
        let fail = |detail: String| Error::Tls {
            endpoint: endpoint.to_string(),
            detail,
        };
        let known = match trust {
            Trust::Remembered(p) => known::load(p)?,
            Trust::Pinned(_) => Vec::new(),
            Trust::NoFile => return Err(fail(known::NO_FILE.into())),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(Verifier {
            trust: trust.clone(),
            known,
            endpoint: endpoint.to_string(),
            provider: provider.clone(),
            seen: Mutex::new(None),
        });
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| fail(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        let host = endpoint
            .strip_prefix("tcp://")
            .and_then(|a| a.rsplit_once(':'))
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or("keel-agent");
        let name = ServerName::try_from(host.to_string())
            .unwrap_or_else(|_| ServerName::try_from("keel-agent").expect("a valid name"));
        let mut conn =
            ClientConnection::new(Arc::new(config), name).map_err(|e| fail(e.to_string()))?;
        let mut s = sock;
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut s) {
                return Err(match lock(&verifier.seen).take() {
                    Some((_, Verdict::Refuse(why))) => Error::AgentKey {
                        endpoint: endpoint.to_string(),
                        detail: why,
                    },
                    _ => fail(format!("handshake: {e}")),
                });
            }
        }
        if let (Some((key, Verdict::FirstUse)), Trust::Remembered(path)) =
            (lock(&verifier.seen).take(), trust)
        {
            known::remember(path, endpoint, &key)?;
            eprintln!(
                "keelctl: {endpoint}: first contact, agent key {} remembered in {}",
                fingerprint(&key),
                path.display()
            );
        }
        let binding = conn
            .export_keying_material(vec![0u8; TLS_BINDING_LEN], TLS_BINDING_LABEL, None)
            .map_err(|e| fail(format!("channel binding: {e}")))?;
        let out = s.try_clone().map_err(|e| fail(e.to_string()))?;
        Ok(TlsStream {
            shared: Arc::new(Shared {
                conn: Mutex::new(conn),
                out: Mutex::new(out),
            }),
            sock: s,
            raw: vec![0u8; 32 << 10],
            raw_at: 0,
            raw_end: 0,
            binding,
        })
    }

    /// The channel binding an `auth` signature covers.
    pub fn binding(&self) -> &[u8] {
        &self.binding
    }

    /// A second handle on the same session, for a writer thread (one handle reads).
    pub fn try_clone(&self) -> io::Result<TlsStream> {
        Ok(TlsStream {
            shared: self.shared.clone(),
            sock: self.sock.try_clone()?,
            raw: vec![0u8; 32 << 10],
            raw_at: 0,
            raw_end: 0,
            binding: self.binding.clone(),
        })
    }

    /// Sets the socket's read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)
    }

    /// Sets the socket's read and write timeouts.
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)?;
        self.sock.set_write_timeout(t)
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let wants_write = {
                let mut c = lock(&self.shared.conn);
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.raw_at == self.raw_end {
                    None
                } else {
                    let n = c.read_tls(&mut &self.raw[self.raw_at..self.raw_end])?;
                    self.raw_at += n;
                    c.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    Some(c.wants_write())
                }
            };
            match wants_write {
                // A key update (or an alert) to answer.
                Some(true) => self.shared.flush_queued(&mut lock(&self.shared.out))?,
                Some(false) => {}
                None => {
                    let n = self.sock.read(&mut self.raw)?;
                    self.raw_at = 0;
                    self.raw_end = n;
                    if n == 0 {
                        // The peer closed: rustls tells a clean close_notify from a cut.
                        let mut c = lock(&self.shared.conn);
                        c.read_tls(&mut &[][..])?;
                        c.process_new_packets()
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        return c.reader().read(buf);
                    }
                }
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let mut out = lock(&self.shared.out);
        let n = lock(&self.shared.conn).writer().write(b)?;
        self.shared.flush_queued(&mut out)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_ed25519_spki_gives_a_key() {
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&[7; 32]);
        assert_eq!(ed25519_key(&spki), Some([7; 32]));
        assert_eq!(ed25519_key(&spki[..43]), None);
        spki[9] = 0x71; // another algorithm
        assert_eq!(ed25519_key(&spki), None);
    }
}
