#!/usr/bin/env bash
# What `parallax diff` and `send | receive` cost, against their
# alternatives (docs/SEND.md; the targets of the diff/backup issue):
#
#   1. diff of a 1 TiB disk (2,000 blocks spread over it) with one 4 KiB
#      block changed between two snapshots: `parallax diff` through the
#      running daemon, against `qemu-img compare` of the two snapshot
#      exports (which stops at the first difference), `nbdcopy` of both to
#      null: (what finding every difference by reading reads) and of the
#      newer one (a full backup's read).                   target < 50 ms
#   2. The same on a 64 GiB disk holding 1 GiB written sequentially, with
#      1 GiB more written at random (4 KiB blocks, fio, no block twice)
#      between the snapshots.                                target < 2 s
#   3. `parallax send vm@b --from a -o - | parallax receive` of those 1 GiB
#      of changes into a replica that holds vm@a (stores opened by the
#      commands, no daemon), against `qemu-img convert -t writeback` of a
#      1 GiB raw file of random data to another raw file on the same disk
#      (both make their output durable).             target >= 0.8x qemu-img
#      Also with 1 GiB of changes written sequentially (vm@c from vm@b).
#
# Each timed command runs ROUNDS times (default 3), alternating with its
# peers, and the median is reported. Needs qemu-img, qemu-io, nbdcopy, fio
# with its nbd engine; about 5 GiB free in $TMPDIR.
#
# Usage: bench/diff.sh          PARALLAX_BIN=... ROUNDS=5 bench/diff.sh
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
rounds=${ROUNDS:-3}

for t in qemu-img qemu-io nbdcopy fio; do
    command -v "$t" >/dev/null || { echo "$t is required (scripts/install-deps.sh)" >&2; exit 1; }
done
if [ -n "${PARALLAX_BIN:-}" ]; then
    px="$PARALLAX_BIN"
else
    echo "== building the release binary" >&2
    (cd "$root" && cargo build --release -q -p parallax)
    px="${CARGO_TARGET_DIR:-$root/target}/release/parallax"
