//! The gRPC-Web trailer block.
//!
//! PROTOCOL-WEB "Message framing": trailers travel in the body, in a frame flagged `0x80`, as
//! an HTTP/1 header block: `key:value\r\n` per entry, keys lower-case. Senders differ on the
//! space after the colon, so decoding accepts both.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

/// Why a trailer block cannot be parsed. Lines are numbered from 1.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TrailerError {
    /// A non-empty line without `:`.
    #[error("trailer line {line} has no ':'")]
    MissingColon {
        /// The line number.
        line: usize,
    },
    /// The key is not a valid header name (empty, whitespace before the colon, bad bytes).
    #[error("trailer line {line} has an invalid name")]
    InvalidName {
        /// The line number.
        line: usize,
    },
    /// The value contains bytes a header value may not (controls other than tab).
    #[error("trailer line {line} has an invalid value")]
    InvalidValue {
        /// The line number.
        line: usize,
    },
}

/// Encode trailers as a gRPC-Web trailer block: `key:value\r\n` per entry, in map order.
///
/// `http::HeaderName` is always lower-case, as PROTOCOL-WEB requires of trailer keys.
pub fn encode_block(trailers: &HeaderMap) -> Bytes {
    let len = trailers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 3)
        .sum();
    let mut out = BytesMut::with_capacity(len);
    for (name, value) in trailers {
        out.put_slice(name.as_str().as_bytes());
        out.put_u8(b':');
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.freeze()
}

/// Parse a gRPC-Web trailer block.
///
/// Accepts `key:value` and `key: value` (spaces and tabs after the colon skipped, trailing
/// whitespace trimmed), CRLF or bare LF line ends, and a last line with no line end. Keys are
/// lower-cased; repeated keys keep every value in order; empty lines are ignored.
pub fn decode_block(block: &[u8]) -> Result<HeaderMap, TrailerError> {
    let mut map = HeaderMap::new();
    for (i, line) in block.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(TrailerError::MissingColon { line: line_no });
        };
        let (key, value) = (&line[..colon], &line[colon + 1..]);
        // HTTP/1 field names are case-insensitive; HTTP/2 and HeaderName want lower case.
        // Whitespace before the colon is not allowed (RFC 9112 section 5.1) and fails here.
        let name = HeaderName::from_bytes(&key.to_ascii_lowercase())
            .map_err(|_| TrailerError::InvalidName { line: line_no })?;
        let value = HeaderValue::from_bytes(trim_ows(value))
            .map_err(|_| TrailerError::InvalidValue { line: line_no })?;
        map.append(name, value);
    }
    Ok(map)
}

/// Strip optional whitespace (space, tab) around a field value (RFC 9110 section 5.5).
fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in entries {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn encodes_key_colon_value_crlf() {
        let m = map(&[("grpc-status", "0"), ("grpc-message", "ok"), ("x-a", "1")]);
        let block = encode_block(&m);
        assert_eq!(
            &block[..],
            b"grpc-status:0\r\ngrpc-message:ok\r\nx-a:1\r\n".as_slice()
        );
        assert_eq!(encode_block(&HeaderMap::new()), Bytes::new());
    }

    #[test]
    fn decodes_both_colon_styles() {
        let expected = map(&[("grpc-status", "0"), ("grpc-message", "fine")]);
        assert_eq!(
            decode_block(b"grpc-status:0\r\ngrpc-message:fine\r\n"),
            Ok(expected.clone())
        );
        assert_eq!(
            decode_block(b"grpc-status: 0\r\ngrpc-message: fine\r\n"),
            Ok(expected.clone())
        );
        assert_eq!(
            decode_block(b"grpc-status:\t 0  \r\ngrpc-message:fine \t"),
            Ok(expected)
        );
    }

    #[test]
    fn bare_lf_empty_lines_and_case() {
        let got = decode_block(b"\r\nGrpc-Status:0\n\nX-Multi:a\nx-multi:b\n\r\n");
        let expected = map(&[("grpc-status", "0"), ("x-multi", "a"), ("x-multi", "b")]);
        assert_eq!(got, Ok(expected));
    }

    #[test]
    fn empty_block_and_empty_value() {
        assert_eq!(decode_block(b""), Ok(HeaderMap::new()));
        assert_eq!(decode_block(b"x-empty:\r\n"), Ok(map(&[("x-empty", "")])));
        // Only the first colon separates: values may contain colons.
        assert_eq!(
            decode_block(b"x-url:http://a:1/\r\n"),
            Ok(map(&[("x-url", "http://a:1/")]))
        );
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(
            decode_block(b"grpc-status:0\r\nno colon here\r\n"),
            Err(TrailerError::MissingColon { line: 2 })
        );
        assert_eq!(
            decode_block(b":0\r\n"),
            Err(TrailerError::InvalidName { line: 1 })
        );
        assert_eq!(
            decode_block(b"grpc-status :0\r\n"),
            Err(TrailerError::InvalidName { line: 1 })
        );
        assert_eq!(
            decode_block(b"bad name:0\r\n"),
            Err(TrailerError::InvalidName { line: 1 })
        );
        assert_eq!(
            decode_block(b"x:a\rb\r\n"),
            Err(TrailerError::InvalidValue { line: 1 })
        );
        assert_eq!(
            decode_block(b"x:\x00\r\n"),
            Err(TrailerError::InvalidValue { line: 1 })
        );
    }

    #[test]
    fn round_trip() {
        let m = map(&[
            ("grpc-status", "14"),
            ("grpc-message", "upstream%20gone"),
            ("x-bin", "AQI"),
        ]);
        assert_eq!(decode_block(&encode_block(&m)), Ok(m));
    }
}
