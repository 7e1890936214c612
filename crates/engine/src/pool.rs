//! The block pool as every disk sees it: metadata I/O, the allocator, the
//! bitmap sync, the one path by which blocks return to the free pool, and
//! the count of clones hanging from each snapshot.
//!
//! This is the narrow context the store hands down to its disks: a disk
//! never sees the catalogue (superblock, registry) nor the table of open
//! disks, only this.
//!
//! Invariants:
//! - **One release path.** Every block given back goes through
//!   [`Pool::free`]: its cached node is evicted, and while `gc` marks
//!   ([`Pool::defer_frees`]) it is held back so that nothing the mark may
//!   still read is reused under it. A block is given back at most once; a
//!   second release of a free block is a bug: it panics in debug builds and
//!   is counted ([`Pool::double_frees`]), which `check` reports as an error.
//! - Callers free a block only when no durable metadata can reach it any
//!   more (after the commit that dropped it is durable), or when it was
//!   never referenced by anything written (an allocation given back).
//! - **Damage stops allocation.** When the store finds that a header
//!   references blocks the bitmaps call free (a lost or reverted write),
//!   it marks the pool damaged: nothing is allocated any more, so no block
//!   a damaged disk still holds is handed to another.
//! - Bitmap slot writes are serialised by the sync lock, held from planning
//!   a write to the flush that makes it durable (see `alloc.rs`).

use crate::alloc::Allocator;
use crate::coord::Coordinator;
use crate::error::{Error, Result};
use crate::meta::MetaIo;
use parallax_cache::{ReadCache, WriteLog};
use parallax_format::{BitmapBlock, Block, BLOCK_SIZE_U64};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The bitmaps of the extents this host may free in, as they were when
/// `gc` started deferring frees (see [`Pool::defer_frees`]).
pub(crate) type AllocatedBefore = Vec<Option<BitmapBlock>>;

/// See [`Pool::hold_frees`]; releases what was held back when dropped.
pub(crate) struct FreesHeld<'a>(&'a Pool);

impl Drop for FreesHeld<'_> {
    fn drop(&mut self) {
        self.0.end_deferring(None);
    }
}

/// Journal mode: records a disk's journal holds before a commit folds them
/// into tree nodes (a checkpoint): about 1 MiB of them, 256 journal
/// blocks.
pub(crate) const DEFAULT_CHECKPOINT_RECORDS: u64 = 65536;

/// See the module documentation.
pub(crate) struct Pool {
    meta: MetaIo,
    alloc: Mutex<Allocator>,
    /// Held from planning a bitmap write to the flush that makes it durable.
    sync_lock: Mutex<()>,
    /// While `gc` marks: blocks freed meanwhile, held back.
    deferred: Mutex<Option<Vec<u64>>>,
    /// (origin disk id, snapshot id) ─▶ clones made from it that exist.
    /// A leaf lock (nothing is taken under it).
    clones: Mutex<HashMap<(u64, u64), usize>>,
    double_frees: AtomicU64,
    /// Why the store's metadata cannot be trusted, if it cannot: nothing is
    /// allocated (so no block some header still references is handed out
    /// again) until it is repaired.
    damaged: Mutex<Option<String>>,
    /// Shared mode: the coordinator (set once, at open).
    coord: std::sync::OnceLock<Arc<dyn Coordinator>>,
    /// Shared mode: (disk id, snapshot id) ─▶ views of it on this host
    /// that pin it through the coordinator (one pin per host), and the
    /// incarnation the pin was put under (a lost lease took it). Held
    /// across the coordinator call, so a pin and an unpin of one snapshot
    /// never cross.
    cluster_pins: Mutex<HashMap<(u64, u64), (u32, u64)>>,
    /// The local read cache of immutable data blocks (set once, at open).
    read_cache: std::sync::OnceLock<Arc<ReadCache>>,
    /// The write-back log the pool device is seen through, if any.
    write_log: std::sync::OnceLock<Arc<WriteLog>>,
    /// Bytes of disk data read from the pool device (not from the cache);
    /// shared with plans that read it on their own.
    data_read_bytes: Arc<AtomicU64>,
    /// Disks commit level-0 changes to entry journals between checkpoints
    /// (format 2; the superblock says so once set).
    journal: std::sync::atomic::AtomicBool,
    /// Journal mode: a commit whose disk's journal holds this many records
    /// is a checkpoint.
    checkpoint_records: AtomicU64,
}

