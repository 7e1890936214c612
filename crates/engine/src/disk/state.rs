//! One open disk's state and its locks.
//!
//! [`Disk`] is what the store owns for each open disk (handles share it):
//! the live [`Tree`], the last committed header, the snapshot list and what
//! the next commit must add or free, behind a read-write lock; beside it a
//! small [`Fresh`] table of allocating writes not yet folded into the tree.
//!
//! Invariants:
//! - Every holder of the lock exclusively goes through [`Disk::exclusive`],
//!   which folds `Fresh` into the tree first; no write adds to `Fresh`
//!   while the lock is held exclusively (they need it shared).
//! - `pending_free` holds blocks the committed state still references and
//!   the next commit drops: they are freed only after its header is durable.
//! - A failure after the header write started sets `poisoned`: the header
//!   may or may not be on the device, so the disk refuses further work until
//!   the store is reopened.
//! - `deleted` is set, under the exclusive lock, by the store when it
//!   deletes the disk; every later operation on a handle fails.
//! - **Lock order: `commit`, then `state`, then `fresh`.** Every commit
//!   holds the `commit` lock from its start until its header is durable and
//!   its frees are released, so commits of one disk never overlap; it holds
//!   `state` exclusively only while it changes the state in memory (see
//!   `commit.rs`). [`Disk::exclusive`] (management: snapshots, deletions,
//!   rollback, `gc`) takes both; [`Disk::lock_tree`] (the data path's
//!   partial writes and discards) takes `state` alone, so it never waits
//!   for a commit's I/O.
//! - `staged` holds a commit adopted in memory whose device writes are
//!   still to be made: deferred (a snapshot taken with
//!   `Durability::Deferred`) or failed before its header. Whoever takes the
//!   commit lock next ([`Disk::durable`]) writes it first, with the state
//!   unlocked meanwhile, so a later header never lands without the blocks
//!   it builds on.

use crate::disk::journal::{read_journal, Chain};
use crate::disk::log::load_log;
use crate::error::{Error, Result};
use crate::lineage::{Delta, SnapSet, SnapshotInfo, Version};
use crate::pool::Pool;
use crate::time::now_ns;
use crate::tree::Tree;
use parallax_format::{DiskRef, LogBlock, LogEntry, Ptr, VdiHeader, TREE_HEIGHT, VDI_FLAG_LINEAGE};
use parking_lot::{Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Stripe locks per disk for read-modify-write of partial blocks.
pub(super) const STRIPES: usize = 64;

/// Where a disk's root version comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A disk created empty.
    None,
    /// A clone: the root (and, for a journal snapshot, the journal head) of
    /// the snapshot it was made from, and when that snapshot was taken
    /// (what names it in the read cache).
    Root {
        root: Ptr,
        journal: Ptr,
        created_ns: u64,
    },
    /// A clone whose origin could not be found (made by an older version
    /// and orphaned): its versions are not reclaimed, `gc` does it.
    Unknown,
}

/// See the module documentation.
pub(crate) struct DiskState {
    pub(super) name: String,
    pub(super) header: VdiHeader,
    /// Index (0 = A, 1 = B) of the header slot the next commit writes.
    pub(super) next_slot: usize,
    pub(super) tree: Tree,
    pub(super) size: u64,
    pub(super) snapshots: SnapSet,
    pub(super) origin: Origin,
    /// The live tree's entry journal as committed (journal mode).
    pub(super) journal: LiveChain,
    /// Records in the snapshot log chain (for compaction).
    pub(super) log_records: u64,
    pub(super) log_block: Option<LogBlock>,
    pub(super) pending_log: Vec<LogEntry>,
    /// Blocks to free once the next commit is durable.
    pub(super) pending_free: Vec<u64>,
    pub(super) header_dirty: bool,
    /// A commit adopted in memory that did not reach the device (see the
    /// module documentation).
    pub(super) staged: Option<crate::disk::commit::Staged>,
    pub(super) poisoned: bool,
    pub(super) deleted: bool,
    /// Shared mode: the host this disk was handed off to (0: none): every
    /// later operation on a handle here fails.
    pub(super) handed_off_to: u64,
}

impl DiskState {
    /// Whether the next commit has anything to write besides bitmaps.
    pub(super) fn has_pending(&self) -> bool {
        self.tree.is_dirty()
            || !self.pending_log.is_empty()
            || self.header_dirty
            || !self.pending_free.is_empty()
            || self.staged.is_some()
    }

    /// Neither deleted, poisoned nor handed off.
    pub(crate) fn is_live(&self) -> bool {
        !self.deleted && !self.poisoned && self.handed_off_to == 0
    }

