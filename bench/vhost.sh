#!/usr/bin/env bash
# A TCG guest's disk I/O through three back ends, side by side, alternating
# in each round (docs/VHOST-USER.md; the vhost-user issue's benchmark):
#
#   parallax vhost-user   serve --direct --vhost-user, -device vhost-user-blk-pci
#   parallax NBD          serve --direct, -drive file=nbd+unix://...,if=virtio,cache=none
#   qsd vhost-user        qemu-storage-daemon, a raw file with cache.direct=on
#
# In the guest (busybox dd with O_DIRECT, one request at a time): 768 MiB
# written and read in 1 MiB requests, then 64 MiB written and read in
# 4 KiB requests (sequential offsets: dd has no random mode; at one request
# in flight the order barely matters to these back ends), each timed by
# the guest's /proc/uptime (10 ms steps); MB/s = 10^6 bytes per second,
# IOPS for the 4 KiB rows. Each figure
# is the median of ROUNDS rounds (default 3).
#
# TCG dominates: the guest's CPU is emulated, so every request costs the
# emulated kernel's block layer and virtio driver far more than any back
# end. The figures compare back ends under the same emulated guest, not
# with the host's disk.
#
# Usage: bench/vhost.sh        ROUNDS=5 PARALLAX_BIN=... bench/vhost.sh
#        PARALLAX_BIN_B=/old/parallax bench/vhost.sh   adds a column: another
#        binary's vhost-user on a store of its own, in the same rounds
# Needs qemu-system-x86_64, qemu-storage-daemon, busybox-static and
# Debian's kernel package (scripts/install-deps.sh --vm; scripts/guest.sh).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
rounds=${ROUNDS:-3}
for t in qemu-system-x86_64 qemu-storage-daemon qemu-io; do
    command -v "$t" >/dev/null || { echo "$t is required (scripts/install-deps.sh --vm)" >&2; exit 1; }
done
if [ -n "${PARALLAX_BIN:-}" ]; then
    px="$PARALLAX_BIN"
else
    echo "== building the release binary" >&2
    (cd "$root" && cargo build --release -q -p parallax)
    px="${CARGO_TARGET_DIR:-$root/target}/release/parallax"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/parallax-vhost.XXXXXX")"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
guest="${GUEST_DIR:-$root/target/guest}"
bash "$root/scripts/guest.sh" "$guest" >&2
cd "$work"

# busybox dd prints no time: the guest's /proc/uptime (10 ms steps) does.
cat > program.sh <<'EOF'
echo "bench: start"
run() { n=$1; shift; a=$(cut -d' ' -f1 /proc/uptime); "$@" 2>/dev/null; b=$(cut -d' ' -f1 /proc/uptime); echo "$n $a $b"; }
run seq-write dd if=/dev/zero of=/dev/vda bs=1048576 seek=16 count=768 oflag=direct
run seq-read dd if=/dev/vda of=/dev/null bs=1048576 skip=16 count=768 iflag=direct
run 4k-write dd if=/dev/zero of=/dev/vda bs=4096 seek=220000 count=16384 oflag=direct
run 4k-read dd if=/dev/vda of=/dev/null bs=4096 skip=220000 count=16384 iflag=direct
echo "bench: end"
EOF
truncate -s 4096 program.sh

export PARALLAX_STORE="$work/store.px"
"$px" init --size 4G >/dev/null
"$px" serve --direct --nbd-listen none --nbd-socket "$work/nbd.sock" --vhost-user "$work/vhost" \
    > serve.log 2>&1 &
pids+=($!)
for _ in $(seq 100); do "$px" status >/dev/null 2>&1 && break; sleep 0.1; done
"$px" create vm --size 1G >/dev/null
qemu-io -f raw -c "write -s program.sh 0 4096" "nbd+unix:///vm?socket=$work/nbd.sock" >/dev/null
truncate -s 1G raw.img
dd if=program.sh of=raw.img conv=notrunc status=none
qemu-storage-daemon --blockdev driver=file,node-name=f0,filename="$work/raw.img",cache.direct=on \
    --blockdev driver=raw,node-name=d0,file=f0 \
    --export type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path="$work/qsd.sock",writable=on,num-queues=1 \
    > qsd.log 2>&1 &
