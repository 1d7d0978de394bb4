//! The `pnp.control.v1.Control` service: each RPC is one command through the [`Hub`], or a
//! read of its job table, or a subscription to its events.

use std::pin::Pin;
use std::sync::Arc;

use pnp_link::{Command, InFlight, JobMode};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use crate::hub::{Ack, CommandError, Hub, Published, Source};
use crate::proto;
use crate::proto::control_server::Control;
use crate::server::PeerInfo;

/// The control API over a [`Hub`].
#[derive(Clone, Debug)]
pub struct ControlService {
    hub: Hub,
}

impl ControlService {
    /// The service for `hub`.
    pub fn new(hub: Hub) -> ControlService {
        ControlService { hub }
    }

    async fn run<T>(
        &self,
        request: &Request<T>,
        command: Command,
        refused: Code,
    ) -> Result<Ack, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let what = format!("{command:?}");
        let what = truncate(&what, 200);
        let result = self.hub.command(command).await;
        match &result {
            Ok(ack) => {
                tracing::info!(peer = ?peer, command = %what, seq = ack.seq, message = %ack.message, "control command done")
            }
            Err(error) => {
                tracing::warn!(peer = ?peer, command = %what, %error, "control command failed")
            }
        }
        result.map_err(|e| status(e, refused))
    }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// The gRPC status for a command that did not succeed. A refusal's code comes from the ack's
/// detail (`{"code": "not_found"}`, `"invalid_argument"`, `"failed_precondition"`), else
/// `refused`.
pub(crate) fn status(error: CommandError, refused: Code) -> Status {
    match error {
        CommandError::Refused {
            message, detail, ..
        } => {
            let code = detail
                .as_ref()
                .and_then(|d| d.get("code"))
                .and_then(|c| c.as_str())
                .and_then(|c| match c {
                    "not_found" => Some(Code::NotFound),
                    "invalid_argument" => Some(Code::InvalidArgument),
                    "failed_precondition" => Some(Code::FailedPrecondition),
                    "already_exists" => Some(Code::AlreadyExists),
                    "unavailable" => Some(Code::Unavailable),
                    _ => None,
                })
                .unwrap_or(refused);
            Status::new(code, message)
        }
        other @ (CommandError::NotAttached(_)
        | CommandError::Timeout(_)
        | CommandError::Link(_)
        | CommandError::Stopped) => Status::unavailable(other.to_string()),
    }
}

fn detail_json(detail: Option<serde_json::Value>) -> String {
    detail.map(|d| d.to_string()).unwrap_or_default()
}

fn reply(ack: Ack) -> Response<proto::CommandReply> {
    Response::new(proto::CommandReply {
        seq: ack.seq,
        message: ack.message,
        detail_json: detail_json(ack.detail),
    })
}

fn required(name: &str, value: &str) -> Result<(), Status> {
    if value.trim().is_empty() {
        Err(Status::invalid_argument(format!("{name} is required")))
    } else {
        Ok(())
    }
}

