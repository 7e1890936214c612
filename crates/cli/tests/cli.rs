//! End-to-end tests of the `parallax` binary: every verb, its text and JSON
//! output, exit codes and error messages, and image round trips checked
//! against the real `qemu-img`.
//!
//! The qemu tests need `qemu-img` and `qemu-io` on `PATH`; without them
//! they fail, unless `PARALLAX_SKIP_QEMU_TESTS=1` is set, in which case they
//! are skipped with a message.
//!
//! The CLI has no verb that writes into an existing disk, so the tests that
//! need to change a disk's content after a clone or a snapshot write through
//! `parallax-engine` directly, between two CLI commands.

use parallax_device::{FileDevice, OpenMode};
use parallax_engine::{OpenOptions, Store};
use serde_json::Value;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

/// A temporary directory with a store path in it.
struct Env {
    dir: tempfile::TempDir,
    store: PathBuf,
}

impl Env {
    /// A directory with no store yet.
    fn empty() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store.px");
        Env { dir, store }
    }

    /// A directory with an initialised 1 GiB store.
    fn new() -> Env {
        let env = Env::empty();
        env.ok(&["init", "--size", "1G"]);
        env
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_parallax"))
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("PARALLAX_STORE")
            .output()
            .expect("cannot run parallax")
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "parallax {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("stdout is UTF-8")
    }

    /// Runs a command with `--json` and parses its output.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.ok(&all);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{text}"))
    }

    /// Runs a command that must fail with `code`; returns its stderr.
    fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "parallax {args:?}: stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).expect("stderr is UTF-8")
    }

    /// Runs a command that must fail with exit code 1 and exactly one line
    /// `parallax: MESSAGE` on stderr; returns MESSAGE.
    fn error(&self, args: &[&str]) -> String {
        let stderr = self.fails(args, 1);
        assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
        stderr
            .strip_prefix("parallax: ")
            .unwrap_or_else(|| panic!("no prefix: {stderr:?}"))
            .trim_end()
            .to_string()
    }

    /// Opens the store with the engine (no CLI command may be running).
    fn engine(&self) -> Store {
        let dev = FileDevice::open(&self.store, OpenMode::default()).expect("open store file");
        Store::open(Arc::new(dev), &OpenOptions::default()).expect("open store")
    }

    /// Writes `data` at `offset` of `disk` and flushes.
    fn write_disk(&self, disk: &str, data: &[u8], offset: u64) {
        let store = self.engine();
        let vdi = store.open_vdi(disk).expect("open disk");
        vdi.write(data, offset).expect("write");
        vdi.flush().expect("flush");
        // Make the frees of that commit durable, as the CLI does.
        vdi.flush().expect("flush");
    }

    fn assert_clean(&self) {
        let report = self.json(&["check"]);
        assert_eq!(report["clean"], true, "{report}");
        assert_eq!(
            report["errors"].as_array().map(Vec::len),
            Some(0),
            "{report}"
        );
        assert_eq!(report["leaked_blocks"], 0, "{report}");
    }
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let f = fs::File::open("/dev/urandom").expect("/dev/urandom");
    f.read_exact_at(&mut buf, 0).expect("read /dev/urandom");
    buf
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .expect("array")
        .iter()
        .map(|d| d["name"].as_str().expect("name"))
        .collect()
}

