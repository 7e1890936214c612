#!/usr/bin/env bash
# How long listing the exports of a store with N disks takes: a raw
# NBD_OPT_LIST (python3, one round trip) and `nbdinfo --list` (which then
# asks NBD_OPT_INFO and NBD_OPT_LIST_META_CONTEXT about every export), over
# the Unix socket. N defaults to the maximum, 15,376 disks.
#
#   bash bench/list.sh [PARALLAX_BINARY] [N]
set -euo pipefail
BIN=${1:-target/release/parallax}
N=${2:-15376}
DIR=$(mktemp -d "${BENCH_DIR:-/var/tmp}/parallax-list.XXXXXX")
PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT
"$BIN" --store "$DIR/s.px" init --size 4G >/dev/null
"$BIN" --store "$DIR/s.px" serve --nbd-listen none --nbd-socket "$DIR/nbd.sock" >"$DIR/log" 2>&1 &
PID=$!
for _ in $(seq 100); do [ -S "$DIR/nbd.sock" ] && break; sleep 0.1; done
start=$(date +%s)
seq -f "disk-%05g" 0 $((N - 1)) | xargs -P 2 -n 1 "$BIN" --store "$DIR/s.px" create --size 1M >/dev/null
echo "created $N disks in $(( $(date +%s) - start )) s"
python3 - "$DIR/nbd.sock" <<'PY'
import socket, struct, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def rx(n):
    b = b''
    while len(b) < n:
        c = s.recv(n - len(b))
        assert c, "server closed"
        b += c
    return b
t0 = time.time()
rx(18)
s.sendall(struct.pack('>I', 3) + b'IHAVEOPT' + struct.pack('>II', 3, 0))
n = 0
while True:
    _, _, typ, ln = struct.unpack('>QIII', rx(20))
    rx(ln)
    if typ == 1:
        break
    n += 1
print(f"raw NBD_OPT_LIST: {n} exports in {time.time() - t0:.3f} s")
PY
for _ in 1 2 3; do
    /usr/bin/time -f "nbdinfo --list: %e s (client CPU %U+%S s)" \
        nbdinfo --list "nbd+unix:///?socket=$DIR/nbd.sock" 2>&1 >/dev/null | tail -1
done
