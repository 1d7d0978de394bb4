//! The demo upstream on a real socket, called with the generated tonic clients.

use std::time::Duration;

use pnp_demo::pb::grpc_testing::test_service_client::TestServiceClient;
use pnp_demo::pb::grpc_testing::unimplemented_service_client::UnimplementedServiceClient;
use pnp_demo::pb::grpc_testing::{
    EchoStatus, Empty, Payload, ResponseParameters, SimpleRequest, StreamingInputCallRequest,
    StreamingOutputCallRequest,
};
use pnp_demo::pb::llm::generator_client::GeneratorClient;
use pnp_demo::pb::llm::{GenerateRequest, GenerateResponse};
use pnp_demo::DemoUpstream;
use tonic::metadata::{BinaryMetadataValue, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request};

const WAIT: Duration = Duration::from_secs(10);

async fn upstream() -> DemoUpstream {
    DemoUpstream::start("127.0.0.1:0".parse().expect("valid address"))
        .await
        .expect("demo upstream starts")
}

async fn channel(upstream: &DemoUpstream) -> Channel {
    Channel::from_shared(format!("http://{}", upstream.local_addr()))
        .expect("valid uri")
        .connect()
        .await
        .expect("connects")
}

async fn test_client(upstream: &DemoUpstream) -> TestServiceClient<Channel> {
    TestServiceClient::new(channel(upstream).await)
}

async fn generator(upstream: &DemoUpstream) -> GeneratorClient<Channel> {
    GeneratorClient::new(channel(upstream).await)
}

fn zeros(size: usize) -> Option<Payload> {
    Some(Payload {
        body: vec![0; size],
        ..Payload::default()
    })
}

fn sizes(sizes: &[i32]) -> Vec<ResponseParameters> {
    sizes
        .iter()
        .map(|&size| ResponseParameters {
            size,
            ..ResponseParameters::default()
        })
        .collect()
}

fn fast_generation(prompt: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.to_owned(),
        max_tokens: 8,
        seed: Some(7),
        time_scale: 0.01,
        ..GenerateRequest::default()
    }
}

#[tokio::test]
async fn empty_call() {
    let upstream = upstream().await;
    let reply = test_client(&upstream)
        .await
        .empty_call(Empty {})
        .await
        .expect("empty call succeeds");
    assert_eq!(reply.into_inner(), Empty {});
    assert_eq!(upstream.stats().calls_started(), 1);
}

#[tokio::test]
async fn large_unary() {
    let upstream = upstream().await;
    let reply = test_client(&upstream)
        .await
        .unary_call(SimpleRequest {
            response_size: 314_159,
            payload: zeros(271_828),
            ..SimpleRequest::default()
        })
        .await
        .expect("unary call succeeds")
        .into_inner();
    let payload = reply.payload.expect("reply has a payload");
    assert_eq!(payload.body.len(), 314_159);
    assert!(payload.body.iter().all(|b| *b == 0));
}

#[tokio::test]
async fn server_streaming() {
    let upstream = upstream().await;
    let mut stream = test_client(&upstream)
        .await
        .streaming_output_call(StreamingOutputCallRequest {
            response_parameters: sizes(&[31_415, 9, 2_653, 58_979]),
            ..StreamingOutputCallRequest::default()
        })
        .await
        .expect("call starts")
        .into_inner();
    let mut lengths = Vec::new();
    while let Some(reply) = stream.message().await.expect("stream ends OK") {
        lengths.push(reply.payload.map_or(0, |p| p.body.len()));
    }
    assert_eq!(lengths, [31_415, 9, 2_653, 58_979]);
}

#[tokio::test]
async fn server_streaming_ends_with_requested_status_after_messages() {
    let upstream = upstream().await;
    let mut stream = test_client(&upstream)
        .await
        .streaming_output_call(StreamingOutputCallRequest {
            response_parameters: sizes(&[5, 6]),
            response_status: Some(EchoStatus {
                code: Code::Aborted as i32,
                message: "stopped on purpose".to_owned(),
            }),
            ..StreamingOutputCallRequest::default()
        })
        .await
        .expect("call starts")
        .into_inner();
    assert!(stream.message().await.expect("first message").is_some());
    assert!(stream.message().await.expect("second message").is_some());
    let status = stream.message().await.expect_err("ends with the status");
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(status.message(), "stopped on purpose");
}

#[tokio::test]
async fn client_streaming() {
    let upstream = upstream().await;
    let requests = [27_182, 8, 1_828, 45_904].map(|size| StreamingInputCallRequest {
        payload: zeros(size),
        ..StreamingInputCallRequest::default()
    });
    let reply = test_client(&upstream)
        .await
        .streaming_input_call(tokio_stream::iter(requests))
        .await
        .expect("call succeeds")
        .into_inner();
    assert_eq!(reply.aggregated_payload_size, 74_922);
}

