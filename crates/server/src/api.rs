//! The management operations, as one trait with two implementations:
//! [`crate::service::Service`] runs them on a store this process holds,
//! [`crate::client::Remote`] sends them to a running daemon's control
//! socket. The `parallax` command uses whichever applies, so its output is
//! the same either way. The JSON forms of these types are the control API's
//! bodies (`docs/API.md`).

pub use crate::replication::{DiffReport, ReceiveReport, SendReport, SnapName};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// A disk as listed and described.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub name: String,
    pub id: u64,
    pub size_bytes: u64,
    /// Unknown (null) for a disk another appliance of the cluster writes.
    pub allocated_bytes: Option<u64>,
    pub snapshots: u64,
    /// `NAME@SNAP` the disk was cloned from.
    pub origin: Option<String>,
    /// RFC 3339, UTC.
    pub created: String,
    /// NBD connections open on the disk or its snapshots (0 without a daemon).
    #[serde(default)]
    pub connections: u64,
    /// Deleted snapshots kept because clones or branches derive from them.
    #[serde(default)]
    pub hidden_snapshots: u64,
    /// The snapshot schedule, if the disk has one.
    #[serde(default)]
    pub schedule: Option<ScheduleSpec>,
    /// What the daemon's schedule did since the daemon started (absent
    /// without a daemon, or if the disk was never scheduled since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_run: Option<ScheduleRun>,
    /// Cluster mode: the appliance whose last commit the disk is at, and
    /// the epoch of its writer key then (absent outside cluster mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<WriterInfo>,
    /// How the daemon's local cache serves the disk: `write-through` or
    /// `none` (docs/CACHE.md).
    #[serde(default = "write_through")]
    pub cache_policy: String,
}

fn write_through() -> String {
    "write-through".into()
}

/// Body of `PUT /v1/disks/{disk}/cache-policy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachePolicyBody {
    /// `write-through` or `none`.
    pub policy: String,
}

/// The writer of a disk's last commit (cluster mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterInfo {
    pub host_id: u64,
    pub epoch: u64,
    /// Whether this appliance holds the disk now.
    pub here: bool,
    /// A hand-off in progress: the host the disk is reserved for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handing_off_to: Option<u64>,
    /// Hosts whose clients wait for the disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub asked_for_by: Vec<u64>,
}

/// Counters of a disk's schedule since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleRun {
    pub taken: u64,
    /// Snapshots retention deleted (or hid, when clones need them).
    pub deleted: u64,
    pub freed_bytes: u64,
    pub failed: u64,
    /// Ticks skipped because the previous one ran past its interval.
    pub skipped: u64,
}

/// A disk's snapshot schedule and retention rules (0 = rule off).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    pub every_ns: u64,
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_minutely: u32,
    #[serde(default)]
    pub keep_hourly: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_monthly: u32,
}

impl From<parallax_engine::Schedule> for ScheduleSpec {
    fn from(s: parallax_engine::Schedule) -> Self {
        ScheduleSpec {
            every_ns: s.every_ns,
            keep_last: s.keep_last,
            keep_minutely: s.keep_minutely,
            keep_hourly: s.keep_hourly,
            keep_daily: s.keep_daily,
            keep_monthly: s.keep_monthly,
        }
    }
}

impl From<&ScheduleSpec> for parallax_engine::Schedule {
    fn from(s: &ScheduleSpec) -> Self {
        parallax_engine::Schedule {
            every_ns: s.every_ns,
            keep_last: s.keep_last,
            keep_minutely: s.keep_minutely,
            keep_hourly: s.keep_hourly,
            keep_daily: s.keep_daily,
            keep_monthly: s.keep_monthly,
        }
    }
}

/// A snapshot of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDetail {
    pub disk: String,
    pub name: String,
    pub id: u64,
    pub created: String,
    /// The same instant in ns since the Unix epoch: the snapshot holds every
    /// write acknowledged before it, and none sent after it.
    #[serde(default)]
    pub created_ns: u64,
    pub size_bytes: u64,
    /// Bytes the snapshot maps (shared or not); absent in listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_bytes: Option<u64>,
    /// Taken by the disk's schedule (retention may delete it).
    #[serde(default)]
    pub scheduled: bool,
    /// Bytes of the store that only this snapshot references: what
    /// deleting it frees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    /// Bytes of the store this snapshot references (its tree and data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referenced_bytes: Option<u64>,
}

