# shellcheck shell=bash disable=SC2034,SC2153 # variables shared with bench/lib.sh
# Scenario b: durability cost. 4 KiB random writes with an NBD FLUSH after
# every write at QD1 (fio --fsync=1) and after every 32 writes at QD32
# (--fsync=32); fio's nbd engine turns fsync into NBD_CMD_FLUSH.
[ -n "${BENCH_LIB:-}" ] || { echo "run through bench/run.sh" >&2; exit 2; }
declare -gA URI PIDOF STORE # from bench/lib.sh

start_nbd_servers

T="parallax qemu-raw qemu-qcow2 px-cached qemu-raw-default"
fill "$T"

TB=(--time_based --runtime="$RUNTIME")
log "== measuring: $ROUNDS round(s) of ${RUNTIME}s per target, targets alternating"
measure fsync1-qd1 "$T" --rw=randwrite --bs=4k --iodepth=1 --fsync=1 "${TB[@]}"
measure fsync32-qd32 "$T" --rw=randwrite --bs=4k --iodepth=32 --fsync=32 "${TB[@]}"

px_check parallax
px_check px-cached
px_stop parallax
px_stop px-cached

echo
print_table "scenario b: 4k random writes with FLUSH, ${SIZE} targets, ${RUNTIME}s runs" "$T" \
    "P/raw=parallax/qemu-raw P/qcow2=parallax/qemu-qcow2 Pc/rawdef=px-cached/qemu-raw-default" \
    "fsync1-qd1:iops:4k randwrite QD1 fsync=1" "fsync1-qd1:lat:4k randwrite QD1 fsync=1" \
    "fsync32-qd32:iops:4k randwrite QD32 fsync=32"
echo "  IOPS count writes only (each FLUSH is extra). parallax vs qemu-raw/qemu-qcow2 (--cache=none);"
echo "  px-cached vs qemu-raw-default (writeback). Latency is the mean of the writes, not of the flushes."
