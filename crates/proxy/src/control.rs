//! What the control plane steers in the data plane (issue #14):
//!
//! - **The live config** ([`Live`]): profiles, routes, the message limit and the transport
//!   choices, swapped as one while calls run. A call reads it once, at its start, and keeps that
//!   snapshot to its end; a config that fails validation is refused with the reason and the last
//!   good one stays ([`crate::Proxy::apply_config`]).
//! - **Jobs** ([`JobBook`]): each profile is a job that can be paused or frozen (new calls get a
//!   status naming the job; calls in flight finish or are ended, as chosen) and resumed, with
//!   counters and its recent calls for the control plane's stats and freeze snapshots.
//! - **The link** ([`spawn_link`]): a thread that owns the data plane's end of the two rings
//!   (`pnp-link`), hands commands to the data plane and sends what it answers and reports.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pnp_call::{Code, Status};
use pnp_config::Config;
use pnp_link::{CallRecord, Command, CommandEnvelope, Event, InFlight, JobMode, JobStats};

use crate::abort::CallAbort;
use crate::profiles::Profiles;

/// What governs new calls; swapped whole by a config apply.
#[derive(Debug)]
pub(crate) struct Live {
    /// 1 at start, +1 per applied config.
    pub(crate) version: u64,
    pub(crate) profiles: Profiles,
    pub(crate) max_message_size: usize,
    /// The config in force (for the next diff).
    pub(crate) config: Config,
    /// Its text, when it came from a file or the control plane.
    pub(crate) toml: Option<String>,
}

/// How many finished calls a job keeps for its freeze snapshot.
const RECENT_CALLS: usize = 64;

const RUNNING: u8 = 0;
const PAUSED: u8 = 1;
const FROZEN: u8 = 2;

/// Every job (profile) by name.
#[derive(Debug, Default)]
pub(crate) struct JobBook {
    jobs: RwLock<HashMap<String, Arc<JobEntry>>>,
}

impl JobBook {
    /// The job named `name`, made on first use.
    pub(crate) fn entry(&self, name: &str) -> Arc<JobEntry> {
        if let Some(entry) = self
            .jobs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
        {
            return entry.clone();
        }
        self.jobs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(JobEntry::new(name)))
            .clone()
    }

    /// Every job's counters.
    pub(crate) fn stats(&self, throughput: impl Fn(&str) -> f64) -> Vec<JobStats> {
        let jobs = self.jobs.read().unwrap_or_else(PoisonError::into_inner);
        let mut stats: Vec<JobStats> = jobs
            .values()
            .map(|job| JobStats {
                job: job.name.to_string(),
                mode: job.mode(),
                calls: job.calls.load(Ordering::Relaxed),
                non_ok: job.non_ok.load(Ordering::Relaxed),
                retries: job.retries.load(Ordering::Relaxed),
                active: job.active.load(Ordering::Relaxed),
                throughput: throughput(&job.name),
                transport: job.last_transport().map(str::to_owned),
            })
            .collect();
        stats.sort_by(|a, b| a.job.cmp(&b.job));
        stats
    }
}

/// One job: its mode, counters, calls in flight and recent calls.
#[derive(Debug)]
pub(crate) struct JobEntry {
    name: Arc<str>,
    mode: AtomicU8,
    reason: Mutex<String>,
    calls: AtomicU64,
    non_ok: AtomicU64,
    /// Retry attempts (counted by the guarded upstream).
    pub(crate) retries: AtomicU64,
    active: AtomicU64,
    next_call: AtomicU64,
    in_flight: Mutex<HashMap<u64, CallAbort>>,
    recent: Mutex<VecDeque<Recent>>,
    last_transport: Mutex<Option<&'static str>>,
}

