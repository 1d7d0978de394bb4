//! `pnp control` and `pnp ctl` as an operator runs them: development certificates from
//! `pnp certs dev`, the control plane in its own process, a stand-in data plane on the link
//! (this test's thread; the real one is `pnp data`), and `pnp ctl` with its default paths.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pnp_link::{CallRecord, Command as LinkCommand, DataSide, Event, InFlight, JobMode, JobStats};

struct Running {
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pnp(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pnp"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run pnp")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A data plane stand-in: answers commands, reports one job `chat`.
struct StandIn {
    commands: Arc<Mutex<Vec<LinkCommand>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stand_in(link: &Path) -> StandIn {
    let mut side = DataSide::open(link).expect("data side");
    let commands = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let (commands, stop) = (commands.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut chat = JobStats {
                job: "chat".into(),
                calls: 1200,
                non_ok: 3,
                retries: 1,
                transport: Some("h2".into()),
                ..JobStats::default()
            };
            let mut last_stats = Instant::now();
            while !stop.load(Ordering::Acquire) {
                if let Some(envelope) = side
                    .command_timeout(Duration::from_millis(5))
                    .expect("commands")
                {
                    let seq = envelope.seq;
                    commands
                        .lock()
                        .expect("commands")
                        .push(envelope.command.clone());
                    let (ok, message, detail) = match envelope.command {
                        LinkCommand::Resync => {
                            side.emit(&Event::Hello {
                                pid: 99,
                                config_version: 1,
                                config_toml: None,
                                jobs: vec![chat.clone()],
                            });
                            (true, "resynced".to_owned(), None)
                        }
                        LinkCommand::PauseJob { job, .. } if job == "chat" => {
                            chat.mode = JobMode::Paused;
                            side.emit(&Event::JobMode {
                                job,
                                mode: JobMode::Paused,
                                reason: "operator".into(),
                            });
                            (true, "job chat paused".to_owned(), None)
                        }
                        LinkCommand::ApplyConfig { dry_run: true, .. } => (
                            true,
                            "dry run: 1 change".to_owned(),
                            Some(serde_json::json!({"version": 1, "diff": ["~ profile chat"]})),
                        ),
                        LinkCommand::OverrideTransport { job, .. } if job == "chat" => {
                            (true, "job chat: transports overridden".to_owned(), None)
                        }
                        LinkCommand::Snapshot { job } if job == "chat" => (
                            true,
                            "1 recent call".to_owned(),
                            Some(serde_json::json!({"job": "chat", "recent": [CallRecord {
                                at_unix_ms: 3_723_004,
                                method: "/demo.llm.v1.Generator/Generate".into(),
                                code: 14,
                                message: "upstream reset".into(),
                                transport: "h2".into(),
                                duration_ms: 12.5,
                            }]})),
                        ),
                        LinkCommand::PauseJob { job, .. }
                        | LinkCommand::ResumeJob { job }
                        | LinkCommand::FreezeJob { job, .. }
                        | LinkCommand::OverrideTransport { job, .. }
                        | LinkCommand::Snapshot { job } => (
                            false,
                            format!("unknown job {job:?}"),
                            Some(serde_json::json!({"code": "not_found"})),
                        ),
                        other => (true, format!("{other:?} done"), None),
                    };
                    side.emit(&Event::Ack {
                        seq,
                        ok,
                        message,
                        detail,
                    });
                }
                if last_stats.elapsed() > Duration::from_millis(50) {
                    last_stats = Instant::now();
                    side.emit(&Event::Stats {
                        at_unix_ms: 0,
                        jobs: vec![chat.clone()],
                        dropped_events: 0,
                    });
                }
            }
        })
    };
    StandIn {
        commands,
        stop,
        thread: Some(thread),
    }
}

