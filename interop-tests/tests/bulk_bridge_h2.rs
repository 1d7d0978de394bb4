//! 1 GiB each way across a bridge over h2 with checksums and memory bounded
//! (`support::bulk::one_gib_each_way`); a test binary of its own, so the peak RSS it checks is
//! this test's alone.

mod support;

use support::bridge::Hop;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_across_an_h2_bridge_with_memory_bounded() {
    support::bulk::one_gib_each_way(Hop::H2).await;
}
