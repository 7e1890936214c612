//! Cluster mode with real processes: a real etcd on 127.0.0.1, three
//! `parallax serve --etcd` appliances sharing one pool file, qemu-io as
//! the client. Every process is started by this test and stopped by its
//! PID; everything lives in a temporary directory.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

fn have(tool: &str, arg: &str) -> bool {
    let ok = Command::new(tool)
        .arg(arg)
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

/// A port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed by PID when dropped.
struct Proc(Option<Child>);

impl Proc {
    /// SIGTERM, then wait; returns the exit code.
    fn stop(&mut self) -> Option<i32> {
        let mut child = self.0.take()?;
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("process {} ignored SIGTERM", child.id());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

struct Cluster {
    dir: tempfile::TempDir,
    pool: PathBuf,
    etcd_url: String,
    peer: u16,
    /// `--lease-ttl` of the appliances.
    ttl: &'static str,
    /// `--claim-wait` of the appliances: 0 (a disk held elsewhere is
    /// refused at connection) unless a test is about disks following
    /// their clients.
    claim_wait: &'static str,
    etcd: Proc,
    hosts: Vec<Proc>,
}

impl Cluster {
    /// etcd and three appliances (lease TTL 3 s) on a fresh pool file.
    fn new() -> Cluster {
        Cluster::with(3, "3s")
    }

    /// etcd and `hosts` appliances with lease TTL `ttl`.
    fn with(hosts: u64, ttl: &'static str) -> Cluster {
        Cluster::claiming(hosts, ttl, "0s")
    }

    /// [`Cluster::with`], the appliances waiting up to `claim_wait` for a
    /// disk another one holds.
    fn claiming(hosts: u64, ttl: &'static str, claim_wait: &'static str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client}");
        let pool = dir.path().join("pool.px");
        let mut c = Cluster {
            dir,
            pool,
            etcd_url,
            peer,
            ttl,
            claim_wait,
            etcd: Proc(None),
            hosts: Vec::new(),
        };
        c.start_etcd();
        let init = c.px(1, &["init", "--size", "4G"]);
        assert!(init.status.success(), "init: {}", text(&init));
        for h in 1..=hosts {
            let p = c.start(h);
            c.hosts.push(p);
        }
        c
    }

    /// Starts etcd on the cluster's ports and data directory (again, after
    /// a stop: same members, same data) and waits until it listens.
    fn start_etcd(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let etcd = Command::new("etcd")
            .arg("--data-dir")
            .arg(self.dir.path().join("etcd"))
            .args(["--listen-client-urls", &self.etcd_url])
            .args(["--advertise-client-urls", &self.etcd_url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd");
        self.etcd = Proc(Some(etcd));
        self.wait_etcd();
    }

    fn wait_etcd(&self) {
        let port = self.etcd_url.rsplit(':').next().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err() {
            assert!(Instant::now() < deadline, "etcd did not come up");
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn control(&self, h: u64) -> PathBuf {
        self.dir.path().join(format!("c{h}"))
    }

    fn nbd_socket(&self, h: u64) -> PathBuf {
        self.dir.path().join(format!("n{h}.sock"))
    }

    /// Appliance `h`'s metric `name` (a sample without labels) from
    /// `GET /metrics` on its control socket.
    fn metric(&self, h: u64, name: &str) -> f64 {
        let mut s = UnixStream::connect(self.control(h)).expect("control socket");
        write!(s, "GET /metrics HTTP/1.0\r\nHost: parallax\r\n\r\n").unwrap();
        let mut page = String::new();
        s.read_to_string(&mut page).unwrap();
        page.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in host {h}'s metrics:\n{page}"))
    }

    fn command(&self, h: u64, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_parallax"));
        cmd.arg("--store")
            .arg(&self.pool)
            .arg("--control")
            .arg(self.control(h))
            .arg("--host-id")
            .arg(h.to_string())
            .args(args)
            .env_remove("PARALLAX_STORE")
            .env_remove("PARALLAX_CONTROL");
        cmd
    }

    fn px(&self, h: u64, args: &[&str]) -> Output {
        self.command(h, args).output().unwrap()
    }

    fn ok(&self, h: u64, args: &[&str]) -> String {
        let out = self.px(h, args);
        assert!(out.status.success(), "host {h} {args:?}: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, h: u64, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(h, &a)).unwrap()
    }

    /// Starts appliance `h` and waits until it answers. Each appliance
    /// has its own read cache (kept across its restarts), so that reads of
    /// snapshots and clones across hosts go through one.
    fn start(&self, h: u64) -> Proc {
        let log = std::fs::File::create(self.dir.path().join(format!("serve{h}.log"))).unwrap();
        let child = self
            .command(
                h,
                &[
                    "serve",
                    "--nbd-listen",
                    "none",
                    "--lease-ttl",
                    self.ttl,
                    "--takeover-grace",
                    "1s",
                    "--claim-wait",
                    self.claim_wait,
                    "--etcd",
                    &self.etcd_url,
                    "--cache-size",
                    "64M",
                ],
            )
            .arg("--cache")
            .arg(self.dir.path().join(format!("cache{h}.bin")))
            .arg("--nbd-socket")
            .arg(self.nbd_socket(h))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Proc(Some(child));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.px(h, &["status"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "appliance {h} did not come up:\n{}",
                std::fs::read_to_string(self.dir.path().join(format!("serve{h}.log")))
                    .unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(50));
        }
        p
    }

    fn uri(&self, h: u64, disk: &str) -> String {
        format!("nbd+unix:///{disk}?socket={}", self.nbd_socket(h).display())
    }
}

/// Connects to the NBD socket `path` and sends the client flags and one
/// `NBD_OPT_INFO` or `NBD_OPT_GO` (`option`) for `export`: the socket, and
/// the type of the option's final reply (`REP_ACK` or an error).
fn nbd_option(path: &std::path::Path, option: u32, export: &str) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut message = b"IHAVEOPT".to_vec();
    message.extend_from_slice(&option.to_be_bytes());
    message.extend_from_slice(&(data.len() as u32).to_be_bytes());
    message.extend_from_slice(&data);
    s.write_all(&message).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("option reply");
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut rest = vec![0u8; len as usize];
        s.read_exact(&mut rest).expect("option reply data");
        if kind != REP_INFO {
            return (s, kind);
        }
    }
}

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

/// The type of the final reply to `NBD_OPT_INFO` for `export` on the NBD
/// socket `path`.
fn opt_info_reply(path: &std::path::Path, export: &str) -> u32 {
    nbd_option(path, OPT_INFO, export).1
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn qemu_io(uri: &str, cmds: &[String]) -> Output {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri).output().unwrap()
}

/// qemu-io reading its commands from a pipe: the child, its stdin, its
/// stdout.
fn qemu_io_interactive(
    args: &[&str],
    uri: &str,
) -> (
    Child,
    std::process::ChildStdin,
    BufReader<std::process::ChildStdout>,
) {
    let mut child = Command::new("qemu-io")
        .args(args)
        .arg(uri)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    (child, stdin, stdout)
}

/// Ends an interactive qemu-io: `quit`, then everything it said after
/// `said` (stdout and stderr) appended to it; returns how it exited.
fn finish_interactive(
    mut child: Child,
    mut stdin: std::process::ChildStdin,
    mut stdout: BufReader<std::process::ChildStdout>,
    said: &mut String,
) -> std::process::ExitStatus {
    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    stdout.read_to_string(said).unwrap();
    child.stdout = None;
    let out = child.wait_with_output().unwrap();
    said.push_str(&text(&out));
    out.status
}

/// Reads lines until one contains `marker`; returns everything read.
fn read_until(stdout: &mut impl BufRead, marker: &str) -> String {
    let mut said = String::new();
    while !said.contains(marker) {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "qemu-io ended before {marker:?}: {said}"
        );
        said.push_str(&line);
    }
    said
}

fn qemu_io_ro(uri: &str, cmds: &[String]) -> Output {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-r", "-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri).output().unwrap()
}

fn names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

/// Three appliances on one pool file: concurrent creates on every host
/// all succeed and every host lists the same disks; each host writes its
/// own disks while the others refuse them; `hosts` and `info` show who
/// writes what; an appliance killed with -9 comes back after its lease
/// expired with its flushed writes; after a clean stop of all three, the
/// pool alone checks clean and holds every write.
#[test]
fn three_appliances_share_one_pool() {
    if !have("etcd", "--version") || !have("qemu-io", "--version") {
        return;
    }
    let mut c = Cluster::new();
    let pool = c.pool.clone();

    // Concurrent creates: 3 disks per host, all at once.
    thread::scope(|s| {
        for h in 1..=3u64 {
            let c = &c;
            s.spawn(move || {
                for k in 0..3 {
                    c.ok(h, &["create", &format!("h{h}d{k}"), "--size", "32M"]);
                }
            });
        }
    });
    let want: Vec<String> = (1..=3)
        .flat_map(|h| (0..3).map(move |k| format!("h{h}d{k}")))
        .collect();
    for h in 1..=3 {
        assert_eq!(names(&c.json(h, &["list"])), want, "host {h}'s list");
    }

    // Each host writes its own disks; the others cannot open them.
    for h in 1..=3u64 {
        for k in 0..3 {
            let disk = format!("h{h}d{k}");
            let p = 0x10 * h as u8 + k as u8;
            let w = qemu_io(&c.uri(h, &disk), &[format!("write -P {p:#x} 0 2M")]);
            assert!(w.status.success(), "host {h} writing {disk}: {}", text(&w));
        }
        let other = 1 + h % 3;
        let refused = qemu_io(&c.uri(other, &format!("h{h}d0")), &["read 0 4k".into()]);
        assert!(
            !refused.status.success(),
            "host {other} opened host {h}'s disk"
        );
        // The client is told why.
        assert!(
            text(&refused).contains(&format!("written by host {h}")),
            "{}",
            text(&refused)
        );
        // NBD_OPT_INFO must not promise what NBD_OPT_GO refuses.
        let info = opt_info_reply(&c.nbd_socket(other), &format!("h{h}d0"));
        assert_eq!(
            info, REP_ERR_UNKNOWN,
            "INFO on host {other} for host {h}'s disk"
        );
        assert_eq!(
            opt_info_reply(&c.nbd_socket(h), &format!("h{h}d0")),
            REP_ACK
        );
    }
    let hosts = c.json(1, &["hosts"]);
    let hosts = hosts.as_array().unwrap();
    assert_eq!(hosts.len(), 3, "{hosts:?}");
    for h in hosts {
        assert_eq!(h["writing"].as_array().unwrap().len(), 3, "{h}");
    }
    let info = c.json(2, &["info", "h1d0"]);
    assert_eq!(info["writer"]["host_id"], 1, "{info}");
    assert_eq!(info["writer"]["here"], false, "{info}");
    c.ok(1, &["snapshot", "h1d0@s"]);
    snapshots_across_hosts(&c);
    hand_off_between_hosts(&c);

    // kill -9 host 3: it comes back once its lease expired, and its
    // flushed writes (qemu-io flushes on exit) are there.
    c.hosts[2].kill9();
    let started = Instant::now();
    let p = c.start(3);
    c.hosts[2] = p;
    eprintln!("host 3 back after {:?}", started.elapsed());
    // Its disks were not let go: refused until taken over (by itself
    // here, after the grace).
    let refused = qemu_io(&c.uri(3, "h3d1"), &["read 0 4k".into()]);
    assert!(
        text(&refused).contains("did not let it go"),
        "{}",
        text(&refused)
    );
    for k in 0..3 {
        let t = c.json(3, &["takeover", &format!("h3d{k}")]);
        assert_eq!(t["taken_over"], true, "{t}");
        assert!(t["grace_ms"].as_u64().unwrap() >= 1000, "{t}");
        assert!(t["epoch"].as_u64() > t["from_epoch"].as_u64(), "{t}");
    }
    let r = qemu_io(&c.uri(3, "h3d1"), &["read -P 0x31 0 2M".into()]);
    assert!(
        r.status.success(),
        "host 3's write after kill -9: {}\n{}",
        text(&r),
        std::fs::read_to_string(c.dir.path().join("serve3.log")).unwrap_or_default()
    );

    check_and_gc_while_running(&mut c);

    // Clean stop of every appliance; the pool alone checks clean and
    // holds every write.
    for h in c.hosts.iter_mut() {
        assert_eq!(h.stop(), Some(0));
    }
    let check = Command::new(env!("CARGO_BIN_EXE_parallax"))
        .arg("--store")
        .arg(&pool)
        .args(["check", "--json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&check.stdout).unwrap_or(Value::Null);
    assert_eq!(report["clean"], true, "{}", text(&check));
    // Every appliance ran `gc` with the others running, then stopped.
    assert_eq!(report["leaked_blocks"], 0, "{}", text(&check));
    for h in 1..=3u64 {
        for k in 0..3 {
            let out = c.dir.path().join(format!("h{h}d{k}.raw"));
            let export = Command::new(env!("CARGO_BIN_EXE_parallax"))
                .arg("--store")
                .arg(&pool)
                .arg("export")
                .arg(format!("h{h}d{k}"))
                .arg(&out)
                .output()
                .unwrap();
            assert!(export.status.success(), "{}", text(&export));
            let data = std::fs::read(&out).unwrap();
            // h1d0 was last written by `snapshots_across_hosts`.
            let p = if (h, k) == (1, 0) {
                0x79
            } else {
                0x10 * h as u8 + k as u8
            };
            assert!(
                data[..2 << 20].iter().all(|&b| b == p),
                "h{h}d{k} lost its write"
            );
        }
    }
    c.etcd.stop();
}

/// `check` and `gc` on one appliance while the others write (and verify)
/// their disks: clean, and writes intact; then, every appliance idle, `gc`
/// on each leaves no leak in any host's extents. One disk was made on host
/// 2 and is now written by host 1: host 2's `gc` must not free its blocks
/// in host 2's extents, whoever holds it.
fn check_and_gc_while_running(c: &mut Cluster) {
    c.ok(2, &["create", "moved", "--size", "8M"]);
    let w = qemu_io(&c.uri(2, "moved"), &["write -P 0x5a 0 4M".into()]);
    assert!(w.status.success(), "{}", text(&w));
    // Host 2 lets it go (a clean stop gives its keys back).
    assert_eq!(c.hosts[1].stop(), Some(0));
    c.hosts[1] = c.start(2);
    let w = qemu_io(&c.uri(1, "moved"), &["write -P 0x5b 4M 4M".into()]);
    assert!(w.status.success(), "{}", text(&w));
    let c = &*c;
    thread::scope(|s| {
        let writers: Vec<_> = [1u64, 3]
            .into_iter()
            .map(|h| {
                s.spawn(move || {
                    for round in 0..4u8 {
                        let p = 0x40 + 0x10 * h as u8 + round;
                        let w = qemu_io(
                            &c.uri(h, &format!("h{h}d2")),
                            &[
                                format!("write -P {p:#x} 2M 2M"),
                                format!("read -P {p:#x} 2M 2M"),
                            ],
                        );
                        assert!(w.status.success(), "host {h} writing: {}", text(&w));
                    }
                })
            })
            .collect();
        for _ in 0..3 {
            let check = c.json(2, &["check"]);
            assert_eq!(check["clean"], true, "online check on host 2: {check}");
            c.ok(2, &["gc"]);
        }
        for w in writers {
            w.join().unwrap();
        }
    });
    // Host 2 allocates again: whatever its gc freed is reused.
    c.ok(2, &["create", "filler", "--size", "16M"]);
    let w = qemu_io(&c.uri(2, "filler"), &["write -P 0x66 0 16M".into()]);
    assert!(w.status.success(), "{}", text(&w));
    let r = qemu_io(
        &c.uri(1, "moved"),
        &["read -P 0x5a 0 4M".into(), "read -P 0x5b 4M 4M".into()],
    );
    assert!(
        r.status.success(),
        "host 1's moved disk after host 2's gc: {}",
        text(&r)
    );
    for h in 1..=3 {
        c.ok(h, &["gc"]);
    }
    for h in 1..=3 {
        let check = c.json(h, &["check"]);
        assert_eq!(check["clean"], true, "host {h}: {check}");
        assert_eq!(check["leaked_blocks"], 0, "host {h}: {check}");
    }
    for h in [1u64, 3] {
        let r = qemu_io(
            &c.uri(h, &format!("h{h}d2")),
            &[
                format!("read -P {:#x} 2M 2M", 0x40 + 0x10 * h as u8 + 3),
                format!("read -P {:#x} 0 2M", 0x10 * h as u8 + 2),
            ],
        );
        assert!(r.status.success(), "host {h} after gc: {}", text(&r));
    }
}

/// A disk written through host 1 by a client that stays connected is
/// handed off to host 2: the client's earlier (unflushed) write is there on
/// host 2, its later write is refused, host 3 is refused the disk; then an
/// idle disk goes back and forth (the times are printed).
fn hand_off_between_hosts(c: &Cluster) {
    c.ok(1, &["create", "mv", "--size", "8M"]);
    let w = qemu_io(&c.uri(1, "mv"), &["write -P 0x44 0 1M".into()]);
    assert!(w.status.success(), "{}", text(&w));
    let (client, mut stdin, mut stdout) = qemu_io_interactive(&["-f", "raw"], &c.uri(1, "mv"));
    writeln!(stdin, "write -P 0x45 0 4k").unwrap();
    let mut said = read_until(&mut stdout, "wrote 4096/");
    let h = c.json(1, &["handoff", "mv", "--to", "2"]);
    assert!(h["opened_there"].as_u64().is_some(), "{h}");
    eprintln!("hand-off of a disk with a connected client: {h}");
    writeln!(stdin, "write -P 0x46 4k 4k").unwrap();
    finish_interactive(client, stdin, stdout, &mut said);
    assert!(
        said.contains("write failed"),
        "the old holder took a write after the hand-off: {said}"
    );
    let refused = qemu_io(&c.uri(3, "mv"), &["read 0 4k".into()]);
    assert!(
        text(&refused).contains("written by host 2"),
        "{}",
        text(&refused)
    );
    let r = qemu_io(
        &c.uri(2, "mv"),
        &["read -P 0x45 0 4k".into(), "read -P 0x44 4k 1020k".into()],
    );
    assert!(r.status.success(), "host 2 reading mv: {}", text(&r));
    let info = c.json(2, &["info", "mv"]);
    assert_eq!(info["writer"]["host_id"], 2, "{info}");

    // An idle disk, back and forth.
    let mut times = Vec::new();
    let mut holder = 2;
    for _ in 0..10 {
        let to = 5 - holder;
        let h = c.json(holder, &["handoff", "mv", "--to", &to.to_string()]);
        times.push(h["total_ms"].as_u64().unwrap());
        holder = to;
    }
    times.sort();
    eprintln!("hand-off of an idle disk (ms, sorted): {times:?}");
    let r = qemu_io(&c.uri(holder, "mv"), &["read -P 0x45 0 4k".into()]);
    assert!(r.status.success(), "{}", text(&r));
}

/// Host 1 holds h1d0, whose snapshot `s` holds 0x10 in its first 2 MiB.
/// Host 2 reads the snapshot and host 3 clones it and writes the clone,
/// neither taking h1d0; host 1 deletes the snapshot while host 2 still
/// reads it: it is hidden, host 2 goes on reading it intact while host 1
/// writes, and it is reclaimed once host 2 lets go and the clone is gone.
fn snapshots_across_hosts(c: &Cluster) {
    let w = qemu_io(&c.uri(1, "h1d0"), &["write -P 0x77 0 2M".into()]);
    assert!(w.status.success(), "{}", text(&w));
    let r = qemu_io_ro(&c.uri(2, "h1d0@s"), &["read -P 0x10 0 2M".into()]);
    assert!(r.status.success(), "host 2 reading h1d0@s: {}", text(&r));
    c.ok(3, &["clone", "h1d0@s", "gold3"]);
    let w = qemu_io(
        &c.uri(3, "gold3"),
        &["read -P 0x10 1M 1M".into(), "write -P 0x33 0 1M".into()],
    );
    assert!(w.status.success(), "host 3 on its clone: {}", text(&w));
    assert_eq!(c.json(2, &["info", "gold3"])["origin"], "h1d0@s");
    let listed = c.json(2, &["snapshots", "h1d0"]);
    assert_eq!(
        names(&listed),
        ["s"],
        "host 2's listing of h1d0's snapshots"
    );

    // A reader that stays connected (qemu-io reading commands from stdin).
    let (reader, mut stdin, mut stdout) =
        qemu_io_interactive(&["-r", "-f", "raw"], &c.uri(2, "h1d0@s"));
    writeln!(stdin, "read -P 0x10 0 2M").unwrap();
    // Once a read is answered, the export is open (and pinned).
    let first = read_until(&mut stdout, "read 2097152/");
    c.ok(1, &["delete", "h1d0@s"]);
    c.ok(3, &["delete", "gold3"]);
    // Host 1 writes over what a reclamation would have freed.
    for p in [0x78, 0x79] {
        let w = qemu_io(&c.uri(1, "h1d0"), &[format!("write -P {p:#x} 0 2M")]);
        assert!(w.status.success(), "{}", text(&w));
    }
    let info = c.json(1, &["info", "h1d0"]);
    assert_eq!(
        info["hidden_snapshots"], 1,
        "a snapshot being read was reclaimed: {info}"
    );
    writeln!(stdin, "read -P 0x10 0 2M").unwrap();
    let mut said = first;
    let status = finish_interactive(reader, stdin, stdout, &mut said);
    assert!(
        status.success() && !said.contains("failed") && said.matches("read 2097152/").count() == 2,
        "host 2's reader: {said}"
    );
    // Host 2 read the snapshot of host 1's disk twice: the second time
    // from its read cache (the snapshot pinned cluster-wide meanwhile).
    let status = c.json(2, &["status"]);
    assert!(
        status["cache"]["hits"].as_u64().unwrap_or(0) >= 512,
        "host 2's read cache: {status}"
    );
    // Let go: host 1's upkeep reclaims it (within its retry interval).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = c.json(1, &["info", "h1d0"]);
        if info["hidden_snapshots"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "never reclaimed: {info}");
        thread::sleep(Duration::from_millis(200));
    }
}

/// etcd restarted (stopped by its PID, started again on the same data)
/// for less than the lease TTL, under load: `fio --verify` writes through
/// each of two appliances meanwhile. Their leases survive (incarnation
/// still 1: no appliance lost its disks), fio's writes all verify, and the
/// catalogue works again after. `ETCD_RESTARTS` restarts (2 by default;
/// by hand, many).
#[test]
fn an_etcd_restart_shorter_than_the_lease_is_survived() {
    if !have("etcd", "--version") || !have("qemu-io", "--version") || !have("fio", "--version") {
        return;
    }
    let restarts: u32 = std::env::var("ETCD_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut c = Cluster::with(2, "10s");
    let fios: Vec<Proc> = (1..=2u64)
        .map(|h| {
            let disk = format!("d{h}");
            c.ok(h, &["create", &disk, "--size", "16M"]);
            let log = std::fs::File::create(c.dir.path().join(format!("fio{h}.log"))).unwrap();
            let child = Command::new("fio")
                .current_dir(c.dir.path())
                .args(["--name=v", "--ioengine=nbd", "--rw=randwrite", "--bs=4k"])
                .args([
                    "--iodepth=8",
                    "--size=16m",
                    "--verify=crc32c",
                    "--do_verify=1",
                ])
                .args(["--verify_fatal=1", "--end_fsync=1"])
                // Writing for about 3.5 s per restart, then verifying.
                .arg(format!("--rate_iops={}", 4096 / (1 + 3 * restarts)))
                .arg(format!(
                    "--uri=nbd+unix:///{disk}?socket={}",
                    c.nbd_socket(h).display()
                ))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            Proc(Some(child))
        })
        .collect();
    for _ in 0..restarts {
        thread::sleep(Duration::from_secs(2));
        c.etcd.stop();
        thread::sleep(Duration::from_millis(1500));
        c.start_etcd();
    }
    for (i, mut f) in fios.into_iter().enumerate() {
        let status = f.0.take().unwrap().wait().unwrap();
        let log = std::fs::read_to_string(c.dir.path().join(format!("fio{}.log", i + 1)));
        assert!(status.success(), "fio through host {}: {log:?}", i + 1);
    }
    for h in 1..=2 {
        let status = c.json(h, &["status"]);
        assert_eq!(status["cluster"]["may_write"], true, "{status}");
        assert_eq!(
            status["cluster"]["incarnation"], 1,
            "host {h} lost its lease: {status}"
        );
    }
    let hosts = c.json(1, &["hosts"]);
    for (h, disk) in hosts.as_array().unwrap().iter().zip(["d1", "d2"]) {
        assert_eq!(h["writing"][0]["disk"], disk, "{hosts}");
    }
    c.ok(2, &["create", "after", "--size", "1M"]);
    eprintln!("{restarts} etcd restarts under load survived");
    for h in c.hosts.iter_mut() {
        assert_eq!(h.stop(), Some(0));
    }
    c.etcd.stop();
}

/// `kill -9` of an appliance while a client writes with FUA (qemu-io,
/// `write -f`): host 2 takes the disk over, and every write the client saw
/// acknowledged before the kill reads back there. `FAILOVER_KILL_AFTER`
/// sets after how many acknowledged writes the kill comes (default: from
/// the process id, so repeated runs vary it); the loop by hand is
/// `for i in $(seq 20); do cargo test --release -p parallax --test cluster
/// acknowledged; done`.
#[test]
fn a_dead_appliances_disk_is_taken_over_with_every_acknowledged_write() {
    if !have("etcd", "--version") || !have("qemu-io", "--version") {
        return;
    }
    let mut c = Cluster::with(2, "3s");
    c.ok(1, &["create", "w", "--size", "16M"]);
    let kill_after: usize = std::env::var("FAILOVER_KILL_AFTER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100 + std::process::id() as usize % 1500);
    let pattern = |i: usize| (i % 251) as u8 + 1;
    let mut client = Command::new("qemu-io")
        .args(["-f", "raw", &c.uri(1, "w")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = client.stdin.take().unwrap();
    let feeder = thread::spawn(move || {
        for i in 0..4096usize {
            let line = format!("write -f -P {} {} 4k\n", pattern(i), i * 4096);
            if stdin.write_all(line.as_bytes()).is_err() {
                break;
            }
        }
    });
    let mut stdout = BufReader::new(client.stdout.take().unwrap());
    let mut acked = Vec::new();
    let mut line = String::new();
    while stdout.read_line(&mut line).unwrap_or(0) > 0 {
        if let Some(rest) = line.split("wrote 4096/4096 bytes at offset ").nth(1) {
            let off: usize = rest.trim().parse().unwrap();
            acked.push(off / 4096);
            if acked.len() == kill_after {
                c.hosts[0].kill9();
            }
        }
        line.clear();
    }
    let _ = client.wait();
    let _ = feeder.join();
    assert!(
        acked.len() >= kill_after && acked.len() < 4096,
        "{} writes acknowledged, the kill after {kill_after}",
        acked.len()
    );
    let killed = Instant::now();
    let t = c.json(2, &["takeover", "w"]);
    assert_eq!(t["taken_over"], true, "{t}");
    assert_eq!(c.metric(2, "parallax_cluster_disks_taken_over_total"), 1.0);
    eprintln!(
        "killed after {} acknowledged writes; host 2 took over in {:?}: {t}",
        acked.len(),
        killed.elapsed()
    );
    // Every acknowledged write, read back through host 2 (in batches).
    for chunk in acked.chunks(512) {
        let cmds: Vec<String> = chunk
            .iter()
            .map(|&i| format!("read -P {} {} 4k", pattern(i), i * 4096))
            .collect();
        let r = qemu_io(&c.uri(2, "w"), &cmds);
        assert!(
            r.status.success() && !text(&r).contains("Pattern verification failed"),
            "an acknowledged write is missing after the takeover: {}",
            text(&r)
        );
    }
    let check = c.json(2, &["check"]);
    assert_eq!(check["clean"], true, "{check}");
    assert_eq!(c.hosts[1].stop(), Some(0));
    c.etcd.stop();
}

/// Revokes the etcd lease under which host `host` is registered, through
/// etcd's JSON gateway (what an expiry does, without waiting for one).
fn revoke_lease_of(etcd_url: &str, host: u64) {
    let script = r#"
import base64, json, sys, urllib.request
url, host = sys.argv[1], sys.argv[2]
def post(path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))
b64 = lambda s: base64.b64encode(s.encode()).decode()
r = post("/v3/kv/range", {"key": b64("/parallax/"), "range_end": b64("/parallax0")})
for kv in r.get("kvs", []):
    if base64.b64decode(kv["key"]).decode().endswith("/hosts/" + host):
        post("/v3/lease/revoke", {"ID": kv["lease"]})
        sys.exit(0)
sys.exit("no registration of host " + host)
"#;
    let out = Command::new("python3")
        .args(["-c", script, etcd_url, &host.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "revoking: {}", text(&out));
}

/// An appliance whose lease ended while it ran (revoked here) takes a new
/// one, registers again, and takes back the disk nobody took meanwhile,
/// with the write a connected client made before (unflushed); the client's
/// writes then go on.
#[test]
fn a_lost_lease_is_renewed_and_the_disk_taken_back() {
    if !have("etcd", "--version") || !have("qemu-io", "--version") || !have("python3", "--version")
    {
        return;
    }
    let c = Cluster::with(1, "3s");
    c.ok(1, &["create", "d", "--size", "16M"]);
    let w = qemu_io(&c.uri(1, "d"), &["write -P 0x61 0 1M".into()]);
    assert!(w.status.success(), "{}", text(&w));
    let (client, mut stdin, mut stdout) = qemu_io_interactive(&["-f", "raw"], &c.uri(1, "d"));
    writeln!(stdin, "write -P 0x62 1M 4k").unwrap();
    let mut said = read_until(&mut stdout, "wrote 4096/");
    let before = c.json(1, &["info", "d"])["writer"]["epoch"]
        .as_u64()
        .unwrap();
    revoke_lease_of(&c.etcd_url, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    // Catalogue calls fail until the new lease is there.
    loop {
        let out = c.px(1, &["info", "d", "--json"]);
        let info: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if info["writer"]["epoch"].as_u64().is_some_and(|e| e > before) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the disk was not taken back: {}\n{}",
            text(&out),
            std::fs::read_to_string(c.dir.path().join("serve1.log")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(200));
    }
    writeln!(stdin, "write -P 0x63 2M 4k").unwrap();
    writeln!(stdin, "flush").unwrap();
    finish_interactive(client, stdin, stdout, &mut said);
    assert!(
        said.matches("wrote 4096/").count() == 2 && !said.contains("failed"),
        "the client's writes after the renewal: {said}"
    );
    let r = qemu_io(
        &c.uri(1, "d"),
        &[
            "read -P 0x61 0 1M".into(),
            "read -P 0x62 1M 4k".into(),
            "read -P 0x63 2M 4k".into(),
        ],
    );
    assert!(r.status.success(), "{}", text(&r));
    let hosts = c.json(1, &["hosts"]);
    assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{hosts}");
    let status = c.json(1, &["status"]);
    assert_eq!(status["cluster"]["may_write"], true, "{status}");
    assert_eq!(status["cluster"]["incarnation"], 2, "a new lease: {status}");
}

// ---- several hosts: network namespaces ----------------------------------------

/// Network namespaces this test created: deleted (and every process in
/// them stopped by its PID first, by the `Proc`s' drops) when it ends.
struct Netns {
    names: Vec<String>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", text(&out));
}

/// `timeout SECS ip netns exec NS PROGRAM ARGS...`: a command that must
/// end.
fn in_ns(ns: &str, secs: u32, program: &str) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg(secs.to_string())
        .args(["ip", "netns", "exec", ns, program]);
    cmd
}

/// `ip netns exec NS PROGRAM ARGS...`: a server, stopped by its PID (`ip`
/// execs the program, so the child's PID is the server's).
fn server_in_ns(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]);
    cmd
}

/// Appliances, etcd and the pool's NBD server (qemu-nbd) in network
/// namespaces of their own, joined by a bridge in another: the pool is
/// reached over the network (`--store nbd://...`), like a SAN, and either
/// can be cut off from a host by a blackhole route in its namespace.
/// Every process is stopped by its PID and every namespace deleted when it
/// drops.
struct NetCluster {
    /// Subnet prefix (`10.x.y`): etcd is `.2`, the pool `.3`, host N `.1N`.
    net: String,
    tag: String,
    etcd_url: String,
    store: String,
    /// `serve` arguments besides the addresses.
    serve_args: Vec<String>,
    hosts: Vec<Proc>,
    etcd: Proc,
    pool_server: Proc,
    dir: tempfile::TempDir,
    // Last: the namespaces go once every process in them was stopped.
    _netns: Netns,
}

impl NetCluster {
    /// Starts etcd, the pool server and `hosts` appliances (lease TTL 3 s,
    /// `--takeover` with a 1 s grace, plus `extra` serve arguments) on a
    /// fresh 2 GiB pool.
    fn start(hosts: u64, extra: &[&str]) -> NetCluster {
        // Unique per cluster: tests run in parallel in one process.
        static CLUSTERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tag = format!("px{}-{n}", std::process::id() % 100_000);
        let seed = std::process::id() + n * 7919;
        let net = format!("10.{}.{}", 200 + seed % 50, (seed / 50) % 250);
        let ns = |n: &str| format!("{tag}-{n}");
        let mut netns = Netns {
            names: vec![ns("br")],
        };
        ip(&["netns", "add", &ns("br")]);
        ip(&["-n", &ns("br"), "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &ns("br"), "link", "set", "br0", "up"]);
        let roles = [("et".to_string(), 2), ("po".to_string(), 3)]
            .into_iter()
            .chain((1..=hosts).map(|h| (format!("h{h}"), 10 + h)));
        for (role, host) in roles {
            let n = ns(&role);
            ip(&["netns", "add", &n]);
            netns.names.push(n.clone());
            let peer = format!("p-{role}");
            ip(&[
                "-n",
                &n,
                "link",
                "add",
                "v0",
                "type",
                "veth",
                "peer",
                "name",
                &peer,
                "netns",
                &ns("br"),
            ]);
            ip(&["-n", &ns("br"), "link", "set", &peer, "master", "br0", "up"]);
            let addr = format!("{net}.{host}/24");
            ip(&["-n", &n, "addr", "add", &addr, "dev", "v0"]);
            ip(&["-n", &n, "link", "set", "v0", "up"]);
            ip(&["-n", &n, "link", "set", "lo", "up"]);
        }
        let etcd_url = format!("http://{net}.2:2379");
        let mut c = NetCluster {
            store: format!("nbd://{net}.3:10809/"),
            net,
            tag,
            etcd_url,
            serve_args: ["--lease-ttl", "3s", "--takeover", "--takeover-grace", "1s"]
                .iter()
                .chain(extra)
                .map(|s| s.to_string())
                .collect(),
            hosts: Vec::new(),
            etcd: Proc(None),
            pool_server: Proc(None),
            dir: tempfile::tempdir().unwrap(),
            _netns: netns,
        };
        let d = c.dir.path().to_path_buf();
        let net = &c.net;
        let mut etcd = server_in_ns(&c.ns("et"), "etcd");
        etcd.arg("--data-dir").arg(d.join("etcd"));
        let (client, peer) = (&c.etcd_url, format!("http://{net}.2:2380"));
        etcd.args([
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
        ]);
        etcd.args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ]);
        etcd.args(["--initial-cluster", &format!("default={peer}")]);
        c.etcd = c.spawn(etcd, "etcd.log");
        let pool_file = d.join("pool.raw");
        std::fs::File::create(&pool_file)
            .unwrap()
            .set_len(2 << 30)
            .unwrap();
        let mut pool = server_in_ns(&c.ns("po"), "qemu-nbd");
        pool.args(["--format=raw", "--persistent", "--shared=64"]);
        pool.args(["--bind", &format!("{net}.3"), "--port", "10809"]);
        pool.arg(&pool_file);
        c.pool_server = c.spawn(pool, "pool.log");
        // The pool server and etcd are up once init gets through.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = c.px(1, 60, &["init"]).output().unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "init over the network: {}",
                text(&out)
            );
            thread::sleep(Duration::from_millis(200));
        }
        for h in 1..=hosts {
            let p = c.start_host(h);
            c.hosts.push(p);
        }
        c
    }

    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.tag)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Starts `cmd` with its output in `log` (in the test's directory,
    /// which is its working directory: fio leaves its verify state there).
    fn spawn(&self, mut cmd: Command, log: &str) -> Proc {
        let log = std::fs::File::create(self.dir.path().join(log)).unwrap();
        cmd.current_dir(self.dir.path());
        Proc(Some(
            cmd.stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        ))
    }

    /// `parallax` as host `h`, in its namespace; `secs == 0`: a server (no
    /// timeout wrapper, so that its PID is its own).
    fn px(&self, h: u64, secs: u32, args: &[&str]) -> Command {
        let host = self.ns(&format!("h{h}"));
        let program = env!("CARGO_BIN_EXE_parallax");
        let mut c = if secs == 0 {
            server_in_ns(&host, program)
        } else {
            in_ns(&host, secs, program)
        };
        c.args(["--store", &self.store, "--host-id", &h.to_string()])
            .arg("--control")
            .arg(self.dir.path().join(format!("c{h}")))
            .args(args)
            .env_remove("PARALLAX_STORE")
            .env_remove("PARALLAX_CONTROL");
        c
    }

    /// Runs `parallax` as host `h`; its stdout, which must be a success.
    fn ok(&self, h: u64, args: &[&str]) -> String {
        let out = self.px(h, 120, args).output().unwrap();
        assert!(out.status.success(), "host {h} {args:?}: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, h: u64, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        serde_json::from_str(&self.ok(h, &args)).unwrap()
    }

    /// Starts appliance `h` and waits until it answers.
    fn start_host(&self, h: u64) -> Proc {
        let mut c = self.px(h, 0, &["serve", "--etcd", &self.etcd_url]);
        c.args(self.serve_args.iter())
            .args(["--nbd-listen", &self.addr(h), "--nbd-socket"])
            .arg(self.dir.path().join(format!("n{h}.sock")));
        let p = self.spawn(c, &format!("serve{h}.log"));
        let deadline = Instant::now() + Duration::from_secs(40);
        while !self
            .px(h, 10, &["status"])
            .output()
            .unwrap()
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "appliance {h} did not come up:\n{}",
                self.log(&format!("serve{h}.log"))
            );
            thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// Host `h`'s NBD address.
    fn addr(&self, h: u64) -> String {
        format!("{}.{}:10809", self.net, 10 + h)
    }

    /// qemu-io in host `from`'s namespace on `disk` through host `via`.
    fn qio(&self, from: u64, via: u64, disk: &str, cmd: &str) -> Output {
        let mut c = in_ns(&self.ns(&format!("h{from}")), 60, "qemu-io");
        c.args(["-f", "raw", "-c", cmd])
            .arg(format!("nbd://{}/{disk}", self.addr(via)));
        c.output().unwrap()
    }

    /// Cuts host `h` off etcd (`.2`) and, with `pool`, off the pool (`.3`)
    /// too; [`NetCluster::heal`] undoes it.
    fn cut(&self, h: u64, pool: bool) {
        for target in self.cut_targets(pool) {
            ip(&[
                "-n",
                &self.ns(&format!("h{h}")),
                "route",
                "add",
                "blackhole",
                &target,
            ]);
        }
    }

    fn heal(&self, h: u64, pool: bool) {
        for target in self.cut_targets(pool) {
            ip(&[
                "-n",
                &self.ns(&format!("h{h}")),
                "route",
                "del",
                "blackhole",
                &target,
            ]);
        }
    }

    fn cut_targets(&self, pool: bool) -> Vec<String> {
        let mut t = vec![format!("{}.2/32", self.net)];
        if pool {
            t.push(format!("{}.3/32", self.net));
        }
        t
    }
}

/// Three appliances, etcd and the pool's NBD server (qemu-nbd) in five
/// network namespaces joined by a bridge in a sixth: the pool is reached
/// over the network (`--store nbd://...`). Concurrent creates on every
/// host; `fio --verify` on each host's own disk at once; a client on host 2
/// reads host 1's disk through host 1, while host 2 itself refuses it; then
/// host 3 is cut off etcd (not the pool): once its lease has run out it
/// refuses writes, and host 1 opens host 3's disk from its last commit,
/// flushed data intact. The pool alone then checks clean.
#[test]
fn appliances_in_network_namespaces() {
    if !have("etcd", "--version")
        || !have("qemu-nbd", "--version")
        || !have("fio", "--version")
        || !have("qemu-io", "--version")
    {
        return;
    }
    let mut c = NetCluster::start(3, &["--claim-wait", "0s"]);

    // Concurrent creates on every host.
    thread::scope(|s| {
        for h in 1..=3u64 {
            let c = &c;
            s.spawn(move || {
                for k in 0..2 {
                    c.ok(h, &["create", &format!("h{h}d{k}"), "--size", "64M"]);
                }
            });
        }
    });
    for h in 1..=3 {
        assert_eq!(names(&c.json(h, &["list"])).len(), 6, "host {h}'s list");
    }

    // fio --verify on every host's own disk at once, each from inside its
    // host, over TCP.
    let fios: Vec<Proc> = (1..=3u64)
        .map(|h| {
            let mut cmd = in_ns(&c.ns(&format!("h{h}")), 300, "fio");
            cmd.args([
                "--name=v",
                "--ioengine=nbd",
                &format!("--uri=nbd://{}/h{h}d0", c.addr(h)),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                "--size=16m",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--end_fsync=1",
            ]);
            c.spawn(cmd, &format!("fio{h}.log"))
        })
        .collect();
    for (i, mut f) in fios.into_iter().enumerate() {
        let status = f.0.take().unwrap().wait().unwrap();
        assert!(
            status.success(),
            "fio on host {}: {}",
            i + 1,
            c.log(&format!("fio{}.log", i + 1))
        );
    }
    // A client on host 2 reaches host 1's disk through host 1; host 2
    // itself refuses it.
    let w = c.qio(1, 1, "h1d1", "write -P 0x51 0 1M");
    assert!(w.status.success(), "{}", text(&w));
    let r = c.qio(2, 1, "h1d1", "read -P 0x51 0 1M");
    assert!(
        r.status.success(),
        "host 2 reading host 1's disk through host 1: {}",
        text(&r)
    );
    let refused = c.qio(2, 2, "h1d1", "read 0 4k");
    assert!(!refused.status.success(), "host 2 opened host 1's disk");
    let w = c.qio(3, 3, "h3d1", "write -P 0x73 0 1M");
    assert!(w.status.success(), "{}", text(&w));

    // A gold image on host 1, cloned on hosts 2 and 3 and written there;
    // its snapshot read through host 2's export, over TCP.
    c.ok(1, &["snapshot", "h1d1@gold"]);
    for h in [2u64, 3] {
        let clone = format!("g{h}");
        c.ok(h, &["clone", "h1d1@gold", &clone]);
        for cmd in [
            "read -P 0x51 0 1M",
            &format!("write -P {:#x} 1M 1M", 0x60 + h),
        ] {
            let w = c.qio(h, h, &clone, cmd);
            assert!(w.status.success(), "host {h} on its clone: {}", text(&w));
        }
    }
    let mut ro = in_ns(&c.ns("h2"), 60, "qemu-io");
    ro.args(["-r", "-f", "raw", "-c", "read -P 0x51 0 1M"])
        .arg(format!("nbd://{}/h1d1@gold", c.addr(2)));
    let r = ro.output().unwrap();
    assert!(r.status.success(), "host 2 reading h1d1@gold: {}", text(&r));
    // Every host's view agrees; gc on each with the others up leaves no
    // leak, and check is clean on each.
    let lists: Vec<Vec<String>> = (1..=3).map(|h| names(&c.json(h, &["list"]))).collect();
    assert_eq!(lists[0].len(), 8, "{lists:?}");
    assert!(lists.iter().all(|l| *l == lists[0]), "{lists:?}");
    for h in 1..=3 {
        c.ok(h, &["gc"]);
    }
    for h in 1..=3 {
        let report = c.json(h, &["check"]);
        assert_eq!(report["clean"], true, "host {h}: {report}");
        assert_eq!(report["leaked_blocks"], 0, "host {h}: {report}");
    }

    // Host 3 is cut off etcd (the pool it still reaches) while a client
    // writes to its other disk over a connection made before: past its
    // lease it writes nothing more (the client gets errors, in bounded
    // time); then host 1 can open its disk, from its last commit.
    let mut writer = {
        let mut cmd = in_ns(&c.ns("h3"), 120, "fio");
        cmd.args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri=nbd://{}/h3d0", c.addr(3)),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=4",
            "--size=16m",
            "--time_based",
            "--runtime=40",
        ]);
        c.spawn(cmd, "fio-cut.log")
    };
    thread::sleep(Duration::from_secs(1));
    c.cut(3, false);
    let cut = Instant::now();
    let status = writer.0.take().unwrap().wait().unwrap();
    assert!(
        !status.success(),
        "host 3 took writes for 40 s after losing etcd: {}",
        c.log("fio-cut.log")
    );
    assert!(
        cut.elapsed() < Duration::from_secs(15),
        "host 3 refused writes only {:?} after the cut (lease TTL 3 s)",
        cut.elapsed()
    );
    // Host 3 says so itself.
    let status = c.json(3, &["status"]);
    assert_eq!(status["cluster"]["may_write"], false, "{status}");
    // Host 1 or host 2 takes host 3's disks over by itself (--takeover)
    // once host 3's lease ended, after the grace: within TTL + 5 s.
    let by = 'taken: loop {
        for h in [1u64, 2] {
            if c.qio(h, h, "h3d1", "read -P 0x73 0 1M").status.success() {
                break 'taken h;
            }
        }
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "nobody took host 3's disk over:\n{}",
            c.log("serve1.log")
        );
        thread::sleep(Duration::from_millis(200));
    };
    let took = cut.elapsed();
    eprintln!("host 3's disk served by host {by} {took:?} after the cut");
    assert!(
        took < Duration::from_secs(3 + 5),
        "takeover took {took:?} (TTL 3 s)"
    );
    // The partition heals: host 3 takes a new lease and registers again,
    // and stays off the disk another host took meanwhile.
    c.heal(3, false);
    let back_by = Instant::now() + Duration::from_secs(30);
    loop {
        let hosts = c.json(1, &["hosts"]);
        if hosts.as_array().map(Vec::len) == Some(3) {
            break;
        }
        assert!(
            Instant::now() < back_by,
            "host 3 did not register again: {hosts}\n{}",
            c.log("serve3.log")
        );
        thread::sleep(Duration::from_millis(300));
    }
    let stale = c.qio(3, 3, "h3d1", "write -P 0x99 0 4k");
    assert!(
        !stale.status.success(),
        "host 3 wrote a disk another host took: {}",
        text(&stale)
    );

    // Host 3 stays fenced (its lease is gone) until restarted; the others
    // stop cleanly; the pool alone checks clean.
    c.hosts[2].kill9();
    for h in c.hosts.iter_mut().take(2) {
        assert_eq!(h.stop(), Some(0));
    }
    let report = c.json(1, &["check"]);
    assert_eq!(report["clean"], true, "{report}");
    c.pool_server.stop();
    c.etcd.stop();
}

/// A disk follows its client to another appliance (the lease following a
/// migrating VM), but never leaves a client that is using it: host 2's
/// client waits for a disk host 1's client wrote without a flush and is
/// refused once `--claim-wait` passes, with host 1's client unharmed;
/// once host 1's client flushed and went quiet, host 2's next write gets
/// the disk with everything written before, and host 1's client's later
/// writes are refused.
/// NBD's multi-connection promise across a claim: a FLUSH on a connection
/// of host 2 that never wrote (opened while host 1 held the disk, so it
/// has no handle of its own) makes durable what another connection of
/// host 2 wrote after asking for the disk. Host 1 then reads the pool's
/// newest commit within the daemon's settle tick (1 s idle), so only the
/// FLUSH can have put the write there.
#[test]
fn a_flush_on_a_connection_that_never_wrote_covers_what_another_claimed_and_wrote() {
    if !have("etcd", "--version") || !have("qemu-io", "--version") {
        return;
    }
    let c = Cluster::claiming(2, "3s", "3s");
    c.ok(1, &["create", "vm", "--size", "8M"]);
    let w = qemu_io(&c.uri(1, "vm"), &["write -P 0x41 0 4k".into()]);
    assert!(w.status.success(), "host 1 writing vm: {}", text(&w));
    // X: a raw client of host 2 that never writes (qemu-io skips a FLUSH
    // when it wrote nothing).
    let mut x = RawNbd::go(&c.nbd_socket(2), "vm");
    let args = ["-f", "raw", "-t", "writeback"];
    let (y, mut y_in, mut y_out) = qemu_io_interactive(&args, &c.uri(2, "vm"));
    // A block never written: a new block, which only a commit links in
    // (block 0, written by host 1, would be rewritten in place, where a
    // reader of the commit sees it at once).
    writeln!(y_in, "write -P 0x42 1M 4k").unwrap();
    let mut y_said = read_until(&mut y_out, "wrote 4096/");
    assert_eq!(c.json(2, &["info", "vm"])["writer"]["host_id"], 2);
    let started = Instant::now();
    assert_eq!(x.flush(), 0, "X's FLUSH failed");
    let r = qemu_io_ro(&c.uri(1, "vm"), &["read -P 0x42 1M 4k".into()]);
    let took = started.elapsed();
    assert!(
        r.status.success(),
        "host 2's FLUSH left its other connection's write out of the pool's commit ({took:?} after it): {}",
        text(&r)
    );
    if took >= Duration::from_secs(1) {
        eprintln!("inconclusive: {took:?} after the FLUSH, the settle tick may have committed");
    }
    finish_interactive(y, y_in, y_out, &mut y_said);
}

/// A minimal NBD client on a Unix socket: negotiated with NBD_OPT_GO,
/// simple replies; sends FLUSH.
struct RawNbd(UnixStream);

impl RawNbd {
    fn go(path: &std::path::Path, export: &str) -> RawNbd {
        let (s, kind) = nbd_option(path, OPT_GO, export);
        assert_eq!(kind, REP_ACK, "NBD_OPT_GO for {export}");
        RawNbd(s)
    }

    /// Sends NBD_CMD_FLUSH; the reply's error.
    fn flush(&mut self) -> u32 {
        let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
        req.extend_from_slice(&0u16.to_be_bytes()); // flags
        req.extend_from_slice(&3u16.to_be_bytes()); // NBD_CMD_FLUSH
        req.extend_from_slice(&1u64.to_be_bytes()); // cookie
        req.extend_from_slice(&0u64.to_be_bytes()); // offset
        req.extend_from_slice(&0u32.to_be_bytes()); // length
        self.0.write_all(&req).unwrap();
        let mut reply = [0u8; 16];
        self.0.read_exact(&mut reply).expect("FLUSH reply");
        assert_eq!(
            &reply[..4],
            &0x6744_6698u32.to_be_bytes(),
            "simple reply magic"
        );
        u32::from_be_bytes(reply[4..8].try_into().unwrap())
    }
}

#[test]
fn a_disk_follows_its_client_but_never_leaves_a_busy_one() {
    if !have("etcd", "--version") || !have("qemu-io", "--version") {
        return;
    }
    let c = Cluster::claiming(2, "3s", "3s");
    c.ok(1, &["create", "vm", "--size", "8M"]);
    // `-t writeback`: without it qemu-io writes with FUA.
    let (client, mut stdin, mut stdout) =
        qemu_io_interactive(&["-f", "raw", "-t", "writeback"], &c.uri(1, "vm"));
    writeln!(stdin, "write -P 0x41 0 4k").unwrap();
    let mut said = read_until(&mut stdout, "wrote 4096/");

    // A client of host 2 reads the disk as its last commit has it,
    // without taking it.
    let r = qemu_io(&c.uri(2, "vm"), &["read 0 4k".into()]);
    assert!(r.status.success(), "host 2 reading vm: {}", text(&r));
    assert_eq!(c.json(2, &["info", "vm"])["writer"]["host_id"], 1);

    // Busy: written and not flushed. Host 2's client waits, then fails;
    // meanwhile `hosts` and `info` show the request.
    let started = Instant::now();
    let uri = c.uri(2, "vm");
    let asking = thread::spawn(move || qemu_io(&uri, &["write -P 0x42 4k 4k".into()]));
    let deadline = Instant::now() + Duration::from_secs(2);
    let hosts = loop {
        let hosts = c.json(1, &["hosts"]);
        if hosts[1]["asking_for"] == serde_json::json!(["vm"]) {
            break hosts;
        }
        assert!(Instant::now() < deadline, "no request shown: {hosts}");
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(hosts[0]["writing"][0]["disk"], "vm", "{hosts}");
    for h in hosts.as_array().unwrap() {
        let left = h["lease_left_ms"].as_u64().unwrap();
        assert!(left > 0 && left <= 3000, "{h}");
    }
    let info = c.json(1, &["info", "vm"]);
    assert_eq!(
        info["writer"]["asked_for_by"],
        serde_json::json!([2]),
        "{info}"
    );
    let w = asking.join().unwrap();
    let waited = started.elapsed();
    assert!(
        text(&w).contains("write failed"),
        "host 2 wrote a disk host 1's client had written without a flush: {}",
        text(&w)
    );
    assert!(waited >= Duration::from_secs(3), "gave up after {waited:?}");
    assert_eq!(c.json(2, &["info", "vm"])["writer"]["host_id"], 1);
    writeln!(stdin, "write -P 0x43 8k 4k").unwrap();
    said.push_str(&read_until(&mut stdout, "wrote 4096/"));

    // Flushed and quiet: asked for, given.
    writeln!(stdin, "flush").unwrap();
    thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let w = qemu_io(&c.uri(2, "vm"), &["write -P 0x42 4k 4k".into()]);
    let took = started.elapsed();
    assert!(w.status.success(), "host 2 asking for vm: {}", text(&w));
    eprintln!("host 2's first write waited {took:?} for the disk (quiet 500 ms)");
    let info = c.json(2, &["info", "vm"]);
    assert_eq!(info["writer"]["host_id"], 2, "{info}");
    assert_eq!(info["writer"]["here"], true, "{info}");
    assert_eq!(c.metric(1, "parallax_cluster_disks_given_total"), 1.0);
    assert_eq!(c.metric(2, "parallax_cluster_disks_claimed_total"), 1.0);
    assert_eq!(c.metric(2, "parallax_cluster_disks_given_total"), 0.0);
    assert_eq!(c.metric(2, "parallax_cluster_may_write"), 1.0);

    // Host 1's client: its later writes are refused.
    writeln!(stdin, "write -P 0x44 12k 4k").unwrap();
    finish_interactive(client, stdin, stdout, &mut said);
    assert!(
        said.contains("write failed"),
        "host 1's client wrote after its disk went to host 2: {said}"
    );
    let r = qemu_io(
        &c.uri(2, "vm"),
        &[
            "read -P 0x41 0 4k".into(),
            "read -P 0x42 4k 4k".into(),
            "read -P 0x43 8k 4k".into(),
            "read -P 0 12k 4k".into(),
        ],
    );
    assert!(
        r.status.success(),
        "reading vm through host 2: {}",
        text(&r)
    );
    let log = std::fs::read_to_string(c.dir.path().join("serve1.log")).unwrap();
    assert!(
        log.contains("gave the disk to the appliance that asked for it"),
        "{log}"
    );

    // A hand-off to a host that is not there is refused; one in progress
    // (asked through the API, which does not make the target open it) is
    // shown until the target's client takes the disk.
    let typo = c.px(2, &["handoff", "vm", "--to", "9"]);
    assert!(
        !typo.status.success() && text(&typo).contains("host 9 is not in the cluster"),
        "{}",
        text(&typo)
    );
    let posted = api_post(&c.control(2), "/v1/disks/vm/handoff", r#"{"to": 1}"#);
    assert!(posted.starts_with("200"), "{posted}");
    let hosts = c.json(1, &["hosts"]);
    assert_eq!(hosts[1]["handing_off"][0]["disk"], "vm", "{hosts}");
    assert_eq!(hosts[1]["handing_off"][0]["to"], 1, "{hosts}");
    let info = c.json(1, &["info", "vm"]);
    assert_eq!(info["writer"]["handing_off_to"], 1, "{info}");
    let r = qemu_io(&c.uri(1, "vm"), &["write -P 0x45 12k 4k".into()]);
    assert!(r.status.success(), "{}", text(&r));
    let hosts = c.json(1, &["hosts"]);
    assert_eq!(hosts[1]["handing_off"], serde_json::json!([]), "{hosts}");
    assert_eq!(hosts[0]["writing"][0]["disk"], "vm", "{hosts}");
}

/// POSTs `body` to `path` on an appliance's control socket; returns the
/// status code and the answer.
fn api_post(control: &std::path::Path, path: &str, body: &str) -> String {
    let script = "import http.client, socket, sys\n\
        class C(http.client.HTTPConnection):\n\
        \x20   def connect(self):\n\
        \x20       self.sock = socket.socket(socket.AF_UNIX)\n\
        \x20       self.sock.connect(sys.argv[1])\n\
        c = C('localhost')\n\
        c.request('POST', sys.argv[2], body=sys.argv[3], headers={'Content-Type': 'application/json'})\n\
        r = c.getresponse()\n\
        print(r.status, r.read().decode())\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(control)
        .args([path, body])
        .output()
        .unwrap();
    text(&out)
}

/// A QEMU machine monitor (QMP) on a Unix socket.
struct Qmp {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    /// Connects (waiting for QEMU to listen) and leaves capabilities
    /// negotiation.
    fn connect(path: &std::path::Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "QMP {}: {e}", path.display());
                    thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let mut greeting = String::new();
        qmp.reader.read_line(&mut greeting).unwrap();
        assert!(greeting.contains("QMP"), "{greeting}");
        qmp.execute(serde_json::json!({"execute": "qmp_capabilities"}));
        qmp
    }

    /// Runs a command; returns its `return` (events on the way are skipped).
    fn execute(&mut self, command: Value) -> Value {
        writeln!(self.writer, "{command}").unwrap();
        loop {
            let mut line = String::new();
            assert!(self.reader.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: Value = serde_json::from_str(&line).unwrap();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "{command}: {v}");
        }
    }
}

/// The `done N` lines a guest printed on its serial console.
fn records_done(serial: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("done ")?.parse().ok())
        .collect()
}

/// Waits until the guest printed `done N` for some N ≥ `n`.
fn wait_for_record(serial: &std::path::Path, n: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while records_done(serial).last().is_none_or(|&last| last < n) {
        assert!(
            Instant::now() < deadline,
            "{what}: no record {n}: {}",
            std::fs::read_to_string(serial).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// QEMU live migration between two appliances: a TCG guest runs the
/// program of a clone of a gold image through host 1 (numbered records,
/// each written with fsync and then announced on the serial console),
/// is migrated to a QEMU whose drive goes through host 2 (started with
/// the source: its reads at start do not take the disk), and writes on;
/// host 2 gets the disk on the guest's first write after the switch-over
/// (host 1's client, the source QEMU, flushed and went quiet). At the end
/// every record the guest announced is on the disk, read through host 3.
#[test]
fn a_vm_migrates_between_appliances_with_its_disk() {
    if !have("etcd", "--version")
        || !have("qemu-io", "--version")
        || !have("qemu-system-x86_64", "--version")
    {
        return;
    }
    let guest = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/guest.sh");
    let built = Command::new("bash")
        .arg(script)
        .arg(&guest)
        .output()
        .unwrap();
    assert!(built.status.success(), "scripts/guest.sh: {}", text(&built));

    let c = Cluster::claiming(3, "3s", "30s");
    // The gold image: the guest's program in its first 4 KiB.
    let program = "echo \"program: writer\"\n\
        i=0\n\
        while true; do\n\
        printf 'record %08d\\n' $i | dd of=/dev/vda bs=4096 seek=$((16+i)) conv=sync,notrunc,fsync 2>/dev/null || { echo \"write $i failed\"; break; }\n\
        echo \"done $i\"\n\
        i=$((i+1))\n\
        done\n";
    let d = c.dir.path();
    std::fs::write(d.join("program.sh"), program).unwrap();
    c.ok(1, &["create", "gold", "--size", "64M"]);
    let len = program.len();
    let w = qemu_io(
        &c.uri(1, "gold"),
        &[format!(
            "write -s {} 0 {len}",
            d.join("program.sh").display()
        )],
    );
    assert!(w.status.success(), "{}", text(&w));
    c.ok(1, &["snapshot", "gold@v1"]);
    c.ok(1, &["clone", "gold@v1", "vm1"]);

    let qemu = |h: u64, name: &str, incoming: Option<&str>| {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "256", "-display", "none"])
            .args(["-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!(
                "file:{}",
                d.join(format!("{name}.serial")).display()
            ))
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                d.join(format!("{name}.qmp")).display()
            ))
            .arg("-kernel")
            .arg(guest.join("vmlinuz"))
            .arg("-initrd")
            .arg(guest.join("initrd.img"))
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,cache=none",
                c.uri(h, "vm1")
            ));
        if let Some(uri) = incoming {
            cmd.args(["-incoming", uri]);
        }
        let log = std::fs::File::create(d.join(format!("{name}.log"))).unwrap();
        Proc(Some(
            cmd.stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        ))
    };
    // The destination starts with the source, while the guest boots (its
    // disk quiet): it reads the first sector at start (the geometry
    // guess), which host 2 serves from the last commit without taking the
    // disk from host 1.
    let mut source = qemu(1, "source", None);
    let incoming = format!("unix:{}", d.join("migration.sock").display());
    let mut destination = qemu(2, "destination", Some(&incoming));
    wait_for_record(&d.join("source.serial"), 20, "the guest on host 1");
    let mut src_qmp = Qmp::connect(&d.join("source.qmp"));
    let mut dst_qmp = Qmp::connect(&d.join("destination.qmp"));
    assert_eq!(c.json(2, &["info", "vm1"])["writer"]["host_id"], 1);
    let started = Instant::now();
    src_qmp.execute(serde_json::json!({"execute": "migrate", "arguments": {"uri": incoming}}));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = src_qmp.execute(serde_json::json!({"execute": "query-migrate"}));
        match m["status"].as_str() {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => panic!("migration: {m}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "migration still running: {m}");
        thread::sleep(Duration::from_millis(100));
    }
    let migrated = started.elapsed();
    let status = dst_qmp.execute(serde_json::json!({"execute": "query-status"}));
    assert_eq!(status["status"], "running", "{status}");
    let before = records_done(&d.join("source.serial"));
    let last_on_source = *before.last().unwrap();

    // The guest writes on, through host 2.
    let after_switch = Instant::now();
    wait_for_record(
        &d.join("destination.serial"),
        last_on_source + 20,
        "the guest after migration",
    );
    let info = c.json(2, &["info", "vm1"]);
    assert_eq!(info["writer"]["host_id"], 2, "{info}");
    eprintln!(
        "migration took {migrated:?}; 20 more records through host 2 after {:?}",
        after_switch.elapsed()
    );
    destination.stop();
    source.stop();

    let serial = std::fs::read_to_string(d.join("destination.serial")).unwrap();
    assert!(!serial.contains("failed"), "{serial}");
    let mut done = before;
    done.extend(records_done(&d.join("destination.serial")));
    let last = *done.last().unwrap();
    assert_eq!(
        done,
        (0..=last).collect::<Vec<_>>(),
        "records announced out of order or twice"
    );

    // Every announced record, read through host 3 from a snapshot taken
    // on host 2.
    c.ok(2, &["snapshot", "vm1@end"]);
    let image = d.join("vm1.raw");
    let got = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(c.uri(3, "vm1@end"))
        .arg(&image)
        .output()
        .unwrap();
    assert!(got.status.success(), "{}", text(&got));
    let bytes = std::fs::read(&image).unwrap();
    for i in 0..=last {
        let at = ((16 + i) * 4096) as usize;
        let want = format!("record {i:08}\n");
        assert_eq!(
            &bytes[at..at + want.len()],
            want.as_bytes(),
            "record {i} of {last} is not on the disk"
        );
    }
    let log1 = std::fs::read_to_string(d.join("serve1.log")).unwrap();
    assert!(
        log1.contains("gave the disk to the appliance that asked for it"),
        "{log1}"
    );
}

