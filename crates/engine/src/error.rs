//! Errors of the engine.
//!
//! Kinds are kept apart so that callers can tell them apart: I/O failures
//! of the device, corruption found in metadata, a full store, a disk
//! deleted under a handle, and mistakes of the caller (unknown names, bad
//! ranges). Each message says what went wrong once: an error that wraps
//! another prints the other's message itself and does not expose it again
//! as its `source()`, so printing a chain never repeats a cause.

use parallax_format::FormatError;
use std::io;

/// Every error the engine returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device failed (other than by running out of space).
    #[error("I/O error while {context}: {error}")]
    Io { context: String, error: io::Error },
    #[error("corrupt metadata: {0}")]
    Corrupt(FormatError),
    #[error("corrupt store: {0}")]
    Inconsistent(String),
    #[error("not a Parallax store: {0}")]
    NotAStore(String),
    #[error("the store was written by a newer Parallax (format version {found}; this program reads up to {supported})")]
    NewerVersion { found: u16, supported: u16 },
    /// The store (or the device under it) is full.
    #[error("no space left in the store")]
    NoSpace,
    /// No disk or snapshot of that name (or id).
    #[error("{0}")]
    NotFound(String),
    /// The disk this handle was opened on has been deleted since.
    #[error("disk {0} was deleted")]
    Deleted(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// Refused because something else depends on the object.
    #[error("{0}")]
    Busy(String),
    #[error("{0} is read-only")]
    ReadOnly(String),
    /// The superblock names a write-back log this open was not given: the
    /// newest writes of the store may be there.
    #[error(
        "the store's newest writes may be in the local write-back log {id:016x} (the cache of {cache_bytes} bytes it was served with): serve it with that --cache and --cache-size, or give the log up with `parallax forget-write-log` (writes only that log holds are lost)"
    )]
    NeedsWriteLog { id: u64, cache_bytes: u64 },
    #[error(
        "disk {0} failed an earlier write and refuses further work until the store is reopened"
    )]
    Poisoned(String),
    /// Shared mode: this host may no longer write (its lease may have
    /// ended, or another host holds the disk's writer key now).
    #[error("fenced: {0}")]
    Fenced(String),
}

/// Result with the engine's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl From<FormatError> for Error {
    fn from(e: FormatError) -> Error {
        Error::Corrupt(e)
    }
}

impl Error {
    /// Maps a device error met while doing `context`: a full device
    /// (`ENOSPC`) is [`Error::NoSpace`], anything else [`Error::Io`].
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let context = context.into();
        move |error| {
            // A quota or a file-size limit on the store's file is a full
            // store too (NBD's ENOSPC).
            if matches!(
                error.kind(),
                io::ErrorKind::StorageFull
                    | io::ErrorKind::QuotaExceeded
                    | io::ErrorKind::FileTooLarge
            ) {
                Error::NoSpace
            } else {
                Error::Io { context, error }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_device_is_no_space_and_causes_print_once() {
        let full = io::Error::from(io::ErrorKind::StorageFull);
        assert!(matches!(Error::io("writing")(full), Error::NoSpace));
        for errno in [122 /* EDQUOT */, 27 /* EFBIG */] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(matches!(Error::io("writing")(e), Error::NoSpace), "{errno}");
        }
        let e = Error::io("writing block 7")(io::Error::other("disk on fire"));
        assert_eq!(
            e.to_string(),
            "I/O error while writing block 7: disk on fire"
        );
        assert!(std::error::Error::source(&e).is_none());
        let c = Error::from(FormatError::Stale {
            addr: 9,
            found: 1,
            expected: 2,
        });
        assert!(std::error::Error::source(&c).is_none());
    }
}
