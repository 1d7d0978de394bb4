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
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use pnp_telemetry::{CallRecorder, Metrics};

use crate::abort::CallAbort;

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

/// Why the proxy ends a call by itself.
pub(crate) struct Clocks {
    /// The call's deadline from `grpc-timeout`.
    pub(crate) deadline: Option<Instant>,
    /// Request-side failures.
    pub(crate) abort: CallAbort,
    /// The end of the shutdown grace period.
    pub(crate) shutdown: CancellationToken,
}

/// What the reply driver reports to: the call's metrics and span.
pub(crate) struct Observer {
    pub(crate) recorder: CallRecorder,
    pub(crate) metrics: Metrics,
    pub(crate) span: tracing::Span,
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
    deadline: Option<Pin<Box<Sleep>>>,
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
        Self {
            state: State::Streaming(Box::new(Streaming {
                encoding,
                items: Some(items),
                guard: ReplyGuard::new(),
                deadline: clocks
                    .deadline
                    .map(|at| Box::pin(tokio::time::sleep_until(at))),
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
        self.observer.finish(&status);
        Some(self.encoding.status(&status))
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Frame<FrameBuf>>> {
        if self.guard.is_finished() {
            return Poll::Ready(None);
        }
        if self.aborted.as_mut().poll(cx).is_ready() {
            let status = self
                .abort
                .status()
                .unwrap_or_else(|| Status::new(pnp_call::Code::Cancelled, "pnp: call aborted"));
            return Poll::Ready(self.end(status));
        }
        if self.shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(self.end(Status::new(
                pnp_call::Code::Unavailable,
                "pnp is shutting down; retry on another instance",
            )));
        }
        if let Some(deadline) = self.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                self.observer.metrics.clock_expired("deadline");
                return Poll::Ready(self.end(Status::new(
                    pnp_call::Code::DeadlineExceeded,
                    "pnp: deadline exceeded (grpc-timeout) while waiting for the upstream",
                )));
            }
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
                self.observer.message(message.data.len());
                Poll::Ready(Some(Frame::data(
                    self.encoding.message(message.compressed, message.data),
                )))
            }
            GuardEvent::Deliver(ReplyItem::Status(status)) => {
                self.items = None;
                self.observer.finish(&status);
                Poll::Ready(Some(self.encoding.status(&status)))
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

/// Response headers of a Trailers-Only reply or a streaming reply share these.
pub(crate) fn base_headers(encoding: Encoding, subtype: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(value) = encoding.content_type(subtype).parse() {
        headers.insert(http::header::CONTENT_TYPE, value);
    }
    headers
}
