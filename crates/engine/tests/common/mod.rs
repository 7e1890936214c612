//! Shared by the model, crash and corruption tests: operations, an in-memory model of
//! what every disk and snapshot must contain, and a runner applying the
//! same operation to the store and to the model.

#![allow(dead_code)]

pub mod gate;

use parallax_engine::{Durability, Error, ReadDisk, Schedule, Store, Vdi};
use std::collections::BTreeMap;

pub const BLOCK: usize = 4096;

/// One step of a test sequence. Disk and snapshot choices are indexes,
/// resolved modulo what exists when the step runs.
#[derive(Debug, Clone)]
pub enum Op {
    Create {
        blocks: u8,
    },
    Write {
        disk: u8,
        offset: u32,
        len: u16,
        seed: u8,
    },
    Discard {
        disk: u8,
        offset: u32,
        len: u32,
    },
    WriteZeroes {
        disk: u8,
        offset: u32,
        len: u32,
    },
    Flush {
        disk: u8,
    },
    Snapshot {
        disk: u8,
    },
    /// A snapshot that returns before it is durable; made durable at once
    /// (`make_durable`) when `then_durable`, else left for whatever commits
    /// the disk next.
    SnapshotDeferred {
        disk: u8,
        then_durable: bool,
    },
    Clone {
        disk: u8,
        snap: u8,
    },
    Rollback {
        disk: u8,
        snap: u8,
    },
    DeleteSnapshot {
        disk: u8,
        snap: u8,
    },
    DeleteDisk {
        disk: u8,
    },
    Grow {
        disk: u8,
        blocks: u8,
    },
    /// One tick of a snapshot schedule keeping the newest `keep % 4 + 1`
    /// scheduled snapshots: a scheduled snapshot, then a retention pass.
    ScheduleTick {
        disk: u8,
        keep: u8,
    },
    /// Mark and sweep.
    Gc,
    /// Flush everything, then reopen the store from the device.
    Reopen,
    /// Drop every handle the test holds (pending writes included); later
    /// ops open them again.
    DropHandles,
    /// The store's upkeep with no idle threshold: every disk with pending
    /// changes is committed, every disk without handles let go.
    Settle,
    /// Drop every handle and the store itself, without a flush, then reopen
    /// from the device: nothing may be lost or leaked.
    DropStore,
}

/// What a disk must contain.
#[derive(Debug, Clone, Default)]
pub struct DiskModel {
    pub data: Vec<u8>,
    /// Content as of the last commit of this disk (crash tests).
    pub committed: Vec<u8>,
    /// Per block, every content written since the last commit (crash tests).
    pub pending: BTreeMap<usize, Vec<Vec<u8>>>,
    pub snapshots: Vec<(String, Vec<u8>)>,
    /// Names of the snapshots a schedule took (retention may delete them).
    pub scheduled: Vec<String>,
    /// Snapshots taken deferred and perhaps not durable yet: a power cut
    /// may lose them (crash tests).
    pub unsure: Vec<String>,
}

impl DiskModel {
    fn new(len: usize) -> Self {
        DiskModel {
            data: vec![0; len],
            committed: vec![0; len],
            ..Default::default()
        }
    }

    fn commit(&mut self) {
        self.committed = self.data.clone();
        self.pending.clear();
        self.unsure.clear();
    }

    /// Records, before the store is asked, what the blocks overlapping a
    /// range will contain if the change lands, and returns that content.
    fn will_write(&mut self, offset: usize, new: &[u8]) -> Vec<u8> {
        let mut data = self.data.clone();
        data[offset..offset + new.len()].copy_from_slice(new);
        if !new.is_empty() {
            for b in offset / BLOCK..(offset + new.len()).div_ceil(BLOCK) {
                let content = data[b * BLOCK..(b + 1) * BLOCK].to_vec();
                self.pending.entry(b).or_default().push(content);
            }
        }
        data
    }

    /// Whether `actual` is a content the disk may have after a power cut:
    /// each half-block equals that half of the committed content or of some
    /// content written since.
    pub fn crash_acceptable(&self, actual: &[u8]) -> Result<(), String> {
        for (b, chunk) in actual.chunks(BLOCK).enumerate() {
            let committed = self.committed.get(b * BLOCK..(b + 1) * BLOCK);
            for h in 0..2 {
                let r = h * BLOCK / 2..(h + 1) * BLOCK / 2;
                let ok = committed.is_some_and(|c| c[r.clone()] == chunk[r.clone()])
                    || self
                        .pending
                        .get(&b)
                        .is_some_and(|v| v.iter().any(|c| c[r.clone()] == chunk[r.clone()]));
                if !ok {
                    return Err(format!("block {b} half {h} matches nothing written"));
                }
            }
        }
        Ok(())
    }
}

