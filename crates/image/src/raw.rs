//! Raw disk images: the file (or block device) content is the virtual disk.
//!
//! # Invariants
//!
//! * The virtual size is the length of the file when it was opened; it never
//!   changes afterwards.
//! * Reads use positional I/O (`pread`), so the image has no cursor state.
//! * A read that cannot be satisfied completely from the file (for example
//!   because the file was truncated after opening) is an I/O error; missing
//!   bytes are never replaced with zeros.
//! * [`DiskImage::is_zero_range`] always answers `false` (unknown) for an
//!   in-range request: holes cannot be detected portably through `std`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{check_range, file_size, DiskImage, ImageError};

/// A raw disk image.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawImage {
    /// Opens `path` as a raw image whose virtual size is the file length.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let file = File::open(path).map_err(|e| ImageError::io(path, e))?;
        Self::from_file(file, path)
    }

    /// Wraps an already opened file; `path` is used for error messages.
    pub fn from_file(file: File, path: &Path) -> Result<Self, ImageError> {
        let size = file_size(&file, path)?;
        Ok(RawImage {
            file,
            path: path.to_path_buf(),
            size,
        })
    }
}

impl DiskImage for RawImage {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> &'static str {
        "raw"
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| ImageError::io(&self.path, e))
    }

    fn is_zero_range(&mut self, offset: u64, len: u64) -> Result<bool, ImageError> {
        check_range(offset, len, self.size)?;
        Ok(len == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn reads_back_file_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let data = pattern(10_000);
        std::fs::write(&path, &data).unwrap();

        let mut img = RawImage::open(&path).unwrap();
        assert_eq!(img.virtual_size(), 10_000);
        assert_eq!(img.format(), "raw");

        let mut buf = vec![0u8; 1234];
        img.read_at(&mut buf, 4321).unwrap();
        assert_eq!(buf, data[4321..4321 + 1234]);

        let mut all = vec![0u8; data.len()];
        img.read_at(&mut all, 0).unwrap();
        assert_eq!(all, data);

        // Empty reads are fine anywhere up to and including the end.
        img.read_at(&mut [], 10_000).unwrap();
    }

    #[test]
    fn out_of_range_reads_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, pattern(4096)).unwrap();
        let mut img = RawImage::open(&path).unwrap();

        let mut buf = [0u8; 16];
        assert!(matches!(
            img.read_at(&mut buf, 4090),
            Err(ImageError::OutOfRange {
                offset: 4090,
                len: 16,
                size: 4096
            })
        ));
        assert!(matches!(
            img.read_at(&mut buf, u64::MAX - 3),
            Err(ImageError::OutOfRange { .. })
        ));
        assert!(matches!(
            img.is_zero_range(4000, 200),
            Err(ImageError::OutOfRange { .. })
        ));
        assert!(!img.is_zero_range(0, 4096).unwrap());
        assert!(img.is_zero_range(4096, 0).unwrap());
    }

    #[test]
    fn truncated_after_open_is_an_error_not_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let mut f = File::create(&path).unwrap();
        f.write_all(&pattern(8192)).unwrap();
        drop(f);

        let mut img = RawImage::open(&path).unwrap();
        assert_eq!(img.virtual_size(), 8192);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();

        let mut buf = [0u8; 512];
        let err = img.read_at(&mut buf, 7680).unwrap_err();
        assert!(matches!(err, ImageError::Io { .. }), "{err}");
        assert!(err.to_string().contains("disk.raw"));
    }
}
