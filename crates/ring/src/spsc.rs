//! The index and publication logic of the single-producer single-consumer ring, over any
//! [`Region`]. No I/O, no clock, no `unsafe`: this is what `tests/loom.rs` model-checks.
//!
//! Positions are byte counts since the ring was made; they only grow (2^64 bytes never wrap)
//! and `position % capacity` is the offset in the data area. The writer owns the write
//! position, the sequence words and the writer epoch; the reader owns the read position, the
//! reader epoch and the heartbeat. Each side only ever stores to its own words.
//!
//! **Publication.** The writer copies a record's header and payload into the free space, then
//! stores the sequence words and finally the write position with `Release`. The reader loads
//! the write position with `Acquire`, so every byte before it is visible and complete; it
//! copies the record out and then stores the read position with `Release`, which the writer
//! loads with `Acquire` before it reuses the space. Unread bytes are never overwritten: a
//! record that does not fit is refused ([`PushError::Full`]).
//!
//! **Crash of the writer.** A killed process has executed its stores in program order up to
//! some instruction, and the `Release` stores keep the compiler from moving the copies after
//! the stores that publish them. So a record is either published whole or not at all; the
//! bytes past the write position are garbage that nobody reads. The checksum is a second
//! line of defence against bugs and foreign writers, not part of the protocol.
//!
//! **Sequence numbers across writer restarts.** Two words cannot be stored atomically
//! together, so the writer stores, in this order, the record's bytes, `seq_pos` (the write
//! position the record ends at), `next_seq`, and the write position. On attach, if
//! `seq_pos == write_pos` the last push completed and `next_seq` is right; otherwise the
//! previous writer died after finishing the record's bytes but before publishing them, and
//! the sequence number to reuse is the one in the unpublished record's own header.

#![forbid(unsafe_code)]

use crate::error::{Corruption, PushError, RecvError};
use crate::layout::{RecordHeader, Word, RECORD_HEADER_LEN};
use crate::region::Region;
use crate::sync::Ordering::{AcqRel, Acquire, Relaxed, Release};

/// The stores that publish one record.
const PUBLISH_STORES: usize = 3;

/// A received record, borrowed from the reader's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// The record's sequence number: 0 for the ring's first record, then one more for each,
    /// across writer restarts.
    pub seq: u64,
    /// The epoch of the writer that pushed it (1 for the first writer to attach).
    pub epoch: u64,
    /// The payload.
    pub payload: &'a [u8],
}

/// Positions past this are corruption, so arithmetic on positions never overflows. Reaching it
/// honestly takes 8 EiB of records: eight years at the bench's 35 GB/s.
const MAX_POSITION: u64 = 1 << 63;

fn check_positions(read: u64, write: u64, capacity: u64) -> Result<(), Corruption> {
    if read <= write && write - read <= capacity && write <= MAX_POSITION {
        Ok(())
    } else {
        Err(Corruption::Positions {
            read,
            write,
            capacity,
        })
    }
}

fn copy_in<R: Region>(region: &R, pos: u64, src: &[u8]) {
    let capacity = region.capacity();
    let offset = (pos % capacity) as usize;
    let first = src.len().min(capacity as usize - offset);
    region.write(offset, &src[..first]);
    if first < src.len() {
        region.write(0, &src[first..]);
    }
}

fn copy_out<R: Region>(region: &R, pos: u64, dst: &mut [u8]) {
    let capacity = region.capacity();
    let offset = (pos % capacity) as usize;
    let first = dst.len().min(capacity as usize - offset);
    region.read(offset, &mut dst[..first]);
    if first < dst.len() {
        region.read(0, &mut dst[first..]);
    }
}

/// The writing end. There must be one at a time per ring (the file lock sees to it).
#[derive(Debug)]
pub(crate) struct Producer<R> {
    region: R,
    capacity: u64,
    write_pos: u64,
    /// The read position last seen; the reader only moves it forward, so free space computed
    /// from it is never more than the real free space.
    read_pos: u64,
    next_seq: u64,
    epoch: u64,
}

