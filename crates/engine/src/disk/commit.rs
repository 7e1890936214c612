//! The commit pipeline: how a disk's changes become durable.
//!
//! ```text
//! nothing changed? ─▶ sync bitmaps (write changed slots, flush) ─▶ return
//! g = header.generation + 1
//! 1. dirty tree nodes ─▶ new blocks (one run of consecutive blocks where
//!    the allocator has one), level 0 first; encoded in memory
//! 2. (snapshot) Taken record with the committed root (or the parent's
//!    root, if nothing changed since); new live root = copy with writable
//!    bits cleared
//! 3. pending log records ─▶ new log head block(s), or a compacted chain
//! ── staged: every block of the commit is encoded, nothing written ──
//! 4. the blocks ─▶ device; bitmaps of extents that allocated ─▶ older
//!    slot; FLUSH
//! 5. header g ─▶ older header slot; FLUSH                ◀── commit point
//! 6. release the blocks the commit stopped referencing
//! ```
//!
//! **Journal mode** (format 2, `tree.rs`): a commit with no dirty node
//! and a journal below its checkpoint length writes no node. Step 1 appends
//! the level-0 entries set since the last commit to the disk's entry
//! journal instead (a copy of the head block with the new records,
//! `journal.rs`), and a snapshot in step 2 is a Taken record naming the base
//! root and the new journal head, the header's root losing its writable bit
//! (nothing is copied). A commit with dirty nodes, or whose journal is long,
//! is a *checkpoint*: the journal is folded into the tree first
//! (`checkpoint_if_due`), the nodes are written as above, the header names
//! no journal, and the old chain's blocks no snapshot holds are freed after
//! step 5. A snapshot's delta is known without a walk when the overlay
//! tracked what changed since the last one.
//!
//! Two ways to run it, both under the disk's `commit` lock from start to
//! end (so the commits of a disk never overlap, and header g+1 is never
//! written before header g is durable):
//!
//! - **Pipelined** ([`Disk::commit_pipelined`], [`Disk::transact_pipelined`]:
//!   flushes, snapshots, schedule ticks, the store's settling). Steps 1–3
//!   and the *adoption* (the live tree becomes the committed one, the
//!   snapshot joins the list) run with the state locked exclusively; then
//!   the state lock is released and steps 4–6 run while reads and writes go
//!   on against the new live tree. The commit's nodes are *staged* in the
//!   node cache (`MetaIo::stage_node`) until they are written, so that a
//!   reader never fetches one from the device before it is there. Writes
//!   made after the adoption belong to the next commit: an in-place write
//!   to a block the adopted tree owns is not made durable by this commit
//!   (nor lost by it: it was never flushed), and everything else they
//!   allocate or free waits for the next one. A FLUSH takes the commit lock
//!   first, so it returns only once every commit adopted before it is
//!   durable. With [`Durability::Deferred`] (a snapshot answered when
//!   taken) the caller gets control back at the adoption: steps 4–6 are
//!   left staged, and whoever takes the commit lock next runs them first
//!   (`Disk::durable`), with the state unlocked.
//! - **Synchronous** ([`Disk::commit`]: transactions that must be undone
//!   if they fail, and `gc`): steps 1–6 with the state locked throughout,
//!   adopting only after step 5.
//!
//! Invariants:
//! - A failure in steps 1–3 changes nothing (the blocks allocated go back).
//! - A failure in step 4 of a synchronous commit gives the blocks back and
//!   leaves every change pending, so the caller can retry; of a pipelined
//!   commit, it keeps the staged commit (`DiskState::staged`), which every
//!   later commit writes first, and the error is reported.
//! - A failure in step 5 poisons the disk (the header may or may not be on
//!   the device).
//! - An operation that changes the state before committing (deletion,
//!   rollback, a schedule tick, grow, set schedule) runs as one
//!   transaction: a savepoint, its in-memory change, the commit; on a
//!   failure before the adoption the state goes back to the savepoint.
//! - Blocks the commit stops referencing are freed (through the pool's one
//!   release path) only after step 5.

use crate::disk::journal;
use crate::disk::log::{self, LogWriter};
use crate::disk::state::{snapshot_version, Disk, DiskState, Exclusive, LiveChain};
use crate::error::{Error, Result};
use crate::lineage::{diff_versions, minus, union, Delta, SnapshotInfo, Version};
use crate::time::now_ns;
use parallax_format::{Block, JournalRecord, LogBlock, NodeBlock, Ptr, VdiHeader, TREE_HEIGHT};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const ROOT_LEVEL: u8 = (TREE_HEIGHT - 1) as u8;