/// The dangerous partition: an appliance loses etcd but still reaches the
/// pool (a SAN on its own fabric), while a client of it writes on; and the
/// same with the pool partitioned too. A write log shows that no write of
/// the partitioned appliance reaches the pool after the new writer's
/// first write: the client rewrites a ring of 256 blocks (committed
/// before, so rewritten in place, in blocks the new writer's tree holds
/// too) again and again, a new pattern byte each round, through host 1
/// over a connection made before the cut and kept through the heal; host 2
/// takes the disk over (`--takeover`) and writes its own byte over the
/// whole ring at once; 2 s later the partition heals; once host 1 is back,
/// every block of the ring still holds host 2's byte. `PARTITION_RUNS` runs each case that many
/// times (1 by default; by hand, many).
#[test]
fn a_partitioned_appliance_writes_nothing_after_the_new_writer() {
    if !have("etcd", "--version") || !have("qemu-nbd", "--version") || !have("qemu-io", "--version")
    {
        return;
    }
    let runs: usize = std::env::var("PARTITION_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut c = NetCluster::start(2, &["--claim-wait", "0s"]);
    let ring = 256u64;
    // The client's commands: rounds of writes over the ring, 1 ms apart.
    let script = c.dir.path().join("ring.qio");
    let mut commands = String::new();
    for k in 0..60 * ring {
        let pattern = 1 + (k / ring) % 200;
        commands.push_str(&format!(
            "write -P {pattern} {} 4k\nsleep 1\n",
            (k % ring) * 4096
        ));
    }
    std::fs::write(&script, commands).unwrap();
    let mut takeovers = Vec::new();
    for run in 0..runs {
        for pool_cut in [false, true] {
            let disk = format!("ring{run}{}", if pool_cut { "p" } else { "" });
            c.ok(1, &["create", &disk, "--size", "16M"]);
            // The ring committed first: the client then overwrites blocks
            // in place, the blocks the new writer's tree holds too (a late
            // write could only be seen there).
            let w = c.qio(1, 1, &disk, &format!("write -P 0xaa 0 {}", ring * 4096));
            assert!(w.status.success(), "{}", text(&w));
            let mut client = {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &c.ns("h1"), "qemu-io"])
                    .args(["-f", "raw", "-t", "writeback"])
                    .arg(format!("nbd://{}/{disk}", c.addr(1)))
                    .stdin(std::fs::File::open(&script).unwrap());
                c.spawn(cmd, &format!("{disk}.client.log"))
            };
            thread::sleep(Duration::from_millis(1500));
            c.cut(1, pool_cut);
            let cut = Instant::now();
            // The new writer's first write: the whole ring.
            loop {
                let w = c.qio(2, 2, &disk, &format!("write -P 0xee 0 {}", ring * 4096));
                if w.status.success() {
                    break;
                }
                assert!(
                    cut.elapsed() < Duration::from_secs(30),
                    "{disk}: host 2 never got it: {}\n{}",
                    text(&w),
                    c.log("serve2.log")
                );
                thread::sleep(Duration::from_millis(100));
            }
            takeovers.push(cut.elapsed());
            // Host 1's client keeps writing, partitioned for 2 s more, then
            // through the heal and after.
            thread::sleep(Duration::from_secs(2));
            c.heal(1, pool_cut);
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.json(2, &["hosts"]).as_array().map(Vec::len) != Some(2) {
                assert!(
                    Instant::now() < deadline,
                    "host 1 did not register again:\n{}",
                    c.log("serve1.log")
                );
                thread::sleep(Duration::from_millis(200));
            }
            thread::sleep(Duration::from_secs(3));
            client.stop();
            let said = c.log(&format!("{disk}.client.log"));
            let (wrote, failed) = (
                said.matches("wrote 4096").count(),
                said.matches("failed").count(),
            );
            assert!(
                wrote > 0 && failed > 0,
                "{disk}: the client wrote {wrote} and failed {failed}: {said}"
            );
            let r = c.qio(2, 2, &disk, &format!("read -P 0xee 0 {}", ring * 4096));
            assert!(
                r.status.success(),
                "{disk}: a write of the partitioned appliance landed after the new writer's: {}",
                text(&r)
            );
            eprintln!(
                "{disk}: host 2 wrote {:?} after the cut; the client had {wrote} writes acknowledged, {failed} refused",
                takeovers.last().unwrap()
            );
            // An NBD-pool appliance stays fenced after a lost lease: restart it.
            c.hosts[0].kill9();
            c.hosts[0] = c.start_host(1);
        }
    }
    takeovers.sort();
    eprintln!(
        "{} partitions, 0 late writes; host 2's first write after the cut: min {:?}, max {:?}",
        takeovers.len(),
        takeovers[0],
        takeovers[takeovers.len() - 1]
    );
    let report = c.json(2, &["check"]);
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
}

