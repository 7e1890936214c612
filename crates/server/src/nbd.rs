//! The NBD server: listeners, the handshake driven over a socket, and the
//! transmission phase.
//!
//! The protocol's bytes are `parallax-nbd`'s business (pure, fuzzed alone);
//! this module moves them between sockets and the engine:
//!
//! - One task per connection reads request headers (and write payloads)
//!   in order. Each request then runs on the blocking pool and queues its
//!   complete reply for the connection's writer task, which writes replies
//!   in the order they complete, batching those that complete together:
//!   requests of one connection run concurrently and complete out of
//!   order, as the protocol allows.
//! - Payloads and READ data live in 4 KiB-aligned buffers, so that an
//!   `O_DIRECT` store moves them without a bounce copy.
//! - A per-connection budget of bytes in flight (a semaphore) bounds the
//!   memory one client can pin, and a daemon-wide one ([`GLOBAL_BUDGET`])
//!   what all of them can; once either is spent, the reader stops reading
//!   from the socket until replies go out. Idle buffers are given back
//!   when the last client leaves ([`release_idle_buffers`]).
//! - Before negotiation ends, a connection holds one of [`MAX_HANDSHAKES`]
//!   places, a task and a 4 KiB buffer, for at most [`HANDSHAKE_IDLE`]
//!   without progress and [`HANDSHAKE_TIMEOUT`] in all;
//!   its 256 KiB read buffer comes after. Only export lookups leave the
//!   runtime's threads (they open disks), so clients that connect and say
//!   nothing cost no thread.
//! - All connections to one disk share the engine's single handle of that
//!   disk, so a FLUSH on any connection commits and makes durable the
//!   writes completed on all of them: the multi-connection flag is honest.
//! - A client that sends a bad request magic or a write larger than the
//!   advertised maximum is disconnected (the stream can no longer be
//!   trusted to be in sync); every other bad request gets an error reply.
//! - Aligned READs and WRITEs (without FUA) whose tree nodes are cached are
//!   planned by the engine ([`IoPlan`]) and carried by io_uring, or, without
//!   a ring (or on a store with no file descriptor), by the plan's own
//!   device calls on the blocking pool.
//! - Cluster mode: a client naming a disk another appliance holds
//!   negotiates as usual (the size from the disk's header); it reads the
//!   disk as its newest commit on the pool has it, and its first request
//!   that changes the disk asks for it and waits, up to `--claim-wait`
//!   (`Service::claim`): how a disk follows a migrating VM.
//! - Nothing happens to a disk when its client leaves: the store owns the
//!   disk's state and commits what a client wrote and left unflushed once
//!   the disk has been idle a moment (the daemon's settle tick).

use crate::metrics::{self, DiskMetrics};
use crate::service::Service;
use crate::uring::{Direction, Uring};
use parallax_device::AlignedBuf;
use parallax_engine::{
    allocation_depth, diff_in, DiskRef, Error as EngineError, FdTransfer, IoPlan, ReadDisk,
    SnapshotView, Vdi,
};
use parallax_nbd::handshake::{
    BlockSizes, Config as HandshakeConfig, ExportInfo, Exports, Handshake, HandshakeError,
    Negotiated, Progress, TlsMode,
};
use parallax_nbd::proto::{self, Command, Request};
use std::io::{self, Cursor};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

/// Largest READ or WRITE payload, advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Bytes of requests one connection may have in flight.
const CONNECTION_BUDGET: u32 = 2 * MAX_PAYLOAD;
/// Longest extent run examined by one BLOCK_STATUS request.
const STATUS_WINDOW: u64 = 1 << 30;
/// During negotiation, the longest wait for the client's next bytes (or
/// for it to take our reply); past it, the connection is closed.
const HANDSHAKE_IDLE: Duration = Duration::from_secs(15);
/// A client must finish negotiating within this time, however busy. (Long,
/// because `nbdinfo --list` over TCP asks about each export in turn, and
/// libnbd 1.14 holds each NBD_OPT_LIST_META_CONTEXT back 200 ms with
/// MSG_MORE: 3,000 exports.)
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(600);
/// Handshakes in progress at once; a connection beyond that is closed at
/// once. A handshake holds a task, a 4 KiB read buffer and what its
/// options carry (at most `max_option_len`), so this bounds what clients
/// that connect and never negotiate can pin.
const MAX_HANDSHAKES: usize = 1024;
/// Read buffer of a connection once negotiated.
const READ_BUFFER: usize = 256 << 10;
/// Zeroes written per engine call for WRITE_ZEROES with NO_HOLE.
const ZERO_CHUNK: u64 = 1 << 20;

fn handshake_config(tls: TlsMode) -> HandshakeConfig {
    HandshakeConfig {
        block_sizes: BlockSizes {
            minimum: 1,
            preferred: parallax_format::BLOCK_SIZE as u32,
            maximum: MAX_PAYLOAD,
        },
        multi_conn: true,
        max_option_len: 64 << 10,
        tls,
    }
}

/// What one connection serves: a disk or one of its snapshots.
type Target = Box<dyn ReadDisk>;

/// Opens export `name`; `None` for a disk another appliance of the
/// cluster holds, which a client may wait for (see [`Claim`]).
fn open_target(service: &Service, name: &str) -> Result<Option<Target>, EngineError> {
    let store = service.store();
    let export = DiskRef::split(name);
    // One writer: not a disk a vhost-user frontend has.
    if export.snapshot.is_none()
        && service
            .connections()
            .iter()
            .any(|c| c.export == name && c.peer == crate::vhost_user::VHOST_USER_PEER)
    {
        return Err(EngineError::Busy(format!(
            "{name} is attached over vhost-user (one writer at a time)"
        )));
    }
    Ok(Some(match &export.snapshot {
        Some(snap) => Box::new(store.open_snapshot(&export.disk, snap)?),
        None => match store.open_vdi(&export.disk) {
            Ok(vdi) => Box::new(vdi),
            Err(EngineError::Busy(_)) if !service.claim_wait().is_zero() => return Ok(None),
            Err(e) => return Err(e),
        },
    }))
}

