//! Zero-loss rolling restart (issue #15). What a Kubernetes rollout does to pnp, on loopback:
//! pnp instances behind a round-robin TCP balancer that, like a Service's endpoints, sends new
//! connections only to instances whose `/readyz` answers 200 (polled every 100 ms, the way the
//! kubelet's readiness probe feeds kube-proxy, only faster). While a client runs 1 000 unary
//! calls/s (open loop) and keeps 200 token streams open, both instances are replaced one by
//! one as a Deployment with `maxSurge: 1, maxUnavailable: 0` does: a new instance starts and
//! becomes ready, then an old one is stopped with `shutdown_with_grace` (what SIGTERM does):
//! not ready, GOAWAY in two steps on HTTP/2, `Connection: close` on HTTP/1.1, in-flight calls
//! finish within the grace period, what is left ends with UNAVAILABLE.
//!
//! Asserted: no unary call fails, and every stream ends with a status: OK, or UNAVAILABLE with
//! pnp's shutdown message, never cut. The figures are printed (`--nocapture`). The client
//! re-sends, once, a request that provably never reached pnp, as gRPC and browser clients do:
//! one that HTTP/2 GOAWAY refused (gRFC A6 transparent retry) and one written onto a kept-alive
//! HTTP/1.1 connection as it was being closed; the figures count those re-sends.
//!
//! Smaller tests pin the wire behaviour the rollout relies on: the HTTP/2 GOAWAY sequence seen
//! by a raw client; `connection: close` on an HTTP/1.1 response that was still being read when
//! the drain began; a kept-alive HTTP/1.1 connection kept open after a stream whose head could
//! not say `connection: close`, for the client's next request; a connection that never sent a
//! byte not holding the drain.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::stream::{FuturesUnordered, StreamExt};
use pnp_demo::pb::grpc_testing::test_service_client::TestServiceClient;
use pnp_demo::pb::grpc_testing::Empty;
use pnp_demo::pb::llm::generator_client::GeneratorClient;
use pnp_demo::pb::llm::GenerateRequest;
use pnp_demo::DemoUpstream;
use pnp_interop_tests::channels::{self, native_without_local_deadline, origin, AnyChannel};
use pnp_interop_tests::stack::upstream_url;
use pnp_interop_tests::{Stack, TonicMode};
use pnp_proxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Unary calls started per second, whatever the answers take (open loop).
const UNARY_PER_SECOND: u64 = 1_000;
/// Token streams kept open at once.
const STREAMS: usize = 200;
/// How long new work is started.
const RUN: Duration = Duration::from_secs(12);
/// The stopping instance's grace period (pnp's `shutdown.grace_period`; 30 s in production).
/// Shorter than the longest streams, so both endings are exercised; long enough for a unary
/// call on a loaded 2-core machine.
const GRACE: Duration = Duration::from_secs(5);
/// What a drain may take beyond the grace period: idle HTTP/1.1 connections close after 1 s,
/// and connections get 5 s once their last calls were ended (what terminationGracePeriodSeconds
/// provides for, deploy/manifests.py AFTER_GRACE_SECONDS).
const AFTER_GRACE: Duration = Duration::from_secs(6);
/// How often the balancer asks an instance whether it is ready.
const READINESS_POLL: Duration = Duration::from_millis(100);
/// The message of the calls pnp ends at the end of its grace period.
const SHUTDOWN_MESSAGE: &str = "pnp is shutting down";

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// One pnp instance as the balancer sees it.
struct Backend {
    name: String,
    addr: SocketAddr,
    admin: SocketAddr,
    ready: AtomicBool,
    connections: AtomicU64,
}

/// A round-robin TCP balancer over the ready backends, like kube-proxy in front of a Service:
/// it forwards whole connections and knows nothing of HTTP. A connect that fails (an instance
/// that stopped listening before its readiness was seen) is tried on the next ready backend,
/// as nginx's, HAProxy's and Envoy's TCP proxies do by default.
#[derive(Default)]
struct Balancer {
    backends: Mutex<Vec<Arc<Backend>>>,
    next: AtomicUsize,
    connect_failures: AtomicU64,
    no_backend: AtomicU64,
}

