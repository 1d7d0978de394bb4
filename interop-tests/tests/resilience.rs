//! Streaming resilience through the real stack: the four clocks, cancellation at scale,
//! graded shedding, the circuit breaker and budgeted retries. Timings here are generous bounds
//! on behaviour (a clock that fires at all, or never), not performance claims.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pnp_config::{Config, FirstMessage, Profile, Route};
use pnp_demo::pb::llm::GenerateRequest;
use pnp_interop_tests::admin::{sample, scrape_metrics};
use pnp_interop_tests::faults::{Fault, FaultyUpstream};
use pnp_interop_tests::interop::{encode, EMPTY_CALL, GENERATE};
use pnp_interop_tests::stack::upstream_url;
use pnp_interop_tests::{Mode, RawClient, Stack};
use tokio::net::TcpListener;

const OK: i32 = 0;
const DEADLINE_EXCEEDED: i32 = 4;
const RESOURCE_EXHAUSTED: i32 = 8;
const INTERNAL: i32 = 13;
const UNAVAILABLE: i32 = 14;

fn generate(tokens: u32, first_ms: u32, gap_ms: u32) -> Vec<u8> {
    encode(&GenerateRequest {
        prompt: "resilience".into(),
        max_tokens: tokens,
        seed: Some(3),
        first_token_delay_ms: Some(first_ms),
        token_interval_ms: Some(gap_ms),
        ..Default::default()
    })
}

/// A profile with only the given clocks (no retries, so upstream counts are exact).
fn profile(first_message: FirstMessage, idle: Option<Duration>) -> Profile {
    let mut profile = Profile {
        first_message,
        idle_timeout: idle,
        ..Profile::default()
    };
    profile.retry.max_attempts = 1;
    profile
}

fn set_default_profile(config: &mut Config, profile: Profile) {
    *config.jobs.default_profile_mut() = profile;
}

/// Read a whole streaming reply: (message arrival times, status code, message).
async fn stream_to_end(
    addr: SocketAddr,
    mode: Mode,
    path: &str,
    headers: &[(&str, &str)],
    request: &[u8],
) -> (Vec<Instant>, i32, String) {
    let mut stream = RawClient::new(addr, mode)
        .with_read_timeout(Duration::from_secs(30))
        .start(path, headers, &[request])
        .await;
    let mut arrivals = Vec::new();
    while let Some((_, at)) = stream.next_message().await {
        arrivals.push(at);
    }
    let (code, message) = stream.finish().await.expect("a status");
    (arrivals, code, message)
}

#[tokio::test]
async fn a_stream_with_a_message_every_5s_is_never_cut_by_a_10s_idle_clock() {
    let stack = Stack::start_with(|c| {
        set_default_profile(c, profile(FirstMessage::Off, Some(Duration::from_secs(10))))
    })
    .await;
    let started = Instant::now();
    let (arrivals, code, message) = stream_to_end(
        stack.proxy_addr(),
        Mode::WebBinaryH1,
        GENERATE,
        &[],
        &generate(3, 100, 5_000),
    )
    .await;
    assert_eq!(code, OK, "{message}");
    assert_eq!(arrivals.len(), 3);
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "the stream ran {:?}, it should have lasted ~10 s",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_stalled_stream_ends_when_the_10s_idle_clock_runs_out() {
    let stack = Stack::start_with(|c| {
        set_default_profile(c, profile(FirstMessage::Off, Some(Duration::from_secs(10))))
    })
    .await;
    // One token after 100 ms, then a minute of silence.
    let (arrivals, code, message) = stream_to_end(
        stack.proxy_addr(),
        Mode::GrpcH2,
        GENERATE,
        &[],
        &generate(2, 100, 60_000),
    )
    .await;
    assert_eq!(arrivals.len(), 1);
    let silence = Instant::now().duration_since(arrivals[0]);
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(11)).contains(&silence),
        "idle clock fired after {silence:?}"
    );
    assert_eq!(code, UNAVAILABLE, "{message}");
    assert!(message.contains("idle"), "{message}");
    assert!(
        stack
            .stats()
            .wait_cancelled(1, Duration::from_secs(2))
            .await,
        "the upstream stream was not cancelled"
    );
}

