//! The control API: HTTP/1.1 with JSON bodies on a Unix socket, documented
//! in `docs/API.md`.
//!
//! Each request is routed to one [`Api`] operation of the daemon's
//! [`Service`], run on the blocking pool (operations do disk I/O). The
//! socket's file permissions are its access control: whoever may connect
//! to it may manage every disk.

use crate::api::*;
use crate::service::Service;
use crate::vhost_user::VhostUserSocket;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;

/// What the control API needs besides the service: the daemon's fixed
/// facts for `GET /v1/status`.
pub struct ControlState {
    pub service: Arc<Service>,
    /// `status` without its live connection list.
    pub status: DaemonStatus,
    /// Sockets `attach --vhost-user` made, by path (dropped, and so
    /// removed, when the daemon stops).
    pub attached: parking_lot::Mutex<std::collections::BTreeMap<PathBuf, VhostUserSocket>>,
}

impl ControlState {
    pub fn status(&self) -> DaemonStatus {
        let store = self.service.store();
        let cache = match (&self.status.cache, store.read_cache_stats()) {
            (Some(c), Some(s)) => Some(CacheStatus {
                path: c.path.clone(),
                slots: s.slots,
                entries: s.entries,
                hits: s.hits,
                misses: s.misses,
                fills: s.fills,
                dropped: s.dropped,
                corrupt: s.corrupt,
                errors: s.errors,
                given_up: s.given_up,
            }),
            _ => None,
        };
        let write_log = store.write_log_stats().map(|s| WriteLogStatus {
            logging: s.logging,
            dirty_bytes: s.dirty_bytes,
            used_bytes: s.used_bytes,
            size_bytes: s.size_bytes,
            appended_bytes: s.appended_bytes,
            destaged_bytes: s.destaged_bytes,
            flushes: s.flushes,
            replayed: s.replayed,
            destage_errors: s.destage_errors,
            error: s.failed,
        });
        DaemonStatus {
            connections: self.service.connections(),
            write_log,
            cluster: self.service.cluster().map(|c| c.status()),
            cache,
            pool_data_read_bytes: store.pool_data_read_bytes(),
            journal: store.journal_mode(),
            ..self.status.clone()
        }
    }
}

/// Body of `POST /v1/disks`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CreateBody {
    pub name: String,
    pub size_bytes: u64,
}

/// Body of `POST /v1/disks/{disk}/snapshots`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SnapshotBody {
    #[serde(default)]
    pub name: Option<String>,
    /// `false`: answer once the snapshot is fixed in memory, and make it
    /// durable in the background (see `Durability::Deferred`).
    #[serde(default = "yes")]
    pub durable: bool,
}

fn yes() -> bool {
    true
}

/// Body of `POST /v1/disks/{disk}/snapshots/{snapshot}/clone`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CloneBody {
    pub name: String,
}

/// Body of `POST /v1/disks/{disk}/handoff`.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandoffBody {
    pub to: u64,
}

/// Body of `POST /v1/disks/{disk}/rollback`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RollbackBody {
    pub snapshot: String,
}

/// Body of `POST /v1/import`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ImportBody {
    pub file: PathBuf,
    pub name: String,
    #[serde(default)]
    pub size_bytes: Option<u64>,
}

/// Body of `POST /v1/send`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SendBody {
    pub to: SnapName,
    #[serde(default)]
    pub from: Option<SnapName>,
}

/// Body of `POST /v1/diff`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DiffBody {
    pub from: SnapName,
    pub to: String,
    #[serde(default)]
    pub to_snapshot: Option<String>,
}

/// Body of `POST /v1/vhost-user` and `DELETE /v1/vhost-user`.
#[derive(Debug, Serialize, Deserialize)]
pub struct VhostUserBody {
    /// `NAME` or `NAME@SNAP` (attach only).
    #[serde(default)]
    pub export: String,
    pub socket: PathBuf,
}

/// Body of `POST /v1/disks/{disk}/export`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportBody {
    #[serde(default)]
    pub snapshot: Option<String>,
    pub file: PathBuf,
    #[serde(default)]
    pub force: bool,
}

/// Accepts control connections until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    state: Arc<ControlState>,
    shutdown: watch::Receiver<bool>,
) {
    let handler = move |req| handle(state.clone(), req);
    serve_http(listener, "control socket", shutdown, handler).await
}

