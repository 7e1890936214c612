//! The local persistent read cache: copies of immutable pool blocks on a
//! local device, in front of a pool that may be slow or networked.
//!
//! What may be cached, and when a copy may be served, is the engine's
//! business (see `parallax-engine`'s `read_cache` module): it hands over
//! blocks with an [`Anchor`], a version (disk, snapshot, creation time)
//! whose tree held the block when it was read, and on lookup says which
//! anchors it accepts. A block stays unchanged on the pool as long as a
//! version holding it exists, so a copy is right whenever the reader knows
//! its anchor still exists. This crate keeps the copies:
//!
//! - **Persistent**: the index is on the device (`layout`), read back at
//!   [`ReadCache::open`]; a cache bound to another store is wiped.
//! - **Verified**: every hit is checked against the crc32c of (address,
//!   anchor, bytes) held in memory; a copy that fails is dropped and the
//!   read goes to the pool. A torn slot or index entry after a crash is a
//!   miss, never wrong data. The cache never flushes: it promises nothing
//!   after a crash but that.
//! - **Scan-resistant**: entries are kept by `quick_cache`'s S3-FIFO-like
//!   policy (a block read once stays on probation), so one sequential read
//!   of a disk does not push out the blocks every clone's boot reads.
//! - **Given up when its device fails**: after 64 device errors in a row
//!   it serves and takes nothing more until the daemon restarts (a pulled
//!   disk costs no more attempts); reads go to the pool.
//! - **Off the request path**: [`ReadCache::offer`] copies the block into
//!   a bounded queue (full: the copy is dropped) that one filler thread
//!   writes out; until then lookups find the copy in memory. Lookups never
//!   wait for the device.
//! - **One pool read per block in a storm**: readers that miss fetch under
//!   [`ReadCache::lock_fetches`], so that many clones reading one block at
//!   once read it from the pool once and the others from memory.
//!
//! Invariants: a slot is in the map or the free list, never both (one
//! filler thread takes and fills slots; evictions and dropped copies give
//! theirs back); an index entry on the device is written only after its
//! slot's bytes, and is believed only together with a crc over them.

pub mod layout;
pub mod write_log;

pub use write_log::{Found, LogStats, WriteLog};

use layout::{data_crc, Geometry, IndexEntry, Superblock, BLOCK, ENTRIES_PER_BLOCK, ENTRY_BYTES};
use parallax_device::{AlignedBuf, BlockDevice};
use parking_lot::Mutex;
use quick_cache::sync::Cache;
use quick_cache::{Lifecycle, UnitWeighter};
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Copies waiting for the filler thread; more are dropped.
const FILL_QUEUE: usize = 4096;
/// Copies the filler writes before it writes the index blocks they touched.
const FILL_BATCH: usize = 256;

/// A version whose tree held a block: disk id, snapshot id and the
/// snapshot's creation time (ids can come back after a crash lost their
/// commit; the time tells them apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Anchor {
    pub vdi: u64,
    pub snap: u64,
    pub created_ns: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    slot: u32,
    anchor: Anchor,
    crc: u32,
}

/// A copy found by [`ReadCache::probe`]: read it with
/// [`ReadCache::read`], or read [`Hit::offset`] of [`ReadCache::device`]
/// yourself and check it with [`ReadCache::verify`].
#[derive(Debug, Clone)]
pub struct Hit {
    pub addr: u64,
    anchor: Anchor,
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    /// On the device, checked against `crc` when read.
    Slot { slot: u32, crc: u32, offset: u64 },
    /// Offered and not written yet: the bytes read from the pool.
    Memory(Arc<[u8]>),
}

impl Hit {
    /// Byte offset of the copy on the cache device; `None` for a copy
    /// still in memory, on its way there.
    pub fn offset(&self) -> Option<u64> {
        match self.source {
            Source::Slot { offset, .. } => Some(offset),
            Source::Memory(_) => None,
        }
    }

