//! Property tests: the codecs round-trip under arbitrary inputs and arbitrary chunking.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use pnp_wire::frame::{Frame, FrameBuf, FrameDecoder, FrameKind, Part};
use pnp_wire::text::{encode_padded, Base64Decoder, Base64Encoder};
use pnp_wire::{fuzzing, status, timeout, trailers};
use proptest::prelude::*;

/// Cut `data` at the given positions (taken modulo its length, in any order).
fn cut<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    points.push(0);
    points.push(data.len());
    points.sort_unstable();
    points.windows(2).map(|w| &data[w[0]..w[1]]).collect()
}

#[derive(Clone, Debug)]
enum Spec {
    Message(bool, Vec<u8>),
    Trailers(Vec<u8>),
}

fn frames() -> impl Strategy<Value = (Vec<Spec>, bool)> {
    let message = (
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(c, d)| Spec::Message(c, d));
    let trailers = proptest::collection::vec(any::<u8>(), 0..100).prop_map(Spec::Trailers);
    (
        proptest::collection::vec(message, 0..8),
        proptest::option::of(trailers),
    )
        .prop_map(|(mut specs, t)| {
            let has_trailers = t.is_some();
            specs.extend(t);
            (specs, has_trailers)
        })
}

/// Serialize through `Buf` methods the way a writer would: chunk() then advance().
fn drain(mut buf: FrameBuf, step: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while buf.has_remaining() {
        let chunk = buf.chunk();
        let n = chunk.len().min(step.max(1));
        out.extend_from_slice(&chunk[..n]);
        buf.advance(n);
    }
    out
}

/// Reassemble what `next_part` yields into whole frames, checking the fragment rules on the way:
/// a head is followed by fragments adding up to its length exactly, the last one marked, and
/// nothing longer than `threshold` arrives whole.
fn reassemble(parts: Vec<Part>, threshold: usize) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut open: Option<(bool, usize, BytesMut)> = None;
    for part in parts {
        match part {
            Part::Frame(frame) => {
                assert!(open.is_none(), "a whole frame inside a fragmented message");
                if let Frame::Message { data, .. } = &frame {
                    assert!(data.len() <= threshold, "a large message came whole");
                }
                frames.push(frame);
            }
            Part::Head { compressed, len } => {
                assert!(open.is_none(), "a head inside a fragmented message");
                assert!(
                    len as usize > threshold,
                    "a small message came in fragments"
                );
                open = Some((compressed, len as usize, BytesMut::new()));
            }
            Part::Fragment { data, last } => {
                let (compressed, len, mut buf) = open.take().expect("a fragment after a head");
                assert!(!data.is_empty(), "an empty fragment");
                buf.extend_from_slice(&data);
                assert!(buf.len() <= len, "fragments past the declared length");
                assert_eq!(
                    last,
                    buf.len() == len,
                    "`last` marks exactly the completing fragment"
                );
                if last {
                    frames.push(Frame::Message {
                        compressed,
                        data: buf.freeze(),
                    });
                } else {
                    open = Some((compressed, len, buf));
                }
            }
        }
    }
    assert!(open.is_none(), "the stream ended inside a message");
    frames
}

