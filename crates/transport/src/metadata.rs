//! Which headers are call metadata and which belong to one HTTP hop.

use http::header::{self, HeaderMap, HeaderName};

/// Headers that describe one HTTP connection or message framing, never call metadata
/// (RFC 9110 §7.6.1 connection options plus the ones gRPC defines per hop).
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::HOST,
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::TRAILER,
    header::PROXY_AUTHORIZATION,
];

/// Remove from request headers everything that is not call metadata: hop-by-hop headers,
/// framing, `grpc-timeout` (carried as a duration), browser-only gRPC-Web and CORS headers.
pub fn strip_request_headers(headers: &mut HeaderMap) {
    strip_common(headers);
    for name in [
        "grpc-timeout",
        "x-grpc-web",
        "accept",
        "accept-encoding",
        "access-control-request-method",
        "access-control-request-headers",
    ] {
        headers.remove(name);
    }
}

/// Remove from response headers what belongs to the upstream hop only (the status headers
/// of a Trailers-Only reply travel separately, and the server writing the response adds its own
/// `date`).
pub fn strip_response_headers(headers: &mut HeaderMap) {
    strip_common(headers);
    for name in [
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "date",
    ] {
        headers.remove(name);
    }
}

fn strip_common(headers: &mut HeaderMap) {
    // Names listed in `Connection` are hop-by-hop too.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_metadata_keeps_custom_headers_only() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/grpc-web+proto"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("te", "trailers"),
            ("grpc-timeout", "1S"),
            ("x-grpc-web", "1"),
            ("x-user", "alice"),
            ("authorization", "Bearer t"),
        ] {
            headers.append(k, v.parse().expect("valid value"));
        }
        strip_request_headers(&mut headers);
        let mut names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["authorization", "x-user"]);
    }
}
