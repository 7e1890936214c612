//! Metadata block I/O and the node cache.
//!
//! Tree nodes are immutable once written (copy-on-write), so the cache needs
//! no invalidation except when a block is freed and may be reused: the store
//! evicts it then. As a second line of defence, every cache hit is checked
//! against the parent pointer's check value.
//!
//! Nodes of a commit not yet written (see `disk/commit.rs`) are *staged*:
//! kept in a map beside the cache, which no eviction touches, until the
//! commit has written them; a lookup that misses the cache finds them
//! there before it would read the device. Other metadata blocks of such a
//! commit (entry journal blocks) are staged whole, and
//! [`MetaIo::read_block`] finds them the same way.
//!
//! The cache is split into [`CACHE_SHARDS`] LRU shards by block address,
//! each behind its own mutex, so that concurrent lookups on different
//! nodes do not contend on one lock. The bound is the sum of the shards'.

use crate::error::{Error, Result};
use lru::LruCache;
use parallax_device::BlockDevice;
use parallax_format::{zeroed_block, Block, NodeBlock, Ptr, BLOCK_SIZE, BLOCK_SIZE_U64};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

/// Nodes kept in memory by default (4 KiB each): 64 MiB.
pub const DEFAULT_CACHE_NODES: usize = 16384;
/// Independent LRU shards of the node cache.
const CACHE_SHARDS: usize = 16;

struct Cached {
    node: Arc<NodeBlock>,
    crc: u32,
}

/// See the module documentation.
pub(crate) struct MetaIo {
    pub dev: Arc<dyn BlockDevice>,
    pub store_id: u64,
    pub total_blocks: u64,
    cache: Vec<Mutex<LruCache<u64, Cached>>>,
    /// Nodes of commits in flight, not yet on the device.
    staged: Mutex<HashMap<u64, Cached>>,
    /// Other blocks of commits in flight, whole.
    staged_raw: Mutex<HashMap<u64, Box<Block>>>,
}

