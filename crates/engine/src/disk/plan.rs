//! Planned I/O: a READ or WRITE worked out ahead, for callers that move the
//! data themselves (the daemon's io_uring), then finished.
//!
//! A plan names device ranges (`Transfer`s), the parts of a read buffer to
//! fill with zeros, and, for a write, the blocks it allocated. It runs the
//! same way on every device: through the device's file descriptor
//! ([`IoPlan::fd`], io_uring), or through [`IoPlan::execute`], which uses the
//! device's own `read_at`/`write_at`, so the memory and crash devices of the
//! tests carry plans too.
//!
//! Invariants:
//! - While a read plan, or a write plan that writes a block in place,
//!   lives it holds its disk's lock shared (as `Vdi::read` does for its
//!   duration), so the blocks it names cannot be freed or reused, and a
//!   snapshot cannot share a block while it is being written in place.
//! - A write plan whose blocks are all new holds no lock while its data
//!   moves (no one else can see those blocks): a commit or a snapshot does
//!   not wait for it. It takes the lock shared again to publish them
//!   ([`IoPlan::finish`]; [`IoPlan::try_finish`] for threads that must not
//!   wait).
//! - A write plan's new blocks join the disk only in [`IoPlan::finish`]
//!   with `ok`; on failure, or if the plan is dropped unfinished, they go
//!   back to the pool. They are in `Fresh.in_flight` meanwhile, so `gc`
//!   keeps them.
//! - Planning never blocks: it takes the lock with `try_read` and uses
//!   cached tree nodes only; `None` sends the caller to the blocking path.
//!   So does a read of a block the read cache should hold and does not
//!   (see `cached.rs`): the blocking path fetches it once for every reader.

use crate::disk::cached::{CacheScope, Use};
use crate::disk::data::{check_io_range, Runs, FRESH_FOLD_AT};
use crate::disk::state::{Disk, DiskState};
use crate::disk::{Owner, Vdi};
use crate::error::Result;
use crate::pool::Pool;
use crate::tree::Tree;
use parallax_cache::{Hit, ReadCache};
pub use parallax_device::FdTransfer;
use parallax_device::{AlignedBuf, BlockDevice, FdLease, FdWrite};
use parallax_format::{Ptr, BLOCK_SIZE, BLOCK_SIZE_U64};
use parking_lot::{ArcRwLockReadGuard, RawRwLock};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One device transfer of an [`IoPlan`].
#[derive(Debug, Clone)]
pub struct Transfer {
    /// Byte offset on the pool device.
    pub device_offset: u64,
    /// Bytes of the caller's buffer it reads into or writes from.
    pub buf: Range<usize>,
    /// A read of one block the local read cache holds: read there (then
    /// checked), and from `device_offset` only if the copy fails its check.
    pub cached: Option<Hit>,
}

/// The copies a read plan takes from the read cache, to check once they
/// were read by file descriptor ([`IoPlan::take_copy_checks`]).
pub struct CopyChecks {
    cache: Arc<ReadCache>,
    copies: Vec<(Hit, Range<usize>)>,
}

impl CopyChecks {
    /// Whether every copy in `buf` is right. If one is not (it is dropped
    /// from the cache then), the caller reads again the slow way, which
    /// goes to the pool for it.
    pub fn verify(&self, buf: &[u8]) -> bool {
        self.copies
            .iter()
            .all(|(hit, r)| self.cache.verify(hit, &buf[r.clone()]))
    }
}

/// How a read plan uses the read cache.
struct CacheUse {
    cache: Arc<ReadCache>,
    /// The pool's count of data bytes read from it (a copy that fails its
    /// check is read from the pool).
    pool_reads: Arc<AtomicU64>,
}

