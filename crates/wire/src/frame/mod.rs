//! gRPC length-prefixed message frames and the gRPC-Web trailer frame.
//!
//! PROTOCOL-HTTP2 "Length-Prefixed-Message": one flag byte (`Compressed-Flag`), a 4-byte
//! big-endian length, then the payload. PROTOCOL-WEB adds the trailer frame: the most
//! significant bit of the flag byte marks a frame whose payload is an HTTP/1-style header block
//! carrying the trailers, and it must be the last frame of a response.

mod buf;
mod decoder;

pub use buf::{FrameBuf, PayloadTooLarge};
pub use decoder::{FrameDecoder, Part};

use bytes::Bytes;

/// Length of the frame header: one flag byte and a 4-byte big-endian payload length.
pub const HEADER_LEN: usize = 5;

/// Flag bit: the payload is compressed with the call's `grpc-encoding` (PROTOCOL-HTTP2).
pub const FLAG_COMPRESSED: u8 = 0x01;

/// Flag bit: a gRPC-Web trailer frame (PROTOCOL-WEB); `0x81` is a compressed trailer frame.
pub const FLAG_TRAILERS: u8 = 0x80;

/// Which flag bytes a decoder accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// Native gRPC, and gRPC-Web requests: only `0x00` and `0x01`.
    Grpc,
    /// gRPC-Web responses: also the trailer frame `0x80` / `0x81`, which must be the last frame.
    GrpcWebResponse,
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A message; `data` is the payload exactly as on the wire (still compressed if `compressed`).
    Message {
        /// The compressed flag was set.
        compressed: bool,
        /// The payload.
        data: Bytes,
    },
    /// A gRPC-Web trailer frame; `block` is the raw header block (see [`crate::trailers`]).
    Trailers {
        /// The compressed flag was set (`0x81`).
        compressed: bool,
        /// The raw trailer block, still compressed if `compressed`.
        block: Bytes,
    },
}

/// Why a byte stream is not a valid sequence of frames.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The flag byte has bits set that this [`FrameKind`] does not allow.
    #[error("invalid frame flags {0:#04x}")]
    InvalidFlags(u8),
    /// The declared payload length exceeds the configured limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared payload length from the header.
        len: u32,
        /// The configured limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes left in the decoder.
        buffered: usize,
    },
    /// Bytes followed the gRPC-Web trailer frame.
    #[error("data after the gRPC-Web trailer frame")]
    FrameAfterTrailers,
}