/// A management operation that was under way when the power went.
#[derive(Debug, Clone)]
pub enum InFlight {
    NewSnapshot {
        disk: String,
        name: String,
        content: Vec<u8>,
    },
    DeletedSnapshot {
        disk: String,
        name: String,
        content: Vec<u8>,
    },
    NewDisk {
        name: String,
        content: Vec<u8>,
    },
    DeletedDisk {
        name: String,
    },
    /// A schedule tick: a new snapshot (name unknown beforehand) holding
    /// `content`, and the deletion of `expired`.
    Tick {
        disk: String,
        content: Vec<u8>,
        expired: Vec<String>,
    },
}

/// The model of the whole store.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub disks: BTreeMap<String, DiskModel>,
    pub next_disk: u32,
    pub next_snap: u32,
}

pub fn pattern(seed: u8, offset: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((offset + i) as u32)
                .wrapping_mul(31)
                .wrapping_add(seed as u32 * 101) as u8
                | 1
        })
        .collect()
}

/// A throwaway store, to stand in while the real one is dropped.
fn placeholder_store() -> Store {
    let dev = std::sync::Arc::new(parallax_device::MemDevice::new(1 << 20));
    Store::create(dev, &parallax_engine::CreateOptions::default()).unwrap()
}

/// Writes whole blocks through an I/O plan when the engine gives one (else
/// through `write`). With `succeeds` false the plan is finished as failed
/// before any transfer (its new blocks go back to the pool) and the data
/// is written again with `write`.
pub fn write_planned(
    h: &Vdi,
    data: &[u8],
    offset: u64,
    succeeds: bool,
    planned: &mut u64,
) -> Result<(), Error> {
    let plan = h.try_plan_write(offset, data.len())?;
    *planned += u64::from(plan.is_some());
    match plan {
        Some(plan) if succeeds => {
            let mut buf = data.to_vec();
            let done = plan.execute(&mut buf, true);
            plan.finish(done.is_ok());
            if let Err(e) = done {
                // A power cut under the transfer, in the crash tests.
                return Err(Error::Io {
                    context: "a planned write".into(),
                    error: e,
                });
            }
            Ok(())
        }
        Some(plan) => {
            plan.finish(false);
            h.write(data, offset)
        }
        None => h.write(data, offset),
    }
}

/// Reads through an I/O plan when the engine gives one; `None` otherwise.
pub fn read_planned(r: &dyn ReadDisk, len: usize) -> Option<Vec<u8>> {
    let plan = r.try_plan_read(0, len).unwrap()?;
    let mut buf = vec![0xeeu8; len];
    plan.execute(&mut buf, false).unwrap();
    plan.finish(true);
    Some(buf)
}

fn pick<T: Clone>(items: &[T], i: u8) -> Option<T> {
    (!items.is_empty()).then(|| items[i as usize % items.len()].clone())
}

/// Applies `op` to the store and to the model. Returns the engine's error
/// if the store failed (the model is then left as before the op, except
/// for what `uncertain` describes to the caller).
pub struct Runner {
    pub store: Store,
    pub model: Model,
    pub handles: BTreeMap<String, Vdi>,
    pub in_flight: Option<InFlight>,
    /// Reads `verify_exact` also made through an I/O plan.
    pub planned_reads: u64,
    /// Writes made through an I/O plan.
    pub planned_writes: u64,
    /// Disks with an odd number get the write-back policy when created.
    pub write_back_odd: bool,
    /// `Op::Reopen` lets the store go as a killed process would (after its
    /// flush): what a write-back log holds must come back by replay.
    pub abandon_on_reopen: bool,
}

impl Runner {
    pub fn new(store: Store) -> Self {
        Runner {
            store,
            model: Model::default(),
            handles: BTreeMap::new(),
            in_flight: None,
            planned_reads: 0,
            planned_writes: 0,
            write_back_odd: false,
            abandon_on_reopen: false,
        }
    }

    /// The policy `write_back_odd` gives disk number `n`.
    fn new_disk_policy(&self, h: &Vdi, n: u32) -> Result<(), Error> {
        if self.write_back_odd && n % 2 == 1 {
            h.set_cache_policy(parallax_engine::CachePolicy::WriteBack)?;
            self.store.refresh_write_back()?;
        }
        Ok(())
    }

