"""Exceptions, masquerade-only and SNAT (README "Exceptions, masquerade-only, SNAT to a
chosen address"), proven by packets on every backend: exceptions inside exempt ranges (longest
prefix match, boundaries included), masquerade-only mode, SNAT to a chosen address per
out-interface (and what happens when that address goes), multicast never masqueraded.

One bed per backend (pod -> node -> ext, private namespaces); the extra destinations
below are added to ext's lo and routed from the node, inside the bed's namespaces only.
The expectations are written out by hand from the README's decision, not computed by
the code under test.
"""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest

from .test_traffic import FAST, TRAFFIC_BACKENDS, variant_node
from .testbed import ReplyLostError, TestBed

pytestmark = pytest.mark.traffic

# address -> uplink; the boundaries of the exceptions used below
EXTRA = {
    "10.100.9.255": "eth0",  # just below the exception 10.100.10.0/24
    "10.100.10.0": "eth0",  # its first address
    "10.100.10.127": "eth0",  # just below the inner exempt 10.100.10.128/26
    "10.100.10.128": "eth0",  # first of the inner exempt
    "10.100.10.160": "eth0",  # the innermost exception (/32)
    "10.100.10.191": "eth0",  # last of the inner exempt
    "10.100.10.192": "eth0",  # just above it
    "10.100.10.255": "eth0",  # the exception's last address
    "10.100.11.0": "eth0",  # just above the exception
    "198.20.1.11": "eth1",  # a second destination in 198.20.1.0/24
    "fd10::11": "eth0",  # beside fd10::10 (private6)
}


def add_destinations(bed: TestBed, extra: dict[str, str]) -> None:
    """Each address on ext's lo, routed from the node through its uplink (bed namespaces only)."""
    for address, uplink in extra.items():
        family = 6 if ":" in address else 4
        length = 128 if family == 6 else 32
        via = bed.ext_addr(uplink)[family]
        for ns, argv in ((bed.ext, ["ip", f"-{family}", "addr", "add", f"{address}/{length}", "dev", "lo"]
                          + (["nodad"] if family == 6 else [])),
                         (bed.node, ["ip", f"-{family}", "route", "add", f"{address}/{length}", "via", via,
                                     "dev", uplink])):
            proc = bed.exec_in(ns, argv)
            assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module", params=TRAFFIC_BACKENDS)
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def backend(variant):
    return "ebpf" if variant in FAST else variant


@pytest.fixture(scope="module")
def bed(backend):
    with TestBed(ipv6=True, tag=None) as bed:
        add_destinations(bed, EXTRA)
        yield bed


@pytest.fixture
def node(bed, variant):
    with variant_node(bed, variant) as node:
        yield node


def seen_all(bed: TestBed, destinations) -> dict[str, str]:
    return {d: bed.source_seen(d) for d in destinations}


def masqueraded(bed: TestBed, address: str, uplink: str = "eth0") -> str:
    return bed.uplink_addr[uplink][6 if ":" in address else 4]


# ---------------------------------------------------------------- exceptions (longest prefix match)


def test_exception_inside_exempt_range_and_its_boundaries(node, backend):
    """ip-masq-agent #61: do not masquerade 10.0.0.0/8, except 10.100.10.0/24."""
    bed = node.bed
    node.apply({"ipv4-native-routing-cidr": "10.0.0.0/8", "ipv6-native-routing-cidr": "fd10::/16",
                "force-masquerade-cidrs": ["10.100.10.0/24", "fd10::10/128"]}, backend)
    pod4, pod6 = bed.pod_addr[4], bed.pod_addr[6]
    want = {
        "10.100.9.255": pod4, "10.100.10.0": masqueraded(bed, "10.100.10.0"),
        "10.100.10.128": masqueraded(bed, "10.100.10.128"),
        "10.100.10.255": masqueraded(bed, "10.100.10.255"), "10.100.11.0": pod4,
        bed.dest("private10"): pod4,  # 10.10.0.10: the wider exempt range still decides
        bed.dest("public"): masqueraded(bed, "198.20.0.10"),
        bed.dest("private6"): masqueraded(bed, "fd10::10"),  # fd10::10/128 forced inside fd10::/16
        "fd10::11": pod6,
    }
    assert seen_all(bed, want) == want
    for proto in ("tcp", "icmp"):
        assert bed.source_seen("10.100.10.255", proto=proto) == want["10.100.10.255"]
        assert bed.source_seen("10.100.11.0", proto=proto) == pod4


