//! One function per verb. Each runs its operation through the
//! [`Api`] trait, on the running daemon if one serves the store (its
//! control socket answers), else on the store opened here with the lock the
//! operation needs, and prints the result as text or, with `--json`, JSON.

use crate::output::{key_values, print, print_json, Table};
use crate::size::format_size;
use crate::{DiskRef, Listen, ServeFlags, SnapRef};
use anyhow::{anyhow, bail, Context as _, Result};
use parallax_server::api::{Api, ApiResult, DiskInfo, ErrorKind, ScheduleSpec, SnapName};
use parallax_server::client::Remote;
use parallax_server::cluster::ClusterOptions;
use parallax_server::daemon::{self, ServeOptions};
use parallax_server::service::Service;
use parallax_server::store_file::{self, open_store, Access};
use parallax_server::tls::{NbdTls, TlsFiles};
use parallax_server::transfer::stream_progress;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// What every command gets from the global options.
pub struct Context {
    pub store_path: PathBuf,
    /// Whether the store path is the default one (not from --store).
    pub default_store: bool,
    pub control: PathBuf,
    pub json: bool,
    pub host_id: u64,
}

impl Context {
    /// Runs `body` on the daemon serving the store, or on the store itself.
    fn with_api<T>(
        &self,
        access: Access,
        body: impl FnOnce(&dyn Api) -> ApiResult<T>,
    ) -> Result<T> {
        if let Some(remote) = Remote::connect(&self.control) {
            return Ok(body(&remote)?);
        }
        self.refuse_if_denied()?;
        let opened = open_store(&self.store_path, access, self.host_id)?;
        let service = Service::new(opened.store.clone(), self.store_path.clone(), true);
        Ok(body(&service)?)
    }

    /// A daemon this user may not talk to (its control socket exists but
    /// refuses us): say so, rather than fall back to the store and report
    /// it "in use".
    fn refuse_if_denied(&self) -> Result<()> {
        match std::os::unix::net::UnixStream::connect(&self.control) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
                "permission denied on the daemon's control socket {}: the daemon serving {} runs as another user (its sockets are mode 0600 unless it was started with --socket-group)",
                self.control.display(),
                self.store_path.display()
            ),
            _ => Ok(()),
        }
    }

    fn read<T>(&self, body: impl FnOnce(&dyn Api) -> ApiResult<T>) -> Result<T> {
        self.with_api(Access::Read, body)
    }

    fn write<T>(&self, body: impl FnOnce(&dyn Api) -> ApiResult<T>) -> Result<T> {
        self.with_api(Access::Write, body)
    }
}

/// `size (bytes)` for `key: value` output.
fn size_with_bytes(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", format_size(bytes))
}

/// `every 10ms, keep last 1000, hourly 24` (or `-`).
pub fn describe_schedule(s: Option<&ScheduleSpec>) -> String {
    let Some(s) = s else {
        return "-".into();
    };
    let every = humantime::format_duration(std::time::Duration::from_nanos(s.every_ns));
    let mut rules = Vec::new();
    for (n, what) in [
        (s.keep_last, "last"),
        (s.keep_minutely, "minutely"),
        (s.keep_hourly, "hourly"),
        (s.keep_daily, "daily"),
        (s.keep_monthly, "monthly"),
    ] {
        if n > 0 {
            rules.push(format!("{what} {n}"));
        }
    }
    if rules.is_empty() {
        format!("every {every}, keep all")
    } else {
        format!("every {every}, keep {}", rules.join(", "))
    }
}

/// A path the daemon can use whatever its working directory.
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| anyhow!("cannot resolve {}: {e}", path.display()))
}

pub fn init(ctx: &Context, size: Option<u64>, force: bool) -> Result<()> {
    if Remote::connect(&ctx.control).is_some() {
        bail!(
            "a parallax daemon is serving store {}; stop it before re-initialising the store",
            ctx.store_path.display()
        );
    }
    store_file::init_store(&ctx.store_path, size, force, ctx.host_id)
}

