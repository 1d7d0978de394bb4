//! The request messages of a call, kept so a retry can send them again (gRFC A6 "buffering").
//!
//! Attempts run one after another, never at once. Each attempt reads through a [`Replay`]
//! reader: first the messages already recorded, then new ones from the client, which are
//! recorded as they pass. Once the recorded bytes exceed the limit the record is dropped and the
//! call can no longer be retried (the policy sees `replay_overflowed`).
//!
//! The recorded bytes are also held under the global [`BufferBudget`] (`limits.buffer_budget`).
//! When the budget cannot take the next message, the replay stops recording exactly as if the
//! per-call limit had been reached: the call goes on, it just can no longer be retried (counted
//! as `pnp_buffer_budget_refusals_total{reason="replay"}`). That is the graceful choice. The
//! record is only a safety net for a retry that most calls never need, and the request itself
//! flows to the upstream without it; ending calls that would have succeeded because the net
//! cannot be afforded would turn memory pressure into failures. So under memory pressure pnp
//! loses retries, not calls, and the bytes go back as soon as the call commits to a reply
//! ([`Replay::release`]) rather than when the request stream ends.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_core::Stream;
use pnp_call::{BoxMessageStream, Code, Part, Status};

use crate::budget::{BufferBudget, Reservation};

/// What the buffer budget refusals of the replay are counted as.
const BUDGET_REASON: &str = "replay";

/// Shared record of a call's request messages.
#[derive(Clone)]
pub(crate) struct Replay {
    shared: Arc<Mutex<Shared>>,
}

struct Shared {
    source: BoxMessageStream,
    recorded: Vec<Part>,
    recorded_bytes: usize,
    limit: usize,
    /// The recorded bytes' share of the global budget; `None` once recording stopped.
    reservation: Option<Reservation>,
    budget: BufferBudget,
    /// The request is not (or no longer) recorded whole: no retry can replay it.
    overflowed: bool,
    /// Messages taken from the client so far.
    seen: usize,
    /// How the client's stream ended: `Some(None)` cleanly, `Some(Some(status))` with an error.
    end: Option<Option<Status>>,
}

impl Replay {
    /// Record up to `limit` bytes of `source`'s messages, held under `budget`.
    pub(crate) fn new(source: BoxMessageStream, limit: usize, budget: BufferBudget) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source,
                recorded: Vec::new(),
                recorded_bytes: 0,
                limit,
                reservation: budget.try_reserve(0),
                budget,
                overflowed: false,
                seen: 0,
                end: None,
            })),
        }
    }

    /// A stream of the call's request messages from the first one, for one attempt.
    pub(crate) fn reader(&self) -> BoxMessageStream {
        Box::pin(Reader {
            shared: self.shared.clone(),
            next: 0,
            done: false,
        })
    }

    /// The request outgrew the replay buffer (or the buffer budget): it cannot be sent again.
    pub(crate) fn overflowed(&self) -> bool {
        self.shared.lock().map_or(true, |s| s.overflowed)
    }

    /// No attempt will follow (the call committed to a reply, or gave up): drop the record and
    /// give its bytes back to the budget. The live reader goes on passing messages through.
    pub(crate) fn release(&self) {
        if let Ok(mut shared) = self.shared.lock() {
            shared.stop_recording();
        }
    }
}

impl Shared {
    fn stop_recording(&mut self) {
        self.overflowed = true;
        self.recorded = Vec::new();
        self.reservation = None;
    }

    /// Keep `part` for a replay if the per-call limit and the global budget allow.
    fn record(&mut self, part: &Part) {
        if self.overflowed {
            return;
        }
        let len = part.payload_len();
        let total = self.recorded_bytes.saturating_add(len);
        if total > self.limit {
            self.stop_recording();
            return;
        }
        if !self.reservation.as_mut().is_some_and(|r| r.try_grow(len)) {
            self.budget.refused(BUDGET_REASON);
            tracing::debug!(
                budget = self.budget.limit(),
                recorded = self.recorded_bytes,
                message = len,
                "buffer budget spent: the request is no longer kept for a retry"
            );
            self.stop_recording();
            return;
        }
        self.recorded_bytes = total;
        self.recorded.push(part.clone());
    }
}

struct Reader {
    shared: Arc<Mutex<Shared>>,
    next: usize,
    done: bool,
}

