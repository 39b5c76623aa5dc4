"""One NAT engine per node: engines of ours are recognised from the kernel, not only from
state.json, and a second one is drift that reconcile and apply remove.

First the decision, without root (the detector injected, the backends faked); then with
packets in private namespaces: a wiped state dir with each backend installed, a second
engine added behind reconcile's back, a draining ebpf datapath that is no second engine.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
from click.testing import CliRunner

from ipmasq_legacy import agent, backends, cli, config, state
from ipmasq_legacy.backends import engines, selection
from ipmasq_legacy.backends.base import Backend, FamilyLive, Live

from .test_traffic import BACKENDS
from .testbed import Node

SECOND = "second NAT engine live: {}"
EBPF_REASON = backends.get("ebpf").unavailable_reason()


# ---------------------------------------------------------------- the decision, no root


def never():
    raise AssertionError("availability asked although the live engines settle it")


@pytest.fixture
def no_record(tmp_path, monkeypatch):
    monkeypatch.setenv("IPMASQ_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("IPMASQ_CONFIG", "")


def heuristics_pick(monkeypatch, name: str | None):
    def pick(available):
        if name is None:
            raise LookupError("no backend can run here")
        return name, f"{name} by heuristics"

    monkeypatch.setattr(selection, "_heuristics", pick)


def test_the_only_live_engine_is_kept(no_record, monkeypatch):
    heuristics_pick(monkeypatch, "nftables")
    name, why = selection.choose_auto(never, ["ebpf"])
    assert name == "ebpf" and "only NAT engine of ours live" in why


@pytest.mark.parametrize("live, pick, kept", [
    (["iptables-legacy", "nftables"], "nftables", "nftables"),  # auto's own choice, when live
    (["iptables-nft", "ebpf"], "nftables", "iptables-nft"),  # else the first in NAMES order
    (["nftables", "ebpf"], None, "nftables"),  # nothing could be chosen: still one of them
])
def test_of_several_live_engines_one_is_kept(no_record, monkeypatch, live, pick, kept):
    heuristics_pick(monkeypatch, pick)
    name, why = selection.choose_auto(dict.fromkeys(backends.NAMES), live)
    assert name == kept
    assert ", ".join(live) in why and "the others are removed" in why


def test_no_live_engine_leaves_the_heuristics(no_record, monkeypatch):
    heuristics_pick(monkeypatch, "iptables-legacy")
    assert selection.choose_auto(dict.fromkeys(backends.NAMES), []) == ("iptables-legacy", "iptables-legacy by heuristics")
    heuristics_pick(monkeypatch, None)
    with pytest.raises(LookupError):
        selection.choose_auto(dict.fromkeys(backends.NAMES), [])


def test_a_usable_record_still_comes_first(no_record, monkeypatch):
    state.write("iptables-nft", "")
    name, why = selection.choose_auto(dict.fromkeys(backends.NAMES), ["ebpf"])
    assert name == "iptables-nft" and "recorded" in why


def test_resolve_asks_the_kernel_only_without_a_record(no_record, monkeypatch):
    asked = []
    monkeypatch.setattr(engines, "live_engines", lambda: asked.append(1) or ["ebpf"])
    backend, why = backends.resolve("auto")
    assert backend.name == "ebpf" and "only NAT engine" in why and asked
    state.write("nftables", "")
    asked.clear()
    assert backends.resolve("auto")[0].name == "nftables" and not asked
    assert backends.resolve("auto", probe=False)[0].name == "nftables" and not asked


# -- live_engines itself, its kernel reads replaced


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """What the kernel holds, as live_engines' readers would find it."""
    held = {"legacy": set(), "nft": set(), "tables": False, "draining": False, "filters": False}
    monkeypatch.setenv("IPMASQ_BPF_DIR", str(tmp_path / "pins"))
    monkeypatch.setattr(engines, "_legacy_chains", lambda: held["legacy"])
    monkeypatch.setattr(engines, "_nft_chains", lambda: held["nft"])
    monkeypatch.setattr(engines, "_nft_tables_present", lambda: held["tables"])
    monkeypatch.setattr(engines, "_ebpf_draining", lambda: held["draining"])
    monkeypatch.setattr(engines, "_our_tc_filters", lambda: held["filters"])
    return held


def test_each_engine_by_its_own_objects(kernel, tmp_path):
    assert engines.live_engines() == []
    kernel["legacy"] = {"IPMASQ-LEGACY"}
    kernel["nft"] = {"IPMASQ-LEGACY"}
    kernel["tables"] = True
    kernel["filters"] = True
    assert engines.live_engines() == list(backends.NAMES)


