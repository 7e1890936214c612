//! Virtual disk images: reads, writes, flush, snapshots, rollback.
//!
//! A [`Vdi`] is a handle on one writable disk. Its state (the live [`Tree`],
//! the last committed header, the snapshot list, and what the next commit
//! must add or free) sits behind a read-write lock:
//!
//! - Reads, and writes to blocks the disk owns along the whole path, take
//!   the lock shared and touch no metadata. Partial-block writes of that kind
//!   also take one of 64 stripe locks, so that read-modify-write cycles on
//!   one block do not interleave.
//! - Writes that must allocate (first write, or first write after a
//!   snapshot), discards and every management operation take it exclusively.
//! - [`Vdi::flush`] commits: dirty nodes go to new blocks, then the bitmaps
//!   and a device flush, then the VDI header in its older slot and a second
//!   flush. Blocks the commit stops referencing are freed only afterwards.
//!
//! A failure after the header write started poisons the handle: the header
//! may or may not have reached the disk, so the only safe continuation is
//! to reopen the store.

use crate::error::{Error, Result};
use crate::store::StoreInner;
use crate::time::{compact_utc, now_ns};
use crate::tree::{Tree, MAX_VIRTUAL_BLOCKS};
use parallax_format::{
    validate_name, LogBlock, LogEntry, LogEntryKind, NodeBlock, Ptr, VdiHeader, BLOCK_SIZE,
    BLOCK_SIZE_U64, FAN_OUT, LOG_ENTRIES_PER_BLOCK, TREE_HEIGHT,
};
use parking_lot::{ArcRwLockReadGuard, Mutex, RawRwLock, RwLock};
use std::collections::HashSet;
use std::sync::Arc;

/// Largest virtual disk: the tree's reach.
pub const MAX_VDI_SIZE: u64 = MAX_VIRTUAL_BLOCKS * BLOCK_SIZE_U64;

const STRIPES: usize = 64;
/// Free blocks kept back from data writes for the metadata of the next commit.
const METADATA_RESERVE: u64 = 64;

/// A snapshot as listed to users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: u64,
    pub name: String,
    pub created_ns: u64,
    pub size_bytes: u64,
    pub(crate) root: Ptr,
}

/// Summary of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdiInfo {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub created_ns: u64,
    pub snapshot_count: u64,
    /// `NAME@SNAP` it was cloned from, if any.
    pub origin: Option<String>,
    pub generation: u64,
}

/// A run of blocks with the same allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// Backed by a data block. Unallocated ranges read as zeros.
    pub allocated: bool,
}

/// One device transfer of an [`IoPlan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Byte offset on the device ([`IoPlan::fd`]).
    pub device_offset: u64,
    /// Bytes of the caller's buffer it reads into or writes from.
    pub buf: std::ops::Range<usize>,
}

/// A READ or an in-place WRITE worked out ahead, for callers that perform
/// the device I/O themselves (asynchronously, with io_uring): the
/// transfers, and the parts of a read buffer to fill with zeros.
///
/// While the plan lives, the blocks it names cannot be freed or reused: it
/// holds the disk's lock shared (as [`Vdi::read`] does for its duration),
/// so commits, snapshots and allocating writes of that disk wait for it.
/// Keep it until every transfer has completed, then drop it.
pub struct IoPlan {
    /// The file to transfer to or from.
    pub fd: std::os::fd::RawFd,
    pub transfers: Vec<Transfer>,
    /// Read only: ranges of the buffer that read as zeros.
    pub zeros: Vec<std::ops::Range<usize>>,
    _pin: Option<ArcRwLockReadGuard<RawRwLock, VdiState>>,
    _store: Arc<StoreInner>,
}

impl std::fmt::Debug for IoPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoPlan")
            .field("fd", &self.fd)
            .field("transfers", &self.transfers)
            .field("zeros", &self.zeros)
            .finish()
    }
}

/// Plans a block-aligned read of `len` bytes at `offset` through `tree`,
/// with nodes from the cache only. `None` if the store is not a file, the
/// range is not block-aligned, or a node is not in memory.
fn plan_read_tree(
    store: &Arc<StoreInner>,
    tree: &Tree,
    offset: u64,
    len: usize,
) -> Result<Option<IoPlan>> {
    let Some(fd) = store.meta.dev.raw_fd() else {
        return Ok(None);
    };
    if !offset.is_multiple_of(BLOCK_SIZE_U64) || !len.is_multiple_of(BLOCK_SIZE) || len == 0 {
        return Ok(None);
    }
    let first = offset / BLOCK_SIZE_U64;
    let mut runs = Runs::default();
    let mut zeros: Vec<std::ops::Range<usize>> = Vec::new();
    let complete = tree.for_each_cached_entry(
        &store.meta,
        first,
        first + (len / BLOCK_SIZE) as u64,
        &mut |v, entry, _| {
            let start = (v - first) as usize * BLOCK_SIZE;
            if entry.is_null() {
                match zeros.last_mut() {
                    Some(z) if z.end == start => z.end += BLOCK_SIZE,
                    _ => zeros.push(start..start + BLOCK_SIZE),
                }
            } else {
                runs.push(v - first, entry.addr());
            }
            Ok(())
        },
    )?;
    if !complete {
        return Ok(None);
    }
    Ok(Some(IoPlan {
        fd,
        transfers: runs.into_transfers(),
        zeros,
        _pin: None,
        _store: store.clone(),
    }))
}

