//! [`Service`]: the management operations run on a store this process
//! holds, plus the table of live NBD connections.
//!
//! The daemon owns one `Service` and shares it between the NBD server and
//! the control API; the `parallax` command builds one over the store it
//! opened when no daemon runs. Every operation that changes the store ends
//! with [`Store::flush_all`], so that what it freed is free on disk too.
//!
//! Policy for disks in use: `rollback` and `delete` of a disk with live NBD
//! connections (to the disk or to any of its snapshots), and `delete` of a
//! snapshot that is being served, are refused with [`ErrorKind::Conflict`].
//! The operator disconnects the clients first; nothing is pulled from under
//! a running guest.

use crate::api::*;
use crate::cluster::EtcdCoordinator;
use crate::replication;
use crate::scheduler::Scheduler;
use crate::transfer;
use crate::uring::Uring;
use parallax_engine::{DiskRef, Durability, ReadDisk, Store, Vdi};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use tracing::warn;

/// RFC 3339 UTC time (seconds precision) of a timestamp in ns since the epoch.
pub fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

/// `NAME` or `NAME@SNAP`.
fn export_ref(disk: &str, snapshot: Option<&str>) -> DiskRef {
    match snapshot {
        Some(s) => DiskRef::snapshot(disk, s),
        None => DiskRef::disk(disk),
    }
}

pub struct Service {
    store: Store,
    store_path: PathBuf,
    /// Progress bars for import and export (the command line, on a terminal).
    show_progress: bool,
    connections: Mutex<HashMap<u64, ConnectionInfo>>,
    next_connection: AtomicU64,
    /// The daemon's io_uring, when the kernel allows one.
    uring: Option<Arc<Uring>>,
    /// The daemon writes changed bitmaps from a background tick instead of
    /// after every change.
    background_settle: bool,
    /// The daemon's snapshot schedules (none when no daemon runs).
    scheduler: Option<Arc<Scheduler>>,
    /// The running gc's progress, for `GET /v1/gc`.
    gc_progress: Mutex<Option<GcProgress>>,
    /// Cluster mode: the etcd coordinator.
    cluster: Option<Arc<EtcdCoordinator>>,
    /// `NBD_OPT_LIST` lists every snapshot export too (`--list-snapshots`).
    list_snapshots: bool,
    /// NBD over TLS (`--tls`).
    tls: Arc<crate::tls::NbdTls>,
}

/// Shortest schedule interval accepted.
pub const MIN_SCHEDULE_NS: u64 = 1_000_000;

/// A registered NBD connection; unregisters itself when dropped.
pub struct ConnectionGuard<'a> {
    service: &'a Service,
    id: u64,
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.service.connections.lock().remove(&self.id);
    }
}

