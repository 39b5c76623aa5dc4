"""`auto` keeps one NAT engine on the node; doctor explains; selftest proves and fails clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ipmasq_legacy import backends

from .nodeutil import driven_node
from .testbed import Node, TestBed

pytestmark = pytest.mark.traffic


@pytest.fixture(scope="module")
def bed():
    with TestBed(ipv6=False) as bed:
        yield bed


@pytest.fixture
def node(bed):
    with driven_node(bed) as node:
        yield node
        # leave the node as clean as we found it for the next case
        node.sh("for t in iptables-legacy iptables-nft; do for c in mangle filter nat; do "
                "$t -t $c -F; $t -t $c -X; done; done; nft delete table ip kube-proxy 2>/dev/null; true")


def backend_of(node: Node) -> str:
    return json.loads(node.ipmasq("status", "-o", "json", check=True).stdout)["backend"]


def hint_chain(node: Node, tool: str) -> None:
    node.sh(f"{tool}-restore --noflush -w", input="*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n")


def test_clean_node_gets_nftables(node):
    node.ipmasq("apply", check=True)
    assert backend_of(node) == "nftables"
    assert node.bed.source_seen(node.bed.dest("public")) == node.bed.uplink_addr["eth0"][4]


@pytest.mark.parametrize("variant", ["iptables-legacy", "iptables-nft"])
def test_kubelet_hint_chain_picks_its_variant(node, variant):
    hint_chain(node, variant)
    out = node.ipmasq("apply", check=True).stdout
    assert out.startswith(f"{variant}:")
    assert backend_of(node) == variant


def test_rule_counts_pick_the_busiest_engine(node):
    node.sh("iptables-legacy-restore --noflush -w", input=textwrap.dedent("""\
        *filter
        -A FORWARD -s 10.1.0.0/16 -j ACCEPT
        -A FORWARD -s 10.2.0.0/16 -j ACCEPT
        COMMIT
        """))
    node.sh("iptables-nft -A FORWARD -s 10.3.0.0/16 -j ACCEPT")
    assert node.ipmasq("apply", check=True).stdout.startswith("iptables-legacy:")


def test_kube_proxy_nftables_table_wins(node):
    hint_chain(node, "iptables-nft")
    node.sh("nft add table ip kube-proxy && nft add chain ip kube-proxy services")
    assert node.ipmasq("apply", check=True).stdout.startswith("nftables:")


def test_recorded_backend_stays(node):
    node.ipmasq("apply", "--backend", "iptables-legacy", check=True)
    assert node.ipmasq("apply", check=True).stdout.strip() == "iptables-legacy: unchanged"


def test_iptables_means_the_variant_in_use(node):
    hint_chain(node, "iptables-legacy")
    assert node.ipmasq("apply", "--backend", "iptables", check=True).stdout.startswith("iptables-legacy:")


def test_doctor_json(node):
    data = json.loads(node.ipmasq("doctor", "-o", "json", check=True).stdout)
    for name in ("iptables-legacy", "iptables-nft", "nftables"):
        assert data["backends"][name] == "available"
    assert set(data["backends"]) == set(backends.NAMES)
    assert data["auto"]["backend"] == "nftables"
    assert data["engines"] == []  # none of ours live yet
    assert "nftables" in data["tools"]["nft"]
    text = node.ipmasq("doctor", check=True).stdout
    assert "auto: nftables" in text and "engines of ours live: none" in text


# ---------------------------------------------------------------- hiding tools


def path_without(tmp_path: Path, hidden_prefixes: tuple[str, ...]) -> str:
    """A PATH holding links to every tool of /usr/sbin and /usr/bin but the hidden ones."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            if name.startswith(hidden_prefixes) or (bin_dir / name).exists():
                continue
            (bin_dir / name).symlink_to(os.path.join(directory, name))
    return str(bin_dir)


def ipmasq_host(*args: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ipmasq_legacy", *args], capture_output=True, text=True,
                          env={**os.environ, "IPMASQ_CONFIG": "", **env})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_selftest_passes_for_every_backend():
    # selftest builds its own namespaces; it never touches this machine's own
    proc = ipmasq_host("selftest", env={})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for backend in ("iptables-legacy", "iptables-nft", "nftables"):
        assert any(line.split()[:2] == [backend, "defaults:"] and line.endswith("pass")
                   for line in proc.stdout.splitlines()), proc.stdout
    assert "FAIL" not in proc.stdout


def test_selftest_fails_with_reason_when_iptables_is_hidden(tmp_path):
    env = {"PATH": path_without(tmp_path, ("iptables", "ip6tables"))}
    proc = ipmasq_host("selftest", "--backend", "iptables-legacy", env=env)
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "missing iptables-legacy" in proc.stdout


def test_selftest_fails_with_reason_when_nft_is_hidden(tmp_path):
    env = {"PATH": path_without(tmp_path, ("nft",)), "IPMASQ_NFT_CLI": "1"}
    proc = ipmasq_host("selftest", "--backend", "nftables", env=env)
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "nft" in proc.stdout.split("FAIL", 1)[1]