impl Stream for Reader {
    type Item = Result<Part, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let Ok(mut shared) = this.shared.lock() else {
            this.done = true;
            return Poll::Ready(Some(Err(Status::new(
                Code::Internal,
                "pnp: request replay state poisoned",
            ))));
        };
        if this.next < shared.seen {
            // An earlier attempt read these: replay them, if they were kept.
            let message = (!shared.overflowed)
                .then(|| shared.recorded.get(this.next).cloned())
                .flatten();
            return match message {
                Some(message) => {
                    this.next += 1;
                    Poll::Ready(Some(Ok(message)))
                }
                None => {
                    this.done = true;
                    Poll::Ready(Some(Err(Status::new(
                        Code::Internal,
                        "pnp: request too large to replay",
                    ))))
                }
            };
        }
        if let Some(end) = &shared.end {
            this.done = true;
            return Poll::Ready(end.clone().map(Err));
        }
        match shared.source.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(message))) => {
                shared.seen += 1;
                this.next = shared.seen;
                shared.record(&message);
                Poll::Ready(Some(Ok(message)))
            }
            Poll::Ready(Some(Err(status))) => {
                shared.end = Some(Some(status.clone()));
                this.done = true;
                Poll::Ready(Some(Err(status)))
            }
            Poll::Ready(None) => {
                shared.end = Some(None);
                this.done = true;
                Poll::Ready(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn m(data: &'static str) -> Part {
        Part::Message(pnp_call::Message::new(data))
    }

    fn source(items: Vec<Result<Part, Status>>) -> BoxMessageStream {
        Box::pin(futures_util::stream::iter(items))
    }

    fn budget(limit: usize) -> BufferBudget {
        BufferBudget::new(limit, &pnp_telemetry::Metrics::new())
    }

    #[tokio::test]
    async fn a_second_reader_replays_what_the_first_read() {
        let replay = Replay::new(source(vec![Ok(m("a")), Ok(m("bc"))]), 1024, budget(1 << 20));
        let mut first = replay.reader();
        assert_eq!(first.next().await.map(|m| m.ok()), Some(Some(m("a"))));
        // The first attempt fails after one message; the second sees both.
        let second: Vec<_> = replay.reader().collect().await;
        assert_eq!(second, vec![Ok(m("a")), Ok(m("bc"))]);
        let third: Vec<_> = replay.reader().collect().await;
        assert_eq!(third.len(), 2);
        assert!(!replay.overflowed());
    }

    #[tokio::test]
    async fn overflow_stops_recording_and_refuses_replay() {
        let replay = Replay::new(source(vec![Ok(m("abc")), Ok(m("def"))]), 4, budget(1 << 20));
        let all: Vec<_> = replay.reader().collect().await;
        assert_eq!(all.len(), 2, "the live attempt still gets everything");
        assert!(replay.overflowed());
        let again: Vec<_> = replay.reader().collect().await;
        assert!(matches!(again.first(), Some(Err(s)) if s.code == Code::Internal));
    }

    #[tokio::test]
    async fn a_client_error_is_replayed_too() {
        let replay = Replay::new(
            source(vec![Ok(m("a")), Err(Status::new(Code::Cancelled, "gone"))]),
            1024,
            budget(1 << 20),
        );
        let first: Vec<_> = replay.reader().collect().await;
        assert_eq!(first.len(), 2);
        let second: Vec<_> = replay.reader().collect().await;
        assert!(matches!(second.last(), Some(Err(s)) if s.code == Code::Cancelled));
    }

    #[tokio::test]
    async fn a_spent_budget_stops_recording_but_not_the_call() {
        let metrics = pnp_telemetry::Metrics::new();
        let shared = BufferBudget::new(5, &metrics);
        let other = shared.try_reserve(2).expect("fits");
        let replay = Replay::new(source(vec![Ok(m("ab")), Ok(m("cd"))]), 1024, shared.clone());
        let all: Vec<_> = replay.reader().collect().await;
        assert_eq!(
            all,
            vec![Ok(m("ab")), Ok(m("cd"))],
            "the live attempt still gets everything"
        );
        assert!(replay.overflowed(), "2 + 2 + 2 bytes do not fit in 5");
        assert_eq!(shared.used(), 2, "the replay gave its bytes back");
        assert!(metrics
            .encode()
            .contains(r#"pnp_buffer_budget_refusals_total{reason="replay"} 1"#));
        let again: Vec<_> = replay.reader().collect().await;
        assert!(matches!(again.first(), Some(Err(s)) if s.code == Code::Internal));
        drop(other);
        assert_eq!(shared.used(), 0);
    }

    #[tokio::test]
    async fn recorded_bytes_are_held_until_release_or_drop() {
        let shared = budget(1024);
        let replay = Replay::new(
            source(vec![Ok(m("abc")), Ok(m("de"))]),
            1024,
            shared.clone(),
        );
        let mut live = replay.reader();
        assert!(live.next().await.is_some());
        assert_eq!(shared.used(), 3);
        // The call committed: the record goes, the live attempt reads on.
        replay.release();
        assert_eq!(shared.used(), 0);
        assert_eq!(live.next().await.map(|m| m.ok()), Some(Some(m("de"))));
        assert_eq!(shared.used(), 0, "nothing is recorded after the release");

        let replay = Replay::new(source(vec![Ok(m("xyz"))]), 1024, shared.clone());
        let _: Vec<_> = replay.reader().collect().await;
        assert_eq!(shared.used(), 3);
        drop(replay);
        assert_eq!(
            shared.used(),
            0,
            "dropping the last holder gives the bytes back"
        );
    }
}
