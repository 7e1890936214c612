//! Block allocation from extents.
//!
//! The store is divided into extents (see `parallax_format::Superblock`);
//! each has an allocation bitmap kept in two ping-pong slots and an owner
//! (the host id holding the extent, 0 = unowned). This allocator hands out
//! blocks only from extents owned by its host id, and claims an unowned
//! extent (writing its owner field) when the owned ones are full. It never
//! touches extents owned by another host, so several appliances can share
//! one store. In shared mode (a [`Coordinator`]) an unowned extent is
//! taken only once the coordinator granted it (this host's view of other
//! extents may be stale: one it sees unowned may have been taken since),
//! and a block freed in an extent this host does not own is left
//! allocated (counted by [`Allocator::foreign_frees`]): only an extent's
//! owner writes its bitmap.
//!
//! Invariants (the crash-consistency argument of `docs/FORMAT.md` rests on them):
//! - The durable bitmap of every extent is a superset of the blocks that any
//!   durable metadata (superblock, VDI header) can reach. Hence: new
//!   allocations reach the disk in a [`Allocator::plan_sync`] write that is
//!   flushed *before* the header that references them; and a block is given
//!   back ([`Allocator::release`]) only after the commit that stopped
//!   referencing it is durable.
//! - Bitmap slot writes are serialised (the store holds its sync lock from
//!   plan to flush), so a slot is overwritten only while the other slot holds
//!   the latest durable state.

use crate::coord::Coordinator;
use crate::error::{Error, Result};
use parallax_device::BlockDevice;
use std::sync::Arc;

/// The owner an extent gets in this host's view when the coordinator
/// refused it: some other host took it.
const TAKEN_ELSEWHERE: u64 = u64::MAX;
use parallax_format::{BitmapBlock, Block, Superblock, BLOCK_SIZE, BLOCK_SIZE_U64};

struct Extent {
    bitmap: BitmapBlock,
    /// Data blocks in this extent.
    len: u64,
    free: u64,
    /// Slot (0 = A, 1 = B) that the next bitmap write goes to.
    next_slot: u64,
    /// The bitmap changed since it was last written.
    dirty: bool,
    /// Blocks were allocated since it was last written: a commit must
    /// write it before its header (I2). Frees alone may wait.
    allocated: bool,
    /// Where to start looking for a free block.
    hint: u64,
}

/// A bitmap write planned by [`Allocator::plan_sync`].
pub(crate) struct BitmapWrite {
    extent: usize,
    pub addr: u64,
    pub block: Box<Block>,
    generation: u64,
}

/// A block given back that was not allocated (or is outside every
/// extent's data area): a bug in the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DoubleFree(pub u64);

/// See the module documentation.
pub(crate) struct Allocator {
    host_id: u64,
    store_id: u64,
    first_extent: u64,
    extent_blocks: u64,
    extents: Vec<Extent>,
    cursor: usize,
    /// The extent the last run of metadata blocks came from: the next
    /// search starts there, so extents that frees left fragmented are not
    /// scanned again on every commit.
    run_cursor: usize,
    /// Extents neither of whose bitmap slots was valid when loaded
    /// (formatting writes one in every extent, so this is damage).
    lost: Vec<u64>,
    /// Shared mode: who grants unowned extents.
    coord: Option<Arc<dyn Coordinator>>,
    /// Shared mode: blocks freed in extents this host does not own, left
    /// allocated.
    foreign_frees: u64,
}

impl Allocator {
    /// Reads every extent's bitmap. An extent with no valid slot is loaded
    /// unowned and empty, and listed by [`Allocator::lost_bitmaps`].
    pub fn load(dev: &dyn BlockDevice, sb: &Superblock, host_id: u64) -> Result<Self> {
        let mut extents = Vec::with_capacity(sb.extent_count as usize);
        let mut lost = Vec::new();
        let mut buf = vec![0u8; 2 * BLOCK_SIZE];
        for index in 0..sb.extent_count {
            let start = sb.extent_start(index);
            dev.read_at(&mut buf, start * BLOCK_SIZE_U64)
                .map_err(Error::io(format!("reading the bitmaps of extent {index}")))?;
            let len = sb.extent_len(index);
            let slots: Vec<Option<BitmapBlock>> = (0..2)
                .map(|s| {
                    let block = &buf[s * BLOCK_SIZE..(s + 1) * BLOCK_SIZE];
                    BitmapBlock::decode(block, start + s as u64, Some(sb.store_id))
                        .ok()
                        .filter(|b| b.extent_index == index && b.data_blocks == len)
                })
                .collect();
            let best = match (&slots[0], &slots[1]) {
                (Some(a), Some(b)) if b.generation > a.generation => Some((1, b.clone())),
                (Some(a), _) => Some((0, a.clone())),
                (None, Some(b)) => Some((1, b.clone())),
                (None, None) => None,
            };
            let (next_slot, bitmap) = match best {
                Some((slot, bm)) => (1 - slot, bm),
                None => {
                    lost.push(index);
                    (0, BitmapBlock::empty(index, len))
                }
            };
            let free = len - bitmap.count();
            extents.push(Extent {
                bitmap,
                len,
                free,
                next_slot,
                dirty: false,
                allocated: false,
                hint: 0,
            });
        }
        Ok(Allocator {
            host_id,
            store_id: sb.store_id,
            first_extent: sb.first_extent,
            extent_blocks: sb.extent_blocks(),
            extents,
            cursor: 0,
            run_cursor: 0,
            lost,
            coord: None,
            foreign_frees: 0,
        })
    }