/// One appliance of a cluster (`parallax hosts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub host_id: u64,
    /// What the appliance registered (its NBD and control addresses).
    pub registered: serde_json::Value,
    /// What is left of its etcd lease (it renews it every third of the
    /// TTL; one that cannot stops writing before it ends), if etcd said.
    pub lease_left_ms: Option<u64>,
    /// Disks whose writer key it holds.
    pub writing: Vec<HeldDisk>,
    /// Disks it is handing off: reserved for another host until it takes
    /// them (or the reservation ends).
    pub handing_off: Vec<HandingOff>,
    /// Disks its clients wait for, held by another host.
    pub asking_for: Vec<String>,
}

/// A disk a host writes, and the epoch of its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldDisk {
    pub disk: String,
    pub disk_id: u64,
    pub epoch: u64,
}

/// A hand-off in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandingOff {
    pub disk: String,
    pub to: u64,
    /// Until when (Unix ms) the disk is reserved for `to`.
    pub until_ms: u64,
}

/// `parallax takeover`: what taking a disk over did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeoverSummary {
    pub disk: String,
    /// False when the disk had been let go cleanly (or was held here
    /// already): it was simply opened.
    pub taken_over: bool,
    /// The host and epoch of the commit it was taken over at.
    pub from_host: u64,
    pub from_epoch: u64,
    /// This appliance's epoch, in the takeover commit.
    pub epoch: u64,
    /// Waiting for the old holder's lease to end, then the grace.
    pub waited_for_key_ms: u64,
    pub grace_ms: u64,
}

/// `parallax handoff`: what handing a disk off did on its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffSummary {
    pub disk: String,
    pub to: u64,
    /// The epoch the disk was held under here.
    pub epoch: u64,
    /// From the request to the writer key given back.
    pub took_ms: u64,
}

/// `parallax check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSummary {
    pub clean: bool,
    pub disks: u64,
    pub snapshots: u64,
    pub tree_nodes: u64,
    pub data_blocks: u64,
    pub metadata_blocks: u64,
    pub leaked_blocks: u64,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// `parallax gc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcSummary {
    pub freed_blocks: u64,
    pub freed_bytes: u64,
}

/// How far a running `gc` got: its mark phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcProgress {
    /// Blocks found referenced so far.
    pub marked_blocks: u64,
    /// Blocks allocated when it started (the mark ends at or below this).
    pub allocated_blocks: u64,
}

/// One disk in `parallax df`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUse {
    pub name: String,
    pub size_bytes: u64,
    pub allocated_bytes: Option<u64>,
    /// Bytes only this disk and its snapshots reference, metadata included:
    /// what deleting the disk frees.
    pub used_bytes: u64,
    /// Bytes the live disk references (its tree and data).
    pub referenced_bytes: u64,
    /// Bytes only the live disk references.
    pub live_used_bytes: u64,
    pub snapshots: u64,
}

/// `parallax df`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceSummary {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub disks: Vec<DiskUse>,
    /// With `df --scan`: whether a brute-force scan of every version found
    /// exactly the same used and referenced figures (disks and snapshots),
    /// and what differed if not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan: Option<ScanResult>,
}

/// The outcome of `df --scan`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanResult {
    pub matches: bool,
    pub differences: Vec<String>,
}

/// One NBD client connection of a daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub id: u64,
    /// `NAME` or `NAME@SNAP`.
    pub export: String,
    /// `127.0.0.1:PORT`, or `unix` for a Unix-socket client.
    pub peer: String,
    pub since: String,
}

