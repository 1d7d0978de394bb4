//! Prometheus metrics (OpenMetrics text) of the data plane.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::labels::BoundedValues;

/// Buckets for time to first message and gaps between messages: 1 ms to 30 s, dense where token
/// streams live (tens of milliseconds to a few seconds).
pub const MESSAGE_TIME_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
];
/// Buckets for whole calls: 1 ms to 5 min (token streams run 2–8 s with a tail past 15 s).
pub const CALL_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 8.0, 10.0, 15.0, 20.0, 30.0,
    60.0, 120.0, 300.0,
];
/// Distinct method label values kept before newcomers become `other`.
const METHOD_LIMIT: usize = 512;
/// Distinct job label values kept before newcomers become `other`.
const JOB_LIMIT: usize = 64;
/// gRPC UNIMPLEMENTED: calls that end with it label their method `unknown`.
const UNIMPLEMENTED: i32 = 12;
/// gRPC CANCELLED: what a call that was dropped unfinished (client gone) records.
const CANCELLED: i32 = 1;

/// Which way a message travelled.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Client to upstream.
    Request,
    /// Upstream to client.
    Response,
}

impl EncodeLabelValue for Direction {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        let text = match self {
            Direction::Request => "request",
            Direction::Response => "response",
        };
        std::fmt::Write::write_str(encoder, text)
    }
}

/// A shared label value.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Label(Arc<str>);

