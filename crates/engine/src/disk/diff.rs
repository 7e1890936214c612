//! What changed between two versions of one lineage: `parallax diff`,
//! incremental `send`, and the `qemu:dirty-bitmap` context of an NBD
//! export.
//!
//! Two versions compared are snapshots of one disk, a snapshot and the
//! live disk, or a clone's snapshot and a snapshot of its origin: versions
//! whose trees share every subtree that did not change between them. The
//! walk ([`crate::tree::Tree::for_each_difference`]) skips shared subtrees
//! unread, so its cost follows the change, not the disk.
//!
//! Invariant relied on: a data block two versions share is never written
//! in place (a pointer that reaches it from a snapshot is not writable,
//! so a write copies it first). Two versions that name the same block at a
//! virtual block hold the same bytes there, and comparing pointers finds
//! every changed block. The converse does not hold: a block rewritten with
//! the bytes it had is reported (it changed, to the same data).

use crate::disk::view::SnapshotView;
use crate::disk::Vdi;
use crate::error::{Error, Result};
use crate::pool::Pool;
use crate::tree::Tree;
use parallax_format::{Ptr, BLOCK_SIZE_U64};
use std::sync::Arc;

/// What a changed range holds in the newer version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Data blocks (read them from the newer version).
    Data,
    /// Nothing: the range reads as zeros (discarded, or zeroed with unmap).
    Zero,
}

/// A run of changed blocks of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub offset: u64,
    pub length: u64,
    pub kind: ChangeKind,
}

/// The newer side of a diff.
#[derive(Clone, Copy)]
pub enum DiffTarget<'a> {
    Snapshot(&'a SnapshotView),
    /// The live disk as it is now (its writes since the last flush too).
    Live(&'a Vdi),
}

/// The ranges of `to` that differ from `from` (`None`: from an empty disk,
/// so every mapped block of `to`), in increasing offset, runs of one kind
/// merged. Covers `to`'s size; a range `from` had beyond it is not
/// reported. Both must be versions of one store.
pub fn diff(from: Option<&SnapshotView>, to: DiffTarget<'_>) -> Result<Vec<Change>> {
    diff_in(from, to, 0, u64::MAX)
}

/// [`diff()`] of the blocks that meet `[offset, offset + len)` only (whole
/// blocks: the first and last change may reach outside the range).
pub fn diff_in(
    from: Option<&SnapshotView>,
    to: DiffTarget<'_>,
    offset: u64,
    len: u64,
) -> Result<Vec<Change>> {
    let empty = Tree::empty();
    let (from_tree, from_pool) = match from {
        Some(v) => (v.tree(), Some(v.pool())),
        None => (&empty, None),
    };
    let mut out = Vec::new();
    let mut walk = |pool: &Arc<Pool>, tree: &Tree, size: u64| {
        if from_pool.is_some_and(|p| !Arc::ptr_eq(p, pool)) {
            return Err(Error::InvalidArgument(
                "cannot compare versions of two different stores".into(),
            ));
        }
        let (first, end) = block_range(offset, len, size);
        tree.for_each_difference(from_tree, pool.meta(), first, end, &mut |v, now, _| {
            push(&mut out, v, now);
            Ok(())
        })
    };
    match to {
        DiffTarget::Snapshot(view) => {
            view.protected()?;
            walk(view.pool(), view.tree(), view.size_bytes())?
        }
        DiffTarget::Live(vdi) => {
            let pool = vdi.disk().pool.clone();
            vdi.disk()
                .with_whole_tree(|st| walk(&pool, &st.tree, st.size))?
        }
    }
    if let Some(v) = from {
        // Its pin may have lapsed meanwhile (a fenced host): then what was
        // read may be gone.
        v.protected()?;
    }
    Ok(out)
}

/// The virtual blocks `[first, end)` that meet `[offset, offset + len)`,
/// within a disk of `size` bytes.
fn block_range(offset: u64, len: u64, size: u64) -> (u64, u64) {
    let stop = offset.saturating_add(len).min(size);
    (offset / BLOCK_SIZE_U64, stop.div_ceil(BLOCK_SIZE_U64))
}

/// Where a block of a disk comes from, as `qemu:allocation-depth` says:
/// 0 nowhere (unmapped, reads as zeros), 1 the disk itself, 2 its clone
/// origin (a block the clone shares with the snapshot it was made from,
/// not written since; clones of clones report 2 as well).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthRun {
    pub offset: u64,
    pub length: u64,
    pub depth: u32,
}

/// The allocation depth of the blocks of `target` that meet `[offset,
/// offset + len)` (whole blocks), as runs covering them all. A snapshot
/// of a disk another host holds reports 1 for every mapped block (its
/// origin is not known here).
pub fn allocation_depth(target: DiffTarget<'_>, offset: u64, len: u64) -> Result<Vec<DepthRun>> {
    let runs = |pool: &Pool, tree: &Tree, origin: Option<&Tree>, size: u64| {
        let (first, end) = block_range(offset, len, size);
        let mut own = std::collections::BTreeSet::new();
        if let Some(origin) = origin {
            tree.for_each_difference(origin, pool.meta(), first, end, &mut |v, _, _| {
                own.insert(v);
                Ok(())
            })?;
        }
        let mut out: Vec<DepthRun> = Vec::new();
        // Blocks [from, to) at `depth`, merged with the run before.
        let mut add = |from: u64, to: u64, depth: u32| {
            if from >= to {
                return;
            }
            let (offset, length) = (from * BLOCK_SIZE_U64, (to - from) * BLOCK_SIZE_U64);
            match out.last_mut() {
                Some(r) if r.depth == depth && r.offset + r.length == offset => r.length += length,
                _ => out.push(DepthRun {
                    offset,
                    length,
                    depth,
                }),
            }
        };
        let mut next = first;
        tree.for_each_mapped(pool.meta(), first, end, &mut |v, _| {
            add(next, v, 0);
            let own_block = origin.is_none() || own.contains(&v);
            add(v, v + 1, if own_block { 1 } else { 2 });
            next = v + 1;
            Ok(())
        })?;
        add(next, end, 0);
        Ok(out)
    };
    match target {
        DiffTarget::Snapshot(view) => {
            view.protected()?;
            let origin = view.origin_tree()?;
            runs(view.pool(), view.tree(), origin.as_ref(), view.size_bytes())
        }
        DiffTarget::Live(vdi) => {
            let pool = vdi.disk().pool.clone();
            vdi.disk().with_whole_tree(|st| {
                let origin = st.origin_tree(&pool)?;
                runs(&pool, &st.tree, origin.as_ref(), st.size)
            })
        }
    }
}

/// Appends virtual block `v`, now `entry`, to `out`, merging runs.
fn push(out: &mut Vec<Change>, v: u64, entry: Ptr) {
    let kind = if entry.is_null() {
        ChangeKind::Zero
    } else {
        ChangeKind::Data
    };
    let offset = v * BLOCK_SIZE_U64;
    match out.last_mut() {
        Some(last) if last.kind == kind && last.offset + last.length == offset => {
            last.length += BLOCK_SIZE_U64
        }
        _ => out.push(Change {
            offset,
            length: BLOCK_SIZE_U64,
            kind,
        }),
    }
}
