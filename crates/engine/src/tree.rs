//! Copy-on-write radix trees with writable bits.
//!
//! A [`Tree`] is the mutable view of one VDI's live tree: the committed root
//! pointer plus an in-memory overlay of *dirty* nodes (nodes changed since
//! the last commit), keyed by position `(level, prefix)` where `prefix` is
//! the virtual block number divided by `504^(level+1)`.
//!
//! Invariants:
//! - If a node is dirty, so is its parent (so the root is dirty whenever
//!   anything is). A dirty node takes precedence over its parent's entry.
//! - A dirty node copied from a *shared* node (pointer without the writable
//!   bit) has the writable bit cleared on all its entries: its children are
//!   now reachable from two trees. A dirty node copied from an *owned* node
//!   keeps its entries and records the old address, freed after the commit.
//! - A data block may be written in place only if every pointer from the
//!   root down to it is writable ([`Tree::lookup`] says so); otherwise the
//!   write allocates a new block and dirties the path.
//! - Committing writes dirty nodes bottom-up to newly allocated blocks, so
//!   a committed node is never overwritten: a crash before the VDI header
//!   is written leaves the previous tree intact.
//!
//! **Journal overlay.** A tree in journal mode ([`Tree::with_journal`])
//! also keeps an [`Overlay`]: the level-0 entries changed since the last
//! checkpoint, newer than every node (dirty or not). Writes change only the
//! overlay (no node is copied); a journal commit appends its new entries to
//! the disk's entry journal; a checkpoint folds the overlay into dirty
//! nodes ([`Tree::fold_overlay`]) and commits them as above. Ownership of an
//! overlay entry: writable if its block is writable (a fresh block) and no
//! snapshot holds it, which is when its sequence number is at least
//! `sealed` (a snapshot holds every entry made before it). Through a
//! non-writable root (a journal snapshot shares the base tree) every base
//! entry is shared.

use crate::error::{Error, Result};
use crate::meta::MetaIo;
use parallax_format::{Block, NodeBlock, Ptr, FAN_OUT, TREE_HEIGHT};
use std::collections::BTreeMap;
use std::sync::Arc;

const FAN: u64 = FAN_OUT as u64;
const ROOT_LEVEL: u8 = (TREE_HEIGHT - 1) as u8;

/// Virtual blocks addressable by one tree: 504^4.
pub const MAX_VIRTUAL_BLOCKS: u64 = FAN * FAN * FAN * FAN;

pub(crate) fn span(level: u8) -> u64 {
    FAN.pow(level as u32)
}

fn prefix(v: u64, level: u8) -> u64 {
    v / span(level + 1)
}

fn index(v: u64, level: u8) -> usize {
    ((v / span(level)) % FAN) as usize
}

/// The entries of a node below a null pointer.
static NULL_ENTRIES: [Ptr; FAN_OUT] = [Ptr::NULL; FAN_OUT];

/// Two trees' pointers at one position (see [`Tree::for_each_difference`]).
#[derive(Clone, Copy)]
struct Sides {
    mine: Ptr,
    theirs: Ptr,
}

/// Whether two entries name the same block (or are both null); the
/// writable bit does not count.
fn same_entry(a: Ptr, b: Ptr) -> bool {
    a.is_null() && b.is_null() || !a.is_null() && !b.is_null() && a.addr() == b.addr()
}

#[derive(Clone)]
struct DirtyNode {
    entries: Vec<Ptr>,
    /// Address of the owned node this one replaces, freed after commit.
    old: Option<u64>,
    /// Address of the node it was copied from, owned or shared.
    src: Option<u64>,
}

/// The result of writing a tree's dirty nodes; applied with [`Tree::apply`]
/// once the commit is durable; the caller tracks the blocks it allocated.
pub(crate) struct TreePlan {
    pub root: Ptr,
    /// Blocks the committed tree no longer references (old node locations).
    pub freed: Vec<u64>,
    /// Nodes written, and the nodes the committed tree held at their
    /// positions before (owned or shared), each sorted: what the commit's
    /// tree adds to and drops from the one it was copied from.
    pub written: Vec<u64>,
    pub replaced: Vec<u64>,
}

/// Loads the node a pointer points at, at a level; `Ok(None)` to give up.
type NodeLoader<'a> = dyn Fn(Ptr, u8) -> Result<Option<Arc<NodeBlock>>> + 'a;

/// The entries of one node found by a lookup.
enum LeafEntries<'a> {
    /// Below a null pointer: every entry is null.
    Empty,
    Dirty(&'a [Ptr]),
    Clean(Arc<NodeBlock>),
}

impl LeafEntries<'_> {
    fn get(&self, i: usize) -> Ptr {
        match self {
            LeafEntries::Empty => Ptr::NULL,
            LeafEntries::Dirty(e) => e[i],
            LeafEntries::Clean(n) => n.entries[i],
        }
    }
}

/// A level-0 node and whether every pointer above it is writable.
struct Leaf<'a> {
    entries: LeafEntries<'a>,
    writable: bool,
}

