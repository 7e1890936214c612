//! The write-back log: the pool's writes appended to a local device,
//! acknowledged as durable when that device has them, and written to the
//! pool ("destaged") in order in the background.
//!
//! [`WriteLog`] is a [`BlockDevice`] in front of the pool device. It has two
//! modes:
//!
//! - **Direct**: every call goes to the pool, the log is empty. This is the
//!   mode while no disk wants write-back, so write-through disks pay nothing.
//! - **Logging**: every write of the whole pool (data, tree nodes, headers,
//!   bitmaps, the catalogue) becomes a record of the log, in one order (the
//!   LSN), and discards are ignored (the engine sends none; a discard is a
//!   hint whose range reads as unspecified); reads see the newest record of a block before the
//!   pool; a flush makes the records durable on the log device, not the
//!   pool. Records are destaged in LSN order, a batch at a time: the
//!   batch's blocks written to the pool, the pool flushed, then the log's
//!   durable tail moved past the batch.
//!
//! Records are written by the log itself (`write_at`, blocking), or placed
//! by [`BlockDevice::plan_fd_write`] for a caller that writes them by file
//! descriptor (the daemon's io_uring): placing gives them their LSNs and
//! ring positions at once, and they count as written when the caller ends
//! the plan ([`FdWrite::end`]), which writes them again itself if the
//! caller's transfers failed.
//!
//! Two destager threads take turns, one batch at a time (under
//! `destaging`): a background one at nice 19, so that a burst's writers
//! get the CPU first and the log absorbs it, and an urgent one at the
//! daemon's priority that only runs while something waits for the destage
//! (a drain, a writer waiting for room in the ring).
//!
//! Why the pool stays consistent: the log is one ordered stream of every
//! write the pool would have seen, and the pool receives a prefix of it
//! followed by a pool flush, batch after batch, and no batch spans a
//! flush of the stream (the first record after a flush is marked a
//! barrier, in its header, so replayed records keep them too). The
//! writes of one batch land in any order, as the writes between two
//! flushes may on a plain device; so the pool alone is always a state a
//! power cut could have left there, one the store's own crash argument
//! (FORMAT.md §11) accepts: older than the log, never torn. With the log,
//! replay restores every record up to the point a flush made durable, so
//! nothing acknowledged is lost.
//!
//! Invariants:
//! - A flush waits until every record with a lower LSN has been written
//!   (not just its own), so replay, which stops at the first record that
//!   does not check out, never stops before a flushed record.
//! - Records carry the log's id, their own position and the session (one
//!   per open of the log, durable with its first LSN in the superblock
//!   before it writes): replay accepts a chain of consecutive LSNs whose
//!   sessions never go down and, from the last session's first LSN on, are
//!   of that session or later. So a stale record of an earlier session
//!   left after a crash is never taken for a new one, even when the
//!   durable tail points right at it.
//! - Space is reused only after the durable tail passed it, and a block's
//!   entry in the dirty map is dropped (after its pool write was flushed)
//!   before the tail moves; a reader that read a record's bytes checks its
//!   entry again afterwards and reads the pool if the entry changed.
//! - No file descriptor of the pool is lent (for io_uring) while logging;
//!   the destager writes nothing while one lent before is still out, and a
//!   flush in logging mode also flushes the pool until all are back.
//!   Switching back to direct happens only with no record left.

use crate::layout::BLOCK;
use parallax_device::{AlignedBuf, BlockDevice, EndFdWrite, FdLease, FdTransfer, FdWrite};
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const BLOCK_U64: u64 = BLOCK as u64;
const SB_MAGIC: &[u8; 8] = b"PXWLOG02";
const REC_MAGIC: &[u8; 8] = b"PXWLREC1";
/// The two superblock copies are blocks 0 and 1; the ring follows.
const RING_START: u64 = 2;
/// Payload blocks of one record; longer writes take several.
const MAX_RECORD_BLOCKS: u64 = 256;
/// The smallest log region (bytes): room for a few of the longest records.
pub const MIN_LOG_BYTES: u64 = 8 << 20;
/// Payload blocks the destager moves per batch (one pool flush each).
const BATCH_BLOCKS: u64 = 4096;
/// Pool writes a batch has in flight at once (a networked pool answers
/// each after its latency: the destage rate is about this many requests
/// per round trip).
const DESTAGE_THREADS: usize = 32;
/// The nice value of the background destager (and of the threads of its
/// batches): during a burst the writers come first.
const BACKGROUND_NICE: i32 = 19;

/// The two destager threads: see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Destager {
    /// Destages whenever records are ready, at a low CPU priority.
    Background,
    /// At the daemon's priority, only while something waits for the
    /// destage (a drain, a writer waiting for room in the ring). A thread
    /// of its own because an unprivileged thread cannot lower its nice
    /// value again.
    Urgent,
}

const KIND_WRITE: u32 = 1;
const KIND_PAD: u32 = 3;

/// A record of the log not yet destaged.
#[derive(Debug, Clone, Copy)]
struct Rec {
    lsn: u64,
    /// Ring block of its header.
    pos: u64,
    /// Ring blocks it takes (header and payload; a pad: the rest of the ring).
    len: u64,
    kind: Kind,
    /// The first record after a flush: every record before it reaches the
    /// pool (flushed there) before it does.
    barrier: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write { pool_block: u64, blocks: u64 },
    Pad,
}

/// The newest record of a pool block that is not destaged yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dirty {
    lsn: u64,
    /// Ring block holding the bytes.
    at: u64,
}

struct State {
    next_lsn: u64,
    /// A flush started since the last record was allocated: the next one
    /// is a barrier.
    barrier_next: bool,
    /// Ring block where the next record goes.
    head: u64,
    /// Durable tail: where replay would start.
    tail: u64,
    tail_lsn: u64,
    /// Ring blocks between the durable tail and the head.
    used: u64,
    session: u64,
    /// The first LSN this session writes (what replay knew at open).
    session_start: u64,
    sb_seq: u64,
    records: VecDeque<Rec>,
    /// Payload blocks of write records in `records` (status reads it; a
    /// scrape must not walk millions of records under this lock).
    record_blocks: u64,
    /// LSNs written, above `written_upto`.
    done: BTreeSet<u64>,
    /// Every LSN below it has been written.
    written_upto: u64,
    /// Every LSN below it is durable on the log device.
    durable: u64,
    logging: bool,
    wanted: bool,
    stop: bool,
    /// The log device failed: nothing more is appended or acknowledged.
    failed: Option<String>,
    /// The last destage failure (retried), for status.
    destage_error: Option<String>,
}

/// Counters of a [`WriteLog`] (bytes are whole 4 KiB blocks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Logging (some disk wants write-back, or records are left).
    pub logging: bool,
    /// Bytes written to the log and not yet to the pool.
    pub dirty_bytes: u64,
    /// Bytes of the log in use (records not yet past the durable tail).
    pub used_bytes: u64,
    pub size_bytes: u64,
    pub appended_bytes: u64,
    pub destaged_bytes: u64,
    pub flushes: u64,
    /// Records found at open and replayed.
    pub replayed: u64,
    /// Pool writes that failed while destaging (each retried).
    pub destage_errors: u64,
    /// Why the log stopped taking writes, if it did.
    pub failed: Option<String>,
}

struct Shared {
    pool: Arc<dyn BlockDevice>,
    dev: Arc<dyn BlockDevice>,
    id: u64,
    store_id: u64,
    locator: u64,
    ring_end: u64,
    state: Mutex<State>,
    /// Signalled when records are written, destaged or space frees up.
    changed: Condvar,
    /// What the destagers wait on, besides a 50 ms poll: signalled when a
    /// thread starts waiting for the destage and when the log stops (not
    /// at every record written: a wake-up per write costs a context
    /// switch of an idle destager).
    destage_wake: Condvar,
    /// Threads waiting on `changed`.
    sleepers: AtomicUsize,
    dirty: Mutex<HashMap<u64, Dirty>>,
    dirty_count: AtomicUsize,
    /// Held shared by every write and discard; taken exclusively to switch
    /// between direct and logging.
    switch: RwLock<()>,
    logging: AtomicBool,
    leases: AtomicU64,
    pool_unflushed: AtomicBool,
    /// One log-device flush at a time (others wait and find theirs done).
    flush_lock: Mutex<()>,
    /// Read-modify-write of partial blocks, one at a time.
    rmw: Mutex<()>,
    appended: AtomicU64,
    destaged: AtomicU64,
    flushes: AtomicU64,
    replayed: AtomicU64,
    destage_errors: AtomicU64,
    /// Held by the destager around each batch (its pool writes, the dirty
    /// entries dropped, the durable tail moved), and by
    /// [`WriteLog::write_through`]: a block with no dirty entry under it has
    /// no record the durable tail has not passed.
    destaging: Mutex<()>,
    /// Whether the destager may write the pool now (cluster mode: this
    /// appliance is not fenced); unset: always.
    gate: RwLock<Option<DestageGate>>,
    /// The log was given up (cluster mode: the operator forgot it while this
    /// appliance was fenced): nothing more is destaged, ever.
    given_up: AtomicBool,
    /// Threads waiting for the destage (see [`Destager::Urgent`]).
    waiting: AtomicUsize,
    /// Tests only: the background destager stays idle.
    background_paused: AtomicBool,
}

/// A thread waiting for the destage, counted while it lives.
struct Waiting<'a>(&'a Shared);

impl<'a> Waiting<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.waiting.fetch_add(1, Ordering::SeqCst);
        shared.destage_wake.notify_all();
        Waiting(shared)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether the destager may write the pool now; see
/// [`WriteLog::set_destage_gate`].
pub type DestageGate = Arc<dyn Fn() -> bool + Send + Sync>;

/// See the module documentation.
pub struct WriteLog {
    shared: Arc<Shared>,
    destagers: Vec<JoinHandle<()>>,
}

/// What [`WriteLog::open`] found on the log device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A new log: nothing there, a log of another store or size, or an
    /// empty log the pool does not name (after a clean stop).
    Formatted,
    /// A log of this store holding records the pool does not name (they
    /// were given up on purpose, or the pool moved on without them):
    /// dropped, never replayed over a pool that is newer.
    Dropped,
    /// This store's log; its records were replayed.
    Replayed,
}

fn io_err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

/// Why a destage batch stopped halfway: the destager was held back (see
/// `Shared::held_back`), not a failure of the pool.
#[derive(Debug)]
struct HeldBack(String);

impl std::fmt::Display for HeldBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HeldBack {}

fn held_back_error(why: String) -> io::Error {
    io::Error::other(HeldBack(why))
}

