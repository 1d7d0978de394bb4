//! The ingress adapter: gRPC-Web (binary and text, over HTTP/1.1 or HTTP/2) and native gRPC
//! (HTTP/2) in, the call model out.
//!
//! PROTOCOL-WEB.md: the request is a gRPC request with a different content type; the response
//! carries the trailers as a final 0x80 frame in the body. `application/grpc-web-text` bodies are
//! base64 in both directions. Browsers that avoid CORS preflight put headers in the
//! `$httpHeaders` query parameter instead.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use pnp_call::{Call, CallHead, Code, Reply, Status};
use pnp_policy::deadline::{Deadline, DeadlineOffset};
use pnp_policy::idle::StreamClocks;
use pnp_telemetry::{request_id, Metrics};
use pnp_transport::{strip_request_headers, TransportError};
use pnp_wire::content_type::{self, Protocol};
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneSyncService;
use tracing::Instrument;

use crate::abort::CallAbort;
use crate::admission::{Admission, Admitted};
use crate::budget::BufferBudget;
use crate::conn::PeerAddr;
use crate::profiles::Profiles;
use crate::reply::{
    base_headers, shutdown_status, CallClocks, Clocks, Encoding, Observer, ReplyBody,
};
use crate::request::{RequestActivity, RequestMessages};
use crate::resilience::GuardedUpstream;
use crate::responder;
use crate::site;

/// The header that names the job a call belongs to (see job profiles in DESIGN.md).
pub const JOB_HEADER: &str = "x-pnp-job";

/// The egress side as the ingress sees it: any transport.
pub type Transport = BoxCloneSyncService<Call, Reply, TransportError>;

/// The ingress service: one per listener, cloned per connection.
#[derive(Clone)]
pub struct Ingress {
    inner: Arc<Inner>,
}

/// Everything the ingress needs to serve calls.
pub(crate) struct Inner {
    pub(crate) upstream: GuardedUpstream,
    pub(crate) transport_name: &'static str,
    pub(crate) max_message_size: usize,
    pub(crate) shutdown: CancellationToken,
    pub(crate) metrics: Metrics,
    pub(crate) profiles: Profiles,
    pub(crate) admission: Arc<Admission>,
    /// The global buffer budget (`limits.buffer_budget`), for whatever a call buffers.
    #[allow(dead_code, reason = "the degraded-reply buffer is put under it next")]
    pub(crate) budget: BufferBudget,
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("transport", &self.inner.transport_name)
            .finish()
    }
}

impl Ingress {
    pub(crate) fn new(inner: Inner) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }
}

