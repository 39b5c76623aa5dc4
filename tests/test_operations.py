"""Unattended operation: reconcile repairs each kind of drift, locking under concurrency,
the watch agent, logs and metrics. All inside a test bed's node namespace."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .test_traffic import NETFILTER_BACKENDS
from .testbed import Node, TestBed

pytestmark = pytest.mark.traffic

AGENT = "nonMasqueradeCIDRs: [10.0.0.0/16, 172.18.0.0/16, 192.168.0.0/17]\nmasqLinkLocal: true\n"


def masqueraded(bed: TestBed, name: str = "public") -> bool:
    dest = bed.DESTINATIONS[name]
    seen = bed.source_seen(dest.address)
    assert seen in (bed.pod_addr[dest.family], bed.uplink_addr[dest.uplink][dest.family]), seen
    return seen != bed.pod_addr[dest.family]


# ---------------------------------------------------------------- reconcile: each drift kind

# the ipset our chain matches (of the two slots, ipmasq4-a and ipmasq4-b)
IPT_SET = "$({ipt} -t nat -S IPMASQ-LEGACY | grep -o 'match-set [^ ]*' | cut -d' ' -f2)"
DELETE_JUMP = '{ipt} -t nat -D POSTROUTING -m comment --comment "ipmasq-legacy: masquerade pod egress" -j IPMASQ-LEGACY'
IPTABLES_DRIFTS = {
    "chain deleted": DELETE_JUMP + " && {ipt} -t nat -F IPMASQ-LEGACY && {ipt} -t nat -X IPMASQ-LEGACY",
    "jump removed": DELETE_JUMP,
    "jump moved": DELETE_JUMP + " && {ipt} -t nat -I POSTROUTING 1 -m comment --comment old -j IPMASQ-LEGACY"
                  " && {ipt} -t nat -A POSTROUTING -j IPMASQ-LEGACY",
    "rule edited": "{ipt} -t nat -R IPMASQ-LEGACY 3 -o nothing0 -j MASQUERADE",
    "set member removed": "ipset del " + IPT_SET + " 198.20.0.0/16",
    "set member added": "ipset add " + IPT_SET + " 1.2.3.0/24",
    "idle set member added": "ipset add $(ipset list -n | grep -x 'ipmasq4-[ab]' | grep -vx " + IPT_SET + ") 1.2.3.0/24",
    "idle set destroyed": "ipset destroy $(ipset list -n | grep -x 'ipmasq4-[ab]' | grep -vx " + IPT_SET + ")",
    "ipv6 half gone": "ip6tables-{variant} -t nat -F IPMASQ-LEGACY",
    "stale set left by a crash": "ipset create ipmasq4-0123456789ab hash:net",
}
# our exempt set's name is a digest of its members: look it up
NFT_SET = "$(nft list table ip ipmasq_legacy | grep -o '@exempt_[0-9a-f]*' | head -1 | tr -d @)"  # the one the rules use
NFT_DRIFTS = {
    "table deleted": "nft delete table ip ipmasq_legacy",
    "rule deleted": "nft delete rule ip ipmasq_legacy postrouting handle "
                    "$(nft -a list chain ip ipmasq_legacy postrouting | grep masquerade | head -1 | awk '{{print $NF}}')",
    "set member removed": "nft delete element ip ipmasq_legacy " + NFT_SET + " '{{ 198.20.0.0/16 }}'",
    "set member added": "nft add element ip ipmasq_legacy " + NFT_SET + " '{{ 1.2.3.0/24 }}'",
    "stale set left by a crash": "nft add set ip ipmasq_legacy exempt_0123456789abcdef "
                                 "'{{ type ipv4_addr; flags interval; }}'",
    "ipv6 half gone": "nft delete table ip6 ipmasq_legacy",
}
DRIFT_CASES = [(b, kind, cmd) for b in NETFILTER_BACKENDS if b.startswith("iptables-")
               for kind, cmd in IPTABLES_DRIFTS.items()] + \
              [("nftables", kind, cmd) for kind, cmd in NFT_DRIFTS.items() if "nftables" in NETFILTER_BACKENDS]


@pytest.mark.parametrize("backend, kind, command", DRIFT_CASES, ids=[f"{b}-{k}" for b, k, _ in DRIFT_CASES])
def test_reconcile_repairs_drift(node, backend, kind, command):
    bed = node.bed
    cfg = {"ipv4-native-routing-cidr": ["198.20.0.0/16"], "egress-masquerade-interfaces": "eth+"}
    config_path = node.write_config(cfg, agent=AGENT)
    node.ipmasq("apply", "--config", config_path, "--backend", backend, check=True)
    quiet = node.ipmasq("reconcile", "--config", config_path, check=True)
    assert (quiet.stdout, quiet.stderr) == ("", ""), "reconcile must be silent when in sync"
    variant = backend.removeprefix("iptables-")
    node.sh(command.format(ipt=f"iptables-{variant}", variant=variant))
    drifted = node.ipmasq("status", "--config", config_path, "-o", "json", check=True).stdout
    assert not json.loads(drifted)["in_sync"], f"{kind} not seen as drift"
    repair = node.ipmasq("reconcile", "--config", config_path, check=True)
    lines = repair.stderr.strip().splitlines()
    assert lines and all("drift in" in ln for ln in lines), repair.stderr
    assert node.ipmasq("reconcile", "--config", config_path, check=True).stderr == ""
    assert json.loads(node.ipmasq("status", "--config", config_path, "-o", "json").stdout)["in_sync"]
    assert not masqueraded(bed, "public")  # 198.20.0.10 exempt again
    assert masqueraded(bed, "public_eth1") is False  # 198.20.1.10 is inside 198.20.0.0/16 too
    assert masqueraded(bed, "tke192_out")
    assert masqueraded(bed, "public6")


@pytest.mark.parametrize("backend", [b for b in NETFILTER_BACKENDS if b.startswith("iptables-")])
def test_set_edit_keeping_its_count_found_by_the_deep_check(node, backend):
    """One member of our ipset swapped for another keeps the set's header (count, size in
    memory), which the quick path trusts (backends/ipsets.py): status --deep sees it, and
    every agent.DEEP_EVERY-th reconcile reads the members and repairs it."""
    from ipmasq_legacy import agent

    bed = node.bed
    config_path = node.write_config({"ipv4-native-routing-cidr": ["198.20.0.0/16"],
                                     "egress-masquerade-interfaces": "eth+"}, agent=AGENT)
    node.ipmasq("apply", "--config", config_path, "--backend", backend, check=True)
    node.ipmasq("reconcile", "--config", config_path, check=True)  # verified: the quick path from here
    live_set = IPT_SET.format(ipt=f"iptables-{backend.removeprefix('iptables-')}")
    # a swap the header does not show: where the new member lands in the hash can change
    # the set's size in memory (once in ~20 runs), which the quick path would see
    header = node.sh(f"ipset list -t {live_set}")
    for second in range(21, 60):
        node.sh(f"s={live_set}; ipset del $s 198.20.0.0/16 && ipset add $s 198.{second}.0.0/16")
        if node.sh(f"ipset list -t {live_set}") == header:
            break
        node.sh(f"s={live_set}; ipset del $s 198.{second}.0.0/16 && ipset add $s 198.20.0.0/16")
    assert masqueraded(bed, "public")  # the edit is live: 198.20.0.10 is masqueraded now
    assert json.loads(node.ipmasq("status", "--config", config_path, "-o", "json", check=True).stdout)["in_sync"]
    deep = json.loads(node.ipmasq("status", "--deep", "--config", config_path, "-o", "json", check=True).stdout)
    assert not deep["in_sync"] and any("members differ" in d for d in deep["drift"]), deep["drift"]
    for _ in range(agent.DEEP_EVERY - 1):
        assert node.ipmasq("reconcile", "--config", config_path, check=True).stderr == ""
    repair = node.ipmasq("reconcile", "--config", config_path, check=True)
    assert "members differ" in repair.stderr, repair.stderr
    assert not masqueraded(bed, "public")


def test_reconcile_logs_json(node):
    config_path = node.write_config({})
    node.ipmasq("apply", "--config", config_path, "--backend", "nftables", check=True)
    node.sh("nft delete table ip ipmasq_legacy")
    proc = node.ipmasq("reconcile", "--config", config_path, "--log-format", "json", check=True)
    records = [json.loads(line) for line in proc.stderr.strip().splitlines()]
    assert records and records[0]["level"] == "warning" and "not installed" in records[0]["msg"]


# ---------------------------------------------------------------- locking


def test_twenty_concurrent_invocations_end_consistent(node):
    a = node.write_config({}, name="a.yaml")
    b = node.write_config({"egress-masquerade-interfaces": "eth+"}, agent="", name="b.yaml")
    commands = []
    for i in range(20):
        commands.append([("apply", "--config", a, "--backend", "iptables-nft"),
                         ("apply", "--config", b, "--backend", "nftables"),
                         ("reconcile", "--config", b, "--backend", "nftables"),
                         ("flush",)][i % 4])
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda args: node.ipmasq(*args, "--lock-timeout", "60"), commands))
    assert [r.returncode for r in results] == [0] * 20, [r.stderr for r in results if r.returncode]
    # whatever ran last, one more reconcile leaves one backend, in sync, nothing duplicated
    node.ipmasq("apply", "--config", b, "--backend", "nftables", check=True)
    status = json.loads(node.ipmasq("status", "--config", b, "-o", "json", check=True).stdout)
    assert status["backend"] == "nftables" and status["in_sync"]
    rules = node.rulesets()
    assert "IPMASQ-LEGACY" not in rules.split("## nft")[0]
    assert "ipmasq4-" not in rules.split("## ipset")[1]


def test_lock_timeout_exits_3(node):
    lock_holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,os,sys,time; p=sys.argv[1]; os.makedirs(os.path.dirname(p), exist_ok=True);"
         "f=open(p,'w'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)",
         os.path.join(node.env["IPMASQ_STATE_DIR"], "lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert lock_holder.stdout.readline().strip() == "held"
        proc = node.ipmasq("apply", "--lock-timeout", "0.3")
        assert proc.returncode == 3 and "could not lock" in proc.stderr
    finally:
        lock_holder.kill()
        lock_holder.wait()


# ---------------------------------------------------------------- watch


class Agent:
    """`ipmasq watch` running in the node namespace."""

    def __init__(self, node: Node, *args: str):
        self.node = node
        self.log = node.dir / "watch.log"
        env = {**os.environ, **node.env}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", node.bed.node, sys.executable, "-m", "ipmasq_legacy", "watch", *args],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=env)
        self.wait_for(lambda: "watching" in self.log.read_text(), "start")

    def wait_for(self, condition, what: str, timeout: float = 5.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if condition():
                return time.monotonic() - start
            assert self.proc.poll() is None, f"watch exited: {self.log.read_text()}"
            time.sleep(0.05)
        raise AssertionError(f"watch: no {what} within {timeout}s; log:\n{self.log.read_text()}")

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(10)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_watch_follows_configmap_swap_rename_save_bad_edit_and_sigterm(node):
    bed = node.bed
    # a ConfigMap volume: ip-masq-agent -> ..data/ip-masq-agent, ..data -> ..v1
    mount = node.dir / "configmap"
    (mount / "..v1").mkdir(parents=True)
    (mount / "..v1" / "ip-masq-agent").write_text("nonMasqueradeCIDRs: []\nmasqLinkLocal: true\n")
    (mount / "..data").symlink_to("..v1")
    (mount / "ip-masq-agent").symlink_to("..data/ip-masq-agent")
    config_path = Path(node.write_config({"enable-ip-masq-agent": True,
                                          "ip-masq-agent-config-path": str(mount / "ip-masq-agent")}))
    agent = Agent(node, "--config", str(config_path), "--backend", "nftables")
    try:
        assert masqueraded(bed, "tke10")
        # kubelet's update: a new timestamped dir, then an atomic rename of the ..data symlink
        (mount / "..v2").mkdir()
        (mount / "..v2" / "ip-masq-agent").write_text(AGENT)
        (mount / "..data_tmp").symlink_to("..v2")
        os.rename(mount / "..data_tmp", mount / "..data")
        # (how fast is measured, not asserted: the wait only bounds a hang)
        took = agent.wait_for(lambda: not masqueraded(bed, "tke10"), "ConfigMap swap applied", timeout=3)
        print(f"ConfigMap swap applied after {took:.2f} s")
        # an editor saving by rename
        tmp = config_path.with_suffix(".swp")
        tmp.write_text(config_path.read_text() + "egress-masquerade-interfaces: ens3\n")
        os.rename(tmp, config_path)
        agent.wait_for(lambda: not masqueraded(bed, "tke192_out"), "rename-save applied", timeout=3)
        # a bad edit: logged, the last good config stays live
        config_path.write_text(config_path.read_text() + "egress-masquerade-interfaces: [bad name]\n")
        agent.wait_for(lambda: "config rejected" in agent.log.read_text(), "bad edit logged", timeout=3)
        assert not masqueraded(bed, "tke192_out") and masqueraded(bed, "public_ens3")
        # SIGTERM: exits 0 and leaves the rules
        assert agent.stop() == 0
        assert masqueraded(bed, "public_ens3")
        assert "Traceback" not in agent.log.read_text()
    finally:
        agent.close()


def test_watch_sighup_reload_and_flush_on_exit(node):
    bed = node.bed
    config_path = Path(node.write_config({}))
    agent = Agent(node, "--config", str(config_path), "--backend", "iptables-nft", "--flush-on-exit")
    try:
        assert masqueraded(bed, "public")
        # a change the agent cannot see by inotify (the file's directory is not where it looks): HUP reloads
        config_path.write_text("ipv4-native-routing-cidr: 198.20.0.0/16\n")
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_for(lambda: not masqueraded(bed, "public"), "SIGHUP reload")
        assert agent.stop() == 0
        assert not masqueraded(bed, "public_eth1") and not masqueraded(bed, "public6")  # flushed: nothing NATed
    finally:
        agent.close()


def test_watch_serves_metrics_and_healthz(node):
    bed = node.bed
    config_path = node.write_config({"egress-masquerade-interfaces": "eth+"})
    agent = Agent(node, "--config", config_path, "--backend", "nftables", "--metrics-port", "9477",
                  "--metrics-address", "127.0.0.1")
    try:
        fetch = ("import sys,urllib.request as u\n"
                 "try:\n r=u.urlopen('http://127.0.0.1:9477'+sys.argv[1]); print(r.status); print(r.read().decode())\n"
                 "except Exception as e: print(getattr(e,'code',0)); print(e)")
        health = bed.node_exec([sys.executable, "-c", fetch, "/healthz"]).stdout
        assert health.startswith("200"), health
        before = _metric(bed.node_exec([sys.executable, "-c", fetch, "/metrics"]).stdout.split("\n", 1)[1],
                         "ipmasq_masqueraded_packets", interface="eth+", family="ipv4")
        for _ in range(5):
            bed.source_seen(bed.dest("public"))
        after = _metric(bed.node_exec([sys.executable, "-c", fetch, "/metrics"]).stdout.split("\n", 1)[1],
                        "ipmasq_masqueraded_packets", interface="eth+", family="ipv4")
        assert after >= before + 5
    finally:
        agent.stop()
        agent.close()


def _metric(text: str, family_name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (family_name, family_name + "_total") and all(
                    sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{family_name} {labels} not in metrics:\n{text}")


def test_metrics_file_parses_and_counters_move(node):
    bed = node.bed
    metrics_file = node.dir / "ipmasq.prom"
    config_path = node.write_config({}, agent="")
    node.ipmasq("apply", "--config", config_path, "--backend", "iptables-legacy", "--metrics-file",
                str(metrics_file), check=True)
    text = metrics_file.read_text()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"ipmasq_last_sync_success_timestamp_seconds", "ipmasq_drift_repairs", "ipmasq_apply_duration_seconds",
            "ipmasq_exempt_prefixes", "ipmasq_backend_info", "ipmasq_masqueraded_packets",
            "ipmasq_masqueraded_bytes"} <= names, names
    assert _metric(text, "ipmasq_exempt_prefixes", family="ipv4") == 12
    before = _metric(text, "ipmasq_masqueraded_packets", interface="any", family="ipv4")
    for _ in range(4):
        bed.source_seen(bed.dest("public"))
    node.ipmasq("reconcile", "--config", config_path, "--metrics-file", str(metrics_file), check=True)
    text = metrics_file.read_text()
    assert _metric(text, "ipmasq_masqueraded_packets", interface="any", family="ipv4") >= before + 4
    # a repair is counted by kind (and rewrites the chain: counters restart, as Prometheus allows)
    node.sh(DELETE_JUMP.format(ipt="iptables-legacy"))
    node.ipmasq("reconcile", "--config", config_path, "--metrics-file", str(metrics_file), check=True)
    text = metrics_file.read_text()
    assert _metric(text, "ipmasq_drift_repairs", kind="N jumps from POSTROUTING instead of N") == 1


# An nft that logs each call: its arguments, and the first line of what it reads with `-f -`
NFT_LOGGER = """#!/bin/sh
echo "$*" >> {calls}
if [ "$(eval echo \\${{$#}})" = "-" ]; then
    tmp=$(mktemp); cat > "$tmp"; head -1 "$tmp" >> {calls}
    /usr/sbin/nft "$@" < "$tmp"; rc=$?; rm -f "$tmp"; exit $rc
