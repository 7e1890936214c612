//! Reclamation: deleting snapshots (in any order), schedule ticks with
//! retention, and the blocks a whole disk frees when it is deleted.
//!
//! A deleted snapshot with at most one child version, no clone and no open
//! view is reclaimed at once: the blocks that neither its parent nor its
//! child holds at the same tree position are freed (`lineage.rs` states the
//! connectivity invariant this rests on). When the child is the live tree,
//! pointers to blocks the live tree now holds alone become writable
//! ([`Tree::promote`](crate::tree::Tree::promote)). Other deleted snapshots
//! are hidden and reclaimed later, when they have at most one child.
//!
//! Every deletion runs as one transaction (`commit.rs`): planned in memory,
//! committed, and undone in memory if the commit fails before its header.
//!
//! **Shared mode.** Other hosts may read a snapshot (pinned through the
//! coordinator) or clone it, and this host learns of both only under the
//! catalogue lock. So a deletion made without it ([`Holds::Unknown`]: the
//! disk's own calls) only hides; the store reclaims hidden versions later,
//! holding the catalogue lock until that commit is durable, with the
//! clone counts re-read and the cluster's pins in hand
//! ([`Holds::Cluster`]).

use crate::disk::commit::{Durability, NewSnapshot};
use crate::disk::state::{Disk, DiskState, Exclusive, Origin};
use crate::disk::DeleteReport;
use crate::error::Result;
use crate::lineage::{exclusive_of, intersect, promotions, Delta, SnapshotInfo, Version};
use crate::meta::MetaIo;
use crate::time::{compact_utc, now_ns};
use parallax_format::{LogEntry, LogEntryKind, Ptr, TREE_HEIGHT};
use std::collections::HashSet;

const ROOT_LEVEL: u8 = (TREE_HEIGHT - 1) as u8;

/// What keeps a hidden version from being reclaimed beyond this host's own
/// views of it and the clones it knows of (see the module documentation).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Holds<'a> {
    /// Single mode: nothing else.
    Local,
    /// Shared mode, under the catalogue lock (clone counts re-read): the
    /// snapshots any host pins.
    Cluster(&'a HashSet<u64>),
    /// Shared mode without the catalogue lock: nothing is reclaimed.
    Unknown,
}

impl Holds<'_> {
    /// The holds a deletion made through the disk alone works with.
    pub(crate) fn of_disk(disk: &Disk) -> Holds<'static> {
        if disk.pool.coordinator().is_some() {
            Holds::Unknown
        } else {
            Holds::Local
        }
    }

    fn keeps(&self, snapshot: u64) -> bool {
        match self {
            Holds::Local => false,
            Holds::Cluster(pinned) => pinned.contains(&snapshot),
            Holds::Unknown => true,
        }
    }
}

impl Disk {
    /// Hides the (visible) snapshots `ids`, reclaims every hidden version
    /// that nothing derives from any more (at most one child version, no
    /// clone, no open view), and commits. The live tree is committed first
    /// so that the walks see it exactly.
    pub(crate) fn delete_versions(
        &self,
        st: &mut Exclusive<'_>,
        ids: &[u64],
        holds: Holds<'_>,
    ) -> Result<DeleteReport> {
        if st.has_pending() {
            self.commit(st, None)?;
        }
        let mut report = DeleteReport {
            deleted: ids.len() as u64,
            ..DeleteReport::default()
        };
        let mut ids = ids;
        // A pass reclaims at most one version beside the live tree (its
        // promotions change the live tree); more take another pass.
        for _ in 0..64 {
            let deferred = self.transact(st, |st| {
                let deferred = self.plan_deletion(st, ids, &mut report, true, holds)?;
                Ok((deferred, None))
            })?;
            if !deferred {
                break;
            }
            ids = &[];
        }
        report.hidden = (st.snapshots.len() - st.snapshots.visible_len()) as u64;
        Ok(report)
    }