impl Balancer {
    async fn start() -> (Arc<Balancer>, SocketAddr) {
        let listener = TcpListener::bind(loopback()).await.expect("balancer bind");
        let addr = listener.local_addr().expect("balancer address");
        let balancer = Arc::new(Balancer::default());
        let accepting = balancer.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let balancer = accepting.clone();
                tokio::spawn(async move { balancer.forward(client).await });
            }
        });
        (balancer, addr)
    }

    /// Adds an instance; it takes connections once its `/readyz` says so.
    fn add(self: &Arc<Self>, name: &str, proxy: &Proxy) -> Arc<Backend> {
        let backend = Arc::new(Backend {
            name: name.to_owned(),
            addr: proxy.local_addr(),
            admin: proxy.admin_addr().expect("the admin listener runs"),
            ready: AtomicBool::new(false),
            connections: AtomicU64::new(0),
        });
        self.backends
            .lock()
            .expect("backends")
            .push(backend.clone());
        let polled = backend.clone();
        tokio::spawn(async move {
            loop {
                if let Some(ready) = readyz(polled.admin).await {
                    polled.ready.store(ready, Ordering::Release);
                }
                tokio::time::sleep(READINESS_POLL).await;
            }
        });
        backend
    }

    async fn forward(&self, mut client: TcpStream) {
        let ready: Vec<Arc<Backend>> = {
            let backends = self.backends.lock().expect("backends");
            backends
                .iter()
                .filter(|b| b.ready.load(Ordering::Acquire))
                .cloned()
                .collect()
        };
        if ready.is_empty() {
            self.no_backend.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..ready.len() {
            let backend = &ready[(first + i) % ready.len()];
            match TcpStream::connect(backend.addr).await {
                Ok(mut upstream) => {
                    backend.connections.fetch_add(1, Ordering::Relaxed);
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    return;
                }
                Err(_) => {
                    self.connect_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.no_backend.fetch_add(1, Ordering::Relaxed);
    }
}

/// `GET /readyz`: 200 is ready; another answer, or a refused or broken connection (the
/// instance is gone), is not. No answer within a second says nothing (`None`): on a loaded
/// machine a slow probe must not take every instance out of rotation at once.
async fn readyz(admin: SocketAddr) -> Option<bool> {
    let probe = async {
        let Ok(mut stream) = TcpStream::connect(admin).await else {
            return false;
        };
        let request = b"GET /readyz HTTP/1.1\r\nhost: pnp\r\nconnection: close\r\n\r\n";
        if stream.write_all(request).await.is_err() {
            return false;
        }
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.is_ok() && response.starts_with(b"HTTP/1.1 200")
    };
    tokio::time::timeout(Duration::from_secs(1), probe)
        .await
        .ok()
}

/// A new pnp instance in front of the shared upstream, added to the balancer, once ready.
async fn start_instance(
    balancer: &Arc<Balancer>,
    name: &str,
    upstream: &DemoUpstream,
) -> (Proxy, Arc<Backend>) {
    let proxy = Stack::proxy_for(upstream_url(upstream.local_addr()), |config| {
        config.shutdown.grace_period = GRACE;
        // The balancer hides the clients' addresses (as SNAT does): every call comes from
        // 127.0.0.1, so the per-client share must not be what limits this test.
        config.resilience.max_streams_per_client = Some(config.resilience.max_concurrent_streams);
    })
    .await;
    let backend = balancer.add(name, &proxy);
    let started = Instant::now();
    while !backend.ready.load(Ordering::Acquire) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name} never became ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (proxy, backend)
}

/// What the stopping instance did: when it stopped and how long its drain took.
struct Drain {
    name: String,
    connections_before: u64,
    took: Duration,
    /// Calls this instance saw cancelled by their client (`grpc_status="1"`): none, if every
    /// request the client sent again had indeed never reached it.
    cancelled: u64,
    /// Calls it finished, whatever their status.
    calls: u64,
}

/// Calls that ended CANCELLED, from an instance's `/metrics` text.
fn cancelled_calls(metrics: &str) -> u64 {
    calls(metrics, r#"grpc_status="1""#)
}

/// Calls an instance finished whose series contains `matching`, from its `/metrics` text.
fn calls(metrics: &str, matching: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("pnp_calls_total{") && l.contains(matching))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// SIGTERM, as far as pnp is concerned.
fn stop(name: &str, proxy: Proxy, backend: &Backend) -> JoinHandle<Drain> {
    let name = name.to_owned();
    let connections_before = backend.connections.load(Ordering::Relaxed);
    let metrics = proxy.metrics().clone();
    tokio::spawn(async move {
        let started = Instant::now();
        proxy.shutdown_with_grace(GRACE).await;
        Drain {
            name,
            connections_before,
            took: started.elapsed(),
            cancelled: cancelled_calls(&metrics.encode()),
            calls: calls(&metrics.encode(), ""),
        }
    })
}

#[derive(Default)]
struct UnaryFigures {
    started: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    /// Calls sent again because GOAWAY showed they never reached pnp.
    retried: AtomicU64,
    errors: Mutex<Vec<String>>,
}

#[derive(Default)]
struct StreamFigures {
    ok: AtomicU64,
    shut_down: AtomicU64,
    failed: AtomicU64,
    tokens: AtomicU64,
    resent_goaway: AtomicU64,
    resent_closed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// Requests a client sent again, and why.
#[derive(Default)]
struct Resent {
    /// GOAWAY (or a connection closed before it was written) showed the request never
    /// reached pnp.
    goaway: u64,
    /// A kept-alive HTTP/1.1 connection was closed as the request went out on it.
    closed: u64,
}

/// How a token stream ended.
enum Ending {
    Ok,
    ShutDown,
    Failed(String),
}

async fn token_stream(
    client: &mut GeneratorClient<AnyChannel>,
    request: GenerateRequest,
    retried: &mut Resent,
) -> (Ending, u64) {
    let mut tokens = 0;
    let mut attempts = 0;
    let started = loop {
        attempts += 1;
        match client.generate(request.clone()).await {
            Err(status) if attempts < 3 && never_sent(&status) => retried.goaway += 1,
            Err(status) if attempts < 3 && closed_before_reply(&status) => retried.closed += 1,
            started => break started,
        }
    };
    let status = match started {
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(_)) => tokens += 1,
                    // tonic returns None only after a grpc-status 0; a stream that ends
                    // without a status is an error (UNKNOWN "missing grpc-status").
                    Ok(None) => return (Ending::Ok, tokens),
                    Err(status) => break status,
                }
            }
        }
        Err(status) => status,
    };
    let ending = if status.code() == tonic::Code::Unavailable
        && status.message().contains(SHUTDOWN_MESSAGE)
    {
        Ending::ShutDown
    } else {
        Ending::Failed(format!("{} after {tokens} tokens", describe(&status)))
    };
    (ending, tokens)
}

