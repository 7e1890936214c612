//! Model-based property test: random sequences of every operation over
//! several disks, run against the store and against a plain in-memory
//! model, comparing every byte of every disk and snapshot after each
//! sequence and after every reopen; `check` must be clean throughout and
//! `gc` must leave nothing leaked.

mod common;

use common::{Op, Runner};
use parallax_device::{BlockDevice, MemDevice};
use parallax_engine::{CreateOptions, OpenOptions, ReadCache, Store, WriteLog, MIN_LOG_BYTES};
use proptest::prelude::*;
use std::sync::Arc;

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => any::<u8>().prop_map(|blocks| Op::Create { blocks }),
        12 => (any::<u8>(), any::<u32>(), any::<u16>(), any::<u8>())
            .prop_map(|(disk, offset, len, seed)| Op::Write { disk, offset, len, seed }),
        2 => (any::<u8>(), any::<u32>(), any::<u32>())
            .prop_map(|(disk, offset, len)| Op::Discard { disk, offset, len }),
        2 => (any::<u8>(), any::<u32>(), any::<u32>())
            .prop_map(|(disk, offset, len)| Op::WriteZeroes { disk, offset, len }),
        3 => any::<u8>().prop_map(|disk| Op::Flush { disk }),
        3 => any::<u8>().prop_map(|disk| Op::Snapshot { disk }),
        2 => (any::<u8>(), any::<bool>())
            .prop_map(|(disk, then_durable)| Op::SnapshotDeferred { disk, then_durable }),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(disk, snap)| Op::Clone { disk, snap }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(disk, snap)| Op::Rollback { disk, snap }),
        3 => (any::<u8>(), any::<u8>()).prop_map(|(disk, snap)| Op::DeleteSnapshot { disk, snap }),
        1 => any::<u8>().prop_map(|disk| Op::DeleteDisk { disk }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(disk, blocks)| Op::Grow { disk, blocks }),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(disk, keep)| Op::ScheduleTick { disk, keep }),
        1 => Just(Op::Gc),
        1 => Just(Op::Reopen),
        1 => Just(Op::DropHandles),
        1 => Just(Op::Settle),
        1 => Just(Op::DropStore),
    ]
}

fn run(ops: &[Op]) -> Runner {
    run_with(ops, None)
}

/// [`run`] with a read cache of `cache_bytes` in front of the pool: one
/// cache device for the whole sequence, opened again (from what is on it)
/// at every reopen, so copies outlive the snapshots and disks they were
/// read through, and ids that a lost commit gives out again.
fn run_with(ops: &[Op], cache_bytes: Option<u64>) -> Runner {
    run_with_cache(ops, cache_bytes, false)
}

/// [`run_with`], with entry journals on (`journal`).
fn run_with_cache(ops: &[Op], cache_bytes: Option<u64>, journal: bool) -> Runner {
    let dev = new_pool_with(journal);
    let cache_dev: Option<Arc<dyn BlockDevice>> =
        cache_bytes.map(|len| Arc::new(MemDevice::new(len)) as Arc<dyn BlockDevice>);
    let options = || OpenOptions {
        read_cache: cache_dev.as_ref().map(|c| {
            let id = Store::peek_id(&*dev).unwrap();
            Arc::new(ReadCache::open(c.clone(), id).unwrap())
        }),
        ..OpenOptions::default()
    };
    let mut reopen = || Store::open(dev.clone(), &options()).unwrap();
    run_opened(ops, Runner::new(reopen()), &mut reopen)
}

/// [`run`] with entry journals on (format 2): writes between checkpoints
/// are journal records, snapshots positions in the journal.
fn run_journaled(ops: &[Op]) -> Runner {
    run_journaled_with(ops, 65536)
}

/// [`run_journaled`] with a checkpoint whenever a disk's journal holds
/// `checkpoint` records.
fn run_journaled_with(ops: &[Op], checkpoint: u64) -> Runner {
    let dev = new_pool_with(true);
    let mut reopen = || {
        let store = Store::open(dev.clone(), &OpenOptions::default()).unwrap();
        store.set_journal_checkpoint(checkpoint);
        store
    };
    run_opened(ops, Runner::new(reopen()), &mut reopen)
}

/// [`new_pool`], with entry journals turned on (`journal`).
fn new_pool_with(journal: bool) -> Arc<MemDevice> {
    let dev = new_pool();
    if journal {
        Store::open(dev.clone(), &OpenOptions::default())
            .unwrap()
            .enable_journal()
            .unwrap();
    }
    dev
}

/// A new pool (the store on it closed).
fn new_pool() -> Arc<MemDevice> {
    let dev = Arc::new(MemDevice::new(64 << 20));
    Store::create(
        dev.clone(),
        &CreateOptions {
            extent_data_blocks: 128,
            host_id: 1,
        },
    )
    .unwrap();
    dev
}

/// [`run`] through a write-back log in front of the pool: disks with an
/// odd number are write-back, the others write-through (whose flushes
/// wait for the destage), and every reopen lets the store go as a killed
/// process would, so the log's records come back by replay.
/// Returns the runner and the records replayed over all reopens.
fn run_with_log(ops: &[Op]) -> (Runner, u64) {
    run_with_log_journaled(ops, false)
}

