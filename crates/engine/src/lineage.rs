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
    TREE_HEIGHT,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

const ROOT_LEVEL: u8 = (TREE_HEIGHT - 1) as u8;

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
    /// The identity it was received as from another store, 0: none (see
    /// [`SnapshotInfo::identity`]).
    pub(crate) received: u64,
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
            received: e.received,
        }
    }

    /// The snapshot's identity across stores, what `send` names a
    /// snapshot by and `receive` looks for: the identity it was received
    /// as, else one derived from where and when it was taken (store id,
    /// disk id, snapshot id, creation time), never 0.
    pub fn identity(&self, store_id: u64, vdi_id: u64) -> u64 {
        if self.received != 0 {
            return self.received;
        }
        // splitmix64's finaliser over each field in turn.
        let mix = |mut z: u64| {
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let fields = [store_id, vdi_id, self.id, self.created_ns];
        fields
            .iter()
            .fold(0x9e37_79b9_7f4a_7c15, |h, &x| mix(h ^ x))
            .max(1)
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
            received: self.received,
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

/// One version of a disk as the walks below see it: a base tree and, for a
/// journal version (a journal snapshot, or a journaled live tree), the
/// level-0 entries its entry journal lays over it and the journal blocks
/// it holds. A tree version has neither. Like tree nodes, journal blocks
/// are held by a connected run of versions (the live tree's chain is
/// copied on append, and a snapshot keeps the chain of its time), so they
/// follow the same reclamation rule, compared as sets rather than by
/// position.
#[derive(Clone, Default, Debug)]
pub(crate) struct Version {
    pub root: Ptr,
    /// The entries laid over the base tree.
    pub overlay: Overlaid,
    /// The journal blocks this version holds, sorted.
    pub journal: Arc<Vec<u64>>,
    /// Records in its journal chain (0 for a tree version).
    pub records: u64,
}

impl Version {
    /// A tree version.
    pub fn tree(root: Ptr) -> Self {
        Version {
            root,
            ..Version::default()
        }
    }

    fn entry(&self, v: u64, node_entry: Ptr) -> Ptr {
        self.overlay.get(v).unwrap_or(node_entry)
    }

    fn overlays_in(&self, lo: u64, hi: u64) -> bool {
        self.overlay.any_in(lo, hi)
    }

    /// Whether both lay the same entries over `[lo, hi)`.
    fn same_overlay(&self, other: &Version, lo: u64, hi: u64) -> bool {
        self.overlay.same_in(&other.overlay, lo, hi)
    }
}

/// The records of one journal chain by virtual block: (record index,
/// entry) of each, oldest first. The versions of one base tree share the
/// index of the longest chain (the others are prefixes of it).
pub(crate) type ChainIndex = BTreeMap<u64, Vec<(u64, Ptr)>>;

/// The entries a journal lays over a version's base tree.
#[derive(Clone, Debug)]
pub(crate) enum Overlaid {
    /// Virtual block ─▶ entry (null: unmapped).
    Map(Arc<BTreeMap<u64, Ptr>>),
    /// The first `len` records of an indexed chain (a later record of a
    /// block replaces an earlier one).
    Prefix { index: Arc<ChainIndex>, len: u64 },
}

impl Default for Overlaid {
    fn default() -> Self {
        Overlaid::Map(Arc::default())
    }
}

/// The newest of `records` (oldest first) below index `len`.
fn newest_below(records: &[(u64, Ptr)], len: u64) -> Option<Ptr> {
    let k = records.partition_point(|r| r.0 < len);
    (k > 0).then(|| records[k - 1].1)
}

impl Overlaid {
    fn get(&self, v: u64) -> Option<Ptr> {
        match self {
            Overlaid::Map(m) => m.get(&v).copied(),
            Overlaid::Prefix { index, len } => index.get(&v).and_then(|r| newest_below(r, *len)),
        }
    }

    fn any_in(&self, lo: u64, hi: u64) -> bool {
        match self {
            Overlaid::Map(m) => m.range(lo..hi).next().is_some(),
            Overlaid::Prefix { index, len } => index.range(lo..hi).any(|(_, r)| r[0].0 < *len),
        }
    }

    /// The entries over `[lo, hi)`, in block order.
    fn entries_in(&self, lo: u64, hi: u64) -> Box<dyn Iterator<Item = (u64, Ptr)> + '_> {
        match self {
            Overlaid::Map(m) => Box::new(m.range(lo..hi).map(|(&v, &p)| (v, p))),
            Overlaid::Prefix { index, len } => Box::new(
                index
                    .range(lo..hi)
                    .filter_map(move |(&v, r)| newest_below(r, *len).map(|p| (v, p))),
            ),
        }
    }

    fn same_in(&self, other: &Overlaid, lo: u64, hi: u64) -> bool {
        match (self, other) {
            (Overlaid::Map(a), Overlaid::Map(b)) if Arc::ptr_eq(a, b) => true,
            (Overlaid::Prefix { index: a, len: la }, Overlaid::Prefix { index: b, len: lb })
                if Arc::ptr_eq(a, b) =>
            {
                la == lb
                    || a.range(lo..hi)
                        .all(|(_, r)| newest_below(r, *la) == newest_below(r, *lb))
            }
            _ => self.entries_in(lo, hi).eq(other.entries_in(lo, hi)),
        }
    }

    /// Whether it has an entry for `v`.
    pub fn contains(&self, v: u64) -> bool {
        self.get(v).is_some()
    }
}

/// A version at one tree position: the version and its node pointer there.
#[derive(Clone, Copy)]
struct At<'a> {
    ver: &'a Version,
    ptr: Ptr,
}

