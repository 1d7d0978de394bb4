//! Body of the fuzz target in `crates/ucx/fuzz/`, kept here so that ordinary `cargo test`
//! replays the committed corpus through exactly the code the fuzzer runs.
#![forbid(unsafe_code)]

use bytes::Bytes;

use crate::frame::{Frame, HEADER_LEN};

/// Frame decoder: the first [`HEADER_LEN`] bytes are the header (fewer: all of them), the rest
/// the body.
///
/// Invariants: decoding never panics; a decoded frame belongs to the call its header names;
/// encoding it and decoding that again succeeds and encodes to the same bytes (a canonical
/// form), and a body cut short of that encoding fails to decode unless the frame has no body.
pub fn frame(data: &[u8]) {
    let (header, body) = data.split_at(data.len().min(HEADER_LEN));
    let Ok(frame) = Frame::decode(header, Bytes::copy_from_slice(body)) else {
        return;
    };
    let mut id = [0u8; 8];
    id.copy_from_slice(&header[8..16]);
    assert_eq!(frame.call(), u64::from_le_bytes(id), "the call id moved");
    let (h1, b1) = frame.encode();
    let again = Frame::decode(&h1, b1.clone()).expect("an encoded frame decodes");
    let (h2, b2) = again.encode();
    assert_eq!((h1, &b1), (h2, &b2), "encoding is not canonical");
    let structured = matches!(
        again,
        Frame::Open { .. } | Frame::ResponseHead { .. } | Frame::Status { .. }
    );
    if structured && !b1.is_empty() {
        assert!(
            Frame::decode(&h1, b1.slice(..b1.len() - 1)).is_err(),
            "a cut body decoded"
        );
    }
}
