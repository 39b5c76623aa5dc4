"""Backend equivalence, proven by packets: pod -> node -> outside, in private namespaces.

One table of config cases, every destination of the bed, UDP to all of them and TCP and
ICMP echo to a few, run against every netfilter backend with the same expectations.
The expectations come from the spec's decision (section 3), written out by hand per
case, not from the code under test.
"""

from __future__ import annotations

import ipaddress
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from ipmasq_legacy import backends

from .nodeutil import add_foreign_rules, driven_node, in_any
from .testbed import TestBed

pytestmark = pytest.mark.traffic

NETFILTER_BACKENDS = [name for name in backends.NAMES if name != "ebpf"]


def _ebpf_param(variant: str = "ebpf"):
    reason = backends.get("ebpf").unavailable_reason() if "ebpf" in backends.NAMES else "not registered"
    return pytest.param(variant, marks=pytest.mark.skip(reason=f"ebpf: {reason}")) if reason else variant


# every backend, the BPF datapath included, against the same expectations; "ebpf-fast" is
# the ebpf backend with `ebpf-conntrack: false` in every config it is given (the fast path:
# conntrack off the flows the tc programs translate)
FAST = {"ebpf-fast": {"ebpf-conntrack": False}}
TRAFFIC_BACKENDS = NETFILTER_BACKENDS + [_ebpf_param(), _ebpf_param("ebpf-fast")]
# the `--backend` names alone (the fast path is a config of ebpf: the decision tests run it)
BACKENDS = NETFILTER_BACKENDS + [_ebpf_param()]

TKE_AGENT = """\
nonMasqueradeCIDRs:
- 10.0.0.0/16
- 172.18.0.0/16
- 192.168.0.0/17
masqLinkLocal: {link_local}
"""
DEFAULT_RANGES = [
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "192.0.0.0/24", "192.0.2.0/24",
    "192.88.99.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4",
]


@dataclass
class Case:
    name: str
    cfg: dict
    agent: str | None = None
    exempt: list = field(default_factory=list)  # destinations inside are never masqueraded
    interfaces: tuple = ()  # () = every interface but lo
    pod_cidrs: dict = field(default_factory=dict)  # family -> list; sources outside are never masqueraded
    families: tuple = (4, 6)


CASES = [
    Case("default", {}),
    Case("eth-plus", {"egress-masquerade-interfaces": "eth+"}, interfaces=("eth+",)),
    Case("agent-empty-file", {}, agent="", exempt=DEFAULT_RANGES + ["169.254.0.0/16", "fe80::/10"]),
    Case("tke-configmap", {}, agent=TKE_AGENT.format(link_local="true"),
         exempt=["10.0.0.0/16", "172.18.0.0/16", "192.168.0.0/17", "fe80::/10"]),
    Case("tke-link-local-off", {}, agent=TKE_AGENT.format(link_local="false"),
         exempt=["10.0.0.0/16", "172.18.0.0/16", "192.168.0.0/17", "169.254.0.0/16", "fe80::/10"]),
    Case("native-routing", {"ipv4-native-routing-cidr": "10.0.0.0/8", "ipv6-native-routing-cidr": "fd10::/16"},
         exempt=["10.0.0.0/8", "fd10::/16"]),
    Case("pod-cidr-not-ours", {"ipv4-pod-cidr": "10.245.0.0/16"}, pod_cidrs={4: ["10.245.0.0/16"]},
         exempt=["10.245.0.0/16"]),
    Case("pod-cidr-eth0-v4-only",
         {"ipv4-pod-cidr": "10.244.0.0/16", "egress-masquerade-interfaces": ["eth0"], "enable-ipv6-masquerade": False},
         interfaces=("eth0",), pod_cidrs={4: ["10.244.0.0/16"]}, exempt=["10.244.0.0/16"], families=(4,)),
]
FEW = ("public", "tke10", "public6")


def expected_source(bed: TestBed, case: Case, dest_name: str) -> str:
    """Spec section 3, by hand: the uplink's address when masqueraded, else the pod's."""
    dest = bed.DESTINATIONS[dest_name]
    family = dest.family
    pod = bed.pod_addr[family]
    iface_ok = not case.interfaces or any(
        dest.uplink.startswith(p[:-1]) if p.endswith("+") else dest.uplink == p for p in case.interfaces
    )
    source_ok = family not in case.pod_cidrs or in_any(pod, case.pod_cidrs[family])
    exempt = [p for p in case.exempt if ipaddress.ip_network(p).version == family]
    masquerade = family in case.families and iface_ok and source_ok and not in_any(dest.address, exempt)
    return bed.uplink_addr[dest.uplink][family] if masquerade else pod


@pytest.fixture(scope="module", params=TRAFFIC_BACKENDS)
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def backend(variant):
    return "ebpf" if variant in FAST else variant


@pytest.fixture(scope="module")
def bed(backend):
    with TestBed(ipv6=True, tag=None) as bed:
        yield bed


@contextmanager
def variant_node(bed, variant):
    """A driven node; for a FAST variant every config it writes carries the variant's keys."""
    with driven_node(bed) as node:
        if variant in FAST:
            write = node.write_config
            node.write_config = lambda cfg, agent=None, name="config.yaml": write({**FAST[variant], **cfg}, agent, name)
        yield node


