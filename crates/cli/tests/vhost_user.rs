//! vhost-user-blk with a real guest: `parallax serve --vhost-user DIR` and
//! a TCG QEMU guest (Debian's kernel, a busybox initramfs: `scripts/guest.sh`)
//! whose program comes from its disk's first 4 KiB.
//!
//! The guest boots from a clone of a gold image over vhost-user-blk with 2
//! queues; it checks its queues and serial (GET_ID), copies a payload the
//! host put in the gold image to another place, drops its caches and reads
//! it back, discards a range (DISCARD) and zeroes another (util-linux's
//! `blkdiscard -z`: WRITE_ZEROES). While it runs, the disk refuses NBD
//! clients (one writer), rollback and deletion, and takes a snapshot that
//! a clone then shows holding the guest's copy. Afterwards the host reads the clone through NBD:
//! the copy is there, the discarded and zeroed ranges read as zeros, and
//! the gold image did not change.
//!
//! Needs `qemu-system-x86_64`, `qemu-io`, busybox-static and Debian's
//! kernel package (`scripts/install-deps.sh --vm`, `scripts/guest.sh`);
//! without them the test fails unless `PARALLAX_SKIP_QEMU_TESTS=1`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found && std::env::var("PARALLAX_SKIP_QEMU_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped: {tool} is not installed");
        return false;
    }
    assert!(found, "{tool} is missing: run scripts/install-deps.sh --vm");
    true
}

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn store(&self) -> PathBuf {
        self.dir.path().join("store.px")
    }

    fn nbd(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.dir.path().join("nbd.sock").display()
        )
    }

    fn parallax(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_parallax"))
            .arg("--store")
            .arg(self.store())
            .args(args)
            .env_remove("PARALLAX_STORE")
            .env_remove("PARALLAX_CONTROL")
            .output()
            .expect("run parallax")
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.parallax(args);
        assert!(
            out.status.success(),
            "parallax {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// Creates disk `name` of `size` with the guest's `program` in its
    /// first 4 KiB (written over NBD).
    fn create_with_program(&self, name: &str, size: &str, program: &str) {
        assert!(program.len() <= 4096);
        let file = self.dir.path().join("program.sh");
        fs::write(&file, program).unwrap();
        self.ok(&["create", name, "--size", size]);
        qemu_io(
            &self.nbd(name),
            &[format!("write -s {} 0 {}", file.display(), program.len())],
        );
    }

    #[track_caller]
    fn assert_clean(&self) {
        let check = self.ok(&["check", "--json"]);
        assert!(check.contains("\"clean\": true"), "{check}");
    }
}

impl Drop for Daemon {
    /// SIGTERM, then SIGKILL after 10 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .arg(self.child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.wait();
    }
}

fn start_daemon() -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store.px");
    let init = Command::new(env!("CARGO_BIN_EXE_parallax"))
        .args(["--store", store.to_str().unwrap(), "init", "--size", "1G"])
        .output()
        .unwrap();
    assert!(init.status.success());
    let log = fs::File::create(dir.path().join("serve.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_parallax"))
        .arg("--store")
        .arg(&store)
        .args(["serve", "--nbd-listen", "none", "--nbd-socket"])
        .arg(dir.path().join("nbd.sock"))
        .arg("--vhost-user")
        .arg(dir.path().join("vhost"))
        .env_remove("PARALLAX_STORE")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn parallax serve");
    let d = Daemon { child, dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.parallax(&["status"]).status.success() {
        assert!(Instant::now() < deadline, "daemon not ready:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.arg(uri).output().expect("run qemu-io");
    assert!(
        out.status.success(),
        "qemu-io {cmds:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads `len` bytes at `offset` of `uri` (through a temporary file).
fn read_nbd(uri: &str, dir: &Path, offset: u64, len: u64) -> Vec<u8> {
    let file = dir.join("read.bin");
    let _ = fs::remove_file(&file);
    let out = Command::new("nbdcopy")
        .args([uri, file.to_str().unwrap()])
        .output()
        .expect("run nbdcopy");
    assert!(
        out.status.success(),
        "nbdcopy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = fs::read(&file).unwrap();
    all[offset as usize..(offset + len) as usize].to_vec()
}

/// A TCG guest on vhost-user socket `socket` with 2 queues, its console
/// in `log`.
fn start_guest(guest: &Path, socket: &Path, log: &Path) -> Child {
    Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-numa",
            "node,memdev=mem",
        ])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initrd.img"))
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", socket.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=c0,num-queues=2"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu")
}

/// The guest kit of `scripts/guest.sh`, built once per target directory.
fn guest_kit() -> PathBuf {
    let guest = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest");
    let built = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/guest.sh"
        ))
        .arg(&guest)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "scripts/guest.sh: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    guest
}

/// Whether `[offset, offset + len)` of `uri` lies in one `hole` extent of
/// `nbdinfo --map`.
fn is_hole(uri: &str, offset: u64, len: u64) -> bool {
    let out = Command::new("nbdinfo")
        .args(["--map", uri])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (Some(start), Some(length)) = (
            f.first().and_then(|s| s.parse::<u64>().ok()),
            f.get(1).and_then(|s| s.parse::<u64>().ok()),
        ) else {
            return false;
        };
        l.contains("hole") && start <= offset && offset + len <= start + length
    })
}

