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

/// The Generate call of the demo test, as an HTTP/1.1 gRPC-Web request whose message is
/// `padding` bytes longer (an unknown field the upstream skips).
fn generate_request(padding: usize) -> Vec<u8> {
    let mut message = vec![
        0x0a, 0x02, b'h', b'i', 0x10, 0x02, 0x18, 0x07, 0x2d, 0x0a, 0xd7, 0x23, 0x3c,
    ];
    if padding > 0 {
        // Field 15, length-delimited: skipped by the upstream.
        message.push(0x7a);
        let mut len = padding;
        while len >= 0x80 {
            message.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        message.push(len as u8);
        message.extend(std::iter::repeat_n(0u8, padding));
    }
    let mut body = vec![0];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let mut request = format!(
        "POST /demo.llm.v1.Generator/Generate HTTP/1.1\r\nhost: pnp\r\nconnection: close\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    request
}

/// SIGHUP re-reads the config file: a new message limit governs the next calls; a file that
/// does not validate is refused and the limit in force stays.
#[cfg(unix)]
#[test]
fn sighup_reloads_the_config_file_and_a_bad_one_is_refused() {
    let dir = std::env::temp_dir().join(format!("pnp-cli-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("pnp.toml");
    let path_text = path.to_str().expect("utf-8 path").to_owned();
    std::fs::write(&path, "[limits]\nmax_message_size = \"64KiB\"\n").expect("write config");
    let (pnp, data, _) = serve(&[
        "--config",
        &path_text,
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    let status = |padding| {
        let response = http(data, &generate_request(padding));
        let text = String::from_utf8_lossy(&response).into_owned();
        if contains(&response, b"grpc-status:0") || contains(&response, b"grpc-status: 0") {
            0
        } else if contains(&response, b"grpc-status: 8") || contains(&response, b"grpc-status:8") {
            8
        } else {
            panic!("unexpected reply: {text}")
        }
    };
    assert_eq!(status(10_000), 0, "10 kB is under 64 KiB");
    let hup = |pnp: &Running| {
        let pid = pnp.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill")
            .success());
    };
    std::fs::write(&path, "[limits]\nmax_message_size = \"4KiB\"\n").expect("rewrite config");
    hup(&pnp);
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(10_000) != 8 {
        assert!(Instant::now() < deadline, "the new limit never applied");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&path, "[limits]\nmax_message_size = \"lots\"\n").expect("rewrite config");
    hup(&pnp);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status(10_000), 8, "a bad file changes nothing");
    assert_eq!(status(100), 0);
    drop(pnp);
    let _ = std::fs::remove_dir_all(&dir);
}
