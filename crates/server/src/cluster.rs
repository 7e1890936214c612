//! Cluster mode: the engine's [`Coordinator`] on a real etcd (see
//! `docs/CLUSTER.md` for the protocol and every key).
//!
//! - **Lease.** The appliance holds one etcd lease (TTL `--lease-ttl`),
//!   kept alive every TTL/3 by a task on the coordinator's own runtime.
//!   Its *fencing deadline* is the send time of the last keep-alive the
//!   server answered, plus the TTL, minus a fifth of it, on the monotonic
//!   clock: past it, [`Coordinator::may_write`] is false and the engine
//!   writes nothing more (the lease may have ended on the server by then).
//!   A keep-alive answered with TTL 0 means the lease is gone: the
//!   appliance takes a new one and registers again, under a new
//!   *incarnation*; the engine then takes back the writer keys of the
//!   disks no other appliance took meanwhile (`Store::settle`).
//! - **Membership.** `hosts/<id>` under the lease, created only if absent
//!   (two live appliances never share a host id).
//! - **Writer keys** `disks/<vdi-id>/writer` under the lease, created by a
//!   transaction that requires the key to be absent; the epoch is the
//!   key's create revision. A clean release deletes it and records its
//!   epoch in `disks/<vdi-id>/released` (no lease) in one transaction.
//! - **Extents** `extents/<index>`, without lease, created the same way.
//! - **The catalogue lock** is etcd's lock service on `catalog`, bound to
//!   the lease (one holder per lease: the engine asks for it from one
//!   thread at a time).
//! - **Hand-offs** `disks/<vdi-id>/handoff` = `<to-host>:<until-unix-ms>`
//!   under the giver's lease, put in the txn that gives the key back: other
//!   hosts are refused the key until then; the target deletes it in the
//!   txn that takes the key.
//! - **Pins** `pins/<vdi-id>/<snapshot-id>/<host-id>` under the lease: a
//!   snapshot this appliance reads without holding its disk.
//! - **Requests** `wanted/<vdi-id>/<host-id>` under the lease: a client of
//!   this appliance waits for a disk another one holds (a migrating VM);
//!   the holder hands it over once its own clients are done with it.
//!
//! The engine calls from any thread (blocking pool, runtime workers): every
//! call runs on the coordinator's own runtime (one worker thread) and is
//! waited for on a channel, bounded by `RPC_TIMEOUT`.

use anyhow::{anyhow, Context, Result};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LockOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse,
};
use parallax_engine::{CatalogLock, Coordinator, Error as EngineError};
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// An etcd call that takes longer fails (the caller sees an error, never
/// a hang).
const RPC_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an appliance starting waits for etcd to answer.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

/// How to reach etcd and what this appliance is.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub endpoints: Vec<String>,
    pub lease_ttl: Duration,
    pub host_id: u64,
    /// Take over, without being asked, the disks of appliances that left
    /// without letting them go (`--takeover`).
    pub takeover: bool,
    /// How long a takeover waits, holding the disk's key, for what the old
    /// holder may still have in flight (`--takeover-grace`).
    pub takeover_grace: Duration,
    /// How long a client's request waits for a disk another appliance
    /// holds (`--claim-wait`; zero: such a disk is refused at connection).
    pub claim_wait: Duration,
    /// How long this appliance's clients of a disk another one asks for
    /// must have been done with it before it is given up (`--yield-quiet`).
    pub yield_quiet: Duration,
    /// What `hosts/<id>` says about this appliance (JSON).
    pub description: String,
}

/// See the module documentation.
pub struct EtcdCoordinator {
    host_id: u64,
    prefix: String,
    client: Client,
    runtime: tokio::runtime::Runtime,
    lease: Arc<LeaseState>,
    options: ClusterOptions,
}

/// The lease this appliance is on, shared with its keep-alive task.
struct LeaseState {
    /// The etcd lease id.
    id: AtomicI64,
    /// Grows with each new lease after a lost one (see
    /// [`Coordinator::incarnation`]).
    incarnation: AtomicU64,
    /// Nanoseconds after `base` past which this host must not write.
    deadline_ns: AtomicU64,
    base: Instant,
    /// The lease is known to be gone (and no new one yet), or the
    /// appliance left.
    lost: AtomicBool,
    /// Left for good (a clean stop): no new lease is taken.
    left: AtomicBool,
}

impl LeaseState {
    fn id(&self) -> i64 {
        self.id.load(Ordering::SeqCst)
    }

