#!/usr/bin/env bash
# One replication step: keeps disk DISK of this store in sync with the disk
# of the same name in another store (docs/SEND.md, "Replication").
#
#   contrib/parallax-replicate.sh DISK TARGET-COMMAND...
#
# TARGET-COMMAND runs `parallax` against the other store, for example
#   parallax --store /srv/replica.px          (a store on this machine)
#   ssh backup-host parallax                  (over ssh)
#
# Each step takes a snapshot DISK@repl-<UTC time> and sends it, as its
# difference from the newest repl- snapshot both sides hold (or whole, the
# first time), into the target, where it arrives as a snapshot of the same
# name. Then the source keeps only that newest repl- snapshot (the next
# step's base) and the target keeps the newest $KEEP (default 24). A step
# that fails deletes the snapshot it took and exits 1; the next step starts
# again from the last base both sides hold.
#
# Run it every minute from cron or a systemd timer:
#   * * * * * /usr/local/bin/parallax-replicate.sh vm ssh backup-host parallax
#
# Environment: PARALLAX (the source's parallax command, default `parallax`,
# with PARALLAX_STORE or --store as usual), KEEP.
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
disk=$1
shift
target=("$@")
src=(${PARALLAX:-parallax})
keep=${KEEP:-24}

# Snapshot names of a disk, oldest first (none when the disk is missing).
repl_snapshots() {
    "$@" snapshots "$disk" 2>/dev/null | awk 'NR > 1 && $2 ~ /^repl-/ { print $2 }' || true
}

mapfile -t here < <(repl_snapshots "${src[@]}")
mapfile -t there < <(repl_snapshots "${target[@]}")
base=""
for ((i = ${#here[@]} - 1; i >= 0; i--)); do
    for t in "${there[@]}"; do
        if [ "${here[i]}" = "$t" ]; then
            base=$t
            break 2
        fi
    done
done

name="repl-$(date -u +%Y%m%dT%H%M%S.%NZ)"
"${src[@]}" snapshot "$disk@$name" >/dev/null
from=()
[ -n "$base" ] && from=(--from "$base")
if ! "${src[@]}" send "$disk@$name" "${from[@]}" -o - 2>/dev/null | "${target[@]}" receive "$disk" >/dev/null; then
    "${src[@]}" delete "$disk@$name" >/dev/null 2>&1 || true
    echo "parallax-replicate: sending $disk@$name${base:+ from $base} failed; $disk@$name deleted" >&2
    exit 1
fi

# The source keeps the newest repl- snapshot only; the target the newest $keep.
for s in "${here[@]}"; do
    "${src[@]}" delete "$disk@$s" >/dev/null
done
mapfile -t there < <(repl_snapshots "${target[@]}")
for ((i = 0; i + keep < ${#there[@]}; i++)); do
    "${target[@]}" delete "$disk@${there[i]}" >/dev/null
done
echo "$disk@$name${base:+ (from $base)}"
