//! A hand-rolled gRPC-Web and gRPC client that builds the request bytes itself and checks the
//! reply bytes strictly.
//!
//! It is the independent check of pnp's codec, so it shares no code with `pnp-wire`: the
//! 5-byte framing, the trailer block parser, the text-mode base64 handling and the
//! `grpc-message` percent-decoding are all written here, against PROTOCOL-WEB.md and
//! PROTOCOL-HTTP2.md. Every call opens its own connection (hyper's low-level client
//! connections, HTTP/1.1 or HTTP/2 with prior knowledge), so aborting a call never disturbs
//! another one.
//!
//! Framing violations panic with a message that names the violation: this is test code, and a
//! violation is a failed test. A stream that ends without a status or with a transport error is
//! not a violation of framing; [`RawStream::finish`] reports it as `Err`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// Frame flag of a message (PROTOCOL-HTTP2.md "Length-Prefixed-Message").
const FLAG_MESSAGE: u8 = 0x00;
/// The compressed-flag bit of a message frame.
const FLAG_COMPRESSED: u8 = 0x01;
/// The most significant bit marks the gRPC-Web trailer frame (PROTOCOL-WEB.md).
const FLAG_TRAILERS: u8 = 0x80;
/// Length of the frame header: flag byte and big-endian u32 length.
const FRAME_HEADER_LEN: usize = 5;

/// How long a call may wait for response headers, and a stream for its next bytes, by default.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the body may take to end after the trailer frame arrived.
const END_AFTER_TRAILERS: Duration = Duration::from_secs(5);

/// How long an aborted HTTP/2 call keeps its connection open, so the upstream sees the stream
/// reset (RST_STREAM) rather than the connection closing.
const KEEP_CONNECTION_AFTER_ABORT: Duration = Duration::from_secs(3);

