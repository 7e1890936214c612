//! The daemon's metrics, in the Prometheus (OpenMetrics) text format:
//! `GET /metrics` on the control socket and, with `serve --metrics-listen
//! ADDR:PORT`, on a TCP port of their own.
//!
//! - NBD requests, their bytes, errors and latency by operation; requests
//!   in flight; connections open and opened.
//! - Snapshots taken and deleted by schedules; commits written and their
//!   latency, and how long disks were held exclusively (reads and writes
//!   waiting), from the engine's hooks ([`parallax_engine::observe`]).
//! - The store's capacity and use, read when scraped.
//! - Cluster mode: disks given to other appliances, obtained by asking,
//!   taken over; whether the lease allows writing, and its incarnation.
//! - Per-disk request and byte counts only with `--metrics-per-disk`: a
//!   label per disk multiplies the series (Ceph keeps its per-image
//!   metrics off by default for the same reason).
//!
//! One set per process ([`global`]); the hot path touches only atomics
//! and, for the latency histograms, one short lock.

use crate::service::Service;
use parallax_nbd::proto::Command;
use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Upper bound of the first latency bucket; bucket k ends at `FIRST << k`.
const FIRST_BUCKET_NS: u64 = 16_000;
/// Finite latency buckets: 16 µs .. 16.8 s (NBD requests on memory take
/// microseconds, commits under load tens of milliseconds).
const BUCKETS: usize = 21;

/// A latency histogram that observes with two relaxed atomic adds and no
/// lock (prometheus-client's `Histogram` takes a lock per observation: one
/// per NBD request here). Buckets `16 µs × 2^k`, then +Inf.
#[derive(Clone, Debug, Default)]
pub struct Latency(Arc<LatencyCounts>);

#[derive(Debug, Default)]
struct LatencyCounts {
    /// Observations per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; BUCKETS + 1],
    sum_ns: AtomicU64,
}

/// The bucket of an observation of `ns` nanoseconds: the first whose upper
/// bound is at least `ns`.
fn bucket_of(ns: u64) -> usize {
    let over = ns.saturating_sub(1) / FIRST_BUCKET_NS;
    ((u64::BITS - over.leading_zeros()) as usize).min(BUCKETS)
}

impl Latency {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts: Vec<u64> = self
            .0
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let buckets: Vec<(f64, u64)> = counts
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                let bound = if k < BUCKETS {
                    (FIRST_BUCKET_NS << k) as f64 / 1e9
                } else {
                    f64::MAX
                };
                (bound, n)
            })
            .collect();
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// An NBD operation, as a label value.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Op {
    read,
    write,
    flush,
    trim,
    write_zeroes,
    cache,
    block_status,
}

/// Every answered command and its label; per-operation metrics are kept
/// in this order.
const OPS: [(Command, Op); 7] = [
    (Command::Read, Op::read),
    (Command::Write, Op::write),
    (Command::Flush, Op::flush),
    (Command::Trim, Op::trim),
    (Command::WriteZeroes, Op::write_zeroes),
    (Command::Cache, Op::cache),
    (Command::BlockStatus, Op::block_status),
];

