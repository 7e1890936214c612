//! Deterministic simulation of several appliances sharing one pool: a few
//! stores opened in shared mode on one in-memory device, coordinated by an
//! in-process lease service (`MemCluster`), driven by a seeded sequence of
//! operations on random hosts: create, write, flush, snapshot, clone,
//! close, delete, list; snapshots read on any host (views kept open over
//! many steps), deleted by their disk's holder, and reclaimed by the
//! store's upkeep; hosts crash (their store vanishes without a commit) and
//! have their lease expire while still running (they must then fail every
//! write and read, never overwrite the next holder's); hosts ask for disks
//! others hold (a migrating VM) and holders give them up, but only disks
//! whose clients flushed everything they wrote.
//!
//! Checked after every step: every disk a live host has open is one whose
//! writer key that host holds (so at most one writer per disk), every
//! host's `list` is the model's. A view reads what its snapshot held when
//! it was opened, until it is closed, whatever was deleted meanwhile (no
//! block reclaimed under a reader). At checkpoints and at the end, every host
//! lets its disks go and an observer store opened alone must find `check`
//! clean (no block referenced twice: no double allocation) and every disk
//! and snapshot holding what the model says (nothing flushed lost).
//!
//! Every host has a write-back log on a device of its own that survives
//! its crashes, and half the disks are created with the write-back
//! policy: their writes (and every other write of their host meanwhile)
//! reach the pool through the log (docs/CACHE.md §9.8). A crashed host
//! comes back with its log, which it replays and destages before anything
//! else; a disk whose holder lost its lease with its log named stays its
//! own until it renews or restarts.
//!
//! `SIM_SEEDS` sets how many seeds run (CI runs a few hundred; long runs by
//! hand), `SIM_SEED` runs one.

