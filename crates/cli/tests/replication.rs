//! End-to-end tests of `parallax diff`, `send` and `receive` (docs/SEND.md):
//!
//! - `diff --json` lists exactly the blocks written, discarded and zeroed
//!   between two snapshots, against the live disk, and between a clone's
//!   snapshot and its origin's (the disk written through the engine, the
//!   expected extents worked out by hand);
//! - a chain of 100 incremental sends piped into a second store keeps it
//!   identical to the source, checked with `qemu-img compare` on the
//!   exports: the source written by `qemu-io` through a running daemon, the
//!   replica receiving on the store directly for the first half of the
//!   chain and through a daemon of its own for the second;
//! - a stream cut short or with a flipped byte (header, DATA payload, END
//!   record) is refused with exit 1 and one line, and leaves the target as
//!   it was (the same snapshots, no change since the base, no leaked
//!   block), on the store directly and through a daemon, which keeps
//!   serving; a full stream cut short leaves no disk behind;
//! - receive refuses a stream whose base the target lacks, a target
//!   written since its base (unless `--force`), a snapshot name it already
//!   has and a full stream onto an existing disk; `--force` then applies
//!   and the data equals the source's (with the disk grown in between);
//! - send refuses a terminal on standard output (a pty made by `script`)
//!   and an existing output file, which it leaves unchanged.
//! - every byte of a stream's END record is checked.
//!
//! The chain test needs `qemu-img` and `qemu-io` on `PATH`
//! (`scripts/install-deps.sh`); without them it fails, unless
//! `PARALLAX_SKIP_QEMU_TESTS=1` is set, in which case it is skipped with a
//! message. Its randomness comes from a seeded generator; the seed is
//! printed and `PARALLAX_TEST_SEED=N` replays it.
//!
//! Every test works in its own temporary directories and talks only to
//! Unix sockets there; every process it starts is stopped by its PID (at
//! the latest when its guard drops), and every command runs under a
//! timeout.

use parallax_device::{FileDevice, OpenMode};
use parallax_engine::{OpenOptions, Store, Vdi};
use serde_json::{json, Value};
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The disk block size.
const BLOCK: u64 = 4096;
/// How long any one command may run before the test fails.
const TIMEOUT: Duration = Duration::from_secs(120);

