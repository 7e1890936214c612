# shellcheck shell=bash disable=SC2034,SC2153 # variables shared with bench/lib.sh
# Scenario g: the price of frequent snapshots. 4 KiB random writes at QD32,
# alternating between two disks of one Parallax --direct daemon (SIZE each,
# filled): `plain`, never snapshotted, and `sched`, with `schedule --every
# G_EVERY --keep-last G_KEEP` switched on for its runs (retention deletes one
# old snapshot with each new one, so snapshot creation and reclamation both
# run under the load) and off between them. Each scheduled run reports how
# many snapshots it took.
#
# G_AGED=1 first writes a ballast disk over most of the store file and
# deletes it, so that no write of the runs makes the file system allocate
# (an aged store, or one on a block device): on a fresh, sparse store file
# every copy-on-write of the scheduled disk allocates file blocks (ext4
# allocation, and the flushes that commit it), which the unscheduled disk,
# writing in place, never does.
[ -n "${BENCH_LIB:-}" ] || { echo "run through bench/run.sh" >&2; exit 2; }
declare -gA URI PIDOF STORE # from bench/lib.sh

TSIZE=$SIZE
G_EVERY=${G_EVERY:-10ms}
G_KEEP=${G_KEEP:-100}
px_start parallax --direct
if [ -n "${G_AGED:-}" ]; then
    ballast=$(($(numfmt --from=iec "${PX_STORE_SIZE:-16G}") * 9 / 10 >> 20))
    log "== ageing the store: a ${ballast} MiB ballast disk written and deleted"
    px parallax create ballast --size "${ballast}M"
    fio --name=ballast --ioengine=nbd --uri="$(px_uri parallax ballast)" --size="${ballast}M" \
        --rw=write --bs=1M --iodepth=8 --output-format=terse >/dev/null 2>&1
    px parallax delete ballast >/dev/null
fi
px parallax create plain --size "$SIZE"
px parallax create sched --size "$SIZE"
URI[none]=$(px_uri parallax plain)
URI[every-$G_EVERY]=$(px_uri parallax sched)
fill "none every-$G_EVERY"

newest_id() {
    px parallax snapshots sched --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(s[-1]["id"] if s else 0)'
}

log "== measuring: $ROUNDS round(s) of ${RUNTIME}s, no schedule / schedule every $G_EVERY keep-last $G_KEEP"
: >"$SDIR/snaps.txt"
for ((r = 1; r <= ROUNDS; r++)); do
    measure_once randwrite-qd32 "$r" none --rw=randwrite --bs=4k --iodepth=32 --time_based --runtime="$RUNTIME"
    px parallax schedule sched --every "$G_EVERY" --keep-last "$G_KEEP" >/dev/null
    before=$(newest_id)
    measure_once randwrite-qd32 "$r" "every-$G_EVERY" --rw=randwrite --bs=4k --iodepth=32 --time_based --runtime="$RUNTIME"
    px parallax schedule sched --off >/dev/null
    after=$(newest_id)
    kept=$(px parallax snapshots sched --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
    echo "r$r $((after - before)) $kept" >>"$SDIR/snaps.txt"
    log "   r$r: $((after - before)) snapshots taken during the scheduled run (${RUNTIME}s); $kept kept"
done

px_check parallax
log "   df: $(px_df parallax)"
px_stop parallax

echo
print_table "scenario g: 4k random writes QD32 with and without a snapshot schedule, ${SIZE} disk, ${RUNTIME}s runs" \
    "none every-$G_EVERY" "sched/none=every-$G_EVERY/none" \
    "randwrite-qd32:iops:4k randwrite QD32" "randwrite-qd32:lat:4k randwrite QD32" \
    "randwrite-qd32:p99:4k randwrite QD32"
awk -v rt="$RUNTIME" '{ n += $2; k = $3 } END { printf "  snapshots per scheduled run: %.0f on average (%.1f per second); kept at the end: %d\n", n / NR, n / NR / rt, k }' "$SDIR/snaps.txt"
echo "  Same daemon, two filled disks of ${SIZE}; the runs alternate. Each tick is one commit: the snapshot, with"
echo "  the deletion of the scheduled snapshot retention drops (its blocks freed once the commit is durable)."
