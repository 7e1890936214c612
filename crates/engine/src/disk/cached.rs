//! Which blocks of a read may come from the local read cache
//! (`parallax-cache`), and which copies a reader may take.
//!
//! A block is unchanged on the pool for as long as a version (a snapshot)
//! whose tree holds it exists: no live tree owns it (connectivity,
//! `lineage.rs`), so it is never written in place, and reclamation frees
//! only what no version holds. A copy is therefore filed under an
//! [`Anchor`], a version that held the block when it was read, and served
//! only to a reader that knows the anchor still exists:
//!
//! - **A snapshot view** caches every block, anchored at its snapshot (its
//!   pin keeps it), and takes copies anchored at its snapshot or at its
//!   disk's clone origin (which outlives every clone).
//! - **A live disk** caches only blocks its tree does not own (entries that
//!   are not writable). Those are in its parent version: the newest
//!   snapshot (`live_parent`), or the clone origin when it has none, since
//!   a snapshot makes every live pointer shared and deleting the parent
//!   makes writable exactly what left it. It takes copies anchored at any
//!   of its own snapshots (hidden ones included) or at its clone origin,
//!   all of which it sees under its own lock. When its parent is a
//!   scheduled snapshot (soon deleted by retention) it makes no copies,
//!   and only takes those others made.
//!
//! An anchor carries the snapshot's creation time besides its ids, because
//! a crash can lose a snapshot's commit and the next snapshot then gets the
//! same id. Disks whose versions are not tracked (`reclaims` false: written
//! before lineage, or orphaned clones) cache nothing.
//!
//! Never cached: writable blocks (they change in place), metadata, every
//! read of `check`, `gc`, `repair` and `space`, which go to the pool, and
//! disks whose cache policy is `none` (and their views).

use crate::disk::state::{DiskState, Origin};
use parallax_cache::Anchor;
use parallax_format::CachePolicy;

/// What a read does with the cache for one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// Nothing: the block is read from the pool.
    Skip,
    /// Takes a copy if there is one; a miss is read from the pool as
    /// without a cache.
    LookUp,
    /// Takes a copy, or fetches the block (once for every reader of it)
    /// and files the copy under this anchor.
    Fill(Anchor),
}

/// See the module documentation.
pub(crate) struct CacheScope<'a> {
    /// Whether the reader may take copies at all.
    look_up: bool,
    /// The anchor cacheable blocks are filed under; `None`: copies are
    /// taken, never made.
    insert_as: Option<Anchor>,
    /// Every block is immutable (a view), not only the non-writable ones.
    all_immutable: bool,
    accept: Accept<'a>,
}

enum Accept<'a> {
    Nothing,
    /// A live disk: its snapshots, or its clone origin.
    Disk {
        st: &'a DiskState,
        origin: Option<Anchor>,
    },
    /// A view: its snapshot, or its disk's clone origin.
    View {
        pinned: Anchor,
        origin: Option<Anchor>,
    },
}

/// The anchor of a disk's clone origin, if it is a clone whose origin is
/// known.
pub(crate) fn origin_anchor(st: &DiskState) -> Option<Anchor> {
    match st.origin {
        Origin::Root { created_ns, .. } => Some(Anchor {
            vdi: st.header.origin_vdi,
            snap: st.header.origin_snapshot,
            created_ns,
        }),
        Origin::None | Origin::Unknown => None,
    }
}

impl<'a> CacheScope<'a> {
    /// Caches nothing (reads of another host's disk, for example).
    pub fn none() -> CacheScope<'static> {
        CacheScope {
            look_up: false,
            insert_as: None,
            all_immutable: false,
            accept: Accept::Nothing,
        }
    }

    /// Reads of a live disk through its state `st` (held for the read).
    pub fn live(st: &'a DiskState) -> CacheScope<'a> {
        if !st.reclaims() || st.header.cache_policy == CachePolicy::None {
            return CacheScope::none();
        }
        let origin = origin_anchor(st);
        let parent = st.header.live_parent;
        // A scheduled snapshot is deleted by retention soon after: copies
        // filed under it would be made for nothing (reads of a disk on a
        // 10 ms schedule would all be misses that fill). Such a disk takes
        // copies others made (of its clone origin, say) and makes none.
        let insert_as = if parent == 0 {
            origin
        } else {
            st.snapshots
                .get(parent)
                .filter(|s| !s.scheduled)
                .map(|s| Anchor {
                    vdi: st.header.vdi_id,
                    snap: s.id,
                    created_ns: s.created_ns,
                })
        };
        CacheScope {
            look_up: true,
            insert_as,
            all_immutable: false,
            accept: Accept::Disk { st, origin },
        }
    }

    /// Reads of a view of snapshot `pinned` (pinned while it reads), of a
    /// disk whose clone origin is `origin`.
    pub fn view(pinned: Anchor, origin: Option<Anchor>) -> CacheScope<'static> {
        CacheScope {
            look_up: true,
            insert_as: Some(pinned),
            all_immutable: true,
            accept: Accept::View { pinned, origin },
        }
    }

    /// What to do with the cache for a block: `writable` is the tree's
    /// answer for it (a live tree owns it, and writes it in place).
    pub fn for_block(&self, writable: bool) -> Use {
        if !self.look_up || (writable && !self.all_immutable) {
            return Use::Skip;
        }
        match self.insert_as {
            Some(anchor) => Use::Fill(anchor),
            None => Use::LookUp,
        }
    }

    /// Whether a copy filed under `a` is right for this reader.
    pub fn accepts(&self, a: &Anchor) -> bool {
        match &self.accept {
            Accept::Nothing => false,
            Accept::Disk { st, origin } => {
                Some(*a) == *origin
                    || (a.vdi == st.header.vdi_id
                        && st
                            .snapshots
                            .get(a.snap)
                            .is_some_and(|s| s.created_ns == a.created_ns))
            }
            Accept::View { pinned, origin } => a == pinned || Some(*a) == *origin,
        }
    }
}
