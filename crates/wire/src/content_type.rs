//! Content types that select the protocol of a call.
//!
//! PROTOCOL-HTTP2: `Content-Type → "application/grpc" [("+proto" / "+json" / {custom})]`.
//! PROTOCOL-WEB: `application/grpc-web[+proto|+json|+thrift]` and
//! `application/grpc-web-text[+proto|…]` for the base64 text mode.

/// The wire protocol named by a content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Native gRPC over HTTP/2: `application/grpc`.
    Grpc,
    /// Binary gRPC-Web: `application/grpc-web`.
    GrpcWeb,
    /// Base64 gRPC-Web: `application/grpc-web-text`.
    GrpcWebText,
}

impl Protocol {
    /// The content type without a subtype, e.g. `"application/grpc-web-text"`.
    pub fn content_type(self) -> &'static str {
        match self {
            Protocol::Grpc => GRPC,
            Protocol::GrpcWeb => GRPC_WEB,
            Protocol::GrpcWebText => GRPC_WEB_TEXT,
        }
    }

    /// gRPC-Web, binary or text.
    pub fn is_web(self) -> bool {
        matches!(self, Protocol::GrpcWeb | Protocol::GrpcWebText)
    }
}

const GRPC: &str = "application/grpc";
const GRPC_WEB: &str = "application/grpc-web";
const GRPC_WEB_TEXT: &str = "application/grpc-web-text";

/// Parse a request content type: `application/grpc`, `application/grpc-web` or
/// `application/grpc-web-text`, each optionally followed by `+subtype` (`proto`, `json`, or a
/// custom token, as both specs allow). Case-insensitive; parameters (`;charset=…`) and
/// surrounding whitespace are ignored. Returns the protocol and the subtype as written.
/// `None` for anything else.
pub fn parse(v: &str) -> Option<(Protocol, Option<&str>)> {
    let essence = v.split_once(';').map_or(v, |(e, _)| e).trim();
    let (base, subtype) = match essence.split_once('+') {
        Some((base, sub)) => {
            if sub.is_empty() || !sub.bytes().all(is_token_byte) {
                return None;
            }
            (base, Some(sub))
        }
        None => (essence, None),
    };
    let protocol = [
        (GRPC, Protocol::Grpc),
        (GRPC_WEB, Protocol::GrpcWeb),
        (GRPC_WEB_TEXT, Protocol::GrpcWebText),
    ]
    .into_iter()
    .find(|(name, _)| base.eq_ignore_ascii_case(name))?
    .1;
    Some((protocol, subtype))
}

/// Lenient `Accept` check: true if any entry of the comma-separated list names
/// `application/grpc-web-text`, with or without `+proto` (any case, parameters ignored).
pub fn accepts_text(accept: &str) -> bool {
    accept_entries(accept).any(|e| {
        e.eq_ignore_ascii_case(GRPC_WEB_TEXT)
            || e.eq_ignore_ascii_case("application/grpc-web-text+proto")
    })
}

/// True if the `Accept` list names binary `application/grpc-web` (or `+proto`) explicitly.
pub fn accepts_binary_web(accept: &str) -> bool {
    accept_entries(accept).any(|e| {
        e.eq_ignore_ascii_case(GRPC_WEB) || e.eq_ignore_ascii_case("application/grpc-web+proto")
    })
}

/// Media ranges of an `Accept` list, parameters and whitespace removed.
fn accept_entries(accept: &str) -> impl Iterator<Item = &str> {
    accept
        .split(',')
        .map(|e| e.split_once(';').map_or(e, |(range, _)| range).trim())
}

/// RFC 9110 section 5.6.2 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_types() {
        let cases = [
            ("application/grpc", Protocol::Grpc, None),
            ("application/grpc+proto", Protocol::Grpc, Some("proto")),
            ("application/grpc+json", Protocol::Grpc, Some("json")),
            ("application/grpc-web", Protocol::GrpcWeb, None),
            (
                "application/grpc-web+proto",
                Protocol::GrpcWeb,
                Some("proto"),
            ),
            ("application/grpc-web-text", Protocol::GrpcWebText, None),
            (
                "application/grpc-web-text+proto",
                Protocol::GrpcWebText,
                Some("proto"),
            ),
        ];
        for (v, p, sub) in cases {
            assert_eq!(parse(v), Some((p, sub)), "{v}");
        }
    }

    #[test]
    fn case_params_and_whitespace() {
        assert_eq!(
            parse("Application/GRPC-Web+Proto; charset=utf-8"),
            Some((Protocol::GrpcWeb, Some("Proto")))
        );
        assert_eq!(
            parse(" application/grpc-web-text ;q=1"),
            Some((Protocol::GrpcWebText, None))
        );
        assert_eq!(parse("application/grpc;"), Some((Protocol::Grpc, None)));
    }

    #[test]
    fn custom_subtypes_per_spec() {
        assert_eq!(
            parse("application/grpc-web+json"),
            Some((Protocol::GrpcWeb, Some("json")))
        );
        assert_eq!(
            parse("application/grpc+thrift"),
            Some((Protocol::Grpc, Some("thrift")))
        );
    }

    #[test]
    fn rejects_others() {
        for v in [
            "",
            "application/json",
            "application/grpc+",
            "application/grpc-webx",
            "application/grpc-web-text+",
            "application/grpc+pro to",
            "application/grpc +proto",
            "text/plain",
            "application/grpcweb",
            "application/x-protobuf",
        ] {
            assert_eq!(parse(v), None, "{v:?}");
        }
    }

    #[test]
    fn accept_text() {
        assert!(accepts_text("application/grpc-web-text"));
        assert!(accepts_text("Application/GRPC-WEB-TEXT+proto;q=0.9"));
        assert!(accepts_text(
            "application/json, application/grpc-web-text ; q=1"
        ));
        assert!(!accepts_text("application/grpc-web"));
        assert!(!accepts_text("*/*"));
        assert!(!accepts_text(""));
        assert!(!accepts_text("application/grpc-web-text+json"));
    }

    #[test]
    fn accept_binary_web() {
        assert!(accepts_binary_web("application/grpc-web"));
        assert!(accepts_binary_web(
            "text/html, APPLICATION/grpc-web+proto;q=0.5"
        ));
        assert!(!accepts_binary_web("application/grpc-web-text"));
        assert!(!accepts_binary_web("*/*"));
        assert!(!accepts_binary_web("application/grpc"));
    }

    #[test]
    fn protocol_helpers() {
        assert_eq!(
            Protocol::GrpcWebText.content_type(),
            "application/grpc-web-text"
        );
        assert!(Protocol::GrpcWeb.is_web());
        assert!(!Protocol::Grpc.is_web());
    }
}
