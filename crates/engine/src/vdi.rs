//! Virtual disk images: reads, writes, flush, snapshots, rollback.
//!
//! A [`Vdi`] is a handle on one writable disk. Its state (the live [`Tree`],
//! the last committed header, the snapshot list, and what the next commit
//! must add or free) sits behind a read-write lock, and beside it a small
//! [`Fresh`] table of allocating writes not yet folded into the tree:
//!
//! - Reads, in-place writes and allocating whole-block writes take the lock
//!   shared. An allocating write gets its new blocks under the allocator
//!   lock, writes their data with no disk lock held, and publishes them in
//!   `Fresh`, which every reader consults before the tree. Partial-block
//!   writes also take one of 64 stripe locks, so that read-modify-write
//!   cycles on one block do not interleave.
//! - Partial writes that must allocate, discards and every management
//!   operation take it exclusively, and fold `Fresh` into the tree first
//!   ([`VdiInner::exclusive`]); block status does too, but only when
//!   `Fresh` holds anything.
//! - [`Vdi::flush`] commits: fresh writes are folded in, dirty nodes go to
//!   new blocks (one device write per run), then the bitmaps and a device
//!   flush, then the VDI header in its older slot and a second flush.
//!   Blocks the commit stops referencing are freed only afterwards. With
//!   nothing to commit it is a device flush under the shared lock.
//! - [`Vdi::try_plan_read`] and [`Vdi::try_plan_write`] hand the device
//!   transfers of an aligned request to a caller that performs them itself
//!   (the daemon's io_uring), holding the lock shared until it is done.
//!
//! A failure after the header write started poisons the handle: the header
//! may or may not have reached the disk, so the only safe continuation is
//! to reopen the store.

use crate::error::{Error, Result};
use crate::lineage::{exclusive_blocks, intersect, promotions, Delta, SnapSet};
use crate::store::StoreInner;
use crate::time::{compact_utc, now_ns};
use crate::tree::{Tree, MAX_VIRTUAL_BLOCKS};
use parallax_format::{
    validate_name, LogBlock, LogEntry, LogEntryKind, NodeBlock, Ptr, Schedule, VdiHeader,
    BLOCK_SIZE, BLOCK_SIZE_U64, FAN_OUT, LOG_ENTRIES_PER_BLOCK, LOG_FLAG_HIDDEN,
    LOG_FLAG_SCHEDULED, TREE_HEIGHT, VDI_FLAG_LINEAGE,
};
use parking_lot::{ArcRwLockReadGuard, Mutex, RawRwLock, RwLock};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Largest virtual disk: the tree's reach.
pub const MAX_VDI_SIZE: u64 = MAX_VIRTUAL_BLOCKS * BLOCK_SIZE_U64;

const STRIPES: usize = 64;
/// Free blocks kept back from data writes for the metadata of the next commit.
const METADATA_RESERVE: u64 = 64;

/// A snapshot as listed to users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: u64,
    pub name: String,
    pub created_ns: u64,
    pub size_bytes: u64,
    /// Taken by the disk's schedule (retention may delete it); snapshots
    /// taken by hand are kept until deleted.
    pub scheduled: bool,
    pub(crate) root: Ptr,
    /// The version this one derives from (see `lineage.rs`).
    pub(crate) parent: u64,
    /// Deleted by the user but kept: other versions branch from it.
    pub(crate) hidden: bool,
}

impl SnapshotInfo {
    pub(crate) fn from_record(e: &LogEntry) -> Self {
        SnapshotInfo {
            id: e.snapshot_id,
            name: e.name.clone(),
            created_ns: e.created_ns,
            size_bytes: e.size_bytes,
            scheduled: e.flags & LOG_FLAG_SCHEDULED != 0,
            root: e.root,
            parent: e.parent,
            hidden: e.flags & LOG_FLAG_HIDDEN != 0,
        }
    }

    /// The Taken record that recreates this snapshot (visible).
    pub(crate) fn record(&self) -> LogEntry {
        LogEntry {
            kind: LogEntryKind::Taken,
            snapshot_id: self.id,
            created_ns: self.created_ns,
            root: self.root,
            size_bytes: self.size_bytes,
            name: self.name.clone(),
            flags: if self.scheduled {
                LOG_FLAG_SCHEDULED
            } else {
                0
            },
            parent: self.parent,
        }
    }
}

/// What a snapshot deletion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteReport {
    /// Snapshots gone from the listing.
    pub deleted: u64,
    /// Of those (and of snapshots hidden earlier), how many are still kept,
    /// hidden, because clones or other branches derive from them.
    pub hidden: u64,
    /// Blocks returned to the free pool.
    pub freed_blocks: u64,
}

/// Where a disk's root version comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A disk created empty.
    None,
    /// A clone: the root of the snapshot it was made from.
    Root(Ptr),
    /// A clone whose origin could not be found (made by an older version
    /// and orphaned): its versions are not reclaimed, `gc` does it.
    Unknown,
}

/// Summary of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdiInfo {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub created_ns: u64,
    pub snapshot_count: u64,
    /// Deleted snapshots kept because clones or branches derive from them.
    pub hidden_snapshots: u64,
    /// `NAME@SNAP` it was cloned from, if any.
    pub origin: Option<String>,
    pub generation: u64,
    pub schedule: Schedule,
}

/// A run of blocks with the same allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// Backed by a data block. Unallocated ranges read as zeros.
    pub allocated: bool,
}

/// One device transfer of an [`IoPlan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Byte offset on the device ([`IoPlan::fd`]).
    pub device_offset: u64,
    /// Bytes of the caller's buffer it reads into or writes from.
    pub buf: std::ops::Range<usize>,
}

/// A READ or an in-place WRITE worked out ahead, for callers that perform
/// the device I/O themselves (asynchronously, with io_uring): the
/// transfers, and the parts of a read buffer to fill with zeros.
///
/// While the plan lives, the blocks it names cannot be freed or reused: it
/// holds the disk's lock shared (as [`Vdi::read`] does for its duration),
/// so commits, snapshots and allocating writes of that disk wait for it.
/// Keep it until every transfer has completed, then drop it.
pub struct IoPlan {
    /// The file to transfer to or from.
    pub fd: std::os::fd::RawFd,
    pub transfers: Vec<Transfer>,
    /// Read only: ranges of the buffer that read as zeros.
    pub zeros: Vec<std::ops::Range<usize>>,
    /// Write only: (virtual block, new data block) for the blocks the write
    /// allocated; they join the disk in [`IoPlan::finish`].
    links: Vec<(u64, u64)>,
    disk: Option<Arc<VdiInner>>,
    pin: Option<ArcRwLockReadGuard<RawRwLock, VdiState>>,
    _store: Arc<StoreInner>,
}

impl IoPlan {
    /// A READ plan over `store`'s device (none if it has no descriptor),
    /// holding `pin` until it ends.
    fn read(
        store: &Arc<StoreInner>,
        transfers: Vec<Transfer>,
        zeros: Vec<std::ops::Range<usize>>,
        pin: Option<ArcRwLockReadGuard<RawRwLock, VdiState>>,
    ) -> Option<IoPlan> {
        store.meta.dev.raw_fd().map(|fd| IoPlan {
            fd,
            transfers,
            zeros,
            links: Vec::new(),
            disk: None,
            pin,
            _store: store.clone(),
        })
    }

    /// Ends the plan after every transfer has completed. With `ok`, the
    /// blocks a write allocated become part of the disk (visible to reads
    /// from now on); otherwise they go back to the free pool. Dropping a
    /// plan without calling this counts as a failure.
    pub fn finish(mut self, ok: bool) {
        self.complete(ok);
    }

    fn complete(&mut self, ok: bool) {
        if self.links.is_empty() {
            return;
        }
        if let (Some(disk), Some(pin)) = (&self.disk, &self.pin) {
            // A deleted disk gives its blocks back: nothing to report.
            let _ = disk.publish_fresh(pin, &self.links, ok);
        }
        self.links.clear();
    }
}

impl Drop for IoPlan {
    fn drop(&mut self) {
        self.complete(false);
    }
}

impl std::fmt::Debug for IoPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoPlan")
            .field("fd", &self.fd)
            .field("transfers", &self.transfers)
            .field("zeros", &self.zeros)
            .finish()
    }
}

/// Works out a block-aligned read of `len` bytes at `offset` through
/// `tree` (and the fresh writes of `disk`), with tree nodes from the cache
/// only: the device transfers and the zero ranges. `None` if the store is
/// not a file, the range is not block-aligned, or a node is not in memory.
#[allow(clippy::type_complexity)]
fn plan_read_tree(
    store: &StoreInner,
    tree: &Tree,
    disk: Option<&VdiInner>,
    offset: u64,
    len: usize,
) -> Result<Option<(Vec<Transfer>, Vec<std::ops::Range<usize>>)>> {
    let Some(found) = cached_entries(store, tree, disk, offset, len)? else {
        return Ok(None);
    };
    let mut runs = Runs::default();
    let mut zeros: Vec<std::ops::Range<usize>> = Vec::new();
    for (k, (entry, _)) in found.into_iter().enumerate() {
        let start = k * BLOCK_SIZE;
        if entry.is_null() {
            match zeros.last_mut() {
                Some(z) if z.end == start => z.end += BLOCK_SIZE,
                _ => zeros.push(start..start + BLOCK_SIZE),
            }
        } else {
            runs.push(k as u64, entry.addr());
        }
    }
    Ok(Some((runs.into_transfers(), zeros)))
}