pub(crate) struct VdiState {
    pub name: String,
    pub header: VdiHeader,
    /// Index (0 = A, 1 = B) of the header slot the next commit writes.
    pub next_slot: usize,
    pub tree: Tree,
    pub size: u64,
    pub snapshots: Vec<SnapshotInfo>,
    pub log_block: Option<LogBlock>,
    pub pending_log: Vec<LogEntry>,
    /// Blocks to free once the next commit is durable.
    pub pending_free: Vec<u64>,
    /// Data blocks allocated by writes still in progress: their data is
    /// being written outside the lock and no tree points at them yet.
    /// `gc` must not take them back.
    pub in_flight: HashSet<u64>,
    pub header_dirty: bool,
    pub poisoned: bool,
    pub deleted: bool,
}

impl VdiState {
    /// Whether the next commit has anything to write besides bitmaps.
    fn has_pending(&self) -> bool {
        self.tree.is_dirty()
            || !self.pending_log.is_empty()
            || self.header_dirty
            || !self.pending_free.is_empty()
    }
}

pub(crate) struct VdiInner {
    pub store: Arc<StoreInner>,
    pub id: u64,
    pub header_addrs: [u64; 2],
    /// In an `Arc` so that an [`IoPlan`] can hold a read guard of its own.
    pub state: Arc<RwLock<VdiState>>,
    stripes: Vec<Mutex<()>>,
}

/// A handle on a writable disk; clones share the same disk.
#[derive(Clone)]
pub struct Vdi {
    pub(crate) inner: Arc<VdiInner>,
}

/// A read-only view of a snapshot.
pub struct SnapshotView {
    store: Arc<StoreInner>,
    tree: Tree,
    info: SnapshotInfo,
    disk: String,
}

fn check_io_range(size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "range {offset}+{len} is past the end of the disk ({size} bytes)"
        ))),
    }
}

/// Splits `[offset, offset+len)` into per-block pieces:
/// (virtual block, offset within block, byte range in the caller's buffer).
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, std::ops::Range<usize>)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done as u64;
        let v = pos / BLOCK_SIZE_U64;
        let within = (pos % BLOCK_SIZE_U64) as usize;
        let n = (BLOCK_SIZE - within).min(len - done);
        let r = done..done + n;
        done += n;
        Some((v, within, r))
    })
}