impl Leaf<'_> {
    fn entry(&self, i: usize) -> (Ptr, bool) {
        let e = self.entries.get(i);
        (e, self.writable && e.writable())
    }
}

/// Sequence numbers of overlay entries: record indexes in the journal
/// chain for committed entries (renumbered so when their commit is
/// adopted: [`Overlay::committed`]), and upwards from the chain's length
/// for entries made since. A snapshot holding the first n records of the
/// chain holds the entries below n.
pub(crate) type Seq = u64;

/// The level-0 entries a tree in journal mode changed since its last
/// checkpoint (see the module documentation). The map is shared between
/// clones (a savepoint costs nothing) and copied on the first change after.
#[derive(Clone, Default)]
pub(crate) struct Overlay {
    /// Virtual block ─▶ (entry as written, its sequence number).
    map: Arc<BTreeMap<u64, (Ptr, Seq)>>,
    /// The next sequence number.
    next: Seq,
    /// Entries from here on are not in the journal yet.
    committed: Seq,
    /// The blocks set since the last journal commit (repeats included).
    pending: Vec<u64>,
    /// Entries below this are shared with a snapshot.
    sealed: Seq,
    /// For every block changed since the last snapshot, its entry then
    /// (what the new snapshot's parent holds there): the next snapshot's
    /// delta, without a walk. `None` when not known (after a reopen, a
    /// checkpoint or a promotion).
    since: Option<BTreeMap<u64, Ptr>>,
}

impl Overlay {
    /// An overlay of committed journal records, oldest first (a later one
    /// for the same block wins), the first `sealed` shared with a snapshot.
    pub fn from_records(records: impl IntoIterator<Item = (u64, Ptr)>, sealed: Seq) -> Self {
        let mut map = BTreeMap::new();
        let mut next = 0;
        for (v, p) in records {
            map.insert(v, (p, next));
            next += 1;
        }
        Overlay {
            map: Arc::new(map),
            next,
            committed: next,
            pending: Vec::new(),
            sealed: sealed.min(next),
            since: None,
        }
    }

    /// Whether the overlay has an entry for `v` (replacing the nodes').
    pub fn contains(&self, v: u64) -> bool {
        self.map.contains_key(&v)
    }

    /// The entry for `v`, with its writable bit made exact.
    fn get(&self, v: u64) -> Option<Ptr> {
        self.map.get(&v).map(|&(p, seq)| self.exact(p, seq))
    }

    fn exact(&self, p: Ptr, seq: Seq) -> Ptr {
        if seq >= self.sealed {
            p
        } else {
            p.shared()
        }
    }

    /// Sets `v` to `p`; `old` is its entry until now.
    fn set(&mut self, v: u64, p: Ptr, old: Ptr) {
        if let Some(since) = &mut self.since {
            since.entry(v).or_insert(old);
        }
        Arc::make_mut(&mut self.map).insert(v, (p, self.next));
        self.pending.push(v);
        self.next += 1;
    }

    /// Entries made since the last journal commit, oldest first: the
    /// records the next one appends.
    pub fn uncommitted(&self) -> Vec<(u64, Ptr)> {
        let mut out: Vec<(Seq, u64, Ptr)> = self
            .pending
            .iter()
            .filter_map(|v| self.map.get(v).map(|&(p, seq)| (seq, *v, p)))
            .filter(|&(seq, _, _)| seq >= self.committed)
            .collect();
        // A block set twice appears twice with its one newest entry.
        out.sort_unstable_by_key(|e| e.0);
        out.dedup_by_key(|e| e.0);
        out.into_iter().map(|(_, v, p)| (v, p)).collect()
    }

    /// Whether entries were made since the last journal commit.
    pub fn has_uncommitted(&self) -> bool {
        self.next > self.committed
    }

    /// Blocks with an entry (committed or not): at most the records the
    /// chain holds plus those the next commit appends.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Every entry as written, in block order: what a version built from
    /// this overlay lays over its base.
    pub fn entries(&self) -> impl Iterator<Item = (u64, Ptr)> + '_ {
        self.map.iter().map(|(&v, &(p, _))| (v, p))
    }

    /// The entries of `[start, end)`, with exact writable bits.
    fn range(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, Ptr)> + '_ {
        self.map
            .range(start..end)
            .map(|(&v, &(p, seq))| (v, self.exact(p, seq)))
    }

    /// A journal commit is adopted: it appended `records` (the blocks of
    /// [`Overlay::uncommitted`], in that order) to a chain of `base`
    /// records, and, with `snapshot`, a snapshot now holds the whole chain
    /// (what changes from here on is its child's delta). Nothing was set
    /// since [`Overlay::uncommitted`] was called.
    pub fn committed(&mut self, records: &[u64], base: Seq, snapshot: bool) {
        if !records.is_empty() {
            let map = Arc::make_mut(&mut self.map);
            for (k, v) in records.iter().enumerate() {
                if let Some(e) = map.get_mut(v) {
                    e.1 = base + k as Seq;
                }
            }
        }
        self.next = base + records.len() as Seq;
        self.committed = self.next;
        self.pending.clear();
        if snapshot {
            self.sealed = self.next;
            self.since = Some(BTreeMap::new());
        }
    }

    /// A snapshot that held entries was deleted: only those below `sealed`
    /// stay shared (and the next snapshot's parent is another one).
    pub fn unseal_to(&mut self, sealed: Seq) {
        self.sealed = sealed.min(self.sealed);
        self.since = None;
    }

    /// The next snapshot's delta is not known any more (see
    /// [`Overlay::since`]).
    pub fn forget_since(&mut self) {
        self.since = None;
    }

    /// Data blocks of entries this tree owns (writable and not sealed).
    fn owned_data(&self) -> impl Iterator<Item = u64> + '_ {
        self.map
            .values()
            .filter(|&&(p, seq)| p.writable() && seq >= self.sealed)
            .map(|(p, _)| p.addr())
    }
}

