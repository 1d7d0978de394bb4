//! The data plane steered through its control link (issue #14): a real pnp in front of the demo
//! upstream, with its end of the two shared-memory rings in a temp dir, and the control plane's
//! end (`pnp_link::ControlSide`) driven by the test as `pnp control` drives it:
//!
//! - a config applied through the link governs new calls at once (the time from the command to
//!   its acknowledgement is reported) while a call in flight keeps the policy it started with;
//! - a config that does not validate is refused with the reason, and the one in force stays;
//! - a paused job's new calls get UNAVAILABLE naming the job, its calls in flight finish (or end,
//!   as asked), and resume lets calls through again; a frozen job's calls get
//!   FAILED_PRECONDITION and the freeze reports the job's recent calls;
//! - the control plane going away leaves traffic untouched, and a new one re-attaches and hears
//!   the data plane's whole state;
//! - the data plane reports every job's counters once a second;
//! - commands are answered promptly while the data plane is busy with token streams and bulk
//!   transfers (the link runs on a thread of its own, the commands on their own task).

use std::time::{Duration, Instant};

use pnp_interop_tests::interop::{encode, response, streaming_request};
use pnp_interop_tests::stack::upstream_url;
use pnp_interop_tests::{Mode, RawClient, Stack};
use pnp_link::{Command, ControlSide, Event, InFlight, JobMode};

const STREAM: &str = "/grpc.testing.TestService/StreamingOutputCall";

/// A data plane with a control link in `dir`, in front of the demo upstream.
async fn linked(dir: &std::path::Path) -> (pnp_demo::DemoUpstream, pnp_proxy::Proxy) {
    let upstream = pnp_demo::DemoUpstream::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("demo upstream");
    let link = dir.to_owned();
    let proxy = Stack::proxy_for(upstream_url(upstream.local_addr()), move |config| {
        config.control.link_dir = Some(link);
    })
    .await;
    (upstream, proxy)
}

/// Send `command` and wait for its acknowledgement (other events are skipped).
fn command(
    control: &mut ControlSide,
    command: Command,
) -> (bool, String, Option<serde_json::Value>) {
    let seq = control.send(command).expect("send");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(Event::Ack {
            seq: acked,
            ok,
            message,
            detail,
        }) = control
            .event_timeout(Duration::from_millis(100))
            .expect("event")
        {
            if acked == seq {
                return (ok, message, detail);
            }
        }
    }
    panic!("no ack for command {seq}");
}

/// A server-streaming call of `messages` messages `gap` apart, started now.
async fn stream(
    edge: std::net::SocketAddr,
    messages: usize,
    gap: Duration,
) -> pnp_interop_tests::RawStream {
    let request = streaming_request(
        (0..messages)
            .map(|_| response(8, gap.as_micros() as i32))
            .collect(),
        0,
    );
    RawClient::new(edge, Mode::GrpcH2)
        .start(STREAM, &[], &[&encode(&request)])
        .await
}

