//! Crash tests: a random sequence of operations runs on the crash-simulating
//! device, and power is cut at every flush point of the device (and at
//! random writes in between), dropping, keeping a random subset of, or
//! tearing the unflushed writes. The durable image is then reopened: it must
//! open without repair, `check` must be clean, every disk must hold, block
//! by block, either what was committed (flushed) or something written
//! since, every snapshot taken before the cut must be intact, and `gc` must
//! then reclaim every leaked block. With a read cache on its own crash
//! device (`power_cut_on_the_pool_and_the_read_cache`), the cache loses
//! power at the same moment, and the reopened store reads through what is
//! left of it: nothing it serves may differ from the above.

mod common;

use common::{InFlight, Op, Runner};
use parallax_device::{BlockDevice, CrashDevice, CrashMode, MemDevice, SplitMix};
use parallax_engine::{
    CreateOptions, OpenOptions, ReadCache, ReadDisk, Store, WriteLog, MIN_LOG_BYTES,
};
use std::sync::Arc;

const STORE_BYTES: u64 = 24 << 20;

/// Test sequences draw from the device crate's generator.
struct Rng(SplitMix);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(SplitMix(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn sequence(seed: u64, len: usize) -> Vec<Op> {
    let mut r = Rng::new(seed);
    let mut ops = vec![Op::Create { blocks: 15 }];
    for _ in 0..len {
        let op = match r.next() % 26 {
            0 => Op::Create { blocks: r.byte() },
            1..=9 => Op::Write {
                disk: r.byte(),
                offset: r.next() as u32,
                len: r.next() as u16,
                seed: r.byte(),
            },
            10 => Op::Discard {
                disk: r.byte(),
                offset: r.next() as u32,
                len: r.next() as u32,
            },
            11 => Op::WriteZeroes {
                disk: r.byte(),
                offset: r.next() as u32,
                len: r.next() as u32,
            },
            12..=14 => Op::Flush { disk: r.byte() },
            15 => Op::Snapshot { disk: r.byte() },
            16 => Op::SnapshotDeferred {
                disk: r.byte(),
                then_durable: r.byte() & 1 == 0,
            },
            17 | 18 => Op::Clone {
                disk: r.byte(),
                snap: r.byte(),
            },
            19 | 20 => Op::DeleteSnapshot {
                disk: r.byte(),
                snap: r.byte(),
            },
            21 => Op::DeleteDisk { disk: r.byte() },
            22 => Op::ScheduleTick {
                disk: r.byte(),
                keep: r.byte(),
            },
            23 => Op::Gc,
            24 => Op::DropHandles,
            _ => Op::Settle,
        };
        ops.push(op);
    }
    ops
}

/// A sequence heavy on what reclaims space: snapshots taken and deleted,
/// schedule ticks with retention, clones, disk deletion and gc.
fn deletion_sequence(seed: u64, len: usize) -> Vec<Op> {
    let mut r = Rng::new(seed);
    let mut ops = vec![Op::Create { blocks: 15 }, Op::Create { blocks: 7 }];
    for _ in 0..len {
        let op = match r.next() % 42 {
            0..=13 => Op::Write {
                disk: r.byte(),
                offset: r.next() as u32,
                len: r.next() as u16,
                seed: r.byte(),
            },
            14..=16 => Op::Flush { disk: r.byte() },
            17..=19 => Op::Snapshot { disk: r.byte() },
            20 => Op::SnapshotDeferred {
                disk: r.byte(),
                then_durable: r.byte() & 1 == 0,
            },
            21..=26 => Op::ScheduleTick {
                disk: r.byte(),
                keep: r.byte(),
            },
            27..=32 => Op::DeleteSnapshot {
                disk: r.byte(),
                snap: r.byte(),
            },
            33 | 34 => Op::Clone {
                disk: r.byte(),
                snap: r.byte(),
            },
            35 => Op::DeleteDisk { disk: r.byte() },
            36 => Op::Create { blocks: r.byte() },
            37 => Op::Discard {
                disk: r.byte(),
                offset: r.next() as u32,
                len: r.next() as u32,
            },
            40 => Op::DropHandles,
            41 => Op::Settle,
            _ => Op::Gc,
        };
        ops.push(op);
    }
    ops
}

fn create(dev: Arc<CrashDevice>) -> parallax_engine::Result<Store> {
    Store::create(
        dev,
        &CreateOptions {
            extent_data_blocks: 256,
            host_id: 1,
        },
    )
}

fn fresh_store(dev: Arc<CrashDevice>) -> Store {
    create(dev).unwrap()
}

/// Runs `ops` until the first failure (the power cut). Returns the runner
/// (model and in-flight operation) as it stood then, or `None` if the power
/// went while the store was being formatted.
fn run(dev: &Arc<CrashDevice>, ops: &[Op]) -> Option<Runner> {
    run_with(dev, ops, None)
}

/// [`run`] on a store with entry journals (format 2) turned on right after
/// it is formatted.
fn run_journaled(dev: &Arc<CrashDevice>, ops: &[Op]) -> Option<Runner> {
    run_in(dev, ops, None, Some(65536))
}

/// [`run_journaled`], with a checkpoint whenever a journal holds 4 records.
fn run_journaled_checkpoints(dev: &Arc<CrashDevice>, ops: &[Op]) -> Option<Runner> {
    run_in(dev, ops, None, Some(4))
}

/// [`run`], with the store behind a read cache on `cache` (opened after the
/// store is formatted), every disk and snapshot read after each operation
/// so that the cache fills as the sequence goes.
fn run_with(
    dev: &Arc<CrashDevice>,
    ops: &[Op],
    cache: Option<&Arc<CrashDevice>>,
) -> Option<Runner> {
    run_in(dev, ops, cache, None)
}

fn run_in(
    dev: &Arc<CrashDevice>,
    ops: &[Op],
    cache: Option<&Arc<CrashDevice>>,
    journal_checkpoint: Option<u64>,
) -> Option<Runner> {
    let mut store = create(dev.clone()).ok()?;
    if let Some(records) = journal_checkpoint {
        // A cut while it is turned on: the store is as formatted, or
        // journaled with nothing in a journal yet.
        store.enable_journal().ok()?;
        store.set_journal_checkpoint(records);
    }
    if let Some(cache_dev) = cache {
        drop(store);
        let id = Store::peek_id(&**dev).ok()?;
        let cache = Arc::new(ReadCache::open(cache_dev.clone(), id).ok()?);
        let options = OpenOptions {
            read_cache: Some(cache),
            ..OpenOptions::default()
        };
        store = Store::open(dev.clone(), &options).ok()?;
    }
    let mut runner = Runner::new(store);
    let mut no_reopen = || -> Store { unreachable!("no reopen in crash sequences") };
    for op in ops {
        if runner.apply(op, &mut no_reopen).is_err() {
            assert!(dev.is_crashed(), "an operation failed without a power cut");
            break;
        }
        if cache.is_some() && read_everything(&runner).is_err() {
            assert!(dev.is_crashed(), "a read failed without a power cut");
            break;
        }
    }
    Some(runner)
}

/// [`run`] through a write-back log on `log` (odd disks write-back), the
/// two devices losing power together at flush `cut_at` of either (`None`:
/// no cut). The store is left open: the caller cuts what is still up.
fn run_with_log(
    dev: &Arc<CrashDevice>,
    log: &Arc<CrashDevice>,
    ops: &[Op],
    cut_at: Option<(u64, CrashMode)>,
) -> Option<Runner> {
    drop(create(dev.clone()).ok()?);
    let id = Store::peek_id(&**dev).ok()?;
    let (wlog, _) = WriteLog::open(log.clone(), dev.clone(), id, 0, 1).ok()?;
    let wlog = Arc::new(wlog);
    if let Some((at, mode)) = cut_at {
        parallax_device::share_power(&[dev, log], at, mode);
    }
    let options = OpenOptions {
        write_log: Some(wlog.clone()),
        ..OpenOptions::default()
    };
    let mut runner = Runner::new(Store::open(wlog, &options).ok()?);
    runner.write_back_odd = true;
    let mut no_reopen = || -> Store { unreachable!("no reopen in crash sequences") };
    for op in ops {
        if runner.apply(op, &mut no_reopen).is_err() {
            assert!(
                dev.is_crashed() || log.is_crashed(),
                "an operation failed without a power cut"
            );
            break;
        }
    }
    Some(runner)
}

/// Reads every disk and snapshot of the model once.
fn read_everything(runner: &Runner) -> parallax_engine::Result<()> {
    for (name, m) in &runner.model.disks {
        let d = runner.store.open_vdi(name)?;
        let mut buf = vec![0u8; m.data.len()];
        d.read(&mut buf, 0)?;
        for (s, content) in &m.snapshots {
            let mut buf = vec![0u8; content.len()];
            runner.store.open_snapshot(name, s)?.read(&mut buf, 0)?;
        }
    }
    Ok(())
}

/// Reopens the durable image and checks everything the module doc promises.
fn verify_after_crash(image: Vec<u8>, runner: &Runner, what: &str) {
    verify_after_crash_with(image, None, runner, what);
}

/// [`verify_after_crash`], reading through a read cache opened on
/// `cache_image` (what its device kept) when there is one. Returns how many
/// reads that cache served while the disks and snapshots were checked.
fn verify_after_crash_with(
    image: Vec<u8>,
    cache_image: Option<Vec<u8>>,
    runner: &Runner,
    what: &str,
) -> u64 {
    verify_after_crash_through(image, cache_image, None, runner, what)
}

/// [`verify_after_crash_with`], through the write-back log on `log_image`
/// when there is one (replayed as the superblock names it).
fn verify_after_crash_through(
    image: Vec<u8>,
    cache_image: Option<Vec<u8>>,
    log_image: Option<Vec<u8>>,
    runner: &Runner,
    what: &str,
) -> u64 {
    let mut dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(image));
    let cache = cache_image.map(|c| {
        let id = Store::peek_id(&*dev).unwrap();
        Arc::new(ReadCache::open(Arc::new(MemDevice::from_bytes(c)), id).unwrap())
    });
    let log = log_image.map(|l| {
        let id = Store::peek_id(&*dev).unwrap();
        let named = Store::peek_write_log(&*dev)
            .unwrap()
            .map_or(0, |(id, _)| id);
        let opened = WriteLog::open(
            Arc::new(MemDevice::from_bytes(l)),
            dev.clone(),
            id,
            named,
            1,
        );
        let (log, _) = opened.unwrap_or_else(|e| panic!("{what}: the log does not open: {e}"));
        Arc::new(log)
    });
    if let Some(log) = &log {
        dev = log.clone();
    }
    let options = OpenOptions {
        read_cache: cache.clone(),
        write_log: log,
        ..OpenOptions::default()
    };
    let store = match Store::open(dev.clone(), &options) {
        Ok(s) => s,
        Err(e) => panic!("{what}: the store does not open: {e}"),
    };
    let report = store.check().unwrap();
    assert!(report.is_clean(), "{what}: check: {:#?}", report.errors);

    let mut expected: Vec<String> = runner.model.disks.keys().cloned().collect();
    let mut names = store.list();
    if let Some(InFlight::NewDisk { name, content }) = &runner.in_flight {
        if names.contains(name) {
            expected.push(name.clone());
            let d = store.open_vdi(name).unwrap();
            let mut buf = vec![0u8; content.len()];
            d.read(&mut buf, 0).unwrap();
            assert!(
                buf == *content,
                "{what}: half-created disk {name} has wrong content"
            );
        }
    }
    if let Some(InFlight::DeletedDisk { name }) = &runner.in_flight {
        // The delete may or may not have landed.
        if !names.contains(name) {
            expected.retain(|n| n != name);
        }
    }
    expected.sort();
    names.sort();
    assert_eq!(names, expected, "{what}: disk list");

    for (name, m) in &runner.model.disks {
        if !names.contains(name) {
            continue;
        }
        let d = store.open_vdi(name).unwrap();
        assert_eq!(d.size(), m.data.len() as u64, "{what}: size of {name}");
        let mut buf = vec![0u8; m.data.len()];
        d.read(&mut buf, 0).unwrap();
        if let Err(e) = m.crash_acceptable(&buf) {
            panic!("{what}: disk {name}: {e}");
        }
        let mut want: Vec<(String, Vec<u8>)> = m.snapshots.clone();
        match &runner.in_flight {
            Some(InFlight::NewSnapshot {
                disk,
                name: s,
                content,
            }) if disk == name && d.snapshot_info(s).is_ok() => {
                want.push((s.clone(), content.clone()));
            }
            Some(InFlight::Tick {
                disk,
                content,
                expired,
            }) if disk == name => {
                // Expired snapshots may still be there (intact, checked
                // below); the new one, if it landed, holds `content`.
                want.retain(|(n, _)| !expired.contains(n) || d.snapshot_info(n).is_ok());
                let known: Vec<String> = m.snapshots.iter().map(|(n, _)| n.clone()).collect();
                for s in d.snapshots() {
                    if !known.contains(&s.name) {
                        want.push((s.name, content.clone()));
                    }
                }
                assert!(
                    want.len() <= m.snapshots.len() + 1,
                    "{what}: more than one new snapshot"
                );
            }
            Some(InFlight::DeletedSnapshot {
                disk,
                name: s,
                content,
            }) if disk == name => {
                // The delete may or may not have landed; if the snapshot is
                // still there it must be intact (checked below).
                want.retain(|(n, _)| n != s);
                if d.snapshot_info(s).is_ok() {
                    want.push((s.clone(), content.clone()));
                }
            }
            _ => {}
        }
        // A deferred snapshot not yet made durable may be lost; if it is
        // there it must be intact (checked below).
        want.retain(|(n, _)| !m.unsure.contains(n) || d.snapshot_info(n).is_ok());
        let mut got: Vec<String> = d.snapshots().into_iter().map(|s| s.name).collect();
        let mut want_names: Vec<String> = want.iter().map(|(n, _)| n.clone()).collect();
        got.sort();
        want_names.sort();
        assert_eq!(got, want_names, "{what}: snapshots of {name}");
        for (s, content) in &want {
            let view = store.open_snapshot(name, s).unwrap();
            let mut buf = vec![0u8; content.len()];
            view.read(&mut buf, 0).unwrap();
            assert!(buf == *content, "{what}: snapshot {name}@{s} changed");
        }
    }
    let served = store.read_cache_stats().map_or(0, |s| s.hits);
    // Leaks from the cut are found and returned.
    store.gc().unwrap();
    let report = store.check().unwrap();
    assert!(
        report.is_clean(),
        "{what}: check after gc: {:#?}",
        report.errors
    );
    assert_eq!(report.leaked_blocks, 0, "{what}: leaks after gc");
    // And the store still works: writes that allocate, left unflushed by
    // handles that are dropped, are neither lost nor leaked.
    let d = store.create_vdi("after-crash", 8192).unwrap();
    d.write(&[1; 8192], 0).unwrap();
    drop(d);
    let old = names
        .first()
        .map(|n| (n.clone(), store.open_vdi(n).unwrap().size()));
    if let Some((name, size)) = &old {
        store
            .open_vdi(name)
            .unwrap()
            .write(&[7; 4096], size - 4096)
            .unwrap();
    }
    let report = store.check().unwrap();
    assert!(report.is_clean(), "{what}: check after dropped handles");
    assert_eq!(report.leaked_blocks, 0, "{what}: dropped handles leaked");
    drop(store);
    let store = Store::open(dev, &options).unwrap();
    let mut buf = vec![0u8; 8192];
    store
        .open_vdi("after-crash")
        .unwrap()
        .read(&mut buf, 0)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 1), "{what}: unflushed write lost");
    if let Some((name, size)) = &old {
        let d = store.open_vdi(name).unwrap();
        d.read(&mut buf[..4096], size - 4096).unwrap();
        assert!(
            buf[..4096].iter().all(|&b| b == 7),
            "{what}: unflushed write lost"
        );
    }
    let report = store.check().unwrap();
    assert_eq!(report.leaked_blocks, 0, "{what}: leaks after reopening");
    served
}

