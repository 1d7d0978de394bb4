//! Request bodies from every HTTP stack: hyper's [`Incoming`] (HTTP/1.1), an h2
//! [`RecvStream`] (HTTP/2, served by [`crate::h2server`]) or the receiving side of an HTTP/3
//! request stream (served by [`crate::h3server`]).

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pnp_transport::http3::{gather_chunks, Gathered};

/// Why a request body could not be read (the client reset the stream, the connection broke).
pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A request body as the ingress reads it.
#[derive(Debug)]
pub enum RequestBody {
    /// HTTP/1.1, read by hyper.
    Http1(Incoming),
    /// HTTP/2, read from an h2 stream.
    Http2(H2Body),
    /// HTTP/3, read from an h3 request stream (boxed: it is ten times the size of the others,
    /// and a request body is moved through every layer of a call's future).
    Http3(Box<H3Body>),
    /// A call that arrived already decoded (over UCX): its request parts as gRPC frames.
    Parts(PartFrames),
    /// No body (tests, requests made in-process).
    Empty,
}

/// A decoded call's request parts as the bytes of gRPC frames, so the ingress reads them as it
/// reads any request body: a whole message as its frame, a large message's head as the frame
/// header and its fragments as they are (no copy).
pub struct PartFrames {
    parts: pnp_call::BoxMessageStream,
    /// The payload of the last whole message, to go after its header.
    pending: Option<Bytes>,
}

impl std::fmt::Debug for PartFrames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartFrames").finish_non_exhaustive()
    }
}

impl PartFrames {
    pub(crate) fn new(parts: pnp_call::BoxMessageStream) -> Self {
        Self {
            parts,
            pending: None,
        }
    }
}

/// The 5-byte gRPC frame header of a message.
fn frame_header(compressed: bool, len: u32) -> Bytes {
    let mut header = pnp_wire::frame::FrameBuf::head(compressed, len);
    let len = bytes::Buf::remaining(&header);
    bytes::Buf::copy_to_bytes(&mut header, len)
}

impl Body for PartFrames {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(payload) = self.pending.take() {
            return Poll::Ready(Some(Ok(Frame::data(payload))));
        }
        let part = ready!(futures_core::Stream::poll_next(self.parts.as_mut(), cx));
        Poll::Ready(match part {
            None => None,
            Some(Err(status)) => Some(Err(status.to_string().into())),
            Some(Ok(pnp_call::Part::Message(message))) => {
                let len = u32::try_from(message.data.len()).unwrap_or(u32::MAX);
                if !message.data.is_empty() {
                    self.pending = Some(message.data);
                }
                Some(Ok(Frame::data(frame_header(message.compressed, len))))
            }
            Some(Ok(pnp_call::Part::Head { compressed, len })) => {
                Some(Ok(Frame::data(frame_header(compressed, len))))
            }
            Some(Ok(pnp_call::Part::Fragment { data, .. })) => Some(Ok(Frame::data(data))),
        })
    }
}

impl From<Incoming> for RequestBody {
    fn from(body: Incoming) -> Self {
        RequestBody::Http1(body)
    }
}

/// An HTTP/2 request body. Flow-control capacity goes back to the client as soon as a chunk is
/// handed on, so the client's window is what bounds the bytes pnp holds for the stream.
#[derive(Debug)]
pub struct H2Body {
    recv: h2::RecvStream,
    data_done: bool,
}

impl H2Body {
    pub(crate) fn new(recv: h2::RecvStream) -> Self {
        let data_done = recv.is_end_stream();
        Self { recv, data_done }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // A failure here means the stream is gone; the next poll reports it.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// The receiving side of an HTTP/3 request stream.
pub(crate) type H3Recv =
    h3::server::RequestStream<crate::h3quic::QuicRecv, pnp_wire::frame::FrameBuf>;

/// An HTTP/3 request body. QUIC returns flow-control credit as data is read, so the stream's
/// receive window is what bounds the bytes pnp holds for it. Packets' worth of data that are
/// ready together are handed on as one chunk ([`gather_chunks`]).
pub struct H3Body {
    recv: H3Recv,
    /// The end or failure met while gathering data, for the next poll.
    held: Option<Gathered<h3::error::StreamError>>,
    data_done: bool,
}

impl std::fmt::Debug for H3Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H3Body")
            .field("stream", &self.recv.id())
            .field("data_done", &self.data_done)
            .finish()
    }
}

impl H3Body {
    pub(crate) fn new(recv: H3Recv) -> Self {
        Self {
            recv,
            held: None,
            data_done: false,
        }
    }
}

impl Body for H3Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if !self.data_done {
            let this = &mut *self;
            let (held, recv) = (&mut this.held, &mut this.recv);
            match ready!(gather_chunks(held, cx, |cx| recv.poll_recv_data(cx))) {
                Gathered::Data(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Gathered::End => self.data_done = true,
                Gathered::Failed(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
        match ready!(self.recv.poll_recv_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Http1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            RequestBody::Http2(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Http3(body) => Pin::new(body.as_mut()).poll_frame(cx),
            RequestBody::Parts(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Http1(body) => body.is_end_stream(),
            RequestBody::Http2(body) => body.is_end_stream(),
            RequestBody::Http3(body) => body.is_end_stream(),
            RequestBody::Parts(_) => false,
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Http1(body) => body.size_hint(),
            RequestBody::Http2(_) | RequestBody::Http3(_) | RequestBody::Parts(_) => {
                SizeHint::default()
            }
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}