    fn disk_names(&self) -> Vec<String> {
        self.model.disks.keys().cloned().collect()
    }

    fn handle(&mut self, name: &str) -> Result<Vdi, Error> {
        if let Some(h) = self.handles.get(name) {
            return Ok(h.clone());
        }
        let h = self.store.open_vdi(name)?;
        self.handles.insert(name.to_string(), h.clone());
        Ok(h)
    }

    /// Runs one op. `reopen` is called for `Op::Reopen` to build a new store
    /// from the device after everything was flushed.
    pub fn apply(&mut self, op: &Op, reopen: &mut dyn FnMut() -> Store) -> Result<(), Error> {
        let names = self.disk_names();
        match *op {
            Op::Create { blocks } => {
                let name = format!("d{}", self.model.next_disk);
                self.model.next_disk += 1;
                let len = (blocks as usize % 24 + 1) * BLOCK;
                self.in_flight = Some(InFlight::NewDisk {
                    name: name.clone(),
                    content: vec![0; len],
                });
                let h = self.store.create_vdi(&name, len as u64)?;
                self.new_disk_policy(&h, self.model.next_disk - 1)?;
                self.handles.insert(name.clone(), h);
                self.model.disks.insert(name, DiskModel::new(len));
            }
            Op::Write {
                disk,
                offset,
                len,
                seed,
            } => {
                let Some(name) = pick(&names, disk) else {
                    return Ok(());
                };
                let h = self.handle(&name)?;
                let m = &self.model.disks[&name];
                let size = m.data.len();
                let offset = offset as usize % size;
                let len = (len as usize % (3 * BLOCK)).min(size - offset);
                // A quarter of the writes are block-aligned and go through a
                // plan (the daemon's io_uring path, here carried by the
                // device's own calls); another quarter are planned, then
                // "fail" before any transfer (their blocks go back) and are
                // written again on the blocking path, as the server does.
                let planned = match seed % 4 {
                    0 => Some(true),
                    1 => Some(false),
                    _ => None,
                };
                let (offset, len) = match planned {
                    Some(_) => {
                        let start = offset / BLOCK * BLOCK;
                        let end = (offset + len.max(1)).div_ceil(BLOCK) * BLOCK;
                        (start, end.min(size) - start)
                    }
                    None => (offset, len),
                };
                let data = pattern(seed, offset, len);
                let m = self.model.disks.get_mut(&name).unwrap();
                let after = m.will_write(offset, &data);
                match planned {
                    Some(succeeds) => {
                        write_planned(&h, &data, offset as u64, succeeds, &mut self.planned_writes)?
                    }
                    None => h.write(&data, offset as u64)?,
                }
                self.model.disks.get_mut(&name).unwrap().data = after;
            }
            Op::Discard { disk, offset, len } | Op::WriteZeroes { disk, offset, len } => {
                let Some(name) = pick(&names, disk) else {
                    return Ok(());
                };
                let h = self.handle(&name)?;
                let size = self.model.disks[&name].data.len();
                let offset = offset as usize % size;
                let len = (len as usize % (6 * BLOCK)).min(size - offset);
                let zero_edges = matches!(op, Op::WriteZeroes { .. });
                let (start, end) = if zero_edges {
                    (offset, offset + len)
                } else {
                    (
                        offset.div_ceil(BLOCK) * BLOCK,
                        (offset + len) / BLOCK * BLOCK,
                    )
                };
                let m = self.model.disks.get_mut(&name).unwrap();
                let after = m.will_write(start, &vec![0; end.saturating_sub(start)]);
                if zero_edges {
                    h.write_zeroes(offset as u64, len as u64)?;
                } else {
                    h.discard(offset as u64, len as u64)?;
                }
                self.model.disks.get_mut(&name).unwrap().data = after;
            }
            Op::Flush { disk } => {
                let Some(name) = pick(&names, disk) else {
                    return Ok(());
                };
                self.handle(&name)?.flush()?;
                self.model.disks.get_mut(&name).unwrap().commit();
            }
            Op::Snapshot { disk } => {
                let Some(name) = pick(&names, disk) else {
                    return Ok(());
                };
                let snap = format!("s{}", self.model.next_snap);
                self.model.next_snap += 1;
                self.in_flight = Some(InFlight::NewSnapshot {
                    disk: name.clone(),
                    name: snap.clone(),
                    content: self.model.disks[&name].data.clone(),
                });
                self.handle(&name)?.snapshot(Some(&snap))?;
                let m = self.model.disks.get_mut(&name).unwrap();
                m.commit();
                let content = m.data.clone();
                m.snapshots.push((snap, content));
            }
            Op::SnapshotDeferred { disk, then_durable } => {
                let Some(name) = pick(&names, disk) else {
                    return Ok(());
                };
                let snap = format!("s{}", self.model.next_snap);
                self.model.next_snap += 1;
                let content = self.model.disks[&name].data.clone();
                self.in_flight = Some(InFlight::NewSnapshot {
                    disk: name.clone(),
                    name: snap.clone(),
                    content: content.clone(),
                });
                let h = self.handle(&name)?;
                h.snapshot_with(Some(&snap), Durability::Deferred)?;
                // From here the model knows it (as perhaps not durable).
                self.in_flight = None;
                let m = self.model.disks.get_mut(&name).unwrap();
                m.snapshots.push((snap.clone(), content));
                // Listed and readable at once, durable or not.
                m.unsure.push(snap);
                if then_durable {
                    h.make_durable()?;
                    // No write came between: the snapshot's content is
                    // the disk's.
                    self.model.disks.get_mut(&name).unwrap().commit();
                }
            }
            Op::Clone { disk, snap } => {
                let Some(name) = pick(&names, disk) else {
                    return Ok(());
                };
                let Some((snap, content)) = pick(&self.model.disks[&name].snapshots, snap) else {
                    return Ok(());
                };
                let new = format!("d{}", self.model.next_disk);
                self.model.next_disk += 1;
                self.in_flight = Some(InFlight::NewDisk {
                    name: new.clone(),
                    content: content.clone(),
                });
                let h = self.store.clone_snapshot(&name, &snap, &new)?;
                self.new_disk_policy(&h, self.model.next_disk - 1)?;
                // The origin's adopted commits are durable before a clone.
                self.model.disks.get_mut(&name).unwrap().unsure.clear();
                self.handles.insert(new.clone(), h);
                let mut m = DiskModel::new(content.len());
                m.data = content.clone();
                m.committed = content;
                self.model.disks.insert(new, m);
            }
            Op::Rollback { disk, snap } => {
                let Some(name) = pick(&names, disk) else {
                    return Ok(());
                };
                let Some((snap, content)) = pick(&self.model.disks[&name].snapshots, snap) else {
                    return Ok(());
                };
                self.handle(&name)?.rollback(&snap)?;
                let m = self.model.disks.get_mut(&name).unwrap();
                m.data = content;
                m.commit();
            }
            Op::DeleteSnapshot { disk, snap } => {
                let Some(name) = pick(&names, disk) else {
                    return Ok(());
                };
                let Some((snap, content)) = pick(&self.model.disks[&name].snapshots, snap) else {
                    return Ok(());
                };
                self.in_flight = Some(InFlight::DeletedSnapshot {
                    disk: name.clone(),
                    name: snap.clone(),
                    content,
                });
                self.handle(&name)?.delete_snapshot(&snap)?;
                let m = self.model.disks.get_mut(&name).unwrap();
                m.snapshots.retain(|(s, _)| *s != snap);
                m.scheduled.retain(|s| *s != snap);
                m.commit();
            }
            Op::DeleteDisk { disk } => {
                let Some(name) = pick(&names, disk) else {
                    return Ok(());
                };
                self.in_flight = Some(InFlight::DeletedDisk { name: name.clone() });
                match self.store.delete_vdi(&name) {
                    // Refused while clones of it exist: nothing changed.
                    Err(Error::Busy(_)) => return Ok(()),
                    r => r?,
                }
                self.handles.remove(&name);
                self.model.disks.remove(&name);
            }
            Op::Grow { disk, blocks } => {
                let Some(name) = pick(&names, disk) else {
                    return Ok(());
                };
                let h = self.handle(&name)?;
                let len = self.model.disks[&name].data.len() + (blocks as usize % 4) * BLOCK;
                h.grow(len as u64)?;
                let m = self.model.disks.get_mut(&name).unwrap();
                m.data.resize(len, 0);
                m.commit();
            }
            Op::ScheduleTick { disk, keep } => {
                let Some(name) = pick(&names, disk) else {
                    return Ok(());
                };
                let keep = keep as usize % 4 + 1;
                let h = self.handle(&name)?;
                let m = &self.model.disks[&name];
                // The newest `keep` scheduled ones stay, the new one included.
                let expired: Vec<String> =
                    m.scheduled.iter().rev().skip(keep - 1).cloned().collect();
                self.in_flight = Some(InFlight::Tick {
                    disk: name.clone(),
                    content: m.data.clone(),
                    expired: expired.clone(),
                });
                let schedule = Schedule {
                    every_ns: 1_000_000,
                    keep_last: keep as u32,
                    ..Schedule::default()
                };
                // Unchanged schedules are not set again, so that ticks also
                // run with uncommitted writes pending.
                if h.schedule() != schedule {
                    h.set_schedule(schedule)?;
                    self.model.disks.get_mut(&name).unwrap().commit();
                }
                let (snap, report) = h.schedule_tick()?.expect("the schedule is on");
                assert_eq!(report.deleted, expired.len() as u64, "retention of {name}");
                let m = self.model.disks.get_mut(&name).unwrap();
                let content = m.data.clone();
                m.snapshots.push((snap.name.clone(), content));
                m.snapshots.retain(|(s, _)| !expired.contains(s));
                m.scheduled.push(snap.name);
                m.scheduled.retain(|s| !expired.contains(s));
            }
            Op::Gc => {
                self.store.gc()?;
                for m in self.model.disks.values_mut() {
                    m.commit();
                }
            }
            Op::Reopen => {
                self.in_flight = None;
                self.store.flush_all()?;
                for m in self.model.disks.values_mut() {
                    m.commit();
                }
                self.handles.clear();
                // The old store goes first: a write-back log is opened by
                // one store at a time.
                let old = std::mem::replace(&mut self.store, placeholder_store());
                if self.abandon_on_reopen {
                    old.abandon();
                } else {
                    drop(old);
                }
                self.store = reopen();
            }
            Op::DropHandles => self.handles.clear(),
            Op::Settle => {
                let zero = std::time::Duration::ZERO;
                self.store.settle(zero, zero)?;
                for m in self.model.disks.values_mut() {
                    m.commit();
                }
            }
            Op::DropStore => {
                self.in_flight = None;
                self.handles.clear();
                // Dropping the last handle on a store commits its disks.
                drop(std::mem::replace(&mut self.store, placeholder_store()));
                for m in self.model.disks.values_mut() {
                    m.commit();
                }
                self.store = reopen();
            }
        }
        self.in_flight = None;
        Ok(())
    }

