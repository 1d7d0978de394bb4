//! Driving a reply back to the client.
//!
//! [`ReplyBody`] is the response body hyper writes. It pulls reply items from the egress
//! transport and encodes each one as soon as it arrives (one HTTP/2 DATA frame or one HTTP/1.1
//! chunk per message: never buffered). It also owns the call's clocks: on the deadline it ends
//! the call with DEADLINE_EXCEEDED, on the end of the shutdown grace period with UNAVAILABLE, and
//! on a request-side error with that error's status. Ending the call drops the upstream stream,
//! which resets it (RST_STREAM CANCEL). When the client goes away hyper drops this body, and the
//! upstream stream is reset the same way.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pnp_call::{BoxReplyStream, GuardEvent, ReplyGuard, ReplyItem, Status};
use pnp_wire::frame::FrameBuf;
use pnp_wire::{text, trailers};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use std::time::Instant;

use bytes::BytesMut;
use pnp_call::{Code, Message};
use pnp_policy::deadline::{Deadline, DeadlineSource};
use pnp_policy::idle::{ClockKind, Direction, Expired, StreamClocks};
use pnp_telemetry::{CallRecorder, Metrics};
use tokio::time::Instant as TokioInstant;

use crate::abort::CallAbort;
use crate::admission::Permit;
use crate::request::RequestActivity;

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

    /// A message frame in this encoding.
    fn message(self, compressed: bool, data: bytes::Bytes) -> FrameBuf {
        let frame = FrameBuf::message(compressed, data);
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

    /// A response message went out now.
    fn on_response_message(&mut self) {
        self.stream.on_message(Instant::now(), Direction::Response);
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
}

impl Observer {
    /// A response message went out.
    fn message(&mut self, bytes: usize) {
        let seq = self.recorder.response_message(bytes);
        tracing::trace!(parent: &self.span, seq, bytes, "response message");
    }

    /// The call ended with `status`.
    pub(crate) fn finish(&mut self, status: &Status) {
        let code = status.code.as_i32();
        if let Some(permit) = &self.permit {
            permit.record(self.recorder.elapsed());
        }
        self.recorder.finish(code);
        self.span.record("grpc_status", code);
        tracing::info!(
            parent: &self.span,
            grpc_status = code,
            grpc_message = %status.message,
            messages = self.recorder.messages(),
            duration_ms = self.recorder.elapsed().as_secs_f64() * 1e3,
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
    Streaming(Box<Streaming>),
    /// A complete body known up front (the demo page and its assets).
    Full(bytes::Bytes),
    Done,
}

struct Streaming {
    encoding: Encoding,
    items: Option<BoxReplyStream>,
    guard: ReplyGuard,
    clocks: CallClocks,
    /// Armed at the earliest of the deadline and the stream clocks; re-armed lazily when it
    /// fires (messages only ever push the clocks later).
    timer: Option<Pin<Box<Sleep>>>,
    /// Degraded call: messages gathered here and sent as one reply with the status.
    buffer: Option<BytesMut>,
    /// A frame waiting its turn (the status after a buffered reply).
    pending: Option<Frame<FrameBuf>>,
    abort: CallAbort,
    aborted: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    observer: Observer,
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

    pub(crate) fn streaming(
        encoding: Encoding,
        items: BoxReplyStream,
        clocks: Clocks,
        observer: Observer,
    ) -> Self {
        let aborted = Box::pin(clocks.abort.token().clone().cancelled_owned());
        let wake = clocks.call.next_wake();
        Self {
            state: State::Streaming(Box::new(Streaming {
                encoding,
                items: Some(items),
                guard: ReplyGuard::new(),
                clocks: clocks.call,
                timer: wake
                    .map(|at| Box::pin(tokio::time::sleep_until(TokioInstant::from_std(at)))),
                buffer: clocks.degrade.then(BytesMut::new),
                pending: None,
                abort: clocks.abort,
                aborted,
                shutdown: Box::pin(clocks.shutdown.cancelled_owned()),
                observer,
            })),
        }
    }
}

impl Streaming {
    /// The proxy ends the call: drop the upstream (which resets it) and report `status`.
    fn end(&mut self, status: Status) -> Option<Frame<FrameBuf>> {
        self.items = None;
        let status = self.guard.abort(status)?;
        Some(self.final_frame(&status))
    }

    /// The frame that carries the final status, behind the buffered reply if there is one.
    fn final_frame(&mut self, status: &Status) -> Frame<FrameBuf> {
        self.observer.finish(status);
        let status_frame = self.encoding.status(status);
        match self.buffer.take() {
            Some(buffer) if !buffer.is_empty() => {
                self.pending = Some(status_frame);
                Frame::data(FrameBuf::raw(buffer.freeze()))
            }
            _ => status_frame,
        }
    }

    /// A response message leaves: count it, reset the clocks, encode it.
    fn deliver(&mut self, message: Message) -> FrameBuf {
        self.observer.message(message.data.len());
        self.clocks.on_response_message();
        self.encoding.message(message.compressed, message.data)
    }

    /// Append the small messages that are already waiting to `first`, so a burst goes out as
    /// one HTTP/2 DATA frame (or HTTP/1.1 chunk) instead of one per message. Nothing waits:
    /// only items that are ready now are taken, so latency is unchanged. One frame per tiny
    /// message costs a frame header and a write each, and h2 >= 0.4.17 clients (tonic) answer
    /// a pile-up of unread small DATA frames with GOAWAY ENHANCE_YOUR_CALM. A status that
    /// arrives in the burst waits in `pending`.
    fn coalesce(&mut self, first: FrameBuf, cx: &mut Context<'_>) -> FrameBuf {
        use bytes::Buf as _;
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
                GuardEvent::Deliver(ReplyItem::Message(message)) => {
                    let next = self.deliver(message);
                    let batch = batch.get_or_insert_with(|| {
                        let mut b = BytesMut::with_capacity(COALESCE_LIMIT + next.remaining());
                        b.extend_from_slice(&first.to_bytes());
                        b
                    });
                    batch.extend_from_slice(&next.to_bytes());
                }
                GuardEvent::Deliver(ReplyItem::Status(status)) => {
                    self.items = None;
                    self.pending = Some(self.final_frame(&status));
                    break;
                }
                GuardEvent::Done => break,
            }
        }
        match batch {
            Some(batch) => FrameBuf::raw(batch.freeze()),
            None => first,
        }
    }

    /// Run the clocks that are due. `Some(status)` when one of them ends the call.
    fn poll_clocks(&mut self, cx: &mut Context<'_>) -> Option<Status> {
        while let Some(timer) = self.timer.as_mut() {
            if timer.as_mut().poll(cx).is_pending() {
                return None;
            }
            if let Some(status) =
                self.clocks
                    .expired(Instant::now(), &self.observer.metrics, "while streaming")
            {
                return Some(status);
            }
            match self.clocks.next_wake() {
                Some(at) => timer.as_mut().reset(TokioInstant::from_std(at)),
                None => self.timer = None,
            }
        }
        None
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Frame<FrameBuf>>> {
        if let Some(frame) = self.pending.take() {
            return Poll::Ready(Some(frame));
        }
        if self.guard.is_finished() {
            return Poll::Ready(None);
        }
        if self.aborted.as_mut().poll(cx).is_ready() {
            let status = self.abort.status_or_cancelled();
            return Poll::Ready(self.end(status));
        }
        if self.shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(self.end(shutdown_status()));
        }
        if let Some(status) = self.poll_clocks(cx) {
            return Poll::Ready(self.end(status));
        }
        let Some(items) = self.items.as_mut() else {
            return Poll::Ready(None);
        };
        let item = match items.as_mut().poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(item) => item,
        };
        match self.guard.on_item(item) {
            GuardEvent::Deliver(ReplyItem::Message(message)) => {
                let frame = self.deliver(message);
                match self.buffer.as_mut() {
                    None => Poll::Ready(Some(Frame::data(self.coalesce(frame, cx)))),
                    Some(buffer) => {
                        // Degraded: keep it for the single reply, and look for the next item.
                        buffer.extend_from_slice(&frame.to_bytes());
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                }
            }
            GuardEvent::Deliver(ReplyItem::Status(status)) => {
                self.items = None;
                Poll::Ready(Some(self.final_frame(&status)))
            }
            GuardEvent::Done => Poll::Ready(None),
        }
    }
}

impl Body for ReplyBody {
    type Data = FrameBuf;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<FrameBuf>, Infallible>>> {
        let this = self.get_mut();
        match &mut this.state {
            State::Empty | State::Done => Poll::Ready(None),
            State::Full(bytes) => {
                let bytes = std::mem::take(bytes);
                this.state = State::Done;
                Poll::Ready(Some(Ok(Frame::data(FrameBuf::raw(bytes)))))
            }
            State::Streaming(streaming) => match streaming.poll_frame(cx) {
                // (The span is passed explicitly as the parent of each event.)
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => {
                    this.state = State::Done;
                    Poll::Ready(None)
                }
                Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            },
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