/// `parallax serve`'s options.
pub fn serve(ctx: &Context, flags: ServeFlags) -> Result<()> {
    let ServeFlags {
        nbd_listen: Listen(nbd_listen),
        nbd_socket,
        init_size,
        direct,
        socket_group,
        etcd,
        lease_ttl,
        takeover,
        takeover_grace,
        claim_wait,
        yield_quiet,
        list_snapshots,
        tls,
        tls_cert,
        tls_key,
        tls_ca,
        metrics_listen,
        metrics_per_disk,
        control_group,
        nbd_socket_mode,
        cache,
        cache_size,
        journal,
        vhost_user,
        config: _,
    } = flags;
    let vhost_user = vhost_user.map(|p| absolute(&p)).transpose()?;
    let cache = cache
        .map(|p| absolute(&p))
        .transpose()?
        .map(|path| store_file::CacheFile {
            path,
            size: cache_size,
        });
    let nbd_socket = nbd_socket.map(|p| absolute(&p)).transpose()?;
    let cluster = etcd.map(|urls| ClusterOptions {
        endpoints: urls.split(',').map(str::to_string).collect(),
        lease_ttl,
        host_id: ctx.host_id,
        takeover,
        takeover_grace,
        claim_wait,
        yield_quiet,
        description: serde_json::json!({
            "nbd_tcp": nbd_listen.map(|a| a.to_string()),
            "nbd_socket": nbd_socket.as_ref().map(|p| p.display().to_string()),
            "control": ctx.control.display().to_string(),
            "pid": std::process::id(),
        })
        .to_string(),
    });
    // Logs go to stderr; PARALLAX_LOG filters them (default `info`).
    let filter = tracing_subscriber::EnvFilter::try_from_env("PARALLAX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    daemon::run(ServeOptions {
        store_path: ctx.store_path.clone(),
        create_size: ctx.default_store.then_some(init_size),
        host_id: ctx.host_id,
        nbd_listen,
        nbd_socket,
        control: ctx.control.clone(),
        direct,
        socket_group,
        cluster,
        list_snapshots,
        tls: std::sync::Arc::new(NbdTls::load(
            tls,
            &TlsFiles {
                cert: tls_cert,
                key: tls_key,
                ca: tls_ca,
            },
        )?),
        metrics_listen,
        metrics_per_disk,
        control_group,
        nbd_socket_mode,
        cache,
        journal,
        vhost_user,
    })
}

pub fn hosts(ctx: &Context) -> Result<()> {
    let remote = Remote::connect(&ctx.control)
        .ok_or_else(|| anyhow!("no daemon answers on {}", ctx.control.display()))?;
    let hosts = remote.hosts()?;
    if ctx.json {
        return print_json(&hosts);
    }
    let mut table = Table::new(&[
        "HOST",
        "NBD",
        "CONTROL",
        "LEASE LEFT",
        "WRITING",
        "HANDING OFF",
        "ASKING FOR",
    ]);
    let or_dash = |v: Vec<String>| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    for h in hosts {
        let field = |k: &str| h.registered[k].as_str().unwrap_or("-").to_string();
        table.row(vec![
            h.host_id.to_string(),
            field("nbd_tcp"),
            field("control"),
            h.lease_left_ms
                .map_or("-".into(), |ms| format!("{:.0} s", ms as f64 / 1000.0)),
            h.writing.len().to_string(),
            or_dash(
                h.handing_off
                    .iter()
                    .map(|o| format!("{}->{}", o.disk, o.to))
                    .collect(),
            ),
            or_dash(h.asking_for.clone()),
        ]);
    }
    print(&table.render())
}

pub fn takeover(ctx: &Context, name: &str) -> Result<()> {
    let remote = Remote::connect(&ctx.control)
        .ok_or_else(|| anyhow!("no daemon answers on {}", ctx.control.display()))?;
    let r = remote.takeover(name)?;
    if ctx.json {
        return print_json(&r);
    }
    if !r.taken_over {
        return print(&format!(
            "{name}: nothing to take over (it was let go cleanly, or this appliance holds it); it is open here\n"
        ));
    }
    print(&format!(
        "{name}: taken over from host {} (epoch {}) under epoch {}, after {} ms for its lease and {} ms of grace\n",
        r.from_host, r.from_epoch, r.epoch, r.waited_for_key_ms, r.grace_ms
    ))
}

pub fn handoff(ctx: &Context, name: &str, to: u64) -> Result<()> {
    let remote = Remote::connect(&ctx.control)
        .ok_or_else(|| anyhow!("no daemon answers on {}", ctx.control.display()))?;
    let started = std::time::Instant::now();
    let given = remote.handoff(name, to)?;
    // The receiving appliance opens it now (a client's first request would
    // otherwise), if its control socket is reachable from here.
    let target = remote
        .hosts()?
        .into_iter()
        .find(|h| h.host_id == to)
        .and_then(|h| h.registered["control"].as_str().map(PathBuf::from))
        .and_then(|c| Remote::connect(&c));
    let opened = match target {
        Some(t) => Some(t.takeover(name)?),
        None => None,
    };
    let total_ms = started.elapsed().as_millis() as u64;
    if ctx.json {
        return print_json(&serde_json::json!({
            "disk": name,
            "to": to,
            "from_epoch": given.epoch,
            "given_ms": given.took_ms,
            "opened_there": opened.as_ref().map(|o| o.epoch),
            "total_ms": total_ms,
        }));
    }
    match opened {
        Some(o) => print(&format!(
            "{name}: handed off to host {to} (now under epoch {}) in {total_ms} ms\n",
            o.epoch
        )),
        None => print(&format!(
            "{name}: given up for host {to} in {} ms; it opens it at its first client (its control socket is not reachable from here)\n",
            given.took_ms
        )),
    }
}

