//! Reaching an upstream over TCP (and TLS): what the TCP-based transports share.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use pnp_call::{Code, Status};
use tower::Service as _;

use crate::{Blame, TransportError};

/// Where an upstream is: scheme (`http` or `https`) and `host:port`.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
}

/// The protocol to offer in TLS ALPN.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Alpn {
    /// `h2`.
    H2,
    /// `http/1.1`.
    Http1,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl Endpoint {
    /// The endpoint of `url`, over TLS when `tls`.
    pub(crate) fn new(url: &url::Url, tls: bool) -> io::Result<Endpoint> {
        let host = url
            .host_str()
            .ok_or_else(|| invalid(format!("upstream `{url}` has no host")))?;
        let port = url.port().unwrap_or(if tls { 443 } else { 80 });
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let authority: Authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
        .parse()
        .map_err(|e| invalid(format!("upstream authority: {e}")))?;
        Ok(Endpoint {
            scheme: if tls { Scheme::HTTPS } else { Scheme::HTTP },
            authority,
        })
    }

    /// A URI on this endpoint.
    pub(crate) fn uri(&self, path: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
    }
}

/// The roots to check upstream certificates against: the system's (for TLS) and `extra_pem`.
pub(crate) fn roots(tls: bool, extra_pem: Option<&[u8]>) -> io::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    if tls {
        for cert in rustls_native_certs::load_native_certs().certs {
            // A broken system certificate must not stop pnp from starting.
            let _ = roots.add(cert);
        }
    }
    if let Some(mut pem) = extra_pem {
        for cert in rustls_pemfile::certs(&mut pem) {
            let cert = cert.map_err(|e| invalid(format!("upstream CA: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| invalid(format!("upstream CA: {e}")))?;
        }
    }
    Ok(roots)
}

/// A connector for `http://` and `https://` (rustls on ring, `alpn` offered), TCP_NODELAY.
pub(crate) fn connector(
    extra_roots_pem: Option<&[u8]>,
    tls: bool,
    connect_timeout: Duration,
    alpn: Alpn,
) -> io::Result<HttpsConnector<HttpConnector>> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let tls_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid(format!("TLS: {e}")))?
    .with_root_certificates(roots(tls, extra_roots_pem)?)
    .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config)
        .https_or_http();
    Ok(match alpn {
        Alpn::H2 => builder.enable_http2().wrap_connector(http),
        Alpn::Http1 => builder.enable_http1().wrap_connector(http),
    })
}

/// The connected stream a connector yields.
pub(crate) type Io = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

/// A failure to reach the upstream: nothing was sent, so any call may go elsewhere.
pub(crate) fn unreachable(what: String) -> TransportError {
    TransportError {
        status: Box::new(Status::new(Code::Unavailable, what)),
        blame: Blame::Upstream,
        unprocessed: true,
    }
}

/// Open a TCP (and TLS) connection to `endpoint` within `timeout`.
pub(crate) async fn open(
    connector: &HttpsConnector<HttpConnector>,
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<Io, TransportError> {
    let uri = endpoint
        .uri("/")
        .map_err(|e| unreachable(format!("upstream address: {e}")))?;
    let mut connector = connector.clone();
    tokio::time::timeout(timeout, connector.call(uri))
        .await
        .map_err(|_| {
            unreachable(format!(
                "upstream connect to {} timed out after {} ms",
                endpoint.authority,
                timeout.as_millis()
            ))
        })?
        .map_err(|e| {
            unreachable(format!(
                "upstream connect to {} failed: {}",
                endpoint.authority,
                crate::error::chain(&*e)
            ))
        })
}