impl EncodeLabelValue for Label {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, &self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: Label,
    job: Label,
    transport: &'static str,
    grpc_status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DurationLabels {
    method: Label,
    job: Label,
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: Label,
    job: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    direction: Direction,
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClockLabels {
    clock: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    method: Label,
    job: Label,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SelectionLabels {
    job: Label,
    transport: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BufferLabels {
    reason: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn message_time_histogram() -> Histogram {
    Histogram::new(MESSAGE_TIME_BUCKETS.iter().copied())
}

fn call_histogram() -> Histogram {
    Histogram::new(CALL_BUCKETS.iter().copied())
}

/// The metrics of one data plane. Cheap to clone; all clones share the series.
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    duration: HistogramFamily<DurationLabels>,
    first_message: HistogramFamily<MethodLabels>,
    message_gap: HistogramFamily<MethodLabels>,
    active_streams: Family<TransportLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
    messages: Family<FlowLabels, Counter<u64, AtomicU64>>,
    bytes: Family<FlowLabels, Counter<u64, AtomicU64>>,
    clock_expiries: Family<ClockLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    retry_tokens: Gauge<f64, AtomicU64>,
    shed: Family<ShedLabels, Counter>,
    breaker_state: Family<UpstreamLabels, Gauge>,
    breaker_probes_abandoned: Family<UpstreamLabels, Counter>,
    queue_depth: Gauge,
    connections_open: Gauge,
    connections_refused: Family<ShedLabels, Counter>,
    client_resets: Family<ProtocolLabels, Counter>,
    buffered_bytes: Gauge,
    buffer_refusals: Family<BufferLabels, Counter>,
    transport_selected: Family<SelectionLabels, Counter>,
    transport_health: Family<TransportLabels, Gauge>,
    job_throughput: Family<JobLabels, Gauge<f64, AtomicU64>>,
    methods: BoundedValues,
    jobs: BoundedValues,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of series, registered under the `pnp_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pnp");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "calls",
            "Calls finished, by method, job, transport and grpc status",
            calls.clone(),
        );
        let duration: HistogramFamily<DurationLabels> =
            Family::new_with_constructor(call_histogram);
        registry.register(
            "call_duration_seconds",
            "Call duration from request headers to final status",
            duration.clone(),
        );
        let first_message: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(message_time_histogram);
        registry.register(
            "first_message_seconds",
            "Time from request headers to the first response message (time to first token)",
            first_message.clone(),
        );
        let message_gap: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(message_time_histogram);
        registry.register(
            "message_gap_seconds",
            "Time between a call's consecutive response messages; messages that leave together in one write count once",
            message_gap.clone(),
        );
        let active_streams = Family::default();
        registry.register(
            "active_streams",
            "Calls in flight, by transport",
            active_streams.clone(),
        );
        let messages = Family::default();
        registry.register(
            "messages",
            "Messages forwarded, by direction and transport",
            messages.clone(),
        );
        let bytes = Family::default();
        registry.register(
            "message_bytes",
            "Message payload bytes forwarded, by direction and transport",
            bytes.clone(),
        );
        let clock_expiries = Family::default();
        registry.register(
            "clock_expiries",
            "Calls ended by one of pnp's clocks, by clock",
            clock_expiries.clone(),
        );
        let retries = Family::default();
        registry.register(
            "retries",
            "Retry attempts made, by method, job and the status that caused them",
            retries.clone(),
        );
        let retry_tokens = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "retry_budget_tokens",
            "Retry throttle tokens left (gRFC A6); retries stop at half the bucket",
            retry_tokens.clone(),
        );
        let shed = Family::default();
        registry.register(
            "shed",
            "Calls shed or degraded, by reason (concurrency, client_share, slo_degrade)",
            shed.clone(),
        );
        let breaker_state = Family::default();
        registry.register(
            "breaker_state",
            "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open",
            breaker_state.clone(),
        );
        let breaker_probes_abandoned = Family::default();
        registry.register(
            "breaker_probes_abandoned",
            "Half-open circuit breaker probes whose caller went away before an outcome, per upstream (the next call probes instead)",
            breaker_probes_abandoned.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Calls waiting for upstream response headers",
            queue_depth.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Client connections open on the data-plane listener",
            connections_open.clone(),
        );
        let connections_refused = Family::default();
        registry.register(
            "connections_refused",
            "Client connections closed before serving a request, by reason (limit, handshake_timeout, handshake_failed)",
            connections_refused.clone(),
        );
        let client_resets = Family::default();
        registry.register(
            "client_resets",
            "Calls pnp ended whose final status the client did not read in time, so its stream was reset (HTTP/2) or its connection closed (HTTP/1.1), by protocol",
            client_resets.clone(),
        );
        let buffered_bytes = Gauge::default();
        registry.register(
            "buffered_bytes",
            "Message bytes pnp holds under the global buffer budget (limits.buffer_budget)",
            buffered_bytes.clone(),
        );
        let buffer_refusals = Family::default();
        registry.register(
            "buffer_budget_refusals",
            "Times the global buffer budget could not take more bytes, by what asked (replay: a request stopped being kept for retries)",
            buffer_refusals.clone(),
        );
        let transport_selected = Family::default();
        registry.register(
            "transport_selected",
            "Calls by the transport negotiation chose for them, by job (the call's profile), transport and reason (default, throughput, size_hint, failure_streak, fallback, forced)",
            transport_selected.clone(),
        );
        let transport_health = Family::default();
        registry.register(
            "transport_health",
            "Whether negotiation takes a transport to the upstream to work: 1 healthy, 0 failed and being re-probed",
            transport_health.clone(),
        );
        let job_throughput = Family::<JobLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "job_throughput_bytes_per_second",
            "Each job's smoothed payload throughput (both directions) as negotiation sees it",
            job_throughput.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                transport_selected,
                transport_health,
                job_throughput,
                registry,
                calls,
                duration,
                first_message,
                message_gap,
                active_streams,
                messages,
                bytes,
                clock_expiries,
                retries,
                retry_tokens,
                shed,
                breaker_state,
                breaker_probes_abandoned,
                queue_depth,
                connections_open,
                connections_refused,
                client_resets,
                buffered_bytes,
                buffer_refusals,
                methods: BoundedValues::new(METHOD_LIMIT),
                jobs: BoundedValues::new(JOB_LIMIT),
            }),
        }
    }

    /// The OpenMetrics text exposition of every series.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.inner.registry).is_err() {
            text.clear();
        }
        text
    }

    /// Start recording a call on `path` (`/pkg.Service/Method`) for `job` over `transport`.
    ///
    /// The series a call touches on every message (flow counters, the active-streams gauge) are
    /// looked up here once; the per-method histograms on the first response message.
    pub fn call(&self, path: &str, job: Option<&str>, transport: &'static str) -> CallRecorder {
        let inner = &self.inner;
        let active = inner
            .active_streams
            .get_or_create(&TransportLabels { transport })
            .clone();
        active.inc();
        let labels = FlowLabels {
            direction: Direction::Response,
            transport,
        };
        CallRecorder {
            metrics: self.clone(),
            path: path.into(),
            method: None,
            job: Label(inner.jobs.get(job.unwrap_or("none"))),
            transport,
            start: Instant::now(),
            last_message: None,
            messages: 0,
            finished: false,
            messages_out: inner.messages.get_or_create(&labels).clone(),
            bytes_out: inner.bytes.get_or_create(&labels).clone(),
            active,
            message_gap: None,
        }
    }

    /// Counters for request messages of calls over `transport`: (messages, bytes).
    pub fn request_counters(&self, transport: &'static str) -> (Counter, Counter) {
        let labels = FlowLabels {
            direction: Direction::Request,
            transport,
        };
        (
            self.inner.messages.get_or_create(&labels).clone(),
            self.inner.bytes.get_or_create(&labels).clone(),
        )
    }

    /// A retry attempt of a call on `path` is about to be made because of `reason` (the
    /// previous attempt's status, e.g. `unavailable`, or `unprocessed`).
    pub fn retry(&self, path: &str, job: Option<&str>, reason: &'static str) {
        let inner = &self.inner;
        inner
            .retries
            .get_or_create(&RetryLabels {
                method: Label(inner.methods.get(path)),
                job: Label(inner.jobs.get(job.unwrap_or("none"))),
                reason,
            })
            .inc();
    }

    /// Retry throttle tokens left.
    pub fn set_retry_tokens(&self, tokens: f64) {
        self.inner.retry_tokens.set(tokens);
    }

    /// A call was shed or degraded for `reason`.
    pub fn shed(&self, reason: &'static str) {
        self.inner.shed.get_or_create(&ShedLabels { reason }).inc();
    }

    /// The breaker of `upstream` is now in `state` (0 closed, 1 half-open, 2 open).
    pub fn set_breaker_state(&self, upstream: &str, state: i64) {
        self.inner
            .breaker_state
            .get_or_create(&UpstreamLabels {
                upstream: Label(Arc::from(upstream)),
            })
            .set(state);
    }

    /// A half-open probe of `upstream`'s breaker ended without an outcome (its caller went
    /// away), so the next call becomes the probe.
    pub fn breaker_probe_abandoned(&self, upstream: &str) {
        self.inner
            .breaker_probes_abandoned
            .get_or_create(&UpstreamLabels {
                upstream: Label(Arc::from(upstream)),
            })
            .inc();
    }

    /// The gauge of calls waiting for upstream response headers.
    pub fn queue_depth(&self) -> Gauge {
        self.inner.queue_depth.clone()
    }

    /// The gauge of open client connections.
    pub fn connections_open(&self) -> Gauge {
        self.inner.connections_open.clone()
    }

    /// A client connection was closed before it was served, for `reason`.
    pub fn connection_refused(&self, reason: &'static str) {
        self.inner
            .connections_refused
            .get_or_create(&ShedLabels { reason })
            .inc();
    }

    /// A call's client stream was reset (or its HTTP/1.1 connection closed) because the
    /// client did not read the call's final status; `protocol` is `h1`, `h2` or `h3`.
    pub fn client_reset(&self, protocol: &'static str) {
        self.inner
            .client_resets
            .get_or_create(&ProtocolLabels { protocol })
            .inc();
    }

    /// The gauge of message bytes held under the global buffer budget.
    pub fn buffered_bytes(&self) -> Gauge {
        self.inner.buffered_bytes.clone()
    }

    /// The buffer budget refused bytes that `reason` (e.g. `replay`) asked for.
    pub fn buffer_refused(&self, reason: &'static str) {
        self.inner
            .buffer_refusals
            .get_or_create(&BufferLabels { reason })
            .inc();
    }

    /// The counter of calls of `job` for which negotiation chose `transport` because of
    /// `reason` (`pnp_transport_selected_total`), for the caller to keep and increment.
    pub fn transport_selected_counter(
        &self,
        job: &str,
        transport: &'static str,
        reason: &'static str,
    ) -> Counter {
        let inner = &self.inner;
        inner
            .transport_selected
            .get_or_create(&SelectionLabels {
                job: Label(inner.jobs.get(job)),
                transport,
                reason,
            })
            .clone()
    }

    /// Negotiation now takes `transport` to be healthy (or not).
    pub fn set_transport_health(&self, transport: &'static str, healthy: bool) {
        self.inner
            .transport_health
            .get_or_create(&TransportLabels { transport })
            .set(i64::from(healthy));
    }

    /// `job`'s smoothed throughput, bytes per second.
    pub fn set_job_throughput(&self, job: &str, bytes_per_second: f64) {
        let inner = &self.inner;
        inner
            .job_throughput
            .get_or_create(&JobLabels {
                job: Label(inner.jobs.get(job)),
            })
            .set(bytes_per_second);
    }

    /// One of pnp's clocks ended a call.
    pub fn clock_expired(&self, clock: &'static str) {
        self.inner
            .clock_expiries
            .get_or_create(&ClockLabels { clock })
            .inc();
    }
}

/// Records one call: create it with [`Metrics::call`], report each response message, then
/// [`finish`](CallRecorder::finish). Dropped unfinished, it records the call as CANCELLED
/// (the client went away).
#[derive(Debug)]
pub struct CallRecorder {
    metrics: Metrics,
    path: Box<str>,
    method: Option<Label>,
    job: Label,
    transport: &'static str,
    start: Instant,
    last_message: Option<Instant>,
    messages: u64,
    finished: bool,
    messages_out: Counter,
    bytes_out: Counter,
    /// This call's series of `pnp_active_streams`.
    active: Gauge,
    /// This call's series of the inter-message gap histogram, once a message went out.
    message_gap: Option<Histogram>,
}

impl CallRecorder {
    /// The method label: the path once the upstream has shown it implements it.
    fn method(&mut self, implemented: bool) -> Label {
        if !implemented {
            return Label(Arc::from("unknown"));
        }
        if let Some(method) = &self.method {
            return method.clone();
        }
        let method = Label(self.metrics.inner.methods.get(&self.path));
        self.method = Some(method.clone());
        method
    }

    /// More payload bytes of a large response message that went out in fragments (its start was
    /// counted by [`response_message`](Self::response_message)).
    pub fn response_bytes(&mut self, bytes: usize) {
        self.bytes_out.inc_by(bytes as u64);
    }

    /// A response message of `bytes` payload bytes was sent to the client. Returns its
    /// sequence number (0 for the first).
    pub fn response_message(&mut self, bytes: usize) -> u64 {
        self.response_message_at(bytes, Instant::now())
    }

    /// [`response_message`](Self::response_message) with the time it went out, for a caller
    /// that read the clock once for a burst of messages.
    pub fn response_message_at(&mut self, bytes: usize, now: Instant) -> u64 {
        self.messages_out.inc();
        self.bytes_out.inc_by(bytes as u64);
        match (self.last_message, &self.message_gap) {
            // Messages that leave together (one write, one reading of the clock) are one
            // observation: the histogram shows the pauses a client sees, not a pile of zeros.
            (Some(last), Some(_)) if last == now => {}
            (Some(last), Some(gap)) => gap.observe(now.duration_since(last).as_secs_f64()),
            _ => {
                let labels = MethodLabels {
                    method: self.method(true),
                    job: self.job.clone(),
                };
                let inner = &self.metrics.inner;
                inner
                    .first_message
                    .get_or_create(&labels)
                    .observe(now.duration_since(self.start).as_secs_f64());
                self.message_gap = Some(inner.message_gap.get_or_create(&labels).clone());
            }
        }
        self.last_message = Some(now);
        let seq = self.messages;
        self.messages += 1;
        seq
    }

    /// The call goes over `transport` after all (negotiation fell back from the one it was
    /// recorded under): its in-flight gauge and response counters move there.
    pub fn set_transport(&mut self, transport: &'static str) {
        if transport == self.transport || self.finished {
            return;
        }
        let inner = &self.metrics.inner;
        self.active.dec();
        self.active = inner
            .active_streams
            .get_or_create(&TransportLabels { transport })
            .clone();
        self.active.inc();
        let labels = FlowLabels {
            direction: Direction::Response,
            transport,
        };
        self.messages_out = inner.messages.get_or_create(&labels).clone();
        self.bytes_out = inner.bytes.get_or_create(&labels).clone();
        self.transport = transport;
    }

    /// Response messages so far.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Time since the call started.
    pub fn elapsed(&self) -> std::time::Duration {
        self.start.elapsed()
    }

    /// The call ended with gRPC status `code`.
    pub fn finish(&mut self, code: i32) {
        if self.finished {
            return;
        }
        self.finished = true;
        let implemented = code != UNIMPLEMENTED || self.messages > 0;
        let method = self.method(implemented);
        let inner = &self.metrics.inner;
        inner
            .calls
            .get_or_create(&CallLabels {
                method: method.clone(),
                job: self.job.clone(),
                transport: self.transport,
                grpc_status: status_label(code),
            })
            .inc();
        inner
            .duration
            .get_or_create(&DurationLabels {
                method,
                job: self.job.clone(),
                transport: self.transport,
            })
            .observe(self.start.elapsed().as_secs_f64());
        self.active.dec();
    }
}

impl Drop for CallRecorder {
    fn drop(&mut self) {
        self.finish(CANCELLED);
    }
}

/// gRPC codes as static label values (`"0"` … `"16"`).
fn status_label(code: i32) -> &'static str {
    const LABELS: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| LABELS.get(i).copied())
        .unwrap_or("2")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn a_finished_call_is_counted_once_with_its_status() {
        let metrics = Metrics::new();
        let mut call = metrics.call("/a.B/C", Some("chat"), "h2");
        call.response_message(10);
        call.response_message(20);
        call.finish(0);
        drop(call);
        let text = metrics.encode();
        let calls = line(
            &text,
            r#"pnp_calls_total{method="/a.B/C",job="chat",transport="h2",grpc_status="0"}"#,
        );
        assert_eq!(
            calls.map(|l| l.rsplit(' ').next()),
            Some(Some("1")),
            "{text}"
        );
        assert!(
            text.contains(r#"pnp_message_bytes_total{direction="response",transport="h2"} 30"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pnp_first_message_seconds_count{method="/a.B/C",job="chat"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pnp_message_gap_seconds_count{method="/a.B/C",job="chat"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pnp_active_streams{transport="h2"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn buffer_and_breaker_probe_series() {
        let metrics = Metrics::new();
        let gauge = metrics.buffered_bytes();
        gauge.inc_by(300);
        gauge.dec_by(100);
        metrics.buffer_refused("replay");
        metrics.buffer_refused("replay");
        metrics.breaker_probe_abandoned("http://up:50051");
        let text = metrics.encode();
        assert!(text.contains("pnp_buffered_bytes 200"), "{text}");
        assert!(
            text.contains(r#"pnp_buffer_budget_refusals_total{reason="replay"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pnp_breaker_probes_abandoned_total{upstream="http://up:50051"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn unimplemented_methods_collapse_and_drops_are_cancelled() {
        let metrics = Metrics::new();
        for i in 0..3 {
            let mut call = metrics.call(&format!("/random.Path/{i}"), None, "h2");
            call.finish(12);
        }
        drop(metrics.call("/a.B/C", None, "h2"));
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"pnp_calls_total{method="unknown",job="none",transport="h2",grpc_status="12"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"pnp_calls_total{method="/a.B/C",job="none",transport="h2",grpc_status="1"} 1"#
            ),
            "{text}"
        );
    }
}