/// How the client speaks to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `application/grpc-web+proto` over HTTP/1.1.
    WebBinaryH1,
    /// `application/grpc-web+proto` over HTTP/2 (prior knowledge).
    WebBinaryH2,
    /// `application/grpc-web-text` (base64 both ways) over HTTP/1.1.
    WebTextH1,
    /// `application/grpc-web-text` over HTTP/2.
    WebTextH2,
    /// Native `application/grpc` over HTTP/2.
    GrpcH2,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 5] = [
        Mode::WebBinaryH1,
        Mode::WebBinaryH2,
        Mode::WebTextH1,
        Mode::WebTextH2,
        Mode::GrpcH2,
    ];

    /// The gRPC-Web modes.
    pub const WEB: [Mode; 4] = [
        Mode::WebBinaryH1,
        Mode::WebBinaryH2,
        Mode::WebTextH1,
        Mode::WebTextH2,
    ];

    /// Base64 in both directions.
    pub fn is_text(self) -> bool {
        matches!(self, Mode::WebTextH1 | Mode::WebTextH2)
    }

    /// HTTP/2 with prior knowledge (otherwise HTTP/1.1).
    pub fn is_h2(self) -> bool {
        !matches!(self, Mode::WebBinaryH1 | Mode::WebTextH1)
    }

    /// gRPC-Web (trailers in the body) rather than native gRPC (HTTP/2 trailers).
    pub fn is_web(self) -> bool {
        self != Mode::GrpcH2
    }

    /// The request content type. Binary uses the `+proto` form, text the bare form (as the
    /// grpc-web JavaScript client does), so both spellings are exercised.
    pub fn content_type(self) -> &'static str {
        match self {
            Mode::WebBinaryH1 | Mode::WebBinaryH2 => "application/grpc-web+proto",
            Mode::WebTextH1 | Mode::WebTextH2 => "application/grpc-web-text",
            Mode::GrpcH2 => "application/grpc",
        }
    }

    /// The content type family a successful reply must carry (a `+subtype` may follow).
    fn reply_content_type(self) -> &'static str {
        match self {
            Mode::WebBinaryH1 | Mode::WebBinaryH2 => "application/grpc-web",
            Mode::WebTextH1 | Mode::WebTextH2 => "application/grpc-web-text",
            Mode::GrpcH2 => "application/grpc",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Frames `messages` (uncompressed) the way every gRPC client does: flag byte, big-endian
/// length, payload.
pub fn encode_frames(messages: &[&[u8]]) -> Bytes {
    let mut body = BytesMut::new();
    for message in messages {
        body.extend_from_slice(&frame_header(FLAG_MESSAGE, message.len()));
        body.extend_from_slice(message);
    }
    body.freeze()
}

/// The 5-byte header of a frame with `flag` and a `len`-byte payload.
pub fn frame_header(flag: u8, len: usize) -> [u8; FRAME_HEADER_LEN] {
    let len = u32::try_from(len).unwrap_or_else(|_| panic!("frame of {len} bytes is too long"));
    let [a, b, c, d] = len.to_be_bytes();
    [flag, a, b, c, d]
}

/// A client for one proxy address and one [`Mode`].
#[derive(Clone, Debug)]
pub struct RawClient {
    addr: SocketAddr,
    mode: Mode,
    read_timeout: Duration,
    local_ip: Option<IpAddr>,
}

impl RawClient {
    /// A client of the proxy at `addr`.
    pub fn new(addr: SocketAddr, mode: Mode) -> Self {
        Self {
            addr,
            mode,
            read_timeout: DEFAULT_READ_TIMEOUT,
            local_ip: None,
        }
    }

    /// The same client connecting from `ip` (port chosen by the OS), so the proxy sees another
    /// client address: on Linux every 127.0.0.0/8 address is on the loopback interface, so
    /// `127.0.0.2` is a second client of a proxy on `127.0.0.1`.
    pub fn with_local_ip(mut self, ip: IpAddr) -> Self {
        self.local_ip = Some(ip);
        self
    }

    /// The same client with another limit on waiting for response headers and for each read.
    pub fn with_read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// The mode of this client.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The request body that carries `messages` in this mode: frames, base64-encoded (padded)
    /// in text mode.
    pub fn encode_body(&self, messages: &[&[u8]]) -> Bytes {
        let framed = encode_frames(messages);
        if self.mode.is_text() {
            Bytes::from(STANDARD.encode(&framed))
        } else {
            framed
        }
    }

    /// Send framed messages, read the whole response.
    pub async fn call(&self, path: &str, headers: &[(&str, &str)], messages: &[&[u8]]) -> RawReply {
        self.call_raw_body(path, headers, self.encode_body(messages))
            .await
    }

    /// Send an arbitrary body as-is (for malformed-input tests): the body bytes are sent exactly
    /// as given (no framing, no base64).
    ///
    /// A reply with an HTTP status other than 200 is returned without parsing its body (its
    /// `grpc-status`, if any, is read from the headers). A 200 reply is checked strictly and
    /// must end with a status.
    pub async fn call_raw_body(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> RawReply {
        let mut stream = self.start_raw_body(path, headers, body).await;
        let mut messages = Vec::new();
        while let Some((message, _)) = stream.next_message().await {
            messages.push(message);
        }
        let trailers = match stream.end.take() {
            Some(End::Status(trailers)) => trailers,
            Some(End::Error(error)) => {
                panic!("{} {path} ({}): {error}", self.addr, self.mode)
            }
            None => panic!("{} {path} ({}): stream did not end", self.addr, self.mode),
        };
        RawReply {
            http_status: stream.http_status,
            headers: stream.headers,
            messages,
            trailers,
            trailers_only: stream.trailers_only,
            body: stream.body_bytes.freeze(),
        }
    }

    /// Start a call and read the response incrementally.
    pub async fn start(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        messages: &[&[u8]],
    ) -> RawStream {
        self.start_raw_body(path, headers, self.encode_body(messages))
            .await
    }

    /// Start a call with a body sent as-is and read the response incrementally.
    pub async fn start_raw_body(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> RawStream {
        let request = self.request(path, headers, body);
        let what = format!("{} {path} ({})", self.addr, self.mode);
        let tcp = match self.local_ip {
            None => TcpStream::connect(self.addr).await,
            Some(ip) => {
                let socket = if ip.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
                .unwrap_or_else(|e| panic!("{what}: socket: {e}"));
                socket
                    .bind(SocketAddr::new(ip, 0))
                    .unwrap_or_else(|e| panic!("{what}: binding {ip}: {e}"));
                socket.connect(self.addr).await
            }
        }
        .unwrap_or_else(|e| panic!("{what}: connecting: {e}"));
        tcp.set_nodelay(true)
            .unwrap_or_else(|e| panic!("{what}: TCP_NODELAY: {e}"));
        let io = TokioIo::new(tcp);
        let (connection, response) = if self.mode.is_h2() {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: HTTP/2 handshake: {e}"));
            let task = tokio::spawn(async move {
                // Errors here also reach the response future or body, where they are reported.
                let _ = conn.await;
            });
            let response = sender.send_request(request);
            let response = self
                .within_timeout(&what, "response headers", response)
                .await;
            (Connection::H2 { task, sender }, response)
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .unwrap_or_else(|e| panic!("{what}: HTTP/1.1 handshake: {e}"));
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            let response = sender.send_request(request);
            let response = self
                .within_timeout(&what, "response headers", response)
                .await;
            (Connection::H1 { task, sender }, response)
        };
        let response = response.unwrap_or_else(|e| panic!("{what}: no response: {e}"));
        let (parts, body) = response.into_parts();
        let http_status = parts.status.as_u16();
        let headers = parts.headers;
        let ok = http_status == 200;
        let trailers_only = headers.contains_key("grpc-status");
        if ok {
            let content_type = headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let family = self.mode.reply_content_type();
            let matches = content_type
                .strip_prefix(family)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('+'));
            assert!(
                matches,
                "{what}: reply content-type {content_type:?}, expected {family}[+subtype]"
            );
        }
        RawStream {
            what,
            mode: self.mode,
            read_timeout: self.read_timeout,
            http_status,
            headers,
            lenient: !ok,
            trailers_only,
            body: Some(body),
            text: (ok && self.mode.is_text()).then(TextDecoder::default),
            pending: BytesMut::new(),
            body_bytes: BytesMut::new(),
            end: None,
            connection,
        }
    }

    async fn within_timeout<F: std::future::Future>(
        &self,
        what: &str,
        waiting_for: &str,
        future: F,
    ) -> F::Output {
        tokio::time::timeout(self.read_timeout, future)
            .await
            .unwrap_or_else(|_| panic!("{what}: no {waiting_for} within {:?}", self.read_timeout))
    }

    fn request(&self, path: &str, headers: &[(&str, &str)], body: Bytes) -> Request<Full<Bytes>> {
        let mut defaults = HeaderMap::new();
        defaults.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(self.mode.content_type()),
        );
        if self.mode.is_web() {
            defaults.insert("x-grpc-web", HeaderValue::from_static("1"));
        } else {
            defaults.insert("te", HeaderValue::from_static("trailers"));
        }
        if self.mode.is_text() {
            defaults.insert(
                http::header::ACCEPT,
                HeaderValue::from_static("application/grpc-web-text"),
            );
        }
        let mut given = HeaderMap::new();
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .unwrap_or_else(|e| panic!("request header name {name:?}: {e}"));
            let value = HeaderValue::from_str(value)
                .unwrap_or_else(|e| panic!("request header {name}: {value:?}: {e}"));
            defaults.remove(&name);
            given.append(name, value);
        }
        let uri = if self.mode.is_h2() {
            format!("http://{}{path}", self.addr)
        } else {
            defaults.insert(
                http::header::HOST,
                HeaderValue::from_str(&self.addr.to_string())
                    .unwrap_or_else(|e| panic!("host header: {e}")),
            );
            path.to_owned()
        };
        let mut request = Request::post(uri)
            .body(Full::new(body))
            .unwrap_or_else(|e| panic!("request for {path}: {e}"));
        let target = request.headers_mut();
        target.extend(defaults);
        for (name, value) in &given {
            target.append(name, value.clone());
        }
        request
    }
}

