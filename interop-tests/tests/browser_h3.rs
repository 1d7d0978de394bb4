//! Headless Chromium (Debian's) calls pnp over HTTP/3: a page on a loopback origin makes
//! gRPC-Web calls (CORS preflight included) to pnp's HTTP/3 listener, with QUIC forced on for
//! that origin (`--origin-to-force-quic-on`) and only the test certificate's key trusted
//! (`--ignore-certificate-errors-spki-list`). The page reports what it got; Chromium's network
//! log shows that the request went out as HTTP/3 frames on a QUIC session.
//!
//! Notes from making it work: `localhost` resolves to `::1` first in Chromium, so the origin is
//! `127.0.0.1` (the listener's address); a `data:` page may not call a loopback address
//! (ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS), so the page comes from a loopback server; the
//! page cannot read `nextHopProtocol` of a cross-origin call (no Timing-Allow-Origin), so the
//! protocol is read from the net log. Needs `apt-get install chromium`.

mod support;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use pnp_demo::DemoUpstream;
use pnp_interop_tests::stack::upstream_url;
use support::h3::{cluster, dev_certs, loopback};
use support::{TempDir, INSTALL_HINT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned())
}

/// The test page: a gRPC-Web UnaryCall (asking for a 10-byte payload) and a
/// StreamingOutputCall to `origin`, the raw reply bytes written into the page.
fn page(origin: &str) -> String {
    format!(
        r#"<!doctype html><meta charset="utf-8"><body>waiting<script>
async function call(path, message) {{
  const body = new Uint8Array(5 + message.length);
  body[4] = message.length;
  body.set(message, 5);
  const response = await fetch("{origin}" + path, {{
    method: "POST",
    headers: {{ "content-type": "application/grpc-web+proto", "x-grpc-web": "1" }},
    body,
  }});
  return {{
    status: response.status,
    transport: response.headers.get("x-pnp-transport"),
    bytes: Array.from(new Uint8Array(await response.arrayBuffer())),
  }};
}}
(async () => {{
  // SimpleRequest {{ response_size: 10 }}
  const unary = await call("/grpc.testing.TestService/UnaryCall", new Uint8Array([0x10, 0x0a]));
  // StreamingOutputCallRequest {{ response_parameters: [{{ size: 3 }}, {{ size: 5 }}] }}
  const streaming = await call("/grpc.testing.TestService/StreamingOutputCall",
    new Uint8Array([0x12, 0x02, 0x08, 0x03, 0x12, 0x02, 0x08, 0x05]));
  document.body.textContent = "RESULT " + JSON.stringify({{ unary, streaming }});
}})().catch((e) => {{ document.body.textContent = "ERROR " + e; }});
</script>"#
    )
}

/// Serves `html` at `/` on a loopback port (one request per connection).
async fn serve_page(html: String) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind(loopback()).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let (status, body) = if head.starts_with(b"GET / ") {
                    ("200 OK", html.as_str())
                } else {
                    ("404 Not Found", "")
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}/"), task)
}

/// The gRPC-Web frames of a reply body: the messages and the trailer block.
fn frames(bytes: &[u8]) -> (Vec<Vec<u8>>, String) {
    let mut messages = Vec::new();
    let mut trailers = String::new();
    let mut rest = bytes;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        assert!(rest.len() >= 5 + len, "a truncated frame in {bytes:?}");
        let payload = rest[5..5 + len].to_vec();
        if rest[0] & 0x80 != 0 {
            trailers = String::from_utf8_lossy(&payload).into_owned();
        } else {
            messages.push(payload);
        }
        rest = &rest[5 + len..];
    }
    assert!(rest.is_empty(), "stray bytes after the frames: {rest:?}");
    (messages, trailers)
}

