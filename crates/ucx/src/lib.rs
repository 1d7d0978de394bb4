//! UCX transport between pnp instances (issue #12): pnp's call framing ([`frame`]) over UCX
//! active messages, which run over RDMA (RoCEv2, InfiniBand) where the fabric has it, shared
//! memory between processes on one host, and TCP otherwise.
#![cfg_attr(not(feature = "ucx"), forbid(unsafe_code))]

pub mod frame;
mod options;
#[cfg(feature = "ucx")]
mod sys;

pub use options::{UcxOptions, UcxTuning, DEFAULT_CALL_WINDOW, DEFAULT_MAX_FRAGMENT};
