//! The load client: gRPC-Web (binary and text, over HTTP/1.1 and HTTP/2) and native gRPC.
//!
//! HTTP/2 uses the `h2` crate directly (one connection multiplexes many calls; a clone of a
//! [`Channel`] shares it); HTTP/1.1 uses hyper's connection API (one call at a time per
//! connection). Response bodies are scanned, never buffered: see [`crate::frames`].

use std::collections::VecDeque;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{bail, Context as _};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use pnp_wire::text::Base64Decoder;
use tokio::net::TcpStream;

use crate::frames::{FrameEvent, FrameScanner};
use crate::service::{self, Method, Params};

/// How the client speaks to the server under test.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Protocol {
    /// Native gRPC over HTTP/2 (h2c prior knowledge).
    Grpc,
    /// gRPC-Web binary over HTTP/2.
    WebH2,
    /// gRPC-Web text (base64) over HTTP/2.
    WebTextH2,
    /// gRPC-Web binary over HTTP/1.1.
    WebH1,
    /// gRPC-Web text over HTTP/1.1.
    WebTextH1,
}

impl Protocol {
    /// Every protocol.
    pub const ALL: [Protocol; 5] = [
        Protocol::Grpc,
        Protocol::WebH2,
        Protocol::WebTextH2,
        Protocol::WebH1,
        Protocol::WebTextH1,
    ];

    /// Short name used in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc-h2",
            Protocol::WebH2 => "web-h2",
            Protocol::WebTextH2 => "web-text-h2",
            Protocol::WebH1 => "web-h1",
            Protocol::WebTextH1 => "web-text-h1",
        }
    }

    /// Parse a [`name`](Self::name).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Spoken over HTTP/1.1.
    pub fn is_http1(self) -> bool {
        matches!(self, Protocol::WebH1 | Protocol::WebTextH1)
    }

    /// gRPC-Web (status in the body) rather than native gRPC (status in HTTP trailers).
    pub fn is_web(self) -> bool {
        self != Protocol::Grpc
    }

    /// Base64 bodies.
    pub fn is_text(self) -> bool {
        matches!(self, Protocol::WebTextH2 | Protocol::WebTextH1)
    }

    fn content_type(self) -> &'static str {
        match self {
            Protocol::Grpc => "application/grpc",
            Protocol::WebH2 | Protocol::WebH1 => "application/grpc-web+proto",
            Protocol::WebTextH2 | Protocol::WebTextH1 => "application/grpc-web-text+proto",
        }
    }
}

/// One call to make.
#[derive(Clone, Copy, Debug)]
pub struct CallSpec {
    /// Which bench method.
    pub method: Method,
    /// Its parameters (ignored by unary calls).
    pub params: Params,
}

impl CallSpec {
    /// The S1 unary call.
    pub fn unary() -> Self {
        Self {
            method: Method::Unary,
            params: Params::default(),
        }
    }

    /// A streaming call to `method` with `params`.
    pub fn stream(method: Method, params: Params) -> Self {
        Self { method, params }
    }
}

/// A connection to the server under test.
#[derive(Debug)]
pub struct Channel {
    protocol: Protocol,
    addr: SocketAddr,
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    H2(h2::client::SendRequest<Bytes>),
    /// `None` once the connection is known to be gone.
    H1(Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>),
}

/// A message as the client received it.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    /// When the client had all of it.
    pub at: Instant,
    /// The same moment as [`service::now_nanos`] (comparable with `stamp`).
    pub wall_nanos: u64,
    /// Payload length.
    pub len: u64,
    /// First 8 payload bytes as a little-endian u64 (the upstream's send time for paced
    /// messages).
    pub stamp: Option<u64>,
}

