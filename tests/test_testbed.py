"""The namespace test bed itself: with no NAT rules the node only forwards, so
every probe must arrive with the pod's own address; and NAT done in the node
must be visible."""

from __future__ import annotations

import subprocess
import time

import pytest

from .testbed import ALL_DESTINATIONS, ReplyLostError, TestBed, TestBedError, _netns_pids

pytestmark = pytest.mark.traffic

PROTOS = ["udp", "tcp", "icmp"]
# a few destinations over each uplink, both families
SAMPLE = [
    "public", "private10", "metadata", "public_eth1", "tke172", "public_ens3",
    "public6", "private6", "public6_eth1", "public6_ens3",
]
UNROUTABLE = {4: "198.51.99.1", 6: "2001:db8:99::1"}


def netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def must(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"{r.args} failed ({r.returncode}): {r.stderr}"
    return r


def test_layout(bed_module):
    b = bed_module
    assert b.pod.endswith("-pod") and b.pods == [b.pod]
    assert {b.pod, b.node, b.ext} <= set(netns_list())
    assert b.pod_addr == {4: "10.244.1.2", 6: "fd00:244:1::2"}
    assert b.uplink_addr["eth0"] == {4: "172.20.0.1", 6: "fd00:20::1"}
    assert b.uplink_addr["eth1"] == {4: "172.21.0.1", 6: "fd00:21::1"}
    assert b.uplink_addr["ens3"] == {4: "172.22.0.1", 6: "fd00:22::1"}
    assert b.DESTINATIONS == ALL_DESTINATIONS
    assert b.DESTINATIONS["tke172"].uplink == "eth1"
    assert b.DESTINATIONS["public6_ens3"].family == 6
    assert b.node_sysctl("net.ipv4.ip_forward") == "1"
    assert b.node_sysctl("net.ipv6.conf.all.forwarding") == "1"
    links = must(b.node_exec(["ip", "-o", "link", "show"])).stdout
    for name in ("vpod0", "eth0", "eth1", "ens3"):
        assert f" {name}@" in links
    addrs = must(b.pod_exec(["ip", "-o", "addr", "show", "dev", "eth0"])).stdout
    assert "10.244.1.2/24" in addrs
    (v6line,) = [line for line in addrs.splitlines() if "fd00:244:1::2/64" in line]
    assert "tentative" not in v6line  # usable at once (no DAD)
    routes = must(b.node_exec(["ip", "route", "get", "172.18.0.10"])).stdout
    assert "dev eth1" in routes


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("name", SAMPLE)
def test_plain_forwarding_keeps_pod_source(bed_module, name, proto):
    b = bed_module
    d = b.DESTINATIONS[name]
    assert b.source_seen(d.address, proto) == b.pod_addr[d.family]


@pytest.mark.parametrize("proto", PROTOS)
def test_every_destination_reachable(bed_module, proto):
    b = bed_module
    got = {n: b.source_seen(n, proto) for n in b.DESTINATIONS}
    assert got == {n: b.pod_addr[d.family] for n, d in b.DESTINATIONS.items()}


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("family", [4, 6])
def test_unroutable_is_none(bed_module, family, proto):
    t = time.monotonic()
    assert bed_module.source_seen(UNROUTABLE[family], proto, timeout=0.5) is None
    assert time.monotonic() - t < 1.5


def test_many_probes_in_a_row(bed_module):
    b = bed_module
    t = time.monotonic()
    for i in range(100):
        for proto in PROTOS:
            assert b.source_seen("public" if i % 2 else "public6", proto) == b.pod_addr[6 if i % 2 == 0 else 4]
    per_probe = (time.monotonic() - t) / 300
    print(f"{per_probe * 1000:.1f} ms per probe")  # measured, not asserted (bench/ measures speed)


def test_node_exec_never_raises(bed_module):
    b = bed_module
    r = b.node_exec(["sh", "-c", "echo $FOO; cat; exit 3"], env={"FOO": "bar"}, input="hello")
    assert r.returncode == 3
    assert r.stdout == "bar\nhello"
    r = b.node_exec(["ip", "-o", "link", "show", "nosuchlink"])
    assert r.returncode != 0 and r.stderr


def test_wait_settled(bed):
    bed.wait_settled()
    for ns in bed.namespaces:
        out = must(bed.exec_in(ns, ["ip", "-o", "addr", "show"])).stdout
        assert "tentative" not in out, ns
        links = must(bed.exec_in(ns, ["ip", "-o", "link", "show"])).stdout
        assert "NO-CARRIER" not in links and "LOWERLAYERDOWN" not in links, ns


def test_uplink_down_makes_its_destinations_unreachable(bed):
    bed.set_uplink("eth1", False)
    for name in ("public_eth1", "tke172", "public6_eth1"):
        assert bed.source_seen(name, "udp", timeout=0.5) is None, name
    assert bed.source_seen("public", "udp") == bed.pod_addr[4]
    assert bed.source_seen("public6_ens3", "tcp") == bed.pod_addr[6]
    bed.set_uplink("eth1", True)
    for name in ("public_eth1", "tke172", "public6_eth1"):
        d = bed.DESTINATIONS[name]
        assert bed.source_seen(name, "udp") == bed.pod_addr[d.family], name


def test_masquerade_on_eth0_is_visible(bed):
    must(bed.node_exec(["iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"]))
    for proto in PROTOS:
        assert bed.source_seen("public", proto) == "172.20.0.1", proto
        assert bed.source_seen("metadata", proto) == "172.20.0.1", proto
        assert bed.source_seen("public_eth1", proto) == "10.244.1.2", proto
        assert bed.source_seen("public_ens3", proto) == "10.244.1.2", proto
        # IPv6 is untouched by an IPv4 rule
        assert bed.source_seen("public6", proto) == "fd00:244:1::2", proto
    must(bed.node_exec(["ip6tables-nft", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"]))
    for proto in PROTOS:
        assert bed.source_seen("public6", proto) == "fd00:20::1", proto
        assert bed.source_seen("public6_eth1", proto) == "fd00:244:1::2", proto


def test_each_probe_is_a_new_flow(bed):
    """A rule change applies to the very next probe (no stale conntrack entry)."""
    rule = ["POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"]
    for proto in PROTOS:
        assert bed.source_seen("public", proto) == "10.244.1.2"
    must(bed.node_exec(["iptables-nft", "-t", "nat", "-A", *rule]))
    for proto in PROTOS:
        assert bed.source_seen("public", proto) == "172.20.0.1"
    must(bed.node_exec(["iptables-nft", "-t", "nat", "-D", *rule]))
    for proto in PROTOS:
        assert bed.source_seen("public", proto) == "10.244.1.2"


def test_lost_reply_is_reported(bed):
    # replies from ext come back in on eth0; drop them in the node
    must(bed.node_exec(["iptables-nft", "-A", "FORWARD", "-i", "eth0", "-j", "DROP"]))
    for proto in ("udp", "icmp"):
        with pytest.raises(ReplyLostError) as e:
            bed.source_seen("public", proto, timeout=0.3)
        assert e.value.seen == "10.244.1.2"
        assert bed.source_seen("public", proto, timeout=0.3, require_reply=False) == "10.244.1.2"
    assert bed.source_seen("public", "tcp", timeout=0.3) is None


def test_more_pods():
    with TestBed(pods=3) as b:
        assert len(b.pods) == 3 and b.pods[0] == b.pod
        assert len(set(b.pods)) == 3
        for i in range(3):
            a = b.pod_addrs(i)
            assert a == {4: f"10.244.{i + 1}.2", 6: f"fd00:244:{i + 1}::2"}
            for proto in PROTOS:
                assert b.source_seen("public", proto, pod=i) == a[4]
                assert b.source_seen("public6_eth1", proto, pod=i) == a[6]
        must(b.node_exec(["iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", "10.244.2.0/24",
                          "-o", "eth0", "-j", "MASQUERADE"]))
        assert b.source_seen("public", pod=0) == "10.244.1.2"
        assert b.source_seen("public", pod=1) == "172.20.0.1"


def test_ipv4_only_bed():
    with TestBed(ipv6=False) as b:
        assert 6 not in b.pod_addr
        assert all(d.family == 4 for d in b.DESTINATIONS.values())
        assert "public6" not in b.DESTINATIONS
        assert b.uplink_addr["eth1"] == {4: "172.21.0.1"}
        assert b.source_seen("public_ens3", "tcp") == "10.244.1.2"
        assert b.source_seen("2001:db8:20::10", timeout=0.3) is None


def test_two_beds_at_once_and_close():
    a, b = TestBed(), TestBed()
    try:
        names = set(a.namespaces) | set(b.namespaces)
        assert len(names) == 6
        assert names <= set(netns_list())
        must(a.node_exec(["iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"]))
        assert a.source_seen("public") == "172.20.0.1"
        assert b.source_seen("public") == "10.244.1.2"
        assert b.source_seen("public6", "icmp") == "fd00:244:1::2"
    finally:
        a.close()
        b.close()
    left = set(netns_list())
    assert not (names & left)
    a.close()  # idempotent
    with pytest.raises(TestBedError):
        a.source_seen("public")


def test_close_kills_processes_left_in_the_bed():
    b = TestBed(ipv6=False)
    p = subprocess.Popen(["ip", "netns", "exec", b.ext, "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while p.pid not in _netns_pids(b.ext):
            assert time.monotonic() < deadline, "sleep never entered the ext namespace"
            time.sleep(0.01)
        b.close()
        assert p.wait(5) != 0
        assert b.ext not in netns_list()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