fn put(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// A log superblock copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Super {
    seq: u64,
    id: u64,
    store_id: u64,
    region_blocks: u64,
    locator: u64,
    session: u64,
    tail: u64,
    tail_lsn: u64,
    /// The first LSN `session` wrote: records from there on are of this
    /// session or a later one.
    session_start: u64,
}

impl Super {
    fn encode(&self) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(BLOCK);
        b[..8].copy_from_slice(SB_MAGIC);
        for (i, v) in [
            self.seq,
            self.id,
            self.store_id,
            self.region_blocks,
            self.locator,
            self.session,
            self.tail,
            self.tail_lsn,
            self.session_start,
        ]
        .into_iter()
        .enumerate()
        {
            put(&mut b, 8 + 8 * i, v);
        }
        let crc = crc32c::crc32c(&b[..80]);
        put32(&mut b, 80, crc);
        b
    }

    fn decode(b: &[u8]) -> Option<Super> {
        if &b[..8] != SB_MAGIC || get32(b, 80) != crc32c::crc32c(&b[..80]) {
            return None;
        }
        Some(Super {
            seq: get(b, 8),
            id: get(b, 16),
            store_id: get(b, 24),
            region_blocks: get(b, 32),
            locator: get(b, 40),
            session: get(b, 48),
            tail: get(b, 56),
            tail_lsn: get(b, 64),
            session_start: get(b, 72),
        })
    }
}

/// The session rules of replay: along the chain sessions never go down,
/// and from the last session's first LSN (`start`) on a record is of that
/// session (`current`) or later.
#[derive(Debug, Clone, Copy)]
struct Sessions {
    last: u64,
    current: u64,
    start: u64,
}

impl Sessions {
    fn admit(&self, h: &Header) -> bool {
        h.session >= self.last && !(h.lsn >= self.start && h.session < self.current)
    }
}

/// A record header as written (the first block of every record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    lsn: u64,
    session: u64,
    id: u64,
    pos: u64,
    kind: u32,
    barrier: bool,
    blocks: u32,
    pool_block: u64,
    payload_crc: u32,
    /// Every LSN below it was durable on the log device when this record
    /// was built (0: not said: a record of an older version). Replay uses
    /// it to tell a damaged flushed record from a torn unflushed one.
    durable: u64,
}

impl Header {
    fn encode_into(&self, b: &mut [u8]) {
        b[..BLOCK].fill(0);
        b[..8].copy_from_slice(REC_MAGIC);
        put(b, 8, self.lsn);
        put(b, 16, self.session);
        put(b, 24, self.id);
        put(b, 32, self.pos);
        put32(b, 40, self.kind | u32::from(self.barrier) << 16);
        put32(b, 44, self.blocks);
        put(b, 48, self.pool_block);
        put32(b, 56, self.payload_crc);
        let crc = crc32c::crc32c(&b[..60]);
        put32(b, 60, crc);
        // After the first checksum, with one of its own: headers written
        // before this field decode as before (durable 0).
        put(b, 64, self.durable);
        let crc = crc32c::crc32c(&b[..72]);
        put32(b, 72, crc);
    }

    fn decode(b: &[u8]) -> Option<Header> {
        if &b[..8] != REC_MAGIC || get32(b, 60) != crc32c::crc32c(&b[..60]) {
            return None;
        }
        Some(Header {
            lsn: get(b, 8),
            session: get(b, 16),
            id: get(b, 24),
            pos: get(b, 32),
            kind: get32(b, 40) & 0xffff,
            barrier: get32(b, 40) >> 16 == 1,
            blocks: get32(b, 44),
            pool_block: get(b, 48),
            payload_crc: get32(b, 56),
            durable: if get32(b, 72) == crc32c::crc32c(&b[..72]) {
                get(b, 64)
            } else {
                0
            },
        })
    }
}

fn random_id() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish().max(1)
}

impl WriteLog {
    /// Opens the log on `dev` (its whole length) in front of `pool` for
    /// store `store_id`. `pool_names` is the log id the pool's superblock
    /// names (0: none). If it names one, that log must be on `dev` (it is
    /// replayed; anything else is an error and nothing is written); if it
    /// names none, records found are dropped, never replayed over a pool
    /// that may be newer. `locator` is kept with the log for error
    /// messages (the cache's size). Returns what it found.
    pub fn open(
        dev: Arc<dyn BlockDevice>,
        pool: Arc<dyn BlockDevice>,
        store_id: u64,
        pool_names: u64,
        locator: u64,
    ) -> io::Result<(WriteLog, Found)> {
        let region_blocks = dev.len() / BLOCK_U64;
        if region_blocks * BLOCK_U64 < MIN_LOG_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a write-back log needs at least {} MiB, not {} bytes",
                    MIN_LOG_BYTES >> 20,
                    dev.len()
                ),
            ));
        }
        let mut copies = Vec::new();
        for i in 0..2u64 {
            let mut b = AlignedBuf::zeroed(BLOCK);
            dev.read_at(&mut b, i * BLOCK_U64)?;
            if let Some(s) = Super::decode(&b) {
                copies.push(s);
            }
        }
        let newest_seq = copies.iter().map(|s| s.seq).max().unwrap_or(0);
        let best = copies.into_iter().max_by_key(|s| s.seq);
        let fresh = || Self::fresh(newest_seq, store_id, region_blocks, locator);
        let ours = best.filter(|s| {
            s.store_id == store_id
                && s.region_blocks == region_blocks
                && s.tail >= RING_START
                && s.tail < region_blocks
        });
        let (sb, found) = match ours {
            Some(s) if pool_names != 0 && s.id == pool_names => (s, Found::Replayed),
            // The pool depends on a log that is not here: touch nothing.
            _ if pool_names != 0 => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the store's newest writes are in write-back log {pool_names:016x}, which is not on this device"
                    ),
                ))
            }
            Some(s) if holds_record_at_tail(&*dev, &s)? => (fresh(), Found::Dropped),
            _ => (fresh(), Found::Formatted),
        };
        let session = sb.session + 1;
        let shared = Arc::new(Shared {
            pool,
            dev,
            id: sb.id,
            store_id,
            locator,
            ring_end: region_blocks,
            state: Mutex::new(State {
                next_lsn: sb.tail_lsn,
                barrier_next: false,
                head: sb.tail,
                tail: sb.tail,
                tail_lsn: sb.tail_lsn,
                used: 0,
                session,
                session_start: sb.tail_lsn,
                sb_seq: sb.seq,
                records: VecDeque::new(),
                record_blocks: 0,
                done: BTreeSet::new(),
                written_upto: sb.tail_lsn,
                durable: sb.tail_lsn,
                logging: false,
                wanted: false,
                stop: false,
                failed: None,
                destage_error: None,
            }),
            changed: Condvar::new(),
            destage_wake: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            dirty: Mutex::new(HashMap::new()),
            dirty_count: AtomicUsize::new(0),
            switch: RwLock::new(()),
            logging: AtomicBool::new(false),
            leases: AtomicU64::new(0),
            pool_unflushed: AtomicBool::new(false),
            flush_lock: Mutex::new(()),
            rmw: Mutex::new(()),
            appended: AtomicU64::new(0),
            destaged: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            destage_errors: AtomicU64::new(0),
            destaging: Mutex::new(()),
            gate: RwLock::new(None),
            given_up: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            background_paused: AtomicBool::new(false),
        });
        if found == Found::Replayed {
            shared.replay(sb.session, sb.session_start)?;
        }
        // The new session is durable before any record of it is written.
        shared.persist_super()?;
        {
            let mut st = shared.state.lock();
            st.logging = !st.records.is_empty();
            shared.logging.store(st.logging, Ordering::SeqCst);
        }
        let mut destagers = Vec::new();
        for (role, name) in [
            (Destager::Background, "px-destage"),
            (Destager::Urgent, "px-destage-now"),
        ] {
            let runs = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || runs.destage_loop(role));
            match spawned {
                Ok(t) => destagers.push(t),
                Err(e) => {
                    // The one already running stops with the log.
                    drop(WriteLog { shared, destagers });
                    return Err(e);
                }
            }
        }
        Ok((WriteLog { shared, destagers }, found))
    }

    /// A new log whose superblock outranks every copy on the device.
    fn fresh(newest_seq: u64, store_id: u64, region_blocks: u64, locator: u64) -> Super {
        Super {
            seq: newest_seq,
            id: random_id(),
            store_id,
            region_blocks,
            locator,
            session: 0,
            tail: RING_START,
            tail_lsn: 1,
            session_start: 1,
        }
    }

    /// The log's id (what the pool's superblock names while it may
    /// depend on the log).
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// What the opener gave to tell this log's place (the cache's size).
    pub fn locator(&self) -> u64 {
        self.shared.locator
    }

    pub fn store_id(&self) -> u64 {
        self.shared.store_id
    }

    /// Whether writes go to the log now.
    pub fn is_logging(&self) -> bool {
        self.shared.logging.load(Ordering::SeqCst)
    }

    /// Whether some disk wants write-back: logging starts now (waiting for
    /// lent file descriptors to come back) or, when `false`, stops once
    /// every record has been destaged.
    pub fn set_wanted(&self, wanted: bool) {
        let s = &*self.shared;
        if wanted && s.logging.load(Ordering::SeqCst) {
            s.state.lock().wanted = true;
        } else if wanted {
            let _w = s.switch.write();
            let mut st = s.state.lock();
            st.wanted = true;
            if !st.logging {
                st.logging = true;
                s.logging.store(true, Ordering::SeqCst);
                s.pool_unflushed.store(true, Ordering::SeqCst);
            }
        } else {
            s.state.lock().wanted = false;
        }
        s.wake();
    }

    /// The LSN the next record gets: [`WriteLog::drain_to`] it to have
    /// everything written so far on the pool.
    pub fn head_lsn(&self) -> u64 {
        self.shared.state.lock().next_lsn
    }

    /// Waits until every record below `lsn` is on the pool and flushed
    /// there (write-through semantics for a disk's FLUSH). Fails while the
    /// pool refuses the destage (the destager keeps trying).
    pub fn drain_to(&self, lsn: u64) -> io::Result<()> {
        let s = &*self.shared;
        let _waiting = Waiting::new(s);
        let mut st = s.state.lock();
        loop {
            if st.tail_lsn >= lsn || (st.records.is_empty() && st.written_upto >= lsn) {
                return Ok(());
            }
            if let Some(f) = &st.failed {
                if st.records.front().is_none_or(|r| r.lsn >= st.written_upto) {
                    return Err(io_err(format!("the write-back log failed: {f}")));
                }
            }
            if st.stop {
                return Err(io_err("the write-back log is closing"));
            }
            if let Some(e) = &st.destage_error {
                return Err(io_err(e.clone()));
            }
            if let Some(why) = s.held_back() {
                return Err(io_err(why));
            }
            s.wake();
            s.wait(&mut st, Duration::from_millis(100));
        }
    }

    /// Stops logging for good: waits until every record is destaged and the
    /// log is direct again (a clean stop; the pool then needs no log).
    /// Fails while the pool refuses the destage: the records stay, for
    /// the destager or the next open.
    pub fn drain_all(&self) -> io::Result<()> {
        self.set_wanted(false);
        let s = &*self.shared;
        let _waiting = Waiting::new(s);
        let mut st = s.state.lock();
        while st.logging {
            if let Some(f) = &st.failed {
                return Err(io_err(format!("the write-back log failed: {f}")));
            }
            if let Some(e) = &st.destage_error {
                return Err(io_err(e.clone()));
            }
            if let Some(why) = s.held_back() {
                return Err(io_err(why));
            }
            s.wake();
            s.wait(&mut st, Duration::from_millis(100));
        }
        Ok(())
    }

    /// Writes `buf` at pool offset `offset` straight to the pool and
    /// flushes the pool, around the log: first every record of those blocks
    /// is destaged (and the durable tail past it), so no older record can
    /// land over this write later, not even after a crash. Other records
    /// stay in the log. The caller must be the only writer of these blocks
    /// meanwhile. For what other hosts read from the pool and must never
    /// find older (cluster mode: the superblock, a header naming its new
    /// writer).
    pub fn write_through(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let s = &*self.shared;
        s.check_pool_range(offset, buf.len() as u64)?;
        let first = offset / BLOCK_U64;
        let last = (offset + buf.len() as u64).div_ceil(BLOCK_U64);
        loop {
            let _mode = s.switch.read();
            let _destage = s.destaging.lock();
            let newest = {
                let dirty = s.dirty.lock();
                (first..last)
                    .filter_map(|b| dirty.get(&b))
                    .map(|d| d.lsn)
                    .max()
            };
            match newest {
                None => {
                    s.pool.write_at(buf, offset)?;
                    return s.pool.flush();
                }
                Some(lsn) => {
                    drop(_destage);
                    drop(_mode);
                    self.drain_to(lsn + 1)?;
                }
            }
        }
    }

    /// Cluster mode: the destager writes the pool only while `gate` says
    /// so (this appliance may write: not fenced); meanwhile records wait,
    /// and [`WriteLog::drain_to`] fails.
    pub fn set_destage_gate(&self, gate: DestageGate) {
        *self.shared.gate.write() = Some(gate);
        self.shared.wake();
    }

    /// Gives the log up for good (cluster mode: the operator forgot it while
    /// this appliance could not write, and other hosts may have taken its
    /// disks since): nothing more is destaged or appended; every write
    /// and flush fails with `why`.
    pub fn give_up(&self, why: &str) {
        let s = &*self.shared;
        s.given_up.store(true, Ordering::SeqCst);
        let mut st = s.state.lock();
        st.failed.get_or_insert_with(|| why.to_string());
        drop(st);
        s.wake();
    }

    /// Whether [`WriteLog::give_up`] was called.
    pub fn is_given_up(&self) -> bool {
        self.shared.given_up.load(Ordering::SeqCst)
    }

    pub fn stats(&self) -> LogStats {
        let s = &*self.shared;
        let st = s.state.lock();
        LogStats {
            logging: st.logging,
            dirty_bytes: st.record_blocks * BLOCK_U64,
            used_bytes: st.used * BLOCK_U64,
            size_bytes: (s.ring_end - RING_START) * BLOCK_U64,
            appended_bytes: s.appended.load(Ordering::Relaxed),
            destaged_bytes: s.destaged.load(Ordering::Relaxed),
            flushes: s.flushes.load(Ordering::Relaxed),
            replayed: s.replayed.load(Ordering::Relaxed),
            destage_errors: s.destage_errors.load(Ordering::Relaxed),
            failed: st
                .failed
                .clone()
                .or(st.destage_error.clone())
                .or_else(|| s.held_back()),
        }
    }
}

