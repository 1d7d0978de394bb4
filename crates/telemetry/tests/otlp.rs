//! OTLP export end to end: spans from `tracing` reach a collector over gRPC with their
//! attributes. The collector is a stub of the OTLP `TraceService` on a loopback port the OS picks.
//! One test per file: it installs the process-wide subscriber.
#![cfg(feature = "otlp")]

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use pnp_telemetry::{init_tracing_with, LogFormat, TracingOptions};
use tokio::sync::mpsc;

/// Hands every export request it receives to the test.
struct Collector {
    requests: mpsc::UnboundedSender<ExportTraceServiceRequest>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.requests.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn string_attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|value| match &value.value {
            Some(Value::StringValue(text)) => Some(text.as_str()),
            _ => None,
        })
}

fn int_attribute(attributes: &[KeyValue], key: &str) -> Option<i64> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|value| match &value.value {
            Some(Value::IntValue(number)) => Some(*number),
            _ => None,
        })
}

#[test]
fn spans_reach_an_otlp_collector_with_their_attributes() {
    // The assertions below rely on the defaults: no filter, sampler or service name from outside.
    // Cleared before any thread of this process starts.
    for name in [
        "RUST_LOG",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_TRACES_SAMPLER",
        "OTEL_SDK_DISABLED",
    ] {
        std::env::remove_var(name);
    }
    // Multi-threaded: dropping the guard blocks until the export is done, and the collector must
    // keep answering meanwhile.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("test runtime")
        .block_on(export_one_call());
}

async fn export_one_call() {
    let (requests, mut received) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector { requests }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let mut options = TracingOptions::new(LogFormat::Text, "info");
    options.otlp_endpoint = Some(format!("http://{addr}"));
    let guard = init_tracing_with(options);
    assert!(guard.exporting(), "export did not start");

    {
        let call = tracing::info_span!(
            "call",
            rpc.method = "/demo.llm.v1.Generator/Generate",
            job = "chat",
            grpc_status = tracing::field::Empty,
        );
        let _entered = call.enter();
        tracing::info!(messages = 3, "call finished");
        call.record("grpc_status", 0);
    }
    // A span below the filter level must not be exported.
    drop(tracing::debug_span!("too_detailed").entered());

    // Dropping the guard flushes the batch; it blocks, so not on a runtime worker.
    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .expect("guard dropped");

    let request = tokio::time::timeout(Duration::from_secs(10), received.recv())
        .await
        .expect("no export within 10 s")
        .expect("collector gone");
    server.abort();

    let resource_spans = request.resource_spans.first().expect("resource spans");
    let resource = resource_spans.resource.as_ref().expect("resource");
    assert_eq!(
        string_attribute(&resource.attributes, "service.name"),
        Some("pnp")
    );
    let spans: Vec<_> = resource_spans
        .scope_spans
        .iter()
        .flat_map(|scope| &scope.spans)
        .collect();
    let names: Vec<_> = spans.iter().map(|span| span.name.as_str()).collect();
    assert_eq!(names, ["call"], "exported spans");
    let call = spans[0];
    assert_eq!(
        string_attribute(&call.attributes, "rpc.method"),
        Some("/demo.llm.v1.Generator/Generate")
    );
    assert_eq!(string_attribute(&call.attributes, "job"), Some("chat"));
    assert_eq!(int_attribute(&call.attributes, "grpc_status"), Some(0));
    assert!(
        call.events
            .iter()
            .any(
                |event| string_attribute(&event.attributes, "message") == Some("call finished")
                    || event.name == "call finished"
            ),
        "the log line inside the span is an event: {:?}",
        call.events
    );
    assert!(call.end_time_unix_nano >= call.start_time_unix_nano);
}
