//! Engine hot paths on an in-memory device, through the public API only:
//! tree lookups (4 KiB reads), the write path (in place and allocating),
//! flush, snapshot and clone. Run with
//! `cargo bench -p parallax-engine --bench engine`.
//!
//! Every store lives on a `MemDevice`, so the figures are the engine's own
//! cost (locks, tree walks, node cache, encoding, crc) plus a memcpy per
//! block, with no device latency at all.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use parallax_device::MemDevice;
use parallax_engine::{CreateOptions, OpenOptions, Store, Vdi};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;
const BLOCK_U64: u64 = BLOCK as u64;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Entries per tree node (parallax_format::FAN_OUT).
const FAN: u64 = 504;
/// Length of the precomputed lists of random blocks (a power of two).
const RANDOM_BLOCKS: usize = 1 << 14;
/// Clones stacked for the deep-clone read.
const CLONE_DEPTH: usize = 100;

/// A deterministic pseudo-random sequence (xorshift64*).
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// `n` random block numbers below `blocks` for which `keep` holds.
fn random_blocks(seed: u64, blocks: u64, keep: impl Fn(u64) -> bool) -> Vec<u64> {
    let mut next = rng(seed);
    std::iter::repeat_with(|| next() % blocks)
        .filter(|&v| keep(v))
        .take(RANDOM_BLOCKS)
        .collect()
}

fn new_store(device_bytes: u64) -> Store {
    Store::create(
        Arc::new(MemDevice::new(device_bytes)),
        &CreateOptions::default(),
    )
    .unwrap()
}