impl std::fmt::Debug for WriteLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteLog")
            .field("id", &self.shared.id)
            .field("logging", &self.is_logging())
            .finish()
    }
}

impl Drop for WriteLog {
    /// Stops the destager where it is: records left are replayed at the
    /// next open (call [`WriteLog::drain_all`] first for a clean stop).
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.wake();
        self.shared.destage_wake.notify_all();
        for t in self.destagers.drain(..) {
            let _ = t.join();
        }
    }
}

impl Shared {
    /// Waits on `changed` (at most `timeout`), counted in `sleepers`.
    fn wait(&self, st: &mut parking_lot::MutexGuard<'_, State>, timeout: Duration) {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        self.changed.wait_for(st, timeout);
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Wakes the threads waiting on `changed`, if any (a write does not
    /// pay a wake-up when no one waits).
    fn wake(&self) {
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            self.changed.notify_all();
        }
    }

    fn persist_super(&self) -> io::Result<()> {
        let sb = {
            let mut st = self.state.lock();
            st.sb_seq += 1;
            Super {
                seq: st.sb_seq,
                id: self.id,
                store_id: self.store_id,
                region_blocks: self.ring_end,
                locator: self.locator,
                session: st.session,
                tail: st.tail,
                tail_lsn: st.tail_lsn,
                session_start: st.session_start,
            }
        };
        self.dev.write_at(&sb.encode(), (sb.seq % 2) * BLOCK_U64)?;
        self.dev.flush()
    }

    /// Rebuilds the records and the dirty map from the durable tail: the
    /// longest chain of records that check out. `(session, start)`: the
    /// last session that wrote, and its first LSN: a record from there on
    /// of an older session is one that session's records did not replace
    /// (the end of the chain it found), never part of the chain.
    fn replay(&self, session: u64, start: u64) -> io::Result<()> {
        let mut st = self.state.lock();
        let mut pos = st.tail;
        let mut lsn = st.tail_lsn;
        let mut last_session = 0;
        let mut used = 0;
        let mut head = AlignedBuf::zeroed(BLOCK);
        let mut dirty = self.dirty.lock();
        loop {
            if pos >= self.ring_end {
                pos = RING_START;
            }
            if used >= self.ring_end - RING_START {
                break;
            }
            self.dev.read_at(&mut head, pos * BLOCK_U64)?;
            let Some(h) = Header::decode(&head) else {
                break;
            };
            let sessions = Sessions {
                last: last_session,
                current: session,
                start,
            };
            if h.lsn != lsn || h.id != self.id || h.pos != pos || !sessions.admit(&h) {
                break;
            }
            let (kind, len) = match h.kind {
                KIND_PAD => (Kind::Pad, self.ring_end - pos),
                KIND_WRITE => {
                    let blocks = h.blocks as u64;
                    if blocks == 0 || blocks > MAX_RECORD_BLOCKS || pos + 1 + blocks > self.ring_end
                    {
                        break;
                    }
                    let mut payload = AlignedBuf::zeroed(blocks as usize * BLOCK);
                    self.dev.read_at(&mut payload, (pos + 1) * BLOCK_U64)?;
                    if crc32c::crc32c(&payload) != h.payload_crc {
                        break;
                    }
                    let kind = Kind::Write {
                        pool_block: h.pool_block,
                        blocks,
                    };
                    (kind, 1 + blocks)
                }
                _ => break,
            };
            if let Some(end) = kind_end(kind) {
                if end > self.pool.len() / BLOCK_U64 {
                    break;
                }
            }
            let rec = Rec {
                lsn,
                pos,
                len,
                kind,
                barrier: h.barrier,
            };
            note_dirty(&mut dirty, &rec);
            st.record_blocks += payload_blocks(&rec);
            st.records.push_back(rec);
            used += len;
            last_session = h.session;
            pos += len;
            lsn += 1;
        }
        let sessions = Sessions {
            last: last_session,
            current: session,
            start,
        };
        if let Some(durable) = self.flushed_beyond(pos, lsn, used, sessions)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the write-back log is damaged: its record {lsn} (ring block {pos}) does not check out, yet a later record says every record below {durable} was flushed; nothing was replayed. Writes only this log holds are lost: give it up with `parallax forget-write-log` to open the store as the pool has it"
                ),
            ));
        }
        self.dirty_count.store(dirty.len(), Ordering::SeqCst);
        self.replayed
            .store(st.records.len() as u64, Ordering::Relaxed);
        st.head = if pos >= self.ring_end {
            RING_START
        } else {
            pos
        };
        st.used = used;
        st.next_lsn = lsn;
        st.session_start = lsn;
        st.written_upto = lsn;
        st.durable = lsn;
        Ok(())
    }

    /// Replay stopped at ring block `pos`, where record `lsn` should be,
    /// with `used` blocks of the ring taken before it: whether a record
    /// after it says that `lsn` was flushed (then it was damaged, not torn
    /// by a crash: a flush waits for every lower LSN). Returns the highest
    /// such claim. Walks the headers that follow (skipping the stopped
    /// record by its header, or, if that does not decode, looking for the
    /// next one within the longest record), without checking payloads.
    fn flushed_beyond(
        &self,
        mut pos: u64,
        lsn: u64,
        mut used: u64,
        mut sessions: Sessions,
    ) -> io::Result<Option<u64>> {
        let ring_len = self.ring_end - RING_START;
        let mut head = AlignedBuf::zeroed(BLOCK);
        let mut want = lsn;
        let mut claimed = 0;
        let wrap = |p: u64| if p >= self.ring_end { RING_START } else { p };
        while used < ring_len {
            pos = wrap(pos);
            self.dev.read_at(&mut head, pos * BLOCK_U64)?;
            let mut h = Header::decode(&head).filter(|h| h.id == self.id && h.pos == pos);
            if h.is_none() && want == lsn {
                // The stopped record's own header is unreadable: find the
                // next record's within the longest record.
                for skip in 1..=MAX_RECORD_BLOCKS + 1 {
                    let p = wrap(pos + skip);
                    self.dev.read_at(&mut head, p * BLOCK_U64)?;
                    if let Some(next) = Header::decode(&head).filter(|n| {
                        n.id == self.id && n.pos == p && n.lsn == lsn + 1 && sessions.admit(n)
                    }) {
                        used += skip;
                        pos = p;
                        want = lsn + 1;
                        h = Some(next);
                        break;
                    }
                }
            }
            let Some(h) = h.filter(|h| h.lsn == want && sessions.admit(h)) else {
                break;
            };
            sessions.last = h.session;
            claimed = claimed.max(h.durable);
            let len = match h.kind {
                KIND_PAD => self.ring_end - pos,
                KIND_WRITE if (1..=MAX_RECORD_BLOCKS).contains(&(h.blocks as u64)) => {
                    1 + h.blocks as u64
                }
                _ => break,
            };
            used += len;
            pos += len;
            want += 1;
        }
        Ok((claimed > lsn).then_some(claimed))
    }

    /// Whether records of `needs` ring blocks each (in that order, with
    /// the pads their wraps take) fit in the ring now.
    fn room_for(&self, st: &State, needs: &[u64]) -> bool {
        let ring_len = self.ring_end - RING_START;
        let (mut head, mut used) = (st.head, st.used);
        for &need in needs {
            let room_here = self.ring_end - head;
            let pad = if room_here >= need { 0 } else { room_here };
            if used + pad + need > ring_len {
                return false;
            }
            if pad > 0 {
                head = RING_START;
            }
            used += pad + need;
            head += need;
            if head >= self.ring_end {
                head = RING_START;
            }
        }
        true
    }

    /// Gives the next record (`blocks` of payload for pool block
    /// `pool_block`) its LSN and its place in the ring, after a pad if the
    /// ring wraps first; [`Shared::room_for`] said it fits.
    fn place(&self, st: &mut State, pool_block: u64, blocks: u64) -> (Option<Rec>, Rec) {
        let need = 1 + blocks;
        let room_here = self.ring_end - st.head;
        let mut pad = None;
        if room_here < need {
            let p = Rec {
                lsn: st.next_lsn,
                pos: st.head,
                len: room_here,
                kind: Kind::Pad,
                barrier: std::mem::take(&mut st.barrier_next),
            };
            st.next_lsn += 1;
            st.used += room_here;
            st.records.push_back(p);
            st.head = RING_START;
            pad = Some(p);
        }
        let rec = Rec {
            lsn: st.next_lsn,
            pos: st.head,
            len: need,
            kind: Kind::Write { pool_block, blocks },
            barrier: std::mem::take(&mut st.barrier_next),
        };
        st.next_lsn += 1;
        st.used += need;
        st.head += need;
        if st.head >= self.ring_end {
            st.head = RING_START;
        }
        st.record_blocks += payload_blocks(&rec);
        st.records.push_back(rec);
        (pad, rec)
    }

    /// Appends one record for `data` (whole blocks, at most
    /// `MAX_RECORD_BLOCKS`) at pool block `pool_block`.
    fn append(&self, pool_block: u64, data: &[u8]) -> io::Result<()> {
        let blocks = (data.len() / BLOCK) as u64;
        let (pad, rec, stamp) = {
            let mut st = self.state.lock();
            let mut waiting = None;
            loop {
                if let Some(f) = &st.failed {
                    return Err(io_err(format!("the write-back log failed: {f}")));
                }
                if self.room_for(&st, &[1 + blocks]) {
                    break;
                }
                waiting.get_or_insert_with(|| Waiting::new(self));
                self.wake();
                self.wait(&mut st, Duration::from_millis(100));
            }
            drop(waiting);
            let (pad, rec) = self.place(&mut st, pool_block, blocks);
            (pad, rec, (st.session, st.durable))
        };
        let mut b = AlignedBuf::zeroed(BLOCK + data.len());
        self.encode_record(&rec, stamp, data, &mut b);
        let mut written = Ok(());
        if let Some(p) = pad {
            let mut h = AlignedBuf::zeroed(BLOCK);
            self.encode_record(&p, stamp, &[], &mut h);
            written = self.dev.write_at(&h, p.pos * BLOCK_U64);
        }
        if written.is_ok() {
            written = self.dev.write_at(&b, rec.pos * BLOCK_U64);
        }
        let placed: Vec<Rec> = pad.into_iter().chain([rec]).collect();
        self.count_written(&placed, &written);
        written
    }

    /// Counts `placed` (records given their places) written, or, after
    /// `written` failed, stops the log: a record that failed to be written
    /// is never counted as written, so nothing after it is destaged or
    /// acknowledged by a flush.
    fn count_written(&self, placed: &[Rec], written: &io::Result<()>) {
        if written.is_ok() {
            let mut dirty = self.dirty.lock();
            for rec in placed {
                note_dirty(&mut dirty, rec);
            }
            self.dirty_count.store(dirty.len(), Ordering::SeqCst);
        }
        let mut st = self.state.lock();
        match written {
            Ok(()) => {
                for rec in placed {
                    st.done.insert(rec.lsn);
                }
            }
            Err(e) => {
                st.failed
                    .get_or_insert_with(|| format!("writing a record: {e}"));
            }
        }
        loop {
            let next = st.written_upto;
            if !st.done.remove(&next) {
                break;
            }
            st.written_upto += 1;
        }
        drop(st);
        self.wake();
        let blocks: u64 = placed.iter().map(payload_blocks).sum();
        self.appended
            .fetch_add(blocks * BLOCK_U64, Ordering::Relaxed);
    }

    /// Fills `out` with `rec` as it lies in the ring: its header, then
    /// `data` (a pad: its header only).
    fn encode_record(
        &self,
        rec: &Rec,
        (session, durable): (u64, u64),
        data: &[u8],
        out: &mut [u8],
    ) {
        let (kind, pool_block, blocks) = match rec.kind {
            Kind::Write { pool_block, blocks } => (KIND_WRITE, pool_block, blocks),
            Kind::Pad => (KIND_PAD, 0, 0),
        };
        Header {
            lsn: rec.lsn,
            session,
            id: self.id,
            pos: rec.pos,
            kind,
            barrier: rec.barrier,
            blocks: blocks as u32,
            pool_block,
            payload_crc: if kind == KIND_WRITE {
                crc32c::crc32c(data)
            } else {
                0
            },
            durable,
        }
        .encode_into(&mut out[..BLOCK]);
        out[BLOCK..BLOCK + data.len()].copy_from_slice(data);
    }

    /// Plans the records of `writes` for a caller that writes them by file
    /// descriptor: see [`BlockDevice::plan_fd_write`]. `None` when not
    /// logging, when the log lies on no file, when a write is not of whole
    /// blocks inside the pool, when the log failed, or when the records do
    /// not fit in the ring now (the caller's `write_at` waits for room).
    fn plan_fd_write(
        self: &Arc<Self>,
        writes: &[(u64, &[u8])],
        alloc: &mut dyn FnMut(usize) -> AlignedBuf,
    ) -> Option<FdWrite> {
        let (fd, base) = self.dev.fd_region()?;
        let _mode = self.switch.try_read()?;
        if !self.logging.load(Ordering::SeqCst) {
            return None;
        }
        let mut pieces: Vec<(u64, &[u8])> = Vec::new();
        for &(offset, data) in writes {
            if data.is_empty()
                || !offset.is_multiple_of(BLOCK_U64)
                || !data.len().is_multiple_of(BLOCK)
                || self.check_pool_range(offset, data.len() as u64).is_err()
            {
                return None;
            }
            for (i, chunk) in data.chunks(MAX_RECORD_BLOCKS as usize * BLOCK).enumerate() {
                pieces.push((offset / BLOCK_U64 + i as u64 * MAX_RECORD_BLOCKS, chunk));
            }
        }
        let needs: Vec<u64> = pieces
            .iter()
            .map(|p| 1 + (p.1.len() / BLOCK) as u64)
            .collect();
        let (placed, stamp) = {
            let mut st = self.state.lock();
            if st.failed.is_some() || !self.room_for(&st, &needs) {
                return None;
            }
            let placed: Vec<(Option<Rec>, Rec)> = pieces
                .iter()
                .map(|&(block, data)| self.place(&mut st, block, (data.len() / BLOCK) as u64))
                .collect();
            (placed, (st.session, st.durable))
        };
        // Each record (a pad, or a header and its payload) at its place;
        // records that follow each other in the ring, in one transfer.
        let total: usize = placed
            .iter()
            .map(|(pad, rec)| (pad.is_some() as usize + rec.len as usize) * BLOCK)
            .sum();
        let mut buf = alloc(total);
        if buf.len() != total {
            // Not what was asked for: the places are taken, so fill them.
            buf = AlignedBuf::zeroed(total);
        }
        let mut at = 0;
        let mut records: Vec<(Rec, Range<usize>)> = Vec::new();
        let mut transfers: Vec<FdTransfer> = Vec::new();
        for (&(pad, rec), &(_, data)) in placed.iter().zip(&pieces) {
            for (r, bytes) in pad.iter().map(|p| (p, &[][..])).chain([(&rec, data)]) {
                let len = if matches!(r.kind, Kind::Pad) {
                    BLOCK
                } else {
                    r.len as usize * BLOCK
                };
                self.encode_record(r, stamp, bytes, &mut buf[at..at + len]);
                let offset = base + r.pos * BLOCK_U64;
                match transfers.last_mut() {
                    Some(t) if t.offset + t.buf.len() as u64 == offset && t.buf.end == at => {
                        t.buf.end += len;
                    }
                    _ => transfers.push(FdTransfer {
                        fd,
                        offset,
                        buf: at..at + len,
                    }),
                }
                records.push((*r, at..at + len));
                at += len;
            }
        }
        let log = self.clone();
        let end: EndFdWrite = Box::new(move |ok, written| log.end_fd_write(&records, ok, written));
        Some(FdWrite::new(buf, transfers, end))
    }

    /// The end of a [`Shared::plan_fd_write`]: `records` with their bytes
    /// in `written`. Unless `ok`, they are written again here (they hold
    /// their places in the stream: a hole there would stop it).
    fn end_fd_write(&self, records: &[(Rec, Range<usize>)], ok: bool, written: &[u8]) {
        let outcome = if ok {
            Ok(())
        } else if records.iter().any(|(_, r)| r.end > written.len()) {
            Err(io_err(
                "records planned for io_uring were lost unwritten (a bug)",
            ))
        } else {
            records.iter().try_for_each(|(rec, r)| {
                self.dev.write_at(&written[r.clone()], rec.pos * BLOCK_U64)
            })
        };
        let placed: Vec<Rec> = records.iter().map(|(rec, _)| *rec).collect();
        self.count_written(&placed, &outcome);
    }

    /// Makes every record appended before the call durable on the log
    /// device.
    fn flush_log(&self) -> io::Result<()> {
        let target = {
            let mut st = self.state.lock();
            let target = st.next_lsn;
            st.barrier_next = true;
            loop {
                if let Some(f) = &st.failed {
                    return Err(io_err(format!("the write-back log failed: {f}")));
                }
                if st.written_upto >= target {
                    break;
                }
                self.wait(&mut st, Duration::from_millis(100));
            }
            if st.durable >= target {
                return Ok(());
            }
            target
        };
        let _one = self.flush_lock.lock();
        let upto = {
            let st = self.state.lock();
            if st.durable >= target {
                return Ok(());
            }
            st.written_upto
        };
        self.flushes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.dev.flush() {
            let mut st = self.state.lock();
            st.failed
                .get_or_insert_with(|| format!("flushing the log device: {e}"));
            return Err(e);
        }
        let mut st = self.state.lock();
        st.durable = st.durable.max(upto);
        Ok(())
    }

    /// A destager thread: see the module documentation.
    fn destage_loop(&self, role: Destager) {
        if role == Destager::Background {
            // Raising one's own nice value needs no privilege.
            let _ = rustix::process::setpriority_process(None, BACKGROUND_NICE);
        }
        loop {
            {
                let mut st = self.state.lock();
                loop {
                    if st.stop {
                        return;
                    }
                    let ready = st.records.front().is_some_and(|r| r.lsn < st.written_upto);
                    let mine = match role {
                        Destager::Background => !self.background_paused.load(Ordering::SeqCst),
                        Destager::Urgent => self.waiting.load(Ordering::SeqCst) > 0,
                    };
                    if ready
                        && mine
                        && self.leases.load(Ordering::SeqCst) == 0
                        && !self.given_up.load(Ordering::SeqCst)
                        && self.gate_open()
                    {
                        break;
                    }
                    if role == Destager::Background
                        && st.records.is_empty()
                        && st.logging
                        && !st.wanted
                        && st.failed.is_none()
                    {
                        drop(st);
                        self.try_go_direct();
                        st = self.state.lock();
                        continue;
                    }
                    self.destage_wake
                        .wait_for(&mut st, Duration::from_millis(50));
                }
            }
            let destaged = {
                // The batch is chosen under the lock: the other destager
                // may have just destaged what was ready.
                let _destage = self.destaging.lock();
                let batch = self.next_batch();
                if batch.is_empty() {
                    continue;
                }
                self.destage(&batch)
            };
            match destaged {
                Ok(()) => {
                    let mut st = self.state.lock();
                    st.destage_error = None;
                    drop(st);
                }
                // Held back mid-batch (fenced): not a failure of the pool;
                // the records wait for the gate like any others.
                Err(e) if e.get_ref().is_some_and(|i| i.is::<HeldBack>()) => {}
                Err(e) => {
                    self.destage_errors.fetch_add(1, Ordering::Relaxed);
                    let mut st = self.state.lock();
                    st.destage_error = Some(format!("destaging to the pool: {e}"));
                    if st.stop {
                        return;
                    }
                    self.destage_wake.wait_for(&mut st, Duration::from_secs(1));
                }
            }
        }
    }

    /// The next batch to destage: the oldest records written, at most
    /// `BATCH_BLOCKS` payload blocks, never across a barrier (what came
    /// before a flush is on the pool, flushed, before what came after).
    fn next_batch(&self) -> Vec<Rec> {
        let st = self.state.lock();
        let mut blocks = 0;
        let upto = st.written_upto;
        let first = st.records.front().map(|r| r.lsn);
        st.records
            .iter()
            .take_while(|r| {
                let take =
                    r.lsn < upto && blocks < BATCH_BLOCKS && (!r.barrier || Some(r.lsn) == first);
                if let Kind::Write { blocks: b, .. } = r.kind {
                    blocks += b;
                }
                take
            })
            .copied()
            .collect()
    }

    fn gate_open(&self) -> bool {
        self.gate.read().as_ref().is_none_or(|g| g())
    }

    /// Why the destager writes nothing now, if it is held back (the log
    /// given up, or the appliance may not write the pool).
    fn held_back(&self) -> Option<String> {
        if self.given_up.load(Ordering::SeqCst) {
            Some("the write-back log was given up".into())
        } else if !self.gate_open() {
            Some("destage paused: this appliance may not write the pool now (fenced)".into())
        } else {
            None
        }
    }

    /// Writes `batch` to the pool, flushes the pool, forgets its dirty
    /// entries, then moves the durable tail past it.
    fn destage(&self, batch: &[Rec]) -> io::Result<()> {
        let Some(last) = batch.last() else {
            return Ok(());
        };
        // The newest content of every block the batch touches.
        let mut plan: BTreeMap<u64, u64> = BTreeMap::new();
        for r in batch {
            if let Kind::Write { pool_block, blocks } = r.kind {
                for i in 0..blocks {
                    plan.insert(pool_block + i, r.pos + 1 + i);
                }
            }
        }
        // Runs of consecutive pool blocks (at most 1 MiB), one pool request
        // each, whatever their places in the ring: a burst's first writes
        // allocate pool blocks in order, its records lie apart in the ring.
        let mut runs: Vec<(u64, Vec<u64>)> = Vec::new();
        for (&block, &at) in &plan {
            if let Some((start, from)) = runs.last_mut() {
                let n = from.len() as u64;
                if *start + n == block && n < MAX_RECORD_BLOCKS {
                    from.push(at);
                    continue;
                }
            }
            runs.push((block, vec![at]));
        }
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<io::Error>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..DESTAGE_THREADS.min(runs.len()) {
                scope.spawn(|| {
                    let mut buf = AlignedBuf::zeroed(MAX_RECORD_BLOCKS as usize * BLOCK);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((block, from)) = runs.get(i) else {
                            return;
                        };
                        // Fenced (or given up) mid-batch: no further pool
                        // write; the batch fails and its records stay.
                        if let Some(why) = self.held_back() {
                            failed.lock().get_or_insert(held_back_error(why));
                            return;
                        }
                        buf.truncate(0);
                        let _ = buf.resize_within(from.len() * BLOCK);
                        let done = self
                            .gather(from, &mut buf)
                            .and_then(|_| self.pool.write_at(&buf, block * BLOCK_U64));
                        if let Err(e) = done {
                            failed.lock().get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner() {
            return Err(e);
        }
        if let Some(why) = self.held_back() {
            return Err(held_back_error(why));
        }
        self.pool.flush()?;
        {
            let mut dirty = self.dirty.lock();
            for block in plan.keys() {
                if dirty.get(block).is_some_and(|d| d.lsn <= last.lsn) {
                    dirty.remove(block);
                }
            }
            self.dirty_count.store(dirty.len(), Ordering::SeqCst);
        }
        let released: u64 = batch.iter().map(|r| r.len).sum();
        {
            let mut st = self.state.lock();
            let end = last.pos + last.len;
            st.tail = if end >= self.ring_end {
                RING_START
            } else {
                end
            };
            st.tail_lsn = last.lsn + 1;
        }
        // A failed persist leaves the old tail on the device: the batch is
        // destaged again after a crash, which writes the same bytes.
        self.persist_super()?;
        let mut st = self.state.lock();
        st.used -= released;
        for _ in 0..batch.len() {
            if let Some(r) = st.records.pop_front() {
                st.record_blocks -= payload_blocks(&r);
            }
        }
        drop(st);
        self.destaged
            .fetch_add(plan.len() as u64 * BLOCK_U64, Ordering::Relaxed);
        self.wake();
        Ok(())
    }

    /// Reads the ring blocks `from` into `buf`, in order (one read per
    /// stretch of consecutive ring blocks).
    fn gather(&self, from: &[u64], buf: &mut [u8]) -> io::Result<()> {
        let mut i = 0;
        while i < from.len() {
            let first = from[i];
            let mut j = i + 1;
            while j < from.len() && from[j] == first + (j - i) as u64 {
                j += 1;
            }
            self.dev
                .read_at(&mut buf[i * BLOCK..j * BLOCK], first * BLOCK_U64)?;
            i = j;
        }
        Ok(())
    }

    /// Back to direct mode if nothing is left and no disk wants the log.
    fn try_go_direct(&self) {
        let Some(_w) = self.switch.try_write_for(Duration::from_millis(10)) else {
            return;
        };
        let mut st = self.state.lock();
        if st.records.is_empty() && !st.wanted && st.logging && st.failed.is_none() {
            st.logging = false;
            self.logging.store(false, Ordering::SeqCst);
        }
        drop(st);
        self.wake();
    }

    /// Reads `buf.len()` bytes at pool offset `offset`: each block from its
    /// newest record, or from the pool. The dirty map is looked up once for
    /// the whole range and checked once more after the reads: a block whose
    /// entry changed meanwhile (destaged, its ring space perhaps reused, or
    /// written again) is read again alone.
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() || self.dirty_count.load(Ordering::SeqCst) == 0 {
            return self.pool.read_at(buf, offset);
        }
        let end = offset + buf.len() as u64;
        let blocks = offset / BLOCK_U64..end.div_ceil(BLOCK_U64);
        let found: Vec<(u64, Dirty)> = {
            let dirty = self.dirty.lock();
            blocks
                .filter_map(|b| dirty.get(&b).map(|d| (b, *d)))
                .collect()
        };
        if found.is_empty() {
            return self.pool.read_at(buf, offset);
        }
        let part = |block: u64| {
            let start = (block * BLOCK_U64).max(offset);
            let stop = ((block + 1) * BLOCK_U64).min(end);
            (start, (start - offset) as usize..(stop - offset) as usize)
        };
        // Clean stretches from the pool, dirty blocks from the ring.
        let mut at = offset;
        for &(block, d) in &found {
            let (start, r) = part(block);
            if at < start {
                let clean = (at - offset) as usize..r.start;
                self.pool.read_at(&mut buf[clean], at)?;
            }
            self.dev
                .read_at(&mut buf[r.clone()], d.at * BLOCK_U64 + start % BLOCK_U64)?;
            at = start + r.len() as u64;
        }
        if at < end {
            self.pool.read_at(&mut buf[(at - offset) as usize..], at)?;
        }
        let moved: Vec<u64> = {
            let dirty = self.dirty.lock();
            found
                .iter()
                .filter(|(b, d)| dirty.get(b) != Some(d))
                .map(|(b, _)| *b)
                .collect()
        };
        for block in moved {
            let (start, r) = part(block);
            self.read_block(&mut buf[r], start)?;
        }
        Ok(())
    }

    /// Reads part of one block (`buf` at pool offset `at`) from its newest
    /// record, or from the pool, until no destage raced with the read.
    fn read_block(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        let block = at / BLOCK_U64;
        loop {
            let Some(d) = self.dirty.lock().get(&block).copied() else {
                return self.pool.read_at(buf, at);
            };
            self.dev.read_at(buf, d.at * BLOCK_U64 + at % BLOCK_U64)?;
            if self.dirty.lock().get(&block) == Some(&d) {
                return Ok(());
            }
        }
    }

    fn check_pool_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.pool.len() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "I/O range {offset}+{len} is outside the device of {} bytes",
                    self.pool.len()
                ),
            )),
        }
    }

    /// A write in logging mode: whole blocks as they are, partial blocks
    /// read, patched and logged whole.
    fn log_write(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.check_pool_range(offset, data.len() as u64)?;
        if !offset.is_multiple_of(BLOCK_U64) || !data.len().is_multiple_of(BLOCK) {
            let _one = self.rmw.lock();
            let first = offset / BLOCK_U64;
            let end = (offset + data.len() as u64).div_ceil(BLOCK_U64);
            let mut whole = vec![0u8; ((end - first) * BLOCK_U64) as usize];
            self.read(&mut whole, first * BLOCK_U64)?;
            let within = (offset - first * BLOCK_U64) as usize;
            whole[within..within + data.len()].copy_from_slice(data);
            return self.log_blocks(&whole, first);
        }
        self.log_blocks(data, offset / BLOCK_U64)
    }

    fn log_blocks(&self, data: &[u8], first: u64) -> io::Result<()> {
        for (i, chunk) in data.chunks(MAX_RECORD_BLOCKS as usize * BLOCK).enumerate() {
            let block = first + i as u64 * MAX_RECORD_BLOCKS;
            self.append(block, chunk)?;
        }
        Ok(())
    }
}

