//! The ingress adapter: gRPC-Web (binary and text, over HTTP/1.1, HTTP/2 or HTTP/3) and native
//! gRPC (HTTP/2 or HTTP/3) in, the call model out.
//!
//! PROTOCOL-WEB.md: the request is a gRPC request with a different content type; the response
//! carries the trailers as a final 0x80 frame in the body. `application/grpc-web-text` bodies are
//! base64 in both directions. Browsers that avoid CORS preflight put headers in the
//! `$httpHeaders` query parameter instead; pnp honours it only from allowed origins, never for
//! headers a script could not send itself or that pnp and the proxies before it own.
//!
//! What a client says about itself is believed only as far as the `[edge]` config says: its
//! `x-pnp-job` picks a route but is no label and is not forwarded unless trusted, and its
//! address is appended to `x-forwarded-for`.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use pnp_call::{CallHead, Code, Reply, Status};
use pnp_config::{AllowedOrigins, Cors, Edge};
use pnp_policy::deadline::{Deadline, DeadlineOffset};
use pnp_policy::idle::StreamClocks;
use pnp_telemetry::{request_id, Metrics};
use pnp_transport::{strip_request_headers, Blame};
use pnp_wire::content_type::{self, Protocol};
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::abort::CallAbort;
use crate::admission::{Admission, Admitted};
use crate::body::RequestBody;
use crate::budget::BufferBudget;
use crate::conn::{ClientReset, PeerAddr};
use crate::control::{JobBook, Live};
use crate::negotiation::Negotiator;
use crate::reply::{
    base_headers, shutdown_status, CallClocks, Clocks, Encoding, Observer, ReplyBody,
};
use crate::request::{self, RequestActivity, RequestMessages};
use crate::resilience::GuardedUpstream;
use crate::responder;
use crate::site;

/// The header that names the job a call belongs to (see job profiles in DESIGN.md).
pub const JOB_HEADER: &str = "x-pnp-job";

/// The header that lists the clients and proxies a request passed through.
const FORWARDED_FOR: &str = "x-forwarded-for";

/// The egress side as the ingress sees it: any transport.
pub type Transport = pnp_transport::SharedTransport;

/// The ingress service: one per listener, cloned per connection.
#[derive(Clone)]
pub struct Ingress {
    inner: Arc<Inner>,
}

/// Everything the ingress needs to serve calls.
pub(crate) struct Inner {
    pub(crate) upstream: GuardedUpstream,
    pub(crate) negotiator: Arc<Negotiator>,
    /// Profiles, routes and the message limit in force; a call takes a snapshot at its start.
    pub(crate) live: RwLock<Arc<Live>>,
    /// Every job's mode, counters and calls in flight.
    pub(crate) jobs: Arc<JobBook>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) metrics: Metrics,
    pub(crate) admission: Arc<Admission>,
    /// The global buffer budget (`limits.buffer_budget`), for whatever a call buffers.
    pub(crate) budget: BufferBudget,
    pub(crate) edge: EdgeRules,
}

/// What the ingress believes of a client's request (`cors` and `edge` config).
#[derive(Debug)]
pub(crate) struct EdgeRules {
    origins: AllowedOrigins,
    http_headers_param: bool,
    trust_job_header: bool,
    forwarded_for: bool,
}

/// The job a call names in `x-pnp-job`, and how far it is believed.
#[derive(Debug, PartialEq, Eq)]
struct CallJob {
    /// What the client sent; matched by routes that name a job.
    route: Option<String>,
    /// The job as a label and as metadata upstream: only from a trusted header.
    trusted: Option<String>,
}

impl EdgeRules {
    pub(crate) fn new(cors: &Cors, edge: &Edge) -> Self {
        Self {
            origins: cors.allowed_origins.clone(),
            http_headers_param: cors.http_headers_param,
            trust_job_header: edge.trust_job_header,
            forwarded_for: edge.forwarded_for,
        }
    }

