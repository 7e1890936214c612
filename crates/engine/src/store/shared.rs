//! What a shared-mode store does beyond a single one with the disks other
//! hosts write (docs/CLUSTER.md): reading their snapshots, reclaiming
//! deleted ones only when no host reads or clones them ("Snapshots across
//! hosts"), taking over a disk whose holder did not let it go
//! ([`Store::take_over`]), handing a disk to another host
//! ([`Store::hand_off`]), and taking back, after a lost lease was renewed,
//! the disks nobody took meanwhile ("A lost lease, renewed").
//!
//! Invariants:
//! - A host reads a snapshot of a disk it does not have open only through
//!   a view pinned cluster-wide ([`Coordinator::pin_snapshot`]), taken under
//!   the catalogue lock after finding the snapshot in the disk's committed
//!   log on the pool.
//! - A clone of such a snapshot is registered under the same lock, after
//!   the same read.
//! - A holder reclaims a hidden version only under the catalogue lock,
//!   with the clone counts re-read and the cluster's pins in hand, and
//!   keeps the lock until that commit is durable.
//!
//! - A disk is opened with a header commit under this host's epoch before
//!   anything is written; one not let go is opened only by a takeover,
//!   after the grace; one opened under a lost lease is written again only
//!   once its key is taken back with its header unchanged on the pool.
//!
//! The catalogue lock serialises the first three, so a reader or a cloner
//! either finds the snapshot before the holder looks at its pins and
//! clones (and the holder then keeps it, hidden), or finds it gone.
//!
//! [`Coordinator::pin_snapshot`]: crate::coord::Coordinator::pin_snapshot

use crate::disk::{extents_at_root, log, read_at_root, Extent, Holds, SnapshotView, Vdi};
use crate::error::{Error, Result};
use crate::lineage::SnapshotInfo;
use crate::store::catalog::{read_vdi_header, Catalog};
use crate::store::Store;
use crate::time::now_ns;
use parallax_format::{DiskRef, RegistryEntry};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long a disk whose hidden versions something still held waits before
/// the store looks at them again (pins and clones of other hosts go away
/// without telling the holder).
const RECLAIM_RETRY: Duration = Duration::from_secs(5);

/// Reads of a disk held elsewhere tried before giving up (see
/// [`Store::read_committed`]).
const COMMITTED_READ_TRIES: usize = 10;

/// How often [`Store::claim`] looks whether a disk it asked for is free.
const CLAIM_POLL: Duration = Duration::from_millis(20);

/// How often [`Store::claim`] tries again to open a disk whose key stays
/// free (a disk whose holder died, waiting for its takeover).
const CLAIM_RETRY: Duration = Duration::from_millis(250);

/// A disk read as its newest commit on the pool has it, without opening
/// it: what a client of this host waiting for a disk another host holds
/// reads until it writes (QEMU's migration destination reads the first
/// sector when it starts, while the source still runs). It sees every
/// write the holder's clients flushed; of those they did not, only some
/// (the ones made in place, in blocks the commit owns). Once this host
/// holds the disk, reads go through it (with what its clients wrote).
///
/// Invariant: a read of a commit is kept only if the disk's newest header
/// is still that commit after it (its holder frees a block of an older
/// commit only once a newer header is durable); otherwise it is made again,
/// [`Error::Busy`] after [`COMMITTED_READ_TRIES`].
pub struct CommittedHead {
    entry: RegistryEntry,
    store: Store,
}

impl CommittedHead {
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let Some(vdi) = self.held_here() {
            return vdi.read(buf, offset);
        }
        self.at_newest_commit(|pool, header| {
            read_at_root(pool, header.root, header.size_bytes, buf, offset)
        })
    }

    /// Allocation status, as [`Vdi::block_status`].
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        if let Some(vdi) = self.held_here() {
            return vdi.block_status(offset, len);
        }
        self.at_newest_commit(|pool, header| {
            extents_at_root(pool, header.root, header.size_bytes, offset, len)
        })
    }

    /// A handle on the disk if this host has it open now.
    fn held_here(&self) -> Option<Vdi> {
        let inner = &self.store.inner;
        let disk = inner.open.lock().get(&self.entry.vdi_id).cloned()?;
        Some(self.store.handle(disk))
    }

    /// Runs `f` on the disk's newest header on the pool, again while the
    /// header changed under it.
    fn at_newest_commit<T>(
        &self,
        mut f: impl FnMut(&crate::pool::Pool, &parallax_format::VdiHeader) -> Result<T>,
    ) -> Result<T> {
        let pool = &self.store.inner.pool;
        let stamp = |h: &parallax_format::VdiHeader| (h.writer_epoch, h.generation);
        for _ in 0..COMMITTED_READ_TRIES {
            let (header, _) = read_vdi_header(pool, &self.entry)?;
            let outcome = f(pool, &header);
            let (now, _) = read_vdi_header(pool, &self.entry)?;
            if stamp(&now) == stamp(&header) {
                return outcome;
            }
        }
        Err(Error::Busy(format!(
            "disk {} committed under every one of {COMMITTED_READ_TRIES} reads",
            self.entry.name
        )))
    }
}

