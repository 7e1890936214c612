//! Cluster mode with real processes: a real etcd on 127.0.0.1, three
//! `parallax serve --etcd` appliances sharing one pool file, qemu-io as
//! the client. Every process is started by this test and stopped by its
//! PID; everything lives in a temporary directory.

use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
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
    etcd: Proc,
    hosts: Vec<Proc>,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let etcd = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path().join("etcd"))
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer}"),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd");
        let pool = dir.path().join("pool.px");
        let mut c = Cluster {
            dir,
            pool,
            etcd_url,
            etcd: Proc(Some(etcd)),
            hosts: Vec::new(),
        };
        c.wait_etcd();
        let init = c.px(1, &["init", "--size", "4G"]);
        assert!(init.status.success(), "init: {}", text(&init));
        for h in 1..=3 {
            let p = c.start(h);
            c.hosts.push(p);
        }
        c
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

    /// Starts appliance `h` and waits until it answers.
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
                    "3s",
                    "--etcd",
                    &self.etcd_url,
                ],
            )
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

    // kill -9 host 3: it comes back once its lease expired, and its
    // flushed writes (qemu-io flushes on exit) are there.
    c.hosts[2].kill9();
    let started = Instant::now();
    let p = c.start(3);
    c.hosts[2] = p;
    eprintln!("host 3 back after {:?}", started.elapsed());
    let r = qemu_io(&c.uri(3, "h3d1"), &["read -P 0x31 0 2M".into()]);
    assert!(
        r.status.success(),
        "host 3's write after kill -9: {}\n{}",
        text(&r),
        std::fs::read_to_string(c.dir.path().join("serve3.log")).unwrap_or_default()
    );

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
            let p = 0x10 * h as u8 + k as u8;
            assert!(
                data[..2 << 20].iter().all(|&b| b == p),
                "h{h}d{k} lost its write"
            );
        }
    }
    c.etcd.stop();
    let _ = Path::new(&c.etcd_url);
}