impl Channel {
    /// Connect to `addr` speaking `protocol`.
    pub async fn connect(addr: SocketAddr, protocol: Protocol) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        let inner = if protocol.is_http1() {
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Inner::H1(Some(send))
        } else {
            let (send, conn) = h2::client::Builder::new()
                .initial_window_size(service::STREAM_WINDOW)
                .initial_connection_window_size(service::CONNECTION_WINDOW)
                .max_frame_size(1 << 16)
                .max_concurrent_reset_streams(1 << 16)
                // h2 >= 0.4.17 sends GOAWAY ENHANCE_YOUR_CALM ("too_many_data_frames") when a
                // peer's small DATA frames pile up unread beyond half the connection window.
                // A load client that is slower than the server it measures must not trip it;
                // browsers have no such rule.
                .data_frame_budget(usize::MAX / 2)
                .handshake::<_, Bytes>(tcp)
                .await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Inner::H2(send)
        };
        Ok(Self {
            protocol,
            addr,
            inner,
        })
    }

    /// The address this channel is connected to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An HTTP/1.1 connection that can make no more calls (closed, or a call was abandoned).
    pub fn is_broken(&self) -> bool {
        match &self.inner {
            Inner::H2(_) => false,
            Inner::H1(None) => true,
            Inner::H1(Some(send)) => send.is_closed(),
        }
    }

    /// The protocol this channel speaks.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// A handle that can make calls concurrently with this one: the same connection for HTTP/2,
    /// a new connection for HTTP/1.1.
    pub async fn fork(&self) -> anyhow::Result<Self> {
        match &self.inner {
            Inner::H2(send) => Ok(Self {
                protocol: self.protocol,
                addr: self.addr,
                inner: Inner::H2(send.clone()),
            }),
            Inner::H1(_) => Self::connect(self.addr, self.protocol).await,
        }
    }

    fn request(&self, spec: &CallSpec) -> anyhow::Result<(Request<()>, Bytes)> {
        let uri = if self.protocol.is_http1() {
            http::Uri::from_static(spec.method.path())
        } else {
            http::Uri::builder()
                .scheme("http")
                .authority(self.addr.to_string())
                .path_and_query(spec.method.path())
                .build()?
        };
        let mut request = Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        let headers: &mut HeaderMap = request.headers_mut();
        headers.insert(
            "content-type",
            HeaderValue::from_static(self.protocol.content_type()),
        );
        if self.protocol.is_web() {
            headers.insert("x-grpc-web", HeaderValue::from_static("1"));
            if self.protocol.is_text() {
                headers.insert(
                    "accept",
                    HeaderValue::from_static("application/grpc-web-text"),
                );
            }
        } else {
            headers.insert("te", HeaderValue::from_static("trailers"));
        }
        if self.protocol.is_http1() {
            headers.insert("host", HeaderValue::from_str(&self.addr.to_string())?);
        }
        let frame = match spec.method {
            Method::Unary => service::UNARY_FRAME.clone(),
            // The request is the message itself, streamed by `upload`.
            Method::Upload => {
                spec.params.to_headers(headers);
                Bytes::new()
            }
            _ => {
                spec.params.to_headers(headers);
                service::EMPTY_FRAME.clone()
            }
        };
        let body = if self.protocol.is_text() {
            pnp_wire::text::encode_padded(&frame)
        } else {
            frame
        };
        Ok((request, body))
    }

    /// Start a call; the returned stream yields its messages.
    pub async fn start(&mut self, spec: &CallSpec) -> anyhow::Result<ResponseStream> {
        let (request, body) = self.request(spec)?;
        let started = Instant::now();
        let protocol = self.protocol;
        let mut keep = None;
        let (head_status, body) = match &mut self.inner {
            Inner::H2(send) => {
                keep = Some(send.clone());
                poll_fn(|cx| send.poll_ready(cx)).await?;
                let (response, mut stream) = send.send_request(request, false)?;
                stream.send_data(body, true)?;
                let response = response.await?;
                (
                    response_status(response.status(), response.headers())?,
                    Body::H2(response.into_body()),
                )
            }
            Inner::H1(slot) => {
                let Some(send) = slot.as_mut() else {
                    bail!("HTTP/1.1 connection lost");
                };
                if send.ready().await.is_err() {
                    *slot = None;
                    bail!("HTTP/1.1 connection closed");
                }
                let (parts, ()) = request.into_parts();
                let response = send
                    .send_request(Request::from_parts(parts, Full::new(body)))
                    .await?;
                (
                    response_status(response.status(), response.headers())?,
                    Body::H1(response.into_body()),
                )
            }
        };
        Ok(ResponseStream::new(
            protocol,
            started,
            keep,
            head_status,
            body,
        ))
    }

    /// A client-streaming [`Method::Upload`] call (HTTP/2, binary protocols): the request is one
    /// `size`-byte message (up to 4 GiB − 1), sent as its header and then slices of the shared
    /// bulk chunk as the peer's window allows, so it is never held whole. Returns the payload
    /// length the upstream says it received; `Ok` only if the call ended with status OK.
    pub async fn upload(&mut self, size: u64) -> anyhow::Result<u64> {
        if self.protocol.is_http1() || self.protocol.is_text() {
            bail!(
                "uploads are sent over HTTP/2 as gRPC or binary gRPC-Web, not {}",
                self.protocol.name()
            );
        }
        let spec = CallSpec::stream(
            Method::Upload,
            Params {
                count: 1,
                size,
                interval_us: 0,
            },
        );
        let (request, _) = self.request(&spec)?;
        let started = Instant::now();
        let protocol = self.protocol;
        let Inner::H2(send) = &mut self.inner else {
            bail!("uploads need HTTP/2");
        };
        let keep = Some(send.clone());
        poll_fn(|cx| send.poll_ready(cx)).await?;
        let (response, mut body) = send.send_request(request, false)?;
        // The request goes out beside the wait for the reply: a peer that refuses the call
        // answers (and resets the stream) before the message is through.
        let sender = tokio::spawn(async move {
            crate::upstream::send_message(&mut body, size).await?;
            body.send_data(Bytes::new(), true)?;
            Ok::<_, h2::Error>(())
        });
        let outcome = async {
            let response = response.await?;
            let head_status = response_status(response.status(), response.headers())?;
            let mut stream = ResponseStream::new(
                protocol,
                started,
                keep,
                head_status,
                Body::H2(response.into_body()),
            );
            let mut acknowledged = None;
            while let Some(message) = stream.next().await? {
                acknowledged = message.stamp;
            }
            Ok::<_, anyhow::Error>((stream.status(), acknowledged))
        }
        .await;
        let (status, acknowledged) = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                sender.abort();
                return Err(e);
            }
        };
        if status != Some(0) {
            sender.abort();
            bail!("upload of {size} bytes ended with grpc-status {status:?}");
        }
        sender
            .await
            .context("the upload task")?
            .context("sending the upload")?;
        acknowledged.context("the upload's reply carried no length")
    }

    /// Make a whole call, reading every message; `Ok` only if it ended with status OK.
    pub async fn call(&mut self, spec: &CallSpec) -> anyhow::Result<u64> {
        let mut stream = self.start(spec).await?;
        while stream.next().await?.is_some() {}
        match stream.status() {
            Some(0) => Ok(stream.messages()),
            other => bail!("call ended with grpc-status {other:?}"),
        }
    }
}

