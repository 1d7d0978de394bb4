//! Encoded frames as a [`bytes::Buf`] that never copies the payload.

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

use super::{FLAG_COMPRESSED, FLAG_TRAILERS, HEADER_LEN};

/// An encoded frame ready to write: the 5-byte header followed by the payload, as a
/// [`bytes::Buf`] whose [`chunks_vectored`](Buf::chunks_vectored) yields both parts, so a
/// vectored write sends the payload straight from the caller's `Bytes`.
///
/// [`FrameBuf::raw`] makes one with no header, for bytes that are already encoded (text mode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameBuf {
    header: [u8; HEADER_LEN],
    /// Position of the first unsent header byte; `HEADER_LEN` when the header is gone.
    header_pos: usize,
    payload: Bytes,
}

/// A payload longer than the 4-byte length prefix can express (PROTOCOL-HTTP2 `Message-Length`
/// is a 32-bit unsigned integer).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("payload of {len} bytes does not fit a gRPC frame (at most 4294967295 bytes)")]
pub struct PayloadTooLarge {
    /// The payload's length.
    pub len: usize,
}

impl FrameBuf {
    /// A message frame, flag `0x00`, or `0x01` when `compressed`.
    ///
    /// # Panics
    /// If `payload` is longer than `u32::MAX` bytes; use [`try_message`](Self::try_message)
    /// when the length is not already bounded (payloads from [`super::FrameDecoder`] are).
    pub fn message(compressed: bool, payload: Bytes) -> Self {
        match Self::try_message(compressed, payload) {
            Ok(buf) => buf,
            Err(e) => panic!("{e}"),
        }
    }

    /// A message frame, or an error if the payload is too long for the length prefix.
    pub fn try_message(compressed: bool, payload: Bytes) -> Result<Self, PayloadTooLarge> {
        let flags = if compressed { FLAG_COMPRESSED } else { 0 };
        Self::with_header(flags, payload)
    }

    /// A gRPC-Web trailer frame, flag `0x80`, carrying an uncompressed trailer block.
    ///
    /// # Panics
    /// If `block` is longer than `u32::MAX` bytes; see [`try_trailers`](Self::try_trailers).
    pub fn trailers(block: Bytes) -> Self {
        match Self::try_trailers(block) {
            Ok(buf) => buf,
            Err(e) => panic!("{e}"),
        }
    }

    /// A gRPC-Web trailer frame, or an error if the block is too long for the length prefix.
    pub fn try_trailers(block: Bytes) -> Result<Self, PayloadTooLarge> {
        Self::with_header(FLAG_TRAILERS, block)
    }

    /// Only the header of a message frame of `len` payload bytes, for a message whose payload
    /// follows in fragments (each sent with [`raw`](Self::raw)).
    pub fn head(compressed: bool, len: u32) -> Self {
        let flags = if compressed { FLAG_COMPRESSED } else { 0 };
        let [a, b, c, d] = len.to_be_bytes();
        Self {
            header: [flags, a, b, c, d],
            header_pos: 0,
            payload: Bytes::new(),
        }
    }

    /// Bytes with no frame header.
    pub fn raw(bytes: Bytes) -> Self {
        Self {
            header: [0; HEADER_LEN],
            header_pos: HEADER_LEN,
            payload: bytes,
        }
    }

    /// Copies what remains into one contiguous `Bytes` (for tests and text mode).
    pub fn to_bytes(&self) -> Bytes {
        if self.header_pos == HEADER_LEN {
            return self.payload.clone();
        }
        let mut out = BytesMut::with_capacity(self.remaining());
        out.extend_from_slice(&self.header[self.header_pos..]);
        out.extend_from_slice(&self.payload);
        out.freeze()
    }

    fn with_header(flags: u8, payload: Bytes) -> Result<Self, PayloadTooLarge> {
        let len =
            u32::try_from(payload.len()).map_err(|_| PayloadTooLarge { len: payload.len() })?;
        let [a, b, c, d] = len.to_be_bytes();
        Ok(Self {
            header: [flags, a, b, c, d],
            header_pos: 0,
            payload,
        })
    }
}

impl Buf for FrameBuf {
    fn remaining(&self) -> usize {
        (HEADER_LEN - self.header_pos) + self.payload.len()
    }

    fn chunk(&self) -> &[u8] {
        if self.header_pos < HEADER_LEN {
            &self.header[self.header_pos..]
        } else {
            &self.payload
        }
    }

