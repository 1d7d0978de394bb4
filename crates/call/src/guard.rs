//! The rule that every reply ends with exactly one status.

use crate::{Code, ReplyItem, Status};

/// What the driver of a reply should do with the next thing its transport produced.
#[derive(Clone, Debug, PartialEq)]
pub enum GuardEvent {
    /// Deliver this item to the client.
    Deliver(ReplyItem),
    /// The reply is over; deliver nothing more.
    Done,
}

/// Sans-IO checker for a reply stream: feed it what the transport produced and deliver what it
/// says. After a status, everything else is dropped; a stream that ends (or is ended by the
/// proxy) without a status produces an error status, never OK.
///
/// ```text
///   Open --message--> Open
///   Open --status---> Finished --anything--> Finished (ignored)
///   Open --end------> Finished (INTERNAL: "upstream ended the stream without a status")
///   Open --abort(s)-> Finished (s)
/// ```
#[derive(Debug, Default)]
pub struct ReplyGuard {
    finished: bool,
    messages: u64,
}

impl ReplyGuard {
    /// A guard for a new reply.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the final status has been produced.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// How many messages were delivered.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// The transport produced an item (`Some`) or ended (`None`).
    pub fn on_item(&mut self, item: Option<ReplyItem>) -> GuardEvent {
        if self.finished {
            return GuardEvent::Done;
        }
        match item {
            Some(ReplyItem::Message(message)) => {
                self.messages += 1;
                GuardEvent::Deliver(ReplyItem::Message(message))
            }
            Some(ReplyItem::Status(status)) => {
                self.finished = true;
                GuardEvent::Deliver(ReplyItem::Status(status))
            }
            None => {
                self.finished = true;
                GuardEvent::Deliver(ReplyItem::Status(Status::new(
                    Code::Internal,
                    "upstream ended the stream without a status",
                )))
            }
        }
    }

    /// The proxy ends the reply itself (deadline, shutdown, bad request input). Returns the status
    /// to deliver, or `None` when the reply had already finished.
    pub fn abort(&mut self, status: Status) -> Option<Status> {
        if self.finished {
            return None;
        }
        self.finished = true;
        Some(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    #[test]
    fn a_stream_without_status_is_never_ok() {
        let mut guard = ReplyGuard::new();
        assert!(matches!(
            guard.on_item(Some(ReplyItem::Message(Message::new("a")))),
            GuardEvent::Deliver(ReplyItem::Message(_))
        ));
        match guard.on_item(None) {
            GuardEvent::Deliver(ReplyItem::Status(status)) => {
                assert_eq!(status.code, Code::Internal)
            }
            other => panic!("expected a status, got {other:?}"),
        }
        assert_eq!(guard.on_item(None), GuardEvent::Done);
    }

    #[test]
    fn nothing_after_the_status() {
        let mut guard = ReplyGuard::new();
        let ok = Status::ok();
        assert_eq!(
            guard.on_item(Some(ReplyItem::Status(ok.clone()))),
            GuardEvent::Deliver(ReplyItem::Status(ok))
        );
        assert_eq!(
            guard.on_item(Some(ReplyItem::Message(Message::new("late")))),
            GuardEvent::Done
        );
        assert_eq!(guard.abort(Status::new(Code::Cancelled, "x")), None);
        assert_eq!(guard.messages(), 0);
    }

    #[test]
    fn abort_wins_once() {
        let mut guard = ReplyGuard::new();
        let status = guard.abort(Status::new(Code::DeadlineExceeded, "deadline"));
        assert_eq!(status.map(|s| s.code), Some(Code::DeadlineExceeded));
        assert!(guard.is_finished());
        assert_eq!(
            guard.on_item(Some(ReplyItem::Status(Status::ok()))),
            GuardEvent::Done
        );
    }
}
