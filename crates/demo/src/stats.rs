//! Counters that let tests observe what the upstream handlers saw.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{BoxStream, Stream, StreamExt};
use tokio::sync::Notify;
use tonic::Status;

/// Counters shared by every handler of one upstream; clones share the same counters.
///
/// A proxy test uses them to check what reached the service, e.g. that closing a browser tab
/// cancelled the model call: the handler's response stream was dropped before it finished.
#[derive(Clone, Default)]
pub struct DemoStats {
    inner: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    started: AtomicU64,
    cancelled: AtomicU64,
    active: AtomicU64,
    cancelled_changed: Notify,
}

impl DemoStats {
    /// Handler invocations so far, on every method of both services.
    pub fn calls_started(&self) -> u64 {
        self.inner.started.load(Ordering::SeqCst)
    }

    /// Response streams dropped before they finished: the client went away or reset the
    /// stream, or the connection died.
    pub fn calls_cancelled(&self) -> u64 {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Response streams currently alive.
    pub fn active_streams(&self) -> u64 {
        self.inner.active.load(Ordering::SeqCst)
    }

    /// Waits until at least `at_least` streams were cancelled; false if `timeout` passed first.
    pub async fn wait_cancelled(&self, at_least: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register for the wake-up before reading the counter, so an increment between
            // the read and the wait is not missed.
            let changed = self.inner.cancelled_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.calls_cancelled() >= at_least {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.calls_cancelled() >= at_least;
            }
        }
    }

    pub(crate) fn record_call(&self) {
        self.inner.started.fetch_add(1, Ordering::SeqCst);
    }

    /// Wraps a handler's response stream so that its lifetime is counted.
    pub(crate) fn track<T, S>(&self, stream: S) -> BoxStream<'static, Result<T, Status>>
    where
        T: Send + 'static,
        S: Stream<Item = Result<T, Status>> + Send + 'static,
    {
        self.inner.active.fetch_add(1, Ordering::SeqCst);
        TrackedStream {
            inner: stream.boxed(),
            stats: self.clone(),
            finished: false,
        }
        .boxed()
    }
}

impl fmt::Debug for DemoStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemoStats")
            .field("calls_started", &self.calls_started())
            .field("calls_cancelled", &self.calls_cancelled())
            .field("active_streams", &self.active_streams())
            .finish()
    }
}

/// A response stream that counts itself as cancelled when dropped before its end.
///
/// A stream has finished when it returned `None` or an error status (tonic stops polling
/// after an error and sends it as the final status); any other drop means nobody is
/// listening any more.
struct TrackedStream<T> {
    inner: BoxStream<'static, Result<T, Status>>,
    stats: DemoStats,
    finished: bool,
}

impl<T> Stream for TrackedStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let item = self.inner.as_mut().poll_next(cx);
        if let Poll::Ready(None | Some(Err(_))) = &item {
            self.finished = true;
        }
        item
    }
}

impl<T> Drop for TrackedStream<T> {
    fn drop(&mut self) {
        let counters = &self.stats.inner;
        counters.active.fetch_sub(1, Ordering::SeqCst);
        if !self.finished {
            counters.cancelled.fetch_add(1, Ordering::SeqCst);
            counters.cancelled_changed.notify_waiters();
            tracing::debug!("demo response stream dropped before its end");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    #[tokio::test]
    async fn stream_read_to_end_is_not_cancelled() {
        let stats = DemoStats::default();
        let mut tracked = stats.track(stream::iter([Ok::<_, Status>(1), Ok(2)]));
        assert_eq!(stats.active_streams(), 1);
        while tracked.next().await.is_some() {}
        drop(tracked);
        assert_eq!(stats.active_streams(), 0);
        assert_eq!(stats.calls_cancelled(), 0);
    }

    #[tokio::test]
    async fn stream_ended_by_error_is_not_cancelled() {
        let stats = DemoStats::default();
        let mut tracked = stats.track(stream::iter([
            Ok(1),
            Err(Status::unavailable("gone")),
            Ok(3),
        ]));
        assert!(matches!(tracked.next().await, Some(Ok(1))));
        assert!(matches!(tracked.next().await, Some(Err(_))));
        drop(tracked);
        assert_eq!(stats.calls_cancelled(), 0);
    }

    #[tokio::test]
    async fn stream_dropped_early_is_cancelled_and_wakes_waiters() {
        let stats = DemoStats::default();
        let mut tracked = stats.track(stream::iter([Ok::<_, Status>(1), Ok(2)]));
        assert!(matches!(tracked.next().await, Some(Ok(1))));
        let waiter = tokio::spawn({
            let stats = stats.clone();
            async move { stats.wait_cancelled(1, Duration::from_secs(10)).await }
        });
        tokio::task::yield_now().await;
        drop(tracked);
        assert!(matches!(waiter.await, Ok(true)));
        assert_eq!(stats.calls_cancelled(), 1);
        assert_eq!(stats.active_streams(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_cancelled_times_out() {
        let stats = DemoStats::default();
        assert!(!stats.wait_cancelled(1, Duration::from_secs(1)).await);
        assert!(stats.wait_cancelled(0, Duration::ZERO).await);
    }
}
