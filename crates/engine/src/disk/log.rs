//! Snapshot-log I/O: a disk's log is a chain of log blocks from the head
//! (in the header) back to the first, each record a snapshot taken, hidden
//! or deleted (FORMAT.md, section 8).
//!
//! Invariants: log blocks are written to new locations only (a commit
//! appends by copying the head block if it has room, or starts a new one);
//! the old head is freed once the commit is durable. Every block read back
//! is checked against its pointer's check value and its owner.

use crate::disk::state::DiskState;
use crate::error::{Error, Result};
use crate::lineage::{SnapSet, SnapshotInfo};
use crate::pool::Pool;
use parallax_format::{Block, LogBlock, LogEntry, Ptr, VdiHeader, LOG_ENTRIES_PER_BLOCK};

/// Where new log blocks go: a disk's id and the commit's generation, the
/// commit's allocator, and the lists of blocks it allocated and will write.
pub(super) struct LogWriter<'a> {
    pub pool: &'a Pool,
    pub owner: u64,
    pub generation: u64,
    pub allocate: &'a mut dyn FnMut() -> Result<u64>,
    pub allocated: &'a mut Vec<u64>,
    pub out: &'a mut Vec<(u64, Box<Block>)>,
}

/// Appends `entries` to the snapshot log of `st`, copying the head block if
/// it has room. Returns the new head, its content, and the blocks to free.
pub(super) fn append(
    w: &mut LogWriter<'_>,
    st: &DiskState,
    entries: &[LogEntry],
) -> Result<(Ptr, LogBlock, Vec<u64>)> {
    let head = st.header.log_head;
    let mut freed = Vec::new();
    let start = match &st.log_block {
        Some(b) if b.entries.len() < LOG_ENTRIES_PER_BLOCK => {
            freed.push(head.addr());
            Some(b.clone())
        }
        _ => None,
    };
    let (p, block) = write_chain(w, head, start, entries)?;
    Ok((p, block, freed))
}

/// Writes `entries` as new log blocks after `prev`, starting from the
/// content `start` (a copy of the old head) if given. Returns the new head.
pub(super) fn write_chain(
    w: &mut LogWriter<'_>,
    prev: Ptr,
    start: Option<LogBlock>,
    entries: &[LogEntry],
) -> Result<(Ptr, LogBlock)> {
    let store_id = w.pool.meta().store_id;
    let mut cur = start.unwrap_or(LogBlock {
        prev,
        entries: Vec::new(),
    });
    let mut write = |block: &LogBlock| -> Result<Ptr> {
        let addr = (w.allocate)()?;
        w.allocated.push(addr);
        let (b, crc) = block.encode(store_id, addr, w.owner, w.generation);
        w.out.push((addr, b));
        Ok(Ptr::meta(addr, crc, true))
    };
    for e in entries {
        if cur.entries.len() == LOG_ENTRIES_PER_BLOCK {
            let p = write(&cur)?;
            cur = LogBlock {
                prev: p,
                entries: Vec::new(),
            };
        }
        cur.entries.push(e.clone());
    }
    let p = write(&cur)?;
    Ok((p, cur))
}

/// Reads the whole snapshot log of a disk, oldest block first.
pub(crate) fn read_chain(pool: &Pool, head: Ptr, owner: u64) -> Result<Vec<(u64, LogBlock)>> {
    let meta = pool.meta();
    let mut blocks = Vec::new();
    let mut p = head;
    while !p.is_null() {
        meta.check_ptr(p, "a snapshot log pointer")?;
        if blocks.len() as u64 > meta.total_blocks {
            return Err(Error::Inconsistent("snapshot log has a cycle".into()));
        }
        let raw = meta.read_block(p.addr(), "a snapshot log block")?;
        let (block, h, crc) = LogBlock::decode(&raw[..], p.addr(), Some(meta.store_id))?;
        p.verify_crc(crc)?;
        if h.owner != owner {
            return Err(Error::Inconsistent(format!(
                "snapshot log block {} belongs to disk id {}, not {owner}",
                p.addr(),
                h.owner
            )));
        }
        let prev = block.prev;
        blocks.push((p.addr(), block));
        p = prev;
    }
    blocks.reverse();
    Ok(blocks)
}

/// A disk's snapshot log as read at open.
pub(super) struct LoadedLog {
    pub snapshots: SnapSet,
    /// The head block's content.
    pub head: Option<LogBlock>,
    pub records: u64,
    /// Every block of the chain.
    pub addrs: Vec<u64>,
}

/// Snapshot `id` of the disk `header` describes, read from the
/// pool (shared mode: another host may be writing that disk).
pub(crate) fn snapshot_info(
    pool: &Pool,
    header: &VdiHeader,
    id: u64,
) -> Result<Option<SnapshotInfo>> {
    Ok(load_log(pool, header)?.snapshots.get(id).cloned())
}

/// Visible snapshot `name` of the disk `header` describes, from its log
/// read from the pool (shared mode: the disk may be another host's).
pub(crate) fn committed_snapshot(
    pool: &Pool,
    header: &VdiHeader,
    name: &str,
) -> Result<Option<SnapshotInfo>> {
    Ok(load_log(pool, header)?.snapshots.by_name(name).cloned())
}

/// The visible snapshots of the disk `header` describes, oldest first, from
/// its log read from the pool.
pub(crate) fn committed_snapshots(pool: &Pool, header: &VdiHeader) -> Result<Vec<SnapshotInfo>> {
    Ok(load_log(pool, header)?
        .snapshots
        .visible()
        .cloned()
        .collect())
}

/// The snapshot set a header's log describes.
pub(super) fn load_log(pool: &Pool, header: &VdiHeader) -> Result<LoadedLog> {
    let blocks = read_chain(pool, header.log_head, header.vdi_id)?;
    let mut snapshots = SnapSet::default();
    let mut records = 0;
    for (_, b) in &blocks {
        for e in &b.entries {
            snapshots.apply(e);
            records += 1;
        }
    }
    Ok(LoadedLog {
        snapshots,
        head: blocks.last().map(|(_, b)| b.clone()),
        records,
        addrs: blocks.iter().map(|(a, _)| *a).collect(),
    })
}