/// gRPC's transparent retry (gRFC A6): a call that never reached the server is sent again, on
/// another connection. h2 reports `GoAway` with NO_ERROR from the peer for the streams above a
/// GOAWAY's last stream id and for requests it had not sent yet; hyper reports `Canceled` for a
/// request whose connection closed before it was written. grpc-go, grpc-java and Chromium
/// retry these; hyper's client only for requests still in its own queue, not for one it had
/// taken up when the GOAWAY arrived.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            if hyper.is_canceled() {
                return true;
            }
        }
        source = error.source();
    }
    false
}

/// What a browser does on HTTP/1.1 (Chromium's `ShouldResendRequest`): a request sent on a
/// kept-alive connection that closes before any byte of a reply came back is sent again on a
/// new connection. A server closing an idle keep-alive connection always races a request the
/// client may be sending at that instant (RFC 9112 §9.6); pnp removes the race that it can
/// (h1drain.rs: no close right after a reply whose head could not say `Connection: close`),
/// this one only the client can. hyper's client does not resend a request it has written.
fn closed_before_reply(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            return hyper.is_incomplete_message();
        }
        source = error.source();
    }
    false
}

/// A status with the chain of errors behind it (what hyper and h2 said).
fn describe(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        text.push_str(&format!(" <- {error:?}"));
        source = error.source();
    }
    text
}

