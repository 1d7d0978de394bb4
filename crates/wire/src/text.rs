//! Incremental base64 for `application/grpc-web-text`.
//!
//! PROTOCOL-WEB "Text-encoded (response) streams": the body is base64 of the binary frame
//! stream, and "each flush … is base64 encoded separately" with its own padding, so padding
//! may appear at any 4-character boundary in the middle of the stream, not only at its end.
//! A proxy also receives the text in arbitrary network chunks, so the decoder keeps the 0–3
//! characters of an unfinished quantum between calls.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};

/// Why a text-mode body is not valid base64. Offsets count bytes from the start of the stream.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TextError {
    /// A byte outside the standard base64 alphabet (whitespace included).
    #[error("invalid base64 byte {byte:#04x} at offset {offset}")]
    InvalidByte {
        /// Offset in the stream.
        offset: u64,
        /// The byte.
        byte: u8,
    },
    /// `=` before the third character of a quantum, or a data character after `=` in the same
    /// quantum.
    #[error("misplaced base64 padding at offset {offset}")]
    MisplacedPadding {
        /// Offset in the stream of the offending character.
        offset: u64,
    },
    /// The stream ended inside a 4-character quantum.
    #[error("base64 stream ended inside a quantum ({pending} characters pending)")]
    Truncated {
        /// Characters of the unfinished quantum.
        pending: usize,
    },
}

const INVALID: u8 = 0xff;
const PAD: u8 = 0xfe;

/// Standard alphabet (RFC 4648 section 4) to 6-bit values; `PAD` for '=', `INVALID` otherwise.
const DECODE: [u8; 256] = {
    let mut t = [INVALID; 256];
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut i = 0;
    while i < 64 {
        t[alphabet[i] as usize] = i as u8;
        i += 1;
    }
    t[b'=' as usize] = PAD;
    t
};

/// Incremental base64 decoder for `application/grpc-web-text` bodies.
///
/// Input may be split at any byte. Padding may close any 4-character quantum, after which
/// decoding continues (`"AA==AAA=AAAA"` is three flushes). Non-zero bits left over in a padded
/// quantum are ignored, as most decoders do. Errors are sticky.
#[derive(Clone, Debug, Default)]
pub struct Base64Decoder {
    /// 6-bit values of the current quantum's data characters.
    quantum: [u8; 4],
    /// Characters of the current quantum seen so far, padding included.
    len: u8,
    /// `=` characters in the current quantum.
    pads: u8,
    /// Bytes consumed before the current `decode` input.
    offset: u64,
    error: Option<TextError>,
}

