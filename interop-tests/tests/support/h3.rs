//! An HTTP/3 bridge's parts for the tests: a development CA with a server certificate for
//! localhost (what `pnp certs dev` writes), a cluster pnp with an HTTP/3 listener and an edge
//! pnp whose upstream is that listener.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;

use pnp_config::{Config, H3Listener, TlsFiles};
use pnp_interop_tests::Stack;
use pnp_proxy::Proxy;

use super::TempDir;

/// A development CA and a server certificate for localhost signed by it.
pub struct Certs {
    _dir: TempDir,
    /// The CA certificate (PEM file).
    pub ca: std::path::PathBuf,
    /// The server certificate and key.
    pub files: TlsFiles,
    /// The server key's SubjectPublicKeyInfo (DER), for Chromium's SPKI allow-list.
    pub server_spki: Vec<u8>,
}

pub fn dev_certs() -> Certs {
    dev_certs_for(&[])
}

/// [`dev_certs`] whose server certificate also names `ips`.
pub fn dev_certs_for(ips: &[std::net::IpAddr]) -> Certs {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        SanType,
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "pnp test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    let key = KeyPair::generate().expect("server key");
    let mut server = CertificateParams::new(Vec::<String>::new()).expect("params");
    server.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into().expect("name")),
        SanType::IpAddress([127, 0, 0, 1].into()),
    ];
    server
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = server
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("server cert");
    let dir = TempDir::new("h3-certs");
    let ca = dir.write("ca.pem", ca_cert.pem().as_bytes());
    let files = TlsFiles {
        cert: dir.write("server.pem", cert.pem().as_bytes()),
        key: dir.write("server-key.pem", key.serialize_pem().as_bytes()),
    };
    Certs {
        _dir: dir,
        ca,
        files,
        server_spki: key.public_key_der(),
    }
}

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A cluster pnp with an HTTP/3 listener in front of `upstream`.
pub async fn cluster(
    upstream: url::Url,
    certs: &Certs,
    configure: impl FnOnce(&mut Config),
) -> Proxy {
    let files = certs.files.clone();
    Stack::proxy_for(upstream, move |config| {
        config.listener.tls = Some(files);
        config.listener.h3 = Some(H3Listener::new(loopback()));
        configure(config);
    })
    .await
}

/// An edge pnp whose upstream is `h3://localhost:PORT`, trusting the test CA.
pub async fn edge(h3_port: u16, certs: &Certs, configure: impl FnOnce(&mut Config)) -> Proxy {
    let url = url::Url::parse(&format!("h3://localhost:{h3_port}")).expect("h3 URL");
    let ca = certs.ca.clone();
    Stack::proxy_for(url, move |config| {
        config.upstream.ca = Some(ca);
        configure(config);
    })
    .await
}

/// An HTTP/3 client of the cluster's listener: quinn + h3, trusting the test CA.
pub async fn h3_client(
    addr: SocketAddr,
    ca: &std::path::Path,
) -> (
    quinn::Endpoint,
    h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
) {
    h3_connect(addr, ca).await.expect("an HTTP/3 connection")
}

/// [`h3_client`], or why the connection could not be made.
pub async fn h3_connect(
    addr: SocketAddr,
    ca: &std::path::Path,
) -> Result<
    (
        quinn::Endpoint,
        h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    ),
    String,
> {
    h3_connect_with(addr, ca, quinn::TransportConfig::default()).await
}

/// [`h3_connect`] with the client's own QUIC settings (its receive windows, its idle timeout).
pub async fn h3_connect_with(
    addr: SocketAddr,
    ca: &std::path::Path,
    transport: quinn::TransportConfig,
) -> Result<
    (
        quinn::Endpoint,
        h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    ),
    String,
> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).expect("CA");
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.expect("cert")).expect("root");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    let mut endpoint = quinn::Endpoint::client(loopback()).expect("client endpoint");
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(client);
    let conn = endpoint
        .connect(addr, "localhost")
        .map_err(|e| format!("connect: {e}"))?
        .await
        .map_err(|e| format!("QUIC handshake: {e}"))?;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
        .await
        .map_err(|e| format!("HTTP/3 setup: {e}"))?;
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    Ok((endpoint, send))
}
