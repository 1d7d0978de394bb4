//! The link between pnp's control plane and its data plane (issue #14).
//!
//! The two planes are separate OS processes that share nothing but a directory holding two
//! [`pnp_ring`] rings (in Kubernetes an `emptyDir` with `medium: Memory`, locally `/dev/shm` or
//! any directory):
//!
//! | ring | writer | reader | carries |
//! |---|---|---|---|
//! | [`COMMANDS_RING`] | control plane | data plane | [`CommandEnvelope`]s: a sequence number and a [`Command`] |
//! | [`EVENTS_RING`] | data plane | control plane | [`Event`]s: an [`Event::Ack`] for every command, and what happened (transport switched, breaker changed, job paused or frozen, config applied) and periodic [`Event::Stats`] |
//!
//! Each record is one JSON document (small, and readable with `strings` when debugging).
//! Commands are acknowledged by sequence number; a command the data plane cannot parse is still
//! acknowledged, with `ok: false` and the reason. Neither side waits for the other: the data
//! plane keeps serving with its last good config when the control plane is gone, and a
//! restarted control plane re-attaches to the same rings (the ring's epoch tells the data plane
//! a new writer came) and sends [`Command::Resync`], which the data plane answers with an
//! [`Event::Hello`] carrying its whole state.
//!
//! Events are never allowed to block the data path: when the events ring is full (no control
//! plane reading), [`DataSide::emit`] drops the event and counts it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use pnp_ring::{OpenError, PushError, RecvError};

/// The commands ring's file name in the link directory.
pub const COMMANDS_RING: &str = "commands.ring";
/// The events ring's file name in the link directory.
pub const EVENTS_RING: &str = "events.ring";
/// Capacity of the commands ring: whole configs travel in it.
pub const COMMANDS_CAPACITY: usize = 1 << 20;
/// Capacity of the events ring: a few seconds of events and stats with nobody reading.
pub const EVENTS_CAPACITY: usize = 4 << 20;
/// How long after a command either end of the link keeps a close watch on its ring (short
/// waits that spin first); it does so too while acks are due.
pub const WATCH_AFTER_COMMAND: Duration = Duration::from_millis(500);
/// Otherwise an end sleeps on its own process's work (the data plane's events, the control
/// plane's command requests, which wake it at once) and looks at its ring this often: the
/// most an idle end adds to what comes up the ring. Polling every millisecond cost an idle
/// pnp 3 % (data plane) and 7 % (control plane) of a core.
pub const IDLE_LOOK: Duration = Duration::from_millis(10);

/// What a paused job does with the calls it has in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InFlight {
    /// They run to their end; only new calls are refused.
    #[default]
    Finish,
    /// They are ended now with the pause's status.
    End,
}

/// An instruction from the control plane to the data plane.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Validate `toml` (a whole pnp config) and, unless `dry_run`, make its profiles, routes,
    /// limits and transport choices govern new calls; calls in flight keep what they started
    /// with. The ack carries the differences from the config in force, or why it was refused.
    ApplyConfig {
        /// The config file's text.
        toml: String,
        /// Only validate and show the differences.
        dry_run: bool,
    },
    /// New calls of `job` (a profile) get UNAVAILABLE naming the job until it is resumed.
    PauseJob {
        /// The job (profile) name.
        job: String,
        /// What happens to its calls in flight.
        in_flight: InFlight,
    },
    /// Undo a pause or a freeze.
    ResumeJob {
        /// The job (profile) name.
        job: String,
    },
    /// Like a pause, with in-flight calls ended, for a job that is failing; the data plane
    /// answers with an [`Event::JobFrozen`] carrying the job's recent calls.
    FreezeJob {
        /// The job (profile) name.
        job: String,
        /// Why (shown in the status new calls get).
        reason: String,
    },
    /// Force or forbid transports for `job`, or clear its overrides.
    OverrideTransport {
        /// The job (profile) name.
        job: String,
        /// Every new call takes this transport (`h2`, `h1`, `h3`, `ucx`).
        force: Option<String>,
        /// New calls never take these.
        forbid: Vec<String>,
        /// Clear earlier overrides first.
        clear: bool,
    },
    /// Stop taking new calls and give those in flight `grace_ms` to finish, as on SIGTERM.
    Drain {
        /// Milliseconds.
        grace_ms: u64,
    },
    /// Send an [`Event::Hello`] with the whole state (after the control plane restarted).
    Resync,
    /// Send the recent calls of `job` (in the ack's `detail`).
    Snapshot {
        /// The job (profile) name.
        job: String,
    },
}

/// A command with its sequence number (from 1, continuing across control-plane restarts; 0
/// marks what the data plane's link makes itself, such as a resync when a control plane
/// attaches).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandEnvelope {
    /// Acknowledged by [`Event::Ack`] with the same number.
    pub seq: u64,
    /// The instruction.
    pub command: Command,
}