/// Equal, or a message naming the first differing byte.
#[track_caller]
fn same(got: &[u8], want: &[u8], what: &str) {
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: byte {at} is {:#x}, expected {:#x}",
            got[at], want[at]
        );
    }
    assert_eq!(got.len(), want.len(), "{what}: length");
}

/// Waits for QEMU to exit (it powers off); kills it and fails, with
/// `describe()` (its console), after `timeout`.
#[track_caller]
fn wait_exit(
    qemu: &mut Child,
    timeout: Duration,
    describe: &dyn Fn() -> String,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = qemu.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
            let _ = qemu.wait();
            panic!("the guest did not power off:\n{}", describe());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_guest_boots_from_a_clone_over_vhost_user_with_two_queues() {
    if !have("qemu-system-x86_64") || !have("qemu-io") || !have("nbdcopy") {
        return;
    }
    let guest = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest");
    let built = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/guest.sh"
        ))
        .arg(&guest)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "scripts/guest.sh: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let d = start_daemon();
    let dir = d.dir.path().to_path_buf();

    // The gold image: the program, and a 1 MiB payload at 8 MiB.
    let program = "echo \"queues: $(ls /sys/block/vda/mq | wc -l)\"\n\
        echo \"serial: $(cat /sys/block/vda/serial)\"\n\
        dd if=/dev/vda of=/dev/vda bs=65536 skip=128 seek=32 count=16 conv=fsync 2>/dev/null\n\
        echo 3 > /proc/sys/vm/drop_caches\n\
        dd if=/dev/vda of=/tmp/a bs=65536 skip=128 count=16 2>/dev/null\n\
        dd if=/dev/vda of=/tmp/b bs=65536 skip=32 count=16 2>/dev/null\n\
        cmp /tmp/a /tmp/b && echo \"copy: read back\"\n\
        blkdiscard -o 12582912 -l 1048576 /dev/vda && echo \"discard: ok\"\n\
        LD_LIBRARY_PATH=/lib/x86_64-linux-gnu blkdiscard-util -z -o 16777216 -l 1048576 /dev/vda && echo \"zeroes: ok\"\n\
        sync\n\
        echo \"holding\"\n\
        sleep 4\n\
        echo \"done\"\n";
    assert!(program.len() <= 4096);
    fs::write(dir.join("program.sh"), program).unwrap();
    let payload: Vec<u8> = (0..MIB).map(|i| (i * 7 + i / 4096) as u8).collect();
    fs::write(dir.join("payload.bin"), &payload).unwrap();
    let ones = vec![0x5au8; MIB as usize];
    fs::write(dir.join("ones.bin"), &ones).unwrap();
    d.ok(&["create", "gold", "--size", "64M"]);
    qemu_io(
        &d.nbd("gold"),
        &[
            format!(
                "write -s {} 0 {}",
                dir.join("program.sh").display(),
                program.len()
            ),
            format!(
                "write -s {} {} {MIB}",
                dir.join("payload.bin").display(),
                8 * MIB
            ),
            // What the guest discards and zeroes holds data first.
            format!(
                "write -s {} {} {MIB}",
                dir.join("ones.bin").display(),
                12 * MIB
            ),
            format!(
                "write -s {} {} {MIB}",
                dir.join("ones.bin").display(),
                16 * MIB
            ),
        ],
    );
    d.ok(&["snapshot", "gold@v1"]);
    d.ok(&["clone", "gold@v1", "vm"]);
    let socket = dir.join("vhost").join("vm.sock");
    wait_for(
        "the clone's vhost-user socket",
        Duration::from_secs(10),
        || socket.exists(),
    );

    let mut qemu = start_guest(&guest, &socket, &dir.join("vm.log"));
    let console = || fs::read_to_string(dir.join("vm.log")).unwrap_or_default();
    wait_for("the guest's program", Duration::from_secs(120), || {
        console().contains("holding")
    });
    // One writer: NBD clients are refused while the guest has the disk.
    let refused = Command::new("nbdinfo").arg(d.nbd("vm")).output().unwrap();
    assert!(
        !refused.status.success(),
        "NBD served a disk a guest has over vhost-user"
    );
    // (The reason goes in the option reply, which nbdinfo does not show;
    // the daemon logs it.)
    assert!(
        d.log().contains("attached over vhost-user"),
        "{}\n{}",
        String::from_utf8_lossy(&refused.stderr),
        d.log()
    );
    let status = d.ok(&["status", "--json"]);
    assert!(status.contains("vhost-user"), "{status}");
    // Snapshots and clones go on while the guest has the disk; rollback
    // and deletion are refused, as with NBD clients.
    d.ok(&["snapshot", "vm@during"]);
    d.ok(&["clone", "vm@during", "copy"]);
    assert!(
        !d.parallax(&["rollback", "vm@during"]).status.success(),
        "rollback under a guest"
    );
    assert!(
        !d.parallax(&["delete", "vm"]).status.success(),
        "delete under a guest"
    );
    let exit = wait_exit(&mut qemu, Duration::from_secs(60), &console);
    let out = console();
    assert!(exit.success(), "qemu: {exit}\n{out}");
    for line in [
        "queues: 2",
        "serial: parallax-",
        "copy: read back",
        "discard: ok",
        "zeroes: ok",
        "done",
    ] {
        assert!(
            out.contains(line),
            "{line:?} missing from the console:\n{out}"
        );
    }

    // From the host, through NBD once the guest is gone.
    wait_for(
        "the vhost-user connection to end",
        Duration::from_secs(10),
        || !d.ok(&["status", "--json"]).contains("vhost-user"),
    );
    let vm = d.nbd("vm");
    let zeros = vec![0u8; MIB as usize];
    same(
        &read_nbd(&vm, &dir, 2 * MIB, MIB),
        &payload,
        "the guest's copy",
    );
    same(
        &read_nbd(&vm, &dir, 12 * MIB, MIB),
        &zeros,
        "the discarded range",
    );
    same(
        &read_nbd(&vm, &dir, 16 * MIB, MIB),
        &zeros,
        "the zeroed range",
    );
    // The snapshot taken while the guest ran holds its flushed copy.
    same(
        &read_nbd(&d.nbd("copy"), &dir, 2 * MIB, MIB),
        &payload,
        "the clone of vm@during",
    );
    // Zeroed with WRITE_ZEROES, not written: the blocks are unmapped.
    assert!(is_hole(&vm, 16 * MIB, MIB), "the zeroed range holds blocks");
    let gold = d.nbd("gold");
    same(
        &read_nbd(&gold, &dir, 2 * MIB, MIB),
        &zeros,
        "the gold image",
    );
    same(
        &read_nbd(&gold, &dir, 12 * MIB, MIB),
        &ones,
        "the gold image",
    );
    d.assert_clean();
}

