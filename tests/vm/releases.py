"""What each Debian release of the matrix is built from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Release:
    codename: str
    version: int
    # suites besides the release itself: updates and security fixes, as a real node has
    updates: bool = True
    security: bool = True

    @property
    def suites(self) -> tuple[str, ...]:
        return (self.codename,) + ((f"{self.codename}-updates",) if self.updates else ())

    @property
    def security_suite(self) -> str | None:
        return f"{self.codename}-security" if self.security else None


# bullseye without its security suite: the mirror this machine reaches lists
# bullseye-security's packages but answers 404 for some of their files (libbpf-dev
# 1:0.3-2+deb11u1), so a build with it fails; bullseye's last point release is used.
RELEASES = {r.codename: r for r in (Release("bullseye", 11, security=False), Release("bookworm", 12),
                                    Release("trixie", 13))}
ALIASES = {str(r.version): r.codename for r in RELEASES.values()}

# Preinstalled so that `scripts/setup`'s `apt-get install` finds them there: under
# emulation unpacking clang and llvm alone takes minutes. setup still runs its own
# `apt-get update` and `apt-get install` in the guest, so a package it newly asks for
# is installed there (slower, still correct). Keep in step with scripts/setup.
SETUP_PACKAGES = (
    "iptables", "nftables", "libnftables1", "ipset", "iproute2", "conntrack", "kmod", "iperf3",
    "python3", "python3-venv", "python3-pip",
    "clang", "llvm", "libbpf-dev", "linux-libc-dev", "ethtool", "bpftool",
)
# What the VM itself needs: its kernel (with an initrd that has the virtio drivers),
# the CA store the host's extra certificates go into, and the tools init.sh uses.
VM_PACKAGES = ("linux-image-amd64", "initramfs-tools", "ca-certificates", "procps", "util-linux", "mount")


def resolve(names: list[str]) -> list[Release]:
    """Release names or numbers (bullseye, 11, ...) -> Releases; ValueError names the bad one."""
    out = []
    for name in names:
        key = ALIASES.get(name, name)
        if key not in RELEASES:
            raise ValueError(f"unknown release {name!r} (known: {', '.join(RELEASES)} or 11, 12, 13)")
        out.append(RELEASES[key])
    return out
