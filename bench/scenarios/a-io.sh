# shellcheck shell=bash disable=SC2034,SC2153 # variables shared with bench/lib.sh
# Scenario a: raw I/O. 4 KiB random read/write at QD1 and QD32, 1 MiB
# sequential read/write at QD8, 70/30 random read/write 4 KiB at QD32, on
# every server and on the two ceilings (the local disk through io_uring
# O_DIRECT, and nbdkit's memory plugin through the same fio nbd job).
[ -n "${BENCH_LIB:-}" ] || { echo "run through bench/run.sh" >&2; exit 2; }
declare -gA URI PIDOF STORE # from bench/lib.sh

start_nbd_servers
URI[disk]="file:$SDIR/disk.img"
nbdkit_mem_start nbdkit-mem "$SIZE"

T="parallax px-cached qemu-raw qemu-raw-default qemu-qcow2 disk nbdkit-mem"
fill "$T"

TB=(--time_based --runtime="$RUNTIME")
log "== measuring: $ROUNDS round(s) of ${RUNTIME}s per target, targets alternating"
measure rr-4k-qd1 "$T" --rw=randread --bs=4k --iodepth=1 "${TB[@]}"
measure rr-4k-qd32 "$T" --rw=randread --bs=4k --iodepth=32 "${TB[@]}"
measure rw-4k-qd1 "$T" --rw=randwrite --bs=4k --iodepth=1 "${TB[@]}"
measure rw-4k-qd32 "$T" --rw=randwrite --bs=4k --iodepth=32 "${TB[@]}"
measure seqr-1m-qd8 "$T" --rw=read --bs=1M --iodepth=8 "${TB[@]}"
measure seqw-1m-qd8 "$T" --rw=write --bs=1M --iodepth=8 "${TB[@]}"
measure rrw70-4k-qd32 "$T" --rw=randrw --rwmixread=70 --bs=4k --iodepth=32 "${TB[@]}"

px_check parallax
px_check px-cached
px_stop parallax
px_stop px-cached

echo
print_table "scenario a: I/O, fio over NBD unix sockets, ${SIZE} targets, ${RUNTIME}s runs" "$T" \
    "P/raw=parallax/qemu-raw P/ceil=parallax/ceiling Pc/rawdef=px-cached/qemu-raw-default P/qcow2=parallax/qemu-qcow2" \
    "rr-4k-qd1:iops:4k randread QD1" "rr-4k-qd1:lat:4k randread QD1" \
    "rr-4k-qd32:iops:4k randread QD32" \
    "rw-4k-qd1:iops:4k randwrite QD1" "rw-4k-qd1:lat:4k randwrite QD1" \
    "rw-4k-qd32:iops:4k randwrite QD32" \
    "seqr-1m-qd8:mibs:1M seq read QD8" "seqw-1m-qd8:mibs:1M seq write QD8" \
    "rrw70-4k-qd32:iops:4k randrw 70/30 QD32" \
    "fill:mibs:first write, 1M seq QD8"
echo "  parallax = serve --direct; px-cached = serve (page cache); qemu-raw/qemu-qcow2 = qemu-nbd --cache=none"
echo "  --aio=io_uring; qemu-raw-default = qemu-nbd defaults (writeback); disk = fio io_uring --direct=1 on a"
echo "  file of the same FS; nbdkit-mem = nbdkit memory; ceiling = min(disk, nbdkit-mem). Compare px-cached"
echo "  only with qemu-raw-default. The fill row is a single first-write pass (not best-of)."
