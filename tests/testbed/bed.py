"""The tests' bed: the selftest's (ipmasq_legacy/selftest/bed.py) with more pods, every
destination the tests probe, link events and helpers for reaching into its namespaces."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from typing import Callable

from ipmasq_legacy.selftest import DESTINATIONS as SELFTEST_DESTINATIONS
from ipmasq_legacy.selftest.bed import UPLINKS, Bed, Destination, destinations
from ipmasq_legacy.selftest.netns import NETNS_PREFIX, TestBedError, _list_netns, _remove_netns

ALL_DESTINATIONS: dict[str, Destination] = {
    **SELFTEST_DESTINATIONS,
    **destinations({
        "public_eth1": ("198.20.1.10", "eth1"),
        "cgnat": ("100.64.0.10", "eth0"),
        "metadata": ("169.254.169.254", "eth0"),
        "public6_eth1": ("2001:db8:21::10", "eth1"),
    }),
}


class TestBed(Bed):
    """pod(s) -> node -> ext, every destination of ALL_DESTINATIONS on ext."""

    __test__ = False  # not a pytest test class

    def __init__(self, ipv6: bool = True, pods: int = 1, tag: str | None = None):
        if pods < 1:
            raise ValueError("pods must be >= 1")
        if pods > 200:
            raise ValueError("at most 200 pods")
        self._npods = pods
        super().__init__(ALL_DESTINATIONS, ipv6=ipv6, tag=tag)

    def wait_settled(self, timeout: float = 5.0) -> None:
        """Wait until every link of the bed is operationally UP and no IPv6
        address is tentative.

        Not needed for probing: the bed's own addresses are added without
        DAD and forward at once.  But the kernel reports carrier changes
        through "linkwatch", at most once a second, so for up to ~1 s after
        building the links show NO-CARRIER/LOWERLAYERDOWN and the automatic
        fe80:: addresses are tentative.  Call this before a test that looks
        at link state or link-local addresses."""
        IFA_F_TENTATIVE = 0x40
        deadline = time.monotonic() + timeout
        for ns in self.namespaces:
            with self._ipr(ns) as ipr:
                while True:
                    pending = [
                        link.get_attr("IFLA_IFNAME")
                        for link in ipr.get_links()
                        if link.get_attr("IFLA_IFNAME") != "lo"
                        and link["flags"] & 1  # IFF_UP: administratively up
                        and link.get_attr("IFLA_OPERSTATE") != "UP"
                    ]
                    if self.ipv6:
                        pending += [
                            a.get_attr("IFA_ADDRESS")
                            for a in ipr.get_addr(family=socket.AF_INET6)
                            if (a.get_attr("IFA_FLAGS") or a["flags"]) & IFA_F_TENTATIVE
                        ]
                    if not pending:
                        break
                    if time.monotonic() > deadline:
                        raise TestBedError(f"not settled in {ns}: {pending}")
                    time.sleep(0.01)

    def set_uplink(self, uplink: str, up: bool) -> None:
        """Set a node uplink down (its routes vanish with it) or back up
        (addresses and destination routes are restored)."""
        if uplink not in UPLINKS:
            raise ValueError(f"unknown uplink {uplink}")
        with self._ipr(self.node) as ipr:
            if up:
                self._configure_uplink(ipr, uplink)
            else:
                idx = ipr.link_lookup(ifname=uplink)[0]
                ipr.link("set", index=idx, state="down")

    def ext_exec(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return self.exec_in(self.ext, argv, **kw)

    def pod_exec(self, argv: list[str], pod: int = 0, **kw) -> subprocess.CompletedProcess:
        return self.exec_in(self.pods[pod], argv, **kw)

    def node_sysctl(self, key: str, value: str | int | None = None) -> str:
        """Read (and with ``value``, first write) a sysctl of the node namespace."""
        t = self._threads[self.node]
        if value is not None:
            t.sysctl(key, value)
        return t.read_sysctl(key)

    def in_netns(self, ns: str, fn: Callable, *args):
        """Call ``fn(*args)`` on a thread living in bed namespace ``ns``
        (e.g. to create a socket there)."""
        if ns not in self._threads:
            raise TestBedError(f"{ns} is not a namespace of this bed")
        return self._threads[ns].call(fn, *args)


# Bed's automatic tag: <pid>x<counter><hex>
_AUTO_TAG_RE = re.compile(r"^" + re.escape(NETNS_PREFIX) + r"(\d+)x[0-9a-f]+-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def bed_owner_pid(name: str) -> int | None:
    """Pid of the process that built the (auto-tagged) bed namespace ``name``,
    or None if the name is not an auto-tagged bed namespace."""
    m = _AUTO_TAG_RE.match(name)
    return int(m.group(1)) if m else None


def cleanup_stale() -> list[str]:
    """Delete namespaces of beds whose (auto-tagged) owning process is dead.

    Only names like ``ipmq-<pid>x<hex>-...`` are considered; returns the names
    removed."""
    removed = []
    for name in _list_netns():
        m = _AUTO_TAG_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                _remove_netns(name, kill=False)
                removed.append(name)
            except TestBedError:
                pass
    return removed