    /// Marks the disk handed off to host `to` (see `Store::hand_off`).
    pub(crate) fn mark_handed_off(&mut self, to: u64) {
        self.handed_off_to = to;
    }

    /// Marks the disk deleted (the store's catalogue no longer has it):
    /// every later operation on a handle fails.
    pub(crate) fn mark_deleted(&mut self) {
        self.deleted = true;
    }

    pub(crate) fn origin_vdi(&self) -> u64 {
        self.header.origin_vdi
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn snapshots(&self) -> &SnapSet {
        &self.snapshots
    }

    /// The visible snapshot called `name`.
    pub(super) fn snapshot_named(&self, name: &str) -> Result<&SnapshotInfo> {
        self.snapshots
            .by_name(name)
            .ok_or_else(|| self.no_such_snapshot(name))
    }

    pub(super) fn no_such_snapshot(&self, name: &str) -> Error {
        Error::NotFound(format!(
            "snapshot {} does not exist",
            DiskRef::snapshot(&self.name, name)
        ))
    }

    /// The snapshot the live tree derives from (0: the disk's origin).
    pub(crate) fn live_parent(&self) -> u64 {
        self.header.live_parent
    }

    pub(crate) fn origin_snapshot(&self) -> u64 {
        self.header.origin_snapshot
    }

    pub(crate) fn log_head(&self) -> Ptr {
        self.header.log_head
    }

    /// Whether this disk's deleted versions are reclaimed at once (see
    /// `lineage.rs`). Disks written before lineage was recorded, and clones
    /// whose origin is gone, leave them to `gc`.
    pub(crate) fn reclaims(&self) -> bool {
        self.header.flags & VDI_FLAG_LINEAGE != 0 && self.origin != Origin::Unknown
    }

    /// The tree of the snapshot this disk was cloned from, for reading;
    /// `None` for a disk created empty or whose origin is unknown. (The
    /// clone keeps that snapshot while it lives.)
    pub(crate) fn origin_tree(&self, pool: &Pool) -> Result<Option<Tree>> {
        match self.origin {
            Origin::Root { root, journal, .. } => {
                version_tree(pool, self.header.origin_vdi, root, journal).map(Some)
            }
            Origin::None | Origin::Unknown => Ok(None),
        }
    }

    /// The version `id` (a snapshot id, or 0 for the disk's origin) as the
    /// lineage walks see it; empty when there is none.
    pub(crate) fn version(&self, pool: &Pool, id: u64) -> Result<Version> {
        if id == 0 {
            return match self.origin {
                Origin::Root { root, journal, .. } => {
                    snapshot_version(pool, self.header.origin_vdi, root, journal)
                }
                Origin::None | Origin::Unknown => Ok(Version::default()),
            };
        }
        let s = self.snapshots.get(id).ok_or_else(|| {
            Error::Inconsistent(format!(
                "disk {}: snapshot parent id {id} is missing",
                self.name
            ))
        })?;
        snapshot_version(pool, self.header.vdi_id, s.root, s.journal)
    }

    /// The live tree as a version, as last committed (the caller makes
    /// sure nothing is pending).
    pub(crate) fn live_version(&self) -> Version {
        let mut v = Version {
            root: self.tree.root(),
            journal: Arc::new(self.journal.addrs.clone()),
            ..Version::default()
        };
        if let Some(o) = self.tree.overlay() {
            v.overlay = crate::lineage::Overlaid::Map(Arc::new(o.entries().collect()));
            v.records = self.journal.len();
        }
        v
    }

    /// Everything a transaction may change, to go back to if it fails.
    /// The live tree is saved only when it is clean (a root pointer, no
    /// overlay): transactions change the tree only when it is (deletion
    /// planning promotes pointers of a committed tree; rollback commits a
    /// dirty tree first), so a dirty overlay is never copied.
    pub(super) fn savepoint(&self) -> Savepoint {
        Savepoint {
            tree: (!self.tree.is_dirty()).then(|| self.tree.clone()),
            header: self.header.clone(),
            journal: self.journal.clone(),
            size: self.size,
            header_dirty: self.header_dirty,
            pending_log: self.pending_log.len(),
            pending_free: self.pending_free.len(),
        }
    }

    /// Back to `sp` after a transaction failed before its header write
    /// started. The snapshot list is read again from the durable log (the
    /// only copy the failed transaction cannot have touched); if that
    /// fails, the disk is poisoned.
    pub(super) fn restore(&mut self, pool: &Pool, sp: Savepoint) {
        if let Some(tree) = sp.tree {
            self.tree = tree;
        }
        self.header = sp.header;
        // A deletion's promotion may have changed which chain blocks a
        // snapshot holds.
        self.journal = sp.journal;
        self.size = sp.size;
        self.header_dirty = sp.header_dirty;
        self.pending_log.truncate(sp.pending_log);
        self.pending_free.truncate(sp.pending_free);
        match load_log(pool, &self.header) {
            Ok(log) => {
                self.snapshots = log.snapshots;
                self.log_block = log.head;
                self.log_records = log.records;
            }
            Err(_) => self.poisoned = true,
        }
    }
}

/// The live tree of a disk as its header and snapshots describe it: in
/// journal mode (the store's, or a journal the header names), its nodes
/// with the journal's records laid over them, those a snapshot holds
/// sealed (the longest chain among the snapshots that share its base).
fn open_tree(pool: &Pool, header: &VdiHeader, snapshots: &SnapSet) -> Result<(Tree, LiveChain)> {
    let tree = Tree::open(header.root);
    if !pool.journal_mode() && header.journal_head.is_null() {
        return Ok((tree, LiveChain::default()));
    }
    let chain = read_journal(pool, header.journal_head, header.vdi_id)?;
    let (sealed, sealed_chain) = sealed_by_snapshots(pool, header, snapshots)?;
    let records = chain.records().map(|r| (r.vblock, r.ptr));
    let overlay = crate::tree::Overlay::from_records(records, sealed);
    Ok((
        tree.with_journal(overlay),
        LiveChain::from_chain(header.journal_head, &chain, sealed_chain),
    ))
}

/// The records of the live tree's journal that snapshots hold, and the
/// chain of the newest snapshot sharing its base (whose chain is the
/// longest of those: the history of a base is linear).
pub(crate) fn sealed_by_snapshots(
    pool: &Pool,
    header: &VdiHeader,
    snapshots: &SnapSet,
) -> Result<(u64, Vec<u64>)> {
    let newest = snapshots
        .all()
        .filter(|s| s.root.addr() == header.root.addr() && !s.journal.is_null())
        .last();
    match newest {
        None => Ok((0, Vec::new())),
        Some(s) => {
            let chain = read_journal(pool, s.journal, header.vdi_id)?;
            Ok((chain.len(), chain.addrs()))
        }
    }
}

/// The tree of a snapshot to read: its root, and in journal mode the
/// records of its journal chain laid over it (all shared: read-only).
pub(crate) fn snapshot_tree(pool: &Pool, owner: u64, s: &SnapshotInfo) -> Result<Tree> {
    version_tree(pool, owner, s.root, s.journal)
}

/// The tree of a snapshot of disk `owner` with root `root` and journal
/// head `journal` (null: a tree snapshot), for reading.
fn version_tree(pool: &Pool, owner: u64, root: Ptr, journal: Ptr) -> Result<Tree> {
    let tree = Tree::open(root);
    if journal.is_null() {
        return Ok(tree);
    }
    let chain = read_journal(pool, journal, owner)?;
    let records = chain.records().map(|r| (r.vblock, r.ptr));
    Ok(tree.with_journal(crate::tree::Overlay::from_records(records, u64::MAX)))
}

/// What a clone or a rollback to snapshot `s` starts from (see
/// [`Tree::from_version`]); in journal mode (`journal`), with an empty
/// journal overlay over it.
pub(crate) fn tree_from_snapshot(
    pool: &Pool,
    owner: u64,
    s: &SnapshotInfo,
    journal: bool,
) -> Result<Tree> {
    let records: Vec<(u64, Ptr)> = if s.journal.is_null() {
        Vec::new()
    } else {
        read_journal(pool, s.journal, owner)?
            .records()
            .map(|r| (r.vblock, r.ptr))
            .collect()
    };
    let tree = Tree::from_version(pool.meta(), s.root, records)?;
    Ok(if journal {
        tree.with_journal(Default::default())
    } else {
        tree
    })
}

/// A snapshot as the lineage walks see it: its root, and the journal chain
/// it holds on top (read from the device).
pub(crate) fn snapshot_version(
    pool: &Pool,
    owner: u64,
    root: Ptr,
    journal: Ptr,
) -> Result<Version> {
    if journal.is_null() {
        return Ok(Version::tree(root));
    }
    Ok(read_journal(pool, journal, owner)?.version(root))
}

/// The live tree's journal chain as committed: its head block (copied by
/// the next append) and every block's address (sorted).
#[derive(Clone, Default, Debug)]
pub(crate) struct LiveChain {
    pub head_ptr: Ptr,
    pub head: Option<parallax_format::JournalBlock>,
    pub addrs: Vec<u64>,
    /// The chain of the newest snapshot that shares the live tree's base
    /// (sorted): those of `addrs` it holds are not the live tree's alone,
    /// and the next journal snapshot's delta is against it.
    pub sealed_chain: Vec<u64>,
}

impl LiveChain {
    pub fn from_chain(head_ptr: Ptr, chain: &Chain, sealed_chain: Vec<u64>) -> Self {
        LiveChain {
            head_ptr,
            head: chain.head().cloned(),
            addrs: chain.addrs(),
            sealed_chain,
        }
    }

