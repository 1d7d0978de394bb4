//! Receive buffers for rendezvous bodies, used again once their reader is done with them.
//!
//! A rendezvous body is fetched into a buffer of its own length. Allocated fresh each time, a
//! fragment of a few MiB is a new mapping the kernel zero-fills page by page and unmaps again
//! when the reader drops it: a bulk transfer spent a fifth of its CPU on page faults that way.
//! The pool keeps buffers the readers have dropped (up to a byte limit) and hands them out
//! again, already mapped; a buffer of the same length as last time is not even cleared.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Bodies shorter than this are allocated as they come (they are not worth keeping).
pub(crate) const POOLED_FROM: usize = 64 << 10;

/// Buffers for rendezvous bodies; shared by the worker thread (takes) and the readers (give
/// back, from any thread, when the last [`Bytes`] of a body is dropped).
#[derive(Debug)]
pub(crate) struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    /// Most bytes (capacity) kept for reuse.
    keep: usize,
}

impl BufferPool {
    /// A pool that keeps at most `keep` bytes of unused buffers.
    pub(crate) fn new(keep: usize) -> Arc<Self> {
        Arc::new(Self {
            free: Mutex::new(Vec::new()),
            keep,
        })
    }

    /// A buffer of `len` bytes (contents unspecified: the receive overwrites them), from the
    /// pool when one fits (capacity at least `len`, at most twice it).
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        match self.reuse(len) {
            Some(mut buf) => {
                // Clears only what grows past its last length.
                buf.resize(len, 0);
                buf
            }
            None => vec![0; len],
        }
    }

    /// An empty buffer with room for `capacity` bytes, from the pool when one fits (to be
    /// filled with `extend_from_slice`, which writes each byte once).
    pub(crate) fn take_empty(&self, capacity: usize) -> Vec<u8> {
        match self.reuse(capacity) {
            Some(mut buf) => {
                buf.clear();
                buf
            }
            None => Vec::with_capacity(capacity),
        }
    }

    /// A kept buffer for `capacity` bytes (its capacity at least that, at most twice it), if
    /// the size is pooled and one fits; its length is whatever it had.
    fn reuse(&self, capacity: usize) -> Option<Vec<u8>> {
        if capacity < POOLED_FROM {
            return None;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let i = free
            .iter()
            .position(|b| b.capacity() >= capacity && b.capacity() / 2 <= capacity)?;
        Some(free.swap_remove(i))
    }

    /// `buf` (filled to its length) as [`Bytes`] whose last drop brings it back here.
    pub(crate) fn freeze(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        if buf.capacity() < POOLED_FROM {
            return Bytes::from(buf);
        }
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let kept: usize = free.iter().map(Vec::capacity).sum();
        if kept + buf.capacity() <= self.keep {
            free.push(buf);
        }
    }

    /// Bytes kept for reuse now.
    #[cfg(test)]
    fn kept(&self) -> usize {
        let free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.iter().map(Vec::capacity).sum()
    }
}

/// A body's buffer, on its way back to the pool when dropped.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_body_is_used_again_and_the_pool_stays_under_its_limit() {
        let pool = BufferPool::new(3 << 20);
        let mut buf = pool.take(1 << 20);
        buf.fill(7);
        let ptr = buf.as_ptr();
        let body = pool.freeze(buf);
        let slice = body.slice(10..20);
        drop(body);
        assert_eq!(pool.kept(), 0, "a slice still holds it");
        assert_eq!(&slice[..], &[7; 10]);
        drop(slice);
        assert_eq!(pool.kept(), 1 << 20);
        // Same length: the same memory, not cleared.
        let again = pool.take(1 << 20);
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again[0], 7);
        // A shorter fit is cut to length; a much shorter one gets its own buffer.
        let shorter = pool.freeze(again);
        drop(shorter);
        assert_eq!(pool.take(700 << 10).len(), 700 << 10);
        let small = pool.take(100 << 10);
        assert_eq!(small.len(), 100 << 10);
        // Over the limit, buffers are freed rather than kept.
        let bodies: Vec<Bytes> = (0..5).map(|_| pool.freeze(pool.take(1 << 20))).collect();
        drop(bodies);
        assert!(pool.kept() <= 3 << 20, "kept {}", pool.kept());
        // Small bodies never enter the pool.
        drop(pool.freeze(vec![1; 100]));
        assert!(pool.kept() <= 3 << 20);
    }
}