/// [`run_with_log`], with entry journals on (`journal`).
fn run_with_log_journaled(ops: &[Op], journal: bool) -> (Runner, u64) {
    let dev = new_pool_with(journal);
    let log_dev = Arc::new(MemDevice::new(MIN_LOG_BYTES));
    let replayed = std::cell::Cell::new(0);
    let mut reopen = || {
        let id = Store::peek_id(&*dev).unwrap();
        let named = Store::peek_write_log(&*dev)
            .unwrap()
            .map_or(0, |(id, _)| id);
        let (log, _) = WriteLog::open(log_dev.clone(), dev.clone(), id, named, 1).unwrap();
        let log = Arc::new(log);
        replayed.set(replayed.get() + log.stats().replayed);
        let options = OpenOptions {
            write_log: Some(log.clone()),
            ..OpenOptions::default()
        };
        Store::open(log, &options).unwrap()
    };
    let mut runner = Runner::new(reopen());
    runner.write_back_odd = true;
    runner.abandon_on_reopen = true;
    let runner = run_opened(ops, runner, &mut reopen);
    (runner, replayed.get())
}

fn run_opened(ops: &[Op], mut runner: Runner, reopen: &mut dyn FnMut() -> Store) -> Runner {
    let mut reopen = reopen;
    runner
        .apply(&Op::Create { blocks: 20 }, &mut reopen)
        .unwrap();
    for op in ops {
        runner.apply(op, &mut reopen).unwrap();
        if matches!(op, Op::Reopen) {
            runner.verify_exact();
            let report = runner.store.check().unwrap();
            assert!(report.is_clean(), "after reopen: {:#?}", report.errors);
            assert_eq!(report.leaked_blocks, 0, "leaked before {op:?}");
        }
    }
    runner.verify_exact();
    runner.store.flush_all().unwrap();
    let report = runner.store.check().unwrap();
    assert!(report.is_clean(), "{:#?}", report.errors);
    // Deletions, rollbacks and overwrites return every block they free:
    // without a crash, nothing is left for gc.
    assert_eq!(report.leaked_blocks, 0, "blocks leaked without a crash");
    // Space figures from neighbour walks equal a brute-force scan.
    let scan = runner.store.space_scan().unwrap();
    for expected in &scan {
        let got = runner.store.space(&expected.name).unwrap();
        assert_eq!(&got, expected, "space of {}", expected.name);
    }
    runner.store.gc().unwrap();
    let report = runner.store.check().unwrap();
    assert!(report.is_clean(), "after gc: {:#?}", report.errors);
    assert_eq!(report.leaked_blocks, 0, "gc left leaks");
    runner.apply(&Op::Reopen, &mut reopen).unwrap();
    runner.verify_exact();
    runner
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::proptest_cases(256), ..ProptestConfig::default() })]
    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op_strategy(), 1..120)) {
        run(&ops);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::proptest_cases(256), ..ProptestConfig::default() })]
    /// The same with entry journals (see [`run_journaled`]).
    #[test]
    fn store_matches_model_with_journals(ops in proptest::collection::vec(op_strategy(), 1..120)) {
        run_journaled(&ops);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::proptest_cases(128), ..ProptestConfig::default() })]
    /// The same with a checkpoint every few records: journals folded into
    /// nodes all along, with snapshots or without.
    #[test]
    fn store_matches_model_with_journals_and_frequent_checkpoints(ops in proptest::collection::vec(op_strategy(), 1..120)) {
        run_journaled_with(&ops, 3);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::proptest_cases(64), ..ProptestConfig::default() })]
    /// The same, every read going through a small read cache (a few
    /// hundred slots: copies are evicted and slots refilled all along).
    #[test]
    fn store_matches_model_through_a_read_cache(ops in proptest::collection::vec(op_strategy(), 1..120)) {
        run_with(&ops, Some(1 << 20));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::proptest_cases(32), ..ProptestConfig::default() })]
    /// The same with entry journals: a live disk caches the sealed records'
    /// blocks and its shared base's under its parent snapshot.
    #[test]
    fn store_matches_model_through_a_read_cache_with_journals(ops in proptest::collection::vec(op_strategy(), 1..120)) {
        run_with_cache(&ops, Some(1 << 20), true);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::proptest_cases(64), ..ProptestConfig::default() })]
    /// The same through a write-back log (see [`run_with_log`]).
    #[test]
    fn store_matches_model_through_a_write_back_log(ops in proptest::collection::vec(op_strategy(), 1..120)) {
        run_with_log(&ops);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::proptest_cases(32), ..ProptestConfig::default() })]
    /// The same with entry journals: journal blocks are logged and
    /// replayed like any other block.
    #[test]
    fn store_matches_model_through_a_write_back_log_with_journals(ops in proptest::collection::vec(op_strategy(), 1..120)) {
        run_with_log_journaled(&ops, true);
    }
}