/// The entries of the blocks of an aligned range, from cached nodes and
/// fresh writes only; `None` when that cannot be done without I/O.
fn cached_entries(
    store: &StoreInner,
    tree: &Tree,
    disk: Option<&VdiInner>,
    offset: u64,
    len: usize,
) -> Result<Option<Vec<(Ptr, bool)>>> {
    if store.meta.dev.raw_fd().is_none()
        || !offset.is_multiple_of(BLOCK_SIZE_U64)
        || !len.is_multiple_of(BLOCK_SIZE)
        || len == 0
    {
        return Ok(None);
    }
    let first = offset / BLOCK_SIZE_U64;
    let end = first + (len / BLOCK_SIZE) as u64;
    let mut found = Vec::with_capacity(len / BLOCK_SIZE);
    let complete = tree.for_each_cached_entry(&store.meta, first, end, &mut |_, e, w| {
        found.push((e, w));
        Ok(())
    })?;
    if !complete {
        return Ok(None);
    }
    if let Some(disk) = disk {
        disk.overlay_fresh(first, &mut found);
    }
    Ok(Some(found))
}

pub(crate) struct VdiState {
    pub name: String,
    pub header: VdiHeader,
    /// Index (0 = A, 1 = B) of the header slot the next commit writes.
    pub next_slot: usize,
    pub tree: Tree,
    pub size: u64,
    pub snapshots: SnapSet,
    pub origin: Origin,
    /// Records in the snapshot log chain (for compaction).
    pub log_records: u64,
    pub log_block: Option<LogBlock>,
    pub pending_log: Vec<LogEntry>,
    /// Blocks to free once the next commit is durable.
    pub pending_free: Vec<u64>,
    pub header_dirty: bool,
    pub poisoned: bool,
    pub deleted: bool,
}

impl VdiState {
    /// Whether the next commit has anything to write besides bitmaps.
    fn has_pending(&self) -> bool {
        self.tree.is_dirty()
            || !self.pending_log.is_empty()
            || self.header_dirty
            || !self.pending_free.is_empty()
    }
}

/// Whole-block writes that allocated since the disk lock was last held
/// exclusively, kept beside the tree so that allocating writes need only the
/// shared lock. Invariants:
/// - `map` entries are newer than the tree: every reader under the shared
///   lock consults `map` first, and every holder of the exclusive lock folds
///   `map` into the tree first ([`VdiInner::exclusive`]); `map` and the tree
///   never change together otherwise.
/// - Blocks in `map` and `in_flight` are owned by the live disk alone (new,
///   never in a snapshot); `gc` keeps both.
#[derive(Default)]
pub(crate) struct Fresh {
    /// Virtual block ─▶ new data block, written and complete.
    pub map: std::collections::HashMap<u64, u64>,
    /// Allocated for writes still moving their data; in no tree or map yet.
    pub in_flight: HashSet<u64>,
    /// Fresh blocks replaced by a later fresh write: freed after the next commit.
    pub replaced: Vec<u64>,
}

impl Fresh {
    fn is_empty(&self) -> bool {
        self.map.is_empty() && self.replaced.is_empty()
    }
}

/// A snapshot for [`VdiInner::commit`] to record.
pub(crate) struct NewSnapshot {
    pub id: u64,
    pub name: String,
    pub scheduled: bool,
}

/// Above this many fresh entries, the blocking write path folds them into
/// the tree on its way out, and allocating writes are no longer planned for
/// io_uring (so that they take the blocking path).
const FRESH_FOLD_AT: usize = 16384;

pub(crate) struct VdiInner {
    pub store: Arc<StoreInner>,
    pub id: u64,
    pub header_addrs: [u64; 2],
    /// In an `Arc` so that an [`IoPlan`] can hold a read guard of its own.
    pub state: Arc<RwLock<VdiState>>,
    /// Always taken after `state` (shared or exclusive), never before.
    pub fresh: Mutex<Fresh>,
    stripes: Vec<Mutex<()>>,
    /// Snapshot id ─▶ open [`SnapshotView`]s; a pinned snapshot is hidden
    /// rather than reclaimed when deleted.
    pins: Mutex<HashMap<u64, u32>>,
}

/// A handle on a writable disk; clones share the same disk.
#[derive(Clone)]
pub struct Vdi {
    pub(crate) inner: Arc<VdiInner>,
}

/// A read-only view of a snapshot.
pub struct SnapshotView {
    store: Arc<StoreInner>,
    tree: Tree,
    info: SnapshotInfo,
    disk: String,
    /// Keeps the snapshot's blocks from being reclaimed while the view lives.
    pin: Arc<VdiInner>,
}

impl Drop for SnapshotView {
    fn drop(&mut self) {
        let mut pins = self.pin.pins.lock();
        if let Some(n) = pins.get_mut(&self.info.id) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.info.id);
            }
        }
    }
}

fn check_io_range(size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "range {offset}+{len} is past the end of the disk ({size} bytes)"
        ))),
    }
}

/// Splits `[offset, offset+len)` into per-block pieces:
/// (virtual block, offset within block, byte range in the caller's buffer).
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, std::ops::Range<usize>)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done as u64;
        let v = pos / BLOCK_SIZE_U64;
        let within = (pos % BLOCK_SIZE_U64) as usize;
        let n = (BLOCK_SIZE - within).min(len - done);
        let r = done..done + n;
        done += n;
        Some((v, within, r))
    })
}

impl VdiInner {
    pub fn new(
        store: Arc<StoreInner>,
        header_addrs: [u64; 2],
        header: VdiHeader,
        next_slot: usize,
        name: String,
        origin: Origin,
    ) -> Result<Self> {
        let (snapshots, log_block, log_records) = load_log(&store, &header)?;
        Ok(VdiInner {
            id: header.vdi_id,
            header_addrs,
            state: Arc::new(RwLock::new(VdiState {
                name,
                tree: Tree::open(header.root),
                size: header.size_bytes,
                next_slot,
                header,
                snapshots,
                origin,
                log_records,
                log_block,
                pending_log: Vec::new(),
                pending_free: Vec::new(),
                header_dirty: false,
                poisoned: false,
                deleted: false,
            })),
            store,
            fresh: Mutex::new(Fresh::default()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            pins: Mutex::new(HashMap::new()),
        })
    }

    /// Takes the disk lock exclusively, with fresh writes folded into the
    /// tree. Every exclusive holder goes through here (or through
    /// [`VdiInner::commit`], which folds too).
    pub fn exclusive(&self) -> Result<parking_lot::RwLockWriteGuard<'_, VdiState>> {
        let mut st = self.state.write();
        self.fold_fresh(&mut st)?;
        Ok(st)
    }

    /// Runs `f` on a tree that includes every fresh write: under the shared
    /// lock when there are none (the usual case: block status stays off
    /// the exclusive lock), otherwise after folding them under the
    /// exclusive lock.
    fn with_whole_tree<T>(&self, f: impl FnOnce(&VdiState) -> Result<T>) -> Result<T> {
        {
            let st = self.state.read();
            if self.fresh.lock().map.is_empty() {
                self.usable(&st)?;
                return f(&st);
            }
        }
        let st = self.exclusive()?;
        self.usable(&st)?;
        f(&st)
    }

    /// Moves fresh writes into the tree (the caller holds the lock
    /// exclusively). On error the entries not yet moved stay fresh.
    pub fn fold_fresh(&self, st: &mut VdiState) -> Result<()> {
        let mut fresh = self.fresh.lock();
        if fresh.is_empty() {
            return Ok(());
        }
        let entries: Vec<(u64, u64)> = fresh.map.iter().map(|(&v, &a)| (v, a)).collect();
        for (v, addr) in entries {
            let old = st.tree.entry_for_write(&self.store.meta, v)?;
            st.tree.set_entry(v, Ptr::data(addr, true))?;
            if old.writable() {
                st.pending_free.push(old.addr());
            }
            fresh.map.remove(&v);
        }
        st.pending_free.append(&mut fresh.replaced);
        Ok(())
    }

    /// Overrides tree answers for `first..` with fresh entries (owned,
    /// writable). The caller holds the lock shared.
    fn overlay_fresh(&self, first: u64, entries: &mut [(Ptr, bool)]) {
        let fresh = self.fresh.lock();
        if fresh.map.is_empty() {
            return;
        }
        for (k, e) in entries.iter_mut().enumerate() {
            if let Some(&addr) = fresh.map.get(&(first + k as u64)) {
                *e = (Ptr::data(addr, true), true);
            }
        }
    }