    /// Records in the chain.
    pub fn len(&self) -> u64 {
        self.head.as_ref().map_or(0, |h| h.chain_len())
    }
}

/// See [`DiskState::savepoint`].
pub(super) struct Savepoint {
    /// `None`: the tree was dirty, and the transaction leaves it alone.
    tree: Option<Tree>,
    header: VdiHeader,
    journal: LiveChain,
    size: u64,
    header_dirty: bool,
    pending_log: usize,
    pending_free: usize,
}

/// Whole-block writes that allocated since the disk lock was last held
/// exclusively, kept beside the tree so that allocating writes need only the
/// shared lock. Invariants:
/// - `map` entries are newer than the tree: every reader under the shared
///   lock consults `map` first, and every holder of the exclusive lock folds
///   `map` into the tree first ([`Disk::exclusive`]); `map` and the tree
///   never change together otherwise.
/// - Blocks in `map` and `in_flight` are owned by the live disk alone (new,
///   never in a snapshot); `gc` keeps both.
#[derive(Default)]
pub(crate) struct Fresh {
    /// Virtual block ─▶ new data block, written and complete.
    pub(super) map: HashMap<u64, u64>,
    /// Allocated for writes still moving their data; in no tree or map yet.
    pub(super) in_flight: HashSet<u64>,
    /// Fresh blocks replaced by a later fresh write: freed after the next commit.
    pub(super) replaced: Vec<u64>,
}

impl Fresh {
    pub(super) fn is_empty(&self) -> bool {
        self.map.is_empty() && self.replaced.is_empty()
    }
}

/// Refuses a header whose own blocks the bitmaps call free: its root, the
/// nodes right below it, its snapshot log and entry journal (`log`). By the crash-consistency
/// invariant (a commit's blocks are marked allocated before its header is
/// written; a block is freed only after a newer header is durable) that
/// never happens in a store that is merely cut off; it means a header went
/// back a generation (its newest copy lost or damaged) or a bitmap did (a
/// lost write), and serving the disk, or allocating over those blocks,
/// would hand out data that is no longer there. A cheap check (one node
/// read), not a proof: `check` walks everything.
pub(crate) fn verify_allocated(
    pool: &Pool,
    name: &str,
    header: &VdiHeader,
    log: &[u64],
) -> Result<()> {
    let mut refs: Vec<(u64, &str)> = log
        .iter()
        .map(|&a| (a, "a snapshot log or entry journal block"))
        .collect();
    if !header.root.is_null() {
        refs.push((header.root.addr(), "the root node"));
        let root = pool
            .meta()
            .load_node(header.root, (TREE_HEIGHT - 1) as u8)?;
        refs.extend(
            root.entries
                .iter()
                .filter(|e| !e.is_null())
                .map(|e| (e.addr(), "a node below the root")),
        );
    }
    // In shared mode, only blocks of this host's extents can be judged.
    match refs
        .into_iter()
        .find(|&(addr, _)| pool.vouches_for(addr) == Some(false))
    {
        Some((addr, what)) => Err(Error::Inconsistent(format!(
            "disk {name}: header generation {} references block {addr} ({what}), which the extent bitmap marks free: a header or bitmap write was lost or went back in time; the disk is not opened (`parallax check` reports the damage)",
            header.generation
        ))),
        None => Ok(()),
    }
}

/// The commit lock and the disk lock, held exclusively ([`Disk::exclusive`]).
pub(crate) struct Exclusive<'a> {
    pub(super) commit: MutexGuard<'a, ()>,
    pub(super) st: Held<'a>,
}