impl<R: Region> Producer<R> {
    /// Takes over the writing end of an initialised region: recovers the next sequence number
    /// (see the module docs), makes the sequence words consistent again and bumps the writer
    /// epoch.
    pub(crate) fn attach(region: R) -> Result<Producer<R>, Corruption> {
        let capacity = region.capacity();
        let write_pos = region.word(Word::WritePos).load(Acquire);
        let read_pos = region.word(Word::ReadPos).load(Acquire);
        check_positions(read_pos, write_pos, capacity)?;
        let seq_pos = region.word(Word::SeqPos).load(Acquire);
        let next_seq = if seq_pos == write_pos {
            region.word(Word::NextSeq).load(Acquire)
        } else {
            let mut bytes = [0; RECORD_HEADER_LEN];
            copy_out(&region, write_pos, &mut bytes);
            let header = RecordHeader::decode(&bytes);
            if seq_pos.checked_sub(write_pos) != Some(header.total_len()) {
                return Err(Corruption::UncommittedRecord { pos: write_pos });
            }
            header.seq
        };
        region.word(Word::NextSeq).store(next_seq, Release);
        region.word(Word::SeqPos).store(write_pos, Release);
        let epoch = region
            .word(Word::WriterEpoch)
            .fetch_add(1, AcqRel)
            .wrapping_add(1);
        Ok(Producer {
            region,
            capacity,
            write_pos,
            read_pos,
            next_seq,
            epoch,
        })
    }

    /// The largest payload a record can carry: the whole data area less one record header.
    pub(crate) fn max_payload(&self) -> usize {
        self.capacity as usize - RECORD_HEADER_LEN
    }

    /// Publishes one record, or refuses it without writing anything visible.
    pub(crate) fn try_push(&mut self, payload: &[u8]) -> Result<u64, PushError> {
        if payload.len() > self.max_payload() {
            return Err(PushError::TooLarge {
                len: payload.len(),
                max: self.max_payload(),
            });
        }
        let needed = RECORD_HEADER_LEN + payload.len();
        if self.free_with(self.read_pos) < needed {
            self.read_pos = self.load_read_pos()?;
            let free = self.free_with(self.read_pos);
            if free < needed {
                return Err(PushError::Full { needed, free });
            }
        }
        let seq = self.next_seq;
        let header = RecordHeader::new(seq, self.epoch, payload);
        copy_in(&self.region, self.write_pos, &header.encode());
        copy_in(
            &self.region,
            self.write_pos + RECORD_HEADER_LEN as u64,
            payload,
        );
        let end = self.write_pos + needed as u64;
        self.publish(seq, end, PUBLISH_STORES);
        self.write_pos = end;
        self.next_seq = seq.wrapping_add(1);
        Ok(seq)
    }

    /// The first `stores` of the stores that publish a record ending at `end` (all of them but
    /// in tests that stop a writer between two of them, as a crash would).
    fn publish(&self, seq: u64, end: u64, stores: usize) {
        // Order matters for a crash between any two of these stores (module docs).
        let steps = [
            (Word::SeqPos, end),
            (Word::NextSeq, seq.wrapping_add(1)),
            (Word::WritePos, end),
        ];
        for (word, value) in steps.into_iter().take(stores) {
            self.region.word(word).store(value, Release);
        }
    }

    /// Writes a record and then "dies" after the first `stores` of its publishing stores
    /// (0 to 3; 3 is a whole push): what a writer killed there leaves behind.
    #[cfg(any(test, loom))]
    pub(crate) fn push_then_crash(mut self, payload: &[u8], stores: usize) -> R {
        let needed = RECORD_HEADER_LEN + payload.len();
        assert!(
            self.free().unwrap_or(0) >= needed,
            "the crash test needs room for its record"
        );
        let seq = self.next_seq;
        let header = RecordHeader::new(seq, self.epoch, payload);
        copy_in(&self.region, self.write_pos, &header.encode());
        copy_in(
            &self.region,
            self.write_pos + RECORD_HEADER_LEN as u64,
            payload,
        );
        self.publish(seq, self.write_pos + needed as u64, stores);
        self.region
    }

    fn load_read_pos(&self) -> Result<u64, Corruption> {
        let read_pos = self.region.word(Word::ReadPos).load(Acquire);
        check_positions(read_pos, self.write_pos, self.capacity)?;
        Ok(read_pos)
    }

    fn free_with(&self, read_pos: u64) -> usize {
        (self.capacity - (self.write_pos - read_pos)) as usize
    }

