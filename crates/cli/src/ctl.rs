//! `pnp ctl`: the control API's command-line client (mTLS; defaults from the `pnp certs dev`
//! layout in `./dev-certs/`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use pnp_control::proto::{self, control_client::ControlClient};
use tonic::transport::Channel;

/// `pnp ctl` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct CtlArgs {
    /// The control API (`pnp control --listen`, `pnp serve --control-listen`), host:port.
    #[arg(long, env = "PNP_CTL_ADDR", default_value = "127.0.0.1:9444")]
    addr: String,
    /// PEM CA that signed the control API's certificate.
    #[arg(long, env = "PNP_CTL_CA", default_value = "dev-certs/ca.pem")]
    ca: PathBuf,
    /// PEM client certificate.
    #[arg(long, env = "PNP_CTL_CERT", default_value = "dev-certs/client.pem")]
    cert: PathBuf,
    /// PEM private key of --cert.
    #[arg(long, env = "PNP_CTL_KEY", default_value = "dev-certs/client-key.pem")]
    key: PathBuf,
    /// The name the control API's certificate must be valid for (default: the host of --addr).
    #[arg(long)]
    server_name: Option<String>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(clap::Subcommand, Debug)]
enum CtlCommand {
    /// List the jobs with their mode and live counters.
    Jobs,
    /// Apply a config file (validate and show the differences with --dry-run).
    Apply {
        /// The TOML config file.
        file: PathBuf,
        /// Only validate and show the differences.
        #[arg(long)]
        dry_run: bool,
    },
    /// Pause a job: its new calls get UNAVAILABLE.
    Pause {
        /// The job (profile).
        job: String,
        /// Also end its calls in flight now.
        #[arg(long)]
        end_in_flight: bool,
    },
    /// Resume a paused or frozen job.
    Resume {
        /// The job (profile).
        job: String,
    },
    /// Freeze a job: pause it, end its calls in flight, keep a snapshot of its recent calls.
    Freeze {
        /// The job (profile).
        job: String,
        /// Why (shown to its callers).
        #[arg(long)]
        reason: String,
    },
    /// Force or forbid transports for a job, or clear its overrides.
    Transport {
        /// The job (profile).
        job: String,
        /// Every new call takes this transport (h2, h1, h3, ucx).
        #[arg(long)]
        force: Option<String>,
        /// New calls never take these (comma-separated).
        #[arg(long, value_delimiter = ',')]
        forbid: Vec<String>,
        /// Clear earlier overrides (first, when given with --force or --forbid).
        #[arg(long)]
        clear: bool,
    },
    /// Stop taking new calls; calls in flight get the grace period to finish.
    Drain {
        /// Grace period, e.g. 30s.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        grace: Duration,
    },
    /// Show a job's recent calls.
    Snapshot {
        /// The job (profile).
        job: String,
    },
    /// Print events as they happen, until Ctrl-C.
    Events {
        /// Include the periodic stats.
        #[arg(long)]
        stats: bool,
    },
}

