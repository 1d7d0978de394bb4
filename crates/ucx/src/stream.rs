//! The call ends that live outside the driver thread (all `Send`): sending parts under the
//! peer's credit, the request stream a server handler reads, the reply stream a client reads,
//! and the sink a server handler answers into.
#![forbid(unsafe_code)]

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use futures_util::{FutureExt, StreamExt};
use pnp_call::{Code, Part, Reply, ReplyItem, Status};
use pnp_transport::TransportError;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::driver::{Command, ConnId, DriverHandle, Inbound};
use crate::frame::{CallId, Frame};
use crate::pool::BufferPool;

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

/// A stream whose fragments that are ready together go out as one: a large message read
/// from HTTP/2 comes in pieces of its DATA frames (16–64 KiB), and one UCX active message per
/// piece costs more than copying them into one (shared memory: 0.4 GiB/s with 16 KiB pieces
/// against 3 GiB/s with 2 MiB ones). Only what is ready now is gathered: nothing waits for
/// more, so a stream's latency is unchanged.
pub(crate) struct Gather<S: Stream + Unpin> {
    inner: S,
    /// An item taken while gathering that was not a fragment of the same message.
    peeked: Option<Option<S::Item>>,
    pool: Arc<BufferPool>,
    /// Gather until at least this many bytes (then `split` cuts to the frame limit).
    max: usize,
}

impl<S: Stream + Unpin> Gather<S> {
    pub(crate) fn new(inner: S, pool: Arc<BufferPool>, max: u32) -> Self {
        Self {
            inner,
            peeked: None,
            pool,
            max: max.max(1) as usize,
        }
    }

    /// The next item; a fragment together with the fragments of its message ready after it
    /// (`fragment` tells a fragment's bytes and `last` flag, or gives the item back).
    pub(crate) async fn next(
        &mut self,
        fragment: impl Fn(S::Item) -> Piece<S::Item>,
    ) -> Option<Piece<S::Item>> {
        let item = match self.peeked.take() {
            Some(peeked) => peeked,
            None => self.inner.next().await,
        }?;
        let (first, mut last) = match fragment(item) {
            Piece::Fragment(data, last) => (data, last),
            other @ Piece::Other(_) => return Some(other),
        };
        let mut total = first.len();
        let mut pieces: Vec<Bytes> = Vec::new();
        while !last && total < self.max {
            let Some(next) = self.inner.next().now_or_never() else {
                break;
            };
            let Some(next) = next else {
                self.peeked = Some(None);
                break;
            };
            match fragment(next) {
                Piece::Fragment(data, l) => {
                    total += data.len();
                    last = l;
                    pieces.push(data);
                }
                Piece::Other(other) => {
                    self.peeked = Some(Some(other));
                    break;
                }
            }
        }
        if pieces.is_empty() {
            return Some(Piece::Fragment(first, last));
        }
        let mut buf = self.pool.take_empty(total);
        buf.extend_from_slice(&first);
        for piece in &pieces {
            buf.extend_from_slice(piece);
        }
        Some(Piece::Fragment(self.pool.freeze(buf), last))
    }
}

