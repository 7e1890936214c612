#!/usr/bin/env bash
# Cluster mode against a single appliance, side by side in one run:
#   1. 4 KiB random writes, QD32, fio's nbd engine, on a disk the appliance
#      holds: the same appliance binary on the same pool file, with and
#      without --etcd, alternating ROUNDS times (RUNTIME seconds each).
#   2. Control operations in cluster mode (etcd on 127.0.0.1): N creates,
#      N snapshots of one disk, N clones of one snapshot, timed from request
#      to answer by one client on one connection (bench/api_loop.py).
#   3. Hand-offs between two appliances (`parallax handoff`, until the
#      receiver has opened the disk): H of an idle disk each way, and HL
#      while fio writes the disk through the giver (4 KiB, QD32).
#   4. A disk following its client: a client of appliance 2 writes a disk
#      appliance 1 holds idle (its client flushed and left), F times each
#      way: the time of that first write (the ask, the quiet period, the
#      hand-off).
#   5. Takeover of every disk of a dead appliance: appliance 1 holds K
#      written disks and is killed (-9); appliance 2 runs with --takeover
#      and the default lease TTL (10 s) and grace (5 s): the time from the
#      kill until a client of appliance 2 has written each of the K disks
#      (its writes wait for the takeovers).
#   The store file lives in BENCH_DIR (default /var/tmp, O_DIRECT-capable);
#   every process started here is stopped by its PID; everything is removed.
# Knobs: ROUNDS (3) RUNTIME (10) N (200) H (20) HL (5) F (10) K (20) PARALLAX_BIN (target/release/parallax)
# Output: stdout and bench/results/cluster-<date>.txt
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ROUNDS=${ROUNDS:-3} RUNTIME=${RUNTIME:-10} N=${N:-200} H=${H:-20} HL=${HL:-5} F=${F:-10} K=${K:-20}
P=${PARALLAX_BIN:-target/release/parallax}
[ -x "$P" ] || cargo build --release -q -p parallax
P="$(cd "$(dirname "$P")" && pwd)/$(basename "$P")"
OUT="bench/results/cluster-$(date -u +%Y%m%d-%H%M%S).txt"
TMP=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" parallax-cluster.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
exec > >(tee "$OUT") 2>&1

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CPORT=$(port) PPORT=$(port)
ETCD_URL="http://127.0.0.1:$CPORT"
etcd --data-dir "$TMP/etcd" --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls "http://127.0.0.1:$PPORT" --initial-advertise-peer-urls "http://127.0.0.1:$PPORT" \
    --initial-cluster "default=http://127.0.0.1:$PPORT" >"$TMP/etcd.log" 2>&1 &
PIDS+=($!)
echo "== cluster benchmark $(date -u +%FT%TZ): ROUNDS=$ROUNDS RUNTIME=${RUNTIME}s N=$N; $(nproc) CPUs"
echo "   $("$P" --version 2>/dev/null || echo parallax), $(etcd --version | head -1), $(fio --version)"
"$P" --store "$TMP/pool.px" init --size 8G >/dev/null
"$P" --store "$TMP/pool.px" create d --size 1G >/dev/null

px() { "$P" --store "$TMP/pool.px" --control "$TMP/c" --host-id 1 "$@"; }
start() { # start [--etcd URL]
    "$P" --store "$TMP/pool.px" --control "$TMP/c" --host-id 1 serve --direct --nbd-listen none \
        --nbd-socket "$TMP/n.sock" "$@" >"$TMP/serve.log" 2>&1 &
    SERVE=$!
    PIDS+=("$SERVE")
    until px status >/dev/null 2>&1; do sleep 0.1; done
}
stop() { kill "$SERVE" || { cat "$TMP/serve.log"; exit 1; }; wait "$SERVE" || true; }
fio_iops() {
    fio --name=w --ioengine=nbd --uri="nbd+unix:///d?socket=$TMP/n.sock" --rw=randwrite --bs=4k \
        --iodepth=32 --size=1G --time_based --runtime="$RUNTIME" --output-format=json \
        --output="$TMP/fio.json" >/dev/null 2>&1
    python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"]))' "$TMP/fio.json"
}
# Fill once so that both modes write in place.
start
fio --name=f --ioengine=nbd --uri="nbd+unix:///d?socket=$TMP/n.sock" --rw=write --bs=1M --iodepth=8 \
    --size=1G --output=/dev/null 2>/dev/null
stop
echo "== 4k randwrite QD32 on a held disk: single appliance vs cluster mode, alternating"
SOLO=() CLUSTER=()
for ((r = 1; r <= ROUNDS; r++)); do
    start
    SOLO+=("$(fio_iops)")
    stop
    start --etcd "$ETCD_URL" --lease-ttl 10s
    CLUSTER+=("$(fio_iops)")
    stop
    echo "   r$r single ${SOLO[-1]} IOPS   cluster ${CLUSTER[-1]} IOPS"
done
python3 - "${SOLO[*]}" "${CLUSTER[*]}" <<'PY'
import statistics, sys
s = [int(x) for x in sys.argv[1].split()]; c = [int(x) for x in sys.argv[2].split()]
ms, mc = statistics.median(s), statistics.median(c)
print(f"   median: single {ms:.0f} IOPS, cluster {mc:.0f} IOPS: cluster/single {mc / ms:.2f}x (target >= 0.95x)")
PY