def test_exception_inside_an_exception(node, backend):
    """Three levels: 10.0.0.0/8 exempt (ip-masq-agent), 10.100.10.0/24 masqueraded,
    10.100.10.128/26 exempt again (ip-masq-agent), 10.100.10.160/32 masqueraded."""
    bed = node.bed
    agent = "nonMasqueradeCIDRs: [10.0.0.0/8, 10.100.10.128/26]\nmasqLinkLocal: true\n"
    node.apply({"force-masquerade-cidrs": ["10.100.10.0/24", "10.100.10.160/32"]}, backend, agent=agent)
    pod4, out = bed.pod_addr[4], bed.uplink_addr["eth0"][4]
    want = {
        "10.100.9.255": pod4, "10.100.10.0": out, "10.100.10.127": out,
        "10.100.10.128": pod4, "10.100.10.160": out, "10.100.10.191": pod4,
        "10.100.10.192": out, "10.100.10.255": out, "10.100.11.0": pod4,
    }
    assert seen_all(bed, want) == want
    listed = node.ipmasq("list", check=True).stdout.split()
    assert "10.100.10.128/27" in listed and "10.100.10.161/32" in listed and "10.100.10.0/24" not in listed


def test_masquerade_only_listed_destinations(node, backend):
    """ip-masq-agent #198 / #9: only the listed destinations are masqueraded, both families;
    an exempt prefix inside a listed one still wins (longer)."""
    bed = node.bed
    node.apply({"masquerade-only-cidrs": ["198.20.1.0/24", "2001:db8:21::/48"],
                "ipv4-native-routing-cidr": "198.20.1.10/32"}, backend)
    pod4, pod6 = bed.pod_addr[4], bed.pod_addr[6]
    want = {
        bed.dest("public"): pod4, bed.dest("public_eth1"): pod4,  # 198.20.1.10/32 exempt inside
        "198.20.1.11": bed.uplink_addr["eth1"][4],
        bed.dest("private10"): pod4, bed.dest("public_ens3"): pod4,
        bed.dest("public6"): pod6, bed.dest("public6_eth1"): bed.uplink_addr["eth1"][6],
    }
    assert seen_all(bed, want) == want


def test_ambiguous_and_multicast_exceptions_exit_2_and_change_nothing(node, backend):
    node.apply({}, backend)
    before = node.rulesets()
    for cfg, words in (
        ({"ipv4-native-routing-cidr": "10.0.0.0/8", "force-masquerade-cidrs": "10.0.0.0/8"},
         ("force-masquerade-cidrs", "10.0.0.0/8")),
        ({"force-masquerade-cidrs": "239.1.0.0/16"}, ("force-masquerade-cidrs", "239.1.0.0/16", "multicast")),
        ({"egress-masquerade-addresses": {"eth0": "172.20.0.77"}}, ("egress-masquerade-addresses", "172.20.0.77")),
    ):
        proc = node.ipmasq("apply", "--config", node.write_config(cfg, name="bad.yaml"), "--backend", backend)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert all(w in proc.stderr for w in words), proc.stderr
    assert node.rulesets() == before


# ---------------------------------------------------------------- SNAT to a chosen address


@contextlib.contextmanager
def secondary_addresses(bed: TestBed, uplink: str, addresses: dict[int, str]):
    """Extra addresses on a node uplink (its subnet's, so ext routes replies back)."""
    added = []
    try:
        for family, address in addresses.items():
            length = 64 if family == 6 else 24
            argv = ["ip", f"-{family}", "addr", "add", f"{address}/{length}", "dev", uplink]
            proc = bed.node_exec(argv + (["nodad"] if family == 6 else []))
            assert proc.returncode == 0, proc.stderr
            added.append((family, address, length))
        yield added
    finally:
        for family, address, length in added:
            bed.node_exec(["ip", f"-{family}", "addr", "del", f"{address}/{length}", "dev", uplink])