/// How a whole call of `messages` messages `gap` apart ends: (status, message).
async fn call(edge: std::net::SocketAddr, messages: usize, gap: Duration) -> (i32, String) {
    stream(edge, messages, gap)
        .await
        .finish()
        .await
        .expect("a status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_config_governs_new_calls_at_once_while_calls_in_flight_keep_theirs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (upstream, proxy) = linked(dir.path()).await;
    let mut control = ControlSide::open(dir.path()).expect("control side");
    let edge = proxy.local_addr();

    // A call that runs 1 s, started under the config without a total-duration cap.
    let old = stream(edge, 5, Duration::from_millis(200)).await;

    let sent = Instant::now();
    let (ok, message, detail) = command(
        &mut control,
        Command::ApplyConfig {
            toml: "[profiles.default]\nmax_duration = \"300ms\"\n".into(),
            dry_run: false,
        },
    );
    let acked = sent.elapsed();
    assert!(ok, "{message}");
    let diff = detail.expect("a diff")["diff"].clone();
    assert!(diff.to_string().contains("~ profile default"), "{diff}");

    let started = Instant::now();
    let (code, text) = call(edge, 5, Duration::from_millis(200)).await;
    assert_eq!(code, 4, "a new call is capped at 300 ms: {text}");
    assert!(started.elapsed() < Duration::from_millis(900));
    let (code, text) = old.finish().await.expect("a status");
    assert_eq!(code, 0, "the call in flight kept its policy: {text}");
    println!("apply → acknowledged (and governing new calls) in {acked:?}");
    assert!(acked < Duration::from_millis(100), "{acked:?}");

    // A config that does not validate is refused; the one in force stays.
    let (ok, message, _) = command(
        &mut control,
        Command::ApplyConfig {
            toml: "[profiles.default]\nmax_duration = \"soon\"\n".into(),
            dry_run: false,
        },
    );
    assert!(!ok);
    assert!(message.contains("max_duration"), "{message}");
    let (code, _) = call(edge, 5, Duration::from_millis(200)).await;
    assert_eq!(code, 4, "the last good config still governs");

    // A dry run shows the differences and changes nothing.
    let (ok, message, detail) = command(
        &mut control,
        Command::ApplyConfig {
            toml: String::new(),
            dry_run: true,
        },
    );
    assert!(ok, "{message}");
    assert!(
        detail.expect("diff")["diff"]
            .to_string()
            .contains("~ profile default"),
        "{message}"
    );
    let (code, _) = call(edge, 5, Duration::from_millis(200)).await;
    assert_eq!(code, 4, "a dry run applies nothing");
    proxy.shutdown().await;
    upstream.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_job_refuses_new_calls_naming_the_job_and_resume_lets_them_through() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (upstream, proxy) = linked(dir.path()).await;
    let mut control = ControlSide::open(dir.path()).expect("control side");
    let edge = proxy.local_addr();

    let in_flight = stream(edge, 3, Duration::from_millis(150)).await;
    let (ok, message, _) = command(
        &mut control,
        Command::PauseJob {
            job: "default".into(),
            in_flight: InFlight::Finish,
        },
    );
    assert!(ok, "{message}");
    let (code, text) = call(edge, 1, Duration::ZERO).await;
    assert_eq!(code, 14);
    assert!(text.contains("job default is paused"), "{text}");
    let (code, _) = in_flight.finish().await.expect("status");
    assert_eq!(code, 0, "calls in flight finish when asked to");

    // Paused again, ending what is in flight.
    command(
        &mut control,
        Command::ResumeJob {
            job: "default".into(),
        },
    );
    let in_flight = stream(edge, 10, Duration::from_millis(200)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (ok, message, _) = command(
        &mut control,
        Command::PauseJob {
            job: "default".into(),
            in_flight: InFlight::End,
        },
    );
    assert!(
        ok && message.contains("1 calls in flight ended"),
        "{message}"
    );
    let (code, text) = in_flight.finish().await.expect("status");
    assert_eq!(code, 14, "{text}");
    assert!(text.contains("paused"), "{text}");

    let (ok, _, _) = command(
        &mut control,
        Command::ResumeJob {
            job: "default".into(),
        },
    );
    assert!(ok);
    assert_eq!(call(edge, 1, Duration::ZERO).await.0, 0, "resumed");

    // Frozen: FAILED_PRECONDITION, and the freeze reports the job's recent calls.
    let (ok, _, detail) = command(
        &mut control,
        Command::FreezeJob {
            job: "default".into(),
            reason: "too many errors".into(),
        },
    );
    assert!(ok);
    let recent = detail.expect("snapshot")["recent"].clone();
    assert!(
        // Three calls ran (a refused call never started, so it is no call of the job's).
        recent.as_array().is_some_and(|calls| calls.len() == 3
            && calls
                .iter()
                .any(|c| c["code"] == 14
                    && c["message"].as_str().is_some_and(|m| m.contains("paused")))),
        "{recent}"
    );
    let (code, text) = call(edge, 1, Duration::ZERO).await;
    assert_eq!(code, 9);
    assert!(text.contains("frozen: too many errors"), "{text}");
    let (ok, message, _) = command(
        &mut control,
        Command::PauseJob {
            job: "nosuch".into(),
            in_flight: InFlight::Finish,
        },
    );
    assert!(!ok && message.contains("nosuch"), "{message}");
    proxy.shutdown().await;
    upstream.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_goes_on_without_the_control_plane_and_a_new_one_re_attaches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (upstream, proxy) = linked(dir.path()).await;
    let edge = proxy.local_addr();
    let mut control = ControlSide::open(dir.path()).expect("control side");
    command(
        &mut control,
        Command::PauseJob {
            job: "default".into(),
            in_flight: InFlight::Finish,
        },
    );
    command(
        &mut control,
        Command::ResumeJob {
            job: "default".into(),
        },
    );
    // The control plane dies; calls go on.
    drop(control);
    for _ in 0..20 {
        assert_eq!(call(edge, 2, Duration::ZERO).await.0, 0);
    }
    // A new one attaches and hears the whole state, then steers.
    let mut control = ControlSide::open(dir.path()).expect("re-attached");
    let deadline = Instant::now() + Duration::from_secs(5);
    // (The Hello the first control plane never read may come first: the events ring keeps
    // what was not read for the next reader. The state of now has the 20 calls.)
    let hello = loop {
        assert!(Instant::now() < deadline, "no hello");
        if let Some(Event::Hello { jobs, .. }) = control
            .event_timeout(Duration::from_millis(100))
            .expect("event")
        {
            if jobs.iter().any(|j| j.job == "default" && j.calls >= 20) {
                break jobs;
            }
        }
    };
    let default = hello
        .iter()
        .find(|j| j.job == "default")
        .expect("the default job");
    assert!(default.calls >= 20, "{default:?}");
    assert_eq!(default.mode, JobMode::Running);
    let (ok, message, _) = command(
        &mut control,
        Command::PauseJob {
            job: "default".into(),
            in_flight: InFlight::Finish,
        },
    );
    assert!(ok, "{message}");
    assert_eq!(call(edge, 1, Duration::ZERO).await.0, 14);

    // Stats arrive once a second with the job's counters.
    let deadline = Instant::now() + Duration::from_secs(3);
    let stats = loop {
        assert!(Instant::now() < deadline, "no stats");
        if let Some(Event::Stats { jobs, .. }) = control
            .event_timeout(Duration::from_millis(100))
            .expect("event")
        {
            break jobs;
        }
    };
    let default = stats.iter().find(|j| j.job == "default").expect("default");
    assert_eq!(default.mode, JobMode::Paused);
    assert!(default.calls >= 20, "{default:?}");
    assert_eq!(default.active, 0, "{default:?}");
    proxy.shutdown().await;
    upstream.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_answered_while_the_data_plane_carries_token_streams_and_bulk() {
    use pnp_demo::pb::grpc_testing::SimpleRequest;
    use pnp_demo::pb::llm::GenerateRequest;
    use pnp_interop_tests::interop::GENERATE;

    let dir = tempfile::tempdir().expect("tempdir");
    let (upstream, proxy) = linked(dir.path()).await;
    let edge = proxy.local_addr();
    let stop = Instant::now() + Duration::from_secs(3);

    // 200 token streams (a token every 20 ms) and 4 clients downloading 3 MiB replies in a loop.
    let mut load = Vec::new();
    for i in 0..200u32 {
        load.push(tokio::spawn(async move {
            let request = encode(&GenerateRequest {
                prompt: "load".into(),
                max_tokens: 150,
                seed: Some(u64::from(i)),
                first_token_delay_ms: Some(10),
                token_interval_ms: Some(20),
                ..Default::default()
            });
            let mut stream = RawClient::new(edge, Mode::GrpcH2)
                .start(GENERATE, &[], &[&request])
                .await;
            let mut tokens = 0u64;
            while Instant::now() < stop {
                match stream.next_message().await {
                    Some(_) => tokens += 1,
                    None => break,
                }
            }
            tokens
        }));
    }
    for _ in 0..4 {
        load.push(tokio::spawn(async move {
            let request = encode(&SimpleRequest {
                response_size: 3 << 20,
                ..SimpleRequest::default()
            });
            let mut bytes = 0u64;
            while Instant::now() < stop {
                let reply = RawClient::new(edge, Mode::GrpcH2)
                    .call("/grpc.testing.TestService/UnaryCall", &[], &[&request])
                    .await;
                bytes += reply.messages.iter().map(|m| m.len() as u64).sum::<u64>();
            }
            bytes
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut control = ControlSide::open(dir.path()).expect("control side");
    let mut latencies = Vec::new();
    let control_task = tokio::task::spawn_blocking(move || {
        for i in 0..30 {
            let job = "default".to_owned();
            let command_sent = Instant::now();
            let (ok, message, _) = if i % 2 == 0 {
                command(&mut control, Command::Snapshot { job })
            } else {
                command(
                    &mut control,
                    Command::OverrideTransport {
                        job,
                        force: None,
                        forbid: vec![],
                        clear: true,
                    },
                )
            };
            assert!(ok, "{message}");
            latencies.push(command_sent.elapsed());
            std::thread::sleep(Duration::from_millis(50));
        }
        latencies
    });
    let mut latencies = control_task.await.expect("control");
    let mut tokens = 0;
    let mut bulk = 0;
    for (i, task) in load.into_iter().enumerate() {
        let n = task.await.expect("load");
        if i < 200 {
            tokens += n;
        } else {
            bulk += n;
        }
    }
    latencies.sort();
    println!(
        "under load ({tokens} tokens, {} MiB of bulk in 3 s): command → ack p50 {:?}, max {:?}",
        bulk >> 20,
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    assert!(
        tokens > 10_000 && bulk > 64 << 20,
        "the load ran: {tokens} tokens, {bulk} B"
    );
    assert!(
        latencies[latencies.len() - 1] < Duration::from_secs(1),
        "{latencies:?}"
    );
    proxy.shutdown().await;
    upstream.shutdown().await;
}
