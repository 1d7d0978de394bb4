//! How a waiting end spends the time between two looks at the ring: a short spin, a few
//! yields, then sleeps that double from 50 µs to 1 ms. No futex and no eventfd, so nothing
//! beyond the file is shared and nothing needs the other side's cooperation to wake up; the
//! price is up to one sleep of latency on an idle ring (README: measured figures).

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

/// Looks that only spin (a few microseconds in all).
const SPINS: u32 = 64;
/// Looks after the spins that yield the CPU.
const YIELDS: u32 = 16;
/// The first sleep.
pub(crate) const MIN_SLEEP: Duration = Duration::from_micros(50);
/// The longest sleep: the worst added latency once a ring has been idle for a while.
pub(crate) const MAX_SLEEP: Duration = Duration::from_millis(1);

/// When a wait of `timeout` from now ends; a timeout too long for the clock (`Duration::MAX`)
/// waits a year.
pub(crate) fn deadline(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// What to do before the next look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pause {
    /// `std::hint::spin_loop` once.
    Spin,
    /// Give the CPU to another thread (or task).
    Yield,
    /// Sleep this long.
    Sleep(Duration),
}

/// The back-off of one wait; a fresh one for every wait.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    looks: u32,
}

impl Backoff {
    /// The pause before the next look.
    pub(crate) fn next_pause(&mut self) -> Pause {
        let looks = self.looks;
        self.looks = self.looks.saturating_add(1);
        if looks < SPINS {
            Pause::Spin
        } else if looks < SPINS + YIELDS {
            Pause::Yield
        } else {
            let doublings = (looks - SPINS - YIELDS).min(8);
            Pause::Sleep((MIN_SLEEP * (1 << doublings)).min(MAX_SLEEP))
        }
    }

    /// The pause before the next look for an async waiter: no spinning (it would hold the
    /// executor's thread), a few yields to the executor, then the same sleeps.
    #[cfg(feature = "tokio")]
    pub(crate) fn next_async_pause(&mut self) -> Pause {
        if self.looks < SPINS {
            self.looks = SPINS;
        }
        self.next_pause()
    }

    /// Waits out `pause` on this thread, never past `limit`.
    pub(crate) fn pause_blocking(pause: Pause, limit: Duration) {
        match pause {
            Pause::Spin => std::hint::spin_loop(),
            Pause::Yield => std::thread::yield_now(),
            Pause::Sleep(duration) => std::thread::sleep(duration.min(limit)),
        }
    }

    /// Waits out `pause` in a tokio task.
    #[cfg(feature = "tokio")]
    pub(crate) async fn pause_async(pause: Pause) {
        match pause {
            Pause::Spin | Pause::Yield => tokio::task::yield_now().await,
            Pause::Sleep(duration) => tokio::time::sleep(duration).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spins_then_yields_then_sleeps_doubling_up_to_the_cap() {
        let mut backoff = Backoff::default();
        let pauses: Vec<Pause> = (0..200).map(|_| backoff.next_pause()).collect();
        assert!(pauses[..64].iter().all(|p| *p == Pause::Spin));
        assert!(pauses[64..80].iter().all(|p| *p == Pause::Yield));
        assert_eq!(pauses[80], Pause::Sleep(Duration::from_micros(50)));
        assert_eq!(pauses[81], Pause::Sleep(Duration::from_micros(100)));
        assert_eq!(pauses[85], Pause::Sleep(Duration::from_millis(1)));
        assert_eq!(pauses[199], Pause::Sleep(Duration::from_millis(1)));
    }

    #[test]
    fn an_endless_timeout_is_a_distant_deadline_not_a_panic() {
        assert!(deadline(Duration::MAX) > Instant::now() + Duration::from_secs(3600));
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn async_waits_never_spin() {
        let mut backoff = Backoff::default();
        assert_eq!(backoff.next_async_pause(), Pause::Yield);
    }
}
