//! Two pnp instances bridged over HTTP/3: clients → edge pnp (TCP) → `h3://` → cluster pnp
//! (`--listen-h3`, certificates from a CA made here, as `pnp certs dev` makes them) → the
//! interop upstream. The interop cases run through the bridge with tonic (native gRPC and
//! gRPC-Web over HTTP/1.1 and HTTP/2) and the raw client (gRPC-Web text, binary, native); an
//! upstream that dies mid-stream, a deadline, a client's cancel (seen by the upstream across
//! both hops) and a QUIC peer that vanishes (its UDP dropped) all end as a user expects. An
//! HTTP/3 client (h3 + quinn) talks gRPC-Web and gRPC to the cluster's HTTP/3 listener
//! directly, and the TCP listener advertises it with `alt-svc`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::stream;

use pnp_demo::pb::grpc_testing::{Empty, SimpleResponse, StreamingOutputCallResponse};
use pnp_demo::DemoUpstream;
use pnp_interop_tests::channels::{test_service, unimplemented_service};
use pnp_interop_tests::faults::{Fault, FaultyUpstream};
use pnp_interop_tests::interop::*;
use pnp_interop_tests::stack::upstream_url;
use pnp_interop_tests::{Mode, RawClient, TonicMode};
use pnp_proxy::Proxy;
use support::h3::{cluster, dev_certs, edge, loopback, Certs};
use tokio::net::UdpSocket;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request};

/// How long the upstream may take to notice a cancelled call.
const CANCEL_OBSERVED_WITHIN: Duration = Duration::from_secs(2);

/// Client → edge → h3 → cluster → the demo upstream.
struct Bridge {
    upstream: DemoUpstream,
    cluster: Proxy,
    edge: Proxy,
    _certs: Certs,
}