/// Thousands of operations through a write-back log, which logged and
/// replayed along the way (the model above compared what came back).
#[test]
fn thousands_of_operations_through_a_write_back_log() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let ops = proptest::collection::vec(op_strategy(), 3000)
        .new_tree(&mut runner)
        .unwrap()
        .current();
    let (runner, replayed) = run_with_log(&ops);
    assert!(runner.store.write_log_stats().expect("a log").logging);
    assert!(replayed > 100, "{replayed} records replayed");
}

/// Thousands of operations through a read cache: it serves many reads
/// (so the model above compared copies, not only pool reads).
#[test]
fn thousands_of_operations_through_a_read_cache() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let ops = proptest::collection::vec(op_strategy(), 3000)
        .new_tree(&mut runner)
        .unwrap()
        .current();
    let runner = run_with(&ops, Some(2 << 20));
    let stats = runner.store.read_cache_stats().expect("a cache");
    assert!(stats.hits > 100, "{stats:?}");
}

/// A long fixed-seed sequence: thousands of operations, `check` clean at
/// the end.
#[test]
fn thousands_of_operations() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let ops = proptest::collection::vec(op_strategy(), 3000)
        .new_tree(&mut runner)
        .unwrap()
        .current();
    let runner = run(&ops);
    // The planned (io_uring) path ran, reads and writes, on this device.
    assert!(
        runner.planned_writes > 100,
        "{} planned writes",
        runner.planned_writes
    );
    assert!(
        runner.planned_reads > 100,
        "{} planned reads",
        runner.planned_reads
    );
}

#[test]
fn regression_rollback_then_zero_then_snapshots() {
    run(&[
        Op::Create { blocks: 0 },
        Op::Write {
            disk: 2,
            offset: 0,
            len: 1,
            seed: 0,
        },
        Op::Snapshot { disk: 152 },
        Op::Rollback { disk: 90, snap: 0 },
        Op::WriteZeroes {
            disk: 0,
            offset: 7057408,
            len: 9091866,
        },
        Op::Snapshot { disk: 66 },
        Op::Snapshot { disk: 222 },
        Op::Reopen,
    ]);
}

/// Deleting a clone that has clones of its own, then its origin: the
/// origin's snapshot blocks are still reachable through the grandchild and
/// must not be freed (CI found this one).
#[test]
fn regression_delete_middle_clone_then_origin() {
    run(&[
        Op::Write {
            disk: 0,
            offset: 0,
            len: 1,
            seed: 0,
        },
        Op::Snapshot { disk: 0 },
        Op::Clone { disk: 0, snap: 0 },
        Op::Snapshot { disk: 1 },
        Op::Clone { disk: 1, snap: 0 },
        Op::DeleteDisk { disk: 1 },
        Op::DeleteDisk { disk: 0 },
    ]);
}

/// With journals: a clone's first snapshot's delta is against its origin,
/// a journal snapshot (records and journal blocks of the origin's disk).
#[test]
fn regression_journal_clones_then_tick_then_delete() {
    run_journaled(&[
        Op::Snapshot { disk: 0 },
        Op::Clone { disk: 0, snap: 0 },
        Op::Clone { disk: 104, snap: 0 },
        Op::Write {
            disk: 0,
            offset: 0,
            len: 0,
            seed: 0,
        },
        Op::DeleteDisk { disk: 7 },
        Op::Write {
            disk: 43,
            offset: 0,
            len: 1,
            seed: 0,
        },
        Op::Write {
            disk: 0,
            offset: 0,
            len: 0,
            seed: 0,
        },
        Op::Snapshot { disk: 31 },
        Op::Clone { disk: 19, snap: 0 },
        Op::ScheduleTick { disk: 29, keep: 0 },
        Op::Snapshot { disk: 137 },
        Op::Create { blocks: 0 },
        Op::DeleteSnapshot {
            disk: 62,
            snap: 224,
        },
    ]);
}

/// With journals: a rollback, its snapshot deleted (its blocks promoted
/// in the live tree), a snapshot sharing the base, a partial write over a
/// promoted block, that snapshot deleted, then the disk: the base entry the
/// journal replaced was freed with the snapshot and must not be freed again
/// with the disk.
#[test]
fn regression_journal_rollback_deletions_then_delete_disk() {
    run_journaled(&[
        Op::Create { blocks: 0 },
        Op::Create { blocks: 0 },
        Op::Create { blocks: 72 },
        Op::Write {
            disk: 51,
            offset: 0,
            len: 0,
            seed: 48,
        },
        Op::Snapshot { disk: 107 },
        Op::DeleteDisk { disk: 36 },
        Op::DeleteDisk { disk: 0 },
        Op::Create { blocks: 0 },
        Op::Rollback { disk: 82, snap: 0 },
        Op::DeleteDisk { disk: 137 },
        Op::DeleteSnapshot { disk: 31, snap: 0 },
        Op::Snapshot { disk: 73 },
        Op::Write {
            disk: 29,
            offset: 0,
            len: 1,
            seed: 0,
        },
        Op::DeleteSnapshot { disk: 103, snap: 0 },
        Op::DeleteDisk { disk: 91 },
    ]);
}