SNAT4, SNAT6 = "172.20.0.9", "fd00:20::9"


def test_snat_to_a_chosen_address_per_interface(node, backend):
    """ip-masq-agent #56 / PR #103 (outputAddress), Cilium #38376: eth0's pods leave with
    the allow-listed address, not the primary one; other uplinks keep their primary."""
    bed = node.bed
    with secondary_addresses(bed, "eth0", {4: SNAT4, 6: SNAT6}):
        cfg = {"egress-masquerade-addresses": {"eth0": [SNAT4, SNAT6]}, "masquerade-to-ports": "1024-29999",
               "iptables-random-fully": True}
        node.apply(cfg, backend)
        want = {
            bed.dest("public"): SNAT4, bed.dest("public6"): SNAT6,
            bed.dest("public_eth1"): bed.uplink_addr["eth1"][4], bed.dest("public6_ens3"): bed.uplink_addr["ens3"][6],
        }
        assert seen_all(bed, want) == want
        for proto in ("tcp", "icmp"):
            assert bed.source_seen("public", proto=proto) == SNAT4
            assert bed.source_seen("public6", proto=proto) == SNAT6
        assert node.ipmasq("apply", "--config", node.write_config(cfg), "--backend", backend,
                           check=True).stdout.strip() == f"{backend}: unchanged"
        status = node.ipmasq("status", "--config", node.write_config(cfg), check=True).stdout
        assert "State: in sync" in status


def test_snat_address_removed_never_leaks_the_pod_address(node, backend):
    """The address goes after apply: packets keep leaving with it (never the pod's, never
    the primary one the operator did not allow-list); reconcile exits 1 naming it, status
    says drifted; back again, reconcile is content and replies flow."""
    bed = node.bed
    cfg = {"egress-masquerade-addresses": {"eth+": [SNAT4, SNAT6]}, "egress-masquerade-interfaces": "eth+"}
    with secondary_addresses(bed, "eth0", {4: SNAT4, 6: SNAT6}):
        node.apply(cfg, backend)
        assert bed.source_seen("public") == SNAT4
    # gone: what leaves still carries the chosen address; no reply can come back to it
    for dest in ("public", "public6"):
        try:
            seen = bed.source_seen(dest, timeout=0.5, require_reply=False)
        except ReplyLostError as exc:  # pragma: no cover - require_reply=False returns instead
            seen = exc.seen
        assert seen in (SNAT4, SNAT6), f"{dest}: left with {seen}"
    proc = node.ipmasq("reconcile")
    assert proc.returncode == 1 and "egress-masquerade-addresses" in proc.stderr and SNAT4 in proc.stderr, proc.stderr
    status = node.ipmasq("status", check=True).stdout
    assert "State: drifted" in status and f"SNAT address {SNAT4} is on no link matching eth+" in status
    assert bed.source_seen("public", timeout=0.5, require_reply=False) == SNAT4  # reconcile kept it
    with secondary_addresses(bed, "eth0", {4: SNAT4, 6: SNAT6}):
        node.ipmasq("reconcile", check=True)
        assert bed.source_seen("public") == SNAT4 and bed.source_seen("public6") == SNAT6
        assert "State: in sync" in node.ipmasq("status", check=True).stdout


# ---------------------------------------------------------------- multicast


MRT_INIT, MRT_ADD_VIF, MRT_ADD_MFC = 200, 202, 204  # linux/mroute.h (MRT6_* share the numbers)
VIFF_USE_IFINDEX = 0x8