#[test]
fn init_create_list_info() {
    let env = Env::new();
    assert!(env.store.exists());
    // The store file is sparse.
    let meta = fs::metadata(&env.store).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    assert!(meta.blocks() * 512 < 16 * MIB);

    assert_eq!(env.ok(&["create", "vm1", "--size", "20G"]), "");
    env.ok(&["create", "small", "--size", "1000"]);

    let list = env.ok(&["list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    assert!(lines[0].starts_with("NAME"));
    for header in ["SIZE", "ALLOCATED", "SNAPSHOTS", "ORIGIN"] {
        assert!(lines[0].contains(header), "{list}");
    }
    assert!(lines[1].starts_with("small "), "{list}");
    assert!(lines[1].contains("4.0 KiB"), "{list}");
    assert!(lines[2].starts_with("vm1 "), "{list}");
    assert!(lines[2].contains("20.0 GiB"), "{list}");

    let list = env.json(&["list"]);
    assert_eq!(names(&list), ["small", "vm1"]);
    let vm1 = &list[1];
    assert_eq!(vm1["size_bytes"], 20u64 << 30);
    assert_eq!(vm1["allocated_bytes"], 0);
    assert_eq!(vm1["snapshots"], 0);
    assert_eq!(vm1["origin"], Value::Null);
    let created = vm1["created"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(created).is_ok(), "{created}");
    assert_eq!(list[0]["size_bytes"], 4096);

    let info = env.ok(&["info", "vm1"]);
    assert!(info.contains("name:"), "{info}");
    assert!(info
        .lines()
        .any(|l| l.starts_with("size:") && l.contains("21474836480 bytes")));
    assert!(info
        .lines()
        .any(|l| l.starts_with("origin:") && l.ends_with('-')));
    let info = env.json(&["info", "vm1"]);
    assert_eq!(info["name"], "vm1");
    assert_eq!(info["size_bytes"], 20u64 << 30);
    assert!(info["id"].as_u64().is_some());

    // The global options may also come first.
    let out = Command::new(env!("CARGO_BIN_EXE_parallax"))
        .args(["--json", "list"])
        .env("PARALLAX_STORE", &env.store)
        .output()
        .unwrap();
    assert!(out.status.success());
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(names(&list), ["small", "vm1"]);
    env.assert_clean();
}

#[test]
fn snapshots_clones_rollback_and_delete() {
    let env = Env::new();
    env.ok(&["create", "base", "--size", "64M"]);
    env.write_disk("base", &[0x11; 8192], 0);

    assert_eq!(env.ok(&["snapshot", "base@gold"]), "base@gold\n");
    let auto = env.ok(&["snapshot", "base"]);
    let auto = auto
        .trim_end()
        .strip_prefix("base@")
        .expect("NAME@SNAP")
        .to_string();
    assert!(!auto.is_empty());

    let snaps = env.json(&["snapshots", "base"]);
    assert_eq!(names(&snaps), ["gold", auto.as_str()]);
    assert!(snaps[0]["id"].as_u64() < snaps[1]["id"].as_u64());
    assert_eq!(snaps[0]["size_bytes"], 64 * MIB);
    let table = env.ok(&["snapshots", "base"]);
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains("gold"), "{table}");

    let info = env.json(&["info", "base@gold"]);
    assert_eq!(info["disk"], "base");
    assert_eq!(info["name"], "gold");
    assert_eq!(info["allocated_bytes"], 8192);
    let text = env.ok(&["info", "base@gold"]);
    for key in ["disk:", "name:", "id:", "created:", "size:", "allocated:"] {
        assert!(
            text.lines().any(|l| l.starts_with(key)),
            "{key} missing: {text}"
        );
    }

    assert_eq!(env.ok(&["clone", "base@gold", "vm1"]), "");
    let list = env.json(&["list"]);
    assert_eq!(names(&list), ["base", "vm1"]);
    assert_eq!(list[0]["snapshots"], 2);
    assert_eq!(list[1]["origin"], "base@gold");
    assert_eq!(list[1]["allocated_bytes"], 8192);
    assert!(env.ok(&["list"]).contains("base@gold"));

    // Change base after the snapshot, then roll back.
    env.write_disk("base", &[0x22; 4096], 4096);
    let out = env.path("base.raw");
    env.ok(&["export", "base", out.to_str().unwrap()]);
    assert_eq!(fs::read(&out).unwrap()[4096..8192], [0x22; 4096]);
    env.ok(&["rollback", "base@gold"]);
    env.ok(&["export", "--force", "base", out.to_str().unwrap()]);
    let data = fs::read(&out).unwrap();
    assert_eq!(data.len() as u64, 64 * MIB);
    assert!(data[..8192].iter().all(|&b| b == 0x11));
    assert!(data[8192..].iter().all(|&b| b == 0));
    env.assert_clean();

    // Delete a snapshot, a clone and a disk in one go.
    assert_eq!(env.ok(&["delete", &format!("base@{auto}"), "vm1"]), "");
    assert_eq!(names(&env.json(&["snapshots", "base"])), ["gold"]);
    assert_eq!(names(&env.json(&["list"])), ["base"]);
    // A deleted snapshot's blocks come back at once: nothing for gc.
    let gc = env.json(&["gc"]);
    assert_eq!(gc["freed_bytes"], 0, "{gc}");
    assert!(env.ok(&["gc"]).starts_with("freed "));
    env.assert_clean();
    env.ok(&["delete", "base"]);
    assert_eq!(env.json(&["list"]), Value::Array(vec![]));
    let df = env.json(&["df"]);
    assert_eq!(df["used_bytes"], 0, "{df}");
    env.assert_clean();
}

#[test]
fn schedules_are_stored_and_shown() {
    let env = Env::new();
    env.ok(&["create", "d", "--size", "1M"]);
    assert_eq!(env.json(&["info", "d"])["schedule"], Value::Null);
    let text = env.ok(&[
        "schedule",
        "d",
        "--every",
        "10ms",
        "--keep-last",
        "1000",
        "--keep-hourly",
        "24",
    ]);
    assert!(
        text.starts_with("d: every 10ms, keep last 1000, hourly 24\n"),
        "{text}"
    );
    let info = env.json(&["info", "d"]);
    assert_eq!(info["schedule"]["every_ns"], 10_000_000, "{info}");
    assert_eq!(info["schedule"]["keep_last"], 1000, "{info}");
    assert_eq!(info["schedule"]["keep_hourly"], 24, "{info}");
    assert!(env
        .ok(&["info", "d"])
        .contains("schedule:         every 10ms, keep last 1000, hourly 24"));
    assert_eq!(env.json(&["schedule", "d"])["keep_last"], 1000);
    // Bad schedules are usage errors; nothing changes.
    env.fails(&["schedule", "d", "--every", "500us"], 2);
    env.fails(&["schedule", "d", "--keep-last", "3"], 2);
    env.fails(&["schedule", "d", "--off", "--every", "1s"], 2);
    let msg = env.error(&["schedule", "nope", "--every", "1s"]);
    assert!(msg.contains("does not exist"), "{msg}");
    assert_eq!(env.json(&["info", "d"])["schedule"]["keep_last"], 1000);
    env.ok(&["schedule", "d", "--off"]);
    assert_eq!(env.json(&["info", "d"])["schedule"], Value::Null);
    env.assert_clean();
}

#[test]
fn a_disk_with_clones_cannot_be_deleted() {
    let env = Env::new();
    env.ok(&["create", "gold", "--size", "1M"]);
    env.write_disk("gold", &[7; 8192], 0);
    env.ok(&["snapshot", "gold@v1"]);
    env.ok(&["clone", "gold@v1", "vm1"]);
    env.ok(&["clone", "gold@v1", "vm2"]);
    let msg = env.error(&["delete", "gold"]);
    assert_eq!(
        msg,
        "cannot delete gold: disk gold has clones (vm1, vm2); delete them first"
    );
    // The snapshot can go: it stays hidden while the clones need it.
    env.ok(&["delete", "gold@v1"]);
    assert_eq!(env.json(&["info", "gold"])["hidden_snapshots"], 1);
    let df = env.json(&["df", "--scan"]);
    assert_eq!(df["scan"]["matches"], true, "{df}");
    assert!(env
        .ok(&["df", "--scan"])
        .contains("full scan: every disk and snapshot figure matches"));
    env.ok(&["delete", "vm1", "vm2"]);
    assert_eq!(env.json(&["info", "gold"])["hidden_snapshots"], 0);
    env.ok(&["delete", "gold"]);
    assert_eq!(env.json(&["df"])["used_bytes"], 0);
    env.assert_clean();
}

#[test]
fn delete_stops_at_the_first_error() {
    let env = Env::new();
    for name in ["a", "b", "c"] {
        env.ok(&["create", name, "--size", "1M"]);
    }
    let msg = env.error(&["delete", "a", "nope", "b"]);
    assert!(msg.contains("nope"), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");
    assert_eq!(names(&env.json(&["list"])), ["b", "c"]);
    let msg = env.error(&["delete", "b@snap"]);
    assert_eq!(msg, "cannot delete b@snap: snapshot b@snap does not exist");
    env.assert_clean();
}

#[test]
fn df_and_check() {
    let env = Env::new();
    env.ok(&["create", "vm1", "--size", "10M"]);
    env.write_disk("vm1", &[7; 3 * 4096], 0);
    let df = env.json(&["df"]);
    let capacity = df["capacity_bytes"].as_u64().unwrap();
    let used = df["used_bytes"].as_u64().unwrap();
    let free = df["free_bytes"].as_u64().unwrap();
    assert!(capacity > 1000 * MIB && capacity <= 1024 * MIB, "{df}");
    assert_eq!(used + free, capacity);
    assert!(used >= 3 * 4096);
    assert_eq!(df["disks"][0]["name"], "vm1");
    assert_eq!(df["disks"][0]["allocated_bytes"], 3 * 4096);
    let text = env.ok(&["df"]);
    for key in ["capacity:", "used:", "free:"] {
        assert!(text.contains(key), "{text}");
    }
    assert!(text.contains("vm1"), "{text}");

    let check = env.json(&["check"]);
    assert_eq!(check["disks"], 1);
    assert_eq!(check["data_blocks"], 3);
    let text = env.ok(&["check"]);
    for key in [
        "disks:",
        "snapshots:",
        "tree nodes:",
        "data blocks:",
        "leaked blocks:",
    ] {
        assert!(text.contains(key), "{text}");
    }
}

#[test]
fn check_reports_damage_with_exit_1() {
    let env = Env::new();
    env.ok(&["create", "vm1", "--size", "10M"]);
    env.write_disk("vm1", &[7; 4096], 0);
    // Damage every tree node: blocks starting with "PRLX" and kind 5.
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&env.store)
        .unwrap();
    let mut damaged = 0;
    let mut block = vec![0u8; 4096];
    for addr in 0..(file.metadata().unwrap().len() / 4096) {
        file.read_exact_at(&mut block, addr * 4096).unwrap();
        if block[..4] == *b"PRLX" && block[4] == 5 {
            file.write_all_at(&[0xee; 16], addr * 4096 + 2000).unwrap();
            damaged += 1;
        }
    }
    drop(file);
    assert!(damaged > 0);
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().any(|l| l.starts_with("error: ")), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("parallax: the store has "), "{stderr}");
    let out = env.run(&["check", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["clean"], false);
    assert!(!report["errors"].as_array().unwrap().is_empty());
}

/// The attack of issue 11: the newest header copy of a disk is zeroed.
/// `check` reports it, `gc` refuses, and `repair` writes nothing until the
/// operator names the generation to serve; then the store checks clean.
#[test]
fn repair_asks_then_restores_a_store_whose_newest_header_is_lost() {
    let env = Env::new();
    env.ok(&["create", "vm1", "--size", "10M"]);
    env.ok(&["create", "vm2", "--size", "10M"]);
    let vm2 = random_bytes(65536);
    env.write_disk("vm2", &vm2, 0);
    for round in 0..3u64 {
        env.write_disk("vm1", &random_bytes(300_000), round * 4096);
    }
    let mut bytes = fs::read(&env.store).unwrap();
    let mut copies = Vec::new();
    for addr in 0..bytes.len() / 4096 {
        let block = &bytes[addr * 4096..(addr + 1) * 4096];
        if block[..4] == *b"PRLX" && block[4] == 4 {
            if let Ok(h) = parallax_format::VdiHeader::decode(block, addr as u64, None) {
                if h.name == "vm1" {
                    copies.push((h.generation, addr));
                }
            }
        }
    }
    copies.sort();
    assert_eq!(copies.len(), 2, "{copies:?}");
    let ((older, _), (_, newest_addr)) = (copies[0], copies[1]);
    bytes[newest_addr * 4096..(newest_addr + 1) * 4096].fill(0);
    fs::write(&env.store, &bytes).unwrap();

    env.fails(&["check"], 1);
    assert!(env.error(&["gc"]).contains("damaged"));
    let out = env.run(&["repair"]);
    assert_eq!(out.status.code(), Some(1));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("disk vm1") && plan.contains("DECIDE"),
        "{plan}"
    );
    let message = env.error(&["repair", "--apply"]);
    assert!(message.contains("needs your decision on vm1"), "{message}");
    assert!(
        fs::read(&env.store).unwrap() == bytes,
        "repair wrote without a decision"
    );

    let out = env.ok(&["repair", "--apply", "--use", &format!("vm1={older}")]);
    assert!(out.contains("repaired; check now finds 0 errors"), "{out}");
    env.ok(&["gc"]);
    env.assert_clean();
    assert!(env.ok(&["repair"]).contains("nothing to repair"));
    let store = env.engine();
    let mut buf = vec![0u8; vm2.len()];
    store.open_vdi("vm2").unwrap().read(&mut buf, 0).unwrap();
    assert!(buf == vm2, "vm2 changed");
    store.open_vdi("vm1").unwrap().read(&mut buf, 0).unwrap();
}

