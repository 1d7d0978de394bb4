//! pnp's call framing over UCX: the frames that carry calls between two pnp instances, many
//! calls multiplexed on one connection by call id. Pure: no UCX, no I/O, no clock.
//!
//! A frame travels as one UCX active message: a fixed [`HEADER_LEN`]-byte header (in the
//! active message's header, so the receiver can route it before any payload arrives) and a
//! body (the active message's data: message bytes, or the encoded head or status). Large bodies
//! go through UCX's rendezvous protocol (the receiver pulls them, zero-copy where the transport
//! can), small ones eagerly.
//!
//! ```text
//! header: kind u8 | flags u8 | 0 u16 | arg u32 (LE) | call id u64 (LE)
//! flags:  bit 0 compressed (message, head), bit 1 last (fragment)
//! arg:    message length (head), status code (status), bytes (credit), else 0
//! ```
//!
//! | kind | frame | body |
//! |---|---|---|
//! | 1 | open | path, subtype, timeout, largest message, metadata |
//! | 2, 3, 4 | request message, head, fragment | payload (none for a head) |
//! | 5 | half-close: no more request messages | – |
//! | 6 | response head | subtype, metadata |
//! | 7, 8, 9 | response message, head, fragment | payload (none for a head) |
//! | 10 | status | message, details, trailers |
//! | 11 | cancel | – |
//! | 12 | credit: the sender may send `arg` more payload bytes on the call | – |
//! | 13 | go away: the listener is draining; it serves the calls up to the id in the header and no other | – |
//!
//! Strings are a length (u16 for the path and subtype, u32 otherwise) and UTF-8 bytes;
//! metadata is a u32 count of (u16 name length, name, u32 value length, value) entries.
//! Decoding checks every length against what is there and returns [`FrameError`], never panics.
#![forbid(unsafe_code)]

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use pnp_call::{CallHead, Code, Message, Part, ResponseHead, Status};

/// Length of a frame header.
pub const HEADER_LEN: usize = 16;

/// A frame header as it travels.
pub type Header = [u8; HEADER_LEN];

/// Identifies a call on one connection; chosen by the side that opens it.
pub type CallId = u64;

const FLAG_COMPRESSED: u8 = 1;
const FLAG_LAST: u8 = 2;

const OPEN: u8 = 1;
const REQUEST_MESSAGE: u8 = 2;
#[cfg(test)]
const REQUEST_HEAD: u8 = 3;
const REQUEST_FRAGMENT: u8 = 4;
const HALF_CLOSE: u8 = 5;
const RESPONSE_HEAD: u8 = 6;
const RESPONSE_MESSAGE: u8 = 7;
#[cfg(test)]
const RESPONSE_HEAD_PART: u8 = 8;
const RESPONSE_FRAGMENT: u8 = 9;
const STATUS: u8 = 10;
const CANCEL: u8 = 11;
const CREDIT: u8 = 12;
const GO_AWAY: u8 = 13;

/// One frame of a call.
#[derive(Clone, Debug)]
pub enum Frame {
    /// Opens call `call` with its head.
    Open {
        /// The call.
        call: CallId,
        /// Path, subtype, metadata, time left, largest message.
        head: CallHead,
    },
    /// A request message, or the head or a fragment of a large one.
    Request {
        /// The call.
        call: CallId,
        /// The part.
        part: Part,
    },
    /// The request is complete: no more request parts.
    HalfClose {
        /// The call.
        call: CallId,
    },
    /// Response metadata, before any response message.
    ResponseHead {
        /// The call.
        call: CallId,
        /// Metadata and subtype.
        head: ResponseHead,
    },
    /// A response message, or the head or a fragment of a large one.
    Response {
        /// The call.
        call: CallId,
        /// The part.
        part: Part,
    },
    /// The final status; the call is over.
    Status {
        /// The call.
        call: CallId,
        /// Code, message, details and trailers.
        status: Status,
    },
    /// The caller gave up on the call; the callee stops it.
    Cancel {
        /// The call.
        call: CallId,
    },
    /// Flow control: the receiver of the frame may send `bytes` more payload on the call.
    Credit {
        /// The call.
        call: CallId,
        /// Payload bytes granted.
        bytes: u32,
    },
    /// The listener is draining: it serves the calls it has seen open, up to and including
    /// `last`, and never any later one; the client opens new calls elsewhere.
    GoAway {
        /// The last call served.
        last: CallId,
    },
}

