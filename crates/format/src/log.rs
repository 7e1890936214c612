//! Snapshot log blocks: the history of a VDI's snapshots.
//!
//! The log is a chain of blocks from newest to oldest (`prev`), headed by
//! the VDI header's `log_head`. It is append-only: taking a snapshot appends
//! a `Taken` record, deleting one appends a `Deleted` record naming its id
//! (or a `Hidden` record when other versions still need its tree).
//! Appending copies the head block to a new location (copy-on-write) or
//! starts a new head when it is full; older blocks never change.
//!
//! ```text
//! block:  0 common header (kind 6, owner = vdi_id, generation = VDI commit generation)
//!        64 8 prev    Ptr to the previous (older) log block, or null
//!        72 4 count   records used (0..=24)
//!        76 52 reserved
//!       128 records[24] of 160 bytes (3840 bytes; the last 128 bytes of the block are 0)
//! record: offset size field
//!              0    1 kind        1 = Taken, 2 = Deleted, 3 = Hidden
//!              1    1 flags       Taken: bit 0 = taken by the schedule, bit 1 = hidden
//!              2    2 reserved
//!              4    2 name_len
//!              6    2 reserved
//!              8    8 snapshot_id
//!             16    8 created_ns  (Taken) or deletion time (Deleted)
//!             24    8 root        Ptr to the snapshot's root node (Taken), null (Deleted)
//!             32    8 size_bytes  virtual size of the disk when taken (Taken)
//!             40   96 name        UTF-8 (Taken)
//!            136    8 parent      Taken: id of the version it derives from, 0 = the disk's origin
//!            144    8 journal     Taken (format 2): Ptr to the head of the
//!                                 entry journal chain the snapshot holds on
//!                                 top of `root`, or null (a tree snapshot);
//!                                 null in other records
//!            152    8 received    Taken: the identity the snapshot was received
//!                                 as (`parallax receive`), 0 = its own; 0 in
//!                                 other records
//! ```
//!
//! A *journal snapshot* (non-null `journal`) is its `root`, the base tree it
//! shares with the live tree of its time, plus the records of the chain from
//! `journal` (see `journal.rs`).

use crate::bytes::*;
use crate::{zeroed_block, Block, FormatError, Kind, MetaHeader, Ptr, MAX_NAME_LEN};

/// Records per log block.
pub const LOG_ENTRIES_PER_BLOCK: usize = 24;
const RECORDS_OFF: usize = 128;
const RECORD_LEN: usize = 160;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LogEntryKind {
    Taken = 1,
    /// The snapshot is gone and its tree with it.
    Deleted = 2,
    /// The snapshot is gone from the listing, but its tree stays: other
    /// versions branch from it (clones, or a rollback's new branch).
    Hidden = 3,
}

/// Taken record flag: the snapshot was taken by the disk's schedule.
pub const LOG_FLAG_SCHEDULED: u8 = 1;
/// Taken record flag: the snapshot is hidden (written by log compaction).
pub const LOG_FLAG_HIDDEN: u8 = 2;

/// One log record.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct LogEntry {
    pub kind: LogEntryKind,
    pub snapshot_id: u64,
    pub created_ns: u64,
    pub root: Ptr,
    pub size_bytes: u64,
    pub name: String,
    /// Taken: `LOG_FLAG_*` bits.
    pub flags: u8,
    /// Taken: the snapshot id of the version this one derives from, 0 for
    /// the disk's origin (nothing, or the snapshot it was cloned from).
    pub parent: u64,
    /// Taken: the head of the entry journal the snapshot holds on top of
    /// `root` (null: none).
    pub journal: Ptr,
    /// Taken: the identity this snapshot was received as from another
    /// store (0: none, its identity is its own).
    pub received: u64,
}

impl LogEntry {
    /// A record of kind `kind` (Deleted or Hidden) for `snapshot_id`.
    pub fn removal(kind: LogEntryKind, snapshot_id: u64, at_ns: u64) -> Self {
        LogEntry {
            kind,
            snapshot_id,
            created_ns: at_ns,
            root: Ptr::NULL,
            size_bytes: 0,
            name: String::new(),
            flags: 0,
            parent: 0,
            journal: Ptr::NULL,
            received: 0,
        }
    }
}

/// A decoded log block.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct LogBlock {
    pub prev: Ptr,
    pub entries: Vec<LogEntry>,
}

