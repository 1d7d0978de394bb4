//! Transport negotiation: which of a peer's transports carries a job's next call.
//!
//! A profile lists the transports it may use, in order (slot 0 is its default), and the rules
//! that move a job between them (issue #13, the design notes' table):
//!
//! | rule | fires when | moves new calls to |
//! |---|---|---|
//! | [`Rule::Throughput`] | the job's smoothed throughput exceeds `above` bytes/s | `to`, and back once it falls below `above × (1 − hysteresis)` |
//! | [`Rule::SizeHint`] | the call's size hint exceeds `above` bytes | `to`, for that call |
//! | [`Rule::FailureStreak`] | `failures` consecutive failures of the job on its transport | the next transport in the list, until `return_after` has passed and the one it left is healthy |
//!
//! Transport health is shared by every job: a transport that failed is left out of every
//! choice (calls go to the next healthy one, reason [`Reason::Fallback`]) and is re-probed in
//! the background with jittered exponential back-off — [`Health::probe_due`] hands out at most
//! one probe per transport at a time, so a dead transport costs a few probes per second, not a
//! probe per call. A call already streaming is never moved: a [`Choice`] is made once, before a
//! call starts.
//!
//! Everything here is pure: time comes in as [`Instant`]s and randomness from the caller's RNG.

use std::time::{Duration, Instant};

use rand::Rng;

use crate::backoff::Backoff;
use crate::error::{check_nonzero, check_number};
use crate::PolicyError;

/// A transport's place in a profile's ordered list; 0 is the profile's default.
pub type Slot = usize;

/// A rule that moves a job between transports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rule {
    /// The job's smoothed throughput above `above` bytes per second moves it to `to`; it moves
    /// back once the throughput falls below `above × (1 − hysteresis)`.
    Throughput {
        /// Bytes per second.
        above: f64,
        /// Where the job goes.
        to: Slot,
    },
    /// A call whose size hint is above `above` bytes goes to `to`.
    SizeHint {
        /// Bytes.
        above: u64,
        /// Where the call goes.
        to: Slot,
    },
    /// After `failures` consecutive failures on its transport, the job moves to the next one.
    FailureStreak {
        /// Consecutive failures.
        failures: u32,
    },
}

/// Why a transport was chosen: the `reason` label of `pnp_transport_selected_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The profile's default.
    Default,
    /// The job's throughput crossed a [`Rule::Throughput`] threshold.
    Throughput,
    /// The call's size hint crossed a [`Rule::SizeHint`] threshold.
    SizeHint,
    /// The job failed over after a [`Rule::FailureStreak`].
    FailureStreak,
    /// The transport the rules chose is unhealthy; this is the next healthy one.
    Fallback,
    /// An operator forced this transport for the job.
    Forced,
}

impl Reason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Default => "default",
            Reason::Throughput => "throughput",
            Reason::SizeHint => "size_hint",
            Reason::FailureStreak => "failure_streak",
            Reason::Fallback => "fallback",
            Reason::Forced => "forced",
        }
    }
}

/// The transports to try for one call, best first, and why the first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// Slots in the order to try them: the chosen one, then the fallbacks.
    pub order: Vec<Slot>,
    /// Why `order[0]`.
    pub reason: Reason,
}

/// A profile's negotiation settings.
#[derive(Clone, Debug, PartialEq)]
pub struct NegotiationPolicy {
    slots: usize,
    rules: Vec<Rule>,
    hysteresis: f64,
    window: Duration,
    return_after: Duration,
}