    /// Whether a `$httpHeaders` parameter of a request with these headers may be honoured;
    /// why not otherwise.
    fn http_headers_param(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        if !self.http_headers_param {
            return Err("it is turned off (cors.http_headers_param)");
        }
        match &self.origins {
            AllowedOrigins::Any => Ok(()),
            AllowedOrigins::List(list) => match headers.get(header::ORIGIN) {
                Some(origin) if list.iter().any(|o| o.as_bytes() == origin.as_bytes()) => Ok(()),
                Some(_) => Err("the request's Origin is not in cors.allowed_origins"),
                None => Err("the request has no Origin and cors.allowed_origins is a list"),
            },
        }
    }

    /// The span's `job` field: the client's `x-pnp-job` when it is trusted.
    fn span_job<'h>(&self, headers: &'h HeaderMap) -> &'h str {
        match headers.get(JOB_HEADER) {
            Some(job) if self.trust_job_header => job.to_str().unwrap_or(""),
            _ => "",
        }
    }

    /// Reads the call's job from its metadata; an untrusted `x-pnp-job` leaves the metadata.
    fn take_job(&self, metadata: &mut HeaderMap) -> CallJob {
        let route = metadata
            .get(JOB_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if self.trust_job_header {
            return CallJob {
                trusted: route.clone(),
                route,
            };
        }
        metadata.remove(JOB_HEADER);
        CallJob {
            route,
            trusted: None,
        }
    }

    /// Appends the client's address to the `x-forwarded-for` going upstream, when configured.
    fn forward_for(&self, metadata: &mut HeaderMap, peer: Option<&PeerAddr>) {
        if let (true, Some(PeerAddr(peer))) = (self.forwarded_for, peer) {
            append_forwarded_for(metadata, peer.ip());
        }
    }
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("negotiator", &self.inner.negotiator)
            .finish()
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("negotiator", &self.negotiator)
            .finish_non_exhaustive()
    }
}

impl Ingress {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }
}

