//! tonic clients of pnp: gRPC-Web through `tonic_web::GrpcWebClientLayer` over hyper-util's
//! client (HTTP/1.1, or HTTP/2 with prior knowledge), and native gRPC through a tonic
//! `Channel`. All three are boxed into one [`AnyChannel`] type so that a test is written once
//! and run over each.

use std::fmt;
use std::net::SocketAddr;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pnp_demo::pb::grpc_testing::test_service_client::TestServiceClient;
use pnp_demo::pb::grpc_testing::unimplemented_service_client::UnimplementedServiceClient;
use pnp_demo::pb::llm::generator_client::GeneratorClient;
use tonic::body::Body;
use tonic_web::{GrpcWebCall, GrpcWebClientLayer};
use tower::util::BoxCloneService;
use tower::ServiceExt;

/// The error of an [`AnyChannel`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Any of the tonic transports, as one service type.
pub type AnyChannel = BoxCloneService<http::Request<Body>, http::Response<Body>, BoxError>;

/// How the tonic client reaches pnp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TonicMode {
    /// gRPC-Web (binary) over HTTP/1.1: tonic-web's client layer on hyper-util.
    WebH1,
    /// gRPC-Web (binary) over HTTP/2 with prior knowledge.
    WebH2,
    /// Native gRPC: a tonic `Channel`.
    Native,
}

impl TonicMode {
    /// Every mode.
    pub const ALL: [TonicMode; 3] = [TonicMode::WebH1, TonicMode::WebH2, TonicMode::Native];

    /// gRPC-Web rather than native gRPC.
    pub fn is_web(self) -> bool {
        self != TonicMode::Native
    }
}

impl fmt::Display for TonicMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The origin URI of the proxy at `addr`.
pub fn origin(addr: SocketAddr) -> Uri {
    format!("http://{addr}")
        .parse()
        .unwrap_or_else(|e| panic!("origin for {addr}: {e}"))
}

/// A channel to the proxy at `addr` in `mode`.
pub async fn channel(addr: SocketAddr, mode: TonicMode) -> AnyChannel {
    match mode {
        TonicMode::WebH1 => web_channel(false),
        TonicMode::WebH2 => web_channel(true),
        TonicMode::Native => {
            let channel = tonic::transport::Endpoint::from(origin(addr))
                .connect()
                .await
                .unwrap_or_else(|e| panic!("tonic channel to {addr}: {e}"));
            BoxCloneService::new(channel.map_err(BoxError::from))
        }
    }
}

/// gRPC-Web through tonic-web's client layer over hyper-util's pooled client.
fn web_channel(http2_only: bool) -> AnyChannel {
    let mut builder = Client::builder(TokioExecutor::new());
    builder.http2_only(http2_only);
    let client: Client<HttpConnector, GrpcWebCall<Body>> = builder.build_http();
    let service = tower::ServiceBuilder::new()
        .layer(GrpcWebClientLayer::new())
        .service(client)
        .map_response(|response| response.map(Body::new))
        .map_err(BoxError::from);
    BoxCloneService::new(service)
}

/// Native gRPC through hyper-util's client with HTTP/2 prior knowledge instead of a tonic
/// `Channel`. A `Channel` also enforces `grpc-timeout` locally and reports its own timer as
/// CANCELLED "Timeout expired", which hides the status the proxy sends; this one reports
/// exactly what came over the wire.
pub fn native_without_local_deadline() -> AnyChannel {
    let mut builder = Client::builder(TokioExecutor::new());
    builder.http2_only(true);
    let client: Client<HttpConnector, Body> = builder.build_http();
    let service = client
        .map_response(|response| response.map(Body::new))
        .map_err(BoxError::from);
    BoxCloneService::new(service)
}

/// A `grpc.testing.TestService` client of the proxy at `addr`.
pub async fn test_service(addr: SocketAddr, mode: TonicMode) -> TestServiceClient<AnyChannel> {
    TestServiceClient::with_origin(channel(addr, mode).await, origin(addr))
        .max_decoding_message_size(usize::MAX)
}

/// A `grpc.testing.UnimplementedService` client of the proxy at `addr`.
pub async fn unimplemented_service(
    addr: SocketAddr,
    mode: TonicMode,
) -> UnimplementedServiceClient<AnyChannel> {
    UnimplementedServiceClient::with_origin(channel(addr, mode).await, origin(addr))
}

/// A `demo.llm.v1.Generator` client of the proxy at `addr`.
pub async fn generator(addr: SocketAddr, mode: TonicMode) -> GeneratorClient<AnyChannel> {
    GeneratorClient::with_origin(channel(addr, mode).await, origin(addr))
}