// ---- processes ----------------------------------------------------------------

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

    #[track_caller]
    fn ok(self) -> Ran {
        assert!(self.status.success(), "failed: {}", self.describe());
        self
    }

    /// Asserts exit status 1 and exactly one line `parallax: MESSAGE` on
    /// stderr, nothing on stdout; returns MESSAGE.
    #[track_caller]
    fn error(self) -> String {
        assert_eq!(
            self.status.code(),
            Some(1),
            "expected exit 1: {}",
            self.describe()
        );
        assert_eq!(
            self.stderr.lines().count(),
            1,
            "not one line: {}",
            self.describe()
        );
        assert!(self.stdout.is_empty(), "stdout: {}", self.describe());
        self.stderr
            .strip_prefix("parallax: ")
            .unwrap_or_else(|| panic!("no prefix: {}", self.describe()))
            .trim_end()
            .to_string()
    }
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` until `deadline`; past it, kills it (by its PID) and
/// panics.
fn wait_until(child: &mut Child, deadline: Instant, what: &str) -> ExitStatus {
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish in {TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Runs `cmd` with `stdin` to completion under [`TIMEOUT`].
fn run_with(mut cmd: Command, stdin: Stdio) -> Ran {
    let what = format!("{cmd:?}");
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let status = wait_until(&mut child, Instant::now() + TIMEOUT, &what);
    Ran {
        what,
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn run(cmd: Command) -> Ran {
    run_with(cmd, Stdio::null())
}

fn tool<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

/// Runs `left | right` (the first's stdout into the second's stdin) under
/// [`TIMEOUT`]; returns both.
fn pipe(mut left: Command, mut right: Command) -> (Ran, Ran) {
    let (lwhat, rwhat) = (format!("{left:?}"), format!("{right:?}"));
    left.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut l = left.spawn().expect("spawn the left side");
    right
        .stdin(Stdio::from(l.stdout.take().expect("stdout")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut r = right.spawn().expect("spawn the right side");
    // The Command keeps its copy of the pipe's read end: drop it, so that
    // the left side sees the pipe close when the right side exits.
    drop(right);
    let lerr = drain(l.stderr.take().expect("stderr"));
    let rout = drain(r.stdout.take().expect("stdout"));
    let rerr = drain(r.stderr.take().expect("stderr"));
    let deadline = Instant::now() + TIMEOUT;
    let rstatus = wait_until(&mut r, deadline, &rwhat);
    let lstatus = wait_until(&mut l, deadline, &lwhat);
    (
        Ran {
            what: lwhat,
            status: lstatus,
            stdout: String::new(),
            stderr: lerr.join().expect("stderr reader"),
        },
        Ran {
            what: rwhat,
            status: rstatus,
            stdout: rout.join().expect("stdout reader"),
            stderr: rerr.join().expect("stderr reader"),
        },
    )
}

/// True when `qemu-img` and `qemu-io` are installed. Panics with a clear
/// message when one is missing, unless `PARALLAX_SKIP_QEMU_TESTS=1`.
fn have_qemu() -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if ok {
        return true;
    }
    if std::env::var_os("PARALLAX_SKIP_QEMU_TESTS").is_some_and(|v| v == "1") {
        eprintln!("qemu-img/qemu-io not found: skipping (PARALLAX_SKIP_QEMU_TESTS=1)");
        return false;
    }
    panic!(
        "this test needs qemu-img and qemu-io (scripts/install-deps.sh installs them); \
         set PARALLAX_SKIP_QEMU_TESTS=1 to skip it"
    );
}

// ---- randomness -----------------------------------------------------------------

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

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
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

// ---- stores and daemons -------------------------------------------------------------

/// Runs `parallax --store STORE ...` (through the daemon when one serves
/// STORE).
struct Cli {
    store: PathBuf,
    dir: PathBuf,
}

impl Cli {
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

    fn run(&self, args: &[&str]) -> Ran {
        run(self.command(args))
    }

    /// Runs a command that must succeed with nothing on stderr; returns
    /// its stdout.
    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let ran = self.run(args).ok();
        assert!(ran.stderr.is_empty(), "stderr: {}", ran.describe());
        ran.stdout
    }

    /// Runs a command with `--json`; parses its output.
    #[track_caller]
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{out}"))
    }

    /// Runs a command that must fail with exit 1 and one line; returns
    /// the message after `parallax: `.
    #[track_caller]
    fn error(&self, args: &[&str]) -> String {
        self.run(args).error()
    }

    /// `receive NAME -i FILE`, or with `stdin` true `receive NAME -i -`
    /// fed from FILE; `extra` goes before `-i`.
    fn receive(&self, name: &str, file: &Path, extra: &[&str], stdin: bool) -> Ran {
        let mut args = vec!["receive", name];
        args.extend_from_slice(extra);
        if stdin {
            let f = fs::File::open(file).expect("open the stream");
            run_with(self.command(&[&args[..], &["-i", "-"]].concat()), f.into())
        } else {
            let file = file.to_str().expect("UTF-8 path");
            self.run(&[&args[..], &["-i", file]].concat())
        }
    }

    /// The `snapshots NAME --json` list.
    fn snapshots(&self, disk: &str) -> Value {
        self.json(&["snapshots", disk])
    }

    fn snapshot_names(&self, disk: &str) -> Vec<String> {
        names(&self.snapshots(disk))
    }

    fn disk_names(&self) -> Vec<String> {
        names(&self.json(&["list"]))
    }

    /// `diff --json FROM TO`.
    fn diff(&self, from: &str, to: &str) -> Value {
        self.json(&["diff", from, to])
    }

    /// Exports `source` to `DIR/file` (replacing it); returns the path.
    fn export(&self, source: &str, file: &str) -> PathBuf {
        let path = self.dir.join(file);
        self.ok(&["export", "--force", source, path.to_str().unwrap()]);
        path
    }

    #[track_caller]
    fn assert_clean(&self) {
        let report = self.json(&["check"]);
        assert_eq!(report["clean"], true, "{report}");
        assert_eq!(report["errors"], json!([]), "{report}");
        assert_eq!(report["leaked_blocks"], 0, "{report}");
    }
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"))
        .iter()
        .map(|d| d["name"].as_str().expect("name").to_string())
        .collect()
}

/// A temporary directory with an initialised 1 GiB store in it.
struct Env {
    _dir: tempfile::TempDir,
    cli: Cli,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let cli = Cli {
            store: dir.path().join("store.px"),
            dir: dir.path().to_path_buf(),
        };
        cli.ok(&["init", "--size", "1G"]);
        Env { _dir: dir, cli }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.cli.dir.join(name)
    }

    /// Opens the store with the engine (no daemon may be running), runs
    /// `f` on disk `name`, and flushes (twice, to make the frees of that
    /// commit durable, as the CLI does).
    fn with_disk(&self, name: &str, f: impl FnOnce(&Vdi)) {
        let dev = FileDevice::open(&self.cli.store, OpenMode::default()).expect("open store file");
        let store = Store::open(Arc::new(dev), &OpenOptions::default()).expect("open store");
        let vdi = store.open_vdi(name).expect("open disk");
        f(&vdi);
        vdi.flush().expect("flush");
        vdi.flush().expect("flush");
    }

    /// Starts `parallax serve` on this store (NBD on `DIR/nbd.sock` only).
    fn serve(&self) -> Daemon {
        Daemon::start(&self.cli)
    }
}

impl Deref for Env {
    type Target = Cli;
    fn deref(&self) -> &Cli {
        &self.cli
    }
}

/// A running `parallax serve --nbd-listen none --nbd-socket DIR/nbd.sock`;
/// its output goes to `DIR/serve.log`. Dropping it kills it (by its PID).
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    status: Cli,
}

impl Daemon {
    fn start(cli: &Cli) -> Daemon {
        let socket = cli.dir.join("nbd.sock");
        let log = cli.dir.join("serve.log");
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open serve.log");
        let mut cmd = cli.command(&["serve", "--nbd-listen", "none", "--nbd-socket"]);
        cmd.arg(&socket)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out);
        let mut d = Daemon {
            child: Some(cmd.spawn().expect("spawn parallax serve")),
            socket,
            log,
            status: Cli {
                store: cli.store.clone(),
                dir: cli.dir.clone(),
            },
        };
        let pid = d.child.as_ref().unwrap().id();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = d.child.as_mut().unwrap().try_wait().expect("wait") {
                panic!("parallax serve exited at startup ({status})\n{}", d.log());
            }
            let ran = d.status.run(&["status", "--json"]);
            if ran.status.success() {
                let status: Value = serde_json::from_str(&ran.stdout).expect("status JSON");
                assert_eq!(status["pid"], pid, "status of another daemon: {status}");
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "parallax serve not ready after 30 s: {}\n--- serve.log:\n{}",
                ran.describe(),
                d.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `nbd+unix:///EXPORT?socket=PATH`.
    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    #[track_caller]
    fn assert_alive(&mut self) {
        let child = self.child.as_mut().expect("daemon stopped");
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("daemon died ({status})\n--- serve.log:\n{}", self.log());
        }
        let status = self.status.json(&["status"]);
        assert_eq!(status["pid"], child.id(), "{status}");
    }

    /// SIGTERM by PID; the daemon must exit 0 within 30 s.
    fn stop(mut self) {
        let mut child = self.child.take().expect("daemon stopped");
        let killed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(killed.success());
        let status = wait_until(
            &mut child,
            Instant::now() + Duration::from_secs(30),
            "daemon stop",
        );
        assert_eq!(
            status.code(),
            Some(0),
            "daemon exit after SIGTERM: {status}\n{}",
            self.log()
        );
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

// ---- streams and images -------------------------------------------------------------

const KIND_HEADER: u32 = 1;
const KIND_SIZE: u32 = 2;
const KIND_DATA: u32 = 3;
const KIND_END: u32 = 0xFFFF_FFFF;

/// One record of a stream: its kind, where its 16-byte head starts, its
/// payload length.
#[derive(Debug, Clone, Copy)]
struct Record {
    kind: u32,
    at: usize,
    len: usize,
}

impl Record {
    fn payload(&self) -> usize {
        self.at + 16
    }
}

/// Splits a stream into records, checking the layout docs/SEND.md gives:
/// magic, HEADER, SIZE, ..., END (whose count is the records before it),
/// flags 0, and the header's data_bytes the sum of the DATA payloads.
fn records(s: &[u8]) -> Vec<Record> {
    assert_eq!(&s[..8], b"PXSTREAM");
    let u32_at = |o: usize| u32::from_le_bytes(s[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(s[o..o + 8].try_into().unwrap());
    let mut out = Vec::new();
    let mut at = 8;
    while at < s.len() {
        let rec = Record {
            kind: u32_at(at),
            at,
            len: u64_at(at + 8) as usize,
        };
        assert_eq!(u32_at(at + 4), 0, "flags of {rec:?}");
        out.push(rec);
        at += 16 + rec.len;
    }
    assert_eq!(at, s.len(), "the records do not end with the stream");
    let kinds: Vec<u32> = out.iter().map(|r| r.kind).collect();
    assert_eq!(kinds[..2], [KIND_HEADER, KIND_SIZE], "{kinds:?}");
    assert_eq!(kinds.last(), Some(&KIND_END), "{kinds:?}");
    let end = out.last().unwrap();
    assert_eq!(end.len, 16);
    assert_eq!(u64_at(end.payload()), out.len() as u64 - 1, "END's count");
    let data: u64 = out
        .iter()
        .filter(|r| r.kind == KIND_DATA)
        .map(|r| r.len as u64 - 8)
        .sum();
    assert_eq!(u64_at(out[0].payload() + 48), data, "header's data_bytes");
    out
}

/// Asserts two files hold the same bytes.
#[track_caller]
fn assert_same_file(a: &Path, b: &Path) {
    let (x, y) = (fs::read(a).expect("read"), fs::read(b).expect("read"));
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(at) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{} and {} differ from byte {at} (block {})",
            a.display(),
            b.display(),
            at as u64 / BLOCK
        );
    }
}

/// `qemu-img compare -f raw -F raw A B` must exit 0 (identical).
#[track_caller]
fn qemu_compare(a: &Path, b: &Path) {
    let mut cmd = tool("qemu-img", &["compare", "-f", "raw", "-F", "raw"]);
    cmd.arg(a).arg(b);
    run(cmd).ok();
}

/// The extents of a `diff --json` answer as (offset, length, kind), with
/// its totals checked.
#[track_caller]
fn extents(diff: &Value, size: u64) -> Vec<(u64, u64, String)> {
    assert_eq!(diff["size"], size, "{diff}");
    let out: Vec<(u64, u64, String)> = diff["extents"]
        .as_array()
        .unwrap_or_else(|| panic!("{diff}"))
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let total: u64 = out.iter().map(|e| e.1).sum();
    assert_eq!(diff["changed_bytes"], total, "{diff}");
    out
}

/// Blocks `[first, end)` as an expected extent.
fn blocks(first: u64, end: u64, kind: &str) -> (u64, u64, String) {
    (first * BLOCK, (end - first) * BLOCK, kind.to_string())
}

// ---- 1. diff ------------------------------------------------------------------------

#[test]
fn diff_lists_changed_extents_against_the_written_data() {
    let env = Env::new();
    let size = 16 * MIB;
    env.ok(&["create", "vm", "--size", "16M"]);
    let mut rng = Rng::new(1);
    let b = |n: u64| n * BLOCK;
    env.with_disk("vm", |vdi| {
        vdi.write(&rng.bytes(4 * BLOCK as usize), 0).unwrap();
        vdi.write(&rng.bytes(2 * BLOCK as usize), b(10)).unwrap();
        vdi.write(&rng.bytes(16 * BLOCK as usize), b(100)).unwrap();
    });
    env.ok(&["snapshot", "vm@a"]);
    env.with_disk("vm", |vdi| {
        // Part of block 2 rewritten: the whole block changed.
        vdi.write(&rng.bytes(100), b(2) + 50).unwrap();
        // New data over blocks never mapped.
        vdi.write(&rng.bytes(4 * BLOCK as usize), b(20)).unwrap();
        // Mapped blocks discarded and zeroed: zero.
        vdi.discard(b(10), b(2)).unwrap();
        vdi.write_zeroes(b(104), b(2)).unwrap();
        // Blocks never mapped discarded, or written then discarded: no
        // change.
        vdi.discard(b(200), b(10)).unwrap();
        vdi.write(&rng.bytes(2 * BLOCK as usize), b(300)).unwrap();
        vdi.discard(b(300), b(2)).unwrap();
        // A discard of less than a whole block leaves it as it was.
        vdi.discard(b(110) + 100, BLOCK).unwrap();
    });
    env.ok(&["snapshot", "vm@b"]);

    let want_ab = vec![
        blocks(2, 3, "data"),
        blocks(10, 12, "zero"),
        blocks(20, 24, "data"),
        blocks(104, 106, "zero"),
    ];
    assert_eq!(extents(&env.diff("vm@a", "vm@b"), size), want_ab);
    // The text form: a table, then the total.
    let text = env.ok(&["diff", "vm@a", "vm@b"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    assert!(
        lines[0].contains("OFFSET") && lines[0].contains("KIND"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("8192 ") && lines[1].ends_with("data"),
        "{text}"
    );
    assert!(
        lines[5].contains("(36864 bytes) changed in 4 extents"),
        "{text}"
    );

    // Against the live disk: nothing since b, then what is written.
    assert_eq!(extents(&env.diff("vm@b", "vm"), size), vec![]);
    env.with_disk("vm", |vdi| {
        vdi.write(&rng.bytes(BLOCK as usize), b(500)).unwrap();
        vdi.discard(b(20), b(2)).unwrap();
    });
    assert_eq!(
        extents(&env.diff("vm@b", "vm"), size),
        vec![blocks(20, 22, "zero"), blocks(500, 501, "data")]
    );
    // From a: blocks 20-21 were unmapped then and are now.
    assert_eq!(
        extents(&env.diff("vm@a", "vm"), size),
        vec![
            blocks(2, 3, "data"),
            blocks(10, 12, "zero"),
            blocks(22, 24, "data"),
            blocks(104, 106, "zero"),
            blocks(500, 501, "data"),
        ]
    );

    // A clone's snapshot against its origin's.
    env.ok(&["clone", "vm@a", "c1"]);
    assert_eq!(extents(&env.diff("vm@a", "c1"), size), vec![]);
    env.with_disk("c1", |vdi| {
        vdi.discard(0, b(2)).unwrap();
        vdi.write(&rng.bytes(3 * BLOCK as usize), b(30)).unwrap();
        vdi.write(&rng.bytes(BLOCK as usize), b(101)).unwrap();
    });
    env.ok(&["snapshot", "c1@s1"]);
    let want_clone = vec![
        blocks(0, 2, "zero"),
        blocks(30, 33, "data"),
        blocks(101, 102, "data"),
    ];
    assert_eq!(extents(&env.diff("vm@a", "c1@s1"), size), want_clone);
    assert_eq!(extents(&env.diff("vm@a", "c1"), size), want_clone);
    assert_eq!(extents(&env.diff("c1@s1", "c1"), size), vec![]);

    let msg = env.error(&["diff", "vm@nope", "vm"]);
    assert!(msg.contains("nope"), "{msg}");
    env.assert_clean();
}

// ---- 2. a chain of incremental sends --------------------------------------------------

/// 1 to 4 random `qemu-io` commands on a disk of `size` bytes: writes of
/// a pattern, discards, and zero writes with and without unmap, at
/// 512-byte granularity (so partial blocks too).
fn random_io(rng: &mut Rng, size: u64) -> Vec<String> {
    (0..1 + rng.below(4))
        .map(|_| {
            let mut len = (1 + rng.below(64)) * BLOCK;
            if rng.below(20) == 0 {
                len = 2 * MIB + BLOCK;
            }
            if rng.below(3) == 0 {
                len -= 512 * (1 + rng.below(7));
            }
            let off = rng.below((size - len) / 512 + 1) * 512;
            match rng.below(10) {
                0..=5 => format!("write -P {:#x} {off} {len}", 1 + rng.below(255)),
                6 | 7 => format!("discard {off} {len}"),
                8 => format!("write -z {off} {len}"),
                _ => format!("write -z -u {off} {len}"),
            }
        })
        .collect()
}

/// Exports `disk@snap` on both stores and compares them with qemu-img.
fn compare_snapshot(src: &Env, dst: &Env, snap: &str) {
    let name = format!("vm@{snap}");
    let a = src.export(&name, "src.raw");
    let b = dst.export(&name, "dst.raw");
    qemu_compare(&a, &b);
    fs::remove_file(a).unwrap();
    fs::remove_file(b).unwrap();
}

#[test]
fn a_chain_of_incremental_sends_keeps_a_replica_identical() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::new(seed(
        "a_chain_of_incremental_sends_keeps_a_replica_identical",
    ));
    let size = 64 * MIB;
    let src = Env::new();
    src.ok(&["create", "vm", "--size", "64M"]);
    let mut source = src.serve();
    let uri = source.uri("vm");
    let dst = Env::new();
    let mut replica: Option<Daemon> = None;
    let steps = 100;
    for i in 0..steps {
        let cmds = random_io(&mut rng, size);
        let mut qemu = tool("qemu-io", &["-f", "raw", "-d", "unmap"]);
        for c in &cmds {
            qemu.arg("-c").arg(c);
        }
        qemu.arg(&uri);
        run(qemu).ok();
        let snap = format!("s{i}");
        let target = format!("vm@{snap}");
        assert_eq!(src.ok(&["snapshot", &target]), format!("{target}\n"));

        // The first half received on the store directly, the second
        // through a daemon serving it.
        if i == steps / 2 {
            replica = Some(dst.serve());
        }
        let mut send = vec!["send".to_string(), target.clone()];
        if i > 0 {
            // --from SNAP, or from NAME@SNAP in the second half.
            let prev = format!("s{}", i - 1);
            let from = if replica.is_some() {
                format!("vm@{prev}")
            } else {
                prev
            };
            send.extend(["--from".to_string(), from]);
        }
        send.extend(["-o".to_string(), "-".to_string()]);
        let send: Vec<&str> = send.iter().map(String::as_str).collect();
        let (sent, received) = pipe(
            src.command(&send),
            dst.command(&["receive", "vm", "-i", "-"]),
        );
        let (sent, received) = (sent.ok(), received.ok());
        assert!(
            sent.stderr.starts_with(&format!("sent {target}")) && sent.stderr.lines().count() == 1,
            "{}",
            sent.describe()
        );
        let kind = if i == 0 { "full" } else { "incremental" };
        assert!(
            received
                .stdout
                .starts_with(&format!("received {target} ({kind})")),
            "{}",
            received.describe()
        );
        assert!(received.stderr.is_empty(), "{}", received.describe());

        // The source keeps every 10th snapshot and the newest.
        if i > 0 && (i - 1) % 10 != 0 {
            src.ok(&["delete", &format!("vm@s{}", i - 1)]);
        }
        if i % 10 == 0 {
            compare_snapshot(&src, &dst, &snap);
        }
    }

    let kept = src.snapshot_names("vm");
    let mut want: Vec<String> = (0..steps).step_by(10).map(|i| format!("s{i}")).collect();
    want.push(format!("s{}", steps - 1));
    assert_eq!(kept, want);
    let all: Vec<String> = (0..steps).map(|i| format!("s{i}")).collect();
    assert_eq!(dst.snapshot_names("vm"), all);
    for snap in &kept {
        compare_snapshot(&src, &dst, snap);
    }
    // The replica's live disk is its newest snapshot.
    let last = format!("vm@s{}", steps - 1);
    assert_eq!(dst.diff(&last, "vm")["changed_bytes"], 0);

    let mut replica = replica.expect("the replica's daemon");
    replica.assert_alive();
    replica.stop();
    source.assert_alive();
    source.stop();
    src.assert_clean();
    dst.assert_clean();
}

// ---- 3. cut and damaged streams -------------------------------------------------------

/// Writes `bytes` to `DIR/name`; returns the path.
fn put(env: &Env, name: &str, bytes: &[u8]) -> PathBuf {
    let path = env.path(name);
    fs::write(&path, bytes).expect("write the stream");
    path
}

/// The variants of `stream` that must be refused, with what the error
/// must say: prefixes (0, 10, 200 bytes, half, all but one byte) and one
/// byte flipped in the header (its creation time: only END's checksum
/// finds it, after the data went in), in the middle of the first DATA
/// payload, and in END's checksum.
fn damaged(stream: &[u8]) -> Vec<(String, Vec<u8>, &'static str)> {
    let recs = records(stream);
    let n = stream.len();
    let mut out: Vec<(String, Vec<u8>, &'static str)> = vec![
        ("0 bytes".into(), vec![], "not a parallax send stream"),
        ("10 bytes".into(), stream[..10].to_vec(), "cut short"),
        ("200 bytes".into(), stream[..200].to_vec(), "cut short"),
        ("half".into(), stream[..n / 2].to_vec(), "cut short"),
        (
            "all but 1 byte".into(),
            stream[..n - 1].to_vec(),
            "cut short",
        ),
    ];
    let data = recs
        .iter()
        .find(|r| r.kind == KIND_DATA)
        .expect("a DATA record");
    let end = recs.last().unwrap();
    for (what, at) in [
        ("header", recs[0].payload() + 40),
        ("DATA", data.payload() + 8 + (data.len - 8) / 2),
        ("END", end.payload() + 8),
    ] {
        let mut s = stream.to_vec();
        s[at] ^= 0x10;
        out.push((format!("a byte flipped in {what} (at {at})"), s, "corrupt"));
    }
    out
}

/// Asserts `dst`'s disk vm still has the snapshots `before` and has not
/// changed since `base`.
#[track_caller]
fn assert_untouched(dst: &Cli, before: &Value, base: &str, what: &str) {
    assert_eq!(&dst.snapshots("vm"), before, "after {what}");
    let diff = dst.diff(&format!("vm@{base}"), "vm");
    assert_eq!(diff["changed_bytes"], 0, "after {what}: {diff}");
}

#[test]
fn a_truncated_or_corrupt_stream_leaves_the_target_as_it_was() {
    let src = Env::new();
    src.ok(&["create", "vm", "--size", "16M"]);
    let mut rng = Rng::new(3);
    src.with_disk("vm", |vdi| {
        vdi.write(&rng.bytes(3 * MIB as usize), 0).unwrap();
        vdi.write(&rng.bytes(MIB as usize), 8 * MIB).unwrap();
    });
    src.ok(&["snapshot", "vm@base"]);
    src.with_disk("vm", |vdi| {
        // More than one DATA record (1 MiB each), and a ZERO one.
        vdi.write(&rng.bytes(2 * MIB as usize + 5000), MIB / 2)
            .unwrap();
        vdi.discard(8 * MIB, MIB / 2).unwrap();
        vdi.write(&rng.bytes(40000), 12 * MIB).unwrap();
    });
    src.ok(&["snapshot", "vm@next"]);
    src.with_disk("vm", |vdi| {
        vdi.write(&rng.bytes(MIB as usize), 5 * MIB).unwrap();
        vdi.write_zeroes(0, MIB).unwrap();
    });
    src.ok(&["snapshot", "vm@third"]);
    let full = src.path("full.px");
    let inc = src.path("inc.px");
    let inc2 = src.path("inc2.px");
    src.ok(&["send", "vm@base", "-o", full.to_str().unwrap()]);
    src.ok(&[
        "send",
        "vm@next",
        "--from",
        "base",
        "-o",
        inc.to_str().unwrap(),
    ]);
    src.ok(&[
        "send",
        "vm@third",
        "--from",
        "vm@next",
        "-o",
        inc2.to_str().unwrap(),
    ]);
    let full = fs::read(full).unwrap();
    let inc = fs::read(inc).unwrap();
    let inc2 = fs::read(inc2).unwrap();
    let recs = records(&inc);
    assert!(
        recs.iter().filter(|r| r.kind == KIND_DATA).count() >= 3,
        "{recs:?}"
    );

    let dst = Env::new();
    let full_file = put(&dst, "full.px", &full);
    dst.receive("vm", &full_file, &[], false).ok();

    // On the store directly: each damaged stream, from a file and from
    // standard input.
    let before = dst.snapshots("vm");
    assert_eq!(names(&before), ["base"]);
    for (i, (what, bytes, says)) in damaged(&inc).into_iter().enumerate() {
        let file = put(&dst, "bad.px", &bytes);
        let msg = dst.receive("vm", &file, &[], i % 2 == 1).error();
        assert!(
            msg.starts_with("cannot receive: ") && msg.contains(says),
            "{what}: {msg}"
        );
        assert!(
            msg.ends_with("the target is left as it was"),
            "{what}: {msg}"
        );
        assert_untouched(&dst, &before, "base", &what);
    }
    dst.assert_clean();
    // A full stream cut short or damaged leaves no disk behind.
    let full_damaged = damaged(&full);
    for (what, bytes, says) in [&full_damaged[3], &full_damaged[6]] {
        let file = put(&dst, "bad.px", bytes);
        let msg = dst.receive("copy", &file, &[], false).error();
        assert!(msg.contains(says), "full, {what}: {msg}");
        assert_eq!(dst.disk_names(), ["vm"], "full, {what}");
    }
    // The intact stream applies.
    let inc_file = put(&dst, "inc.px", &inc);
    dst.receive("vm", &inc_file, &[], false).ok();
    assert_eq!(dst.snapshot_names("vm"), ["base", "next"]);
    assert_same_file(
        &src.export("vm@next", "next.raw"),
        &dst.export("vm@next", "next.raw"),
    );
    dst.assert_clean();

    // Through a daemon, which keeps serving.
    let mut daemon = dst.serve();
    let before = dst.snapshots("vm");
    let inc2_damaged = damaged(&inc2);
    for (i, (what, bytes, says)) in inc2_damaged.iter().enumerate() {
        if ![3, 4, 6, 7].contains(&i) {
            continue;
        }
        let file = put(&dst, "bad.px", bytes);
        let msg = dst.receive("vm", &file, &[], i % 2 == 1).error();
        assert!(msg.contains(says), "daemon, {what}: {msg}");
        daemon.assert_alive();
        assert_untouched(&dst, &before, "next", &format!("daemon, {what}"));
    }
    let file = put(&dst, "bad.px", &full_damaged[3].1);
    let msg = dst.receive("copy", &file, &[], true).error();
    assert!(msg.contains("cut short"), "daemon, full: {msg}");
    daemon.assert_alive();
    assert_eq!(dst.disk_names(), ["vm"]);
    let inc2_file = put(&dst, "inc2.px", &inc2);
    dst.receive("vm", &inc2_file, &[], true).ok();
    assert_eq!(dst.snapshot_names("vm"), ["base", "next", "third"]);
    assert_same_file(
        &src.export("vm@third", "third.raw"),
        &dst.export("vm@third", "third.raw"),
    );
    daemon.assert_alive();
    daemon.stop();
    dst.assert_clean();
}

// ---- 4. a missing base, a changed target ------------------------------------------------

#[test]
fn receive_refuses_a_missing_base_and_a_changed_target() {
    let src = Env::new();
    src.ok(&["create", "vm", "--size", "8M"]);
    let mut rng = Rng::new(4);
    src.with_disk("vm", |vdi| vdi.write(&rng.bytes(MIB as usize), 0).unwrap());
    src.ok(&["snapshot", "vm@a"]);
    src.with_disk("vm", |vdi| {
        vdi.write(&rng.bytes(64 * 1024), 3 * MIB).unwrap()
    });
    src.ok(&["snapshot", "vm@b"]);
    src.with_disk("vm", |vdi| {
        // The disk grows: the receiver's grows with it.
        vdi.grow(12 * MIB).unwrap();
        vdi.write(&rng.bytes(100_000), 11 * MIB).unwrap();
        vdi.discard(0, MIB / 2).unwrap();
    });
    src.ok(&["snapshot", "vm@c"]);
    let send = |to: &str, from: Option<&str>, file: &str| {
        let path = src.path(file);
        let mut args = vec!["send", to];
        if let Some(f) = from {
            args.extend(["--from", f]);
        }
        args.extend(["-o", path.to_str().unwrap()]);
        src.ok(&args);
        path
    };
    let a_full = send("vm@a", None, "a.px");
    let c_full = send("vm@c", None, "c.px");
    let ab = send("vm@b", Some("a"), "ab.px");
    let bc = send("vm@c", Some("b"), "bc.px");

    let dst = Env::new();
    dst.receive("vm", &a_full, &[], false).ok();
    // The base of b -> c is missing.
    let before = dst.snapshots("vm");
    let msg = dst.receive("vm", &bc, &[], false).error();
    assert!(
        msg.contains("vm@b") && msg.contains("does not hold"),
        "{msg}"
    );
    assert_untouched(&dst, &before, "a", "a missing base");
    // A full stream onto an existing disk.
    let msg = dst.receive("vm", &c_full, &[], false).error();
    assert!(msg.contains("exists"), "{msg}");
    assert_untouched(&dst, &before, "a", "a full stream onto vm");

    dst.receive("vm", &ab, &[], false).ok();
    assert_eq!(dst.snapshot_names("vm"), ["a", "b"]);
    // b again: the name exists.
    let before = dst.snapshots("vm");
    // A cut stream that grows the disk leaves its size as it was.
    let bc_bytes = fs::read(&bc).unwrap();
    let cut = put(&dst, "cut.px", &bc_bytes[..bc_bytes.len() - 1]);
    let msg = dst.receive("vm", &cut, &[], false).error();
    assert!(msg.contains("cut short"), "{msg}");
    assert_untouched(&dst, &before, "b", "a cut stream that grows the disk");
    assert_eq!(dst.json(&["info", "vm"])["size_bytes"], 8 * MIB);
    let msg = dst.receive("vm", &ab, &[], false).error();
    assert!(msg.contains("vm@b already exists"), "{msg}");
    assert_untouched(&dst, &before, "b", "b again");

    // The target written since its base: refused, and left so.
    let scribble = vec![0x5a; 3 * BLOCK as usize];
    dst.with_disk("vm", |vdi| vdi.write(&scribble, 6 * MIB).unwrap());
    let changed = dst.diff("vm@b", "vm");
    assert_eq!(
        extents(&changed, 8 * MIB),
        vec![blocks(6 * MIB / BLOCK, 6 * MIB / BLOCK + 3, "data")]
    );
    let msg = dst.receive("vm", &bc, &[], false).error();
    assert!(
        msg.contains("--force") && msg.contains("changed since vm@b"),
        "{msg}"
    );
    // (The snapshots' used_bytes changed with the write: compare the rest.)
    let ids = |list: &Value| -> Vec<(Value, Value, Value)> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|s| (s["name"].clone(), s["id"].clone(), s["created_ns"].clone()))
            .collect()
    };
    assert_eq!(ids(&dst.snapshots("vm")), ids(&before));
    assert_eq!(dst.diff("vm@b", "vm"), changed);

    // --force rolls it back to b, then receives c.
    let out = dst.receive("vm", &bc, &["--force"], false).ok().stdout;
    assert!(out.starts_with("received vm@c (incremental)"), "{out}");
    assert_eq!(dst.snapshot_names("vm"), ["a", "b", "c"]);
    assert_eq!(dst.json(&["info", "vm"])["size_bytes"], 12 * MIB);
    assert_eq!(dst.diff("vm@c", "vm")["changed_bytes"], 0);
    for snap in ["vm@a", "vm@b", "vm@c"] {
        assert_same_file(&src.export(snap, "s.raw"), &dst.export(snap, "d.raw"));
    }
    assert_same_file(&src.export("vm", "s.raw"), &dst.export("vm", "d.raw"));
    dst.assert_clean();

    // A replica of the replica takes the source's incremental streams
    // (received snapshots carry the sender's identity), and the
    // replica's.
    let third = Env::new();
    let a_from_dst = dst.path("a-from-dst.px");
    dst.ok(&["send", "vm@a", "-o", a_from_dst.to_str().unwrap()]);
    third.receive("vm", &a_from_dst, &[], false).ok();
    third.receive("vm", &ab, &[], false).ok();
    let bc_from_dst = dst.path("bc-from-dst.px");
    dst.ok(&[
        "send",
        "vm@c",
        "--from",
        "b",
        "-o",
        bc_from_dst.to_str().unwrap(),
    ]);
    third.receive("vm", &bc_from_dst, &[], false).ok();
    assert_eq!(third.snapshot_names("vm"), ["a", "b", "c"]);
    assert_same_file(&src.export("vm@c", "s.raw"), &third.export("vm@c", "t.raw"));
    third.assert_clean();
}

/// Every byte of the END record is checked: flipped, the stream is
/// refused and the target left as it was. (END's last 4 bytes, reserved,
/// are not covered by the checksum, which stops before END's record: the
/// reader requires them to be 0. Found by this test: they were accepted.)
#[test]
fn a_flipped_byte_anywhere_in_the_end_record_is_refused() {
    let src = Env::new();
    src.ok(&["create", "vm", "--size", "1M"]);
    src.with_disk("vm", |vdi| vdi.write(&[7u8; 8192], 0).unwrap());
    src.ok(&["snapshot", "vm@a"]);
    let file = src.path("a.px");
    src.ok(&["send", "vm@a", "-o", file.to_str().unwrap()]);
    let stream = fs::read(&file).unwrap();
    let end = *records(&stream).last().unwrap();
    for at in end.at..stream.len() {
        let mut bad = stream.clone();
        bad[at] ^= 0x10;
        let path = put(&src, "bad.px", &bad);
        let ran = src.receive("copy", &path, &[], false);
        assert!(
            !ran.status.success(),
            "a byte flipped at {at} (END's byte {}) was accepted",
            at - end.at
        );
        ran.error();
        assert_eq!(src.disk_names(), ["vm"], "byte {at}");
    }
}

// ---- 5. send's output -------------------------------------------------------------------

#[test]
fn send_refuses_a_terminal_and_an_existing_file() {
    let env = Env::new();
    env.ok(&["create", "vm", "--size", "1M"]);
    env.with_disk("vm", |vdi| vdi.write(&[7u8; 8192], 0).unwrap());
    env.ok(&["snapshot", "vm@a"]);

    // An existing file is left as it was, on the store and through a
    // daemon.
    let existing = env.path("existing.px");
    fs::write(&existing, b"keep me").unwrap();
    let msg = env.error(&["send", "vm@a", "-o", existing.to_str().unwrap()]);
    assert!(msg.contains("existing.px"), "{msg}");
    assert_eq!(fs::read(&existing).unwrap(), b"keep me");
    // A send that cannot start leaves no file behind.
    let fresh = env.path("fresh.px");
    let msg = env.error(&["send", "vm@nope", "-o", fresh.to_str().unwrap()]);
    assert!(msg.contains("nope"), "{msg}");
    assert!(!fresh.exists(), "a failed send left {}", fresh.display());

    let script = Command::new("script")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let tty = |env: &Env| {
        // `script` runs the command on a pty and exits with its status.
        let cmd = format!(
            "{} --store {} send vm@a -o -",
            env!("CARGO_BIN_EXE_parallax"),
            env.store.display()
        );
        let ran = run(tool("script", &["-q", "-e", "-c", &cmd, "/dev/null"]));
        assert_eq!(ran.status.code(), Some(1), "{}", ran.describe());
        let lines: Vec<&str> = ran.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "{}", ran.describe());
        assert!(
            lines[0].starts_with("parallax: the stream is binary"),
            "{}",
            ran.describe()
        );
    };
    if script {
        tty(&env);
    } else {
        eprintln!("script (util-linux) not found: the terminal case is skipped");
    }

    let mut daemon = env.serve();
    let msg = env.error(&["send", "vm@a", "-o", existing.to_str().unwrap()]);
    assert!(msg.contains("existing.px"), "{msg}");
    assert_eq!(fs::read(&existing).unwrap(), b"keep me");
    if script {
        tty(&env);
    }
    // And a new file works.
    env.ok(&["send", "vm@a", "-o", fresh.to_str().unwrap()]);
    records(&fs::read(&fresh).unwrap());
    daemon.assert_alive();
    daemon.stop();
}

