//! A pool reached over the network: a [`BlockDevice`] that any NBD server
//! serves (`qemu-nbd`, `nbdkit`, another Parallax).
//!
//! - **Addresses**: `nbd://HOST[:PORT]/EXPORT` (TCP, port 10809 by default,
//!   `[v6]` hosts in brackets) and `nbd+unix:///EXPORT?socket=PATH`; both
//!   take `connections=N` in the query (default 4).
//! - **Connections**: `N` sockets, each carrying one request at a time; a
//!   call takes an idle one (so at most `N` requests are in flight).
//!   Fixed newstyle negotiation with `NBD_OPT_GO`, simple replies; reads
//!   and writes larger than the server's maximum are split.
//! - **Durability**: `flush` sends `NBD_CMD_FLUSH` on every connection (on
//!   one, if the server announces `CAN_MULTI_CONN`), with every other
//!   request held back, so that it covers every write that completed
//!   before it. A server that cannot flush is refused at connect time.
//! - **Dropped connections**: every write the server acknowledged since the
//!   last successful flush is kept (the *replay log*, in the order of the
//!   acknowledgments). When a connection fails (an I/O error or a reply
//!   out of step, not an error reply), every request is held back, every
//!   connection is made again, the replay log is written again in order,
//!   and the failed request is retried: a server that lost acknowledged
//!   but unflushed writes (it restarted) gets them back, and overlapping
//!   writes end in the order the device acknowledged them. Reconnecting is
//!   retried with a growing pause for up to `reconnect_for` (60 s); after
//!   that the call fails, and the next call tries again. The replay log is
//!   bounded: past `REPLAY_LIMIT` bytes the device flushes on its own
//!   (harmless: it only makes more durable).
//! - **Errors from the server** (`EIO`, `ENOSPC`, `EINVAL`...) are the
//!   call's error, with the errno the server sent; they are not retried.
//!
//! Invariants: a write is acknowledged to the caller only after the
//! server acknowledged it; it stays in the replay log until a flush issued
//! after its acknowledgment succeeded; a call that returns `Ok` from
//! `flush` means every write acknowledged before the call is durable on
//! the server.

use crate::{check_range, BlockDevice};
use parallax_nbd::client::{
    decode_greeting, decode_info, decode_option_reply, decode_simple_reply, Info, GREETING_LEN,
    OPTION_REPLY_HEADER_LEN,
};
use parallax_nbd::{
    client_option, info_request, Command, Request, CLIENT_FLAG_FIXED_NEWSTYLE,
    CLIENT_FLAG_NO_ZEROES, HANDSHAKE_FLAG_NO_ZEROES, INFO_BLOCK_SIZE, OPT_GO, REP_ACK,
    REP_FLAG_ERROR, REP_INFO, SIMPLE_REPLY_HEADER_LEN, TF_CAN_MULTI_CONN, TF_READ_ONLY,
    TF_SEND_FLUSH, TF_SEND_TRIM,
};
use parking_lot::{Condvar, Mutex, RwLock};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Default number of connections.
const DEFAULT_CONNECTIONS: usize = 4;
/// Largest request sent when the server names no maximum.
const DEFAULT_MAX_REQUEST: u32 = 4 << 20;
/// Past this many bytes of acknowledged, unflushed writes, the device
/// flushes on its own.
pub const REPLAY_LIMIT: usize = 64 << 20;
/// A request that takes longer than this fails its connection (unless
/// [`NbdDevice::set_request_timeout`] says otherwise).
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// `host:port`, as `TcpStream::connect` takes it.
    Tcp(String),
    Unix(PathBuf),
}

/// A parsed `nbd://` or `nbd+unix://` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTarget {
    pub addr: NbdAddr,
    pub export: String,
    pub connections: usize,
}

impl NbdTarget {
    /// Whether `s` names an NBD pool rather than a path.
    pub fn is_uri(s: &str) -> bool {
        s.starts_with("nbd://") || s.starts_with("nbd+unix://")
    }