fi
exec /usr/sbin/nft "$@"
"""


def log_nft_calls(node):
    """Make the node's ipmasq drive the nft binary through NFT_LOGGER; the log file."""
    wrapper_dir = node.dir / "bin"
    wrapper_dir.mkdir()
    calls = node.dir / "nft-calls"
    wrapper = wrapper_dir / "nft"
    wrapper.write_text(NFT_LOGGER.format(calls=calls))
    wrapper.chmod(0o755)
    node.env.update({"IPMASQ_NFT_CLI": "1", "PATH": f"{wrapper_dir}:{os.environ['PATH']}"})
    return calls


def test_nftables_noop_reconcile_lists_nothing_until_the_generation_moves(node):
    """The fingerprint: an unchanged nf_tables generation answers 'in sync' without a listing."""
    calls = log_nft_calls(node)
    config_path = node.write_config({}, agent="")
    node.ipmasq("apply", "--config", config_path, "--backend", "nftables", check=True)
    node.ipmasq("reconcile", "--config", config_path, check=True)  # full read, records the generation
    calls.write_text("")
    assert node.ipmasq("reconcile", "--config", config_path, check=True).stderr == ""
    assert calls.read_text() == "", "a no-op reconcile listed the ruleset"
    node.sh("nft add element ip ipmasq_legacy " + NFT_SET + " '{ 1.2.3.0/24 }'")
    repair = node.ipmasq("reconcile", "--config", config_path, check=True)
    assert "exempt set members differ" in repair.stderr
    assert calls.read_text(), "the moved generation did not lead to a listing"


