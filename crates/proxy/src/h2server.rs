//! The HTTP/2 side of the data-plane listener, on the h2 crate directly.
//!
//! hyper's HTTP/2 server polls a response body only while the client has flow-control window,
//! and it cannot reset one stream on request: a call whose client stops reading could be ended
//! (its upstream reset, its status decided) but never told so. Here every stream is piped by a
//! loop of pnp's own that also watches the call's [`ClientReset`] signal: when the proxy ends a
//! call whose status cannot be written (the client has no window), the stream gets
//! `RST_STREAM(CANCEL)` at once, and nothing of it stays behind.
//!
//! The connection loop answers keepalive PINGs (h2 does that), sends its own on a timer and closes
//! a connection that does not answer, closes connections that stay without calls for the idle
//! timeout (GOAWAY), and drains on shutdown with h2's two-step GOAWAY. The h2 crate's flood
//! limits (pending-accept resets, local-error resets, header list size) stay on.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body::Body;
use pnp_telemetry::Metrics;
use pnp_wire::frame::FrameBuf;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::body::{H2Body, RequestBody};
use crate::conn::{ClientReset, PeerAddr};
use crate::reply::ReplyBody;

/// HTTP/2 settings of client connections.
#[derive(Clone, Debug)]
pub(crate) struct H2Settings {
    /// Streams a client may have open at once on one connection.
    pub(crate) max_concurrent_streams: u32,
    /// PING interval; `None` sends none.
    pub(crate) keepalive_interval: Option<Duration>,
    /// How long a PING may go unanswered.
    pub(crate) keepalive_timeout: Duration,
    /// Close a connection with no stream for this long.
    pub(crate) idle_timeout: Option<Duration>,
}

/// Receive window per client stream (request bodies).
const STREAM_WINDOW: u32 = 1 << 20;
/// Receive window of a client connection. Each stream is bounded by its own window; the
/// connection's only needs to let several uploads run side by side.
const CONNECTION_WINDOW: u32 = 4 << 20;
/// Largest header block a client may send.
const MAX_HEADER_LIST: u32 = 64 << 10;
/// Bytes h2 may queue per stream beyond what the client's window lets out.
const MAX_SEND_BUFFER: usize = 256 << 10;