impl MetaIo {
    pub fn new(
        dev: Arc<dyn BlockDevice>,
        store_id: u64,
        total_blocks: u64,
        cache_nodes: usize,
    ) -> Self {
        let per_shard = cache_nodes.div_ceil(CACHE_SHARDS).max(4);
        let cap = NonZeroUsize::new(per_shard).unwrap_or(NonZeroUsize::MIN);
        MetaIo {
            dev,
            store_id,
            total_blocks,
            cache: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(LruCache::new(cap)))
                .collect(),
            staged: Mutex::new(HashMap::new()),
            staged_raw: Mutex::new(HashMap::new()),
        }
    }

    fn shard(&self, addr: u64) -> &Mutex<LruCache<u64, Cached>> {
        // Nodes of one commit are allocated close together: mix the bits so
        // that neighbours land in different shards.
        let h = addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60;
        &self.cache[h as usize % CACHE_SHARDS]
    }

    /// Checks that a pointer read from metadata stays inside the store.
    pub fn check_ptr(&self, p: Ptr, what: &str) -> Result<()> {
        if !p.is_null() && (p.addr() < 2 || p.addr() >= self.total_blocks) {
            return Err(Error::Inconsistent(format!(
                "{what} points at block {}, outside the store's {} blocks",
                p.addr(),
                self.total_blocks
            )));
        }
        Ok(())
    }

    pub fn read_block(&self, addr: u64, what: &str) -> Result<Box<Block>> {
        if let Some(b) = self.staged_raw.lock().get(&addr) {
            return Ok(b.clone());
        }
        let mut b = zeroed_block();
        self.dev
            .read_at(&mut b[..], addr * BLOCK_SIZE_U64)
            .map_err(Error::io(format!("reading {what} at block {addr}")))?;
        Ok(b)
    }

    pub fn write_block(&self, addr: u64, block: &Block, what: &str) -> Result<()> {
        self.dev
            .write_at(&block[..], addr * BLOCK_SIZE_U64)
            .map_err(Error::io(format!("writing {what} at block {addr}")))
    }

    /// Writes many blocks, one device write per run of consecutive
    /// addresses (the nodes of one commit are usually allocated together).
    pub fn write_many(&self, mut blocks: Vec<(u64, Box<Block>)>, what: &str) -> Result<()> {
        self.write_all(&mut blocks, what)
    }

    /// [`MetaIo::write_many`], keeping the blocks (sorted by address).
    pub fn write_all(&self, blocks: &mut [(u64, Box<Block>)], what: &str) -> Result<()> {
        blocks.sort_unstable_by_key(|(addr, _)| *addr);
        let mut i = 0;
        while i < blocks.len() {
            let mut j = i + 1;
            while j < blocks.len() && blocks[j].0 == blocks[j - 1].0 + 1 {
                j += 1;
            }
            let first = blocks[i].0;
            if j - i == 1 {
                self.write_block(first, &blocks[i].1, what)?;
            } else {
                let mut run = parallax_device::AlignedBuf::zeroed((j - i) * BLOCK_SIZE);
                for (k, (_, b)) in blocks[i..j].iter().enumerate() {
                    run[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE].copy_from_slice(&b[..]);
                }
                self.dev
                    .write_at(&run, first * BLOCK_SIZE_U64)
                    .map_err(Error::io(format!(
                        "writing {what} at blocks {first}..{}",
                        first + (j - i) as u64
                    )))?;
            }
            i = j;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<()> {
        self.dev.flush().map_err(Error::io("flushing the device"))
    }

    /// Loads the tree node `ptr` points at, expected at `level`.
    pub fn load_node(&self, ptr: Ptr, level: u8) -> Result<Arc<NodeBlock>> {
        self.check_ptr(ptr, "a tree pointer")?;
        let addr = ptr.addr();
        if let Some(c) = self.shard(addr).lock().get(&addr) {
            if ptr.matches_crc(c.crc) && c.node.level == level {
                return Ok(c.node.clone());
            }
        }
        if let Some(node) = self.staged_node(ptr, level) {
            return Ok(node);
        }
        let block = self.read_block(addr, "a tree node")?;
        let (node, _, crc) = NodeBlock::decode(&block[..], addr, Some(self.store_id), level)?;
        ptr.verify_crc(crc)?;
        for p in &node.entries {
            self.check_ptr(*p, "a tree node entry")?;
        }
        let node = Arc::new(node);
        self.shard(addr).lock().put(
            addr,
            Cached {
                node: node.clone(),
                crc,
            },
        );
        Ok(node)
    }

    /// The node `ptr` points at if the cache holds it (checked like a hit
    /// of [`MetaIo::load_node`]); never touches the device.
    pub fn cached_node(&self, ptr: Ptr, level: u8) -> Option<Arc<NodeBlock>> {
        let addr = ptr.addr();
        let hit = {
            let mut shard = self.shard(addr).lock();
            shard
                .get(&addr)
                .filter(|c| ptr.matches_crc(c.crc) && c.node.level == level)
                .map(|c| c.node.clone())
        };
        hit.or_else(|| self.staged_node(ptr, level))
    }

    fn staged_node(&self, ptr: Ptr, level: u8) -> Option<Arc<NodeBlock>> {
        let staged = self.staged.lock();
        let c = staged.get(&ptr.addr())?;
        (ptr.matches_crc(c.crc) && c.node.level == level).then(|| c.node.clone())
    }

    /// Puts a node a commit is about to write into the cache, and keeps it
    /// staged until [`MetaIo::unstage`].
    pub fn stage_node(&self, addr: u64, node: Arc<NodeBlock>, crc: u32) {
        self.staged.lock().insert(
            addr,
            Cached {
                node: node.clone(),
                crc,
            },
        );
        self.cache_node(addr, node, crc);
    }

    /// Keeps a block a commit is about to write (not a node) for
    /// [`MetaIo::read_block`] until [`MetaIo::unstage`].
    pub fn stage_block(&self, addr: u64, block: &Block) {
        self.staged_raw.lock().insert(addr, Box::new(*block));
    }

    /// The commit has written these blocks: the device serves them now.
    pub fn unstage(&self, addrs: &[u64]) {
        {
            let mut raw = self.staged_raw.lock();
            if !raw.is_empty() {
                for a in addrs {
                    raw.remove(a);
                }
            }
        }
        let mut staged = self.staged.lock();
        if staged.is_empty() {
            return;
        }
        for a in addrs {
            staged.remove(a);
        }
    }

    /// Puts a node just written into the cache.
    pub fn cache_node(&self, addr: u64, node: Arc<NodeBlock>, crc: u32) {
        self.shard(addr).lock().put(addr, Cached { node, crc });
    }

    /// Forgets a block that is being freed.
    pub fn evict(&self, addr: u64) {
        self.shard(addr).lock().pop(&addr);
        {
            let mut raw = self.staged_raw.lock();
            if !raw.is_empty() {
                raw.remove(&addr);
            }
        }
        let mut staged = self.staged.lock();
        if !staged.is_empty() {
            staged.remove(&addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parallax_device::MemDevice;
    use parallax_format::FAN_OUT;

    fn node(seed: u64) -> NodeBlock {
        NodeBlock {
            level: 0,
            entries: (0..FAN_OUT as u64)
                .map(|i| Ptr::data(1000 + seed * 1000 + i, true))
                .collect(),
        }
    }

    /// A staged node is found however full the cache gets, without the
    /// device (it is not written yet); once unstaged and evicted, a lookup
    /// goes to the device.
    #[test]
    fn staged_nodes_survive_eviction_until_unstaged() {
        let meta = MetaIo::new(Arc::new(MemDevice::new(64 << 20)), 7, 16384, 1);
        let n = node(1);
        let (_, crc) = n.encode(7, 50, 1, 1);
        meta.stage_node(50, Arc::new(n.clone()), crc);
        for a in 100..1000u64 {
            let m = node(a);
            let (_, c) = m.encode(7, a, 1, 1);
            meta.cache_node(a, Arc::new(m), c);
        }
        let ptr = Ptr::meta(50, crc, true);
        assert_eq!(*meta.load_node(ptr, 0).unwrap(), n);
        assert!(meta.cached_node(ptr, 0).is_some());
        meta.unstage(&[50]);
        meta.evict(50);
        assert!(meta.load_node(ptr, 0).is_err(), "found on a zeroed device");
    }
}