    /// Parses `nbd://HOST[:PORT]/EXPORT[?connections=N]` or
    /// `nbd+unix:///EXPORT?socket=PATH[&connections=N]`.
    pub fn parse(uri: &str) -> Result<NbdTarget, String> {
        let bad = |why: &str| format!("{uri}: {why}");
        let (rest, unix) = if let Some(r) = uri.strip_prefix("nbd+unix://") {
            (r, true)
        } else if let Some(r) = uri.strip_prefix("nbd://") {
            (r, false)
        } else {
            return Err(bad("not an nbd:// or nbd+unix:// address"));
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        let mut socket = None;
        let mut connections = DEFAULT_CONNECTIONS;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("socket", v)) => socket = Some(PathBuf::from(v)),
                Some(("connections", v)) => {
                    connections = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| bad("connections must be 1 to 64"))?;
                }
                _ => return Err(bad(&format!("unknown parameter {pair:?}"))),
            }
        }
        let addr = if unix {
            if !authority.is_empty() {
                return Err(bad(
                    "nbd+unix:// takes no host (nbd+unix:///EXPORT?socket=PATH)",
                ));
            }
            NbdAddr::Unix(socket.ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH"))?)
        } else {
            if socket.is_some() {
                return Err(bad("socket= is for nbd+unix://"));
            }
            if authority.is_empty() {
                return Err(bad("no host"));
            }
            let has_port = match authority.rfind(']') {
                Some(close) => authority[close..].contains(':'),
                None => authority.contains(':'),
            };
            NbdAddr::Tcp(if has_port {
                authority.to_string()
            } else {
                format!("{authority}:10809")
            })
        };
        Ok(NbdTarget {
            addr,
            export: export.to_string(),
            connections,
        })
    }
}

impl std::fmt::Display for NbdTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.addr {
            NbdAddr::Tcp(a) => write!(f, "nbd://{a}/{}", self.export),
            NbdAddr::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

/// A socket to the server.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(addr: &NbdAddr, timeout: Duration) -> io::Result<Stream> {
        let s = match addr {
            NbdAddr::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            NbdAddr::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
        };
        s.set_timeout(timeout)?;
        Ok(s)
    }

    /// Bounds every read and write of the socket.
    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
            Stream::Unix(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
        }
    }

    /// Closes the socket so that what it still holds unsent is dropped (a
    /// reset, not the data then a FIN): a request that timed out must not
    /// reach the server later, when the network comes back (by then a new
    /// holder may have written the same blocks). Unix sockets hold nothing
    /// unsent: what was written is in the server's buffer already.
    fn abort(self) {
        if let Stream::Tcp(s) = &self {
            let _ = rustix::net::sockopt::set_socket_linger(s, Some(Duration::ZERO));
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What negotiation learned about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ExportFacts {
    size: u64,
    flags: u16,
    max_request: u32,
}

fn protocol(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Fixed newstyle negotiation up to transmission (`NBD_OPT_GO`).
fn negotiate(s: &mut Stream, export: &str) -> io::Result<ExportFacts> {
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g)?;
    let greeting = decode_greeting(&g).map_err(protocol)?;
    let mut client_flags = CLIENT_FLAG_FIXED_NEWSTYLE;
    if greeting.flags & HANDSHAKE_FLAG_NO_ZEROES != 0 {
        client_flags |= CLIENT_FLAG_NO_ZEROES;
    }
    let mut out = client_flags.to_be_bytes().to_vec();
    client_option(&mut out, OPT_GO, &info_request(export, &[INFO_BLOCK_SIZE]));
    s.write_all(&out)?;
    let mut facts = None;
    let mut max_request = DEFAULT_MAX_REQUEST;
    loop {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        s.read_exact(&mut h)?;
        let reply = decode_option_reply(&h, OPT_GO).map_err(protocol)?;
        if reply.length > 64 << 10 {
            return Err(protocol("an option reply over 64 KiB"));
        }
        let mut data = vec![0u8; reply.length as usize];
        s.read_exact(&mut data)?;
        match reply.reply_type {
            REP_ACK => break,
            REP_INFO => match decode_info(&data).map_err(protocol)? {
                Info::Export { size, flags } => facts = Some((size, flags)),
                Info::BlockSize { max, .. } => max_request = max.clamp(4096, 32 << 20),
                Info::Other(_) => {}
            },
            t if t & REP_FLAG_ERROR != 0 => {
                let message = String::from_utf8_lossy(&data);
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("the server refused export {export:?} (error {t:#x}): {message}"),
                ));
            }
            _ => {}
        }
    }
    let (size, flags) =
        facts.ok_or_else(|| protocol("NBD_OPT_GO succeeded without the export's size"))?;
    Ok(ExportFacts {
        size,
        flags,
        max_request,
    })
}

