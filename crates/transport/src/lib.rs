//! Egress transports of pnp.
//!
//! A transport is a [`tower::Service`] that takes a [`pnp_call::Call`] and returns a
//! [`pnp_call::Reply`], so the router chooses among transports the way a load balancer chooses
//! among endpoints. One module per protocol; transports do not depend on each other. Today:
//! [`http2`] (gRPC over HTTP/2, cleartext or TLS) and [`http3`] (gRPC over HTTP/3 to a peer
//! pnp). Chunked HTTP/1.1 and UCX join later.
//!
//! Every failure comes back as a [`TransportError`] that carries the gRPC status the client will
//! see, who is to blame, and whether the request could have reached the upstream (which decides
//! whether a retry is safe).
#![forbid(unsafe_code)]

mod api;
pub mod batch;
mod connect;
mod error;
mod grpc;
pub use grpc::reply_from_response;
pub mod http1;
pub mod http2;
pub mod http3;
mod metadata;

pub use api::{
    BoxFuture, Capabilities, Estimate, Kind, Meter, ServiceTransport, SharedTransport, Transport,
};
pub use error::{Blame, TransportError};
pub use metadata::{strip_request_headers, strip_response_headers};