/// A clone's snapshot sent from its origin's snapshot arrives as a clone:
/// the receiving store has no disk of that name, finds the stream's base
/// in another disk (the origin, received before) and clones it; the
/// stream carries only what the clone changed, and the result equals the
/// source. Without the origin's snapshot on the target, it is refused and
/// nothing is made (mutation tried: no search of the other disks -> the
/// clone's stream is refused).
#[test]
fn a_clone_sent_from_its_origins_snapshot_arrives_as_a_clone() {
    let (src, dst) = (Env::new(), Env::new());
    src.ok(&["create", "golden", "--size", "4M"]);
    src.with_disk("golden", |vdi| vdi.write(&[5u8; 1 << 20], 0).unwrap());
    src.ok(&["snapshot", "golden@v1"]);
    src.ok(&["clone", "golden@v1", "c7"]);
    src.with_disk("c7", |vdi| vdi.write(&[9u8; 8192], 65536).unwrap());
    src.ok(&["snapshot", "c7@s1"]);

    let golden = src.path("golden.stream");
    src.ok(&["send", "golden@v1", "-o", golden.to_str().unwrap()]);
    let clone = src.path("c7.stream");
    let sent = src.json(&[
        "send",
        "c7@s1",
        "--from",
        "golden@v1",
        "-o",
        clone.to_str().unwrap(),
    ]);
    assert_eq!(
        sent["data_bytes"], 8192,
        "only the clone's change is sent: {sent}"
    );

    // Without the origin on the target: refused, nothing made.
    let why = dst.receive("c7", &clone, &[], false).error();
    assert!(why.contains("golden@v1"), "{why}");
    assert!(dst.disk_names().is_empty());

    dst.receive("golden", &golden, &[], false).ok();
    dst.receive("c7", &clone, &[], true).ok();
    let info = dst.json(&["info", "c7"]);
    assert_eq!(info["origin"], "golden@v1", "{info}");
    assert_eq!(dst.snapshot_names("c7"), ["s1"]);
    assert_same_file(&src.export("c7@s1", "s.raw"), &dst.export("c7@s1", "d.raw"));
    dst.assert_clean();
}

