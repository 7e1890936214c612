//! Snapshots at scale, on a real store file (`fdatasync` included):
//!
//! 1. one disk (1 GiB, 64 MiB written) snapshotted N times while idle:
//!    time to take, list, open (reopen the store and the disk: the whole
//!    snapshot log is read) and read through a snapshot, measured at 1,
//!    1,000, ... N snapshots;
//! 2. another disk snapshotted D times with one random 4 KiB write before
//!    each, then all D snapshots deleted oldest first in batches of 100
//!    (as retention does): time taken and space returned, `check` after;
//! 3. `gc` over that store (its cost there is the snapshots' roots), then
//!    over a fresh store holding one disk with GC_GIB GiB written: time per
//!    TiB of referenced data.
//!
//! ```text
//! cargo run --release -p parallax-engine --example snapshot_scale -- \
//!     PATH [SNAPSHOTS [DELETES [GC_GIB]]]     (defaults: 1000000 100000 8)
//! ```
//!
//! PATH is created (sparse, 64 GiB) and removed at the end. On a file
//! system where `fdatasync` costs a device flush, 1,000,000 snapshots take
//! as many commits; a tmpfs path measures the engine without the disk.

use parallax_device::{FileDevice, OpenMode, SplitMix as Rng};
use parallax_engine::{CreateOptions, OpenOptions, ReadDisk, Store, Vdi};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn open(path: &Path) -> Store {
    let dev = FileDevice::open(path, OpenMode::default()).expect("open store file");
    Store::open(Arc::new(dev), &OpenOptions::default()).expect("open store")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Reads 64 random 4 KiB blocks of `disk@snap`; returns the time per read.
fn read_through(store: &Store, disk: &str, snap: &str, rng: &mut Rng) -> Duration {
    let view = store.open_snapshot(disk, snap).expect("open snapshot");
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    for _ in 0..64 {
        let block = rng.next_u64() % (64 * MIB / 4096);
        view.read(&mut buf, block * 4096).expect("read");
    }
    t.elapsed() / 64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: snapshot_scale PATH [SNAPSHOTS [DELETES [GC_GIB]]]");
        std::process::exit(2);
    };
    let path = Path::new(path);
    let snapshots: u64 = args
        .get(2)
        .map_or(1_000_000, |s| s.parse().expect("SNAPSHOTS"));
    let deletes: u64 = args.get(3).map_or(100_000, |s| s.parse().expect("DELETES"));
    let gc_gib: u64 = args.get(4).map_or(8, |s| s.parse().expect("GC_GIB"));
    let _ = std::fs::remove_file(path);
    let dev = FileDevice::create(path, 64 * GIB, OpenMode::default()).expect("create store file");
    let store = Store::create(Arc::new(dev), &CreateOptions::default()).expect("create store");
    let mut rng = Rng(7);

    println!("## 1. one idle disk, {snapshots} snapshots");
    let disk = store.create_vdi("idle", GIB).expect("create");
    let data = vec![0x5au8; MIB as usize];
    for i in 0..64 {
        disk.write(&data, i * MIB).expect("write");
    }
    disk.flush().expect("flush");
    let mut checkpoints: Vec<u64> = vec![1];
    let mut c = 1000;
    while c < snapshots {
        checkpoints.push(c);
        c *= 10;
    }
    checkpoints.push(snapshots);
    println!("| snapshots | take (ms, mean of last 100) | list (ms) | used/referenced of all (ms) | open store+disk (ms) | read 4 KiB via oldest / newest (µs) | store used (MiB) |");
    println!("|---|---|---|---|---|---|---|");
    let mut store = store;
    let mut disk: Vdi = disk;
    let mut taken = 0u64;
    let mut window = Vec::new();
    for &target in &checkpoints {
        while taken < target {
            let t = Instant::now();
            disk.snapshot(None).expect("snapshot");
            window.push(t.elapsed());
            if window.len() > 100 {
                window.remove(0);
            }
            taken += 1;
        }
        let take = window.iter().sum::<Duration>() / window.len() as u32;
        let t = Instant::now();
        let list = disk.snapshots();
        let list_time = t.elapsed();
        assert_eq!(list.len() as u64, taken);
        let t = Instant::now();
        let space = store.space("idle").expect("space");
        let space_time = t.elapsed();
        assert_eq!(space.snapshots.len() as u64, taken);
        drop(space);
        let (oldest, newest) = (list[0].name.clone(), list[list.len() - 1].name.clone());
        drop(list);
        store.flush_all().expect("flush");
        drop(disk);
        drop(store);
        let t = Instant::now();
        store = open(path);
        disk = store.open_vdi("idle").expect("open disk");
        let open_time = t.elapsed();
        let r_old = read_through(&store, "idle", &oldest, &mut rng);
        let r_new = read_through(&store, "idle", &newest, &mut rng);
        println!(
            "| {taken} | {:.3} | {:.1} | {:.1} | {:.1} | {:.1} / {:.1} | {} |",
            ms(take),
            ms(list_time),
            ms(space_time),
            ms(open_time),
            r_old.as_secs_f64() * 1e6,
            r_new.as_secs_f64() * 1e6,
            store.stats().used_bytes / MIB
        );
    }

    println!();
    println!("## 2. {deletes} snapshots, one random 4 KiB write before each, then all deleted");
    let busy = store.create_vdi("busy", GIB).expect("create");
    for i in 0..64 {
        busy.write(&data, i * MIB).expect("write");
    }
    busy.flush().expect("flush");
    let block = vec![0xa5u8; 4096];
    let t = Instant::now();
    for _ in 0..deletes {
        let b = rng.next_u64() % (64 * MIB / 4096);
        busy.write(&block, b * 4096).expect("write");
        busy.snapshot(None).expect("snapshot");
    }
    let take_time = t.elapsed();
    busy.flush().expect("flush");
    store.flush_all().expect("flush");
    let used_before = store.stats().used_bytes;
    let t = Instant::now();
    let space = store.space("busy").expect("space");
    println!(
        "- used/referenced of the disk and its {} snapshots: {:.0} ms; used {} MiB, referenced {} MiB",
        space.snapshots.len(),
        ms(t.elapsed()),
        space.used_bytes / MIB,
        space.referenced_bytes / MIB
    );
    let ids: Vec<u64> = busy.snapshots().iter().map(|s| s.id).collect();
    let t = Instant::now();
    let mut freed = 0;
    for batch in ids.chunks(100) {
        freed += busy
            .delete_snapshot_ids(batch)
            .expect("delete")
            .freed_blocks;
    }
    let delete_time = t.elapsed();
    store.flush_all().expect("flush");
    let used_after = store.stats().used_bytes;
    println!(
        "- taking {deletes} snapshots with a write before each: {:.1} s ({:.3} ms each)",
        take_time.as_secs_f64(),
        ms(take_time) / deletes as f64
    );
    println!(
        "- deleting them, oldest first, 100 per call: {:.1} s ({:.3} ms per snapshot), {freed} blocks returned ({} MiB); store used {} -> {} MiB",
        delete_time.as_secs_f64(),
        ms(delete_time) / deletes as f64,
        freed * 4096 / MIB,
        used_before / MIB,
        used_after / MIB
    );
    let t = Instant::now();
    let report = store.check().expect("check");
    println!(
        "- check: clean {}, {} leaked blocks ({:.1} s)",
        report.is_clean(),
        report.leaked_blocks,
        t.elapsed().as_secs_f64()
    );

    println!();
    println!("## 3. gc");
    let referenced = (report.data_blocks + report.tree_nodes) * 4096;
    let t = Instant::now();
    let gc = store.gc().expect("gc");
    let gc_time = t.elapsed();
    println!(
        "- gc over {} MiB referenced ({} data blocks, {} nodes): {:.2} s, {} blocks freed; {:.1} s per TiB referenced",
        referenced / MIB,
        report.data_blocks,
        report.tree_nodes,
        gc_time.as_secs_f64(),
        gc.freed_blocks,
        gc_time.as_secs_f64() * (1u64 << 40) as f64 / referenced.max(1) as f64
    );
    drop(disk);
    drop(busy);
    drop(store);
    let _ = std::fs::remove_file(path);

    let dev = FileDevice::create(path, 64 * GIB, OpenMode::default()).expect("create store file");
    let store = Store::create(Arc::new(dev), &CreateOptions::default()).expect("create store");
    let big = store.create_vdi("big", gc_gib * GIB).expect("create");
    let chunk = vec![0x3cu8; 4 * MIB as usize];
    let t = Instant::now();
    for i in 0..gc_gib * GIB / (4 * MIB) {
        big.write(&chunk, i * 4 * MIB).expect("write");
    }
    big.flush().expect("flush");
    let fill = t.elapsed();
    let t = Instant::now();
    let gc = store.gc().expect("gc");
    let gc_time = t.elapsed();
    let referenced = store.stats().used_bytes;
    println!(
        "- gc over one disk with {gc_gib} GiB written ({} MiB referenced, filled in {:.1} s): {:.2} s, {} blocks freed; {:.0} s per TiB referenced",
        referenced / MIB,
        fill.as_secs_f64(),
        gc_time.as_secs_f64(),
        gc.freed_blocks,
        gc_time.as_secs_f64() * (1u64 << 40) as f64 / referenced as f64
    );
    drop(big);
    drop(store);
    let _ = std::fs::remove_file(path);
}