/// Where a synchronous commit writes its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderTo {
    /// The store's device (the write-back log, when it logs).
    Device,
    /// The pool itself, around a write-back log (`Pool::write_through`):
    /// see [`Disk::commit_header_through`].
    PoolAroundLog,
}

/// When a pipelined commit's caller gets control back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Once the commit is durable (its header flushed).
    OnReturn,
    /// Once the commit is adopted in memory: its writes are left staged
    /// (`DiskState::staged`) for whoever takes the commit lock next
    /// ([`crate::Vdi::make_durable`], a FLUSH, any later commit), and a
    /// power cut before then loses it (and nothing flushed).
    Deferred,
}

/// A snapshot for a commit to record.
pub(super) struct NewSnapshot {
    pub id: u64,
    pub name: String,
    pub scheduled: bool,
    /// The identity it is received as (`parallax receive`), 0: its own.
    pub received: u64,
}

/// What steps 1–3 produced: the blocks to write, the header, and what to
/// adopt.
struct Prepared {
    header: VdiHeader,
    blocks: Vec<(u64, Box<Block>)>,
    freed: Vec<u64>,
    new_snapshot: Option<SnapshotInfo>,
    new_log: Option<(LogBlock, u64)>,
    /// Journal mode: the live tree's chain once the commit is durable, and
    /// the blocks of the records it appends, in order.
    journal: Option<LiveChain>,
    journal_records: Vec<u64>,
    /// Journal mode: the commit folded the journal into nodes.
    checkpoint: bool,
    /// Journal mode, a snapshot: its delta to the last one, when the
    /// overlay knows it (see `Overlay::since` in `tree.rs`).
    known_delta: Option<Delta>,
}

/// A commit adopted in memory whose steps 4–6 are still to run (or to run
/// again, after a failure).
pub(crate) struct Staged {
    /// Tree nodes, root copy and log blocks; empty once written.
    blocks: Vec<(u64, Box<Block>)>,
    /// Every block the commit allocated (staged in the node cache until
    /// written).
    allocated: Vec<u64>,
    header: VdiHeader,
    header_addr: u64,
    /// Blocks to release once the header is durable.
    freed: Vec<u64>,
    /// The new snapshot's delta, computed once the commit is written (a
    /// deferred commit: not while its caller waits).
    delta: Option<DeltaJob>,
}

/// A snapshot's delta to record (see [`Disk::delta_to_parent`]).
enum DeltaJob {
    /// Known when the snapshot was taken (journal mode).
    Known { id: u64, delta: Delta },
    /// To walk.
    Walk {
        id: u64,
        version: Version,
        /// The parent's disk (its journal's owner), root and journal head;
        /// `None`: the snapshot derives from an empty disk.
        parent: Option<(u64, Ptr, Ptr)>,
    },
}

/// How steps 4–6 failed.
struct StagedError {
    error: Error,
    /// In step 5: the header may be on the device or not.
    poison: bool,
}

impl Disk {
    /// Runs `change` on the state, then commits it (recording the snapshot
    /// it may return) synchronously, as one transaction: see the module
    /// documentation.
    pub(super) fn transact<T>(
        &self,
        st: &mut Exclusive<'_>,
        change: impl FnOnce(&mut DiskState) -> Result<(T, Option<NewSnapshot>)>,
    ) -> Result<T> {
        self.usable(st)?;
        self.fold_fresh(st)?;
        self.finish_staged(st)?;
        let savepoint = st.savepoint();
        let result = change(st).and_then(|(value, snapshot)| {
            self.commit(st, snapshot)?;
            Ok(value)
        });
        if result.is_err() && !st.poisoned {
            st.restore(&self.pool, savepoint);
        }
        result
    }