impl Tree {
    /// The born and dead data blocks of a snapshot taken now, against the
    /// last one (see [`Overlay::since`]), if known: (born, dead), sorted.
    pub fn delta_since_snapshot(&self, meta: &MetaIo) -> Result<Option<(Vec<u64>, Vec<u64>)>> {
        let Some(since) = self.overlay.as_ref().and_then(|o| o.since.as_ref()) else {
            return Ok(None);
        };
        let (mut born, mut dead) = (Vec::new(), Vec::new());
        for (&v, &old) in since {
            let (new, _) = self.lookup(meta, v)?;
            if !new.is_null() && !old.is_null() && new.addr() == old.addr() {
                continue;
            }
            if !new.is_null() {
                born.push(new.addr());
            }
            if !old.is_null() {
                dead.push(old.addr());
            }
        }
        born.sort_unstable();
        dead.sort_unstable();
        Ok(Some((born, dead)))
    }
}

/// See the module documentation.
#[derive(Clone)]
pub(crate) struct Tree {
    root: Ptr,
    dirty: BTreeMap<(u8, u64), DirtyNode>,
    /// Journal mode: the entries changed since the last checkpoint.
    overlay: Option<Overlay>,
}

impl Tree {
    /// A tree whose committed root is `root` (an owned pointer).
    pub fn open(root: Ptr) -> Self {
        Tree {
            root,
            dirty: BTreeMap::new(),
            overlay: None,
        }
    }

    /// This tree in journal mode, with `overlay` over its nodes (see the
    /// module documentation).
    pub fn with_journal(mut self, overlay: Overlay) -> Self {
        self.overlay = Some(overlay);
        self
    }

    pub fn overlay(&self) -> Option<&Overlay> {
        self.overlay.as_ref()
    }

    pub fn overlay_mut(&mut self) -> Option<&mut Overlay> {
        self.overlay.as_mut()
    }

    /// A checkpoint: moves every overlay entry into dirty nodes (copying
    /// paths as a write does), leaving an empty overlay that starts a new
    /// journal. The tree's content does not change.
    pub fn fold_overlay(&mut self, meta: &MetaIo) -> Result<()> {
        let Some(overlay) = self.overlay.take() else {
            return Ok(());
        };
        let folded = (|| {
            for (&v, &(p, seq)) in overlay.map.iter() {
                let exact = overlay.exact(p, seq);
                self.dirty_path(meta, v, 0)?.entries[index(v, 0)] = exact;
            }
            Ok(())
        })();
        // On error the entries stay in the overlay (those already folded
        // are in both, with the same content).
        self.overlay = Some(if folded.is_ok() {
            // The next snapshot's delta is still known: the checkpoint
            // reports the nodes it writes and drops (`TreePlan`).
            Overlay {
                since: overlay.since.clone(),
                ..Overlay::default()
            }
        } else {
            Overlay {
                since: None,
                ..overlay
            }
        });
        folded
    }

    /// Sets the root pointer's writable bit: whether this tree owns its
    /// base tree's root alone (a journal snapshot shares it otherwise).
    pub fn set_root_owned(&mut self, owned: bool) {
        if !self.root.is_null() {
            self.root = if owned {
                self.root.owned()
            } else {
                self.root.shared()
            };
        }
    }

    /// A tree with an empty dirty root and nothing committed.
    pub fn empty() -> Self {
        let mut t = Tree::open(Ptr::NULL);
        t.dirty.insert(
            (ROOT_LEVEL, 0),
            DirtyNode {
                entries: vec![Ptr::NULL; FAN_OUT],
                old: None,
                src: None,
            },
        );
        t
    }

    /// A new tree sharing everything with the tree rooted at `root`: its
    /// root is a dirty copy with every writable bit cleared. O(1).
    pub fn shared_copy(meta: &MetaIo, root: Ptr) -> Result<Self> {
        let node = meta.load_node(root, ROOT_LEVEL)?;
        let mut t = Tree::open(Ptr::NULL);
        t.dirty.insert(
            (ROOT_LEVEL, 0),
            DirtyNode {
                entries: node.entries.iter().map(|p| p.shared()).collect(),
                old: None,
                src: Some(root.addr()),
            },
        );
        Ok(t)
    }

