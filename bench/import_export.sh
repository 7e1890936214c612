#!/usr/bin/env bash
# Import/export throughput of `parallax` against `qemu-img convert`.
#
# Builds the release binary, then in a fresh temporary directory makes a
# 1 GiB raw image whose first half is random data and second half a hole,
# and a qcow2 copy of it. Each operation is timed side by side with its
# qemu-img counterpart, alternating (qemu-img, parallax, qemu-img,
# parallax) over 2 rounds:
#
#   import raw    qemu-img convert -t writeback -f raw   -O raw IMG.raw   OUT.raw  vs  parallax import IMG.raw DISK
#   import qcow2  qemu-img convert -t writeback -f qcow2 -O raw IMG.qcow2 OUT.raw  vs  parallax import IMG.qcow2 DISK
#   export        qemu-img convert -t writeback -f qcow2 -O raw IMG.qcow2 OUT.raw  vs  parallax export DISK OUT.raw
#
# Nothing is dropped from the page cache: the source image is warm after
# the first run, for both tools alike. Both tools write sparse output and
# make it durable before they exit: parallax always fsyncs, and qemu-img
# runs with `-t writeback` (its convert default, `unsafe`, never syncs).
# Dirty pages left by one run are synced, untimed, before the next.
# MB/s is the virtual size (1 GiB) over the wall-clock time, MB = 10^6 bytes.
#
# Usage: bench/import_export.sh   (needs qemu-img; about 3 GiB free in $TMPDIR)
#        PARALLAX_BIN=/path/to/parallax bench/import_export.sh   (skips the build)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
rounds=2
size_mib=1024

command -v qemu-img >/dev/null || { echo "qemu-img is required (apt-get install qemu-utils)" >&2; exit 1; }

if [ -n "${PARALLAX_BIN:-}" ]; then
    px="$PARALLAX_BIN"
else
    echo "== building the release binary" >&2
    (cd "$root" && cargo build --release -q -p parallax)
    px="${CARGO_TARGET_DIR:-$root/target}/release/parallax"
fi
[ -x "$px" ] || { echo "no binary at $px" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/parallax-bench.XXXXXX")"
child=""
cleanup() {
    if [ -n "$child" ]; then kill "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export PARALLAX_STORE="$work/store.px"
cd "$work"

echo "== making a ${size_mib} MiB image (half random, half hole) in $work" >&2
dd if=/dev/urandom of=img.raw bs=1M count=$((size_mib / 2)) status=none
truncate -s "${size_mib}M" img.raw
qemu-img convert -f raw -O qcow2 img.raw img.qcow2
"$px" init --size 4G
"$px" import img.raw src

# run CMD...: runs it in the background (so that the trap can stop it)
# and sets $elapsed to its wall-clock seconds.
elapsed=""
run() {
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null &
    child=$!
    wait "$child"
    child=""
    end=$(date +%s.%N)
    elapsed=$(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }')
}

# Untimed preparation before each timed command.
prepare() {
    rm -f out.raw
    "$px" delete dst >/dev/null 2>&1 || true
    sync
}

ops=("import raw" "import qcow2" "export")
qemu_cmd() {
    case "$1" in
        "import raw") echo "qemu-img convert -t writeback -f raw -O raw img.raw out.raw" ;;
        *) echo "qemu-img convert -t writeback -f qcow2 -O raw img.qcow2 out.raw" ;;
    esac
}
parallax_cmd() {
    case "$1" in
        "import raw") echo "$px import img.raw dst" ;;
        "import qcow2") echo "$px import img.qcow2 dst" ;;
        "export") echo "$px export src out.raw" ;;
    esac
}

declare -A times
for round in $(seq 1 "$rounds"); do
    for op in "${ops[@]}"; do
        for tool in qemu-img parallax; do
            prepare
            if [ "$tool" = qemu-img ]; then cmd=$(qemu_cmd "$op"); else cmd=$(parallax_cmd "$op"); fi
            # shellcheck disable=SC2086 # the commands hold no quoted words
            run $cmd
            times["$op|$tool|$round"]=$elapsed
            echo "   round $round  $op  $tool  ${elapsed}s" >&2
        done
    done
done
prepare
"$px" check >/dev/null

mbps() { awk -v s="$1" -v mib="$size_mib" 'BEGIN { printf "%.0f", mib * 1048576 / 1e6 / s }'; }
best() { awk -v a="$1" -v b="$2" 'BEGIN { print (a < b ? a : b) }'; }

echo
echo "parallax $("$px" --version | cut -d' ' -f2), $(qemu-img --version | head -1)"
echo "image: ${size_mib} MiB virtual, 512 MiB random data + 512 MiB hole; $rounds rounds, alternating"
echo
printf "%-13s %-9s %9s %9s %12s\n" operation tool "round 1" "round 2" "best MB/s"
for op in "${ops[@]}"; do
    for tool in qemu-img parallax; do
        t1=${times["$op|$tool|1"]}
        t2=${times["$op|$tool|2"]:-$t1}
        printf "%-13s %-9s %8ss %8ss %12s\n" "$op" "$tool" "$t1" "$t2" "$(mbps "$(best "$t1" "$t2")")"
    done
done
echo
printf "%-13s %s\n" operation "parallax / qemu-img (best MB/s; above 1 = parallax faster)"
for op in "${ops[@]}"; do
    q=$(best "${times["$op|qemu-img|1"]}" "${times["$op|qemu-img|2"]:-${times["$op|qemu-img|1"]}}")
    p=$(best "${times["$op|parallax|1"]}" "${times["$op|parallax|2"]:-${times["$op|parallax|1"]}}")
    printf "%-13s %s\n" "$op" "$(awk -v q="$q" -v p="$p" 'BEGIN { printf "%.2fx", q / p }')"
done
