//! pnp's control plane (issue #14): the mTLS control API and the alert → freeze loop.
//!
//! The control plane is its own OS process (`pnp control`). It meets the data plane only
//! through the two shared-memory rings of [`pnp_link`]: commands go down with sequence numbers,
//! acknowledgements, events and periodic stats come up. This crate is:
//!
//! - [`hub`]: the one thread that owns the link's control side: sends commands and matches
//!   their acks by sequence number, keeps the job table from the data plane's Stats and Hello,
//!   runs the freeze loop, fans every event out to subscribers, resyncs when a data plane
//!   (re)attaches;
//! - [`freeze`]: the freeze rule as pure logic (time passed in), unit-tested with a simulated
//!   clock;
//! - [`service`]: the `pnp.control.v1.Control` gRPC service (`proto/pnp/control/v1/control.proto`);
//! - [`server`]: [`ControlPlane`], the service served over mTLS as gRPC and gRPC-Web (HTTP/1.1
//!   too) on one port;
//! - [`tls`]: server and client TLS settings, with an allow-list of client names;
//! - [`client`]: an mTLS client, for `pnp ctl` and tests.
//!
//! It is not the data plane, and never links it: what a command does is the data plane's
//! business (crates/proxy); this crate only carries it and reports the answer.

#![forbid(unsafe_code)]

pub mod client;
pub mod freeze;
pub mod hub;
pub mod server;
pub mod service;
pub mod tls;

/// The generated control API types, client and server (`pnp.control.v1`).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    tonic::include_proto!("pnp.control.v1");
}

pub use client::{connect, ConnectError};
pub use freeze::{FreezeLoop, FreezeRule, Trip};
pub use hub::{Ack, CommandError, FreezeSnapshot, Hub, HubOptions};
pub use server::{ControlOptions, ControlPlane, PeerInfo, StartError};
pub use tls::{ClientTls, Identity, ServerTls, TlsError};
