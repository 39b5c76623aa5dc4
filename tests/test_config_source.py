"""Reconcile repairs, it never changes the intent: apply records where its config
came from; reconcile, status, list and watch without --config follow that record; a
missing default config is never read as "all defaults" where something else was applied.

The first part needs no root (the kernel's answer is faked); the second applies, then runs
a plain `ipmasq reconcile`, `status` and `watch` in a test bed's node namespace, with packets."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from ipmasq_legacy import cli, config, source, state
from ipmasq_legacy.backends import engines
from ipmasq_legacy.errors import ConfigError

from .nodeutil import WatchAgent
from .test_compat import CILIUM_CONFIG, SEED_003_VALUES, kubelet_configmap
from .test_traffic import NETFILTER_BACKENDS


@pytest.fixture
def node_state(tmp_path, monkeypatch):
    """A state dir of its own, no $IPMASQ_CONFIG, a default path that is missing, nothing live."""
    monkeypatch.setenv("IPMASQ_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("IPMASQ_CONFIG", raising=False)
    monkeypatch.setitem(config.DEFAULTS, "config_path", str(tmp_path / "etc" / "config.yaml"))
    live: list[str] = []
    monkeypatch.setattr(engines, "live_engines", lambda: list(live))
    return {"dir": tmp_path, "live": live, "default": tmp_path / "etc" / "config.yaml"}


def applied(tmp_path: Path, text: str, options: dict | None = None, name: str = "c.yaml") -> source.Source:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    src = source.for_apply(str(path), options or {})
    source.record(src, src.load())
    return src


def test_without_config_follow_uses_what_apply_installed(node_state):
    applied(node_state["dir"], "egress-masquerade-interfaces: eth+\n", {"datapath": "nftables"})
    src = source.for_follow(None, {})
    assert src.path == str(node_state["dir"] / "c.yaml") and src.note is None
    cfg = src.load()
    assert cfg.egress_masquerade_interfaces == ("eth+",) and cfg.datapath == "nftables"
    record = state.read_source()
    assert record["existed"] and record["shape"] == "ipmasq-legacy" and record["options"] == {"datapath": "nftables"}


def test_a_different_config_is_used_and_said_in_one_line(node_state):
    applied(node_state["dir"], "egress-masquerade-interfaces: eth+\n")
    other = node_state["dir"] / "other.yaml"
    other.write_text("{}\n")
    src = source.for_follow(str(other), {})
    assert src.path == str(other)
    assert src.note == f"config {other} differs from what apply installed ({node_state['dir'] / 'c.yaml'}); " \
                       f"using {other}"
    # the same file, with the recorded options laid under the ones given: no note
    applied(node_state["dir"], "{}\n", {"datapath": "nftables"})
    same = source.for_follow(str(node_state["dir"] / "c.yaml"), {})
    assert same.options == {"datapath": "nftables"} and same.note is None
    changed = source.for_follow(None, {"datapath": "iptables-nft"})
    assert "--datapath iptables-nft differs from what apply installed" in changed.note


def test_a_missing_default_is_not_all_defaults_after_apply_from_another_file(node_state):
    applied(node_state["dir"], "egress-masquerade-interfaces: eth+\n")
    # reconcile without --config follows the record; apply without --config refuses the defaults
    assert source.for_follow(None, {}).load().egress_masquerade_interfaces == ("eth+",)
    with pytest.raises(source.SourceUnknown, match="no such file, and the last apply installed .*c.yaml"):
        source.for_apply(None, {})


def test_the_recorded_file_gone_is_an_error(node_state):
    src = applied(node_state["dir"], "{}\n")
    os.unlink(src.path)
    with pytest.raises(ConfigError, match="which the last apply installed .* is gone: give --config"):
        source.for_follow(None, {})


def test_no_record_missing_default_nothing_live_is_all_defaults(node_state):
    src = source.for_follow(None, {})
    assert src.missing_ok and src.load().source == "<defaults>"
    # applied that way, it stays that way: the defaults were the intent
    source.record(src, src.load())
    assert not state.read_source()["existed"]
    assert source.for_apply(None, {}).missing_ok and source.for_follow(None, {}).missing_ok


def test_no_record_missing_default_but_rules_live_is_an_error(node_state):
    node_state["live"].append("nftables")
    with pytest.raises(source.SourceUnknown, match="no apply is recorded .* nftables of ours is installed"):
        source.for_follow(None, {})
    with pytest.raises(source.SourceUnknown):
        source.for_apply(None, {})


def test_explicit_config_is_recorded_absolute(node_state, monkeypatch):
    (node_state["dir"] / "rel.yaml").write_text("{}\n")
    monkeypatch.chdir(node_state["dir"])
    src = source.for_apply("rel.yaml", {})
    source.record(src, src.load())
    monkeypatch.chdir("/")  # cron runs elsewhere
    assert source.for_follow(None, {}).path == str(node_state["dir"] / "rel.yaml")


def test_status_without_source_shows_the_live_state(node_state, monkeypatch, fake_kernel):
    """No record, the default missing, an engine live: status says why it cannot compare (exit 0);
    reconcile refuses with one line (exit 2) rather than install the defaults."""
    from ipmasq_legacy import backends

    node_state["live"].append("nftables")

    class Live:
        installed, families = True, {}

    class Fake:
        name = "nftables"

        def live(self):
            return Live()

        def drift(self, plan, live=None):
            return []

    monkeypatch.setattr(backends, "get", lambda name: Fake())
    runner = CliRunner()
    out = runner.invoke(cli.cli, ["status", "-o", "json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert not data["in_sync"] and data["config"] is None
    assert data["drift"][0].startswith("config source unknown: config file")
    proc = runner.invoke(cli.cli, ["reconcile"])
    assert proc.exit_code != 0 and isinstance(proc.exception, source.SourceUnknown)


def test_warnings_are_logged_once_and_kept_for_status_and_the_metric(node_state, caplog):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from ipmasq_legacy import agent, metrics

    masq = node_state["dir"] / "ip-masq-agent"
    masq.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\nenable-ipv6: true\n")
    cfg = applied(node_state["dir"], f"enable-ip-masq-agent: true\nip-masq-agent-config-path: {masq}\n").load()
    with caplog.at_level("WARNING", logger="ipmasq"):
        agent.note_warnings(cfg, only_new=False)  # apply: every warning
        agent.note_warnings(cfg, only_new=True)  # a reconcile after it: nothing new, nothing said
    assert [r.getMessage() for r in caplog.records] == [cfg.warnings[0].text]
    assert "unknown key 'enable-ipv6' ignored" in cfg.warnings[0].text
    text = generate_latest(metrics.registry_with(metrics.Collector())).decode()
    samples = {s.labels["kind"]: s.value for f in text_string_to_metric_families(text)
               if f.name == "ipmasq_config_warnings" for s in f.samples}
    assert samples == {"unknown-key": 1, "ignored-keys": 0, "agent-difference": 0, "cilium-difference": 0,
                       "no-effect": 0}


# ---------------------------------------------------------------- with packets

AGENT = "nonMasqueradeCIDRs: [10.0.0.0/16, 172.18.0.0/16, 192.168.0.0/17]\nmasqLinkLocal: true\n"


def masqueraded(bed, name: str) -> bool:
    dest = bed.DESTINATIONS[name]
    seen = bed.source_seen(dest.address)
    assert seen in (bed.pod_addr[dest.family], bed.uplink_addr[dest.uplink][dest.family]), seen
    return seen != bed.pod_addr[dest.family]


def default_config_present() -> bool:
    return os.path.exists(config.DEFAULTS["config_path"])


@pytest.mark.traffic
@pytest.mark.skipif(default_config_present(), reason="this machine has a default config file")
@pytest.mark.parametrize("backend", NETFILTER_BACKENDS)
def test_apply_then_plain_reconcile_keeps_what_was_applied(node, backend):
    """The issue's report: apply --config c.yaml (exemptions + eth+), then a plain reconcile
    (cron's), then plain status: nothing changes, the packets say so."""
    bed = node.bed
    path = node.write_config({"egress-masquerade-interfaces": "eth+"}, agent=AGENT)
    node.ipmasq("apply", "--config", path, "--backend", backend, check=True)
    before = node.rulesets()
    for _ in range(2):  # the full read, then the quick path
        quiet = node.ipmasq("reconcile", check=True)
        assert (quiet.stdout, quiet.stderr) == ("", ""), "a plain reconcile changed or said something"
    assert node.rulesets() == before
    status = json.loads(node.ipmasq("status", "-o", "json", check=True).stdout)
    assert status["in_sync"] and status["backend"] == backend and status["config"]["path"] == path
    assert status["config"]["options"] == {"datapath": backend}
    assert not masqueraded(bed, "tke10")  # 10.0.0.0/16 exempt
    assert masqueraded(bed, "metadata")  # masqLinkLocal: true
    assert not masqueraded(bed, "public_ens3")  # ens3 is not eth+
    assert masqueraded(bed, "public")
    # drift is repaired toward the applied config, not the defaults
    node.ipmasq("flush", check=True)
    repaired = node.ipmasq("reconcile", check=True)
    assert "drift in" in repaired.stderr
    assert not masqueraded(bed, "public_ens3") and not masqueraded(bed, "tke10")
    # a different explicit config: used, and said in one line
    other = node.write_config({}, name="other.yaml")
    said = node.ipmasq("reconcile", "--config", other, check=True).stderr.strip().splitlines()
    assert said[0].endswith(f"differs from what apply installed ({path} --datapath {backend}); using {other}")
    text = node.ipmasq("status", "--config", other, check=True).stdout
    assert "differs from what apply installed" in text
    assert masqueraded(bed, "public_ens3")  # the other config masquerades on every interface


@pytest.mark.traffic
@pytest.mark.skipif(default_config_present(), reason="this machine has a default config file")
def test_state_wiped_and_default_missing_reconcile_refuses(node):
    bed = node.bed
    path = node.write_config({"egress-masquerade-interfaces": "eth+"})
    node.ipmasq("apply", "--config", path, "--backend", "nftables", check=True)
    os.unlink(Path(node.env["IPMASQ_STATE_DIR"]) / "source.json")
    os.unlink(Path(node.env["IPMASQ_STATE_DIR"]) / "state.json")
    before = node.rulesets()
    proc = node.ipmasq("reconcile")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "no apply is recorded" in proc.stderr and "give --config" in proc.stderr
    assert node.rulesets() == before and not masqueraded(bed, "public_ens3")


@pytest.mark.traffic
def test_seed_003_values_applied_with_packets(node):
    """Seed 003's values.yaml as it is, in a netfilter datapath (the option beats bpf.masquerade)."""
    bed = node.bed
    values = node.dir / "values.yaml"
    values.write_text(SEED_003_VALUES)
    proc = node.ipmasq("apply", "--config", str(values), "--backend", "nftables", check=True)
    assert "Cilium's ip-masq-agent exempts none of them" in proc.stderr  # the one difference, said
    assert masqueraded(bed, "metadata")  # masqLinkLocal: true
    assert not masqueraded(bed, "tke10") and not masqueraded(bed, "cgnat")  # the eleven ranges
    assert masqueraded(bed, "public")
    assert not masqueraded(bed, "public6")  # the chart runs no IPv6 unless ipv6.enabled
    assert node.ipmasq("reconcile", check=True).stderr == ""  # warned once, at apply


@pytest.mark.traffic
def test_watch_follows_a_cilium_config_directory_swap(node):
    """`watch --config DIR` on cilium-config mounted as a directory; the kubelet's `..data`
    swap is applied; a plain reconcile afterwards follows the directory."""
    bed = node.bed
    mount = node.dir / "cilium-config"
    data = {**CILIUM_CONFIG, "enable-bpf-masquerade": "false", "enable-ip-masq-agent": "false",
            "ipv4-native-routing-cidr": "198.20.0.0/16"}
    kubelet_configmap(mount, data, 1)
    agent = WatchAgent(node, "--config", str(mount), "--backend", "nftables")
    try:
        assert not masqueraded(bed, "public") and masqueraded(bed, "tke10")
        kubelet_configmap(mount, {**data, "ipv4-native-routing-cidr": "10.0.0.0/8"}, 2)
        took = agent.wait_for(lambda: masqueraded(bed, "public") and not masqueraded(bed, "tke10"),
                              "..data swap applied", timeout=5)
        print(f"cilium-config ..data swap applied after {took:.2f} s")
        assert "Traceback" not in agent.log.read_text()
    finally:
        agent.close()
    assert node.ipmasq("reconcile", check=True).stderr == ""
    status = json.loads(node.ipmasq("status", "-o", "json", check=True).stdout)
    assert status["in_sync"] and status["config"]["path"] == str(mount)
    assert status["config"]["shape"] == "cilium-config"
