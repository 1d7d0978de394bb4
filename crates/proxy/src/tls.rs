//! TLS for the data-plane listeners: ALPN `h2` then `http/1.1` on TCP; TLS 1.3 only with
//! ALPN `h3` and no early data on QUIC.

use std::io;
use std::sync::Arc;

use pnp_config::TlsFiles;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The listener's certificate chain and key, read from their PEM files.
fn load(files: &TlsFiles) -> io::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let cert_pem = std::fs::read(&files.cert)?;
    let key_pem = std::fs::read(&files.key)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice()).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no certificate in {}", files.cert.display()),
        ));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no private key in {}", files.key.display()),
        )
    })?;
    Ok((certs, key))
}

pub(crate) fn acceptor(files: &TlsFiles) -> io::Result<TlsAcceptor> {
    let (certs, key) = load(files)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The QUIC listener's TLS: TLS 1.3 (QUIC has no other), ALPN `h3`, 0-RTT off (early data
/// could be replayed, and a replayed gRPC call is not safe to run twice).
pub(crate) fn quic_server(files: &TlsFiles) -> io::Result<quinn::crypto::rustls::QuicServerConfig> {
    let (certs, key) = load(files)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    config.alpn_protocols = vec![b"h3".to_vec()];
    config.max_early_data_size = 0;
    quinn::crypto::rustls::QuicServerConfig::try_from(config)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}
