//! Behaviour of the library API on small stores: each test names what it checks.

use parallax_device::{BlockDevice, MemDevice};
use parallax_engine::{CreateOptions, Error, OpenOptions, ReadDisk, Store};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

fn small_store(bytes: u64) -> (Arc<MemDevice>, Store) {
    let dev = Arc::new(MemDevice::new(bytes));
    let store = Store::create(
        dev.clone(),
        &CreateOptions {
            extent_data_blocks: 256,
            host_id: 1,
        },
    )
    .unwrap();
    (dev, store)
}

fn reopen(dev: &Arc<MemDevice>) -> Store {
    Store::open(dev.clone(), &OpenOptions::default()).unwrap()
}

fn assert_clean(store: &Store) {
    let report = store.check().unwrap();
    assert!(report.is_clean(), "check failed: {:#?}", report.errors);
}

#[test]
fn write_read_flush_reopen_at_odd_offsets() {
    let (dev, store) = small_store(64 * MIB);
    let disk = store.create_vdi("d", 10 * MIB).unwrap();
    let data: Vec<u8> = (0..20000u32).map(|i| (i * 7 % 251) as u8).collect();
    disk.write(&data, 12345).unwrap();
    let mut back = vec![0u8; 20000];
    disk.read(&mut back, 12345).unwrap();
    assert_eq!(back, data);
    let mut zeros = vec![1u8; 4096];
    disk.read(&mut zeros, 5 * MIB).unwrap();
    assert!(zeros.iter().all(|&b| b == 0));
    disk.flush().unwrap();
    drop(disk);
    drop(store);
    let store = reopen(&dev);
    let disk = store.open_vdi("d").unwrap();
    let mut back = vec![0u8; 20000];
    disk.read(&mut back, 12345).unwrap();
    assert_eq!(back, data);
    assert_clean(&store);
}

#[test]
fn snapshot_is_frozen_and_clone_is_independent_both_ways() {
    let (_dev, store) = small_store(64 * MIB);
    let base = store.create_vdi("base", 4 * MIB).unwrap();
    base.write(&[0xaa; 8192], 0).unwrap();
    let snap = base.snapshot(Some("gold")).unwrap();
    assert_eq!(snap.name, "gold");
    base.write(&[0xbb; 4096], 0).unwrap();
    let view = store.open_snapshot("base", "gold").unwrap();
    let mut buf = vec![0u8; 8192];
    view.read(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0xaa));

    let clone = store.clone_snapshot("base", "gold", "vm1").unwrap();
    clone.read(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0xaa));
    clone.write(&[0xcc; 100], 4096).unwrap();
    base.write(&[0xdd; 100], 4096 + 200).unwrap();
    clone.read(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0xaa));
    assert!(buf[4096..4196].iter().all(|&b| b == 0xcc));
    assert!(buf[4196..].iter().all(|&b| b == 0xaa));
    base.read(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0xbb));
    assert!(buf[4096..4296].iter().all(|&b| b == 0xaa));
    assert!(buf[4296..4396].iter().all(|&b| b == 0xdd));
    view.read(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0xaa));
    store.flush_all().unwrap();
    assert_clean(&store);
    assert_eq!(clone.info().origin.as_deref(), Some("base@gold"));
}

#[test]
fn rollback_restores_and_frees() {
    let (_dev, store) = small_store(64 * MIB);
    let d = store.create_vdi("d", 4 * MIB).unwrap();
    d.write(&[1; 4096], 0).unwrap();
    d.snapshot(Some("s")).unwrap();
    let used_at_snapshot = store.stats().used_bytes;
    for i in 0..50 {
        d.write(&[2; 4096], i * 4096).unwrap();
    }
    d.flush().unwrap();
    assert!(store.stats().used_bytes > used_at_snapshot + 40 * 4096);
    d.rollback("s").unwrap();
    let mut buf = vec![0u8; 8192];
    d.read(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 1));
    assert!(buf[4096..].iter().all(|&b| b == 0));
    assert!(store.stats().used_bytes <= used_at_snapshot + 2 * 4096);
    d.flush().unwrap();
    assert_clean(&store);
    assert_eq!(store.check().unwrap().leaked_blocks, 0);
}