    /// A lease asked for at `asked` (or kept alive by a keep-alive sent
    /// then) is good until `asked + ttl - margin`.
    fn good_until(&self, asked: Instant, ttl: Duration, margin: Duration) {
        let until = asked + ttl - margin;
        self.deadline_ns.store(
            until.duration_since(self.base).as_nanos() as u64,
            Ordering::SeqCst,
        );
    }
}

impl ClusterOptions {
    /// The longest a request of this appliance may stay in flight to the
    /// pool (enforced on an NBD pool). Its last write can then land at most
    /// this long after its fencing deadline, which comes a fifth of the TTL
    /// before its lease can end; a takeover waits for the lease's end and
    /// then the grace. Half of what that leaves, for safety.
    pub fn in_flight_bound(&self) -> Duration {
        (self.lease_ttl / 5 + self.takeover_grace) / 2
    }
}

impl std::fmt::Debug for EtcdCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EtcdCoordinator(host {}, {})", self.host_id, self.prefix)
    }
}

fn engine_error(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Io {
        context: format!("{what} through etcd"),
        error: std::io::Error::other(e.to_string()),
    }
}

impl EtcdCoordinator {
    /// See [`Coordinator::released_epoch`].
    pub fn released_epoch_of(&self, vdi_id: u64) -> parallax_engine::Result<u64> {
        let key = format!("{}disks/{vdi_id}/released", self.prefix);
        let mut client = self.client.clone();
        let resp = self.call("reading a disk's last release", async move {
            client.get(key, None).await
        })?;
        match resp.kvs().first() {
            None => Ok(0),
            Some(kv) => kv
                .value_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| engine_error("reading a disk's last release", "not a number")),
        }
    }

    /// Gives disk `vdi_id`'s writer key back and records the clean release
    /// (plus `also`) in one step, only if the key is still the one of
    /// `epoch`.
    fn release_txn(&self, vdi_id: u64, epoch: u64, also: Option<TxnOp>) -> Txn {
        let key = format!("{}disks/{vdi_id}/writer", self.prefix);
        let released = format!("{}disks/{vdi_id}/released", self.prefix);
        let mut ops = vec![
            TxnOp::delete(key.clone(), None),
            TxnOp::put(released, epoch.to_string(), None),
        ];
        ops.extend(also);
        Txn::new()
            .when([Compare::create_revision(
                key,
                CompareOp::Equal,
                epoch as i64,
            )])
            .and_then(ops)
    }

    /// This appliance's standing, for `parallax status`.
    pub fn status(&self) -> crate::api::ClusterStatus {
        crate::api::ClusterStatus {
            host_id: self.host_id,
            may_write: self.may_write(),
            incarnation: self.lease.incarnation.load(Ordering::SeqCst),
            lease_ttl_s: self.options.lease_ttl.as_secs(),
            takeover: self.options.takeover,
            takeover_grace_ms: self.options.takeover_grace.as_millis() as u64,
            claim_wait_ms: self.options.claim_wait.as_millis() as u64,
            yield_quiet_ms: self.options.yield_quiet.as_millis() as u64,
        }
    }

    /// What this appliance was started with.
    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// Connects, takes a lease, registers this host under `store_id`'s
    /// prefix and starts keeping the lease alive.
    pub fn connect(options: &ClusterOptions, store_id: u64) -> Result<Arc<EtcdCoordinator>> {
        if options.host_id == 0 {
            return Err(anyhow!("--host-id must be at least 1 in cluster mode"));
        }
        let ttl = options.lease_ttl.as_secs().max(2) as i64;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("parallax-etcd")
            .enable_all()
            .build()
            .context("starting the etcd client's runtime")?;
        let endpoints = options.endpoints.clone();
        let prefix = format!("/parallax/{store_id:016x}/");
        let host_key = format!("{prefix}hosts/{}", options.host_id);
        let description = options.description.clone();
        let (client, lease, base) = runtime.block_on(async {
            let connect = ConnectOptions::new()
                .with_connect_timeout(RPC_TIMEOUT)
                .with_timeout(RPC_TIMEOUT);
            // Services start in any order: wait for etcd a while.
            let reach_by = Instant::now() + CONNECT_PATIENCE;
            let mut client = loop {
                let attempt = async {
                    let mut c = Client::connect(&endpoints, Some(connect.clone())).await?;
                    c.status().await?;
                    Ok::<_, etcd_client::Error>(c)
                };
                match attempt.await {
                    Ok(c) => break c,
                    Err(e) if Instant::now() > reach_by => {
                        return Err(anyhow!(
                            "cannot reach etcd at {} within {}s: {e}",
                            endpoints.join(","),
                            CONNECT_PATIENCE.as_secs()
                        ));
                    }
                    Err(_) => {
                        info!("waiting for etcd at {}", endpoints.join(","));
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            };
            // A previous run of this host that died keeps its key until its
            // lease expires: wait that long, not longer. Each attempt takes
            // a fresh lease (one nobody keeps alive while waiting would
            // expire meanwhile).
            let give_up = Instant::now() + Duration::from_secs(ttl as u64 + 2);
            loop {
                // The fencing deadline counts from before the grant was
                // asked for: the lease cannot have started earlier.
                let asked = Instant::now();
                let reg = (host_key.clone(), description.clone());
                if let Some(lease) = register(&mut client, ttl, &reg).await? {
                    break anyhow::Ok((client, lease, asked));
                }
                if Instant::now() > give_up {
                    return Err(anyhow!(
                        "another live appliance already uses host id {} on this store ({host_key})",
                        options.host_id
                    ));
                }
                info!(
                    host = options.host_id,
                    "host id registered by a previous run: waiting for its lease to expire"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })?;
        let margin = Duration::from_secs(ttl as u64) / 5;
        let state = Arc::new(LeaseState {
            id: AtomicI64::new(lease),
            incarnation: AtomicU64::new(1),
            deadline_ns: AtomicU64::new(0),
            base,
            lost: AtomicBool::new(false),
            left: AtomicBool::new(false),
        });
        state.good_until(base, Duration::from_secs(ttl as u64), margin);
        let c = Arc::new(EtcdCoordinator {
            host_id: options.host_id,
            prefix,
            client: client.clone(),
            runtime,
            lease: state.clone(),
            options: options.clone(),
        });
        c.runtime.spawn(keep_alive(
            client,
            state,
            Duration::from_secs(ttl as u64),
            margin,
            (host_key, description),
        ));
        info!(host = options.host_id, lease, ttl, "joined the cluster");
        Ok(c)
    }

    /// Runs `f` on the coordinator's runtime and waits for it.
    fn call<T: Send + 'static>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> parallax_engine::Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let r = tokio::time::timeout(RPC_TIMEOUT, f).await;
            let _ = tx.send(r);
        });
        match rx.recv_timeout(RPC_TIMEOUT + Duration::from_secs(1)).ok() {
            Some(Ok(Ok(v))) => Ok(v),
            Some(Ok(Err(e))) => {
                if lease_gone(&e) {
                    // Fenced at once; the keep-alive task takes a new one.
                    self.lease.lost.store(true, Ordering::SeqCst);
                }
                Err(engine_error(what, e))
            }
            Some(Err(_)) => Err(engine_error(what, "no answer within 5 s")),
            None => Err(engine_error(what, "the etcd client stopped")),
        }
    }

    /// Leaves the cluster (clean shutdown, after the last commit): the
    /// lease is revoked, and with it this host's registration, writer keys
    /// and lock.
    pub fn leave(&self) {
        let mut client = self.client.clone();
        let lease = self.lease.id();
        self.lease.left.store(true, Ordering::SeqCst);
        self.lease.lost.store(true, Ordering::SeqCst);
        match self.call("revoking the lease", async move {
            client.lease_revoke(lease).await
        }) {
            Ok(_) => info!(host = self.host_id, "left the cluster"),
            Err(e) => warn!("{e} (the lease expires on its own)"),
        }
    }

    /// Every registered appliance: (host id, its description).
    pub fn hosts(&self) -> parallax_engine::Result<Vec<(u64, String)>> {
        let mut client = self.client.clone();
        let key = format!("{}hosts/", self.prefix);
        let resp = self.call("listing the hosts", async move {
            client.get(key, Some(GetOptions::new().with_prefix())).await
        })?;
        let mut hosts: Vec<(u64, String)> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let id = kv.key_str().ok()?.rsplit('/').next()?.parse().ok()?;
                Some((id, kv.value_str().ok()?.to_string()))
            })
            .collect();
        hosts.sort();
        Ok(hosts)
    }

    /// Disk `vdi_id`'s hand-off in progress (the host it is reserved for)
    /// and the hosts asking for it (for `parallax info`).
    pub fn transfers_of(&self, vdi_id: u64) -> parallax_engine::Result<(Option<u64>, Vec<u64>)> {
        let (handoff, wanted) = (
            format!("{}disks/{vdi_id}/handoff", self.prefix),
            format!("{}wanted/{vdi_id}/", self.prefix),
        );
        let mut client = self.client.clone();
        let (handoff, wanted) = self.call("reading a disk's transfers", async move {
            let h = client.get(handoff, None).await?;
            let w = client
                .get(
                    wanted,
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await?;
            Ok::<_, etcd_client::Error>((h, w))
        })?;
        let to = handoff.kvs().first().and_then(|kv| {
            let value = kv.value_str().ok()?;
            let mut parts = value.split(':').map(|p| p.parse::<u64>().unwrap_or(0));
            let (to, until) = (parts.next()?, parts.next()?);
            (until > unix_ms()).then_some(to)
        });
        Ok((
            to,
            wanted
                .kvs()
                .iter()
                .filter_map(|kv| key_field(kv, 0))
                .collect(),
        ))
    }

    /// What every appliance holds, hands off and asks for, from etcd (for
    /// `parallax hosts`).
    pub fn overview(&self) -> parallax_engine::Result<Overview> {
        let get = |what: &'static str, key: String| {
            let mut client = self.client.clone();
            self.call(what, async move {
                client.get(key, Some(GetOptions::new().with_prefix())).await
            })
        };
        let hosts = get("listing the hosts", format!("{}hosts/", self.prefix))?;
        let disks = get("listing the writers", format!("{}disks/", self.prefix))?;
        let wanted = get("listing requests", format!("{}wanted/", self.prefix))?;
        let mut overview = Overview::default();
        for kv in hosts.kvs() {
            let Some(id) = key_field(kv, 0) else { continue };
            let mut client = self.client.clone();
            let lease = kv.lease();
            let left = self
                .call("reading a lease", async move {
                    client.lease_time_to_live(lease, None).await
                })
                .ok()
                .map(|r| (r.ttl().max(0) as u64) * 1000);
            let description = kv.value_str().unwrap_or("").to_string();
            overview.hosts.push((id, description, left, lease));
        }
        overview.hosts.sort();
        for kv in disks.kvs() {
            let (Some(disk), Ok(value)) = (key_field(kv, 1), kv.value_str()) else {
                continue;
            };
            match kv.key_str().ok().and_then(|k| k.rsplit('/').next()) {
                Some("writer") => {
                    if let Ok(host) = value.parse() {
                        overview
                            .writers
                            .push((disk, host, kv.create_revision() as u64));
                    }
                }
                Some("handoff") => {
                    let mut parts = value.split(':').map(|p| p.parse::<u64>().unwrap_or(0));
                    let (to, until) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
                    // The giver is the host whose lease the reservation is under.
                    let from = overview
                        .hosts
                        .iter()
                        .find(|h| h.3 == kv.lease())
                        .map_or(0, |h| h.0);
                    overview.handoffs.push((disk, from, to, until));
                }
                _ => {}
            }
        }
        for kv in wanted.kvs() {
            if let (Some(host), Some(disk)) = (key_field(kv, 0), key_field(kv, 1)) {
                overview.requests.push((disk, host));
            }
        }
        Ok(overview)
    }

    /// Puts `key` (empty) under this host's lease; refused once this host
    /// may no longer write.
    fn put_under_lease(&self, what: &str, key: String) -> parallax_engine::Result<()> {
        if !self.may_write() {
            return Err(self.fenced());
        }
        let mut client = self.client.clone();
        let lease = self.lease.id();
        self.call(what, async move {
            client
                .put(key, "", Some(PutOptions::new().with_lease(lease)))
                .await
        })
        .map(drop)
    }

    /// Deletes a key put by [`EtcdCoordinator::put_under_lease`], best
    /// effort: it goes with the lease at worst.
    fn delete_lease_key(&self, what: &str, key: String) {
        let mut client = self.client.clone();
        if let Err(e) = self.call(what, async move { client.delete(key, None).await }) {
            warn!("{e}");
        }
    }

    /// Creates `key` = this host's id (no lease) unless it exists:
    /// `Created`, or `Exists(the key as it is)`. Refused once this host may
    /// no longer write.
    fn create_if_absent(&self, what: &str, key: String) -> parallax_engine::Result<Creation> {
        if !self.may_write() {
            return Err(self.fenced());
        }
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), self.host_id.to_string(), None)])
            .or_else([TxnOp::get(key, None)]);
        let mut client = self.client.clone();
        let resp = self.call(what, async move { client.txn(txn).await })?;
        if resp.succeeded() {
            return Ok(Creation::Created);
        }
        let existing = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().cloned(),
            _ => None,
        });
        Ok(existing.map_or(Creation::Vanished, Creation::Exists))
    }

    /// This appliance's lease cannot have ended: it may write to the pool.
    pub fn may_write(&self) -> bool {
        let l = &self.lease;
        !l.lost.load(Ordering::SeqCst)
            && (l.base.elapsed().as_nanos() as u64) < l.deadline_ns.load(Ordering::SeqCst)
    }

    fn fenced(&self) -> EngineError {
        EngineError::Fenced(format!(
            "host {}: its etcd lease {} may have ended (no keep-alive answered in time)",
            self.host_id,
            self.lease.id()
        ))
    }
}

