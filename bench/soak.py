#!/usr/bin/env python3
"""Soak: snapshots every 10 ms, thinned by retention, under verified writes.

  python3 bench/soak.py [--minutes 10] [--every 10ms] [--keep-last 200]
                        [--keep-minutely 60] [--size 1G] [--dir /var/tmp]
                        [--cache SIZE] [--journal]
                        [--parallax target/release/parallax]

1. A fresh store in a temporary directory under --dir, served by
   `parallax serve --direct` on a Unix socket (no TCP); with --cache, with
   a read cache of that size in the same directory (every verification
   read then goes through it); with --journal, with entry journals.
2. Disk D of --size with `parallax schedule D --every ... --keep-last ...
   --keep-minutely ...`.
3. For --minutes, two writers at once:
   - fio passes: 4 KiB random writes at QD16 over 256 MiB from offset 64 MiB,
     each pass verified (crc32c) after it is written; a failed pass ends
     the soak;
   - a sequence writer on its own NBD connection: round k writes 1 MiB at
     offset 0 filled with k (u32, little-endian), and records when the write
     was sent and when it was acknowledged.
   Every 30 s: snapshots kept, store used, daemon RSS.
4. Then the schedule is switched off and every kept snapshot is checked
   against what had been written at its time: its first MiB must hold one
   round (or two consecutive ones, for a write in flight), no older than the
   last round acknowledged before the snapshot's creation instant and no
   newer than the last round sent before it.
5. `check` must be clean with no leaked block, and `df --scan` must find
   the space figures equal to a full scan. Exit status 1 on any failure.

Only the standard library; the NBD client is the minimal one of
bench/nbd_hold.py. Every process is stopped by PID; the directory is removed.
"""
import argparse
import bisect
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd_hold as nbd  # noqa: E402

