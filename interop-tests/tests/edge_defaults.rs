//! The edge's safe defaults through the real proxy: CORS credentials only for listed origins,
//! `$httpHeaders` only from allowed origins and never for headers it must not set, `x-pnp-job`
//! believed only where the config trusts it, the client appended to `x-forwarded-for`, and the
//! default first-message and idle clocks yielding to a longer `grpc-timeout`.
//!
//! What the upstream received is read from a [`FaultyUpstream`], which records every request's
//! headers before it answers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http::header::HeaderMap;
use http::{Method, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use pnp_config::{AllowedOrigins, Config, FirstMessage, Profile, Route};
use pnp_demo::pb::llm::GenerateRequest;
use pnp_interop_tests::admin::scrape_metrics;
use pnp_interop_tests::faults::{Fault, FaultyUpstream};
use pnp_interop_tests::interop::{encode, ECHO_INITIAL, EMPTY_CALL, GENERATE};
use pnp_interop_tests::raw::encode_frames;
use pnp_interop_tests::{Mode, RawClient, RawReply, Stack};
use pnp_proxy::Proxy;

const OK: i32 = 0;
const UNAVAILABLE: i32 = 14;

const ORIGIN: &str = "https://app.example";
const OTHER_ORIGIN: &str = "https://elsewhere.example";

/// Longest a single exchange may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(10);

/// An upstream that answers every call OK at once and records what it received.
async fn recording_upstream() -> FaultyUpstream {
    FaultyUpstream::start(Fault::TrailersOnly {
        code: OK,
        message: "recorded",
        metadata: Vec::new(),
    })
    .await
    .expect("recording upstream")
}

/// The headers of the only request `upstream` received.
fn only_request(upstream: &FaultyUpstream) -> HeaderMap {
    let mut seen = upstream.request_headers();
    assert_eq!(seen.len(), 1, "the upstream saw {} requests", seen.len());
    seen.remove(0)
}

/// All values of `name` in `headers`, in order.
fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

fn header<'r>(reply: &'r RawReply, name: &str) -> Option<&'r str> {
    reply.headers.get(name).and_then(|v| v.to_str().ok())
}

/// `$httpHeaders=<block>`, percent-encoded as grpc-web does.
fn http_headers_query(block: &str) -> String {
    let encoded = percent_encoding::utf8_percent_encode(block, percent_encoding::NON_ALPHANUMERIC);
    format!("$httpHeaders={encoded}")
}

/// An empty EmptyCall request, framed and base64-encoded: the body of a CORS-simple request.
fn text_body() -> Bytes {
    Bytes::from(STANDARD.encode(encode_frames(&[b""])))
}

async fn call(
    proxy: SocketAddr,
    mode: Mode,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> RawReply {
    tokio::time::timeout(
        HANG,
        RawClient::new(proxy, mode).call_raw_body(path, headers, body),
    )
    .await
    .unwrap_or_else(|_| panic!("{mode} {path}: no reply within {HANG:?}"))
}

/// A CORS-simple request as a browser sends it with grpc-web's `suppressCorsPreflight`: a
/// `text/plain` base64 body, the real headers in `$httpHeaders`.
async fn simple_request(proxy: SocketAddr, origin: Option<&str>, block: &str) -> RawReply {
    let path = format!("{EMPTY_CALL}?{}", http_headers_query(block));
    let mut headers = vec![
        ("content-type", "text/plain;charset=UTF-8"),
        ("accept", "*/*"),
    ];
    if let Some(origin) = origin {
        headers.push(("origin", origin));
    }
    call(proxy, Mode::WebTextH1, &path, &headers, text_body()).await
}

/// A CORS preflight for a gRPC-Web call from `origin`: the response headers.
async fn preflight(proxy: SocketAddr, origin: &str) -> HeaderMap {
    let tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connecting to the proxy");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/1.1 handshake");
    let task = tokio::spawn(connection);
    let request = Request::builder()
        .method(Method::OPTIONS)
        .uri(EMPTY_CALL)
        .header("host", proxy.to_string())
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,x-grpc-web")
        .body(Empty::<Bytes>::new())
        .expect("preflight request");
    let response = tokio::time::timeout(HANG, sender.send_request(request))
        .await
        .expect("a preflight answer in time")
        .expect("a preflight answer");
    assert!(response.status().is_success(), "preflight: {response:?}");
    task.abort();
    response.headers().clone()
}

