#!/usr/bin/env bash
# Parallax benchmark suite: one runner, one script per scenario (bench/scenarios/).
#
#   bash bench/run.sh                  # every scenario; ROUNDS=2 RUNTIME=5 SIZE=1G (~16 min on 2 vCPUs)
#   bash bench/run.sh a c              # chosen scenarios
#   QUICK=1 bash bench/run.sh          # smoke test: tiny sizes, RUNTIME=1, ROUNDS=1
#   PARALLAX_BIN=/path/to/parallax bash bench/run.sh   # skip `cargo build`
#
# Scenarios
#   a  4 KiB random read/write at QD1 and QD32, 1 MiB sequential read/write at
#      QD8, 70/30 random read/write at QD32, against qemu-nbd and the ceilings
#   b  4 KiB random writes with a FLUSH after every write (QD1) / every 32 (QD32)
#   c  copy-on-write: the first 4 KiB random write pass over a disk right after
#      a snapshot (Parallax vs qcow2 internal snapshots), then a second pass
#   d  reads through a clone DEPTH (100) generations deep vs the plain disk
#      (Parallax clones vs a qcow2 backing chain)
#   e  control-plane latency: 1,000 clones of one snapshot, 1,000 snapshots of a
#      disk that fio writes meanwhile (curl's time_total on the control socket)
#   f  daemon memory (idle, 100 disks, 100 open NBD connections) and metadata
#      bytes per GiB of data written (sequential and random 4 KiB fill)
#   g  4 KiB random writes at QD32 with a snapshot every 10 ms (retention
#      keeping the last 100) against the same disk without a schedule
#
# Methodology
# - Same machine, same run, same file system (a fresh directory under
#   ${BENCH_DIR:-/var/tmp}, checked to support O_DIRECT), same client: fio
#   --ioengine=nbd over Unix sockets for every NBD server. The runner starts
#   and stops every server itself, by PID.
# - Like-for-like pairs: `parallax` (serve --direct, O_DIRECT) is compared with
#   qemu-nbd --cache=none --aio=io_uring on raw (`qemu-raw`) and qcow2
#   (`qemu-qcow2`); `px-cached` (serve, page cache) only with qemu-nbd's
#   default writeback cache (`qemu-raw-default`). qemu-nbd runs with -t -e 8.
# - Ceilings (scenario a): `disk` = fio --ioengine=io_uring --direct=1 on a
#   local file of the same file system, same bs/iodepth/rw; `nbdkit-mem` =
#   nbdkit's memory plugin with the same fio nbd job. ceiling = min of the two
#   (for latencies: the max).
# - Fill before read: every target is first written completely with 1 MiB
#   sequential writes of non-compressible data (fio --refill_buffers
#   --buffer_compress_percentage=0), then `sync`; that first write is reported
#   too. ext4 answers reads of unwritten extents without I/O, and thin stores
#   answer reads of unallocated blocks with zeros, so reading before writing
#   would measure nothing.
# - Alternation: within each measurement the targets take turns (A, B, C, A,
#   B, C, ... for ROUNDS rounds), so drift on a shared VM hits all alike.
#   Measurements are time_based runs of RUNTIME seconds, except the
#   copy-on-write passes of c (each block written exactly once).
# - Reported: the BEST of the rounds (max IOPS or MiB/s, min latency);
#   AGG=median reports the median instead. Every single run is printed too.
#   Ratios are A/B of the reported figures.
# - The whole output also goes to bench/results/run-<date>.txt.
#
# Knobs (environment): ROUNDS RUNTIME SIZE AGG BENCH_DIR PARALLAX_BIN QUICK
#   SIZE_C (c: disk size, default 256M: one pass = 65,536 writes)
#   DEPTH (d: 100)  E_CLONES E_SNAPS (e: 1000 each)  E_EVERY_MS (e: 20, one
#   snapshot request per 20 ms)  E_QCOW2 (e: 100 qcow2
#   snapshots for context, 0 = skip)  F_DISKS F_MIB (f: 100 disks, 16 MiB each)
#   META_SIZE (f: 1G written per fill pattern)  G_EVERY G_KEEP (g: 10ms, 100)
#   G_AGED=1 (g: the store file written whole first; see g-schedule.sh)
#   PX_SERVE_ARGS (options added to every parallax daemon, e.g. --journal)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ "${QUICK:-0}" = 1 ]; then
    ROUNDS=${ROUNDS:-1} RUNTIME=${RUNTIME:-1} SIZE=${SIZE:-64M} SIZE_C=${SIZE_C:-32M}
    DEPTH=${DEPTH:-10} E_CLONES=${E_CLONES:-50} E_SNAPS=${E_SNAPS:-50} E_QCOW2=${E_QCOW2:-10}
    F_DISKS=${F_DISKS:-10} F_MIB=${F_MIB:-1} META_SIZE=${META_SIZE:-64M}
fi
ROUNDS=${ROUNDS:-2} RUNTIME=${RUNTIME:-5} SIZE=${SIZE:-1G} SIZE_C=${SIZE_C:-256M}
DEPTH=${DEPTH:-100} E_CLONES=${E_CLONES:-1000} E_SNAPS=${E_SNAPS:-1000} E_QCOW2=${E_QCOW2:-100}
F_DISKS=${F_DISKS:-100} F_MIB=${F_MIB:-16} META_SIZE=${META_SIZE:-1G} AGG=${AGG:-best}
E_EVERY_MS=${E_EVERY_MS:-20}
export ROUNDS RUNTIME SIZE SIZE_C DEPTH E_CLONES E_SNAPS E_EVERY_MS E_QCOW2 F_DISKS F_MIB META_SIZE AGG

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