impl ConnectionGuard<'_> {
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Service {
    pub fn new(store: Store, store_path: PathBuf, show_progress: bool) -> Service {
        Service {
            store,
            store_path,
            show_progress,
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            uring: None,
            background_settle: false,
            scheduler: None,
            gc_progress: Mutex::new(None),
            cluster: None,
            list_snapshots: false,
            tls: Arc::new(crate::tls::NbdTls::off()),
        }
    }

    /// NBD clients may, or must, use TLS.
    pub fn with_tls(mut self, tls: Arc<crate::tls::NbdTls>) -> Service {
        self.tls = tls;
        self
    }

    /// The NBD server's TLS policy.
    pub fn tls(&self) -> &crate::tls::NbdTls {
        &self.tls
    }

    /// `NBD_OPT_LIST` lists every disk's snapshots (`NAME@SNAP`) too.
    pub fn with_listed_snapshots(mut self, list: bool) -> Service {
        self.list_snapshots = list;
        self
    }

    /// Every export a client may open: the disks and, with
    /// `--list-snapshots`, their snapshots. A disk this appliance does not
    /// hold lists the snapshots of its last commit.
    pub fn exports(&self) -> Result<Vec<String>, parallax_engine::Error> {
        let disks = self.store.try_list()?;
        if !self.list_snapshots {
            return Ok(disks);
        }
        let mut names = Vec::with_capacity(disks.len());
        for disk in disks {
            let snaps = match self.store.open_if_held(&disk)? {
                Some(vdi) => vdi.snapshots(),
                None => self.store.committed_snapshots(&disk)?,
            };
            names.extend(snaps.iter().map(|s| format!("{disk}@{}", s.name)));
            names.push(disk);
        }
        Ok(names)
    }

    /// Runs snapshot schedules through `scheduler` (the daemon does).
    pub fn with_scheduler(mut self, scheduler: Arc<Scheduler>) -> Service {
        self.scheduler = Some(scheduler);
        self
    }

    /// Cluster mode: answers `hosts` from etcd.
    pub fn with_cluster(mut self, cluster: Option<Arc<EtcdCoordinator>>) -> Service {
        self.cluster = cluster;
        self
    }

    /// Cluster mode: the etcd coordinator.
    pub fn cluster(&self) -> Option<&Arc<EtcdCoordinator>> {
        self.cluster.as_ref()
    }

    /// The daemon's snapshot schedules.
    pub fn scheduler(&self) -> Option<&Arc<Scheduler>> {
        self.scheduler.as_ref()
    }

    /// Serves NBD data through `uring` where the engine can plan ahead.
    pub fn with_uring(mut self, uring: Option<Arc<Uring>>) -> Service {
        self.uring = uring;
        self
    }

    /// Leaves writing the bitmaps that changes free to the caller, which
    /// calls [`Store::settle_free_space`] periodically (the daemon does).
    pub fn with_background_settle(mut self) -> Service {
        self.background_settle = true;
        self
    }

    pub fn uring(&self) -> Option<&Arc<Uring>> {
        self.uring.as_ref()
    }

    /// Opens a disk (the store keeps its state; this is a handle).
    fn open(&self, name: &str) -> Result<Vdi, parallax_engine::Error> {
        self.store.open_vdi(name)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Cluster mode: how long a client waits for a disk another appliance
    /// holds (zero: such a disk is refused when a client connects; always
    /// zero outside cluster mode).
    pub fn claim_wait(&self) -> Duration {
        self.cluster
            .as_ref()
            .map_or(Duration::ZERO, |c| c.options().claim_wait)
    }

    /// Opens disk `name` for a client, asking for it if another appliance
    /// holds it and waiting up to [`Service::claim_wait`] (see
    /// `Store::claim`); its schedule then runs here.
    pub fn claim(&self, name: &str) -> Result<Vdi, parallax_engine::Error> {
        let held_here = self.store.open_if_held(name)?.is_some();
        let vdi = self.store.claim(name, self.claim_wait())?;
        if !held_here {
            crate::metrics::global().disk_claimed();
        }
        if let Some(s) = &self.scheduler {
            s.refresh(&vdi);
        }
        Ok(vdi)
    }

    /// Cluster mode: hands over the disks other appliances asked for once
    /// this one's clients are done with them (`--yield-quiet`); their
    /// schedules stop here.
    pub fn yield_requested(&self) -> Result<(), parallax_engine::Error> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        for (name, r) in self.store.yield_requested(c.options().yield_quiet)? {
            tracing::info!(disk = %name, to = r.to, epoch = r.epoch, took_ms = r.took.as_millis() as u64, "gave the disk to the appliance that asked for it");
            crate::metrics::global().disk_given();
            if let (Some(s), Ok(info)) = (&self.scheduler, self.store.peek_info(&name)) {
                s.stop(info.id);
            }
        }
        Ok(())
    }

    /// Records a client connected to `export` (`NAME` or `NAME@SNAP`).
    pub fn register_connection(&self, export: &str, peer: &str) -> ConnectionGuard<'_> {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let info = ConnectionInfo {
            id,
            export: export.to_string(),
            peer: peer.to_string(),
            since: rfc3339(parallax_engine::now_ns()),
        };
        self.connections.lock().insert(id, info);
        ConnectionGuard { service: self, id }
    }

    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let mut all: Vec<ConnectionInfo> = self.connections.lock().values().cloned().collect();
        all.sort_by_key(|c| c.id);
        all
    }

    /// Connections to `disk` itself or, with `whole_disk`, to any of its
    /// snapshots too; or to exactly `disk@snapshot`.
    fn connections_to(&self, disk: &str, snapshot: Option<&str>) -> usize {
        let exact = export_ref(disk, snapshot).to_string();
        let prefix = format!("{disk}@");
        self.connections
            .lock()
            .values()
            .filter(|c| c.export == exact || (snapshot.is_none() && c.export.starts_with(&prefix)))
            .count()
    }

    fn refuse_if_connected(&self, disk: &str, snapshot: Option<&str>) -> ApiResult<()> {
        match self.connections_to(disk, snapshot) {
            0 => Ok(()),
            n => Err(ApiError::new(
                ErrorKind::Conflict,
                format!(
                    "{} is in use by {n} live NBD connection{}; disconnect the clients first (`parallax status` lists them)",
                    export_ref(disk, snapshot),
                    if n == 1 { "" } else { "s" }
                ),
            )),
        }
    }

    /// Runs a change, then writes the bitmaps its frees changed (also after
    /// a failure: earlier steps may have succeeded), unless the daemon's
    /// background tick does that. Every change commits itself; other disks
    /// are left alone, so that a snapshot of one disk does not commit every
    /// disk the daemon serves.
    fn change<T>(&self, body: impl FnOnce(&Store) -> ApiResult<T>) -> ApiResult<T> {
        let result = body(&self.store);
        // Best effort: if it fails, freed blocks stay leaked on disk, which
        // `check` reports and `gc` repairs.
        if !self.background_settle {
            let _ = self.store.settle_free_space();
        }
        result
    }

    /// Every disk's and snapshot's figures from neighbour walks, compared
    /// with a brute-force scan of the whole store.
    fn scan_space(&self) -> ApiResult<ScanResult> {
        let scanned = self.store.space_scan()?;
        let mut differences = Vec::new();
        for s in &scanned {
            let fast = self.store.space(&s.name)?;
            if fast.used_bytes != s.used_bytes
                || fast.referenced_bytes != s.referenced_bytes
                || fast.live_used_bytes != s.live_used_bytes
            {
                differences.push(format!(
                    "disk {}: used/referenced/live-only {}/{}/{} by walks, {}/{}/{} by scan",
                    s.name,
                    fast.used_bytes,
                    fast.referenced_bytes,
                    fast.live_used_bytes,
                    s.used_bytes,
                    s.referenced_bytes,
                    s.live_used_bytes
                ));
            }
            for (a, b) in fast.snapshots.iter().zip(&s.snapshots) {
                if a != b {
                    differences.push(format!(
                        "{}: used/referenced {}/{} by walks, {}/{} by scan",
                        DiskRef::snapshot(&s.name, &a.name),
                        a.used_bytes,
                        a.referenced_bytes,
                        b.used_bytes,
                        b.referenced_bytes
                    ));
                }
            }
            if fast.snapshots.len() != s.snapshots.len() {
                differences.push(format!("disk {}: snapshot counts differ", s.name));
            }
        }
        Ok(ScanResult {
            matches: differences.is_empty(),
            differences,
        })
    }

    fn disk_info(&self, vdi: &Vdi) -> ApiResult<DiskInfo> {
        self.info_from(vdi.info(), Some(vdi.allocated_bytes()?), true)
    }

    /// A disk's figures: from its open state, or (cluster mode, another
    /// appliance writing it) from its last committed header.
    fn disk_info_by_name(&self, name: &str) -> ApiResult<DiskInfo> {
        if !self.store.is_shared() {
            return self.disk_info(&self.open(name)?);
        }
        // Cluster mode: looking must not take the disk's writer key.
        match self.store.open_if_held(name)? {
            Some(vdi) => self.disk_info(&vdi),
            None => self.info_from(self.store.peek_info(name)?, None, false),
        }
    }

    fn info_from(
        &self,
        info: parallax_engine::VdiInfo,
        allocated: Option<u64>,
        here: bool,
    ) -> ApiResult<DiskInfo> {
        let (handing_off_to, asked_for_by) = match &self.cluster {
            Some(c) => c.transfers_of(info.id)?,
            None => (None, Vec::new()),
        };
        let writer = self.store.is_shared().then_some(WriterInfo {
            host_id: info.writer_host,
            epoch: info.writer_epoch,
            here,
            handing_off_to,
            asked_for_by,
        });
        Ok(DiskInfo {
            writer,
            connections: self.connections_to(&info.name, None) as u64,
            id: info.id,
            size_bytes: info.size_bytes,
            allocated_bytes: allocated,
            snapshots: info.snapshot_count,
            origin: info.origin,
            created: rfc3339(info.created_ns),
            name: info.name,
            hidden_snapshots: info.hidden_snapshots,
            cache_policy: info.cache_policy.name().to_string(),
            schedule: (info.schedule.every_ns != 0).then(|| info.schedule.into()),
            schedule_run: self
                .scheduler
                .as_ref()
                .and_then(|s| s.stats(info.id))
                .map(|s| {
                    use std::sync::atomic::Ordering::Relaxed;
                    ScheduleRun {
                        taken: s.taken.load(Relaxed),
                        deleted: s.deleted.load(Relaxed),
                        freed_bytes: s.freed_blocks.load(Relaxed) * 4096,
                        failed: s.failed.load(Relaxed),
                        skipped: s.skipped.load(Relaxed),
                    }
                }),
        })
    }
}

