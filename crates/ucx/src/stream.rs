//! The call ends that live outside the driver thread (all `Send`): sending parts under the
//! peer's credit, the request stream a server handler reads, the reply stream a client reads,
//! and the sink a server handler answers into.
#![forbid(unsafe_code)]

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use futures_util::StreamExt;
use pnp_call::{Code, Part, Reply, ReplyItem, Status};
use pnp_transport::TransportError;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::driver::{Command, ConnId, DriverHandle, Inbound};
use crate::frame::{CallId, Frame};

/// `part` cut to frames of at most `max` payload bytes: a longer message becomes a head and
/// fragments, a longer fragment several (zero-copy slices).
pub(crate) fn split(part: Part, max: u32) -> Result<Vec<Part>, Box<Status>> {
    let max = max.max(1) as usize;
    let chunks = |data: Bytes, last: bool| {
        let n = data.len().div_ceil(max);
        (0..n).map(move |i| Part::Fragment {
            data: data.slice(i * max..((i + 1) * max).min(data.len())),
            last: last && i + 1 == n,
        })
    };
    Ok(match part {
        Part::Message(m) if m.data.len() > max => {
            let len = u32::try_from(m.data.len())
                .map_err(|_| Status::new(Code::ResourceExhausted, "message larger than 4 GiB"))?;
            std::iter::once(Part::Head {
                compressed: m.compressed,
                len,
            })
            .chain(chunks(m.data, true))
            .collect()
        }
        Part::Fragment { data, last } if data.len() > max => chunks(data, last).collect(),
        other => vec![other],
    })
}

/// Sends one call's parts in one direction, each after the peer granted credit for it.
#[derive(Debug)]
pub(crate) struct PartSender {
    pub(crate) driver: DriverHandle,
    pub(crate) conn: ConnId,
    pub(crate) call: CallId,
    pub(crate) credit: Arc<Semaphore>,
    pub(crate) done: CancellationToken,
    pub(crate) max_fragment: u32,
    /// Requests (client) or responses (server).
    pub(crate) request: bool,
}

impl PartSender {
    /// Send `part`; `false` when the call ended meanwhile.
    pub(crate) async fn send(&self, part: Part) -> Result<bool, Box<Status>> {
        for piece in split(part, self.max_fragment)? {
            let len = piece.payload_len() as u32;
            if len > 0 {
                let permit = tokio::select! {
                    permit = self.credit.acquire_many(len) => permit,
                    () = self.done.cancelled() => return Ok(false),
                };
                match permit {
                    Ok(permit) => permit.forget(),
                    Err(_) => return Ok(false),
                }
            }
            let frame = if self.request {
                Frame::Request {
                    call: self.call,
                    part: piece,
                }
            } else {
                Frame::Response {
                    call: self.call,
                    part: piece,
                }
            };
            self.frame(frame);
        }
        Ok(!self.done.is_cancelled())
    }

    pub(crate) fn frame(&self, frame: Frame) {
        self.driver.send(Command::Send {
            conn: self.conn,
            frame,
        });
    }
}

/// Gives credit back to the peer as the consumer takes payload, in batches.
#[derive(Debug)]
struct CreditReturn {
    driver: DriverHandle,
    conn: ConnId,
    call: CallId,
    pending: u32,
    batch: u32,
}

impl CreditReturn {
    fn new(driver: DriverHandle, conn: ConnId, call: CallId, window: u32) -> Self {
        Self {
            driver,
            conn,
            call,
            pending: 0,
            batch: (window / 4).max(1),
        }
    }

    fn took(&mut self, bytes: usize) {
        self.pending = self.pending.saturating_add(bytes as u32);
        if self.pending >= self.batch {
            self.driver.send(Command::Credit {
                conn: self.conn,
                call: self.call,
                bytes: std::mem::take(&mut self.pending),
            });
        }
    }
}

/// The request messages of an incoming call, as its handler reads them. Ends after the
/// client's half-close; an `Err` says the call was cancelled or its connection lost.
pub struct RequestMessages {
    rx: mpsc::UnboundedReceiver<Inbound>,
    credit: CreditReturn,
    ended: bool,
}

impl std::fmt::Debug for RequestMessages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMessages")
            .field("call", &self.credit.call)
            .finish_non_exhaustive()
    }
}

impl RequestMessages {
    pub(crate) fn new(
        rx: mpsc::UnboundedReceiver<Inbound>,
        driver: DriverHandle,
        conn: ConnId,
        call: CallId,
        window: u32,
    ) -> Self {
        Self {
            rx,
            credit: CreditReturn::new(driver, conn, call, window),
            ended: false,
        }
    }
}

impl Stream for RequestMessages {
    type Item = Result<Part, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let item = match std::task::ready!(self.rx.poll_recv(cx)) {
            Some(Ok(Frame::Request { part, .. })) => {
                self.credit.took(part.payload_len());
                return Poll::Ready(Some(Ok(part)));
            }
            Some(Ok(Frame::HalfClose { .. })) | None => None,
            Some(Ok(_)) => Some(Err(Status::new(Code::Internal, "unexpected UCX frame"))),
            Some(Err(status)) => Some(Err(*status)),
        };
        self.ended = true;
        Poll::Ready(item)
    }
}

/// Where the handler of an incoming call sends its reply. Dropping it unanswered ends the
/// call with INTERNAL.
#[derive(Debug)]
pub struct ReplySink {
    sender: PartSender,
    answered: bool,
}

impl ReplySink {
    pub(crate) fn new(
        driver: DriverHandle,
        conn: ConnId,
        call: CallId,
        credit: Arc<Semaphore>,
        done: CancellationToken,
        max_fragment: u32,
    ) -> Self {
        Self {
            sender: PartSender {
                driver,
                conn,
                call,
                credit,
                done,
                max_fragment,
                request: false,
            },
            answered: false,
        }
    }