#[test]
fn discard_zeroes_and_block_status() {
    let (_dev, store) = small_store(64 * MIB);
    let d = store.create_vdi("d", MIB).unwrap();
    d.write(&vec![9u8; 40960], 0).unwrap();
    d.discard(4096, 8192).unwrap();
    d.write_zeroes(20000, 10000).unwrap();
    let ext = d.block_status(0, MIB).unwrap();
    assert_eq!(ext[0].offset, 0);
    assert_eq!(ext[0].length, 4096);
    assert!(ext[0].allocated);
    assert!(!ext[1].allocated);
    assert_eq!((ext[1].offset, ext[1].length), (4096, 8192));
    let mut buf = vec![0u8; 40960];
    d.read(&mut buf, 0).unwrap();
    assert!(buf[4096..12288].iter().all(|&b| b == 0));
    assert!(buf[12288..20000].iter().all(|&b| b == 9));
    assert!(buf[20000..30000].iter().all(|&b| b == 0));
    assert!(buf[30000..].iter().all(|&b| b == 9));
    assert_eq!(ext.last().unwrap().offset + ext.last().unwrap().length, MIB);
    d.flush().unwrap();
    assert_clean(&store);
}

#[test]
fn errors_are_clear_and_harmless() {
    let (dev, store) = small_store(8 * MIB);
    assert!(matches!(store.open_vdi("nope"), Err(Error::NotFound(_))));
    let d = store.create_vdi("d", 64 * MIB).unwrap();
    assert!(matches!(
        store.create_vdi("d", MIB),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        store.create_vdi("a@b", MIB),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        d.write(&[1], 64 * MIB),
        Err(Error::InvalidArgument(_))
    ));
    d.write(&[7; 4096], 0).unwrap();
    d.flush().unwrap();
    // Fill the store: the write that cannot be placed fails with NoSpace.
    let mut failed = None;
    for i in 1..(64 * MIB / 4096) {
        if let Err(e) = d.write(&[3; 4096], i * 4096) {
            failed = Some(e);
            break;
        }
    }
    assert!(matches!(failed, Some(Error::NoSpace)), "{failed:?}");
    d.flush().unwrap();
    let mut buf = [0u8; 4096];
    d.read(&mut buf, 0).unwrap();
    assert_eq!(buf, [7; 4096]);
    assert_clean(&store);
    // Not a store / newer version.
    let junk = Arc::new(MemDevice::new(MIB));
    assert!(matches!(
        Store::open(junk, &OpenOptions::default()),
        Err(Error::NotAStore(_))
    ));
    let mut img = dev.to_bytes();
    drop(d);
    drop(store);
    for copy in 0..2 {
        img[copy * 4096 + 6] = 9;
    }
    let newer = Arc::new(MemDevice::from_bytes(img));
    assert!(matches!(
        Store::open(newer, &OpenOptions::default()),
        Err(Error::NewerVersion { found: 9, .. })
    ));
}

