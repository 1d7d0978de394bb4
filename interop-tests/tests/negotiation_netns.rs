//! Transport negotiation over a real, impaired network path: the cluster pnp runs in a network
//! namespace the test creates (its own process, `interop-cluster`), joined to the test's edge
//! pnp by a veth pair, and nftables inside the namespace blocks or loses UDP:
//!
//! - UDP to the peer blocked: calls that prefer QUIC are carried by HTTP/2 within the 500 ms
//!   negotiation budget, and every call succeeds;
//! - 10 % of UDP packets lost each way: calls over QUIC still succeed (≥ 99.9 % of 1 000).
//!
//! Needs root, iproute2 and nftables; without them the tests say so and skip (and fail under
//! `PNP_REQUIRE_NETNS=1`, which `.ci/run` sets).

mod support;

use std::net::IpAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

use support::h3::{dev_certs_for, Certs};
use support::negotiation::{carried_by, edge, fell_back, unary};
use support::netns::{dropped, Netns};

const BUDGET: Duration = Duration::from_millis(500);

/// The cluster pnp inside the namespace; killed when dropped.
struct Cluster {
    _child: tokio::process::Child,
    tcp: u16,
    udp: u16,
}

async fn cluster_in(ns: &Netns, certs: &Certs) -> Cluster {
    let mut child = ns
        .command(
            env!("CARGO_BIN_EXE_interop-cluster"),
            &[
                &ns.ns_ip.to_string(),
                &certs.files.cert.display().to_string(),
                &certs.files.key.display().to_string(),
            ],
        )
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("interop-cluster");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the cluster starts within 20 s")
        .expect("reading its stdout")
        .expect("a line");
    let port = |key: &str| -> u16 {
        line.split(' ')
            .find_map(|w| w.strip_prefix(key))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    };
    Cluster {
        tcp: port("tcp="),
        udp: port("udp="),
        _child: child,
    }
}

fn transports(ns: &Netns, cluster: &Cluster) -> String {
    format!(
        r#"
        [upstream]
        transports = ["h3://{ip}:{udp}", "https://{ip}:{tcp}"]
        "#,
        ip = ns.ns_ip,
        udp = cluster.udp,
        tcp = cluster.tcp
    )
}