use parallax_device::{MemDevice, SplitMix};
use parallax_engine::{
    CachePolicy, Coordinator, CreateOptions, Error, MemCluster, MemCoordinator, OpenOptions,
    ReadDisk, SnapshotView, Store, Vdi, WriteLog, MIN_LOG_BYTES,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const BLOCK: usize = 4096;
const HOSTS: u64 = 3;

/// What one disk must hold.
#[derive(Clone, Debug)]
struct DiskModel {
    id: u64,
    /// Content if every write made lands.
    data: Vec<u8>,
    /// Content as of the last commit.
    committed: Vec<u8>,
    /// Per block, contents written since the last commit.
    pending: BTreeMap<usize, Vec<Vec<u8>>>,
    snapshots: Vec<(String, Vec<u8>)>,
    /// The host that has it open, if any.
    holder: Option<u64>,
    /// Written through its holder since that holder's last flush: the
    /// holder must not give it up when asked.
    unflushed: bool,
}

impl DiskModel {
    fn commit(&mut self) {
        self.committed = self.data.clone();
        self.pending.clear();
    }

    /// A crash of its holder: what was not committed may or may not be
    /// there; from now on each block is the committed content or a
    /// pending one (the test cannot know which).
    fn acceptable(&self, actual: &[u8]) -> Result<(), String> {
        for (b, chunk) in actual.chunks(BLOCK).enumerate() {
            let ok = self.committed[b * BLOCK..(b + 1) * BLOCK] == *chunk
                || self
                    .pending
                    .get(&b)
                    .is_some_and(|v| v.iter().any(|c| c[..] == *chunk));
            if !ok {
                return Err(format!("block {b} matches nothing written"));
            }
        }
        Ok(())
    }
}

struct Host {
    id: u64,
    store: Store,
    coord: Arc<MemCoordinator>,
    /// Its write-back log (the device is the sim's, kept across crashes).
    log: Option<Arc<WriteLog>>,
    handles: BTreeMap<String, Vdi>,
    /// Snapshot views open on this host, with what they must read.
    views: Vec<(String, Vec<u8>, SnapshotView)>,
    /// Its lease expired while it ran: every write must fail.
    fenced: bool,
    /// The disks it held when its lease expired, as the model had them
    /// then (what it brings back if it renews its lease and nobody took
    /// them).
    held_at_expiry: BTreeMap<String, DiskModel>,
    /// Of those, the ones left as they were because its write-back log was
    /// named (their newest writes may be only there): resolved once it
    /// restarts, if it does not renew.
    in_its_log: Vec<String>,
}

/// Checks what a view reads: its snapshot's content, or (on a fenced host,
/// whose pins may be gone) an error.
fn verify_view(host: &Host, what: &str, content: &[u8], view: &SnapshotView) {
    let mut b = vec![0u8; content.len()];
    match view.read(&mut b, 0) {
        Ok(()) => {
            assert!(!host.fenced, "host {}: a fenced host read {what}", host.id);
            assert!(
                b == content,
                "host {}: {what} changed under its reader",
                host.id
            );
        }
        Err(Error::Fenced(_)) if host.fenced => {}
        Err(e) => panic!("host {}: reading {what}: {e}", host.id),
    }
}

struct Sim {
    dev: Arc<MemDevice>,
    /// Each host's cache device (index: host id − 1).
    log_devs: Vec<Arc<MemDevice>>,
    /// Disks created write-back.
    write_back: u64,
    /// Snapshots not found elsewhere yet (their commit still in a log).
    not_yet_on_pool: u64,
    cluster: Arc<MemCluster>,
    hosts: Vec<Host>,
    disks: BTreeMap<String, DiskModel>,
    rng: SplitMix,
    next: u64,
    writes_refused_fenced: u64,
    busy_refusals: u64,
    crashes: u64,
    /// Views opened on a host that did not have the disk open (pinned
    /// through the coordinator), and snapshots deleted while some host had
    /// a view of them.
    cluster_views: u64,
    deleted_while_read: u64,
    online_checks: u64,
    online_gcs: u64,
    gc_freed: u64,
    takeovers: u64,
    handoffs: u64,
    renewals: u64,
    taken_back: u64,
    /// Disks asked for by another host and given up by their holder.
    yielded: u64,
    /// Holders asked for a disk they had written without a flush since.
    kept_unflushed: u64,
}

fn open_host(
    dev: &Arc<MemDevice>,
    cluster: &Arc<MemCluster>,
    id: u64,
    log_dev: &Arc<MemDevice>,
) -> Host {
    let coord = cluster.host(id);
    let named = coord.write_log_of(id).unwrap().map_or(0, |(l, _)| l);
    let store_id = Store::peek_id(&**dev).unwrap();
    let (log, _) = WriteLog::open(log_dev.clone(), dev.clone(), store_id, named, 1).unwrap();
    let log = Arc::new(log);
    let store = Store::open(
        log.clone(),
        &OpenOptions {
            host_id: id,
            coordinator: Some(coord.clone()),
            write_log: Some(log.clone()),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    Host {
        id,
        store,
        coord,
        log: Some(log),
        handles: BTreeMap::new(),
        views: Vec::new(),
        fenced: false,
        held_at_expiry: BTreeMap::new(),
        in_its_log: Vec::new(),
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(131) as u8).wrapping_add(i as u8 / 16) | 1)
        .collect()
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let dev = new_pool(48 << 20);
        let cluster = MemCluster::new();
        let log_devs: Vec<_> = (1..=HOSTS).map(|_| log_dev()).collect();
        let hosts = (1..=HOSTS)
            .map(|id| open_host(&dev, &cluster, id, &log_devs[id as usize - 1]))
            .collect();
        Sim {
            dev,
            log_devs,
            write_back: 0,
            not_yet_on_pool: 0,
            cluster,
            hosts,
            disks: BTreeMap::new(),
            rng: SplitMix(seed),
            next: 0,
            writes_refused_fenced: 0,
            busy_refusals: 0,
            crashes: 0,
            cluster_views: 0,
            deleted_while_read: 0,
            online_checks: 0,
            online_gcs: 0,
            gc_freed: 0,
            takeovers: 0,
            handoffs: 0,
            renewals: 0,
            taken_back: 0,
            yielded: 0,
            kept_unflushed: 0,
        }
    }

    fn pick(&mut self, n: usize) -> usize {
        (self.rng.next_u64() % n as u64) as usize
    }

    fn pick_disk(&mut self) -> Option<String> {
        let names: Vec<String> = self.disks.keys().cloned().collect();
        (!names.is_empty()).then(|| names[self.pick(names.len())].clone())
    }

    /// Host `h`'s handle on `name`, opening it (taking the writer key).
    fn handle(&mut self, h: usize, name: &str) -> Result<Vdi, Error> {
        if let Some(v) = self.hosts[h].handles.get(name) {
            return Ok(v.clone());
        }
        let v = match self.hosts[h].store.open_vdi(name) {
            // Its holder crashed or lost its lease: take it over (the grace
            // is 0: a crashed store has nothing in flight, and a fenced
            // one refuses every write).
            Err(Error::Busy(why)) if why.contains("did not let it go") => {
                let (v, report) =
                    self.hosts[h]
                        .store
                        .take_over(name, Duration::ZERO, Duration::ZERO)?;
                assert!(report.taken_over, "{report:?}");
                assert!(report.epoch > report.from_epoch, "{report:?}");
                self.takeovers += 1;
                v
            }
            r => r?,
        };
        self.hosts[h].handles.insert(name.to_string(), v.clone());
        let m = self.disks.get_mut(name).unwrap();
        if m.holder != Some(self.hosts[h].id) {
            // A disk opened anew: nothing written through it yet.
            m.unflushed = false;
        }
        m.holder = Some(self.hosts[h].id);
        Ok(v)
    }

    /// An error a host may get: busy (another holds the disk) is counted
    /// and must name a live holder; fenced only on a fenced host.
    fn expected(&mut self, h: usize, name: &str, e: &Error) {
        match e {
            Error::Busy(_) => {
                self.busy_refusals += 1;
            }
            // A snapshot its holder took is read elsewhere once its commit
            // is on the pool: with a write-back log, once destaged.
            Error::NotFound(why) if why.contains("seen once it is committed") => {
                self.not_yet_on_pool += 1;
            }
            Error::Fenced(_) => {
                assert!(
                    self.hosts[h].fenced,
                    "host {} fenced without expiry: {e}",
                    h + 1
                );
                self.writes_refused_fenced += 1;
            }
            e => {
                let observer = Store::open(self.dev.clone(), &OpenOptions::default()).unwrap();
                let lists: Vec<Vec<String>> = self.hosts.iter().map(|x| x.store.list()).collect();
                panic!(
                    "host {} on {name}: unexpected error {e}\nobserver {:?}\nhosts {lists:?}",
                    h + 1,
                    observer.list()
                )
            }
        }
    }

    fn step(&mut self) {
        let h = self.pick(self.hosts.len());
        let op = self.rng.next_u64() % 31;
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!(
                "host {} op {op} disks {:?}",
                h + 1,
                self.disks
                    .iter()
                    .map(|(n, m)| (n.clone(), m.holder))
                    .collect::<Vec<_>>()
            );
        }
        match op {
            0 | 1 => {
                let name = format!("d{}", self.next);
                self.next += 1;
                let blocks = 1 + self.pick(16);
                if self.hosts[h].fenced {
                    let r = self.hosts[h]
                        .store
                        .create_vdi(&name, (blocks * BLOCK) as u64);
                    assert!(r.is_err(), "a fenced host created a disk");
                    return;
                }
                let v = self.hosts[h]
                    .store
                    .create_vdi(&name, (blocks * BLOCK) as u64)
                    .unwrap();
                if self.rng.next_u64().is_multiple_of(2) {
                    v.set_cache_policy(CachePolicy::WriteBack).unwrap();
                    self.hosts[h].store.refresh_write_back().unwrap();
                    self.write_back += 1;
                }
                let zero = vec![0; blocks * BLOCK];
                self.disks.insert(
                    name.clone(),
                    DiskModel {
                        id: v.id(),
                        data: zero.clone(),
                        committed: zero,
                        pending: BTreeMap::new(),
                        snapshots: Vec::new(),
                        holder: Some(self.hosts[h].id),
                        unflushed: false,
                    },
                );
                self.hosts[h].handles.insert(name, v);
            }
            2..=8 => {
                let Some(name) = self.pick_disk() else { return };
                let v = match self.handle(h, &name) {
                    Ok(v) => v,
                    Err(e) => return self.expected(h, &name, &e),
                };
                let size = self.disks[&name].data.len();
                let first = self.pick(size / BLOCK);
                let n = 1 + self.pick((size / BLOCK - first).min(3));
                let seed = self.rng.next_u64();
                let data = pattern(seed, n * BLOCK);
                match v.write(&data, (first * BLOCK) as u64) {
                    Ok(()) => {
                        assert!(!self.hosts[h].fenced, "a fenced host's write succeeded");
                        let m = self.disks.get_mut(&name).unwrap();
                        m.unflushed = true;
                        m.data[first * BLOCK..(first + n) * BLOCK].copy_from_slice(&data);
                        for b in first..first + n {
                            let c = m.data[b * BLOCK..(b + 1) * BLOCK].to_vec();
                            m.pending.entry(b).or_default().push(c);
                        }
                    }
                    Err(e) => self.expected(h, &name, &e),
                }
            }
            9 | 10 => {
                let Some(name) = self.pick_disk() else { return };
                let Some(v) = self.hosts[h].handles.get(&name).cloned() else {
                    return;
                };
                match v.flush() {
                    Ok(()) => {
                        assert!(!self.hosts[h].fenced, "a fenced host's flush succeeded");
                        self.disks.get_mut(&name).unwrap().unflushed = false;
                        self.commit(&name);
                    }
                    Err(e) => self.expected(h, &name, &e),
                }
            }
            11 | 12 => {
                let Some(name) = self.pick_disk() else { return };
                let v = match self.handle(h, &name) {
                    Ok(v) => v,
                    Err(e) => return self.expected(h, &name, &e),
                };
                let snap = format!("s{}", self.next);
                self.next += 1;
                match v.snapshot(Some(&snap)) {
                    Ok(_) => {
                        assert!(!self.hosts[h].fenced, "a fenced host took a snapshot");
                        self.commit(&name);
                        let m = self.disks.get_mut(&name).unwrap();
                        let c = m.data.clone();
                        m.snapshots.push((snap, c));
                    }
                    Err(e) => self.expected(h, &name, &e),
                }
            }
            13 => {
                // Clone a snapshot (taking the origin's key for a moment).
                let Some(name) = self.pick_disk() else { return };
                let snaps = self.disks[&name].snapshots.clone();
                if snaps.is_empty() {
                    return;
                }
                let (snap, content) = snaps[self.pick(snaps.len())].clone();
                let new = format!("d{}", self.next);
                self.next += 1;
                match self.hosts[h].store.clone_snapshot(&name, &snap, &new) {
                    Ok(v) => {
                        assert!(!self.hosts[h].fenced, "a fenced host made a clone");
                        // The origin is now open here too (for the clone).
                        self.note_open(h);
                        self.disks.insert(
                            new.clone(),
                            DiskModel {
                                id: v.id(),
                                data: content.clone(),
                                committed: content,
                                pending: BTreeMap::new(),
                                snapshots: Vec::new(),
                                holder: Some(self.hosts[h].id),
                                unflushed: false,
                            },
                        );
                        self.hosts[h].handles.insert(new, v);
                    }
                    Err(e) => self.expected(h, &name, &e),
                }
            }
            14 | 15 => {
                let Some(name) = self.pick_disk() else { return };
                self.hosts[h].handles.remove(&name);
                if self.hosts[h]
                    .store
                    .open_disk_ids()
                    .contains(&self.disks[&name].id)
                {
                    match self.hosts[h].store.close_vdi(&name) {
                        Ok(()) => {
                            self.commit(&name);
                            self.disks.get_mut(&name).unwrap().holder = None;
                        }
                        Err(e) => self.expected(h, &name, &e),
                    }
                }
            }
            16 => {
                let Some(name) = self.pick_disk() else { return };
                self.hosts[h].handles.remove(&name);
                match self.hosts[h].store.delete_vdi(&name) {
                    Ok(()) => {
                        assert!(!self.hosts[h].fenced, "a fenced host deleted a disk");
                        self.disks.remove(&name);
                    }
                    // Clones hang from it, or another host holds it.
                    Err(Error::Busy(_)) => self.busy_refusals += 1,
                    Err(e) => self.expected(h, &name, &e),
                }
            }
            17 => {
                // A crash: the store vanishes without committing; its lease
                // ends; it comes back with a new one.
                if !self.rng.next_u64().is_multiple_of(4) {
                    return;
                }
                self.crash(h);
            }
            18 => {
                // The lease ends while the host still runs (a pause): it is
                // fenced; another host may take its disks.
                if !self.rng.next_u64().is_multiple_of(4) || self.hosts[h].fenced {
                    return;
                }
                let held = self.keys_of(h);
                self.hosts[h].held_at_expiry = held
                    .iter()
                    .map(|n| (n.clone(), self.disks[n].clone()))
                    .collect();
                self.cluster.expire(self.hosts[h].id);
                self.hosts[h].fenced = true;
                let id = self.hosts[h].id;
                for m in self.disks.values_mut() {
                    if m.holder == Some(id) {
                        m.holder = None;
                    }
                }
                if self.hosts[h].coord.write_log_of(id).unwrap().is_some() {
                    // Only this host can bring them back (renewed or
                    // restarted): nobody else takes them meanwhile.
                    self.hosts[h].in_its_log = held;
                } else {
                    self.resolve(&held, "expiry");
                }
            }
            20 | 21 => {
                // A view of any snapshot on host `h`, kept open.
                let Some(name) = self.pick_disk() else { return };
                let snaps = self.disks[&name].snapshots.clone();
                if snaps.is_empty() {
                    return;
                }
                let (snap, content) = snaps[self.pick(snaps.len())].clone();
                let id = self.disks[&name].id;
                let here = self.hosts[h].store.open_disk_ids().contains(&id);
                match self.hosts[h].store.open_snapshot(&name, &snap) {
                    Ok(view) => {
                        self.cluster_views += u64::from(!here);
                        let what = format!("{name}@{snap}");
                        verify_view(&self.hosts[h], &what, &content, &view);
                        self.hosts[h].views.push((what, content, view));
                    }
                    Err(e) => self.expected(h, &name, &e),
                }
            }
            22 => {
                // Close a view, checking what it reads first.
                if self.hosts[h].views.is_empty() {
                    return;
                }
                let i = self.pick(self.hosts[h].views.len());
                let (what, content, view) = self.hosts[h].views.remove(i);
                verify_view(&self.hosts[h], &what, &content, &view);
            }
            23 => {
                // Delete a snapshot through its disk (taking its key).
                let Some(name) = self.pick_disk() else { return };
                let snaps = self.disks[&name].snapshots.clone();
                if snaps.is_empty() {
                    return;
                }
                let i = self.pick(snaps.len());
                let v = match self.handle(h, &name) {
                    Ok(v) => v,
                    Err(e) => return self.expected(h, &name, &e),
                };
                match v.delete_snapshot(&snaps[i].0) {
                    Ok(_) => {
                        assert!(!self.hosts[h].fenced, "a fenced host deleted a snapshot");
                        let what = format!("{name}@{}", snaps[i].0);
                        let read = self
                            .hosts
                            .iter()
                            .any(|x| x.views.iter().any(|v| v.0 == what));
                        self.deleted_while_read += u64::from(read);
                        self.disks.get_mut(&name).unwrap().snapshots.remove(i);
                    }
                    Err(e) => self.expected(h, &name, &e),
                }
            }
            24 => {
                // The daemon's upkeep, without its commits and closes: what
                // deletions hid is reclaimed if nothing holds it.
                let long = Duration::from_secs(1 << 30);
                match self.hosts[h].store.settle(long, long) {
                    Ok(_) => {}
                    Err(e) => self.expected(h, "(settle)", &e),
                }
                // What was reclaimed may be handed out again at once: a
                // reader of it would now see other data.
                for host in &self.hosts {
                    for (what, content, view) in &host.views {
                        verify_view(host, what, content, view);
                    }
                }
            }
            25 => {
                // `check` with every appliance running: clean.
                match self.hosts[h].store.check() {
                    Ok(report) => {
                        assert!(!self.hosts[h].fenced, "a fenced host ran check");
                        assert!(
                            report.is_clean(),
                            "host {}: online check: {:#?}",
                            h + 1,
                            report.errors
                        );
                        self.online_checks += 1;
                    }
                    Err(e) => self.expected(h, "(check)", &e),
                }
            }
            26 => {
                // `gc` with every appliance running: it frees only what no
                // host uses (the checkpoints read every disk and check).
                match self.hosts[h].store.gc() {
                    Ok(r) => {
                        assert!(!self.hosts[h].fenced, "a fenced host ran gc");
                        self.online_gcs += 1;
                        self.gc_freed += r.freed_blocks;
                    }
                    Err(e) => self.expected(h, "(gc)", &e),
                }
                for host in &self.hosts {
                    for (what, content, view) in &host.views {
                        verify_view(host, what, content, view);
                    }
                }
            }
            27 => {
                // A cooperative hand-off of a disk host `h` holds.
                let Some(name) = self.pick_disk() else { return };
                let id = self.disks[&name].id;
                if !self.hosts[h].store.open_disk_ids().contains(&id) {
                    return;
                }
                let to = 1 + self.pick(HOSTS as usize - 1) as u64;
                let to = if to >= self.hosts[h].id { to + 1 } else { to };
                match self.hosts[h].store.hand_off(&name, to) {
                    Ok(_) => {
                        assert!(!self.hosts[h].fenced, "a fenced host handed a disk off");
                        self.handoffs += 1;
                        // Committed whole; nothing here may touch it now.
                        self.commit(&name);
                        self.disks.get_mut(&name).unwrap().holder = None;
                        if let Some(v) = self.hosts[h].handles.remove(&name) {
                            assert!(
                                matches!(v.write(&[1; BLOCK], 0), Err(Error::Fenced(_))),
                                "a write after the hand-off went through"
                            );
                        }
                        // Reserved for `to`: a third host is refused.
                        let third = (0..self.hosts.len())
                            .find(|&x| x != h && self.hosts[x].id != to && !self.hosts[x].fenced);
                        if let Some(x) = third {
                            match self.hosts[x].store.open_vdi(&name) {
                                Err(Error::Busy(why)) => {
                                    assert!(why.contains("handed off"), "{why}")
                                }
                                other => panic!(
                                    "host {} opened a disk handed to host {to}: {:?}",
                                    x + 1,
                                    other.map(|v| v.id())
                                ),
                            }
                        }
                    }
                    Err(e) => self.expected(h, &name, &e),
                }
            }
            28 => {
                // Host `h` asks for a disk another host holds (a VM
                // migrating to it).
                let Some(name) = self.pick_disk() else { return };
                let m = &self.disks[&name];
                if m.holder.is_none() || m.holder == Some(self.hosts[h].id) {
                    return;
                }
                let id = m.id;
                if let Err(e) = self.hosts[h].coord.request_writer(id) {
                    self.expected(h, &name, &e);
                }
            }
            29 => self.yield_requested(h),
            _ => {
                if self.hosts[h].fenced {
                    // A fenced host gets a new lease, or is restarted.
                    if self.rng.next_u64().is_multiple_of(2) {
                        self.renew(h);
                    } else {
                        self.crash(h);
                    }
                    return;
                }
                let mut listed = self.hosts[h].store.list();
                listed.sort();
                let want: Vec<String> = self.disks.keys().cloned().collect();
                assert_eq!(listed, want, "host {}'s list", h + 1);
            }
        }
    }

    /// Host `h` gives up the disks others asked for whose clients are done
    /// with them: never one written since its last flush. The host that
    /// asked first opens it at once (it is reserved for it), with
    /// everything written before; the old handles fail.
    fn yield_requested(&mut self, h: usize) {
        let quiet = if self.rng.next_u64().is_multiple_of(4) {
            Duration::from_secs(1 << 30)
        } else {
            Duration::ZERO
        };
        let requests = self.hosts[h].coord.writer_requests().unwrap();
        let id = self.hosts[h].id;
        for m in self.disks.values() {
            if m.holder == Some(id) && m.unflushed && requests.iter().any(|r| r.0 == m.id) {
                self.kept_unflushed += 1;
            }
        }
        let handed = match self.hosts[h].store.yield_requested(quiet) {
            Ok(handed) => handed,
            Err(e) => return self.expected(h, "(yield)", &e),
        };
        assert!(
            handed.is_empty() || quiet.is_zero(),
            "host {id} gave up disks in use: {handed:?}"
        );
        for (name, report) in handed {
            assert!(!self.hosts[h].fenced, "a fenced host gave a disk up");
            let m = self.disks.get_mut(&name).unwrap();
            assert!(
                !m.unflushed,
                "host {id} gave {name} up with writes its clients never flushed"
            );
            let first = requests
                .iter()
                .find(|r| r.0 == m.id && r.1 != id)
                .map(|r| r.1);
            assert_eq!(
                first,
                Some(report.to),
                "{name} not given to the first asker"
            );
            self.yielded += 1;
            self.commit(&name);
            self.disks.get_mut(&name).unwrap().holder = None;
            if let Some(v) = self.hosts[h].handles.remove(&name) {
                assert!(
                    matches!(v.write(&[1; BLOCK], 0), Err(Error::Fenced(_))),
                    "a write after the disk was given up went through"
                );
            }
            let to = self.hosts.iter().position(|x| x.id == report.to).unwrap();
            match self.handle(to, &name) {
                Ok(v) => {
                    let mut b = vec![0u8; self.disks[&name].data.len()];
                    v.read(&mut b, 0).unwrap();
                    assert!(
                        b == self.disks[&name].data,
                        "host {} got {name} without what was written before",
                        report.to
                    );
                }
                // It asked, then lost its lease.
                Err(e) => self.expected(to, &name, &e),
            }
            let vdi = self.disks[&name].id;
            self.hosts[to].coord.withdraw_request(vdi);
        }
    }

    /// Fenced host `h` gets a new lease; its upkeep takes back the disks
    /// nobody took meanwhile, with every write it had made to them (it
    /// must read exactly what it had), and lets go of the others (their
    /// handles fail).
    fn renew(&mut self, h: usize) {
        let id = self.hosts[h].id;
        self.cluster.renew(id);
        self.hosts[h].fenced = false;
        self.hosts[h].in_its_log.clear();
        self.renewals += 1;
        let long = Duration::from_secs(1 << 30);
        if let Err(e) = self.hosts[h].store.settle(long, long) {
            self.expected(h, "(settle)", &e);
        }
        // Views pinned under the old lease fail from now on (their pins
        // went with it); those of disks taken back still read.
        let views = std::mem::take(&mut self.hosts[h].views);
        for (what, content, view) in views {
            let mut b = vec![0u8; content.len()];
            match view.read(&mut b, 0) {
                Ok(()) => {
                    assert!(b == content, "host {id}: {what} changed under its reader");
                    self.hosts[h].views.push((what, content, view));
                }
                Err(Error::Fenced(_)) => {}
                Err(e) => panic!("host {id}: reading {what} after renewal: {e}"),
            }
        }
        let open = self.hosts[h].store.open_disk_ids();
        for (name, before) in std::mem::take(&mut self.hosts[h].held_at_expiry) {
            let handle = self.hosts[h].handles.get(&name).cloned();
            let back = self.disks.get(&name).is_some_and(|m| open.contains(&m.id));
            if !back {
                if let Some(v) = handle {
                    assert!(
                        matches!(v.write(&[1; BLOCK], 0), Err(Error::Fenced(_))),
                        "host {id} wrote {name}, which it did not take back"
                    );
                    self.hosts[h].handles.remove(&name);
                }
                continue;
            }
            self.taken_back += 1;
            let v = self.hosts[h].store.open_vdi(&name).unwrap();
            let mut buf = vec![0u8; before.data.len()];
            v.read(&mut buf, 0).unwrap();
            assert!(
                buf == before.data,
                "host {id} took {name} back without what it had written"
            );
            let m = self.disks.get_mut(&name).unwrap();
            m.data = buf;
            // The takeback committed it.
            m.commit();
            m.holder = Some(id);
            self.hosts[h].handles.insert(name, v);
        }
    }

    /// Records that a clone opened its origin on host `h`.
    fn note_open(&mut self, h: usize) {
        let ids = self.hosts[h].store.open_disk_ids();
        let id = self.hosts[h].id;
        for m in self.disks.values_mut() {
            if ids.contains(&m.id) {
                m.holder = Some(id);
            }
        }
    }

    fn commit(&mut self, name: &str) {
        self.disks.get_mut(name).unwrap().commit();
    }

    fn crash(&mut self, h: usize) {
        self.crashes += 1;
        let id = self.hosts[h].id;
        // A fenced host holds no key any more (its disks were resolved
        // when its lease ended).
        let mut held = self.keys_of(h);
        let old = std::mem::replace(&mut self.hosts[h], open_host_placeholder());
        held.extend(old.in_its_log);
        // Nothing committed, nothing given back: what a dead process leaves
        // (its pins go with its lease, just below). Its log keeps what it
        // wrote there.
        drop(old.views);
        drop(old.handles);
        old.store.abandon();
        drop(old.log);
        self.cluster.expire(id);
        for m in self.disks.values_mut() {
            if m.holder == Some(id) {
                m.holder = None;
            }
        }
        // Back with its log, which reaches the pool as it opens.
        self.hosts[h] = open_host(&self.dev, &self.cluster, id, &self.log_devs[h]);
        self.resolve(&held, "crash");
    }

    /// Waits until what the hosts' logs hold is on the pool (a fenced
    /// host's destage waits for its lease: not that one). An observer
    /// opened alone reads the pool as a whole (every extent's bitmap, then
    /// headers), which a destage in progress would change under it.
    fn logs_reach_the_pool(&self) {
        for host in self.hosts.iter().filter(|h| !h.fenced) {
            if let Some(log) = &host.log {
                log.drain_to(log.head_lsn()).unwrap();
            }
        }
    }

    /// The disks whose writer key host `h` holds.
    fn keys_of(&self, h: usize) -> Vec<String> {
        let writers = self.cluster.writers();
        let id = self.hosts[h].id;
        self.disks
            .iter()
            .filter(|(_, m)| writers.get(&m.id).is_some_and(|w| w.0 == id))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The disks a host lost (crash or expiry) hold, block by block, what
    /// was committed or something written since: read them from the pool
    /// (an observer store, alone), check that, and take it as the new
    /// committed content.
    fn resolve(&mut self, names: &[String], what: &str) {
        if names.is_empty() {
            return;
        }
        self.logs_reach_the_pool();
        let observer = Store::open(self.dev.clone(), &OpenOptions::default()).unwrap();
        for name in names {
            let v = observer.open_vdi(name).unwrap();
            let m = self.disks.get_mut(name).unwrap();
            let mut buf = vec![0u8; m.data.len()];
            v.read(&mut buf, 0).unwrap();
            if let Err(e) = m.acceptable(&buf) {
                panic!("disk {name} after a {what}: {e}");
            }
            m.data = buf;
            m.commit();
        }
    }

    /// At most one writer per disk: what a live host has open, it holds
    /// the key of.
    fn check_writers(&self) {
        let writers = self.cluster.writers();
        for host in self.hosts.iter().filter(|h| !h.fenced) {
            let open = host.store.open_disk_ids();
            for (name, v) in &host.handles {
                assert!(
                    open.contains(&v.id()),
                    "host {} has a handle on {name}, which its store let go",
                    host.id
                );
            }
            for id in open {
                assert_eq!(
                    writers.get(&id).map(|w| w.0),
                    Some(host.id),
                    "host {} has disk {id} open without its writer key",
                    host.id
                );
            }
        }
    }

    /// Every host lets its disks go (a fenced one is restarted first); an
    /// observer opened alone checks the pool and reads everything.
    fn quiesce_and_verify(&mut self, what: &str) {
        for h in 0..self.hosts.len() {
            if self.hosts[h].fenced {
                self.crash(h);
            }
            for (what, content, view) in std::mem::take(&mut self.hosts[h].views) {
                verify_view(&self.hosts[h], &what, &content, &view);
            }
            self.hosts[h].handles.clear();
            for id in self.hosts[h].store.open_disk_ids() {
                let name = self
                    .disks
                    .iter()
                    .find(|(_, m)| m.id == id)
                    .map(|(n, _)| n.clone());
                if let Some(name) = name {
                    self.hosts[h].store.close_vdi(&name).unwrap();
                    self.commit(&name);
                    self.disks.get_mut(&name).unwrap().holder = None;
                }
            }
        }
        assert!(
            self.cluster.writers().is_empty(),
            "{what}: writer keys left: {:?}",
            self.cluster.writers()
        );
        // Time passes: what is left in the logs (bitmaps written after the
        // last disk was let go) reaches the pool.
        self.logs_reach_the_pool();
        let observer = Store::open(self.dev.clone(), &OpenOptions::default()).unwrap();
        let report = observer.check().unwrap();
        assert!(report.is_clean(), "{what}: check: {:#?}", report.errors);
        let mut names = observer.list();
        names.sort();
        let want: Vec<String> = self.disks.keys().cloned().collect();
        assert_eq!(names, want, "{what}: the observer's list");
        for (name, m) in &self.disks {
            let v = observer.open_vdi(name).unwrap();
            let mut buf = vec![0u8; m.data.len()];
            v.read(&mut buf, 0).unwrap();
            assert!(
                buf == m.committed,
                "{what}: disk {name} lost a flushed write"
            );
            for (snap, content) in &m.snapshots {
                let view = v.open_snapshot(snap).unwrap();
                let mut b = vec![0u8; content.len()];
                view.read(&mut b, 0).unwrap();
                assert!(b == *content, "{what}: snapshot {name}@{snap} differs");
            }
        }
    }
}

/// Stands in for a host's store between a crash and the restart.
fn open_host_placeholder() -> Host {
    let dev = Arc::new(MemDevice::new(1 << 20));
    let store = Store::create(dev, &CreateOptions::default()).unwrap();
    Host {
        id: 0,
        store,
        coord: MemCluster::new().host(1),
        log: None,
        handles: BTreeMap::new(),
        views: Vec::new(),
        fenced: false,
        held_at_expiry: BTreeMap::new(),
        in_its_log: Vec::new(),
    }
}

fn run(seed: u64, steps: usize) -> Sim {
    // Shown with a failure (the test harness keeps stderr of passing tests).
    eprintln!("seed {seed}");
    let mut sim = Sim::new(seed);
    for i in 0..steps {
        sim.step();
        sim.check_writers();
        if i % 100 == 99 {
            sim.quiesce_and_verify(&format!("seed {seed} step {i}"));
        }
    }
    sim.quiesce_and_verify(&format!("seed {seed} end"));
    sim
}

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("SIM_SEED").ok().and_then(|v| v.parse().ok()) {
        return vec![s];
    }
    let n = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    (1..=n).collect()
}

