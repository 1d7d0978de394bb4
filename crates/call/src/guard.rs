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
/// Large messages come as a head and fragments. A reply that ends while one is open (a status,
/// the end of the stream, an abort) is cut short: its status is never OK, and
/// [`cut_inside_message`](Self::cut_inside_message) tells the driver that the client's stream
/// must be reset rather than ended with that status, since the client is inside a frame.
///
/// ```text
///   Open --message--> Open            Open --head(n)--> InMessage(n)
///   InMessage(k) --fragment(m ≤ k)--> InMessage(k-m), Open when k-m = 0 (and `last`)
///   Open --status---> Finished --anything--> Finished (ignored)
///   Open --end------> Finished (INTERNAL: "upstream ended the stream without a status")
///   Open --abort(s)-> Finished (s)
///   InMessage --status s / end / abort s--> Finished, cut (s if not OK, else INTERNAL)
///   a fragment outside a message, a head inside one, fragments past the length: INTERNAL
/// ```
#[derive(Debug, Default)]
pub struct ReplyGuard {
    finished: bool,
    messages: u64,
    /// Bytes still due of the open large message; 0 outside one.
    remaining: u64,
    in_message: bool,
    cut: bool,
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

    /// Whether the reply finished inside a large message, so the client's stream must be
    /// reset instead of ended with the status.
    pub fn cut_inside_message(&self) -> bool {
        self.cut
    }

    /// The transport produced an item (`Some`) or ended (`None`).
    pub fn on_item(&mut self, item: Option<ReplyItem>) -> GuardEvent {
        if self.finished {
            return GuardEvent::Done;
        }
        match item {
            Some(ReplyItem::Message(message)) if !self.in_message => {
                self.messages += 1;
                GuardEvent::Deliver(ReplyItem::Message(message))
            }
            Some(ReplyItem::Head { compressed, len }) if !self.in_message => {
                self.messages += 1;
                self.in_message = true;
                self.remaining = u64::from(len);
                GuardEvent::Deliver(ReplyItem::Head { compressed, len })
            }
            Some(ReplyItem::Fragment { data, last })
                if self.in_message && (data.len() as u64) <= self.remaining =>
            {
                self.remaining -= data.len() as u64;
                if last != (self.remaining == 0) {
                    return self.finish_with(Status::new(
                        Code::Internal,
                        "upstream message fragments do not add up to its length",
                    ));
                }
                if last {
                    self.in_message = false;
                }
                GuardEvent::Deliver(ReplyItem::Fragment { data, last })
            }
            Some(ReplyItem::Status(status)) => self.finish_with(status),
            Some(_) => self.finish_with(Status::new(
                Code::Internal,
                "upstream message parts out of order",
            )),
            None if self.in_message => self.finish_with(Status::new(
                Code::Internal,
                "upstream stream ended inside a message",
            )),
            None => self.finish_with(Status::new(
                Code::Internal,
                "upstream ended the stream without a status",
            )),
        }
    }

    fn finish_with(&mut self, status: Status) -> GuardEvent {
        self.finished = true;
        GuardEvent::Deliver(ReplyItem::Status(self.cut_short(status)))
    }

    /// Inside a message, no status may be OK, and the reply is cut.
    fn cut_short(&mut self, status: Status) -> Status {
        if !self.in_message {
            return status;
        }
        self.cut = true;
        if status.code == Code::Ok {
            Status::new(
                Code::Internal,
                format!(
                    "upstream ended inside a message ({} bytes of it missing)",
                    self.remaining
                ),
            )
        } else {
            status
        }
    }