    /// Bytes free now (header and payload of the records that would fit).
    pub(crate) fn free(&mut self) -> Result<usize, Corruption> {
        self.read_pos = self.load_read_pos()?;
        Ok(self.free_with(self.read_pos))
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(crate) fn reader_heartbeat(&self) -> u64 {
        self.region.word(Word::ReaderHeartbeat).load(Relaxed)
    }

    pub(crate) fn reader_epoch(&self) -> u64 {
        self.region.word(Word::ReaderEpoch).load(Relaxed)
    }
}

/// The reading end. There must be one at a time per ring (the file lock sees to it).
#[derive(Debug)]
pub(crate) struct Consumer<R> {
    region: R,
    capacity: u64,
    read_pos: u64,
    /// The write position last seen; the writer only moves it forward.
    write_pos: u64,
    epoch: u64,
    buf: Vec<u8>,
}

impl<R: Region> Consumer<R> {
    /// Takes over the reading end: resumes at the stored read position (the first record not
    /// yet released by a previous reader) and bumps the reader epoch.
    pub(crate) fn attach(region: R) -> Result<Consumer<R>, Corruption> {
        let capacity = region.capacity();
        let read_pos = region.word(Word::ReadPos).load(Acquire);
        let write_pos = region.word(Word::WritePos).load(Acquire);
        check_positions(read_pos, write_pos, capacity)?;
        let epoch = region
            .word(Word::ReaderEpoch)
            .fetch_add(1, AcqRel)
            .wrapping_add(1);
        Ok(Consumer {
            region,
            capacity,
            read_pos,
            write_pos,
            epoch,
            buf: Vec::new(),
        })
    }

    /// Hands the next record to `f`, then releases its space. `None` when nothing is
    /// published. A crash inside `f` leaves the record in the ring for the next reader.
    pub(crate) fn try_pop_with<T>(
        &mut self,
        f: impl FnOnce(RecordRef<'_>) -> T,
    ) -> Result<Option<T>, RecvError> {
        if self.read_pos == self.write_pos {
            self.write_pos = self.load_write_pos()?;
            if self.read_pos == self.write_pos {
                return Ok(None);
            }
        }
        let pos = self.read_pos;
        let available = self.write_pos - pos;
        let mut bytes = [0; RECORD_HEADER_LEN];
        if available < RECORD_HEADER_LEN as u64 {
            return Err(Corruption::RecordLength {
                pos,
                len: RECORD_HEADER_LEN as u64,
                available,
            }
            .into());
        }
        copy_out(&self.region, pos, &mut bytes);
        let header = RecordHeader::decode(&bytes);
        let total = header.total_len();
        if total > available {
            return Err(Corruption::RecordLength {
                pos,
                len: total,
                available,
            }
            .into());
        }
        self.buf.resize(header.len as usize, 0);
        copy_out(&self.region, pos + RECORD_HEADER_LEN as u64, &mut self.buf);
        if header.checksum(&self.buf) != header.crc {
            self.release(pos + total);
            return Err(Corruption::Checksum {
                pos,
                seq: header.seq,
            }
            .into());
        }
        let out = f(RecordRef {
            seq: header.seq,
            epoch: header.epoch,
            payload: &self.buf,
        });
        self.release(pos + total);
        Ok(Some(out))
    }

    fn release(&mut self, pos: u64) {
        self.read_pos = pos;
        self.region.word(Word::ReadPos).store(pos, Release);
    }

    fn load_write_pos(&self) -> Result<u64, Corruption> {
        let write_pos = self.region.word(Word::WritePos).load(Acquire);
        check_positions(self.read_pos, write_pos, self.capacity)?;
        Ok(write_pos)
    }

    /// Drops everything published and not yet read; returns the bytes dropped. The way on
    /// after a [`Corruption::RecordLength`].
    pub(crate) fn skip_to_end(&mut self) -> u64 {
        let write_pos = self.region.word(Word::WritePos).load(Acquire);
        let skipped = write_pos.saturating_sub(self.read_pos);
        self.write_pos = write_pos;
        self.release(write_pos);
        skipped
    }

    /// Bytes published and not yet read.
    pub(crate) fn pending(&mut self) -> Result<u64, Corruption> {
        self.write_pos = self.load_write_pos()?;
        Ok(self.write_pos - self.read_pos)
    }

    /// Tells the writer this reader is alive.
    pub(crate) fn heartbeat(&self) {
        self.region
            .word(Word::ReaderHeartbeat)
            .fetch_add(1, Relaxed);
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(crate) fn writer_epoch(&self) -> u64 {
        self.region.word(Word::WriterEpoch).load(Relaxed)
    }

    /// Corrupts the byte at `pos` (tests of the checksum).
    #[cfg(test)]
    pub(crate) fn region(&self) -> &R {
        &self.region
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::error::Role;
    use crate::open::attach;
    use crate::raw::MmapRegion;

    fn ring_dir() -> tempfile::TempDir {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            tempfile::tempdir_in(shm).expect("a temporary directory in /dev/shm")
        } else {
            tempfile::tempdir().expect("a temporary directory")
        }
    }

    /// A fresh ring; the lock files are dropped at once, so the test may attach as it likes.
    fn region(path: &Path, capacity: usize, role: Role) -> MmapRegion {
        attach(path, Some(capacity), role).expect("a ring").region
    }

    fn ends(
        dir: &tempfile::TempDir,
        capacity: usize,
    ) -> (PathBuf, Producer<MmapRegion>, Consumer<MmapRegion>) {
        let path = dir.path().join("ring");
        let producer = Producer::attach(region(&path, capacity, Role::Writer)).expect("writer");
        let consumer = Consumer::attach(region(&path, capacity, Role::Reader)).expect("reader");
        (path, producer, consumer)
    }

    fn pop(consumer: &mut Consumer<MmapRegion>) -> Option<(u64, u64, Vec<u8>)> {
        consumer
            .try_pop_with(|r| (r.seq, r.epoch, r.payload.to_vec()))
            .expect("no corruption")
    }

    #[test]
    fn records_come_out_whole_in_order_with_sequence_numbers() {
        let dir = ring_dir();
        let (_, mut producer, mut consumer) = ends(&dir, 1024);
        assert_eq!(producer.epoch(), 1);
        assert_eq!(pop(&mut consumer), None);
        assert_eq!(producer.try_push(b"one"), Ok(0));
        assert_eq!(producer.try_push(b""), Ok(1));
        assert_eq!(producer.try_push(&[7; 100]), Ok(2));
        assert_eq!(pop(&mut consumer), Some((0, 1, b"one".to_vec())));
        assert_eq!(pop(&mut consumer), Some((1, 1, Vec::new())));
        assert_eq!(pop(&mut consumer), Some((2, 1, vec![7; 100])));
        assert_eq!(pop(&mut consumer), None);
        assert_eq!(consumer.pending(), Ok(0));
    }

    #[test]
    fn records_wrap_around_the_end_of_the_data_area() {
        let dir = ring_dir();
        let (_, mut producer, mut consumer) = ends(&dir, 64);
        // 24 + 13 = 37 bytes a record: every second one straddles the end of the area.
        for seq in 0..50u64 {
            let payload: Vec<u8> = (0..13)
                .map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i))
                .collect();
            assert_eq!(producer.try_push(&payload), Ok(seq));
            assert_eq!(pop(&mut consumer), Some((seq, 1, payload)));
        }
    }