/// The `:path`s of the requests Chromium sent as HTTP/3 HEADERS frames, with their method.
fn http3_requests(net_log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(net_log)
        .unwrap_or_else(|e| panic!("reading {}: {e}", net_log.display()));
    let log: serde_json::Value = serde_json::from_str(&text).expect("the net log is JSON");
    let headers_sent = log["constants"]["logEventTypes"]["HTTP3_HEADERS_SENT"].clone();
    let mut requests = Vec::new();
    for event in log["events"].as_array().into_iter().flatten() {
        if event["type"] != headers_sent {
            continue;
        }
        let lines: Vec<&str> = event["params"]["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h.as_str())
            .collect();
        let field = |name: &str| {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or("")
                .to_owned()
        };
        requests.push(format!("{} {}", field(":method: "), field(":path: ")));
    }
    requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_calls_pnp_with_grpc_web_over_http3() {
    assert!(
        Path::new(&chromium()).is_file(),
        "no browser at {}: {INSTALL_HINT}",
        chromium()
    );
    let upstream = DemoUpstream::start(loopback())
        .await
        .expect("demo upstream");
    let certs = dev_certs();
    let cluster = cluster(upstream_url(upstream.local_addr()), &certs, |_| {}).await;
    let h3 = cluster.local_h3_addr().expect("h3");
    let origin = format!("https://{h3}");
    let (page_url, page_server) = serve_page(page(&origin)).await;

    let spki = ring::digest::digest(&ring::digest::SHA256, &certs.server_spki);
    let spki = base64::engine::general_purpose::STANDARD.encode(spki.as_ref());
    let scratch = TempDir::new("chromium-h3");
    let net_log = scratch.path().join("netlog.json");
    let profile = scratch.path().join("profile");
    let args = [
        "--headless".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-background-networking".to_owned(),
        "--disable-component-update".to_owned(),
        "--no-first-run".to_owned(),
        format!("--user-data-dir={}", profile.display()),
        format!("--origin-to-force-quic-on={h3}"),
        format!("--ignore-certificate-errors-spki-list={spki}"),
        format!("--log-net-log={}", net_log.display()),
        // Let the page's calls finish before the DOM is dumped (virtual time waits for the
        // network).
        "--virtual-time-budget=20000".to_owned(),
        "--dump-dom".to_owned(),
        page_url,
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ran = support::run(
        &chromium(),
        &args,
        scratch.path(),
        &[],
        Duration::from_secs(90),
    )
    .await;
    ran.assert_success("chromium --dump-dom");
    page_server.abort();

    let result = ran
        .output
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("the page reported no result:\n{}", ran.output));
    let result = result.trim_end_matches("</body></html>");
    let result: serde_json::Value =
        serde_json::from_str(result).unwrap_or_else(|e| panic!("page result {result:?}: {e}"));
    let bytes = |call: &str| -> Vec<u8> {
        result[call]["bytes"]
            .as_array()
            .expect("bytes")
            .iter()
            .map(|b| b.as_u64().expect("a byte") as u8)
            .collect()
    };
    for call in ["unary", "streaming"] {
        assert_eq!(result[call]["status"], 200, "{call}: {result}");
        // pnp's own hop to the demo upstream, as every reply says.
        assert_eq!(result[call]["transport"], "h2", "{call}: {result}");
    }
    let (messages, trailers) = frames(&bytes("unary"));
    // SimpleResponse { payload: { body: 10 zero bytes } }
    assert_eq!(
        messages,
        [[&[0x0a, 0x0c, 0x12, 0x0a][..], &[0; 10]].concat()]
    );
    assert!(trailers.contains("grpc-status:0"), "trailers {trailers:?}");
    let (messages, trailers) = frames(&bytes("streaming"));
    assert_eq!(
        messages,
        [
            [&[0x0a, 0x05, 0x12, 0x03][..], &[0; 3]].concat(),
            [&[0x0a, 0x07, 0x12, 0x05][..], &[0; 5]].concat()
        ]
    );
    assert!(trailers.contains("grpc-status:0"), "trailers {trailers:?}");

    // Both calls and their preflights went out as HTTP/3.
    let requests = http3_requests(&net_log);
    for path in [
        "/grpc.testing.TestService/UnaryCall",
        "/grpc.testing.TestService/StreamingOutputCall",
    ] {
        for method in ["OPTIONS", "POST"] {
            let request = format!("{method} {path}");
            assert!(
                requests.contains(&request),
                "no HTTP/3 `{request}` in the net log; HTTP/3 requests: {requests:?}"
            );
        }
    }
    assert_eq!(upstream.stats().calls_started(), 2);
    cluster
        .shutdown_with_grace(Duration::from_millis(100))
        .await;
    upstream.shutdown().await;
}