    /// One schedule tick in one commit: the deletions retention asks for
    /// (counting the snapshot about to be taken) are planned against the
    /// committed snapshot trees, then the snapshot is taken with them.
    /// A deletion that would need the live tree as a neighbour while it has
    /// uncommitted changes stays hidden until the next deletion pass.
    pub(super) fn schedule_tick(
        &self,
        mut st: Exclusive<'_>,
    ) -> Result<(SnapshotInfo, DeleteReport)> {
        self.usable(&st)?;
        if !st.pending_log.is_empty() || !st.pending_free.is_empty() {
            self.commit(&mut st, None)?;
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
        let (report, taken) = self.transact_pipelined(st, Durability::OnReturn, |st| {
            self.plan_deletion(st, &expired, &mut report, live_ok, Holds::of_disk(self))?;
            // Adding the (visible) new snapshot does not change this.
            report.hidden = (st.snapshots.len() - st.snapshots.visible_len()) as u64;
            let new = NewSnapshot {
                id,
                name,
                scheduled: true,
                received: 0,
            };
            Ok((report, Some(new)))
        })?;
        let snap = taken.ok_or_else(|| {
            crate::error::Error::Inconsistent("a snapshot commit recorded no snapshot".into())
        })?;
        Ok((snap, report))
    }

    /// The in-memory half of [`Disk::delete_versions`]: records, blocks
    /// to free after the commit, promotions in the live tree.
    fn plan_deletion(
        &self,
        st: &mut DiskState,
        ids: &[u64],
        report: &mut DeleteReport,
        mut live_ok: bool,
        holds: Holds<'_>,
    ) -> Result<bool> {
        let now = now_ns();
        let mut deferred = false;
        if !st.reclaims() {
            for &id in ids {
                st.snapshots.remove(id);
                st.pending_log
                    .push(LogEntry::removal(LogEntryKind::Deleted, id, now));
            }
            return Ok(false);
        }
        let meta = self.pool.meta();
        for &id in ids {
            st.snapshots.hide(id);
        }
        if matches!(holds, Holds::Unknown) && !ids.is_empty() {
            // For the store's next pass, under the catalogue lock.
            self.reclaim_after_ns
                .store(0, std::sync::atomic::Ordering::Relaxed);
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
                || self.pool.clone_count(self.id, v) > 0
                || self.pins.lock().contains_key(&v)
                || holds.keeps(v)
            {
                continue;
            }
            let child = kids.first().copied();
            // The versions, read only when a walk needs them.
            let versions = |st: &DiskState| -> Result<[Version; 3]> {
                let child_v = match child {
                    Some(k) => st.version(&self.pool, k)?,
                    None if live_kid => st.live_version(),
                    None => Version::default(),
                };
                Ok([
                    st.version(&self.pool, v)?,
                    st.version(&self.pool, s.parent)?,
                    child_v,
                ])
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
                        let [vv, parent_v, child_v] = versions(st)?;
                        let mut walked = Vec::new();
                        exclusive_of(meta, &vv, &[&parent_v, &child_v], &mut |addr, _| {
                            walked.push(addr)
                        })?;
                        walked.sort_unstable();
                        walked.dedup();
                        assert_eq!(gone, walked, "the deltas disagree with the walk");
                        if s.parent != 0 || st.origin != Origin::None {
                            let mut want = Delta::default();
                            exclusive_of(meta, &child_v, &[&parent_v], &mut |a, _| {
                                want.born.push(a)
                            })?;
                            exclusive_of(meta, &parent_v, &[&child_v], &mut |a, _| {
                                want.dead.push(a)
                            })?;
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
                None => {
                    let [vv, parent_v, child_v] = versions(st)?;
                    exclusive_of(meta, &vv, &[&parent_v, &child_v], &mut |addr, _| {
                        freed.push(addr)
                    })?
                }
            }
            if live_kid {
                let [vv, parent_v, _] = versions(st)?;
                self.promote_live(st, &vv, &parent_v)?;
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

    /// The live tree's parent `gone` is deleted (its parent `keep` becomes
    /// the live tree's): what the live tree held with it alone becomes
    /// its own. Tree pointers are promoted (their nodes become dirty, so
    /// the next commit is a checkpoint); in journal mode, the journal
    /// records `gone` held beyond `keep` are unsealed, and the base tree's
    /// root is owned again when `gone` shared it and `keep` does not.
    fn promote_live(&self, st: &mut DiskState, gone: &Version, keep: &Version) -> Result<()> {
        let meta = self.pool.meta();
        let live = st.live_version();
        let shares = |a: &Version, b: &Version| !a.root.is_null() && a.root.addr() == b.root.addr();
        if st.tree.overlay().is_some() {
            let (records, chain) = if shares(keep, &live) {
                (keep.records, keep.journal.to_vec())
            } else {
                (0, Vec::new())
            };
            if let Some(o) = st.tree.overlay_mut() {
                o.unseal_to(records);
            }
            st.journal.sealed_chain = chain;
            if shares(gone, &live) && !shares(keep, &live) {
                st.tree.set_root_owned(true);
            }
        }
        let mut promos = Vec::new();
        promotions(meta, &live, gone, keep, &mut promos)?;
        for (level, vb) in promos {
            st.tree.promote(meta, level, vb)?;
        }
        Ok(())
    }

    /// Every block that deleting this disk frees: all it holds that its
    /// origin does not (clones of it are refused before this is asked),
    /// its snapshot log and its two headers.
    pub(crate) fn disk_blocks(&self, st: &DiskState) -> Result<Vec<u64>> {
        let meta = self.pool.meta();
        let mut out: HashSet<u64> = self.live_owned_blocks(st)?.into_iter().collect();
        out.extend(st.pending_free.iter().copied());
        for (addr, _) in crate::disk::log::read_chain(&self.pool, st.header.log_head, self.id)? {
            out.insert(addr);
        }
        out.extend(self.header_addrs);
        if !st.reclaims() {
            // Without lineage only the writable closures are known to be
            // exclusive; the rest is left to `gc`.
            for s in st.snapshots.all() {
                collect_owned(meta, s.root, ROOT_LEVEL, 0, &|_| false, &mut out)?;
            }
            return Ok(out.into_iter().collect());
        }
        let mut add = |addr: u64, _| {
            out.insert(addr);
        };
        let live_parent = st.version(&self.pool, st.header.live_parent)?;
        exclusive_of(meta, &st.live_version(), &[&live_parent], &mut add)?;
        for s in st.snapshots.all() {
            let parent = st.version(&self.pool, s.parent)?;
            let version = st.version(&self.pool, s.id)?;
            exclusive_of(meta, &version, &[&parent], &mut add)?;
        }
        Ok(out.into_iter().collect())
    }

    /// Every block that only this disk's live tree references: the blocks
    /// reachable from its root through writable pointers only, committed or
    /// dirty (not those already waiting in `pending_free`).
    pub(super) fn live_owned_blocks(&self, st: &DiskState) -> Result<Vec<u64>> {
        let meta = self.pool.meta();
        let mut owned = HashSet::new();
        // A root a journal snapshot shares is not the live tree's alone.
        if !st.tree.root().is_null() && st.tree.root().writable() {
            // Base entries the journal replaced are not the tree's any more
            // (those it owned were freed when they were replaced).
            let shadowed = |v: u64| st.tree.overlay().is_some_and(|o| o.contains(v));
            collect_owned(meta, st.tree.root(), ROOT_LEVEL, 0, &shadowed, &mut owned)?;
        }
        owned.extend(st.tree.dirty_owned_data());
        let pending: HashSet<u64> = st.pending_free.iter().copied().collect();
        Ok(owned.into_iter().filter(|b| !pending.contains(b)).collect())
    }
}

/// Adds to `out` the block `ptr` (the level-`level` node number `pfx`)
/// points at and everything below it reached through writable pointers,
/// save the data of virtual blocks `shadowed` says a journal replaced.
fn collect_owned(
    meta: &MetaIo,
    ptr: Ptr,
    level: u8,
    pfx: u64,
    shadowed: &dyn Fn(u64) -> bool,
    out: &mut HashSet<u64>,
) -> Result<()> {
    out.insert(ptr.addr());
    let node = meta.load_node(ptr, level)?;
    let fan = parallax_format::FAN_OUT as u64;
    for (i, e) in node.entries.iter().enumerate() {
        let child = pfx * fan + i as u64;
        if !e.writable() {
            continue;
        }
        if level == 0 {
            if !shadowed(child) {
                out.insert(e.addr());
            }
        } else {
            collect_owned(meta, *e, level - 1, child, shadowed, out)?;
        }
    }
    Ok(())
}