    /// A new tree holding what version (`root`, `records`) holds, sharing
    /// all of it: [`Tree::shared_copy`] with the records (a journal
    /// snapshot's, oldest first) set as shared entries in dirty nodes.
    /// What a clone or a rollback starts from.
    pub fn from_version(
        meta: &MetaIo,
        root: Ptr,
        records: impl IntoIterator<Item = (u64, Ptr)>,
    ) -> Result<Self> {
        let mut t = Tree::shared_copy(meta, root)?;
        for (v, p) in records {
            t.dirty_path(meta, v, 0)?.entries[index(v, 0)] = p.shared();
        }
        Ok(t)
    }

    pub fn root(&self) -> Ptr {
        self.root
    }

    /// Whether the next commit has tree changes to write: dirty nodes, or
    /// overlay entries not yet in the journal.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty() || self.overlay.as_ref().is_some_and(Overlay::has_uncommitted)
    }

    /// Whether nodes must be written (the next commit is a checkpoint).
    pub fn has_dirty_nodes(&self) -> bool {
        !self.dirty.is_empty()
    }

    pub fn dirty_nodes(&self) -> usize {
        self.dirty.len()
    }

    /// The level-0 entry for virtual block `v`, and whether the whole path
    /// to it is writable (so the data block may be overwritten in place).
    pub fn lookup(&self, meta: &MetaIo, v: u64) -> Result<(Ptr, bool)> {
        if let Some(p) = self.overlay.as_ref().and_then(|o| o.get(v)) {
            return Ok((p, p.writable()));
        }
        let load = |p: Ptr, level: u8| meta.load_node(p, level).map(Some);
        match self.leaf(v, &load)? {
            Some(leaf) => Ok(leaf.entry(index(v, 0))),
            None => Err(Error::Inconsistent("internal: node loader gave up".into())),
        }
    }

    /// Calls `f(v, entry, writable)` for every virtual block of
    /// `[start, end)` in order, as [`Tree::lookup`] would answer, but
    /// walking from the root once per leaf node rather than once per block.
    pub fn for_each_entry(
        &self,
        meta: &MetaIo,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(u64, Ptr, bool) -> Result<()>,
    ) -> Result<()> {
        let load = |p: Ptr, level: u8| meta.load_node(p, level).map(Some);
        self.entries_with(start, end, &load, f).map(|_| ())
    }

    /// [`Tree::for_each_entry`] using only nodes in memory: returns
    /// `Ok(false)`, having called `f` for a prefix of the range only, when
    /// a node would have to be read from the device.
    pub fn for_each_cached_entry(
        &self,
        meta: &MetaIo,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(u64, Ptr, bool) -> Result<()>,
    ) -> Result<bool> {
        let load = |p: Ptr, level: u8| {
            meta.check_ptr(p, "a tree pointer")?;
            Ok(meta.cached_node(p, level))
        };
        self.entries_with(start, end, &load, f)
    }

    fn entries_with(
        &self,
        start: u64,
        end: u64,
        load: &NodeLoader<'_>,
        f: &mut dyn FnMut(u64, Ptr, bool) -> Result<()>,
    ) -> Result<bool> {
        let mut v = start;
        while v < end {
            let Some(leaf) = self.leaf(v, load)? else {
                return Ok(false);
            };
            let leaf_end = ((prefix(v, 0) + 1) * FAN).min(end);
            let mut over = self
                .overlay
                .as_ref()
                .map(|o| o.range(v, leaf_end).peekable());
            while v < leaf_end {
                let (entry, writable) = match over.as_mut().and_then(|o| o.next_if(|e| e.0 == v)) {
                    Some((_, p)) => (p, p.writable()),
                    None => leaf.entry(index(v, 0)),
                };
                f(v, entry, writable)?;
                v += 1;
            }
        }
        Ok(true)
    }

    /// The level-0 node covering `v`, and whether the path down to it is
    /// writable; `None` when `load` declines to load a node.
    fn leaf(&self, v: u64, load: &NodeLoader<'_>) -> Result<Option<Leaf<'_>>> {
        let mut ptr = self.root;
        let mut writable = true;
        let mut level = ROOT_LEVEL;
        loop {
            let entries = if let Some(d) = self.dirty.get(&(level, prefix(v, level))) {
                LeafEntries::Dirty(&d.entries)
            } else if ptr.is_null() {
                return Ok(Some(Leaf {
                    entries: LeafEntries::Empty,
                    writable: false,
                }));
            } else {
                writable &= ptr.writable();
                match load(ptr, level)? {
                    Some(node) => LeafEntries::Clean(node),
                    None => return Ok(None),
                }
            };
            if level == 0 {
                return Ok(Some(Leaf { entries, writable }));
            }
            ptr = entries.get(index(v, level));
            level -= 1;
        }
    }

    /// Makes the path to `v` dirty and returns the level-0 entry for `v`
    /// with ownership made exact (writable only if this tree owns it).
    pub fn entry_for_write(&mut self, meta: &MetaIo, v: u64) -> Result<Ptr> {
        if self.overlay.is_some() {
            return self.exact_entry(meta, v);
        }
        Ok(self.dirty_path(meta, v, 0)?.entries[index(v, 0)])
    }

    /// The entry for `v` with its writable bit made exact, without
    /// dirtying anything.
    fn exact_entry(&self, meta: &MetaIo, v: u64) -> Result<Ptr> {
        let (p, writable) = self.lookup(meta, v)?;
        Ok(if writable || p.is_null() {
            p
        } else {
            p.shared()
        })
    }

    /// [`Tree::entry_for_write`] and [`Tree::set_entry`] in one walk: sets
    /// the level-0 entry for `v` to `p` and returns the entry it replaced,
    /// with ownership made exact.
    pub fn replace_entry(&mut self, meta: &MetaIo, v: u64, p: Ptr) -> Result<Ptr> {
        if self.overlay.is_some() {
            let old = self.exact_entry(meta, v)?;
            if let Some(o) = self.overlay.as_mut() {
                o.set(v, p, old);
            }
            return Ok(old);
        }
        let leaf = self.dirty_path(meta, v, 0)?;
        Ok(std::mem::replace(&mut leaf.entries[index(v, 0)], p))
    }

    /// Sets the writable bit of the level-`level` entry covering virtual
    /// block `v`: this tree now holds its target alone, because the only
    /// other version that held it was deleted. The path above must already
    /// be writable (promote top-down); the nodes on it become dirty, and an
    /// owned node copied on the way is freed after the commit.
    pub fn promote(&mut self, meta: &MetaIo, level: u8, v: u64) -> Result<()> {
        let node = self.dirty_path(meta, v, level)?;
        let e = &mut node.entries[index(v, level)];
        *e = e.owned();
        Ok(())
    }

    /// Makes the nodes from the root down to the level-`down_to` node
    /// covering `v` dirty, and returns that node.
    fn dirty_path(&mut self, meta: &MetaIo, v: u64, down_to: u8) -> Result<&mut DirtyNode> {
        let mut level = ROOT_LEVEL;
        let mut src = self.root;
        while level > down_to {
            src = self.dirty_node(meta, level, v, src)?.entries[index(v, level)];
            level -= 1;
        }
        self.dirty_node(meta, down_to, v, src)
    }

    /// The dirty level-`level` node covering `v`, copied from `src` (its
    /// parent's entry) if it is not dirty yet (see the module
    /// documentation for how a copy treats its entries). One map lookup.
    fn dirty_node(&mut self, meta: &MetaIo, level: u8, v: u64, src: Ptr) -> Result<&mut DirtyNode> {
        use std::collections::btree_map::Entry;
        let vacant = match self.dirty.entry((level, prefix(v, level))) {
            Entry::Occupied(e) => return Ok(e.into_mut()),
            Entry::Vacant(e) => e,
        };
        let node = if src.is_null() {
            DirtyNode {
                entries: vec![Ptr::NULL; FAN_OUT],
                old: None,
                src: None,
            }
        } else {
            let n = meta.load_node(src, level)?;
            if src.writable() {
                DirtyNode {
                    entries: n.entries.clone(),
                    old: Some(src.addr()),
                    src: Some(src.addr()),
                }
            } else {
                DirtyNode {
                    entries: n.entries.iter().map(|p| p.shared()).collect(),
                    old: None,
                    src: Some(src.addr()),
                }
            }
        };
        Ok(vacant.insert(node))
    }

    /// Sets the level-0 entry for `v`; the path must have been made dirty
    /// with [`Tree::entry_for_write`] (in journal mode, nothing is).
    pub fn set_entry(&mut self, meta: &MetaIo, v: u64, p: Ptr) -> Result<()> {
        if self.overlay.is_some() {
            return self.replace_entry(meta, v, p).map(drop);
        }
        match self.dirty.get_mut(&(0, prefix(v, 0))) {
            Some(d) => {
                d.entries[index(v, 0)] = p;
                Ok(())
            }
            None => Err(Error::Inconsistent(format!(
                "internal: set_entry on clean path for block {v}"
            ))),
        }
    }

    /// Encodes every dirty node for a new block, children first, into `out`
    /// (the caller writes them, with the rest of its commit, through
    /// `MetaIo::write_many`) and caches them. Nothing in `self` changes; on error the blocks allocated so far are in the
    /// error path's hands via `allocated` (the caller frees them).
    pub fn write_dirty(
        &self,
        meta: &MetaIo,
        owner: u64,
        generation: u64,
        allocate: &mut dyn FnMut() -> Result<u64>,
        allocated: &mut Vec<u64>,
        out: &mut Vec<(u64, Box<Block>)>,
    ) -> Result<TreePlan> {
        let mut freed = Vec::new();
        let (mut new_nodes, mut replaced) = (Vec::new(), Vec::new());
        // Pointers to freshly written children, keyed by child position.
        let mut written: BTreeMap<(u8, u64), Ptr> = BTreeMap::new();
        let mut root = self.root;
        for (&(level, pfx), node) in &self.dirty {
            let mut entries = node.entries.clone();
            if level > 0 {
                for (i, e) in entries.iter_mut().enumerate() {
                    if let Some(p) = written.get(&(level - 1, pfx * FAN + i as u64)) {
                        *e = *p;
                    }
                }
            }
            if let Some(old) = node.old {
                freed.push(old);
            }
            replaced.extend(node.src);
            let ptr = if level < ROOT_LEVEL && entries.iter().all(|p| p.is_null()) {
                // An empty subtree is dropped rather than written.
                Ptr::NULL
            } else {
                let addr = allocate()?;
                allocated.push(addr);
                new_nodes.push(addr);
                let node = NodeBlock { level, entries };
                let (block, crc) = node.encode(meta.store_id, addr, owner, generation);
                out.push((addr, block));
                meta.stage_node(addr, Arc::new(node), crc);
                Ptr::meta(addr, crc, true)
            };
            if level == ROOT_LEVEL {
                root = ptr;
            } else {
                written.insert((level, pfx), ptr);
            }
        }
        new_nodes.sort_unstable();
        replaced.sort_unstable();
        Ok(TreePlan {
            root,
            freed,
            written: new_nodes,
            replaced,
        })
    }

    /// Data blocks that dirty level-0 nodes point at with the writable bit:
    /// blocks this tree owns that the committed tree may not know about.
    /// (Entries reached through clean nodes are not exact about ownership:
    /// a clean node below a shared pointer keeps its old writable bits.)
    /// Entries the overlay replaces are left out (see
    /// [`Tree::fold_overlay`]: a node entry the overlay shadows may name a
    /// block already freed).
    pub fn dirty_owned_data(&self) -> Vec<u64> {
        let shadowed = |v: u64| self.overlay.as_ref().is_some_and(|o| o.contains(v));
        self.dirty
            .iter()
            .filter(|((level, _), _)| *level == 0)
            .flat_map(|(&(_, pfx), d)| {
                d.entries
                    .iter()
                    .enumerate()
                    .filter(move |(i, p)| p.writable() && !shadowed(pfx * FAN + *i as u64))
                    .map(|(_, p)| p.addr())
            })
            .chain(self.overlay.iter().flat_map(Overlay::owned_data))
            .collect()
    }

    /// Adopts a durable commit: the dirty overlay is gone, `root` is the new root.
    pub fn apply(&mut self, root: Ptr) {
        self.dirty.clear();
        self.root = root;
    }

    /// Calls `f(v, entry)` for every mapped virtual block in `[start, end)`,
    /// in increasing order, skipping unmapped subtrees.
    pub fn for_each_mapped(
        &self,
        meta: &MetaIo,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(u64, Ptr) -> Result<()>,
    ) -> Result<()> {
        let Some(o) = self.overlay.as_ref().filter(|o| !o.map.is_empty()) else {
            return self.visit(meta, ROOT_LEVEL, 0, self.root, start, end, f);
        };
        // The overlay's entries merged in block order, replacing the nodes'.
        let mut over = o.range(start, end).peekable();
        self.visit(meta, ROOT_LEVEL, 0, self.root, start, end, &mut |v, e| {
            while let Some((ov, op)) = over.next_if(|x| x.0 < v) {
                if !op.is_null() {
                    f(ov, op)?;
                }
            }
            match over.next_if(|x| x.0 == v) {
                Some((_, op)) if op.is_null() => Ok(()),
                Some((_, op)) => f(v, op),
                None => f(v, e),
            }
        })?;
        for (ov, op) in over {
            if !op.is_null() {
                f(ov, op)?;
            }
        }
        Ok(())
    }

    /// Calls `f(v, mine, theirs)`, in increasing `v`, for every virtual
    /// block of `[start, end)` whose entry here and in `other` differ (by
    /// block address; null against a block counts). Subtrees both trees
    /// reach through the same committed node, unchanged in memory on
    /// either side, are skipped unread: between two versions of one
    /// lineage (snapshots, a snapshot and the live tree, a clone and its
    /// origin's snapshot) the cost follows what differs, not the disk.
    pub fn for_each_difference(
        &self,
        other: &Tree,
        meta: &MetaIo,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(u64, Ptr, Ptr) -> Result<()>,
    ) -> Result<()> {
        // Blocks either overlay sets are compared by lookup; the node walk
        // skips them.
        let mut overlaid = std::collections::BTreeSet::new();
        for t in [self, other] {
            if let Some(o) = &t.overlay {
                overlaid.extend(o.range(start, end).map(|(v, _)| v));
            }
        }
        let mut out = Vec::new();
        let at = Sides {
            mine: self.root,
            theirs: other.root,
        };
        self.diff_nodes(
            other,
            meta,
            ROOT_LEVEL,
            0,
            at,
            (start, end),
            &overlaid,
            &mut out,
        )?;
        for &v in &overlaid {
            let (mine, theirs) = (self.lookup(meta, v)?.0, other.lookup(meta, v)?.0);
            if !same_entry(mine, theirs) {
                out.push((v, mine, theirs));
            }
        }
        out.sort_unstable_by_key(|d| d.0);
        for (v, mine, theirs) in out {
            f(v, mine, theirs)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn diff_nodes(
        &self,
        other: &Tree,
        meta: &MetaIo,
        level: u8,
        pfx: u64,
        at: Sides,
        (start, end): (u64, u64),
        skip: &std::collections::BTreeSet<u64>,
        out: &mut Vec<(u64, Ptr, Ptr)>,
    ) -> Result<()> {
        let base = pfx * span(level + 1);
        if base >= end || base + span(level + 1) <= start {
            return Ok(());
        }
        let (dm, dt) = (
            self.dirty.get(&(level, pfx)),
            other.dirty.get(&(level, pfx)),
        );
        if dm.is_none() && dt.is_none() && same_entry(at.mine, at.theirs) {
            return Ok(());
        }
        let (loaded_m, loaded_t);
        let em: &[Ptr] = match dm {
            Some(d) => &d.entries,
            None if at.mine.is_null() => &NULL_ENTRIES,
            None => {
                loaded_m = meta.load_node(at.mine, level)?;
                &loaded_m.entries
            }
        };
        let et: &[Ptr] = match dt {
            Some(d) => &d.entries,
            None if at.theirs.is_null() => &NULL_ENTRIES,
            None => {
                loaded_t = meta.load_node(at.theirs, level)?;
                &loaded_t.entries
            }
        };
        for i in 0..FAN {
            let (mine, theirs) = (em[i as usize], et[i as usize]);
            if level == 0 {
                let v = base + i;
                if v >= start && v < end && !skip.contains(&v) && !same_entry(mine, theirs) {
                    out.push((v, mine, theirs));
                }
            } else {
                let below = Sides { mine, theirs };
                self.diff_nodes(
                    other,
                    meta,
                    level - 1,
                    pfx * FAN + i,
                    below,
                    (start, end),
                    skip,
                    out,
                )?;
            }
        }
        Ok(())
    }

    /// The level-0 entry for `v` in the nodes alone (the overlay ignored).
    fn node_entry(&self, meta: &MetaIo, v: u64) -> Result<Ptr> {
        let load = |p: Ptr, level: u8| meta.load_node(p, level).map(Some);
        match self.leaf(v, &load)? {
            Some(leaf) => Ok(leaf.entries.get(index(v, 0))),
            None => Err(Error::Inconsistent("internal: node loader gave up".into())),
        }
    }

    /// How many virtual blocks are mapped: [`Tree::for_each_mapped`]
    /// over the whole tree, without a call per entry (what `info` and a
    /// clone's answer report).
    pub fn count_mapped(&self, meta: &MetaIo) -> Result<u64> {
        let mut n = self.count_below(meta, ROOT_LEVEL, 0, self.root)?;
        if let Some(o) = &self.overlay {
            for (v, p) in o.entries() {
                let was = !self.node_entry(meta, v)?.is_null();
                n = n + u64::from(!p.is_null()) - u64::from(was);
            }
        }
        Ok(n)
    }

    fn count_below(&self, meta: &MetaIo, level: u8, pfx: u64, ptr: Ptr) -> Result<u64> {
        let loaded;
        let entries: &[Ptr] = if let Some(d) = self.dirty.get(&(level, pfx)) {
            &d.entries
        } else if ptr.is_null() {
            return Ok(0);
        } else {
            loaded = meta.load_node(ptr, level)?;
            &loaded.entries
        };
        if level == 0 {
            return Ok(entries.iter().filter(|e| !e.is_null()).count() as u64);
        }
        let mut n = 0;
        for (i, &e) in entries.iter().enumerate() {
            // A null child may still have a dirty node (a subtree made
            // since the last commit).
            if !e.is_null() || !self.dirty.is_empty() {
                n += self.count_below(meta, level - 1, pfx * FAN + i as u64, e)?;
            }
        }
        Ok(n)
    }

    #[allow(clippy::too_many_arguments)]
    fn visit(
        &self,
        meta: &MetaIo,
        level: u8,
        pfx: u64,
        ptr: Ptr,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(u64, Ptr) -> Result<()>,
    ) -> Result<()> {
        let loaded;
        let entries: &[Ptr] = if let Some(d) = self.dirty.get(&(level, pfx)) {
            &d.entries
        } else if ptr.is_null() {
            return Ok(());
        } else {
            loaded = meta.load_node(ptr, level)?;
            &loaded.entries
        };
        let base = pfx * span(level + 1);
        let child_span = span(level);
        let first = start.saturating_sub(base) / child_span;
        for i in first..FAN {
            let child_base = base + i * child_span;
            if child_base >= end {
                break;
            }
            let e = entries[i as usize];
            if level == 0 {
                if !e.is_null() && child_base >= start {
                    f(child_base, e)?;
                }
            } else {
                self.visit(meta, level - 1, pfx * FAN + i, e, start, end, f)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parallax_device::MemDevice;
    use proptest::prelude::*;

    /// Commits `tree`'s dirty nodes to the device (blocks from `next`).
    fn commit(meta: &MetaIo, tree: &mut Tree, next: &mut u64) {
        let (mut out, mut allocated) = (Vec::new(), Vec::new());
        let mut allocate = || {
            *next += 1;
            Ok(*next)
        };
        let plan = tree
            .write_dirty(meta, 1, 1, &mut allocate, &mut allocated, &mut out)
            .unwrap();
        meta.write_all(&mut out, "test nodes").unwrap();
        meta.unstage(&allocated);
        tree.apply(plan.root);
    }

    fn entries(meta: &MetaIo, t: &Tree, end: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        t.for_each_entry(meta, 0, end, &mut |v, e, w| {
            out.push((v, e.addr() * u64::from(!e.is_null()), w));
            Ok(())
        })
        .unwrap();
        out
    }

    fn mapped(meta: &MetaIo, t: &Tree, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        t.for_each_mapped(meta, start, end, &mut |v, e| {
            out.push((v, e.addr()));
            Ok(())
        })
        .unwrap();
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// A tree in journal mode answers every lookup, range and count
        /// as the same writes made to nodes do; folded and committed, it
        /// is the same tree; sealing makes its entries shared and a shared
        /// root makes the base's shared.
        #[test]
        fn the_overlay_reads_as_the_nodes_it_folds_into(
            base in proptest::collection::vec((0u64..3000, any::<bool>()), 0..60),
            writes in proptest::collection::vec((0u64..3000, 0u8..4), 0..80),
        ) {
            let meta = MetaIo::new(Arc::new(MemDevice::new(64 << 20)), 7, 16384, 64);
            let mut next = 5000;
            let mut fresh = || { next += 1; next };
            let mut nodes = Tree::empty();
            for &(v, keep) in &base {
                let p = Ptr::data(fresh(), keep);
                nodes.entry_for_write(&meta, v).unwrap();
                nodes.set_entry(&meta, v, p).unwrap();
            }
            let mut alloc_at = 100;
            commit(&meta, &mut nodes, &mut alloc_at);
            let mut journal = Tree::open(nodes.root()).with_journal(Overlay::default());
            for &(v, op) in &writes {
                let p = if op == 0 { Ptr::NULL } else { Ptr::data(fresh(), true) };
                let a = nodes.replace_entry(&meta, v, p).unwrap();
                let b = journal.replace_entry(&meta, v, p).unwrap();
                prop_assert_eq!(a, b, "replaced entry of block {}", v);
                if op == 3 {
                    prop_assert_eq!(nodes.lookup(&meta, v).unwrap(), journal.lookup(&meta, v).unwrap());
                }
            }
            let end = 3100;
            prop_assert_eq!(entries(&meta, &nodes, end), entries(&meta, &journal, end));
            prop_assert_eq!(mapped(&meta, &nodes, 0, end), mapped(&meta, &journal, 0, end));
            prop_assert_eq!(mapped(&meta, &nodes, 700, 1500), mapped(&meta, &journal, 700, 1500));
            prop_assert_eq!(nodes.count_mapped(&meta).unwrap(), journal.count_mapped(&meta).unwrap());
            let mut owned_a = nodes.dirty_owned_data();
            let mut owned_b: Vec<u64> = journal.overlay().unwrap().owned_data().collect();
            owned_a.sort_unstable();
            owned_b.sort_unstable();
            // Node mode also lists the untouched owned entries of dirty leaves.
            prop_assert!(owned_b.iter().all(|b| owned_a.binary_search(b).is_ok()));
            prop_assert_eq!(journal.is_dirty(), !writes.is_empty());

            // Sealed and shared: nothing reads writable any more.
            let mut sealed = journal.clone();
            let o = sealed.overlay_mut().unwrap();
            let records: Vec<u64> = o.uncommitted().into_iter().map(|(v, _)| v).collect();
            o.committed(&records, 0, true);
            sealed.set_root_owned(false);
            prop_assert!(entries(&meta, &sealed, end).iter().all(|e| !e.2));
            prop_assert!(!sealed.is_dirty());

            // Folded and committed: the same content, read from nodes.
            journal.fold_overlay(&meta).unwrap();
            prop_assert!(journal.overlay().unwrap().len() == 0);
            commit(&meta, &mut journal, &mut alloc_at);
            commit(&meta, &mut nodes, &mut alloc_at);
            prop_assert_eq!(entries(&meta, &nodes, end), entries(&meta, &journal, end));
            prop_assert_eq!(nodes.count_mapped(&meta).unwrap(), journal.count_mapped(&meta).unwrap());
        }
    }
}