/// Keeps the lease alive every TTL/3, moving the fencing deadline on
/// after each answered keep-alive. When the lease is gone (a keep-alive
/// answered with TTL 0: it expired while etcd was out of reach), the
/// appliance is fenced, then takes a new lease and registers again; the
/// incarnation grows *before* writes are allowed again, so that disks
/// opened under the old lease stay fenced until the engine takes their
/// keys back (`Store::settle`).
async fn keep_alive(
    mut client: Client,
    state: Arc<LeaseState>,
    ttl: Duration,
    margin: Duration,
    registration: (String, String),
) {
    let mut keeper = None;
    loop {
        if state.left.load(Ordering::SeqCst) {
            return;
        }
        let lease = state.id();
        if keeper.is_none() {
            let opened = tokio::time::timeout(ttl / 3, client.lease_keep_alive(lease)).await;
            match opened
                .unwrap_or_else(|_| Err(etcd_client::Error::InvalidArgs("timed out".into())))
            {
                Ok(k) => keeper = Some(k),
                Err(e) if lease_gone(&e) => {
                    warn!(
                        lease,
                        "the etcd lease is gone: this appliance writes nothing until it has a new one"
                    );
                    state.lost.store(true, Ordering::SeqCst);
                    renew_lease(&mut client, &state, ttl, margin, &registration).await;
                    continue;
                }
                Err(e) => {
                    warn!("etcd keep-alive stream: {e}");
                    tokio::time::sleep(KEEP_ALIVE_RETRY).await;
                    continue;
                }
            }
        }
        if let Some((k, stream)) = keeper.as_mut() {
            let sent = Instant::now();
            let answered = async {
                k.keep_alive().await?;
                stream.message().await
            };
            match tokio::time::timeout(ttl / 3, answered).await {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => state.good_until(sent, ttl, margin),
                Ok(Ok(Some(_))) => {
                    warn!(
                        lease,
                        "the etcd lease is gone: this appliance writes nothing until it has a new one"
                    );
                    state.lost.store(true, Ordering::SeqCst);
                    keeper = None;
                    renew_lease(&mut client, &state, ttl, margin, &registration).await;
                    continue;
                }
                other => {
                    // etcd restarting, or out of reach: try again soon (the
                    // fencing deadline does not move meanwhile).
                    warn!(lease, "etcd keep-alive failed: {other:?}");
                    keeper = None;
                    tokio::time::sleep(KEEP_ALIVE_RETRY).await;
                    continue;
                }
            }
        }
        tokio::time::sleep(ttl / 3).await;
    }
}

