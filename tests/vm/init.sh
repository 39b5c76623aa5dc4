#!/bin/sh
# PID 1 of the matrix's guests (baked into the image as /sbin/ipmasq-vm-init; a change
# here rebuilds the images). No systemd: it mounts what the tests need, configures
# qemu's user-mode network by hand (slirp's fixed addresses), unpacks the payload disk
# (/dev/vdb: a tar of the checkout) and runs its tests/vm/guest.sh, whose results go to
# /dev/vdc. Whatever happens, the VM powers off at the end: qemu runs with -no-reboot
# and the kernel with panic=-1, so even a crash ends the run instead of hanging it.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
# what udev/systemd would link: nft 0.9.8 reads `-f -` by opening /dev/stdin
ln -sf /proc/self/fd /dev/fd
for i in 0:stdin 1:stdout 2:stderr; do ln -sf "/proc/self/fd/${i%%:*}" "/dev/${i#*:}"; done
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mount -o remount,rw /
echo "ipmasq-vm: booted $(uname -r)"
# without udev nothing loads drivers by device: the virtio ones are asked for by name
for m in virtio_net virtio_rng; do modprobe "$m" 2>/dev/null; done
hostname ipmasq-vm
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
echo "nameserver 10.0.2.3" > /etc/resolv.conf
mkdir -p /root/ipmasq
tar -x -C /root/ipmasq -f /dev/vdb
[ -f /root/ipmasq/.vm-env ] && . /root/ipmasq/.vm-env
cd /root/ipmasq && bash tests/vm/guest.sh
echo "ipmasq-vm: guest.sh exit $?"
sync
echo o > /proc/sysrq-trigger
sleep 10
echo b > /proc/sysrq-trigger