#[test]
fn errors_are_one_line_with_exit_1() {
    let env = Env::new();
    env.ok(&["create", "vm1", "--size", "1M"]);
    assert_eq!(env.error(&["info", "nope"]), "disk nope does not exist");
    assert_eq!(
        env.error(&["snapshots", "nope"]),
        "disk nope does not exist"
    );
    assert_eq!(env.error(&["snapshot", "nope"]), "disk nope does not exist");
    assert_eq!(
        env.error(&["clone", "nope@s", "x"]),
        "disk nope does not exist"
    );
    assert_eq!(
        env.error(&["clone", "vm1@s", "x"]),
        "snapshot vm1@s does not exist"
    );
    assert_eq!(
        env.error(&["rollback", "vm1@s"]),
        "snapshot vm1@s does not exist"
    );
    assert_eq!(
        env.error(&["export", "nope", "out.raw"]),
        "disk nope does not exist"
    );
    assert!(!env.path("out.raw").exists());
    assert_eq!(
        env.error(&["delete", "nope"]),
        "cannot delete nope: disk nope does not exist"
    );
    assert_eq!(
        env.error(&["create", "vm1", "--size", "1M"]),
        "disk vm1 already exists"
    );
    env.ok(&["snapshot", "vm1@s"]);
    assert_eq!(
        env.error(&["snapshot", "vm1@s"]),
        "snapshot vm1@s already exists"
    );
    assert_eq!(
        env.error(&["clone", "vm1@s", "vm1"]),
        "disk vm1 already exists"
    );
    let msg = env.error(&["create", "huge", "--size", "16P"]);
    assert!(msg.contains("must be between"), "{msg}");
    let msg = env.error(&["import", "missing.img", "x"]);
    assert!(msg.contains("missing.img"), "{msg}");
    assert_eq!(names(&env.json(&["list"])), ["vm1"]);
    env.assert_clean();
}

