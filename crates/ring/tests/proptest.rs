//! Random sequences of pushes, pops and re-attaches of either end, on rings small enough that
//! records wrap and fill them, checked against a plain queue.
#![cfg(not(loom))]

mod support;

use std::collections::VecDeque;

use pnp_ring::{PushError, Reader, Writer, RECORD_HEADER_LEN};
use proptest::prelude::*;
use support::ring_dir;

#[derive(Clone, Debug)]
enum Op {
    /// Push a payload of this many bytes.
    Push(usize),
    /// Pop one record.
    Pop,
    /// The writer goes away and a new one attaches.
    ReattachWriter,
    /// The reader goes away and a new one attaches.
    ReattachReader,
}

fn op(max_len: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..=max_len).prop_map(Op::Push),
        5 => Just(Op::Pop),
        1 => Just(Op::ReattachWriter),
        1 => Just(Op::ReattachReader),
    ]
}

fn case() -> impl Strategy<Value = (usize, Vec<Op>)> {
    prop_oneof![Just(64usize), Just(128), Just(256), Just(1024)].prop_flat_map(|capacity| {
        (
            Just(capacity),
            prop::collection::vec(op(capacity + 8), 1..200),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn the_ring_behaves_like_a_bounded_queue_of_records((capacity, ops) in case()) {
        let dir = ring_dir();
        let path = dir.path().join("ring");
        let mut writer = Writer::create_or_open(&path, capacity).expect("writer");
        let mut reader = Reader::open(&path).expect("reader");
        // The model: records in the ring with their seq, bytes used, next seq, writer epoch.
        let mut queue: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
        let mut used = 0;
        let mut next_seq = 0;
        let mut epoch = 1;
        let mut pushed_by: VecDeque<u64> = VecDeque::new();
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Push(len) => {
                    let payload: Vec<u8> = (0..len).map(|i| (step + i) as u8).collect();
                    let needed = RECORD_HEADER_LEN + len;
                    let result = writer.try_push(&payload);
                    if len > capacity - RECORD_HEADER_LEN {
                        prop_assert_eq!(result, Err(PushError::TooLarge { len, max: capacity - RECORD_HEADER_LEN }));
                    } else if used + needed > capacity {
                        prop_assert_eq!(result, Err(PushError::Full { needed, free: capacity - used }));
                    } else {
                        prop_assert_eq!(result, Ok(next_seq));
                        queue.push_back((next_seq, payload));
                        pushed_by.push_back(epoch);
                        used += needed;
                        next_seq += 1;
                    }
                }
                Op::Pop => {
                    let got = reader.try_recv().expect("no corruption");
                    match queue.pop_front() {
                        None => prop_assert_eq!(got, None),
                        Some((seq, payload)) => {
                            let got = got.expect("a record");
                            used -= RECORD_HEADER_LEN + payload.len();
                            prop_assert_eq!(got.seq, seq);
                            prop_assert_eq!(Some(got.epoch), pushed_by.pop_front());
                            prop_assert_eq!(got.payload, payload);
                        }
                    }
                }
                Op::ReattachWriter => {
                    drop(writer);
                    writer = Writer::open(&path).expect("writer re-attaches");
                    epoch += 1;
                    prop_assert_eq!(writer.epoch(), epoch);
                    prop_assert_eq!(writer.next_seq(), next_seq);
                }
                Op::ReattachReader => {
                    drop(reader);
                    reader = Reader::open(&path).expect("reader re-attaches");
                }
            }
            prop_assert_eq!(reader.pending_bytes().expect("consistent") as usize, used);
            prop_assert_eq!(writer.free_bytes().expect("consistent"), capacity - used);
        }
    }
}
