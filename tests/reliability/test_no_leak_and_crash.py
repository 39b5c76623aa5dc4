"""No leak while the rules change under traffic; atomic or nothing when the apply is killed."""

from __future__ import annotations

import difflib
import itertools
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from .. import testbed
from ..test_traffic import NETFILTER_BACKENDS
from ..testbed import Node
from .common import publish, scale

pytestmark = pytest.mark.traffic

TKE = "nonMasqueradeCIDRs: [10.0.0.0/16, 172.18.0.0/16, 192.168.0.0/17]\nmasqLinkLocal: true\n"
# Every config keeps: public and public6 masqueraded, tke10 and private6 exempt.
CONFIGS = [
    ({"ipv4-native-routing-cidr": "10.0.0.0/16", "ipv6-native-routing-cidr": "fd10::/16"}, None),
    ({"egress-masquerade-interfaces": "eth+", "ipv6-native-routing-cidr": "fd10::/16"}, TKE),
    ({"ipv4-native-routing-cidr": ["10.0.0.0/16", "11.0.0.0/8"], "ipv6-native-routing-cidr": "fd10::/16",
      "iptables-random-fully": True, "masquerade-to-ports": "20000-40000"}, None),
]
MASQUERADED = ("public", "public6")
EXEMPT = ("tke10", "private6")