@contextlib.contextmanager
def multicast_path(bed: TestBed, family: int, group: str, uplink: str = "eth0"):
    """The kernel's multicast router in the node namespace (an mroute socket holding one
    (pod, group) entry: vpod0 -> uplink) and a member of the group in ext. Yields send():
    one datagram from the pod to the group, returning the source ext saw (None: nothing).
    Skips where the kernel has no multicast routing (CONFIG_IP_MROUTE/IPV6_MROUTE unset)."""
    node, pod = bed.node, bed.pod_addr[family]
    index = {name: bed.in_netns(node, socket.if_nametoindex, name) for name in ("vpod0", uplink)}
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    level = socket.IPPROTO_IP if family == 4 else socket.IPPROTO_IPV6
    mr = bed.in_netns(node, socket.socket, af, socket.SOCK_RAW,
                      socket.IPPROTO_IGMP if family == 4 else socket.IPPROTO_ICMPV6)
    sockets = [mr]
    try:
        try:
            mr.setsockopt(level, MRT_INIT, 1)
        except OSError as exc:
            pytest.skip(f"no IPv{family} multicast routing in this kernel ({exc.strerror}): the node cannot "
                        "forward a pod's multicast at all (tests/vm runs kernels that can)")
        if family == 4:
            for vif, name in enumerate(("vpod0", uplink)):
                mr.setsockopt(level, MRT_ADD_VIF, struct.pack("=HBBIi4s", vif, VIFF_USE_IFINDEX, 1, 0, index[name],
                                                              bytes(4)))
            mr.setsockopt(level, MRT_ADD_MFC, struct.pack("=4s4sH32s2xIIIi", socket.inet_aton(pod),
                                                          socket.inet_aton(group), 0, bytes([0, 1]) + bytes(30),
                                                          0, 0, 0, 0))
        else:
            for mif, name in enumerate(("vpod0", uplink)):
                mr.setsockopt(level, MRT_ADD_VIF, struct.pack("=HBBH2xI", mif, 0, 1, index[name], 0))

            def sin6(addr: str) -> bytes:
                return struct.pack("=HHI16sI", socket.AF_INET6, 0, 0, socket.inet_pton(socket.AF_INET6, addr), 0)

            mr.setsockopt(level, MRT_ADD_MFC, sin6(pod) + sin6(group) + struct.pack("=H2x8I", 0, 1 << 1, *[0] * 7))
        rx = bed.in_netns(bed.ext, socket.socket, af, socket.SOCK_DGRAM)
        sockets.append(rx)
        rx.bind(("", 9100))
        if family == 4:
            rx.setsockopt(level, socket.IP_ADD_MEMBERSHIP,
                          socket.inet_aton(group) + socket.inet_aton(bed.ext_addr(uplink)[4]))
        else:
            peer = {"eth0": "up0", "eth1": "up1", "ens3": "up2"}[uplink]
            rx.setsockopt(level, socket.IPV6_JOIN_GROUP, socket.inet_pton(af, group)
                          + struct.pack("=I", bed.in_netns(bed.ext, socket.if_nametoindex, peer)))
        rx.settimeout(2)
        tx = bed.in_netns(bed.pod, socket.socket, af, socket.SOCK_DGRAM)
        sockets.append(tx)
        tx.setsockopt(level, socket.IP_MULTICAST_TTL if family == 4 else socket.IPV6_MULTICAST_HOPS, 8)

        def send() -> str | None:
            tx.sendto(b"ipmq-multicast", (group, 9100))
            try:
                return rx.recvfrom(64)[1][0]
            except socket.timeout:
                return None

        yield send
    finally:
        for s in sockets:
            s.close()


@pytest.mark.parametrize("family,group", [(4, "239.1.2.3"), (6, "ff0e::1:3")])
def test_multicast_is_never_masqueraded(node, backend, family, group):
    """Flannel's exclusion of 224.0.0.0/4 and ff00::/8, here in every backend and config,
    masquerade-only mode included: a pod's multicast leaves with the pod's address."""
    bed = node.bed
    with multicast_path(bed, family, group) as send:
        for cfg in ({}, {"force-masquerade-cidrs": ["0.0.0.0/0", "::/0"]},
                    {"masquerade-only-cidrs": ["192.0.0.0/2", "2000::/3", "fe00::/7"]}):
            node.apply(cfg, backend)
            assert send() == bed.pod_addr[family], cfg
            # unicast beside it is masqueraded by the same rules
            assert bed.source_seen("public" if family == 4 else "public6") == bed.uplink_addr["eth0"][family], cfg
