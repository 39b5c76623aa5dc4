"""Scrapes and status read what the counters cost (README "Benchmarks"): Backend.counters()
gives what live() gives for the counters, without reading the exempt set's members; a
metrics file written by a cron run lists nothing; status trusts the last reconcile's
verdict while nothing changed, and reads everything with --deep."""

from __future__ import annotations

import json
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipmasq_legacy import backends

from .test_operations import log_nft_calls

pytestmark = pytest.mark.traffic

# Interfaces named exactly, by prefix, and the default (any but lo), with SNAT rules too.
CONFIGS = [
    {"egress-masquerade-interfaces": "eth+,ens3", "masquerade-to-ports": "30000-40000"},
    {},
]

_READ = """
import json, sys
from ipmasq_legacy import backends
b = backends.get(sys.argv[1])
live = sorted([c.family, c.interface, c.packets, c.bytes, c.rule] for f in b.live().families.values()
              for c in f.counters)
cheap = sorted([c.family, c.interface, c.packets, c.bytes, c.rule] for c in b.counters())
print(json.dumps({"live": live, "counters": cheap}))
"""


@pytest.fixture
def node(bed_module):
    from .nodeutil import driven_node

    with driven_node(bed_module) as node:
        yield node


def _read(node, backend: str) -> dict:
    proc = node.bed.node_exec([sys.executable, "-c", _READ, backend], env=node.env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("backend", backends.NAMES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=["interfaces", "default"])
def test_counters_are_live_counters(node, backend, cfg):
    if backends.get(backend).unavailable_reason():
        pytest.skip(backends.get(backend).unavailable_reason())
    node.apply(cfg, backend, agent="")
    for proto in ("udp", "tcp"):
        for _ in range(2):
            node.bed.source_seen(node.bed.dest("public"), proto=proto)
    got = _read(node, backend)
    assert got["counters"] == got["live"]  # nftables: the rule texts are apply's record's
    assert sum(c[2] for c in got["counters"] if c[0] == 4) >= 4
    node.ipmasq("flush", check=True)


def test_metrics_file_lists_no_set(node):
    """A cron reconcile's textfile: the counters and the recorded exempt count, and not one
    nft listing (which would fetch every element of the exempt set)."""
    calls = log_nft_calls(node)
    config_path = node.write_config({"ipv4-native-routing-cidr": ["198.51.100.0/24", "203.0.113.0/24"]}, agent="")
    node.ipmasq("apply", "--config", config_path, "--backend", "nftables", check=True)
    node.ipmasq("reconcile", "--config", config_path, check=True)
    node.bed.source_seen(node.bed.dest("public"))
    calls.write_text("")
    out = node.dir / "metrics.prom"
    node.ipmasq("reconcile", "--config", config_path, "--metrics-file", str(out), check=True)
    assert calls.read_text() == "", calls.read_text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(out.read_text()) for s in fam.samples}
    exempt = json.loads(node.ipmasq("status", "--deep", "-o", "json", check=True).stdout)["exempt"]
    assert samples[("ipmasq_exempt_prefixes", (("family", "ipv4"),))] == len([p for p in exempt if ":" not in p])
    assert samples[("ipmasq_exempt_prefixes", (("family", "ipv6"),))] == len([p for p in exempt if ":" in p])
    assert samples[("ipmasq_masqueraded_packets_total", (("family", "ipv4"), ("interface", "any")))] >= 1


def test_status_trusts_the_verified_state_and_deep_reads_it(node):
    calls = log_nft_calls(node)
    config_path = node.write_config({"ipv4-native-routing-cidr": ["198.51.100.0/24"]}, agent="")
    node.ipmasq("apply", "--config", config_path, "--backend", "nftables", check=True)
    calls.write_text("")
    first = node.ipmasq("status", "-o", "json", check=True).stdout  # not verified yet: reads all
    assert any(c.startswith("list table") for c in calls.read_text().splitlines()), calls.read_text()
    node.ipmasq("reconcile", check=True)  # verifies
    calls.write_text("")
    trusted = node.ipmasq("status", "-o", "json", check=True).stdout
    assert calls.read_text() == "", "status listed what the last reconcile verified"
    assert json.loads(trusted) == json.loads(first)
    deep = node.ipmasq("status", "--deep", "-o", "json", check=True).stdout
    assert any(c.startswith("list table") for c in calls.read_text().splitlines())
    assert json.loads(deep) == json.loads(first)
    # a change behind our back moves the fingerprint: read again, and report it
    node.sh("nft flush chain ip ipmasq_legacy postrouting")
    calls.write_text("")
    drifted = json.loads(node.ipmasq("status", "-o", "json", check=True).stdout)
    assert not drifted["in_sync"] and calls.read_text()


def test_scrape_reads_counters_only_at_scale(node):
    """The agent's scrape beside 10,000 prefixes: no nft process (IPMASQ_NFT_CLI), the
    netlink rule dump only."""
    calls = log_nft_calls(node)
    config_path = node.write_config({"ipv4-native-routing-cidr": [f"20.{i // 128}.{i % 128 * 2}.0/24"
                                                                  for i in range(10_000)]}, agent="")
    node.ipmasq("apply", "--config", config_path, "--backend", "nftables", check=True)
    calls.write_text("")
    code = ("from ipmasq_legacy import metrics; from prometheus_client import generate_latest; "
            "print(generate_latest(metrics.registry_with(metrics.Collector())).decode())")
    proc = node.bed.node_exec([sys.executable, "-c", code], env=node.env)
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text() == ""
    gauge = {ln.split('"')[1]: float(ln.split()[-1]) for ln in proc.stdout.splitlines()
             if ln.startswith("ipmasq_exempt_prefixes{")}
    exempt = json.loads(node.ipmasq("status", "--deep", "-o", "json", check=True).stdout)["exempt"]
    assert gauge == {"ipv4": len([p for p in exempt if ":" not in p]), "ipv6": len([p for p in exempt if ":" in p])}
    assert gauge["ipv4"] > 10_000