#[tokio::test]
async fn ping_pong() {
    let upstream = upstream().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = test_client(&upstream)
        .await
        .full_duplex_call(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("call starts")
        .into_inner();
    for (request_size, response_size) in
        [(27_182, 31_415), (8, 9), (1_828, 2_653), (45_904, 58_979)]
    {
        tx.send(StreamingOutputCallRequest {
            response_parameters: sizes(&[response_size]),
            payload: zeros(request_size),
            ..StreamingOutputCallRequest::default()
        })
        .await
        .expect("server reads");
        let reply = replies
            .message()
            .await
            .expect("reply OK")
            .expect("one reply per request");
        assert_eq!(
            reply.payload.map_or(0, |p| p.body.len()),
            usize::try_from(response_size).expect("positive")
        );
    }
    drop(tx);
    assert!(replies.message().await.expect("ends OK").is_none());
}

#[tokio::test]
async fn status_code_and_message() {
    let upstream = upstream().await;
    let mut client = test_client(&upstream).await;
    let message = "test status message";
    let requested = Some(EchoStatus {
        code: 2,
        message: message.to_owned(),
    });

    let status = client
        .unary_call(SimpleRequest {
            response_status: requested.clone(),
            ..SimpleRequest::default()
        })
        .await
        .expect_err("unary answers the requested status");
    assert_eq!(status.code(), Code::Unknown);
    assert_eq!(status.message(), message);

    let mut duplex = client
        .full_duplex_call(tokio_stream::iter([StreamingOutputCallRequest {
            response_status: requested,
            ..StreamingOutputCallRequest::default()
        }]))
        .await
        .expect("call starts")
        .into_inner();
    let status = duplex
        .message()
        .await
        .expect_err("duplex answers the requested status");
    assert_eq!(status.code(), Code::Unknown);
    assert_eq!(status.message(), message);
}

fn with_echo_metadata<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "x-grpc-test-echo-initial",
        MetadataValue::from_static("test_initial_metadata_value"),
    );
    request.metadata_mut().insert_bin(
        "x-grpc-test-echo-trailing-bin",
        BinaryMetadataValue::from_bytes(&[0xab, 0xab, 0xab]),
    );
    request
}

fn assert_trailing_echo(metadata: &tonic::metadata::MetadataMap) {
    let trailing = metadata
        .get_bin("x-grpc-test-echo-trailing-bin")
        .expect("trailing metadata echoed")
        .to_bytes()
        .expect("valid base64");
    assert_eq!(trailing.as_ref(), [0xab, 0xab, 0xab]);
}

#[tokio::test]
async fn custom_metadata_unary() {
    let upstream = upstream().await;
    let reply = test_client(&upstream)
        .await
        .unary_call(with_echo_metadata(SimpleRequest {
            response_size: 314_159,
            payload: zeros(271_828),
            ..SimpleRequest::default()
        }))
        .await
        .expect("unary call succeeds");
    // tonic merges the trailers of a unary reply into its metadata.
    assert_eq!(
        reply.metadata().get("x-grpc-test-echo-initial"),
        Some(&MetadataValue::from_static("test_initial_metadata_value"))
    );
    assert_trailing_echo(reply.metadata());
}

#[tokio::test]
async fn custom_metadata_full_duplex() {
    let upstream = upstream().await;
    let request = with_echo_metadata(tokio_stream::iter([StreamingOutputCallRequest {
        response_parameters: sizes(&[314_159]),
        payload: zeros(271_828),
        ..StreamingOutputCallRequest::default()
    }]));
    let reply = test_client(&upstream)
        .await
        .full_duplex_call(request)
        .await
        .expect("call starts");
    assert_eq!(
        reply.metadata().get("x-grpc-test-echo-initial"),
        Some(&MetadataValue::from_static("test_initial_metadata_value"))
    );
    let mut stream = reply.into_inner();
    while stream.message().await.expect("stream ends OK").is_some() {}
    let trailers = stream
        .trailers()
        .await
        .expect("trailers OK")
        .expect("trailers present");
    assert_trailing_echo(&trailers);
}

#[tokio::test]
async fn custom_metadata_on_error_reply() {
    let upstream = upstream().await;
    let status = test_client(&upstream)
        .await
        .unary_call(with_echo_metadata(SimpleRequest {
            response_status: Some(EchoStatus {
                code: Code::NotFound as i32,
                message: "nothing here".to_owned(),
            }),
            ..SimpleRequest::default()
        }))
        .await
        .expect_err("answers the requested status");
    assert_eq!(status.code(), Code::NotFound);
    assert_trailing_echo(status.metadata());
}