#[test]
fn appliances_sharing_a_pool() {
    appliances_sharing(seeds());
}

/// The same on a pool with entry journals (format 2): every host reads the
/// others' journal snapshots, hands off and takes over journaled disks.
/// 60 seeds in CI (`SIM_SEEDS` for more).
#[test]
fn appliances_sharing_a_pool_with_journals() {
    JOURNALS.with(|j| j.set(true));
    let mut seeds = seeds();
    if std::env::var("SIM_SEEDS").is_err() && std::env::var("SIM_SEED").is_err() {
        seeds.truncate(60);
    }
    appliances_sharing(seeds);
}

fn appliances_sharing(seeds: Vec<u64>) {
    let n = seeds.len();
    let (mut refused, mut busy, mut crashes, mut views, mut deleted) = (0, 0, 0, 0, 0);
    let (mut checks, mut gcs, mut freed, mut takeovers, mut handoffs) = (0, 0, 0, 0, 0);
    let (mut renewals, mut taken_back, mut yielded, mut kept) = (0, 0, 0, 0);
    let (mut write_back, mut not_yet) = (0, 0);
    for seed in seeds {
        let sim = run(seed, 300);
        refused += sim.writes_refused_fenced;
        busy += sim.busy_refusals;
        crashes += sim.crashes;
        views += sim.cluster_views;
        deleted += sim.deleted_while_read;
        checks += sim.online_checks;
        gcs += sim.online_gcs;
        freed += sim.gc_freed;
        takeovers += sim.takeovers;
        handoffs += sim.handoffs;
        renewals += sim.renewals;
        taken_back += sim.taken_back;
        yielded += sim.yielded;
        kept += sim.kept_unflushed;
        write_back += sim.write_back;
        not_yet += sim.not_yet_on_pool;
    }
    eprintln!(
        "fenced refusals {refused}, busy refusals {busy}, crashes {crashes}, \
         views pinned through the cluster {views}, snapshots deleted while read {deleted}, \
         online checks {checks}, online gcs {gcs} (freeing {freed} blocks), \
         takeovers {takeovers}, hand-offs {handoffs}, lease renewals {renewals} \
         (disks taken back {taken_back}), disks given up when asked {yielded} \
         (kept unflushed when asked {kept}), write-back disks {write_back} \
         (snapshots not yet on the pool when read elsewhere {not_yet})"
    );
    // The sequences reach the cases they are meant to (over many seeds).
    if n >= 50 {
        assert!(refused > 0 && busy > 0 && crashes > 0 && views > 0 && deleted > 0);
        assert!(checks > 0 && gcs > 0 && freed > 0 && takeovers > 0 && handoffs > 0);
        assert!(renewals > 0 && taken_back > 0 && yielded > 0 && kept > 0);
        assert!(write_back > 0);
    }
}