    /// [`Disk::transact`], pipelined: the state lock is released once the
    /// change is adopted, before the commit's I/O (see the module
    /// documentation). Returns the change's value and the snapshot taken.
    /// A failure after the adoption does not undo the change: it is kept
    /// and made durable by the next commit.
    pub(super) fn transact_pipelined<T>(
        &self,
        mut ex: Exclusive<'_>,
        durability: Durability,
        change: impl FnOnce(&mut DiskState) -> Result<(T, Option<NewSnapshot>)>,
    ) -> Result<(T, Option<SnapshotInfo>)> {
        let st = &mut *ex;
        self.usable(st)?;
        self.fold_fresh(st)?;
        self.finish_staged(st)?;
        let savepoint = st.savepoint();
        let (value, snapshot) = match change(st) {
            Ok(v) => v,
            Err(e) => {
                st.restore(&self.pool, savepoint);
                return Err(e);
            }
        };
        if !st.has_pending() && snapshot.is_none() {
            drop(ex.st);
            self.pool.sync_bitmaps()?;
            return Ok((value, None));
        }
        let mut allocated = Vec::new();
        let generation = st.header.generation + 1;
        let prepared = self
            .checkpoint_if_due(st)
            .and_then(|()| self.prepare(st, snapshot, generation, &mut allocated));
        let mut prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.pool.free(&allocated);
                st.restore(&self.pool, savepoint);
                return Err(e);
            }
        };
        // Not needed any more, and a copy of the tree it holds would make
        // the next write copy the journal overlay.
        drop(savepoint);
        let header_addr = self.header_addrs[st.next_slot];
        let taken = prepared.new_snapshot.clone();
        let blocks = std::mem::take(&mut prepared.blocks);
        let job = self.adopt(st, &prepared);
        let mut freed = prepared.freed;
        freed.append(&mut st.pending_free);
        let mut staged = Staged {
            blocks,
            allocated,
            header: prepared.header,
            header_addr,
            freed,
            delta: None,
        };
        if durability == Durability::Deferred {
            // Written by whoever takes the commit lock next (see
            // `Disk::durable`), before anything else is committed.
            staged.delta = job;
            st.staged = Some(staged);
            return Ok((value, taken));
        }
        // Reads and writes go on from here; the commit lock stays held.
        let Exclusive { commit, st: guard } = ex;
        drop(guard);
        // Pushed before the commit lock goes: whoever holds the disk
        // exclusively next (reclamation does) has it.
        self.record_delta(job, None);
        let written = self.write_staged(&mut staged);
        let result = match written {
            Ok(()) => Ok((value, taken)),
            Err(StagedError { error, poison }) => {
                // Back in the state before the commit lock goes, so that
                // the next commit writes it first.
                let mut st = self.state.write();
                if poison {
                    st.poisoned = true;
                } else {
                    st.staged = Some(staged);
                }
                Err(error)
            }
        };
        drop(commit);
        result
    }

    /// Commits everything pending, pipelined.
    pub(super) fn commit_pipelined(&self, ex: Exclusive<'_>) -> Result<()> {
        self.transact_pipelined(ex, Durability::OnReturn, |_| Ok(((), None)))
            .map(drop)
    }

    /// Writes the commit left staged (deferred, or failed before), if any,
    /// with the state locked only to take it out and to put it back: reads
    /// and writes go on while it is written. The caller holds the commit
    /// lock.
    pub(super) fn write_staged_unlocked(&self) -> Result<()> {
        let Some(mut staged) = self.state.write().staged.take() else {
            return Ok(());
        };
        self.write_staged(&mut staged)
            .map_err(|StagedError { error, poison }| {
                let mut st = self.state.write();
                if poison {
                    st.poisoned = true;
                } else {
                    st.staged = Some(staged);
                }
                error
            })
    }

    /// Commits everything in `st`, whose locks the caller holds.
    pub(crate) fn commit_held(&self, st: &mut Exclusive<'_>) -> Result<()> {
        self.commit(st, None)
    }

    /// Writes a commit left staged by a failed pipelined one (the caller
    /// holds both locks), before anything else is committed.
    fn finish_staged(&self, st: &mut DiskState) -> Result<()> {
        let Some(mut staged) = st.staged.take() else {
            return Ok(());
        };
        match self.write_staged(&mut staged) {
            Ok(()) => Ok(()),
            Err(StagedError { error, poison }) => {
                if poison {
                    st.poisoned = true;
                } else {
                    st.staged = Some(staged);
                }
                Err(error)
            }
        }
    }

    /// Steps 4–6 of a staged commit.
    fn write_staged(&self, s: &mut Staged) -> std::result::Result<(), StagedError> {
        let started = std::time::Instant::now();
        let meta = self.pool.meta();
        let before_header = |error| StagedError {
            error,
            poison: false,
        };
        if !s.blocks.is_empty() {
            meta.write_all(&mut s.blocks, "tree nodes and snapshot log blocks")
                .map_err(before_header)?;
            s.blocks.clear();
            meta.unstage(&s.allocated);
        }
        self.pool.sync_allocations().map_err(before_header)?;
        // A fenced host writes no header (the staged commit stays: nothing
        // lands, as if the power went).
        self.pool.check_fence().map_err(before_header)?;
        let (block, _) = s.header.encode(meta.store_id, s.header_addr);
        meta.write_block(s.header_addr, &block, "a VDI header")
            .and_then(|_| meta.flush())
            .map_err(|error| StagedError {
                error,
                poison: true,
            })?;
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.pool.free(&std::mem::take(&mut s.freed));
        self.record_delta(s.delta.take(), None);
        crate::observe::commit_written(started.elapsed());
        Ok(())
    }

    /// Commits everything in `st` synchronously and, if `snapshot` is
    /// given, records the committed tree as a snapshot and gives the disk a
    /// fresh shared root.
    pub(super) fn commit(
        &self,
        st: &mut Exclusive<'_>,
        snapshot: Option<NewSnapshot>,
    ) -> Result<()> {
        self.commit_with(st, snapshot, HeaderTo::Device)
    }

    /// [`Disk::commit_header`], the header written straight to the pool
    /// around a write-back log (shared mode: the acquire or takeover
    /// commit). Another host that reads the pool then sees this host's
    /// epoch before this host writes anything of the disk to its log; had
    /// it gone into the log, a crash before its destage would let another
    /// host open the disk as let go, and the replay of the record would
    /// later land over that host's header.
    pub(crate) fn commit_header_through(&self) -> Result<()> {
        let mut st = self.exclusive()?;
        st.header_dirty = true;
        self.commit_with(&mut st, None, HeaderTo::PoolAroundLog)
    }

    /// [`Disk::commit`], the header written as `header_to` says.
    fn commit_with(
        &self,
        st: &mut Exclusive<'_>,
        snapshot: Option<NewSnapshot>,
        header_to: HeaderTo,
    ) -> Result<()> {
        self.usable(st)?;
        self.fold_fresh(st)?;
        self.finish_staged(st)?;
        if !st.has_pending() && snapshot.is_none() {
            // Also makes earlier frees durable in the bitmaps.
            return self.pool.sync_bitmaps();
        }
        let meta = self.pool.meta();
        let generation = st.header.generation + 1;
        let mut allocated = Vec::new();
        self.checkpoint_if_due(st)?;
        let mut prepared = match self.prepare(st, snapshot, generation, &mut allocated) {
            Ok(p) => p,
            Err(e) => {
                self.pool.free(&allocated);
                return Err(e);
            }
        };
        let written = meta
            .write_all(&mut prepared.blocks, "tree nodes and snapshot log blocks")
            .and_then(|_| self.pool.sync_allocations());
        if let Err(e) = written {
            // Written perhaps, but referenced by nothing durable.
            self.pool.free(&allocated);
            return Err(e);
        }
        meta.unstage(&allocated);
        if let Err(e) = self.pool.check_fence() {
            self.pool.free(&allocated);
            return Err(e);
        }
        // The point of no return: the header write may land or not.
        let addr = self.header_addrs[st.next_slot];
        let (block, _) = prepared.header.encode(meta.store_id, addr);
        let written = match header_to {
            // After everything logged before it: the blocks it references
            // and their bitmaps may be records of earlier commits still in
            // the log (a disk whose release could not drain it, reopened).
            HeaderTo::PoolAroundLog => self.pool.write_through(addr, &block, "a VDI header"),
            HeaderTo::Device => meta
                .write_block(addr, &block, "a VDI header")
                .and_then(|_| meta.flush()),
        };
        if let Err(e) = written {
            st.poisoned = true;
            return Err(e);
        }
        self.changes.fetch_add(1, Ordering::SeqCst);
        let job = self.adopt(st, &prepared);
        self.record_delta(job, Some(st));
        let mut to_free = prepared.freed;
        to_free.append(&mut st.pending_free);
        self.pool.free(&to_free);
        Ok(())
    }

    /// The in-memory half of a commit: the live tree becomes the committed
    /// one, the header, log and snapshot list move on. Returns the new
    /// snapshot's delta to compute, if one is kept.
    fn adopt(&self, st: &mut DiskState, p: &Prepared) -> Option<DeltaJob> {
        st.next_slot = 1 - st.next_slot;
        st.tree.apply(p.header.root);
        st.header = p.header.clone();
        st.header_dirty = false;
        st.pending_log.clear();
        if let Some(chain) = &p.journal {
            // The records appended follow the chain's earlier ones (none
            // after a checkpoint).
            let base = chain.len() - p.journal_records.len() as u64;
            st.journal = chain.clone();
            if let Some(o) = st.tree.overlay_mut() {
                o.committed(&p.journal_records, base, p.new_snapshot.is_some());
                if p.checkpoint && p.new_snapshot.is_none() {
                    // Its nodes are not counted in the next snapshot's delta.
                    o.forget_since();
                }
            }
        } else if self.pool.journal_mode() && st.tree.overlay().is_none() {
            // A disk opened before journals were turned on: from its next
            // commit on.
            let tree = std::mem::replace(&mut st.tree, crate::tree::Tree::open(Ptr::NULL));
            st.tree = tree.with_journal(Default::default());
        }
        let mut job = None;
        if let Some(s) = &p.new_snapshot {
            st.snapshots.insert(s.clone());
            job = match (&p.known_delta, st.reclaims()) {
                (Some(delta), true) => Some(DeltaJob::Known {
                    id: s.id,
                    delta: delta.clone(),
                }),
                _ => self.delta_job(st, s.id),
            };
        }
        if let Some((block, records)) = &p.new_log {
            st.log_block = Some(block.clone());
            st.log_records = *records;
        }
        job
    }

    /// Computes a new snapshot's delta (derived data: without it,
    /// reclaiming walks the trees instead) and records it, at once under
    /// the exclusive lock, or (pipelined) in `Disk::deltas`, which every
    /// exclusive holder folds in first.
    fn record_delta(&self, job: Option<DeltaJob>, st: Option<&mut DiskState>) {
        let (id, delta) = match job {
            None => return,
            Some(DeltaJob::Known { id, delta }) => (id, Some(delta)),
            Some(DeltaJob::Walk {
                id,
                version,
                parent,
            }) => (id, self.delta_to_parent(&version, parent).ok()),
        };
        match st {
            Some(st) => st.snapshots.set_delta(id, delta),
            None => self.deltas.lock().push((id, delta)),
        }
    }

    /// Journal mode: folds the overlay into tree nodes when the commit
    /// about to be prepared must be a checkpoint: nodes are dirty (a
    /// promotion, a rollback), or the journal is long.
    fn checkpoint_if_due(&self, st: &mut DiskState) -> Result<()> {
        let Some(o) = st.tree.overlay() else {
            return Ok(());
        };
        // The overlay's size bounds what this commit would append.
        let due = st.tree.has_dirty_nodes()
            || st.journal.len() + o.len() >= self.pool.checkpoint_records();
        if due {
            st.tree.fold_overlay(self.pool.meta())?;
        }
        Ok(())
    }

    /// Steps 1–4, with the nodes, root copy and log block taken from one run
    /// of consecutive blocks where possible (one device write for them all).
    fn prepare(
        &self,
        st: &DiskState,
        snapshot: Option<NewSnapshot>,
        generation: u64,
        allocated: &mut Vec<u64>,
    ) -> Result<Prepared> {
        let pool = &self.pool;
        let journal_blocks = st.tree.overlay().map_or(0, |o| {
            (o.len() as usize).div_ceil(parallax_format::JOURNAL_RECORDS_PER_BLOCK) as u64 + 1
        });
        let mut run =
            VecDeque::from(pool.allocate_run(st.tree.dirty_nodes() as u64 + 2 + journal_blocks));
        let mut allocate = || match run.pop_front() {
            Some(a) => Ok(a),
            None => pool.allocate(0),
        };
        let prepared = self.prepare_with(st, snapshot, generation, allocated, &mut allocate);
        // Never written nor referenced: back at once.
        pool.free(run.make_contiguous());
        prepared
    }

    fn prepare_with(
        &self,
        st: &DiskState,
        snapshot: Option<NewSnapshot>,
        generation: u64,
        allocated: &mut Vec<u64>,
        allocate: &mut dyn FnMut() -> Result<u64>,
    ) -> Result<Prepared> {
        let pool = &*self.pool;
        let meta = pool.meta();
        // Everything the commit writes before its bitmaps, in one batch.
        let mut blocks = Vec::new();
        let plan =
            st.tree
                .write_dirty(meta, self.id, generation, allocate, allocated, &mut blocks)?;
        let (plan_written, plan_replaced) = (plan.written, plan.replaced);
        let mut freed = plan.freed;
        let mut root = plan.root;
        let mut log_entries = st.pending_log.clone();
        let mut new_snapshot = None;
        let mut live_parent = st.header.live_parent;
        let mut journal = None;
        let mut journal_records = Vec::new();
        let mut known_delta = None;
        let mut journal_head = st.header.journal_head;
        let mut checkpoint = false;
        if let Some(o) = st.tree.overlay() {
            let mut chain = st.journal.clone();
            if st.tree.has_dirty_nodes() || (o.len() == 0 && !chain.addrs.is_empty()) {
                // A checkpoint (`checkpoint_if_due` folded the overlay):
                // the chain's blocks no snapshot holds go. The newest
                // snapshot's chain stays known (the next one's delta).
                checkpoint = true;
                freed.extend(minus(&chain.addrs, &chain.sealed_chain));
                chain = LiveChain {
                    sealed_chain: chain.sealed_chain,
                    ..LiveChain::default()
                };
                journal_head = Ptr::NULL;
            } else if o.has_uncommitted() {
                let records: Vec<JournalRecord> = o
                    .uncommitted()
                    .into_iter()
                    .map(|(vblock, ptr)| JournalRecord { vblock, ptr })
                    .collect();
                journal_records = records.iter().map(|r| r.vblock).collect();
                let mut writer = LogWriter {
                    pool,
                    owner: self.id,
                    generation,
                    allocate: &mut *allocate,
                    allocated: &mut *allocated,
                    out: &mut blocks,
                };
                let (head_ptr, head, written) =
                    journal::append(&mut writer, chain.head_ptr, chain.head.as_ref(), &records)?;
                if chain.head.as_ref().is_some_and(|h| !h.is_full()) {
                    // The old head was copied: no longer in the live chain.
                    let old = chain.head_ptr.addr();
                    chain.addrs.retain(|&a| a != old);
                    if chain.sealed_chain.binary_search(&old).is_err() {
                        freed.push(old);
                    }
                }
                chain.addrs = union(&chain.addrs, &written);
                chain.head_ptr = head_ptr;
                chain.head = Some(head);
                journal_head = head_ptr;
            }
            if snapshot.is_some() {
                // Against the last snapshot: the data changed since, the
                // journal blocks, and a checkpoint's nodes (the tree the
                // snapshot shared was the committed one: a checkpoint with
                // no snapshot forgets the delta, see `adopt`).
                if let Some((mut born, mut dead)) = st.tree.delta_since_snapshot(pool.meta())? {
                    if checkpoint {
                        born = union(&born, &plan_written);
                        dead = union(&dead, &plan_replaced);
                    }
                    known_delta = Some(Delta {
                        born: union(&born, &minus(&chain.addrs, &st.journal.sealed_chain)),
                        dead: union(&dead, &minus(&st.journal.sealed_chain, &chain.addrs)),
                    });
                }
            }
            if snapshot.is_some() {
                chain.sealed_chain = chain.addrs.clone();
            }
            journal = Some(chain);
        }
        if let (
            Some(NewSnapshot {
                id,
                name,
                scheduled,
                received,
            }),
            true,
        ) = (&snapshot, journal.is_some())
        {
            // Journal mode: the snapshot is the base tree plus the chain as
            // it now stands, both shared with the live tree from here on
            // (nothing is copied).
            root = root.shared();
            let info = SnapshotInfo {
                id: *id,
                name: name.clone(),
                created_ns: now_ns(),
                size_bytes: st.size,
                scheduled: *scheduled,
                root,
                journal: journal_head,
                parent: live_parent,
                hidden: false,
                received: *received,
            };
            log_entries.push(info.record());
            live_parent = *id;
            new_snapshot = Some(info);
        } else if let Some(NewSnapshot {
            id,
            name,
            scheduled,
            received,
        }) = snapshot
        {
            // Nothing changed since the parent snapshot: share its root.
            // Otherwise the committed root becomes the snapshot's, and the
            // disk gets a copy whose pointers are all shared.
            let unchanged = self.unchanged_since_parent(st)?;
            let info = SnapshotInfo {
                id,
                name,
                created_ns: now_ns(),
                size_bytes: st.size,
                scheduled,
                root: unchanged.unwrap_or(root),
                journal: Ptr::NULL,
                parent: live_parent,
                hidden: false,
                received,
            };
            log_entries.push(info.record());
            live_parent = id;
            new_snapshot = Some(info);
            if unchanged.is_none() {
                let node = meta.load_node(root, ROOT_LEVEL)?;
                let copy = NodeBlock {
                    level: node.level,
                    entries: node.entries.iter().map(|p| p.shared()).collect(),
                };
                let addr = allocate()?;
                allocated.push(addr);
                let (block, crc) = copy.encode(meta.store_id, addr, self.id, generation);
                blocks.push((addr, block));
                meta.stage_node(addr, Arc::new(copy), crc);
                root = Ptr::meta(addr, crc, true);
            }
        }
        let mut header = st.header.clone();
        header.generation = generation;
        if self.writer_epoch() != 0 {
            header.writer_epoch = self.writer_epoch();
            header.writer_host = pool.coordinator().map_or(0, |c| c.host_id());
        }
        header.root = root;
        header.journal_head = journal_head;
        header.size_bytes = st.size;
        header.live_parent = live_parent;
        let mut new_log = None;
        let kept = st.snapshots.len() as u64 + u64::from(new_snapshot.is_some());
        let mut writer = LogWriter {
            pool,
            owner: self.id,
            generation,
            allocate,
            allocated,
            out: &mut blocks,
        };
        if !log_entries.is_empty() && st.log_records + log_entries.len() as u64 > 2 * kept + 96 {
            // Compaction: most records are history. Rewrite the log as one
            // Taken record per kept snapshot and free the old chain. Cost
            // grows with the snapshots kept, and it happens only after at
            // least as many records were appended since the last time.
            let mut records = st.snapshots.records();
            records.extend(new_snapshot.as_ref().map(SnapshotInfo::record));
            let (head, block) = log::write_chain(&mut writer, Ptr::NULL, None, &records)?;
            for (addr, _) in log::read_chain(pool, st.header.log_head, self.id)? {
                freed.push(addr);
            }
            header.log_head = head;
            new_log = Some((block, records.len() as u64));
        } else if !log_entries.is_empty() {
            let (head, block, mut log_freed) = log::append(&mut writer, st, &log_entries)?;
            header.log_head = head;
            new_log = Some((block, st.log_records + log_entries.len() as u64));
            freed.append(&mut log_freed);
        }
        header.snapshot_count =
            st.snapshots.visible_len() as u64 + u64::from(new_snapshot.is_some());
        header.next_snapshot_id = header
            .next_snapshot_id
            .max(new_snapshot.as_ref().map_or(0, |s| s.id + 1));
        Ok(Prepared {
            header,
            blocks,
            freed,
            new_snapshot,
            new_log,
            journal,
            journal_records,
            checkpoint,
            known_delta,
        })
    }

    /// The root of the live tree's parent snapshot, if the live tree holds
    /// exactly what that snapshot holds (nothing written since, nothing
    /// pending): a new snapshot can then share that root instead of
    /// copying one, so that snapshots of an idle disk cost a log record.
    fn unchanged_since_parent(&self, st: &DiskState) -> Result<Option<Ptr>> {
        if !st.reclaims() || st.tree.is_dirty() || st.tree.root().is_null() {
            return Ok(None);
        }
        let Some(parent) = st.snapshots.get(st.header.live_parent) else {
            return Ok(None);
        };
        if parent.size_bytes != st.size {
            return Ok(None);
        }
        let meta = self.pool.meta();
        let live = meta.load_node(st.tree.root(), ROOT_LEVEL)?;
        let snap = meta.load_node(parent.root, ROOT_LEVEL)?;
        // The live root is a copy of the parent's with every bit cleared;
        // any write since changed an entry (new blocks, or promotions).
        let same = live
            .entries
            .iter()
            .zip(snap.entries.iter())
            .all(|(l, p)| *l == p.shared());
        Ok(same.then_some(parent.root))
    }

    /// What [`Disk::delta_to_parent`] needs of the state for snapshot
    /// `id`: `None` when no delta is kept.
    fn delta_job(&self, st: &DiskState, id: u64) -> Option<DeltaJob> {
        if !st.reclaims() {
            return None;
        }
        let s = st.snapshots.get(id)?;
        let parent = if s.parent == 0 {
            match st.origin {
                crate::disk::state::Origin::Root { root, journal, .. } => {
                    Some((st.header.origin_vdi, root, journal))
                }
                _ => None,
            }
        } else {
            let p = st.snapshots.get(s.parent)?;
            Some((self.id, p.root, p.journal))
        };
        // Taken just now: a journal snapshot holds what the live tree does.
        let version = if s.journal.is_null() {
            Version::tree(s.root)
        } else {
            Version {
                root: s.root,
                ..st.live_version()
            }
        };
        Some(DeltaJob::Walk {
            id,
            version,
            parent,
        })
    }

    /// The delta of a snapshot to its parent (see `lineage.rs`), walked
    /// while both trees' nodes are likely cached: right after it is taken.
    /// Reads immutable trees and journals only: no lock needed.
    fn delta_to_parent(&self, version: &Version, parent: Option<(u64, Ptr, Ptr)>) -> Result<Delta> {
        let Some((owner, root, journal)) = parent else {
            return Ok(Delta::default());
        };
        let parent = snapshot_version(&self.pool, owner, root, journal)?;
        let mut delta = Delta::default();
        diff_versions(
            self.pool.meta(),
            version,
            &parent,
            &mut |a| delta.born.push(a),
            &mut |a| delta.dead.push(a),
        )?;
        for list in [&mut delta.born, &mut delta.dead] {
            list.sort_unstable();
            list.dedup();
        }
        Ok(delta)
    }

    /// Takes the snapshot `new`, committing everything pending with it
    /// (pipelined).
    pub(super) fn take_snapshot(
        &self,
        ex: Exclusive<'_>,
        new: NewSnapshot,
        durability: Durability,
    ) -> Result<SnapshotInfo> {
        let (_, taken) = self.transact_pipelined(ex, durability, |_| Ok(((), Some(new))))?;
        taken.ok_or_else(|| Error::Inconsistent("a snapshot commit recorded no snapshot".into()))
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{CreateOptions, Store};
    use crate::Error;
    use parallax_device::{CrashDevice, Fault};
    use std::sync::Arc;

    /// A FLUSH waits for the commit in flight (held here by taking its
    /// lock): that commit's adopted tree may hold writes completed before
    /// the FLUSH, durable only once its header is. This holds even when
    /// the FLUSH itself has nothing to commit.
    #[test]
    fn a_flush_waits_for_the_commit_in_flight() {
        let store = Store::create(
            Arc::new(parallax_device::MemDevice::new(16 << 20)),
            &CreateOptions::default(),
        )
        .unwrap();
        let d = store.create_vdi("d", 1 << 20).unwrap();
        d.write(&[1; 4096], 0).unwrap();
        d.flush().unwrap();
        let in_flight = d.disk().commit.lock();
        let (tx, rx) = std::sync::mpsc::channel();
        let d2 = d.clone();
        let t = std::thread::spawn(move || tx.send(d2.flush().is_ok()).unwrap());
        let early = rx.recv_timeout(std::time::Duration::from_millis(200));
        drop(in_flight);
        assert!(
            early.is_err(),
            "a FLUSH returned while a commit was in flight"
        );
        assert!(rx.recv().unwrap(), "the FLUSH failed");
        t.join().unwrap();
    }

    /// A deferred snapshot returns with nothing written nor flushed; it is
    /// listed and readable at once; writes after it are made against the
    /// new live tree; a power cut before anything commits the disk loses
    /// it; a FLUSH makes it durable, with its own content.
    #[test]
    fn a_deferred_snapshot_is_durable_after_the_next_flush() {
        use crate::{Durability, OpenOptions, ReadDisk};
        let dev = Arc::new(CrashDevice::new(16 << 20));
        let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
        let d = store.create_vdi("d", 1 << 20).unwrap();
        d.write(&[1; 4096], 0).unwrap();
        d.flush().unwrap();
        let before = dev.counters();
        d.snapshot_with(Some("s"), Durability::Deferred).unwrap();
        assert_eq!(dev.counters(), before, "a deferred snapshot wrote");
        d.write(&[2; 4096], 0).unwrap();
        let view = store.open_snapshot("d", "s").unwrap();
        let mut b = vec![0u8; 4096];
        view.read(&mut b, 0).unwrap();
        assert_eq!(b, vec![1; 4096], "the snapshot moved with the disk");
        drop(view);

        let lost = Store::open(
            Arc::new(parallax_device::MemDevice::from_bytes(dev.durable_image())),
            &OpenOptions::default(),
        )
        .unwrap();
        assert!(
            lost.open_vdi("d").unwrap().snapshot_info("s").is_err(),
            "nothing was written, yet the snapshot is on the device"
        );

        d.flush().unwrap();
        let kept = Store::open(
            Arc::new(parallax_device::MemDevice::from_bytes(dev.durable_image())),
            &OpenOptions::default(),
        )
        .unwrap();
        let view = kept.open_snapshot("d", "s").unwrap();
        view.read(&mut b, 0).unwrap();
        assert_eq!(
            b,
            vec![1; 4096],
            "the durable snapshot holds the wrong data"
        );
        kept.open_vdi("d").unwrap().read(&mut b, 0).unwrap();
        assert_eq!(b, vec![2; 4096], "the flushed write is not durable");
        assert!(kept.check().unwrap().is_clean());
    }

    /// A transaction whose commit fails before its header goes back to its
    /// savepoint: the in-memory change is undone, and the disk works on.
    #[test]
    fn a_failed_transaction_leaves_the_state_as_before() {
        let dev = Arc::new(CrashDevice::new(16 << 20));
        let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
        let d = store.create_vdi("d", 1 << 20).unwrap();
        d.write(&[1; 4096], 0).unwrap();
        d.snapshot(Some("s")).unwrap();
        d.write(&[2; 4096], 0).unwrap();
        dev.inject(Fault::WriteEio { after_writes: 0 });
        let grown = d.grow(2 << 20);
        assert!(matches!(grown, Err(Error::Io { .. })), "{grown:?}");
        assert_eq!(d.size(), 1 << 20, "a failed grow changed the size");
        dev.inject(Fault::WriteEio { after_writes: 0 });
        assert!(d.rollback("s").is_err());
        let mut b = vec![0u8; 4096];
        d.read(&mut b, 0).unwrap();
        assert_eq!(b, vec![2; 4096], "a failed rollback changed the content");
        assert_eq!(d.info().snapshot_count, 1);
        // The disk works on, and the same changes go through.
        d.grow(2 << 20).unwrap();
        d.rollback("s").unwrap();
        d.read(&mut b, 0).unwrap();
        assert_eq!(b, vec![1; 4096]);
        assert!(store.check().unwrap().is_clean());
    }
}