    /// The tree's entries for `first..end`, fresh writes included.
    fn entries(&self, st: &VdiState, first: u64, end: u64) -> Result<Vec<(Ptr, bool)>> {
        let mut out = Vec::with_capacity((end - first) as usize);
        st.tree
            .for_each_entry(&self.store.meta, first, end, &mut |_, e, w| {
                out.push((e, w));
                Ok(())
            })?;
        self.overlay_fresh(first, &mut out);
        Ok(out)
    }

    /// Allocates `n` data blocks for a write of blocks `first..first+count`
    /// (the caller holds the lock shared) and records them in flight. All
    /// or nothing.
    fn allocate_fresh(&self, st: &VdiState, first: u64, count: u64, n: usize) -> Result<Vec<u64>> {
        let mut fresh = self.fresh.lock();
        // Room for the nodes the next commit may write: those already
        // dirty, the paths of this write, and one leaf per fresh entry at
        // most, but never more leaves than the disk has (plus their parents).
        let fan = FAN_OUT as u64;
        let leaves = (first + count - 1) / fan - first / fan + 1;
        let disk_leaves = (st.size / BLOCK_SIZE_U64).div_ceil(fan);
        let pending = ((fresh.map.len() + fresh.in_flight.len()) as u64).min(disk_leaves);
        let reserve = METADATA_RESERVE
            + st.tree.dirty_nodes() as u64
            + TREE_HEIGHT as u64 * leaves
            + pending
            + pending.div_ceil(fan) * TREE_HEIGHT as u64;
        let mut alloc = self.store.alloc.lock();
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            match alloc.allocate(reserve) {
                Ok(a) => got.push(a),
                Err(e) => {
                    for &a in &got {
                        alloc.release(a);
                    }
                    return Err(e);
                }
            }
        }
        fresh.in_flight.extend(got.iter().copied());
        Ok(got)
    }

    /// Ends writes of fresh blocks (the caller holds the lock shared):
    /// with `ok`, `links` (virtual block, new block) become visible;
    /// otherwise, or if the disk is gone, the blocks go back to the pool.
    fn publish_fresh(&self, st: &VdiState, links: &[(u64, u64)], ok: bool) -> Result<()> {
        let usable = self.usable(st);
        let mut fresh = self.fresh.lock();
        if ok && usable.is_ok() {
            for &(v, addr) in links {
                fresh.in_flight.remove(&addr);
                if let Some(old) = fresh.map.insert(v, addr) {
                    fresh.replaced.push(old);
                }
            }
            return Ok(());
        }
        let mut alloc = self.store.alloc.lock();
        for &(_, addr) in links {
            if fresh.in_flight.remove(&addr) {
                alloc.release(addr);
            }
        }
        usable
    }

    pub(crate) fn usable(&self, st: &VdiState) -> Result<()> {
        if st.deleted {
            return Err(Error::NotFound(format!("disk {} was deleted", st.name)));
        }
        if st.poisoned {
            return Err(Error::Poisoned(st.name.clone()));
        }
        Ok(())
    }

    fn read_data(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.store
            .meta
            .dev
            .read_at(buf, addr * BLOCK_SIZE_U64)
            .map_err(Error::io(format!("reading data block {addr}")))
    }

    fn write_data(&self, addr: u64, buf: &[u8]) -> Result<()> {
        self.store
            .meta
            .dev
            .write_at(buf, addr * BLOCK_SIZE_U64)
            .map_err(Error::io(format!("writing data block {addr}")))
    }

    /// Writes `data` at `within` of data block `addr`, owned by this disk.
    fn write_in_place(&self, v: u64, addr: u64, within: usize, data: &[u8]) -> Result<()> {
        // Whole-block writes take the stripe too, so that a concurrent
        // read-modify-write of the same block cannot write old bytes back.
        let _stripe = self.stripes[(v % STRIPES as u64) as usize].lock();
        if data.len() == BLOCK_SIZE {
            return self.write_data(addr, data);
        }
        let mut block = vec![0u8; BLOCK_SIZE];
        self.read_data(addr, &mut block)?;
        block[within..within + data.len()].copy_from_slice(data);
        self.write_data(addr, &block)
    }

    /// Writes a piece smaller than a block: a read-modify-write, under the
    /// disk's exclusive lock when it must allocate.
    fn write_piece(&self, v: u64, within: usize, data: &[u8]) -> Result<()> {
        {
            let st = self.state.read();
            self.usable(&st)?;
            let (entry, writable) = self.entries(&st, v, v + 1)?[0];
            if writable {
                return self.write_in_place(v, entry.addr(), within, data);
            }
        }
        let mut st = self.exclusive()?;
        self.usable(&st)?;
        let entry = st.tree.entry_for_write(&self.store.meta, v)?;
        if entry.writable() {
            return self.write_in_place(v, entry.addr(), within, data);
        }
        let mut block = vec![0u8; BLOCK_SIZE];
        if data.len() < BLOCK_SIZE && !entry.is_null() {
            self.read_data(entry.addr(), &mut block)?;
        }
        block[within..within + data.len()].copy_from_slice(data);
        let reserve = METADATA_RESERVE + st.tree.dirty_nodes() as u64 + TREE_HEIGHT as u64;
        let addr = self.store.alloc.lock().allocate(reserve)?;
        if let Err(e) = self.write_data(addr, &block) {
            self.store.alloc.lock().release(addr);
            return Err(e);
        }
        st.tree.set_entry(v, Ptr::data(addr, true))
    }

    /// Writes whole blocks `first..first + data.len() / BLOCK_SIZE`, all
    /// under the shared lock except the data of new blocks:
    ///
    /// 1. Blocks the disk owns (in the tree or fresh) are overwritten in
    ///    place, one `write_at` per run of consecutive addresses.
    /// 2. The others get new blocks, recorded in flight (so `gc` keeps
    ///    them); the lock is dropped while their data is written, in runs.
    /// 3. Under the shared lock again, they are published as fresh entries
    ///    (see [`Fresh`]), visible to every later read and write.
    ///
    /// Concurrent writes to the same block end with one of them whole, as
    /// NBD allows; no reader ever sees a block that was not written.
    fn write_blocks(&self, first: u64, data: &[u8]) -> Result<()> {
        let count = (data.len() / BLOCK_SIZE) as u64;
        let mut missing = Vec::new();
        let mut runs = Runs::default();
        let allocated = {
            let st = self.state.read();
            self.usable(&st)?;
            for (k, (entry, writable)) in self
                .entries(&st, first, first + count)?
                .into_iter()
                .enumerate()
            {
                if writable {
                    runs.push(k as u64, entry.addr());
                } else {
                    missing.push(k as u64);
                }
            }
            for run in std::mem::take(&mut runs).0 {
                self.write_data(run.addr, &data[run.bytes()])?;
            }
            if missing.is_empty() {
                return Ok(());
            }
            self.allocate_fresh(&st, first, count, missing.len())?
        };
        let links: Vec<(u64, u64)> = missing.iter().map(|&k| first + k).zip(allocated).collect();
        for &(v, addr) in &links {
            runs.push(v - first, addr);
        }
        let written = runs
            .0
            .iter()
            .try_for_each(|run| self.write_data(run.addr, &data[run.bytes()]));
        let st = self.state.read();
        self.publish_fresh(&st, &links, written.is_ok())?;
        written?;
        let fold = self.fresh.lock().map.len() > FRESH_FOLD_AT;
        drop(st);
        if fold {
            drop(self.exclusive()?);
        }
        Ok(())
    }

    /// Unmaps whole block `v` (discard or zeroing).
    fn unmap_block(&self, st: &mut VdiState, v: u64) -> Result<()> {
        let (entry, _) = st.tree.lookup(&self.store.meta, v)?;
        if entry.is_null() {
            return Ok(());
        }
        let entry = st.tree.entry_for_write(&self.store.meta, v)?;
        if entry.writable() {
            st.pending_free.push(entry.addr());
        }
        st.tree.set_entry(v, Ptr::NULL)
    }

    /// Commits everything in `st` and, if `snapshot` is given, records the
    /// committed tree as a snapshot and gives the disk a fresh shared root.
    pub fn commit(&self, st: &mut VdiState, snapshot: Option<NewSnapshot>) -> Result<()> {
        self.usable(st)?;
        self.fold_fresh(st)?;
        let meta = &self.store.meta;
        if !st.has_pending() && snapshot.is_none() {
            // Also makes earlier frees durable in the bitmaps.
            return self.store.sync_bitmaps();
        }
        let generation = st.header.generation + 1;
        let mut allocated = Vec::new();
        let prepared = self.prepare_commit(st, snapshot, generation, &mut allocated);
        let (header, freed, new_snapshot, new_log) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let mut alloc = self.store.alloc.lock();
                for a in allocated {
                    meta.evict(a);
                    alloc.release(a);
                }
                return Err(e);
            }
        };
        // The point of no return: the header write may land or not.
        let slot = st.next_slot;
        let (block, _) = header.encode(meta.store_id, self.header_addrs[slot]);
        let written = meta
            .write_block(self.header_addrs[slot], &block, "a VDI header")
            .and_then(|_| meta.flush());
        if let Err(e) = written {
            st.poisoned = true;
            return Err(e);
        }
        st.next_slot = 1 - slot;
        st.tree.apply(header.root);
        st.header = header;
        st.header_dirty = false;
        st.pending_log.clear();
        if let Some(s) = new_snapshot {
            let id = s.id;
            st.snapshots.insert(s);
            // Derived data: without it, reclaiming walks the trees instead.
            let delta = self.delta_to_parent(st, id).unwrap_or(None);
            st.snapshots.set_delta(id, delta);
        }
        if let Some((block, records)) = new_log {
            st.log_block = Some(block);
            st.log_records = records;
        }
        let mut to_free = freed;
        to_free.append(&mut st.pending_free);
        self.store.release(&to_free);
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    fn prepare_commit(
        &self,
        st: &mut VdiState,
        snapshot: Option<NewSnapshot>,
        generation: u64,
        allocated: &mut Vec<u64>,
    ) -> Result<(
        VdiHeader,
        Vec<u64>,
        Option<SnapshotInfo>,
        Option<(LogBlock, u64)>,
    )> {
        let store = &self.store;
        // The nodes, root copy and log block come from one run of
        // consecutive blocks where possible: one device write for them all.
        let wanted = st.tree.dirty_nodes() as u64 + 2;
        let mut run = std::collections::VecDeque::from(
            store.alloc.lock().allocate_run(wanted).unwrap_or_default(),
        );
        let prepared =
            self.prepare_commit_with(st, snapshot, generation, allocated, &mut || match run
                .pop_front()
            {
                Some(a) => Ok(a),
                None => store.alloc.lock().allocate(0),
            });
        // Never written nor referenced: back at once.
        store.release_unreferenced(run.make_contiguous());
        prepared
    }

    #[allow(clippy::type_complexity)]
    fn prepare_commit_with(
        &self,
        st: &mut VdiState,
        snapshot: Option<NewSnapshot>,
        generation: u64,
        allocated: &mut Vec<u64>,
        allocate: &mut dyn FnMut() -> Result<u64>,
    ) -> Result<(
        VdiHeader,
        Vec<u64>,
        Option<SnapshotInfo>,
        Option<(LogBlock, u64)>,
    )> {
        let store = &self.store;
        let meta = &store.meta;
        let mut allocate = allocate;
        // Everything the commit writes before its bitmaps, in one batch.
        let mut blocks = Vec::new();
        let plan = st.tree.write_dirty(
            meta,
            self.id,
            generation,
            &mut allocate,
            allocated,
            &mut blocks,
        )?;
        let mut freed = plan.freed;
        let mut root = plan.root;
        let mut log_entries = st.pending_log.clone();
        let mut new_snapshot = None;
        let mut live_parent = st.header.live_parent;
        if let Some(NewSnapshot {
            id,
            name,
            scheduled,
        }) = snapshot
        {
            // Nothing changed since the parent snapshot: share its root.
            // Otherwise the committed root becomes the snapshot's, and the
            // disk gets a copy whose pointers are all shared.
            let unchanged = self.unchanged_since_parent(st)?;
            let info = SnapshotInfo {
                id,
                name,
                created_ns: now_ns(),
                size_bytes: st.size,
                scheduled,
                root: unchanged.unwrap_or(root),
                parent: live_parent,
                hidden: false,
            };
            log_entries.push(info.record());
            live_parent = id;
            new_snapshot = Some(info);
            if unchanged.is_none() {
                let node = meta.load_node(root, (TREE_HEIGHT - 1) as u8)?;
                let copy = NodeBlock {
                    level: node.level,
                    entries: node.entries.iter().map(|p| p.shared()).collect(),
                };
                let addr = allocate()?;
                allocated.push(addr);
                let (block, crc) = copy.encode(meta.store_id, addr, self.id, generation);
                blocks.push((addr, block));
                meta.cache_node(addr, Arc::new(copy), crc);
                root = Ptr::meta(addr, crc, true);
            }
        }
        let mut header = st.header.clone();
        header.generation = generation;
        header.root = root;
        header.size_bytes = st.size;
        header.live_parent = live_parent;
        let mut new_log = None;
        let kept = st.snapshots.len() as u64 + u64::from(new_snapshot.is_some());
        if !log_entries.is_empty() && st.log_records + log_entries.len() as u64 > 2 * kept + 96 {
            // Compaction: most records are history. Rewrite the log as one
            // Taken record per kept snapshot and free the old chain. Cost
            // grows with the snapshots kept, and it happens only after at
            // least as many records were appended since the last time.
            let mut records = st.snapshots.records();
            records.extend(new_snapshot.as_ref().map(SnapshotInfo::record));
            let (head, block) = write_log_chain(
                self,
                Ptr::NULL,
                None,
                &records,
                generation,
                &mut allocate,
                allocated,
                &mut blocks,
            )?;
            for (addr, _) in read_log_chain(store, st.header.log_head, self.id)? {
                freed.push(addr);
            }
            header.log_head = head;
            new_log = Some((block, records.len() as u64));
        } else if !log_entries.is_empty() {
            let (head, block, mut log_freed) = write_log(
                self,
                st,
                &log_entries,
                generation,
                &mut allocate,
                allocated,
                &mut blocks,
            )?;
            header.log_head = head;
            new_log = Some((block, st.log_records + log_entries.len() as u64));
            freed.append(&mut log_freed);
        }
        header.snapshot_count =
            st.snapshots.visible_len() as u64 + u64::from(new_snapshot.is_some());
        header.next_snapshot_id = header
            .next_snapshot_id
            .max(new_snapshot.as_ref().map_or(0, |s| s.id + 1));
        meta.write_many(blocks, "tree nodes and snapshot log blocks")?;
        store.sync_allocations()?;
        Ok((header, freed, new_snapshot, new_log))
    }

    /// The root of the live tree's parent snapshot, if the live tree holds
    /// exactly what that snapshot holds (nothing written since, nothing
    /// pending): a new snapshot can then share that root instead of
    /// copying one, so that snapshots of an idle disk cost a log record.
    fn unchanged_since_parent(&self, st: &VdiState) -> Result<Option<Ptr>> {
        if !self.reclaims(st) || st.tree.is_dirty() || st.tree.root().is_null() {
            return Ok(None);
        }
        let Some(parent) = st.snapshots.get(st.header.live_parent) else {
            return Ok(None);
        };
        if parent.size_bytes != st.size {
            return Ok(None);
        }
        let meta = &self.store.meta;
        let level = (TREE_HEIGHT - 1) as u8;
        let live = meta.load_node(st.tree.root(), level)?;
        let snap = meta.load_node(parent.root, level)?;
        // The live root is a copy of the parent's with every bit cleared;
        // any write since changed an entry (new blocks, or promotions).
        let same = live
            .entries
            .iter()
            .zip(snap.entries.iter())
            .all(|(l, p)| *l == p.shared());
        Ok(same.then_some(parent.root))
    }

    /// Whether this disk's deleted versions are reclaimed at once (see
    /// `lineage.rs`). Disks written before lineage was recorded, and clones
    /// whose origin is gone, leave them to `gc`.
    pub(crate) fn reclaims(&self, st: &VdiState) -> bool {
        st.header.flags & VDI_FLAG_LINEAGE != 0 && st.origin != Origin::Unknown
    }

    /// The delta of snapshot `id` to its parent (see `lineage.rs`), walked
    /// while both trees' nodes are likely cached: right after it is taken.
    fn delta_to_parent(&self, st: &VdiState, id: u64) -> Result<Option<Delta>> {
        if !self.reclaims(st) {
            return Ok(None);
        }
        let Some(s) = st.snapshots.get(id) else {
            return Ok(None);
        };
        if s.parent == 0 && st.origin == Origin::None {
            return Ok(Some(Delta::default()));
        }
        let parent = self.version_root(st, s.parent)?;
        let meta = &self.store.meta;
        let level = (TREE_HEIGHT - 1) as u8;
        let mut delta = Delta::default();
        exclusive_blocks(meta, level, s.root, &[parent], &mut |a, _| {
            delta.born.push(a)
        })?;
        exclusive_blocks(meta, level, parent, &[s.root], &mut |a, _| {
            delta.dead.push(a)
        })?;
        for list in [&mut delta.born, &mut delta.dead] {
            list.sort_unstable();
            list.dedup();
        }
        Ok(Some(delta))
    }

    /// The root of the snapshot this disk was cloned from; null if none.
    pub(crate) fn origin_root(&self, st: &VdiState) -> Ptr {
        match st.origin {
            Origin::Root(r) => r,
            Origin::None | Origin::Unknown => Ptr::NULL,
        }
    }

    /// The root of the version `parent` (a snapshot id, or 0 for the
    /// disk's origin); null when there is none.
    fn version_root(&self, st: &VdiState, parent: u64) -> Result<Ptr> {
        if parent == 0 {
            return Ok(self.origin_root(st));
        }
        st.snapshots.get(parent).map(|p| p.root).ok_or_else(|| {
            Error::Inconsistent(format!(
                "disk {}: snapshot parent id {parent} is missing",
                st.name
            ))
        })
    }

    /// Hides the (visible) snapshots `ids`, reclaims every hidden version
    /// that nothing derives from any more (at most one child version, no
    /// clone, no open view), and commits. The live tree is committed first
    /// so that the walks see it exactly.
    pub(crate) fn delete_versions(&self, st: &mut VdiState, ids: &[u64]) -> Result<DeleteReport> {
        if st.has_pending() {
            self.commit(st, None)?;
        }
        let saved_parent = st.header.live_parent;
        let mut report = DeleteReport {
            deleted: ids.len() as u64,
            ..DeleteReport::default()
        };
        let mut ids = ids;
        // A pass reclaims at most one version beside the live tree (its
        // promotions change the live tree); more take another pass.
        for _ in 0..64 {
            let result = self.plan_deletion(st, ids, &mut report, true);
            let deferred = match result.and_then(|d| self.commit(st, None).map(|()| d)) {
                Ok(d) => d,
                Err(e) => {
                    if !st.poisoned {
                        self.undo_deletion(st);
                        // Promotions may have dirtied the (committed) tree.
                        st.tree = Tree::open(st.header.root);
                        st.header.live_parent = saved_parent;
                    }
                    return Err(e);
                }
            };
            if !deferred {
                break;
            }
            ids = &[];
        }
        report.hidden = (st.snapshots.len() - st.snapshots.visible_len()) as u64;
        Ok(report)
    }

    /// After a planned deletion failed to commit: back to the durable
    /// snapshot list, with nothing of the deletion pending. (Callers start
    /// deletions with nothing else pending in the log or the free list.)
    fn undo_deletion(&self, st: &mut VdiState) {
        match load_log(&self.store, &st.header) {
            Ok((snaps, _, _)) => st.snapshots = snaps,
            Err(_) => st.poisoned = true,
        }
        st.pending_log.clear();
        st.pending_free.clear();
    }

    /// One schedule tick in one commit: the deletions retention asks for
    /// (counting the snapshot about to be taken) are planned against the
    /// committed snapshot trees, then the snapshot is taken with them.
    /// A deletion that would need the live tree as a neighbour while it has
    /// uncommitted changes stays hidden until the next deletion pass.
    pub(crate) fn schedule_tick(&self, st: &mut VdiState) -> Result<(SnapshotInfo, DeleteReport)> {
        self.usable(st)?;
        if !st.pending_log.is_empty() || !st.pending_free.is_empty() {
            self.commit(st, None)?;
        }
        let id = st.header.next_snapshot_id;
        let now = now_ns();
        let mut scheduled = st.snapshots.scheduled();
        scheduled.push((id, now));
        let expired: Vec<u64> = crate::retention::expired(&st.header.schedule, &scheduled)
            .into_iter()
            .filter(|e| *e != id)
            .collect();
        let mut report = DeleteReport {
            deleted: expired.len() as u64,
            ..DeleteReport::default()
        };
        let name = format!("{}-{id}", compact_utc(now));
        // With a clean tree the walks see the live tree exactly.
        let live_ok = !st.tree.is_dirty();
        let saved_tree = live_ok.then(|| st.tree.clone());
        let saved_parent = st.header.live_parent;
        let result = self
            .plan_deletion(st, &expired, &mut report, live_ok)
            .and_then(|_| {
                self.commit(
                    st,
                    Some(NewSnapshot {
                        id,
                        name,
                        scheduled: true,
                    }),
                )
            });
        if let Err(e) = result {
            if !st.poisoned {
                self.undo_deletion(st);
                if let Some(tree) = saved_tree {
                    st.tree = tree;
                }
                st.header.live_parent = saved_parent;
            }
            return Err(e);
        }
        report.hidden = (st.snapshots.len() - st.snapshots.visible_len()) as u64;
        let snap = st
            .snapshots
            .get(id)
            .cloned()
            .ok_or_else(|| Error::Inconsistent("snapshot vanished after commit".into()))?;
        Ok((snap, report))
    }

    /// The in-memory half of [`VdiInner::delete_versions`]: records, blocks
    /// to free after the commit, promotions in the live tree.
    fn plan_deletion(
        &self,
        st: &mut VdiState,
        ids: &[u64],
        report: &mut DeleteReport,
        mut live_ok: bool,
    ) -> Result<bool> {
        let now = now_ns();
        let mut deferred = false;
        if !self.reclaims(st) {
            for &id in ids {
                st.snapshots.remove(id);
                st.pending_log
                    .push(LogEntry::removal(LogEntryKind::Deleted, id, now));
            }
            return Ok(false);
        }
        let meta = &self.store.meta;
        let root_level = (TREE_HEIGHT - 1) as u8;
        for &id in ids {
            st.snapshots.hide(id);
        }
        let mut candidates = st.snapshots.hidden_ids();
        let mut deleted = Vec::new();
        let mut freed = Vec::new();
        while let Some(v) = candidates.pop() {
            let Some(s) = st.snapshots.get(v).cloned() else {
                continue;
            };
            let kids = st.snapshots.children(v);
            let live_kid = st.header.live_parent == v;
            // A clone's versions are not walked from here: a snapshot with
            // clones stays hidden until they are deleted.
            let uses = kids.len() + usize::from(live_kid);
            if live_kid && !live_ok && s.hidden && uses == 1 {
                deferred = true;
            }
            if !s.hidden
                || uses > 1
                || (live_kid && !live_ok)
                || self.store.clone_count(self.id, v) > 0
                || self.pins.lock().contains_key(&v)
            {
                continue;
            }
            let parent_root = self.version_root(st, s.parent)?;
            let child = kids.first().copied();
            let child_root = match child {
                Some(k) => self.version_root(st, k)?,
                None if live_kid => st.tree.root(),
                None => Ptr::NULL,
            };
            // From the deltas when they are known: no tree is read.
            let by_delta = child.and_then(|k| {
                let dc = st.snapshots.delta(k)?;
                if s.parent == 0 && st.origin == Origin::None {
                    return Some((dc.dead.clone(), Delta::default()));
                }
                let dv = st.snapshots.delta(v)?;
                Some((intersect(&dv.born, &dc.dead), Delta::merged(dv, dc)))
            });
            let mut child_delta = None;
            match by_delta {
                Some((gone, merged)) => {
                    if cfg!(debug_assertions) {
                        let mut walked = Vec::new();
                        exclusive_blocks(
                            meta,
                            root_level,
                            s.root,
                            &[parent_root, child_root],
                            &mut |addr, _| walked.push(addr),
                        )?;
                        walked.sort_unstable();
                        walked.dedup();
                        assert_eq!(gone, walked, "the deltas disagree with the walk");
                        if s.parent != 0 || st.origin != Origin::None {
                            let mut want = Delta::default();
                            exclusive_blocks(
                                meta,
                                root_level,
                                child_root,
                                &[parent_root],
                                &mut |a, _| want.born.push(a),
                            )?;
                            exclusive_blocks(
                                meta,
                                root_level,
                                parent_root,
                                &[child_root],
                                &mut |a, _| want.dead.push(a),
                            )?;
                            want.born.sort_unstable();
                            want.born.dedup();
                            want.dead.sort_unstable();
                            want.dead.dedup();
                            assert_eq!(merged, want, "a merged delta disagrees with the walk");
                        }
                    }
                    freed.extend(gone);
                    child_delta = Some(merged);
                }
                None => exclusive_blocks(
                    meta,
                    root_level,
                    s.root,
                    &[parent_root, child_root],
                    &mut |addr, _| freed.push(addr),
                )?,
            }
            if live_kid {
                let mut promos = Vec::new();
                promotions(
                    meta,
                    root_level,
                    0,
                    st.tree.root(),
                    s.root,
                    parent_root,
                    &mut promos,
                )?;
                for (level, vb) in promos {
                    st.tree.promote(meta, level, vb)?;
                }
                st.header.live_parent = s.parent;
                st.header_dirty = true;
                // The walks read the committed live tree: no second
                // contraction beside it until this one is committed.
                live_ok = false;
            }
            st.snapshots.remove(v);
            if let Some(k) = child {
                st.snapshots.set_delta(k, child_delta);
            }
            deleted.push(v);
            if st.snapshots.get(s.parent).is_some_and(|p| p.hidden) {
                candidates.push(s.parent);
            }
        }
        let gone: HashSet<u64> = deleted.iter().copied().collect();
        for &id in ids.iter().filter(|id| !gone.contains(id)) {
            st.pending_log
                .push(LogEntry::removal(LogEntryKind::Hidden, id, now));
        }
        for id in deleted {
            st.pending_log
                .push(LogEntry::removal(LogEntryKind::Deleted, id, now));
        }
        freed.sort_unstable();
        freed.dedup();
        report.freed_blocks += freed.len() as u64;
        st.pending_free.extend(freed);
        Ok(deferred)
    }

    /// Every block that deleting this disk frees: all it holds that its
    /// origin does not (clones of it are refused before this is asked).
    pub(crate) fn disk_blocks(&self, st: &VdiState) -> Result<Vec<u64>> {
        let meta = &self.store.meta;
        let root_level = (TREE_HEIGHT - 1) as u8;
        let mut out: HashSet<u64> = self.live_owned_blocks(st)?.into_iter().collect();
        if !self.reclaims(st) {
            // Without lineage only the writable closures are known to be
            // exclusive; the rest is left to `gc`.
            for s in st.snapshots.all() {
                collect_owned(meta, s.root, root_level, &mut out)?;
            }
            return Ok(out.into_iter().collect());
        }
        let mut add = |addr: u64, _| {
            out.insert(addr);
        };
        let live_parent = self.version_root(st, st.header.live_parent)?;
        exclusive_blocks(meta, root_level, st.tree.root(), &[live_parent], &mut add)?;
        for s in st.snapshots.all() {
            let parent = self.version_root(st, s.parent)?;
            exclusive_blocks(meta, root_level, s.root, &[parent], &mut add)?;
        }
        Ok(out.into_iter().collect())
    }

    /// Every block that only this disk's live tree references: the blocks
    /// reachable from its root through writable pointers only, committed or
    /// dirty, plus blocks already waiting to be freed.
    pub fn live_owned_blocks(&self, st: &VdiState) -> Result<Vec<u64>> {
        let meta = &self.store.meta;
        let mut owned = HashSet::new();
        if !st.tree.root().is_null() {
            collect_owned(meta, st.tree.root(), (TREE_HEIGHT - 1) as u8, &mut owned)?;
        }
        owned.extend(st.tree.dirty_owned_data());
        owned.extend(st.pending_free.iter().copied());
        Ok(owned.into_iter().collect())
    }
}

