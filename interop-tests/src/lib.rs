//! Harness for pnp's interoperability tests: a demo upstream behind a real proxy ([`stack`]),
//! an independent byte-level gRPC-Web / gRPC client ([`raw`]) and tonic clients over
//! gRPC-Web and native gRPC ([`channels`]).
//!
//! The raw client deliberately shares no code with `pnp-wire`: it frames, base64-encodes and
//! parses trailer blocks on its own, so a bug in the proxy's codec cannot hide behind the same
//! bug in the checker. It is strict and panics (failing the test) on any framing violation.
#![forbid(unsafe_code)]

pub mod admin;
pub mod channels;
pub mod faults;
pub mod interop;
pub mod raw;
pub mod stack;

pub use channels::{AnyChannel, TonicMode};
pub use raw::{Mode, RawClient, RawReply, RawStream};
pub use stack::Stack;
