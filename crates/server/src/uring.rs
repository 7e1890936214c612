//! Asynchronous reads and writes of the store file through io_uring.
//!
//! The NBD data path plans a request with the engine ([`IoPlan`]: which
//! byte ranges of the store file, or of the read cache's file for copies
//! it holds, to move, with the disk pinned) and hands
//! the transfers here instead of blocking a thread on `pread`/`pwrite`.
//! One ring serves the whole daemon:
//!
//! - Any task submits, under `sq_lock`: it moves its buffer and its plan
//!   into the operation table, pushes one entry per transfer and enters
//!   the kernel once. The buffer's heap memory never moves while the
//!   kernel may use it, because only the operation table owns it then.
//! - One reaper task waits on an eventfd the ring signals, drains the
//!   completion queue, completes each finished operation's plan (which
//!   releases the disk) and hands the buffer and the result back through a
//!   oneshot. It runs on the runtime's own threads, so a completion costs
//!   no extra thread hop. Therefore no runtime thread may block on a disk
//!   lock: the NBD code plans with `try_read` only and runs the handshake's
//!   export lookups under `block_in_place`.
//! - A transfer that comes back short or failed makes the whole operation
//!   fail; the caller then repeats the request on the blocking path, which
//!   reports the error properly. If the submitting task is cancelled, the
//!   operation still completes and its buffer is dropped then.
//! - The ring lives as long as the runtime (the reaper holds it); should
//!   it ever be dropped with operations in flight, their buffers are leaked
//!   rather than freed under the kernel's feet.
//!
//! io_uring is often disabled (containers, seccomp, `kernel.io_uring_disabled`):
//! [`Uring::new`] fails then, and the daemon serves every request on the
//! blocking thread pool instead.

use parallax_device::AlignedBuf;
use parallax_engine::{FdTransfer, IoPlan};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::oneshot;

/// Submission queue entries; the completion queue gets twice as many.
const RING_ENTRIES: u32 = 1024;

/// Work a completion could not do without waiting on a disk lock; it runs
/// on the blocking pool, and the operation's result is handed back after.
pub type Deferred = Box<dyn FnOnce() + Send>;

/// What an operation holds until its transfers are over, told how they
/// went and given the operation's buffer. The reaper calls it as soon as
/// the last transfer completes, even if the submitting task is gone. It
/// must not block: what would wait comes back as [`Deferred`].
pub trait Completion: Send {
    fn complete(self: Box<Self>, ok: bool, buf: &[u8]) -> Option<Deferred>;
}

/// An engine plan: a write's new blocks join the disk on success and go
/// back to the pool on failure; the disk is unpinned either way. A write
/// carried as write-back log records counts them written first; after a
/// failure they are written again from a copy of the buffer, on the
/// blocking pool (a rare path: the request is then retried anyway).
impl Completion for IoPlan {
    fn complete(self: Box<Self>, ok: bool, buf: &[u8]) -> Option<Deferred> {
        match self.try_finish_written(ok, buf) {
            Ok(()) => None,
            Err(plan) => {
                let copy = if plan.writes_log_records() {
                    buf.to_vec()
                } else {
                    Vec::new()
                };
                Some(Box::new(move || plan.finish_written(ok, &copy)))
            }
        }
    }
}

/// Completes `keep` of an operation that never reached the ring, on the
/// blocking pool if that has to wait.
async fn complete_unsubmitted(keep: Box<dyn Completion>, ok: bool, buf: &[u8]) {
    if let Some(work) = keep.complete(ok, buf) {
        let _ = tokio::task::spawn_blocking(work).await;
    }
}

/// Which way an operation moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Device to buffer.
    Read,
    /// Buffer to device.
    Write,
}

struct Op {
    /// Expected byte count of each transfer, by index.
    lens: Vec<u32>,
    remaining: usize,
    failure: Option<io::Error>,
    buf: Option<AlignedBuf>,
    /// The engine plan: keeps the blocks from being freed until the end.
    keep: Option<Box<dyn Completion>>,
    done: Option<oneshot::Sender<(AlignedBuf, io::Result<()>)>>,
}

#[derive(Default)]
struct OpTable {
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
}

impl OpTable {
    fn insert(&mut self, op: Op) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(op);
                i
            }
            None => {
                self.slots.push(Some(op));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) -> Option<Op> {
        let op = self.slots.get_mut(i)?.take();
        if op.is_some() {
            self.free.push(i);
        }
        op
    }
}

