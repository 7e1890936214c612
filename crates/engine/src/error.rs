//! Errors of the engine.
//!
//! Kinds are kept apart so that callers can tell them apart: I/O failures
//! of the device, corruption found in metadata, a full store, and mistakes
//! of the caller (unknown names, bad ranges).

use parallax_format::FormatError;
use std::io;

/// Every error the engine returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("corrupt metadata: {0}")]
    Corrupt(#[from] FormatError),
    #[error("corrupt store: {0}")]
    Inconsistent(String),
    #[error("not a Parallax store: {0}")]
    NotAStore(String),
    #[error("the store was written by a newer Parallax (format version {found}; this program reads up to {supported})")]
    NewerVersion { found: u16, supported: u16 },
    #[error("no space left in the store")]
    NoSpace,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// Refused because something else depends on the object.
    #[error("{0}")]
    Busy(String),
    #[error("{0} is read-only")]
    ReadOnly(String),
    #[error(
        "disk {0} failed an earlier write and refuses further work until the store is reopened"
    )]
    Poisoned(String),
}

/// Result with the engine's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let context = context.into();
        move |source| {
            if source.raw_os_error() == Some(28) {
                Error::NoSpace
            } else {
                Error::Io { context, source }
            }
        }
    }
}
