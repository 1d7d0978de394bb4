//! Driving a reply back to the client.
//!
//! [`ReplyBody`] is the response body the connection writes. It pulls reply items from the egress
//! transport and encodes each one as soon as it arrives (one HTTP/2 DATA frame or one HTTP/1.1
//! chunk per message: never buffered).
//!
//! The call's clocks do not live in the body's poll, because a client that stops reading stops
//! the polls too. A **watchdog** task per call runs them instead: on the deadline it ends the call
//! with DEADLINE_EXCEEDED, on a stream clock with UNAVAILABLE, at the end of the shutdown grace
//! period with UNAVAILABLE, on a request-side error with that error's status. Ending the call
//! drops the upstream stream (RST_STREAM CANCEL upstream), stops the request pipe (so a
//! client-streaming upstream is reset too), records the call and releases its admission permit,
//! all at once, and leaves the status frame for the body. If the client has no window for what
//! waits (HTTP/2 knows), or has not taken the status [`STATUS_GRACE`] later, the watchdog fires
//! the call's [`ClientReset`]: the client's HTTP/2 stream is reset or its HTTP/1.1 connection
//! closed. When the client goes away the
//! connection drops this body, which resets the upstream the same way.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pnp_call::{BoxReplyStream, GuardEvent, ReplyGuard, ReplyItem, Status};
use pnp_wire::frame::FrameBuf;
use pnp_wire::{text, trailers};
use tokio_util::sync::CancellationToken;

use std::time::Instant;

use bytes::BytesMut;
use pnp_call::Code;
use pnp_policy::deadline::{Deadline, DeadlineSource};
use pnp_policy::idle::{ClockKind, Direction, Expired, StreamClocks};
use pnp_telemetry::{CallRecorder, Metrics};
use tokio::time::Instant as TokioInstant;

use crate::abort::CallAbort;
use crate::admission::Permit;
use crate::budget::{budget_status, BufferBudget, Reservation};
use crate::conn::ClientReset;
use crate::request::RequestActivity;

/// How long a client has to take a call's final status once pnp ended the call, before its
/// stream is reset (HTTP/2) or its connection closed (HTTP/1.1).
pub(crate) const STATUS_GRACE: Duration = Duration::from_secs(1);
/// The same for a client that has no window for what waits to be written (HTTP/2).
pub(crate) const STALLED_GRACE: Duration = Duration::from_millis(100);

/// How replies are written to this client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// Native gRPC: messages as DATA, status as HTTP/2 trailers.
    Grpc,
    /// gRPC-Web binary: messages and a final trailer frame (0x80) in the body.
    WebBinary,
    /// gRPC-Web text: the same frames, each flush base64-encoded with padding.
    WebText,
}

impl Encoding {
    /// The response content type for a message subtype (`proto`, `json`, …).
    pub fn content_type(self, subtype: Option<&str>) -> String {
        let base = match self {
            Encoding::Grpc => "application/grpc",
            Encoding::WebBinary => "application/grpc-web",
            Encoding::WebText => "application/grpc-web-text",
        };
        match subtype {
            Some(sub) => format!("{base}+{sub}"),
            None => base.to_owned(),
        }
    }

    /// A message, a large message's head, or one of its fragments, in this encoding. In text
    /// mode each piece is base64 on its own, padded (gRPC-Web text decoders take padding at any
    /// quantum).
    fn part(self, frame: FrameBuf) -> FrameBuf {
        match self {
            Encoding::WebText => FrameBuf::raw(text::encode_padded(&frame.to_bytes())),
            Encoding::Grpc | Encoding::WebBinary => frame,
        }
    }