/// See the module documentation. Keep it until every transfer has
/// completed, then call [`IoPlan::finish`].
pub struct IoPlan {
    pub transfers: Vec<Transfer>,
    /// Read only: ranges of the buffer that read as zeros.
    pub zeros: Vec<Range<usize>>,
    dev: Arc<dyn BlockDevice>,
    /// Read only: the read cache, if the plan reads copies from it.
    cache: Option<Box<CacheUse>>,
    /// Write only: (virtual block, new data block) for the blocks the write
    /// allocated; they join the disk in [`IoPlan::finish`].
    links: Vec<(u64, u64)>,
    /// Write only (and only for writes): the disk written.
    disk: Option<Arc<Disk>>,
    pin: Option<ArcRwLockReadGuard<RawRwLock, DiskState>>,
    /// The pool's descriptor, lent by [`IoPlan::fd_transfers`] until the
    /// plan goes (a write-back log destages nothing while it is out).
    lease: Option<FdLease>,
    /// Write only: the write-back log's records of this write, planned by
    /// descriptor ([`IoPlan::fd_write_transfers`]); they count as written
    /// when the plan finishes, before its blocks join the disk.
    log_write: Option<FdWrite>,
    _owner: Owner,
}

impl IoPlan {
    /// Every transfer as (file descriptor, offset, buffer range), for
    /// callers that move the data themselves (io_uring): the pool's file,
    /// or the read cache's for copies (check those with
    /// [`IoPlan::take_copy_checks`] afterwards). `None` when one is not
    /// behind a file descriptor (memory devices, a copy still in memory):
    /// use [`IoPlan::execute`] then. Keep the plan until the transfers
    /// have completed: it holds the pool's descriptor lent.
    pub fn fd_transfers(&mut self) -> Option<Vec<FdTransfer>> {
        if self.lease.is_none() {
            self.lease = Some(self.dev.lend_fd()?);
        }
        let pool = self.lease.as_ref()?.fd;
        let cache = self.cache.as_ref().and_then(|c| c.cache.device().raw_fd());
        self.transfers
            .iter()
            .map(|t| {
                Some(match &t.cached {
                    None => FdTransfer {
                        fd: pool,
                        offset: t.device_offset,
                        buf: t.buf.clone(),
                    },
                    Some(hit) => FdTransfer {
                        fd: cache?,
                        offset: hit.offset()?,
                        buf: t.buf.clone(),
                    },
                })
            })
            .collect()
    }

    /// A write plan's transfers by file descriptor, for a caller that holds
    /// the write's bytes (`data`) and moves them itself (io_uring). Where
    /// the pool lends its descriptor, those of [`IoPlan::fd_transfers`],
    /// from `data`. Where the pool's writes go to a write-back log, the
    /// log's records of them, placed in the log now, to write from the
    /// buffer [`IoPlan::take_log_records`] hands over (filled from `alloc`:
    /// see [`BlockDevice::plan_fd_write`]); they count as written when the
    /// plan finishes: end it with [`IoPlan::finish_written`] (or
    /// [`IoPlan::try_finish_written`]) and that buffer. `None`: use
    /// [`IoPlan::execute`].
    pub fn fd_write_transfers(
        &mut self,
        data: &[u8],
        alloc: &mut dyn FnMut(usize) -> AlignedBuf,
    ) -> Option<Vec<FdTransfer>> {
        // Only write plans name their disk.
        self.disk.as_ref()?;
        if let Some(t) = self.fd_transfers() {
            return Some(t);
        }
        if self.log_write.is_some() || self.transfers.iter().any(|t| t.buf.end > data.len()) {
            return None;
        }
        let writes: Vec<(u64, &[u8])> = self
            .transfers
            .iter()
            .map(|t| (t.device_offset, &data[t.buf.clone()]))
            .collect();
        let planned = self.dev.plan_fd_write(&writes, alloc)?;
        let transfers = planned.transfers.clone();
        self.log_write = Some(planned);
        Some(transfers)
    }

    /// The write-back log records of a plan carried by
    /// [`IoPlan::fd_write_transfers`], to write instead of the data: take
    /// them right before handing them to the I/O (a plan dropped before
    /// then writes them itself; one whose records were taken and lost
    /// stops the log). `None` for a plan that writes the data itself.
    pub fn take_log_records(&mut self) -> Option<AlignedBuf> {
        self.log_write.as_mut()?.take_buf()
    }

    /// The checks of the copies this plan reads from the read cache, for a
    /// caller that reads them through [`IoPlan::fd_transfers`].
    pub fn take_copy_checks(&mut self) -> Option<CopyChecks> {
        let c = self.cache.as_ref()?;
        let copies = self
            .transfers
            .iter()
            .filter_map(|t| Some((t.cached.clone()?, t.buf.clone())))
            .collect();
        Some(CopyChecks {
            cache: c.cache.clone(),
            copies,
        })
    }

