"""Bad input never gets through and never changes anything; other tools' rules stay byte-identical."""

from __future__ import annotations

import itertools
import json
import textwrap

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipmasq_legacy import backends, config, plan
from ipmasq_legacy.errors import ConfigError

from ..nodeutil import add_foreign_rules
from ..test_traffic import NETFILTER_BACKENDS
from .common import publish, scale

KEYS = list(config.KEYS) + sorted(config.ALIASES)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=40))
plausible = st.sampled_from(["eth+", "eth0", "ens3", "", "+", "a" * 16, "eth 0", "eth\n0", "10.0.0.0/8",
                             "10.0.0.1/8", "fd00::/8", "fe80::1/10", "0.0.0.0/0", "::/0", "true", "no",
                             "1024-65535", "65535-1", "auto", "nftables", "ebpf", "60s", "-1"])
values = st.recursive(st.one_of(scalars, plausible),
                      lambda inner: st.one_of(st.lists(inner, max_size=6),
                                              st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=12)
documents = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=20)), values, max_size=8)


def check_document(text: str, tmp_path) -> str:
    """'ok' or 'rejected'; any other exception fails the test."""
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        cfg = config.load(str(path))
        # what only the whole decision shows (the verdict table: a prefix both exempt and
        # forced, 0.0.0.0/0 as masquerade-only) is refused by the plan, before any change
        the_plan = plan.build(cfg)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return "rejected"
    for name in backends.NAMES:
        backends.get(name).render(the_plan)
    return "ok"


FUZZ_CASES = scale(ci=300, full=3000)
fuzz_counts = {"ok": 0, "rejected": 0}


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(doc=documents, huge=st.integers(0, 3))
def test_fuzz_documents_load_or_reject(tmp_path_factory, doc, huge):
    if huge == 3:  # a huge list in one key
        doc = {**doc, "ipv4-native-routing-cidr": [f"10.{i // 256}.{i % 256}.0/24" for i in range(20000)]}
    result = check_document(yaml.safe_dump(doc, allow_unicode=True), tmp_path_factory.mktemp("f"))
    fuzz_counts[result] += 1


@settings(max_examples=scale(ci=100, full=1000), deadline=None, suppress_health_check=list(HealthCheck),
          database=None)
