//! `parallax`: manage a Parallax store and its thin virtual disks.
//!
//! This file holds the command line (clap definitions), the parsing of
//! `NAME` and `NAME@SNAP` arguments, and the dispatch to [`commands`].
//! Errors end the program with one line `parallax: <message>` on stderr and
//! exit code 1; usage errors exit with 2.

mod commands;
mod config;
mod output;
mod size;

use clap::{Parser, Subcommand};
use commands::Context;
use parallax_format::{validate_lookup_name, validate_name};
use parallax_server::api::ScheduleSpec;
use parallax_server::one_line;
use parallax_server::store_file;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// Thin virtual disks with copy-on-write snapshots and clones.
#[derive(Parser)]
#[command(name = "parallax", version, about, max_term_width = 100)]
struct Cli {
    /// The store: a file, a block device, or an export of an NBD server
    /// (`nbd://HOST:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`, with
    /// `&connections=N`; then --control is needed too).
    /// [default: /var/lib/parallax/store.px for root, else
    /// $XDG_DATA_HOME/parallax/store.px or ~/.local/share/parallax/store.px]
    #[arg(long, global = true, env = "PARALLAX_STORE", value_name = "PATH")]
    store: Option<PathBuf>,

    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,

    /// The control socket of the daemon serving the store; commands go
    /// through the daemon when it answers there. [default: the store's path
    /// with `.control` appended]
    #[arg(long, global = true, env = "PARALLAX_CONTROL", value_name = "PATH")]
    control: Option<PathBuf>,

    /// This host's id in a store shared by several hosts.
    #[arg(long, global = true, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..))]
    host_id: u64,

    #[command(subcommand)]
    command: Command,
}

