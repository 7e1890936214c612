//! The versions of a disk and what each holds alone.
//!
//! Every snapshot records its *parent*: the version it derives from (the
//! disk's previous snapshot, the snapshot a rollback went back to, or 0 for
//! the disk's origin: nothing, or the snapshot it was cloned from). The live
//! tree's parent is the header's `live_parent`. Parents make the versions of
//! a store a forest; clones hang below the snapshot they were made from.
//!
//! **Invariant (connectivity).** For every block, the versions that
//! reference it form a connected subtree of that forest: a block is born in
//! one version (a copy-on-write writes it to a fresh address) and inherited
//! by the versions derived from it until one of them overwrites it.
//! Deleting a version with at most one child keeps this true, because the
//! child is linked to the deleted version's parent. Deleting a version with
//! two or more children would not (two sibling branches could then share a
//! block their new common parent lacks), so such a version is only *hidden*:
//! gone from listings, its tree kept, until enough of its children are gone.
//!
//! Consequence: a block of version V that neither V's parent nor any of V's
//! children reference at the same tree position is referenced by no other
//! version at all. [`exclusive_blocks`] finds those blocks by walking V
//! beside its neighbours and descending only where they differ, so the cost
//! of reclaiming a version grows with what changed between it and its
//! neighbours, not with the size of the disk or the number of snapshots.
//! (Sharing is always position-aligned: copy-on-write, snapshots and clones
//! keep every block at the tree position it was written to.)
//!
//! **Deltas.** Walking a version beside its neighbours reads their nodes,
//! and the nodes of a snapshot taken a while ago are no longer cached: under
//! a 10 ms schedule that is a thousand random reads per reclaimed snapshot.
//! So when a snapshot is taken (its nodes and its parent's still cached) the
//! engine records its [`Delta`]: the blocks it holds that its parent does not
//! (`born`) and the blocks its parent holds that it does not (`dead`).
//! Reclaiming V, with parent P and only child C, frees
//! `born(V) ∩ dead(C)` (= V ∖ P ∖ C), or `dead(C)` when V has no parent; C's
//! delta then becomes `born(C) ∪ (born(V) ∖ dead(C))`,
//! `dead(V) ∪ (dead(C) ∖ born(V))`. Deltas live in memory only (derived data,
//! no format change): after a reopen, or wherever one is missing, the walk
//! is used. Debug builds check every delta-based reclamation against the walk.

use crate::error::Result;
use crate::meta::MetaIo;
use crate::tree::span;
use parallax_format::{
    LogEntry, LogEntryKind, NodeBlock, Ptr, FAN_OUT, LOG_FLAG_HIDDEN, LOG_FLAG_SCHEDULED,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

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
    /// The head of the entry journal this snapshot holds on top of `root`
    /// (null: a tree snapshot; see `parallax_format::JournalBlock`).
    pub(crate) journal: Ptr,
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
            journal: e.journal,
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
            journal: self.journal,
        }
    }
}

/// The snapshots of one disk, by id (creation order) and by name, with
/// their parent links.
#[derive(Default, Clone)]
pub(crate) struct SnapSet {
    by_id: BTreeMap<u64, SnapshotInfo>,
    /// Visible snapshots only.
    by_name: HashMap<String, u64>,
    /// Parent id (0 = the disk's origin) ─▶ snapshot ids deriving from it.
    children: HashMap<u64, Vec<u64>>,
    hidden: BTreeSet<u64>,
    /// Known deltas to the current parent (see the module documentation).
    deltas: HashMap<u64, Delta>,
}

/// What a version holds that its parent does not (`born`) and what its
/// parent holds that it does not (`dead`); sorted block addresses. For a
/// version with no parent only `dead` (empty) is meaningful.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Delta {
    pub born: Vec<u64>,
    pub dead: Vec<u64>,
}

/// `a ∩ b`, `a ∖ b` and `a ∪ b` of sorted, deduplicated lists.
pub(crate) fn intersect(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out
}

pub(crate) fn minus(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len());
    let mut j = 0;
    for &x in a {
        while j < b.len() && b[j] < x {
            j += 1;
        }
        if j == b.len() || b[j] != x {
            out.push(x);
        }
    }
    out
}

pub(crate) fn union(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out: Vec<u64> = a.iter().chain(b).copied().collect();
    out.sort_unstable();
    out.dedup();
    out
}

impl Delta {
    /// The delta of C to P once V (C's parent, P's child) is gone.
    pub fn merged(v: &Delta, c: &Delta) -> Delta {
        Delta {
            born: union(&c.born, &minus(&v.born, &c.dead)),
            dead: union(&v.dead, &minus(&c.dead, &v.born)),
        }
    }
}