/// After a failed keep-alive, how soon the next try comes (a lease whose
/// keep-alives failed for long enough fences its holder: it must not wait a
/// whole period once etcd is back).
const KEEP_ALIVE_RETRY: Duration = Duration::from_millis(250);

/// Takes a lease of `ttl` seconds and registers `registration` (host key,
/// description) under it if the key is absent: the lease, or `None` (the
/// lease given back) when another lease holds the key.
async fn register(
    client: &mut Client,
    ttl: i64,
    (host_key, description): &(String, String),
) -> Result<Option<i64>, etcd_client::Error> {
    let lease = client.lease_grant(ttl, None).await?.id();
    let txn = Txn::new()
        .when([Compare::create_revision(
            host_key.clone(),
            CompareOp::Equal,
            0,
        )])
        .and_then([TxnOp::put(
            host_key.clone(),
            description.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )]);
    if client.txn(txn).await?.succeeded() {
        return Ok(Some(lease));
    }
    let _ = client.lease_revoke(lease).await;
    Ok(None)
}

/// Whether etcd answered that the lease does not exist (any more).
fn lease_gone(e: &etcd_client::Error) -> bool {
    // etcd-client reports it as a keep-alive error or a gRPC status,
    // with etcd's own words.
    e.to_string().contains("lease not found")
}

