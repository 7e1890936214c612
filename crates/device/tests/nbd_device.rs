//! The NBD pool backend against real servers: `qemu-nbd` on a file, and
//! `nbdkit memory` (which loses everything when it restarts, so it shows
//! what the replay log gives back). Every server runs on a Unix socket in a
//! temporary directory and is stopped by its PID.

use parallax_device::{BlockDevice, NbdDevice, NbdTarget, REPLAY_LIMIT};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    if std::env::var_os("PARALLAX_SKIP_NBD_TESTS").is_some_and(|v| v == "1") {
        eprintln!("{tool} not found: skipping (PARALLAX_SKIP_NBD_TESTS=1)");
        return false;
    }
    panic!("this test needs {tool} (scripts/install-deps.sh installs it); set PARALLAX_SKIP_NBD_TESTS=1 to skip it");
}

/// A server process, killed by PID when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never came up",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qemu_nbd(file: &Path, socket: &Path, extra: &[&str]) -> Server {
    let child = Command::new("qemu-nbd")
        .args([
            "--format=raw",
            "--persistent",
            "--shared=16",
            "--cache=writeback",
        ])
        .args(extra)
        .arg(format!("--socket={}", socket.display()))
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    wait_for_socket(socket);
    Server(child)
}

/// A sparse pool file of `size` bytes in `dir`.
fn pool_file(dir: &Path, size: u64) -> PathBuf {
    let file = dir.join("pool.raw");
    std::fs::File::create(&file).unwrap().set_len(size).unwrap();
    file
}

fn nbdkit_memory(socket: &Path, size: &str) -> Server {
    let _ = std::fs::remove_file(socket);
    let child = Command::new("nbdkit")
        .args(["--foreground", "--unix"])
        .arg(socket)
        .args(["memory", size])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit");
    wait_for_socket(socket);
    Server(child)
}

fn uri(socket: &Path, connections: usize) -> String {
    format!(
        "nbd+unix:///?socket={}&connections={connections}",
        socket.display()
    )
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed | 1)
        .collect()
}

/// Reads, writes from several threads at once, requests larger than the
/// server's maximum, flush, discard and range errors, checked against the
/// file qemu-nbd serves.
#[test]
fn a_pool_served_by_qemu_nbd() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = pool_file(dir.path(), 96 * MIB);
    let socket = dir.path().join("pool.sock");
    let _server = qemu_nbd(&file, &socket, &[]);
    let dev = Arc::new(NbdDevice::open(&uri(&socket, 4)).unwrap());
    assert_eq!(dev.len(), 96 * MIB);

    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                for k in 0..32u64 {
                    let at = u64::from(t) * 8 * MIB + k * 64 * 1024;
                    dev.write_at(&pattern(t, 64 * 1024), at).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Larger than qemu-nbd's 32 MiB maximum request: split.
    let big = pattern(9, 40 * MIB as usize);
    dev.write_at(&big, 48 * MIB).unwrap();
    assert!(dev.unflushed_bytes() > 40 * MIB as usize);
    dev.flush().unwrap();
    assert_eq!(dev.unflushed_bytes(), 0, "a flush left writes to replay");

    let on_file = std::fs::read(&file).unwrap();
    for t in 0..4u8 {
        for k in 0..32usize {
            let at = t as usize * 8 * MIB as usize + k * 64 * 1024;
            assert!(
                on_file[at..at + 64 * 1024] == pattern(t, 64 * 1024)[..],
                "thread {t} write {k} is not in the file"
            );
        }
    }
    assert!(on_file[48 * MIB as usize..88 * MIB as usize] == big[..]);
    let mut back = vec![0u8; 40 * MIB as usize];
    dev.read_at(&mut back, 48 * MIB).unwrap();
    assert!(back == big, "a split read differs");

    // Past REPLAY_LIMIT of unflushed writes, the device flushes on its own.
    dev.write_at(&big, 0).unwrap();
    assert_eq!(dev.unflushed_bytes(), big.len());
    dev.write_at(&big, 48 * MIB).unwrap();
    assert!(2 * big.len() > REPLAY_LIMIT);
    assert_eq!(
        dev.unflushed_bytes(),
        0,
        "the replay log grew past its limit"
    );

    dev.discard(0, MIB).unwrap();
    let past = dev.write_at(&[1; 4096], 96 * MIB - 2048);
    assert_eq!(past.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(dev.reconnections(), 0);
}

/// A server that restarts loses what it had not flushed (nbdkit memory
/// loses everything): the device reconnects on its own and writes back
/// every write it had acknowledged since its last flush, in order.
#[test]
fn a_restarted_server_gets_the_unflushed_writes_back() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("mem.sock");
    let server = nbdkit_memory(&socket, "16M");
    let dev = NbdDevice::open(&uri(&socket, 2)).unwrap();
    dev.write_at(&[0xaa; 8192], 0).unwrap();
    dev.flush().unwrap();
    // Unflushed, and overlapping: the later one must win after the replay.
    dev.write_at(&[0xbb; 8192], MIB).unwrap();
    dev.write_at(&[0xcc; 4096], MIB + 4096).unwrap();
    assert_eq!(dev.unflushed_bytes(), 12288);
    drop(server);
    let _server = nbdkit_memory(&socket, "16M");

    let mut b = vec![0u8; 8192];
    dev.read_at(&mut b, MIB).unwrap();
    assert_eq!(dev.reconnections(), 1);
    assert!(
        b[..4096].iter().all(|&x| x == 0xbb),
        "first write not replayed"
    );
    assert!(
        b[4096..].iter().all(|&x| x == 0xcc),
        "replayed out of order"
    );
    // What was flushed is the server's to keep; this one kept nothing.
    dev.read_at(&mut b, 0).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "nbdkit memory kept data across a restart?"
    );
    dev.flush().unwrap();
    assert_eq!(dev.unflushed_bytes(), 0);
}