impl Drop for OpTable {
    fn drop(&mut self) {
        // Only reachable if the ring goes away with operations in flight:
        // the kernel may still write into these buffers.
        for op in self.slots.iter_mut().filter_map(Option::take) {
            if let Some(buf) = op.buf {
                std::mem::forget(buf);
            }
        }
    }
}

/// See the module documentation.
pub struct Uring {
    ring: io_uring::IoUring,
    sq_lock: Mutex<()>,
    /// Completion-queue access (only the reaper drains it).
    cq_lock: Mutex<()>,
    ops: Mutex<OpTable>,
    event: OwnedFd,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Uring {
    /// Sets up the ring and spawns its reaper task on the current tokio
    /// runtime (fails outside one).
    pub fn new() -> io::Result<Arc<Uring>> {
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let ring = io_uring::IoUring::new(RING_ENTRIES)?;
        let event = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        let waker = {
            let _entered = runtime.enter();
            let watched = event.try_clone()?;
            // SAFETY: `watched` is an `OwnedFd` moved into the `AsyncFd`: it
            // is open, stays open and keeps its number until the `AsyncFd`
            // is dropped, which closes it.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    watched,
                    tokio::io::Interest::READABLE,
                )
            }?
        };
        let uring = Arc::new(Uring {
            ring,
            sq_lock: Mutex::new(()),
            cq_lock: Mutex::new(()),
            ops: Mutex::new(OpTable::default()),
            event,
        });
        runtime.spawn(uring.clone().reap(waker));
        Ok(uring)
    }

    /// Performs `transfers` between `buf` and file `fd`, all at once, and
    /// returns the buffer with the outcome. `keep` is completed as soon as
    /// the last transfer has (even if this future is dropped); if nothing
    /// could be submitted, it is completed as failed before this returns.
    pub async fn run(
        &self,
        direction: Direction,
        buf: AlignedBuf,
        transfers: &[FdTransfer],
        keep: Box<dyn Completion>,
    ) -> (AlignedBuf, io::Result<()>) {
        if transfers.is_empty() {
            complete_unsubmitted(keep, true, &buf).await;
            return (buf, Ok(()));
        }
        if transfers.len() > RING_ENTRIES as usize
            || transfers.iter().any(|t| t.buf.end > buf.len())
        {
            complete_unsubmitted(keep, false, &buf).await;
            let e = io::Error::other("transfer list does not fit the ring or the buffer");
            return (buf, Err(e));
        }
        let finished = match self.start(direction, buf, transfers, keep) {
            Ok(finished) => finished,
            Err((buf, keep, e)) => {
                if let Some(keep) = keep {
                    complete_unsubmitted(keep, false, &buf).await;
                }
                return (buf, Err(e));
            }
        };
        match finished.await {
            Ok(outcome) => outcome,
            Err(_) => (
                AlignedBuf::zeroed(0),
                Err(io::Error::other("the io_uring reaper is gone")),
            ),
        }
    }

    /// Records the operation and submits it; on failure nothing is in
    /// flight and the buffer and `keep` (not completed) come back.
    #[allow(clippy::type_complexity)]
    fn start(
        &self,
        direction: Direction,
        mut buf: AlignedBuf,
        transfers: &[FdTransfer],
        keep: Box<dyn Completion>,
    ) -> Result<
        oneshot::Receiver<(AlignedBuf, io::Result<()>)>,
        (AlignedBuf, Option<Box<dyn Completion>>, io::Error),
    > {
        let base = buf.as_mut_ptr();
        let (done, finished) = oneshot::channel();
        let slot = lock(&self.ops).insert(Op {
            lens: transfers.iter().map(|t| t.buf.len() as u32).collect(),
            remaining: transfers.len(),
            failure: None,
            buf: Some(buf),
            keep: Some(keep),
            done: Some(done),
        });
        if let Err(e) = self.submit(direction, base, transfers, slot) {
            let op = lock(&self.ops).remove(slot);
            let (buf, keep) = match op {
                Some(o) => (o.buf, o.keep),
                None => (None, None),
            };
            return Err((buf.unwrap_or_else(|| AlignedBuf::zeroed(0)), keep, e));
        }
        Ok(finished)
    }

    /// Pushes one entry per transfer and enters the kernel. Fails only
    /// without having pushed anything (no room for all of them); once an
    /// entry is pushed, the operation is left to complete through the
    /// reaper, failed if not every entry could go.
    fn submit(
        &self,
        direction: Direction,
        base: *mut u8,
        transfers: &[FdTransfer],
        slot: usize,
    ) -> io::Result<()> {
        let _sq = lock(&self.sq_lock);
        // SAFETY: submission-queue access is serialised by `sq_lock`; no
        // other code touches the submission queue.
        let mut sq = unsafe { self.ring.submission_shared() };
        if sq.capacity() - sq.len() < transfers.len() {
            drop(sq);
            self.ring.submit()?;
            // SAFETY: as above.
            sq = unsafe { self.ring.submission_shared() };
            if sq.capacity() - sq.len() < transfers.len() {
                return Err(io::Error::other("the io_uring submission queue is full"));
            }
        }
        for (i, t) in transfers.iter().enumerate() {
            // SAFETY: `t.buf` lies inside the buffer (checked by `run`),
            // whose heap memory the operation table owns until the
            // operation completes.
            let ptr = unsafe { base.add(t.buf.start) };
            let len = t.buf.len() as u32;
            let target = io_uring::types::Fd(t.fd);
            let entry = match direction {
                Direction::Read => io_uring::opcode::Read::new(target, ptr, len)
                    .offset(t.offset)
                    .build(),
                Direction::Write => io_uring::opcode::Write::new(target, ptr, len)
                    .offset(t.offset)
                    .build(),
            }
            .user_data(((slot as u64) << 32) | i as u64);
            // SAFETY: the entry's buffer stays valid and unaliased until
            // its completion is reaped (see above); the file descriptor
            // stays open because `keep` (the plan, holding the store and
            // the read cache whose files the transfers name) lives until
            // then too. Room was checked above.
            if unsafe { sq.push(&entry) }.is_err() {
                // Unreachable (room was checked under the lock). Entries
                // already pushed will complete: the operation waits for
                // exactly those and fails, so its buffer outlives them.
                if i == 0 {
                    return Err(io::Error::other("the io_uring submission queue is full"));
                }
                if let Some(Some(op)) = lock(&self.ops).slots.get_mut(slot) {
                    op.remaining = i;
                    op.failure = Some(io::Error::other("the io_uring submission queue filled up"));
                }
                break;
            }
        }
        sq.sync();
        drop(sq);
        let mut tries = 0;
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                // Pushed entries go with the next enter whatever happens:
                // only retry transient refusals a few times.
                Err(e) if tries < 100 && is_transient(&e) => {
                    tries += 1;
                    std::thread::yield_now();
                }
                Err(e) => {
                    tracing::warn!("io_uring submit failed, entries left for the next one: {e}");
                    return Ok(());
                }
            }
        }
    }

    /// The reaper task: completes operations whenever the ring signals.
    async fn reap(self: Arc<Self>, waker: tokio::io::unix::AsyncFd<OwnedFd>) {
        let mut counter = [0u8; 8];
        loop {
            match waker.readable().await {
                // Readiness is cleared before the eventfd is read and the
                // queue drained: a completion after this point signals anew.
                Ok(mut ready) => ready.clear_ready(),
                Err(e) => {
                    tracing::error!("io_uring reaper cannot wait on its eventfd: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            let _ = rustix::io::read(&self.event, &mut counter);
            self.complete_ready();
        }
    }

    /// Drains the completion queue and completes finished operations.
    fn complete_ready(&self) {
        let mut finished = Vec::new();
        {
            let _cq = lock(&self.cq_lock);
            let mut ops = lock(&self.ops);
            // SAFETY: completion-queue access is serialised by `cq_lock`;
            // no other code touches the completion queue.
            let cq = unsafe { self.ring.completion_shared() };
            for cqe in cq {
                let slot = (cqe.user_data() >> 32) as usize;
                let index = (cqe.user_data() & 0xffff_ffff) as usize;
                let Some(Some(op)) = ops.slots.get_mut(slot) else {
                    continue;
                };
                let expected = op.lens.get(index).copied().unwrap_or(0);
                let result = cqe.result();
                if result < 0 {
                    op.failure
                        .get_or_insert(io::Error::from_raw_os_error(-result));
                } else if result as u32 != expected {
                    op.failure.get_or_insert(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("short transfer: {result} of {expected} bytes"),
                    ));
                }
                op.remaining -= 1;
                if op.remaining == 0 {
                    finished.extend(ops.remove(slot));
                }
            }
        }
        for mut op in finished {
            let outcome = op.failure.take().map_or(Ok(()), Err);
            let written = op.buf.as_deref().unwrap_or(&[]);
            let deferred = op
                .keep
                .take()
                .and_then(|k| k.complete(outcome.is_ok(), written));
            let reply = move || {
                if let (Some(done), Some(buf)) = (op.done.take(), op.buf.take()) {
                    let _ = done.send((buf, outcome));
                }
            };
            match deferred {
                None => reply(),
                // The result goes back only once the plan is finished, so
                // that a write's reply never precedes its blocks joining
                // the disk.
                Some(work) => {
                    tokio::task::spawn_blocking(move || {
                        work();
                        reply();
                    });
                }
            }
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::AGAIN.raw_os_error()
            || code == rustix::io::Errno::BUSY.raw_os_error()
            || code == rustix::io::Errno::INTR.raw_os_error()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Records how the operation ended.
    struct Keep(Arc<Mutex<Option<bool>>>);

    impl Completion for Keep {
        fn complete(self: Box<Self>, ok: bool, _buf: &[u8]) -> Option<Deferred> {
            *lock(&self.0) = Some(ok);
            None
        }
    }

    fn keep() -> (Box<Keep>, Arc<Mutex<Option<bool>>>) {
        let seen = Arc::new(Mutex::new(None));
        (Box::new(Keep(seen.clone())), seen)
    }

    #[test]
    fn reads_and_writes_round_trip_and_failures_come_back() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let uring = match rt.block_on(async { Uring::new() }) {
            Ok(u) => u,
            // Kernels or sandboxes without io_uring: the daemon falls back,
            // and so does this test.
            Err(e) => return eprintln!("io_uring unavailable here: {e}"),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let fd = file.as_raw_fd();
        rt.block_on(async {
            // Two transfers from one buffer, to places out of order.
            let mut buf = AlignedBuf::zeroed(8192);
            buf[..4096].fill(0xaa);
            buf[4096..].fill(0xbb);
            let at = |offset: u64, buf: std::ops::Range<usize>| FdTransfer { fd, offset, buf };
            let transfers = [at(65536, 0..4096), at(4096, 4096..8192)];
            let (k, seen) = keep();
            let (_, outcome) = uring.run(Direction::Write, buf, &transfers, k).await;
            outcome.unwrap();
            assert_eq!(*lock(&seen), Some(true), "keep not completed as ok");
            let mut back = vec![0u8; 4096];
            file.read_exact_at(&mut back, 65536).unwrap();
            assert!(back.iter().all(|&b| b == 0xaa));
            file.read_exact_at(&mut back, 4096).unwrap();
            assert!(back.iter().all(|&b| b == 0xbb));

            let (buf, outcome) = uring
                .run(
                    Direction::Read,
                    AlignedBuf::zeroed(8192),
                    &transfers,
                    keep().0,
                )
                .await;
            outcome.unwrap();
            assert!(buf[..4096].iter().all(|&b| b == 0xaa));
            assert!(buf[4096..].iter().all(|&b| b == 0xbb));

            // Past the end of the file: a short read is an error.
            let (k_past, seen_past) = keep();
            let past = [at((1 << 20) - 4096, 0..8192)];
            let (buf, outcome) = uring
                .run(Direction::Read, AlignedBuf::zeroed(8192), &past, k_past)
                .await;
            assert!(outcome.is_err());
            assert_eq!(
                *lock(&seen_past),
                Some(false),
                "keep not completed as failed"
            );
            assert_eq!(buf.len(), 8192, "the buffer comes back on failure");
            // A bad descriptor fails cleanly too.
            let (_, outcome) = uring
                .run(
                    Direction::Read,
                    AlignedBuf::zeroed(4096),
                    &past[..0],
                    keep().0,
                )
                .await;
            assert!(outcome.is_ok(), "no transfers, nothing to fail");
            let bad = [FdTransfer {
                fd: 987_654,
                offset: 0,
                buf: 0..4096,
            }];
            let (_, outcome) = uring
                .run(Direction::Read, AlignedBuf::zeroed(4096), &bad, keep().0)
                .await;
            assert!(outcome.is_err());
            // A transfer outside the buffer is refused before submission.
            let (_, outcome) = uring
                .run(
                    Direction::Read,
                    AlignedBuf::zeroed(100),
                    &[at(0, 0..4096)],
                    keep().0,
                )
                .await;
            assert!(outcome.is_err());
        });
    }
}