/// `parallax status`: what a running daemon serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub store: String,
    /// The bound TCP address, if the daemon listens on TCP.
    pub nbd_tcp: Option<String>,
    pub nbd_socket: Option<String>,
    /// NBD over TLS: `off`, `optional` or `require`.
    #[serde(default)]
    pub nbd_tls: String,
    /// TLS clients must present a certificate signed by `--tls-ca`.
    #[serde(default)]
    pub nbd_tls_verifies_clients: bool,
    /// The TCP address serving `GET /metrics`, if any (the control socket
    /// always does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_tcp: Option<String>,
    pub control: String,
    pub connections: Vec<ConnectionInfo>,
    /// Cluster mode: this appliance's standing in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
    /// `--cache`: the local read cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheStatus>,
    /// `--cache` outside cluster mode: the write-back log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_log: Option<WriteLogStatus>,
    /// Bytes of disk data read from the pool since the daemon started
    /// (reads the cache served are not counted).
    #[serde(default)]
    pub pool_data_read_bytes: u64,
    /// Entry journals (format 2, `serve --journal`) are on for the store.
    #[serde(default)]
    pub journal: bool,
}

/// `parallax status`: the local read cache (counters since the daemon
/// started).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStatus {
    pub path: String,
    /// Blocks it can hold, and holds.
    pub slots: u64,
    pub entries: u64,
    pub hits: u64,
    pub misses: u64,
    pub fills: u64,
    pub dropped: u64,
    pub corrupt: u64,
    pub errors: u64,
    /// Given up after device errors in a row (reads go to the pool until
    /// the daemon restarts).
    #[serde(default)]
    pub given_up: bool,
}

/// `parallax status`: the write-back log (counters since the daemon
/// started; bytes are whole 4 KiB blocks).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteLogStatus {
    /// Writes go to the log (a write-back disk is open, or records are left).
    pub logging: bool,
    /// Written to the log and not yet to the pool: only on this host.
    pub dirty_bytes: u64,
    pub used_bytes: u64,
    pub size_bytes: u64,
    pub appended_bytes: u64,
    pub destaged_bytes: u64,
    pub flushes: u64,
    /// Records found and replayed when the daemon started.
    pub replayed: u64,
    pub destage_errors: u64,
    /// Why the log stopped taking writes, or the last destage error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `parallax status` in cluster mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub host_id: u64,
    /// Whether it may write to the pool now (its lease cannot have ended).
    pub may_write: bool,
    /// Which lease it is on: grows with each new lease after a lost one.
    pub incarnation: u64,
    pub lease_ttl_s: u64,
    /// `--takeover`, `--takeover-grace`.
    pub takeover: bool,
    pub takeover_grace_ms: u64,
    /// `--claim-wait`, `--yield-quiet`.
    pub claim_wait_ms: u64,
    pub yield_quiet_ms: u64,
}

/// What went wrong, classified for HTTP status codes and exit messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or names something invalid (HTTP 400).
    Invalid,
    /// A disk or snapshot does not exist (404).
    NotFound,
    /// It conflicts with the current state: name taken, disk in use (409).
    Conflict,
    /// The store is full (507).
    NoSpace,
    /// Anything else: I/O errors, damage (500).
    Internal,
}

