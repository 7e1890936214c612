//! End-to-end tests of the NBD appliance (`parallax serve`) with real NBD
//! clients: `qemu-io`, `qemu-img`, `nbdinfo`, `nbdcopy`, `fio` (nbd engine),
//! and a raw NBD client written here for what no tool can do: garbage on
//! the wire, and exact tracking of which writes were acknowledged and
//! flushed before a `kill -9` of the daemon.
//!
//! The tests need `qemu-img`, `qemu-io` (qemu-utils), `nbdinfo`, `nbdcopy`
//! (libnbd-bin) and `fio` with its nbd engine on `PATH`
//! (`scripts/install-deps.sh` installs them). Without them the tests fail,
//! unless `PARALLAX_SKIP_NBD_TESTS=1` is set, in which case they are skipped
//! with a message.
//!
//! Every test starts its own daemon in its own temporary directory, serving
//! on a Unix socket in that directory and on 127.0.0.1 port 0 (one test also
//! on [::1] port 0), and talks to nothing else. Every process a test starts
//! is stopped by its PID, at the latest when its guard ([`Daemon`], [`Bg`])
//! drops; every external command runs under a timeout, so a hung daemon
//! fails a test instead of hanging the suite.
//!
//! Randomness comes from a seeded generator; the seed is printed at the start
//! of each test that uses one, and `PARALLAX_TEST_SEED=N` replays it.
//!
//! The crash test (`crash_kill9_keeps_flushed_writes`) runs one iteration
//! here; `scripts/crash-loop.sh N` runs it N times.

use serde_json::Value;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// The disk block size the daemon works in.
const BLOCK: u64 = 4096;
/// How long any one external command may run before the test fails.
const TOOL_TIMEOUT: Duration = Duration::from_secs(240);
/// How long a daemon may take to answer `status` after it is started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Read and write timeout on the raw client's sockets.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

// ---- tools ------------------------------------------------------------------

/// True when every client tool is installed. Panics with a clear message
/// when one is missing, unless `PARALLAX_SKIP_NBD_TESTS=1`; then false.
fn have_tools() -> bool {
    let tools = [
        ("qemu-img", "--version"),
        ("qemu-io", "--version"),
        ("nbdinfo", "--version"),
        ("nbdcopy", "--version"),
        ("fio", "--version"),
    ];
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, arg)| {
            !Command::new(tool)
                .arg(arg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(tool, _)| *tool)
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("PARALLAX_SKIP_NBD_TESTS").is_some_and(|v| v == "1") {
        eprintln!("{missing:?} not found: skipping (PARALLAX_SKIP_NBD_TESTS=1)");
        return false;
    }
    panic!(
        "this test needs {missing:?} (scripts/install-deps.sh installs them); \
         set PARALLAX_SKIP_NBD_TESTS=1 to skip it"
    );
}

/// What a finished process left behind.
struct Ran {
    what: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn describe(&self) -> String {
        format!(
            "{} ({})\n--- stdout:\n{}\n--- stderr:\n{}",
            self.what, self.status, self.stdout, self.stderr
        )
    }

    /// Asserts the process exited with status 0.
    #[track_caller]
    fn ok(self) -> Ran {
        assert!(self.status.success(), "failed: {}", self.describe());
        self
    }

    /// Asserts the process exited with a non-zero status (not a signal).
    #[track_caller]
    fn failed(self) -> Ran {
        assert!(
            matches!(self.status.code(), Some(c) if c != 0),
            "should have failed: {}",
            self.describe()
        );
        self
    }

    /// Asserts the process exited with exactly `code`.
    #[track_caller]
    fn code(self, code: i32) -> Ran {
        assert_eq!(
            self.status.code(),
            Some(code),
            "wrong exit status: {}",
            self.describe()
        );
        self
    }
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `cmd` to completion and collects its output. After `timeout` the
/// process is killed (by its PID) and the test fails.
fn run_for(mut cmd: Command, timeout: Duration) -> Ran {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not finish in {timeout:?}\n--- stdout:\n{}\n--- stderr:\n{}",
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    Ran {
        what,
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn run(cmd: Command) -> Ran {
    run_for(cmd, TOOL_TIMEOUT)
}

/// A command for `program` with `args`.
fn tool<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

/// Sends signal `sig` ("TERM", "KILL", ...) to process `pid`.
fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Runs `qemu-io -f raw -d unmap -c CMD... URI` (writable; `-d unmap` so
/// that `discard` and `write -z -u` reach the server as TRIM and
/// WRITE_ZEROES without NO_HOLE).
fn qemu_io<S: AsRef<str>>(uri: &str, cmds: &[S]) -> Ran {
    let mut cmd = tool("qemu-io", &["-f", "raw", "-d", "unmap"]);
    for c in cmds {
        cmd.arg("-c").arg(c.as_ref());
    }
    cmd.arg(uri);
    run(cmd)
}

/// Runs `qemu-io -r -f raw -c CMD... URI` (read-only).
fn qemu_io_ro<S: AsRef<str>>(uri: &str, cmds: &[S]) -> Ran {
    let mut cmd = tool("qemu-io", &["-r", "-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c.as_ref());
    }
    cmd.arg(uri);
    run(cmd)
}

/// `qemu-io` read commands that check every byte of `expect` (which is the
/// content at `base`), one `read -P` per run of equal bytes.
fn read_cmds(expect: &[u8], base: u64) -> Vec<String> {
    let mut cmds = Vec::new();
    let mut start = 0;
    while start < expect.len() {
        let byte = expect[start];
        let end = expect[start..]
            .iter()
            .position(|&b| b != byte)
            .map_or(expect.len(), |n| start + n);
        cmds.push(format!(
            "read -P {byte:#x} {} {}",
            base + start as u64,
            end - start
        ));
        start = end;
    }
    cmds
}

/// Runs fio with JSON output (to a file, as the nbd engine prints to
/// stdout); asserts exit status 0 and `"error": 0` for every job; returns
/// the parsed report.
fn fio(dir: &Path, args: &[String]) -> Value {
    static N: AtomicUsize = AtomicUsize::new(0);
    let out = dir.join(format!("fio-{}.json", N.fetch_add(1, Ordering::Relaxed)));
    let mut cmd = tool("fio", args);
    // fio leaves *-verify.state files in its working directory.
    cmd.current_dir(dir)
        .arg("--output-format=json")
        .arg(format!("--output={}", out.display()));
    let ran = run(cmd).ok();
    let text = fs::read_to_string(&out).unwrap_or_default();
    let report: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("bad fio JSON ({e}): {text}\n{}", ran.describe()));
    let jobs = report["jobs"].as_array().expect("jobs");
    assert!(!jobs.is_empty(), "{report}");
    for job in jobs {
        assert_eq!(job["error"], 0, "fio job failed: {job}\n{}", ran.describe());
    }
    report
}

/// Parses `nbdinfo --map` text output into (offset, length, type).
fn parse_map_text(text: &str) -> Vec<(u64, u64, u64)> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 3, "bad map line {l:?}");
            let n = |i: usize| f[i].parse::<u64>().unwrap_or_else(|_| panic!("{l:?}"));
            (n(0), n(1), n(2))
        })
        .collect()
}

/// Parses `nbdinfo --map --json` output into (offset, length, type).
fn parse_map_json(text: &str) -> Vec<(u64, u64, u64)> {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    v.as_array()
        .expect("map array")
        .iter()
        .map(|e| {
            let n = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{k} in {e}"));
            (n("offset"), n("length"), n("type"))
        })
        .collect()
}

/// Checks that `map` covers `[0, size)` without gaps and merges adjacent
/// extents of the same type.
fn merge_map(map: &[(u64, u64, u64)], size: u64) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    let mut next = 0;
    for &(off, len, ty) in map {
        assert_eq!(off, next, "gap or overlap in map {map:?}");
        assert!(len > 0, "empty extent in {map:?}");
        next = off + len;
        match out.last_mut() {
            Some(last) if last.2 == ty => last.1 += len,
            _ => out.push((off, len, ty)),
        }
    }
    assert_eq!(next, size, "map does not cover the disk: {map:?}");
    out
}

/// `nbdinfo --map` of `uri`, text and JSON, which must agree; merged.
fn nbd_map(uri: &str, size: u64) -> Vec<(u64, u64, u64)> {
    let text = run(tool("nbdinfo", &["--map", uri])).ok().stdout;
    let json = run(tool("nbdinfo", &["--map", "--json", uri])).ok().stdout;
    let a = merge_map(&parse_map_text(&text), size);
    let b = merge_map(&parse_map_json(&json), size);
    assert_eq!(a, b, "text and JSON maps differ:\n{text}\n{json}");
    a
}

// ---- randomness -------------------------------------------------------------

/// xorshift64*: fast, seeded, good enough for test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.fill(&mut buf);
        buf
    }
}

/// The seed for a test: `PARALLAX_TEST_SEED` or a fresh one; printed.
fn seed(test: &str) -> u64 {
    let seed = match std::env::var("PARALLAX_TEST_SEED") {
        Ok(s) => s.parse().expect("PARALLAX_TEST_SEED is a u64"),
        Err(_) => {
            let mut b = [0u8; 8];
            fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut b))
                .expect("/dev/urandom");
            u64::from_le_bytes(b)
        }
    };
    eprintln!("{test}: PARALLAX_TEST_SEED={seed}");
    seed
}

// ---- the daemon -------------------------------------------------------------

/// Runs `parallax --store STORE ...` commands (through the daemon when one
/// runs on STORE). Cloneable, so threads can use it.
#[derive(Clone)]
struct Cli {
    store: PathBuf,
    dir: PathBuf,
}

impl Cli {
    /// The daemon's control socket: the store's path with `.control`.
    fn control_path(&self) -> PathBuf {
        let mut p = self.store.as_os_str().to_owned();
        p.push(".control");
        PathBuf::from(p)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_parallax"));
        cmd.arg("--store")
            .arg(&self.store)
            .args(args)
            .current_dir(&self.dir)
            .env_remove("PARALLAX_STORE")
            .env_remove("PARALLAX_CONTROL");
        cmd
    }

    /// Runs a command (under a timeout); any exit status.
    fn run(&self, args: &[&str]) -> Ran {
        run_for(self.command(args), Duration::from_secs(120))
    }

    /// Runs a command that must succeed; returns its stdout.
    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        self.run(args).ok().stdout
    }

    /// Runs a command with `--json` that must succeed; parses its output.
    #[track_caller]
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{out}"))
    }
}

/// One `parallax serve` on a fresh store in a temporary directory, serving
/// on `DIR/nbd.sock` and 127.0.0.1 (port 0: the kernel picks one; a restart
/// may get another). Its stdout and stderr go to `DIR/serve.log`, shown
/// when it fails to start. Dropping it kills the daemon (SIGKILL by PID).
struct Daemon {
    dir: tempfile::TempDir,
    cli: Cli,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// What `start` passes to `--nbd-listen`: "127.0.0.1:0" unless a test
    /// changes it ("none", "[::1]:0").
    listen: String,
    /// The bound TCP address from `status` ("127.0.0.1:PORT"), empty when
    /// TCP is off.
    tcp: String,
    /// Extra `serve` arguments and environment (`--direct`, `PARALLAX_IO_URING=0`).
    serve_args: Vec<String>,
    serve_env: Vec<(String, String)>,
}

impl Daemon {
    /// Initialises a 2 GiB store and starts a daemon on it.
    fn new() -> Daemon {
        Daemon::with(&[], &[])
    }

