//! The bench upstream: a raw `h2` server that answers from precomputed [`Bytes`].
//!
//! It is deliberately leaner than any real service (no protobuf, no routing tree, no per-reply
//! body allocation except the timestamp of a paced message) so that what the runner measures is
//! the proxy in front of it.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Request, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::frames::{FrameEvent, FrameScanner};
use crate::service::{self, Method, Params};

/// A running upstream.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Bind `addr` and serve on the current runtime.
    pub async fn start(addr: SocketAddr) -> io::Result<Self> {
        let listener = bind(addr)?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(serve(listener));
        Ok(Self { addr, task })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener with a deep accept backlog, so connection storms are not dropped.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(8192)
}

/// Accept connections forever.
pub async fn serve(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(connection(tcp));
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn connection(tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let handshake = h2::server::Builder::new()
        .initial_window_size(service::STREAM_WINDOW)
        .initial_connection_window_size(service::CONNECTION_WINDOW)
        .max_frame_size(1 << 16)
        .max_concurrent_streams(1 << 20)
        .max_send_buffer_size(1 << 20)
        .max_concurrent_reset_streams(1 << 16)
        .handshake::<_, Bytes>(tcp)
        .await;
    let Ok(mut conn) = handshake else { return };
    while let Some(accepted) = conn.accept().await {
        match accepted {
            Ok((request, respond)) => {
                tokio::spawn(async move {
                    let _ = handle(request, respond).await;
                });
            }
            Err(_) => return,
        }
    }
}

fn trailers(code: u32) -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", HeaderValue::from(code));
    trailers
}

async fn handle(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Result<(), h2::Error> {
    let method = Method::from_path(request.uri().path());
    let params = Params::from_headers(request.headers());
    let mut body = request.into_body();
    // An upload's request is scanned as it arrives (never kept); other requests are drained.
    let mut upload = (method == Some(Method::Upload)).then(Received::default);
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if let Some(upload) = upload.as_mut() {
            upload.push(&chunk);
        }
    }
    let mut head = Response::new(());
    head.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    let Some(method) = method else {
        // Trailers-Only UNIMPLEMENTED.
        head.headers_mut()
            .insert("grpc-status", HeaderValue::from(12u32));
        respond.send_response(head, true)?;
        return Ok(());
    };
    let mut send = respond.send_response(head, false)?;
    match method {
        Method::Unary => {
            send.send_data(service::UNARY_FRAME.clone(), false)?;
        }
        Method::Tokens if params.interval_us > 0 => paced(&mut send, params).await?,
        Method::Tokens => unpaced(&mut send, params).await?,
        Method::Idle => {
            send.send_data(service::EMPTY_FRAME.clone(), false)?;
            // Hold the stream until the client (or the proxy on its behalf) resets it.
            let _ = poll_fn(|cx| send.poll_reset(cx)).await;
            return Ok(());
        }
        Method::Bulk => send_message(&mut send, params.size).await?,
        Method::Upload => {
            let upload = upload.unwrap_or_default();
            let Some(len) = upload.one_message() else {
                // INVALID_ARGUMENT: not exactly one whole message.
                send.send_trailers(trailers(3))?;
                return Ok(());
            };
            send.send_data(service::frame(&len.to_le_bytes()), false)?;
        }
    }
    send.send_trailers(trailers(0))?;
    Ok(())
}

/// What an upload's request held, counted by a [`FrameScanner`] as it arrived.
#[derive(Debug, Default)]
struct Received {
    scanner: FrameScanner,
    messages: u64,
    payload: u64,
}

impl Received {
    fn push(&mut self, chunk: &[u8]) {
        let (messages, payload) = (&mut self.messages, &mut self.payload);
        self.scanner.push(chunk, |event| {
            if let FrameEvent::Message { len, .. } = event {
                *messages += 1;
                *payload += len;
            }
        });
    }

    /// The payload length, if the request was exactly one whole message.
    fn one_message(&self) -> Option<u64> {
        (self.messages == 1 && !self.scanner.in_frame()).then_some(self.payload)
    }
}

/// Write one `size`-byte message (up to 4 GiB − 1) as its header and then slices of the shared
/// bulk chunk, each as the peer's window allows: nothing is copied, nothing is held whole.
pub async fn send_message(send: &mut SendStream<Bytes>, size: u64) -> Result<(), h2::Error> {
    send_flow(send, service::frame_header(size)).await?;
    for chunk in service::bulk_chunks(size) {
        send_flow(send, chunk).await?;
    }
    Ok(())
}

/// One stamped message every `interval_us`, until `count` or a reset.
async fn paced(send: &mut SendStream<Bytes>, params: Params) -> Result<(), h2::Error> {
    let mut tick = tokio::time::interval(Duration::from_micros(params.interval_us));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = 0;
    while params.count == 0 || sent < params.count {
        tokio::select! {
            _ = tick.tick() => {}
            reset = poll_fn(|cx| send.poll_reset(cx)) => {
                return Err(reset.err().unwrap_or_else(|| h2::Error::from(h2::Reason::CANCEL)));
            }
        }
        send.send_data(service::stamped(params.size as usize), false)?;
        sent += 1;
    }
    Ok(())
}

/// `count` messages as fast as flow control allows, written [`service::BATCH`] at a time.
/// Large messages ([`service::LARGE_MESSAGE`] and up) are written one by one from the shared
/// bulk chunk instead, so a stream of 2 MiB (scenario S8) allocates nothing per call.
async fn unpaced(send: &mut SendStream<Bytes>, params: Params) -> Result<(), h2::Error> {
    let size = params.size as usize;
    if (service::LARGE_MESSAGE..=service::BULK_CHUNK).contains(&size) {
        let header = service::frame_header(size as u64);
        let mut sent = 0;
        while params.count == 0 || sent < params.count {
            send_flow(send, header.clone()).await?;
            send_flow(send, service::BULK_BYTES.slice(..size)).await?;
            sent += 1;
        }
        return Ok(());
    }
    let batch = service::batch(params.size as usize);
    let frame_len = batch.len() / service::BATCH;
    let mut left = params.count;
    loop {
        let n = if params.count == 0 {
            service::BATCH as u64
        } else {
            left.min(service::BATCH as u64)
        };
        if n == 0 {
            return Ok(());
        }
        send_flow(send, batch.slice(..n as usize * frame_len)).await?;
        left = left.saturating_sub(n);
    }
}

/// Send `data` without queueing more than the peer's window allows.
pub async fn send_flow(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let capacity = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(capacity) => capacity?,
            None => return Err(h2::Error::from(h2::Reason::CANCEL)),
        };
        if capacity == 0 {
            continue;
        }
        let chunk = data.split_to(capacity.min(data.len()));
        send.send_data(chunk, false)?;
    }
    Ok(())
}
