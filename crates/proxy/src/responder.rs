//! Responses pnp makes itself: Trailers-Only gRPC replies and HTTP-level refusals.

use http::{HeaderValue, Response, StatusCode};
use pnp_call::Status;

use crate::reply::{base_headers, Encoding, ReplyBody};

/// A Trailers-Only reply (PROTOCOL-HTTP2.md "Trailers-Only"; PROTOCOL-WEB.md lets gRPC-Web carry
/// it in the headers too): HTTP 200, the status in the headers, no body. CORS headers are added
/// by the layer around the ingress.
pub(crate) fn trailers_only(
    encoding: Encoding,
    subtype: Option<&str>,
    status: &Status,
    transport: Option<&'static str>,
) -> Response<ReplyBody> {
    let mut response = Response::new(ReplyBody::empty());
    let headers = response.headers_mut();
    *headers = base_headers(encoding, subtype);
    if let Some(name) = transport {
        headers.insert("x-pnp-transport", HeaderValue::from_static(name));
    }
    status.write_headers(headers);
    response
}

/// An HTTP-level refusal (405, 415) that still tells gRPC clients what happened.
pub(crate) fn refuse(http_status: StatusCode, status: &Status) -> Response<ReplyBody> {
    let mut response = Response::new(ReplyBody::empty());
    *response.status_mut() = http_status;
    status.write_headers(response.headers_mut());
    if http_status == StatusCode::METHOD_NOT_ALLOWED {
        response.headers_mut().insert(
            http::header::ALLOW,
            HeaderValue::from_static("POST, OPTIONS"),
        );
    }
    response
}
