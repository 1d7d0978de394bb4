//! pnp-bench: the load client, the bench upstreams and the side-by-side runner that measures
//! pnp against a direct connection, tonic-web, Envoy and nginx on one machine, in one run, and
//! two pnp instances bridged over HTTP/1.1, HTTP/2, HTTP/3 and UCX beside raw quinn and
//! `ucx_perftest`.
//!
//! It is not a test suite: performance goals live in `BENCHMARKS.md` as ratios measured here,
//! never as timing assertions. The smoke test (`tests/smoke.rs`) only checks that every
//! scenario runs and produces sane numbers.
#![forbid(unsafe_code)]

pub mod client;
pub mod frames;
pub mod idle;
pub mod peers;
pub mod plot;
pub mod procstat;
pub mod quic;
pub mod report;
pub mod runner;
pub mod scenarios;
pub mod service;
pub mod stall;
pub mod tonic_peer;
pub mod ucxhop;
pub mod ucxperf;
pub mod upstream;
