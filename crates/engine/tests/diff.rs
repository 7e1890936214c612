//! `diff`: the changed ranges between two versions, against a model.
//!
//! Random histories of writes, discards, snapshots, clones, deletions,
//! rollbacks and reopens, on one store with or without entry journals;
//! then every pair of kept snapshots (of any disks) and every snapshot
//! against every live disk is diffed and checked against the model, which
//! gives each block a write id:
//! - complete: every block whose bytes differ is reported;
//! - exact in kind: a block reported as data is mapped in the newer
//!   version, one reported as zero is not;
//! - precise: no block is reported whose write id is the same on both
//!   sides (not written between them).
//!
//! A cost check: one block changed in a 1 TiB disk is found by reading a
//! handful of nodes.

use parallax_device::{BlockDevice, MemDevice};
use parallax_engine::{
    allocation_depth, diff, diff_in, Change, ChangeKind, CreateOptions, DepthRun, DiffTarget,
    OpenOptions, SnapshotView, Store,
};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const DISK_SIZE: u64 = 1 << 30;
/// Positions written: spread over leaves and over the second level.
const SLOTS: u64 = 64;

fn position(slot: u64) -> u64 {
    // Neighbours share a leaf; every 8th slot jumps to another subtree of
    // the level above leaves (504 × 504 blocks).
    (slot % 8) * 3 + (slot / 8) * 509 + (slot / 16) * 254_016 % (DISK_SIZE / 4096 - 600)
}

fn data(seed: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|i| ((i * 131 + seed * 17) % 251 + 1) as u8)
        .collect()
}

#[derive(Clone, Debug)]
enum Op {
    Write { slot: u64, blocks: u64 },
    Discard { slot: u64, blocks: u64 },
    Snapshot,
    CloneLatest,
    Switch(usize),
    DeleteSnapshot(usize),
    Rollback(usize),
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..SLOTS, 1..4u64).prop_map(|(slot, blocks)| Op::Write { slot, blocks }),
        2 => (0..SLOTS, 1..4u64).prop_map(|(slot, blocks)| Op::Discard { slot, blocks }),
        4 => Just(Op::Snapshot),
        1 => Just(Op::CloneLatest),
        1 => (0..4usize).prop_map(Op::Switch),
        1 => (0..8usize).prop_map(Op::DeleteSnapshot),
        1 => (0..8usize).prop_map(Op::Rollback),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

/// Virtual block ─▶ (write id, data seed); absent: unmapped.
type Blocks = BTreeMap<u64, (u64, u64)>;

struct ModelDisk {
    name: String,
    live: Blocks,
    /// Kept snapshots, oldest first.
    snapshots: Vec<(String, Blocks)>,
    /// A clone: the blocks of the snapshot it was made from.
    origin: Option<Blocks>,
}

struct Runner {
    dev: Arc<MemDevice>,
    journal: bool,
    store: Store,
    disks: Vec<ModelDisk>,
    current: usize,
    next_id: u64,
}

impl Runner {
    fn new(journal: bool) -> Runner {
        let dev = Arc::new(MemDevice::new(64 << 20));
        let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
        if journal {
            store.enable_journal().unwrap();
            store.set_journal_checkpoint(40);
        }
        store.create_vdi("d0", DISK_SIZE).unwrap();
        Runner {
            dev,
            journal,
            store,
            disks: vec![ModelDisk {
                name: "d0".into(),
                live: Blocks::new(),
                snapshots: Vec::new(),
                origin: None,
            }],
            current: 0,
            next_id: 1,
        }
    }