    /// [`Daemon::new`] with extra `serve` arguments and environment.
    fn with(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.px");
        let cli = Cli {
            store,
            dir: dir.path().to_path_buf(),
        };
        cli.ok(&["init", "--size", "2G"]);
        let mut d = Daemon {
            socket: dir.path().join("nbd.sock"),
            log: dir.path().join("serve.log"),
            dir,
            cli,
            child: None,
            listen: "127.0.0.1:0".to_string(),
            tcp: String::new(),
            serve_args: args.iter().map(|a| a.to_string()).collect(),
            serve_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        d.start();
        d
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The `serve` command line this harness uses.
    fn serve_command(&self, socket: &Path) -> Command {
        let mut cmd = self
            .cli
            .command(&["serve", "--nbd-listen", &self.listen, "--nbd-socket"]);
        cmd.arg(socket).args(&self.serve_args);
        cmd.envs(self.serve_env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts the daemon and waits until `status` answers (at most
    /// [`READY_TIMEOUT`]); records the TCP address it reports.
    fn start(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open serve.log");
        let mut cmd = self.serve_command(&self.socket);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawn parallax serve"));
        let pid = self.pid();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("wait") {
                self.child = None;
                panic!(
                    "parallax serve exited at startup ({status})\n{}",
                    self.log()
                );
            }
            let ran = self.cli.run(&["status", "--json"]);
            if ran.status.success() {
                let status: Value = serde_json::from_str(&ran.stdout)
                    .unwrap_or_else(|e| panic!("bad status JSON: {e}\n{}", ran.stdout));
                assert_eq!(status["pid"], pid, "status of another daemon: {status}");
                assert_eq!(
                    status["nbd_socket"].as_str(),
                    Some(self.socket.to_str().unwrap()),
                    "{status}"
                );
                if self.listen == "none" {
                    assert_eq!(status["nbd_tcp"], Value::Null, "{status}");
                    self.tcp = String::new();
                    return;
                }
                let tcp = status["nbd_tcp"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{status}"));
                let host = self.listen.rsplit_once(':').unwrap().0;
                assert!(tcp.starts_with(&format!("{host}:")), "{status}");
                assert!(!tcp.ends_with(":0"), "port 0 reported: {status}");
                self.tcp = tcp.to_string();
                return;
            }
            assert!(
                Instant::now() < deadline,
                "parallax serve not ready after {READY_TIMEOUT:?}; last status: {}\n--- serve.log:\n{}",
                ran.describe(),
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon not running").id()
    }

    /// The daemon's log so far.
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asserts the daemon process is still running.
    #[track_caller]
    fn assert_alive(&mut self) {
        let child = self.child.as_mut().expect("daemon not started");
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("daemon died ({status})\n--- serve.log:\n{}", self.log());
        }
    }

    /// Graceful stop: SIGTERM by PID; the daemon must exit 0 within 30 s,
    /// after which `status` must fail.
    fn stop(&mut self) {
        self.stop_with("TERM");
    }

    /// Graceful stop with signal `sig` ("TERM" or "INT"), as [`Daemon::stop`].
    fn stop_with(&mut self, sig: &str) {
        let pid = self.pid();
        signal(pid, sig);
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                panic!("daemon ignored SIG{sig} for 30 s\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        };
        self.child = None;
        assert_eq!(
            status.code(),
            Some(0),
            "daemon exit after SIG{sig}: {status}\n--- serve.log:\n{}",
            self.log()
        );
        let ran = self.cli.run(&["status", "--json"]);
        assert!(
            !ran.status.success(),
            "status succeeds with no daemon: {}",
            ran.describe()
        );
    }

    /// `kill -9` the daemon.
    fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon not running");
        signal(child.id(), "KILL");
        child.wait().expect("wait");
    }

    /// Graceful stop, then start again.
    fn restart(&mut self) {
        self.stop();
        self.start();
    }

    fn unix_addr(&self) -> Addr {
        Addr::Unix(self.socket.clone())
    }

    fn tcp_addr(&self) -> Addr {
        Addr::Tcp(self.tcp.clone())
    }

    /// `nbd+unix:///EXPORT?socket=PATH`; EXPORT is `NAME` or `NAME@SNAP`.
    fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`.
    fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp)
    }

    /// The number of NBD connections `status` reports.
    fn connections(&self) -> usize {
        let status = self.cli.json(&["status"]);
        status["connections"]
            .as_array()
            .unwrap_or_else(|| panic!("no connections array: {status}"))
            .len()
    }

    /// Waits (at most `secs`) until `status` reports a connection count for
    /// which `ok` holds.
    #[track_caller]
    fn wait_connections(&self, secs: u64, what: &str, ok: impl Fn(usize) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let n = self.connections();
            if ok(n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after {secs} s status still reports {n} connections, expected {what}: {}",
                self.cli.json(&["status"])
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        self.cli.ok(args)
    }

    fn json(&self, args: &[&str]) -> Value {
        self.cli.json(args)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL to this PID only
            let _ = child.wait();
        }
    }
}

/// A client process running in the background, its stdout and stderr in
/// files of `dir`. Dropping it kills it (SIGKILL by PID) if still running.
struct Bg {
    what: String,
    child: Child,
    out: PathBuf,
    err: PathBuf,
    done: Option<ExitStatus>,
}

impl Bg {
    fn spawn(mut cmd: Command, dir: &Path, tag: &str) -> Bg {
        let out = dir.join(format!("{tag}.out"));
        let err = dir.join(format!("{tag}.err"));
        let what = format!("{cmd:?}");
        cmd.current_dir(dir)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).expect("create .out"))
            .stderr(fs::File::create(&err).expect("create .err"));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        Bg {
            what,
            child,
            out,
            err,
            done: None,
        }
    }

    fn running(&mut self) -> bool {
        if self.done.is_none() {
            self.done = self.child.try_wait().expect("wait");
        }
        self.done.is_none()
    }

    /// Waits for the process (at most `timeout`, then kills it and fails).
    fn wait(&mut self, timeout: Duration) -> Ran {
        let deadline = Instant::now() + timeout;
        while self.running() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} did not finish in {timeout:?}", self.what);
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ran {
            what: self.what.clone(),
            status: self.done.unwrap(),
            stdout: fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: fs::read_to_string(&self.err).unwrap_or_default(),
        }
    }
}

/// Waits (at most 60 s) until some 4 KiB block of `export` in
/// `[offset, offset + len)` satisfies `written`: a background writer is past
/// its setup (fio's nbd engine connects once to learn the size, hangs up,
/// and connects again for the job) and doing I/O.
#[track_caller]
fn wait_for_writes(
    d: &Daemon,
    export: &str,
    offset: u64,
    len: u64,
    written: impl Fn(&[u8]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut nbd = Nbd::new(&d.unix_addr(), export);
        let data = nbd.read(offset, len as u32);
        nbd.disconnect();
        if data.chunks(BLOCK as usize).any(&written) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no background writes to {export} in 60 s"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---- a raw NBD client -------------------------------------------------------
//
// Fixed-newstyle handshake, NBD_OPT_GO, simple replies only (no structured
// replies are negotiated), one request in flight per connection. See
// https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const TF_READ_ONLY: u16 = 1 << 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_FUA: u16 = 1 << 3;
const TF_SEND_TRIM: u16 = 1 << 5;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TF_CAN_MULTI_CONN: u16 = 1 << 8;
const TF_SEND_CACHE: u16 = 1 << 10;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_NO_HOLE: u16 = 2;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;

/// Where the daemon listens for NBD.
#[derive(Clone, Debug)]
enum Addr {
    Tcp(String),
    Unix(PathBuf),
}

/// A connected socket, TCP or Unix.
trait Wire: Read + Write + Send {
    fn shut(&self, how: Shutdown);
    fn set_read_timeout_to(&self, t: Duration);
}

impl Wire for TcpStream {
    fn shut(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
    fn set_read_timeout_to(&self, t: Duration) {
        self.set_read_timeout(Some(t)).expect("set_read_timeout");
    }
}

impl Wire for UnixStream {
    fn shut(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
    fn set_read_timeout_to(&self, t: Duration) {
        self.set_read_timeout(Some(t)).expect("set_read_timeout");
    }
}

/// Connects to `addr` with [`IO_TIMEOUT`] on reads and writes.
fn connect(addr: &Addr) -> io::Result<Box<dyn Wire>> {
    Ok(match addr {
        Addr::Tcp(a) => {
            let s = TcpStream::connect(a)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        Addr::Unix(p) => {
            let s = UnixStream::connect(p)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Box::new(s)
        }
    })
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Reads the 18-byte server greeting; checks both magics and returns the
/// handshake flags.
fn read_greeting(w: &mut dyn Wire) -> io::Result<u16> {
    let mut g = [0u8; 18];
    w.read_exact(&mut g)?;
    if be_u64(&g[0..]) != NBDMAGIC || be_u64(&g[8..]) != IHAVEOPT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad greeting {g:02x?}"),
        ));
    }
    Ok(be_u16(&g[16..]))
}

/// Sends one option request.
fn send_option(w: &mut dyn Wire, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(16 + data.len());
    buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&opt.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf)
}

/// Reads one option reply: (option, reply type, data).
fn read_option_reply(w: &mut dyn Wire) -> io::Result<(u32, u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    w.read_exact(&mut h)?;
    if be_u64(&h) != OPT_REPLY_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad option reply magic {h:02x?}"),
        ));
    }
    let len = be_u32(&h[16..]);
    if len > 1 << 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("option reply of {len} bytes"),
        ));
    }
    let mut data = vec![0u8; len as usize];
    w.read_exact(&mut data)?;
    Ok((be_u32(&h[8..]), be_u32(&h[12..]), data))
}

/// The NBD_OPT_GO payload for `export` with no information requests.
fn go_payload(export: &str) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    data
}

/// Reads from `w` until the peer closes (EOF or reset). Panics if the
/// connection is still open after `timeout`, or if more than 1 MiB arrives.
#[track_caller]
fn expect_closed(w: &mut dyn Wire, timeout: Duration, what: &str) {
    w.set_read_timeout_to(timeout);
    let mut buf = [0u8; 4096];
    let mut total = 0;
    loop {
        match w.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                total += n;
                assert!(total < 1 << 20, "{what}: the server keeps sending data");
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("{what}: the server kept the connection open for {timeout:?}")
            }
            Err(_) => return, // reset: closed
        }
    }
}

/// One negotiated NBD connection.
struct Nbd {
    wire: Box<dyn Wire>,
    size: u64,
    flags: u16,
    cookie: u64,
}

impl Nbd {
    /// Connects and negotiates `export`; Err(message) if the connection or
    /// the negotiation fails (e.g. the server refuses the export).
    fn open(addr: &Addr, export: &str) -> Result<Nbd, String> {
        let mut w = connect(addr).map_err(|e| format!("connect {addr:?}: {e}"))?;
        Nbd::handshake(w.as_mut(), export).map(|(size, flags)| Nbd {
            wire: w,
            size,
            flags,
            cookie: 0,
        })
    }

    /// Connects and negotiates, panicking on failure.
    #[track_caller]
    fn new(addr: &Addr, export: &str) -> Nbd {
        Nbd::open(addr, export).unwrap_or_else(|e| panic!("NBD {export} on {addr:?}: {e}"))
    }

    /// The client side of the handshake on `w`: returns (size, flags).
    fn handshake(w: &mut dyn Wire, export: &str) -> Result<(u64, u16), String> {
        let hflags = read_greeting(w).map_err(|e| format!("greeting: {e}"))?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(format!("server is not fixed newstyle: flags {hflags:#x}"));
        }
        let cflags = u32::from(FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES));
        w.write_all(&cflags.to_be_bytes())
            .map_err(|e| format!("client flags: {e}"))?;
        send_option(w, OPT_GO, &go_payload(export)).map_err(|e| format!("NBD_OPT_GO: {e}"))?;
        let mut export_info = None;
        loop {
            let (opt, ty, data) = read_option_reply(w).map_err(|e| format!("option reply: {e}"))?;
            if opt != OPT_GO {
                return Err(format!("reply to option {opt}, not NBD_OPT_GO"));
            }
            match ty {
                REP_ACK => break,
                REP_INFO if data.len() >= 12 && be_u16(&data) == INFO_EXPORT => {
                    export_info = Some((be_u64(&data[2..]), be_u16(&data[10..])));
                }
                REP_INFO => {}
                t if t & 0x8000_0000 != 0 => {
                    return Err(format!(
                        "NBD_OPT_GO refused ({t:#x}): {}",
                        String::from_utf8_lossy(&data)
                    ))
                }
                t => return Err(format!("unexpected option reply type {t:#x}")),
            }
        }
        export_info.ok_or_else(|| "no NBD_INFO_EXPORT before NBD_REP_ACK".to_string())
    }

    /// Sends one request (header, then `data`); returns its cookie.
    fn send(&mut self, flags: u16, ty: u16, offset: u64, len: u32, data: &[u8]) -> io::Result<u64> {
        self.cookie += 1;
        let mut buf = Vec::with_capacity(28 + data.len());
        buf.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        buf.extend_from_slice(&flags.to_be_bytes());
        buf.extend_from_slice(&ty.to_be_bytes());
        buf.extend_from_slice(&self.cookie.to_be_bytes());
        buf.extend_from_slice(&offset.to_be_bytes());
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(data);
        self.wire.write_all(&buf)?;
        Ok(self.cookie)
    }

    /// Reads the simple reply to `cookie`: (error, data). `read_len` bytes
    /// of data follow a successful read.
    fn reply(&mut self, cookie: u64, read_len: usize) -> io::Result<(u32, Vec<u8>)> {
        let mut h = [0u8; 16];
        self.wire.read_exact(&mut h)?;
        if be_u32(&h) != SIMPLE_REPLY_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad reply magic {h:02x?}"),
            ));
        }
        let error = be_u32(&h[4..]);
        if be_u64(&h[8..]) != cookie {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply for cookie {}, expected {cookie}", be_u64(&h[8..])),
            ));
        }
        let mut data = Vec::new();
        if error == 0 && read_len > 0 {
            data.resize(read_len, 0);
            self.wire.read_exact(&mut data)?;
        }
        Ok((error, data))
    }

    /// One request and its reply: (error, data).
    fn cmd(
        &mut self,
        flags: u16,
        ty: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<(u32, Vec<u8>)> {
        let cookie = self.send(flags, ty, offset, len, data)?;
        let read_len = if ty == CMD_READ { len as usize } else { 0 };
        self.reply(cookie, read_len)
    }

    /// Reads `len` bytes at `offset`; panics on any error.
    #[track_caller]
    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let (err, data) = self
            .cmd(0, CMD_READ, offset, len, &[])
            .unwrap_or_else(|e| panic!("read {len} at {offset}: {e}"));
        assert_eq!(err, 0, "read {len} at {offset}: error {err}");
        data
    }

    /// Writes `data` at `offset`; returns the server's error (0 = ok).
    fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<u32> {
        Ok(self
            .cmd(flags, CMD_WRITE, offset, data.len() as u32, data)?
            .0)
    }

    fn flush(&mut self) -> io::Result<u32> {
        Ok(self.cmd(0, CMD_FLUSH, 0, 0, &[])?.0)
    }

    /// Sends NBD_CMD_DISC and closes.
    fn disconnect(mut self) {
        let _ = self.send(0, CMD_DISC, 0, 0, &[]);
        self.wire.shut(Shutdown::Both);
    }
}

// ---- 0. clients that vanish ---------------------------------------------------

/// Clients that write (allocating blocks, through io_uring and through the
/// blocking pool) and vanish without a FLUSH: one goes silent with its
/// connection still open, one drops its socket without NBD_CMD_DISC. The
/// daemon commits their disks once they have been idle a moment (its
/// settle tick), so that after a `kill -9` nothing they wrote is lost and
/// no block is leaked, with no `gc`.
#[test]
fn clients_that_vanish_leave_no_leaked_block() {
    if !have_tools() {
        return;
    }
    let mut d = Daemon::new();
    d.ok(&["create", "silent", "--size", "64M"]);
    d.ok(&["create", "gone", "--size", "64M"]);
    let block = |k: u64| -> Vec<u8> { (0..65536u64).map(|i| (i * 7 + k) as u8).collect() };
    let mut silent = Nbd::new(&d.unix_addr(), "silent");
    let mut gone = Nbd::new(&d.unix_addr(), "gone");
    for k in 0..16u64 {
        for nbd in [&mut silent, &mut gone] {
            assert_eq!(nbd.write(k << 20, &block(k), 0).unwrap(), 0);
            // A partial block: the blocking path's read-modify-write.
            assert_eq!(
                nbd.write((k << 20) + 70_000, &[k as u8; 100], 0).unwrap(),
                0
            );
        }
    }
    drop(gone);
    // Idle for more than a second: the settle tick commits both disks.
    thread::sleep(Duration::from_secs(3));
    d.kill9();
    drop(silent);
    let check = d.cli.json(&["check"]);
    assert_eq!(check["clean"], true, "{check}");
    assert_eq!(check["leaked_blocks"], 0, "blocks leaked: {check}");
    d.start();
    for name in ["silent", "gone"] {
        let mut nbd = Nbd::new(&d.unix_addr(), name);
        for k in 0..16u64 {
            let mut want = block(k);
            want.resize(70_000 + 100, 0);
            want[70_000..].fill(k as u8);
            let got = nbd.read(k << 20, want.len() as u32);
            assert!(got == want, "{name}: block {k} lost after kill -9");
        }
        nbd.disconnect();
    }
}

// ---- 0b. local users -----------------------------------------------------------

/// Mode bits of a file.
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Only the daemon's user may read the store or use its sockets; another
/// local user gets a clear "permission denied", not "in use"; a group can
/// be let in with --socket-group.
#[test]
fn other_local_users_get_nothing() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !have_tools() {
        return;
    }
    let d = Daemon::new();
    assert_eq!(mode_of(&d.cli.store), 0o600, "store file mode");
    assert_eq!(mode_of(&d.socket), 0o600, "NBD socket mode");
    assert_eq!(mode_of(&d.cli.control_path()), 0o600, "control socket mode");
    // Another user (nobody), with the directory open to everyone: the
    // socket's own mode keeps them out, and they are told so.
    // (A copy of the binary there, in case the build tree is not theirs to read.)
    fs::set_permissions(d.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let binary = d.path("parallax-copy");
    fs::copy(env!("CARGO_BIN_EXE_parallax"), &binary).unwrap();
    fs::set_permissions(&binary, fs::Permissions::from_mode(0o755)).unwrap();
    let mut as_nobody = Command::new("setpriv");
    as_nobody
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&binary)
        .arg("--store")
        .arg(&d.cli.store)
        .arg("list")
        .env_remove("PARALLAX_STORE")
        .env_remove("PARALLAX_CONTROL");
    let ran = run(as_nobody);
    assert!(!ran.status.success(), "another user listed the disks");
    assert!(
        ran.stderr.contains("permission denied") && !ran.stderr.contains("in use"),
        "{}",
        ran.describe()
    );
    assert!(
        UnixStream::connect(&d.socket).is_ok(),
        "the daemon's own user"
    );
    drop(d);
    // --socket-group: 0660 and that group.
    let d = Daemon::with(&["--socket-group", "0"], &[]);
    for path in [d.socket.clone(), d.cli.control_path()] {
        assert_eq!(mode_of(&path), 0o660, "{}", path.display());
        assert_eq!(fs::metadata(&path).unwrap().gid(), 0);
    }
}

// ---- 0c. hostile clients ---------------------------------------------------------

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024
}

/// 60 clients pipeline 1 MiB READs and never read the replies: the daemon's
/// memory stays under its global budget (256 MiB of requests in flight, all
/// clients together) instead of 64 MiB per client, and goes back down once
/// they have left.
#[test]
fn clients_that_never_read_replies_cannot_exhaust_memory() {
    if !have_tools() {
        return;
    }
    let d = Daemon::new();
    d.ok(&["create", "h", "--size", "64M"]);
    let before = rss_mib(d.pid());
    let mut clients: Vec<Nbd> = (0..60).map(|_| Nbd::new(&d.unix_addr(), "h")).collect();
    for c in &mut clients {
        for k in 0..64u64 {
            c.send(0, CMD_READ, k << 20, 1 << 20, &[]).unwrap();
        }
    }
    thread::sleep(Duration::from_secs(3));
    let peak = rss_mib(d.pid());
    drop(clients);
    thread::sleep(Duration::from_secs(2));
    let after = rss_mib(d.pid());
    eprintln!(
        "daemon RSS: {before} MiB before, {peak} MiB with 60 hostile clients, {after} MiB after"
    );
    assert!(
        peak < before + 256 + 200,
        "60 hostile clients took the daemon to {peak} MiB (from {before})"
    );
    assert!(
        after < before + 100,
        "the daemon kept {after} MiB after the clients left (from {before})"
    );
}

fn threads(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Whether the peer has closed `s`, reading what it sent so far.
fn is_closed(mut s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    closed
}

/// Reads until the peer closes (`true`) or `within` passes (`false`).
fn closed_within(mut s: &TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Clients that connect and never negotiate: each costs a few KiB and no
/// thread; beyond 1,024 handshakes in progress the daemon closes new
/// connections at once; an idle handshake is closed after 15 s; and the
/// memory goes back when they leave.
#[test]
fn clients_that_never_negotiate_are_capped_and_cost_little() {
    if !have_tools() {
        return;
    }
    const CAP: usize = 1024;
    let d = Daemon::new();
    d.ok(&["create", "h", "--size", "64M"]);
    let (rss_before, threads_before) = (rss_mib(d.pid()), threads(d.pid()));
    // The daemon and this process each hold one descriptor per connection.
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let n = (CAP + 200).min((limit as usize).saturating_sub(200));
    let idle: Vec<TcpStream> = (0..n)
        .map(|_| TcpStream::connect(&d.tcp).unwrap())
        .collect();
    let last_connect = Instant::now();
    thread::sleep(Duration::from_secs(1));
    let (rss_peak, threads_peak) = (rss_mib(d.pid()), threads(d.pid()));
    eprintln!(
        "{n} silent clients: daemon RSS {rss_before} -> {rss_peak} MiB, threads {threads_before} -> {threads_peak}"
    );
    assert!(
        rss_peak < rss_before + 48,
        "{n} silent clients took the daemon from {rss_before} to {rss_peak} MiB"
    );
    assert!(
        threads_peak <= threads_before + 8,
        "{n} silent clients took the daemon from {threads_before} to {threads_peak} threads"
    );
    if n > CAP {
        // Connections past the cap were closed at once (which ones depends
        // on the order their tasks ran); the others were not.
        let refused = idle.iter().filter(|s| is_closed(s)).count();
        assert_eq!(refused, n - CAP, "connections past {CAP} handshakes");
    } else {
        eprintln!("only {n} descriptors: the cap of {CAP} is not reached");
    }
    // The silent handshakes still open are closed after 15 s of silence.
    let open: Vec<&TcpStream> = idle.iter().filter(|s| !is_closed(s)).collect();
    assert_eq!(open.len(), n.min(CAP), "silent handshakes open");
    for s in open.iter().rev().take(4) {
        assert!(
            closed_within(s, Duration::from_secs(25)),
            "a silent handshake was not closed"
        );
    }
    // Connecting them all takes a few seconds: those four connected at
    // most that long before the last one.
    assert!(
        last_connect.elapsed() >= Duration::from_secs(11),
        "silent handshakes closed too early ({:?} after the last connected)",
        last_connect.elapsed()
    );
    drop(idle);
    thread::sleep(Duration::from_secs(1));
    // Room again: a real client negotiates and reads.
    let mut nbd = Nbd::new(&d.unix_addr(), "h");
    assert_eq!(nbd.read(0, 4096), vec![0u8; 4096]);
    nbd.disconnect();
    thread::sleep(Duration::from_secs(1));
    let rss_after = rss_mib(d.pid());
    assert!(
        rss_after < rss_before + 16,
        "the daemon kept {rss_after} MiB after the clients left (from {rss_before})"
    );
}

// ---- 1. qemu-io ---------------------------------------------------------------

#[test]
fn qemu_io_patterns_over_unix_and_tcp() {
    if !have_tools() {
        return;
    }
    let d = Daemon::new();
    d.ok(&["create", "D", "--size", "64M"]);
    // (pattern, offset, length) within a 6 MiB area; some unaligned, some
    // across block boundaries, some overlapping earlier writes.
    let writes: [(u8, u64, u64); 7] = [
        (0xab, 0, MIB),
        (0x11, 4095, 3),
        (0x22, 5000, 10000),
        (0x33, 2 * MIB - 2048, 8192),
        (0x44, 3 * MIB + 1, 1),
        (0x55, 4 * MIB + 512, 123_457),
        (0x66, 5 * MIB - 1, 2),
    ];
    let area = 6 * MIB;
    for (write_uri, read_uri, base) in [
        (d.unix_uri("D"), d.tcp_uri("D"), 0),
        (d.tcp_uri("D"), d.unix_uri("D"), 32 * MIB + 1),
    ] {
        let mut model = vec![0u8; area as usize];
        let mut cmds = Vec::new();
        for &(p, off, len) in &writes {
            model[off as usize..(off + len) as usize].fill(p);
            cmds.push(format!("write -P {p:#x} {} {len}", base + off));
            cmds.push(format!("read -P {p:#x} {} {len}", base + off));
        }
        qemu_io(&write_uri, &cmds).ok();
        // A separate process, over the other transport, read-only: every
        // byte of the area, including the zeros around the writes.
        let reads = read_cmds(&model, base);
        assert!(reads.len() >= 10, "{reads:?}");
        qemu_io_ro(&read_uri, &reads).ok();
        qemu_io(&read_uri, &reads).ok();
        // Wrong patterns fail: the checks above can fail.
        qemu_io_ro(&read_uri, &[format!("read -P 0x12 {} 3", base + 4095)]).failed();
        qemu_io_ro(&read_uri, &[format!("read -P 0xab {} 8192", base)]).failed();
        qemu_io_ro(&read_uri, &[format!("read -P 0 {} 4096", base + 3 * MIB)]).failed();
    }
    // The raw client sees the same bytes.
    let mut nbd = Nbd::new(&d.unix_addr(), "D");
    assert_eq!(nbd.size, 64 * MIB);
    let got = nbd.read(4094, 6);
    assert_eq!(got, [0xab, 0x11, 0x11, 0x11, 0xab, 0xab]);
    nbd.disconnect();
}

// ---- 2. qemu-img ----------------------------------------------------------------

/// 64 MiB of random data with zero regions, aligned and not.
fn random_image(rng: &mut Rng) -> Vec<u8> {
    let mut data = rng.bytes(64 * MIB as usize);
    for (off, len) in [
        (0, 64 * KIB),
        (8 * MIB, 4 * MIB),
        (30 * MIB + 100, 5000),
        (40 * MIB + 4096, MIB + 3000),
        (63 * MIB, MIB),
    ] {
        data[off as usize..(off + len) as usize].fill(0);
    }
    data
}

/// `qemu-img convert -n` of the raw file `src` into the export at `uri`.
fn convert_into(src: &str, uri: &str) {
    run(tool(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, uri],
    ))
    .ok();
}

/// `qemu-img compare` of the raw file `src` with the export at `uri`: equal.
fn compare_equal(src: &str, uri: &str) {
    run(tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, uri],
    ))
    .ok();
}

#[test]
fn qemu_img_convert_and_compare_survive_restarts() {
    if !have_tools() {
        return;
    }
    let mut rng = Rng::new(seed("qemu_img"));
    let mut d = Daemon::new();
    d.ok(&["create", "D", "--size", "64M"]);
    let src = d.path("src.raw");
    fs::write(&src, random_image(&mut rng)).unwrap();
    let src = src.to_str().unwrap().to_string();
    let compare = |uri: &str| compare_equal(&src, uri);
    convert_into(&src, &d.unix_uri("D"));
    compare(&d.unix_uri("D"));
    compare(&d.tcp_uri("D"));
    // A different image compares unequal (exit 1): compare checks.
    qemu_io(&d.unix_uri("D"), &["write -P 0x01 12345 1"]).ok();
    run(tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &src, &d.unix_uri("D")],
    ))
    .code(1);
    // Restore the byte from the source.
    let byte = fs::read(&src).unwrap()[12345];
    qemu_io(&d.unix_uri("D"), &[format!("write -P {byte:#x} 12345 1")]).ok();
    compare(&d.tcp_uri("D"));

    d.restart();
    compare(&d.tcp_uri("D"));
    compare(&d.unix_uri("D"));
    // qemu-img flushes before it exits: the data survives kill -9.
    d.kill9();
    d.start();
    compare(&d.unix_uri("D"));
    // The CLI's export (through the daemon) reads the same bytes.
    let out = d.path("out.raw");
    d.ok(&["export", "D", out.to_str().unwrap()]);
    assert!(
        fs::read(&out).unwrap() == fs::read(&src).unwrap(),
        "export differs from the source"
    );
    assert_eq!(d.json(&["check"])["clean"], true);
}

/// `serve --cache`: clones of a gold image read it from the pool once,
/// the copies serve again after a restart, and a damaged cache file
/// costs pool reads, never wrong data.
#[test]
fn a_read_cache_serves_clones_of_a_gold_image_across_restarts_and_damage() {
    if !have_tools() {
        return;
    }
    const SIZE: u64 = 16 << 20;
    let mut rng = Rng::new(seed("read_cache"));
    let mut d = Daemon::with(&["--cache", "cache.bin", "--cache-size", "64M"], &[]);
    d.ok(&["create", "gold", "--size", "16M"]);
    let src = d.path("src.raw");
    let mut image = random_image(&mut rng);
    image.truncate(SIZE as usize);
    fs::write(&src, &image).unwrap();
    let src = src.to_str().unwrap().to_string();
    convert_into(&src, &d.unix_uri("gold"));
    d.ok(&["snapshot", "gold@base"]);
    d.ok(&["clone", "gold@base", "vm1"]);
    d.ok(&["clone", "gold@base", "vm2"]);
    let compare = |uri: &str| compare_equal(&src, uri);
    let status = |d: &Daemon| d.json(&["status"]);
    let n = |v: &Value, k: &str| v["cache"][k].as_u64().unwrap_or_else(|| panic!("{k}: {v}"));
    compare(&d.unix_uri("vm1"));
    // Wait for the filler to copy (or drop) what vm1 read: every mapped
    // block of the image (it has holes), each a miss once.
    let deadline = Instant::now() + Duration::from_secs(30);
    let after_vm1 = loop {
        let s = status(&d);
        let done = n(&s, "fills") + n(&s, "dropped") >= n(&s, "misses");
        if done || Instant::now() > deadline {
            break s;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let blocks = n(&after_vm1, "misses");
    assert!(blocks > SIZE / 4096 / 2, "{after_vm1}");
    assert_eq!(n(&after_vm1, "hits"), 0, "{after_vm1}");
    let pool_before = after_vm1["pool_data_read_bytes"].as_u64().unwrap();
    assert_eq!(pool_before, blocks * 4096, "{after_vm1}");
    compare(&d.unix_uri("vm2"));
    let after_vm2 = status(&d);
    let dropped = n(&after_vm1, "dropped");
    let pool_vm2 = after_vm2["pool_data_read_bytes"].as_u64().unwrap() - pool_before;
    assert!(
        pool_vm2 <= dropped * 4096,
        "vm2 read {pool_vm2} bytes from the pool ({dropped} copies were dropped): {after_vm2}"
    );
    assert!(n(&after_vm2, "hits") >= blocks - dropped, "{after_vm2}");
    let text = d.ok(&["status"]);
    assert!(
        text.contains("read cache") && text.contains("cache hits"),
        "{text}"
    );
    let control = UnixStream::connect(d.cli.control_path()).expect("control socket");
    let (code, page) = http_get(control, "/metrics");
    assert_eq!(code, 200, "{page}");
    let m = samples(&page);
    assert_eq!(
        m.get("parallax_read_cache_hits_total").copied(),
        Some(n(&after_vm2, "hits") as f64),
        "{page}"
    );
    assert_eq!(
        m.get("parallax_pool_data_read_bytes_total").copied(),
        after_vm2["pool_data_read_bytes"].as_f64(),
        "{page}"
    );

    // Restarted, the daemon finds the copies: no pool reads for the clone.
    d.restart();
    compare(&d.unix_uri("vm1"));
    let s = status(&d);
    assert_eq!(
        s["pool_data_read_bytes"], 0,
        "copies lost in a restart: {s}"
    );
    assert_eq!(n(&s, "hits"), blocks - dropped, "{s}");

    // Damage a range of the cache file's slots: reads stay right.
    d.stop();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(d.path("cache.bin"))
            .unwrap();
        f.write_all_at(&vec![0x5a; 8 << 20], 2 << 20).unwrap();
    }
    d.start();
    compare(&d.unix_uri("vm2"));
    let s = status(&d);
    assert!(n(&s, "corrupt") > 0, "no damaged copy was noticed: {s}");
    assert!(s["pool_data_read_bytes"].as_u64().unwrap() > 0, "{s}");
    // Read again: the damaged copies were replaced.
    compare(&d.unix_uri("vm1"));

    // A disk with the `none` policy reads past the cache.
    assert_eq!(d.ok(&["cache-policy", "vm2"]), "vm2: write-through\n");
    assert_eq!(d.ok(&["cache-policy", "vm2", "none"]), "vm2: none\n");
    assert!(d.ok(&["info", "vm2"]).contains("cache policy:     none"));
    let before = status(&d);
    compare(&d.unix_uri("vm2"));
    let after = status(&d);
    assert_eq!(n(&after, "hits"), n(&before, "hits"), "{after}");
    let pool = |s: &Value| s["pool_data_read_bytes"].as_u64().unwrap();
    assert_eq!(pool(&after) - pool(&before), blocks * 4096, "{after}");
    let refused = d.cli.run(&["cache-policy", "vm2", "sometimes"]);
    assert!(!refused.status.success(), "{}", refused.describe());
    d.ok(&["cache-policy", "vm2", "write-through"]);
    assert_eq!(d.json(&["info", "vm2"])["cache_policy"], "write-through");
}

/// Without a cache (or in cluster mode) nothing logs: the write-back policy
/// is kept, the CLI says the disk writes through, and it does.
#[test]
fn write_back_without_a_log_is_kept_and_said_to_write_through() {
    if !have_tools() {
        return;
    }
    let d = Daemon::new();
    d.ok(&["create", "wb", "--size", "4M"]);
    let ran = d.cli.run(&["cache-policy", "wb", "write-back"]).ok();
    assert_eq!(ran.stdout, "wb: write-back\n");
    assert!(ran.stderr.contains("writes through"), "{}", ran.describe());
    assert!(d.json(&["status"]).get("write_log").is_none());
    let ran = d.cli.run(&["cache-policy", "wb", "write-through"]).ok();
    assert!(ran.stderr.is_empty(), "{}", ran.describe());
}

/// A write-back disk: its writes go to the cache's write-back log (status,
/// metrics); killed, the store refuses to open without that log (and with a
/// cache of another size), the restarted daemon replays it; a clean stop
/// drains it and frees the store; `forget-write-log` gives a lost log up.
#[test]
fn a_write_back_disk_logs_its_writes_and_the_store_needs_the_log_until_drained() {
    if !have_tools() {
        return;
    }
    const SIZE: u64 = 16 << 20;
    let mut rng = Rng::new(seed("write_back"));
    let cache = ["--cache", "cache.bin", "--cache-size", "64M"];
    let mut d = Daemon::with(&cache, &[]);
    d.ok(&["create", "wb", "--size", "16M"]);
    d.ok(&["create", "wt", "--size", "16M"]);
    assert_eq!(
        d.ok(&["cache-policy", "wb", "write-back"]),
        "wb: write-back\n"
    );
    assert!(d
        .ok(&["info", "wb"])
        .contains("cache policy:     write-back"));
    let src = d.path("src.raw");
    let mut image = random_image(&mut rng);
    image.truncate(SIZE as usize);
    fs::write(&src, &image).unwrap();
    let src = src.to_str().unwrap().to_string();
    convert_into(&src, &d.unix_uri("wb"));
    // A write-through disk's writes are logged too while the log logs;
    // its flush waits until they are on the pool.
    convert_into(&src, &d.unix_uri("wt"));
    let s = d.json(&["status"]);
    let log = &s["write_log"];
    assert_eq!(log["logging"], true, "{s}");
    // Both images (they have holes, which qemu-img skips).
    assert!(log["appended_bytes"].as_u64().unwrap() > SIZE, "{s}");
    assert!(log["flushes"].as_u64().unwrap() > 0, "{s}");
    let text = d.ok(&["status"]);
    assert!(text.contains("write-back log: logging"), "{text}");
    let control = UnixStream::connect(d.cli.control_path()).expect("control socket");
    let (code, page) = http_get(control, "/metrics");
    assert_eq!(code, 200, "{page}");
    let m = samples(&page);
    assert!(
        m.get("parallax_write_log_appended_bytes_total").copied() > Some(SIZE as f64),
        "{page}"
    );
    assert_eq!(
        m.get("parallax_write_log_logging").copied(),
        Some(1.0),
        "{page}"
    );

    // Killed: nothing opens the store without the log.
    d.kill9();
    let refused = d.cli.run(&["list"]);
    assert!(
        !refused.status.success() && refused.stderr.contains("write-back log"),
        "{}",
        refused.describe()
    );
    let cache_path = d.path("cache.bin");
    let cache_path = cache_path.to_str().unwrap();
    let refused = d.cli.run(&[
        "serve",
        "--nbd-listen",
        "none",
        "--cache",
        cache_path,
        "--cache-size",
        "128M",
    ]);
    assert!(
        !refused.status.success() && refused.stderr.contains("--cache-size 67108864"),
        "{}",
        refused.describe()
    );
    assert_eq!(
        fs::metadata(cache_path).unwrap().len(),
        64 << 20,
        "a refused start resized the cache"
    );
    d.start();
    compare_equal(&src, &d.unix_uri("wb"));
    compare_equal(&src, &d.unix_uri("wt"));

    // A clean stop drains the log: the store opens without it.
    d.stop();
    let check = d.cli.json(&["check"]);
    assert_eq!(check["clean"], true, "{check}");
    d.start();
    compare_equal(&src, &d.unix_uri("wb"));
    let s = d.json(&["status"]);
    assert_eq!(s["write_log"]["replayed"], 0, "{s}");

    // A lost log, given up: the store opens as the log last left the pool.
    d.kill9();
    fs::remove_file(cache_path).unwrap();
    let out = d.cli.ok(&["forget-write-log"]);
    assert!(out.contains("no longer needs write-back log"), "{out}");
    let check = d.cli.json(&["check"]);
    assert_eq!(check["clean"], true, "{check}");
    assert_eq!(
        d.cli.ok(&["forget-write-log"]),
        "the store names no write-back log: nothing to do\n"
    );
    d.start();
    assert_eq!(d.json(&["info", "wb"])["cache_policy"], "write-back");
}

// ---- 3. nbdinfo -------------------------------------------------------------------

/// `nbdinfo --json URI`: the one export's description.
fn nbdinfo(uri: &str) -> Value {
    let out = run(tool("nbdinfo", &["--json", uri])).ok().stdout;
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["structured"], true, "no structured replies: {v}");
    let exports = v["exports"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(exports.len(), 1, "{v}");
    exports[0].clone()
}

/// Hole, zero, data, as `nbdinfo --map` types.
const DATA: u64 = 0;
const HOLE_ZERO: u64 = 3;

#[test]
fn nbdinfo_flags_map_and_list() {
    if !have_tools() {
        return;
    }
    let d = Daemon::new();
    let size = 16 * MIB;
    d.ok(&["create", "D", "--size", "16M"]);
    d.ok(&["create", "E", "--size", "1M"]);
    for uri in [d.unix_uri("D"), d.tcp_uri("D")] {
        let info = nbdinfo(&uri);
        assert_eq!(info["export-size"], size, "{info}");
        for flag in [
            "can_multi_conn",
            "can_trim",
            "can_zero",
            "can_fua",
            "can_flush",
            "can_cache",
        ] {
            assert_eq!(info[flag], true, "{flag}: {info}");
        }
        assert_eq!(info["is_read_only"], false, "{info}");
        assert!(
            info["contexts"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c == "base:allocation")),
            "{info}"
        );
    }
    // A fresh disk is one hole.
    assert_eq!(nbd_map(&d.unix_uri("D"), size), [(0, size, HOLE_ZERO)]);

    // Data at [0,1M), zeroes without NO_HOLE at [1M,2M) over data, trim [0,64K).
    qemu_io(
        &d.unix_uri("D"),
        &["write -P 0x5a 0 2M", "write -z -u 1M 1M", "discard 0 64k"],
    )
    .ok();
    let expect = vec![
        (0, 64 * KIB, HOLE_ZERO),
        (64 * KIB, MIB - 64 * KIB, DATA),
        (MIB, size - MIB, HOLE_ZERO),
    ];
    assert_eq!(nbd_map(&d.unix_uri("D"), size), expect);
    assert_eq!(nbd_map(&d.tcp_uri("D"), size), expect);
    // Holes read as zeros, data as written.
    qemu_io_ro(
        &d.unix_uri("D"),
        &[
            "read -P 0 0 64k",
            "read -P 0x5a 64k 960k",
            "read -P 0 1M 15M",
        ],
    )
    .ok();

    // Zeroes with NO_HOLE (qemu-io write -z without -u) over data: reads
    // zeros; the map may say data, zero or hole there, nothing else changes.
    qemu_io(&d.unix_uri("D"), &["write -P 0x77 4M 1M", "write -z 4M 1M"]).ok();
    qemu_io_ro(
        &d.unix_uri("D"),
        &["read -P 0 4M 1M", "read -P 0x5a 64k 960k"],
    )
    .ok();
    let map = nbd_map(&d.unix_uri("D"), size);
    let outside: Vec<(u64, u64, u64)> = map
        .iter()
        .filter(|e| e.0 + e.1 <= 4 * MIB || e.0 >= 5 * MIB)
        .copied()
        .collect();
    assert_eq!(&outside[..2], &expect[..2], "{map:?}");
    assert!(outside.iter().skip(2).all(|e| e.2 == HOLE_ZERO), "{map:?}");

    // A snapshot is read-only, the same size, and maps the same.
    d.ok(&["snapshot", "D@s1"]);
    let info = nbdinfo(&d.unix_uri("D@s1"));
    assert_eq!(info["is_read_only"], true, "{info}");
    assert_eq!(info["export-size"], size, "{info}");
    assert_eq!(nbd_map(&d.unix_uri("D@s1"), size), map);
    assert_eq!(nbdinfo(&d.tcp_uri("D@s1"))["is_read_only"], true);

    // The raw client sees the same flags.
    let mut nbd = Nbd::new(&d.unix_addr(), "D");
    for (flag, name) in [
        (TF_SEND_FLUSH, "flush"),
        (TF_SEND_FUA, "fua"),
        (TF_SEND_TRIM, "trim"),
        (TF_SEND_WRITE_ZEROES, "write zeroes"),
        (TF_CAN_MULTI_CONN, "multi-conn"),
        (TF_SEND_CACHE, "cache"),
    ] {
        assert!(nbd.flags & flag != 0, "no {name} in {:#x}", nbd.flags);
    }
    assert!(nbd.flags & TF_READ_ONLY == 0);
    assert_eq!(nbd.cmd(0, CMD_CACHE, 0, MIB as u32, &[]).unwrap().0, 0);
    assert_eq!(nbd.read(64 * KIB, 4), [0x5a; 4]);
    nbd.disconnect();
    let snap = Nbd::new(&d.unix_addr(), "D@s1");
    assert!(snap.flags & TF_READ_ONLY != 0, "{:#x}", snap.flags);
    snap.disconnect();
    // An unknown export is refused at NBD_OPT_GO.
    assert!(Nbd::open(&d.unix_addr(), "nope").is_err());
    assert!(Nbd::open(&d.unix_addr(), "D@nope").is_err());

    // --list shows the disks.
    let list_uri = format!("nbd+unix:///?socket={}", d.socket.display());
    let out = run(tool("nbdinfo", &["--list", "--json", &list_uri]))
        .ok()
        .stdout;
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    for disk in ["D", "E"] {
        assert!(names.contains(&disk), "{disk} not listed: {names:?}");
    }
    let text = run(tool("nbdinfo", &["--list", &list_uri])).ok().stdout;
    assert!(
        text.contains("export=\"D\"") && text.contains("export=\"E\""),
        "{text}"
    );
}

// ---- 4. nbdcopy -------------------------------------------------------------------

#[test]
fn nbdcopy_in_and_out() {
    if !have_tools() {
        return;
    }
    let mut rng = Rng::new(seed("nbdcopy"));
    let d = Daemon::new();
    d.ok(&["create", "D", "--size", "32M"]);
    let src = d.path("src.raw");
    let mut data = rng.bytes(32 * MIB as usize);
    data[4 * MIB as usize..6 * MIB as usize].fill(0);
    fs::write(&src, &data).unwrap();
    let src = src.to_str().unwrap();
    run(tool(
        "nbdcopy",
        &["--connections=4", "--flush", src, &d.unix_uri("D")],
    ))
    .ok();
    for (i, uri) in [d.unix_uri("D"), d.tcp_uri("D")].iter().enumerate() {
        let out = d.path(&format!("out{i}.raw"));
        run(tool(
            "nbdcopy",
            &["--connections=4", uri, out.to_str().unwrap()],
        ))
        .ok();
        let back = fs::read(&out).unwrap();
        assert_eq!(back.len(), data.len());
        assert!(
            back == data,
            "nbdcopy out of {uri} differs from what went in"
        );
    }
    // And a snapshot of it, through the CLI and the daemon.
    d.ok(&["snapshot", "D@s"]);
    let out = d.path("snap.raw");
    run(tool("nbdcopy", &[&d.tcp_uri("D@s"), out.to_str().unwrap()])).ok();
    assert!(fs::read(&out).unwrap() == data, "snapshot differs");
}

// ---- 5. fio -------------------------------------------------------------------------

#[test]
fn fio_random_and_sequential_verify() {
    if !have_tools() {
        return;
    }
    fio_verify_passes(&Daemon::new());
}

#[test]
fn fio_verify_with_direct_io_through_io_uring_and_the_blocking_pool() {
    if !have_tools() {
        return;
    }
    // (Needs a temporary directory on a file system that takes O_DIRECT,
    // as ext4 and xfs do; tmpfs does not.)
    let d = Daemon::with(&["--direct"], &[]);
    fio_verify_passes(&d);
    drop(d);
    let d = Daemon::with(&["--direct"], &[("PARALLAX_IO_URING", "0")]);
    assert!(
        d.log().contains("io_uring disabled"),
        "PARALLAX_IO_URING=0 was not honoured:\n{}",
        d.log()
    );
    fio_verify_passes(&d);
}

/// Runs fio's nbd engine on `uri` with `job` plus crc32c verification, and
/// checks that `bytes` were written and all of them read back and verified.
fn fio_verified(d: &Daemon, uri: &str, job: &[&str], bytes: u64, what: &str) {
    let mut args = vec![
        "--name=v".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
    ];
    args.extend(job.iter().map(|a| a.to_string()));
    args.extend(["--verify=crc32c".into(), "--do_verify=1".into()]);
    let report = fio(d.dir.path(), &args);
    let job = &report["jobs"][0];
    assert_eq!(job["write"]["io_bytes"], bytes, "{what}: {job}");
    assert_eq!(
        job["read"]["io_bytes"], bytes,
        "{what}: verify did not read: {job}"
    );
}

/// Random 4k writes with verification on 4 connections (first writes:
/// allocating), the same again over the same blocks (in place), then
/// 1 MiB sequential writes over TCP; all read back and checked by fio.
fn fio_verify_passes(d: &Daemon) {
    d.ok(&["create", "D", "--size", "256M"]);
    for pass in ["allocating", "in place"] {
        let job = [
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=4",
            "--size=64m",
            "--offset_increment=64m",
            "--group_reporting",
        ];
        fio_verified(d, &d.unix_uri("D"), &job, 256 * MIB, pass);
    }
    let job = ["--rw=write", "--bs=1m", "--iodepth=4", "--size=256m"];
    fio_verified(d, &d.tcp_uri("D"), &job, 256 * MIB, "sequential");
    assert_eq!(d.json(&["check"])["clean"], true);
}

// ---- 6. snapshots while writing ---------------------------------------------------

#[test]
fn snapshots_and_clones_while_writing() {
    if !have_tools() {
        return;
    }
    let mut d = Daemon::new();
    d.ok(&["create", "D", "--size", "64M"]);
    let (a, b, c) = (0xaa_u8, 0xbb_u8, 0xcc_u8);
    qemu_io(&d.unix_uri("D"), &[format!("write -P {a:#x} 0 4M")]).ok();
    assert_eq!(d.ok(&["snapshot", "D@s1"]), "D@s1\n");
    qemu_io(&d.tcp_uri("D"), &[format!("write -P {b:#x} 0 2M")]).ok();
    let s1_reads = [
        format!("read -P {a:#x} 0 4M"),
        "read -P 0 4M 60M".to_string(),
    ];
    qemu_io_ro(&d.unix_uri("D@s1"), &s1_reads).ok();
    qemu_io_ro(
        &d.unix_uri("D"),
        &[
            format!("read -P {b:#x} 0 2M"),
            format!("read -P {a:#x} 2M 2M"),
        ],
    )
    .ok();

    // Keep writing C over [0,4M) of D in the background while reading the
    // snapshot and taking another one.
    let mut writer = Bg::spawn(
        tool(
            "fio",
            &[
                "--name=bg".to_string(),
                "--ioengine=nbd".into(),
                format!("--uri={}", d.tcp_uri("D")),
                "--rw=randwrite".into(),
                "--bs=4k".into(),
                "--iodepth=4".into(),
                "--size=4m".into(),
                "--time_based".into(),
                "--runtime=120".into(),
                "--verify=pattern".into(),
                format!("--verify_pattern={c:#x}"),
                "--do_verify=0".into(),
            ],
        ),
        d.dir.path(),
        "fio-bg",
    );
    wait_for_writes(&d, "D", 0, 4 * MIB, |blk| blk.iter().all(|&x| x == c));
    for _ in 0..4 {
        qemu_io_ro(&d.unix_uri("D@s1"), &s1_reads).ok();
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(d.ok(&["snapshot", "D@s2"]), "D@s2\n");
    // One that answers before it is durable, mid-write too.
    assert_eq!(d.ok(&["snapshot", "D@s3", "--no-wait"]), "D@s3\n");
    for _ in 0..3 {
        qemu_io_ro(&d.tcp_uri("D@s1"), &s1_reads).ok();
    }
    assert!(writer.running(), "the background writer stopped early");
    signal(writer.child.id(), "TERM");
    writer.wait(Duration::from_secs(60));
    d.wait_connections(20, "fio gone", |n| n == 0);

    // s2 was taken mid-write: every block is what it was before the writer
    // started or what the writer wrote.
    let s2 = d.path("s2.raw");
    run(tool(
        "nbdcopy",
        &[&d.unix_uri("D@s2"), s2.to_str().unwrap()],
    ))
    .ok();
    let s2 = fs::read(&s2).unwrap();
    assert_eq!(s2.len() as u64, 64 * MIB);
    let mut written = 0;
    for (i, blk) in s2.chunks(BLOCK as usize).enumerate() {
        let old = match i as u64 * BLOCK {
            o if o < 2 * MIB => b,
            o if o < 4 * MIB => a,
            _ => 0,
        };
        let v = blk[0];
        assert!(blk.iter().all(|&x| x == v), "D@s2 block {i} is torn");
        assert!(
            v == old || (v == c && i < 1024),
            "D@s2 block {i} reads {v:#x}"
        );
        written += usize::from(v == c);
    }
    assert!(
        written > 0,
        "the snapshot saw none of the background writes"
    );
    // The CLI export of s2 (through the daemon) agrees with NBD.
    let s2_cli = d.path("s2-cli.raw");
    d.ok(&["export", "D@s2", s2_cli.to_str().unwrap()]);
    assert!(
        fs::read(&s2_cli).unwrap() == s2,
        "CLI export of D@s2 differs"
    );

    // Snapshots are read-only: qemu-io cannot write, and the raw client's
    // write gets EPERM.
    qemu_io(&d.unix_uri("D@s1"), &["write -P 0x01 0 4k"]).failed();
    let mut snap = Nbd::new(&d.unix_addr(), "D@s1");
    assert_eq!(snap.write(0, &[1u8; 4096], 0).unwrap(), EPERM);
    assert_eq!(snap.cmd(0, CMD_TRIM, 0, 4096, &[]).unwrap().0, EPERM);
    assert_eq!(
        snap.cmd(0, CMD_WRITE_ZEROES, 0, 4096, &[]).unwrap().0,
        EPERM
    );
    assert_eq!(snap.read(0, 4096), vec![a; 4096]);
    snap.disconnect();
    // Each refusal is in the daemon's log, with the client, the export and
    // the reason.
    let log = d.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request failed") && l.contains("export=D@s1"))
        .collect();
    assert!(
        refused.len() >= 3 && refused.iter().all(|l| l.contains("read-only")),
        "{log}"
    );
    qemu_io_ro(&d.unix_uri("D@s1"), &s1_reads).ok();

    // A clone of s1 reads A, takes writes, and leaves D alone.
    let before = d.path("d-before.raw");
    run(tool(
        "nbdcopy",
        &[&d.unix_uri("D"), before.to_str().unwrap()],
    ))
    .ok();
    d.ok(&["clone", "D@s1", "C"]);
    qemu_io_ro(&d.unix_uri("C"), &s1_reads).ok();
    qemu_io(
        &d.tcp_uri("C"),
        &["write -P 0xdd 0 1M", "write -P 0xdd 10M 4k"],
    )
    .ok();
    qemu_io_ro(
        &d.unix_uri("C"),
        &[
            "read -P 0xdd 0 1M".to_string(),
            format!("read -P {a:#x} 1M 3M"),
            "read -P 0xdd 10M 4k".into(),
        ],
    )
    .ok();
    let after = d.path("d-after.raw");
    run(tool(
        "nbdcopy",
        &[&d.unix_uri("D"), after.to_str().unwrap()],
    ))
    .ok();
    assert!(
        fs::read(&before).unwrap() == fs::read(&after).unwrap(),
        "writes to the clone changed D"
    );
    qemu_io_ro(&d.unix_uri("D@s1"), &s1_reads).ok();
    assert_eq!(d.json(&["check"])["clean"], true);

    // The --no-wait snapshot was made durable in the background: after
    // kill -9 it is there, with what it held before.
    let s3 = d.path("s3.raw");
    let s3_after = d.path("s3-after.raw");
    run(tool(
        "nbdcopy",
        &[&d.unix_uri("D@s3"), s3.to_str().unwrap()],
    ))
    .ok();
    d.kill9();
    d.start();
    run(tool(
        "nbdcopy",
        &[&d.unix_uri("D@s3"), s3_after.to_str().unwrap()],
    ))
    .ok();
    assert!(
        fs::read(&s3).unwrap() == fs::read(&s3_after).unwrap(),
        "D@s3 changed across kill -9"
    );
    assert_eq!(d.json(&["check"])["clean"], true);
}

// ---- 7. live management -----------------------------------------------------------

/// Rollback and delete of D must be refused while it has connections.
#[track_caller]
fn assert_refused_while_connected(d: &Daemon, client: &str) {
    for args in [&["rollback", "D@s1"][..], &["delete", "D"]] {
        let ran = d.cli.run(args);
        assert_eq!(
            ran.status.code(),
            Some(1),
            "{args:?} not refused with {client} connected: {}\n--- serve.log:\n{}",
            ran.describe(),
            d.log()
        );
        assert!(
            ran.stderr.contains("connection"),
            "{args:?}: {}",
            ran.stderr
        );
    }
    // Nothing changed: D still exists with its own content.
    assert!(d
        .json(&["list"])
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == "D"));
}

#[test]
fn live_disks_refuse_rollback_and_delete() {
    if !have_tools() {
        return;
    }
    let mut d = Daemon::new();
    d.ok(&["create", "D", "--size", "64M"]);
    qemu_io(&d.unix_uri("D"), &["write -P 0x11 0 1M"]).ok();
    d.ok(&["snapshot", "D@s1"]);
    qemu_io(&d.unix_uri("D"), &["write -P 0x22 0 1M"]).ok();
    d.wait_connections(10, "none", |n| n == 0);

    // An idle raw client.
    let idle = Nbd::new(&d.unix_addr(), "D");
    d.wait_connections(10, "1", |n| n == 1);
    assert_refused_while_connected(&d, "an idle raw client");
    idle.disconnect();
    d.wait_connections(10, "none", |n| n == 0);

    // A busy fio client.
    let mut busy = Bg::spawn(
        tool(
            "fio",
            &[
                "--name=busy".to_string(),
                "--ioengine=nbd".into(),
                format!("--uri={}", d.tcp_uri("D")),
                "--rw=randwrite".into(),
                "--bs=4k".into(),
                "--offset=8m".into(),
                "--size=8m".into(),
                "--time_based".into(),
                "--runtime=120".into(),
            ],
        ),
        d.dir.path(),
        "fio-busy",
    );
    wait_for_writes(&d, "D", 8 * MIB, 8 * MIB, |blk| blk.iter().any(|&x| x != 0));
    d.wait_connections(20, "fio's", |n| n == 1);
    assert_refused_while_connected(&d, "fio");
    // Read-only commands work while the daemon serves.
    let list = d.json(&["list"]);
    assert_eq!(list[0]["name"], "D", "{list}");
    assert_eq!(list[0]["size_bytes"], 64 * MIB, "{list}");
    let info = d.json(&["info", "D"]);
    assert_eq!(info["name"], "D", "{info}");
    let info = d.json(&["info", "D@s1"]);
    assert_eq!(info["name"], "s1", "{info}");
    let snaps = d.json(&["snapshots", "D"]);
    assert_eq!(snaps[0]["name"], "s1", "{snaps}");
    let df = d.json(&["df"]);
    assert!(df["used_bytes"].as_u64().is_some_and(|u| u >= MIB), "{df}");
    let status = d.json(&["status"]);
    assert_eq!(status["pid"], d.pid(), "{status}");

    // A second daemon on the same store is refused, and leaves the first
    // one's sockets alone.
    let second = run_for(d.serve_command(&d.socket), Duration::from_secs(30)).code(1);
    assert!(
        second.stderr.contains("already"),
        "no message: {}",
        second.describe()
    );
    assert!(busy.running(), "fio died");
    d.assert_alive();
    assert_eq!(d.json(&["status"])["pid"], d.pid());
    qemu_io_ro(&d.unix_uri("D"), &["read -P 0x22 0 1M"]).ok();

    signal(busy.child.id(), "TERM");
    busy.wait(Duration::from_secs(60));
    d.wait_connections(20, "none after fio ended", |n| n == 0);

    // Now both work, and the export serves the rolled-back content.
    d.ok(&["rollback", "D@s1"]);
    qemu_io_ro(&d.unix_uri("D"), &["read -P 0x11 0 1M", "read -P 0 8M 8M"]).ok();
    // qemu-io has exited; the daemon drops the connection once its end-of-
    // connection flush is done, a moment later.
    d.wait_connections(20, "none after qemu-io", |n| n == 0);
    d.ok(&["delete", "D"]);
    assert_eq!(d.json(&["list"]), Value::Array(vec![]));
    qemu_io_ro(&d.unix_uri("D"), &["read 0 4k"]).failed();
    assert!(Nbd::open(&d.unix_addr(), "D").is_err());
    assert_eq!(d.json(&["check"])["clean"], true);
}

// ---- 8. garbage -------------------------------------------------------------------

/// Sends `header_and_data` (a raw request) and expects either an error reply with a
/// non-zero error, or the connection to close. Returns the error if there
/// was a reply.
#[track_caller]
fn error_or_close(nbd: &mut Nbd, header_and_data: &[u8], what: &str) -> Option<u32> {
    if nbd.wire.write_all(header_and_data).is_err() {
        return None; // already closed
    }
    nbd.wire.set_read_timeout_to(Duration::from_secs(20));
    let mut h = [0u8; 16];
    match nbd.wire.read_exact(&mut h) {
        Ok(()) => {
            assert_eq!(be_u32(&h), SIMPLE_REPLY_MAGIC, "{what}: bad reply {h:02x?}");
            let err = be_u32(&h[4..]);
            assert_ne!(err, 0, "{what}: the server says it succeeded");
            Some(err)
        }
        Err(e) => {
            assert!(
                !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "{what}: no reply and no close in 20 s"
            );
            None
        }
    }
}

/// A raw request header.
fn request(flags: u16, ty: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut buf = Vec::new();
    buf.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    buf.extend_from_slice(&flags.to_be_bytes());
    buf.extend_from_slice(&ty.to_be_bytes());
    buf.extend_from_slice(&cookie.to_be_bytes());
    buf.extend_from_slice(&offset.to_be_bytes());
    buf.extend_from_slice(&len.to_be_bytes());
    buf
}

/// After an error reply, the connection must still serve a valid read.
#[track_caller]
fn still_serves(nbd: &mut Nbd, what: &str) {
    let (err, data) = nbd
        .cmd(0, CMD_READ, 0, 4096, &[])
        .unwrap_or_else(|e| panic!("after {what}: the connection broke: {e}"));
    assert_eq!(err, 0, "after {what}");
    assert_eq!(data.len(), 4096);
}

/// Soft limit on open files, from /proc/self/limits.
fn open_files_limit() -> usize {
    let limits = fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1024)
}

#[test]
fn garbage_does_not_hurt_other_clients() {
    if !have_tools() {
        return;
    }
    let mut rng = Rng::new(seed("garbage"));
    let mut d = Daemon::new();
    d.ok(&["create", "A", "--size", "64M"]);
    d.ok(&["create", "junk", "--size", "64M"]);
    let verify_out = d.path("verify.json");
    let mut verifier = Bg::spawn(
        tool(
            "fio",
            &[
                "--name=verify".to_string(),
                "--ioengine=nbd".into(),
                format!("--uri={}", d.unix_uri("A")),
                "--rw=randwrite".into(),
                "--bs=4k".into(),
                "--iodepth=8".into(),
                "--size=32m".into(),
                "--verify=crc32c".into(),
                "--do_verify=1".into(),
                "--output-format=json".into(),
                format!("--output={}", verify_out.display()),
            ],
        ),
        d.dir.path(),
        "fio-verify",
    );
    let addrs = [d.tcp_addr(), d.unix_addr()];
    for addr in &addrs {
        // Random bytes instead of a client.
        for len in [1usize, 17, 4096, 1 << 20] {
            let mut w = connect(addr).unwrap();
            let _ = w.write_all(&rng.bytes(len));
            if len < 4 {
                // Not even the client flags: the server waits for more.
                w.shut(Shutdown::Write);
            }
            expect_closed(w.as_mut(), Duration::from_secs(20), "random bytes");
        }
        // A bad reply to the greeting: unknown client flags.
        let mut w = connect(addr).unwrap();
        read_greeting(w.as_mut()).unwrap();
        w.write_all(&0xffff_fffc_u32.to_be_bytes()).unwrap();
        expect_closed(w.as_mut(), Duration::from_secs(20), "unknown client flags");
        // Valid flags, then an option with a bad magic.
        let mut w = connect(addr).unwrap();
        read_greeting(w.as_mut()).unwrap();
        w.write_all(&3u32.to_be_bytes()).unwrap();
        w.write_all(&[0x42; 16]).unwrap();
        expect_closed(w.as_mut(), Duration::from_secs(20), "bad option magic");
        // An option claiming 4 GiB of data, then nothing.
        let mut w = connect(addr).unwrap();
        read_greeting(w.as_mut()).unwrap();
        w.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&u32::MAX.to_be_bytes());
        opt.extend_from_slice(&[0; 100]);
        w.write_all(&opt).unwrap();
        drop(w);
        // NBD_OPT_GO naming an export with a length beyond the option data.
        let mut w = connect(addr).unwrap();
        read_greeting(w.as_mut()).unwrap();
        w.write_all(&3u32.to_be_bytes()).unwrap();
        let mut go = 1000u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"A\0\0");
        send_option(w.as_mut(), OPT_GO, &go).unwrap();
        w.shut(Shutdown::Write);
        expect_closed(
            w.as_mut(),
            Duration::from_secs(20),
            "inconsistent NBD_OPT_GO",
        );

        // Negotiated connections sending bad requests.
        let mut nbd = Nbd::new(addr, "junk");
        let size = nbd.size;
        let mut bad = request(0, CMD_READ, 1, 0, 4096);
        bad[0] ^= 0xff;
        error_or_close(&mut nbd, &bad, "bad request magic");

        // Reads the server cannot serve. With simple replies a server may
        // follow a read's error reply with `length` bytes or hang up (the
        // protocol allows both), so the connection is not reused after them.
        let mut nbd = Nbd::new(addr, "junk");
        let err = error_or_close(
            &mut nbd,
            &request(0, CMD_READ, 7, size - 4096, 8192),
            "read past the end",
        );
        assert!(
            matches!(err, None | Some(EINVAL)),
            "read past the end: {err:?}"
        );
        let mut nbd = Nbd::new(addr, "junk");
        let err = error_or_close(
            &mut nbd,
            &request(0, CMD_READ, 8, u64::MAX - 100, 4096),
            "read at offset 2^64-101",
        );
        assert!(
            matches!(err, None | Some(EINVAL)),
            "read at 2^64-101: {err:?}"
        );
        let mut nbd = Nbd::new(addr, "junk");
        error_or_close(
            &mut nbd,
            &request(0, CMD_READ, 9, 0, u32::MAX),
            "read of 4 GiB",
        );

        let mut nbd = Nbd::new(addr, "junk");
        let err = error_or_close(&mut nbd, &request(0, 99, 10, 0, 0), "command 99");
        assert_eq!(err, Some(EINVAL), "command 99 must get an EINVAL reply");
        still_serves(&mut nbd, "command 99");
        let err = error_or_close(
            &mut nbd,
            &request(0, CMD_TRIM, 11, size, 4096),
            "trim past the end",
        );
        assert!(
            matches!(err, None | Some(EINVAL)),
            "trim past the end: {err:?}"
        );
        if err.is_some() {
            still_serves(&mut nbd, "trim past the end");
        }
        nbd.disconnect();

        // Writes that announce more data than they send, then vanish.
        let mut nbd = Nbd::new(addr, "junk");
        let mut req = request(0, CMD_WRITE, 12, 0, u32::MAX);
        req.extend_from_slice(&rng.bytes(MIB as usize));
        let _ = nbd.wire.write_all(&req);
        drop(nbd);
        let mut nbd = Nbd::new(addr, "junk");
        let mut req = request(0, CMD_WRITE, 13, 4096, 16 << 20);
        req.extend_from_slice(&rng.bytes(MIB as usize + 123));
        let _ = nbd.wire.write_all(&req);
        drop(nbd);
        // A write past the end with its data: EINVAL (or ENOSPC), or close.
        let mut nbd = Nbd::new(addr, "junk");
        let mut req = request(0, CMD_WRITE, 14, size - 4096, 8192);
        req.extend_from_slice(&[0x99; 8192]);
        if error_or_close(&mut nbd, &req, "write past the end").is_some() {
            still_serves(&mut nbd, "write past the end");
        }
    }

    // Many idle connections, at every stage of the handshake, while the
    // daemon keeps serving others.
    let count = 1000.min(open_files_limit().saturating_sub(200));
    let mut idle: Vec<Box<dyn Wire>> = Vec::new();
    let mut sessions: Vec<Nbd> = Vec::new();
    for i in 0..count {
        let addr = &addrs[i % 2];
        match i % 4 {
            0 | 1 => idle.push(connect(addr).unwrap()),
            2 => {
                let mut w = connect(addr).unwrap();
                read_greeting(w.as_mut()).unwrap();
                w.write_all(&3u32.to_be_bytes()).unwrap();
                idle.push(w);
            }
            _ => sessions.push(Nbd::new(addr, "junk")),
        }
    }
    d.assert_alive();
    qemu_io_ro(&d.tcp_uri("junk"), &["read 0 64k"]).ok();
    let n = sessions.len();
    d.wait_connections(10, "at least the negotiated ones", |c| c >= n);
    drop(idle);
    drop(sessions);

    let ran = verifier.wait(TOOL_TIMEOUT);
    let text = fs::read_to_string(&verify_out).unwrap_or_default();
    assert!(
        ran.status.success(),
        "the verify client failed: {}\n{text}",
        ran.describe()
    );
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    for job in report["jobs"].as_array().unwrap() {
        assert_eq!(job["error"], 0, "{job}");
        assert_eq!(
            job["read"]["io_bytes"],
            32 * MIB,
            "verify did not read: {job}"
        );
    }
    // Everything is closed; the daemon is alive and serves a fresh client.
    d.wait_connections(30, "none once every client is gone", |n| n == 0);
    d.assert_alive();
    qemu_io(
        &d.unix_uri("A"),
        &["write -P 0x3c 0 64k", "read -P 0x3c 0 64k"],
    )
    .ok();
    qemu_io_ro(&d.tcp_uri("A"), &["read -P 0x3c 0 64k"]).ok();
    d.assert_alive();
    assert_eq!(d.json(&["check"])["clean"], true);
}

// ---- 9. crash ---------------------------------------------------------------------
//
// Writers on several connections write self-describing 4 KiB blocks to
// disjoint regions of one disk (plus trims and write-zeroes), while a
// separate connection sends FLUSH and the CLI takes snapshots. A ledger
// records, per block, every operation sent, how many were acknowledged,
// and how many are promised durable: a FLUSH makes every write
// acknowledged (on any connection) before it was sent durable (multi-conn
// semantics), a FUA write makes itself durable. After `kill -9` and a
// restart, every block must read its last promised operation or a later
// one, and every snapshot the CLI reported must exist and hold, per block,
// an operation between the last one acknowledged before the snapshot began
// and the last one sent before it ended.

/// One operation on one block: data with a sequence number, or zeros.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Data(u64),
    Zero,
}

#[derive(Clone, Default)]
struct BlockLog {
    /// Every operation sent for this block, in order.
    ops: Vec<Op>,
    /// ops[..acked] are acknowledged.
    acked: usize,
    /// ops[..durable] are promised durable (the last of them must survive).
    durable: usize,
}

#[derive(Default)]
struct Ledger {
    blocks: Vec<BlockLog>,
    flushes: u64,
    /// Errors the server returned (a failure), with what was sent.
    errors: Vec<String>,
    /// (snapshot name, acked per block at its start, sent per block at its end).
    snapshots: Vec<(String, Vec<usize>, Vec<usize>)>,
}

const CRASH_MAGIC: &[u8; 8] = b"PXCRASH1";

/// The content of `block` written with sequence number `seq`.
fn block_content(block: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    b[..8].copy_from_slice(CRASH_MAGIC);
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    Rng::new(block.wrapping_mul(0x1000_0000_01b3) ^ seq).fill(&mut b[24..]);
    b
}

/// What a block read back: an operation, or an error for garbage.
fn identify(block: u64, got: &[u8]) -> Result<Op, String> {
    if got.iter().all(|&b| b == 0) {
        return Ok(Op::Zero);
    }
    if &got[..8] != CRASH_MAGIC {
        return Err(format!("block {block}: garbage {:02x?}...", &got[..32]));
    }
    let at = u64::from_le_bytes(got[8..16].try_into().unwrap());
    let seq = u64::from_le_bytes(got[16..24].try_into().unwrap());
    if at != block {
        return Err(format!(
            "block {block} holds the data of block {at} (seq {seq})"
        ));
    }
    if got != block_content(block, seq) {
        return Err(format!(
            "block {block}: torn or corrupt content for seq {seq}"
        ));
    }
    Ok(Op::Data(seq))
}

/// Checks a block read back against ops[lo-1..hi] (any of ops[..hi] or the
/// initial zeros when lo == 0).
fn judge(
    block: u64,
    got: &[u8],
    log: &BlockLog,
    lo: usize,
    hi: usize,
    what: &str,
) -> Result<(), String> {
    let seen = identify(block, got).map_err(|e| format!("{what}: {e}"))?;
    let allowed = &log.ops[lo.saturating_sub(1)..hi];
    if (lo == 0 && seen == Op::Zero) || allowed.contains(&seen) {
        return Ok(());
    }
    Err(format!(
        "{what}: block {block} reads {seen:?}; oldest acceptable {:?}, later ones {:?} (history {:?}, acked {}, durable {})",
        lo.checked_sub(1).map(|i| log.ops[i]),
        &log.ops[lo..hi],
        log.ops,
        log.acked,
        log.durable
    ))
}

/// Flushes on `nbd` and, when the flush succeeds, promises everything
/// acknowledged before it was sent. Err when the connection broke.
fn flush_and_promise(nbd: &mut Nbd, ledger: &Mutex<Ledger>) -> io::Result<()> {
    let acked: Vec<usize> = ledger
        .lock()
        .unwrap()
        .blocks
        .iter()
        .map(|b| b.acked)
        .collect();
    let err = nbd.flush()?;
    let mut l = ledger.lock().unwrap();
    if err != 0 {
        l.errors.push(format!("FLUSH: error {err}"));
        return Ok(());
    }
    for (b, a) in l.blocks.iter_mut().zip(acked) {
        b.durable = b.durable.max(a);
    }
    l.flushes += 1;
    Ok(())
}

/// One writer: random operations on blocks [first, first+count) until
/// `stop` or the connection breaks.
fn crash_writer(
    addr: Addr,
    seed: u64,
    first: u64,
    count: u64,
    ledger: Arc<Mutex<Ledger>>,
    seq: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng::new(seed);
    let Ok(mut nbd) = Nbd::open(&addr, "D") else {
        return;
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let start = first + rng.below(count);
        let run = (1 + rng.below(4)).min(first + count - start);
        let kind = rng.below(100);
        let mut flags = 0;
        let (ty, data, op) = match kind {
            0..=84 => {
                let s = seq.fetch_add(1, Ordering::Relaxed);
                let mut data = Vec::with_capacity((run * BLOCK) as usize);
                for b in start..start + run {
                    data.extend_from_slice(&block_content(b, s));
                }
                if kind < 10 {
                    flags |= CMD_FLAG_FUA;
                }
                (CMD_WRITE, data, Op::Data(s))
            }
            85..=92 => (CMD_TRIM, Vec::new(), Op::Zero),
            _ => {
                if kind.is_multiple_of(2) {
                    flags |= CMD_FLAG_NO_HOLE;
                }
                (CMD_WRITE_ZEROES, Vec::new(), Op::Zero)
            }
        };
        {
            let mut l = ledger.lock().unwrap();
            for b in start..start + run {
                l.blocks[b as usize].ops.push(op);
            }
        }
        let len = (run * BLOCK) as u32;
        match nbd.cmd(flags, ty, start * BLOCK, len, &data) {
            Err(_) => return, // the daemon is gone
            Ok((0, _)) => {
                let mut l = ledger.lock().unwrap();
                for b in start..start + run {
                    let log = &mut l.blocks[b as usize];
                    log.acked = log.ops.len();
                    if flags & CMD_FLAG_FUA != 0 {
                        log.durable = log.ops.len();
                    }
                }
            }
            Ok((err, _)) => {
                ledger.lock().unwrap().errors.push(format!(
                    "command {ty} flags {flags} at block {start} x{run}: error {err}"
                ));
                return;
            }
        }
        if n.is_multiple_of(64) && flush_and_promise(&mut nbd, &ledger).is_err() {
            return;
        }
    }
    nbd.disconnect();
}

/// Reads blocks [first, first+count) of `export` from a fresh connection.
fn read_blocks(addr: &Addr, export: &str, first: u64, count: u64) -> Vec<u8> {
    let mut nbd = Nbd::new(addr, export);
    let mut out = Vec::with_capacity((count * BLOCK) as usize);
    let chunk = 64;
    let mut b = first;
    while b < first + count {
        let n = chunk.min(first + count - b);
        out.extend_from_slice(&nbd.read(b * BLOCK, (n * BLOCK) as u32));
        b += n;
    }
    nbd.disconnect();
    out
}

/// One crash iteration: writers, flusher and snapshots for a random time,
/// `kill -9`, restart, check.
/// One crash run; `serve_args` are extra `serve` options (`--direct`,
/// `--cache`); `policy`: D's cache policy, if not the default.
fn crash_iteration(seed: u64, serve_args: &[&str], policy: Option<&str>) {
    const WRITERS: u64 = 3;
    const REGION: u64 = 1024; // blocks per writer
    let mut rng = Rng::new(seed);
    let mut d = Daemon::with(serve_args, &[]);
    d.ok(&["create", "D", "--size", "64M"]);
    if let Some(p) = policy {
        d.ok(&["cache-policy", "D", p]);
    }
    let blocks = WRITERS * REGION;
    let ledger = Arc::new(Mutex::new(Ledger {
        blocks: vec![BlockLog::default(); blocks as usize],
        ..Ledger::default()
    }));
    let seq = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for w in 0..WRITERS {
        // Alternate transports.
        let addr = if w % 2 == 0 {
            d.unix_addr()
        } else {
            d.tcp_addr()
        };
        let (ledger, seq, stop) = (ledger.clone(), seq.clone(), stop.clone());
        let s = rng.next();
        threads.push(thread::spawn(move || {
            crash_writer(addr, s, w * REGION, REGION, ledger, seq, stop)
        }));
    }
    // The flusher: its own connection, flushes only.
    {
        let (ledger, stop, addr) = (ledger.clone(), stop.clone(), d.unix_addr());
        let mut r = Rng::new(rng.next());
        threads.push(thread::spawn(move || {
            let Ok(mut nbd) = Nbd::open(&addr, "D") else {
                return;
            };
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(2 + r.below(20)));
                if flush_and_promise(&mut nbd, &ledger).is_err() {
                    return;
                }
            }
            nbd.disconnect();
        }));
    }
    // Snapshots through the CLI.
    {
        let (ledger, killed, cli) = (ledger.clone(), killed.clone(), d.cli.clone());
        let mut r = Rng::new(rng.next());
        threads.push(thread::spawn(move || {
            let mut i = 0;
            // Stops before the kill: once the daemon is gone, the CLI opens
            // the store itself and would snapshot the crashed state.
            while !killed.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(100 + r.below(300)));
                i += 1;
                let name = format!("D@c{i}");
                let acked: Vec<usize> = ledger
                    .lock()
                    .unwrap()
                    .blocks
                    .iter()
                    .map(|b| b.acked)
                    .collect();
                let ran = cli.run(&["snapshot", &name]);
                let sent: Vec<usize> = ledger
                    .lock()
                    .unwrap()
                    .blocks
                    .iter()
                    .map(|b| b.ops.len())
                    .collect();
                if killed.load(Ordering::Relaxed) {
                    // It may have raced with the kill: outcome unknown.
                    return;
                }
                if ran.status.success() {
                    ledger.lock().unwrap().snapshots.push((name, acked, sent));
                } else {
                    ledger
                        .lock()
                        .unwrap()
                        .errors
                        .push(format!("snapshot: {}", ran.describe()));
                    return;
                }
            }
        }));
    }

    // Run for 0.5–2 s and at least 3 flushes, then kill -9.
    let run_for_ms = 500 + rng.below(1500);
    thread::sleep(Duration::from_millis(run_for_ms));
    let deadline = Instant::now() + Duration::from_secs(60);
    while ledger.lock().unwrap().flushes < 3 {
        assert!(
            Instant::now() < deadline,
            "fewer than 3 flushes in 60 s\n{}",
            d.log()
        );
        thread::sleep(Duration::from_millis(10));
    }
    killed.store(true, Ordering::Relaxed);
    d.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a client thread panicked");
    }
    let ledger = Arc::try_unwrap(ledger).ok().unwrap().into_inner().unwrap();
    assert!(
        ledger.errors.is_empty(),
        "server errors before the crash: {:?}",
        ledger.errors
    );
    let durable = ledger.blocks.iter().filter(|b| b.durable > 0).count();
    let sent: usize = ledger.blocks.iter().map(|b| b.ops.len()).sum();
    eprintln!(
        "crash: ran {run_for_ms} ms, {sent} block ops, {} flushes, {durable} blocks promised, {} snapshots",
        ledger.flushes,
        ledger.snapshots.len()
    );
    assert!(
        durable >= 100,
        "too little was flushed to test anything: {durable} blocks"
    );
    if policy == Some("write-back") {
        // Without its log, the store refuses to open.
        let ran = d.cli.run(&["list"]);
        assert!(
            !ran.status.success() && ran.stderr.contains("write-back log"),
            "{}",
            ran.describe()
        );
    }

    d.start();
    if policy == Some("write-back") {
        let s = d.json(&["status"]);
        eprintln!(
            "crash: {} records replayed from the write-back log",
            s["write_log"]["replayed"]
        );
    }
    let mut failures = Vec::new();
    for addr in [d.unix_addr(), d.tcp_addr()] {
        let data = read_blocks(&addr, "D", 0, blocks);
        for (b, got) in data.chunks(BLOCK as usize).enumerate() {
            let log = &ledger.blocks[b];
            if let Err(e) = judge(b as u64, got, log, log.durable, log.ops.len(), "D") {
                failures.push(e);
            }
        }
    }
    let listed = d.json(&["snapshots", "D"]);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"))
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for (name, acked, sent) in &ledger.snapshots {
        let snap = name.strip_prefix("D@").unwrap();
        if !names.contains(&snap) {
            failures.push(format!(
                "snapshot {name} was reported but is gone after the crash"
            ));
            continue;
        }
        let data = read_blocks(&d.unix_addr(), name, 0, blocks);
        for (b, got) in data.chunks(BLOCK as usize).enumerate() {
            if let Err(e) = judge(b as u64, got, &ledger.blocks[b], acked[b], sent[b], name) {
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} blocks wrong after kill -9 (seed {seed}); first ones:\n{}\n--- serve.log:\n{}",
        failures.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        d.log()
    );

    // The store is consistent, through the daemon and without it, and
    // gc reclaims what the crash leaked.
    let check = d.json(&["check"]);
    assert_eq!(check["clean"], true, "{check}");
    d.ok(&["gc"]);
    let check = d.json(&["check"]);
    assert_eq!(check["clean"], true, "{check}");
    assert_eq!(check["leaked_blocks"], 0, "{check}");
    // The disk still takes writes.
    let mut nbd = Nbd::new(&d.tcp_addr(), "D");
    assert_eq!(
        nbd.write(0, &block_content(0, u64::MAX), CMD_FLAG_FUA)
            .unwrap(),
        0
    );
    assert_eq!(nbd.read(0, BLOCK as u32), block_content(0, u64::MAX));
    nbd.disconnect();
    d.stop();
    let ran = d.cli.run(&["check"]);
    assert!(ran.status.success(), "offline check: {}", ran.describe());
}

#[test]
fn crash_kill9_keeps_flushed_writes() {
    if !have_tools() {
        return;
    }
    crash_iteration(seed("crash"), &[], None);
}

#[test]
fn crash_kill9_keeps_flushed_writes_with_direct_io() {
    if !have_tools() {
        return;
    }
    // O_DIRECT with io_uring: acknowledged data is on the device, not in
    // the page cache, and allocating writes publish their blocks from the
    // io_uring reaper; the same promises must hold.
    crash_iteration(seed("crash-direct"), &["--direct"], None);
}

#[test]
fn crash_kill9_keeps_flushed_writes_of_a_write_back_disk() {
    if !have_tools() {
        return;
    }
    // Everything D writes goes to the write-back log first; a FLUSH is
    // durable there. The restarted daemon replays what was not destaged.
    crash_iteration(
        seed("crash-write-back"),
        &["--cache", "cache.bin", "--cache-size", "64M"],
        Some("write-back"),
    );
}

// ---- 10. shutdown and listeners ---------------------------------------------------

/// True when the IPv6 loopback address can be bound here.
fn have_ipv6_loopback() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

#[test]
fn graceful_stop_flushes_and_listen_options() {
    if !have_tools() {
        return;
    }
    let mut d = Daemon::new();
    d.ok(&["create", "D", "--size", "16M"]);
    for (i, sig) in ["TERM", "INT"].into_iter().enumerate() {
        // A write never flushed, by a client still connected at the signal,
        // and an idle client: the daemon still exits 0, and flushes first.
        let byte = 0x40 + i as u8;
        let offset = i as u64 * MIB;
        let mut writer = Nbd::new(&d.tcp_addr(), "D");
        assert_eq!(writer.write(offset, &[byte; 64 << 10], 0).unwrap(), 0);
        let idle = Nbd::new(&d.unix_addr(), "D");
        d.wait_connections(10, "2", |n| n == 2);
        d.stop_with(sig);
        drop((writer, idle));
        d.start();
        qemu_io_ro(
            &d.unix_uri("D"),
            &[
                format!("read -P {byte:#x} {offset} 64k"),
                format!("read -P 0 {} 64k", offset + (64 << 10)),
            ],
        )
        .ok();
    }
    // Without TCP: status says null, the Unix socket serves.
    d.listen = "none".to_string();
    d.restart();
    qemu_io_ro(&d.unix_uri("D"), &["read -P 0x40 0 64k"]).ok();
    // On the IPv6 loopback.
    if have_ipv6_loopback() {
        d.listen = "[::1]:0".to_string();
        d.restart();
        assert!(d.tcp.starts_with("[::1]:"), "{}", d.tcp);
        qemu_io_ro(&d.tcp_uri("D"), &["read -P 0x41 1M 64k"]).ok();
        let mut nbd = Nbd::new(&d.tcp_addr(), "D");
        assert_eq!(nbd.read(MIB, 4096), vec![0x41; 4096]);
        nbd.disconnect();
    }
    d.stop();
    // Offline, the store is clean.
    let check = d.cli.json(&["check"]);
    assert_eq!(check["clean"], true, "{check}");
}

// ---- background settling of free space --------------------------------------

#[test]
fn space_freed_through_the_daemon_reaches_the_disk_without_a_commit() {
    if !have_tools() {
        return;
    }
    // Deleting a disk frees its blocks in memory at once; the daemon's
    // background tick writes the bitmaps. After that, a kill -9 must leave
    // no leaked block behind.
    let mut d = Daemon::new();
    d.ok(&["create", "D", "--size", "64M"]);
    qemu_io(&d.unix_uri("D"), &["write -P 0x3c 0 8M", "flush"]).ok();
    d.wait_connections(20, "none after qemu-io", |n| n == 0);
    d.ok(&["delete", "D"]);
    thread::sleep(Duration::from_millis(1000));
    d.kill9();
    let report = d.json(&["check"]);
    assert_eq!(report["clean"], true, "{report}");
    assert_eq!(report["leaked_blocks"], 0, "{report}");
}

// ---- 11. snapshot schedules ------------------------------------------------------

/// A 10 ms schedule with keep-last 15 on a disk that fio writes (and
/// verifies) while qemu-io writes numbered 1 MiB patterns to another range:
/// retention keeps exactly 15, every kept snapshot holds exactly one
/// pattern (each NBD write lands whole or not at all in a snapshot), the
/// patterns never go back in time from one snapshot to the next, the
/// schedule survives a restart, and nothing leaks.
#[test]
fn scheduled_snapshots_with_retention_while_writing() {
    scheduled_retention_while_writing(&[]);
}

/// The same with entry journals (`serve --journal`, format 2): the
/// snapshots are positions in the disk's journal between checkpoints.
#[test]
fn scheduled_snapshots_with_retention_while_writing_with_journals() {
    scheduled_retention_while_writing(&["--journal"]);
}

fn scheduled_retention_while_writing(serve_args: &[&str]) {
    if !have_tools() {
        return;
    }
    let mut d = Daemon::with(serve_args, &[]);
    let journal = serve_args.contains(&"--journal");
    assert_eq!(
        d.json(&["status"])["journal"],
        journal,
        "status says whether journals are on"
    );
    d.ok(&["create", "D", "--size", "48M"]);
    d.ok(&["schedule", "D", "--every", "10ms", "--keep-last", "15"]);
    let info = d.json(&["info", "D"]);
    assert_eq!(info["schedule"]["every_ns"], 10_000_000, "{info}");
    assert_eq!(info["schedule"]["keep_last"], 15, "{info}");
    let mut fio_bg = Bg::spawn(
        tool(
            "fio",
            &[
                "--name=sched".to_string(),
                "--ioengine=nbd".into(),
                format!("--uri={}", d.tcp_uri("D")),
                "--rw=randwrite".into(),
                "--bs=4k".into(),
                "--iodepth=8".into(),
                "--offset=8m".into(),
                "--size=32m".into(),
                "--loops=2".into(),
                "--verify=crc32c".into(),
                "--do_verify=1".into(),
            ],
        ),
        d.dir.path(),
        "fio-sched",
    );
    let mut round = 0u32;
    while fio_bg.running() && round < 250 || round < 20 {
        round += 1;
        qemu_io(&d.unix_uri("D"), &[format!("write -P {round} 0 1M")]).ok();
    }
    let ran = fio_bg.wait(Duration::from_secs(300));
    assert!(
        ran.status.success(),
        "fio verify failed: {}",
        ran.describe()
    );
    let list = |d: &Daemon| -> Vec<Value> {
        d.json(&["snapshots", "D"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let before = list(&d);
    assert!(
        (1..=16).contains(&before.len()),
        "retention keeps 15 (16 between a snapshot and its retention pass): {}",
        before.len()
    );
    let newest_before = before.last().unwrap()["id"].as_u64().unwrap();
    // The schedule is stored in the store: it resumes after a restart.
    d.restart();
    thread::sleep(Duration::from_millis(500));
    d.ok(&["schedule", "D", "--off"]);
    assert_eq!(d.json(&["info", "D"])["schedule"], Value::Null);
    let kept = list(&d);
    assert_eq!(kept.len(), 15, "{kept:?}");
    assert!(
        kept[0]["id"].as_u64().unwrap() > newest_before,
        "the schedule did not resume"
    );
    for s in &kept {
        assert_eq!(s["scheduled"], true, "{s}");
        assert!(s["referenced_bytes"].as_u64().unwrap() >= MIB, "{s}");
        assert!(s["used_bytes"].is_u64(), "{s}");
    }
    // Between the resumed snapshots nothing was written: all hold the last
    // pattern.
    let (first, last, _) = check_pattern_sequence(&d, &kept);
    assert_eq!((u32::from(first), u32::from(last)), (round, round));
    let report = d.json(&["check"]);
    assert_eq!(report["clean"], true, "{report}");
    assert_eq!(report["leaked_blocks"], 0, "{report}");
    let df = d.json(&["df", "--scan"]);
    assert_eq!(df["scan"]["matches"], true, "{df}");
    let disk = &df["disks"][0];
    assert!(
        disk["used_bytes"].as_u64() >= disk["referenced_bytes"].as_u64(),
        "{df}"
    );
}

/// Exports every snapshot of `kept` (oldest first) and checks its first
/// MiB, where rounds of `write -P N 0 1M` went: each snapshot holds at most
/// two consecutive patterns (the last complete write, and the one in flight
/// when it was taken), and no snapshot holds an older write than the one
/// before it. Returns the lowest pattern of the first snapshot, the highest
/// of the last, and how many snapshots saw a newer write than the previous.
fn check_pattern_sequence(d: &Daemon, kept: &[Value]) -> (u8, u8, usize) {
    let (mut first, mut floor, mut newer) = (None, 0u8, 0);
    let mut top = 0u8;
    for s in kept {
        let name = s["name"].as_str().unwrap();
        let file = d.path(&format!("{name}.raw"));
        d.ok(&["export", &format!("D@{name}"), file.to_str().unwrap()]);
        let bytes = fs::read(&file).unwrap();
        fs::remove_file(&file).unwrap();
        let region = &bytes[..MIB as usize];
        let (lo, hi) = (*region.iter().min().unwrap(), *region.iter().max().unwrap());
        assert!(hi - lo <= 1, "snapshot {name} holds patterns {lo}..={hi}");
        assert!(
            lo >= floor,
            "snapshot {name} holds pattern {lo} after {floor}"
        );
        newer += usize::from(lo > floor);
        first.get_or_insert(lo);
        floor = lo;
        top = hi;
    }
    (first.unwrap_or(0), top, newer)
}

/// The snapshots taken while patterns are written hold them in order: a
/// schedule running during the writes, then every kept snapshot checked
/// against the write sequence.
#[test]
fn scheduled_snapshots_hold_the_writes_of_their_time() {
    if !have_tools() {
        return;
    }
    let d = Daemon::new();
    d.ok(&["create", "D", "--size", "8M"]);
    d.ok(&["schedule", "D", "--every", "15ms", "--keep-last", "400"]);
    for round in 1..=60u32 {
        qemu_io(&d.unix_uri("D"), &[format!("write -P {round} 0 1M")]).ok();
    }
    // A few more ticks after the last write.
    thread::sleep(Duration::from_millis(100));
    d.ok(&["schedule", "D", "--off"]);
    let kept = d.json(&["snapshots", "D"]).as_array().cloned().unwrap();
    assert!(kept.len() > 30, "too few snapshots: {}", kept.len());
    let (_, last, newer) = check_pattern_sequence(&d, &kept);
    assert_eq!(last, 60, "the newest snapshot holds the last write");
    assert!(newer > 10, "snapshots span only {newer} writes");
}

// ---- 12. a pool reached over NBD ----------------------------------------------------

/// A store on an export of `qemu-nbd` (the pool reached over the network):
/// `init` formats it (refusing a second time), commands without
/// `--control` are refused, the daemon serves disks from it, writes
/// survive its `kill -9`, and it rides out the pool server's restart.
#[test]
fn a_store_on_an_nbd_pool() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.raw");
    fs::File::create(&pool).unwrap().set_len(1 << 30).unwrap();
    let pool_sock = dir.path().join("pool.sock");
    let start_pool = || {
        let _ = fs::remove_file(&pool_sock);
        let child = tool(
            "qemu-nbd",
            &[
                "--format=raw".to_string(),
                "--persistent".into(),
                "--shared=16".into(),
                format!("--socket={}", pool_sock.display()),
                pool.display().to_string(),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
        let deadline = Instant::now() + READY_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(&pool_sock).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not come up");
            thread::sleep(Duration::from_millis(20));
        }
        child
    };
    let mut pool_server = start_pool();
    let store = format!("nbd+unix:///?socket={}", pool_sock.display());
    let control = dir.path().join("px.control");
    let nbd_sock = dir.path().join("nbd.sock");
    let px = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_parallax"));
        cmd.arg("--store")
            .arg(&store)
            .arg("--control")
            .arg(&control);
        cmd.args(args).current_dir(dir.path());
        cmd.env_remove("PARALLAX_STORE")
            .env_remove("PARALLAX_CONTROL");
        cmd
    };
    run(px(&["init"])).ok();
    let again = run(px(&["init"]));
    assert!(
        !again.status.success() && again.stderr.contains("already holds a Parallax store"),
        "{}",
        again.describe()
    );
    let mut no_control = Command::new(env!("CARGO_BIN_EXE_parallax"));
    no_control.arg("--store").arg(&store).arg("list");
    let refused = run(no_control);
    assert_eq!(refused.status.code(), Some(2), "{}", refused.describe());
    assert!(
        refused.stderr.contains("--control"),
        "{}",
        refused.describe()
    );

    let serve = || {
        let mut cmd = px(&["serve", "--nbd-listen", "none", "--nbd-socket"]);
        cmd.arg(&nbd_sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("parallax serve");
        let deadline = Instant::now() + READY_TIMEOUT;
        while !run(px(&["status"])).status.success() {
            assert!(Instant::now() < deadline, "the daemon did not come up");
            thread::sleep(Duration::from_millis(50));
        }
        child
    };
    let mut daemon = serve();
    run(px(&["create", "D", "--size", "64M"])).ok();
    let uri = format!("nbd+unix:///D?socket={}", nbd_sock.display());
    qemu_io(&uri, &["write -P 0x5a 0 4M", "write -P 0x6b 32M 1M"]).ok();
    run(px(&["snapshot", "D@s"])).ok();

    // The pool server restarts under the running daemon: it reconnects.
    pool_server.kill().unwrap();
    pool_server.wait().unwrap();
    pool_server = start_pool();
    qemu_io(&uri, &["write -P 0x7c 8M 1M"]).ok();
    qemu_io_ro(&uri, &["read -P 0x5a 0 4M", "read -P 0x7c 8M 1M"]).ok();

    // kill -9: every write qemu-io flushed is there after a restart.
    signal(daemon.id(), "KILL");
    daemon.wait().unwrap();
    let _ = fs::remove_file(&control);
    daemon = serve();
    qemu_io_ro(
        &uri,
        &[
            "read -P 0x5a 0 4M",
            "read -P 0x7c 8M 1M",
            "read -P 0x6b 32M 1M",
        ],
    )
    .ok();
    let snap = format!("nbd+unix:///D@s?socket={}", nbd_sock.display());
    qemu_io_ro(&snap, &["read -P 0x5a 0 4M", "read -P 0 8M 1M"]).ok();
    let check = run(px(&["check", "--json"])).ok().stdout;
    assert!(
        check.contains("\"clean\": true") || check.contains("\"clean\":true"),
        "{check}"
    );
    signal(daemon.id(), "TERM");
    daemon.wait().unwrap();
    pool_server.kill().unwrap();
    pool_server.wait().unwrap();
}

// ---- 12. NBD over TLS -------------------------------------------------------------

/// A test PKI made with `openssl` in `dir`: a CA; the server's certificate
/// (for `localhost` and 127.0.0.1); and three client directories in the
/// layout QEMU's `tls-creds-x509` and libnbd's `tls-certificates` read
/// (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`): `client` (signed by
/// the CA), `stranger` (signed by another CA) and `anonymous` (no
/// certificate). Every directory trusts the real CA for the server.
fn make_pki(dir: &Path) {
    let sh = |script: &str| {
        let mut cmd = tool("sh", &["-ec", script]);
        cmd.current_dir(dir);
        run(cmd).ok();
    };
    sh(r#"
        key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out "$1" 2>/dev/null; }
        ca() { key "$1-key.pem"; openssl req -x509 -new -key "$1-key.pem" -out "$1-cert.pem" -days 2 -subj "/CN=$1"; }
        sign() { # name ca extensions
            key "$1-key.pem"
            openssl req -new -key "$1-key.pem" -out "$1.csr" -subj "/CN=$1"
            printf '%s\n' "$3" > "$1.ext"
            openssl x509 -req -in "$1.csr" -CA "$2-cert.pem" -CAkey "$2-key.pem" -CAcreateserial \
                -out "$1-cert.pem" -days 2 -extfile "$1.ext" 2>/dev/null
        }
        ca ca; ca otherca
        sign server ca "subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
        sign alice ca "extendedKeyUsage=clientAuth"
        sign mallory otherca "extendedKeyUsage=clientAuth"
        for d in client stranger anonymous; do mkdir -p $d; cp ca-cert.pem $d/ca-cert.pem; done
        cp alice-cert.pem client/client-cert.pem; cp alice-key.pem client/client-key.pem
        cp mallory-cert.pem stranger/client-cert.pem; cp mallory-key.pem stranger/client-key.pem
    "#);
}

/// `serve` arguments for TLS with the PKI in `dir`, mode `mode`, clients
/// verified against the CA when `verify`.
fn tls_args(dir: &Path, mode: &str, verify: bool) -> Vec<String> {
    let mut args = vec![
        "--tls".to_string(),
        mode.to_string(),
        "--tls-cert".into(),
        dir.join("server-cert.pem").display().to_string(),
        "--tls-key".into(),
        dir.join("server-key.pem").display().to_string(),
    ];
    if verify {
        args.push("--tls-ca".into());
        args.push(dir.join("ca-cert.pem").display().to_string());
    }
    args
}

/// `nbds://127.0.0.1:PORT/EXPORT?tls-certificates=DIR/CREDS`.
fn tls_uri(d: &Daemon, pki: &Path, export: &str, creds: &str) -> String {
    format!(
        "nbds://{}/{export}?tls-certificates={}",
        d.tcp,
        pki.join(creds).display()
    )
}

/// `qemu-io` (or `qemu-img`) arguments opening `export` over TLS with the
/// credentials in `creds`, the server named `host`.
fn qemu_tls_args(d: &Daemon, creds: &Path, host: &str, export: &str) -> Vec<String> {
    let port = d.tcp.rsplit_once(':').unwrap().1;
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=t0,endpoint=client,dir={}",
            creds.display()
        ),
        "--image-opts".into(),
        format!(
            "driver=nbd,server.type=inet,server.host={host},server.port={port},export={export},tls-creds=t0"
        ),
    ]
}

/// Starts a daemon whose TLS files live in a PKI made in a directory of
/// its own, removed when the returned guard drops (also on a failure).
fn tls_daemon(mode: &str, verify: bool) -> (Daemon, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().to_path_buf();
    make_pki(&pki);
    let args = tls_args(&pki, mode, verify);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Daemon::with(&args, &[]), pki, dir)
}

#[test]
fn tls_required_lets_in_only_the_clients_the_ca_signed() {
    if !have_tools() {
        return;
    }
    let (d, pki, _pki_dir) = tls_daemon("require", true);
    let status = d.json(&["status"]);
    assert_eq!(status["nbd_tls"], "require", "{status}");
    assert_eq!(status["nbd_tls_verifies_clients"], true, "{status}");
    d.ok(&["create", "D", "--size", "64M"]);

    // A client with a certificate the CA signed gets in, over TLS.
    let ran = run(tool(
        "nbdinfo",
        &["--is", "tls", &tls_uri(&d, &pki, "D", "client")],
    ));
    assert!(ran.status.success(), "{}", ran.describe());

    // Without TLS, without a certificate or with a stranger's: refused,
    // and the log says why.
    let plain = run(tool("nbdinfo", &[d.tcp_uri("D")]));
    assert!(
        !plain.status.success(),
        "plain client served: {}",
        plain.describe()
    );
    for creds in ["anonymous", "stranger"] {
        let ran = run(tool("nbdinfo", &[tls_uri(&d, &pki, "D", creds)]));
        assert!(!ran.status.success(), "{creds} served: {}", ran.describe());
    }
    let log = d.log();
    assert!(log.contains("without starting TLS"), "{log}");
    assert_eq!(log.matches("TLS handshake failed").count(), 2, "{log}");

    // QEMU writes and reads back over TLS, naming the server by IP address
    // and by host name (both in the certificate).
    let creds = pki.join("client");
    let mut args = vec!["-c", "write -P 0x5a 0 4M", "-c", "read -P 0x5a 0 4M"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.extend(qemu_tls_args(&d, &creds, "127.0.0.1", "D"));
    run(tool("qemu-io", &args)).ok();
    let mut args = vec!["info".to_string(), "--output=json".into()];
    args.extend(qemu_tls_args(&d, &creds, "localhost", "D"));
    let info = run(tool("qemu-img", &args)).ok().stdout;
    assert!(info.contains("\"virtual-size\": 67108864"), "{info}");
    // QEMU without client credentials is refused.
    let mut args = vec!["info".to_string()];
    args.extend(qemu_tls_args(&d, &pki.join("anonymous"), "localhost", "D"));
    let ran = run(tool("qemu-img", &args));
    assert!(!ran.status.success(), "{}", ran.describe());

    // libnbd reads the same bytes back over TLS.
    let copy = pki.join("D.raw");
    run(tool(
        "nbdcopy",
        &[tls_uri(&d, &pki, "D", "client"), copy.display().to_string()],
    ))
    .ok();
    let bytes = fs::read(&copy).expect("read the copy");
    assert_eq!(bytes.len() as u64, 64 * MIB);
    assert!(bytes[..4 << 20].iter().all(|&b| b == 0x5a));
    assert!(bytes[4 << 20..].iter().all(|&b| b == 0));
    assert_eq!(d.json(&["check"])["clean"], true);
    drop(d);
}

#[test]
fn tls_optional_serves_plain_and_tls_clients_alike() {
    if !have_tools() {
        return;
    }
    let (d, pki, _pki_dir) = tls_daemon("optional", false);
    assert_eq!(d.json(&["status"])["nbd_tls"], "optional");
    d.ok(&["create", "D", "--size", "16M"]);
    qemu_io(&d.tcp_uri("D"), &["write -P 0x33 0 1M"]).ok();
    let ran = run(tool(
        "nbdinfo",
        &["--is", "tls", &tls_uri(&d, &pki, "D", "anonymous")],
    ));
    assert!(ran.status.success(), "{}", ran.describe());
    let ran = run(tool("nbdinfo", &["--is", "tls", &d.tcp_uri("D")]));
    // `--is` exits 2 for "no".
    assert_eq!(
        ran.status.code(),
        Some(2),
        "plain client: {}",
        ran.describe()
    );
    let mut args = vec!["-r", "-c", "read -P 0x33 0 1M"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.extend(qemu_tls_args(&d, &pki.join("anonymous"), "localhost", "D"));
    run(tool("qemu-io", &args)).ok();
    // fio verifies what it wrote, through libnbd over TLS. (Its nbd engine
    // refuses URIs naming local files, such as `tls-certificates`: here the
    // server asks for no client certificate, and fio does not check the
    // server's.)
    let job = [
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=8m",
        "--offset=8m",
    ];
    let uri = format!("nbds://{}/D?tls-verify-peer=false", d.tcp);
    fio_verified(&d, &uri, &job, 8 * MIB, "TLS");
    let log = d.log();
    assert!(log.matches("tls=true").count() >= 3, "{log}");
    assert_eq!(d.json(&["check"])["clean"], true);
    drop(d);
}

// ---- 13. metrics --------------------------------------------------------------------

/// `GET PATH` over HTTP/1.0 on `stream`; (status code, body).
fn http_get(mut stream: impl Read + Write, path: &str) -> (u32, String) {
    write!(stream, "GET {path} HTTP/1.0\r\nHost: parallax\r\n\r\n").expect("send request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read response");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP response: {text}"));
    (code, body.to_string())
}

/// The samples of a Prometheus text page: `name{labels}` → value.
fn samples(page: &str) -> std::collections::HashMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[test]
fn metrics_count_requests_errors_commits_and_schedules() {
    if !have_tools() {
        return;
    }
    let d = Daemon::with(&["--metrics-listen", "0", "--metrics-per-disk"], &[]);
    let status = d.json(&["status"]);
    let metrics_tcp = status["metrics_tcp"]
        .as_str()
        .unwrap_or_else(|| panic!("no metrics_tcp: {status}"))
        .to_string();
    assert!(metrics_tcp.starts_with("127.0.0.1:"), "{status}");
    d.ok(&["create", "D", "--size", "64M"]);
    d.ok(&["snapshot", "D@s"]);
    qemu_io(
        &d.unix_uri("D"),
        &["write -P 7 0 1M", "read -P 7 0 1M", "flush"],
    )
    .ok();
    // A write to a read-only export fails: one error. (qemu-io would not
    // even send it.)
    let mut raw = Nbd::new(&d.unix_addr(), "D@s");
    assert_ne!(raw.write(0, &[1; 4096], 0).expect("write reply"), 0);
    raw.disconnect();
    d.ok(&["schedule", "D", "--every", "10ms", "--keep-last", "2"]);
    thread::sleep(Duration::from_millis(300));
    d.ok(&["schedule", "D", "--off"]);
    d.wait_connections(10, "none", |n| n == 0);

    let control = UnixStream::connect(d.cli.control_path()).expect("control socket");
    let (code, page) = http_get(control, "/metrics");
    assert_eq!(code, 200, "{page}");
    let m = samples(&page);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in\n{page}"));
    assert_eq!(get(r#"parallax_nbd_bytes_total{op="write"}"#), MIB as f64);
    assert_eq!(get(r#"parallax_nbd_bytes_total{op="read"}"#), MIB as f64);
    assert_eq!(get(r#"parallax_nbd_request_errors_total{op="write"}"#), 1.0);
    assert_eq!(get(r#"parallax_nbd_request_errors_total{op="read"}"#), 0.0);
    assert!(get(r#"parallax_nbd_requests_total{op="flush"}"#) >= 1.0);
    assert_eq!(
        get(r#"parallax_nbd_request_duration_seconds_count{op="read"}"#),
        get(r#"parallax_nbd_requests_total{op="read"}"#)
    );
    assert_eq!(get("parallax_nbd_requests_in_flight"), 0.0);
    assert_eq!(get("parallax_nbd_connections"), 0.0);
    assert!(get("parallax_nbd_connections_opened_total") >= 2.0);
    assert_eq!(
        get(r#"parallax_nbd_disk_bytes_total{disk="D",op="write"}"#),
        MIB as f64
    );
    assert_eq!(
        get(r#"parallax_nbd_disk_requests_total{disk="D@s",op="write"}"#),
        1.0
    );
    let taken = get("parallax_scheduled_snapshots_taken_total");
    assert!(
        taken >= 5.0,
        "{taken} scheduled snapshots in 300 ms at 10 ms"
    );
    // Keep-last 2: all but the last two scheduled ones were deleted.
    assert!(get("parallax_scheduled_snapshots_deleted_total") >= taken - 2.0);
    assert!(get("parallax_commits_total") >= taken);
    assert!(get("parallax_commit_duration_seconds_count") >= taken);
    // Every scheduled snapshot held its disk once, at least.
    assert!(get("parallax_disk_held_seconds_count") >= taken);
    assert!(get("parallax_disk_held_seconds_sum") > 0.0);
    assert!(get("parallax_store_used_bytes") >= MIB as f64);
    assert_eq!(get("parallax_disks"), 1.0);

    // Deleting the snapshot takes its series away; the disk's stay.
    d.ok(&["delete", "D@s"]);
    let control = UnixStream::connect(d.cli.control_path()).expect("control socket");
    let (_, page) = http_get(control, "/metrics");
    assert!(!page.contains("disk=\"D@s\""), "{page}");
    assert!(page.contains("disk=\"D\""), "{page}");

    // The same page on the TCP port, and nothing else there.
    let tcp = TcpStream::connect(&metrics_tcp).expect("metrics port");
    let (code, page) = http_get(tcp, "/metrics");
    assert_eq!(code, 200);
    assert!(page.contains("parallax_nbd_requests_total"), "{page}");
    let tcp = TcpStream::connect(&metrics_tcp).expect("metrics port");
    assert_eq!(http_get(tcp, "/v1/status").0, 404);
}

#[test]
fn metrics_have_no_per_disk_series_unless_asked() {
    if !have_tools() {
        return;
    }
    let d = Daemon::new();
    assert!(d.json(&["status"]).get("metrics_tcp").is_none());
    d.ok(&["create", "D", "--size", "16M"]);
    qemu_io(&d.unix_uri("D"), &["write 0 64k"]).ok();
    let control = UnixStream::connect(d.cli.control_path()).expect("control socket");
    let (code, page) = http_get(control, "/metrics");
    assert_eq!(code, 200);
    assert!(
        page.contains(r#"parallax_nbd_bytes_total{op="write"} 65536"#),
        "{page}"
    );
    assert!(
        !page.contains("disk=\""),
        "per-disk series by default:\n{page}"
    );
}

// ---- 14. settings file, systemd, sockets ------------------------------------------------

#[test]
fn serve_takes_its_settings_from_a_file_and_flags_win() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("parallax.toml");
    let gid = rustix::process::getgid().as_raw();
    fs::write(
        &conf,
        format!(
            "nbd_listen = \"none\"\nmetrics-listen = \"0\"\nnbd_socket_mode = \"0660\"\n\
             control_group = \"{gid}\"\nlist_snapshots = true\n"
        ),
    )
    .unwrap();
    let d = Daemon::with(&["--config", conf.to_str().unwrap()], &[]);
    // The command line's --nbd-listen 127.0.0.1:0 won over the file's
    // "none" (the harness checked that status reports a TCP address).
    assert!(d.tcp.starts_with("127.0.0.1:"), "{}", d.tcp);
    let status = d.json(&["status"]);
    assert!(status["metrics_tcp"].is_string(), "{status}");
    assert_eq!(mode_of(&d.socket), 0o660);
    assert_eq!(mode_of(&d.cli.control_path()), 0o660);
    drop(d);

    // The example in contrib/ is a settings file `serve` takes as it is.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/parallax.toml");
    let d = Daemon::with(&["--config", example.to_str().unwrap()], &[]);
    assert_eq!(mode_of(&d.socket), 0o600);
    drop(d);

    // A key that is no flag, a value of the wrong kind, a missing file:
    // refused before anything starts.
    let d = Daemon::new();
    for (text, says) in [
        ("bogus = 1", "'bogus' is not a setting"),
        ("direct = \"yes\"", "'direct' is a switch"),
        ("metrics_listen = [1]", "expected a string or a number"),
        ("nbd_socket_mode = \"0400\"", "keeps the owner's"),
        ("config = \"x\"", "cannot name another"),
    ] {
        let bad = dir.path().join("bad.toml");
        fs::write(&bad, text).unwrap();
        let ran = d.cli.run(&["serve", "--config", bad.to_str().unwrap()]);
        assert_eq!(ran.status.code(), Some(2), "{text}: {}", ran.describe());
        assert!(ran.stderr.contains(says), "{text}: {}", ran.describe());
    }
    let ran = d
        .cli
        .run(&["serve", "--config", "/nonexistent/parallax.toml"]);
    assert_eq!(ran.status.code(), Some(2), "{}", ran.describe());
}

#[test]
fn serve_tells_systemd_when_it_is_ready_and_when_it_stops() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
    systemd
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut d = Daemon::with(&[], &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut buf = [0u8; 512];
    let n = systemd.recv(&mut buf).expect("no READY=1 from the daemon");
    let said = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(said.lines().any(|l| l == "READY=1"), "{said}");
    d.stop();
    let n = systemd
        .recv(&mut buf)
        .expect("no STOPPING=1 from the daemon");
    let said = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(said.lines().any(|l| l == "STOPPING=1"), "{said}");
}

#[test]
fn tls_credentials_are_reloaded_on_sighup_and_a_bad_reload_changes_nothing() {
    if !have_tools() {
        return;
    }
    let (d, pki, _pki_dir) = tls_daemon("require", true);
    d.ok(&["create", "D", "--size", "16M"]);
    let works = |pki: &Path| {
        run(tool(
            "nbdinfo",
            &["--is", "tls", &tls_uri(&d, pki, "D", "client")],
        ))
        .status
        .success()
    };
    // A second PKI: another CA, its server certificate and its client.
    let next = tempfile::tempdir().expect("tempdir");
    make_pki(next.path());
    assert!(works(&pki));
    assert!(!works(next.path()), "a client of the next CA got in early");
    for f in ["server-cert.pem", "server-key.pem", "ca-cert.pem"] {
        fs::copy(next.path().join(f), pki.join(f)).unwrap();
    }
    let wait_log = |what: &str, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.log().matches(what).count() < n {
            assert!(
                Instant::now() < deadline,
                "no {what:?} in the log:\n{}",
                d.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    };
    signal(d.pid(), "HUP");
    wait_log("TLS credentials reloaded", 1);
    assert!(works(next.path()), "the new credentials are not in use");
    assert!(!works(&pki), "the old CA's client still gets in");
    // A key that cannot be read: the reload fails, the credentials stay.
    fs::write(pki.join("server-key.pem"), "not a key").unwrap();
    signal(d.pid(), "HUP");
    wait_log("TLS credentials not reloaded", 1);
    assert!(works(next.path()), "a failed reload broke TLS");
    drop(d);
}

// ---- backup contexts ----------------------------------------------------------

/// Blocks of 4 KiB over `map` (offset, length, type) whose type is `want`.
fn blocks_of(map: &[(u64, u64, u64)], want: u64) -> Vec<u64> {
    map.iter()
        .filter(|e| e.2 == want)
        .flat_map(|e| e.0 / BLOCK..(e.0 + e.1) / BLOCK)
        .collect()
}

/// `nbdinfo --map=CONTEXT --json URI`, checked to cover the disk.
fn context_map(uri: &str, context: &str, size: u64) -> Vec<(u64, u64, u64)> {
    let json = run(tool(
        "nbdinfo",
        &[&format!("--map={context}"), "--json", uri],
    ))
    .ok()
    .stdout;
    merge_map(&parse_map_json(&json), size)
}

/// Backup tools read only what changed: a snapshot export offers
/// `qemu:dirty-bitmap:A` for each other snapshot A of its disk (bit 0 set
/// exactly where it differs from A) and `qemu:allocation-depth` (0
/// unmapped, 1 the disk's own block, 2 its clone origin's), checked with
/// `nbdinfo --map` and `qemu-img map` against a model of the writes; the
/// libnbd backup script (`contrib/nbd-backup.py`) makes a full backup of A
/// and brings it to B reading only the changed blocks, and the result is
/// identical to B (mutation tried: the dirty bitmap reporting the blocks
/// B maps instead of the changed ones -> the maps differ from the model).
#[test]
fn dirty_bitmaps_and_allocation_depth_for_backup_tools() {
    if !have_tools() {
        return;
    }
    let mut rng = Rng::new(seed("dirty_bitmaps_and_allocation_depth_for_backup_tools"));
    let d = Daemon::new();
    let size = 64 * MIB;
    let blocks = (size / BLOCK) as usize;
    d.cli.ok(&["create", "vm", "--size", "64M"]);
    // Block ─▶ id of the write it holds (0: never written or discarded).
    let mut model = vec![0u64; blocks];
    let mut next_id = 1u64;
    let mut phase = |model: &mut Vec<u64>, disk: &str, writes: usize, discards: usize| {
        let mut cmds = Vec::new();
        for i in 0..writes + discards {
            let n = 1 + rng.below(16) as usize;
            let at = rng.below((blocks - n) as u64) as usize;
            if i < writes {
                let pattern = next_id % 255 + 1;
                cmds.push(format!(
                    "write -P {pattern} {} {}",
                    at as u64 * BLOCK,
                    n as u64 * BLOCK
                ));
                for b in &mut model[at..at + n] {
                    *b = next_id;
                }
                next_id += 1;
            } else {
                cmds.push(format!(
                    "discard {} {}",
                    at as u64 * BLOCK,
                    n as u64 * BLOCK
                ));
                model[at..at + n].fill(0);
            }
        }
        qemu_io(&d.unix_uri(disk), &cmds).ok();
    };
    phase(&mut model, "vm", 40, 0);
    d.cli.ok(&["snapshot", "vm@a"]);
    let at_a = model.clone();
    phase(&mut model, "vm", 25, 8);
    d.cli.ok(&["snapshot", "vm@b"]);
    let at_b = model.clone();
    let changed: Vec<u64> = (0..blocks)
        .filter(|&v| at_a[v] != at_b[v])
        .map(|v| v as u64)
        .collect();
    assert!(!changed.is_empty());

    // The contexts listed: every other snapshot, not the export's own.
    let b_uri = d.unix_uri("vm@b");
    let info: Value = serde_json::from_str(&run(tool("nbdinfo", &["--json", &b_uri])).ok().stdout)
        .expect("nbdinfo JSON");
    let contexts: Vec<&str> = info["exports"][0]["contexts"]
        .as_array()
        .expect("contexts")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        contexts,
        [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:a"
        ]
    );

    // nbdinfo: type 1 = dirty.
    let dirty = context_map(&b_uri, "qemu:dirty-bitmap:a", size);
    assert_eq!(blocks_of(&dirty, 1), changed, "nbdinfo's dirty blocks");
    // The same from the live disk's export (nothing written since b).
    let live = context_map(&d.unix_uri("vm"), "qemu:dirty-bitmap:a", size);
    assert_eq!(blocks_of(&live, 1), changed, "the live disk's dirty blocks");
    // qemu-img map reports dirty blocks as "data": false.
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=vm@b,x-dirty-bitmap=qemu:dirty-bitmap:a",
        d.socket.display()
    );
    let map: Value = serde_json::from_str(
        &run(tool(
            "qemu-img",
            &["map", "--output=json", "--image-opts", &opts],
        ))
        .ok()
        .stdout,
    )
    .expect("qemu-img map JSON");
    let qemu_dirty: Vec<u64> = map
        .as_array()
        .expect("map")
        .iter()
        .filter(|e| e["data"] == false)
        .flat_map(|e| {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            s / BLOCK..(s + l) / BLOCK
        })
        .collect();
    assert_eq!(qemu_dirty, changed, "qemu-img map's dirty blocks");

    // Allocation depth of a clone of b, written a little.
    d.cli.ok(&["clone", "vm@b", "c"]);
    let mut clone_model = at_b.clone();
    phase(&mut clone_model, "c", 6, 2);
    let depth = context_map(&d.unix_uri("c"), "qemu:allocation-depth", size);
    for (want, name) in [(0, "absent"), (1, "local"), (2, "backing")] {
        let expect: Vec<u64> = (0..blocks)
            .filter(|&v| {
                let (now, origin) = (clone_model[v], at_b[v]);
                want == if now == 0 {
                    0
                } else if now == origin {
                    2
                } else {
                    1
                }
            })
            .map(|v| v as u64)
            .collect();
        assert_eq!(
            blocks_of(&depth, want),
            expect,
            "{name} blocks of the clone"
        );
    }
    let own = context_map(&b_uri, "qemu:allocation-depth", size);
    assert!(
        blocks_of(&own, 2).is_empty(),
        "a disk that is no clone has no backing"
    );

    // The libnbd backup script: full of a, then incremental to b.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/nbd-backup.py");
    let backup = d.path("backup.raw");
    let full = run(tool(
        "/usr/bin/python3",
        &[
            script.to_str().unwrap(),
            "full",
            &d.unix_uri("vm@a"),
            backup.to_str().unwrap(),
        ],
    ))
    .ok();
    let full: Value = serde_json::from_str(full.stdout.trim()).expect("script JSON");
    let mapped_a = at_a.iter().filter(|&&id| id != 0).count() as u64 * BLOCK;
    assert_eq!(
        full["read_bytes"], mapped_a,
        "the full backup reads what a maps"
    );
    let inc = run(tool(
        "/usr/bin/python3",
        &[
            script.to_str().unwrap(),
            "incremental",
            &b_uri,
            "a",
            backup.to_str().unwrap(),
        ],
    ))
    .ok();
    let inc: Value = serde_json::from_str(inc.stdout.trim()).expect("script JSON");
    let read = inc["read_bytes"].as_u64().unwrap() + inc["zeroed_bytes"].as_u64().unwrap();
    assert_eq!(
        read,
        changed.len() as u64 * BLOCK,
        "the incremental backup touched {inc}"
    );
    let diff = d.cli.json(&["diff", "vm@a", "vm@b"]);
    assert_eq!(
        diff["changed_bytes"],
        changed.len() as u64 * BLOCK,
        "{diff}"
    );
    run(tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            backup.to_str().unwrap(),
            &b_uri,
        ],
    ))
    .ok();
}