impl std::ops::Deref for Exclusive<'_> {
    type Target = DiskState;
    fn deref(&self) -> &DiskState {
        &self.st
    }
}

impl std::ops::DerefMut for Exclusive<'_> {
    fn deref_mut(&mut self) -> &mut DiskState {
        &mut self.st
    }
}

/// The disk lock held exclusively, timed: when it goes, the time from
/// asking for it to letting it go (the longest the disk's reads and
/// writes waited for it, the drain of requests in flight included) is
/// reported to [`crate::observe::on_disk_held`]. Every exclusive hold that
/// does work goes through it: [`Disk::exclusive`], [`Disk::hold`] and the
/// data path's [`Disk::lock_tree`]. (The few bare `state.write()` calls
/// left only move a staged commit or a flag in or out.)
pub(crate) struct Held<'a> {
    guard: RwLockWriteGuard<'a, DiskState>,
    asked: Instant,
}

impl<'a> Held<'a> {
    /// Takes the disk lock exclusively.
    pub(super) fn lock(state: &'a RwLock<DiskState>) -> Self {
        let asked = Instant::now();
        Held {
            guard: state.write(),
            asked,
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        crate::observe::disk_held(self.asked.elapsed());
    }
}

impl std::ops::Deref for Held<'_> {
    type Target = DiskState;
    fn deref(&self) -> &DiskState {
        &self.guard
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut DiskState {
        &mut self.guard
    }
}

/// See the module documentation.
pub(crate) struct Disk {
    pub(super) pool: Arc<Pool>,
    pub(super) id: u64,
    pub(super) header_addrs: [u64; 2],
    /// In an `Arc` so that an `IoPlan` can hold a read guard of its own.
    pub(super) state: Arc<RwLock<DiskState>>,
    /// Held by every commit from start to end (see the module
    /// documentation); always taken before `state`.
    pub(super) commit: Mutex<()>,
    /// Shared mode: the epoch of this host's writer key for the disk, which
    /// every commit writes into the header (0: single host).
    pub(super) writer_epoch: AtomicU64,
    /// Shared mode: the coordinator's incarnation the key of
    /// `writer_epoch` was taken under; the disk is written only while it
    /// is current (see `Store::settle`, which takes the key again).
    incarnation: AtomicU64,
    /// Shared mode: another host took the disk while this one had lost its
    /// lease (see [`Disk::mark_lost`]); read without the disk lock.
    lost: std::sync::atomic::AtomicBool,
    /// Deltas of snapshots a pipelined commit computed after letting the
    /// state go; folded in by every exclusive holder (see `commit.rs`).
    pub(super) deltas: Mutex<Vec<(u64, Option<Delta>)>>,
    /// Always taken after `state` (shared or exclusive), never before.
    pub(super) fresh: Mutex<Fresh>,
    pub(super) stripes: Vec<Mutex<()>>,
    /// Snapshot id ─▶ open `SnapshotView`s; a pinned snapshot is hidden
    /// rather than reclaimed when deleted.
    pub(crate) pins: Mutex<HashMap<u64, u32>>,
    /// When the disk last changed in memory (ns since the epoch): the
    /// store commits a disk idle for a while.
    last_change_ns: AtomicU64,
    /// When a client last read, wrote or flushed the disk (ns since the
    /// epoch), and whether it wrote since its last flush: a disk another
    /// host asks for is given up only once both say its clients are done
    /// with it (see `Store::yield_requested`).
    last_use_ns: AtomicU64,
    written_since_flush: std::sync::atomic::AtomicBool,
    /// Shared mode: when the store should next try to reclaim this disk's
    /// hidden versions (ns since the epoch; 0: at its next pass). See
    /// `reclaim.rs`.
    pub(crate) reclaim_after_ns: AtomicU64,
    /// Counts what the disk sent to the device: every client write (at its
    /// start) and every commit (at its header write).
    pub(super) changes: AtomicU64,
    /// Shared mode with a write-back log: a position of the log above every
    /// record of this disk, taken while nothing of it was in flight, and
    /// valid while `changes` is still `log_mark_changes` (see
    /// [`Disk::drain_log`]).
    log_mark: AtomicU64,
    log_mark_changes: AtomicU64,
}

impl Disk {
    /// `writer_epoch`: in shared mode, the epoch of the writer key this
    /// host holds for the disk (0 otherwise); refused if the disk was
    /// committed under a newer one.
    pub(crate) fn open(
        pool: Arc<Pool>,
        header_addrs: [u64; 2],
        header: VdiHeader,
        next_slot: usize,
        name: String,
        origin: Origin,
        writer_epoch: u64,
    ) -> Result<Self> {
        if header.writer_epoch > writer_epoch && writer_epoch != 0 {
            return Err(Error::Fenced(format!(
                "disk {name} was committed by host {} under epoch {}, newer than this host's {writer_epoch}",
                header.writer_host, header.writer_epoch
            )));
        }
        let log = load_log(&pool, &header)?;
        let (snapshots, log_block, log_records) = (log.snapshots, log.head, log.records);
        let (tree, journal) = open_tree(&pool, &header, &snapshots)?;
        // The live journal's blocks are the header's too.
        let mut meta_blocks = log.addrs;
        meta_blocks.extend(&journal.addrs);
        verify_allocated(&pool, &name, &header, &meta_blocks)?;
        Ok(Disk {
            id: header.vdi_id,
            writer_epoch: AtomicU64::new(writer_epoch),
            incarnation: AtomicU64::new(pool.coordinator().map_or(0, |c| c.incarnation())),
            lost: std::sync::atomic::AtomicBool::new(false),
            header_addrs,
            state: Arc::new(RwLock::new(DiskState {
                name,
                tree,
                journal,
                size: header.size_bytes,
                next_slot,
                header,
                snapshots,
                origin,
                log_records,
                log_block,
                pending_log: Vec::new(),
                pending_free: Vec::new(),
                header_dirty: false,
                staged: None,
                poisoned: false,
                deleted: false,
                handed_off_to: 0,
            })),
            commit: Mutex::new(()),
            deltas: Mutex::new(Vec::new()),
            pool,
            fresh: Mutex::new(Fresh::default()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            pins: Mutex::new(HashMap::new()),
            last_change_ns: AtomicU64::new(now_ns()),
            last_use_ns: AtomicU64::new(now_ns()),
            written_since_flush: std::sync::atomic::AtomicBool::new(false),
            reclaim_after_ns: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            log_mark: AtomicU64::new(0),
            log_mark_changes: AtomicU64::new(u64::MAX),
        })
    }

    /// Versions kept hidden (deleted snapshots something still derives
    /// from or reads); `None` if the state is locked right now.
    pub(crate) fn try_hidden_versions(&self) -> Option<usize> {
        let st = self.state.try_read()?;
        Some(st.snapshots.len() - st.snapshots.visible_len())
    }

    /// How the local cache serves the disk (its header's policy).
    pub(crate) fn cache_policy(&self) -> parallax_format::CachePolicy {
        self.state.read().header.cache_policy
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Shared mode: gives the disk's writer key back (the store lets the
    /// disk go).
    pub(crate) fn release_writer(&self) {
        if let (Some(c), e) = (self.pool.coordinator(), self.writer_epoch()) {
            // With a write-back log, only once its commits are on the pool;
            // otherwise the key stays (with the lease: the disk is then not
            // let go, and is taken over only once this host's log is).
            if e != 0 && self.key_is_current() && self.drain_log_again().is_ok() {
                c.release_writer(self.id, e);
            }
        }
    }

    /// What a view of one of its snapshots needs in shared mode: this host
    /// may write, holds the disk's key under its current lease, and did not
    /// lose the disk to another host.
    pub(crate) fn still_ours(&self) -> Result<()> {
        self.pool.check_fence()?;
        if self.lost.load(Ordering::SeqCst) || !self.key_is_current() {
            return Err(Error::Fenced(
                "this appliance lost its lease meanwhile; the snapshot may not be intact here any more: open it again".into(),
            ));
        }
        Ok(())
    }

    /// The epoch of this host's writer key for the disk (0: single host).
    pub(crate) fn writer_epoch(&self) -> u64 {
        self.writer_epoch.load(Ordering::SeqCst)
    }

    /// Shared mode: whether the writer key was taken under this host's
    /// current lease.
    pub(crate) fn key_is_current(&self) -> bool {
        self.pool
            .coordinator()
            .is_none_or(|c| c.incarnation() == self.incarnation.load(Ordering::SeqCst))
    }

    /// Shared mode, the key taken again under the current lease with
    /// `epoch` (the disk unchanged on the pool since): writes go on under
    /// it once the header names it (the caller commits it).
    pub(crate) fn rekey(&self, epoch: u64, incarnation: u64) {
        self.writer_epoch.store(epoch, Ordering::SeqCst);
        self.incarnation.store(incarnation, Ordering::SeqCst);
    }

    /// The commit lock, then the disk lock exclusively, with fresh writes
    /// folded into the tree: what every operation that commits, or that
    /// needs no commit in flight, holds.
    pub(crate) fn exclusive(&self) -> Result<Exclusive<'_>> {
        let commit = self.durable()?;
        let mut st = Held::lock(&self.state);
        self.fold_fresh(&mut st)?;
        self.fold_deltas(&mut st);
        Ok(Exclusive { commit, st })
    }

    /// The commit lock, once every commit adopted before it is durable (a
    /// staged one is written first, with reads and writes going on): what
    /// the disk's durable state holds then is what its memory holds, save
    /// the changes not yet committed.
    pub(crate) fn durable(&self) -> Result<MutexGuard<'_, ()>> {
        let commit = self.commit.lock();
        self.write_staged_unlocked()?;
        Ok(commit)
    }

