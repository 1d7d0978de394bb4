//! The hub on its own (no API): commands and their acks, and a freeze whose `JobFrozen` never
//! comes.

use std::time::Duration;

use pnp_control::{FreezeRule, Hub, HubOptions};
use pnp_link::{Command, JobMode};

use crate::support::{eventually, job, FakeDataPlane, FakeState};

#[tokio::test]
async fn a_freeze_without_job_frozen_is_snapshotted_after_the_wait_with_a_note() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("link");
    std::fs::create_dir_all(&link).expect("link dir");
    let fake = FakeDataPlane::start_with(
        &link,
        FakeState {
            jobs: vec![job("failing")],
            per_tick: vec![("failing".into(), 10, 10, 10)],
            no_job_frozen: true,
            ..FakeState::default()
        },
    );
    let snapshots = dir.path().join("snapshots");
    let hub = Hub::start(HubOptions {
        freeze: Some(FreezeRule {
            max_errors: 20,
            error_window: Duration::from_secs(300),
            max_retries: 20,
            retry_window: Duration::from_secs(60),
        }),
        snapshot_dir: Some(snapshots.clone()),
        job_frozen_wait: Duration::from_millis(300),
        ..HubOptions::new(&link)
    })
    .expect("hub");

    // A command and its ack, straight through the hub.
    let ack = hub
        .command(Command::Snapshot {
            job: "failing".into(),
        })
        .await
        .expect("snapshot ack");
    assert_eq!(ack.message, "2 recent calls");

    let files = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&snapshots)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    assert!(eventually(Duration::from_secs(10), || !files().is_empty()).await);
    let snapshot: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files()[0]).expect("snapshot")).expect("json");
    assert_eq!(snapshot["job"], "failing");
    assert_eq!(snapshot["by_rule"], true);
    assert_eq!(snapshot["recent"].as_array().map(Vec::len), Some(0));
    assert!(
        snapshot["note"]
            .as_str()
            .is_some_and(|n| n.contains("acknowledged the freeze but sent no recent calls")),
        "{snapshot}"
    );
    assert_eq!(
        hub.jobs().jobs.first().map(|j| j.mode),
        Some(JobMode::Frozen),
        "the JobMode event updated the table"
    );
    let freezes = fake
        .commands()
        .into_iter()
        .filter(|c| matches!(c, Command::FreezeJob { .. }))
        .count();
    assert_eq!(freezes, 1);
    let hub_for_shutdown = hub.clone();
    tokio::task::spawn_blocking(move || hub_for_shutdown.shutdown())
        .await
        .expect("shutdown");
    assert!(matches!(
        hub.command(Command::Resync).await,
        Err(pnp_control::CommandError::Stopped)
    ));
}
