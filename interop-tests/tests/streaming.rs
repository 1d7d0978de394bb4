//! Streaming through pnp as an LLM front end needs it: messages are forwarded as they are
//! produced (never buffered), a client that goes away cancels the upstream handler, and a
//! token stream ends with its final message or with the upstream's error status.
//!
//! One test per (scenario, client, mode), so a failure names its cell.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pnp_demo::pb::grpc_testing::StreamingOutputCallResponse;
use pnp_demo::pb::llm::{GenerateRequest, GenerateResponse};
use pnp_interop_tests::channels::{generator, test_service};
use pnp_interop_tests::interop::*;
use pnp_interop_tests::{Mode, RawClient, Stack, TonicMode};

/// The server sleeps this long before each response.
const INTERVAL: Duration = Duration::from_millis(300);
/// Number of paced responses.
const PACED_RESPONSES: usize = 4;
/// Accepted inter-arrival gap: a buffered stream would show gaps near zero (and one long
/// wait), a stalled one gaps well above the interval.
const GAP_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(200)..=Duration::from_millis(450);
/// How long the upstream may take to notice that the client went away.
const CANCEL_OBSERVED_WITHIN: Duration = Duration::from_secs(2);
/// Tokens asked of the generator.
const TOKENS: u32 = 16;
/// Tokens produced before the generator "crashes".
const FAIL_AFTER: u32 = 3;

macro_rules! per_mode {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::*;

            #[tokio::test]
            async fn raw_web_binary_h1() {
                raw_cases::$scenario(Mode::WebBinaryH1).await
            }

            #[tokio::test]
            async fn raw_web_binary_h2() {
                raw_cases::$scenario(Mode::WebBinaryH2).await
            }

            #[tokio::test]
            async fn raw_web_text_h1() {
                raw_cases::$scenario(Mode::WebTextH1).await
            }

            #[tokio::test]
            async fn raw_web_text_h2() {
                raw_cases::$scenario(Mode::WebTextH2).await
            }

            #[tokio::test]
            async fn raw_grpc_h2() {
                raw_cases::$scenario(Mode::GrpcH2).await
            }

            #[tokio::test]
            async fn tonic_web_h1() {
                tonic_cases::$scenario(TonicMode::WebH1).await
            }

            #[tokio::test]
            async fn tonic_web_h2() {
                tonic_cases::$scenario(TonicMode::WebH2).await
            }

            #[tokio::test]
            async fn tonic_native() {
                tonic_cases::$scenario(TonicMode::Native).await
            }
        }
    )*};
}

per_mode!(
    paced_messages_are_not_buffered,
    abort_mid_stream_cancels_upstream,
    generator_streams_tokens_to_done,
    generator_failure_is_unavailable,
);

/// Four small responses, each after sleeping [`INTERVAL`].
fn paced_request() -> pnp_demo::pb::grpc_testing::StreamingOutputCallRequest {
    let interval_us = i32::try_from(INTERVAL.as_micros()).unwrap_or(i32::MAX);
    streaming_request(
        (0..PACED_RESPONSES)
            .map(|_| response(64, interval_us))
            .collect(),
        0,
    )
}

fn assert_paced(started: Instant, arrivals: &[Instant]) {
    assert_eq!(arrivals.len(), PACED_RESPONSES, "responses received");
    let mut previous = started;
    let gaps: Vec<Duration> = arrivals
        .iter()
        .map(|&at| {
            let gap = at.duration_since(previous);
            previous = at;
            gap
        })
        .collect();
    // The first gap includes connecting and the call set-up, so only its lower bound counts.
    assert!(
        gaps[0] >= *GAP_RANGE.start(),
        "first response after {:?}: {gaps:?}",
        gaps[0]
    );
    for (i, gap) in gaps.iter().enumerate().skip(1) {
        assert!(
            GAP_RANGE.contains(gap),
            "gap {i} is {gap:?}, expected {GAP_RANGE:?} (all gaps {gaps:?})"
        );
    }
}

/// A long token stream: a token every 50 ms for 100 tokens.
fn long_generation() -> GenerateRequest {
    GenerateRequest {
        prompt: "tell me a long story".to_owned(),
        max_tokens: 100,
        seed: Some(1),
        first_token_delay_ms: Some(0),
        token_interval_ms: Some(50),
        ..GenerateRequest::default()
    }
}

/// A quick generation with the demo's realistic pacing scaled down 100 times.
fn scaled_generation(fail_after_tokens: Option<u32>) -> GenerateRequest {
    GenerateRequest {
        prompt: "hello".to_owned(),
        max_tokens: TOKENS,
        seed: Some(42),
        time_scale: 0.01,
        fail_after_tokens,
        ..GenerateRequest::default()
    }
}

/// Checks a complete token stream: indices 0.., text in every token, only the last done.
fn assert_complete(tokens: &[GenerateResponse]) {
    assert_eq!(tokens.len(), TOKENS as usize, "tokens {tokens:?}");
    for (i, token) in tokens.iter().enumerate() {
        assert_eq!(token.index as usize, i, "token {token:?}");
        assert!(!token.text.trim().is_empty(), "empty token {token:?}");
        let last = i + 1 == tokens.len();
        assert_eq!(token.done, last, "token {token:?}");
        assert_eq!(
            token.finish_reason,
            if last { "length" } else { "" },
            "token {token:?}"
        );
    }
}

fn assert_partial(tokens: &[GenerateResponse]) {
    assert_eq!(tokens.len(), FAIL_AFTER as usize, "tokens {tokens:?}");
    assert!(tokens.iter().all(|t| !t.done), "tokens {tokens:?}");
}

mod raw_cases {
    use super::*;