/// Adds to `out` the block `ptr` points at and everything below it reached
/// through writable pointers.
pub(crate) fn collect_owned(
    meta: &crate::meta::MetaIo,
    ptr: Ptr,
    level: u8,
    out: &mut HashSet<u64>,
) -> Result<()> {
    out.insert(ptr.addr());
    let node = meta.load_node(ptr, level)?;
    for e in node.entries.iter().filter(|e| e.writable()) {
        if level == 0 {
            out.insert(e.addr());
        } else {
            collect_owned(meta, *e, level - 1, out)?;
        }
    }
    Ok(())
}

/// Appends `entries` to the snapshot log, copying the head block if it has
/// room. Returns the new head, its content, and the blocks to free.
fn write_log(
    vdi: &VdiInner,
    st: &VdiState,
    entries: &[LogEntry],
    generation: u64,
    allocate: &mut dyn FnMut() -> Result<u64>,
    allocated: &mut Vec<u64>,
    out: &mut Vec<(u64, Box<parallax_format::Block>)>,
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
    let (p, block) = write_log_chain(
        vdi, head, start, entries, generation, allocate, allocated, out,
    )?;
    Ok((p, block, freed))
}

/// Writes `entries` as new log blocks after `prev`, starting from the
/// content `start` (a copy of the old head) if given. Returns the new head.
#[allow(clippy::too_many_arguments)]
fn write_log_chain(
    vdi: &VdiInner,
    prev: Ptr,
    start: Option<LogBlock>,
    entries: &[LogEntry],
    generation: u64,
    allocate: &mut dyn FnMut() -> Result<u64>,
    allocated: &mut Vec<u64>,
    out: &mut Vec<(u64, Box<parallax_format::Block>)>,
) -> Result<(Ptr, LogBlock)> {
    let meta = &vdi.store.meta;
    let mut cur = start.unwrap_or(LogBlock {
        prev,
        entries: Vec::new(),
    });
    let mut write = |block: &LogBlock| -> Result<Ptr> {
        let addr = allocate()?;
        allocated.push(addr);
        let (b, crc) = block.encode(meta.store_id, addr, vdi.id, generation);
        out.push((addr, b));
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

/// Reads the whole snapshot log of a disk, oldest record first.
pub(crate) fn read_log_chain(
    store: &StoreInner,
    head: Ptr,
    owner: u64,
) -> Result<Vec<(u64, LogBlock)>> {
    let meta = &store.meta;
    let mut blocks = Vec::new();
    let mut p = head;
    while !p.is_null() {
        meta.check_ptr(p, "a snapshot log pointer")?;
        if blocks.len() as u64 > meta.total_blocks {
            return Err(Error::Inconsistent("snapshot log has a cycle".into()));
        }
        let raw = meta.read_block(p.addr(), "a snapshot log block")?;
        let (block, h, crc) = LogBlock::decode(&raw[..], p.addr(), Some(meta.store_id))?;
        if !p.matches_crc(crc) {
            return Err(parallax_format::FormatError::Stale {
                addr: p.addr(),
                found: crc & 0x7f_ffff,
                expected: p.check(),
            }
            .into());
        }
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

fn load_log(store: &StoreInner, header: &VdiHeader) -> Result<(SnapSet, Option<LogBlock>, u64)> {
    let blocks = read_log_chain(store, header.log_head, header.vdi_id)?;
    let mut snaps = SnapSet::default();
    let mut records = 0;
    for (_, b) in &blocks {
        for e in &b.entries {
            snaps.apply(e);
            records += 1;
        }
    }
    Ok((snaps, blocks.last().map(|(_, b)| b.clone()), records))
}

impl Vdi {
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    pub fn name(&self) -> String {
        self.inner.state.read().name.clone()
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.state.read().size
    }

    pub fn info(&self) -> VdiInfo {
        let st = self.inner.state.read();
        VdiInfo {
            id: self.inner.id,
            name: st.name.clone(),
            size_bytes: st.size,
            created_ns: st.header.created_ns,
            snapshot_count: st.snapshots.visible_len() as u64,
            hidden_snapshots: (st.snapshots.len() - st.snapshots.visible_len()) as u64,
            origin: (!st.header.origin.is_empty()).then(|| st.header.origin.clone()),
            generation: st.header.generation,
            schedule: st.header.schedule,
        }
    }

    /// Reads `buf.len()` bytes at `offset`. Unwritten ranges read as zeros.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let inner = &*self.inner;
        let st = inner.state.read();
        inner.usable(&st)?;
        check_io_range(st.size, offset, buf.len() as u64)?;
        read_tree(&inner.store, &st.tree, Some(inner), buf, offset)
    }

    /// Plans a READ for the caller to perform (see [`IoPlan`]). Never
    /// blocks: `Ok(None)` when the disk's lock is taken exclusively, the
    /// range is not block-aligned, a tree node is not in memory, or the
    /// store is not a file; then use [`Vdi::read`].
    pub fn try_plan_read(&self, offset: u64, len: usize) -> Result<Option<IoPlan>> {
        let inner = &self.inner;
        let Some(st) = inner.state.try_read_arc() else {
            return Ok(None);
        };
        inner.usable(&st)?;
        check_io_range(st.size, offset, len as u64)?;
        let Some((transfers, zeros)) =
            plan_read_tree(&inner.store, &st.tree, Some(inner), offset, len)?
        else {
            return Ok(None);
        };
        Ok(IoPlan::read(&inner.store, transfers, zeros, Some(st)))
    }

    /// Plans a block-aligned WRITE for the caller to perform (see
    /// [`IoPlan`]): blocks the disk owns are written in place, the others
    /// get new blocks now, which join the disk when the caller calls
    /// [`IoPlan::finish`] after the transfers. Never blocks: `Ok(None)`
    /// for the reasons of [`Vdi::try_plan_read`] or when the store is full;
    /// then use [`Vdi::write`].
    pub fn try_plan_write(&self, offset: u64, len: usize) -> Result<Option<IoPlan>> {
        let inner = &self.inner;
        let Some(st) = inner.state.try_read_arc() else {
            return Ok(None);
        };
        inner.usable(&st)?;
        check_io_range(st.size, offset, len as u64)?;
        let Some(found) = cached_entries(&inner.store, &st.tree, Some(inner), offset, len)? else {
            return Ok(None);
        };
        let Some(fd) = inner.store.meta.dev.raw_fd() else {
            return Ok(None);
        };
        let first = offset / BLOCK_SIZE_U64;
        let count = found.len() as u64;
        // Device block of each block of the request: owned ones now, new
        // ones once allocated.
        let mut addrs: Vec<Option<u64>> = found
            .iter()
            .map(|&(entry, writable)| writable.then(|| entry.addr()))
            .collect();
        let missing: Vec<usize> = (0..addrs.len()).filter(|&k| addrs[k].is_none()).collect();
        let mut links = Vec::new();
        if !missing.is_empty() {
            if inner.fresh.lock().map.len() > FRESH_FOLD_AT {
                // The blocking path folds the backlog into the tree.
                return Ok(None);
            }
            let Ok(allocated) = inner.allocate_fresh(&st, first, count, missing.len()) else {
                return Ok(None);
            };
            for (&k, addr) in missing.iter().zip(allocated) {
                addrs[k] = Some(addr);
                links.push((first + k as u64, addr));
            }
        }
        let mut runs = Runs::default();
        for (k, addr) in addrs.into_iter().enumerate() {
            if let Some(addr) = addr {
                runs.push(k as u64, addr);
            }
        }
        Ok(Some(IoPlan {
            fd,
            transfers: runs.into_transfers(),
            zeros: Vec::new(),
            links,
            disk: Some(inner.clone()),
            pin: Some(st),
            _store: inner.store.clone(),
        }))
    }

    /// Writes `data` at `offset`. Durable after the next [`Vdi::flush`].
    pub fn write(&self, data: &[u8], offset: u64) -> Result<()> {
        check_io_range(self.size(), offset, data.len() as u64)?;
        // Partial blocks at the edges one by one; the whole blocks between
        // them in one batch.
        let mut whole: Option<(u64, std::ops::Range<usize>)> = None;
        for (v, within, r) in pieces(offset, data.len()) {
            if r.len() < BLOCK_SIZE {
                self.inner.write_piece(v, within, &data[r])?;
            } else {
                match &mut whole {
                    Some((_, range)) => range.end = r.end,
                    None => whole = Some((v, r)),
                }
            }
        }
        if let Some((first, range)) = whole {
            self.inner.write_blocks(first, &data[range])?;
        }
        Ok(())
    }

    /// Makes every write completed before the call durable.
    ///
    /// When no metadata is pending (every write since the last commit went
    /// in place), this is a device flush under no disk lock: reads and
    /// writes of the disk go on meanwhile.
    pub fn flush(&self) -> Result<()> {
        {
            let st = self.inner.state.read();
            self.inner.usable(&st)?;
            if !st.has_pending() && self.inner.fresh.lock().is_empty() {
                drop(st);
                return self.inner.store.sync_bitmaps();
            }
        }
        let mut st = self.inner.exclusive()?;
        self.inner.commit(&mut st, None)
    }

    /// Zeroes `[offset, offset+len)`: whole blocks are unmapped (and freed
    /// if this disk owned them), partial blocks are written with zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_or_discard(offset, len, true)
    }

    /// Discards `[offset, offset+len)`: whole blocks are unmapped and read
    /// as zeros afterwards; partial blocks at the edges are left unchanged.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_or_discard(offset, len, false)
    }

    fn zero_or_discard(&self, offset: u64, len: u64, zero_edges: bool) -> Result<()> {
        check_io_range(self.size(), offset, len)?;
        let end = offset + len;
        let first_full = offset.div_ceil(BLOCK_SIZE_U64);
        let last_full = end / BLOCK_SIZE_U64;
        if zero_edges {
            let zeros = vec![0u8; BLOCK_SIZE];
            if first_full > last_full {
                return self.write(&zeros[..len as usize], offset);
            }
            let head = first_full * BLOCK_SIZE_U64 - offset;
            if head > 0 {
                self.write(&zeros[..head as usize], offset)?;
            }
            let tail = end - last_full * BLOCK_SIZE_U64;
            if tail > 0 {
                self.write(&zeros[..tail as usize], last_full * BLOCK_SIZE_U64)?;
            }
        }
        if first_full >= last_full {
            return Ok(());
        }
        let inner = &*self.inner;
        let mut st = inner.exclusive()?;
        inner.usable(&st)?;
        let mut mapped = Vec::new();
        st.tree
            .for_each_mapped(&inner.store.meta, first_full, last_full, &mut |v, _| {
                mapped.push(v);
                Ok(())
            })?;
        for v in mapped {
            inner.unmap_block(&mut st, v)?;
        }
        Ok(())
    }

    /// Allocation status of `[offset, offset+len)`, as block-aligned runs
    /// clipped to the range.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.with_whole_tree(|st| {
            check_io_range(st.size, offset, len)?;
            tree_extents(&self.inner.store, &st.tree, offset, len)
        })
    }

    /// Bytes backed by data blocks (shared or owned).
    pub fn allocated_bytes(&self) -> Result<u64> {
        self.inner
            .with_whole_tree(|st| count_mapped(&self.inner.store, &st.tree))
    }

    /// Grows the disk to `new_size` bytes (a multiple of 4096). Durable on return.
    pub fn grow(&self, new_size: u64) -> Result<()> {
        let mut st = self.inner.exclusive()?;
        self.inner.usable(&st)?;
        if !new_size.is_multiple_of(BLOCK_SIZE_U64) || new_size > MAX_VDI_SIZE {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} must be a multiple of 4096 and at most {MAX_VDI_SIZE}"
            )));
        }
        if new_size < st.size {
            return Err(Error::InvalidArgument(format!(
                "disk {} is {} bytes; shrinking to {new_size} is not supported",
                st.name, st.size
            )));
        }
        st.size = new_size;
        st.header_dirty = true;
        self.inner.commit(&mut st, None)
    }

    /// Takes a snapshot (O(1)): commits, then records the committed root.
    /// `name: None` names it by the current UTC time. Durable on return.
    pub fn snapshot(&self, name: Option<&str>) -> Result<SnapshotInfo> {
        self.take_snapshot(name, false)
    }

    /// One tick of the disk's schedule: takes a snapshot marked as taken
    /// by the schedule, then deletes the scheduled snapshots that the
    /// retention rules no longer keep (see [`crate::retention`]).
    /// Returns `None`, taking nothing, when the disk has no schedule (it
    /// was switched off while the caller waited for the lock).
    pub fn schedule_tick(&self) -> Result<Option<(SnapshotInfo, DeleteReport)>> {
        let mut st = self.inner.exclusive()?;
        if st.header.schedule.every_ns == 0 {
            return Ok(None);
        }
        self.inner.schedule_tick(&mut st).map(Some)
    }

    /// Deletes the scheduled snapshots the retention rules do not keep.
    pub fn apply_retention(&self) -> Result<DeleteReport> {
        let inner = &*self.inner;
        let mut st = inner.exclusive()?;
        inner.usable(&st)?;
        let expired = crate::retention::expired(&st.header.schedule, &st.snapshots.scheduled());
        if expired.is_empty() {
            return Ok(DeleteReport::default());
        }
        inner.delete_versions(&mut st, &expired)
    }

    fn take_snapshot(&self, name: Option<&str>, scheduled: bool) -> Result<SnapshotInfo> {
        let mut st = self.inner.exclusive()?;
        self.inner.usable(&st)?;
        let id = st.header.next_snapshot_id;
        let name = match name {
            Some(n) => {
                validate_name(n).map_err(Error::InvalidArgument)?;
                n.to_string()
            }
            None => format!("{}-{id}", compact_utc(now_ns())),
        };
        if st.snapshots.by_name(&name).is_some() {
            return Err(Error::AlreadyExists(format!(
                "snapshot {}@{name} already exists",
                st.name
            )));
        }
        self.inner.commit(
            &mut st,
            Some(NewSnapshot {
                id,
                name,
                scheduled,
            }),
        )?;
        st.snapshots
            .get(id)
            .cloned()
            .ok_or_else(|| Error::Inconsistent("snapshot vanished after commit".into()))
    }

    /// Snapshots alive, oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.inner
            .state
            .read()
            .snapshots
            .visible()
            .cloned()
            .collect()
    }

    pub fn snapshot_info(&self, name: &str) -> Result<SnapshotInfo> {
        let st = self.inner.state.read();
        st.snapshots
            .by_name(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("snapshot {}@{name} does not exist", st.name)))
    }

    /// A view of snapshot `name` whose blocks stay while it lives.
    pub(crate) fn pinned_view(&self, disk: &str, name: &str) -> Result<SnapshotView> {
        let st = self.inner.state.read();
        let info = st
            .snapshots
            .by_name(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("snapshot {disk}@{name} does not exist")))?;
        *self.inner.pins.lock().entry(info.id).or_insert(0) += 1;
        Ok(SnapshotView {
            store: self.inner.store.clone(),
            tree: Tree::open(info.root),
            info,
            disk: disk.to_string(),
            pin: self.inner.clone(),
        })
    }

    /// Sets (or, with `every_ns` 0, removes) the disk's snapshot schedule.
    /// Durable on return.
    pub fn set_schedule(&self, schedule: Schedule) -> Result<()> {
        let mut st = self.inner.exclusive()?;
        self.inner.usable(&st)?;
        let old = st.header.schedule;
        st.header.schedule = schedule;
        st.header_dirty = true;
        let result = self.inner.commit(&mut st, None);
        if result.is_err() && !st.poisoned {
            st.header.schedule = old;
        }
        result
    }

    pub fn schedule(&self) -> Schedule {
        self.inner.state.read().header.schedule
    }

    /// Deletes a snapshot by name: see [`Vdi::delete_snapshot_ids`].
    pub fn delete_snapshot(&self, name: &str) -> Result<DeleteReport> {
        let id = self.snapshot_info(name)?.id;
        self.delete_snapshot_ids(&[id])
    }

    /// Deletes snapshots (any of them, in any order) in one commit. Their
    /// names disappear at once. The blocks that only a deleted snapshot
    /// held return to the free pool once the commit is durable; a snapshot
    /// that clones or a rollback's branch derive from, or that an open
    /// view reads, is hidden instead and reclaimed when they are gone.
    /// Durable on return.
    pub fn delete_snapshot_ids(&self, ids: &[u64]) -> Result<DeleteReport> {
        let inner = &*self.inner;
        let mut st = inner.exclusive()?;
        inner.usable(&st)?;
        for id in ids {
            if st.snapshots.get(*id).is_none_or(|s| s.hidden) {
                return Err(Error::NotFound(format!(
                    "snapshot id {id} of disk {} does not exist",
                    st.name
                )));
            }
        }
        inner.delete_versions(&mut st, ids)
    }

    /// Rolls the disk back to a snapshot: its content becomes the
    /// snapshot's, and the blocks only the current content used are freed.
    /// Durable on return. The snapshot itself stays; the snapshots taken
    /// after it stay too (the disk now continues on a new branch).
    pub fn rollback(&self, name: &str) -> Result<()> {
        let snap = self.snapshot_info(name)?;
        let inner = &*self.inner;
        let mut st = inner.exclusive()?;
        inner.usable(&st)?;
        if st.snapshots.get(snap.id).is_none_or(|s| s.hidden) {
            return Err(Error::NotFound(format!(
                "snapshot {}@{name} does not exist",
                st.name
            )));
        }
        let owned = inner.live_owned_blocks(&st)?;
        let old = std::mem::replace(
            &mut st.tree,
            Tree::shared_copy(&inner.store.meta, snap.root)?,
        );
        let old_size = st.size;
        let old_parent = st.header.live_parent;
        let old_free = std::mem::replace(&mut st.pending_free, owned);
        st.size = snap.size_bytes;
        st.header.live_parent = snap.id;
        st.header_dirty = true;
        if let Err(e) = inner.commit(&mut st, None) {
            if !st.poisoned {
                st.tree = old;
                st.size = old_size;
                st.header.live_parent = old_parent;
                st.pending_free = old_free;
            }
            return Err(e);
        }
        // The old branch's last snapshot lost a child: it may be reclaimable.
        if st.snapshots.get(old_parent).is_some_and(|s| s.hidden) {
            inner.delete_versions(&mut st, &[])?;
        }
        Ok(())
    }
}