/// A Trailers-Only reply carries its status in the headers.
fn response_status(status: http::StatusCode, headers: &HeaderMap) -> anyhow::Result<Option<u32>> {
    if status != http::StatusCode::OK {
        bail!("HTTP {status}");
    }
    Ok(headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok()))
}

enum Body {
    H2(h2::RecvStream),
    H1(Incoming),
}

/// The reply of a call in progress. Dropping it before the end cancels the call (HTTP/2
/// RST_STREAM; HTTP/1.1 closes the connection).
pub struct ResponseStream {
    /// Keeps the HTTP/2 connection open while the call runs: when the last handle goes, `h2`
    /// sends GOAWAY, and some servers then end the open streams too.
    _connection: Option<h2::client::SendRequest<Bytes>>,
    protocol: Protocol,
    started: Instant,
    body: Option<Body>,
    scanner: FrameScanner,
    text: Option<Base64Decoder>,
    pending: VecDeque<Received>,
    status: Option<u32>,
    messages: u64,
}

impl std::fmt::Debug for ResponseStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseStream")
            .field("protocol", &self.protocol)
            .field("messages", &self.messages)
            .finish()
    }
}

impl ResponseStream {
    fn new(
        protocol: Protocol,
        started: Instant,
        connection: Option<h2::client::SendRequest<Bytes>>,
        head_status: Option<u32>,
        body: Body,
    ) -> Self {
        Self {
            _connection: connection,
            protocol,
            started,
            body: Some(body),
            scanner: FrameScanner::new(),
            text: protocol.is_text().then(Base64Decoder::new),
            pending: VecDeque::new(),
            status: head_status,
            messages: 0,
        }
    }

    /// When the request was sent.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The final grpc-status, once the stream has ended.
    pub fn status(&self) -> Option<u32> {
        self.status
    }

    /// Messages received so far.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Bytes received so far (after base64 decoding).
    pub fn bytes(&self) -> u64 {
        self.scanner.bytes()
    }

    /// The next message, or `None` at the end of the reply (see [`status`](Self::status)).
    pub async fn next(&mut self) -> anyhow::Result<Option<Received>> {
        loop {
            if let Some(message) = self.pending.pop_front() {
                self.messages += 1;
                return Ok(Some(message));
            }
            let Some(body) = self.body.as_mut() else {
                return Ok(None);
            };
            let chunk = match body {
                Body::H2(recv) => match recv.data().await {
                    Some(chunk) => {
                        let chunk = chunk?;
                        let _ = recv.flow_control().release_capacity(chunk.len());
                        Some(chunk)
                    }
                    None => {
                        if !self.protocol.is_web() {
                            if let Some(trailers) = recv.trailers().await? {
                                if let Some(status) = trailers
                                    .get("grpc-status")
                                    .and_then(|v| v.to_str().ok())
                                    .and_then(|v| v.parse().ok())
                                {
                                    self.status = Some(status);
                                }
                            }
                        }
                        None
                    }
                },
                Body::H1(incoming) => match incoming.frame().await {
                    Some(frame) => match frame?.into_data() {
                        Ok(data) => Some(data),
                        Err(_) => continue,
                    },
                    None => None,
                },
            };
            let Some(chunk) = chunk else {
                self.body = None;
                if self.scanner.in_frame() {
                    bail!("reply ended inside a frame");
                }
                return Ok(None);
            };
            let now = Instant::now();
            let wall_nanos = service::now_nanos();
            let decoded;
            let bytes: &[u8] = match self.text.as_mut() {
                Some(text) => {
                    let mut out = BytesMut::with_capacity(chunk.len() / 4 * 3 + 3);
                    text.decode(&chunk, &mut out)?;
                    decoded = out;
                    &decoded
                }
                None => &chunk,
            };
            let pending = &mut self.pending;
            let status = &mut self.status;
            self.scanner.push(bytes, |event| match event {
                FrameEvent::Message { len, stamp } => pending.push_back(Received {
                    at: now,
                    wall_nanos,
                    len,
                    stamp,
                }),
                FrameEvent::Trailers(code) => *status = code.or(Some(u32::MAX)),
            });
        }
    }
}
