//! gRPC status codes, the percent-encoded `grpc-message`, and call status as trailers.

use std::fmt;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use percent_encoding::{percent_decode, utf8_percent_encode, AsciiSet, CONTROLS};

use crate::metadata;

/// Trailer carrying the status code.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// Trailer carrying the percent-encoded status message.
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// Trailer carrying a serialized `google.rpc.Status`, base64-encoded.
pub const GRPC_STATUS_DETAILS_BIN: HeaderName = HeaderName::from_static("grpc-status-details-bin");

/// The 17 gRPC status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(i32)]
pub enum Code {
    /// Not an error.
    Ok = 0,
    /// The operation was cancelled, typically by the caller.
    Cancelled = 1,
    /// Unknown error.
    Unknown = 2,
    /// The client specified an invalid argument.
    InvalidArgument = 3,
    /// The deadline expired before the operation could complete.
    DeadlineExceeded = 4,
    /// Some requested entity was not found.
    NotFound = 5,
    /// The entity a client attempted to create already exists.
    AlreadyExists = 6,
    /// The caller lacks permission for the operation.
    PermissionDenied = 7,
    /// Some resource has been exhausted.
    ResourceExhausted = 8,
    /// The system is not in a state required for the operation.
    FailedPrecondition = 9,
    /// The operation was aborted, typically due to a concurrency issue.
    Aborted = 10,
    /// The operation was attempted past the valid range.
    OutOfRange = 11,
    /// The operation is not implemented or supported.
    Unimplemented = 12,
    /// Internal error.
    Internal = 13,
    /// The service is currently unavailable; retrying may help.
    Unavailable = 14,
    /// Unrecoverable data loss or corruption.
    DataLoss = 15,
    /// The request lacks valid authentication credentials.
    Unauthenticated = 16,
}

impl Code {
    /// Every code, in numeric order.
    pub const ALL: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The code with this number, `None` outside 0..=16.
    pub fn from_i32(v: i32) -> Option<Code> {
        usize::try_from(v)
            .ok()
            .and_then(|i| Self::ALL.get(i))
            .copied()
    }

    /// Parse a `grpc-status` header value; anything unparseable or out of range is `Unknown`.
    pub fn from_header_value(v: &[u8]) -> Code {
        // PROTOCOL-HTTP2: Status is 1*DIGIT; a peer that sends something else has failed in a
        // way we cannot classify, which is what UNKNOWN is for.
        if v.is_empty() || v.len() > 3 || !v.iter().all(u8::is_ascii_digit) {
            return Code::Unknown;
        }
        let n = v.iter().fold(0i32, |n, d| n * 10 + i32::from(d - b'0'));
        Code::from_i32(n).unwrap_or(Code::Unknown)
    }

    /// The code's number.
    pub fn as_i32(self) -> i32 {
        self as i32
    }

    /// The canonical upper-case name, e.g. `"DEADLINE_EXCEEDED"`.
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// The code for an HTTP response that carries no `grpc-status`
    /// (doc/http-grpc-status-mapping.md).
    pub fn from_http_status(status: u16) -> Code {
        match status {
            400 => Code::Internal,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::Unimplemented,
            429 | 502 | 503 | 504 => Code::Unavailable,
            _ => Code::Unknown,
        }
    }

    /// The code for a stream reset with this HTTP/2 error code (PROTOCOL-HTTP2 "Errors").
    pub fn from_h2_reason(reason: u32) -> Code {
        match reason {
            // REFUSED_STREAM: the server did no work, so the call may be retried elsewhere.
            0x7 => Code::Unavailable,
            // CANCEL
            0x8 => Code::Cancelled,
            // ENHANCE_YOUR_CALM: the peer wants less load.
            0xb => Code::ResourceExhausted,
            // INADEQUATE_SECURITY
            0xc => Code::PermissionDenied,
            // NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT,
            // STREAM_CLOSED (no mapping in the spec), FRAME_SIZE_ERROR, COMPRESSION_ERROR,
            // CONNECT_ERROR, and codes the spec does not know.
            _ => Code::Internal,
        }
    }