/// One connection in transmission.
struct Conn {
    stream: Stream,
    next_cookie: u64,
}

/// What a request carries: nothing (flush, trim), the data of a write, or
/// the buffer a read fills. Borrowed: no copy on the way to the socket.
enum Payload<'a> {
    None,
    Write(&'a [u8]),
    Read(&'a mut [u8]),
}

/// How a request failed.
enum Failure {
    /// The server answered with an error: the call's result.
    Server(io::Error),
    /// The connection is unusable: reconnect and retry.
    Connection(io::Error),
}

impl Conn {
    /// Sends one request and waits for its reply.
    fn request(
        &mut self,
        command: Command,
        offset: u64,
        length: u32,
        data: Payload<'_>,
    ) -> Result<(), Failure> {
        self.next_cookie += 1;
        let cookie = self.next_cookie;
        let header = Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        }
        .encode();
        let conn = Failure::Connection;
        self.stream.write_all(&header).map_err(conn)?;
        if let Payload::Write(payload) = &data {
            self.stream.write_all(payload).map_err(conn)?;
        }
        let mut h = [0u8; SIMPLE_REPLY_HEADER_LEN];
        self.stream.read_exact(&mut h).map_err(conn)?;
        let reply = decode_simple_reply(&h).map_err(|e| conn(protocol(e)))?;
        if reply.cookie != cookie {
            return Err(conn(protocol(format!(
                "a reply to request {} came for request {cookie}",
                reply.cookie
            ))));
        }
        if reply.error != 0 {
            return Err(Failure::Server(io::Error::from_raw_os_error(
                reply.error as i32,
            )));
        }
        if let Payload::Read(buf) = data {
            self.stream.read_exact(buf).map_err(conn)?;
        }
        Ok(())
    }
}

/// Acknowledged writes not yet covered by a flush, oldest first.
#[derive(Default)]
struct ReplayLog {
    /// (sequence number, offset, data).
    writes: std::collections::VecDeque<(u64, u64, Vec<u8>)>,
    bytes: usize,
    next_seq: u64,
}

/// The pool of connections, rebuilt as a whole after a failure.
struct Pool {
    idle: Vec<Conn>,
    /// Bumped each time the connections are rebuilt.
    generation: u64,
    /// Connections are down and the last attempt to rebuild them failed.
    broken: bool,
}

/// A [`BlockDevice`] on an NBD export. See the module documentation.
pub struct NbdDevice {
    target: NbdTarget,
    facts: ExportFacts,
    pool: Mutex<Pool>,
    idle: Condvar,
    /// Held shared by every request, exclusively while connections are
    /// rebuilt and the replay log replayed, and while flushing.
    world: RwLock<()>,
    replay: Mutex<ReplayLog>,
    reconnect_for: Duration,
    /// Asked before every write is sent or replayed (see
    /// [`NbdDevice::set_write_guard`]).
    write_guard: std::sync::OnceLock<WriteGuard>,
    /// Bound of every socket read and write (see
    /// [`NbdDevice::set_request_timeout`]).
    request_timeout: Mutex<Duration>,
}

/// Whether this appliance may still write to the pool.
pub type WriteGuard = Box<dyn Fn() -> bool + Send + Sync>;

impl NbdDevice {
    /// Cluster mode: `may_write` is asked before every write is sent, and
    /// before the replay log is replayed after a reconnection: once it says
    /// no (the appliance's lease may have ended, another may have taken its
    /// disks over), nothing more reaches the pool, not even writes
    /// acknowledged before: the replay is dropped and the device fails
    /// every later call. Set once.
    pub fn set_write_guard(&self, may_write: WriteGuard) {
        let _ = self.write_guard.set(may_write);
    }

    fn may_write(&self) -> bool {
        self.write_guard.get().is_none_or(|g| g())
    }

