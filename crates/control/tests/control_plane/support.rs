//! What the tests share: certificates made with rcgen, a fake data plane on real rings, and a
//! control plane on a loopback port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pnp_control::proto::control_client::ControlClient;
use pnp_control::{ClientTls, ControlOptions, ControlPlane, Identity, ServerTls};
use pnp_link::{CallRecord, Command, CommandEnvelope, DataSide, Event, JobMode, JobStats};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::Channel;

/// The name the valid client certificate carries (as `pnp certs dev` writes it).
pub(crate) const CLIENT_NAME: &str = "pnp-dev-client";

/// A CA that signs certificates.
pub(crate) struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    pub(crate) fn pem(&self) -> String {
        self.cert.pem()
    }

    fn sign(&self, names: &[&str], usage: ExtendedKeyUsagePurpose, expired: bool) -> Identity {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("x"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("signed");
        Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for localhost and 127.0.0.1.
    pub(crate) fn server(&self) -> Identity {
        self.sign(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            false,
        )
    }

    /// A client certificate for `name`.
    pub(crate) fn client(&self, name: &str) -> Identity {
        self.sign(&[name], ExtendedKeyUsagePurpose::ClientAuth, false)
    }

    /// A client certificate for `name` that expired in 2021.
    pub(crate) fn expired_client(&self, name: &str) -> Identity {
        self.sign(&[name], ExtendedKeyUsagePurpose::ClientAuth, true)
    }
}

/// The commands the fake data plane saw, and what it reports.
#[derive(Default)]
pub(crate) struct FakeState {
    pub(crate) jobs: Vec<JobStats>,
    pub(crate) commands: Vec<CommandEnvelope>,
    /// Never answer commands (the "data plane not answering" case).
    pub(crate) silent: bool,
    /// Fill the events ring with transport health events as fast as possible.
    pub(crate) flood: bool,
    /// Send the ack first and the command's events this much later (the real data plane may
    /// send an ack before the events).
    pub(crate) events_after_ack: Option<Duration>,
    /// Answer a freeze without its `JobFrozen` event.
    pub(crate) no_job_frozen: bool,
    /// Added to each job's counters before each Stats: (job, calls, non_ok, retries).
    pub(crate) per_tick: Vec<(String, u64, u64, u64)>,
}

/// A data plane stand-in: opens the data side of the link, answers every command the way the
/// real one is meant to, and emits Stats every 50 ms.
pub(crate) struct FakeDataPlane {
    pub(crate) state: Arc<Mutex<FakeState>>,
    pub(crate) emitted: Arc<AtomicU64>,
    /// Events the data side dropped because the events ring was full.
    pub(crate) dropped: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

pub(crate) fn job(name: &str) -> JobStats {
    JobStats {
        job: name.into(),
        mode: JobMode::Running,
        calls: 10,
        non_ok: 0,
        retries: 0,
        active: 1,
        throughput: 1024.0,
        transport: Some("h2".into()),
    }
}

impl FakeDataPlane {
    pub(crate) fn start(dir: &std::path::Path, jobs: Vec<JobStats>) -> FakeDataPlane {
        Self::start_with(
            dir,
            FakeState {
                jobs,
                ..FakeState::default()
            },
        )
    }

    pub(crate) fn start_with(dir: &std::path::Path, state: FakeState) -> FakeDataPlane {
        let side = DataSide::open(dir).expect("data side");
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let emitted = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            let (emitted, dropped) = (emitted.clone(), dropped.clone());
            std::thread::spawn(move || run(side, &state, &stop, &emitted, &dropped))
        };
        FakeDataPlane {
            state,
            emitted,
            dropped,
            stop,
            thread: Some(thread),
        }
    }

    pub(crate) fn commands(&self) -> Vec<Command> {
        self.state
            .lock()
            .expect("state")
            .commands
            .iter()
            .map(|c| c.command.clone())
            .collect()
    }
}

impl Drop for FakeDataPlane {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Emit an event that must not be lost (acks): retried while the ring is full.
fn emit_reliably(side: &mut DataSide, event: &Event) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dropped = side.dropped_events();
        side.emit(event);
        if side.dropped_events() == dropped || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn recent(job: &str) -> Vec<CallRecord> {
    (0..2)
        .map(|i| CallRecord {
            at_unix_ms: 1_700_000_000_000 + i,
            method: "/demo.llm.v1.Generator/Generate".into(),
            code: 14,
            message: format!("{job}: upstream reset"),
            transport: "h2".into(),
            duration_ms: 12.5,
        })
        .collect()
}

fn run(
    mut side: DataSide,
    state: &Mutex<FakeState>,
    stop: &AtomicBool,
    emitted: &AtomicU64,
    dropped: &AtomicU64,
) {
    let mut last_stats = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let flooding = state.lock().expect("state").flood;
        let command = if flooding {
            side.try_command()
        } else {
            side.command_timeout(Duration::from_millis(2))
        }
        .expect("commands ring");
        let mut state = state.lock().expect("state");
        if let Some(envelope) = command {
            state.commands.push(envelope.clone());
            if !state.silent {
                // The command's events first, then its ack (the contract: when the caller
                // hears the ack, the control plane's job table already shows the effect).
                let mut events = answer(&mut state, envelope);
                if let Some(delay) = state.events_after_ack {
                    emit_reliably(&mut side, &events.remove(0));
                    std::thread::sleep(delay);
                }
                events.rotate_left(1);
                for event in events {
                    emit_reliably(&mut side, &event);
                }
            }
        }
        if last_stats.elapsed() >= Duration::from_millis(50) {
            last_stats = Instant::now();
            let ticks = state.per_tick.clone();
            for (name, calls, non_ok, retries) in ticks {
                if let Some(job) = state.jobs.iter_mut().find(|j| j.job == name) {
                    job.calls += calls;
                    job.non_ok += non_ok;
                    job.retries += retries;
                }
            }
            let stats = Event::Stats {
                at_unix_ms: 0,
                jobs: state.jobs.clone(),
                dropped_events: side.dropped_events(),
            };
            side.emit(&stats);
        }
        if state.flood {
            for _ in 0..500 {
                side.emit(&Event::TransportHealth {
                    transport: "h3".into(),
                    healthy: false,
                });
                emitted.fetch_add(1, Ordering::Relaxed);
            }
            dropped.store(side.dropped_events(), Ordering::Relaxed);
        }
    }
}

fn ack(seq: u64, ok: bool, message: impl Into<String>, detail: Option<serde_json::Value>) -> Event {
    Event::Ack {
        seq,
        ok,
        message: message.into(),
        detail,
    }
}

fn set_mode(state: &mut FakeState, job: &str, mode: JobMode) -> bool {
    match state.jobs.iter_mut().find(|j| j.job == job) {
        Some(stats) => {
            stats.mode = mode;
            true
        }
        None => false,
    }
}

fn unknown(seq: u64, job: &str) -> Vec<Event> {
    vec![ack(
        seq,
        false,
        format!("unknown job {job:?}"),
        Some(serde_json::json!({"code": "not_found"})),
    )]
}

/// What the data plane answers to each command (the contract in the crate README): the ack
/// first in this list, then the events it causes (sent in the other order).
fn answer(state: &mut FakeState, envelope: CommandEnvelope) -> Vec<Event> {
    let seq = envelope.seq;
    match envelope.command {
        Command::ApplyConfig { toml, dry_run } => {
            if toml.contains("bogus") {
                return vec![ack(
                    seq,
                    false,
                    "unknown key `bogus` at line 1",
                    Some(serde_json::json!({"code": "invalid_argument"})),
                )];
            }
            let detail = serde_json::json!({
                "version": 2,
                "diff": ["~ profile chat"],
            });
            if dry_run {
                vec![ack(seq, true, "dry run: 1 change", Some(detail))]
            } else {
                vec![
                    ack(
                        seq,
                        true,
                        "config version 2 applied: 1 change",
                        Some(detail),
                    ),
                    Event::ConfigApplied {
                        version: 2,
                        summary: "1 change".into(),
                    },
                ]
            }
        }
        Command::PauseJob { job, in_flight } => {
            if !set_mode(state, &job, JobMode::Paused) {
                return unknown(seq, &job);
            }
            vec![
                ack(seq, true, format!("job {job} paused ({in_flight:?})"), None),
                Event::JobMode {
                    job,
                    mode: JobMode::Paused,
                    reason: "operator".into(),
                },
            ]
        }
        Command::ResumeJob { job } => {
            if !set_mode(state, &job, JobMode::Running) {
                return unknown(seq, &job);
            }
            vec![
                ack(seq, true, format!("job {job} resumed"), None),
                Event::JobMode {
                    job,
                    mode: JobMode::Running,
                    reason: "operator".into(),
                },
            ]
        }
        Command::FreezeJob { job, reason } => {
            if !set_mode(state, &job, JobMode::Frozen) {
                return unknown(seq, &job);
            }
            if state.no_job_frozen {
                return vec![
                    ack(seq, true, format!("job {job} frozen"), None),
                    Event::JobMode {
                        job,
                        mode: JobMode::Frozen,
                        reason,
                    },
                ];
            }
            vec![
                ack(seq, true, format!("job {job} frozen"), None),
                Event::JobMode {
                    job: job.clone(),
                    mode: JobMode::Frozen,
                    reason: reason.clone(),
                },
                Event::JobFrozen {
                    recent: recent(&job),
                    job,
                    reason,
                    transport_history: vec!["h3 -> h2 (failure_streak)".into()],
                },
            ]
        }
        Command::OverrideTransport {
            job,
            force,
            forbid,
            clear,
        } => {
            if !state.jobs.iter().any(|j| j.job == job) {
                return unknown(seq, &job);
            }
            vec![ack(
                seq,
                true,
                format!("job {job}: transports overridden"),
                Some(serde_json::json!({"force": force, "forbid": forbid, "clear": clear})),
            )]
        }
        Command::Drain { grace_ms } => {
            vec![ack(
                seq,
                true,
                format!("draining, {grace_ms} ms grace"),
                None,
            )]
        }
        Command::Resync => vec![
            ack(seq, true, "resynced", None),
            Event::Hello {
                pid: 4242,
                config_version: 1,
                config_toml: None,
                jobs: state.jobs.clone(),
            },
        ],
        Command::Snapshot { job } => {
            if !state.jobs.iter().any(|j| j.job == job) {
                return unknown(seq, &job);
            }
            vec![ack(
                seq,
                true,
                format!("{} recent calls", 2),
                Some(serde_json::json!({"job": job, "recent": recent(&job)})),
            )]
        }
    }
}

/// A CA, the control plane's certificates and a control plane on a loopback port.
pub(crate) struct Harness {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) ca: Ca,
    pub(crate) plane: ControlPlane,
    pub(crate) addr: SocketAddr,
}

