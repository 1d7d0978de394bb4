//! quinn under the h3 crate, for the HTTP/3 listener.
//!
//! h3-quinn (which the HTTP/3 egress uses) hides quinn's streams, and with them
//! `SendStream::stopped`: the only way a client that has sent its whole request can say "I
//! no longer want the answer" is STOP_SENDING on the response side, and a call waiting for its
//! upstream writes nothing that would reveal it. This adapter implements h3's QUIC traits over
//! quinn itself and files a stop signal for every request stream it accepts, which the stream's
//! pipe takes by stream id ([`StopSignals::take`]), so a client's cancel reaches the upstream
//! at once, whatever the call is doing.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::future::BoxFuture;
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};
use quinn::VarInt;
use tokio_util::sync::ReusableBoxFuture;

/// How a response stream ended for the client, as quinn's `SendStream::stopped` tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// The client sent STOP_SENDING with this code: it wants no more of the response.
    Stopped(u64),
    /// The connection was lost.
    Lost,
    /// The response was finished and the client acknowledged all of it (only after a finish).
    Acknowledged,
}

/// Resolves with how a response stream ended (see [`StreamEnd`]).
pub(crate) type StopSignal = Pin<Box<dyn Future<Output = StreamEnd> + Send>>;

/// The stop signals of a connection's request streams, by stream id, until their pipes take
/// them.
#[derive(Clone, Default)]
pub(crate) struct StopSignals(Arc<Mutex<HashMap<u64, StopSignal>>>);

impl StopSignals {
    fn insert(&self, id: u64, signal: StopSignal) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(id, signal);
        }
    }

    /// The stop signal of request stream `id`, once.
    pub(crate) fn take(&self, id: StreamId) -> Option<StopSignal> {
        self.0.lock().ok()?.remove(&id.into_inner())
    }
}

/// What `stopped()` says, as a stop signal.
fn stop_signal(send: &quinn::SendStream) -> StopSignal {
    let stopped = send.stopped();
    Box::pin(async move {
        match stopped.await {
            Ok(Some(code)) => StreamEnd::Stopped(code.into_inner()),
            Ok(None) => StreamEnd::Acknowledged,
            Err(_) => StreamEnd::Lost,
        }
    })
}

fn stream_id(id: quinn::StreamId) -> Result<StreamId, ConnectionErrorIncoming> {
    StreamId::try_from(u64::from(id)).map_err(|e| {
        ConnectionErrorIncoming::InternalError(format!("stream id {id} out of range: {e:?}"))
    })
}

fn connection_error(e: quinn::ConnectionError) -> ConnectionErrorIncoming {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => {
            ConnectionErrorIncoming::ApplicationClose {
                error_code: close.error_code.into_inner(),
            }
        }
        quinn::ConnectionError::TimedOut => ConnectionErrorIncoming::Timeout,
        other => ConnectionErrorIncoming::Undefined(Arc::new(other)),
    }
}

fn stream_connection_error(e: quinn::ConnectionError) -> StreamErrorIncoming {
    StreamErrorIncoming::ConnectionErrorIncoming {
        connection_error: connection_error(e),
    }
}

type Accepted<T> = BoxFuture<'static, Result<T, quinn::ConnectionError>>;

/// A server-side QUIC connection as h3 drives it.
pub(crate) struct QuicConnection {
    conn: quinn::Connection,
    accept_bi: Accepted<(quinn::SendStream, quinn::RecvStream)>,
    accept_uni: Accepted<quinn::RecvStream>,
    opener: QuicOpener,
    stops: StopSignals,
}

impl QuicConnection {
    pub(crate) fn new(conn: quinn::Connection, stops: StopSignals) -> Self {
        Self {
            accept_bi: next_bi(conn.clone()),
            accept_uni: next_uni(conn.clone()),
            opener: QuicOpener::new(conn.clone()),
            conn,
            stops,
        }
    }
}

fn next_bi(conn: quinn::Connection) -> Accepted<(quinn::SendStream, quinn::RecvStream)> {
    Box::pin(async move { conn.accept_bi().await })
}

