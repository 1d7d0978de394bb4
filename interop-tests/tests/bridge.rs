//! Two pnp instances bridged over each transport: clients → edge pnp → `h1://` (chunked
//! HTTP/1.1, gRPC-Web), `http://` (HTTP/2, gRPC) or `h3://` (HTTP/3 with a test CA) → cluster
//! pnp → the interop upstream. The interop cases run through the bridge with tonic (native gRPC and gRPC-Web over HTTP/1.1 and
//! HTTP/2) and the raw client (gRPC-Web text, binary, native); an upstream that dies mid-stream,
//! a deadline and a client's cancel (seen by the upstream across both hops) end as a user
//! expects, and `x-pnp-transport` names the hop. What only HTTP/3 has (a vanishing QUIC peer,
//! an HTTP/3 client, `alt-svc`, drain) is in `bridge_h3.rs`.

mod support;

use std::time::{Duration, Instant};

use futures_util::stream;

use pnp_demo::pb::grpc_testing::{Empty, SimpleResponse, StreamingOutputCallResponse};
use pnp_interop_tests::channels::{test_service, unimplemented_service};
use pnp_interop_tests::faults::{Fault, FaultyUpstream};
use pnp_interop_tests::interop::*;
use pnp_interop_tests::{Mode, RawClient, TonicMode};
use support::bridge::{pair, BridgeStack, Hop};
use support::misbehaving::{frame, grpc_head, h2_client, streaming_output};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request};

/// How long the upstream may take to notice a cancelled call.
const CANCEL_OBSERVED_WITHIN: Duration = Duration::from_secs(2);

