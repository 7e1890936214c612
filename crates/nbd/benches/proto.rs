//! Transmission-phase codec hot paths: the request header decoder and the
//! reply encoders the server runs once per request. Run with
//! `cargo bench -p parallax-nbd --bench proto`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use parallax_nbd::proto::{
    simple_reply, structured_block_status, structured_data_header, Command, Request,
    REQUEST_HEADER_LEN, STATE_HOLE, STATE_ZERO,
};
use std::hint::black_box;
use std::time::Duration;

fn request(c: &mut Criterion) {
    let header = Request {
        flags: 0,
        command: Command::Read,
        cookie: 0x0123_4567_89ab_cdef,
        offset: 7 << 30,
        length: 4096,
    }
    .encode();
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Bytes(REQUEST_HEADER_LEN as u64));
    g.bench_function("decode", |b| {
        b.iter(|| Request::decode(black_box(&header)).unwrap())
    });
    g.finish();
}

fn replies(c: &mut Criterion) {
    // The encoders append to the caller's buffer; a server reuses one per
    // connection, so the benchmarks clear and refill a preallocated one.
    let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut g = c.benchmark_group("reply");
    g.bench_function("simple", |b| {
        b.iter(|| {
            out.clear();
            simple_reply(&mut out, black_box(0x0123_4567_89ab_cdef), black_box(0));
            black_box(&out);
        })
    });
    g.bench_function("structured_data_header", |b| {
        b.iter(|| {
            out.clear();
            structured_data_header(
                &mut out,
                black_box(0x0123_4567_89ab_cdef),
                black_box(7 << 30),
                black_box(4096),
                true,
            );
            black_box(&out);
        })
    });
    // 64 alternating data / hole runs, as a fragmented thin disk answers.
    let extents: Vec<(u32, u32)> = (0..64u32)
        .map(|i| {
            let flags = if i % 2 == 0 {
                0
            } else {
                STATE_HOLE | STATE_ZERO
            };
            ((i + 1) * 4096, flags)
        })
        .collect();
    g.throughput(Throughput::Elements(extents.len() as u64));
    g.bench_function("block_status_64_extents", |b| {
        b.iter(|| {
            out.clear();
            structured_block_status(
                &mut out,
                black_box(0x0123_4567_89ab_cdef),
                black_box(1),
                black_box(&extents),
                true,
            );
            black_box(&out);
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
    targets = request, replies
}
criterion_main!(benches);