echo "== control operations in cluster mode (etcd on 127.0.0.1), $N each"
start --etcd "$ETCD_URL" --lease-ttl 10s
L="python3 $ROOT/bench/api_loop.py $TMP/c"
$L POST /v1/disks '{"name":"c{i}","size_bytes":1073741824}' "$N" >"$TMP/create.txt"
$L POST /v1/disks/d/snapshots '{"name":"s{i}"}' "$N" >"$TMP/snap.txt"
$L POST /v1/disks/d/snapshots/s1/clone '{"name":"k{i}"}' "$N" >"$TMP/clone.txt"
stop
python3 - "$TMP" <<'PY'
import statistics, sys
d = sys.argv[1]
for what in ("create", "snap", "clone"):
    xs = sorted(float(l.split()[1]) * 1000 for l in open(f"{d}/{what}.txt"))
    p = lambda q: xs[min(len(xs) - 1, int(q * (len(xs) - 1)))]
    print(f"   {what:<7} n={len(xs)} median {statistics.median(xs):.2f} ms  p90 {p(0.9):.2f}  p99 {p(0.99):.2f}  max {xs[-1]:.2f} (target: median < 20 ms)")
PY
echo "== hand-offs between two appliances: $H of an idle disk each way, $HL under fio"
start --etcd "$ETCD_URL" --lease-ttl 10s
px2() { "$P" --store "$TMP/pool.px" --control "$TMP/c2" --host-id 2 "$@"; }
# Started directly (not through px2), so that $! is the appliance's PID.
"$P" --store "$TMP/pool.px" --control "$TMP/c2" --host-id 2 serve --direct --nbd-listen none \
    --nbd-socket "$TMP/n2.sock" --etcd "$ETCD_URL" --lease-ttl 10s >"$TMP/serve2.log" 2>&1 &
SERVE2=$!
PIDS+=("$SERVE2")
until px2 status >/dev/null 2>&1; do sleep 0.1; done
px create h --size 1G >/dev/null
took() { python3 -c 'import json,sys; print(json.load(sys.stdin)["total_ms"])'; }
for ((i = 1; i <= H; i++)); do
    px --json handoff h --to 2 | took >>"$TMP/idle.txt"
    px2 --json handoff h --to 1 | took >>"$TMP/idle.txt"
done
for ((i = 1; i <= HL; i++)); do
    fio --name=w --ioengine=nbd --uri="nbd+unix:///h?socket=$TMP/n.sock" --rw=randwrite --bs=4k \
        --iodepth=32 --size=1G --time_based --runtime=60 --output=/dev/null >/dev/null 2>&1 &
    FIO=$!
    sleep 2
    px --json handoff h --to 2 | took >>"$TMP/load.txt"
    wait "$FIO" || true # its writes fail from the hand-off on
    px2 --json handoff h --to 1 >/dev/null
done
python3 - "$TMP" <<'PY'
import statistics, sys
d = sys.argv[1]
for what, target in (("idle", "median < 100 ms"), ("load", "< 1 s")):
    xs = sorted(float(l) for l in open(f"{d}/{what}.txt"))
    print(f"   {what:<5} n={len(xs)} median {statistics.median(xs):.0f} ms  max {xs[-1]:.0f} ms (target: {target})")
PY

echo "== a disk following its client: $F first writes each way through the appliance that does not hold it"
ms() { python3 -c 'import time; print(int(time.monotonic() * 1000))'; }
px create m --size 64M >/dev/null
qemu-io -f raw -c 'write 0 4k' "nbd+unix:///m?socket=$TMP/n.sock" >/dev/null
for ((i = 1; i <= F; i++)); do
    for sock in n2 n; do
        sleep 1 # the holder's client left a moment ago: quiet
        t0=$(ms)
        qemu-io -f raw -c 'write 0 4k' "nbd+unix:///m?socket=$TMP/$sock.sock" >/dev/null
        echo $(($(ms) - t0)) >>"$TMP/follow.txt"
    done
done
python3 - "$TMP" <<'PY'
import statistics, sys
xs = sorted(float(l) for l in open(f"{sys.argv[1]}/follow.txt"))
print(f"   first write n={len(xs)} median {statistics.median(xs):.0f} ms  max {xs[-1]:.0f} ms (quiet period 500 ms; qemu-io start included)")
PY
kill "$SERVE2"
wait "$SERVE2" || true
stop

echo "== takeover of all $K disks of a dead appliance (TTL 10 s, grace 5 s: target TTL + 5 s)"
start --etcd "$ETCD_URL"
"$P" --store "$TMP/pool.px" --control "$TMP/c2" --host-id 2 serve --direct --nbd-listen none \
    --nbd-socket "$TMP/n2.sock" --etcd "$ETCD_URL" --takeover >"$TMP/serve2.log" 2>&1 &
SERVE2=$!
PIDS+=("$SERVE2")
until px2 status >/dev/null 2>&1; do sleep 0.1; done
for ((i = 1; i <= K; i++)); do
    px create "t$i" --size 64M >/dev/null
    qemu-io -f raw -t writeback -c 'write 0 1M' "nbd+unix:///t$i?socket=$TMP/n.sock" >/dev/null
done
kill -9 "$SERVE"
wait "$SERVE" 2>/dev/null || true
t0=$(ms)
# A client of appliance 2 writes each disk: its write waits until the disk
# is taken over (the key, then the grace) and open there.
WRITERS=()
for ((i = 1; i <= K; i++)); do
    qemu-io -f raw -c 'write -P 9 0 4k' "nbd+unix:///t$i?socket=$TMP/n2.sock" >"$TMP/w$i.log" 2>&1 &
    WRITERS+=($!)
done
failed=0
for pid in "${WRITERS[@]}"; do wait "$pid" || failed=$((failed + 1)); done
echo "   all $K disks written through appliance 2 $(($(ms) - t0)) ms after the kill ($failed writes failed)"
kill "$SERVE2"
wait "$SERVE2" || true
echo "== output written to $OUT"
