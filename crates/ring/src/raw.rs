//! The only module with `unsafe` in pnp: the mapped ring file, the lock on each end of it, and
//! (under `--cfg loom`) the model's buffer.
//!
//! # Invariants the `unsafe` blocks rely on
//!
//! 1. **The mapping outlives every pointer into it.** [`MmapRegion`] owns its [`MmapRaw`];
//!    the references and pointers it hands out borrow `&self`, so none outlives the mapping.
//! 2. **In bounds.** A region is only built over a file at least `HEADER_LEN + capacity` long
//!    (checked in [`MmapRegion::map`]); header words lie inside the first `HEADER_LEN` bytes
//!    ([`Word::offset`], tested in `layout`); every data copy is checked against the capacity
//!    with a real `assert!` before the pointer arithmetic.
//! 3. **Aligned.** `mmap` returns page-aligned memory and every header word's offset is a
//!    multiple of 8, so an `AtomicU64` may live there.
//! 4. **Header words are only accessed atomically.** Every process that follows this crate's
//!    layout touches header words only through `AtomicU64` (this module never hands out a
//!    plain reference to them), so making `&AtomicU64` over shared memory is sound.
//! 5. **No references into the data area.** Data bytes are moved with `copy_nonoverlapping`
//!    between the mapping and process-private buffers; no `&[u8]` or `&mut [u8]` over shared
//!    memory is ever made, so another process writing there cannot break Rust's aliasing
//!    rules in this one. The ring protocol (`spsc`) keeps the writer and the reader in
//!    disjoint byte ranges; a foreign process that ignores it can make us copy garbage (caught
//!    by the record checksum), not undefined behaviour in safe code.
//! 6. **The file is never shrunk while mapped.** This crate never truncates a ring file. A
//!    person who truncates one under a running process makes it fault with `SIGBUS`, as with
//!    any mapped file; a file is therefore created whole under a temporary name and linked
//!    into place, so it is never seen short.

#![allow(unsafe_code)]

#[cfg(not(loom))]
use std::fs::File;
#[cfg(not(loom))]
use std::io;
#[cfg(not(loom))]
use std::os::fd::AsRawFd;

#[cfg(not(loom))]
use memmap2::MmapRaw;

use crate::layout::{Word, HEADER_LEN};
#[cfg(not(loom))]
use crate::region::Region;
#[cfg(not(loom))]
use crate::sync::AtomicU64;

/// A ring file mapped shared, read and write.
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct MmapRegion {
    map: MmapRaw,
    capacity: u64,
}

#[cfg(not(loom))]
impl MmapRegion {
    /// Maps `file`, whose data area is `capacity` bytes. Fails if the file is shorter than
    /// the header and that data area.
    pub(crate) fn map(file: &File, capacity: u64) -> io::Result<MmapRegion> {
        let needed = HEADER_LEN as u64 + capacity;
        if file.metadata()?.len() < needed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "ring file is shorter than its header says",
            ));
        }
        let map = memmap2::MmapOptions::new()
            .len(needed as usize)
            .map_raw(file)?;
        if (map.len() as u64) < needed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "ring mapping is short",
            ));
        }
        Ok(MmapRegion { map, capacity })
    }

    /// Maps only the header of `file`, to validate it before the capacity is known.
    pub(crate) fn map_header(file: &File) -> io::Result<MmapRegion> {
        MmapRegion::map(file, 0)
    }

    /// A header word's value.
    pub(crate) fn header_word(&self, word: Word) -> u64 {
        self.atomic(word).load(crate::sync::Ordering::Acquire)
    }

    fn atomic(&self, word: Word) -> &AtomicU64 {
        let offset = word.offset();
        assert!(offset.is_multiple_of(8) && offset + 8 <= HEADER_LEN);
        // SAFETY: the pointer is in bounds (invariant 2: offset + 8 <= HEADER_LEN <= map.len())
        // and 8-aligned (invariant 3); every process accesses this word only atomically
        // (invariant 4); the returned reference borrows `self`, which owns the mapping
        // (invariant 1).
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(offset).cast::<u64>()) }
    }

    /// Stores a header word while the file is private to its creator (initialisation).
    pub(crate) fn init_word(&self, word: Word, value: u64) {
        self.atomic(word)
            .store(value, crate::sync::Ordering::Release);
    }

    /// Flushes the mapping (only used when a file is created, so that a file on a real disk
    /// is whole before it is linked into place).
    pub(crate) fn flush(&self) -> io::Result<()> {
        self.map.flush()
    }
}

#[cfg(not(loom))]
impl Region for MmapRegion {
    fn word(&self, word: Word) -> &AtomicU64 {
        self.atomic(word)
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn write(&self, offset: usize, src: &[u8]) {
        assert!(offset
            .checked_add(src.len())
            .is_some_and(|end| end as u64 <= self.capacity));
        // SAFETY: the destination range lies in the data area (the assert above and
        // invariant 2), the source is a private buffer that cannot overlap shared memory, and
        // no reference to the destination exists (invariant 5).
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.map.as_mut_ptr().add(HEADER_LEN + offset),
                src.len(),
            );
        }
    }

    fn read(&self, offset: usize, dst: &mut [u8]) {
        assert!(offset
            .checked_add(dst.len())
            .is_some_and(|end| end as u64 <= self.capacity));
        // SAFETY: the source range lies in the data area (the assert above and invariant 2),
        // the destination is a private buffer, and no reference to the source exists
        // (invariant 5).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(HEADER_LEN + offset),
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
    }
}