/// Virtual blocks covered by the level-`level` node number `pfx`.
fn covered(level: u8, pfx: u64) -> (u64, u64) {
    let n = span(level + 1);
    (pfx * n, (pfx + 1) * n)
}

fn load_opt(meta: &MetaIo, level: u8, p: Ptr) -> Result<Option<Arc<NodeBlock>>> {
    if p.is_null() {
        Ok(None)
    } else {
        meta.load_node(p, level).map(Some)
    }
}

fn child(node: &Option<Arc<NodeBlock>>, i: usize) -> Ptr {
    node.as_ref().map_or(Ptr::NULL, |n| n.entries[i])
}

/// Calls `f(addr, is_data)` for every block of version `v` that none of
/// `others` holds: tree blocks not at the same position in any of them,
/// and journal blocks none of them holds. Descends only where `v` differs
/// from all of them.
pub(crate) fn exclusive_of(
    meta: &MetaIo,
    v: &Version,
    others: &[&Version],
    f: &mut dyn FnMut(u64, bool),
) -> Result<()> {
    let at: Vec<At<'_>> = others
        .iter()
        .map(|o| At {
            ver: o,
            ptr: o.root,
        })
        .collect();
    let root = At {
        ver: v,
        ptr: v.root,
    };
    exclusive_at(meta, ROOT_LEVEL, 0, root, &at, f)?;
    for &b in v.journal.iter() {
        if !others.iter().any(|o| o.journal.binary_search(&b).is_ok()) {
            f(b, false);
        }
    }
    Ok(())
}