    /// Repair: every extent that had no valid bitmap is written at the
    /// next sync (with what was claimed in it since).
    pub fn rewrite_lost(&mut self) {
        for ei in std::mem::take(&mut self.lost) {
            self.extents[ei as usize].dirty = true;
            self.extents[ei as usize].allocated = true;
        }
    }

    /// Extents that had no valid bitmap slot when loaded.
    pub fn lost_bitmaps(&self) -> &[u64] {
        &self.lost
    }

    /// Repair: marks `addr` allocated if it is a data block marked free
    /// (some metadata references it). Returns whether it changed.
    pub fn claim(&mut self, addr: u64) -> bool {
        let Some((ei, index)) = self.locate(addr) else {
            return false;
        };
        let e = &mut self.extents[ei];
        if e.bitmap.get(index) {
            return false;
        }
        e.bitmap.set(index, true);
        e.free -= 1;
        e.dirty = true;
        e.allocated = true;
        true
    }

    fn addr_of(&self, extent: usize, index: u64) -> u64 {
        self.first_extent + extent as u64 * self.extent_blocks + 2 + index
    }

    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        let rel = addr.checked_sub(self.first_extent)?;
        let extent = (rel / self.extent_blocks) as usize;
        let within = rel % self.extent_blocks;
        let e = self.extents.get(extent)?;
        (within >= 2 && within - 2 < e.len).then_some((extent, within - 2))
    }

    /// Free blocks this host may still allocate: free blocks of its own
    /// extents and of unowned extents.
    pub fn free_blocks(&self) -> u64 {
        self.extents
            .iter()
            .filter(|e| e.bitmap.owner == self.host_id || e.bitmap.owner == 0)
            .map(|e| e.free)
            .sum()
    }

    /// Data blocks in the whole store, and allocated ones (all owners).
    pub fn totals(&self) -> (u64, u64) {
        let total = self.extents.iter().map(|e| e.len).sum();
        let used = self.extents.iter().map(|e| e.len - e.free).sum();
        (total, used)
    }

    /// The owner field of the extent holding data block `addr` (0:
    /// unowned), as this view has it.
    pub fn owner_of(&self, addr: u64) -> Option<u64> {
        self.locate(addr).map(|(e, _)| self.extents[e].bitmap.owner)
    }

    /// Whether `addr` is a data block marked allocated.
    pub fn is_allocated(&self, addr: u64) -> bool {
        self.locate(addr)
            .is_some_and(|(e, i)| self.extents[e].bitmap.get(i))
    }

    /// [`Allocator::is_allocated`] where this host's view can tell: in
    /// shared mode, `None` for a block of an extent it does not own (its
    /// bitmap here may be stale).
    pub fn vouches_for(&self, addr: u64) -> Option<bool> {
        match self.locate(addr) {
            Some((e, _))
                if self.coord.is_some() && self.extents[e].bitmap.owner != self.host_id =>
            {
                None
            }
            _ => Some(self.is_allocated(addr)),
        }
    }

    /// Shared mode: unowned extents are taken only once `coord` grants
    /// them.
    pub fn set_coordinator(&mut self, coord: Arc<dyn Coordinator>) {
        self.coord = Some(coord);
    }

    /// Blocks freed in extents owned by another host, left allocated.
    pub fn foreign_frees(&self) -> u64 {
        self.foreign_frees
    }

    /// Whether this host may allocate in extent `ei`: it owns it, or it is
    /// unowned and (in shared mode) the coordinator grants it now.
    fn may_use(&mut self, ei: usize) -> Result<bool> {
        let owner = self.extents[ei].bitmap.owner;
        if owner == self.host_id {
            return Ok(true);
        }
        if owner != 0 {
            return Ok(false);
        }
        let Some(coord) = &self.coord else {
            return Ok(true);
        };
        if coord.claim_extent(ei as u64)? {
            return Ok(true);
        }
        self.extents[ei].bitmap.owner = TAKEN_ELSEWHERE;
        Ok(false)
    }

    /// Allocates one block, refusing when no more than `reserve` free blocks
    /// would remain (metadata allocations pass 0, data allocations keep room
    /// for the metadata their commit will need).
    pub fn allocate(&mut self, reserve: u64) -> Result<u64> {
        if self.free_blocks() <= reserve {
            return Err(Error::NoSpace);
        }
        let n = self.extents.len();
        // Owned extents first, starting at the cursor; then claim one.
        for pass in 0..2 {
            for step in 0..n {
                let ei = (self.cursor + step) % n;
                let e = &self.extents[ei];
                let candidate = if pass == 0 {
                    e.bitmap.owner == self.host_id
                } else {
                    e.bitmap.owner == 0
                };
                if !candidate || e.free == 0 || !self.may_use(ei)? {
                    continue;
                }
                if let Some(index) = self.find_free(ei) {
                    let e = &mut self.extents[ei];
                    e.bitmap.owner = self.host_id;
                    e.bitmap.set(index, true);
                    e.free -= 1;
                    e.dirty = true;
                    e.allocated = true;
                    e.hint = index + 1;
                    self.cursor = ei;
                    return Ok(self.addr_of(ei, index));
                }
            }
        }
        Err(Error::NoSpace)
    }

    /// Allocates `n` blocks for one batch of metadata writes: consecutive
    /// ones when an extent this host may use has such a free run (so that
    /// the batch goes out in one device write), else one by one.
    pub fn allocate_run(&mut self, n: u64) -> Result<Vec<u64>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let count = self.extents.len();
        for step in 0..count {
            let ei = (self.run_cursor + step) % count;
            let e = &self.extents[ei];
            let candidate = e.bitmap.owner == self.host_id || e.bitmap.owner == 0;
            if !candidate || e.free < n {
                continue;
            }
            let Some(start) = self.find_free_run(ei, n) else {
                continue;
            };
            if !self.may_use(ei)? {
                continue;
            }
            let e = &mut self.extents[ei];
            e.bitmap.owner = self.host_id;
            for index in start..start + n {
                e.bitmap.set(index, true);
            }
            e.free -= n;
            e.dirty = true;
            e.allocated = true;
            e.hint = start + n;
            self.run_cursor = ei;
            return Ok((start..start + n).map(|i| self.addr_of(ei, i)).collect());
        }
        (0..n).map(|_| self.allocate(0)).collect()
    }

    /// The first index of `n` consecutive free blocks in extent `ei`,
    /// looking from its hint to the end, then from the start.
    fn find_free_run(&self, ei: usize, n: u64) -> Option<u64> {
        let e = &self.extents[ei];
        let hint = e.hint.min(e.len);
        e.bitmap
            .find_clear_run(hint, e.len, n)
            .or_else(|| e.bitmap.find_clear_run(0, e.len, n))
    }

    fn find_free(&self, ei: usize) -> Option<u64> {
        let e = &self.extents[ei];
        let hint = e.hint.min(e.len);
        e.bitmap
            .find_clear_run(hint, e.len, 1)
            .or_else(|| e.bitmap.find_clear_run(0, hint, 1))
    }

    /// Returns a block to the free pool. Only for blocks that no durable
    /// metadata references any more.
    pub fn release(&mut self, addr: u64) -> std::result::Result<(), DoubleFree> {
        let (ei, index) = self.locate(addr).ok_or(DoubleFree(addr))?;
        let e = &mut self.extents[ei];
        if self.coord.is_some() && e.bitmap.owner != self.host_id {
            self.foreign_frees += 1;
            return Ok(());
        }
        if !e.bitmap.get(index) {
            return Err(DoubleFree(addr));
        }
        e.bitmap.set(index, false);
        e.free += 1;
        e.dirty = true;
        e.hint = e.hint.min(index);
        Ok(())
    }

    /// Whether some extent's bitmap changed since it was last written.
    pub fn has_dirty(&self) -> bool {
        self.extents.iter().any(|e| e.dirty)
    }

    /// Encodes the bitmap of every changed extent for its next slot; with
    /// `allocations_only`, only of those where blocks were allocated.
    pub fn plan_sync(&mut self, allocations_only: bool) -> Vec<BitmapWrite> {
        let mut writes = Vec::new();
        for (ei, e) in self.extents.iter_mut().enumerate() {
            if !e.dirty || (allocations_only && !e.allocated) {
                continue;
            }
            e.dirty = false;
            e.allocated = false;
            let mut bm = e.bitmap.clone();
            bm.generation += 1;
            let addr = self.first_extent + ei as u64 * self.extent_blocks + e.next_slot;
            let (block, _) = bm.encode(self.store_id, addr);
            writes.push(BitmapWrite {
                extent: ei,
                addr,
                block,
                generation: bm.generation,
            });
        }
        writes
    }

    /// Records that planned writes are durable (`ok`), or that they failed
    /// and must be written again.
    pub fn finish_sync(&mut self, writes: &[BitmapWrite], ok: bool) {
        for w in writes {
            let e = &mut self.extents[w.extent];
            if ok {
                e.bitmap.generation = w.generation;
                e.next_slot = 1 - e.next_slot;
            } else {
                e.dirty = true;
                e.allocated = true;
            }
        }
    }

    /// The bitmaps of the extents this host may free in (its own, and
    /// unowned ones when it owns the pool alone), as they are now; `None`
    /// for the others. `gc` frees only blocks allocated at this instant.
    pub fn snapshot(&self) -> Vec<Option<BitmapBlock>> {
        self.extents
            .iter()
            .map(|e| {
                let owner = e.bitmap.owner;
                let mine = owner == self.host_id || (owner == 0 && self.coord.is_none());
                mine.then(|| e.bitmap.clone())
            })
            .collect()
    }

    /// Frees every block that was allocated in `snapshot` (taken by
    /// [`Allocator::snapshot`]), is still allocated, and is not `marked`.
    /// Blocks allocated since the snapshot are kept whatever `marked` says.
    pub fn rebuild_since(
        &mut self,
        snapshot: &[Option<BitmapBlock>],
        marked: &dyn Fn(u64) -> bool,
    ) -> u64 {
        let mut freed = 0;
        for (ei, then) in snapshot.iter().enumerate() {
            let Some(then) = then else {
                continue;
            };
            for index in 0..self.extents[ei].len {
                let addr = self.addr_of(ei, index);
                if then.get(index) && self.extents[ei].bitmap.get(index) && !marked(addr) {
                    let _ = self.release(addr);
                    freed += 1;
                }
            }
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parallax_device::MemDevice;
    use parallax_format::{Ptr, SUPERBLOCK_REGISTRY_SLOTS};

    fn sb() -> Superblock {
        Superblock {
            store_id: 1,
            generation: 1,
            total_blocks: 2 + 2 * 18,
            extent_data_blocks: 16,
            extent_count: 2,
            first_extent: 2,
            next_vdi_id: 1,
            created_ns: 0,
            write_log_id: 0,
            write_log_locator: 0,
            registry: vec![Ptr::NULL; SUPERBLOCK_REGISTRY_SLOTS],
            journaled: false,
        }
    }

    #[test]
    fn allocates_claims_releases_and_persists() {
        let dev = MemDevice::new(38 * 4096);
        let mut a = Allocator::load(&dev, &sb(), 7).unwrap();
        assert_eq!(a.free_blocks(), 32);
        let mut got = Vec::new();
        while let Ok(addr) = a.allocate(0) {
            got.push(addr);
        }
        assert_eq!(got.len(), 32);
        assert_eq!(got[0], 4);
        assert!(got.iter().all(|&b| a.is_allocated(b)));
        a.release(got[3]).unwrap();
        assert_eq!(a.allocate(0).unwrap(), got[3]);
        assert!(matches!(a.allocate(0), Err(Error::NoSpace)));
        a.release(got[5]).unwrap();
        // A second release of the same block is refused.
        assert_eq!(a.release(got[5]), Err(DoubleFree(got[5])));
        assert!(matches!(a.allocate(1), Err(Error::NoSpace)));

        let plan = a.plan_sync(false);
        assert_eq!(plan.len(), 2);
        for w in &plan {
            dev.write_at(&w.block[..], w.addr * 4096).unwrap();
        }
        a.finish_sync(&plan, true);
        let b = Allocator::load(&dev, &sb(), 7).unwrap();
        assert_eq!(b.free_blocks(), 1);
        assert!(!b.is_allocated(got[5]));
        // Another host sees nothing it may allocate.
        let c = Allocator::load(&dev, &sb(), 8).unwrap();
        assert_eq!(c.free_blocks(), 0);
        // Second sync goes to the other slot, and a torn slot falls back.
        a.release(got[0]).unwrap();
        let plan = a.plan_sync(false);
        assert_eq!(plan[0].addr, 3);
        dev.write_at(&[0xff; 100], 3 * 4096).unwrap();
        let d = Allocator::load(&dev, &sb(), 7).unwrap();
        assert!(d.is_allocated(got[0]));
    }
}