/// Whether the log `sb` describes has a record at its tail (records left).
fn holds_record_at_tail(dev: &dyn BlockDevice, sb: &Super) -> io::Result<bool> {
    let mut b = AlignedBuf::zeroed(BLOCK);
    dev.read_at(&mut b, sb.tail * BLOCK_U64)?;
    Ok(Header::decode(&b)
        .is_some_and(|h| h.id == sb.id && h.lsn == sb.tail_lsn && h.pos == sb.tail))
}

/// Payload blocks a record holds in the ring (a write's data).
fn payload_blocks(rec: &Rec) -> u64 {
    match rec.kind {
        Kind::Write { blocks, .. } => blocks,
        _ => 0,
    }
}

/// One past the last pool block a record touches.
fn kind_end(kind: Kind) -> Option<u64> {
    match kind {
        Kind::Write { pool_block, blocks } => pool_block.checked_add(blocks),
        Kind::Pad => None,
    }
}

/// Makes `rec` the newest record of the blocks it touches (unless a newer
/// one is there already).
fn note_dirty(dirty: &mut HashMap<u64, Dirty>, rec: &Rec) {
    let Kind::Write {
        pool_block: first,
        blocks,
    } = rec.kind
    else {
        return;
    };
    for i in 0..blocks {
        let d = Dirty {
            lsn: rec.lsn,
            at: rec.pos + 1 + i,
        };
        dirty
            .entry(first + i)
            .and_modify(|e| {
                if e.lsn < d.lsn {
                    *e = d
                }
            })
            .or_insert(d);
    }
}