#[tokio::test]
async fn the_first_message_clock_fires_but_never_cuts_a_slow_steady_stream() {
    let stack = Stack::start_with(|c| {
        set_default_profile(
            c,
            profile(FirstMessage::After(Duration::from_millis(500)), None),
        )
    })
    .await;
    // The model thinks for 2 s: the first-message clock ends the call at ~500 ms.
    let started = Instant::now();
    let (arrivals, code, message) = stream_to_end(
        stack.proxy_addr(),
        Mode::WebTextH2,
        GENERATE,
        &[],
        &generate(3, 2_000, 10),
    )
    .await;
    let took = started.elapsed();
    assert!(arrivals.is_empty());
    assert_eq!(code, UNAVAILABLE, "{message}");
    assert!(message.contains("first_message"), "{message}");
    assert!(
        (Duration::from_millis(400)..Duration::from_millis(1500)).contains(&took),
        "first-message clock fired after {took:?}"
    );
    assert!(
        stack
            .stats()
            .wait_cancelled(1, Duration::from_secs(2))
            .await
    );

    // First token at 200 ms, then one every 700 ms: gaps longer than the first-message budget
    // do not matter once the first message arrived.
    let (arrivals, code, message) = stream_to_end(
        stack.proxy_addr(),
        Mode::WebBinaryH2,
        GENERATE,
        &[],
        &generate(4, 200, 700),
    )
    .await;
    assert_eq!(code, OK, "{message}");
    assert_eq!(arrivals.len(), 4);
}

#[tokio::test]
async fn a_profile_cap_bounds_the_deadline_and_grpc_timeout_is_deadline_exceeded() {
    let stack = Stack::start_with(|c| {
        let mut capped = profile(FirstMessage::Off, None);
        capped.max_duration = Some(Duration::from_millis(600));
        c.jobs.profiles.insert("capped".into(), capped);
        c.jobs.routes.push(Route {
            service: None,
            method: None,
            job: Some("batch".into()),
            profile: "capped".into(),
        });
    })
    .await;
    // The profile caps the call at 600 ms although the client allows 10 s.
    let started = Instant::now();
    let (_, code, message) = stream_to_end(
        stack.proxy_addr(),
        Mode::WebBinaryH1,
        GENERATE,
        &[("x-pnp-job", "batch"), ("grpc-timeout", "10S")],
        &generate(20, 100, 200),
    )
    .await;
    assert_eq!(code, DEADLINE_EXCEEDED, "{message}");
    assert!(message.contains("profile cap"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Without the job header the default profile applies, and the client's 300 ms wins.
    let (_, code, message) = stream_to_end(
        stack.proxy_addr(),
        Mode::GrpcH2,
        GENERATE,
        &[("grpc-timeout", "300m")],
        &generate(20, 100, 200),
    )
    .await;
    assert_eq!(code, DEADLINE_EXCEEDED, "{message}");
    assert!(message.contains("grpc-timeout"), "{message}");
    assert!(
        stack
            .stats()
            .wait_cancelled(2, Duration::from_secs(2))
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_with_30_percent_aborting_leave_no_upstream_stream_open() {
    let stack = Stack::start().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", stack.proxy_addr()))
        .expect("uri")
        .connect()
        .await
        .expect("connect to pnp");
    let client = pnp_demo::pb::llm::generator_client::GeneratorClient::new(channel);
    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let request = GenerateRequest {
                prompt: format!("stream {i}"),
                max_tokens: 8,
                seed: Some(u64::from(i)),
                first_token_delay_ms: Some(50),
                token_interval_ms: Some(150),
                ..Default::default()
            };
            let mut stream = client
                .generate(request)
                .await
                .expect("stream starts")
                .into_inner();
            let abort = i % 10 < 3;
            let mut received = 0;
            while let Some(token) = stream.message().await.expect("no error") {
                received += 1;
                if abort && received == 2 {
                    return (true, received, token.done);
                }
                if token.done {
                    return (false, received, true);
                }
            }
            (abort, received, false)
        }));
    }
    let mut aborted = 0;
    for task in tasks {
        let (was_aborted, received, done) = task.await.expect("task");
        if was_aborted {
            aborted += 1;
            assert_eq!(received, 2);
        } else {
            assert_eq!((received, done), (8, true), "a complete stream was cut");
        }
    }
    assert_eq!(aborted, 300);
    let stats = stack.stats();
    let deadline = Instant::now() + Duration::from_secs(2);
    while stats.active_streams() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.active_streams(), 0, "upstream streams left open");
    // The cancellation is counted when the upstream's response stream is dropped, which can
    // trail the active-stream count by a moment: wait for it rather than read it once.
    assert!(
        stats.wait_cancelled(300, Duration::from_secs(2)).await,
        "{} upstream streams saw the cancellation, expected 300",
        stats.calls_cancelled()
    );
}

