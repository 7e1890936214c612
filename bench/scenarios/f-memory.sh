# shellcheck shell=bash disable=SC2034,SC2153 # variables shared with bench/lib.sh
# Scenario f: memory and metadata overhead (Parallax only, --direct daemon).
#   Memory: the daemon's VmRSS after each phase and its VmHWM during the phase
#   (the peak is reset between phases: echo 5 > /proc/PID/clear_refs): idle
#   after start; F_DISKS disks of SIZE created; one NBD connection open to each
#   after F_MIB MiB of random data was written through it (one python process
#   holds them all: bench/nbd_hold.py); those connections closed; then the
#   metadata fills and the checks below.
#   Metadata: `check --json` before and after writing META_SIZE into a new
#   disk with 4 KiB random writes at QD32 (each block once), and into another
#   with 1 MiB sequential writes at QD8; reported as metadata bytes per GiB of
#   data blocks added: (tree_nodes + metadata_blocks) x 4096, both shown.
[ -n "${BENCH_LIB:-}" ] || { echo "run through bench/run.sh" >&2; exit 2; }
declare -gA URI PIDOF STORE # from bench/lib.sh

px_start parallax --direct
sleep 1
# phase LABEL: VmRSS now and VmHWM since the last phase, then reset the peak.
: >"$SDIR/mem.tsv"
phase() {
    local m
    m=$(rss parallax)
    printf '%s\t%s\t%s\n' "$1" "${m% *}" "${m#* }" >>"$SDIR/mem.tsv"
    echo 5 >"/proc/${PIDOF[parallax]}/clear_refs" 2>/dev/null || true
}
phase "idle, just started"

disks=()
t0=$(now)
for ((i = 1; i <= F_DISKS; i++)); do
    px_api parallax POST /v1/disks "{\"name\":\"m$i\",\"size_bytes\":$(to_bytes "$SIZE")}" >/dev/null
    disks+=("m$i")
done
log "   created $F_DISKS disks of $SIZE in $(since "$t0") s"
sleep 0.5
phase "$F_DISKS disks of $SIZE created, no connection"

log "== opening $F_DISKS NBD connections, writing $F_MIB MiB through each"
t0=$(now)
python3 "$ROOT/bench/nbd_hold.py" "$SDIR/parallax.sock" "$SDIR/ready" "$F_MIB" "${disks[@]}" \
    >"$SDIR/hold.log" 2>&1 &
hold_pid=$!
track "$hold_pid" nbd-holder
while [ ! -s "$SDIR/ready" ]; do
    is_alive "$hold_pid" || { cat "$SDIR/hold.log" >&2; die "nbd_hold.py failed"; }
    sleep 0.2
done
log "   $(cat "$SDIR/ready") connections open after $(since "$t0") s"
conns=$(px parallax status --json | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["connections"]))')
sleep 1
phase "$conns NBD connections open, $F_MIB MiB written through each"
stop_pid "$hold_pid" 30 || log "!! nbd_hold.py: $(tail -3 "$SDIR/hold.log")"
sleep 1
phase "those connections closed"

log "== metadata: $META_SIZE of 4k random writes (QD32, each block once), then $META_SIZE of 1M sequential writes"
TSIZE=$META_SIZE
px parallax check --json >"$SDIR/check0.json"
phase "check --json ($F_DISKS disks)"
px parallax create mrand --size "$META_SIZE"
URI[mrand]=$(px_uri parallax mrand)
measure_once meta-rand 1 mrand --rw=randwrite --bs=4k --iodepth=32 --buffer_compress_percentage=0 --refill_buffers
phase "$META_SIZE written with 4k random writes, QD32"
px parallax check --json >"$SDIR/check1.json"
phase "check --json ($((F_DISKS + 1)) disks)"
px parallax create mseq --size "$META_SIZE"
URI[mseq]=$(px_uri parallax mseq)
measure_once meta-seq 1 mseq --rw=write --bs=1M --iodepth=8 --buffer_compress_percentage=0 --refill_buffers
phase "$META_SIZE written with 1M sequential writes, QD8"
px parallax check --json >"$SDIR/check2.json"
phase "check --json ($((F_DISKS + 2)) disks)"
px_check parallax
px_stop parallax

echo
echo "--- scenario f: Parallax daemon memory (MiB): VmRSS after each phase, VmHWM = peak during the phase"
python3 - "$SDIR/mem.tsv" "$F_DISKS" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print(f"{'phase':<62} {'VmRSS':>8} {'VmHWM':>8}")
for label, r, h in rows:
    print(f"{label:<62} {float(r):>8.1f} {float(h):>8.1f}")
idle, created, conn = (float(rows[i][1]) for i in range(3))
nd = float(sys.argv[2])
print(f"  per disk (created - idle) / {nd:.0f}: {(created - idle) * 1024 / nd:.0f} KiB;"
      f" per open connection (connected - created) / {nd:.0f}: {(conn - created) * 1024 / nd:.0f} KiB")
PY
echo
echo "--- scenario f: metadata per GiB of data written (check --json deltas; 1 block = 4096 bytes)"
python3 - "$SDIR/check0.json" "$SDIR/check1.json" "$SDIR/check2.json" <<'PY'
import json, sys
c = []
for p in sys.argv[1:]:
    t = open(p).read()
    c.append(json.loads(t[t.index("{"):]))
print(f"{'fill pattern':<28} {'data GiB':>9} {'data blocks':>12} {'tree nodes':>11} {'other meta':>11}"
      f" {'meta MiB/GiB':>13} {'% of data':>10}")
for label, a, b in (("4k random writes, QD32", c[0], c[1]), ("1M sequential writes, QD8", c[1], c[2])):
    d = b["data_blocks"] - a["data_blocks"]
    n = b["tree_nodes"] - a["tree_nodes"]
    m = b["metadata_blocks"] - a["metadata_blocks"]
    gib = d * 4096 / 2**30
    per = (n + m) * 4096 / 2**20 / gib if gib else float("nan")
    pct = 100 * (n + m) / d if d else float("nan")
    print(f"{label:<28} {gib:>9.3f} {d:>12} {n:>11} {m:>11} {per:>13.2f} {pct:>9.2f}%")
print("  meta = tree nodes + other metadata blocks (check's metadata_blocks: catalog, snapshot records...).")
print(f"  after: clean={c[2]['clean']} leaked_blocks={c[2]['leaked_blocks']}")
PY