#[test]
fn delete_disk_and_snapshot() {
    let (dev, store) = small_store(64 * MIB);
    let free0 = store.stats().free_bytes;
    let a = store.create_vdi("a", MIB).unwrap();
    a.write(&[1; 65536], 0).unwrap();
    a.snapshot(Some("s1")).unwrap();
    a.write(&[2; 4096], 0).unwrap();
    a.snapshot(Some("s2")).unwrap();
    let c = store.clone_snapshot("a", "s1", "c").unwrap();
    // s1 has a clone: deleting it hides it and keeps its blocks.
    let report = a.delete_snapshot("s1").unwrap();
    assert_eq!(
        (report.deleted, report.hidden, report.freed_blocks),
        (1, 1, 0)
    );
    assert!(matches!(a.snapshot_info("s1"), Err(Error::NotFound(_))));
    assert!(matches!(a.delete_snapshot("s1"), Err(Error::NotFound(_))));
    assert_eq!(a.info().hidden_snapshots, 1);
    // A disk with clones cannot be deleted.
    assert!(matches!(store.delete_vdi("a"), Err(Error::Busy(m)) if m.contains("(c)")));
    let mut buf = vec![0u8; 65536];
    c.read(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 1));
    assert_clean(&store);
    // Deleting the clone lets the hidden snapshot go: its blocks that s2
    // does not share (block 0 held 1s in s1, 2s in s2) come back.
    let used = store.stats().used_bytes;
    store.delete_vdi("c").unwrap();
    assert_eq!(a.info().hidden_snapshots, 0);
    assert!(store.stats().used_bytes < used);
    store.delete_vdi("a").unwrap();
    assert!(matches!(a.read(&mut [0; 10], 0), Err(Error::Deleted(_))));
    assert!(store.list().is_empty());
    assert_clean(&store);
    // Frees of the last commit reach the on-disk bitmaps with flush_all,
    // and nothing was left for gc.
    store.flush_all().unwrap();
    assert_eq!(store.check().unwrap().leaked_blocks, 0);
    assert_eq!(store.gc().unwrap().freed_blocks, 0);
    assert_eq!(store.stats().free_bytes, free0);
    drop(c);
    drop(store);
    let store = reopen(&dev);
    assert!(store.list().is_empty());
    assert_clean(&store);
    assert_eq!(store.stats().free_bytes, free0);
}

#[test]
fn concurrent_writers_on_one_disk_and_several() {
    let (_dev, store) = small_store(256 * MIB);
    let d = store.create_vdi("d", 16 * MIB).unwrap();
    let e = store.create_vdi("e", 16 * MIB).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let d = d.clone();
            let e = e.clone();
            s.spawn(move || {
                for i in 0..200u64 {
                    // Disjoint 1000-byte pieces, many sharing blocks.
                    let off = (i * 4 + t) * 1000;
                    d.write(&[t as u8 + 1; 1000], off).unwrap();
                    e.write(&[t as u8 + 1; 4096], (i * 4 + t) * 4096).unwrap();
                    if i % 50 == 0 {
                        d.flush().unwrap();
                        d.snapshot(None).ok();
                    }
                }
            });
        }
    });
    let mut buf = vec![0u8; 1000];
    for i in 0..200u64 {
        for t in 0..4u64 {
            d.read(&mut buf, (i * 4 + t) * 1000).unwrap();
            assert!(buf.iter().all(|&b| b == t as u8 + 1), "piece {i}/{t}");
        }
    }
    store.flush_all().unwrap();
    assert_clean(&store);
}