pub(crate) async fn run(args: CtlArgs) -> anyhow::Result<()> {
    let mut client = connect(&args).await?;
    match args.command {
        CtlCommand::Jobs => {
            let reply = client
                .list_jobs(proto::ListJobsRequest {})
                .await
                .map_err(failed("jobs"))?
                .into_inner();
            print!("{}", render_jobs(&reply));
        }
        CtlCommand::Apply { file, dry_run } => {
            let toml = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let reply = client
                .apply_config(proto::ApplyConfigRequest { toml, dry_run })
                .await
                .map_err(failed("apply"))?
                .into_inner();
            println!("ok (seq {}): {}", reply.seq, reply.message);
            print!("{}", render_detail(&reply.diff_json));
        }
        CtlCommand::Pause { job, end_in_flight } => {
            let reply = client
                .pause_job(proto::PauseJobRequest { job, end_in_flight })
                .await
                .map_err(failed("pause"))?;
            print_reply(&reply.into_inner());
        }
        CtlCommand::Resume { job } => {
            let reply = client
                .resume_job(proto::ResumeJobRequest { job })
                .await
                .map_err(failed("resume"))?;
            print_reply(&reply.into_inner());
        }
        CtlCommand::Freeze { job, reason } => {
            let reply = client
                .freeze_job(proto::FreezeJobRequest { job, reason })
                .await
                .map_err(failed("freeze"))?;
            print_reply(&reply.into_inner());
        }
        CtlCommand::Transport {
            job,
            force,
            forbid,
            clear,
        } => {
            anyhow::ensure!(
                force.is_some() || !forbid.is_empty() || clear,
                "say what to do: --force TRANSPORT, --forbid A,B or --clear"
            );
            let reply = client
                .override_transport(proto::OverrideTransportRequest {
                    job,
                    force: force.unwrap_or_default(),
                    forbid,
                    clear,
                })
                .await
                .map_err(failed("transport"))?;
            print_reply(&reply.into_inner());
        }
        CtlCommand::Drain { grace } => {
            let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
            let reply = client
                .drain(proto::DrainRequest { grace_ms })
                .await
                .map_err(failed("drain"))?;
            print_reply(&reply.into_inner());
        }
        CtlCommand::Snapshot { job } => {
            let reply = client
                .snapshot(proto::SnapshotRequest { job })
                .await
                .map_err(failed("snapshot"))?
                .into_inner();
            println!("ok (seq {}): {}", reply.seq, reply.message);
            print!("{}", render_snapshot(&reply.snapshot_json));
        }
        CtlCommand::Events { stats } => {
            let mut events = client
                .watch_events(proto::WatchEventsRequest {
                    include_stats: stats,
                })
                .await
                .map_err(failed("events"))?
                .into_inner();
            loop {
                let event = tokio::select! {
                    event = events.message() => event.map_err(failed("events"))?,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                };
                let Some(event) = event else {
                    anyhow::bail!("the control plane ended the event stream");
                };
                println!("{}", render_event(&event));
            }
        }
    }
    Ok(())
}

async fn connect(args: &CtlArgs) -> anyhow::Result<ControlClient<Channel>> {
    let read = |path: &PathBuf, what: &str| {
        std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading the {what} {} (make development certificates with `pnp certs dev dev-certs`, or pass --{what})",
                path.display()
            )
        })
    };
    let authority = args.addr.strip_prefix("https://").unwrap_or(&args.addr);
    let server_name = match &args.server_name {
        Some(name) => name.clone(),
        None => host_of(authority).to_owned(),
    };
    let tls = pnp_control::ClientTls {
        ca_pem: read(&args.ca, "ca")?,
        identity: Some(pnp_control::Identity {
            cert_pem: read(&args.cert, "cert")?,
            key_pem: read(&args.key, "key")?,
        }),
        server_name,
    };
    Ok(pnp_control::connect(&args.addr, &tls).await?)
}

/// The host of `host:port` or `[v6]:port`.
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

fn failed(what: &'static str) -> impl Fn(tonic::Status) -> anyhow::Error {
    move |status| anyhow::anyhow!("{what}: {:?}: {}", status.code(), status.message())
}

fn print_reply(reply: &proto::CommandReply) {
    println!("ok (seq {}): {}", reply.seq, reply.message);
    // A freeze answers with the job's recent calls, like a snapshot.
    if reply.detail_json.contains("\"recent\"") {
        print!("{}", render_snapshot(&reply.detail_json));
    } else {
        print!("{}", render_detail(&reply.detail_json));
    }
}

/// A detail as lines: a `changes` list one per line, a string as is, anything else as
/// indented JSON; nothing for none.
fn render_detail(json: &str) -> String {
    if json.is_empty() {
        return String::new();
    }
    let Ok(value) = serde_json::from_str::<serde_json::Value>(json) else {
        return format!("{json}\n");
    };
    // A config diff: `diff` (or `changes`), one line each.
    let lines = value
        .get("diff")
        .or_else(|| value.get("changes"))
        .and_then(|c| c.as_array());
    if let Some(changes) = lines {
        if changes.is_empty() {
            return "  no changes\n".to_owned();
        }
        return changes
            .iter()
            .map(|c| {
                format!(
                    "  {}\n",
                    c.as_str().map_or_else(|| c.to_string(), str::to_owned)
                )
            })
            .collect();
    }
    match value {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(text) => format!("{text}\n"),
        other => format!(
            "{}\n",
            serde_json::to_string_pretty(&other).unwrap_or_default()
        ),
    }
}