/// Serve one HTTP/2 client connection until it closes or, after `drain`, until its streams
/// are done.
pub(crate) async fn serve<IO, S>(
    io: IO,
    service: S,
    settings: &H2Settings,
    peer: SocketAddr,
    handshake_deadline: Instant,
    drain: CancellationToken,
    metrics: Metrics,
) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<RequestBody>, Response = Response<ReplyBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER);
    let handshake = builder.handshake::<_, FrameBuf>(io);
    let mut conn = match tokio::time::timeout_at(handshake_deadline, handshake).await {
        Ok(conn) => conn?,
        Err(_) => {
            tracing::debug!(%peer, "HTTP/2 handshake timed out");
            return Ok(());
        }
    };
    let mut ping = conn.ping_pong();
    let streams = Arc::new(StreamCount::default());
    let mut draining = false;
    let mut next_ping = settings.keepalive_interval.map(|i| Instant::now() + i);
    let mut pong_due: Option<Instant> = None;
    let mut idle_since = Some(Instant::now());
    loop {
        let idle_at = match (settings.idle_timeout, idle_since) {
            (Some(timeout), Some(since)) if !draining => Some(since + timeout),
            _ => None,
        };
        let timer_at = [next_ping, pong_due, idle_at].into_iter().flatten().min();
        let awaiting_pong = pong_due.is_some();
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    idle_since = None;
                    let guard = streams.enter();
                    let service = service.clone();
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        serve_stream(request, respond, service, peer, &metrics).await;
                        drop(guard);
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "HTTP/2 connection error");
                    return Err(e);
                }
                None => return Ok(()),
            },
            pong = poll_fn(|cx| match ping.as_mut() {
                Some(ping) if awaiting_pong => ping.poll_pong(cx),
                _ => Poll::Pending,
            }) => {
                if pong.is_ok() {
                    pong_due = None;
                }
            }
            () = sleep_until(timer_at) => {
                let now = Instant::now();
                if pong_due.is_some_and(|due| due <= now) {
                    tracing::debug!(%peer, "client did not answer a keepalive PING; closing");
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    pong_due = None;
                    next_ping = None;
                    // Let h2 write the GOAWAY; the next accept returns None.
                    continue;
                }
                if next_ping.is_some_and(|at| at <= now) {
                    if let (Some(ping), Some(interval)) = (ping.as_mut(), settings.keepalive_interval) {
                        if pong_due.is_none() && ping.send_ping(h2::Ping::opaque()).is_ok() {
                            pong_due = Some(now + settings.keepalive_timeout);
                        }
                        next_ping = Some(now + interval);
                    }
                }
                if idle_at.is_some_and(|at| at <= now) {
                    if streams.is_idle() {
                        tracing::debug!(%peer, "idle client connection closed");
                        conn.graceful_shutdown();
                        draining = true;
                    } else {
                        idle_since = None;
                    }
                }
            }
            () = streams.went_idle(), if idle_since.is_none() => {
                idle_since = Some(Instant::now());
            }
            () = drain.cancelled(), if !draining => {
                conn.graceful_shutdown();
                draining = true;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Streams open on one connection, and a signal when the last one ends.
#[derive(Default)]
pub(crate) struct StreamCount {
    open: AtomicUsize,
    idle: tokio::sync::Notify,
}

pub(crate) struct StreamGuard(Arc<StreamCount>);

impl StreamCount {
    pub(crate) fn enter(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.open.load(Ordering::Acquire) == 0
    }

    pub(crate) async fn went_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.is_idle() {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Headers HTTP/2 forbids in a response (RFC 9113 §8.2.2); h2 refuses a response carrying them.
pub(crate) const CONNECTION_HEADERS: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// One request: call the service, send the response head, pipe the body.
async fn serve_stream<S>(
    request: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<FrameBuf>,
    service: S,
    peer: SocketAddr,
    metrics: &Metrics,
) where
    S: tower::Service<Request<RequestBody>, Response = Response<ReplyBody>, Error = Infallible>,
{
    let reset = ClientReset::default();
    let mut request = request.map(|recv| RequestBody::Http2(H2Body::new(recv)));
    request.extensions_mut().insert(PeerAddr(peer));
    request.extensions_mut().insert(reset.clone());

    // While the call waits for its upstream, a client reset drops it (and so the upstream call).
    let response = {
        let mut call = pin!(service.oneshot(request));
        let outcome = poll_fn(|cx| {
            if let Poll::Ready(Ok(response)) = call.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            match respond.poll_reset(cx) {
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match outcome {
            Some(response) => response,
            None => return,
        }
    };
    let (mut parts, body) = response.into_parts();
    for name in CONNECTION_HEADERS {
        parts.headers.remove(name);
    }
    let end_of_stream = body.is_end_stream();
    let send = match respond.send_response(Response::from_parts(parts, ()), end_of_stream) {
        Ok(send) => send,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "could not send response headers");
            return;
        }
    };
    if !end_of_stream {
        pipe(body, send, &reset, metrics).await;
    }
}

/// What woke the pipe.
enum Event {
    /// The proxy ended the call and its status cannot reach the client.
    Reset,
    /// The client reset the stream, or the connection is gone.
    Gone,
    /// The next body frame, or the end of the body.
    Frame(Option<http_body::Frame<FrameBuf>>),
    /// Window for the frame in hand.
    Capacity,
    /// The call ended inside a message: the stream must be cut, not ended.
    Cut,
}

/// Write a reply body to an HTTP/2 stream: one frame at a time, the next one polled only when
/// h2 has window for the previous one, so a client that does not read holds at most one frame
/// here. Ends with trailers or an empty end-of-stream DATA frame, or `RST_STREAM(CANCEL)` when
/// the call's [`ClientReset`] fires.
async fn pipe(
    mut body: ReplyBody,
    mut send: h2::SendStream<FrameBuf>,
    reset: &ClientReset,
    metrics: &Metrics,
) {
    let mut reset_signal = pin!(reset.token.cancelled());
    let mut in_hand: Option<FrameBuf> = None;
    loop {
        let event = poll_fn(|cx| {
            if reset_signal.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Reset);
            }
            if send.poll_reset(cx).is_ready() {
                return Poll::Ready(Event::Gone);
            }
            if in_hand.is_some() {
                // h2 may report a grant of zero; wait until there is window.
                loop {
                    match send.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) if send.capacity() > 0 => {
                            return Poll::Ready(Event::Capacity)
                        }
                        Poll::Ready(Some(Ok(_))) => continue,
                        Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(Event::Gone),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
            match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Event::Frame(Some(frame))),
                Poll::Ready(None) => Poll::Ready(Event::Frame(None)),
                Poll::Ready(Some(Err(_cut))) => Poll::Ready(Event::Cut),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match event {
            Event::Reset => {
                metrics.client_reset("h2");
                send.send_reset(h2::Reason::CANCEL);
                return;
            }
            Event::Gone => return,
            Event::Cut => {
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            Event::Capacity => {
                reset.stalled.store(false, Ordering::Release);
                if let Some(data) = in_hand.take() {
                    let end = body.is_end_stream();
                    if send.send_data(data, end).is_err() || end {
                        return;
                    }
                }
            }
            Event::Frame(None) => {
                let _ = send.send_data(FrameBuf::raw(Bytes::new()), true);
                return;
            }
            Event::Frame(Some(frame)) => match frame.into_data() {
                Ok(data) if !data.has_remaining() => {}
                Ok(data) => {
                    send.reserve_capacity(1);
                    if send.capacity() > 0 {
                        let end = body.is_end_stream();
                        if send.send_data(data, end).is_err() || end {
                            return;
                        }
                    } else {
                        in_hand = Some(data);
                        reset.stalled.store(true, Ordering::Release);
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        send.reserve_capacity(0);
                        let _ = send.send_trailers(trailers);
                    }
                    return;
                }
            },
        }
    }
}
