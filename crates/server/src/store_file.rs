//! Finding, locking, creating and opening the store.
//!
//! The default store is `/var/lib/parallax/store.px` for root and
//! `$XDG_DATA_HOME/parallax/store.px` (or `~/.local/share/parallax/store.px`)
//! for everyone else.
//!
//! The engine assumes that one process owns a store. Every command
//! therefore takes an advisory `flock` on the store file for as long as it
//! runs: shared for commands that only read, exclusive for the others. A
//! second command that would conflict fails at once instead of waiting.
//! The daemon holds the exclusive lock for as long as it runs; commands
//! reach the store through its control socket meanwhile.
//!
//! A store may also be an export of an NBD server (`nbd://HOST:PORT/EXPORT`,
//! `nbd+unix:///EXPORT?socket=PATH`: a pool reached over the network, see
//! `parallax_device::NbdDevice`). No lock can be taken there: until cluster
//! mode coordinates several appliances, one appliance (or one command) at a
//! time must use such a pool, and nothing but the operator enforces it.

use anyhow::{anyhow, bail, Context, Result};
use parallax_device::{BlockDevice, FileDevice, NbdDevice, NbdTarget, OpenMode, Slice};
use parallax_engine::{
    Coordinator, CreateOptions, Error, Found, OpenOptions, ReadCache, Store, WriteLog,
    MIN_LOG_BYTES,
};
use parallax_format::{BLOCK_SIZE, BLOCK_SIZE_U64, MAGIC, SUPERBLOCK_ADDRS};
use std::fs::{self, File};
use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `serve --cache PATH --cache-size SIZE`: the local cache. Its last
/// quarter (at least 8 MiB, at most 16 GiB; see [`log_bytes`]) is the
/// write-back log, the rest the read cache.
#[derive(Debug, Clone)]
pub struct CacheFile {
    /// A regular file (created if missing) or a block device.
    pub path: PathBuf,
    /// A file's size: needed to create it, and resizes one of another size
    /// (which empties it). A block device is used whole.
    pub size: Option<u64>,
}

/// Whether a command changes the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// An open store and the lock that keeps other commands off it (none for
/// a pool reached over NBD).
pub struct OpenStore {
    pub store: Store,
    _lock: Option<File>,
    /// Keeps other daemons off the read cache's file.
    _cache_lock: Option<File>,
}

/// Whether `store` names an NBD export rather than a file or device.
pub fn is_nbd_store(store: &Path) -> bool {
    store.to_str().is_some_and(NbdTarget::is_uri)
}

/// Connects to the NBD export `store` names.
fn open_nbd(store: &Path) -> Result<NbdDevice> {
    let uri = store.to_str().unwrap_or_default();
    NbdDevice::open(uri).with_context(|| format!("cannot open the pool {uri}"))
}

