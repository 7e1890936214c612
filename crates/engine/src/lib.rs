//! The Parallax engine: a block store carved into thin virtual disks.
//!
//! Layers, bottom up (imports point down only):
//! - [`coord`]: what a store shared by several appliances asks of the
//!   cluster (writer keys, the catalogue lock, extent grants, fencing).
//! - `alloc`, `meta`, `pool`: extents and their bitmaps, metadata block
//!   I/O and the node cache, and the pool context disks are handed (the
//!   one release path for blocks).
//! - `tree`: copy-on-write radix trees with writable bits.
//! - `lineage`: the versions of a disk and what each holds alone.
//! - [`disk`]: virtual disks (data path, planned I/O, commits, snapshot
//!   log, reclamation, read-only views).
//! - [`store`]: the catalogue, the table of open disks, check, gc, space.
//! - [`observe`]: hooks reporting events (commits) to the daemon's metrics.
//!
//! Below them all, `parallax-cache` keeps copies of immutable blocks on a
//! local device; `disk/cached.rs` decides what goes there.
//!
//! The on-disk layout lives in `parallax-format`; the crash-consistency
//! argument is in `docs/FORMAT.md`; the map of the code in
//! `docs/ARCHITECTURE.md`.

mod alloc;
pub mod coord;
pub mod disk;
mod error;
mod lineage;
mod meta;
pub mod observe;
mod pool;
pub mod retention;
pub mod store;
mod time;
mod tree;

pub use coord::{CatalogLock, Coordinator, MemCluster, MemCoordinator};
pub use disk::{
    allocation_depth, diff, diff_in, Change, ChangeKind, CopyChecks, DeleteReport, DepthRun,
    DiffTarget, Durability, Extent, FdTransfer, IoPlan, ReadDisk, SnapshotView, Transfer, Vdi,
    VdiInfo, MAX_VDI_SIZE,
};
pub use error::{Error, Result};
pub use lineage::SnapshotInfo;
pub use parallax_cache::write_log::MIN_LOG_BYTES;
pub use parallax_cache::{CacheStats, Found, LogStats, ReadCache, WriteLog};
pub use parallax_format::{CachePolicy, DiskRef, Schedule};
pub use store::{
    CheckReport, CommittedHead, CreateOptions, DiskRepair, DiskSpace, GcReport, HandoffReport,
    HeaderCopy, OpenOptions, RepairOptions, RepairReport, SettleReport, SnapshotSpace, Store,
    StoreStats, TakeoverReport,
};
pub use time::{compact_utc, now_ns};