pub fn status(ctx: &Context) -> Result<()> {
    let remote = Remote::connect(&ctx.control).ok_or_else(|| {
        anyhow!(
            "no parallax daemon serves store {} (nothing answers on {})",
            ctx.store_path.display(),
            ctx.control.display()
        )
    })?;
    let status = remote.status()?;
    if ctx.json {
        return print_json(&status);
    }
    let mut text = key_values(&[
        ("pid", status.pid.to_string()),
        ("version", status.version),
        ("store", status.store),
        ("nbd tcp", status.nbd_tcp.unwrap_or_else(|| "-".into())),
        (
            "nbd socket",
            status.nbd_socket.unwrap_or_else(|| "-".into()),
        ),
        (
            "nbd tls",
            match (status.nbd_tls.as_str(), status.nbd_tls_verifies_clients) {
                ("", _) => "-".into(),
                (mode, true) => format!("{mode}, client certificates verified"),
                (mode, false) => mode.to_string(),
            },
        ),
        ("control", status.control),
        (
            "metrics",
            match &status.metrics_tcp {
                Some(a) => format!("GET /metrics on the control socket and http://{a}/metrics"),
                None => "GET /metrics on the control socket".into(),
            },
        ),
        ("connections", status.connections.len().to_string()),
        (
            "pool reads",
            format!("{} of disk data", format_size(status.pool_data_read_bytes)),
        ),
        (
            "entry journals",
            if status.journal {
                "on (format 2)"
            } else {
                "off"
            }
            .into(),
        ),
    ]);
    if let Some(c) = &status.cache {
        let looked = c.hits + c.misses;
        text.push_str(&key_values(&[
            (
                "read cache",
                if c.given_up {
                    format!("{}: given up after I/O errors, reads go to the pool until a restart", c.path)
                } else {
                    c.path.clone()
                },
            ),
            (
                "cache use",
                format!(
                    "{} of {} blocks ({} of {})",
                    c.entries,
                    c.slots,
                    format_size(c.entries * 4096),
                    format_size(c.slots * 4096)
                ),
            ),
            (
                "cache hits",
                format!(
                    "{} of {} reads ({:.1}%), {} copied in, {} dropped, {} failed their check, {} I/O errors",
                    c.hits,
                    looked,
                    if looked == 0 { 0.0 } else { 100.0 * c.hits as f64 / looked as f64 },
                    c.fills,
                    c.dropped,
                    c.corrupt,
                    c.errors
                ),
            ),
        ]));
    }
    if let Some(l) = &status.write_log {
        let mut state = if l.logging {
            format!(
                "logging: {} not yet on the pool, {} of {} used",
                format_size(l.dirty_bytes),
                format_size(l.used_bytes),
                format_size(l.size_bytes)
            )
        } else {
            "direct (no write-back disk open)".into()
        };
        if let Some(e) = &l.error {
            state.push_str(&format!("; error: {e}"));
        }
        text.push_str(&key_values(&[
            ("write-back log", state),
            (
                "log traffic",
                format!(
                    "{} logged, {} destaged, {} flushes, {} records replayed at start, {} destage errors",
                    format_size(l.appended_bytes),
                    format_size(l.destaged_bytes),
                    l.flushes,
                    l.replayed,
                    l.destage_errors
                ),
            ),
        ]));
    }
    if let Some(c) = &status.cluster {
        text.push_str(&key_values(&[
            ("host id", c.host_id.to_string()),
            (
                "writes",
                if c.may_write {
                    "yes".into()
                } else {
                    "no: fenced (its etcd lease may have ended)".into()
                },
            ),
            (
                "lease",
                format!("TTL {} s, incarnation {}", c.lease_ttl_s, c.incarnation),
            ),
            (
                "takeover",
                format!(
                    "{}, grace {} ms",
                    if c.takeover {
                        "automatic"
                    } else {
                        "by the operator"
                    },
                    c.takeover_grace_ms
                ),
            ),
            (
                "migration",
                if c.claim_wait_ms == 0 {
                    format!(
                        "disks held elsewhere refused; one asked for is given up after {} ms quiet",
                        c.yield_quiet_ms
                    )
                } else {
                    format!(
                        "a disk held elsewhere is asked for and waited for up to {} ms; \
                         one asked for is given up after {} ms quiet",
                        c.claim_wait_ms, c.yield_quiet_ms
                    )
                },
            ),
        ]));
    }
    if !status.connections.is_empty() {
        let mut table = Table::new(&["ID", "EXPORT", "PEER", "SINCE"]);
        for c in status.connections {
            table.row(vec![c.id.to_string(), c.export, c.peer, c.since]);
        }
        text.push('\n');
        text.push_str(&table.render());
    }
    print(&text)
}

