//! Observability through the real stack: request ids end to end, and the Prometheus series an
//! operator scrapes after real calls.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pnp_demo::pb::llm::GenerateRequest;
use pnp_interop_tests::admin::{sample, scrape_metrics};
use pnp_interop_tests::interop::encode;
use pnp_interop_tests::{Mode, RawClient, Stack};
use tokio::net::TcpListener;

/// A gRPC upstream that records the headers of every request and answers Trailers-Only OK.
struct HeaderRecorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HeaderRecorder {
    async fn start() -> HeaderRecorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        record.lock().expect("lock").push(request.headers().clone());
                        let response = Response::builder()
                            .header("content-type", "application/grpc")
                            .header("grpc-status", "0")
                            .body(Full::new(Bytes::new()))
                            .expect("response");
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        HeaderRecorder { addr, seen, task }
    }

    fn last(&self) -> HeaderMap {
        self.seen
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("the upstream saw a request")
    }
}

impl Drop for HeaderRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_request_without_an_id_gets_one_that_the_upstream_sees_and_the_response_carries() {
    let upstream = HeaderRecorder::start().await;
    let proxy = Stack::proxy_for(
        pnp_interop_tests::stack::upstream_url(upstream.addr),
        |_| {},
    )
    .await;
    for mode in Mode::ALL {
        let reply = RawClient::new(proxy.local_addr(), mode)
            .call("/grpc.testing.TestService/EmptyCall", &[], &[b""])
            .await;
        assert_eq!(reply.grpc_status(), Some(0), "{mode:?}");
        let returned = reply
            .headers
            .get("x-request-id")
            .unwrap_or_else(|| panic!("{mode:?}: no x-request-id on the response"))
            .clone();
        assert_eq!(returned.len(), 32, "{mode:?}: {returned:?}");
        let seen = upstream.last();
        assert_eq!(
            seen.get("x-request-id"),
            Some(&returned),
            "{mode:?}: the upstream saw another id"
        );
    }
}

#[tokio::test]
async fn an_ai_trace_id_is_kept_end_to_end() {
    let upstream = HeaderRecorder::start().await;
    let proxy = Stack::proxy_for(
        pnp_interop_tests::stack::upstream_url(upstream.addr),
        |_| {},
    )
    .await;
    let reply = RawClient::new(proxy.local_addr(), Mode::WebTextH1)
        .call(
            "/grpc.testing.TestService/EmptyCall",
            &[("x-ai-trace-id", "trace-7f3a")],
            &[b""],
        )
        .await;
    assert_eq!(reply.grpc_status(), Some(0));
    assert_eq!(reply.headers["x-request-id"], "trace-7f3a");
    let seen = upstream.last();
    assert_eq!(seen["x-request-id"], "trace-7f3a");
    assert_eq!(seen["x-ai-trace-id"], "trace-7f3a");

    // An explicit x-request-id is kept as it is.
    let reply = RawClient::new(proxy.local_addr(), Mode::GrpcH2)
        .call(
            "/grpc.testing.TestService/EmptyCall",
            &[("x-request-id", "req-42")],
            &[b""],
        )
        .await;
    assert_eq!(reply.headers["x-request-id"], "req-42");
    assert_eq!(upstream.last()["x-request-id"], "req-42");
}