/// The store's disks and snapshots as the handshake sees them. Keeps the
/// last export it opened, so that the one a GO chose is not opened twice.
struct StoreExports<'a> {
    service: &'a Service,
    last: std::sync::Mutex<Option<(String, Option<Target>)>>,
    /// Why the last lookup failed, when that is worth telling the client
    /// (a disk another appliance of the cluster writes).
    refused: std::sync::Mutex<Option<(String, String)>>,
}

impl StoreExports<'_> {
    /// The negotiated export: the one already opened, or opened now.
    fn take(&self, name: &str) -> Result<Option<Target>, EngineError> {
        let last = self.last.lock().ok().and_then(|mut l| l.take());
        match last {
            Some((n, target)) if n == name => Ok(target),
            _ => off_runtime(|| open_target(self.service, name)),
        }
    }
}

impl Exports for StoreExports<'_> {
    // Export lookups open disks (the catalogue lock, device reads) and read
    // their size (the disk's lock, shared: it waits behind a snapshot
    // waiting for planned I/O that only the runtime completes): off the
    // runtime's threads, which must never wait on disk locks (see the
    // uring module). Nothing else in a handshake blocks.
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let (target, info) = off_runtime(|| {
            let target = match open_target(self.service, name) {
                Ok(t) => t,
                Err(e) => {
                    if failures_to_log() {
                        info!(export = %name, "export refused during negotiation: {e}");
                    }
                    if matches!(e, EngineError::Busy(_) | EngineError::Fenced(_)) {
                        if let Ok(mut r) = self.refused.lock() {
                            *r = Some((name.to_string(), format!("export '{name}' refused: {e}")));
                        }
                    }
                    return None;
                }
            };
            let info = match &target {
                Some(t) => ExportInfo {
                    size: t.size(),
                    read_only: t.writable().is_none(),
                    description: None,
                },
                // Held elsewhere: writable once asked for and given.
                None => ExportInfo {
                    size: self.service.store().disk_size(name).ok()?,
                    read_only: false,
                    description: None,
                },
            };
            Some((target, info))
        })?;
        if let Ok(mut last) = self.last.lock() {
            *last = Some((name.to_string(), target));
        }
        Some(info)
    }

    /// A disk is described from its header, without opening it (so that
    /// `nbdinfo --list` on 15,376 disks does not open them all); a snapshot
    /// is looked up. So is a disk in cluster mode when a GO could be
    /// refused (without `--claim-wait`, or fenced): INFO must not promise
    /// what GO then refuses.
    fn describe(&self, name: &str) -> Option<ExportInfo> {
        let export = DiskRef::split(name);
        let go_may_refuse = self
            .service
            .cluster()
            .is_some_and(|c| self.service.claim_wait().is_zero() || !c.may_write());
        if export.snapshot.is_some() || go_may_refuse {
            return self.lookup(name);
        }
        let store = self.service.store();
        let size = match store.try_disk_size(&export.disk) {
            Some(size) => size,
            None => off_runtime(|| store.disk_size(&export.disk)),
        };
        Some(ExportInfo {
            size: size.ok()?,
            read_only: false,
            description: None,
        })
    }

    fn list(&self) -> Vec<(String, Option<String>)> {
        off_runtime(|| self.service.exports())
            .unwrap_or_else(|e| {
                warn!("listing exports: {e}");
                Vec::new()
            })
            .into_iter()
            .map(|n| (n, None))
            .collect()
    }

    fn why_not(&self, name: &str) -> Option<String> {
        let refused = self.refused.lock().ok()?.take()?;
        (refused.0 == name).then_some(refused.1)
    }

    fn meta_contexts(&self, name: &str) -> Vec<String> {
        off_runtime(|| offered_contexts(self.service, name))
    }
}

/// Serves one client from its first byte to its last. Errors end only this
/// connection; they are logged, never propagated to other clients.
pub async fn serve_connection<S>(
    stream: S,
    peer: String,
    service: Arc<Service>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(handshaking) = handshake_slot() else {
        return;
    };
    let negotiation = negotiate(Box::new(stream), &service, &peer, &mut shutdown);
    let negotiated = match tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiation).await {
        Ok(Ok(Some(n))) => n,
        Ok(Ok(None)) => return,
        Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
            info!(%peer, "{e}; disconnecting");
            return;
        }
        Ok(Err(e)) => {
            debug!(%peer, "handshake ended: {e}");
            return;
        }
        Err(_) => {
            info!(%peer, "handshake timed out; disconnecting");
            return;
        }
    };
    drop(handshaking);
    let (negotiated, leftover, target, stream) = negotiated;
    let (reader, writer) = tokio::io::split(stream);
    let target = match target {
        Ok(t) => t,
        Err(e) => {
            warn!(%peer, export = %negotiated.export, "cannot open export after negotiation: {e}");
            return;
        }
    };
    let guard = service.register_connection(&negotiated.export, &peer);
    info!(%peer, export = %negotiated.export, id = guard.id(), structured = negotiated.structured_replies, tls = negotiated.tls, held_elsewhere = target.is_none(), "client connected");
    let claim = match target {
        Some(_) => None,
        None => match off_runtime(|| service.store().committed_head(&negotiated.export)) {
            Ok(committed) => Some(Claim {
                service: service.clone(),
                committed,
                asking: std::sync::Mutex::new(()),
            }),
            Err(e) => {
                warn!(%peer, export = %negotiated.export, "cannot read the export after negotiation: {e}");
                return;
            }
        },
    };
    let disk_metrics = metrics::global().connected(&negotiated.export);
    let ctx = Arc::new(Connection {
        disk_metrics,
        peer: peer.clone(),
        export: negotiated.export.clone(),
        target: target.map(OnceLock::from).unwrap_or_default(),
        claim,
        size: negotiated.info.size,
        read_only: negotiated.info.read_only,
        structured: negotiated.structured_replies,
        base_allocation: negotiated.base_allocation,
        contexts: negotiated
            .meta_contexts
            .iter()
            .map(|(id, name)| (*id, open_context(&service, &negotiated.export, name)))
            .collect(),
        uring: service.uring().cloned(),
    });
    let reader = Cursor::new(leftover).chain(BufReader::with_capacity(READ_BUFFER, reader));
    let outcome = transmission(reader, writer, ctx.clone(), &mut shutdown).await;
    metrics::global().disconnected();
    match outcome {
        Ok(()) => info!(%peer, id = guard.id(), "client disconnected"),
        Err(e) => info!(%peer, id = guard.id(), "client dropped: {e}"),
    }
    drop(guard);
}

