//! Built-in demo upstreams for pnp: a token-streaming model stand-in with a long-tail latency
//! distribution (`demo.llm.v1.Generator`) and the gRPC interop `grpc.testing.TestService`.
//!
//! They let a new user see tokens stream on the first `pnp serve`, and let the proxy's
//! integration and interop tests run against a real gRPC server on a loopback port.
//! [`DemoStats`] shows what the handlers saw, e.g. that a client going away cancelled the
//! upstream stream. This crate is not part of the data path and knows nothing of pnp.

mod echo_metadata;
mod generator;
mod latency;
mod stats;
mod test_service;
mod tokens;
mod upstream;

/// Code generated from `proto/` by tonic-prost-build.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    /// `grpc.testing`: the interop messages, `TestService` and `UnimplementedService`.
    pub mod grpc_testing {
        tonic::include_proto!("grpc.testing");
    }

    /// `demo.llm.v1`: the token-streaming `Generator`.
    pub mod llm {
        tonic::include_proto!("demo.llm.v1");
    }
}

pub use echo_metadata::{EchoMetadata, ECHO_INITIAL_HEADER, ECHO_TRAILING_HEADER};
pub use generator::{GeneratorImpl, DEFAULT_MAX_TOKENS, MAX_TOKENS};
pub use latency::{latency_plan, LatencyPlan, MAX_FIRST_TOKEN, MAX_TOKEN_GAP};
pub use stats::DemoStats;
pub use test_service::{TestServiceImpl, MAX_PAYLOAD_BYTES, SERVER_ID};
pub use upstream::{DemoUpstream, SHUTDOWN_GRACE};
