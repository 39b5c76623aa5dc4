"""Switching backends under traffic: the new one is live before the old one goes.

For every ordered pair of netfilter backends: apply with Y, keep new UDP flows leaving
the pod, apply with X, and count the flows that left with the pod's own address.
"""

from __future__ import annotations

import itertools
import threading

import pytest

from .test_traffic import NETFILTER_BACKENDS
from .testbed import TestBed

pytestmark = pytest.mark.traffic


class Flows:
    """New flows (UDP, v4 and v6) from the pod until stopped; tallies what outside saw."""

    def __init__(self, bed: TestBed):
        self.bed = bed
        self.seen: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        targets = itertools.cycle([(4, self.bed.dest("public")), (6, self.bed.dest("public6"))])
        while not self._stop.is_set():
            family, address = next(targets)
            try:
                seen = self.bed.source_seen(address, proto="udp", timeout=1.0)
            except Exception as exc:  # a lost reply: counted as lost, not as a crash
                seen = f"lost: {exc}"
            self.seen.append((family, seen))

    def __enter__(self):
        self._thread.start()
        while len(self.seen) < 20:  # flowing before the switch starts
            self._stop.wait(0.01)
        return self

    def __exit__(self, *exc):
        count = len(self.seen)
        while len(self.seen) < count + 20:  # and still flowing after it
            self._stop.wait(0.01)
        self._stop.set()
        self._thread.join(5)


@pytest.mark.parametrize("old, new", list(itertools.permutations(NETFILTER_BACKENDS, 2)))
def test_switch_under_traffic_never_leaks(node, old, new):
    bed = node.bed
    node.apply({}, old)
    with Flows(bed) as flows:
        proc = node.apply({}, new)
    assert f"removed {old}" in proc.stdout
    masqueraded = {4: bed.uplink_addr["eth0"][4], 6: bed.uplink_addr["eth0"][6]}
    leaks = [(f, s) for f, s in flows.seen if s == bed.pod_addr[f]]
    other = [(f, s) for f, s in flows.seen if s not in (masqueraded[f], bed.pod_addr[f])]
    assert not leaks, f"{len(leaks)} of {len(flows.seen)} flows left with the pod's address"
    assert not other, f"flows lost or odd during the switch: {other[:5]}"
    assert len(flows.seen) >= 40
    status = node.ipmasq("status", "-o", "json", check=True).stdout
    assert f'"backend": "{new}"' in status and '"in_sync": true' in status
    # the old backend's objects are gone
    rules = node.rulesets()
    if old.startswith("iptables-"):
        tool = old.replace("iptables-", "")
        section = rules.split(f"## iptables-{tool}-save")[1].split("## ")[0]
        assert "IPMASQ-LEGACY" not in section
    else:
        assert "ipmasq_legacy" not in rules.split("## nft")[1].split("## ipset")[0]
