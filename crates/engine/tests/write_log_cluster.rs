//! The write-back log in cluster mode (docs/CACHE.md §9.8): several
//! appliances on one pool (an in-process lease service), one of them with a
//! log whose destage to the pool is held back, so that the disk's newest
//! writes are only in that log. Another host must never read the disk, or
//! take it, as the pool alone has it.

mod common;

use common::gate::{Gate, OpenOnDrop};
use parallax_device::MemDevice;
use parallax_engine::{
    CachePolicy, Coordinator, CreateOptions, Error, Found, MemCluster, OpenOptions, Store,
    WriteLog, MIN_LOG_BYTES,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const BLOCKS: u64 = 48;

/// Block `i` as written in round `round`.
fn pattern(round: u8, i: u64) -> Vec<u8> {
    let mut b = vec![round; 4096];
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

struct World {
    pool: Arc<Gate>,
    cluster: Arc<MemCluster>,
    store_id: u64,
    /// Host 1's cache device: it outlives host 1's runs.
    log_dev: Arc<MemDevice>,
}

impl World {
    fn new() -> World {
        let pool = Gate::new(64 << 20);
        // Small extents: each host gets its own.
        let options = CreateOptions {
            extent_data_blocks: 256,
            host_id: 1,
        };
        drop(Store::create(pool.clone(), &options).unwrap());
        World {
            store_id: Store::peek_id(&*pool).unwrap(),
            pool,
            cluster: MemCluster::new(),
            log_dev: Arc::new(MemDevice::new(MIN_LOG_BYTES)),
        }
    }

    /// Host `id` without a log.
    fn plain(&self, id: u64) -> Store {
        let options = OpenOptions {
            host_id: id,
            coordinator: Some(self.cluster.host(id)),
            ..OpenOptions::default()
        };
        Store::open(self.pool.clone(), &options).unwrap()
    }

    /// Host 1 with its log (replayed if the cluster names it), as the
    /// server opens it.
    fn with_log(&self) -> (Store, Arc<WriteLog>, Found) {
        let coord = self.cluster.host(1);
        let named = coord.write_log_of(1).unwrap().map_or(0, |(id, _)| id);
        let (log, found) = WriteLog::open(
            self.log_dev.clone(),
            self.pool.clone(),
            self.store_id,
            named,
            1,
        )
        .unwrap();
        let log = Arc::new(log);
        let options = OpenOptions {
            host_id: 1,
            coordinator: Some(coord),
            write_log: Some(log.clone()),
            ..OpenOptions::default()
        };
        (Store::open(log.clone(), &options).unwrap(), log, found)
    }

    /// Host 1 is killed with records in its log: its destage fails while
    /// it stops, so nothing more of the log reaches the pool.
    fn kill_host1(&self, store: Store, log: Arc<WriteLog>) {
        self.pool.failing.store(true, Ordering::SeqCst);
        store.abandon();
        drop(log);
        self.pool.failing.store(false, Ordering::SeqCst);
        self.cluster.expire(1);
    }

    fn close_gate(&self) -> OpenOnDrop {
        self.pool.closed.store(true, Ordering::SeqCst);
        OpenOnDrop(self.pool.clone())
    }
}

fn write_round(store: &Store, disk: &str, round: u8) {
    let d = store.open_vdi(disk).unwrap();
    for i in 0..BLOCKS {
        d.write(&pattern(round, i), i * 4096).unwrap();
    }
    d.flush().unwrap();
}

/// Every block of `disk` as `read` returns it equals round `round`.
fn assert_round(read: impl Fn(&mut [u8], u64), round: u8, what: &str) {
    let mut buf = vec![0u8; 4096];
    for i in 0..BLOCKS {
        read(&mut buf, i * 4096);
        assert!(
            buf == pattern(round, i),
            "{what}: block {i} is not of round {round}"
        );
    }
}

/// Host 1 creates disk `d`, write-back, and writes round 1 (flushed, on the
/// pool); returns its store and log.
fn host1_with_disk(w: &World) -> (Store, Arc<WriteLog>) {
    let (s1, log, _) = w.with_log();
    let d = s1.create_vdi("d", BLOCKS * 4096).unwrap();
    d.set_cache_policy(CachePolicy::WriteBack).unwrap();
    s1.refresh_write_back().unwrap();
    assert!(log.is_logging());
    assert_eq!(
        w.cluster.host(1).write_log_of(1).unwrap().map(|(id, _)| id),
        Some(log.id()),
        "the cluster does not name host 1's log before it logs"
    );
    write_round(&s1, "d", 1);
    log.drain_to(log.head_lsn()).unwrap();
    (s1, log)
}

#[test]
fn a_hand_off_drains_the_log_first_and_the_new_holder_reads_every_flushed_write() {
    let w = World::new();
    let s2 = w.plain(2);
    let (s1, log) = host1_with_disk(&w);

    // Round 2 is flushed, but only in host 1's log: the pool has round 1.
    let gate = w.close_gate();
    write_round(&s1, "d", 2);
    let head = s2.committed_head("d").unwrap();
    assert_round(
        |b, o| head.read(b, o).unwrap(),
        1,
        "the pool while round 2 is in the log",
    );
    assert!(log.stats().dirty_bytes > 0);

    waits_for_the_pool(gate, "the hand-off", || s1.hand_off("d", 2)).unwrap();

    let d = s2.open_vdi("d").unwrap();
    assert_round(|b, o| d.read(b, o).unwrap(), 2, "host 2 after the hand-off");
}

#[test]
fn letting_a_disk_go_drains_the_log_first() {
    let w = World::new();
    let s2 = w.plain(2);
    let (s1, _log) = host1_with_disk(&w);
    let gate = w.close_gate();
    write_round(&s1, "d", 2);
    waits_for_the_pool(gate, "letting the disk go", || s1.close_vdi("d")).unwrap();
    let d = s2.open_vdi("d").unwrap();
    assert_round(
        |b, o| d.read(b, o).unwrap(),
        2,
        "host 2 after host 1 let the disk go",
    );
}

/// Runs `f` (with the gate closed: what the log holds cannot reach the
/// pool) and checks that it waits for the pool: it has not returned after
/// 300 ms; then opens the gate and returns what `f` returned.
fn waits_for_the_pool<T: Send>(gate: OpenOnDrop, what: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let running = scope.spawn(f);
        std::thread::sleep(Duration::from_millis(300));
        let early = running.is_finished();
        drop(gate);
        assert!(
            !early,
            "{what} went on while what it needs was only in the log"
        );
        running.join().unwrap()
    })
}

