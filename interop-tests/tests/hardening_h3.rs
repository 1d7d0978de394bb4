//! The misbehaving clients of `hardening.rs`, against the HTTP/3 listener, with the default
//! clocks on: a client that stops reading (its streams are ended at their deadline and cost the
//! other calls on its own connection nothing), the idle clock firing once a message reset it,
//! and a client that vanishes (no CONNECTION_CLOSE, no more packets): its calls upstream are
//! cancelled within the listener's keepalive bound.

mod support;

use std::time::{Duration, Instant};

use bytes::Buf;
use pnp_demo::pb::grpc_testing::{ResponseParameters, StreamingOutputCallRequest};
use pnp_demo::pb::llm::GenerateRequest;
use pnp_demo::DemoUpstream;
use pnp_interop_tests::admin::{sample, scrape_metrics};
use pnp_interop_tests::interop::{encode, EMPTY_CALL, GENERATE, STREAMING_OUTPUT_CALL};
use pnp_interop_tests::raw::encode_frames;
use pnp_interop_tests::stack::upstream_url;
use support::h3::{cluster, dev_certs, h3_connect_with, loopback, Certs};

type Send = h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes>;

fn request(port: u16, path: &str, timeout: Option<&str>) -> http::Request<()> {
    let mut builder = http::Request::post(format!("https://localhost:{port}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(timeout) = timeout {
        builder = builder.header("grpc-timeout", timeout);
    }
    builder.body(()).expect("request")
}

/// An HTTP/3 connection whose streams take at most `window` bytes unread.
async fn client(addr: std::net::SocketAddr, certs: &Certs, window: u32) -> (quinn::Endpoint, Send) {
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(window.into());
    h3_connect_with(addr, &certs.ca, transport)
        .await
        .expect("an HTTP/3 connection")
}

/// The status of a call whose response the client reads whole.
async fn finish(
    mut stream: h3::client::RequestStream<h3_quinn::BidiStream<bytes::Bytes>, bytes::Bytes>,
) -> Result<(usize, Option<String>), String> {
    let response = stream.recv_response().await.map_err(|e| e.to_string())?;
    let mut bytes = 0;
    let mut status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    while let Some(chunk) = stream.recv_data().await.map_err(|e| e.to_string())? {
        bytes += chunk.remaining();
    }
    if let Some(trailers) = stream.recv_trailers().await.map_err(|e| e.to_string())? {
        status = trailers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap_or("").to_owned());
    }
    Ok((bytes, status))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http3_client_that_stops_reading_costs_its_other_calls_nothing_and_is_ended_at_its_deadline(
) {
    let upstream = DemoUpstream::start(loopback()).await.expect("upstream");
    let certs = dev_certs();
    let pnp = cluster(upstream_url(upstream.local_addr()), &certs, |_| {}).await;
    let addr = pnp.local_h3_addr().expect("h3");
    let (_endpoint, mut send) = client(addr, &certs, 16 * 1024).await;
    let body = encode_frames(&[&encode(&StreamingOutputCallRequest {
        response_parameters: (0..8)
            .map(|_| ResponseParameters {
                size: 256 * 1024,
                ..ResponseParameters::default()
            })
            .collect(),
        ..StreamingOutputCallRequest::default()
    })]);
    let started = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut stream = send
            .send_request(request(addr.port(), STREAMING_OUTPUT_CALL, Some("2S")))
            .await
            .expect("request");
        stream.send_data(body.clone()).await.expect("body");
        stream.finish().await.expect("finish");
        stream.recv_response().await.expect("response head");
        // Read nothing more.
        stalled.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The same connection's other calls go through at once.
    for _ in 0..3 {
        let asked = Instant::now();
        let mut stream = send
            .send_request(request(addr.port(), EMPTY_CALL, Some("8S")))
            .await
            .expect("request");
        stream.send_data(encode_frames(&[&[]])).await.expect("body");
        stream.finish().await.expect("finish");
        let (_, status) = finish(stream).await.expect("a reply");
        assert_eq!(status.as_deref(), Some("0"));
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "a call on the stalled client's connection waited {:?}",
            asked.elapsed()
        );
    }

    // The stalled streams end at their 2 s deadline: never a clean end. (Reading earlier
    // would open their windows: QUIC gives window back as the application reads.)
    tokio::time::sleep_until((started + Duration::from_millis(2_300)).into()).await;
    for mut stream in stalled {
        let ended = loop {
            match stream.recv_data().await {
                Ok(Some(_)) => continue,
                Ok(None) => {
                    let trailers = stream.recv_trailers().await;
                    break format!("{trailers:?}");
                }
                Err(e) => break e.to_string(),
            }
        };
        assert!(
            !ended.contains("grpc-status\": \"0"),
            "a stalled stream ended OK: {ended}"
        );
    }
    let ended = started.elapsed();
    assert!(
        ended < Duration::from_millis(4_000),
        "stalled streams lasted {ended:?} (deadline 2 s)"
    );
    assert!(
        upstream
            .stats()
            .wait_cancelled(8, Duration::from_secs(5))
            .await,
        "the upstream calls of the stalled streams were not cancelled"
    );
    let text = scrape_metrics(pnp.admin_addr().expect("admin")).await;
    assert_eq!(
        sample(&text, "pnp_clock_expiries_total{clock=\"deadline\"}"),
        Some(8.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "pnp_active_streams{transport=\"h2\"}"),
        Some(0.0),
        "{text}"
    );
    pnp.shutdown_with_grace(Duration::from_millis(100)).await;
    upstream.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http3_the_idle_clock_fires_after_the_first_message() {
    let upstream = DemoUpstream::start(loopback()).await.expect("upstream");
    let certs = dev_certs();
    let pnp = cluster(upstream_url(upstream.local_addr()), &certs, |c| {
        c.jobs.default_profile_mut().idle_timeout = Some(Duration::from_secs(2));
    })
    .await;
    let addr = pnp.local_h3_addr().expect("h3");
    let (_endpoint, mut send) = client(addr, &certs, 1 << 20).await;
    let body = encode_frames(&[&encode(&GenerateRequest {
        prompt: "idle".into(),
        max_tokens: 2,
        seed: Some(1),
        first_token_delay_ms: Some(200),
        token_interval_ms: Some(6_000),
        ..Default::default()
    })]);
    let mut stream = send
        .send_request(request(addr.port(), GENERATE, None))
        .await
        .expect("request");
    stream.send_data(body).await.expect("body");
    stream.finish().await.expect("finish");
    stream.recv_response().await.expect("head");
    let first = stream
        .recv_data()
        .await
        .expect("data")
        .expect("the first token");
    drop(first);
    let at_first = Instant::now();
    if let Some(more) = stream.recv_data().await.expect("data") {
        panic!(
            "a second token within the idle limit: {} bytes",
            more.remaining()
        );
    }
    let trailers = stream
        .recv_trailers()
        .await
        .expect("trailers")
        .expect("a status");
    let silence = at_first.elapsed();
    assert_eq!(trailers["grpc-status"], "14", "{trailers:?}");
    assert!(
        trailers["grpc-message"]
            .to_str()
            .is_ok_and(|m| m.contains("idle")),
        "{trailers:?}"
    );
    assert!(
        (Duration::from_millis(1_800)..Duration::from_millis(3_500)).contains(&silence),
        "the idle clock fired {silence:?} after the first message (limit 2 s)"
    );
    assert!(
        upstream
            .stats()
            .wait_cancelled(1, Duration::from_secs(3))
            .await
    );
    pnp.shutdown_with_grace(Duration::from_millis(100)).await;
    upstream.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http3_client_that_vanishes_has_its_calls_cancelled_upstream_within_the_keepalive_bound()
{
    let upstream = DemoUpstream::start(loopback()).await.expect("upstream");
    let certs = dev_certs();
    let pnp = cluster(upstream_url(upstream.local_addr()), &certs, |c| {
        c.listener.keepalive_interval = Some(Duration::from_millis(500));
        c.listener.keepalive_timeout = Duration::from_millis(1_000);
    })
    .await;
    let addr = pnp.local_h3_addr().expect("h3");
    // A client on a socket it can silence: a UDP relay in between that stops forwarding.
    let relay = tokio::net::UdpSocket::bind(loopback())
        .await
        .expect("relay");
    let relay_addr = relay.local_addr().expect("relay addr");
    let alive = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let forwarding = alive.clone();
    tokio::spawn(async move {
        let mut client = None;
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, from)) = relay.recv_from(&mut buf).await else {
                return;
            };
            if !forwarding.load(std::sync::atomic::Ordering::Relaxed) {
                continue;
            }
            if from == addr {
                if let Some(client) = client {
                    let _ = relay.send_to(&buf[..n], client).await;
                }
            } else {
                client = Some(from);
                let _ = relay.send_to(&buf[..n], addr).await;
            }
        }
    });
    let (endpoint, mut send) = client(relay_addr, &certs, 1 << 20).await;
    let body = encode_frames(&[&encode(&GenerateRequest {
        prompt: "vanish".into(),
        max_tokens: 100,
        seed: Some(2),
        first_token_delay_ms: Some(10),
        token_interval_ms: Some(200),
        ..Default::default()
    })]);
    let mut stream = send
        .send_request(request(relay_addr.port(), GENERATE, None))
        .await
        .expect("request");
    stream.send_data(body).await.expect("body");
    stream.finish().await.expect("finish");
    stream.recv_response().await.expect("head");
    stream
        .recv_data()
        .await
        .expect("data")
        .expect("the first token");
    // The client vanishes: nothing from it reaches pnp again, no close.
    alive.store(false, std::sync::atomic::Ordering::Relaxed);
    let vanished = Instant::now();
    assert!(
        upstream
            .stats()
            .wait_cancelled(1, Duration::from_secs(6))
            .await,
        "the vanished client's call was not cancelled upstream"
    );
    let noticed = vanished.elapsed();
    println!("a vanished HTTP/3 client's call was cancelled upstream after {noticed:?}");
    assert!(
        noticed < Duration::from_secs(4),
        "keepalive 0.5 s + timeout 1 s, noticed after {noticed:?}"
    );
    drop(stream);
    drop(send);
    drop(endpoint);
    pnp.shutdown_with_grace(Duration::from_millis(100)).await;
    upstream.shutdown().await;
}