/// A frame that could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header is not [`HEADER_LEN`] bytes.
    #[error("frame header of {0} bytes (expected 16)")]
    HeaderLength(usize),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// The body ended before a field it announced.
    #[error("frame body cut short in {0}")]
    Truncated(&'static str),
    /// Bytes left over after the last field.
    #[error("{0} bytes left over after the frame body")]
    Trailing(usize),
    /// A field holds a value that is not allowed.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

impl Frame {
    /// The call this frame belongs to.
    pub fn call(&self) -> CallId {
        match self {
            Frame::Open { call, .. }
            | Frame::Request { call, .. }
            | Frame::HalfClose { call }
            | Frame::ResponseHead { call, .. }
            | Frame::Response { call, .. }
            | Frame::Status { call, .. }
            | Frame::Cancel { call }
            | Frame::Credit { call, .. }
            | Frame::GoAway { last: call } => *call,
        }
    }

    /// Payload bytes that count against the receiver's flow-control window (message and
    /// fragment bytes; heads, statuses and control frames are free).
    pub fn flow_len(&self) -> usize {
        match self {
            Frame::Request { part, .. } | Frame::Response { part, .. } => part.payload_len(),
            _ => 0,
        }
    }

    /// The header and the body of this frame. Message payloads are not copied.
    pub fn encode(&self) -> (Header, Bytes) {
        let (kind, flags, arg, body) = match self {
            Frame::Open { head, .. } => (OPEN, 0, 0, encode_open(head)),
            Frame::Request { part, .. } => {
                let (kind, flags, arg, body) = encode_part(part);
                (kind + REQUEST_MESSAGE, flags, arg, body)
            }
            Frame::HalfClose { .. } => (HALF_CLOSE, 0, 0, Bytes::new()),
            Frame::ResponseHead { head, .. } => (RESPONSE_HEAD, 0, 0, encode_response_head(head)),
            Frame::Response { part, .. } => {
                let (kind, flags, arg, body) = encode_part(part);
                (kind + RESPONSE_MESSAGE, flags, arg, body)
            }
            Frame::Status { status, .. } => (
                STATUS,
                0,
                status.code.as_i32() as u32,
                encode_status(status),
            ),
            Frame::Cancel { .. } => (CANCEL, 0, 0, Bytes::new()),
            Frame::Credit { bytes, .. } => (CREDIT, 0, *bytes, Bytes::new()),
            Frame::GoAway { .. } => (GO_AWAY, 0, 0, Bytes::new()),
        };
        let mut header = [0u8; HEADER_LEN];
        header[0] = kind;
        header[1] = flags;
        header[4..8].copy_from_slice(&arg.to_le_bytes());
        header[8..16].copy_from_slice(&self.call().to_le_bytes());
        (header, body)
    }

    /// Decode a frame from its header and body. Message payloads are slices of `body`.
    pub fn decode(header: &[u8], body: Bytes) -> Result<Frame, FrameError> {
        let header: &Header = header
            .try_into()
            .map_err(|_| FrameError::HeaderLength(header.len()))?;
        let (kind, flags) = (header[0], header[1]);
        let arg = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&header[8..16]);
        let call = u64::from_le_bytes(id);
        let empty = |frame: Frame| {
            if body.is_empty() {
                Ok(frame)
            } else {
                Err(FrameError::Trailing(body.len()))
            }
        };
        match kind {
            OPEN => Ok(Frame::Open {
                call,
                head: decode_open(body)?,
            }),
            REQUEST_MESSAGE..=REQUEST_FRAGMENT => Ok(Frame::Request {
                call,
                part: decode_part(kind - REQUEST_MESSAGE, flags, arg, body)?,
            }),
            HALF_CLOSE => empty(Frame::HalfClose { call }),
            RESPONSE_HEAD => Ok(Frame::ResponseHead {
                call,
                head: decode_response_head(body)?,
            }),
            RESPONSE_MESSAGE..=RESPONSE_FRAGMENT => Ok(Frame::Response {
                call,
                part: decode_part(kind - RESPONSE_MESSAGE, flags, arg, body)?,
            }),
            STATUS => Ok(Frame::Status {
                call,
                status: decode_status(arg, body)?,
            }),
            CANCEL => empty(Frame::Cancel { call }),
            CREDIT => empty(Frame::Credit { call, bytes: arg }),
            GO_AWAY => empty(Frame::GoAway { last: call }),
            other => Err(FrameError::Kind(other)),
        }
    }
}

