//! The clients production has, beside normal ones: an HTTP/2 client that stops reading (window
//! 0) or reads slowly, a client that keeps its request open after pnp ended the call, an
//! HTTP/1.1 client that sends its body after pnp already answered, sockets that never say a
//! word or never finish a TLS handshake, more connections than the limit. Each test runs with
//! pnp's default clocks on, and asserts what the well-behaved clients see and what the
//! misbehaving ones cost (upstream streams, permits, connections).

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use h2::Reason;
use pnp_config::{FirstMessage, Profile};
use pnp_demo::pb::llm::GenerateRequest;
use pnp_interop_tests::admin::{sample, scrape_metrics};
use pnp_interop_tests::faults::{Fault, FaultyUpstream};
use pnp_interop_tests::interop::{encode, EMPTY_CALL, GENERATE, STREAMING_OUTPUT_CALL, UNARY_CALL};
use pnp_interop_tests::{Mode, RawClient, Stack};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

mod support;

use support::misbehaving::{frame, grpc_head, h2_client, streaming_output};

const OK: i32 = 0;
const DEADLINE_EXCEEDED: i32 = 4;
const RESOURCE_EXHAUSTED: i32 = 8;
const UNAVAILABLE: i32 = 14;

async fn metrics(stack: &Stack) -> String {
    scrape_metrics(stack.proxy.admin_addr().expect("admin listener")).await
}

/// Defects 1 and 2 of the edge-hardening issue: a client with a zero window opens 8 streams of
/// 2 MiB each. Another client's calls are answered at once (not at their own deadline), and
/// the stalled streams are ended at their 2 s deadline: RST_STREAM to the client, the upstream
/// cancelled, the permits released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_costs_others_nothing_and_is_reset_at_its_deadline() {
    let stack = Stack::start().await;
    let addr = stack.proxy_addr();
    let mut stalled = h2_client(addr, 0).await;
    let request = frame(&streaming_output(8, 256 * 1024));
    let started = Instant::now();
    let mut responses = Vec::new();
    for _ in 0..8 {
        stalled = stalled.ready().await.expect("stream slot");
        let (response, mut body) = stalled
            .send_request(grpc_head(addr, STREAMING_OUTPUT_CALL, Some("2S")), false)
            .expect("send request");
        body.send_data(request.clone(), true).expect("send body");
        responses.push(response);
    }
    let mut bodies = Vec::new();
    for response in responses {
        let response = response.await.expect("response headers");
        assert_eq!(response.status(), 200);
        bodies.push(response.into_body());
    }
    // The upstream now pushes 16 MiB towards a client that takes none of it. Give it a moment
    // to fill every window it can (this is load, not synchronisation: the assertions below
    // hold however far it got).
    tokio::time::sleep(Duration::from_millis(300)).await;

    for mode in [Mode::GrpcH2, Mode::WebBinaryH2, Mode::WebBinaryH1] {
        let asked = Instant::now();
        let reply = RawClient::new(addr, mode)
            .call(EMPTY_CALL, &[("grpc-timeout", "8S")], &[&[]])
            .await;
        assert_eq!(
            reply.grpc_status(),
            Some(OK),
            "{mode:?}: {}",
            reply.grpc_message()
        );
        assert!(
            asked.elapsed() < Duration::from_secs(4),
            "{mode:?}: an unrelated call waited {:?} behind the stalled streams",
            asked.elapsed()
        );
    }

    for mut body in bodies {
        let error = loop {
            match body.data().await {
                Some(Ok(_)) => continue,
                Some(Err(error)) => break error,
                None => panic!("a stalled stream ended cleanly; it should be reset"),
            }
        };
        assert_eq!(error.reason(), Some(Reason::CANCEL), "{error}");
    }
    let ended = started.elapsed();
    assert!(
        (Duration::from_millis(1_900)..Duration::from_millis(3_500)).contains(&ended),
        "stalled streams were reset {ended:?} after they started (deadline 2 s)"
    );
    assert!(
        stack
            .stats()
            .wait_cancelled(8, Duration::from_secs(5))
            .await,
        "the upstream streams of the stalled calls were not cancelled"
    );
    let text = metrics(&stack).await;
    assert_eq!(
        sample(&text, "pnp_active_streams{transport=\"h2\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "pnp_clock_expiries_total{clock=\"deadline\"}"),
        Some(8.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "pnp_client_resets_total{protocol=\"h2\"}"),
        Some(8.0),
        "{text}"
    );
}