impl SnapSet {
    pub fn get(&self, id: u64) -> Option<&SnapshotInfo> {
        self.by_id.get(&id)
    }

    pub fn by_name(&self, name: &str) -> Option<&SnapshotInfo> {
        self.by_name.get(name).and_then(|id| self.by_id.get(id))
    }

    /// Visible snapshots, oldest first.
    pub fn visible(&self) -> impl Iterator<Item = &SnapshotInfo> {
        self.by_id.values().filter(|s| !s.hidden)
    }

    /// Every version kept, hidden ones included, oldest first.
    pub fn all(&self) -> impl Iterator<Item = &SnapshotInfo> {
        self.by_id.values()
    }

    /// Visible snapshots the schedule took, as (id, created_ns), oldest
    /// first: what retention chooses from.
    pub fn scheduled(&self) -> Vec<(u64, u64)> {
        self.visible()
            .filter(|s| s.scheduled)
            .map(|s| (s.id, s.created_ns))
            .collect()
    }

    pub fn visible_len(&self) -> usize {
        self.by_name.len()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Hidden snapshots, oldest first.
    pub fn hidden_ids(&self) -> Vec<u64> {
        self.hidden.iter().copied().collect()
    }

    pub fn delta(&self, id: u64) -> Option<&Delta> {
        self.deltas.get(&id)
    }

    /// Records (or, with `None`, forgets) the delta of `id` to its parent.
    pub fn set_delta(&mut self, id: u64, delta: Option<Delta>) {
        match delta {
            Some(d) if self.by_id.contains_key(&id) => {
                self.deltas.insert(id, d);
            }
            _ => {
                self.deltas.remove(&id);
            }
        }
    }

    /// Snapshots whose parent is `id` (0: the disk's origin).
    pub fn children(&self, id: u64) -> &[u64] {
        self.children.get(&id).map_or(&[], |v| v.as_slice())
    }

    pub fn insert(&mut self, s: SnapshotInfo) {
        if s.hidden {
            self.hidden.insert(s.id);
        } else {
            self.by_name.insert(s.name.clone(), s.id);
        }
        self.children.entry(s.parent).or_default().push(s.id);
        self.by_id.insert(s.id, s);
    }

    /// Takes a snapshot out of the listing; its tree stays.
    pub fn hide(&mut self, id: u64) {
        if let Some(s) = self.by_id.get_mut(&id) {
            if !s.hidden {
                s.hidden = true;
                self.by_name.remove(&s.name);
                self.hidden.insert(id);
            }
        }
    }

    /// Removes a snapshot; its children now derive from its parent.
    pub fn remove(&mut self, id: u64) -> Option<SnapshotInfo> {
        let s = self.by_id.remove(&id)?;
        self.deltas.remove(&id);
        if s.hidden {
            self.hidden.remove(&id);
        } else {
            self.by_name.remove(&s.name);
        }
        if let Some(siblings) = self.children.get_mut(&s.parent) {
            siblings.retain(|&c| c != id);
            if siblings.is_empty() {
                self.children.remove(&s.parent);
            }
        }
        for c in self.children.remove(&id).unwrap_or_default() {
            if let Some(child) = self.by_id.get_mut(&c) {
                child.parent = s.parent;
            }
            // Its delta was to `id`; the caller sets the new one if known.
            self.deltas.remove(&c);
            self.children.entry(s.parent).or_default().push(c);
        }
        Some(s)
    }

    /// Replays one log record.
    pub fn apply(&mut self, e: &LogEntry) {
        match e.kind {
            LogEntryKind::Taken => self.insert(SnapshotInfo::from_record(e)),
            LogEntryKind::Hidden => self.hide(e.snapshot_id),
            LogEntryKind::Deleted => {
                self.remove(e.snapshot_id);
            }
        }
    }

    /// Taken records that rebuild this set (log compaction), oldest first.
    /// A parent always precedes its children, since ids grow with time and
    /// a snapshot derives from an older version.
    pub fn records(&self) -> Vec<LogEntry> {
        self.by_id
            .values()
            .map(|s| {
                let mut r = s.record();
                if s.hidden {
                    r.flags |= LOG_FLAG_HIDDEN;
                }
                r
            })
            .collect()
    }
}

fn same(a: Ptr, b: Ptr) -> bool {
    !a.is_null() && !b.is_null() && a.addr() == b.addr()
}

fn load_all(meta: &MetaIo, level: u8, ptrs: &[Ptr]) -> Result<Vec<Arc<NodeBlock>>> {
    ptrs.iter()
        .filter(|p| !p.is_null())
        .map(|p| meta.load_node(*p, level))
        .collect()
}

/// Calls `f(addr, is_data)` for every block of the tree under `v` (a
/// pointer to a node of level `level`) that none of `others` (pointers at
/// the same tree position) references at the same position. Descends only
/// where `v` differs from all of them.
pub(crate) fn exclusive_blocks(
    meta: &MetaIo,
    level: u8,
    v: Ptr,
    others: &[Ptr],
    f: &mut dyn FnMut(u64, bool),
) -> Result<()> {
    if v.is_null() || others.iter().any(|o| same(*o, v)) {
        return Ok(());
    }
    f(v.addr(), false);
    let node = meta.load_node(v, level)?;
    let other_nodes = load_all(meta, level, others)?;
    if level == 0 {
        for (i, e) in node.entries.iter().enumerate() {
            if !e.is_null() && !other_nodes.iter().any(|n| same(n.entries[i], *e)) {
                f(e.addr(), true);
            }
        }
        return Ok(());
    }
    let mut below = Vec::with_capacity(other_nodes.len());
    for (i, e) in node.entries.iter().enumerate() {
        if e.is_null() {
            continue;
        }
        below.clear();
        below.extend(other_nodes.iter().map(|n| n.entries[i]));
        exclusive_blocks(meta, level - 1, *e, &below, f)?;
    }
    Ok(())
}

/// The blocks of the tree under `a` that the tree under `b` does not hold
/// at the same position (`only_a`), and those of `b` that `a` does not
/// (`only_b`): what `exclusive_blocks(a, [b])` and `exclusive_blocks(b,
/// [a])` give, in one walk of both trees that descends only where they
/// differ, loading each node once.
pub(crate) fn diff_blocks(
    meta: &MetaIo,
    level: u8,
    a: Ptr,
    b: Ptr,
    only_a: &mut dyn FnMut(u64),
    only_b: &mut dyn FnMut(u64),
) -> Result<()> {
    if same(a, b) {
        return Ok(());
    }
    if a.is_null() || b.is_null() {
        exclusive_blocks(meta, level, a, &[], &mut |x, _| only_a(x))?;
        return exclusive_blocks(meta, level, b, &[], &mut |x, _| only_b(x));
    }
    only_a(a.addr());
    only_b(b.addr());
    let (node_a, node_b) = (meta.load_node(a, level)?, meta.load_node(b, level)?);
    for (ea, eb) in node_a.entries.iter().zip(node_b.entries.iter()) {
        if level > 0 {
            diff_blocks(meta, level - 1, *ea, *eb, only_a, only_b)?;
        } else if !same(*ea, *eb) {
            if !ea.is_null() {
                only_a(ea.addr());
            }
            if !eb.is_null() {
                only_b(eb.addr());
            }
        }
    }
    Ok(())
}

/// Entries of the (clean, committed) live tree under `live` that point at
/// the same block as the deleted version `gone` and not as `keep` (the
/// deleted version's parent): once `gone` is deleted the live tree holds
/// them alone, so their writable bits may be set. Returned as (level of the
/// node holding the entry, a virtual block the entry covers), parents
/// before children, ready for [`crate::tree::Tree::promote`].
pub(crate) fn promotions(
    meta: &MetaIo,
    level: u8,
    pfx: u64,
    live: Ptr,
    gone: Ptr,
    keep: Ptr,
    out: &mut Vec<(u8, u64)>,
) -> Result<()> {
    if live.is_null() || gone.is_null() || same(live, keep) {
        return Ok(());
    }
    let live_node = meta.load_node(live, level)?;
    let gone_node = if same(live, gone) {
        live_node.clone()
    } else {
        meta.load_node(gone, level)?
    };
    let keep_node = if keep.is_null() {
        None
    } else {
        Some(meta.load_node(keep, level)?)
    };
    for i in 0..FAN_OUT {
        let (l, g) = (live_node.entries[i], gone_node.entries[i]);
        let k = keep_node.as_ref().map_or(Ptr::NULL, |n| n.entries[i]);
        if l.is_null() || g.is_null() || same(l, k) {
            continue;
        }
        let child_pfx = pfx * FAN_OUT as u64 + i as u64;
        if same(l, g) && !l.writable() {
            out.push((level, child_pfx * span(level)));
        }
        if level > 0 && (same(l, g) || l.writable()) {
            promotions(meta, level - 1, child_pfx, l, g, k, out)?;
        }
    }
    Ok(())
}
