//! The file-backed ends: creating and attaching, refusing what is not a ring, the locks, and
//! the waiting receives and pushes.
#![cfg(not(loom))]

mod support;

use std::time::{Duration, Instant};

use pnp_ring::{OpenError, PushError, Reader, Role, Writer};
use support::ring_dir;

#[test]
fn either_end_may_create_the_ring_and_the_other_attaches() {
    let dir = ring_dir();
    let path = dir.path().join("events");
    let mut reader = Reader::create_or_open(&path, 4096).expect("reader creates");
    let mut writer = Writer::create_or_open(&path, 4096).expect("writer attaches");
    assert_eq!(
        (writer.epoch(), reader.epoch(), reader.writer_epoch()),
        (1, 1, 1)
    );
    assert_eq!(writer.reader_epoch(), 1);
    assert_eq!(writer.capacity(), 4096);
    assert_eq!(writer.max_payload(), 4096 - pnp_ring::RECORD_HEADER_LEN);
    assert_eq!(writer.try_push(b"breaker opened"), Ok(0));
    let record = reader.try_recv().expect("no corruption").expect("a record");
    assert_eq!(
        (record.seq, record.epoch, &record.payload[..]),
        (0, 1, &b"breaker opened"[..])
    );
    // No temporary files are left beside the ring.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("events")]);
}

#[test]
fn two_ends_racing_to_create_the_ring_share_one_file() {
    let dir = ring_dir();
    for round in 0..20 {
        let path = dir.path().join(format!("race-{round}"));
        let writer_path = path.clone();
        let racer =
            std::thread::spawn(move || Writer::create_or_open(&writer_path, 1024).expect("writer"));
        let mut reader = Reader::create_or_open(&path, 1024).expect("reader");
        let mut writer = racer.join().expect("racer");
        writer.try_push(b"same file").expect("room");
        assert_eq!(
            reader.try_recv().expect("ok").map(|r| r.payload),
            Some(b"same file".to_vec())
        );
    }
}

#[test]
fn a_second_live_end_of_the_same_kind_is_refused_until_the_first_is_dropped() {
    let dir = ring_dir();
    let path = dir.path().join("commands");
    let writer = Writer::create_or_open(&path, 1024).expect("writer");
    let reader = Reader::open(&path).expect("reader");
    assert!(matches!(
        Writer::open(&path),
        Err(OpenError::Busy {
            role: Role::Writer,
            ..
        })
    ));
    assert!(matches!(
        Reader::open(&path),
        Err(OpenError::Busy {
            role: Role::Reader,
            ..
        })
    ));
    assert!(writer.is_reader_attached().expect("lock test"));
    assert!(reader.is_writer_attached().expect("lock test"));
    drop(writer);
    assert!(!reader.is_writer_attached().expect("lock test"));
    drop(reader);
    let writer = Writer::open(&path).expect("the lock went with the first writer");
    assert_eq!(writer.epoch(), 2);
    assert!(!writer.is_reader_attached().expect("lock test"));
    assert_eq!(Reader::open(&path).expect("reader again").epoch(), 2);
}

#[test]
fn files_that_are_not_rings_of_this_shape_are_refused() {
    let dir = ring_dir();
    let missing = dir.path().join("missing");
    assert!(matches!(Writer::open(&missing), Err(OpenError::Io { .. })));
    assert!(matches!(
        Writer::create_or_open(&missing, 1000),
        Err(OpenError::BadCapacity(1000))
    ));
    assert!(matches!(
        Writer::create_or_open(&missing, 32),
        Err(OpenError::BadCapacity(32))
    ));

    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, vec![0xa5; 4096]).expect("write");
    let err = Reader::open(&garbage).expect_err("not a ring");
    assert!(matches!(err, OpenError::NotARing { .. }), "{err}");
    std::fs::write(&garbage, b"short").expect("write");
    assert!(matches!(
        Reader::open(&garbage),
        Err(OpenError::NotARing { .. })
    ));

    let ring = dir.path().join("ring");
    drop(Writer::create_or_open(&ring, 1024).expect("ring"));
    match Reader::create_or_open(&ring, 2048) {
        Err(OpenError::CapacityMismatch {
            found: 1024,
            wanted: 2048,
            ..
        }) => {}
        other => panic!("expected a capacity mismatch, got {other:?}"),
    }
    // Grown behind the ring's back: the length no longer matches the capacity.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&ring)
        .expect("open");
    file.set_len(8192).expect("grow");
    assert!(matches!(
        Reader::open(&ring),
        Err(OpenError::NotARing { .. })
    ));
}