/// A client's byte stream: the socket, or a TLS session over it.
trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for T {}

/// The outcome of a handshake, the bytes after it, the chosen export, and
/// the stream to go on with (inside TLS if the client started it).
type Negotiation = (
    Negotiated,
    Vec<u8>,
    Result<Option<Target>, EngineError>,
    Box<dyn ClientStream>,
);

/// A place among the [`MAX_HANDSHAKES`], held until the handshake ends;
/// `None` (and a warning) when there is none.
fn handshake_slot() -> Option<OwnedSemaphorePermit> {
    static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    let slots = SLOTS.get_or_init(|| Arc::new(Semaphore::new(MAX_HANDSHAKES)));
    let slot = slots.clone().try_acquire_owned().ok();
    if slot.is_none() {
        warn!("{MAX_HANDSHAKES} NBD handshakes are in progress; refusing another connection");
    }
    slot
}

/// Runs the handshake, upgrading `stream` to TLS when the client asks
/// (and the policy allows). Once `shutdown` turns true, every option gets
/// `NBD_REP_ERR_SHUTDOWN` for [`SHUTDOWN_GRACE`], then the connection
/// closes. `Ok(None)`: the client left or aborted.
async fn negotiate(
    mut stream: Box<dyn ClientStream>,
    service: &Service,
    peer: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> io::Result<Option<Negotiation>> {
    let exports = StoreExports {
        service,
        last: std::sync::Mutex::new(None),
        refused: std::sync::Mutex::new(None),
    };
    let tls = service.tls();
    let mut handshake = Handshake::new(handshake_config(tls.mode));
    let mut out = Vec::new();
    handshake.greeting(&mut out);
    let mut input = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut progress: Result<Progress, HandshakeError> = Ok(Progress::NeedInput);
    // Set once the daemon is shutting down.
    let mut closing_at = None;
    loop {
        if !out.is_empty() {
            within_idle(async {
                stream.write_all(&out).await?;
                stream.flush().await
            })
            .await?;
        }
        match progress {
            Ok(Progress::NeedInput) => {}
            Ok(Progress::StartTls) => {
                let Some(acceptor) = tls.acceptor() else {
                    return Err(io::Error::other(
                        "STARTTLS accepted without TLS credentials",
                    ));
                };
                stream = match within_idle(acceptor.accept(stream)).await {
                    Ok(s) => Box::new(s),
                    Err(e) => {
                        info!(%peer, "TLS handshake failed: {e}; disconnecting");
                        return Ok(None);
                    }
                };
                debug!(%peer, "TLS started");
            }
            Ok(Progress::Done(n)) => {
                let target = exports.take(&n.export);
                return Ok(Some((n, input, target, stream)));
            }
            Ok(Progress::Close) => {
                refused_without_tls(&handshake, tls.mode, peer);
                return Ok(None);
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
        let n = if let Some(deadline) = closing_at {
            match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                Ok(n) => n?,
                Err(_) => return Ok(None),
            }
        } else {
            tokio::select! {
                n = within_idle(stream.read(&mut chunk)) => n?,
                _ = shutdown.changed() => {
                    // Only a partial option can be waiting in `input`:
                    // nothing to answer yet; the client's next options
                    // get NBD_REP_ERR_SHUTDOWN.
                    handshake.shut_down();
                    closing_at = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                    out.clear();
                    progress = Ok(Progress::NeedInput);
                    continue;
                }
            }
        };
        if n == 0 {
            refused_without_tls(&handshake, tls.mode, peer);
            return Ok(None);
        }
        input.extend_from_slice(&chunk[..n]);
        out.clear();
        progress = handshake.receive(&mut input, &exports, &mut out);
    }
}

/// Logs a client that left a server requiring TLS without starting it:
/// it was refused everything it asked for.
fn refused_without_tls(handshake: &Handshake, mode: TlsMode, peer: &str) {
    if mode == TlsMode::Require && !handshake.in_tls() {
        info!(%peer, "client left without starting TLS, which this server requires");
    }
}

/// How long a connection still negotiating when the daemon shuts down is
/// told so (`NBD_REP_ERR_SHUTDOWN`) before it is closed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Runs one step of a handshake's I/O, failing after [`HANDSHAKE_IDLE`].
async fn within_idle<T>(step: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(HANDSHAKE_IDLE, step)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client went quiet during the handshake",
            ))
        })
}

/// Runs `f`, which may block, letting the runtime move its other tasks to
/// another thread meanwhile (multi-threaded runtimes; a current-thread
/// runtime, as in the fuzz target, just runs it).
fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The negotiated state of one connection, shared by its requests.
struct Connection {
    /// Who and what, for the log.
    peer: String,
    export: String,
    /// Set from the start, or once claimed.
    target: OnceLock<Target>,
    /// A disk another appliance held when the client connected: read as
    /// its newest commit has it, and asked for on the first request that
    /// changes it (WRITE, TRIM, WRITE_ZEROES).
    claim: Option<Claim>,
    size: u64,
    read_only: bool,
    structured: bool,
    base_allocation: Option<u32>,
    /// The other metadata contexts negotiated, with their ids.
    contexts: Vec<(u32, ExtraContext)>,
    uring: Option<Arc<Uring>>,
    /// This connection's per-disk counters (`--metrics-per-disk`).
    disk_metrics: Option<DiskMetrics>,
}

/// A disk to ask for (see [`Service::claim`]).
struct Claim {
    service: Arc<Service>,
    /// What the client reads until it writes.
    committed: parallax_engine::CommittedHead,
    /// Held by the one request asking; the others wait for its outcome.
    asking: std::sync::Mutex<()>,
}

impl Connection {
    /// The export, asked for first if another appliance held it (waiting
    /// for it: blocking).
    fn target(&self) -> Result<&Target, Failure> {
        if let Some(t) = self.target.get() {
            return Ok(t);
        }
        let Some(claim) = &self.claim else {
            return Err(Failure::new(proto::EIO, "no export"));
        };
        let _asking = claim
            .asking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(t) = self.target.get() {
            return Ok(t);
        }
        let vdi = claim.service.claim(&self.export)?;
        info!(export = %self.export, "the disk, asked for, is now held here");
        Ok(self.target.get_or_init(|| Box::new(vdi)))
    }

