//! Every RPC goes down the commands ring and returns with the data plane's ack.

use std::time::{Duration, Instant};

use pnp_control::proto::{self, JobMode as ProtoMode};
use pnp_link::{Command, InFlight};
use tonic::Code;

use crate::support::{eventually, job, FakeDataPlane, FakeState, Harness};

#[tokio::test]
async fn every_rpc_round_trips_through_the_rings() {
    let (harness, fake) = Harness::start_after(
        |link| FakeDataPlane::start(link, vec![job("chat"), job("gradient-sync")]),
        |_| {},
    )
    .await;
    let mut client = harness.client().await;

    // The job table, from the data plane's Hello (answering the resync) and Stats.
    assert!(
        eventually(Duration::from_secs(5), || !harness
            .plane
            .hub()
            .jobs()
            .jobs
            .is_empty())
        .await
    );
    let jobs = client
        .list_jobs(proto::ListJobsRequest {})
        .await
        .expect("list jobs")
        .into_inner();
    let names: Vec<_> = jobs.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["chat", "gradient-sync"]);
    assert_eq!(jobs.jobs[0].mode(), ProtoMode::Running);
    assert_eq!(jobs.jobs[0].transport, "h2");
    let data_plane = jobs.data_plane.expect("data plane");
    assert!(data_plane.attached && data_plane.seen);
    assert_eq!((data_plane.pid, data_plane.config_version), (4242, 1));

    let applied = client
        .apply_config(proto::ApplyConfigRequest {
            toml: "[listener]\naddr = \"127.0.0.1:8080\"\n".into(),
            dry_run: true,
        })
        .await
        .expect("dry run")
        .into_inner();
    assert!(applied.dry_run);
    assert_eq!(applied.message, "dry run: 1 change");
    let diff: serde_json::Value = serde_json::from_str(&applied.diff_json).expect("diff json");
    assert_eq!(diff["diff"][0], "~ profile chat");
    let applied = client
        .apply_config(proto::ApplyConfigRequest {
            toml: "[listener]\n".into(),
            dry_run: false,
        })
        .await
        .expect("apply")
        .into_inner();
    assert!(applied.message.contains("applied"), "{}", applied.message);
    let refused = client
        .apply_config(proto::ApplyConfigRequest {
            toml: "bogus = 1\n".into(),
            dry_run: false,
        })
        .await
        .expect_err("a bad config");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(refused.message(), "unknown key `bogus` at line 1");

    let paused = client
        .pause_job(proto::PauseJobRequest {
            job: "chat".into(),
            end_in_flight: true,
        })
        .await
        .expect("pause")
        .into_inner();
    assert_eq!(paused.message, "job chat paused (End)");
    let listed = client
        .list_jobs(proto::ListJobsRequest {})
        .await
        .expect("list jobs")
        .into_inner();
    assert_eq!(
        listed.jobs[0].mode(),
        ProtoMode::Paused,
        "the JobMode event updates the table"
    );
    client
        .resume_job(proto::ResumeJobRequest { job: "chat".into() })
        .await
        .expect("resume");
    client
        .freeze_job(proto::FreezeJobRequest {
            job: "gradient-sync".into(),
            reason: "operator says so".into(),
        })
        .await
        .expect("freeze");
    let overridden = client
        .override_transport(proto::OverrideTransportRequest {
            job: "chat".into(),
            force: "h3".into(),
            forbid: vec!["h1".into()],
            clear: false,
        })
        .await
        .expect("override")
        .into_inner();
    let detail: serde_json::Value = serde_json::from_str(&overridden.detail_json).expect("json");
    assert_eq!(detail["force"], "h3");
    let drained = client
        .drain(proto::DrainRequest { grace_ms: 30_000 })
        .await
        .expect("drain")
        .into_inner();
    assert_eq!(drained.message, "draining, 30000 ms grace");
    let snapshot = client
        .snapshot(proto::SnapshotRequest { job: "chat".into() })
        .await
        .expect("snapshot")
        .into_inner();
    let snapshot: serde_json::Value =
        serde_json::from_str(&snapshot.snapshot_json).expect("snapshot json");
    assert_eq!(snapshot["recent"].as_array().map(Vec::len), Some(2));

    // Refusals carry the data plane's code and message.
    let unknown = client
        .resume_job(proto::ResumeJobRequest { job: "nope".into() })
        .await
        .expect_err("unknown job");
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(unknown.message(), "unknown job \"nope\"");
    // Requests that make no sense never reach the data plane.
    let empty = client
        .override_transport(proto::OverrideTransportRequest {
            job: "chat".into(),
            ..Default::default()
        })
        .await
        .expect_err("nothing to override");
    assert_eq!(empty.code(), Code::InvalidArgument);

    let commands = fake.commands();
    assert_eq!(commands[0], Command::Resync, "{commands:?}");
    let expected = [
        Command::ApplyConfig {
            toml: "[listener]\naddr = \"127.0.0.1:8080\"\n".into(),
            dry_run: true,
        },
        Command::ApplyConfig {
            toml: "[listener]\n".into(),
            dry_run: false,
        },
        Command::ApplyConfig {
            toml: "bogus = 1\n".into(),
            dry_run: false,
        },
        Command::PauseJob {
            job: "chat".into(),
            in_flight: InFlight::End,
        },
        Command::ResumeJob { job: "chat".into() },
        Command::FreezeJob {
            job: "gradient-sync".into(),
            reason: "operator says so".into(),
        },
        Command::OverrideTransport {
            job: "chat".into(),
            force: Some("h3".into()),
            forbid: vec!["h1".into()],
            clear: false,
        },
        Command::Drain { grace_ms: 30_000 },
        Command::Snapshot { job: "chat".into() },
        Command::ResumeJob { job: "nope".into() },
    ];
    assert_eq!(&commands[1..], &expected[..]);
    // An operator's freeze also leaves a snapshot with the data plane's recent calls.
    let snapshots = harness.snapshot_dir();
    assert!(
        eventually(Duration::from_secs(5), || std::fs::read_dir(&snapshots)
            .map(|d| d.count() == 1)
            .unwrap_or(false))
        .await
    );
}

