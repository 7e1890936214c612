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

#[derive(Clone)]
struct DirtyNode {
    entries: Vec<Ptr>,
    /// Address of the owned node this one replaces, freed after commit.
    old: Option<u64>,
}

/// The result of writing a tree's dirty nodes; applied with [`Tree::apply`]
/// once the commit is durable; the caller tracks the blocks it allocated.
pub(crate) struct TreePlan {
    pub root: Ptr,
    /// Blocks the committed tree no longer references (old node locations).
    pub freed: Vec<u64>,
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

/// See the module documentation.
#[derive(Clone)]
pub(crate) struct Tree {
    root: Ptr,
    dirty: BTreeMap<(u8, u64), DirtyNode>,
}

impl Tree {
    /// A tree whose committed root is `root` (an owned pointer).
    pub fn open(root: Ptr) -> Self {
        Tree {
            root,
            dirty: BTreeMap::new(),
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
            },
        );
        Ok(t)
    }

    pub fn root(&self) -> Ptr {
        self.root
    }

    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    pub fn dirty_nodes(&self) -> usize {
        self.dirty.len()
    }

    /// The level-0 entry for virtual block `v`, and whether the whole path
    /// to it is writable (so the data block may be overwritten in place).
    pub fn lookup(&self, meta: &MetaIo, v: u64) -> Result<(Ptr, bool)> {
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
            while v < leaf_end {
                let (entry, writable) = leaf.entry(index(v, 0));
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
        Ok(self.dirty_path(meta, v, 0)?.entries[index(v, 0)])
    }

    /// [`Tree::entry_for_write`] and [`Tree::set_entry`] in one walk: sets
    /// the level-0 entry for `v` to `p` and returns the entry it replaced,
    /// with ownership made exact.
    pub fn replace_entry(&mut self, meta: &MetaIo, v: u64, p: Ptr) -> Result<Ptr> {
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
            }
        } else {
            let n = meta.load_node(src, level)?;
            if src.writable() {
                DirtyNode {
                    entries: n.entries.clone(),
                    old: Some(src.addr()),
                }
            } else {
                DirtyNode {
                    entries: n.entries.iter().map(|p| p.shared()).collect(),
                    old: None,
                }
            }
        };
        Ok(vacant.insert(node))
    }

    /// Sets the level-0 entry for `v`; the path must have been made dirty
    /// with [`Tree::entry_for_write`].
    pub fn set_entry(&mut self, v: u64, p: Ptr) -> Result<()> {
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
            let ptr = if level < ROOT_LEVEL && entries.iter().all(|p| p.is_null()) {
                // An empty subtree is dropped rather than written.
                Ptr::NULL
            } else {
                let addr = allocate()?;
                allocated.push(addr);
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
        Ok(TreePlan { root, freed })
    }

    /// Data blocks that dirty level-0 nodes point at with the writable bit:
    /// blocks this tree owns that the committed tree may not know about.
    /// (Entries reached through clean nodes are not exact about ownership:
    /// a clean node below a shared pointer keeps its old writable bits.)
    pub fn dirty_owned_data(&self) -> Vec<u64> {
        self.dirty
            .iter()
            .filter(|((level, _), _)| *level == 0)
            .flat_map(|(_, d)| d.entries.iter().filter(|p| p.writable()).map(|p| p.addr()))
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
        self.visit(meta, ROOT_LEVEL, 0, self.root, start, end, f)
    }

    /// How many virtual blocks are mapped: [`Tree::for_each_mapped`]
    /// over the whole tree, without a call per entry (what `info` and a
    /// clone's answer report).
    pub fn count_mapped(&self, meta: &MetaIo) -> Result<u64> {
        self.count_below(meta, ROOT_LEVEL, 0, self.root)
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