#[test]
fn usage_errors_exit_2() {
    let env = Env::new();
    for bad in ["12X", "0", "-1", "1.2.3G", ""] {
        let stderr = env.fails(&["create", "vm1", "--size", bad], 2);
        assert!(stderr.contains("size"), "{stderr}");
    }
    let stderr = env.fails(&["create", "a/b", "--size", "1M"], 2);
    assert!(stderr.contains("names use only"), "{stderr}");
    // Names that would mislead: a path, an option, an invisible character.
    for bad in [
        "..",
        "-rf",
        "vm\u{200b}1",
        "\u{202e}gpj.exe",
        &"x".repeat(65),
    ] {
        env.fails(&["create", bad, "--size", "1M"], 2);
    }
    // The store itself refuses them too (what the daemon's API reaches).
    env.ok(&["create", "named", "--size", "1M"]);
    let msg = env.error(&["snapshot", "named@a b"]);
    assert!(msg.contains("names use only"), "{msg}");
    env.ok(&["delete", "named"]);
    env.fails(&["create", "vm1"], 2);
    env.fails(&["clone", "vm1", "vm2"], 2);
    env.fails(&["rollback", "vm1"], 2);
    env.fails(&["delete"], 2);
    env.fails(&["frobnicate"], 2);
    env.fails(&["list", "--host-id", "0"], 2);
    let stderr = Env::empty().fails(&["init"], 2);
    assert!(stderr.contains("--size"), "{stderr}");
    assert_eq!(env.json(&["list"]), Value::Array(vec![]));
}

