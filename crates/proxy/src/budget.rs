//! The global buffer budget: how many message bytes pnp may hold at once over all calls
//! (`limits.buffer_budget`).
//!
//! Streaming is bounded by flow-control windows; what the budget bounds is the memory pnp holds
//! on purpose beyond that: request messages kept for a retry (`replay.rs`), degraded calls'
//! buffered replies. Whoever holds bytes holds a [`Reservation`] for them, grows it as it
//! buffers more, and gives the bytes back by dropping it. A refusal never blocks: the holder
//! decides what to do without the bytes (stop keeping a replay, or end the call with
//! [`budget_status`]) and counts the refusal with [`BufferBudget::refused`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pnp_call::{Code, Status};
use pnp_telemetry::{Gauge, Metrics};

/// The budget shared by every call. Cheap to clone; clones share the count.
#[derive(Clone, Debug)]
pub(crate) struct BufferBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    used: AtomicUsize,
    limit: usize,
    /// `pnp_buffered_bytes`, moved by the same deltas as `used`.
    gauge: Gauge,
    metrics: Metrics,
}

/// Bytes taken from a [`BufferBudget`]; they go back when it is dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: BufferBudget,
    bytes: usize,
}

impl BufferBudget {
    /// A budget of `limit` bytes, reported in `metrics`.
    pub(crate) fn new(limit: usize, metrics: &Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                used: AtomicUsize::new(0),
                limit,
                gauge: metrics.buffered_bytes(),
                metrics: metrics.clone(),
            }),
        }
    }

    /// The budget in bytes.
    pub(crate) fn limit(&self) -> usize {
        self.inner.limit
    }

    /// Bytes reserved now, over all holders.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.inner.used.load(Ordering::Acquire)
    }

    /// Take `bytes` from the budget, or `None` when that would go over it (nothing is taken
    /// then). `try_reserve(0)` always succeeds: an empty reservation to grow later.
    pub(crate) fn try_reserve(&self, bytes: usize) -> Option<Reservation> {
        self.take(bytes).then(|| Reservation {
            budget: self.clone(),
            bytes,
        })
    }

    /// Count a refusal of bytes that `reason` asked for (`pnp_buffer_budget_refusals_total`).
    pub(crate) fn refused(&self, reason: &'static str) {
        self.inner.metrics.buffer_refused(reason);
    }

    /// A reservation of nothing yet, to grow with [`Reservation::try_grow`] or
    /// [`Reservation::set`].
    pub(crate) fn reserve_nothing(&self) -> Reservation {
        Reservation {
            budget: self.clone(),
            bytes: 0,
        }
    }

    fn take(&self, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let inner = &self.inner;
        let taken = inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes)
                    .filter(|&total| total <= inner.limit)
            })
            .is_ok();
        if taken {
            inner.gauge.inc_by(gauge_delta(bytes));
        }
        taken
    }

    fn give_back(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.inner.used.fetch_sub(bytes, Ordering::AcqRel);
        self.inner.gauge.dec_by(gauge_delta(bytes));
    }
}

impl Reservation {
    /// Take `more` bytes for this holder; false (and nothing taken) when the budget cannot.
    pub(crate) fn try_grow(&mut self, more: usize) -> bool {
        if !self.budget.take(more) {
            return false;
        }
        self.bytes += more;
        true
    }

    /// Hold exactly `bytes`: give back what is no longer needed, or take the difference; false
    /// (and the holding unchanged) when the budget cannot take it.
    pub(crate) fn set(&mut self, bytes: usize) -> bool {
        if bytes <= self.bytes {
            self.budget.give_back(self.bytes - bytes);
            self.bytes = bytes;
            return true;
        }
        self.try_grow(bytes - self.bytes)
    }

    /// The budget's limit, for the status of a refused call.
    pub(crate) fn budget_limit(&self) -> usize {
        self.budget.limit()
    }

    /// Count a refusal for `reason` (what asked for the bytes).
    pub(crate) fn refused(&self, reason: &'static str) {
        self.budget.refused(reason);
    }