/// A coordinator that grants every writer key with one fixed epoch (a
/// coordination service that lost its state, or a stale one), and reports
/// every disk as let go cleanly under the second.
#[derive(Debug)]
struct FixedEpoch(u64, u64);

impl parallax_engine::Coordinator for FixedEpoch {
    fn host_id(&self) -> u64 {
        2
    }
    fn acquire_writer(&self, _vdi_id: u64) -> parallax_engine::Result<u64> {
        Ok(self.0)
    }
    fn release_writer(&self, _vdi_id: u64, _epoch: u64) {}
    fn released_epoch(&self, _vdi_id: u64) -> parallax_engine::Result<u64> {
        Ok(self.1)
    }
    fn hand_over(&self, _vdi_id: u64, _epoch: u64, _to: u64) -> parallax_engine::Result<()> {
        Ok(())
    }
    fn may_write(&self) -> bool {
        true
    }
    fn incarnation(&self) -> u64 {
        1
    }
    fn lock_catalog(&self) -> parallax_engine::Result<parallax_engine::CatalogLock> {
        Ok(parallax_engine::CatalogLock::new(()))
    }
    fn claim_extent(&self, _index: u64) -> parallax_engine::Result<bool> {
        Ok(true)
    }
    fn pin_snapshot(&self, _vdi_id: u64, _snap: u64) -> parallax_engine::Result<()> {
        Ok(())
    }
    fn unpin_snapshot(&self, _vdi_id: u64, _snap: u64) {}
    fn pinned_snapshots(
        &self,
        _vdi_id: u64,
    ) -> parallax_engine::Result<std::collections::HashSet<u64>> {
        Ok(Default::default())
    }
    fn request_writer(&self, _vdi_id: u64) -> parallax_engine::Result<()> {
        Ok(())
    }
    fn withdraw_request(&self, _vdi_id: u64) {}
    fn writer_requests(&self) -> parallax_engine::Result<Vec<(u64, u64)>> {
        Ok(Vec::new())
    }
    fn writer_host(&self, _vdi_id: u64) -> parallax_engine::Result<Option<u64>> {
        Ok(None)
    }
    fn name_write_log(&self, _log_id: u64, _locator: u64) -> parallax_engine::Result<()> {
        Ok(())
    }
    fn unname_write_log(&self) -> parallax_engine::Result<()> {
        Ok(())
    }
    fn write_log_of(&self, _host: u64) -> parallax_engine::Result<Option<(u64, u64)>> {
        Ok(None)
    }
    fn forget_write_log_of(&self, _host: u64) -> parallax_engine::Result<()> {
        Ok(())
    }
}

