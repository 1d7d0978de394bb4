//! Calls that reach pnp already decoded (the way a peer pnp's calls arrive over UCX) go
//! through the same data plane as HTTP requests (`Proxy::serve_call`): unary and streaming
//! calls to the real demo upstream, messages larger than a fragment, the call's time left as
//! its deadline, a dropped reply cancelling the upstream call, the metrics and the
//! `x-pnp-transport` of any call.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use pnp_call::{Call, CallHead, Message, Part, Reply, ReplyItem};
use pnp_demo::pb::grpc_testing::{SimpleRequest, SimpleResponse};
use pnp_interop_tests::interop::{decode, encode, response, streaming_request, zero_payload};
use pnp_interop_tests::stack::upstream_url;
use pnp_interop_tests::Stack;

fn head(path: &str, timeout: Option<Duration>) -> CallHead {
    CallHead {
        path: path.parse().expect("path"),
        subtype: None,
        metadata: http::HeaderMap::new(),
        timeout,
        max_message_size: 64 << 20,
    }
}

fn call(path: &str, timeout: Option<Duration>, parts: Vec<Part>) -> Call {
    Call {
        head: head(path, timeout),
        messages: Box::pin(futures_util::stream::iter(parts.into_iter().map(Ok))),
    }
}

/// Every item of a reply: its messages (fragments put together) and its final status.
async fn collect(reply: Reply) -> (http::HeaderMap, Vec<Bytes>, pnp_call::Status) {
    let (head, mut items) = match reply {
        Reply::TrailersOnly(status) => return (http::HeaderMap::new(), Vec::new(), status),
        Reply::Stream { head, items } => (head, items),
    };
    let mut messages = Vec::new();
    let mut open: Option<Vec<u8>> = None;
    while let Some(item) = items.next().await {
        match item {
            ReplyItem::Message(m) => messages.push(m.data),
            ReplyItem::Head { len, .. } => open = Some(Vec::with_capacity(len as usize)),
            ReplyItem::Fragment { data, last } => {
                let buf = open.as_mut().expect("a head first");
                buf.extend_from_slice(&data);
                if last {
                    messages.push(Bytes::from(open.take().expect("open")));
                }
            }
            ReplyItem::Status(status) => return (head.metadata, messages, status),
        }
    }
    panic!("the reply ended without a status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoded_calls_go_through_the_data_plane_like_any_other() {
    let upstream = pnp_demo::DemoUpstream::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("upstream");
    let proxy = Stack::proxy_for(upstream_url(upstream.local_addr()), |config| {
        config.limits.max_message_size = 64 << 20;
    })
    .await;
    let peer = "10.0.0.7:40000".parse().expect("addr");

    // Unary, with a 1 MiB request sent as a head and fragments and a 1 MiB response.
    let request = encode(&SimpleRequest {
        response_size: 1 << 20,
        payload: Some(zero_payload(1 << 20)),
        ..SimpleRequest::default()
    });
    let len = request.len() as u32;
    let mut parts = vec![Part::Head {
        compressed: false,
        len,
    }];
    let chunks: Vec<Bytes> = Bytes::from(request)
        .chunks(100_000)
        .map(Bytes::copy_from_slice)
        .collect();
    let count = chunks.len();
    for (i, data) in chunks.into_iter().enumerate() {
        parts.push(Part::Fragment {
            data,
            last: i + 1 == count,
        });
    }
    let reply = proxy
        .serve_call(
            call("/grpc.testing.TestService/UnaryCall", None, parts),
            peer,
        )
        .await;
    let (headers, messages, status) = collect(reply).await;
    assert_eq!(status.code, pnp_call::Code::Ok, "{status:?}");
    assert_eq!(headers["x-pnp-transport"], "h2");
    let answer: SimpleResponse = decode(&messages[0]);
    assert_eq!(answer.payload.expect("payload").body.len(), 1 << 20);

    // Server streaming: four messages in order.
    let request = encode(&streaming_request(
        (1..=4).map(|i| response(i * 10, 0)).collect(),
        0,
    ));
    let reply = proxy
        .serve_call(
            call(
                "/grpc.testing.TestService/StreamingOutputCall",
                None,
                vec![Part::Message(Message::new(request))],
            ),
            peer,
        )
        .await;
    let (_, messages, status) = collect(reply).await;
    assert_eq!(status.code, pnp_call::Code::Ok);
    assert_eq!(messages.len(), 4);

    // The time left is the call's deadline.
    let sleepy = encode(&streaming_request(vec![response(8, 3_000_000)], 0));
    let started = Instant::now();
    let reply = proxy
        .serve_call(
            call(
                "/grpc.testing.TestService/StreamingOutputCall",
                Some(Duration::from_millis(300)),
                vec![Part::Message(Message::new(sleepy.clone()))],
            ),
            peer,
        )
        .await;
    let (_, _, status) = collect(reply).await;
    assert_eq!(status.code, pnp_call::Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // A reply dropped mid-call cancels the upstream call.
    let reply = proxy
        .serve_call(
            call(
                "/grpc.testing.TestService/StreamingOutputCall",
                None,
                vec![Part::Message(Message::new(encode(&streaming_request(
                    vec![response(8, 0), response(8, 10_000_000)],
                    0,
                ))))],
            ),
            peer,
        )
        .await;
    let Reply::Stream { mut items, .. } = reply else {
        panic!("a streaming reply");
    };
    assert!(matches!(items.next().await, Some(ReplyItem::Message(_))));
    let cancelled_before = upstream.stats().calls_cancelled();
    drop(items);
    assert!(
        upstream
            .stats()
            .wait_cancelled(cancelled_before + 1, Duration::from_secs(5))
            .await,
        "dropping the reply did not cancel the upstream call"
    );
    proxy.shutdown().await;
    upstream.shutdown().await;
}