impl VdiInner {
    pub fn new(
        store: Arc<StoreInner>,
        header_addrs: [u64; 2],
        header: VdiHeader,
        next_slot: usize,
        name: String,
    ) -> Result<Self> {
        let (snapshots, log_block) = load_log(&store, &header)?;
        Ok(VdiInner {
            id: header.vdi_id,
            header_addrs,
            state: Arc::new(RwLock::new(VdiState {
                name,
                tree: Tree::open(header.root),
                size: header.size_bytes,
                next_slot,
                header,
                snapshots,
                log_block,
                pending_log: Vec::new(),
                pending_free: Vec::new(),
                in_flight: HashSet::new(),
                header_dirty: false,
                poisoned: false,
                deleted: false,
            })),
            store,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    fn usable(&self, st: &VdiState) -> Result<()> {
        if st.deleted {
            return Err(Error::NotFound(format!("disk {} was deleted", st.name)));
        }
        if st.poisoned {
            return Err(Error::Poisoned(st.name.clone()));
        }
        Ok(())
    }

    fn read_data(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.store
            .meta
            .dev
            .read_at(buf, addr * BLOCK_SIZE_U64)
            .map_err(Error::io(format!("reading data block {addr}")))
    }

    fn write_data(&self, addr: u64, buf: &[u8]) -> Result<()> {
        self.store
            .meta
            .dev
            .write_at(buf, addr * BLOCK_SIZE_U64)
            .map_err(Error::io(format!("writing data block {addr}")))
    }

    /// Writes `data` at `within` of data block `addr`, owned by this disk.
    fn write_in_place(&self, v: u64, addr: u64, within: usize, data: &[u8]) -> Result<()> {
        // Whole-block writes take the stripe too, so that a concurrent
        // read-modify-write of the same block cannot write old bytes back.
        let _stripe = self.stripes[(v % STRIPES as u64) as usize].lock();
        if data.len() == BLOCK_SIZE {
            return self.write_data(addr, data);
        }
        let mut block = vec![0u8; BLOCK_SIZE];
        self.read_data(addr, &mut block)?;
        block[within..within + data.len()].copy_from_slice(data);
        self.write_data(addr, &block)
    }

    /// Writes a piece smaller than a block: a read-modify-write, under the
    /// disk's exclusive lock when it must allocate.
    fn write_piece(&self, v: u64, within: usize, data: &[u8]) -> Result<()> {
        {
            let st = self.state.read();
            self.usable(&st)?;
            let (entry, writable) = st.tree.lookup(&self.store.meta, v)?;
            if writable {
                return self.write_in_place(v, entry.addr(), within, data);
            }
        }
        let mut st = self.state.write();
        self.usable(&st)?;
        let entry = st.tree.entry_for_write(&self.store.meta, v)?;
        if entry.writable() {
            return self.write_in_place(v, entry.addr(), within, data);
        }
        let mut block = vec![0u8; BLOCK_SIZE];
        if data.len() < BLOCK_SIZE && !entry.is_null() {
            self.read_data(entry.addr(), &mut block)?;
        }
        block[within..within + data.len()].copy_from_slice(data);
        let reserve = METADATA_RESERVE + st.tree.dirty_nodes() as u64 + TREE_HEIGHT as u64;
        let addr = self.store.alloc.lock().allocate(reserve)?;
        if let Err(e) = self.write_data(addr, &block) {
            self.store.alloc.lock().release(addr);
            return Err(e);
        }
        st.tree.set_entry(v, Ptr::data(addr, true))
    }

    /// Writes whole blocks `first..first + data.len() / BLOCK_SIZE`.
    ///
    /// 1. Under the shared lock, blocks the disk owns are overwritten in
    ///    place, one `write_at` per run of consecutive addresses.
    /// 2. The rest are allocated under the exclusive lock, which is then
    ///    dropped while their data is written (again in runs), so that
    ///    allocating writes of one disk overlap on the device. The new
    ///    blocks are recorded in `in_flight` meanwhile, so `gc` keeps them.
    /// 3. The exclusive lock is taken again to point the tree at them. If
    ///    another write replaced a block meanwhile, the one it replaced is
    ///    freed after the next commit, like any overwritten owned block.
    ///
    /// Concurrent writes to the same block end with one of them whole, as
    /// NBD allows; no reader ever sees a block that was not written.
    fn write_blocks(&self, first: u64, data: &[u8]) -> Result<()> {
        let meta = &self.store.meta;
        let count = (data.len() / BLOCK_SIZE) as u64;
        let block = |k: u64| &data[k as usize * BLOCK_SIZE..(k as usize + 1) * BLOCK_SIZE];
        let mut missing = Vec::new();
        {
            let st = self.state.read();
            self.usable(&st)?;
            let mut runs = Runs::default();
            st.tree
                .for_each_entry(meta, first, first + count, &mut |v, entry, writable| {
                    if writable {
                        runs.push(v - first, entry.addr());
                    } else {
                        missing.push(v - first);
                    }
                    Ok(())
                })?;
            for run in runs.0 {
                self.write_data(run.addr, &data[run.bytes()])?;
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        // Phase 2: allocate.
        let mut allocated: Vec<(u64, u64)> = Vec::with_capacity(missing.len());
        {
            let mut st = self.state.write();
            self.usable(&st)?;
            let leaves = (first + count - 1) / FAN_OUT as u64 - first / FAN_OUT as u64 + 1;
            let reserve = METADATA_RESERVE
                + (st.tree.dirty_nodes() + st.in_flight.len()) as u64
                + TREE_HEIGHT as u64 * leaves;
            let mut need = Vec::with_capacity(missing.len());
            for &k in &missing {
                let (entry, writable) = st.tree.lookup(meta, first + k)?;
                if writable {
                    // Another write allocated it since the first pass.
                    self.write_data(entry.addr(), block(k))?;
                } else {
                    need.push(k);
                }
            }
            let mut alloc = self.store.alloc.lock();
            for k in need {
                match alloc.allocate(reserve) {
                    Ok(addr) => allocated.push((k, addr)),
                    Err(e) => {
                        for &(_, addr) in &allocated {
                            alloc.release(addr);
                        }
                        return Err(e);
                    }
                }
            }
            st.in_flight.extend(allocated.iter().map(|&(_, a)| a));
        }
        // Phase 3: the data, outside the lock.
        let mut runs = Runs::default();
        for &(k, addr) in &allocated {
            runs.push(k, addr);
        }
        let written = runs
            .0
            .iter()
            .try_for_each(|run| self.write_data(run.addr, &data[run.bytes()]));
        // Phase 4: link them into the tree.
        let mut st = self.state.write();
        let linked = written.and_then(|_| {
            self.usable(&st)?;
            for &(k, addr) in &allocated {
                let v = first + k;
                let linked = st.tree.entry_for_write(meta, v).and_then(|old| {
                    st.tree.set_entry(v, Ptr::data(addr, true))?;
                    Ok(old)
                });
                match linked {
                    Ok(old) => {
                        st.in_flight.remove(&addr);
                        if old.writable() {
                            st.pending_free.push(old.addr());
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        if linked.is_err() {
            // Whatever is still in flight was never linked: give it back.
            let mut alloc = self.store.alloc.lock();
            for &(_, addr) in &allocated {
                if st.in_flight.remove(&addr) {
                    alloc.release(addr);
                }
            }
        }
        linked
    }

    /// Unmaps whole block `v` (discard or zeroing).
    fn unmap_block(&self, st: &mut VdiState, v: u64) -> Result<()> {
        let (entry, _) = st.tree.lookup(&self.store.meta, v)?;
        if entry.is_null() {
            return Ok(());
        }
        let entry = st.tree.entry_for_write(&self.store.meta, v)?;
        if entry.writable() {
            st.pending_free.push(entry.addr());
        }
        st.tree.set_entry(v, Ptr::NULL)
    }

    /// Commits everything in `st` and, if `snapshot` is given, records the
    /// committed tree as a snapshot and gives the disk a fresh shared root.
    pub fn commit(&self, st: &mut VdiState, snapshot: Option<(u64, String)>) -> Result<()> {
        self.usable(st)?;
        let meta = &self.store.meta;
        if !st.has_pending() && snapshot.is_none() {
            // Also makes earlier frees durable in the bitmaps.
            return self.store.sync_bitmaps();
        }
        let generation = st.header.generation + 1;
        let mut allocated = Vec::new();
        let prepared = self.prepare_commit(st, snapshot, generation, &mut allocated);
        let (header, freed, new_snapshot, new_log_block) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let mut alloc = self.store.alloc.lock();
                for a in allocated {
                    meta.evict(a);
                    alloc.release(a);
                }
                return Err(e);
            }
        };
        // The point of no return: the header write may land or not.
        let slot = st.next_slot;
        let (block, _) = header.encode(meta.store_id, self.header_addrs[slot]);
        let written = meta
            .write_block(self.header_addrs[slot], &block, "a VDI header")
            .and_then(|_| meta.flush());
        if let Err(e) = written {
            st.poisoned = true;
            return Err(e);
        }
        st.next_slot = 1 - slot;
        st.tree.apply(header.root);
        st.header = header;
        st.header_dirty = false;
        st.pending_log.clear();
        if let Some(s) = new_snapshot {
            st.snapshots.push(s);
        }
        if new_log_block.is_some() {
            st.log_block = new_log_block;
        }
        let mut to_free = freed;
        to_free.append(&mut st.pending_free);
        self.store.release(&to_free);
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    fn prepare_commit(
        &self,
        st: &mut VdiState,
        snapshot: Option<(u64, String)>,
        generation: u64,
        allocated: &mut Vec<u64>,
    ) -> Result<(VdiHeader, Vec<u64>, Option<SnapshotInfo>, Option<LogBlock>)> {
        let store = &self.store;
        let meta = &store.meta;
        let mut allocate = || store.alloc.lock().allocate(0);
        let plan = st
            .tree
            .write_dirty(meta, self.id, generation, &mut allocate, allocated)?;
        let mut freed = plan.freed;
        let mut root = plan.root;
        let mut log_entries = st.pending_log.clone();
        let mut new_snapshot = None;
        if let Some((id, name)) = snapshot {
            let created_ns = now_ns();
            log_entries.push(LogEntry {
                kind: LogEntryKind::Taken,
                snapshot_id: id,
                created_ns,
                root,
                size_bytes: st.size,
                name: name.clone(),
            });
            new_snapshot = Some(SnapshotInfo {
                id,
                name,
                created_ns,
                size_bytes: st.size,
                root,
            });
            // The committed root now belongs to the snapshot; the disk gets
            // a copy whose pointers are all shared.
            let node = meta.load_node(root, (TREE_HEIGHT - 1) as u8)?;
            let copy = NodeBlock {
                level: node.level,
                entries: node.entries.iter().map(|p| p.shared()).collect(),
            };
            let addr = allocate()?;
            allocated.push(addr);
            let (block, crc) = copy.encode(meta.store_id, addr, self.id, generation);
            meta.write_block(addr, &block, "a tree node")?;
            meta.cache_node(addr, Arc::new(copy), crc);
            root = Ptr::meta(addr, crc, true);
        }
        let mut header = st.header.clone();
        header.generation = generation;
        header.root = root;
        header.size_bytes = st.size;
        let mut new_log_block = None;
        if !log_entries.is_empty() {
            let (head, block, mut log_freed) =
                write_log(self, st, &log_entries, generation, &mut allocate, allocated)?;
            header.log_head = head;
            new_log_block = Some(block);
            freed.append(&mut log_freed);
        }
        header.snapshot_count = st.snapshots.len() as u64 + u64::from(new_snapshot.is_some());
        header.next_snapshot_id = header
            .next_snapshot_id
            .max(new_snapshot.as_ref().map_or(0, |s| s.id + 1));
        store.sync_bitmaps()?;
        Ok((header, freed, new_snapshot, new_log_block))
    }

    /// Every block that only this disk's live tree references: the blocks
    /// reachable from its root through writable pointers only, committed or
    /// dirty, plus blocks already waiting to be freed.
    pub fn live_owned_blocks(&self, st: &VdiState) -> Result<Vec<u64>> {
        let meta = &self.store.meta;
        let mut owned = HashSet::new();
        if !st.tree.root().is_null() {
            collect_owned(meta, st.tree.root(), (TREE_HEIGHT - 1) as u8, &mut owned)?;
        }
        owned.extend(st.tree.dirty_owned_data());
        owned.extend(st.pending_free.iter().copied());
        Ok(owned.into_iter().collect())
    }
}

/// Adds to `out` the block `ptr` points at and everything below it reached
/// through writable pointers.
pub(crate) fn collect_owned(
    meta: &crate::meta::MetaIo,
    ptr: Ptr,
    level: u8,
    out: &mut HashSet<u64>,
) -> Result<()> {
    out.insert(ptr.addr());
    let node = meta.load_node(ptr, level)?;
    for e in node.entries.iter().filter(|e| e.writable()) {
        if level == 0 {
            out.insert(e.addr());
        } else {
            collect_owned(meta, *e, level - 1, out)?;
        }
    }
    Ok(())
}

/// Appends `entries` to the snapshot log, copying the head block if it has
/// room. Returns the new head, its content, and the blocks to free.
fn write_log(
    vdi: &VdiInner,
    st: &VdiState,
    entries: &[LogEntry],
    generation: u64,
    allocate: &mut dyn FnMut() -> Result<u64>,
    allocated: &mut Vec<u64>,
) -> Result<(Ptr, LogBlock, Vec<u64>)> {
    let meta = &vdi.store.meta;
    let mut freed = Vec::new();
    let head = st.header.log_head;
    let mut cur = match &st.log_block {
        Some(b) if b.entries.len() < LOG_ENTRIES_PER_BLOCK => {
            freed.push(head.addr());
            b.clone()
        }
        _ => LogBlock {
            prev: head,
            entries: Vec::new(),
        },
    };
    let mut write = |block: &LogBlock| -> Result<Ptr> {
        let addr = allocate()?;
        allocated.push(addr);
        let (b, crc) = block.encode(meta.store_id, addr, vdi.id, generation);
        meta.write_block(addr, &b, "a snapshot log block")?;
        Ok(Ptr::meta(addr, crc, true))
    };
    for e in entries {
        if cur.entries.len() == LOG_ENTRIES_PER_BLOCK {
            let p = write(&cur)?;
            cur = LogBlock {
                prev: p,
                entries: Vec::new(),
            };
        }
        cur.entries.push(e.clone());
    }
    let p = write(&cur)?;
    Ok((p, cur, freed))
}

/// Reads the whole snapshot log of a disk, oldest record first.
pub(crate) fn read_log_chain(
    store: &StoreInner,
    head: Ptr,
    owner: u64,
) -> Result<Vec<(u64, LogBlock)>> {
    let meta = &store.meta;
    let mut blocks = Vec::new();
    let mut p = head;
    while !p.is_null() {
        meta.check_ptr(p, "a snapshot log pointer")?;
        if blocks.len() as u64 > meta.total_blocks {
            return Err(Error::Inconsistent("snapshot log has a cycle".into()));
        }
        let raw = meta.read_block(p.addr(), "a snapshot log block")?;
        let (block, h, crc) = LogBlock::decode(&raw[..], p.addr(), Some(meta.store_id))?;
        if !p.matches_crc(crc) {
            return Err(parallax_format::FormatError::Stale {
                addr: p.addr(),
                found: crc & 0x7f_ffff,
                expected: p.check(),
            }
            .into());
        }
        if h.owner != owner {
            return Err(Error::Inconsistent(format!(
                "snapshot log block {} belongs to disk id {}, not {owner}",
                p.addr(),
                h.owner
            )));
        }
        let prev = block.prev;
        blocks.push((p.addr(), block));
        p = prev;
    }
    blocks.reverse();
    Ok(blocks)
}

fn load_log(
    store: &StoreInner,
    header: &VdiHeader,
) -> Result<(Vec<SnapshotInfo>, Option<LogBlock>)> {
    let blocks = read_log_chain(store, header.log_head, header.vdi_id)?;
    let mut snaps: Vec<SnapshotInfo> = Vec::new();
    for (_, b) in &blocks {
        for e in &b.entries {
            match e.kind {
                LogEntryKind::Taken => snaps.push(SnapshotInfo {
                    id: e.snapshot_id,
                    name: e.name.clone(),
                    created_ns: e.created_ns,
                    size_bytes: e.size_bytes,
                    root: e.root,
                }),
                LogEntryKind::Deleted => snaps.retain(|s| s.id != e.snapshot_id),
            }
        }
    }
    Ok((snaps, blocks.last().map(|(_, b)| b.clone())))
}

impl Vdi {
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    pub fn name(&self) -> String {
        self.inner.state.read().name.clone()
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.state.read().size
    }

    pub fn info(&self) -> VdiInfo {
        let st = self.inner.state.read();
        VdiInfo {
            id: self.inner.id,
            name: st.name.clone(),
            size_bytes: st.size,
            created_ns: st.header.created_ns,
            snapshot_count: st.snapshots.len() as u64,
            origin: (!st.header.origin.is_empty()).then(|| st.header.origin.clone()),
            generation: st.header.generation,
        }
    }

    /// Reads `buf.len()` bytes at `offset`. Unwritten ranges read as zeros.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let inner = &*self.inner;
        let st = inner.state.read();
        inner.usable(&st)?;
        check_io_range(st.size, offset, buf.len() as u64)?;
        read_tree(&inner.store, &st.tree, buf, offset)
    }

    /// Plans a READ for the caller to perform (see [`IoPlan`]). Never
    /// blocks: `Ok(None)` when the disk's lock is taken exclusively, the
    /// range is not block-aligned, a tree node is not in memory, or the
    /// store is not a file; then use [`Vdi::read`].
    pub fn try_plan_read(&self, offset: u64, len: usize) -> Result<Option<IoPlan>> {
        let Some(st) = self.inner.state.try_read_arc() else {
            return Ok(None);
        };
        self.inner.usable(&st)?;
        check_io_range(st.size, offset, len as u64)?;
        let plan = plan_read_tree(&self.inner.store, &st.tree, offset, len)?;
        Ok(plan.map(|p| IoPlan {
            _pin: Some(st),
            ..p
        }))
    }

    /// Plans a WRITE that goes entirely in place (every block already owned
    /// by the disk), for the caller to perform (see [`IoPlan`]). Never
    /// blocks: `Ok(None)` when the write must allocate, is not
    /// block-aligned, or for the reasons of [`Vdi::try_plan_read`]; then
    /// use [`Vdi::write`].
    pub fn try_plan_write(&self, offset: u64, len: usize) -> Result<Option<IoPlan>> {
        let Some(st) = self.inner.state.try_read_arc() else {
            return Ok(None);
        };
        self.inner.usable(&st)?;
        check_io_range(st.size, offset, len as u64)?;
        let store = &self.inner.store;
        let Some(fd) = store.meta.dev.raw_fd() else {
            return Ok(None);
        };
        if !offset.is_multiple_of(BLOCK_SIZE_U64) || !len.is_multiple_of(BLOCK_SIZE) || len == 0 {
            return Ok(None);
        }
        let first = offset / BLOCK_SIZE_U64;
        let mut runs = Runs::default();
        let mut in_place = true;
        let complete = st.tree.for_each_cached_entry(
            &store.meta,
            first,
            first + (len / BLOCK_SIZE) as u64,
            &mut |v, entry, writable| {
                in_place &= writable;
                if writable {
                    runs.push(v - first, entry.addr());
                }
                Ok(())
            },
        )?;
        if !complete || !in_place {
            return Ok(None);
        }
        Ok(Some(IoPlan {
            fd,
            transfers: runs.into_transfers(),
            zeros: Vec::new(),
            _pin: Some(st),
            _store: store.clone(),
        }))
    }

    /// Writes `data` at `offset`. Durable after the next [`Vdi::flush`].
    pub fn write(&self, data: &[u8], offset: u64) -> Result<()> {
        check_io_range(self.size(), offset, data.len() as u64)?;
        // Partial blocks at the edges one by one; the whole blocks between
        // them in one batch.
        let mut whole: Option<(u64, std::ops::Range<usize>)> = None;
        for (v, within, r) in pieces(offset, data.len()) {
            if r.len() < BLOCK_SIZE {
                self.inner.write_piece(v, within, &data[r])?;
            } else {
                match &mut whole {
                    Some((_, range)) => range.end = r.end,
                    None => whole = Some((v, r)),
                }
            }
        }
        if let Some((first, range)) = whole {
            self.inner.write_blocks(first, &data[range])?;
        }
        Ok(())
    }

    /// Makes every write completed before the call durable.
    ///
    /// When no metadata is pending (every write since the last commit went
    /// in place), this is a device flush under no disk lock: reads and
    /// writes of the disk go on meanwhile.
    pub fn flush(&self) -> Result<()> {
        {
            let st = self.inner.state.read();
            self.inner.usable(&st)?;
            if !st.has_pending() {
                drop(st);
                return self.inner.store.sync_bitmaps();
            }
        }
        let mut st = self.inner.state.write();
        self.inner.commit(&mut st, None)
    }

    /// Zeroes `[offset, offset+len)`: whole blocks are unmapped (and freed
    /// if this disk owned them), partial blocks are written with zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_or_discard(offset, len, true)
    }

    /// Discards `[offset, offset+len)`: whole blocks are unmapped and read
    /// as zeros afterwards; partial blocks at the edges are left unchanged.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_or_discard(offset, len, false)
    }

    fn zero_or_discard(&self, offset: u64, len: u64, zero_edges: bool) -> Result<()> {
        check_io_range(self.size(), offset, len)?;
        let end = offset + len;
        let first_full = offset.div_ceil(BLOCK_SIZE_U64);
        let last_full = end / BLOCK_SIZE_U64;
        if zero_edges {
            let zeros = vec![0u8; BLOCK_SIZE];
            if first_full > last_full {
                return self.write(&zeros[..len as usize], offset);
            }
            let head = first_full * BLOCK_SIZE_U64 - offset;
            if head > 0 {
                self.write(&zeros[..head as usize], offset)?;
            }
            let tail = end - last_full * BLOCK_SIZE_U64;
            if tail > 0 {
                self.write(&zeros[..tail as usize], last_full * BLOCK_SIZE_U64)?;
            }
        }
        if first_full >= last_full {
            return Ok(());
        }
        let inner = &*self.inner;
        let mut st = inner.state.write();
        inner.usable(&st)?;
        let mut mapped = Vec::new();
        st.tree
            .for_each_mapped(&inner.store.meta, first_full, last_full, &mut |v, _| {
                mapped.push(v);
                Ok(())
            })?;
        for v in mapped {
            inner.unmap_block(&mut st, v)?;
        }
        Ok(())
    }

    /// Allocation status of `[offset, offset+len)`, as block-aligned runs
    /// clipped to the range.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let st = self.inner.state.read();
        self.inner.usable(&st)?;
        check_io_range(st.size, offset, len)?;
        tree_extents(&self.inner.store, &st.tree, offset, len)
    }

    /// Bytes backed by data blocks (shared or owned).
    pub fn allocated_bytes(&self) -> Result<u64> {
        let st = self.inner.state.read();
        self.inner.usable(&st)?;
        count_mapped(&self.inner.store, &st.tree)
    }

    /// Grows the disk to `new_size` bytes (a multiple of 4096). Durable on return.
    pub fn grow(&self, new_size: u64) -> Result<()> {
        let mut st = self.inner.state.write();
        self.inner.usable(&st)?;
        if !new_size.is_multiple_of(BLOCK_SIZE_U64) || new_size > MAX_VDI_SIZE {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} must be a multiple of 4096 and at most {MAX_VDI_SIZE}"
            )));
        }
        if new_size < st.size {
            return Err(Error::InvalidArgument(format!(
                "disk {} is {} bytes; shrinking to {new_size} is not supported",
                st.name, st.size
            )));
        }
        st.size = new_size;
        st.header_dirty = true;
        self.inner.commit(&mut st, None)
    }

    /// Takes a snapshot (O(1)): commits, then records the committed root.
    /// `name: None` names it by the current UTC time. Durable on return.
    pub fn snapshot(&self, name: Option<&str>) -> Result<SnapshotInfo> {
        let mut st = self.inner.state.write();
        self.inner.usable(&st)?;
        let id = st.header.next_snapshot_id;
        let name = match name {
            Some(n) => {
                validate_name(n).map_err(Error::InvalidArgument)?;
                n.to_string()
            }
            None => format!("{}-{id}", compact_utc(now_ns())),
        };
        if st.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::AlreadyExists(format!(
                "snapshot {}@{name} already exists",
                st.name
            )));
        }
        self.inner.commit(&mut st, Some((id, name)))?;
        st.snapshots
            .last()
            .cloned()
            .ok_or_else(|| Error::Inconsistent("snapshot vanished after commit".into()))
    }

