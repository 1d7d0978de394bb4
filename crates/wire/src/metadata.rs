//! Binary (`-bin`) metadata values.
//!
//! PROTOCOL-HTTP2 "Custom-Metadata": a key ending in `-bin` carries arbitrary bytes as base64.
//! "Implementations MUST accept padded and un-padded values and should emit un-padded values."

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::{DecodeError, Engine as _};
use bytes::Bytes;

/// Standard alphabet, padding optional, non-zero trailing bits tolerated (other gRPC
/// implementations emit them rarely, and rejecting a peer's metadata over them helps nobody).
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Why a binary metadata value is not base64.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BinaryValueError {
    /// A byte outside the standard base64 alphabet.
    #[error("invalid byte {byte:#04x} at offset {offset} in binary metadata value")]
    InvalidByte {
        /// Offset in the value.
        offset: usize,
        /// The byte.
        byte: u8,
    },
    /// The value's length is impossible for base64 (one character past a quantum).
    #[error("invalid base64 length in binary metadata value")]
    InvalidLength,
    /// Padding in the wrong place or of the wrong amount.
    #[error("invalid base64 padding in binary metadata value")]
    InvalidPadding,
}

impl From<DecodeError> for BinaryValueError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::InvalidByte(offset, byte)
            | DecodeError::InvalidLastSymbol(offset, byte) => {
                BinaryValueError::InvalidByte { offset, byte }
            }
            DecodeError::InvalidLength(_) => BinaryValueError::InvalidLength,
            DecodeError::InvalidPadding => BinaryValueError::InvalidPadding,
        }
    }
}

/// Keys ending in `-bin` (any case) carry base64 binary values.
pub fn is_binary_key(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 4 && b[b.len() - 4..].eq_ignore_ascii_case(b"-bin")
}

/// Decode a binary value; accepts padded and unpadded standard base64.
pub fn decode_binary(v: &[u8]) -> Result<Bytes, BinaryValueError> {
    Ok(Bytes::from(LENIENT.decode(v)?))
}

/// Encode a binary value, unpadded.
pub fn encode_binary(v: &[u8]) -> String {
    STANDARD_NO_PAD.encode(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_keys() {
        assert!(is_binary_key("grpc-status-details-bin"));
        assert!(is_binary_key("x-trace-BIN"));
        assert!(is_binary_key("-bin"));
        assert!(!is_binary_key("bin"));
        assert!(!is_binary_key("x-binary"));
        assert!(!is_binary_key("x-bin-x"));
        assert!(!is_binary_key("☺bin"));
    }

    #[test]
    fn padded_and_unpadded() {
        assert_eq!(decode_binary(b"AQI="), Ok(Bytes::from_static(&[1, 2])));
        assert_eq!(decode_binary(b"AQI"), Ok(Bytes::from_static(&[1, 2])));
        assert_eq!(decode_binary(b"AQ=="), Ok(Bytes::from_static(&[1])));
        assert_eq!(decode_binary(b"AQ"), Ok(Bytes::from_static(&[1])));
        assert_eq!(decode_binary(b""), Ok(Bytes::new()));
        assert_eq!(decode_binary(b"AQID"), Ok(Bytes::from_static(&[1, 2, 3])));
    }

    #[test]
    fn trailing_bits_are_tolerated() {
        assert_eq!(decode_binary(b"AR"), Ok(Bytes::from_static(&[1])));
    }

    #[test]
    fn errors() {
        assert_eq!(
            decode_binary(b"AQ!D"),
            Err(BinaryValueError::InvalidByte {
                offset: 2,
                byte: b'!'
            })
        );
        assert_eq!(decode_binary(b"A"), Err(BinaryValueError::InvalidLength));
        assert!(
            decode_binary(b"A-_B").is_err(),
            "URL-safe alphabet is not standard"
        );
    }

    #[test]
    fn emits_unpadded() {
        assert_eq!(encode_binary(&[1]), "AQ");
        assert_eq!(encode_binary(&[1, 2]), "AQI");
        assert_eq!(encode_binary(&[1, 2, 3]), "AQID");
        assert_eq!(encode_binary(&[]), "");
    }
}
