//! Read-only access to foreign disk images (raw and qcow2) for `parallax import`.
//!
//! Every format is exposed through the [`DiskImage`] trait: a byte-addressed
//! virtual disk of [`DiskImage::virtual_size`] bytes that can be read at any
//! offset and queried for ranges that are known to read as zeros.
//!
//! # Invariants
//!
//! * Readers never write to the image file; it is opened read-only.
//! * Every read is bounds-checked against the virtual size first; a request
//!   that does not lie entirely inside `[0, virtual_size)` fails with
//!   [`ImageError::OutOfRange`] and leaves the buffer unspecified.
//! * Data taken from the image file is never trusted: all offsets and sizes are
//!   validated with checked arithmetic before use, so malformed input yields an
//!   [`ImageError`] and never a panic.
//! * [`DiskImage::is_zero_range`] is conservative: `true` is only returned when
//!   the image metadata proves the range reads as zeros; `false` only means
//!   "unknown" and the caller must read the data.
//! * The reader never reports fewer bytes than requested: a range that maps to
//!   data beyond the end of the underlying file is an error, not zeros.
//!
//! Format detection ([`open_image`]) is by magic number only: files starting
//! with the qcow2 magic `QFI\xfb` are parsed as qcow2, everything else is
//! treated as a raw image.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub mod qcow2;
pub mod raw;

pub use qcow2::{parse_qcow2_header, Qcow2Header, Qcow2Image, QCOW2_MAGIC};
pub use raw::RawImage;

/// Errors produced while opening or reading a disk image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O error on the image file.
    #[error("I/O error on {}: {error}", path.display())]
    Io {
        /// The image file the error refers to.
        path: PathBuf,
        /// The underlying error (printed in the message, not repeated as a
        /// source).
        error: io::Error,
    },
    /// The data does not start with the qcow2 magic number.
    #[error("not a qcow2 image: {0}")]
    NotQcow2(String),
    /// The image claims to be qcow2 but a field is invalid or inconsistent.
    #[error("malformed qcow2 image: {0}")]
    Malformed(String),
    /// The image is valid but uses a feature this reader does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// A request falls (partly) outside the virtual disk.
    #[error("range of {len} bytes at offset {offset} is outside the virtual disk of {size} bytes")]
    OutOfRange {
        /// Requested virtual offset.
        offset: u64,
        /// Requested length in bytes.
        len: u64,
        /// Virtual size of the image.
        size: u64,
    },
}

impl ImageError {
    /// Wraps an I/O error with the path of the file it happened on.
    pub(crate) fn io(path: &Path, error: io::Error) -> Self {
        ImageError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// A read-only virtual disk backed by an image file.
pub trait DiskImage: Send {
    /// Virtual size in bytes.
    fn virtual_size(&self) -> u64;
    /// Format name: "raw" or "qcow2".
    fn format(&self) -> &'static str;
    /// Read exactly `buf.len()` bytes at virtual offset `offset` (must be inside
    /// the virtual size). Unallocated regions read as zeros.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError>;
    /// Whether `[offset, offset + len)` is known to read as all zeros without
    /// reading data (e.g. unallocated or zero qcow2 clusters). Conservative:
    /// `false` is always allowed and means "unknown". The range must be inside
    /// the virtual size.
    fn is_zero_range(&mut self, offset: u64, len: u64) -> Result<bool, ImageError>;
}

/// Opens `path` as a disk image, detecting qcow2 by its magic `QFI\xfb`;
/// any other file (including one shorter than the magic) is opened as raw.
pub fn open_image(path: &Path) -> Result<Box<dyn DiskImage>, ImageError> {
    let file = File::open(path).map_err(|e| ImageError::io(path, e))?;
    // Rejects directories before anything is read from them.
    let size = file_size(&file, path)?;
    let mut magic = [0u8; 4];
    let mut filled = 0;
    while filled < magic.len() && (filled as u64) < size {
        match file.read_at(&mut magic[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::io(path, e)),
        }
    }
    if filled == magic.len() && magic == QCOW2_MAGIC {
        Ok(Box::new(Qcow2Image::from_file(file, path)?))
    } else {
        Ok(Box::new(RawImage::from_file(file, path)?))
    }
}

/// Returns the size in bytes of an opened file or block device.
///
/// Directories are rejected. The size is taken by seeking to the end, which
/// (unlike `metadata().len()`) also works for block devices.
pub(crate) fn file_size(mut file: &File, path: &Path) -> Result<u64, ImageError> {
    let meta = file.metadata().map_err(|e| ImageError::io(path, e))?;
    if meta.is_dir() {
        return Err(ImageError::io(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "is a directory"),
        ));
    }
    file.seek(SeekFrom::End(0))
        .map_err(|e| ImageError::io(path, e))
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<(), ImageError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ImageError::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks() {
        assert!(check_range(0, 0, 0).is_ok());
        assert!(check_range(10, 0, 10).is_ok());
        assert!(check_range(0, 10, 10).is_ok());
        assert!(matches!(
            check_range(1, 10, 10),
            Err(ImageError::OutOfRange {
                offset: 1,
                len: 10,
                size: 10
            })
        ));
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
        assert!(check_range(11, 0, 10).is_err());
    }

    #[test]
    fn error_messages_are_single_line() {
        let e = ImageError::io(
            Path::new("/x/y.img"),
            io::Error::new(io::ErrorKind::NotFound, "gone"),
        );
        assert_eq!(e.to_string(), "I/O error on /x/y.img: gone");
        let e = ImageError::OutOfRange {
            offset: 5,
            len: 10,
            size: 12,
        };
        assert_eq!(
            e.to_string(),
            "range of 10 bytes at offset 5 is outside the virtual disk of 12 bytes"
        );
        assert!(!ImageError::Malformed("x".into()).to_string().contains('\n'));
    }

    #[test]
    fn open_missing_file_reports_path() {
        let err = match open_image(Path::new("/nonexistent/parallax/image.qcow2")) {
            Ok(_) => panic!("opening a missing file succeeded"),
            Err(e) => e,
        };
        assert!(matches!(err, ImageError::Io { .. }));
        assert!(err
            .to_string()
            .contains("/nonexistent/parallax/image.qcow2"));
    }

    #[test]
    fn open_directory_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let err = match open_image(dir.path()) {
            Ok(_) => panic!("opening a directory succeeded"),
            Err(e) => e,
        };
        assert!(err.to_string().contains("is a directory"), "{err}");
    }
}
