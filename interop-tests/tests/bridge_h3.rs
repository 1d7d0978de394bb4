//! What only an HTTP/3 bridge has (clients → edge pnp (TCP) → `h3://` → cluster pnp
//! (`--listen-h3`, certificates from a CA made here, as `pnp certs dev` makes them) → the
//! interop upstream): a QUIC peer that vanishes (its UDP dropped) ends calls UNAVAILABLE within
//! the keepalive bound; an HTTP/3 client (h3 + quinn) talks gRPC-Web and gRPC to the cluster's
//! HTTP/3 listener directly; the TCP listener advertises it with `alt-svc`; a draining cluster
//! ends its calls with the shutdown status. The interop cases, deadline, cancel and upstream
//! death over h3 run in `bridge.rs` with h1 and h2.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use pnp_demo::pb::grpc_testing::{Empty, StreamingOutputCallResponse};
use pnp_demo::DemoUpstream;
use pnp_interop_tests::interop::*;
use pnp_interop_tests::stack::upstream_url;
use pnp_interop_tests::{Mode, RawClient};
use support::bridge::{pair, Hop};
use support::h3::{cluster, dev_certs, edge, h3_client, h3_connect, loopback};
use tokio::net::UdpSocket;

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
        Hop::H3.assert_carried(stream.headers());
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

/// `listener.max_connections` counts TCP and QUIC connections together: with the one slot
/// taken by a TCP connection a QUIC connection is refused, and once it is free a QUIC
/// connection gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_quic_connections_share_one_connection_limit() {
    let upstream = DemoUpstream::start(loopback())
        .await
        .expect("demo upstream");
    let certs = dev_certs();
    let cluster = cluster(upstream_url(upstream.local_addr()), &certs, |config| {
        config.listener.max_connections = 1;
        config.listener.connection_wait = Duration::from_millis(100);
    })
    .await;
    let h3_addr = cluster.local_h3_addr().expect("h3");
    let tcp = tokio::net::TcpStream::connect(cluster.local_addr())
        .await
        .expect("tcp");
    // The TCP connection holds the slot (from its accept on, through its TLS handshake).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = h3_connect(h3_addr, &certs.ca).await;
    assert!(
        refused.is_err(),
        "a QUIC connection over the shared limit was accepted"
    );
    drop(tcp);
    let deadline = Instant::now() + Duration::from_secs(5);
    let (_endpoint, mut send) = loop {
        match h3_connect(h3_addr, &certs.ca).await {
            Ok(connected) => break connected,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the freed slot never served QUIC: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // And now the QUIC connection holds it: a TCP connection is closed unserved.
    let request = http::Request::post(format!(
        "https://localhost:{}{}",
        h3_addr.port(),
        "/grpc.testing.TestService/EmptyCall"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .expect("request");
    let mut stream = send.send_request(request).await.expect("request over h3");
    stream.send_data(frame(&[])).await.expect("body");
    stream.finish().await.expect("finish");
    let response = stream.recv_response().await.expect("response");
    assert_eq!(response.status(), 200);
    let mut over = tokio::net::TcpStream::connect(cluster.local_addr())
        .await
        .expect("the kernel accepts");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut over, &mut buf),
    )
    .await
    .expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    cluster
        .shutdown_with_grace(Duration::from_millis(100))
        .await;
    upstream.shutdown().await;
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
    let upstream = DemoUpstream::start(loopback())
        .await
        .expect("demo upstream");
    let (cluster, edge, _certs) = pair(Hop::H3, upstream_url(upstream.local_addr()), |_| {}).await;
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