/// A client that reads, slowly (16 KiB of window at a time), gets every byte and an OK status,
/// while other clients' calls go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_everything_and_slows_no_one_else() {
    let stack = Stack::start().await;
    let addr = stack.proxy_addr();
    let mut slow = h2_client(addr, 16 * 1024)
        .await
        .ready()
        .await
        .expect("ready");
    let (response, mut send) = slow
        .send_request(grpc_head(addr, STREAMING_OUTPUT_CALL, None), false)
        .expect("send request");
    send.send_data(frame(&streaming_output(8, 64 * 1024)), true)
        .expect("send body");
    let reader = tokio::spawn(async move {
        let mut body = response.await.expect("headers").into_body();
        let mut received = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("data");
            received.extend_from_slice(&chunk);
            tokio::time::sleep(Duration::from_millis(10)).await;
            body.flow_control()
                .release_capacity(chunk.len())
                .expect("release");
        }
        let trailers = body.trailers().await.expect("trailers").expect("some");
        (received, trailers)
    });
    for _ in 0..20 {
        let reply = RawClient::new(addr, Mode::GrpcH2)
            .call(EMPTY_CALL, &[], &[&[]])
            .await;
        assert_eq!(reply.grpc_status(), Some(OK), "{}", reply.grpc_message());
    }
    let (received, trailers) = reader.await.expect("reader");
    let mut messages = 0;
    let mut rest = &received[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        assert!(
            len >= 64 * 1024 && rest.len() >= 5 + len,
            "a whole 64 KiB message"
        );
        rest = &rest[5 + len..];
        messages += 1;
    }
    assert!(rest.is_empty(), "{} stray bytes", rest.len());
    assert_eq!(messages, 8, "every message");
    assert_eq!(trailers["grpc-status"], "0");
}

/// Defect 3: with an idle clock of 2 s (and the default 30 s first-message clock), a stream
/// whose first message comes at 0.2 s and the next at 6.2 s is ended at about 2.2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_clock_fires_after_the_first_message_in_every_mode() {
    let stack = Stack::start_with(|c| {
        c.jobs.default_profile_mut().idle_timeout = Some(Duration::from_secs(2));
    })
    .await;
    let request = encode(&GenerateRequest {
        prompt: "idle".into(),
        max_tokens: 2,
        seed: Some(1),
        first_token_delay_ms: Some(200),
        token_interval_ms: Some(6_000),
        ..Default::default()
    });
    let calls = [
        Mode::GrpcH2,
        Mode::WebBinaryH1,
        Mode::WebBinaryH2,
        Mode::WebTextH1,
    ]
    .map(|mode| {
        let request = request.clone();
        let addr = stack.proxy_addr();
        tokio::spawn(async move {
            let mut stream = RawClient::new(addr, mode)
                .with_read_timeout(Duration::from_secs(20))
                .start(GENERATE, &[], &[&request])
                .await;
            let mut arrivals = Vec::new();
            while let Some((_, at)) = stream.next_message().await {
                arrivals.push(at);
            }
            let (code, message) = stream.finish().await.expect("a status");
            (mode, arrivals, code, message, Instant::now())
        })
    });
    for call in calls {
        let (mode, arrivals, code, message, ended) = call.await.expect("call task");
        assert_eq!(arrivals.len(), 1, "{mode:?}: {message}");
        assert_eq!(code, UNAVAILABLE, "{mode:?}: {message}");
        assert!(message.contains("idle"), "{mode:?}: {message}");
        let silence = ended.duration_since(arrivals[0]);
        assert!(
            (Duration::from_millis(1_900)..Duration::from_millis(3_500)).contains(&silence),
            "{mode:?}: the idle clock fired {silence:?} after the first message (limit 2 s)"
        );
    }
    assert!(
        stack
            .stats()
            .wait_cancelled(4, Duration::from_secs(3))
            .await
    );
}