/// Causality across snapshots taken while a writer runs. Round k writes
/// the counter k into block 1 + k (never written before: a new block) and,
/// once that is acknowledged, into block 0 (the disk's own block after the
/// first commit: written in place). A snapshot that holds block 0 = k must
/// hold block 1 + k = k too, and what a snapshot holds when it is
/// answered never changes after. The first breaks as soon as a write may land in
/// place in a block a snapshot takes while an earlier write went to a new
/// block it does not: for instance if the snapshot's commit let the data
/// path in before its adoption (tried once, by downgrading the disk lock
/// while the commit's nodes are encoded: without also making every write
/// allocate meanwhile, this test failed every run); the second as soon as
/// an in-place write stops holding the disk shared while its data moves.
#[test]
fn a_snapshot_holding_a_write_holds_every_write_acknowledged_before_it() {
    let (_dev, store) = small_store(256 * MIB);
    let d = store.create_vdi("d", 64 * MIB).unwrap();
    const ROUNDS: u64 = 12_000;
    const SNAPSHOTS: usize = 1_000;
    let block = |k: u64| {
        let mut b = vec![0u8; 4096];
        b[..8].copy_from_slice(&k.to_le_bytes());
        b
    };
    let counter = |view: &dyn ReadDisk, v: u64| {
        let mut b = vec![0u8; 4096];
        view.read(&mut b, v * 4096).unwrap();
        u64::from_le_bytes(b[..8].try_into().unwrap())
    };
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut taken = Vec::new();
    std::thread::scope(|s| {
        let writer = d.clone();
        let done = &done;
        s.spawn(move || {
            for k in 1..=ROUNDS {
                writer.write(&block(k), (1 + k) * 4096).unwrap();
                writer.write(&block(k), 0).unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        while !done.load(std::sync::atomic::Ordering::Relaxed) && taken.len() < SNAPSHOTS {
            let name = d.snapshot(None).unwrap().name;
            // What block 0 holds once the snapshot is answered: it must
            // never change after (no write in flight may still land in it).
            let first = counter(&store.open_snapshot("d", &name).unwrap(), 0);
            taken.push((name, first));
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    });
    let mut checked = 0;
    for (name, first) in &taken {
        let view = store.open_snapshot("d", name).unwrap();
        let k = counter(&view, 0);
        assert_eq!(k, *first, "snapshot {name} changed after it was taken");
        if k > 0 {
            assert_eq!(
                counter(&view, 1 + k),
                k,
                "snapshot {name} holds block 0 = {k}"
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no snapshot caught the writer");
}

#[test]
fn concurrent_allocating_writes_race_with_snapshots_and_gc_without_loss_or_leak() {
    // Writers allocate with the disk lock dropped while their data goes to
    // the device; snapshots keep forcing new allocations, another thread
    // deletes them, and `gc` keeps sweeping (marking while all of that
    // goes on). Every thread owns its own blocks, written in multi-block
    // requests; two more threads fight over the same shared blocks.
    let (_dev, store) = small_store(256 * MIB);
    let d = store.create_vdi("d", 32 * MIB).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    const ROUNDS: u64 = 400;
    std::thread::scope(|s| {
        let mut writers = Vec::new();
        for t in 0..4u64 {
            let d = d.clone();
            writers.push(s.spawn(move || {
                for i in 0..ROUNDS {
                    // 3 blocks at block (t * 1000 + i * 3): own region per thread.
                    let fill = ((t * 64 + i % 64) % 255) as u8 + 1;
                    d.write(&vec![fill; 3 * 4096], (t * 1000 + (i % 20) * 3) * 4096)
                        .unwrap();
                }
            }));
        }
        for t in 0..2u8 {
            let d = d.clone();
            writers.push(s.spawn(move || {
                for i in 0..ROUNDS {
                    // Both threads write blocks 5000..5004 whole.
                    d.write(&vec![0xe0 + t; 4 * 4096], 5000 * 4096).unwrap();
                    if i % 7 == 0 {
                        d.flush().unwrap();
                    }
                }
            }));
        }
        let stop = &stop;
        let running = || !stop.load(std::sync::atomic::Ordering::Relaxed);
        let mut helpers = Vec::new();
        // Snapshots, each deleted again (oldest first) by another thread:
        // their blocks are freed while gc marks.
        let pause = std::thread::yield_now;
        let d2 = d.clone();
        helpers.push(s.spawn(move || {
            let mut n = 0;
            while running() || n < 3 {
                if d2.snapshots().len() < 8 {
                    d2.snapshot(None).unwrap();
                    n += 1;
                }
                pause();
            }
        }));
        let d3 = d.clone();
        helpers.push(s.spawn(move || {
            while running() {
                let snaps = d3.snapshots();
                if snaps.len() > 2 {
                    d3.delete_snapshot(&snaps[0].name).unwrap();
                }
                pause();
            }
        }));
        let store2 = store.clone();
        helpers.push(s.spawn(move || {
            let mut sweeps = 0;
            while running() || sweeps < 3 {
                store2.gc().unwrap();
                sweeps += 1;
                pause();
            }
        }));
        // Stop the helpers even if a writer failed, then report.
        let written: Vec<_> = writers.into_iter().map(|w| w.join()).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for h in helpers {
            h.join().unwrap();
        }
        for w in written {
            w.unwrap();
        }
    });
    let mut buf = vec![0u8; 4096];
    for t in 0..4u64 {
        for slot in 0..20u64 {
            // The last round that wrote this slot.
            let last = (0..ROUNDS).filter(|i| i % 20 == slot).max().unwrap();
            let fill = ((t * 64 + last % 64) % 255) as u8 + 1;
            for b in 0..3 {
                d.read(&mut buf, (t * 1000 + slot * 3 + b) * 4096).unwrap();
                assert!(buf.iter().all(|&x| x == fill), "thread {t} slot {slot}");
            }
        }
    }
    for b in 0..4u64 {
        d.read(&mut buf, (5000 + b) * 4096).unwrap();
        assert!(
            buf.iter().all(|&x| x == 0xe0) || buf.iter().all(|&x| x == 0xe1),
            "contended block {b} is torn or foreign"
        );
    }
    store.flush_all().unwrap();
    let report = store.check().unwrap();
    assert!(report.is_clean(), "{:#?}", report.errors);
    assert_eq!(report.leaked_blocks, 0, "{:#?}", report.warnings);
}

#[test]
fn filling_a_disk_without_flushing_uses_the_whole_store() {
    // Whole-block writes that allocate keep room for the metadata their
    // commit will need; that reserve must stay small, or writes fail with
    // ENOSPC long before the store is full.
    let (_dev, store) = small_store(64 * MIB);
    let free = store.stats().free_bytes;
    let size = (free - 2 * MIB) / (1 << 20) * (1 << 20);
    let d = store.create_vdi("d", size).unwrap();
    let chunk = vec![0x77u8; 1 << 20];
    for i in 0..size / (1 << 20) {
        d.write(&chunk, i * (1 << 20))
            .unwrap_or_else(|e| panic!("MiB {i} of {}: {e}", size >> 20));
    }
    d.flush().unwrap();
    let mut back = vec![0u8; 1 << 20];
    d.read(&mut back, size - (1 << 20)).unwrap();
    assert_eq!(back, chunk);
    assert_clean(&store);
}

#[test]
fn grow_keeps_data_and_refuses_shrink() {
    let (_dev, store) = small_store(32 * MIB);
    let d = store.create_vdi("d", MIB).unwrap();
    d.write(&[5; 10], MIB - 10).unwrap();
    d.grow(2 * MIB).unwrap();
    d.write(&[6; 10], 2 * MIB - 10).unwrap();
    let mut b = [0u8; 10];
    d.read(&mut b, MIB - 10).unwrap();
    assert_eq!(b, [5; 10]);
    assert!(d.grow(MIB).is_err());
    let dev_len = _dev.len();
    assert!(dev_len > 0);
}

#[test]
fn io_plans_name_the_blocks_read_and_write_would_use_and_pin_the_disk() {
    use parallax_device::{FileDevice, OpenMode};
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.px");
    let dev = Arc::new(FileDevice::create(&path, 64 * MIB, OpenMode::default()).unwrap());
    let store = Store::create(
        dev,
        &CreateOptions {
            extent_data_blocks: 256,
            host_id: 1,
        },
    )
    .unwrap();
    let d = store.create_vdi("d", 4 * MIB).unwrap();
    // Blocks 0..8 written, 8..12 a hole, 12..16 written.
    d.write(&vec![0x11; 8 * 4096], 0).unwrap();
    d.write(&vec![0x22; 4 * 4096], 12 * 4096).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let planned_read = |offset: u64, len: usize| {
        let plan = d.try_plan_read(offset, len).unwrap().expect("plannable");
        let mut buf = vec![0xffu8; len];
        for t in &plan.transfers {
            file.read_exact_at(&mut buf[t.buf.clone()], t.device_offset)
                .unwrap();
        }
        for z in &plan.zeros {
            buf[z.clone()].fill(0);
        }
        let mut want = vec![0u8; len];
        d.read(&mut want, offset).unwrap();
        assert_eq!(buf, want, "plan for {offset}+{len}");
        plan
    };
    let plan = planned_read(0, 16 * 4096);
    assert_eq!(plan.zeros, vec![8 * 4096..12 * 4096]);
    drop(plan);
    drop(planned_read(4 * 4096, 4096));
    // Unaligned requests are not planned.
    assert!(d.try_plan_read(100, 4096).unwrap().is_none());
    assert!(d.try_plan_read(4 * MIB, 4096).is_err());

    let wfile = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let perform = |plan: &parallax_engine::IoPlan, byte: u8| {
        for t in &plan.transfers {
            wfile
                .write_all_at(&vec![byte; t.buf.len()], t.device_offset)
                .unwrap();
        }
    };
    let block = |v: u64| {
        let mut b = vec![0u8; 4096];
        d.read(&mut b, v * 4096).unwrap();
        b
    };
    // A write over owned blocks (6, 7) and a hole (8, 9): new blocks for
    // the hole, which join the disk only when the plan finishes well.
    let free0 = store.stats().free_bytes;
    let plan = d
        .try_plan_write(6 * 4096, 4 * 4096)
        .unwrap()
        .expect("plannable");
    let covered: usize = plan.transfers.iter().map(|t| t.buf.len()).sum();
    assert_eq!(covered, 4 * 4096);
    perform(&plan, 0x44);
    assert!(block(6).iter().all(|&b| b == 0x44), "in place at once");
    assert!(
        block(8).iter().all(|&b| b == 0),
        "new blocks visible too early"
    );
    plan.finish(true);
    for v in 6..10 {
        assert!(block(v).iter().all(|&b| b == 0x44), "block {v}");
    }
    assert_eq!(store.stats().free_bytes, free0 - 2 * 4096);
    // A plan dropped without finishing gives its new blocks back.
    let plan = d
        .try_plan_write(10 * 4096, 2 * 4096)
        .unwrap()
        .expect("plannable");
    perform(&plan, 0x55);
    drop(plan);
    assert!(block(10).iter().all(|&b| b == 0));
    assert_eq!(store.stats().free_bytes, free0 - 2 * 4096);
    let plan = d
        .try_plan_write(0, 2 * 4096)
        .unwrap()
        .expect("owned blocks");
    // While a plan lives, the disk cannot commit: a snapshot waits.
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        let d2 = d.clone();
        let snap = s.spawn(move || {
            d2.snapshot(Some("s")).unwrap();
            std::time::Instant::now()
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        perform(&plan, 0x33);
        let released = std::time::Instant::now();
        drop(plan);
        let done = snap.join().unwrap();
        assert!(done >= released, "the snapshot did not wait for the plan");
    });
    assert!(started.elapsed() >= std::time::Duration::from_millis(100));
    let mut buf = vec![0u8; 4096];
    store
        .open_snapshot("d", "s")
        .unwrap()
        .read(&mut buf, 4096)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 0x33));
    // After the snapshot the blocks are shared: a write gets new ones.
    let read_at = d.try_plan_read(0, 4096).unwrap().unwrap().transfers[0].device_offset;
    let plan = d.try_plan_write(0, 4096).unwrap().unwrap();
    assert_ne!(
        plan.transfers[0].device_offset, read_at,
        "wrote into a shared block"
    );
    perform(&plan, 0x66);
    plan.finish(true);
    assert!(block(0).iter().all(|&b| b == 0x66));
    store
        .open_snapshot("d", "s")
        .unwrap()
        .read(&mut buf, 0)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 0x33), "the snapshot changed");
    // (flush_all also writes the bitmaps that the last commit's frees changed)
    store.flush_all().unwrap();
    let report = store.check().unwrap();
    assert!(report.is_clean(), "{:#?}", report.errors);
    assert_eq!(report.leaked_blocks, 0);
}

#[test]
fn log_compaction_keeps_hidden_snapshots_and_lineage_across_reopen() {
    let (dev, store) = small_store(64 * MIB);
    let d = store.create_vdi("d", MIB).unwrap();
    d.write(&[9; 8192], 0).unwrap();
    d.snapshot(Some("gold")).unwrap();
    store.clone_snapshot("d", "gold", "c").unwrap();
    // Hidden: the clone still needs it.
    assert_eq!(d.delete_snapshot("gold").unwrap().hidden, 1);
    // Enough history for the log to be rewritten (more than 2 × kept + 96
    // records), with a write between snapshots.
    for i in 0..120u64 {
        d.write(&[i as u8; 4096], (i % 16) * 4096).unwrap();
        d.snapshot(Some(&format!("s{i}"))).unwrap();
    }
    for i in 0..115u64 {
        d.delete_snapshot(&format!("s{i}")).unwrap();
    }
    store.flush_all().unwrap();
    drop((d, store));
    let store = reopen(&dev);
    let d = store.open_vdi("d").unwrap();
    assert_eq!(d.info().hidden_snapshots, 1);
    let names: Vec<String> = d.snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        (115..120).map(|i| format!("s{i}")).collect::<Vec<_>>()
    );
    for i in 115..120u64 {
        let view = store.open_snapshot("d", &format!("s{i}")).unwrap();
        let mut buf = vec![0u8; 4096];
        view.read(&mut buf, (i % 16) * 4096).unwrap();
        assert!(buf.iter().all(|&b| b == i as u8), "s{i}");
    }
    let c = store.open_vdi("c").unwrap();
    let mut buf = vec![0u8; 8192];
    c.read(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 9));
    assert_clean(&store);
    // Deleting the clone lets the hidden snapshot go, after the reopen too.
    drop(c);
    store.delete_vdi("c").unwrap();
    assert_eq!(d.info().hidden_snapshots, 0);
    store.flush_all().unwrap();
    let report = store.check().unwrap();
    assert!(report.is_clean(), "{:#?}", report.errors);
    assert_eq!(report.leaked_blocks, 0);
}

/// Dropping every handle, then the store, without a flush: the writes are
/// committed when the store lets its disks go, and nothing leaks.
#[test]
fn dropped_handles_lose_and_leak_nothing() {
    let dev = Arc::new(parallax_device::MemDevice::new(16 << 20));
    let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
    let d = store.create_vdi("d", 1 << 20).unwrap();
    d.write(&[1; 8192], 0).unwrap();
    d.write(&[2; 100], 9000).unwrap();
    drop(d);
    drop(store);
    let store = Store::open(dev, &OpenOptions::default()).unwrap();
    let report = store.check().unwrap();
    assert!(report.is_clean(), "{:#?}", report.errors);
    assert_eq!(report.leaked_blocks, 0);
    let mut buf = vec![0u8; 8192];
    store.open_vdi("d").unwrap().read(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 1), "unflushed write lost");
}

