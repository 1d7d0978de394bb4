//! Bad and unusual input at the proxy's front door (DESIGN.md "Failure semantics": bad input
//! gets a clear status, never a panic): malformed frames, bad base64, oversized messages,
//! bad `grpc-timeout`, wrong content types and methods; and the browser features around it:
//! CORS, the `$httpHeaders` query parameter, `Accept` negotiation of text replies.
//!
//! Calls go through the strict raw client where it fits; tests that need control over the
//! method, the headers or the connection (reuse after an error, a request body left open) use
//! [`Conn`], a plain hyper connection kept across requests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pnp_config::AllowedOrigins;
use pnp_demo::pb::grpc_testing::{Payload, SimpleRequest, SimpleResponse};
use pnp_interop_tests::faults::{Fault, FaultyUpstream};
use pnp_interop_tests::raw::{encode_frames, frame_header, parse_trailer_block, TextDecoder};
use pnp_interop_tests::{Mode, RawClient, RawReply, Stack};
use prost::Message as _;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const UNARY: &str = "/grpc.testing.TestService/UnaryCall";
const EMPTY: &str = "/grpc.testing.TestService/EmptyCall";

const OK: i32 = 0;
const UNIMPLEMENTED: i32 = 12;
const RESOURCE_EXHAUSTED: i32 = 8;
const INTERNAL: i32 = 13;

/// Longest a single exchange may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(10);

/// A header that claims a 100 MB message.
const HUGE_FRAME_HEADER: [u8; 5] = [0x00, 0x06, 0x40, 0x00, 0x00];

const ORIGIN: &str = "https://app.example";
const OTHER_ORIGIN: &str = "https://elsewhere.example";

fn unary_request(request_payload: usize, response_size: i32) -> Vec<u8> {
    SimpleRequest {
        response_size,
        payload: Some(Payload {
            body: vec![1; request_payload],
            ..Payload::default()
        }),
        ..SimpleRequest::default()
    }
    .encode_to_vec()
}

/// The body as the mode sends it: as given in binary modes, base64 in text modes.
fn in_mode(mode: Mode, body: &[u8]) -> Bytes {
    if mode.is_text() {
        Bytes::from(STANDARD.encode(body))
    } else {
        Bytes::copy_from_slice(body)
    }
}

/// The final status of a reply, with the reply printed when it has none.
fn status(mode: Mode, reply: &RawReply) -> (i32, String) {
    let code = reply
        .grpc_status()
        .unwrap_or_else(|| panic!("{mode}: reply without grpc-status: {reply:?}"));
    (code, reply.grpc_message())
}

async fn raw_call(
    proxy: SocketAddr,
    mode: Mode,
    headers: &[(&str, &str)],
    body: Bytes,
) -> RawReply {
    tokio::time::timeout(
        HANG,
        RawClient::new(proxy, mode).call_raw_body(UNARY, headers, body),
    )
    .await
    .unwrap_or_else(|_| panic!("{mode}: no reply within {HANG:?}"))
}

// ---------------------------------------------------------------------------------------------
// A plain HTTP connection, kept across requests.

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// One client connection to the proxy (HTTP/1.1, or HTTP/2 with prior knowledge) that sends
/// any method, path, headers and body, and reads whole responses.
struct Conn {
    addr: SocketAddr,
    sender: Sender,
    task: JoinHandle<()>,
}

