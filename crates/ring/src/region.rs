//! What the ring's index logic needs from the memory it runs in.

#![forbid(unsafe_code)]

use crate::layout::Word;
use crate::sync::AtomicU64;

/// The shared memory of one ring: its header words and its data area.
///
/// [`raw::MmapRegion`](crate::raw::MmapRegion) is a mapped file; under `--cfg loom`,
/// `raw::LoomRegion` is a buffer whose every byte loom watches for unordered access, so the
/// same [`Producer`](crate::spsc::Producer) and [`Consumer`](crate::spsc::Consumer) are
/// model-checked.
pub(crate) trait Region {
    /// A header word. Both processes touch header words only through atomics.
    fn word(&self, word: Word) -> &AtomicU64;
    /// Bytes in the data area (a power of two).
    fn capacity(&self) -> u64;
    /// Copies `src` into the data area at `offset`. Panics unless
    /// `offset + src.len() <= capacity`.
    fn write(&self, offset: usize, src: &[u8]);
    /// Copies bytes from the data area at `offset` into `dst`. Panics unless
    /// `offset + dst.len() <= capacity`.
    fn read(&self, offset: usize, dst: &mut [u8]);
}

impl<R: Region + ?Sized> Region for std::sync::Arc<R> {
    fn word(&self, word: Word) -> &AtomicU64 {
        (**self).word(word)
    }
    fn capacity(&self) -> u64 {
        (**self).capacity()
    }
    fn write(&self, offset: usize, src: &[u8]) {
        (**self).write(offset, src)
    }
    fn read(&self, offset: usize, dst: &mut [u8]) {
        (**self).read(offset, dst)
    }
}