/// A mistake on the command line found after parsing (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The store used when neither `--store` nor `PARALLAX_STORE` is given.
pub fn default_store_path() -> Result<PathBuf> {
    let is_root = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    default_store_path_for(
        is_root,
        std::env::var_os("XDG_DATA_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

fn default_store_path_for(
    is_root: bool,
    xdg_data_home: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Result<PathBuf> {
    if is_root {
        return Ok(PathBuf::from("/var/lib/parallax/store.px"));
    }
    // The XDG spec says to ignore relative paths.
    let data_home = xdg_data_home
        .filter(|p| p.is_absolute())
        .or_else(|| {
            home.filter(|p| p.is_absolute())
                .map(|home| home.join(".local/share"))
        })
        .ok_or_else(|| {
            anyhow!("cannot find a default store path (HOME is not set); pass --store PATH")
        })?;
    Ok(data_home.join("parallax").join("store.px"))
}

/// The control socket of the daemon serving the store at `store`, unless
/// `--control` says otherwise: the store's path with `.control` appended.
pub fn default_control_socket(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(".control");
    PathBuf::from(name)
}

/// Takes the advisory lock of the store at `path`.
fn lock(path: &Path, access: Access) -> Result<File> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let op = match access {
        Access::Read => rustix::fs::FlockOperation::NonBlockingLockShared,
        Access::Write => rustix::fs::FlockOperation::NonBlockingLockExclusive,
    };
    match rustix::fs::flock(&file, op) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => bail!(
            "store {} is in use by another parallax command; try again when it has finished",
            path.display()
        ),
        Err(e) => {
            Err(io::Error::from(e)).with_context(|| format!("cannot lock store {}", path.display()))
        }
    }
}

/// The bytes of a cache of `total` bytes that hold the write-back log.
pub fn log_bytes(total: u64) -> u64 {
    (total / 4).clamp(MIN_LOG_BYTES, 16 << 30) & !(BLOCK_SIZE_U64 - 1)
}

/// The local cache, opened: the read cache, the write-back log, and the
/// lock that keeps other daemons off the file.
pub struct OpenCache {
    pub read_cache: Arc<ReadCache>,
    pub write_log: Option<Arc<WriteLog>>,
    /// What the write-back log found when it opened.
    pub found: Option<Found>,
    lock: File,
}

/// Opens (creating or resizing a file if need be) the cache `cache` for the
/// store on `pool` (id `store_id`), and locks it for this process.
/// `direct`: with `O_DIRECT`, as the store. `write_log`: with the
/// write-back log in front of `pool` (replayed if it is `named`: the log
/// the store depends on, as (id, the cache's size), from the superblock or,
/// in cluster mode, the coordination service).
pub fn open_cache(
    cache: &CacheFile,
    pool: &Arc<dyn BlockDevice>,
    store_id: u64,
    direct: bool,
    write_log: bool,
    named: Option<(u64, u64)>,
) -> Result<OpenCache> {
    let shown = cache.path.display();
    if let Some((id, bytes)) = named {
        if !write_log {
            bail!(
                "the store's newest writes may be in the write-back log {id:016x} of a cache of {bytes} bytes: serve it alone (not in cluster mode) with that cache first"
            );
        }
        // Before anything resizes the file (that would move the log).
        if cache.size.is_some_and(|s| s != bytes) {
            bail!(
                "the store's newest writes may be in the write-back log of a cache of {bytes} bytes, and {shown} is given another size: give --cache-size {bytes}"
            );
        }
    }
    match (fs::metadata(&cache.path), cache.size) {
        (Err(e), Some(size)) if e.kind() == ErrorKind::NotFound => {
            drop(
                FileDevice::create(&cache.path, size, OpenMode::default())
                    .with_context(|| format!("cannot create the cache {shown}"))?,
            );
        }
        (Err(e), None) if e.kind() == ErrorKind::NotFound => {
            bail!("the cache {shown} does not exist: give --cache-size to create it")
        }
        (Err(e), _) => return Err(e).with_context(|| format!("cannot open the cache {shown}")),
        (Ok(m), _) if m.is_dir() => bail!("the cache {shown} is a directory"),
        (Ok(m), Some(size)) if m.file_type().is_file() && m.len() != size => {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&cache.path)
                .with_context(|| format!("cannot open the cache {shown}"))?;
            f.set_len(size)
                .with_context(|| format!("cannot resize the cache {shown}"))?;
        }
        (Ok(m), Some(_)) if m.file_type().is_block_device() => {
            bail!("the cache {shown} is a block device: it is used whole, leave out --cache-size")
        }
        (Ok(_), _) => {}
    }
    let lock = File::open(&cache.path).with_context(|| format!("cannot open the cache {shown}"))?;
    match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            bail!("the cache {shown} is in use by another parallax daemon")
        }
        Err(e) => {
            return Err(io::Error::from(e))
                .with_context(|| format!("cannot lock the cache {shown}"))
        }
    }
    let mode = OpenMode {
        direct,
        read_only: false,
    };
    let dev: Arc<dyn BlockDevice> = Arc::new(
        FileDevice::open(&cache.path, mode)
            .with_context(|| format!("cannot open the cache {shown}"))?,
    );
    let total = dev.len() & !(BLOCK_SIZE_U64 - 1);
    if let Some((_, bytes)) = named.filter(|&(_, bytes)| bytes != total) {
        bail!(
            "the store's newest writes may be in the write-back log of a cache of {bytes} bytes, and {shown} has {total}"
        );
    }
    let log_len = log_bytes(total);
    if total < 2 * log_len {
        bail!(
            "the cache {shown} is too small ({total} bytes): give it at least {} MiB",
            (2 * MIN_LOG_BYTES) >> 20
        );
    }
    let slice = |start, len| -> Result<Arc<dyn BlockDevice>> {
        Ok(Arc::new(Slice::new(dev.clone(), start, len)?))
    };
    // The log first: if the store names it, it must be found before the
    // read cache (which formats what it does not recognise) is opened.
    let (write_log, found) = if write_log {
        let (log, found) = WriteLog::open(
            slice(total - log_len, log_len)?,
            pool.clone(),
            store_id,
            named.map_or(0, |(id, _)| id),
            total,
        )
        .with_context(|| format!("cannot open the write-back log in the cache {shown}"))?;
        (Some(Arc::new(log)), Some(found))
    } else {
        (None, None)
    };
    let read_cache = ReadCache::open(slice(0, total - log_len)?, store_id)
        .with_context(|| format!("cannot open the cache {shown}"))?;
    Ok(OpenCache {
        read_cache: Arc::new(read_cache),
        write_log,
        found,
        lock,
    })
}