fn snapshot_detail(disk: &str, info: &parallax_engine::SnapshotInfo) -> SnapshotDetail {
    SnapshotDetail {
        disk: disk.to_string(),
        name: info.name.clone(),
        id: info.id,
        created: rfc3339(info.created_ns),
        created_ns: info.created_ns,
        size_bytes: info.size_bytes,
        allocated_bytes: None,
        scheduled: info.scheduled,
        used_bytes: None,
        referenced_bytes: None,
    }
}

impl Api for Service {
    fn create(&self, name: &str, size: u64) -> ApiResult<DiskInfo> {
        self.change(|store| {
            let vdi = store.create_vdi(name, size)?;
            self.disk_info(&vdi)
        })
    }

    fn list(&self) -> ApiResult<Vec<DiskInfo>> {
        self.store
            .try_list()?
            .iter()
            .map(|name| self.disk_info_by_name(name))
            .collect()
    }

    fn disk(&self, name: &str) -> ApiResult<DiskInfo> {
        self.disk_info_by_name(name)
    }

    fn snapshot_detail(&self, disk: &str, snapshot: &str) -> ApiResult<SnapshotDetail> {
        let view = self.store.open_snapshot(disk, snapshot)?;
        let mut detail = snapshot_detail(disk, view.info());
        detail.allocated_bytes = Some(view.allocated_bytes()?);
        Ok(detail)
    }

