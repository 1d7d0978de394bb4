//! The control plane as a whole: the [`Hub`] on the link, and the control API served over mTLS
//! as gRPC and gRPC-Web (HTTP/1.1 accepted) on one TCP port.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::freeze::FreezeRule;
use crate::hub::{Hub, HubOptions};
use crate::proto::control_server::ControlServer;
use crate::service::ControlService;
use crate::tls::{allowed_name, ServerTls, TlsError};

/// A client gets this long to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What `pnp control` runs.
#[derive(Clone, Debug)]
pub struct ControlOptions {
    /// The link directory (the two rings shared with the data plane).
    pub link_dir: PathBuf,
    /// Where the control API listens.
    pub listen: SocketAddr,
    /// The API's TLS: server certificate, client CA, allowed client names.
    pub tls: ServerTls,
    /// The freeze rule; `None` turns the loop off.
    pub freeze: Option<FreezeRule>,
    /// Where freeze snapshots are written.
    pub snapshot_dir: Option<PathBuf>,
    /// How long a command waits for the data plane's acknowledgement.
    pub ack_timeout: Duration,
    /// Origins (`https://console.example.com`) whose pages may call the API from a browser
    /// (gRPC-Web with CORS, credentials allowed: the browser presents the client certificate).
    /// Empty: no CORS headers, so only a page served from the API's own origin can read
    /// replies.
    pub cors_origins: Vec<String>,
}

impl ControlOptions {
    /// Options with the default freeze rule, no snapshot directory and a 5 s ack timeout.
    pub fn new(link_dir: impl Into<PathBuf>, listen: SocketAddr, tls: ServerTls) -> ControlOptions {
        ControlOptions {
            link_dir: link_dir.into(),
            listen,
            tls,
            freeze: Some(FreezeRule::default()),
            snapshot_dir: None,
            ack_timeout: Duration::from_secs(5),
            cors_origins: Vec::new(),
        }
    }
}

/// Response headers a browser console must be able to read.
const EXPOSED: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

/// CORS for `origins` (none: no layer), as the grpc-web browser-features doc asks: preflight
/// answered, POST allowed, the requested headers echoed, the gRPC status headers exposed;
/// credentials allowed, since the browser's client certificate is what lets a call in.
fn cors_layer(origins: &[String]) -> Result<Option<CorsLayer>, StartError> {
    if origins.is_empty() {
        return Ok(None);
    }
    let origins = origins
        .iter()
        .map(|origin| {
            let trimmed = origin.trim_end_matches('/');
            let valid = (trimmed.starts_with("https://") || trimmed.starts_with("http://"))
                && !trimmed.contains('*');
            valid
                .then(|| HeaderValue::from_str(trimmed).ok())
                .flatten()
                .ok_or_else(|| StartError::CorsOrigin(origin.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::POST, Method::OPTIONS])
            .allow_headers(AllowHeaders::mirror_request())
            .allow_credentials(true)
            .expose_headers(EXPOSED.map(HeaderName::from_static))
            .max_age(Duration::from_secs(600)),
    ))
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A CORS origin that is not `scheme://host[:port]`.
    #[error("CORS origin `{0}`: expected an origin such as https://console.example.com")]
    CorsOrigin(String),
    /// The TLS material.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The link directory.
    #[error("opening the link: {0}")]
    Link(#[from] pnp_link::LinkError),
    /// The listening socket.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
}

/// Who is calling, as the request extensions carry it (`request.extensions().get::<PeerInfo>()`).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The client's address.
    pub remote: SocketAddr,
    /// The allow-listed name its certificate is valid for (`None` when there is no allow-list).
    pub client_name: Option<String>,
}

/// A client connection after its TLS handshake.
#[derive(Debug)]
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    local_addr: SocketAddr,
    hub: Hub,
    rejected: Arc<Rejections>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    acceptor: JoinHandle<()>,
}

