//! Graded load shedding at the door: admit, degrade a stream to one buffered reply, or reject
//! with a gRPC status (RESOURCE_EXHAUSTED, or UNAVAILABLE with `grpc-retry-pushback-ms` when
//! another instance can take the call) — never a bare HTTP 429.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderValue;
use pnp_call::Status;
use pnp_config::Resilience;
use pnp_policy::latency::LatencyWindow;
use pnp_policy::shed::{ShedAction, ShedConfig, ShedInput, ShedPolicy};
use pnp_telemetry::{Gauge, Metrics};

/// Calls remembered for the p95 estimate.
const LATENCY_WINDOW: usize = 1024;
/// At most one scale-out log line per this period.
const SCALE_OUT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The door of the data plane.
#[derive(Debug)]
pub(crate) struct Admission {
    in_flight: AtomicUsize,
    waiting: AtomicUsize,
    latency: Mutex<LatencyWindow>,
    policy: ShedPolicy,
    limit: usize,
    queue_threshold: usize,
    slo: Duration,
    peer_available: bool,
    metrics: Metrics,
    queue_gauge: Gauge,
    scale_out_logged: Mutex<Option<Instant>>,
}

/// A call inside the door. Dropping it lets the next one in.
#[derive(Debug)]
pub(crate) struct Permit {
    admission: Arc<Admission>,
}

/// A call waiting for upstream response headers (the queue whose depth signals scale-out).
#[derive(Debug)]
pub(crate) struct Waiting {
    admission: Arc<Admission>,
}

/// What the door decided.
pub(crate) enum Admitted {
    /// Serve the call; `degrade` asks for one buffered reply instead of a stream.
    Yes { permit: Permit, degrade: bool },
    /// Refuse it with this status.
    No(Status),
}

impl Admission {
    pub(crate) fn new(config: &Resilience, metrics: Metrics) -> Result<Self, String> {
        let policy = ShedPolicy::new(ShedConfig {
            pushback: config.pushback,
            ..ShedConfig::default()
        })
        .map_err(|e| e.to_string())?;
        let latency = LatencyWindow::new(LATENCY_WINDOW).map_err(|e| e.to_string())?;
        Ok(Self {
            in_flight: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            latency: Mutex::new(latency),
            policy,
            limit: config.max_concurrent_streams,
            queue_threshold: config.queue_threshold,
            slo: config.stream_p95_slo,
            peer_available: config.peer_available,
            queue_gauge: metrics.queue_depth(),
            metrics,
            scale_out_logged: Mutex::new(None),
        })
    }

    /// Decide on a new call.
    pub(crate) fn admit(self: &Arc<Self>, degradable: bool) -> Admitted {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let permit = Permit {
            admission: self.clone(),
        };
        let p95 = self.latency.lock().ok().and_then(|w| w.quantile(0.95));
        let decision = self.policy.decide(&ShedInput {
            in_flight: before,
            limit: self.limit,
            queue_depth: self.waiting.load(Ordering::Acquire),
            queue_threshold: self.queue_threshold,
            p95,
            slo: self.slo,
            degradable,
            peer_available: self.peer_available,
        });
        if decision.scale_out {
            self.signal_scale_out();
        }
        match decision.action {
            ShedAction::Admit => Admitted::Yes {
                permit,
                degrade: false,
            },
            ShedAction::Degrade => {
                self.metrics.shed("slo_degrade");
                Admitted::Yes {
                    permit,
                    degrade: true,
                }
            }
            ShedAction::Reject { code, pushback_ms } => {
                drop(permit);
                self.metrics.shed("concurrency");
                let mut status = Status::new(
                    code,
                    format!(
                        "pnp: overloaded ({before} calls in flight, limit {}); {}",
                        self.limit,
                        if pushback_ms.is_some() {
                            "retry on another instance"
                        } else {
                            "retry later"
                        }
                    ),
                );
                if let Some(ms) = pushback_ms {
                    status
                        .metadata
                        .insert("grpc-retry-pushback-ms", HeaderValue::from(ms));
                }
                Admitted::No(status)
            }
        }
    }

    /// The call now waits for upstream response headers.
    pub(crate) fn waiting(self: &Arc<Self>) -> Waiting {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.queue_gauge.inc();
        Waiting {
            admission: self.clone(),
        }
    }

    fn signal_scale_out(&self) {
        let now = Instant::now();
        if let Ok(mut last) = self.scale_out_logged.lock() {
            if last.is_some_and(|at| now.duration_since(at) < SCALE_OUT_LOG_EVERY) {
                return;
            }
            *last = Some(now);
        }
        tracing::warn!(
            queue_depth = self.waiting.load(Ordering::Acquire),
            threshold = self.queue_threshold,
            "scale-out signal: calls are queueing for upstream response headers"
        );
    }
}

impl Permit {
    /// The call finished after `duration`: feed the p95 estimate.
    pub(crate) fn record(&self, duration: Duration) {
        if let Ok(mut window) = self.admission.latency.lock() {
            window.record(duration);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.admission.waiting.fetch_sub(1, Ordering::AcqRel);
        self.admission.queue_gauge.dec();
    }
}
