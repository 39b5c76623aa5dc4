"""The kernel matrix: the checkout run in qemu VMs of Debian 11, 12 and 13.

`python -m tests.vm` (or `tox -e kernels`) builds, per release, a root filesystem from
Debian's own packages (mmdebstrap, with that release's linux-image), boots it with
that release's kernel in qemu, copies this checkout in, and runs the steps a new user
would: `bash scripts/setup`, `ipmasq doctor`, `ipmasq selftest` per backend, and the
traffic tests. It prints one table, release x kernel x backend -> passed/failed.

Modules, in the order a run uses them:
  releases.py  what each Debian release is built from
  hostcfg.py   what the guest is given of this machine's apt, pip and TLS set-up
  image.py     the cached root filesystem, kernel and initrd (/var/cache/ipmasq-vm)
  machine.py   one qemu boot: KVM when it works, else TCG; user-mode networking only
  results.py   the guest's results read back, and the table
  init.sh      the guest's PID 1 (baked into the image): mounts, network, payload
  guest.sh     what runs inside (read from the checkout, so no image rebuild for it)

Nothing here touches this machine's network namespace: qemu's user-mode network
(slirp) is a userspace TCP/IP stack inside the qemu process; no tap, no bridge.
"""
