//! Throughput and one-way latency of a pnp ring between two processes.
//!
//! `cargo run -p pnp-ring --release --example ring_bench [-- --quick]`
//!
//! The example re-runs itself as the writer process. Throughput: the writer pushes records
//! back to back (spinning on a full ring), the reader takes them as fast as it can. Latency:
//! the writer stamps each record with the wall clock (`SystemTime`, the same clock for both
//! processes on one machine) just before pushing it, once per gap; the reader subtracts the
//! stamp from the clock as it gets the record, waiting in one of three ways: spinning on
//! `try_recv`, the blocking `recv_timeout` (spin, yield, sleeps of 50 µs to 1 ms), and the
//! async `recv` on a current-thread tokio runtime.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pnp_ring::{PushError, Reader, Writer};

const CAPACITY: usize = 1 << 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        child(&args[2..]);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("pnp-ring-bench-{}", std::process::id()));
    let scale = if quick { 10 } else { 1 };

    println!(
        "pnp-ring bench: ring of {} KiB in {}",
        CAPACITY >> 10,
        dir.display()
    );
    println!("\nthroughput (writer process -> reader process, reader spinning)");
    println!(
        "{:>9} {:>10} {:>12} {:>10}",
        "payload", "records", "records/s", "MB/s"
    );
    for (size, count) in [
        (64usize, 4_000_000u64),
        (1024, 1_000_000),
        (64 << 10, 40_000),
    ] {
        let count = count / scale;
        let (elapsed, bytes) = throughput(&path, size, count);
        let secs = elapsed.as_secs_f64();
        println!(
            "{:>9} {:>10} {:>12.0} {:>10.0}",
            size_name(size),
            count,
            count as f64 / secs,
            bytes as f64 / secs / 1e6
        );
    }

    println!("\none-way latency (a 16-byte record every gap)");
    println!(
        "{:>10} {:>7} {:>8} {:>9} {:>9} {:>9}",
        "reader", "gap", "samples", "p50 µs", "p99 µs", "max µs"
    );
    for mode in ["spin", "blocking", "tokio"] {
        for (gap, samples) in [
            (Duration::from_micros(100), 2_000),
            (Duration::from_millis(1), 1_000),
            (Duration::from_millis(10), 300),
        ] {
            let samples = (samples / scale as usize).max(20);
            let mut latencies = latency(&path, mode, gap, samples);
            latencies.sort_unstable();
            let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize] as f64 / 1e3;
            println!(
                "{:>10} {:>7} {:>8} {:>9.1} {:>9.1} {:>9.1}",
                mode,
                format!("{gap:?}"),
                latencies.len(),
                pct(0.5),
                pct(0.99),
                pct(1.0)
            );
        }
    }

    println!("\nidle reader (an empty ring for 1 s)");
    for mode in ["blocking", "tokio"] {
        match idle_cpu(&path, mode) {
            Some(percent) => println!("{mode:>10}: {percent:.2} % of one core"),
            None => println!("{mode:>10}: no /proc/thread-self/schedstat here"),
        }
    }
}

/// CPU time this thread has used, from Linux's schedstat (None elsewhere).
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    Some(Duration::from_nanos(
        stat.split_whitespace().next()?.parse().ok()?,
    ))
}

/// The share of one core an idle reader burns while it waits a second for a record.
fn idle_cpu(path: &Path, mode: &str) -> Option<f64> {
    let _ = std::fs::remove_file(path);
    let mut reader = Reader::create_or_open(path, CAPACITY).expect("ring");
    let wait = Duration::from_secs(1);
    let before = thread_cpu()?;
    let started = Instant::now();
    if mode == "blocking" {
        assert!(reader.recv_timeout(wait).expect("no corruption").is_none());
    } else {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        runtime
            .block_on(async { assert!(tokio::time::timeout(wait, reader.recv()).await.is_err()) });
    }
    let used = thread_cpu()? - before;
    drop(reader);
    let _ = std::fs::remove_file(path);
    Some(used.as_secs_f64() / started.elapsed().as_secs_f64() * 100.0)
}

