//! Regular files and raw block devices.
//!
//! Positional I/O (`pread`/`pwrite`), `fdatasync` as the durability point,
//! `fallocate(PUNCH_HOLE)` for discard. With [`OpenMode::direct`] the file is
//! opened `O_DIRECT`: transfers then go through a 4 KiB-aligned bounce
//! buffer when the caller's buffer is not aligned, and offsets and lengths
//! must be multiples of 4 KiB.

use crate::aligned::{AlignedBuf, ALIGN as DIRECT_ALIGN};
use crate::{check_range, BlockDevice};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// How to open a [`FileDevice`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenMode {
    /// Bypass the page cache (`O_DIRECT`).
    pub direct: bool,
    /// Open read-only.
    pub read_only: bool,
}

/// A regular file or a raw block device.
pub struct FileDevice {
    file: File,
    len: u64,
    direct: bool,
    block_device: bool,
}

impl FileDevice {
    /// Opens an existing file or block device.
    pub fn open(path: &Path, mode: OpenMode) -> io::Result<Self> {
        let mut options = OpenOptions::new();
        options.read(true).write(!mode.read_only);
        if mode.direct {
            options.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
        }
        let mut file = options.open(path)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let len = if block_device {
            file.seek(SeekFrom::End(0))?
        } else {
            meta.len()
        };
        Ok(FileDevice {
            file,
            len,
            direct: mode.direct,
            block_device,
        })
    }

    /// Creates a new sparse regular file of `len` bytes (fails if it exists).
    pub fn create(path: &Path, len: u64, mode: OpenMode) -> io::Result<Self> {
        // Only its owner may read or lock a store: it holds every disk.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.set_len(len)?;
        file.sync_all()?;
        drop(file);
        Self::open(path, mode)
    }

    /// True when this is a block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    fn aligned(&self, ptr: *const u8, offset: u64, len: usize) -> bool {
        !self.direct
            || ((ptr as usize).is_multiple_of(DIRECT_ALIGN)
                && offset.is_multiple_of(DIRECT_ALIGN as u64)
                && len.is_multiple_of(DIRECT_ALIGN))
    }
}

impl BlockDevice for FileDevice {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.len, offset, buf.len() as u64)?;
        if self.aligned(buf.as_ptr(), offset, buf.len()) {
            return self.file.read_exact_at(buf, offset);
        }
        let mut bounce = AlignedBuf::zeroed(buf.len());
        self.file.read_exact_at(&mut bounce, offset)?;
        buf.copy_from_slice(&bounce);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.len, offset, buf.len() as u64)?;
        if self.aligned(buf.as_ptr(), offset, buf.len()) {
            return self.file.write_all_at(buf, offset);
        }
        let mut bounce = AlignedBuf::zeroed(buf.len());
        bounce.copy_from_slice(buf);
        self.file.write_all_at(&bounce, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.file.as_raw_fd())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.len, offset, len)?;
        if self.block_device || len == 0 {
            // BLKDISCARD needs an ioctl; skipping is allowed by the contract.
            return Ok(());
        }
        let mode = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, mode, offset, len) {
            Ok(()) => Ok(()),
            // File systems without hole punching: discard is advisory.
            Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip_punch_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        let dev = FileDevice::create(&path, 1 << 20, OpenMode::default()).unwrap();
        assert_eq!(dev.len(), 1 << 20);
        dev.write_at(&[0xab; 8192], 4096).unwrap();
        dev.flush().unwrap();
        let mut buf = vec![0; 8192];
        dev.read_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 0xab));
        dev.discard(4096, 4096).unwrap();
        dev.read_at(&mut buf, 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..].iter().all(|&b| b == 0xab));
        assert!(dev.write_at(&[1], 1 << 20).is_err());
        assert!(FileDevice::create(&path, 10, OpenMode::default()).is_err());
    }

    #[test]
    fn direct_io_with_unaligned_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        drop(FileDevice::create(&path, 1 << 20, OpenMode::default()).unwrap());
        let mode = OpenMode {
            direct: true,
            read_only: false,
        };
        // tmpfs refuses O_DIRECT; then there is nothing to test here.
        let Ok(dev) = FileDevice::open(&path, mode) else {
            return;
        };
        let mut data = vec![0u8; 4096 + 1];
        data[1..].fill(0x5a);
        dev.write_at(&data[1..], 8192).unwrap();
        let mut back = vec![0u8; 4096 + 3];
        dev.read_at(&mut back[3..], 8192).unwrap();
        assert!(back[3..].iter().all(|&b| b == 0x5a));
    }
}