/// Writes the whole disk in 1 MiB pieces (non-zero data) and flushes.
fn fill(disk: &Vdi) {
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
    for off in (0..disk.size()).step_by(MIB as usize) {
        let n = (disk.size() - off).min(MIB) as usize;
        disk.write(&chunk[..n], off).unwrap();
    }
    disk.flush().unwrap();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

/// 4 KiB random reads, one block per iteration from a precomputed list.
fn bench_read(c: &mut Criterion, id: &str, disk: &Vdi, blocks: &[u64]) {
    let mut buf = vec![0u8; BLOCK];
    let mut i = 0usize;
    c.benchmark_group("read_4k")
        .throughput(Throughput::Bytes(BLOCK_U64))
        .bench_function(id, |b| {
            b.iter(|| {
                let v = blocks[i % blocks.len()];
                i = i.wrapping_add(1);
                disk.read(&mut buf, v * BLOCK_U64).unwrap();
                black_box(&buf);
            })
        });
}

fn reads(c: &mut Criterion) {
    // 1 GiB written + the sparse disk's 521 blocks + 100 clones' metadata.
    let dev = Arc::new(MemDevice::new(GIB + 256 * MIB));
    let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
    let full = store.create_vdi("full", GIB).unwrap();
    fill(&full);
    let blocks = GIB / BLOCK_U64;
    // One block in every level-0 node: any other block of the disk is
    // unmapped, yet its lookup goes down all four levels.
    let sparse = store.create_vdi("sparse", GIB).unwrap();
    for v in (0..blocks).step_by(FAN as usize) {
        sparse.write(&[1u8; BLOCK], v * BLOCK_U64).unwrap();
    }
    sparse.flush().unwrap();

    let mapped = random_blocks(1, blocks, |_| true);
    bench_read(c, "mapped/plain", &full, &mapped);
    // The same lookups, but the data is always in the CPU cache: what is
    // left is the lookup and an L2-resident memcpy.
    let hot: Vec<u64> = mapped.iter().take(32).copied().collect();
    bench_read(c, "mapped/cache_hot_32_blocks", &full, &hot);
    let holes = random_blocks(2, blocks, |v| v % FAN != 0);
    bench_read(c, "unmapped/full_depth", &sparse, &holes);

    // Snapshot and clone, CLONE_DEPTH times: full@s -> c1, c1@s -> c2, ...
    let mut prev = "full".to_string();
    let mut last = None;
    for i in 1..=CLONE_DEPTH {
        let disk = store.open_vdi(&prev).unwrap();
        disk.snapshot(Some("s")).unwrap();
        let name = format!("c{i}");
        last = Some(store.clone_snapshot(&prev, "s", &name).unwrap());
        prev = name;
    }
    let deep = last.unwrap();
    // The origin too now reads through a fresh shared root.
    bench_read(c, "mapped/plain_after_snapshot", &full, &mapped);
    bench_read(c, "mapped/clone_depth_100", &deep, &mapped);

    // The plain disk again, reopened with the smallest node cache (64
    // nodes, 4 per shard): the 521 level-0 nodes no longer fit, so most
    // lookups read, check and decode a node.
    drop((full, sparse, deep));
    drop(store);
    let store = Store::open(
        dev,
        &OpenOptions {
            host_id: 1,
            cache_nodes: 64,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let full = store.open_vdi("full").unwrap();
    bench_read(c, "mapped/node_cache_64", &full, &mapped);
}

/// A disk whose blocks are all shared with a snapshot, so that every
/// first write to a block allocates (copy-on-write). Blocks are handed out
/// in `order`; when they run out, the snapshot is dropped, the blocks it
/// held are collected (`Store::gc`) and a new snapshot shares them all
/// again. None of that is timed.
struct CowDisk {
    store: Store,
    disk: Vdi,
    order: Vec<u64>,
    pos: usize,
}

impl CowDisk {
    const SIZE: u64 = 64 * MIB;

    fn new(order: Vec<u64>) -> CowDisk {
        // Twice the disk (live + snapshot copies) and room for metadata.
        let store = new_store(4 * Self::SIZE);
        let disk = store.create_vdi("cow", Self::SIZE).unwrap();
        fill(&disk);
        disk.snapshot(Some("base")).unwrap();
        CowDisk {
            store,
            disk,
            order,
            pos: 0,
        }
    }

    fn sequential() -> CowDisk {
        CowDisk::new((0..Self::SIZE / BLOCK_U64).collect())
    }

    /// Runs of 32 blocks one level-0 node apart: each run dirties 32
    /// level-0 nodes where a sequential run dirties one or two.
    fn scattered() -> CowDisk {
        let per_run = Self::SIZE / BLOCK_U64 / FAN;
        assert!(per_run >= 32);
        CowDisk::new(
            (0..FAN)
                .flat_map(|base| (0..32).map(move |i| base + i * FAN))
                .collect(),
        )
    }

    fn recycle(&mut self) {
        self.disk.delete_snapshot("base").unwrap();
        self.disk.snapshot(Some("base")).unwrap();
        self.store.gc().unwrap();
        self.pos = 0;
    }

    /// The next `n` blocks (recycling first if fewer than `n` remain).
    fn take(&mut self, n: usize) -> &[u64] {
        if self.order.len() - self.pos < n {
            self.recycle();
        }
        self.pos += n;
        &self.order[self.pos - n..self.pos]
    }

    /// How many blocks remain before the next recycle (recycling first if none).
    fn available(&mut self) -> usize {
        if self.pos == self.order.len() {
            self.recycle();
        }
        self.order.len() - self.pos
    }
}

fn writes(c: &mut Criterion) {
    let data = vec![0x5au8; MIB as usize];
    let mut g = c.benchmark_group("write");

    // A disk that owns every block: writes go in place.
    let store = new_store(256 * MIB);
    let owned = store.create_vdi("owned", 64 * MIB).unwrap();
    fill(&owned);
    let blocks = owned.size() / BLOCK_U64;
    let random = random_blocks(3, blocks, |_| true);
    let mut i = 0usize;
    g.throughput(Throughput::Bytes(BLOCK_U64));
    g.bench_function("4k/in_place", |b| {
        b.iter(|| {
            let v = random[i % random.len()];
            i = i.wrapping_add(1);
            owned.write(&data[..BLOCK], v * BLOCK_U64).unwrap();
        })
    });

    // In place again, in block order, to compare with the allocating
    // writes below, which also land on consecutive blocks.
    g.bench_function("4k/in_place_sequential", |b| {
        b.iter(|| {
            let v = i as u64 % blocks;
            i = i.wrapping_add(1);
            owned.write(&data[..BLOCK], v * BLOCK_U64).unwrap();
        })
    });

    let mut cow = CowDisk::sequential();
    g.bench_function("4k/allocating_after_snapshot", |b| {
        b.iter_custom(|iters| {
            let mut left = iters as usize;
            let mut total = Duration::ZERO;
            while left > 0 {
                let n = cow.available().min(left);
                let batch = cow.take(n).to_vec();
                let start = Instant::now();
                for v in batch {
                    cow.disk.write(&data[..BLOCK], v * BLOCK_U64).unwrap();
                }
                total += start.elapsed();
                left -= n;
            }
            total
        })
    });
    drop(cow);

    let mib_blocks = MIB / BLOCK_U64;
    let mut next = rng(4);
    let mib_offsets: Vec<u64> = (0..RANDOM_BLOCKS)
        .map(|_| next() % (blocks / mib_blocks) * MIB)
        .collect();
    g.throughput(Throughput::Bytes(MIB));
    g.bench_function("1m/in_place", |b| {
        b.iter(|| {
            let off = mib_offsets[i % mib_offsets.len()];
            i = i.wrapping_add(1);
            owned.write(&data, off).unwrap();
        })
    });
    g.finish();
}

/// `Vdi::flush` alone, after `n` untimed allocating writes taken from `cow`.
fn bench_flush(c: &mut Criterion, id: &str, cow: &mut CowDisk, n: usize) {
    let data = vec![0x3cu8; BLOCK];
    c.benchmark_group("flush").bench_function(id, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for v in cow.take(n).to_vec() {
                    cow.disk.write(&data, v * BLOCK_U64).unwrap();
                }
                let start = Instant::now();
                cow.disk.flush().unwrap();
                total += start.elapsed();
            }
            total
        })
    });
}

