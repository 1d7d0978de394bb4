//! The gRPC interop cases through pnp, one test per (case, client, mode): the hand-rolled raw
//! client in all five modes, tonic-web over HTTP/1.1 and HTTP/2, and native tonic. A failing
//! test names its cell, e.g. `custom_metadata::raw_web_text_h1`.

use std::time::Duration;

use tokio::sync::mpsc;

use futures_util::stream::{self, BoxStream, StreamExt};
use pnp_demo::pb::grpc_testing::test_service_client::TestServiceClient;
use pnp_demo::pb::grpc_testing::{
    Empty, SimpleResponse, StreamingOutputCallRequest, StreamingOutputCallResponse,
};
use pnp_interop_tests::channels::{
    native_without_local_deadline, origin, test_service, unimplemented_service,
};
use pnp_interop_tests::interop::*;
use pnp_interop_tests::{AnyChannel, Mode, RawClient, RawReply, Stack, TonicMode};

/// How long the upstream may take to notice a cancelled call.
const CANCEL_OBSERVED_WITHIN: Duration = Duration::from_secs(2);

macro_rules! matrix {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            use super::*;

            #[tokio::test]
            async fn raw_web_binary_h1() {
                raw_cases::$case(Mode::WebBinaryH1).await
            }

            #[tokio::test]
            async fn raw_web_binary_h2() {
                raw_cases::$case(Mode::WebBinaryH2).await
            }

            #[tokio::test]
            async fn raw_web_text_h1() {
                raw_cases::$case(Mode::WebTextH1).await
            }

            #[tokio::test]
            async fn raw_web_text_h2() {
                raw_cases::$case(Mode::WebTextH2).await
            }

            #[tokio::test]
            async fn raw_grpc_h2() {
                raw_cases::$case(Mode::GrpcH2).await
            }

            #[tokio::test]
            async fn tonic_web_h1() {
                tonic_cases::$case(TonicMode::WebH1).await
            }

            #[tokio::test]
            async fn tonic_web_h2() {
                tonic_cases::$case(TonicMode::WebH2).await
            }

            #[tokio::test]
            async fn tonic_native() {
                tonic_cases::$case(TonicMode::Native).await
            }
        }
    )*};
}

matrix!(
    empty_unary,
    large_unary,
    server_streaming,
    custom_metadata,
    status_code_and_message,
    special_status_message,
    unimplemented_method,
    unimplemented_service,
    timeout_on_sleeping_server,
    cancel_after_first_response,
);

/// A reply that went through pnp's HTTP/2 egress.
fn assert_via_pnp(headers: &http::HeaderMap) {
    assert_eq!(
        headers.get("x-pnp-transport").map(|v| v.as_bytes()),
        Some(&b"h2"[..]),
        "x-pnp-transport in {headers:?}"
    );
}

mod raw_cases {
    use super::*;

    fn single<M: prost::Message + Default>(reply: &RawReply) -> M {
        assert_eq!(
            reply.messages.len(),
            1,
            "expected one message, got {}",
            reply.messages.len()
        );
        decode(&reply.messages[0])
    }

    fn assert_status(reply: &RawReply, code: i32, message: &str) {
        assert_eq!(
            (reply.grpc_status(), reply.grpc_message().as_str()),
            (Some(code), message),
            "trailers {:?}",
            reply.trailers
        );
        assert!(reply.messages.is_empty(), "messages {:?}", reply.messages);
    }

    pub(super) async fn empty_unary(mode: Mode) {
        let stack = Stack::start().await;
        let client = RawClient::new(stack.proxy_addr(), mode);
        let reply = client.call(EMPTY_CALL, &[], &[&encode(&Empty {})]).await;
        reply.assert_ok();
        assert_eq!(reply.http_status, 200);
        assert!(!reply.trailers_only);
        assert_via_pnp(&reply.headers);
        assert_eq!(reply.messages, [bytes::Bytes::new()]);
        assert_eq!(stack.stats().calls_started(), 1);
    }