class Stream:
    """New UDP flows from the pod, round robin over the four destinations, until stopped."""

    def __init__(self, bed):
        self.bed = bed
        self.results: list[tuple[str, str | None]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        for name in itertools.cycle(MASQUERADED + EXEMPT):
            if self.stop.is_set():
                return
            try:
                seen = self.bed.source_seen(self.bed.dest(name), proto="udp", timeout=1.0)
            except testbed.ReplyLostError as exc:
                seen = f"reply lost (outside saw {exc.seen})"
            self.results.append((name, seen))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


IPTABLES_BACKENDS = [b for b in NETFILTER_BACKENDS if b.startswith("iptables-")]


@pytest.mark.parametrize("backends_used", [
    pytest.param(IPTABLES_BACKENDS, id="iptables-backends"),
    pytest.param(NETFILTER_BACKENDS, id="all-netfilter-backends"),
])
def test_no_leak_through_300_applies_and_switches(node, backends_used):
    bed = node.bed
    applies = scale(ci=45, full=300)
    paths = [node.write_config(cfg, agent, name=f"c{i}.yaml") for i, (cfg, agent) in enumerate(CONFIGS)]
    backends_cycle = itertools.cycle(backends_used)
    node.ipmasq("apply", "--config", paths[0], "--backend", backends_used[0], check=True)
    switches = 0
    with Stream(bed) as stream:
        backend = backends_used[0]
        for i in range(applies):
            if i % 5 == 4:  # every fifth apply switches backend
                backend, switches = next(backends_cycle), switches + 1
            node.ipmasq("apply", "--config", paths[i % len(paths)], "--backend", backend, check=True)
    leaks = [(n, s) for n, s in stream.results if n in MASQUERADED and s == bed.pod_addr[bed.DESTINATIONS[n].family]]
    wrong = [(n, s) for n, s in stream.results if n in EXEMPT and s != bed.pod_addr[bed.DESTINATIONS[n].family]]
    lost = [(n, s) for n, s in stream.results if s is None or s.startswith("reply lost")]
    publish(f"no_leak_{'+'.join(backends_used)}", {"applies": applies, "backend_switches": switches, "flows": len(stream.results),
                        "leaks": len(leaks), "exempt_flows_masqueraded": len(wrong), "lost": len(lost)})
    assert len(stream.results) > applies, "the stream did not keep up"
    assert not leaks, f"{len(leaks)} flows left with the pod's address: {leaks[:5]}"
    assert not wrong, f"{len(wrong)} exempt flows were masqueraded: {wrong[:5]}"
    # A lost probe is published, not failed: the contract is about addresses, and on a
    # loaded 2-core machine a reply can miss the one-second wait.
    assert len(lost) <= len(stream.results) // 100, f"{len(lost)} flows lost: {lost[:5]}"


# ---------------------------------------------------------------- crash


def snapshot(node: Node) -> str:
    """The rulesets, with our ipsets and nft sets that nothing references left out (a kill
    may leave one: a new exempt set is loaded before the rules that use it; it is
    harmless, and the next apply or reconcile deletes it)."""
    text = node.rulesets()
    head, _, sets = text.partition("## ipset\n")
    referenced = set(re.findall(r"--match-set (\S+) ", head))
    kept = [ln for ln in sets.splitlines()
            if not (m := re.match(r"(?:create|add) (ipmasq[46]-\S+)", ln)) or m.group(1) in referenced]
    before_nft, _, nft = head.partition("## nft\n")
    text = before_nft + "## nft\n" + _unused_nft_sets_dropped(nft) + "## ipset\n" + "\n".join(kept)
    # the ipset slot the chain matches (ipmasq4-a or -b, by history) named as the nft one is
    return re.sub(r"\b(ipmasq[46])-[ab]\b", r"\1-live", text)


def _ipset_slots_agree(text: str) -> bool:
    """After a converged apply or reconcile both ipset slots of a family hold the same
    members, and no other set of ours is left."""
    members: dict[str, set[str]] = {}
    for line in text.partition("## ipset\n")[2].splitlines():
        if m := re.match(r"(create|add) (ipmasq[46]-\S+)(?: (\S+))?", line):
            members.setdefault(m.group(2), set()).update([m.group(3)] if m.group(1) == "add" else [])
    if any(not re.fullmatch(r"ipmasq[46]-[ab]", name) for name in members):
        return False
    return all(members.get(f"ipmasq{f}-a") == members.get(f"ipmasq{f}-b") for f in (4, 6))


_NFT_SET = r"exempt_(?:[0-9a-f]{16}|[ab])"  # an earlier version's content-named sets; the two slots


def _unused_nft_sets_dropped(nft_text: str) -> str:
    """Our nft tables with the sets no rule uses left out (the idle slot, or a set a kill
    left), and the slot the rules use named `exempt_live`: which of the two slots holds a
    config depends on the history, what it holds does not."""
    out = []
    for block in re.split(r"(?m)^(?=table )", nft_text):
        if block.startswith(("table ip ipmasq_legacy {", "table ip6 ipmasq_legacy {")):
            used = set(re.findall(rf"@({_NFT_SET})\b", block))
            block = re.sub(rf"(?ms)^\tset ({_NFT_SET}) \{{\n.*?^\t\}}\n\n?",
                           lambda m, used=used: m.group(0) if m.group(1) in used else "", block)
            block = re.sub(r"\bexempt_[ab]\b", "exempt_live", block)
            if re.fullmatch(r"table \S+ ipmasq_legacy \{\n\}\n*", block):
                continue  # a table that held only such a set
        out.append(block)
    return "".join(out)


def _slots_agree(nft_text: str) -> bool:
    """After a converged apply or reconcile the idle slot holds what the live one holds."""
    for block in re.split(r"(?m)^(?=table )", nft_text):
        sets = dict(re.findall(r"(?ms)^\tset (exempt_[ab]) \{\n(.*?)^\t\}", block))
        if len(set(sets.values())) > 1:
            return False
    return True


def family_view(snapshot_text: str, family: int) -> str:
    """The part of a snapshot that one family's transaction changes (the spec's unit of atomicity)."""
    other = {4: ("## ip6tables", "table ip6 ", "ipmasq6-"), 6: ("## iptables", "table ip ", "ipmasq4-")}[family]
    other_section, other_table, other_set = other
    out, in_section, in_table = [], True, True
    for line in snapshot_text.splitlines():
        if line.startswith("## "):
            in_section = not line.startswith(other_section)
        elif line.startswith("table "):
            in_table = not line.startswith(other_table)
        if in_section and in_table and other_set not in line:
            out.append(line)
        if line == "}":  # the end of an nft table block
            in_table = True
    return "\n".join(out)


def wait_node_idle(node: Node, timeout: float = 10.0) -> None:
    """A killed apply's children (iptables-restore, nft) finish their transaction; wait for them."""
    deadline = time.monotonic() + timeout
    while testbed._netns_pids(node.bed.node) and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("backend", NETFILTER_BACKENDS)
def test_sigkill_leaves_old_or_new_and_reconcile_converges(node, backend):
    kills = scale(ci=8, full=100)
    cfg_a = node.write_config({"ipv4-native-routing-cidr": [f"11.{i}.0.0/16" for i in range(200)]}, name="a.yaml")
    cfg_b = node.write_config({"egress-masquerade-interfaces": "eth+"}, agent=TKE, name="b.yaml")
    states = {}
    for path in (cfg_a, cfg_b):
        node.ipmasq("apply", "--config", path, "--backend", backend, check=True)
        states[path] = snapshot(node)
    # kills spread over a whole apply as long as this machine takes for one now (a
    # fixed 0.35 s, on a loaded machine, killed 297 of 300 before anything changed)
    took = []
    for path in (cfg_a, cfg_b):
        t0 = time.monotonic()
        node.ipmasq("apply", "--config", path, "--backend", backend, check=True)
        took.append(time.monotonic() - t0)
    window = 1.2 * max(took)
    rng = random.Random(1234)
    outcomes = {"old": 0, "new": 0}
    env = {**os.environ, **node.env}
    current = cfg_b
    for i in range(kills):
        target = cfg_a if current == cfg_b else cfg_b
        proc = subprocess.Popen(["ip", "netns", "exec", node.bed.node, sys.executable, "-m", "ipmasq_legacy",
                                 "apply", "--config", target, "--backend", backend],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(0.0, window))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_node_idle(node)
        live = snapshot(node)
        for family in (4, 6):  # each family is one transaction: old or new, never a mix
            old, new, now = (family_view(x, family) for x in (states[current], states[target], live))
            assert now in (old, new), f"kill {i}: IPv{family} is neither old nor new:\n" + "\n".join(
                difflib.unified_diff(new.splitlines(), now.splitlines(), "new", "live", lineterm="", n=1))
            outcomes["new" if now == new else "old"] += 1
        node.ipmasq("reconcile", "--config", target, "--backend", backend, check=True)
        converged = node.rulesets()
        if backend == "nftables":  # two slots per family, whichever is live
            assert snapshot(node) == states[target] and _slots_agree(converged), f"kill {i}: reconcile did not converge"
            assert len(re.findall(r"(?m)^\tset ", converged)) == 2 * converged.count("daddr @exempt_"), \
                f"kill {i}: a set left behind after reconcile"
        else:  # two ipset slots per family, whichever is live
            assert snapshot(node) == states[target] and _ipset_slots_agree(converged), \
                f"kill {i}: reconcile did not converge"
        current = target
    publish(f"crash_{backend}", {"kills": kills, "window_s": round(window, 3), **outcomes})
    if kills >= 50:  # full scale: both sides of the commit were hit (8 kills may miss one)
        assert min(outcomes.values()) >= kills // 20, outcomes