    /// The proxy ends the reply itself (deadline, shutdown, bad request input). Returns the status
    /// to deliver, or `None` when the reply had already finished.
    pub fn abort(&mut self, status: Status) -> Option<Status> {
        if self.finished {
            return None;
        }
        self.finished = true;
        Some(self.cut_short(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;
    use bytes::Bytes;
    use proptest::prelude::*;

    /// How a generated reply ends.
    #[derive(Clone, Debug)]
    enum End {
        Status(Code),
        Stream,
        Abort(Code),
    }

    fn end() -> impl Strategy<Value = End> {
        prop_oneof![
            prop_oneof![
                Just(Code::Ok),
                Just(Code::Unavailable),
                Just(Code::Internal)
            ]
            .prop_map(End::Status),
            Just(End::Stream),
            prop_oneof![Just(Code::DeadlineExceeded), Just(Code::Unavailable)].prop_map(End::Abort),
        ]
    }

    proptest! {
        /// Whole messages and large ones in fragments, cut anywhere by a status, the end of
        /// the stream or an abort: exactly one status comes out; it is OK only when no
        /// message was open and the upstream said OK; a reply cut inside a message says so.
        #[test]
        fn exactly_one_status_and_never_ok_inside_a_message(
            messages in proptest::collection::vec((any::<bool>(), 0usize..40, 1usize..8), 0..6),
            stop_after in 0usize..60,
            end in end(),
        ) {
            // The items of the whole reply: small messages whole, others as head + fragments.
            let mut items = Vec::new();
            for (large, len, step) in &messages {
                if *large && *len > 0 {
                    items.push(ReplyItem::Head { compressed: false, len: *len as u32 });
                    let mut sent = 0;
                    while sent < *len {
                        let n = (*step).min(len - sent);
                        sent += n;
                        items.push(ReplyItem::Fragment {
                            data: Bytes::from(vec![0u8; n]),
                            last: sent == *len,
                        });
                    }
                } else {
                    items.push(ReplyItem::Message(Message::new(vec![0u8; *len])));
                }
            }
            let cut_at = stop_after.min(items.len());
            let mut guard = ReplyGuard::new();
            let mut inside = false;
            for item in items.into_iter().take(cut_at) {
                inside = match &item {
                    ReplyItem::Head { .. } => true,
                    ReplyItem::Fragment { last, .. } => !last,
                    _ => inside,
                };
                prop_assert!(matches!(guard.on_item(Some(item)), GuardEvent::Deliver(_)));
            }
            let status = match end.clone() {
                End::Status(code) => match guard.on_item(Some(ReplyItem::Status(Status::new(code, "")))) {
                    GuardEvent::Deliver(ReplyItem::Status(s)) => s,
                    other => panic!("{other:?}"),
                },
                End::Stream => match guard.on_item(None) {
                    GuardEvent::Deliver(ReplyItem::Status(s)) => s,
                    other => panic!("{other:?}"),
                },
                End::Abort(code) => guard.abort(Status::new(code, "")).expect("a status"),
            };
            prop_assert!(guard.is_finished());
            prop_assert_eq!(guard.cut_inside_message(), inside);
            let upstream_ok = matches!(end, End::Status(Code::Ok));
            prop_assert_eq!(status.code == Code::Ok, upstream_ok && !inside);
            // Nothing after the one status.
            prop_assert_eq!(guard.on_item(None), GuardEvent::Done);
            prop_assert_eq!(guard.abort(Status::ok()), None);
        }
    }

    #[test]
    fn fragments_past_the_length_or_outside_a_message_are_errors() {
        let mut guard = ReplyGuard::new();
        let event = guard.on_item(Some(ReplyItem::Fragment {
            data: Bytes::from_static(b"x"),
            last: true,
        }));
        assert!(
            matches!(event, GuardEvent::Deliver(ReplyItem::Status(s)) if s.code == Code::Internal)
        );
        let mut guard = ReplyGuard::new();
        guard.on_item(Some(ReplyItem::Head {
            compressed: false,
            len: 2,
        }));
        let event = guard.on_item(Some(ReplyItem::Fragment {
            data: Bytes::from_static(b"xyz"),
            last: true,
        }));
        assert!(
            matches!(event, GuardEvent::Deliver(ReplyItem::Status(s)) if s.code == Code::Internal)
        );
        assert!(guard.cut_inside_message());
    }

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