#[tokio::test]
async fn a_data_plane_that_does_not_answer_is_unavailable_after_the_ack_timeout() {
    let (harness, _fake) = Harness::start_after(
        |link| {
            FakeDataPlane::start_with(
                link,
                FakeState {
                    jobs: vec![job("chat")],
                    silent: true,
                    ..FakeState::default()
                },
            )
        },
        |options| options.ack_timeout = Duration::from_millis(300),
    )
    .await;
    let mut client = harness.client().await;
    let started = Instant::now();
    let error = client
        .pause_job(proto::PauseJobRequest {
            job: "chat".into(),
            end_in_flight: false,
        })
        .await
        .expect_err("no answer");
    assert_eq!(error.code(), Code::Unavailable);
    assert!(
        error.message().contains("data plane not answering"),
        "{}",
        error.message()
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn without_a_data_plane_commands_fail_at_once_and_nothing_is_queued() {
    let harness = Harness::start(|_| {}).await;
    let mut client = harness.client().await;
    let started = Instant::now();
    let error = client
        .drain(proto::DrainRequest { grace_ms: 1 })
        .await
        .expect_err("no data plane");
    assert_eq!(error.code(), Code::Unavailable);
    assert!(
        error.message().contains("no data plane attached"),
        "{}",
        error.message()
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let jobs = client
        .list_jobs(proto::ListJobsRequest {})
        .await
        .expect("list jobs")
        .into_inner();
    assert!(jobs.jobs.is_empty());
    assert!(!jobs.data_plane.expect("data plane").attached);

    // A data plane that comes later gets a resync, and not the drain.
    let fake = FakeDataPlane::start(&harness.link_dir(), vec![job("chat")]);
    assert!(
        eventually(Duration::from_secs(5), || fake.commands()
            == [Command::Resync])
        .await
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.commands(), [Command::Resync]);
}

#[tokio::test]
async fn a_restarted_data_plane_gets_a_resync() {
    let (harness, fake) =
        Harness::start_after(|link| FakeDataPlane::start(link, vec![job("chat")]), |_| {}).await;
    assert!(
        eventually(Duration::from_secs(5), || fake.commands()
            == [Command::Resync])
        .await
    );
    drop(fake);
    let fake = FakeDataPlane::start(&harness.link_dir(), vec![job("batch")]);
    assert!(
        eventually(Duration::from_secs(5), || fake.commands()
            == [Command::Resync])
        .await,
        "{:?}",
        fake.commands()
    );
    assert!(
        eventually(Duration::from_secs(5), || harness
            .plane
            .hub()
            .jobs()
            .jobs
            .first()
            .map(|j| j.job.clone())
            == Some("batch".into()))
        .await
    );
}

#[tokio::test]
async fn watch_events_streams_data_plane_and_control_plane_events() {
    let (harness, _fake) =
        Harness::start_after(|link| FakeDataPlane::start(link, vec![job("chat")]), |_| {}).await;
    let mut client = harness.client().await;
    let mut events = client
        .watch_events(proto::WatchEventsRequest {
            include_stats: false,
        })
        .await
        .expect("watch")
        .into_inner();
    let paused = client
        .pause_job(proto::PauseJobRequest {
            job: "chat".into(),
            end_in_flight: false,
        })
        .await
        .expect("pause")
        .into_inner();
    let ours = format!("ack {}", paused.seq);
    let mut kinds = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !kinds.contains(&ours) {
        let event = tokio::time::timeout_at(deadline, events.message())
            .await
            .expect("events in time")
            .expect("stream")
            .expect("an event");
        assert_ne!(event.r#type, "stats", "stats were not asked for");
        let json: serde_json::Value = serde_json::from_str(&event.json).expect("json");
        assert_eq!(json["type"], event.r#type.as_str());
        if event.r#type == "job_mode" {
            assert_eq!(json["job"], "chat");
            assert_eq!(json["mode"], "paused");
            assert_eq!(event.source(), proto::EventSource::Data);
        }
        kinds.push(match event.r#type.as_str() {
            "ack" => format!("ack {}", json["seq"]),
            other => other.to_owned(),
        });
    }
    // The data plane sends a command's events before its ack.
    assert_eq!(kinds.last(), Some(&ours));
    assert!(kinds.contains(&"job_mode".to_owned()), "{kinds:?}");

    // With stats.
    let mut events = client
        .watch_events(proto::WatchEventsRequest {
            include_stats: true,
        })
        .await
        .expect("watch")
        .into_inner();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .expect("events in time")
            .expect("stream")
            .expect("an event");
        if event.r#type == "stats" {
            break;
        }
    }
}

#[tokio::test]
async fn rpcs_keep_answering_while_the_events_ring_is_flooded() {
    let (harness, fake) = Harness::start_after(
        |link| {
            FakeDataPlane::start_with(
                link,
                FakeState {
                    jobs: vec![job("chat")],
                    flood: true,
                    ..FakeState::default()
                },
            )
        },
        // A command's ack waits behind the whole backlog of a full events ring (4 MiB of
        // events: about a second in a debug build); the point is that it gets through.
        |options| options.ack_timeout = Duration::from_secs(20),
    )
    .await;
    let mut client = harness.client().await;
    // A subscriber that never reads must not stop the link either.
    let _stalled = client
        .watch_events(proto::WatchEventsRequest {
            include_stats: true,
        })
        .await
        .expect("watch");
    // Flooded: the data plane finds the events ring full (and drops events).
    let dropped = || fake.dropped.load(std::sync::atomic::Ordering::Relaxed);
    assert!(eventually(Duration::from_secs(10), || dropped() > 0).await);
    let dropped_before = dropped();
    let flooded_from = fake.emitted.load(std::sync::atomic::Ordering::Relaxed);
    for round in 0..4 {
        // The job table does not go through the ring at all.
        let started = Instant::now();
        client
            .list_jobs(proto::ListJobsRequest {})
            .await
            .expect("list jobs");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        if round % 2 == 0 {
            let paused = client
                .pause_job(proto::PauseJobRequest {
                    job: "chat".into(),
                    end_in_flight: false,
                })
                .await
                .expect("pause")
                .into_inner();
            assert_eq!(paused.message, "job chat paused (Finish)");
        } else {
            client
                .resume_job(proto::ResumeJobRequest { job: "chat".into() })
                .await
                .expect("resume");
        }
    }
    let flooded = fake.emitted.load(std::sync::atomic::Ordering::Relaxed) - flooded_from;
    assert!(flooded > 10_000, "the flood was only {flooded} events");
    assert!(
        dropped() > dropped_before,
        "the ring was not full during the calls"
    );
}

#[tokio::test]
async fn the_job_table_shows_a_pause_once_acked_even_before_the_data_planes_event() {
    let (harness, _fake) = Harness::start_after(
        |link| {
            FakeDataPlane::start_with(
                link,
                FakeState {
                    jobs: vec![job("chat")],
                    events_after_ack: Some(Duration::from_millis(500)),
                    ..FakeState::default()
                },
            )
        },
        |_| {},
    )
    .await;
    let mut client = harness.client().await;
    assert!(
        eventually(Duration::from_secs(5), || !harness
            .plane
            .hub()
            .jobs()
            .jobs
            .is_empty())
        .await
    );
    for (mode, expected) in [(true, ProtoMode::Paused), (false, ProtoMode::Running)] {
        if mode {
            client
                .pause_job(proto::PauseJobRequest {
                    job: "chat".into(),
                    end_in_flight: false,
                })
                .await
                .expect("pause");
        } else {
            client
                .resume_job(proto::ResumeJobRequest { job: "chat".into() })
                .await
                .expect("resume");
        }
        let jobs = client
            .list_jobs(proto::ListJobsRequest {})
            .await
            .expect("list")
            .into_inner();
        assert_eq!(jobs.jobs[0].mode(), expected);
    }
}