fn mode_name(job: &proto::Job) -> &'static str {
    match job.mode() {
        proto::JobMode::Running => "running",
        proto::JobMode::Paused => "paused",
        proto::JobMode::Frozen => "frozen",
        proto::JobMode::Unspecified => "?",
    }
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn render_jobs(reply: &proto::ListJobsResponse) -> String {
    let mut out = String::new();
    let data_plane = reply.data_plane.unwrap_or_default();
    if !data_plane.attached {
        out.push_str("data plane: not attached\n");
    } else {
        out.push_str(&format!(
            "data plane: pid {}, config version {}, stats {} ms old, {} events dropped\n",
            data_plane.pid,
            data_plane.config_version,
            data_plane.stats_age_ms,
            data_plane.dropped_events
        ));
    }
    if reply.jobs.is_empty() {
        out.push_str("no jobs reported\n");
        return out;
    }
    let mut rows = vec![[
        "JOB",
        "MODE",
        "CALLS",
        "NON-OK",
        "RETRIES",
        "ACTIVE",
        "ERR/5m",
        "RETRY/1m",
        "THROUGHPUT",
        "TRANSPORT",
    ]
    .map(str::to_owned)
    .to_vec()];
    for job in &reply.jobs {
        rows.push(vec![
            job.name.clone(),
            mode_name(job).to_owned(),
            job.calls.to_string(),
            job.non_ok.to_string(),
            job.retries.to_string(),
            job.active.to_string(),
            job.window_errors.to_string(),
            job.window_retries.to_string(),
            bytes_per_second(job.throughput_bytes_per_second),
            if job.transport.is_empty() {
                "-".to_owned()
            } else {
                job.transport.clone()
            },
        ]);
    }
    out.push_str(&table(&rows));
    out
}