    /// The export if this appliance holds it now, without asking for it:
    /// set from the start, or held since another connection here asked
    /// for it (then it becomes this connection's target too).
    fn held_here(&self) -> Result<Option<&Target>, Failure> {
        if let Some(t) = self.target.get() {
            return Ok(Some(t));
        }
        let Some(claim) = &self.claim else {
            return Ok(None);
        };
        Ok(match claim.service.store().open_if_held(&self.export)? {
            Some(vdi) => Some(self.target.get_or_init(|| Box::new(vdi))),
            None => None,
        })
    }
}

/// Recycled payload and READ buffers. A fresh 1 MiB buffer costs page
/// faults and zeroing on every request; a recycled one costs nothing.
/// Buffers are sized by powers of two from 4 KiB to 1 MiB; each size keeps
/// at most [`POOL_BYTES_PER_SIZE`] bytes (and 64 buffers) idle. A recycled
/// buffer holds an earlier request's bytes: every user overwrites all of
/// it (a READ fills every byte or fails; a payload is read in full).
struct BufPool {
    sizes: Vec<std::sync::Mutex<Vec<AlignedBuf>>>,
}

const POOL_SMALLEST: usize = 4096;
const POOL_LARGEST: usize = 1 << 20;
const POOL_BYTES_PER_SIZE: usize = 8 << 20;

/// Drops the recycled buffers no request holds (the daemon calls it when
/// its last client has left, so that memory goes back to the system).
pub fn release_idle_buffers() {
    for size in &BufPool::global().sizes {
        size.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

impl BufPool {
    fn global() -> &'static BufPool {
        static POOL: OnceLock<BufPool> = OnceLock::new();
        POOL.get_or_init(|| BufPool {
            sizes: (POOL_SMALLEST.trailing_zeros()..=POOL_LARGEST.trailing_zeros())
                .map(|_| std::sync::Mutex::new(Vec::new()))
                .collect(),
        })
    }

    fn class(len: usize) -> Option<(usize, usize)> {
        let size = len.max(POOL_SMALLEST).next_power_of_two();
        (size <= POOL_LARGEST).then(|| {
            let index = (size.trailing_zeros() - POOL_SMALLEST.trailing_zeros()) as usize;
            (index, size)
        })
    }

    /// A buffer of `len` bytes, recycled when one is idle.
    fn take(&self, len: usize) -> AlignedBuf {
        let Some((index, size)) = Self::class(len) else {
            return AlignedBuf::zeroed(len);
        };
        let idle = self.sizes[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let mut buf = idle.unwrap_or_else(|| AlignedBuf::zeroed(size));
        if buf.resize_within(len).is_none() {
            buf = AlignedBuf::zeroed(len);
        }
        buf
    }

    /// Returns a buffer for reuse (dropped if its size class is full).
    fn give(&self, buf: AlignedBuf) {
        let Some((index, size)) =
            Self::class(buf.capacity().saturating_sub(parallax_device::ALIGN))
        else {
            return;
        };
        if buf.capacity() < size {
            return;
        }
        let mut idle = self.sizes[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < 64 && (idle.len() + 1) * size <= POOL_BYTES_PER_SIZE.max(size) {
            idle.push(buf);
        }
    }
}

/// Bytes of requests all connections together may have in flight: the
/// daemon's memory for payloads and READ data stays under this, whatever
/// clients do (they wait, unread, until replies go out).
const GLOBAL_BUDGET: u32 = 256 << 20;

/// The daemon-wide budget behind [`GLOBAL_BUDGET`].
fn global_budget() -> &'static Arc<Semaphore> {
    static BUDGET: OnceLock<Arc<Semaphore>> = OnceLock::new();
    BUDGET.get_or_init(|| Arc::new(Semaphore::new(GLOBAL_BUDGET as usize)))
}

/// The bytes one request holds of its connection's budget and of the
/// daemon's, released when its reply has been written.
struct Budget {
    _connection: OwnedSemaphorePermit,
    _daemon: OwnedSemaphorePermit,
}

/// Takes `cost` bytes of `connection`'s budget, then of the daemon's.
async fn acquire_budget(connection: &Arc<Semaphore>, cost: u32) -> Option<Budget> {
    let connection = connection.clone().acquire_many_owned(cost).await.ok()?;
    let daemon = global_budget()
        .clone()
        .acquire_many_owned(cost)
        .await
        .ok()?;
    Some(Budget {
        _connection: connection,
        _daemon: daemon,
    })
}

/// A complete reply, queued for the connection's writer task. The budget
/// permit of its request is released once the reply has been written.
struct Reply {
    head: Vec<u8>,
    /// READ data, in a buffer the device could fill without a bounce copy.
    data: Option<AlignedBuf>,
    _permit: Budget,
}

async fn transmission<R, W>(
    mut reader: R,
    writer: W,
    ctx: Arc<Connection>,
    shutdown: &mut watch::Receiver<bool>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let budget = Arc::new(Semaphore::new(CONNECTION_BUDGET as usize));
    let (replies, queue) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(write_replies(writer, queue));
    let result = loop {
        let mut header = [0u8; proto::REQUEST_HEADER_LEN];
        tokio::select! {
            r = reader.read_exact(&mut header) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(e),
            },
            _ = shutdown.changed() => break Ok(()),
        }
        let request = match Request::decode(&header) {
            Ok(r) => r,
            Err(e) => {
                break Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
            }
        };
        if request.command == Command::Disc {
            break Ok(());
        }
        let payload_len = request.payload_len();
        if payload_len > MAX_PAYLOAD {
            break Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("write of {payload_len} bytes exceeds the maximum of {MAX_PAYLOAD}"),
            ));
        }
        let cost = match request.command {
            Command::Read | Command::Write => request.length.clamp(4096, MAX_PAYLOAD),
            _ => 4096,
        };
        // This connection's budget first, then the daemon's: a client that
        // pipelines without reading replies stops being read from once
        // either is spent, and all of them together stay under the global
        // bound.
        let permit = tokio::select! {
            p = acquire_budget(&budget, cost) => match p {
                Some(p) => p,
                None => break Ok(()),
            },
            _ = shutdown.changed() => break Ok(()),
        };
        let mut payload = BufPool::global().take(payload_len as usize);
        if payload_len > 0 {
            if let Err(e) = reader.read_exact(&mut payload).await {
                break Err(e);
            }
        }
        metrics::global().received();
        let job = Job {
            ctx: ctx.clone(),
            request,
            permit,
            replies: replies.clone(),
            received: std::time::Instant::now(),
        };
        match plan_async(&ctx, &request, &payload) {
            Some(planned) if planned.uring.is_some() => {
                tokio::spawn(job.run_async(planned, payload));
            }
            Some(planned) => job.run_planned(planned, payload),
            None => job.run_blocking(payload),
        }
    };
    // The writer ends once every request still running has sent its reply.
    drop(replies);
    let writer = writer.await;
    if let Ok(mut w) = writer {
        let _ = w.shutdown().await;
    }
    result
}