    /// Cluster mode: bounds the time a request may stay in flight. A
    /// request not answered within it fails its connection, which is reset
    /// (what it had not sent is dropped, never delivered later), and is
    /// retried on a new one, if the write guard still allows. Together
    /// with the fencing deadline this bounds when the last write of an
    /// appliance that lost its lease can reach the pool, which the
    /// takeover grace must cover.
    pub fn set_request_timeout(&self, timeout: Duration) {
        *self.request_timeout.lock() = timeout;
        for c in &self.pool.lock().idle {
            let _ = c.stream.set_timeout(timeout);
        }
    }

    fn request_timeout(&self) -> Duration {
        *self.request_timeout.lock()
    }

    fn refused(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: this appliance may no longer write to the pool (its lease may have ended)",
                self.target
            ),
        )
    }

    /// Connects to `uri` (see [`NbdTarget::parse`]).
    pub fn open(uri: &str) -> io::Result<NbdDevice> {
        let target =
            NbdTarget::parse(uri).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        NbdDevice::connect(target, Duration::from_secs(60))
    }

    /// Connects to `target`; a dropped connection is retried for up to
    /// `reconnect_for` before a call fails.
    pub fn connect(target: NbdTarget, reconnect_for: Duration) -> io::Result<NbdDevice> {
        let (conns, facts) = open_all(&target, IO_TIMEOUT)?;
        if facts.flags & TF_READ_ONLY != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{target}: the export is read-only"),
            ));
        }
        if facts.flags & TF_SEND_FLUSH == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{target}: the server cannot flush, so nothing written there could be made durable"),
            ));
        }
        Ok(NbdDevice {
            target,
            facts,
            pool: Mutex::new(Pool {
                idle: conns,
                generation: 0,
                broken: false,
            }),
            idle: Condvar::new(),
            world: RwLock::new(()),
            replay: Mutex::new(ReplayLog::default()),
            reconnect_for,
            write_guard: std::sync::OnceLock::new(),
            request_timeout: Mutex::new(IO_TIMEOUT),
        })
    }

    /// The address this device was opened with.
    pub fn target(&self) -> &NbdTarget {
        &self.target
    }

    /// Times the connections were rebuilt after a failure.
    pub fn reconnections(&self) -> u64 {
        self.pool.lock().generation
    }

    /// Bytes of acknowledged writes not yet covered by a flush.
    pub fn unflushed_bytes(&self) -> usize {
        self.replay.lock().bytes
    }

    /// Takes an idle connection (waiting for one), with the generation it
    /// belongs to; `None` when the connections are down.
    fn take(&self) -> Option<(Conn, u64)> {
        let mut pool = self.pool.lock();
        loop {
            if pool.broken {
                return None;
            }
            if let Some(c) = pool.idle.pop() {
                return Some((c, pool.generation));
            }
            self.idle.wait(&mut pool);
        }
    }

    fn give_back(&self, conn: Conn, generation: u64) {
        let mut pool = self.pool.lock();
        // A connection of an older generation was replaced: drop it.
        if pool.generation == generation {
            pool.idle.push(conn);
            self.idle.notify_one();
        }
    }

    /// Runs one request, reconnecting and retrying after connection
    /// failures, under the shared world lock.
    fn run(
        &self,
        command: Command,
        offset: u64,
        length: u32,
        mut data: Payload<'_>,
    ) -> io::Result<()> {
        let started = Instant::now();
        let writes = matches!(
            command,
            Command::Write | Command::Trim | Command::WriteZeroes
        );
        loop {
            if writes && !self.may_write() {
                return Err(self.refused());
            }
            let failed_generation = {
                let _world = self.world.read();
                match self.take() {
                    Some((mut conn, generation)) => {
                        let attempt = match &mut data {
                            Payload::None => Payload::None,
                            Payload::Write(w) => Payload::Write(w),
                            Payload::Read(r) => Payload::Read(r),
                        };
                        match conn.request(command, offset, length, attempt) {
                            Ok(()) => {
                                if let Payload::Write(payload) = data {
                                    // The one copy a write costs: kept
                                    // until a flush covers it.
                                    self.log_write(offset, payload);
                                }
                                self.give_back(conn, generation);
                                return Ok(());
                            }
                            Err(Failure::Server(e)) => {
                                self.give_back(conn, generation);
                                return Err(e);
                            }
                            Err(Failure::Connection(_)) => {
                                conn.stream.abort();
                                generation
                            }
                        }
                    }
                    None => self.pool.lock().generation,
                }
            };
            self.recover(failed_generation, started)?;
        }
    }

    fn log_write(&self, offset: u64, payload: &[u8]) {
        let mut log = self.replay.lock();
        log.next_seq += 1;
        let seq = log.next_seq;
        log.bytes += payload.len();
        log.writes.push_back((seq, offset, payload.to_vec()));
    }

    /// Rebuilds every connection (unless someone already did since
    /// `failed_generation`) and replays the log, holding every other
    /// request back. Fails once `started` is `reconnect_for` ago.
    fn recover(&self, failed_generation: u64, started: Instant) -> io::Result<()> {
        let _world = self.world.write();
        {
            let pool = self.pool.lock();
            if pool.generation != failed_generation && !pool.broken {
                return Ok(());
            }
        }
        let mut pause = Duration::from_millis(50);
        loop {
            if !self.replay.lock().writes.is_empty() && !self.may_write() {
                // Replaying now could overwrite what a new holder wrote.
                self.pool.lock().broken = true;
                return Err(self.refused());
            }
            match self.rebuild() {
                Ok(()) => return Ok(()),
                Err(e) if started.elapsed() >= self.reconnect_for => {
                    self.pool.lock().broken = true;
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{}: the pool's server is unreachable: {e}", self.target),
                    ));
                }
                Err(_) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// New connections, then the replay log written on them in order.
    /// The caller holds the world lock exclusively.
    fn rebuild(&self) -> io::Result<()> {
        let (mut conns, facts) = open_all(&self.target, self.request_timeout())?;
        if facts.size != self.facts.size {
            return Err(io::Error::other(format!(
                "{}: the export is now {} bytes, not {}",
                self.target, facts.size, self.facts.size
            )));
        }
        let log = self.replay.lock();
        let conn = conns
            .first_mut()
            .ok_or_else(|| io::Error::other("no connection"))?;
        for (_, offset, data) in &log.writes {
            for (at, chunk) in split(*offset, data.len(), self.facts.max_request) {
                let start = (at - offset) as usize;
                let piece = &data[start..start + chunk as usize];
                match conn.request(Command::Write, at, chunk, Payload::Write(piece)) {
                    Ok(()) => {}
                    Err(Failure::Server(e)) | Err(Failure::Connection(e)) => {
                        for c in conns {
                            c.stream.abort();
                        }
                        return Err(e);
                    }
                }
            }
        }
        drop(log);
        let mut pool = self.pool.lock();
        pool.idle = conns;
        pool.generation += 1;
        pool.broken = false;
        self.idle.notify_all();
        Ok(())
    }

    /// `NBD_CMD_FLUSH` on every connection (one with `CAN_MULTI_CONN`),
    /// with every other request held back; then the replay log forgets
    /// what it covered.
    fn flush_all(&self) -> io::Result<()> {
        let started = Instant::now();
        loop {
            let failed_generation = {
                let _world = self.world.write();
                let covered = self.replay.lock().next_seq;
                let (conns, generation) = {
                    let mut pool = self.pool.lock();
                    if pool.broken {
                        (Vec::new(), pool.generation)
                    } else {
                        (std::mem::take(&mut pool.idle), pool.generation)
                    }
                };
                let mut result = if conns.is_empty() { Err(None) } else { Ok(()) };
                let mut flushed = Vec::with_capacity(conns.len());
                let multi = self.facts.flags & TF_CAN_MULTI_CONN != 0;
                for (i, mut conn) in conns.into_iter().enumerate() {
                    if result.is_ok() && (i == 0 || !multi) {
                        match conn.request(Command::Flush, 0, 0, Payload::None) {
                            Ok(()) => {}
                            Err(Failure::Server(e)) => result = Err(Some(e)),
                            Err(Failure::Connection(_)) => result = Err(None),
                        }
                    }
                    flushed.push(conn);
                }
                {
                    let mut pool = self.pool.lock();
                    if pool.generation == generation {
                        pool.idle.append(&mut flushed);
                        self.idle.notify_all();
                    }
                }
                match result {
                    Ok(()) => {
                        let mut log = self.replay.lock();
                        while log.writes.front().is_some_and(|w| w.0 <= covered) {
                            if let Some((_, _, d)) = log.writes.pop_front() {
                                log.bytes -= d.len();
                            }
                        }
                        return Ok(());
                    }
                    Err(Some(e)) => return Err(e),
                    Err(None) => generation,
                }
            };
            self.recover(failed_generation, started)?;
        }
    }
}