def test_nftables_apply_trusts_its_record_until_the_generation_moves(node):
    """apply knows what it wrote: with the generation unchanged it lists nothing (at
    100,000 prefixes a listing costs a second); any commit since makes it read again."""
    calls = log_nft_calls(node)
    first = node.write_config({"ipv4-native-routing-cidr": ["198.20.0.0/16"]}, name="first.yaml")
    second = node.write_config({"ipv4-native-routing-cidr": ["198.20.0.0/16", "203.0.113.0/24"]}, name="second.yaml")
    node.ipmasq("apply", "--config", first, "--backend", "nftables", check=True)
    calls.write_text("")
    assert node.ipmasq("apply", "--config", first, "--backend", "nftables", check=True).stdout.strip() \
        == "nftables: unchanged"
    assert node.ipmasq("apply", "--config", second, "--backend", "nftables", check=True).stdout.startswith(
        "nftables: ipv4 updated")
    assert not [c for c in calls.read_text().splitlines() if c.startswith("list")], calls.read_text()
    # someone else's commit (here: a table of theirs) moves the generation: read again
    node.sh("nft add table inet theirs")
    try:
        calls.write_text("")
        assert node.ipmasq("apply", "--config", second, "--backend", "nftables", check=True).stdout.strip() \
            == "nftables: unchanged"
        assert [c for c in calls.read_text().splitlines() if c.startswith("list")]
        node.sh("nft add element ip ipmasq_legacy " + NFT_SET + " '{ 1.2.3.0/24 }'")  # a hand edit
        repaired = node.ipmasq("apply", "--config", second, "--backend", "nftables", check=True).stdout
        assert "exempt set members differ" in repaired
        assert node.ipmasq("status", "--config", second, "-o", "json", check=True).stdout.count('"in_sync": true')
    finally:
        node.sh("nft delete table inet theirs")


