//! The store: the façade over one pool, its catalogue and its open disks.
//!
//! | module | concern |
//! |---|---|
//! | `mod` (here) | [`Store`]: create, open, the table of open disks, settle, close |
//! | `catalog` | superblock and registry: create, clone, delete disks |
//! | `check` | `check`: every invariant of the durable state |
//! | `gc` | `gc`: mark and sweep with the disks running |
//! | `repair` | `repair`: bitmaps rebuilt from the metadata, header generations chosen with the operator |
//! | `shared` | shared mode: snapshots of other hosts' disks read and pinned, hidden versions reclaimed under the catalogue lock |
//! | `space` | used/referenced figures, by walks and by brute force |
//!
//! **The store owns its open disks.** The table below holds every open
//! disk's state strongly; handles ([`Vdi`], [`SnapshotView`], [`IoPlan`])
//! share it and keep the store open. A disk's state leaves the table only
//! through [`Store::delete_vdi`], an explicit [`Store::close_vdi`], or
//! [`Store::settle`] (which commits a disk first and lets it go only when no
//! handle uses it); when the last handle on the store goes, every open disk
//! is committed. So dropping handles, in any order and at any moment,
//! loses no write and leaks no block.
//!
//! [`IoPlan`]: crate::IoPlan

mod catalog;
mod check;
mod gc;
mod repair;
mod shared;
mod space;

pub use check::CheckReport;
pub use gc::GcReport;
pub use repair::{DiskRepair, HeaderCopy, RepairOptions, RepairReport};
pub use shared::{CommittedHead, HandoffReport, TakeoverReport};
pub use space::{DiskSpace, SnapshotSpace};