    fn snapshot(&self, disk: &str, name: Option<&str>, durable: bool) -> ApiResult<SnapshotDetail> {
        self.change(|_| {
            let vdi = self.open(disk)?;
            if durable {
                let info = vdi.snapshot(name)?;
                return Ok(snapshot_detail(disk, &info));
            }
            let info = vdi.snapshot_with(name, Durability::Deferred)?;
            make_durable_soon(vdi);
            Ok(snapshot_detail(disk, &info))
        })
    }

    fn snapshots(&self, disk: &str) -> ApiResult<Vec<SnapshotDetail>> {
        if self.store.is_shared() && self.store.open_if_held(disk)?.is_none() {
            // Not opened (its writer key is not taken for a listing): the
            // last commit's snapshots, without space figures.
            let snaps = self.store.committed_snapshots(disk)?;
            return Ok(snaps.iter().map(|i| snapshot_detail(disk, i)).collect());
        }
        let vdi = self.open(disk)?;
        let space = self.store.space(disk)?;
        let by_id: HashMap<u64, &parallax_engine::SnapshotSpace> =
            space.snapshots.iter().map(|s| (s.id, s)).collect();
        Ok(vdi
            .snapshots()
            .iter()
            .map(|i| {
                let mut d = snapshot_detail(disk, i);
                if let Some(s) = by_id.get(&i.id) {
                    d.used_bytes = Some(s.used_bytes);
                    d.referenced_bytes = Some(s.referenced_bytes);
                }
                d
            })
            .collect())
    }

