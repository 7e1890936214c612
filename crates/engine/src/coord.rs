//! Coordination between appliances that share one pool (see
//! `docs/CLUSTER.md`).
//!
//! A [`Store`](crate::Store) opened with a [`Coordinator`] is in *shared
//! mode*:
//! - it writes a disk only while it holds the disk's writer key, whose
//!   epoch goes into every header it commits;
//! - it changes the catalogue only under the store-wide catalogue lock,
//!   after re-reading the catalogue from the pool;
//! - it allocates only from extents it owns, and takes an unowned one only
//!   after the coordinator granted it; it never writes the bitmap of an
//!   extent another host owns (a block it frees there is left allocated:
//!   a leak, never a double allocation);
//! - it stops writing (data and commits) once the coordinator says its
//!   lease may have ended ([`Coordinator::may_write`], a local check: the
//!   data path does no coordination).
//!
//! Without a coordinator the store behaves as a single appliance that owns
//! the pool (kept off it by a file lock, outside the engine).
//!
//! [`MemCluster`] is an in-process lease service for several stores in one
//! process: the deterministic simulation's, and a reference for what the
//! etcd one must guarantee.

use crate::error::{Error, Result};
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Held while the store-wide catalogue lock is; dropping it releases it.
pub struct CatalogLock(#[allow(dead_code)] Box<dyn Send>);

impl CatalogLock {
    pub fn new(guard: impl Send + 'static) -> CatalogLock {
        CatalogLock(Box::new(guard))
    }
}

/// What a shared-mode store asks of the cluster.
pub trait Coordinator: Send + Sync + std::fmt::Debug {
    /// This appliance's host id (nonzero).
    fn host_id(&self) -> u64;

    /// Takes disk `vdi_id`'s writer key; returns its epoch (greater than
    /// every epoch granted before for any disk). [`Error::Busy`] naming the
    /// holder when another host has it.
    fn acquire_writer(&self, vdi_id: u64) -> Result<u64>;

    /// Gives the key back (nothing happens if it is no longer ours),
    /// recording `epoch` as the disk's last clean release (see
    /// [`Coordinator::released_epoch`]). Called only once everything
    /// written under the key is committed and no I/O is in flight.
    fn release_writer(&self, vdi_id: u64, epoch: u64);

    /// [`Coordinator::release_writer`], reserving the disk for host `to`:
    /// until `to` takes the key (or this host's lease ends, or a minute
    /// passes), every other host is refused it. A cooperative hand-off.
    fn hand_over(&self, vdi_id: u64, epoch: u64, to: u64) -> Result<()>;

    /// The epoch under which disk `vdi_id`'s writer key was last given
    /// back cleanly (0: never). A disk whose last commit carries another
    /// epoch was not let go: its holder died or lost its lease, and may
    /// still have writes in flight (see [`Store::take_over`]).
    ///
    /// [`Store::take_over`]: crate::Store::take_over
    fn released_epoch(&self, vdi_id: u64) -> Result<u64>;

    /// Whether this host may still write to the pool: its lease cannot
    /// have ended. Called on every write and commit: must be cheap and
    /// local.
    fn may_write(&self) -> bool;

    /// Which lease this host is on: it grows when the host, having lost
    /// its lease, got a new one. Writer keys taken under an older one are
    /// gone: a disk opened then is written again only once its key is
    /// taken again (see `Store::settle`). Cheap and local.
    fn incarnation(&self) -> u64;

    /// The store-wide catalogue lock, waiting for it.
    fn lock_catalog(&self) -> Result<CatalogLock>;

    /// Asks for extent `index`, unowned as far as this host knows: `true`
    /// if it is granted (it was nobody's, or already ours), `false` if
    /// another host has it.
    fn claim_extent(&self, index: u64) -> Result<bool>;

    /// Pins snapshot `snap` of disk `vdi_id` for this host, under its
    /// lease: while any host pins a snapshot, the disk's holder hides it
    /// instead of reclaiming its blocks. Called under the catalogue lock,
    /// after the snapshot was found in the disk's committed log.
    fn pin_snapshot(&self, vdi_id: u64, snap: u64) -> Result<()>;

    /// Removes this host's pin (best effort: a pin left behind goes with
    /// the lease).
    fn unpin_snapshot(&self, vdi_id: u64, snap: u64);

    /// The snapshots of disk `vdi_id` that any host pins. Called under the
    /// catalogue lock.
    fn pinned_snapshots(&self, vdi_id: u64) -> Result<HashSet<u64>>;

    /// Asks for disk `vdi_id`, which another host holds (a client here
    /// wants to write it: a VM migrating here): a request under this
    /// host's lease, which the holder sees through
    /// [`Coordinator::writer_requests`]. It stands until withdrawn or the
    /// lease ends.
    fn request_writer(&self, vdi_id: u64) -> Result<()>;

    /// Withdraws this host's request for disk `vdi_id` (best effort: it
    /// goes with the lease at worst).
    fn withdraw_request(&self, vdi_id: u64);

    /// Every standing request, oldest first: (disk, host asking).
    fn writer_requests(&self) -> Result<Vec<(u64, u64)>>;

    /// The host holding disk `vdi_id`'s writer key, if any: a cheap look
    /// (no lock) for a host waiting for the disk.
    fn writer_host(&self, vdi_id: u64) -> Result<Option<u64>>;

    /// Names this host's write-back log (its id, and `locator`: the cache's
    /// size, for messages), durably and not under
    /// the lease: from then on, a disk this host held and did not let go
    /// may have its newest writes only in that log, so no other host takes
    /// it over or reads its snapshots while this host is down (see
    /// [`Coordinator::write_log_of`]). Called before the log takes its
    /// first record.
    fn name_write_log(&self, log_id: u64, locator: u64) -> Result<()>;

    /// This host's log is drained and stopped (a clean stop): it is named
    /// no more.
    fn unname_write_log(&self) -> Result<()>;

    /// The write-back log host `host` named: (log id, locator).
    fn write_log_of(&self, host: u64) -> Result<Option<(u64, u64)>>;

    /// Gives up the write-back log host `host` named (its cache device is
    /// lost): its disks can then be taken over from the pool as it is,
    /// without the writes only that log held. Refused while `host` runs
    /// (holds a lease). A host that finds its log given up when it comes
    /// back drops it.
    fn forget_write_log_of(&self, host: u64) -> Result<()>;
}

/// The state of an in-process cluster.
#[derive(Default)]
struct ClusterState {
    /// Disk id ─▶ (host, epoch).
    writers: HashMap<u64, (u64, u64)>,
    /// Extent ─▶ host.
    extents: HashMap<u64, u64>,
    /// Host holding the catalogue lock.
    catalog: Option<u64>,
    /// Grows with every grant: epochs come from it.
    revision: u64,
    /// (disk, snapshot) ─▶ hosts pinning it.
    pins: HashMap<(u64, u64), HashSet<u64>>,
    /// Disk id ─▶ epoch of its last clean release.
    released: HashMap<u64, u64>,
    /// Disk id ─▶ (host it is handed to, host that handed it).
    reserved: HashMap<u64, (u64, u64)>,
    /// Standing requests for disks, oldest first: (disk, host asking).
    requests: Vec<(u64, u64)>,
    /// Host ─▶ the write-back log it named (id, locator).
    logs: HashMap<u64, (u64, u64)>,
}

/// An in-process lease service shared by several [`MemCoordinator`]s (one
/// per host). Expiring a host's lease ([`MemCluster::expire`]) fences it
/// first, then frees its keys, as a real lease service plus self-fencing
/// must order them.
#[derive(Default)]
pub struct MemCluster {
    state: Mutex<ClusterState>,
    catalog_free: Condvar,
    hosts: Mutex<HashMap<u64, Arc<MemCoordinator>>>,
}

impl std::fmt::Debug for MemCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemCluster").finish_non_exhaustive()
    }
}

