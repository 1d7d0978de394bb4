//! The proxy's life around the calls: graceful shutdown (drain, readiness, in-flight streams
//! ended with UNAVAILABLE after the grace period), TLS on the listener (ALPN `h2` and
//! `http/1.1`), and TLS to the upstream with a configured CA.
//!
//! Certificates are made fresh by `rcgen` into a temporary directory that each test removes.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pnp_config::TlsFiles;
use pnp_demo::pb::grpc_testing::{
    Payload, ResponseParameters, SimpleRequest, SimpleResponse, StreamingOutputCallRequest,
};
use pnp_demo::pb::llm::generator_server::GeneratorServer;
use pnp_demo::pb::llm::{GenerateRequest, GenerateResponse};
use pnp_demo::{DemoStats, GeneratorImpl, TestServiceImpl};
use pnp_interop_tests::raw::{encode_frames, parse_trailer_block};
use pnp_interop_tests::{Mode, RawClient, RawStream, Stack};
use prost::Message as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

const UNARY: &str = "/grpc.testing.TestService/UnaryCall";
const STREAMING_OUTPUT: &str = "/grpc.testing.TestService/StreamingOutputCall";
const GENERATE: &str = "/demo.llm.v1.Generator/Generate";

const OK: i32 = 0;
const UNAVAILABLE: i32 = 14;

/// Longest a single exchange may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(10);

fn unary_request(size: i32) -> Vec<u8> {
    SimpleRequest {
        response_size: size,
        payload: Some(Payload {
            body: vec![1; 16],
            ..Payload::default()
        }),
        ..SimpleRequest::default()
    }
    .encode_to_vec()
}

fn decode_unary(message: &[u8]) -> usize {
    SimpleResponse::decode(message)
        .expect("SimpleResponse")
        .payload
        .map_or(0, |p| p.body.len())
}

// ---------------------------------------------------------------------------------------------
// Files and certificates.

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "pnp-lifecycle-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("creating a temp dir");
        TempDir(path)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("writing a temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate for `localhost`, its PEM files in a temp dir.
struct Cert {
    /// Holds the PEM files until the test ends.
    _dir: TempDir,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
    cert_pem: PathBuf,
    key_pem: PathBuf,
}

impl Cert {
    fn localhost() -> Cert {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("generating a certificate");
        let dir = TempDir::new();
        let cert_pem = dir.write("cert.pem", &certified.cert.pem());
        let key_pem = dir.write("key.pem", &certified.key_pair.serialize_pem());
        Cert {
            _dir: dir,
            der: certified.cert.der().clone(),
            key_der: certified.key_pair.serialize_der(),
            cert_pem,
            key_pem,
        }
    }

    fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.cert_pem.clone(),
            key: self.key_pem.clone(),
        }
    }

    fn server_config(&self, alpn: &[&[u8]]) -> rustls::ServerConfig {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![self.der.clone()], key)
        .expect("server certificate");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    fn client_config(&self, alpn: &[u8]) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.der.clone())
            .expect("trusting the certificate");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        config
    }
}

// ---------------------------------------------------------------------------------------------
// Plain clients for the admin port and TLS.

/// `GET path` on a fresh HTTP/1.1 connection; `None` when no answer could be had (connection
/// refused or closed).
async fn http_get(addr: SocketAddr, path: &str) -> Option<StatusCode> {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.ok()?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .ok()?;
        let task = tokio::spawn(connection);
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = path.parse().ok()?;
        request.headers_mut().insert(
            http::header::HOST,
            HeaderValue::from_str(&addr.to_string()).ok()?,
        );
        let response = sender.send_request(request).await.ok();
        task.abort();
        Some(response?.status())
    };
    tokio::time::timeout(HANG, exchange).await.ok().flatten()
}

