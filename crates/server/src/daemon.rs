//! `parallax serve`: the per-host appliance.
//!
//! Startup: refuse if a daemon already answers on the control socket; create
//! the store if asked to (the default store, on first run); open it with the
//! exclusive lock every `parallax` process takes, held for the daemon's
//! whole life; bind the NBD listeners and the control socket.
//!
//! Shutdown on SIGINT or SIGTERM: stop accepting, stop reading new requests,
//! let the requests in flight finish and their replies go out, flush every
//! disk, remove the socket files, release the store.

use crate::api::{CacheStatus, DaemonStatus};
use crate::cluster::{ClusterOptions, Etcd, EtcdCoordinator};
use crate::control::{self, ControlState};
use crate::nbd;
use crate::scheduler::Scheduler;
use crate::service::Service;
use crate::store_file::{self, Access};
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// How long shutdown waits for clients' requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ServeOptions {
    pub store_path: PathBuf,
    /// Create the store with this size if it does not exist.
    pub create_size: Option<u64>,
    pub host_id: u64,
    /// TCP address for NBD, if any.
    pub nbd_listen: Option<SocketAddr>,
    /// Unix socket for NBD, if any.
    pub nbd_socket: Option<PathBuf>,
    pub control: PathBuf,
    /// Bypass the page cache (`O_DIRECT`).
    pub direct: bool,
    /// Group allowed to use the Unix sockets (mode 0660 instead of 0600).
    pub socket_group: Option<u32>,
    /// Cluster mode: etcd and the lease (see `docs/CLUSTER.md`).
    pub cluster: Option<ClusterOptions>,
    /// `NBD_OPT_LIST` lists snapshot exports too.
    pub list_snapshots: bool,
    /// NBD over TLS.
    pub tls: Arc<crate::tls::NbdTls>,
    /// Also serve `GET /metrics` on this TCP address.
    pub metrics_listen: Option<SocketAddr>,
    /// Metrics by disk too (a series per disk and operation).
    pub metrics_per_disk: bool,
    /// Group allowed to use the control socket (0660), instead of
    /// `socket_group`.
    pub control_group: Option<u32>,
    /// Mode of the NBD Unix socket (default 0600, 0660 with a group).
    pub nbd_socket_mode: Option<u32>,
    /// The local read cache, if any.
    pub cache: Option<store_file::CacheFile>,
    /// Turn on entry journals (format 2, being built: docs/JOURNAL-PLAN.md).
    pub journal: bool,
    /// Serve every disk over vhost-user-blk on `DIR/NAME.sock`.
    pub vhost_user: Option<PathBuf>,
}

