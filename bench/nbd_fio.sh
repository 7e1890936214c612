#!/usr/bin/env bash
# First NBD performance figures: fio (nbd engine) against Parallax and
# qemu-nbd, side by side in one run, on the same file system, over Unix
# sockets. Servers alternate within every scenario (P, raw, qcow2, P, raw,
# qcow2, ...) and the best of ROUNDS is kept, so drift on a shared VM hits
# all of them alike.
#
#   bash bench/nbd_fio.sh                 # ROUNDS=2 RUNTIME=5 SIZE=1G
#   ROUNDS=3 RUNTIME=10 bash bench/nbd_fio.sh
#
# Parallax runs with --direct (O_DIRECT), like qemu-nbd --cache=none
# --aio=io_uring. Every target is filled with data before reads are timed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-2}"
RUNTIME="${RUNTIME:-5}"
SIZE="${SIZE:-1G}"
bash scripts/install-deps.sh
cargo build --release -q -p parallax
P="$PWD/target/release/parallax"

TMP=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" parallax-bench.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 0.5
    rm -rf "$TMP"
}
trap cleanup EXIT

# --- servers ---------------------------------------------------------------
# Two Parallax daemons: O_DIRECT (compare with --cache=none) and page-cached.
for mode in direct cached; do
    flag=""; [ "$mode" = direct ] && flag="--direct"
    "$P" --store "$TMP/$mode.px" init --size 8G >/dev/null
    "$P" --store "$TMP/$mode.px" serve $flag --nbd-listen none \
        --nbd-socket "$TMP/px-$mode.sock" >"$TMP/px-$mode.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do "$P" --store "$TMP/$mode.px" status >/dev/null 2>&1 && break; sleep 0.1; done
    "$P" --store "$TMP/$mode.px" create bench --size "$SIZE"
done

qemu-img create -q -f raw "$TMP/raw.img" "$SIZE"
qemu-img create -q -f qcow2 "$TMP/q.qcow2" "$SIZE"
qemu-nbd -f raw -k "$TMP/raw.sock" -x bench -t -e 8 --cache=none --aio=io_uring \
    --fork --pid-file="$TMP/raw.pid" "$TMP/raw.img"
qemu-nbd -f qcow2 -k "$TMP/q.sock" -x bench -t -e 8 --cache=none --aio=io_uring \
    --fork --pid-file="$TMP/q.pid" "$TMP/q.qcow2"
pids+=("$(cat "$TMP/raw.pid")" "$(cat "$TMP/q.pid")")

declare -A URI=(
    [parallax]="nbd+unix:///bench?socket=$TMP/px-direct.sock"
    [px-cached]="nbd+unix:///bench?socket=$TMP/px-cached.sock"
    [qemu-raw]="nbd+unix:///bench?socket=$TMP/raw.sock"
    [qemu-qcow2]="nbd+unix:///bench?socket=$TMP/q.sock"
)
SERVERS=(parallax px-cached qemu-raw qemu-qcow2)

# fio_run SERVER RW BS DEPTH [extra...] -> prints "iops MiB/s"
fio_run() {
    local server=$1 rw=$2 bs=$3 depth=$4
    shift 4
    fio --name=b --ioengine=nbd --uri="${URI[$server]}" --rw="$rw" --bs="$bs" \
        --iodepth="$depth" --size="$SIZE" --output-format=json "$@" >"$TMP/fio.json"
    python3 - "$TMP/fio.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]  # fio's nbd engine prints a line first
iops = j["read"]["iops"] + j["write"]["iops"]
bw = (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / 2**20
print(f"{iops:.0f} {bw:.1f}")
PY
}

echo "== filling every target with data (1 MiB sequential writes)"
declare -A FILL
for s in "${SERVERS[@]}"; do
    FILL[$s]=$(fio_run "$s" write 1M 8 --buffer_compress_percentage=0 --refill_buffers | awk '{print $2}')
done

SCENARIOS=(
    "randread-4k-qd1 randread 4k 1"
    "randread-4k-qd32 randread 4k 32"
    "randwrite-4k-qd1 randwrite 4k 1"
    "randwrite-4k-qd32 randwrite 4k 32"
    "read-1m-qd8 read 1M 8"
    "write-1m-qd8 write 1M 8"
)
declare -A BEST
for sc in "${SCENARIOS[@]}"; do
    read -r name rw bs depth <<<"$sc"
    for r in $(seq "$ROUNDS"); do
        for s in "${SERVERS[@]}"; do
            out=$(fio_run "$s" "$rw" "$bs" "$depth" --time_based --runtime="$RUNTIME")
            if [ "$bs" = 1M ]; then v=$(awk '{print $2}' <<<"$out"); else v=$(awk '{print $1}' <<<"$out"); fi
            key="$name/$s"
            if [ -z "${BEST[$key]:-}" ] || python3 -c "import sys; sys.exit(0 if $v > ${BEST[$key]} else 1)"; then
                BEST[$key]=$v
            fi
        done
    done
done

echo
echo "parallax = --direct (O_DIRECT); px-cached = page cache; qemu-nbd: --cache=none --aio=io_uring"
printf "%-18s %10s %10s %10s %10s %8s %8s %9s\n" scenario parallax px-cached qemu-raw qemu-qcow2 "P/raw" "P/qcow2" "Pc/raw"
for sc in "${SCENARIOS[@]}"; do
    read -r name rw bs depth <<<"$sc"
    p=${BEST[$name/parallax]}; c=${BEST[$name/px-cached]}; r=${BEST[$name/qemu-raw]}; q=${BEST[$name/qemu-qcow2]}
    unit=IOPS; [ "$bs" = 1M ] && unit=MiB/s
    python3 -c "
p,c,r,q=$p,$c,$r,$q
print(f'{\"$name\":<18} {p:>10.0f} {c:>10.0f} {r:>10.0f} {q:>10.0f} {p/r:>7.2f}x {p/q:>7.2f}x {c/r:>8.2f}x  ($unit)')"
done
echo
echo "fill (1 MiB sequential first write, MiB/s): parallax ${FILL[parallax]}, px-cached ${FILL[px-cached]}, qemu-raw ${FILL[qemu-raw]}, qemu-qcow2 ${FILL[qemu-qcow2]}"