/// Reads through `tree`, and through the fresh writes of `disk` (whose
/// lock the caller holds shared) for a live disk.
pub(crate) fn read_tree(
    store: &StoreInner,
    tree: &Tree,
    disk: Option<&VdiInner>,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let first = offset / BLOCK_SIZE_U64;
    let end = (offset + buf.len() as u64).div_ceil(BLOCK_SIZE_U64);
    let mut found = Vec::with_capacity((end - first) as usize);
    tree.for_each_entry(&store.meta, first, end, &mut |_, entry, w| {
        found.push((entry, w));
        Ok(())
    })?;
    if let Some(disk) = disk {
        disk.overlay_fresh(first, &mut found);
    }
    let entries = found.into_iter().map(|(e, _)| e);
    // Whole mapped blocks are read in runs of consecutive addresses, each
    // with one `read_at` straight into the caller's buffer.
    let mut runs = Runs::default();
    let mut partial = Vec::new();
    for ((_, within, r), entry) in pieces(offset, buf.len()).zip(entries) {
        if entry.is_null() {
            buf[r].fill(0);
        } else if r.len() == BLOCK_SIZE {
            runs.push_range(r, entry.addr());
        } else {
            partial.push((within, r, entry.addr()));
        }
    }
    let read = |addr: u64, out: &mut [u8]| {
        store
            .meta
            .dev
            .read_at(out, addr * BLOCK_SIZE_U64)
            .map_err(Error::io(format!("reading data block {addr}")))
    };
    for run in runs.0 {
        read(run.addr, &mut buf[run.bytes()])?;
    }
    if !partial.is_empty() {
        let mut block = parallax_device::AlignedBuf::zeroed(BLOCK_SIZE);
        for (within, r, addr) in partial {
            read(addr, &mut block)?;
            buf[r.clone()].copy_from_slice(&block[within..within + r.len()]);
        }
    }
    Ok(())
}

