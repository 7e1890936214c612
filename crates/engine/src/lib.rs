//! The Parallax engine: a block store carved into thin virtual disks.
//!
//! Layers, bottom up:
//! - [`alloc`](crate::alloc): extents and their allocation bitmaps.
//! - `meta`: metadata block I/O and the tree-node cache.
//! - `tree`: copy-on-write radix trees with writable bits.
//! - [`vdi`]: virtual disks (read, write, flush, snapshots, rollback).
//! - [`store`]: the superblock, the registry of disks, create, clone, delete.
//! - [`check`]: the offline consistency checker and garbage collector.
//!
//! The on-disk layout lives in `parallax-format`; the crash-consistency
//! argument is in `docs/FORMAT.md`.

mod alloc;
pub mod check;
mod error;
mod lineage;
mod meta;
pub mod retention;
mod space;
pub mod store;
mod time;
mod tree;
pub mod vdi;

pub use check::{CheckReport, GcReport};
pub use error::{Error, Result};
pub use parallax_format::Schedule;
pub use space::{DiskSpace, SnapshotSpace};
pub use store::{CreateOptions, OpenOptions, Store, StoreStats};
pub use time::compact_utc;
pub use vdi::{
    DeleteReport, Extent, IoPlan, SnapshotInfo, SnapshotView, Transfer, Vdi, VdiInfo, MAX_VDI_SIZE,
};
