# shellcheck shell=bash disable=SC2034,SC2153 # variables shared with bench/lib.sh
# Scenario c: copy-on-write. Fill a disk, take a snapshot, then write every
# 4 KiB block of the disk exactly once in random order at QD32 (fio randwrite
# without time_based: fio's random map hits each block once): the first
# pass pays the copy-on-write of every block. A second pass then writes
# blocks the disk owns again (in place). Snapshot and both passes are
# repeated every round (snapshot s<round>).
#   Parallax: snapshot through the control API while the daemon serves.
#   qcow2: internal snapshot; qemu-nbd stopped, `qemu-img snapshot -c`, restarted.
#   qemu-raw: no snapshot, for context (raw cannot snapshot).
[ -n "${BENCH_LIB:-}" ] || { echo "run through bench/run.sh" >&2; exit 2; }
declare -gA URI PIDOF STORE # from bench/lib.sh

TSIZE=$SIZE_C
px_start parallax --direct
px parallax create bench --size "$SIZE_C"
URI[parallax]=$(px_uri parallax bench)
qemu-img create -q -f raw "$SDIR/raw.img" "$SIZE_C"
qemu-img create -q -f qcow2 "$SDIR/q.qcow2" "$SIZE_C"
qnbd_start qemu-raw raw "$SDIR/raw.img" --cache=none --aio=io_uring
qnbd_start qemu-qcow2 qcow2 "$SDIR/q.qcow2" --cache=none --aio=io_uring

T="parallax qemu-qcow2 qemu-raw"
fill "$T"

ms_since() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.1f", (e - s) * 1000 }'; }
log "== $ROUNDS round(s): snapshot, then 2 passes of $(($(to_bytes "$SIZE_C") / 4096)) random 4k writes at QD32 per target"
for ((r = 1; r <= ROUNDS; r++)); do
    api=$(px_api parallax POST /v1/disks/bench/snapshots "{\"name\":\"s$r\"}")
    api_s=${api#* }
    t0=$(now)
    stop_pid "${PIDOF[qemu-qcow2]}"
    qemu-img snapshot -c "s$r" "$SDIR/q.qcow2"
    qnbd_start qemu-qcow2 qcow2 "$SDIR/q.qcow2" --cache=none --aio=io_uring
    log "   r$r snapshot s$r: parallax $(awk -v s="$api_s" 'BEGIN { printf "%.1f", s * 1000 }') ms (API call);" \
        "qcow2 $(ms_since "$t0") ms (stop qemu-nbd + qemu-img snapshot -c + restart)"
    measure_once cow-pass1 "$r" "$T" --rw=randwrite --bs=4k --iodepth=32
    measure_once cow-pass2 "$r" "$T" --rw=randwrite --bs=4k --iodepth=32
done

px_check parallax
px_stop parallax

echo
print_table "scenario c: first write after a snapshot, 4k randwrite QD32, every block of ${SIZE_C} once" "$T" \
    "P/qcow2=parallax/qemu-qcow2 P/raw=parallax/qemu-raw" \
    "cow-pass1:iops:pass 1, after snapshot" "cow-pass1:lat:pass 1, after snapshot" \
    "cow-pass1:p99:pass 1, after snapshot" \
    "cow-pass2:iops:pass 2, blocks owned" "cow-pass2:lat:pass 2, blocks owned"
echo "  qemu-raw has no snapshot (context only: the cost of the same writes without copy-on-write)."
echo "  Target for pass 1: parallax/qemu-qcow2 >= 1.5x. qcow2 copies on write per 64 KiB cluster,"
echo "  Parallax per 4 KiB block."