def test_the_ebpf_assist_chain_is_ebpfs_never_the_iptables_backends(kernel):
    for variant in ("legacy", "nft"):
        kernel[variant] = {engines.ASSIST_CHAIN}
        assert engines.live_engines() == ["ebpf"]  # what is left of an ebpf install
        kernel[variant] = set()


def test_a_draining_ebpf_datapath_is_not_live(kernel, tmp_path):
    (tmp_path / "pins").mkdir()
    (tmp_path / "pins" / "ctl").touch()
    assert engines.live_engines() == ["ebpf"]
    kernel["draining"] = True
    kernel["filters"] = True  # still attached to translate its own flows
    kernel["legacy"] = {engines.ASSIST_CHAIN}
    assert engines.live_engines() == []


# -- agent: migration semantics for every engine the kernel holds


class FakeBackend(Backend):
    def __init__(self, name: str, node: dict):
        self.name, self.node = name, node

    def unavailable_reason(self):
        return None

    def apply(self, plan):
        self.node["calls"].append(("apply", self.name, state.read().get("backend")))
        self.node["live"] = sorted(set(self.node["live"]) | {self.name}, key=backends.NAMES.index)
        return [f"ipv4 installed ({self.name})"]

    def remove(self):
        self.node["calls"].append(("remove", self.name))
        self.node["live"] = [n for n in self.node["live"] if n != self.name]
        return ["ipv4"]

    def drift(self, plan, live=None):
        return [] if self.name in self.node["live"] else ["ipv4: not installed"]

    def live(self):
        on = self.name in self.node["live"]
        return Live(self.name, {4: FamilyLive(4, on), 6: FamilyLive(6, on)})

    def fingerprint(self):
        return f"{self.name} unchanged"


@pytest.fixture
def fake(no_record, tmp_path, monkeypatch, fake_kernel):
    """A node of fake backends: `live` is what the kernel holds, `calls` what was done."""
    node = {"live": [], "calls": [], "config": str(tmp_path / "config.yaml")}
    (tmp_path / "config.yaml").write_text("{}\n")
    monkeypatch.setattr(backends, "get", lambda name: FakeBackend(name, node))
    monkeypatch.setattr(engines, "live_engines", lambda: list(node["live"]))
    monkeypatch.setattr(backends, "finish_handovers", lambda current: [])
    monkeypatch.setattr(backends, "handover_pending", lambda current: False)
    heuristics_pick(monkeypatch, "nftables")
    return node


def sync(fake, datapath="auto", reconcile=False):
    cfg = config.load(fake["config"], {"datapath": datapath})
    return agent.sync(cfg, only_if_drifted=reconcile)


def test_apply_removes_every_other_live_engine_after_applying(fake):
    fake["live"] = ["iptables-legacy", "ebpf"]
    result = sync(fake, "nftables")
    assert [c[:2] for c in fake["calls"]] == [("apply", "nftables"), ("remove", "iptables-legacy"),
                                              ("remove", "ebpf")]
    assert fake["live"] == ["nftables"] and state.read()["backend"] == "nftables"
    assert result.changes[1:] == ["removed iptables-legacy (ipv4)", "removed ebpf (ipv4)"]


def test_a_wiped_record_is_rebuilt_so_the_switch_is_a_migration(fake):
    """The backend applied sees the engine it replaces recorded (ebpf keeps netfilter's
    connections NATed on a switch it can see)."""
    fake["live"] = ["nftables"]
    sync(fake, "ebpf")
    assert fake["calls"] == [("apply", "ebpf", "nftables"), ("remove", "nftables")]


def test_auto_with_several_live_keeps_one_and_removes_the_rest(fake):
    fake["live"] = ["iptables-legacy", "nftables", "ebpf"]
    result = sync(fake, "auto", reconcile=True)
    assert result.backend == "nftables"
    assert result.drift == [SECOND.format("iptables-legacy"), SECOND.format("ebpf")]
    assert [c[:2] for c in fake["calls"]] == [("apply", "nftables"), ("remove", "iptables-legacy"),
                                              ("remove", "ebpf")]
    assert fake["live"] == ["nftables"]


def test_reconcile_reports_a_second_engine_beside_the_recorded_one(fake):
    state.write("iptables-nft", "")
    fake["live"] = ["iptables-nft", "ebpf"]
    result = sync(fake, "auto", reconcile=True)
    assert result.drift == [SECOND.format("ebpf")]
    assert [c[:2] for c in fake["calls"]] == [("apply", "iptables-nft"), ("remove", "ebpf")]


def test_a_recorded_migration_is_no_second_engine(fake):
    state.write("nftables", "")
    fake["live"] = ["nftables"]
    result = sync(fake, "iptables-legacy", reconcile=True)
    assert result.drift == [] and "removed nftables (ipv4)" in result.changes


