#!/usr/bin/env bash
# A/B of two parallax binaries on the same machine, in the same run: each
# serves its own 1G filled disk (page cache, `serve` defaults) and fio's nbd
# engine runs 4k jobs against them, alternating old/new for ROUNDS rounds.
# Prints every run and the median of each side (and new/old).
#
#   bash bench/ab.sh OLD_BINARY NEW_BINARY
#   ROUNDS=5 RUNTIME=4 JOBS="randread:1 randwrite:32 randread:32" bash bench/ab.sh ...
#
# SERVE_ARGS adds options to both daemons' `serve` (for example --direct),
# NEW_SERVE_ARGS to the new one's only (the same binary twice then compares
# options: NEW_SERVE_ARGS="--cache /var/tmp/c.bin --cache-size 2G").
# SNAPSHOT_AFTER_FILL=1 snapshots the disk once filled, so that every block
# is shared with the snapshot (what the read cache may hold).
# SCHEDULE="10ms 100" switches a snapshot schedule (every 10 ms, keep-last
# 100) on for each run and off after it, as scenario g does, and prints how
# many snapshots each run took.
set -euo pipefail
OLD=${1:?usage: bench/ab.sh OLD_BINARY NEW_BINARY}
NEW=${2:?usage: bench/ab.sh OLD_BINARY NEW_BINARY}
ROUNDS=${ROUNDS:-5} RUNTIME=${RUNTIME:-4}
JOBS=${JOBS:-"randread:1 randwrite:32 randread:32"}
SERVE_ARGS=${SERVE_ARGS:-} SCHEDULE=${SCHEDULE:-}
NEW_SERVE_ARGS=${NEW_SERVE_ARGS:-} SNAPSHOT_AFTER_FILL=${SNAPSHOT_AFTER_FILL:-}
DIR=$(mktemp -d "${BENCH_DIR:-/var/tmp}/parallax-ab.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$DIR"
}
trap cleanup EXIT
declare -A BIN=([old]="$OLD" [new]="$NEW") EXTRA=([old]="" [new]="$NEW_SERVE_ARGS")
for v in old new; do
    "${BIN[$v]}" --store "$DIR/$v.px" init --size 2G >/dev/null
    # shellcheck disable=SC2086 # SERVE_ARGS and EXTRA are lists of options
    "${BIN[$v]}" --store "$DIR/$v.px" serve $SERVE_ARGS ${EXTRA[$v]} --nbd-listen none --nbd-socket "$DIR/$v.sock" \
        >"$DIR/$v.log" 2>&1 &
    PIDS+=($!)
done
for v in old new; do
    for _ in $(seq 50); do [ -S "$DIR/$v.sock" ] && break; sleep 0.1; done
    "${BIN[$v]}" --store "$DIR/$v.px" create d --size 1G >/dev/null
    fio --name=fill --ioengine=nbd --uri="nbd+unix:///d?socket=$DIR/$v.sock" --size=1G \
        --rw=write --bs=1M --iodepth=8 --refill_buffers --buffer_compress_percentage=0 \
        --output-format=json >/dev/null 2>&1
    if [ -n "$SNAPSHOT_AFTER_FILL" ]; then
        "${BIN[$v]}" --store "$DIR/$v.px" snapshot d@filled >/dev/null
    fi
done
iops() { # rw iodepth socket
    fio --name=ab --ioengine=nbd --uri="nbd+unix:///d?socket=$3" --size=1G --rw="$1" --bs=4k \
        --iodepth="$2" --time_based --runtime="$RUNTIME" --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]
print(int(j["read"]["iops"] + j["write"]["iops"]))'
}
newest() { # side: the id of the disk's newest snapshot (0 if none)
    "${BIN[$1]}" --store "$DIR/$1.px" snapshots d --json |
        python3 -c 'import json, sys; s = json.load(sys.stdin); print(s[-1]["id"] if s else 0)'
}
for job in $JOBS; do
    rw=${job%:*} qd=${job#*:}
    declare -a got_old=() got_new=()
    for r in $(seq "$ROUNDS"); do
        for v in old new; do
            if [ -n "$SCHEDULE" ]; then
                read -r every keep <<<"$SCHEDULE"
                before=$(newest "$v")
                "${BIN[$v]}" --store "$DIR/$v.px" schedule d --every "$every" --keep-last "$keep" >/dev/null
            fi
            n=$(iops "$rw" "$qd" "$DIR/$v.sock")
            taken=""
            if [ -n "$SCHEDULE" ]; then
                "${BIN[$v]}" --store "$DIR/$v.px" schedule d --off >/dev/null
                taken=", $(($(newest "$v") - before)) snapshots"
            fi
            echo "   r$r 4k $rw QD$qd $v $n IOPS$taken"
            if [ "$v" = old ]; then got_old+=("$n"); else got_new+=("$n"); fi
        done
    done
    python3 - "$rw" "$qd" "${got_old[*]}" "${got_new[*]}" <<'PY'
import statistics, sys
rw, qd, old, new = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
mo, mn = statistics.median(map(int, old)), statistics.median(map(int, new))
print(f"4k {rw} QD{qd}: median old {mo:.0f} IOPS, new {mn:.0f} IOPS, new/old {mn / mo:.2f}x")
PY
done