/// Every commit carries its writer's epoch; an appliance holding an older
/// epoch than the disk's last commit is refused the disk (it would be a
/// second writer), one holding a newer epoch opens it.
#[test]
fn a_disk_committed_under_a_newer_epoch_is_refused() {
    let dev = Arc::new(MemDevice::new(16 << 20));
    Store::create(dev.clone(), &CreateOptions::default())
        .map(drop)
        .unwrap();
    let cluster = MemCluster::new();
    let host1 = cluster.host(1);
    // Epochs granted before: the disk's will be above 5.
    for i in 0..5 {
        use parallax_engine::Coordinator;
        let e = host1.acquire_writer(1000 + i).unwrap();
        host1.release_writer(1000 + i, e);
    }
    let shared = |c: Arc<dyn parallax_engine::Coordinator>, host_id| OpenOptions {
        host_id,
        coordinator: Some(c),
        ..OpenOptions::default()
    };
    let store = Store::open(dev.clone(), &shared(host1, 1)).unwrap();
    let d = store.create_vdi("d", 1 << 20).unwrap();
    d.write(&[7; 4096], 0).unwrap();
    d.flush().unwrap();
    let epoch = d.info().writer_epoch;
    assert!(epoch > 5, "epoch {epoch}");
    drop(d);
    drop(store);
    let stale = Store::open(
        dev.clone(),
        &shared(Arc::new(FixedEpoch(epoch - 1, epoch)), 2),
    )
    .unwrap();
    match stale.open_vdi("d") {
        Err(Error::Fenced(_)) => {}
        other => panic!(
            "an older epoch opened the disk: {:?}",
            other.map(|v| v.id())
        ),
    }
    drop(stale);
    let newer = Store::open(dev, &shared(Arc::new(FixedEpoch(epoch + 1, epoch)), 2)).unwrap();
    let mut b = vec![0u8; 4096];
    newer.open_vdi("d").unwrap().read(&mut b, 0).unwrap();
    assert_eq!(b, vec![7; 4096]);
}