fn exclusive_at(
    meta: &MetaIo,
    level: u8,
    pfx: u64,
    v: At<'_>,
    others: &[At<'_>],
    f: &mut dyn FnMut(u64, bool),
) -> Result<()> {
    let (lo, hi) = covered(level, pfx);
    let v_over = v.ver.overlays_in(lo, hi);
    if v.ptr.is_null() && !v_over {
        return Ok(());
    }
    let identical = |o: &At<'_>| {
        (same(o.ptr, v.ptr) || (o.ptr.is_null() && v.ptr.is_null()))
            && (!v_over && !o.ver.overlays_in(lo, hi) || v.ver.same_overlay(o.ver, lo, hi))
    };
    if others.iter().any(identical) {
        return Ok(());
    }
    if !v.ptr.is_null() && !others.iter().any(|o| same(o.ptr, v.ptr)) {
        f(v.ptr.addr(), false);
    }
    let node = load_opt(meta, level, v.ptr)?;
    let other_nodes = others
        .iter()
        .map(|o| load_opt(meta, level, o.ptr))
        .collect::<Result<Vec<_>>>()?;
    if level == 0 {
        // Overlays are looked up only in the leaves they touch.
        let over: Vec<bool> = others.iter().map(|o| o.ver.overlays_in(lo, hi)).collect();
        for i in 0..FAN_OUT {
            let vb = lo + i as u64;
            let e = if v_over {
                v.ver.entry(vb, child(&node, i))
            } else {
                child(&node, i)
            };
            if e.is_null() {
                continue;
            }
            let held = others
                .iter()
                .zip(&other_nodes)
                .zip(&over)
                .any(|((o, on), &ov)| {
                    let oe = if ov {
                        o.ver.entry(vb, child(on, i))
                    } else {
                        child(on, i)
                    };
                    same(oe, e)
                });
            if !held {
                f(e.addr(), true);
            }
        }
        return Ok(());
    }
    let mut below = Vec::with_capacity(others.len());
    for i in 0..FAN_OUT {
        let c = pfx * FAN_OUT as u64 + i as u64;
        let e = child(&node, i);
        if e.is_null() && !v_over {
            continue;
        }
        below.clear();
        below.extend(others.iter().zip(&other_nodes).map(|(o, on)| At {
            ver: o.ver,
            ptr: child(on, i),
        }));
        exclusive_at(meta, level - 1, c, At { ver: v.ver, ptr: e }, &below, f)?;
    }
    Ok(())
}

/// The blocks of version `a` that version `b` does not hold (`only_a`),
/// and those of `b` that `a` does not (`only_b`): what
/// `exclusive_of(a, [b])` and `exclusive_of(b, [a])` give, in one walk of
/// both trees that descends only where they differ, loading each node once.
pub(crate) fn diff_versions(
    meta: &MetaIo,
    a: &Version,
    b: &Version,
    only_a: &mut dyn FnMut(u64),
    only_b: &mut dyn FnMut(u64),
) -> Result<()> {
    diff_at(
        meta,
        ROOT_LEVEL,
        0,
        At {
            ver: a,
            ptr: a.root,
        },
        At {
            ver: b,
            ptr: b.root,
        },
        only_a,
        only_b,
    )?;
    for x in minus(&a.journal, &b.journal) {
        only_a(x);
    }
    for x in minus(&b.journal, &a.journal) {
        only_b(x);
    }
    Ok(())
}

fn diff_at(
    meta: &MetaIo,
    level: u8,
    pfx: u64,
    a: At<'_>,
    b: At<'_>,
    only_a: &mut dyn FnMut(u64),
    only_b: &mut dyn FnMut(u64),
) -> Result<()> {
    let (lo, hi) = covered(level, pfx);
    let (a_over, b_over) = (a.ver.overlays_in(lo, hi), b.ver.overlays_in(lo, hi));
    let same_nodes = same(a.ptr, b.ptr) || (a.ptr.is_null() && b.ptr.is_null());
    if same_nodes && (!a_over && !b_over || a.ver.same_overlay(b.ver, lo, hi)) {
        return Ok(());
    }
    if a.ptr.is_null() && !a_over {
        return exclusive_at(meta, level, pfx, b, &[], &mut |x, _| only_b(x));
    }
    if b.ptr.is_null() && !b_over {
        return exclusive_at(meta, level, pfx, a, &[], &mut |x, _| only_a(x));
    }
    if !same_nodes {
        if !a.ptr.is_null() {
            only_a(a.ptr.addr());
        }
        if !b.ptr.is_null() {
            only_b(b.ptr.addr());
        }
    }
    let (node_a, node_b) = (load_opt(meta, level, a.ptr)?, load_opt(meta, level, b.ptr)?);
    for i in 0..FAN_OUT {
        let (ca, cb) = (child(&node_a, i), child(&node_b, i));
        if level == 0 {
            let vb = lo + i as u64;
            let ea = if a_over { a.ver.entry(vb, ca) } else { ca };
            let eb = if b_over { b.ver.entry(vb, cb) } else { cb };
            if !same(ea, eb) {
                if !ea.is_null() {
                    only_a(ea.addr());
                }
                if !eb.is_null() {
                    only_b(eb.addr());
                }
            }
        } else if !(ca.is_null() && cb.is_null()) || a_over || b_over {
            let c = pfx * FAN_OUT as u64 + i as u64;
            diff_at(
                meta,
                level - 1,
                c,
                At {
                    ver: a.ver,
                    ptr: ca,
                },
                At {
                    ver: b.ver,
                    ptr: cb,
                },
                only_a,
                only_b,
            )?;
        }
    }
    Ok(())
}