fn remember(errors: &Mutex<Vec<String>>, error: String) {
    let mut errors = errors.lock().expect("errors");
    if errors.len() < 10 {
        errors.push(error);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_loses_no_call_and_cuts_no_stream() {
    let upstream = DemoUpstream::start(loopback())
        .await
        .expect("demo upstream");
    let (balancer, entry) = Balancer::start().await;
    let (a, a_backend) = start_instance(&balancer, "a", &upstream).await;
    let (b, b_backend) = start_instance(&balancer, "b", &upstream).await;

    let began = Instant::now();

    // The client runs in this task (tonic's futures over the boxed channel are not `Send`
    // as far as the compiler can tell); its connections run on the runtime's threads.
    //
    // Unary: native gRPC over HTTP/2 through hyper's pooled client (one connection per
    // client), eight clients so that both instances carry calls. Open loop: a call starts
    // every millisecond whatever the earlier ones are doing.
    let unary = UnaryFigures::default();
    let unary_clients: Vec<TestServiceClient<AnyChannel>> = (0..8)
        .map(|_| TestServiceClient::with_origin(native_without_local_deadline(), origin(entry)))
        .collect();
    let unary_load = async {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / UNARY_PER_SECOND));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut calls = FuturesUnordered::new();
        let mut n = 0usize;
        loop {
            let starting = began.elapsed() < RUN;
            tokio::select! {
                _ = tick.tick(), if starting => {
                    let mut client = unary_clients[n % unary_clients.len()].clone();
                    n += 1;
                    unary.started.fetch_add(1, Ordering::Relaxed);
                    calls.push(async move {
                        let mut attempts = 0;
                        loop {
                            attempts += 1;
                            match client.empty_call(Empty {}).await {
                                Ok(_) => return (Ok(()), attempts > 1),
                                Err(status) if attempts < 3 && never_sent(&status) => {}
                                Err(status) => return (Err(status), attempts > 1),
                            }
                        }
                    });
                }
                Some((result, retried)) = calls.next() => match result {
                    Ok(()) => {
                        if retried {
                            unary.retried.fetch_add(1, Ordering::Relaxed);
                        }
                        unary.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => {
                        unary.failed.fetch_add(1, Ordering::Relaxed);
                        remember(
                            &unary.errors,
                            format!("at {:.3} s: {}", began.elapsed().as_secs_f64(), describe(&status)),
                        );
                    }
                },
                else => break,
            }
        }
    };

    // Token streams: 200 workers, each starting its next stream when the last one ended.
    // Three in four speak native gRPC over HTTP/2 (eight shared clients), one in four
    // gRPC-Web over HTTP/1.1 (a client of its own: a connection per stream at a time).
    // 1.1 s to 6.1 s each: some outlive the 5 s grace period.
    let streams = StreamFigures::default();
    let h2_clients: Vec<AnyChannel> = (0..8).map(|_| native_without_local_deadline()).collect();
    let mut workers = Vec::new();
    for i in 0..STREAMS {
        let mut client = if i % 4 == 3 {
            channels::generator(entry, TonicMode::WebH1).await // H1MARK
        } else {
            GeneratorClient::with_origin(h2_clients[i % h2_clients.len()].clone(), origin(entry))
        };
        let streams = &streams;
        workers.push(async move {
            let mut round = 0u32;
            while began.elapsed() < RUN {
                let request = GenerateRequest {
                    prompt: "roll".to_owned(),
                    max_tokens: 20 + (i as u32 * 7 + round * 13) % 101,
                    seed: Some(i as u64),
                    first_token_delay_ms: Some(100),
                    token_interval_ms: Some(50),
                    ..GenerateRequest::default()
                };
                round += 1;
                let mut resent = Resent::default();
                let (ending, tokens) = token_stream(&mut client, request, &mut resent).await;
                streams.tokens.fetch_add(tokens, Ordering::Relaxed);
                streams
                    .resent_goaway
                    .fetch_add(resent.goaway, Ordering::Relaxed);
                streams
                    .resent_closed
                    .fetch_add(resent.closed, Ordering::Relaxed);
                match ending {
                    Ending::Ok => streams.ok.fetch_add(1, Ordering::Relaxed),
                    Ending::ShutDown => streams.shut_down.fetch_add(1, Ordering::Relaxed),
                    Ending::Failed(error) => {
                        remember(
                            &streams.errors,
                            format!("at {:.3} s: {error}", began.elapsed().as_secs_f64()),
                        );
                        streams.failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        });
    }

    // The rollout: surge one new instance, stop one old one; twice.
    let rollout = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (c, c_backend) = start_instance(&balancer, "c", &upstream).await;
        let a_stopped_at = began.elapsed();
        let a_drain = stop("a", a, &a_backend);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (d, d_backend) = start_instance(&balancer, "d", &upstream).await;
        let b_stopped_at = began.elapsed();
        let b_drain = stop("b", b, &b_backend);
        (
            c,
            c_backend,
            a_stopped_at,
            a_drain,
            d,
            d_backend,
            b_stopped_at,
            b_drain,
        )
    };
    let ((), _, (c, c_backend, a_stopped_at, a_drain, d, d_backend, b_stopped_at, b_drain)) =
        tokio::join!(unary_load, join_all(workers), rollout);
    let drains = [
        a_drain.await.expect("drain a"),
        b_drain.await.expect("drain b"),
    ];

    let started = unary.started.load(Ordering::Relaxed);
    let unary_ok = unary.ok.load(Ordering::Relaxed);
    let unary_failed = unary.failed.load(Ordering::Relaxed);
    let streams_ok = streams.ok.load(Ordering::Relaxed);
    let streams_shut_down = streams.shut_down.load(Ordering::Relaxed);
    let streams_failed = streams.failed.load(Ordering::Relaxed);
    println!("rollout: {:.1} s of load, instances a,b replaced by c,d (a stopped at {:.1} s, b at {:.1} s), grace {GRACE:?}", began.elapsed().as_secs_f64(), a_stopped_at.as_secs_f64(), b_stopped_at.as_secs_f64());
    println!(
        "unary: {started} started, {unary_ok} OK, {unary_failed} failed; {} sent again (GOAWAY showed they had not reached pnp)",
        unary.retried.load(Ordering::Relaxed)
    );
    println!(
        "streams: {} ended, {streams_ok} OK, {streams_shut_down} UNAVAILABLE \"{SHUTDOWN_MESSAGE}…\", {streams_failed} cut or other errors; {} tokens; sent again: {} after GOAWAY, {} after a kept-alive HTTP/1.1 connection closed under them",
        streams_ok + streams_shut_down + streams_failed,
        streams.tokens.load(Ordering::Relaxed),
        streams.resent_goaway.load(Ordering::Relaxed),
        streams.resent_closed.load(Ordering::Relaxed)
    );
    for drain in &drains {
        println!(
            "drain {}: {:.2} s (connections it had taken: {}; calls cancelled by the client: {})",
            drain.name,
            drain.took.as_secs_f64(),
            drain.connections_before,
            drain.cancelled
        );
    }
    // What pnp saw: each call the client made finished exactly once, on one instance, so the
    // requests it sent again had not reached pnp the first time (nothing ran twice).
    let (c_metrics, d_metrics) = (c.metrics().encode(), d.metrics().encode());
    let cancelled_on_new = cancelled_calls(&c_metrics) + cancelled_calls(&d_metrics);
    let finished =
        drains.iter().map(|d| d.calls).sum::<u64>() + calls(&c_metrics, "") + calls(&d_metrics, "");
    println!(
        "calls cancelled by the client on c and d: {cancelled_on_new}; calls the four instances \
         finished: {finished}, calls the client made: {}",
        started + streams_ok + streams_shut_down + streams_failed
    );
    let made = started + streams_ok + streams_shut_down + streams_failed;
    for backend in [&a_backend, &b_backend, &c_backend, &d_backend] {
        println!(
            "connections to {}: {}",
            backend.name,
            backend.connections.load(Ordering::Relaxed)
        );
    }
    println!(
        "balancer: {} connects refused and retried on another instance, {} connections with no instance",
        balancer.connect_failures.load(Ordering::Relaxed),
        balancer.no_backend.load(Ordering::Relaxed)
    );
    let unary_errors = unary.errors.lock().expect("errors").clone();
    let stream_errors = streams.errors.lock().expect("errors").clone();
    for error in unary_errors.iter().chain(&stream_errors) {
        println!("error: {error}");
    }
    assert_eq!(unary_failed, 0, "unary failures, e.g. {unary_errors:#?}");
    assert_eq!(
        streams_failed, 0,
        "streams without a status or with another error, e.g. {stream_errors:#?}"
    );
    assert_eq!(unary_ok, started);
    assert_eq!(
        finished, made,
        "calls pnp finished against calls the client made"
    );
    assert_eq!(
        cancelled_on_new + drains.iter().map(|d| d.cancelled).sum::<u64>(),
        0
    );
    assert!(
        started >= UNARY_PER_SECOND * RUN.as_secs() * 9 / 10,
        "the load generator kept up: {started} calls"
    );
    assert!(
        streams_ok > STREAMS as u64,
        "streams ran to the end: {streams_ok}"
    );
    for drain in &drains {
        assert!(
            drain.took < GRACE + AFTER_GRACE,
            "drain of {} took {:?}, beyond its grace period and what follows it",
            drain.name,
            drain.took
        );
    }
    for backend in [&c_backend, &d_backend] {
        assert!(
            backend.connections.load(Ordering::Relaxed) > 0,
            "{} took over",
            backend.name
        );
    }

    c.shutdown_with_grace(Duration::from_secs(1)).await;
    d.shutdown_with_grace(Duration::from_secs(1)).await;
    upstream.shutdown().await;
}

/// One HTTP/2 frame as a raw client reads it.
struct Frame {
    kind: u8,
    flags: u8,
    payload: Vec<u8>,
}

async fn read_frame(stream: &mut TcpStream) -> Option<Frame> {
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).await.ok()?;
    let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        kind: header[3],
        flags: header[4],
        payload,
    })
}

fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut bytes = vec![
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        kind,
        flags,
        0,
        0,
        0,
        0,
    ];
    bytes.extend_from_slice(payload);
    bytes
}

const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

/// A draining pnp tells an HTTP/2 client in two steps (RFC 9113 §6.8): first GOAWAY with the
/// largest stream id and a PING, so that requests already on the wire are still served; then,
/// once the PING is answered, GOAWAY with the last stream it took. A balancer or client that
/// sees the first one stops sending new streams there and reconnects elsewhere.
#[tokio::test]
async fn drain_sends_goaway_in_two_steps() {
    let stack = Stack::start().await;
    let mut client = TcpStream::connect(stack.proxy_addr())
        .await
        .expect("connect");
    client
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    client
        .write_all(&frame(SETTINGS, 0, &[]))
        .await
        .expect("settings");
    // The server's SETTINGS: the connection is established.
    loop {
        let frame = read_frame(&mut client).await.expect("server settings");
        if frame.kind == SETTINGS && frame.flags & ACK == 0 {
            break;
        }
    }
    let Stack { upstream, proxy } = stack;
    let shutdown = tokio::spawn(proxy.shutdown_with_grace(Duration::from_secs(5)));

    let mut seen = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut client))
            .await
            .expect("the drain goes on");
        let Some(frame) = next else { break };
        match frame.kind {
            GOAWAY => {
                let last_stream =
                    u32::from_be_bytes(frame.payload[0..4].try_into().expect("4 bytes"))
                        & 0x7fff_ffff;
                let code = u32::from_be_bytes(frame.payload[4..8].try_into().expect("4 bytes"));
                seen.push(format!("GOAWAY last={last_stream} code={code}"));
            }
            PING if frame.flags & ACK == 0 => {
                seen.push("PING".to_owned());
                client
                    .write_all(&self::frame(PING, ACK, &frame.payload))
                    .await
                    .expect("pong");
            }
            SETTINGS if frame.flags & ACK == 0 => {
                client
                    .write_all(&self::frame(SETTINGS, ACK, &[]))
                    .await
                    .expect("settings ack");
            }
            _ => {}
        }
    }
    assert_eq!(
        seen,
        [
            "GOAWAY last=2147483647 code=0",
            "PING",
            "GOAWAY last=0 code=0"
        ],
        "what the client saw of the drain"
    );
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("the drain ended")
        .expect("shutdown task");
    upstream.shutdown().await;
}

