//! Metadata block I/O and the node cache.
//!
//! Tree nodes are immutable once written (copy-on-write), so the cache needs
//! no invalidation except when a block is freed and may be reused: the store
//! evicts it then. As a second line of defence, every cache hit is checked
//! against the parent pointer's check value.
//!
//! The cache is split into [`CACHE_SHARDS`] LRU shards by block address,
//! each behind its own mutex, so that concurrent lookups on different
//! nodes do not contend on one lock. The bound is the sum of the shards'.

use crate::error::{Error, Result};
use lru::LruCache;
use parallax_device::BlockDevice;
use parallax_format::{zeroed_block, Block, NodeBlock, Ptr, BLOCK_SIZE, BLOCK_SIZE_U64};
use parking_lot::Mutex;
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
        let mut shard = self.shard(addr).lock();
        let c = shard.get(&addr)?;
        (ptr.matches_crc(c.crc) && c.node.level == level).then(|| c.node.clone())
    }

    /// Puts a node just written into the cache.
    pub fn cache_node(&self, addr: u64, node: Arc<NodeBlock>, crc: u32) {
        self.shard(addr).lock().put(addr, Cached { node, crc });
    }

    /// Forgets a block that is being freed.
    pub fn evict(&self, addr: u64) {
        self.shard(addr).lock().pop(&addr);
    }
}