/// An item of a [`Gather`]ed stream: a fragment's bytes and `last` flag, or anything else.
pub(crate) enum Piece<T> {
    Fragment(Bytes, bool),
    Other(T),
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
            self.frame(self.data(piece));
        }
        Ok(!self.done.is_cancelled())
    }

    /// Send `part` at once if it fits in one frame and its credit is there; otherwise give
    /// it back.
    fn try_send(&self, part: Part) -> Result<(), Part> {
        let len = part.payload_len();
        if len > self.max_fragment as usize {
            return Err(part);
        }
        if len > 0 {
            match self.credit.try_acquire_many(len as u32) {
                Ok(permit) => permit.forget(),
                Err(_) => return Err(part),
            }
        }
        self.frame(self.data(part));
        Ok(())
    }

    /// `part` as this call's frame in this direction.
    fn data(&self, part: Part) -> Frame {
        let call = self.call;
        if self.request {
            Frame::Request { call, part }
        } else {
            Frame::Response { call, part }
        }
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
            Ok(Reply::Stream { head, items }) => {
                let call = self.sender.call;
                self.sender.frame(Frame::ResponseHead { call, head });
                let mut items = Gather::new(
                    items,
                    self.sender.driver.pool.clone(),
                    self.sender.max_fragment,
                );
                let fragment = |item: ReplyItem| match item {
                    ReplyItem::Fragment { data, last } => Piece::Fragment(data, last),
                    other => Piece::Other(other),
                };
                loop {
                    let item = tokio::select! {
                        item = items.next(fragment) => item.map(|piece| match piece {
                            Piece::Fragment(data, last) => ReplyItem::Fragment { data, last },
                            Piece::Other(item) => item,
                        }),
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

/// Sends the request parts that are ready now (whole messages and heads, each within one
/// frame and its credit), and the half-close if the stream has ended: a unary call's open, message and half-close leave
/// together, with no task of their own. What is left (`None`: nothing) is for
/// [`pump_requests`].
pub(crate) fn send_ready(
    mut messages: pnp_call::BoxMessageStream,
    sender: &PartSender,
) -> Option<pnp_call::BoxMessageStream> {
    let call = sender.call;
    loop {
        match messages.next().now_or_never() {
            None => return Some(messages),
            Some(None) => {
                sender.frame(Frame::HalfClose { call });
                return None;
            }
            Some(Some(Err(_))) => {
                sender.frame(Frame::Cancel { call });
                return None;
            }
            Some(Some(Ok(part))) => {
                // Fragments go to the pump, which gathers the ones that are ready together.
                let sent = if matches!(part, Part::Fragment { .. }) {
                    Err(part)
                } else {
                    sender.try_send(part)
                };
                if let Err(part) = sent {
                    let first = futures_util::stream::iter([Ok(part)]);
                    return Some(Box::pin(first.chain(messages)));
                }
            }
        }
    }
}

/// Sends a client's request parts, then the half-close; a failed request stream cancels the
/// call. Runs as its own task until the call ends.
pub(crate) async fn pump_requests(messages: pnp_call::BoxMessageStream, sender: PartSender) {
    let mut messages = Gather::new(messages, sender.driver.pool.clone(), sender.max_fragment);
    let fragment = |item: Result<Part, Status>| match item {
        Ok(Part::Fragment { data, last }) => Piece::Fragment(data, last),
        other => Piece::Other(other),
    };
    loop {
        let next = tokio::select! {
            next = messages.next(fragment) => next,
            () = sender.done.cancelled() => return,
        };
        let next = match next {
            Some(Piece::Fragment(data, last)) => Some(Ok(Part::Fragment { data, last })),
            Some(Piece::Other(item)) => Some(item),
            None => None,
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

    fn fragment(item: Result<Part, Status>) -> Piece<Result<Part, Status>> {
        match item {
            Ok(Part::Fragment { data, last }) => Piece::Fragment(data, last),
            other => Piece::Other(other),
        }
    }

    /// A gathered item back as a part.
    fn part(piece: Piece<Result<Part, Status>>) -> Part {
        match piece {
            Piece::Fragment(data, last) => Part::Fragment { data, last },
            Piece::Other(item) => item.expect("ok"),
        }
    }

    fn piece(byte: u8, len: usize, last: bool) -> Part {
        Part::Fragment {
            data: Bytes::from(vec![byte; len]),
            last,
        }
    }

    #[tokio::test]
    async fn fragments_ready_together_are_gathered_and_nothing_else_moves() {
        let pool = crate::pool::BufferPool::new(1 << 20);
        let mut items: Vec<Part> = vec![
            Part::Message(Message::new(Bytes::from_static(b"small"))),
            Part::Head {
                compressed: false,
                len: 10 * 16384,
            },
        ];
        items.extend((0..10u8).map(|i| piece(i, 16384, i == 9)));
        items.push(Part::Message(Message::new(Bytes::from_static(b"after"))));
        let stream = futures_util::stream::iter(items.into_iter().map(Ok));
        let mut gather = Gather::new(stream, pool, 65536);
        let mut out = Vec::new();
        while let Some(item) = gather.next(fragment).await {
            out.push(part(item));
        }
        let shapes: Vec<(usize, bool)> = out
            .iter()
            .filter_map(|p| match p {
                Part::Fragment { data, last } => Some((data.len(), *last)),
                _ => None,
            })
            .collect();
        assert_eq!(
            shapes,
            vec![(65536, false), (65536, false), (32768, true)],
            "gathered up to the limit, the last flag on the last"
        );
        assert!(matches!(&out[0], Part::Message(m) if &m.data[..] == b"small"));
        assert!(matches!(&out[1], Part::Head { .. }));
        assert!(matches!(&out[5], Part::Message(m) if &m.data[..] == b"after"));
        assert_eq!(out.len(), 6);
        // The bytes are the pieces' bytes in order.
        let Part::Fragment { data, .. } = &out[2] else {
            panic!("a fragment")
        };
        for (i, chunk) in data.chunks(16384).enumerate() {
            assert!(chunk.iter().all(|&b| b == i as u8));
        }
    }

    #[tokio::test]
    async fn a_fragment_that_is_not_ready_is_not_waited_for() {
        let pool = crate::pool::BufferPool::new(1 << 20);
        let (tx, rx) = mpsc::unbounded_channel::<Result<Part, Status>>();
        let stream = tokio_stream_like(rx);
        let mut gather = Gather::new(stream, pool, 1 << 20);
        tx.send(Ok(piece(1, 100, false))).expect("send");
        tx.send(Ok(piece(2, 100, false))).expect("send");
        let first = part(gather.next(fragment).await.expect("item"));
        assert!(matches!(first, Part::Fragment { ref data, last: false } if data.len() == 200));
        tx.send(Ok(piece(3, 100, true))).expect("send");
        drop(tx);
        let second = part(gather.next(fragment).await.expect("item"));
        assert!(matches!(second, Part::Fragment { ref data, last: true } if data.len() == 100));
        assert!(gather.next(fragment).await.is_none());
    }

    fn sender(driver: DriverHandle, credit: usize) -> PartSender {
        PartSender {
            driver,
            conn: 1,
            call: 7,
            credit: Arc::new(Semaphore::new(credit)),
            done: CancellationToken::new(),
            max_fragment: 1 << 20,
            request: true,
        }
    }

    /// The frames the driver was handed: (kind, payload length).
    fn sent(rx: &mut mpsc::UnboundedReceiver<Command>) -> Vec<(&'static str, usize)> {
        let mut out = Vec::new();
        while let Ok(command) = rx.try_recv() {
            let Command::Send { frame, .. } = command else {
                panic!("only sends expected")
            };
            out.push(match frame {
                Frame::Request { part, .. } => match part {
                    Part::Message(m) => ("message", m.data.len()),
                    Part::Head { .. } => ("head", 0),
                    Part::Fragment { data, .. } => ("fragment", data.len()),
                },
                Frame::HalfClose { .. } => ("half-close", 0),
                Frame::Cancel { .. } => ("cancel", 0),
                _ => ("other", 0),
            });
        }
        out
    }

    #[tokio::test]
    async fn a_unary_request_leaves_whole_and_fragments_are_left_to_the_pump() {
        let (driver, mut rx) = DriverHandle::detached();
        let unary: pnp_call::BoxMessageStream = Box::pin(futures_util::stream::iter([Ok(
            Part::Message(Message::new(Bytes::from_static(b"hello"))),
        )]));
        assert!(send_ready(unary, &sender(driver.clone(), 1 << 20)).is_none());
        assert_eq!(sent(&mut rx), vec![("message", 5), ("half-close", 0)]);

        // A large message: its head leaves, its first fragment waits for the pump (which
        // gathers it with the others).
        let parts = vec![
            Part::Head {
                compressed: false,
                len: 200,
            },
            piece(1, 100, false),
            piece(2, 100, true),
        ];
        let large: pnp_call::BoxMessageStream =
            Box::pin(futures_util::stream::iter(parts.into_iter().map(Ok)));
        let rest = send_ready(large, &sender(driver.clone(), 1 << 20)).expect("a rest");
        assert_eq!(sent(&mut rx), vec![("head", 0)]);
        let rest: Vec<Part> = rest.map(|p| p.expect("ok")).collect().await;
        assert_eq!(rest, vec![piece(1, 100, false), piece(2, 100, true)]);

        // A message without credit yet is left to the pump too.
        let unary: pnp_call::BoxMessageStream = Box::pin(futures_util::stream::iter([Ok(
            Part::Message(Message::new(Bytes::from_static(b"hello"))),
        )]));
        let rest = send_ready(unary, &sender(driver, 4)).expect("a rest");
        assert!(sent(&mut rx).is_empty());
        assert_eq!(rest.count().await, 1);
    }

    fn tokio_stream_like<T: Send + 'static>(
        mut rx: mpsc::UnboundedReceiver<T>,
    ) -> impl Stream<Item = T> + Unpin {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

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