/// `parallax serve`'s flags.
#[derive(clap::Args, Clone)]
pub(crate) struct ServeFlags {
    /// TCP address for NBD clients, or `none`.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:10809",
          value_parser = parse_listen)]
    pub nbd_listen: Listen,
    /// Also serve NBD on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub nbd_socket: Option<PathBuf>,
    /// Size of the default store, created on first run if it is missing.
    #[arg(long, value_name = "SIZE", default_value = "20G", value_parser = size::parse_size)]
    pub init_size: u64,
    /// Read and write the store with O_DIRECT, bypassing the host's page
    /// cache (durability still needs a flush or FUA).
    #[arg(long)]
    pub direct: bool,
    /// Experimental, not reversible: turn on entry journals (format 2),
    /// which make snapshots between checkpoints positions in a per-disk
    /// journal (docs/JOURNAL-PLAN.md). Binaries before them refuse the
    /// store from then on.
    #[arg(long, hide = true)]
    pub journal: bool,
    /// Let this group (a name or a number) use the NBD and control
    /// Unix sockets (mode 0660); by default only the daemon's user may
    /// (0600). See also --control-group and --nbd-socket-mode.
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    pub socket_group: Option<u32>,
    /// Cluster mode: several appliances (each with its own --host-id)
    /// share the store, coordinated through these etcd endpoints
    /// (comma-separated http://ADDR:PORT).
    #[arg(long, value_name = "URL[,URL...]")]
    pub etcd: Option<String>,
    /// Cluster mode: the etcd lease's time to live. An appliance that
    /// cannot renew it stops writing before it can expire.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_ttl)]
    pub lease_ttl: std::time::Duration,
    /// Cluster mode: take over, without being asked, the disks of
    /// appliances that left (their lease ended) without letting them
    /// go.
    #[arg(long)]
    pub takeover: bool,
    /// Cluster mode: how long a takeover waits, holding the disk, for
    /// what the old holder may still have had in flight to the pool.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub takeover_grace: std::time::Duration,
    /// Cluster mode: how long a client's request waits for a disk
    /// another appliance holds (asked for on the client's first
    /// request, given once that appliance's clients are done with it:
    /// a VM migrating here). 0: such a disk is refused when a client
    /// connects.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub claim_wait: std::time::Duration,
    /// Cluster mode: a disk another appliance asks for is given up once
    /// every client here flushed what it wrote and none used it for
    /// this long.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_duration)]
    pub yield_quiet: std::time::Duration,
    /// List every disk's snapshots (`NAME@SNAP`) to NBD clients that
    /// ask for the list of exports (`nbdinfo --list`), not only the
    /// disks. Off by default: a scheduled disk has hundreds, and such
    /// clients then describe each one.
    #[arg(long)]
    pub list_snapshots: bool,
    /// NBD over TLS: `off`, `optional` (clients choose) or `require`
    /// (nothing but STARTTLS before TLS runs). [default: require when
    /// --tls-cert is given, else off]
    #[arg(long, value_name = "MODE", value_parser = parallax_server::tls::parse_mode)]
    pub tls: Option<parallax_server::tls::TlsMode>,
    /// The server's TLS certificate chain (PEM), for NBD over TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM): NBD clients must present a certificate
    /// signed by one of them. Without it, TLS encrypts but lets any client in.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Also serve the metrics (`GET /metrics`, Prometheus text; the
    /// control socket always does) on this TCP address: a bare port
    /// means 127.0.0.1:PORT.
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = parse_metrics_listen)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Keep metrics by disk too: a series per disk and operation.
    #[arg(long)]
    pub metrics_per_disk: bool,
    /// Let this group (a name or a number) use the control socket (mode
    /// 0660), whatever --socket-group says.
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    pub control_group: Option<u32>,
    /// Mode of the NBD Unix socket, in octal (0600, 0660, 0666...): 0666
    /// lets every local user read and write every disk. [default: 0600, or
    /// 0660 with --socket-group]
    #[arg(long, value_name = "MODE", value_parser = parse_socket_mode)]
    pub nbd_socket_mode: Option<u32>,
    /// Local read cache: a file (created with --cache-size if missing) or
    /// a block device on this host, holding copies of the blocks of
    /// snapshots and gold images the pool serves, so that clones of one
    /// image read it from the pool once. Kept across restarts; every copy
    /// is checked when read.
    #[arg(long, value_name = "PATH")]
    pub cache: Option<PathBuf>,
    /// Size of the --cache file (a file of another size is resized and
    /// starts empty).
    #[arg(long, value_name = "SIZE", requires = "cache", value_parser = size::parse_size)]
    pub cache_size: Option<u64>,
    /// Also serve every disk over vhost-user-blk, for QEMU guests on this
    /// host: a socket DIR/NAME.sock per disk (made and removed as disks
    /// come and go). A disk is served over vhost-user or NBD, not both.
    #[arg(long, value_name = "DIR")]
    pub vhost_user: Option<PathBuf>,
    /// Settings file: a TOML table of these flags without their dashes
    /// (`nbd_listen = "0.0.0.0:10809"`, `direct = true`); flags given here
    /// win. [default: /etc/parallax/parallax.toml, when it exists]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the appliance: serve the store's disks over NBD, with live
    /// control through the control socket (stop with SIGINT or SIGTERM).
    Serve(Box<ServeFlags>),
    /// Cluster mode: take a disk over from an appliance that stopped or
    /// lost its lease without letting it go (waits for its lease to end,
    /// then the takeover grace).
    Takeover {
        /// The disk.
        name: String,
    },
    /// Cluster mode: hand a disk this appliance writes to another one: what
    /// is in flight finishes, everything is committed, this appliance's
    /// clients of the disk get errors from then on, and the other
    /// appliance opens it (asked through its control socket).
    Handoff {
        /// The disk.
        name: String,
        /// The host id of the appliance to hand it to.
        #[arg(long)]
        to: u64,
    },
    /// Cluster mode: the appliances sharing the store, and the disks each
    /// one writes.
    Hosts,
    /// Show what the running daemon serves, and its client connections.
    Status,
    /// Create a store: a new sparse file of SIZE, or a whole block device.
    Init {
        /// Size of a new store file, e.g. 20G (leave out for a block device).
        #[arg(long, value_parser = size::parse_size)]
        size: Option<u64>,
        /// Overwrite an existing store, non-empty file or device.
        #[arg(long)]
        force: bool,
    },
    /// Create an empty disk.
    Create {
        /// Name of the new disk.
        #[arg(value_parser = parse_new_name)]
        name: String,
        /// Virtual size, e.g. 20G (rounded up to 4 KiB).
        #[arg(long, value_parser = size::parse_size)]
        size: u64,
    },
    /// List disks.
    List,
    /// Describe a disk or a snapshot.
    Info {
        /// A disk, or one of its snapshots.
        #[arg(value_name = "NAME[@SNAP]", value_parser = parse_disk_ref)]
        target: DiskRef,
    },
    /// Take a snapshot (named by the current time if @SNAP is left out).
    Snapshot {
        /// The disk, and optionally the snapshot's name.
        #[arg(value_name = "NAME[@SNAP]", value_parser = parse_disk_ref)]
        target: DiskRef,
        /// Return once the snapshot is taken in memory (readable, listed,
        /// and what later writes are made against) instead of once it is
        /// durable; it becomes durable within milliseconds, or with the
        /// disk's next flush. A crash before loses it, and no flushed write.
        #[arg(long)]
        no_wait: bool,
    },
    /// List the snapshots of a disk.
    Snapshots {
        /// The disk.
        #[arg(value_parser = parse_name)]
        name: String,
    },
    /// Create a new disk from a snapshot (instant; blocks are shared).
    Clone {
        /// The snapshot to clone.
        #[arg(value_name = "NAME@SNAP", value_parser = parse_snap_ref)]
        source: SnapRef,
        /// Name of the new disk.
        #[arg(value_name = "NEW", value_parser = parse_new_name)]
        new: String,
    },
    /// Return a disk to the content of one of its snapshots.
    Rollback {
        /// The snapshot to return to.
        #[arg(value_name = "NAME@SNAP", value_parser = parse_snap_ref)]
        target: SnapRef,
    },
    /// Delete disks (with their snapshots) or single snapshots, in order.
    Delete {
        /// Disks and snapshots to delete; stops at the first failure.
        #[arg(value_name = "NAME[@SNAP]", required = true, value_parser = parse_disk_ref)]
        targets: Vec<DiskRef>,
    },
    /// Create a disk from a raw or qcow2 image.
    Import {
        /// A raw or qcow2 image file.
        file: PathBuf,
        /// Name of the new disk.
        #[arg(value_parser = parse_new_name)]
        name: String,
        /// Disk size, if larger than the image's virtual size.
        #[arg(long, value_parser = size::parse_size)]
        size: Option<u64>,
    },
    /// Write a disk or snapshot to a sparse raw image file.
    Export {
        /// The disk or snapshot to export.
        #[arg(value_name = "NAME[@SNAP]", value_parser = parse_disk_ref)]
        source: DiskRef,
        /// The raw image file to write.
        file: PathBuf,
        /// Overwrite FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// List what changed from a snapshot to a later one of the same disk
    /// (or to the live disk, or to a snapshot of a clone of it): ranges
    /// that now hold other data, and ranges that now read as zeros. The
    /// cost follows the change, not the disk.
    Diff {
        /// The older snapshot.
        #[arg(value_name = "NAME@SNAP", value_parser = parse_snap_ref)]
        from: SnapRef,
        /// The newer snapshot, or a disk (as it is now).
        #[arg(value_name = "NAME[@SNAP]", value_parser = parse_disk_ref)]
        to: DiskRef,
    },
    /// Write a snapshot as a stream for `parallax receive` on another
    /// store: whole, or with --from only what changed since an older
    /// snapshot that the receiving disk holds.
    Send {
        /// The snapshot to send.
        #[arg(value_name = "NAME@SNAP", value_parser = parse_snap_ref)]
        snapshot: SnapRef,
        /// The older snapshot: SNAP of the same disk, or NAME@SNAP (a
        /// snapshot of the disk's clone origin).
        #[arg(long, value_name = "[NAME@]SNAP")]
        from: Option<String>,
        /// Where to write the stream: a new file, or `-` for standard
        /// output (not a terminal).
        #[arg(short = 'o', long = "output", value_name = "FILE|-")]
        output: PathBuf,
    },
    /// Apply a stream from `parallax send`. A full stream makes the new
    /// disk NAME; an incremental one brings NAME, which holds the stream's
    /// older snapshot and has not changed since, to the stream's snapshot.
    /// It takes effect as one snapshot once the whole stream has arrived
    /// and checked out: a cut or damaged stream leaves NAME as it was.
    Receive {
        /// The disk to make or to bring up to date.
        #[arg(value_parser = parse_name)]
        name: String,
        /// The stream: a file, or `-` for standard input.
        #[arg(
            short = 'i',
            long = "input",
            value_name = "FILE|-",
            default_value = "-"
        )]
        input: PathBuf,
        /// Roll NAME back to the stream's older snapshot first if it
        /// changed since (its writes since are lost).
        #[arg(long)]
        force: bool,
    },
    /// Serve a disk (or, read-only, a snapshot) over vhost-user-blk on a
    /// socket of your choice, from the running daemon, until `detach`.
    Attach {
        /// The disk or snapshot.
        #[arg(value_name = "NAME[@SNAP]", value_parser = parse_disk_ref)]
        target: DiskRef,
        /// The Unix socket to make, for QEMU's `-chardev socket,path=`.
        #[arg(long, value_name = "SOCKET")]
        vhost_user: PathBuf,
    },
    /// Stop serving a socket `attach` made (a guest on it is disconnected).
    Detach {
        /// The socket.
        #[arg(long, value_name = "SOCKET")]
        vhost_user: PathBuf,
    },
    /// Verify the consistency of the store (exit 1 if damaged).
    Check,
    /// Return unreferenced blocks to the free pool.
    Gc,
    /// Repair a store that `check` reports damaged (the daemon stopped):
    /// mark allocated every block the disks' metadata reaches (repair never
    /// frees a block), and serve each disk at a header generation you
    /// confirm. Without --apply, only shows the plan (exit 1 if repair is
    /// needed).
    Repair {
        /// Write the repair.
        #[arg(long)]
        apply: bool,
        /// Serve disk NAME at header generation GEN (the plan lists each
        /// disk's valid generations and what each reaches).
        #[arg(long = "use", value_name = "NAME=GEN", value_parser = parse_use)]
        use_generation: Vec<(String, u64)>,
        /// Remove disk NAME from the store (its blocks are returned by the
        /// next `gc`).
        #[arg(long, value_name = "NAME", value_parser = parse_name)]
        forget: Vec<String>,
    },
    /// Show the store's capacity and use, and each disk's `used` (what
    /// deleting it with its snapshots frees) and `referenced` space.
    Df {
        /// Also recompute every figure by a full scan of the store and
        /// compare (exit 1 if anything differs).
        #[arg(long)]
        scan: bool,
    },
    /// How the daemon's local cache (`serve --cache`) serves a disk:
    /// `write-through` (the default: reads of its snapshots' and clone
    /// origin's blocks are cached, writes go to the pool), `write-back`
    /// (also: writes and FLUSH are acknowledged once in the cache's local
    /// write-back log and reach the pool later, in order: until then they
    /// live only on this host) or `none`. Without a policy, show it.
    CachePolicy {
        /// The disk.
        #[arg(value_parser = parse_name)]
        name: String,
        /// `write-through`, `write-back` or `none`.
        policy: Option<String>,
    },
    /// Give up the write-back log the store depends on (its cache device
    /// is lost): the store opens again without it, as the log last left
    /// the pool (a state a power cut could have left); writes only the log
    /// held are lost. The daemon must be stopped. In cluster mode, with
    /// `--host N` through a running appliance: gives up host N's log (N
    /// must be down), so that its disks can be taken over.
    ForgetWriteLog {
        /// Cluster mode: the host whose log to give up.
        #[arg(long)]
        host: Option<u64>,
    },
    /// Take snapshots of a disk on a schedule, thinned by retention rules
    /// (kept in the store; the daemon runs them). Without options, show the
    /// schedule.
    Schedule {
        /// The disk.
        #[arg(value_parser = parse_name)]
        name: String,
        /// Interval between snapshots, e.g. 10ms, 1s, 15min (at least 1ms).
        #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
        every: Option<u64>,
        /// Keep the newest N scheduled snapshots.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_last: u32,
        /// Keep the newest scheduled snapshot of each of the last N minutes.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_minutely: u32,
        /// ... of each of the last N hours.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_hourly: u32,
        /// ... of each of the last N days.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_daily: u32,
        /// ... of each of the last N calendar months.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_monthly: u32,
        /// Remove the schedule (its snapshots stay).
        #[arg(long, conflicts_with_all = ["every", "keep_last", "keep_minutely", "keep_hourly", "keep_daily", "keep_monthly"])]
        off: bool,
    },
}