    fn clone_snapshot(&self, disk: &str, snapshot: &str, new: &str) -> ApiResult<DiskInfo> {
        self.change(|store| {
            let vdi = store.clone_snapshot(disk, snapshot, new)?;
            self.disk_info(&vdi)
        })
    }

    fn rollback(&self, disk: &str, snapshot: &str) -> ApiResult<()> {
        self.refuse_if_connected(disk, None)?;
        self.change(|_| Ok(self.open(disk)?.rollback(snapshot)?))
    }

    fn delete_disk(&self, name: &str) -> ApiResult<()> {
        self.refuse_if_connected(name, None)?;
        self.change(|store| Ok(store.delete_vdi(name)?))?;
        crate::metrics::global().forget(name, None);
        Ok(())
    }

    fn delete_snapshot(&self, disk: &str, snapshot: &str) -> ApiResult<()> {
        self.refuse_if_connected(disk, Some(snapshot))?;
        self.change(|_| {
            self.open(disk)?.delete_snapshot(snapshot)?;
            Ok(())
        })?;
        crate::metrics::global().forget(disk, Some(snapshot));
        Ok(())
    }

    fn set_schedule(&self, disk: &str, schedule: Option<&ScheduleSpec>) -> ApiResult<DiskInfo> {
        let spec = schedule.cloned().unwrap_or_default();
        if schedule.is_some() && spec.every_ns < MIN_SCHEDULE_NS {
            return Err(ApiError::invalid(format!(
                "a schedule interval must be at least 1ms (got {} ns)",
                spec.every_ns
            )));
        }
        self.change(|_| {
            let vdi = self.open(disk)?;
            vdi.set_schedule((&spec).into())?;
            if let Some(s) = &self.scheduler {
                s.refresh(&vdi);
                // A tighter rule applies at once, not at the next tick.
                vdi.apply_retention()?;
            }
            self.disk_info(&vdi)
        })
    }

    fn set_cache_policy(&self, disk: &str, policy: &str) -> ApiResult<DiskInfo> {
        let policy = parallax_engine::CachePolicy::parse(policy).map_err(ApiError::invalid)?;
        self.change(|store| {
            let vdi = self.open(disk)?;
            vdi.set_cache_policy(policy)?;
            store.refresh_write_back()?;
            self.disk_info(&vdi)
        })
    }

    fn import(&self, file: &Path, name: &str, size: Option<u64>) -> ApiResult<DiskInfo> {
        self.change(|store| {
            transfer::import(store, file, name, size, self.show_progress)?;
            self.disk_info(&self.open(name)?)
        })
    }