    /// Reads every disk and snapshot back and compares with the model.
    pub fn verify_exact(&mut self) {
        for (name, m) in self.model.disks.clone() {
            let h = self.handle(&name).unwrap();
            assert_eq!(h.size(), m.data.len() as u64, "size of {name}");
            let mut buf = vec![0u8; m.data.len()];
            h.read(&mut buf, 0).unwrap();
            if let Some(i) = (0..buf.len()).find(|&i| buf[i] != m.data[i]) {
                panic!(
                    "disk {name} differs from the model at byte {i}: {} != {}",
                    buf[i], m.data[i]
                );
            }
            if let Some(planned) = read_planned(&h, buf.len()) {
                assert!(planned == m.data, "a planned read of {name} differs");
                self.planned_reads += 1;
            }
            // The mapped count (info) agrees with block status's extents.
            let mapped: u64 = h
                .block_status(0, h.size())
                .unwrap()
                .iter()
                .filter(|e| e.allocated)
                .map(|e| e.length)
                .sum();
            assert_eq!(
                h.allocated_bytes().unwrap(),
                mapped,
                "allocated bytes of {name}"
            );
            let snaps: Vec<String> = h.snapshots().into_iter().map(|s| s.name).collect();
            let expected: Vec<String> = m.snapshots.iter().map(|(s, _)| s.clone()).collect();
            assert_eq!(snaps, expected, "snapshot list of {name}");
            for (snap, content) in &m.snapshots {
                let view = self.store.open_snapshot(&name, snap).unwrap();
                let mut buf = vec![0u8; content.len()];
                view.read(&mut buf, 0).unwrap();
                assert!(
                    buf == *content,
                    "content of {name}@{snap} differs from the model"
                );
                if let Some(planned) = read_planned(&view, buf.len()) {
                    assert!(
                        planned == *content,
                        "a planned read of {name}@{snap} differs"
                    );
                    self.planned_reads += 1;
                }
            }
        }
        let mut names = self.store.list();
        names.sort();
        let expected: Vec<String> = self.model.disks.keys().cloned().collect();
        assert_eq!(names, expected);
    }
}

/// Property-test cases to run: `PROPTEST_CASES` overrides the count CI
/// runs (long runs by hand).
pub fn proptest_cases(ci: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci)
}