/// A whole response.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Conn {
    async fn open(addr: SocketAddr, http2: bool) -> Conn {
        let tcp = TcpStream::connect(addr)
            .await
            .expect("connecting to the proxy");
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        let io = TokioIo::new(tcp);
        if http2 {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("HTTP/2 handshake");
            let task = tokio::spawn(async move {
                let _ = connection.await;
            });
            Conn {
                addr,
                sender: Sender::H2(sender),
                task,
            }
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("HTTP/1.1 handshake");
            let task = tokio::spawn(async move {
                let _ = connection.await;
            });
            Conn {
                addr,
                sender: Sender::H1(sender),
                task,
            }
        }
    }

    fn protocol(&self) -> &'static str {
        match self.sender {
            Sender::H1(_) => "HTTP/1.1",
            Sender::H2(_) => "HTTP/2",
        }
    }

    /// Sends one request on this connection and reads the whole response. Panics if the
    /// connection was closed or the exchange takes longer than [`HANG`].
    async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Answer {
        let what = format!("{} {method} {path}", self.protocol());
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        for (name, value) in headers {
            request.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        let exchange = async {
            let response = match &mut self.sender {
                Sender::H1(sender) => {
                    *request.uri_mut() = path.parse().expect("path");
                    request.headers_mut().insert(
                        http::header::HOST,
                        HeaderValue::from_str(&self.addr.to_string()).expect("host"),
                    );
                    sender.ready().await.unwrap_or_else(|e| {
                        panic!("{what}: the connection cannot take another request: {e}")
                    });
                    sender.send_request(request).await
                }
                Sender::H2(sender) => {
                    *request.uri_mut() =
                        format!("http://{}{path}", self.addr).parse().expect("uri");
                    sender.ready().await.unwrap_or_else(|e| {
                        panic!("{what}: the connection cannot take another request: {e}")
                    });
                    sender.send_request(request).await
                }
            };
            let response = response.unwrap_or_else(|e| panic!("{what}: no response: {e}"));
            read_answer(response)
                .await
                .unwrap_or_else(|e| panic!("{what}: reading the response: {e}"))
        };
        tokio::time::timeout(HANG, exchange)
            .await
            .unwrap_or_else(|_| panic!("{what}: no complete response within {HANG:?}"))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_answer(response: Response<Incoming>) -> Result<Answer, hyper::Error> {
    let (parts, body) = response.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The gRPC status wherever it came: Trailers-Only headers, HTTP/2 trailers, or the
    /// gRPC-Web trailer frame (after base64 in text mode).
    fn grpc_status(&self) -> Option<i32> {
        self.final_metadata()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }

    fn final_metadata(&self) -> HeaderMap {
        if self.headers.contains_key("grpc-status") {
            return self.headers.clone();
        }
        if let Some(trailers) = &self.trailers {
            return trailers.clone();
        }
        self.frames()
            .into_iter()
            .find(|(flag, _)| flag & 0x80 != 0)
            .map(|(_, block)| parse_trailer_block(&block))
            .unwrap_or_default()
    }

    /// The body decoded from base64 when the reply is text.
    fn decoded_body(&self) -> Bytes {
        let text = self
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("application/grpc-web-text"));
        if !text {
            return self.body.clone();
        }
        let mut out = BytesMut::new();
        let mut decoder = TextDecoder::default();
        decoder.push(&self.body, &mut out);
        assert_eq!(decoder.pending(), 0, "text reply not on a base64 boundary");
        out.freeze()
    }

    /// The frames of the body: (flag, payload).
    fn frames(&self) -> Vec<(u8, Bytes)> {
        let mut body = self.decoded_body();
        let mut frames = Vec::new();
        while body.len() >= 5 {
            let flag = body[0];
            let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
            assert!(body.len() >= 5 + len, "reply body ends inside a frame");
            let frame = body.split_to(5 + len);
            frames.push((flag, frame.slice(5..)));
        }
        assert!(body.is_empty(), "reply body ends inside a frame header");
        frames
    }

    fn messages(&self) -> Vec<Bytes> {
        self.frames()
            .into_iter()
            .filter(|(flag, _)| flag & 0x80 == 0)
            .map(|(_, payload)| payload)
            .collect()
    }
}

/// Headers of a gRPC-Web binary call from a browser script.
fn web_headers() -> Vec<(&'static str, &'static str)> {
    vec![
        ("content-type", "application/grpc-web+proto"),
        ("x-grpc-web", "1"),
    ]
}

/// A good call on `conn` succeeds: the connection is still usable.
async fn assert_conn_still_serves(conn: &mut Conn, after: &str) {
    let answer = conn
        .send(
            Method::POST,
            UNARY,
            &web_headers(),
            encode_frames(&[&unary_request(4, 8)]),
        )
        .await;
    assert_eq!(
        answer.grpc_status(),
        Some(OK),
        "{}: a good call after {after} failed: {answer:?}",
        conn.protocol()
    );
    assert_eq!(
        answer.messages().len(),
        1,
        "{}: after {after}",
        conn.protocol()
    );
}

// ---------------------------------------------------------------------------------------------
// Malformed frames.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_frame_flags_are_internal_naming_the_flags() {
    let stack = Stack::start().await;
    // 0x02 is no flag at all; 0x80 (the gRPC-Web trailer frame) belongs to responses only.
    let cases: [(&str, &[u8]); 2] = [
        ("flags 0x02", &[0x02, 0, 0, 0, 1, 0]),
        (
            "trailer frame 0x80",
            b"\x80\x00\x00\x00\x0fgrpc-status:0\r\n",
        ),
    ];
    for mode in Mode::ALL {
        for (case, body) in cases {
            let reply = raw_call(stack.proxy_addr(), mode, &[], in_mode(mode, body)).await;
            let (code, message) = status(mode, &reply);
            assert_eq!(code, INTERNAL, "{mode} {case}: {message:?}");
            let lower = message.to_ascii_lowercase();
            assert!(
                lower.contains("flag") || lower.contains("trailer"),
                "{mode} {case}: the message does not name the problem: {message:?}"
            );
        }
    }
    assert_eq!(
        stack.stats().calls_started(),
        0,
        "a malformed request reached a handler"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_request_frame_is_internal() {
    let stack = Stack::start().await;
    let mut body = frame_header(0, 100).to_vec();
    body.extend_from_slice(&[0; 10]);
    for mode in Mode::ALL {
        let reply = raw_call(stack.proxy_addr(), mode, &[], in_mode(mode, &body)).await;
        let (code, message) = status(mode, &reply);
        assert_eq!(code, INTERNAL, "{mode}: truncated frame: {message:?}");
        assert!(reply.messages.is_empty(), "{mode}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_base64_in_text_mode_is_internal() {
    let stack = Stack::start().await;
    for mode in [Mode::WebTextH1, Mode::WebTextH2] {
        let reply = raw_call(stack.proxy_addr(), mode, &[], Bytes::from_static(b"!!!!")).await;
        let (code, message) = status(mode, &reply);
        assert_eq!(code, INTERNAL, "{mode}: bad base64: {message:?}");
        assert!(
            message.to_ascii_lowercase().contains("base64"),
            "{mode}: the message does not name the problem: {message:?}"
        );
    }
    assert_eq!(
        stack.stats().calls_started(),
        0,
        "bad base64 reached a handler"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_header_is_refused_from_the_header_alone() {
    let stack = Stack::start().await;
    // Only the header is sent and the body then ends. Checked from the header, this is
    // RESOURCE_EXHAUSTED; a proxy that waited for the bytes would see a truncated frame.
    for mode in Mode::ALL {
        let reply = raw_call(
            stack.proxy_addr(),
            mode,
            &[],
            in_mode(mode, &HUGE_FRAME_HEADER),
        )
        .await;
        let (code, message) = status(mode, &reply);
        assert_eq!(
            code, RESOURCE_EXHAUSTED,
            "{mode}: 100 MB frame header: {message:?}"
        );
    }
}

/// A request whose body stays open after the given bytes: returns the response, which must
/// come while the client still has not finished sending.
async fn send_with_open_body(addr: SocketAddr, http2: bool, first: Bytes) -> Answer {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tx.send(first).await.expect("queue the first bytes");
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    let body = StreamBody::new(chunks.boxed());
    let mut request = Request::new(body);
    *request.method_mut() = Method::POST;
    for (name, value) in web_headers() {
        request
            .headers_mut()
            .insert(name, HeaderValue::from_static(value));
    }
    let tcp = TcpStream::connect(addr).await.expect("connecting");
    let io = TokioIo::new(tcp);
    let response = if http2 {
        *request.uri_mut() = format!("http://{addr}{UNARY}").parse().expect("uri");
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        tokio::time::timeout(Duration::from_secs(3), sender.send_request(request)).await
    } else {
        *request.uri_mut() = UNARY.parse().expect("uri");
        request.headers_mut().insert(
            http::header::HOST,
            HeaderValue::from_str(&addr.to_string()).expect("host"),
        );
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(connection);
        tokio::time::timeout(Duration::from_secs(3), sender.send_request(request)).await
    };
    let response = response
        .expect("no response within 3 s while the request body was still open: the size is not checked from the frame header")
        .expect("response");
    let answer = tokio::time::timeout(Duration::from_secs(3), read_answer(response))
        .await
        .expect("the response did not end while the request body was still open")
        .expect("reading the response");
    // Only now may the request body end: the whole answer came while it was open.
    drop(tx);
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_is_refused_before_the_rest_of_the_body_is_sent() {
    let stack = Stack::start().await;
    for http2 in [false, true] {
        let started = Instant::now();
        let answer = send_with_open_body(
            stack.proxy_addr(),
            http2,
            Bytes::from_static(&HUGE_FRAME_HEADER),
        )
        .await;
        assert_eq!(
            answer.grpc_status(),
            Some(RESOURCE_EXHAUSTED),
            "http2={http2}: {answer:?}"
        );
        println!("http2={http2}: refused after {:?}", started.elapsed());
    }
    assert_eq!(
        stack.stats().calls_started(),
        0,
        "an oversized request reached a handler"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_message_limit_applies_to_requests_and_responses() {
    let stack = Stack::start_with(|cfg| cfg.limits.max_message_size = 1024).await;
    for mode in Mode::ALL {
        let client = RawClient::new(stack.proxy_addr(), mode);

        let small = client.call(UNARY, &[], &[&unary_request(256, 256)]).await;
        small.assert_ok();

        let big_request = client.call(UNARY, &[], &[&unary_request(2048, 8)]).await;
        let (code, message) = status(mode, &big_request);
        assert_eq!(
            code, RESOURCE_EXHAUSTED,
            "{mode}: 2 KiB request, 1 KiB limit: {message:?}"
        );

        let big_response = client.call(UNARY, &[], &[&unary_request(8, 2048)]).await;
        let (code, message) = status(mode, &big_response);
        assert_eq!(
            code, RESOURCE_EXHAUSTED,
            "{mode}: 2 KiB response, 1 KiB limit: {message:?}"
        );
        assert!(
            big_response.messages.is_empty(),
            "{mode}: the oversized response was delivered"
        );
    }
}

/// A request the proxy must refuse.
struct BadRequest {
    what: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: Bytes,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_keeps_serving_after_bad_requests() {
    let stack = Stack::start().await;
    let mut truncated = frame_header(0, 100).to_vec();
    truncated.extend_from_slice(&[0; 10]);
    let mut with_bad_timeout = web_headers();
    with_bad_timeout.push(("grpc-timeout", "1x"));
    let cases = [
        BadRequest {
            what: "invalid flags",
            headers: web_headers(),
            body: Bytes::from_static(&[0x02, 0, 0, 0, 1, 0]),
        },
        BadRequest {
            what: "a truncated frame",
            headers: web_headers(),
            body: Bytes::from(truncated),
        },
        BadRequest {
            what: "a 100 MB frame header",
            headers: web_headers(),
            body: Bytes::from_static(&HUGE_FRAME_HEADER),
        },
        BadRequest {
            what: "a bad grpc-timeout",
            headers: with_bad_timeout,
            body: encode_frames(&[&unary_request(4, 8)]),
        },
        BadRequest {
            what: "an unsupported content type",
            headers: vec![("content-type", "application/json")],
            body: Bytes::from_static(b"{}"),
        },
    ];
    for http2 in [false, true] {
        let mut conn = Conn::open(stack.proxy_addr(), http2).await;
        assert_conn_still_serves(&mut conn, "nothing").await;
        for case in &cases {
            let answer = conn
                .send(Method::POST, UNARY, &case.headers, case.body.clone())
                .await;
            assert!(
                answer.grpc_status().is_some_and(|code| code != OK),
                "{}: {} did not fail with a status: {answer:?}",
                conn.protocol(),
                case.what
            );
            assert_conn_still_serves(&mut conn, case.what).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Headers, methods, content types.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grpc_timeout_values_are_internal_naming_the_header() {
    let stack = Stack::start().await;
    for mode in Mode::ALL {
        for value in ["1x", "123456789S", ""] {
            let reply = raw_call(
                stack.proxy_addr(),
                mode,
                &[("grpc-timeout", value)],
                in_mode(mode, &encode_frames(&[&unary_request(4, 8)])),
            )
            .await;
            let (code, message) = status(mode, &reply);
            assert_eq!(code, INTERNAL, "{mode} grpc-timeout {value:?}: {message:?}");
            assert!(
                message.contains("grpc-timeout"),
                "{mode} grpc-timeout {value:?}: the message does not name the header: {message:?}"
            );
        }
    }
    assert_eq!(
        stack.stats().calls_started(),
        0,
        "a call with a bad deadline reached a handler"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_content_type_is_415() {
    let stack = Stack::start().await;
    for http2 in [false, true] {
        let mut conn = Conn::open(stack.proxy_addr(), http2).await;
        let answer = conn
            .send(
                Method::POST,
                UNARY,
                &[("content-type", "application/json")],
                Bytes::from_static(b"{\"responseSize\": 8}"),
            )
            .await;
        assert_eq!(
            answer.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{}: {answer:?}",
            conn.protocol()
        );
    }
    assert_eq!(stack.stats().calls_started(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_is_405_with_allow() {
    let stack = Stack::start().await;
    for http2 in [false, true] {
        let mut conn = Conn::open(stack.proxy_addr(), http2).await;
        let answer = conn.send(Method::GET, UNARY, &[], Bytes::new()).await;
        assert_eq!(
            answer.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{}: {answer:?}",
            conn.protocol()
        );
        let allow = answer
            .header("allow")
            .unwrap_or_default()
            .to_ascii_uppercase();
        assert!(
            allow.split(',').any(|m| m.trim() == "POST"),
            "{}: allow header {allow:?}",
            conn.protocol()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_grpc_over_http1_is_refused_with_a_clear_status() {
    let stack = Stack::start().await;
    let started = Instant::now();
    let reply = raw_call(
        stack.proxy_addr(),
        Mode::WebBinaryH1,
        &[("content-type", "application/grpc"), ("te", "trailers")],
        encode_frames(&[&unary_request(4, 8)]),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the refusal took {:?}",
        started.elapsed()
    );
    assert!(
        (400..500).contains(&reply.http_status),
        "native gRPC over HTTP/1.1 got HTTP {}: {reply:?}",
        reply.http_status
    );
    let (code, message) = status(Mode::WebBinaryH1, &reply);
    assert_ne!(code, OK);
    assert!(
        message.contains("HTTP/2"),
        "the message does not say what is needed: {message:?}"
    );
    assert_eq!(stack.stats().calls_started(), 0);
}

// ---------------------------------------------------------------------------------------------
// CORS.

fn comma_list(answer: &Answer, name: &str) -> Vec<String> {
    answer
        .headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|item| item.trim().to_ascii_lowercase())
        .filter(|item| !item.is_empty())
        .collect()
}

fn assert_exposes_status(answer: &Answer, what: &str) {
    let exposed = comma_list(answer, "access-control-expose-headers");
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(
            exposed.iter().any(|e| e == name),
            "{what}: access-control-expose-headers {exposed:?} lacks {name}"
        );
    }
}

async fn preflight(conn: &mut Conn, origin: &str) -> Answer {
    conn.send(
        Method::OPTIONS,
        UNARY,
        &[
            ("origin", origin),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "x-grpc-web,content-type,x-custom",
            ),
        ],
        Bytes::new(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_allows_the_origin_methods_and_headers() {
    let stack = Stack::start().await;
    for http2 in [false, true] {
        let mut conn = Conn::open(stack.proxy_addr(), http2).await;
        let answer = preflight(&mut conn, ORIGIN).await;
        let what = conn.protocol();
        assert!(answer.status.is_success(), "{what}: preflight {answer:?}");
        assert_eq!(
            answer.header("access-control-allow-origin"),
            Some(ORIGIN),
            "{what}"
        );
        // Any origin (the default) is allowed without credentials.
        assert_eq!(
            answer.header("access-control-allow-credentials"),
            None,
            "{what}"
        );
        let methods: Vec<String> = comma_list(&answer, "access-control-allow-methods")
            .into_iter()
            .map(|m| m.to_ascii_uppercase())
            .collect();
        for method in ["POST", "OPTIONS"] {
            assert!(
                methods.iter().any(|m| m == method),
                "{what}: allow-methods {methods:?} lacks {method}"
            );
        }
        let allowed = comma_list(&answer, "access-control-allow-headers");
        for name in ["x-grpc-web", "content-type", "x-custom"] {
            assert!(
                allowed.iter().any(|h| h == name),
                "{what}: allow-headers {allowed:?} lacks {name}"
            );
        }
    }
    assert_eq!(
        stack.stats().calls_started(),
        0,
        "a preflight reached a handler"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_headers_on_calls_and_on_errors_the_proxy_makes() {
    // A listed origin, so the replies also allow credentials.
    let stack = Stack::start_with(|cfg| {
        cfg.cors.allowed_origins = AllowedOrigins::List(vec![ORIGIN.to_owned()]);
    })
    .await;
    let mut conn = Conn::open(stack.proxy_addr(), false).await;
    let mut headers = web_headers();
    headers.push(("origin", ORIGIN));

    let ok = conn
        .send(Method::POST, EMPTY, &headers, encode_frames(&[b""]))
        .await;
    let mut bad_timeout = headers.clone();
    bad_timeout.push(("grpc-timeout", "1x"));
    let bad_timeout = conn
        .send(Method::POST, EMPTY, &bad_timeout, encode_frames(&[b""]))
        .await;
    let unknown_method = conn
        .send(
            Method::POST,
            "/grpc.testing.TestService/NoSuchMethod",
            &headers,
            encode_frames(&[b""]),
        )
        .await;
    let unsupported = conn
        .send(
            Method::POST,
            EMPTY,
            &[("content-type", "application/json"), ("origin", ORIGIN)],
            Bytes::from_static(b"{}"),
        )
        .await;

    assert_eq!(ok.grpc_status(), Some(OK), "{ok:?}");
    assert_eq!(bad_timeout.grpc_status(), Some(INTERNAL), "{bad_timeout:?}");
    assert_eq!(
        unknown_method.grpc_status(),
        Some(UNIMPLEMENTED),
        "{unknown_method:?}"
    );
    assert_eq!(
        unsupported.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{unsupported:?}"
    );
    for (what, answer) in [
        ("a successful call", &ok),
        ("a bad grpc-timeout", &bad_timeout),
        ("an unknown method", &unknown_method),
        ("an unsupported content type", &unsupported),
    ] {
        assert_eq!(
            answer.header("access-control-allow-origin"),
            Some(ORIGIN),
            "{what}: {answer:?}"
        );
        assert_eq!(
            answer.header("access-control-allow-credentials"),
            Some("true"),
            "{what}"
        );
        assert_exposes_status(answer, what);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_origin_list_refuses_other_origins() {
    let stack = Stack::start_with(|cfg| {
        cfg.cors.allowed_origins = AllowedOrigins::List(vec![ORIGIN.to_owned()]);
    })
    .await;
    let mut conn = Conn::open(stack.proxy_addr(), false).await;

    let allowed = preflight(&mut conn, ORIGIN).await;
    assert_eq!(allowed.header("access-control-allow-origin"), Some(ORIGIN));
    let refused = preflight(&mut conn, OTHER_ORIGIN).await;
    assert_eq!(
        refused.header("access-control-allow-origin"),
        None,
        "preflight from an origin not on the list: {refused:?}"
    );

    let mut headers = web_headers();
    headers.push(("origin", OTHER_ORIGIN));
    let call = conn
        .send(Method::POST, EMPTY, &headers, encode_frames(&[b""]))
        .await;
    assert_eq!(
        call.header("access-control-allow-origin"),
        None,
        "call from an origin not on the list: {call:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_configured_expose_headers_are_exposed() {
    let stack = Stack::start_with(|cfg| {
        cfg.cors.expose_headers = vec![
            "x-request-id".to_owned(),
            "x-grpc-test-echo-initial".to_owned(),
        ];
    })
    .await;
    let mut conn = Conn::open(stack.proxy_addr(), false).await;
    let mut headers = web_headers();
    headers.push(("origin", ORIGIN));
    headers.push(("x-grpc-test-echo-initial", "visible"));
    let answer = conn
        .send(Method::POST, EMPTY, &headers, encode_frames(&[b""]))
        .await;
    assert_eq!(answer.grpc_status(), Some(OK), "{answer:?}");
    assert_eq!(answer.header("x-grpc-test-echo-initial"), Some("visible"));
    let exposed = comma_list(&answer, "access-control-expose-headers");
    for name in ["x-request-id", "x-grpc-test-echo-initial"] {
        assert!(
            exposed.iter().any(|e| e == name),
            "expose-headers {exposed:?} lacks the configured {name}"
        );
    }
    assert_exposes_status(&answer, "with configured expose headers");
}

// ---------------------------------------------------------------------------------------------
// $httpHeaders and Accept.

fn http_headers_query(block: &str) -> String {
    let encoded = percent_encoding::utf8_percent_encode(block, percent_encoding::NON_ALPHANUMERIC);
    format!("$httpHeaders={encoded}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_headers_query_parameter_replaces_headers() {
    let stack = Stack::start().await;
    let query = http_headers_query(
        "content-type:application/grpc-web-text\r\nx-grpc-test-echo-initial:hello\r\n",
    );
    let path = format!("{UNARY}?{query}");
    let body = Bytes::from(STANDARD.encode(encode_frames(&[&unary_request(4, 8)])));
    for http2 in [false, true] {
        let mut conn = Conn::open(stack.proxy_addr(), http2).await;
        let what = conn.protocol();
        // What a browser sends to avoid a preflight: a "simple" request.
        let answer = conn
            .send(
                Method::POST,
                &path,
                &[("content-type", "text/plain"), ("origin", ORIGIN)],
                body.clone(),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{what}: {answer:?}");
        assert!(
            answer
                .header("content-type")
                .is_some_and(|ct| ct.starts_with("application/grpc-web-text")),
            "{what}: reply content-type {:?}",
            answer.header("content-type")
        );
        assert_eq!(answer.grpc_status(), Some(OK), "{what}: {answer:?}");
        assert_eq!(
            answer.header("x-grpc-test-echo-initial"),
            Some("hello"),
            "{what}: the header from $httpHeaders did not reach the upstream"
        );
        let messages = answer.messages();
        assert_eq!(messages.len(), 1, "{what}");
        let response = SimpleResponse::decode(messages[0].clone()).expect("SimpleResponse");
        assert_eq!(response.payload.map(|p| p.body.len()), Some(8), "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_headers_query_is_not_forwarded_upstream() {
    let upstream = FaultyUpstream::start(Fault::TrailersOnly {
        code: 0,
        message: "seen",
        metadata: Vec::new(),
    })
    .await
    .expect("fault upstream");
    let proxy = Stack::proxy_for(upstream.url(), |_| {}).await;
    let query = http_headers_query("content-type:application/grpc-web-text\r\n");
    let mut conn = Conn::open(proxy.local_addr(), false).await;
    let answer = conn
        .send(
            Method::POST,
            &format!("{UNARY}?{query}&other=1"),
            &[("content-type", "text/plain")],
            Bytes::from(STANDARD.encode(encode_frames(&[&unary_request(4, 8)]))),
        )
        .await;
    assert_eq!(answer.grpc_status(), Some(OK), "{answer:?}");
    assert_eq!(upstream.paths(), [UNARY], "the upstream saw another path");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_asks_for_a_text_reply_to_a_binary_request() {
    let stack = Stack::start().await;
    let body = encode_frames(&[&unary_request(4, 8)]);
    for accept in [
        "application/grpc-web-text",
        "application/json, application/GRPC-WEB-TEXT+proto;q=0.9",
    ] {
        // The raw client in a text mode checks the reply is application/grpc-web-text and
        // decodes it strictly; the request itself is binary.
        for mode in [Mode::WebTextH1, Mode::WebTextH2] {
            let reply = raw_call(
                stack.proxy_addr(),
                mode,
                &[
                    ("content-type", "application/grpc-web+proto"),
                    ("accept", accept),
                ],
                body.clone(),
            )
            .await;
            reply.assert_ok();
            assert_eq!(reply.messages.len(), 1, "{mode} Accept {accept:?}");
        }
    }
    // Without Accept the binary request gets a binary reply (the raw client checks the
    // content type).
    for mode in [Mode::WebBinaryH1, Mode::WebBinaryH2] {
        let reply = raw_call(stack.proxy_addr(), mode, &[], body.clone()).await;
        reply.assert_ok();
    }
}