    fn export(
        &self,
        disk: &str,
        snapshot: Option<&str>,
        file: &Path,
        force: bool,
    ) -> ApiResult<()> {
        let source: Box<dyn ReadDisk> = match snapshot {
            Some(snap) => Box::new(self.store.open_snapshot(disk, snap)?),
            None => Box::new(self.store.open_vdi(disk)?),
        };
        transfer::export(&*source, file, force, &self.store_path, self.show_progress)?;
        Ok(())
    }

    fn diff(&self, from: &SnapName, to: &str, to_snapshot: Option<&str>) -> ApiResult<DiffReport> {
        replication::diff_report(&self.store, from, to, to_snapshot)
    }

    fn send(
        &self,
        to: &SnapName,
        from: Option<&SnapName>,
        out: &mut dyn std::io::Write,
    ) -> ApiResult<SendReport> {
        let plan = replication::plan_send(&self.store, to, from)?;
        plan.write(out)?;
        Ok(plan.report().clone())
    }

    fn receive(
        &self,
        name: &str,
        input: &mut dyn std::io::Read,
        force: bool,
    ) -> ApiResult<ReceiveReport> {
        // A receive may roll the disk back: not under a client's feet.
        self.refuse_if_connected(name, None)?;
        self.change(|store| replication::receive(store, name, input, force))
    }

    fn attach_vhost_user(&self, _export: &str, _socket: &Path) -> ApiResult<()> {
        Err(ApiError::invalid(
            "attach serves the disk from the daemon: start `parallax serve` first",
        ))
    }

    fn detach_vhost_user(&self, _socket: &Path) -> ApiResult<()> {
        Err(ApiError::invalid("no daemon runs: nothing is attached"))
    }