impl LogBlock {
    pub fn encode(
        &self,
        store_id: u64,
        addr: u64,
        owner: u64,
        generation: u64,
    ) -> (Box<Block>, u32) {
        let mut b = zeroed_block();
        put_u64(&mut b[..], 64, self.prev.0);
        let n = self.entries.len().min(LOG_ENTRIES_PER_BLOCK);
        put_u32(&mut b[..], 72, n as u32);
        for (i, e) in self.entries.iter().take(n).enumerate() {
            let o = RECORDS_OFF + i * RECORD_LEN;
            b[o] = e.kind as u8;
            b[o + 1] = e.flags;
            put_u64(&mut b[..], o + 136, e.parent);
            put_u64(&mut b[..], o + 144, e.journal.0);
            put_u64(&mut b[..], o + 152, e.received);
            put_u64(&mut b[..], o + 8, e.snapshot_id);
            put_u64(&mut b[..], o + 16, e.created_ns);
            put_u64(&mut b[..], o + 24, e.root.0);
            put_u64(&mut b[..], o + 32, e.size_bytes);
            put_name(&mut b[..], o + 4, o + 40, MAX_NAME_LEN, &e.name);
        }
        let crc = MetaHeader {
            kind: Kind::SnapshotLog,
            level: 0,
            store_id,
            self_addr: addr,
            owner,
            generation,
        }
        .seal(&mut b);
        (b, crc)
    }

    pub fn decode(
        block: &[u8],
        addr: u64,
        store_id: Option<u64>,
    ) -> Result<(Self, MetaHeader, u32), FormatError> {
        let (h, crc) = MetaHeader::open(block, Kind::SnapshotLog, addr, store_id)?;
        let prev = Ptr(get_u64(block, 64));
        let count = get_u32(block, 72) as usize;
        if count > LOG_ENTRIES_PER_BLOCK || !prev.is_valid() {
            return Err(FormatError::field(
                addr,
                "log count or prev pointer malformed",
            ));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let o = RECORDS_OFF + i * RECORD_LEN;
            let kind = match block[o] {
                1 => LogEntryKind::Taken,
                2 => LogEntryKind::Deleted,
                3 => LogEntryKind::Hidden,
                k => {
                    return Err(FormatError::field(
                        addr,
                        format!("log record {i} has kind {k}"),
                    ))
                }
            };
            let e = LogEntry {
                kind,
                snapshot_id: get_u64(block, o + 8),
                created_ns: get_u64(block, o + 16),
                root: Ptr(get_u64(block, o + 24)),
                size_bytes: get_u64(block, o + 32),
                name: get_name(block, o + 4, o + 40, MAX_NAME_LEN, addr)?,
                flags: block[o + 1],
                parent: get_u64(block, o + 136),
                journal: Ptr(get_u64(block, o + 144)),
                received: get_u64(block, o + 152),
            };
            let ok = e.snapshot_id != 0
                && e.size_bytes.is_multiple_of(crate::BLOCK_SIZE_U64)
                && e.root.is_valid()
                && e.journal.is_valid()
                && match kind {
                    LogEntryKind::Taken => !e.root.is_null() && !e.name.is_empty(),
                    LogEntryKind::Deleted | LogEntryKind::Hidden => {
                        e.root.is_null()
                            && e.flags == 0
                            && e.parent == 0
                            && e.journal.is_null()
                            && e.received == 0
                    }
                };
            if !ok {
                return Err(FormatError::field(
                    addr,
                    format!("log record {i} is malformed"),
                ));
            }
            entries.push(e);
        }
        Ok((LogBlock { prev, entries }, h, crc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let l = LogBlock {
            prev: Ptr::meta(5, 77, false),
            entries: vec![
                LogEntry {
                    kind: LogEntryKind::Taken,
                    snapshot_id: 1,
                    created_ns: 2,
                    root: Ptr::meta(9, 3, true),
                    size_bytes: 1 << 20,
                    name: "s1".into(),
                    flags: LOG_FLAG_SCHEDULED,
                    parent: 7,
                    journal: Ptr::meta(12, 4, false),
                    received: 0x1234_5678_9abc_def0,
                },
                LogEntry::removal(LogEntryKind::Hidden, 1, 4),
                LogEntry::removal(LogEntryKind::Deleted, 1, 5),
            ],
        };
        let (b, crc) = l.encode(1, 40, 2, 3);
        let (back, h, c) = LogBlock::decode(&b[..], 40, Some(1)).unwrap();
        assert_eq!(back, l);
        assert_eq!((h.owner, h.generation, c), (2, 3, crc));
    }
}