struct Lease(Arc<Shared>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.leases.fetch_sub(1, Ordering::SeqCst);
        // Only a destager holding records back waits for leases (a wake
        // per I/O otherwise costs a context switch of the idle destager).
        if self.0.logging.load(Ordering::SeqCst) {
            self.0.destage_wake.notify_all();
        }
    }
}

impl BlockDevice for WriteLog {
    fn len(&self) -> u64 {
        self.shared.pool.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.shared.read(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let s = &*self.shared;
        let _mode = s.switch.read();
        if s.logging.load(Ordering::SeqCst) {
            s.log_write(buf, offset)
        } else {
            s.pool.write_at(buf, offset)
        }
    }

    fn flush(&self) -> io::Result<()> {
        let s = &*self.shared;
        if !s.logging.load(Ordering::SeqCst) {
            return s.pool.flush();
        }
        // Writes made through lent descriptors before logging started are
        // on the pool: flush it too until every lease is back.
        if s.pool_unflushed.load(Ordering::SeqCst) {
            let quiet = s.leases.load(Ordering::SeqCst) == 0;
            s.pool.flush()?;
            if quiet {
                s.pool_unflushed.store(false, Ordering::SeqCst);
            }
        }
        s.flush_log()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let s = &*self.shared;
        let _mode = s.switch.read();
        if !s.logging.load(Ordering::SeqCst) {
            return s.pool.discard(offset, len);
        }
        // Ignored while logging (the contract allows it: the content of a
        // discarded range is unspecified). A discard sent straight to the
        // pool could land before an older record of the range is destaged.
        s.check_pool_range(offset, len)
    }

    /// None: a descriptor of the pool would go around the log. See
    /// [`BlockDevice::lend_fd`].
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    fn lend_fd(&self) -> Option<FdLease> {
        let s = &self.shared;
        let fd = s.pool.raw_fd()?;
        let _mode = s.switch.read();
        if s.logging.load(Ordering::SeqCst) {
            return None;
        }
        s.leases.fetch_add(1, Ordering::SeqCst);
        Some(FdLease::held(fd, Box::new(Lease(s.clone()))))
    }

    /// While logging, on a log device that is a file: the records of
    /// `writes`, placed in the log now, for the caller to write by
    /// descriptor.
    fn plan_fd_write(
        &self,
        writes: &[(u64, &[u8])],
        alloc: &mut dyn FnMut(usize) -> AlignedBuf,
    ) -> Option<FdWrite> {
        self.shared.plan_fd_write(writes, alloc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parallax_device::{share_power, CrashDevice, CrashMode, MemDevice, SplitMix};

    const POOL_BLOCKS: u64 = 96;
    const STORE: u64 = 0x5107e;

    fn block(seed: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        b[..8].copy_from_slice(&seed.to_le_bytes());
        b[BLOCK - 8..].copy_from_slice(&seed.to_le_bytes());
        b
    }

    fn seed_of(b: &[u8]) -> u64 {
        get(b, 0)
    }

    /// What each pool block may read after a crash: one of the values
    /// from the last one a flush covered on.
    struct Model {
        history: Vec<Vec<u64>>,
        floor: Vec<usize>,
    }

    impl Model {
        fn new() -> Model {
            Model {
                history: vec![vec![0]; POOL_BLOCKS as usize],
                floor: vec![0; POOL_BLOCKS as usize],
            }
        }
        fn latest(&self, b: u64) -> u64 {
            *self.history[b as usize].last().unwrap()
        }
        fn flushed(&mut self) {
            for (f, h) in self.floor.iter_mut().zip(&self.history) {
                *f = h.len() - 1;
            }
        }
        fn allowed(&self, b: u64) -> &[u64] {
            &self.history[b as usize][self.floor[b as usize]..]
        }
    }

    fn read_seed(dev: &dyn BlockDevice, b: u64) -> u64 {
        let mut buf = vec![0u8; BLOCK];
        dev.read_at(&mut buf, b * BLOCK_U64).unwrap();
        assert_eq!(get(&buf, 0), get(&buf, BLOCK - 8), "block {b} is torn");
        seed_of(&buf)
    }

    /// Random writes (some partial, some long), flushes and switches of
    /// the wanted flag; reads checked as it goes. Stops at the first error
    /// (the power went).
    fn run(log: &WriteLog, model: &mut Model, rng: &mut SplitMix, ops: usize) {
        for step in 0..ops {
            let r = rng.next_u64();
            match r % 16 {
                0..=8 => {
                    let n = 1 + (r >> 8) % 6;
                    let first = (r >> 16) % (POOL_BLOCKS - n);
                    let mut data = Vec::new();
                    for i in 0..n {
                        data.extend(block(((step as u64) << 8) + i + 1));
                    }
                    if log.write_at(&data, first * BLOCK_U64).is_err() {
                        return;
                    }
                    for i in 0..n {
                        model.history[(first + i) as usize].push(((step as u64) << 8) + i + 1);
                    }
                }
                9 => {
                    // A partial write: the middle of one block.
                    let b = (r >> 16) % POOL_BLOCKS;
                    let mut whole = block(model.latest(b));
                    whole[100..200].fill(7);
                    if log.write_at(&whole[100..200], b * BLOCK_U64 + 100).is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; BLOCK];
                    if log.read_at(&mut buf, b * BLOCK_U64).is_err() {
                        return;
                    }
                    assert_eq!(buf, whole, "partial write of block {b}");
                }
                10..=12 => {
                    if log.flush().is_err() {
                        return;
                    }
                    model.flushed();
                }
                13 => log.set_wanted(!r.is_multiple_of(3)),
                _ => {
                    let b = (r >> 16) % POOL_BLOCKS;
                    let mut buf = vec![0u8; BLOCK];
                    if log.read_at(&mut buf, b * BLOCK_U64).is_err() {
                        return;
                    }
                    if buf[100..200] != [7; 100] {
                        assert_eq!(seed_of(&buf), model.latest(b), "read of block {b}");
                    }
                }
            }
        }
    }

    fn open(
        dev: Arc<dyn BlockDevice>,
        pool: Arc<dyn BlockDevice>,
        names: u64,
    ) -> (WriteLog, Found) {
        WriteLog::open(dev, pool, STORE, names, 0).unwrap()
    }

    #[test]
    fn writes_read_back_through_the_log_and_reach_the_pool_when_drained() {
        let pool = Arc::new(MemDevice::new(POOL_BLOCKS * BLOCK_U64));
        let dev = Arc::new(MemDevice::new(MIN_LOG_BYTES));
        let (log, found) = open(dev, pool.clone(), 0);
        assert_eq!(found, Found::Formatted);
        assert!(!log.is_logging());
        log.set_wanted(true);
        let mut model = Model::new();
        run(&log, &mut model, &mut SplitMix(1), 3000);
        log.drain_all().unwrap();
        assert!(!log.is_logging());
        let st = log.stats();
        assert!(st.appended_bytes > 0 && st.destaged_bytes > 0, "{st:?}");
        assert_eq!(st.dirty_bytes, 0);
        for b in 0..POOL_BLOCKS {
            let mut buf = vec![0u8; BLOCK];
            pool.read_at(&mut buf, b * BLOCK_U64).unwrap();
            if buf[100..200] != [7; 100] {
                assert_eq!(seed_of(&buf), model.latest(b), "pool block {b}");
            }
        }
    }

    #[test]
    fn a_burst_larger_than_the_log_waits_for_space_and_loses_nothing() {
        let pool = Arc::new(MemDevice::new(4096 * BLOCK_U64));
        let dev = Arc::new(MemDevice::new(MIN_LOG_BYTES));
        let (log, _) = open(dev, pool.clone(), 0);
        log.set_wanted(true);
        // 32 MiB through an 8 MiB log, 1 MiB at a time.
        for round in 0..32u64 {
            let mut data = Vec::new();
            for i in 0..256 {
                data.extend(block(round * 1000 + i));
            }
            log.write_at(&data, (round % 16) * 256 * BLOCK_U64).unwrap();
        }
        log.flush().unwrap();
        for b in 0..4096u64 {
            let round = 16 + b / 256;
            assert_eq!(read_seed(&log, b), round * 1000 + b % 256);
        }
        log.drain_all().unwrap();
        for b in 0..4096u64 {
            assert_eq!(read_seed(&*pool, b), (16 + b / 256) * 1000 + b % 256);
        }
    }

    #[test]
    fn a_log_the_pool_does_not_name_is_dropped_and_one_it_names_must_be_there() {
        // The pool refuses writes: the record stays in the log whatever
        // the destager tries between the steps.
        let pool: Arc<dyn BlockDevice> =
            Arc::new(Refusing(MemDevice::new(POOL_BLOCKS * BLOCK_U64)));
        let dev = Arc::new(MemDevice::new(MIN_LOG_BYTES));
        let (log, _) = open(dev.clone(), pool.clone(), 0);
        let id = log.id();
        log.set_wanted(true);
        log.write_at(&block(5), 0).unwrap();
        log.flush().unwrap();
        // Killed: the record stays in the log.
        let stop = log.shared.state.lock().records.len();
        assert_eq!(stop, 1);
        log.shared.state.lock().stop = true;
        drop(log);
        let before = dev.to_bytes();
        let err = WriteLog::open(dev.clone(), pool.clone(), STORE, 0x1234, 0)
            .err()
            .unwrap();
        assert!(err.to_string().contains("not on this device"), "{err}");
        assert!(dev.to_bytes() == before, "a refused open wrote to the log");
        let (log, found) = open(dev.clone(), pool.clone(), id);
        assert_eq!(found, Found::Replayed);
        assert_eq!(read_seed(&log, 0), 5);
        log.shared.state.lock().stop = true;
        drop(log);
        let (log, found) = open(dev, pool.clone(), 0);
        assert_eq!(found, Found::Dropped);
        assert_eq!(read_seed(&log, 0), 0);
        assert_ne!(log.id(), id);
    }

    /// A pool that refuses every write (reads zeros).
    struct Refusing(MemDevice);

    impl BlockDevice for Refusing {
        fn len(&self) -> u64 {
            self.0.len()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
            Err(io::Error::other("the pool refuses writes"))
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
    }

    /// A descriptor lent while direct keeps the destage back once logging
    /// started (its write may still be in flight), and no new one is lent.
    #[test]
    fn a_lent_descriptor_holds_the_destage_back_until_it_is_returned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool");
        drop(
            parallax_device::FileDevice::create(&path, POOL_BLOCKS * BLOCK_U64, Default::default())
                .unwrap(),
        );
        let pool = Arc::new(parallax_device::FileDevice::open(&path, Default::default()).unwrap());
        let (log, _) = open(Arc::new(MemDevice::new(MIN_LOG_BYTES)), pool, 0);
        let lease = log
            .lend_fd()
            .expect("direct: the pool's descriptor is lent");
        assert!(log.raw_fd().is_none());
        log.set_wanted(true);
        assert!(log.lend_fd().is_none(), "a descriptor lent while logging");
        log.write_at(&block(1), 0).unwrap();
        log.flush().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(log.stats().destaged_bytes, 0, "destaged with a lease out");
        assert_eq!(log.stats().dirty_bytes, BLOCK_U64);
        drop(lease);
        log.drain_to(log.head_lsn()).unwrap();
        assert_eq!(log.stats().destaged_bytes, BLOCK_U64);
        assert_eq!(log.stats().dirty_bytes, 0);
    }

    /// The background destager idle (as when the CPU is busy with a
    /// burst: it runs at nice 19): records wait in the log until something
    /// waits for them, and then the urgent destager moves them, for a
    /// drain and for writers waiting for room alike.
    #[test]
    fn the_urgent_destager_moves_records_only_while_something_waits() {
        let pool = Arc::new(MemDevice::new(4096 * BLOCK_U64));
        let (log, _) = open(Arc::new(MemDevice::new(MIN_LOG_BYTES)), pool.clone(), 0);
        log.shared.background_paused.store(true, Ordering::SeqCst);
        log.set_wanted(true);
        log.write_at(&block(1), 0).unwrap();
        log.flush().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            log.stats().destaged_bytes,
            0,
            "destaged with no one waiting"
        );
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel();
            let log = &log;
            scope.spawn(move || tx.send(log.drain_to(log.head_lsn()).is_ok()));
            let drained = rx.recv_timeout(Duration::from_secs(30));
            // Unstick the drain if the urgent destager failed it.
            log.shared.background_paused.store(false, Ordering::SeqCst);
            assert_eq!(drained, Ok(true), "no destage for a drain");
            log.shared.background_paused.store(true, Ordering::SeqCst);
        });
        assert_eq!(read_seed(&*pool, 0), 1);
        // 32 MiB through the 8 MiB log: the writer waits for room, and the
        // urgent destager makes it.
        for round in 0..32u64 {
            let data: Vec<u8> = (0..256).flat_map(|i| block(round * 1000 + i)).collect();
            log.write_at(&data, (round % 16) * 256 * BLOCK_U64).unwrap();
        }
        assert!(log.stats().destaged_bytes >= 16 << 20, "{:?}", log.stats());
        log.drain_all().unwrap();
        for b in 0..4096u64 {
            assert_eq!(read_seed(&*pool, b), (16 + b / 256) * 1000 + b % 256);
        }
    }

    /// A log in the second half of a cache file (so its descriptor's
    /// offsets are not the log's), in front of `pool`; and the file, opened
    /// again for the test's own writes.
    fn log_on_a_file(
        dir: &std::path::Path,
        pool: Arc<dyn BlockDevice>,
    ) -> (WriteLog, std::fs::File) {
        let path = dir.join("cache");
        drop(
            parallax_device::FileDevice::create(&path, 2 * MIN_LOG_BYTES, Default::default())
                .unwrap(),
        );
        let file: Arc<dyn BlockDevice> =
            Arc::new(parallax_device::FileDevice::open(&path, Default::default()).unwrap());
        let dev =
            Arc::new(parallax_device::Slice::new(file, MIN_LOG_BYTES, MIN_LOG_BYTES).unwrap());
        let (log, _) = open(dev, pool, 0);
        let other = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        (log, other)
    }

    fn mem_pool() -> Arc<MemDevice> {
        Arc::new(MemDevice::new(POOL_BLOCKS * BLOCK_U64))
    }

    /// What the caller's io_uring would do: every transfer, by descriptor.
    fn carry(planned: &mut FdWrite, file: &std::fs::File) -> AlignedBuf {
        use std::os::unix::fs::FileExt;
        let buf = planned.take_buf().expect("the records");
        for t in &planned.transfers {
            file.write_all_at(&buf[t.buf.clone()], t.offset).unwrap();
        }
        buf
    }

    fn zeroed(len: usize) -> AlignedBuf {
        AlignedBuf::zeroed(len)
    }

    /// Records planned for io_uring: invisible until their plan ends (so a
    /// read never finds an entry whose bytes are not there yet), visible
    /// after, in LSN order whatever order the plans end in, and replayed
    /// after a crash from where the descriptor put them.
    #[test]
    fn records_written_by_descriptor_count_when_their_plan_ends_and_replay() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing reaches the pool before the crash: everything is replayed.
        let refusing = Arc::new(Refusing(MemDevice::new(POOL_BLOCKS * BLOCK_U64)));
        let (log, file) = log_on_a_file(dir.path(), refusing);
        assert!(
            log.plan_fd_write(&[(0, &block(1))], &mut zeroed).is_none(),
            "planned while not logging (the pool's own descriptor is lent then)"
        );
        log.set_wanted(true);
        let two = [block(2), block(3)].concat();
        let mut a = log
            .plan_fd_write(&[(0, &block(1)), (5 * BLOCK_U64, &two)], &mut zeroed)
            .expect("a plan");
        let mut b = log
            .plan_fd_write(&[(0, &block(4))], &mut zeroed)
            .expect("a plan");
        let b_buf = carry(&mut b, &file);
        let a_buf = carry(&mut a, &file);
        assert_eq!(read_seed(&log, 0), 0, "a record read before its plan ended");
        // The later plan ends first: the newer record of block 0 wins.
        b.end(true, &b_buf);
        assert_eq!(read_seed(&log, 0), 4);
        a.end(true, &a_buf);
        assert_eq!(
            read_seed(&log, 0),
            4,
            "an older record replaced a newer one"
        );
        assert_eq!((read_seed(&log, 5), read_seed(&log, 6)), (2, 3));
        log.flush().unwrap();
        let id = log.id();
        let dev = log.shared.dev.clone();
        drop(log);
        let pool = mem_pool();
        let (log, found) = open(dev, pool.clone(), id);
        assert_eq!(found, Found::Replayed);
        assert_eq!(read_seed(&log, 0), 4);
        assert_eq!((read_seed(&log, 5), read_seed(&log, 6)), (2, 3));
        log.drain_all().unwrap();
        assert_eq!(read_seed(&*pool, 0), 4);
    }

    /// A record planned for io_uring whose transfer failed, or never ran,
    /// still fills its place in the stream (written again from the bytes
    /// given back), so the log goes on; one whose bytes are lost stops the
    /// log, and what came before it still reaches the pool.
    #[test]
    fn a_record_that_failed_by_descriptor_is_written_again_and_a_lost_one_stops_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let pool = mem_pool();
        let (log, _file) = log_on_a_file(dir.path(), pool.clone());
        log.set_wanted(true);
        // The transfer failed (here: never made): written again.
        let mut failed = log.plan_fd_write(&[(0, &block(1))], &mut zeroed).unwrap();
        let bytes = failed.take_buf().unwrap();
        failed.end(false, &bytes);
        // Dropped before its bytes were taken: written from them.
        drop(
            log.plan_fd_write(&[(BLOCK_U64, &block(2))], &mut zeroed)
                .unwrap(),
        );
        log.write_at(&block(3), 2 * BLOCK_U64).unwrap();
        log.flush().unwrap();
        assert!(log.stats().failed.is_none());
        assert_eq!(
            (read_seed(&log, 0), read_seed(&log, 1), read_seed(&log, 2)),
            (1, 2, 3)
        );
        // Its bytes taken and lost: the log stops there.
        let mut lost = log
            .plan_fd_write(&[(3 * BLOCK_U64, &block(4))], &mut zeroed)
            .unwrap();
        drop(lost.take_buf());
        drop(lost);
        let failed = log.stats().failed.expect("the lost record is reported");
        assert!(failed.contains("lost unwritten"), "{failed}");
        assert!(log.write_at(&block(5), 4 * BLOCK_U64).is_err());
        assert!(log.flush().is_err());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while read_seed(&*pool, 2) != 3 {
            assert!(std::time::Instant::now() < deadline, "not destaged");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!((read_seed(&*pool, 0), read_seed(&*pool, 1)), (1, 2));
    }

    /// Planning never waits: a write that is not of whole blocks, or whose
    /// records do not fit in the ring now, is not planned (and takes no
    /// place); the caller's `write_at` waits for room instead.
    #[test]
    fn planning_refuses_what_it_cannot_place_now_and_takes_no_place() {
        let dir = tempfile::tempdir().unwrap();
        let (log, file) = log_on_a_file(dir.path(), mem_pool());
        log.set_wanted(true);
        assert!(log
            .plan_fd_write(&[(100, &block(1))], &mut zeroed)
            .is_none());
        assert!(log
            .plan_fd_write(&[(0, &block(1)[..100])], &mut zeroed)
            .is_none());
        assert!(log
            .plan_fd_write(&[(POOL_BLOCKS * BLOCK_U64, &block(1))], &mut zeroed)
            .is_none());
        // Hold the destage back with plans not yet ended, and fill the ring.
        let mut held = Vec::new();
        let big: Vec<u8> = (0..64).flat_map(|i| block(100 + i)).collect();
        loop {
            let head = log.head_lsn();
            match log.plan_fd_write(&[(0, &big), (64 * BLOCK_U64, &big)], &mut zeroed) {
                Some(mut p) => {
                    let bytes = carry(&mut p, &file);
                    held.push((p, bytes));
                }
                None => {
                    // Room for the first write but not both: neither placed.
                    assert_eq!(log.head_lsn(), head, "a refused plan took a place");
                    break;
                }
            }
            assert!(held.len() < 1000, "the ring never filled");
        }
        for (p, bytes) in held {
            p.end(true, &bytes);
        }
        // Room comes back as the destage goes on.
        log.write_at(&block(7), 0).unwrap();
        log.flush().unwrap();
        assert_eq!(read_seed(&log, 0), 7);
    }

    /// The log device fails a write: that write and every later one fail,
    /// flushes fail, nothing is acknowledged past the hole; the records
    /// before it still reach the pool.
    #[test]
    fn a_failing_log_device_fails_writes_and_flushes_and_keeps_what_came_before() {
        use parallax_device::Fault;
        let pool = Arc::new(MemDevice::new(POOL_BLOCKS * BLOCK_U64));
        let dev = Arc::new(CrashDevice::new(MIN_LOG_BYTES));
        let (log, _) = open(dev.clone(), pool.clone(), 0);
        log.set_wanted(true);
        log.write_at(&block(1), 0).unwrap();
        log.flush().unwrap();
        dev.inject(Fault::WriteEio { after_writes: 0 });
        assert!(log.write_at(&block(2), BLOCK_U64).is_err());
        assert!(
            log.write_at(&block(3), 2 * BLOCK_U64).is_err(),
            "a write after the failure"
        );
        assert!(log.flush().is_err());
        let failed = log.stats().failed.expect("the failure is reported");
        assert!(failed.contains("writing a record"), "{failed}");
        // What came before the failure is destaged.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while read_seed(&*pool, 0) != 1 {
            assert!(std::time::Instant::now() < deadline, "not destaged");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(read_seed(&log, 1), 0, "a failed write is visible");
    }

    /// A crash tore a record; the next session wrote its own record in its
    /// place and destaged it, so the durable tail now points at the torn
    /// record's successor, a record of the first session that was never
    /// flushed (its predecessor was torn). Replay must not take it: from the
    /// second session's first LSN on, records of older sessions are stale.
    #[test]
    fn replay_never_starts_at_a_stale_record_of_an_older_session() {
        let dev = Arc::new(MemDevice::new(MIN_LOG_BYTES));
        // Session 1: three one-block records (ring blocks 2-3, 4-5, 6-7),
        // none destaged (the pool is off), then the process dies.
        let off = Arc::new(CrashDevice::new(POOL_BLOCKS * BLOCK_U64));
        off.cut_power(CrashMode::DropAll);
        let (log, _) = open(dev.clone(), off, 0);
        let id = log.id();
        log.set_wanted(true);
        for (b, seed) in [(0, 10), (1, 20), (2, 30)] {
            log.write_at(&block(seed), b * BLOCK_U64).unwrap();
        }
        log.shared.state.lock().stop = true;
        drop(log);
        // The second record's payload was torn.
        dev.write_at(&[0xff; BLOCK], 5 * BLOCK_U64).unwrap();
        // Session 2: replays the first record, writes its own second one
        // in the same place, destages both: the tail moves to block 6.
        let pool: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(POOL_BLOCKS * BLOCK_U64));
        let (log, found) = open(dev.clone(), pool.clone(), id);
        assert_eq!(found, Found::Replayed);
        log.set_wanted(true);
        log.write_at(&block(21), BLOCK_U64).unwrap();
        log.flush().unwrap();
        log.drain_to(log.head_lsn()).unwrap();
        log.shared.state.lock().stop = true;
        drop(log);
        // Session 3: block 2 was never written by a session that lived on.
        let (log, _) = open(dev, pool, id);
        assert_eq!(read_seed(&log, 0), 10);
        assert_eq!(read_seed(&log, 1), 21);
        assert_eq!(
            read_seed(&log, 2),
            0,
            "a stale record of session 1 replayed"
        );
    }

    /// Three one-block records (ring blocks 2-3, 4-5, 6-7) held in the log
    /// (the destage gate closed), a flush after each of the first `flushed`
    /// ones; then the process dies, `damage` is written over ring block
    /// `at`, and the log is opened again.
    fn damaged_log(flushed: usize, at: u64) -> io::Result<(WriteLog, Found)> {
        let pool: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(POOL_BLOCKS * BLOCK_U64));
        let dev = Arc::new(MemDevice::new(MIN_LOG_BYTES));
        let (log, _) = open(dev.clone(), pool.clone(), 0);
        log.set_destage_gate(Arc::new(|| false));
        let id = log.id();
        log.set_wanted(true);
        for (i, seed) in [10, 20, 30].into_iter().enumerate() {
            log.write_at(&block(seed), i as u64 * BLOCK_U64).unwrap();
            if i < flushed {
                log.flush().unwrap();
            }
        }
        log.shared.state.lock().stop = true;
        drop(log);
        dev.write_at(&[0x5a; BLOCK], at * BLOCK_U64).unwrap();
        WriteLog::open(dev, pool, STORE, id, 0)
    }

    /// A flushed record that does not check out is damage, not a crash's
    /// torn tail: the records after it say it was flushed. Replay refuses
    /// rather than drop it (and every flushed record after it) in silence.
    #[test]
    fn a_damaged_flushed_record_is_reported_not_skipped() {
        // The first record's payload, then its header: both flushed (the
        // later records say so).
        for at in [3, 2] {
            let err = damaged_log(2, at).expect_err("a damaged log replayed");
            assert!(err.to_string().contains("damaged"), "{err}");
        }
        // The second one's payload, unflushed: a torn tail, cut silently
        // (the first record replays).
        let (log, found) = damaged_log(1, 5).unwrap();
        assert_eq!(found, Found::Replayed);
        assert_eq!(log.stats().replayed, 1);
        assert_eq!(read_seed(&log, 0), 10);
        // Undamaged: all three.
        let (log, _) = damaged_log(2, 100).unwrap();
        assert_eq!(log.stats().replayed, 3);
    }

    /// After the ring has wrapped, the records of the last lap lie beyond
    /// the head, at the places new records take: replay must stop at the
    /// end of the chain, not go on into them.
    #[test]
    fn replay_stops_at_the_end_of_the_chain_not_at_an_older_lap() {
        let pool: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(POOL_BLOCKS * BLOCK_U64));
        let dev = Arc::new(MemDevice::new(MIN_LOG_BYTES));
        let (log, _) = open(dev.clone(), pool.clone(), 0);
        let id = log.id();
        log.set_wanted(true);
        let mut latest = vec![0u64; POOL_BLOCKS as usize];
        // 5-block records: about 410 a lap; 1,500 of them wrap three times.
        for r in 1..=1500u64 {
            let first = (r % 16) * 4;
            let mut data = Vec::new();
            for i in 0..4 {
                data.extend(block(r * 10 + i));
                latest[(first + i) as usize] = r * 10 + i;
            }
            log.write_at(&data, first * BLOCK_U64).unwrap();
            if r % 10 == 0 {
                log.flush().unwrap();
            }
        }
        log.flush().unwrap();
        log.shared.state.lock().stop = true;
        drop(log);
        let (log, found) = open(dev, pool, id);
        assert_eq!(found, Found::Replayed);
        for b in 0..64 {
            assert_eq!(read_seed(&log, b), latest[b as usize], "block {b}");
        }
    }

    /// Power cut on the log device and the pool at once, at every flush of
    /// either (and in three modes): after replay, every block reads a value
    /// no older than the last flush that covered it, and draining then
    /// leaves the same on the pool alone.
    #[test]
    fn power_cuts_on_both_devices_lose_nothing_flushed() {
        let seeds: u64 = std::env::var("WRITE_LOG_CRASH_SEEDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4);
        for seed in 0..seeds {
            for at in 0..40u64 {
                let mode = match at % 3 {
                    0 => CrashMode::DropAll,
                    1 => CrashMode::KeepRandom(seed * 100 + at),
                    _ => CrashMode::TearOne(seed * 100 + at),
                };
                let pool = Arc::new(CrashDevice::new(POOL_BLOCKS * BLOCK_U64));
                let dev = Arc::new(CrashDevice::new(MIN_LOG_BYTES));
                let (log, _) = open(dev.clone(), pool.clone(), 0);
                let id = log.id();
                log.set_wanted(true);
                share_power(&[&pool, &dev], at, mode);
                let mut model = Model::new();
                run(&log, &mut model, &mut SplitMix(seed * 7919 + at), 400);
                pool.cut_power(mode);
                dev.cut_power(mode);
                drop(log);
                let pool2: Arc<dyn BlockDevice> =
                    Arc::new(CrashDevice::from_durable(pool.durable_image()));
                let dev2 = Arc::new(CrashDevice::from_durable(dev.durable_image()));
                let (log, found) = open(dev2, pool2.clone(), id);
                assert_eq!(found, Found::Replayed);
                let check = |dev: &dyn BlockDevice, what: &str| {
                    for b in 0..POOL_BLOCKS {
                        let mut buf = vec![0u8; BLOCK];
                        dev.read_at(&mut buf, b * BLOCK_U64).unwrap();
                        // Both halves (a write not flushed may be torn, in
                        // direct mode) hold values the model allows.
                        for half in [seed_of(&buf), get(&buf, BLOCK - 8)] {
                            assert!(
                                model.allowed(b).contains(&half),
                                "seed {seed}, cut at flush {at}, {what}: block {b} reads {half}, allowed {:?}",
                                model.allowed(b)
                            );
                        }
                    }
                };
                check(&log, "through the log");
                log.drain_all().unwrap();
                check(&*pool2, "the pool after draining");
            }
        }
    }
}
