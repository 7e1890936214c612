//! Hooks through which the engine reports events to whoever counts them
//! (the daemon's metrics). Each is set at most once per process; unset,
//! reporting costs one atomic load.

use std::sync::OnceLock;
use std::time::Duration;

type CommitHook = Box<dyn Fn(Duration) + Send + Sync>;

static COMMIT: OnceLock<CommitHook> = OnceLock::new();

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