/// A whole reply.
#[derive(Clone, Debug)]
pub struct RawReply {
    /// The HTTP status.
    pub http_status: u16,
    /// The response headers.
    pub headers: HeaderMap,
    /// The messages, in order.
    pub messages: Vec<Bytes>,
    /// The final status and trailing metadata: the trailer frame (gRPC-Web), the HTTP/2
    /// trailers (gRPC), or, for a Trailers-Only reply, a copy of the headers.
    pub trailers: HeaderMap,
    /// The status came in the response headers, with an empty body.
    pub trailers_only: bool,
    /// The body bytes after base64 decoding in text mode (raw for a non-200 reply).
    pub body: Bytes,
}

impl RawReply {
    /// `grpc-status`, if present and a number.
    pub fn grpc_status(&self) -> Option<i32> {
        parse_status(&self.trailers)
    }

    /// `grpc-message`, percent-decoded (empty when absent).
    pub fn grpc_message(&self) -> String {
        status_message(&self.trailers)
    }

    /// Asserts the call succeeded, with the status message in the panic when it did not.
    pub fn assert_ok(&self) {
        assert_eq!(
            self.grpc_status(),
            Some(0),
            "expected OK, got {:?} {:?}",
            self.grpc_status(),
            self.grpc_message()
        );
    }

