//! The alert → freeze rule, as pure logic: fed with the data plane's cumulative per-job
//! counters and the time (a [`Duration`] since any fixed origin, so tests pass a simulated
//! clock), it says which jobs to freeze.
//!
//! A job trips when its non-OK statuses over the error window (5 minutes) exceed
//! [`FreezeRule::max_errors`] while its retries over the retry window (1 minute) exceed
//! [`FreezeRule::max_retries`]: a job that fails and retries at once is a retry storm, which
//! multiplies the load on an upstream that is already failing. It trips once per freeze:
//!
//! ```text
//!   Armed ──trip──▶ Fired ──mode frozen seen──▶ Frozen ──mode running seen──▶ Armed (counts reset)
//!                     └──────── no freeze seen within the error window ────────▶ Armed
//! ```
//!
//! Windowed counts are differences of the cumulative counters: the value now minus the value
//! at the newest sample at least one window old (or the oldest sample kept, when the control
//! plane has not watched the job that long: counts from before it started never trip the
//! rule). Counters that go down (a restarted data plane) start the job's history anew.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use pnp_link::{JobMode, JobStats};
use serde::Serialize;

/// When a job is frozen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FreezeRule {
    /// Non-OK statuses in `error_window` above which (together with the retries) a job trips.
    pub max_errors: u64,
    /// The window of `max_errors`.
    #[serde(serialize_with = "as_seconds")]
    pub error_window: Duration,
    /// Retries in `retry_window` above which (together with the errors) a job trips.
    pub max_retries: u64,
    /// The window of `max_retries`.
    #[serde(serialize_with = "as_seconds")]
    pub retry_window: Duration,
}

fn as_seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Default for FreezeRule {
    /// More than 100 non-OK statuses in 5 minutes while more than 50 retries in 1 minute.
    fn default() -> Self {
        FreezeRule {
            max_errors: 100,
            error_window: Duration::from_secs(300),
            max_retries: 50,
            retry_window: Duration::from_secs(60),
        }
    }
}

impl FreezeRule {
    /// The rule in words, for logs and the freeze reason.
    pub fn describe(&self) -> String {
        format!(
            "more than {} non-OK statuses in {} s while more than {} retries in {} s",
            self.max_errors,
            self.error_window.as_secs(),
            self.max_retries,
            self.retry_window.as_secs()
        )
    }
}

/// A job that tripped the rule: freeze it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Trip {
    /// The job (profile).
    pub job: String,
    /// Non-OK statuses in the error window.
    pub errors: u64,
    /// Retries in the retry window.
    pub retries: u64,
    /// The rule it tripped.
    pub rule: FreezeRule,
}

impl Trip {
    /// The reason sent with the freeze (the status message new calls of the job get).
    pub fn reason(&self) -> String {
        format!(
            "frozen by pnp's alert rule: {} non-OK statuses in {} s (limit {}) while {} retries in {} s (limit {})",
            self.errors,
            self.rule.error_window.as_secs(),
            self.rule.max_errors,
            self.retries,
            self.rule.retry_window.as_secs(),
            self.rule.max_retries
        )
    }
}

/// A job's counts over the rule's windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowCounts {
    /// Non-OK statuses in the error window.
    pub errors: u64,
    /// Retries in the retry window.
    pub retries: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Armed,
    /// Tripped at this time; the freeze was asked for, not yet seen.
    Fired(Duration),
    /// The data plane reports the job frozen (by this rule or an operator).
    Frozen,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    non_ok: u64,
    retries: u64,
}

#[derive(Debug)]
struct Track {
    samples: VecDeque<Sample>,
    state: State,
    last: WindowCounts,
}

impl Track {
    fn new() -> Track {
        Track {
            samples: VecDeque::new(),
            state: State::Armed,
            last: WindowCounts::default(),
        }
    }

    /// The newest sample at least `window` before `now`, else the oldest one.
    fn baseline(&self, now: Duration, window: Duration) -> Option<Sample> {
        let cutoff = now.checked_sub(window);
        let mut base = self.samples.front().copied();
        if let Some(cutoff) = cutoff {
            for sample in &self.samples {
                if sample.at <= cutoff {
                    base = Some(*sample);
                } else {
                    break;
                }
            }
        }
        base
    }
}