fn next_uni(conn: quinn::Connection) -> Accepted<quinn::RecvStream> {
    Box::pin(async move { conn.accept_uni().await })
}

impl<B: Buf> quic::Connection<B> for QuicConnection {
    type RecvStream = QuicRecv;
    type OpenStreams = QuicOpener;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<QuicRecv, ConnectionErrorIncoming>> {
        let accepted = ready!(self.accept_uni.as_mut().poll(cx));
        self.accept_uni = next_uni(self.conn.clone());
        let recv = accepted.map_err(connection_error)?;
        Poll::Ready(QuicRecv::new(recv))
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<QuicBidi<B>, ConnectionErrorIncoming>> {
        let accepted = ready!(self.accept_bi.as_mut().poll(cx));
        self.accept_bi = next_bi(self.conn.clone());
        let (send, recv) = accepted.map_err(connection_error)?;
        self.stops.insert(u64::from(send.id()), stop_signal(&send));
        Poll::Ready(Ok(QuicBidi {
            send: QuicSend::new(send)?,
            recv: QuicRecv::new(recv)?,
        }))
    }

    fn opener(&self) -> QuicOpener {
        QuicOpener::new(self.conn.clone())
    }
}

impl<B: Buf> quic::OpenStreams<B> for QuicConnection {
    type BidiStream = QuicBidi<B>;
    type SendStream = QuicSend<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<QuicBidi<B>, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_bidi(&mut self.opener, cx)
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<QuicSend<B>, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_send(&mut self.opener, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.opener, code, reason);
    }
}

/// Opens the server's own streams (h3's control and QPACK streams).
pub(crate) struct QuicOpener {
    conn: quinn::Connection,
    opening_bi: Option<Accepted<(quinn::SendStream, quinn::RecvStream)>>,
    opening_uni: Option<Accepted<quinn::SendStream>>,
}

impl QuicOpener {
    fn new(conn: quinn::Connection) -> Self {
        Self {
            conn,
            opening_bi: None,
            opening_uni: None,
        }
    }
}

impl<B: Buf> quic::OpenStreams<B> for QuicOpener {
    type BidiStream = QuicBidi<B>;
    type SendStream = QuicSend<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<QuicBidi<B>, StreamErrorIncoming>> {
        let conn = &self.conn;
        let opening = self.opening_bi.get_or_insert_with(|| {
            let conn = conn.clone();
            Box::pin(async move { conn.open_bi().await })
        });
        let opened = ready!(opening.as_mut().poll(cx));
        self.opening_bi = None;
        let (send, recv) = opened.map_err(stream_connection_error)?;
        let wrap = |e| StreamErrorIncoming::ConnectionErrorIncoming {
            connection_error: e,
        };
        Poll::Ready(Ok(QuicBidi {
            send: QuicSend::new(send).map_err(wrap)?,
            recv: QuicRecv::new(recv).map_err(wrap)?,
        }))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<QuicSend<B>, StreamErrorIncoming>> {
        let conn = &self.conn;
        let opening = self.opening_uni.get_or_insert_with(|| {
            let conn = conn.clone();
            Box::pin(async move { conn.open_uni().await })
        });
        let opened = ready!(opening.as_mut().poll(cx));
        self.opening_uni = None;
        let send = opened.map_err(stream_connection_error)?;
        Poll::Ready(
            QuicSend::new(send).map_err(|e| StreamErrorIncoming::ConnectionErrorIncoming {
                connection_error: e,
            }),
        )
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        self.conn.close(
            VarInt::from_u64(code.value()).unwrap_or(VarInt::MAX),
            reason,
        );
    }
}

/// Both sides of a request stream.
pub(crate) struct QuicBidi<B: Buf> {
    send: QuicSend<B>,
    recv: QuicRecv,
}

impl<B: Buf> quic::BidiStream<B> for QuicBidi<B> {
    type SendStream = QuicSend<B>;
    type RecvStream = QuicRecv;

    fn split(self) -> (QuicSend<B>, QuicRecv) {
        (self.send, self.recv)
    }
}

impl<B: Buf> quic::RecvStream for QuicBidi<B> {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        self.recv.poll_data(cx)
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.recv.recv_id()
    }
}

