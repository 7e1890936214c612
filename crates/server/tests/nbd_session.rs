//! The NBD server driven by a hand-written client over an in-memory pipe,
//! on a store in a [`CrashDevice`] (so that "durable" means what reached
//! the device before its last flush). Covers the protocol's error replies,
//! read-only snapshot exports, disconnects on hostile input, concurrent
//! requests on one connection, the multi-connection flush guarantee, and
//! snapshot atomicity against a writer.

use parallax_device::CrashDevice;
use parallax_engine::{CreateOptions, OpenOptions, ReadDisk, Store};
use parallax_nbd::proto::{self, Command, Request};
use parallax_server::nbd::serve_connection;
use parallax_server::service::Service;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;

const DISK: u64 = 16 << 20;

struct Fixture {
    dev: Arc<CrashDevice>,
    service: Arc<Service>,
    shutdown: watch::Sender<bool>,
}

fn fixture() -> Fixture {
    let dev = Arc::new(CrashDevice::new(64 << 20));
    let store = Store::create(dev.clone(), &CreateOptions::default()).unwrap();
    store.create_vdi("d", DISK).unwrap();
    let service = Arc::new(Service::new(store, "/nonexistent".into(), false));
    let (shutdown, _) = watch::channel(false);
    Fixture {
        dev,
        service,
        shutdown,
    }
}

impl Fixture {
    /// Takes snapshot `name` of disk `d` (durable on return).
    fn snapshot(&self, name: &str) {
        let vdi = self.service.store().open_vdi("d").unwrap();
        vdi.snapshot(Some(name)).unwrap();
    }

    /// The store as it would reopen after a power cut now.
    fn durable_store(&self) -> Store {
        let dev = Arc::new(CrashDevice::from_durable(self.dev.durable_image()));
        Store::open(dev, &OpenOptions::default()).unwrap()
    }

    /// A raw connection with the server running on its other end.
    fn raw(&self) -> DuplexStream {
        let (client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(serve_connection(
            server,
            "test".into(),
            self.service.clone(),
            self.shutdown.subscribe(),
        ));
        client
    }

    /// A negotiated connection (structured replies and base:allocation
    /// when `structured`).
    async fn connect(&self, export: &str, structured: bool) -> Client {
        let mut s = self.raw();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).await.unwrap();
        let mut c = Client {
            s,
            reads: Default::default(),
        };
        if structured {
            c.option(proto::OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(c.option_reply().await.0, proto::REP_ACK);
            let mut data = Vec::new();
            data.extend_from_slice(&(export.len() as u32).to_be_bytes());
            data.extend_from_slice(export.as_bytes());
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&15u32.to_be_bytes());
            data.extend_from_slice(b"base:allocation");
            c.option(proto::OPT_SET_META_CONTEXT, &data).await;
            assert_eq!(c.option_reply().await.0, proto::REP_META_CONTEXT);
            assert_eq!(c.option_reply().await.0, proto::REP_ACK);
        }
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        c.option(proto::OPT_GO, &data).await;
        loop {
            let (kind, _) = c.option_reply().await;
            assert!(kind & proto::REP_FLAG_ERROR == 0, "GO failed: {kind:#x}");
            if kind == proto::REP_ACK {
                break;
            }
        }
        c
    }
}

struct Client {
    s: DuplexStream,
    /// Lengths of READs in flight: a simple reply's data follows its header.
    reads: std::collections::HashMap<u64, u32>,
}

/// A reply as the client sees it.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    cookie: u64,
    error: u32,
    data: Vec<u8>,
    /// (length, flags) of a block status reply.
    extents: Vec<(u32, u32)>,
    /// It came as structured reply chunks.
    structured: bool,
    /// The message of an error chunk.
    message: String,
}