/// Kind offset (0 message, 1 head, 2 fragment), flags, arg and body of a part.
fn encode_part(part: &Part) -> (u8, u8, u32, Bytes) {
    match part {
        Part::Message(m) => (0, compressed_flag(m.compressed), 0, m.data.clone()),
        Part::Head { compressed, len } => (1, compressed_flag(*compressed), *len, Bytes::new()),
        Part::Fragment { data, last } => (2, if *last { FLAG_LAST } else { 0 }, 0, data.clone()),
    }
}

fn compressed_flag(compressed: bool) -> u8 {
    if compressed {
        FLAG_COMPRESSED
    } else {
        0
    }
}

fn decode_part(offset: u8, flags: u8, arg: u32, body: Bytes) -> Result<Part, FrameError> {
    let compressed = flags & FLAG_COMPRESSED != 0;
    match offset {
        0 => Ok(Part::Message(Message {
            compressed,
            data: body,
        })),
        1 if body.is_empty() => Ok(Part::Head {
            compressed,
            len: arg,
        }),
        1 => Err(FrameError::Trailing(body.len())),
        _ if body.is_empty() => Err(FrameError::Invalid("empty fragment")),
        _ => Ok(Part::Fragment {
            data: body,
            last: flags & FLAG_LAST != 0,
        }),
    }
}

fn encode_open(head: &CallHead) -> Bytes {
    let mut buf = BytesMut::new();
    put_short_str(&mut buf, head.path.as_str());
    put_subtype(&mut buf, head.subtype.as_deref());
    match head.timeout {
        Some(t) => {
            buf.put_u8(1);
            buf.put_u64_le(u64::try_from(t.as_nanos()).unwrap_or(u64::MAX));
        }
        None => buf.put_u8(0),
    }
    buf.put_u64_le(head.max_message_size as u64);
    put_metadata(&mut buf, &head.metadata);
    buf.freeze()
}

fn decode_open(body: Bytes) -> Result<CallHead, FrameError> {
    let mut r = Reader::new(&body);
    let path = r.short_str("path")?;
    let path: http::uri::PathAndQuery = path.parse().map_err(|_| FrameError::Invalid("path"))?;
    let subtype = r.subtype()?;
    let timeout = match r.u8("timeout")? {
        0 => None,
        1 => Some(Duration::from_nanos(r.u64("timeout")?)),
        _ => return Err(FrameError::Invalid("timeout flag")),
    };
    let max_message_size = usize::try_from(r.u64("largest message")?)
        .map_err(|_| FrameError::Invalid("largest message"))?;
    let metadata = r.metadata()?;
    r.finish()?;
    Ok(CallHead {
        path,
        subtype,
        metadata,
        timeout,
        max_message_size,
    })
}

fn encode_response_head(head: &ResponseHead) -> Bytes {
    let mut buf = BytesMut::new();
    put_subtype(&mut buf, head.subtype.as_deref());
    put_metadata(&mut buf, &head.metadata);
    buf.freeze()
}

fn decode_response_head(body: Bytes) -> Result<ResponseHead, FrameError> {
    let mut r = Reader::new(&body);
    let subtype = r.subtype()?;
    let metadata = r.metadata()?;
    r.finish()?;
    Ok(ResponseHead { metadata, subtype })
}

fn encode_status(status: &Status) -> Bytes {
    let mut buf = BytesMut::new();
    put_long_bytes(&mut buf, status.message.as_bytes());
    match &status.details {
        Some(details) => {
            buf.put_u8(1);
            put_long_bytes(&mut buf, details);
        }
        None => buf.put_u8(0),
    }
    put_metadata(&mut buf, &status.metadata);
    buf.freeze()
}

fn decode_status(code: u32, body: Bytes) -> Result<Status, FrameError> {
    let code = i32::try_from(code)
        .ok()
        .and_then(Code::from_i32)
        .ok_or(FrameError::Invalid("status code"))?;
    let mut r = Reader::new(&body);
    let message = String::from_utf8(r.long_bytes("status message")?.to_vec())
        .map_err(|_| FrameError::Invalid("status message"))?;
    let details = match r.u8("details")? {
        0 => None,
        1 => Some(body.slice_ref(r.long_bytes("details")?)),
        _ => return Err(FrameError::Invalid("details flag")),
    };
    let metadata = r.metadata()?;
    r.finish()?;
    Ok(Status {
        code,
        message,
        details,
        metadata,
    })
}

fn put_short_str(buf: &mut BytesMut, s: &str) {
    // Paths and subtypes longer than 64 KiB are cut; nothing real comes near.
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    buf.put_u16_le(bytes.len() as u16);
    buf.put_slice(bytes);
}