/// QEMU killed (SIGKILL) while its guest writes, then started again on the
/// same socket: the appliance takes the new connection, the second boot
/// sees what the first flushed, and the store is clean (mutation tried: a
/// socket that serves one connection only -> the second QEMU cannot
/// connect).
#[test]
fn qemu_killed_mid_write_and_started_again() {
    if !have("qemu-system-x86_64") || !have("qemu-io") {
        return;
    }
    let guest = guest_kit();
    let d = start_daemon();
    let dir = d.dir.path().to_path_buf();
    // First boot: mark block 64, then write blocks for ever. Second boot:
    // the mark is there.
    let program = "if dd if=/dev/vda bs=4096 skip=64 count=1 2>/dev/null | grep -q booted; then\n\
        echo \"second boot: the mark is there\"\n\
        else\n\
        echo booted | dd of=/dev/vda bs=4096 seek=64 conv=sync,fsync 2>/dev/null\n\
        echo \"first boot: writing\"\n\
        i=0\n\
        while true; do dd if=/dev/urandom of=/dev/vda bs=65536 seek=$((16 + i % 64)) count=1 conv=fsync 2>/dev/null; i=$((i+1)); done\n\
        fi\n";
    d.create_with_program("vm", "32M", program);
    let socket = dir.join("vhost").join("vm.sock");
    wait_for("the vhost-user socket", Duration::from_secs(10), || {
        socket.exists()
    });
    let mut first = start_guest(&guest, &socket, &dir.join("first.log"));
    let console = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
    wait_for("the first boot's writes", Duration::from_secs(120), || {
        console("first.log").contains("first boot: writing")
    });
    std::thread::sleep(Duration::from_millis(500));
    first.kill().unwrap();
    first.wait().unwrap();
    wait_for("the connection to end", Duration::from_secs(10), || {
        !d.ok(&["status", "--json"]).contains("vhost-user")
    });
    let mut second = start_guest(&guest, &socket, &dir.join("second.log"));
    let exit = wait_exit(&mut second, Duration::from_secs(120), &|| {
        format!("{}\n{}", console("second.log"), d.log())
    });
    assert!(exit.success(), "qemu: {exit}");
    assert!(
        console("second.log").contains("second boot: the mark is there"),
        "{}\n{}",
        console("second.log"),
        d.log()
    );
    d.assert_clean();
}

