//! What only a UCX bridge has (the cases every bridge has run in `bridge.rs`, the bulk ones in
//! `bulk_bridge_ucx_*.rs`): the cluster pnp killed mid-stream (SIGKILL, a process of its own)
//! is UNAVAILABLE at the edge's client at once, never a clean end; and token streams keep their
//! pace while a bulk call shares the UCX connection. Needs the system UCX (`--features ucx`).
#![cfg(feature = "ucx")]

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use pnp_demo::pb::grpc_testing::SimpleRequest;
use pnp_demo::pb::llm::GenerateRequest;
use pnp_interop_tests::interop::{encode, GENERATE};
use pnp_interop_tests::{Mode, RawClient, Stack};
use tokio::io::{AsyncBufReadExt, BufReader};

use support::bridge::{pair, ucx_loopback, Hop};
use support::h3::dev_certs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_pnp_killed_mid_stream_is_unavailable_at_the_edge() {
    let certs = dev_certs();
    let mut cluster = tokio::process::Command::new(env!("CARGO_BIN_EXE_interop-cluster"))
        .args([
            "127.0.0.1",
            &certs.files.cert.display().to_string(),
            &certs.files.key.display().to_string(),
        ])
        .env("PNP_CLUSTER_UCX", "1")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("interop-cluster");
    let mut lines = BufReader::new(cluster.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the cluster starts")
        .expect("stdout")
        .expect("a line");
    let port = line
        .split(' ')
        .find_map(|w| w.strip_prefix("ucx="))
        .expect("a UCX port");
    let edge = Stack::proxy_for(
        url::Url::parse(&format!("ucx://127.0.0.1:{port}")).expect("url"),
        |config| config.upstream.ucx = ucx_loopback(),
    )
    .await;

    let request = encode(&GenerateRequest {
        prompt: "kill".into(),
        max_tokens: 1_000,
        seed: Some(3),
        first_token_delay_ms: Some(10),
        token_interval_ms: Some(20),
        ..Default::default()
    });
    let mut stream = RawClient::new(edge.local_addr(), Mode::GrpcH2)
        .start(GENERATE, &[], &[&request])
        .await;
    assert_eq!(stream.headers()["x-pnp-transport"], "ucx");
    for _ in 0..5 {
        stream.next_message().await.expect("a token");
    }
    cluster.start_kill().expect("kill");
    let killed = Instant::now();
    while stream.next_message().await.is_some() {}
    let (code, message) = stream.finish().await.expect("a status");
    let noticed = killed.elapsed();
    println!("cluster pnp killed: the edge's client got {code} ({message}) after {noticed:?}");
    assert_eq!(code, 14, "{message}");
    assert!(noticed < Duration::from_secs(3), "{noticed:?}");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_streams_keep_their_pace_while_a_bulk_call_shares_the_ucx_connection() {
    let upstream = pnp_demo::DemoUpstream::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("upstream");
    let (cluster, edge, _) = pair(
        Hop::Ucx,
        pnp_interop_tests::stack::upstream_url(upstream.local_addr()),
        |config| config.limits.max_message_size = 64 << 20,
    )
    .await;
    let addr = edge.local_addr();
    let bulk = tokio::spawn(async move {
        let request = encode(&SimpleRequest {
            response_size: 32 << 20,
            ..SimpleRequest::default()
        });
        let started = Instant::now();
        let mut bytes = 0;
        for _ in 0..4 {
            let reply = RawClient::new(addr, Mode::GrpcH2)
                .call("/grpc.testing.TestService/UnaryCall", &[], &[&request])
                .await;
            reply.assert_ok();
            bytes += reply.messages.iter().map(|m| m.len()).sum::<usize>();
        }
        (bytes, started.elapsed())
    });
    // 20 token streams, a token every 20 ms: the largest gap a client sees.
    let mut streams = Vec::new();
    for seed in 0..20u64 {
        streams.push(tokio::spawn(async move {
            let request = encode(&GenerateRequest {
                prompt: "pace".into(),
                max_tokens: 50,
                seed: Some(seed),
                first_token_delay_ms: Some(5),
                token_interval_ms: Some(20),
                ..Default::default()
            });
            let mut stream = RawClient::new(addr, Mode::GrpcH2)
                .start(GENERATE, &[], &[&request])
                .await;
            let mut last = None;
            let mut worst = Duration::ZERO;
            let mut tokens = 0;
            while let Some((_, at)) = stream.next_message().await {
                if let Some(last) = last {
                    worst = worst.max(at.duration_since(last));
                }
                last = Some(at);
                tokens += 1;
            }
            let (code, _) = stream.finish().await.expect("status");
            (code, tokens, worst)
        }));
    }
    let mut worst = Duration::ZERO;
    for stream in streams {
        let (code, tokens, gap) = stream.await.expect("stream");
        assert_eq!(code, 0);
        assert_eq!(tokens, 50);
        worst = worst.max(gap);
    }
    let (bytes, took) = bulk.await.expect("bulk");
    println!(
        "20 token streams beside {} MiB of bulk in {took:?} over one UCX connection: worst token gap {worst:?} (nominal 20 ms)",
        bytes >> 20
    );
    assert!(worst < Duration::from_millis(500), "{worst:?}");
    edge.shutdown().await;
    cluster.shutdown().await;
    upstream.shutdown().await;
}