/// An error from an operation, with a message meant for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub kind: ErrorKind,
    #[serde(rename = "error")]
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Invalid, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Internal, message)
    }

    /// The HTTP status the control API answers with.
    pub fn http_status(&self) -> u16 {
        match self.kind {
            ErrorKind::Invalid => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::NoSpace => 507,
            ErrorKind::Internal => 500,
        }
    }

    /// The kind an HTTP status stands for (the inverse of [`Self::http_status`]).
    pub fn kind_of_status(status: u16) -> ErrorKind {
        match status {
            400 => ErrorKind::Invalid,
            404 => ErrorKind::NotFound,
            409 => ErrorKind::Conflict,
            507 => ErrorKind::NoSpace,
            _ => ErrorKind::Internal,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<parallax_engine::Error> for ApiError {
    fn from(e: parallax_engine::Error) -> ApiError {
        use parallax_engine::Error as E;
        let kind = match &e {
            E::NotFound(_) | E::Deleted(_) => ErrorKind::NotFound,
            E::AlreadyExists(_) => ErrorKind::Conflict,
            E::InvalidArgument(_) | E::ReadOnly(_) => ErrorKind::Invalid,
            E::Busy(_) | E::Fenced(_) => ErrorKind::Conflict,
            E::NoSpace => ErrorKind::NoSpace,
            _ => ErrorKind::Internal,
        };
        ApiError::new(kind, e.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        if let Some(api) = e.downcast_ref::<ApiError>() {
            return api.clone();
        }
        ApiError::internal(crate::one_line(&e))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Every management operation. Paths are absolute (the daemon's working
/// directory is not the caller's).
pub trait Api {
    fn create(&self, name: &str, size: u64) -> ApiResult<DiskInfo>;
    fn list(&self) -> ApiResult<Vec<DiskInfo>>;
    fn disk(&self, name: &str) -> ApiResult<DiskInfo>;
    fn snapshot_detail(&self, disk: &str, snapshot: &str) -> ApiResult<SnapshotDetail>;
    /// Takes a snapshot, named by the current time if `name` is `None`;
    /// durable on return if `durable`, else made durable in the background
    /// (lost by a power cut before, with nothing a FLUSH acknowledged).
    fn snapshot(&self, disk: &str, name: Option<&str>, durable: bool) -> ApiResult<SnapshotDetail>;
    fn snapshots(&self, disk: &str) -> ApiResult<Vec<SnapshotDetail>>;
    fn clone_snapshot(&self, disk: &str, snapshot: &str, new: &str) -> ApiResult<DiskInfo>;
    fn rollback(&self, disk: &str, snapshot: &str) -> ApiResult<()>;
    fn delete_disk(&self, name: &str) -> ApiResult<()>;
    fn delete_snapshot(&self, disk: &str, snapshot: &str) -> ApiResult<()>;
    /// Sets a disk's snapshot schedule, or removes it with `None`.
    fn set_schedule(&self, disk: &str, schedule: Option<&ScheduleSpec>) -> ApiResult<DiskInfo>;
    /// Sets how the local cache serves the disk (`write-through`, `none`).
    fn set_cache_policy(&self, disk: &str, policy: &str) -> ApiResult<DiskInfo>;
    fn import(&self, file: &Path, name: &str, size: Option<u64>) -> ApiResult<DiskInfo>;
    fn export(&self, disk: &str, snapshot: Option<&str>, file: &Path, force: bool)
        -> ApiResult<()>;
    fn check(&self) -> ApiResult<CheckSummary>;
    /// The appliances of the cluster (cluster mode only).
    fn hosts(&self) -> ApiResult<Vec<HostInfo>>;
    /// Cluster mode: takes disk `disk` over from an appliance that did not
    /// let it go (see `Store::take_over`).
    fn takeover(&self, disk: &str) -> ApiResult<TakeoverSummary>;
    /// Cluster mode: hands disk `disk`, held here, to host `to` (see
    /// `Store::hand_off`).
    fn handoff(&self, disk: &str, to: u64) -> ApiResult<HandoffSummary>;
    /// Cluster mode: gives up the write-back log host `host` named (its
    /// cache is lost; refused while it runs). See
    /// `Store::forget_write_log_of`.
    fn forget_write_log_of(&self, host: u64) -> ApiResult<()>;
    fn gc(&self) -> ApiResult<GcSummary>;
    /// The progress of a `gc` running now, if any.
    fn gc_progress(&self) -> ApiResult<Option<GcProgress>>;
    /// Space figures; with `scan`, also checked against a full scan.
    fn df(&self, scan: bool) -> ApiResult<SpaceSummary>;
    /// What changed from snapshot `from` to snapshot `to_snapshot` of disk
    /// `to` (`None`: the live disk).
    fn diff(&self, from: &SnapName, to: &str, to_snapshot: Option<&str>) -> ApiResult<DiffReport>;
    /// Writes snapshot `to` as a send stream to `out`, whole or as its
    /// difference from `from`.
    fn send(
        &self,
        to: &SnapName,
        from: Option<&SnapName>,
        out: &mut dyn std::io::Write,
    ) -> ApiResult<SendReport>;
    /// Serves `export` (`NAME`, or `NAME@SNAP` read-only) over
    /// vhost-user-blk on a socket at `socket` until detached (a running
    /// daemon only).
    fn attach_vhost_user(&self, export: &str, socket: &Path) -> ApiResult<()>;
    /// Stops serving the socket `attach_vhost_user` made at `socket`.
    fn detach_vhost_user(&self, socket: &Path) -> ApiResult<()>;
    /// Applies the send stream read from `input` to disk `name` (see
    /// `replication.rs`).
    fn receive(
        &self,
        name: &str,
        input: &mut dyn std::io::Read,
        force: bool,
    ) -> ApiResult<ReceiveReport>;
}