#[tokio::test]
async fn over_the_limit_calls_get_resource_exhausted_while_admitted_ones_complete() {
    let limit = 8;
    let stack = Stack::start_with(|c| {
        c.resilience.max_concurrent_streams = limit;
        // One client address makes every call here: this test is about the global limit.
        c.resilience.max_streams_per_client = Some(limit);
    })
    .await;
    let addr = stack.proxy_addr();
    let calls = (0..4 * limit).map(|i| async move {
        let mode = Mode::ALL[i % Mode::ALL.len()];
        stream_to_end(addr, mode, GENERATE, &[], &generate(5, 100, 100)).await
    });
    let results = futures_util::future::join_all(calls).await;
    let ok: Vec<_> = results.iter().filter(|(_, code, _)| *code == OK).collect();
    let shed: Vec<_> = results
        .iter()
        .filter(|(_, code, _)| *code == RESOURCE_EXHAUSTED)
        .collect();
    assert_eq!(ok.len() + shed.len(), 4 * limit, "{results:?}");
    assert!(ok.len() >= limit, "only {} admitted", ok.len());
    assert!(shed.len() >= 2 * limit, "only {} shed", shed.len());
    for (arrivals, _, _) in &ok {
        assert_eq!(arrivals.len(), 5, "an admitted stream was cut");
    }
    for (arrivals, _, message) in &shed {
        assert!(arrivals.is_empty());
        assert!(message.contains("overloaded"), "{message}");
    }
}

