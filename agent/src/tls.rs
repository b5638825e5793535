//! TLS 1.3 on the TCP listener: the agent proves itself with its [`Identity`] as an RFC 7250
//! raw public key (no certificate, no CA: the client pins the key or remembers it on first
//! use). Client keys are not asked for here: a session authenticates inside the channel with
//! `auth` ([`crate::auth`]), as it does on the other transports.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::AlwaysResolvesServerRawPublicKeys;
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::error::Error;
use crate::identity::Identity;

/// The acceptor for TCP connections, serving `id`.
pub fn acceptor(id: &Identity) -> Result<TlsAcceptor, Error> {
    let bad = |detail: String| Error::Identity {
        path: id.path.clone(),
        detail,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let der = PrivateKeyDer::from_pem_slice(id.pem.as_bytes())
        .map_err(|e| bad(format!("private key: {e}")))?;
    let key = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| bad(format!("private key: {e}")))?;
    let spki = key
        .public_key()
        .ok_or_else(|| bad("no public key for the TLS identity".into()))?
        .to_vec();
    let certified = Arc::new(CertifiedKey::new(vec![CertificateDer::from(spki)], key));
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad(format!("TLS 1.3: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(AlwaysResolvesServerRawPublicKeys::new(certified)));
    Ok(TlsAcceptor::from(Arc::new(config)))
}
