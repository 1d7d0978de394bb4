//! Replays every committed fuzz corpus file (`fuzz/corpus/frame/*`) through
//! `pnp_ucx::fuzzing::frame`, so crashes found by the fuzzer stay fixed in ordinary `cargo test`.

use std::fs;
use std::path::Path;

#[test]
fn frame_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("readable corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "corpus has only {} files", files.len());
    let mut decoded = 0;
    for file in files {
        let data = fs::read(&file).expect("readable corpus file");
        let outcome = std::panic::catch_unwind(|| pnp_ucx::fuzzing::frame(&data));
        assert!(outcome.is_ok(), "{} failed", file.display());
        let (header, body) = data.split_at(data.len().min(pnp_ucx::frame::HEADER_LEN));
        decoded += usize::from(
            pnp_ucx::frame::Frame::decode(header, bytes::Bytes::copy_from_slice(body)).is_ok(),
        );
    }
    // The seeds must reach past the decoder's first checks to be worth fuzzing from.
    assert!(decoded >= 12, "only {decoded} seeds decode");
}
