//! Hooks through which the engine reports events to whoever counts them
//! (the daemon's metrics). Each is set at most once per process; unset,
//! reporting costs one atomic load.

use std::sync::OnceLock;
use std::time::Duration;

type DurationHook = Box<dyn Fn(Duration) + Send + Sync>;

static COMMIT: OnceLock<DurationHook> = OnceLock::new();
static HELD: OnceLock<DurationHook> = OnceLock::new();

/// Calls `hook` after every commit the engine writes, with the time its
/// I/O took (blocks, bitmaps, header, device flushes). Only the first
/// call sets a hook.
pub fn on_commit(hook: impl Fn(Duration) + Send + Sync + 'static) {
    let _ = COMMIT.set(Box::new(hook));
}

/// A commit was written in `took`.
pub(crate) fn commit_written(took: Duration) {
    if let Some(hook) = COMMIT.get() {
        hook(took);
    }
}

/// Calls `hook` each time a disk was held exclusively (by a commit, a
/// snapshot, a schedule tick, a deletion, a rollback: anything that stops
/// the disk's reads and writes), with how long it was held. Only the
/// first call sets a hook.
pub fn on_disk_held(hook: impl Fn(Duration) + Send + Sync + 'static) {
    let _ = HELD.set(Box::new(hook));
}

/// A disk was held exclusively for `took`.
pub(crate) fn disk_held(took: Duration) {
    if let Some(hook) = HELD.get() {
        hook(took);
    }
}