@pytest.mark.parametrize("backend", NETFILTER_BACKENDS)
def test_noop_reconcile_trusts_unchanged_inputs_and_fingerprint(node, backend):
    config_path = Path(node.write_config({"ipv4-native-routing-cidr": ["198.20.0.0/16"]}, agent=AGENT))
    node.ipmasq("apply", "--config", str(config_path), "--backend", backend, check=True)
    quick = "unchanged since the last verified reconcile"
    first = node.ipmasq("reconcile", "--config", str(config_path), "--log-level", "debug", check=True)
    assert quick not in first.stderr  # the first one reads everything, then records
    second = node.ipmasq("reconcile", "--config", str(config_path), "--log-level", "debug", check=True)
    assert quick in second.stderr
    # the same bytes written again: still trusted; one byte more: read in full
    config_path.write_text(config_path.read_text())
    assert quick in node.ipmasq("reconcile", "--config", str(config_path), "--log-level", "debug").stderr
    config_path.write_text(config_path.read_text() + "\n")
    assert quick not in node.ipmasq("reconcile", "--config", str(config_path), "--log-level", "debug").stderr
    # an option given on the command line is part of what was verified
    other = node.ipmasq("reconcile", "--config", str(config_path), "--log-level", "debug",
                        "--egress-masquerade-interfaces", "eth0", check=True)
    assert quick not in other.stderr and "drift in" in other.stderr


