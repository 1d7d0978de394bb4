//! Model checks of the ring's index and publication logic under loom: every interleaving (up
//! to a preemption bound) of one writer and one reader, with every data byte watched for
//! access that is not ordered by the ring's Release/Acquire pairs.
//!
//! `RUSTFLAGS="--cfg loom" cargo test -p pnp-ring --test loom --release`
#![cfg(loom)]

use loom::thread;
use pnp_ring::model::{self, ModelReader};
use pnp_ring::PushError;

/// A checker exploring every interleaving with at most `preemptions` forced thread switches
/// (`None`: all of them).
fn checker(preemptions: Option<usize>) -> loom::model::Builder {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = preemptions;
    builder
}

fn payload(seq: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seq as u8).wrapping_mul(17).wrapping_add(i as u8))
        .collect()
}

/// Takes `count` records, yielding while the ring is empty; returns (seq, payload) pairs.
fn take(reader: &mut ModelReader, count: usize) -> Vec<(u64, Vec<u8>)> {
    let mut got = Vec::new();
    while got.len() < count {
        match reader.try_recv().expect("no corruption") {
            Some(record) => got.push(record),
            None => thread::yield_now(),
        }
    }
    got
}

/// One writer pushes records of these payload sizes, retrying while the ring is full; the
/// reader takes them all and checks each.
fn through_a_64_byte_ring(sizes: &'static [usize], preemptions: Option<usize>) {
    checker(preemptions).check(move || {
        let (mut writer, mut reader) = model::ring(64);
        let producer = thread::spawn(move || {
            for (seq, &len) in sizes.iter().enumerate() {
                let record = payload(seq as u64, len);
                loop {
                    match writer.try_push(&record) {
                        Ok(pushed) => {
                            assert_eq!(pushed, seq as u64);
                            break;
                        }
                        Err(PushError::Full { .. }) => thread::yield_now(),
                        Err(other) => panic!("push failed: {other}"),
                    }
                }
            }
        });
        let got = take(&mut reader, sizes.len());
        producer.join().expect("the writer thread");
        for (seq, (got_seq, got_payload)) in got.into_iter().enumerate() {
            assert_eq!(got_seq, seq as u64);
            assert_eq!(got_payload, payload(seq as u64, sizes[seq]));
        }
    });
}

#[test]
fn records_cross_whole_and_in_order_through_a_full_ring_and_its_wrap_in_every_interleaving() {
    // Records of 32, 44 and 32 bytes: the second waits for the first to be read (full ring)
    // and straddles the end of the data area; so does the third's header.
    through_a_64_byte_ring(&[8, 20, 8], None);
}

#[test]
fn five_records_lap_the_ring_twice_under_three_preemptions() {
    through_a_64_byte_ring(&[8, 20, 8, 0, 13], Some(3));
}

#[test]
fn a_writer_dying_mid_publication_is_never_seen_half_and_its_successor_continues() {
    for stores in [0, 1, 2, 3] {
        checker(None).check(move || {
            let (mut writer, mut reader) = model::ring(128);
            let producer = thread::spawn(move || {
                writer.try_push(&payload(0, 8)).expect("room");
                let mut restarted = writer.crash_and_reattach(&payload(1, 8), stores);
                let next = restarted.next_seq();
                restarted.try_push(&payload(next, 8)).expect("room");
            });
            let published = stores == 3;
            let got = take(&mut reader, if published { 3 } else { 2 });
            producer.join().expect("the writer thread");
            let seqs: Vec<u64> = got.iter().map(|(seq, _)| *seq).collect();
            assert_eq!(seqs, (0..got.len() as u64).collect::<Vec<_>>());
            for (seq, record) in got {
                assert_eq!(record, payload(seq, 8));
            }
            assert_eq!(reader.try_recv().expect("no corruption"), None);
        });
    }
}