pub fn create(ctx: &Context, name: &str, size: u64) -> Result<()> {
    ctx.write(|api| api.create(name, size)).map(drop)
}

pub fn list(ctx: &Context) -> Result<()> {
    let disks = ctx.read(|api| api.list())?;
    if ctx.json {
        return print_json(&disks);
    }
    let mut table = Table::new(&["NAME", "SIZE", "ALLOCATED", "SNAPSHOTS", "ORIGIN"]);
    for d in disks {
        table.row(vec![
            d.name,
            format_size(d.size_bytes),
            d.allocated_bytes.map_or_else(|| "-".into(), format_size),
            d.snapshots.to_string(),
            d.origin.unwrap_or_else(|| "-".into()),
        ]);
    }
    print(&table.render())
}

pub fn info(ctx: &Context, target: &DiskRef) -> Result<()> {
    if let Some(snap) = &target.snapshot {
        let s = ctx.read(|api| api.snapshot_detail(&target.disk, snap))?;
        if ctx.json {
            return print_json(&s);
        }
        return print(&key_values(&[
            ("disk", s.disk),
            ("name", s.name),
            ("id", s.id.to_string()),
            ("created", s.created),
            ("size", size_with_bytes(s.size_bytes)),
            (
                "allocated",
                size_with_bytes(s.allocated_bytes.unwrap_or_default()),
            ),
        ]));
    }
    let d: DiskInfo = ctx.read(|api| api.disk(&target.disk))?;
    if ctx.json {
        return print_json(&d);
    }
    print(&key_values(&[
        ("name", d.name),
        ("id", d.id.to_string()),
        ("size", size_with_bytes(d.size_bytes)),
        (
            "allocated",
            d.allocated_bytes
                .map_or_else(|| "- (written by another appliance)".into(), size_with_bytes),
        ),
        ("snapshots", d.snapshots.to_string()),
        ("hidden snapshots", d.hidden_snapshots.to_string()),
        ("schedule", describe_schedule(d.schedule.as_ref())),
        ("cache policy", d.cache_policy.clone()),
        (
            "writer",
            d.writer.as_ref().filter(|w| w.host_id != 0).map_or_else(
                || "-".into(),
                |w| {
                    let mut s = format!(
                        "host {} (epoch {}){}",
                        w.host_id,
                        w.epoch,
                        if w.here { ", this appliance" } else { "" }
                    );
                    if let Some(to) = w.handing_off_to {
                        s.push_str(&format!("; being handed off to host {to}"));
                    }
                    if !w.asked_for_by.is_empty() {
                        let hosts: Vec<String> =
                            w.asked_for_by.iter().map(u64::to_string).collect();
                        s.push_str(&format!("; asked for by host {}", hosts.join(", ")));
                    }
                    s
                },
            ),
        ),
        (
            "schedule run",
            d.schedule_run.map_or_else(
                || "-".into(),
                |r| {
                    format!(
                        "{} taken, {} deleted ({} freed), {} skipped, {} failed since the daemon started",
                        r.taken,
                        r.deleted,
                        format_size(r.freed_bytes),
                        r.skipped,
                        r.failed
                    )
                },
            ),
        ),
        ("origin", d.origin.unwrap_or_else(|| "-".into())),
        ("created", d.created),
        ("connections", d.connections.to_string()),
    ]))
}

pub fn schedule(ctx: &Context, disk: &str, spec: Option<ScheduleSpec>, off: bool) -> Result<()> {
    let daemon = Remote::connect(&ctx.control).is_some();
    let d: DiskInfo = if spec.is_none() && !off {
        ctx.read(|api| api.disk(disk))?
    } else {
        ctx.write(|api| api.set_schedule(disk, spec.as_ref()))?
    };
    if ctx.json {
        return print_json(&d.schedule);
    }
    let mut text = format!("{}: {}\n", d.name, describe_schedule(d.schedule.as_ref()));
    if d.schedule.is_some() && !daemon {
        text.push_str("(stored in the store; it runs while `parallax serve` runs)\n");
    }
    print(&text)
}