pids+=($!)
if [ -n "${PARALLAX_BIN_B:-}" ]; then
    PARALLAX_STORE="$work/store-b.px" "$PARALLAX_BIN_B" init --size 4G >/dev/null
    PARALLAX_STORE="$work/store-b.px" "$PARALLAX_BIN_B" serve --direct --nbd-listen none \
        --nbd-socket "$work/nbd-b.sock" --vhost-user "$work/vhost-b" > serve-b.log 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do PARALLAX_STORE="$work/store-b.px" "$PARALLAX_BIN_B" status >/dev/null 2>&1 && break; sleep 0.1; done
    PARALLAX_STORE="$work/store-b.px" "$PARALLAX_BIN_B" create vm --size 1G >/dev/null
    qemu-io -f raw -c "write -s program.sh 0 4096" "nbd+unix:///vm?socket=$work/nbd-b.sock" >/dev/null
fi
for _ in $(seq 100); do [ -S "$work/qsd.sock" ] && [ -S "$work/vhost/vm.sock" ] && break; sleep 0.1; done
[ -z "${PARALLAX_BIN_B:-}" ] || for _ in $(seq 100); do [ -S "$work/vhost-b/vm.sock" ] && break; sleep 0.1; done

boot() { # boot NAME QEMU-DISK-ARGS...: runs the guest, appends "NAME ROW SECONDS" lines
    local name=$1
    shift
    timeout 600 qemu-system-x86_64 -accel tcg -m 256 -smp 1 -nographic -no-reboot \
        -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
        -kernel "$guest/vmlinuz" -initrd "$guest/initrd.img" -append "console=ttyS0 quiet panic=-1" \
        "$@" > "vm-$name.log" 2>&1 || true
    grep -q "bench: end" "vm-$name.log" || { echo "the $name guest did not finish:" >&2; cat "vm-$name.log" >&2; exit 1; }
    tr -d '\r' < "vm-$name.log" | awk -v n="$name" '$1 ~ /^(seq|4k)-/ { print n, $1, $3 - $2 }' >> times
}

for r in $(seq "$rounds"); do
    echo "== round $r" >&2
    boot vhost -chardev socket,id=c0,path="$work/vhost/vm.sock" -device vhost-user-blk-pci,chardev=c0,num-queues=1
    boot nbd -drive "file=nbd+unix:///vm?socket=$work/nbd.sock,format=raw,if=virtio,cache=none"
    boot qsd -chardev socket,id=c0,path="$work/qsd.sock" -device vhost-user-blk-pci,chardev=c0,num-queues=1
    [ -z "${PARALLAX_BIN_B:-}" ] ||
        boot vhost-b -chardev socket,id=c0,path="$work/vhost-b/vm.sock" -device vhost-user-blk-pci,chardev=c0,num-queues=1
done

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
m() { awk -v n="$1" -v r="$2" '$1 == n && $2 == r { print $3 }' times | median; }
rate() { # rate ROW SECONDS: MB/s for seq rows, IOPS for 4k rows
    case $1 in
        seq-*) awk -v s="$2" 'BEGIN { printf "%8.1f MB/s", 805306368 / s / 1e6 }' ;;
        4k-*) awk -v s="$2" 'BEGIN { printf "%8.0f IOPS", 16384 / s }' ;;
    esac
}
echo "# bench/vhost.sh, $(date -u +%Y-%m-%dT%H:%MZ), $rounds rounds, medians; TCG guest, dd O_DIRECT, 1 request in flight"
printf '%-10s %-18s %-18s %-18s %s\n' row "parallax vhost" "parallax nbd" "qsd vhost" "vhost/qsd  vhost/nbd"
for row in seq-write seq-read 4k-write 4k-read; do
    v=$(m vhost $row) n=$(m nbd $row) q=$(m qsd $row)
    printf '%-10s %-18s %-18s %-18s %s\n' "$row" "$(rate $row "$v")" "$(rate $row "$n")" "$(rate $row "$q")" \
        "$(awk -v v="$v" -v q="$q" -v n="$n" 'BEGIN { printf "%.2fx      %.2fx", q / v, n / v }')"
done
if [ -n "${PARALLAX_BIN_B:-}" ]; then
    echo "# B: $PARALLAX_BIN_B's vhost-user, same rounds"
    for row in seq-write seq-read 4k-write 4k-read; do
        v=$(m vhost $row) b=$(m vhost-b $row)
        printf '%-10s %-18s B %-18s %s\n' "$row" "$(rate $row "$v")" "$(rate $row "$b")" \
            "$(awk -v v="$v" -v b="$b" 'BEGIN { printf "this/B %.2fx", b / v }')"
    done
fi
