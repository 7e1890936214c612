//! Writes a device plans for a caller that moves the bytes itself by file
//! descriptor (io_uring), where the device does not simply lend its own
//! descriptor: see [`BlockDevice::plan_fd_write`](crate::BlockDevice::plan_fd_write).
//!
//! Invariants:
//! - The device has already given the writes their places (a write-back
//!   log: the records' sequence numbers and ring positions); it counts them
//!   written only in [`FdWrite::end`], which the caller calls once every
//!   transfer has completed.
//! - Whatever happens, the planned places end up written: a failed or
//!   cancelled transfer is written again synchronously by `end` from the
//!   bytes given back to it, and a plan dropped before its buffer was taken
//!   writes from that buffer. Only a plan whose buffer was taken and never
//!   given back leaves its places unwritten; the device then refuses
//!   further writes (its ordering can no longer be kept).

use crate::AlignedBuf;
use std::ops::Range;
use std::os::fd::RawFd;

/// One transfer by file descriptor: of an [`FdWrite`], or of an engine
/// plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdTransfer {
    pub fd: RawFd,
    /// Byte offset in the file.
    pub offset: u64,
    /// Bytes of the buffer it reads into or writes from.
    pub buf: Range<usize>,
}

/// What `end` is told: whether every transfer completed in full, and the
/// buffer the transfers wrote from (empty if it was lost).
pub type EndFdWrite = Box<dyn FnOnce(bool, &[u8]) + Send>;

/// See the module documentation.
pub struct FdWrite {
    pub transfers: Vec<FdTransfer>,
    buf: Option<AlignedBuf>,
    end: Option<EndFdWrite>,
}

impl FdWrite {
    /// Writes of `buf` by `transfers`; `end` runs once, from
    /// [`FdWrite::end`] or when the plan is dropped.
    pub fn new(buf: AlignedBuf, transfers: Vec<FdTransfer>, end: EndFdWrite) -> Self {
        FdWrite {
            transfers,
            buf: Some(buf),
            end: Some(end),
        }
    }

    /// The bytes to write, for the caller to hand to its I/O. Give them
    /// back to [`FdWrite::end`] once the transfers are over.
    pub fn take_buf(&mut self) -> Option<AlignedBuf> {
        self.buf.take()
    }

    /// Ends the writes: `ok` when every transfer completed in full;
    /// `written`, the buffer they wrote from. Without `ok` it writes them
    /// again synchronously (so call it where blocking is allowed then).
    pub fn end(mut self, ok: bool, written: &[u8]) {
        if let Some(end) = self.end.take() {
            end(ok, written);
        }
    }
}

impl Drop for FdWrite {
    fn drop(&mut self) {
        if let Some(end) = self.end.take() {
            let buf = self.buf.take();
            end(false, buf.as_deref().unwrap_or(&[]));
        }
    }
}

impl std::fmt::Debug for FdWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdWrite")
            .field("transfers", &self.transfers)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Each call of an end: whether ok, and the bytes it was given.
    type Seen = Arc<Mutex<Vec<(bool, Vec<u8>)>>>;

    fn recorder() -> (Seen, EndFdWrite) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let end: EndFdWrite = Box::new(move |ok, w| s.lock().unwrap().push((ok, w.to_vec())));
        (seen, end)
    }

    fn buf(byte: u8) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(4096);
        b.fill(byte);
        b
    }

    #[test]
    fn end_runs_once_with_what_it_is_told() {
        let (seen, end) = recorder();
        let mut w = FdWrite::new(buf(7), Vec::new(), end);
        let b = w.take_buf().unwrap();
        w.end(true, &b);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].0);
        assert_eq!(seen[0].1, vec![7u8; 4096]);
    }

    #[test]
    fn a_dropped_plan_ends_failed_with_its_buffer_or_with_nothing() {
        let (seen, end) = recorder();
        drop(FdWrite::new(buf(3), Vec::new(), end));
        assert_eq!(seen.lock().unwrap()[..], [(false, vec![3u8; 4096])]);

        let (seen, end) = recorder();
        let mut w = FdWrite::new(buf(3), Vec::new(), end);
        let _lost = w.take_buf();
        drop(w);
        assert_eq!(seen.lock().unwrap()[..], [(false, Vec::new())]);
    }
}