macro_rules! per_hop {
    ($($(#[$attr:meta])* $hop:ident => $name:ident),* $(,)?) => {$(
        $(#[$attr])*
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn interop_unary_and_streaming_cases_cross_the_bridge() {
                cases::interop_cases(Hop::$hop).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn metadata_statuses_and_unimplemented_cross_the_bridge() {
                cases::metadata_statuses_and_unimplemented(Hop::$hop).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_deadline_is_deadline_exceeded_across_the_bridge() {
                cases::deadline(Hop::$hop).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_client_cancel_reaches_the_upstream_across_both_hops() {
                cases::cancel(Hop::$hop).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_upstream_that_dies_mid_stream_is_an_error_at_the_client_never_ok() {
                cases::upstream_death(Hop::$hop).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn clients_that_stop_reading_hold_only_their_own_calls() {
                cases::stalled_readers(Hop::$hop).await
            }
        }
    )*};
}

per_hop!(
    H1 => h1,
    H2 => h2,
    H3 => h3,
    // UCX needs the system library: `cargo test -p pnp-interop-tests --features ucx`
    // (`scripts/test` runs it).
    #[cfg(feature = "ucx")]
    Ucx => ucx,
);

mod cases {
    use super::*;

    /// The clients production has, through the bridge with the default clocks on. An HTTP/2
    /// client that stops reading (window 0) holds only its own four calls: other clients'
    /// calls in every mode are answered at once, and the stalled ones are reset at their 2 s
    /// deadline (never a clean end), the upstream calls still sending cancelled across both
    /// hops. An
    /// HTTP/1.1 client that stops reading never sees OK, and its upstream call is cancelled at
    /// its deadline.
    pub(super) async fn stalled_readers(hop: Hop) {
        let bridge = BridgeStack::start(hop).await;
        let addr = bridge.addr();
        let stats = bridge.stats();
        let mut stalled = h2_client(addr, 0).await;
        // Two of 32 MiB, more than the two hops' windows hold: the upstream is still sending
        // at the deadline. Two of 2 MiB, which the hops absorb: the upstream finishes, and the
        // edge holds the rest of the reply for a client that never reads it (over HTTP/3 the
        // edge used to panic in h3-quinn when such a call ended, and the client's stream
        // stayed open).
        let large = frame(&streaming_output(128, 256 * 1024));
        let small = frame(&streaming_output(8, 256 * 1024));
        let started = Instant::now();
        let mut responses = Vec::new();
        for request in [&large, &small, &large, &small] {
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
            assert_eq!(response.status(), 200, "{hop:?}");
            bodies.push(response.into_body());
        }
        // Let the upstream push what it can towards a client that takes none of it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for mode in RAW_MODES {
            let asked = Instant::now();
            let reply = RawClient::new(addr, mode)
                .call(EMPTY_CALL, &[("grpc-timeout", "8S")], &[&[]])
                .await;
            assert_eq!(
                reply.grpc_status(),
                Some(0),
                "{hop:?} {mode:?}: {}",
                reply.grpc_message()
            );
            assert!(
                asked.elapsed() < Duration::from_secs(4),
                "{hop:?} {mode:?}: an unrelated call waited {:?} behind the stalled streams",
                asked.elapsed()
            );
        }
        for mut body in bodies {
            let ended = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match body.data().await {
                        Some(Ok(_)) => continue,
                        Some(Err(_)) => return,
                        None => {
                            panic!("{hop:?}: a stalled stream ended cleanly; it should be reset")
                        }
                    }
                }
            })
            .await;
            assert!(
                ended.is_ok(),
                "{hop:?}: a stalled stream was still open {:?} after it started (deadline 2 s)",
                started.elapsed()
            );
        }
        let ended = started.elapsed();
        assert!(
            (Duration::from_millis(1_900)..Duration::from_millis(3_500)).contains(&ended),
            "{hop:?}: stalled streams were reset {ended:?} after they started (deadline 2 s)"
        );
        assert!(
            stats.wait_cancelled(2, Duration::from_secs(5)).await,
            "{hop:?}: the upstream calls of the large stalled streams were not cancelled: {stats:?}"
        );
        let cancelled = stats.calls_cancelled();

        // HTTP/1.1: a client with a small receive buffer that reads nothing until well after
        // its 1 s deadline.
        let tcp = tokio::net::TcpSocket::new_v4().expect("socket");
        tcp.set_recv_buffer_size(16 * 1024).expect("rcvbuf");
        let mut tcp = tcp.connect(addr).await.expect("connect");
        let body = frame(&streaming_output(512, 64 * 1024 - 16));
        let head = format!(
            "POST {STREAMING_OUTPUT_CALL} HTTP/1.1\r\nhost: pnp\r\ncontent-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\ngrpc-timeout: 1S\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tcp.write_all(head.as_bytes()).await.expect("head");
        tcp.write_all(&body).await.expect("body");
        assert!(
            stats
                .wait_cancelled(cancelled + 1, Duration::from_secs(5))
                .await,
            "{hop:?}: the HTTP/1.1 reader's upstream call was not cancelled at its deadline"
        );
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let mut received = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let n = tcp.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                received.extend_from_slice(&buf[..n]);
                if received.ends_with(b"\r\n0\r\n\r\n") {
                    return;
                }
            }
        })
        .await;
        assert!(read.is_ok(), "{hop:?}: neither a status nor a close");
        let text = String::from_utf8_lossy(&received);
        assert!(
            !text.contains("grpc-status:0"),
            "{hop:?}: a stream cut by its deadline must not end OK"
        );
        assert!(
            received.len() < 16 << 20,
            "{hop:?}: all {} bytes arrived; the stall never happened",
            received.len()
        );
        bridge.shutdown().await;
    }

    const TONIC_MODES: [TonicMode; 3] = [TonicMode::Native, TonicMode::WebH1, TonicMode::WebH2];
    const RAW_MODES: [Mode; 3] = [Mode::WebTextH1, Mode::WebBinaryH2, Mode::GrpcH2];

    pub(super) async fn interop_cases(hop: Hop) {
        let bridge = BridgeStack::start(hop).await;
        for mode in TONIC_MODES {
            let mut client = test_service(bridge.addr(), mode).await;
            let empty = client
                .empty_call(Empty {})
                .await
                .unwrap_or_else(|s| panic!("{mode}: EmptyCall failed: {s:?}"));
            assert_eq!(empty.get_ref(), &Empty {});
            hop.assert_carried(&empty.metadata().clone().into_headers());

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
            hop.assert_carried(&reply.headers);
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
                .map(|m| {
                    zero_payload_len(decode::<StreamingOutputCallResponse>(m).payload.as_ref())
                })
                .collect();
            assert_eq!(
                sizes,
                STREAMING_RESPONSE_SIZES.map(|s| s as usize),
                "{mode:?}"
            );
        }
        // Every call crossed the bridge to the upstream: 3 per tonic mode, 2 per raw mode.
        assert_eq!(bridge.stats().calls_started(), 3 * 3 + 2 * 3);
        bridge.shutdown().await;
    }

    pub(super) async fn metadata_statuses_and_unimplemented(hop: Hop) {
        let bridge = BridgeStack::start(hop).await;
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

    pub(super) async fn deadline(hop: Hop) {
        let bridge = BridgeStack::start(hop).await;
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

    pub(super) async fn cancel(hop: Hop) {
        let bridge = BridgeStack::start(hop).await;
        let stats = bridge.stats();
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
            let requests =
                stream::unfold(
                    receiver,
                    |mut r| async move { r.recv().await.map(|m| (m, r)) },
                );
            let response = client
                .full_duplex_call(requests)
                .await
                .unwrap_or_else(|s| panic!("{mode}: FullDuplexCall failed: {s:?}"));
            hop.assert_carried(&response.metadata().clone().into_headers());
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

    pub(super) async fn upstream_death(hop: Hop) {
        for fault in [
            Fault::HalfFrameThenClose,
            Fault::NoTrailers,
            Fault::ResetAfterMessage(::h2::Reason::INTERNAL_ERROR),
        ] {
            let upstream = FaultyUpstream::start(fault.clone())
                .await
                .expect("upstream");
            let (cluster, edge, _certs) = pair(hop, upstream.url(), |_| {}).await;
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
}
