# shellcheck shell=bash disable=SC2034,SC2153 # variables shared with bench/lib.sh
# Scenario e: control-plane latency and its flatness.
#   1. E_CLONES clones of one gold snapshot (gold: a disk of SIZE_C, filled).
#   2. E_SNAPS snapshots of one disk (SIZE_C, filled) while fio writes it:
#      4 KiB random writes at QD8, time_based, started before and stopped
#      after the loop; its IOPS during the loop are reported.
#   Every operation is one HTTP request to the control socket, timed by curl
#   (time_total: process start-up excluded). Parallax --direct daemon.
#   Context (E_QCOW2 > 0): `qemu-img snapshot -c` on a filled qcow2 of the
#   same size, and the `parallax snapshot` command (both timed with process
#   start-up, which curl's figures exclude).
[ -n "${BENCH_LIB:-}" ] || { echo "run through bench/run.sh" >&2; exit 2; }
declare -gA URI PIDOF STORE # from bench/lib.sh

TSIZE=$SIZE_C
px_start parallax --direct
px parallax create gold --size "$SIZE_C"
px parallax create busy --size "$SIZE_C"
URI[gold]=$(px_uri parallax gold)
URI[busy]=$(px_uri parallax busy)
fill "gold busy"
px_api parallax POST /v1/disks/gold/snapshots '{"name":"v1"}' >/dev/null

log "== $E_CLONES clones of gold@v1"
: >"$SDIR/clones.txt"
for ((i = 1; i <= E_CLONES; i++)); do
    px_api parallax POST /v1/disks/gold/snapshots/v1/clone "{\"name\":\"vm$i\"}" >>"$SDIR/clones.txt"
done

rss_clones=$(rss parallax)
log "== baseline: fio on busy without snapshots (4k randwrite QD8, ${RUNTIME}s)"
measure_once baseline 1 busy --rw=randwrite --bs=4k --iodepth=8 --time_based --runtime="$RUNTIME"
base_iops=$(awk -F'\t' '$1 == "baseline" { printf "%.0f", $4 }' "$SDIR/results.tsv")
log "== $E_SNAPS snapshots of busy while fio writes it (4k randwrite QD8)"
(cd "$SDIR" && exec fio --name=b --ioengine=nbd --uri="${URI[busy]}" --size="$TSIZE" --rw=randwrite \
    --bs=4k --iodepth=8 --time_based --runtime=36000 --output-format=json >"$SDIR/bg.json" 2>"$SDIR/bg.err") &
fio_pid=$!
track "$fio_pid" fio-background
sleep 1
: >"$SDIR/snaps.txt"
t0=$(now)
for ((i = 1; i <= E_SNAPS; i++)); do
    px_api parallax POST /v1/disks/busy/snapshots "{\"name\":\"s$i\"}" >>"$SDIR/snaps.txt"
done
loop_s=$(since "$t0")
rss_snaps=$(rss parallax)
sleep 1
stop_pid "$fio_pid" 30 || true
bg_iops=$(fio_parse "$SDIR/bg.json" | awk '{printf "%.0f", $1}') || bg_iops="?"
grep -v 'connected to NBD' "$SDIR/bg.err" | head -5 || true

if [ "$E_QCOW2" -gt 0 ]; then
    log "== context: $E_QCOW2 x qemu-img snapshot -c on a filled qcow2, $E_QCOW2 x parallax snapshot (CLI)"
    qemu-img create -q -f qcow2 "$SDIR/q.qcow2" "$SIZE_C"
    qnbd_start qemu-qcow2 qcow2 "$SDIR/q.qcow2" --cache=none --aio=io_uring
    fill qemu-qcow2
    stop_pid "${PIDOF[qemu-qcow2]}"
    : >"$SDIR/qsnaps.txt"
    : >"$SDIR/clisnaps.txt"
    for ((i = 1; i <= E_QCOW2; i++)); do
        t0=$(now)
        qemu-img snapshot -c "s$i" "$SDIR/q.qcow2"
        echo "$(now) $t0" | awk '{ printf "%.6f\n", $1 - $2 }' >>"$SDIR/qsnaps.txt"
        t0=$(now)
        px parallax snapshot "gold@cli$i" >/dev/null
        echo "$(now) $t0" | awk '{ printf "%.6f\n", $1 - $2 }' >>"$SDIR/clisnaps.txt"
    done
fi

px_check parallax
log "   df: $(px_df parallax)"
rss_after=$(rss parallax)
px_stop parallax

echo
echo "--- scenario e: time per control operation (ms), curl time_total on the control socket"
pctl_header
pctl_report "clone of gold@v1 (idle disk)" "$SDIR/clones.txt"
pctl_report "snapshot of busy (fio 4k randwrite QD8)" "$SDIR/snaps.txt"
if [ "$E_QCOW2" -gt 0 ]; then
    pctl_report "context: qemu-img snapshot -c (process)" "$SDIR/qsnaps.txt"
    pctl_report "context: parallax snapshot CLI (process)" "$SDIR/clisnaps.txt"
fi
echo "  fio on busy during the $E_SNAPS snapshots (${loop_s} s, plus 1 s before and after): $bg_iops IOPS"
echo "  (4k randwrite QD8; the curl processes of the loop share the 2 CPUs with fio and the daemon);"
echo "  the same job without snapshots, just before: $base_iops IOPS."
echo "  gold and busy: ${SIZE_C}, filled. first-100/last-100 = medians of the first and last 100 ops (flatness)."
echo "  daemon VmRSS / VmHWM (MiB): after the clones $(awk '{print $1 " / " $2}' <<<"$rss_clones"),"
echo "  after the snapshots $(awk '{print $1 " / " $2}' <<<"$rss_snaps"), after check $(awk '{print $1 " / " $2}' <<<"$rss_after")."