#[test]
fn pnp_ctl_drives_a_data_plane_through_pnp_control() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = pnp(dir.path(), &["certs", "dev", "dev-certs"]);
    assert!(certs.status.success(), "{}", text(&certs.stderr));
    let link = dir.path().join("link");
    std::fs::create_dir_all(&link).expect("link dir");
    let data = stand_in(&link);

    let mut child = Command::new(env!("CARGO_BIN_EXE_pnp"))
        .args([
            "control",
            "--link-dir",
            "link",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "dev-certs/server.pem",
            "--tls-key",
            "dev-certs/server-key.pem",
            "--client-ca",
            "dev-certs/ca.pem",
            "--allow-client",
            "pnp-dev-client",
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pnp control");
    let stderr = child.stderr.take().expect("stderr");
    let mut control = Running { child };
    let mut lines = BufReader::new(stderr).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|line| {
            line.strip_prefix("pnp control listening on https://")
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_owned)
        })
        .expect("pnp control announces its address");
    std::thread::spawn(move || for _ in lines {});
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--addr", addr.as_str()];
        all.extend_from_slice(args);
        pnp(dir.path(), &all)
    };

    // The job table fills from the stand-in's Hello and Stats.
    let started = Instant::now();
    let jobs = loop {
        let out = ctl(&["jobs"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        if stdout.contains("chat") {
            break stdout;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{stdout}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        jobs.contains("data plane: pid 99, config version 1"),
        "{jobs}"
    );
    let header = jobs.lines().nth(1).expect("header");
    assert!(header.starts_with("JOB "), "{jobs}");
    let row = jobs.lines().nth(2).expect("row");
    assert!(row.starts_with("chat  running  1200"), "{jobs}");

    // `pnp ctl events` streams until interrupted; start it before the pause to see it.
    let mut events = Command::new(env!("CARGO_BIN_EXE_pnp"))
        .args(["ctl", "--addr", addr.as_str(), "events", "--stats"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pnp ctl events");
    let stdout = events.stdout.take().expect("stdout");
    let events = Running { child: events };
    let (seen, lines_seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if seen.send(line).is_err() {
                return;
            }
        }
    });
    // Subscribed once the periodic stats show up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lines_seen
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .expect("pnp ctl events --stats prints stats")
        .contains(" stats ")
    {}

    let out = ctl(&["pause", "chat", "--end-in-flight"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("): job chat paused"),
        "{}",
        text(&out.stdout)
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let job_mode = loop {
        let line = lines_seen
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("pnp ctl events prints the job_mode event");
        if line.contains("job_mode") {
            break line;
        }
    };
    assert!(
        job_mode.contains(
            r#"data    job_mode             {"job":"chat","mode":"paused","reason":"operator"}"#
        ),
        "{job_mode}"
    );
    drop(events);

    std::fs::write(dir.path().join("new.toml"), "[listener]\n").expect("config");
    let out = ctl(&["apply", "new.toml", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("dry run: 1 change\n  ~ profile chat\n"),
        "{}",
        text(&out.stdout)
    );

    let out = ctl(&["transport", "chat", "--forbid", "h1,h3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ctl(&["drain", "--grace", "2s"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ctl(&["snapshot", "chat"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("01:02:03.004  /demo.llm.v1.Generator/Generate  14"),
        "{}",
        text(&out.stdout)
    );

    let out = ctl(&["resume", "nope"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("resume: NotFound: unknown job \"nope\""),
        "{}",
        text(&out.stderr)
    );

    let commands = data.commands.lock().expect("commands").clone();
    assert_eq!(
        &commands[commands.len() - 6..],
        &[
            LinkCommand::PauseJob {
                job: "chat".into(),
                in_flight: InFlight::End
            },
            LinkCommand::ApplyConfig {
                toml: "[listener]\n".into(),
                dry_run: true
            },
            LinkCommand::OverrideTransport {
                job: "chat".into(),
                force: None,
                forbid: vec!["h1".into(), "h3".into()],
                clear: false
            },
            LinkCommand::Drain { grace_ms: 2000 },
            LinkCommand::Snapshot { job: "chat".into() },
            LinkCommand::ResumeJob { job: "nope".into() },
        ]
    );

    // A certificate that is no client certificate does not get in.
    let out = ctl(&[
        "--cert",
        "dev-certs/server.pem",
        "--key",
        "dev-certs/server-key.pem",
        "jobs",
    ]);
    assert!(
        !out.status.success(),
        "a server certificate is no client certificate"
    );

    // SIGTERM stops it.
    let pid = control.child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(status) = control.child.try_wait().expect("wait") {
            assert!(status.success(), "pnp control exited with {status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "pnp control did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Spawns `pnp ARGS` in `dir` and returns it with the first stderr line that starts with
/// `prefix`, minus the prefix, up to the first space.
fn spawn_announcing(dir: &Path, args: &[&str], prefix: &str) -> (Running, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pnp"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pnp");
    let stderr = child.stderr.take().expect("stderr");
    let running = Running { child };
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let announced = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|line| {
            let found = line
                .strip_prefix(prefix)
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_owned);
            seen.push(line);
            found
        })
        .unwrap_or_else(|| panic!("pnp {args:?} did not announce {prefix:?}: {seen:#?}"));
    std::thread::spawn(move || for _ in lines {});
    (running, announced)
}

/// One gRPC-Web call of demo.llm.v1.Generator/Generate over HTTP/1.1; its grpc-status and
/// grpc-message headers (a Trailers-Only answer: pnp's own errors).
fn generate(addr: &str) -> String {
    text(&generate_response(addr))
        .lines()
        .filter(|line| line.starts_with("grpc-status") || line.starts_with("grpc-message"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The whole HTTP response to that call (a streamed answer has its status in the trailer
/// frame at the end of the body).
fn generate_response(addr: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let message = [
        0x0a, 0x02, b'h', b'i', 0x10, 0x02, 0x18, 0x07, 0x2d, 0x0a, 0xd7, 0x23, 0x3c,
    ];
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
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(&request).expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    response
}

/// Whether the call ended OK (its trailer frame says `grpc-status:0`).
fn generate_ok(addr: &str) -> bool {
    let response = generate_response(addr);
    response.windows(13).any(|w| w == b"grpc-status:0")
}

/// The alert → freeze loop with the real data plane (`pnp data`) and control plane (`pnp
/// control`), each its own process: calls to an upstream that refuses connections fail and
/// are retried, the control plane freezes the job (low limits here), writes the snapshot with
/// the data plane's recent calls, and new calls get the freeze's reason.
#[test]
fn pnp_control_freezes_a_failing_job_of_pnp_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = pnp(dir.path(), &["certs", "dev", "dev-certs"]);
    assert!(certs.status.success(), "{}", text(&certs.stderr));
    std::fs::write(
        dir.path().join("pnp.toml"),
        r#"
[profiles.chat]
idempotent = true

[profiles.chat.retry]
max_attempts = 3
initial_backoff = "10ms"
max_backoff = "50ms"
retryable_codes = ["UNAVAILABLE"]

[[routes]]
service = "demo.llm.v1.Generator"
profile = "chat"
"#,
    )
    .expect("config");
    // An upstream address nothing listens on: bound but not listening, and held, so no other
    // test's server can take the port meanwhile.
    let closed_socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    closed_socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let closed = closed_socket
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("an IP address");
    let upstream = format!("http://{closed}");
    std::fs::create_dir_all(dir.path().join("link")).expect("link dir");
    let (_data, data_addr) = spawn_announcing(
        dir.path(),
        &[
            "data",
            "--config",
            "pnp.toml",
            "--link-dir",
            "link",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
        ],
        "pnp listening on http://",
    );
    let (_control, control_addr) = spawn_announcing(
        dir.path(),
        &[
            "control",
            "--link-dir",
            "link",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "dev-certs/server.pem",
            "--tls-key",
            "dev-certs/server-key.pem",
            "--client-ca",
            "dev-certs/ca.pem",
            "--freeze-errors",
            "2",
            "--freeze-retries",
            "1",
            "--snapshot-dir",
            "snapshots",
        ],
        "pnp control listening on https://",
    );

    let snapshots = dir.path().join("snapshots");
    let snapshot_files = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&snapshots)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while snapshot_files().is_empty() {
        assert!(Instant::now() < deadline, "the job was never frozen");
        let status = generate(&data_addr);
        assert!(
            status.contains("grpc-status: 14") || status.contains("grpc-status: 9"),
            "{status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let files = snapshot_files();
    assert_eq!(files.len(), 1, "{files:?}");
    let snapshot: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files[0]).expect("snapshot")).expect("json");
    assert_eq!(snapshot["job"], "chat");
    assert_eq!(snapshot["by_rule"], true);
    assert_eq!(snapshot["rule"]["max_errors"], 2);
    assert!(
        snapshot["recent"]
            .as_array()
            .is_some_and(|calls| !calls.is_empty() && calls.iter().all(|c| c["code"] == 14)),
        "{snapshot}"
    );

    // New calls get the freeze (FAILED_PRECONDITION, with the rule's reason) at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = generate(&data_addr);
        if status.contains("grpc-status: 9") {
            assert!(
                status.contains("job chat is frozen: frozen by pnp"),
                "{status}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = pnp(
        dir.path(),
        &["ctl", "--addr", control_addr.as_str(), "jobs"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let jobs = text(&out.stdout);
    assert!(
        jobs.lines()
            .any(|l| l.starts_with("chat ") && l.contains(" frozen ")),
        "{jobs}"
    );
    // Frozen once: the calls refused since do not trip it again.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(snapshot_files().len(), 1);

    // Resumed, the job takes calls again (and fails them: the upstream is still down).
    let out = pnp(
        dir.path(),
        &["ctl", "--addr", control_addr.as_str(), "resume", "chat"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(generate(&data_addr).contains("grpc-status: 14"));
}

/// The whole of issue #14 as an operator meets it: `pnp serve --control-certs` runs the data
/// plane and the control plane as two processes; `pnp ctl apply` reconfigures it live over
/// mTLS (the time from the command to the next call following the new config is printed);
/// killing the control plane leaves traffic untouched, and the restarted one re-attaches.
#[test]
fn pnp_serve_runs_both_planes_and_pnp_ctl_reconfigures_it_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = pnp(dir.path(), &["certs", "dev", "dev-certs"]);
    assert!(certs.status.success(), "{}", text(&certs.stderr));
    std::fs::write(
        dir.path().join("pnp.toml"),
        "[limits]\nmax_message_size = \"4MiB\"\n",
    )
    .expect("config");
    std::fs::write(
        dir.path().join("tight.toml"),
        "[limits]\nmax_message_size = \"8B\"\n",
    )
    .expect("config");
    let control_port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
        .to_string();
    let control_addr = format!("127.0.0.1:{control_port}");
    let (_serve, data_addr) = spawn_announcing(
        dir.path(),
        &[
            "serve",
            "--config",
            "pnp.toml",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--link-dir",
            "serve-link",
            "--control-certs",
            "dev-certs",
            "--control-listen",
            &control_addr,
        ],
        "pnp listening on http://",
    );
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--addr", control_addr.as_str()];
        all.extend_from_slice(args);
        pnp(dir.path(), &all)
    };
    // The control plane comes up as a second process and attaches.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let jobs = ctl(&["jobs"]);
        if jobs.status.success() && text(&jobs.stdout).contains("default") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pnp ctl jobs never worked: {} {}",
            text(&jobs.stdout),
            text(&jobs.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(generate_ok(&data_addr));

    let asked = Instant::now();
    let applied = ctl(&["apply", "tight.toml"]);
    let acknowledged = asked.elapsed();
    assert!(applied.status.success(), "{}", text(&applied.stderr));
    assert!(
        text(&applied.stdout).contains("limits.max_message_size"),
        "{}",
        text(&applied.stdout)
    );
    let status = generate(&data_addr);
    let followed = asked.elapsed();
    assert!(status.contains("grpc-status: 8"), "{status}");
    println!(
        "pnp ctl apply: acknowledged {acknowledged:?} after the command started (a process, \
         an mTLS handshake, the ring both ways); the next call followed it ({followed:?})"
    );

    // The control plane dies: calls go on; the restarted one re-attaches and steers.
    let killed = Command::new("pkill")
        // (The link dir's name is this test's own: other tests run `pnp control` too.)
        .args(["-KILL", "-f", "control --link-dir serve-link"])
        .status()
        .expect("pkill");
    assert!(killed.success(), "no control plane process to kill");
    for _ in 0..10 {
        assert!(generate(&data_addr).contains("grpc-status: 8"));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let applied = ctl(&["apply", "pnp.toml"]);
        if applied.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted control plane never took commands: {}",
            text(&applied.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(generate_ok(&data_addr));
}

/// The `pnp control` with `--link-dir LINK` that runs now: its pid and command line.
fn control_process(link: &str) -> Option<(u32, String)> {
    let out = Command::new("pgrep")
        .args(["-af", &format!("control --link-dir {link}")])
        .output()
        .expect("pgrep");
    let listed = text(&out.stdout);
    let line = listed.lines().next()?;
    let (pid, command) = line.split_once(' ')?;
    Some((pid.parse().ok()?, command.to_owned()))
}

/// `pnp serve` with its control plane (`--link-dir LINK`, this test's own name: other tests
/// run `pnp control` too), and `extra` arguments, in `dir`; returns once the control plane's
/// process runs: the serve, the control API's address and the control plane's pid and
/// command line.
fn serve_with_control_plane(
    dir: &Path,
    link: &str,
    extra: &[&str],
) -> (Running, String, (u32, String)) {
    let certs = pnp(dir, &["certs", "dev", "dev-certs"]);
    assert!(certs.status.success(), "{}", text(&certs.stderr));
    let control_addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("addr").to_string()
    };
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--link-dir",
        link,
        "--control-certs",
        "dev-certs",
        "--control-listen",
        &control_addr,
    ];
    args.extend_from_slice(extra);
    let (serve, _data_addr) = spawn_announcing(dir, &args, "pnp listening on http://");
    let deadline = Instant::now() + Duration::from_secs(20);
    let control = loop {
        if let Some(control) = control_process(link) {
            break control;
        }
        assert!(Instant::now() < deadline, "the control plane never started");
        std::thread::sleep(Duration::from_millis(50));
    };
    (serve, control_addr, control)
}

/// A `pnp serve` killed outright (SIGKILL: no drop, no shutdown) takes its control plane with
/// it: the child sees that its parent changed and stops, freeing the API's port for the
/// restarted serve, instead of living on as an orphan.
#[test]
fn the_control_plane_stops_when_its_serve_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = "orphan-test-link";
    let (mut serve, control_addr, (_, command)) = serve_with_control_plane(
        dir.path(),
        link,
        &["--control-cors-origin", "https://console.example.com"],
    );
    // The child got the serve's control options.
    assert!(
        command.contains("--cors-origin https://console.example.com"),
        "{command}"
    );
    serve.child.kill().expect("SIGKILL pnp serve");
    let _ = serve.child.wait();
    let killed = Instant::now();
    while control_process(link).is_some() {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "the control plane outlived its pnp serve by 5 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "control plane gone {:?} after its pnp serve was killed",
        killed.elapsed()
    );
    // Its port is free for the next serve.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpListener::bind(&control_addr).is_err() {
        assert!(Instant::now() < deadline, "{control_addr} still taken");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// An idle `pnp serve` with its control plane sleeps: neither process polls its end of the
/// rings in a busy loop (they used 3 % and 7 % of a core, each waiting on a ring with
/// millisecond sleeps). A loose bound, a quarter of that: this catches a polling loop, it
/// does not measure.
#[test]
#[cfg(target_os = "linux")]
fn an_idle_serve_and_its_control_plane_sleep() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (serve, _control_addr, (control_pid, _)) =
        serve_with_control_plane(dir.path(), "idle-test-link", &[]);
    // Let both planes attach and settle.
    std::thread::sleep(Duration::from_millis(1500));
    let pids = [serve.child.id(), control_pid];
    let before: Vec<f64> = pids.iter().map(|&pid| cpu_seconds(pid)).collect();
    let watched = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let wall = watched.elapsed().as_secs_f64();
    for (i, pid) in pids.iter().enumerate() {
        let share = (cpu_seconds(*pid) - before[i]) / wall;
        println!("idle: process {pid} used {:.2} % of a core", share * 100.0);
        assert!(
            share < 0.02,
            "process {pid} used {:.1} % of a core while idle",
            share * 100.0
        );
    }
}