/// Host 2 reads and clones snapshots of a disk host 1 writes, without
/// opening it; host 1 deletes them: they stay (hidden) while host 2 reads
/// or clones them, and are reclaimed once it lets go.
#[test]
fn snapshots_read_and_cloned_elsewhere_are_kept_until_let_go() {
    let (dev, cluster, a, b) = two_hosts();
    let gold = a.create_vdi("gold", 64 * 4096).unwrap();
    gold.write(&pattern(1, 64 * 4096), 0).unwrap();
    gold.snapshot(Some("s1")).unwrap();
    gold.write(&pattern(2, 64 * 4096), 0).unwrap();
    gold.snapshot(Some("s2")).unwrap();

    // Host 2 neither opens gold nor takes its key.
    let clone = b.clone_snapshot("gold", "s1", "c").unwrap();
    let view = b.open_snapshot("gold", "s2").unwrap();
    assert_eq!(cluster.writer(gold.id()).map(|w| w.0), Some(1));
    assert_eq!(
        b.open_snapshot("gold", "nope").map(drop).unwrap_err().to_string(),
        Error::NotFound(
            "snapshot gold@nope does not exist (one another appliance took is seen once it is committed)"
                .into()
        )
        .to_string()
    );
    assert!(matches!(b.delete_vdi("gold"), Err(Error::Busy(_))));

    gold.delete_snapshot("s1").unwrap();
    gold.delete_snapshot("s2").unwrap();
    // New data reuses whatever was reclaimed.
    for i in 0..3 {
        a.reclaim_hidden().unwrap();
        gold.write(&pattern(10 + i, 64 * 4096), 0).unwrap();
        gold.flush().unwrap();
    }
    assert_eq!(
        gold.info().hidden_snapshots,
        2,
        "a read or cloned snapshot was reclaimed"
    );
    let read = |r: &dyn ReadDisk| {
        let mut buf = vec![0u8; 64 * 4096];
        r.read(&mut buf, 0).unwrap();
        buf
    };
    assert!(read(&clone) == pattern(1, 64 * 4096), "the clone changed");
    assert!(read(&view) == pattern(2, 64 * 4096), "the view changed");

    drop(view);
    assert!(
        a.reclaim_hidden().unwrap() > 0,
        "a snapshot no one reads was kept"
    );
    assert_eq!(gold.info().hidden_snapshots, 1);
    drop(clone);
    b.delete_vdi("c").unwrap();
    assert!(
        a.reclaim_hidden().unwrap() > 0,
        "a snapshot no one clones was kept"
    );
    assert_eq!(gold.info().hidden_snapshots, 0);
    drop(gold);
    drop((a, b));
    let observer = Store::open(dev, &OpenOptions::default()).unwrap();
    let report = observer.check().unwrap();
    assert!(report.is_clean(), "{:#?}", report.errors);
}