/// Defect 5: a client-streaming call whose client keeps its request open is ended by pnp (its
/// deadline, or the idle clock); the upstream stream is reset at once, not when the client
/// half-closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_a_call_resets_the_upstream_even_while_the_client_still_sends() {
    for clock in ["deadline", "idle"] {
        let upstream = FaultyUpstream::start(Fault::StallAfterHeaders)
            .await
            .expect("fault upstream");
        let proxy = Stack::proxy_for(upstream.url(), |c| {
            if clock == "idle" {
                *c.jobs.default_profile_mut() = Profile {
                    first_message: FirstMessage::Off,
                    idle_timeout: Some(Duration::from_millis(500)),
                    ..Profile::default()
                };
            }
        })
        .await;
        let addr = proxy.local_addr();
        let mut client = h2_client(addr, 1 << 20).await.ready().await.expect("ready");
        let timeout = (clock == "deadline").then_some("1S");
        let (response, mut request) = client
            .send_request(grpc_head(addr, STREAMING_OUTPUT_CALL, timeout), false)
            .expect("send request");
        // One message, and the request stays open.
        request
            .send_data(frame(&streaming_output(1, 1)), false)
            .expect("send message");
        let mut body = response.await.expect("headers").into_body();
        while let Some(chunk) = body.data().await {
            chunk.expect("data");
        }
        let trailers = body.trailers().await.expect("trailers").expect("some");
        let expected = if clock == "deadline" {
            DEADLINE_EXCEEDED
        } else {
            UNAVAILABLE
        };
        assert_eq!(
            trailers["grpc-status"],
            expected.to_string().as_str(),
            "{clock}"
        );
        assert!(
            upstream.wait_resets(1, Duration::from_secs(2)).await,
            "{clock}: the upstream stream was not reset while the client kept its request open"
        );
        drop(request);
        proxy.shutdown_with_grace(Duration::from_millis(100)).await;
    }
}

/// Defect 4: over HTTP/1.1, a status pnp makes before reading the request body (here: shed at
/// the door) reaches a client that sends its body only after the head, like Node's http
/// module; the connection stays usable for the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_status_reaches_an_http1_client_still_sending_its_body() {
    let stack = Stack::start_with(|c| c.resilience.max_concurrent_streams = 1).await;
    let addr = stack.proxy_addr();
    // Take the only slot with a slow stream.
    let busy = RawClient::new(addr, Mode::GrpcH2)
        .start(
            GENERATE,
            &[],
            &[&encode(&GenerateRequest {
                prompt: "busy".into(),
                max_tokens: 2,
                seed: Some(1),
                first_token_delay_ms: Some(10),
                token_interval_ms: Some(5_000),
                ..Default::default()
            })],
        )
        .await;

    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let body = frame(&streaming_output(4, 10));
    let head = format!(
        "POST {STREAMING_OUTPUT_CALL} HTTP/1.1\r\nhost: pnp\r\ncontent-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.expect("head");
    let mut reader = BufReader::new(tcp);
    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .await
        .expect("status line");
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    let mut headers = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.expect("header line");
        if line == "\r\n" {
            break;
        }
        headers.push_str(&line.to_ascii_lowercase());
    }
    assert!(
        headers.contains(&format!("grpc-status: {RESOURCE_EXHAUSTED}")),
        "{headers}"
    );
    // Only now the body, as a client that streams its request would send it.
    reader
        .get_mut()
        .write_all(&body)
        .await
        .expect("the body can still be sent after the answer");
    // The connection is still good: the next call on it is answered.
    drop(busy);
    stack
        .stats()
        .wait_cancelled(1, Duration::from_secs(5))
        .await;
    let empty = frame(&[]);
    let head = format!(
        "POST {EMPTY_CALL} HTTP/1.1\r\nhost: pnp\r\ncontent-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        empty.len()
    );
    let tcp = reader.get_mut();
    tcp.write_all(head.as_bytes()).await.expect("second head");
    tcp.write_all(&empty).await.expect("second body");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut rest))
        .await
        .expect("the second answer in time")
        .expect("read the second answer");
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("HTTP/1.1 200"), "{rest}");
    assert!(rest.contains("grpc-status:0"), "{rest}");
}

