//! A pool device whose writes can be held back (the write-back log's
//! destage stalls, so a disk's newest writes stay only in the log), or made
//! to fail (a host cut off from the pool).

use parallax_device::{BlockDevice, MemDevice};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Gate {
    pub inner: MemDevice,
    /// Writes wait while it is set.
    pub closed: AtomicBool,
    /// Writes waiting at the closed gate fail while it is set.
    pub failing: AtomicBool,
}

impl Gate {
    pub fn new(bytes: u64) -> Arc<Gate> {
        Arc::new(Gate {
            inner: MemDevice::new(bytes),
            closed: AtomicBool::new(false),
            failing: AtomicBool::new(false),
        })
    }
}

impl BlockDevice for Gate {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        while self.closed.load(Ordering::SeqCst) {
            if self.failing.load(Ordering::SeqCst) {
                return Err(io::Error::other("cut off from the pool"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
}

/// Opens the gate when dropped: a failed assertion must not leave a
/// store's clean stop waiting for a destage that cannot finish.
pub struct OpenOnDrop(pub Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.closed.store(false, Ordering::SeqCst);
    }
}