impl Bridge {
    async fn start() -> Bridge {
        let upstream = DemoUpstream::start(loopback())
            .await
            .expect("demo upstream");
        let certs = dev_certs();
        let cluster = cluster(upstream_url(upstream.local_addr()), &certs, |_| {}).await;
        let h3 = cluster.local_h3_addr().expect("an HTTP/3 listener");
        let edge = edge(h3.port(), &certs, |_| {}).await;
        Bridge {
            upstream,
            cluster,
            edge,
            _certs: certs,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.edge.local_addr()
    }

    async fn shutdown(self) {
        self.edge.shutdown_with_grace(Duration::from_secs(1)).await;
        self.cluster
            .shutdown_with_grace(Duration::from_secs(1))
            .await;
        self.upstream.shutdown().await;
    }
}

/// The reply came over the edge's HTTP/3 egress.
fn assert_via_h3(headers: &http::HeaderMap) {
    assert_eq!(
        headers.get("x-pnp-transport").map(|v| v.as_bytes()),
        Some(&b"h3"[..]),
        "x-pnp-transport in {headers:?}"
    );
}

const TONIC_MODES: [TonicMode; 3] = [TonicMode::Native, TonicMode::WebH1, TonicMode::WebH2];
const RAW_MODES: [Mode; 3] = [Mode::WebTextH1, Mode::WebBinaryH2, Mode::GrpcH2];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_unary_and_streaming_cases_cross_the_h3_bridge() {
    let bridge = Bridge::start().await;
    for mode in TONIC_MODES {
        let mut client = test_service(bridge.addr(), mode).await;
        let empty = client
            .empty_call(Empty {})
            .await
            .unwrap_or_else(|s| panic!("{mode}: EmptyCall failed: {s:?}"));
        assert_eq!(empty.get_ref(), &Empty {});
        assert_via_h3(&empty.metadata().clone().into_headers());

        let large = client
            .unary_call(large_unary_request())
            .await
            .unwrap_or_else(|s| panic!("{mode}: UnaryCall failed: {s:?}"));
        assert_eq!(
            zero_payload_len(large.get_ref().payload.as_ref()),
            LARGE_RESPONSE_SIZE as usize,
            "{mode}"
        );

        let mut inbound = client
            .streaming_output_call(server_streaming_request())
            .await
            .unwrap_or_else(|s| panic!("{mode}: StreamingOutputCall failed: {s:?}"))
            .into_inner();
        let mut sizes = Vec::new();
        while let Some(message) = inbound
            .message()
            .await
            .unwrap_or_else(|s| panic!("{mode}: stream failed: {s:?}"))
        {
            sizes.push(zero_payload_len(message.payload.as_ref()));
        }
        assert_eq!(
            sizes,
            STREAMING_RESPONSE_SIZES.map(|s| s as usize),
            "{mode}"
        );
    }
    for mode in RAW_MODES {
        let client = RawClient::new(bridge.addr(), mode);
        let reply = client
            .call(UNARY_CALL, &[], &[&encode(&large_unary_request())])
            .await;
        reply.assert_ok();
        assert_via_h3(&reply.headers);
        assert_eq!(reply.messages.len(), 1, "{mode:?}");
        let response: SimpleResponse = decode(&reply.messages[0]);
        assert_eq!(
            zero_payload_len(response.payload.as_ref()),
            LARGE_RESPONSE_SIZE as usize
        );
        let reply = client
            .call(
                STREAMING_OUTPUT_CALL,
                &[],
                &[&encode(&server_streaming_request())],
            )
            .await;
        reply.assert_ok();
        let sizes: Vec<usize> = reply
            .messages
            .iter()
            .map(|m| zero_payload_len(decode::<StreamingOutputCallResponse>(m).payload.as_ref()))
            .collect();
        assert_eq!(
            sizes,
            STREAMING_RESPONSE_SIZES.map(|s| s as usize),
            "{mode:?}"
        );
    }
    // Every call crossed the bridge to the upstream: 3 per tonic mode, 2 per raw mode.
    assert_eq!(bridge.upstream.stats().calls_started(), 3 * 3 + 2 * 3);
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_statuses_and_unimplemented_cross_the_h3_bridge() {
    let bridge = Bridge::start().await;
    for mode in TONIC_MODES {
        let mut client = test_service(bridge.addr(), mode).await;
        let mut request = Request::new(large_unary_request());
        request
            .metadata_mut()
            .insert(ECHO_INITIAL, MetadataValue::from_static(ECHO_INITIAL_VALUE));
        request.metadata_mut().insert_bin(
            ECHO_TRAILING,
            MetadataValue::from_bytes(&ECHO_TRAILING_VALUE),
        );
        let unary = client
            .unary_call(request)
            .await
            .unwrap_or_else(|s| panic!("{mode}: UnaryCall failed: {s:?}"));
        assert_eq!(
            unary.metadata().get(ECHO_INITIAL).map(|v| v.as_bytes()),
            Some(ECHO_INITIAL_VALUE.as_bytes()),
            "{mode}: initial metadata {:?}",
            unary.metadata()
        );
        let trailing = unary
            .metadata()
            .get_bin(ECHO_TRAILING)
            .and_then(|v| v.to_bytes().ok())
            .map(|b| b.to_vec());
        assert_eq!(trailing, Some(ECHO_TRAILING_VALUE.to_vec()), "{mode}");

        for message in [STATUS_MESSAGE, SPECIAL_STATUS_MESSAGE] {
            let status = client
                .unary_call(status_request(STATUS_CODE, message))
                .await
                .expect_err("UnaryCall should fail");
            assert_eq!(
                (status.code(), status.message()),
                (Code::Unknown, message),
                "{mode}"
            );
        }
        let status = client
            .unimplemented_call(Empty {})
            .await
            .expect_err("UnimplementedCall should fail");
        assert_eq!(status.code(), Code::Unimplemented, "{mode}: {status:?}");
        let status = unimplemented_service(bridge.addr(), mode)
            .await
            .unimplemented_call(Empty {})
            .await
            .expect_err("UnimplementedService should fail");
        assert_eq!(status.code(), Code::Unimplemented, "{mode}: {status:?}");
    }
    for mode in RAW_MODES {
        let client = RawClient::new(bridge.addr(), mode);
        let reply = client
            .call(
                FULL_DUPLEX_CALL,
                &[],
                &[&encode(&streaming_status_request(
                    STATUS_CODE,
                    STATUS_MESSAGE,
                ))],
            )
            .await;
        assert_eq!(
            (reply.grpc_status(), reply.grpc_message().as_str()),
            (Some(STATUS_CODE), STATUS_MESSAGE),
            "{mode:?}: trailers {:?}",
            reply.trailers
        );
    }
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_is_deadline_exceeded_across_the_h3_bridge() {
    let bridge = Bridge::start().await;
    for mode in RAW_MODES {
        let client = RawClient::new(bridge.addr(), mode);
        for path in [FULL_DUPLEX_CALL, STREAMING_OUTPUT_CALL] {
            let started = Instant::now();
            let reply = client
                .call(
                    path,
                    &[("grpc-timeout", "200m")],
                    &[&encode(&sleeping_request())],
                )
                .await;
            assert_eq!(
                reply.grpc_status(),
                Some(code::DEADLINE_EXCEEDED),
                "{mode:?} {path}: {:?}",
                reply.grpc_message()
            );
            assert!(reply.messages.is_empty());
            assert!(
                started.elapsed() < Duration::from_millis(900),
                "{mode:?} {path}: answered after {:?}",
                started.elapsed()
            );
        }
    }
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cancel_reaches_the_upstream_across_both_hops() {
    let bridge = Bridge::start().await;
    let stats = bridge.upstream.stats();
    let mut cancelled = 0;
    // Native gRPC with the request stream still open, and gRPC-Web (the request is complete:
    // only the response side is stopped at the cluster).
    for mode in TONIC_MODES {
        let mut client = test_service(bridge.addr(), mode).await;
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        sender
            .send(ping_then_sleep_request())
            .unwrap_or_else(|_| panic!("receiver alive"));
        let keep_open = if mode.is_web() {
            drop(sender);
            None
        } else {
            Some(sender)
        };
        let requests = stream::unfold(
            receiver,
            |mut r| async move { r.recv().await.map(|m| (m, r)) },
        );
        let response = client
            .full_duplex_call(requests)
            .await
            .unwrap_or_else(|s| panic!("{mode}: FullDuplexCall failed: {s:?}"));
        assert_via_h3(&response.metadata().clone().into_headers());
        let mut inbound = response.into_inner();
        let first = inbound
            .message()
            .await
            .unwrap_or_else(|s| panic!("{mode}: first response: {s:?}"))
            .expect("the first response before the cancel");
        assert_eq!(
            zero_payload_len(first.payload.as_ref()),
            PING_RESPONSE_SIZE as usize
        );
        assert_eq!(stats.calls_cancelled(), cancelled, "{mode}");
        drop(inbound);
        drop(keep_open);
        drop(client);
        cancelled += 1;
        assert!(
            stats
                .wait_cancelled(cancelled, CANCEL_OBSERVED_WITHIN)
                .await,
            "{mode}: the upstream did not see the cancel: {stats:?}"
        );
    }
    for mode in RAW_MODES {
        let client = RawClient::new(bridge.addr(), mode);
        let mut stream = client
            .start(
                FULL_DUPLEX_CALL,
                &[],
                &[&encode(&ping_then_sleep_request())],
            )
            .await;
        assert_eq!(stream.http_status(), 200);
        stream
            .next_message()
            .await
            .expect("the first response before the cancel");
        stream.abort();
        cancelled += 1;
        assert!(
            stats
                .wait_cancelled(cancelled, CANCEL_OBSERVED_WITHIN)
                .await,
            "{mode:?}: the upstream did not see the cancel: {stats:?}"
        );
    }
    assert_eq!(stats.active_streams(), 0, "streams left running upstream");
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_dies_mid_stream_is_an_error_at_the_client_never_ok() {
    let certs = dev_certs();
    for fault in [
        Fault::HalfFrameThenClose,
        Fault::NoTrailers,
        Fault::ResetAfterMessage(h2::Reason::INTERNAL_ERROR),
    ] {
        let upstream = FaultyUpstream::start(fault.clone())
            .await
            .expect("upstream");
        let cluster = cluster(upstream.url(), &certs, |_| {}).await;
        let edge = edge(cluster.local_h3_addr().expect("h3").port(), &certs, |_| {}).await;
        for mode in RAW_MODES {
            let client = RawClient::new(edge.local_addr(), mode);
            let stream = client
                .start(
                    STREAMING_OUTPUT_CALL,
                    &[],
                    &[&encode(&server_streaming_request())],
                )
                .await;
            let outcome = stream.finish().await;
            match outcome {
                Ok((status, message)) => assert_ne!(
                    status,
                    code::OK,
                    "{fault:?} {mode:?}: a broken upstream stream ended OK ({message})"
                ),
                // A stream cut inside a message: reset, which is an error too.
                Err(e) => eprintln!("{fault:?} {mode:?}: stream cut ({e})"),
            }
        }
        // tonic sees an error status too.
        let mut client = test_service(edge.local_addr(), TonicMode::Native).await;
        let outcome = client
            .streaming_output_call(server_streaming_request())
            .await;
        let status = match outcome {
            Err(status) => status,
            Ok(response) => {
                let mut inbound = response.into_inner();
                loop {
                    match inbound.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => panic!("{fault:?}: the stream ended OK"),
                        Err(status) => break status,
                    }
                }
            }
        };
        assert_ne!(status.code(), Code::Ok, "{fault:?}");
        edge.shutdown_with_grace(Duration::from_millis(100)).await;
        cluster
            .shutdown_with_grace(Duration::from_millis(100))
            .await;
    }
}

/// A UDP relay between the edge and the cluster that can start dropping every datagram, as a
/// peer that vanished (power loss, a partition) would: no CONNECTION_CLOSE, only silence.
struct Relay {
    addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let front = Arc::new(UdpSocket::bind(loopback()).await.expect("bind relay"));
        let back = Arc::new(UdpSocket::bind(loopback()).await.expect("bind relay"));
        back.connect(target).await.expect("connect relay");
        let addr = front.local_addr().expect("relay addr");
        let blackhole = Arc::new(AtomicBool::new(false));
        let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
        let forward = {
            let (front, back, blackhole, client) = (
                front.clone(),
                back.clone(),
                blackhole.clone(),
                client.clone(),
            );
            async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().expect("lock") = Some(from);
                    if !blackhole.load(Ordering::Acquire) {
                        let _ = back.send(&buf[..n]).await;
                    }
                }
            }
        };
        let backward = {
            let blackhole = blackhole.clone();
            async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = back.recv(&mut buf).await {
                    let to = *client.lock().expect("lock");
                    if let (false, Some(to)) = (blackhole.load(Ordering::Acquire), to) {
                        let _ = front.send_to(&buf[..n], to).await;
                    }
                }
            }
        };
        let task = tokio::spawn(async move {
            tokio::join!(forward, backward);
        });
        Relay {
            addr,
            blackhole,
            task,
        }
    }

