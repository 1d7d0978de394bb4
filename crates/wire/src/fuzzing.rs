//! Bodies of the fuzz targets in `crates/wire/fuzz/`, kept here so that ordinary `cargo test`
//! replays the committed corpus through exactly the code the fuzzer runs.
//!
//! Each function takes arbitrary bytes, must never panic on its own account, and asserts the
//! codec's invariants; an assertion failure is a bug in the codec. Where an input is split into
//! chunks, the split points are drawn from the input itself, so a saved input replays exactly.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::frame::{Frame, FrameBuf, FrameDecoder, FrameError, FrameKind, HEADER_LEN};
use crate::status::Status;
use crate::text::{encode_padded, Base64Decoder, Base64Encoder, TextError};
use crate::{timeout, trailers};

/// Frame decoder: the first byte picks the kind (bit 0), the size limit (bits 1–3) and the
/// chunking seed (bits 4–7); the rest is the stream.
///
/// Invariants: decoding the stream in one chunk and in seeded chunks gives the same frames and
/// the same error; every message is within the limit; re-encoding the frames reproduces the
/// stream's prefix they came from (all of it when decoding succeeded); trailer frames only in
/// gRPC-Web responses, and last.
pub fn frame_decoder(data: &[u8]) {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let kind = if ctl & 1 == 0 {
        FrameKind::Grpc
    } else {
        FrameKind::GrpcWebResponse
    };
    const LIMITS: [usize; 8] = [0, 1, 4, 16, 64, 256, 4096, usize::MAX];
    let max = LIMITS[usize::from((ctl >> 1) & 7)];

    let whole = run_frame_decoder(kind, max, &[stream]);
    let chunked = run_frame_decoder(kind, max, &split(ctl >> 4, stream));
    assert_eq!(whole, chunked, "chunking changed the decoding");

    let (frames, end) = whole;
    let mut encoded = Vec::with_capacity(stream.len());
    for (i, frame) in frames.iter().enumerate() {
        match frame {
            Frame::Message { compressed, data } => {
                assert!(data.len() <= max, "message over the limit");
                encoded.extend_from_slice(&FrameBuf::message(*compressed, data.clone()).to_bytes());
            }
            Frame::Trailers { compressed, block } => {
                assert_eq!(
                    kind,
                    FrameKind::GrpcWebResponse,
                    "trailers in a gRPC stream"
                );
                assert_eq!(i + 1, frames.len(), "trailers not last");
                assert!(block.len() <= max, "trailer block over the limit");
                let buf = FrameBuf::trailers(block.clone()).to_bytes();
                encoded.push(if *compressed { buf[0] | 1 } else { buf[0] });
                encoded.extend_from_slice(&buf[1..]);
            }
        }
    }
    assert!(
        stream.starts_with(&encoded),
        "re-encoding differs from input"
    );
    match end {
        Ok(()) => assert_eq!(encoded.len(), stream.len(), "bytes left after success"),
        Err(FrameError::Truncated { buffered }) => {
            assert!(buffered > 0 && encoded.len() + buffered == stream.len());
        }
        Err(_) => assert!(encoded.len() < stream.len()),
    }
}

type FrameRun = (Vec<Frame>, Result<(), FrameError>);

fn run_frame_decoder(kind: FrameKind, max: usize, chunks: &[&[u8]]) -> FrameRun {
    let mut decoder = FrameDecoder::new(kind, max);
    let mut frames = Vec::new();
    let (mut pushed, mut consumed) = (0usize, 0usize);
    for chunk in chunks {
        decoder.push(Bytes::copy_from_slice(chunk));
        pushed += chunk.len();
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    consumed += HEADER_LEN + frame_payload_len(&frame);
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(e) => {
                    assert_eq!(decoder.next_frame(), Err(e.clone()), "error not sticky");
                    assert_eq!(decoder.finish(), Err(e.clone()), "finish forgot the error");
                    return (frames, Err(e));
                }
            }
            assert_eq!(consumed + decoder.buffered_len(), pushed);
        }
        assert_eq!(consumed + decoder.buffered_len(), pushed);
    }
    (frames, decoder.finish())
}

fn frame_payload_len(frame: &Frame) -> usize {
    match frame {
        Frame::Message { data, .. } => data.len(),
        Frame::Trailers { block, .. } => block.len(),
    }
}