impl JobEntry {
    fn new(name: &str) -> Self {
        Self {
            name: Arc::from(name),
            mode: AtomicU8::new(RUNNING),
            reason: Mutex::default(),
            calls: AtomicU64::new(0),
            non_ok: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            active: AtomicU64::new(0),
            next_call: AtomicU64::new(0),
            in_flight: Mutex::default(),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_CALLS)),
            last_transport: Mutex::default(),
        }
    }

    /// Whether it takes new calls.
    pub(crate) fn mode(&self) -> JobMode {
        match self.mode.load(Ordering::Acquire) {
            PAUSED => JobMode::Paused,
            FROZEN => JobMode::Frozen,
            _ => JobMode::Running,
        }
    }

    fn last_transport(&self) -> Option<&'static str> {
        *self
            .last_transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The status a new call gets while the job is paused or frozen. Paused: UNAVAILABLE (an
    /// operator's pause is temporary; clients may retry later). Frozen: FAILED_PRECONDITION
    /// (the job was stopped because it was failing; retrying would feed the storm).
    pub(crate) fn refusal(&self) -> Option<Status> {
        let mode = self.mode.load(Ordering::Acquire);
        if mode == RUNNING {
            return None;
        }
        let reason = self
            .reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Some(match mode {
            PAUSED => Status::new(
                Code::Unavailable,
                format!("pnp: job {} is paused by an operator: {reason}", self.name),
            ),
            _ => Status::new(
                Code::FailedPrecondition,
                format!("pnp: job {} is frozen: {reason}", self.name),
            ),
        })
    }

    /// Change the mode; with `end_in_flight`, the calls in flight end now with the new
    /// refusal status. Returns how many were ended.
    pub(crate) fn set_mode(&self, mode: JobMode, reason: &str, end_in_flight: bool) -> usize {
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = reason.to_owned();
        let value = match mode {
            JobMode::Running => RUNNING,
            JobMode::Paused => PAUSED,
            JobMode::Frozen => FROZEN,
        };
        self.mode.store(value, Ordering::Release);
        let Some(status) = self.refusal().filter(|_| end_in_flight) else {
            return 0;
        };
        let calls: Vec<CallAbort> = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for abort in &calls {
            abort.abort(status.clone());
        }
        calls.len()
    }

    /// A call of this job starts; it can be ended through `abort` while it runs.
    pub(crate) fn start(self: &Arc<Self>, path: &str, abort: CallAbort) -> JobCall {
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, abort);
        JobCall {
            job: self.clone(),
            id,
            path: path.into(),
            transport: "none",
            started: Instant::now(),
        }
    }

    /// The recent calls, oldest first.
    pub(crate) fn recent(&self) -> Vec<CallRecord> {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|r| CallRecord {
                at_unix_ms: r
                    .at
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                method: r.path.to_string(),
                code: r.code,
                message: r.message.clone().unwrap_or_default(),
                transport: r.transport.to_owned(),
                duration_ms: r.duration.as_secs_f64() * 1e3,
            })
            .collect()
    }
}

/// A finished call as a job keeps it (made into a [`CallRecord`] only for a snapshot).
#[derive(Debug)]
struct Recent {
    at: SystemTime,
    path: Box<str>,
    code: i32,
    /// The status message of a call that did not end OK.
    message: Option<String>,
    transport: &'static str,
    duration: Duration,
}

/// A call's place in its job: counted when it finishes, unregistered when dropped.
#[derive(Debug)]
pub(crate) struct JobCall {
    job: Arc<JobEntry>,
    id: u64,
    path: Box<str>,
    /// The transport that carries it.
    pub(crate) transport: &'static str,
    started: Instant,
}

impl JobCall {
    /// The call ended with `status`.
    pub(crate) fn finish(mut self, status: &Status) {
        let job = &self.job;
        job.calls.fetch_add(1, Ordering::Relaxed);
        let ok = status.code == Code::Ok;
        if !ok {
            job.non_ok.fetch_add(1, Ordering::Relaxed);
        }
        if self.transport != "none" {
            *job.last_transport
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(self.transport);
        }
        let record = Recent {
            at: SystemTime::now(),
            path: std::mem::take(&mut self.path),
            code: status.code.as_i32(),
            message: (!ok).then(|| status.message.to_string()),
            transport: self.transport,
            duration: self.started.elapsed(),
        };
        let mut recent = job.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() == RECENT_CALLS {
            recent.pop_front();
        }
        recent.push_back(record);
    }
}

