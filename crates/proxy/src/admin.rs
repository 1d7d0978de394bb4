//! The admin listener: `/healthz` (the process is up), `/readyz` (it takes new calls),
//! `/metrics` (Prometheus, OpenMetrics text), and transport negotiation: `GET /negotiation`
//! (JSON: each transport's health and estimate, each job's transport, throughput and
//! overrides) and the operator's override, `POST /negotiation/override?job=NAME&force=h3`,
//! `…&forbid=h1,h3` or `…&clear` (the control plane will drive the same through its API).
//!
//! It has budgets of its own, so a stuck scraper or a scan cannot pile up connections: at most
//! [`MAX_CONNECTIONS`] at once (more are closed at once), request heads within
//! [`HEADER_READ_TIMEOUT`], and no connection lives longer than [`CONNECTION_LIFETIME`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

use pnp_telemetry::Metrics;

use crate::negotiation::Negotiator;
use crate::Health;

/// Admin connections open at once.
const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send a request head (also the keep-alive idle limit).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest an admin connection may stay open.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

pub(crate) async fn serve(
    tcp: TcpListener,
    health: Arc<Health>,
    metrics: Metrics,
    negotiator: Arc<Negotiator>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match tcp.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("admin connection limit reached; closing");
            continue;
        };
        let health = health.clone();
        let metrics = metrics.clone();
        let negotiator = negotiator.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = answer(&request, &health, &metrics, &negotiator);
                async move { Ok::<_, Infallible>(response) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let served = tokio::time::timeout(
                CONNECTION_LIFETIME,
                builder.serve_connection(TokioIo::new(stream), service),
            );
            match served.await {
                Ok(Err(e)) => tracing::debug!(error = %e, "admin connection ended with an error"),
                Err(_) => tracing::debug!("admin connection closed at the end of its lifetime"),
                Ok(Ok(())) => {}
            }
        });
    }
}

fn answer(
    request: &Request<Incoming>,
    health: &Health,
    metrics: &Metrics,
    negotiator: &Negotiator,
) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/negotiation") => {
            let mut response = Response::new(Full::new(Bytes::from(
                negotiator.status().to_string() + "\n",
            )));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            return response;
        }
        (&Method::POST, "/negotiation/override") => {
            let query = request.uri().query().unwrap_or("");
            let params: Vec<_> = crate::ingress::query_params(query)
                .filter(|(key, _)| !key.is_empty())
                .collect();
            let get = |key: &str| params.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
            let outcome = match get("job") {
                None => Err("name the job: ?job=NAME".to_owned()),
                Some(job) => {
                    let forbid: Vec<&str> = get("forbid")
                        .map(|list| list.split(',').filter(|t| !t.is_empty()).collect())
                        .unwrap_or_default();
                    negotiator.override_job(
                        job,
                        get("force").filter(|t| !t.is_empty()),
                        &forbid,
                        get("clear").is_some(),
                    )
                }
            };
            let (status, body) = match outcome {
                Ok(summary) => (StatusCode::OK, summary + "\n"),
                Err(reason) => (StatusCode::BAD_REQUEST, reason + "\n"),
            };
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            return response;
        }
        _ => {}
    }
    if request.method() == Method::GET && request.uri().path() == "/metrics" {
        let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        return response;
    }
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") if health.is_ready() => {
            (StatusCode::OK, "ready\n")
        }
        (&Method::GET | &Method::HEAD, "/readyz") => {
            (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}