/// The freeze rule applied to a stream of [`JobStats`].
#[derive(Debug)]
pub struct FreezeLoop {
    rule: FreezeRule,
    jobs: HashMap<String, Track>,
}

impl FreezeLoop {
    /// A loop that applies `rule`.
    pub fn new(rule: FreezeRule) -> FreezeLoop {
        FreezeLoop {
            rule,
            jobs: HashMap::new(),
        }
    }

    /// The rule in force.
    pub fn rule(&self) -> FreezeRule {
        self.rule
    }

    /// Take in the data plane's counters at `now`; returns the jobs to freeze now.
    pub fn observe(&mut self, now: Duration, jobs: &[JobStats]) -> Vec<Trip> {
        let rule = self.rule;
        let longest = rule.error_window.max(rule.retry_window);
        let mut trips = Vec::new();
        for stats in jobs {
            let track = self
                .jobs
                .entry(stats.job.clone())
                .or_insert_with(Track::new);
            track.apply_mode(stats.mode, now, rule.error_window);
            if let Some(last) = track.samples.back() {
                if stats.non_ok < last.non_ok || stats.retries < last.retries || now < last.at {
                    // The data plane restarted (or the clock is not monotonic): start anew.
                    track.samples.clear();
                }
            }
            track.samples.push_back(Sample {
                at: now,
                non_ok: stats.non_ok,
                retries: stats.retries,
            });
            // Keep one sample at least `longest` old as the baseline, drop the ones before it.
            if let Some(cutoff) = now.checked_sub(longest) {
                while track.samples.len() > 1 && track.samples[1].at <= cutoff {
                    track.samples.pop_front();
                }
            }
            let errors = track
                .baseline(now, rule.error_window)
                .map_or(0, |b| stats.non_ok - b.non_ok);
            let retries = track
                .baseline(now, rule.retry_window)
                .map_or(0, |b| stats.retries - b.retries);
            track.last = WindowCounts { errors, retries };
            if track.state == State::Armed
                && stats.mode == JobMode::Running
                && errors > rule.max_errors
                && retries > rule.max_retries
            {
                track.state = State::Fired(now);
                trips.push(Trip {
                    job: stats.job.clone(),
                    errors,
                    retries,
                    rule,
                });
            }
        }
        trips
    }

    /// A job's mode changed (an [`pnp_link::Event::JobMode`] or a freeze seen).
    pub fn mode_changed(&mut self, job: &str, mode: JobMode, now: Duration) {
        let window = self.rule.error_window;
        self.jobs
            .entry(job.to_owned())
            .or_insert_with(Track::new)
            .apply_mode(mode, now, window);
    }

    /// The counts of `job` at the last [`observe`](Self::observe).
    pub fn counts(&self, job: &str) -> WindowCounts {
        self.jobs.get(job).map(|t| t.last).unwrap_or_default()
    }

    /// Forget jobs the data plane no longer reports.
    pub fn retain_jobs(&mut self, jobs: &[JobStats]) {
        self.jobs
            .retain(|name, _| jobs.iter().any(|stats| &stats.job == name));
    }
}