    /// A trailer value decoded from base64 (for `-bin` metadata; padded or not).
    pub fn trailer_bin(&self, name: &str) -> Option<Vec<u8>> {
        decode_bin(self.trailers.get(name)?.as_bytes())
    }

    /// A header value decoded from base64 (for `-bin` metadata; padded or not).
    pub fn header_bin(&self, name: &str) -> Option<Vec<u8>> {
        decode_bin(self.headers.get(name)?.as_bytes())
    }
}

/// The value of a `-bin` header: base64, with or without padding (PROTOCOL-HTTP2.md).
pub fn decode_bin(value: &[u8]) -> Option<Vec<u8>> {
    let unpadded: &[u8] = match value.iter().position(|&b| b == b'=') {
        Some(at) => &value[..at],
        None => value,
    };
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(unpadded)
        .ok()
}

fn parse_status(trailers: &HeaderMap) -> Option<i32> {
    let value = trailers.get("grpc-status")?.to_str().ok()?;
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// `grpc-message` is percent-encoded UTF-8 (PROTOCOL-HTTP2.md "Responses").
fn status_message(trailers: &HeaderMap) -> String {
    trailers
        .get("grpc-message")
        .map(|value| percent_decode(value.as_bytes()))
        .unwrap_or_default()
}

/// Decodes `%XX` escapes; a `%` not followed by two hex digits stays as it is, as the spec asks
/// of clients. Invalid UTF-8 becomes U+FFFD.
pub fn percent_decode(input: &[u8]) -> String {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let escaped = match input.get(i..i + 3) {
            Some([b'%', hi, lo]) => hex(*hi).zip(hex(*lo)).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(input[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a gRPC-Web trailer block: HTTP/1-style `name: value` lines, each ended by CRLF
/// (PROTOCOL-WEB.md "Message framing"). Panics on anything else.
pub fn parse_trailer_block(block: &[u8]) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    let mut rest = block;
    while !rest.is_empty() {
        let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
            panic!(
                "trailer block line not ended by CRLF: {:?}",
                String::from_utf8_lossy(rest)
            );
        };
        let line = &rest[..end];
        rest = &rest[end + 2..];
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            panic!(
                "trailer block line without a colon: {:?}",
                String::from_utf8_lossy(line)
            );
        };
        let name = line[..colon].to_ascii_lowercase();
        let name = HeaderName::from_bytes(&name).unwrap_or_else(|e| {
            panic!(
                "trailer block name {:?}: {e}",
                String::from_utf8_lossy(&line[..colon])
            )
        });
        let value = line[colon + 1..].trim_ascii();
        let value = HeaderValue::from_bytes(value).unwrap_or_else(|e| {
            panic!(
                "trailer block value of {name}: {:?}: {e}",
                String::from_utf8_lossy(value)
            )
        });
        trailers.append(name, value);
    }
    trailers
}

/// Base64 text decoding that accepts padding at every 4-character boundary: a gRPC-Web-text
/// server encodes each flush on its own, so the body is a concatenation of padded base64
/// strings. Anything else (a bad character, padding inside a quantum, a body that does not end
/// on a 4-character boundary) panics.
#[derive(Debug, Default)]
pub struct TextDecoder {
    carry: Vec<u8>,
    consumed: usize,
}

impl TextDecoder {
    /// Decodes every complete 4-character quantum of `chunk` (after what was carried over) into
    /// `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut BytesMut) {
        self.carry.extend_from_slice(chunk);
        let whole = self.carry.len() / 4 * 4;
        for quantum in self.carry[..whole].chunks_exact(4) {
            let mut decoded = [0u8; 3];
            let n = STANDARD
                .decode_slice(quantum, &mut decoded)
                .unwrap_or_else(|e| {
                    panic!(
                        "text-mode body is not base64: quantum {:?} at character {}: {e}",
                        String::from_utf8_lossy(quantum),
                        self.consumed
                    )
                });
            out.extend_from_slice(&decoded[..n]);
            self.consumed += 4;
        }
        self.carry.drain(..whole);
    }

    /// Characters waiting for the rest of their quantum.
    pub fn pending(&self) -> usize {
        self.carry.len()
    }
}

/// One decoded frame.
enum Frame {
    Message(Bytes),
    Trailers(Bytes),
}

/// How a stream ended.
enum End {
    /// The final status and trailing metadata.
    Status(HeaderMap),
    /// No status, or a transport error.
    Error(String),
}

/// What keeps the connection of one call alive.
enum Connection {
    H1 {
        task: JoinHandle<()>,
        sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    },
    H2 {
        task: JoinHandle<()>,
        sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    },
}

/// One read from the response body.
enum Read {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    Error(String),
}

/// A call whose reply is read message by message.
pub struct RawStream {
    what: String,
    mode: Mode,
    read_timeout: Duration,
    http_status: u16,
    headers: HeaderMap,
    /// A non-200 reply: the body is not parsed, the status comes from the headers.
    lenient: bool,
    trailers_only: bool,
    body: Option<Incoming>,
    text: Option<TextDecoder>,
    /// Decoded bytes not yet taken as frames.
    pending: BytesMut,
    /// Every decoded body byte.
    body_bytes: BytesMut,
    end: Option<End>,
    connection: Connection,
}

impl fmt::Debug for RawStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawStream")
            .field("call", &self.what)
            .field("http_status", &self.http_status)
            .field("trailers_only", &self.trailers_only)
            .finish_non_exhaustive()
    }
}