impl Harness {
    pub(crate) fn link_dir(&self) -> PathBuf {
        self.dir.path().join("link")
    }

    pub(crate) fn snapshot_dir(&self) -> PathBuf {
        self.dir.path().join("snapshots")
    }

    /// A control plane with a fresh CA; `configure` adjusts the options.
    pub(crate) async fn start(configure: impl FnOnce(&mut ControlOptions)) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("link")).expect("link dir");
        Self::start_in(dir, configure).await
    }

    /// Like [`start`](Self::start), with a data plane already on the link: `before` runs
    /// with the link directory before the control plane starts.
    pub(crate) async fn start_after<T>(
        before: impl FnOnce(&std::path::Path) -> T,
        configure: impl FnOnce(&mut ControlOptions),
    ) -> (Harness, T) {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = dir.path().join("link");
        std::fs::create_dir_all(&link).expect("link dir");
        let value = before(&link);
        (Self::start_in(dir, configure).await, value)
    }

    async fn start_in(
        dir: tempfile::TempDir,
        configure: impl FnOnce(&mut ControlOptions),
    ) -> Harness {
        let ca = Ca::new("test CA");
        let tls = ServerTls {
            identity: ca.server(),
            client_ca_pem: ca.pem(),
            allowed_clients: Vec::new(),
        };
        let mut options = ControlOptions::new(
            dir.path().join("link"),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            tls,
        );
        options.snapshot_dir = Some(dir.path().join("snapshots"));
        options.ack_timeout = Duration::from_secs(5);
        configure(&mut options);
        let plane = ControlPlane::start(options).await.expect("control plane");
        let addr = plane.local_addr();
        Harness {
            dir,
            ca,
            plane,
            addr,
        }
    }

    /// Client TLS settings trusting this harness's CA, with `identity`.
    pub(crate) fn client_tls(&self, identity: Option<Identity>) -> ClientTls {
        ClientTls {
            ca_pem: self.ca.pem(),
            identity,
            server_name: "localhost".into(),
        }
    }

    /// A client with a valid certificate.
    pub(crate) async fn client(&self) -> ControlClient<Channel> {
        let tls = self.client_tls(Some(self.ca.client(CLIENT_NAME)));
        pnp_control::connect(&self.addr.to_string(), &tls)
            .await
            .expect("connect")
    }
}

/// Polls `check` every 10 ms until it is true or `within` passed.
pub(crate) async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
