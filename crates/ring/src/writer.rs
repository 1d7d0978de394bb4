//! The writing end of a ring file.

#![forbid(unsafe_code)]

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::backoff::{deadline, Backoff};
use crate::error::{Corruption, OpenError, PushError, Role};
use crate::open::{attach, is_attached};
use crate::raw::MmapRegion;
use crate::spsc::Producer;

/// The single producer of a ring file.
///
/// Attaching bumps the writer epoch and takes the writer lock (an open-file-description lock
/// the kernel drops when this process dies), so a second live writer is refused with
/// [`OpenError::Busy`] while a restarted one gets in. A re-attached writer continues at the
/// published write position with the next sequence number; whatever a killed writer had
/// written but not published is overwritten, never seen.
#[derive(Debug)]
pub struct Writer {
    producer: Producer<MmapRegion>,
    path: std::path::PathBuf,
    /// Holds the writer lock.
    file: File,
}

impl Writer {
    /// Attaches as the writer of the ring at `path`, creating it with a data area of
    /// `capacity` bytes (a power of two, 64 B to 1 GiB) if there is none. An existing ring
    /// must have that capacity.
    pub fn create_or_open(path: impl AsRef<Path>, capacity: usize) -> Result<Writer, OpenError> {
        Writer::attach(path.as_ref(), Some(capacity))
    }

    /// Attaches as the writer of the existing ring at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Writer, OpenError> {
        Writer::attach(path.as_ref(), None)
    }

    fn attach(path: &Path, create: Option<usize>) -> Result<Writer, OpenError> {
        let attached = attach(path, create, Role::Writer)?;
        let producer =
            Producer::attach(attached.region).map_err(|corruption| OpenError::Corrupt {
                path: attached.path.clone(),
                corruption,
            })?;
        Ok(Writer {
            producer,
            path: attached.path,
            file: attached.file,
        })
    }

    /// Publishes `payload` as one record and returns its sequence number, or refuses it at
    /// once: [`PushError::Full`] when the reader has not freed room yet (unread records are
    /// never overwritten), [`PushError::TooLarge`] when it could never fit.
    pub fn try_push(&mut self, payload: &[u8]) -> Result<u64, PushError> {
        self.producer.try_push(payload)
    }

    /// Like [`try_push`](Self::try_push), but waits up to `timeout` for room, spinning
    /// briefly and then sleeping 50 µs to 1 ms between tries. Returns the last
    /// [`PushError::Full`] when the time is up.
    pub fn push_timeout(&mut self, payload: &[u8], timeout: Duration) -> Result<u64, PushError> {
        let deadline = deadline(timeout);
        let mut backoff = Backoff::default();
        loop {
            match self.producer.try_push(payload) {
                Err(PushError::Full { .. }) => {}
                other => return other,
            }
            let now = Instant::now();
            if now >= deadline {
                return self.producer.try_push(payload);
            }
            Backoff::pause_blocking(backoff.next_pause(), deadline - now);
        }
    }

    /// Like [`try_push`](Self::try_push), but waits for room as long as it takes (tokio
    /// sleeps of up to 1 ms between tries), even with no reader attached: bound it with a
    /// timeout or check [`is_reader_attached`](Self::is_reader_attached). Cancel-safe:
    /// dropping the future publishes nothing.
    #[cfg(feature = "tokio")]
    pub async fn push(&mut self, payload: &[u8]) -> Result<u64, PushError> {
        let mut backoff = Backoff::default();
        loop {
            match self.producer.try_push(payload) {
                Err(PushError::Full { .. }) => {}
                other => return other,
            }
            Backoff::pause_async(backoff.next_async_pause()).await;
        }
    }

    /// The sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.producer.next_seq()
    }

    /// This writer's epoch: 1 for the ring's first writer, one more for each re-attach.
    pub fn epoch(&self) -> u64 {
        self.producer.epoch()
    }

    /// Bytes in the data area.
    pub fn capacity(&self) -> usize {
        self.producer.capacity() as usize
    }

    /// The largest payload a record can carry (the capacity less a 24-byte record header).
    pub fn max_payload(&self) -> usize {
        self.producer.max_payload()
    }

    /// Bytes free now; a record takes its payload plus 24 bytes.
    pub fn free_bytes(&mut self) -> Result<usize, Corruption> {
        self.producer.free()
    }

    /// The reader's heartbeat counter, which it bumps while it waits for records: a value that
    /// stops changing while records pile up means the reader is gone or stuck.
    pub fn reader_heartbeat(&self) -> u64 {
        self.producer.reader_heartbeat()
    }

    /// Whether a reader is attached now: a live process holds the reader's lock. The kernel
    /// drops the lock when the reader dies, so this is exact, unlike a heartbeat.
    pub fn is_reader_attached(&self) -> std::io::Result<bool> {
        is_attached(&self.file, Role::Reader)
    }

    /// How many times a reader has attached (0: never).
    pub fn reader_epoch(&self) -> u64 {
        self.producer.reader_epoch()
    }

    /// The ring file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