impl MemCluster {
    pub fn new() -> Arc<MemCluster> {
        Arc::new(MemCluster::default())
    }

    /// The coordinator of host `id`, with a live lease (a new one if the
    /// host's lease expired: a restarted appliance).
    pub fn host(self: &Arc<Self>, id: u64) -> Arc<MemCoordinator> {
        let mut hosts = self.hosts.lock();
        match hosts.get(&id) {
            Some(c) if !c.fenced.load(Ordering::SeqCst) => c.clone(),
            _ => {
                let c = Arc::new(MemCoordinator {
                    host_id: id,
                    cluster: self.clone(),
                    fenced: AtomicBool::new(false),
                    incarnation: std::sync::atomic::AtomicU64::new(1),
                });
                hosts.insert(id, c.clone());
                c
            }
        }
    }

    /// Host `id`'s lease ends: it is fenced (its coordinator refuses every
    /// write from now on), then its writer keys and the catalogue lock, if
    /// it held it, are free for others. Its extents stay its own.
    pub fn expire(&self, id: u64) {
        if let Some(c) = self.hosts.lock().get(&id) {
            c.fenced.store(true, Ordering::SeqCst);
        }
        let mut st = self.state.lock();
        st.writers.retain(|_, (host, _)| *host != id);
        st.pins.retain(|_, hosts| {
            hosts.remove(&id);
            !hosts.is_empty()
        });
        st.reserved.retain(|_, (_, by)| *by != id);
        st.requests.retain(|&(_, host)| host != id);
        if st.catalog == Some(id) {
            st.catalog = None;
            self.catalog_free.notify_all();
        }
    }

