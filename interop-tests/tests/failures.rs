//! DESIGN.md "Failure semantics", seen from the client: an upstream that dies, resets, forgets
//! its status, answers with an HTML error page or stalls; a deadline that runs out; a client
//! that goes away. Every call must end with a `grpc-status` that says what happened, never OK
//! for a stream cut short, and nothing may keep running upstream.
//!
//! Real sockets only: the proxy on a loopback port, the demo upstream in-process or as a child
//! process (so it can be killed with SIGKILL), and the misbehaving servers of
//! `pnp_interop_tests::faults`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::Reason;
use pnp_demo::pb::grpc_testing::{
    Payload, ResponseParameters, SimpleRequest, SimpleResponse, StreamingOutputCallRequest,
};
use pnp_interop_tests::faults::{Fault, FaultyUpstream, FAULT_MESSAGE};
use pnp_interop_tests::stack::upstream_url;
use pnp_interop_tests::{Mode, RawClient, RawStream, Stack};
use pnp_proxy::Proxy;
use prost::Message as _;

const UNARY: &str = "/grpc.testing.TestService/UnaryCall";
const STREAMING_OUTPUT: &str = "/grpc.testing.TestService/StreamingOutputCall";

const OK: i32 = 0;
const CANCELLED: i32 = 1;
const DEADLINE_EXCEEDED: i32 = 4;
const RESOURCE_EXHAUSTED: i32 = 8;
const INTERNAL: i32 = 13;
const UNAVAILABLE: i32 = 14;

/// Longest any single call in these tests may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(10);

/// A `UnaryCall` asking for a payload of `size` bytes.
fn unary_request(size: i32) -> Vec<u8> {
    SimpleRequest {
        response_size: size,
        payload: Some(Payload {
            body: vec![1; 16],
            ..Payload::default()
        }),
        ..SimpleRequest::default()
    }
    .encode_to_vec()
}

/// A `StreamingOutputCall` asking for `count` 16-byte messages, `interval` apart.
fn streaming_request(count: usize, interval: Duration) -> Vec<u8> {
    let interval_us = i32::try_from(interval.as_micros()).expect("interval fits an int32");
    StreamingOutputCallRequest {
        response_parameters: vec![
            ResponseParameters {
                size: 16,
                interval_us,
                ..ResponseParameters::default()
            };
            count
        ],
        ..StreamingOutputCallRequest::default()
    }
    .encode_to_vec()
}

/// Reads a stream to its end: the messages received and the final status (`Err` when the
/// stream ended without one). Panics if it does not end within [`HANG`].
async fn read_to_end(
    mut stream: RawStream,
    what: &str,
) -> (Vec<Bytes>, Result<(i32, String), String>) {
    let ended = tokio::time::timeout(HANG, async {
        let mut messages = Vec::new();
        while let Some((message, _)) = stream.next_message().await {
            messages.push(message);
        }
        (messages, stream.finish().await)
    })
    .await;
    ended.unwrap_or_else(|_| panic!("{what}: the call did not end within {HANG:?}"))
}

/// One call's messages and final status, without the raw client's panic on a missing status.
async fn call_to_end(
    proxy: SocketAddr,
    mode: Mode,
    path: &str,
    headers: &[(&str, &str)],
    request: &[u8],
) -> (Vec<Bytes>, Result<(i32, String), String>) {
    let stream = tokio::time::timeout(
        HANG,
        RawClient::new(proxy, mode).start(path, headers, &[request]),
    )
    .await
    .unwrap_or_else(|_| panic!("{mode}: no response headers within {HANG:?}"));
    read_to_end(stream, &mode.to_string()).await
}

/// The final status of a call that must end with one.
fn expect_status(mode: Mode, ended: Result<(i32, String), String>) -> (i32, String) {
    ended.unwrap_or_else(|e| panic!("{mode}: the call ended without a grpc-status: {e}"))
}

async fn proxy_in_front_of(fault: Fault) -> (FaultyUpstream, Proxy) {
    let upstream = FaultyUpstream::start(fault)
        .await
        .expect("starting the fault upstream");
    let proxy = Stack::proxy_for(upstream.url(), |_| {}).await;
    (upstream, proxy)
}

/// The demo upstream in a child process, killed (SIGKILL) when dropped.
struct UpstreamProcess {
    child: Child,
    addr: SocketAddr,
}