impl NegotiationPolicy {
    /// `slots` transports (at least one) with `rules`. `hysteresis` is the fraction below a
    /// throughput threshold a job must fall to move back (0.2: 128 MB/s up, 102.4 MB/s down);
    /// `window` the time constant of the throughput average; `return_after` how long a job
    /// that failed over stays away from the transport it left.
    pub fn new(
        slots: usize,
        rules: Vec<Rule>,
        hysteresis: f64,
        window: Duration,
        return_after: Duration,
    ) -> Result<Self, PolicyError> {
        let slots_range = |value: u64| PolicyError::CountOutOfRange {
            field: "negotiation.transports",
            range: "1..",
            value,
        };
        if slots == 0 {
            return Err(slots_range(0));
        }
        check_number(
            "negotiation.hysteresis",
            "[0, 0.99]",
            hysteresis,
            0.0,
            false,
            0.99,
        )?;
        check_nonzero("negotiation.window", window)?;
        for rule in &rules {
            let to = match rule {
                Rule::Throughput { above, to } => {
                    check_number("negotiation.throughput", "> 0", *above, 0.0, true, f64::MAX)?;
                    *to
                }
                Rule::SizeHint { to, .. } => *to,
                Rule::FailureStreak { failures } => {
                    if *failures == 0 {
                        return Err(PolicyError::CountOutOfRange {
                            field: "negotiation.failures",
                            range: "1..",
                            value: 0,
                        });
                    }
                    0
                }
            };
            if to >= slots {
                // A rule naming a transport the profile does not list.
                return Err(PolicyError::CountOutOfRange {
                    field: "negotiation.rules.to",
                    range: "a transport of the profile",
                    value: to as u64,
                });
            }
        }
        Ok(Self {
            slots,
            rules,
            hysteresis,
            window,
            return_after,
        })
    }

    /// The transports of a new call of the job in `state`, whose size hint is `size_hint`;
    /// `healthy` says which of the profile's slots are taken to work (a [`Health`] of the peer,
    /// seen through the profile's list).
    pub fn choose(
        &self,
        state: &mut JobState,
        size_hint: Option<u64>,
        healthy: &dyn Fn(Slot) -> bool,
        now: Instant,
    ) -> Choice {
        let all: Vec<Slot> = (0..self.slots)
            .filter(|s| !state.forbidden.contains(s))
            .collect();
        if let Some(forced) = state.forced.filter(|s| *s < self.slots) {
            return Choice {
                order: vec![forced],
                reason: Reason::Forced,
            };
        }
        // Back from a fail-over once the transport left is healthy and time has passed.
        if let Some((left, at)) = state.failed_over {
            if healthy(left) && now.saturating_duration_since(at) >= self.return_after {
                state.failed_over = None;
                state.base = left;
            }
        }
        let (mut preferred, mut reason) = match state.failed_over {
            Some(_) => (state.base, Reason::FailureStreak),
            None => (state.base, Reason::Default),
        };
        let rate = state.throughput.rate(now);
        for rule in &self.rules {
            match *rule {
                Rule::Throughput { above, to } => {
                    let high = if state.high {
                        rate >= above * (1.0 - self.hysteresis)
                    } else {
                        rate > above
                    };
                    state.high = high;
                    if high {
                        preferred = to;
                        reason = Reason::Throughput;
                    }
                }
                Rule::SizeHint { above, to } => {
                    if size_hint.is_some_and(|hint| hint > above) {
                        preferred = to;
                        reason = Reason::SizeHint;
                        break;
                    }
                }
                Rule::FailureStreak { .. } => {}
            }
        }
        let mut order: Vec<Slot> = Vec::with_capacity(all.len());
        if all.contains(&preferred) {
            order.push(preferred);
        }
        order.extend(all.iter().copied().filter(|s| *s != preferred));
        let healthy: Vec<Slot> = order.iter().copied().filter(|s| healthy(*s)).collect();
        if healthy.is_empty() {
            // Every transport looks down: try them all in order rather than fail unasked.
            return Choice { order, reason };
        }
        if healthy.first() != order.first() {
            reason = Reason::Fallback;
        }
        Choice {
            order: healthy,
            reason,
        }
    }