    /// Host `id`, fenced by [`MemCluster::expire`] but still running, gets
    /// a new lease (its coordination service came back): it may write
    /// again, under a new incarnation; the keys of its old lease are gone.
    pub fn renew(&self, id: u64) {
        if let Some(c) = self.hosts.lock().get(&id) {
            if c.fenced.swap(false, Ordering::SeqCst) {
                c.incarnation.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Who holds disk `vdi_id`'s writer key: (host, epoch).
    pub fn writer(&self, vdi_id: u64) -> Option<(u64, u64)> {
        self.state.lock().writers.get(&vdi_id).copied()
    }

    /// Every writer key: disk id ─▶ (host, epoch).
    pub fn writers(&self) -> HashMap<u64, (u64, u64)> {
        self.state.lock().writers.clone()
    }

    /// Every extent granted: index ─▶ host.
    pub fn extents(&self) -> HashMap<u64, u64> {
        self.state.lock().extents.clone()
    }
}

/// One host's view of a [`MemCluster`].
pub struct MemCoordinator {
    host_id: u64,
    cluster: Arc<MemCluster>,
    fenced: AtomicBool,
    incarnation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for MemCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemCoordinator(host {})", self.host_id)
    }
}

/// Releases the in-process catalogue lock.
struct MemCatalogLock {
    cluster: Arc<MemCluster>,
    host: u64,
}

impl Drop for MemCatalogLock {
    fn drop(&mut self) {
        let mut st = self.cluster.state.lock();
        if st.catalog == Some(self.host) {
            st.catalog = None;
            self.cluster.catalog_free.notify_all();
        }
    }
}

impl MemCoordinator {
    fn fenced_error(&self) -> Error {
        Error::Fenced(format!(
            "host {}'s lease has ended: it may no longer write to the pool",
            self.host_id
        ))
    }
}

impl Coordinator for MemCoordinator {
    fn host_id(&self) -> u64 {
        self.host_id
    }

    fn acquire_writer(&self, vdi_id: u64) -> Result<u64> {
        if !self.may_write() {
            return Err(self.fenced_error());
        }
        let mut st = self.cluster.state.lock();
        match st.reserved.get(&vdi_id) {
            Some(&(to, _)) if to != self.host_id => {
                return Err(Error::Busy(format!(
                    "the disk is being handed off to host {to}"
                )));
            }
            _ => {}
        }
        match st.writers.get(&vdi_id) {
            Some(&(host, epoch)) if host == self.host_id => Ok(epoch),
            Some(&(host, _)) => Err(Error::Busy(format!("the disk is written by host {host}"))),
            None => {
                st.reserved.remove(&vdi_id);
                st.revision += 1;
                let epoch = st.revision;
                st.writers.insert(vdi_id, (self.host_id, epoch));
                Ok(epoch)
            }
        }
    }

    fn release_writer(&self, vdi_id: u64, epoch: u64) {
        if !self.may_write() {
            // The lease took the key; the release was not clean.
            return;
        }
        let mut st = self.cluster.state.lock();
        if st.writers.get(&vdi_id) == Some(&(self.host_id, epoch)) {
            st.writers.remove(&vdi_id);
            st.released.insert(vdi_id, epoch);
        }
    }

    fn hand_over(&self, vdi_id: u64, epoch: u64, to: u64) -> Result<()> {
        if !self.may_write() {
            return Err(self.fenced_error());
        }
        let mut st = self.cluster.state.lock();
        if st.writers.get(&vdi_id) != Some(&(self.host_id, epoch)) {
            return Err(Error::Busy(
                "the disk's writer key is not this host's".into(),
            ));
        }
        st.writers.remove(&vdi_id);
        st.released.insert(vdi_id, epoch);
        st.reserved.insert(vdi_id, (to, self.host_id));
        Ok(())
    }

    fn released_epoch(&self, vdi_id: u64) -> Result<u64> {
        Ok(self
            .cluster
            .state
            .lock()
            .released
            .get(&vdi_id)
            .copied()
            .unwrap_or(0))
    }

    fn may_write(&self) -> bool {
        !self.fenced.load(Ordering::SeqCst)
    }

    fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::SeqCst)
    }

