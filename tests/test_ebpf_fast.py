"""The ebpf backend's fast path (`ebpf-conntrack: false`), by packets.

Instead of the conntrack keeper, table inet ipmasq_legacy_notrack keeps conntrack off the
flows the tc programs translate (keeper.py, rules/ebpf.yaml). The decision table runs in
this mode in test_traffic.py (variant "ebpf-fast"); here: conntrack stays empty, what is
not the programs' business stays tracked (and masqueraded by the assist), and what a switch
does to established connections, both ways.
"""

from __future__ import annotations

import json
import sys

import pytest

from .test_ebpf import LiveTcp, NewFlows, TcpEcho, needs_ebpf
from .testbed import Node

FAST = {"ebpf-conntrack": False}
NOTRACK = "table inet ipmasq_legacy_notrack"
KEEPER = "table inet ipmasq_legacy_ebpf"


def tables(node: Node) -> str:
    return node.bed.node_exec(["nft", "list", "tables"]).stdout


def tracked(node: Node, address: str) -> int:
    family = ["-f", "ipv6"] if ":" in address else []
    out = node.bed.node_exec(["conntrack", "-L", *family, "-d", address]).stdout
    return len([ln for ln in out.splitlines() if ln.strip()])


def flush_conntrack(node: Node) -> None:
    node.sh("conntrack -F 2>/dev/null; conntrack -F -f ipv6 2>/dev/null; true")


@pytest.mark.traffic
@needs_ebpf
def test_fast_path_translates_with_conntrack_empty(node):
    bed = node.bed
    public, public6 = bed.dest("public"), bed.dest("public6")
    node.apply({}, "ebpf")
    flush_conntrack(node)
    for proto in ("udp", "tcp", "icmp"):
        assert bed.source_seen(public, proto=proto) == bed.uplink_addr["eth0"][4]
    assert tracked(node, public) >= 3  # the keeper: conntrack tracks every flow

    proc = node.apply(FAST, "ebpf")
    assert "nft table inet ipmasq_legacy_notrack missing" in proc.stdout
    assert NOTRACK in tables(node) and KEEPER not in tables(node)
    flush_conntrack(node)
    for proto in ("udp", "tcp", "icmp"):
        assert bed.source_seen(public, proto=proto) == bed.uplink_addr["eth0"][4]
        assert bed.source_seen(public6, proto=proto) == bed.uplink_addr["eth0"][6]
    assert tracked(node, public) == 0 and tracked(node, public6) == 0
    # in sync, and the quick path holds until the table changes
    path = node.write_config(FAST)
    status = json.loads(node.ipmasq("status", "--config", path, "-o", "json", check=True).stdout)
    assert status["in_sync"], status
    assert node.ipmasq("reconcile", "--config", path, check=True).stderr == ""
    node.sh("nft delete table inet ipmasq_legacy_notrack")
    repair = node.ipmasq("reconcile", "--config", path, check=True)
    assert "ipmasq_legacy_notrack missing" in repair.stderr, repair.stderr
    assert NOTRACK in tables(node)
    # a link the programs are not on (egress-masquerade-interfaces eth0: eth1 and ens3 are
    # not matched) is not untracked: its flows are netfilter's as before
    node.apply({**FAST, "egress-masquerade-interfaces": "eth0"}, "ebpf")
    flush_conntrack(node)
    assert bed.source_seen(bed.dest("public_eth1")) == bed.pod_addr[4]
    assert tracked(node, bed.dest("public_eth1")) == 1
    assert bed.source_seen(public, proto="tcp") == bed.uplink_addr["eth0"][4]
    assert tracked(node, public) == 0
    # back to the keeper
    node.apply({}, "ebpf")
    assert KEEPER in tables(node) and NOTRACK not in tables(node)


def _live(bed, port):
    return [LiveTcp(bed, bed.dest("public"), port), LiveTcp(bed, bed.dest("public6"), port)]


