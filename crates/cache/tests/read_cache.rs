//! The read cache on its own: copies come back verified, across reopens,
//! never for another store, never after damage; a scan does not push out
//! a hot set; a failing device costs copies, never wrong data.

use parallax_cache::{Anchor, ReadCache};
use parallax_device::{BlockDevice, CrashDevice, CrashMode, MemDevice};
use std::sync::Arc;

const BLOCK: usize = 4096;

fn anchor(snap: u64) -> Anchor {
    Anchor {
        vdi: 1,
        snap,
        created_ns: 1000 + snap,
    }
}

fn block(addr: u64) -> Vec<u8> {
    (0..BLOCK).map(|i| (addr as usize * 31 + i) as u8).collect()
}

fn read(cache: &ReadCache, addr: u64, a: Anchor) -> Option<Vec<u8>> {
    let hit = cache.probe(addr, |x| *x == a)?;
    let mut buf = vec![0u8; BLOCK];
    cache.read(&hit, &mut buf).then_some(buf)
}

#[test]
fn copies_come_back_only_under_an_accepted_anchor_and_survive_a_reopen() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4 << 20));
    let cache = ReadCache::open(dev.clone(), 7).unwrap();
    for addr in 10..50 {
        cache.offer(addr, anchor(addr % 3), &block(addr));
    }
    cache.sync();
    assert_eq!(cache.stats().fills, 40);
    for addr in 10..50 {
        assert_eq!(read(&cache, addr, anchor(addr % 3)), Some(block(addr)));
        assert_eq!(
            read(&cache, addr, anchor(addr % 3 + 1)),
            None,
            "wrong anchor"
        );
    }
    assert_eq!(read(&cache, 60, anchor(0)), None);
    drop(cache);
    let cache = ReadCache::open(dev.clone(), 7).unwrap();
    assert_eq!(cache.stats().entries, 40, "the index did not come back");
    for addr in 10..50 {
        assert_eq!(read(&cache, addr, anchor(addr % 3)), Some(block(addr)));
    }
    drop(cache);
    let other = ReadCache::open(dev, 8).unwrap();
    assert_eq!(other.stats().entries, 0, "another store's copies were kept");
    assert_eq!(read(&other, 10, anchor(1)), None);
}

/// A slot or index entry damaged on the device is a miss, and the copy is
/// gone; the next offer brings it back.
#[test]
fn a_damaged_copy_or_index_entry_is_a_miss() {
    let mem = Arc::new(MemDevice::new(4 << 20));
    let dev: Arc<dyn BlockDevice> = mem.clone();
    let cache = ReadCache::open(dev.clone(), 7).unwrap();
    for addr in 10..20 {
        cache.offer(addr, anchor(1), &block(addr));
    }
    cache.sync();
    let hit = cache.probe(12, |_| true).unwrap();
    dev.write_at(&[0x5a; 512], hit.offset().unwrap() + 1024)
        .unwrap();
    let mut buf = vec![0u8; BLOCK];
    assert!(!cache.read(&hit, &mut buf), "a damaged copy was served");
    assert_eq!(cache.stats().corrupt, 1);
    assert!(
        cache.probe(12, |_| true).is_none(),
        "the damaged copy stayed"
    );
    cache.offer(12, anchor(1), &block(12));
    cache.sync();
    assert_eq!(read(&cache, 12, anchor(1)), Some(block(12)));
    // Damage every index entry's bytes after a reopen: nothing comes back.
    drop(cache);
    let mut image = mem.to_bytes();
    for b in &mut image[BLOCK..2 * BLOCK] {
        *b ^= 0x40;
    }
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(image));
    let cache = ReadCache::open(dev, 7).unwrap();
    assert_eq!(
        cache.stats().entries,
        0,
        "damaged index entries were believed"
    );
}

/// A copy written over by another block's after the index said otherwise
/// (a crash between the slot and the index write) fails its check.
#[test]
fn a_slot_reused_for_another_block_never_serves_the_old_one() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4 << 20));
    let cache = ReadCache::open(dev.clone(), 7).unwrap();
    cache.offer(10, anchor(1), &block(10));
    cache.sync();
    let hit = cache.probe(10, |_| true).unwrap();
    dev.write_at(&block(11), hit.offset().unwrap()).unwrap();
    let mut buf = vec![0u8; BLOCK];
    assert!(!cache.read(&hit, &mut buf));
}

/// Power cut at every write of the cache device while it fills, in every
/// crash mode: whatever the reopened cache serves is right.
#[test]
fn a_power_cut_anywhere_leaves_only_right_copies() {
    for cut in 1..40 {
        for mode in [
            CrashMode::DropAll,
            CrashMode::KeepRandom(cut),
            CrashMode::TearOne(cut),
        ] {
            let crash = Arc::new(CrashDevice::new(1 << 20));
            let cache = ReadCache::open(crash.clone(), 7).unwrap();
            crash.crash_at_write(cut, mode);
            for round in 0..3u64 {
                for addr in 10..40 {
                    // Same addresses, new contents and anchors each round.
                    let mut data = block(addr);
                    data[0] = round as u8;
                    cache.offer(addr, anchor(round), &data);
                }
                cache.sync();
            }
            drop(cache);
            let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(crash.durable_image()));
            let cache = ReadCache::open(dev, 7).unwrap();
            for addr in 10..40 {
                for round in 0..3u64 {
                    if let Some(got) = read(&cache, addr, anchor(round)) {
                        let mut want = block(addr);
                        want[0] = round as u8;
                        assert_eq!(got, want, "cut {cut} {mode:?}: wrong copy of {addr}");
                    }
                }
            }
        }
    }
}

/// A hot set read again and again survives one pass over many more
/// blocks read once (a `dd` of a whole disk).
#[test]
fn a_scan_does_not_push_out_the_hot_set() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(8 << 20));
    let cache = ReadCache::open(dev, 7).unwrap();
    let slots = cache.stats().slots;
    let hot: Vec<u64> = (1000..1000 + slots / 4).collect();
    for &a in &hot {
        cache.offer(a, anchor(1), &block(a));
    }
    cache.sync();
    for _ in 0..3 {
        for &a in &hot {
            assert!(cache.probe(a, |_| true).is_some());
        }
    }
    for a in 100_000..100_000 + 4 * slots {
        if cache.probe(a, |_| true).is_none() {
            cache.offer(a, anchor(1), &block(a));
        }
        if a % 512 == 0 {
            cache.sync();
        }
    }
    cache.sync();
    let kept = hot
        .iter()
        .filter(|&&a| cache.probe(a, |_| true).is_some())
        .count();
    assert!(
        kept * 10 >= hot.len() * 9,
        "the scan pushed out {} of {} hot blocks",
        hot.len() - kept,
        hot.len()
    );
    let s = cache.stats();
    assert!(s.entries <= s.slots);
}

/// A cache device whose writes fail: copies are dropped, reads still right.
#[test]
fn a_failing_cache_device_drops_copies_and_serves_nothing_wrong() {
    let crash = Arc::new(CrashDevice::new(1 << 20));
    let cache = ReadCache::open(crash.clone(), 7).unwrap();
    crash.inject(parallax_device::Fault::WriteEio { after_writes: 5 });
    for addr in 10..30 {
        cache.offer(addr, anchor(1), &block(addr));
    }
    cache.sync();
    let s = cache.stats();
    assert!(s.errors >= 1 && s.dropped >= 1, "{s:?}");
    for addr in 10..30 {
        if let Some(got) = read(&cache, addr, anchor(1)) {
            assert_eq!(got, block(addr));
        }
    }
}