/// `check` while a disk is written, snapshotted every tick and thinned by
/// retention (blocks freed all the time): never a false error.
#[test]
fn online_check_under_load_reports_no_false_errors() {
    use parallax_engine::Schedule;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dev = Arc::new(parallax_device::MemDevice::new(64 << 20));
    let store = Store::create(dev, &CreateOptions::default()).unwrap();
    let d = store.create_vdi("d", 4 << 20).unwrap();
    d.set_schedule(Schedule {
        every_ns: 1_000_000,
        keep_last: 3,
        ..Schedule::default()
    })
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let writer = {
        let (d, stop, ops) = (d.clone(), stop.clone(), ops.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let block = (i * 7919) % 1000;
                d.write(&[i as u8; 8192], block * 4096).unwrap();
                if i.is_multiple_of(4) {
                    d.schedule_tick().unwrap();
                }
                if i.is_multiple_of(16) {
                    d.discard(block * 4096, 65536).unwrap();
                }
                i += 1;
                ops.store(i, Ordering::Relaxed);
            }
        })
    };
    let mut checks = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while (checks < 30 || ops.load(Ordering::Relaxed) < 2000)
        && std::time::Instant::now() < deadline
    {
        let report = store.check().unwrap();
        assert!(
            report.is_clean(),
            "check {checks} after {} ops: {:#?}",
            ops.load(Ordering::Relaxed),
            report.errors
        );
        checks += 1;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(ops.load(Ordering::Relaxed) >= 2000, "the writer hardly ran");
}

