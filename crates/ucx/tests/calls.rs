//! Calls through `UcxTransport` ↔ `UcxListener` over real UCX workers on loopback TCP: the four
//! call shapes, cancellation reaching the handler, a killed peer (also over shared memory), and
//! many calls on one connection with a stalled bulk call among them.
#![cfg(feature = "ucx")]

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use pnp_call::{Code, Message, Part, Reply, ReplyItem};
use pnp_transport::{Kind, Transport};
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

async fn transport(tls: &str) -> (UcxTransport, std::sync::Arc<Seen>) {
    let (addr, seen) = serve(tls).await;
    let transport = UcxTransport::new(addr.to_string(), options(tls)).expect("transport");
    (transport, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_call_carries_head_message_trailers() {
    let (transport, _) = transport("tcp").await;
    assert_eq!(transport.kind(), Kind::Ucx);
    transport.ready().await.expect("ready");
    let reply = transport
        .call(call("/test.Echo/Echo", vec![message("hello")]))
        .await
        .expect("reply");
    let (head, messages, status) = collect(reply).await;
    assert_eq!(
        head.metadata.get("x-echo").expect("response metadata"),
        "yes"
    );
    // The head crossed whole: time left, metadata, subtype.
    assert_eq!(head.metadata.get("x-timeout-ms").expect("timeout"), "30000");
    assert_eq!(
        head.metadata.get("x-seen-request-id").expect("request id"),
        "t-1"
    );
    assert_eq!(head.subtype.as_deref(), Some("proto"));
    assert_eq!(messages, vec![Bytes::from_static(b"hello")]);
    assert_eq!(status.code, Code::Ok, "{status:?}");
    assert_eq!(status.metadata.get("x-trailer").expect("trailer"), "done");
    assert_eq!(transport.estimate().calls, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_only_reply_is_a_status() {
    let (transport, _) = transport("tcp").await;
    let reply = transport
        .call(call("/test.Echo/Nope", vec![]))
        .await
        .expect("reply");
    let Reply::TrailersOnly(status) = reply else {
        panic!("trailers only")
    };
    assert_eq!(status.code, Code::NotFound);
    assert_eq!(status.message, "no such method");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streaming_delivers_every_message_in_order() {
    let (transport, _) = transport("tcp").await;
    let reply = transport
        .call(call("/test.Echo/Repeat", vec![message("500")]))
        .await
        .expect("reply");
    let (_, messages, status) = collect(reply).await;
    assert_eq!(status.code, Code::Ok);
    assert_eq!(messages.len(), 500);
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(m, &Bytes::from(format!("token {i}")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streaming_counts_every_message_whole_or_in_fragments() {
    let (transport, _) = transport("tcp").await;
    let mut parts: Vec<Part> = (0..100).map(|i| message(&format!("m{i:03}"))).collect();
    // One large message as a head and fragments, and one whole message above the fragment
    // size (the transport cuts it).
    parts.push(Part::Head {
        compressed: false,
        len: 6,
    });
    parts.push(Part::Fragment {
        data: Bytes::from_static(b"abc"),
        last: false,
    });
    parts.push(Part::Fragment {
        data: Bytes::from_static(b"def"),
        last: true,
    });
    parts.push(Part::Message(Message::new(bulk(5 << 20))));
    let reply = transport
        .call(call("/test.Echo/Count", parts))
        .await
        .expect("reply");
    let (_, messages, status) = collect(reply).await;
    assert_eq!(status.code, Code::Ok, "{status:?}");
    assert_eq!(
        messages,
        vec![Bytes::from(format!("102 {}", 400 + 6 + (5 << 20)))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_echoes_each_message_before_the_next_is_sent() {
    let (transport, _) = transport("tcp").await;
    let (tx, call) = streaming_call("/test.Echo/Echo");
    tx.send(Ok(message("ping 0"))).await.expect("send");
    let Reply::Stream { mut items, .. } = transport.call(call).await.expect("reply") else {
        panic!("a stream")
    };
    for i in 0..20 {
        let Some(ReplyItem::Message(m)) = items.next().await else {
            panic!("an echo")
        };
        assert_eq!(m.data, Bytes::from(format!("ping {i}")));
        tx.send(Ok(message(&format!("ping {}", i + 1))))
            .await
            .expect("send");
    }
    drop(tx);
    let Some(ReplyItem::Message(m)) = items.next().await else {
        panic!("the last echo")
    };
    assert_eq!(m.data, Bytes::from_static(b"ping 20"));
    let Some(ReplyItem::Status(status)) = items.next().await else {
        panic!("a status")
    };
    assert_eq!(status.code, Code::Ok);
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "{what} within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_call_before_its_head_cancels_the_handler() {
    let (transport, seen) = transport("tcp").await;
    let pending = transport.call(call("/test.Echo/Hang", vec![message("x")]));
    assert!(tokio::time::timeout(Duration::from_millis(300), pending)
        .await
        .is_err());
    wait_for("the handler sees the cancel", || {
        seen.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_reply_mid_stream_cancels_the_handler() {
    let (transport, seen) = transport("tcp").await;
    let Reply::Stream { mut items, .. } = transport
        .call(call("/test.Echo/Forever", vec![]))
        .await
        .expect("reply")
    else {
        panic!("a stream")
    };
    for _ in 0..3 {
        assert!(matches!(items.next().await, Some(ReplyItem::Message(_))));
    }
    drop(items);
    wait_for("the handler stops", || {
        seen.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    // The connection carries on.
    let (_, messages, status) = collect(
        transport
            .call(call("/test.Echo/Echo", vec![message("after")]))
            .await
            .expect("reply"),
    )
    .await;
    assert_eq!((messages.len(), status.code), (1, Code::Ok));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_request_stream_cancels_the_call() {
    let (transport, seen) = transport("tcp").await;
    let (tx, call) = streaming_call("/test.Echo/Hang");
    let pending = tokio::spawn({
        let transport = transport.clone();
        async move { transport.call(call).await }
    });
    tx.send(Err(pnp_call::Status::new(
        Code::Cancelled,
        "client went away",
    )))
    .await
    .expect("send");
    let result = pending.await.expect("join");
    let code = match result {
        Ok(reply) => collect(reply).await.2.code,
        Err(e) => e.status.code,
    };
    assert_eq!(code, Code::Cancelled);
    wait_for("the handler sees the cancel", || {
        seen.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_peer_mid_stream_ends_every_call_unavailable() {
    kill_the_peer_mid_stream("tcp").await;
}

/// Shared memory has no UCX peer-failure handling: the side channel alone must notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_peer_mid_stream_over_shared_memory_ends_every_call_unavailable() {
    kill_the_peer_mid_stream("sm").await;
}

async fn kill_the_peer_mid_stream(tls: &str) {
    let mut server = ChildServer::start("child_server", tls);
    let transport = UcxTransport::new(server.addr.to_string(), options(tls)).expect("transport");
    let mut streams = Vec::new();
    for _ in 0..3 {
        let Reply::Stream { mut items, .. } = transport
            .call(call("/test.Echo/Forever", vec![]))
            .await
            .expect("reply")
        else {
            panic!("a stream")
        };
        assert!(matches!(items.next().await, Some(ReplyItem::Message(_))));
        streams.push(items);
    }
    server.child.kill().expect("kill the peer");
    let killed = Instant::now();
    for mut items in streams {
        let status = loop {
            match tokio::time::timeout(Duration::from_secs(10), items.next()).await {
                Ok(Some(ReplyItem::Status(status))) => break status,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the reply ended without a status"),
                Err(_) => panic!("no status within 10 s of the peer's death"),
            }
        };
        assert_eq!(status.code, Code::Unavailable, "{status:?}");
    }
    let elapsed = killed.elapsed();
    eprintln!("UCX_TLS={tls}: peer death seen after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    // A new call fails fast and cleanly, safe to retry elsewhere.
    let err = transport
        .call(call("/test.Echo/Echo", vec![message("x")]))
        .await
        .expect_err("no peer");
    assert_eq!(err.status.code, Code::Unavailable);
    assert!(err.unprocessed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_bulk_call_does_not_starve_the_others() {
    let (transport, _) = transport("tcp").await;
    // A bulk echo whose reply nobody reads: it may hold its window, nothing more.
    let data = bulk(64 << 20);
    let mut expected = Checksum::default();
    expected.update(&data);
    let Reply::Stream {
        items: bulk_items, ..
    } = transport
        .call(call(
            "/test.Echo/Echo",
            vec![Part::Message(Message::new(data))],
        ))
        .await
        .expect("bulk reply")
    else {
        panic!("a stream")
    };
    // Meanwhile, many small calls on the same connection all complete.
    let mut calls = Vec::new();
    for i in 0..200 {
        let transport = transport.clone();
        calls.push(tokio::spawn(async move {
            let reply = transport
                .call(call(
                    "/test.Echo/Echo",
                    vec![message(&format!("small {i}"))],
                ))
                .await
                .expect("reply");
            collect(reply).await
        }));
    }
    for (i, small) in calls.into_iter().enumerate() {
        let (_, messages, status) = tokio::time::timeout(Duration::from_secs(20), small)
            .await
            .expect("a small call finishes while the bulk call is stalled")
            .expect("join");
        assert_eq!(status.code, Code::Ok);
        assert_eq!(messages, vec![Bytes::from(format!("small {i}"))]);
    }
    // Now read the bulk reply: complete and intact.
    let mut got = Checksum::default();
    let (_, messages, status) = collect(Reply::Stream {
        head: Default::default(),
        items: bulk_items,
    })
    .await;
    assert_eq!(status.code, Code::Ok);
    for m in &messages {
        got.update(m);
    }
    assert_eq!(got.finish(), expected.finish());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_is_gone_is_unavailable_and_safe_to_retry() {
    // Bound but not listening, and held: connections are refused, and no other test's server
    // can take the port meanwhile.
    let closed =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    closed
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let port = closed
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("an IP address");
    let transport = UcxTransport::new(port.to_string(), options("tcp")).expect("transport");
    let err = transport.ready().await.expect_err("nobody listens");
    assert_eq!(err.status.code, Code::Unavailable);
    assert!(err.unprocessed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_listener_finishes_its_calls_and_refuses_new_ones_safely() {
    let mut listener =
        pnp_ucx::UcxListener::bind("127.0.0.1:0".parse().expect("addr"), options("tcp"))
            .await
            .expect("listener");
    let transport =
        UcxTransport::new(listener.local_addr().to_string(), options("tcp")).expect("transport");
    // A bidi call in flight.
    let (tx, in_flight) = streaming_call("/test.Echo/Echo");
    tx.send(Ok(message("before"))).await.expect("send");
    let pending = tokio::spawn({
        let transport = transport.clone();
        async move { transport.call(in_flight).await }
    });
    let incoming = listener.accept().await.expect("the call");
    tokio::spawn(handle(incoming, Default::default()));
    let Reply::Stream { mut items, .. } = pending.await.expect("join").expect("reply") else {
        panic!("a stream")
    };
    let Some(ReplyItem::Message(m)) = items.next().await else {
        panic!("an echo")
    };
    assert_eq!(m.data, Bytes::from_static(b"before"));

    listener.drain();
    let accepted = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("accept returns");
    assert!(accepted.is_none(), "a draining listener accepts nothing");
    // A new call is refused, and safe to send elsewhere.
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        transport.call(call("/test.Echo/Echo", vec![message("new")])),
    )
    .await
    .expect("a new call ends at once")
    .expect_err("draining");
    assert_eq!(err.status.code, Code::Unavailable, "{err}");
    assert!(err.unprocessed, "{err}");
    // The call in flight goes on to a clean end.
    tx.send(Ok(message("after"))).await.expect("send");
    let Some(ReplyItem::Message(m)) = items.next().await else {
        panic!("an echo after the drain began")
    };
    assert_eq!(m.data, Bytes::from_static(b"after"));
    drop(tx);
    let Some(ReplyItem::Status(status)) = items.next().await else {
        panic!("a status")
    };
    assert_eq!(status.code, Code::Ok, "{status:?}");
}
