//! The interop "custom metadata" behaviour: echo two request headers back, one as a
//! response header and one as a trailer.
//!
//! tonic handlers can set response headers but not the trailers of a successful call (a
//! unary reply always ends with tonic's own `grpc-status: 0` trailer block), so the echo is
//! done one level down, on the HTTP response of the generated server: the same way for
//! unary and streaming methods, OK and error endings.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::Status;

/// Request header copied to the response headers.
pub const ECHO_INITIAL_HEADER: &str = "x-grpc-test-echo-initial";

/// Request header copied to the response trailers.
pub const ECHO_TRAILING_HEADER: &str = "x-grpc-test-echo-trailing-bin";

/// Wraps a generated gRPC server and echoes [`ECHO_INITIAL_HEADER`] as a response header and
/// [`ECHO_TRAILING_HEADER`] as a trailer (in the headers of a Trailers-Only response).
#[derive(Clone, Debug)]
pub struct EchoMetadata<S> {
    inner: S,
}

impl<S> EchoMetadata<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: NamedService> NamedService for EchoMetadata<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for EchoMetadata<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let initial = request.headers().get(ECHO_INITIAL_HEADER).cloned();
        let trailing = request.headers().get(ECHO_TRAILING_HEADER).cloned();
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            if let Some(value) = initial {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static(ECHO_INITIAL_HEADER), value);
            }
            let Some(value) = trailing else {
                return Ok(response);
            };
            // A Trailers-Only response (gRPC over HTTP/2: status in the headers, no body)
            // has no trailer block of its own; its headers are the trailers.
            if response.headers().contains_key("grpc-status") {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static(ECHO_TRAILING_HEADER), value);
                return Ok(response);
            }
            Ok(response.map(|body| {
                Body::new(WithTrailer {
                    inner: body,
                    extra: Some(value),
                })
            }))
        })
    }
}

/// A response body that adds one header to its trailer block.
struct WithTrailer {
    inner: Body,
    extra: Option<HeaderValue>,
}

impl WithTrailer {
    fn merge_into(&mut self, trailers: &mut HeaderMap) {
        if let Some(value) = self.extra.take() {
            trailers.insert(HeaderName::from_static(ECHO_TRAILING_HEADER), value);
        }
    }
}

impl HttpBody for WithTrailer {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_trailers() {
                Ok(mut trailers) => {
                    self.merge_into(&mut trailers);
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            // tonic always ends a body with trailers; should one end without, still deliver.
            Poll::Ready(None) if self.extra.is_some() => {
                let mut trailers = HeaderMap::new();
                self.merge_into(&mut trailers);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.extra.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