impl Drop for JobCall {
    fn drop(&mut self) {
        self.job.active.fetch_sub(1, Ordering::Relaxed);
        self.job
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where the data plane's events go: the link thread, when there is a control plane link.
#[derive(Clone, Debug, Default)]
pub(crate) struct EventSink {
    tx: Option<std::sync::mpsc::Sender<Event>>,
}

impl EventSink {
    /// Send `event` to the control plane (nothing without a link).
    pub(crate) fn emit(&self, event: Event) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(event);
        }
    }
}

/// A command from the control plane, with the way to answer it.
pub(crate) type Incoming = (CommandEnvelope, tokio::sync::oneshot::Sender<Event>);

/// Open the data plane's end of the rings in `dir` and start the thread that owns it: commands
/// go to the returned receiver (each with a sender for its ack), events from the returned sink
/// go into the events ring. A control plane that attaches (or re-attaches) gets a resync: the
/// link asks the data plane for a [`Event::Hello`] by handing it a [`Command::Resync`].
pub(crate) fn spawn_link(
    dir: &Path,
) -> std::io::Result<(EventSink, tokio::sync::mpsc::Receiver<Incoming>)> {
    let mut side = pnp_link::DataSide::open(dir)
        .map_err(|e| std::io::Error::other(format!("control link in {}: {e}", dir.display())))?;
    let (events_tx, events_rx) = std::sync::mpsc::channel::<Event>();
    let (commands_tx, commands_rx) = tokio::sync::mpsc::channel::<Incoming>(64);
    let dir: PathBuf = dir.to_owned();
    std::thread::Builder::new()
        .name("pnp-link".into())
        .spawn(move || {
            let _ = side.control_restarted();
            let mut pending: Vec<tokio::sync::oneshot::Receiver<Event>> = Vec::new();
            // Acks are never dropped: one the ring has no room for waits here for the next turn.
            let mut unsent_acks: std::collections::VecDeque<Event> =
                std::collections::VecDeque::new();
            // When the last command came: for a while after one, and while acks are due, the
            // thread watches the commands ring closely; otherwise it sleeps on the data plane's
            // events and looks at the ring every `pnp_link::IDLE_LOOK`.
            let mut last_command: Option<Instant> = None;
            loop {
                let mut incoming = Vec::new();
                let mut first_event = None;
                let watching = !pending.is_empty()
                    || !unsent_acks.is_empty()
                    || last_command.is_some_and(|at| at.elapsed() < pnp_link::WATCH_AFTER_COMMAND);
                let command = if watching {
                    side.command_timeout(Duration::from_millis(5))
                } else {
                    match events_rx.recv_timeout(pnp_link::IDLE_LOOK) {
                        Ok(event) => first_event = Some(event),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        // Seen again below, where it ends the thread.
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
                    }
                    side.command_timeout(Duration::ZERO)
                };
                match command {
                    Ok(Some(command)) => {
                        last_command = Some(Instant::now());
                        incoming.push(command);
                    }
                    Ok(None) => {}
                    Err(pnp_link::LinkError::Decode { seq, reason }) => {
                        unsent_acks.push_back(Event::Ack {
                            seq,
                            ok: false,
                            message: format!("not a command: {reason}"),
                            detail: Some(serde_json::json!({ "code": "invalid_argument" })),
                        });
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "control link");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                // A control plane that (re-)attached hears the whole state, before the answers
                // to any command it sends.
                if side.control_restarted() {
                    incoming.insert(
                        0,
                        CommandEnvelope {
                            seq: 0,
                            command: Command::Resync,
                        },
                    );
                }
                for command in incoming {
                    let (ack_tx, ack_rx) = tokio::sync::oneshot::channel();
                    if commands_tx.blocking_send((command, ack_tx)).is_err() {
                        return; // the data plane is gone
                    }
                    pending.push(ack_rx);
                }
                // The acks that are ready, in order; their commands' events were sent before
                // them (below), so the control plane sees what a command did when it sees that
                // it was done.
                let mut ready = Vec::new();
                pending.retain_mut(|ack| match ack.try_recv() {
                    Ok(event) => {
                        ready.push(event);
                        false
                    }
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => true,
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed) => false,
                });
                let mut disconnected = false;
                loop {
                    let next = match first_event.take() {
                        Some(event) => Ok(event),
                        None => events_rx.try_recv(),
                    };
                    match next {
                        Ok(Event::Stats {
                            at_unix_ms, jobs, ..
                        }) => {
                            let dropped = side.dropped_events();
                            side.emit(&Event::Stats {
                                at_unix_ms,
                                jobs,
                                dropped_events: dropped,
                            });
                        }
                        Ok(event) => side.emit(&event),
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                            disconnected = true;
                            break;
                        }
                    }
                }
                unsent_acks.extend(ready);
                while let Some(ack) = unsent_acks.front() {
                    if !side.try_emit(ack) {
                        break;
                    }
                    unsent_acks.pop_front();
                }
                if disconnected && pending.is_empty() && unsent_acks.is_empty() {
                    return;
                }
            }
        })?;
    Ok((
        EventSink {
            tx: Some(events_tx),
        },
        commands_rx,
    ))
}

