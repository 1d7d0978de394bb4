//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/*`) through the matching
//! `pnp_wire::fuzzing` body, so crashes found by the fuzzer stay fixed in ordinary `cargo test`.

use std::fs;
use std::path::Path;

use pnp_wire::fuzzing;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("readable corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "{target}: corpus has only {} files",
        files.len()
    );
    for file in files {
        let data = fs::read(&file).expect("readable corpus file");
        let outcome = std::panic::catch_unwind(|| body(&data));
        assert!(outcome.is_ok(), "{target}: {} failed", file.display());
    }
}

#[test]
fn frame_decoder_corpus() {
    replay("frame_decoder", fuzzing::frame_decoder);
}

#[test]
fn text_decoder_corpus() {
    replay("text_decoder", fuzzing::text_decoder);
}

#[test]
fn trailer_block_corpus() {
    replay("trailer_block", fuzzing::trailer_block);
}

#[test]
fn grpc_timeout_corpus() {
    replay("grpc_timeout", fuzzing::grpc_timeout);
}