/// A listener whose connections speak HTTP/1.
trait HttpListener: Send {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn next(&self) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl HttpListener for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl HttpListener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Serves HTTP/1 on `listener` with `handler` until `shutdown` turns
/// true; `what` names the listener in the log.
async fn serve_http<L, H, F, B>(
    listener: L,
    what: &'static str,
    mut shutdown: watch::Receiver<bool>,
    handler: H,
) where
    L: HttpListener,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let stream = tokio::select! {
            r = listener.next() => match r {
                Ok(s) => s,
                Err(e) => {
                    warn!("{what} accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(handler);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!("{what} connection ended: {e}");
            }
        });
    }
}

fn json_response(status: u16, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// `GET /metrics`: the daemon's metrics as Prometheus text.
pub async fn metrics_response(service: Arc<Service>) -> Response<Full<Bytes>> {
    let text = tokio::task::spawn_blocking(move || crate::metrics::global().render(&service))
        .await
        .unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    response
}

/// Serves `GET /metrics` (and nothing else: 404) on `listener`, a TCP port
/// given by `serve --metrics-listen`, until `shutdown` turns true.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    service: Arc<Service>,
    shutdown: watch::Receiver<bool>,
) {
    let handler = move |req: Request<Incoming>| {
        let service = service.clone();
        async move {
            if req.method() == Method::GET && req.uri().path() == "/metrics" {
                Ok::<_, Infallible>(metrics_response(service).await)
            } else {
                let mut r = Response::new(Full::new(Bytes::from_static(
                    b"only GET /metrics is served here\n",
                )));
                *r.status_mut() = StatusCode::NOT_FOUND;
                Ok(r)
            }
        }
    };
    serve_http(listener, "metrics port", shutdown, handler).await
}

fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(e).unwrap_or_default();
    json_response(e.http_status(), body)
}

/// A control response's body: JSON, or a send stream.
type ControlBody = BoxBody<Bytes, std::io::Error>;

fn boxed(r: Response<Full<Bytes>>) -> Response<ControlBody> {
    r.map(|b| b.map_err(|never| match never {}).boxed())
}

async fn handle(
    state: Arc<ControlState>,
    req: Request<Incoming>,
) -> Result<Response<ControlBody>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    // The two endpoints whose bodies are streams, not JSON.
    if method == Method::POST {
        if let Some(disk) = receive_target(&path) {
            return Ok(receive_streamed(state, disk, &query, req.into_body()).await);
        }
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(boxed(error_response(&ApiError::invalid(format!(
                "cannot read the request body: {e}"
            )))))
        }
    };
    if method == Method::GET && path == "/metrics" {
        return Ok(boxed(metrics_response(state.service.clone()).await));
    }
    if method == Method::POST && path == "/v1/send" {
        return Ok(send_streamed(state, &body).await);
    }
    let (m, p) = (method.clone(), path.clone());
    let routed = tokio::task::spawn_blocking(move || route(&state, &m, &p, &query, &body)).await;
    let response = boxed(match routed {
        Ok(Ok((status, body))) => json_response(status, body),
        Ok(Err(e)) => error_response(&e),
        Err(_) => error_response(&ApiError::internal("the operation panicked")),
    });
    if response.status().is_success() {
        debug!(%method, %path, status = response.status().as_u16(), "control request");
    } else {
        info!(%method, %path, status = response.status().as_u16(), "control request failed");
    }
    Ok(response)
}

/// The disk of `POST /v1/disks/{disk}/receive`, if that is the path.
fn receive_target(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/disks/")?.strip_suffix("/receive")?;
    (!rest.contains('/')).then(|| percent_decode(rest).ok())?
}

/// `POST /v1/disks/{disk}/receive[?force=1]`: the body is a send stream,
/// read as it arrives (see `stream_body.rs`).
async fn receive_streamed(
    state: Arc<ControlState>,
    disk: String,
    query: &str,
    body: Incoming,
) -> Response<ControlBody> {
    let force = query.split('&').any(|q| q == "force=1");
    let (tx, mut reader) = crate::stream_body::ChannelReader::new();
    let feeding = tokio::spawn(crate::stream_body::forward(body, tx));
    let service = state.service.clone();
    let received =
        tokio::task::spawn_blocking(move || service.receive(&disk, &mut reader, force)).await;
    feeding.abort();
    let response = match received {
        Ok(r) => ok(200, r).map_or_else(|e| error_response(&e), |(s, b)| json_response(s, b)),
        Err(_) => error_response(&ApiError::internal("the operation panicked")),
    };
    info!(status = response.status().as_u16(), "receive");
    boxed(response)
}

