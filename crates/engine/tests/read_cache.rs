//! The read cache in front of a store: clones of a gold image read it from
//! the pool once; a copy is served only while a version that holds its
//! block exists, so blocks written in place after their snapshot went,
//! and snapshot ids a lost commit gave out again, never bring old copies
//! back; a damaged copy is read from the pool. (`model.rs` runs every
//! operation through a cache too.)

mod common;

use common::pattern;
use parallax_device::{BlockDevice, MemDevice};
use parallax_engine::{
    CachePolicy, CreateOptions, Durability, Error, OpenOptions, ReadCache, ReadDisk, Store,
};
use std::sync::Arc;

const BLOCK: usize = 4096;

struct Setup {
    pool: Arc<MemDevice>,
    cache_dev: Arc<MemDevice>,
    cache: Arc<ReadCache>,
}

impl Setup {
    fn new() -> (Setup, Store) {
        let pool = Arc::new(MemDevice::new(64 << 20));
        drop(Store::create(pool.clone(), &CreateOptions::default()).unwrap());
        let cache_dev = Arc::new(MemDevice::new(4 << 20));
        let id = Store::peek_id(&*pool).unwrap();
        let cache = Arc::new(ReadCache::open(cache_dev.clone(), id).unwrap());
        let setup = Setup {
            pool,
            cache_dev,
            cache,
        };
        let store = setup.open();
        (setup, store)
    }

    fn open(&self) -> Store {
        let options = OpenOptions {
            read_cache: Some(self.cache.clone()),
            ..OpenOptions::default()
        };
        Store::open(self.pool.clone(), &options).unwrap()
    }

    /// The cache as a restarted daemon finds it: opened again from its
    /// device (the old one is stopped first).
    fn restart_cache(&mut self) {
        self.cache.sync();
        let id = Store::peek_id(&*self.pool).unwrap();
        let dev: Arc<dyn BlockDevice> = self.cache_dev.clone();
        self.cache = Arc::new(ReadCache::open(dev, id).unwrap());
    }
}

/// Disk `gold` of `blocks` blocks filled with pattern `seed`, snapshotted
/// as `gold@base`: its handle and content.
fn gold_image(store: &Store, blocks: u64, seed: u8) -> (parallax_engine::Vdi, Vec<u8>) {
    let gold = store.create_vdi("gold", blocks * BLOCK as u64).unwrap();
    let image = pattern(seed, 0, blocks as usize * BLOCK);
    gold.write(&image, 0).unwrap();
    gold.snapshot(Some("base")).unwrap();
    (gold, image)
}

fn read_all(r: &dyn ReadDisk, planned: bool) -> Vec<u8> {
    let len = r.size() as usize;
    if planned {
        if let Some(data) = common::read_planned(r, len) {
            return data;
        }
    }
    let mut buf = vec![0u8; len];
    r.read(&mut buf, 0).unwrap();
    buf
}

#[test]
fn clones_of_a_gold_image_read_it_from_the_pool_once() {
    let (mut setup, store) = Setup::new();
    let (gold, image) = gold_image(&store, 64, 7);
    let clones: Vec<_> = (0..6)
        .map(|i| {
            store
                .clone_snapshot("gold", "base", &format!("vm{i}"))
                .unwrap()
        })
        .collect();
    // The first clone's read fills the cache...
    assert_eq!(read_all(&clones[0], false), image);
    setup.cache.sync();
    let before = store.pool_data_read_bytes();
    // ...and every other clone, either path, and the snapshot's view read
    // it from there.
    for (i, c) in clones.iter().enumerate().skip(1) {
        assert_eq!(read_all(c, i % 2 == 0), image, "vm{i}");
    }
    // The clones filed their copies under their origin, which is the
    // snapshot itself: a view of it hits too.
    let view = store.open_snapshot("gold", "base").unwrap();
    assert_eq!(read_all(&view, true), image);
    assert_eq!(
        store.pool_data_read_bytes(),
        before,
        "clones or the view read the gold image from the pool again"
    );
    // A block a clone writes is its own: read from the pool, not cached.
    clones[1].write(&[9u8; BLOCK], 0).unwrap();
    let mut b = vec![0u8; BLOCK];
    clones[1].read(&mut b, 0).unwrap();
    assert_eq!(b, vec![9u8; BLOCK]);
    drop((clones, view, gold));
    drop(store);
    // After a restart of the daemon, the copies are still there.
    setup.restart_cache();
    let store = setup.open();
    let vm = store.open_vdi("vm3").unwrap();
    assert_eq!(read_all(&vm, false), image);
    assert_eq!(
        store.pool_data_read_bytes(),
        0,
        "the restarted cache missed"
    );
    let stats = store.read_cache_stats().unwrap();
    assert_eq!(stats.hits, 64, "{stats:?}");
}

