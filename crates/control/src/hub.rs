//! The one thread that owns the [`ControlSide`] of the link: it sends commands and matches
//! their acknowledgements (by sequence number) to the callers waiting for them, reads every
//! event, keeps the job table, runs the freeze loop, writes freeze snapshots and fans all events
//! out to subscribers.
//!
//! It is a plain thread, not a tokio task: the ring is polled (a short spin, then sleeps of up
//! to 1 ms), which must not hold an executor thread. Each turn it takes every waiting command
//! request, then up to 256 events, so a flooded events ring never starves the
//! commands.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pnp_link::{CallRecord, Command, ControlSide, Event, JobMode, JobStats, LinkError};
use serde::Serialize;
use tokio::sync::{broadcast, oneshot};

use crate::freeze::{FreezeLoop, FreezeRule, Trip, WindowCounts};

/// Events read per turn before the command requests are looked at again.
const EVENTS_PER_TURN: usize = 256;
/// How often attachment, restarts, abandoned waiters and overdue freezes are checked.
const HOUSEKEEPING: Duration = Duration::from_millis(200);
/// Events kept for a slow subscriber before it misses some.
const BROADCAST_CAPACITY: usize = 4096;

/// How the hub runs.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// The link directory (the two rings).
    pub link_dir: PathBuf,
    /// The freeze rule; `None` turns the loop off.
    pub freeze: Option<FreezeRule>,
    /// Where freeze snapshots are written (`None`: only broadcast and logged).
    pub snapshot_dir: Option<PathBuf>,
    /// How long a command waits for its acknowledgement.
    pub ack_timeout: Duration,
    /// How long after the freeze rule sent a freeze the data plane's `JobFrozen` is waited for
    /// before the snapshot is written without the recent calls.
    pub job_frozen_wait: Duration,
}

impl HubOptions {
    /// Defaults: the default freeze rule, no snapshot directory, 5 s for an ack.
    pub fn new(link_dir: impl Into<PathBuf>) -> HubOptions {
        HubOptions {
            link_dir: link_dir.into(),
            freeze: Some(FreezeRule::default()),
            snapshot_dir: None,
            ack_timeout: Duration::from_secs(5),
            job_frozen_wait: Duration::from_secs(10),
        }
    }
}

/// A command the data plane carried out.
#[derive(Clone, Debug, PartialEq)]
pub struct Ack {
    /// Its sequence number.
    pub seq: u64,
    /// The data plane's message.
    pub message: String,
    /// More, by command.
    pub detail: Option<serde_json::Value>,
}

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No data plane has the rings open.
    #[error("no data plane attached to the link in {0}")]
    NotAttached(PathBuf),
    /// The data plane did not acknowledge the command in time.
    #[error("data plane not answering: no acknowledgement within {0:?}")]
    Timeout(Duration),
    /// The command could not be written (ring full or damaged).
    #[error("sending the command: {0}")]
    Link(#[from] LinkError),
    /// The data plane refused the command.
    #[error("{message}")]
    Refused {
        /// The command's sequence number.
        seq: u64,
        /// Why.
        message: String,
        /// The ack's detail.
        detail: Option<serde_json::Value>,
    },
    /// The control plane is stopping.
    #[error("the control plane is stopping")]
    Stopped,
}

/// Where a published event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The data plane.
    Data,
    /// The control plane itself.
    Control,
}

/// One event as subscribers get it: serialized once.
#[derive(Clone, Debug)]
pub struct Published {
    /// When the hub received or made it, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Where it came from.
    pub source: Source,
    /// Its `type`.
    pub kind: String,
    /// The whole event, JSON.
    pub json: String,
}

/// Events the control plane makes itself.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlEvent {
    /// The freeze rule tripped; a `FreezeJob` was sent.
    FreezeFired {
        /// The job.
        job: String,
        /// The reason sent.
        reason: String,
        /// Non-OK statuses in the error window.
        errors: u64,
        /// Retries in the retry window.
        retries: u64,
        /// The rule.
        rule: FreezeRule,
        /// The `FreezeJob` command's sequence number (`None`: it could not be sent).
        seq: Option<u64>,
    },
    /// A freeze snapshot was made (and written, when `path` is set).
    FreezeSnapshot {
        /// The file, if one was written.
        path: Option<String>,
        /// The snapshot.
        snapshot: FreezeSnapshot,
    },
    /// A data plane attached to the rings.
    DataPlaneAttached,
    /// The data plane closed the rings (it stopped or died).
    DataPlaneDetached,
    /// A new data plane process took over the events ring.
    DataPlaneRestarted,
}