/// Every [`SETTLE_INTERVAL`], the store's upkeep ([`Store::settle`]):
/// disks idle for [`COMMIT_IDLE`] with uncommitted changes are committed
/// (what a client wrote and left without a flush is not kept in memory),
/// disks no client uses and idle for [`CLOSE_IDLE`] are let go, and the
/// extent bitmaps that frees changed since the last tick are written
/// (snapshot, clone and delete return without doing it, and so stay fast).
/// Between ticks, a crash leaves those blocks leaked on disk, which `gc`
/// repairs; the shutdown path settles everything.
///
/// [`Store::settle`]: parallax_engine::Store::settle
async fn settle(service: Arc<Service>) {
    let mut tick = tokio::time::interval(SETTLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut had_clients = false;
    loop {
        tick.tick().await;
        let clients = open_connections() > 0;
        if had_clients && !clients {
            // The last connection closed: its buffers go back to the system.
            nbd::release_idle_buffers();
            trim_malloc();
        }
        had_clients = clients;
        let svc = service.clone();
        let settled =
            tokio::task::spawn_blocking(move || svc.store().settle(COMMIT_IDLE, CLOSE_IDLE)).await;
        match settled {
            Ok(Ok(r)) if r.committed + r.closed > 0 => {
                debug!(
                    committed = r.committed,
                    closed = r.closed,
                    "settled idle disks"
                );
            }
            Ok(Err(e)) => warn!("settling idle disks and free space failed: {e}"),
            _ => {}
        }
    }
}

/// `--takeover`: every [`TAKEOVER_SCAN`], and within [`HOSTS_LOOK`] of an
/// appliance leaving the registry, takes over the disks whose last commit
/// is by an appliance that is no longer registered (its lease ended) and
/// did not let them go, or by an earlier run of this one.
/// Every appliance with `--takeover` scans; for each disk one wins the
/// writer key and the others move on.
async fn take_over_orphans(service: Arc<Service>, cluster: Arc<EtcdCoordinator>) {
    let mut tick = tokio::time::interval(HOSTS_LOOK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known = HashSet::new();
    let mut scanned = std::time::Instant::now();
    loop {
        tick.tick().await;
        let (svc, c) = (service.clone(), cluster.clone());
        // A full scan every TAKEOVER_SCAN, or at once when an appliance
        // left (its lease ended): its disks wait for nothing else.
        let live = match tokio::task::spawn_blocking(move || c.hosts()).await {
            Ok(Ok(hosts)) => hosts
                .into_iter()
                .map(|(id, _)| id)
                .collect::<HashSet<u64>>(),
            _ => continue,
        };
        let someone_left = known.iter().any(|h| !live.contains(h));
        known = live.clone();
        if !someone_left && scanned.elapsed() < TAKEOVER_SCAN {
            continue;
        }
        scanned = std::time::Instant::now();
        let c = cluster.clone();
        match tokio::task::spawn_blocking(move || take_over_scan(&svc, &c, &live)).await {
            Ok(Err(e)) => debug!("takeover scan: {e}"),
            Err(e) => warn!("takeover scan: {e}"),
            Ok(Ok(())) => {}
        }
    }
}

fn take_over_scan(service: &Service, cluster: &EtcdCoordinator, live: &HashSet<u64>) -> Result<()> {
    let store = service.store();
    let me = cluster.options().host_id;
    let held = store.open_disk_ids();
    let mut orphans = Vec::new();
    for name in store.try_list()? {
        let Ok(info) = store.peek_info(&name) else {
            continue;
        };
        if info.writer_epoch == 0
            || held.contains(&info.id)
            || (live.contains(&info.writer_host) && info.writer_host != me)
            || cluster.released_epoch_of(info.id)? == info.writer_epoch
        {
            continue;
        }
        orphans.push(name);
    }
    // Each takeover waits the grace with its key held: all of a dead
    // appliance's disks wait it together, not one after the other.
    let grace = cluster.options().takeover_grace;
    for batch in orphans.chunks(TAKEOVERS_AT_ONCE) {
        std::thread::scope(|s| {
            for name in batch {
                s.spawn(move || match store.take_over(name, Duration::ZERO, grace) {
                    Ok((vdi, r)) if r.taken_over => {
                        crate::metrics::global().disk_taken_over();
                        info!(
                            disk = %name,
                            from_host = r.from_host,
                            from_epoch = r.from_epoch,
                            epoch = r.epoch,
                            grace_ms = r.grace.as_millis() as u64,
                            "took the disk over"
                        );
                        if let Some(s) = service.scheduler() {
                            s.refresh(&vdi);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => debug!(disk = %name, "not taken over: {e}"),
                });
            }
        });
    }
    Ok(())
}

/// Disks one takeover scan takes over at once (each a thread waiting the
/// grace).
const TAKEOVERS_AT_ONCE: usize = 64;

/// Cluster mode: every [`YIELD_SCAN`], hands over the disks other
/// appliances asked for (a VM migrating there), once this one's clients
/// are done with them.
async fn yield_requested(service: Arc<Service>) {
    let mut tick = tokio::time::interval(YIELD_SCAN);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let svc = service.clone();
        match tokio::task::spawn_blocking(move || svc.yield_requested()).await {
            Ok(Err(e)) => debug!("giving up disks asked for: {e}"),
            Err(e) => warn!("giving up disks asked for: {e}"),
            Ok(Ok(())) => {}
        }
    }
}

/// How often an appliance looks for requests for the disks it holds.
const YIELD_SCAN: Duration = Duration::from_millis(100);

/// How often `--takeover` looks for disks to take over.
const TAKEOVER_SCAN: Duration = Duration::from_secs(1);

/// How often `--takeover` looks at the registered appliances (one etcd
/// read): one gone starts a scan at once.
const HOSTS_LOOK: Duration = Duration::from_millis(250);

/// Gives the memory glibc's malloc holds free back to the system.
fn trim_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it
    // takes malloc's own locks and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How often the daemon settles (see [`settle`]).
const SETTLE_INTERVAL: Duration = Duration::from_millis(200);
/// A disk unchanged this long has its pending changes committed.
const COMMIT_IDLE: Duration = Duration::from_secs(1);
/// A disk no client uses, unchanged this long, is let go.
const CLOSE_IDLE: Duration = Duration::from_secs(60);

/// The io_uring for NBD data, unless `PARALLAX_IO_URING=0` or the kernel
/// refuses (then every request runs on the blocking thread pool).
fn start_uring() -> Option<Arc<crate::uring::Uring>> {
    if std::env::var("PARALLAX_IO_URING").as_deref() == Ok("0") {
        info!("io_uring disabled by PARALLAX_IO_URING=0; data I/O on the blocking pool");
        return None;
    }
    match crate::uring::Uring::new() {
        Ok(u) => {
            info!("data I/O through io_uring");
            Some(u)
        }
        Err(e) => {
            warn!("io_uring unavailable ({e}); data I/O on the blocking pool");
            None
        }
    }
}

/// Raises the soft limit on open files to the hard limit: every client
/// connection is a descriptor.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
}

/// Removes a Unix socket file left by a process that is gone. Refuses to
/// touch anything that is not a socket, or a socket someone listens on.
fn clear_stale_socket(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        bail!("{} exists and is not a socket", path.display());
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!("{} is in use by another process", path.display());
    }
    std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))
}

