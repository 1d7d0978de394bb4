//! Incremental, zero-copy frame decoder.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

use super::{Frame, FrameError, FrameKind, FLAG_COMPRESSED, FLAG_TRAILERS, HEADER_LEN};

/// One piece of a frame stream as [`FrameDecoder::next_part`] yields it: a frame in one piece,
/// or a large message as a head and fragments, so it can be forwarded before it is complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// A whole frame: a message no longer than the fragment threshold, or a trailer frame.
    Frame(Frame),
    /// The start of a message longer than the threshold: its flag and its declared length,
    /// already checked against the limit.
    Head {
        /// The compressed flag was set.
        compressed: bool,
        /// The payload length the header declared.
        len: u32,
    },
    /// The next bytes of the message begun by the last [`Part::Head`]; never empty. The
    /// fragments of a message add up to its declared length exactly.
    Fragment {
        /// The bytes, a slice of a pushed chunk (never copied).
        data: Bytes,
        /// This fragment completes the message.
        last: bool,
    },
}

/// Incremental frame decoder.
///
/// [`push`](Self::push) chunks as they arrive, split anywhere, and pull frames with
/// [`next_frame`](Self::next_frame) until it returns `Ok(None)`. A payload that lies inside one
/// pushed chunk is returned as a slice of that chunk; one that spans chunks is copied once into
/// a buffer of exactly its length, allocated only when the whole payload has arrived.
///
/// The declared length is checked against `max_message_len` as soon as the 5-byte header is
/// complete, before anything is allocated for the payload, so a hostile length prefix costs
/// nothing. The limit applies to the wire size (compressed size for compressed frames) of
/// messages and trailer frames alike.
///
/// Errors are sticky: once `next_frame` fails it keeps returning the same error.
#[derive(Debug)]
pub struct FrameDecoder {
    kind: FrameKind,
    max_message_len: usize,
    /// Messages longer than this come out of `next_part` as a head and fragments.
    fragment_threshold: usize,
    /// Payload bytes of the fragmented message still to come; 0 outside one.
    in_message: usize,
    /// Its declared length, for the error when the stream ends inside it.
    message_len: usize,
    chunks: VecDeque<Bytes>,
    buffered: usize,
    saw_trailers: bool,
    error: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder that accepts the flags of `kind` and payloads up to `max_message_len` bytes.
    pub fn new(kind: FrameKind, max_message_len: usize) -> Self {
        Self {
            kind,
            max_message_len,
            fragment_threshold: usize::MAX,
            in_message: 0,
            message_len: 0,
            chunks: VecDeque::new(),
            buffered: 0,
            saw_trailers: false,
            error: None,
        }
    }

    /// Let [`next_part`](Self::next_part) pass messages longer than `threshold` bytes on in
    /// fragments as their bytes arrive, instead of buffering them whole: memory is then bounded
    /// by the threshold and the chunks pushed, not by the message size.
    pub fn with_fragments(mut self, threshold: usize) -> Self {
        self.fragment_threshold = threshold;
        self
    }