impl Track {
    fn apply_mode(&mut self, mode: JobMode, now: Duration, error_window: Duration) {
        self.state = match (self.state, mode) {
            (_, JobMode::Frozen) => State::Frozen,
            (State::Frozen, JobMode::Running) => {
                // Resumed: what it did before the freeze must not trip the rule again.
                self.samples.clear();
                State::Armed
            }
            // A freeze that never came (refused, lost): arm again after a whole error window,
            // so a failing job is not frozen on every Stats meanwhile.
            (State::Fired(at), _) if now.saturating_sub(at) >= error_window => State::Armed,
            (state, _) => state,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, mode: JobMode, non_ok: u64, retries: u64) -> JobStats {
        JobStats {
            job: name.into(),
            mode,
            calls: non_ok * 2,
            non_ok,
            retries,
            ..JobStats::default()
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    /// Runs `rates` (non-OK statuses and retries per second) for `seconds` with one Stats
    /// every 5 s, starting from the counters in `counters`; returns the trips.
    fn run(
        freeze: &mut FreezeLoop,
        clock: &mut Duration,
        counters: &mut (u64, u64),
        rates: (u64, u64),
        seconds: u64,
        mode: JobMode,
    ) -> Vec<(Duration, Trip)> {
        let mut trips = Vec::new();
        for _ in 0..seconds / 5 {
            *clock += 5 * SECOND;
            counters.0 += rates.0 * 5;
            counters.1 += rates.1 * 5;
            for trip in freeze.observe(*clock, &[job("j", mode, counters.0, counters.1)]) {
                trips.push((*clock, trip));
            }
        }
        trips
    }

    #[test]
    fn a_healthy_job_never_trips() {
        let mut freeze = FreezeLoop::new(FreezeRule::default());
        let (mut clock, mut counters) = (Duration::ZERO, (0, 0));
        // 0.3 errors/s (90 per 5 minutes) and 0.8 retries/s (48 per minute), for an hour.
        let mut trips = Vec::new();
        for _ in 0..720 {
            clock += 5 * SECOND;
            counters.0 += 1 + u64::from(clock.as_secs() % 10 == 0);
            counters.1 += 4;
            trips.extend(
                freeze.observe(clock, &[job("j", JobMode::Running, counters.0, counters.1)]),
            );
        }
        assert!(trips.is_empty(), "{trips:?}");
        let counts = freeze.counts("j");
        assert!(counts.errors <= 100 && counts.errors >= 80, "{counts:?}");
        assert!(counts.retries <= 50 && counts.retries >= 40, "{counts:?}");
    }

    #[test]
    fn errors_alone_or_retries_alone_do_not_trip() {
        for rates in [(10, 0), (0, 10)] {
            let mut freeze = FreezeLoop::new(FreezeRule::default());
            let (mut clock, mut counters) = (Duration::ZERO, (0, 0));
            let trips = run(
                &mut freeze,
                &mut clock,
                &mut counters,
                rates,
                600,
                JobMode::Running,
            );
            assert!(trips.is_empty(), "{rates:?}: {trips:?}");
        }
    }

    #[test]
    fn a_failing_job_trips_once_when_both_windows_exceed_their_limits() {
        let mut freeze = FreezeLoop::new(FreezeRule::default());
        let (mut clock, mut counters) = (Duration::ZERO, (0, 0));
        // 1 error/s and 1 retry/s: errors pass 100 after ~100 s, retries pass 50 per minute.
        // (For the whole error window: then a freeze that never came arms the rule again.)
        let trips = run(
            &mut freeze,
            &mut clock,
            &mut counters,
            (1, 1),
            300,
            JobMode::Running,
        );
        assert_eq!(trips.len(), 1, "{trips:?}");
        let (at, trip) = &trips[0];
        // The first Stats (at 5 s) is the baseline: at 110 s, 105 errors and 60 retries.
        assert_eq!(*at, 110 * SECOND, "{trip:?}");
        assert_eq!(trip.job, "j");
        assert_eq!((trip.errors, trip.retries), (105, 60));
        assert!(
            trip.reason().contains("105 non-OK statuses in 300 s"),
            "{}",
            trip.reason()
        );
    }

    #[test]
    fn does_not_trip_again_until_resumed_and_then_counts_only_what_came_after() {
        let mut freeze = FreezeLoop::new(FreezeRule::default());
        let (mut clock, mut counters) = (Duration::ZERO, (0, 0));
        assert_eq!(
            run(
                &mut freeze,
                &mut clock,
                &mut counters,
                (2, 2),
                60,
                JobMode::Running
            )
            .len(),
            1
        );
        // The freeze takes effect; the counters still climb a little (calls in flight ending).
        assert!(run(
            &mut freeze,
            &mut clock,
            &mut counters,
            (2, 2),
            60,
            JobMode::Running
        )
        .is_empty());
        assert!(run(
            &mut freeze,
            &mut clock,
            &mut counters,
            (2, 2),
            600,
            JobMode::Frozen
        )
        .is_empty());
        // Resumed and healthy: the errors before the freeze are still in the window but must
        // not trip it again.
        let resumed = run(
            &mut freeze,
            &mut clock,
            &mut counters,
            (0, 0),
            300,
            JobMode::Running,
        );
        assert!(resumed.is_empty(), "{resumed:?}");
        // Failing again after the resume: trips again.
        let again = run(
            &mut freeze,
            &mut clock,
            &mut counters,
            (2, 2),
            120,
            JobMode::Running,
        );
        assert_eq!(again.len(), 1, "{again:?}");
    }

    #[test]
    fn a_freeze_that_never_comes_arms_the_rule_again_after_the_error_window() {
        let mut freeze = FreezeLoop::new(FreezeRule::default());
        let (mut clock, mut counters) = (Duration::ZERO, (0, 0));
        let trips = run(
            &mut freeze,
            &mut clock,
            &mut counters,
            (2, 2),
            900,
            JobMode::Running,
        );
        assert_eq!(trips.len(), 3, "{trips:?}");
        assert!(trips[1].0 - trips[0].0 >= FreezeRule::default().error_window);
    }

    #[test]
    fn counts_from_before_the_control_plane_started_or_before_a_data_plane_restart_do_not_count() {
        let mut freeze = FreezeLoop::new(FreezeRule::default());
        let mut clock = 10 * SECOND;
        assert!(freeze
            .observe(clock, &[job("j", JobMode::Running, 1_000_000, 1_000_000)])
            .is_empty());
        clock += 5 * SECOND;
        assert!(freeze
            .observe(clock, &[job("j", JobMode::Running, 1_000_010, 1_000_010)])
            .is_empty());
        assert_eq!(
            freeze.counts("j"),
            WindowCounts {
                errors: 10,
                retries: 10
            }
        );
        // The data plane restarted: its counters start from zero.
        clock += 5 * SECOND;
        assert!(freeze
            .observe(clock, &[job("j", JobMode::Running, 3, 3)])
            .is_empty());
        assert_eq!(freeze.counts("j"), WindowCounts::default());
    }

    #[test]
    fn a_job_frozen_or_paused_by_an_operator_does_not_trip() {
        let mut freeze = FreezeLoop::new(FreezeRule::default());
        let (mut clock, mut counters) = (Duration::ZERO, (0, 0));
        assert!(run(
            &mut freeze,
            &mut clock,
            &mut counters,
            (5, 5),
            600,
            JobMode::Paused
        )
        .is_empty());
        freeze.mode_changed("j", JobMode::Frozen, clock);
        assert!(run(
            &mut freeze,
            &mut clock,
            &mut counters,
            (5, 5),
            600,
            JobMode::Frozen
        )
        .is_empty());
    }

    #[test]
    fn windows_slide() {
        let rule = FreezeRule {
            max_errors: 10,
            error_window: 60 * SECOND,
            max_retries: 10,
            retry_window: 10 * SECOND,
        };
        let mut freeze = FreezeLoop::new(rule);
        let (mut clock, mut counters) = (Duration::ZERO, (0, 0));
        // 20 errors in the first minute with no retries, then a burst of retries two minutes
        // later: the errors have left their window.
        assert!(run(
            &mut freeze,
            &mut clock,
            &mut counters,
            (1, 0),
            20,
            JobMode::Running
        )
        .is_empty());
        assert!(run(
            &mut freeze,
            &mut clock,
            &mut counters,
            (0, 0),
            120,
            JobMode::Running
        )
        .is_empty());
        assert!(run(
            &mut freeze,
            &mut clock,
            &mut counters,
            (0, 5),
            20,
            JobMode::Running
        )
        .is_empty());
        assert_eq!(freeze.counts("j").errors, 0);
        assert_eq!(freeze.counts("j").retries, 50);
    }
}