    fn lock_catalog(&self) -> Result<CatalogLock> {
        let mut st = self.cluster.state.lock();
        loop {
            if !self.may_write() {
                return Err(self.fenced_error());
            }
            match st.catalog {
                None => break,
                // Another host, or another thread of this one.
                Some(_) => self.cluster.catalog_free.wait(&mut st),
            }
        }
        st.catalog = Some(self.host_id);
        Ok(CatalogLock::new(MemCatalogLock {
            cluster: self.cluster.clone(),
            host: self.host_id,
        }))
    }

    fn claim_extent(&self, index: u64) -> Result<bool> {
        if !self.may_write() {
            return Err(self.fenced_error());
        }
        let mut st = self.cluster.state.lock();
        let owner = *st.extents.entry(index).or_insert(self.host_id);
        Ok(owner == self.host_id)
    }

    fn pin_snapshot(&self, vdi_id: u64, snap: u64) -> Result<()> {
        if !self.may_write() {
            return Err(self.fenced_error());
        }
        let mut st = self.cluster.state.lock();
        st.pins
            .entry((vdi_id, snap))
            .or_default()
            .insert(self.host_id);
        Ok(())
    }

    fn unpin_snapshot(&self, vdi_id: u64, snap: u64) {
        if !self.may_write() {
            // The lease took the pins; a new one of this host may have its own.
            return;
        }
        let mut st = self.cluster.state.lock();
        if let Some(hosts) = st.pins.get_mut(&(vdi_id, snap)) {
            hosts.remove(&self.host_id);
            if hosts.is_empty() {
                st.pins.remove(&(vdi_id, snap));
            }
        }
    }

    fn pinned_snapshots(&self, vdi_id: u64) -> Result<HashSet<u64>> {
        let st = self.cluster.state.lock();
        Ok(st
            .pins
            .keys()
            .filter(|(v, _)| *v == vdi_id)
            .map(|&(_, s)| s)
            .collect())
    }

    fn request_writer(&self, vdi_id: u64) -> Result<()> {
        if !self.may_write() {
            return Err(self.fenced_error());
        }
        let mut st = self.cluster.state.lock();
        let request = (vdi_id, self.host_id);
        if !st.requests.contains(&request) {
            st.requests.push(request);
        }
        Ok(())
    }

    fn withdraw_request(&self, vdi_id: u64) {
        let mut st = self.cluster.state.lock();
        st.requests.retain(|&r| r != (vdi_id, self.host_id));
    }