/// `attach NAME@SNAP --vhost-user SOCKET` serves a snapshot read-only at a
/// socket of one's choice: the guest sees a read-only disk and its write
/// fails; `detach` removes the socket. A second attach on the same socket
/// is refused (mutation tried: the RO feature not offered -> the guest's
/// disk is writable and the test fails).
#[test]
fn attach_serves_a_snapshot_read_only() {
    if !have("qemu-system-x86_64") || !have("qemu-io") {
        return;
    }
    let guest = guest_kit();
    let d = start_daemon();
    let dir = d.dir.path().to_path_buf();
    let program = "echo \"ro: $(cat /sys/block/vda/ro)\"\n\
        if echo x | dd of=/dev/vda bs=4096 seek=8 conv=sync,fsync 2>/dev/null; then echo \"write: accepted\"; else echo \"write: refused\"; fi\n";
    d.create_with_program("gold", "16M", program);
    d.ok(&["snapshot", "gold@v1"]);
    let socket = dir.join("snap.sock");
    d.ok(&[
        "attach",
        "gold@v1",
        "--vhost-user",
        socket.to_str().unwrap(),
    ]);
    assert!(socket.exists());
    let again = d.parallax(&["attach", "gold", "--vhost-user", socket.to_str().unwrap()]);
    assert!(!again.status.success(), "a second attach on one socket");
    let mut qemu = start_guest(&guest, &socket, &dir.join("vm.log"));
    let log = dir.join("vm.log");
    wait_exit(&mut qemu, Duration::from_secs(120), &|| {
        fs::read_to_string(&log).unwrap_or_default()
    });
    let console = fs::read_to_string(&log).unwrap();
    assert!(console.contains("ro: 1"), "{console}");
    assert!(console.contains("write: refused"), "{console}");
    d.ok(&["detach", "--vhost-user", socket.to_str().unwrap()]);
    assert!(!socket.exists(), "detach left the socket");
    let gone = d.parallax(&["detach", "--vhost-user", socket.to_str().unwrap()]);
    assert!(!gone.status.success());
}

/// The daemon stops on SIGTERM even when someone removed its vhost-user
/// sockets' files (nothing can connect to wake their `accept`: shutting the
/// listening socket down does; mutation tried: without that shutdown, the
/// daemon hangs and this test fails).
#[test]
fn the_daemon_stops_when_its_socket_files_are_gone() {
    let mut d = start_daemon();
    d.ok(&["create", "a", "--size", "16M"]);
    let dir = d.dir.path().join("vhost");
    wait_for("the socket", Duration::from_secs(10), || {
        dir.join("a.sock").exists()
    });
    fs::remove_dir_all(&dir).unwrap();
    let pid = d.child.id().to_string();
    assert!(Command::new("kill").arg(&pid).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the daemon did not stop:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
