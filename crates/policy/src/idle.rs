//! Stream clocks: the idle gap between messages and the time to the first response message.
//!
//! Neither is a total-duration timer: a stream that keeps producing messages lives as long as it
//! likes (the total deadline, if any, is [`crate::deadline`]). Both are plain state machines:
//! the driver feeds them message events and the current time, and asks [`poll`] whether a clock
//! has run out and [`next_deadline`] when to ask again. They read no clock themselves.
//!
//! ## Idle clock
//!
//! ```text
//!  new(now) ──► Armed { last = now } ──on_message(t)──► Armed { last = max(last, t) }
//!                     │
//!                     │ poll(t) with t ≥ last + gap
//!                     ▼
//!                  Expired            terminal: poll keeps answering Some, messages are ignored
//! ```
//!
//! A message in *either* direction resets it. Expiry happens only in `poll`: a message that
//! arrives before the driver polls still counts (the race goes to the stream, not the timer).
//!
//! ## First-message clock
//!
//! ```text
//!  new(now) ──► Armed { started = now } ──on_response_message──► Disarmed   (terminal, silent)
//!                     │
//!                     │ poll(t) with t ≥ started + budget
//!                     ▼
//!                  Expired            terminal
//! ```
//!
//! Only a *response* message disarms it: the client talking does not prove the upstream is
//! thinking. Response headers do not either; the budget is to the first message.
//!
//! ## Both together
//!
//! [`StreamClocks`] runs the pair as one call needs them: while the first-message clock is armed
//! the idle clock is not (the silence before the first token is the first-message budget's
//! business, and an LLM may think longer than the idle gap); the first response message starts
//! the idle clock. Without a first-message budget the idle clock runs from the start.
//! Do not give client-streaming methods a first-message budget: their upstream may rightly stay
//! silent until the client finishes.
//!
//! [`poll`]: IdleClock::poll
//! [`next_deadline`]: IdleClock::next_deadline

use std::time::{Duration, Instant};

/// Which clock ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockKind {
    /// No response message within the first-message budget.
    FirstMessage,
    /// No message in either direction within the idle gap.
    Idle,
}

/// A clock ran out: end the call (gRPC status `DEADLINE_EXCEEDED` or `UNAVAILABLE`, as the
/// profile says) and cancel the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    /// Which clock.
    pub clock: ClockKind,
    /// Its limit (the gap or the budget), for the status message.
    pub limit: Duration,
    /// The instant it ran out (not when it was noticed).
    pub at: Instant,
}

/// Which way a message went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to upstream.
    Request,
    /// Upstream to client.
    Response,
}

/// The idle-gap clock; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleClock {
    gap: Duration,
    last: Instant,
    expired: bool,
}

impl IdleClock {
    /// A clock armed at `now` that runs out after `gap` without messages.
    pub fn new(now: Instant, gap: Duration) -> Self {
        Self {
            gap,
            last: now,
            expired: false,
        }
    }

    /// A message went by at `now`, in either direction.
    pub fn on_message(&mut self, now: Instant) {
        if !self.expired && now > self.last {
            self.last = now;
        }
    }

    /// `Some` once `gap` has passed since the last message (and from then on).
    pub fn poll(&mut self, now: Instant) -> Option<Expired> {
        if !self.expired && now.saturating_duration_since(self.last) >= self.gap {
            self.expired = true;
        }
        self.expired.then(|| self.expiry())
    }

    /// When to poll next; `None` once expired. Saturates far in the future rather than
    /// overflowing when the gap is enormous.
    pub fn next_deadline(&self) -> Option<Instant> {
        (!self.expired).then(|| self.due())
    }

    fn due(&self) -> Instant {
        self.last.checked_add(self.gap).unwrap_or(self.last)
    }