/// Takes a new lease and registers this host again under it, retrying
/// until etcd answers (or the appliance leaves).
async fn renew_lease(
    client: &mut Client,
    state: &LeaseState,
    ttl: Duration,
    margin: Duration,
    registration: &(String, String),
) {
    let host_key = &registration.0;
    loop {
        if state.left.load(Ordering::SeqCst) {
            return;
        }
        let asked = Instant::now();
        let attempt = register(client, ttl.as_secs() as i64, registration);
        match tokio::time::timeout(RPC_TIMEOUT, attempt).await {
            Ok(Ok(Some(lease))) => {
                state.id.store(lease, Ordering::SeqCst);
                state.good_until(asked, ttl, margin);
                // First the new incarnation, then writes: a disk opened
                // under the old lease must not pass for a current one.
                state.incarnation.fetch_add(1, Ordering::SeqCst);
                state.lost.store(false, Ordering::SeqCst);
                info!(
                    lease,
                    "a new etcd lease: disks no other appliance took are taken back"
                );
                return;
            }
            Ok(Ok(None)) => warn!("{host_key} is registered by someone else; retrying"),
            Ok(Err(e)) => warn!("taking a new etcd lease: {e}"),
            Err(_) => warn!("taking a new etcd lease: timed out"),
        }
        tokio::time::sleep(ttl / 3).await;
    }
}

