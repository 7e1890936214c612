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
    let empty = Tree::empty();
    let (from_tree, from_pool) = match from {
        Some(v) => (v.tree(), Some(v.pool())),
        None => (&empty, None),
    };
    let mut out = Vec::new();
    let mut walk = |pool: &Arc<crate::pool::Pool>, tree: &Tree, size: u64| {
        if from_pool.is_some_and(|p| !Arc::ptr_eq(p, pool)) {
            return Err(Error::InvalidArgument(
                "cannot compare versions of two different stores".into(),
            ));
        }
        let end = size.div_ceil(BLOCK_SIZE_U64);
        tree.for_each_difference(from_tree, pool.meta(), 0, end, &mut |v, now, _| {
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