fn bytes_per_second(rate: f64) -> String {
    const UNITS: [&str; 4] = ["B/s", "KiB/s", "MiB/s", "GiB/s"];
    let mut value = rate.max(0.0);
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A snapshot's `recent` calls as a table; anything else as JSON.
fn render_snapshot(json: &str) -> String {
    let value: serde_json::Value = match serde_json::from_str(json) {
        Ok(value) => value,
        Err(_) => return render_detail(json),
    };
    let Some(recent) = value.get("recent").and_then(|r| r.as_array()) else {
        return render_detail(json);
    };
    let mut out = String::new();
    if let Some(mode) = value.get("mode").and_then(|m| m.as_str()) {
        out.push_str(&format!("mode: {mode}\n"));
    }
    if recent.is_empty() {
        out.push_str("no recent calls\n");
    }
    let mut rows = vec![
        ["TIME (UTC)", "METHOD", "CODE", "TRANSPORT", "MS", "MESSAGE"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for call in recent {
        let text = |key: &str| {
            call.get(key)
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                .unwrap_or_default()
        };
        rows.push(vec![
            call.get("at_unix_ms")
                .and_then(serde_json::Value::as_u64)
                .map(clock)
                .unwrap_or_default(),
            text("method"),
            text("code"),
            text("transport"),
            call.get("duration_ms")
                .and_then(serde_json::Value::as_f64)
                .map(|ms| format!("{ms:.1}"))
                .unwrap_or_default(),
            text("message"),
        ]);
    }
    if rows.len() > 1 {
        out.push_str(&table(&rows));
    }
    let history = value
        .get("transport_history")
        .and_then(|h| h.as_array())
        .filter(|h| !h.is_empty());
    if let Some(history) = history {
        out.push_str("transport history:\n");
        for switch in history {
            let line = switch
                .as_str()
                .map_or_else(|| switch.to_string(), str::to_owned);
            out.push_str(&format!("  {line}\n"));
        }
    }
    out
}

/// `HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds.
fn clock(unix_ms: u64) -> String {
    let ms = unix_ms % 1000;
    let s = unix_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{ms:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60
    )
}

/// One line per event: time, source, type, and the rest of the event as JSON.
fn render_event(event: &proto::WatchEventsResponse) -> String {
    let source = match event.source() {
        proto::EventSource::Data => "data",
        proto::EventSource::Control => "control",
        proto::EventSource::Unspecified => "?",
    };
    let rest = match serde_json::from_str::<serde_json::Value>(&event.json) {
        Ok(serde_json::Value::Object(mut fields)) => {
            fields.remove("type");
            serde_json::Value::Object(fields).to_string()
        }
        _ => event.json.clone(),
    };
    format!(
        "{} {source:<7} {:<20} {rest}",
        clock(event.at_unix_ms),
        event.r#type
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_render_as_a_table() {
        let reply = proto::ListJobsResponse {
            jobs: vec![proto::Job {
                name: "chat".into(),
                mode: proto::JobMode::Frozen.into(),
                calls: 1200,
                non_ok: 130,
                retries: 70,
                active: 3,
                throughput_bytes_per_second: 2.5 * 1024.0 * 1024.0,
                transport: "h3".into(),
                window_errors: 120,
                window_retries: 60,
            }],
            data_plane: Some(proto::DataPlane {
                attached: true,
                pid: 7,
                config_version: 2,
                stats_age_ms: 900,
                dropped_events: 0,
                seen: true,
            }),
        };
        let text = render_jobs(&reply);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "data plane: pid 7, config version 2, stats 900 ms old, 0 events dropped"
        );
        assert!(
            lines[1].starts_with("JOB   MODE    CALLS  NON-OK"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("chat  frozen  1200   130"),
            "{}",
            lines[2]
        );
        assert!(lines[2].ends_with("2.5 MiB/s   h3"), "{}", lines[2]);
    }

    #[test]
    fn details_render_as_lines() {
        assert_eq!(
            render_detail(r#"{"version":2,"changes":["a","b"]}"#),
            "  a\n  b\n"
        );
        assert_eq!(
            render_detail(r#"{"version":2,"diff":["~ profile chat"]}"#),
            "  ~ profile chat\n"
        );
        assert_eq!(
            render_detail(r#"{"version":2,"diff":[]}"#),
            "  no changes\n"
        );
        assert_eq!(render_detail(r#""text""#), "text\n");
        assert_eq!(render_detail(""), "");
        assert_eq!(render_detail(r#"{"k":1}"#), "{\n  \"k\": 1\n}\n");
    }

    #[test]
    fn snapshots_and_events_render_readably() {
        let snapshot = r#"{"job":"chat","recent":[{"at_unix_ms":3723004,"method":"/a.B/C","code":14,"message":"reset","transport":"h2","duration_ms":12.5}]}"#;
        let text = render_snapshot(snapshot);
        assert!(!text.contains("transport history"), "{text}");
        let with_history =
            r#"{"mode":"frozen","recent":[],"transport_history":["h3 -> h2 (failure_streak)"]}"#;
        assert_eq!(
            render_snapshot(with_history),
            "mode: frozen\nno recent calls\ntransport history:\n  h3 -> h2 (failure_streak)\n"
        );
        assert!(
            text.contains("01:02:03.004  /a.B/C  14    h2         12.5  reset"),
            "{text}"
        );
        let event = proto::WatchEventsResponse {
            at_unix_ms: 3_723_004,
            source: proto::EventSource::Data.into(),
            r#type: "job_mode".into(),
            json: r#"{"type":"job_mode","job":"chat","mode":"paused"}"#.into(),
        };
        assert_eq!(
            render_event(&event),
            r#"01:02:03.004 data    job_mode             {"job":"chat","mode":"paused"}"#
        );
        assert_eq!(host_of("127.0.0.1:9902"), "127.0.0.1");
        assert_eq!(host_of("[::1]:9902"), "::1");
        assert_eq!(host_of("localhost:9902"), "localhost");
    }
}