#[test]
fn store_errors() {
    let env = Env::empty();
    let msg = env.error(&["list"]);
    assert_eq!(
        msg,
        format!(
            "store {} does not exist; create it with `parallax init --size SIZE`",
            env.store.display()
        )
    );
    // A file of random bytes is not a store and is not overwritten.
    fs::write(&env.store, random_bytes(2 << 20)).unwrap();
    let msg = env.error(&["list"]);
    assert!(
        msg.starts_with(&format!(
            "{} is not a Parallax store: ",
            env.store.display()
        )),
        "{msg}"
    );
    let msg = env.error(&["init", "--size", "64M"]);
    assert!(
        msg.contains("not empty") && msg.contains("--force"),
        "{msg}"
    );
    assert_eq!(fs::metadata(&env.store).unwrap().len(), 2 << 20);
    // A tiny file is not one either.
    fs::write(&env.store, b"hello").unwrap();
    assert!(env.error(&["list"]).contains("is not a Parallax store"));

    // An existing store is protected; --force reformats it.
    fs::remove_file(&env.store).unwrap();
    env.ok(&["init", "--size", "64M"]);
    env.ok(&["create", "vm1", "--size", "1M"]);
    let msg = env.error(&["init", "--size", "64M"]);
    assert!(msg.contains("already holds a Parallax store"), "{msg}");
    assert_eq!(names(&env.json(&["list"])), ["vm1"]);
    env.ok(&["init", "--size", "128M", "--force"]);
    assert_eq!(env.json(&["list"]), Value::Array(vec![]));
    assert_eq!(fs::metadata(&env.store).unwrap().len(), 128 * MIB);

    // Too small for a store: refused, and no file is left behind.
    let tiny = Env::empty();
    let msg = tiny.error(&["init", "--size", "8K"]);
    assert!(msg.contains("too small"), "{msg}");
    assert!(!tiny.store.exists());

    // A store written by a newer version (both superblock copies).
    let file = fs::OpenOptions::new().write(true).open(&env.store).unwrap();
    for addr in [0u64, 1] {
        file.write_all_at(&99u16.to_le_bytes(), addr * 4096 + 6)
            .unwrap();
    }
    drop(file);
    let msg = env.error(&["list"]);
    assert!(
        msg.starts_with("the store was written by a newer Parallax"),
        "{msg}"
    );

    // A directory.
    let dir = Env::empty();
    fs::create_dir(&dir.store).unwrap();
    assert!(dir.error(&["list"]).contains("is a directory"));
}