/// Whether a job takes new calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum JobMode {
    /// It does.
    #[default]
    Running,
    /// Paused by an operator.
    Paused,
    /// Frozen (by the alert → freeze loop or an operator).
    Frozen,
}

/// One job's counters as the data plane reports them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct JobStats {
    /// The job (profile) name.
    pub job: String,
    /// Whether it takes new calls.
    pub mode: JobMode,
    /// Calls finished since the data plane started.
    pub calls: u64,
    /// Of those, calls that ended with a status other than OK.
    pub non_ok: u64,
    /// Retry attempts made since the data plane started.
    pub retries: u64,
    /// Calls in flight.
    pub active: u64,
    /// Smoothed payload throughput, bytes per second.
    pub throughput: f64,
    /// The transport its last call took.
    pub transport: Option<String>,
}

/// One call as a job's snapshot keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// When it ended, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// `/package.Service/Method`.
    pub method: String,
    /// The gRPC status code it ended with.
    pub code: i32,
    /// The status message.
    pub message: String,
    /// The transport that carried it.
    pub transport: String,
    /// How long it took, milliseconds.
    pub duration_ms: f64,
}

/// Something the data plane tells the control plane.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The outcome of the command numbered `seq`.
    Ack {
        /// The command's sequence number.
        seq: u64,
        /// Whether it was carried out.
        ok: bool,
        /// What was done, or why not.
        message: String,
        /// More, by command: the config diff, a snapshot.
        detail: Option<serde_json::Value>,
    },
    /// The data plane's whole state: at its start and on [`Command::Resync`].
    Hello {
        /// Its process id.
        pid: u32,
        /// The version of the config in force (1 at start, +1 per applied config).
        config_version: u64,
        /// The config in force (TOML), if it came from a file or a command.
        config_toml: Option<String>,
        /// Every job's state.
        jobs: Vec<JobStats>,
    },
    /// A config now governs new calls.
    ConfigApplied {
        /// Its version.
        version: u64,
        /// What changed.
        summary: String,
    },
    /// A job's transport changed.
    TransportSwitched {
        /// The job (profile).
        job: String,
        /// The transport it left.
        from: String,
        /// The transport it took.
        to: String,
        /// Why (`throughput`, `failure_streak`, `fallback`, …).
        reason: String,
    },
    /// A transport became unhealthy, or healthy again.
    TransportHealth {
        /// `h2`, `h1`, `h3`, `ucx`.
        transport: String,
        /// Its new state.
        healthy: bool,
    },
    /// The upstream's circuit breaker changed state.
    BreakerChanged {
        /// The upstream.
        upstream: String,
        /// `closed`, `half_open`, `open`.
        state: String,
    },
    /// A job now refuses new calls, or takes them again.
    JobMode {
        /// The job (profile).
        job: String,
        /// Its mode.
        mode: JobMode,
        /// Why.
        reason: String,
    },
    /// A job was frozen; its recent calls, for the snapshot.
    JobFrozen {
        /// The job (profile).
        job: String,
        /// Why.
        reason: String,
        /// Its recent calls, oldest first.
        recent: Vec<CallRecord>,
        /// Its recent transport switches, oldest first (`from → to (reason)`).
        transport_history: Vec<String>,
    },
    /// Periodic counters.
    Stats {
        /// Milliseconds since the Unix epoch.
        at_unix_ms: u64,
        /// Every job.
        jobs: Vec<JobStats>,
        /// Events dropped so far because the events ring was full.
        dropped_events: u64,
    },
}

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A ring could not be opened.
    #[error("opening {path}: {source}")]
    Open {
        /// The ring file.
        path: PathBuf,
        /// Why.
        source: OpenError,
    },
    /// The ring has no room.
    #[error("ring full: {0}")]
    Push(#[from] PushError),
    /// The ring's contents are damaged.
    #[error("ring damaged: {0}")]
    Recv(#[from] RecvError),
    /// A record is not a message of this protocol.
    #[error("undecodable record {seq}: {reason}")]
    Decode {
        /// The command number the record would carry (its ring sequence number + 1).
        seq: u64,
        /// Why.
        reason: String,
    },
    /// A message could not be encoded.
    #[error("encoding: {0}")]
    Encode(String),
}

fn open_reader(dir: &Path, name: &str, capacity: usize) -> Result<pnp_ring::Reader, LinkError> {
    let path = dir.join(name);
    pnp_ring::Reader::create_or_open(&path, capacity)
        .map_err(|source| LinkError::Open { path, source })
}

fn open_writer(dir: &Path, name: &str, capacity: usize) -> Result<pnp_ring::Writer, LinkError> {
    let path = dir.join(name);
    pnp_ring::Writer::create_or_open(&path, capacity)
        .map_err(|source| LinkError::Open { path, source })
}

fn decode<T: for<'de> Deserialize<'de>>(record: &pnp_ring::Record) -> Result<T, LinkError> {
    serde_json::from_slice(&record.payload).map_err(|e| LinkError::Decode {
        seq: record.seq + 1,
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, LinkError> {
    serde_json::to_vec(message).map_err(|e| LinkError::Encode(e.to_string()))
}

/// The data plane's end: reads commands, writes events.
#[derive(Debug)]
pub struct DataSide {
    commands: pnp_ring::Reader,
    events: pnp_ring::Writer,
    dropped: u64,
    commands_epoch: u64,
}

impl DataSide {
    /// Open (creating if needed) the rings in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<DataSide, LinkError> {
        let dir = dir.as_ref();
        let commands = open_reader(dir, COMMANDS_RING, COMMANDS_CAPACITY)?;
        let events = open_writer(dir, EVENTS_RING, EVENTS_CAPACITY)?;
        Ok(DataSide {
            commands_epoch: commands.writer_epoch(),
            commands,
            events,
            dropped: 0,
        })
    }

    /// The next command, if one is waiting. A record that is no command is reported as
    /// [`LinkError::Decode`] (and consumed); the caller acks its sequence number as failed.
    pub fn try_command(&mut self) -> Result<Option<CommandEnvelope>, LinkError> {
        match self.commands.try_recv()? {
            None => Ok(None),
            Some(record) => decode(&record).map(Some),
        }
    }

    /// Waits up to `timeout` for the next command.
    pub fn command_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<CommandEnvelope>, LinkError> {
        match self.commands.recv_timeout(timeout)? {
            None => Ok(None),
            Some(record) => decode(&record).map(Some),
        }
    }

    /// Whether a new control plane attached since the last call (its writer epoch changed).
    pub fn control_restarted(&mut self) -> bool {
        let epoch = self.commands.writer_epoch();
        std::mem::replace(&mut self.commands_epoch, epoch) != epoch
    }

    /// Whether a control plane has the commands ring open now.
    pub fn control_attached(&self) -> bool {
        self.commands.is_writer_attached().unwrap_or(false)
    }

    /// Send `event`; dropped (and counted) when the events ring is full.
    pub fn emit(&mut self, event: &Event) {
        let Ok(bytes) = encode(event) else {
            self.dropped += 1;
            return;
        };
        if self.events.try_push(&bytes).is_err() {
            self.dropped += 1;
        }
    }

    /// Send `event` if the events ring has room; `false` (nothing sent, nothing counted) when
    /// it has none, for events that must not be lost (acks): the caller tries again later.
    pub fn try_emit(&mut self, event: &Event) -> bool {
        match encode(event) {
            Ok(bytes) => self.events.try_push(&bytes).is_ok(),
            // An event that cannot be encoded will not encode later either.
            Err(_) => {
                self.dropped += 1;
                true
            }
        }
    }

    /// Events dropped so far.
    pub fn dropped_events(&self) -> u64 {
        self.dropped
    }
}

/// The control plane's end: writes commands, reads events.
#[derive(Debug)]
pub struct ControlSide {
    commands: pnp_ring::Writer,
    events: pnp_ring::Reader,
    events_epoch: u64,
}

impl ControlSide {
    /// Open (creating if needed) the rings in `dir`. A control plane that re-attaches after a
    /// restart continues the command numbering where the last one stopped, and should send
    /// [`Command::Resync`].
    pub fn open(dir: impl AsRef<Path>) -> Result<ControlSide, LinkError> {
        let dir = dir.as_ref();
        let commands = open_writer(dir, COMMANDS_RING, COMMANDS_CAPACITY)?;
        let events = open_reader(dir, EVENTS_RING, EVENTS_CAPACITY)?;
        Ok(ControlSide {
            commands,
            events_epoch: events.writer_epoch(),
            events,
        })
    }

    /// Send `command`; returns the sequence number its [`Event::Ack`] will carry.
    pub fn send(&mut self, command: Command) -> Result<u64, LinkError> {
        // The ring's own record numbers (from 0) plus one are the command numbers: they
        // continue across a restart of the writer, so a number is never reused for another
        // command, and 0 is left for what the data plane's link makes itself.
        let seq = self.commands.next_seq() + 1;
        let bytes = encode(&CommandEnvelope { seq, command })?;
        let pushed = self.commands.try_push(&bytes)?;
        debug_assert_eq!(pushed + 1, seq);
        Ok(seq)
    }

    /// The next event, if one is waiting.
    pub fn try_event(&mut self) -> Result<Option<Event>, LinkError> {
        match self.events.try_recv()? {
            None => Ok(None),
            Some(record) => decode(&record).map(Some),
        }
    }

    /// Waits up to `timeout` for the next event.
    pub fn event_timeout(&mut self, timeout: Duration) -> Result<Option<Event>, LinkError> {
        match self.events.recv_timeout(timeout)? {
            None => Ok(None),
            Some(record) => decode(&record).map(Some),
        }
    }

    /// Whether a data plane has the events ring open now.
    pub fn data_attached(&self) -> bool {
        self.events.is_writer_attached().unwrap_or(false)
    }

    /// Whether a new data plane attached since the last call (its writer epoch changed): the
    /// control plane then sends [`Command::Resync`] to learn its state.
    pub fn data_restarted(&mut self) -> bool {
        let epoch = self.events.writer_epoch();
        std::mem::replace(&mut self.events_epoch, epoch) != epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_go_down_and_events_come_up_in_order_with_their_numbers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut data = DataSide::open(dir.path()).expect("data side");
        let mut control = ControlSide::open(dir.path()).expect("control side");
        let first = control
            .send(Command::PauseJob {
                job: "chat".into(),
                in_flight: InFlight::Finish,
            })
            .expect("send");
        let second = control.send(Command::Resync).expect("send");
        assert_eq!(second, first + 1);
        let got = data.try_command().expect("recv").expect("a command");
        assert_eq!(got.seq, first);
        assert!(matches!(got.command, Command::PauseJob { ref job, .. } if job == "chat"));
        let got = data.try_command().expect("recv").expect("a command");
        assert_eq!(
            got,
            CommandEnvelope {
                seq: second,
                command: Command::Resync
            }
        );
        assert!(data.try_command().expect("recv").is_none());

        data.emit(&Event::Ack {
            seq: first,
            ok: true,
            message: "paused".into(),
            detail: None,
        });
        match control.try_event().expect("recv") {
            Some(Event::Ack { seq, ok: true, .. }) => assert_eq!(seq, first),
            other => panic!("{other:?}"),
        }
        assert!(control.data_attached());
        assert!(data.control_attached());
    }

    #[test]
    fn a_restarted_control_plane_continues_the_numbering_and_is_noticed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut data = DataSide::open(dir.path()).expect("data side");
        assert!(!data.control_restarted());
        let mut control = ControlSide::open(dir.path()).expect("control side");
        assert!(data.control_restarted(), "the first control plane attached");
        let before = control.send(Command::Resync).expect("send");
        drop(control);
        assert!(!data.control_attached());
        let mut control = ControlSide::open(dir.path()).expect("re-attached");
        assert!(data.control_restarted());
        let after = control.send(Command::Resync).expect("send");
        assert!(after > before, "{after} after {before}");
        // And the other way round: a restarted data plane is noticed by the control plane.
        assert!(!control.data_restarted());
        drop(data);
        let mut data = DataSide::open(dir.path()).expect("data plane re-attached");
        assert!(control.data_restarted());
        assert!(!control.data_restarted());
        assert_eq!(
            data.try_command().expect("recv").map(|c| c.seq),
            Some(before)
        );
        assert_eq!(
            data.try_command().expect("recv").map(|c| c.seq),
            Some(after)
        );
    }

    #[test]
    fn events_without_a_reader_are_dropped_and_counted_never_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut data = DataSide::open(dir.path()).expect("data side");
        let big = Event::ConfigApplied {
            version: 1,
            summary: "x".repeat(64 * 1024),
        };
        for _ in 0..(EVENTS_CAPACITY / (64 * 1024) + 8) {
            data.emit(&big);
        }
        assert!(data.dropped_events() >= 8, "{}", data.dropped_events());
    }

    #[test]
    fn a_record_that_is_no_command_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut data = DataSide::open(dir.path()).expect("data side");
        let mut raw =
            pnp_ring::Writer::create_or_open(dir.path().join(COMMANDS_RING), COMMANDS_CAPACITY)
                .expect("raw writer");
        raw.try_push(b"{\"seq\": 1, \"command\": {\"type\": \"reboot\"}}")
            .expect("push");
        match data.try_command() {
            Err(LinkError::Decode { seq, .. }) => assert_eq!(seq, raw.next_seq()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn messages_keep_their_shape_in_json() {
        let json = serde_json::to_value(Command::OverrideTransport {
            job: "gradient-sync".into(),
            force: Some("h3".into()),
            forbid: vec![],
            clear: false,
        })
        .expect("json");
        assert_eq!(json["type"], "override_transport");
        assert_eq!(json["force"], "h3");
        let event: Event = serde_json::from_str(
            r#"{"type":"job_mode","job":"chat","mode":"frozen","reason":"alert"}"#,
        )
        .expect("event");
        assert_eq!(
            event,
            Event::JobMode {
                job: "chat".into(),
                mode: JobMode::Frozen,
                reason: "alert".into()
            }
        );
    }
}