/// One request on its way to a reply.
struct Job {
    ctx: Arc<Connection>,
    request: Request,
    permit: Budget,
    replies: mpsc::UnboundedSender<Reply>,
    /// When its header and payload had been read.
    received: std::time::Instant,
}

impl Job {
    /// Counts the request as answered, `ok` or not.
    fn count(&self, ok: bool) {
        let req = &self.request;
        let bytes = match req.command {
            Command::Read | Command::Write => u64::from(req.length),
            _ => 0,
        };
        metrics::global().answered(
            req.command,
            ok,
            bytes,
            self.received.elapsed(),
            self.ctx.disk_metrics.as_ref(),
        );
    }
}

/// A READ or WRITE planned by the engine, carried by io_uring when there
/// is a ring and a file, by the device's own calls otherwise.
struct Planned {
    /// The ring, and the plan's transfers by file descriptor.
    uring: Option<(Arc<Uring>, Vec<FdTransfer>)>,
    direction: Direction,
    plan: IoPlan,
}

/// Plans `req` without blocking. `None` sends it to the blocking path: not
/// a plain aligned READ or WRITE (FUA, errors, other commands), a tree
/// node is not cached, the store is full, or the disk is locked
/// exclusively at this moment.
fn plan_async(ctx: &Connection, req: &Request, payload: &[u8]) -> Option<Planned> {
    // Requests with flags go the blocking way, which checks them.
    if req.flags != 0 {
        return None;
    }
    let (direction, plan) = match req.command {
        Command::Read if req.length > 0 && req.length <= MAX_PAYLOAD => (
            Direction::Read,
            ctx.target
                .get()?
                .try_plan_read(req.offset, req.length as usize),
        ),
        Command::Write if !ctx.read_only => {
            let vdi = ctx.target.get()?.writable()?;
            (
                Direction::Write,
                vdi.try_plan_write(req.offset, req.length as usize),
            )
        }
        _ => return None,
    };
    let mut plan = plan.ok()??;
    let uring = match (&ctx.uring, direction) {
        (Some(u), Direction::Read) => plan.fd_transfers().map(|t| (u.clone(), t)),
        (Some(u), Direction::Write) => plan
            .fd_write_transfers(payload, &mut |len| BufPool::global().take(len))
            .map(|t| (u.clone(), t)),
        (None, _) => None,
    };
    Some(Planned {
        uring,
        direction,
        plan,
    })
}

impl Job {
    /// Runs the request on the blocking pool.
    fn run_blocking(self, payload: AlignedBuf) {
        tokio::task::spawn_blocking(move || {
            let run = std::panic::AssertUnwindSafe(|| execute(&self.ctx, self.request, &payload));
            let (head, data, ok) = std::panic::catch_unwind(run).unwrap_or_else(|_| {
                // A bug, not the client's doing: answer EIO rather than
                // leave the client waiting forever.
                let mut out = Vec::new();
                let bug = Failure::new(proto::EIO, "internal error (a bug): see the daemon's log");
                error_reply(&self.ctx, &self.request, bug, &mut out);
                (out, None, false)
            });
            self.count(ok);
            let Job {
                permit, replies, ..
            } = self;
            BufPool::global().give(payload);
            // Fails only when the writer is gone with the client.
            let _ = replies.send(Reply {
                head,
                data,
                _permit: permit,
            });
        });
    }

    /// Moves a plan's data with the device's own calls on the blocking
    /// pool, then finishes the plan; on failure, runs the request again on
    /// the blocking path, which reports errors properly.
    fn run_planned(self, planned: Planned, payload: AlignedBuf) {
        let Planned {
            direction, plan, ..
        } = planned;
        let req = self.request;
        tokio::task::spawn_blocking(move || {
            let mut buf = match direction {
                Direction::Read => BufPool::global().take(req.length as usize),
                Direction::Write => payload,
            };
            let outcome = plan.execute(&mut buf, direction == Direction::Write);
            plan.finish(outcome.is_ok());
            match outcome {
                Ok(()) => self.reply_planned(direction, buf),
                Err(e) => self.retry_blocking(direction, buf, &e),
            }
        });
    }

    /// Moves the data through io_uring; on any failure, runs the request
    /// again on the blocking path, which reports errors properly.
    async fn run_async(self, planned: Planned, payload: AlignedBuf) {
        let Planned {
            uring,
            direction,
            mut plan,
        } = planned;
        let Some((uring, transfers)) = uring else {
            return self.run_planned(
                Planned {
                    uring: None,
                    direction,
                    plan,
                },
                payload,
            );
        };
        let req = self.request;
        // A WRITE to a write-back log writes the log's records (taken just
        // before the ring has them: no await until then), and keeps the
        // payload for a retry.
        let (buf, mut payload) = match (direction, plan.take_log_records()) {
            (Direction::Read, _) => (BufPool::global().take(req.length as usize), None),
            (Direction::Write, Some(records)) => (records, Some(payload)),
            (Direction::Write, None) => (payload, None),
        };
        let zeros = std::mem::take(&mut plan.zeros);
        let copies = plan.take_copy_checks();
        let (mut buf, outcome) = uring.run(direction, buf, &transfers, Box::new(plan)).await;
        if let Some(p) = payload.take() {
            BufPool::global().give(std::mem::replace(&mut buf, p));
        }
        if let Err(e) = outcome {
            return self.retry_blocking(direction, buf, &e);
        }
        if copies.is_some_and(|c| !c.verify(&buf)) {
            let e = io::Error::other("a copy in the read cache failed its check");
            return self.retry_blocking(direction, buf, &e);
        }
        if direction == Direction::Read {
            for z in zeros {
                buf[z].fill(0);
            }
        }
        self.reply_planned(direction, buf);
    }