/// The newest copy of a disk's header is lost (zeroed): the older copy
/// references blocks the newer commit freed. The disk must not be served
/// at that generation (its blocks may be reused), and `gc` must not free
/// around it; `check` reports it.
#[test]
fn a_header_gone_back_in_time_is_refused_and_gc_frees_nothing() {
    use parallax_format::VdiHeader;
    let dev = Arc::new(parallax_device::MemDevice::new(16 << 20));
    let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
    let store_id = store.store_id();
    let d = store.create_vdi("d", 1 << 20).unwrap();
    let other = store.create_vdi("other", 1 << 20).unwrap();
    other.write(&[9; 65536], 0).unwrap();
    d.write(&[1; 65536], 0).unwrap();
    d.flush().unwrap();
    d.write(&[2; 65536], 0).unwrap();
    d.write(&[2; 65536], 1 << 19).unwrap();
    drop((d, other));
    drop(store);
    // The newest header of disk "d" (id 1), zeroed.
    let mut newest: Option<(u64, u64)> = None;
    let mut block = vec![0u8; 4096];
    for addr in 0..dev.len() / 4096 {
        dev.read_at(&mut block, addr * 4096).unwrap();
        if let Ok(h) = VdiHeader::decode(&block, addr, Some(store_id)) {
            if h.vdi_id == 1 && newest.is_none_or(|(_, g)| h.generation > g) {
                newest = Some((addr, h.generation));
            }
        }
    }
    let (addr, generation) = newest.expect("a header of disk d");
    assert!(generation >= 3, "generation {generation}");
    dev.write_at(&vec![0u8; 4096], addr * 4096).unwrap();

    let store = Store::open(dev.clone(), &OpenOptions::default()).unwrap();
    match store.open_vdi("d") {
        Err(Error::Inconsistent(msg)) => assert!(msg.contains("marks free"), "{msg}"),
        Err(Error::Corrupt(_)) => {}
        Ok(_) => panic!("a disk whose header went back in time was served"),
        Err(e) => panic!("unexpected error: {e}"),
    }
    let report = store.check().unwrap();
    assert!(!report.is_clean(), "check missed the damage");
    let used = store.stats().used_bytes;
    assert!(store.gc().is_err(), "gc ran on a damaged store");
    assert_eq!(store.stats().used_bytes, used, "gc freed blocks");
    // The other disk is served as it was, but nothing is written over
    // blocks the damaged disk may still hold.
    assert!(store.damage().is_some());
    let other = store.open_vdi("other").unwrap();
    let mut buf = vec![0u8; 65536];
    other.read(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 9));
    assert!(
        other.write(&[7; 4096], 1 << 19).is_err(),
        "a damaged store took an allocating write"
    );
}

