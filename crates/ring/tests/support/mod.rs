//! What the ring's integration tests share: a directory on tmpfs and payloads that can be
//! checked from their sequence number alone.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;

/// A temporary directory under `/dev/shm` when there is one (where pnp puts its rings).
pub fn ring_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).expect("a temporary directory in /dev/shm")
    } else {
        tempfile::tempdir().expect("a temporary directory")
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The payload of record `seq`: its length (below `max_len`) and bytes both follow from `seq`,
/// so a reader can tell a lost, repeated, reordered or torn record from a good one.
pub fn payload(seq: u64, max_len: usize) -> Vec<u8> {
    let len = (splitmix(seq) % max_len as u64) as usize;
    let mut bytes = Vec::with_capacity(len + 8);
    let mut state = seq;
    while bytes.len() < len {
        state = splitmix(state);
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}