#[test]
fn init_creates_missing_directories() {
    let env = Env::empty();
    let nested = env.path("a/b/store.px");
    let out = Command::new(env!("CARGO_BIN_EXE_parallax"))
        .args(["init", "--size", "64M"])
        .env("PARALLAX_STORE", &nested)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::metadata(&nested).unwrap().len(), 64 * MIB);
}

#[test]
fn a_busy_store_is_refused() {
    let env = Env::new();
    let holder = fs::File::open(&env.store).unwrap();
    rustix::fs::flock(&holder, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let msg = env.error(&["list"]);
    assert!(msg.contains("in use by another parallax command"), "{msg}");
    // Readers share the store.
    rustix::fs::flock(&holder, rustix::fs::FlockOperation::LockShared).unwrap();
    env.ok(&["list"]);
    assert!(env
        .error(&["create", "x", "--size", "1M"])
        .contains("in use"));
    drop(holder);
    env.ok(&["create", "x", "--size", "1M"]);
}

#[test]
fn raw_import_export_keeps_data_and_holes() {
    let env = Env::new();
    // 8 MiB: random data, a 2 MiB hole, random data; plus a zero-filled
    // (but allocated) MiB inside the second part.
    let image = env.path("random.raw");
    let mut expected = vec![0u8; 8 << 20];
    expected[..3 << 20].copy_from_slice(&random_bytes(3 << 20));
    expected[5 << 20..].copy_from_slice(&random_bytes(3 << 20));
    expected[6 << 20..7 << 20].fill(0);
    {
        let f = fs::File::create(&image).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&expected[..3 << 20], 0).unwrap();
        f.write_all_at(&expected[5 << 20..], 5 << 20).unwrap();
    }
    env.ok(&["import", "random.raw", "rnd"]);
    let info = env.json(&["info", "rnd"]);
    assert_eq!(info["size_bytes"], 8 * MIB);
    assert_eq!(info["allocated_bytes"], 5 * MIB, "zeros must not be stored");

    env.ok(&["export", "rnd", "out.raw"]);
    let out = env.path("out.raw");
    assert!(
        fs::read(&out).unwrap() == expected,
        "export differs from the image"
    );
    let meta = fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), 8 * MIB);
    assert!(
        meta.blocks() * 512 < 8 * MIB,
        "export is not sparse: {} bytes allocated",
        meta.blocks() * 512
    );
    assert!(meta.blocks() * 512 >= 5 * MIB);

    // Existing files are kept unless --force.
    let msg = env.error(&["export", "rnd", "out.raw"]);
    assert!(
        msg.contains("already exists") && msg.contains("--force"),
        "{msg}"
    );
    fs::write(&out, vec![0xff; 16 << 20]).unwrap();
    env.ok(&["export", "--force", "rnd", "out.raw"]);
    assert!(fs::read(&out).unwrap() == expected);
    // Never over the store itself.
    let msg = env.error(&["export", "--force", "rnd", env.store.to_str().unwrap()]);
    assert!(msg.contains("the store itself"), "{msg}");

    // --size makes the disk larger than the image; smaller is refused.
    env.ok(&["import", "--size", "16M", "random.raw", "big"]);
    assert_eq!(env.json(&["info", "big"])["size_bytes"], 16 * MIB);
    let msg = env.error(&["import", "--size", "4M", "random.raw", "small"]);
    assert!(msg.contains("smaller than the image"), "{msg}");
    assert_eq!(names(&env.json(&["list"])), ["big", "rnd"]);
    env.assert_clean();
}