proptest! {
    #[test]
    fn any_split_decodes_to_the_same_messages_whole_or_in_fragments(
        (specs, has_trailers) in frames(),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
        threshold in 0usize..320,
        text in any::<bool>(),
        text_cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        let mut wire = Vec::new();
        for spec in &specs {
            let buf = match spec {
                Spec::Message(c, d) => FrameBuf::message(*c, Bytes::from(d.clone())),
                Spec::Trailers(b) => FrameBuf::trailers(Bytes::from(b.clone())),
            };
            wire.extend_from_slice(&buf.to_bytes());
        }
        // In text mode the bytes travel as base64, padded at arbitrary flush points, and are
        // decoded incrementally from arbitrary chunks before framing.
        let chunks: Vec<Bytes> = if text {
            let mut encoded = Vec::new();
            for piece in cut(&wire, &text_cuts) {
                encoded.extend_from_slice(&encode_padded(piece));
            }
            let mut decoder = Base64Decoder::new();
            let mut out = Vec::new();
            for chunk in cut(&encoded, &cuts) {
                let mut decoded = BytesMut::new();
                decoder.decode(chunk, &mut decoded).expect("valid base64");
                out.push(decoded.freeze());
            }
            decoder.finish().expect("complete base64");
            out
        } else {
            cut(&wire, &cuts).into_iter().map(Bytes::copy_from_slice).collect()
        };
        let kind = if has_trailers { FrameKind::GrpcWebResponse } else { FrameKind::Grpc };
        let mut whole = FrameDecoder::new(kind, 300);
        let mut fragmenting = FrameDecoder::new(kind, 300).with_fragments(threshold);
        let mut frames = Vec::new();
        let mut parts = Vec::new();
        for chunk in chunks {
            whole.push(chunk.clone());
            fragmenting.push(chunk);
            while let Some(frame) = whole.next_frame().expect("valid stream") {
                frames.push(frame);
            }
            while let Some(part) = fragmenting.next_part().expect("valid stream") {
                parts.push(part);
            }
            // Fragments are passed on as they arrive: what is held back is at most one
            // header or one small frame, not a large message.
            prop_assert!(fragmenting.buffered_len() <= threshold.max(300) + 5);
        }
        prop_assert_eq!(whole.finish(), Ok(()));
        prop_assert_eq!(fragmenting.finish(), Ok(()));
        prop_assert_eq!(reassemble(parts, threshold), frames.clone());
        let expected: Vec<Frame> = specs.iter().map(|spec| match spec {
            Spec::Message(c, d) => Frame::Message { compressed: *c, data: Bytes::from(d.clone()) },
            Spec::Trailers(b) => Frame::Trailers { compressed: false, block: Bytes::from(b.clone()) },
        }).collect();
        prop_assert_eq!(frames, expected);
    }

    #[test]
    fn frames_round_trip_under_any_chunking(
        (specs, has_trailers) in frames(),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
        step in 1usize..64,
    ) {
        let mut wire = Vec::new();
        for spec in &specs {
            let buf = match spec {
                Spec::Message(c, d) => FrameBuf::message(*c, Bytes::from(d.clone())),
                Spec::Trailers(b) => FrameBuf::trailers(Bytes::from(b.clone())),
            };
            prop_assert_eq!(buf.to_bytes().len(), buf.remaining());
            wire.extend(drain(buf, step));
        }
        let kind = if has_trailers { FrameKind::GrpcWebResponse } else { FrameKind::Grpc };
        let mut decoder = FrameDecoder::new(kind, 300);
        let mut got = Vec::new();
        for chunk in cut(&wire, &cuts) {
            decoder.push(Bytes::copy_from_slice(chunk));
            while let Some(frame) = decoder.next_frame().expect("valid stream") {
                got.push(frame);
            }
        }
        prop_assert_eq!(decoder.finish(), Ok(()));
        prop_assert_eq!(decoder.buffered_len(), 0);
        prop_assert_eq!(got.len(), specs.len());
        for (frame, spec) in got.iter().zip(&specs) {
            match (frame, spec) {
                (Frame::Message { compressed, data }, Spec::Message(c, d)) => {
                    prop_assert_eq!(compressed, c);
                    prop_assert_eq!(&data[..], &d[..]);
                }
                (Frame::Trailers { compressed, block }, Spec::Trailers(b)) => {
                    prop_assert!(!compressed);
                    prop_assert_eq!(&block[..], &b[..]);
                }
                _ => prop_assert!(false, "frame kind mismatch"),
            }
        }
    }

    #[test]
    fn base64_flush_groups_round_trip_under_any_split(
        data in proptest::collection::vec(any::<u8>(), 0..500),
        groups in proptest::collection::vec(any::<usize>(), 0..10),
        flushes in proptest::collection::vec(any::<bool>(), 10),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
    ) {
        // Each sender flush is padded separately, as PROTOCOL-WEB allows.
        let mut padded = Vec::new();
        let mut incremental = Vec::new();
        let mut encoder = Base64Encoder::new();
        for (i, group) in cut(&data, &groups).into_iter().enumerate() {
            padded.extend_from_slice(&encode_padded(group));
            incremental.extend_from_slice(&encoder.encode(group));
            if flushes[i % flushes.len()] {
                incremental.extend_from_slice(&encoder.flush());
            }
        }
        incremental.extend_from_slice(&encoder.flush());
        for text in [padded, incremental] {
            let mut decoder = Base64Decoder::new();
            let mut out = BytesMut::new();
            for chunk in cut(&text, &cuts) {
                decoder.decode(chunk, &mut out).expect("valid text");
            }
            prop_assert_eq!(decoder.finish(), Ok(()));
            prop_assert_eq!(&out[..], &data[..]);
        }
    }

    #[test]
    fn timeout_encoding_is_never_shorter(secs in 0u64..=99_999_999 * 3600, nanos in 0u32..1_000_000_000) {
        let d = Duration::new(secs, nanos).min(Duration::from_secs(99_999_999 * 3600));
        let encoded = timeout::encode(d);
        prop_assert!(encoded.len() <= 9);
        let parsed = timeout::parse(encoded.as_bytes()).expect("valid timeout");
        prop_assert!(parsed >= d, "{:?} -> {} -> {:?}", d, encoded, parsed);
    }

    #[test]
    fn timeout_encoding_of_small_durations(nanos in 0u64..10_000_000_000_000) {
        let d = Duration::from_nanos(nanos);
        let parsed = timeout::parse(timeout::encode(d).as_bytes()).expect("valid timeout");
        prop_assert!(parsed >= d);
    }

    #[test]
    fn trailer_block_round_trip(
        entries in proptest::collection::vec(("[a-z0-9][a-z0-9_.-]{0,15}", "([!-~]([ -~]{0,20}[!-~])?)?"), 0..10),
    ) {
        let mut map = HeaderMap::new();
        for (k, v) in &entries {
            let name = HeaderName::from_bytes(k.as_bytes()).expect("valid name");
            map.append(name, HeaderValue::from_str(v).expect("valid value"));
        }
        let block = trailers::encode_block(&map);
        prop_assert_eq!(trailers::decode_block(&block), Ok(map.clone()));
        // The "key: value" style with bare LF parses to the same map.
        let first_colon_only: Vec<String> = String::from_utf8(block.to_vec())
            .expect("ascii")
            .lines()
            .map(|l| l.replacen(':', ": ", 1))
            .collect();
        prop_assert_eq!(trailers::decode_block(first_colon_only.join("\n").as_bytes()), Ok(map));
    }

    #[test]
    fn grpc_message_round_trip(msg in any::<String>()) {
        let encoded = status::encode_message(&msg);
        prop_assert!(encoded.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        prop_assert_eq!(status::decode_message(encoded.as_bytes()), msg);
    }

    #[test]
    fn decode_message_never_fails(v in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = status::decode_message(&v);
    }

    #[test]
    fn fuzz_bodies_hold_on_random_input(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        fuzzing::frame_decoder(&data);
        fuzzing::text_decoder(&data);
        fuzzing::trailer_block(&data);
        fuzzing::grpc_timeout(&data);
    }

    #[test]
    fn fuzz_frame_body_on_well_formed_streams((specs, _) in frames(), ctl in any::<u8>()) {
        let mut data = vec![ctl | 0x0e]; // no size limit: exercise the success path
        for spec in &specs {
            let buf = match spec {
                Spec::Message(c, d) => FrameBuf::message(*c, Bytes::from(d.clone())),
                Spec::Trailers(b) => FrameBuf::trailers(Bytes::from(b.clone())),
            };
            data.extend_from_slice(&buf.to_bytes());
        }
        fuzzing::frame_decoder(&data);
    }
}
