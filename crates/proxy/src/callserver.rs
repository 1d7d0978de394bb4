//! Calls that arrive already decoded (a peer pnp's calls over UCX) served through the same
//! service as HTTP requests: the call becomes a native gRPC request (its parts as gRPC frames,
//! its metadata and time left as headers, the peer's address as the connection's), so CORS,
//! the ingress, profiles, admission, clocks, negotiation, retries, metrics and the reply driver
//! all apply as to any other call; the response is decoded back into the call model's
//! [`Reply`] (`pnp_transport::reply_from_response`). Nothing is buffered beyond what the
//! reply driver holds for any call.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::header::{HeaderValue, CONTENT_TYPE, TE};
use http::{Request, Response};
use pnp_call::{Call, Code, Reply, Status};

use crate::body::{PartFrames, RequestBody};
use crate::conn::PeerAddr;
use crate::reply::ReplyBody;

/// The data plane's whole HTTP service (CORS, ingress), as every listener serves it.
pub(crate) type CallService =
    tower::util::BoxCloneSyncService<Request<RequestBody>, Response<ReplyBody>, Infallible>;

/// Serve `call` from `peer` through `service`.
pub(crate) async fn serve_call(mut service: CallService, call: Call, peer: SocketAddr) -> Reply {
    let max = call.head.max_message_size;
    let request = match request(call, peer) {
        Ok(request) => request,
        Err(status) => return Reply::TrailersOnly(*status),
    };
    let response = match tower::ServiceExt::ready(&mut service).await {
        Ok(service) => match tower::Service::call(service, request).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
        Err(never) => match never {},
    };
    pnp_transport::reply_from_response(response, max, ())
}

/// The native gRPC request that carries `call`.
fn request(call: Call, peer: SocketAddr) -> Result<Request<RequestBody>, Box<Status>> {
    let Call { head, messages } = call;
    let invalid = |what: &str| Box::new(Status::new(Code::Internal, format!("pnp: {what}")));
    let mut request = Request::post(head.path.as_str())
        .body(RequestBody::Parts(PartFrames::new(messages)))
        .map_err(|e| invalid(&format!("a call to {} is no request: {e}", head.path)))?;
    *request.version_mut() = http::Version::HTTP_2;
    let headers = request.headers_mut();
    *headers = head.metadata;
    let content_type = match &head.subtype {
        Some(subtype) => HeaderValue::try_from(format!("application/grpc+{subtype}"))
            .map_err(|_| invalid("the call's message subtype is no header value"))?,
        None => HeaderValue::from_static("application/grpc"),
    };
    headers.insert(CONTENT_TYPE, content_type);
    headers.insert(TE, HeaderValue::from_static("trailers"));
    if let Some(left) = head.timeout {
        if let Ok(value) = HeaderValue::try_from(pnp_wire::timeout::encode(left)) {
            headers.insert("grpc-timeout", value);
        }
    }
    request.extensions_mut().insert(PeerAddr(peer));
    Ok(request)
}