    /// The disk lock exclusively, fresh writes folded, without the commit
    /// lock: for the data path, which changes the live tree in memory only
    /// (a commit in flight has adopted its tree already).
    pub(super) fn lock_tree(&self) -> Result<Held<'_>> {
        let mut st = Held::lock(&self.state);
        self.fold_fresh(&mut st)?;
        self.fold_deltas(&mut st);
        Ok(st)
    }

    fn fold_deltas(&self, st: &mut DiskState) {
        for (id, delta) in self.deltas.lock().drain(..) {
            st.snapshots.set_delta(id, delta);
        }
    }

    /// Both locks, without folding fresh writes: holds the disk still
    /// (`gc` settles its result under it).
    pub(crate) fn hold(&self) -> Exclusive<'_> {
        let commit = self.commit.lock();
        let st = Held::lock(&self.state);
        Exclusive { commit, st }
    }

    /// The state, shared, for readers outside the disk module (space).
    pub(crate) fn read_state(&self) -> Result<parking_lot::RwLockReadGuard<'_, DiskState>> {
        let st = self.state.read();
        self.usable(&st)?;
        Ok(st)
    }

    /// Notes that a client wrote the disk now (it changed in memory).
    pub(super) fn touch(&self) {
        let now = now_ns();
        self.last_change_ns.store(now, Ordering::Relaxed);
        self.last_use_ns.store(now, Ordering::Relaxed);
        self.written_since_flush.store(true, Ordering::SeqCst);
        self.changes.fetch_add(1, Ordering::SeqCst);
    }

    /// Notes that a client read the disk now (shared mode only: nothing
    /// else asks, and it costs a clock read per request).
    pub(super) fn used(&self) {
        if self.pool.coordinator().is_some() {
            self.last_use_ns.store(now_ns(), Ordering::Relaxed);
        }
    }

    /// A client's flush begins: what was written so far is being made
    /// durable. Returns whether something was written since the last one,
    /// for [`Disk::flush_failed`].
    pub(super) fn flush_begins(&self) -> bool {
        self.used();
        self.written_since_flush.swap(false, Ordering::SeqCst)
    }

    /// The flush [`Disk::flush_begins`] announced failed.
    pub(super) fn flush_failed(&self, had_written: bool) {
        if had_written {
            self.written_since_flush.store(true, Ordering::SeqCst);
        }
    }

    /// Whether the disk's clients are done with it: everything they wrote
    /// was flushed, and none of them used it for `quiet`.
    pub(crate) fn is_quiet(&self, quiet: std::time::Duration) -> bool {
        let idle = now_ns().saturating_sub(self.last_use_ns.load(Ordering::Relaxed));
        !self.written_since_flush.load(Ordering::SeqCst) && idle >= quiet.as_nanos() as u64
    }

    /// Nanoseconds since the disk last changed in memory.
    pub(crate) fn idle_ns(&self, now: u64) -> u64 {
        now.saturating_sub(self.last_change_ns.load(Ordering::Relaxed))
    }

    /// Whether a commit would write anything, without waiting for the lock
    /// (`None` when it is held).
    pub(crate) fn try_has_pending(&self) -> Option<bool> {
        let st = self.state.try_read()?;
        let fresh = !self.fresh.lock().is_empty();
        Some(!st.deleted && !st.poisoned && (fresh || st.has_pending()))
    }

    /// Commits whatever is pending: what the store does before it lets a
    /// disk go. Nothing to do for a deleted disk; a poisoned one reports
    /// that it cannot.
    /// Shared mode, a hand-off to host `to`: waits for the requests in
    /// flight (the exclusive lock), commits whatever is pending (durable on
    /// return), and marks the disk handed off, so that every later
    /// operation through a handle here fails. Returns the writer epoch.
    /// Refused while a view here reads one of its snapshots (the next
    /// holder would not know of that pin), and, with `quiet`, unless
    /// [`Disk::is_quiet`] (checked with the requests in flight done).
    pub(crate) fn seal_for_hand_off(
        &self,
        to: u64,
        quiet: Option<std::time::Duration>,
    ) -> Result<u64> {
        let mut st = self.exclusive()?;
        self.usable(&st)?;
        if let Some(quiet) = quiet {
            if !self.is_quiet(quiet) {
                return Err(Error::Busy(format!(
                    "disk {}: its clients here are using it",
                    st.name
                )));
            }
        }
        let read = self.pins.lock().len();
        if read > 0 {
            return Err(Error::Busy(format!(
                "disk {}: {read} of its snapshots are being read here; close those exports first",
                st.name
            )));
        }
        if st.has_pending() {
            self.commit(&mut st, None)?;
        }
        st.mark_handed_off(to);
        Ok(self.writer_epoch())
    }

    /// Shared mode: another host took the disk while this one had lost
    /// its lease: every later operation through a handle here fails.
    pub(crate) fn mark_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.state.write().mark_handed_off(u64::MAX);
    }

    /// Undoes [`Disk::seal_for_hand_off`] (the hand-off could not be made).
    pub(crate) fn unseal(&self) {
        self.state.write().mark_handed_off(0);
    }

    /// Commits the header (with whatever is pending), so that it names this
    /// writer and epoch: shared mode, a key taken back under a new lease
    /// (opening writes it with [`Disk::commit_header_through`]).
    pub(crate) fn commit_header(&self) -> Result<()> {
        let mut st = self.exclusive()?;
        st.header_dirty = true;
        self.commit(&mut st, None)
    }

    /// Shared mode with a write-back log: waits until everything this disk
    /// sent to the device is on the pool (before its key goes to another
    /// host, which reads the disk there, and so that no record of it can
    /// land later over that host's writes). The caller makes sure nothing
    /// of the disk is in flight (no handle, or sealed): the log's head now
    /// is then above all of its records, and stays a valid mark until the
    /// disk changes again.
    pub(crate) fn drain_log(&self) -> Result<()> {
        let changes = self.changes.load(Ordering::SeqCst);
        let mark = self.pool.shared_log_mark();
        self.pool.drain_log_to(mark, "before the disk is let go")?;
        self.log_mark.store(mark, Ordering::SeqCst);
        self.log_mark_changes.store(changes, Ordering::SeqCst);
        Ok(())
    }

    /// [`Disk::drain_log`], to the mark an earlier drain took if the disk
    /// did not change since (the settler drains outside the table's lock,
    /// then lets the disk go under it).
    fn drain_log_again(&self) -> Result<()> {
        if self.log_mark_changes.load(Ordering::SeqCst) == self.changes.load(Ordering::SeqCst) {
            let mark = self.log_mark.load(Ordering::SeqCst);
            return self.pool.drain_log_to(mark, "before the disk is let go");
        }
        self.drain_log()
    }

    pub(crate) fn commit_pending(&self) -> Result<()> {
        let st = self.exclusive()?;
        if st.deleted || (!st.poisoned && !st.has_pending()) {
            return Ok(());
        }
        self.commit_pipelined(st)
    }

    /// Runs `f` on a tree that includes every fresh write: under the shared
    /// lock when there are none (the usual case: block status stays off
    /// the exclusive lock), otherwise after folding them under the
    /// exclusive lock.
    pub(super) fn with_whole_tree<T>(&self, f: impl FnOnce(&DiskState) -> Result<T>) -> Result<T> {
        {
            let st = self.state.read();
            if self.fresh.lock().map.is_empty() {
                self.usable(&st)?;
                return f(&st);
            }
        }
        let st = self.lock_tree()?;
        self.usable(&st)?;
        f(&st)
    }

    /// Moves fresh writes into the tree (the caller holds the lock
    /// exclusively). On error the entries not yet moved stay fresh.
    pub(super) fn fold_fresh(&self, st: &mut DiskState) -> Result<()> {
        let mut fresh = self.fresh.lock();
        if fresh.is_empty() {
            return Ok(());
        }
        let meta = self.pool.meta();
        let entries: Vec<(u64, u64)> = fresh.map.iter().map(|(&v, &a)| (v, a)).collect();
        for (v, addr) in entries {
            let old = st.tree.replace_entry(meta, v, Ptr::data(addr, true))?;
            if old.writable() {
                st.pending_free.push(old.addr());
            }
            fresh.map.remove(&v);
        }
        st.pending_free.append(&mut fresh.replaced);
        Ok(())
    }

    /// Blocks of writes still moving their data (for `gc`).
    pub(crate) fn in_flight_blocks(&self) -> Vec<u64> {
        self.fresh.lock().in_flight.iter().copied().collect()
    }

    /// Also the fencing check of shared mode: every read, write, discard
    /// and commit of a disk passes here, under its lock.
    pub(super) fn usable(&self, st: &DiskState) -> Result<()> {
        self.pool.check_fence()?;
        if st.deleted {
            return Err(Error::Deleted(st.name.clone()));
        }
        if st.handed_off_to == u64::MAX {
            return Err(Error::Fenced(format!(
                "disk {}: another appliance took it while this one had lost its lease",
                st.name
            )));
        }
        if st.handed_off_to != 0 {
            return Err(Error::Fenced(format!(
                "disk {} was handed off to host {}: it is served there now",
                st.name, st.handed_off_to
            )));
        }
        if st.poisoned {
            return Err(Error::Poisoned(st.name.clone()));
        }
        if !self.key_is_current() {
            return Err(Error::Fenced(format!(
                "disk {}: this appliance lost its lease and got a new one; it writes the disk again once it took its key back (if no other appliance took the disk meanwhile)",
                st.name
            )));
        }
        Ok(())
    }
}
