# shellcheck shell=bash disable=SC2034,SC2153 # variables shared with bench/lib.sh
# Scenario d: reads through a clone DEPTH generations deep vs the plain disk.
#   Parallax (one --direct daemon): disk `base` filled; then DEPTH times:
#     snapshot CUR@gN, clone CUR@gN -> cN, write one 4 KiB block into cN
#     (qemu-io over NBD, so no layer is empty), CUR=cN. Reads of c<DEPTH>
#     vs reads of base: same daemon, same data except DEPTH blocks.
#   qcow2: base.qcow2 filled through qemu-nbd; then a chain of DEPTH overlays
#     `qemu-img create -f qcow2 -b PREV -F qcow2 lN` with the same single
#     4 KiB write each (qemu-io); qemu-nbd -r on the top vs qemu-nbd -r on
#     base (both --cache=none --aio=io_uring, read-only as the base is a
#     backing file of the chain).
[ -n "${BENCH_LIB:-}" ] || { echo "run through bench/run.sh" >&2; exit 2; }
declare -gA URI PIDOF STORE # from bench/lib.sh

TSIZE=$SIZE
blocks=$(($(to_bytes "$SIZE") / 4096))
# offset_of N: a spread-out 4 KiB block for generation N
offset_of() { echo $(((($1 * 2654435761) % blocks) * 4096)); }

px_start parallax --direct
px parallax create base --size "$SIZE"
URI[px-plain]=$(px_uri parallax base)
qemu-img create -q -f qcow2 "$SDIR/base.qcow2" "$SIZE"
qnbd_start qcow2-plain qcow2 "$SDIR/base.qcow2" --cache=none --aio=io_uring
fill "px-plain qcow2-plain"
stop_pid "${PIDOF[qcow2-plain]}"

log "== building the $DEPTH-deep chains (one 4 KiB write per layer)"
t0=$(now)
cur=base
for ((i = 1; i <= DEPTH; i++)); do
    px_api parallax POST "/v1/disks/$cur/snapshots" "{\"name\":\"g$i\"}" >/dev/null
    px_api parallax POST "/v1/disks/$cur/snapshots/g$i/clone" "{\"name\":\"c$i\"}" >/dev/null
    qemu-io -f raw -c "write -P $((i % 250 + 1)) $(offset_of "$i") 4k" "$(px_uri parallax "c$i")" >/dev/null
    cur=c$i
done
log "   parallax: $DEPTH x (snapshot + clone + qemu-io write) in $(since "$t0") s"
URI[px-deep]=$(px_uri parallax "$cur")
t0=$(now)
prev=base.qcow2
for ((i = 1; i <= DEPTH; i++)); do
    qemu-img create -q -f qcow2 -b "$prev" -F qcow2 "$SDIR/l$i.qcow2"
    qemu-io -f qcow2 -c "write -P $((i % 250 + 1)) $(offset_of "$i") 4k" "$SDIR/l$i.qcow2" >/dev/null
    prev=l$i.qcow2
done
log "   qcow2: $DEPTH x (qemu-img create -b + qemu-io write) in $(since "$t0") s"
# qemu-img resolves the relative backing names against the overlay's directory.
qnbd_start qcow2-deep qcow2 "$SDIR/$prev" -r --cache=none --aio=io_uring
qnbd_start qcow2-plain qcow2 "$SDIR/base.qcow2" -r --cache=none --aio=io_uring
# Each layer's own block reads back (top of both chains), the rest is base data.
o=$(offset_of "$DEPTH")
qemu-io -r -f raw -c "read -P $((DEPTH % 250 + 1)) $o 4k" "${URI[px-deep]}" >/dev/null ||
    die "parallax: c$DEPTH does not hold its own block"
qemu-io -r -f raw -c "read -P $((DEPTH % 250 + 1)) $o 4k" "${URI[qcow2-deep]}" >/dev/null ||
    die "qcow2: l$DEPTH does not hold its own block"
if [ "$DEPTH" -ge 2 ]; then
    o=$(offset_of 1)
    qemu-io -r -f raw -c "read -P 2 $o 4k" "${URI[px-deep]}" >/dev/null || die "parallax: c$DEPTH lost c1's block"
    qemu-io -r -f raw -c "read -P 2 $o 4k" "${URI[qcow2-deep]}" >/dev/null || die "qcow2: l$DEPTH lost l1's block"
fi

T="px-deep px-plain qcow2-deep qcow2-plain"
TB=(--time_based --runtime="$RUNTIME")
log "== measuring: $ROUNDS round(s) of ${RUNTIME}s per target, targets alternating"
measure rr-4k-qd1 "$T" --rw=randread --bs=4k --iodepth=1 "${TB[@]}"
measure rr-4k-qd32 "$T" --rw=randread --bs=4k --iodepth=32 "${TB[@]}"
measure seqr-1m-qd8 "$T" --rw=read --bs=1M --iodepth=8 "${TB[@]}"

px_check parallax
px_stop parallax

echo
print_table "scenario d: reads through a clone $DEPTH generations deep, ${SIZE}, ${RUNTIME}s runs" "$T" \
    "P:deep/plain=px-deep/px-plain q:deep/plain=qcow2-deep/qcow2-plain P/q:deep=px-deep/qcow2-deep" \
    "rr-4k-qd1:iops:4k randread QD1" "rr-4k-qd1:lat:4k randread QD1" \
    "rr-4k-qd32:iops:4k randread QD32" "seqr-1m-qd8:mibs:1M seq read QD8"
echo "  px-deep = Parallax clone c$DEPTH (clone of a clone ... of base), px-plain = base, same daemon (--direct);"
echo "  qcow2-deep = top of a $DEPTH-overlay backing chain, qcow2-plain = its base, qemu-nbd -r --cache=none."
