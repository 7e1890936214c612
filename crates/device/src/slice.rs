//! A range of another device, seen as a device of its own.

use crate::{check_range, BlockDevice};
use std::io;
use std::sync::Arc;

/// `[start, start + len)` of `inner`. Its file descriptor is the inner
/// device's only when the range starts at 0 (offsets then mean the same on
/// both); otherwise it has none, and [`BlockDevice::fd_region`] tells
/// where in the file it lies.
pub struct Slice {
    inner: Arc<dyn BlockDevice>,
    start: u64,
    len: u64,
}

impl Slice {
    /// Fails with `InvalidInput` if the range does not lie inside `inner`.
    pub fn new(inner: Arc<dyn BlockDevice>, start: u64, len: u64) -> io::Result<Slice> {
        check_range(inner.len(), start, len)?;
        Ok(Slice { inner, start, len })
    }

    /// The device the range is part of.
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
}

impl BlockDevice for Slice {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.len, offset, buf.len() as u64)?;
        self.inner.read_at(buf, self.start + offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.len, offset, buf.len() as u64)?;
        self.inner.write_at(buf, self.start + offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.len, offset, len)?;
        self.inner.discard(self.start + offset, len)
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        if self.start == 0 {
            self.inner.raw_fd()
        } else {
            None
        }
    }

    fn fd_region(&self) -> Option<(std::os::fd::RawFd, u64)> {
        let (fd, base) = self.inner.fd_region()?;
        Some((fd, base.checked_add(self.start)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDevice;

    #[test]
    fn a_slice_maps_offsets_and_refuses_what_lies_outside_it() {
        let mem = Arc::new(MemDevice::new(16));
        let s = Slice::new(mem.clone(), 4, 8).unwrap();
        s.write_at(&[1, 2], 6).unwrap();
        assert_eq!(&mem.to_bytes()[10..12], &[1, 2]);
        let mut b = [0u8; 2];
        s.read_at(&mut b, 6).unwrap();
        assert_eq!(b, [1, 2]);
        assert!(s.write_at(&[1, 2], 7).is_err());
        assert!(s.read_at(&mut b, 8).is_err());
        assert!(Slice::new(mem, 10, 8).is_err());
    }
}
