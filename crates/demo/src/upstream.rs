//! Both demo services on one tonic server (HTTP/2 over cleartext TCP).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::Server;

use crate::generator::GeneratorImpl;
use crate::pb::llm::generator_server::GeneratorServer;
use crate::stats::DemoStats;
use crate::test_service::TestServiceImpl;

/// How long [`DemoUpstream::shutdown`] lets in-flight calls finish before cutting them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `grpc.testing.TestService` and `demo.llm.v1.Generator` served on one port.
///
/// Dropping it stops the server at once: the listener closes and every open connection is
/// cut, so in-flight calls fail the way they do when a real upstream dies (tonic's own
/// server would keep serving accepted connections after its accept loop stops).
#[derive(Debug)]
pub struct DemoUpstream {
    local_addr: SocketAddr,
    stats: DemoStats,
    stop_accepting: Option<oneshot::Sender<()>>,
    cut_connections: CancellationToken,
    server: Option<JoinHandle<()>>,
}

impl DemoUpstream {
    /// Binds `addr` (use `127.0.0.1:0` in tests) and serves both services until dropped or
    /// shut down.
    pub async fn start(addr: SocketAddr) -> io::Result<DemoUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let stats = DemoStats::default();
        let cut_connections = CancellationToken::new();

        let token = cut_connections.clone();
        let incoming = TcpListenerStream::new(listener).map(move |accepted| {
            accepted.map(|stream| {
                // Tokens are small writes that must not wait for Nagle.
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%error, "demo upstream could not set TCP_NODELAY");
                }
                KillableIo::new(stream, &token)
            })
        });
        let router = Server::builder()
            .add_service(TestServiceImpl::new(stats.clone()).into_service())
            .add_service(GeneratorServer::new(GeneratorImpl::new(stats.clone())));

        let (stop_accepting, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let signal = async {
                // A dropped sender means the same as an explicit stop.
                let _ = stopped.await;
            };
            if let Err(error) = router.serve_with_incoming_shutdown(incoming, signal).await {
                tracing::warn!(%error, "demo upstream stopped with an error");
            }
        });
        tracing::debug!(%local_addr, "demo upstream listening");

        Ok(DemoUpstream {
            local_addr,
            stats,
            stop_accepting: Some(stop_accepting),
            cut_connections,
            server: Some(server),
        })
    }

    /// The address the server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The counters of both services.
    pub fn stats(&self) -> DemoStats {
        self.stats.clone()
    }

    /// Stops accepting, lets in-flight calls finish for up to [`SHUTDOWN_GRACE`], then cuts
    /// the connections that are still open.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop_accepting.take() {
            let _ = stop.send(());
        }
        let Some(mut server) = self.server.take() else {
            return;
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
            .await
            .is_ok()
        {
            return;
        }
        self.cut_connections.cancel();
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    }
}

impl Drop for DemoUpstream {
    fn drop(&mut self) {
        self.cut_connections.cancel();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// A TCP stream that fails every read and write once its token is cancelled, which makes
/// hyper drop the connection and with it every call on it.
struct KillableIo {
    stream: TcpStream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl KillableIo {
    fn new(stream: TcpStream, token: &CancellationToken) -> Self {
        Self {
            stream,
            killed: Box::pin(token.clone().cancelled_owned()),
        }
    }

    /// Polling the cancellation future also registers the task to be woken by `cancel`.
    fn check_killed(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.killed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "demo upstream stopped",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for KillableIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_killed(cx)?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_killed(cx)?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check_killed(cx)?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check_killed(cx)?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connected for KillableIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}