    #[test]
    fn a_full_ring_refuses_records_and_never_overwrites_unread_ones() {
        let dir = ring_dir();
        let (_, mut producer, mut consumer) = ends(&dir, 64);
        assert_eq!(producer.try_push(&[1; 8]), Ok(0)); // 32 bytes
        assert_eq!(producer.try_push(&[2; 8]), Ok(1)); // 64: full
        assert_eq!(
            producer.try_push(b""),
            Err(PushError::Full {
                needed: 24,
                free: 0
            })
        );
        assert_eq!(
            producer.next_seq(),
            2,
            "a refused record takes no sequence number"
        );
        assert_eq!(pop(&mut consumer), Some((0, 1, vec![1; 8])));
        assert_eq!(
            producer.try_push(&[3; 9]),
            Err(PushError::Full {
                needed: 33,
                free: 32
            })
        );
        assert_eq!(producer.try_push(&[3; 8]), Ok(2));
        assert_eq!(pop(&mut consumer), Some((1, 1, vec![2; 8])));
        assert_eq!(pop(&mut consumer), Some((2, 1, vec![3; 8])));
        assert_eq!(producer.free(), Ok(64));
    }

    #[test]
    fn a_record_larger_than_the_ring_is_refused_as_too_large() {
        let dir = ring_dir();
        let (_, mut producer, mut consumer) = ends(&dir, 64);
        assert_eq!(
            producer.try_push(&[0; 41]),
            Err(PushError::TooLarge { len: 41, max: 40 })
        );
        assert_eq!(
            producer.try_push(&[9; 40]),
            Ok(0),
            "the largest record fills the empty ring"
        );
        assert_eq!(pop(&mut consumer), Some((0, 1, vec![9; 40])));
    }

