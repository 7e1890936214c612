//! The commit pipeline: how a disk's changes become durable.
//!
//! ```text
//! nothing changed? ─▶ sync bitmaps (write changed slots, flush) ─▶ return
//! g = header.generation + 1
//! 1. dirty tree nodes ─▶ new blocks (one run of consecutive blocks where
//!    the allocator has one), level 0 first
//! 2. (snapshot) Taken record with the committed root (or the parent's
//!    root, if nothing changed since); new live root = copy with writable
//!    bits cleared
//! 3. pending log records ─▶ new log head block(s), or a compacted chain
//! 4. bitmaps of extents that allocated ─▶ older slot; FLUSH
//! 5. header g ─▶ older header slot; FLUSH                ◀── commit point
//! 6. adopt in memory; release freed blocks
//! ```
//!
//! Invariants:
//! - Nothing in the disk's state changes before step 5 has succeeded; a
//!   failure in steps 1–4 gives back the blocks the commit allocated and
//!   leaves every change pending, so the caller can retry.
//! - A failure in step 5 poisons the disk (the header may or may not be on
//!   the device).
//! - An operation that changes the state before committing (deletion,
//!   rollback, a schedule tick, grow, set schedule) runs as one
//!   [`Disk::transact`]: a savepoint, its in-memory change, the commit; on a
//!   failure before step 5 the state goes back to the savepoint.
//! - Blocks the commit stops referencing are freed (through the pool's one
//!   release path) only after step 5.

use crate::disk::log::{self, LogWriter};
use crate::disk::state::{Disk, DiskState};
use crate::error::{Error, Result};
use crate::lineage::{exclusive_blocks, Delta, SnapshotInfo};
use crate::time::now_ns;
use parallax_format::{LogBlock, NodeBlock, Ptr, VdiHeader, TREE_HEIGHT};
use std::collections::VecDeque;
use std::sync::Arc;

const ROOT_LEVEL: u8 = (TREE_HEIGHT - 1) as u8;

/// A snapshot for [`Disk::commit`] to record.
pub(super) struct NewSnapshot {
    pub id: u64,
    pub name: String,
    pub scheduled: bool,
}

/// What steps 1–4 produced, adopted in step 6.
struct Prepared {
    header: VdiHeader,
    freed: Vec<u64>,
    new_snapshot: Option<SnapshotInfo>,
    new_log: Option<(LogBlock, u64)>,
}

impl Disk {
    /// Runs `change` on the state, then commits it (recording the snapshot
    /// it may return) as one transaction: see the module documentation.
    pub(super) fn transact<T>(
        &self,
        st: &mut DiskState,
        change: impl FnOnce(&mut DiskState) -> Result<(T, Option<NewSnapshot>)>,
    ) -> Result<T> {
        self.usable(st)?;
        self.fold_fresh(st)?;
        let savepoint = st.savepoint();
        let result = change(st).and_then(|(value, snapshot)| {
            self.commit(st, snapshot)?;
            Ok(value)
        });
        if result.is_err() && !st.poisoned {
            st.restore(&self.pool, savepoint);
        }
        result
    }

    /// Commits everything in `st`, whose lock the caller holds exclusively.
    pub(crate) fn commit_held(&self, st: &mut DiskState) -> Result<()> {
        self.commit(st, None)
    }