fn size_name(size: usize) -> String {
    if size >= 1024 {
        format!("{} KiB", size >> 10)
    } else {
        format!("{size} B")
    }
}

fn spawn(args: &[String]) -> Child {
    Command::new(std::env::current_exe().expect("this example"))
        .arg("child")
        .args(args)
        .spawn()
        .expect("spawn the writer")
}

/// Runs one throughput round; returns the time from the first record to the last, and bytes.
fn throughput(path: &Path, size: usize, count: u64) -> (Duration, u64) {
    let _ = std::fs::remove_file(path);
    let mut reader = Reader::create_or_open(path, CAPACITY).expect("ring");
    let mut child = spawn(&[
        "throughput".into(),
        path.display().to_string(),
        size.to_string(),
        count.to_string(),
    ]);
    let mut got = 0u64;
    let mut bytes = 0u64;
    let mut started = None;
    while got < count {
        let record = reader.try_recv_with(|record| {
            assert_eq!(record.seq, got);
            record.payload.len()
        });
        match record.expect("no corruption") {
            Some(len) => {
                started.get_or_insert_with(Instant::now);
                got += 1;
                bytes += len as u64;
            }
            None => std::hint::spin_loop(),
        }
    }
    let elapsed = started.map(|s| s.elapsed()).unwrap_or_default();
    assert!(child.wait().expect("writer").success());
    drop(reader);
    let _ = std::fs::remove_file(path);
    (elapsed, bytes)
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as u64
}

/// Runs one latency round; returns one-way latencies in nanoseconds.
fn latency(path: &Path, mode: &str, gap: Duration, samples: usize) -> Vec<u64> {
    let _ = std::fs::remove_file(path);
    let mut reader = Reader::create_or_open(path, CAPACITY).expect("ring");
    let mut child = spawn(&[
        "latency".into(),
        path.display().to_string(),
        gap.as_nanos().to_string(),
        samples.to_string(),
    ]);
    let mut latencies = Vec::with_capacity(samples);
    let sample = |payload: &[u8]| {
        let received = now_nanos();
        let sent = u64::from_le_bytes(payload[..8].try_into().expect("a stamp"));
        received.saturating_sub(sent)
    };
    match mode {
        "spin" => {
            while latencies.len() < samples {
                match reader
                    .try_recv_with(|record| sample(record.payload))
                    .expect("no corruption")
                {
                    Some(latency) => latencies.push(latency),
                    None => std::hint::spin_loop(),
                }
            }
        }
        "blocking" => {
            while latencies.len() < samples {
                if let Some(record) = reader
                    .recv_timeout(Duration::from_secs(5))
                    .expect("no corruption")
                {
                    latencies.push(sample(&record.payload));
                }
            }
        }
        _ => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                while latencies.len() < samples {
                    let record = reader.recv().await.expect("no corruption");
                    latencies.push(sample(&record.payload));
                }
            });
        }
    }
    assert!(child.wait().expect("writer").success());
    drop(reader);
    let _ = std::fs::remove_file(path);
    latencies
}

fn child(args: &[String]) {
    let path = Path::new(&args[1]);
    let mut writer = Writer::open(path).expect("the parent made the ring");
    match args[0].as_str() {
        "throughput" => {
            let size: usize = args[2].parse().expect("size");
            let count: u64 = args[3].parse().expect("count");
            let payload = vec![0x5a; size];
            for _ in 0..count {
                loop {
                    match writer.try_push(&payload) {
                        Ok(_) => break,
                        Err(PushError::Full { .. }) => std::hint::spin_loop(),
                        Err(other) => panic!("push: {other}"),
                    }
                }
            }
        }
        _ => {
            let gap = Duration::from_nanos(args[2].parse().expect("gap"));
            let samples: usize = args[3].parse().expect("samples");
            // Let the reader settle into its wait before the first record.
            std::thread::sleep(Duration::from_millis(20));
            for _ in 0..samples {
                let mut payload = [0u8; 16];
                payload[..8].copy_from_slice(&now_nanos().to_le_bytes());
                writer.try_push(&payload).expect("the reader keeps up");
                std::thread::sleep(gap);
            }
        }
    }
}