impl Pool {
    pub fn new(meta: MetaIo, alloc: Allocator) -> Pool {
        Pool {
            meta,
            alloc: Mutex::new(alloc),
            sync_lock: Mutex::new(()),
            deferred: Mutex::new(None),
            clones: Mutex::new(HashMap::new()),
            double_frees: AtomicU64::new(0),
            damaged: Mutex::new(None),
            coord: std::sync::OnceLock::new(),
            cluster_pins: Mutex::new(HashMap::new()),
            read_cache: std::sync::OnceLock::new(),
            write_log: std::sync::OnceLock::new(),
            data_read_bytes: Arc::new(AtomicU64::new(0)),
            journal: std::sync::atomic::AtomicBool::new(false),
            checkpoint_records: AtomicU64::new(DEFAULT_CHECKPOINT_RECORDS),
        }
    }

    /// Whether disks commit through entry journals (see `tree.rs`).
    pub fn journal_mode(&self) -> bool {
        self.journal.load(Ordering::SeqCst)
    }

    /// See [`Pool::set_checkpoint_records`].
    pub fn checkpoint_records(&self) -> u64 {
        self.checkpoint_records.load(Ordering::Relaxed)
    }

    /// Journal mode: a commit whose disk's journal chain holds `records`
    /// records (at least 1) is a checkpoint: they are folded into tree
    /// nodes.
    pub fn set_checkpoint_records(&self, records: u64) {
        self.checkpoint_records
            .store(records.max(1), Ordering::Relaxed);
    }

    /// Turns journal mode on (the store's superblock already says so).
    pub fn set_journal_mode(&self) {
        self.journal.store(true, Ordering::SeqCst);
    }

    /// Puts `cache` in front of the pool's data reads (once, at open).
    pub fn set_read_cache(&self, cache: Arc<ReadCache>) {
        let _ = self.read_cache.set(cache);
    }

    pub fn read_cache(&self) -> Option<&Arc<ReadCache>> {
        self.read_cache.get()
    }

    pub fn set_write_log(&self, log: Arc<WriteLog>) {
        let _ = self.write_log.set(log);
    }

    pub fn write_log(&self) -> Option<&Arc<WriteLog>> {
        self.write_log.get()
    }

    /// Shared mode with a write-back log: the log's position now (see
    /// [`Pool::drain_log_to`]); 0 otherwise.
    pub fn shared_log_mark(&self) -> u64 {
        match self.write_log() {
            Some(log) if self.coordinator().is_some() => log.head_lsn(),
            _ => 0,
        }
    }

    /// Shared mode: waits until everything the write-back log took before
    /// `mark` is on the pool (what another host will read there). Nothing
    /// to do alone on the pool or without a log.
    pub fn drain_log_to(&self, mark: u64, why: &str) -> Result<()> {
        match self.write_log() {
            Some(log) if self.coordinator().is_some() && mark != 0 => {
                // Fenced, the destage waits: say so, not an I/O error.
                self.check_fence()?;
                log.drain_to(mark).map_err(|e| match self.check_fence() {
                    Err(fenced) => fenced,
                    Ok(()) => Error::io(format!("destaging the write-back log ({why})"))(e),
                })
            }
            _ => Ok(()),
        }
    }

    /// Writes block `addr` and makes it durable. In shared mode with a
    /// write-back log, straight to the pool around the log, once every
    /// record taken so far is on the pool (what the block names may be
    /// among them): for blocks other hosts read and must never find older
    /// than a write this host acknowledged, and that no record of this log
    /// may overwrite later (the superblock; a header naming its new
    /// writer). Otherwise a write and a flush of the device.
    pub fn write_through(&self, addr: u64, block: &Block, what: &str) -> Result<()> {
        let meta = self.meta();
        match self.write_log() {
            Some(log) if self.coordinator().is_some() => {
                self.drain_log_to(log.head_lsn(), what)?;
                log.write_through(&block[..], addr * BLOCK_SIZE_U64)
                    .map_err(Error::io(format!("writing {what} at block {addr}")))
            }
            _ => meta
                .write_block(addr, block, what)
                .and_then(|_| meta.flush()),
        }
    }

