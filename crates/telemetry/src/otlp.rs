//! OTLP/gRPC export of tracing spans (cargo feature `otlp`).
//!
//! Spans go through `tracing-opentelemetry` into the OpenTelemetry SDK's batch processor (its
//! own thread), which hands each batch to the OTLP exporter. That exporter speaks gRPC through
//! tonic, whose channels need a tokio runtime to drive their connections. The `pnp` binary sets
//! logging up before it builds its runtime, and the exporter must outlive the data plane's
//! runtime to flush the last spans at shutdown, so the exporter gets a runtime of its own: one
//! worker thread named `pnp-otlp`. This module is not the place for metrics: those are scraped
//! from the admin listener in Prometheus format.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::registry::LookupSpan;

/// How long shutdown waits for the last batch to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Instrumentation scope name of pnp's spans.
const SCOPE: &str = "pnp";

/// A running OTLP span export. Dropping it flushes what is queued and stops the exporter.
pub(crate) struct OtlpExport {
    provider: SdkTracerProvider,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for OtlpExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpExport").finish_non_exhaustive()
    }
}

impl OtlpExport {
    /// Start exporting to `endpoint` (`http://host:4317`, or `https://…` with the system's
    /// root certificates). Nothing is sent until a span ends; an unreachable collector costs
    /// failed batches (the SDK logs and drops them), never a stalled call.
    pub(crate) fn start(endpoint: &str) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pnp-otlp")
            .enable_all()
            .build()
            .map_err(|e| format!("starting the OTLP exporter's runtime: {e}"))?;
        // tonic spawns its channel's worker on the runtime current at build time.
        let exporter = {
            let _entered = runtime.enter();
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint);
            if endpoint.starts_with("https:") {
                builder = builder.with_tls_config(
                    opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new()
                        .with_native_roots(),
                );
            }
            builder
                .build()
                .map_err(|e| format!("OTLP endpoint {endpoint:?}: {e}"))?
        };
        let provider = SdkTracerProvider::builder()
            .with_resource(resource())
            .with_batch_exporter(exporter)
            .build();
        Ok(Self {
            provider,
            runtime: Some(runtime),
        })
    }

    /// The layer that turns tracing spans into OpenTelemetry spans for this export.
    pub(crate) fn layer<S>(&self) -> tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer(SCOPE))
    }

    /// Send what is queued now.
    pub(crate) fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            eprintln!("pnp: flushing OTLP spans: {e}");
        }
    }
}

impl Drop for OtlpExport {
    fn drop(&mut self) {
        // Blocks until the batch thread has exported (or given up): the exporter's own runtime
        // does the I/O, so this is safe from any thread, even inside another runtime.
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            eprintln!("pnp: stopping OTLP export: {e}");
        }
        if let Some(runtime) = self.runtime.take() {
            // Dropping a runtime blocks, which panics inside another runtime.
            runtime.shutdown_background();
        }
    }
}

/// `service.name = pnp` unless the operator named the service through the environment.
fn resource() -> Resource {
    let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
            .is_ok_and(|attributes| attributes.contains("service.name="));
    let builder = Resource::builder();
    if named {
        builder.build()
    } else {
        builder.with_service_name("pnp").build()
    }
}