/// A lost write of an extent's bitmap: both slots put back to an older
/// valid copy. The blocks allocated since look free; a disk whose root is
/// among them is refused, the store takes no writes (nothing is allocated
/// over them), and `check` reports it.
#[test]
fn bitmaps_gone_back_in_time_stop_every_write() {
    let dev = Arc::new(parallax_device::MemDevice::new(16 << 20));
    let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
    let early = store.create_vdi("early", 1 << 20).unwrap();
    early.write(&[5; 65536], 0).unwrap();
    store.flush_all().unwrap();
    // The only extent's two bitmap slots (blocks 2 and 3), as they are now.
    let mut old = vec![0u8; 8192];
    dev.read_at(&mut old, 2 * 4096).unwrap();
    let late = store.create_vdi("late", 1 << 20).unwrap();
    late.write(&[6; 262144], 0).unwrap();
    drop((early, late));
    store.flush_all().unwrap();
    drop(store);
    dev.write_at(&old, 2 * 4096).unwrap();

    let store = Store::open(dev.clone(), &OpenOptions::default()).unwrap();
    assert!(
        store.damage().is_some(),
        "the reverted bitmaps went unnoticed"
    );
    assert!(
        store.open_vdi("late").is_err(),
        "a disk on free blocks was served"
    );
    let early = store.open_vdi("early").unwrap();
    let mut buf = vec![0u8; 65536];
    early.read(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 5));
    assert!(
        early.write(&[1; 4096], 1 << 19).is_err(),
        "an allocating write"
    );
    assert!(store.create_vdi("new", 1 << 20).is_err());
    assert!(!store.check().unwrap().is_clean());
    assert!(store.gc().is_err());
}
