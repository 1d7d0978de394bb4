//! HTTP/2 keepalive PINGs to upstreams, per gRFC A8 ("Client-side Keepalive").
//!
//! A PING finds a dead connection (a NAT that forgot it, a peer that vanished) before a call
//! hangs on it, and keeps middleboxes from dropping a connection that carries a long, quiet
//! stream (an LLM thinking). But pings cost the peer, and a gRPC server that receives them too
//! often answers GOAWAY `ENHANCE_YOUR_CALM` "too_many_pings" and kills every call on the
//! connection. So the rule is conservative:
//!
//! ```text
//! a ping is in flight, nothing read since:
//!     outstanding ≥ timeout                        → Dead   (close the connection)
//!     otherwise                                    → WaitFor(timeout − outstanding)
//! no active streams and not without_calls          → Idle   (A8: no keepalive without calls)
//! min_interval = peer_min_time                     with active streams
//!              = max(peer_min_time, 5 min)         without (A8's suggested server default)
//! due = max(time − since_last_read,               A8: keepalive time runs from the last byte read
//!           min_interval − since_last_ping)       never faster than the peer permits
//! due = 0                                          → SendPing
//! otherwise                                        → WaitFor(due)
//! ```
//!
//! `time` below 10 s is raised to 10 s (A8 "KEEPALIVE_TIME ... If smaller than ten seconds, ten
//! seconds will be used instead"). `peer_min_time` is the peer's `PERMIT_KEEPALIVE_TIME`
//! (default 5 minutes in A8's server enforcement); set it lower only for peers known to permit
//! more, such as another pnp. Measuring the interval from the last ping sent is only the guard
//! against the peer's strike counter; the keepalive time itself runs from the last byte read,
//! as A8 requires, so a connection that just became active after a long silence pings at once
//! ("ideally before the HEADERS frame"). On GOAWAY "too_many_pings",
//! [`Keepalive::on_too_many_pings`] doubles both intervals, as A8 asks for the keepalive time.

use std::time::Duration;

use crate::error::check_nonzero;
use crate::PolicyError;

/// A8's floor on the keepalive time.
pub const MIN_KEEPALIVE_TIME: Duration = Duration::from_secs(10);

/// Minimum spacing of pings on a connection with no active streams.
pub const IDLE_PING_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// Settings for [`Keepalive`], named after A8's channel settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeepaliveConfig {
    /// `KEEPALIVE_TIME`: silence (since the last byte read) before a ping. At least 10 s.
    /// Default 5 min.
    pub time: Duration,
    /// `KEEPALIVE_TIMEOUT`: how long a ping may go unanswered. Default 20 s.
    pub timeout: Duration,
    /// `KEEPALIVE_WITHOUT_CALLS`: ping connections with no active streams too. Default false.
    pub without_calls: bool,
    /// The peer's `PERMIT_KEEPALIVE_TIME`: never ping it more often. Default 5 min.
    pub peer_min_time: Duration,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        Self {
            time: Duration::from_secs(5 * 60),
            timeout: Duration::from_secs(20),
            without_calls: false,
            peer_min_time: Duration::from_secs(5 * 60),
        }
    }
}

/// The connection, as the keepalive rule sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepaliveInput {
    /// Open streams on the connection.
    pub active_streams: usize,
    /// Time since the last byte was read from the connection.
    pub since_last_read: Duration,
    /// Time since the last PING was sent, if any was.
    pub since_last_ping: Option<Duration>,
    /// Time since a PING was sent with nothing read since; `None` when no ping is waiting
    /// (any byte read counts as the answer).
    pub ping_outstanding: Option<Duration>,
}

/// What to do with the connection now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum KeepaliveAction {
    /// Send a PING.
    SendPing,
    /// Nothing now; ask again after this long (or sooner if something happens).
    WaitFor(Duration),
    /// Nothing until a stream opens.
    Idle,
    /// A ping went unanswered for `timeout`: the connection is dead; close it.
    Dead,
}

/// The keepalive rule; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keepalive {
    time: Duration,
    timeout: Duration,
    without_calls: bool,
    peer_min_time: Duration,
}

impl Keepalive {
    /// Validate the settings; `time` is raised to 10 s if below.
    pub fn new(config: KeepaliveConfig) -> Result<Self, PolicyError> {
        check_nonzero("keepalive.timeout", config.timeout)?;
        Ok(Self {
            time: config.time.max(MIN_KEEPALIVE_TIME),
            timeout: config.timeout,
            without_calls: config.without_calls,
            peer_min_time: config.peer_min_time,
        })
    }

    /// The keepalive time in force.
    pub fn time(&self) -> Duration {
        self.time
    }

    /// The assumed peer minimum in force.
    pub fn peer_min_time(&self) -> Duration {
        self.peer_min_time
    }

    /// Decide for one connection.
    pub fn decide(&self, input: &KeepaliveInput) -> KeepaliveAction {
        if let Some(outstanding) = input.ping_outstanding {
            return if outstanding >= self.timeout {
                KeepaliveAction::Dead
            } else {
                KeepaliveAction::WaitFor(self.timeout - outstanding)
            };
        }
        let active = input.active_streams > 0;
        if !active && !self.without_calls {
            return KeepaliveAction::Idle;
        }
        let min_interval = if active {
            self.peer_min_time
        } else {
            self.peer_min_time.max(IDLE_PING_INTERVAL)
        };
        let read_due = self.time.saturating_sub(input.since_last_read);
        let ping_due = input
            .since_last_ping
            .map_or(Duration::ZERO, |since| min_interval.saturating_sub(since));
        let due = read_due.max(ping_due);
        if due.is_zero() {
            KeepaliveAction::SendPing
        } else {
            KeepaliveAction::WaitFor(due)
        }
    }