    /// The code for an HTTP/3 stream reset or connection close with this error code (RFC 9114
    /// §8.1), mapped like the HTTP/2 codes they correspond to.
    pub fn from_h3_code(code: u64) -> Code {
        match code {
            // H3_REQUEST_REJECTED (REFUSED_STREAM): no work was done; retry elsewhere.
            // H3_VERSION_FALLBACK: the request should be retried over HTTP/1.1 or HTTP/2.
            0x10b | 0x110 => Code::Unavailable,
            // H3_REQUEST_CANCELLED (CANCEL)
            0x10c => Code::Cancelled,
            // H3_EXCESSIVE_LOAD (ENHANCE_YOUR_CALM)
            0x107 => Code::ResourceExhausted,
            // H3_NO_ERROR on a stream cut short, protocol, internal, frame, settings, message
            // and QPACK errors, and codes the spec does not know.
            _ => Code::Internal,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<Code> for i32 {
    fn from(code: Code) -> i32 {
        code.as_i32()
    }
}

/// PROTOCOL-HTTP2 Status-Message: Percent-Byte-Unencoded is %x20-%x24 / %x26-%x7E, so controls,
/// DEL, '%' and every non-ASCII byte of the UTF-8 encoding are escaped.
const MESSAGE_ESCAPES: &AsciiSet = &CONTROLS.add(b'%');

/// Percent-encode a `grpc-message` (PROTOCOL-HTTP2): bytes outside `0x20..=0x7E` and `%`
/// become `%XX` (upper-case hex) of the UTF-8 bytes.
pub fn encode_message(msg: &str) -> String {
    utf8_percent_encode(msg, MESSAGE_ESCAPES).to_string()
}

/// Decode a `grpc-message`. Never fails: a malformed `%` sequence is kept literally and invalid
/// UTF-8 is replaced lossily, because PROTOCOL-HTTP2 says decoding invalid values "MUST NOT
/// error or throw away the message".
pub fn decode_message(v: &[u8]) -> String {
    percent_decode(v).decode_utf8_lossy().into_owned()
}

/// A final call status with its trailing metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    /// The status code.
    pub code: Code,
    /// The message, decoded (not percent-encoded).
    pub message: String,
    /// `grpc-status-details-bin`, base64-decoded (a serialized `google.rpc.Status`).
    pub details: Option<Bytes>,
    /// The other trailers.
    pub metadata: HeaderMap,
}

impl Status {
    /// A status with no details and no metadata.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: None,
            metadata: HeaderMap::new(),
        }
    }

    /// `OK` with an empty message.
    pub fn ok() -> Self {
        Self::new(Code::Ok, String::new())
    }

    /// The code is `OK`.
    pub fn is_ok(&self) -> bool {
        self.code == Code::Ok
    }

    /// Read `grpc-status`, `grpc-message` and `grpc-status-details-bin`, and every other entry
    /// into `metadata`. `None` when `grpc-status` is absent.
    ///
    /// A `grpc-status-details-bin` that is not valid base64 is dropped: the code and message
    /// still say what happened.
    pub fn from_headers(h: &HeaderMap) -> Option<Status> {
        let code = Code::from_header_value(h.get(GRPC_STATUS)?.as_bytes());
        let message = h
            .get(GRPC_MESSAGE)
            .map(|v| decode_message(v.as_bytes()))
            .unwrap_or_default();
        let details = h
            .get(GRPC_STATUS_DETAILS_BIN)
            .and_then(|v| metadata::decode_binary(v.as_bytes()).ok());
        let mut rest = HeaderMap::new();
        for (name, value) in h {
            if !is_status_header(name) {
                rest.append(name.clone(), value.clone());
            }
        }
        Some(Status {
            code,
            message,
            details,
            metadata: rest,
        })
    }

    /// The status as headers (for a Trailers-Only response) or trailers.
    pub fn to_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        self.write_headers(&mut h);
        h
    }

    /// Write `grpc-status`, `grpc-message` (percent-encoded, omitted when empty),
    /// `grpc-status-details-bin` (base64, unpadded), then the metadata entries.
    ///
    /// The three status entries replace any already in `into`; metadata entries are appended,
    /// except ones named like the status entries, which are skipped so the status stays
    /// unambiguous.
    pub fn write_headers(&self, into: &mut HeaderMap) {
        into.insert(GRPC_STATUS, HeaderValue::from(self.code.as_i32()));
        into.remove(GRPC_MESSAGE);
        if !self.message.is_empty() {
            // Percent-encoding leaves only visible ASCII, which is always a valid value.
            if let Ok(v) = HeaderValue::try_from(encode_message(&self.message)) {
                into.insert(GRPC_MESSAGE, v);
            }
        }
        into.remove(GRPC_STATUS_DETAILS_BIN);
        if let Some(details) = &self.details {
            // Base64 is always a valid value.
            if let Ok(v) = HeaderValue::try_from(metadata::encode_binary(details)) {
                into.insert(GRPC_STATUS_DETAILS_BIN, v);
            }
        }
        for (name, value) in &self.metadata {
            if !is_status_header(name) {
                into.append(name.clone(), value.clone());
            }
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{}: {}", self.code, self.message)
        }
    }
}