/// A catalogue change (here a new disk) is on the pool when it returns:
/// the superblock goes there around the log, after what it names.
#[test]
fn a_catalogue_change_reaches_the_pool_before_it_returns() {
    let w = World::new();
    let s2 = w.plain(2);
    let (s1, _log) = host1_with_disk(&w);
    let gate = w.close_gate();
    write_round(&s1, "d", 2);
    waits_for_the_pool(gate, "creating a disk", || s1.create_vdi("e", 4096)).unwrap();
    assert!(
        s2.list().contains(&"e".to_string()),
        "host 2 does not see the disk host 1 created: {:?}",
        s2.list()
    );
}

/// A catalogue change never enters the log (the superblock goes to the
/// pool around it): host 1 killed in the middle of creating a disk leaves
/// nothing that, replayed when it comes back, would land over the
/// catalogue host 2 changed meanwhile.
#[test]
fn a_killed_hosts_catalogue_change_never_lands_over_a_later_one() {
    let w = World::new();
    let s2 = w.plain(2);
    let (s1, log) = host1_with_disk(&w);
    let gate = w.close_gate();
    write_round(&s1, "d", 2);
    std::thread::scope(|scope| {
        let creating = scope.spawn(|| s1.create_vdi("e", 4096).map(drop));
        std::thread::sleep(Duration::from_millis(300));
        // Cut off from the pool: what waits for it fails.
        w.pool.failing.store(true, Ordering::SeqCst);
        let _ = creating.join().unwrap();
    });
    w.kill_host1(s1, log);
    drop(gate);
    s2.create_vdi("f", 4096).unwrap();
    let (s1, _log, found) = w.with_log();
    assert_eq!(found, Found::Replayed);
    for (host, store) in [(1, &s1), (2, &s2)] {
        assert!(
            store.list().contains(&"f".to_string()),
            "host {host} lost the disk host 2 created: {:?}",
            store.list()
        );
    }
}

/// Reclaiming a deleted snapshot keeps the catalogue lock until the
/// reclaiming commit is on the pool: a host that then looks for the
/// snapshot there finds it gone, never pins one whose blocks are reused.
#[test]
fn a_reclaimed_snapshot_is_gone_from_the_pool_before_the_lock_goes() {
    let w = World::new();
    let s2 = w.plain(2);
    let (s1, log) = host1_with_disk(&w);
    let d = s1.open_vdi("d").unwrap();
    d.snapshot(Some("s")).unwrap();
    log.drain_to(log.head_lsn()).unwrap();
    let gate = w.close_gate();
    d.delete_snapshot("s").unwrap();
    let freed = waits_for_the_pool(gate, "reclaiming", || s1.reclaim_hidden()).unwrap();
    assert!(freed > 0);
    assert!(
        matches!(s2.open_snapshot("d", "s"), Err(Error::NotFound(_))),
        "host 2 found a snapshot host 1 reclaimed"
    );
}