/// Opens the existing store at `path` through the page cache.
pub fn open_store(path: &Path, access: Access, host_id: u64) -> Result<OpenStore> {
    open_store_with(path, access, host_id, false, None)
}

/// Opens the existing store at `path`; with `direct`, with `O_DIRECT`,
/// bypassing the page cache; with `cache`, with that read cache in front.
pub fn open_store_with(
    path: &Path,
    access: Access,
    host_id: u64,
    direct: bool,
    cache: Option<&CacheFile>,
) -> Result<OpenStore> {
    let shown = path.display();
    let mut cache_lock = None;
    let open = |mut dev: Arc<dyn BlockDevice>, cache_lock: &mut Option<File>| {
        let mut options = OpenOptions {
            host_id,
            ..OpenOptions::default()
        };
        if let Some(c) = cache {
            let id = Store::peek_id(&*dev).map_err(|e| anyhow!("{shown}: {e}"))?;
            let named = Store::peek_write_log(&*dev).map_err(|e| anyhow!("{e}"))?;
            let opened = open_cache(c, &dev, id, direct, access == Access::Write, named)?;
            warn_if_dropped(&opened, c);
            if let Some(log) = &opened.write_log {
                dev = log.clone();
            }
            options.read_cache = Some(opened.read_cache);
            options.write_log = opened.write_log;
            *cache_lock = Some(opened.lock);
        }
        Store::open(dev, &options).map_err(|e| match e {
            Error::NotAStore(detail) => anyhow!("{shown} is not a Parallax store: {detail}"),
            Error::NewerVersion { .. } => anyhow!(e),
            e => anyhow!("cannot open store {shown}: {e}"),
        })
    };
    if is_nbd_store(path) {
        let store = open(Arc::new(open_nbd(path)?), &mut cache_lock)?;
        return Ok(OpenStore {
            store,
            _lock: None,
            _cache_lock: cache_lock,
        });
    }
    match fs::metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!("store {shown} does not exist; create it with `parallax init --size SIZE`")
        }
        Err(e) => return Err(e).with_context(|| format!("cannot open store {shown}")),
        Ok(m) if m.is_dir() => bail!("{shown} is a directory, not a Parallax store"),
        Ok(_) => {}
    }
    let lock = lock(path, access)?;
    let mode = OpenMode {
        direct,
        read_only: access == Access::Read,
    };
    let dev = FileDevice::open(path, mode).with_context(|| format!("cannot open store {shown}"))?;
    let store = open(Arc::new(dev), &mut cache_lock)?;
    Ok(OpenStore {
        store,
        _lock: Some(lock),
        _cache_lock: cache_lock,
    })
}