/// A pool that takes a while to answer reads (a networked one).
struct SlowPool(Arc<MemDevice>);

impl BlockDevice for SlowPool {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::thread::sleep(std::time::Duration::from_millis(2));
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.discard(offset, len)
    }
}

/// A boot storm: clones read the same blocks of a gold image at the same
/// time from a slow pool. Each block is read from the pool once; the
/// other readers wait for that read and take the copy from memory.
#[test]
fn clones_reading_one_block_at_once_read_it_from_the_pool_once() {
    let mem = Arc::new(MemDevice::new(64 << 20));
    drop(Store::create(mem.clone(), &CreateOptions::default()).unwrap());
    let pool: Arc<dyn BlockDevice> = Arc::new(SlowPool(mem.clone()));
    let id = Store::peek_id(&*pool).unwrap();
    let cache = Arc::new(ReadCache::open(Arc::new(MemDevice::new(4 << 20)), id).unwrap());
    let options = OpenOptions {
        read_cache: Some(cache.clone()),
        ..OpenOptions::default()
    };
    let store = Store::open(pool, &options).unwrap();
    let blocks = 32;
    let (_gold, image) = gold_image(&store, blocks, 5);
    let clones: Vec<_> = (0..8)
        .map(|i| {
            store
                .clone_snapshot("gold", "base", &format!("vm{i}"))
                .unwrap()
        })
        .collect();
    // Tree nodes in memory first: what is counted is data.
    for c in &clones {
        c.block_status(0, blocks * BLOCK as u64).unwrap();
    }
    let before = store.pool_data_read_bytes();
    let barrier = std::sync::Barrier::new(clones.len());
    std::thread::scope(|s| {
        for (i, c) in clones.iter().enumerate() {
            let (barrier, image) = (&barrier, &image);
            s.spawn(move || {
                barrier.wait();
                // Block by block, as a booting guest reads.
                for b in 0..blocks {
                    let at = b * BLOCK as u64;
                    let data = match c.try_plan_read(at, BLOCK).unwrap() {
                        Some(plan) if i % 2 == 0 => {
                            let mut buf = vec![0u8; BLOCK];
                            plan.execute(&mut buf, false).unwrap();
                            plan.finish(true);
                            buf
                        }
                        _ => {
                            let mut buf = vec![0u8; BLOCK];
                            c.read(&mut buf, at).unwrap();
                            buf
                        }
                    };
                    assert_eq!(
                        data[..],
                        image[at as usize..at as usize + BLOCK],
                        "vm{i} block {b}"
                    );
                }
            });
        }
    });
    assert_eq!(
        store.pool_data_read_bytes() - before,
        blocks * BLOCK as u64,
        "clones read a block of the gold image from the pool more than once"
    );
}

/// A clone's block that left every snapshot is promoted (written in place
/// from then on); a new snapshot makes it shared again. The copy read
/// under the first snapshot must not come back.
#[test]
fn a_block_written_in_place_after_its_snapshot_went_is_never_served_stale() {
    let (setup, store) = Setup::new();
    let d = store.create_vdi("d", 4 * BLOCK as u64).unwrap();
    d.write(&[1u8; BLOCK], 0).unwrap();
    d.snapshot(Some("s1")).unwrap();
    let mut b = vec![0u8; BLOCK];
    d.read(&mut b, 0).unwrap();
    setup.cache.sync();
    d.read(&mut b, 0).unwrap();
    assert_eq!(store.read_cache_stats().unwrap().hits, 1, "nothing cached");
    let addr = d.try_plan_read(0, BLOCK).unwrap().unwrap().transfers[0].device_offset;
    d.delete_snapshot("s1").unwrap();
    d.write(&[2u8; BLOCK], 0).unwrap();
    // The block is the live disk's own now: planned from the pool.
    let plan = d.try_plan_read(0, BLOCK).unwrap().unwrap();
    assert_eq!(
        plan.transfers[0].device_offset, addr,
        "the write did not go in place (the test needs it to)"
    );
    drop(plan);
    d.snapshot(Some("s2")).unwrap();
    for planned in [false, true] {
        assert_eq!(read_all(&d, planned)[..BLOCK], [2u8; BLOCK], "stale copy");
    }
    let view = store.open_snapshot("d", "s2").unwrap();
    assert_eq!(read_all(&view, false)[..BLOCK], [2u8; BLOCK]);
}