/// Binds a Unix socket: created under a umask of 0177, so that only the
/// daemon's user can reach it at first, then given to `group` and `mode`.
fn bind_unix(path: &Path, group: Option<u32>, mode: u32) -> Result<UnixListener> {
    use rustix::fs::Mode;
    clear_stale_socket(path)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create directory {}", parent.display()))?;
    }
    // The umask is process-wide; nothing else creates files while the
    // daemon binds its sockets at startup.
    let old = rustix::process::umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.with_context(|| format!("cannot listen on {}", path.display()))?;
    if let Some(gid) = group {
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
            .map_err(std::io::Error::from)
            .with_context(|| format!("cannot give group {gid} access to {}", path.display()))?;
    }
    if mode != 0o600 {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .with_context(|| format!("cannot set mode {mode:o} on {}", path.display()))?;
    }
    Ok(listener)
}

/// Warns when other users may read the store (and so every disk in it),
/// or lock it and keep the daemon from starting.
fn warn_if_exposed(store: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(store) {
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_file() && mode & 0o077 != 0 {
            warn!(
                store = %store.display(),
                "the store file has mode {mode:o}: other users can read every disk in it; `chmod 600` it"
            );
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
/// Caps glibc's malloc at two arenas, unless `MALLOC_ARENA_MAX` says
/// otherwise. By default every thread that allocates under contention may
/// get an arena of its own, and the daemon's blocking threads each kept
/// freed I/O buffers cached in theirs: a 10-minute soak (10 ms snapshots,
/// fio and a 1 MiB writer) held 340 to 470 MiB resident, 140 MiB with two.
fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only tunes the allocator; it is called before the
        // daemon starts any thread, and M_ARENA_MAX takes any positive value.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

pub fn run(options: ServeOptions) -> Result<()> {
    cap_malloc_arenas();
    crate::metrics::init(options.metrics_per_disk);
    raise_fd_limit();
    let store_path = &options.store_path;
    if std::os::unix::net::UnixStream::connect(&options.control).is_ok() {
        bail!(
            "a parallax daemon already serves store {} (control socket {})",
            store_path.display(),
            options.control.display()
        );
    }
    if let Some(size) = options.create_size {
        if !store_path.exists() {
            store_file::init_store(store_path, Some(size), false, options.host_id)?;
            info!(store = %store_path.display(), size, "created the store");
        }
    }
    warn_if_exposed(store_path);
    let mut etcd = None;
    let opened = match &options.cluster {
        None => store_file::open_store_with(
            store_path,
            Access::Write,
            options.host_id,
            options.direct,
            options.cache.as_ref(),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "{} (is another parallax daemon serving it?)",
                crate::one_line(&e)
            )
        })?,
        Some(cluster) => store_file::open_shared_store(
            store_path,
            options.host_id,
            cluster.in_flight_bound(),
            options.cache.as_ref(),
            |store_id| {
                let c = EtcdCoordinator::connect(cluster, store_id)?;
                etcd = Some(c.clone());
                Ok(Arc::new(Etcd(c)) as Arc<dyn parallax_engine::Coordinator>)
            },
        )?,
    };
    if options.journal {
        opened
            .store
            .enable_journal()
            .context("cannot turn on entry journals")?;
        warn!("entry journals are on (format 2, still being built): binaries before them refuse this store from now on");
    }
    if let Some(reason) = opened.store.damage() {
        warn!("the store is damaged and takes no writes (reads of intact disks go on): {reason}; run `parallax check`");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("parallax")
        .build()
        .context("cannot start the async runtime")?;
    let scheduler = Arc::new(Scheduler::new());
    let service = Arc::new(
        Service::new(opened.store.clone(), store_path.clone(), false)
            .with_uring(runtime.block_on(async { start_uring() }))
            .with_background_settle()
            .with_scheduler(scheduler.clone())
            .with_cluster(etcd.clone())
            .with_listed_snapshots(options.list_snapshots)
            .with_tls(options.tls.clone()),
    );
    let etcd_handle = etcd;
    // Snapshot schedules stored in the disks' headers resume.
    scheduler.start_all(service.store());
    let vhost_user = match &options.vhost_user {
        Some(dir) => Some(
            crate::vhost_user::VhostUserExports::start(service.clone(), dir.clone())
                .with_context(|| format!("cannot serve vhost-user sockets in {}", dir.display()))?,
        ),
        None => None,
    };
    let result = runtime.block_on(serve(&options, service.clone()));
    // The guests' sockets go first: nothing writes after the final flush.
    drop(vhost_user);
    scheduler.stop_all();
    drop(runtime);
    // Every connection is gone; commit whatever is still in memory.
    let flushed = service.store().flush_all();
    drop(opened);
    drop(service);
    if let Some(c) = etcd_handle {
        c.leave();
    }
    match (&result, flushed) {
        (_, Err(e)) => {
            warn!("final flush failed: {e}");
            result.and(Err(anyhow::anyhow!("final flush failed: {e}")))
        }
        (Ok(()), Ok(())) => {
            info!("store flushed and closed");
            result
        }
        _ => result,
    }
}

/// A TCP listener on `addr`, if given, and the address it is bound to
/// (port 0 picks one).
async fn bind_tcp(
    addr: Option<SocketAddr>,
    what: &str,
) -> Result<(Option<TcpListener>, Option<SocketAddr>)> {
    let Some(addr) = addr else {
        return Ok((None, None));
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr}"))?;
    let bound = listener.local_addr()?;
    Ok((Some(listener), Some(bound)))
}

async fn serve(options: &ServeOptions, service: Arc<Service>) -> Result<()> {
    let (tcp, tcp_addr) = bind_tcp(options.nbd_listen, "NBD").await?;
    let unix = match &options.nbd_socket {
        Some(p) => {
            let group = options.socket_group;
            let mode =
                options
                    .nbd_socket_mode
                    .unwrap_or(if group.is_some() { 0o660 } else { 0o600 });
            if mode & 0o006 != 0 {
                warn!(socket = %p.display(), "the NBD socket has mode {mode:o}: every local user can read and write every disk");
            }
            Some(bind_unix(p, group, mode)?)
        }
        None => None,
    };
    let control_group = options.control_group.or(options.socket_group);
    let control_mode = if control_group.is_some() {
        0o660
    } else {
        0o600
    };
    let control_listener = bind_unix(&options.control, control_group, control_mode)?;
    let (metrics_listener, metrics_addr) = bind_tcp(options.metrics_listen, "metrics").await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Every connection task holds a clone of `alive`; when all are gone,
    // `all_gone` yields None.
    let (alive, mut all_gone) = mpsc::channel::<()>(1);

    let state = Arc::new(ControlState {
        service: service.clone(),
        status: DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            store: options.store_path.display().to_string(),
            nbd_tcp: tcp_addr.map(|a| a.to_string()),
            nbd_socket: options.nbd_socket.as_ref().map(|p| p.display().to_string()),
            nbd_tls: options.tls.mode_name().to_string(),
            nbd_tls_verifies_clients: options.tls.verifies_clients,
            metrics_tcp: metrics_addr.map(|a| a.to_string()),
            control: options.control.display().to_string(),
            connections: Vec::new(),
            cluster: None,
            cache: options.cache.as_ref().map(|c| CacheStatus {
                path: c.path.display().to_string(),
                ..CacheStatus::default()
            }),
            write_log: None,
            pool_data_read_bytes: 0,
            journal: false,
        },
        attached: Default::default(),
    });
    let control_task = tokio::spawn(control::serve(control_listener, state, shutdown_rx.clone()));
    let mut accept_tasks = Vec::new();
    if let Some(listener) = metrics_listener {
        accept_tasks.push(tokio::spawn(control::serve_metrics(
            listener,
            service.clone(),
            shutdown_rx.clone(),
        )));
    }
    if let Some(listener) = tcp {
        accept_tasks.push(tokio::spawn(accept_tcp(
            listener,
            service.clone(),
            shutdown_rx.clone(),
            alive.clone(),
        )));
    }
    if let Some(listener) = unix {
        accept_tasks.push(tokio::spawn(accept_unix(
            listener,
            service.clone(),
            shutdown_rx.clone(),
            alive.clone(),
        )));
    }
    drop(alive);
    let settler = tokio::spawn(settle(service.clone()));
    let taker = service
        .cluster()
        .filter(|c| c.options().takeover)
        .map(|c| tokio::spawn(take_over_orphans(service.clone(), c.clone())));
    let yielder = service
        .cluster()
        .is_some()
        .then(|| tokio::spawn(yield_requested(service.clone())));
    let reloader = tokio::spawn(reload_tls_on_hangup(options.tls.clone()));
    info!(
        store = %options.store_path.display(),
        nbd_tcp = ?tcp_addr,
        nbd_socket = ?options.nbd_socket,
        control = %options.control.display(),
        tls = options.tls.mode_name(),
        metrics_tcp = ?metrics_addr,
        "serving"
    );

    // Type=notify under systemd: the sockets are bound, clients may come.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    wait_for_signal().await?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    info!("shutting down: no new connections or requests; finishing those in flight");
    settler.abort();
    for t in taker.into_iter().chain(yielder).chain([reloader]) {
        t.abort();
    }
    let _ = shutdown_tx.send(true);
    for task in accept_tasks {
        let _ = task.await;
    }
    if tokio::time::timeout(DRAIN_TIMEOUT, all_gone.recv())
        .await
        .is_err()
    {
        warn!("some connections did not finish within {DRAIN_TIMEOUT:?}");
    }
    let _ = control_task.await;
    for path in options.nbd_socket.iter().chain([&options.control]) {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// SIGHUP: the TLS certificate, key and CA files are read again (see
/// [`crate::tls`]); a failure is logged and changes nothing.
async fn reload_tls_on_hangup(tls: Arc<crate::tls::NbdTls>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        warn!("cannot handle SIGHUP: TLS credentials are not reloadable");
        return;
    };
    while hangups.recv().await.is_some() {
        let tls = tls.clone();
        match tokio::task::spawn_blocking(move || tls.reload()).await {
            Ok(Ok(())) => info!("SIGHUP: TLS credentials reloaded"),
            Ok(Err(e)) => warn!(
                "SIGHUP: TLS credentials not reloaded (the old ones stay): {}",
                crate::one_line(&e)
            ),
            Err(e) => warn!("SIGHUP: TLS reload failed: {e}"),
        }
    }
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}

/// NBD connections served at once; a client beyond that is disconnected
/// at once (its accepted socket closed), so that no client can make the
/// daemon hold an unbounded number of sockets, tasks and buffers.
const MAX_CONNECTIONS: usize = 4096;

/// A place among the [`MAX_CONNECTIONS`], held while a connection lives;
/// `None` (and a warning) when there is none.
fn connection_slot() -> Option<tokio::sync::OwnedSemaphorePermit> {
    let slot = connection_slots().clone().try_acquire_owned().ok();
    if slot.is_none() {
        warn!("{MAX_CONNECTIONS} NBD connections are open; refusing another");
    }
    slot
}

fn connection_slots() -> &'static Arc<tokio::sync::Semaphore> {
    static SLOTS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)))
}