impl UpstreamProcess {
    /// Starts `interop-upstream` on `addr` (port 0 when `None`) and waits for its
    /// `listening on ADDR` line.
    async fn spawn(addr: Option<SocketAddr>) -> UpstreamProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_interop-upstream"));
        if let Some(addr) = addr {
            command.arg(addr.to_string());
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning interop-upstream");
        let stdout = child.stdout.take().expect("piped stdout");
        // From here on the guard owns the child, so a failed start still kills it.
        let mut process = UpstreamProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let line = tokio::time::timeout(
            HANG,
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                BufReader::new(stdout).read_line(&mut line).map(|_| line)
            }),
        )
        .await
        .expect("interop-upstream did not print its address in time")
        .expect("reader task")
        .expect("reading interop-upstream's stdout");
        process.addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from interop-upstream: {line:?}"));
        process
    }

    /// SIGKILL, and reap the process.
    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL interop-upstream");
        self.child.wait().expect("reaping interop-upstream");
    }
}

impl Drop for UpstreamProcess {
    fn drop(&mut self) {
        // Already dead after `kill`; the errors of a second kill do not matter.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_stream_ends_every_mode_with_unavailable() {
    let mut upstream = UpstreamProcess::spawn(None).await;
    let proxy = Stack::proxy_for(upstream_url(upstream.addr), |_| {}).await;
    let addr = proxy.local_addr();

    // One stream per mode, 40 messages 100 ms apart; each has delivered its first message
    // before the upstream dies.
    let request = streaming_request(40, Duration::from_millis(100));
    let mut streams = Vec::new();
    for mode in Mode::ALL {
        let mut stream = RawClient::new(addr, mode)
            .start(STREAMING_OUTPUT, &[], &[&request])
            .await;
        let first = tokio::time::timeout(HANG, stream.next_message()).await;
        assert!(
            matches!(first, Ok(Some(_))),
            "{mode}: no first message before the kill"
        );
        streams.push((mode, stream));
    }

    upstream.kill();

    for (mode, stream) in streams {
        let (more, ended) = read_to_end(stream, &mode.to_string()).await;
        let (code, message) = expect_status(mode, ended);
        assert_ne!(code, OK, "{mode}: a stream cut short reported OK");
        assert_eq!(
            code, UNAVAILABLE,
            "{mode}: upstream killed mid-stream: {message:?}"
        );
        assert!(
            more.len() < 39,
            "{mode}: all messages arrived, the upstream was not killed mid-stream"
        );
    }

    // The dead upstream refuses connections: new calls fail fast, they do not hang.
    for mode in Mode::ALL {
        let started = Instant::now();
        let (_, ended) = call_to_end(addr, mode, UNARY, &[], &unary_request(8)).await;
        let (code, message) = expect_status(mode, ended);
        assert_eq!(
            code, UNAVAILABLE,
            "{mode}: call to a dead upstream: {message:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{mode}: UNAVAILABLE took {:?}",
            started.elapsed()
        );
    }

    // An upstream back on the same address: the same proxy serves again. The failures above
    // opened the circuit breaker, so calls fail fast (UNAVAILABLE, "circuit open") until its
    // penalty is over and a probe succeeds; that takes at most the breaker's penalty.
    let _revived = UpstreamProcess::spawn(Some(upstream.addr)).await;
    let recovery = Instant::now();
    loop {
        let (_, ended) = call_to_end(addr, Mode::GrpcH2, UNARY, &[], &unary_request(8)).await;
        let (code, message) = expect_status(Mode::GrpcH2, ended);
        if code == OK {
            break;
        }
        assert_eq!(code, UNAVAILABLE, "while recovering: {message:?}");
        assert!(
            recovery.elapsed() < Duration::from_secs(5),
            "the proxy did not recover within 5 s: {message:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for mode in Mode::ALL {
        let reply = RawClient::new(addr, mode)
            .call(UNARY, &[], &[&unary_request(8)])
            .await;
        reply.assert_ok();
        assert_eq!(reply.messages.len(), 1, "{mode}");
        let response = SimpleResponse::decode(reply.messages[0].clone()).expect("SimpleResponse");
        assert_eq!(
            response.payload.map(|p| p.body.len()),
            Some(8),
            "{mode}: payload after the upstream came back"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_without_trailers_ends_with_internal_in_every_mode() {
    let (_upstream, proxy) = proxy_in_front_of(Fault::NoTrailers).await;
    for mode in Mode::ALL {
        let (messages, ended) =
            call_to_end(proxy.local_addr(), mode, UNARY, &[], &unary_request(8)).await;
        let (code, message) = expect_status(mode, ended);
        assert_eq!(code, INTERNAL, "{mode}: missing grpc-status: {message:?}");
        assert_eq!(
            messages,
            [FAULT_MESSAGE],
            "{mode}: the message sent before the stream ended was not delivered"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_resets_map_to_grpc_codes_in_every_mode() {
    // PROTOCOL-HTTP2.md "Errors": RST_STREAM error codes and the status a client must see.
    let table = [
        (Reason::REFUSED_STREAM, UNAVAILABLE),
        (Reason::CANCEL, CANCELLED),
        (Reason::ENHANCE_YOUR_CALM, RESOURCE_EXHAUSTED),
        (Reason::INTERNAL_ERROR, INTERNAL),
    ];
    for (reason, expected) in table {
        let (_upstream, proxy) = proxy_in_front_of(Fault::ResetAfterMessage(reason)).await;
        for mode in Mode::ALL {
            let (_, ended) =
                call_to_end(proxy.local_addr(), mode, UNARY, &[], &unary_request(8)).await;
            let (code, message) = expect_status(mode, ended);
            assert_eq!(
                code, expected,
                "{mode}: upstream RST_STREAM({reason:?}) gave {code} {message:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_cut_inside_a_message_is_an_error_in_every_mode() {
    let (_upstream, proxy) = proxy_in_front_of(Fault::HalfFrameThenClose).await;
    for mode in Mode::ALL {
        let (messages, ended) =
            call_to_end(proxy.local_addr(), mode, UNARY, &[], &unary_request(8)).await;
        let (code, message) = expect_status(mode, ended);
        assert_ne!(
            code, OK,
            "{mode}: a connection cut inside a message reported OK"
        );
        assert!(
            code == UNAVAILABLE || code == INTERNAL,
            "{mode}: connection cut inside a message gave {code} {message:?}"
        );
        assert!(
            messages.is_empty(),
            "{mode}: half a message was delivered as a message"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_503_html_page_becomes_a_short_unavailable_in_every_mode() {
    const PAGE_MARKER: &str = "Service Temporarily Unavailable";
    let (_upstream, proxy) = proxy_in_front_of(Fault::HttpError {
        status: 503,
        content_type: "text/html; charset=utf-8",
        body: "<!DOCTYPE html><html><head><title>503 Service Temporarily Unavailable</title>\
               </head><body><center><h1>503 Service Temporarily Unavailable</h1></center>\
               <hr><center>nginx</center></body></html>",
    })
    .await;
    for mode in Mode::ALL {
        let (messages, ended) =
            call_to_end(proxy.local_addr(), mode, UNARY, &[], &unary_request(8)).await;
        let (code, message) = expect_status(mode, ended);
        assert_eq!(
            code, UNAVAILABLE,
            "{mode}: HTTP 503 gave {code} {message:?}"
        );
        assert!(
            messages.is_empty(),
            "{mode}: the HTML page was delivered as a message"
        );
        assert!(
            message.len() < 200,
            "{mode}: grpc-message is {} characters long: {message:?}",
            message.len()
        );
        assert!(
            !message.contains('<') && !message.contains(PAGE_MARKER),
            "{mode}: grpc-message carries the HTML page: {message:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_only_reply_passes_through_as_trailers_only() {
    let (_upstream, proxy) = proxy_in_front_of(Fault::TrailersOnly {
        code: 7,
        message: "denied by policy",
        metadata: vec![("x-custom", "kept"), ("x-custom-bin", "AAEC")],
    })
    .await;
    for mode in Mode::ALL {
        // The raw client panics on any body byte (a trailer frame included) after a
        // Trailers-Only response, so getting a reply at all proves there was none.
        let reply = RawClient::new(proxy.local_addr(), mode)
            .call(UNARY, &[], &[&unary_request(8)])
            .await;
        assert_eq!(reply.http_status, 200, "{mode}");
        assert!(
            reply.trailers_only,
            "{mode}: the status did not come in the headers: {:?}",
            reply.headers
        );
        assert!(reply.body.is_empty(), "{mode}: body {:?}", reply.body);
        assert!(reply.messages.is_empty(), "{mode}");
        assert_eq!(reply.grpc_status(), Some(7), "{mode}");
        assert_eq!(reply.grpc_message(), "denied by policy", "{mode}");
        assert_eq!(
            reply.headers.get("x-custom").map(|v| v.as_bytes()),
            Some(&b"kept"[..]),
            "{mode}: custom metadata lost: {:?}",
            reply.headers
        );
        assert_eq!(
            reply.header_bin("x-custom-bin"),
            Some(vec![0, 1, 2]),
            "{mode}: binary metadata lost: {:?}",
            reply.headers
        );
        assert_eq!(
            reply.headers.get_all("content-type").iter().count(),
            1,
            "{mode}: content-type repeated: {:?}",
            reply.headers
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_ends_a_slow_stream_with_deadline_exceeded_and_cancels_upstream() {
    let stack = Stack::start().await;
    // The first message would come after 1 s; the deadline is 200 ms.
    let request = streaming_request(3, Duration::from_secs(1));
    for (n, mode) in (1..).zip(Mode::ALL) {
        let started = Instant::now();
        let (messages, ended) = call_to_end(
            stack.proxy_addr(),
            mode,
            STREAMING_OUTPUT,
            &[("grpc-timeout", "200m")],
            &request,
        )
        .await;
        let elapsed = started.elapsed();
        let (code, message) = expect_status(mode, ended);
        assert_eq!(code, DEADLINE_EXCEEDED, "{mode}: {message:?}");
        assert!(messages.is_empty(), "{mode}: {} messages", messages.len());
        assert!(
            elapsed >= Duration::from_millis(190) && elapsed < Duration::from_millis(900),
            "{mode}: a 200 ms deadline fired after {elapsed:?}"
        );
        assert!(
            stack
                .stats()
                .wait_cancelled(n, Duration::from_secs(2))
                .await,
            "{mode}: the upstream stream was not cancelled when the deadline passed ({:?})",
            stack.stats()
        );
    }
    assert_eq!(
        stack.stats().active_streams(),
        0,
        "streams left running upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_on_a_stalled_upstream_is_deadline_exceeded_and_resets_it() {
    let (upstream, proxy) = proxy_in_front_of(Fault::StallAfterHeaders).await;
    for (n, mode) in (1..).zip(Mode::ALL) {
        let started = Instant::now();
        let (_, ended) = call_to_end(
            proxy.local_addr(),
            mode,
            UNARY,
            &[("grpc-timeout", "300m")],
            &unary_request(8),
        )
        .await;
        let elapsed = started.elapsed();
        let (code, message) = expect_status(mode, ended);
        assert_eq!(code, DEADLINE_EXCEEDED, "{mode}: {message:?}");
        assert!(
            elapsed >= Duration::from_millis(290) && elapsed < Duration::from_secs(2),
            "{mode}: a 300 ms deadline fired after {elapsed:?}"
        );
        assert!(
            upstream.wait_resets(n, Duration::from_secs(2)).await,
            "{mode}: the stalled upstream stream was not reset ({} resets)",
            upstream.resets()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_abort_mid_stream_cancels_upstream_in_every_mode() {
    let stack = Stack::start().await;
    let request = streaming_request(100, Duration::from_millis(50));
    for (n, mode) in (1..).zip(Mode::ALL) {
        let mut stream = RawClient::new(stack.proxy_addr(), mode)
            .start(STREAMING_OUTPUT, &[], &[&request])
            .await;
        let first = tokio::time::timeout(HANG, stream.next_message()).await;
        assert!(matches!(first, Ok(Some(_))), "{mode}: no first message");
        let aborted = Instant::now();
        stream.abort();
        assert!(
            stack
                .stats()
                .wait_cancelled(n, Duration::from_secs(2))
                .await,
            "{mode}: the upstream was not cancelled within 2 s of the client abort ({:?})",
            stack.stats()
        );
        println!(
            "{mode}: upstream cancelled {:?} after the client abort",
            aborted.elapsed()
        );
    }
    // Every upstream stream is gone, not just counted.
    let settled = Instant::now();
    while stack.stats().active_streams() > 0 && settled.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stack.stats().active_streams(), 0, "{:?}", stack.stats());
}