    /// A call of the job on `slot` ended: `ok` when the transport carried it (whatever the
    /// upstream answered), not when the transport failed. Returns the slot the job moved to if
    /// this completed a failure streak.
    pub fn record(&self, state: &mut JobState, slot: Slot, ok: bool, now: Instant) -> Option<Slot> {
        if ok {
            if state.streak_on == slot {
                state.streak = 0;
            }
            return None;
        }
        if state.streak_on != slot {
            state.streak_on = slot;
            state.streak = 0;
        }
        state.streak += 1;
        let failures = self.rules.iter().find_map(|r| match r {
            Rule::FailureStreak { failures } => Some(*failures),
            _ => None,
        })?;
        if state.streak < failures || slot != state.base {
            return None;
        }
        let next = slot + 1;
        if next >= self.slots {
            return None;
        }
        state.streak = 0;
        state.failed_over = Some((state.failed_over.map_or(slot, |(left, _)| left), now));
        state.base = next;
        Some(next)
    }

    /// `bytes` of the job's payload were carried at `now`.
    pub fn observe(&self, state: &mut JobState, bytes: u64, now: Instant) {
        state.throughput.observe(bytes, now, self.window);
    }
}

/// One job's negotiation state.
#[derive(Clone, Debug)]
pub struct JobState {
    throughput: Ewma,
    /// Above a throughput threshold (hysteresis state).
    high: bool,
    /// The transport the rules start from: the default, or where a failure streak moved it.
    base: Slot,
    /// The transport a failure streak left, and when.
    failed_over: Option<(Slot, Instant)>,
    streak_on: Slot,
    streak: u32,
    /// An operator's override: always this transport.
    pub forced: Option<Slot>,
    /// An operator's override: never these.
    pub forbidden: Vec<Slot>,
}

impl JobState {
    /// A job seen first at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            throughput: Ewma::new(now),
            high: false,
            base: 0,
            failed_over: None,
            streak_on: 0,
            streak: 0,
            forced: None,
            forbidden: Vec::new(),
        }
    }

    /// The job's smoothed throughput at `now`, bytes per second.
    pub fn throughput(&self, now: Instant) -> f64 {
        self.throughput.rate(now)
    }
}

/// An exponentially weighted moving average of a byte rate, with time constant `window`: bytes
/// are gathered over ticks of a tenth of the window, each tick's rate folded in with weight
/// `1 − e^(−tick/window)`, and a rate read later decays as if nothing came since.
#[derive(Clone, Debug)]
struct Ewma {
    rate: f64,
    window: Duration,
    tick_start: Instant,
    tick_bytes: u64,
}

impl Ewma {
    fn new(now: Instant) -> Self {
        Self {
            rate: 0.0,
            window: Duration::from_secs(1),
            tick_start: now,
            tick_bytes: 0,
        }
    }

    fn fold(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.tick_start);
        if elapsed < self.window / 10 {
            return;
        }
        let secs = elapsed.as_secs_f64();
        let sample = self.tick_bytes as f64 / secs;
        let alpha = 1.0 - (-secs / self.window.as_secs_f64()).exp();
        self.rate += alpha * (sample - self.rate);
        self.tick_start = now;
        self.tick_bytes = 0;
    }

    fn observe(&mut self, bytes: u64, now: Instant, window: Duration) {
        self.window = window;
        self.fold(now);
        self.tick_bytes = self.tick_bytes.saturating_add(bytes);
    }

    fn rate(&self, now: Instant) -> f64 {
        let mut copy = self.clone();
        copy.fold(now);
        copy.rate
    }
}

/// The health of a peer's transports, shared by every job.
#[derive(Clone, Debug)]
pub struct Health {
    slots: Vec<SlotHealth>,
    backoff: Backoff,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum SlotHealth {
    Healthy,
    Unhealthy {
        failures: u32,
        next_probe: Instant,
        probing: bool,
    },
}

impl Health {
    /// `slots` healthy transports, re-probed after failures with `backoff`.
    pub fn new(slots: usize, backoff: Backoff) -> Self {
        Self {
            slots: vec![SlotHealth::Healthy; slots],
            backoff,
        }
    }