    /// Performs the transfers with the device's own calls: reads fill `buf`
    /// (zeros included), writes take their data from it. Call
    /// [`IoPlan::finish`] afterwards with the outcome.
    pub fn execute(&self, buf: &mut [u8], write: bool) -> std::io::Result<()> {
        for t in &self.transfers {
            let r = t.buf.clone();
            if write {
                self.dev.write_at(&buf[r], t.device_offset)?;
                continue;
            }
            if let (Some(hit), Some(c)) = (&t.cached, &self.cache) {
                if c.cache.read(hit, &mut buf[r.clone()]) {
                    continue;
                }
                // The copy failed its check (and is gone): the pool's
                // block, copied in again under the same version.
                self.dev.read_at(&mut buf[r.clone()], t.device_offset)?;
                c.pool_reads.fetch_add(r.len() as u64, Ordering::Relaxed);
                c.cache
                    .offer(t.device_offset / BLOCK_SIZE_U64, hit.anchor(), &buf[r]);
                continue;
            }
            self.dev.read_at(&mut buf[r], t.device_offset)?;
        }
        if !write {
            for z in &self.zeros {
                buf[z.clone()].fill(0);
            }
        }
        Ok(())
    }

    /// Ends the plan after every transfer has completed. With `ok`, the
    /// blocks a write allocated become part of the disk (visible to reads
    /// from now on); otherwise they go back to the free pool. Dropping a
    /// plan without calling this counts as a failure. May wait briefly for
    /// the disk's lock (see the module documentation).
    pub fn finish(mut self, ok: bool) {
        self.complete(ok, true);
    }

    /// [`IoPlan::finish`] without waiting: gives the plan back if it would
    /// have to wait for the disk's lock (call [`IoPlan::finish`] then, on a
    /// thread that may wait). Boxed: the io_uring reaper holds plans so.
    pub fn try_finish(mut self: Box<Self>, ok: bool) -> std::result::Result<(), Box<IoPlan>> {
        if self.complete(ok, false) {
            Ok(())
        } else {
            Err(self)
        }
    }

    /// [`IoPlan::finish`] for a plan carried by
    /// [`IoPlan::fd_write_transfers`]: `written` is the buffer the
    /// transfers wrote from. Write-back log records count as written first
    /// (written again here, synchronously, unless `ok`), then the blocks
    /// join the disk, so a read that finds them finds their records.
    pub fn finish_written(mut self, ok: bool, written: &[u8]) {
        if let Some(log_write) = self.log_write.take() {
            log_write.end(ok, written);
        }
        self.finish(ok);
    }

    /// [`IoPlan::finish_written`] without waiting: gives the plan back if
    /// it would have to wait (for the disk's lock, or, after a failure, to
    /// write the log's records again: call [`IoPlan::finish_written`] then,
    /// with a copy of `written`).
    pub fn try_finish_written(
        mut self: Box<Self>,
        ok: bool,
        written: &[u8],
    ) -> std::result::Result<(), Box<IoPlan>> {
        if self.log_write.is_some() && !ok {
            return Err(self);
        }
        if let Some(log_write) = self.log_write.take() {
            log_write.end(true, written);
        }
        self.try_finish(ok)
    }

    /// Whether the plan's transfers write a write-back log's records
    /// (finish it with [`IoPlan::finish_written`]).
    pub fn writes_log_records(&self) -> bool {
        self.log_write.is_some()
    }

    /// Publishes or gives back the plan's new blocks; `false` if that
    /// needed the lock and `wait` is off.
    fn complete(&mut self, ok: bool, wait: bool) -> bool {
        if self.links.is_empty() {
            return true;
        }
        let Some(disk) = &self.disk else {
            return true;
        };
        if !ok {
            disk.abandon_fresh(&self.links);
            self.links.clear();
            return true;
        }
        // A deleted disk gives its blocks back: nothing to report.
        match &self.pin {
            Some(pin) => {
                let _ = disk.publish_fresh(pin, &self.links, true);
            }
            None => {
                let st = if wait {
                    Some(disk.state.read())
                } else {
                    disk.state.try_read()
                };
                let Some(st) = st else {
                    return false;
                };
                let _ = disk.publish_fresh(&st, &self.links, true);
            }
        }
        self.links.clear();
        true
    }
}

