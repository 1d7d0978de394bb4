//! Request bodies as a stream of messages.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_core::Stream;
use http_body::Body;
use pnp_call::{Code, Message, Part, Status};
use pnp_wire::frame::{Frame, FrameDecoder, FrameError, FrameKind, Part as WirePart};
use pnp_wire::text::{Base64Decoder, TextError};

use pnp_telemetry::Counter;

use crate::abort::CallAbort;
use crate::body::RequestBody;
use crate::budget::{budget_status, BufferBudget, Reservation};

/// Decodes a gRPC or gRPC-Web request body into messages. Bad input ends the call: the error
/// status goes to the reply driver through [`CallAbort`] (so the client sees *this* status, not
/// the upstream reset it causes) and the stream yields an error, which resets the upstream stream.
/// The other way round, when the proxy ends the call (a clock, shutdown) while the client still
/// sends, the stream yields that status as an error too: the upstream stream is reset at once
/// instead of living until the client half-closes.
pub(crate) struct RequestMessages {
    /// `None` only once dropped (the rest of the body went to [`drain`]).
    body: Option<RequestBody>,
    /// Fires when the call is ended by anyone.
    aborted: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    text: Option<Base64Decoder>,
    decoder: FrameDecoder,
    abort: CallAbort,
    done: bool,
    counters: (Counter, Counter),
    activity: RequestActivity,
    /// The bytes of messages being assembled, under the global buffer budget.
    held: Reservation,
}

/// When the client last sent a message, shared with the clocks that reset on it (the idle clock
/// counts messages in either direction). A lock-free cell: one store per request message.
#[derive(Clone, Debug)]
pub(crate) struct RequestActivity {
    origin: Instant,
    /// Nanoseconds after `origin`, plus one; 0 = no message yet.
    last: Arc<AtomicU64>,
}

impl RequestActivity {
    pub(crate) fn new(origin: Instant) -> Self {
        Self {
            origin,
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.last.store(nanos + 1, Ordering::Release);
    }

    /// When the last request message arrived, if any did.
    pub(crate) fn last(&self) -> Option<Instant> {
        match self.last.load(Ordering::Acquire) {
            0 => None,
            n => self.origin.checked_add(Duration::from_nanos(n - 1)),
        }
    }
}

impl RequestMessages {
    pub(crate) fn new(
        body: RequestBody,
        text: bool,
        max_message_size: usize,
        abort: CallAbort,
        counters: (Counter, Counter),
        activity: RequestActivity,
        budget: &BufferBudget,
    ) -> Self {
        Self {
            aborted: Box::pin(abort.token().clone().cancelled_owned()),
            body: Some(body),
            text: text.then(Base64Decoder::new),
            decoder: FrameDecoder::new(FrameKind::Grpc, max_message_size)
                .with_fragments(pnp_call::FRAGMENT_THRESHOLD),
            abort,
            done: false,
            counters,
            activity,
            held: budget.reserve_nothing(),
        }
    }