// ---------------------------------------------------------------------------------------------
// CORS: credentials only for listed origins.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_default_allows_any_origin_without_credentials() {
    let stack = Stack::start().await;
    let answer = preflight(stack.proxy_addr(), OTHER_ORIGIN).await;
    assert_eq!(
        answer
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some(OTHER_ORIGIN),
        "preflight: {answer:?}"
    );
    assert!(
        !answer.contains_key("access-control-allow-credentials"),
        "any origin was allowed credentials: {answer:?}"
    );

    let reply = call(
        stack.proxy_addr(),
        Mode::WebBinaryH2,
        EMPTY_CALL,
        &[("origin", OTHER_ORIGIN)],
        encode_frames(&[b""]),
    )
    .await;
    reply.assert_ok();
    assert_eq!(
        header(&reply, "access-control-allow-origin"),
        Some(OTHER_ORIGIN)
    );
    assert_eq!(
        header(&reply, "access-control-allow-credentials"),
        None,
        "{reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_origin_list_allows_credentials_to_listed_origins_only() {
    let stack = Stack::start_with(|c| {
        c.cors.allowed_origins = AllowedOrigins::List(vec![ORIGIN.to_owned()]);
    })
    .await;
    let listed = preflight(stack.proxy_addr(), ORIGIN).await;
    let get = |headers: &HeaderMap, name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(
        get(&listed, "access-control-allow-origin").as_deref(),
        Some(ORIGIN)
    );
    assert_eq!(
        get(&listed, "access-control-allow-credentials").as_deref(),
        Some("true"),
        "{listed:?}"
    );
    let unlisted = preflight(stack.proxy_addr(), OTHER_ORIGIN).await;
    assert_eq!(
        get(&unlisted, "access-control-allow-origin"),
        None,
        "{unlisted:?}"
    );

    let reply = call(
        stack.proxy_addr(),
        Mode::WebBinaryH1,
        EMPTY_CALL,
        &[("origin", ORIGIN)],
        encode_frames(&[b""]),
    )
    .await;
    reply.assert_ok();
    assert_eq!(
        header(&reply, "access-control-allow-credentials"),
        Some("true")
    );
}