    #[test]
    fn a_writer_killed_between_any_two_stores_is_continued_without_gaps_or_repeats() {
        for stores in 0..=PUBLISH_STORES {
            let dir = ring_dir();
            let (path, mut producer, mut consumer) = ends(&dir, 128);
            producer.try_push(b"before").expect("room");
            assert_eq!(pop(&mut consumer), Some((0, 1, b"before".to_vec())));
            producer.try_push(b"unread").expect("room");
            let region = producer.push_then_crash(b"dying", stores);
            drop(region);
            let published = stores == PUBLISH_STORES;

            let mut restarted = Producer::attach(super::tests::region(&path, 128, Role::Writer))
                .expect("re-attach");
            assert_eq!(restarted.epoch(), 2);
            let next = if published { 3 } else { 2 };
            assert_eq!(restarted.next_seq(), next, "after {stores} stores");
            assert_eq!(restarted.try_push(b"after"), Ok(next));

            assert_eq!(pop(&mut consumer), Some((1, 1, b"unread".to_vec())));
            if published {
                assert_eq!(pop(&mut consumer), Some((2, 1, b"dying".to_vec())));
            }
            assert_eq!(
                pop(&mut consumer),
                Some((next, 2, b"after".to_vec())),
                "after {stores} stores"
            );
            assert_eq!(pop(&mut consumer), None);
        }
    }

    #[test]
    fn a_reattached_reader_resumes_at_the_first_record_not_released() {
        let dir = ring_dir();
        let (path, mut producer, mut consumer) = ends(&dir, 256);
        for payload in [&b"a"[..], b"b", b"c"] {
            producer.try_push(payload).expect("room");
        }
        assert_eq!(pop(&mut consumer).map(|r| r.0), Some(0));
        // Dies inside the closure: record 1 is not released.
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            consumer.try_pop_with(|_| panic!("reader dies while handling record 1"))
        }));
        assert!(died.is_err());
        drop(consumer);
        let mut again = Consumer::attach(region(&path, 256, Role::Reader)).expect("re-attach");
        assert_eq!(again.epoch(), 2);
        assert_eq!(pop(&mut again).map(|r| r.0), Some(1));
        assert_eq!(pop(&mut again).map(|r| r.0), Some(2));
        assert_eq!(pop(&mut again), None);
    }

    #[test]
    fn a_record_that_fails_its_checksum_is_reported_and_stepped_over() {
        let dir = ring_dir();
        let (_, mut producer, mut consumer) = ends(&dir, 256);
        producer.try_push(b"good").expect("room");
        producer.try_push(b"flipped").expect("room");
        producer.try_push(b"next").expect("room");
        assert_eq!(pop(&mut consumer).map(|r| r.2), Some(b"good".to_vec()));
        // Flip a payload byte of record 1 (it starts at 28; its payload at 52).
        let mut byte = [0];
        consumer.region().read(52, &mut byte);
        consumer.region().write(52, &[byte[0] ^ 0x40]);
        assert_eq!(
            consumer.try_pop_with(|_| ()),
            Err(RecvError::Corrupt(Corruption::Checksum { pos: 28, seq: 1 }))
        );
        assert_eq!(pop(&mut consumer), Some((2, 1, b"next".to_vec())));
    }

    #[test]
    fn impossible_positions_are_corruption_not_a_crash() {
        let dir = ring_dir();
        let (path, mut producer, mut consumer) = ends(&dir, 64);
        producer.try_push(b"x").expect("room");
        // A foreign process moves the read position past the write position.
        consumer.region().word(Word::ReadPos).store(1000, Release);
        assert!(matches!(
            producer.try_push(&[0; 40]),
            Err(PushError::Corrupt(Corruption::Positions { .. }))
        ));
        drop(producer); // its mapping holds the writer lock
        assert!(matches!(
            Producer::attach(region(&path, 64, Role::Writer)),
            Err(Corruption::Positions {
                read: 1000,
                write: 25,
                capacity: 64
            })
        ));
        // A record header that claims more than was published.
        consumer.region().word(Word::ReadPos).store(0, Release);
        consumer.region().write(0, &1000u32.to_le_bytes());
        assert!(matches!(
            consumer.try_pop_with(|_| ()),
            Err(RecvError::Corrupt(Corruption::RecordLength { .. }))
        ));
        assert_eq!(consumer.skip_to_end(), 25);
        assert_eq!(pop(&mut consumer), None);
    }
}
