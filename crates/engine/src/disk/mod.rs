//! Virtual disks: the [`Vdi`] handle and what it does.
//!
//! | module | concern |
//! |---|---|
//! | `state` | [`Disk`](state::Disk): one open disk's state and locks; the savepoint a failed transaction goes back to |
//! | `data` | the data path: reads, in-place and allocating writes, discard |
//! | `plan` | planned I/O ([`IoPlan`]) for callers that move the data themselves |
//! | `commit` | the commit pipeline and the one transaction every change runs in |
//! | `log` | snapshot-log I/O |
//! | `journal` | entry-journal I/O (format 2): the level-0 changes since a checkpoint |
//! | `reclaim` | deleting snapshots, retention ticks, what deleting a disk frees |
//! | `diff` | what changed between two versions of one lineage ([`diff()`]) |
//! | `view` | [`ReadDisk`], [`SnapshotView`] |
//! | `cached` | which blocks a read may take from the local read cache, and which copies |
//!
//! A `Vdi` is a cheap handle: the store owns the disk's state (see
//! `store/mod.rs`) and every handle on one disk shares it. A handle also
//! keeps the store open ([`Owner`]), so that dropping handles in any order
//! never loses a disk's uncommitted state: the store commits it when it
//! lets the disk go.

mod cached;
mod commit;
mod data;
mod diff;
pub(crate) mod journal;
pub(crate) mod log;
mod plan;
mod reclaim;
mod state;
mod view;

use crate::error::{Error, Result};
use crate::lineage::SnapshotInfo;
use crate::time::{compact_utc, now_ns};
pub use commit::Durability;
use commit::NewSnapshot;
use data::{check_io_range, count_mapped, pieces, tree_extents};
use parallax_format::{validate_name, CachePolicy, DiskRef, Schedule, BLOCK_SIZE, BLOCK_SIZE_U64};
use std::sync::Arc;

pub use diff::{allocation_depth, diff, diff_in, Change, ChangeKind, DepthRun, DiffTarget};
pub use plan::{CopyChecks, FdTransfer, IoPlan, Transfer};
pub(crate) use reclaim::Holds;
pub(crate) use state::{tree_from_snapshot, verify_allocated, Disk, DiskState, Origin};
pub(crate) use view::{extents_at_root, read_at_root};
pub use view::{ReadDisk, SnapshotView};

/// Largest virtual disk: the tree's reach.
pub const MAX_VDI_SIZE: u64 = crate::tree::MAX_VIRTUAL_BLOCKS * BLOCK_SIZE_U64;

/// Keeps the store that owns a disk open while a handle, a view or a plan
/// on that disk lives.
pub(crate) type Owner = Arc<dyn std::any::Any + Send + Sync>;

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
    /// Cluster mode: the host whose commit this is, and its epoch (0, 0
    /// without cluster mode).
    pub writer_host: u64,
    pub writer_epoch: u64,
    /// How the daemon's local cache serves the disk.
    pub cache_policy: CachePolicy,
}

/// A run of blocks with the same allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// Backed by a data block. Unallocated ranges read as zeros.
    pub allocated: bool,
}

/// A handle on a writable disk; clones share the same disk.
#[derive(Clone)]
pub struct Vdi {
    disk: Arc<Disk>,
    owner: Owner,
}

impl Vdi {
    /// A handle on `disk`, keeping `owner` (its store) open.
    pub(crate) fn new(disk: Arc<Disk>, owner: Owner) -> Vdi {
        Vdi { disk, owner }
    }

    pub(crate) fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    pub fn id(&self) -> u64 {
        self.disk.id()
    }

    pub fn name(&self) -> String {
        self.disk.state.read().name.clone()
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.disk.state.read().size
    }

