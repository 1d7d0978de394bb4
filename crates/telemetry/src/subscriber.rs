//! The tracing subscriber: text or JSON logs on stderr, level from `RUST_LOG`, and (with the
//! cargo feature `otlp`) spans exported over OTLP/gRPC when an endpoint is given.

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the call span's fields on each.
    Json,
}

/// What [`init_tracing_with`] sets up.
#[derive(Clone, Debug)]
pub struct TracingOptions {
    /// Log line format.
    pub format: LogFormat,
    /// Filter directives used when `RUST_LOG` is unset, e.g. `info`. The same filter decides
    /// which spans are exported.
    pub default_level: String,
    /// OTLP/gRPC collector to export spans to, e.g. `http://127.0.0.1:4317`. `None` falls back
    /// to `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then `OTEL_EXPORTER_OTLP_ENDPOINT`; with neither,
    /// nothing is exported. Needs the cargo feature `otlp`; without it an endpoint only earns a
    /// warning.
    pub otlp_endpoint: Option<String>,
}

impl TracingOptions {
    /// Logs in `format` at `default_level`, OTLP endpoint from the environment.
    pub fn new(format: LogFormat, default_level: &str) -> Self {
        Self {
            format,
            default_level: default_level.to_owned(),
            otlp_endpoint: None,
        }
    }
}

/// Keeps span export running. Drop it last (at the end of `main`): dropping flushes queued
/// spans to the collector, waiting up to a few seconds. Without export it holds nothing.
#[must_use = "dropping the guard stops span export"]
#[derive(Debug)]
pub struct TracingGuard {
    /// Flushes the log lines still queued for stderr when dropped.
    _logs: tracing_appender::non_blocking::WorkerGuard,
    #[cfg(feature = "otlp")]
    export: Option<crate::otlp::OtlpExport>,
}

impl TracingGuard {
    /// Whether spans are being exported over OTLP.
    pub fn exporting(&self) -> bool {
        #[cfg(feature = "otlp")]
        return self.export.is_some();
        #[cfg(not(feature = "otlp"))]
        return false;
    }

    /// Send the spans queued so far without stopping export.
    pub fn flush(&self) {
        #[cfg(feature = "otlp")]
        if let Some(export) = &self.export {
            export.flush();
        }
    }
}

/// Install the global subscriber. `default_level` applies when `RUST_LOG` is unset.
///
/// Spans are exported when built with the feature `otlp` and `OTEL_EXPORTER_OTLP_ENDPOINT` is
/// set; export then runs until the process exits, so spans that end in the last few seconds may
/// be lost. Use [`init_tracing_with`] and keep its guard to flush them at exit.
pub fn init_tracing(format: LogFormat, default_level: &str) {
    // Never dropped: export runs as long as the process.
    static GUARD: std::sync::OnceLock<TracingGuard> = std::sync::OnceLock::new();
    let _ = GUARD.set(init_tracing_with(TracingOptions::new(
        format,
        default_level,
    )));
}

/// Install the global subscriber as `options` say and start span export if asked for. Problems
/// with export (a bad endpoint, a missing feature) are logged and leave logging working.
pub fn init_tracing_with(options: TracingOptions) -> TracingGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&options.default_level));
    // Log lines go to stderr from a thread of their own, in batches: writing each line from the
    // data plane cost a `write` per call (one `call finished` line each) and, behind a slow
    // sink, would stall calls. If the queue (16 Ki lines, a few MB) fills, lines are dropped,
    // never calls.
    let (writer, logs) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(16 * 1024)
        .thread_name("pnp-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    // Colour only for a person at a terminal; escape codes in a log file are noise (and cost).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer);
    let fmt = match options.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().with_current_span(true).boxed(),
    };
    let endpoint = options.otlp_endpoint.clone().or_else(endpoint_from_env);

    #[cfg(feature = "otlp")]
    let (export, export_error) = match endpoint.as_deref().map(crate::otlp::OtlpExport::start) {
        None => (None, None),
        Some(Ok(export)) => (Some(export), None),
        Some(Err(e)) => (None, Some(e)),
    };
    #[cfg(feature = "otlp")]
    let spans = export.as_ref().map(|export| export.layer());
    #[cfg(not(feature = "otlp"))]
    let spans: Option<tracing_subscriber::layer::Identity> = None;

    let result = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(spans)
        .try_init();
    if let Err(e) = &result {
        eprintln!("pnp: logging was already set up: {e}");
    }

    #[cfg(feature = "otlp")]
    {
        // Another subscriber won: nothing would reach this export.
        let export = export.filter(|_| result.is_ok());
        match (&export, export_error, &endpoint) {
            (Some(_), _, Some(endpoint)) => {
                tracing::info!(%endpoint, "exporting spans over OTLP/gRPC");
            }
            (_, Some(error), _) => tracing::warn!(%error, "OTLP span export is off"),
            _ => {}
        }
        TracingGuard {
            _logs: logs,
            export,
        }
    }
    #[cfg(not(feature = "otlp"))]
    {
        if let Some(endpoint) = endpoint {
            tracing::warn!(
                %endpoint,
                "an OTLP endpoint is set but this build has no OTLP export (cargo feature `otlp`)"
            );
        }
        TracingGuard { _logs: logs }
    }
}

/// The endpoint the environment asks for: the traces-specific variable wins over the generic one,
/// as the OpenTelemetry specification says. Empty values count as unset.
fn endpoint_from_env() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .filter_map(|name| std::env::var(name).ok())
    .map(|value| value.trim().to_owned())
    .find(|value| !value.is_empty())
}
