#!/usr/bin/env bash
# Builds a tiny Linux guest for the tests that boot real VMs under TCG:
# Debian's kernel and a busybox initramfs with the virtio modules.
#   scripts/guest.sh DIR     writes DIR/vmlinuz and DIR/initrd.img (kept:
#                            nothing is done when both exist and were made
#                            by this version of the script)
#
# The guest's init mounts /proc, /sys and /dev, loads virtio-blk, waits for
# /dev/vda and runs the program in the disk's first 4 KiB (a shell script,
# NUL-padded): the VM's behaviour comes from its disk, so a clone of a gold
# image decides what it does. The kernel command line is expected to say
# `console=ttyS0 quiet panic=-1`; init powers off when the program ends.
# Besides busybox, the initramfs has util-linux's blkdiscard as
# `blkdiscard-util` (busybox's has no -z, which issues WRITE_ZEROES).
# Needs busybox-static (scripts/install-deps.sh --vm) and Debian's
# package mirror (the kernel package is downloaded once).
set -euo pipefail

dir="${1:?usage: scripts/guest.sh DIR}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
# Raised whenever the initramfs changes, so that a kept one is rebuilt.
version_mark=2
if [ -s "$dir/vmlinuz" ] && [ -s "$dir/initrd.img" ] &&
    [ "$(cat "$dir/guest-version" 2>/dev/null)" = "$version_mark" ]; then
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if ! apt-get download "$pkg" >/dev/null 2>&1; then
    apt-get update -qq
    apt-get download "$pkg" >/dev/null
fi
dpkg -x "$pkg"_*.deb kpkg
version=${pkg#linux-image-}
modules=kpkg/lib/modules/$version/kernel

mkdir -p initrd/{bin,proc,sys,dev,tmp,lib/modules}
cp /bin/busybox initrd/bin/busybox
for applet in $(initrd/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "initrd/bin/$applet"
done
for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev \
    virtio/virtio_pci_modern_dev virtio/virtio_pci block/virtio_blk; do
    src="$modules/drivers/$m.ko"
    # Some kernels ship them compressed.
    if [ -f "$src.xz" ]; then xz -dc "$src.xz" > "initrd/lib/modules/$(basename "$m").ko"
    elif [ -f "$src" ]; then cp "$src" initrd/lib/modules/
    fi
done

# util-linux's blkdiscard and the libraries it needs.
mkdir -p initrd/lib/x86_64-linux-gnu initrd/lib64
cp "$(command -v blkdiscard)" initrd/bin/blkdiscard-util
for lib in $(ldd "$(command -v blkdiscard)" | awk '/=>/ { print $3 }'); do
    cp "$lib" initrd/lib/x86_64-linux-gnu/
done
cp /lib64/ld-linux-x86-64.so.2 initrd/lib64/

cat > initrd/init <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if [ -b /dev/vda ]; then
    dd if=/dev/vda bs=4096 count=1 2>/dev/null | tr -d '\000' > /tmp/program.sh
    echo "guest: running the program from /dev/vda"
    sh /tmp/program.sh
else
    echo "guest: no /dev/vda"
fi
poweroff -f
EOF
chmod +x initrd/init
# busybox's own cpio: the machine may have no other.
(cd initrd && find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 > "$work/initrd.img")
cp "kpkg/boot/vmlinuz-$version" "$dir/vmlinuz.tmp"
mv "$work/initrd.img" "$dir/initrd.img"
mv "$dir/vmlinuz.tmp" "$dir/vmlinuz"
echo "$version_mark" > "$dir/guest-version"
echo "guest: $dir/vmlinuz ($version), $dir/initrd.img"
