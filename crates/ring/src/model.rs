//! The ring over loom's atomics and cells, for `tests/loom.rs` (only under `--cfg loom`).

#![forbid(unsafe_code)]

use std::sync::Arc;

use crate::error::{PushError, RecvError};
use crate::raw::LoomRegion;
use crate::spsc::{Consumer, Producer};

/// The writing end of a model ring.
#[derive(Debug)]
pub struct ModelWriter(Producer<Arc<LoomRegion>>);

/// The reading end of a model ring.
#[derive(Debug)]
pub struct ModelReader(Consumer<Arc<LoomRegion>>);

/// A fresh ring of `capacity` bytes with both ends attached.
pub fn ring(capacity: usize) -> (ModelWriter, ModelReader) {
    let region = Arc::new(LoomRegion::new(capacity));
    let writer = Producer::attach(region.clone()).expect("a fresh ring");
    let reader = Consumer::attach(region).expect("a fresh ring");
    (ModelWriter(writer), ModelReader(reader))
}

impl ModelWriter {
    /// [`Writer::try_push`](crate::Writer::try_push).
    pub fn try_push(&mut self, payload: &[u8]) -> Result<u64, PushError> {
        self.0.try_push(payload)
    }

    /// Writes a record, makes only the first `stores` of its publishing stores, and then
    /// dies; a new writer attaches to the region in its place.
    pub fn crash_and_reattach(self, payload: &[u8], stores: usize) -> ModelWriter {
        let region = self.0.push_then_crash(payload, stores);
        ModelWriter(Producer::attach(region).expect("a consistent ring"))
    }

    /// The next sequence number.
    pub fn next_seq(&self) -> u64 {
        self.0.next_seq()
    }
}

impl ModelReader {
    /// [`Reader::try_recv`](crate::Reader::try_recv): sequence number and payload.
    pub fn try_recv(&mut self) -> Result<Option<(u64, Vec<u8>)>, RecvError> {
        self.0
            .try_pop_with(|record| (record.seq, record.payload.to_vec()))
    }
}