    /// After a planned transfer failed: the request again, on the blocking path.
    fn retry_blocking(self, direction: Direction, buf: AlignedBuf, e: &io::Error) {
        debug!(
            cookie = self.request.cookie,
            "planned transfer failed, retrying on the blocking path: {e}"
        );
        let payload = match direction {
            Direction::Write => buf,
            Direction::Read => AlignedBuf::zeroed(0),
        };
        self.run_blocking(payload)
    }

    /// Replies to a planned READ (with `buf`, complete) or WRITE.
    fn reply_planned(self, direction: Direction, buf: AlignedBuf) {
        let req = self.request;
        let mut head = Vec::new();
        let data = match direction {
            Direction::Read => {
                if self.ctx.structured {
                    proto::structured_data_header(
                        &mut head,
                        req.cookie,
                        req.offset,
                        buf.len(),
                        true,
                    );
                } else {
                    proto::simple_reply(&mut head, req.cookie, 0);
                }
                Some(buf)
            }
            Direction::Write => {
                BufPool::global().give(buf);
                proto::simple_reply(&mut head, req.cookie, 0);
                None
            }
        };
        self.count(true);
        let _ = self.replies.send(Reply {
            head,
            data,
            _permit: self.permit,
        });
    }
}

/// Writes replies as they come, through a buffer flushed whenever the
/// queue runs dry: replies that complete together leave in one syscall.
/// After a failed write (the client is gone) replies are only drained.
async fn write_replies<W>(writer: W, mut queue: mpsc::UnboundedReceiver<Reply>) -> W
where
    W: AsyncWrite + Unpin,
{
    let mut out = BufWriter::with_capacity(256 << 10, writer);
    let mut broken = false;
    while let Some(mut reply) = queue.recv().await {
        loop {
            if !broken {
                let mut sent = out.write_all(&reply.head).await;
                if let (Ok(()), Some(data)) = (&sent, &reply.data) {
                    sent = out.write_all(data).await;
                }
                broken = sent.is_err();
            }
            if let Some(data) = reply.data.take() {
                BufPool::global().give(data);
            }
            match queue.try_recv() {
                Ok(next) => reply = next,
                Err(_) => break,
            }
        }
        if !broken {
            broken = out.flush().await.is_err();
        }
    }
    out.into_inner()
}

/// An error reply: the errno for the wire and a message for the log and,
/// with structured replies, for the client.
struct Failure {
    errno: u32,
    message: String,
}

impl Failure {
    fn new(errno: u32, message: impl Into<String>) -> Failure {
        Failure {
            errno,
            message: message.into(),
        }
    }
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Failure {
        let errno = match &e {
            EngineError::InvalidArgument(_) => proto::EINVAL,
            EngineError::NoSpace => proto::ENOSPC,
            EngineError::ReadOnly(_) => proto::EPERM,
            EngineError::Fenced(_) => proto::ESHUTDOWN,
            _ => proto::EIO,
        };
        if errno == proto::EIO {
            warn!("I/O error served to a client: {e}");
        }
        Failure::new(errno, e.to_string())
    }
}

/// Runs one request and returns its complete reply (the header bytes and,
/// for a successful READ, the data) and whether it succeeded.
fn execute(ctx: &Connection, req: Request, payload: &[u8]) -> (Vec<u8>, Option<AlignedBuf>, bool) {
    let mut out = Vec::new();
    if let Err(f) = check_flags(ctx, &req) {
        error_reply(ctx, &req, f, &mut out);
        return (out, None, false);
    }
    match req.command {
        Command::Read => match read(ctx, &req) {
            Ok(data) => {
                if ctx.structured {
                    proto::structured_data_header(
                        &mut out,
                        req.cookie,
                        req.offset,
                        data.len(),
                        true,
                    );
                } else {
                    proto::simple_reply(&mut out, req.cookie, 0);
                }
                return (out, Some(data), true);
            }
            Err(f) => error_reply(ctx, &req, f, &mut out),
        },
        Command::BlockStatus => match block_status(ctx, &req) {
            Ok(chunks) => {
                let last = chunks.len().saturating_sub(1);
                for (i, (id, extents)) in chunks.iter().enumerate() {
                    proto::structured_block_status(&mut out, req.cookie, *id, extents, i == last);
                }
                return (out, None, true);
            }
            Err(f) => error_reply(ctx, &req, f, &mut out),
        },
        _ => match other(ctx, &req, payload) {
            Ok(()) => {
                proto::simple_reply(&mut out, req.cookie, 0);
                return (out, None, true);
            }
            Err(f) => error_reply(ctx, &req, f, &mut out),
        },
    }
    (out, None, false)
}

fn error_reply(ctx: &Connection, req: &Request, f: Failure, out: &mut Vec<u8>) {
    if failures_to_log() {
        info!(
            peer = %ctx.peer,
            export = %ctx.export,
            command = ?req.command,
            offset = req.offset,
            length = req.length,
            flags = req.flags,
            errno = f.errno,
            "request failed: {}",
            f.message
        );
    }
    // With structured replies, every error goes as an error chunk: it
    // carries the message (the spec's SHOULD; a READ or BLOCK_STATUS error
    // MUST).
    if ctx.structured {
        proto::structured_error(out, req.cookie, f.errno, &f.message);
    } else {
        proto::simple_reply(out, req.cookie, f.errno);
    }
}

/// Failed requests logged per second at most; the others are counted, and
/// the count logged when the next second begins.
const FAILURES_LOGGED_PER_SECOND: u32 = 20;

/// Whether this failed request may be logged (see
/// [`FAILURES_LOGGED_PER_SECOND`]).
fn failures_to_log() -> bool {
    // (second, logged in it, not logged in it)
    static WINDOW: std::sync::Mutex<(u64, u32, u64)> = std::sync::Mutex::new((0, 0, 0));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut w = WINDOW
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if w.0 != now {
        if w.2 > 0 {
            info!(
                suppressed = w.2,
                "failed requests not logged in the last second"
            );
        }
        *w = (now, 0, 0);
    }
    if w.1 < FAILURES_LOGGED_PER_SECOND {
        w.1 += 1;
        true
    } else {
        w.2 += 1;
        false
    }
}

