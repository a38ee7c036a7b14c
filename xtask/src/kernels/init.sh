#!/bin/busybox sh
# /init of the kernel-matrix initramfs: load the virtio/9p modules listed in /modules.load,
# mount the host's root (read-only) and the results share (writable), give the chroot what
# the agent needs (proc, sysfs, devtmpfs, securityfs, tracefs, bpffs, cgroup2, tmpfs for
# /tmp and /run), run the harness named in /harness inside it, power off. Every line on the
# console starting with "cw-init:" is for the host's log.
/bin/busybox --install -s /bin
export PATH=/bin
say() { echo "cw-init: $*"; }
die() { say "FATAL: $*"; sync; poweroff -f; }

mkdir -p /proc /sys /dev /mnt/host
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.load); do
  insmod "/modules/$m.ko" || die "insmod $m failed"
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 host /mnt/host \
  || die "mounting the host root over 9p failed"
H=/mnt/host
mount -t tmpfs -o mode=1777 tmpfs $H/tmp || die "tmpfs on /tmp"
mount -t tmpfs -o mode=755 tmpfs $H/run || die "tmpfs on /run"
mount -t proc proc $H/proc || die "proc"
mount -t sysfs sysfs $H/sys || die "sysfs"
mount -t devtmpfs devtmpfs $H/dev || die "devtmpfs"
mount -t securityfs securityfs $H/sys/kernel/security || say "no securityfs"
mount -t tracefs tracefs $H/sys/kernel/tracing || die "tracefs"
mount -t bpf bpf $H/sys/fs/bpf || die "bpffs"
mount -t cgroup2 cgroup2 $H/sys/fs/cgroup || die "cgroup2"
mkdir -p $H/tmp/credwatch-share
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out $H/tmp/credwatch-share \
  || die "mounting the results share over 9p failed"
ip link set lo up || die "loopback"
hostname credwatch-guest

say "userspace up after $(cut -d' ' -f1 /proc/uptime)s, starting the harness"
PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root chroot $H "$(cat /harness)" kernel-guest --plan /tmp/credwatch-share/plan.json
say "harness exited with $?"
sync
umount $H/tmp/credwatch-share
poweroff -f