/// A whole response read over TLS.
#[derive(Debug)]
struct TlsAnswer {
    alpn: Option<Vec<u8>>,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl TlsAnswer {
    /// Message payloads and the final metadata: HTTP/2 trailers (gRPC) or the trailer frame
    /// (gRPC-Web binary).
    fn messages_and_status(&self) -> (Vec<Bytes>, Option<i32>) {
        let mut body = self.body.clone();
        let mut messages = Vec::new();
        let mut trailers = self.trailers.clone();
        while body.len() >= 5 {
            let flag = body[0];
            let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
            assert!(body.len() >= 5 + len, "reply ends inside a frame");
            let payload = body.split_to(5 + len).slice(5..);
            if flag & 0x80 != 0 {
                trailers = Some(parse_trailer_block(&payload));
            } else {
                messages.push(payload);
            }
        }
        assert!(body.is_empty(), "reply ends inside a frame header");
        let status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        (messages, status)
    }
}

/// Connects to `addr` with TLS offering only `alpn`, sends `request` over the protocol that
/// ALPN chose, and reads the whole response.
async fn tls_exchange(
    addr: SocketAddr,
    cert: &Cert,
    alpn: &[u8],
    mut request: Request<Full<Bytes>>,
) -> TlsAnswer {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.expect("connecting");
        let connector = TlsConnector::from(Arc::new(cert.client_config(alpn)));
        let name = ServerName::try_from("localhost").expect("server name");
        let tls = connector
            .connect(name, tcp)
            .await
            .expect("TLS handshake with the proxy");
        let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let io = TokioIo::new(tls);
        let response = if negotiated.as_deref() == Some(b"h2") {
            *request.uri_mut() = format!("https://localhost:{}{}", addr.port(), request.uri())
                .parse()
                .expect("uri");
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("HTTP/2 handshake over TLS");
            tokio::spawn(connection);
            sender.send_request(request).await
        } else {
            request.headers_mut().insert(
                http::header::HOST,
                HeaderValue::from_str(&format!("localhost:{}", addr.port())).expect("host"),
            );
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("HTTP/1.1 handshake over TLS");
            tokio::spawn(connection);
            sender.send_request(request).await
        };
        let (parts, body) = response.expect("response over TLS").into_parts();
        let collected = body.collect().await.expect("response body over TLS");
        TlsAnswer {
            alpn: negotiated,
            status: parts.status,
            headers: parts.headers,
            trailers: collected.trailers().cloned(),
            body: collected.to_bytes(),
        }
    };
    tokio::time::timeout(HANG, exchange)
        .await
        .unwrap_or_else(|_| panic!("no TLS exchange within {HANG:?}"))
}