#[test]
fn import_of_an_unaligned_image_pads_with_zeros() {
    let env = Env::new();
    let data = random_bytes(10_000);
    fs::write(env.path("odd.raw"), &data).unwrap();
    env.ok(&["import", "odd.raw", "odd"]);
    assert_eq!(env.json(&["info", "odd"])["size_bytes"], 12288);
    env.ok(&["export", "odd", "odd.out"]);
    let back = fs::read(env.path("odd.out")).unwrap();
    assert_eq!(back.len(), 12288);
    assert!(back[..10_000] == data[..]);
    assert!(back[10_000..].iter().all(|&b| b == 0));
    let empty = env.path("empty.raw");
    fs::write(&empty, b"").unwrap();
    assert!(env.error(&["import", "empty.raw", "e"]).contains("empty"));
}

#[test]
fn failed_import_deletes_the_partial_disk() {
    let env = Env::empty();
    env.ok(&["init", "--size", "16M"]);
    fs::write(env.path("big.raw"), random_bytes(32 << 20)).unwrap();
    let msg = env.error(&["import", "big.raw", "big"]);
    assert!(msg.contains("no space left in the store"), "{msg}");
    assert!(msg.contains("big was deleted"), "{msg}");
    assert_eq!(env.json(&["list"]), Value::Array(vec![]));
    env.assert_clean();
    assert_eq!(env.json(&["df"])["used_bytes"], 0);
}

// ---- qemu-img round trips -------------------------------------------------