    /// Snapshots alive, oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.inner.state.read().snapshots.clone()
    }

    pub fn snapshot_info(&self, name: &str) -> Result<SnapshotInfo> {
        let st = self.inner.state.read();
        st.snapshots
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("snapshot {}@{name} does not exist", st.name)))
    }

    /// Deletes a snapshot. Its name disappears at once; clones made from it
    /// keep working because they reference its blocks themselves. Its
    /// blocks are not returned to the free pool here: `gc` reclaims those no
    /// longer reachable from any disk or snapshot.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        let mut st = self.inner.state.write();
        self.inner.usable(&st)?;
        let Some(pos) = st.snapshots.iter().position(|s| s.name == name) else {
            return Err(Error::NotFound(format!(
                "snapshot {}@{name} does not exist",
                st.name
            )));
        };
        let snap = st.snapshots.remove(pos);
        st.pending_log.push(LogEntry {
            kind: LogEntryKind::Deleted,
            snapshot_id: snap.id,
            created_ns: now_ns(),
            root: Ptr::NULL,
            size_bytes: 0,
            name: String::new(),
        });
        let result = self.inner.commit(&mut st, None);
        if result.is_err() && !st.poisoned {
            st.pending_log.pop();
            st.snapshots.insert(pos, snap);
        }
        result
    }

    /// Rolls the disk back to a snapshot: its content becomes the
    /// snapshot's, and the blocks only the current content used are freed.
    /// Durable on return. The snapshot itself stays.
    pub fn rollback(&self, name: &str) -> Result<()> {
        let snap = self.snapshot_info(name)?;
        let inner = &*self.inner;
        let mut st = inner.state.write();
        inner.usable(&st)?;
        let owned = inner.live_owned_blocks(&st)?;
        let old = std::mem::replace(
            &mut st.tree,
            Tree::shared_copy(&inner.store.meta, snap.root)?,
        );
        let old_size = st.size;
        let old_free = std::mem::replace(&mut st.pending_free, owned);
        st.size = snap.size_bytes;
        st.header_dirty = true;
        if let Err(e) = inner.commit(&mut st, None) {
            if !st.poisoned {
                st.tree = old;
                st.size = old_size;
                st.pending_free = old_free;
            }
            return Err(e);
        }
        Ok(())
    }
}