/// Cluster mode: once the write guard says no (the appliance is fenced),
/// no write reaches the pool, and the writes acknowledged before are not
/// replayed after a reconnection (another appliance may own the disk by
/// then); reads fail too, since the device cannot come back consistent.
#[test]
fn a_fenced_device_neither_writes_nor_replays() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("mem.sock");
    let server = nbdkit_memory(&socket, "16M");
    let dev = NbdDevice::open(&uri(&socket, 2)).unwrap();
    let allowed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let a = allowed.clone();
    dev.set_write_guard(Box::new(move || {
        a.load(std::sync::atomic::Ordering::SeqCst)
    }));
    dev.write_at(&[0xaa; 4096], 0).unwrap();
    dev.flush().unwrap();
    dev.write_at(&[0xbb; 4096], MIB).unwrap();
    allowed.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(
        dev.write_at(&[0xcc; 4096], 2 * MIB).is_err(),
        "a fenced device wrote"
    );
    // The server restarts (empty: nbdkit memory); a new holder writes.
    drop(server);
    let _server = nbdkit_memory(&socket, "16M");
    let other = NbdDevice::open(&uri(&socket, 1)).unwrap();
    other.write_at(&[0xdd; 4096], MIB).unwrap();
    other.flush().unwrap();
    let mut b = vec![0u8; 4096];
    assert!(
        dev.read_at(&mut b, 0).is_err(),
        "the fenced device came back"
    );
    other.read_at(&mut b, MIB).unwrap();
    assert_eq!(b, vec![0xdd; 4096], "the fenced device replayed its write");
}

/// A server gone for longer than the reconnect budget: the call fails
/// (it does not hang), and the device works again once the server is back.
#[test]
fn an_unreachable_server_fails_calls_until_it_is_back() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = pool_file(dir.path(), 8 * MIB);
    let socket: PathBuf = dir.path().join("pool.sock");
    let server = qemu_nbd(&file, &socket, &[]);
    let target = NbdTarget::parse(&uri(&socket, 2)).unwrap();
    let dev = NbdDevice::connect(target, Duration::from_millis(700)).unwrap();
    dev.write_at(&[7; 4096], 0).unwrap();
    drop(server);
    let _ = std::fs::remove_file(&socket);
    let started = Instant::now();
    let mut b = vec![0u8; 4096];
    assert!(
        dev.read_at(&mut b, 0).is_err(),
        "a read succeeded with no server"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the failed read took {:?}",
        started.elapsed()
    );
    let _server = qemu_nbd(&file, &socket, &[]);
    dev.read_at(&mut b, 0).unwrap();
    assert_eq!(b, vec![7; 4096]);
    dev.flush().unwrap();
}

#[test]
fn refusals_at_connect() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = pool_file(dir.path(), MIB);
    let socket = dir.path().join("ro.sock");
    let _server = qemu_nbd(&file, &socket, &["--read-only"]);
    let e = NbdDevice::open(&uri(&socket, 1))
        .err()
        .expect("a read-only pool was taken");
    assert!(e.to_string().contains("read-only"), "{e}");
    let e = NbdDevice::open(&format!("nbd+unix:///nope?socket={}", socket.display()))
        .err()
        .expect("an unknown export was taken");
    assert!(e.to_string().contains("nope"), "{e}");
}