    fn apply(&mut self, op: &Op) {
        let d = &mut self.disks[self.current];
        let vdi = self.store.open_vdi(&d.name).unwrap();
        match *op {
            Op::Write { slot, blocks } => {
                let v = position(slot);
                let mut buf = Vec::new();
                for b in 0..blocks {
                    let id = self.next_id;
                    self.next_id += 1;
                    buf.extend(data(id));
                    d.live.insert(v + b, (id, id));
                }
                vdi.write(&buf, v * 4096).unwrap();
            }
            Op::Discard { slot, blocks } => {
                let v = position(slot);
                vdi.discard(v * 4096, blocks * 4096).unwrap();
                for b in 0..blocks {
                    d.live.remove(&(v + b));
                }
            }
            Op::Snapshot => {
                let name = format!("s{}", self.next_id);
                self.next_id += 1;
                vdi.snapshot(Some(&name)).unwrap();
                d.snapshots.push((name, d.live.clone()));
            }
            Op::CloneLatest => {
                if let Some((snap, blocks)) = d.snapshots.last().cloned() {
                    let from = d.name.clone();
                    let name = format!("d{}", self.disks.len());
                    self.store.clone_snapshot(&from, &snap, &name).unwrap();
                    self.disks.push(ModelDisk {
                        name,
                        live: blocks.clone(),
                        snapshots: Vec::new(),
                        origin: Some(blocks),
                    });
                    self.current = self.disks.len() - 1;
                }
            }
            Op::Switch(i) => self.current = i % self.disks.len(),
            Op::DeleteSnapshot(i) => {
                if !d.snapshots.is_empty() {
                    let (name, _) = d.snapshots.remove(i % d.snapshots.len());
                    vdi.delete_snapshot(&name).unwrap();
                }
            }
            Op::Rollback(i) => {
                if !d.snapshots.is_empty() {
                    let (name, blocks) = d.snapshots[i % d.snapshots.len()].clone();
                    vdi.rollback(&name).unwrap();
                    d.live = blocks;
                }
            }
            Op::Flush => vdi.flush().unwrap(),
            Op::Reopen => {
                drop(vdi);
                let store = std::mem::replace(
                    &mut self.store,
                    Store::create(
                        Arc::new(MemDevice::new(16 << 20)),
                        &CreateOptions::default(),
                    )
                    .unwrap(),
                );
                drop(store);
                self.store = Store::open(self.dev.clone(), &OpenOptions::default()).unwrap();
                if self.journal {
                    self.store.set_journal_checkpoint(40);
                }
            }
        }
    }

    /// Every pair of versions checked against the model.
    fn check(&self) {
        let mut versions: Vec<(SnapshotView, &Blocks)> = Vec::new();
        for d in &self.disks {
            for (s, blocks) in &d.snapshots {
                versions.push((self.store.open_snapshot(&d.name, s).unwrap(), blocks));
            }
        }
        for (a, a_blocks) in &versions {
            for (b, b_blocks) in &versions {
                let got = diff(Some(a), DiffTarget::Snapshot(b)).unwrap();
                check_against(&got, a_blocks, b_blocks, "snapshot to snapshot");
            }
            for d in &self.disks {
                let vdi = self.store.open_vdi(&d.name).unwrap();
                let got = diff(Some(a), DiffTarget::Live(&vdi)).unwrap();
                check_against(&got, a_blocks, &d.live, "snapshot to live");
            }
            let full = diff(None, DiffTarget::Snapshot(a)).unwrap();
            check_against(&full, &Blocks::new(), a_blocks, "full");
        }
        // Allocation depth of every version, and a diff of a sub-range.
        for d in &self.disks {
            let vdi = self.store.open_vdi(&d.name).unwrap();
            let depth = allocation_depth(DiffTarget::Live(&vdi), 0, DISK_SIZE).unwrap();
            check_depth(&depth, &d.live, d.origin.as_ref());
            for (s, blocks) in &d.snapshots {
                let view = self.store.open_snapshot(&d.name, s).unwrap();
                let depth = allocation_depth(DiffTarget::Snapshot(&view), 0, DISK_SIZE).unwrap();
                check_depth(&depth, blocks, d.origin.as_ref());
            }
        }
        if let Some((a, a_blocks)) = versions.first() {
            let (lo, hi) = (position(9) * 4096 + 100, position(40) * 4096);
            let vdi = self.store.open_vdi(&self.disks[0].name).unwrap();
            let got = diff_in(Some(a), DiffTarget::Live(&vdi), lo, hi - lo).unwrap();
            let (lo_b, hi_b) = (lo / 4096, hi.div_ceil(4096));
            let clip =
                |m: &Blocks| -> Blocks { m.range(lo_b..hi_b).map(|(k, v)| (*k, *v)).collect() };
            for c in &got {
                assert!(c.offset / 4096 >= lo_b && (c.offset + c.length) / 4096 <= hi_b);
            }
            check_against(&got, &clip(a_blocks), &clip(&self.disks[0].live), "range");
        }
    }
}