# --- which scenarios -------------------------------------------------------------
all=()
for f in "$ROOT"/bench/scenarios/?-*.sh; do all+=("$(basename "$f" | cut -c1)"); done
chosen=("$@")
[ ${#chosen[@]} -gt 0 ] || chosen=("${all[@]}")
for s in "${chosen[@]}"; do
    compgen -G "$ROOT/bench/scenarios/$s-*.sh" >/dev/null ||
        { echo "unknown scenario '$s' (have: ${all[*]})" >&2; exit 2; }
done

# --- output: the terminal and the results file -------------------------------------
mkdir -p "$ROOT/bench/results"
suffix=""
[ "${QUICK:-0}" = 1 ] && suffix=-quick
RESULT="$ROOT/bench/results/run-$(date +%Y%m%d-%H%M%S)$suffix.txt"
exec 3>&1 4>&2
exec > >(tee -i "$RESULT") 2>&1 # tee -i: survives Ctrl-C and writes the last lines
TEE_PID=$!

TMP=""
SDIR=""
SCEN_PID=""
interrupted=0
failed=()
# Ctrl-C or SIGTERM: the scenario runs in the background (see below), so the
# signal reaches this trap at once; stop the scenario and its servers, exit.
on_signal() {
    trap - INT TERM
    interrupted=1
    echo
    echo "!! interrupted: stopping the scenario and every process it started"
    if [ -n "$SCEN_PID" ]; then
        kill -TERM "$SCEN_PID" 2>/dev/null || true
        [ -n "$SDIR" ] && stop_all "$SDIR" quiet
        wait "$SCEN_PID" 2>/dev/null || true
    fi
    exit "$1"
}
finish() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        for d in "$TMP"/*/; do [ -d "$d" ] && stop_all "${d%/}"; done
        stop_strays "$TMP"
        rm -rf "$TMP"
    fi
    if [ "$rc" != 0 ] && [ ${#failed[@]} = 0 ] && [ "$interrupted" = 0 ]; then echo "!! failed (status $rc)"; fi
    echo "== output written to ${RESULT#"$ROOT"/}"
    exec 1>&3 2>&4 3>&- 4>&-
    wait "$TEE_PID" 2>/dev/null || true
    exit "$rc"
}
trap finish EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

start_all=$(now)
echo "== Parallax benchmark suite: scenarios ${chosen[*]}; $(date -u +%FT%TZ) on $(hostname)"
echo "   ROUNDS=$ROUNDS RUNTIME=${RUNTIME}s SIZE=$SIZE AGG=$AGG QUICK=${QUICK:-0}; $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg)"

bash scripts/install-deps.sh
if [ -n "${PARALLAX_BIN:-}" ]; then
    P="$PARALLAX_BIN"
else
    echo "== cargo build --release -q -p parallax"
    cargo build --release -q -p parallax
    P="${CARGO_TARGET_DIR:-$ROOT/target}/release/parallax"
fi
[ -x "$P" ] || { echo "no parallax binary at $P" >&2; exit 1; }
P="$(cd "$(dirname "$P")" && pwd)/$(basename "$P")"
echo "   $P: $(sha256sum "$P" | cut -c1-12), built $(date -u -r "$P" +%FT%TZ)"
echo "   $("$P" --version), $(qemu-nbd --version | head -1), $(fio --version), nbdkit $(nbdkit --version | awk '{print $2}')"

TMP=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" parallax-bench.XXXXXX)
dd if=/dev/zero of="$TMP/odirect" bs=4096 count=1 oflag=direct status=none 2>/dev/null ||
    { echo "O_DIRECT does not work in $TMP (tmpfs?): set BENCH_DIR to a directory on a disk" >&2; exit 1; }
rm -f "$TMP/odirect"
echo "   work directory $TMP ($(df -T "$TMP" | awk 'NR==2 {print $2 " on " $1}'))"

for s in "${chosen[@]}"; do
    script=$(compgen -G "$ROOT/bench/scenarios/$s-*.sh" | head -1)
    SDIR="$TMP/$s"
    mkdir -p "$SDIR"
    : >"$SDIR/results.tsv"
    echo
    echo "=================== scenario $(basename "$script" .sh) ==================="
    t0=$(now)
    # The scenario runs in a subshell in the background and the runner waits
    # for it: `wait` returns at once on Ctrl-C (a foreground subshell would
    # delay or swallow the signal), and `( ... ) || rc=$?` would switch off
    # set -e inside the subshell. It stops its own processes when it exits.
    (
        set -e
        trap 'exit 143' TERM
        trap 'stop_all "$SDIR" quiet' EXIT
        # shellcheck disable=SC1090 # chosen at run time
        source "$script"
    ) &
    SCEN_PID=$!
    rc=0
    wait "$SCEN_PID" || rc=$?
    SCEN_PID=""
    stop_all "$SDIR"
    stop_strays "$SDIR"
    rm -rf "$SDIR"
    if [ "$rc" = 130 ] || [ "$rc" = 143 ]; then exit "$rc"; fi
    if [ "$rc" != 0 ]; then
        failed+=("$s")
        echo "!! scenario $s FAILED (status $rc)"
    fi
    echo "== scenario $s: $(since "$t0") s elapsed"
done

echo
echo "== all done in $(since "$start_all") s; $([ ${#failed[@]} = 0 ] && echo "every scenario completed" || echo "FAILED: ${failed[*]}")"
[ ${#failed[@]} = 0 ]
