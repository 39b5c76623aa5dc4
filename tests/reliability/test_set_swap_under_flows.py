"""A dense stream of new flows to an exempt destination while the exempt set changes
under it, the chain's rules with it, and the table is installed afresh (a switch from
another backend): not one flow may leave masqueraded.

Why this test exists: the kernel builds an interval set's lookup structure when the
transaction that filled it commits, after that transaction's rules are visible. A set
created in the same transaction as the rules that use it looks empty to them for a few
microseconds, so the nftables backend loads a new set alone first
(backends/nftables.py). The reference run does it the other way, in one transaction, on
the same bed; its count is published, not asserted (a kernel may change), and shows
that the stream is dense enough to catch the window.
"""

from __future__ import annotations

import re
import socket
import threading

import pytest

from bench.flows import SINK_ADDR, SINK_NET, FlowSender
from ipmasq_legacy.backends import nftables as nftmod
from ipmasq_legacy.plan import FamilyPlan

from ..test_traffic import NETFILTER_BACKENDS
from .common import publish, scale

pytestmark = pytest.mark.traffic

BURST = 20_000  # new flows per burst: destination ports 1..BURST, conntrack flushed between


class FlowStream:
    """New UDP flows from the pod to SINK_ADDR, burst after burst, until stopped; the
    outside counts by source address with nft counters (no packet is missed)."""

    def __init__(self, bed):
        self.bed = bed
        self.node_addr = bed.uplink_addr["eth0"][4]
        for ns, argv in ((bed.ext, ["ip", "route", "replace", "blackhole", SINK_NET]),
                         (bed.node, ["ip", "route", "replace", SINK_NET, "via", bed.ext_addr("eth0")[4]])):
            r = bed.exec_in(ns, argv)
            assert r.returncode == 0, r.stderr
        counting = (f"table ip ipmq_count {{\n chain pre {{\n  type filter hook prerouting priority -300;\n"
                    f"  ip daddr {SINK_NET} ip saddr {bed.pod_addr[4]} counter\n"
                    f"  ip daddr {SINK_NET} ip saddr {self.node_addr} counter\n }}\n}}\n")
        r = bed.exec_in(bed.ext, ["nft", "-f", "-"], input=counting)
        assert r.returncode == 0, r.stderr
        self.sock = bed.in_netns(bed.pod, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((bed.pod_addr[4], 40000))
        self.sender = FlowSender(self.sock, SINK_ADDR, BURST)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _run(self):
        while not self.stop.is_set():
            self.bed.node_exec(["conntrack", "-F"])
            self.sender.send(0, BURST)

    def counts(self) -> tuple[int, int]:
        """(flows seen outside with the pod's address, with the node's)."""
        out = self.bed.exec_in(self.bed.ext, ["nft", "list", "chain", "ip", "ipmq_count", "pre"]).stdout
        pod, node = (int(n) for n in re.findall(r"packets (\d+)", out))
        return pod, node

    def reset(self):
        self.bed.exec_in(self.bed.ext, ["nft", "reset", "counters", "table", "ip", "ipmq_count"])

    def __enter__(self):
        self.stop.clear()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)

    def close(self):
        self.sock.close()
        self.bed.exec_in(self.bed.ext, ["nft", "delete", "table", "ip", "ipmq_count"])
        self.bed.exec_in(self.bed.ext, ["ip", "route", "del", "blackhole", SINK_NET])
        self.bed.exec_in(self.bed.node, ["ip", "route", "del", SINK_NET])


@pytest.fixture
def stream(node):
    s = FlowStream(node.bed)
    try:
        yield s
    finally:
        s.close()


def test_exempt_flows_never_masqueraded_while_sets_change(node, stream):
    applies = scale(ci=40, full=200)
    configs = [
        node.write_config({"ipv4-native-routing-cidr": [SINK_NET, "10.0.0.0/16"]}, name="a.yaml"),
        node.write_config({"ipv4-native-routing-cidr": [SINK_NET, "10.0.0.0/16", "172.18.0.0/16"],
                           "egress-masquerade-interfaces": "eth+"}, name="b.yaml"),
    ]
    other = next(b for b in NETFILTER_BACKENDS if b != "nftables")
    fresh = 0
    node.ipmasq("apply", "--config", configs[0], "--backend", "nftables", check=True)
    with stream:
        for i in range(applies):
            if i % 5 == 4:  # away and back: the nftables table is installed afresh
                node.ipmasq("apply", "--config", configs[i % 2], "--backend", other, check=True)
                fresh += 1
            node.ipmasq("apply", "--config", configs[i % 2], "--backend", "nftables", check=True)
    pod, masqueraded = stream.counts()
    node.ipmasq("flush", check=True)

    # The reference: the same two sets, each time created in one transaction with the rules.
    stream.reset()
    tables = [nftmod.render_replace(FamilyPlan(4, (), (), exempt))
              for exempt in ((SINK_NET, "10.0.0.0/16"), (SINK_NET, "10.0.0.0/16", "172.18.0.0/16"))]
    with stream:
        for i in range(applies * 4):
            r = node.bed.node_exec(["nft", "-f", "-"], input=tables[i % 2])
            assert r.returncode == 0, r.stderr
    ref_pod, ref_masqueraded = stream.counts()
    node.bed.node_exec(["nft", "delete", "table", "ip", "ipmasq_legacy"])

    publish("set_swap_under_flows", {
        "applies": applies, "fresh_installs": fresh, "flows": pod + masqueraded, "masqueraded": masqueraded,
        "reference_one_transaction": {"transactions": applies * 4, "flows": ref_pod + ref_masqueraded,
                                      "masqueraded": ref_masqueraded},
    })
    print(f"\n{applies} applies ({fresh} fresh installs): {pod + masqueraded} flows, {masqueraded} masqueraded; "
          f"reference, set and rules in one transaction x{applies * 4}: {ref_pod + ref_masqueraded} flows, "
          f"{ref_masqueraded} masqueraded")
    assert pod > applies * 100, "the stream did not keep up"
    assert masqueraded == 0, f"{masqueraded} flows to an exempt destination left with the node's address"