use crate::alloc::Allocator;
use crate::coord::{CatalogLock, Coordinator};
use crate::disk::{verify_allocated, Disk, Origin, Vdi};
use crate::error::{Error, Result};
use crate::meta::{MetaIo, DEFAULT_CACHE_NODES};
use crate::pool::Pool;
use crate::time::now_ns;
use catalog::Catalog;
use parallax_cache::{CacheStats, LogStats, ReadCache, WriteLog};
use parallax_device::BlockDevice;
use parallax_format::{RegistryEntry, BITMAP_BITS, BLOCK_SIZE_U64};
use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Options for [`Store::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Data blocks per extent (at most 31744, the default: 124 MiB).
    pub extent_data_blocks: u64,
    pub host_id: u64,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            extent_data_blocks: BITMAP_BITS as u64,
            host_id: 1,
        }
    }
}

/// Options for [`Store::open`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// This appliance's host id: it allocates only from extents it owns.
    pub host_id: u64,
    /// Tree nodes kept in the cache.
    pub cache_nodes: usize,
    /// Shared mode: several appliances use the pool, coordinated by this
    /// (see [`crate::coord`]); its host id must be `host_id`.
    pub coordinator: Option<Arc<dyn Coordinator>>,
    /// A local read cache in front of the pool's data reads (see
    /// `disk/cached.rs`); opened for this store.
    pub read_cache: Option<Arc<ReadCache>>,
    /// The local write-back log: the device given to [`Store::open`] must
    /// be this log (in front of the pool). Disks with the write-back
    /// policy make it log while they are open; see [`Store::refresh_write_back`].
    pub write_log: Option<Arc<WriteLog>>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            host_id: 1,
            cache_nodes: DEFAULT_CACHE_NODES,
            coordinator: None,
            read_cache: None,
            write_log: None,
        }
    }
}

/// Space figures of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStats {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
}

/// What [`Store::settle`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettleReport {
    /// Idle disks whose pending changes were committed.
    pub committed: u64,
    /// Idle disks no handle used, let go.
    pub closed: u64,
}

pub(crate) struct StoreInner {
    pool: Arc<Pool>,
    catalog: Mutex<Catalog>,
    /// Disk id ─▶ its state: see the module documentation. Taken after the
    /// catalogue and after disk locks, never before them (except with
    /// `try_read`, which cannot wait).
    open: Mutex<HashMap<u64, Arc<Disk>>>,
    /// [`Store::abandon`]: let go as a killed process would.
    abandoned: std::sync::atomic::AtomicBool,
    /// Shared mode: disks [`Store::take_over`] holds the writer key of
    /// while it waits out the grace; nothing else opens them meanwhile.
    taking_over: Mutex<std::collections::HashSet<u64>>,
    /// Shared mode with a write-back log: the coordinator's incarnation
    /// under which the log was last found still named for this host. The
    /// destager writes the pool only under it (see
    /// [`Store::confirm_write_log`]).
    log_incarnation: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for StoreInner {
    /// The last handle is gone: commit every open disk (best effort: a
    /// failure leaves the previous commit, as a crash would).
    fn drop(&mut self) {
        if self.abandoned.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        for disk in self.open.get_mut().values() {
            let _ = disk.commit_pending();
        }
        let _ = self.pool.sync_bitmaps();
        for disk in self.open.get_mut().values() {
            disk.release_writer();
        }
        // A clean stop: the log drained to the pool, then the superblock
        // no longer names it (written directly: the log is direct again).
        // If draining fails, the name stays and the log replays next time.
        if let Some(log) = self.pool.write_log() {
            if let Some(c) = self.pool.coordinator() {
                // (A log given up does not drain.)
                if log.drain_all().is_ok() {
                    let _ = c.unname_write_log();
                }
            } else if log.drain_all().is_ok() {
                let catalog = self.catalog.get_mut();
                if catalog.sb().write_log_id != 0 && !catalog.is_poisoned() {
                    let mut sb = catalog.sb().clone();
                    sb.write_log_id = 0;
                    sb.write_log_locator = 0;
                    let _ = catalog::commit_superblock(&self.pool, catalog, sb, &[]);
                }
            }
        }
    }
}

/// An open store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

impl Store {
    /// Formats `dev` as an empty store. Everything on it is lost.
    pub fn create(dev: Arc<dyn BlockDevice>, options: &CreateOptions) -> Result<Store> {
        catalog::format(&*dev, options.extent_data_blocks)?;
        Store::open(
            dev,
            &OpenOptions {
                host_id: options.host_id,
                ..OpenOptions::default()
            },
        )
    }

    /// The id of the store on `dev` (from its superblock), without opening
    /// it: what names the store's keys in a cluster's coordination service.
    pub fn peek_id(dev: &dyn BlockDevice) -> Result<u64> {
        Ok(catalog::read_superblocks(dev)?.0.store_id)
    }

    /// The write-back log the superblock on `dev` names, as (log id, the
    /// cache's size in bytes); `None` if it names none.
    pub fn peek_write_log(dev: &dyn BlockDevice) -> Result<Option<(u64, u64)>> {
        let sb = catalog::read_superblocks(dev)?.0;
        Ok((sb.write_log_id != 0).then_some((sb.write_log_id, sb.write_log_locator)))
    }

    /// Makes the superblock on `dev` name no write-back log, without opening
    /// the store: the operator gives up writes only that log holds (the
    /// cache device is lost). The pool is then as the log last left it: a
    /// state a power cut could have left. Returns the log it named.
    pub fn forget_write_log(dev: &dyn BlockDevice) -> Result<Option<(u64, u64)>> {
        let named = Self::peek_write_log(dev)?;
        if named.is_some() {
            catalog::clear_write_log(dev)?;
        }
        Ok(named)
    }

    /// Opens an existing store. Never repairs anything: a store that was
    /// cut off at any instant opens as it is.
    pub fn open(dev: Arc<dyn BlockDevice>, options: &OpenOptions) -> Result<Store> {
        if let Some(c) = &options.coordinator {
            if c.host_id() != options.host_id || c.host_id() == 0 {
                return Err(Error::InvalidArgument(format!(
                    "host id {} does not match the coordinator's ({})",
                    options.host_id,
                    c.host_id()
                )));
            }
        }
        // Shared mode: the catalogue is read under the cluster's lock, so
        // no other host changes it (or frees a registry block) meanwhile.
        let _cluster = match &options.coordinator {
            Some(c) => Some(c.lock_catalog()?),
            None => None,
        };
        let (sb, slot) = catalog::read_superblocks(&*dev)?;
        // The write-back log the pool depends on: named in the superblock
        // (one host alone on the pool), or in the coordination service for
        // this host (cluster mode: one log per host).
        let mut named = (sb.write_log_id != 0).then_some((sb.write_log_id, sb.write_log_locator));
        if let (None, Some(c)) = (named, &options.coordinator) {
            named = c.write_log_of(c.host_id())?;
        }
        match (&options.write_log, named) {
            (_, None) => {}
            (Some(log), Some((id, _))) if log.id() == id => {}
            (_, Some((id, cache_bytes))) => return Err(Error::NeedsWriteLog { id, cache_bytes }),
        }
        if dev.len() < sb.total_blocks * BLOCK_SIZE_U64 {
            return Err(Error::Inconsistent(format!(
                "the store needs {} bytes but the device has only {}",
                sb.total_blocks * BLOCK_SIZE_U64,
                dev.len()
            )));
        }
        let meta = MetaIo::new(
            dev.clone(),
            sb.store_id,
            sb.total_blocks,
            options.cache_nodes,
        );
        let alloc = Allocator::load(&*dev, &sb, options.host_id)?;
        let pool = Arc::new(Pool::new(meta, alloc));
        if sb.journaled {
            pool.set_journal_mode();
        }
        if let Some(c) = &options.coordinator {
            pool.set_coordinator(c.clone());
        }
        if let Some(cache) = &options.read_cache {
            if cache.store_id() != sb.store_id {
                return Err(Error::InvalidArgument(format!(
                    "the read cache was opened for store {:016x}, not this one ({:016x})",
                    cache.store_id(),
                    sb.store_id
                )));
            }
            pool.set_read_cache(cache.clone());
        }
        if let Some(log) = &options.write_log {
            if log.store_id() != sb.store_id {
                return Err(Error::InvalidArgument(format!(
                    "the write-back log was opened for store {:016x}, not this one ({:016x})",
                    log.store_id(),
                    sb.store_id
                )));
            }
            pool.set_write_log(log.clone());
        }
        let log_incarnation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        if let (Some(log), Some(c)) = (&options.write_log, &options.coordinator) {
            // Records reach the pool only while this host may write, and
            // only under a lease under which the log was found still named
            // (after a lost lease: see `Store::confirm_write_log`).
            log_incarnation.store(c.incarnation(), std::sync::atomic::Ordering::SeqCst);
            let (gate, under) = (c.clone(), log_incarnation.clone());
            log.set_destage_gate(Arc::new(move || {
                gate.may_write()
                    && gate.incarnation() == under.load(std::sync::atomic::Ordering::SeqCst)
            }));
            // Records an earlier run left (replayed): on the pool before
            // anything else, under the catalogue lock. Then the log is
            // named no more until a write-back disk is opened here again:
            // the disks that run held and did not let go can be taken over
            // by other hosts (none could meanwhile: the log was named).
            // (The destager may have written them all already: it starts as
            // the log opens.)
            if log.stats().replayed > 0 || log.is_logging() {
                log.drain_all().map_err(Error::io(
                    "destaging the write-back log left by the last run",
                ))?;
                c.unname_write_log()?;
            }
        }
        let lost = pool.lost_bitmaps();
        if !lost.is_empty() {
            pool.set_damaged(format!(
                "no copy of the bitmap of extent(s) {lost:?} is valid (every extent has one from formatting on): which of their blocks are in use is unknown"
            ));
        }
        let catalog = Catalog::load(&pool, sb, slot)?;
        // Which snapshots clones hang from: reclamation must keep them. A
        // disk whose headers cannot be read fails when it is opened; it
        // cannot be counted here.
        // Every disk's header and root are checked against the bitmaps now
        // (one node read each): a disk that disagrees makes the store take
        // no more writes, before anything could allocate over its blocks.
        for e in catalog.entries() {
            match catalog::read_vdi_header(&pool, &e) {
                Ok((h, _)) => {
                    if h.origin_vdi != 0 {
                        pool.add_clone(h.origin_vdi, h.origin_snapshot);
                    }
                    if let Err(err) = verify_allocated(&pool, &e.name, &h, &[]) {
                        pool.set_damaged(err.to_string());
                    }
                }
                Err(err) => pool.set_damaged(err.to_string()),
            }
        }
        let journaled = pool.journal_mode();
        let store = Store {
            inner: Arc::new(StoreInner {
                pool,
                catalog: Mutex::new(catalog),
                open: Mutex::new(HashMap::new()),
                abandoned: std::sync::atomic::AtomicBool::new(false),
                taking_over: Mutex::new(Default::default()),
                log_incarnation,
            }),
        };
        if journaled && !catalog::both_superblocks_journaled(&*store.inner.pool.meta().dev) {
            // A crash came between the two writes of `enable_journal`.
            if store.is_shared() {
                return Err(Error::Inconsistent(
                    "only one superblock copy says entry journals are on (a crash while they were turned on): open the store once without a coordinator, or turn them on again".into(),
                ));
            }
            store.enable_journal()?;
        }
        Ok(store)
    }

    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.inner.pool
    }

    /// The read cache's counters, if the store has one.
    pub fn read_cache_stats(&self) -> Option<CacheStats> {
        self.inner.pool.read_cache().map(|c| c.stats())
    }

    /// The write-back log's counters, if the store has one.
    pub fn write_log_stats(&self) -> Option<LogStats> {
        self.inner.pool.write_log().map(|l| l.stats())
    }

    /// Makes the write-back log log while a disk with the write-back
    /// policy is open, and lets it drain and go direct when none is
    /// (callers: opening a disk, a policy change, `settle`). Before the
    /// log takes its first record, the superblock names it, durably: from
    /// then on, a program that does not have the log refuses the store
    /// ([`Error::NeedsWriteLog`]) until a clean stop drained the log and
    /// cleared the name.
    pub fn refresh_write_back(&self) -> Result<()> {
        let Some(log) = self.inner.pool.write_log().cloned() else {
            return Ok(());
        };
        let wanted = self
            .open_disks()
            .iter()
            .any(|d| d.cache_policy() == parallax_format::CachePolicy::WriteBack);
        if wanted && !log.is_logging() {
            if let Some(c) = self.inner.pool.coordinator() {
                c.name_write_log(log.id(), log.locator())?;
                log.set_wanted(true);
                return Ok(());
            }
            let mut catalog = self.catalog()?;
            if catalog.sb().write_log_id != log.id() {
                let mut sb = catalog.sb().clone();
                sb.write_log_id = log.id();
                sb.write_log_locator = log.locator();
                catalog::commit_superblock(&self.inner.pool, &mut catalog, sb, &[])?;
            }
        }
        log.set_wanted(wanted);
        Ok(())
    }

    /// Turns on entry journals (format 2, docs/JOURNAL-PLAN.md): disks
    /// opened from now on commit their level-0 changes as journal records
    /// between checkpoints, and snapshots between checkpoints are positions
    /// in those journals. Both superblock copies are first rewritten as
    /// format 2, so that a binary that does not read journals refuses the
    /// store instead of ignoring them. Not reversible. Still being built:
    /// not offered to users yet.
    #[doc(hidden)]
    pub fn enable_journal(&self) -> Result<()> {
        let mut catalog = self.catalog()?;
        // Each commit writes the other copy: at most two make both say so
        // (also after a crash between the two, found at the next open).
        for _ in 0..2 {
            if catalog::both_superblocks_journaled(&*self.inner.pool.meta().dev) {
                break;
            }
            let mut sb = catalog.sb().clone();
            sb.journaled = true;
            catalog::commit_superblock(&self.inner.pool, &mut catalog, sb, &[])?;
        }
        self.inner.pool.set_journal_mode();
        Ok(())
    }

    /// Whether entry journals are on for the store (format 2; see
    /// [`Store::enable_journal`]).
    pub fn journal_mode(&self) -> bool {
        self.inner.pool.journal_mode()
    }

    /// Journal mode: how many records a disk's journal holds before a
    /// commit folds them into tree nodes (default 65,536); small values
    /// make tests checkpoint often.
    #[doc(hidden)]
    pub fn set_journal_checkpoint(&self, records: u64) {
        self.inner.pool.set_checkpoint_records(records);
    }

    /// Bytes of disk data read from the pool device since the store was
    /// opened (reads the cache served are not counted).
    pub fn pool_data_read_bytes(&self) -> u64 {
        self.inner.pool.data_read_bytes()
    }

    /// Lets the store go as a killed process would (simulations and
    /// tests): when its last handle goes, nothing held in memory is
    /// committed, no bitmap is written and no writer key is given back
    /// (a lease service ends them).
    pub fn abandon(self) {
        self.inner
            .abandoned
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Shared mode: blocks this host freed in extents another host owns,
    /// left allocated (leaks `gc` will return; never a double allocation).
    pub fn foreign_frees(&self) -> u64 {
        self.inner.pool.foreign_frees()
    }

    /// Ids of the disks open in this store (shared mode: the disks this
    /// host holds the writer key of).
    pub fn open_disk_ids(&self) -> Vec<u64> {
        self.open_disks().iter().map(|d| d.id()).collect()
    }

    /// Whether several appliances share the pool (a coordinator was given).
    pub fn is_shared(&self) -> bool {
        self.inner.pool.coordinator().is_some()
    }

    /// Shared mode: this appliance's host id (`None` alone on the pool).
    pub fn cluster_host_id(&self) -> Option<u64> {
        self.inner.pool.coordinator().map(|c| c.host_id())
    }

    /// The catalogue, locked. In shared mode, under the cluster's
    /// catalogue lock as well, and re-read from the pool first if another
    /// host changed it: no host trusts its cached copy.
    pub(crate) fn catalog(&self) -> Result<CatalogAccess<'_>> {
        // The local lock first: the cluster's is one per host (etcd's lock
        // is per lease), so two threads of one host must not both ask.
        let mut guard = self.inner.catalog.lock();
        let cluster = match self.inner.pool.coordinator() {
            Some(c) => Some(c.lock_catalog()?),
            None => None,
        };
        if cluster.is_some() {
            self.refresh_catalog(&mut guard)?;
        }
        Ok(CatalogAccess {
            guard,
            _cluster: cluster,
        })
    }

    /// Re-reads the superblock and, if its generation moved, the registry
    /// and which snapshots clones hang from.
    fn refresh_catalog(&self, catalog: &mut Catalog) -> Result<()> {
        let pool = &self.inner.pool;
        let (sb, slot) = catalog::read_superblocks(&*pool.meta().dev)?;
        if sb.generation == catalog.sb().generation {
            return Ok(());
        }
        let fresh = Catalog::load(pool, sb, slot)?;
        let mut clones = HashMap::new();
        for e in fresh.entries() {
            let (h, _) = catalog::read_vdi_header(pool, &e)?;
            if h.origin_vdi != 0 {
                *clones.entry((h.origin_vdi, h.origin_snapshot)).or_insert(0) += 1;
            }
        }
        pool.set_clones(clones);
        let poisoned = catalog.is_poisoned();
        *catalog = fresh;
        if poisoned {
            catalog.poison();
        }
        Ok(())
    }

    /// Why the store takes no writes, if it found its metadata disagreeing
    /// when it was opened (see `disk::state::verify_allocated`); `check`
    /// reports the details.
    pub fn damage(&self) -> Option<String> {
        self.inner.pool.damaged()
    }

    /// The store's random id.
    pub fn store_id(&self) -> u64 {
        self.inner.pool.meta().store_id
    }

    /// Names of all disks, sorted.
    ///
    /// In shared mode the catalogue is read under the cluster's lock; if
    /// that fails (the coordination service unreachable, this host fenced)
    /// the list is empty: use [`Store::try_list`] to see the error.
    pub fn list(&self) -> Vec<String> {
        self.try_list().unwrap_or_default()
    }

    /// [`Store::list`], failing when the catalogue cannot be read.
    pub fn try_list(&self) -> Result<Vec<String>> {
        let catalog = self.catalog()?;
        let mut names: Vec<String> = catalog.entries().into_iter().map(|e| e.name).collect();
        names.sort();
        Ok(names)
    }

    /// Disk id ─▶ name, for every disk.
    pub fn disk_names(&self) -> Result<std::collections::HashMap<u64, String>> {
        let catalog = self.catalog()?;
        Ok(catalog
            .entries()
            .into_iter()
            .map(|e| (e.vdi_id, e.name))
            .collect())
    }

    pub fn stats(&self) -> StoreStats {
        let (total, used) = self.inner.pool.totals();
        StoreStats {
            capacity_bytes: total * BLOCK_SIZE_U64,
            used_bytes: used * BLOCK_SIZE_U64,
            free_bytes: (total - used) * BLOCK_SIZE_U64,
        }
    }

    /// A handle on `disk`, keeping this store open.
    fn handle(&self, disk: Arc<Disk>) -> Vdi {
        Vdi::new(disk, self.inner.clone())
    }

    /// Opens a writable disk. Handles to one disk share its state.
    pub fn open_vdi(&self, name: &str) -> Result<Vdi> {
        let catalog = self.catalog()?;
        let (_, entry) = catalog
            .find(name)
            .ok_or_else(|| Error::NotFound(format!("disk {name} does not exist")))?;
        let vdi = self.open_entry(&catalog, &entry)?;
        drop(catalog);
        self.refresh_write_back()?;
        Ok(vdi)
    }

    /// The size of disk `name`, from its newest header (one block read; the
    /// disk is not opened). Sizes never change after creation.
    pub fn disk_size(&self, name: &str) -> Result<u64> {
        let catalog = self.catalog()?;
        self.disk_size_in(&catalog, name)
    }

    /// [`Store::disk_size`], or `None` if the catalogue is busy (a `gc` or
    /// a create holds it): for threads that must not wait.
    pub fn try_disk_size(&self, name: &str) -> Option<Result<u64>> {
        if self.is_shared() {
            // The catalogue must be re-read under the cluster's lock.
            return None;
        }
        let catalog = self.inner.catalog.try_lock()?;
        Some(self.disk_size_in(&catalog, name))
    }

    fn disk_size_in(&self, catalog: &Catalog, name: &str) -> Result<u64> {
        let (_, entry) = catalog
            .find(name)
            .ok_or_else(|| Error::NotFound(format!("disk {name} does not exist")))?;
        Ok(catalog::read_vdi_header(&self.inner.pool, &entry)?
            .0
            .size_bytes)
    }

    /// A handle on disk `name` if this store has it open already (in shared
    /// mode: if this host holds its writer key); `None` otherwise. Never
    /// opens it.
    pub fn open_if_held(&self, name: &str) -> Result<Option<Vdi>> {
        let catalog = self.catalog()?;
        let Some((_, entry)) = catalog.find(name) else {
            return Err(Error::NotFound(format!("disk {name} does not exist")));
        };
        let disk = self.inner.open.lock().get(&entry.vdi_id).cloned();
        Ok(disk.map(|d| self.handle(d)))
    }

    /// What disk `name`'s newest header says, read from the pool without
    /// opening the disk (shared mode: another host may be writing it; the
    /// figures are those of its last commit). `hidden_snapshots` is not
    /// known this way (0).
    pub fn peek_info(&self, name: &str) -> Result<crate::VdiInfo> {
        let catalog = self.catalog()?;
        let (_, entry) = catalog
            .find(name)
            .ok_or_else(|| Error::NotFound(format!("disk {name} does not exist")))?;
        let (h, _) = catalog::read_vdi_header(&self.inner.pool, &entry)?;
        Ok(crate::VdiInfo {
            id: h.vdi_id,
            name: entry.name,
            size_bytes: h.size_bytes,
            created_ns: h.created_ns,
            snapshot_count: h.snapshot_count,
            hidden_snapshots: 0,
            origin: (!h.origin.is_empty()).then(|| h.origin.clone()),
            generation: h.generation,
            schedule: h.schedule,
            writer_host: h.writer_host,
            writer_epoch: h.writer_epoch,
            cache_policy: h.cache_policy,
        })
    }

    /// Opens the disk of a registry entry; the caller holds the catalogue.
    fn open_entry(&self, catalog: &Catalog, entry: &RegistryEntry) -> Result<Vdi> {
        self.open_entry_as(catalog, entry, false)
    }

    /// [`Store::open_entry`]; `taking_over`: the disk's last holder did not
    /// let it go, and the caller ([`Store::take_over`]) waited the grace.
    ///
    /// Shared mode: a disk whose last commit was made under an epoch other
    /// than the last clean release's is refused (Busy) unless taking it
    /// over; once open, a header commit under this host's epoch comes
    /// before anything else (the takeover commit, or the acquire commit
    /// after a clean release), so that the disk's header always names its
    /// current writer.
    fn open_entry_as(
        &self,
        catalog: &Catalog,
        entry: &RegistryEntry,
        taking_over: bool,
    ) -> Result<Vdi> {
        if let Some(disk) = self.inner.open.lock().get(&entry.vdi_id) {
            return Ok(self.handle(disk.clone()));
        }
        if !taking_over && self.inner.taking_over.lock().contains(&entry.vdi_id) {
            return Err(Error::Busy(format!(
                "disk {}: this appliance is taking it over",
                entry.name
            )));
        }
        let pool = &self.inner.pool;
        let (header, slot) = catalog::read_vdi_header(pool, entry)?;
        let origin = if header.origin_vdi == 0 {
            Origin::None
        } else if self.is_shared() {
            // Another host may write the origin: its snapshot list is read
            // from the pool, not opened (its snapshots are immutable).
            match catalog.by_id(header.origin_vdi) {
                Some(o) => {
                    let (oh, _) = catalog::read_vdi_header(pool, &o)?;
                    match crate::disk::log::snapshot_info(pool, &oh, header.origin_snapshot)? {
                        Some(s) => Origin::Root {
                            root: s.root,
                            journal: s.journal,
                            created_ns: s.created_ns,
                        },
                        None => Origin::Unknown,
                    }
                }
                None => Origin::Unknown,
            }
        } else {
            // The origin disk outlives its clones (deleting it is refused
            // while they exist), and the snapshot stays, hidden if deleted.
            // Opened through the table, it stays open for the next clone.
            match catalog.by_id(header.origin_vdi) {
                Some(o) => {
                    let o = self.open_entry(catalog, &o)?;
                    let st = o.disk().read_state()?;
                    match st.snapshots().get(header.origin_snapshot) {
                        Some(s) => Origin::Root {
                            root: s.root,
                            journal: s.journal,
                            created_ns: s.created_ns,
                        },
                        None => Origin::Unknown,
                    }
                }
                None => Origin::Unknown,
            }
        };
        // Shared mode: this host writes the disk only under its writer key.
        let epoch = match pool.coordinator() {
            Some(c) => c.acquire_writer(entry.vdi_id).map_err(|e| match e {
                Error::Busy(why) => Error::Busy(format!("disk {}: {why}", entry.name)),
                e => e,
            })?,
            None => 0,
        };
        if let Some(c) = pool.coordinator() {
            let released = c.released_epoch(entry.vdi_id);
            let unreleased = released.as_ref().map(|&r| {
                header.writer_epoch != 0 && header.writer_epoch != epoch && header.writer_epoch != r
            });
            match unreleased {
                Ok(false) => {}
                Ok(true) if taking_over => {}
                Ok(true) => {
                    c.release_writer(entry.vdi_id, epoch);
                    return Err(Error::Busy(format!(
                        "disk {0}: host {1} did not let it go (it stopped or lost its lease, and may still have writes in flight): take it over with `parallax takeover {0}`, or run the appliances with --takeover",
                        entry.name, header.writer_host
                    )));
                }
                Err(_) => {
                    c.release_writer(entry.vdi_id, epoch);
                    return Err(released.unwrap_err());
                }
            }
        }
        let opened = Disk::open(
            pool.clone(),
            [entry.header_a, entry.header_b],
            header,
            1 - slot,
            entry.name.clone(),
            origin,
            epoch,
        );
        // The acquire (or takeover) commit: the header names this writer
        // before anything is written under its key, on the pool itself
        // with a write-back log (see `Disk::commit_header_through`).
        let opened = opened.and_then(|d| {
            if epoch != 0 {
                d.commit_header_through()?;
            }
            Ok(d)
        });
        let disk = match opened {
            Ok(d) => Arc::new(d),
            Err(e) => {
                if let Some(c) = pool.coordinator().filter(|_| epoch != 0) {
                    c.release_writer(entry.vdi_id, epoch);
                }
                return Err(e);
            }
        };
        Ok(self.handle(self.adopt(disk)))
    }

    /// Puts a newly opened disk in the table (or returns the one already
    /// there).
    fn adopt(&self, disk: Arc<Disk>) -> Arc<Disk> {
        self.inner
            .open
            .lock()
            .entry(disk.id())
            .or_insert(disk)
            .clone()
    }

    /// Every open disk, by id.
    pub(crate) fn open_disks(&self) -> Vec<Arc<Disk>> {
        let mut open: Vec<Arc<Disk>> = self.inner.open.lock().values().cloned().collect();
        open.sort_by_key(|d| d.id());
        open
    }

    /// Commits disk `name` and lets its state go, if it is open and no
    /// handle uses it ([`Error::Busy`] otherwise).
    pub fn close_vdi(&self, name: &str) -> Result<()> {
        let catalog = self.catalog()?;
        let (_, entry) = catalog
            .find(name)
            .ok_or_else(|| Error::NotFound(format!("disk {name} does not exist")))?;
        let Some(disk) = self.inner.open.lock().get(&entry.vdi_id).cloned() else {
            return Ok(());
        };
        disk.commit_pending()?;
        drop(disk);
        let mut open = self.inner.open.lock();
        match open.get(&entry.vdi_id) {
            Some(d) if Arc::strong_count(d) > 1 => Err(Error::Busy(format!(
                "disk {name} is in use; close its handles first"
            ))),
            _ => {
                if let Some(d) = open.remove(&entry.vdi_id) {
                    d.release_writer();
                }
                Ok(())
            }
        }
    }

    /// Background upkeep (the daemon calls it every few hundred ms). In
    /// shared mode, first takes back the writer keys a lost lease took
    /// (see `shared.rs`), and at the end reclaims hidden snapshots nothing
    /// holds. Then, in any mode: commits every open disk whose state has not changed for
    /// `commit_after` and has something pending (so that what a client
    /// wrote and left without a flush is committed, not kept in memory
    /// for ever), lets go of disks that no handle uses and that have been
    /// idle for `close_after`, then writes the bitmaps that frees changed.
    pub fn settle(&self, commit_after: Duration, close_after: Duration) -> Result<SettleReport> {
        let now = now_ns();
        let mut report = SettleReport::default();
        let mut first_error = None;
        // Shared mode: after a lost lease, the write-back log still ours
        // (or given up), then the keys lost with the lease taken back.
        if let Err(e) = self.confirm_write_log() {
            first_error.get_or_insert(e);
        }
        if let Err(e) = self.reacquire_in_cluster() {
            first_error.get_or_insert(e);
        }
        for disk in self.open_disks() {
            if disk.idle_ns(now) >= commit_after.as_nanos() as u64
                && disk.try_has_pending() == Some(true)
            {
                match disk.commit_pending() {
                    Ok(()) => report.committed += 1,
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        // `handles`: the table's own reference, plus the caller's.
        let closing = |disk: &Arc<Disk>, handles: usize| {
            Arc::strong_count(disk) <= handles
                && disk.idle_ns(now) >= close_after.as_nanos() as u64
                && disk.try_has_pending() == Some(false)
        };
        // Shared mode with a write-back log: what the disks about to be let
        // go committed reaches the pool first, outside the table's lock
        // (their release then finds it there).
        for disk in self.open_disks() {
            if closing(&disk, 2) {
                let _ = disk.drain_log();
            }
        }
        self.inner.open.lock().retain(|_, disk| {
            let keep = !closing(disk, 1);
            report.closed += u64::from(!keep);
            if !keep {
                disk.release_writer();
            }
            keep
        });
        if let Err(e) = self.reclaim_in_cluster() {
            first_error.get_or_insert(e);
        }
        if let Err(e) = self.refresh_write_back() {
            first_error.get_or_insert(e);
        }
        if self.inner.pool.has_unsynced() {
            if let Err(e) = self.inner.pool.sync_bitmaps() {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Writes the extent bitmaps that changed, if any (then flushes the
    /// device), so that blocks freed by earlier commits are free on disk
    /// too, without committing any disk.
    pub fn settle_free_space(&self) -> Result<()> {
        if !self.inner.pool.has_unsynced() {
            return Ok(());
        }
        self.inner.pool.sync_bitmaps()
    }

    /// Commits every open disk, then writes the bitmaps, so that blocks
    /// freed by earlier commits (which become free in memory at once) are
    /// free on disk too.
    pub fn flush_all(&self) -> Result<()> {
        for disk in self.open_disks() {
            disk.commit_pending()?;
        }
        self.inner.pool.sync_bitmaps()
    }
}

/// The locked catalogue (see [`Store::catalog`]). The cluster's lock goes
/// before the local one (fields drop in order), which was taken first.
pub(crate) struct CatalogAccess<'a> {
    _cluster: Option<CatalogLock>,
    guard: MutexGuard<'a, Catalog>,
}

impl std::ops::Deref for CatalogAccess<'_> {
    type Target = Catalog;
    fn deref(&self) -> &Catalog {
        &self.guard
    }
}

impl std::ops::DerefMut for CatalogAccess<'_> {
    fn deref_mut(&mut self) -> &mut Catalog {
        &mut self.guard
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parallax_device::MemDevice;

    fn store() -> (Arc<MemDevice>, Store) {
        let dev = Arc::new(MemDevice::new(16 << 20));
        let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
        (dev, store)
    }

    /// A header copy of a newer generation but an older writer epoch (a
    /// holder that lost the disk finishing a commit late) is not the
    /// disk's state, and `check` reports it.
    #[test]
    fn a_late_commit_of_an_older_epoch_is_ignored_and_reported() {
        let (dev, store) = store();
        let v = store.create_vdi("d", 1 << 20).unwrap();
        v.write(&[1; 4096], 0).unwrap();
        v.flush().unwrap();
        drop(v);
        store.close_vdi("d").unwrap();
        let entry = store.catalog().unwrap().find("d").unwrap().1;
        let pool = store.pool().clone();
        let (current, slot) = catalog::read_vdi_header(&pool, &entry).unwrap();
        // The current copy gets epoch 9; the other, epoch 5 and a higher
        // generation.
        let addrs = [entry.header_a, entry.header_b];
        let mut newer = current.clone();
        newer.writer_epoch = 9;
        newer.writer_host = 2;
        let mut late = current.clone();
        late.writer_epoch = 5;
        late.writer_host = 1;
        late.generation = current.generation + 5;
        for (h, addr) in [(newer, addrs[slot]), (late, addrs[1 - slot])] {
            let (b, _) = h.encode(pool.meta().store_id, addr);
            pool.meta().write_block(addr, &b, "a test header").unwrap();
        }
        drop(pool);
        drop(store);
        let store = Store::open(dev, &OpenOptions::default()).unwrap();
        let v = store.open_vdi("d").unwrap();
        assert_eq!(v.info().writer_epoch, 9, "the late commit won");
        let mut b = vec![0u8; 4096];
        v.read(&mut b, 0).unwrap();
        assert_eq!(b, vec![1; 4096]);
        drop(v);
        let report = store.check().unwrap();
        assert!(report.is_clean(), "{:?}", report.errors);
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("under epoch 5") && w.contains("ignored")),
            "{:?}",
            report.warnings
        );
    }

    #[test]
    fn settle_commits_idle_disks_and_lets_unused_ones_go() {
        let (dev, store) = store();
        let a = store.create_vdi("a", 1 << 20).unwrap();
        let b = store.create_vdi("b", 1 << 20).unwrap();
        a.write(&[1; 8192], 0).unwrap();
        b.write(&[2; 8192], 0).unwrap();
        drop(b);
        // Not idle long enough: nothing happens.
        let hour = Duration::from_secs(3600);
        assert_eq!(store.settle(hour, hour).unwrap(), SettleReport::default());
        let zero = Duration::ZERO;
        let r = store.settle(zero, zero).unwrap();
        assert_eq!(r.committed, 2);
        // `a` has a handle and stays; `b` goes.
        assert_eq!(r.closed, 1);
        assert_eq!(store.open_disks().len(), 1);
        // Both are on the device, as a second store sees them.
        let other = Store::open(dev, &OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 8192];
        other.open_vdi("b").unwrap().read(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![2; 8192]);
        other.open_vdi("a").unwrap().read(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![1; 8192]);
    }

    #[test]
    fn close_commits_and_refuses_a_disk_in_use() {
        let (_, store) = store();
        let a = store.create_vdi("a", 1 << 20).unwrap();
        a.write(&[3; 4096], 0).unwrap();
        assert!(matches!(store.close_vdi("a"), Err(Error::Busy(_))));
        drop(a);
        store.close_vdi("a").unwrap();
        assert!(store.open_disks().is_empty());
        let report = store.check().unwrap();
        assert!(report.is_clean() && report.leaked_blocks == 0, "{report:?}");
        let mut buf = vec![0u8; 4096];
        store.open_vdi("a").unwrap().read(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![3; 4096]);
    }
}