/// Opens `target.connections` connections and checks they agree.
fn open_all(target: &NbdTarget, timeout: Duration) -> io::Result<(Vec<Conn>, ExportFacts)> {
    let mut conns = Vec::with_capacity(target.connections);
    let mut facts = None;
    for _ in 0..target.connections {
        let mut stream = Stream::connect(&target.addr, timeout)
            .map_err(|e| io::Error::new(e.kind(), format!("{target}: {e}")))?;
        let f = negotiate(&mut stream, &target.export)?;
        if facts.is_some_and(|old| old != f) {
            return Err(protocol("the server's connections disagree on the export"));
        }
        facts = Some(f);
        conns.push(Conn {
            stream,
            next_cookie: 0,
        });
    }
    let facts = facts
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no connection asked for"))?;
    Ok((conns, facts))
}

/// `[offset, offset+len)` in pieces of at most `max` bytes.
fn split(offset: u64, len: usize, max: u32) -> impl Iterator<Item = (u64, u32)> {
    let max = u64::from(max.max(1));
    let end = offset + len as u64;
    let mut at = offset;
    std::iter::from_fn(move || {
        (at < end).then(|| {
            let n = (end - at).min(max);
            let piece = (at, n as u32);
            at += n;
            piece
        })
    })
}

impl BlockDevice for NbdDevice {
    fn len(&self) -> u64 {
        self.facts.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.facts.size, offset, buf.len() as u64)?;
        for (at, n) in split(offset, buf.len(), self.facts.max_request) {
            let start = (at - offset) as usize;
            self.run(
                Command::Read,
                at,
                n,
                Payload::Read(&mut buf[start..start + n as usize]),
            )?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.facts.size, offset, buf.len() as u64)?;
        for (at, n) in split(offset, buf.len(), self.facts.max_request) {
            let start = (at - offset) as usize;
            let piece = &buf[start..start + n as usize];
            self.run(Command::Write, at, n, Payload::Write(piece))?;
        }
        if self.replay.lock().bytes > REPLAY_LIMIT {
            self.flush_all()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flush_all()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.facts.size, offset, len)?;
        if self.facts.flags & TF_SEND_TRIM == 0 {
            return Ok(());
        }
        for (at, n) in split(offset, len as usize, self.facts.max_request) {
            self.run(Command::Trim, at, n, Payload::None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let t = NbdTarget::parse("nbd://10.0.0.1/pool").unwrap();
        assert_eq!(t.addr, NbdAddr::Tcp("10.0.0.1:10809".into()));
        assert_eq!(
            (t.export.as_str(), t.connections),
            ("pool", DEFAULT_CONNECTIONS)
        );
        let t = NbdTarget::parse("nbd://[::1]:2000/p?connections=2").unwrap();
        assert_eq!(t.addr, NbdAddr::Tcp("[::1]:2000".into()));
        assert_eq!(t.connections, 2);
        assert_eq!(
            NbdTarget::parse("nbd://[::1]/p").unwrap().addr,
            NbdAddr::Tcp("[::1]:10809".into())
        );
        let t = NbdTarget::parse("nbd+unix:///pool?socket=/run/p.sock").unwrap();
        assert_eq!(t.addr, NbdAddr::Unix("/run/p.sock".into()));
        assert_eq!(t.to_string(), "nbd+unix:///pool?socket=/run/p.sock");
        for bad in [
            "nbd+unix:///pool",
            "nbd+unix://host/pool?socket=/x",
            "nbd:///pool",
            "nbd://h/p?connections=0",
            "nbd://h/p?socket=/x",
            "nbd://h/p?color=red",
            "file:///x",
        ] {
            assert!(NbdTarget::parse(bad).is_err(), "{bad} was taken");
        }
        assert!(NbdTarget::is_uri("nbd://h/p") && !NbdTarget::is_uri("/var/lib/p.px"));
    }

    #[test]
    fn splitting() {
        let v: Vec<_> = split(100, 10, 4).collect();
        assert_eq!(v, vec![(100, 4), (104, 4), (108, 2)]);
        assert_eq!(split(0, 0, 4).count(), 0);
    }
}
