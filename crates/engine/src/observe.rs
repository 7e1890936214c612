//! Hooks through which the engine reports events to whoever counts them
//! (the daemon's metrics). Each is set at most once per process; unset,
//! reporting costs one atomic load.

use std::sync::OnceLock;
use std::time::Duration;

/// A hook taking a duration, set at most once.
struct Hook(OnceLock<Box<dyn Fn(Duration) + Send + Sync>>);

impl Hook {
    const fn new() -> Self {
        Hook(OnceLock::new())
    }

    fn set(&self, hook: impl Fn(Duration) + Send + Sync + 'static) {
        let _ = self.0.set(Box::new(hook));
    }

    fn call(&self, took: Duration) {
        if let Some(hook) = self.0.get() {
            hook(took);
        }
    }
}

static COMMIT: Hook = Hook::new();
static HELD: Hook = Hook::new();

/// Calls `hook` after every commit the engine writes, with the time its
/// I/O took (blocks, bitmaps, header, device flushes). Only the first
/// call sets a hook.
pub fn on_commit(hook: impl Fn(Duration) + Send + Sync + 'static) {
    COMMIT.set(hook);
}

/// A commit was written in `took`.
pub(crate) fn commit_written(took: Duration) {
    COMMIT.call(took);
}

/// Calls `hook` each time a disk was held exclusively (by a commit, a
/// snapshot, a schedule tick, a deletion, a rollback, or the data path's
/// own short exclusive sections: anything that stops the disk's reads and
/// writes), with how long it was held. Only the first call sets a hook.
pub fn on_disk_held(hook: impl Fn(Duration) + Send + Sync + 'static) {
    HELD.set(hook);
}

/// A disk was held exclusively for `took`.
pub(crate) fn disk_held(took: Duration) {
    HELD.call(took);
}
