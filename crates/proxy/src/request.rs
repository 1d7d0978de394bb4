//! Request bodies as a stream of messages.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use futures_core::Stream;
use http_body::Body;
use hyper::body::Incoming;
use pnp_call::{Code, Message, Status};
use pnp_wire::frame::{Frame, FrameDecoder, FrameError, FrameKind};
use pnp_wire::text::{Base64Decoder, TextError};

use pnp_telemetry::Counter;

use crate::abort::CallAbort;

/// Decodes a gRPC or gRPC-Web request body into messages. Bad input ends the call: the error
/// status goes to the reply driver through [`CallAbort`] (so the client sees *this* status, not
/// the upstream reset it causes) and the stream yields an error, which resets the upstream stream.
pub(crate) struct RequestMessages {
    body: Incoming,
    text: Option<Base64Decoder>,
    decoder: FrameDecoder,
    abort: CallAbort,
    done: bool,
    counters: (Counter, Counter),
}

impl RequestMessages {
    pub(crate) fn new(
        body: Incoming,
        text: bool,
        max_message_size: usize,
        abort: CallAbort,
        counters: (Counter, Counter),
    ) -> Self {
        Self {
            body,
            text: text.then(Base64Decoder::new),
            decoder: FrameDecoder::new(FrameKind::Grpc, max_message_size),
            abort,
            done: false,
            counters,
        }
    }

    fn fail(&mut self, status: Status) -> Poll<Option<Result<Message, Status>>> {
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
    type Item = Result<Message, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.decoder.next_frame() {
                Ok(Some(Frame::Message { compressed, data })) => {
                    this.counters.0.inc();
                    this.counters.1.inc_by(data.len() as u64);
                    return Poll::Ready(Some(Ok(Message { compressed, data })));
                }
                Ok(Some(Frame::Trailers { .. })) => {
                    return this.fail(Status::new(
                        Code::Internal,
                        "pnp: malformed request: trailer frame in a request",
                    ))
                }
                Ok(None) => {}
                Err(e) => return this.fail(frame_status(&e)),
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
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
