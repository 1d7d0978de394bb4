//! A ring file is input from another process: whatever is in it, attaching and using either
//! end returns errors, never panics, and never hands out more than the ring holds.
#![cfg(not(loom))]

mod support;

use std::os::unix::fs::FileExt;

use pnp_ring::{Corruption, Reader, RecvError, Writer};
use proptest::prelude::*;
use support::ring_dir;

/// The header words the writer and reader keep, and their offsets (see `src/layout.rs`).
const WRITE_POS: u64 = 64;
const WRITER_EPOCH: u64 = 72;
const NEXT_SEQ: u64 = 80;
const SEQ_POS: u64 = 88;
const READ_POS: u64 = 128;
const READER_EPOCH: u64 = 136;

fn near(value: u64, capacity: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        (0..=capacity).prop_map(move |d| value.saturating_sub(d)),
        (0..=capacity).prop_map(move |d| value.saturating_add(d)),
    ]
}

fn any_position(capacity: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        0..4 * capacity,
        any::<u64>(),
        (0..capacity).prop_map(|d| u64::MAX - d)
    ]
}

/// Header words that are often almost right (read just behind write, seq_pos at write) and
/// sometimes anything, and some bytes of the data area overwritten.
#[allow(clippy::type_complexity)]
fn garbage() -> impl Strategy<Value = (usize, Vec<(u64, u64)>, Vec<(usize, u8)>)> {
    prop_oneof![Just(64usize), Just(256), Just(1024)].prop_flat_map(|capacity| {
        let cap = capacity as u64;
        let words = any_position(cap).prop_flat_map(move |write| {
            (
                Just(write),
                prop_oneof![near(write, cap), any_position(cap)],
                prop_oneof![Just(write), near(write, cap), any_position(cap)],
                prop_oneof![0..10u64, Just(u64::MAX), any::<u64>()],
                prop_oneof![Just(u64::MAX), any::<u64>()],
                prop_oneof![Just(u64::MAX), any::<u64>()],
            )
                .prop_map(
                    |(write, read, seq_pos, next_seq, writer_epoch, reader_epoch)| {
                        vec![
                            (WRITE_POS, write),
                            (READ_POS, read),
                            (SEQ_POS, seq_pos),
                            (NEXT_SEQ, next_seq),
                            (WRITER_EPOCH, writer_epoch),
                            (READER_EPOCH, reader_epoch),
                        ]
                    },
                )
        });
        (
            Just(capacity),
            words,
            prop::collection::vec((0..capacity, any::<u8>()), 0..64),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_header_words_and_data_give_errors_not_panics((capacity, words, bytes) in garbage()) {
        let dir = ring_dir();
        let path = dir.path().join("ring");
        {
            // A ring with some honest records in it first.
            let mut writer = Writer::create_or_open(&path, capacity).expect("ring");
            for len in [0usize, 5, 17] {
                let _ = writer.try_push(&vec![1; len]);
            }
        }
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
        for (offset, value) in &words {
            file.write_all_at(&value.to_ne_bytes(), *offset).expect("write a word");
        }
        for (offset, byte) in &bytes {
            file.write_all_at(&[*byte], 256 + *offset as u64).expect("write a byte");
        }

        if let Ok(mut writer) = Writer::open(&path) {
            for len in [0usize, 3, capacity / 2] {
                let _ = writer.try_push(&vec![2; len]);
            }
        }
        if let Ok(mut reader) = Reader::open(&path) {
            for _ in 0..64 {
                match reader.try_recv() {
                    Ok(Some(record)) => prop_assert!(record.payload.len() <= capacity),
                    Ok(None) => break,
                    Err(RecvError::Corrupt(Corruption::Checksum { .. })) => {}
                    Err(RecvError::Corrupt(_)) => {
                        reader.skip_to_end();
                    }
                }
            }
        }
    }
}