impl Drop for IoPlan {
    fn drop(&mut self) {
        // Never waits: a failure needs no lock.
        self.complete(false, false);
    }
}

impl std::fmt::Debug for IoPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoPlan")
            .field("transfers", &self.transfers)
            .field("zeros", &self.zeros)
            .finish()
    }
}

/// Works out a block-aligned read of `len` bytes at `offset` of a tree of
/// `size` bytes (and the fresh writes of `disk`), with cached nodes only:
/// a read plan holding `pin`. `None` if the range is not block-aligned or
/// a node is not in memory.
#[allow(clippy::too_many_arguments)]
pub(super) fn plan_read(
    pool: &Pool,
    owner: &Owner,
    tree: &Tree,
    size: u64,
    disk: Option<&Disk>,
    scope: &CacheScope,
    offset: u64,
    len: usize,
) -> Result<Option<IoPlan>> {
    check_io_range(size, offset, len as u64)?;
    let Some(found) = cached_entries(pool, tree, disk, offset, len)? else {
        return Ok(None);
    };
    let cache = pool.read_cache();
    let mut runs = Runs::default();
    let mut zeros: Vec<Range<usize>> = Vec::new();
    let mut hits = Vec::new();
    let mut misses = 0u64;
    let mut from_pool = 0u64;
    for (k, (entry, writable)) in found.into_iter().enumerate() {
        let start = k * BLOCK_SIZE;
        if entry.is_null() {
            match zeros.last_mut() {
                Some(z) if z.end == start => z.end += BLOCK_SIZE,
                _ => zeros.push(start..start + BLOCK_SIZE),
            }
            continue;
        }
        let addr = entry.addr();
        if let Some(cache) = cache {
            let u = scope.for_block(writable);
            if u != Use::Skip {
                match cache.probe(addr, |a| scope.accepts(a)) {
                    Some(hit) => {
                        hits.push(Transfer {
                            device_offset: addr * BLOCK_SIZE_U64,
                            buf: start..start + BLOCK_SIZE,
                            cached: Some(hit),
                        });
                        continue;
                    }
                    // A block to fetch and file goes to the blocking path,
                    // where readers of one block wait for one pool read.
                    None if u != Use::LookUp => return Ok(None),
                    None => misses += 1,
                }
            }
        }
        from_pool += BLOCK_SIZE_U64;
        runs.push(k as u64, addr);
    }
    pool.count_data_read(from_pool);
    if let Some(cache) = cache.filter(|_| misses > 0) {
        cache.count(false, misses);
    }
    let mut transfers = runs.into_transfers();
    let cache = cache.filter(|_| !hits.is_empty()).map(|cache| {
        cache.count(true, hits.len() as u64);
        Box::new(CacheUse {
            cache: cache.clone(),
            pool_reads: pool.data_read_counter(),
        })
    });
    transfers.extend(hits);
    Ok(Some(IoPlan {
        transfers,
        zeros,
        dev: pool.meta().dev.clone(),
        cache,
        links: Vec::new(),
        disk: None,
        pin: None,
        lease: None,
        log_write: None,
        _owner: owner.clone(),
    }))
}

/// The entries of the blocks of an aligned range, from cached nodes and
/// fresh writes only; `None` when that cannot be done without I/O.
fn cached_entries(
    pool: &Pool,
    tree: &Tree,
    disk: Option<&Disk>,
    offset: u64,
    len: usize,
) -> Result<Option<Vec<(Ptr, bool)>>> {
    if !offset.is_multiple_of(BLOCK_SIZE_U64) || !len.is_multiple_of(BLOCK_SIZE) || len == 0 {
        return Ok(None);
    }
    let first = offset / BLOCK_SIZE_U64;
    let end = first + (len / BLOCK_SIZE) as u64;
    let mut found = Vec::with_capacity(len / BLOCK_SIZE);
    let complete = tree.for_each_cached_entry(pool.meta(), first, end, &mut |_, e, w| {
        found.push((e, w));
        Ok(())
    })?;
    if !complete {
        return Ok(None);
    }
    if let Some(disk) = disk {
        disk.overlay_fresh(first, &mut found);
    }
    Ok(Some(found))
}