fn grpc_post(content_type: &'static str, body: Bytes) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = UNARY.parse().expect("path");
    let headers = request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    if content_type == "application/grpc" {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    } else {
        headers.insert("x-grpc-web", HeaderValue::from_static("1"));
    }
    request
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown.

/// Reads a stream to its end within [`HANG`]: messages and the final status.
async fn read_to_end(mut stream: RawStream, what: &str) -> (usize, Result<(i32, String), String>) {
    tokio::time::timeout(HANG, async {
        let mut messages = 0;
        while stream.next_message().await.is_some() {
            messages += 1;
        }
        (messages, stream.finish().await)
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: the call did not end within {HANG:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_then_ends_streams_with_unavailable() {
    const GRACE: Duration = Duration::from_millis(500);
    let Stack { upstream, proxy } = Stack::start().await;
    let addr = proxy.local_addr();
    let admin = proxy.admin_addr().expect("the admin listener is on");
    assert_eq!(http_get(admin, "/readyz").await, Some(StatusCode::OK));
    assert_eq!(http_get(admin, "/healthz").await, Some(StatusCode::OK));

    // Token streams that would run for 20 s: one per protocol family.
    let generate = GenerateRequest {
        prompt: "a long answer".to_owned(),
        max_tokens: 100,
        seed: Some(7),
        first_token_delay_ms: Some(0),
        token_interval_ms: Some(200),
        ..GenerateRequest::default()
    }
    .encode_to_vec();
    let mut long = Vec::new();
    for mode in [Mode::WebBinaryH1, Mode::WebTextH2, Mode::GrpcH2] {
        let mut stream = RawClient::new(addr, mode)
            .start(GENERATE, &[], &[&generate])
            .await;
        let first = tokio::time::timeout(HANG, stream.next_message()).await;
        let (token, _) = first
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("{mode}: no first token"));
        GenerateResponse::decode(token).expect("GenerateResponse");
        long.push((mode, stream));
    }
    // A short call in flight when the shutdown starts: its one message comes after 200 ms.
    let short_request = StreamingOutputCallRequest {
        response_parameters: vec![ResponseParameters {
            size: 8,
            interval_us: 200_000,
            ..ResponseParameters::default()
        }],
        ..StreamingOutputCallRequest::default()
    }
    .encode_to_vec();
    let short = RawClient::new(addr, Mode::WebBinaryH2)
        .start(STREAMING_OUTPUT, &[], &[&short_request])
        .await;
    let short = tokio::spawn(async move { read_to_end(short, "short call").await });

    let started = Instant::now();
    let shutdown = tokio::spawn(proxy.shutdown_with_grace(GRACE));

    // Draining: not ready (503 or no answer), still alive, and no new connections.
    let mut ready = http_get(admin, "/readyz").await;
    while ready == Some(StatusCode::OK) && started.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        ready = http_get(admin, "/readyz").await;
    }
    assert!(
        matches!(ready, None | Some(StatusCode::SERVICE_UNAVAILABLE)),
        "/readyz while draining: {ready:?}"
    );
    if started.elapsed() < GRACE {
        assert_eq!(
            http_get(admin, "/healthz").await,
            Some(StatusCode::OK),
            "/healthz while draining"
        );
    }
    let mut refused = TcpStream::connect(addr).await.is_err();
    while !refused && started.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        refused = TcpStream::connect(addr).await.is_err();
    }
    assert!(refused, "new connections are still accepted while draining");

    let (messages, ended) = short.await.expect("short call task");
    assert_eq!(
        ended,
        Ok((OK, String::new())),
        "a call that finishes within the grace period"
    );
    assert_eq!(messages, 1);

    for (mode, stream) in long {
        let (_, ended) = read_to_end(stream, &mode.to_string()).await;
        let elapsed = started.elapsed();
        let (code, message) =
            ended.unwrap_or_else(|e| panic!("{mode}: stream ended without a status: {e}"));
        assert_eq!(
            code, UNAVAILABLE,
            "{mode}: stream cut by the shutdown: {message:?}"
        );
        assert!(
            elapsed >= GRACE - Duration::from_millis(50) && elapsed < Duration::from_secs(3),
            "{mode}: ended {elapsed:?} after the shutdown began; the grace period is {GRACE:?}"
        );
    }
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("shutdown_with_grace did not return")
        .expect("shutdown task");
    assert!(
        upstream
            .stats()
            .wait_cancelled(3, Duration::from_secs(2))
            .await,
        "the upstream streams were not cancelled: {:?}",
        upstream.stats()
    );
}

// ---------------------------------------------------------------------------------------------
// TLS on the listener.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_grpc_over_h2_and_grpc_web_over_http1() {
    let cert = Cert::localhost();
    let files = cert.files();
    let stack = Stack::start_with(move |cfg| cfg.listener.tls = Some(files)).await;
    let addr = stack.proxy_addr();
    let request = encode_frames(&[&unary_request(8)]);

    let cases: [(&[u8], &str, &'static str); 3] = [
        (b"h2", "gRPC over h2", "application/grpc"),
        (b"h2", "gRPC-Web over h2", "application/grpc-web+proto"),
        (
            b"http/1.1",
            "gRPC-Web over HTTP/1.1",
            "application/grpc-web+proto",
        ),
    ];
    for (alpn, what, content_type) in cases {
        let answer =
            tls_exchange(addr, &cert, alpn, grpc_post(content_type, request.clone())).await;
        assert_eq!(answer.alpn.as_deref(), Some(alpn), "{what}: ALPN");
        assert_eq!(answer.status, StatusCode::OK, "{what}: {answer:?}");
        let reply_type = answer
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            reply_type.starts_with(content_type.trim_end_matches("+proto")),
            "{what}: reply content-type {reply_type:?}"
        );
        let (messages, status) = answer.messages_and_status();
        assert_eq!(status, Some(OK), "{what}: {answer:?}");
        assert_eq!(messages.len(), 1, "{what}");
        assert_eq!(decode_unary(&messages[0]), 8, "{what}");
    }

    // Plaintext on the TLS port gets no gRPC answer.
    let mut tcp = TcpStream::connect(addr).await.expect("connecting");
    let plaintext = tokio::time::timeout(HANG, async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tcp.write_all(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
            .await?;
        let mut buf = [0u8; 64];
        let n = tcp.read(&mut buf).await?;
        Ok::<_, io::Error>(buf[..n].to_vec())
    })
    .await
    .expect("the proxy neither answered nor closed a plaintext connection");
    if let Ok(bytes) = plaintext {
        assert!(
            !bytes.starts_with(b"HTTP/1.1 200"),
            "plaintext served on the TLS port"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// TLS to the upstream.

/// A TLS connection accepted by the upstream, as tonic wants it.
struct TlsIo(tokio_rustls::server::TlsStream<TcpStream>);

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// The demo services served by tonic over TLS (ALPN `h2`); stopped on drop.
struct TlsUpstream {
    addr: SocketAddr,
    stats: DemoStats,
    server: JoinHandle<()>,
}

impl TlsUpstream {
    async fn start(cert: &Cert) -> TlsUpstream {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("binding the TLS upstream");
        let addr = listener.local_addr().expect("upstream address");
        let acceptor = TlsAcceptor::from(Arc::new(cert.server_config(&[b"h2"])));
        let incoming =
            futures_util::stream::unfold((listener, acceptor), |(listener, acceptor)| async move {
                loop {
                    let tcp = match listener.accept().await {
                        Ok((tcp, _)) => tcp,
                        Err(e) => return Some((Err(e), (listener, acceptor))),
                    };
                    // A client that does not trust the certificate fails here; the server
                    // goes on accepting.
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        return Some((Ok::<_, io::Error>(TlsIo(tls)), (listener, acceptor)));
                    }
                }
            });
        let stats = DemoStats::default();
        let router = tonic::transport::Server::builder()
            .add_service(TestServiceImpl::new(stats.clone()).into_service())
            .add_service(GeneratorServer::new(GeneratorImpl::new(stats.clone())));
        let server = tokio::spawn(async move {
            let _ = router.serve_with_incoming(incoming).await;
        });
        TlsUpstream {
            addr,
            stats,
            server,
        }
    }

    fn url(&self) -> url::Url {
        url::Url::parse(&format!("https://localhost:{}", self.addr.port())).expect("upstream URL")
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstream_with_its_ca_serves_every_mode() {
    let cert = Cert::localhost();
    let upstream = TlsUpstream::start(&cert).await;
    let ca = cert.cert_pem.clone();
    let proxy = Stack::proxy_for(upstream.url(), move |cfg| cfg.upstream.ca = Some(ca)).await;
    for mode in Mode::ALL {
        let reply = RawClient::new(proxy.local_addr(), mode)
            .call(UNARY, &[], &[&unary_request(8)])
            .await;
        reply.assert_ok();
        assert_eq!(reply.messages.len(), 1, "{mode}");
        assert_eq!(decode_unary(&reply.messages[0]), 8, "{mode}");
    }
    assert_eq!(
        upstream.stats.calls_started(),
        5,
        "calls that reached the TLS upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstream_without_its_ca_is_unavailable() {
    let cert = Cert::localhost();
    let upstream = TlsUpstream::start(&cert).await;
    let proxy = Stack::proxy_for(upstream.url(), |_| {}).await;
    for mode in [Mode::WebBinaryH1, Mode::GrpcH2] {
        let reply = RawClient::new(proxy.local_addr(), mode)
            .call(UNARY, &[], &[&unary_request(8)])
            .await;
        assert_eq!(
            reply.grpc_status(),
            Some(UNAVAILABLE),
            "{mode}: an upstream with an untrusted certificate: {:?}",
            reply.grpc_message()
        );
        assert!(reply.messages.is_empty(), "{mode}");
    }
    assert_eq!(
        upstream.stats.calls_started(),
        0,
        "a call reached an untrusted upstream"
    );
}
