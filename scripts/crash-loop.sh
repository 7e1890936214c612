#!/usr/bin/env bash
# Runs the NBD crash test (kill -9 of `parallax serve` under multi-connection
# writers, flushes and snapshots; then every flushed write must read back and
# `parallax check` must pass) N times, each with a fresh random seed, and
# prints how many iterations passed. The logs of failed iterations (with the
# seed to replay: PARALLAX_TEST_SEED=...) are kept in a directory it names.
#   scripts/crash-loop.sh [N]          N iterations (default 20), release build
#   PROFILE=dev scripts/crash-loop.sh  debug build instead
#   MODE=direct scripts/crash-loop.sh  the serve --direct (O_DIRECT, io_uring) variant
set -euo pipefail
cd "$(dirname "$0")/.."

n="${1:-20}"
profile_args=(--release)
[ "${PROFILE:-release}" = dev ] && profile_args=()
test_name=crash_kill9_keeps_flushed_writes
[ "${MODE:-cached}" = direct ] && test_name=crash_kill9_keeps_flushed_writes_with_direct_io

echo "== building"
cargo test "${profile_args[@]}" -p parallax --test nbd_clients --no-run

logs=$(mktemp -d -t parallax-crash-loop.XXXXXX)
passed=0
for i in $(seq 1 "$n"); do
    log="$logs/iteration-$i.log"
    if cargo test -q "${profile_args[@]}" -p parallax --test nbd_clients -- \
        --exact "$test_name" --nocapture >"$log" 2>&1; then
        passed=$((passed + 1))
        echo "iteration $i: ok: $(grep -o 'crash: ran .*' "$log" | head -1)"
        rm -f "$log"
    else
        echo "iteration $i: FAILED ($(grep -o 'PARALLAX_TEST_SEED=[0-9]*' "$log" | head -1)), log: $log"
    fi
done
echo "passed $passed/$n"
if [ "$passed" -eq "$n" ]; then
    rmdir "$logs" 2>/dev/null || true
    exit 0
fi
echo "logs of failed iterations: $logs"
exit 1