/// The command flags `req` may carry: FUA on any command of a writable
/// export (where it is advertised), DF on READ with structured replies,
/// NO_HOLE and FAST_ZERO on WRITE_ZEROES, REQ_ONE on BLOCK_STATUS. Any
/// other flag, known or not, is EINVAL: the spec's SHOULD (a MUST for
/// CACHE).
fn check_flags(ctx: &Connection, req: &Request) -> Result<(), Failure> {
    let mut allowed = if ctx.read_only {
        0
    } else {
        proto::CMD_FLAG_FUA
    };
    allowed |= match req.command {
        Command::Read if ctx.structured => proto::CMD_FLAG_DF,
        Command::WriteZeroes => proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO,
        Command::BlockStatus => proto::CMD_FLAG_REQ_ONE,
        _ => 0,
    };
    match req.flags & !allowed {
        0 => Ok(()),
        stray => Err(Failure::new(
            proto::EINVAL,
            format!("flags {stray:#x} do not apply to {:?}", req.command),
        )),
    }
}

/// Checks `[offset, offset+length)` against the disk size.
fn check_range(ctx: &Connection, req: &Request, past_end_errno: u32) -> Result<(), Failure> {
    match req.offset.checked_add(u64::from(req.length)) {
        Some(end) if end <= ctx.size => Ok(()),
        _ => Err(Failure::new(
            past_end_errno,
            format!(
                "range {}+{} is past the end of the export ({} bytes)",
                req.offset, req.length, ctx.size
            ),
        )),
    }
}

fn read(ctx: &Connection, req: &Request) -> Result<AlignedBuf, Failure> {
    if req.length == 0 {
        // A data chunk cannot carry 0 bytes (its length must be at least 9).
        return Err(Failure::new(proto::EINVAL, "READ of length 0"));
    }
    if req.length > MAX_PAYLOAD {
        return Err(Failure::new(
            proto::EINVAL,
            format!(
                "read of {} bytes exceeds the maximum of {MAX_PAYLOAD}",
                req.length
            ),
        ));
    }
    check_range(ctx, req, proto::EINVAL)?;
    let mut data = BufPool::global().take(req.length as usize);
    match (ctx.target.get(), &ctx.claim) {
        (None, Some(claim)) => claim.committed.read(&mut data, req.offset)?,
        _ => ctx.target()?.read(&mut data, req.offset)?,
    }
    Ok(data)
}

fn writable(ctx: &Connection) -> Result<&Vdi, Failure> {
    let read_only = || Failure::new(proto::EPERM, "the export is read-only");
    if ctx.read_only {
        return Err(read_only());
    }
    ctx.target()?.writable().ok_or_else(read_only)
}

/// A context id and its (length, flags) extents.
type StatusChunk = (u32, Vec<(u32, u32)>);

/// BLOCK_STATUS: one chunk per negotiated context.
fn block_status(ctx: &Connection, req: &Request) -> Result<Vec<StatusChunk>, Failure> {
    if ctx.base_allocation.is_none() && ctx.contexts.is_empty() {
        return Err(Failure::new(
            proto::EINVAL,
            "no metadata context was negotiated for BLOCK_STATUS",
        ));
    }
    if req.length == 0 {
        return Err(Failure::new(proto::EINVAL, "BLOCK_STATUS of length 0"));
    }
    check_range(ctx, req, proto::EINVAL)?;
    let len = u64::from(req.length).min(STATUS_WINDOW);
    let mut chunks = Vec::new();
    if let Some(id) = ctx.base_allocation {
        chunks.push((id, allocation(ctx, req, len)?));
    }
    for (id, context) in &ctx.contexts {
        let mut extents = extra_extents(ctx, context, req.offset, len)?;
        if req.flags & proto::CMD_FLAG_REQ_ONE != 0 {
            extents.truncate(1);
        }
        chunks.push((*id, extents));
    }
    Ok(chunks)
}

/// A metadata context besides `base:allocation`, as a connection serves
/// it.
enum ExtraContext {
    /// `qemu:allocation-depth`: 0 unmapped, 1 the disk's own block, 2 its
    /// clone origin's.
    Depth,
    /// `qemu:dirty-bitmap:SNAP`: bit 0 set where the export differs from
    /// snapshot SNAP of the same disk (a view of it, pinned while the
    /// connection lives), or why that snapshot could not be opened.
    Bitmap(Result<Box<SnapshotView>, String>),
}

/// The context `name` that the handshake selected for `export`.
fn open_context(service: &Service, export: &str, name: &str) -> ExtraContext {
    match name.strip_prefix(DIRTY_BITMAP) {
        Some(snap) => {
            let disk = DiskRef::split(export).disk;
            ExtraContext::Bitmap(
                off_runtime(|| service.store().open_snapshot(&disk, snap))
                    .map(Box::new)
                    .map_err(|e| format!("{name}: {e}")),
            )
        }
        None => ExtraContext::Depth,
    }
}

/// The contexts besides `base:allocation` that export `name` offers: the
/// allocation depth, and a dirty bitmap against each other snapshot of
/// its disk.
fn offered_contexts(service: &Service, name: &str) -> Vec<String> {
    let export = DiskRef::split(name);
    let store = service.store();
    let snapshots = match store.open_if_held(&export.disk) {
        Ok(Some(vdi)) => vdi.snapshots(),
        _ => store.committed_snapshots(&export.disk).unwrap_or_default(),
    };
    std::iter::once(ALLOCATION_DEPTH.to_string())
        .chain(
            snapshots
                .into_iter()
                .filter(|s| export.snapshot.as_deref() != Some(s.name.as_str()))
                .map(|s| format!("{DIRTY_BITMAP}{}", s.name)),
        )
        .collect()
}