/// `parallax cache-policy DISK [POLICY]`.
pub fn cache_policy(ctx: &Context, disk: &str, policy: Option<&str>) -> Result<()> {
    let d: DiskInfo = match policy {
        Some(p) => ctx.write(|api| api.set_cache_policy(disk, p))?,
        None => ctx.read(|api| api.disk(disk))?,
    };
    if d.cache_policy == "write-back" {
        // Say so when nothing logs its writes: the policy is kept, and the
        // disk writes through meanwhile.
        let logs = Remote::connect(&ctx.control)
            .and_then(|r| r.status().ok())
            .is_some_and(|s| s.write_log.is_some());
        if !logs {
            eprintln!(
                "note: no appliance with a write-back log serves this store (serve --cache): {} writes through until one does",
                d.name
            );
        }
    }
    if ctx.json {
        return print_json(&d.cache_policy);
    }
    print(&format!("{}: {}\n", d.name, d.cache_policy))
}

/// `parallax forget-write-log`.
pub fn forget_write_log(ctx: &Context, host: Option<u64>) -> Result<()> {
    if let Some(host) = host {
        let remote = Remote::connect(&ctx.control).ok_or_else(|| {
            anyhow!(
                "no appliance answers on {}: --host goes through a running appliance of the cluster",
                ctx.control.display()
            )
        })?;
        remote.forget_write_log_of(host)?;
        return print(&format!(
            "host {host}'s write-back log is given up: its disks can be taken over from the pool (writes only that log held are lost; the log is dropped if host {host} comes back)\n"
        ));
    }
    if Remote::connect(&ctx.control).is_some() {
        bail!(
            "a daemon serves {}: stop it first (it has the write-back log open)",
            ctx.store_path.display()
        );
    }
    ctx.refuse_if_denied()?;
    match store_file::forget_write_log(&ctx.store_path)? {
        Some((id, bytes)) => print(&format!(
            "the store no longer needs write-back log {id:016x} (of a cache of {bytes} bytes); writes only it held are lost\n"
        )),
        None => print("the store names no write-back log: nothing to do\n"),
    }
}

pub fn snapshot(ctx: &Context, target: &DiskRef, durable: bool) -> Result<()> {
    let s = ctx.write(|api| api.snapshot(&target.disk, target.snapshot.as_deref(), durable))?;
    if ctx.json {
        return print_json(&s);
    }
    print(&format!("{}\n", DiskRef::snapshot(&s.disk, &s.name)))
}

pub fn snapshots(ctx: &Context, disk: &str) -> Result<()> {
    let rows = ctx.read(|api| api.snapshots(disk))?;
    if ctx.json {
        return print_json(&rows);
    }
    let mut table = Table::new(&["ID", "NAME", "CREATED", "SIZE", "USED", "REFER", "BY"]);
    for r in rows {
        let size = |b: Option<u64>| b.map_or_else(|| "-".into(), format_size);
        table.row(vec![
            r.id.to_string(),
            r.name,
            r.created,
            format_size(r.size_bytes),
            size(r.used_bytes),
            size(r.referenced_bytes),
            if r.scheduled { "schedule" } else { "hand" }.to_string(),
        ]);
    }
    print(&table.render())
}

pub fn clone(ctx: &Context, source: &SnapRef, new: &str) -> Result<()> {
    ctx.write(|api| api.clone_snapshot(&source.disk, &source.snapshot, new))
        .map(drop)
}

pub fn rollback(ctx: &Context, target: &SnapRef) -> Result<()> {
    ctx.write(|api| {
        api.rollback(&target.disk, &target.snapshot)
            .map_err(|mut e| {
                if e.kind == ErrorKind::Conflict {
                    e.message = format!("cannot roll back {}: {}", target.disk, e.message);
                }
                e
            })
    })
}

pub fn delete(ctx: &Context, targets: &[DiskRef]) -> Result<()> {
    ctx.write(|api| {
        for target in targets {
            let done = match &target.snapshot {
                Some(snap) => api.delete_snapshot(&target.disk, snap),
                None => api.delete_disk(&target.disk),
            };
            if let Err(mut e) = done {
                e.message = format!("cannot delete {target}: {}", e.message);
                return Err(e);
            }
        }
        Ok(())
    })
}