impl RawStream {
    /// The response headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The HTTP status.
    pub fn http_status(&self) -> u16 {
        self.http_status
    }

    /// The status came in the response headers (so no message will follow).
    pub fn is_trailers_only(&self) -> bool {
        self.trailers_only
    }

    /// Next message (with the Instant it was decoded) or None when the trailers arrived / the
    /// stream ended.
    pub async fn next_message(&mut self) -> Option<(Bytes, Instant)> {
        loop {
            if self.end.is_some() {
                return None;
            }
            if !self.lenient {
                match self.take_frame() {
                    Some(Frame::Message(message)) => return Some((message, Instant::now())),
                    Some(Frame::Trailers(block)) => {
                        let trailers = parse_trailer_block(&block);
                        self.end = Some(self.expect_end_after_trailers(trailers).await);
                        return None;
                    }
                    None => {}
                }
            }
            match self.read().await {
                Read::Data(chunk) => self.on_data(chunk),
                Read::Trailers(trailers) => self.on_http_trailers(trailers),
                Read::End => self.on_body_end(),
                Read::Error(error) => {
                    self.end = Some(End::Error(format!("{}: {error}", self.what)));
                }
            }
        }
    }

    /// After next_message returned None: the final status (trailer frame, HTTP/2 trailers or
    /// trailers-only headers); Err(description) if the stream ended without any status or with a
    /// transport error. Messages not read yet are skipped.
    pub async fn finish(mut self) -> Result<(i32, String), String> {
        while self.next_message().await.is_some() {}
        match self.end.take() {
            Some(End::Status(trailers)) => match parse_status(&trailers) {
                Some(code) => Ok((code, status_message(&trailers))),
                None => Err(format!(
                    "{}: no valid grpc-status in the final metadata {trailers:?}",
                    self.what
                )),
            },
            Some(End::Error(error)) => Err(error),
            None => Err(format!("{}: stream did not end", self.what)),
        }
    }

    /// Like [`RawStream::finish`], but also returns the trailing metadata.
    pub async fn finish_with_trailers(mut self) -> Result<(i32, String, HeaderMap), String> {
        while self.next_message().await.is_some() {}
        match self.end.take() {
            Some(End::Status(trailers)) => match parse_status(&trailers) {
                Some(code) => Ok((code, status_message(&trailers), trailers)),
                None => Err(format!(
                    "{}: no valid grpc-status in the final metadata {trailers:?}",
                    self.what
                )),
            },
            Some(End::Error(error)) => Err(error),
            None => Err(format!("{}: stream did not end", self.what)),
        }
    }

    /// Drop the call mid-stream (client abort): resets the h2 stream / closes the h1
    /// connection.
    pub fn abort(mut self) {
        // Dropping the only reference to an HTTP/2 stream that is not closed makes h2 send
        // RST_STREAM(CANCEL); the connection stays up a while so that the reset, not a closed
        // connection, is what the proxy sees.
        drop(self.body.take());
        match self.connection {
            Connection::H1 { task, sender } => {
                task.abort();
                drop(sender);
            }
            Connection::H2 { task, sender } => {
                tokio::spawn(async move {
                    tokio::time::sleep(KEEP_CONNECTION_AFTER_ABORT).await;
                    drop(sender);
                    drop(task);
                });
            }
        }
    }