fn is_status_header(name: &HeaderName) -> bool {
    name == GRPC_STATUS || name == GRPC_MESSAGE || name == GRPC_STATUS_DETAILS_BIN
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECIAL: &str = "\t\ntest with whitespace\r\nand Unicode BMP ☺ and non-BMP 😈\t\n";

    #[test]
    fn code_numbers_and_names() {
        for (i, code) in Code::ALL.iter().enumerate() {
            assert_eq!(code.as_i32(), i as i32);
            assert_eq!(Code::from_i32(i as i32), Some(*code));
        }
        assert_eq!(Code::from_i32(-1), None);
        assert_eq!(Code::from_i32(17), None);
        assert_eq!(Code::DeadlineExceeded.name(), "DEADLINE_EXCEEDED");
        assert_eq!(Code::Ok.to_string(), "OK");
        assert_eq!(Code::Unauthenticated.as_i32(), 16);
        assert_eq!(i32::from(Code::DataLoss), 15);
    }

    #[test]
    fn header_value_parsing() {
        assert_eq!(Code::from_header_value(b"0"), Code::Ok);
        assert_eq!(Code::from_header_value(b"14"), Code::Unavailable);
        assert_eq!(Code::from_header_value(b"016"), Code::Unauthenticated);
        for bad in [
            &b""[..],
            b"17",
            b"-1",
            b"+1",
            b" 1",
            b"1 ",
            b"abc",
            b"1000",
            b"99999999999999999999",
        ] {
            assert_eq!(Code::from_header_value(bad), Code::Unknown, "{bad:?}");
        }
    }

    #[test]
    fn http_status_mapping() {
        assert_eq!(Code::from_http_status(400), Code::Internal);
        assert_eq!(Code::from_http_status(401), Code::Unauthenticated);
        assert_eq!(Code::from_http_status(403), Code::PermissionDenied);
        assert_eq!(Code::from_http_status(404), Code::Unimplemented);
        for s in [429, 502, 503, 504] {
            assert_eq!(Code::from_http_status(s), Code::Unavailable);
        }
        for s in [200, 201, 302, 405, 415, 500, 505] {
            assert_eq!(Code::from_http_status(s), Code::Unknown);
        }
    }

    #[test]
    fn h2_reason_mapping() {
        let expected = [
            (0x0, Code::Internal),
            (0x1, Code::Internal),
            (0x2, Code::Internal),
            (0x3, Code::Internal),
            (0x4, Code::Internal),
            (0x5, Code::Internal),
            (0x6, Code::Internal),
            (0x7, Code::Unavailable),
            (0x8, Code::Cancelled),
            (0x9, Code::Internal),
            (0xa, Code::Internal),
            (0xb, Code::ResourceExhausted),
            (0xc, Code::PermissionDenied),
            (0xd, Code::Internal),
            (0xffff_ffff, Code::Internal),
        ];
        for (reason, code) in expected {
            assert_eq!(Code::from_h2_reason(reason), code, "{reason:#x}");
        }
    }

    #[test]
    fn h3_error_codes_map_like_their_h2_counterparts() {
        for (code, expected) in [
            (0x100, Code::Internal),          // H3_NO_ERROR
            (0x101, Code::Internal),          // H3_GENERAL_PROTOCOL_ERROR
            (0x102, Code::Internal),          // H3_INTERNAL_ERROR
            (0x107, Code::ResourceExhausted), // H3_EXCESSIVE_LOAD
            (0x10b, Code::Unavailable),       // H3_REQUEST_REJECTED
            (0x10c, Code::Cancelled),         // H3_REQUEST_CANCELLED
            (0x10d, Code::Internal),          // H3_REQUEST_INCOMPLETE
            (0x110, Code::Unavailable),       // H3_VERSION_FALLBACK
            (0x0, Code::Internal),
            (u64::MAX, Code::Internal),
        ] {
            assert_eq!(Code::from_h3_code(code), expected, "{code:#x}");
        }
    }

    #[test]
    fn special_message_round_trips() {
        let encoded = encode_message(SPECIAL);
        assert_eq!(
            encoded,
            "%09%0Atest with whitespace%0D%0Aand Unicode BMP %E2%98%BA and non-BMP %F0%9F%98%88%09%0A"
        );
        assert_eq!(decode_message(encoded.as_bytes()), SPECIAL);
    }

    #[test]
    fn percent_and_visible_ascii() {
        assert_eq!(encode_message("100% ok ~!"), "100%25 ok ~!");
        assert_eq!(encode_message("\x7f"), "%7F");
        assert_eq!(decode_message(b"100%25 ok"), "100% ok");
        assert_eq!(decode_message(b"%e2%98%ba"), "☺");
    }

    #[test]
    fn bad_percent_sequences_are_kept() {
        assert_eq!(decode_message(b"%"), "%");
        assert_eq!(decode_message(b"%4"), "%4");
        assert_eq!(decode_message(b"%zz"), "%zz");
        assert_eq!(decode_message(b"a%4g"), "a%4g");
        // Half a UTF-8 sequence is replaced, not an error.
        assert_eq!(decode_message(b"%C3"), "\u{fffd}");
        assert_eq!(decode_message(b"\xff"), "\u{fffd}");
    }

    #[test]
    fn status_headers_round_trip() {
        let mut s = Status::new(Code::NotFound, SPECIAL);
        s.details = Some(Bytes::from_static(b"\x08\x05\x12\x01x"));
        s.metadata.append("x-extra", HeaderValue::from_static("1"));
        s.metadata.append("x-extra", HeaderValue::from_static("2"));
        let h = s.to_headers();
        assert_eq!(h["grpc-status"], "5");
        assert_eq!(h["grpc-status-details-bin"], "CAUSAXg");
        assert_eq!(h.get_all("x-extra").iter().count(), 2);
        assert_eq!(Status::from_headers(&h), Some(s));
    }

    #[test]
    fn empty_message_is_omitted() {
        let h = Status::ok().to_headers();
        assert_eq!(h.len(), 1);
        assert_eq!(h["grpc-status"], "0");
        assert!(Status::ok().is_ok());
    }

    #[test]
    fn from_headers_without_status() {
        let mut h = HeaderMap::new();
        h.insert("grpc-message", HeaderValue::from_static("x"));
        assert_eq!(Status::from_headers(&h), None);
    }

    #[test]
    fn from_headers_is_lenient() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("banana"));
        h.insert("grpc-status-details-bin", HeaderValue::from_static("!!!"));
        h.insert("grpc-message", HeaderValue::from_static("50%"));
        let s = Status::from_headers(&h).expect("status present");
        assert_eq!(s.code, Code::Unknown);
        assert_eq!(s.message, "50%");
        assert_eq!(s.details, None);
        assert!(s.metadata.is_empty());
    }

    #[test]
    fn padded_details_are_accepted() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("3"));
        h.insert("grpc-status-details-bin", HeaderValue::from_static("AQI="));
        let s = Status::from_headers(&h).expect("status present");
        assert_eq!(s.details, Some(Bytes::from_static(&[1, 2])));
    }

    #[test]
    fn write_headers_replaces_status_and_skips_reserved_metadata() {
        let mut into = HeaderMap::new();
        into.insert("grpc-status", HeaderValue::from_static("0"));
        into.insert("grpc-message", HeaderValue::from_static("stale"));
        into.insert("content-type", HeaderValue::from_static("application/grpc"));
        let mut s = Status::new(Code::Internal, "");
        s.metadata
            .insert("grpc-status", HeaderValue::from_static("0"));
        s.write_headers(&mut into);
        assert_eq!(into.get_all("grpc-status").iter().count(), 1);
        assert_eq!(into["grpc-status"], "13");
        assert!(into.get("grpc-message").is_none());
        assert_eq!(into["content-type"], "application/grpc");
        assert_eq!(s.to_string(), "INTERNAL");
        assert_eq!(Status::new(Code::Aborted, "x").to_string(), "ABORTED: x");
    }
}
