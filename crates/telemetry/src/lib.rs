//! Telemetry of pnp: request ids, Prometheus metrics and the tracing subscriber.
//!
//! The data plane asks this crate for a [`CallRecorder`] per call and feeds it what happens
//! (messages, the final status); the admin listener renders [`Metrics::encode`]. Label values
//! are bounded: methods and jobs beyond a fixed number of distinct values collapse into
//! `"other"`, and methods the upstream does not implement are `"unknown"`, so a scan of random
//! paths cannot blow up the series count. No I/O here except the subscriber's log writer and,
//! with the cargo feature `otlp`, the OTLP span exporter (off unless an endpoint is given).
#![forbid(unsafe_code)]

mod labels;
mod metrics;
#[cfg(feature = "otlp")]
mod otlp;
pub mod request_id;
mod subscriber;

pub use metrics::{CallRecorder, Direction, Metrics, CALL_BUCKETS, MESSAGE_TIME_BUCKETS};
/// A monotonic counter handle (cheap to clone, shared with its series).
pub use prometheus_client::metrics::counter::Counter;
/// A gauge handle (cheap to clone, shared with its series).
pub use prometheus_client::metrics::gauge::Gauge;
pub use subscriber::{init_tracing, init_tracing_with, LogFormat, TracingGuard, TracingOptions};