/// What is kept of a frozen job: why, by what rule, and its recent calls.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FreezeSnapshot {
    /// The job (profile).
    pub job: String,
    /// Why it was frozen.
    pub reason: String,
    /// When the control plane learnt of the freeze, milliseconds since the Unix epoch.
    pub frozen_at_unix_ms: u64,
    /// Whether the freeze rule (rather than an operator) froze it.
    pub by_rule: bool,
    /// The rule, when it did.
    pub rule: Option<FreezeRule>,
    /// Non-OK statuses in the rule's error window when it tripped.
    pub errors_in_window: Option<u64>,
    /// Retries in the rule's retry window when it tripped.
    pub retries_in_window: Option<u64>,
    /// The `FreezeJob` command's sequence number, when the rule sent it.
    pub freeze_seq: Option<u64>,
    /// The job's recent calls, oldest first, as the data plane reported them.
    pub recent: Vec<CallRecord>,
    /// Its recent transport switches, oldest first.
    pub transport_history: Vec<String>,
    /// Anything unusual (the data plane sent no recent calls).
    pub note: Option<String>,
}

/// What the control plane knows of the data plane and its jobs.
#[derive(Clone, Debug, Default)]
pub struct JobTable {
    /// Every job, as the latest Stats or Hello reported it (modes updated by JobMode events).
    pub jobs: Vec<JobStats>,
    /// The freeze rule's window counts per job.
    pub windows: HashMap<String, WindowCounts>,
    /// A data plane has the events ring open.
    pub attached: bool,
    /// The data plane's pid, from its Hello.
    pub pid: Option<u32>,
    /// The config version in force.
    pub config_version: Option<u64>,
    /// When the jobs were last updated.
    pub updated: Option<Instant>,
    /// Events the data plane dropped.
    pub dropped_events: u64,
}

struct Request {
    command: Command,
    reply: oneshot::Sender<Result<Ack, CommandError>>,
}

struct State {
    table: Mutex<JobTable>,
    events: broadcast::Sender<Arc<Published>>,
    stop: AtomicBool,
}

impl State {
    fn table(&self) -> MutexGuard<'_, JobTable> {
        // A panic while holding the lock leaves a table that is still a table.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle on the hub thread; cheap to clone. The thread stops on [`Hub::shutdown`] or when
/// the last handle is dropped.
#[derive(Clone)]
pub struct Hub {
    requests: mpsc::Sender<Request>,
    state: Arc<State>,
    ack_timeout: Duration,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("ack_timeout", &self.ack_timeout)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// Opens the link's control side in `options.link_dir` and starts the hub thread. It sends
    /// [`Command::Resync`] as soon as a data plane is attached (now, or when one attaches or
    /// restarts).
    pub fn start(options: HubOptions) -> Result<Hub, LinkError> {
        let side = ControlSide::open(&options.link_dir)?;
        let (requests, receiver) = mpsc::channel();
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let state = Arc::new(State {
            table: Mutex::new(JobTable::default()),
            events,
            stop: AtomicBool::new(false),
        });
        let ack_timeout = options.ack_timeout;
        let worker = Worker::new(side, receiver, state.clone(), options);
        let thread = std::thread::Builder::new()
            .name("pnp-control-link".into())
            .spawn(move || worker.run())
            .map_err(|e| LinkError::Encode(format!("starting the link thread: {e}")))?;
        Ok(Hub {
            requests,
            state,
            ack_timeout,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// Sends `command` and waits for its acknowledgement.
    pub async fn command(&self, command: Command) -> Result<Ack, CommandError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { command, reply })
            .map_err(|_| CommandError::Stopped)?;
        match tokio::time::timeout(self.ack_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CommandError::Stopped),
            Err(_) => Err(CommandError::Timeout(self.ack_timeout)),
        }
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.state.events.subscribe()
    }

    /// A copy of the job table.
    pub fn jobs(&self) -> JobTable {
        self.state.table().clone()
    }