/// What [`EtcdCoordinator::create_if_absent`] found.
enum Creation {
    Created,
    Exists(etcd_client::KeyValue),
    /// It existed, and was gone by the time it was read.
    Vanished,
}

/// How long a hand-off reserves a disk for its target.
const HANDOFF_RESERVATION: Duration = Duration::from_secs(60);

/// What `parallax hosts` shows, as etcd has it.
#[derive(Debug, Default)]
pub struct Overview {
    /// (host id, its registration, lease left in ms, lease id).
    pub hosts: Vec<(u64, String, Option<u64>, i64)>,
    /// (disk id, host, epoch) of every writer key.
    pub writers: Vec<(u64, u64, u64)>,
    /// (disk id, from host, to host, until Unix ms) of every hand-off.
    pub handoffs: Vec<(u64, u64, u64, u64)>,
    /// (disk id, host asking) of every request.
    pub requests: Vec<(u64, u64)>,
}

/// The number `n` places from the end of `kv`'s key (`a/b/7` ─▶ 7 at 0).
fn key_field(kv: &etcd_client::KeyValue, n: usize) -> Option<u64> {
    kv.key_str().ok()?.rsplit('/').nth(n)?.parse().ok()
}

/// Milliseconds since the Unix epoch (hand-off reservations carry their end:
/// hosts' clocks are assumed to agree within seconds).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Releases etcd's lock on the catalogue.
struct EtcdCatalogLock {
    coordinator: Arc<EtcdCoordinator>,
    key: Vec<u8>,
}

impl Drop for EtcdCatalogLock {
    fn drop(&mut self) {
        let mut client = self.coordinator.client.clone();
        let key = self.key.clone();
        if let Err(e) = self
            .coordinator
            .call("releasing the catalogue lock", async move {
                client.unlock(key).await
            })
        {
            // It goes with the lease at worst.
            warn!("{e}");
        }
    }
}

/// The coordinator behind an `Arc`, so that the catalogue lock's guard can
/// hold it.
#[derive(Debug, Clone)]
pub struct Etcd(pub Arc<EtcdCoordinator>);

impl Coordinator for Etcd {
    fn host_id(&self) -> u64 {
        self.0.host_id
    }

