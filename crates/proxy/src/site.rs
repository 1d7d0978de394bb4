//! Plain web pages served beside the gRPC endpoints (the demo page). Only `GET`/`HEAD` requests
//! for paths listed here are answered; everything else goes on to the gRPC ingress.

use http::request::Parts;
use http::Response;

use crate::reply::ReplyBody;

/// A page for this request, if it asks for one.
pub(crate) fn serve(parts: &Parts) -> Option<Response<ReplyBody>> {
    if parts.method != http::Method::GET && parts.method != http::Method::HEAD {
        return None;
    }
    let _ = parts.uri.path();
    None
}
