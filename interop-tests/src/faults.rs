//! Upstreams that misbehave on purpose, for failure-semantics tests.
//!
//! Each [`FaultyUpstream`] is a real HTTP/2 cleartext (h2c, prior knowledge) server built on the
//! `h2` crate directly, so it can do what a well-behaved gRPC server never does: answer with an
//! HTML error page, end a stream without trailers, reset a stream with a chosen reason, cut the
//! TCP connection in the middle of a message, or stall forever. It also records what it saw
//! (request paths and headers, streams the proxy reset), so a test can check what reached the
//! upstream.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

/// A loopback TCP address where connections are refused: a socket bound there but not
/// listening, held for as long as this lives, so no other test's server can take the port
/// meanwhile (a port merely freed can be, and then a call meant to be refused reaches it).
#[derive(Debug)]
pub struct ClosedPort {
    _socket: socket2::Socket,
    addr: SocketAddr,
}

impl ClosedPort {
    /// Bind a fresh one.
    pub fn new() -> io::Result<ClosedPort> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
        let addr = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("not an IP address"))?;
        Ok(ClosedPort {
            _socket: socket,
            addr,
        })
    }

    /// The address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// The payload of the one message a fault upstream sends before it misbehaves.
pub const FAULT_MESSAGE: &[u8] = b"fault-upstream-message";

/// How long a fault upstream waits after sending data before it resets or closes, so the data
/// leaves the socket first (h2 drops queued DATA of a stream it resets).
const FLUSH_DELAY: Duration = Duration::from_millis(50);

/// What a [`FaultyUpstream`] does with every request.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this HTTP status, content type and body, and no gRPC status at all
    /// (an nginx or load-balancer error page).
    HttpError {
        /// HTTP status code, e.g. 503.
        status: u16,
        /// Content type of the body, e.g. `text/html`.
        content_type: &'static str,
        /// The body.
        body: &'static str,
    },
    /// Response headers, one message, then END_STREAM on the DATA frame: no trailers, no
    /// `grpc-status`.
    NoTrailers,
    /// Response headers, one message, then RST_STREAM with this reason.
    ResetAfterMessage(Reason),
    /// A Trailers-Only response: status, message and custom metadata in the headers, END_STREAM
    /// on the HEADERS frame, no body.
    TrailersOnly {
        /// `grpc-status`.
        code: i32,
        /// `grpc-message` (sent as given: keep it to visible ASCII without `%`).
        message: &'static str,
        /// Custom metadata sent with the status.
        metadata: Vec<(&'static str, &'static str)>,
    },
    /// Response headers, then a frame header announcing 100 bytes followed by only 10 of them,
    /// then the TCP connection is closed (no RST_STREAM, no GOAWAY).
    HalfFrameThenClose,
    /// Response headers, then nothing, forever (until the proxy resets the stream).
    StallAfterHeaders,
    /// Response headers, no message, then RST_STREAM with this reason: a stream that fails
    /// after its headers.
    ResetAfterHeaders(Reason),
    /// The n-th request (counted from 0 over all connections) gets the n-th fault; requests
    /// past the end get the last one.
    Sequence(Vec<Fault>),
}

impl Fault {
    /// What the `n`-th request gets.
    fn for_request(&self, n: usize) -> Fault {
        match self {
            Fault::Sequence(faults) => match faults.get(n).or(faults.last()) {
                Some(fault) => fault.for_request(n),
                None => Fault::StallAfterHeaders,
            },
            other => other.clone(),
        }
    }
}

/// An HTTP/2 server that answers every request with its [`Fault`].
///
/// Dropping it stops the server and cuts every connection.
#[derive(Debug)]
pub struct FaultyUpstream {
    local_addr: SocketAddr,
    seen: Arc<Seen>,
    server: JoinHandle<()>,
}

/// What the upstream observed.
#[derive(Debug, Default)]
struct Seen {
    /// `:path` plus query of every request, in arrival order.
    paths: Mutex<Vec<String>>,
    /// The headers of every request, in arrival order.
    headers: Mutex<Vec<HeaderMap>>,
    /// Streams that the peer reset while this upstream still held them open.
    resets: AtomicU64,
    changed: Notify,
}

impl FaultyUpstream {
    /// Binds `127.0.0.1:0` and serves `fault` until dropped.
    pub async fn start(fault: Fault) -> io::Result<FaultyUpstream> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let local_addr = listener.local_addr()?;
        let seen = Arc::new(Seen::default());
        let fault = Arc::new(fault);
        let server = tokio::spawn(accept_loop(listener, fault, seen.clone()));
        Ok(FaultyUpstream {
            local_addr,
            seen,
            server,
        })
    }

    /// The address the server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://127.0.0.1:PORT`, ready for the proxy's upstream setting.
    pub fn url(&self) -> url::Url {
        let text = format!("http://{}", self.local_addr);
        url::Url::parse(&text).unwrap_or_else(|e| panic!("{text} is not a URL: {e}"))
    }

    /// Path (and query, if any) of every request received so far.
    pub fn paths(&self) -> Vec<String> {
        self.seen
            .paths
            .lock()
            .map(|paths| paths.clone())
            .unwrap_or_default()
    }

    /// The headers (call metadata) of every request received so far, in arrival order. A
    /// request is recorded before it is answered.
    pub fn request_headers(&self) -> Vec<HeaderMap> {
        self.seen
            .headers
            .lock()
            .map(|headers| headers.clone())
            .unwrap_or_default()
    }

    /// Streams the peer reset while this upstream was still holding them
    /// ([`Fault::StallAfterHeaders`]).
    pub fn resets(&self) -> u64 {
        self.seen.resets.load(Ordering::SeqCst)
    }

    /// Waits until at least `at_least` streams were reset by the peer; false on timeout.
    pub async fn wait_resets(&self, at_least: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.seen.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.resets() >= at_least {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.resets() >= at_least;
            }
        }
    }
}

