//! Transport negotiation on the data path: which of the peer's transports carries each call.
//!
//! The upstream is one peer reachable over an ordered set of transports (`upstream.transports`:
//! HTTP/2, chunked HTTP/1.1, HTTP/3, UCX). Each profile lists the ones its calls may use and
//! the rules that move them (`[profiles.NAME.negotiation]`); the decisions are
//! `pnp_policy::negotiate`'s, this module holds the state and does the I/O:
//!
//! 1. [`Negotiator::plan`] (no I/O): folds the job's carried bytes into its throughput average
//!    and asks the profile's policy for the order to try, given which transports are healthy.
//!    A job here is a profile: the calls a route sends to it share one throughput average, one
//!    failure streak and one operator override.
//! 2. [`Negotiator::pick`]: each transport but the last of the order gets `budget` (500 ms by
//!    default) to be ready — connected, or connecting — before the call moves on to the next,
//!    its request still unread. A transport that was not ready is marked unhealthy, so later
//!    calls do not wait for it, and the prober re-tries it in the background with jittered
//!    back-off: a dead transport costs a few probes per second, never one per call.
//! 3. [`Negotiator::record`]: whether the transport carried the call feeds the job's failure
//!    streak. A call that is streaming is never moved; only new calls follow a switch.
//!
//! Visible: `x-pnp-transport` on every reply and `x-grpc-web-fallback: true` when a fallback
//! carried the call (ingress), `pnp_transport_selected_total{job,transport,reason}`,
//! `pnp_transport_health{transport}`, `pnp_job_throughput_bytes_per_second{job}`, and an
//! `info` event each time a job's transport changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use pnp_call::{Code, Status};
use pnp_config::{Jobs, SwitchRule};
use pnp_policy::backoff::Backoff;
use pnp_policy::negotiate::{Choice, Health, JobState, NegotiationPolicy, Reason, Rule, Slot};
use pnp_telemetry::{Counter, Metrics};
use pnp_transport::SharedTransport;

use crate::control::EventSink;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio_util::sync::CancellationToken;

/// How often the job throughput gauges are refreshed (and the prober looks at the clock when no
/// probe is due).
const TICK: Duration = Duration::from_millis(250);

/// Back-off between probes of a failed transport: 200 ms doubling to 5 s, jittered.
fn probe_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(5), 2.0)
        .unwrap_or_else(|_| Backoff::default())
}

