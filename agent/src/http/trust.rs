//! The TLS client configuration for `https://` channels: whom the agent trusts (the system's
//! roots and `[pull] ca_file`) and, for servers that check devices (mTLS), the identity it
//! shows (`[pull] client_cert` / `client_key`). TLS 1.3 only, `ring` as the provider. Every
//! file is read as a regular file, size-capped, and an unusable one is an error naming it.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsConnector;

/// The system's trust roots, as Debian's ca-certificates writes them.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Largest PEM file read.
const MAX_PEM: u64 = 4 << 20;

/// A device identity for servers that ask for a client certificate.
#[derive(Debug, Clone, Copy)]
pub struct ClientIdentity<'a> {
    /// PEM certificate chain, the device's own certificate first.
    pub cert: &'a Path,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of that certificate.
    pub key: &'a Path,
}

fn read_pem(what: &str, f: &Path) -> Result<Vec<u8>, String> {
    keel_sys::durable::read_regular(f, MAX_PEM)
        .map_err(|e| format!("[pull] {what}: {e}"))?
        .ok_or_else(|| format!("[pull] {what} {}: no such file", f.display()))
}

fn certs(what: &str, f: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(what, f)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("[pull] {what} {}: {e}", f.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "[pull] {what} {}: no PEM certificate in it",
            f.display()
        ));
    }
    Ok(certs)
}

/// The TLS client for `https://`: the roots in [`SYSTEM_ROOTS`] (when the file is there) and
/// every certificate in `ca_file` (which must read and hold at least one); with `identity`,
/// that certificate and key for servers that ask (the key must match the certificate).
pub fn tls_connector(
    ca_file: Option<&Path>,
    identity: Option<ClientIdentity<'_>>,
) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(pem) = std::fs::read(SYSTEM_ROOTS) {
        let certs = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok);
        roots.add_parsable_certificates(certs);
    }
    if let Some(f) = ca_file {
        for c in certs("ca_file", f)? {
            roots
                .add(c)
                .map_err(|e| format!("[pull] ca_file {}: {e}", f.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let chain = certs("client_cert", id.cert)?;
            let pem = read_pem("client_key", id.key)?;
            let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                format!(
                    "[pull] client_key {}: no PEM private key in it ({e})",
                    id.key.display()
                )
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                format!(
                    "[pull] client_cert {} with client_key {}: {e}",
                    id.cert.display(),
                    id.key.display()
                )
            })?
        }
    };
    Ok(TlsConnector::from(Arc::new(config)))
}