    /// Resolves when the call is over on the client's side: it cancelled, or its connection
    /// was lost (the request stream then yields the status).
    pub async fn cancelled(&self) {
        self.sender.done.cancelled().await;
    }

    /// Whether the call is already over (cancelled, lost, or answered).
    pub fn is_cancelled(&self) -> bool {
        self.sender.done.is_cancelled()
    }

    /// Send the reply: what a [`pnp_transport::Transport`] returned for the call (an error
    /// becomes its status). Response messages go out as the client grants credit; a reply
    /// stream that ends without a status ends the call INTERNAL; if the client cancels
    /// meanwhile, the reply (and with it the upstream call) is dropped.
    pub async fn send(mut self, reply: Result<Reply, TransportError>) {
        self.answered = true;
        let status = match reply {
            Err(e) => *e.status,
            Ok(Reply::TrailersOnly(status)) => status,
            Ok(Reply::Stream { head, mut items }) => {
                let call = self.sender.call;
                self.sender.frame(Frame::ResponseHead { call, head });
                loop {
                    let item = tokio::select! {
                        item = items.next() => item,
                        () = self.sender.done.cancelled() => return,
                    };
                    let part = match item {
                        Some(ReplyItem::Status(status)) => break status,
                        None => {
                            break Status::new(Code::Internal, "the reply ended without a status")
                        }
                        Some(ReplyItem::Message(m)) => Part::Message(m),
                        Some(ReplyItem::Head { compressed, len }) => Part::Head { compressed, len },
                        Some(ReplyItem::Fragment { data, last }) => Part::Fragment { data, last },
                    };
                    match self.sender.send(part).await {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(status) => break *status,
                    }
                }
            }
        };
        let call = self.sender.call;
        self.sender.frame(Frame::Status { call, status });
    }
}

impl Drop for ReplySink {
    fn drop(&mut self) {
        if !self.answered && !self.sender.done.is_cancelled() {
            let call = self.sender.call;
            self.sender.frame(Frame::Status {
                call,
                status: Status::new(Code::Internal, "the call's handler ended without a reply"),
            });
        }
    }
}

/// Sends a client's request parts, then the half-close; a failed request stream cancels the
/// call. Runs as its own task until the call ends.
pub(crate) async fn pump_requests(mut messages: pnp_call::BoxMessageStream, sender: PartSender) {
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            () = sender.done.cancelled() => return,
        };
        match next {
            None => {
                let call = sender.call;
                return sender.frame(Frame::HalfClose { call });
            }
            Some(Err(_)) => {
                let call = sender.call;
                return sender.frame(Frame::Cancel { call });
            }
            Some(Ok(part)) => match sender.send(part).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(_) => {
                    let call = sender.call;
                    return sender.frame(Frame::Cancel { call });
                }
            },
        }
    }
}

/// A client's reply items; dropping it before the status cancels the call.
pub(crate) struct ReplyItems {
    rx: mpsc::UnboundedReceiver<Inbound>,
    credit: CreditReturn,
    finished: bool,
}

impl ReplyItems {
    pub(crate) fn new(
        rx: mpsc::UnboundedReceiver<Inbound>,
        driver: DriverHandle,
        conn: ConnId,
        call: CallId,
        window: u32,
    ) -> Self {
        Self {
            rx,
            credit: CreditReturn::new(driver, conn, call, window),
            finished: false,
        }
    }

    /// The next inbound frame (for the response head).
    pub(crate) async fn recv(&mut self) -> Option<Inbound> {
        self.rx.recv().await
    }

    /// The call ended without this stream (a trailers-only reply, or an error).
    pub(crate) fn finish(&mut self) {
        self.finished = true;
    }
}

impl Stream for ReplyItems {
    type Item = ReplyItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ReplyItem>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let status = match std::task::ready!(self.rx.poll_recv(cx)) {
            Some(Ok(Frame::Response { part, .. })) => {
                self.credit.took(part.payload_len());
                return Poll::Ready(Some(part.into()));
            }
            Some(Ok(Frame::Status { status, .. })) => status,
            Some(Ok(_)) => Status::new(Code::Internal, "unexpected UCX frame in a reply"),
            Some(Err(status)) => *status,
            None => Status::new(Code::Unavailable, "the UCX transport shut down"),
        };
        self.finished = true;
        Poll::Ready(Some(ReplyItem::Status(status)))
    }
}

impl Drop for ReplyItems {
    fn drop(&mut self) {
        if !self.finished {
            self.credit.driver.send(Command::Send {
                conn: self.credit.conn,
                frame: Frame::Cancel {
                    call: self.credit.call,
                },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnp_call::Message;

    #[test]
    fn long_messages_become_a_head_and_fragments_that_add_up() {
        let data = Bytes::from((0..10u8).collect::<Vec<_>>());
        let parts = split(Part::Message(Message::new(data.clone())), 4).expect("split");
        assert_eq!(
            parts,
            vec![
                Part::Head {
                    compressed: false,
                    len: 10
                },
                Part::Fragment {
                    data: data.slice(0..4),
                    last: false
                },
                Part::Fragment {
                    data: data.slice(4..8),
                    last: false
                },
                Part::Fragment {
                    data: data.slice(8..10),
                    last: true
                },
            ]
        );
        let short = Part::Message(Message::new(data.clone()));
        assert_eq!(split(short.clone(), 10).expect("split"), vec![short]);
        let fragment = Part::Fragment {
            data: data.clone(),
            last: false,
        };
        let pieces = split(fragment, 6).expect("split");
        assert_eq!(pieces.len(), 2);
        assert!(pieces
            .iter()
            .all(|p| matches!(p, Part::Fragment { last: false, .. })));
    }
}