/// Panics with a clear message when the qemu tools are missing, unless
/// `PARALLAX_SKIP_QEMU_TESTS=1`; then returns false.
fn have_qemu() -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        if std::env::var_os("PARALLAX_SKIP_QEMU_TESTS").is_some_and(|v| v == "1") {
            eprintln!("qemu-img/qemu-io not found: skipping (PARALLAX_SKIP_QEMU_TESTS=1)");
        } else {
            panic!(
                "this test needs qemu-img and qemu-io (Debian/Ubuntu: apt-get install qemu-utils); \
                 set PARALLAX_SKIP_QEMU_TESTS=1 to skip it"
            );
        }
    }
    ok
}

/// Runs a qemu tool in `dir`; returns its exit code.
fn qemu(dir: &Path, program: &str, args: &[&str]) -> i32 {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let code = out.status.code().expect("killed by a signal");
    assert!(
        code == 0 || program == "qemu-img" && args[0] == "compare" && code == 1,
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    code
}

#[test]
fn readme_walkthrough_with_qemu() {
    if !have_qemu() {
        return;
    }
    let env = Env::new();
    let dir = env.dir.path();
    qemu(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
    );
    qemu(
        dir,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 10M 512k",
            "base.qcow2",
        ],
    );
    env.ok(&["import", "base.qcow2", "base"]);
    assert_eq!(env.ok(&["snapshot", "base@gold"]), "base@gold\n");
    env.ok(&["clone", "base@gold", "vm1"]);
    env.ok(&["export", "vm1", "vm1.raw"]);
    let compare = ["compare", "-q", "-f", "qcow2", "-F", "raw", "base.qcow2"];
    let same = |raw: &str| {
        let mut args = compare.to_vec();
        args.push(raw);
        qemu(dir, "qemu-img", &args) == 0
    };
    assert!(same("vm1.raw"), "vm1.raw differs from base.qcow2");

    let list = env.json(&["list"]);
    assert_eq!(list[0]["size_bytes"], 64 * MIB);
    assert_eq!(list[0]["allocated_bytes"], MIB + 512 * 1024);
    assert_eq!(list[1]["origin"], "base@gold");
    assert_eq!(list[1]["allocated_bytes"], MIB + 512 * 1024);

    // Write into vm1 after the clone: a small raw patch over shared data
    // and over a hole.
    let patch = random_bytes(64 << 10);
    fs::File::create(env.path("patch.raw"))
        .unwrap()
        .write_all(&patch)
        .unwrap();
    let patch = fs::read(env.path("patch.raw")).unwrap();
    env.write_disk("vm1", &patch, 256 << 10);
    env.write_disk("vm1", &patch, 20 * MIB);
    env.ok(&["export", "vm1", "vm1-new.raw"]);
    assert!(!same("vm1-new.raw"), "vm1's writes are missing");
    let file = fs::File::open(env.path("vm1-new.raw")).unwrap();
    for offset in [256 << 10, 20 * MIB] {
        let mut back = vec![0u8; patch.len()];
        file.read_exact_at(&mut back, offset).unwrap();
        assert!(back == patch, "patch at {offset} not exported");
    }
    let mut around = vec![0u8; 4096];
    file.read_exact_at(&mut around, (256 << 10) - 4096).unwrap();
    assert!(around.iter().all(|&b| b == 0xab));

    // The origin and its snapshot are untouched.
    env.ok(&["export", "base@gold", "gold.raw"]);
    assert!(
        same("gold.raw"),
        "base@gold changed after writes to its clone"
    );
    env.ok(&["export", "base", "base.raw"]);
    assert!(same("base.raw"), "base changed after writes to its clone");
    env.assert_clean();

    // A qcow2 made by qemu-img convert of the patched disk imports back equal.
    qemu(
        dir,
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "vm1-new.raw",
            "vm1.qcow2",
        ],
    );
    env.ok(&["import", "vm1.qcow2", "vm2"]);
    env.ok(&["export", "vm2", "vm2.raw"]);
    assert!(fs::read(env.path("vm2.raw")).unwrap() == fs::read(env.path("vm1-new.raw")).unwrap());
    env.assert_clean();
}
