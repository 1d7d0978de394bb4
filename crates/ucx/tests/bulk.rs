//! Large messages with checksums, client and server in two processes (this test binary runs
//! the server as its child): over loopback TCP and over shared memory (`UCX_TLS=sm`, which
//! needs the worker-address exchange). Also the four call shapes over shared memory.
#![cfg(feature = "ucx")]

mod support;

use std::time::Instant;

use futures_util::StreamExt;
use pnp_call::{Code, Message, Part, Reply, ReplyItem};
use pnp_transport::Transport;
use pnp_ucx::UcxTransport;
use support::*;

/// Serves the echo service when this binary runs as a child (see `ChildServer`).
#[test]
fn child_server() {
    let Ok(tls) = std::env::var("PNP_UCX_CHILD") else {
        return;
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(child_main(&tls));
}

/// Echo `len` bytes as one message through a server in another process; check every byte
/// came back; report the time.
async fn echo_bulk(tls: &str, len: usize) {
    let server = ChildServer::start("child_server", tls);
    let transport = UcxTransport::new(server.addr.to_string(), options(tls)).expect("transport");
    transport.ready().await.expect("connected");
    let data = bulk(len);
    let mut sent = Checksum::default();
    sent.update(&data);
    let started = Instant::now();
    let reply = transport
        .call(call(
            "/test.Echo/Echo",
            vec![Part::Message(Message::new(data))],
        ))
        .await
        .expect("reply");
    let Reply::Stream { mut items, .. } = reply else {
        panic!("a stream")
    };
    let mut got = Checksum::default();
    let (mut heads, mut last) = (0, false);
    let status = loop {
        match items.next().await.expect("an item") {
            ReplyItem::Head { len: announced, .. } => {
                heads += 1;
                assert_eq!(announced as usize, len);
            }
            ReplyItem::Fragment { data, last: l } => {
                assert!(!last, "nothing after the last fragment");
                got.update(&data);
                last = l;
            }
            ReplyItem::Message(m) => got.update(&m.data),
            ReplyItem::Status(status) => break status,
        }
    };
    let elapsed = started.elapsed();
    assert_eq!(status.code, Code::Ok, "{status:?}");
    assert_eq!((heads, last), (1, true));
    assert_eq!(got.finish(), sent.finish());
    let mib = len as f64 / f64::from(1 << 20);
    eprintln!(
        "UCX_TLS={tls}: {mib:.0} MiB echoed (both ways) in {elapsed:.2?}: {:.0} MiB/s each way",
        mib / elapsed.as_secs_f64()
    );
}

/// Send `len` bytes one way (the server counts them); report the time.
async fn upload(tls: &str, len: usize) {
    let server = ChildServer::start("child_server", tls);
    let transport = UcxTransport::new(server.addr.to_string(), options(tls)).expect("transport");
    transport.ready().await.expect("connected");
    let data = bulk(len);
    let started = Instant::now();
    let reply = transport
        .call(call(
            "/test.Echo/Count",
            vec![Part::Message(Message::new(data))],
        ))
        .await
        .expect("reply");
    let (_, messages, status) = collect(reply).await;
    let elapsed = started.elapsed();
    assert_eq!(status.code, Code::Ok, "{status:?}");
    assert_eq!(messages, vec![bytes::Bytes::from(format!("1 {len}"))]);
    let mib = len as f64 / f64::from(1 << 20);
    eprintln!(
        "UCX_TLS={tls}: {mib:.0} MiB uploaded in {elapsed:.2?}: {:.0} MiB/s",
        mib / elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_upload_over_tcp_and_shared_memory() {
    upload("tcp", 256 << 20).await;
    upload("sm", 256 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_message_crosses_tcp_intact() {
    echo_bulk("tcp", 256 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_message_crosses_shared_memory_intact() {
    echo_bulk("sm", 256 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_message_crosses_tcp_intact() {
    echo_bulk("tcp", 1 << 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_message_crosses_shared_memory_intact() {
    echo_bulk("sm", 1 << 30).await;
}

/// Sequential unary calls on an idle connection: their latencies are reported (no timing
/// assertion). A missed wakeup of the event-driven worker would show as ~100 ms outliers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_latency_on_an_idle_connection() {
    for tls in ["tcp", "sm"] {
        let server = ChildServer::start("child_server", tls);
        let transport =
            UcxTransport::new(server.addr.to_string(), options(tls)).expect("transport");
        transport.ready().await.expect("connected");
        let mut latencies = Vec::new();
        for _ in 0..1000 {
            let started = Instant::now();
            let (_, messages, status) = collect(
                transport
                    .call(call("/test.Echo/Echo", vec![message("token")]))
                    .await
                    .expect("reply"),
            )
            .await;
            assert_eq!((messages.len(), status.code), (1, Code::Ok));
            latencies.push(started.elapsed());
        }
        latencies.sort();
        eprintln!(
            "UCX_TLS={tls}: 1000 unary calls: median {:?}, p99 {:?}, max {:?}",
            latencies[500], latencies[990], latencies[999]
        );
    }
}

/// Small calls keep completing while a 256 MiB echo flows on the same connection; their
/// latencies are reported (no timing assertion: the machine is shared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_calls_progress_while_a_bulk_call_flows() {
    let server = ChildServer::start("child_server", "tcp");
    let transport = UcxTransport::new(server.addr.to_string(), options("tcp")).expect("transport");
    transport.ready().await.expect("connected");
    let bulk_call = tokio::spawn({
        let transport = transport.clone();
        async move {
            let data = bulk(256 << 20);
            let reply = transport
                .call(call(
                    "/test.Echo/Echo",
                    vec![Part::Message(Message::new(data))],
                ))
                .await
                .expect("reply");
            let (_, messages, status) = collect(reply).await;
            assert_eq!(status.code, Code::Ok);
            messages.iter().map(|m| m.len()).sum::<usize>()
        }
    });
    let mut latencies = Vec::new();
    let mut during = 0;
    while latencies.len() < 2000 {
        let started = Instant::now();
        let (_, messages, status) = collect(
            transport
                .call(call("/test.Echo/Echo", vec![message("token")]))
                .await
                .expect("reply"),
        )
        .await;
        assert_eq!((messages.len(), status.code), (1, Code::Ok));
        latencies.push(started.elapsed());
        if !bulk_call.is_finished() {
            during += 1;
        } else if latencies.len() >= 20 {
            break;
        }
    }
    assert_eq!(bulk_call.await.expect("join"), 256 << 20);
    assert!(during > 0, "small calls completed while the bulk call ran");
    latencies.sort();
    eprintln!(
        "{during} small calls completed during a 256 MiB echo over tcp: median {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_of_every_shape_over_shared_memory_between_processes() {
    let server = ChildServer::start("child_server", "sm");
    let transport = UcxTransport::new(server.addr.to_string(), options("sm")).expect("transport");
    // Unary.
    let (head, messages, status) = collect(
        transport
            .call(call("/test.Echo/Echo", vec![message("hello")]))
            .await
            .expect("reply"),
    )
    .await;
    assert_eq!(head.metadata.get("x-echo").expect("metadata"), "yes");
    assert_eq!((messages.len(), status.code), (1, Code::Ok));
    // Server streaming.
    let (_, messages, status) = collect(
        transport
            .call(call("/test.Echo/Repeat", vec![message("300")]))
            .await
            .expect("reply"),
    )
    .await;
    assert_eq!((messages.len(), status.code), (300, Code::Ok));
    // Client streaming.
    let parts = (0..50).map(|i| message(&format!("{i:02}"))).collect();
    let (_, messages, _) = collect(
        transport
            .call(call("/test.Echo/Count", parts))
            .await
            .expect("reply"),
    )
    .await;
    assert_eq!(messages, vec![bytes::Bytes::from_static(b"50 100")]);
    // Bidi, one message in flight at a time.
    let (tx, call) = streaming_call("/test.Echo/Echo");
    tx.send(Ok(message("0"))).await.expect("send");
    let Reply::Stream { mut items, .. } = transport.call(call).await.expect("reply") else {
        panic!("a stream")
    };
    for i in 0..10 {
        let Some(ReplyItem::Message(m)) = items.next().await else {
            panic!("an echo")
        };
        assert_eq!(m.data, bytes::Bytes::from(i.to_string()));
        tx.send(Ok(message(&(i + 1).to_string())))
            .await
            .expect("send");
    }
    drop(tx);
    drop(items);
}

/// 32 callers making small unary calls back to back on one connection, over tcp and over
/// shared memory: the rate and the latencies are reported. A send the worker leaves queued
/// without being woken again would show as calls stuck until the 100 ms safety tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_small_calls_do_not_stall() {
    for tls in ["tcp", "sm"] {
        let server = ChildServer::start("child_server", tls);
        let transport =
            UcxTransport::new(server.addr.to_string(), options(tls)).expect("transport");
        transport.ready().await.expect("connected");
        let started = Instant::now();
        let run_for = std::time::Duration::from_secs(2);
        let callers: Vec<_> = (0..32)
            .map(|_| {
                let transport = transport.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while started.elapsed() < run_for {
                        let began = Instant::now();
                        let (_, messages, status) = collect(
                            transport
                                .call(call("/test.Echo/Echo", vec![message("token")]))
                                .await
                                .expect("reply"),
                        )
                        .await;
                        assert_eq!((messages.len(), status.code), (1, Code::Ok));
                        latencies.push(began.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for caller in callers {
            latencies.extend(caller.await.expect("join"));
        }
        let elapsed = started.elapsed();
        latencies.sort();
        let n = latencies.len();
        eprintln!(
            "UCX_TLS={tls}: 32 callers: {n} calls in {elapsed:.2?} ({:.0}/s), median {:?}, p99 {:?}, max {:?}",
            n as f64 / elapsed.as_secs_f64(),
            latencies[n / 2],
            latencies[n * 99 / 100],
            latencies[n - 1]
        );
        assert!(n >= 32, "every caller finished a call");
    }
}