    fn fail(&mut self, status: Status) -> Poll<Option<Result<Part, Status>>> {
        self.done = true;
        self.abort.abort(status.clone());
        Poll::Ready(Some(Err(status)))
    }
}

fn frame_status(e: &FrameError) -> Status {
    match e {
        FrameError::TooLarge { len, max } => Status::new(
            Code::ResourceExhausted,
            format!("pnp: request message of {len} bytes exceeds the limit of {max} bytes"),
        ),
        FrameError::Truncated { buffered } => Status::new(
            Code::Internal,
            format!("pnp: request body ended inside a message ({buffered} bytes of it received)"),
        ),
        FrameError::InvalidFlags(flags) => Status::new(
            Code::Internal,
            format!("pnp: malformed request frame: invalid flags 0x{flags:02x}"),
        ),
        other => Status::new(
            Code::Internal,
            format!("pnp: malformed request frame: {other}"),
        ),
    }
}

fn text_status(e: &TextError) -> Status {
    Status::new(
        Code::Internal,
        format!("pnp: malformed application/grpc-web-text body: {e}"),
    )
}

impl Stream for RequestMessages {
    type Item = Result<Part, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let part = match this.decoder.next_part() {
                Ok(Some(WirePart::Frame(Frame::Message { compressed, data }))) => {
                    Some(Part::Message(Message { compressed, data }))
                }
                Ok(Some(WirePart::Head { compressed, len })) => {
                    Some(Part::Head { compressed, len })
                }
                Ok(Some(WirePart::Fragment { data, last })) => Some(Part::Fragment { data, last }),
                Ok(Some(WirePart::Frame(Frame::Trailers { .. }))) => {
                    return this.fail(Status::new(
                        Code::Internal,
                        "pnp: malformed request: trailer frame in a request",
                    ))
                }
                Ok(None) => None,
                Err(e) => return this.fail(frame_status(&e)),
            };
            // What stays buffered waits for the rest of its message: that is what the buffer
            // budget holds (bytes passed on at once never count).
            let held = this.held.set(this.decoder.buffered_len());
            if let Some(part) = part {
                this.activity.touch();
                if part.starts_message() {
                    this.counters.0.inc();
                }
                this.counters.1.inc_by(part.payload_len() as u64);
                return Poll::Ready(Some(Ok(part)));
            }
            if !held {
                this.held.refused("request");
                let status = budget_status(this.held.budget_limit());
                return this.fail(status);
            }
            let Some(body) = this.body.as_mut() else {
                return Poll::Ready(None);
            };
            let polled = Pin::new(body).poll_frame(cx);
            if polled.is_pending() && this.aborted.as_mut().poll(cx).is_ready() {
                this.done = true;
                return Poll::Ready(Some(Err(this.abort.status_or_cancelled())));
            }
            match ready!(polled) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        // HTTP/2 request trailers carry nothing for gRPC.
                        continue;
                    };
                    match this.text.as_mut() {
                        None => this.decoder.push(data),
                        Some(text) => {
                            let mut out = BytesMut::with_capacity(data.len() / 4 * 3 + 3);
                            if let Err(e) = text.decode(&data, &mut out) {
                                return this.fail(text_status(&e));
                            }
                            this.decoder.push(out.freeze());
                        }
                    }
                }
                Some(Err(e)) => {
                    return this.fail(Status::new(
                        Code::Cancelled,
                        format!("pnp: client aborted the request ({e})"),
                    ))
                }
                None => {
                    if let Some(Err(e)) = this.text.as_ref().map(Base64Decoder::finish) {
                        return this.fail(text_status(&e));
                    }
                    if let Err(e) = this.decoder.finish() {
                        return this.fail(frame_status(&e));
                    }
                    this.done = true;
                    return Poll::Ready(None);
                }
            }
        }
    }
}

/// How much of an unread request body [`drain`] reads before giving up.
const DRAIN_LIMIT_BYTES: usize = 64 * 1024;
/// How long [`drain`] waits for the rest of a request body.
const DRAIN_LIMIT_TIME: std::time::Duration = std::time::Duration::from_millis(500);

impl Drop for RequestMessages {
    fn drop(&mut self) {
        if let Some(body) = self.body.take() {
            discard(body);
        }
    }
}

/// Let go of a request body the call will not read (the call ended early, say refused at the
/// door): an HTTP/1.1 body is read to its end in the background (see [`drain`]); an HTTP/2
/// stream needs nothing, h2 resets it with NO_ERROR once the response is complete.
pub(crate) fn discard(body: RequestBody) {
    let RequestBody::Http1(body) = body else {
        return;
    };
    if body.is_end_stream() {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(drain(body));
    }
}

/// Reads and discards the rest of a request body whose call has ended (say the upstream
/// answered UNIMPLEMENTED before reading it). hyper closes an HTTP/1.1 connection whose request
/// body was dropped unread, and a client that sends the body after the head (Node's http
/// module, so connect-node and grpc-web under Node) then fails with EPIPE although its reply
/// was complete. Bounded in bytes and time, so a large or endless upload is still cut off.
async fn drain(mut body: hyper::body::Incoming) {
    let read = async {
        let mut read = 0usize;
        while let Some(Ok(frame)) =
            std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            read = read.saturating_add(frame.data_ref().map_or(0, |d| d.len()));
            if read > DRAIN_LIMIT_BYTES {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_LIMIT_TIME, read).await;
}