impl Base64Decoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decode as much of `input` as possible, appending the bytes to `out`; keeps an
    /// unfinished quantum (fewer than 4 characters) for the next call.
    ///
    /// On error, `out` holds the bytes of every quantum completed before the bad character.
    pub fn decode(&mut self, input: &[u8], out: &mut BytesMut) -> Result<(), TextError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        out.reserve((usize::from(self.len) + input.len()) / 4 * 3);
        let result = self.decode_inner(input, out);
        if let Err(e) = &result {
            self.error = Some(e.clone());
        }
        self.offset += input.len() as u64;
        result
    }

    /// End of input: an error if a quantum is unfinished (or an earlier error).
    pub fn finish(&self) -> Result<(), TextError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        match self.len {
            0 => Ok(()),
            n => Err(TextError::Truncated {
                pending: usize::from(n),
            }),
        }
    }

    /// Characters of an unfinished quantum held for the next call (0–3).
    pub fn pending(&self) -> usize {
        usize::from(self.len)
    }

    fn decode_inner(&mut self, input: &[u8], out: &mut BytesMut) -> Result<(), TextError> {
        let mut i = 0;
        while i < input.len() {
            // Fast path: whole quanta of data characters at a quantum boundary.
            if self.len == 0 {
                while let Some(&[a, b, c, d]) = input.get(i..i + 4) {
                    let (a, b, c, d) = (
                        DECODE[usize::from(a)],
                        DECODE[usize::from(b)],
                        DECODE[usize::from(c)],
                        DECODE[usize::from(d)],
                    );
                    if (a | b | c | d) & 0xc0 != 0 {
                        break; // padding or an invalid byte: take the careful path
                    }
                    out.extend_from_slice(&[a << 2 | b >> 4, b << 4 | c >> 2, c << 6 | d]);
                    i += 4;
                }
                if i == input.len() {
                    break;
                }
            }
            let byte = input[i];
            let offset = self.offset + i as u64;
            match DECODE[usize::from(byte)] {
                INVALID => return Err(TextError::InvalidByte { offset, byte }),
                PAD => {
                    // RFC 4648 section 3.2: padding only completes a quantum that has at least
                    // two data characters ("xx==" or "xxx=").
                    if self.len < 2 {
                        return Err(TextError::MisplacedPadding { offset });
                    }
                    self.pads += 1;
                    self.len += 1;
                }
                v => {
                    // Data after '=' inside one quantum ("xx=x").
                    if self.pads > 0 {
                        return Err(TextError::MisplacedPadding { offset });
                    }
                    self.quantum[usize::from(self.len)] = v;
                    self.len += 1;
                }
            }
            if self.len == 4 {
                let [a, b, c, d] = self.quantum;
                let bytes = [a << 2 | b >> 4, b << 4 | c >> 2, c << 6 | d];
                // PROTOCOL-WEB: a padded quantum ends one flush; the next starts fresh.
                out.extend_from_slice(&bytes[..usize::from(3 - self.pads)]);
                self.quantum = [0; 4];
                self.len = 0;
                self.pads = 0;
            }
            i += 1;
        }
        Ok(())
    }
}

/// Encode one flushed chunk, padded, so the receiver can decode it as soon as it arrives.
pub fn encode_padded(input: &[u8]) -> Bytes {
    Bytes::from(STANDARD.encode(input))
}

/// Incremental base64 encoder: [`encode`](Self::encode) emits whole quanta and carries the
/// 0–2 byte remainder; [`flush`](Self::flush) emits the remainder padded, ending a quantum so
/// the receiver can decode everything sent so far.
#[derive(Clone, Debug, Default)]
pub struct Base64Encoder {
    rem: [u8; 2],
    rem_len: usize,
}

impl Base64Encoder {
    /// An encoder with nothing carried.
    pub fn new() -> Self {
        Self::default()
    }

    /// Encode `input` after the carried bytes; returns unpadded whole quanta (maybe empty).
    pub fn encode(&mut self, mut input: &[u8]) -> Bytes {
        let total = self.rem_len + input.len();
        let mut out = String::with_capacity(total / 3 * 4);
        if self.rem_len > 0 {
            if total < 3 {
                self.rem[self.rem_len..total].copy_from_slice(input);
                self.rem_len = total;
                return Bytes::new();
            }
            let take = 3 - self.rem_len;
            let mut first = [0u8; 3];
            first[..self.rem_len].copy_from_slice(&self.rem[..self.rem_len]);
            first[self.rem_len..].copy_from_slice(&input[..take]);
            STANDARD.encode_string(first, &mut out);
            input = &input[take..];
            self.rem_len = 0;
        }
        let whole = input.len() / 3 * 3;
        STANDARD.encode_string(&input[..whole], &mut out);
        let tail = &input[whole..];
        self.rem[..tail.len()].copy_from_slice(tail);
        self.rem_len = tail.len();
        Bytes::from(out)
    }

    /// Emit the carried bytes, padded (empty if nothing is carried).
    pub fn flush(&mut self) -> Bytes {
        let out = encode_padded(&self.rem[..self.rem_len]);
        self.rem_len = 0;
        out
    }