/// How many seeds a test runs: the environment variable `var` (by hand),
/// or `default` (CI).
fn seeds_from_env(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mode_for(i: u64, seed: u64) -> CrashMode {
    match i % 3 {
        0 => CrashMode::DropAll,
        1 => CrashMode::KeepRandom(seed ^ i),
        _ => CrashMode::TearOne(seed ^ i),
    }
}

fn crash_everywhere(seed: u64, len: usize, random_writes: u64) {
    crash_everywhere_in(&sequence(seed, len), seed, random_writes);
}

fn crash_everywhere_in(ops: &[Op], seed: u64, random_writes: u64) {
    crash_everywhere_with(ops, seed, random_writes, run);
}

/// [`crash_everywhere_in`], running the sequence with `run`.
fn crash_everywhere_with(
    ops: &[Op],
    seed: u64,
    random_writes: u64,
    run: fn(&Arc<CrashDevice>, &[Op]) -> Option<Runner>,
) {
    let ops = ops.to_vec();
    let dev = Arc::new(CrashDevice::new(STORE_BYTES));
    assert!(run(&dev, &ops).is_some());
    let (flushes, writes) = dev.counters();
    assert!(!dev.is_crashed());
    // Every flush point, from the store's creation on.
    for k in 0..=flushes {
        let mode = mode_for(k, seed);
        let dev = Arc::new(CrashDevice::new(STORE_BYTES));
        dev.crash_at_flush(k, mode);
        // None: the cut came while formatting; nothing was promised yet.
        let Some(runner) = run(&dev, &ops) else {
            continue;
        };
        verify_after_crash(
            dev.durable_image(),
            &runner,
            &format!("seed {seed} flush {k} {mode:?}"),
        );
    }
    // Random writes in between.
    let mut r = Rng::new(seed);
    for i in 0..random_writes {
        let w = r.next() % writes;
        let mode = mode_for(i, seed.wrapping_add(w));
        let dev = Arc::new(CrashDevice::new(STORE_BYTES));
        dev.crash_at_write(w, mode);
        let Some(runner) = run(&dev, &ops) else {
            continue;
        };
        verify_after_crash(
            dev.durable_image(),
            &runner,
            &format!("seed {seed} write {w} {mode:?}"),
        );
    }
}

/// Power cut at every flush point of the pool, with a read cache on its own
/// crash device losing power at the same moment (in the same mode): the
/// reopened store reads through what the cache device kept. The cache
/// never flushes, so its writes since it was opened are dropped, kept at
/// random or torn. Two seeds in CI; `CACHE_CRASH_SEEDS=N` runs N (by hand).
#[test]
fn power_cut_on_the_pool_and_the_read_cache() {
    let seeds = seeds_from_env("CACHE_CRASH_SEEDS", 2);
    // Reads the reopened caches served, and cuts made, over all seeds (a
    // sequence may leave nothing cacheable: no snapshot, no clone).
    let (mut served, mut cuts) = (0u64, 0u64);
    for seed in 21..21 + seeds {
        let ops = sequence(seed, 40);
        let probe = Arc::new(CrashDevice::new(STORE_BYTES));
        let cache = Arc::new(CrashDevice::new(1 << 20));
        assert!(run_with(&probe, &ops, Some(&cache)).is_some());
        let (flushes, _) = probe.counters();
        for k in 0..=flushes {
            let mode = mode_for(k, seed);
            let dev = Arc::new(CrashDevice::new(STORE_BYTES));
            let cache = Arc::new(CrashDevice::new(1 << 20));
            dev.crash_at_flush(k, mode);
            let Some(runner) = run_with(&dev, &ops, Some(&cache)) else {
                continue;
            };
            // The filler may still be writing: the cut comes now.
            cache.cut_power(mode);
            cuts += 1;
            served += verify_after_crash_with(
                dev.durable_image(),
                Some(cache.durable_image()),
                &runner,
                &format!("cached seed {seed} flush {k} {mode:?}"),
            );
        }
    }
    assert!(
        served > cuts,
        "the reopened caches served {served} reads over {cuts} cuts"
    );
}

/// Power cut at every flush point of the pool or of a write-back log in
/// front of it, both losing power at the same moment (in the same mode):
/// the store reopened through the replayed log holds everything flushed
/// (write-back disks: durable in the log; write-through disks: on the
/// pool). And the pool alone, the log given up, is a store that opens and
/// checks clean (older, never torn). Four seeds in CI;
/// `WRITE_LOG_CRASH_SEEDS=N` runs N (by hand). Mutation: destaging a batch
/// across a flush (the barrier ignored) leaves a torn pool alone.
#[test]
fn power_cut_on_the_pool_and_the_write_back_log() {
    let seeds = seeds_from_env("WRITE_LOG_CRASH_SEEDS", 4);
    let mut cuts = 0;
    for seed in 41..41 + seeds {
        let ops = sequence(seed, 40);
        let probe = Arc::new(CrashDevice::new(STORE_BYTES));
        let probe_log = Arc::new(CrashDevice::new(MIN_LOG_BYTES));
        assert!(run_with_log(&probe, &probe_log, &ops, None).is_some());
        let flushes = probe.counters().0 + probe_log.counters().0;
        for k in 0..=flushes {
            let mode = mode_for(k, seed);
            let dev = Arc::new(CrashDevice::new(STORE_BYTES));
            let log = Arc::new(CrashDevice::new(MIN_LOG_BYTES));
            let Some(runner) = run_with_log(&dev, &log, &ops, Some((k, mode))) else {
                continue;
            };
            // The destager may still be writing: the cut comes now.
            dev.cut_power(mode);
            log.cut_power(mode);
            cuts += 1;
            let what = format!("write-back seed {seed} flush {k} {mode:?}");
            verify_after_crash_through(
                dev.durable_image(),
                None,
                Some(log.durable_image()),
                &runner,
                &what,
            );
            let pool = MemDevice::from_bytes(dev.durable_image());
            Store::forget_write_log(&pool).unwrap();
            let alone = Store::open(Arc::new(pool), &OpenOptions::default())
                .unwrap_or_else(|e| panic!("{what}: the pool alone does not open: {e}"));
            let report = alone.check().unwrap();
            assert!(
                report.is_clean(),
                "{what}: the pool alone: {:#?}",
                report.errors
            );
        }
    }
    assert!(cuts > 20, "{cuts} cuts");
}

#[test]
fn power_cut_at_every_flush_point_seed_1() {
    crash_everywhere(1, 60, 40);
}

#[test]
fn power_cut_at_every_flush_point_seed_2() {
    crash_everywhere(2, 60, 40);
}

#[test]
fn power_cut_at_every_flush_point_seed_3() {
    crash_everywhere(3, 80, 40);
}

/// Power cuts in the middle of snapshot deletion, retention passes, disk
/// deletion and gc.
#[test]
fn power_cut_during_reclamation() {
    for seed in 100..106 {
        crash_everywhere_in(&deletion_sequence(seed, 70), seed, 30);
    }
}

/// Power cuts while the snapshot log is compacted: 130 snapshots, then
/// all but a few deleted one by one, so that the log is rewritten (more than
/// `2 × kept + 96` records) while cuts land at every flush point.
#[test]
fn power_cut_during_log_compaction() {
    let mut ops = vec![Op::Create { blocks: 7 }];
    for i in 0..130u32 {
        ops.push(Op::Write {
            disk: 0,
            offset: i * 4096,
            len: 4096,
            seed: i as u8,
        });
        ops.push(Op::Snapshot { disk: 0 });
    }
    ops.extend((0..125).map(|_| Op::DeleteSnapshot { disk: 0, snap: 0 }));
    crash_everywhere_in(&ops, 7, 20);
}

/// With entry journals (format 2): power cuts at every flush point of
/// journal commits, journal snapshots, checkpoints (folds before a
/// rollback, promotions) and deletions. Six seeds in CI;
/// `JOURNAL_CRASH_SEEDS=N` runs N (by hand).
#[test]
fn power_cut_at_every_flush_point_with_journals() {
    let seeds = seeds_from_env("JOURNAL_CRASH_SEEDS", 6);
    for seed in 200..200 + seeds {
        let ops = if seed % 2 == 0 {
            sequence(seed, 60)
        } else {
            deletion_sequence(seed, 60)
        };
        let run = if seed % 3 == 0 {
            run_journaled
        } else {
            run_journaled_checkpoints
        };
        crash_everywhere_with(&ops, seed, 20, run);
    }
}

/// Twelve more seeds in CI; `CRASH_SEEDS=N` runs N of them (by hand).
#[test]
fn power_cut_at_every_flush_point_many_seeds() {
    let seeds = seeds_from_env("CRASH_SEEDS", 12);
    for seed in 10..10 + seeds {
        crash_everywhere(seed, 40, 10);
    }
}

/// An I/O error (not a power cut) during a commit leaves the store usable
/// after reopening, with what was flushed before intact.
#[test]
fn eio_and_enospc_during_commit() {
    use parallax_device::Fault;
    for fault_at in 0..12 {
        for fault in [
            Fault::WriteEio {
                after_writes: fault_at,
            },
            Fault::WriteEnospc {
                after_writes: fault_at,
            },
        ] {
            let dev = Arc::new(CrashDevice::new(STORE_BYTES));
            let store = fresh_store(dev.clone());
            let d = store.create_vdi("d", 1 << 20).unwrap();
            d.write(&[1; 8192], 0).unwrap();
            d.flush().unwrap();
            d.write(&[2; 4096], 4096).unwrap();
            d.write(&[3; 4096], 65536).unwrap();
            dev.inject(fault);
            let flushed = d.flush().is_ok() && d.snapshot(Some("s")).is_ok();
            drop(d);
            drop(store);
            let reopened =
                Store::open(dev.clone() as Arc<dyn BlockDevice>, &OpenOptions::default()).unwrap();
            let report = reopened.check().unwrap();
            assert!(report.is_clean(), "{fault:?}: {:#?}", report.errors);
            let d = reopened.open_vdi("d").unwrap();
            let mut buf = vec![0u8; 4096];
            d.read(&mut buf, 0).unwrap();
            assert!(buf.iter().all(|&b| b == 1), "{fault:?}: flushed data lost");
            if flushed {
                d.read(&mut buf, 65536).unwrap();
                assert!(
                    buf.iter().all(|&b| b == 3),
                    "{fault:?}: flush reported ok but data lost"
                );
            }
        }
    }
}

/// A pipelined commit lets the disk go before its writes: reads and writes
/// go on against the adopted tree while its nodes, bitmaps and header reach
/// the device. Here a snapshot is taken, and at the first flush of its
/// commit (inside that window) every block is read back (they must read as
/// before the snapshot: its nodes are staged, not yet on the device) and
/// the disk is written: whole blocks (allocating: the snapshot shares
/// them), a partial block, a block never written before. Then a FLUSH.
/// Power is cut at each flush from the snapshot's first on, in each mode.
/// After each cut: the store opens and checks clean; the snapshot, if the
/// operation returned or if it is there, holds exactly what was written
/// before it; every block of the disk holds what was flushed before the
/// snapshot or what was written in the window; and if the FLUSH returned,
/// exactly what was written.
#[test]
fn power_cut_inside_the_pipelined_commit_window() {
    const BLOCKS: usize = 40;
    let before: Vec<u8> = (0..BLOCKS * 4096).map(|i| (i / 4096) as u8 + 1).collect();
    let mut after = before.clone();
    let window: Vec<(usize, Vec<u8>)> = vec![
        (0, vec![0xb0; 4 * 4096]),          // whole blocks 0..4
        (10 * 4096, vec![0xb1; 4096]),      // one whole block
        (20 * 4096 + 100, vec![0xb2; 300]), // part of block 20
        (39 * 4096, vec![0xb3; 4096]),      // the last block
    ];
    for (off, data) in &window {
        after[*off..off + data.len()].copy_from_slice(data);
    }
    let mut cuts = 0;
    for k in 0..6u64 {
        for m in 0..3u64 {
            let mode = mode_for(m, k);
            let dev = Arc::new(CrashDevice::new(STORE_BYTES));
            let store = fresh_store(dev.clone());
            let d = store.create_vdi("d", (BLOCKS * 4096) as u64).unwrap();
            d.write(&before[..(BLOCKS - 1) * 4096], 0).unwrap();
            d.flush().unwrap();
            let (first, _) = dev.counters();
            let (handle, expect, writes) = (d.clone(), before.clone(), window.clone());
            let acted = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let acted2 = acted.clone();
            dev.on_flush(Some(Box::new(move |n| {
                if n != first {
                    return;
                }
                acted2.store(true, std::sync::atomic::Ordering::SeqCst);
                let mut buf = vec![0u8; expect.len()];
                handle.read(&mut buf, 0).unwrap();
                let mut want = expect.clone();
                want[(BLOCKS - 1) * 4096..].fill(0);
                assert!(buf == want, "a read inside the window saw something else");
                for (off, data) in &writes {
                    handle.write(data, *off as u64).unwrap();
                }
            })));
            dev.crash_at_flush(first + k, mode);
            let snapped = d.snapshot(Some("s")).is_ok();
            let flushed = snapped && d.flush().is_ok();
            dev.on_flush(None);
            assert!(
                acted.load(std::sync::atomic::Ordering::SeqCst),
                "the hook never ran"
            );
            assert!(dev.is_crashed() || k >= 4, "k {k}: no cut");
            cuts += u64::from(dev.is_crashed());
            let what = format!("cut at flush {k} of the window, {mode:?}");
            drop(d);
            drop(store);
            let dev = Arc::new(MemDevice::from_bytes(dev.durable_image()));
            let store = Store::open(dev, &OpenOptions::default())
                .unwrap_or_else(|e| panic!("{what}: the store does not open: {e}"));
            let report = store.check().unwrap();
            assert!(report.is_clean(), "{what}: check: {:#?}", report.errors);
            let d = store.open_vdi("d").unwrap();
            let mut snap_before = before.clone();
            snap_before[(BLOCKS - 1) * 4096..].fill(0);
            match store.open_snapshot("d", "s") {
                Ok(view) => {
                    let mut buf = vec![0u8; before.len()];
                    view.read(&mut buf, 0).unwrap();
                    assert!(buf == snap_before, "{what}: the snapshot changed");
                }
                Err(e) => assert!(!snapped, "{what}: a snapshot that returned is gone: {e}"),
            }
            let mut buf = vec![0u8; before.len()];
            d.read(&mut buf, 0).unwrap();
            if flushed {
                assert!(buf == after, "{what}: a FLUSH returned but lost writes");
            }
            for (i, got) in buf.chunks(4096).enumerate() {
                let old = &snap_before[i * 4096..(i + 1) * 4096];
                let new = &after[i * 4096..(i + 1) * 4096];
                assert!(
                    got == old || got == new,
                    "{what}: block {i} is neither flushed nor written content"
                );
            }
        }
    }
    assert!(cuts >= 12, "only {cuts} cuts landed in the window");
}

/// A pipelined commit whose node or bitmap writes fail stays adopted and
/// staged: the operation reports the error, the disk keeps serving what it
/// adopted, and the next commit writes the staged one first, so that after
/// it (and a reopen) everything is there, the snapshot included.
#[test]
fn a_failed_pipelined_commit_is_written_by_the_next() {
    use parallax_device::Fault;
    // The snapshot's commit writes its nodes (one run), then a bitmap, then
    // the header: the first two fail before the header (a failing header
    // write poisons the disk instead, as before).
    for after_writes in 0..2 {
        let dev = Arc::new(CrashDevice::new(STORE_BYTES));
        let store = fresh_store(dev.clone());
        let d = store.create_vdi("d", 1 << 20).unwrap();
        d.write(&[1; 65536], 0).unwrap();
        d.flush().unwrap();
        d.write(&[2; 8192], 4096).unwrap();
        dev.inject(Fault::WriteEio { after_writes });
        let failed = d.snapshot(Some("s"));
        assert!(failed.is_err(), "after {after_writes} writes: {failed:?}");
        // Adopted: the snapshot is listed, the disk reads as written.
        assert!(d.snapshot_info("s").is_ok());
        let mut buf = vec![0u8; 8192];
        d.read(&mut buf, 4096).unwrap();
        assert_eq!(buf, vec![2; 8192]);
        d.write(&[3; 4096], 32768).unwrap();
        d.flush().unwrap();
        drop(d);
        drop(store);
        let store = Store::open(dev as Arc<dyn BlockDevice>, &OpenOptions::default()).unwrap();
        let report = store.check().unwrap();
        assert!(report.is_clean(), "{:#?}", report.errors);
        let mut want = vec![1u8; 65536];
        want[4096..12288].fill(2);
        let mut buf = vec![0u8; 65536];
        store
            .open_snapshot("d", "s")
            .unwrap()
            .read(&mut buf, 0)
            .unwrap();
        assert!(buf == want, "after {after_writes} writes: the snapshot");
        want[32768..36864].fill(3);
        store.open_vdi("d").unwrap().read(&mut buf, 0).unwrap();
        assert!(buf == want, "after {after_writes} writes: the disk");
    }
}