impl Drop for FaultyUpstream {
    fn drop(&mut self) {
        // The accept loop owns the connection tasks, which own the stream tasks: aborting it
        // drops them all.
        self.server.abort();
    }
}

async fn accept_loop(listener: TcpListener, fault: Arc<Fault>, seen: Arc<Seen>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    connections.spawn(serve_connection(tcp, fault.clone(), seen.clone()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(tcp: TcpStream, fault: Arc<Fault>, seen: Arc<Seen>) {
    let Ok(mut connection) = h2::server::handshake(tcp).await else {
        return;
    };
    let close = Arc::new(Notify::new());
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            request = connection.accept() => {
                let Some(Ok((request, respond))) = request else { break };
                let path = request
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default();
                let n = match seen.paths.lock() {
                    Ok(mut paths) => {
                        paths.push(path);
                        paths.len() - 1
                    }
                    Err(_) => 0,
                };
                if let Ok(mut headers) = seen.headers.lock() {
                    headers.push(request.headers().clone());
                }
                let fault = Arc::new(fault.for_request(n));
                streams.spawn(drain(request.into_body()));
                streams.spawn(misbehave(fault, respond, seen.clone(), close.clone()));
            }
            // Dropping the connection closes the socket without GOAWAY.
            () = close.notified() => break,
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

/// Reads and discards a request body, releasing flow-control capacity as it goes.
async fn drain(mut body: RecvStream) {
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
    }
}

/// A gRPC length-prefixed message frame.
fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + payload.len());
    frame.put_u8(0);
    frame.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    frame.put_slice(payload);
    frame.freeze()
}

fn grpc_headers(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

async fn misbehave(
    fault: Arc<Fault>,
    mut respond: SendResponse<Bytes>,
    seen: Arc<Seen>,
    close: Arc<Notify>,
) {
    match &*fault {
        Fault::HttpError {
            status,
            content_type,
            body,
        } => {
            let mut response = Response::new(());
            *response.status_mut() =
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(content_type),
            );
            if let Ok(mut send) = respond.send_response(response, false) {
                let _ = send.send_data(Bytes::from_static(body.as_bytes()), true);
            }
        }
        Fault::NoTrailers => {
            if let Ok(mut send) = respond.send_response(grpc_headers(StatusCode::OK), false) {
                let _ = send.send_data(grpc_frame(FAULT_MESSAGE), true);
            }
        }
        Fault::ResetAfterMessage(reason) => {
            if let Ok(mut send) = respond.send_response(grpc_headers(StatusCode::OK), false) {
                let _ = send.send_data(grpc_frame(FAULT_MESSAGE), false);
                tokio::time::sleep(FLUSH_DELAY).await;
                send.send_reset(*reason);
            }
        }
        Fault::TrailersOnly {
            code,
            message,
            metadata,
        } => {
            let mut response = grpc_headers(StatusCode::OK);
            let headers: &mut HeaderMap = response.headers_mut();
            headers.insert("grpc-status", HeaderValue::from(*code));
            headers.insert("grpc-message", HeaderValue::from_static(message));
            for (name, value) in metadata {
                headers.append(
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                );
            }
            let _ = respond.send_response(response, true);
        }
        Fault::HalfFrameThenClose => {
            if let Ok(mut send) = respond.send_response(grpc_headers(StatusCode::OK), false) {
                let mut partial = BytesMut::with_capacity(15);
                partial.put_u8(0);
                partial.put_u32(100);
                partial.put_slice(&[7; 10]);
                let _ = send.send_data(partial.freeze(), false);
                tokio::time::sleep(FLUSH_DELAY).await;
                close.notify_one();
                // Keep the stream open until the connection task drops it.
                std::future::pending::<()>().await;
            }
        }
        Fault::ResetAfterHeaders(reason) => {
            if let Ok(mut send) = respond.send_response(grpc_headers(StatusCode::OK), false) {
                tokio::time::sleep(FLUSH_DELAY).await;
                send.send_reset(*reason);
            }
        }
        // `for_request` resolved the sequence already.
        Fault::Sequence(_) => {}
        Fault::StallAfterHeaders => {
            if let Ok(mut send) = respond.send_response(grpc_headers(StatusCode::OK), false) {
                // Holds the stream open; returns when the peer resets it (or the connection
                // fails, which ends the stream just the same).
                let _ = std::future::poll_fn(|cx| send.poll_reset(cx)).await;
                seen.resets.fetch_add(1, Ordering::SeqCst);
                seen.changed.notify_waiters();
            }
        }
    }
}
