//! 1 GiB each way across a bridge over UCX over loopback TCP with checksums and memory bounded
//! (`support::bulk::one_gib_each_way`); a test binary of its own, so the peak RSS it checks is
//! this test's alone. Needs the system UCX: `--features ucx` (`scripts/test` runs it).
#![cfg(feature = "ucx")]

mod support;

use support::bridge::Hop;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_across_a_ucx_tcp_bridge_with_memory_bounded() {
    support::bulk::one_gib_each_way(Hop::Ucx).await;
}
