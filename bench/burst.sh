#!/usr/bin/env bash
# The write-back log under a write burst (issue 15), side by side in one run.
#   The pool: a file served by nbdkit through --filter=delay (DELAY per
#   request) and --filter=rate (RATE), standing for networked storage; the
#   cache: a file on the local disk (--cache, CACHE_SIZE; its last quarter,
#   at most 16 GiB, is the write-back log).
#   Each case runs the same fio job (4 KiB random writes, QD32, RUNTIME
#   seconds, fio's nbd engine, one flush at the end) against a freshly
#   created disk of DISK bytes on a freshly started appliance:
#     slow        the slow pool, no cache
#     write-back  the slow pool, the disk's policy write-back
#     local       a pool in a plain local file, no cache (the reference)
#   Reported per case: fio's IOPS, and for write-back: the bytes left in
#   the log when fio ended, and the time the destage of the rest took
#   (with its rate against the pool's RATE). Rounds alternate the cases
#   (ROUNDS, AGG=median|mean over them).
#   Targets (issue 15): write-back at least 0.7x local; the destage at the
#   pool's rate.
#   Everything lives in BENCH_DIR (default /var/tmp); every process started
#   here is stopped by its PID; everything is removed at the end.
#   The appliance reaches the slow pool over CONNECTIONS NBD connections
#   (one request in flight on each).
# Knobs: RUNTIME (30) DISK (2G) DELAY (2ms) RATE (200M) CACHE_SIZE (32G: an 8 GiB log) CONNECTIONS (32)
#        ROUNDS (1) AGG (median) PARALLAX_BIN (target/release/parallax)
# Output: stdout and bench/results/burst-<date>.txt
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUNTIME=${RUNTIME:-30} DISK=${DISK:-2G} DELAY=${DELAY:-2ms} RATE=${RATE:-200M}
CACHE_SIZE=${CACHE_SIZE:-32G} ROUNDS=${ROUNDS:-1} AGG=${AGG:-median} CONNECTIONS=${CONNECTIONS:-32}
P=${PARALLAX_BIN:-target/release/parallax}
[ -x "$P" ] || cargo build --release -q -p parallax
P="$(cd "$(dirname "$P")" && pwd)/$(basename "$P")"
OUT="bench/results/burst-$(date -u +%Y%m%d-%H%M%S).txt"
TMP=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" parallax-burst.XXXXXX)
PIDS=()
cleanup() {
    # Newest first: the appliance before the pool it commits to.
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill "${PIDS[i]}" 2>/dev/null || continue
        timeout 120 tail --pid="${PIDS[i]}" -f /dev/null || kill -9 "${PIDS[i]}" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
exec > >(tee "$OUT") 2>&1

wait_for() { local i; for ((i = 0; i < 300; i++)); do [ -S "$1" ] && return 0; sleep 0.1; done; return 1; }
SLOW="nbd+unix:///?socket=$TMP/pool.sock&connections=$CONNECTIONS"
LOCAL="$TMP/local.px"

start_pool() {
    rm -f "$TMP/pool.sock" "$TMP/pool.img"
    truncate -s 8G "$TMP/pool.img"
    nbdkit -f -U "$TMP/pool.sock" --filter=delay --filter=rate \
        file file="$TMP/pool.img" delay-read="$DELAY" delay-write="$DELAY" rate="$RATE" \
        >"$TMP/nbdkit.log" 2>&1 &
    POOL=$!
    PIDS+=("$POOL")
    wait_for "$TMP/pool.sock"
}
stop_pool() { kill "$POOL"; wait "$POOL" 2>/dev/null || true; }

# start STORE [serve args...]: a fresh appliance on STORE.
start() {
    STORE=$1
    shift
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
px() { "$P" --store "$STORE" --control "$TMP/c" "$@"; }
stop() { kill "$SERVE"; wait "$SERVE" || { cat "$TMP/serve.log"; exit 1; }; }

fio_iops() { # fio_iops OUT.json: the write IOPS of the job
    python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"]))' "$1"
}

# one CASE: runs the job, writes "IOPS LEFT_BYTES DESTAGE_S" to $TMP/result
# (not in a subshell: the cleanup must know every PID it started)
one() {
    local case=$1 left=0 destage=0
    case $case in
    slow | write-back)
        start_pool
        "$P" --store "$SLOW" --control "$TMP/c" init >/dev/null
        if [ "$case" = write-back ]; then
            rm -f "$TMP/cache.bin"
            start "$SLOW" --cache "$TMP/cache.bin" --cache-size "$CACHE_SIZE"
        else
            start "$SLOW"
        fi
        ;;
    local)
        rm -f "$LOCAL"
        "$P" --store "$LOCAL" init --size 8G >/dev/null
        start "$LOCAL"
        ;;
    esac
    px create vm --size "$DISK" >/dev/null
    [ "$case" = write-back ] && px cache-policy vm write-back >/dev/null
    (cd "$TMP" && fio --name=burst --ioengine=nbd --uri="nbd+unix:///vm?socket=$TMP/n.sock" \
        --rw=randwrite --bs=4k --iodepth=32 --size="$DISK" --time_based --runtime="$RUNTIME" \
        --end_fsync=1 --randrepeat=0 --output-format=json --output="$TMP/fio.json" \
        >"$TMP/fio.err" 2>&1) ||
        { cat "$TMP/fio.err"; exit 1; }
    local iops
    iops=$(fio_iops "$TMP/fio.json")
    if [ "$case" = write-back ]; then
        left=$(px --json status | python3 -c 'import json,sys; print(json.load(sys.stdin)["write_log"]["dirty_bytes"])')
        local t0 t1
        t0=$(date +%s.%N)
        while [ "$(px --json status | python3 -c 'import json,sys; print(json.load(sys.stdin)["write_log"]["dirty_bytes"])')" != 0 ]; do
            sleep 0.2
        done
        t1=$(date +%s.%N)
        destage=$(python3 -c "print(round($t1 - $t0, 2))")
    fi
    stop
    [ "$case" = local ] || stop_pool
    echo "$iops $left $destage" >"$TMP/result"
}