/// A snapshot whose commit a crash lost gives its id out again: copies
/// filed under the lost one must not be served for the new one.
#[test]
fn a_lost_snapshot_id_given_out_again_never_serves_the_old_copies() {
    let (setup, store) = Setup::new();
    let d = store.create_vdi("d", 4 * BLOCK as u64).unwrap();
    d.write(&[1u8; BLOCK], 0).unwrap();
    d.flush().unwrap();
    let lost = d.snapshot_with(Some("s"), Durability::Deferred).unwrap();
    let mut b = vec![0u8; BLOCK];
    d.read(&mut b, 0).unwrap();
    setup.cache.sync();
    assert_eq!(setup.cache.stats().fills, 1, "the read was not cached");
    drop(d);
    store.abandon();
    let store = setup.open();
    let d = store.open_vdi("d").unwrap();
    assert!(d.snapshot_info("s").is_err(), "the snapshot was not lost");
    d.write(&[2u8; BLOCK], 0).unwrap();
    let again = d.snapshot(Some("s")).unwrap();
    assert_eq!(
        again.id, lost.id,
        "the id was not given out again (the test needs it)"
    );
    for planned in [false, true] {
        assert_eq!(read_all(&d, planned)[..BLOCK], [2u8; BLOCK], "stale copy");
    }
}

#[test]
fn a_damaged_copy_is_read_from_the_pool() {
    let (setup, store) = Setup::new();
    let (_gold, image) = gold_image(&store, 8, 3);
    let vm = store.clone_snapshot("gold", "base", "vm").unwrap();
    assert_eq!(read_all(&vm, false), image);
    setup.cache.sync();
    // Flip bits all over the cache's slots.
    let len = setup.cache_dev.len();
    for off in (4 * BLOCK as u64..len).step_by(BLOCK) {
        setup.cache_dev.write_at(&[0xa5; 64], off + 100).unwrap();
    }
    let pool_before = store.pool_data_read_bytes();
    assert_eq!(read_all(&vm, true), image, "a damaged copy was served");
    let stats = store.read_cache_stats().unwrap();
    assert_eq!(stats.corrupt, 8, "{stats:?}");
    assert_eq!(
        store.pool_data_read_bytes() - pool_before,
        8 * BLOCK as u64,
        "the pool reads instead of the damaged copies were not counted"
    );
    // They were copied in again: the next reads, either path, hit.
    setup.cache.sync();
    for planned in [false, true] {
        assert_eq!(read_all(&vm, planned), image);
    }
    let after = store.read_cache_stats().unwrap();
    assert_eq!(after.corrupt, 8, "{after:?}");
    assert_eq!(after.hits, stats.hits + 16, "{after:?}");
}

/// The cache device goes away (every call fails from some point on, as a
/// pulled disk's would): reads go on from the pool, right, and the
/// failures are counted.
#[test]
fn a_cache_device_that_goes_away_costs_pool_reads_only() {
    let pool = Arc::new(MemDevice::new(64 << 20));
    drop(Store::create(pool.clone(), &CreateOptions::default()).unwrap());
    let cache_dev = Arc::new(parallax_device::CrashDevice::new(4 << 20));
    let id = Store::peek_id(&*pool).unwrap();
    let cache = Arc::new(ReadCache::open(cache_dev.clone(), id).unwrap());
    let options = OpenOptions {
        read_cache: Some(cache.clone()),
        ..OpenOptions::default()
    };
    let store = Store::open(pool, &options).unwrap();
    let (_gold, image) = gold_image(&store, 16, 9);
    let vm = store.clone_snapshot("gold", "base", "vm").unwrap();
    assert_eq!(read_all(&vm, false), image);
    cache.sync();
    assert_eq!(cache.stats().entries, 16);
    cache_dev.cut_power(parallax_device::CrashMode::DropAll);
    for planned in [false, true, false] {
        assert_eq!(read_all(&vm, planned), image, "planned: {planned}");
    }
    let view = store.open_snapshot("gold", "base").unwrap();
    assert_eq!(read_all(&view, true), image);
    cache.sync();
    let stats = cache.stats();
    assert!(stats.errors >= 16, "{stats:?}");
    assert_eq!(
        stats.entries, 0,
        "copies on a dead device were kept: {stats:?}"
    );
    // Enough failures in a row: the cache is given up, and costs nothing.
    for _ in 0..8 {
        assert_eq!(read_all(&vm, false), image);
        cache.sync();
    }
    let stats = cache.stats();
    assert!(stats.given_up, "{stats:?}");
    let errors = stats.errors;
    assert_eq!(read_all(&vm, true), image);
    cache.sync();
    assert_eq!(
        cache.stats().errors,
        errors,
        "a given-up cache was still tried"
    );
}

