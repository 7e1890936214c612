#!/usr/bin/env bash
# Installs the Debian packages the test suite and benchmarks use, only when
# they are missing. qemu-utils 10 comes from bookworm-backports on these
# machines; installing qemu-system-x86 from plain bookworm would downgrade it,
# so backports is added (on the mirror the existing sources use) first.
#   scripts/install-deps.sh          test clients: qemu-utils, libnbd-bin, fio,
#                                    nbdkit; etcd-server (cluster tests);
#                                    protobuf-compiler (the etcd client's build);
#                                    openssl (the TLS tests' certificates);
#                                    systemd-analyze, virt-xml-validate and
#                                    xmllint (the contrib/ files' checks);
#                                    python3-libnbd (the incremental backup
#                                    script, contrib/nbd-backup.py)
#   scripts/install-deps.sh --vm     also qemu-system-x86 and busybox-static (README
#                                    VM walk-through; the live-migration test's guest)
set -euo pipefail

want_vm=0
[ "${1:-}" = "--vm" ] && want_vm=1

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v fio >/dev/null || need+=(fio)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v etcd >/dev/null || need+=(etcd-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v openssl >/dev/null || need+=(openssl)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v virt-xml-validate >/dev/null || need+=(libvirt-clients)
command -v xmllint >/dev/null || need+=(libxml2-utils)
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need+=(python3-libnbd)
vm_needed=0
if [ "$want_vm" = 1 ] && ! command -v qemu-system-x86_64 >/dev/null; then vm_needed=1; fi
if [ "$want_vm" = 1 ] && [ ! -x /bin/busybox ]; then need+=(busybox-static); fi

if [ ${#need[@]} -eq 0 ] && [ "$vm_needed" = 0 ]; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if [ "$vm_needed" = 1 ] && ! apt-cache policy 2>/dev/null | grep -q bookworm-backports; then
    mirror=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
        mirror=$(awk '/^deb / && $0 !~ /security/ {for (i=2;i<=NF;i++) if ($i ~ /^http/) {print $i; exit}}' /etc/apt/sources.list)
    fi
    mirror="${mirror:-http://deb.debian.org/debian}"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm-backports main" |
        $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
fi

echo "== installing ${need[*]} $([ "$vm_needed" = 1 ] && echo qemu-system-x86)"
$SUDO apt-get update -qq
if [ "$vm_needed" = 1 ]; then
    $SUDO apt-get install -y -qq -t bookworm-backports --no-install-recommends qemu-system-x86
fi
if [ ${#need[@]} -gt 0 ]; then
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
