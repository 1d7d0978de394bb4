//! Transport negotiation end to end on loopback: an edge pnp with one peer (a cluster pnp in
//! front of the demo upstream) reachable over HTTP/2, HTTP/3 and chunked HTTP/1.1, configured
//! from TOML as README's bridging section shows, choosing per call:
//!
//! - a QUIC peer that never answers: calls that prefer HTTP/3 are carried by HTTP/2 within the
//!   500 ms budget, every one succeeds, later calls do not wait for QUIC at all, and the reply
//!   says `x-grpc-web-fallback: true`;
//! - a size hint over 4 GB selects QUIC for that call;
//! - three consecutive failures of a job's transport move the job to the next one;
//! - a job whose traffic crosses its throughput threshold moves to the faster transport for new
//!   calls within one averaging window, and back when it falls;
//! - an operator forces or forbids a transport through the admin endpoint.
//!
//! The same with real packet loss and a firewall, in a network namespace: `negotiation_netns.rs`.

mod support;

use std::time::{Duration, Instant};

use pnp_interop_tests::admin::{sample, scrape_metrics};
use pnp_interop_tests::faults::ClosedPort;
use pnp_interop_tests::interop::encode;
use pnp_interop_tests::{Mode, RawClient};
use support::negotiation::{admin, black_hole, carried_by, edge, fell_back, unary, Peer};

const BUDGET: Duration = Duration::from_millis(500);