/// An HTTP/1.1 request that is still arriving when the drain begins is answered in full, with
/// `connection: close`, and the connection is then closed: a keep-alive client knows not to
/// send its next request there.
#[tokio::test]
async fn drain_answers_http1_with_connection_close() {
    let stack = Stack::start().await;
    let mut client = TcpStream::connect(stack.proxy_addr())
        .await
        .expect("connect");
    // EmptyCall over gRPC-Web: one empty message (5 bytes), of which only the first 2 are
    // sent before the drain.
    client
        .write_all(
            b"POST /grpc.testing.TestService/EmptyCall HTTP/1.1\r\nhost: pnp\r\n\
              content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n\
              content-length: 5\r\n\r\n\0\0",
        )
        .await
        .expect("request head");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let Stack { upstream, proxy } = stack;
    let shutdown = tokio::spawn(proxy.shutdown_with_grace(Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    client.write_all(b"\0\0\0").await.expect("rest of the body");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut response))
        .await
        .expect("the server closed the connection after the response")
        .expect("read");
    let text = String::from_utf8_lossy(&response).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
    assert!(text.contains("grpc-status:0"), "{text}");
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("the drain ended")
        .expect("shutdown task");
    upstream.shutdown().await;
}

/// Reads until `buf` ends with `end`, or the connection closes. False when it closed first.
async fn read_until(client: &mut TcpStream, buf: &mut Vec<u8>, end: &[u8]) -> bool {
    let mut chunk = [0u8; 4096];
    while !buf.ends_with(end) {
        match tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return false,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no bytes for 5 s; so far: {}", String::from_utf8_lossy(buf)),
        }
    }
    true
}