/// Runs `silent_clients.py` and returns it once it reports its connections open.
struct SilentClients {
    count: usize,
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl SilentClients {
    async fn open(addr: SocketAddr, count: usize, kind: &str, deadline: Duration) -> Self {
        let script = support::python_dir().join("silent_clients.py");
        let mut child = tokio::process::Command::new("python3")
            .arg(script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(count.to_string())
            .arg(kind)
            .arg(deadline.as_secs_f64().to_string())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = lines.next_line().await.expect("read").expect("a line");
        assert_eq!(ready, format!("ready {count}"));
        Self {
            count,
            child,
            lines,
        }
    }

    /// Every connection was closed by pnp's handshake timer, the last within `bound`, and
    /// counted as such.
    async fn assert_closed_by_the_handshake_timer(self, stack: &Stack, bound: Duration) {
        let count = self.count;
        let (closed, latest) = self.closed().await;
        assert_eq!(closed, count, "every connection is closed");
        assert!(latest < bound, "the last closed after {latest:?}");
        let text = metrics(stack).await;
        assert_eq!(
            sample(
                &text,
                "pnp_connections_refused_total{reason=\"handshake_timeout\"}"
            ),
            Some(count as f64),
            "{text}"
        );
    }

    /// How many the server closed, and the latest close after `ready`.
    async fn closed(mut self) -> (usize, Duration) {
        let line = self.lines.next_line().await.expect("read").expect("a line");
        let _ = self.child.wait().await;
        let mut parts = line.split(' ');
        assert_eq!(parts.next(), Some("closed"), "{line}");
        let count = parts.next().and_then(|n| n.parse().ok()).expect("count");
        let latest = parts
            .next()
            .and_then(|s| s.parse::<f64>().ok())
            .map(Duration::from_secs_f64)
            .expect("latest");
        (count, latest)
    }
}

/// 10 000 connections that never send a byte do not stop a normal client from being served,
/// and the handshake timer closes every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_silent_connections_are_closed_by_their_timer() {
    let stack = Stack::start_with(|c| {
        c.listener.handshake_timeout = Duration::from_secs(3);
        c.listener.max_connections = 12_000;
    })
    .await;
    let addr = stack.proxy_addr();
    let silent = SilentClients::open(addr, 10_000, "silent", Duration::from_secs(20)).await;
    for mode in [Mode::GrpcH2, Mode::WebBinaryH1] {
        let reply = RawClient::new(addr, mode)
            .call(EMPTY_CALL, &[], &[&[]])
            .await;
        assert_eq!(
            reply.grpc_status(),
            Some(OK),
            "{mode:?}: {}",
            reply.grpc_message()
        );
    }
    silent
        .assert_closed_by_the_handshake_timer(&stack, Duration::from_secs(10))
        .await;
}

/// 1 000 TLS handshakes that stop half-way do not stop a normal TLS client, and are closed by
/// the handshake timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_tls_handshakes_are_closed_by_their_timer() {
    let dir = support::TempDir::new("hardening-tls");
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let cert_pem = certified.cert.pem();
    let cert_path = dir.write("cert.pem", cert_pem.as_bytes());
    let key_path = dir.write("key.pem", certified.key_pair.serialize_pem().as_bytes());
    let stack = Stack::start_with(|c| {
        c.listener.tls = Some(pnp_config::TlsFiles {
            cert: cert_path,
            key: key_path,
        });
        c.listener.handshake_timeout = Duration::from_secs(2);
    })
    .await;
    let addr = stack.proxy_addr();
    let half = SilentClients::open(addr, 1_000, "half-tls", Duration::from_secs(20)).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await.expect("answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 "), "{answer}");

    half.assert_closed_by_the_handshake_timer(&stack, Duration::from_secs(8))
        .await;
}

/// An EmptyCall over an existing raw HTTP/2 connection; asserts an OK status.
async fn empty_call_over(client: &h2::client::SendRequest<Bytes>, addr: SocketAddr) {
    let mut client = client.clone().ready().await.expect("ready");
    let (response, mut body) = client
        .send_request(grpc_head(addr, EMPTY_CALL, None), false)
        .expect("request");
    body.send_data(frame(&[]), true).expect("body");
    let mut body = response.await.expect("headers").into_body();
    while let Some(chunk) = body.data().await {
        chunk.expect("data");
    }
    let trailers = body.trailers().await.expect("trailers").expect("some");
    assert_eq!(trailers["grpc-status"], "0");
}