// ---------------------------------------------------------------------------------------------
// $httpHeaders.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_headers_from_a_listed_origin_are_honoured_and_from_others_ignored() {
    let upstream = recording_upstream().await;
    let proxy = Stack::proxy_for(upstream.url(), |c| {
        c.cors.allowed_origins = AllowedOrigins::List(vec![ORIGIN.to_owned()]);
    })
    .await;
    let block = "x-grpc-web:1\r\nx-custom:from-param\r\n";

    // A simple request from an unlisted origin, or with no Origin at all: the parameter is
    // ignored, so the request is what it says it is, text/plain, and refused as such.
    for origin in [Some(OTHER_ORIGIN), None] {
        let reply = simple_request(proxy.local_addr(), origin, block).await;
        assert_eq!(reply.http_status, 415, "{origin:?}: {reply:?}");
        assert!(
            reply
                .grpc_message()
                .contains("$httpHeaders parameter was ignored"),
            "{origin:?}: the refusal does not say why: {:?}",
            reply.grpc_message()
        );
    }
    assert!(upstream.request_headers().is_empty());

    // From an unlisted origin with real gRPC-Web headers the call goes through on its own
    // headers, without the parameter's.
    let path = format!("{EMPTY_CALL}?{}", http_headers_query(block));
    let reply = call(
        proxy.local_addr(),
        Mode::WebTextH1,
        &path,
        &[("origin", OTHER_ORIGIN), ("x-custom", "from-header")],
        text_body(),
    )
    .await;
    reply.assert_ok();
    assert_eq!(
        values(&only_request(&upstream), "x-custom"),
        ["from-header"]
    );

    // From the listed origin the parameter stands in for the headers.
    let reply = simple_request(proxy.local_addr(), Some(ORIGIN), block).await;
    reply.assert_ok();
    let seen = upstream.request_headers();
    assert_eq!(seen.len(), 2);
    assert_eq!(values(&seen[1], "x-custom"), ["from-param"]);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_headers_can_be_turned_off() {
    let upstream = recording_upstream().await;
    let proxy = Stack::proxy_for(upstream.url(), |c| c.cors.http_headers_param = false).await;
    let reply = simple_request(proxy.local_addr(), Some(ORIGIN), "x-grpc-web:1\r\n").await;
    assert_eq!(reply.http_status, 415, "{reply:?}");
    assert!(
        reply.grpc_message().contains("cors.http_headers_param"),
        "{:?}",
        reply.grpc_message()
    );
    assert!(upstream.request_headers().is_empty());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_headers_cannot_set_the_job_forwarding_or_hop_headers() {
    let upstream = recording_upstream().await;
    // Trusted job headers and no x-forwarded-for of pnp's own: whatever reaches the upstream
    // would have come from the parameter.
    let proxy = Stack::proxy_for(upstream.url(), |c| {
        c.edge.trust_job_header = true;
        c.edge.forwarded_for = false;
    })
    .await;
    let block =
        "x-grpc-web:1\r\nx-pnp-job:chat\r\nx-forwarded-for:6.6.6.6\r\nx-real-ip:6.6.6.6\r\n\
                 forwarded:for=6.6.6.6\r\nx-custom:kept\r\n";
    let reply = simple_request(proxy.local_addr(), Some(ORIGIN), block).await;
    reply.assert_ok();
    let seen = only_request(&upstream);
    for name in ["x-pnp-job", "x-forwarded-for", "x-real-ip", "forwarded"] {
        assert!(
            !seen.contains_key(name),
            "the parameter set {name}: {seen:?}"
        );
    }
    assert_eq!(values(&seen, "x-custom"), ["kept"]);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_plain_request_with_http_headers_is_grpc_web_text() {
    let stack = Stack::start().await;
    // The parameter claims a binary body; a simple request's body is base64 whatever it says,
    // and `accept: */*` asks for nothing in particular: the reply is text because the request is.
    let block =
        format!("content-type:application/grpc-web+proto\r\nx-grpc-web:1\r\n{ECHO_INITIAL}:hi\r\n");
    for origin in [Some(ORIGIN), None] {
        let reply = simple_request(stack.proxy_addr(), origin, &block).await;
        // The raw client (text mode) checks the reply is application/grpc-web-text.
        reply.assert_ok();
        assert_eq!(reply.messages.len(), 1, "{origin:?}");
        assert_eq!(header(&reply, ECHO_INITIAL), Some("hi"), "{origin:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// x-forwarded-for.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_address_is_appended_to_x_forwarded_for() {
    let upstream = recording_upstream().await;
    let proxy = Stack::proxy_for(upstream.url(), |_| {}).await;
    for mode in [Mode::WebBinaryH1, Mode::GrpcH2] {
        call(
            proxy.local_addr(),
            mode,
            EMPTY_CALL,
            &[("x-forwarded-for", "203.0.113.9")],
            encode_frames(&[b""]),
        )
        .await
        .assert_ok();
    }
    call(
        proxy.local_addr(),
        Mode::WebBinaryH2,
        EMPTY_CALL,
        &[],
        encode_frames(&[b""]),
    )
    .await
    .assert_ok();
    let seen = upstream.request_headers();
    assert_eq!(seen.len(), 3);
    for (i, expected) in [
        "203.0.113.9, 127.0.0.1",
        "203.0.113.9, 127.0.0.1",
        "127.0.0.1",
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(values(&seen[i], "x-forwarded-for"), [expected], "call {i}");
    }
    proxy.shutdown().await;

    let upstream = recording_upstream().await;
    let proxy = Stack::proxy_for(upstream.url(), |c| c.edge.forwarded_for = false).await;
    call(
        proxy.local_addr(),
        Mode::WebBinaryH1,
        EMPTY_CALL,
        &[("x-forwarded-for", "203.0.113.9")],
        encode_frames(&[b""]),
    )
    .await
    .assert_ok();
    assert_eq!(
        values(&only_request(&upstream), "x-forwarded-for"),
        ["203.0.113.9"]
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// x-pnp-job trust.

/// A proxy in front of a stalling upstream whose `slow` job gets a profile with a 300 ms
/// first-message clock: a call of that job ends with a status naming the profile.
async fn proxy_with_slow_job(upstream: &FaultyUpstream, trust: bool) -> Proxy {
    Stack::proxy_for(upstream.url(), |c| {
        let mut slow = Profile {
            first_message: FirstMessage::After(Duration::from_millis(300)),
            first_message_explicit: true,
            ..Profile::default()
        };
        slow.retry.max_attempts = 1;
        c.jobs.profiles.insert("slowprofile".into(), slow);
        c.jobs.routes.push(Route {
            service: None,
            method: None,
            job: Some("slow".into()),
            profile: "slowprofile".into(),
        });
        c.edge.trust_job_header = trust;
    })
    .await
}

/// Whether a `pnp_calls_total` sample carries the label `job="<job>"`.
fn calls_labelled(metrics: &str, job: &str) -> bool {
    metrics
        .lines()
        .any(|l| l.starts_with("pnp_calls_total{") && l.contains(&format!("job=\"{job}\"")))
}

/// A call with `x-pnp-job: slow` over `mode`: the route naming that job is picked, so the
/// stalling upstream's call ends with the slow profile's first-message clock.
async fn call_as_the_slow_job(proxy: &Proxy, mode: Mode) {
    let reply = call(
        proxy.local_addr(),
        mode,
        EMPTY_CALL,
        &[("x-pnp-job", "slow")],
        encode_frames(&[b""]),
    )
    .await;
    assert_eq!(reply.grpc_status(), Some(UNAVAILABLE), "{reply:?}");
    assert!(
        reply.grpc_message().contains("profile slowprofile"),
        "the route naming the job was not picked: {:?}",
        reply.grpc_message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_job_header_picks_its_route_but_is_no_label_and_not_forwarded() {
    let upstream = FaultyUpstream::start(Fault::StallAfterHeaders)
        .await
        .expect("stalling upstream");
    let proxy = proxy_with_slow_job(&upstream, false).await;
    call_as_the_slow_job(&proxy, Mode::WebBinaryH1).await;
    let seen = only_request(&upstream);
    assert!(
        !seen.contains_key("x-pnp-job"),
        "an untrusted x-pnp-job went upstream: {seen:?}"
    );
    let admin = proxy.admin_addr().expect("admin listener");
    let metrics = scrape_metrics(admin).await;
    assert!(calls_labelled(&metrics, "none"), "{metrics}");
    assert!(
        !calls_labelled(&metrics, "slow"),
        "an untrusted job became a label:\n{metrics}"
    );
    proxy.shutdown_with_grace(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_job_header_is_forwarded_and_a_label() {
    let upstream = FaultyUpstream::start(Fault::StallAfterHeaders)
        .await
        .expect("stalling upstream");
    let proxy = proxy_with_slow_job(&upstream, true).await;
    call_as_the_slow_job(&proxy, Mode::GrpcH2).await;
    assert_eq!(values(&only_request(&upstream), "x-pnp-job"), ["slow"]);
    let metrics = scrape_metrics(proxy.admin_addr().expect("admin listener")).await;
    assert!(calls_labelled(&metrics, "slow"), "{metrics}");
    proxy.shutdown_with_grace(Duration::ZERO).await;
}

// ---------------------------------------------------------------------------------------------
// Default clocks and grpc-timeout.

fn generate(tokens: u32, first_ms: u32, gap_ms: u32) -> Vec<u8> {
    encode(&GenerateRequest {
        prompt: "edge".into(),
        max_tokens: tokens,
        seed: Some(5),
        first_token_delay_ms: Some(first_ms),
        token_interval_ms: Some(gap_ms),
        ..Default::default()
    })
}

/// (messages, status code, status message, how long the call took).
async fn stream(
    proxy: SocketAddr,
    headers: &[(&str, &str)],
    request: &[u8],
) -> (usize, i32, String, Duration) {
    let started = Instant::now();
    let mut stream = RawClient::new(proxy, Mode::WebBinaryH2)
        .with_read_timeout(Duration::from_secs(20))
        .start(GENERATE, headers, &[request])
        .await;
    let mut messages = 0;
    while stream.next_message().await.is_some() {
        messages += 1;
    }
    let (code, message) = stream.finish().await.expect("a status");
    (messages, code, message, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_clocks_do_not_cut_a_call_before_its_longer_grpc_timeout() {
    // The built-in clocks are 30 s; this default profile has the same standing (not set by
    // the config) with 300 ms clocks, so the rule shows in test time.
    let stack = Stack::start_with(|c| {
        let profile = c.jobs.default_profile_mut();
        assert!(!profile.first_message_explicit && !profile.idle_timeout_explicit);
        profile.first_message = FirstMessage::After(Duration::from_millis(300));
        profile.idle_timeout = Some(Duration::from_millis(300));
        profile.retry.max_attempts = 1;
    })
    .await;
    // First token after 1 s, then gaps of 700 ms: both clocks would have fired.
    let request = generate(3, 1_000, 700);
    let (messages, code, message, _) =
        stream(stack.proxy_addr(), &[("grpc-timeout", "40S")], &request).await;
    assert_eq!(code, OK, "{message}");
    assert_eq!(messages, 3);

    // Without a grpc-timeout nothing else bounds the call: the clocks run.
    let (messages, code, message, _) = stream(stack.proxy_addr(), &[], &request).await;
    assert_eq!(messages, 0);
    assert_eq!(code, UNAVAILABLE, "{message}");
    assert!(message.contains("first_message"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_the_config_sets_applies_whatever_the_grpc_timeout() {
    let configured = Config::from_toml(
        "[profiles.default]\nfirst_message_timeout = \"300ms\"\n[profiles.default.retry]\nmax_attempts = 1",
    )
    .expect("config parses");
    let stack = Stack::start_with(|c| c.jobs = configured.jobs).await;
    let (messages, code, message, took) = stream(
        stack.proxy_addr(),
        &[("grpc-timeout", "40S")],
        &generate(3, 3_000, 10),
    )
    .await;
    assert_eq!(messages, 0);
    assert_eq!(code, UNAVAILABLE, "{message}");
    assert!(
        message.contains("first_message timeout of profile default"),
        "{message}"
    );
    assert!(
        (Duration::from_millis(250)..Duration::from_millis(2_000)).contains(&took),
        "the clock fired after {took:?}"
    );
}