pub fn import(ctx: &Context, file: &Path, name: &str, size: Option<u64>) -> Result<()> {
    let file = absolute(file)?;
    ctx.write(|api| api.import(&file, name, size)).map(drop)
}

pub fn export(ctx: &Context, source: &DiskRef, file: &Path, force: bool) -> Result<()> {
    let file = absolute(file)?;
    ctx.read(|api| api.export(&source.disk, source.snapshot.as_deref(), &file, force))
}

pub fn diff(ctx: &Context, from: &SnapRef, to: &DiskRef) -> Result<()> {
    let from = SnapName {
        disk: from.disk.clone(),
        snapshot: from.snapshot.clone(),
    };
    let report = ctx.read(|api| api.diff(&from, &to.disk, to.snapshot.as_deref()))?;
    if ctx.json {
        return print_json(&report);
    }
    let mut table = Table::new(&["OFFSET", "LENGTH", "KIND"]);
    for e in &report.extents {
        table.row(vec![
            e.offset.to_string(),
            e.length.to_string(),
            e.kind.clone(),
        ]);
    }
    print(&format!(
        "{}{} changed in {} extents\n",
        if report.extents.is_empty() {
            String::new()
        } else {
            table.render()
        },
        size_with_bytes(report.changed_bytes),
        report.extents.len()
    ))
}

pub fn send(ctx: &Context, to: &SnapRef, from: Option<&str>, output: &Path) -> Result<()> {
    let to = SnapName {
        disk: to.disk.clone(),
        snapshot: to.snapshot.clone(),
    };
    let from = from
        .map(|f| match DiskRef::parse(f) {
            Ok(DiskRef {
                disk,
                snapshot: Some(snapshot),
            }) => Ok(SnapName { disk, snapshot }),
            _ if !f.contains('@') => Ok(SnapName {
                disk: to.disk.clone(),
                snapshot: f.to_string(),
            }),
            _ => Err(anyhow!("--from {f}: expected SNAP or NAME@SNAP")),
        })
        .transpose()?;
    let to_stdout = output == Path::new("-");
    if to_stdout && std::io::stdout().is_terminal() {
        bail!("the stream is binary: redirect standard output, or write it to a file with -o FILE");
    }
    let bar = stream_progress("send", None);
    let sent = if to_stdout {
        let mut out = bar.wrap_write(std::io::stdout().lock());
        ctx.read(|api| api.send(&to, from.as_ref(), &mut out))
    } else {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(output)
            .with_context(|| format!("cannot create {}", output.display()))?;
        let mut out = bar.wrap_write(&file);
        let sent = ctx
            .read(|api| api.send(&to, from.as_ref(), &mut out))
            .and_then(|r| file.sync_all().map(|()| r).map_err(Into::into));
        if sent.is_err() {
            let _ = std::fs::remove_file(output);
        }
        sent
    };
    bar.finish_and_clear();
    let report = sent?;
    let text = format!(
        "sent {}@{}{}: {} of data, {} zeroed (identity {})\n",
        to.disk,
        to.snapshot,
        from.as_ref()
            .map(|f| format!(" from {}@{}", f.disk, f.snapshot))
            .unwrap_or_default(),
        size_with_bytes(report.data_bytes),
        size_with_bytes(report.zero_bytes),
        report.identity
    );
    match (to_stdout, ctx.json) {
        // Standard output carries the stream: the report goes to stderr.
        (true, _) => {
            eprint!("{text}");
            Ok(())
        }
        (false, true) => print_json(&report),
        (false, false) => print(&text),
    }
}

pub fn receive(ctx: &Context, name: &str, input: &Path, force: bool) -> Result<()> {
    let report = if input == Path::new("-") {
        let bar = stream_progress("receive", None);
        let mut stdin = bar.wrap_read(std::io::stdin().lock());
        let received = ctx.write(|api| api.receive(name, &mut stdin, force));
        bar.finish_and_clear();
        received?
    } else {
        let file = std::fs::File::open(input)
            .with_context(|| format!("cannot open {}", input.display()))?;
        let bar = stream_progress("receive", file.metadata().ok().map(|m| m.len()));
        let mut file = bar.wrap_read(file);
        let received = ctx.write(|api| api.receive(name, &mut file, force));
        bar.finish_and_clear();
        received?
    };
    if ctx.json {
        return print_json(&report);
    }
    print(&format!(
        "received {}@{} ({}): {} of data, {} zeroed\n",
        report.disk,
        report.snapshot,
        if report.incremental {
            "incremental"
        } else {
            "full"
        },
        size_with_bytes(report.data_bytes),
        size_with_bytes(report.zero_bytes)
    ))
}