    /// The version the copy is filed under (one the reader accepted: a
    /// block read again from the pool may be filed under it again).
    pub fn anchor(&self) -> Anchor {
        self.anchor
    }
}

/// Counters since the cache was opened, and its size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads of cacheable blocks served from the cache, a reader that
    /// waited for another's fetch of the block included (copies that then
    /// failed their check are counted in `corrupt` too).
    pub hits: u64,
    /// Reads of cacheable blocks fetched from the pool.
    pub misses: u64,
    /// Copies written to the cache device.
    pub fills: u64,
    /// Copies dropped: the queue was full, or the device failed them.
    pub dropped: u64,
    /// Copies that failed their check when read (a miss then).
    pub corrupt: u64,
    /// Cache device I/O errors (each one a miss or a dropped copy).
    pub errors: u64,
    /// Copies held now.
    pub entries: u64,
    /// Copies it can hold.
    pub slots: u64,
    /// Given up after [`ERRORS_TO_GIVE_UP`] device errors in a row: no
    /// lookup finds anything, nothing is copied in.
    pub given_up: bool,
}

/// Gives an evicted entry's slot back to the free list.
#[derive(Clone)]
struct ReturnSlot(Arc<Mutex<Vec<u32>>>);

impl Lifecycle<u64, Entry> for ReturnSlot {
    type RequestState = ();

    fn begin_request(&self) {}

    fn on_evict(&self, _: &mut (), _: u64, entry: Entry) {
        self.0.lock().push(entry.slot);
    }
}

/// Device errors in a row after which the cache is given up (until the
/// daemon restarts): a device that went away costs no more attempts.
const ERRORS_TO_GIVE_UP: u64 = 64;

#[derive(Default)]
struct Counters {
    /// Device errors since the last call that worked.
    failing: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    fills: AtomicU64,
    dropped: AtomicU64,
    corrupt: AtomicU64,
    errors: AtomicU64,
}

struct Inner {
    dev: Arc<dyn BlockDevice>,
    store_id: u64,
    geometry: Geometry,
    map: Cache<u64, Entry, UnitWeighter, std::collections::hash_map::RandomState, ReturnSlot>,
    free: Arc<Mutex<Vec<u32>>>,
    /// The index as on the device, and the index blocks changed since
    /// they were last written (filler thread only).
    index: Mutex<(AlignedBuf, BTreeSet<u64>)>,
    /// Copies offered and not written yet, served from memory meanwhile
    /// (one per queued fill at most).
    pending: Mutex<HashMap<u64, Pending>>,
    /// [`ReadCache::lock_fetches`]'s stripes.
    fetching: Vec<Mutex<()>>,
    counters: Counters,
}

/// A copy on its way to the device: its anchor and bytes.
type Pending = (Anchor, Arc<[u8]>);

/// Stripes of [`ReadCache::lock_fetches`].
const FETCH_STRIPES: usize = 256;

struct Fill {
    addr: u64,
    anchor: Anchor,
    data: Arc<[u8]>,
}

/// Held while a reader fetches blocks from the pool: see
/// [`ReadCache::lock_fetches`].
pub struct FetchGuard<'a> {
    _held: Vec<parking_lot::MutexGuard<'a, ()>>,
}

/// Work for the filler thread, in order.
enum Job {
    Fill(Fill),
    /// Write the index, then answer.
    Sync(SyncSender<()>),
}

/// See the module documentation.
pub struct ReadCache {
    inner: Arc<Inner>,
    /// Taken in `drop` (which has the cache to itself), before the join.
    fills: Option<SyncSender<Job>>,
    filler: Option<JoinHandle<()>>,
}

