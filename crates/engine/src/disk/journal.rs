//! Entry-journal I/O: a disk's level-0 changes since its last checkpoint,
//! as a chain of journal blocks (format 2, `parallax_format::JournalBlock`;
//! FORMAT.md section 5.8).
//!
//! Invariants:
//! - Journal blocks are written to new locations only: appending copies the
//!   head block with the new records (or starts a new one with `prev` = the
//!   old head when it is full), so a chain a durable header or snapshot
//!   names never changes.
//! - Every block read back is checked against its pointer's check value,
//!   its owner, and its place in the chain (`first` of a block is the
//!   record count of the blocks behind it).

use crate::disk::log::LogWriter;
use crate::error::{Error, Result};
use crate::lineage::Version;
use crate::pool::Pool;
use parallax_format::{JournalBlock, JournalRecord, Ptr};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A journal chain as read from the device.
#[derive(Clone, Debug, Default)]
pub(crate) struct Chain {
    /// (address, block), oldest first.
    pub blocks: Vec<(u64, Arc<JournalBlock>)>,
}

/// Journal blocks of one disk already read, by address (with their crc):
/// chains of one disk share most of their blocks, which are then read and
/// kept once.
pub(crate) type BlockCache = HashMap<u64, CachedBlock>;

pub(crate) struct CachedBlock {
    block: Arc<JournalBlock>,
    crc: u32,
}

impl Chain {
    /// Every record, oldest first.
    pub fn records(&self) -> impl Iterator<Item = &JournalRecord> {
        self.blocks.iter().flat_map(|(_, b)| b.records.iter())
    }

    /// Records in the chain.
    pub fn len(&self) -> u64 {
        self.blocks.last().map_or(0, |(_, b)| b.chain_len())
    }

    /// The chain's block addresses, sorted.
    pub fn addrs(&self) -> Vec<u64> {
        let mut a: Vec<u64> = self.blocks.iter().map(|(a, _)| *a).collect();
        a.sort_unstable();
        a
    }

    /// The head block's content.
    pub fn head(&self) -> Option<&JournalBlock> {
        self.blocks.last().map(|(_, b)| &**b)
    }

    /// The version `root` plus this chain.
    pub fn version(&self, root: Ptr) -> Version {
        let mut overlay = BTreeMap::new();
        for r in self.records() {
            overlay.insert(r.vblock, r.ptr);
        }
        Version {
            root,
            overlay: crate::lineage::Overlaid::Map(Arc::new(overlay)),
            journal: Arc::new(self.addrs()),
            records: self.len(),
        }
    }
}

/// Reads the journal chain headed by `head` (null: empty) of disk `owner`.
pub(crate) fn read_journal(pool: &Pool, head: Ptr, owner: u64) -> Result<Chain> {
    read_journal_cached(pool, head, owner, &mut BlockCache::new())
}

/// [`read_journal`], taking blocks from `cache` when they are there (still
/// checked against the pointer to them) and adding those it reads.
pub(crate) fn read_journal_cached(
    pool: &Pool,
    head: Ptr,
    owner: u64,
    cache: &mut BlockCache,
) -> Result<Chain> {
    let meta = pool.meta();
    let mut blocks: Vec<(u64, Arc<JournalBlock>)> = Vec::new();
    let mut p = head;
    while !p.is_null() {
        meta.check_ptr(p, "an entry journal pointer")?;
        if blocks.len() as u64 > meta.total_blocks {
            return Err(Error::Inconsistent("an entry journal has a cycle".into()));
        }
        let block = match cache.get(&p.addr()) {
            Some(b) if p.matches_crc(b.crc) => b.block.clone(),
            _ => {
                let raw = meta.read_block(p.addr(), "an entry journal block")?;
                let (block, h, crc) =
                    JournalBlock::decode(&raw[..], p.addr(), Some(meta.store_id))?;
                p.verify_crc(crc)?;
                if h.owner != owner {
                    return Err(Error::Inconsistent(format!(
                        "entry journal block {} belongs to disk id {}, not {owner}",
                        p.addr(),
                        h.owner
                    )));
                }
                let block = Arc::new(block);
                cache.insert(
                    p.addr(),
                    CachedBlock {
                        block: block.clone(),
                        crc,
                    },
                );
                block
            }
        };
        if let Some((addr, newer)) = blocks.last() {
            if newer.first != block.chain_len() {
                return Err(Error::Inconsistent(format!(
                    "entry journal block {addr} starts at record {}, but the block before it ends at {}",
                    newer.first,
                    block.chain_len()
                )));
            }
        }
        let prev = block.prev;
        blocks.push((p.addr(), block));
        p = prev;
    }
    blocks.reverse();
    Ok(Chain { blocks })
}

/// Appends `records` to the chain whose head block is `head` (at `head_ptr`;
/// none: an empty chain), copying the head if it has room. Returns the new
/// head's pointer and content and the blocks written, newest last.
pub(super) fn append(
    w: &mut LogWriter<'_>,
    head_ptr: Ptr,
    head: Option<&JournalBlock>,
    records: &[JournalRecord],
) -> Result<(Ptr, JournalBlock, Vec<u64>)> {
    let store_id = w.pool.meta().store_id;
    let mut cur = match head {
        Some(b) if !b.is_full() => b.clone(),
        Some(b) => JournalBlock {
            prev: head_ptr,
            first: b.chain_len(),
            records: Vec::new(),
        },
        None => JournalBlock::default(),
    };
    let mut written = Vec::new();
    let mut write = |block: &JournalBlock| -> Result<Ptr> {
        let addr = (w.allocate)()?;
        w.allocated.push(addr);
        let (b, crc) = block.encode(store_id, addr, w.owner, w.generation);
        // Readable before the commit writes it (a view of a snapshot
        // answered when taken reads its chain).
        w.pool.meta().stage_block(addr, &b);
        w.out.push((addr, b));
        written.push(addr);
        Ok(Ptr::meta(addr, crc, true))
    };
    for r in records {
        if cur.is_full() {
            let p = write(&cur)?;
            cur = JournalBlock {
                prev: p,
                first: cur.chain_len(),
                records: Vec::new(),
            };
        }
        cur.records.push(*r);
    }
    let p = write(&cur)?;
    Ok((p, cur, written))
}