fn flushes(c: &mut Criterion) {
    let mut cow = CowDisk::sequential();
    bench_flush(c, "clean", &mut cow, 0);
    bench_flush(c, "after_1_write", &mut cow, 1);
    bench_flush(c, "after_32_sequential_writes", &mut cow, 32);
    drop(cow);
    let mut cow = CowDisk::scattered();
    bench_flush(c, "after_32_scattered_writes", &mut cow, 32);
}

fn snapshot_and_clone(c: &mut Criterion) {
    let store = new_store(512 * MIB);
    let mut g = c.benchmark_group("catalog");

    // Snapshots of a 64 MiB disk that has some data in every level-0 node.
    // A fresh disk every 256 snapshots (untimed) keeps its list short.
    const PER_DISK: usize = 256;
    let names: Vec<String> = (0..PER_DISK).map(|i| format!("s{i}")).collect();
    let new_disk = || {
        let disk = store.create_vdi("snap", 64 * MIB).unwrap();
        for v in (0..64 * MIB / BLOCK_U64).step_by(FAN as usize) {
            disk.write(&[7u8; BLOCK], v * BLOCK_U64).unwrap();
        }
        disk.flush().unwrap();
        disk
    };
    let mut disk = new_disk();
    let mut taken = 0;
    g.bench_function("snapshot", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if taken == PER_DISK {
                    // No clone descends from it: every block is freed.
                    store.delete_vdi("snap").unwrap();
                    disk = new_disk();
                    taken = 0;
                }
                let start = Instant::now();
                disk.snapshot(Some(&names[taken])).unwrap();
                total += start.elapsed();
                taken += 1;
            }
            total
        })
    });

    // Clones of a snapshot of a full 64 MiB disk; each is deleted again
    // (untimed) so that the registry does not fill up.
    let origin = store.create_vdi("origin", 64 * MIB).unwrap();
    fill(&origin);
    origin.snapshot(Some("gold")).unwrap();
    g.bench_function("clone_snapshot", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let clone = store.clone_snapshot("origin", "gold", "clone").unwrap();
                total += start.elapsed();
                drop(clone);
                store.delete_vdi("clone").unwrap();
            }
            total
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = reads, writes, flushes, snapshot_and_clone
}
criterion_main!(benches);