/// The connection limit holds: over it a new connection is closed after a brief wait; the
/// connections inside keep being served; a freed slot is taken by the next connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds_and_spares_existing_calls() {
    let stack = Stack::start_with(|c| {
        c.listener.max_connections = 2;
        c.listener.connection_wait = Duration::from_millis(100);
    })
    .await;
    let addr = stack.proxy_addr();
    let first = h2_client(addr, 1 << 20).await;
    let second = h2_client(addr, 1 << 20).await;
    // Both are inside the limit once they have been served.
    for client in [&first, &second] {
        empty_call_over(client, addr).await;
    }

    let mut third = TcpStream::connect(addr).await.expect("the kernel accepts");
    third
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a connection over the limit was served: {read:?}"
    );
    // The connections inside are untouched.
    for client in [&first, &second] {
        empty_call_over(client, addr).await;
    }
    let text = metrics(&stack).await;
    assert_eq!(
        sample(&text, "pnp_connections_refused_total{reason=\"limit\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "pnp_connections_open"), Some(2.0), "{text}");

    // A slot frees up: the next connection is served.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics(&stack).await;
        if sample(&text, "pnp_connections_open") == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first connection never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = RawClient::new(addr, Mode::GrpcH2)
        .call(EMPTY_CALL, &[], &[&[]])
        .await;
    assert_eq!(reply.grpc_status(), Some(OK), "{}", reply.grpc_message());
}

/// A message that would take pnp past its global buffer budget while it is assembled ends its
/// call with RESOURCE_EXHAUSTED naming the budget, and never reaches the upstream; calls that
/// fit go through. Messages above the fragment threshold are not assembled at all, so a 1 MiB
/// message passes under a 16 KiB budget. (HTTP/2 modes: their 16 KiB DATA frames make the
/// assembly observable; hyper may hand an HTTP/1.1 body over in one read.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_buffer_budget_is_refused_clearly() {
    let stack = Stack::start_with(|c| c.limits.buffer_budget = 16 * 1024).await;
    let addr = stack.proxy_addr();
    let payload = |size: usize| {
        encode(&pnp_demo::pb::grpc_testing::SimpleRequest {
            response_size: 1024,
            payload: Some(pnp_demo::pb::grpc_testing::Payload {
                body: vec![7; size],
                ..Default::default()
            }),
            ..Default::default()
        })
    };
    let assembled = payload(60 * 1024);
    let fragmented = payload(1 << 20);
    for mode in [Mode::GrpcH2, Mode::WebBinaryH2, Mode::WebTextH2] {
        let reply = RawClient::new(addr, mode)
            .call(UNARY_CALL, &[], &[&assembled])
            .await;
        assert_eq!(
            reply.grpc_status(),
            Some(RESOURCE_EXHAUSTED),
            "{mode:?}: {}",
            reply.grpc_message()
        );
        assert!(
            reply
                .grpc_message()
                .contains("buffer budget of 16384 bytes"),
            "{mode:?}: {}",
            reply.grpc_message()
        );
        let reply = RawClient::new(addr, mode)
            .call(UNARY_CALL, &[], &[&fragmented])
            .await;
        assert_eq!(
            reply.grpc_status(),
            Some(OK),
            "{mode:?}: {}",
            reply.grpc_message()
        );
    }
    assert_eq!(
        stack.stats().calls_started(),
        3,
        "only the fragmented calls reached the upstream"
    );
    let text = metrics(&stack).await;
    assert_eq!(
        sample(
            &text,
            "pnp_buffer_budget_refusals_total{reason=\"request\"}"
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(sample(&text, "pnp_buffered_bytes"), Some(0.0), "{text}");
}

/// An HTTP/2 client connection without calls is closed after the idle timeout (GOAWAY), after
/// serving its calls normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed() {
    let stack = Stack::start_with(|c| {
        c.listener.idle_timeout = Some(Duration::from_millis(300));
    })
    .await;
    let addr = stack.proxy_addr();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("handshake");
    let connection = tokio::spawn(connection);
    empty_call_over(&client, addr).await;
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the idle connection was not closed cleanly: {ended:?}"
    );
}

/// A peer that never answers pnp's keepalive PING (idle timeout off, so only the PING can
/// close it) is disconnected after the keepalive timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_peer_that_ignores_pings_is_disconnected() {
    let stack = Stack::start_with(|c| {
        c.listener.idle_timeout = None;
        c.listener.keepalive_interval = Some(Duration::from_millis(200));
        c.listener.keepalive_timeout = Duration::from_millis(200);
    })
    .await;
    let mut tcp = TcpStream::connect(stack.proxy_addr())
        .await
        .expect("connect");
    // The preface and an empty SETTINGS frame; then nothing, not even SETTINGS ACK or PING ACK.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("preface");
    let started = Instant::now();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    assert!(
        read.is_ok(),
        "the silent peer was still connected after 5 s"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "closed after {:?}, before a PING could go unanswered",
        started.elapsed()
    );
    // What pnp sent includes a PING frame (type 6) before it gave up.
    assert!(
        sink.windows(4).any(|w| w[0] == 0 && w[1] == 8 && w[2] == 6),
        "no PING seen in {} bytes",
        sink.len()
    );
}

