//! Where things are in a ring: the header words, the record header and the checksum.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "PNPRING\0"
//!      8     8  version (1)
//!     16     8  header length (256): the data area starts here
//!     24     8  capacity of the data area in bytes (a power of two)
//!     64     8  write position      ┐ the writer's cache line: byte positions count up from 0
//!     72     8  writer epoch        │ and never wrap (2^64 bytes); offset = position % capacity
//!     80     8  next sequence       │ seq of the next record, valid when seq position ==
//!     88     8  sequence position   ┘ write position (see `spsc::Producer::attach`)
//!    128     8  read position       ┐ the reader's cache line
//!    136     8  reader epoch        │
//!    144     8  reader heartbeat    ┘ bumped while the reader waits, so a writer can see it live
//!    256     …  data area: records back to back, wrapping at the end (split copies)
//! ```
//!
//! A record is a 24-byte header and its payload, with no padding; both may wrap around the end
//! of the data area:
//!
//! ```text
//!  0  u32 payload length   4  u32 CRC-32 (of the length, sequence, epoch and payload)
//!  8  u64 sequence        16  u64 writer epoch        24  payload
//! ```
//!
//! All integers are little-endian in the data area; the header words are native atomics (the
//! two processes share one machine).

#![forbid(unsafe_code)]

/// `"PNPRING\0"` read as a little-endian `u64`.
pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"PNPRING\0");
/// The layout version this build reads and writes.
pub(crate) const VERSION: u64 = 1;
/// Bytes before the data area.
pub(crate) const HEADER_LEN: usize = 256;
/// Bytes before a record's payload.
pub const RECORD_HEADER_LEN: usize = 24;
/// The smallest data area (one record header, with room for a payload).
pub const MIN_CAPACITY: usize = 64;
/// The largest data area: 1 GiB.
pub const MAX_CAPACITY: usize = 1 << 30;

/// A 64-bit word of the ring's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Word {
    Magic,
    Version,
    HeaderLen,
    Capacity,
    WritePos,
    WriterEpoch,
    NextSeq,
    SeqPos,
    ReadPos,
    ReaderEpoch,
    ReaderHeartbeat,
}

impl Word {
    /// Every word, for regions that keep them in an array.
    #[cfg(loom)]
    pub(crate) const ALL: [Word; 11] = [
        Word::Magic,
        Word::Version,
        Word::HeaderLen,
        Word::Capacity,
        Word::WritePos,
        Word::WriterEpoch,
        Word::NextSeq,
        Word::SeqPos,
        Word::ReadPos,
        Word::ReaderEpoch,
        Word::ReaderHeartbeat,
    ];

    /// The word's byte offset in the header (a multiple of 8).
    pub(crate) const fn offset(self) -> usize {
        match self {
            Word::Magic => 0,
            Word::Version => 8,
            Word::HeaderLen => 16,
            Word::Capacity => 24,
            Word::WritePos => 64,
            Word::WriterEpoch => 72,
            Word::NextSeq => 80,
            Word::SeqPos => 88,
            Word::ReadPos => 128,
            Word::ReaderEpoch => 136,
            Word::ReaderHeartbeat => 144,
        }
    }

    /// The word's index in [`Word::ALL`].
    #[cfg(loom)]
    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

/// Whether `capacity` is a data-area size this crate accepts.
pub(crate) fn valid_capacity(capacity: u64) -> bool {
    capacity.is_power_of_two() && capacity >= MIN_CAPACITY as u64 && capacity <= MAX_CAPACITY as u64
}

/// A record's header as it sits in the data area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub(crate) len: u32,
    pub(crate) crc: u32,
    pub(crate) seq: u64,
    pub(crate) epoch: u64,
}

impl RecordHeader {
    /// The header of a record carrying `payload`, with its checksum.
    pub(crate) fn new(seq: u64, epoch: u64, payload: &[u8]) -> RecordHeader {
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let mut header = RecordHeader {
            len,
            crc: 0,
            seq,
            epoch,
        };
        header.crc = header.checksum(payload);
        header
    }

    /// The CRC-32 of the sequence, the epoch, the length and the payload.
    pub(crate) fn checksum(&self, payload: &[u8]) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&self.len.to_le_bytes());
        hasher.update(&self.seq.to_le_bytes());
        hasher.update(&self.epoch.to_le_bytes());
        hasher.update(payload);
        hasher.finalize()
    }

    pub(crate) fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut bytes = [0; RECORD_HEADER_LEN];
        bytes[0..4].copy_from_slice(&self.len.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.crc.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.seq.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        bytes
    }

    pub(crate) fn decode(bytes: &[u8; RECORD_HEADER_LEN]) -> RecordHeader {
        let word4 = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let word8 = |at: usize| {
            let mut b = [0; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        RecordHeader {
            len: word4(0),
            crc: word4(4),
            seq: word8(8),
            epoch: word8(16),
        }
    }

    /// Header and payload bytes.
    pub(crate) fn total_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_header_round_trips_and_checks_its_payload() {
        let header = RecordHeader::new(7, 3, b"hello");
        let decoded = RecordHeader::decode(&header.encode());
        assert_eq!(decoded, header);
        assert_eq!(decoded.checksum(b"hello"), decoded.crc);
        assert_ne!(decoded.checksum(b"hellp"), decoded.crc);
        assert_eq!(decoded.total_len(), 29);
    }

    #[test]
    fn header_words_do_not_overlap_and_stay_in_the_header() {
        let mut offsets: Vec<usize> = [
            Word::Magic,
            Word::Version,
            Word::HeaderLen,
            Word::Capacity,
            Word::WritePos,
            Word::WriterEpoch,
            Word::NextSeq,
            Word::SeqPos,
            Word::ReadPos,
            Word::ReaderEpoch,
            Word::ReaderHeartbeat,
        ]
        .iter()
        .map(|w| w.offset())
        .collect();
        offsets.sort_unstable();
        offsets.dedup();
        assert_eq!(offsets.len(), 11);
        assert!(offsets
            .iter()
            .all(|o| o.is_multiple_of(8) && o + 8 <= HEADER_LEN));
        // The writer's and the reader's words sit on different cache lines.
        assert_ne!(Word::WritePos.offset() / 64, Word::ReadPos.offset() / 64);
    }

    #[test]
    fn capacities_are_powers_of_two_in_range() {
        assert!(valid_capacity(64));
        assert!(valid_capacity(1 << 20));
        assert!(!valid_capacity(32));
        assert!(!valid_capacity(100));
        assert!(!valid_capacity(1 << 31));
    }
}