/// A token stream whose response head left before the drain began cannot say
/// `Connection: close`; when it ends, the client sees a reusable connection and may send its next
/// request on it at once. pnp keeps the connection open for that request (answering it with
/// `Connection: close`) instead of closing it right after the stream, which would lose it.
#[tokio::test]
async fn drain_keeps_a_kept_alive_http1_connection_for_the_next_request() {
    use prost::Message;
    let stack = Stack::start().await;
    let mut client = TcpStream::connect(stack.proxy_addr())
        .await
        .expect("connect");
    let request = GenerateRequest {
        prompt: "drain".to_owned(),
        max_tokens: 5,
        seed: Some(1),
        first_token_delay_ms: Some(0),
        token_interval_ms: Some(100),
        ..GenerateRequest::default()
    }
    .encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(request.len()).expect("small").to_be_bytes());
    body.extend_from_slice(&request);
    let mut head = format!(
        "POST /demo.llm.v1.Generator/Generate HTTP/1.1\r\nhost: pnp\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    head.extend_from_slice(&body);
    client.write_all(&head).await.expect("stream request");
    let mut stream = Vec::new();
    assert!(
        read_until(&mut client, &mut stream, b"\r\n\r\n").await,
        "response head"
    );
    let stream_head = String::from_utf8_lossy(&stream).to_lowercase();
    assert!(stream_head.starts_with("http/1.1 200"), "{stream_head}");
    assert!(!stream_head.contains("connection: close"), "{stream_head}");

    let Stack { upstream, proxy } = stack;
    let shutdown = tokio::spawn(proxy.shutdown_with_grace(Duration::from_secs(5)));
    // The rest of the stream: the tokens, the trailer frame, the last chunk.
    assert!(
        read_until(&mut client, &mut stream, b"0\r\n\r\n").await,
        "the stream ended"
    );
    assert!(String::from_utf8_lossy(&stream).contains("grpc-status:0"));

    // The next request at once, as a pooling client does.
    client
        .write_all(
            b"POST /grpc.testing.TestService/EmptyCall HTTP/1.1\r\nhost: pnp\r\n\
              content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n\
              content-length: 5\r\n\r\n\0\0\0\0\0",
        )
        .await
        .expect("next request");
    let mut next = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut next))
        .await
        .expect("the server closed the connection after the answer")
        .expect("read");
    let next = String::from_utf8_lossy(&next).to_lowercase();
    assert!(
        next.starts_with("http/1.1 200"),
        "the next request was answered: {next:?}"
    );
    assert!(next.contains("\r\nconnection: close\r\n"), "{next}");
    assert!(next.contains("grpc-status:0"), "{next}");
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("the drain ended")
        .expect("shutdown task");
    upstream.shutdown().await;
}

/// A connection on which nothing was sent (a pool connecting ahead of need) does not hold the
/// drain until the handshake timeout: it is closed once it has been idle for a second.
#[tokio::test]
async fn drain_closes_a_silent_connection_after_a_second() {
    let stack = Stack::start().await;
    let mut silent = TcpStream::connect(stack.proxy_addr())
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let Stack { upstream, proxy } = stack;
    let started = Instant::now();
    proxy.shutdown_with_grace(Duration::from_secs(30)).await;
    let took = started.elapsed();
    assert!(
        // 1 s of silence, then closed; far from the 30 s grace or the 10 s handshake timeout.
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "the drain took {took:?}"
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(1), silent.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "the silent connection was closed: {read:?}"
    );
    upstream.shutdown().await;
}