/// `qemu-io` commands writing (or, with `read`, checking) pattern `p` into
/// the first `blocks` 4 KiB blocks, with a flush after the writes.
fn pattern_cmds(verb: &str, p: u8, blocks: u64) -> Vec<String> {
    let mut cmds: Vec<String> = (0..blocks)
        .map(|i| format!("{verb} -P {p} {} 4k", i * 4096))
        .collect();
    if verb == "write" {
        cmds.push("flush".into());
    }
    cmds
}

/// Checks with `qemu-io` that the first `blocks` blocks at `uri` hold
/// pattern `p`.
fn reads_pattern(uri: &str, p: u8, blocks: u64, what: &str) {
    let r = qemu_io(uri, &pattern_cmds("read", p, blocks));
    assert!(
        r.status.success() && !text(&r).contains("verification failed"),
        "{what}: {}",
        text(&r)
    );
}

/// A write-back disk in cluster mode (docs/CACHE.md §9.8): handed off, the
/// new holder reads every flushed write; its holder killed, no other host
/// takes it (its writes may be only in that host's log) until the host is
/// back and drained it, or the operator gave the log up.
#[test]
fn a_write_back_disk_is_handed_off_and_taken_over_only_with_its_log() {
    if !have("etcd", "--version") || !have("qemu-io", "--version") {
        return;
    }
    const BLOCKS: u64 = 256;
    let mut c = Cluster::with(2, "3s");
    c.ok(1, &["create", "wb", "--size", "16M"]);
    c.ok(1, &["cache-policy", "wb", "write-back"]);
    let w = qemu_io(&c.uri(1, "wb"), &pattern_cmds("write", 1, BLOCKS));
    assert!(w.status.success(), "{}", text(&w));
    assert!(c.metric(1, "parallax_write_log_appended_bytes_total") >= (BLOCKS * 4096) as f64);
    assert_eq!(c.metric(1, "parallax_write_log_logging"), 1.0);

    // Handed off: host 1 drains its log first; host 2 reads everything.
    c.ok(1, &["handoff", "wb", "--to", "2"]);
    reads_pattern(&c.uri(2, "wb"), 1, BLOCKS, "host 2 after the hand-off");

    // Host 2 writes round 2 (write-back there too: the policy is the
    // disk's) and is killed.
    let w = qemu_io(&c.uri(2, "wb"), &pattern_cmds("write", 2, BLOCKS));
    assert!(w.status.success(), "{}", text(&w));
    c.hosts[1].kill9();
    let refused = c.px(1, &["takeover", "wb"]);
    assert!(
        !refused.status.success() && text(&refused).contains("write-back log"),
        "host 1 took over a disk whose writes may be only in host 2's log: {}",
        text(&refused)
    );

    // Host 2 comes back with its cache: its log replays, it takes its own
    // disk back, and every flushed write is there.
    c.hosts[1] = c.start(2);
    let t = c.json(2, &["takeover", "wb"]);
    assert_eq!(t["taken_over"], true, "{t}");
    reads_pattern(&c.uri(2, "wb"), 2, BLOCKS, "host 2 after its restart");

    // Killed again, its cache lost: the operator gives its log up (refused
    // while host 2's lease lives), then host 1 takes the disk over from
    // the pool: every block is of round 2 or 3 (what reached the pool),
    // and the store checks clean.
    let w = qemu_io(&c.uri(2, "wb"), &pattern_cmds("write", 3, BLOCKS));
    assert!(w.status.success(), "{}", text(&w));
    c.hosts[1].kill9();
    std::fs::remove_file(c.dir.path().join("cache2.bin")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let f = c.px(1, &["forget-write-log", "--host", "2"]);
        if f.status.success() {
            break;
        }
        assert!(
            text(&f).contains("is running") && Instant::now() < deadline,
            "{}",
            text(&f)
        );
        thread::sleep(Duration::from_millis(250));
    }
    let t = c.json(1, &["takeover", "wb"]);
    assert_eq!(t["taken_over"], true, "{t}");
    let uri = c.uri(1, "wb");
    for i in 0..BLOCKS {
        let two = qemu_io(&uri, &[format!("read -P 2 {} 4k", i * 4096)]);
        if text(&two).contains("verification failed") {
            let three = qemu_io(&uri, &[format!("read -P 3 {} 4k", i * 4096)]);
            assert!(
                !text(&three).contains("verification failed"),
                "block {i} is neither of round 2 nor 3: {}",
                text(&three)
            );
        }
    }
    let check = c.json(1, &["check"]);
    assert_eq!(check["clean"], true, "{check}");
    // Host 2, started again with a new cache, serves again.
    c.hosts[1] = c.start(2);
    assert_eq!(c.hosts[0].stop(), Some(0));
    assert_eq!(c.hosts[1].stop(), Some(0));
    c.etcd.stop();
}