#[tokio::test]
async fn unimplemented_method_and_service() {
    let upstream = upstream().await;
    let status = test_client(&upstream)
        .await
        .unimplemented_call(Empty {})
        .await
        .expect_err("method is unimplemented");
    assert_eq!(status.code(), Code::Unimplemented);

    let status = UnimplementedServiceClient::new(channel(&upstream).await)
        .unimplemented_call(Empty {})
        .await
        .expect_err("service is not served");
    assert_eq!(status.code(), Code::Unimplemented);
}

async fn collect_tokens(
    stream: &mut tonic::Streaming<GenerateResponse>,
) -> Result<Vec<GenerateResponse>, tonic::Status> {
    let mut tokens = Vec::new();
    while let Some(token) = stream.message().await? {
        tokens.push(token);
    }
    Ok(tokens)
}

#[tokio::test]
async fn generate_streams_tokens_then_done() {
    let upstream = upstream().await;
    let mut stream = generator(&upstream)
        .await
        .generate(fast_generation("tell me about proxies"))
        .await
        .expect("call starts")
        .into_inner();
    let tokens = collect_tokens(&mut stream).await.expect("stream ends OK");
    assert_eq!(tokens.len(), 8);
    assert!(tokens.iter().all(|t| !t.text.trim().is_empty()));
    assert_eq!(
        tokens.iter().map(|t| t.index).collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>()
    );
    let (last, rest) = tokens.split_last().expect("tokens");
    assert!(last.done);
    assert_eq!(last.finish_reason, "length");
    assert!(rest.iter().all(|t| !t.done));
    assert_eq!(upstream.stats().calls_cancelled(), 0);
}

#[tokio::test]
async fn generate_is_deterministic_for_a_seed() {
    let upstream = upstream().await;
    let mut client = generator(&upstream).await;
    let mut texts = Vec::new();
    for _ in 0..2 {
        let mut stream = client
            .generate(fast_generation("same prompt"))
            .await
            .expect("call starts")
            .into_inner();
        let tokens = collect_tokens(&mut stream).await.expect("stream ends OK");
        texts.push(tokens.into_iter().map(|t| t.text).collect::<String>());
    }
    assert_eq!(texts[0], texts[1]);
}

#[tokio::test]
async fn generate_fail_after_tokens_is_unavailable() {
    let upstream = upstream().await;
    let mut stream = generator(&upstream)
        .await
        .generate(GenerateRequest {
            fail_after_tokens: Some(3),
            ..fast_generation("crash")
        })
        .await
        .expect("call starts")
        .into_inner();
    let mut received = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(token)) => {
                assert!(!token.done);
                received += 1;
            }
            Ok(None) => panic!("stream ended OK after {received} tokens"),
            Err(status) => break status,
        }
    };
    assert_eq!(received, 3);
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "model crashed");
}

#[tokio::test]
async fn dropping_a_client_stream_cancels_the_handler() {
    let upstream = upstream().await;
    let stats = upstream.stats();
    let mut stream = generator(&upstream)
        .await
        .generate(GenerateRequest {
            first_token_delay_ms: Some(0),
            token_interval_ms: Some(60_000),
            time_scale: 1.0,
            ..fast_generation("long")
        })
        .await
        .expect("call starts")
        .into_inner();
    let first = stream.message().await.expect("first token OK");
    assert!(first.is_some());
    assert_eq!(stats.active_streams(), 1);
    drop(stream);
    assert!(stats.wait_cancelled(1, WAIT).await, "handler not cancelled");
    assert_eq!(stats.calls_cancelled(), 1);
    assert_eq!(stats.active_streams(), 0);
}

#[tokio::test]
async fn dropping_the_upstream_cuts_in_flight_streams() {
    let upstream = upstream().await;
    let stats = upstream.stats();
    let mut stream = generator(&upstream)
        .await
        .generate(GenerateRequest {
            first_token_delay_ms: Some(0),
            token_interval_ms: Some(60_000),
            time_scale: 1.0,
            ..fast_generation("cut")
        })
        .await
        .expect("call starts")
        .into_inner();
    assert!(stream.message().await.expect("first token OK").is_some());
    drop(upstream);
    let ended = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("client sees the end promptly");
    assert!(ended.is_err(), "a cut stream must not end OK: {ended:?}");
    assert!(stats.wait_cancelled(1, WAIT).await, "handler not cancelled");
}

#[tokio::test]
async fn shutdown_is_prompt_when_idle() {
    let upstream = upstream().await;
    let addr = upstream.local_addr();
    test_client(&upstream)
        .await
        .empty_call(Empty {})
        .await
        .expect("empty call succeeds");
    tokio::time::timeout(WAIT, upstream.shutdown())
        .await
        .expect("shutdown finishes");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