/// Every profile of `jobs` as a plan over the peer's transports `names`.
fn build_profiles(
    names: &[&'static str],
    jobs: &Jobs,
) -> Result<HashMap<String, Arc<ProfilePlan>>, String> {
    let mut profiles = HashMap::new();
    for (name, profile) in &jobs.profiles {
        let n = &profile.negotiation;
        let key = format!("profiles.{name}.negotiation");
        let slot_of = |transport: &str| {
            names.iter().position(|n| *n == transport).ok_or_else(|| {
                format!(
                    "{key}: `{transport}` is not a transport of the upstream ({})",
                    names.join(", ")
                )
            })
        };
        let slots: Vec<usize> = match &n.transports {
            Some(list) => list.iter().map(|t| slot_of(t)).collect::<Result<_, _>>()?,
            None => (0..names.len()).collect(),
        };
        let profile_slot = |transport: &str| -> Result<Slot, String> {
            let peer_slot = slot_of(transport)?;
            slots
                .iter()
                .position(|s| *s == peer_slot)
                .ok_or_else(|| format!("{key}: `{transport}` is not in the profile's transports"))
        };
        let rules = n
            .rules
            .iter()
            .map(|rule| {
                Ok(match rule {
                    SwitchRule::ThroughputAbove { above, to } => Rule::Throughput {
                        above: *above as f64,
                        to: profile_slot(to)?,
                    },
                    SwitchRule::SizeAbove { above, to } => Rule::SizeHint {
                        above: *above,
                        to: profile_slot(to)?,
                    },
                    SwitchRule::Failures { failures } => Rule::FailureStreak {
                        failures: *failures,
                    },
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let policy =
            NegotiationPolicy::new(slots.len(), rules, n.hysteresis, n.window, n.return_after)
                .map_err(|e| format!("{key}: {e}"))?;
        profiles.insert(
            name.clone(),
            Arc::new(ProfilePlan {
                name: Arc::from(name.as_str()),
                policy,
                fixed: slots.len() == 1 && n.rules.is_empty(),
                counts_failures: n
                    .rules
                    .iter()
                    .any(|r| matches!(r, SwitchRule::Failures { .. })),
                selected: (0..names.len()).map(|_| Default::default()).collect(),
                slots,
                budget: n.budget,
                bytes: Arc::default(),
            }),
        );
    }
    Ok(profiles)
}

/// The peer's transports and every job's negotiation state.
pub(crate) struct Negotiator {
    /// The peer's transports; a peer slot indexes this.
    peer: Vec<SharedTransport>,
    /// The profiles' plans; swapped whole by [`Negotiator::reconfigure`].
    profiles: RwLock<HashMap<String, Arc<ProfilePlan>>>,
    /// Where switches and health changes are reported to the control plane.
    events: OnceLock<EventSink>,
    /// How long a background probe may wait for a transport to be ready: its own connect
    /// timeout and then some (no call waits for a probe).
    probe_timeout: Duration,
    state: Mutex<State>,
    metrics: Metrics,
    /// Wakes the prober when a transport was marked unhealthy.
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for Negotiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Negotiator")
            .field(
                "peer",
                &self
                    .peer
                    .iter()
                    .map(|t| t.kind().name())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// One profile's policy, its transports as peer slots, and its readiness budget.
#[derive(Debug)]
struct ProfilePlan {
    /// The profile's name: the job's name in labels and logs.
    name: Arc<str>,
    policy: NegotiationPolicy,
    /// The profile's slot `i` is the peer's `slots[i]`.
    slots: Vec<usize>,
    budget: Duration,
    /// Payload bytes the job carried since they were last folded into its throughput
    /// average: added to by its calls as messages pass, without taking the negotiator's lock.
    bytes: Arc<AtomicU64>,
    /// One transport and no rule: nothing to decide, so calls take no lock.
    fixed: bool,
    /// The profile has a failure-streak rule (else outcomes need no recording).
    counts_failures: bool,
    /// `pnp_transport_selected_total` series of this job, by peer slot and reason, made on
    /// first use.
    selected: Vec<[OnceLock<Counter>; REASONS]>,
}

/// Every [`Reason`], in the order of the `selected` counters.
const REASONS: usize = 6;

fn reason_index(reason: Reason) -> usize {
    match reason {
        Reason::Default => 0,
        Reason::Throughput => 1,
        Reason::SizeHint => 2,
        Reason::FailureStreak => 3,
        Reason::Fallback => 4,
        Reason::Forced => 5,
    }
}

struct State {
    health: Health,
    rng: ChaCha8Rng,
    jobs: HashMap<Arc<str>, Job>,
}

struct Job {
    state: JobState,
    /// The peer slot the job's last call (not moved by a size hint) went to.
    current: Option<usize>,
    /// Its recent transport switches, oldest first.
    history: std::collections::VecDeque<String>,
}

/// How many transport switches a job remembers (for a freeze snapshot).
const HISTORY: usize = 16;

impl Job {
    fn new(now: Instant) -> Self {
        Self {
            state: JobState::new(now),
            current: None,
            history: std::collections::VecDeque::new(),
        }
    }

    fn switched(&mut self, from: &str, to: &str, reason: Reason) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history
            .push_back(format!("{from} → {to} ({})", reason.as_str()));
    }
}

fn switch_event(job: &str, from: &str, to: &str, reason: Reason) -> pnp_link::Event {
    pnp_link::Event::TransportSwitched {
        job: job.to_owned(),
        from: from.to_owned(),
        to: to.to_owned(),
        reason: reason.as_str().to_owned(),
    }
}

/// What [`Negotiator::plan`] decided for one call.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The profile's plan the choice was made from (its selection counters).
    profile: Option<Arc<ProfilePlan>>,
    job: Arc<str>,
    /// Peer slots, best first.
    order: Vec<usize>,
    reason: Reason,
    budget: Duration,
    bytes: Arc<AtomicU64>,
}

impl Plan {
    /// The transport the call is expected to go over (before readiness is known).
    pub(crate) fn first_name(&self, negotiator: &Negotiator) -> &'static str {
        self.order
            .first()
            .and_then(|s| negotiator.peer.get(*s))
            .map_or("none", |t| t.kind().name())
    }
}

/// The transport that carries a call.
#[derive(Clone, Debug)]
pub(crate) struct Picked {
    pub(crate) transport: SharedTransport,
    /// `x-pnp-transport`, the `transport` label.
    pub(crate) name: &'static str,
    /// Why this transport (the `reason` label).
    pub(crate) reason: Reason,
    /// A fallback carries the call: the transport the rules wanted was unhealthy or not ready.
    pub(crate) fallback: bool,
    /// The job's carried-bytes counter, for the call's messages to add to.
    pub(crate) bytes: Arc<AtomicU64>,
    job: Arc<str>,
    peer: usize,
}

impl Negotiator {
    /// The negotiator for `peer` (the upstream's transports in order) and every profile of
    /// `jobs`; `connect_timeout` bounds the transports' own connection attempts. Fails when a
    /// profile names a transport the peer does not have.
    pub(crate) fn new(
        peer: Vec<SharedTransport>,
        jobs: &Jobs,
        metrics: Metrics,
        connect_timeout: Duration,
    ) -> Result<Arc<Self>, String> {
        if peer.is_empty() {
            return Err("the upstream has no transport".into());
        }
        let names: Vec<&'static str> = peer.iter().map(|t| t.kind().name()).collect();
        let profiles = build_profiles(&names, jobs)?;
        for name in &names {
            metrics.set_transport_health(name, true);
        }
        Ok(Arc::new(Self {
            state: Mutex::new(State {
                health: Health::new(peer.len(), probe_backoff()),
                rng: ChaCha8Rng::seed_from_u64(rand::random()),
                jobs: HashMap::new(),
            }),
            peer,
            profiles: RwLock::new(profiles),
            events: OnceLock::new(),
            probe_timeout: connect_timeout + Duration::from_secs(1),
            metrics,
            wake: tokio::sync::Notify::new(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn profile(&self, name: &str) -> Option<Arc<ProfilePlan>> {
        let profiles = self.profiles.read().unwrap_or_else(PoisonError::into_inner);
        profiles
            .get(name)
            .or_else(|| profiles.get(pnp_config::DEFAULT_PROFILE))
            .cloned()
    }

    /// Check `jobs`' negotiation settings against the peer's transports; with `apply`, make them
    /// govern new calls (calls in flight keep their transport). A job whose transports changed
    /// starts afresh (its throughput average, failure streak and overrides are dropped).
    pub(crate) fn reconfigure(&self, jobs: &Jobs, apply: bool) -> Result<(), String> {
        let names: Vec<&'static str> = self.peer.iter().map(|t| t.kind().name()).collect();
        let fresh = build_profiles(&names, jobs)?;
        if !apply {
            return Ok(());
        }
        let mut profiles = self
            .profiles
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut state = self.lock();
        state.jobs.retain(|name, _| {
            matches!(
                (profiles.get(&**name), fresh.get(&**name)),
                (Some(old), Some(new)) if old.slots == new.slots
            )
        });
        *profiles = fresh;
        Ok(())
    }

    /// Report switches and health changes to `sink` from now on.
    pub(crate) fn set_events(&self, sink: EventSink) {
        let _ = self.events.set(sink);
    }

    fn emit(&self, event: pnp_link::Event) {
        if let Some(sink) = self.events.get() {
            sink.emit(event);
        }
    }

    /// The recent transport switches of `job`, oldest first.
    pub(crate) fn history(&self, job: &str) -> Vec<String> {
        self.lock()
            .jobs
            .get(job)
            .map(|j| j.history.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The throughput average of `job`, bytes per second.
    pub(crate) fn throughput(&self, job: &str) -> f64 {
        self.lock()
            .jobs
            .get(job)
            .map_or(0.0, |j| j.state.throughput(Instant::now()))
    }

    /// The transports to try for a new call of profile `job` whose size hint is `size_hint`.
    pub(crate) fn plan(&self, job: &str, size_hint: Option<u64>) -> Plan {
        let Some(profile) = self.profile(job) else {
            // Config always has the default profile; this keeps a call going regardless.
            return Plan {
                profile: None,
                job: Arc::from(job),
                order: (0..self.peer.len()).collect(),
                reason: Reason::Default,
                budget: Duration::from_millis(500),
                bytes: Arc::default(),
            };
        };
        if profile.fixed {
            return Plan {
                job: profile.name.clone(),
                order: profile.slots.clone(),
                reason: Reason::Default,
                budget: profile.budget,
                bytes: profile.bytes.clone(),
                profile: Some(profile),
            };
        }
        let now = Instant::now();
        let mut guard = self.lock();
        let State { health, jobs, .. } = &mut *guard;
        let job = &profile.name;
        let entry = jobs.entry(job.clone()).or_insert_with(|| Job::new(now));
        let carried = profile.bytes.swap(0, Ordering::Relaxed);
        profile.policy.observe(&mut entry.state, carried, now);
        let healthy = |slot: Slot| {
            profile
                .slots
                .get(slot)
                .is_none_or(|peer| health.is_healthy(*peer))
        };
        let Choice { order, reason } =
            profile
                .policy
                .choose(&mut entry.state, size_hint, &healthy, now);
        let order: Vec<usize> = order
            .into_iter()
            .filter_map(|slot| profile.slots.get(slot).copied())
            .collect();
        if reason != Reason::SizeHint {
            let first = order.first().copied();
            if first != entry.current {
                if let (Some(from), Some(to)) = (entry.current, first) {
                    let (from, to) = (self.peer[from].kind().name(), self.peer[to].kind().name());
                    tracing::info!(
                        job = %job,
                        from,
                        to,
                        reason = reason.as_str(),
                        throughput = entry.state.throughput(now),
                        "transport switch"
                    );
                    entry.switched(from, to, reason);
                    self.emit(switch_event(job, from, to, reason));
                }
                entry.current = first;
            }
        }
        let plan = Plan {
            job: job.clone(),
            order,
            reason,
            budget: profile.budget,
            bytes: profile.bytes.clone(),
            profile: None,
        };
        drop(guard);
        Plan {
            profile: Some(profile),
            ..plan
        }
    }

    /// The first transport of `plan` that is ready within the plan's budget; the last one is
    /// taken without waiting (the call's own connect timeout bounds it). Fails only when the
    /// plan is empty (every transport forbidden).
    pub(crate) async fn pick(&self, plan: Plan) -> Result<Picked, Status> {
        let mut skipped: Vec<String> = Vec::new();
        let last = plan.order.len().saturating_sub(1);
        for (i, &peer) in plan.order.iter().enumerate() {
            let transport = &self.peer[peer];
            let name = transport.kind().name();
            if i < last {
                let outcome = tokio::time::timeout(plan.budget, transport.ready()).await;
                let why = match outcome {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.status.message.to_string()),
                    Err(_) => Some(format!("not ready within {} ms", plan.budget.as_millis())),
                };
                if let Some(why) = why {
                    tracing::info!(
                        job = %plan.job,
                        transport = name,
                        reason = %why,
                        "transport skipped; trying the next"
                    );
                    self.failed(peer);
                    skipped.push(format!("{name}: {why}"));
                    continue;
                }
            }
            let fell_back = !skipped.is_empty();
            let reason = if fell_back {
                Reason::Fallback
            } else {
                plan.reason
            };
            if fell_back {
                tracing::info!(
                    job = %plan.job,
                    to = name,
                    skipped = %skipped.join("; "),
                    "transport fallback"
                );
            }
            self.count_selected(plan.profile.as_deref(), peer, reason);
            return Ok(Picked {
                transport: transport.clone(),
                name,
                reason,
                fallback: matches!(reason, Reason::Fallback | Reason::FailureStreak),
                bytes: plan.bytes,
                job: plan.job,
                peer,
            });
        }
        Err(Status::new(
            Code::Unavailable,
            format!(
                "pnp: no transport to the upstream may carry job {} (all forbidden)",
                plan.job
            ),
        ))
    }

    /// Count the choice in the profile's `pnp_transport_selected_total` series (made on first
    /// use): the plan carries the profile, so no lookup is made per call.
    fn count_selected(&self, profile: Option<&ProfilePlan>, peer: usize, reason: Reason) {
        let Some(profile) = profile else {
            return;
        };
        let Some(cells) = profile.selected.get(peer) else {
            return;
        };
        cells[reason_index(reason)]
            .get_or_init(|| {
                self.metrics.transport_selected_counter(
                    &profile.name,
                    self.peer[peer].kind().name(),
                    reason.as_str(),
                )
            })
            .inc();
    }

    /// The call `picked` was for ended before a reply (`carried == false`: the transport
    /// failed it — could not connect, was reset, lost its connection) or got one.
    pub(crate) fn record(&self, picked: &Picked, carried: bool) {
        let Some(profile) = self.profile(&picked.job).filter(|p| p.counts_failures) else {
            return;
        };
        let Some(slot) = profile.slots.iter().position(|s| *s == picked.peer) else {
            return;
        };
        let now = Instant::now();
        let mut state = self.lock();
        let Some(job) = state.jobs.get_mut(&picked.job) else {
            return;
        };
        if let Some(next) = profile.policy.record(&mut job.state, slot, carried, now) {
            let to = profile.slots[next];
            let to_name = self.peer[to].kind().name();
            tracing::info!(
                job = %picked.job,
                from = picked.name,
                to = to_name,
                reason = Reason::FailureStreak.as_str(),
                "transport switch"
            );
            job.current = Some(to);
            job.switched(picked.name, to_name, Reason::FailureStreak);
            self.emit(switch_event(
                &picked.job,
                picked.name,
                to_name,
                Reason::FailureStreak,
            ));
        }
    }

    /// Mark a peer transport unhealthy (until a probe finds it ready again).
    fn failed(&self, peer: usize) {
        let now = Instant::now();
        let mut guard = self.lock();
        let State { health, rng, .. } = &mut *guard;
        let was_healthy = health.is_healthy(peer);
        health.failed(peer, now, rng);
        drop(guard);
        if was_healthy {
            let name = self.peer[peer].kind().name();
            tracing::warn!(
                transport = name,
                "transport unhealthy; probing it in the background"
            );
            self.metrics.set_transport_health(name, false);
            self.emit(pnp_link::Event::TransportHealth {
                transport: name.to_owned(),
                healthy: false,
            });
            self.wake.notify_one();
        }
    }

    /// Probes failed transports when their back-off allows and refreshes the throughput
    /// gauges, until `stop`.
    pub(crate) fn spawn_prober(self: &Arc<Self>, stop: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let next = this.lock().health.next_probe();
                let wait = match next {
                    Some(at) => at.saturating_duration_since(Instant::now()).min(TICK),
                    None => TICK,
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = this.wake.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                }
                let now = Instant::now();
                while let Some(peer) = this.lock().health.probe_due(now) {
                    let this = this.clone();
                    tokio::spawn(async move { this.probe(peer).await });
                }
                this.refresh_gauges(now);
            }
        });
    }

    async fn probe(&self, peer: usize) {
        let transport = &self.peer[peer];
        let name = transport.kind().name();
        // A probe may take longer than a call's budget: a slow handshake (a lossy path) still
        // brings the transport back.
        let ready = matches!(
            tokio::time::timeout(self.probe_timeout, transport.ready()).await,
            Ok(Ok(()))
        );
        let now = Instant::now();
        let mut guard = self.lock();
        let State { health, rng, .. } = &mut *guard;
        if ready {
            health.succeeded(peer);
            drop(guard);
            tracing::info!(transport = name, "transport healthy again");
            self.metrics.set_transport_health(name, true);
            self.emit(pnp_link::Event::TransportHealth {
                transport: name.to_owned(),
                healthy: true,
            });
        } else {
            health.failed(peer, now, rng);
            drop(guard);
            tracing::debug!(transport = name, "transport probe failed");
        }
    }

    fn refresh_gauges(&self, now: Instant) {
        let profiles: Vec<Arc<ProfilePlan>> = self
            .profiles
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut state = self.lock();
        for profile in &profiles {
            let carried = profile.bytes.swap(0, Ordering::Relaxed);
            let job = state
                .jobs
                .entry(profile.name.clone())
                .or_insert_with(|| Job::new(now));
            profile.policy.observe(&mut job.state, carried, now);
            self.metrics
                .set_job_throughput(&profile.name, job.state.throughput(now));
        }
    }

    /// An operator's override for profile `job`: `force` one transport (every new call takes
    /// it, healthy or not), `forbid` some (new calls never take them), or `clear` both. Returns
    /// what now holds, or why the override was refused.
    pub(crate) fn override_job(
        &self,
        job: &str,
        force: Option<&str>,
        forbid: &[&str],
        clear: bool,
    ) -> Result<String, String> {
        let profile = self
            .profile(job)
            .filter(|p| *p.name == *job)
            .ok_or_else(|| format!("no profile named `{job}`"))?;
        let names: Vec<&'static str> = profile
            .slots
            .iter()
            .map(|s| self.peer[*s].kind().name())
            .collect();
        let slot = |transport: &str| {
            names.iter().position(|n| *n == transport).ok_or_else(|| {
                format!(
                    "`{transport}` is not a transport of profile {job} ({})",
                    names.join(", ")
                )
            })
        };
        let forced = force.map(slot).transpose()?;
        let forbidden = forbid
            .iter()
            .map(|t| slot(t))
            .collect::<Result<Vec<_>, _>>()?;
        if !clear && forbidden.len() == names.len() {
            return Err(format!(
                "forbidding every transport of {job} leaves its calls none"
            ));
        }
        let now = Instant::now();
        let mut state = self.lock();
        let entry = state
            .jobs
            .entry(profile.name.clone())
            .or_insert_with(|| Job::new(now));
        if clear {
            entry.state.forced = None;
            entry.state.forbidden.clear();
        }
        if forced.is_some() {
            entry.state.forced = forced;
        }
        if !forbid.is_empty() {
            entry.state.forbidden = forbidden;
        }
        let summary = format!(
            "job {job}: forced {}, forbidden [{}]",
            entry.state.forced.map_or("none", |s| names[s]),
            entry
                .state
                .forbidden
                .iter()
                .map(|s| names[*s])
                .collect::<Vec<_>>()
                .join(", ")
        );
        drop(state);
        tracing::info!(job, force, ?forbid, clear, "transport override");
        Ok(summary)
    }

    /// What negotiation sees now, as JSON: each transport's health and estimate, each job's
    /// current transport, throughput and overrides.
    pub(crate) fn status(&self) -> serde_json::Value {
        let now = Instant::now();
        let state = self.lock();
        let transports: Vec<serde_json::Value> = self
            .peer
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let e = t.estimate();
                serde_json::json!({
                    "transport": t.kind().name(),
                    "healthy": state.health.is_healthy(i),
                    "head_latency_ms": e.head_latency.map(|d| d.as_secs_f64() * 1e3),
                    "rtt_ms": e.rtt.map(|d| d.as_secs_f64() * 1e3),
                    "bandwidth_bytes_per_second": e.bandwidth,
                    "calls": e.calls,
                    "failures": e.failures,
                })
            })
            .collect();
        let mut jobs: Vec<serde_json::Value> = Vec::new();
        for (name, job) in &state.jobs {
            let Some(profile) = self.profile(name) else {
                continue;
            };
            let named = |slot: usize| {
                profile
                    .slots
                    .get(slot)
                    .map_or("?", |s| self.peer[*s].kind().name())
            };
            jobs.push(serde_json::json!({
                "job": &**name,
                "transports": profile.slots.iter().map(|s| self.peer[*s].kind().name()).collect::<Vec<_>>(),
                "current": job.current.map(|s| self.peer[s].kind().name()),
                "throughput_bytes_per_second": job.state.throughput(now),
                "forced": job.state.forced.map(named),
                "forbidden": job.state.forbidden.iter().map(|s| named(*s)).collect::<Vec<_>>(),
            }));
        }
        jobs.sort_by(|a, b| a["job"].as_str().cmp(&b["job"].as_str()));
        serde_json::json!({ "transports": transports, "jobs": jobs })
    }
}