pub(crate) fn read_tree(
    store: &StoreInner,
    tree: &Tree,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let first = offset / BLOCK_SIZE_U64;
    let end = (offset + buf.len() as u64).div_ceil(BLOCK_SIZE_U64);
    let mut entries = Vec::with_capacity((end - first) as usize);
    tree.for_each_entry(&store.meta, first, end, &mut |_, entry, _| {
        entries.push(entry);
        Ok(())
    })?;
    // Whole mapped blocks are read in runs of consecutive addresses, each
    // with one `read_at` straight into the caller's buffer.
    let mut runs = Runs::default();
    let mut partial = Vec::new();
    for ((_, within, r), entry) in pieces(offset, buf.len()).zip(entries) {
        if entry.is_null() {
            buf[r].fill(0);
        } else if r.len() == BLOCK_SIZE {
            runs.push_range(r, entry.addr());
        } else {
            partial.push((within, r, entry.addr()));
        }
    }
    let read = |addr: u64, out: &mut [u8]| {
        store
            .meta
            .dev
            .read_at(out, addr * BLOCK_SIZE_U64)
            .map_err(Error::io(format!("reading data block {addr}")))
    };
    for run in runs.0 {
        read(run.addr, &mut buf[run.bytes()])?;
    }
    if !partial.is_empty() {
        let mut block = parallax_device::AlignedBuf::zeroed(BLOCK_SIZE);
        for (within, r, addr) in partial {
            read(addr, &mut block)?;
            buf[r.clone()].copy_from_slice(&block[within..within + r.len()]);
        }
    }
    Ok(())
}