#[tokio::test]
async fn with_a_peer_available_shed_calls_get_unavailable_with_pushback() {
    let stack = Stack::start_with(|c| {
        c.resilience.max_concurrent_streams = 1;
        c.resilience.peer_available = true;
    })
    .await;
    let addr = stack.proxy_addr();
    let long = tokio::spawn(async move {
        stream_to_end(addr, Mode::GrpcH2, GENERATE, &[], &generate(3, 300, 300)).await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let reply = RawClient::new(addr, Mode::WebBinaryH1)
        .call(GENERATE, &[], &[&generate(1, 0, 0)])
        .await;
    assert_eq!(
        reply.grpc_status(),
        Some(UNAVAILABLE),
        "{}",
        reply.grpc_message()
    );
    assert!(reply.trailers_only);
    assert_eq!(reply.headers["grpc-retry-pushback-ms"], "100");
    // A proxy-made error: CORS-readable like every other.
    let (_, code, _) = long.await.expect("task");
    assert_eq!(code, OK);
}

#[tokio::test]
async fn degradable_streams_become_one_buffered_reply_when_p95_is_over_its_slo() {
    let stack = Stack::start_with(|c| {
        c.resilience.stream_p95_slo = Duration::from_millis(50);
        let mut degradable = profile(FirstMessage::Off, None);
        degradable.degradable = true;
        set_default_profile(c, degradable);
    })
    .await;
    let request = generate(4, 50, 150);
    // The first call streams (no latency known yet) and teaches pnp that p95 is ~500 ms.
    let (first, code, _) = stream_to_end(
        stack.proxy_addr(),
        Mode::WebBinaryH2,
        GENERATE,
        &[],
        &request,
    )
    .await;
    assert_eq!(code, OK);
    let spread = first[3].duration_since(first[0]);
    assert!(
        spread >= Duration::from_millis(300),
        "not streamed: {spread:?}"
    );
    // Now p95 is over the 50 ms SLO: the same call arrives as one reply.
    let (second, code, message) = stream_to_end(
        stack.proxy_addr(),
        Mode::WebBinaryH2,
        GENERATE,
        &[],
        &request,
    )
    .await;
    assert_eq!(code, OK, "{message}");
    assert_eq!(second.len(), 4, "every token is still delivered");
    let spread = second[3].duration_since(second[0]);
    assert!(
        spread < Duration::from_millis(100),
        "still streamed: {spread:?}"
    );
}

/// An upstream whose answers the test scripts: UNAVAILABLE while `down`, else every
/// `fail_every`-th request UNAVAILABLE and the rest OK. Counts requests. It reads the whole
/// request before it answers.
struct ScriptedUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    /// Requests that carried `grpc-previous-rpc-attempts` (retries, as the upstream sees them).
    retried: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedUpstream {
    async fn start(fail_every: usize) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let retried = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let (count, retries, is_down) = (requests.clone(), retried.clone(), down.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (count, retries, is_down) = (count.clone(), retries.clone(), is_down.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let n = count.fetch_add(1, Ordering::SeqCst);
                        if request.headers().contains_key("grpc-previous-rpc-attempts") {
                            retries.fetch_add(1, Ordering::SeqCst);
                        }
                        let fail = is_down.load(Ordering::SeqCst)
                            || (fail_every > 0 && n % fail_every == 0);
                        let status = if fail { "14" } else { "0" };
                        let response = Response::builder()
                            .header("content-type", "application/grpc")
                            .header("grpc-status", status)
                            .body(Full::new(Bytes::new()))
                            .expect("response");
                        async move {
                            let _ = request.into_body().collect().await;
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        ScriptedUpstream {
            addr,
            requests,
            retried,
            down,
            task,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn retries_against_a_half_failing_upstream_stay_within_1_2x() {
    let upstream = ScriptedUpstream::start(2).await;
    let proxy = Stack::proxy_for(upstream_url(upstream.addr), |c| {
        let mut idempotent = Profile {
            idempotent: true,
            ..Profile::default()
        };
        idempotent.retry.initial_backoff = Duration::from_millis(1);
        idempotent.retry.max_backoff = Duration::from_millis(5);
        set_default_profile(c, idempotent);
        // Plenty of breaker room: this test is about the retry throttle.
        c.resilience.breaker_failures = 1_000;
    })
    .await;
    let clients = 400;
    let mut ok = 0;
    for i in 0..clients {
        let mode = Mode::ALL[i % Mode::ALL.len()];
        let reply = RawClient::new(proxy.local_addr(), mode)
            .call(EMPTY_CALL, &[], &[b""])
            .await;
        if reply.grpc_status() == Some(OK) {
            ok += 1;
        }
    }
    let attempts = upstream.requests();
    assert!(
        attempts <= clients * 12 / 10,
        "{attempts} upstream attempts for {clients} calls"
    );
    // Retries do happen (the throttle lets some through), and they turn failures into OKs.
    assert!(attempts > clients, "no retry was made");
    assert_eq!(
        upstream.retried.load(Ordering::SeqCst),
        attempts - clients,
        "every retry carries grpc-previous-rpc-attempts, no first attempt does"
    );
    assert!(ok > clients / 2, "{ok} OK of {clients}");
}

#[tokio::test]
async fn the_breaker_opens_probes_and_closes() {
    let upstream = ScriptedUpstream::start(0).await;
    let proxy = Stack::proxy_for(upstream_url(upstream.addr), |c| {
        set_default_profile(c, profile(FirstMessage::Off, None));
        c.resilience.breaker_failures = 3;
        c.resilience.breaker_base_penalty = Duration::from_millis(300);
        c.resilience.breaker_max_penalty = Duration::from_secs(1);
    })
    .await;
    let client = RawClient::new(proxy.local_addr(), Mode::GrpcH2);
    upstream.down.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let reply = client.call(EMPTY_CALL, &[], &[b""]).await;
        assert_eq!(reply.grpc_status(), Some(UNAVAILABLE));
    }
    assert_eq!(upstream.requests(), 3);
    // Open: fails fast without reaching the upstream.
    let reply = client.call(EMPTY_CALL, &[], &[b""]).await;
    assert_eq!(reply.grpc_status(), Some(UNAVAILABLE));
    assert!(
        reply.grpc_message().contains("circuit open"),
        "{}",
        reply.grpc_message()
    );
    assert_eq!(upstream.requests(), 3, "an open circuit let a call through");
    let admin = proxy.admin_addr().expect("admin");
    assert!(
        scrape_metrics(admin)
            .await
            .contains("pnp_breaker_state{upstream=\"http://"),
        "breaker gauge"
    );
    assert_eq!(breaker_gauge(admin).await, Some(2.0));

    // The upstream recovers; after the penalty one probe goes through and closes the circuit.
    upstream.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let reply = client.call(EMPTY_CALL, &[], &[b""]).await;
    assert_eq!(reply.grpc_status(), Some(OK), "{}", reply.grpc_message());
    assert_eq!(upstream.requests(), 4);
    for _ in 0..3 {
        let reply = client.call(EMPTY_CALL, &[], &[b""]).await;
        assert_eq!(reply.grpc_status(), Some(OK));
    }
    assert_eq!(upstream.requests(), 7);
    assert_eq!(breaker_gauge(admin).await, Some(0.0));
}

#[tokio::test]
async fn nothing_is_retried_after_a_response_byte() {
    // REFUSED_STREAM looks like "never processed", but a message already reached the client.
    let upstream = FaultyUpstream::start(Fault::ResetAfterMessage(h2::Reason::REFUSED_STREAM))
        .await
        .expect("fault upstream");
    let proxy = Stack::proxy_for(upstream.url(), |c| {
        let mut retry_everything = Profile {
            idempotent: true,
            ..Profile::default()
        };
        retry_everything.retry.retryable_codes = vec![
            pnp_config::parse_code("UNAVAILABLE").expect("code"),
            pnp_config::parse_code("INTERNAL").expect("code"),
        ];
        set_default_profile(c, retry_everything);
    })
    .await;
    for mode in Mode::ALL {
        let before = upstream.paths().len();
        let (arrivals, code, message) =
            stream_to_end(proxy.local_addr(), mode, GENERATE, &[], &generate(3, 0, 0)).await;
        assert_eq!(arrivals.len(), 1, "{mode:?}");
        assert_ne!(code, OK, "{mode:?}: {message}");
        assert_eq!(
            upstream.paths().len(),
            before + 1,
            "{mode:?}: the call was retried"
        );
    }
}

#[tokio::test]
async fn retries_of_unprocessed_calls_are_made_and_counted() {
    // Nothing listens on this port: connect refused, provably unprocessed, retried even for a
    // non-idempotent method, and each attempt is counted in the metrics.
    let dead = pnp_interop_tests::faults::ClosedPort::new().expect("a closed port");
    let url = upstream_url(dead.addr());
    let proxy = Stack::proxy_for(url, |c| {
        let mut fast = Profile::default();
        fast.retry.initial_backoff = Duration::from_millis(1);
        fast.retry.max_backoff = Duration::from_millis(5);
        set_default_profile(c, fast);
    })
    .await;
    let reply = RawClient::new(proxy.local_addr(), Mode::WebTextH1)
        .call(EMPTY_CALL, &[], &[b""])
        .await;
    assert_eq!(reply.grpc_status(), Some(UNAVAILABLE));
    let text = scrape_metrics(proxy.admin_addr().expect("admin")).await;
    let retries: f64 = text
        .lines()
        .filter(|l| l.starts_with("pnp_retries_total{") && l.contains("reason=\"unprocessed\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(retries, 2.0, "3 attempts = 2 retries\n{text}");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let stack = Stack::start_with(|c| {
        c.resilience.header_read_min = Duration::from_millis(300);
        c.resilience.header_read_max = Duration::from_millis(600);
    })
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(stack.proxy_addr())
        .await
        .expect("connect");
    stream
        .write_all(b"POST /grpc.testing.TestService/EmptyCall HTTP/1.1\r\nhost: pnp\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
    let closed_after = started.elapsed();
    assert!(read.is_ok(), "connection still open after 5 s");
    assert!(
        closed_after < Duration::from_secs(2),
        "closed after {closed_after:?}, the header-read clock is 300-600 ms"
    );
}

#[tokio::test]
async fn one_client_over_its_share_gets_resource_exhausted_while_another_is_served() {
    let share = 2;
    let stack = Stack::start_with(|c| {
        c.resilience.max_concurrent_streams = 100;
        c.resilience.max_streams_per_client = Some(share);
    })
    .await;
    let addr = stack.proxy_addr();
    let a = RawClient::new(addr, Mode::GrpcH2).with_local_ip(IpAddr::from([127, 0, 0, 1]));
    let b = RawClient::new(addr, Mode::WebBinaryH1).with_local_ip(IpAddr::from([127, 0, 0, 2]));
    // Client A fills its share with streams that send one token and then hold on.
    let mut held = Vec::new();
    for _ in 0..share {
        let mut stream = a.start(GENERATE, &[], &[&generate(2, 0, 60_000)]).await;
        assert!(
            stream.next_message().await.is_some(),
            "A's stream is served"
        );
        held.push(stream);
    }
    // A's next call is refused, naming the per-client limit, and never reaches the upstream.
    let upstream_calls = stack.stats().calls_started();
    let refused = a.call(GENERATE, &[], &[&generate(1, 0, 0)]).await;
    assert_eq!(
        refused.grpc_status(),
        Some(RESOURCE_EXHAUSTED),
        "{}",
        refused.grpc_message()
    );
    assert!(refused.trailers_only);
    assert!(
        refused.grpc_message().contains("per-client limit 2"),
        "{}",
        refused.grpc_message()
    );
    assert_eq!(
        refused.http_status, 200,
        "a gRPC status, not a bare HTTP 429"
    );
    // Client B is served in full meanwhile.
    let (arrivals, code, message) = {
        let mut stream = b.start(GENERATE, &[], &[&generate(3, 0, 10)]).await;
        let mut arrivals = 0;
        while stream.next_message().await.is_some() {
            arrivals += 1;
        }
        let (code, message) = stream.finish().await.expect("a status");
        (arrivals, code, message)
    };
    assert_eq!((code, arrivals), (OK, 3), "{message}");
    assert_eq!(stack.stats().calls_started(), upstream_calls + 1);
    // A's streams end (the upstream sees them cancelled): its slots come back.
    for stream in held {
        stream.abort();
    }
    assert!(
        stack
            .stats()
            .wait_cancelled(2, Duration::from_secs(5))
            .await
    );
    let reply = a.call(GENERATE, &[], &[&generate(1, 0, 0)]).await;
    assert_eq!(reply.grpc_status(), Some(OK), "{}", reply.grpc_message());
    let text = scrape_metrics(stack.proxy.admin_addr().expect("admin")).await;
    assert_eq!(
        sample(&text, r#"pnp_shed_total{reason="client_share"}"#),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn streams_that_fail_after_their_headers_open_the_breaker() {
    let upstream = FaultyUpstream::start(Fault::ResetAfterHeaders(h2::Reason::INTERNAL_ERROR))
        .await
        .expect("fault upstream");
    let proxy = Stack::proxy_for(upstream.url(), |c| {
        set_default_profile(c, profile(FirstMessage::Off, None));
        c.resilience.breaker_failures = 3;
        c.resilience.breaker_base_penalty = Duration::from_secs(30);
        c.resilience.breaker_max_penalty = Duration::from_secs(30);
    })
    .await;
    let client = RawClient::new(proxy.local_addr(), Mode::GrpcH2);
    for i in 0..3 {
        let stream = client.start(GENERATE, &[], &[&generate(1, 0, 0)]).await;
        assert!(
            !stream.is_trailers_only(),
            "call {i}: response headers came first"
        );
        let (code, message) = stream.finish().await.expect("a status");
        assert_eq!(code, INTERNAL, "call {i}: {message}");
        assert!(message.contains("reset"), "call {i}: {message}");
    }
    assert_eq!(upstream.paths().len(), 3);
    // Three failures after headers opened the circuit: the next call fails fast.
    let reply = RawClient::new(proxy.local_addr(), Mode::WebBinaryH1)
        .call(GENERATE, &[], &[&generate(1, 0, 0)])
        .await;
    assert_eq!(reply.grpc_status(), Some(UNAVAILABLE));
    assert!(reply.trailers_only);
    assert!(
        reply.grpc_message().contains("circuit open"),
        "{}",
        reply.grpc_message()
    );
    assert_eq!(
        upstream.paths().len(),
        3,
        "an open circuit let a call through"
    );
    assert_eq!(
        breaker_gauge(proxy.admin_addr().expect("admin")).await,
        Some(2.0)
    );
}

#[tokio::test]
async fn a_probe_whose_client_goes_away_does_not_leave_the_breaker_half_open() {
    let reset = Fault::ResetAfterHeaders(h2::Reason::INTERNAL_ERROR);
    let upstream = FaultyUpstream::start(Fault::Sequence(vec![
        reset.clone(),
        reset,
        // The probe: headers, then nothing until pnp resets it.
        Fault::StallAfterHeaders,
        Fault::TrailersOnly {
            code: OK,
            message: "fine",
            metadata: vec![],
        },
    ]))
    .await
    .expect("fault upstream");
    let proxy = Stack::proxy_for(upstream.url(), |c| {
        set_default_profile(c, profile(FirstMessage::Off, None));
        c.resilience.breaker_failures = 2;
        c.resilience.breaker_base_penalty = Duration::from_millis(200);
        c.resilience.breaker_max_penalty = Duration::from_millis(200);
    })
    .await;
    let client = RawClient::new(proxy.local_addr(), Mode::GrpcH2);
    for _ in 0..2 {
        let (_, code, message) = stream_to_end(
            proxy.local_addr(),
            Mode::GrpcH2,
            GENERATE,
            &[],
            &generate(1, 0, 0),
        )
        .await;
        assert_eq!(code, INTERNAL, "{message}");
    }
    // The circuit is open; once the penalty is served the first call let through is the probe.
    let deadline = Instant::now() + Duration::from_secs(5);
    let probe = loop {
        let stream = client.start(GENERATE, &[], &[&generate(1, 0, 0)]).await;
        if !stream.is_trailers_only() {
            break stream;
        }
        let (code, message) = stream.finish().await.expect("a status");
        assert_eq!(code, UNAVAILABLE, "{message}");
        assert!(message.contains("circuit open"), "{message}");
        assert!(Instant::now() < deadline, "no probe within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(upstream.paths().len(), 3);
    // One probe at a time: meanwhile other calls fail fast.
    let reply = client.call(GENERATE, &[], &[&generate(1, 0, 0)]).await;
    assert_eq!(reply.grpc_status(), Some(UNAVAILABLE));
    assert!(reply.grpc_message().contains("circuit open"));
    // The probe's client goes away before its status; pnp resets the upstream stream.
    probe.abort();
    assert!(
        upstream.wait_resets(1, Duration::from_secs(5)).await,
        "the probe's upstream stream was not reset"
    );
    // The breaker heard: the next call is let through as the new probe at once, not after
    // the probe timeout (10 s), and its success closes the circuit.
    let reply = client.call(GENERATE, &[], &[&generate(1, 0, 0)]).await;
    assert_eq!(reply.grpc_status(), Some(OK), "{}", reply.grpc_message());
    assert_eq!(upstream.paths().len(), 4);
    let admin = proxy.admin_addr().expect("admin");
    let text = scrape_metrics(admin).await;
    let abandoned = text
        .lines()
        .find(|l| l.starts_with("pnp_breaker_probes_abandoned_total{"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(abandoned, Some(1.0), "{text}");
    assert_eq!(breaker_gauge(admin).await, Some(0.0));
}

#[tokio::test]
async fn a_request_the_buffer_budget_cannot_hold_is_sent_once_and_not_retried() {
    // Requests 0, 2, 4, … are answered UNAVAILABLE, the others OK.
    let upstream = ScriptedUpstream::start(2).await;
    let proxy = Stack::proxy_for(upstream_url(upstream.addr), |c| {
        let mut idempotent = Profile {
            idempotent: true,
            ..Profile::default()
        };
        idempotent.retry.initial_backoff = Duration::from_millis(1);
        idempotent.retry.max_backoff = Duration::from_millis(5);
        set_default_profile(c, idempotent);
        c.limits.buffer_budget = 64;
    })
    .await;
    let client = RawClient::new(proxy.local_addr(), Mode::GrpcH2);
    // A request within the budget is kept, and the retry after UNAVAILABLE succeeds.
    let reply = client.call(EMPTY_CALL, &[], &[&[1u8; 16]]).await;
    assert_eq!(reply.grpc_status(), Some(OK), "{}", reply.grpc_message());
    assert_eq!(upstream.requests(), 2);
    // One the budget cannot hold still reaches the upstream, once: no retry can replay it, so
    // the client gets the upstream's UNAVAILABLE.
    let reply = client.call(EMPTY_CALL, &[], &[&[2u8; 256]]).await;
    assert_eq!(
        reply.grpc_status(),
        Some(UNAVAILABLE),
        "{}",
        reply.grpc_message()
    );
    assert_eq!(upstream.requests(), 3, "the call was retried");
    assert_eq!(upstream.retried.load(Ordering::SeqCst), 1);
    let text = scrape_metrics(proxy.admin_addr().expect("admin")).await;
    assert_eq!(
        sample(
            &text,
            r#"pnp_buffer_budget_refusals_total{reason="replay"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "pnp_buffered_bytes"),
        Some(0.0),
        "the replay bytes went back: {text}"
    );
}

async fn breaker_gauge(admin: SocketAddr) -> Option<f64> {
    scrape_metrics(admin)
        .await
        .lines()
        .find(|l| l.starts_with("pnp_breaker_state{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}