    /// Splits the next complete frame off the decoded bytes.
    fn take_frame(&mut self) -> Option<Frame> {
        if self.pending.len() < FRAME_HEADER_LEN {
            return None;
        }
        let flag = self.pending[0];
        let len = u32::from_be_bytes([
            self.pending[1],
            self.pending[2],
            self.pending[3],
            self.pending[4],
        ]) as usize;
        if self.pending.len() < FRAME_HEADER_LEN + len {
            return None;
        }
        let _header = self.pending.split_to(FRAME_HEADER_LEN);
        let payload = self.pending.split_to(len).freeze();
        match flag {
            FLAG_MESSAGE => Some(Frame::Message(payload)),
            FLAG_TRAILERS if self.mode.is_web() => {
                assert!(
                    self.pending.is_empty(),
                    "{}: {} bytes after the trailer frame in the same read: {:02x?}",
                    self.what,
                    self.pending.len(),
                    &self.pending[..self.pending.len().min(32)]
                );
                Some(Frame::Trailers(payload))
            }
            FLAG_TRAILERS => panic!("{}: trailer frame (0x80) in a native gRPC reply", self.what),
            f if f & FLAG_COMPRESSED != 0 => panic!(
                "{}: frame flag {f:#04x}: compressed, but no grpc-encoding was negotiated",
                self.what
            ),
            f => panic!("{}: unknown frame flag {f:#04x}", self.what),
        }
    }

    fn on_data(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        if self.lenient {
            self.body_bytes.extend_from_slice(&chunk);
            return;
        }
        let start = self.body_bytes.len();
        match self.text.as_mut() {
            Some(text) => text.push(&chunk, &mut self.body_bytes),
            None => self.body_bytes.extend_from_slice(&chunk),
        }
        let decoded = &self.body_bytes[start..];
        if self.trailers_only {
            let what = match decoded.first() {
                Some(&FLAG_TRAILERS) => "a trailer frame (0x80)",
                Some(_) => "body bytes",
                // Text carried over, not decoded yet: still body bytes.
                None => "base64 text",
            };
            panic!(
                "{}: {what} after a Trailers-Only response (grpc-status in the headers): {:02x?}",
                self.what,
                &decoded[..decoded.len().min(32)]
            );
        }
        self.pending.extend_from_slice(decoded);
    }

    fn on_http_trailers(&mut self, trailers: HeaderMap) {
        if self.lenient {
            self.end = Some(End::Status(self.headers.clone()));
            return;
        }
        assert!(
            !self.mode.is_web(),
            "{}: gRPC-Web reply carried HTTP trailers {trailers:?} (its status belongs in a 0x80 frame)",
            self.what
        );
        assert!(
            !self.trailers_only,
            "{}: HTTP trailers {trailers:?} after a Trailers-Only response",
            self.what
        );
        assert!(
            self.pending.is_empty(),
            "{}: trailers arrived inside a frame ({} bytes of it received)",
            self.what,
            self.pending.len()
        );
        self.end = Some(End::Status(trailers));
    }

    fn on_body_end(&mut self) {
        if self.lenient {
            self.end = Some(if self.trailers_only {
                End::Status(self.headers.clone())
            } else {
                End::Error(format!(
                    "{}: HTTP status {} without grpc-status",
                    self.what, self.http_status
                ))
            });
            return;
        }
        if let Some(text) = &self.text {
            assert_eq!(
                text.pending(),
                0,
                "{}: text-mode body does not end on a 4-character base64 boundary",
                self.what
            );
        }
        self.end = Some(if !self.pending.is_empty() {
            End::Error(format!(
                "{}: stream ended inside a frame ({} bytes of it received)",
                self.what,
                self.pending.len()
            ))
        } else if self.trailers_only {
            End::Status(self.headers.clone())
        } else {
            End::Error(format!("{}: stream ended without a status", self.what))
        });
    }

