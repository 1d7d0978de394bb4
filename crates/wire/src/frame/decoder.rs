//! Incremental, zero-copy frame decoder.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

use super::{Frame, FrameError, FrameKind, FLAG_COMPRESSED, FLAG_TRAILERS, HEADER_LEN};

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
            chunks: VecDeque::new(),
            buffered: 0,
            saw_trailers: false,
            error: None,
        }
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
        if self.buffered == 0 {
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

    fn decode_one(&mut self) -> Result<Option<Frame>, FrameError> {
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
        let payload_len = match usize::try_from(len) {
            Ok(n) if n <= self.max_message_len => n,
            _ => {
                return Err(FrameError::TooLarge {
                    len,
                    max: self.max_message_len,
                })
            }
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
