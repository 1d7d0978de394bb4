//! pnp with grpcio on either side: the grpcio client (native gRPC over h2c) through pnp to the
//! tonic demo upstream, and a grpcio upstream (`interop-tests/python/interop_server.py`, a child
//! process killed on drop) behind pnp, called by the grpcio client, by the byte-level raw client
//! in all five modes and by two npm clients. So pnp is tested against a gRPC server that is not
//! tonic.
//!
//! The Python stubs are generated at test time by grpcio-tools into a temp dir
//! (`interop-tests/python/stubs.py`); nothing generated is committed. Needs
//! `pip install -r interop-tests/python/requirements.txt`; fails saying so when it has not run.

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use pnp_demo::pb::grpc_testing::{
    Empty, SimpleRequest, SimpleResponse, StreamingOutputCallRequest, StreamingOutputCallResponse,
};
use pnp_interop_tests::interop::*;
use pnp_interop_tests::stack::upstream_url;
use pnp_interop_tests::{Mode, RawClient, Stack};
use pnp_proxy::Proxy;
use support::bridge::{BridgeStack, Hop};
use support::{node_test, python_dir, run, StatsEndpoint, INSTALL_HINT};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Cases the grpcio client runs (interop_client.py).
const GRPCIO_CASES: usize = 16;

/// How long the upstream may take to notice a cancelled call.
const CANCEL_OBSERVED_WITHIN: Duration = Duration::from_secs(3);

/// The Python interpreter: `python3`, or `$PYTHON`.
fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Fails the test unless grpcio and grpcio-tools can be imported.
async fn require_grpcio() {
    let ran = run(
        &python(),
        &["-c", "import grpc, grpc_tools.protoc, google.protobuf"],
        &python_dir(),
        &[("PYTHONDONTWRITEBYTECODE", "1".to_owned())],
        Duration::from_secs(30),
    )
    .await;
    assert!(
        ran.status.success(),
        "grpcio is not installed for {}: {INSTALL_HINT}\n{}",
        python(),
        ran.output
    );
}

/// Runs interop_client.py against the proxy at `proxy` and checks that all its cases passed.
async fn run_grpcio_client(proxy: SocketAddr, stats_url: String, upstream: &str) {
    run_grpcio_client_via(proxy, stats_url, upstream, "h2").await;
}

/// [`run_grpcio_client`] where the replies name `transport` in `x-pnp-transport`.
async fn run_grpcio_client_via(
    proxy: SocketAddr,
    stats_url: String,
    upstream: &str,
    transport: &str,
) {
    let ran = run(
        &python(),
        &["interop_client.py"],
        &python_dir(),
        &[
            ("PNP_TARGET", proxy.to_string()),
            ("PNP_STATS_URL", stats_url),
            ("PNP_UPSTREAM", upstream.to_owned()),
            ("PNP_TRANSPORT", transport.to_owned()),
            ("PYTHONDONTWRITEBYTECODE", "1".to_owned()),
        ],
        Duration::from_secs(120),
    )
    .await;
    ran.assert_success("interop_client.py");
    let ran_line = format!("Ran {GRPCIO_CASES} tests");
    assert!(
        ran.output.contains(&ran_line) && ran.output.contains("\nOK"),
        "expected `{ran_line}` and OK:\n{}",
        ran.output
    );
    eprintln!(
        "grpcio client: {GRPCIO_CASES} passed in {:.1?}",
        ran.elapsed
    );
}

/// interop_server.py as a child process, killed when dropped.
struct GrpcioUpstream {
    _child: Child,
    grpc: SocketAddr,
    stats_url: String,
}