    pub(super) async fn large_unary(mode: Mode) {
        let stack = Stack::start().await;
        let client = RawClient::new(stack.proxy_addr(), mode);
        let request = encode(&large_unary_request());
        let reply = client.call(UNARY_CALL, &[], &[&request]).await;
        reply.assert_ok();
        assert_via_pnp(&reply.headers);
        let response: SimpleResponse = single(&reply);
        assert_eq!(
            zero_payload_len(response.payload.as_ref()),
            LARGE_RESPONSE_SIZE as usize
        );
        // The whole body: one 5-byte header per message plus the trailer frame.
        assert!(reply.body.len() > LARGE_RESPONSE_SIZE as usize + 5);
    }

    pub(super) async fn server_streaming(mode: Mode) {
        let stack = Stack::start().await;
        let client = RawClient::new(stack.proxy_addr(), mode);
        let request = encode(&server_streaming_request());
        let reply = client.call(STREAMING_OUTPUT_CALL, &[], &[&request]).await;
        reply.assert_ok();
        assert_via_pnp(&reply.headers);
        let sizes: Vec<usize> = reply
            .messages
            .iter()
            .map(|m| zero_payload_len(decode::<StreamingOutputCallResponse>(m).payload.as_ref()))
            .collect();
        assert_eq!(sizes, STREAMING_RESPONSE_SIZES.map(|s| s as usize));
    }

    pub(super) async fn custom_metadata(mode: Mode) {
        let stack = Stack::start().await;
        let client = RawClient::new(stack.proxy_addr(), mode);
        let trailing = base64_std(&ECHO_TRAILING_VALUE);
        let metadata = [
            (ECHO_INITIAL, ECHO_INITIAL_VALUE),
            (ECHO_TRAILING, trailing.as_str()),
        ];

        let unary = client
            .call(UNARY_CALL, &metadata, &[&encode(&large_unary_request())])
            .await;
        unary.assert_ok();
        let response: SimpleResponse = single(&unary);
        assert_eq!(
            zero_payload_len(response.payload.as_ref()),
            LARGE_RESPONSE_SIZE as usize
        );
        assert_echoed(&unary);

        let duplex_request = streaming_request(
            vec![response_params(LARGE_RESPONSE_SIZE)],
            LARGE_REQUEST_SIZE,
        );
        let duplex = client
            .call(FULL_DUPLEX_CALL, &metadata, &[&encode(&duplex_request)])
            .await;
        duplex.assert_ok();
        let response: StreamingOutputCallResponse = single(&duplex);
        assert_eq!(
            zero_payload_len(response.payload.as_ref()),
            LARGE_RESPONSE_SIZE as usize
        );
        assert_echoed(&duplex);
    }

    fn response_params(size: i32) -> pnp_demo::pb::grpc_testing::ResponseParameters {
        response(size, 0)
    }