    fn advance(&mut self, mut cnt: usize) {
        let from_header = cnt.min(HEADER_LEN - self.header_pos);
        self.header_pos += from_header;
        cnt -= from_header;
        // Like `Bytes::advance`, advancing past the end is a caller bug and panics.
        self.payload.advance(cnt);
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        if self.header_pos < HEADER_LEN {
            let Some(slot) = dst.get_mut(n) else {
                return n;
            };
            *slot = IoSlice::new(&self.header[self.header_pos..]);
            n += 1;
        }
        if !self.payload.is_empty() {
            let Some(slot) = dst.get_mut(n) else {
                return n;
            };
            *slot = IoSlice::new(&self.payload);
            n += 1;
        }
        n
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        if self.header_pos == HEADER_LEN {
            // Header already sent: hand out a slice of the payload, no copy.
            return self.payload.split_to(len);
        }
        // Like `Bytes::copy_to_bytes`, copying past the end is a caller bug and panics.
        assert!(len <= self.remaining(), "cannot copy past `remaining`");
        let mut out = BytesMut::with_capacity(len);
        let mut left = len;
        while left > 0 {
            let chunk = self.chunk();
            let k = chunk.len().min(left);
            out.extend_from_slice(&chunk[..k]);
            self.advance(k);
            left -= k;
        }
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_header_and_payload() {
        let b = FrameBuf::message(false, Bytes::from_static(b"abc"));
        assert_eq!(&b.to_bytes()[..], b"\x00\x00\x00\x00\x03abc");
        let c = FrameBuf::message(true, Bytes::from_static(b""));
        assert_eq!(&c.to_bytes()[..], b"\x01\x00\x00\x00\x00");
        assert_eq!(c.remaining(), 5);
    }

    #[test]
    fn trailers_header() {
        let b = FrameBuf::trailers(Bytes::from_static(b"grpc-status:0\r\n"));
        assert_eq!(&b.to_bytes()[..5], b"\x80\x00\x00\x00\x0f");
    }

    #[test]
    fn raw_has_no_header() {
        let mut b = FrameBuf::raw(Bytes::from_static(b"AAAA"));
        assert_eq!(b.remaining(), 4);
        assert_eq!(b.chunk(), b"AAAA");
        assert_eq!(b.copy_to_bytes(2), Bytes::from_static(b"AA"));
        assert_eq!(b.to_bytes(), Bytes::from_static(b"AA"));
    }

    #[test]
    fn advance_across_header_and_payload() {
        let mut b = FrameBuf::message(false, Bytes::from_static(b"hello"));
        b.advance(3);
        assert_eq!(b.chunk(), b"\x00\x05");
        assert_eq!(b.remaining(), 7);
        b.advance(4);
        assert_eq!(b.chunk(), b"llo");
        assert_eq!(&b.to_bytes()[..], b"llo");
        b.advance(3);
        assert_eq!(b.remaining(), 0);
        assert!(!b.has_remaining());
    }

    #[test]
    fn chunks_vectored_returns_both_parts() {
        let b = FrameBuf::message(true, Bytes::from_static(b"xyz"));
        let mut slots = [IoSlice::new(&[]); 4];
        assert_eq!(b.chunks_vectored(&mut slots), 2);
        assert_eq!(&*slots[0], b"\x01\x00\x00\x00\x03");
        assert_eq!(&*slots[1], b"xyz");
        let mut one = [IoSlice::new(&[])];
        assert_eq!(b.chunks_vectored(&mut one), 1);
        assert_eq!(b.chunks_vectored(&mut []), 0);
        let empty = FrameBuf::message(false, Bytes::new());
        assert_eq!(empty.chunks_vectored(&mut slots), 1);
    }

    #[test]
    fn copy_to_bytes_spanning_header() {
        let mut b = FrameBuf::message(false, Bytes::from_static(b"hello"));
        assert_eq!(&b.copy_to_bytes(7)[..], b"\x00\x00\x00\x00\x05he");
        let rest = b.copy_to_bytes(3);
        assert_eq!(&rest[..], b"llo");
    }

    #[test]
    fn payload_slice_is_not_copied() {
        let payload = Bytes::from_static(b"payload");
        let mut b = FrameBuf::message(false, payload.clone());
        b.advance(HEADER_LEN);
        assert_eq!(b.copy_to_bytes(7).as_ptr(), payload.as_ptr());
    }
}