@pytest.fixture
def node(bed, variant):
    with variant_node(bed, variant) as node:
        yield node


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_decision_matches_spec(node, backend, case):
    bed = node.bed
    node.apply(case.cfg, backend, case.agent)
    wrong = []
    probes = [(d, "udp") for d in bed.DESTINATIONS] + [(d, p) for d in FEW for p in ("tcp", "icmp")]
    for dest_name, proto in probes:
        want = expected_source(bed, case, dest_name)
        seen = bed.source_seen(bed.dest(dest_name), proto=proto)
        if seen != want:
            wrong.append(f"{proto} to {dest_name} ({bed.dest(dest_name)}): saw {seen}, want {want}")
    assert not wrong, f"{backend}/{case.name}:\n" + "\n".join(wrong)


def test_config_change_applies_to_new_connections(node, backend):
    bed = node.bed
    public = bed.dest("public")
    node.apply({}, backend)
    assert bed.source_seen(public) == bed.uplink_addr["eth0"][4]
    node.apply({"ipv4-native-routing-cidr": "198.20.0.0/16"}, backend)
    assert bed.source_seen(public) == bed.pod_addr[4]
    node.apply({"enable-ipv4-masquerade": False}, backend)
    assert bed.source_seen(public) == bed.pod_addr[4]
    assert bed.source_seen(bed.dest("public6")) == bed.uplink_addr["eth0"][6]


def test_apply_twice_is_byte_identical(node, backend):
    cfg = {"egress-masquerade-interfaces": ["eth+", "ens3"], "masquerade-to-ports": "1024-29999,32768-65535",
           "iptables-random-fully": True}
    node.apply(cfg, backend, agent="")
    first = node.rulesets()
    again = node.apply(cfg, backend, agent="")
    assert again.stdout.strip() == f"{backend}: unchanged"
    assert node.rulesets() == first


def test_bad_config_exits_2_and_changes_nothing(node, backend):
    node.apply({}, backend)
    before = node.rulesets()
    bad = node.write_config({"egress-masquerade-interfaces": ["eth0\n-A POSTROUTING -j ACCEPT"]}, name="bad.yaml")
    proc = node.ipmasq("apply", "--config", bad, "--backend", backend)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "egress-masquerade-interfaces" in proc.stderr
    typo = node.write_config({"egress-masquerade-interface": "eth0"}, name="typo.yaml")
    proc = node.ipmasq("apply", "--config", typo, "--backend", backend)
    assert proc.returncode == 2 and "did you mean 'egress-masquerade-interfaces'" in proc.stderr
    assert node.rulesets() == before
    assert node.bed.source_seen(node.bed.dest("public")) == node.bed.uplink_addr["eth0"][4]


def test_flush_restores_ruleset_and_foreign_rules_stay(node, backend):
    add_foreign_rules(node, backend)
    before = node.rulesets()
    node.apply({}, backend, agent="")
    during = node.rulesets()
    for line in [ln for ln in before.splitlines() if ln.startswith("-A") or "foreign" in ln]:
        assert line in during, f"foreign rule changed by apply: {line}"
    node.ipmasq("reconcile", check=True)
    proc = node.ipmasq("flush", check=True)
    assert "removed" in proc.stdout
    assert node.rulesets() == before
    assert node.ipmasq("flush", check=True).stdout.strip() == "nothing to remove"


def test_ten_thousand_prefixes(node, backend):
    bed = node.bed
    prefixes = [f"11.{i // 256}.{i % 256}.0/24" for i in range(10000)] + ["198.20.0.10/32"]
    node.apply({"ipv4-native-routing-cidr": prefixes}, backend)
    assert bed.source_seen(bed.dest("public")) == bed.pod_addr[4]  # inside the list: exempt
    assert bed.source_seen(bed.dest("public_eth1")) == bed.uplink_addr["eth1"][4]
    listed = node.ipmasq("list", check=True).stdout.splitlines()
    assert listed[0] == "IP PREFIX/ADDRESS" and "198.20.0.10/32" in listed
    assert "224.0.0.0/4" in listed and "ff00::/8" in listed  # multicast: exempt whatever the config
    assert len(listed) - 3 == len(set(ipaddress.collapse_addresses(ipaddress.ip_network(p) for p in prefixes)))


def test_status_reports_backend_interfaces_and_counters(node, backend):
    bed = node.bed
    cfg = {"egress-masquerade-interfaces": "eth+"}
    node.apply(cfg, backend, agent="")
    for _ in range(3):
        bed.source_seen(bed.dest("public"))
    config_path = node.write_config(cfg, agent="")
    text = node.ipmasq("status", "--config", config_path, check=True).stdout
    assert text.splitlines()[0] == f"Masquerading: {backend} [eth0, eth1] exempt: 10.0.0.0/8 (+13 more)"
    assert "State: in sync" in text
    import json

    data = json.loads(node.ipmasq("status", "--config", config_path, "-o", "json", check=True).stdout)
    assert data["backend"] == backend and data["in_sync"] and data["interfaces"] == ["eth0", "eth1"]
    assert sum(c["packets"] for c in data["counters"] if c["family"] == 4) >= 3
