//! The gRPC interop cases through pnp with real npm clients, one test per client and mode:
//! Google's `grpc-web` runtime (text and binary), `@connectrpc/connect-web` (fetch),
//! `@connectrpc/connect-node` (gRPC-Web over HTTP/1.1 and HTTP/2, native gRPC over HTTP/2)
//! and `@improbable-eng/grpc-web`.
//!
//! Each test starts the demo upstream and pnp in-process, then runs
//! `interop-tests/js/test/clients.test.mjs` under `node --test` with the proxy's URL and the
//! address of an endpoint showing the upstream's counters (so the cancel cases can check that
//! the upstream saw the cancellation). The cases are in `interop-tests/js/lib/cases.mjs`.
//! Needs `npm ci --prefix interop-tests/js`; fails saying so when it has not run.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use pnp_demo::DemoStats;
use pnp_interop_tests::Stack;
use support::bridge::{BridgeStack, Hop};
use support::{node_test, StatsEndpoint};

/// Cases every gRPC-Web client runs (client streaming is impossible over gRPC-Web).
const WEB_CASES: [&str; 12] = [
    "empty_unary",
    "large_unary",
    "server_streaming",
    "custom_metadata_unary",
    "custom_metadata_server_streaming",
    "status_code_and_message_unary",
    "status_code_and_message_server_streaming",
    "special_status_message",
    "unimplemented_method",
    "unimplemented_service",
    "timeout_on_sleeping_server",
    "cancel_after_first_response",
];

/// Cases only a client that streams requests runs.
const STREAMING_REQUEST_CASES: [&str; 4] = [
    "client_streaming",
    "ping_pong",
    "custom_metadata_full_duplex",
    "status_code_and_message_full_duplex",
];

/// Longest one client's suite may take.
const SUITE_LIMIT: Duration = Duration::from_secs(120);

/// What a client can do beyond the gRPC-Web cases.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A gRPC-Web client that sees each message as it arrives.
    Web,
    /// A gRPC-Web client that sees a stream only once it has ended (grpc-web binary mode):
    /// `cancel_after_begin` stands in for `cancel_after_first_response`.
    WebWholeStreams,
    /// Native gRPC, which can also stream requests.
    Native,
}

/// Runs the cases with `client` (a key of `clients` in clients.test.mjs) against a fresh stack
/// and checks that exactly the expected cases passed.
async fn run_client(client: &str, kind: Kind) {
    let stack = Stack::start().await;
    run_cases(client, kind, stack.proxy_addr(), stack.stats(), "h2").await;
    stack.shutdown(Duration::from_secs(1)).await;
}

/// Runs the cases with `client` against pnp at `proxy`, in front of an upstream whose counters
/// are `stats`; replies must name `transport` in `x-pnp-transport`.
async fn run_cases(
    client: &str,
    kind: Kind,
    proxy: SocketAddr,
    upstream: DemoStats,
    transport: &str,
) {
    let stats = StatsEndpoint::start(upstream.clone()).await;
    let mut cases: Vec<&str> = WEB_CASES.to_vec();
    if kind == Kind::WebWholeStreams {
        cases.retain(|&case| case != "cancel_after_first_response");
        cases.push("cancel_after_begin");
    }
    if kind == Kind::Native {
        cases.extend(STREAMING_REQUEST_CASES);
    }
    let expected: Vec<String> = cases.iter().map(|c| format!("{client} {c}")).collect();
    let passed = node_test(
        &["test/clients.test.mjs"],
        &[
            ("PNP_URL", format!("http://{proxy}")),
            ("PNP_STATS_URL", stats.url()),
            ("PNP_CLIENT", client.to_owned()),
            ("PNP_TRANSPORT", transport.to_owned()),
        ],
        expected.len() as u64,
        SUITE_LIMIT,
    )
    .await;
    assert_eq!(passed, expected);
    assert_eq!(
        upstream.active_streams(),
        0,
        "streams left running upstream"
    );
}

/// The clients that see each message as it arrives — grpc-web (text), connect-web, and
/// connect-node speaking native gRPC (which also streams requests) — through two pnp instances
/// bridged over `hop`.
async fn run_bridged(hop: Hop) {
    let bridge = BridgeStack::start(hop).await;
    for (client, kind) in [
        ("grpc-web-text", Kind::Web),
        ("connect-web", Kind::Web),
        ("connect-node-grpc", Kind::Native),
    ] {
        run_cases(client, kind, bridge.addr(), bridge.stats(), hop.name()).await;
    }
    bridge.shutdown().await;
}

#[tokio::test]
async fn npm_clients_through_a_bridge_over_h1() {
    run_bridged(Hop::H1).await;
}

#[tokio::test]
async fn npm_clients_through_a_bridge_over_h2() {
    run_bridged(Hop::H2).await;
}

#[tokio::test]
async fn npm_clients_through_a_bridge_over_h3() {
    run_bridged(Hop::H3).await;
}

#[tokio::test]
async fn grpc_web_text() {
    run_client("grpc-web-text", Kind::Web).await;
}

#[tokio::test]
async fn grpc_web_binary() {
    run_client("grpc-web-binary", Kind::WebWholeStreams).await;
}

#[tokio::test]
async fn connect_web_fetch() {
    run_client("connect-web", Kind::Web).await;
}

#[tokio::test]
async fn connect_node_grpc_web_h1() {
    run_client("connect-node-web-h1", Kind::Web).await;
}

#[tokio::test]
async fn connect_node_grpc_web_h2() {
    run_client("connect-node-web-h2", Kind::Web).await;
}

#[tokio::test]
async fn connect_node_grpc_h2() {
    run_client("connect-node-grpc", Kind::Native).await;
}

#[tokio::test]
async fn improbable_grpc_web() {
    run_client("improbable", Kind::Web).await;
}

/// `interop-tests/js/gen/` is what `buf generate` makes of `proto/` today.
#[tokio::test]
async fn generated_message_code_is_fresh() {
    support::require_node_modules();
    let out = support::TempDir::new("buf-gen");
    let out_arg = out.path().to_string_lossy().into_owned();
    let ran = support::run(
        "node",
        &[
            "node_modules/@bufbuild/buf/bin/buf",
            "generate",
            "../../proto",
            "--output",
            &out_arg,
        ],
        &support::js_dir(),
        &[support::path_with_npm_bin()],
        Duration::from_secs(60),
    )
    .await;
    ran.assert_success("buf generate");
    let committed = support::js_dir().join("gen");
    let fresh = out.path().join("gen");
    let committed_files = support::files_under(&committed);
    assert_eq!(
        committed_files,
        support::files_under(&fresh),
        "files in interop-tests/js/gen differ from a fresh `npm run generate`"
    );
    for file in committed_files {
        assert!(
            std::fs::read(committed.join(&file)).ok() == std::fs::read(fresh.join(&file)).ok(),
            "interop-tests/js/gen/{file} is stale: run `npm run generate --prefix interop-tests/js`"
        );
    }
}