/// An etcd lease TTL: whole seconds, at least 2.
fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration: {e}"))?;
    if d < std::time::Duration::from_secs(2) || d.subsec_nanos() != 0 {
        return Err(format!(
            "'{s}': the lease TTL is whole seconds, at least 2s"
        ));
    }
    Ok(d)
}

/// A duration, e.g. `5s`, `500ms`.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration: {e}"))
}

/// A schedule interval in ns: a humantime duration of at least 1 ms.
fn parse_interval(s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration: {e}"))?;
    let ns = u64::try_from(d.as_nanos()).map_err(|_| format!("'{s}' is too long"))?;
    if ns < 1_000_000 {
        return Err(format!("'{s}' is shorter than the 1ms minimum"));
    }
    Ok(ns)
}

/// A TCP address to listen on, or none.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Listen(pub Option<std::net::SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "none" {
        return Ok(Listen(None));
    }
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| format!("'{s}' is not an ADDR:PORT: {e}"))?
        .next()
        .map(|a| Listen(Some(a)))
        .ok_or_else(|| format!("'{s}' resolves to no address"))
}

pub use parallax_engine::DiskRef;

/// `NAME@SNAP`.
#[derive(Debug, Clone)]
pub struct SnapRef {
    pub disk: String,
    pub snapshot: String,
}

