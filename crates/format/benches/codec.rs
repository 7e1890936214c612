//! Codec hot paths: the crc of a block, tree-node encode and decode, and
//! block-pointer packing. Run with `cargo bench -p parallax-format --bench codec`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use parallax_format::{NodeBlock, Ptr, BLOCK_SIZE, FAN_OUT};
use std::hint::black_box;
use std::time::Duration;

const STORE_ID: u64 = 0x5eed_0000_1234_5678;
const NODE_ADDR: u64 = 1_000_003;

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

/// A node full of pointers: metadata pointers with check values at
/// `level > 0`, data pointers at level 0, half of them writable.
fn full_node(level: u8) -> NodeBlock {
    let mut next = rng(u64::from(level) + 7);
    let entries = (0..FAN_OUT)
        .map(|i| {
            let addr = 2 + next() % ((1 << 40) - 2);
            let writable = i % 2 == 0;
            if level == 0 {
                Ptr::data(addr, writable)
            } else {
                Ptr::meta(addr, next() as u32, writable)
            }
        })
        .collect();
    NodeBlock { level, entries }
}

fn crc(c: &mut Criterion) {
    let mut next = rng(42);
    let block: Vec<u8> = (0..BLOCK_SIZE).map(|_| next() as u8).collect();
    let mut g = c.benchmark_group("crc32c");
    g.throughput(Throughput::Bytes(BLOCK_SIZE as u64));
    g.bench_function("4KiB", |b| b.iter(|| crc32c::crc32c(black_box(&block))));
    // What every metadata encoder and decoder runs: the crc with the
    // header's crc field taken as zero (three appends).
    g.bench_function("4KiB_block_crc", |b| {
        b.iter(|| parallax_format::block_crc_for_fuzzing(black_box(&block)))
    });
    g.finish();
}

fn node(c: &mut Criterion) {
    let mut g = c.benchmark_group("node");
    g.throughput(Throughput::Bytes(BLOCK_SIZE as u64));
    for level in [0u8, 1] {
        let node = full_node(level);
        g.bench_function(format!("encode/level{level}"), |b| {
            b.iter(|| black_box(&node).encode(STORE_ID, NODE_ADDR, 9, 1234))
        });
        let (block, crc) = node.encode(STORE_ID, NODE_ADDR, 9, 1234);
        let (decoded, _, back) =
            NodeBlock::decode(&block[..], NODE_ADDR, Some(STORE_ID), level).unwrap();
        assert_eq!((decoded, back), (node, crc));
        g.bench_function(format!("decode/level{level}"), |b| {
            b.iter(|| {
                NodeBlock::decode(black_box(&block[..]), NODE_ADDR, Some(STORE_ID), level).unwrap()
            })
        });
    }
    g.finish();
}

fn ptr(c: &mut Criterion) {
    // A single pack or unpack is a few instructions; time a node's worth.
    let mut next = rng(3);
    let raw: Vec<(u64, u32, bool)> = (0..FAN_OUT)
        .map(|_| {
            (
                2 + next() % ((1 << 40) - 2),
                next() as u32,
                next().is_multiple_of(2),
            )
        })
        .collect();
    let ptrs: Vec<Ptr> = raw.iter().map(|&(a, c, w)| Ptr::meta(a, c, w)).collect();
    let mut g = c.benchmark_group("ptr");
    g.throughput(Throughput::Elements(FAN_OUT as u64));
    g.bench_function("pack_x504", |b| {
        let mut out = vec![Ptr::NULL; FAN_OUT];
        b.iter(|| {
            for (o, &(a, c, w)) in out.iter_mut().zip(black_box(&raw)) {
                *o = Ptr::meta(a, c, w);
            }
            black_box(&out);
        })
    });
    g.bench_function("unpack_x504", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for &p in black_box(&ptrs) {
                acc = acc
                    .wrapping_add(p.addr())
                    .wrapping_add(u64::from(p.check()))
                    .wrapping_add(u64::from(p.writable()));
            }
            acc
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = crc, node, ptr
}
criterion_main!(benches);