impl ReadCache {
    /// Opens the cache on `dev` for the store `store_id`: its copies come
    /// back if it was this store's; otherwise (another store, another
    /// size, no cache yet, a damaged superblock) it starts empty.
    pub fn open(dev: Arc<dyn BlockDevice>, store_id: u64) -> io::Result<ReadCache> {
        let geometry = Geometry::for_len(dev.len()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a cache of {} bytes is too small (at least {} bytes)",
                    dev.len(),
                    3 * BLOCK
                ),
            )
        })?;
        let mut sb = AlignedBuf::zeroed(BLOCK);
        dev.read_at(&mut sb, 0)?;
        let wanted = Superblock { store_id, geometry };
        let index_len = geometry.index_blocks as usize * BLOCK;
        let mut index = AlignedBuf::zeroed(index_len);
        if Superblock::decode(&sb) == Some(wanted) {
            dev.read_at(&mut index, geometry.index_offset(0))?;
        } else {
            // Index first, superblock last: a cut leaves no superblock
            // that names an index of another store.
            const CHUNK: usize = 256 * BLOCK;
            for start in (0..index_len).step_by(CHUNK) {
                let end = (start + CHUNK).min(index_len);
                dev.write_at(&index[start..end], geometry.index_offset(0) + start as u64)?;
            }
            dev.flush()?;
            dev.write_at(&wanted.encode(), 0)?;
            dev.flush()?;
        }
        let free = Arc::new(Mutex::new(Vec::new()));
        // A few slots beyond the map's capacity, so the filler always has
        // one to fill before the map evicts.
        let spare = (geometry.slots / 64).clamp(2, 1024);
        let capacity = geometry.slots.saturating_sub(spare).max(1);
        let map = Cache::with(
            capacity as usize,
            capacity,
            UnitWeighter,
            Default::default(),
            ReturnSlot(free.clone()),
        );
        for slot in 0..geometry.slots as usize {
            let at = slot * ENTRY_BYTES;
            if let Some(e) = IndexEntry::decode(&index[at..at + ENTRY_BYTES]) {
                if !map.contains_key(&e.addr) {
                    map.insert(
                        e.addr,
                        Entry {
                            slot: slot as u32,
                            anchor: e.anchor,
                            crc: e.crc,
                        },
                    );
                }
            }
        }
        {
            let mut used = vec![false; geometry.slots as usize];
            for (_, e) in map.iter() {
                used[e.slot as usize] = true;
            }
            let mut free = free.lock();
            free.clear();
            free.extend(
                (0..geometry.slots as u32)
                    .rev()
                    .filter(|&s| !used[s as usize]),
            );
        }
        let inner = Arc::new(Inner {
            dev,
            store_id,
            geometry,
            map,
            free,
            index: Mutex::new((index, BTreeSet::new())),
            pending: Mutex::new(HashMap::new()),
            fetching: (0..FETCH_STRIPES).map(|_| Mutex::new(())).collect(),
            counters: Counters::default(),
        });
        let (tx, rx) = sync_channel(FILL_QUEUE);
        let worker = inner.clone();
        let filler = std::thread::Builder::new()
            .name("cache-fill".into())
            .spawn(move || worker.fill_loop(rx))?;
        Ok(ReadCache {
            inner,
            fills: Some(tx),
            filler: Some(filler),
        })
    }

    /// The store it holds blocks of.
    pub fn store_id(&self) -> u64 {
        self.inner.store_id
    }

    /// The device the copies are on.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.inner.dev
    }

    /// A copy of pool block `addr` under an anchor `accept` takes. Never
    /// touches the device; counts nothing (see [`ReadCache::count`]).
    pub fn probe(&self, addr: u64, accept: impl Fn(&Anchor) -> bool) -> Option<Hit> {
        if self.inner.given_up() {
            return None;
        }
        // The map first: a warm hit takes no lock but its shard's.
        if let Some(e) = self.inner.map.get(&addr).filter(|e| accept(&e.anchor)) {
            return Some(Hit {
                addr,
                anchor: e.anchor,
                source: Source::Slot {
                    slot: e.slot,
                    crc: e.crc,
                    offset: self.inner.geometry.slot_offset(e.slot),
                },
            });
        }
        let pending = self.inner.pending.lock();
        let (anchor, data) = pending.get(&addr).filter(|(a, _)| accept(a))?;
        Some(Hit {
            addr,
            anchor: *anchor,
            source: Source::Memory(data.clone()),
        })
    }

    /// Counts `n` lookups made with [`ReadCache::probe`] as hits or misses.
    pub fn count(&self, hit: bool, n: u64) {
        let c = &self.inner.counters;
        if hit {
            c.hits.fetch_add(n, Ordering::Relaxed);
        } else {
            c.misses.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Reads a hit's copy into `buf` (one block); `false` if it failed its
    /// check or the device failed (the copy is dropped then): read the
    /// pool instead.
    pub fn read(&self, hit: &Hit, buf: &mut [u8]) -> bool {
        let (slot, crc, offset) = match &hit.source {
            Source::Memory(data) => {
                if buf.len() != data.len() {
                    return false;
                }
                buf.copy_from_slice(data);
                return true;
            }
            Source::Slot { slot, crc, offset } => (*slot, *crc, *offset),
        };
        if self.inner.dev.read_at(buf, offset).is_err() {
            self.inner.device_failed();
            self.drop_copy(hit.addr, slot, crc);
            return false;
        }
        self.inner.device_worked();
        self.verify(hit, buf)
    }

    /// Whether `data`, read from [`Hit::offset`] by the caller, is the copy
    /// the hit names. If not, the copy is dropped (and counted as corrupt):
    /// read the pool instead.
    pub fn verify(&self, hit: &Hit, data: &[u8]) -> bool {
        let (slot, crc) = match &hit.source {
            Source::Memory(mem) => return **mem == *data,
            Source::Slot { slot, crc, .. } => (*slot, *crc),
        };
        if data.len() == BLOCK && data_crc(hit.addr, &hit.anchor, data) == crc {
            return true;
        }
        self.inner.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        self.drop_copy(hit.addr, slot, crc);
        false
    }

    /// Forgets the copy in `slot`, if the map still holds that one (the
    /// slot may have been refilled for another block meanwhile).
    fn drop_copy(&self, addr: u64, slot: u32, crc: u32) {
        let same = |e: &Entry| e.slot == slot && e.crc == crc;
        if let Some((_, e)) = self.inner.map.remove_if(&addr, same) {
            self.inner.free.lock().push(e.slot);
        }
    }

    /// Keeps other readers from fetching the blocks `addrs` from the pool
    /// while the caller does (a boot storm: many clones read one block at
    /// once). The caller probes again under the guard, reads what is still
    /// missing and offers it: the others then find it in memory. Stripes
    /// are taken in order, so two callers never wait for each other.
    pub fn lock_fetches(&self, addrs: &[u64]) -> FetchGuard<'_> {
        let mut stripes: Vec<usize> = addrs
            .iter()
            .map(|a| (a.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as usize % FETCH_STRIPES)
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        FetchGuard {
            _held: stripes
                .into_iter()
                .map(|i| self.inner.fetching[i].lock())
                .collect(),
        }
    }

    /// Queues a copy of pool block `addr` (one block), read through a
    /// version `anchor` names; until it is written, lookups find it in
    /// memory. Never waits: dropped if the queue is full.
    pub fn offer(&self, addr: u64, anchor: Anchor, data: &[u8]) {
        if data.len() != BLOCK || self.inner.given_up() {
            return;
        }
        if self
            .inner
            .map
            .peek(&addr)
            .is_some_and(|e| e.anchor == anchor)
        {
            return;
        }
        let data: Arc<[u8]> = data.into();
        {
            let mut pending = self.inner.pending.lock();
            if pending.get(&addr).is_some_and(|(a, _)| *a == anchor) {
                return;
            }
            pending.insert(addr, (anchor, data.clone()));
        }
        let fill = Fill { addr, anchor, data };
        let refused = match &self.fills {
            Some(tx) => match tx.try_send(Job::Fill(fill)) {
                Ok(()) => None,
                Err(
                    TrySendError::Full(Job::Fill(f)) | TrySendError::Disconnected(Job::Fill(f)),
                ) => Some(f),
                Err(_) => None,
            },
            None => Some(fill),
        };
        if let Some(f) = refused {
            self.inner.unpend(&f);
            self.inner.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until every copy offered so far is written, index included.
    pub fn sync(&self) {
        let (ack, done) = sync_channel(1);
        let sent = match &self.fills {
            Some(tx) => tx.send(Job::Sync(ack)).is_ok(),
            None => false,
        };
        if sent {
            let _ = done.recv();
        }
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            fills: c.fills.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            entries: self.inner.map.len() as u64,
            slots: self.inner.geometry.slots,
            given_up: self.inner.given_up(),
        }
    }
}

impl std::fmt::Debug for ReadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCache")
            .field("store_id", &self.inner.store_id)
            .field("slots", &self.inner.geometry.slots)
            .finish()
    }
}