    /// Commits everything in `st` and, if `snapshot` is given, records the
    /// committed tree as a snapshot and gives the disk a fresh shared root.
    pub(super) fn commit(&self, st: &mut DiskState, snapshot: Option<NewSnapshot>) -> Result<()> {
        self.usable(st)?;
        self.fold_fresh(st)?;
        let meta = self.pool.meta();
        if !st.has_pending() && snapshot.is_none() {
            // Also makes earlier frees durable in the bitmaps.
            return self.pool.sync_bitmaps();
        }
        let generation = st.header.generation + 1;
        let mut allocated = Vec::new();
        let prepared = match self.prepare(st, snapshot, generation, &mut allocated) {
            Ok(p) => p,
            Err(e) => {
                // Written perhaps, but referenced by nothing durable.
                self.pool.free(&allocated);
                return Err(e);
            }
        };
        // The point of no return: the header write may land or not.
        let slot = st.next_slot;
        let (block, _) = prepared
            .header
            .encode(meta.store_id, self.header_addrs[slot]);
        let written = meta
            .write_block(self.header_addrs[slot], &block, "a VDI header")
            .and_then(|_| meta.flush());
        if let Err(e) = written {
            st.poisoned = true;
            return Err(e);
        }
        st.next_slot = 1 - slot;
        st.tree.apply(prepared.header.root);
        st.header = prepared.header;
        st.header_dirty = false;
        st.pending_log.clear();
        if let Some(s) = prepared.new_snapshot {
            let id = s.id;
            st.snapshots.insert(s);
            // Derived data: without it, reclaiming walks the trees instead.
            let delta = self.delta_to_parent(st, id).unwrap_or(None);
            st.snapshots.set_delta(id, delta);
        }
        if let Some((block, records)) = prepared.new_log {
            st.log_block = Some(block);
            st.log_records = records;
        }
        let mut to_free = prepared.freed;
        to_free.append(&mut st.pending_free);
        self.pool.free(&to_free);
        Ok(())
    }

    /// Steps 1–4, with the nodes, root copy and log block taken from one run
    /// of consecutive blocks where possible (one device write for them all).
    fn prepare(
        &self,
        st: &DiskState,
        snapshot: Option<NewSnapshot>,
        generation: u64,
        allocated: &mut Vec<u64>,
    ) -> Result<Prepared> {
        let pool = &self.pool;
        let mut run = VecDeque::from(pool.allocate_run(st.tree.dirty_nodes() as u64 + 2));
        let mut allocate = || match run.pop_front() {
            Some(a) => Ok(a),
            None => pool.allocate(0),
        };
        let prepared = self.prepare_with(st, snapshot, generation, allocated, &mut allocate);
        // Never written nor referenced: back at once.
        pool.free(run.make_contiguous());
        prepared
    }

