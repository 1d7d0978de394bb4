//! The reading end of a ring file.

#![forbid(unsafe_code)]

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::backoff::{deadline, Backoff, Pause};
use crate::error::{Corruption, OpenError, RecvError, Role};
use crate::open::{attach, is_attached};
use crate::raw::MmapRegion;
use crate::spsc::{Consumer, RecordRef};

/// A record taken out of a ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its sequence number: 0 for the ring's first record, one more for each after it,
    /// across writer restarts.
    pub seq: u64,
    /// The epoch of the writer that pushed it.
    pub epoch: u64,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// The single consumer of a ring file.
///
/// Attaching bumps the reader epoch and takes the reader lock (dropped by the kernel when
/// this process dies). A re-attached reader resumes at the stored read position: the first
/// record no earlier reader finished with. A record is released (its space given back to the
/// writer and the read position stored) as soon as [`try_recv`](Self::try_recv) has copied it
/// out, or when the closure of [`try_recv_with`](Self::try_recv_with) returns; a reader killed
/// inside that closure sees the record again after re-attaching (at least once), one killed
/// after `try_recv` returned does not (at most once).
#[derive(Debug)]
pub struct Reader {
    consumer: Consumer<MmapRegion>,
    path: std::path::PathBuf,
    /// Holds the reader lock.
    file: File,
}

impl Reader {
    /// Attaches as the reader of the ring at `path`, creating it with a data area of
    /// `capacity` bytes (a power of two, 64 B to 1 GiB) if there is none. An existing ring
    /// must have that capacity.
    pub fn create_or_open(path: impl AsRef<Path>, capacity: usize) -> Result<Reader, OpenError> {
        Reader::attach(path.as_ref(), Some(capacity))
    }

    /// Attaches as the reader of the existing ring at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Reader, OpenError> {
        Reader::attach(path.as_ref(), None)
    }

    fn attach(path: &Path, create: Option<usize>) -> Result<Reader, OpenError> {
        let attached = attach(path, create, Role::Reader)?;
        let consumer =
            Consumer::attach(attached.region).map_err(|corruption| OpenError::Corrupt {
                path: attached.path.clone(),
                corruption,
            })?;
        Ok(Reader {
            consumer,
            path: attached.path,
            file: attached.file,
        })
    }

    /// The next record, or `None` if the writer has published nothing more.
    pub fn try_recv(&mut self) -> Result<Option<Record>, RecvError> {
        self.consumer.try_pop_with(|record| Record {
            seq: record.seq,
            epoch: record.epoch,
            payload: record.payload.to_vec(),
        })
    }

    /// Hands the next record to `f` without allocating, and releases it when `f` returns;
    /// `None` (and `f` not called) if nothing is published.
    pub fn try_recv_with<T>(
        &mut self,
        f: impl FnOnce(RecordRef<'_>) -> T,
    ) -> Result<Option<T>, RecvError> {
        self.consumer.try_pop_with(f)
    }

    /// The next record, waiting up to `timeout` for one: a short spin, then sleeps from 50 µs
    /// doubling to 1 ms. `None` when the time is up.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Record>, RecvError> {
        let deadline = deadline(timeout);
        let mut backoff = Backoff::default();
        loop {
            if let Some(record) = self.try_recv()? {
                return Ok(Some(record));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let pause = backoff.next_pause();
            if let Pause::Sleep(_) = pause {
                self.heartbeat();
            }
            Backoff::pause_blocking(pause, deadline - now);
        }
    }

    /// The next record, waiting as long as it takes: yields to the executor a few times, then
    /// tokio sleeps that double up to 1 ms. Cancel-safe: a record is only taken out of the
    /// ring by the poll that returns it.
    #[cfg(feature = "tokio")]
    pub async fn recv(&mut self) -> Result<Record, RecvError> {
        let mut backoff = Backoff::default();
        loop {
            if let Some(record) = self.try_recv()? {
                return Ok(record);
            }
            let pause = backoff.next_async_pause();
            if let Pause::Sleep(_) = pause {
                self.heartbeat();
            }
            Backoff::pause_async(pause).await;
        }
    }

    /// Drops every published record not yet read and returns how many bytes that was. The way
    /// on after [`Corruption::RecordLength`], and for a reader that wants only what is new.
    pub fn skip_to_end(&mut self) -> u64 {
        self.consumer.skip_to_end()
    }

    /// Bytes published and not yet read (records plus their 24-byte headers).
    pub fn pending_bytes(&mut self) -> Result<u64, Corruption> {
        self.consumer.pending()
    }

    /// Bumps the heartbeat counter that the writer can watch ([`Writer::reader_heartbeat`]).
    /// The waiting receives do it on every sleep; a reader that does not wait through them
    /// should call it now and then.
    ///
    /// [`Writer::reader_heartbeat`]: crate::Writer::reader_heartbeat
    pub fn heartbeat(&self) {
        self.consumer.heartbeat()
    }

    /// This reader's epoch: 1 for the ring's first reader, one more for each re-attach.
    pub fn epoch(&self) -> u64 {
        self.consumer.epoch()
    }

    /// Whether a writer is attached now: a live process holds the writer's lock. The kernel
    /// drops the lock when the writer dies, so the data plane learns at once that the control
    /// plane is gone (and keeps serving with its last good config).
    pub fn is_writer_attached(&self) -> std::io::Result<bool> {
        is_attached(&self.file, Role::Writer)
    }

    /// The epoch of the latest writer to attach (0: none yet). When it changes, a writer has
    /// restarted; its records carry the new epoch.
    pub fn writer_epoch(&self) -> u64 {
        self.consumer.writer_epoch()
    }

    /// Bytes in the data area.
    pub fn capacity(&self) -> usize {
        self.consumer.capacity() as usize
    }

    /// The ring file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