    /// Whether `slot` is taken to work.
    pub fn is_healthy(&self, slot: Slot) -> bool {
        matches!(self.slots.get(slot), Some(SlotHealth::Healthy) | None)
    }

    /// `slot` failed (could not connect, was not ready within the budget, broke): it is left out
    /// of choices until a probe succeeds; the next probe is due after a jittered back-off.
    pub fn failed<R: Rng + ?Sized>(&mut self, slot: Slot, now: Instant, rng: &mut R) {
        let Some(state) = self.slots.get_mut(slot) else {
            return;
        };
        let failures = match *state {
            SlotHealth::Healthy => 0,
            SlotHealth::Unhealthy { failures, .. } => failures.saturating_add(1),
        };
        *state = SlotHealth::Unhealthy {
            failures,
            next_probe: now
                + self
                    .backoff
                    .delay(failures, rng)
                    .max(Duration::from_millis(50)),
            probing: false,
        };
    }

    /// `slot` worked (a call or a probe succeeded).
    pub fn succeeded(&mut self, slot: Slot) {
        if let Some(state) = self.slots.get_mut(slot) {
            *state = SlotHealth::Healthy;
        }
    }

    /// A transport whose probe is due now, marked as being probed: the caller probes it and
    /// reports with [`succeeded`](Self::succeeded) or [`failed`](Self::failed). At most one
    /// probe per transport is out at a time.
    pub fn probe_due(&mut self, now: Instant) -> Option<Slot> {
        for (slot, state) in self.slots.iter_mut().enumerate() {
            if let SlotHealth::Unhealthy {
                next_probe,
                probing,
                ..
            } = state
            {
                if !*probing && now >= *next_probe {
                    *probing = true;
                    return Some(slot);
                }
            }
        }
        None
    }