impl ControlPlane {
    /// Opens the link, binds the listener and starts serving.
    pub async fn start(options: ControlOptions) -> Result<ControlPlane, StartError> {
        let cors = cors_layer(&options.cors_origins)?;
        let tls = Arc::new(options.tls.server_config()?);
        let listener =
            TcpListener::bind(options.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: options.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: options.listen,
            source,
        })?;
        let hub = Hub::start(HubOptions {
            link_dir: options.link_dir.clone(),
            freeze: options.freeze,
            snapshot_dir: options.snapshot_dir.clone(),
            ack_timeout: options.ack_timeout,
            ..HubOptions::new(&options.link_dir)
        })?;
        let (stop, stopped) = watch::channel(false);
        let (connections, incoming) = mpsc::channel::<io::Result<TlsConnection>>(64);
        let rejected = Arc::new(Rejections::default());
        let acceptor = tokio::spawn(accept(
            listener,
            TlsAcceptor::from(tls),
            options.tls.allowed_clients.clone(),
            connections,
            rejected.clone(),
            stopped.clone(),
        ));
        let service = ControlServer::new(ControlService::new(hub.clone()));
        let mut shutdown = stopped;
        let server = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .accept_http1(true)
                // CORS outside gRPC-Web, so a preflight is answered before it.
                .layer(tower::util::option_layer(cors))
                .layer(tonic_web::GrpcWebLayer::new())
                .add_service(service)
                .serve_with_incoming_shutdown(ReceiverStream::new(incoming), async move {
                    let _ = shutdown.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(error) = result {
                tracing::error!(%error, "control API server failed");
            }
        });
        tracing::info!(addr = %local_addr, link = %options.link_dir.display(), "control plane serving");
        Ok(ControlPlane {
            local_addr,
            hub,
            rejected,
            stop,
            server,
            acceptor,
        })
    }

    /// The address the API listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The hub (job table, events, commands), for in-process use.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// TLS handshakes refused so far (no, untrusted, expired or not allowed client
    /// certificates, and anything else that failed the handshake).
    pub fn rejected_handshakes(&self) -> u64 {
        self.rejected.count.load(Ordering::Relaxed)
    }

    /// Why the last refused handshake was refused (rustls' error), if any was.
    pub fn last_rejection(&self) -> Option<String> {
        self.rejected
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops serving (streams in progress end) and stops the hub.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.acceptor.abort();
        // WatchEvents streams never end by themselves: give the server a moment, then stop it.
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(2), &mut server)
            .await
            .is_err()
        {
            tracing::debug!("control API server stopped with streams open");
            server.abort();
        }
        let hub = self.hub.clone();
        let _ = tokio::task::spawn_blocking(move || hub.shutdown()).await;
    }
}

/// Refused handshakes: how many, and the last reason.
#[derive(Debug, Default)]
struct Rejections {
    count: AtomicU64,
    last: Mutex<Option<String>>,
}

impl Rejections {
    fn record(&self, reason: String) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    allowed: Vec<String>,
    connections: mpsc::Sender<io::Result<TlsConnection>>,
    rejected: Arc<Rejections>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a control API connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // Stopping is the only change ever sent.
            _ = stopped.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let connections = connections.clone();
        let rejected = rejected.clone();
        let allowed = allowed.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let client_name = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(|cert| allowed_name(cert, &allowed));
                    let peer = PeerInfo {
                        remote,
                        client_name,
                    };
                    tracing::debug!(?peer, "control API client connected");
                    let _ = connections.send(Ok(TlsConnection { stream, peer })).await;
                }
                Ok(Err(error)) => {
                    tracing::warn!(%remote, %error, "control API TLS handshake refused");
                    rejected.record(format!("{error:?}"));
                }
                Err(_) => {
                    tracing::warn!(%remote, "control API TLS handshake timed out");
                    rejected.record("handshake timed out".into());
                }
            }
        });
    }
}
