//! CORS as the grpc-web browser-features doc asks: preflight answered, POST and OPTIONS allowed,
//! requested headers echoed, gRPC status headers exposed. tower-http does the work, and because
//! it wraps the ingress, errors pnp makes itself carry CORS headers too.
//!
//! Which origins, and with what: without a configured list any origin may call, but without
//! credentials (no `access-control-allow-credentials`: a script on another origin cannot make
//! a call with cookies or HTTP auth and read its reply); a list lets only its origins call,
//! and with credentials.

use http::{HeaderName, Method};
use pnp_config::{AllowedOrigins, Cors};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

/// Response headers every browser client needs to read.
const ALWAYS_EXPOSED: &[&str] = &[
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "x-pnp-transport",
    "x-grpc-web-fallback",
    "x-request-id",
];

pub(crate) fn layer(config: &Cors) -> CorsLayer {
    let (origin, credentials) = match &config.allowed_origins {
        // The request's origin mirrored back (with `Vary: origin`), as for a list. Without
        // `access-control-allow-credentials` a browser sends no credentialed call that needs a
        // preflight, and hides the reply to any other one from the script.
        AllowedOrigins::Any => (AllowOrigin::mirror_request(), false),
        AllowedOrigins::List(list) => (
            AllowOrigin::list(
                list.iter()
                    .filter_map(|origin| origin.parse().ok())
                    .collect::<Vec<_>>(),
            ),
            true,
        ),
    };
    let exposed: Vec<HeaderName> = ALWAYS_EXPOSED
        .iter()
        .copied()
        .map(HeaderName::from_static)
        .chain(
            config
                .expose_headers
                .iter()
                .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok()),
        )
        .collect();
    CorsLayer::new()
        .allow_origin(origin)
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers(AllowHeaders::mirror_request())
        .allow_credentials(credentials)
        .expose_headers(exposed)
        .max_age(config.max_age)
}
