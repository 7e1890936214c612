//! Parallax on-disk format, versions 1 and 2 (2 adds the entry journal).
//!
//! This crate is pure: it turns 4 KiB blocks into typed values and back, and
//! does no I/O. `docs/FORMAT.md` describes the same layouts for humans; the
//! offsets below are the single source of truth for the code.
//!
//! Every metadata block starts with a 64-byte [`MetaHeader`] carrying a magic
//! number, the block kind, the format version, a crc32c of the whole block,
//! the store id, the block's own address, an owner and a generation. A
//! decoder checks all of them, so a torn write (bad crc), a block of another
//! store or an older store on the same device (store id), a misdirected write
//! (address) or a block of the wrong kind is reported as an error and never
//! returned as data. Stale blocks (an older version at the right address) are
//! caught by the 23-bit check value that every parent pointer keeps of its
//! child's crc (see [`Ptr`]).
//!
//! Decoders accept arbitrary bytes and never panic.
//!
//! [`stream`] is the one part that reads and writes (through
//! `std::io::Read` and `Write`): the send stream of `parallax send` and
//! `receive`, a format of its own.

mod bitmap;
mod header;
mod journal;
mod log;
mod name;
mod node;
mod ptr;
mod registry;
pub mod stream;
mod superblock;
mod vdi;

pub use bitmap::{BitmapBlock, BITMAP_BITS};
pub use header::{block_version, Kind, MetaHeader, BASE_FORMAT_VERSION, MAGIC};
pub use journal::{JournalBlock, JournalRecord, JOURNAL_FORMAT_VERSION, JOURNAL_RECORDS_PER_BLOCK};

/// crc32c of a block as stored in its header (crc field taken as zero).
/// Public for fuzzers and tools that forge valid blocks.
pub fn block_crc_for_fuzzing(block: &[u8]) -> u32 {
    header::block_crc(block)
}
pub use log::{
    LogBlock, LogEntry, LogEntryKind, LOG_ENTRIES_PER_BLOCK, LOG_FLAG_HIDDEN, LOG_FLAG_SCHEDULED,
};
pub use name::{validate_lookup_name, validate_name, DiskRef, MAX_NEW_NAME_LEN};
pub use node::{NodeBlock, FAN_OUT, TREE_HEIGHT};
pub use ptr::Ptr;
pub use registry::{RegistryBlock, RegistryEntry, REGISTRY_ENTRIES_PER_BLOCK};
pub use superblock::{Superblock, SUPERBLOCK_ADDRS, SUPERBLOCK_REGISTRY_SLOTS};
pub use vdi::{CachePolicy, Schedule, VdiHeader, VDI_FLAG_LINEAGE};

/// Size of every block, data or metadata.
pub const BLOCK_SIZE: usize = 4096;
/// `BLOCK_SIZE` as a u64, for offset arithmetic.
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;
/// The newest format version this code reads and writes: blocks are
/// written as [`BASE_FORMAT_VERSION`] (1) unless they need version 2 (the
/// entry journal; see `journal.rs` and the superblock).
pub const FORMAT_VERSION: u16 = 2;
/// Longest name of a disk or a snapshot, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 96;
/// Largest block address a pointer can hold (40 bits): 4 PiB of store.
pub const MAX_BLOCK_ADDR: u64 = (1 << 40) - 1;

/// A 4 KiB block buffer.
pub type Block = [u8; BLOCK_SIZE];

/// A fresh zeroed block on the heap.
pub fn zeroed_block() -> Box<Block> {
    Box::new([0u8; BLOCK_SIZE])
}

/// Why a block could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("block {addr}: not a Parallax metadata block (bad magic)")]
    BadMagic { addr: u64 },
    #[error("block {addr}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): torn or corrupted write")]
    BadChecksum {
        addr: u64,
        stored: u32,
        computed: u32,
    },
    #[error(
        "block {addr}: format version {found} is newer than this program supports ({supported})"
    )]
    NewerVersion {
        addr: u64,
        found: u16,
        supported: u16,
    },
    #[error("block {addr}: expected a {expected} block, found kind {found}")]
    WrongKind {
        addr: u64,
        expected: Kind,
        found: u8,
    },
    #[error("block {addr}: belongs to block {found} (misdirected write)")]
    Misdirected { addr: u64, found: u64 },
    #[error(
        "block {addr}: belongs to another store (store id {found:#x}, expected {expected:#x})"
    )]
    ForeignStore {
        addr: u64,
        found: u64,
        expected: u64,
    },
    #[error(
        "block {addr}: stale block (check {found:#x} does not match the parent's {expected:#x})"
    )]
    Stale {
        addr: u64,
        found: u32,
        expected: u32,
    },
    #[error("block {addr}: invalid field: {what}")]
    InvalidField { addr: u64, what: String },
    #[error("buffer of {len} bytes is not a {BLOCK_SIZE}-byte block")]
    WrongLength { len: usize },
}

impl FormatError {
    pub(crate) fn field(addr: u64, what: impl Into<String>) -> Self {
        FormatError::InvalidField {
            addr,
            what: what.into(),
        }
    }
}

pub(crate) mod bytes {
    //! Little-endian field access at fixed offsets. Callers have checked
    //! that the buffer is a whole block, and every offset used is a
    //! constant below `BLOCK_SIZE`.

    pub fn get_u16(b: &[u8], off: usize) -> u16 {
        let mut a = [0u8; 2];
        a.copy_from_slice(&b[off..off + 2]);
        u16::from_le_bytes(a)
    }
    pub fn get_u32(b: &[u8], off: usize) -> u32 {
        let mut a = [0u8; 4];
        a.copy_from_slice(&b[off..off + 4]);
        u32::from_le_bytes(a)
    }
    pub fn get_u64(b: &[u8], off: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[off..off + 8]);
        u64::from_le_bytes(a)
    }
    pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
        b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Reads a length-prefixed UTF-8 name stored in `cap` bytes at `off`.
    pub fn get_name(
        b: &[u8],
        len_off: usize,
        off: usize,
        cap: usize,
        addr: u64,
    ) -> Result<String, super::FormatError> {
        let len = get_u16(b, len_off) as usize;
        if len > cap {
            return Err(super::FormatError::field(
                addr,
                format!("name length {len} exceeds {cap}"),
            ));
        }
        String::from_utf8(b[off..off + len].to_vec())
            .map_err(|_| super::FormatError::field(addr, "name is not UTF-8"))
    }

    /// Writes a name; the caller has checked `name.len() <= cap`.
    pub fn put_name(b: &mut [u8], len_off: usize, off: usize, cap: usize, name: &str) {
        let n = name.len().min(cap);
        put_u16(b, len_off, n as u16);
        b[off..off + cap].fill(0);
        b[off..off + n].copy_from_slice(&name.as_bytes()[..n]);
    }
}
