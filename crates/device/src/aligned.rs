//! Heap buffers aligned for `O_DIRECT`.

use std::ops::{Deref, DerefMut};

/// Alignment of [`AlignedBuf`]: the block size, which `O_DIRECT` accepts on
/// every file system and device Parallax supports.
pub const ALIGN: usize = 4096;

/// A zero-initialised byte buffer whose first byte sits on a 4 KiB
/// boundary, so that a [`crate::FileDevice`] opened `O_DIRECT` can transfer
/// into or out of it (at block-aligned offsets) without a bounce copy.
///
/// It over-allocates by up to [`ALIGN`] bytes and starts at the first
/// aligned byte: no `unsafe`, and large buffers come from `calloc`, whose
/// pages the kernel zeroes lazily.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let storage = vec![0u8; len + ALIGN];
        let misalign = storage.as_ptr() as usize % ALIGN;
        let start = if misalign == 0 { 0 } else { ALIGN - misalign };
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// Shortens the buffer to `len` bytes (no-op if it is not longer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes the buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.storage.len() - self.start
    }

    /// Makes the buffer `len` bytes long, reusing its storage: bytes beyond
    /// the old length hold whatever an earlier use left there (zeros if
    /// none), so callers that recycle buffers must overwrite them all.
    /// `None` (and no change) if `len` exceeds the capacity.
    pub fn resize_within(&mut self, len: usize) -> Option<()> {
        (len <= self.capacity()).then(|| self.len = len)
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

/// True when `buf` starts on an [`ALIGN`] boundary.
pub fn is_aligned(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_sized() {
        for len in [0, 1, 4095, 4096, 4097, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(is_aligned(&b));
            assert!(b.iter().all(|&x| x == 0));
            b.fill(7);
            b.truncate(len / 2);
            assert_eq!(b.len(), len / 2);
            assert!(b.iter().all(|&x| x == 7));
            assert!(b.capacity() >= len);
            b.resize_within(len).unwrap();
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 7), "storage is kept");
            assert!(b.resize_within(b.capacity() + 1).is_none());
            assert_eq!(b.len(), len);
        }
    }
}