pub fn attach(ctx: &Context, target: &DiskRef, socket: &Path) -> Result<()> {
    let socket = absolute(socket)?;
    ctx.read(|api| api.attach_vhost_user(&target.to_string(), &socket))
}

pub fn detach(ctx: &Context, socket: &Path) -> Result<()> {
    let socket = absolute(socket)?;
    ctx.read(|api| api.detach_vhost_user(&socket))
}

pub fn check(ctx: &Context) -> Result<()> {
    let r = ctx.read(|api| api.check())?;
    if ctx.json {
        print_json(&r)?;
    } else {
        let mut text = key_values(&[
            ("disks", r.disks.to_string()),
            ("snapshots", r.snapshots.to_string()),
            ("tree nodes", r.tree_nodes.to_string()),
            ("data blocks", r.data_blocks.to_string()),
            ("metadata blocks", r.metadata_blocks.to_string()),
            ("leaked blocks", r.leaked_blocks.to_string()),
            ("errors", r.errors.len().to_string()),
            ("warnings", r.warnings.len().to_string()),
        ]);
        for e in &r.errors {
            text.push_str(&format!("error: {e}\n"));
        }
        for w in &r.warnings {
            text.push_str(&format!("warning: {w}\n"));
        }
        print(&text)?;
    }
    match r.errors.len() {
        0 => Ok(()),
        1 => bail!("the store has 1 error"),
        n => bail!("the store has {n} errors"),
    }
}

pub fn repair(
    ctx: &Context,
    apply: bool,
    use_generation: &[(String, u64)],
    forget: &[String],
) -> Result<()> {
    if Remote::connect(&ctx.control).is_some() {
        bail!(
            "a daemon serves {}: stop it first (repair runs on a store nothing else has open)",
            ctx.store_path.display()
        );
    }
    ctx.refuse_if_denied()?;
    let options = parallax_engine::RepairOptions {
        use_generation: use_generation.iter().cloned().collect(),
        forget: forget.iter().cloned().collect(),
        apply,
    };
    let report = {
        let opened = open_store(&ctx.store_path, Access::Write, ctx.host_id)?;
        opened.store.repair(&options)?
    };
    if ctx.json {
        print_json(&repair_json(&report))?;
    } else {
        print(&repair_text(&report))?;
    }
    if !report.needed() {
        return Ok(());
    }
    let undecided = report.undecided();
    if !undecided.is_empty() {
        let names: Vec<&str> = undecided.iter().map(|d| d.name.as_str()).collect();
        bail!(
            "repair needs your decision on {}: give --use NAME=GEN or --forget NAME for each (nothing was written)",
            names.join(", ")
        );
    }
    if !report.applied {
        bail!("the store needs repair: run `parallax repair --apply` with the same options to write it");
    }
    // What the store looks like now, opened afresh.
    let opened = open_store(&ctx.store_path, Access::Read, ctx.host_id)?;
    let check = opened.store.check()?;
    if !ctx.json {
        print(&format!(
            "repaired; check now finds {} errors and {} leaked blocks (`parallax gc` returns them)\n",
            check.errors.len(),
            check.leaked_blocks
        ))?;
    }
    if !check.is_clean() {
        bail!(
            "the store still has errors after repair: {}",
            check.errors.join("; ")
        );
    }
    Ok(())
}

fn repair_text(r: &parallax_engine::RepairReport) -> String {
    let mut text = String::new();
    if !r.needed() {
        text.push_str(&format!(
            "nothing to repair ({} disks healthy)\n",
            r.healthy
        ));
        return text;
    }
    text.push_str(&format!(
        "{} disks healthy; {} referenced blocks marked free; {} extents without a valid bitmap\n",
        r.healthy,
        r.blocks_to_claim,
        r.lost_bitmaps.len()
    ));
    for d in &r.disks {
        let fate = match (d.forget, d.chosen) {
            (true, _) => "forget".to_string(),
            (false, Some(g)) if d.decision.is_some() => {
                format!("would be served at generation {g} if you confirm")
            }
            (false, Some(g)) => format!("serve at generation {g}"),
            (false, None) => "cannot be served".to_string(),
        };
        text.push_str(&format!("disk {}: {fate}\n", d.name));
        for c in &d.copies {
            let slot = ["A", "B"][c.slot];
            match &c.generation {
                Ok(g) => text.push_str(&format!(
                    "  copy {slot}: generation {g}, reaches {} blocks, {} marked free, {} unreadable{}\n",
                    c.blocks,
                    c.marked_free,
                    c.unreadable.len(),
                    if c.servable { "" } else { ", cannot be served" }
                )),
                Err(e) => text.push_str(&format!("  copy {slot}: not valid ({e})\n")),
            }
            for u in &c.unreadable {
                text.push_str(&format!("    {u}\n"));
            }
        }
        if let Some(why) = &d.decision {
            text.push_str(&format!("  DECIDE: {why}\n"));
            let serve = match d.chosen {
                Some(g) => format!("--use {}={g} to serve it as the plan says, ", d.name),
                None => String::new(),
            };
            text.push_str(&format!(
                "  (give {serve}--use {}=GEN for another valid generation, or --forget {})\n",
                d.name, d.name
            ));
        }
    }
    text.push_str(if r.applied {
        "written\n"
    } else {
        "nothing written\n"
    });
    text
}

