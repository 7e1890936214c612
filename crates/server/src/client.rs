//! [`Remote`]: the management operations sent to a running daemon over its
//! control socket (HTTP/1.1, JSON; `docs/API.md`).

use crate::api::*;
use crate::control::{
    CloneBody, CreateBody, DiffBody, ExportBody, HandoffBody, ImportBody, RollbackBody, SendBody,
    SnapshotBody, VhostUserBody,
};
use crate::stream_body::ChannelBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tokio::net::UnixStream;

/// A daemon's control socket.
pub struct Remote {
    socket: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl Remote {
    /// Connects to the daemon listening on `socket`, if one does: `None`
    /// when the socket file is missing or nobody accepts on it (a daemon
    /// that died leaves its socket file behind).
    pub fn connect(socket: &Path) -> Option<Remote> {
        std::os::unix::net::UnixStream::connect(socket).ok()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        Some(Remote {
            socket: socket.to_path_buf(),
            runtime,
        })
    }

    pub fn status(&self) -> ApiResult<DaemonStatus> {
        self.call(Method::GET, "/v1/status", None::<&()>)
    }

    fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> ApiResult<T> {
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ApiError::internal(e.to_string()))?,
            None => Vec::new(),
        };
        let (status, bytes) = self
            .runtime
            .block_on(self.exchange(method, path, body))
            .map_err(|e| {
                ApiError::internal(format!(
                    "cannot talk to the parallax daemon at {}: {e}",
                    self.socket.display()
                ))
            })?;
        if status >= 400 {
            return Err(
                serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| {
                    ApiError::new(
                        ApiError::kind_of_status(status),
                        format!(
                            "the daemon answered {status}: {}",
                            String::from_utf8_lossy(&bytes)
                        ),
                    )
                }),
            );
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::internal(format!("unexpected answer from the daemon: {e}")))
    }

    fn call_unit<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> ApiResult<()> {
        self.call::<serde::de::IgnoredAny, B>(method, path, body)
            .map(drop)
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Bytes), BoxError> {
        let body = Full::new(Bytes::from(body));
        let (response, driver) = self.request(method, path, "application/json", body).await?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        let _ = driver.await;
        Ok((status, bytes))
    }

    /// Sends a request with `body`; returns the response (its body still
    /// to read) and the connection's task, which ends once it is read.
    async fn request<B>(
        &self,
        method: Method,
        path: &str,
        content_type: &'static str,
        body: B,
    ) -> Result<(hyper::Response<Incoming>, tokio::task::JoinHandle<()>), BoxError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let stream = UnixStream::connect(&self.socket).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "parallax")
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(body)?;
        let response = sender.send_request(request).await?;
        Ok((response, driver))
    }

    /// The error a failed response carries.
    async fn error_of(response: hyper::Response<Incoming>) -> ApiError {
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| {
            ApiError::new(
                ApiError::kind_of_status(status),
                format!(
                    "the daemon answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ),
            )
        })
    }

    fn unreachable(&self, e: BoxError) -> ApiError {
        ApiError::internal(format!(
            "cannot talk to the parallax daemon at {}: {e}",
            self.socket.display()
        ))
    }

    async fn send_stream(
        &self,
        body: Vec<u8>,
        out: &mut dyn std::io::Write,
    ) -> ApiResult<SendReport> {
        let body = Full::new(Bytes::from(body));
        let (response, driver) = self
            .request(Method::POST, "/v1/send", "application/json", body)
            .await
            .map_err(|e| self.unreachable(e))?;
        if !response.status().is_success() {
            return Err(Self::error_of(response).await);
        }
        let report: SendReport = response
            .headers()
            .get(crate::control::SEND_REPORT_HEADER)
            .and_then(|v| serde_json::from_slice(v.as_bytes()).ok())
            .ok_or_else(|| ApiError::internal("the daemon's send answer has no report"))?;
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::internal(format!("the send broke off in the daemon: {e}"))
            })?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data)
                    .map_err(|e| ApiError::internal(format!("cannot write the stream: {e}")))?;
            }
        }
        out.flush()
            .map_err(|e| ApiError::internal(format!("cannot write the stream: {e}")))?;
        let _ = driver.await;
        Ok(report)
    }

    async fn receive_stream(&self, path: &str, body: ChannelBody) -> ApiResult<ReceiveReport> {
        let (response, driver) = self
            .request(Method::POST, path, "application/octet-stream", body)
            .await
            .map_err(|e| self.unreachable(e))?;
        if !response.status().is_success() {
            let e = Self::error_of(response).await;
            // The daemon answered without reading the whole stream: drop
            // the connection, and with it the body, so that the thread
            // feeding the body stops.
            driver.abort();
            let _ = driver.await;
            return Err(e);
        }
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.unreachable(e.into()))?
            .to_bytes();
        let _ = driver.await;
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::internal(format!("unexpected answer from the daemon: {e}")))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Sends what `input` reads to `tx`, in chunks, until its end (or an
/// error chunk when it fails), or until the other side stops listening.
fn feed(input: &mut dyn std::io::Read, tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>) {
    loop {
        let mut buf = vec![0u8; 256 << 10];
        let chunk = match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                Ok(Bytes::from(buf))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
        let failed = chunk.is_err();
        if tx.blocking_send(chunk).is_err() || failed {
            return;
        }
    }
}

fn disk_path(disk: &str) -> String {
    format!("/v1/disks/{disk}")
}

impl Api for Remote {
    fn create(&self, name: &str, size: u64) -> ApiResult<DiskInfo> {
        let body = CreateBody {
            name: name.to_string(),
            size_bytes: size,
        };
        self.call(Method::POST, "/v1/disks", Some(&body))
    }

    fn list(&self) -> ApiResult<Vec<DiskInfo>> {
        self.call(Method::GET, "/v1/disks", None::<&()>)
    }

    fn disk(&self, name: &str) -> ApiResult<DiskInfo> {
        self.call(Method::GET, &disk_path(name), None::<&()>)
    }

    fn snapshot_detail(&self, disk: &str, snapshot: &str) -> ApiResult<SnapshotDetail> {
        let path = format!("{}/snapshots/{snapshot}", disk_path(disk));
        self.call(Method::GET, &path, None::<&()>)
    }

    fn snapshot(&self, disk: &str, name: Option<&str>, durable: bool) -> ApiResult<SnapshotDetail> {
        let body = SnapshotBody {
            name: name.map(str::to_string),
            durable,
        };
        let path = format!("{}/snapshots", disk_path(disk));
        self.call(Method::POST, &path, Some(&body))
    }

    fn snapshots(&self, disk: &str) -> ApiResult<Vec<SnapshotDetail>> {
        let path = format!("{}/snapshots", disk_path(disk));
        self.call(Method::GET, &path, None::<&()>)
    }

    fn clone_snapshot(&self, disk: &str, snapshot: &str, new: &str) -> ApiResult<DiskInfo> {
        let body = CloneBody {
            name: new.to_string(),
        };
        let path = format!("{}/snapshots/{snapshot}/clone", disk_path(disk));
        self.call(Method::POST, &path, Some(&body))
    }

    fn rollback(&self, disk: &str, snapshot: &str) -> ApiResult<()> {
        let body = RollbackBody {
            snapshot: snapshot.to_string(),
        };
        let path = format!("{}/rollback", disk_path(disk));
        self.call_unit(Method::POST, &path, Some(&body))
    }

    fn delete_disk(&self, name: &str) -> ApiResult<()> {
        self.call_unit(Method::DELETE, &disk_path(name), None::<&()>)
    }

    fn delete_snapshot(&self, disk: &str, snapshot: &str) -> ApiResult<()> {
        let path = format!("{}/snapshots/{snapshot}", disk_path(disk));
        self.call_unit(Method::DELETE, &path, None::<&()>)
    }

    fn set_schedule(&self, disk: &str, schedule: Option<&ScheduleSpec>) -> ApiResult<DiskInfo> {
        let path = format!("{}/schedule", disk_path(disk));
        match schedule {
            Some(s) => self.call(Method::PUT, &path, Some(s)),
            None => self.call(Method::DELETE, &path, None::<&()>),
        }
    }

    fn set_cache_policy(&self, disk: &str, policy: &str) -> ApiResult<DiskInfo> {
        let path = format!("{}/cache-policy", disk_path(disk));
        let body = CachePolicyBody {
            policy: policy.to_string(),
        };
        self.call(Method::PUT, &path, Some(&body))
    }

    fn import(&self, file: &Path, name: &str, size: Option<u64>) -> ApiResult<DiskInfo> {
        let body = ImportBody {
            file: file.to_path_buf(),
            name: name.to_string(),
            size_bytes: size,
        };
        self.call(Method::POST, "/v1/import", Some(&body))
    }

    fn export(
        &self,
        disk: &str,
        snapshot: Option<&str>,
        file: &Path,
        force: bool,
    ) -> ApiResult<()> {
        let body = ExportBody {
            snapshot: snapshot.map(str::to_string),
            file: file.to_path_buf(),
            force,
        };
        let path = format!("{}/export", disk_path(disk));
        self.call_unit(Method::POST, &path, Some(&body))
    }

    fn diff(&self, from: &SnapName, to: &str, to_snapshot: Option<&str>) -> ApiResult<DiffReport> {
        let body = DiffBody {
            from: from.clone(),
            to: to.to_string(),
            to_snapshot: to_snapshot.map(str::to_string),
        };
        self.call(Method::POST, "/v1/diff", Some(&body))
    }

    fn send(
        &self,
        to: &SnapName,
        from: Option<&SnapName>,
        out: &mut dyn std::io::Write,
    ) -> ApiResult<SendReport> {
        let body = serde_json::to_vec(&SendBody {
            to: to.clone(),
            from: from.cloned(),
        })
        .map_err(|e| ApiError::internal(e.to_string()))?;
        self.runtime.block_on(self.send_stream(body, out))
    }

    fn receive(
        &self,
        name: &str,
        input: &mut dyn std::io::Read,
        force: bool,
    ) -> ApiResult<ReceiveReport> {
        let path = format!(
            "{}/receive{}",
            disk_path(name),
            if force { "?force=1" } else { "" }
        );
        let (tx, body) = ChannelBody::new();
        std::thread::scope(|scope| {
            // The exchange runs on its own thread while this one reads
            // the input into the request body.
            let exchange = scope.spawn(|| self.runtime.block_on(self.receive_stream(&path, body)));
            feed(input, tx);
            exchange
                .join()
                .unwrap_or_else(|_| Err(ApiError::internal("the receive thread panicked")))
        })
    }

    fn attach_vhost_user(&self, export: &str, socket: &Path) -> ApiResult<()> {
        let body = VhostUserBody {
            export: export.to_string(),
            socket: socket.to_path_buf(),
        };
        self.call_unit(Method::POST, "/v1/vhost-user", Some(&body))
    }

    fn detach_vhost_user(&self, socket: &Path) -> ApiResult<()> {
        let body = VhostUserBody {
            export: String::new(),
            socket: socket.to_path_buf(),
        };
        self.call_unit(Method::DELETE, "/v1/vhost-user", Some(&body))
    }

    fn check(&self) -> ApiResult<CheckSummary> {
        self.call(Method::GET, "/v1/check", None::<&()>)
    }

    fn hosts(&self) -> ApiResult<Vec<HostInfo>> {
        self.call(Method::GET, "/v1/hosts", None::<&()>)
    }

    fn handoff(&self, disk: &str, to: u64) -> ApiResult<HandoffSummary> {
        let path = format!("{}/handoff", disk_path(disk));
        self.call(Method::POST, &path, Some(&HandoffBody { to }))
    }

    fn forget_write_log_of(&self, host: u64) -> ApiResult<()> {
        let path = format!("/v1/hosts/{host}/forget-write-log");
        self.call_unit(Method::POST, &path, None::<&()>)
    }

    fn takeover(&self, disk: &str) -> ApiResult<TakeoverSummary> {
        let path = format!("{}/takeover", disk_path(disk));
        self.call(Method::POST, &path, None::<&()>)
    }

    fn gc(&self) -> ApiResult<GcSummary> {
        self.call(Method::POST, "/v1/gc", None::<&()>)
    }

    fn gc_progress(&self) -> ApiResult<Option<GcProgress>> {
        self.call(Method::GET, "/v1/gc", None::<&()>)
    }

    fn df(&self, scan: bool) -> ApiResult<SpaceSummary> {
        let path = if scan { "/v1/df?scan=1" } else { "/v1/df" };
        self.call(Method::GET, path, None::<&()>)
    }
}