/// One device transfer: consecutive blocks at consecutive addresses.
struct Run {
    /// First device block.
    addr: u64,
    /// Byte range in the caller's buffer.
    start: usize,
    end: usize,
}

impl Run {
    fn bytes(&self) -> std::ops::Range<usize> {
        self.start..self.end
    }
}

/// Gathers whole-block transfers into [`Run`]s.
#[derive(Default)]
struct Runs(Vec<Run>);

impl Runs {
    fn into_transfers(self) -> Vec<Transfer> {
        self.0
            .into_iter()
            .map(|r| Transfer {
                device_offset: r.addr * BLOCK_SIZE_U64,
                buf: r.start..r.end,
            })
            .collect()
    }

    /// Adds whole block `k` of the caller's buffer, at device block `addr`.
    fn push(&mut self, k: u64, addr: u64) {
        let start = k as usize * BLOCK_SIZE;
        self.push_range(start..start + BLOCK_SIZE, addr);
    }

    fn push_range(&mut self, r: std::ops::Range<usize>, addr: u64) {
        if let Some(last) = self.0.last_mut() {
            let blocks = ((last.end - last.start) / BLOCK_SIZE) as u64;
            if last.end == r.start && last.addr + blocks == addr {
                last.end = r.end;
                return;
            }
        }
        self.0.push(Run {
            addr,
            start: r.start,
            end: r.end,
        });
    }
}