/// The replication recipe, `contrib/parallax-replicate.sh`, run step by
/// step with writes in between: the first step sends the disk whole, each
/// later one only what changed since the newest `repl-` snapshot both
/// sides hold; after each the target's newest snapshot equals the
/// source's, the source keeps one `repl-` snapshot and the target at most
/// KEEP. A step whose target fails exits 1 and leaves no new snapshot, and
/// the next step goes on from the last common one.
#[test]
fn the_replication_script_keeps_a_replica_in_sync() {
    let (src, dst) = (Env::new(), Env::new());
    src.ok(&["create", "vm", "--size", "8M"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/parallax-replicate.sh");
    let bin = env!("CARGO_BIN_EXE_parallax");
    let step = |target_store: &Path| {
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg("vm")
            .arg(bin)
            .arg("--store")
            .arg(target_store)
            .env("PARALLAX", bin)
            .env("PARALLAX_STORE", &src.store)
            .env("KEEP", "3")
            .env_remove("PARALLAX_CONTROL");
        run(cmd)
    };
    let mut rng = Rng::new(seed("the_replication_script_keeps_a_replica_in_sync"));
    for i in 0..6u64 {
        src.with_disk("vm", |vdi| {
            for _ in 0..4 {
                let at = rng.below(2040) * 4096;
                vdi.write(&rng.bytes(8192), at).unwrap();
            }
        });
        if i == 3 {
            // A target that cannot receive: the step fails cleanly.
            let failed = step(&src.path("missing/store.px"));
            assert_eq!(failed.status.code(), Some(1), "{}", failed.describe());
            let mine = src.snapshot_names("vm");
            assert_eq!(mine.len(), 1, "the failed step left a snapshot: {mine:?}");
        }
        let out = step(&dst.store).ok().stdout;
        assert_eq!(out.contains("(from repl-"), i > 0, "step {i}: {out}");
        let (mine, theirs) = (src.snapshot_names("vm"), dst.snapshot_names("vm"));
        assert_eq!(mine.len(), 1, "step {i}: source keeps {mine:?}");
        assert!(
            theirs.len() <= 3 && theirs.last() == mine.last(),
            "{theirs:?} vs {mine:?}"
        );
        let snap = format!("vm@{}", mine[0]);
        assert_same_file(&src.export(&snap, "s.raw"), &dst.export(&snap, "d.raw"));
    }
    dst.assert_clean();
}