/// What [`Store::take_over`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TakeoverReport {
    /// The host whose commit the disk was at, and its epoch.
    pub from_host: u64,
    pub from_epoch: u64,
    /// This host's epoch, in the takeover commit.
    pub epoch: u64,
    /// Waiting for the old holder's key to go (its lease to end).
    pub waited_for_key: Duration,
    /// The grace waited after that (0 when the disk had been let go).
    pub grace: Duration,
    /// False when there was nothing to take over (the disk was let go
    /// cleanly, or this host had it open already).
    pub taken_over: bool,
}

/// What [`Store::hand_off`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandoffReport {
    /// The writer epoch this host held the disk under.
    pub epoch: u64,
    pub to: u64,
    /// From the call to the key given back.
    pub took: Duration,
}

impl Store {
    /// Hands disk `name`, which this host holds, to host `to`: waits for
    /// the requests in flight, commits everything (durable), then every
    /// later operation through this host's handles fails ("handed off to
    /// host N"), and the writer key goes back reserved for `to`, which
    /// opens the disk from that commit (no takeover: the release is
    /// clean). Other hosts are refused the disk meanwhile.
    pub fn hand_off(&self, name: &str, to: u64) -> Result<HandoffReport> {
        self.hand_off_if(name, to, None)
    }

    /// [`Store::hand_off`], with `quiet`: only if the disk's clients here
    /// are done with it (everything they wrote flushed, and no request for
    /// `quiet`), checked once the requests in flight are done; otherwise
    /// [`Error::Busy`] and the disk stays here, untouched.
    fn hand_off_if(&self, name: &str, to: u64, quiet: Option<Duration>) -> Result<HandoffReport> {
        let coord = self.inner.pool.coordinator().cloned().ok_or_else(|| {
            Error::InvalidArgument("handing a disk off needs cluster mode (--etcd)".into())
        })?;
        if to == 0 || to == coord.host_id() {
            return Err(Error::InvalidArgument(format!(
                "cannot hand a disk off to host {to}: it must be another appliance"
            )));
        }
        let start = std::time::Instant::now();
        // With a write-back log, most of what the disk wrote reaches the
        // pool before anything is held (the rest once it is sealed).
        let pool = &self.inner.pool;
        pool.drain_log_to(pool.shared_log_mark(), "before a hand-off")?;
        let catalog = self.catalog()?;
        let entry = find(&catalog, name)?;
        let disk = self
            .inner
            .open
            .lock()
            .get(&entry.vdi_id)
            .cloned()
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "disk {name} is not held by this appliance (host {})",
                    coord.host_id()
                ))
            })?;
        let epoch = disk.seal_for_hand_off(to, quiet)?;
        // `to` reads the disk from the pool: everything committed is there.
        if let Err(e) = disk.drain_log() {
            disk.unseal();
            return Err(e);
        }
        self.inner.open.lock().remove(&entry.vdi_id);
        if let Err(e) = coord.hand_over(entry.vdi_id, epoch, to) {
            // Still ours: back in service.
            disk.unseal();
            self.adopt(disk);
            return Err(e);
        }
        drop(catalog);
        Ok(HandoffReport {
            epoch,
            to,
            took: start.elapsed(),
        })
    }

    /// Opens disk `name` to write it, asking for it if another host holds
    /// it: the lease following a migrating VM. The request stands (under
    /// this host's lease) until the disk is opened here or `wait` passed;
    /// the holder hands the disk over once its own clients are done with
    /// it ([`Store::yield_requested`]), never while they use it. A disk
    /// whose holder died is opened once it is taken over (by this host's
    /// `--takeover` or the operator). [`Error::Busy`] after `wait`.
    pub fn claim(&self, name: &str, wait: Duration) -> Result<Vdi> {
        let start = std::time::Instant::now();
        let why = match self.open_vdi(name) {
            Err(Error::Busy(why)) => why,
            other => return other,
        };
        let Some(coord) = self.inner.pool.coordinator().cloned() else {
            return Err(Error::Busy(why));
        };
        if wait.is_zero() {
            return Err(Error::Busy(why));
        }
        let vdi_id = self.peek_info(name)?.id;
        coord.request_writer(vdi_id)?;
        let claimed = self.claim_asked(name, vdi_id, &*coord, start, wait);
        // Always: a request left standing would move the disk here later,
        // with no client waiting for it.
        coord.withdraw_request(vdi_id);
        claimed
    }

    /// [`Store::claim`] once the request stands: tries to open the disk
    /// again (under the catalogue lock) once its key is free or this
    /// host's (a takeover here done), at once the first time it is seen
    /// free (a hand-off to this host), then at most every [`CLAIM_RETRY`]
    /// while it stays free (a disk not let go, waiting for its takeover).
    fn claim_asked(
        &self,
        name: &str,
        vdi_id: u64,
        coord: &dyn crate::coord::Coordinator,
        start: std::time::Instant,
        wait: Duration,
    ) -> Result<Vdi> {
        let mut failed_while_free = false;
        loop {
            let tried = std::time::Instant::now();
            let mut free = false;
            while !free {
                if start.elapsed() >= wait {
                    let why = match self.open_vdi(name) {
                        Err(Error::Busy(why)) => why,
                        other => return other,
                    };
                    return Err(Error::Busy(format!(
                        "{why}; its holder did not give it up within {wait:?}"
                    )));
                }
                std::thread::sleep(CLAIM_POLL);
                free = match coord.writer_host(vdi_id)? {
                    None => !failed_while_free || tried.elapsed() >= CLAIM_RETRY,
                    Some(h) => h == coord.host_id() && self.open_disk_ids().contains(&vdi_id),
                };
            }
            match self.open_vdi(name) {
                Err(Error::Busy(_)) => failed_while_free = true,
                other => return other,
            }
        }
    }

    /// Disk `name` as its newest commit on the pool has it, for reading
    /// without opening it (another host may hold it): see
    /// [`CommittedHead`].
    pub fn committed_head(&self, name: &str) -> Result<CommittedHead> {
        let catalog = self.catalog()?;
        Ok(CommittedHead {
            entry: find(&catalog, name)?,
            store: self.clone(),
        })
    }

    /// Hands over every disk held here that another host asks for
    /// ([`Store::claim`]) and whose clients here are done with it
    /// (everything they wrote flushed, nothing asked for `quiet`): to the
    /// host that asked first. A disk in use stays here; it is looked at
    /// again at the next call. Returns the disks handed over.
    pub fn yield_requested(&self, quiet: Duration) -> Result<Vec<(String, HandoffReport)>> {
        let Some(coord) = self.inner.pool.coordinator().cloned() else {
            return Ok(Vec::new());
        };
        if self.inner.open.lock().is_empty() {
            return Ok(Vec::new());
        }
        let mut handed = Vec::new();
        let mut looked_at = std::collections::HashSet::new();
        for (vdi_id, host) in coord.writer_requests()? {
            if host == coord.host_id() || !looked_at.insert(vdi_id) {
                continue;
            }
            let Some(disk) = self.inner.open.lock().get(&vdi_id).cloned() else {
                continue;
            };
            if !disk.is_quiet(quiet) {
                continue;
            }
            let Ok(name) = disk.read_state().map(|st| st.name().to_string()) else {
                continue;
            };
            drop(disk);
            match self.hand_off_if(&name, host, Some(quiet)) {
                Ok(report) => handed.push((name, report)),
                Err(Error::Busy(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(handed)
    }

    /// Takes over disk `name`, whose holder did not let it go (it died, or
    /// lost its lease while running): waits up to `wait` for its writer key
    /// (the old lease to end), then `grace` with the key held (whatever the
    /// old holder still had in flight lands, or not, before this host
    /// writes anything), then opens the disk from its last valid commit
    /// and writes the takeover commit under this host's epoch. A commit of
    /// the old holder that lands later has the older epoch and is ignored
    /// (see `catalog::newer_header`). A disk that was let go cleanly is
    /// simply opened.
    pub fn take_over(
        &self,
        name: &str,
        wait: Duration,
        grace: Duration,
    ) -> Result<(Vdi, TakeoverReport)> {
        let coord = self.inner.pool.coordinator().cloned().ok_or_else(|| {
            Error::InvalidArgument("taking a disk over needs cluster mode (--etcd)".into())
        })?;
        let start = std::time::Instant::now();
        let mut report = TakeoverReport::default();
        let (entry, header) = loop {
            let catalog = self.catalog()?;
            let entry = find(&catalog, name)?;
            if let Some(d) = self.inner.open.lock().get(&entry.vdi_id).cloned() {
                return Ok((self.handle(d), report));
            }
            if !self.inner.taking_over.lock().insert(entry.vdi_id) {
                // Another thread of this appliance is at it: wait for it.
                if start.elapsed() >= wait {
                    return Err(Error::Busy(format!(
                        "disk {name}: this appliance is taking it over already"
                    )));
                }
                drop(catalog);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            match coord.acquire_writer(entry.vdi_id) {
                Ok(epoch) => {
                    report.epoch = epoch;
                    let (h, _) = read_vdi_header(&self.inner.pool, &entry)
                        .inspect_err(|_| self.end_take_over(&entry, epoch))?;
                    break (entry, h);
                }
                Err(Error::Busy(_)) if start.elapsed() < wait => {
                    self.inner.taking_over.lock().remove(&entry.vdi_id);
                    drop(catalog);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    self.inner.taking_over.lock().remove(&entry.vdi_id);
                    return Err(e);
                }
            }
        };
        report.waited_for_key = start.elapsed();
        report.from_host = header.writer_host;
        report.from_epoch = header.writer_epoch;
        let released = coord
            .released_epoch(entry.vdi_id)
            .inspect_err(|_| self.end_take_over(&entry, report.epoch))?;
        report.taken_over = header.writer_epoch != 0
            && header.writer_epoch != released
            && header.writer_epoch != report.epoch;
        if report.taken_over {
            if let Err(e) = self.refuse_if_in_a_log(&entry, &header) {
                self.end_take_over(&entry, report.epoch);
                return Err(e);
            }
        }
        if report.taken_over {
            std::thread::sleep(grace);
            report.grace = grace;
        }
        let opened = self
            .catalog()
            .and_then(|catalog| self.open_entry_as(&catalog, &entry, true));
        self.inner.taking_over.lock().remove(&entry.vdi_id);
        match opened {
            Ok(vdi) => Ok((vdi, report)),
            Err(e) => {
                coord.release_writer(entry.vdi_id, report.epoch);
                Err(e)
            }
        }
    }

    /// Shared mode, the store's upkeep after this host lost its lease and
    /// got a new one: takes back the writer key of every open disk whose key
    /// died with the old lease, if no other host took the disk meanwhile
    /// (its newest header on the pool still carries this host's old
    /// epoch), and commits its header under the new epoch before anything
    /// else is written. A disk another host took (or holds) is let go:
    /// every operation on it here fails from then on. Returns the disks
    /// taken back and those let go.
    pub(super) fn reacquire_in_cluster(&self) -> Result<(u64, u64)> {
        let Some(coord) = self.inner.pool.coordinator().cloned() else {
            return Ok((0, 0));
        };
        let stale: Vec<_> = self
            .open_disks()
            .into_iter()
            .filter(|d| !d.key_is_current())
            .collect();
        if stale.is_empty() || !coord.may_write() {
            return Ok((0, 0));
        }
        let (mut back, mut lost) = (0, 0);
        let catalog = self.catalog()?;
        for disk in stale {
            let incarnation = coord.incarnation();
            let entry = catalog.by_id(disk.id());
            let ours = entry
                .as_ref()
                .and_then(|e| read_vdi_header(&self.inner.pool, e).ok());
            let taken_back = match (entry, ours) {
                (Some(entry), Some((h, _))) if h.writer_epoch == disk.writer_epoch() => {
                    match coord.acquire_writer(entry.vdi_id) {
                        Ok(epoch) => {
                            // Unchanged since the key was taken: nobody
                            // committed in between (a takeover commits
                            // first).
                            let still = read_vdi_header(&self.inner.pool, &entry)
                                .is_ok_and(|(h2, _)| h2.generation == h.generation);
                            if still {
                                disk.rekey(epoch, incarnation);
                                disk.commit_header().is_ok()
                            } else {
                                coord.release_writer(entry.vdi_id, epoch);
                                false
                            }
                        }
                        Err(_) => false,
                    }
                }
                _ => false,
            };
            if taken_back {
                back += 1;
            } else {
                lost += 1;
                disk.mark_lost();
                self.inner.open.lock().remove(&disk.id());
            }
        }
        Ok((back, lost))
    }

    /// A take-over that stops before opening: the key goes back.
    fn end_take_over(&self, entry: &RegistryEntry, epoch: u64) {
        self.inner.taking_over.lock().remove(&entry.vdi_id);
        if let Some(c) = self.inner.pool.coordinator() {
            c.release_writer(entry.vdi_id, epoch);
        }
    }

    /// A read-only view of `disk@snapshot`. In shared mode, a disk this
    /// host does not have open is not opened (that would take its writer
    /// key): the snapshot is read from its committed log and pinned
    /// cluster-wide while the view lives. A snapshot another host took is
    /// seen once its commit is on the pool.
    pub fn open_snapshot(&self, disk: &str, snapshot: &str) -> Result<SnapshotView> {
        if !self.is_shared() {
            return self.open_vdi(disk)?.open_snapshot(snapshot);
        }
        let catalog = self.catalog()?;
        let entry = find(&catalog, disk)?;
        let held = self.inner.open.lock().get(&entry.vdi_id).cloned();
        if let Some(d) = held {
            return self.handle(d).open_snapshot(snapshot);
        }
        let info = self.committed_snapshot(&entry, snapshot)?;
        SnapshotView::pinned_in_cluster(
            &self.inner.pool,
            self.inner.clone(),
            entry.vdi_id,
            entry.name,
            info,
        )
    }

    /// The visible snapshots of disk `disk` as its last commit on the pool
    /// has them, oldest first, without opening it (shared mode: another
    /// host may hold it).
    pub fn committed_snapshots(&self, disk: &str) -> Result<Vec<SnapshotInfo>> {
        let catalog = self.catalog()?;
        let entry = find(&catalog, disk)?;
        let (header, _) = read_vdi_header(&self.inner.pool, &entry)?;
        self.refuse_if_in_a_log(&entry, &header)?;
        log::committed_snapshots(&self.inner.pool, &header)
    }

    /// Shared mode, under the catalogue lock: snapshot `snapshot` of
    /// `entry` as its committed log on the pool has it.
    pub(super) fn committed_snapshot(
        &self,
        entry: &RegistryEntry,
        snapshot: &str,
    ) -> Result<SnapshotInfo> {
        let (header, _) = read_vdi_header(&self.inner.pool, entry)?;
        self.refuse_if_in_a_log(entry, &header)?;
        log::committed_snapshot(&self.inner.pool, &header, snapshot)?.ok_or_else(|| {
            Error::NotFound(format!(
                "snapshot {} does not exist (one another appliance took is seen once it is committed)",
                DiskRef::snapshot(&entry.name, snapshot)
            ))
        })
    }

    /// Shared mode, under the catalogue lock: refuses to delete disk
    /// `entry` while any host reads one of its snapshots.
    pub(super) fn refuse_if_pinned(&self, entry: &RegistryEntry) -> Result<()> {
        let Some(coord) = self.inner.pool.coordinator() else {
            return Ok(());
        };
        let pinned = coord.pinned_snapshots(entry.vdi_id)?;
        if pinned.is_empty() {
            return Ok(());
        }
        Err(Error::Busy(format!(
            "disk {}: {} of its snapshots are being read on some appliance; close those exports first",
            entry.name,
            pinned.len()
        )))
    }

    /// Shared mode, the store's upkeep: for every open disk with hidden
    /// versions that a deletion hid since the last pass (or that waited
    /// [`RECLAIM_RETRY`]), reclaims those nothing holds any more, under the
    /// catalogue lock. Returns the blocks freed.
    pub(super) fn reclaim_in_cluster(&self) -> Result<u64> {
        self.reclaim_hidden_when(false)
    }

    /// Shared mode: reclaims now the hidden versions of this host's open
    /// disks that nothing holds any more (a clone deleted or a view closed
    /// on another host is otherwise noticed within [`RECLAIM_RETRY`]).
    /// Returns the blocks freed. Without shared mode, nothing to do (0).
    pub fn reclaim_hidden(&self) -> Result<u64> {
        self.reclaim_hidden_when(true)
    }

    fn reclaim_hidden_when(&self, now_anyway: bool) -> Result<u64> {
        let Some(coord) = self.inner.pool.coordinator().cloned() else {
            return Ok(0);
        };
        let mut freed = 0;
        for disk in self.open_disks() {
            let now = now_ns();
            if disk.try_hidden_versions().unwrap_or(0) == 0
                || (!now_anyway && disk.reclaim_after_ns.load(Ordering::Relaxed) > now)
            {
                continue;
            }
            disk.reclaim_after_ns
                .store(now + RECLAIM_RETRY.as_nanos() as u64, Ordering::Relaxed);
            // Re-reads the catalogue: the clone counts of other hosts.
            let _catalog = self.catalog()?;
            let pinned = coord.pinned_snapshots(disk.id())?;
            let mut st = disk.exclusive()?;
            if !st.is_live() {
                continue;
            }
            freed += disk
                .delete_versions(&mut st, &[], Holds::Cluster(&pinned))?
                .freed_blocks;
            drop(st);
            // On the pool before the lock goes: a host that pins a
            // snapshot next must not find one this commit reclaimed.
            let pool = &self.inner.pool;
            pool.drain_log_to(pool.shared_log_mark(), "after reclaiming snapshots")?;
        }
        Ok(freed)
    }

    /// Shared mode: refuses to take over, or read the snapshots of, disk
    /// `entry` (whose newest header on the pool is `header`) while its last
    /// holder is down and names a write-back log: the disk's newest
    /// commits may be only there, and the pool's header is older (its
    /// snapshot list too, so a snapshot the log deleted would look alive).
    /// A holder that runs keeps the key, drains before letting the disk
    /// go, and looks at pins before reclaiming: nothing to refuse then.
    pub(super) fn refuse_if_in_a_log(
        &self,
        entry: &RegistryEntry,
        header: &parallax_format::VdiHeader,
    ) -> Result<()> {
        let Some(c) = self.inner.pool.coordinator() else {
            return Ok(());
        };
        let holder = header.writer_host;
        let me = c.host_id();
        if holder == 0 || holder == me || c.writer_host(entry.vdi_id)?.is_some_and(|h| h != me) {
            return Ok(());
        }
        if c.released_epoch(entry.vdi_id)? == header.writer_epoch {
            return Ok(());
        }
        match c.write_log_of(holder)? {
            None => Ok(()),
            Some((id, _)) => Err(Error::Busy(format!(
                "disk {}: host {holder} did not let it go, and its newest writes may be only in that host's write-back log {id:016x}: start host {holder} again with its cache (it destages them), or, if its cache is lost, give the log up with `parallax forget-write-log --host {holder}` (those writes are lost)",
                entry.name
            ))),
        }
    }

    /// Shared mode with a write-back log: after a lost lease was renewed,
    /// checks that the log is still named for this host before anything
    /// more of it reaches the pool (the destager waits for this). If the
    /// operator gave it up meanwhile (`forget-write-log --host`), other
    /// hosts may have taken this host's disks from the pool: the log is
    /// given up here too, and every open disk is let go (its operations
    /// fail; restart the appliance).
    pub(super) fn confirm_write_log(&self) -> Result<()> {
        let (Some(c), Some(log)) = (self.inner.pool.coordinator(), self.inner.pool.write_log())
        else {
            return Ok(());
        };
        let incarnation = c.incarnation();
        let under = &self.inner.log_incarnation;
        if !c.may_write() || under.load(Ordering::SeqCst) == incarnation || log.is_given_up() {
            return Ok(());
        }
        let named = c.write_log_of(c.host_id())?.map(|(id, _)| id);
        if named == Some(log.id()) || (named.is_none() && !log.is_logging()) {
            under.store(incarnation, Ordering::SeqCst);
            return Ok(());
        }
        let why = format!(
            "this appliance's write-back log {:016x} was given up while it had lost its lease; restart the appliance",
            log.id()
        );
        log.give_up(&why);
        self.inner.pool.set_damaged(why.clone());
        for disk in self.open_disks() {
            disk.mark_lost();
            self.inner.open.lock().remove(&disk.id());
        }
        Err(Error::Fenced(why))
    }

    /// Shared mode: gives up the write-back log host `host` named (its
    /// cache device is lost); refused while `host` runs. Its disks can
    /// then be taken over from the pool, without the writes only that log
    /// held.
    pub fn forget_write_log_of(&self, host: u64) -> Result<()> {
        let c =
            self.inner.pool.coordinator().ok_or_else(|| {
                Error::InvalidArgument("--host needs cluster mode (--etcd)".into())
            })?;
        c.forget_write_log_of(host)
    }
}

fn find(catalog: &Catalog, disk: &str) -> Result<RegistryEntry> {
    catalog
        .find(disk)
        .map(|(_, e)| e)
        .ok_or_else(|| Error::NotFound(format!("disk {disk} does not exist")))
}