impl Client {
    async fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).await.unwrap();
    }

    async fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).await.unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).await.unwrap();
        (kind, data)
    }

    async fn send(&mut self, command: Command, flags: u16, cookie: u64, offset: u64, len: u32) {
        let request = Request {
            flags,
            command,
            cookie,
            offset,
            length: len,
        };
        let h = request.encode();
        assert_eq!(Request::decode(&h).unwrap(), request);
        if command == Command::Read {
            self.reads.insert(cookie, len);
        }
        self.s.write_all(&h).await.unwrap();
    }

    async fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.send(Command::Write, 0, cookie, offset, data.len() as u32)
            .await;
        self.s.write_all(data).await.unwrap();
    }

    /// Reads one complete reply (all chunks of a structured one).
    /// `None` when the server closed the connection.
    async fn reply(&mut self) -> Option<Reply> {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).await.ok()?;
        let mut r = Reply {
            cookie: 0,
            error: 0,
            data: Vec::new(),
            extents: Vec::new(),
            structured: false,
            message: String::new(),
        };
        match u32::from_be_bytes(magic) {
            proto::SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).await.ok()?;
                r.error = u32::from_be_bytes(h[..4].try_into().unwrap());
                r.cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                if let Some(len) = self.reads.remove(&r.cookie) {
                    if r.error == 0 {
                        r.data = vec![0u8; len as usize];
                        self.s.read_exact(&mut r.data).await.ok()?;
                    }
                }
                Some(r)
            }
            proto::STRUCTURED_REPLY_MAGIC => loop {
                r.structured = true;
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).await.ok()?;
                let flags = u16::from_be_bytes(h[..2].try_into().unwrap());
                let kind = u16::from_be_bytes(h[2..4].try_into().unwrap());
                r.cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                self.reads.remove(&r.cookie);
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut p = vec![0u8; len as usize];
                self.s.read_exact(&mut p).await.ok()?;
                match kind {
                    proto::REPLY_TYPE_OFFSET_DATA => {
                        // The spec: at least the offset and one byte.
                        assert!(len >= 9, "an OFFSET_DATA chunk of length {len}");
                        r.data.extend_from_slice(&p[8..])
                    }
                    proto::REPLY_TYPE_ERROR => {
                        r.error = u32::from_be_bytes(p[..4].try_into().unwrap());
                        let n = u16::from_be_bytes(p[4..6].try_into().unwrap()) as usize;
                        r.message = String::from_utf8_lossy(&p[6..6 + n]).into_owned();
                    }
                    proto::REPLY_TYPE_BLOCK_STATUS => {
                        for d in p[4..].chunks(8) {
                            r.extents.push((
                                u32::from_be_bytes(d[..4].try_into().unwrap()),
                                u32::from_be_bytes(d[4..].try_into().unwrap()),
                            ));
                        }
                    }
                    proto::REPLY_TYPE_NONE => {}
                    other => panic!("unexpected chunk type {other}"),
                }
                if flags & proto::REPLY_FLAG_DONE != 0 {
                    return Some(r);
                }
                // The next chunk's magic.
                self.s.read_exact(&mut magic).await.ok()?;
            },
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    async fn ok(&mut self, cookie: u64) -> Reply {
        let r = self.reply().await.expect("connection closed");
        assert_eq!((r.cookie, r.error), (cookie, 0), "request {cookie} failed");
        r
    }

    async fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.send(Command::Read, 0, cookie, offset, len).await;
        self.ok(cookie).await.data
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_flush_reach_the_device() {
    for structured in [false, true] {
        let f = fixture();
        let mut c = f.connect("d", structured).await;
        let a = pattern(1, 10_000);
        c.write(1, 4095, &a).await;
        c.ok(1).await;
        assert!(c.read(2, 4095, a.len() as u32).await == a);
        // Unwritten space reads as zeros.
        assert!(c.read(3, 1 << 20, 4096).await == vec![0; 4096]);
        c.send(Command::Flush, 0, 4, 0, 0).await;
        c.ok(4).await;
        let durable = f.durable_store().open_vdi("d").unwrap();
        let mut back = vec![0u8; a.len()];
        durable.read(&mut back, 4095).unwrap();
        let first_bad = back.iter().zip(&a).position(|(x, y)| x != y);
        assert_eq!(first_bad, None, "structured={structured}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fua_write_is_durable_without_a_flush() {
    let f = fixture();
    let mut c = f.connect("d", true).await;
    let a = pattern(7, 8192);
    c.send(Command::Write, proto::CMD_FLAG_FUA, 1, 8192, 8192)
        .await;
    c.s.write_all(&a).await.unwrap();
    c.ok(1).await;
    let mut back = vec![0u8; 8192];
    f.durable_store()
        .open_vdi("d")
        .unwrap()
        .read(&mut back, 8192)
        .unwrap();
    assert!(back == a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_error_replies_and_the_connection_goes_on() {
    let f = fixture();
    let mut c = f.connect("d", true).await;
    // Read past the end: structured error EINVAL.
    c.send(Command::Read, 0, 1, DISK - 100, 4096).await;
    assert_eq!(c.reply().await.unwrap().error, proto::EINVAL);
    // Offset overflow.
    c.send(Command::Read, 0, 2, u64::MAX - 10, 4096).await;
    assert_eq!(c.reply().await.unwrap().error, proto::EINVAL);
    // Absurd read length.
    c.send(Command::Read, 0, 3, 0, u32::MAX).await;
    assert_eq!(c.reply().await.unwrap().error, proto::EINVAL);
    // Write past the end: ENOSPC, and the payload is consumed.
    c.write(4, DISK - 10, &[9u8; 100]).await;
    assert_eq!(c.reply().await.unwrap().error, proto::ENOSPC);
    // Unknown command.
    c.send(Command::Unknown(99), 0, 5, 0, 0).await;
    assert_eq!(c.reply().await.unwrap().error, proto::EINVAL);
    // FAST_ZERO with NO_HOLE cannot be fast.
    c.send(
        Command::WriteZeroes,
        proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO,
        6,
        0,
        4096,
    )
    .await;
    assert_eq!(c.reply().await.unwrap().error, proto::ENOTSUP);
    // Still works.
    c.write(7, 0, &[5u8; 512]).await;
    c.ok(7).await;
    assert!(c.read(8, 0, 512).await == vec![5u8; 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_reports_data_holes_and_zeroes() {
    let f = fixture();
    let mut c = f.connect("d", true).await;
    c.write(1, 0, &pattern(3, 1 << 20)).await;
    c.ok(1).await;
    c.send(Command::WriteZeroes, 0, 2, 64 << 10, 64 << 10).await;
    c.ok(2).await;
    c.send(Command::Trim, 0, 3, 512 << 10, 4096).await;
    c.ok(3).await;
    c.send(Command::BlockStatus, 0, 4, 0, 2 << 20).await;
    let r = c.ok(4).await;
    let hz = proto::STATE_HOLE | proto::STATE_ZERO;
    assert_eq!(
        r.extents,
        vec![
            (64 << 10, 0),
            (64 << 10, hz),
            ((512 - 128) << 10, 0),
            (4096, hz),
            ((512 << 10) - 4096, 0),
            (1 << 20, hz),
        ]
    );
    c.send(Command::BlockStatus, proto::CMD_FLAG_REQ_ONE, 5, 0, 2 << 20)
        .await;
    assert_eq!(c.ok(5).await.extents, vec![(64 << 10, 0)]);
    // NO_HOLE zeroes stay allocated.
    c.send(Command::WriteZeroes, proto::CMD_FLAG_NO_HOLE, 6, 0, 4096)
        .await;
    c.ok(6).await;
    c.send(Command::BlockStatus, proto::CMD_FLAG_REQ_ONE, 7, 0, 4096)
        .await;
    assert_eq!(c.ok(7).await.extents, vec![(4096, 0)]);
    assert!(c.read(8, 0, 4096).await == vec![0u8; 4096]);
    // Without a negotiated context, BLOCK_STATUS is invalid.
    let mut plain = f.connect("d", false).await;
    plain.send(Command::BlockStatus, 0, 9, 0, 4096).await;
    assert_eq!(plain.reply().await.unwrap().error, proto::EINVAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_exports_are_read_only() {
    let f = fixture();
    let mut c = f.connect("d", true).await;
    c.write(1, 0, &[0xab; 4096]).await;
    c.ok(1).await;
    f.snapshot("s1");
    c.write(2, 0, &[0xcd; 4096]).await;
    c.ok(2).await;
    let mut s = f.connect("d@s1", true).await;
    assert!(s.read(1, 0, 4096).await == vec![0xab; 4096]);
    s.write(2, 0, &[1; 4096]).await;
    assert_eq!(s.reply().await.unwrap().error, proto::EPERM);
    s.send(Command::Trim, 0, 3, 0, 4096).await;
    assert_eq!(s.reply().await.unwrap().error, proto::EPERM);
    s.send(Command::WriteZeroes, 0, 4, 0, 4096).await;
    assert_eq!(s.reply().await.unwrap().error, proto::EPERM);
    assert!(s.read(5, 0, 4096).await == vec![0xab; 4096]);
    assert!(c.read(3, 0, 4096).await == vec![0xcd; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_drops_only_that_client() {
    let f = fixture();
    let mut good = f.connect("d", true).await;
    good.write(1, 0, &[1; 4096]).await;
    good.ok(1).await;

    // Bad request magic: disconnected.
    let mut bad = f.connect("d", true).await;
    bad.s.write_all(&[0xff; 28]).await.unwrap();
    assert!(bad.reply().await.is_none());

    // A write larger than the maximum payload: disconnected, not buffered.
    let mut big = f.connect("d", false).await;
    big.send(Command::Write, 0, 1, 0, u32::MAX).await;
    assert!(big.reply().await.is_none());

    // Garbage instead of a handshake.
    let mut raw = f.raw();
    let mut greeting = [0u8; 18];
    raw.read_exact(&mut greeting).await.unwrap();
    raw.write_all(&[0xee; 4096]).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the server kept a garbage client open");

    // A client that vanishes in the middle of a write payload.
    let mut gone = f.connect("d", false).await;
    gone.send(Command::Write, 0, 1, 0, 8192).await;
    gone.s.write_all(&[3; 100]).await.unwrap();
    drop(gone);

    good.write(2, 4096, &[2; 4096]).await;
    good.ok(2).await;
    assert!(good.read(3, 0, 4096).await == vec![1; 4096]);
    assert!(good.read(4, 4096, 4096).await == vec![2; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_on_one_connection() {
    let f = fixture();
    let mut c = f.connect("d", true).await;
    let n = 200u64;
    for i in 0..n {
        c.write(i, i * 4096, &[i as u8; 4096]).await;
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let r = c.reply().await.unwrap();
        assert_eq!(r.error, 0);
        assert!(seen.insert(r.cookie), "cookie {} twice", r.cookie);
    }
    for i in 0..n {
        c.send(Command::Read, 0, 1000 + i, i * 4096, 4096).await;
    }
    for _ in 0..n {
        let r = c.reply().await.unwrap();
        let i = r.cookie - 1000;
        assert!(i < n);
        assert!(r.data == vec![i as u8; 4096]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_on_one_connection_makes_all_connections_writes_durable() {
    let f = fixture();
    let mut a = f.connect("d", true).await;
    let mut b = f.connect("d", false).await;
    a.write(1, 0, &[0xa1; 65536]).await;
    a.ok(1).await;
    b.write(1, 1 << 20, &[0xb2; 4096]).await;
    b.ok(1).await;
    b.send(Command::Flush, 0, 2, 0, 0).await;
    b.ok(2).await;
    let d = f.durable_store().open_vdi("d").unwrap();
    let mut back = vec![0u8; 65536];
    d.read(&mut back, 0).unwrap();
    assert_eq!(back, vec![0xa1; 65536]);
    let mut back = vec![0u8; 4096];
    d.read(&mut back, 1 << 20).unwrap();
    assert_eq!(back, vec![0xb2; 4096]);
}

/// A writer puts increasing counters in one block, waiting for each
/// acknowledgement; snapshots taken meanwhile must each hold a counter at
/// least the last one acknowledged before the snapshot began and at most
/// the last one sent before it returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_hold_exactly_the_completed_writes() {
    let f = fixture();
    let mut c = f.connect("d", false).await;
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (a2, s2) = (acked.clone(), sent.clone());
    let writer = tokio::spawn(async move {
        for v in 1..=3000u64 {
            s2.store(v, std::sync::atomic::Ordering::SeqCst);
            let mut block = [0u8; 4096];
            block[..8].copy_from_slice(&v.to_le_bytes());
            c.write(v, 12288, &block).await;
            c.ok(v).await;
            a2.store(v, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let vdi = f.service.store().open_vdi("d").unwrap();
    let mut taken = Vec::new();
    for i in 0..30 {
        let low = acked.load(std::sync::atomic::Ordering::SeqCst);
        let v2 = vdi.clone();
        let name = format!("s{i}");
        tokio::task::spawn_blocking(move || v2.snapshot(Some(&name)).unwrap())
            .await
            .unwrap();
        let high = sent.load(std::sync::atomic::Ordering::SeqCst);
        taken.push((format!("s{i}"), low, high));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    writer.await.unwrap();
    for (name, low, high) in taken {
        let view = f.service.store().open_snapshot("d", &name).unwrap();
        let mut b = [0u8; 8];
        view.read(&mut b, 12288).unwrap();
        let v = u64::from_le_bytes(b);
        assert!(
            low <= v && v <= high,
            "snapshot {name} holds {v}, outside [{low}, {high}]"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_export_and_shutdown() {
    let f = fixture();
    let mut raw = f.raw();
    let mut greeting = [0u8; 18];
    raw.read_exact(&mut greeting).await.unwrap();
    raw.write_all(&3u32.to_be_bytes()).await.unwrap();
    let mut c = Client {
        s: raw,
        reads: Default::default(),
    };
    let mut data = Vec::new();
    data.extend_from_slice(&4u32.to_be_bytes());
    data.extend_from_slice(b"nope");
    data.extend_from_slice(&0u16.to_be_bytes());
    c.option(proto::OPT_GO, &data).await;
    assert_eq!(c.option_reply().await.0, proto::REP_ERR_UNKNOWN);

    // Shutdown: the connection stops taking requests and closes.
    let mut live = f.connect("d", true).await;
    live.write(1, 0, &[4; 4096]).await;
    live.ok(1).await;
    f.shutdown.send(true).unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), live.s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "shutdown left a connection open");
    // The client left without a flush: the store still holds its write and
    // commits it once the disk is idle (the daemon's settle tick).
    let zero = Duration::ZERO;
    let settled = f.service.store().settle(zero, zero).unwrap();
    assert_eq!(settled.committed, 1, "the idle disk was not committed");
    let mut back = vec![0u8; 4096];
    f.durable_store()
        .open_vdi("d")
        .unwrap()
        .read(&mut back, 0)
        .unwrap();
    assert!(back == vec![4; 4096], "the write did not reach the device");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycled_read_buffers_never_show_earlier_bytes() {
    // READ buffers come from a pool and keep the bytes of earlier requests:
    // every byte of a reply must still be the disk's, zeros for holes.
    let f = fixture();
    let mut c = f.connect("d", true).await;
    let mut cookie = 1;
    for len in [3000usize, 4096, 65536, 1 << 20] {
        let data = pattern(len as u8, len);
        c.write(cookie, 0, &data).await;
        c.ok(cookie).await;
        cookie += 1;
        assert!(c.read(cookie, 0, len as u32).await == data, "{len}");
        cookie += 1;
        // A hole of the same size, and a range half data, half hole.
        assert!(
            c.read(cookie, 4 << 20, len as u32).await == vec![0; len],
            "{len}"
        );
        cookie += 1;
        let half = len / 2;
        let mut want = data[half..].to_vec();
        want.resize(len, 0);
        let got = c.read(cookie, half as u64, len as u32).await;
        assert!(got == want, "{len}: data then hole");
        cookie += 1;
    }
}

/// A handshake that must wait for a disk's lock (here: behind a snapshot
/// that waits for an in-place planned write to finish) waits off the
/// runtime's threads: the runtime goes on running other tasks, among them
/// the ones that finish planned I/O. (On its one worker thread, a lookup
/// that blocked there stopped everything: the soak's deadlock.)
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_handshake_waiting_for_a_disk_lock_leaves_the_runtime_running() {
    let f = fixture();
    let vdi = f.service.store().open_vdi("d").unwrap();
    vdi.write(&[1; 4096], 0).unwrap();
    vdi.flush().unwrap();
    // An in-place write in flight: the disk is held shared until it ends.
    let plan = vdi.try_plan_write(0, 4096).unwrap().expect("a plan");
    let snapper = vdi.clone();
    let snapshot = std::thread::spawn(move || snapper.snapshot(Some("s")).unwrap());
    // The snapshot now waits for the plan, and new readers wait behind it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let connecting = tokio::spawn(async move {
        let c = f.connect("d", false).await;
        drop(c);
        f
    });
    std::thread::sleep(Duration::from_millis(100));
    // Waited for with std primitives: with the runtime stuck, its timers
    // would never fire.
    let (tx, rx) = std::sync::mpsc::channel();
    tokio::spawn(async move { tx.send(7).unwrap() });
    let ran = rx.recv_timeout(Duration::from_secs(3));
    plan.finish(true);
    assert_eq!(
        ran,
        Ok(7),
        "the runtime stopped while a handshake waited for a disk lock"
    );
    snapshot.join().unwrap();
    tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .expect("the handshake never finished")
        .unwrap();
}

/// What `doc/proto.md` says a server SHOULD (for CACHE: MUST) reject gets
/// EINVAL, with simple and structured replies alike: a READ of length 0
/// (no valid data chunk can carry it), command flags nobody defined, and
/// flags that do not apply to the command. The flags that do apply are
/// accepted, and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_spec_rejects_get_einval() {
    use proto::{
        CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE,
    };
    for structured in [false, true] {
        let f = fixture();
        let mut c = f.connect("d", structured).await;
        let mut cookie = 0;
        let mut rejected = |command, flags: u16, len: u32| {
            cookie += 1;
            (command, flags, len, cookie)
        };
        let mut cases = vec![
            rejected(Command::Read, 0, 0),
            rejected(Command::Read, CMD_FLAG_NO_HOLE, 4096),
            rejected(Command::Read, CMD_FLAG_REQ_ONE, 4096),
            rejected(Command::Read, CMD_FLAG_FAST_ZERO, 4096),
            rejected(Command::Trim, CMD_FLAG_FAST_ZERO, 4096),
            rejected(Command::Trim, CMD_FLAG_NO_HOLE, 4096),
            rejected(Command::Flush, CMD_FLAG_REQ_ONE, 0),
            rejected(Command::Cache, CMD_FLAG_REQ_ONE, 4096),
            rejected(Command::Cache, CMD_FLAG_NO_HOLE, 4096),
            rejected(Command::WriteZeroes, CMD_FLAG_REQ_ONE, 4096),
        ];
        for unknown in [0x20u16, 0x40, 0x80, 0x8000] {
            for command in [Command::Read, Command::Flush, Command::Trim, Command::Cache] {
                cases.push(rejected(command, unknown, 4096));
            }
        }
        if !structured {
            // DF applies only with structured replies.
            cases.push(rejected(Command::Read, CMD_FLAG_DF, 4096));
        }
        for &(command, flags, len, cookie) in &cases {
            c.send(command, flags, cookie, 0, len).await;
            let r = c.reply().await.expect("connection closed");
            assert_eq!(
                (r.cookie, r.error),
                (cookie, proto::EINVAL),
                "{command:?} with flags {flags:#x}, length {len} (structured={structured})"
            );
        }
        // A WRITE with a flag that is not its own: EINVAL, its payload
        // consumed, nothing written.
        for (k, flags) in [CMD_FLAG_DF, CMD_FLAG_NO_HOLE, 0x40]
            .into_iter()
            .enumerate()
        {
            let cookie = 100 + k as u64;
            c.send(Command::Write, flags, cookie, 0, 4096).await;
            c.s.write_all(&[0xee; 4096]).await.unwrap();
            assert_eq!(c.reply().await.unwrap().error, proto::EINVAL);
        }
        assert!(c.read(200, 0, 4096).await == vec![0; 4096]);
        // The flags that apply are taken.
        c.send(Command::Read, CMD_FLAG_FUA, 201, 0, 4096).await;
        c.ok(201).await;
        c.send(Command::Flush, CMD_FLAG_FUA, 202, 0, 0).await;
        c.ok(202).await;
        c.send(Command::Cache, 0, 203, 0, 4096).await;
        c.ok(203).await;
        c.send(
            Command::WriteZeroes,
            CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
            204,
            0,
            4096,
        )
        .await;
        c.ok(204).await;
        if structured {
            c.send(Command::Read, CMD_FLAG_DF, 205, 0, 4096).await;
            c.ok(205).await;
            c.send(Command::BlockStatus, CMD_FLAG_REQ_ONE, 206, 0, 4096)
                .await;
            c.ok(206).await;
        }
        c.write(207, 0, &[5u8; 512]).await;
        c.ok(207).await;
        assert!(c.read(208, 0, 512).await == vec![5u8; 512]);
    }
}

/// `NBD_OPT_LIST`: the disks; with `--list-snapshots`, their snapshot
/// exports (`NAME@SNAP`) too, which `NBD_OPT_GO` opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_list_has_snapshots_when_asked() {
    async fn listed(f: &Fixture) -> Vec<String> {
        let mut s = f.raw();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.unwrap();
        s.write_all(&3u32.to_be_bytes()).await.unwrap();
        let mut c = Client {
            s,
            reads: Default::default(),
        };
        c.option(proto::OPT_LIST, &[]).await;
        let mut names = Vec::new();
        loop {
            let (kind, data) = c.option_reply().await;
            if kind == proto::REP_ACK {
                break;
            }
            assert_eq!(kind, proto::REP_SERVER);
            let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
            names.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
        }
        names.sort();
        names
    }
    let f = fixture();
    f.snapshot("s1");
    assert_eq!(listed(&f).await, ["d"]);
    let dev = Arc::new(CrashDevice::from_durable(f.dev.durable_image()));
    let store = Store::open(dev, &OpenOptions::default()).unwrap();
    let listing = Fixture {
        dev: f.dev.clone(),
        service: Arc::new(
            Service::new(store, "/nonexistent".into(), false).with_listed_snapshots(true),
        ),
        shutdown: watch::channel(false).0,
    };
    assert_eq!(listed(&listing).await, ["d", "d@s1"]);
    let mut c = listing.connect("d@s1", true).await;
    assert!(c.read(1, 0, 4096).await == vec![0; 4096]);
}

/// Every command with every single flag bit, on a writable and a read-only
/// export, with simple and structured replies: the reply is what the spec
/// asks for. A flag that does not apply (or that nobody defined) is
/// EINVAL; otherwise the command's own outcome (EPERM for a change to a
/// read-only export, EINVAL for BLOCK_STATUS without a metadata context).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flag_on_every_command_gets_the_reply_the_spec_asks_for() {
    use proto::{
        CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE,
    };
    let commands = [
        Command::Read,
        Command::Write,
        Command::Flush,
        Command::Trim,
        Command::WriteZeroes,
        Command::Cache,
        Command::BlockStatus,
    ];
    let f = fixture();
    f.snapshot("s1");
    let mut checked = 0;
    for export in ["d", "d@s1"] {
        let read_only = export.contains('@');
        for structured in [false, true] {
            let mut c = f.connect(export, structured).await;
            let mut cookie = 0;
            for command in commands {
                for bit in 0..16 {
                    let flag = 1u16 << bit;
                    let mut allowed = if read_only { 0 } else { CMD_FLAG_FUA };
                    allowed |= match command {
                        Command::Read if structured => CMD_FLAG_DF,
                        Command::WriteZeroes => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                        Command::BlockStatus => CMD_FLAG_REQ_ONE,
                        _ => 0,
                    };
                    let want = if flag & !allowed != 0 {
                        proto::EINVAL
                    } else {
                        match command {
                            Command::Write | Command::Trim | Command::WriteZeroes if read_only => {
                                proto::EPERM
                            }
                            Command::BlockStatus if !structured => proto::EINVAL,
                            _ => 0,
                        }
                    };
                    cookie += 1;
                    c.send(command, flag, cookie, 0, 4096).await;
                    if command == Command::Write {
                        c.s.write_all(&[0x11; 4096]).await.unwrap();
                    }
                    let r = c.reply().await.expect("connection closed");
                    assert_eq!(
                        (r.cookie, r.error),
                        (cookie, want),
                        "{command:?} flag {flag:#x} on {export} (structured={structured})"
                    );
                    // With structured replies, every error is an error
                    // chunk with a message (a READ's MUST, the others'
                    // SHOULD).
                    if structured && want != 0 {
                        assert!(r.structured, "{command:?} flag {flag:#x}: a simple error");
                        assert!(
                            !r.message.is_empty(),
                            "{command:?} flag {flag:#x}: no message"
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 2 * 2 * 7 * 16);
}

/// A daemon shutting down answers a client still negotiating with
/// NBD_REP_ERR_SHUTDOWN (the spec's SHOULD), then closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_negotiation_is_told_to_the_client() {
    let f = fixture();
    let mut s = f.raw();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    let mut c = Client {
        s,
        reads: Default::default(),
    };
    c.option(proto::OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.option_reply().await.0, proto::REP_ACK);
    f.shutdown.send(true).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    c.option(proto::OPT_LIST, &[]).await;
    assert_eq!(c.option_reply().await.0, proto::REP_ERR_SHUTDOWN);
    // Then the connection closes, even if the client says nothing more.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        c.s.read_to_end(&mut rest),
    )
    .await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
}