    pub(super) async fn paced_messages_are_not_buffered(mode: Mode) {
        let stack = Stack::start().await;
        let client = RawClient::new(stack.proxy_addr(), mode);
        let started = Instant::now();
        let mut stream = client
            .start(STREAMING_OUTPUT_CALL, &[], &[&encode(&paced_request())])
            .await;
        let mut arrivals = Vec::new();
        while let Some((message, at)) = stream.next_message().await {
            let response: StreamingOutputCallResponse = decode(&message);
            assert_eq!(zero_payload_len(response.payload.as_ref()), 64);
            arrivals.push(at);
        }
        assert_eq!(stream.finish().await, Ok((code::OK, String::new())));
        assert_paced(started, &arrivals);
    }

    pub(super) async fn abort_mid_stream_cancels_upstream(mode: Mode) {
        let stack = Stack::start().await;
        let stats = stack.stats();
        let client = RawClient::new(stack.proxy_addr(), mode);
        let mut stream = client
            .start(GENERATE, &[], &[&encode(&long_generation())])
            .await;
        for expected in 0..2 {
            let (message, _) = stream.next_message().await.expect("a token");
            let token: GenerateResponse = decode(&message);
            assert_eq!(token.index, expected);
        }
        assert_eq!(stats.active_streams(), 1);
        stream.abort();
        assert!(
            stats.wait_cancelled(1, CANCEL_OBSERVED_WITHIN).await,
            "the upstream did not see the abort: {stats:?}"
        );
        assert_eq!(stats.active_streams(), 0);
    }

    async fn generate(
        mode: Mode,
        request: GenerateRequest,
    ) -> (Vec<GenerateResponse>, i32, String) {
        let stack = Stack::start().await;
        let client = RawClient::new(stack.proxy_addr(), mode);
        let mut stream = client.start(GENERATE, &[], &[&encode(&request)]).await;
        let mut tokens = Vec::new();
        while let Some((message, _)) = stream.next_message().await {
            tokens.push(decode::<GenerateResponse>(&message));
        }
        let (code, message) = stream
            .finish()
            .await
            .unwrap_or_else(|e| panic!("no status: {e}"));
        (tokens, code, message)
    }

    pub(super) async fn generator_streams_tokens_to_done(mode: Mode) {
        let (tokens, code, message) = generate(mode, scaled_generation(None)).await;
        assert_eq!((code, message.as_str()), (code::OK, ""));
        assert_complete(&tokens);
    }

    pub(super) async fn generator_failure_is_unavailable(mode: Mode) {
        let (tokens, code, message) = generate(mode, scaled_generation(Some(FAIL_AFTER))).await;
        assert_eq!(
            (code, message.as_str()),
            (code::UNAVAILABLE, "model crashed")
        );
        assert_partial(&tokens);
    }
}

mod tonic_cases {
    use super::*;
    use tonic::Code;

    pub(super) async fn paced_messages_are_not_buffered(mode: TonicMode) {
        let stack = Stack::start().await;
        let mut client = test_service(stack.proxy_addr(), mode).await;
        let started = Instant::now();
        let mut inbound = client
            .streaming_output_call(paced_request())
            .await
            .unwrap_or_else(|s| panic!("StreamingOutputCall failed: {s:?}"))
            .into_inner();
        let mut arrivals = Vec::new();
        while let Some(response) = inbound
            .message()
            .await
            .unwrap_or_else(|s| panic!("stream failed: {s:?}"))
        {
            assert_eq!(zero_payload_len(response.payload.as_ref()), 64);
            arrivals.push(Instant::now());
        }
        assert_paced(started, &arrivals);
    }

    pub(super) async fn abort_mid_stream_cancels_upstream(mode: TonicMode) {
        let stack = Stack::start().await;
        let stats = stack.stats();
        let mut client = generator(stack.proxy_addr(), mode).await;
        let mut inbound = client
            .generate(long_generation())
            .await
            .unwrap_or_else(|s| panic!("Generate failed: {s:?}"))
            .into_inner();
        for expected in 0..2 {
            let token = inbound
                .message()
                .await
                .unwrap_or_else(|s| panic!("stream failed: {s:?}"))
                .expect("a token");
            assert_eq!(token.index, expected);
        }
        drop(inbound);
        assert!(
            stats.wait_cancelled(1, CANCEL_OBSERVED_WITHIN).await,
            "the upstream did not see the abort: {stats:?}"
        );
        assert_eq!(stats.active_streams(), 0);
    }

    async fn generate(
        mode: TonicMode,
        request: GenerateRequest,
    ) -> (Vec<GenerateResponse>, Result<(), tonic::Status>) {
        let stack = Stack::start().await;
        let mut client = generator(stack.proxy_addr(), mode).await;
        let mut inbound = match client.generate(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return (Vec::new(), Err(status)),
        };
        let mut tokens = Vec::new();
        while let Some(item) = inbound.next().await {
            match item {
                Ok(token) => tokens.push(token),
                Err(status) => return (tokens, Err(status)),
            }
        }
        (tokens, Ok(()))
    }

    pub(super) async fn generator_streams_tokens_to_done(mode: TonicMode) {
        let (tokens, ended) = generate(mode, scaled_generation(None)).await;
        if let Err(status) = ended {
            panic!("stream failed: {status:?}");
        }
        assert_complete(&tokens);
    }

    pub(super) async fn generator_failure_is_unavailable(mode: TonicMode) {
        let (tokens, ended) = generate(mode, scaled_generation(Some(FAIL_AFTER))).await;
        let status = ended.expect_err("the stream should fail");
        assert_eq!(
            (status.code(), status.message()),
            (Code::Unavailable, "model crashed"),
            "{status:?}"
        );
        assert_partial(&tokens);
    }
}