#[test]
fn a_dead_hosts_log_keeps_its_disks_until_it_is_back_or_given_up() {
    let w = World::new();
    let s2 = w.plain(2);
    let (s1, log) = host1_with_disk(&w);
    let snap = s1.open_vdi("d").unwrap().snapshot(Some("s")).unwrap();
    log.drain_to(log.head_lsn()).unwrap();

    // Round 2 only in the log, then host 1 dies; its lease ends.
    let gate = w.close_gate();
    write_round(&s1, "d", 2);
    s1.open_vdi("d")
        .unwrap()
        .delete_snapshot(&snap.name)
        .unwrap();
    w.kill_host1(s1, log);
    drop(gate);

    // Neither taken over nor read from the pool's older commit.
    let refused = s2.take_over("d", Duration::from_millis(200), Duration::ZERO);
    assert!(
        matches!(&refused, Err(Error::Busy(why)) if why.contains("write-back log")),
        "{:?}",
        refused.map(|(_, r)| r)
    );
    assert!(matches!(s2.committed_snapshots("d"), Err(Error::Busy(_))));
    assert!(matches!(s2.open_snapshot("d", "s"), Err(Error::Busy(_))));

    // Host 1 comes back with its cache: the log replays and reaches the
    // pool, it takes its own disk back, and hands it over with everything.
    let (s1, log, found) = w.with_log();
    assert_eq!(found, Found::Replayed);
    // Drained when the store opened, and named no more: the disks the
    // last run held are takeover-able again (by this host or another).
    assert!(!log.is_logging());
    assert_eq!(w.cluster.host(1).write_log_of(1).unwrap(), None);
    let (d, _) = s1
        .take_over("d", Duration::from_secs(5), Duration::ZERO)
        .unwrap();
    assert_round(|b, o| d.read(b, o).unwrap(), 2, "host 1 after its restart");
    assert!(
        d.snapshot_info("s").is_err(),
        "the deleted snapshot is back"
    );
    drop(d);
    s1.hand_off("d", 2).unwrap();
    let d = s2.open_vdi("d").unwrap();
    assert_round(|b, o| d.read(b, o).unwrap(), 2, "host 2 after the hand-off");
    d.flush().unwrap();
    drop(d);
    s2.close_vdi("d").unwrap();

    // Host 1 takes it again, writes round 3 into its log only, and dies
    // with its cache: the operator gives the log up (refused while host 1
    // runs), and host 2 takes the disk over as the pool has it.
    drop(s1.open_vdi("d").unwrap());
    let gate = w.close_gate();
    write_round(&s1, "d", 3);
    assert!(matches!(s2.forget_write_log_of(1), Err(Error::Busy(_))));
    w.kill_host1(s1, log);
    drop(gate);
    s2.forget_write_log_of(1).unwrap();
    let (d, report) = s2
        .take_over("d", Duration::from_secs(5), Duration::ZERO)
        .unwrap();
    assert!(report.taken_over);
    assert_round(
        |b, o| d.read(b, o).unwrap(),
        2,
        "host 2 after giving host 1's log up",
    );
    // The old log, found again, is dropped, never replayed over the pool.
    let (_s1, _log, found) = w.with_log();
    assert_eq!(found, Found::Dropped);
    assert_round(
        |b, o| d.read(b, o).unwrap(),
        2,
        "host 2 once host 1 is back",
    );
}

#[test]
fn a_log_given_up_while_its_host_was_fenced_never_reaches_the_pool() {
    let w = World::new();
    let s2 = w.plain(2);
    let (s1, log) = host1_with_disk(&w);
    let gate = w.close_gate();
    write_round(&s1, "d", 2);
    // Host 1 loses its lease but runs on: its destage stops.
    w.cluster.expire(1);
    drop(gate);
    std::thread::sleep(Duration::from_millis(200));
    let destaged = log.stats().destaged_bytes;
    assert!(
        log.stats().dirty_bytes > 0,
        "the destage went on while fenced"
    );

    s2.forget_write_log_of(1).unwrap();
    let (d, _) = s2
        .take_over("d", Duration::from_secs(5), Duration::ZERO)
        .unwrap();
    write_round(&s2, "d", 4);

    // Host 1's lease comes back: its log is no longer named, so it gives it
    // up and lets its disks go; nothing of it reaches the pool.
    w.cluster.renew(1);
    std::thread::sleep(Duration::from_millis(200));
    let settled = s1.settle(Duration::ZERO, Duration::from_secs(3600));
    assert!(matches!(settled, Err(Error::Fenced(_))), "{settled:?}");
    assert!(log.is_given_up());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        log.stats().destaged_bytes,
        destaged,
        "a given-up log was destaged"
    );
    assert!(s1
        .open_vdi("d")
        .and_then(|d| d.read(&mut [0; 4096], 0))
        .is_err());
    assert_round(|b, o| d.read(b, o).unwrap(), 4, "host 2's writes");
    drop(d);
    s2.close_vdi("d").unwrap();
    let s3 = w.plain(3);
    let d = s3.open_vdi("d").unwrap();
    assert_round(|b, o| d.read(b, o).unwrap(), 4, "host 3, from the pool");
    s1.abandon();
}