#[test]
fn recv_timeout_gives_up_after_the_timeout_and_returns_a_record_as_it_comes() {
    let dir = ring_dir();
    let path = dir.path().join("ring");
    let mut reader = Reader::create_or_open(&path, 1024).expect("reader");
    let started = Instant::now();
    assert_eq!(
        reader.recv_timeout(Duration::from_millis(20)).expect("ok"),
        None
    );
    assert!(started.elapsed() >= Duration::from_millis(20));

    let writer_path = path.clone();
    let late = std::thread::spawn(move || {
        let mut writer = Writer::open(&writer_path).expect("writer");
        std::thread::sleep(Duration::from_millis(30));
        writer.try_push(b"late").expect("room");
        writer
    });
    let record = reader
        .recv_timeout(Duration::from_secs(10))
        .expect("ok")
        .expect("a record");
    assert_eq!(record.payload, b"late");
    let writer = late.join().expect("writer thread");
    assert!(writer.reader_heartbeat() > 0, "a waiting reader beats");
}

#[test]
fn push_timeout_waits_for_the_reader_to_free_room() {
    let dir = ring_dir();
    let path = dir.path().join("ring");
    let mut writer = Writer::create_or_open(&path, 64).expect("writer");
    writer.try_push(&[1; 40]).expect("room");
    assert_eq!(
        writer.push_timeout(&[2; 40], Duration::from_millis(10)),
        Err(PushError::Full {
            needed: 64,
            free: 0
        })
    );
    let reader_path = path.clone();
    let reader = std::thread::spawn(move || {
        let mut reader = Reader::open(&reader_path).expect("reader");
        std::thread::sleep(Duration::from_millis(20));
        let first = reader.try_recv().expect("ok").expect("first");
        let second = reader
            .recv_timeout(Duration::from_secs(10))
            .expect("ok")
            .expect("second");
        (first.payload, second.payload)
    });
    assert_eq!(
        writer.push_timeout(&[2; 40], Duration::from_secs(10)),
        Ok(1)
    );
    assert_eq!(
        reader.join().expect("reader thread"),
        (vec![1; 40], vec![2; 40])
    );
    assert_eq!(writer.free_bytes(), Ok(64));
}

#[cfg(feature = "tokio")]
#[tokio::test(flavor = "current_thread")]
async fn async_recv_and_push_wait_without_blocking_the_runtime() {
    let dir = ring_dir();
    let path = dir.path().join("ring");
    let mut reader = Reader::create_or_open(&path, 64).expect("reader");
    let mut writer = Writer::open(&path).expect("writer");
    let pushing = tokio::spawn(async move {
        for seq in 0..10u8 {
            // 64-byte ring, 64-byte records: every push waits for the reader.
            writer.push(&[seq; 40]).await.expect("pushed");
        }
    });
    for seq in 0..10u8 {
        let record = tokio::time::timeout(Duration::from_secs(10), reader.recv())
            .await
            .expect("in time")
            .expect("no corruption");
        assert_eq!(
            (record.seq, record.payload),
            (u64::from(seq), vec![seq; 40])
        );
    }
    pushing.await.expect("writer task");
    // recv is cancel-safe: a timed-out recv takes nothing.
    assert!(
        tokio::time::timeout(Duration::from_millis(5), reader.recv())
            .await
            .is_err()
    );
}