/// A loopback TCP port where connections are refused, held until the guard drops.
fn refused_port() -> (ClosedPort, u16) {
    let closed = ClosedPort::new().expect("a closed port");
    let port = closed.addr().port();
    (closed, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_peer_that_never_answers_is_skipped_within_the_budget_and_http2_carries_every_call()
{
    let peer = Peer::start().await;
    let (_hole, port) = black_hole();
    let edge = edge(
        &format!(
            r#"
            [upstream]
            transports = ["h3://localhost:{port}", "{h2}"]
            "#,
            h2 = peer.h2()
        ),
        &peer.certs,
    )
    .await;

    let (first, took) = unary(edge.local_addr(), &[], 0, 10).await;
    first.assert_ok();
    assert_eq!(carried_by(&first), "h2");
    assert!(fell_back(&first), "{:?}", first.headers);
    assert!(
        took >= BUDGET && took < BUDGET + Duration::from_millis(400),
        "the first call waits the budget for QUIC, then goes over HTTP/2: {took:?}"
    );

    // QUIC is now known to be down: no call waits for it again.
    let mut slowest = Duration::ZERO;
    for _ in 0..100 {
        let (reply, took) = unary(edge.local_addr(), &[], 0, 10).await;
        reply.assert_ok();
        assert_eq!(carried_by(&reply), "h2");
        assert!(fell_back(&reply));
        slowest = slowest.max(took);
    }
    assert!(
        slowest < Duration::from_millis(250),
        "calls after the first skip the failed transport at once; slowest {slowest:?}"
    );
    let metrics = scrape_metrics(edge.admin_addr().expect("admin")).await;
    assert_eq!(
        sample(&metrics, r#"pnp_transport_health{transport="h3"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&metrics, r#"pnp_transport_health{transport="h2"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            r#"pnp_transport_selected_total{job="default",transport="h2",reason="fallback"}"#
        ),
        Some(101.0),
        "{metrics}"
    );
    edge.shutdown().await;
    peer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_that_comes_back_is_found_by_the_background_probe() {
    let peer = Peer::start().await;
    // HTTP/1.1 first, but nothing listens on its port yet (connections are refused).
    let (hold, port) = refused_port();
    let edge = edge(
        &format!(
            r#"
            [upstream]
            transports = ["h1://127.0.0.1:{port}", "{h2}"]
            "#,
            h2 = peer.h2()
        ),
        &peer.certs,
    )
    .await;
    let (reply, _) = unary(edge.local_addr(), &[], 0, 10).await;
    reply.assert_ok();
    assert_eq!(carried_by(&reply), "h2", "nothing listens on the h1 port");

    // A gRPC-Web server appears on that port: the prober finds it, and calls go back to h1
    // without any call having waited for it.
    let upstream = pnp_demo::DemoUpstream::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("demo upstream");
    drop(hold);
    let revived = pnp_interop_tests::Stack::proxy_for(
        pnp_interop_tests::stack::upstream_url(upstream.local_addr()),
        |config| {
            config.listener.addr = ([127, 0, 0, 1], port).into();
        },
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let opened = Instant::now();
    loop {
        let (reply, took) = unary(edge.local_addr(), &[], 0, 10).await;
        reply.assert_ok();
        assert!(
            took < Duration::from_millis(250),
            "no call waits for the probe: {took:?}"
        );
        if carried_by(&reply) == "h1" {
            assert!(!fell_back(&reply));
            break;
        }
        assert!(Instant::now() < deadline, "h1 never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "a revived transport carried calls again {:?} after it opened",
        opened.elapsed()
    );
    let metrics = scrape_metrics(edge.admin_addr().expect("admin")).await;
    assert_eq!(
        sample(&metrics, r#"pnp_transport_health{transport="h1"}"#),
        Some(1.0)
    );
    edge.shutdown().await;
    revived.shutdown().await;
    upstream.shutdown().await;
    peer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_hint_over_4_gb_selects_quic_for_that_call() {
    let peer = Peer::start().await;
    let edge = edge(
        &format!(
            r#"
            [upstream]
            transports = ["{h2}", "{h3}"]

            [profiles.model-load.negotiation]
            transports = ["h2", "h3"]
            rules = [{{ size_above = "4GB", to = "h3" }}]

            [[routes]]
            job = "model-load"
            profile = "model-load"
            "#,
            h2 = peer.h2(),
            h3 = peer.h3()
        ),
        &peer.certs,
    )
    .await;
    let job = ("x-pnp-job", "model-load");
    let (big, _) = unary(
        edge.local_addr(),
        &[job, ("x-pnp-size-hint", "5000000000")],
        0,
        10,
    )
    .await;
    big.assert_ok();
    assert_eq!(carried_by(&big), "h3");
    assert!(!fell_back(&big), "a rule's choice is no fallback");
    let (small, _) = unary(
        edge.local_addr(),
        &[job, ("x-pnp-size-hint", "1000000")],
        0,
        10,
    )
    .await;
    small.assert_ok();
    assert_eq!(carried_by(&small), "h2");
    let (unhinted, _) = unary(edge.local_addr(), &[job], 0, 10).await;
    assert_eq!(carried_by(&unhinted), "h2");
    let metrics = scrape_metrics(edge.admin_addr().expect("admin")).await;
    assert_eq!(
        sample(
            &metrics,
            r#"pnp_transport_selected_total{job="model-load",transport="h3",reason="size_hint"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    edge.shutdown().await;
    peer.shutdown().await;
}

/// A TCP server that takes each connection's request and closes it unanswered: a path whose
/// connections open but whose calls fail (a broken middlebox).
async fn call_breaker() -> (tokio::task::JoinHandle<()>, u16) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
            });
        }
    });
    (task, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_consecutive_failures_move_a_job_to_the_next_transport() {
    let peer = Peer::start().await;
    let (breaker, port) = call_breaker().await;
    let edge = edge(
        &format!(
            r#"
            [upstream]
            transports = ["h1://127.0.0.1:{port}", "{h2}"]

            [profiles.checkpoint]
            retry = {{ max_attempts = 1 }}
            [profiles.checkpoint.negotiation]
            transports = ["h1", "h2"]
            rules = [{{ failures = 3 }}]

            [[routes]]
            job = "checkpoint"
            profile = "checkpoint"
            "#,
            h2 = peer.h2()
        ),
        &peer.certs,
    )
    .await;
    let job = [("x-pnp-job", "checkpoint")];
    for i in 0..3 {
        let (reply, _) = unary(edge.local_addr(), &job, 0, 10).await;
        assert_ne!(
            reply.grpc_status(),
            Some(0),
            "call {i} over the broken path"
        );
        assert_eq!(carried_by(&reply), "h1", "call {i}");
    }
    let moved = Instant::now();
    let (reply, took) = unary(edge.local_addr(), &job, 0, 10).await;
    reply.assert_ok();
    assert_eq!(carried_by(&reply), "h2");
    assert!(fell_back(&reply));
    println!(
        "failure streak → next call on the new transport: {:?} (the call itself took {took:?})",
        moved.elapsed()
    );
    let (admin_code, status) =
        admin(edge.admin_addr().expect("admin"), "GET", "/negotiation").await;
    assert_eq!(admin_code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    let job = status["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["job"] == "checkpoint"))
        .expect("the checkpoint job");
    assert_eq!(job["current"], "h2", "{status}");
    breaker.abort();
    edge.shutdown().await;
    peer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_its_throughput_threshold_moves_within_one_window_and_back_when_it_falls() {
    const WINDOW: Duration = Duration::from_secs(1);
    let peer = Peer::start().await;
    let edge = edge(
        &format!(
            r#"
            [upstream]
            transports = ["{h2}", "{h3}"]

            [profiles.gradient-sync.negotiation]
            transports = ["h2", "h3"]
            window = "1s"
            rules = [{{ throughput_above = "8MB/s", to = "h3" }}]

            [[routes]]
            job = "gradients"
            profile = "gradient-sync"
            "#,
            h2 = peer.h2(),
            h3 = peer.h3()
        ),
        &peer.certs,
    )
    .await;
    let job = [("x-pnp-job", "gradients")];
    let (quiet, _) = unary(edge.local_addr(), &job, 0, 10).await;
    assert_eq!(carried_by(&quiet), "h2");

    // Gradient traffic: 1 MiB up and back per call, as fast as the calls go (well over
    // 8 MB/s on loopback).
    let started = Instant::now();
    let mut carried = 0u64;
    let switched = loop {
        let (reply, _) = unary(edge.local_addr(), &job, 1 << 20, 1 << 20).await;
        reply.assert_ok();
        carried += 2 << 20;
        if carried_by(&reply) == "h3" {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < 3 * WINDOW,
            "no switch after {:?} at {:.0} MB/s",
            started.elapsed(),
            carried as f64 / started.elapsed().as_secs_f64() / 1e6
        );
    };
    let rate = carried as f64 / started.elapsed().as_secs_f64();
    println!(
        "throughput rule: {:.0} MB/s against an 8 MB/s threshold; new calls moved to h3 after {switched:?}",
        rate / 1e6
    );
    assert!(
        switched <= WINDOW + Duration::from_millis(300),
        "moved within one window: {switched:?}"
    );

    // Traffic stops: once the average falls below the threshold less the hysteresis, new
    // calls go back to HTTP/2.
    tokio::time::sleep(3 * WINDOW).await;
    let (after, _) = unary(edge.local_addr(), &job, 0, 10).await;
    after.assert_ok();
    assert_eq!(carried_by(&after), "h2");
    let metrics = scrape_metrics(edge.admin_addr().expect("admin")).await;
    assert!(
        sample(
            &metrics,
            r#"pnp_transport_selected_total{job="gradient-sync",transport="h3",reason="throughput"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"pnp_job_throughput_bytes_per_second{job="gradient-sync"}"#),
        "{metrics}"
    );
    edge.shutdown().await;
    peer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_forces_and_forbids_a_transport_through_the_admin_endpoint() {
    let peer = Peer::start().await;
    let edge = edge(
        &format!(
            r#"
            [upstream]
            transports = ["{h2}", "{h3}", "{h1}"]
            "#,
            h2 = peer.h2(),
            h3 = peer.h3(),
            h1 = peer.h1()
        ),
        &peer.certs,
    )
    .await;
    let admin_addr = edge.admin_addr().expect("admin");
    let via = |reply: &pnp_interop_tests::RawReply| carried_by(reply).to_owned();
    let (reply, _) = unary(edge.local_addr(), &[], 0, 10).await;
    assert_eq!(via(&reply), "h2");

    let (code, body) = admin(
        admin_addr,
        "POST",
        "/negotiation/override?job=default&force=h3",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (reply, _) = unary(edge.local_addr(), &[], 0, 10).await;
    reply.assert_ok();
    assert_eq!(via(&reply), "h3");

    let (code, body) = admin(
        admin_addr,
        "POST",
        "/negotiation/override?job=default&clear&forbid=h2",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (reply, _) = unary(edge.local_addr(), &[], 0, 10).await;
    reply.assert_ok();
    assert_eq!(via(&reply), "h3", "h2 forbidden: the next in order");

    let (code, body) = admin(
        admin_addr,
        "POST",
        "/negotiation/override?job=default&clear&forbid=h2,h3",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (reply, _) = unary(edge.local_addr(), &[], 0, 10).await;
    reply.assert_ok();
    assert_eq!(via(&reply), "h1");

    for refused in [
        "/negotiation/override?job=default&forbid=h1,h2,h3",
        "/negotiation/override?job=default&force=ucx",
        "/negotiation/override?job=nosuch&force=h2",
        "/negotiation/override?force=h2",
    ] {
        let (code, body) = admin(admin_addr, "POST", refused).await;
        assert_eq!(code, 400, "{refused}: {body}");
    }
    let (code, _) = admin(
        admin_addr,
        "POST",
        "/negotiation/override?job=default&clear",
    )
    .await;
    assert_eq!(code, 200);
    let (reply, _) = unary(edge.local_addr(), &[], 0, 10).await;
    assert_eq!(via(&reply), "h2");
    edge.shutdown().await;
    peer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_call_falls_back_to_http1_when_http2_is_unavailable_and_the_page_can_read_why() {
    let peer = Peer::start().await;
    // Nothing listens where HTTP/2 should be: connections are refused at once.
    let (_hold, port) = refused_port();
    let edge = edge(
        &format!(
            r#"
            [upstream]
            transports = ["http://127.0.0.1:{port}", "{h1}"]

            [profiles.browser.negotiation]
            transports = ["h2", "h1"]
            budget = "500ms"

            [[routes]]
            service = "grpc.testing.TestService"
            profile = "browser"
            "#,
            h1 = peer.h1()
        ),
        &peer.certs,
    )
    .await;
    // A gRPC-Web call from a page on another origin, as grpc-web sends it over HTTP/1.1.
    let request = encode(&pnp_demo::pb::grpc_testing::SimpleRequest {
        response_size: 10,
        ..Default::default()
    });
    let started = Instant::now();
    let reply = RawClient::new(edge.local_addr(), Mode::WebBinaryH1)
        .call(
            "/grpc.testing.TestService/UnaryCall",
            &[("origin", "https://app.example.com")],
            &[&request],
        )
        .await;
    let took = started.elapsed();
    reply.assert_ok();
    assert_eq!(carried_by(&reply), "h1");
    assert!(fell_back(&reply), "{:?}", reply.headers);
    assert!(
        took < BUDGET,
        "a refused connection is skipped at once: {took:?}"
    );
    let exposed = reply
        .headers
        .get("access-control-expose-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        exposed.contains("x-grpc-web-fallback") && exposed.contains("x-pnp-transport"),
        "the page's script can read both: {exposed:?}"
    );
    edge.shutdown().await;
    peer.shutdown().await;
}