fn put_subtype(buf: &mut BytesMut, subtype: Option<&str>) {
    match subtype {
        Some(s) => {
            buf.put_u8(1);
            put_short_str(buf, s);
        }
        None => buf.put_u8(0),
    }
}

fn put_long_bytes(buf: &mut BytesMut, b: &[u8]) {
    buf.put_u32_le(b.len() as u32);
    buf.put_slice(b);
}

fn put_metadata(buf: &mut BytesMut, metadata: &HeaderMap) {
    buf.put_u32_le(metadata.len() as u32);
    for (name, value) in metadata {
        put_short_str(buf, name.as_str());
        put_long_bytes(buf, value.as_bytes());
    }
}

/// A bounds-checked cursor over a frame body.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(body: &'a [u8]) -> Self {
        Self { rest: body }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
        if self.rest.len() < n {
            return Err(FrameError::Truncated(what));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(b))
    }

    fn short_bytes(&mut self, what: &'static str) -> Result<&'a [u8], FrameError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }

    fn long_bytes(&mut self, what: &'static str) -> Result<&'a [u8], FrameError> {
        let n = self.u32(what)?;
        let n = usize::try_from(n).map_err(|_| FrameError::Truncated(what))?;
        self.take(n, what)
    }

    fn short_str(&mut self, what: &'static str) -> Result<&'a str, FrameError> {
        std::str::from_utf8(self.short_bytes(what)?).map_err(|_| FrameError::Invalid(what))
    }

    fn subtype(&mut self) -> Result<Option<String>, FrameError> {
        match self.u8("subtype")? {
            0 => Ok(None),
            1 => Ok(Some(self.short_str("subtype")?.to_owned())),
            _ => Err(FrameError::Invalid("subtype flag")),
        }
    }

    fn metadata(&mut self) -> Result<HeaderMap, FrameError> {
        let count = self.u32("metadata")?;
        // Each entry takes at least 6 bytes: a count beyond that is a lie, caught before any
        // allocation is sized by it.
        if count as usize > self.rest.len() / 6 {
            return Err(FrameError::Truncated("metadata"));
        }
        let mut map = HeaderMap::with_capacity(count as usize);
        for _ in 0..count {
            let name = HeaderName::from_bytes(self.short_bytes("metadata name")?)
                .map_err(|_| FrameError::Invalid("metadata name"))?;
            let value = HeaderValue::from_bytes(self.long_bytes("metadata value")?)
                .map_err(|_| FrameError::Invalid("metadata value"))?;
            map.append(name, value);
        }
        Ok(map)
    }

    fn finish(self) -> Result<(), FrameError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Trailing(self.rest.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(frame: &Frame) -> Frame {
        let (header, body) = frame.encode();
        Frame::decode(&header, body).expect("a frame we encoded decodes")
    }

    fn head() -> CallHead {
        let mut metadata = HeaderMap::new();
        metadata.append("x-a", HeaderValue::from_static("1"));
        metadata.append("x-a", HeaderValue::from_static("2"));
        metadata.append("x-bin-bin", HeaderValue::from_static("AAEC"));
        CallHead {
            path: "/grpc.testing.TestService/UnaryCall".parse().expect("path"),
            subtype: Some("proto".into()),
            metadata,
            timeout: Some(Duration::from_millis(1500)),
            max_message_size: 4 << 20,
        }
    }

    #[test]
    fn open_keeps_the_whole_head() {
        let Frame::Open { call, head: got } = round_trip(&Frame::Open {
            call: 7,
            head: head(),
        }) else {
            panic!("an open frame")
        };
        let want = head();
        assert_eq!(call, 7);
        assert_eq!(got.path, want.path);
        assert_eq!(got.subtype, want.subtype);
        assert_eq!(got.metadata, want.metadata);
        assert_eq!(got.timeout, want.timeout);
        assert_eq!(got.max_message_size, want.max_message_size);
    }

    #[test]
    fn parts_statuses_and_control_frames_round_trip() {
        let parts = [
            Part::Message(Message {
                compressed: true,
                data: Bytes::from_static(b"hello"),
            }),
            Part::Message(Message::new(Bytes::new())),
            Part::Head {
                compressed: false,
                len: u32::MAX,
            },
            Part::Fragment {
                data: Bytes::from_static(b"xyz"),
                last: true,
            },
        ];
        for part in parts {
            let Frame::Request { part: got, call } = round_trip(&Frame::Request {
                call: 1,
                part: part.clone(),
            }) else {
                panic!("a request frame")
            };
            assert_eq!((call, &got), (1, &part));
            let Frame::Response { part: got, .. } = round_trip(&Frame::Response {
                call: 1,
                part: part.clone(),
            }) else {
                panic!("a response frame")
            };
            assert_eq!(got, part);
        }
        let mut status = Status::new(Code::ResourceExhausted, "too big ✗");
        status.details = Some(Bytes::from_static(b"\x08\x01"));
        status.metadata.insert("x-t", HeaderValue::from_static("v"));
        let Frame::Status { status: got, .. } = round_trip(&Frame::Status {
            call: u64::MAX,
            status: status.clone(),
        }) else {
            panic!("a status frame")
        };
        assert_eq!(got, status);
        assert!(matches!(
            round_trip(&Frame::Credit {
                call: 3,
                bytes: 65536
            }),
            Frame::Credit {
                call: 3,
                bytes: 65536
            }
        ));
        assert!(matches!(
            round_trip(&Frame::Cancel { call: 4 }),
            Frame::Cancel { call: 4 }
        ));
        assert!(matches!(
            round_trip(&Frame::HalfClose { call: 5 }),
            Frame::HalfClose { call: 5 }
        ));
        assert!(matches!(
            round_trip(&Frame::GoAway { last: 6 }),
            Frame::GoAway { last: 6 }
        ));
    }

    #[test]
    fn kinds_are_the_documented_numbers() {
        let head = Part::Head {
            compressed: true,
            len: 5,
        };
        let (header, _) = Frame::Request {
            call: 1,
            part: head.clone(),
        }
        .encode();
        assert_eq!((header[0], header[1]), (REQUEST_HEAD, FLAG_COMPRESSED));
        let (header, _) = Frame::Response {
            call: 1,
            part: head,
        }
        .encode();
        assert_eq!(header[0], RESPONSE_HEAD_PART);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(
            Frame::decode(&[0u8; 3], Bytes::new()).err(),
            Some(FrameError::HeaderLength(3))
        );
        let mut header = [0u8; HEADER_LEN];
        header[0] = 99;
        assert_eq!(
            Frame::decode(&header, Bytes::new()).err(),
            Some(FrameError::Kind(99))
        );
        header[0] = STATUS;
        header[4] = 17;
        assert!(Frame::decode(&header, Bytes::from_static(&[0; 9])).is_err());
        header[0] = REQUEST_FRAGMENT;
        assert_eq!(
            Frame::decode(&header, Bytes::new()).err(),
            Some(FrameError::Invalid("empty fragment"))
        );
        header[0] = CANCEL;
        assert_eq!(
            Frame::decode(&header, Bytes::from_static(b"x")).err(),
            Some(FrameError::Trailing(1))
        );
        // A metadata count far beyond the body.
        let (header, body) = Frame::ResponseHead {
            call: 1,
            head: ResponseHead::default(),
        }
        .encode();
        let mut body = body.to_vec();
        body[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            Frame::decode(&header, Bytes::from(body)).err(),
            Some(FrameError::Truncated("metadata"))
        );
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            kind in 0u8..16,
            rest in proptest::collection::vec(any::<u8>(), 15),
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut input = vec![kind];
            input.extend_from_slice(&rest);
            input.extend_from_slice(&body);
            crate::fuzzing::frame(&input);
        }

        #[test]
        fn encoded_frames_decode_and_cut_ones_fail_cleanly(
            path in "/[a-zA-Z.]{1,20}/[a-zA-Z]{1,10}",
            names in proptest::collection::vec("[a-z][a-z0-9-]{0,10}", 0..5),
            value in "[ -~]{0,30}",
            cut in any::<prop::sample::Index>(),
        ) {
            let mut metadata = HeaderMap::new();
            for name in &names {
                metadata.append(
                    HeaderName::from_bytes(name.as_bytes()).expect("name"),
                    HeaderValue::from_str(&value).expect("value"),
                );
            }
            let frame = Frame::Open {
                call: 9,
                head: CallHead {
                    path: path.parse().expect("path"),
                    subtype: None,
                    metadata: metadata.clone(),
                    timeout: None,
                    max_message_size: 1,
                },
            };
            let (header, body) = frame.encode();
            let Ok(Frame::Open { head, .. }) = Frame::decode(&header, body.clone()) else {
                panic!("round trip")
            };
            prop_assert_eq!(head.metadata, metadata);
            prop_assert_eq!(head.path.as_str(), path.as_str());
            let at = cut.index(body.len());
            prop_assert!(Frame::decode(&header, body.slice(..at)).is_err());
        }
    }
}