    /// Counts `bytes` of disk data read from the pool device.
    pub fn count_data_read(&self, bytes: u64) {
        self.data_read_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The counter of [`Pool::count_data_read`], for plans.
    pub fn data_read_counter(&self) -> Arc<AtomicU64> {
        self.data_read_bytes.clone()
    }

    /// Bytes of disk data read from the pool device since it was opened.
    pub fn data_read_bytes(&self) -> u64 {
        self.data_read_bytes.load(Ordering::Relaxed)
    }

    /// Shared mode: pins snapshot `snap` of disk `vdi` cluster-wide for one
    /// more view on this host (see [`Coordinator::pin_snapshot`]; the
    /// caller holds the catalogue lock). Returns the incarnation the pin
    /// holds under: the view is protected only while it is current.
    pub fn pin_in_cluster(&self, vdi: u64, snap: u64) -> Result<u64> {
        let coord = self.coordinator().ok_or_else(|| {
            Error::InvalidArgument("a cluster pin on a store that is not shared".into())
        })?;
        let incarnation = coord.incarnation();
        let mut pins = self.cluster_pins.lock();
        let n = match pins.get(&(vdi, snap)) {
            Some(&(n, i)) if i == incarnation => n,
            // None, or put under a lease that is gone with it.
            _ => 0,
        };
        if n == 0 {
            coord.pin_snapshot(vdi, snap)?;
        }
        pins.insert((vdi, snap), (n + 1, incarnation));
        Ok(incarnation)
    }

    /// One view fewer of `vdi`'s snapshot `snap` (pinned under
    /// `incarnation`): the last one removes the cluster pin.
    pub fn unpin_in_cluster(&self, vdi: u64, snap: u64, incarnation: u64) {
        let mut pins = self.cluster_pins.lock();
        let Some((n, i)) = pins.get_mut(&(vdi, snap)) else {
            return;
        };
        if *i != incarnation {
            // A view from before a lost lease: its pin is gone already.
            return;
        }
        *n -= 1;
        if *n == 0 {
            pins.remove(&(vdi, snap));
            if let Some(c) = self.coordinator() {
                c.unpin_snapshot(vdi, snap);
            }
        }
    }

    /// Shared mode: fails unless this host may write and is still on the
    /// lease of `incarnation` (what a view pinned under it needs).
    pub fn check_incarnation(&self, incarnation: u64) -> Result<()> {
        self.check_fence()?;
        match self.coordinator() {
            Some(c) if c.incarnation() != incarnation => Err(Error::Fenced(
                "this view's pin went with a lease this appliance lost: open it again".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Stops all allocation: `reason` says what disagrees.
    pub fn set_damaged(&self, reason: String) {
        self.damaged.lock().get_or_insert(reason);
    }

    /// Repair is done: the metadata agrees again.
    pub fn clear_damaged(&self) {
        *self.damaged.lock() = None;
    }

    /// Repair: marks `blocks` allocated (those marked free); returns how
    /// many changed. The next sync writes them, and every lost bitmap.
    pub fn claim(&self, blocks: impl IntoIterator<Item = u64>) -> u64 {
        let mut alloc = self.alloc.lock();
        alloc.rewrite_lost();
        let mut claimed = 0;
        for b in blocks {
            claimed += u64::from(alloc.claim(b));
        }
        claimed
    }

    /// Extents whose bitmaps were both invalid when the store was opened.
    pub fn lost_bitmaps(&self) -> Vec<u64> {
        self.alloc.lock().lost_bitmaps().to_vec()
    }

    /// Why the store is damaged, if it is.
    pub fn damaged(&self) -> Option<String> {
        self.damaged.lock().clone()
    }

    fn refuse_if_damaged(&self) -> Result<()> {
        match &*self.damaged.lock() {
            Some(reason) => Err(Error::Inconsistent(format!(
                "the store is damaged and takes no writes until it is repaired: {reason}"
            ))),
            None => Ok(()),
        }
    }

    pub fn meta(&self) -> &MetaIo {
        &self.meta
    }

    /// One free block, keeping `reserve` free blocks back (for the metadata
    /// of commits).
    pub fn allocate(&self, reserve: u64) -> Result<u64> {
        self.refuse_if_damaged()?;
        self.alloc.lock().allocate(reserve)
    }

    /// `n` free blocks, all or none, keeping `reserve` back.
    pub fn allocate_many(&self, n: usize, reserve: u64) -> Result<Vec<u64>> {
        self.refuse_if_damaged()?;
        let mut alloc = self.alloc.lock();
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            match alloc.allocate(reserve) {
                Ok(a) => got.push(a),
                Err(e) => {
                    drop(alloc);
                    self.free(&got);
                    return Err(e);
                }
            }
        }
        Ok(got)
    }

    /// Up to `n` consecutive free blocks (fewer, or none, if no run is that long).
    pub fn allocate_run(&self, n: u64) -> Vec<u64> {
        if self.damaged.lock().is_some() {
            return Vec::new();
        }
        self.alloc.lock().allocate_run(n).unwrap_or_default()
    }

    /// Gives blocks back: see the module documentation.
    pub fn free(&self, blocks: &[u64]) {
        if blocks.is_empty() {
            return;
        }
        for &b in blocks {
            self.meta.evict(b);
        }
        if let Some(deferred) = self.deferred.lock().as_mut() {
            deferred.extend_from_slice(blocks);
            return;
        }
        self.release_now(blocks);
    }

    fn release_now(&self, blocks: &[u64]) {
        let mut alloc = self.alloc.lock();
        for &b in blocks {
            if alloc.release(b).is_err() {
                self.double_frees.fetch_add(1, Ordering::Relaxed);
                debug_assert!(false, "block {b} was freed twice");
            }
        }
    }

    /// Blocks given back twice since the store was opened (a bug; `check`
    /// reports it).
    pub fn double_frees(&self) -> u64 {
        self.double_frees.load(Ordering::Relaxed)
    }

    /// Starts holding frees back (`gc` is about to mark). Returns the
    /// allocator's bitmaps as they are now.
    pub fn defer_frees(&self) -> AllocatedBefore {
        *self.deferred.lock() = Some(Vec::new());
        self.alloc.lock().snapshot()
    }

    /// Holds frees back for as long as the guard lives (an online `check`
    /// reads the durable state disk by disk: no block it may still read is
    /// freed, reused or marked free on the device meanwhile). The caller
    /// holds the catalogue, so no `gc` defers at the same time.
    pub fn hold_frees(&self) -> FreesHeld<'_> {
        self.defer_frees();
        FreesHeld(self)
    }

    /// Ends [`Pool::defer_frees`]: releases what was held back, then (with
    /// a mark) every block allocated at the start that is still allocated
    /// and not `marked`. Returns how many blocks the mark freed.
    pub fn end_deferring(&self, mark: Option<(&AllocatedBefore, &dyn Fn(u64) -> bool)>) -> u64 {
        let deferred = self.deferred.lock().take().unwrap_or_default();
        self.release_now(&deferred);
        match mark {
            Some((before, marked)) => self.alloc.lock().rebuild_since(before, marked),
            None => 0,
        }
    }

    /// Writes changed bitmaps to their next slots and flushes the device:
    /// after this, every allocation and every release made so far is durable.
    pub fn sync_bitmaps(&self) -> Result<()> {
        self.sync(false)
    }

    /// [`Pool::sync_bitmaps`] for the extents where blocks were allocated:
    /// what a commit needs before its header (I2). Extents that only had
    /// blocks released wait for the next full sync (the daemon's settle
    /// tick, `flush_all`), so a commit writes one or two bitmaps, not one
    /// per extent its frees touched.
    pub fn sync_allocations(&self) -> Result<()> {
        self.sync(true)
    }

    /// Whether some bitmap changed since it was last written.
    pub fn has_unsynced(&self) -> bool {
        self.alloc.lock().has_dirty()
    }

    fn sync(&self, allocations_only: bool) -> Result<()> {
        let _sync = self.sync_lock.lock();
        let plan = self.alloc.lock().plan_sync(allocations_only);
        let result = plan
            .iter()
            .try_for_each(|w| self.meta.write_block(w.addr, &w.block, "an extent bitmap"))
            .and_then(|_| self.meta.flush());
        self.alloc.lock().finish_sync(&plan, result.is_ok());
        result
    }

    /// Whether `addr` is allocated (in memory: the durable bitmaps as loaded,
    /// plus what this process allocated and freed since).
    pub fn is_allocated(&self, addr: u64) -> bool {
        self.alloc.lock().is_allocated(addr)
    }

    /// [`Pool::is_allocated`] where this host's view can tell (see
    /// `Allocator::vouches_for`).
    pub fn vouches_for(&self, addr: u64) -> Option<bool> {
        self.alloc.lock().vouches_for(addr)
    }

    /// Shared mode: who grants extents, and who may still write.
    pub fn set_coordinator(&self, coord: Arc<dyn Coordinator>) {
        self.alloc.lock().set_coordinator(coord.clone());
        let _ = self.coord.set(coord);
    }

    /// The coordinator of a shared store.
    pub fn coordinator(&self) -> Option<&Arc<dyn Coordinator>> {
        self.coord.get()
    }

    /// Shared mode: fails once this host may no longer write to the pool.
    pub fn check_fence(&self) -> Result<()> {
        match self.coord.get() {
            Some(c) if !c.may_write() => Err(Error::Fenced(format!(
                "host {} may no longer write to the pool (its lease may have ended)",
                c.host_id()
            ))),
            _ => Ok(()),
        }
    }

    /// Blocks freed in extents another host owns, left allocated.
    pub fn foreign_frees(&self) -> u64 {
        self.alloc.lock().foreign_frees()
    }

    /// (total, used) data blocks.
    pub fn totals(&self) -> (u64, u64) {
        self.alloc.lock().totals()
    }

    /// How many disks were cloned from snapshot `snap` of disk `vdi`.
    pub fn clone_count(&self, vdi: u64, snap: u64) -> usize {
        self.clones.lock().get(&(vdi, snap)).copied().unwrap_or(0)
    }

    pub fn has_clones(&self, vdi: u64) -> bool {
        self.clones.lock().keys().any(|&(v, _)| v == vdi)
    }

    /// Replaces the whole clone count (shared mode: re-read after another
    /// host changed the catalogue).
    pub fn set_clones(&self, clones: HashMap<(u64, u64), usize>) {
        *self.clones.lock() = clones;
    }

    pub fn add_clone(&self, vdi: u64, snap: u64) {
        *self.clones.lock().entry((vdi, snap)).or_insert(0) += 1;
    }

    pub fn remove_clone(&self, vdi: u64, snap: u64) {
        let mut clones = self.clones.lock();
        if let Some(n) = clones.get_mut(&(vdi, snap)) {
            *n -= 1;
            if *n == 0 {
                clones.remove(&(vdi, snap));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{CreateOptions, Store};
    use parallax_device::MemDevice;
    use std::sync::Arc;

    fn store() -> Store {
        let dev = Arc::new(MemDevice::new(8 << 20));
        Store::create(dev, &CreateOptions::default()).unwrap()
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "freed twice"))]
    fn a_double_free_is_an_error() {
        let store = store();
        let pool = store.pool();
        let a = pool.allocate(0).unwrap();
        pool.free(&[a]);
        assert_eq!(pool.double_frees(), 0);
        pool.free(&[a]);
        // Release builds count it, and `check` reports it.
        assert_eq!(pool.double_frees(), 1);
        let report = store.check().unwrap();
        assert!(!report.is_clean(), "check missed a double free");
    }

    #[test]
    fn frees_wait_while_deferred() {
        let store = store();
        let pool = store.pool();
        let (_, used0) = pool.totals();
        let a = pool.allocate(0).unwrap();
        let before = pool.defer_frees();
        pool.free(&[a]);
        assert_eq!(pool.totals().1, used0 + 1, "freed while gc marks");
        let b = pool.allocate(0).unwrap();
        assert_ne!(a, b, "a deferred block was reused");
        // Nothing marked: `a` (allocated before) goes back; `b` (after) stays.
        let freed = pool.end_deferring(Some((&before, &|_| false)));
        assert_eq!(freed, 0, "only the deferred free was due");
        assert_eq!(pool.totals().1, used0 + 1);
        pool.free(&[b]);
        assert_eq!(pool.totals().1, used0);
    }

    #[test]
    fn allocate_many_is_all_or_nothing() {
        let store = store();
        let pool = store.pool();
        let (total, used) = pool.totals();
        let free = (total - used) as usize;
        assert!(pool.allocate_many(free + 1, 0).is_err());
        assert_eq!(pool.totals().1, used, "a failed batch kept blocks");
        assert_eq!(pool.allocate_many(3, 0).unwrap().len(), 3);
    }
}