/// A group id, or a group name looked up in /etc/group.
/// `--nbd-socket-mode`: octal permission bits that keep the owner's read
/// and write.
fn parse_socket_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("'{s}' is not an octal mode such as 0660"))?;
    if mode > 0o777 || mode & 0o600 != 0o600 {
        return Err(format!(
            "'{s}': a socket mode is at most 0777 and keeps the owner's 06"
        ));
    }
    Ok(mode)
}

/// `--metrics-listen`: `ADDR:PORT`, or a port on the loopback address.
fn parse_metrics_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|e| format!("'{s}' is not PORT or ADDR:PORT: {e}"))
}

fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.parse() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group to find group {s:?}: {e}"))?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(name, _)| *name == s)
        .and_then(|(_, gid)| gid.parse().ok())
        .ok_or_else(|| format!("no group named {s:?} in /etc/group"))
}

/// The name of an existing disk (any name the store may hold).
fn parse_name(s: &str) -> Result<String, String> {
    validate_lookup_name(s)?;
    Ok(s.to_string())
}

/// `NAME=GEN` of `repair --use`.
fn parse_use(s: &str) -> Result<(String, u64), String> {
    let (name, generation) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("'{s}' is not NAME=GENERATION"))?;
    validate_lookup_name(name)?;
    let generation = generation
        .parse()
        .map_err(|_| format!("'{generation}' is not a generation number"))?;
    Ok((name.to_string(), generation))
}