    pub fn info(&self) -> VdiInfo {
        let st = self.disk.state.read();
        VdiInfo {
            id: self.disk.id(),
            name: st.name.clone(),
            size_bytes: st.size,
            created_ns: st.header.created_ns,
            snapshot_count: st.snapshots.visible_len() as u64,
            hidden_snapshots: (st.snapshots.len() - st.snapshots.visible_len()) as u64,
            origin: (!st.header.origin.is_empty()).then(|| st.header.origin.clone()),
            generation: st.header.generation,
            schedule: st.header.schedule,
            // This host's key once it holds one, before its first commit.
            writer_host: match (self.disk.writer_epoch(), self.disk.pool.coordinator()) {
                (e, Some(c)) if e != 0 => c.host_id(),
                _ => st.header.writer_host,
            },
            writer_epoch: match self.disk.writer_epoch() {
                0 => st.header.writer_epoch,
                e => e,
            },
            cache_policy: st.header.cache_policy,
        }
    }

    /// Reads `buf.len()` bytes at `offset`. Unwritten ranges read as zeros.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let disk = &*self.disk;
        disk.used();
        let st = disk.state.read();
        disk.usable(&st)?;
        check_io_range(st.size, offset, buf.len() as u64)?;
        let scope = cached::CacheScope::live(&st);
        data::read_tree(&disk.pool, &st.tree, Some(disk), &scope, buf, offset)
    }

    /// Writes `data` at `offset`. Durable after the next [`Vdi::flush`].
    pub fn write(&self, data: &[u8], offset: u64) -> Result<()> {
        check_io_range(self.size(), offset, data.len() as u64)?;
        self.disk.touch();
        // Partial blocks at the edges one by one; the whole blocks between
        // them in one batch.
        let mut whole: Option<(u64, std::ops::Range<usize>)> = None;
        for (v, within, r) in pieces(offset, data.len()) {
            if r.len() < BLOCK_SIZE {
                self.disk.write_piece(v, within, &data[r])?;
            } else {
                match &mut whole {
                    Some((_, range)) => range.end = r.end,
                    None => whole = Some((v, r)),
                }
            }
        }
        if let Some((first, range)) = whole {
            self.disk.write_blocks(first, &data[range])?;
        }
        Ok(())
    }

    /// Makes every write completed before the call durable.
    ///
    /// It first waits for a commit in flight (whose adopted tree may hold
    /// writes completed before this call). When no metadata is pending
    /// then (every write since the last commit went in place), this is a
    /// device flush under no disk lock; otherwise a pipelined commit. Reads
    /// and writes of the disk go on meanwhile, in either case.
    ///
    /// With a write-back log logging (`write_log.rs` in `parallax-cache`),
    /// this is durable in the log; a disk whose policy is not write-back
    /// then also waits until the log has reached the pool up to here.
    pub fn flush(&self) -> Result<()> {
        let had_written = self.disk.flush_begins();
        let flushed = self.flush_now().and_then(|_| self.write_through_log());
        if flushed.is_err() {
            self.disk.flush_failed(had_written);
        }
        flushed
    }

    fn write_through_log(&self) -> Result<()> {
        match self.disk.pool.write_log() {
            Some(log) if log.is_logging() && self.disk.cache_policy() != CachePolicy::WriteBack => {
                log.drain_to(log.head_lsn())
                    .map_err(Error::io("destaging the write-back log"))
            }
            _ => Ok(()),
        }
    }

    fn flush_now(&self) -> Result<()> {
        let disk = &*self.disk;
        let commit = disk.commit.lock();
        {
            let st = disk.state.read();
            disk.usable(&st)?;
            if !st.has_pending() && disk.fresh.lock().is_empty() {
                drop(st);
                let synced = disk.pool.sync_bitmaps();
                drop(commit);
                return synced;
            }
        }
        drop(commit);
        disk.commit_pipelined(disk.exclusive()?)
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
        let disk = &*self.disk;
        let mut st = disk.lock_tree()?;
        disk.usable(&st)?;
        disk.touch();
        let mut mapped = Vec::new();
        st.tree
            .for_each_mapped(disk.pool.meta(), first_full, last_full, &mut |v, _| {
                mapped.push(v);
                Ok(())
            })?;
        for v in mapped {
            disk.unmap_block(&mut st, v)?;
        }
        Ok(())
    }

    /// Allocation status of `[offset, offset+len)`, as block-aligned runs
    /// clipped to the range.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.disk.used();
        self.disk.with_whole_tree(|st| {
            check_io_range(st.size, offset, len)?;
            tree_extents(&self.disk.pool, &st.tree, offset, len)
        })
    }

    /// Bytes backed by data blocks (shared or owned).
    pub fn allocated_bytes(&self) -> Result<u64> {
        self.disk
            .with_whole_tree(|st| count_mapped(&self.disk.pool, &st.tree))
    }

    /// Grows the disk to `new_size` bytes (a multiple of 4096). Durable on return.
    pub fn grow(&self, new_size: u64) -> Result<()> {
        let mut st = self.disk.exclusive()?;
        self.disk.transact(&mut st, |st| {
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
            Ok(((), None))
        })
    }

    /// Takes a snapshot (O(1)): commits, then records the committed root.
    /// `name: None` names it by the current UTC time. Durable on return;
    /// the disk is held still only while the snapshot is recorded in
    /// memory, not while it is written.
    pub fn snapshot(&self, name: Option<&str>) -> Result<SnapshotInfo> {
        self.snapshot_with(name, Durability::OnReturn)
    }

    /// [`Vdi::snapshot`], returning at the durability asked for. With
    /// [`Durability::Deferred`] it returns once the snapshot is fixed in
    /// memory (readable, listed, and what every later write is made
    /// against); it is durable after [`Vdi::make_durable`], the disk's next
    /// FLUSH or any later commit of the disk. A power cut before loses it,
    /// and with it nothing a FLUSH acknowledged.
    pub fn snapshot_with(
        &self,
        name: Option<&str>,
        durability: Durability,
    ) -> Result<SnapshotInfo> {
        self.snapshot_as(name, 0, durability)
    }

    /// [`Vdi::snapshot`] of a disk that `parallax receive` just brought to
    /// the state of snapshot `identity` of another store: the new
    /// snapshot keeps that identity (see [`SnapshotInfo::identity`]), so
    /// that a later incremental stream from it applies here.
    pub fn snapshot_received(&self, name: &str, identity: u64) -> Result<SnapshotInfo> {
        if identity == 0 {
            return Err(Error::InvalidArgument(
                "a snapshot identity is never 0".into(),
            ));
        }
        self.snapshot_as(Some(name), identity, Durability::OnReturn)
    }

    fn snapshot_as(
        &self,
        name: Option<&str>,
        received: u64,
        durability: Durability,
    ) -> Result<SnapshotInfo> {
        let st = self.disk.exclusive()?;
        self.disk.usable(&st)?;
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
                "snapshot {} already exists",
                DiskRef::snapshot(&st.name, &name)
            )));
        }
        let new = NewSnapshot {
            id,
            name,
            scheduled: false,
            received,
        };
        self.disk.take_snapshot(st, new, durability)
    }

    /// Makes every commit adopted so far durable (a snapshot taken with
    /// [`Durability::Deferred`]); unlike [`Vdi::flush`], it commits no
    /// write made since. Reads and writes go on meanwhile.
    pub fn make_durable(&self) -> Result<()> {
        self.disk.durable().map(drop)
    }

    /// One tick of the disk's schedule: takes a snapshot marked as taken
    /// by the schedule, then deletes the scheduled snapshots that the
    /// retention rules no longer keep (see [`crate::retention`]).
    /// Returns `None`, taking nothing, when the disk has no schedule (it
    /// was switched off while the caller waited for the lock).
    pub fn schedule_tick(&self) -> Result<Option<(SnapshotInfo, DeleteReport)>> {
        let st = self.disk.exclusive()?;
        if st.header.schedule.every_ns == 0 {
            return Ok(None);
        }
        self.disk.schedule_tick(st).map(Some)
    }

    /// Deletes the scheduled snapshots the retention rules do not keep.
    pub fn apply_retention(&self) -> Result<DeleteReport> {
        let disk = &*self.disk;
        let mut st = disk.exclusive()?;
        disk.usable(&st)?;
        let expired = crate::retention::expired(&st.header.schedule, &st.snapshots.scheduled());
        if expired.is_empty() {
            return Ok(DeleteReport::default());
        }
        disk.delete_versions(&mut st, &expired, Holds::of_disk(disk))
    }

    /// Snapshots alive, oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.disk
            .state
            .read()
            .snapshots
            .visible()
            .cloned()
            .collect()
    }

    /// Snapshot `name`; fails like any operation on a disk that is not
    /// usable (deleted, poisoned, or, in shared mode, fenced: what it knows
    /// may be stale).
    pub fn snapshot_info(&self, name: &str) -> Result<SnapshotInfo> {
        self.disk.read_state()?.snapshot_named(name).cloned()
    }

    /// The identity of snapshot `info` of this disk across stores (see
    /// [`SnapshotInfo::identity`]).
    pub fn snapshot_identity(&self, info: &SnapshotInfo) -> u64 {
        info.identity(self.disk.pool.meta().store_id, self.disk.id)
    }

    /// A read-only view of snapshot `name`, whose blocks stay while it lives.
    pub fn open_snapshot(&self, name: &str) -> Result<SnapshotView> {
        let st = self.disk.state.read();
        let info = st.snapshot_named(name)?.clone();
        // Pinned under the lock: no deletion can reclaim it in between.
        SnapshotView::pinned(self, &st, info)
    }

    /// Sets (or, with `every_ns` 0, removes) the disk's snapshot schedule.
    /// Durable on return.
    pub fn set_schedule(&self, schedule: Schedule) -> Result<()> {
        let mut st = self.disk.exclusive()?;
        self.disk.transact(&mut st, |st| {
            st.header.schedule = schedule;
            st.header_dirty = true;
            Ok(((), None))
        })
    }

    /// Sets how the local cache serves the disk (and its snapshots' views
    /// opened from now on). Durable on return.
    pub fn set_cache_policy(&self, policy: CachePolicy) -> Result<()> {
        let mut st = self.disk.exclusive()?;
        self.disk.transact(&mut st, |st| {
            st.header.cache_policy = policy;
            st.header_dirty = true;
            Ok(((), None))
        })
    }

    pub fn schedule(&self) -> Schedule {
        self.disk.state.read().header.schedule
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
        let disk = &*self.disk;
        let mut st = disk.exclusive()?;
        disk.usable(&st)?;
        for id in ids {
            if st.snapshots.get(*id).is_none_or(|s| s.hidden) {
                return Err(Error::NotFound(format!(
                    "snapshot id {id} of disk {} does not exist",
                    st.name
                )));
            }
        }
        disk.delete_versions(&mut st, ids, Holds::of_disk(disk))
    }

    /// Rolls the disk back to a snapshot: its content becomes the
    /// snapshot's, and the blocks only the current content used are freed.
    /// Durable on return. The snapshot itself stays; the snapshots taken
    /// after it stay too (the disk now continues on a new branch).
    pub fn rollback(&self, name: &str) -> Result<()> {
        let snap = self.snapshot_info(name)?;
        let disk = &*self.disk;
        let mut st = disk.exclusive()?;
        let old_parent = st.header.live_parent;
        if st.tree.is_dirty() {
            // The transaction replaces the tree: it must be clean to be
            // saved cheaply (see `DiskState::savepoint`).
            disk.commit(&mut st, None)?;
        }
        disk.transact(&mut st, |st| {
            if st.snapshots.get(snap.id).is_none_or(|s| s.hidden) {
                return Err(st.no_such_snapshot(name));
            }
            let owned = disk.live_owned_blocks(st)?;
            st.tree =
                state::tree_from_snapshot(&disk.pool, disk.id, &snap, st.tree.overlay().is_some())?;
            st.pending_free.extend(owned);
            st.size = snap.size_bytes;
            st.header.live_parent = snap.id;
            st.header_dirty = true;
            Ok(((), None))
        })?;
        // The old branch's last snapshot lost a child: it may be reclaimable.
        if st.snapshots.get(old_parent).is_some_and(|s| s.hidden) {
            disk.delete_versions(&mut st, &[], Holds::of_disk(disk))?;
        }
        Ok(())
    }
}