    /// Bytes this reservation holds.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

fn gauge_delta(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// The status of a call ended because the buffer budget of `limit` bytes is spent.
pub(crate) fn budget_status(limit: usize) -> Status {
    Status::new(
        Code::ResourceExhausted,
        format!("pnp: buffer budget of {limit} bytes exhausted"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: usize) -> (BufferBudget, Metrics) {
        let metrics = Metrics::new();
        (BufferBudget::new(limit, &metrics), metrics)
    }

    fn gauge(metrics: &Metrics) -> Option<String> {
        metrics
            .encode()
            .lines()
            .find(|l| l.starts_with("pnp_buffered_bytes "))
            .map(|l| l.trim_start_matches("pnp_buffered_bytes ").to_owned())
    }

    #[test]
    fn reserve_grow_and_release() {
        let (budget, metrics) = budget(100);
        let mut a = budget.try_reserve(60).expect("fits");
        assert_eq!(budget.used(), 60);
        assert!(budget.try_reserve(41).is_none(), "over the budget");
        assert_eq!(budget.used(), 60, "a refusal takes nothing");
        let mut b = budget.try_reserve(40).expect("exactly fits");
        assert!(!a.try_grow(1));
        assert_eq!(a.bytes(), 60);
        drop(b);
        assert_eq!(budget.used(), 60);
        assert!(a.try_grow(40));
        assert_eq!((a.bytes(), budget.used()), (100, 100));
        assert_eq!(gauge(&metrics).as_deref(), Some("100"));
        b = budget
            .try_reserve(0)
            .expect("an empty reservation always fits");
        assert!(!b.try_grow(1));
        drop(a);
        assert_eq!(budget.used(), 0);
        assert!(b.try_grow(100));
        drop(b);
        assert_eq!(budget.used(), 0);
        assert_eq!(gauge(&metrics).as_deref(), Some("0"));
    }

    #[test]
    fn clones_share_the_count_and_huge_asks_do_not_overflow() {
        let (budget, _) = budget(usize::MAX - 1);
        let other = budget.clone();
        let _a = other.try_reserve(usize::MAX - 10).expect("fits");
        assert!(budget.try_reserve(usize::MAX).is_none());
        assert!(budget.try_reserve(20).is_none(), "the sum would overflow");
        assert_eq!(budget.limit(), usize::MAX - 1);
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let (budget, metrics) = budget(1);
        budget.refused("replay");
        assert!(
            metrics
                .encode()
                .contains(r#"pnp_buffer_budget_refusals_total{reason="replay"} 1"#),
            "{}",
            metrics.encode()
        );
        let status = budget_status(budget.limit());
        assert_eq!(status.code, Code::ResourceExhausted);
        assert_eq!(status.message, "pnp: buffer budget of 1 bytes exhausted");
    }

    #[test]
    fn concurrent_holders_never_exceed_the_budget() {
        const LIMIT: usize = 200;
        let (budget, metrics) = budget(LIMIT);
        // 8 threads, each holding up to 5 reservations of up to 100 bytes (about 250 on
        // average), want far more than 200 bytes at once: they contend, some asks are refused,
        // and no one overshoots.
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    let (mut granted, mut refused) = (0usize, 0usize);
                    let mut held = std::collections::VecDeque::new();
                    for i in 0..5_000usize {
                        let ask = 1 + (i * 7 + t) % 50;
                        match budget.try_reserve(ask) {
                            Some(mut r) => {
                                granted += 1;
                                if !r.try_grow(ask) {
                                    refused += 1;
                                }
                                held.push_back(r);
                            }
                            None => refused += 1,
                        }
                        assert!(budget.used() <= LIMIT, "{} > {LIMIT}", budget.used());
                        if held.len() > 5 {
                            held.pop_front();
                        }
                    }
                    (granted, refused)
                })
            })
            .collect();
        let (granted, refused) = threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .fold((0, 0), |(g, r), (tg, tr)| (g + tg, r + tr));
        assert!(
            granted > 0 && refused > 0,
            "{granted} granted, {refused} refused"
        );
        assert_eq!(budget.used(), 0, "every reservation went back");
        assert_eq!(gauge(&metrics).as_deref(), Some("0"));
    }
}