const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
const DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// The extents of `context` over `[offset, offset + len)`.
fn extra_extents(
    ctx: &Connection,
    context: &ExtraContext,
    offset: u64,
    len: u64,
) -> Result<Vec<(u32, u32)>, Failure> {
    let target = ctx.held_here()?.ok_or_else(|| {
        Failure::new(
            proto::EINVAL,
            "qemu: contexts are served once this appliance holds the disk (write to it first)",
        )
    })?;
    let runs: Vec<(u64, u64, u32)> = match context {
        ExtraContext::Depth => allocation_depth(target.diff_target(), offset, len)?
            .into_iter()
            .map(|r| (r.offset, r.length, r.depth))
            .collect(),
        ExtraContext::Bitmap(Ok(base)) => diff_in(Some(base), target.diff_target(), offset, len)?
            .into_iter()
            .map(|c| (c.offset, c.length, 1))
            .collect(),
        ExtraContext::Bitmap(Err(why)) => return Err(Failure::new(proto::EIO, why)),
    };
    clip_runs(&runs, offset, len)
}

/// `runs` (offset, length, value; sorted, not overlapping, value 0 where
/// there is none) as (length, value) extents covering exactly `[offset,
/// offset + len)`, equal neighbours merged.
fn clip_runs(runs: &[(u64, u64, u32)], offset: u64, len: u64) -> Result<Vec<(u32, u32)>, Failure> {
    let end = offset + len;
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut push = |from: u64, to: u64, value: u32| {
        if to <= from {
            return;
        }
        // `len` fits in u32 (at most STATUS_WINDOW), so every piece does.
        let n = (to - from) as u32;
        match out.last_mut() {
            Some((l, v)) if *v == value => *l += n,
            _ => out.push((n, value)),
        }
    };
    let mut at = offset;
    for &(start, length, value) in runs {
        let (from, to) = (start.max(at), (start + length).min(end));
        if to <= from {
            continue;
        }
        push(at, from, 0);
        push(from, to, value);
        at = to;
    }
    push(at, end, 0);
    if out.is_empty() {
        return Err(Failure::new(proto::EIO, "no extent information"));
    }
    Ok(out)
}

/// `base:allocation` over `[req.offset, req.offset + len)`.
fn allocation(ctx: &Connection, req: &Request, len: u64) -> Result<Vec<(u32, u32)>, Failure> {
    let mut extents = Vec::new();
    let status = match (ctx.target.get(), &ctx.claim) {
        (None, Some(claim)) => claim.committed.block_status(req.offset, len)?,
        _ => ctx.target()?.block_status(req.offset, len)?,
    };
    for e in status {
        let flags = if e.allocated {
            0
        } else {
            proto::STATE_HOLE | proto::STATE_ZERO
        };
        // `len` fits in u32, so every extent does.
        let length = e.length as u32;
        match extents.last_mut() {
            Some((l, f)) if *f == flags => *l += length,
            _ => extents.push((length, flags)),
        }
    }
    if extents.is_empty() {
        return Err(Failure::new(proto::EIO, "no extent information"));
    }
    if req.flags & proto::CMD_FLAG_REQ_ONE != 0 {
        extents.truncate(1);
    }
    Ok(extents)
}

/// WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE and unknown commands.
fn other(ctx: &Connection, req: &Request, payload: &[u8]) -> Result<(), Failure> {
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    match req.command {
        Command::Write => {
            let vdi = writable(ctx)?;
            check_range(ctx, req, proto::ENOSPC)?;
            vdi.write(payload, req.offset)?;
            if fua {
                vdi.flush()?;
            }
        }
        Command::Flush => {
            // A connection that never wrote may find the disk held here
            // since another connection asked for it and wrote: a FLUSH
            // covers what every connection had acknowledged (the
            // multi-connection flag).
            if let Some(vdi) = ctx.held_here()?.and_then(|t| t.writable()) {
                vdi.flush()?;
            }
        }
        Command::Trim => {
            let vdi = writable(ctx)?;
            check_range(ctx, req, proto::EINVAL)?;
            vdi.discard(req.offset, u64::from(req.length))?;
            if fua {
                vdi.flush()?;
            }
        }
        Command::WriteZeroes => {
            let vdi = writable(ctx)?;
            check_range(ctx, req, proto::ENOSPC)?;
            let len = u64::from(req.length);
            if req.flags & proto::CMD_FLAG_NO_HOLE != 0 {
                if req.flags & proto::CMD_FLAG_FAST_ZERO != 0 {
                    return Err(Failure::new(
                        proto::ENOTSUP,
                        "allocated zeroes are written, which is not fast",
                    ));
                }
                let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(ZERO_CHUNK);
                    vdi.write(&zeros[..n as usize], req.offset + done)?;
                    done += n;
                }
            } else {
                vdi.write_zeroes(req.offset, len)?;
            }
            if fua {
                vdi.flush()?;
            }
        }
        Command::Cache => check_range(ctx, req, proto::EINVAL)?,
        Command::Unknown(n) => {
            return Err(Failure::new(proto::EINVAL, format!("unknown command {n}")));
        }
        Command::Read | Command::BlockStatus | Command::Disc => {
            return Err(Failure::new(proto::EINVAL, "unexpected command"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_pool_recycles_by_size_and_gives_exact_lengths() {
        let pool = BufPool {
            sizes: BufPool::global()
                .sizes
                .iter()
                .map(|_| Default::default())
                .collect(),
        };
        for len in [0, 1, 512, 4096, 4097, 65536, 1 << 20] {
            let mut b = pool.take(len);
            assert_eq!(b.len(), len);
            assert!(parallax_device::is_aligned(&b));
            b.fill(0x5a);
            let addr = b.as_ptr() as usize;
            pool.give(b);
            let again = pool.take(len);
            assert_eq!(again.len(), len);
            assert_eq!(again.as_ptr() as usize, addr, "{len}: not recycled");
            pool.give(again);
        }
        // A 4097-byte request gets the 8 KiB buffer; a 3000-byte one the 4 KiB one.
        let small = pool.take(3000);
        assert!(small.capacity() >= 4096 && small.capacity() < 8192 + parallax_device::ALIGN);
        // Larger than the largest class: allocated at its exact length.
        let big = pool.take((1 << 20) + 1);
        assert_eq!(big.len(), (1 << 20) + 1);
        pool.give(big);
        // At most POOL_BYTES_PER_SIZE idle per size.
        let many: Vec<_> = (0..20).map(|_| pool.take(1 << 20)).collect();
        for b in many {
            pool.give(b);
        }
        let idle = pool.sizes.last().unwrap().lock().unwrap().len();
        assert_eq!(idle, POOL_BYTES_PER_SIZE / (1 << 20));
    }
}