/// A disk whose holder lost its lease (or died) is not opened as if it had
/// been let go: it is taken over, after the grace, with a takeover commit
/// under a newer epoch; the old holder's writes fail. One let go cleanly
/// opens at once.
#[test]
fn a_disk_not_let_go_is_taken_over_after_the_grace() {
    let (dev, cluster, a, b) = two_hosts();
    let d = a.create_vdi("d", 1 << 20).unwrap();
    d.write(&[5; 4096], 0).unwrap();
    d.flush().unwrap();
    let old_epoch = d.info().writer_epoch;
    // Host 1's lease ends while it runs.
    cluster.expire(1);
    match b.open_vdi("d") {
        Err(Error::Busy(why)) => assert!(why.contains("did not let it go"), "{why}"),
        other => panic!("opened without a takeover: {:?}", other.map(|v| v.id())),
    }
    let grace = Duration::from_millis(150);
    let started = std::time::Instant::now();
    let (v, report) = b.take_over("d", Duration::from_secs(1), grace).unwrap();
    assert!(started.elapsed() >= grace, "the grace was not waited");
    assert!(report.taken_over && report.from_host == 1 && report.from_epoch == old_epoch);
    assert!(report.epoch > old_epoch, "{report:?}");
    assert_eq!(v.info().writer_epoch, report.epoch, "no takeover commit");
    let mut buf = vec![0u8; 4096];
    v.read(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![5; 4096]);
    assert!(matches!(d.write(&[6; 4096], 0), Err(Error::Fenced(_))));
    v.write(&[7; 4096], 0).unwrap();
    v.flush().unwrap();
    drop(v);
    // Let go cleanly: another host opens it with no takeover.
    b.close_vdi("d").unwrap();
    let c = open_host(&dev, &cluster, 3, &log_dev()).store;
    let started = std::time::Instant::now();
    let (v, report) = c
        .take_over("d", Duration::ZERO, Duration::from_secs(5))
        .unwrap();
    assert!(!report.taken_over && started.elapsed() < Duration::from_secs(1));
    v.read(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![7; 4096]);
    drop(v);
    drop((d, a, b, c));
    let observer = Store::open(dev, &OpenOptions::default()).unwrap();
    assert!(observer.check().unwrap().is_clean());
}

/// A fresh 32 MiB pool shared by hosts 1 and 2.
fn two_hosts() -> (Arc<MemDevice>, Arc<MemCluster>, Store, Store) {
    let dev = new_pool(32 << 20);
    let cluster = MemCluster::new();
    let a = open_host(&dev, &cluster, 1, &log_dev()).store;
    let b = open_host(&dev, &cluster, 2, &log_dev()).store;
    (dev, cluster, a, b)
}

/// A fresh pool of `bytes` with small extents (256 blocks), so that hosts
/// claim several.
/// A host's cache device (its write-back log).
fn log_dev() -> Arc<MemDevice> {
    Arc::new(MemDevice::new(MIN_LOG_BYTES))
}