    /// The peer sent GOAWAY `ENHANCE_YOUR_CALM` "too_many_pings": double the keepalive time
    /// and the assumed peer minimum (for new connections).
    pub fn on_too_many_pings(&mut self) {
        self.time = self.time.saturating_mul(2);
        self.peer_min_time = self.peer_min_time.saturating_mul(2).max(MIN_KEEPALIVE_TIME);
    }
}

impl Default for Keepalive {
    fn default() -> Self {
        let c = KeepaliveConfig::default();
        Self {
            time: c.time,
            timeout: c.timeout,
            without_calls: c.without_calls,
            peer_min_time: c.peer_min_time,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn input(active: usize, read: u64, ping: Option<u64>) -> KeepaliveInput {
        KeepaliveInput {
            active_streams: active,
            since_last_read: s(read),
            since_last_ping: ping.map(s),
            ping_outstanding: None,
        }
    }

    /// A peer that permits pings every 30 s (another pnp), keepalive time 20 s.
    fn bridge() -> Keepalive {
        Keepalive::new(KeepaliveConfig {
            time: s(20),
            peer_min_time: s(30),
            ..KeepaliveConfig::default()
        })
        .expect("valid")
    }

    #[test]
    fn decision_table() {
        use KeepaliveAction::*;
        let k = bridge();
        let cases = [
            // No streams, keepalive without calls off: never.
            (input(0, 10_000, None), Idle),
            // Active stream, quiet for the keepalive time, never pinged: ping.
            (input(1, 20, None), SendPing),
            (input(1, 19, None), WaitFor(s(1))),
            // Data keeps arriving: no ping.
            (input(5, 0, Some(10_000)), WaitFor(s(20))),
            // Quiet, but pinged recently: wait for the peer's minimum.
            (input(1, 25, Some(10)), WaitFor(s(20))),
            (input(1, 40, Some(30)), SendPing),
        ];
        for (i, want) in cases {
            assert_eq!(k.decide(&i), want, "{i:?}");
        }
    }

    #[test]
    fn without_calls_never_faster_than_five_minutes() {
        let k = Keepalive::new(KeepaliveConfig {
            time: s(20),
            peer_min_time: s(30),
            without_calls: true,
            ..KeepaliveConfig::default()
        })
        .expect("valid");
        assert_eq!(k.decide(&input(0, 20, None)), KeepaliveAction::SendPing);
        assert_eq!(
            k.decide(&input(0, 100, Some(60))),
            KeepaliveAction::WaitFor(s(240))
        );
        assert_eq!(
            k.decide(&input(0, 400, Some(300))),
            KeepaliveAction::SendPing
        );
    }

    #[test]
    fn unanswered_ping_kills_the_connection_after_the_timeout() {
        let k = Keepalive::default();
        let mut i = input(1, 400, Some(5));
        i.ping_outstanding = Some(s(5));
        assert_eq!(k.decide(&i), KeepaliveAction::WaitFor(s(15)));
        i.ping_outstanding = Some(s(20));
        assert_eq!(k.decide(&i), KeepaliveAction::Dead);
        // Even with no streams left.
        i.active_streams = 0;
        assert_eq!(k.decide(&i), KeepaliveAction::Dead);
    }

    #[test]
    fn floors_and_backoff() {
        let mut k = Keepalive::new(KeepaliveConfig {
            time: s(1),
            peer_min_time: Duration::ZERO,
            ..KeepaliveConfig::default()
        })
        .expect("valid");
        assert_eq!(k.time(), s(10));
        assert_eq!(k.decide(&input(1, 9, None)), KeepaliveAction::WaitFor(s(1)));
        k.on_too_many_pings();
        assert_eq!((k.time(), k.peer_min_time()), (s(20), s(10)));
        k.on_too_many_pings();
        assert_eq!((k.time(), k.peer_min_time()), (s(40), s(20)));
        assert!(Keepalive::new(KeepaliveConfig {
            timeout: Duration::ZERO,
            ..KeepaliveConfig::default()
        })
        .is_err());
    }

    proptest! {
        /// Whatever the history, a ping is never sent sooner than the peer permits, never on an
        /// idle connection unless asked, and never while one is outstanding.
        #[test]
        fn never_violates_the_peer_minimum(
            active in 0usize..3, read in 0u64..1_000, ping in proptest::option::of(0u64..1_000),
            outstanding in proptest::option::of(0u64..60), without_calls: bool,
            time in 0u64..600, peer in 0u64..600,
        ) {
            let k = Keepalive::new(KeepaliveConfig {
                time: s(time),
                peer_min_time: s(peer),
                without_calls,
                ..KeepaliveConfig::default()
            }).expect("valid");
            let i = KeepaliveInput {
                active_streams: active,
                since_last_read: s(read),
                since_last_ping: ping.map(s),
                ping_outstanding: outstanding.map(s),
            };
            if k.decide(&i) == KeepaliveAction::SendPing {
                prop_assert!(outstanding.is_none());
                prop_assert!(active > 0 || without_calls);
                prop_assert!(s(read) >= k.time());
                prop_assert!(s(read) >= MIN_KEEPALIVE_TIME);
                if let Some(p) = ping {
                    prop_assert!(s(p) >= s(peer));
                    if active == 0 {
                        prop_assert!(s(p) >= IDLE_PING_INTERVAL);
                    }
                }
            }
        }
    }
}