    fn expiry(&self) -> Expired {
        Expired {
            clock: ClockKind::Idle,
            limit: self.gap,
            at: self.due(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FirstState {
    Armed,
    Disarmed,
    Expired,
}

/// The time-to-first-message clock; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirstMessageClock {
    started: Instant,
    budget: Duration,
    state: FirstState,
}

impl FirstMessageClock {
    /// A clock armed at `now` that runs out after `budget` without a response message.
    pub fn new(now: Instant, budget: Duration) -> Self {
        Self {
            started: now,
            budget,
            state: FirstState::Armed,
        }
    }

    /// A response message arrived: disarm for good (unless already expired).
    pub fn on_response_message(&mut self) {
        if self.state == FirstState::Armed {
            self.state = FirstState::Disarmed;
        }
    }

    /// Whether the first response message has arrived.
    pub fn is_disarmed(&self) -> bool {
        self.state == FirstState::Disarmed
    }

    /// `Some` once the budget has passed with no response message (and from then on).
    pub fn poll(&mut self, now: Instant) -> Option<Expired> {
        if self.state == FirstState::Armed
            && now.saturating_duration_since(self.started) >= self.budget
        {
            self.state = FirstState::Expired;
        }
        (self.state == FirstState::Expired).then(|| Expired {
            clock: ClockKind::FirstMessage,
            limit: self.budget,
            at: self.due(),
        })
    }

    /// When to poll next; `None` unless armed.
    pub fn next_deadline(&self) -> Option<Instant> {
        (self.state == FirstState::Armed).then(|| self.due())
    }

    fn due(&self) -> Instant {
        self.started
            .checked_add(self.budget)
            .unwrap_or(self.started)
    }
}

/// The first-message and idle clocks of one call; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamClocks {
    first: Option<FirstMessageClock>,
    idle_gap: Option<Duration>,
    idle: Option<IdleClock>,
}

impl StreamClocks {
    /// Clocks for a call that started at `now`; `None` leaves that clock out.
    pub fn new(
        now: Instant,
        first_message_budget: Option<Duration>,
        idle_gap: Option<Duration>,
    ) -> Self {
        let first = first_message_budget.map(|b| FirstMessageClock::new(now, b));
        let idle = match first {
            None => idle_gap.map(|g| IdleClock::new(now, g)),
            Some(_) => None,
        };
        Self {
            first,
            idle_gap,
            idle,
        }
    }

    /// A message went by at `now`.
    pub fn on_message(&mut self, now: Instant, direction: Direction) {
        if let Some(idle) = &mut self.idle {
            idle.on_message(now);
        }
        if direction == Direction::Response {
            if let Some(first) = &mut self.first {
                if first.next_deadline().is_some() {
                    first.on_response_message();
                    if let Some(gap) = self.idle_gap {
                        self.idle = Some(IdleClock::new(now, gap));
                    }
                }
            }
        }
    }

    /// The clock that has run out, if any. The first-message clock is checked first: while it
    /// is armed the idle clock is not running.
    pub fn poll(&mut self, now: Instant) -> Option<Expired> {
        if let Some(e) = self.first.as_mut().and_then(|f| f.poll(now)) {
            return Some(e);
        }
        self.idle.as_mut().and_then(|i| i.poll(now))
    }

    /// The idle gap that the first response message will start, while the first-message clock
    /// runs and the idle clock is not yet running; `None` otherwise. A driver that sleeps until
    /// [`next_deadline`](StreamClocks::next_deadline) must not sleep past `now + gap` in that
    /// phase, or an idle expiry right after the first message would be noticed late.
    pub fn idle_pending(&self) -> Option<Duration> {
        match (&self.first, &self.idle) {
            (Some(first), None) if first.next_deadline().is_some() => self.idle_gap,
            _ => None,
        }
    }

    /// The earliest instant at which [`poll`](StreamClocks::poll) may change its answer;
    /// `None` when no clock is running.
    pub fn next_deadline(&self) -> Option<Instant> {
        let first = self.first.and_then(|f| f.next_deadline());
        let idle = self.idle.and_then(|i| i.next_deadline());
        match (first, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn idle_is_pending_only_while_the_first_message_clock_runs() {
        let t0 = Instant::now();
        let mut c = StreamClocks::new(t0, Some(ms(30_000)), Some(ms(2_000)));
        assert_eq!(c.idle_pending(), Some(ms(2_000)));
        c.on_message(t0 + ms(200), Direction::Response);
        assert_eq!(c.idle_pending(), None);
        // The idle clock now runs from the first message, far earlier than the first-message
        // budget would have fired.
        assert_eq!(c.next_deadline(), Some(t0 + ms(2_200)));
        let without_idle = StreamClocks::new(t0, Some(ms(30_000)), None);
        assert_eq!(without_idle.idle_pending(), None);
        let without_first = StreamClocks::new(t0, None, Some(ms(2_000)));
        assert_eq!(without_first.idle_pending(), None);
    }

    #[test]
    fn idle_expires_after_a_gap_and_stays_expired() {
        let t0 = Instant::now();
        let mut c = IdleClock::new(t0, ms(100));
        assert_eq!(c.next_deadline(), Some(t0 + ms(100)));
        assert_eq!(c.poll(t0 + ms(99)), None);
        c.on_message(t0 + ms(99));
        assert_eq!(c.poll(t0 + ms(198)), None);
        let e = c.poll(t0 + ms(199)).expect("expired");
        assert_eq!(e.clock, ClockKind::Idle);
        assert_eq!(e.limit, ms(100));
        assert_eq!(e.at, t0 + ms(199));
        // Terminal.
        c.on_message(t0 + ms(200));
        assert!(c.poll(t0 + ms(200)).is_some());
        assert_eq!(c.next_deadline(), None);
    }

    #[test]
    fn late_poll_still_credits_a_message_that_arrived_first() {
        let t0 = Instant::now();
        let mut c = IdleClock::new(t0, ms(100));
        c.on_message(t0 + ms(150)); // the timer was late; the stream is alive
        assert_eq!(c.poll(t0 + ms(150)), None);
        assert_eq!(c.next_deadline(), Some(t0 + ms(250)));
    }

    #[test]
    fn out_of_order_messages_never_move_the_clock_back() {
        let t0 = Instant::now();
        let mut c = IdleClock::new(t0 + ms(50), ms(100));
        c.on_message(t0);
        assert_eq!(c.next_deadline(), Some(t0 + ms(150)));
    }

    #[test]
    fn idle_is_not_a_total_duration_timer() {
        let t0 = Instant::now();
        let mut c = IdleClock::new(t0, ms(1_000));
        let mut now = t0;
        // One hour of a message every 999 ms.
        for _ in 0..3_604 {
            now += ms(999);
            assert_eq!(c.poll(now), None);
            c.on_message(now);
        }
        assert!(now - t0 > Duration::from_secs(3_600));
    }

    #[test]
    fn first_message_clock_disarms_on_the_first_response_message() {
        let t0 = Instant::now();
        let mut c = FirstMessageClock::new(t0, ms(300));
        assert_eq!(c.poll(t0 + ms(299)), None);
        c.on_response_message();
        assert!(c.is_disarmed());
        assert_eq!(c.poll(t0 + Duration::from_secs(3_600)), None);
        assert_eq!(c.next_deadline(), None);
    }

    #[test]
    fn first_message_clock_expires() {
        let t0 = Instant::now();
        let mut c = FirstMessageClock::new(t0, ms(300));
        let e = c.poll(t0 + ms(300)).expect("expired");
        assert_eq!(
            (e.clock, e.limit, e.at),
            (ClockKind::FirstMessage, ms(300), t0 + ms(300))
        );
        c.on_response_message(); // too late
        assert!(!c.is_disarmed());
        assert!(c.poll(t0 + ms(301)).is_some());
    }

    #[test]
    fn stream_clocks_hand_over_from_first_message_to_idle() {
        let t0 = Instant::now();
        let mut c = StreamClocks::new(t0, Some(ms(1_200)), Some(ms(500)));
        assert_eq!(c.next_deadline(), Some(t0 + ms(1_200)));
        // Requests do not disarm the first-message clock, nor start the idle clock.
        c.on_message(t0 + ms(100), Direction::Request);
        // Thinking longer than the idle gap is fine.
        assert_eq!(c.poll(t0 + ms(1_000)), None);
        c.on_message(t0 + ms(1_100), Direction::Response);
        assert_eq!(c.next_deadline(), Some(t0 + ms(1_600)));
        assert_eq!(c.poll(t0 + ms(1_599)), None);
        c.on_message(t0 + ms(1_599), Direction::Request); // either direction resets idle
        assert_eq!(c.poll(t0 + ms(2_098)), None);
        let e = c.poll(t0 + ms(2_099)).expect("idle expired");
        assert_eq!(e.clock, ClockKind::Idle);
    }

    #[test]
    fn stream_clocks_first_message_timeout() {
        let t0 = Instant::now();
        let mut c = StreamClocks::new(t0, Some(ms(1_200)), Some(ms(500)));
        let e = c.poll(t0 + ms(1_200)).expect("expired");
        assert_eq!(e.clock, ClockKind::FirstMessage);
    }

    #[test]
    fn stream_clocks_without_a_budget_run_idle_from_the_start() {
        let t0 = Instant::now();
        let mut c = StreamClocks::new(t0, None, Some(ms(500)));
        assert_eq!(c.poll(t0 + ms(500)).map(|e| e.clock), Some(ClockKind::Idle));
        let mut none = StreamClocks::new(t0, None, None);
        assert_eq!(none.next_deadline(), None);
        assert_eq!(none.poll(t0 + Duration::from_secs(1_000_000)), None);
    }

    #[test]
    fn huge_limits_do_not_overflow() {
        let t0 = Instant::now();
        let mut c = StreamClocks::new(t0, Some(Duration::MAX), Some(Duration::MAX));
        assert!(c.next_deadline().is_some());
        assert_eq!(c.poll(t0 + Duration::from_secs(1_000_000)), None);
        c.on_message(t0, Direction::Response);
        assert_eq!(c.poll(t0 + Duration::from_secs(1_000_000)), None);
    }

    proptest! {
        /// Against a reference model: expired iff some gap between consecutive events (start,
        /// messages, the poll) reached the limit before a poll saw it.
        #[test]
        fn idle_matches_a_reference_model(
            gap in 1u64..1_000,
            events in proptest::collection::vec((0u64..1_500, any::<bool>()), 1..60),
        ) {
            let t0 = Instant::now();
            let mut c = IdleClock::new(t0, ms(gap));
            let mut now = t0;
            let mut last = t0;
            let mut model_expired = false;
            for (dt, is_poll) in events {
                now += ms(dt);
                if is_poll {
                    if !model_expired && now - last >= ms(gap) {
                        model_expired = true;
                    }
                    prop_assert_eq!(c.poll(now).is_some(), model_expired);
                } else {
                    if !model_expired {
                        last = now;
                    }
                    c.on_message(now);
                }
                prop_assert_eq!(c.next_deadline().is_none(), model_expired);
            }
        }
    }
}