impl tower::Service<Request<Incoming>> for Ingress {
    type Response = Response<ReplyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ReplyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let inner = self.inner.clone();
        // The id travels upstream with the call's metadata and comes back on the response.
        let request_id =
            request_id::from_headers(request.headers()).unwrap_or_else(request_id::generate);
        request
            .headers_mut()
            .insert(request_id::HEADER, request_id.clone());
        let span = tracing::info_span!(
            "call",
            request_id = %String::from_utf8_lossy(request_id.as_bytes()),
            method = %request.uri().path(),
            job = request.headers().get(JOB_HEADER).and_then(|v| v.to_str().ok()).unwrap_or(""),
            transport = inner.transport_name,
            grpc_status = tracing::field::Empty,
        );
        Box::pin(
            async move {
                let mut response = inner.handle(request).await;
                response
                    .headers_mut()
                    .insert(request_id::HEADER, request_id);
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// What the ingress learned from the request line and headers.
struct Accepted {
    protocol: Protocol,
    encoding: Encoding,
    subtype: Option<String>,
    timeout: Option<Duration>,
}

impl Inner {
    async fn handle(&self, request: Request<Incoming>) -> Response<ReplyBody> {
        let arrival = Instant::now();
        let (mut parts, body) = request.into_parts();
        if let Some(page) = site::serve(&parts) {
            return page;
        }
        let accepted = match accept(&mut parts) {
            Ok(accepted) => accepted,
            Err(refusal) => return *refusal,
        };
        let encoding = accepted.encoding;
        let subtype = accepted.subtype.clone();

        let mut metadata = parts.headers;
        strip_request_headers(&mut metadata);
        let path: http::uri::PathAndQuery = match parts.uri.path().parse() {
            Ok(path) => path,
            Err(_) => {
                return responder::trailers_only(
                    encoding,
                    subtype.as_deref(),
                    &Status::new(Code::Internal, "pnp: invalid request path"),
                    None,
                )
            }
        };
        let job = metadata
            .get(JOB_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut observer = Observer {
            recorder: self
                .metrics
                .call(path.path(), job.as_deref(), self.transport_name),
            metrics: self.metrics.clone(),
            span: tracing::Span::current(),
            permit: None,
        };
        let fail = |observer: &mut Observer, status: Status| {
            observer.finish(&status);
            responder::trailers_only(
                encoding,
                subtype.as_deref(),
                &status,
                Some(self.transport_name),
            )
        };

        let head = CallHead {
            path,
            subtype: accepted.subtype,
            metadata,
            timeout: None,
        };
        let policy = self
            .profiles
            .select(head.service(), head.method(), job.as_deref());
        let client = parts.extensions.get::<PeerAddr>().map(|peer| peer.0.ip());
        let degrade = match self.admission.admit(policy.degradable, client) {
            Admitted::Yes { permit, degrade } => {
                observer.permit = Some(permit);
                degrade
            }
            Admitted::No(status) => return fail(&mut observer, status),
        };
        let deadline = Deadline::compute(
            arrival,
            accepted.timeout,
            policy.max_duration,
            &DeadlineOffset::default(),
        );
        let activity = RequestActivity::new(arrival);
        let mut clocks = CallClocks {
            deadline,
            stream: StreamClocks::new(arrival, policy.first_message, policy.idle),
            activity: activity.clone(),
            profile: policy.name.clone(),
        };

        let abort = CallAbort::default();
        let messages = RequestMessages::new(
            body,
            accepted.protocol == Protocol::GrpcWebText,
            self.max_message_size,
            abort.clone(),
            self.metrics.request_counters(self.transport_name),
            activity,
        );
        let waiting = self.admission.waiting();
        let reply = self.upstream.call(
            head,
            Box::pin(messages),
            &policy,
            deadline.map(|d| d.at),
            job.as_deref(),
            abort.clone(),
        );
        tokio::pin!(reply);
        let reply = loop {
            let wake = clocks.next_wake();
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(TokioInstant::from_std(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                reply = &mut reply => break reply,
                () = abort.token().cancelled() => {
                    return fail(&mut observer, abort.status_or_cancelled());
                }
                () = sleep => {
                    let when = "before the upstream answered";
                    if let Some(status) = clocks.expired(Instant::now(), &self.metrics, when) {
                        return fail(&mut observer, status);
                    }
                }
                () = self.shutdown.cancelled() => return fail(&mut observer, shutdown_status()),
            }
        };
        drop(waiting);
        match reply {
            Err(err) => {
                tracing::debug!(error = %err, blame = ?err.blame, "call failed before a reply");
                // Bad request input resets the upstream stream, and the transport reports that
                // reset (often in the same wake-up as the abort, so `select!` may pick either):
                // the client must see what was wrong with its request, not the reset.
                fail(&mut observer, abort.status().unwrap_or(*err.status))
            }
            Ok(Reply::TrailersOnly(status)) => fail(&mut observer, status),
            Ok(Reply::Stream { head, items }) => {
                let subtype = head.subtype.as_deref().or(subtype.as_deref());
                let mut response = Response::new(ReplyBody::streaming(
                    encoding,
                    items,
                    Clocks {
                        call: clocks,
                        abort,
                        shutdown: self.shutdown.clone(),
                        degrade,
                    },
                    observer,
                ));
                let headers = response.headers_mut();
                *headers = head.metadata;
                headers.extend(base_headers(encoding, subtype));
                headers.insert(
                    "x-pnp-transport",
                    HeaderValue::from_static(self.transport_name),
                );
                response
            }
        }
    }
}

/// Decide whether and how to serve a request, or refuse it.
/// Refusals are boxed: a response is large and refusals are the rare path.
fn accept(parts: &mut http::request::Parts) -> Result<Accepted, Box<Response<ReplyBody>>> {
    if let Some(query) = parts.uri.query() {
        if let Err(reason) = apply_http_headers_param(query, &mut parts.headers) {
            return Err(Box::new(responder::refuse(
                StatusCode::BAD_REQUEST,
                &Status::new(
                    Code::Internal,
                    format!("pnp: bad $httpHeaders parameter: {reason}"),
                ),
            )));
        }
    }
    if parts.method != Method::POST {
        return Err(Box::new(responder::refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            &Status::new(
                Code::Unimplemented,
                format!(
                    "pnp: method {} not allowed; gRPC calls are POST",
                    parts.method
                ),
            ),
        )));
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some((protocol, subtype)) = content_type::parse(content_type) else {
        return Err(unsupported(format!(
            "pnp: unsupported content-type `{}`; expected application/grpc-web, application/grpc-web-text or application/grpc",
            content_type.chars().take(80).collect::<String>()
        )));
    };
    let subtype = subtype.map(str::to_owned);
    let accept_header = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let encoding = match protocol {
        Protocol::Grpc if parts.version != Version::HTTP_2 => {
            return Err(unsupported(
                "pnp: native gRPC needs HTTP/2 (it ends with HTTP trailers); over HTTP/1.1 use application/grpc-web".to_owned(),
            ))
        }
        Protocol::Grpc => Encoding::Grpc,
        // Answer in text when the client asks for it, in whatever form the Accept list takes;
        // a text request is answered in text unless binary is asked for explicitly.
        _ if content_type::accepts_text(accept_header) => Encoding::WebText,
        Protocol::GrpcWebText if !content_type::accepts_binary_web(accept_header) => {
            Encoding::WebText
        }
        _ => Encoding::WebBinary,
    };
    let timeout = match parts.headers.get("grpc-timeout") {
        None => None,
        Some(value) => match pnp_wire::timeout::parse(value.as_bytes()) {
            Ok(timeout) => Some(timeout),
            Err(e) => {
                return Err(Box::new(responder::trailers_only(
                    encoding,
                    subtype.as_deref(),
                    &Status::new(
                        Code::Internal,
                        format!("pnp: malformed grpc-timeout {value:?}: {e}"),
                    ),
                    None,
                )))
            }
        },
    };
    Ok(Accepted {
        protocol,
        encoding,
        subtype,
        timeout,
    })
}

fn unsupported(message: String) -> Box<Response<ReplyBody>> {
    Box::new(responder::refuse(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        &Status::new(Code::Unknown, message),
    ))
}

/// grpc-web's `$httpHeaders` query parameter: a percent-encoded header block
/// (`name:value\r\n…`) that stands in for request headers so simple CORS requests need no
/// preflight. Its entries override the request's own headers (the browser sends `text/plain`
/// as the content type in that mode).
fn apply_http_headers_param(query: &str, headers: &mut HeaderMap) -> Result<(), String> {
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
        if key != "$httpHeaders" {
            continue;
        }
        let block: Vec<u8> = percent_encoding::percent_decode_str(value).collect();
        let parsed = pnp_wire::trailers::decode_block(&block).map_err(|e| e.to_string())?;
        for (name, value) in &parsed {
            headers.insert(name.clone(), value.clone());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_headers_param_overrides_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let block = "content-type:application/grpc-web-text\r\nx-grpc-web:1\r\nx-user: a b\r\n";
        let encoded: String =
            percent_encoding::utf8_percent_encode(block, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        apply_http_headers_param(&format!("a=1&$httpHeaders={encoded}"), &mut headers)
            .expect("valid parameter");
        assert_eq!(headers[header::CONTENT_TYPE], "application/grpc-web-text");
        assert_eq!(headers["x-user"], "a b");
        assert_eq!(headers["x-grpc-web"], "1");
    }

    #[test]
    fn other_query_parameters_are_ignored() {
        let mut headers = HeaderMap::new();
        apply_http_headers_param("x=%ZZ&y", &mut headers).expect("ignored");
        assert!(headers.is_empty());
    }
}