def test_in_sync_without_a_record_rebuilds_it_and_changes_nothing(fake):
    fake["live"] = ["ebpf"]
    result = sync(fake, "auto", reconcile=True)
    assert (result.backend, result.drift, result.changes, fake["calls"]) == ("ebpf", [], [], [])
    assert state.read()["backend"] == "ebpf"


def test_the_quick_reconcile_path_does_not_hide_a_second_engine(fake):
    fake["live"] = ["nftables"]
    sync(fake, "nftables")
    assert agent.reconcile(fake["config"], {}) is not None  # reads everything, records what it verified
    assert agent.reconcile(fake["config"], {}) is None  # trusted: nothing changed
    fake["live"].append("ebpf")  # nftables' own fingerprint does not move
    result = agent.reconcile(fake["config"], {})
    assert result is not None and result.drift == [SECOND.format("ebpf")]
    assert fake["live"] == ["nftables"]


def test_status_reports_a_second_engine_as_drift(fake):
    state.write("nftables", "")
    fake["live"] = ["nftables", "ebpf"]
    runner = CliRunner()
    out = runner.invoke(cli.cli, ["status", "--config", fake["config"], "-o", "json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert not data["in_sync"] and data["drift"] == [SECOND.format("ebpf")]
    assert data["engines"] == ["nftables", "ebpf"]
    text = runner.invoke(cli.cli, ["status", "--config", fake["config"]]).output
    assert "State: drifted: " + SECOND.format("ebpf") in text


# ---------------------------------------------------------------- with packets


def engines_seen(node: Node) -> set[str]:
    """Our engines as the tools show them (not through the code under test)."""
    seen = set()
    for variant in ("legacy", "nft"):
        text = "".join(node.bed.node_exec([f"{ipt}-{variant}-save", "-t", "nat"]).stdout
                       for ipt in ("iptables", "ip6tables"))
        if re.search(r"^:IPMASQ-LEGACY ", text, re.M):
            seen.add(f"iptables-{variant}")
    if re.search(r"^table ip6? ipmasq_legacy$", node.sh("nft list tables"), re.M):
        seen.add("nftables")
    if "ipmasq_legacy/" in node.bed.node_exec(["tc", "filter", "show", "dev", "eth0", "egress"]).stdout:
        seen.add("ebpf")
    return seen


def live_engines_in(node: Node) -> list[str]:
    code = "import json; from ipmasq_legacy.backends import engines; print(json.dumps(engines.live_engines()))"
    proc = node.bed.node_exec([sys.executable, "-c", code], env=node.env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wipe_state(node: Node) -> None:
    shutil.rmtree(node.env["IPMASQ_STATE_DIR"])


def add_behind_our_back(node: Node, name: str, config_path: str) -> None:
    """Install `name` through its backend alone, with a state dir of its own: a second
    engine that neither the node's record nor its apply knows about."""
    code = ("from ipmasq_legacy import backends, config, plan; "
            f"backends.get({name!r}).apply(plan.build(config.load({config_path!r})))")
    env = {**node.env, "IPMASQ_STATE_DIR": str(node.dir / "elsewhere")}
    proc = node.bed.node_exec([sys.executable, "-c", code], env=env)
    assert proc.returncode == 0, proc.stderr


def status(node: Node, config_path: str) -> dict:
    return json.loads(node.ipmasq("status", "--config", config_path, "-o", "json", check=True).stdout)


def assert_masqueraded(node: Node) -> None:
    bed = node.bed
    assert bed.source_seen(bed.dest("public")) == bed.uplink_addr["eth0"][4]
    assert bed.source_seen(bed.dest("public6")) == bed.uplink_addr["eth0"][6]


def pairs(names):
    out = []
    for old in names:
        for new in names:
            values = [getattr(p, "values", (p,))[0] for p in (old, new)]
            if values[0] == values[1]:
                continue
            marks = [m for p in (old, new) for m in getattr(p, "marks", ())]
            out.append(pytest.param(*values, marks=marks, id=f"{values[0]}->{values[1]}"))
    return out


@pytest.mark.traffic
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_wiped_auto_reconcile_keeps_the_live_engine(node, backend):
    path = node.write_config({})  # datapath: auto
    node.ipmasq("apply", "--config", path, "--backend", backend, check=True)
    wipe_state(node)
    proc = node.ipmasq("reconcile", "--config", path, check=True)
    assert "removed" not in proc.stdout + proc.stderr
    assert engines_seen(node) == {backend}
    assert live_engines_in(node) == [backend]
    assert_masqueraded(node)
    data = status(node, path)
    assert data["backend"] == backend and data["in_sync"], data
    # the record is back: the next reconcile trusts it
    assert json.loads((node.dir / "state" / "state.json").read_text())["backend"] == backend


@pytest.mark.traffic
@pytest.mark.parametrize("old, new", pairs(BACKENDS))
def test_state_wiped_apply_of_another_backend_leaves_only_it(node, old, new):
    path = node.write_config({})
    node.ipmasq("apply", "--config", path, "--backend", old, check=True)
    wipe_state(node)
    proc = node.ipmasq("apply", "--config", path, "--backend", new, check=True)
    assert f"removed {old}" in proc.stdout
    assert engines_seen(node) == {new}
    assert live_engines_in(node) == [new]
    assert_masqueraded(node)
    data = status(node, path)
    assert data["backend"] == new and data["in_sync"], data


QUICK = "unchanged since the last verified reconcile"
SECOND_ENGINE_CASES = [("nftables", "ebpf"), ("ebpf", "nftables"), ("iptables-nft", "iptables-legacy"),
                       ("iptables-legacy", "nftables")]


@pytest.mark.traffic
@pytest.mark.parametrize("first, second", [
    p for p in pairs(BACKENDS) if tuple(p.values) in SECOND_ENGINE_CASES])
def test_a_second_engine_added_later_is_drift_and_goes(node, first, second):
    path = node.write_config({})
    node.ipmasq("apply", "--config", path, "--backend", first, check=True)
    debug = ("reconcile", "--config", path, "--log-level", "debug")
    node.ipmasq(*debug, check=True)
    assert QUICK in node.ipmasq(*debug, check=True).stderr
    add_behind_our_back(node, second, path)
    assert engines_seen(node) == {first, second}
    data = status(node, path)
    assert not data["in_sync"] and SECOND.format(second) in data["drift"], data
    assert data["engines"] == [n for n in backends.NAMES if n in (first, second)]
    text = node.ipmasq("status", "--config", path, check=True).stdout
    assert "State: drifted: " in text and SECOND.format(second) in text
    doctor = json.loads(node.ipmasq("doctor", "-o", "json", check=True).stdout)
    assert doctor["engines"] == data["engines"]
    assert "engines of ours live: " + ", ".join(data["engines"]) in node.ipmasq("doctor", check=True).stdout
    repair = node.ipmasq(*debug, check=True)
    assert QUICK not in repair.stderr
    assert f"drift in {first}: {SECOND.format(second)}" in repair.stderr, repair.stderr
    assert engines_seen(node) == {first}
    assert_masqueraded(node)
    assert status(node, path)["in_sync"]
    assert "drift" not in node.ipmasq(*debug, check=True).stderr


@pytest.mark.traffic
@pytest.mark.skipif(EBPF_REASON is not None, reason=f"ebpf backend cannot run here: {EBPF_REASON}")
def test_a_draining_ebpf_datapath_is_no_second_engine(node):
    """After a switch away from ebpf with a flow in use, ebpf drains: still attached,
    translating only its own flows. That is a handover, not a second engine."""
    path = node.write_config({})
    node.ipmasq("apply", "--config", path, "--backend", "ebpf", check=True)
    assert_masqueraded(node)  # flows of ebpf's own, in use: it drains instead of going
    proc = node.ipmasq("apply", "--config", path, "--backend", "nftables", check=True)
    assert "draining" in proc.stdout, proc.stdout
    assert engines_seen(node) == {"nftables", "ebpf"}  # the programs stay for their flows
    assert live_engines_in(node) == ["nftables"]
    data = status(node, path)
    assert data["in_sync"] and data["engines"] == ["nftables"], data
    repair = node.ipmasq("reconcile", "--config", path, check=True)
    assert "second NAT engine" not in repair.stderr
    assert engines_seen(node) == {"nftables", "ebpf"}
    wipe_state(node)
    node.ipmasq("reconcile", "--config", path, check=True)
    assert json.loads((node.dir / "state" / "state.json").read_text())["backend"] == "nftables"


def test_ebpf_pin_dir_is_the_ebpf_packages(monkeypatch, tmp_path):
    """engines' copy of ebpf.pin_dir (kept so a netfilter run does not import the package)."""
    from ipmasq_legacy.backends import ebpf

    monkeypatch.delenv("IPMASQ_BPF_DIR", raising=False)
    assert engines.ebpf_pin_dir() == ebpf.pin_dir()
    monkeypatch.setenv("IPMASQ_BPF_DIR", str(tmp_path / "pins"))
    assert engines.ebpf_pin_dir() == ebpf.pin_dir() == tmp_path / "pins"