fn mode(mode: JobMode) -> proto::JobMode {
    match mode {
        JobMode::Running => proto::JobMode::Running,
        JobMode::Paused => proto::JobMode::Paused,
        JobMode::Frozen => proto::JobMode::Frozen,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::WatchEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn list_jobs(
        &self,
        _request: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        let table = self.hub.jobs();
        let jobs = table
            .jobs
            .iter()
            .map(|stats| {
                let window = table.windows.get(&stats.job).copied().unwrap_or_default();
                proto::Job {
                    name: stats.job.clone(),
                    mode: mode(stats.mode).into(),
                    calls: stats.calls,
                    non_ok: stats.non_ok,
                    retries: stats.retries,
                    active: stats.active,
                    throughput_bytes_per_second: stats.throughput,
                    transport: stats.transport.clone().unwrap_or_default(),
                    window_errors: window.errors,
                    window_retries: window.retries,
                }
            })
            .collect();
        let data_plane = proto::DataPlane {
            attached: table.attached,
            pid: table.pid.unwrap_or(0),
            config_version: table.config_version.unwrap_or(0),
            stats_age_ms: table.updated.map_or(0, |at| {
                u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX)
            }),
            dropped_events: table.dropped_events,
            seen: table.updated.is_some(),
        };
        Ok(Response::new(proto::ListJobsResponse {
            jobs,
            data_plane: Some(data_plane),
        }))
    }

    async fn apply_config(
        &self,
        request: Request<proto::ApplyConfigRequest>,
    ) -> Result<Response<proto::ApplyConfigResponse>, Status> {
        let command = Command::ApplyConfig {
            toml: request.get_ref().toml.clone(),
            dry_run: request.get_ref().dry_run,
        };
        let ack = self.run(&request, command, Code::InvalidArgument).await?;
        Ok(Response::new(proto::ApplyConfigResponse {
            seq: ack.seq,
            message: ack.message,
            diff_json: detail_json(ack.detail),
            dry_run: request.get_ref().dry_run,
        }))
    }

    async fn pause_job(
        &self,
        request: Request<proto::PauseJobRequest>,
    ) -> Result<Response<proto::CommandReply>, Status> {
        let message = request.get_ref();
        required("job", &message.job)?;
        let command = Command::PauseJob {
            job: message.job.clone(),
            in_flight: if message.end_in_flight {
                InFlight::End
            } else {
                InFlight::Finish
            },
        };
        self.run(&request, command, Code::FailedPrecondition)
            .await
            .map(reply)
    }

    async fn resume_job(
        &self,
        request: Request<proto::ResumeJobRequest>,
    ) -> Result<Response<proto::CommandReply>, Status> {
        required("job", &request.get_ref().job)?;
        let command = Command::ResumeJob {
            job: request.get_ref().job.clone(),
        };
        self.run(&request, command, Code::FailedPrecondition)
            .await
            .map(reply)
    }

    async fn freeze_job(
        &self,
        request: Request<proto::FreezeJobRequest>,
    ) -> Result<Response<proto::CommandReply>, Status> {
        let message = request.get_ref();
        required("job", &message.job)?;
        required("reason", &message.reason)?;
        let command = Command::FreezeJob {
            job: message.job.clone(),
            reason: message.reason.clone(),
        };
        self.run(&request, command, Code::FailedPrecondition)
            .await
            .map(reply)
    }

    async fn override_transport(
        &self,
        request: Request<proto::OverrideTransportRequest>,
    ) -> Result<Response<proto::CommandReply>, Status> {
        let message = request.get_ref();
        required("job", &message.job)?;
        let force = (!message.force.is_empty()).then(|| message.force.clone());
        if force.is_none() && message.forbid.is_empty() && !message.clear {
            return Err(Status::invalid_argument(
                "say what to override: force, forbid or clear",
            ));
        }
        if let Some(force) = &force {
            if message.forbid.contains(force) {
                return Err(Status::invalid_argument(format!(
                    "{force} cannot be both forced and forbidden"
                )));
            }
        }
        let command = Command::OverrideTransport {
            job: message.job.clone(),
            force,
            forbid: message.forbid.clone(),
            clear: message.clear,
        };
        self.run(&request, command, Code::FailedPrecondition)
            .await
            .map(reply)
    }

    async fn drain(
        &self,
        request: Request<proto::DrainRequest>,
    ) -> Result<Response<proto::CommandReply>, Status> {
        let command = Command::Drain {
            grace_ms: request.get_ref().grace_ms,
        };
        self.run(&request, command, Code::FailedPrecondition)
            .await
            .map(reply)
    }

    async fn snapshot(
        &self,
        request: Request<proto::SnapshotRequest>,
    ) -> Result<Response<proto::SnapshotResponse>, Status> {
        required("job", &request.get_ref().job)?;
        let command = Command::Snapshot {
            job: request.get_ref().job.clone(),
        };
        let ack = self
            .run(&request, command, Code::FailedPrecondition)
            .await?;
        Ok(Response::new(proto::SnapshotResponse {
            seq: ack.seq,
            message: ack.message,
            snapshot_json: detail_json(ack.detail),
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<proto::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let include_stats = request.get_ref().include_stats;
        let mut events = self.hub.subscribe();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    item = events.recv() => item,
                    () = tx.closed() => return,
                };
                let response = match item {
                    Ok(event) if event.kind == "stats" && !include_stats => continue,
                    Ok(event) => to_response(&event),
                    Err(broadcast::error::RecvError::Lagged(missed)) => lagged(missed),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn to_response(event: &Arc<Published>) -> proto::WatchEventsResponse {
    proto::WatchEventsResponse {
        at_unix_ms: event.at_unix_ms,
        source: match event.source {
            Source::Data => proto::EventSource::Data,
            Source::Control => proto::EventSource::Control,
        }
        .into(),
        r#type: event.kind.clone(),
        json: event.json.clone(),
    }
}

fn lagged(missed: u64) -> proto::WatchEventsResponse {
    proto::WatchEventsResponse {
        at_unix_ms: crate::hub::unix_ms(),
        source: proto::EventSource::Control.into(),
        r#type: "events_lagged".into(),
        json: serde_json::json!({"type": "events_lagged", "missed": missed}).to_string(),
    }
}
