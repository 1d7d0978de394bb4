//! The control plane on real sockets and real rings: mTLS, every RPC through the link to a
//! fake data plane, the freeze loop, gRPC-Web.

mod freeze;
mod grpc_web;
mod hub;
mod mtls;
mod rpc;
mod support;
