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
