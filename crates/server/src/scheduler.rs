//! Snapshot schedules: one thread per disk with a schedule, taking a
//! snapshot every interval and applying the disk's retention rules after
//! each one ([`parallax_engine::Vdi::schedule_tick`]).
//!
//! The schedule itself lives in the disk's header, so it survives restarts:
//! the daemon starts a thread for every scheduled disk when it starts, and
//! [`Scheduler::refresh`] (re)starts or stops one when a schedule changes.
//! A tick that falls behind (the snapshot took longer than the interval)
//! is skipped, not made up in a burst. A failed tick is logged and retried
//! at the next one; a deleted disk ends its thread.

use parallax_engine::{Error, Store, Vdi};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{info, warn};

struct Job {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// Counters of one disk's schedule since the daemon started.
#[derive(Debug, Default)]
pub struct ScheduleStats {
    pub taken: AtomicU64,
    pub deleted: AtomicU64,
    pub freed_blocks: AtomicU64,
    pub failed: AtomicU64,
    /// Ticks skipped because the previous one ran late.
    pub skipped: AtomicU64,
}

#[derive(Default)]
pub struct Scheduler {
    jobs: Mutex<HashMap<u64, Job>>,
    stats: Mutex<HashMap<u64, Arc<ScheduleStats>>>,
}

impl Scheduler {
    pub fn new() -> Scheduler {
        Scheduler::default()
    }

    /// Starts the schedules stored in the store. In cluster mode, only
    /// those of disks this host committed last (read from their headers,
    /// without opening them): opening every disk would take every idle
    /// disk's writer key from the other appliances.
    pub fn start_all(&self, store: &Store) {
        let names = store.try_list().unwrap_or_else(|e| {
            warn!("cannot list the disks to start their schedules: {e}");
            Vec::new()
        });
        for name in names {
            if let Some(host) = store.cluster_host_id() {
                match store.peek_info(&name) {
                    Ok(i) if i.schedule.every_ns != 0 && i.writer_host == host => {}
                    Ok(_) => continue,
                    Err(e) => {
                        warn!(disk = %name, "cannot read its schedule: {e}");
                        continue;
                    }
                }
            }
            match store.open_vdi(&name) {
                Ok(vdi) => self.refresh(&vdi),
                Err(e) => warn!(disk = %name, "cannot read its schedule: {e}"),
            }
        }
    }

    /// Makes the running thread match the disk's stored schedule.
    pub fn refresh(&self, vdi: &Vdi) {
        self.stop(vdi.id());
        let schedule = vdi.schedule();
        if schedule.every_ns == 0 {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stats = self.stats.lock().entry(vdi.id()).or_default().clone();
        let (vdi2, stop2) = (vdi.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("schedule-{}", vdi.id()))
            .spawn(move || run(vdi2, schedule.every_ns, stop2, stats));
        match spawned {
            Ok(thread) => {
                info!(disk = %vdi.name(), every_ns = schedule.every_ns, "snapshot schedule running");
                self.jobs.lock().insert(vdi.id(), Job { stop, thread });
            }
            Err(e) => warn!(disk = %vdi.name(), "cannot start its schedule: {e}"),
        }
    }

    /// Stops the schedule thread of disk `id`, if any, and waits for it.
    pub fn stop(&self, id: u64) {
        let job = self.jobs.lock().remove(&id);
        if let Some(job) = job {
            job.stop.store(true, Ordering::Relaxed);
            let _ = job.thread.join();
        }
    }

    pub fn stop_all(&self) {
        let ids: Vec<u64> = self.jobs.lock().keys().copied().collect();
        for id in ids {
            self.stop(id);
        }
    }

    pub fn stats(&self, id: u64) -> Option<Arc<ScheduleStats>> {
        self.stats.lock().get(&id).cloned()
    }
}

fn run(vdi: Vdi, every_ns: u64, stop: Arc<AtomicBool>, stats: Arc<ScheduleStats>) {
    let every = Duration::from_nanos(every_ns);
    let mut next = Instant::now() + every;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next {
            // Sleep in slices so that a stop is noticed within 50 ms.
            std::thread::sleep((next - now).min(Duration::from_millis(50)));
            continue;
        }
        match vdi.schedule_tick() {
            // Switched off meanwhile; `refresh` is stopping this thread.
            Ok(None) => return,
            Ok(Some((_, report))) => {
                stats.taken.fetch_add(1, Ordering::Relaxed);
                stats.deleted.fetch_add(report.deleted, Ordering::Relaxed);
                crate::metrics::global().scheduled(report.deleted);
                stats
                    .freed_blocks
                    .fetch_add(report.freed_blocks, Ordering::Relaxed);
            }
            // The disk was deleted: its schedule ends with it.
            Err(Error::Deleted(_)) => return,
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                warn!(disk = %vdi.name(), "scheduled snapshot failed: {e}");
            }
        }
        next += every;
        let now = Instant::now();
        if next < now {
            let behind = (now - next).as_nanos() / every.as_nanos().max(1);
            stats
                .skipped
                .fetch_add(behind as u64 + 1, Ordering::Relaxed);
            next = now + every;
        }
    }
}