/// The stats event of the moment.
pub(crate) fn stats_event(jobs: Vec<JobStats>) -> Event {
    Event::Stats {
        at_unix_ms: unix_ms(),
        jobs,
        dropped_events: 0,
    }
}

/// The ack of command `seq`.
pub(crate) fn ack(
    seq: u64,
    outcome: Result<String, String>,
    detail: Option<serde_json::Value>,
) -> Event {
    match outcome {
        Ok(message) => Event::Ack {
            seq,
            ok: true,
            message,
            detail,
        },
        Err(message) => Event::Ack {
            seq,
            ok: false,
            message,
            detail,
        },
    }
}

/// What `in_flight` says about calls in flight.
pub(crate) fn ends_in_flight(in_flight: InFlight) -> bool {
    in_flight == InFlight::End
}

/// What applying a config did (or would do, for a dry run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigChange {
    /// The version now in force (unchanged by a dry run or a config without changes).
    pub version: u64,
    /// The differences from the config that was in force, one per line; empty when none.
    pub diff: Vec<String>,
    /// Whether it now governs new calls.
    pub applied: bool,
}

/// The sections a running data plane takes from a new config; the others need a restart.
const RESTART_SECTIONS: [&str; 7] = [
    "listener",
    "admin",
    "upstream",
    "cors",
    "resilience",
    "shutdown",
    "edge",
];

impl crate::ingress::Inner {
    /// Validate `toml` and, unless `dry_run`, make its profiles, routes, message limit and
    /// transport choices govern new calls: one swap, so a call sees the old config or the new
    /// one, never a mix, and calls in flight keep what they started with. A config that fails
    /// validation is refused with the reason; the one in force stays. Sections that need a
    /// restart (listener, upstream, …) are compared and reported, not applied.
    pub(crate) fn apply_config(&self, toml: &str, dry_run: bool) -> Result<ConfigChange, String> {
        let config = Config::from_toml(toml).map_err(|e| e.to_string())?;
        let profiles = Profiles::new(&config.jobs)?;
        self.negotiator.reconfigure(&config.jobs, false)?;
        let current = self.live();
        let diff = diff_configs(&current.config, &config);
        if dry_run || diff.iter().all(|line| line.starts_with("ignored")) {
            return Ok(ConfigChange {
                version: current.version,
                diff,
                applied: false,
            });
        }
        self.negotiator.reconfigure(&config.jobs, true)?;
        for name in config.jobs.profiles.keys() {
            self.jobs.entry(name);
        }
        let mut merged = current.config.clone();
        merged.jobs = config.jobs.clone();
        merged.limits.max_message_size = config.limits.max_message_size;
        let mut live = self.live.write().unwrap_or_else(PoisonError::into_inner);
        let version = live.version + 1;
        *live = Arc::new(Live {
            version,
            profiles,
            max_message_size: config.limits.max_message_size,
            config: merged,
            toml: Some(toml.to_owned()),
        });
        drop(live);
        tracing::info!(version, changes = diff.len(), "config applied");
        Ok(ConfigChange {
            version,
            diff,
            applied: true,
        })
    }
}