/// Runs covering the disk in order; depth 0 where unmapped, 2 where the
/// block is the clone origin's (same write), 1 elsewhere.
fn check_depth(runs: &[DepthRun], blocks: &Blocks, origin: Option<&Blocks>) {
    let mut at = 0;
    for r in runs {
        assert_eq!(
            r.offset, at,
            "runs do not cover the disk in order: {runs:?}"
        );
        at += r.length;
        for v in r.offset / 4096..(r.offset + r.length) / 4096 {
            let want = match (blocks.get(&v), origin.and_then(|o| o.get(&v))) {
                (None, _) => 0,
                (Some(b), Some(o)) if b.0 == o.0 => 2,
                (Some(_), _) => 1,
            };
            assert_eq!(
                r.depth, want,
                "block {v}: depth {} instead of {want}",
                r.depth
            );
        }
    }
    assert_eq!(at, DISK_SIZE);
}

/// See the module documentation.
fn check_against(got: &[Change], from: &Blocks, to: &Blocks, what: &str) {
    let mut reported = BTreeMap::new();
    let mut last_end = 0;
    for c in got {
        assert!(
            c.offset >= last_end,
            "{what}: out of order or overlapping: {got:?}"
        );
        assert!(c.length > 0 && c.offset % 4096 == 0 && c.length % 4096 == 0);
        last_end = c.offset + c.length;
        for v in c.offset / 4096..(c.offset + c.length) / 4096 {
            reported.insert(v, c.kind);
        }
    }
    for (&v, &kind) in &reported {
        let (f, t) = (from.get(&v), to.get(&v));
        assert_ne!(
            f.map(|x| x.0),
            t.map(|x| x.0),
            "{what}: block {v} reported, not written between"
        );
        let want = if t.is_some() {
            ChangeKind::Data
        } else {
            ChangeKind::Zero
        };
        assert_eq!(kind, want, "{what}: block {v} reported as {kind:?}");
    }
    let touched = from.keys().chain(to.keys());
    for v in touched {
        let (f, t) = (from.get(v).map(|x| x.1), to.get(v).map(|x| x.1));
        if f != t {
            assert!(
                reported.contains_key(v),
                "{what}: block {v} changed ({f:?} -> {t:?}) and was not reported"
            );
        }
    }
}

fn run(ops: &[Op], journal: bool) {
    let mut r = Runner::new(journal);
    for op in ops {
        r.apply(op);
    }
    r.check();
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("DIFF_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    #[test]
    fn diff_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops, false);
    }

    #[test]
    fn diff_matches_the_model_with_journals(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops, true);
    }
}

/// A device that counts reads.
struct CountingReads {
    inner: MemDevice,
    reads: AtomicU64,
}

impl BlockDevice for CountingReads {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
}

/// One block changed between two snapshots of a 1 TiB disk whose data is
/// spread over 2,000 leaves: the diff reads the few nodes on the changed
/// path, not the disk's (mutation tried: a walk that descends shared
/// subtrees reads every leaf and fails here).
#[test]
fn the_cost_of_a_diff_follows_the_change() {
    let dev = Arc::new(CountingReads {
        inner: MemDevice::new(256 << 20),
        reads: AtomicU64::new(0),
    });
    let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
    let d = store.create_vdi("big", 1 << 40).unwrap();
    for i in 0..2000u64 {
        d.write(&data(i + 1), i * 504 * 4096 * 131).unwrap();
    }
    d.snapshot(Some("a")).unwrap();
    d.write(&data(9999), 777 * 504 * 4096 * 131).unwrap();
    d.snapshot(Some("b")).unwrap();
    drop(store);
    let store = Store::open(dev.clone(), &OpenOptions::default()).unwrap();
    let (a, b) = (
        store.open_snapshot("big", "a").unwrap(),
        store.open_snapshot("big", "b").unwrap(),
    );
    let before = dev.reads.load(Ordering::SeqCst);
    let got = diff(Some(&a), DiffTarget::Snapshot(&b)).unwrap();
    let reads = dev.reads.load(Ordering::SeqCst) - before;
    assert_eq!(
        got,
        vec![Change {
            offset: 777 * 504 * 4096 * 131,
            length: 4096,
            kind: ChangeKind::Data
        }]
    );
    assert!(reads <= 8, "{reads} device reads for one changed block");
}
