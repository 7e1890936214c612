//! The write-back log under the engine: what a FLUSH promises under each
//! policy while the log logs, with the destage held back.

mod common;

use common::gate::{Gate, OpenOnDrop};
use parallax_device::{BlockDevice, MemDevice};
use parallax_engine::{CachePolicy, CreateOptions, OpenOptions, Store, WriteLog, MIN_LOG_BYTES};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// The disk `name`'s first block on the pool alone (the log given up).
fn on_pool_alone(pool: &Gate, name: &str) -> Vec<u8> {
    let copy = Arc::new(MemDevice::from_bytes(pool.inner.to_bytes()));
    Store::forget_write_log(&*copy).unwrap();
    let store = Store::open(copy, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    store.open_vdi(name).unwrap().read(&mut buf, 0).unwrap();
    buf
}

/// A new store on `pool`, opened through a write-back log on `log_dev`.
fn store_with_log(pool: &Arc<Gate>, log_dev: Arc<dyn BlockDevice>) -> (Store, Arc<WriteLog>) {
    drop(Store::create(pool.clone(), &CreateOptions::default()).unwrap());
    let id = Store::peek_id(&**pool).unwrap();
    let (log, _) = WriteLog::open(log_dev, pool.clone(), id, 0, 1).unwrap();
    let log = Arc::new(log);
    let options = OpenOptions {
        write_log: Some(log.clone()),
        ..OpenOptions::default()
    };
    (Store::open(log.clone(), &options).unwrap(), log)
}

#[test]
fn a_write_back_flush_is_durable_in_the_log_and_a_write_through_flush_on_the_pool() {
    let pool = Gate::new(64 << 20);
    let (store, log) = store_with_log(&pool, Arc::new(MemDevice::new(MIN_LOG_BYTES)));
    // Dropped before the store (declared after it).
    let _open = OpenOnDrop(pool.clone());
    let wb = store.create_vdi("wb", 1 << 20).unwrap();
    let wt = store.create_vdi("wt", 1 << 20).unwrap();
    assert!(!log.is_logging(), "logging with no write-back disk");
    wb.set_cache_policy(CachePolicy::WriteBack).unwrap();
    store.refresh_write_back().unwrap();
    assert!(log.is_logging());
    assert_eq!(
        Store::peek_write_log(&*pool).unwrap().map(|(i, _)| i),
        Some(log.id()),
        "the pool does not name the log before it logs"
    );

    // The destage stalls: a write-back FLUSH returns all the same, and
    // its write is not on the pool.
    pool.closed.store(true, Ordering::SeqCst);
    wb.write(&[0xaa; 4096], 0).unwrap();
    wb.flush().unwrap();
    let mut buf = vec![0u8; 4096];
    wb.read(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![0xaa; 4096]);
    assert_ne!(on_pool_alone(&pool, "wb"), vec![0xaa; 4096]);

    // A write-through FLUSH waits until the pool has it.
    wt.write(&[0xbb; 4096], 0).unwrap();
    let (tx, rx) = mpsc::channel();
    let flusher = {
        let wt = wt.clone();
        std::thread::spawn(move || tx.send(wt.flush().is_ok()).unwrap())
    };
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a write-through flush returned while the destage was stalled"
    );
    pool.closed.store(false, Ordering::SeqCst);
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
    flusher.join().unwrap();
    assert_eq!(on_pool_alone(&pool, "wt"), vec![0xbb; 4096]);
    // Everything logged before it is there too.
    assert_eq!(on_pool_alone(&pool, "wb"), vec![0xaa; 4096]);

    // No write-back disk open: the log drains and goes direct; a clean
    // stop leaves a pool that names no log.
    drop((wb, wt));
    store.close_vdi("wb").unwrap();
    store.refresh_write_back().unwrap();
    drop(store);
    assert!(!log.is_logging());
    assert_eq!(Store::peek_write_log(&*pool).unwrap(), None);
}

/// A WRITE carried by file descriptor into the write-back log (the
/// daemon's io_uring path): the disk reads as before until the plan
/// finishes (its records counted, then its blocks joined), as written
/// after; a plan whose transfers failed leaves the disk as it was and the
/// log going on.
#[test]
fn a_write_carried_into_the_log_by_descriptor_counts_when_its_plan_finishes() {
    use parallax_device::{AlignedBuf, FileDevice};
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    drop(FileDevice::create(&path, MIN_LOG_BYTES, Default::default()).unwrap());
    let pool = Gate::new(64 << 20);
    let log_dev = Arc::new(FileDevice::open(&path, Default::default()).unwrap());
    let (store, log) = store_with_log(&pool, log_dev);
    let _open = OpenOnDrop(pool.clone());
    let wb = store.create_vdi("wb", 1 << 20).unwrap();
    wb.set_cache_policy(CachePolicy::WriteBack).unwrap();
    store.refresh_write_back().unwrap();
    assert!(log.is_logging());
    // Blocks 0 and 1 owned (written in place by the plan), block 2 new.
    wb.write(&[1; 8192], 0).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let carry = |plan: &mut parallax_engine::IoPlan, data: &[u8], write: bool| {
        let transfers = plan
            .fd_write_transfers(data, &mut AlignedBuf::zeroed)
            .expect("carried by descriptor");
        let records = plan.take_log_records().expect("into the log, not the pool");
        if write {
            for t in &transfers {
                file.write_all_at(&records[t.buf.clone()], t.offset)
                    .unwrap();
            }
        }
        records
    };
    let read = |len: usize| {
        let mut buf = vec![0u8; len];
        wb.read(&mut buf, 0).unwrap();
        buf
    };
    let before = read(5 * 4096);
    let data: Vec<u8> = [[0xaa; 4096], [0xbb; 4096], [0xcc; 4096]].concat();
    let mut plan = wb.try_plan_write(0, data.len()).unwrap().expect("a plan");
    let records = carry(&mut plan, &data, true);
    assert_eq!(read(5 * 4096), before, "read before its plan finished");
    plan.finish_written(true, &records);
    let mut after = data.clone();
    after.extend([0; 2 * 4096]);
    assert_eq!(read(5 * 4096), after);

    // Transfers that failed (here: never ran): the disk keeps block 4 a
    // hole, the records are written again, the log goes on.
    let mut plan = wb.try_plan_write(4 * 4096, 4096).unwrap().expect("a plan");
    let records = carry(&mut plan, &[0xdd; 4096], false);
    plan.finish_written(false, &records);
    assert_eq!(read(5 * 4096), after);
    wb.write(&[0xee; 4096], 3 * 4096).unwrap();
    wb.flush().unwrap();
    after[3 * 4096..4 * 4096].fill(0xee);
    assert_eq!(read(5 * 4096), after);
    assert!(log.stats().failed.is_none(), "{:?}", log.stats().failed);
    drop(wb);
    drop(store);
    assert_eq!(on_pool_alone(&pool, "wb")[..4096], [0xaa; 4096]);
}