    /// Stops the thread and waits for it.
    pub fn shutdown(&self) {
        self.state.stop.store(true, Ordering::Release);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// A caller waiting for its command's ack.
struct Waiter {
    reply: oneshot::Sender<Result<Ack, CommandError>>,
    /// The job mode the command sets once acknowledged: the table shows it when the caller
    /// hears the ack, even when the data plane's `JobMode` event comes after the ack.
    sets_mode: Option<(String, JobMode)>,
}

/// What an internal command (not asked for by an API caller) was for.
enum Internal {
    Resync,
    Freeze { job: String },
}

struct PendingFreeze {
    trip: Trip,
    reason: String,
    seq: Option<u64>,
    /// When the freeze was sent.
    sent: Instant,
    /// Whether the data plane acknowledged it.
    acked: bool,
}

struct Worker {
    side: ControlSide,
    requests: mpsc::Receiver<Request>,
    state: Arc<State>,
    options: HubOptions,
    origin: Instant,
    waiters: HashMap<u64, Waiter>,
    internal: HashMap<u64, Internal>,
    freeze: Option<FreezeLoop>,
    pending_freezes: HashMap<String, PendingFreeze>,
    attached: bool,
    last_error_log: Option<Instant>,
}

impl Worker {
    fn new(
        side: ControlSide,
        requests: mpsc::Receiver<Request>,
        state: Arc<State>,
        options: HubOptions,
    ) -> Worker {
        Worker {
            side,
            requests,
            state,
            origin: Instant::now(),
            waiters: HashMap::new(),
            internal: HashMap::new(),
            freeze: options.freeze.map(FreezeLoop::new),
            pending_freezes: HashMap::new(),
            options,
            attached: false,
            last_error_log: None,
        }
    }

    fn run(mut self) {
        // Whatever epoch the events ring has now, a data plane attached now is asked for its
        // state.
        let _ = self.side.data_restarted();
        self.housekeeping(true);
        let mut last_housekeeping = Instant::now();
        let mut last_busy = Instant::now();
        while !self.state.stop.load(Ordering::Acquire) {
            let mut busy = false;
            loop {
                match self.requests.try_recv() {
                    Ok(request) => {
                        busy = true;
                        last_busy = Instant::now();
                        self.handle_request(request);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            for _ in 0..EVENTS_PER_TURN {
                match self.side.try_event() {
                    Ok(Some(event)) => {
                        busy = true;
                        self.dispatch(event);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.link_error(&e);
                        break;
                    }
                }
            }
            if last_housekeeping.elapsed() >= HOUSEKEEPING {
                last_housekeeping = Instant::now();
                self.housekeeping(false);
            }
            let awaiting = !self.waiters.is_empty() || !self.internal.is_empty();
            if !busy && (awaiting || last_busy.elapsed() < pnp_link::WATCH_AFTER_COMMAND) {
                // Commands in flight, or just were: wait for an event, at most 1 ms (the
                // latency a command request can see).
                match self.side.event_timeout(Duration::from_millis(1)) {
                    Ok(Some(event)) => self.dispatch(event),
                    Ok(None) => {}
                    Err(e) => {
                        self.link_error(&e);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            } else if !busy {
                // Idle: sleep until a command request comes (at once) or `IDLE_LOOK` passes, then
                // look at the events ring again (an idle control plane used 7 % of a core
                // polling it every millisecond).
                match self.requests.recv_timeout(pnp_link::IDLE_LOOK) {
                    Ok(request) => {
                        last_busy = Instant::now();
                        self.handle_request(request);
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        }
    }

    fn link_error(&mut self, error: &LinkError) {
        // A damaged record is skipped by the ring; say so, at most once a second.
        if self
            .last_error_log
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            tracing::warn!(%error, "reading the events ring");
            self.last_error_log = Some(Instant::now());
        }
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn handle_request(&mut self, request: Request) {
        if !self.side.data_attached() {
            let _ = request.reply.send(Err(CommandError::NotAttached(
                self.options.link_dir.clone(),
            )));
            return;
        }
        let sets_mode = match &request.command {
            Command::PauseJob { job, .. } => Some((job.clone(), JobMode::Paused)),
            Command::ResumeJob { job } => Some((job.clone(), JobMode::Running)),
            Command::FreezeJob { job, .. } => Some((job.clone(), JobMode::Frozen)),
            _ => None,
        };
        match self.side.send(request.command) {
            Ok(seq) => {
                let waiter = Waiter {
                    reply: request.reply,
                    sets_mode,
                };
                let _ = self.waiters.insert(seq, waiter);
            }
            Err(e) => {
                let _ = request.reply.send(Err(CommandError::Link(e)));
            }
        }
    }

    fn send_internal(&mut self, command: Command, purpose: Internal) -> Option<u64> {
        match self.side.send(command) {
            Ok(seq) => {
                let _ = self.internal.insert(seq, purpose);
                Some(seq)
            }
            Err(error) => {
                tracing::warn!(%error, "sending a command to the data plane");
                None
            }
        }
    }

    fn housekeeping(&mut self, first: bool) {
        let attached = self.side.data_attached();
        let restarted = self.side.data_restarted();
        if attached && (!self.attached || restarted) {
            let event = if restarted && !first && self.attached {
                ControlEvent::DataPlaneRestarted
            } else {
                ControlEvent::DataPlaneAttached
            };
            tracing::info!(event = ?event, "data plane attached: resyncing");
            self.publish_control(&event);
            let _ = self.send_internal(Command::Resync, Internal::Resync);
        } else if !attached && self.attached {
            tracing::warn!("data plane detached from the link");
            self.publish_control(&ControlEvent::DataPlaneDetached);
        }
        self.attached = attached;
        self.state.table().attached = attached;
        // Callers that gave up (timed out) no longer wait.
        self.waiters.retain(|_, waiter| !waiter.reply.is_closed());
        // Freezes sent long ago whose JobFrozen never came: snapshot what is known.
        let overdue: Vec<String> = self
            .pending_freezes
            .iter()
            .filter(|(_, p)| p.sent.elapsed() >= self.options.job_frozen_wait)
            .map(|(job, _)| job.clone())
            .collect();
        for job in overdue {
            if let Some(pending) = self.pending_freezes.remove(&job) {
                let mut snapshot = self.snapshot_of(&job, &pending.reason, Some(&pending));
                snapshot.note = Some(if pending.acked {
                    "the data plane acknowledged the freeze but sent no recent calls (no job_frozen event)".into()
                } else {
                    "the data plane did not acknowledge the freeze".into()
                });
                self.write_snapshot(snapshot);
            }
        }
    }

    fn dispatch(&mut self, event: Event) {
        self.publish_data(&event);
        match event {
            Event::Ack {
                seq,
                ok,
                message,
                detail,
            } => self.ack(seq, ok, message, detail),
            Event::Hello {
                pid,
                config_version,
                jobs,
                ..
            } => {
                {
                    let mut table = self.state.table();
                    table.pid = Some(pid);
                    table.config_version = Some(config_version);
                }
                self.jobs(jobs, None);
            }
            Event::Stats {
                jobs,
                dropped_events,
                ..
            } => self.jobs(jobs, Some(dropped_events)),
            Event::ConfigApplied { version, .. } => {
                self.state.table().config_version = Some(version);
            }
            Event::JobMode { job, mode, .. } => self.mode(&job, mode),
            Event::JobFrozen {
                job,
                reason,
                recent,
                transport_history,
            } => {
                self.mode(&job, JobMode::Frozen);
                let pending = self.pending_freezes.remove(&job);
                let mut snapshot = self.snapshot_of(&job, &reason, pending.as_ref());
                snapshot.recent = recent;
                snapshot.transport_history = transport_history;
                self.write_snapshot(snapshot);
            }
            Event::TransportSwitched { .. }
            | Event::TransportHealth { .. }
            | Event::BreakerChanged { .. } => {}
        }
    }

    fn ack(&mut self, seq: u64, ok: bool, message: String, detail: Option<serde_json::Value>) {
        if let Some(waiter) = self.waiters.remove(&seq) {
            if let (true, Some((job, mode))) = (ok, &waiter.sets_mode) {
                self.mode(job, *mode);
            }
            let result = if ok {
                Ok(Ack {
                    seq,
                    message,
                    detail,
                })
            } else {
                Err(CommandError::Refused {
                    seq,
                    message,
                    detail,
                })
            };
            let _ = waiter.reply.send(result);
            return;
        }
        match self.internal.remove(&seq) {
            Some(Internal::Resync) if !ok => {
                tracing::warn!(%message, "the data plane refused a resync")
            }
            Some(Internal::Freeze { job }) => {
                if ok {
                    self.mode(&job, JobMode::Frozen);
                    if let Some(pending) = self.pending_freezes.get_mut(&job) {
                        pending.acked = true;
                    }
                } else {
                    tracing::error!(%job, %message, "the data plane refused the freeze");
                    let _ = self.pending_freezes.remove(&job);
                }
            }
            _ => {}
        }
    }

    fn mode(&mut self, job: &str, mode: JobMode) {
        let now = self.now();
        if let Some(freeze) = &mut self.freeze {
            freeze.mode_changed(job, mode, now);
        }
        let mut table = self.state.table();
        if let Some(stats) = table.jobs.iter_mut().find(|s| s.job == job) {
            stats.mode = mode;
        }
    }

    fn jobs(&mut self, jobs: Vec<JobStats>, dropped_events: Option<u64>) {
        let now = self.now();
        let mut trips = Vec::new();
        let mut windows = HashMap::new();
        if let Some(freeze) = &mut self.freeze {
            trips = freeze.observe(now, &jobs);
            freeze.retain_jobs(&jobs);
            for stats in &jobs {
                let _ = windows.insert(stats.job.clone(), freeze.counts(&stats.job));
            }
        }
        {
            let mut table = self.state.table();
            table.jobs = jobs;
            table.windows = windows;
            table.updated = Some(Instant::now());
            if let Some(dropped) = dropped_events {
                table.dropped_events = dropped;
            }
        }
        for trip in trips {
            let reason = trip.reason();
            tracing::warn!(job = %trip.job, errors = trip.errors, retries = trip.retries, "freeze rule tripped: freezing the job");
            let seq = self.send_internal(
                Command::FreezeJob {
                    job: trip.job.clone(),
                    reason: reason.clone(),
                },
                Internal::Freeze {
                    job: trip.job.clone(),
                },
            );
            self.publish_control(&ControlEvent::FreezeFired {
                job: trip.job.clone(),
                reason: reason.clone(),
                errors: trip.errors,
                retries: trip.retries,
                rule: trip.rule,
                seq,
            });
            if seq.is_some() {
                let _ = self.pending_freezes.insert(
                    trip.job.clone(),
                    PendingFreeze {
                        trip,
                        reason,
                        seq,
                        sent: Instant::now(),
                        acked: false,
                    },
                );
            }
        }
    }

    fn snapshot_of(
        &self,
        job: &str,
        reason: &str,
        pending: Option<&PendingFreeze>,
    ) -> FreezeSnapshot {
        FreezeSnapshot {
            job: job.to_owned(),
            reason: reason.to_owned(),
            frozen_at_unix_ms: unix_ms(),
            by_rule: pending.is_some(),
            rule: pending.map(|p| p.trip.rule),
            errors_in_window: pending.map(|p| p.trip.errors),
            retries_in_window: pending.map(|p| p.trip.retries),
            freeze_seq: pending.and_then(|p| p.seq),
            recent: Vec::new(),
            transport_history: Vec::new(),
            note: None,
        }
    }

    fn write_snapshot(&mut self, snapshot: FreezeSnapshot) {
        let path = match &self.options.snapshot_dir {
            Some(dir) => match write_snapshot_file(dir, &snapshot) {
                Ok(path) => {
                    tracing::info!(job = %snapshot.job, path = %path.display(), "freeze snapshot written");
                    Some(path.display().to_string())
                }
                Err(error) => {
                    tracing::error!(job = %snapshot.job, %error, "writing the freeze snapshot");
                    None
                }
            },
            None => None,
        };
        self.publish_control(&ControlEvent::FreezeSnapshot { path, snapshot });
    }

    fn publish_data(&self, event: &Event) {
        if self.state.events.receiver_count() == 0 {
            return;
        }
        if let Ok(value) = serde_json::to_value(event) {
            self.publish(Source::Data, value);
        }
    }

    fn publish_control(&self, event: &ControlEvent) {
        if self.state.events.receiver_count() == 0 {
            return;
        }
        if let Ok(value) = serde_json::to_value(event) {
            self.publish(Source::Control, value);
        }
    }

    fn publish(&self, source: Source, value: serde_json::Value) {
        let kind = value
            .get("type")
            .and_then(|t| t.as_str())
            .unwrap_or("unknown")
            .to_owned();
        let _ = self.state.events.send(Arc::new(Published {
            at_unix_ms: unix_ms(),
            source,
            kind,
            json: value.to_string(),
        }));
    }
}

/// Writes `snapshot` as `<dir>/<job>-<unix ms>.json` (through a temporary file, so a reader
/// never sees half of it).
fn write_snapshot_file(dir: &Path, snapshot: &FreezeSnapshot) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let job: String = snapshot
        .job
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("{job}-{}.json", snapshot.frozen_at_unix_ms);
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let json = serde_json::to_vec_pretty(snapshot).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