/// One device transfer: consecutive blocks at consecutive addresses.
struct Run {
    /// First device block.
    addr: u64,
    /// Byte range in the caller's buffer.
    start: usize,
    end: usize,
}

impl Run {
    fn bytes(&self) -> std::ops::Range<usize> {
        self.start..self.end
    }
}

/// Gathers whole-block transfers into [`Run`]s.
#[derive(Default)]
struct Runs(Vec<Run>);

impl Runs {
    fn into_transfers(self) -> Vec<Transfer> {
        self.0
            .into_iter()
            .map(|r| Transfer {
                device_offset: r.addr * BLOCK_SIZE_U64,
                buf: r.start..r.end,
            })
            .collect()
    }

    /// Adds whole block `k` of the caller's buffer, at device block `addr`.
    fn push(&mut self, k: u64, addr: u64) {
        let start = k as usize * BLOCK_SIZE;
        self.push_range(start..start + BLOCK_SIZE, addr);
    }

    fn push_range(&mut self, r: std::ops::Range<usize>, addr: u64) {
        if let Some(last) = self.0.last_mut() {
            let blocks = ((last.end - last.start) / BLOCK_SIZE) as u64;
            if last.end == r.start && last.addr + blocks == addr {
                last.end = r.end;
                return;
            }
        }
        self.0.push(Run {
            addr,
            start: r.start,
            end: r.end,
        });
    }
}

