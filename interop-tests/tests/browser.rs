//! pnp in a real browser: Debian's headless Chromium driven by playwright-core
//! (`interop-tests/js/browser/browser.test.mjs`), and the demo page pnp serves at `/`.
//!
//! The test starts the demo upstream with three proxies in front: HTTP/1.1 + h2c, TLS (ALPN h2)
//! with a certificate made here by rcgen, and one whose upstream is a closed port. The browser
//! calls them from a page on another origin (so CORS preflight runs) with connect-web and
//! Google's grpc-web runtime (text and binary), checks incremental arrival, aborts reaching the
//! upstream, errors pnp makes, and drives the demo page, saving screenshots to
//! `interop-tests/artifacts/`. Chromium trusts the test certificate through
//! `--ignore-certificate-errors-spki-list` with that certificate's key hash only.
//!
//! A second test checks that the committed demo page bundle (`crates/proxy/site/dist`) is
//! what the build script makes of its sources today.
//!
//! Needs `apt-get install chromium` and `npm ci --prefix interop-tests/js`; fails saying so
//! when they are missing.

mod support;

use std::path::Path;
use std::time::Duration;

use pnp_config::TlsFiles;
use pnp_interop_tests::stack::upstream_url;
use pnp_interop_tests::Stack;
use support::{artifacts_dir, node_test, StatsEndpoint, TempDir, INSTALL_HINT};

/// Tests in browser.test.mjs.
const BROWSER_TESTS: u64 = 21;

/// The two tests run one after the other: the bundle build (tsc, esbuild) would otherwise
/// compete with Chromium for the CPU while the browser measures arrival times.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The browser, unless `$CHROMIUM` names another.
fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned())
}

/// Headers the browser tests read cross-origin beyond pnp's defaults (custom_metadata).
fn expose_echo_headers(config: &mut pnp_config::Config) {
    config.cors.expose_headers = vec![
        "x-grpc-test-echo-initial".to_owned(),
        "x-grpc-test-echo-trailing-bin".to_owned(),
    ];
}

#[tokio::test]
async fn chromium_against_pnp() {
    let _serial = ONE_AT_A_TIME.lock().await;
    support::require_node_modules();
    assert!(
        Path::new(&chromium()).is_file(),
        "no browser at {}: {INSTALL_HINT}",
        chromium()
    );

    let stack = Stack::start_with(expose_echo_headers).await;
    let stats = StatsEndpoint::start(stack.stats()).await;

    let certs = TempDir::new("browser-tls");
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap_or_else(|e| panic!("generating a certificate: {e}"));
    let cert = certs.write("cert.pem", certified.cert.pem().as_bytes());
    let key = certs.write("key.pem", certified.key_pair.serialize_pem().as_bytes());
    let tls_files = TlsFiles {
        cert: cert.clone(),
        key,
    };
    let tls_proxy = Stack::proxy_for(upstream_url(stack.upstream.local_addr()), |config| {
        expose_echo_headers(config);
        config.listener.tls = Some(tls_files);
    })
    .await;

    // A port nothing listens on (held closed for the whole test).
    let closed = pnp_interop_tests::faults::ClosedPort::new()
        .unwrap_or_else(|e| panic!("a closed port: {e}"));
    let dead_proxy = Stack::proxy_for(upstream_url(closed.addr()), |_| {}).await;

    let artifacts = artifacts_dir();
    let screenshot = artifacts.join("demo-mid-stream.png");
    let _ = std::fs::remove_file(&screenshot);

    node_test(
        &["browser/browser.test.mjs"],
        &[
            ("PNP_URL", format!("http://{}", stack.proxy_addr())),
            ("PNP_TLS_URL", format!("https://{}", tls_proxy.local_addr())),
            ("PNP_TLS_CERT", cert.to_string_lossy().into_owned()),
            (
                "PNP_DEAD_URL",
                format!("http://{}", dead_proxy.local_addr()),
            ),
            ("PNP_STATS_URL", stats.url()),
            ("PNP_ARTIFACTS", artifacts.to_string_lossy().into_owned()),
            ("CHROMIUM", chromium()),
        ],
        BROWSER_TESTS,
        Duration::from_secs(150),
    )
    .await;

    // The screenshot of the demo page mid-stream is a real PNG of a real size.
    let png = std::fs::read(&screenshot)
        .unwrap_or_else(|e| panic!("reading {}: {e}", screenshot.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 20_000, "screenshot of {} bytes", png.len());
    eprintln!("demo page screenshot: {}", screenshot.display());

    assert_eq!(stack.stats().active_streams(), 0, "streams left running");
    dead_proxy.shutdown().await;
    tls_proxy.shutdown().await;
    stack.shutdown(Duration::from_secs(1)).await;
}

/// `crates/proxy/site/dist` (embedded by pnp) is what `scripts/build-site.mjs` makes of the
/// page's sources, type-checked, today.
#[tokio::test]
async fn committed_demo_page_bundle_is_fresh() {
    let _serial = ONE_AT_A_TIME.lock().await;
    support::require_node_modules();
    let out = TempDir::new("site");
    let out_arg = out.path().to_string_lossy().into_owned();
    let ran = support::run(
        "node",
        &["scripts/build-site.mjs", "--check", "--out", &out_arg],
        &support::js_dir(),
        &[],
        Duration::from_secs(120),
    )
    .await;
    ran.assert_success("build-site.mjs");
    let committed = support::workspace_dir().join("crates/proxy/site/dist");
    let files = support::files_under(&committed);
    assert_eq!(
        files,
        support::files_under(out.path()),
        "files in crates/proxy/site/dist"
    );
    for file in files {
        assert!(
            std::fs::read(committed.join(&file)).ok() == std::fs::read(out.path().join(&file)).ok(),
            "crates/proxy/site/dist/{file} is stale: run `npm run build-site --prefix interop-tests/js`"
        );
    }
}
