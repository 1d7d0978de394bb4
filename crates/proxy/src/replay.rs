//! The request messages of a call, kept so a retry can send them again (gRFC A6 "buffering").
//!
//! Attempts run one after another, never at once. Each attempt reads through a [`Replay`]
//! reader: first the messages already recorded, then new ones from the client, which are
//! recorded as they pass. Once the recorded bytes exceed the limit the record is dropped and the
//! call can no longer be retried (the policy sees `replay_overflowed`).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_core::Stream;
use pnp_call::{BoxMessageStream, Code, Message, Status};

/// Shared record of a call's request messages.
#[derive(Clone)]
pub(crate) struct Replay {
    shared: Arc<Mutex<Shared>>,
}

struct Shared {
    source: BoxMessageStream,
    recorded: Vec<Message>,
    recorded_bytes: usize,
    limit: usize,
    overflowed: bool,
    /// Messages taken from the client so far.
    seen: usize,
    /// How the client's stream ended: `Some(None)` cleanly, `Some(Some(status))` with an error.
    end: Option<Option<Status>>,
}

impl Replay {
    pub(crate) fn new(source: BoxMessageStream, limit: usize) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source,
                recorded: Vec::new(),
                recorded_bytes: 0,
                limit,
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

    /// The request outgrew the replay buffer: it cannot be sent again.
    pub(crate) fn overflowed(&self) -> bool {
        self.shared.lock().map_or(true, |s| s.overflowed)
    }
}

struct Reader {
    shared: Arc<Mutex<Shared>>,
    next: usize,
    done: bool,
}

impl Stream for Reader {
    type Item = Result<Message, Status>;

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
                if !shared.overflowed {
                    shared.recorded_bytes =
                        shared.recorded_bytes.saturating_add(message.data.len());
                    if shared.recorded_bytes > shared.limit {
                        shared.overflowed = true;
                        shared.recorded = Vec::new();
                    } else {
                        shared.recorded.push(message.clone());
                    }
                }
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

    fn source(items: Vec<Result<Message, Status>>) -> BoxMessageStream {
        Box::pin(futures_util::stream::iter(items))
    }

    #[tokio::test]
    async fn a_second_reader_replays_what_the_first_read() {
        let replay = Replay::new(
            source(vec![Ok(Message::new("a")), Ok(Message::new("bc"))]),
            1024,
        );
        let mut first = replay.reader();
        assert_eq!(
            first.next().await.map(|m| m.ok()),
            Some(Some(Message::new("a")))
        );
        // The first attempt fails after one message; the second sees both.
        let second: Vec<_> = replay.reader().collect().await;
        assert_eq!(second, vec![Ok(Message::new("a")), Ok(Message::new("bc"))]);
        let third: Vec<_> = replay.reader().collect().await;
        assert_eq!(third.len(), 2);
        assert!(!replay.overflowed());
    }

    #[tokio::test]
    async fn overflow_stops_recording_and_refuses_replay() {
        let replay = Replay::new(
            source(vec![Ok(Message::new("abc")), Ok(Message::new("def"))]),
            4,
        );
        let all: Vec<_> = replay.reader().collect().await;
        assert_eq!(all.len(), 2, "the live attempt still gets everything");
        assert!(replay.overflowed());
        let again: Vec<_> = replay.reader().collect().await;
        assert!(matches!(again.first(), Some(Err(s)) if s.code == Code::Internal));
    }

    #[tokio::test]
    async fn a_client_error_is_replayed_too() {
        let replay = Replay::new(
            source(vec![
                Ok(Message::new("a")),
                Err(Status::new(Code::Cancelled, "gone")),
            ]),
            1024,
        );
        let first: Vec<_> = replay.reader().collect().await;
        assert_eq!(first.len(), 2);
        let second: Vec<_> = replay.reader().collect().await;
        assert!(matches!(second.last(), Some(Err(s)) if s.code == Code::Cancelled));
    }
}