    /// After the trailer frame nothing may follow: the body must end (cleanly) right away.
    async fn expect_end_after_trailers(&mut self, trailers: HeaderMap) -> End {
        loop {
            let read = tokio::time::timeout(END_AFTER_TRAILERS, self.read_once()).await;
            match read {
                Err(_) => {
                    return End::Error(format!(
                        "{}: body did not end within {END_AFTER_TRAILERS:?} of the trailer frame",
                        self.what
                    ))
                }
                Ok(Read::Data(chunk)) if chunk.is_empty() => {}
                Ok(Read::Data(chunk)) => panic!(
                    "{}: {} bytes after the trailer frame: {:02x?}",
                    self.what,
                    chunk.len(),
                    &chunk[..chunk.len().min(32)]
                ),
                Ok(Read::Trailers(http_trailers)) => panic!(
                    "{}: HTTP trailers {http_trailers:?} after the gRPC-Web trailer frame",
                    self.what
                ),
                Ok(Read::End) => {
                    if let Some(text) = &self.text {
                        assert_eq!(
                            text.pending(),
                            0,
                            "{}: base64 text left after the trailer frame",
                            self.what
                        );
                    }
                    return End::Status(trailers);
                }
                Ok(Read::Error(error)) => {
                    return End::Error(format!(
                        "{}: transport error after the trailer frame: {error}",
                        self.what
                    ))
                }
            }
        }
    }

    async fn read(&mut self) -> Read {
        match tokio::time::timeout(self.read_timeout, self.read_once()).await {
            Ok(read) => read,
            Err(_) => Read::Error(format!("no response bytes for {:?}", self.read_timeout)),
        }
    }

    async fn read_once(&mut self) -> Read {
        let Some(body) = self.body.as_mut() else {
            return Read::End;
        };
        match body.frame().await {
            None => {
                self.body = None;
                Read::End
            }
            Some(Err(e)) => {
                self.body = None;
                Read::Error(format!("transport error: {e}"))
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => Read::Data(data),
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => Read::Trailers(trailers),
                    Err(_) => Read::Data(Bytes::new()),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    //! The checker must be able to fail: misbehaving servers, one per rule.

    use std::convert::Infallible;

    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    use super::*;

    /// A gRPC-Web server on HTTP/1.1 that answers one connection's requests with `headers` and
    /// `body`, whatever was asked.
    async fn serve(headers: &'static [(&'static str, &'static str)], body: Bytes) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let service = service_fn(move |_request| {
                let mut response = http::Response::new(Full::new(body.clone()));
                for (name, value) in headers {
                    response.headers_mut().insert(
                        HeaderName::from_static(name),
                        HeaderValue::from_static(value),
                    );
                }
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
        addr
    }

    const WEB: &[(&str, &str)] = &[("content-type", "application/grpc-web+proto")];
    const WEB_TEXT: &[(&str, &str)] = &[("content-type", "application/grpc-web-text+proto")];
    const WEB_TRAILERS_ONLY: &[(&str, &str)] = &[
        ("content-type", "application/grpc-web+proto"),
        ("grpc-status", "0"),
    ];

    fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = frame_header(flag, payload.len()).to_vec();
        out.extend_from_slice(payload);
        out
    }

    fn body(frames: &[Vec<u8>]) -> Bytes {
        Bytes::from(frames.concat())
    }

    async fn call(mode: Mode, headers: &'static [(&str, &str)], reply: Bytes) -> RawReply {
        let addr = serve(headers, reply).await;
        RawClient::new(addr, mode)
            .call("/a.B/C", &[], &[b"hi"])
            .await
    }

    #[tokio::test]
    async fn well_formed_reply_is_parsed() {
        let reply = call(
            Mode::WebBinaryH1,
            WEB,
            body(&[
                frame(FLAG_MESSAGE, b"one"),
                frame(FLAG_MESSAGE, b""),
                frame(
                    FLAG_TRAILERS,
                    b"grpc-status:3\r\ngrpc-message: bad%20arg%F0%9F%98%88\r\nx-a-bin: q6ur\r\n",
                ),
            ]),
        )
        .await;
        assert_eq!(reply.messages, [Bytes::from_static(b"one"), Bytes::new()]);
        assert_eq!(reply.grpc_status(), Some(3));
        assert_eq!(reply.grpc_message(), "bad arg\u{1F608}");
        assert_eq!(reply.trailer_bin("x-a-bin"), Some(vec![0xab; 3]));
        assert!(!reply.trailers_only);
    }

    #[tokio::test]
    async fn text_reply_padded_per_frame_is_accepted() {
        let text = [
            STANDARD.encode(frame(FLAG_MESSAGE, b"x")),
            STANDARD.encode(frame(FLAG_MESSAGE, b"yz")),
            STANDARD.encode(frame(FLAG_TRAILERS, b"grpc-status:0\r\n")),
        ]
        .concat();
        assert!(text.contains('='), "the test needs padding inside: {text}");
        let reply = call(Mode::WebTextH1, WEB_TEXT, Bytes::from(text)).await;
        reply.assert_ok();
        assert_eq!(
            reply.messages,
            [Bytes::from_static(b"x"), Bytes::from_static(b"yz")]
        );
    }

    #[tokio::test]
    async fn trailers_only_reply_is_parsed() {
        let reply = call(Mode::WebBinaryH1, WEB_TRAILERS_ONLY, Bytes::new()).await;
        assert!(reply.trailers_only);
        reply.assert_ok();
        assert!(reply.messages.is_empty());
    }

    #[tokio::test]
    #[should_panic(expected = "bytes after the trailer frame")]
    async fn trailer_frame_not_last_fails() {
        call(
            Mode::WebBinaryH1,
            WEB,
            body(&[
                frame(FLAG_TRAILERS, b"grpc-status:0\r\n"),
                frame(FLAG_MESSAGE, b"late"),
            ]),
        )
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "trailer frame (0x80) after a Trailers-Only response")]
    async fn trailer_frame_after_trailers_only_fails() {
        call(
            Mode::WebBinaryH1,
            WEB_TRAILERS_ONLY,
            body(&[frame(FLAG_TRAILERS, b"")]),
        )
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "not base64")]
    async fn invalid_base64_fails() {
        call(Mode::WebTextH1, WEB_TEXT, Bytes::from_static(b"AAAA*AAA")).await;
    }