    /// Bytes carried for the next quantum (0–2).
    pub fn pending(&self) -> usize {
        self.rem_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(parts: &[&[u8]]) -> Result<Vec<u8>, TextError> {
        let mut d = Base64Decoder::new();
        let mut out = BytesMut::new();
        for p in parts {
            d.decode(p, &mut out)?;
        }
        d.finish()?;
        Ok(out.to_vec())
    }

    #[test]
    fn padding_mid_stream() {
        assert_eq!(decode_all(&[b"AA==AAA=AAAA"]), Ok(vec![0, 0, 0, 0, 0, 0]));
        assert_eq!(decode_all(&[b"aGk=", b"dGhlcmU="]), Ok(b"hithere".to_vec()));
    }

    #[test]
    fn any_split() {
        let text = b"AA==AAA=AAAAaGVsbG8gd29ybGQ=";
        let want = decode_all(&[text]).expect("valid");
        for i in 0..=text.len() {
            for j in i..=text.len() {
                let got = decode_all(&[&text[..i], &text[i..j], &text[j..]]);
                assert_eq!(got.as_ref(), Ok(&want), "split at {i},{j}");
            }
        }
    }

    #[test]
    fn pending_and_truncated() {
        let mut d = Base64Decoder::new();
        let mut out = BytesMut::new();
        d.decode(b"aGVsb", &mut out).expect("valid");
        assert_eq!(&out[..], b"hel");
        assert_eq!(d.pending(), 1);
        assert_eq!(d.finish(), Err(TextError::Truncated { pending: 1 }));
        d.decode(b"G8=", &mut out).expect("valid");
        assert_eq!(&out[..], b"hello");
        assert_eq!(d.finish(), Ok(()));
        assert_eq!(
            decode_all(&[b"AA="]),
            Err(TextError::Truncated { pending: 3 })
        );
    }

    #[test]
    fn invalid_bytes_with_offsets() {
        assert_eq!(
            decode_all(&[b"AAAA", b"AA!A"]),
            Err(TextError::InvalidByte {
                offset: 6,
                byte: b'!'
            })
        );
        assert_eq!(
            decode_all(&[b"AAAA\n"]),
            Err(TextError::InvalidByte {
                offset: 4,
                byte: b'\n'
            })
        );
        assert_eq!(
            decode_all(&[b"AA-_"]),
            Err(TextError::InvalidByte {
                offset: 2,
                byte: b'-'
            })
        );
    }

    #[test]
    fn misplaced_padding() {
        assert_eq!(
            decode_all(&[b"="]),
            Err(TextError::MisplacedPadding { offset: 0 })
        );
        assert_eq!(
            decode_all(&[b"AAAAA==="]),
            Err(TextError::MisplacedPadding { offset: 5 })
        );
        assert_eq!(
            decode_all(&[b"AA=A"]),
            Err(TextError::MisplacedPadding { offset: 3 })
        );
        assert_eq!(
            decode_all(&[b"AA==", b"="]),
            Err(TextError::MisplacedPadding { offset: 4 })
        );
    }

    #[test]
    fn errors_are_sticky() {
        let mut d = Base64Decoder::new();
        let mut out = BytesMut::new();
        assert!(d.decode(b"A!", &mut out).is_err());
        assert!(d.decode(b"AAAA", &mut out).is_err());
        assert!(d.finish().is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn trailing_bits_are_ignored() {
        assert_eq!(decode_all(&[b"AB=="]), Ok(vec![0]));
    }

    #[test]
    fn encode_padded_chunks() {
        assert_eq!(encode_padded(b""), Bytes::new());
        assert_eq!(encode_padded(&[0]), Bytes::from_static(b"AA=="));
        assert_eq!(encode_padded(b"hi"), Bytes::from_static(b"aGk="));
    }

    #[test]
    fn incremental_encoder_carries_remainder() {
        let mut e = Base64Encoder::new();
        assert_eq!(e.encode(b"h"), Bytes::new());
        assert_eq!(e.pending(), 1);
        assert_eq!(e.encode(b"e"), Bytes::new());
        assert_eq!(e.encode(b"llo w"), Bytes::from_static(b"aGVsbG8g"));
        assert_eq!(e.pending(), 1);
        assert_eq!(e.flush(), Bytes::from_static(b"dw=="));
        assert_eq!(e.flush(), Bytes::new());
        assert_eq!(e.encode(b"abc"), Bytes::from_static(b"YWJj"));
        assert_eq!(e.pending(), 0);
        assert_eq!(e.encode(b""), Bytes::new());
    }
}