fn new_pool(bytes: u64) -> Arc<MemDevice> {
    let dev = Arc::new(MemDevice::new(bytes));
    let store = Store::create(
        dev.clone(),
        &CreateOptions {
            extent_data_blocks: 256,
            host_id: 1,
        },
    )
    .unwrap();
    if JOURNALS.with(|j| j.get()) {
        store.enable_journal().unwrap();
    }
    dev
}

thread_local! {
    /// The pools this thread makes have entry journals on (format 2).
    static JOURNALS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A host whose lease ended while it ran (fenced) and that got a new one
/// takes back the keys of the disks nobody took meanwhile (their writes
/// pending from before go on), and lets go of a disk another host took
/// (every operation on it fails).
#[test]
fn a_renewed_lease_takes_back_what_nobody_took() {
    let (dev, cluster, a, b) = two_hosts();
    let kept = a.create_vdi("kept", 1 << 20).unwrap();
    let taken = a.create_vdi("taken", 1 << 20).unwrap();
    kept.write(&[1; 4096], 0).unwrap();
    taken.write(&[2; 4096], 0).unwrap();
    kept.flush().unwrap();
    taken.flush().unwrap();
    // Written before the lease ended, never flushed.
    kept.write(&[3; 4096], 4096).unwrap();
    let old_epoch = kept.info().writer_epoch;
    // A view here of a snapshot of a disk host 2 holds, pinned under the
    // lease about to end.
    let other = b.create_vdi("other", 1 << 20).unwrap();
    other.snapshot(Some("s")).unwrap();
    let view = a.open_snapshot("other", "s").unwrap();
    cluster.expire(1);
    assert!(matches!(kept.write(&[4; 4096], 0), Err(Error::Fenced(_))));
    let (t, _) = b
        .take_over("taken", Duration::ZERO, Duration::ZERO)
        .unwrap();
    t.write(&[5; 4096], 0).unwrap();
    t.flush().unwrap();
    // Host 2 lets it go again: the key is free, the header is host 2's.
    drop(t);
    b.close_vdi("taken").unwrap();
    cluster.renew(1);
    // Not before the upkeep took the keys back.
    assert!(matches!(kept.write(&[4; 4096], 0), Err(Error::Fenced(_))));
    let long = Duration::from_secs(3600);
    a.settle(long, long).unwrap();
    kept.write(&[6; 4096], 8192).unwrap();
    kept.flush().unwrap();
    assert!(kept.info().writer_epoch > old_epoch, "no new epoch");
    match taken.write(&[7; 4096], 0) {
        Err(Error::Fenced(why)) => assert!(why.contains("another appliance took it"), "{why}"),
        other => panic!("a disk another host took was written: {other:?}"),
    }
    // The view's pin went with the old lease: it no longer reads.
    let mut b4 = vec![0u8; 4096];
    assert!(
        matches!(view.read(&mut b4, 0), Err(Error::Fenced(_))),
        "a view read without its pin"
    );
    drop(view);
    let view = a.open_snapshot("other", "s").unwrap();
    view.read(&mut b4, 0).unwrap();
    drop((view, other));
    drop((kept, taken));
    drop((a, b));
    let observer = Store::open(dev, &OpenOptions::default()).unwrap();
    assert!(observer.check().unwrap().is_clean());
    let read = |name: &str, at: u64| {
        let mut b = vec![0u8; 4096];
        observer.open_vdi(name).unwrap().read(&mut b, at).unwrap();
        b[0]
    };
    assert_eq!(
        (read("kept", 0), read("kept", 4096), read("kept", 8192)),
        (1, 3, 6)
    );
    assert_eq!(read("taken", 0), 5, "the old holder overwrote the new one");
}

/// A client of host 2 waiting for a disk host 1 holds reads it as its
/// newest commit has it: everything host 1's clients flushed (and, in
/// blocks the commit owns, what they wrote since in place), never a block
/// host 1 freed and reused meanwhile (host 1 commits between and during
/// the reads, and a snapshot deleted meanwhile frees the blocks an older
/// commit referenced). Once host 2 holds the disk, reads go through it.
#[test]
fn a_disk_held_elsewhere_reads_as_its_newest_commit() {
    let (_dev, _cluster, a, b) = two_hosts();
    let v = a.create_vdi("d", 64 * BLOCK as u64).unwrap();
    v.write(&vec![1; 64 * BLOCK], 0).unwrap();
    v.flush().unwrap();
    v.write(&vec![2; 64 * BLOCK], 0).unwrap();
    let head = b.committed_head("d").unwrap();
    let mut buf = vec![0u8; 64 * BLOCK];
    head.read(&mut buf, 0).unwrap();
    // Written in place (the blocks are the commit's own): the new data.
    assert!(buf.iter().all(|&x| x == 2), "not the disk's data");
    let status = head.block_status(0, 64 * BLOCK as u64).unwrap();
    assert!(status.iter().all(|e| e.allocated), "{status:?}");
    // Rounds: a snapshot, new data, a flush, the snapshot deleted (its
    // blocks freed and reused by the next round's copy-on-write); every
    // read from host 2 must be one whole flushed round.
    for round in 3u8..40 {
        v.snapshot(Some(&format!("s{round}"))).unwrap();
        v.write(&vec![round; 64 * BLOCK], 0).unwrap();
        head.read(&mut buf, 0).unwrap();
        let first = buf[0];
        assert!(
            buf.iter().all(|&x| x == first) && first < round,
            "round {round}: read a mix or an unflushed round ({first})"
        );
        v.flush().unwrap();
        v.delete_snapshot(&format!("s{round}")).unwrap();
        a.settle(Duration::from_secs(1 << 30), Duration::from_secs(1 << 30))
            .unwrap();
        head.read(&mut buf, 0).unwrap();
        assert!(
            buf.iter().all(|&x| x == round),
            "round {round}: not the flushed data"
        );
    }
    // The same rounds with host 2 reading all along, from another thread.
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut buf = vec![0u8; 64 * BLOCK];
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match head.read(&mut buf, 0) {
                    Ok(()) => {
                        let first = buf[0];
                        assert!(
                            buf.iter().all(|&x| x == first),
                            "read a mix of rounds (blocks freed and reused under it)"
                        );
                        reads += 1;
                    }
                    Err(Error::Busy(_)) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            reads
        });
        for round in 40u8..200 {
            v.snapshot(Some(&format!("s{round}"))).unwrap();
            v.write(&vec![round; 64 * BLOCK], 0).unwrap();
            v.flush().unwrap();
            v.delete_snapshot(&format!("s{round}")).unwrap();
            a.settle(Duration::from_secs(1 << 30), Duration::from_secs(1 << 30))
                .unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(reader.join().unwrap() > 0);
    });

    // Host 2 holds it now: reads see what its own clients wrote.
    v.flush().unwrap();
    drop(v);
    a.hand_off("d", 2).unwrap();
    let w = b.open_vdi("d").unwrap();
    w.write(&vec![0x77; BLOCK], 0).unwrap();
    head.read(&mut buf[..BLOCK], 0).unwrap();
    assert!(buf[..BLOCK].iter().all(|&x| x == 0x77));
}