/// The index of `command` in [`OPS`]; `None` for DISC and unknown ones.
fn op_index(command: Command) -> Option<usize> {
    OPS.iter().position(|&(c, _)| c == command)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: Op,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskOpLabels {
    disk: String,
    op: Op,
}

/// The counters of one operation, taken out of their families once.
struct OpMetrics {
    requests: Counter,
    errors: Counter,
    bytes: Counter,
    seconds: Latency,
}

/// One connection's per-disk counters (`--metrics-per-disk`), looked up
/// once when it connects.
pub struct DiskMetrics {
    requests: Vec<Counter>,
    bytes: Vec<Counter>,
}

pub struct Metrics {
    registry: Registry,
    ops: Vec<OpMetrics>,
    in_flight: Gauge,
    connections: Gauge,
    connections_opened: Counter,
    disk_requests: Family<DiskOpLabels, Counter>,
    disk_bytes: Family<DiskOpLabels, Counter>,
    per_disk: bool,
    /// The exports that have per-disk series, so that deleting a disk or
    /// a snapshot removes them.
    disk_exports: parking_lot::Mutex<std::collections::HashSet<String>>,
    scheduled_taken: Counter,
    scheduled_deleted: Counter,
    commits: Counter,
    commit_seconds: Latency,
    held_seconds: Latency,
    capacity: Gauge,
    used: Gauge,
    disks: Gauge,
    given: Counter,
    claimed: Counter,
    taken_over: Counter,
    may_write: Gauge,
    incarnation: Gauge,
    pool_read_bytes: Counter,
    cache: CacheMetrics,
    log: LogMetrics,
}

/// The write-back log's figures, read from it at scrape time.
#[derive(Default)]
struct LogMetrics {
    appended: Counter,
    destaged: Counter,
    flushes: Counter,
    destage_errors: Counter,
    dirty: Gauge,
    used: Gauge,
    size: Gauge,
    logging: Gauge,
    replayed: Gauge,
}

/// The read cache's figures, read from it at scrape time (its counters
/// only grow while the daemon runs, so each series follows them).
#[derive(Default)]
struct CacheMetrics {
    hits: Counter,
    misses: Counter,
    fills: Counter,
    dropped: Counter,
    corrupt: Counter,
    errors: Counter,
    entries: Gauge,
    slots: Gauge,
    given_up: Gauge,
}

/// Brings a counter up to `now` (a count kept elsewhere, which only
/// grows). `fetch_max`, not get-then-add: two scrapes at once must not
/// both add the difference.
fn follow(c: &Counter, now: u64) {
    c.inner().fetch_max(now, Ordering::Relaxed);
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// Sets up the process's metrics (per-disk series or not) and hooks the
/// engine's commits to them. Later calls change nothing.
pub fn init(per_disk: bool) -> &'static Metrics {
    GLOBAL.get_or_init(|| {
        let m = Metrics::new(per_disk);
        parallax_engine::observe::on_commit(|d| {
            if let Some(m) = GLOBAL.get() {
                m.commits.inc();
                m.commit_seconds.observe(d);
            }
        });
        parallax_engine::observe::on_disk_held(|d| {
            if let Some(m) = GLOBAL.get() {
                m.held_seconds.observe(d);
            }
        });
        m
    })
}

/// The process's metrics ([`init`] with no per-disk series if nothing
/// called it).
pub fn global() -> &'static Metrics {
    init(false)
}