    fn base64_std(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn assert_echoed(reply: &RawReply) {
        assert_eq!(
            reply.headers.get(ECHO_INITIAL).map(|v| v.as_bytes()),
            Some(ECHO_INITIAL_VALUE.as_bytes()),
            "initial metadata in headers {:?}",
            reply.headers
        );
        assert_eq!(
            reply.trailer_bin(ECHO_TRAILING),
            Some(ECHO_TRAILING_VALUE.to_vec()),
            "trailing metadata in trailers {:?}",
            reply.trailers
        );
    }

    pub(super) async fn status_code_and_message(mode: Mode) {
        let stack = Stack::start().await;
        let client = RawClient::new(stack.proxy_addr(), mode);
        let unary = client
            .call(
                UNARY_CALL,
                &[],
                &[&encode(&status_request(STATUS_CODE, STATUS_MESSAGE))],
            )
            .await;
        assert_status(&unary, STATUS_CODE, STATUS_MESSAGE);
        let duplex = client
            .call(
                FULL_DUPLEX_CALL,
                &[],
                &[&encode(&streaming_status_request(
                    STATUS_CODE,
                    STATUS_MESSAGE,
                ))],
            )
            .await;
        assert_status(&duplex, STATUS_CODE, STATUS_MESSAGE);
    }

    pub(super) async fn special_status_message(mode: Mode) {
        let stack = Stack::start().await;
        let client = RawClient::new(stack.proxy_addr(), mode);
        let reply = client
            .call(
                UNARY_CALL,
                &[],
                &[&encode(&status_request(
                    STATUS_CODE,
                    SPECIAL_STATUS_MESSAGE,
                ))],
            )
            .await;
        assert_status(&reply, STATUS_CODE, SPECIAL_STATUS_MESSAGE);
        // On the wire the message is percent-encoded ASCII.
        let raw = reply.trailers["grpc-message"].as_bytes();
        assert!(
            raw.iter().all(|b| (0x20..0x7f).contains(b)),
            "grpc-message not percent-encoded: {raw:?}"
        );
    }

    pub(super) async fn unimplemented_method(mode: Mode) {
        let stack = Stack::start().await;
        let client = RawClient::new(stack.proxy_addr(), mode);
        let reply = client
            .call(UNIMPLEMENTED_CALL, &[], &[&encode(&Empty {})])
            .await;
        assert_eq!(reply.grpc_status(), Some(code::UNIMPLEMENTED));
        assert!(reply.messages.is_empty());
    }

    pub(super) async fn unimplemented_service(mode: Mode) {
        let stack = Stack::start().await;
        let client = RawClient::new(stack.proxy_addr(), mode);
        let reply = client
            .call(UNIMPLEMENTED_SERVICE_CALL, &[], &[&encode(&Empty {})])
            .await;
        assert_eq!(reply.grpc_status(), Some(code::UNIMPLEMENTED));
        assert!(reply.messages.is_empty());
        assert_eq!(
            stack.stats().calls_started(),
            0,
            "no handler should have run"
        );
    }

    pub(super) async fn timeout_on_sleeping_server(mode: Mode) {
        let stack = Stack::start().await;
        let client = RawClient::new(stack.proxy_addr(), mode);
        for path in [FULL_DUPLEX_CALL, STREAMING_OUTPUT_CALL] {
            let started = std::time::Instant::now();
            let reply = client
                .call(
                    path,
                    &[("grpc-timeout", "1m")],
                    &[&encode(&sleeping_request())],
                )
                .await;
            assert_eq!(
                reply.grpc_status(),
                Some(code::DEADLINE_EXCEEDED),
                "{path}: {:?}",
                reply.grpc_message()
            );
            assert!(reply.messages.is_empty(), "{path}");
            assert!(
                started.elapsed() < Duration::from_millis(900),
                "{path}: the deadline was not enforced: answered after {:?}",
                started.elapsed()
            );
        }
    }

    pub(super) async fn cancel_after_first_response(mode: Mode) {
        let stack = Stack::start().await;
        let stats = stack.stats();
        let client = RawClient::new(stack.proxy_addr(), mode);
        let mut stream = client
            .start(
                FULL_DUPLEX_CALL,
                &[],
                &[&encode(&ping_then_sleep_request())],
            )
            .await;
        assert_eq!(stream.http_status(), 200);
        assert_via_pnp(stream.headers());
        let (first, _) = stream
            .next_message()
            .await
            .expect("the first response before the cancel");
        let first: StreamingOutputCallResponse = decode(&first);
        assert_eq!(
            zero_payload_len(first.payload.as_ref()),
            PING_RESPONSE_SIZE as usize
        );
        assert_eq!(stats.calls_cancelled(), 0);
        stream.abort();
        assert!(
            stats.wait_cancelled(1, CANCEL_OBSERVED_WITHIN).await,
            "the upstream did not see the cancel: {stats:?}"
        );
    }
}

mod tonic_cases {
    use super::*;
    use tonic::metadata::{MetadataMap, MetadataValue};
    use tonic::{Code, Request, Status};