# ---------------------------------------------------------------- flush restores the node


@pytest.mark.parametrize("foreign", [False, True], ids=["bare-node", "docker-like-rules-first"])
def test_flush_restores_the_rulesets_exactly_empty_tables_included(foreign):
    """apply with iptables-nft, switch to ebpf (its assist writes iptables-nft nat and
    mangle), to nftables, back to iptables-nft, then flush: every ruleset of the node is
    what it was before the first apply, byte for byte (counters aside), the nat and mangle
    tables iptables-nft created for us deleted; a table that existed before (Docker-like
    rules in `ip nat`) stays, with its rules. (iptables-legacy tables cannot be deleted:
    README "Known limits".)"""
    with TestBed() as bed:
        node = Node(bed)
        try:
            if foreign:
                from .nodeutil import add_foreign_rules

                add_foreign_rules(node, "iptables-nft")
            before = node.rulesets()
            tables_before = node.sh("nft list tables")
            sequence = ["iptables-nft", "nftables", "iptables-nft"]
            if backends_available("ebpf"):
                sequence.insert(1, "ebpf")
            for backend in sequence:
                node.apply({"egress-masquerade-interfaces": "eth+"}, backend)
                assert masqueraded(bed), backend
            assert node.sh("nft list tables") != tables_before
            node.ipmasq("flush", check=True)
            assert node.sh("nft list tables") == tables_before
            assert node.rulesets() == before
        finally:
            node.ipmasq("flush")
            node.close()


def backends_available(name: str) -> bool:
    from ipmasq_legacy import backends

    return backends.get(name).unavailable_reason() is None
