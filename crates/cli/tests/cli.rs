//! The `pnp` binary as a user runs it: the README's demo command, bad configuration, SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Running {
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `pnp serve ARGS` and read the addresses it announces on stderr.
fn serve(args: &[&str]) -> (Running, SocketAddr, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pnp"))
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pnp");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let running = Running { child };
    for line in lines.by_ref() {
        let line = line.expect("stderr line");
        // "pnp listening on http://ADDR (admin http://ADDR)", https:// with TLS
        let announced = line
            .strip_prefix("pnp listening on http://")
            .or_else(|| line.strip_prefix("pnp listening on https://"));
        if let Some(rest) = announced {
            let (data, admin) = rest.split_once(" (admin http://").expect("admin address");
            let data = data.parse().expect("data address");
            let admin = admin.trim_end_matches(')').parse().expect("admin address");
            std::thread::spawn(move || for _ in lines {});
            return (running, data, admin);
        }
    }
    panic!("pnp exited without announcing its addresses");
}

fn http(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(request).expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    response
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn serve_with_no_upstream_streams_tokens_from_the_demo_model() {
    let (_pnp, data, admin) = serve(&["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    let health = http(
        admin,
        b"GET /healthz HTTP/1.1\r\nhost: pnp\r\nconnection: close\r\n\r\n",
    );
    assert!(
        health.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&health)
    );

    // GenerateRequest{prompt: "hi", max_tokens: 8, seed: 7, time_scale: 0.01} as gRPC-Web.
    let message = [
        0x0a, 0x02, b'h', b'i', 0x10, 0x08, 0x18, 0x07, 0x2d, 0x0a, 0xd7, 0x23, 0x3c,
    ];
    let mut body = vec![0, 0, 0, 0, message.len() as u8];
    body.extend_from_slice(&message);
    let mut request = format!(
        "POST /demo.llm.v1.Generator/Generate HTTP/1.1\r\nhost: pnp\r\nconnection: close\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let response = http(data, &request);
    let text = String::from_utf8_lossy(&response);
    assert!(response.starts_with(b"HTTP/1.1 200"), "{text}");
    assert!(text.contains("x-pnp-transport: h2"), "{text}");
    assert!(contains(&response, b"grpc-status:0"), "{text}");
    assert!(
        contains(&response, b"length"),
        "no final token with finish_reason: {text}"
    );
}

#[test]
fn a_config_with_an_unknown_key_is_refused_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("pnp-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("pnp.toml");
    std::fs::write(
        &path,
        "[listener]\naddr = \"127.0.0.1:0\"\n[upstream]\nurll = \"http://x:1\"\n",
    )
    .expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_pnp"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("run pnp");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("urll"), "{stderr}");
}

#[cfg(unix)]
#[test]
fn sigterm_stops_it_gracefully() {
    let (mut pnp, _, admin) = serve(&[
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--grace-period",
        "1s",
    ]);
    let ready = http(
        admin,
        b"GET /readyz HTTP/1.1\r\nhost: pnp\r\nconnection: close\r\n\r\n",
    );
    assert!(ready.starts_with(b"HTTP/1.1 200"));
    let pid = pnp.child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(status) = pnp.child.try_wait().expect("wait") {
            assert!(status.success(), "pnp exited with {status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "pnp did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// With `--tls-cert/--tls-key` (here from `pnp certs dev`) the announced address is `https://`.
#[test]
fn a_tls_listener_is_announced_as_https() {
    let dir = std::env::temp_dir().join(format!("pnp-cli-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let made = Command::new(env!("CARGO_BIN_EXE_pnp"))
        .args(["certs", "dev"])
        .arg(&dir)
        .output()
        .expect("run pnp certs dev");
    assert!(made.status.success(), "{made:?}");
    let cert = dir.join("server.pem");
    let key = dir.join("server-key.pem");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pnp"))
        .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pnp");
    let stderr = child.stderr.take().expect("stderr");
    let _running = Running { child };
    let announced = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find(|line| line.starts_with("pnp listening on"));
    let _ = std::fs::remove_dir_all(&dir);
    let announced = announced.expect("pnp announced its address");
    assert!(
        announced.starts_with("pnp listening on https://127.0.0.1:"),
        "{announced}"
    );
}