/// `POST /v1/send`: a [`SendBody`]; answers with the stream as the body
/// and the send's report (JSON) in the `x-parallax-send` header, or with
/// a JSON error when the send cannot start. A send that fails midway ends
/// the body with an error (the client sees a broken stream, never a cut
/// one that looks whole).
async fn send_streamed(state: Arc<ControlState>, body: &[u8]) -> Response<ControlBody> {
    let request: SendBody = match parse(body) {
        Ok(b) => b,
        Err(e) => return boxed(error_response(&e)),
    };
    let service = state.service.clone();
    let planned = tokio::task::spawn_blocking(move || {
        crate::replication::plan_send(service.store(), &request.to, request.from.as_ref())
    })
    .await;
    let plan = match planned {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return boxed(error_response(&e)),
        Err(_) => {
            return boxed(error_response(&ApiError::internal(
                "the operation panicked",
            )))
        }
    };
    let report = serde_json::to_string(plan.report()).unwrap_or_default();
    let (mut writer, stream) = crate::stream_body::channel();
    tokio::task::spawn_blocking(move || {
        let written = plan.write(&mut writer);
        match written {
            Ok(()) => {
                let _ = writer.finish();
            }
            // Dropping the writer unfinished ends the body with an error.
            Err(e) => warn!("send failed midway: {e}"),
        }
    });
    let mut response = Response::new(stream.boxed());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(&report) {
        response.headers_mut().insert(SEND_REPORT_HEADER, v);
    }
    response
}

/// The response header of `POST /v1/send` that carries its report.
pub const SEND_REPORT_HEADER: &str = "x-parallax-send";

fn parse<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    let body = if body.is_empty() { &b"{}"[..] } else { body };
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("bad request body: {e}")))
}

fn ok<T: Serialize>(status: u16, value: ApiResult<T>) -> ApiResult<(u16, Vec<u8>)> {
    let value = value?;
    serde_json::to_vec(&value)
        .map(|b| (status, b))
        .map_err(|e| ApiError::internal(e.to_string()))
}

fn done(value: ApiResult<()>) -> ApiResult<(u16, Vec<u8>)> {
    value.map(|()| (200, b"{}".to_vec()))
}

fn absolute(path: &Path) -> ApiResult<&Path> {
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(ApiError::invalid(format!(
            "{} is not an absolute path",
            path.display()
        )))
    }
}

