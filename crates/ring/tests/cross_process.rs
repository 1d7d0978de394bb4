//! Two real processes on one ring file: this test binary re-runs itself as the writer
//! (`PNP_RING_CHILD` names the role, `child_writer` is its entry point), so what is tested is
//! the mapping, the locks and the kernel's view of a killed process, not a thread model.
#![cfg(not(loom))]

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pnp_ring::{Reader, Writer};
use support::{payload, ring_dir};

const ROLE: &str = "PNP_RING_CHILD";
const PATH: &str = "PNP_RING_PATH";
const COUNT: &str = "PNP_RING_COUNT";
const MAX_LEN: &str = "PNP_RING_MAX_LEN";

/// Starts this test binary as a writer child that pushes `count` records (0: until killed) of
/// payloads below `max_len` bytes, each `payload(seq, max_len)`.
fn spawn_writer(path: &Path, count: u64, max_len: usize) -> Child {
    Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
        .env(ROLE, "writer")
        .env(PATH, path)
        .env(COUNT, count.to_string())
        .env(MAX_LEN, max_len.to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the writer child")
}

/// The child's entry point; does nothing in an ordinary test run.
#[test]
fn child_writer() {
    if std::env::var(ROLE).as_deref() != Ok("writer") {
        return;
    }
    let var = |name| std::env::var(name).expect("set by the parent");
    let count: u64 = var(COUNT).parse().expect("a count");
    let max_len: usize = var(MAX_LEN).parse().expect("a length");
    let mut writer = Writer::open(var(PATH)).expect("the parent made the ring");
    let mut pushed = 0;
    while count == 0 || pushed < count {
        let record = payload(writer.next_seq(), max_len);
        writer
            .push_timeout(&record, Duration::from_secs(60))
            .expect("the reader keeps up");
        pushed += 1;
    }
}

/// Starts this test binary as a reader child that takes `count` records and then hangs until
/// it is killed (at most a minute).
fn spawn_reader(path: &Path, count: u64, max_len: usize) -> Child {
    Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", "child_reader", "--nocapture", "--test-threads=1"])
        .env(ROLE, "reader")
        .env(PATH, path)
        .env(COUNT, count.to_string())
        .env(MAX_LEN, max_len.to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the reader child")
}

/// The reader child's entry point; does nothing in an ordinary test run.
#[test]
fn child_reader() {
    if std::env::var(ROLE).as_deref() != Ok("reader") {
        return;
    }
    let var = |name| std::env::var(name).expect("set by the parent");
    let count: u64 = var(COUNT).parse().expect("a count");
    let max_len: usize = var(MAX_LEN).parse().expect("a length");
    let mut reader = Reader::open(var(PATH)).expect("the parent made the ring");
    read_checked(&mut reader, 0, count, max_len, 1);
    std::thread::sleep(Duration::from_secs(60));
}

/// Reads `count` records, checking each against its sequence number; returns the next seq.
fn read_checked(
    reader: &mut Reader,
    mut next_seq: u64,
    count: u64,
    max_len: usize,
    epoch: u64,
) -> u64 {
    for _ in 0..count {
        let record = reader
            .recv_timeout(Duration::from_secs(30))
            .expect("no corruption")
            .unwrap_or_else(|| panic!("record {next_seq} did not come"));
        assert_eq!(record.seq, next_seq, "lost, repeated or reordered record");
        assert_eq!(record.epoch, epoch);
        assert!(
            record.payload == payload(record.seq, max_len),
            "record {next_seq} is torn"
        );
        next_seq += 1;
    }
    next_seq
}

#[test]
fn a_million_records_cross_from_a_child_process_none_lost_repeated_or_torn() {
    const RECORDS: u64 = 1_000_000;
    let dir = ring_dir();
    let path = dir.path().join("events");
    // A small ring (64 KiB) so the writer laps it thousands of times and often finds it full.
    let mut reader = Reader::create_or_open(&path, 64 << 10).expect("ring");
    let mut child = spawn_writer(&path, RECORDS, 100);
    let next = read_checked(&mut reader, 0, RECORDS, 100, 1);
    assert_eq!(next, RECORDS);
    assert!(child.wait().expect("the child").success());
    assert_eq!(reader.try_recv().expect("no corruption"), None);
    assert_eq!(reader.writer_epoch(), 1);
}

#[test]
fn a_writer_killed_mid_stream_leaves_the_reader_consistent_and_a_new_writer_continues() {
    // Records up to 16 KiB in a 64 KiB ring, so a kill often lands inside a copy.
    const MAX_LEN: usize = 16 << 10;
    let dir = ring_dir();
    let path = dir.path().join("events");
    let mut reader = Reader::create_or_open(&path, 64 << 10).expect("ring");
    let mut next_seq = 0;
    for epoch in 1..=3 {
        let mut child = spawn_writer(&path, 0, MAX_LEN);
        next_seq = read_checked(&mut reader, next_seq, 2_000, MAX_LEN, epoch);
        assert!(reader.is_writer_attached().expect("lock test"));
        // Kill while the reader keeps draining, so the writer is busy copying, not waiting for
        // room, when the signal lands.
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(epoch * 3));
            child.kill().expect("SIGKILL the writer mid-stream");
            child.wait().expect("reap the writer");
        });
        // Whatever the dead writer published is whole; nothing half-written shows up.
        loop {
            let record = match reader
                .recv_timeout(Duration::from_millis(20))
                .expect("no corruption")
            {
                Some(record) => record,
                None if killer.is_finished() => break,
                None => continue,
            };
            assert_eq!(record.seq, next_seq, "lost, repeated or reordered record");
            assert_eq!(record.epoch, epoch);
            assert!(
                record.payload == payload(record.seq, MAX_LEN),
                "record {next_seq} is torn"
            );
            next_seq += 1;
        }
        killer.join().expect("the killer thread");
        assert_eq!(reader.writer_epoch(), epoch);
        assert!(
            !reader.is_writer_attached().expect("lock test"),
            "the dead writer's lock is gone"
        );
    }
    // A writer that runs to its end after three killed ones: epoch 4, no gap in sequence.
    let mut child = spawn_writer(&path, 1_000, MAX_LEN);
    next_seq = read_checked(&mut reader, next_seq, 1_000, MAX_LEN, 4);
    assert!(child.wait().expect("the child").success());
    assert_eq!(reader.try_recv().expect("no corruption"), None);
    assert_eq!(reader.writer_epoch(), 4);
    assert!(next_seq >= 7_000);
}