impl Drop for ReadCache {
    /// Stops the filler after it wrote what was queued.
    fn drop(&mut self) {
        self.fills.take();
        if let Some(t) = self.filler.take() {
            let _ = t.join();
        }
    }
}

impl Inner {
    fn given_up(&self) -> bool {
        self.counters.failing.load(Ordering::Relaxed) >= ERRORS_TO_GIVE_UP
    }

    fn device_failed(&self) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        self.counters.failing.fetch_add(1, Ordering::Relaxed);
    }

    fn device_worked(&self) {
        if self.counters.failing.load(Ordering::Relaxed) != 0 && !self.given_up() {
            self.counters.failing.store(0, Ordering::Relaxed);
        }
    }

    fn fill_loop(&self, rx: Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            let mut filled = 0;
            while let Some(job) = next.take() {
                match job {
                    Job::Fill(f) => {
                        self.store(&f);
                        self.unpend(&f);
                        filled += 1;
                    }
                    Job::Sync(ack) => {
                        self.write_index();
                        let _ = ack.send(());
                    }
                }
                if filled < FILL_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            self.write_index();
        }
        self.write_index();
        let _ = self.dev.flush();
    }

    /// Forgets the in-memory copy of `f` (if it is still that one).
    fn unpend(&self, f: &Fill) {
        let mut pending = self.pending.lock();
        if pending
            .get(&f.addr)
            .is_some_and(|(_, d)| Arc::ptr_eq(d, &f.data))
        {
            pending.remove(&f.addr);
        }
    }

    /// Writes one copy into a free slot and enters it (filler thread only).
    fn store(&self, f: &Fill) {
        if self.given_up() || self.map.peek(&f.addr).is_some_and(|e| e.anchor == f.anchor) {
            return;
        }
        if let Some((_, old)) = self.map.remove(&f.addr) {
            self.free.lock().push(old.slot);
        }
        let Some(slot) = self.free.lock().pop() else {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // The device bounces it through an aligned buffer if it must.
        if self
            .dev
            .write_at(&f.data, self.geometry.slot_offset(slot))
            .is_err()
        {
            self.device_failed();
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            self.free.lock().push(slot);
            return;
        }
        self.device_worked();
        let crc = data_crc(f.addr, &f.anchor, &f.data);
        {
            let mut index = self.index.lock();
            let at = slot as usize * ENTRY_BYTES;
            IndexEntry {
                addr: f.addr,
                anchor: f.anchor,
                crc,
            }
            .encode(&mut index.0[at..at + ENTRY_BYTES]);
            index.1.insert(slot as u64 / ENTRIES_PER_BLOCK as u64);
        }
        self.map.insert(
            f.addr,
            Entry {
                slot,
                anchor: f.anchor,
                crc,
            },
        );
        self.counters.fills.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes the index blocks changed since the last call.
    fn write_index(&self) {
        let mut index = self.index.lock();
        let dirty = std::mem::take(&mut index.1);
        for b in dirty {
            // Block-aligned in an aligned buffer: no bounce under O_DIRECT.
            let at = b as usize * BLOCK;
            if self
                .dev
                .write_at(&index.0[at..at + BLOCK], self.geometry.index_offset(b))
                .is_err()
            {
                self.device_failed();
            }
        }
    }
}