impl<B: Buf> quic::SendStream<B> for QuicBidi<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code);
    }

    fn send_id(&self) -> StreamId {
        self.send.send_id()
    }
}

/// The sending side of a stream: one h3 frame in hand, written into quinn as window allows.
pub(crate) struct QuicSend<B: Buf> {
    stream: quinn::SendStream,
    id: StreamId,
    writing: Option<WriteBuf<B>>,
}

impl<B: Buf> QuicSend<B> {
    fn new(stream: quinn::SendStream) -> Result<Self, ConnectionErrorIncoming> {
        Ok(Self {
            id: stream_id(stream.id())?,
            stream,
            writing: None,
        })
    }
}

fn write_error(e: quinn::WriteError) -> StreamErrorIncoming {
    match e {
        quinn::WriteError::Stopped(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        quinn::WriteError::ConnectionLost(e) => stream_connection_error(e),
        other => StreamErrorIncoming::Unknown(Box::new(other)),
    }
}

impl<B: Buf> quic::SendStream<B> for QuicSend<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        if let Some(data) = self.writing.as_mut() {
            while data.has_remaining() {
                let written = ready!(Pin::new(&mut self.stream).poll_write(cx, data.chunk()))
                    .map_err(write_error)?;
                data.advance(written);
            }
        }
        self.writing = None;
        Poll::Ready(Ok(()))
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        if self.writing.is_some() {
            return Err(StreamErrorIncoming::Unknown(
                "h3 sent a frame before the previous one was written".into(),
            ));
        }
        self.writing = Some(data.into());
        Ok(())
    }

    fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        Poll::Ready(
            self.stream
                .finish()
                .map_err(|e| StreamErrorIncoming::Unknown(Box::new(e))),
        )
    }

    fn reset(&mut self, reset_code: u64) {
        self.writing = None;
        // A stream already reset or finished and acknowledged has nothing left to reset.
        let _ = self
            .stream
            .reset(VarInt::from_u64(reset_code).unwrap_or(VarInt::MAX));
    }

    fn send_id(&self) -> StreamId {
        self.id
    }
}

type ReadChunk = (
    quinn::RecvStream,
    Result<Option<quinn::Chunk>, quinn::ReadError>,
);

/// The receiving side of a stream: chunks as quinn received them, never copied.
pub(crate) struct QuicRecv {
    /// `None` while a read owns it.
    stream: Option<quinn::RecvStream>,
    id: StreamId,
    read: ReusableBoxFuture<'static, ReadChunk>,
}

impl QuicRecv {
    fn new(stream: quinn::RecvStream) -> Result<Self, ConnectionErrorIncoming> {
        Ok(Self {
            id: stream_id(stream.id())?,
            stream: Some(stream),
            read: ReusableBoxFuture::new(std::future::pending()),
        })
    }
}

impl quic::RecvStream for QuicRecv {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        if let Some(mut stream) = self.stream.take() {
            self.read.set(async move {
                let chunk = stream.read_chunk(usize::MAX, true).await;
                (stream, chunk)
            });
        }
        let (stream, chunk) = ready!(self.read.poll(cx));
        self.stream = Some(stream);
        match chunk {
            Ok(chunk) => Poll::Ready(Ok(chunk.map(|c| c.bytes))),
            Err(quinn::ReadError::Reset(code)) => {
                Poll::Ready(Err(StreamErrorIncoming::StreamTerminated {
                    error_code: code.into_inner(),
                }))
            }
            Err(quinn::ReadError::ConnectionLost(e)) => {
                Poll::Ready(Err(stream_connection_error(e)))
            }
            Err(other) => Poll::Ready(Err(StreamErrorIncoming::Unknown(Box::new(other)))),
        }
    }

    fn stop_sending(&mut self, error_code: u64) {
        if let Some(stream) = self.stream.as_mut() {
            let _ = stream.stop(VarInt::from_u64(error_code).unwrap_or(VarInt::MAX));
        }
    }

    fn recv_id(&self) -> StreamId {
        self.id
    }
}