#[test]
fn a_reader_killed_after_taking_records_is_succeeded_by_one_that_resumes_after_them() {
    const MAX_LEN: usize = 200;
    let dir = ring_dir();
    let path = dir.path().join("commands");
    let mut writer = Writer::create_or_open(&path, 64 << 10).expect("ring");
    for seq in 0..100 {
        writer.try_push(&payload(seq, MAX_LEN)).expect("room");
    }
    let full = writer.free_bytes().expect("consistent");
    let mut child = spawn_reader(&path, 40, MAX_LEN);
    // Wait until the child has released its 40 records, then kill it where it hangs.
    let taken: usize = (0..40)
        .map(|seq| payload(seq, MAX_LEN).len() + pnp_ring::RECORD_HEADER_LEN)
        .sum();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while writer.free_bytes().expect("consistent") < full + taken {
        assert!(
            std::time::Instant::now() < deadline,
            "the reader child did not take its records"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(writer.is_reader_attached().expect("lock test"));
    child.kill().expect("SIGKILL the reader");
    child.wait().expect("reap the reader");
    assert!(!writer.is_reader_attached().expect("lock test"));

    let mut reader = Reader::open(&path).expect("a new reader attaches");
    assert_eq!((reader.epoch(), writer.reader_epoch()), (2, 2));
    assert_eq!(read_checked(&mut reader, 40, 60, MAX_LEN, 1), 100);
    assert_eq!(reader.try_recv().expect("no corruption"), None);
}