fi
[ -x "$px" ] || { echo "no binary at $px" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/parallax-diff.XXXXXX")"
daemon=""
stop_daemon() {
    if [ -n "$daemon" ]; then
        kill "$daemon" 2>/dev/null || true
        wait "$daemon" 2>/dev/null || true
        daemon=""
    fi
}
cleanup() {
    stop_daemon
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
cd "$work"
export PARALLAX_STORE="$work/src.px"
sock="$work/nbd.sock"

start_daemon() {
    "$px" serve --nbd-listen none --nbd-socket "$sock" >>serve.log 2>&1 &
    daemon=$!
    for _ in $(seq 100); do
        "$px" status >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "the daemon did not start" >&2
    cat serve.log >&2
    exit 1
}

# timed CMD...: runs it, prints its wall-clock seconds.
timed() {
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null
    end=$(date +%s.%N)
    awk -v s="$start" -v e="$end" 'BEGIN { printf "%.4f\n", e - s }'
}

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# record NAME CMD...: appends the time of one run of CMD to $work/t.NAME.
record() {
    local name=$1
    shift
    timed "$@" >>"t.$name"
}

uri() { echo "nbd+unix:///$1?socket=$sock"; }

"$px" init --size 6G >/dev/null
start_daemon

echo "== 1. a 1 TiB disk, 2,000 blocks spread over it, one block changed" >&2
"$px" create big --size 1T >/dev/null
cmds=()
for i in $(seq 0 1999); do cmds+=(-c "write -P $((i % 250 + 1)) $((i * 549755813 / 4096 * 4096)) 4k"); done
qemu-io -f raw "${cmds[@]}" "$(uri big)" >/dev/null
"$px" snapshot big@a >/dev/null
qemu-io -f raw -c "write -P 7 $((777 * 549755813 / 4096 * 4096)) 4k" "$(uri big)" >/dev/null
"$px" snapshot big@b >/dev/null
changed=$("$px" --json diff big@a big@b | awk -F: '/changed_bytes/ { gsub(/[ ,]/, "", $2); print $2 }')
[ "$changed" = 4096 ] || { echo "diff found $changed bytes changed, not 4096" >&2; exit 1; }
for _ in $(seq "$rounds"); do
    record big.diff "$px" --json diff big@a big@b
    record big.compare qemu-img compare -f raw -F raw "$(uri big@a)" "$(uri big@b)" || true
    record big.readboth sh -c "nbdcopy '$(uri big@a)' null: && nbdcopy '$(uri big@b)' null:"
    record big.copy nbdcopy "$(uri big@b)" null:
done

echo "== 2. a 64 GiB disk: 1 GiB written, then 1 GiB more at random" >&2
"$px" create vm --size 64G >/dev/null
fio --name=base --ioengine=nbd --uri="$(uri vm)" --rw=write --bs=1M --iodepth=8 \
    --size=1g --output=/dev/null
"$px" snapshot vm@a >/dev/null
fio --name=changes --ioengine=nbd --uri="$(uri vm)" --rw=randwrite --bs=4k --iodepth=32 \
    --size=64g --io_size=1g --randrepeat=0 --output=/dev/null
"$px" snapshot vm@b >/dev/null
changed=$("$px" --json diff vm@a vm@b | awk -F: '/changed_bytes/ { gsub(/[ ,]/, "", $2); print $2 }')
echo "   diff reports $changed bytes changed" >&2
# 1 GiB more, written sequentially, for the send of sequential changes.
fio --name=seq --ioengine=nbd --uri="$(uri vm)" --rw=write --bs=1M --iodepth=8 \
    --offset=8g --size=1g --output=/dev/null
"$px" snapshot vm@c >/dev/null
for _ in $(seq "$rounds"); do
    record vm.diff "$px" --json diff vm@a vm@b
    record vm.compare qemu-img compare -f raw -F raw "$(uri vm@a)" "$(uri vm@b)" || true
    record vm.readboth sh -c "nbdcopy '$(uri vm@a)' null: && nbdcopy '$(uri vm@b)' null:"
    record vm.copy nbdcopy "$(uri vm@b)" null:
done
stop_daemon

echo "== 3. send | receive of those changes, against qemu-img convert" >&2
"$px" --store replica.px init --size 6G >/dev/null
"$px" send vm@a -o - 2>/dev/null | "$px" --store replica.px receive vm >/dev/null
dd if=/dev/urandom of=changes.raw bs=1M count=1024 status=none
sync
for _ in $(seq "$rounds"); do
    rm -f out.raw
    sync
    record convert qemu-img convert -t writeback -f raw -O raw changes.raw out.raw
    sync
    record send sh -c "'$px' send vm@b --from a -o - 2>/dev/null | '$px' --store replica.px receive vm"
    # Back to vm@a on the replica, untimed.
    "$px" --store replica.px rollback vm@a >/dev/null
    "$px" --store replica.px delete vm@b >/dev/null
done
"$px" send vm@b --from a -o - 2>/dev/null | "$px" --store replica.px receive vm >/dev/null
for _ in $(seq "$rounds"); do
    sync
    record sendseq sh -c "'$px' send vm@c --from b -o - 2>/dev/null | '$px' --store replica.px receive vm"
    "$px" --store replica.px rollback vm@b >/dev/null
    "$px" --store replica.px delete vm@c >/dev/null
done

m() { median <"t.$1"; }
ms() { awk -v s="$(m "$1")" 'BEGIN { printf "%.1f ms", s * 1000 }'; }
ratio() { awk -v a="$(m "$1")" -v b="$(m "$2")" 'BEGIN { printf "%.2fx", b / a }'; }
mbps() { awk -v s="$(m "$1")" -v b="$2" 'BEGIN { printf "%.0f MB/s", b / s / 1e6 }'; }

cat <<EOF
# bench/diff.sh, $(date -u +%Y-%m-%dT%H:%MZ), $rounds rounds, medians

1. 1 TiB disk, one 4 KiB block changed
   parallax diff (through the daemon)     $(ms big.diff)      (target < 50 ms)
   qemu-img compare of the two exports    $(ms big.compare)   (stops at the first difference; diff is $(ratio big.diff big.compare) faster)
   nbdcopy of both exports to null:       $(ms big.readboth)  (what a comparison by reading reads; $(ratio big.diff big.readboth))
   nbdcopy of the newer export to null:   $(ms big.copy)      (a full backup's read; $(ratio big.diff big.copy))

2. 64 GiB disk, 1 GiB base, $changed bytes changed at random
   parallax diff (through the daemon)     $(ms vm.diff)      (target < 2 s)
   qemu-img compare of the two exports    $(ms vm.compare)   (stops at the first difference; diff is $(ratio vm.diff vm.compare) faster)
   nbdcopy of both exports to null:       $(ms vm.readboth)  (what a comparison by reading reads; $(ratio vm.diff vm.readboth))
   nbdcopy of the newer export to null:   $(ms vm.copy)      (a full backup's read; $(ratio vm.diff vm.copy))

3. 1 GiB of changes
   qemu-img convert, 1 GiB raw to raw     $(ms convert)  $(mbps convert 1073741824)
   send --from | receive, random 4 KiB    $(ms send)  $(mbps send $changed)  $(awk -v s="$(m send)" -v c="$(m convert)" -v b="$changed" 'BEGIN { printf "%.2fx", (b / s) / (1073741824 / c) }') of qemu-img (target >= 0.8x)
   send --from | receive, sequential      $(ms sendseq)  $(mbps sendseq 1073741824)  $(ratio sendseq convert) of qemu-img
EOF