    fn writer_requests(&self) -> Result<Vec<(u64, u64)>> {
        Ok(self.cluster.state.lock().requests.clone())
    }

    fn writer_host(&self, vdi_id: u64) -> Result<Option<u64>> {
        Ok(self.cluster.writer(vdi_id).map(|(host, _)| host))
    }

    fn name_write_log(&self, log_id: u64, locator: u64) -> Result<()> {
        if !self.may_write() {
            return Err(self.fenced_error());
        }
        self.cluster
            .state
            .lock()
            .logs
            .insert(self.host_id, (log_id, locator));
        Ok(())
    }

    fn unname_write_log(&self) -> Result<()> {
        if !self.may_write() {
            return Err(self.fenced_error());
        }
        self.cluster.state.lock().logs.remove(&self.host_id);
        Ok(())
    }

    fn write_log_of(&self, host: u64) -> Result<Option<(u64, u64)>> {
        Ok(self.cluster.state.lock().logs.get(&host).copied())
    }

    fn forget_write_log_of(&self, host: u64) -> Result<()> {
        let running = self
            .cluster
            .hosts
            .lock()
            .get(&host)
            .is_some_and(|c| !c.fenced.load(Ordering::SeqCst));
        if running {
            return Err(Error::Busy(format!(
                "host {host} is running: its write-back log is its own to drain"
            )));
        }
        self.cluster.state.lock().logs.remove(&host);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_keys_epochs_and_expiry() {
        let cluster = MemCluster::new();
        let (a, b) = (cluster.host(1), cluster.host(2));
        let e1 = a.acquire_writer(7).unwrap();
        assert_eq!(a.acquire_writer(7).unwrap(), e1, "a holder asking again");
        assert!(matches!(b.acquire_writer(7), Err(Error::Busy(_))));
        cluster.expire(1);
        assert!(!a.may_write(), "an expired host may still write");
        assert!(matches!(a.acquire_writer(8), Err(Error::Fenced(_))));
        let e2 = b.acquire_writer(7).unwrap();
        assert!(e2 > e1, "epochs must grow");
        b.release_writer(7, e1);
        assert_eq!(
            cluster.writer(7),
            Some((2, e2)),
            "a stale release took the key"
        );
        let a2 = cluster.host(1);
        assert!(a2.may_write(), "a restarted host gets a new lease");
        assert!(claim(&a2, 3) && !claim(&b, 3) && claim(&b, 4));
    }

    fn claim(c: &MemCoordinator, i: u64) -> bool {
        c.claim_extent(i).unwrap()
    }

    #[test]
    fn the_catalogue_lock_excludes_and_is_freed_by_expiry() {
        let cluster = MemCluster::new();
        let (a, b) = (cluster.host(1), cluster.host(2));
        let held = a.lock_catalog().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || tx.send(b.lock_catalog().map(drop).is_ok()).unwrap());
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(100))
            .is_err());
        drop(held);
        assert!(rx.recv().unwrap());
        t.join().unwrap();
        let _held = cluster.host(2).lock_catalog().unwrap();
        cluster.expire(2);
        assert!(a.lock_catalog().is_ok(), "an expired holder kept the lock");
    }

    #[test]
    fn pins_are_per_host_and_go_with_the_lease() {
        let cluster = MemCluster::new();
        let (a, b) = (cluster.host(1), cluster.host(2));
        a.pin_snapshot(7, 3).unwrap();
        b.pin_snapshot(7, 3).unwrap();
        b.pin_snapshot(7, 4).unwrap();
        a.pin_snapshot(8, 5).unwrap();
        let pinned = |c: &MemCoordinator| {
            let mut v: Vec<u64> = c.pinned_snapshots(7).unwrap().into_iter().collect();
            v.sort();
            v
        };
        assert_eq!(pinned(&a), [3, 4]);
        b.unpin_snapshot(7, 3);
        assert_eq!(pinned(&a), [3, 4], "b's unpin removed a's pin");
        cluster.expire(2);
        assert_eq!(pinned(&a), [3], "an expired host's pin stayed");
    }
}
