#!/usr/bin/env bash
# The whole test suite. Installs what the tests need when it is missing.
#   scripts/test.sh            everything (lint, unit, property, crash, CLI,
#                              NBD with real clients, fuzz smoke)
#   FUZZ_SECONDS=0 scripts/test.sh   skip the fuzz smoke run
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-15}"

# Real clients the tests drive: qemu-img/qemu-io, nbdinfo/nbdcopy, fio, nbdkit,
# etcd, and qemu-system-x86 with busybox for the guests (the live-migration test).
bash scripts/install-deps.sh --vm

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo test"
cargo test --workspace

if [ "$FUZZ_SECONDS" != 0 ]; then
    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "== installing cargo-fuzz"
        cargo install cargo-fuzz --locked
    fi
    # cargo-fuzz needs nightly compiler flags; the stable toolchain accepts
    # them with RUSTC_BOOTSTRAP (the only toolchain this machine has).
    export RUSTC_BOOTSTRAP=1
    # Valid NBD sessions as starting points (fuzz/corpus is not committed).
    cargo test -q -p parallax-nbd --test fuzz_seeds -- --ignored >/dev/null
    for target in $(cargo fuzz list); do
        echo "== fuzz smoke: $target (${FUZZ_SECONDS}s)"
        cargo fuzz run "$target" -- -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=4096
    done
fi
echo "== all tests passed"