    fn acquire_writer(&self, vdi_id: u64) -> parallax_engine::Result<u64> {
        let c = &self.0;
        if !c.may_write() {
            return Err(c.fenced());
        }
        let key = format!("{}disks/{vdi_id}/writer", c.prefix);
        let handoff = format!("{}disks/{vdi_id}/handoff", c.prefix);
        // A hand-off in progress reserves the disk for its target: read the
        // reservation, and create the key only if it did not change since.
        let mut client = c.client.clone();
        let (h, what) = (handoff.clone(), "reading a disk's hand-off");
        let resp = c.call(what, async move { client.get(h, None).await })?;
        let reservation = resp.kvs().first().map(|kv| {
            let v = kv.value_str().unwrap_or("");
            let mut parts = v.split(':').map(|p| p.parse::<u64>().unwrap_or(0));
            let (to, until) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
            (kv.mod_revision(), to, until)
        });
        if let Some((_, to, until)) = reservation {
            if to != c.host_id && unix_ms() < until {
                return Err(EngineError::Busy(format!(
                    "the disk is being handed off to host {to}"
                )));
            }
        }
        let unchanged = match reservation {
            Some((rev, _, _)) => Compare::mod_revision(handoff.clone(), CompareOp::Equal, rev),
            None => Compare::create_revision(handoff.clone(), CompareOp::Equal, 0),
        };
        let mut then = vec![TxnOp::put(
            key.clone(),
            c.host_id.to_string(),
            Some(PutOptions::new().with_lease(c.lease.id())),
        )];
        if reservation.is_some() {
            then.push(TxnOp::delete(handoff, None));
        }
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                unchanged,
            ])
            .and_then(then)
            .or_else([TxnOp::get(key, None)]);
        let mut client = c.client.clone();
        let what = "taking a writer key";
        let resp = c.call(what, async move { client.txn(txn).await })?;
        if resp.succeeded() {
            return resp
                .header()
                .map(|h| h.revision() as u64)
                .ok_or_else(|| engine_error(what, "no revision in the answer"));
        }
        let existing = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().cloned(),
            _ => None,
        });
        match existing {
            // Ours only under this lease: a previous run of this host (same
            // id, older lease) is another writer.
            Some(kv) if kv.lease() == c.lease.id() => Ok(kv.create_revision() as u64),
            Some(kv) => Err(EngineError::Busy(format!(
                "the disk is written by host {}",
                kv.value_str().unwrap_or("?")
            ))),
            // Gone meanwhile, or the reservation changed: look again.
            None => self.acquire_writer(vdi_id),
        }
    }

    fn hand_over(&self, vdi_id: u64, epoch: u64, to: u64) -> parallax_engine::Result<()> {
        let c = &self.0;
        if !c.may_write() {
            return Err(c.fenced());
        }
        let handoff = format!("{}disks/{vdi_id}/handoff", c.prefix);
        let until = unix_ms() + HANDOFF_RESERVATION.as_millis() as u64;
        let txn = c.release_txn(
            vdi_id,
            epoch,
            Some(TxnOp::put(
                handoff,
                format!("{to}:{until}"),
                Some(PutOptions::new().with_lease(c.lease.id())),
            )),
        );
        let mut client = c.client.clone();
        let resp = c.call(
            "handing a writer key over",
            async move { client.txn(txn).await },
        )?;
        if !resp.succeeded() {
            return Err(EngineError::Busy(
                "the disk's writer key is no longer this appliance's".into(),
            ));
        }
        Ok(())
    }

    fn release_writer(&self, vdi_id: u64, epoch: u64) {
        let c = &self.0;
        let txn = c.release_txn(vdi_id, epoch, None);
        let mut client = c.client.clone();
        if let Err(e) = c.call(
            "releasing a writer key",
            async move { client.txn(txn).await },
        ) {
            // It goes with the lease at worst.
            warn!("{e}");
        }
    }

    fn released_epoch(&self, vdi_id: u64) -> parallax_engine::Result<u64> {
        self.0.released_epoch_of(vdi_id)
    }

    fn may_write(&self) -> bool {
        self.0.may_write()
    }

    fn incarnation(&self) -> u64 {
        self.0.lease.incarnation.load(Ordering::SeqCst)
    }

    fn lock_catalog(&self) -> parallax_engine::Result<CatalogLock> {
        let c = &self.0;
        if !self.may_write() {
            return Err(c.fenced());
        }
        let name = format!("{}catalog", c.prefix);
        let mut client = c.client.clone();
        let lease = c.lease.id();
        let resp = c.call("taking the catalogue lock", async move {
            client
                .lock(name, Some(LockOptions::new().with_lease(lease)))
                .await
        })?;
        Ok(CatalogLock::new(EtcdCatalogLock {
            coordinator: c.clone(),
            key: resp.key().to_vec(),
        }))
    }

    fn pin_snapshot(&self, vdi_id: u64, snap: u64) -> parallax_engine::Result<()> {
        let c = &self.0;
        let key = format!("{}pins/{vdi_id}/{snap}/{}", c.prefix, c.host_id);
        c.put_under_lease("pinning a snapshot", key)
    }

    fn unpin_snapshot(&self, vdi_id: u64, snap: u64) {
        let c = &self.0;
        let key = format!("{}pins/{vdi_id}/{snap}/{}", c.prefix, c.host_id);
        c.delete_lease_key("unpinning a snapshot", key);
    }

    fn pinned_snapshots(&self, vdi_id: u64) -> parallax_engine::Result<HashSet<u64>> {
        let c = &self.0;
        let prefix = format!("{}pins/{vdi_id}/", c.prefix);
        let mut client = c.client.clone();
        let resp = c.call("reading the pins of a disk", async move {
            client
                .get(
                    prefix,
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await
        })?;
        // pins/<vdi>/<snapshot>/<host>
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| key_field(kv, 1))
            .collect())
    }

    fn request_writer(&self, vdi_id: u64) -> parallax_engine::Result<()> {
        let c = &self.0;
        let key = format!("{}wanted/{vdi_id}/{}", c.prefix, c.host_id);
        c.put_under_lease("asking for a disk", key)
    }

    fn withdraw_request(&self, vdi_id: u64) {
        let c = &self.0;
        let key = format!("{}wanted/{vdi_id}/{}", c.prefix, c.host_id);
        c.delete_lease_key("withdrawing a request for a disk", key);
    }

    fn writer_requests(&self) -> parallax_engine::Result<Vec<(u64, u64)>> {
        let c = &self.0;
        let prefix = format!("{}wanted/", c.prefix);
        let mut client = c.client.clone();
        let resp = c.call("reading the requests for disks", async move {
            let options = GetOptions::new()
                .with_prefix()
                .with_keys_only()
                .with_sort(SortTarget::Create, SortOrder::Ascend);
            client.get(prefix, Some(options)).await
        })?;
        // wanted/<vdi>/<host>
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| Some((key_field(kv, 1)?, key_field(kv, 0)?)))
            .collect())
    }

    fn writer_host(&self, vdi_id: u64) -> parallax_engine::Result<Option<u64>> {
        let c = &self.0;
        let key = format!("{}disks/{vdi_id}/writer", c.prefix);
        let mut client = c.client.clone();
        let resp = c.call("reading a disk's writer", async move {
            client.get(key, None).await
        })?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok()?.parse().ok()))
    }

    fn name_write_log(&self, log_id: u64, locator: u64) -> parallax_engine::Result<()> {
        let c = &self.0;
        if !c.may_write() {
            return Err(c.fenced());
        }
        // Not under the lease: the log's records outlive this run.
        let key = format!("{}logs/{}", c.prefix, c.host_id);
        let mut client = c.client.clone();
        c.call("naming this host's write-back log", async move {
            client
                .put(key, format!("{log_id:016x} {locator}"), None)
                .await
        })?;
        Ok(())
    }

    fn unname_write_log(&self) -> parallax_engine::Result<()> {
        let c = &self.0;
        if !c.may_write() {
            return Err(c.fenced());
        }
        let key = format!("{}logs/{}", c.prefix, c.host_id);
        let mut client = c.client.clone();
        c.call("unnaming this host's write-back log", async move {
            client.delete(key, None).await
        })?;
        Ok(())
    }

    fn write_log_of(&self, host: u64) -> parallax_engine::Result<Option<(u64, u64)>> {
        let c = &self.0;
        let key = format!("{}logs/{host}", c.prefix);
        let mut client = c.client.clone();
        let resp = c.call("reading a host's write-back log", async move {
            client.get(key, None).await
        })?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        let parsed = kv.value_str().ok().and_then(|v| {
            let (id, locator) = v.split_once(' ')?;
            Some((u64::from_str_radix(id, 16).ok()?, locator.parse().ok()?))
        });
        parsed
            .map(Some)
            .ok_or_else(|| engine_error("reading a host's write-back log", "not a log id"))
    }

    fn forget_write_log_of(&self, host: u64) -> parallax_engine::Result<()> {
        let c = &self.0;
        let log_key = format!("{}logs/{host}", c.prefix);
        let host_key = format!("{}hosts/{host}", c.prefix);
        let mut client = c.client.clone();
        // Only while the host holds no lease, in one step with the check.
        let txn = Txn::new()
            .when([Compare::create_revision(host_key, CompareOp::Equal, 0)])
            .and_then([TxnOp::delete(log_key, None)]);
        let resp = c.call("giving up a host's write-back log", async move {
            client.txn(txn).await
        })?;
        if !resp.succeeded() {
            return Err(EngineError::Busy(format!(
                "host {host} is running: its write-back log is its own to drain"
            )));
        }
        Ok(())
    }

    fn claim_extent(&self, index: u64) -> parallax_engine::Result<bool> {
        let c = &self.0;
        let key = format!("{}extents/{index}", c.prefix);
        // Extents have no lease: an extent stays its owner's while it is down.
        Ok(match c.create_if_absent("claiming an extent", key)? {
            Creation::Created => true,
            Creation::Exists(kv) => kv.value_str().ok() == Some(c.host_id.to_string().as_str()),
            Creation::Vanished => false,
        })
    }
}