/// `parallax forget-write-log`: makes the store at `path` name no
/// write-back log (see `Store::forget_write_log`). Returns the log it
/// named, as (id, cache size).
pub fn forget_write_log(path: &Path) -> Result<Option<(u64, u64)>> {
    let shown = path.display();
    let forget = |dev: &dyn BlockDevice| {
        Store::forget_write_log(dev).map_err(|e| anyhow!("cannot change store {shown}: {e}"))
    };
    if is_nbd_store(path) {
        return forget(&open_nbd(path)?);
    }
    let _lock = lock(path, Access::Write)?;
    let dev = FileDevice::open(path, OpenMode::default())
        .with_context(|| format!("cannot open store {shown}"))?;
    forget(&dev)
}

/// The NBD pool's write guard in cluster mode: no write of this appliance
/// reaches the pool once it is fenced, not even the replay of acknowledged
/// writes after a reconnection; and never again (the device's replay log
/// cannot tell which of its writes a new lease may still make): an
/// appliance on an NBD pool that lost its lease must be restarted. A lease
/// lost and renewed while the device was not asked (its requests stuck on
/// a dead connection) shows in the incarnation.
fn fencing_guard(c: Arc<dyn Coordinator>) -> parallax_device::WriteGuard {
    let first = c.incarnation();
    let fenced = std::sync::atomic::AtomicBool::new(false);
    Box::new(move || {
        if !c.may_write() || c.incarnation() != first {
            fenced.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        !fenced.load(std::sync::atomic::Ordering::SeqCst)
    })
}

/// Opens the existing store at `path` in cluster mode: no lock (several
/// appliances open it), `O_DIRECT` for a file or device (other hosts
/// change blocks this host's page cache would keep), and the coordinator
/// made from `connect` once the store's id is known. On an NBD pool, no
/// request stays in flight longer than `in_flight` (see
/// `NbdDevice::set_request_timeout`).
pub fn open_shared_store(
    path: &Path,
    host_id: u64,
    in_flight: std::time::Duration,
    cache: Option<&CacheFile>,
    connect: impl FnOnce(u64) -> Result<Arc<dyn Coordinator>>,
) -> Result<OpenStore> {
    let shown = path.display();
    let nbd = if is_nbd_store(path) {
        Some(Arc::new(open_nbd(path)?))
    } else {
        None
    };
    let dev: Arc<dyn BlockDevice> = if let Some(nbd) = &nbd {
        nbd.clone()
    } else {
        let mode = OpenMode {
            direct: true,
            read_only: false,
        };
        Arc::new(FileDevice::open(path, mode).with_context(|| {
            format!("cannot open store {shown} with O_DIRECT (cluster mode needs it)")
        })?)
    };
    let store_id = Store::peek_id(&*dev).map_err(|e| anyhow!("{shown}: {e}"))?;
    let coordinator = connect(store_id)?;
    if let Some(nbd) = &nbd {
        nbd.set_write_guard(fencing_guard(coordinator.clone()));
        nbd.set_request_timeout(in_flight);
    }
    if let Some((id, bytes)) = Store::peek_write_log(&*dev).map_err(|e| anyhow!("{e}"))? {
        bail!(
            "the store's newest writes may be in the write-back log {id:016x} of a cache of {bytes} bytes, written by an appliance alone on the pool: serve it alone (not in cluster mode) with that cache first"
        );
    }
    // In cluster mode each host's log is named in etcd.
    let named = coordinator
        .write_log_of(host_id)
        .map_err(|e| anyhow!("{e}"))?;
    let mut options = OpenOptions {
        host_id,
        coordinator: Some(coordinator),
        ..OpenOptions::default()
    };
    let mut cache_lock = None;
    let mut dev = dev;
    if let Some(c) = cache {
        let opened = open_cache(c, &dev, store_id, true, true, named)?;
        warn_if_dropped(&opened, c);
        if let Some(log) = &opened.write_log {
            dev = log.clone();
        }
        options.read_cache = Some(opened.read_cache);
        options.write_log = opened.write_log;
        cache_lock = Some(opened.lock);
    }
    let store =
        Store::open(dev, &options).map_err(|e| anyhow!("cannot open store {shown}: {e}"))?;
    Ok(OpenStore {
        store,
        _lock: None,
        _cache_lock: cache_lock,
    })
}

/// Warns when the write-back log held records the store does not name
/// (given up with `forget-write-log`): they were dropped.
fn warn_if_dropped(opened: &OpenCache, cache: &CacheFile) {
    if opened.found == Some(Found::Dropped) {
        eprintln!(
            "warning: the write-back log in {} held writes the store does not name (given up with forget-write-log?): they were dropped",
            cache.path.display()
        );
    }
}

/// Whether the device starts with a Parallax superblock (either copy).
fn holds_store(dev: &dyn BlockDevice) -> io::Result<bool> {
    let mut block = vec![0u8; BLOCK_SIZE];
    for addr in SUPERBLOCK_ADDRS {
        if (addr + 1) * BLOCK_SIZE_U64 <= dev.len() {
            dev.read_at(&mut block, addr * BLOCK_SIZE_U64)?;
            if block[..4] == MAGIC {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Whether the first MiB of the device reads as zeros.
fn starts_empty(dev: &dyn BlockDevice) -> io::Result<bool> {
    let mut buf = vec![0u8; dev.len().min(1 << 20) as usize];
    dev.read_at(&mut buf, 0)?;
    Ok(crate::transfer::is_zero(&buf))
}

/// `parallax init`: formats a new store at `path`.
///
/// A missing path becomes a sparse file of `size` bytes. An existing block
/// device is formatted whole. An existing empty regular file is resized to
/// `size`. Existing content (a store, a non-empty file, a device with data
/// in its first MiB) is overwritten only with `force`.
pub fn init_store(path: &Path, size: Option<u64>, force: bool, host_id: u64) -> Result<()> {
    let shown = path.display();
    let options = CreateOptions {
        host_id,
        ..CreateOptions::default()
    };
    let need_size = || {
        UsageError(format!(
            "--size SIZE is required to create the store file {shown}"
        ))
    };
    let format = |dev: Arc<dyn BlockDevice>| -> Result<()> {
        Store::create(dev, &options)
            .map(drop)
            .map_err(|e| anyhow!("cannot create a store in {shown}: {e}"))
    };
    // Refuses to overwrite a store or data unless forced.
    let check_empty = |dev: &dyn BlockDevice| -> Result<()> {
        if force {
            return Ok(());
        }
        let read_err = |e| anyhow!("cannot read {shown}: {e}");
        if holds_store(dev).map_err(read_err)? {
            bail!("{shown} already holds a Parallax store; pass --force to overwrite it");
        }
        if !starts_empty(dev).map_err(read_err)? {
            bail!("{shown} is not empty (it may hold a partition table or a file system); pass --force to overwrite it");
        }
        Ok(())
    };
    if is_nbd_store(path) {
        let dev = open_nbd(path)?;
        if let Some(size) = size.filter(|&s| s != dev.len()) {
            return Err(UsageError(format!(
                "the export {shown} is {} bytes; a store on it uses all of it, so --size {size} cannot be honoured (leave --size out)",
                dev.len()
            ))
            .into());
        }
        check_empty(&dev)?;
        return format(Arc::new(dev));
    }
    let metadata = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let size = size.ok_or_else(need_size)?;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create directory {}", parent.display()))?;
            }
            let dev = FileDevice::create(path, size, OpenMode::default())
                .with_context(|| format!("cannot create {shown}"))?;
            let result = lock(path, Access::Write).and_then(|_lock| format(Arc::new(dev)));
            if result.is_err() {
                let _ = fs::remove_file(path);
            }
            return result;
        }
        Err(e) => return Err(e).with_context(|| format!("cannot access {shown}")),
    };
    let file_type = metadata.file_type();
    if file_type.is_block_device() {
        let _lock = lock(path, Access::Write)?;
        let dev = FileDevice::open(path, OpenMode::default())
            .with_context(|| format!("cannot open {shown}"))?;
        if let Some(size) = size.filter(|&s| s != dev.len()) {
            return Err(UsageError(format!(
                "{shown} is a block device of {} bytes; a store on it uses all of it, so --size {size} cannot be honoured (leave --size out)",
                dev.len()
            ))
            .into());
        }
        check_empty(&dev)?;
        return format(Arc::new(dev));
    }
    if !file_type.is_file() {
        bail!("{shown} is neither a regular file nor a block device");
    }
    let size = size.ok_or_else(need_size)?;
    let _lock = lock(path, Access::Write)?;
    if metadata.len() > 0 && !force {
        let dev = FileDevice::open(
            path,
            OpenMode {
                direct: false,
                read_only: true,
            },
        )
        .with_context(|| format!("cannot open {shown}"))?;
        if holds_store(&dev).unwrap_or(false) {
            bail!("{shown} already holds a Parallax store; pass --force to overwrite it");
        }
        bail!("{shown} exists and is not empty; pass --force to overwrite it");
    }
    let file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {shown}"))?;
    file.set_len(0)
        .and_then(|_| file.set_len(size))
        .and_then(|_| file.sync_all())
        .with_context(|| format!("cannot resize {shown}"))?;
    drop(file);
    let dev = FileDevice::open(path, OpenMode::default())
        .with_context(|| format!("cannot open {shown}"))?;
    format(Arc::new(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The NBD pool's guard says no once the lease ended, and stays so
    /// after a renewal, even when nothing asked it while fenced (its
    /// requests were stuck on a dead connection then).
    #[test]
    fn the_fencing_guard_latches_even_unasked() {
        let cluster = parallax_engine::MemCluster::new();
        let asked = fencing_guard(cluster.host(1));
        let unasked = fencing_guard(cluster.host(1));
        assert!(asked() && unasked());
        cluster.expire(1);
        assert!(!asked());
        cluster.renew(1);
        assert!(
            !asked(),
            "the guard let writes through again after a renewal"
        );
        assert!(
            !unasked(),
            "a guard not asked while fenced let writes through"
        );
    }

    #[test]
    fn default_store_paths() {
        let path = |root, xdg: Option<&str>, home: Option<&str>| {
            default_store_path_for(root, xdg.map(PathBuf::from), home.map(PathBuf::from))
                .map(|p| p.display().to_string())
                .ok()
        };
        let root = Some("/var/lib/parallax/store.px".to_string());
        assert_eq!(path(true, Some("/x"), Some("/root")), root);
        assert_eq!(
            path(false, Some("/data"), Some("/home/u")).as_deref(),
            Some("/data/parallax/store.px")
        );
        assert_eq!(
            path(false, None, Some("/home/u")).as_deref(),
            Some("/home/u/.local/share/parallax/store.px")
        );
        assert_eq!(
            path(false, Some("relative"), Some("/home/u")).as_deref(),
            Some("/home/u/.local/share/parallax/store.px")
        );
        assert_eq!(path(false, None, None), None);
    }
}