/// A profile's own message limit governs its calls (checked from the frame header, before the
/// message is read); other calls keep the global limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_sets_its_own_message_limit() {
    let stack = Stack::start_with(|c| {
        c.jobs.profiles.insert(
            "tiny".into(),
            Profile {
                max_message_size: Some(1024),
                ..Profile::default()
            },
        );
        c.jobs.routes.push(pnp_config::Route {
            service: None,
            method: Some("UnaryCall".into()),
            job: None,
            profile: "tiny".into(),
        });
    })
    .await;
    let addr = stack.proxy_addr();
    let request = encode(&pnp_demo::pb::grpc_testing::SimpleRequest {
        response_size: 16,
        payload: Some(pnp_demo::pb::grpc_testing::Payload {
            body: vec![1; 2048],
            ..Default::default()
        }),
        ..Default::default()
    });
    for mode in [Mode::GrpcH2, Mode::WebBinaryH1] {
        let reply = RawClient::new(addr, mode)
            .call(UNARY_CALL, &[], &[&request])
            .await;
        assert_eq!(reply.grpc_status(), Some(RESOURCE_EXHAUSTED), "{mode:?}");
        assert!(
            reply.grpc_message().contains("limit of 1024 bytes"),
            "{mode:?}: {}",
            reply.grpc_message()
        );
        // The limit holds for the reply too.
        let big_reply = encode(&pnp_demo::pb::grpc_testing::SimpleRequest {
            response_size: 2048,
            ..Default::default()
        });
        let reply = RawClient::new(addr, mode)
            .call(UNARY_CALL, &[], &[&big_reply])
            .await;
        assert_eq!(reply.grpc_status(), Some(RESOURCE_EXHAUSTED), "{mode:?}");
        assert!(
            reply.grpc_message().contains("limit of 1024 bytes"),
            "{mode:?}: {}",
            reply.grpc_message()
        );
        // A 2 KiB reply under the default profile is fine.
        let reply = RawClient::new(addr, mode)
            .call(STREAMING_OUTPUT_CALL, &[], &[&streaming_output(1, 2048)])
            .await;
        assert_eq!(
            reply.grpc_status(),
            Some(OK),
            "{mode:?}: {}",
            reply.grpc_message()
        );
    }
}

/// Over HTTP/1.1 a client that stops reading is not waited for: at its deadline the upstream is
/// cancelled, and the status either still fits in what was buffered for the client or, if it
/// cannot be written, the connection (which carries only that call) is closed. Either way the
/// client ends up with a closed connection and never an OK status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_stops_reading_has_its_connection_closed() {
    let stack = Stack::start().await;
    let addr = stack.proxy_addr();
    let tcp = tokio::net::TcpSocket::new_v4().expect("socket");
    // A small receive buffer, so the stall shows quickly.
    tcp.set_recv_buffer_size(16 * 1024).expect("rcvbuf");
    let mut tcp = tcp.connect(addr).await.expect("connect");
    // Whole messages (64 KiB, not fragmented), so the call ends between two of them and its
    // status is a frame pnp could write if the client read.
    let body = frame(&streaming_output(512, 64 * 1024 - 16));
    let head = format!(
        "POST {STREAMING_OUTPUT_CALL} HTTP/1.1\r\nhost: pnp\r\ncontent-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\ngrpc-timeout: 1S\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.expect("head");
    tcp.write_all(&body).await.expect("body");
    let started = Instant::now();
    // Not a byte read until well after the deadline.
    assert!(
        stack
            .stats()
            .wait_cancelled(1, Duration::from_secs(5))
            .await,
        "the upstream call was not cancelled at the deadline"
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Read what there is: up to the end of the response (its last chunk) or of the connection.
    let mut received = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = tcp.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return true;
            }
            received.extend_from_slice(&buf[..n]);
            if received.ends_with(b"\r\n0\r\n\r\n") {
                return false;
            }
        }
    })
    .await;
    let Ok(closed) = read else {
        panic!(
            "neither a status nor a close {:?} after the start",
            started.elapsed()
        );
    };
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(
        !text.contains("grpc-status:0"),
        "a stream cut by its deadline must not end OK"
    );
    assert!(
        received.len() < 16 << 20,
        "all {} bytes arrived; the stall never happened",
        received.len()
    );
    // Either the status still fitted into what was buffered for the client (then it is the
    // deadline's), or the connection was closed for it (counted as a client reset).
    let metrics = metrics(&stack).await;
    let resets = sample(&metrics, "pnp_client_resets_total{protocol=\"h1\"}");
    if text.contains("grpc-status:") {
        assert!(text.contains("grpc-status:4"), "the deadline's status");
    } else {
        assert!(closed, "no status, and the connection is still open");
        assert_eq!(resets, Some(1.0), "{metrics}");
    }
}