@given(key=st.sampled_from(KEYS), value=plausible, depth=st.integers(1, 9))
def test_fuzz_yaml_anchors_and_aliases(tmp_path_factory, key, value, depth):
    # a "billion laughs" style document: each level nine aliases of the one before
    lines = [f"x0: &a0 [{json.dumps(value)}]"]
    for i in range(1, depth + 1):
        lines.append(f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append(f"{key}: *a{depth}")
    body = "\n".join(lines[-1:]) if depth == 0 else "anchors:\n" + "\n".join("  " + ln for ln in lines[:-1])
    text = body + "\n" + lines[-1] + "\n"
    result = check_document(text, tmp_path_factory.mktemp("a"))
    assert result == "rejected"  # 'anchors' is not a key
    result = check_document(f"{key}: &v {json.dumps(value)}\n", tmp_path_factory.mktemp("b"))
    fuzz_counts[result] += 1


def test_fuzz_figures_published():
    publish("fuzz", {"documents": sum(fuzz_counts.values()), **fuzz_counts})
    assert sum(fuzz_counts.values()) > 0


# ---------------------------------------------------------------- the real CLI, in a namespace

HOSTILE = [
    {"egress-masquerade-interfaces": ["eth0\n-A POSTROUTING -j ACCEPT"]},
    {"egress-masquerade-interfaces": ['eth0" -j ACCEPT #']},
    {"egress-masquerade-interfaces": ["eth0; nft flush ruleset"]},
    {"egress-masquerade-interfaces": ["eth0 }"]},
    {"egress-masquerade-interfaces": ["eth*"]},
    {"egress-masquerade-interfaces": ["!eth0"]},
    {"egress-masquerade-interfaces": ["eth0\x00"]},
    {"egress-masquerade-interfaces": ["$(reboot)"]},
    {"egress-masquerade-interfaces": "eth0,COMMIT\n*filter"},
    {"ipv4-native-routing-cidr": ["10.0.0.0/8\n-A POSTROUTING -j ACCEPT"]},
    {"ipv4-native-routing-cidr": ["10.0.0.0/8 } ; flush ruleset"]},
    {"ipv4-native-routing-cidr": ["10.0.0.0/8, 0.0.0.0/0 }"]},
    {"ipv6-native-routing-cidr": ["fd00::/8\nCOMMIT"]},
    {"ipv4-pod-cidr": ["10.0.0.0/8 -j ACCEPT"]},
    {"masquerade-to-ports": "1024-2048 --random"},
    {"masquerade-to-ports": "1024-2048\nCOMMIT"},
    {"datapath": "nftables; rm -rf /"},
    {"ip-masq-agent-config-path": "/dev/null\x00"},
]


@pytest.mark.traffic
@pytest.mark.parametrize("backend", NETFILTER_BACKENDS)
def test_hostile_input_rejected_and_nothing_changes(node, backend):
    good = node.write_config({}, agent="")
    node.ipmasq("apply", "--config", good, "--backend", backend, check=True)
    before = node.rulesets()
    for i, doc in enumerate(HOSTILE):
        path = node.dir / f"hostile{i}.json"
        path.write_text(json.dumps(doc))  # JSON can carry any byte YAML could not
        proc = node.ipmasq("apply", "--config", str(path), "--backend", backend)
        assert proc.returncode == 2, f"{doc}: exit {proc.returncode}: {proc.stderr}"
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        key, value = next(iter(doc.items()))
        value = value[0] if isinstance(value, list) else value
        if "\x00" in value:
            continue  # no command line can carry a NUL byte
        backend_option = () if key == "datapath" else ("--backend", backend)
        option = node.ipmasq("apply", "--config", good, f"--{key}", value, *backend_option)
        assert option.returncode == 2, f"--{key}: {option.stderr}"
    assert node.rulesets() == before


@pytest.mark.traffic
def test_fuzzed_documents_through_the_cli_exit_0_or_2(node):
    """A sample of fuzzed documents through the real CLI in the node: exit 0 or 2, and 2 changes nothing."""
    cases = scale(ci=15, full=150)
    seen = {0: 0, 2: 0}
    rng_docs = [
        {"egress-masquerade-interfaces": "eth+", "ipv4-native-routing-cidr": "10.0.0.1/8"},
        {"egress-masquerade-interfaces": ["eth0", 7]},
        {"datapath": "nftables", "enable-ipv6-masquerade": "perhaps"},
        {"ipv4-pod-cidr": "10.244.0.0/16", "ipv6-pod-cidr": "fd00:244::/48", "datapath": "nftables"},
        {"bpf-masquerade": "yes", "datapath": "nftables"},
        {"masquerade-to-ports": "1024-65535", "iptables-random-fully": True, "datapath": "iptables-nft"},
        {"nonMasqueradeCIDRs": ["10.0.0.0/8"]},
        {"enable-ip-masq-agent": True, "ip-masq-agent-config-path": "/nonexistent/dir/file", "datapath": "nftables"},
    ]
    for i, doc in zip(range(cases), itertools.cycle(rng_docs)):
        before = node.rulesets()
        path = node.dir / f"doc{i}.json"
        path.write_text(json.dumps(doc))
        proc = node.ipmasq("apply", "--config", str(path))
        assert proc.returncode in (0, 2), f"{doc}: exit {proc.returncode}: {proc.stderr}"
        seen[proc.returncode] += 1
        if proc.returncode == 2:
            assert node.rulesets() == before, f"{doc}: exit 2 changed the ruleset"
    assert seen[0] and seen[2]
    publish("cli_fuzz", {"runs": cases, "exit_0": seen[0], "exit_2": seen[2]})


@pytest.mark.traffic
def test_coexistence_through_apply_reconcile_switch_and_flush(node):
    """docker-like and kube-proxy-like rules in both iptables variants and a foreign nft table
    stay byte-identical through everything, on every backend; flush restores the start exactly."""
    add_foreign_rules(node, "iptables-legacy", nft_table=False)
    add_foreign_rules(node, "iptables-nft")
    # foreign ipsets: kube-proxy-like, one a rule uses, and look-alikes of our names
    # (ours are ipmasqN-a, ipmasqN-b and ipmasqN-<12 hex digits>: backends/ipsets.py)
    node.sh("ipset restore", input=textwrap.dedent("""\
        create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536
        add KUBE-CLUSTER-IP 10.96.0.1,tcp:443
        create ipmasq4-foo hash:net family inet hashsize 1024 maxelem 65536
        add ipmasq4-foo 10.0.0.0/8
        create ipmasq4-c hash:net family inet hashsize 1024 maxelem 65536
        create ipmasq6-0123456789abc hash:net family inet6 hashsize 1024 maxelem 65536
        """))
    node.sh("iptables-nft -t nat -A DOCKER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN")
    start = node.rulesets()
    foreign = [ln for ln in start.splitlines() if ln.strip() and not ln.startswith(("## ", "*", ":", "COMMIT"))]
    steps = 0
    for backend in NETFILTER_BACKENDS + NETFILTER_BACKENDS[:1]:  # every switch, and back to the first
        node.apply({"egress-masquerade-interfaces": "eth+"}, backend, agent="")
        node.ipmasq("reconcile", check=True)
        now = node.rulesets()
        missing = [ln for ln in foreign if ln not in now]
        assert not missing, f"after {backend}: foreign lines changed: {missing[:5]}"
        steps += 1
    node.ipmasq("flush", check=True)
    assert node.rulesets() == start
    publish("coexistence", {"backends": NETFILTER_BACKENDS, "steps": steps, "foreign_lines": len(foreign)})
