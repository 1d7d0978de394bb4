//! The alert → freeze loop against a data plane reporting Stats: a failing job is frozen once,
//! with a snapshot; a healthy one is left alone.

use std::time::Duration;

use pnp_control::proto;
use pnp_link::Command;

use crate::support::{eventually, job, FakeDataPlane, FakeState, Harness};

#[tokio::test]
async fn a_failing_job_is_frozen_once_with_a_snapshot_and_a_healthy_one_is_not() {
    let (harness, fake) = Harness::start_after(
        |link| {
            FakeDataPlane::start_with(
                link,
                FakeState {
                    jobs: vec![job("healthy"), job("failing")],
                    // Per 50 ms Stats: the healthy job serves 100 calls with 1 error and no
                    // retries; the failing one fails 30 calls and retries 15 times.
                    per_tick: vec![
                        ("healthy".into(), 100, 1, 0),
                        ("failing".into(), 40, 30, 15),
                    ],
                    ..FakeState::default()
                },
            )
        },
        |_| {},
    )
    .await;
    let mut client = harness.client().await;
    let mut events = client
        .watch_events(proto::WatchEventsRequest {
            include_stats: false,
        })
        .await
        .expect("watch")
        .into_inner();

    let freezes = || {
        fake.commands()
            .into_iter()
            .filter(|c| matches!(c, Command::FreezeJob { .. }))
            .collect::<Vec<_>>()
    };
    assert!(eventually(Duration::from_secs(10), || !freezes().is_empty()).await);
    // The failing job keeps failing (and the healthy one keeps going) for a while longer: no
    // second freeze.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = freezes();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let Command::FreezeJob { job, reason } = &sent[0] else {
        unreachable!()
    };
    assert_eq!(job, "failing");
    assert!(reason.contains("frozen by pnp's alert rule"), "{reason}");

    // The snapshot file: job, reason, rule values, the data plane's recent calls and transport
    // history.
    let dir = harness.snapshot_dir();
    let files = || -> Vec<_> {
        std::fs::read_dir(&dir)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(5), || files().len() == 1).await,
        "{:?}",
        files()
    );
    let path = files().remove(0);
    assert!(path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("failing-")));
    let snapshot: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("snapshot")).expect("json");
    assert_eq!(snapshot["job"], "failing");
    assert_eq!(snapshot["by_rule"], true);
    assert_eq!(snapshot["rule"]["max_errors"], 100);
    assert_eq!(snapshot["rule"]["max_retries"], 50);
    assert_eq!(snapshot["rule"]["error_window"], 300.0);
    assert!(
        snapshot["errors_in_window"]
            .as_u64()
            .is_some_and(|n| n > 100),
        "{snapshot}"
    );
    assert!(
        snapshot["retries_in_window"]
            .as_u64()
            .is_some_and(|n| n > 50),
        "{snapshot}"
    );
    assert_eq!(snapshot["recent"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        snapshot["transport_history"][0],
        "h3 -> h2 (failure_streak)"
    );

    // And on the event stream: the rule firing, then the snapshot.
    let mut kinds = Vec::new();
    while !kinds.contains(&"freeze_snapshot".to_owned()) {
        let event = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .expect("in time")
            .expect("stream")
            .expect("event");
        if event.r#type == "freeze_snapshot" {
            let json: serde_json::Value = serde_json::from_str(&event.json).expect("json");
            assert_eq!(json["snapshot"]["job"], "failing");
            assert_eq!(json["path"], path.display().to_string());
        }
        kinds.push(event.r#type);
    }
    assert!(kinds.contains(&"freeze_fired".to_owned()), "{kinds:?}");

    let jobs = client
        .list_jobs(proto::ListJobsRequest {})
        .await
        .expect("list")
        .into_inner()
        .jobs;
    let healthy = jobs.iter().find(|j| j.name == "healthy").expect("healthy");
    assert_eq!(healthy.mode(), proto::JobMode::Running);
    assert!(
        healthy.window_errors > 0 && healthy.window_errors <= 100,
        "{healthy:?}"
    );
    let failing = jobs.iter().find(|j| j.name == "failing").expect("failing");
    assert_eq!(failing.mode(), proto::JobMode::Frozen);

    // Resumed while its upstream still fails: only what comes after the resume counts, and
    // that trips the rule again: a second freeze, a second snapshot.
    client
        .resume_job(proto::ResumeJobRequest {
            job: "failing".into(),
        })
        .await
        .expect("resume");
    assert!(eventually(Duration::from_secs(10), || freezes().len() == 2).await);
    assert!(eventually(Duration::from_secs(5), || files().len() == 2).await);
    assert!(freezes()
        .iter()
        .all(|c| matches!(c, Command::FreezeJob { job, .. } if job == "failing")));
}