agg() { python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[2:]]; print(round(statistics.median(v) if sys.argv[1]=="median" else statistics.mean(v), 2))' "$AGG" "$@"; }

declare -A IOPS LEFT DESTAGE
for ((r = 1; r <= ROUNDS; r++)); do
    for c in local slow write-back; do
        one "$c"
        read -r i l d <"$TMP/result"
        echo "round $r $c: $i IOPS, $l bytes left in the log, destage ${d}s"
        IOPS[$c]+="$i "
        LEFT[$c]+="$l "
        DESTAGE[$c]+="$d "
    done
done

echo
echo "burst: fio 4 KiB random writes QD32 for ${RUNTIME}s on a ${DISK} disk; pool: nbdkit delay ${DELAY} rate ${RATE}; ${ROUNDS} round(s), ${AGG}"
local_iops=$(agg ${IOPS[local]})
printf '%-12s %10s %8s\n' case IOPS "vs local"
for c in local slow write-back; do
    v=$(agg ${IOPS[$c]})
    printf '%-12s %10s %8s\n' "$c" "$v" "$(python3 -c "print(f'{$v / $local_iops:.2f}x')")"
done
left=$(agg ${LEFT[write-back]})
destage=$(agg ${DESTAGE[write-back]})
echo "write-back: $(python3 -c "print(f'{$left / 2**20:.1f}')") MiB in the log when fio ended, destaged in ${destage}s" \
    "($(python3 -c "print(f'{$left / 2**20 / max($destage, 0.01):.1f}')") MiB/s; the pool's rate: ${RATE}/s, ${DELAY} per request)"
echo "target (issue 15): write-back at least 0.7x local; the destage at the pool's rate"