/// The name of a new disk (see `validate_name`).
fn parse_new_name(s: &str) -> Result<String, String> {
    validate_name(s)?;
    Ok(s.to_string())
}

fn parse_disk_ref(s: &str) -> Result<DiskRef, String> {
    DiskRef::parse(s)
}

fn parse_snap_ref(s: &str) -> Result<SnapRef, String> {
    match parse_disk_ref(s)? {
        DiskRef {
            disk,
            snapshot: Some(snapshot),
        } => Ok(SnapRef { disk, snapshot }),
        _ => Err(format!("'{s}' names no snapshot: expected NAME@SNAP")),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let default_store = cli.store.is_none();
    let store_path = match cli.store {
        Some(p) if store_file::is_nbd_store(&p) => p,
        Some(p) => std::path::absolute(&p).unwrap_or(p),
        None => store_file::default_store_path()?,
    };
    let control = match cli.control {
        Some(c) => c,
        None if store_file::is_nbd_store(&store_path) => {
            return Err(store_file::UsageError(format!(
                "the store {} is reached over NBD: pass --control PATH, the daemon's control socket",
                store_path.display()
            ))
            .into())
        }
        None => store_file::default_control_socket(&store_path),
    };
    let ctx = Context {
        store_path,
        default_store,
        control,
        json: cli.json,
        host_id: cli.host_id,
    };
    match &cli.command {
        Command::Serve(flags) => commands::serve(&ctx, (**flags).clone()),
        Command::Takeover { name } => commands::takeover(&ctx, name),
        Command::Handoff { name, to } => commands::handoff(&ctx, name, *to),
        Command::Hosts => commands::hosts(&ctx),
        Command::Status => commands::status(&ctx),
        Command::Init { size, force } => commands::init(&ctx, *size, *force),
        Command::Create { name, size } => commands::create(&ctx, name, *size),
        Command::List => commands::list(&ctx),
        Command::Info { target } => commands::info(&ctx, target),
        Command::Snapshot { target, no_wait } => commands::snapshot(&ctx, target, !no_wait),
        Command::Snapshots { name } => commands::snapshots(&ctx, name),
        Command::Clone { source, new } => commands::clone(&ctx, source, new),
        Command::Rollback { target } => commands::rollback(&ctx, target),
        Command::Delete { targets } => commands::delete(&ctx, targets),
        Command::Import { file, name, size } => commands::import(&ctx, file, name, *size),
        Command::Export {
            source,
            file,
            force,
        } => commands::export(&ctx, source, file, *force),
        Command::Diff { from, to } => commands::diff(&ctx, from, to),
        Command::Send {
            snapshot,
            from,
            output,
        } => commands::send(&ctx, snapshot, from.as_deref(), output),
        Command::Receive { name, input, force } => commands::receive(&ctx, name, input, *force),
        Command::Attach { target, vhost_user } => commands::attach(&ctx, target, vhost_user),
        Command::Detach { vhost_user } => commands::detach(&ctx, vhost_user),
        Command::Check => commands::check(&ctx),
        Command::Gc => commands::gc(&ctx),
        Command::Repair {
            apply,
            use_generation,
            forget,
        } => commands::repair(&ctx, *apply, use_generation, forget),
        Command::Df { scan } => commands::df(&ctx, *scan),
        Command::CachePolicy { name, policy } => {
            commands::cache_policy(&ctx, name, policy.as_deref())
        }
        Command::ForgetWriteLog { host } => commands::forget_write_log(&ctx, *host),
        Command::Schedule {
            name,
            every,
            keep_last,
            keep_minutely,
            keep_hourly,
            keep_daily,
            keep_monthly,
            off,
        } => {
            let spec = every.map(|every_ns| ScheduleSpec {
                every_ns,
                keep_last: *keep_last,
                keep_minutely: *keep_minutely,
                keep_hourly: *keep_hourly,
                keep_daily: *keep_daily,
                keep_monthly: *keep_monthly,
            });
            let keeps = [
                keep_last,
                keep_minutely,
                keep_hourly,
                keep_daily,
                keep_monthly,
            ];
            if spec.is_none() && !off && keeps.iter().any(|k| **k != 0) {
                return Err(store_file::UsageError(
                    "retention rules need a schedule: give --every too".into(),
                )
                .into());
            }
            commands::schedule(&ctx, name, spec, *off)
        }
    }
}

fn main() -> ExitCode {
    let args = match config::with_config_file::<Cli>(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "parallax: {}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(usage) = e.downcast_ref::<store_file::UsageError>() {
                use clap::CommandFactory;
                Cli::command()
                    .error(clap::error::ErrorKind::ArgumentConflict, usage)
                    .exit();
            }
            // Not eprintln!, which panics when stderr is closed.
            let _ = writeln!(std::io::stderr(), "parallax: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_disk_and_snapshot_refs() {
        let r = parse_disk_ref("vm1").unwrap();
        assert_eq!((r.disk.as_str(), r.snapshot), ("vm1", None));
        let r = parse_disk_ref("vm1@gold").unwrap();
        assert_eq!(r.to_string(), "vm1@gold");
        assert!(parse_disk_ref("@gold").is_err());
        assert!(parse_disk_ref("vm1@").is_err());
        assert!(parse_disk_ref("vm1@a@b").is_err());
        assert!(parse_disk_ref("a/b").is_err());
        assert!(parse_snap_ref("vm1").is_err());
        assert_eq!(parse_use("vm1=7"), Ok(("vm1".to_string(), 7)));
        assert!(parse_use("vm1").is_err());
        assert!(parse_use("vm1=x").is_err());
        let s = parse_snap_ref("vm1@gold").unwrap();
        assert_eq!((s.disk.as_str(), s.snapshot.as_str()), ("vm1", "gold"));
    }

    #[test]
    fn parses_schedule_intervals() {
        assert_eq!(parse_interval("10ms"), Ok(10_000_000));
        assert_eq!(parse_interval("1h"), Ok(3_600_000_000_000));
        assert!(parse_interval("500us").is_err());
        assert!(parse_interval("often").is_err());
    }
}