@pytest.mark.traffic
@needs_ebpf
@pytest.mark.parametrize("old, new", [("nftables", "fast"), ("ebpf", "fast"), ("fast", "ebpf"), ("fast", "nftables")])
def test_switches_to_and_from_the_fast_path(node, old, new):
    """New flows never leave with the pod's address, whichever way. Established TCP
    connections live on, except from the fast path to a netfilter backend (the cost
    README documents): netfilter meets them mid-stream and masquerades them anew."""
    bed = node.bed
    port = 9480
    servers = [TcpEcho(bed, bed.dest("public"), port), TcpEcho(bed, bed.dest("public6"), port)]
    conns = []
    spec = {"fast": ("ebpf", FAST), "ebpf": ("ebpf", {}), "nftables": ("nftables", {})}
    flush_conntrack(node)
    try:
        node.apply(spec[old][1], spec[old][0])
        conns = _live(bed, port)
        for c in conns:
            c.wait_echoes(20)
        with NewFlows(bed) as flows:
            node.apply(spec[new][1], spec[new][0])
        for c in conns:
            c.wait_echoes(50)
        assert not flows.leaked(), f"flows left untranslated during the switch: {flows.leaked()[:5]}"
        if new == "fast" and old == "nftables":
            # netfilter's connections drain: the keeper stays, no notrack table until they end
            assert NOTRACK not in tables(node) and KEEPER in tables(node)
        elif new == "fast":
            assert NOTRACK in tables(node) and KEEPER not in tables(node)
        else:
            assert NOTRACK not in tables(node)
        broken = [c.errors for c in conns if c.errors or c.echoed < 70]
        if (old, new) == ("fast", "nftables"):
            assert broken, "expected the fast path's connections to break at a switch to netfilter"
        else:
            assert not broken, broken
    finally:
        for c in conns:
            c.close()
        for s in servers:
            s.close()
    if (old, new) == ("nftables", "fast"):
        # netfilter's connections over: one reconcile ends the drain and writes the table
        flush_conntrack(node)
        node.ipmasq("reconcile", "--config", node.write_config(FAST), check=True)
        assert NOTRACK in tables(node) and KEEPER not in tables(node)
        assert "ipmasq_legacy_drain" not in tables(node)
    assert bed.source_seen(bed.dest("public")) == bed.uplink_addr["eth0"][4]
    node.ipmasq("flush", check=True)
    assert "ipmasq_legacy" not in tables(node)


def links_in_table(node: Node) -> str:
    out = node.bed.node_exec(["nft", "list", "set", "inet", "ipmasq_legacy_notrack", "links"]).stdout
    return out.split("elements = {", 1)[1].split("}", 1)[0] if "elements" in out else ""


@pytest.mark.traffic
@needs_ebpf
def test_the_table_follows_links_that_come_and_go(node):
    """watch's follow (and reconcile) name a new link in the table once the programs are
    on it, and drop it when it goes."""
    cfg = {**FAST, "egress-masquerade-interfaces": "eth+"}
    node.apply(cfg, "ebpf")
    assert "eth7" not in links_in_table(node) and "eth0" in links_in_table(node)
    node.sh("ip link add eth7 type veth peer name x-eth7 && ip link set eth7 up && ip addr add 172.27.0.1/24 dev eth7")
    path = node.write_config(cfg)
    try:
        follow = ("from ipmasq_legacy.config import load\nfrom ipmasq_legacy import plan\n"
                  "from ipmasq_legacy.backends.ebpf import EbpfBackend\n"
                  f"print(EbpfBackend().follow(plan.build(load({path!r}))))")
        out = node.bed.node_exec([sys.executable, "-c", follow], env=node.env)
        assert out.returncode == 0, out.stderr
        assert "ipmasq_legacy_notrack written" in out.stdout, out.stdout
        assert "eth7" in links_in_table(node)
        assert "State: in sync" in node.ipmasq("status", "--config", path, check=True).stdout
    finally:
        node.sh("ip link del eth7")
    node.ipmasq("reconcile", "--config", path, check=True)
    assert "eth7" not in links_in_table(node)
    assert "State: in sync" in node.ipmasq("status", "--config", path, check=True).stdout