    fn vanish(&self) {
        self.blackhole.store(true, Ordering::Release);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_peer_that_vanishes_mid_stream_is_unavailable_within_the_keepalive_bound() {
    const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
    let upstream = DemoUpstream::start(loopback())
        .await
        .expect("demo upstream");
    let certs = dev_certs();
    let cluster = cluster(upstream_url(upstream.local_addr()), &certs, |_| {}).await;
    let relay = Relay::start(cluster.local_h3_addr().expect("h3")).await;
    let edge = edge(relay.addr.port(), &certs, |config| {
        config.resilience.keepalive_timeout = KEEPALIVE_TIMEOUT;
        // No clock of the proxy's own may end the call first.
        let profile = config.jobs.default_profile_mut();
        profile.idle_timeout = None;
        profile.idle_timeout_explicit = true;
    })
    .await;

    for mode in [Mode::GrpcH2, Mode::WebTextH1] {
        let client = RawClient::new(edge.local_addr(), mode);
        let mut stream = client
            .start(
                FULL_DUPLEX_CALL,
                &[],
                &[&encode(&ping_then_sleep_request())],
            )
            .await;
        assert_via_h3(stream.headers());
        stream
            .next_message()
            .await
            .expect("the first message before the peer vanishes");
        relay.vanish();
        let vanished = Instant::now();
        let (status, message) = stream.finish().await.expect("a status, not a cut stream");
        let after = vanished.elapsed();
        assert_eq!(status, code::UNAVAILABLE, "{mode:?}: {message}");
        eprintln!("{mode:?}: UNAVAILABLE {after:?} after the peer vanished: {message}");
        // QUIC's idle timer restarts once when the first keepalive after the last packet
        // heard goes out: the bound is the timeout plus one keepalive interval (a third of it).
        let bound = KEEPALIVE_TIMEOUT * 4 / 3;
        assert!(
            after < bound + Duration::from_secs(1),
            "{mode:?}: took {after:?}, the keepalive bound is {bound:?}"
        );
        assert!(
            after >= KEEPALIVE_TIMEOUT / 2,
            "{mode:?}: ended after {after:?}, before silence could mean anything: {message}"
        );
        // The next call makes a new connection; with the peer still gone it fails fast and
        // cleanly.
        relay.blackhole.store(false, Ordering::Release);
        let reply = client.call(EMPTY_CALL, &[], &[&encode(&Empty {})]).await;
        reply.assert_ok();
    }
    edge.shutdown_with_grace(Duration::from_millis(100)).await;
    cluster
        .shutdown_with_grace(Duration::from_millis(100))
        .await;
    upstream.shutdown().await;
}

/// An HTTP/3 client of the cluster's listener: quinn + h3, trusting the test CA.
async fn h3_client(
    addr: SocketAddr,
    ca: &std::path::Path,
) -> (
    quinn::Endpoint,
    h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
) {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).expect("CA");
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.expect("cert")).expect("root");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    let mut endpoint = quinn::Endpoint::client(loopback()).expect("client endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("QUIC handshake");
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
        .await
        .expect("HTTP/3 setup");
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    (endpoint, send)
}

fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.extend_from_slice(message);
    out.freeze()
}