/// What differs between the config in force and a new one, as an operator reads it.
fn diff_configs(old: &Config, new: &Config) -> Vec<String> {
    let mut diff = Vec::new();
    for (name, profile) in &new.jobs.profiles {
        match old.jobs.profiles.get(name) {
            None => diff.push(format!("+ profile {name}")),
            Some(before) if before != profile => diff.push(format!("~ profile {name}")),
            Some(_) => {}
        }
    }
    for name in old.jobs.profiles.keys() {
        if !new.jobs.profiles.contains_key(name) {
            diff.push(format!("- profile {name}"));
        }
    }
    if old.jobs.routes != new.jobs.routes {
        diff.push(format!(
            "~ routes ({} → {})",
            old.jobs.routes.len(),
            new.jobs.routes.len()
        ));
    }
    if old.limits.max_message_size != new.limits.max_message_size {
        diff.push(format!(
            "~ limits.max_message_size {} → {}",
            old.limits.max_message_size, new.limits.max_message_size
        ));
    }
    let differs = [
        old.listener != new.listener,
        old.admin != new.admin,
        old.upstream != new.upstream,
        old.cors != new.cors,
        old.resilience != new.resilience,
        old.shutdown != new.shutdown,
        old.edge != new.edge,
    ];
    for (section, differs) in RESTART_SECTIONS.iter().zip(differs) {
        if differs {
            diff.push(format!("ignored (needs a restart): {section}"));
        }
    }
    diff
}

/// Carries out the control plane's commands, in order, and answers each.
pub(crate) async fn steer(
    inner: Arc<crate::ingress::Inner>,
    sink: EventSink,
    drain: tokio::sync::watch::Sender<Option<Duration>>,
    mut commands: tokio::sync::mpsc::Receiver<Incoming>,
) {
    while let Some((envelope, answer)) = commands.recv().await {
        let seq = envelope.seq;
        let event = carry_out(&inner, &sink, &drain, envelope.command);
        let event = match event {
            Ok((message, detail)) => ack(seq, Ok(message), detail),
            Err(refusal) => ack(
                seq,
                Err(refusal.message),
                Some(serde_json::json!({ "code": refusal.code })),
            ),
        };
        if seq == 0 {
            // A resync the link made itself: only its Hello goes out.
            continue;
        }
        let _ = answer.send(event);
    }
}

/// Why a command was not carried out, and the gRPC code the control plane answers with
/// (`not_found`, `invalid_argument`, `failed_precondition`).
struct Refusal {
    message: String,
    code: &'static str,
}

impl Refusal {
    fn invalid(message: String) -> Self {
        Self {
            message,
            code: "invalid_argument",
        }
    }
}

type Outcome = Result<(String, Option<serde_json::Value>), Refusal>;