    /// When the next probe falls due, if any transport is unhealthy and not being probed.
    pub fn next_probe(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| match s {
                SlotHealth::Unhealthy {
                    next_probe,
                    probing: false,
                    ..
                } => Some(*next_probe),
                _ => None,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const H2: Slot = 0;
    const UCX: Slot = 1;
    const QUIC: Slot = 2;
    const MB: f64 = 1e6;

    fn backoff() -> Backoff {
        Backoff::new(Duration::from_millis(200), Duration::from_secs(5), 2.0).expect("valid")
    }

    fn policy(rules: Vec<Rule>) -> NegotiationPolicy {
        NegotiationPolicy::new(
            3,
            rules,
            0.2,
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
        .expect("valid")
    }

    /// Feed `rate` bytes/s for `secs` seconds in 10 ms steps; returns the time reached.
    fn feed(
        p: &NegotiationPolicy,
        job: &mut JobState,
        from: Instant,
        rate: f64,
        secs: f64,
    ) -> Instant {
        let steps = (secs * 100.0) as u32;
        let mut now = from;
        for _ in 0..steps {
            now += Duration::from_millis(10);
            p.observe(job, (rate / 100.0) as u64, now);
        }
        now
    }

    #[test]
    fn settings_are_checked() {
        assert!(
            NegotiationPolicy::new(0, vec![], 0.2, Duration::from_secs(1), Duration::ZERO).is_err()
        );
        assert!(
            NegotiationPolicy::new(2, vec![], 1.0, Duration::from_secs(1), Duration::ZERO).is_err()
        );
        assert!(NegotiationPolicy::new(
            2,
            vec![Rule::SizeHint { above: 1, to: 2 }],
            0.2,
            Duration::from_secs(1),
            Duration::ZERO
        )
        .is_err());
        assert!(NegotiationPolicy::new(
            2,
            vec![Rule::FailureStreak { failures: 0 }],
            0.2,
            Duration::from_secs(1),
            Duration::ZERO
        )
        .is_err());
    }

    #[test]
    fn the_default_is_the_first_transport_then_the_others_in_order() {
        let p = policy(vec![]);
        let now = Instant::now();
        let health = Health::new(3, backoff());
        let choice = p.choose(
            &mut JobState::new(now),
            None,
            &|s| health.is_healthy(s),
            now,
        );
        assert_eq!(
            choice,
            Choice {
                order: vec![H2, UCX, QUIC],
                reason: Reason::Default
            }
        );
    }

    #[test]
    fn throughput_above_the_threshold_moves_the_job_and_hysteresis_keeps_it_from_flapping() {
        let p = policy(vec![Rule::Throughput {
            above: 128.0 * MB,
            to: UCX,
        }]);
        let health = Health::new(3, backoff());
        let start = Instant::now();
        let mut job = JobState::new(start);
        // 100 MB/s: stays on HTTP/2.
        let now = feed(&p, &mut job, start, 100.0 * MB, 5.0);
        assert_eq!(
            p.choose(&mut job, None, &|s| health.is_healthy(s), now)
                .order[0],
            H2
        );
        // 200 MB/s: within one window (time constant 1 s, 3 windows to settle) it moves.
        let mut now = now;
        let mut moved_after = None;
        for step in 1..=300 {
            now = feed(&p, &mut job, now, 200.0 * MB, 0.01);
            if p.choose(&mut job, None, &|s| health.is_healthy(s), now)
                .order[0]
                == UCX
            {
                moved_after = Some(step * 10);
                break;
            }
        }
        let moved_after = moved_after.expect("the job moved to UCX");
        assert!(moved_after <= 1_000, "moved after {moved_after} ms");
        // Hovering around the threshold (120-135 MB/s) never moves it back.
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..500 {
            let rate = rng.random_range(120.0..135.0) * MB;
            now = feed(&p, &mut job, now, rate, 0.01);
            let choice = p.choose(&mut job, None, &|s| health.is_healthy(s), now);
            assert_eq!(
                choice.order[0],
                UCX,
                "flapped at {} MB/s",
                job.throughput(now) / MB
            );
            assert_eq!(choice.reason, Reason::Throughput);
        }
        // Well below (50 MB/s): back to HTTP/2.
        let now = feed(&p, &mut job, now, 50.0 * MB, 5.0);
        assert_eq!(
            p.choose(&mut job, None, &|s| health.is_healthy(s), now)
                .order[0],
            H2
        );
    }

    #[test]
    fn a_size_hint_over_4_gb_selects_quic_for_that_call_only() {
        let p = policy(vec![Rule::SizeHint {
            above: 4_000_000_000,
            to: QUIC,
        }]);
        let health = Health::new(3, backoff());
        let now = Instant::now();
        let mut job = JobState::new(now);
        let big = p.choose(
            &mut job,
            Some(5_000_000_000),
            &|s| health.is_healthy(s),
            now,
        );
        assert_eq!((big.order[0], big.reason), (QUIC, Reason::SizeHint));
        assert_eq!(
            p.choose(&mut job, Some(1_000), &|s| health.is_healthy(s), now)
                .order[0],
            H2
        );
        assert_eq!(
            p.choose(&mut job, None, &|s| health.is_healthy(s), now)
                .order[0],
            H2
        );
    }

    #[test]
    fn three_consecutive_failures_move_a_job_to_the_next_transport_and_it_returns_later() {
        let p = policy(vec![Rule::FailureStreak { failures: 3 }]);
        let health = Health::new(3, backoff());
        let start = Instant::now();
        let mut job = JobState::new(start);
        // Two failures, a success, two failures: no streak of three.
        for ok in [false, false, true, false, false] {
            assert_eq!(p.record(&mut job, H2, ok, start), None);
        }
        assert_eq!(p.record(&mut job, H2, false, start), Some(UCX));
        let choice = p.choose(&mut job, None, &|s| health.is_healthy(s), start);
        assert_eq!(
            (choice.order[0], choice.reason),
            (UCX, Reason::FailureStreak)
        );
        // Failures of another job's transport or of a fallback do not stack up.
        assert_eq!(p.record(&mut job, QUIC, false, start), None);
        // After return_after, with HTTP/2 healthy, the job goes back.
        let later = start + Duration::from_secs(31);
        let choice = p.choose(&mut job, None, &|s| health.is_healthy(s), later);
        assert_eq!((choice.order[0], choice.reason), (H2, Reason::Default));
    }

    #[test]
    fn an_unhealthy_transport_is_skipped_for_the_next_healthy_one() {
        let p = policy(vec![Rule::SizeHint {
            above: 10,
            to: QUIC,
        }]);
        let mut health = Health::new(3, backoff());
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let now = Instant::now();
        health.failed(QUIC, now, &mut rng);
        let choice = p.choose(
            &mut JobState::new(now),
            Some(100),
            &|s| health.is_healthy(s),
            now,
        );
        assert_eq!(
            choice,
            Choice {
                order: vec![H2, UCX],
                reason: Reason::Fallback
            }
        );
        // All down: everything is tried in order rather than failing unasked.
        health.failed(H2, now, &mut rng);
        health.failed(UCX, now, &mut rng);
        let choice = p.choose(
            &mut JobState::new(now),
            Some(100),
            &|s| health.is_healthy(s),
            now,
        );
        assert_eq!(choice.order, vec![QUIC, H2, UCX]);
    }

    #[test]
    fn operators_can_force_or_forbid_a_transport() {
        let p = policy(vec![]);
        let health = Health::new(3, backoff());
        let now = Instant::now();
        let mut job = JobState::new(now);
        job.forbidden = vec![H2];
        assert_eq!(
            p.choose(&mut job, None, &|s| health.is_healthy(s), now)
                .order,
            vec![UCX, QUIC]
        );
        job.forced = Some(QUIC);
        assert_eq!(
            p.choose(&mut job, None, &|s| health.is_healthy(s), now),
            Choice {
                order: vec![QUIC],
                reason: Reason::Forced
            }
        );
    }

    /// A dead transport under 1 000 calls/s for 60 s: calls never go to it, and the background
    /// prober (asking `probe_due` every 10 ms) probes it a few times per second at most.
    #[test]
    fn a_dead_transport_costs_a_few_probes_per_second_not_a_probe_per_call() {
        let p = policy(vec![Rule::SizeHint { above: 0, to: QUIC }]);
        let mut health = Health::new(3, backoff());
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let start = Instant::now();
        let mut job = JobState::new(start);
        let mut on_dead = 0u32;
        let mut probes = 0u32;
        let mut now = start;
        for ms in 0..60_000u64 {
            now = start + Duration::from_millis(ms);
            let choice = p.choose(&mut job, Some(1), &|s| health.is_healthy(s), now);
            if choice.order[0] == QUIC {
                on_dead += 1;
                health.failed(QUIC, now, &mut rng); // the call's transport failed
            }
            if ms % 10 == 0 {
                while let Some(slot) = health.probe_due(now) {
                    probes += 1;
                    health.failed(slot, now, &mut rng); // still dead
                }
            }
        }
        let secs = now.duration_since(start).as_secs_f64();
        assert_eq!(on_dead, 1, "only the first call met the dead transport");
        assert!(
            f64::from(probes) / secs <= 3.0,
            "{probes} probes in {secs} s"
        );
        assert!(probes >= 10, "it kept being probed: {probes}");
        // Once it answers a probe, calls use it again.
        health.succeeded(QUIC);
        assert_eq!(
            p.choose(&mut job, Some(1), &|s| health.is_healthy(s), now)
                .order[0],
            QUIC
        );
    }
}
