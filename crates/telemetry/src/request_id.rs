//! Request ids: accepted from `x-request-id` (or its alias `x-ai-trace-id`), generated at the
//! edge when absent, forwarded on every hop and returned to the client.

use http::{HeaderMap, HeaderValue};

/// The header pnp reads, forwards and returns.
pub const HEADER: &str = "x-request-id";
/// An alias some AI front ends send; accepted when `x-request-id` is absent.
pub const ALIAS: &str = "x-ai-trace-id";
/// Longest id accepted from a client; longer ones are replaced.
pub const MAX_LEN: usize = 128;

/// The request's id from its headers, if it carries a usable one.
pub fn from_headers(headers: &HeaderMap) -> Option<HeaderValue> {
    [HEADER, ALIAS]
        .iter()
        .filter_map(|name| headers.get(*name))
        .find(|value| is_usable(value))
        .cloned()
}

/// A new random id: 32 lowercase hex digits (128 bits).
pub fn generate() -> HeaderValue {
    let id: u128 = rand::random();
    HeaderValue::from_str(&format!("{id:032x}"))
        .unwrap_or_else(|_| HeaderValue::from_static("00000000000000000000000000000000"))
}

/// Visible ASCII, not empty, bounded: safe to log and to forward.
fn is_usable(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= MAX_LEN && bytes.iter().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_wins_over_alias() {
        let mut headers = HeaderMap::new();
        headers.insert(ALIAS, HeaderValue::from_static("trace-1"));
        assert_eq!(
            from_headers(&headers).as_ref().map(HeaderValue::as_bytes),
            Some(&b"trace-1"[..])
        );
        headers.insert(HEADER, HeaderValue::from_static("req-1"));
        assert_eq!(
            from_headers(&headers).as_ref().map(HeaderValue::as_bytes),
            Some(&b"req-1"[..])
        );
    }

    #[test]
    fn unusable_ids_are_ignored() {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER, HeaderValue::from_static("has space"));
        assert_eq!(from_headers(&headers), None);
        headers.insert(
            HEADER,
            HeaderValue::from_str(&"x".repeat(MAX_LEN + 1)).expect("ascii"),
        );
        assert_eq!(from_headers(&headers), None);
    }

    #[test]
    fn generated_ids_are_distinct_hex() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit));
    }
}
