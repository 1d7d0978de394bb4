//! Plain web pages served beside the gRPC endpoints: the demo page, which streams tokens from
//! `demo.llm.v1.Generator/Generate` through gRPC-Web on the origin that served it. Only `GET`
//! and `HEAD` requests for the paths listed here are answered; everything else goes on to the
//! gRPC ingress.
//!
//! The page is built from `site/src` by `interop-tests/js/scripts/build-site.mjs` (esbuild)
//! into `site/dist`, which is committed and embedded here, so building pnp needs no npm. The
//! browser tests check that the committed bundle matches a fresh build.

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::request::Parts;
use http::{Method, Response};

use crate::reply::ReplyBody;

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../site/dist/index.html"),
    },
    Asset {
        path: "/index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../site/dist/index.html"),
    },
    Asset {
        path: "/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../site/dist/app.js"),
    },
    Asset {
        path: "/app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../site/dist/app.css"),
    },
];

/// Everything the page loads comes from its own origin, and it calls only its own origin.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// A page for this request, if it asks for one.
pub(crate) fn serve(parts: &Parts) -> Option<Response<ReplyBody>> {
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return None;
    }
    let asset = ASSETS.iter().find(|a| a.path == parts.uri.path())?;
    let mut response = Response::new(ReplyBody::full(Bytes::from_static(asset.body)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    // Small files that change with every pnp build: revalidate rather than go stale.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    fn parts(method: Method, uri: &str) -> Parts {
        let (parts, ()) = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap_or_else(|e| panic!("request for {uri}: {e}"))
            .into_parts();
        parts
    }

    fn content_type(response: &Response<ReplyBody>) -> &str {
        response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    #[test]
    fn serves_the_page_and_its_assets() {
        for (path, kind) in [
            ("/", "text/html"),
            ("/index.html", "text/html"),
            ("/app.js", "text/javascript"),
            ("/app.css", "text/css"),
        ] {
            let response =
                serve(&parts(Method::GET, path)).unwrap_or_else(|| panic!("no page for {path}"));
            assert_eq!(response.status(), http::StatusCode::OK);
            assert!(content_type(&response).starts_with(kind), "{path}");
            let size = response.body().size_hint().exact().unwrap_or_default();
            assert!(size > 100, "{path}: {size} bytes");
            assert!(response.headers().contains_key("content-security-policy"));
        }
        assert!(serve(&parts(Method::HEAD, "/")).is_some());
    }

    #[test]
    fn the_page_loads_its_own_assets() {
        let html = String::from_utf8_lossy(ASSETS[0].body);
        assert!(html.contains(r#"src="app.js""#), "{html}");
        assert!(html.contains(r#"href="app.css""#), "{html}");
        let js = String::from_utf8_lossy(ASSETS[2].body);
        assert!(js.contains("demo.llm.v1.Generator"));
    }

    #[test]
    fn leaves_grpc_and_unknown_paths_to_the_ingress() {
        assert!(serve(&parts(Method::POST, "/")).is_none());
        assert!(serve(&parts(Method::POST, "/demo.llm.v1.Generator/Generate")).is_none());
        assert!(serve(&parts(Method::GET, "/demo.llm.v1.Generator/Generate")).is_none());
        assert!(serve(&parts(Method::GET, "/nope.js")).is_none());
        assert!(serve(&parts(Method::OPTIONS, "/")).is_none());
    }
}
