//! The tonic-web peer: the bench service written with tonic and served with `tonic_web`'s layer
//! in the same process, which is how a Rust service speaks gRPC-Web without any proxy.
//!
//! Messages are raw [`Bytes`] (a pass-through codec), so the only extra work over the raw `h2`
//! upstream is tonic's and tonic-web's own.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use futures_util::stream::{self, BoxStream, StreamExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};
use tonic::Status;

use crate::service::{self, Method, Params};

/// Messages as raw bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> Self::Encoder {
        BytesCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The bench service for tonic.
#[derive(Clone, Copy, Debug, Default)]
pub struct BenchService;

impl NamedService for BenchService {
    const NAME: &'static str = "bench.Bench";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

struct Unary;

impl UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, _request: tonic::Request<Bytes>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(service::UNARY_FRAME.slice(5..))))
    }
}

/// [`Method::Upload`]: the whole request message arrives in memory (tonic decodes messages
/// whole); the reply is its length.
struct Upload;

impl UnaryService<Bytes> for Upload {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let len = request.into_inner().len() as u64;
        std::future::ready(Ok(tonic::Response::new(Bytes::copy_from_slice(
            &len.to_le_bytes(),
        ))))
    }
}

struct Streaming(Method);

impl ServerStreamingService<Bytes> for Streaming {
    type Response = Bytes;
    type ResponseStream = BoxStream<'static, Result<Bytes, Status>>;
    type Future = std::future::Ready<Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let params = Params::from_headers(&request.metadata().clone().into_headers());
        let messages = match self.0 {
            Method::Tokens if params.interval_us > 0 => paced(params),
            Method::Tokens => {
                let one = Bytes::from(vec![0u8; params.size as usize]);
                let forever = stream::repeat(one).map(Ok);
                if params.count == 0 {
                    forever.boxed()
                } else {
                    forever.take(params.count as usize).boxed()
                }
            }
            Method::Idle => stream::once(std::future::ready(Ok(Bytes::new())))
                .chain(stream::pending())
                .boxed(),
            Method::Bulk | Method::Unary | Method::Upload => {
                let size = params.size as usize;
                let mut message = bytes::BytesMut::with_capacity(size);
                while message.len() < size {
                    let n = (size - message.len()).min(service::BULK_CHUNK);
                    message.put_slice(&service::BULK_BYTES[..n]);
                }
                stream::once(std::future::ready(Ok(message.freeze()))).boxed()
            }
        };
        std::future::ready(Ok(tonic::Response::new(messages)))
    }
}

fn paced(params: Params) -> BoxStream<'static, Result<Bytes, Status>> {
    let mut tick = tokio::time::interval(Duration::from_micros(params.interval_us));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let size = params.size as usize;
    let stamped = stream::unfold(tick, move |mut tick| async move {
        let _ = tick.tick().await;
        Some((Ok(service::stamped(size).slice(5..)), tick))
    });
    if params.count == 0 {
        stamped.boxed()
    } else {
        stamped.take(params.count as usize).boxed()
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for BenchService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let method = Method::from_path(request.uri().path());
        Box::pin(async move {
            // tonic's limits are raised to the gRPC frame's (4 GiB − 1) so that S6 measures
            // how tonic carries large messages rather than stopping at its 4 MiB default.
            let mut grpc = Grpc::new(BytesCodec)
                .max_decoding_message_size(service::MAX_MESSAGE as usize)
                .max_encoding_message_size(service::MAX_MESSAGE as usize);
            Ok(match method {
                Some(Method::Unary) => grpc.unary(Unary, request).await,
                Some(Method::Upload) => grpc.unary(Upload, request).await,
                Some(method) => grpc.server_streaming(Streaming(method), request).await,
                None => Status::unimplemented("no such bench method").into_http(),
            })
        })
    }
}

/// Serve the bench service with gRPC-Web (and plain gRPC) on `addr`; never returns unless the
/// server fails.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = crate::upstream::bind(addr)?;
    println!("listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .accept_http1(true)
        .tcp_nodelay(true)
        .initial_stream_window_size(service::STREAM_WINDOW)
        .initial_connection_window_size(service::CONNECTION_WINDOW)
        .max_concurrent_streams(1 << 20)
        .layer(tonic_web::GrpcWebLayer::new())
        .add_service(BenchService)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