    /// The next part: a whole frame, the head of a large message, or its next fragment;
    /// `Ok(None)` if more bytes are needed. Do not mix with [`next_frame`](Self::next_frame).
    pub fn next_part(&mut self) -> Result<Option<Part>, FrameError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let result = self.decode_part();
        if let Err(e) = &result {
            self.error = Some(e.clone());
        }
        result
    }

    /// Whether a fragmented message has begun and not yet ended.
    pub fn in_message(&self) -> bool {
        self.in_message > 0
    }

    /// Append received bytes. Never fails; problems surface from [`next_frame`](Self::next_frame).
    ///
    /// Drain `next_frame` after every push: that is what bounds buffering to one frame within
    /// the limit plus one chunk, since an oversized header is reported on the first pull.
    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.buffered += chunk.len();
        self.chunks.push_back(chunk);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let result = self.decode_one();
        if let Err(e) = &result {
            self.error = Some(e.clone());
        }
        result
    }

    /// Call at end of stream, after `next_frame` returned `Ok(None)`.
    ///
    /// `Err(Truncated)` if bytes of an unfinished frame are buffered, `Err(FrameAfterTrailers)`
    /// if bytes follow a trailer frame, or the error `next_frame` already returned.
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.in_message > 0 {
            Err(FrameError::Truncated {
                buffered: self.message_len - self.in_message + self.buffered,
            })
        } else if self.buffered == 0 {
            Ok(())
        } else if self.saw_trailers {
            Err(FrameError::FrameAfterTrailers)
        } else {
            Err(FrameError::Truncated {
                buffered: self.buffered,
            })
        }
    }

    /// Bytes pushed but not yet returned as frames.
    pub fn buffered_len(&self) -> usize {
        self.buffered
    }

    /// A gRPC-Web trailer frame has been returned; nothing may follow it.
    pub fn saw_trailers(&self) -> bool {
        self.saw_trailers
    }

    /// The next frame's header, validated: its flags, whether it is a trailer frame, and its
    /// payload length (within the limit); `None` until the header is complete.
    fn header(&self) -> Result<Option<(u8, bool, usize)>, FrameError> {
        let Some(&flags) = self.chunks.front().and_then(|c| c.first()) else {
            return Ok(None);
        };
        if self.saw_trailers {
            // PROTOCOL-WEB: the trailer frame terminates the response body.
            return Err(FrameError::FrameAfterTrailers);
        }
        // Judge the flag byte as soon as it arrives, not when the header is complete.
        let trailers = match (self.kind, flags) {
            // PROTOCOL-HTTP2: Compressed-Flag is %x00 or %x01; other values are not defined.
            (_, 0x00) | (_, FLAG_COMPRESSED) => false,
            // PROTOCOL-WEB: the MSB marks the trailer frame; responses only. The remaining
            // reserved bits must still be zero.
            (FrameKind::GrpcWebResponse, f) if f & !FLAG_COMPRESSED == FLAG_TRAILERS => true,
            _ => return Err(FrameError::InvalidFlags(flags)),
        };
        let Some(header) = self.peek_header() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        // Check the declared length before buffering or allocating anything for the payload.
        match usize::try_from(len) {
            Ok(n) if n <= self.max_message_len => Ok(Some((flags, trailers, n))),
            _ => Err(FrameError::TooLarge {
                len,
                max: self.max_message_len,
            }),
        }
    }

    fn decode_one(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some((flags, trailers, payload_len)) = self.header()? else {
            return Ok(None);
        };
        if self.buffered - HEADER_LEN < payload_len {
            return Ok(None);
        }
        self.discard(HEADER_LEN);
        let data = self.take(payload_len);
        let compressed = flags & FLAG_COMPRESSED != 0;
        if trailers {
            self.saw_trailers = true;
            Ok(Some(Frame::Trailers {
                compressed,
                block: data,
            }))
        } else {
            Ok(Some(Frame::Message { compressed, data }))
        }
    }

    fn decode_part(&mut self) -> Result<Option<Part>, FrameError> {
        if self.in_message > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return Ok(None);
            };
            let n = front.len().min(self.in_message);
            let data = if n == front.len() {
                self.chunks.pop_front().unwrap_or_default()
            } else {
                front.split_to(n)
            };
            self.buffered -= n;
            self.in_message -= n;
            return Ok(Some(Part::Fragment {
                data,
                last: self.in_message == 0,
            }));
        }
        let Some((flags, trailers, payload_len)) = self.header()? else {
            return Ok(None);
        };
        if trailers || payload_len <= self.fragment_threshold {
            return Ok(self.decode_one()?.map(Part::Frame));
        }
        self.discard(HEADER_LEN);
        self.in_message = payload_len;
        self.message_len = payload_len;
        Ok(Some(Part::Head {
            compressed: flags & FLAG_COMPRESSED != 0,
            // Within the limit, which came from a u32 on the wire.
            len: u32::try_from(payload_len).unwrap_or(u32::MAX),
        }))
    }

    fn peek_header(&self) -> Option<[u8; HEADER_LEN]> {
        if self.buffered < HEADER_LEN {
            return None;
        }
        let mut header = [0u8; HEADER_LEN];
        let mut filled = 0;
        for chunk in &self.chunks {
            let n = chunk.len().min(HEADER_LEN - filled);
            header[filled..filled + n].copy_from_slice(&chunk[..n]);
            filled += n;
            if filled == HEADER_LEN {
                return Some(header);
            }
        }
        None
    }

    /// Drop `n` buffered bytes; callers ensure `n <= self.buffered`.
    fn discard(&mut self, mut n: usize) {
        self.buffered -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if front.len() > n {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.chunks.pop_front();
        }
    }

    /// Remove the next `n` buffered bytes; callers ensure `n <= self.buffered`.
    fn take(&mut self, n: usize) -> Bytes {
        if n == 0 {
            return Bytes::new();
        }
        if let Some(front) = self.chunks.front_mut() {
            // Zero-copy: the payload lies inside one chunk.
            if front.len() > n {
                self.buffered -= n;
                return front.split_to(n);
            }
            if front.len() == n {
                self.buffered -= n;
                return self.chunks.pop_front().unwrap_or_default();
            }
        }
        // Spans chunks: copy once into a buffer of exactly the payload's length.
        let mut out = BytesMut::with_capacity(n);
        let mut left = n;
        while left > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let k = front.len().min(left);
            out.extend_from_slice(&front[..k]);
            left -= k;
            if k == front.len() {
                self.chunks.pop_front();
            } else {
                front.advance(k);
            }
        }
        self.buffered -= n - left;
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![flags];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn msg(compressed: bool, data: &'static [u8]) -> Frame {
        Frame::Message {
            compressed,
            data: Bytes::from_static(data),
        }
    }

    #[test]
    fn large_messages_come_as_a_head_and_zero_copy_fragments() {
        let mut d = FrameDecoder::new(FrameKind::Grpc, 1 << 20).with_fragments(4);
        let mut bytes = frame(0, b"abc");
        bytes.extend(frame(1, b"0123456789"));
        bytes.extend(frame(0, b"xyz"));
        let all = Bytes::from(bytes);
        // The big message arrives in two chunks, split inside its payload.
        d.push(all.slice(..15));
        assert_eq!(d.next_part(), Ok(Some(Part::Frame(msg(false, b"abc")))));
        assert_eq!(
            d.next_part(),
            Ok(Some(Part::Head {
                compressed: true,
                len: 10
            }))
        );
        let Ok(Some(Part::Fragment { data, last: false })) = d.next_part() else {
            panic!("a first fragment")
        };
        assert_eq!(&data[..], b"01");
        assert_eq!(data.as_ptr(), all[13..].as_ptr(), "fragments are slices");
        assert_eq!(d.next_part(), Ok(None));
        assert!(d.in_message());
        assert!(matches!(
            d.finish(),
            Err(FrameError::Truncated { buffered: 2 })
        ));
        d.push(all.slice(15..));
        assert_eq!(
            d.next_part(),
            Ok(Some(Part::Fragment {
                data: Bytes::from_static(b"23456789"),
                last: true
            }))
        );
        assert_eq!(d.next_part(), Ok(Some(Part::Frame(msg(false, b"xyz")))));
        assert_eq!(d.next_part(), Ok(None));
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn a_large_header_over_the_limit_fails_before_any_fragment() {
        let mut d = FrameDecoder::new(FrameKind::Grpc, 8).with_fragments(4);
        d.push(Bytes::from(frame(0, b"0123456789")));
        assert!(matches!(
            d.next_part(),
            Err(FrameError::TooLarge { len: 10, max: 8 })
        ));
    }

    #[test]
    fn empty_decoder_is_done() {
        let mut d = FrameDecoder::new(FrameKind::Grpc, 16);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.finish(), Ok(()));
        assert_eq!(d.buffered_len(), 0);
    }

    #[test]
    fn decodes_messages_in_one_chunk_zero_copy() {
        let mut bytes = frame(0, b"hello");
        bytes.extend(frame(1, b"zip"));
        bytes.extend(frame(0, b""));
        let chunk = Bytes::from(bytes);
        let base = chunk.as_ptr() as usize;
        let mut d = FrameDecoder::new(FrameKind::Grpc, 16);
        d.push(chunk);
        let Some(Frame::Message { data, .. }) = d.next_frame().expect("valid") else {
            panic!("expected a message")
        };
        assert_eq!(&data[..], b"hello");
        assert_eq!(data.as_ptr() as usize, base + 5, "payload must be a slice");
        assert_eq!(d.next_frame(), Ok(Some(msg(true, b"zip"))));
        assert_eq!(d.next_frame(), Ok(Some(msg(false, b""))));
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn whole_chunk_payload_is_returned_without_copy() {
        let payload = Bytes::from_static(b"abc");
        let mut d = FrameDecoder::new(FrameKind::Grpc, 16);
        d.push(Bytes::from(frame(0, b"abc")[..HEADER_LEN].to_vec()));
        d.push(payload.clone());
        let Some(Frame::Message { data, .. }) = d.next_frame().expect("valid") else {
            panic!("expected a message")
        };
        assert_eq!(data.as_ptr(), payload.as_ptr());
        assert_eq!(d.buffered_len(), 0);
    }

    #[test]
    fn byte_at_a_time() {
        let bytes = frame(1, b"split me");
        let mut d = FrameDecoder::new(FrameKind::Grpc, 16);
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(d.next_frame(), Ok(None));
            if i > 0 {
                assert_eq!(d.finish(), Err(FrameError::Truncated { buffered: i }));
            }
            d.push(Bytes::copy_from_slice(&[*b]));
        }
        assert_eq!(d.next_frame(), Ok(Some(msg(true, b"split me"))));
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn too_large_is_reported_as_soon_as_the_header_is_complete() {
        let mut d = FrameDecoder::new(FrameKind::Grpc, 4);
        d.push(Bytes::from_static(&[0, 0xff, 0xff]));
        assert_eq!(d.next_frame(), Ok(None));
        d.push(Bytes::from_static(&[0xff, 0xff]));
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge {
                len: u32::MAX,
                max: 4
            })
        );
        // Sticky.
        assert!(d.next_frame().is_err());
        assert!(d.finish().is_err());
    }

    #[test]
    fn limit_is_inclusive() {
        let mut d = FrameDecoder::new(FrameKind::Grpc, 4);
        d.push(Bytes::from(frame(0, b"four")));
        assert_eq!(d.next_frame(), Ok(Some(msg(false, b"four"))));
        d.push(Bytes::from(frame(0, b"five!")));
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge { len: 5, max: 4 }));
    }

    #[test]
    fn grpc_kind_rejects_trailer_and_reserved_flags() {
        for flags in [0x02u8, 0x04, 0x7f, 0x80, 0x81, 0xff] {
            let mut d = FrameDecoder::new(FrameKind::Grpc, 16);
            // Only the flag byte: rejected without waiting for the length.
            d.push(Bytes::copy_from_slice(&[flags]));
            assert_eq!(d.next_frame(), Err(FrameError::InvalidFlags(flags)));
        }
    }

    #[test]
    fn web_kind_rejects_reserved_flags() {
        for flags in [0x02u8, 0x40, 0x82, 0xc0, 0xff] {
            let mut d = FrameDecoder::new(FrameKind::GrpcWebResponse, 16);
            d.push(Bytes::from(frame(flags, b"")));
            assert_eq!(d.next_frame(), Err(FrameError::InvalidFlags(flags)));
        }
    }

    #[test]
    fn web_trailers_frame() {
        let mut bytes = frame(0, b"m");
        bytes.extend(frame(0x80, b"grpc-status:0\r\n"));
        let mut d = FrameDecoder::new(FrameKind::GrpcWebResponse, 64);
        d.push(Bytes::from(bytes));
        assert_eq!(d.next_frame(), Ok(Some(msg(false, b"m"))));
        assert!(!d.saw_trailers());
        assert_eq!(
            d.next_frame(),
            Ok(Some(Frame::Trailers {
                compressed: false,
                block: Bytes::from_static(b"grpc-status:0\r\n")
            }))
        );
        assert!(d.saw_trailers());
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn compressed_trailers_frame() {
        let mut d = FrameDecoder::new(FrameKind::GrpcWebResponse, 64);
        d.push(Bytes::from(frame(0x81, b"xx")));
        assert_eq!(
            d.next_frame(),
            Ok(Some(Frame::Trailers {
                compressed: true,
                block: Bytes::from_static(b"xx")
            }))
        );
    }

    #[test]
    fn anything_after_trailers_is_an_error() {
        let mut d = FrameDecoder::new(FrameKind::GrpcWebResponse, 64);
        d.push(Bytes::from(frame(0x80, b"")));
        assert!(matches!(d.next_frame(), Ok(Some(Frame::Trailers { .. }))));
        d.push(Bytes::from_static(&[0]));
        assert_eq!(d.finish(), Err(FrameError::FrameAfterTrailers));
        assert_eq!(d.next_frame(), Err(FrameError::FrameAfterTrailers));
    }

    #[test]
    fn truncated_payload() {
        let mut d = FrameDecoder::new(FrameKind::Grpc, 64);
        d.push(Bytes::from(frame(0, b"abcdef")[..8].to_vec()));
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.buffered_len(), 8);
        assert_eq!(d.finish(), Err(FrameError::Truncated { buffered: 8 }));
    }

    #[test]
    fn payload_spanning_chunks_is_copied_exactly() {
        let bytes = frame(0, b"abcdefgh");
        let mut d = FrameDecoder::new(FrameKind::Grpc, 64);
        d.push(Bytes::from(bytes[..7].to_vec()));
        d.push(Bytes::from(bytes[7..10].to_vec()));
        d.push(Bytes::from(bytes[10..].to_vec()));
        assert_eq!(d.next_frame(), Ok(Some(msg(false, b"abcdefgh"))));
        assert_eq!(d.buffered_len(), 0);
    }

    #[test]
    fn empty_chunks_are_ignored() {
        let mut d = FrameDecoder::new(FrameKind::Grpc, 64);
        d.push(Bytes::new());
        assert_eq!(d.buffered_len(), 0);
        assert_eq!(d.next_frame(), Ok(None));
    }
}