impl Vdi {
    /// Plans a READ for the caller to perform (see [`IoPlan`]). Never
    /// blocks: `Ok(None)` when the disk's lock is taken exclusively, the
    /// range is not block-aligned or a tree node is not in memory; then use
    /// [`Vdi::read`].
    pub fn try_plan_read(&self, offset: u64, len: usize) -> Result<Option<IoPlan>> {
        let disk = &self.disk;
        disk.used();
        let Some(st) = disk.state.try_read_arc() else {
            return Ok(None);
        };
        disk.usable(&st)?;
        let plan = plan_read(
            &disk.pool,
            &self.owner,
            &st.tree,
            st.size,
            Some(disk),
            &CacheScope::live(&st),
            offset,
            len,
        )?;
        Ok(plan.map(|mut p| {
            p.pin = Some(st);
            p
        }))
    }

    /// Plans a block-aligned WRITE for the caller to perform (see
    /// [`IoPlan`]): blocks the disk owns are written in place, the others
    /// get new blocks now, which join the disk when the caller calls
    /// [`IoPlan::finish`] after the transfers. Never blocks: `Ok(None)`
    /// for the reasons of [`Vdi::try_plan_read`] or when the store is full;
    /// then use [`Vdi::write`].
    pub fn try_plan_write(&self, offset: u64, len: usize) -> Result<Option<IoPlan>> {
        let disk = &self.disk;
        let Some(st) = disk.state.try_read_arc() else {
            return Ok(None);
        };
        disk.usable(&st)?;
        check_io_range(st.size, offset, len as u64)?;
        let Some(found) = cached_entries(&disk.pool, &st.tree, Some(disk), offset, len)? else {
            return Ok(None);
        };
        let first = offset / BLOCK_SIZE_U64;
        let count = found.len() as u64;
        // Device block of each block of the request: owned ones now, new
        // ones once allocated.
        let mut addrs: Vec<Option<u64>> = found
            .iter()
            .map(|&(entry, writable)| writable.then(|| entry.addr()))
            .collect();
        let missing: Vec<usize> = (0..addrs.len()).filter(|&k| addrs[k].is_none()).collect();
        let mut links = Vec::new();
        if !missing.is_empty() {
            if disk.fresh.lock().map.len() > FRESH_FOLD_AT {
                // The blocking path folds the backlog into the tree.
                return Ok(None);
            }
            let Ok(allocated) = disk.allocate_fresh(&st, first, count, missing.len()) else {
                return Ok(None);
            };
            for (&k, addr) in missing.iter().zip(allocated) {
                addrs[k] = Some(addr);
                links.push((first + k as u64, addr));
            }
        }
        disk.touch();
        let mut runs = Runs::default();
        for (k, addr) in addrs.into_iter().enumerate() {
            if let Some(addr) = addr {
                runs.push(k as u64, addr);
            }
        }
        // Only new blocks: nothing to hold the disk for while they move.
        let in_place = links.len() < found.len();
        Ok(Some(IoPlan {
            transfers: runs.into_transfers(),
            zeros: Vec::new(),
            dev: disk.pool.meta().dev.clone(),
            cache: None,
            links,
            disk: Some(disk.clone()),
            pin: in_place.then_some(st),
            lease: None,
            log_write: None,
            _owner: self.owner.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{CreateOptions, Store};
    use crate::ReadDisk;
    use parallax_device::MemDevice;
    use std::sync::Arc;

    fn store() -> Store {
        let dev = Arc::new(MemDevice::new(16 << 20));
        Store::create(dev, &CreateOptions::default()).unwrap()
    }

    #[test]
    fn a_plan_runs_on_a_device_without_a_descriptor() {
        let store = store();
        let d = store.create_vdi("d", 1 << 20).unwrap();
        let mut plan = d.try_plan_write(8192, 8192).unwrap().expect("a plan");
        assert!(plan.fd_transfers().is_none());
        plan.execute(&mut vec![5; 8192], true).unwrap();
        plan.finish(true);
        let plan = d.try_plan_read(4096, 3 * 4096).unwrap().expect("a plan");
        let mut buf = vec![0xee; 3 * 4096];
        plan.execute(&mut buf, false).unwrap();
        plan.finish(true);
        assert!(buf[..4096].iter().all(|&b| b == 0), "a hole read as zeros");
        assert!(buf[4096..].iter().all(|&b| b == 5));
    }

    #[test]
    fn an_unfinished_or_failed_plan_gives_its_blocks_back() {
        let store = store();
        let d = store.create_vdi("d", 1 << 20).unwrap();
        d.flush().unwrap();
        let used = store.stats().used_bytes;
        let plan = d.try_plan_write(0, 4 * 4096).unwrap().expect("a plan");
        assert!(
            store.stats().used_bytes > used,
            "the plan allocated nothing"
        );
        drop(plan);
        assert_eq!(store.stats().used_bytes, used, "a dropped plan leaked");
        let plan = d.try_plan_write(0, 4 * 4096).unwrap().expect("a plan");
        plan.finish(false);
        assert_eq!(store.stats().used_bytes, used, "a failed plan leaked");
        let mut buf = vec![1u8; 4 * 4096];
        d.read(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "a failed write became visible");
    }

    /// A plan that writes in place holds its disk's lock shared until it
    /// is finished: a snapshot waits for the data to finish moving (else
    /// it could share a block a write is still changing).
    #[test]
    fn an_in_place_plan_holds_off_snapshots_until_it_is_finished() {
        let store = store();
        let d = store.create_vdi("d", 1 << 20).unwrap();
        d.write(&[1; 2 * 4096], 0).unwrap();
        d.flush().unwrap();
        let plan = d.try_plan_write(0, 2 * 4096).unwrap().expect("a plan");
        plan.execute(&mut vec![9; 2 * 4096], true).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let d2 = d.clone();
        let t = std::thread::spawn(move || {
            d2.snapshot(Some("s")).unwrap();
            tx.send(()).unwrap();
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            rx.try_recv().is_err(),
            "a snapshot went past an in-place plan in flight"
        );
        plan.finish(true);
        t.join().unwrap();
        let view = store.open_snapshot("d", "s").unwrap();
        let mut buf = vec![0u8; 2 * 4096];
        view.read(&mut buf, 0).unwrap();
        assert!(
            buf.iter().all(|&b| b == 9),
            "the snapshot missed the planned write"
        );
        let report = store.check().unwrap();
        assert!(report.is_clean() && report.leaked_blocks == 0, "{report:?}");
    }

    /// A plan that only writes new blocks holds nothing while its data
    /// moves: a snapshot goes ahead (the write, not finished, is not in
    /// it), and the blocks join the live disk when the plan finishes.
    #[test]
    fn a_plan_of_new_blocks_does_not_hold_off_snapshots() {
        let store = store();
        let d = store.create_vdi("d", 1 << 20).unwrap();
        let plan = d.try_plan_write(0, 2 * 4096).unwrap().expect("a plan");
        plan.execute(&mut vec![9; 2 * 4096], true).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let d2 = d.clone();
        let t = std::thread::spawn(move || tx.send(d2.snapshot(Some("s")).is_ok()).unwrap());
        let taken = rx.recv_timeout(std::time::Duration::from_secs(2));
        Box::new(plan).try_finish(true).expect("the lock is free");
        assert_eq!(
            taken,
            Ok(true),
            "a snapshot waited for a plan of new blocks"
        );
        t.join().unwrap();
        let mut buf = vec![0u8; 2 * 4096];
        store
            .open_snapshot("d", "s")
            .unwrap()
            .read(&mut buf, 0)
            .unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "an unfinished write is in the snapshot"
        );
        d.read(&mut buf, 0).unwrap();
        assert!(
            buf.iter().all(|&b| b == 9),
            "the finished write is not in the disk"
        );
        d.flush().unwrap();
        let report = store.check().unwrap();
        assert!(report.is_clean() && report.leaked_blocks == 0, "{report:?}");
    }

    #[test]
    fn a_snapshot_view_plans_reads_too() {
        let store = store();
        let d = store.create_vdi("d", 1 << 20).unwrap();
        d.write(&[3; 4096], 0).unwrap();
        d.snapshot(Some("s")).unwrap();
        d.write(&[4; 4096], 0).unwrap();
        let view = store.open_snapshot("d", "s").unwrap();
        let mut buf = vec![0u8; 4096];
        // Node not cached yet: fall back, then plan.
        view.read(&mut buf, 0).unwrap();
        let plan = view.try_plan_read(0, 4096).unwrap().expect("a plan");
        plan.execute(&mut buf, false).unwrap();
        plan.finish(true);
        assert_eq!(buf, vec![3; 4096]);
    }
}