/// NBD connections open now, negotiated or not.
fn open_connections() -> usize {
    MAX_CONNECTIONS - connection_slots().available_permits()
}

/// Waits before retrying a failed accept (out of descriptors, usually), so
/// that the loop does not spin.
async fn accept_backoff(error: std::io::Error) {
    warn!("accept failed: {error}; retrying");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn accept_tcp(
    listener: TcpListener,
    service: Arc<Service>,
    mut shutdown: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { accept_backoff(e).await; continue; }
            },
            _ = shutdown.changed() => return,
        };
        let Some(slot) = connection_slot() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (service, shutdown, alive) = (service.clone(), shutdown.clone(), alive.clone());
        tokio::spawn(async move {
            nbd::serve_connection(stream, peer.to_string(), service, shutdown).await;
            drop((alive, slot));
        });
    }
}

async fn accept_unix(
    listener: UnixListener,
    service: Arc<Service>,
    mut shutdown: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { accept_backoff(e).await; continue; }
            },
            _ = shutdown.changed() => return,
        };
        let Some(slot) = connection_slot() else {
            continue;
        };
        let (service, shutdown, alive) = (service.clone(), shutdown.clone(), alive.clone());
        tokio::spawn(async move {
            nbd::serve_connection(stream, "unix".to_string(), service, shutdown).await;
            drop((alive, slot));
        });
    }
}