fn carry_out(
    inner: &crate::ingress::Inner,
    sink: &EventSink,
    drain: &tokio::sync::watch::Sender<Option<Duration>>,
    command: Command,
) -> Outcome {
    let known = |job: &str| -> Result<Arc<JobEntry>, Refusal> {
        if inner.live().config.jobs.profiles.contains_key(job) {
            Ok(inner.jobs.entry(job))
        } else {
            Err(Refusal {
                message: format!("no job (profile) named `{job}`"),
                code: "not_found",
            })
        }
    };
    match command {
        Command::ApplyConfig { toml, dry_run } => {
            let change = inner
                .apply_config(&toml, dry_run)
                .map_err(Refusal::invalid)?;
            if change.applied {
                sink.emit(Event::ConfigApplied {
                    version: change.version,
                    summary: change.diff.join("; "),
                });
            }
            let message = match (change.applied, dry_run, change.diff.is_empty()) {
                (true, _, _) => format!("applied as version {}", change.version),
                (false, true, _) => "valid (dry run)".to_owned(),
                (false, false, true) => "no change".to_owned(),
                (false, false, false) => "nothing to apply without a restart".to_owned(),
            };
            Ok((
                message,
                Some(serde_json::json!({ "version": change.version, "diff": change.diff })),
            ))
        }
        Command::PauseJob { job, in_flight } => {
            let entry = known(&job)?;
            let ended = entry.set_mode(JobMode::Paused, "paused", ends_in_flight(in_flight));
            sink.emit(Event::JobMode {
                job: job.clone(),
                mode: JobMode::Paused,
                reason: "paused by an operator".into(),
            });
            tracing::info!(job, ended, "job paused");
            Ok((
                format!("job {job} paused; {ended} calls in flight ended"),
                None,
            ))
        }
        Command::ResumeJob { job } => {
            let entry = known(&job)?;
            entry.set_mode(JobMode::Running, "", false);
            sink.emit(Event::JobMode {
                job: job.clone(),
                mode: JobMode::Running,
                reason: "resumed".into(),
            });
            tracing::info!(job, "job resumed");
            Ok((format!("job {job} resumed"), None))
        }
        Command::FreezeJob { job, reason } => {
            let entry = known(&job)?;
            let ended = entry.set_mode(JobMode::Frozen, &reason, true);
            let recent = entry.recent();
            let transport_history = inner.negotiator.history(&job);
            sink.emit(Event::JobMode {
                job: job.clone(),
                mode: JobMode::Frozen,
                reason: reason.clone(),
            });
            sink.emit(Event::JobFrozen {
                job: job.clone(),
                reason: reason.clone(),
                recent: recent.clone(),
                transport_history: transport_history.clone(),
            });
            tracing::warn!(job, reason, ended, "job frozen");
            Ok((
                format!("job {job} frozen; {ended} calls in flight ended"),
                Some(serde_json::json!({
                    "recent": recent,
                    "transport_history": transport_history,
                })),
            ))
        }
        Command::OverrideTransport {
            job,
            force,
            forbid,
            clear,
        } => {
            let forbid: Vec<&str> = forbid.iter().map(String::as_str).collect();
            known(&job)?;
            let summary = inner
                .negotiator
                .override_job(&job, force.as_deref(), &forbid, clear)
                .map_err(Refusal::invalid)?;
            Ok((summary, None))
        }
        Command::Drain { grace_ms } => {
            let grace = Duration::from_millis(grace_ms);
            drain.send_replace(Some(grace));
            tracing::info!(?grace, "drain requested by the control plane");
            Ok((format!("draining with {grace_ms} ms of grace"), None))
        }
        Command::Resync => {
            let live = inner.live();
            sink.emit(Event::Hello {
                pid: std::process::id(),
                config_version: live.version,
                config_toml: live.toml.clone(),
                jobs: inner.jobs.stats(|job| inner.negotiator.throughput(job)),
            });
            Ok(("state sent".to_owned(), None))
        }
        Command::Snapshot { job } => {
            let entry = known(&job)?;
            Ok((
                format!("job {job}"),
                Some(serde_json::json!({
                    "mode": entry.mode(),
                    "recent": entry.recent(),
                    "transport_history": inner.negotiator.history(&job),
                })),
            ))
        }
    }
}

/// Sends every job's counters to the control plane each `every`, until `stop`.
pub(crate) fn spawn_stats(
    inner: Arc<crate::ingress::Inner>,
    sink: EventSink,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let jobs = inner.jobs.stats(|job| inner.negotiator.throughput(job));
            sink.emit(stats_event(jobs));
        }
    });
}