/// Splits a body of 5-byte framed messages; the payload of a 0x80 frame comes back apart.
fn split_frames(mut body: Bytes) -> (Vec<Bytes>, Option<String>) {
    let mut messages = Vec::new();
    let mut trailers = None;
    while body.len() >= 5 {
        let flag = body[0];
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        body.advance(5);
        assert!(
            body.len() >= len,
            "a frame of {len} bytes with {} left",
            body.len()
        );
        let payload = body.split_to(len);
        if flag & 0x80 != 0 {
            trailers = Some(String::from_utf8_lossy(&payload).into_owned());
        } else {
            messages.push(payload);
        }
    }
    assert!(
        body.is_empty(),
        "{} stray bytes after the frames",
        body.len()
    );
    (messages, trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http3_client_speaks_grpc_web_and_grpc_to_the_h3_listener() {
    let upstream = DemoUpstream::start(loopback())
        .await
        .expect("demo upstream");
    let certs = dev_certs();
    let cluster = cluster(upstream_url(upstream.local_addr()), &certs, |_| {}).await;
    let h3_addr = cluster.local_h3_addr().expect("h3");
    let (_endpoint, mut send) = h3_client(h3_addr, &certs.ca).await;

    for web in [true, false] {
        let content_type = if web {
            "application/grpc-web+proto"
        } else {
            "application/grpc"
        };
        let request = http::Request::post(format!(
            "https://localhost:{}{STREAMING_OUTPUT_CALL}",
            h3_addr.port()
        ))
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(())
        .expect("request");
        let mut stream = send.send_request(request).await.expect("send request");
        stream
            .send_data(frame(&encode(&server_streaming_request())))
            .await
            .expect("request body");
        stream.finish().await.expect("finish");
        let response = stream.recv_response().await.expect("response");
        assert_eq!(response.status(), 200, "web={web}");
        assert_eq!(
            response.headers()["content-type"],
            if web {
                "application/grpc-web+proto"
            } else {
                "application/grpc"
            }
        );
        assert_eq!(response.headers()["x-pnp-transport"], "h2");
        let mut body = BytesMut::new();
        while let Some(mut chunk) = stream.recv_data().await.expect("data") {
            body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        let trailers = stream.recv_trailers().await.expect("trailers");
        let (messages, trailer_frame) = split_frames(body.freeze());
        let sizes: Vec<usize> = messages
            .iter()
            .map(|m| zero_payload_len(decode::<StreamingOutputCallResponse>(m).payload.as_ref()))
            .collect();
        assert_eq!(
            sizes,
            STREAMING_RESPONSE_SIZES.map(|s| s as usize),
            "web={web}"
        );
        if web {
            let block = trailer_frame.expect("a gRPC-Web trailer frame");
            assert!(block.contains("grpc-status:0"), "trailer frame {block:?}");
            assert!(trailers.is_none(), "HTTP/3 trailers on a gRPC-Web reply");
        } else {
            assert!(trailer_frame.is_none());
            let trailers = trailers.expect("HTTP/3 trailers");
            assert_eq!(trailers["grpc-status"], "0");
        }
    }
    assert_eq!(upstream.stats().calls_started(), 2);
    cluster
        .shutdown_with_grace(Duration::from_millis(100))
        .await;
    upstream.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_listener_advertises_http3_with_alt_svc() {
    let upstream = DemoUpstream::start(loopback())
        .await
        .expect("demo upstream");
    let certs = dev_certs();
    let cluster = cluster(upstream_url(upstream.local_addr()), &certs, |_| {}).await;
    let port = cluster.local_h3_addr().expect("h3").port();

    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&certs.ca).expect("CA");
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.expect("cert")).expect("root");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(cluster.local_addr())
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("TLS");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = encode_frames_web(&encode(&Empty {}));
    let request = format!(
        "POST {EMPTY_CALL} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/grpc-web+proto\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.expect("write");
    tls.write_all(&body).await.expect("write");
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    let expected = format!("alt-svc: h3=\":{port}\"; ma=86400");
    assert!(text.contains(&expected), "no `{expected}` in {text}");
    cluster
        .shutdown_with_grace(Duration::from_millis(100))
        .await;
    upstream.shutdown().await;
}

fn encode_frames_web(message: &[u8]) -> Bytes {
    frame(message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_cluster_ends_calls_over_h3_with_the_shutdown_status_after_its_grace() {
    let Bridge {
        upstream,
        cluster,
        edge,
        _certs,
    } = Bridge::start().await;
    let client = RawClient::new(edge.local_addr(), Mode::GrpcH2);
    let mut stream = client
        .start(
            FULL_DUPLEX_CALL,
            &[],
            &[&encode(&ping_then_sleep_request())],
        )
        .await;
    stream
        .next_message()
        .await
        .expect("the first message before the shutdown");
    let grace = Duration::from_millis(300);
    let started = Instant::now();
    let shutdown = tokio::spawn(cluster.shutdown_with_grace(grace));
    let (status, message) = stream.finish().await.expect("a status");
    let ended = started.elapsed();
    assert_eq!(status, code::UNAVAILABLE, "{message}");
    assert!(message.contains("shutting down"), "{message}");
    assert!(
        ended >= grace && ended < grace + Duration::from_secs(2),
        "the call ended {ended:?} after the shutdown began (grace {grace:?})"
    );
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("the cluster's HTTP/3 connections closed after their calls")
        .expect("shutdown task");
    edge.shutdown_with_grace(Duration::from_millis(100)).await;
    upstream.shutdown().await;
}
