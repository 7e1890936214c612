//! Read-only access: the [`ReadDisk`] trait that a disk and a snapshot view
//! both implement, and [`SnapshotView`].
//!
//! Invariant: a view pins its snapshot while it lives, so that deleting
//! the snapshot hides it instead of reclaiming its blocks under a reader:
//! in its disk's `pins` when this host has the disk open, or (shared mode,
//! the disk held elsewhere or by nobody) cluster-wide through the
//! coordinator, which every holder consults under the catalogue lock
//! before it reclaims a snapshot.

use crate::disk::cached::{origin_anchor, CacheScope};
use crate::disk::data::{check_io_range, count_mapped, read_tree, tree_extents};
use crate::disk::plan::{plan_read, IoPlan};
use crate::disk::state::{snapshot_tree, Disk, DiskState};
use crate::disk::{DiffTarget, Extent, Owner, Vdi};
use crate::error::Result;
use crate::lineage::SnapshotInfo;
use crate::pool::Pool;
use crate::tree::Tree;
use parallax_cache::Anchor;
use parallax_format::{CachePolicy, DiskRef};
use std::sync::Arc;

/// What readers of a disk or of a snapshot need, whichever it is: the NBD
/// server and `export` serve both through it.
pub trait ReadDisk: Send + Sync {
    /// `NAME` or `NAME@SNAP`.
    fn disk_ref(&self) -> DiskRef;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`; unwritten ranges read as zeros.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Allocation status of `[offset, offset+len)`, as block-aligned runs
    /// clipped to the range.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
    /// Plans a READ for the caller to perform (see [`IoPlan`]); `Ok(None)`
    /// when that cannot be done without blocking: then use `read`.
    fn try_plan_read(&self, offset: u64, len: usize) -> Result<Option<IoPlan>>;
    /// Bytes backed by data blocks (shared or owned).
    fn allocated_bytes(&self) -> Result<u64>;
    /// The writable disk, if this is one.
    fn writable(&self) -> Option<&Vdi> {
        None
    }
    /// What [`crate::diff()`] and [`crate::allocation_depth`] take.
    fn diff_target(&self) -> DiffTarget<'_>;
}

/// Reads a disk as the commit with root `root` has it, for reads of a disk
/// another host holds (`Store::read_committed`). Nothing pins that
/// commit's blocks: the caller checks afterwards that the disk did not
/// commit meanwhile (its holder frees blocks only once a newer header is
/// durable).
pub(crate) fn read_at_root(
    pool: &Pool,
    root: parallax_format::Ptr,
    size: u64,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    check_io_range(size, offset, buf.len() as u64)?;
    read_tree(
        pool,
        &Tree::open(root),
        None,
        &CacheScope::none(),
        buf,
        offset,
    )
}

/// [`read_at_root`] for allocation status.
pub(crate) fn extents_at_root(
    pool: &Pool,
    root: parallax_format::Ptr,
    size: u64,
    offset: u64,
    len: u64,
) -> Result<Vec<Extent>> {
    check_io_range(size, offset, len)?;
    tree_extents(pool, &Tree::open(root), offset, len)
}

/// A read-only view of a snapshot. See the module documentation.
pub struct SnapshotView {
    tree: Tree,
    info: SnapshotInfo,
    disk: String,
    /// The id of the disk it is a snapshot of.
    vdi: u64,
    pool: Arc<Pool>,
    /// Keeps the snapshot's blocks from being reclaimed while the view lives.
    pin: Pin,
    owner: Owner,
    /// The view's snapshot and its disk's clone origin, as the read cache
    /// names them (see `cached.rs`); `None`: the disk's cache policy is
    /// `none`.
    cache: Option<(Anchor, Option<Anchor>)>,
}

/// How a view pins its snapshot.
enum Pin {
    /// In the disk's `pins` (this host has the disk open).
    Local(Arc<Disk>),
    /// Through the coordinator, for disk `vdi`, under the lease of
    /// `incarnation`.
    Cluster { vdi: u64, incarnation: u64 },
}

impl SnapshotView {
    /// A view of `info`, a snapshot of `vdi`, pinned while it lives.
    /// The caller holds the disk's state `st`.
    pub(super) fn pinned(vdi: &Vdi, st: &DiskState, info: SnapshotInfo) -> Result<SnapshotView> {
        let tree = snapshot_tree(&vdi.disk.pool, st.header.vdi_id, &info)?;
        *vdi.disk.pins.lock().entry(info.id).or_insert(0) += 1;
        Ok(SnapshotView {
            tree,
            cache: (st.header.cache_policy != CachePolicy::None)
                .then(|| (anchor_of(st.header.vdi_id, &info), origin_anchor(st))),
            info,
            disk: st.name.clone(),
            vdi: st.header.vdi_id,
            pool: vdi.disk.pool.clone(),
            pin: Pin::Local(vdi.disk.clone()),
            owner: vdi.owner.clone(),
        })
    }

    /// A view of `info`, a committed snapshot of disk `vdi` (named `disk`)
    /// that this host does not have open, pinned cluster-wide while it
    /// lives. The caller holds the catalogue lock and read `info` from the
    /// disk's committed log under it.
    pub(crate) fn pinned_in_cluster(
        pool: &Arc<Pool>,
        owner: Owner,
        vdi: u64,
        disk: String,
        info: SnapshotInfo,
    ) -> Result<SnapshotView> {
        let tree = snapshot_tree(pool, vdi, &info)?;
        let incarnation = pool.pin_in_cluster(vdi, info.id)?;
        Ok(SnapshotView {
            tree,
            cache: Some((anchor_of(vdi, &info), None)),
            info,
            disk,
            vdi,
            pool: pool.clone(),
            pin: Pin::Cluster { vdi, incarnation },
            owner,
        })
    }

    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    /// The snapshot's identity across stores (see
    /// [`SnapshotInfo::identity`]).
    pub fn identity(&self) -> u64 {
        self.info.identity(self.pool.meta().store_id, self.vdi)
    }

    /// The id of the disk it is a snapshot of.
    pub fn vdi_id(&self) -> u64 {
        self.vdi
    }

    /// The tree of its disk's clone origin (see `DiskState::origin_tree`),
    /// when this host has the disk open; `None` otherwise.
    pub(super) fn origin_tree(&self) -> Result<Option<Tree>> {
        match &self.pin {
            Pin::Local(disk) => disk.state.read().origin_tree(&self.pool),
            Pin::Cluster { .. } => Ok(None),
        }
    }

    pub(super) fn tree(&self) -> &Tree {
        &self.tree
    }

    pub(super) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub(super) fn size_bytes(&self) -> u64 {
        self.info.size_bytes
    }

    fn scope(&self) -> CacheScope<'static> {
        match self.cache {
            Some((anchor, origin)) => CacheScope::view(anchor, origin),
            None => CacheScope::none(),
        }
    }

    /// Whether its snapshot is still protected: in shared mode, the host
    /// may write (a fenced host's pins may be gone), the pin's lease is
    /// current, and a disk held here is still this host's.
    pub(super) fn protected(&self) -> Result<()> {
        match &self.pin {
            Pin::Cluster { incarnation, .. } => self.pool.check_incarnation(*incarnation),
            Pin::Local(disk) => disk.still_ours(),
        }
    }
}

/// How the read cache names snapshot `info` of disk `vdi`.
fn anchor_of(vdi: u64, info: &SnapshotInfo) -> Anchor {
    Anchor {
        vdi,
        snap: info.id,
        created_ns: info.created_ns,
    }
}

impl Drop for SnapshotView {
    fn drop(&mut self) {
        match &self.pin {
            Pin::Local(disk) => {
                let mut pins = disk.pins.lock();
                if let Some(n) = pins.get_mut(&self.info.id) {
                    *n -= 1;
                    if *n == 0 {
                        pins.remove(&self.info.id);
                    }
                }
            }
            Pin::Cluster { vdi, incarnation } => {
                self.pool.unpin_in_cluster(*vdi, self.info.id, *incarnation)
            }
        }
    }
}

impl ReadDisk for SnapshotView {
    fn disk_ref(&self) -> DiskRef {
        DiskRef::snapshot(&self.disk, &self.info.name)
    }

    fn size(&self) -> u64 {
        self.info.size_bytes
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // A fenced host's pins may be gone: its holder may reclaim.
        self.protected()?;
        check_io_range(self.info.size_bytes, offset, buf.len() as u64)?;
        read_tree(&self.pool, &self.tree, None, &self.scope(), buf, offset)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.protected()?;
        check_io_range(self.info.size_bytes, offset, len)?;
        tree_extents(&self.pool, &self.tree, offset, len)
    }

    fn try_plan_read(&self, offset: u64, len: usize) -> Result<Option<IoPlan>> {
        self.protected()?;
        plan_read(
            &self.pool,
            &self.owner,
            &self.tree,
            self.info.size_bytes,
            None,
            &self.scope(),
            offset,
            len,
        )
    }

    fn allocated_bytes(&self) -> Result<u64> {
        count_mapped(&self.pool, &self.tree)
    }

    fn diff_target(&self) -> DiffTarget<'_> {
        DiffTarget::Snapshot(self)
    }
}

impl ReadDisk for Vdi {
    fn disk_ref(&self) -> DiskRef {
        DiskRef::disk(&self.name())
    }

    fn size(&self) -> u64 {
        Vdi::size(self)
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Vdi::read(self, buf, offset)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Vdi::block_status(self, offset, len)
    }

    fn try_plan_read(&self, offset: u64, len: usize) -> Result<Option<IoPlan>> {
        Vdi::try_plan_read(self, offset, len)
    }

    fn allocated_bytes(&self) -> Result<u64> {
        Vdi::allocated_bytes(self)
    }

    fn writable(&self) -> Option<&Vdi> {
        Some(self)
    }

    fn diff_target(&self) -> DiffTarget<'_> {
        DiffTarget::Live(self)
    }
}

#[cfg(test)]
mod tests {
    use super::ReadDisk;
    use crate::store::{CreateOptions, Store};
    use parallax_device::MemDevice;
    use parallax_format::DiskRef;
    use std::sync::Arc;

    /// A snapshot read through a view is hidden, not reclaimed, when it is
    /// deleted; it goes once the view is gone and deletion runs again.
    #[test]
    fn a_view_pins_its_snapshot() {
        let dev = Arc::new(MemDevice::new(16 << 20));
        let store = Store::create(dev, &CreateOptions::default()).unwrap();
        let d = store.create_vdi("d", 1 << 20).unwrap();
        d.write(&[1; 4096], 0).unwrap();
        d.snapshot(Some("s")).unwrap();
        d.write(&[2; 4096], 0).unwrap();
        d.snapshot(Some("t")).unwrap();
        let view = store.open_snapshot("d", "s").unwrap();
        assert_eq!(view.disk_ref(), DiskRef::snapshot("d", "s"));
        assert!(view.writable().is_none());
        let report = d.delete_snapshot("s").unwrap();
        assert_eq!(report.hidden, 1, "a pinned snapshot was not kept");
        let mut buf = vec![0u8; 4096];
        view.read(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![1; 4096], "a pinned snapshot changed");
        drop(view);
        // The next deletion pass reclaims it.
        let report = d.delete_snapshot("t").unwrap();
        assert_eq!(report.hidden, 0);
        assert!(report.freed_blocks > 0);
        let check = store.check().unwrap();
        assert!(check.is_clean() && check.leaked_blocks == 0, "{check:?}");
    }
}
