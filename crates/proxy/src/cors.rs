//! CORS as the grpc-web browser-features doc asks: preflight answered, POST and OPTIONS allowed,
//! requested headers echoed, credentials allowed, gRPC status headers exposed. tower-http does
//! the work, and because it wraps the ingress, errors pnp makes itself carry CORS headers too.

use http::{HeaderName, Method};
use pnp_config::{AllowedOrigins, Cors};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

/// Response headers every browser client needs to read.
const ALWAYS_EXPOSED: &[&str] = &[
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "x-pnp-transport",
    "x-request-id",
];

pub(crate) fn layer(config: &Cors) -> CorsLayer {
    let origin = match &config.allowed_origins {
        // Mirroring (rather than `*`) keeps credentials usable.
        AllowedOrigins::Any => AllowOrigin::mirror_request(),
        AllowedOrigins::List(list) => AllowOrigin::list(
            list.iter()
                .filter_map(|origin| origin.parse().ok())
                .collect::<Vec<_>>(),
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
        .allow_credentials(true)
        .expose_headers(exposed)
        .max_age(config.max_age)
}
