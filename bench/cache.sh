#!/usr/bin/env bash
# The read cache under a boot storm (issue 15), side by side in one run.
#   The pool: a file served by nbdkit through --filter=delay (DELAY per
#   request) and --filter=rate (RATE), standing for networked storage; the
#   cache: a file on the local disk (--cache, CACHE_SIZE).
#   1. Trace. A TCG guest (scripts/guest.sh) boots from a clone of a gold
#      image. The program in the image's first 4 KiB reads what a boot
#      reads: 150 files (4 to 256 KiB) scattered over the image's first
#      200 MiB, then a 16 MiB binary, through the guest's page cache (its
#      readahead shapes the requests). (Few files: each costs a process,
#      slow under TCG.) nbdkit's log filter between QEMU and
#      the appliance records every read: the trace, and its working set
#      (distinct 4 KiB blocks).
#   2. Replay. CLONES clones of the gold image read the trace at once (one
#      qemu-io per clone, the trace's reads in order, one at a time), each
#      phase on a freshly started appliance and pool:
#        none   no cache
#        cold   an empty cache
#        warm   the same cache after a restart of the appliance
#      Reported per phase: wall time until the last clone is done, bytes the
#      pool served (nbdkit's stats filter: data and metadata), data bytes the
#      appliance read from the pool (`status`), and cache hits and misses.
#   Targets (issue 15): the storm at least 5x faster with the cache; pool
#   bytes read per clone at most 1.2x the working set / CLONES.
#   Everything lives in BENCH_DIR (default /var/tmp); every process started
#   here is stopped by its PID; everything is removed at the end.
# Knobs: CLONES (32) DELAY (2ms) RATE (200M) IMAGE (256M) CACHE_SIZE (1G)
#        GUEST_DIR (/var/tmp/parallax-guest, kept) PARALLAX_BIN (target/release/parallax)
# Output: stdout and bench/results/cache-<date>.txt
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CLONES=${CLONES:-32} DELAY=${DELAY:-2ms} RATE=${RATE:-200M} IMAGE=${IMAGE:-256M}
CACHE_SIZE=${CACHE_SIZE:-1G} GUEST_DIR=${GUEST_DIR:-/var/tmp/parallax-guest}
P=${PARALLAX_BIN:-target/release/parallax}
[ -x "$P" ] || cargo build --release -q -p parallax
P="$(cd "$(dirname "$P")" && pwd)/$(basename "$P")"
OUT="bench/results/cache-$(date -u +%Y%m%d-%H%M%S).txt"
TMP=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" parallax-cache.XXXXXX)
PIDS=()
cleanup() {
    # Newest first: the appliance before the pool it commits to.
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill "${PIDS[i]}" 2>/dev/null || continue
        timeout 30 tail --pid="${PIDS[i]}" -f /dev/null || kill -9 "${PIDS[i]}" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
exec > >(tee "$OUT") 2>&1

bash scripts/guest.sh "$GUEST_DIR" >/dev/null
STORE="nbd+unix:///?socket=$TMP/pool.sock"
px() { "$P" --store "$STORE" --control "$TMP/c" "$@"; }
wait_for() { local i; for ((i = 0; i < 300; i++)); do [ -S "$1" ] && return 0; sleep 0.1; done; return 1; }

# The pool, with a stats file per start.
start_pool() { # start_pool STATSFILE
    rm -f "$TMP/pool.sock"
    nbdkit -f -U "$TMP/pool.sock" --filter=stats --filter=delay --filter=rate \
        file file="$TMP/pool.img" delay-read="$DELAY" delay-write="$DELAY" rate="$RATE" \
        statsfile="$1" >"$TMP/nbdkit.log" 2>&1 &
    POOL=$!
    PIDS+=("$POOL")
    wait_for "$TMP/pool.sock"
}
stop_pool() { kill "$POOL"; wait "$POOL" 2>/dev/null || true; }
start() { # start [serve args...]
    rm -f "$TMP/n.sock"
    "$P" --store "$STORE" --control "$TMP/c" serve --nbd-listen none --nbd-socket "$TMP/n.sock" \
        "$@" >"$TMP/serve.log" 2>&1 &
    SERVE=$!
    PIDS+=("$SERVE")
    local i
    for ((i = 0; i < 300; i++)); do px status >/dev/null 2>&1 && return 0; sleep 0.1; done
    cat "$TMP/serve.log"
    exit 1
}
stop() { kill "$SERVE"; wait "$SERVE" || { cat "$TMP/serve.log"; exit 1; }; }
# Bytes nbdkit's stats file says the pool read ("read: N ops, T s, X UNIT, ...").
pool_read_bytes() {
    python3 - "$1" <<'EOF'
import re, sys
units = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
for line in open(sys.argv[1]):
    m = re.match(r"read: \d+ ops, [\d.]+ s, ([\d.]+) (bytes|KiB|MiB|GiB)", line)
    if m:
        print(int(float(m.group(1)) * units[m.group(2)]))
        break
else:
    print(0)
EOF
}

echo "== read cache: boot storm, $(date -u +%FT%TZ): CLONES=$CLONES, pool = nbdkit file + delay $DELAY + rate $RATE; $(nproc) CPUs"
echo "   $("$P" --version 2>/dev/null || echo parallax), $(nbdkit --version), $(qemu-io --version | head -1)"
truncate -s 2G "$TMP/pool.img"
start_pool "$TMP/stats-setup.txt"
px init >/dev/null
start

# The gold image: the boot program in its first 4 KiB, random data after.
cat >"$TMP/program.sh" <<'EOF'
echo "boot: start"
s=7
i=0
while [ $i -lt 150 ]; do
    s=$(( (s * 1103515245 + 12345) % 2147483648 ))
    off=$(( 256 + s % 51200 ))
    n=$(( 1 + (s / 65536) % 64 ))
    dd if=/dev/vda of=/dev/null bs=4096 skip=$off count=$n 2>/dev/null
    i=$((i + 1))
done
dd if=/dev/vda of=/dev/null bs=1M skip=210 count=16 2>/dev/null
echo "boot: done"
EOF
head -c "$(numfmt --from=iec "$IMAGE")" /dev/urandom >"$TMP/gold.raw"
dd if="$TMP/program.sh" of="$TMP/gold.raw" conv=notrunc 2>/dev/null
dd if=/dev/zero of="$TMP/gold.raw" bs=1 seek="$(stat -c %s "$TMP/program.sh")" \
    count=$((4096 - $(stat -c %s "$TMP/program.sh"))) conv=notrunc 2>/dev/null
px create gold --size "$IMAGE" >/dev/null
qemu-img convert -n -f raw -O raw "$TMP/gold.raw" "nbd+unix:///gold?socket=$TMP/n.sock"
rm -f "$TMP/gold.raw"
px snapshot gold@base >/dev/null
px clone gold@base trace >/dev/null
for ((i = 0; i < CLONES; i++)); do px clone gold@base "vm$i" >/dev/null; done

# 1. The trace of a real boot.
rm -f "$TMP/log.sock"
nbdkit -f -U "$TMP/log.sock" --filter=log nbd socket="$TMP/n.sock" export=trace \
    logfile="$TMP/trace.log" >"$TMP/nbdkit-log.log" 2>&1 &
LOGGER=$!
PIDS+=("$LOGGER")
wait_for "$TMP/log.sock"
t0=$(date +%s.%N)
timeout 300 qemu-system-x86_64 -accel tcg -m 512 -smp 1 -nographic -no-reboot \
    -kernel "$GUEST_DIR/vmlinuz" -initrd "$GUEST_DIR/initrd.img" \
    -append "console=ttyS0 quiet panic=-1" \
    -drive "file=nbd+unix:///?socket=$TMP/log.sock,format=raw,if=virtio,cache=none" \
    >"$TMP/boot.log" 2>&1 || true
boot_s=$(awk -v s="$t0" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
kill "$LOGGER"
wait "$LOGGER" 2>/dev/null || true
grep -q "boot: done" "$TMP/boot.log" || { echo "!! the guest did not finish its boot"; cat "$TMP/boot.log"; exit 1; }
python3 - "$TMP/trace.log" "$TMP/replay.cmds" <<'EOF' >"$TMP/trace.summary"
import re, sys
reads, blocks = [], set()
for line in open(sys.argv[1]):
    m = re.search(r" Read id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)", line)
    if m:
        off, n = int(m.group(1), 16), int(m.group(2), 16)
        reads.append((off, n))
        blocks.update(range(off // 4096, (off + n + 4095) // 4096))
with open(sys.argv[2], "w") as f:
    for off, n in reads:
        f.write(f"read {off} {n}\n")
print(len(reads), sum(n for _, n in reads), len(blocks) * 4096)
EOF
read -r NREADS TRACE_BYTES WS_BYTES <"$TMP/trace.summary"
stop
stop_pool
echo "trace: a TCG guest's boot took ${boot_s} s and made $NREADS reads, $((TRACE_BYTES >> 20)) MiB; working set $((WS_BYTES >> 20)) MiB ($WS_BYTES bytes)"

# 2. The storm, three ways.
phase() { # phase NAME [serve args...]
    local name=$1
    shift
    start_pool "$TMP/stats-$name.txt"
    start "$@"
    local t0 pids=() i ok=1
    t0=$(date +%s.%N)
    for ((i = 0; i < CLONES; i++)); do
        qemu-io -r -f raw "nbd+unix:///vm$i?socket=$TMP/n.sock" <"$TMP/replay.cmds" \
            >"$TMP/replay-$i.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || ok=0; done
    local wall
    wall=$(awk -v s="$t0" -v e="$(date +%s.%N)" 'BEGIN { printf "%.2f", e - s }')
    [ "$ok" = 1 ] || { echo "!! a replay failed"; tail -5 "$TMP"/replay-*.log; exit 1; }
    local status
    status=$(px status --json)
    stop
    stop_pool
    local pool
    pool=$(pool_read_bytes "$TMP/stats-$name.txt")
    python3 - "$name" "$wall" "$pool" "$CLONES" "$WS_BYTES" "$status" <<'EOF'
import json, sys
name, wall, pool, clones, ws = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
st = json.loads(sys.argv[6])
c = st.get("cache") or {}
print(f"{name:5s} wall {wall:7.2f} s | pool served {pool / 2**20:8.1f} MiB ({pool / clones / 2**20:6.2f} MiB per clone, "
      f"{pool / ws:5.2f}x the working set) | data from pool {st['pool_data_read_bytes'] / 2**20:8.1f} MiB | "
      f"hits {c.get('hits', 0)} misses {c.get('misses', 0)} dropped {c.get('dropped', 0)}")
EOF
    echo "$name $wall $pool" >>"$TMP/phases"
}
echo "== $CLONES clones replay the trace at once"
phase none
phase cold --cache "$TMP/cache.bin" --cache-size "$CACHE_SIZE"
phase warm --cache "$TMP/cache.bin"
python3 - "$TMP/phases" "$CLONES" "$WS_BYTES" <<'EOF'
import sys
ph = {}
for line in open(sys.argv[1]):
    n, w, p = line.split()
    ph[n] = (float(w), int(p))
clones, ws = int(sys.argv[2]), int(sys.argv[3])
none = ph["none"][0]
for n in ("cold", "warm"):
    w, p = ph[n]
    print(f"{n}: {none / w:.1f}x faster than no cache (target 5x); pool bytes per clone {p / clones / (ws / clones):.2f}x the working set / {clones} (target at most 1.2x)")
EOF