/// Takes an exclusive lock on byte `slot` of `file` without waiting: `Ok(false)` when another
/// open file description holds it. Linux open-file-description locks: released by the kernel
/// when the last reference to the holder's open file description goes (its descriptor and any
/// mapping made from it), so at the latest when the holder dies; and not shared between two
/// opens in one process, so two handles in one process exclude each other too.
#[cfg(all(target_os = "linux", not(loom)))]
pub(crate) fn try_lock_slot(file: &File, slot: i64) -> io::Result<bool> {
    lock_slot(file, slot, libc::F_OFD_SETLK)
}

/// Takes an exclusive lock on byte `slot` of `file` without waiting. Outside Linux these are
/// POSIX process locks: they exclude other processes, but not a second handle in this one.
#[cfg(all(unix, not(target_os = "linux"), not(loom)))]
pub(crate) fn try_lock_slot(file: &File, slot: i64) -> io::Result<bool> {
    lock_slot(file, slot, libc::F_SETLK)
}

/// Whether another open file description holds the lock on byte `slot` of `file` (that end of
/// the ring is attached by a live process).
#[cfg(all(target_os = "linux", not(loom)))]
pub(crate) fn slot_is_locked(file: &File, slot: i64) -> io::Result<bool> {
    test_slot(file, slot, libc::F_OFD_GETLK)
}

/// Whether another process holds the lock on byte `slot` of `file`.
#[cfg(all(unix, not(target_os = "linux"), not(loom)))]
pub(crate) fn slot_is_locked(file: &File, slot: i64) -> io::Result<bool> {
    test_slot(file, slot, libc::F_GETLK)
}

#[cfg(not(loom))]
fn write_lock_on(slot: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers, for which all-zero bytes is a valid
    // value (and OFD locks require `l_pid` to be 0).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = slot as libc::off_t;
    lock.l_len = 1;
    lock
}

#[cfg(not(loom))]
fn lock_slot(file: &File, slot: i64, command: libc::c_int) -> io::Result<bool> {
    let lock = write_lock_on(slot);
    // SAFETY: the descriptor is open for as long as `file` is borrowed, and `lock` is a valid
    // `flock` that outlives the call; F_OFD_SETLK / F_SETLK only read it.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), command, &lock as *const libc::flock) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(err),
    }
}

#[cfg(not(loom))]
fn test_slot(file: &File, slot: i64, command: libc::c_int) -> io::Result<bool> {
    let mut lock = write_lock_on(slot);
    // SAFETY: the descriptor is open for as long as `file` is borrowed, and `lock` is a valid,
    // exclusively borrowed `flock` that outlives the call; F_OFD_GETLK / F_GETLK write a
    // `flock` into it and nothing else.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), command, &mut lock as *mut libc::flock) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}

/// A ring in process memory for the loom model: header words as loom atomics, and every data
/// byte in a loom `UnsafeCell`, so loom reports any byte the reader reads while the writer
/// may still be writing it (and the reverse) as a causality violation.
#[cfg(loom)]
#[derive(Debug)]
pub(crate) struct LoomRegion {
    words: Vec<loom::sync::atomic::AtomicU64>,
    data: Vec<loom::cell::UnsafeCell<u8>>,
}

#[cfg(loom)]
impl LoomRegion {
    /// An initialised, empty ring of `capacity` bytes.
    pub(crate) fn new(capacity: usize) -> LoomRegion {
        let words = Word::ALL
            .iter()
            .map(|word| {
                loom::sync::atomic::AtomicU64::new(match word {
                    Word::Magic => crate::layout::MAGIC,
                    Word::Version => crate::layout::VERSION,
                    Word::HeaderLen => HEADER_LEN as u64,
                    Word::Capacity => capacity as u64,
                    _ => 0,
                })
            })
            .collect();
        let data = (0..capacity)
            .map(|_| loom::cell::UnsafeCell::new(0))
            .collect();
        LoomRegion { words, data }
    }
}

#[cfg(loom)]
impl crate::region::Region for LoomRegion {
    fn word(&self, word: Word) -> &loom::sync::atomic::AtomicU64 {
        &self.words[word.index()]
    }

    fn capacity(&self) -> u64 {
        self.data.len() as u64
    }

    fn write(&self, offset: usize, src: &[u8]) {
        for (cell, byte) in self.data[offset..offset + src.len()].iter().zip(src) {
            // SAFETY: the pointer comes from loom's cell, which is alive; loom itself checks
            // that no other thread accesses the cell concurrently, which is what is tested.
            cell.with_mut(|ptr| unsafe { *ptr = *byte });
        }
    }

    fn read(&self, offset: usize, dst: &mut [u8]) {
        for (cell, byte) in self.data[offset..offset + dst.len()].iter().zip(dst) {
            // SAFETY: as in `write`: a live cell, and loom checks the access.
            *byte = cell.with(|ptr| unsafe { *ptr });
        }
    }
}