/// Entries of the (clean, committed) live version's *tree* that point at
/// the same block as the deleted version `gone` and not as `keep` (the
/// deleted version's parent): once `gone` is deleted the live tree holds
/// them alone, so their writable bits may be set. Entries the live
/// version's journal replaces are left out (its own records are unsealed
/// by the caller instead), and so is the root pointer itself (the caller's
/// too). Returned as (level of the node holding the entry, a virtual block
/// the entry covers), parents before children, ready for
/// [`crate::tree::Tree::promote`].
pub(crate) fn promotions(
    meta: &MetaIo,
    live: &Version,
    gone: &Version,
    keep: &Version,
    out: &mut Vec<(u8, u64)>,
) -> Result<()> {
    promotions_at(
        meta,
        ROOT_LEVEL,
        0,
        At {
            ver: live,
            ptr: live.root,
        },
        At {
            ver: gone,
            ptr: gone.root,
        },
        At {
            ver: keep,
            ptr: keep.root,
        },
        out,
    )
}

fn promotions_at(
    meta: &MetaIo,
    level: u8,
    pfx: u64,
    live: At<'_>,
    gone: At<'_>,
    keep: At<'_>,
    out: &mut Vec<(u8, u64)>,
) -> Result<()> {
    let (lo, hi) = covered(level, pfx);
    let overlays = gone.ver.overlays_in(lo, hi) || keep.ver.overlays_in(lo, hi);
    if live.ptr.is_null() || (gone.ptr.is_null() && !gone.ver.overlays_in(lo, hi)) {
        return Ok(());
    }
    if same(live.ptr, keep.ptr) && !overlays {
        return Ok(());
    }
    let live_node = meta.load_node(live.ptr, level)?;
    let gone_node = load_opt(meta, level, gone.ptr)?;
    let keep_node = load_opt(meta, level, keep.ptr)?;
    for i in 0..FAN_OUT {
        let l = live_node.entries[i];
        let (g, k) = (child(&gone_node, i), child(&keep_node, i));
        let child_pfx = pfx * FAN_OUT as u64 + i as u64;
        if level == 0 {
            let vb = lo + i as u64;
            if l.is_null() || live.ver.overlay.contains(vb) {
                continue;
            }
            let (g, k) = (gone.ver.entry(vb, g), keep.ver.entry(vb, k));
            if same(l, g) && !same(l, k) && !l.writable() {
                out.push((0, vb));
            }
            continue;
        }
        let (clo, chi) = covered(level - 1, child_pfx);
        let child_overlays = gone.ver.overlays_in(clo, chi) || keep.ver.overlays_in(clo, chi);
        if l.is_null() || (g.is_null() && !gone.ver.overlays_in(clo, chi)) {
            continue;
        }
        if same(l, k) && !child_overlays {
            continue;
        }
        if same(l, g) && !same(l, k) && !l.writable() {
            out.push((level, child_pfx * span(level)));
        }
        if same(l, g) || l.writable() || child_overlays {
            promotions_at(
                meta,
                level - 1,
                child_pfx,
                At {
                    ver: live.ver,
                    ptr: l,
                },
                At {
                    ver: gone.ver,
                    ptr: g,
                },
                At {
                    ver: keep.ver,
                    ptr: k,
                },
                out,
            )?;
        }
    }
    Ok(())
}
