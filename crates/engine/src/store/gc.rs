//! Garbage collection: mark from every root, then free every block of
//! this host's extents that nothing references, with the disks running.
//!
//! Invariant: `gc` frees only blocks that were allocated when its mark
//! began and that neither the mark nor a write in flight claims; blocks
//! freed while it marks are held back by the pool (so nothing the mark may
//! still read is reused under it).

use crate::error::{Error, Result};
use crate::store::catalog::Catalog;
use crate::store::check::{durable_allocator, mark_all, Role};
use crate::store::Store;
use parallax_format::BLOCK_SIZE_U64;
use std::collections::{HashMap, HashSet};

/// What `gc` did.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    pub freed_blocks: u64,
    pub freed_bytes: u64,
}

impl Store {
    /// Mark and sweep: returns to the free pool every block of this host's
    /// extents that nothing references. Open disks keep serving while it
    /// marks: they are held still only to commit and note what is
    /// allocated (before the mark) and to settle the result (after).
    pub fn gc(&self) -> Result<GcReport> {
        self.gc_with_progress(&|_, _| {})
    }

    /// [`Store::gc`], calling `progress(marked, allocated)` as the mark
    /// phase goes: blocks found referenced so far, out of the blocks the
    /// allocator holds (the mark ends at or below that).
    ///
    /// 1. Holding every open disk: commit it, note the allocated blocks
    ///    (`A0`) and the blocks of writes in flight, and start deferring
    ///    frees (blocks freed from now on are held back, so nothing the mark
    ///    reads is reused under it).
    /// 2. Mark from the durable state, disks running. Whatever a commit
    ///    adds meanwhile was allocated after `A0` and is kept; whatever it
    ///    drops is in the deferred list.
    /// 3. Holding every open disk again (no commit between its header and
    ///    its release): release the deferred frees, then free every block
    ///    of `A0` still allocated that neither the mark nor a write in
    ///    flight claims. Then write the bitmaps.
    ///
    /// The catalogue stays locked throughout: disks are not created,
    /// cloned, deleted or opened while it runs.
    ///
    /// In shared mode the catalogue lock is the cluster's, and the mark
    /// reads the disks other hosts hold from their newest headers (see
    /// `check.rs`); it frees only in this host's extents, and only after a
    /// flush of the pool made the headers it read durable. Another host's
    /// writes in flight and its frees only ever concern blocks of its own
    /// extents or blocks its durable state still references: its new
    /// references to older blocks come from committed roots (snapshots,
    /// clones under the catalogue lock), so its durable header as read
    /// covers every block of this host's extents it may still use.
    pub fn gc_with_progress(&self, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<GcReport> {
        let catalog = self.catalog()?;
        let open = self.open_disks();
        let pool = self.pool();
        let (before, in_flight) = {
            let mut guards = Vec::new();
            for disk in &open {
                let mut st = disk.exclusive()?;
                if st.is_live() {
                    disk.commit_held(&mut st)?;
                }
                guards.push(st);
            }
            let in_flight: HashSet<u64> = open.iter().flat_map(|d| d.in_flight_blocks()).collect();
            (pool.defer_frees(), in_flight)
        };
        let marked = self
            .gc_mark(&catalog, progress)
            .and_then(|m| pool.meta().flush().map(|()| m));
        let guards: Vec<_> = open.iter().map(|d| d.hold()).collect();
        let m = match marked {
            Ok(m) => m,
            Err(e) => {
                pool.end_deferring(None);
                return Err(e);
            }
        };
        let claimed = |addr: u64| m.contains_key(&addr) || in_flight.contains(&addr);
        let freed = pool.end_deferring(Some((&before, &claimed)));
        drop(guards);
        pool.sync_bitmaps()?;
        drop(catalog);
        Ok(GcReport {
            freed_blocks: freed,
            freed_bytes: freed * BLOCK_SIZE_U64,
        })
    }

    /// The mark of [`Store::gc_with_progress`]; refuses a damaged store.
    fn gc_mark(
        &self,
        catalog: &Catalog,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<HashMap<u64, Role>> {
        let (_, used) = self.pool().totals();
        let report = |marked: u64| progress(marked, used);
        let mut m = mark_all(self, catalog, Some(&report));
        progress(m.roles.len() as u64, used);
        if !m.unverified.is_empty() {
            return Err(Error::Busy(format!(
                "gc could not read every disk whole (try again): {}",
                m.unverified.join("; ")
            )));
        }
        // A referenced block the durable bitmap calls free means the bitmaps
        // or a header went back in time: freeing around it would destroy
        // data some generation still holds.
        let durable = durable_allocator(self, catalog.sb())?;
        let host = self.pool().coordinator().map(|c| c.host_id());
        let mut placement = m.placement_errors(catalog.sb(), &durable, host);
        placement.truncate(10);
        m.errors.append(&mut placement);
        if !m.errors.is_empty() {
            return Err(Error::Inconsistent(format!(
                "gc refuses to run on a damaged store: {}",
                m.errors.join("; ")
            )));
        }
        Ok(m.roles)
    }
}