fn repair_json(r: &parallax_engine::RepairReport) -> serde_json::Value {
    let disks: Vec<serde_json::Value> = r
        .disks
        .iter()
        .map(|d| {
            let copies: Vec<serde_json::Value> = d
                .copies
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "slot": if c.slot == 0 { "A" } else { "B" },
                        "generation": c.generation.as_ref().ok(),
                        "invalid": c.generation.as_ref().err(),
                        "blocks": c.blocks,
                        "marked_free": c.marked_free,
                        "unreadable": c.unreadable,
                        "servable": c.servable,
                    })
                })
                .collect();
            serde_json::json!({
                "name": d.name,
                "copies": copies,
                "chosen_generation": d.chosen,
                "forget": d.forget,
                "decision_needed": d.decision,
            })
        })
        .collect();
    serde_json::json!({
        "needed": r.needed(),
        "healthy_disks": r.healthy,
        "disks": disks,
        "lost_bitmaps": r.lost_bitmaps,
        "blocks_to_claim": r.blocks_to_claim,
        "headers_to_rewrite": r.headers_to_rewrite,
        "applied": r.applied,
    })
}

pub fn gc(ctx: &Context) -> Result<()> {
    // Through a daemon, a second connection polls its progress.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = Remote::connect(&ctx.control).map(|remote| {
        let done = done.clone();
        std::thread::spawn(move || {
            let bar = parallax_server::transfer::progress_bar(
                true,
                0,
                "gc: marking",
                "{pos}/{len} blocks",
            );
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(Some(p)) = remote.gc_progress() {
                    bar.set_length(p.allocated_blocks);
                    bar.set_position(p.marked_blocks);
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            bar.finish_and_clear();
        })
    });
    let r = ctx.write(|api| api.gc());
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(p) = poller {
        let _ = p.join();
    }
    let r = r?;
    if ctx.json {
        return print_json(&r);
    }
    print(&format!(
        "freed {} ({} blocks)\n",
        format_size(r.freed_bytes),
        r.freed_blocks
    ))
}

pub fn df(ctx: &Context, scan: bool) -> Result<()> {
    let s = ctx.read(|api| api.df(scan))?;
    let scan_failed = s.scan.as_ref().is_some_and(|r| !r.matches);
    if ctx.json {
        print_json(&s)?;
        if scan_failed {
            bail!("the full scan found different figures");
        }
        return Ok(());
    }
    let percent = s.used_bytes as f64 * 100.0 / s.capacity_bytes.max(1) as f64;
    let mut text = key_values(&[
        ("capacity", format_size(s.capacity_bytes)),
        (
            "used",
            format!("{} ({percent:.1}%)", format_size(s.used_bytes)),
        ),
        ("free", format_size(s.free_bytes)),
    ]);
    if !s.disks.is_empty() {
        let mut table = Table::new(&["NAME", "SIZE", "USED", "REFER", "LIVE-ONLY", "SNAPSHOTS"]);
        for d in s.disks {
            table.row(vec![
                d.name,
                format_size(d.size_bytes),
                format_size(d.used_bytes),
                format_size(d.referenced_bytes),
                format_size(d.live_used_bytes),
                d.snapshots.to_string(),
            ]);
        }
        text.push('\n');
        text.push_str(&table.render());
    }
    if let Some(r) = &s.scan {
        text.push_str(if r.matches {
            "\nfull scan: every disk and snapshot figure matches\n"
        } else {
            "\nfull scan: figures differ\n"
        });
        for d in &r.differences {
            text.push_str(&format!("  {d}\n"));
        }
    }
    print(&text)?;
    if scan_failed {
        bail!("the full scan found different figures");
    }
    Ok(())
}