MIB = 1 << 20


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Soak:
    def __init__(self, args):
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="parallax-soak-", dir=args.dir)
        self.store = os.path.join(self.dir, "store.px")
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.daemon = None
        self.failures = []
        self.stop = threading.Event()
        self.sent = []  # round k (1-based) at index k-1: ns when sent
        self.acked = []  # ns when acknowledged
        self.fio_passes = 0

    def px(self, *argv, check=True):
        r = subprocess.run([self.args.parallax, "--store", self.store, *argv],
                           capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"parallax {' '.join(argv)}: {r.stderr.strip()}")
        return r

    def pxj(self, *argv):
        return json.loads(self.px(*argv, "--json").stdout)

    def start(self):
        self.px("init", "--size", self.args.store_size)
        logf = open(os.path.join(self.dir, "serve.log"), "w")
        cache = []
        if self.args.cache:
            cache = ["--cache", os.path.join(self.dir, "cache.bin"),
                     "--cache-size", self.args.cache]
        extra = ["--journal"] if self.args.journal else []
        self.daemon = subprocess.Popen(
            [self.args.parallax, "--store", self.store, "serve", "--direct",
             "--nbd-listen", "none", "--nbd-socket", self.sock] + cache + extra,
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        for _ in range(200):
            if self.px("status", check=False).returncode == 0:
                break
            if self.daemon.poll() is not None:
                raise RuntimeError("the daemon exited at start")
            time.sleep(0.05)
        self.px("create", "D", "--size", self.args.size)
        self.px("schedule", "D", "--every", self.args.every,
                "--keep-last", str(self.args.keep_last),
                "--keep-minutely", str(self.args.keep_minutely))
        log(f"daemon pid {self.daemon.pid}, store {self.store}; "
            f"{self.px('schedule', 'D').stdout.strip()}")

    def rss_mib(self):
        with open(f"/proc/{self.daemon.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def fio_loop(self):
        uri = f"nbd+unix:///D?socket={self.sock}"
        while not self.stop.is_set():
            r = subprocess.run(
                ["fio", "--name=soak", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                 "--bs=4k", "--iodepth=16", "--offset=64m", "--size=256m",
                 "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                 f"--randseed={self.fio_passes + 1}", "--output-format=terse"],
                capture_output=True, text=True, cwd=self.dir)
            if r.returncode != 0:
                self.failures.append(f"fio pass {self.fio_passes + 1} failed: "
                                     f"{(r.stderr or r.stdout).strip()[-500:]}")
                self.stop.set()
                return
            self.fio_passes += 1

    def sequence_writer(self):
        s, _ = nbd.connect(self.sock, "D")
        k = 0
        try:
            while not self.stop.is_set():
                k += 1
                data = k.to_bytes(4, "little") * (MIB // 4)
                self.sent.append(time.time_ns())
                nbd.request(s, nbd.CMD_WRITE, 0, MIB, data)
                self.acked.append(time.time_ns())
        except Exception as e:  # noqa: BLE001 - reported as a failure
            self.failures.append(f"sequence writer, round {k}: {e}")
            self.stop.set()
        finally:
            try:
                nbd.request(s, nbd.CMD_DISC)
                s.close()
            except OSError:
                pass

    def run(self):
        fio_t = threading.Thread(target=self.fio_loop)
        seq_t = threading.Thread(target=self.sequence_writer)
        fio_t.start()
        seq_t.start()
        end = time.monotonic() + self.args.minutes * 60
        next_report = time.monotonic() + 30
        while time.monotonic() < end and not self.stop.is_set():
            time.sleep(0.5)
            if time.monotonic() >= next_report:
                next_report += 30
                snaps = self.pxj("snapshots", "D")
                df = self.pxj("df")
                newest = snaps[-1]["id"] if snaps else 0
                log(f"{len(snaps)} snapshots kept of {newest} taken; store used "
                    f"{df['used_bytes'] / MIB:.0f} MiB; daemon RSS {self.rss_mib():.1f} MiB; "
                    f"{len(self.acked)} sequence rounds; {self.fio_passes} fio passes verified")
        self.stop.set()
        seq_t.join()
        fio_t.join()

    def check_snapshots(self):
        self.px("schedule", "D", "--off")
        snaps = self.pxj("snapshots", "D")
        taken = snaps[-1]["id"] if snaps else 0
        log(f"schedule off: {len(snaps)} snapshots kept of {taken} taken "
            f"({taken - len(snaps)} deleted by retention); checking each")
        mixed = 0
        for snap in snaps:
            created = snap["created_ns"]
            acked_before = bisect.bisect_left(self.acked, created)
            sent_before = bisect.bisect_right(self.sent, created)
            s, _ = nbd.connect(self.sock, f"D@{snap['name']}")
            data = nbd.request(s, nbd.CMD_READ, 0, MIB)
            nbd.request(s, nbd.CMD_DISC)
            s.close()
            values = set(memoryview(data).cast("I"))
            lo, hi = min(values), max(values)
            mixed += int(lo != hi)
            if hi - lo > 1 or lo < acked_before or hi > sent_before:
                self.failures.append(
                    f"snapshot {snap['name']}: holds rounds {lo}..{hi}; expected one round "
                    f"in {acked_before}..{sent_before} (acknowledged..sent before it)")
        log(f"{len(snaps)} snapshots checked against the write log; {mixed} caught a write "
            f"in flight; {len(self.failures)} failures")
        return len(snaps), taken

    def final_checks(self):
        report = self.pxj("check")
        if not report["clean"] or report["leaked_blocks"]:
            self.failures.append(f"check: clean={report['clean']} leaked={report['leaked_blocks']} "
                                 f"errors={report['errors'][:3]}")
        r = self.px("df", "--scan", "--json", check=False)
        df = json.loads(r.stdout) if r.stdout.strip() else {}
        if r.returncode != 0 or not df.get("scan", {}).get("matches"):
            self.failures.append(f"df --scan: {df.get('scan')} {r.stderr.strip()}")
        disk = df.get("disks", [{}])[0]
        if self.args.cache:
            st = self.pxj("status")
            c = st.get("cache") or {}
            log(f"read cache: {c.get('hits')} hits, {c.get('misses')} misses, "
                f"{c.get('fills')} copies in, {c.get('dropped')} dropped, "
                f"{c.get('corrupt')} failed checks, {c.get('errors')} errors; pool data read "
                f"{st.get('pool_data_read_bytes', 0) / MIB:.0f} MiB")
        log(f"check clean={report['clean']} leaked={report['leaked_blocks']}; df --scan "
            f"matches={df.get('scan', {}).get('matches')}; D used "
            f"{disk.get('used_bytes', 0) / MIB:.0f} MiB, referenced "
            f"{disk.get('referenced_bytes', 0) / MIB:.0f} MiB")

    def shutdown(self):
        if self.daemon and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(120)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
                self.failures.append("the daemon did not stop within 120 s of SIGTERM")
            if self.daemon.returncode not in (0, None):
                self.failures.append(f"the daemon exited with status {self.daemon.returncode}")
        with open(os.path.join(self.dir, "serve.log")) as f:
            bad = [line for line in f if " WARN " in line or " ERROR " in line or "panicked" in line]
        if bad:
            log(f"daemon log has {len(bad)} warnings/errors, first: {bad[0].strip()}")
        shutil.rmtree(self.dir, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--every", default="10ms")
    p.add_argument("--keep-last", type=int, default=200)
    p.add_argument("--keep-minutely", type=int, default=60)
    p.add_argument("--size", default="1G")
    p.add_argument("--store-size", default="16G")
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--cache", default=None, help="read cache size (serve --cache-size)")
    p.add_argument("--journal", action="store_true",
                   help="entry journals (serve --journal, format 2)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--parallax", default=os.path.join(root, "target/release/parallax"))
    args = p.parse_args()
    soak = Soak(args)
    start = time.monotonic()
    try:
        soak.start()
        soak.run()
        kept, taken = soak.check_snapshots()
        soak.final_checks()
    except Exception as e:  # noqa: BLE001 - reported as a failure
        soak.failures.append(f"aborted: {e}")
        kept, taken = 0, 0
    finally:
        soak.stop.set()
        soak.shutdown()
    mins = (time.monotonic() - start) / 60
    log(f"soak of {args.minutes} min ({mins:.1f} min in all): {taken} snapshots taken, {kept} kept "
        f"and checked, {len(soak.acked)} sequence rounds, {soak.fio_passes} fio passes verified")
    for f in soak.failures:
        log(f"FAIL: {f}")
    sys.exit(1 if soak.failures else 0)


if __name__ == "__main__":
    main()