impl Metrics {
    fn new(per_disk: bool) -> Metrics {
        let mut registry = Registry::with_prefix("parallax");
        let requests = Family::<OpLabels, Counter>::default();
        let errors = Family::<OpLabels, Counter>::default();
        let bytes = Family::<OpLabels, Counter>::default();
        let seconds = Family::<OpLabels, Latency>::default();
        registry.register(
            "nbd_requests",
            "NBD requests answered, by operation",
            requests.clone(),
        );
        registry.register(
            "nbd_request_errors",
            "NBD requests answered with an error, by operation",
            errors.clone(),
        );
        registry.register(
            "nbd_bytes",
            "Bytes read and written by NBD requests that succeeded",
            bytes.clone(),
        );
        registry.register(
            "nbd_request_duration_seconds",
            "Time from an NBD request's arrival to its reply being queued",
            seconds.clone(),
        );
        let ops = OPS
            .iter()
            .map(|&(_, op)| {
                let l = OpLabels { op };
                OpMetrics {
                    requests: requests.get_or_create(&l).clone(),
                    errors: errors.get_or_create(&l).clone(),
                    bytes: bytes.get_or_create(&l).clone(),
                    seconds: seconds.get_or_create(&l).clone(),
                }
            })
            .collect();
        let m = Metrics {
            ops,
            in_flight: Gauge::default(),
            connections: Gauge::default(),
            connections_opened: Counter::default(),
            disk_requests: Family::default(),
            disk_bytes: Family::default(),
            per_disk,
            disk_exports: Default::default(),
            scheduled_taken: Counter::default(),
            scheduled_deleted: Counter::default(),
            commits: Counter::default(),
            commit_seconds: Latency::default(),
            held_seconds: Latency::default(),
            capacity: Gauge::default(),
            used: Gauge::default(),
            disks: Gauge::default(),
            given: Counter::default(),
            claimed: Counter::default(),
            taken_over: Counter::default(),
            may_write: Gauge::default(),
            incarnation: Gauge::default(),
            pool_read_bytes: Counter::default(),
            cache: CacheMetrics::default(),
            log: LogMetrics::default(),
            registry: Registry::default(),
        };
        registry.register(
            "nbd_requests_in_flight",
            "NBD requests received and not yet answered",
            m.in_flight.clone(),
        );
        registry.register(
            "nbd_connections",
            "NBD connections open now (negotiated)",
            m.connections.clone(),
        );
        registry.register(
            "nbd_connections_opened",
            "NBD connections that finished negotiating",
            m.connections_opened.clone(),
        );
        if per_disk {
            registry.register(
                "nbd_disk_requests",
                "NBD requests answered, by export and operation",
                m.disk_requests.clone(),
            );
            registry.register(
                "nbd_disk_bytes",
                "Bytes read and written by NBD requests that succeeded, by export",
                m.disk_bytes.clone(),
            );
        }
        registry.register(
            "scheduled_snapshots_taken",
            "Snapshots taken by schedules",
            m.scheduled_taken.clone(),
        );
        registry.register(
            "scheduled_snapshots_deleted",
            "Snapshots deleted by schedules' retention",
            m.scheduled_deleted.clone(),
        );
        registry.register(
            "commits",
            "Disk commits written (flushes, snapshots, settling)",
            m.commits.clone(),
        );
        registry.register(
            "commit_duration_seconds",
            "Time a commit takes to write its blocks, bitmaps and header, flushes included",
            m.commit_seconds.clone(),
        );
        registry.register(
            "disk_held_seconds",
            "Time a disk was held exclusively, from asking for it (requests in flight drain) to letting it go, its reads and writes waiting: by a commit's in-memory part, a snapshot, a schedule tick, a deletion, a rollback, or the data path's own exclusive sections",
            m.held_seconds.clone(),
        );
        registry.register(
            "store_capacity_bytes",
            "Bytes of the store's extents",
            m.capacity.clone(),
        );
        registry.register(
            "store_used_bytes",
            "Bytes of the store allocated",
            m.used.clone(),
        );
        registry.register("disks", "Disks in the store", m.disks.clone());
        registry.register(
            "pool_data_read_bytes",
            "Bytes of disk data read from the pool (reads the read cache served are not counted)",
            m.pool_read_bytes.clone(),
        );
        let c = &m.cache;
        for (name, help, counter) in [
            (
                "read_cache_hits",
                "Reads of a block the read cache served",
                &c.hits,
            ),
            (
                "read_cache_misses",
                "Reads of a cacheable block the read cache did not hold",
                &c.misses,
            ),
            (
                "read_cache_fills",
                "Blocks copied into the read cache",
                &c.fills,
            ),
            (
                "read_cache_dropped",
                "Blocks not copied into the read cache (its queue was full, or its device failed)",
                &c.dropped,
            ),
            (
                "read_cache_corrupt",
                "Copies in the read cache that failed their checksum (read from the pool instead)",
                &c.corrupt,
            ),
            (
                "read_cache_errors",
                "I/O errors of the read cache's device",
                &c.errors,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "read_cache_entries",
            "Blocks the read cache holds",
            c.entries.clone(),
        );
        registry.register(
            "read_cache_slots",
            "Blocks the read cache can hold",
            c.slots.clone(),
        );
        registry.register(
            "read_cache_given_up",
            "1 once the read cache was given up after device errors in a row (reads go to the pool)",
            c.given_up.clone(),
        );
        let l = &m.log;
        for (name, help, counter) in [
            (
                "write_log_appended_bytes",
                "Bytes written to the write-back log",
                &l.appended,
            ),
            (
                "write_log_destaged_bytes",
                "Bytes the write-back log wrote to the pool",
                &l.destaged,
            ),
            (
                "write_log_flushes",
                "Flushes of the write-back log's device",
                &l.flushes,
            ),
            (
                "write_log_destage_errors",
                "Failed attempts to write the write-back log to the pool (each retried)",
                &l.destage_errors,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        for (name, help, gauge) in [
            (
                "write_log_dirty_bytes",
                "Bytes in the write-back log not yet on the pool (they live only on this host)",
                &l.dirty,
            ),
            (
                "write_log_used_bytes",
                "Bytes of the write-back log in use",
                &l.used,
            ),
            (
                "write_log_size_bytes",
                "Bytes the write-back log can hold",
                &l.size,
            ),
            (
                "write_log_logging",
                "1 while writes go to the write-back log (a write-back disk is open, or records are left)",
                &l.logging,
            ),
            (
                "write_log_replayed_records",
                "Records the write-back log found and replayed when the daemon started",
                &l.replayed,
            ),
        ] {
            registry.register(name, help, gauge.clone());
        }
        registry.register(
            "cluster_disks_given",
            "Disks this appliance handed to another (by `handoff` or because it asked)",
            m.given.clone(),
        );
        registry.register(
            "cluster_disks_claimed",
            "Disks this appliance obtained by asking for them (a client wrote here)",
            m.claimed.clone(),
        );
        registry.register(
            "cluster_disks_taken_over",
            "Disks this appliance took over from one that left without letting them go",
            m.taken_over.clone(),
        );
        registry.register(
            "cluster_may_write",
            "1 while this appliance's etcd lease allows it to write, 0 when fenced (cluster mode)",
            m.may_write.clone(),
        );
        registry.register(
            "cluster_lease_incarnation",
            "Which lease this appliance is on; grows with each new lease after a lost one",
            m.incarnation.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A connection to `export` is open; [`Metrics::disconnected`] when it
    /// closes. Returns its per-disk counters, if kept.
    pub fn connected(&self, export: &str) -> Option<DiskMetrics> {
        self.connections.inc();
        self.connections_opened.inc();
        self.per_disk.then(|| {
            self.disk_exports.lock().insert(export.to_string());
            let each = |family: &Family<DiskOpLabels, Counter>| {
                OPS.iter()
                    .map(|&(_, op)| {
                        let labels = DiskOpLabels {
                            disk: export.to_string(),
                            op,
                        };
                        family.get_or_create(&labels).clone()
                    })
                    .collect()
            };
            DiskMetrics {
                requests: each(&self.disk_requests),
                bytes: each(&self.disk_bytes),
            }
        })
    }

    pub fn disconnected(&self) {
        self.connections.dec();
    }

    /// Disk `disk` was deleted, or snapshot export `disk@snap` when
    /// `snapshot` is given: their per-disk series go (a disk takes its
    /// snapshots' with it).
    pub fn forget(&self, disk: &str, snapshot: Option<&str>) {
        if !self.per_disk {
            return;
        }
        let gone = |export: &str| match snapshot {
            Some(snap) => export.strip_prefix(disk).and_then(|r| r.strip_prefix('@')) == Some(snap),
            None => {
                export == disk
                    || export
                        .strip_prefix(disk)
                        .is_some_and(|r| r.starts_with('@'))
            }
        };
        let mut exports = self.disk_exports.lock();
        exports.retain(|export| {
            if !gone(export) {
                return true;
            }
            for &(_, op) in &OPS {
                let labels = DiskOpLabels {
                    disk: export.clone(),
                    op,
                };
                self.disk_requests.remove(&labels);
                self.disk_bytes.remove(&labels);
            }
            false
        });
    }

    /// A request was read; [`Metrics::answered`] follows once its reply is
    /// queued.
    pub fn received(&self) {
        self.in_flight.inc();
    }

    /// A request of `command` was answered after `elapsed`, successfully
    /// or not, moving `bytes` of data.
    pub fn answered(
        &self,
        command: Command,
        ok: bool,
        bytes: u64,
        elapsed: Duration,
        disk: Option<&DiskMetrics>,
    ) {
        self.in_flight.dec();
        let Some(i) = op_index(command) else {
            return;
        };
        let m = &self.ops[i];
        m.requests.inc();
        m.seconds.observe(elapsed);
        if ok {
            m.bytes.inc_by(bytes);
        } else {
            m.errors.inc();
        }
        if let Some(d) = disk {
            d.requests[i].inc();
            if ok {
                d.bytes[i].inc_by(bytes);
            }
        }
    }

    /// A schedule took a snapshot and its retention deleted `deleted`.
    pub fn scheduled(&self, deleted: u64) {
        self.scheduled_taken.inc();
        self.scheduled_deleted.inc_by(deleted);
    }

    /// Cluster mode: a disk was handed to another appliance.
    pub fn disk_given(&self) {
        self.given.inc();
    }

    /// Cluster mode: a disk asked for was obtained.
    pub fn disk_claimed(&self) {
        self.claimed.inc();
    }

    /// Cluster mode: a disk was taken over.
    pub fn disk_taken_over(&self) {
        self.taken_over.inc();
    }

    /// The metrics as text, with the store's figures read now.
    pub fn render(&self, service: &Service) -> String {
        if let Some(c) = service.cluster() {
            let status = c.status();
            self.may_write.set(i64::from(status.may_write));
            self.incarnation.set(status.incarnation as i64);
        }
        let stats = service.store().stats();
        self.capacity.set(stats.capacity_bytes as i64);
        self.used.set(stats.used_bytes as i64);
        if let Ok(disks) = service.store().try_list() {
            self.disks.set(disks.len() as i64);
        }
        follow(
            &self.pool_read_bytes,
            service.store().pool_data_read_bytes(),
        );
        if let Some(s) = service.store().read_cache_stats() {
            let c = &self.cache;
            follow(&c.hits, s.hits);
            follow(&c.misses, s.misses);
            follow(&c.fills, s.fills);
            follow(&c.dropped, s.dropped);
            follow(&c.corrupt, s.corrupt);
            follow(&c.errors, s.errors);
            c.entries.set(s.entries as i64);
            c.slots.set(s.slots as i64);
            c.given_up.set(i64::from(s.given_up));
        }
        if let Some(s) = service.store().write_log_stats() {
            let l = &self.log;
            follow(&l.appended, s.appended_bytes);
            follow(&l.destaged, s.destaged_bytes);
            follow(&l.flushes, s.flushes);
            follow(&l.destage_errors, s.destage_errors);
            l.dirty.set(s.dirty_bytes as i64);
            l.used.set(s.used_bytes as i64);
            l.size.set(s.size_bytes as i64);
            l.logging.set(i64::from(s.logging));
            l.replayed.set(s.replayed as i64);
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_the_first_bucket_that_holds_them() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(16_000), 0);
        assert_eq!(bucket_of(16_001), 1);
        assert_eq!(bucket_of(32_000), 1);
        assert_eq!(bucket_of(32_001), 2);
        assert_eq!(bucket_of(FIRST_BUCKET_NS << 20), 20);
        assert_eq!(bucket_of((FIRST_BUCKET_NS << 20) + 1), BUCKETS);
        assert_eq!(bucket_of(u64::MAX), BUCKETS);
        for ns in [1, 999, 16_000, 70_000, 5_000_000, 3_000_000_000] {
            let k = bucket_of(ns);
            assert!(ns <= FIRST_BUCKET_NS << k, "{ns} above bucket {k}");
            assert!(
                k == 0 || ns > FIRST_BUCKET_NS << (k - 1),
                "{ns} fits bucket {}",
                k - 1
            );
        }
        let h = Latency::default();
        h.observe(Duration::from_micros(20));
        h.observe(Duration::from_micros(20));
        h.observe(Duration::from_secs(60));
        let mut registry = Registry::default();
        registry.register("t", "test", h);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("t_bucket{le=\"0.000016\"} 0"), "{text}");
        assert!(text.contains("t_bucket{le=\"0.000032\"} 2"), "{text}");
        assert!(text.contains("t_bucket{le=\"+Inf\"} 3"), "{text}");
        assert!(text.contains("t_count 3"), "{text}");
    }

    #[test]
    fn disc_and_unknown_commands_have_no_series() {
        assert_eq!(op_index(Command::Read), Some(0));
        assert_eq!(op_index(Command::BlockStatus), Some(6));
        assert_eq!(op_index(Command::Disc), None);
    }
}