    #[tokio::test]
    #[should_panic(expected = "base64 text left after the trailer frame")]
    async fn truncated_base64_fails() {
        let mut text = STANDARD.encode(frame(FLAG_TRAILERS, b"grpc-status:0\r\n"));
        text.push_str("AB");
        call(Mode::WebTextH1, WEB_TEXT, Bytes::from(text)).await;
    }

    #[tokio::test]
    #[should_panic(expected = "ended without a status")]
    async fn missing_status_fails_a_call() {
        call(Mode::WebBinaryH1, WEB, body(&[frame(FLAG_MESSAGE, b"m")])).await;
    }

    #[tokio::test]
    async fn missing_status_is_an_error_of_finish() {
        let addr = serve(WEB, body(&[frame(FLAG_MESSAGE, b"m")])).await;
        let mut stream = RawClient::new(addr, Mode::WebBinaryH1)
            .start("/a.B/C", &[], &[])
            .await;
        assert_eq!(
            stream.next_message().await.map(|m| m.0),
            Some(Bytes::from_static(b"m"))
        );
        assert!(stream.next_message().await.is_none());
        let error = stream.finish().await.expect_err("no status");
        assert!(error.contains("without a status"), "{error}");
    }

    #[tokio::test]
    #[should_panic(expected = "no valid grpc-status")]
    async fn trailer_block_without_status_fails() {
        let addr = serve(WEB, body(&[frame(FLAG_TRAILERS, b"x-other:1\r\n")])).await;
        let stream = RawClient::new(addr, Mode::WebBinaryH1)
            .start("/a.B/C", &[], &[])
            .await;
        let error = stream.finish().await.expect_err("no status");
        panic!("{error}");
    }

    #[tokio::test]
    #[should_panic(expected = "expected application/grpc-web-text")]
    async fn binary_reply_to_text_request_fails() {
        call(
            Mode::WebTextH1,
            WEB,
            Bytes::from(STANDARD.encode(frame(FLAG_TRAILERS, b"grpc-status:0\r\n"))),
        )
        .await;
    }

    #[test]
    #[should_panic(expected = "not ended by CRLF")]
    fn trailer_line_without_crlf_fails() {
        parse_trailer_block(b"grpc-status:0");
    }

    #[test]
    fn percent_decoding_keeps_stray_percent_signs() {
        assert_eq!(percent_decode(b"100%"), "100%");
        assert_eq!(percent_decode(b"%zz%41"), "%zzA");
        assert_eq!(percent_decode(b"%E2%98%BA"), "\u{263A}");
    }
}