/// A path segment with its `%XX` escapes decoded (clients may encode any
/// character of a name).
fn percent_decode(segment: &str) -> ApiResult<String> {
    let bad = || {
        ApiError::invalid(format!(
            "bad percent-encoding in the path segment {segment:?}"
        ))
    };
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// Maps one request to its operation.
/// `attach --vhost-user`: serves `export` on `socket` from now on.
fn attach(state: &ControlState, export: &str, socket: &Path) -> ApiResult<()> {
    let mut attached = state.attached.lock();
    if attached.contains_key(socket) {
        return Err(ApiError::new(
            ErrorKind::Conflict,
            format!("{} already serves a disk", socket.display()),
        ));
    }
    let store = state.service.store();
    let target = parallax_engine::DiskRef::split(export);
    let (disk, id): (Arc<dyn parallax_engine::ReadDisk>, String) = match &target.snapshot {
        Some(snap) => {
            let view = store.open_snapshot(&target.disk, snap)?;
            let id = format!("parallax-{}@{}", view.vdi_id(), view.info().id);
            (Arc::new(view), id)
        }
        None => {
            let vdi = store.open_vdi(&target.disk)?;
            let id = format!("parallax-{}", vdi.id());
            (Arc::new(vdi), id)
        }
    };
    let served = VhostUserSocket::serve(
        state.service.clone(),
        export.to_string(),
        disk,
        id,
        socket,
        crate::vhost_user::QUEUES,
    )
    .map_err(|e| ApiError::internal(format!("cannot serve {}: {e}", socket.display())))?;
    info!(export, socket = %socket.display(), "attached over vhost-user");
    attached.insert(socket.to_path_buf(), served);
    Ok(())
}

fn route(
    state: &ControlState,
    method: &Method,
    path: &str,
    query: &str,
    body: &[u8],
) -> ApiResult<(u16, Vec<u8>)> {
    let api: &Service = &state.service;
    let decoded = path
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect::<ApiResult<Vec<String>>>()?;
    let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let get = method == Method::GET;
    let post = method == Method::POST;
    let delete = method == Method::DELETE;
    match segments.as_slice() {
        ["v1", "status"] if get => ok(200, Ok(state.status())),
        ["v1", "connections"] if get => ok(200, Ok(state.service.connections())),
        ["v1", "disks"] if get => ok(200, api.list()),
        ["v1", "disks"] if post => {
            let b: CreateBody = parse(body)?;
            ok(201, api.create(&b.name, b.size_bytes))
        }
        ["v1", "disks", d] if get => ok(200, api.disk(d)),
        ["v1", "disks", d] if delete => done(api.delete_disk(d)),
        ["v1", "disks", d, "snapshots"] if get => ok(200, api.snapshots(d)),
        ["v1", "disks", d, "snapshots"] if post => {
            let b: SnapshotBody = parse(body)?;
            ok(201, api.snapshot(d, b.name.as_deref(), b.durable))
        }
        ["v1", "disks", d, "snapshots", s] if get => ok(200, api.snapshot_detail(d, s)),
        ["v1", "disks", d, "snapshots", s] if delete => done(api.delete_snapshot(d, s)),
        ["v1", "disks", d, "snapshots", s, "clone"] if post => {
            let b: CloneBody = parse(body)?;
            ok(201, api.clone_snapshot(d, s, &b.name))
        }
        ["v1", "disks", d, "schedule"] if method == Method::PUT => {
            let b: ScheduleSpec = parse(body)?;
            ok(200, api.set_schedule(d, Some(&b)))
        }
        ["v1", "disks", d, "schedule"] if delete => ok(200, api.set_schedule(d, None)),
        ["v1", "disks", d, "cache-policy"] if method == Method::PUT => {
            let b: CachePolicyBody = parse(body)?;
            ok(200, api.set_cache_policy(d, &b.policy))
        }
        ["v1", "disks", d, "takeover"] if post => ok(200, api.takeover(d)),
        ["v1", "hosts", h, "forget-write-log"] if post => {
            let host = h
                .parse()
                .map_err(|_| ApiError::new(ErrorKind::Invalid, format!("not a host id: {h}")))?;
            done(api.forget_write_log_of(host))
        }
        ["v1", "disks", d, "handoff"] if post => {
            let b: HandoffBody = parse(body)?;
            ok(200, api.handoff(d, b.to))
        }
        ["v1", "disks", d, "rollback"] if post => {
            let b: RollbackBody = parse(body)?;
            done(api.rollback(d, &b.snapshot))
        }
        ["v1", "disks", d, "export"] if post => {
            let b: ExportBody = parse(body)?;
            done(api.export(d, b.snapshot.as_deref(), absolute(&b.file)?, b.force))
        }
        ["v1", "import"] if post => {
            let b: ImportBody = parse(body)?;
            ok(201, api.import(absolute(&b.file)?, &b.name, b.size_bytes))
        }
        ["v1", "diff"] if post => {
            let b: DiffBody = parse(body)?;
            ok(200, api.diff(&b.from, &b.to, b.to_snapshot.as_deref()))
        }
        ["v1", "vhost-user"] if post => {
            let b: VhostUserBody = parse(body)?;
            done(attach(state, &b.export, absolute(&b.socket)?))
        }
        ["v1", "vhost-user"] if delete => {
            let b: VhostUserBody = parse(body)?;
            let gone = state.attached.lock().remove(absolute(&b.socket)?);
            match gone {
                Some(socket) => {
                    drop(socket);
                    done(Ok(()))
                }
                None => Err(ApiError::new(
                    ErrorKind::NotFound,
                    format!("nothing is attached at {}", b.socket.display()),
                )),
            }
        }
        ["v1", "df"] if get => ok(200, api.df(query.split('&').any(|q| q == "scan=1"))),
        ["v1", "check"] if get => ok(200, api.check()),
        ["v1", "hosts"] if get => ok(200, api.hosts()),
        ["v1", "gc"] if post => ok(200, api.gc()),
        ["v1", "gc"] if get => ok(200, api.gc_progress()),
        _ => Err(ApiError::new(
            ErrorKind::NotFound,
            format!("no such endpoint: {method} {path} (see docs/API.md)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn path_segments_are_percent_decoded() {
        assert_eq!(percent_decode("vm1").unwrap(), "vm1");
        assert_eq!(percent_decode("web%2D01%2eimg").unwrap(), "web-01.img");
        assert!(percent_decode("a%2").is_err());
        assert!(percent_decode("a%zz").is_err());
        assert!(percent_decode("%ff").is_err(), "not UTF-8");
    }
}
