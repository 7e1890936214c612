//! Storage devices under a Parallax store.
//!
//! A [`BlockDevice`] is a flat array of bytes with positional reads and
//! writes, a durability point ([`BlockDevice::flush`]) and a way to give
//! space back ([`BlockDevice::discard`]). Everything above this crate talks
//! to storage only through this trait, so that tests can swap the real
//! device for one that loses writes on command.
//!
//! Contract shared by every implementation:
//! - `read_at` and `write_at` transfer the whole buffer or fail; offsets and
//!   lengths must lie inside `[0, len())`, otherwise the call fails with
//!   `InvalidInput` and touches nothing.
//! - A write is *durable* only once a later `flush` has returned `Ok`.
//!   Before that a power cut may drop it, keep it, or (for the crash
//!   simulator) tear it.
//! - Calls may be made from several threads at once.
//!
//! Implementations: [`FileDevice`] (a regular file or a raw block device,
//! optionally `O_DIRECT`), [`NbdDevice`] (an export of an NBD server: a
//! pool reached over the network), [`MemDevice`] (a volatile byte vector),
//! [`CrashDevice`] (a simulator keeping durable and written state
//! apart), and [`Slice`] (a range of another device).

mod aligned;
mod crash;
mod fd_write;
mod file;
mod mem;
mod nbd;
mod slice;

pub use aligned::{is_aligned, AlignedBuf, ALIGN};
pub use crash::{share_power, CrashDevice, CrashMode, Fault, SplitMix};
pub use fd_write::{EndFdWrite, FdTransfer, FdWrite};
pub use file::{FileDevice, OpenMode};
pub use mem::MemDevice;
pub use nbd::{NbdAddr, NbdDevice, NbdTarget, WriteGuard, REPLAY_LIMIT};
pub use slice::Slice;

use std::io;

/// A flat, fixed-size array of bytes with a durability point.
pub trait BlockDevice: Send + Sync {
    /// Size of the device in bytes.
    fn len(&self) -> u64;

    /// True when the device holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`. Not durable until [`flush`](Self::flush).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every write that completed before this call durable
    /// (`fdatasync` for files and block devices).
    fn flush(&self) -> io::Result<()>;

    /// Tells the device that `[offset, offset + len)` is no longer needed.
    /// Its content becomes unspecified (files read zeros after hole
    /// punching). Implementations may ignore the request.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// The file descriptor behind the device, for callers that submit
    /// their own asynchronous I/O (io_uring) at the same offsets. `None`
    /// for devices that are not a file (memory, the crash simulator).
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// [`raw_fd`](Self::raw_fd) for I/O that stays in flight after the call
    /// returns: the [`FdLease`] must be kept until that I/O has completed.
    /// A device that may start sending writes elsewhere (a write-back log)
    /// refuses new leases first and waits for the ones out.
    fn lend_fd(&self) -> Option<FdLease> {
        self.raw_fd().map(|fd| FdLease { fd, _hold: None })
    }

    /// The file descriptor behind the device and the file offset of the
    /// device's offset 0 (a [`Slice`] of a file lies inside it), for a
    /// device built on this one that plans I/O by descriptor.
    fn fd_region(&self) -> Option<(std::os::fd::RawFd, u64)> {
        self.raw_fd().map(|fd| (fd, 0))
    }

    /// Plans `writes` ((device offset, bytes) each) for a caller that moves
    /// the bytes itself by file descriptor (io_uring), for a device that
    /// lends no descriptor of its own ([`lend_fd`](Self::lend_fd) is `None`)
    /// but knows where the bytes go (a write-back log). The writes count
    /// as done only once [`FdWrite::end`] is called, after the transfers.
    /// The bytes to write go in a buffer of the caller's (`alloc(len)`, an
    /// aligned buffer of `len` bytes, whatever they hold: all are
    /// overwritten). `None`: not possible now (the caller uses `write_at`).
    fn plan_fd_write(
        &self,
        _writes: &[(u64, &[u8])],
        _alloc: &mut dyn FnMut(usize) -> AlignedBuf,
    ) -> Option<FdWrite> {
        None
    }
}

/// A file descriptor lent for asynchronous I/O: see [`BlockDevice::lend_fd`].
pub struct FdLease {
    pub fd: std::os::fd::RawFd,
    _hold: Option<Box<dyn Send + Sync>>,
}

impl FdLease {
    /// A lease that runs `hold`'s drop when the lease goes.
    pub fn held(fd: std::os::fd::RawFd, hold: Box<dyn Send + Sync>) -> Self {
        FdLease {
            fd,
            _hold: Some(hold),
        }
    }
}

impl std::fmt::Debug for FdLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdLease").field("fd", &self.fd).finish()
    }
}

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes.
pub(crate) fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("I/O range {offset}+{len} is outside the device of {size} bytes"),
        )),
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for std::sync::Arc<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        (**self).raw_fd()
    }
    fn lend_fd(&self) -> Option<FdLease> {
        (**self).lend_fd()
    }
    fn fd_region(&self) -> Option<(std::os::fd::RawFd, u64)> {
        (**self).fd_region()
    }
    fn plan_fd_write(
        &self,
        writes: &[(u64, &[u8])],
        alloc: &mut dyn FnMut(usize) -> AlignedBuf,
    ) -> Option<FdWrite> {
        (**self).plan_fd_write(writes, alloc)
    }
}
