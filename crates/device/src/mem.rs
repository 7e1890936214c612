//! A volatile in-memory device: every write is "durable" at once.

use crate::{check_range, BlockDevice};
use parking_lot::RwLock;
use std::io;

/// A byte vector behind a lock. Useful for unit tests and benchmarks.
pub struct MemDevice {
    bytes: RwLock<Vec<u8>>,
}

impl MemDevice {
    /// A zero-filled device of `len` bytes.
    pub fn new(len: u64) -> Self {
        Self::from_bytes(vec![0; len as usize])
    }

    /// A device holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemDevice {
            bytes: RwLock::new(bytes),
        }
    }

    /// A copy of the whole content.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.read().clone()
    }
}

impl BlockDevice for MemDevice {
    fn len(&self) -> u64 {
        self.bytes.read().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read();
        check_range(bytes.len() as u64, offset, buf.len() as u64)?;
        let start = offset as usize;
        buf.copy_from_slice(&bytes[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write();
        check_range(bytes.len() as u64, offset, buf.len() as u64)?;
        let start = offset as usize;
        bytes[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write();
        check_range(bytes.len() as u64, offset, len)?;
        let start = offset as usize;
        bytes[start..start + len as usize].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let dev = MemDevice::new(8192);
        dev.write_at(&[7; 100], 4000).unwrap();
        let mut buf = [0; 100];
        dev.read_at(&mut buf, 4000).unwrap();
        assert_eq!(buf, [7; 100]);
        assert!(dev.write_at(&[1; 10], 8190).is_err());
        assert!(dev.read_at(&mut buf, u64::MAX - 5).is_err());
        dev.discard(4000, 50).unwrap();
        dev.read_at(&mut buf, 4000).unwrap();
        assert_eq!(&buf[..50], &[0; 50]);
        assert_eq!(&buf[50..], &[7; 50]);
    }
}
