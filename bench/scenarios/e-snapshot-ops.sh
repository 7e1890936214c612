# shellcheck shell=bash disable=SC2034,SC2153 # variables shared with bench/lib.sh
# Scenario e: control-plane latency and its flatness.
#   1. E_CLONES clones of one gold snapshot (gold: a disk of SIZE_C, filled).
#   2. E_SNAPS snapshots of one disk (SIZE_C, filled) while fio writes it
#      (4 KiB random writes at QD8, started before and stopped after the
#      loop; its IOPS during the loop are reported), answered once taken
#      (`"durable": false`); then E_SNAPS/5 answered once durable.
#   The operations are made by one client on one connection to the control
#   socket (bench/api_loop.py), snapshots one every E_EVERY_MS, and timed
#   from request to answer. Parallax --direct daemon.
#   Context (E_QCOW2 > 0): `qemu-img snapshot -c` on a filled qcow2 of the
#   same size, and the `parallax snapshot` command (both timed with process
#   start-up).
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
python3 "$ROOT/bench/api_loop.py" "${STORE[parallax]}.control" POST /v1/disks/gold/snapshots/v1/clone \
    '{"name":"vm{i}"}' "$E_CLONES" >"$SDIR/clones.txt" || die "clone loop failed"

rss_clones=$(rss parallax)
log "== baseline: fio on busy without snapshots (4k randwrite QD8, ${RUNTIME}s)"
measure_once baseline 1 busy --rw=randwrite --bs=4k --iodepth=8 --time_based --runtime="$RUNTIME"
base_iops=$(awk -F'\t' '$1 == "baseline" { printf "%.0f", $4 }' "$SDIR/results.tsv")
# snapshot_loop FILE N BODY: N snapshots of busy, one every E_EVERY_MS, by
# one client on one connection, while fio writes busy; sets loop_s and
# bg_iops (fio's IOPS from 1 s before the loop to 1 s after).
snapshot_loop() {
    local file=$1 n=$2 body=$3 t0 fio_pid
    (cd "$SDIR" && exec fio --name=b --ioengine=nbd --uri="${URI[busy]}" --size="$TSIZE" --rw=randwrite \
        --bs=4k --iodepth=8 --time_based --runtime=36000 --output-format=json >"$SDIR/bg.json" 2>"$SDIR/bg.err") &
    fio_pid=$!
    track "$fio_pid" fio-background
    sleep 1
    t0=$(now)
    python3 "$ROOT/bench/api_loop.py" "${STORE[parallax]}.control" POST /v1/disks/busy/snapshots \
        "$body" "$n" --every-ms "$E_EVERY_MS" >"$file" || die "snapshot loop failed"
    loop_s=$(since "$t0")
    sleep 1
    stop_pid "$fio_pid" 30 || true
    bg_iops=$(fio_parse "$SDIR/bg.json" | awk '{printf "%.0f", $1}') || bg_iops="?"
    grep -v 'connected to NBD' "$SDIR/bg.err" | head -5 || true
}

E_DURABLE=$(((E_SNAPS + 4) / 5))
log "== $E_SNAPS snapshots of busy (answered when taken), one per ${E_EVERY_MS} ms, while fio writes it (4k randwrite QD8)"
snapshot_loop "$SDIR/snaps.txt" "$E_SNAPS" '{"name":"s{i}","durable":false}'
loop_taken=$loop_s iops_taken=$bg_iops
rss_snaps=$(rss parallax)
log "== $E_DURABLE snapshots of busy (answered when durable), one per ${E_EVERY_MS} ms, while fio writes it"
snapshot_loop "$SDIR/dsnaps.txt" "$E_DURABLE" '{"name":"d{i}"}'
loop_durable=$loop_s iops_durable=$bg_iops

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
echo "--- scenario e: time per control operation (ms), request to answer on the control socket"
pctl_header
pctl_report "clone of gold@v1 (idle disk)" "$SDIR/clones.txt"
pctl_report "snapshot of busy, answered when taken" "$SDIR/snaps.txt"
pctl_report "snapshot of busy, answered when durable" "$SDIR/dsnaps.txt"
if [ "$E_QCOW2" -gt 0 ]; then
    pctl_report "context: qemu-img snapshot -c (process)" "$SDIR/qsnaps.txt"
    pctl_report "context: parallax snapshot CLI (process)" "$SDIR/clisnaps.txt"
fi
echo "  fio on busy (4k randwrite QD8) without snapshots, just before: $base_iops IOPS;"
echo "  during the $E_SNAPS snapshots answered when taken (${loop_taken} s, plus 1 s before and after): $iops_taken IOPS;"
echo "  during the $E_DURABLE answered when durable (${loop_durable} s, plus 1 s before and after): $iops_durable IOPS."
echo "  Snapshots: one client (bench/api_loop.py) on one control connection, one request every ${E_EVERY_MS} ms;"
echo "  clones: the same client, back to back. Durable: the snapshot is on the device when the answer comes;"
echo "  taken: it is fixed in memory (listed, readable) and made durable in the background right after."
echo "  gold and busy: ${SIZE_C}, filled. first-100/last-100 = medians of the first and last 100 ops (flatness)."
echo "  daemon VmRSS / VmHWM (MiB): after the clones $(awk '{print $1 " / " $2}' <<<"$rss_clones"),"
echo "  after the snapshots $(awk '{print $1 " / " $2}' <<<"$rss_snaps"), after check $(awk '{print $1 " / " $2}' <<<"$rss_after")."