/// Base64 text mode: the first byte seeds the chunking; the rest is used twice.
///
/// As text: decoding in one chunk and in seeded chunks gives the same bytes and the same
/// error, and success implies whole quanta. As binary: encoding it with the incremental
/// encoder (flushing at seeded points) or with `encode_padded` per seeded group, then
/// decoding under seeded splits, gives it back.
pub fn text_decoder(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };

    let whole = run_text_decoder(&[rest]);
    let chunked = run_text_decoder(&split(ctl, rest));
    assert_eq!(whole, chunked, "chunking changed the decoding");
    if let (out, Ok(())) = &whole {
        assert_eq!(rest.len() % 4, 0, "accepted a partial quantum");
        assert!(out.len() <= rest.len() / 4 * 3);
    }

    let groups = split(ctl.rotate_left(3), rest);
    let mut encoder = Base64Encoder::new();
    let mut incremental = Vec::new();
    let mut padded = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        incremental.extend_from_slice(&encoder.encode(group));
        assert!(encoder.pending() < 3);
        if (usize::from(ctl) + i).is_multiple_of(3) {
            incremental.extend_from_slice(&encoder.flush());
        }
        padded.extend_from_slice(&encode_padded(group));
    }
    incremental.extend_from_slice(&encoder.flush());
    for text in [incremental, padded] {
        assert_eq!(text.len() % 4, 0, "encoder left a partial quantum");
        let (out, end) = run_text_decoder(&split(ctl ^ 0xa5, &text));
        assert_eq!(end, Ok(()), "encoder output rejected");
        assert_eq!(out, rest, "base64 round trip differs");
    }
}

fn run_text_decoder(chunks: &[&[u8]]) -> (Vec<u8>, Result<(), TextError>) {
    let mut decoder = Base64Decoder::new();
    let mut out = BytesMut::new();
    for chunk in chunks {
        if let Err(e) = decoder.decode(chunk, &mut out) {
            assert_eq!(decoder.finish(), Err(e.clone()), "error not sticky");
            return (out.to_vec(), Err(e));
        }
        assert!(decoder.pending() < 4);
    }
    (out.to_vec(), decoder.finish())
}

/// Trailer block: a block that parses re-encodes to one that parses to the same map, and
/// re-encoding that is a fixed point; the status read from it survives `to_headers`.
pub fn trailer_block(data: &[u8]) {
    let Ok(map) = trailers::decode_block(data) else {
        return;
    };
    let encoded = trailers::encode_block(&map);
    let again = trailers::decode_block(&encoded).expect("re-encoded block must parse");
    assert_eq!(again, map, "trailer round trip differs");
    assert_eq!(
        trailers::encode_block(&again),
        encoded,
        "encoding not a fixed point"
    );
    if let Some(status) = Status::from_headers(&map) {
        let round = Status::from_headers(&status.to_headers());
        assert_eq!(round.as_ref(), Some(&status), "status round trip differs");
    }
}

/// `grpc-timeout`: an accepted value is 2–9 bytes and re-encodes to the same duration; and
/// any duration built from the input's first 12 bytes encodes to a valid value that is never
/// shorter (clamped only beyond `99999999H`).
pub fn grpc_timeout(data: &[u8]) {
    if let Ok(d) = timeout::parse(data) {
        assert!((2..=9).contains(&data.len()));
        let encoded = timeout::encode(d);
        assert_eq!(timeout::parse(encoded.as_bytes()), Ok(d), "{encoded}");
    }

    let mut raw = [0u8; 12];
    let n = data.len().min(12);
    raw[..n].copy_from_slice(&data[..n]);
    let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3] = raw;
    let secs = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    // Spread the seconds over the whole range so short inputs still cover every unit.
    let secs = secs >> (secs % 64);
    let nanos = u32::from_le_bytes([n0, n1, n2, n3]) % 1_000_000_000;
    let d = Duration::new(secs, nanos);
    let encoded = timeout::encode(d);
    assert!(encoded.len() <= 9, "{encoded}");
    let parsed = timeout::parse(encoded.as_bytes()).expect("encoded timeout must parse");
    let longest = Duration::from_secs(99_999_999 * 3600);
    if d <= longest {
        assert!(parsed >= d, "{d:?} encoded as shorter {encoded}");
    } else {
        assert_eq!(parsed, longest);
    }
}

/// Split `data` into chunks whose lengths (0 to 64, mostly small) come from a generator seeded
/// by `seed` and the data's length.
fn split(seed: u8, data: &[u8]) -> Vec<&[u8]> {
    let mut state = (u64::from(seed) << 32 | data.len() as u64) ^ 0x9e37_79b9_7f4a_7c15;
    let mut chunks = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        // xorshift64*: deterministic, no dependency.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32;
        let len = if r.is_multiple_of(8) { r % 65 } else { r % 6 };
        let len = usize::try_from(len).unwrap_or(0).min(rest.len());
        let (chunk, tail) = rest.split_at(len);
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_the_input_in_order() {
        let data: Vec<u8> = (0..=255).collect();
        for seed in 0..=255 {
            assert_eq!(split(seed, &data).concat(), data);
        }
        assert!(split(7, &[]).is_empty());
    }

    #[test]
    fn bodies_accept_empty_and_tiny_inputs() {
        for data in [&b""[..], b"\x00", b"\x01\x80", b"\xff\xff\xff"] {
            frame_decoder(data);
            text_decoder(data);
            trailer_block(data);
            grpc_timeout(data);
        }
    }
}