    fn hosts(&self) -> ApiResult<Vec<HostInfo>> {
        let Some(c) = &self.cluster else {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                "this appliance is not in cluster mode (serve --etcd)",
            ));
        };
        let o = c.overview()?;
        let names = self.store.disk_names()?;
        let name = |id: u64| names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"));
        Ok(o.hosts
            .iter()
            .map(|&(host_id, ref registered, lease_left_ms, _)| HostInfo {
                host_id,
                registered: serde_json::from_str(registered).unwrap_or(serde_json::Value::Null),
                lease_left_ms,
                writing: o
                    .writers
                    .iter()
                    .filter(|w| w.1 == host_id)
                    .map(|&(disk_id, _, epoch)| HeldDisk {
                        disk: name(disk_id),
                        disk_id,
                        epoch,
                    })
                    .collect(),
                handing_off: o
                    .handoffs
                    .iter()
                    .filter(|h| h.1 == host_id)
                    .map(|&(disk, _, to, until_ms)| HandingOff {
                        disk: name(disk),
                        to,
                        until_ms,
                    })
                    .collect(),
                asking_for: o
                    .requests
                    .iter()
                    .filter(|r| r.1 == host_id)
                    .map(|r| name(r.0))
                    .collect(),
            })
            .collect())
    }

    fn handoff(&self, disk: &str, to: u64) -> ApiResult<HandoffSummary> {
        if let Some(c) = &self.cluster {
            // A mistyped host id would keep the disk from everyone for the
            // reservation's minute.
            if !c.hosts()?.iter().any(|h| h.0 == to) {
                return Err(ApiError::new(
                    ErrorKind::Invalid,
                    format!("host {to} is not in the cluster (see `parallax hosts`)"),
                ));
            }
        }
        let r = self.store.hand_off(disk, to)?;
        crate::metrics::global().disk_given();
        if let (Some(s), Ok(info)) = (&self.scheduler, self.store.peek_info(disk)) {
            // Its schedule runs where the disk is now.
            s.stop(info.id);
        }
        Ok(HandoffSummary {
            disk: disk.to_string(),
            to: r.to,
            epoch: r.epoch,
            took_ms: r.took.as_millis() as u64,
        })
    }

    fn forget_write_log_of(&self, host: u64) -> ApiResult<()> {
        if self.cluster.is_none() {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                "this appliance is not in cluster mode (serve --etcd)",
            ));
        }
        self.change(|store| Ok(store.forget_write_log_of(host)?))
    }

    fn takeover(&self, disk: &str) -> ApiResult<TakeoverSummary> {
        let Some(c) = &self.cluster else {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                "this appliance is not in cluster mode (serve --etcd)",
            ));
        };
        let options = c.options();
        // Long enough for the old holder's lease to end.
        let wait = options.lease_ttl + Duration::from_secs(5);
        self.change(|store| {
            let (vdi, r) = store.take_over(disk, wait, options.takeover_grace)?;
            if r.taken_over {
                crate::metrics::global().disk_taken_over();
            }
            if let Some(s) = &self.scheduler {
                s.refresh(&vdi);
            }
            Ok(TakeoverSummary {
                disk: disk.to_string(),
                taken_over: r.taken_over,
                from_host: r.from_host,
                from_epoch: r.from_epoch,
                epoch: r.epoch,
                waited_for_key_ms: r.waited_for_key.as_millis() as u64,
                grace_ms: r.grace.as_millis() as u64,
            })
        })
    }

    fn check(&self) -> ApiResult<CheckSummary> {
        let r = self.store.check()?;
        Ok(CheckSummary {
            clean: r.is_clean(),
            disks: r.disks,
            snapshots: r.snapshots,
            tree_nodes: r.tree_nodes,
            data_blocks: r.data_blocks,
            metadata_blocks: r.metadata_blocks,
            leaked_blocks: r.leaked_blocks,
            errors: r.errors,
            warnings: r.warnings,
        })
    }

    fn gc(&self) -> ApiResult<GcSummary> {
        let bar =
            transfer::progress_bar(self.show_progress, 0, "gc: marking", "{pos}/{len} blocks");
        let progress = |marked: u64, allocated: u64| {
            bar.set_length(allocated);
            bar.set_position(marked);
            *self.gc_progress.lock() = Some(GcProgress {
                marked_blocks: marked,
                allocated_blocks: allocated,
            });
        };
        let r = self.store.gc_with_progress(&progress);
        bar.finish_and_clear();
        *self.gc_progress.lock() = None;
        let r = r?;
        Ok(GcSummary {
            freed_blocks: r.freed_blocks,
            freed_bytes: r.freed_bytes,
        })
    }

    fn gc_progress(&self) -> ApiResult<Option<GcProgress>> {
        Ok(self.gc_progress.lock().clone())
    }

    fn df(&self, scan: bool) -> ApiResult<SpaceSummary> {
        let stats = self.store.stats();
        let disks = self
            .list()?
            .into_iter()
            .map(|d| {
                let space = self.store.space(&d.name)?;
                Ok(DiskUse {
                    name: d.name,
                    size_bytes: d.size_bytes,
                    allocated_bytes: d.allocated_bytes,
                    used_bytes: space.used_bytes,
                    referenced_bytes: space.referenced_bytes,
                    live_used_bytes: space.live_used_bytes,
                    snapshots: d.snapshots,
                })
            })
            .collect::<ApiResult<Vec<_>>>()?;
        let scan = scan.then(|| self.scan_space()).transpose()?;
        Ok(SpaceSummary {
            capacity_bytes: stats.capacity_bytes,
            used_bytes: stats.used_bytes,
            free_bytes: stats.free_bytes,
            disks,
            scan,
        })
    }
}

/// Makes a deferred snapshot durable on the runtime's blocking pool once
/// the answer is out (at once, on this thread, outside a runtime). A
/// failure is logged; the disk's next FLUSH or commit writes it again and
/// reports it to its client.
fn make_durable_soon(vdi: Vdi) {
    let write = move || {
        if let Err(e) = vdi.make_durable() {
            warn!(
                "making a snapshot of disk {} durable failed: {e}",
                vdi.name()
            );
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(write)),
        Err(_) => write(),
    }
}