    fn prepare_with(
        &self,
        st: &DiskState,
        snapshot: Option<NewSnapshot>,
        generation: u64,
        allocated: &mut Vec<u64>,
        allocate: &mut dyn FnMut() -> Result<u64>,
    ) -> Result<Prepared> {
        let pool = &*self.pool;
        let meta = pool.meta();
        // Everything the commit writes before its bitmaps, in one batch.
        let mut blocks = Vec::new();
        let plan =
            st.tree
                .write_dirty(meta, self.id, generation, allocate, allocated, &mut blocks)?;
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
                let node = meta.load_node(root, ROOT_LEVEL)?;
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
        let mut writer = LogWriter {
            pool,
            owner: self.id,
            generation,
            allocate,
            allocated,
            out: &mut blocks,
        };
        if !log_entries.is_empty() && st.log_records + log_entries.len() as u64 > 2 * kept + 96 {
            // Compaction: most records are history. Rewrite the log as one
            // Taken record per kept snapshot and free the old chain. Cost
            // grows with the snapshots kept, and it happens only after at
            // least as many records were appended since the last time.
            let mut records = st.snapshots.records();
            records.extend(new_snapshot.as_ref().map(SnapshotInfo::record));
            let (head, block) = log::write_chain(&mut writer, Ptr::NULL, None, &records)?;
            for (addr, _) in log::read_chain(pool, st.header.log_head, self.id)? {
                freed.push(addr);
            }
            header.log_head = head;
            new_log = Some((block, records.len() as u64));
        } else if !log_entries.is_empty() {
            let (head, block, mut log_freed) = log::append(&mut writer, st, &log_entries)?;
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
        pool.sync_allocations()?;
        Ok(Prepared {
            header,
            freed,
            new_snapshot,
            new_log,
        })
    }

    /// The root of the live tree's parent snapshot, if the live tree holds
    /// exactly what that snapshot holds (nothing written since, nothing
    /// pending): a new snapshot can then share that root instead of
    /// copying one, so that snapshots of an idle disk cost a log record.
    fn unchanged_since_parent(&self, st: &DiskState) -> Result<Option<Ptr>> {
        if !st.reclaims() || st.tree.is_dirty() || st.tree.root().is_null() {
            return Ok(None);
        }
        let Some(parent) = st.snapshots.get(st.header.live_parent) else {
            return Ok(None);
        };
        if parent.size_bytes != st.size {
            return Ok(None);
        }
        let meta = self.pool.meta();
        let live = meta.load_node(st.tree.root(), ROOT_LEVEL)?;
        let snap = meta.load_node(parent.root, ROOT_LEVEL)?;
        // The live root is a copy of the parent's with every bit cleared;
        // any write since changed an entry (new blocks, or promotions).
        let same = live
            .entries
            .iter()
            .zip(snap.entries.iter())
            .all(|(l, p)| *l == p.shared());
        Ok(same.then_some(parent.root))
    }

    /// The delta of snapshot `id` to its parent (see `lineage.rs`), walked
    /// while both trees' nodes are likely cached: right after it is taken.
    fn delta_to_parent(&self, st: &DiskState, id: u64) -> Result<Option<Delta>> {
        if !st.reclaims() {
            return Ok(None);
        }
        let Some(s) = st.snapshots.get(id) else {
            return Ok(None);
        };
        if s.parent == 0 && st.origin_root().is_null() {
            return Ok(Some(Delta::default()));
        }
        let parent = st.version_root(s.parent)?;
        let meta = self.pool.meta();
        let mut delta = Delta::default();
        exclusive_blocks(meta, ROOT_LEVEL, s.root, &[parent], &mut |a, _| {
            delta.born.push(a)
        })?;
        exclusive_blocks(meta, ROOT_LEVEL, parent, &[s.root], &mut |a, _| {
            delta.dead.push(a)
        })?;
        for list in [&mut delta.born, &mut delta.dead] {
            list.sort_unstable();
            list.dedup();
        }
        Ok(Some(delta))
    }

    /// Takes the snapshot `new`, committing everything pending with it.
    pub(super) fn take_snapshot(
        &self,
        st: &mut DiskState,
        new: NewSnapshot,
    ) -> Result<SnapshotInfo> {
        let id = new.id;
        self.commit(st, Some(new))?;
        st.snapshots
            .get(id)
            .cloned()
            .ok_or_else(|| Error::Inconsistent("snapshot vanished after commit".into()))
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{CreateOptions, Store};
    use crate::Error;
    use parallax_device::{CrashDevice, Fault};
    use std::sync::Arc;

    /// A transaction whose commit fails before its header goes back to its
    /// savepoint: the in-memory change is undone, and the disk works on.
    #[test]
    fn a_failed_transaction_leaves_the_state_as_before() {
        let dev = Arc::new(CrashDevice::new(16 << 20));
        let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
        let d = store.create_vdi("d", 1 << 20).unwrap();
        d.write(&[1; 4096], 0).unwrap();
        d.snapshot(Some("s")).unwrap();
        d.write(&[2; 4096], 0).unwrap();
        dev.inject(Fault::WriteEio { after_writes: 0 });
        let grown = d.grow(2 << 20);
        assert!(matches!(grown, Err(Error::Io { .. })), "{grown:?}");
        assert_eq!(d.size(), 1 << 20, "a failed grow changed the size");
        dev.inject(Fault::WriteEio { after_writes: 0 });
        assert!(d.rollback("s").is_err());
        let mut b = vec![0u8; 4096];
        d.read(&mut b, 0).unwrap();
        assert_eq!(b, vec![2; 4096], "a failed rollback changed the content");
        assert_eq!(d.info().snapshot_count, 1);
        // The disk works on, and the same changes go through.
        d.grow(2 << 20).unwrap();
        d.rollback("s").unwrap();
        d.read(&mut b, 0).unwrap();
        assert_eq!(b, vec![1; 4096]);
        assert!(store.check().unwrap().is_clean());
    }
}