#[tokio::test]
async fn metrics_count_calls_by_status_after_an_interop_run() {
    // Jobs are labels only where the edge trusts the client's x-pnp-job.
    let stack = Stack::start_with(|c| c.edge.trust_job_header = true).await;
    let admin = stack.proxy.admin_addr().expect("admin listener");
    let (ok_calls, unimplemented_calls) = (7, 3);
    for i in 0..ok_calls {
        let mode = Mode::ALL[i % Mode::ALL.len()];
        let reply = RawClient::new(stack.proxy_addr(), mode)
            .call(
                "/grpc.testing.TestService/EmptyCall",
                &[("x-pnp-job", "chat")],
                &[b""],
            )
            .await;
        assert_eq!(reply.grpc_status(), Some(0), "{mode:?}");
    }
    for i in 0..unimplemented_calls {
        let reply = RawClient::new(stack.proxy_addr(), Mode::WebBinaryH2)
            .call(
                &format!("/no.Such/Method{i}"),
                &[("x-pnp-job", "chat")],
                &[b""],
            )
            .await;
        assert_eq!(reply.grpc_status(), Some(12));
    }
    let text = scrape_metrics(admin).await;
    let ok = sample(
        &text,
        r#"pnp_calls_total{method="/grpc.testing.TestService/EmptyCall",job="chat",transport="h2",grpc_status="0"}"#,
    );
    assert_eq!(ok, Some(ok_calls as f64), "{text}");
    // Unknown methods collapse into one label value, whatever path was asked for.
    let unimplemented = sample(
        &text,
        r#"pnp_calls_total{method="unknown",job="chat",transport="h2",grpc_status="12"}"#,
    );
    assert_eq!(unimplemented, Some(unimplemented_calls as f64), "{text}");
    assert!(
        !text.contains("no.Such"),
        "unknown paths leaked into labels:\n{text}"
    );
    assert_eq!(
        sample(&text, r#"pnp_active_streams{transport="h2"}"#),
        Some(0.0),
        "{text}"
    );
    // EmptyCall carries one empty request message and one empty response message per call.
    // (An upstream that answers UNIMPLEMENTED at once may reset the stream before pnp has
    // forwarded the request message, so those calls may or may not count one.)
    let requests = sample(
        &text,
        r#"pnp_messages_total{direction="request",transport="h2"}"#,
    )
    .expect("request message counter");
    assert!(
        (ok_calls as f64..=(ok_calls + unimplemented_calls) as f64).contains(&requests),
        "{requests} request messages\n{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"pnp_messages_total{direction="response",transport="h2"}"#
        ),
        Some(ok_calls as f64),
        "{text}"
    );
}

#[tokio::test]
async fn the_first_message_histogram_reflects_the_models_delay() {
    let stack = Stack::start().await;
    let admin = stack.proxy.admin_addr().expect("admin listener");
    let request = GenerateRequest {
        prompt: "hello".into(),
        max_tokens: 3,
        seed: Some(1),
        first_token_delay_ms: Some(300),
        token_interval_ms: Some(20),
        ..Default::default()
    };
    let reply = RawClient::new(stack.proxy_addr(), Mode::WebTextH2)
        .call("/demo.llm.v1.Generator/Generate", &[], &[&encode(&request)])
        .await;
    assert_eq!(reply.grpc_status(), Some(0));
    assert_eq!(reply.messages.len(), 3);

    let text = scrape_metrics(admin).await;
    let labels = r#"method="/demo.llm.v1.Generator/Generate",job="none""#;
    let count = sample(
        &text,
        &format!("pnp_first_message_seconds_count{{{labels}}}"),
    );
    assert_eq!(count, Some(1.0), "{text}");
    let sum = sample(&text, &format!("pnp_first_message_seconds_sum{{{labels}}}"))
        .expect("first-message sum");
    assert!(
        (0.3..1.5).contains(&sum),
        "time to first message {sum} s for a 300 ms model delay"
    );
    let below = sample(
        &text,
        &format!(r#"pnp_first_message_seconds_bucket{{le="0.25",{labels}}}"#),
    );
    assert_eq!(below, Some(0.0), "{text}");
    // Two gaps of about 20 ms between three tokens.
    let gaps = sample(&text, &format!("pnp_message_gap_seconds_count{{{labels}}}"));
    assert_eq!(gaps, Some(2.0), "{text}");
    let fast_gaps = sample(
        &text,
        &format!(r#"pnp_message_gap_seconds_bucket{{le="0.25",{labels}}}"#),
    );
    assert_eq!(fast_gaps, Some(2.0), "{text}");
}