fn tree_extents(store: &StoreInner, tree: &Tree, offset: u64, len: u64) -> Result<Vec<Extent>> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |start: u64, stop: u64, allocated: bool| {
        if stop <= start {
            return;
        }
        match out.last_mut() {
            Some(last) if last.allocated == allocated && last.offset + last.length == start => {
                last.length += stop - start
            }
            _ => out.push(Extent {
                offset: start,
                length: stop - start,
                allocated,
            }),
        }
    };
    let first = offset / BLOCK_SIZE_U64;
    let last = end.div_ceil(BLOCK_SIZE_U64);
    let mut cursor = offset;
    tree.for_each_mapped(&store.meta, first, last, &mut |v, _| {
        let start = (v * BLOCK_SIZE_U64).max(offset);
        let stop = ((v + 1) * BLOCK_SIZE_U64).min(end);
        push(cursor, start, false);
        push(start, stop, true);
        cursor = stop;
        Ok(())
    })?;
    push(cursor, end, false);
    Ok(out)
}

fn count_mapped(store: &StoreInner, tree: &Tree) -> Result<u64> {
    let mut n = 0u64;
    tree.for_each_mapped(&store.meta, 0, MAX_VIRTUAL_BLOCKS, &mut |_, _| {
        n += 1;
        Ok(())
    })?;
    Ok(n * BLOCK_SIZE_U64)
}

impl SnapshotView {
    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    /// `NAME@SNAP`.
    pub fn full_name(&self) -> String {
        format!("{}@{}", self.disk, self.info.name)
    }

    pub fn size(&self) -> u64 {
        self.info.size_bytes
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_io_range(self.info.size_bytes, offset, buf.len() as u64)?;
        read_tree(&self.store, &self.tree, None, buf, offset)
    }

    /// Plans a READ for the caller to perform, as [`Vdi::try_plan_read`].
    pub fn try_plan_read(&self, offset: u64, len: usize) -> Result<Option<IoPlan>> {
        check_io_range(self.info.size_bytes, offset, len as u64)?;
        let Some((transfers, zeros)) = plan_read_tree(&self.store, &self.tree, None, offset, len)?
        else {
            return Ok(None);
        };
        Ok(IoPlan::read(&self.store, transfers, zeros, None))
    }

    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_io_range(self.info.size_bytes, offset, len)?;
        tree_extents(&self.store, &self.tree, offset, len)
    }

    pub fn allocated_bytes(&self) -> Result<u64> {
        count_mapped(&self.store, &self.tree)
    }
}