/// A disk whose cache policy is `none` reads past the cache, and so do
/// views of its snapshots; the policy is kept in its header.
#[test]
fn a_disk_with_the_none_policy_reads_past_the_cache() {
    let (setup, store) = Setup::new();
    let (gold, image) = gold_image(&store, 8, 4);
    let vm = store.clone_snapshot("gold", "base", "vm").unwrap();
    vm.set_cache_policy(CachePolicy::None).unwrap();
    gold.set_cache_policy(CachePolicy::None).unwrap();
    for planned in [false, true, false] {
        assert_eq!(read_all(&vm, planned), image);
    }
    let view = store.open_snapshot("gold", "base").unwrap();
    assert_eq!(read_all(&view, false), image);
    setup.cache.sync();
    let stats = setup.cache.stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.fills),
        (0, 0, 0),
        "{stats:?}"
    );
    assert_eq!(store.pool_data_read_bytes(), 4 * 8 * BLOCK as u64);
    drop((vm, view, gold));
    drop(store);
    let store = setup.open();
    let vm = store.open_vdi("vm").unwrap();
    assert_eq!(
        vm.info().cache_policy,
        CachePolicy::None,
        "the policy was not kept"
    );
    vm.set_cache_policy(CachePolicy::WriteThrough).unwrap();
    assert_eq!(read_all(&vm, false), image);
    setup.cache.sync();
    assert_eq!(setup.cache.stats().fills, 8, "write-through caches again");
}

/// A disk whose newest snapshot is a scheduled one (retention deletes it
/// soon) makes no copies of its own blocks, and still takes the copies of
/// its clone origin that others made.
#[test]
fn a_disk_on_a_schedule_takes_copies_and_makes_none() {
    let (setup, store) = Setup::new();
    let (_gold, image) = gold_image(&store, 8, 6);
    let filler = store.clone_snapshot("gold", "base", "filler").unwrap();
    assert_eq!(read_all(&filler, false), image);
    setup.cache.sync();
    assert_eq!(setup.cache.stats().fills, 8);
    let vm = store.clone_snapshot("gold", "base", "vm").unwrap();
    vm.write(&[7u8; BLOCK], 0).unwrap();
    vm.set_schedule(parallax_engine::Schedule {
        every_ns: 10_000_000,
        keep_last: 2,
        ..Default::default()
    })
    .unwrap();
    assert!(
        vm.schedule_tick().unwrap().is_some(),
        "no scheduled snapshot"
    );
    let mut want = image.clone();
    want[..BLOCK].fill(7);
    for planned in [false, true] {
        assert_eq!(read_all(&vm, planned), want);
    }
    setup.cache.sync();
    let stats = setup.cache.stats();
    // The origin's 7 blocks hit (both reads); its own block missed, twice,
    // and was never copied in (the first 8 misses and fills are the
    // filler clone's).
    assert_eq!(
        (stats.hits, stats.misses, stats.fills),
        (14, 8 + 2, 8),
        "{stats:?}"
    );
}

#[test]
fn a_cache_of_another_store_is_refused() {
    let (setup, store) = Setup::new();
    drop(store);
    let other = Arc::new(MemDevice::new(16 << 20));
    drop(Store::create(other.clone(), &CreateOptions::default()).unwrap());
    let options = OpenOptions {
        read_cache: Some(setup.cache.clone()),
        ..OpenOptions::default()
    };
    match Store::open(other, &options) {
        Err(Error::InvalidArgument(why)) => assert!(why.contains("read cache"), "{why}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a cache of another store was taken"),
    }
}
