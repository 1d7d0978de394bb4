//! UCX transport between pnp instances (issue #12): pnp's call framing ([`frame`]) over UCX
//! active messages, which run over RDMA (RoCEv2, InfiniBand) where the fabric has it, shared
//! memory between processes on one host, and TCP otherwise.
//!
//! - [`UcxTransport`] is the edge side: a [`pnp_transport::Transport`] (`ucx://host:port`).
//! - [`UcxListener`] is the cluster side: it yields [`IncomingCall`]s (a [`pnp_call::Call`]
//!   and a [`ReplySink`]) for the proxy to serve.
//!
//! UCX itself is behind the cargo feature `ucx` (it binds and links the system UCX 1.13,
//! Debian `libucx-dev`). Without it the crate is the framing and a stub whose constructors
//! fail with "built without UCX" ([`AVAILABLE`] says which build this is). Unsafe code is
//! confined to the `sys` module, whose documentation lists the invariants; UCX workers are not
//! `Send`, so each runs on a thread of its own with a current-thread tokio runtime, driven by
//! its event fd (see `driver`).
//!
//! `unsafe` lives in `sys.rs` alone (present only with the `ucx` feature): every other module
//! forbids it, and the crate root denies it (a forbid here could not be lifted for `sys`).
#![cfg_attr(not(feature = "ucx"), forbid(unsafe_code))]

pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
mod options;

#[cfg(feature = "ucx")]
mod client;
#[cfg(feature = "ucx")]
mod driver;
#[cfg(feature = "ucx")]
mod pool;
#[cfg(feature = "ucx")]
mod server;
#[cfg(feature = "ucx")]
mod stream;
#[cfg(not(feature = "ucx"))]
mod stub;
#[cfg(feature = "ucx")]
mod sys;

#[cfg(feature = "ucx")]
pub use client::UcxTransport;
#[cfg(feature = "ucx")]
pub use server::{IncomingCall, ReplySink, RequestMessages, UcxListener};
#[cfg(not(feature = "ucx"))]
pub use stub::{IncomingCall, ReplySink, RequestMessages, UcxListener, UcxTransport};

pub use options::{
    UcxOptions, UcxTuning, DEFAULT_BUSY_POLL, DEFAULT_CALL_WINDOW, DEFAULT_MAX_FRAGMENT,
};

/// Whether this build carries UCX (the `ucx` feature).
pub const AVAILABLE: bool = cfg!(feature = "ucx");