    /// The final status in this encoding: HTTP/2 trailers, or a gRPC-Web trailer frame.
    fn status(self, status: &Status) -> Frame<FrameBuf> {
        let headers = status.to_headers();
        match self {
            Encoding::Grpc => Frame::trailers(headers),
            Encoding::WebBinary => {
                Frame::data(FrameBuf::trailers(trailers::encode_block(&headers)))
            }
            Encoding::WebText => {
                let frame = FrameBuf::trailers(trailers::encode_block(&headers));
                Frame::data(FrameBuf::raw(text::encode_padded(&frame.to_bytes())))
            }
        }
    }
}

/// The clocks of one call, from its arrival to its status: the total deadline and the
/// first-message and idle clocks. The ingress runs them while it waits for the upstream's
/// response headers, then hands them to the [`ReplyBody`].
pub(crate) struct CallClocks {
    /// The total deadline: `grpc-timeout` (less a small offset) or the profile's cap.
    pub(crate) deadline: Option<Deadline>,
    /// First-message and idle clocks.
    pub(crate) stream: StreamClocks,
    /// When the client last sent a message (resets the idle clock).
    pub(crate) activity: RequestActivity,
    /// The profile's name, for messages.
    pub(crate) profile: String,
}

impl CallClocks {
    /// When a clock may next run out; `None` when none is running.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        match (self.deadline.map(|d| d.at), self.stream.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the watchdog should look at the clocks next. Besides the clocks' own next expiry,
    /// this is never later than `now + idle gap` while the first-message clock runs: the first
    /// response message starts the idle clock, whose expiry can then be as early as that.
    fn next_check(&self, now: Instant) -> Option<Instant> {
        let pending_idle = self.stream.idle_pending().map(|gap| now + gap);
        match (self.next_wake(), pending_idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A response message went out at `now`.
    fn on_response_message(&mut self, now: Instant) {
        self.stream.on_message(now, Direction::Response);
    }

    /// Checked when a timer fires: the status that ends the call if a clock ran out at `now`
    /// (counted in the metrics). `when` says where the call was, for the message.
    pub(crate) fn expired(
        &mut self,
        now: Instant,
        metrics: &Metrics,
        when: &str,
    ) -> Option<Status> {
        if let Some(at) = self.activity.last() {
            self.stream.on_message(at, Direction::Request);
        }
        if let Some(deadline) = self.deadline.filter(|d| d.is_expired(now)) {
            metrics.clock_expired("deadline");
            return Some(deadline_status(&deadline, when));
        }
        let expired = self.stream.poll(now)?;
        Some(clock_status(metrics, &expired, &self.profile))
    }
}

/// Why the proxy ends a call by itself.
pub(crate) struct Clocks {
    /// Deadline, first-message and idle clocks.
    pub(crate) call: CallClocks,
    /// Request-side failures.
    pub(crate) abort: CallAbort,
    /// The end of the shutdown grace period.
    pub(crate) shutdown: CancellationToken,
    /// Answer with one buffered reply instead of a stream (load shedding).
    pub(crate) degrade: bool,
    /// Resets the client's stream (or closes its HTTP/1.1 connection) when it does not take
    /// the status of a call pnp ended; `None` where the connection offers no such signal.
    pub(crate) client_reset: Option<ClientReset>,
    /// The global buffer budget, which a degraded (buffered) reply must fit in.
    pub(crate) budget: BufferBudget,
}

/// The status of calls still running when the shutdown grace period is over.
pub(crate) fn shutdown_status() -> Status {
    Status::new(
        Code::Unavailable,
        "pnp is shutting down; retry on another instance",
    )
}

/// The status for an expired total deadline.
fn deadline_status(deadline: &Deadline, when: &str) -> Status {
    let message = match deadline.source {
        DeadlineSource::Client => {
            format!("pnp: deadline exceeded (grpc-timeout) {when}")
        }
        DeadlineSource::Profile => format!(
            "pnp: deadline exceeded (profile cap of {} ms) {when}",
            deadline.budget.as_millis()
        ),
    };
    Status::new(Code::DeadlineExceeded, message)
}

/// The status for an expired stream clock; counts the expiry.
fn clock_status(metrics: &Metrics, expired: &Expired, profile: &str) -> Status {
    let (clock, text) = match expired.clock {
        ClockKind::FirstMessage => ("first_message", "no response message within"),
        ClockKind::Idle => ("idle", "stream idle (no message either way) for"),
    };
    metrics.clock_expired(clock);
    Status::new(
        Code::Unavailable,
        format!(
            "pnp: {text} {} ms ({clock} timeout of profile {profile})",
            expired.limit.as_millis()
        ),
    )
}

/// What the reply driver reports to: the call's metrics and span.
pub(crate) struct Observer {
    pub(crate) recorder: CallRecorder,
    pub(crate) metrics: Metrics,
    pub(crate) span: tracing::Span,
    /// The call's place inside the admission limit; released when the observer goes.
    pub(crate) permit: Option<Permit>,
    /// Why negotiation chose the call's transport (`pnp_policy::negotiate::Reason`).
    pub(crate) transport_reason: &'static str,
    /// The call's place in its job (counted when it finishes; unregistered when dropped).
    pub(crate) job: Option<crate::control::JobCall>,
}

impl Observer {
    /// A response message went out at `now`.
    fn message(&mut self, bytes: usize, now: Instant) {
        let seq = self.recorder.response_message_at(bytes, now);
        tracing::trace!(parent: &self.span, seq, bytes, "response message");
    }

    /// The call ended with `status`.
    pub(crate) fn finish(&mut self, status: &Status) {
        let code = status.code.as_i32();
        if let Some(permit) = &self.permit {
            permit.record(self.recorder.elapsed());
        }
        self.recorder.finish(code);
        if let Some(job) = self.job.take() {
            job.finish(status);
        }
        self.span.record("grpc_status", code);
        tracing::info!(
            parent: &self.span,
            grpc_status = code,
            grpc_message = %status.message,
            messages = self.recorder.messages(),
            duration_ms = self.recorder.elapsed().as_secs_f64() * 1e3,
            transport_reason = self.transport_reason,
            "call finished"
        );
    }
}

/// The body of a response pnp writes to its client.
#[derive(Default)]
pub struct ReplyBody {
    state: State,
}

#[derive(Default)]
enum State {
    /// Nothing to send: a Trailers-Only response or an HTTP error.
    #[default]
    Empty,
    Streaming(Arc<Shared>),
    /// A complete body known up front (the demo page and its assets).
    Full(bytes::Bytes),
    Done,
}

/// A streaming call, shared by its body and its watchdog.
struct Shared {
    call: Mutex<Streaming>,
    /// Fired once the call's final frame was handed to the connection, or the body was dropped:
    /// the watchdog's work is over.
    finished: CancellationToken,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Streaming> {
        // A panic while the lock was held cannot leave the call half-updated in a way that
        // matters more than ending it; carry on with the data.
        self.call
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct Streaming {
    encoding: Encoding,
    items: Option<BoxReplyStream>,
    guard: ReplyGuard,
    clocks: CallClocks,
    /// Degraded call: messages gathered here and sent as one reply with the status.
    buffer: Option<BytesMut>,
    /// The bytes of `buffer`, under the global buffer budget.
    held: Reservation,
    /// Frames waiting their turn, in order: a status that came in a coalesced burst, a large
    /// fragment that ended a burst, a buffered reply and its status, a status the watchdog
    /// decided while the body was not polled; or the cut of a reply that ended inside a message.
    queue: VecDeque<Result<Frame<FrameBuf>, CutShort>>,
    observer: Observer,
    /// The body's task, woken when the watchdog ends the call.
    waker: Option<Waker>,
}

impl ReplyBody {
    /// A body with nothing in it.
    pub fn empty() -> Self {
        Self {
            state: State::Empty,
        }
    }

    /// A body with these bytes in it.
    pub fn full(bytes: bytes::Bytes) -> Self {
        Self {
            state: State::Full(bytes),
        }
    }

    /// A streaming reply; starts the call's watchdog.
    pub(crate) fn streaming(
        encoding: Encoding,
        items: BoxReplyStream,
        clocks: Clocks,
        observer: Observer,
    ) -> Self {
        let shared = Arc::new(Shared {
            call: Mutex::new(Streaming {
                encoding,
                items: Some(items),
                guard: ReplyGuard::new(),
                clocks: clocks.call,
                buffer: clocks.degrade.then(BytesMut::new),
                held: clocks.budget.reserve_nothing(),
                queue: VecDeque::new(),
                observer,
                waker: None,
            }),
            finished: CancellationToken::new(),
        });
        tokio::spawn(watchdog(
            shared.clone(),
            clocks.abort,
            clocks.shutdown,
            clocks.client_reset,
        ));
        Self {
            state: State::Streaming(shared),
        }
    }
}

/// Runs a streaming call's clocks and aborts whether or not the client reads (see the module
/// docs); ends the call when one fires, then gives the client [`STATUS_GRACE`] to take the
/// status before resetting it.
async fn watchdog(
    shared: Arc<Shared>,
    abort: CallAbort,
    shutdown: CancellationToken,
    client_reset: Option<ClientReset>,
) {
    let status = loop {
        let wake = shared.lock().clocks.next_check(Instant::now());
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(TokioInstant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shared.finished.cancelled() => return,
            () = abort.token().cancelled() => break abort.status_or_cancelled(),
            () = shutdown.cancelled() => break shutdown_status(),
            () = sleep => {
                let mut call = shared.lock();
                let call = &mut *call;
                let expired = call.clocks.expired(
                    Instant::now(),
                    &call.observer.metrics,
                    "while streaming",
                );
                if let Some(status) = expired {
                    break status;
                }
            }
        }
    };
    {
        let mut call = shared.lock();
        if !call.end(status.clone()) {
            // The call had ended on its own in the meantime.
            return;
        }
        if let Some(waker) = call.waker.take() {
            waker.wake();
        }
    }
    // Stop the request side too: a client-streaming upstream is reset even while its client
    // keeps the request open.
    abort.abort(status);
    // A client with no window for what waits (HTTP/2 tells) cannot take the status: it gets
    // a short grace (a slow reader may be about to open its window), others the full one.
    let stalled = client_reset.as_ref().is_some_and(ClientReset::is_stalled);
    let grace = if stalled { STALLED_GRACE } else { STATUS_GRACE };
    tokio::select! {
        () = shared.finished.cancelled() => return,
        () = tokio::time::sleep(grace) => {}
    }
    if let Some(reset) = client_reset {
        tracing::debug!(
            parent: &shared.lock().observer.span,
            stalled,
            "client did not take the final status; resetting its stream"
        );
        reset.token.cancel();
    }
}

impl Streaming {
    /// The proxy ends the call: drop the upstream (which resets it) and queue `status`.
    /// `false` when the call had already ended.
    fn end(&mut self, status: Status) -> bool {
        self.items = None;
        let Some(status) = self.guard.abort(status) else {
            return false;
        };
        self.queue_final(&status);
        true
    }

    /// Queue the frame that carries the final status, behind the buffered reply if there is
    /// one, and record the call's end.
    /// A reply that ended inside a large message cannot carry its status in the body (the
    /// client is inside a frame): the stream is cut instead (HTTP/2 RST_STREAM, HTTP/1.1 closed
    /// without its last chunk), which every client reports as an error.
    fn queue_final(&mut self, status: &Status) {
        self.observer.finish(status);
        if self.guard.cut_inside_message() {
            self.buffer = None;
            self.queue.push_back(Err(CutShort));
            return;
        }
        if let Some(buffer) = self.buffer.take().filter(|b| !b.is_empty()) {
            self.queue
                .push_back(Ok(Frame::data(FrameBuf::raw(buffer.freeze()))));
        }
        self.queue.push_back(Ok(self.encoding.status(status)));
    }

    /// A message, head or fragment leaves at `now`: count it, reset the clocks, encode it.
    /// One reading of the clock serves a whole burst (reading it costs as much as the rest of
    /// a small message's way through pnp on this kind of VM).
    fn deliver(&mut self, item: ReplyItem, now: Instant) -> FrameBuf {
        self.clocks.on_response_message(now);
        let frame = match item {
            ReplyItem::Message(message) => {
                self.observer.message(message.data.len(), now);
                FrameBuf::message(message.compressed, message.data)
            }
            ReplyItem::Head { compressed, len } => {
                self.observer.message(0, now);
                FrameBuf::head(compressed, len)
            }
            ReplyItem::Fragment { data, .. } => {
                self.observer.recorder.response_bytes(data.len());
                FrameBuf::raw(data)
            }
            ReplyItem::Status(_) => FrameBuf::raw(bytes::Bytes::new()),
        };
        self.encoding.part(frame)
    }

    /// Append the small messages that are already waiting to `first`, so a burst goes out as
    /// one HTTP/2 DATA frame (or HTTP/1.1 chunk) instead of one per message. Nothing waits:
    /// only items that are ready now are taken, so latency is unchanged. One frame per tiny
    /// message costs a frame header and a write each, and h2 >= 0.4.17 clients (tonic) answer
    /// a pile-up of unread small DATA frames with GOAWAY ENHANCE_YOUR_CALM. A status that
    /// arrives in the burst waits in the queue.
    fn coalesce(&mut self, first: FrameBuf, now: Instant, cx: &mut Context<'_>) -> FrameBuf {
        use bytes::{Buf as _, BufMut as _};
        if first.remaining() >= COALESCE_LIMIT {
            return first;
        }
        let mut batch: Option<BytesMut> = None;
        while batch.as_ref().map_or(first.remaining(), BytesMut::len) < COALESCE_LIMIT {
            let Some(items) = self.items.as_mut() else {
                break;
            };
            let Poll::Ready(item) = items.as_mut().poll_next(cx) else {
                break;
            };
            match self.guard.on_item(item) {
                GuardEvent::Deliver(ReplyItem::Status(status)) => {
                    self.items = None;
                    self.queue_final(&status);
                    break;
                }
                GuardEvent::Deliver(item) => {
                    let next = self.deliver(item, now);
                    if next.remaining() >= COALESCE_LIMIT {
                        // A large fragment goes out as it is, after the batch, never copied.
                        self.queue.push_back(Ok(Frame::data(next)));
                        break;
                    }
                    let batch = batch.get_or_insert_with(|| {
                        let mut b = BytesMut::with_capacity(COALESCE_LIMIT + next.remaining());
                        b.put(first.clone());
                        b
                    });
                    batch.put(next);
                }
                GuardEvent::Done => break,
            }
        }
        match batch {
            Some(batch) => FrameBuf::raw(batch.freeze()),
            None => first,
        }
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<FrameBuf>, CutShort>>> {
        if let Some(frame) = self.queue.pop_front() {
            return Poll::Ready(Some(frame));
        }
        if self.guard.is_finished() {
            return Poll::Ready(None);
        }
        if !self
            .waker
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            self.waker = Some(cx.waker().clone());
        }
        let Some(items) = self.items.as_mut() else {
            return Poll::Ready(None);
        };
        let item = match items.as_mut().poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(item) => item,
        };
        match self.guard.on_item(item) {
            GuardEvent::Deliver(ReplyItem::Status(status)) => {
                self.items = None;
                self.queue_final(&status);
                Poll::Ready(self.queue.pop_front())
            }
            GuardEvent::Deliver(item) => {
                let whole = matches!(item, ReplyItem::Message(_));
                let now = Instant::now();
                let frame = self.deliver(item, now);
                if !whole {
                    // A large message is never buffered whole: a degraded call streams again
                    // from here, after what it had gathered.
                    if let Some(buffer) = self.buffer.take() {
                        self.held.set(0);
                        if !buffer.is_empty() {
                            self.queue
                                .push_back(Ok(Frame::data(FrameBuf::raw(buffer.freeze()))));
                        }
                        self.queue.push_back(Ok(Frame::data(frame)));
                        return Poll::Ready(self.queue.pop_front());
                    }
                }
                match self.buffer.as_mut() {
                    None => Poll::Ready(Some(Ok(Frame::data(self.coalesce(frame, now, cx))))),
                    Some(buffer) => {
                        // Degraded: keep it for the single reply, and look for the next item.
                        if !self.held.try_grow(bytes::Buf::remaining(&frame)) {
                            // The reply cannot be held: end the call rather than grow past
                            // the budget (and drop what was gathered).
                            self.held.refused("degraded_reply");
                            buffer.clear();
                            let limit = self.held.budget_limit();
                            self.end(budget_status(limit));
                            return Poll::Ready(self.queue.pop_front());
                        }
                        buffer.extend_from_slice(&frame.to_bytes());
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                }
            }
            GuardEvent::Done => Poll::Ready(None),
        }
    }

    /// Whether the final frame has left (nothing of the call remains to be written).
    fn is_over(&self) -> bool {
        self.guard.is_finished() && self.queue.is_empty()
    }
}

/// The error a reply body ends with when its call ended inside a large message: the connection
/// then cuts the client's stream (HTTP/2 `RST_STREAM(INTERNAL_ERROR)`, HTTP/1.1 closed without
/// the final chunk), the only way to say "not OK" to a client that is inside a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutShort;

impl std::fmt::Display for CutShort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the call ended inside a message; the stream is cut")
    }
}

impl std::error::Error for CutShort {}

impl Body for ReplyBody {
    type Data = FrameBuf;
    type Error = CutShort;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<FrameBuf>, CutShort>>> {
        let this = self.get_mut();
        match &mut this.state {
            State::Empty | State::Done => Poll::Ready(None),
            State::Full(bytes) => {
                let bytes = std::mem::take(bytes);
                this.state = State::Done;
                Poll::Ready(Some(Ok(Frame::data(FrameBuf::raw(bytes)))))
            }
            State::Streaming(shared) => {
                let (polled, over) = {
                    let mut call = shared.lock();
                    let polled = call.poll_frame(cx);
                    (polled, call.is_over())
                };
                if over {
                    shared.finished.cancel();
                }
                match polled {
                    // (The span is passed explicitly as the parent of each event.)
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(None) => {
                        this.state = State::Done;
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(cut))) => {
                        this.state = State::Done;
                        Poll::Ready(Some(Err(cut)))
                    }
                    Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Empty | State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Empty | State::Done => SizeHint::with_exact(0),
            State::Full(bytes) => SizeHint::with_exact(bytes.len() as u64),
            State::Streaming(_) => SizeHint::default(),
        }
    }
}

impl Drop for ReplyBody {
    /// The connection let go of the body: the client went away (or the reply was written).
    /// Drop the upstream stream now, which resets it, and stop the watchdog.
    fn drop(&mut self) {
        if let State::Streaming(shared) = &self.state {
            shared.lock().items = None;
            shared.finished.cancel();
        }
    }
}

/// Messages are gathered into one frame while the frame is smaller than this (see
/// `Streaming::coalesce`); larger messages are written as they are, without copying.
const COALESCE_LIMIT: usize = 16 * 1024;

/// Response headers of a Trailers-Only reply or a streaming reply share these.
pub(crate) fn base_headers(encoding: Encoding, subtype: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(value) = encoding.content_type(subtype).parse() {
        headers.insert(http::header::CONTENT_TYPE, value);
    }
    headers
}