/// `calls` unary calls through `edge`, `concurrency` at a time: (OK count, count per
/// transport, latencies).
async fn load(
    edge: std::net::SocketAddr,
    calls: usize,
    concurrency: usize,
) -> (usize, Vec<(String, usize)>, Vec<Duration>) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < calls {
                let (reply, took) = unary(edge, &[], 64, 64).await;
                seen.push((
                    reply.grpc_status() == Some(0),
                    carried_by(&reply).to_owned(),
                    took,
                ));
            }
            seen
        }));
    }
    let mut ok = 0;
    let mut by: Vec<(String, usize)> = Vec::new();
    let mut latencies = Vec::new();
    for task in tasks {
        for (success, transport, took) in task.await.expect("load task") {
            ok += usize::from(success);
            match by.iter_mut().find(|(t, _)| *t == transport) {
                Some((_, n)) => *n += 1,
                None => by.push((transport, 1)),
            }
            latencies.push(took);
        }
    }
    latencies.sort();
    (ok, by, latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_to_the_peer_blocked_calls_that_prefer_quic_go_over_http2_within_the_budget() {
    let Some(ns) = Netns::or_skip("udp_blocked") else {
        return;
    };
    let certs = dev_certs_for(&[IpAddr::V4(ns.ns_ip)]);
    let cluster = cluster_in(&ns, &certs).await;
    ns.nft(&format!(
        "table inet pnp {{\n chain input {{\n type filter hook input priority 0; policy accept;\n udp dport {} counter drop comment \"blocked\"\n }}\n}}\n",
        cluster.udp
    ));
    let edge = edge(&transports(&ns, &cluster), &certs).await;

    let (first, took) = unary(edge.local_addr(), &[], 64, 64).await;
    first.assert_ok();
    assert_eq!(carried_by(&first), "h2");
    assert!(fell_back(&first));
    assert!(
        took < BUDGET + Duration::from_millis(300),
        "carried by HTTP/2 within the budget: {took:?}"
    );
    let (ok, by, latencies) = load(edge.local_addr(), 500, 8).await;
    println!(
        "UDP blocked: first call {took:?}; then {ok}/500 OK, by transport {by:?}, p50 {:?}, p99 {:?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    assert_eq!(ok, 500, "every call succeeds");
    assert_eq!(by, [("h2".to_owned(), 500)]);
    assert!(
        dropped(&ns.nft_list(), "blocked") > 0,
        "the firewall dropped QUIC packets:\n{}",
        ns.nft_list()
    );
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_10_percent_udp_loss_calls_over_quic_still_succeed() {
    let Some(ns) = Netns::or_skip("udp_loss") else {
        return;
    };
    let certs = dev_certs_for(&[IpAddr::V4(ns.ns_ip)]);
    let cluster = cluster_in(&ns, &certs).await;
    ns.nft(
        "table inet pnp {
            chain input {
                type filter hook input priority 0; policy accept;
                meta l4proto udp numgen random mod 10 == 0 counter drop comment \"loss-in\"
            }
            chain output {
                type filter hook output priority 0; policy accept;
                meta l4proto udp numgen random mod 10 == 0 counter drop comment \"loss-out\"
            }
        }
        ",
    );
    let edge = edge(&transports(&ns, &cluster), &certs).await;
    // A handshake whose packets are lost takes longer than the 500 ms budget (QUIC's first
    // retransmission waits about a second): meanwhile calls go over HTTP/2, the attempt goes
    // on in the background, and the prober brings QUIC back once it is up.
    let warming = Instant::now();
    loop {
        let (reply, _) = unary(edge.local_addr(), &[], 64, 64).await;
        reply.assert_ok();
        if carried_by(&reply) == "h3" {
            break;
        }
        assert!(
            warming.elapsed() < Duration::from_secs(15),
            "QUIC never carried a call over the lossy path"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("QUIC up over the lossy path after {:?}", warming.elapsed());
    let started = Instant::now();
    let (ok, by, latencies) = load(edge.local_addr(), 1000, 10).await;
    let rules = ns.nft_list();
    let lost = dropped(&rules, "loss-in") + dropped(&rules, "loss-out");
    println!(
        "10% UDP loss each way: {ok}/1000 OK in {:?}, by transport {by:?}, p50 {:?}, p99 {:?}, {lost} UDP packets dropped",
        started.elapsed(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    assert!(ok >= 999, "≥ 99.9 % succeed: {ok}/1000");
    let quic = by.iter().find(|(t, _)| t == "h3").map_or(0, |(_, n)| *n);
    assert!(
        quic >= 990,
        "QUIC carries the calls despite the loss: {by:?}"
    );
    assert!(
        lost > 50,
        "the loss was real: {lost} packets dropped\n{rules}"
    );
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_blocked_mid_run_new_calls_move_to_http2_and_the_switch_time_is_reported() {
    let Some(ns) = Netns::or_skip("udp_blocked_mid_run") else {
        return;
    };
    let certs = dev_certs_for(&[IpAddr::V4(ns.ns_ip)]);
    let cluster = cluster_in(&ns, &certs).await;
    let edge = edge(&transports(&ns, &cluster), &certs).await;
    let addr = edge.local_addr();
    let (warm, _) = unary(addr, &[], 64, 64).await;
    warm.assert_ok();
    assert_eq!(carried_by(&warm), "h3");

    // Calls arrive every 10 ms whatever happens to the ones before (an open loop, as traffic
    // does), each with a 1 s deadline; each is kept with when it started and how it ended.
    let t0 = Instant::now();
    let mut calls = Vec::new();
    let mut blocked = None;
    for i in 0..250u32 {
        tokio::time::sleep_until((t0 + Duration::from_millis(10) * i).into()).await;
        if i == 50 {
            blocked = Some(Instant::now());
            ns.nft(&format!(
                "table inet pnp {{\n chain input {{\n type filter hook input priority 0; policy accept;\n udp dport {} counter drop comment \"blocked\"\n }}\n}}\n",
                cluster.udp
            ));
        }
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let (reply, _) = unary(addr, &[("grpc-timeout", "1S")], 64, 64).await;
            (started, reply.grpc_status(), carried_by(&reply).to_owned())
        }));
    }
    let blocked = blocked.expect("blocked");
    let mut replies = Vec::new();
    for call in calls {
        replies.push(call.await.expect("call"));
    }
    let before: Vec<_> = replies.iter().filter(|(at, ..)| *at < blocked).collect();
    assert!(
        before
            .iter()
            .all(|(_, code, t)| *code == Some(0) && t == "h3"),
        "before the block every call goes over QUIC: {before:?}"
    );
    let after: Vec<_> = replies
        .iter()
        .filter(|(at, ..)| *at >= blocked)
        .map(|(at, code, t)| (at.duration_since(blocked), *code, t.as_str()))
        .collect();
    // The switch: from when on every new call went over HTTP/2.
    let last_on_quic = after
        .iter()
        .filter(|(_, _, t)| *t != "h2")
        .map(|(at, ..)| *at)
        .max()
        .unwrap_or_default();
    let failed = after.iter().filter(|(_, code, _)| *code != Some(0)).count();
    let later = after.iter().filter(|(at, ..)| *at > last_on_quic).count();
    println!(
        "QUIC blocked mid-run: calls started up to {last_on_quic:?} after the block went over QUIC (and ended with DEADLINE_EXCEEDED: {failed} of {}), every call started later ({later}) over HTTP/2",
        after.len()
    );
    assert!(
        last_on_quic < Duration::from_millis(500),
        "new calls leave the blocked transport within the 500 ms budget: {after:?}"
    );
    assert!(
        after
            .iter()
            .filter(|(at, ..)| *at > last_on_quic)
            .all(|(_, code, t)| *code == Some(0) && *t == "h2"),
        "after the switch every call succeeds over HTTP/2: {after:?}"
    );
    assert!(later >= 150, "{after:?}");
    edge.shutdown().await;
}