    fn assert_status(status: &Status, code: Code, message: &str) {
        assert_eq!(
            (status.code(), status.message()),
            (code, message),
            "status {status:?}"
        );
    }

    /// The request stream of a full-duplex call and, for native gRPC, the sender that keeps it
    /// open. Over gRPC-Web the request body has to end before the reply flows (half-duplex), so
    /// the stream ends after `messages`; native gRPC keeps it open as an interop client does,
    /// until the sender is dropped. (Dropping only the response stream of a tonic call whose
    /// request stream is still open does not reset the HTTP/2 stream: hyper keeps it alive for
    /// the request body. Dropping both is how a tonic user cancels.)
    fn outbound(
        mode: TonicMode,
        messages: Vec<StreamingOutputCallRequest>,
    ) -> (
        BoxStream<'static, StreamingOutputCallRequest>,
        Option<mpsc::UnboundedSender<StreamingOutputCallRequest>>,
    ) {
        if mode.is_web() {
            return (stream::iter(messages).boxed(), None);
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        for message in messages {
            sender
                .send(message)
                .unwrap_or_else(|_| panic!("the receiver is alive"));
        }
        let requests = stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|message| (message, receiver))
        });
        (requests.boxed(), Some(sender))
    }

    pub(super) async fn empty_unary(mode: TonicMode) {
        let stack = Stack::start().await;
        let mut client = test_service(stack.proxy_addr(), mode).await;
        let response = client
            .empty_call(Empty {})
            .await
            .unwrap_or_else(|s| panic!("EmptyCall failed: {s:?}"));
        assert_eq!(response.get_ref(), &Empty {});
        assert_via_pnp(&response.metadata().clone().into_headers());
        assert_eq!(stack.stats().calls_started(), 1);
    }

    pub(super) async fn large_unary(mode: TonicMode) {
        let stack = Stack::start().await;
        let mut client = test_service(stack.proxy_addr(), mode).await;
        let response = client
            .unary_call(large_unary_request())
            .await
            .unwrap_or_else(|s| panic!("UnaryCall failed: {s:?}"));
        assert_eq!(
            zero_payload_len(response.get_ref().payload.as_ref()),
            LARGE_RESPONSE_SIZE as usize
        );
    }

    pub(super) async fn server_streaming(mode: TonicMode) {
        let stack = Stack::start().await;
        let mut client = test_service(stack.proxy_addr(), mode).await;
        let mut inbound = client
            .streaming_output_call(server_streaming_request())
            .await
            .unwrap_or_else(|s| panic!("StreamingOutputCall failed: {s:?}"))
            .into_inner();
        let mut sizes = Vec::new();
        while let Some(message) = inbound
            .message()
            .await
            .unwrap_or_else(|s| panic!("stream failed: {s:?}"))
        {
            sizes.push(zero_payload_len(message.payload.as_ref()));
        }
        assert_eq!(sizes, STREAMING_RESPONSE_SIZES.map(|s| s as usize));
    }

    fn with_echo_metadata<T>(message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert(ECHO_INITIAL, MetadataValue::from_static(ECHO_INITIAL_VALUE));
        request.metadata_mut().insert_bin(
            ECHO_TRAILING,
            MetadataValue::from_bytes(&ECHO_TRAILING_VALUE),
        );
        request
    }

    fn assert_initial_echoed(metadata: &MetadataMap) {
        assert_eq!(
            metadata.get(ECHO_INITIAL).map(|v| v.as_bytes()),
            Some(ECHO_INITIAL_VALUE.as_bytes()),
            "initial metadata {metadata:?}"
        );
    }

    fn assert_trailing_echoed(metadata: &MetadataMap) {
        let value = metadata
            .get_bin(ECHO_TRAILING)
            .map(|v| v.to_bytes().map(|b| b.to_vec()).ok());
        assert_eq!(
            value,
            Some(Some(ECHO_TRAILING_VALUE.to_vec())),
            "trailing metadata {metadata:?}"
        );
    }

    pub(super) async fn custom_metadata(mode: TonicMode) {
        let stack = Stack::start().await;
        let mut client = test_service(stack.proxy_addr(), mode).await;

        let unary = client
            .unary_call(with_echo_metadata(large_unary_request()))
            .await
            .unwrap_or_else(|s| panic!("UnaryCall failed: {s:?}"));
        assert_eq!(
            zero_payload_len(unary.get_ref().payload.as_ref()),
            LARGE_RESPONSE_SIZE as usize
        );
        // tonic merges the trailers of a unary reply into its metadata.
        assert_initial_echoed(unary.metadata());
        assert_trailing_echoed(unary.metadata());

        let request = streaming_request(vec![response(LARGE_RESPONSE_SIZE, 0)], LARGE_REQUEST_SIZE);
        // The request stream must end for the call to end, in every mode.
        let duplex = client
            .full_duplex_call(with_echo_metadata(stream::iter([request])))
            .await
            .unwrap_or_else(|s| panic!("FullDuplexCall failed: {s:?}"));
        assert_initial_echoed(duplex.metadata());
        let mut inbound = duplex.into_inner();
        let mut sizes = Vec::new();
        while let Some(message) = inbound
            .message()
            .await
            .unwrap_or_else(|s| panic!("stream failed: {s:?}"))
        {
            sizes.push(zero_payload_len(message.payload.as_ref()));
        }
        assert_eq!(sizes, [LARGE_RESPONSE_SIZE as usize]);
        let trailers = inbound
            .trailers()
            .await
            .unwrap_or_else(|s| panic!("trailers failed: {s:?}"))
            .expect("trailers after the stream");
        assert_trailing_echoed(&trailers);
    }

    pub(super) async fn status_code_and_message(mode: TonicMode) {
        let stack = Stack::start().await;
        let mut client = test_service(stack.proxy_addr(), mode).await;
        let status = client
            .unary_call(status_request(STATUS_CODE, STATUS_MESSAGE))
            .await
            .expect_err("UnaryCall should fail");
        assert_status(&status, Code::Unknown, STATUS_MESSAGE);

        let request = streaming_status_request(STATUS_CODE, STATUS_MESSAGE);
        let (requests, _keep_open) = outbound(mode, vec![request]);
        let status = drain_until_error(client.full_duplex_call(requests).await).await;
        assert_status(&status, Code::Unknown, STATUS_MESSAGE);
    }

    pub(super) async fn special_status_message(mode: TonicMode) {
        let stack = Stack::start().await;
        let mut client = test_service(stack.proxy_addr(), mode).await;
        let status = client
            .unary_call(status_request(STATUS_CODE, SPECIAL_STATUS_MESSAGE))
            .await
            .expect_err("UnaryCall should fail");
        assert_status(&status, Code::Unknown, SPECIAL_STATUS_MESSAGE);
    }

    pub(super) async fn unimplemented_method(mode: TonicMode) {
        let stack = Stack::start().await;
        let mut client = test_service(stack.proxy_addr(), mode).await;
        let status = client
            .unimplemented_call(Empty {})
            .await
            .expect_err("UnimplementedCall should fail");
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    }

    pub(super) async fn unimplemented_service(mode: TonicMode) {
        let stack = Stack::start().await;
        let mut client = super::unimplemented_service(stack.proxy_addr(), mode).await;
        let status = client
            .unimplemented_call(Empty {})
            .await
            .expect_err("UnimplementedService should not be served");
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
        assert_eq!(stack.stats().calls_started(), 0);
    }

    /// tonic's `Channel` also runs the deadline locally and, when its own timer fires before
    /// the server's answer arrives (with a 1 ms deadline: always), reports CANCELLED "Timeout
    /// expired" (tonic maps its `TimeoutExpired` to CANCELLED). What pnp sent is checked with
    /// the same calls over [`native_without_local_deadline`]; the gRPC-Web clients have no local
    /// timer and see exactly what pnp sent.
    fn assert_deadline_exceeded(channel_with_local_timer: bool, status: &Status) {
        let local_timer = channel_with_local_timer
            && status.code() == Code::Cancelled
            && status.message() == "Timeout expired";
        assert!(
            status.code() == Code::DeadlineExceeded || local_timer,
            "expected DEADLINE_EXCEEDED, got {status:?}"
        );
    }

    async fn drain_until_error<T: std::fmt::Debug>(
        result: Result<tonic::Response<tonic::Streaming<T>>, Status>,
    ) -> Status {
        match result {
            Err(status) => status,
            Ok(response) => {
                let mut inbound = response.into_inner();
                match inbound.message().await {
                    Ok(message) => panic!("expected an error, got {message:?}"),
                    Err(status) => status,
                }
            }
        }
    }

    pub(super) async fn timeout_on_sleeping_server(mode: TonicMode) {
        let stack = Stack::start().await;
        let client = test_service(stack.proxy_addr(), mode).await;
        let local_timer = mode == TonicMode::Native;
        sleeping_calls(mode, client, local_timer).await;
        if local_timer {
            let client = TestServiceClient::with_origin(
                native_without_local_deadline(),
                origin(stack.proxy_addr()),
            );
            sleeping_calls(mode, client, false).await;
        }
    }

    /// FullDuplexCall and StreamingOutputCall with a 1 ms deadline on a server that sleeps a
    /// second before answering.
    async fn sleeping_calls(
        mode: TonicMode,
        mut client: TestServiceClient<AnyChannel>,
        local_timer: bool,
    ) {
        let started = std::time::Instant::now();
        let (requests, _keep_open) = outbound(mode, vec![sleeping_request()]);
        let mut request = Request::new(requests);
        request.set_timeout(Duration::from_millis(1));
        let status = drain_until_error(client.full_duplex_call(request).await).await;
        assert_deadline_exceeded(local_timer, &status);

        let mut request = Request::new(sleeping_request());
        request.set_timeout(Duration::from_millis(1));
        let status = drain_until_error(client.streaming_output_call(request).await).await;
        assert_deadline_exceeded(local_timer, &status);
        assert!(
            started.elapsed() < Duration::from_millis(1800),
            "the deadline was not enforced: {:?}",
            started.elapsed()
        );
    }

    pub(super) async fn cancel_after_first_response(mode: TonicMode) {
        let stack = Stack::start().await;
        let stats = stack.stats();
        let mut client = test_service(stack.proxy_addr(), mode).await;
        let (requests, keep_open) = outbound(mode, vec![ping_then_sleep_request()]);
        let response = client
            .full_duplex_call(requests)
            .await
            .unwrap_or_else(|s| panic!("FullDuplexCall failed: {s:?}"));
        assert_via_pnp(&response.metadata().clone().into_headers());
        let mut inbound = response.into_inner();
        let first = inbound
            .message()
            .await
            .unwrap_or_else(|s| panic!("first response: {s:?}"))
            .expect("the first response before the cancel");
        assert_eq!(
            zero_payload_len(first.payload.as_ref()),
            PING_RESPONSE_SIZE as usize
        );
        assert_eq!(stats.calls_cancelled(), 0);
        drop(inbound);
        drop(keep_open);
        assert!(
            stats.wait_cancelled(1, CANCEL_OBSERVED_WITHIN).await,
            "the upstream did not see the cancel: {stats:?}"
        );
    }
}