fn tree_extents(store: &StoreInner, tree: &Tree, offset: u64, len: u64) -> Result<Vec<Extent>> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |start: u64, stop: u64, allocated: bool| {
        if stop <= start {
            return;
        }
        match out.last_mut() {
            Some(last) if last.allocated == allocated && last.offset + last.length == start => {
                last.length += stop - start
            }
            _ => out.push(Extent {
                offset: start,
                length: stop - start,
                allocated,
            }),
        }
    };
    let first = offset / BLOCK_SIZE_U64;
    let last = end.div_ceil(BLOCK_SIZE_U64);
    let mut cursor = offset;
    tree.for_each_mapped(&store.meta, first, last, &mut |v, _| {
        let start = (v * BLOCK_SIZE_U64).max(offset);
        let stop = ((v + 1) * BLOCK_SIZE_U64).min(end);
        push(cursor, start, false);
        push(start, stop, true);
        cursor = stop;
        Ok(())
    })?;
    push(cursor, end, false);
    Ok(out)
}

fn count_mapped(store: &StoreInner, tree: &Tree) -> Result<u64> {
    let mut n = 0u64;
    tree.for_each_mapped(&store.meta, 0, MAX_VIRTUAL_BLOCKS, &mut |_, _| {
        n += 1;
        Ok(())
    })?;
    Ok(n * BLOCK_SIZE_U64)
}

impl SnapshotView {
    pub(crate) fn new(store: Arc<StoreInner>, disk: String, info: SnapshotInfo) -> Self {
        SnapshotView {
            store,
            tree: Tree::open(info.root),
            info,
            disk,
        }
    }

    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    /// `NAME@SNAP`.
    pub fn full_name(&self) -> String {
        format!("{}@{}", self.disk, self.info.name)
    }

    pub fn size(&self) -> u64 {
        self.info.size_bytes
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_io_range(self.info.size_bytes, offset, buf.len() as u64)?;
        read_tree(&self.store, &self.tree, buf, offset)
    }

    /// Plans a READ for the caller to perform, as [`Vdi::try_plan_read`].
    pub fn try_plan_read(&self, offset: u64, len: usize) -> Result<Option<IoPlan>> {
        check_io_range(self.info.size_bytes, offset, len as u64)?;
        plan_read_tree(&self.store, &self.tree, offset, len)
    }

    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_io_range(self.info.size_bytes, offset, len)?;
        tree_extents(&self.store, &self.tree, offset, len)
    }

    pub fn allocated_bytes(&self) -> Result<u64> {
        count_mapped(&self.store, &self.tree)
    }
}