impl GrpcioUpstream {
    async fn start() -> GrpcioUpstream {
        require_grpcio().await;
        let mut child = Command::new(python())
            .arg("interop_server.py")
            .current_dir(python_dir())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting interop_server.py: {e}: {INSTALL_HINT}"));
        let stdout = child
            .stdout
            .take()
            .unwrap_or_else(|| panic!("interop_server.py stdout is piped"));
        let mut first = String::new();
        tokio::time::timeout(
            Duration::from_secs(30),
            BufReader::new(stdout).read_line(&mut first),
        )
        .await
        .unwrap_or_else(|_| panic!("interop_server.py printed no ports within 30 s"))
        .unwrap_or_else(|e| panic!("reading interop_server.py's ports: {e}"));
        let port = |key: &str| -> u16 {
            let start = first
                .find(&format!("\"{key}\": "))
                .unwrap_or_else(|| panic!("no {key} in {first:?}"))
                + key.len()
                + 4;
            first[start..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or_else(|e| panic!("{key} in {first:?}: {e}"))
        };
        GrpcioUpstream {
            grpc: SocketAddr::from(([127, 0, 0, 1], port("grpc_port"))),
            stats_url: format!("http://127.0.0.1:{}/", port("stats_port")),
            _child: child,
        }
    }

    /// The upstream's counters: (started, cancelled, active).
    async fn stats(&self) -> (u64, u64, u64) {
        let addr = self
            .stats_url
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let mut socket = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connecting to the grpcio stats port: {e}"));
        socket
            .write_all(b"GET / HTTP/1.0\r\nhost: stats\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("asking for grpcio stats: {e}"));
        let mut response = String::new();
        socket
            .read_to_string(&mut response)
            .await
            .unwrap_or_else(|e| panic!("reading grpcio stats: {e}"));
        let number = |key: &str| -> u64 {
            let at = response
                .find(&format!("\"{key}\": "))
                .unwrap_or_else(|| panic!("no {key} in {response:?}"))
                + key.len()
                + 4;
            response[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or_else(|e| panic!("{key} in {response:?}: {e}"))
        };
        (number("started"), number("cancelled"), number("active"))
    }

    /// Waits until the upstream has seen `cancelled` cancellations and runs nothing.
    async fn wait_cancelled(&self, cancelled: u64) -> bool {
        let deadline = tokio::time::Instant::now() + CANCEL_OBSERVED_WITHIN;
        loop {
            let (_, seen, active) = self.stats().await;
            if seen >= cancelled && active == 0 {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn proxy_for(upstream: &GrpcioUpstream) -> Proxy {
    Stack::proxy_for(upstream_url(upstream.grpc), |_| {}).await
}

#[tokio::test]
async fn grpcio_client_through_pnp_to_tonic() {
    require_grpcio().await;
    let stack = Stack::start().await;
    let stats = StatsEndpoint::start(stack.stats()).await;
    run_grpcio_client(stack.proxy_addr(), stats.url(), "tonic-demo").await;
    assert_eq!(stack.stats().active_streams(), 0);
    stack.shutdown(Duration::from_secs(1)).await;
}

/// The grpcio client's cases through two pnp instances bridged over h1, h2 and h3.
#[tokio::test]
async fn grpcio_client_through_bridges_over_h1_h2_h3() {
    require_grpcio().await;
    for hop in Hop::ALL {
        let bridge = BridgeStack::start(hop).await;
        let stats = StatsEndpoint::start(bridge.stats()).await;
        run_grpcio_client_via(bridge.addr(), stats.url(), "tonic-demo", hop.name()).await;
        assert_eq!(bridge.stats().active_streams(), 0, "{hop:?}");
        bridge.shutdown().await;
    }
}

#[tokio::test]
async fn grpcio_client_through_pnp_to_grpcio() {
    let upstream = GrpcioUpstream::start().await;
    let proxy = proxy_for(&upstream).await;
    run_grpcio_client(proxy.local_addr(), upstream.stats_url.clone(), "grpcio").await;
    proxy.shutdown().await;
}

/// The npm clients that stream as they read, against the grpcio upstream.
#[tokio::test]
async fn npm_clients_through_pnp_to_grpcio() {
    let upstream = GrpcioUpstream::start().await;
    let proxy = proxy_for(&upstream).await;
    for client in ["grpc-web-text", "connect-web", "connect-node-grpc"] {
        node_test(
            &["test/clients.test.mjs"],
            &[
                ("PNP_URL", format!("http://{}", proxy.local_addr())),
                ("PNP_STATS_URL", upstream.stats_url.clone()),
                ("PNP_CLIENT", client.to_owned()),
            ],
            if client == "connect-node-grpc" {
                16
            } else {
                12
            },
            Duration::from_secs(120),
        )
        .await;
    }
    proxy.shutdown().await;
}

/// The byte-level raw client, in every mode, against the grpcio upstream: each interop case,
/// checked on the wire.
#[tokio::test]
async fn raw_client_all_modes_through_pnp_to_grpcio() {
    let upstream = GrpcioUpstream::start().await;
    let proxy = proxy_for(&upstream).await;
    for mode in [
        Mode::WebBinaryH1,
        Mode::WebBinaryH2,
        Mode::WebTextH1,
        Mode::WebTextH2,
        Mode::GrpcH2,
    ] {
        let client = RawClient::new(proxy.local_addr(), mode);
        raw_cases(&client).await;
        // The deadline case may or may not have reached the upstream (and count as cancelled
        // there): wait for it to end, then count from there.
        assert!(
            upstream.wait_cancelled(0).await,
            "{mode}: calls left running"
        );
        let (_, before, _) = upstream.stats().await;
        cancel_after_first_response(&client).await;
        assert!(
            upstream.wait_cancelled(before + 1).await,
            "{mode}: the grpcio upstream did not see the cancel: {:?}",
            upstream.stats().await
        );
    }
    proxy.shutdown().await;
}

fn assert_via_pnp(headers: &http::HeaderMap, mode: Mode) {
    assert_eq!(
        headers.get("x-pnp-transport").map(|v| v.as_bytes()),
        Some(&b"h2"[..]),
        "{mode}: x-pnp-transport in {headers:?}"
    );
}

async fn raw_cases(client: &RawClient) {
    let mode = client.mode();

    // empty_unary
    let reply = client.call(EMPTY_CALL, &[], &[&encode(&Empty {})]).await;
    reply.assert_ok();
    assert_via_pnp(&reply.headers, mode);
    assert_eq!(reply.messages.len(), 1, "{mode}: empty_unary");
    assert!(reply.messages[0].is_empty(), "{mode}: empty_unary");

    // large_unary
    let reply = client
        .call(UNARY_CALL, &[], &[&encode(&large_unary_request())])
        .await;
    reply.assert_ok();
    assert_eq!(reply.messages.len(), 1, "{mode}: large_unary");
    let response: SimpleResponse = decode(&reply.messages[0]);
    assert_eq!(
        zero_payload_len(response.payload.as_ref()),
        LARGE_RESPONSE_SIZE as usize,
        "{mode}: large_unary"
    );

    // server_streaming
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
        .map(|m| zero_payload_len(decode::<StreamingOutputCallResponse>(m).payload.as_ref()))
        .collect();
    let expected: Vec<usize> = STREAMING_RESPONSE_SIZES
        .iter()
        .map(|&s| s as usize)
        .collect();
    assert_eq!(sizes, expected, "{mode}: server_streaming");

    // custom_metadata (unary; a gRPC-Web client cannot run the full-duplex half)
    let reply = client
        .call(
            UNARY_CALL,
            &[(ECHO_INITIAL, ECHO_INITIAL_VALUE), (ECHO_TRAILING, "q6ur")],
            &[&encode(&large_unary_request())],
        )
        .await;
    reply.assert_ok();
    assert_eq!(
        reply.headers.get(ECHO_INITIAL).map(|v| v.as_bytes()),
        Some(ECHO_INITIAL_VALUE.as_bytes()),
        "{mode}: custom_metadata headers {:?}",
        reply.headers
    );
    assert_eq!(
        reply.trailer_bin(ECHO_TRAILING),
        Some(ECHO_TRAILING_VALUE.to_vec()),
        "{mode}: custom_metadata trailers {:?}",
        reply.trailers
    );

    // status_code_and_message, special_status_message
    for message in [STATUS_MESSAGE, SPECIAL_STATUS_MESSAGE] {
        let request: SimpleRequest = status_request(STATUS_CODE, message);
        let reply = client.call(UNARY_CALL, &[], &[&encode(&request)]).await;
        assert_eq!(
            (reply.grpc_status(), reply.grpc_message()),
            (Some(STATUS_CODE), message.to_owned()),
            "{mode}: trailers {:?}",
            reply.trailers
        );
        assert!(reply.messages.is_empty(), "{mode}: {:?}", reply.messages);
    }

    // unimplemented_method, unimplemented_service
    for path in [UNIMPLEMENTED_CALL, UNIMPLEMENTED_SERVICE_CALL] {
        let reply = client.call(path, &[], &[&encode(&Empty {})]).await;
        assert_eq!(
            reply.grpc_status(),
            Some(code::UNIMPLEMENTED),
            "{mode}: {path}: trailers {:?}",
            reply.trailers
        );
    }

    // timeout_on_sleeping_server
    let reply = client
        .call(
            STREAMING_OUTPUT_CALL,
            &[("grpc-timeout", "1m")],
            &[&encode(&sleeping_request())],
        )
        .await;
    assert_eq!(
        reply.grpc_status(),
        Some(code::DEADLINE_EXCEEDED),
        "{mode}: timeout_on_sleeping_server: trailers {:?}",
        reply.trailers
    );
}

async fn cancel_after_first_response(client: &RawClient) {
    let mode = client.mode();
    let request: StreamingOutputCallRequest = ping_then_sleep_request();
    let mut stream = client
        .start(STREAMING_OUTPUT_CALL, &[], &[&encode(&request)])
        .await;
    let (first, _) = stream
        .next_message()
        .await
        .unwrap_or_else(|| panic!("{mode}: no first response"));
    let first: StreamingOutputCallResponse = decode(&first);
    assert_eq!(
        zero_payload_len(first.payload.as_ref()),
        PING_RESPONSE_SIZE as usize,
        "{mode}: cancel_after_first_response"
    );
    stream.abort();
}