impl tower::Service<Request<RequestBody>> for Ingress {
    type Response = Response<ReplyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ReplyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> Self::Future {
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
            job = inner.edge.span_job(request.headers()),
            transport = tracing::field::Empty,
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
    /// The live config of the moment.
    pub(crate) fn live(&self) -> Arc<Live> {
        self.live
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    async fn handle(&self, request: Request<RequestBody>) -> Response<ReplyBody> {
        let arrival = Instant::now();
        let (mut parts, body) = request.into_parts();
        // Every early answer below leaves the body unread; an HTTP/1.1 client still sending it
        // must get to read that answer (not EPIPE), so the body is drained, not dropped.
        let mut body = Unread(Some(body));
        let client_reset = parts.extensions.remove::<ClientReset>();
        let peer = parts.extensions.get::<PeerAddr>().copied();
        if let Some(page) = site::serve(&parts) {
            return page;
        }
        let accepted = match accept(&mut parts, &self.edge) {
            Ok(accepted) => accepted,
            Err(refusal) => return *refusal,
        };
        let encoding = accepted.encoding;
        let subtype = accepted.subtype.clone();

        let mut metadata = parts.headers;
        let size_hint = size_hint(&mut metadata);
        strip_request_headers(&mut metadata);
        let job = self.edge.take_job(&mut metadata);
        self.edge.forward_for(&mut metadata, peer.as_ref());
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
        // What governs this call to its end, even if a new config is applied meanwhile.
        let live = self.live();
        let mut head = CallHead {
            path,
            subtype: accepted.subtype,
            metadata,
            timeout: None,
            max_message_size: live.max_message_size,
        };
        let policy = live
            .profiles
            .select(head.service(), head.method(), job.route.as_deref());
        drop(live);
        if let Some(limit) = policy.max_message_size {
            head.max_message_size = limit;
        }
        // The transport the profile's rules prefer; a fallback may still carry the call.
        let plan = self.negotiator.plan(&policy.name, size_hint);
        let mut carrier = Carrier {
            name: plan.first_name(&self.negotiator),
            fallback: false,
        };
        let span = tracing::Span::current();
        span.record("transport", carrier.name);
        let mut observer = Observer {
            recorder: self
                .metrics
                .call(head.path.path(), job.trusted.as_deref(), carrier.name),
            metrics: self.metrics.clone(),
            span,
            permit: None,
            transport_reason: "default",
            job: None,
        };
        let abort = CallAbort::default();
        let job_entry = self.jobs.entry(&policy.name);
        let fail = |observer: &mut Observer, status: Status, carrier: Carrier| {
            observer.finish(&status);
            // Whatever still runs for this call (the request pipe to the upstream) stops now.
            abort.abort(status.clone());
            let mut response =
                responder::trailers_only(encoding, subtype.as_deref(), &status, Some(carrier.name));
            carrier.mark(response.headers_mut());
            response
        };

        // A paused or frozen job takes no new calls.
        if let Some(status) = job_entry.refusal() {
            return fail(&mut observer, status, carrier);
        }
        observer.job = Some(job_entry.start(head.path.path(), abort.clone()));
        let client = peer.map(|PeerAddr(addr)| addr.ip());
        let degrade = match self.admission.admit(policy.degradable, client) {
            Admitted::Yes { permit, degrade } => {
                observer.permit = Some(permit);
                degrade
            }
            Admitted::No(status) => return fail(&mut observer, status, carrier),
        };
        let deadline = Deadline::compute(
            arrival,
            accepted.timeout,
            policy.max_duration,
            &DeadlineOffset::default(),
        );
        let activity = RequestActivity::new(arrival);
        let (first_message, idle) = policy.stream_clocks(accepted.timeout);
        let mut clocks = CallClocks {
            deadline,
            stream: StreamClocks::new(arrival, first_message, idle),
            activity: activity.clone(),
            profile: policy.name.clone(),
        };

        let waiting = self.admission.waiting();
        // A transport that is not ready within the profile's budget is skipped, the request
        // still unread; the call's clocks run meanwhile.
        let picked = match self
            .under_clocks(
                self.negotiator.pick(plan),
                &mut clocks,
                &abort,
                "while choosing a transport",
            )
            .await
        {
            Ok(Ok(picked)) => picked,
            Ok(Err(status)) | Err(status) => return fail(&mut observer, status, carrier),
        };
        carrier = Carrier {
            name: picked.name,
            fallback: picked.fallback,
        };
        observer.span.record("transport", carrier.name);
        observer.recorder.set_transport(carrier.name);
        observer.transport_reason = picked.reason.as_str();
        if let Some(job) = &mut observer.job {
            job.transport = carrier.name;
        }

        let messages = RequestMessages::new(
            body.0.take().unwrap_or(RequestBody::Empty),
            accepted.protocol == Protocol::GrpcWebText,
            head.max_message_size,
            abort.clone(),
            self.metrics.request_counters(carrier.name),
            activity,
            &self.budget,
        );
        let messages = Box::pin(Carried::new(messages, picked.bytes.clone()));
        let reply = self.upstream.call(
            &picked.transport,
            head,
            messages,
            &policy,
            deadline.map(|d| d.at),
            job.trusted.as_deref(),
            &job_entry.retries,
            abort.clone(),
        );
        let reply = self
            .under_clocks(reply, &mut clocks, &abort, "before the upstream answered")
            .await;
        drop(waiting);
        let reply = match reply {
            Ok(reply) => reply,
            Err(status) => return fail(&mut observer, status, carrier),
        };
        // Whether the transport carried the call feeds the job's failure streak; what the
        // upstream answered (any status) does not.
        let transport_failed =
            matches!(&reply, Err(e) if e.blame == Blame::Upstream) && abort.status().is_none();
        self.negotiator.record(&picked, !transport_failed);
        match reply {
            Err(err) => {
                tracing::debug!(error = %err, blame = ?err.blame, "call failed before a reply");
                // Bad request input resets the upstream stream, and the transport reports that
                // reset (often in the same wake-up as the abort, so `select!` may pick either):
                // the client must see what was wrong with its request, not the reset.
                fail(
                    &mut observer,
                    abort.status().unwrap_or(*err.status),
                    carrier,
                )
            }
            Ok(Reply::TrailersOnly(status)) => fail(&mut observer, status, carrier),
            Ok(Reply::Stream { head, items }) => {
                let subtype = head.subtype.as_deref().or(subtype.as_deref());
                let items = Box::pin(Carried::new(items, picked.bytes));
                let mut response = Response::new(ReplyBody::streaming(
                    encoding,
                    items,
                    Clocks {
                        call: clocks,
                        abort,
                        shutdown: self.shutdown.clone(),
                        degrade,
                        client_reset,
                        budget: self.budget.clone(),
                    },
                    observer,
                ));
                let headers = response.headers_mut();
                *headers = head.metadata;
                headers.extend(base_headers(encoding, subtype));
                headers.insert("x-pnp-transport", HeaderValue::from_static(carrier.name));
                carrier.mark(headers);
                response
            }
        }
    }

    /// Wait for `work` while the call's clocks run: the call ends with the clock's status if one
    /// expires first, or when the client's side fails or pnp shuts down.
    async fn under_clocks<T>(
        &self,
        work: impl Future<Output = T>,
        clocks: &mut CallClocks,
        abort: &CallAbort,
        when: &'static str,
    ) -> Result<T, Status> {
        tokio::pin!(work);
        loop {
            let wake = clocks.next_wake();
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(TokioInstant::from_std(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                out = &mut work => return Ok(out),
                () = abort.token().cancelled() => return Err(abort.status_or_cancelled()),
                () = sleep => {
                    if let Some(status) = clocks.expired(Instant::now(), &self.metrics, when) {
                        return Err(status);
                    }
                }
                () = self.shutdown.cancelled() => return Err(shutdown_status()),
            }
        }
    }
}

/// The header a reply carries when a fallback transport carried its call.
pub const FALLBACK_HEADER: &str = "x-grpc-web-fallback";

/// The header a client sets to tell negotiation how many bytes its call will carry.
pub const SIZE_HINT_HEADER: &str = "x-pnp-size-hint";

/// The transport that carried (or was to carry) a call, as its reply shows it.
#[derive(Clone, Copy, Debug)]
struct Carrier {
    name: &'static str,
    fallback: bool,
}

impl Carrier {
    /// `x-grpc-web-fallback: true` when a fallback carried the call.
    fn mark(self, headers: &mut HeaderMap) {
        if self.fallback {
            headers.insert(FALLBACK_HEADER, HeaderValue::from_static("true"));
        }
    }
}

/// The call's size hint: `x-pnp-size-hint` (taken out of the metadata: it is pnp's), else the
/// request's `content-length`.
fn size_hint(metadata: &mut HeaderMap) -> Option<u64> {
    let parse = |value: &HeaderValue| value.to_str().ok()?.trim().parse::<u64>().ok();
    let hinted = metadata.remove(SIZE_HINT_HEADER);
    hinted
        .as_ref()
        .and_then(parse)
        .or_else(|| metadata.get(header::CONTENT_LENGTH).and_then(parse))
}

/// A stream of a call's messages (either direction) whose payload bytes are added to the job's
/// throughput counter as they pass: one relaxed atomic add per message or fragment.
struct Carried<S> {
    inner: S,
    bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl<S> Carried<S> {
    fn new(inner: S, bytes: Arc<std::sync::atomic::AtomicU64>) -> Self {
        Self { inner, bytes }
    }
}

impl<S: futures_core::Stream + Unpin> futures_core::Stream for Carried<S>
where
    S::Item: CarriedBytes,
{
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let item = std::task::ready!(Pin::new(&mut self.inner).poll_next(cx));
        if let Some(item) = &item {
            let n = item.carried_bytes();
            if n > 0 {
                self.bytes
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Poll::Ready(item)
    }
}

/// Payload bytes in one item of a call's message stream.
trait CarriedBytes {
    fn carried_bytes(&self) -> usize;
}

impl CarriedBytes for Result<pnp_call::Part, Status> {
    fn carried_bytes(&self) -> usize {
        self.as_ref().map_or(0, pnp_call::Part::payload_len)
    }
}

impl CarriedBytes for pnp_call::ReplyItem {
    fn carried_bytes(&self) -> usize {
        match self {
            pnp_call::ReplyItem::Message(m) => m.data.len(),
            pnp_call::ReplyItem::Fragment { data, .. } => data.len(),
            _ => 0,
        }
    }
}

/// A request body not handed to the call (yet); discarded properly if the call ends first.
struct Unread(Option<RequestBody>);

impl Drop for Unread {
    fn drop(&mut self) {
        if let Some(body) = self.0.take() {
            request::discard(body);
        }
    }
}

/// Decide whether and how to serve a request, or refuse it.
/// Refusals are boxed: a response is large and refusals are the rare path.
fn accept(
    parts: &mut http::request::Parts,
    edge: &EdgeRules,
) -> Result<Accepted, Box<Response<ReplyBody>>> {
    // Why a `$httpHeaders` parameter was not honoured, for the refusal of its request.
    let mut ignored_param = None;
    if let Some(query) = parts.uri.query().filter(|q| has_http_headers_param(q)) {
        match edge.http_headers_param(&parts.headers) {
            Ok(()) => {
                if let Err(reason) = apply_http_headers_param(query, &mut parts.headers) {
                    return Err(Box::new(responder::refuse(
                        StatusCode::BAD_REQUEST,
                        &Status::new(
                            Code::Internal,
                            format!("pnp: bad $httpHeaders parameter: {reason}"),
                        ),
                    )));
                }
                read_simple_body_as_text(&mut parts.headers);
            }
            Err(reason) => {
                tracing::debug!(reason, "$httpHeaders parameter ignored");
                ignored_param = Some(reason);
            }
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
        let ignored = ignored_param
            .map(|reason| format!(" (its $httpHeaders parameter was ignored: {reason})"))
            .unwrap_or_default();
        return Err(unsupported(format!(
            "pnp: unsupported content-type `{}`; expected application/grpc-web, application/grpc-web-text or application/grpc{ignored}",
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
        // HTTP/3 carries trailers like HTTP/2 does.
        Protocol::Grpc if parts.version != Version::HTTP_2 && parts.version != Version::HTTP_3 => {
            return Err(unsupported(
                "pnp: native gRPC needs HTTP/2 or HTTP/3 (it ends with HTTP trailers); over HTTP/1.1 use application/grpc-web".to_owned(),
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

/// The query parameters of a request: (decoded name, raw value).
pub(crate) fn query_params(query: &str) -> impl Iterator<Item = (std::borrow::Cow<'_, str>, &str)> {
    query.split('&').map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (
            percent_encoding::percent_decode_str(key).decode_utf8_lossy(),
            value,
        )
    })
}

const HTTP_HEADERS_PARAM: &str = "$httpHeaders";

fn has_http_headers_param(query: &str) -> bool {
    query_params(query).any(|(key, _)| key == HTTP_HEADERS_PARAM)
}

/// grpc-web's `$httpHeaders` query parameter: a percent-encoded header block
/// (`name:value\r\n…`) that stands in for request headers so simple CORS requests need no
/// preflight. Its entries override the request's own headers, except those it may never set
/// ([`settable_by_param`]); those are dropped. The caller decides whether the parameter is
/// honoured at all.
fn apply_http_headers_param(query: &str, headers: &mut HeaderMap) -> Result<(), String> {
    for (key, value) in query_params(query) {
        if key != HTTP_HEADERS_PARAM {
            continue;
        }
        let block: Vec<u8> = percent_encoding::percent_decode_str(value).collect();
        let parsed = pnp_wire::trailers::decode_block(&block).map_err(|e| e.to_string())?;
        for (name, value) in &parsed {
            if settable_by_param(name) {
                headers.insert(name.clone(), value.clone());
            } else {
                tracing::debug!(header = %name, "$httpHeaders entry dropped: not settable this way");
            }
        }
    }
    Ok(())
}

/// Whether a `$httpHeaders` entry may set this header. Never: the content type (the body's
/// form is what the request itself says, see [`read_simple_body_as_text`]), framing and
/// hop-by-hop headers, what proxies before pnp say about the client, pnp's own control
/// headers, and what browsers set themselves (a script could not send those as real headers
/// either).
fn settable_by_param(name: &HeaderName) -> bool {
    const NEVER: &[&str] = &[
        "content-type",
        "content-length",
        "host",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "forwarded",
        "x-real-ip",
        "via",
        "origin",
        "referer",
        "cookie",
        "expect",
    ];
    const NEVER_PREFIX: &[&str] = &[
        "proxy-",
        "x-forwarded-",
        "x-pnp-",
        "sec-",
        "access-control-request-",
    ];
    let name = name.as_str();
    !NEVER.contains(&name) && !NEVER_PREFIX.iter().any(|prefix| name.starts_with(prefix))
}

/// A request that needs no CORS preflight can only carry a `text/plain` body (or one without
/// a content type), and grpc-web sends its body base64-encoded then: with an honoured
/// `$httpHeaders`, such a request is `application/grpc-web-text`.
fn read_simple_body_as_text(headers: &mut HeaderMap) {
    let simple = match headers.get(header::CONTENT_TYPE) {
        None => true,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("text/plain")),
    };
    if simple {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc-web-text"),
        );
    }
}

/// `x-forwarded-for` with `client` appended to what earlier proxies wrote (one line, however
/// many the request had).
fn append_forwarded_for(metadata: &mut HeaderMap, client: IpAddr) {
    let client = client.to_canonical().to_string();
    let mut value = Vec::new();
    for earlier in metadata.get_all(FORWARDED_FOR) {
        let earlier = earlier.as_bytes().trim_ascii();
        if !earlier.is_empty() {
            value.extend_from_slice(earlier);
            value.extend_from_slice(b", ");
        }
    }
    value.extend_from_slice(client.as_bytes());
    match HeaderValue::from_bytes(&value) {
        Ok(value) => {
            metadata.insert(FORWARDED_FOR, value);
        }
        Err(_) => tracing::debug!("x-forwarded-for left as it was: not a header value"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(block: &str) -> String {
        let encoded =
            percent_encoding::utf8_percent_encode(block, percent_encoding::NON_ALPHANUMERIC);
        format!("a=1&$httpHeaders={encoded}")
    }

    fn rules(origins: AllowedOrigins, http_headers_param: bool, trust_job: bool) -> EdgeRules {
        EdgeRules {
            origins,
            http_headers_param,
            trust_job_header: trust_job,
            forwarded_for: true,
        }
    }

    #[test]
    fn http_headers_param_overrides_headers_but_not_the_content_type() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert("x-user", HeaderValue::from_static("mine"));
        let block = "content-type:application/grpc-web+proto\r\nx-grpc-web:1\r\nx-user: a b\r\n";
        apply_http_headers_param(&param(block), &mut headers).expect("valid parameter");
        assert_eq!(headers[header::CONTENT_TYPE], "text/plain");
        assert_eq!(headers["x-user"], "a b");
        assert_eq!(headers["x-grpc-web"], "1");
        read_simple_body_as_text(&mut headers);
        assert_eq!(headers[header::CONTENT_TYPE], "application/grpc-web-text");
    }

    #[test]
    fn http_headers_param_cannot_set_what_it_must_not() {
        let forbidden = [
            "content-type",
            "content-length",
            "host",
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "forwarded",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-real-ip",
            "x-pnp-job",
            "x-pnp-anything",
            "origin",
            "cookie",
            "sec-fetch-site",
        ];
        let block: String = forbidden.iter().map(|n| format!("{n}:1\r\n")).collect();
        let block =
            format!("{block}x-request-id:abc\r\ngrpc-timeout:5S\r\nauthorization:Bearer t\r\n");
        let mut headers = HeaderMap::new();
        apply_http_headers_param(&param(&block), &mut headers).expect("valid parameter");
        for name in forbidden {
            assert!(!headers.contains_key(name), "{name} was set: {headers:?}");
        }
        assert_eq!(headers["x-request-id"], "abc");
        assert_eq!(headers["grpc-timeout"], "5S");
        assert_eq!(headers["authorization"], "Bearer t");
    }

    #[test]
    fn only_simple_bodies_are_read_as_text() {
        for (given, read) in [
            (None, "application/grpc-web-text"),
            (Some("text/plain"), "application/grpc-web-text"),
            (
                Some("Text/Plain; charset=UTF-8"),
                "application/grpc-web-text",
            ),
            (
                Some("application/grpc-web+proto"),
                "application/grpc-web+proto",
            ),
            (Some("text/plainer"), "text/plainer"),
        ] {
            let mut headers = HeaderMap::new();
            if let Some(given) = given {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(given));
            }
            read_simple_body_as_text(&mut headers);
            assert_eq!(headers[header::CONTENT_TYPE], read, "{given:?}");
        }
    }

    #[test]
    fn http_headers_param_is_honoured_from_allowed_origins_only() {
        let with_origin = |origin: Option<&'static str>| {
            let mut headers = HeaderMap::new();
            if let Some(origin) = origin {
                headers.insert(header::ORIGIN, HeaderValue::from_static(origin));
            }
            headers
        };
        let any = rules(AllowedOrigins::Any, true, false);
        assert!(any.http_headers_param(&with_origin(None)).is_ok());
        assert!(any
            .http_headers_param(&with_origin(Some("https://x.example")))
            .is_ok());
        let list = rules(
            AllowedOrigins::List(vec!["https://app.example".into()]),
            true,
            false,
        );
        assert!(list
            .http_headers_param(&with_origin(Some("https://app.example")))
            .is_ok());
        assert!(list
            .http_headers_param(&with_origin(Some("https://x.example")))
            .is_err());
        assert!(list.http_headers_param(&with_origin(None)).is_err());
        let off = rules(AllowedOrigins::Any, false, false);
        assert!(off.http_headers_param(&with_origin(None)).is_err());
    }

    #[test]
    fn other_query_parameters_are_ignored() {
        let mut headers = HeaderMap::new();
        apply_http_headers_param("x=%ZZ&y", &mut headers).expect("ignored");
        assert!(headers.is_empty());
        assert!(!has_http_headers_param("x=%ZZ&y&httpHeaders=1"));
        assert!(has_http_headers_param("x=1&%24httpHeaders=a%3A1"));
    }

    #[test]
    fn an_untrusted_job_routes_but_is_neither_label_nor_metadata() {
        let mut metadata = HeaderMap::new();
        metadata.insert(JOB_HEADER, HeaderValue::from_static("batch"));
        let untrusted = rules(AllowedOrigins::Any, true, false);
        assert_eq!(untrusted.span_job(&metadata), "");
        assert_eq!(
            untrusted.take_job(&mut metadata.clone()),
            CallJob {
                route: Some("batch".into()),
                trusted: None
            }
        );
        let mut taken = metadata.clone();
        untrusted.take_job(&mut taken);
        assert!(!taken.contains_key(JOB_HEADER));

        let trusted = rules(AllowedOrigins::Any, true, true);
        assert_eq!(trusted.span_job(&metadata), "batch");
        let mut kept = metadata.clone();
        assert_eq!(
            trusted.take_job(&mut kept),
            CallJob {
                route: Some("batch".into()),
                trusted: Some("batch".into())
            }
        );
        assert_eq!(kept[JOB_HEADER], "batch");
    }

    #[test]
    fn the_client_is_appended_to_x_forwarded_for() {
        let v4: IpAddr = "127.0.0.1".parse().expect("ip");
        let mut metadata = HeaderMap::new();
        append_forwarded_for(&mut metadata, v4);
        assert_eq!(metadata[FORWARDED_FOR], "127.0.0.1");

        let mut metadata = HeaderMap::new();
        metadata.append(FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        metadata.append(
            FORWARDED_FOR,
            HeaderValue::from_static(" 10.0.0.1, 10.0.0.2 "),
        );
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("ip");
        append_forwarded_for(&mut metadata, mapped);
        assert_eq!(
            metadata.get_all(FORWARDED_FOR).iter().collect::<Vec<_>>(),
            ["203.0.113.7, 10.0.0.1, 10.0.0.2, 192.0.2.1"]
        );

        let mut metadata = HeaderMap::new();
        let off = EdgeRules {
            forwarded_for: false,
            ..rules(AllowedOrigins::Any, true, false)
        };
        let peer = PeerAddr("[::1]:5000".parse().expect("addr"));
        off.forward_for(&mut metadata, Some(&peer));
        assert!(metadata.is_empty());
        rules(AllowedOrigins::Any, true, false).forward_for(&mut metadata, Some(&peer));
        assert_eq!(metadata[FORWARDED_FOR], "::1");
    }
}
