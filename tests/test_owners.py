"""The single owners of a kernel interface or a rule: the agent file's path rule, the
interface-pattern matcher, the iptables variant the host uses, the nft scripts run
through the kernel seam, and the nft table shapes read from rules/. No root: the node
is a FakeKernel (tests/fakes) or a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipmasq_legacy import agent, config, watch
from ipmasq_legacy.errors import ConfigError

# ---------------------------------------------------------------- the ip-masq-agent file


def test_agent_file_is_the_config_key_of_a_directory(tmp_path):
    assert config.agent_file(tmp_path / "missing") == tmp_path / "missing"
    (tmp_path / "file").write_text("{}\n")
    assert config.agent_file(tmp_path / "file") == tmp_path / "file"
    (tmp_path / "cm").mkdir()
    assert config.agent_file(tmp_path / "cm") == tmp_path / "cm" / "config"
    with pytest.raises(ConfigError, match="a directory without a 'config' file"):
        config.agent_file(tmp_path / "cm", strict=True)
    (tmp_path / "cm" / "config").write_text("{}\n")
    assert config.agent_file(tmp_path / "cm", strict=True) == tmp_path / "cm" / "config"


def test_agent_file_lenient_on_a_path_through_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    through = tmp_path / "file" / "config"
    assert config.agent_file(through) == through
    with pytest.raises(ConfigError):
        config.agent_file(through, strict=True)


def test_reconcile_and_watch_follow_the_loaders_file(tmp_path):
    (tmp_path / "cm").mkdir()
    (tmp_path / "cm" / "config").write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    (tmp_path / "ours.yaml").write_text(f"enable-ip-masq-agent: true\nip-masq-agent-config-path: {tmp_path / 'cm'}\n")
    cfg = config.load(str(tmp_path / "ours.yaml"))
    assert cfg.masq_agent.source.startswith(str(tmp_path / "cm" / "config"))
    files = agent._inputs(cfg, str(tmp_path / "ours.yaml"), {})["files"]
    assert str(tmp_path / "cm" / "config") in files
    assert Path(tmp_path / "cm" / "config") in watch.watched_files(str(tmp_path / "ours.yaml"), cfg)


# ---------------------------------------------------------------- egress-masquerade-interfaces


@pytest.mark.parametrize("patterns, name, selected", [
    (("eth+",), "eth0", True), (("eth+",), "eth", True), (("eth+",), "veth0", False),
    (("eth0",), "eth0", True), (("eth0",), "eth01", False), (("+",), "lo", True),
    ((), "lo", False), ((), "eth0", True), (("lo",), "lo", True),
])
def test_one_matcher_for_status_and_the_ebpf_datapath(patterns, name, selected):
    from ipmasq_legacy import links
    from ipmasq_legacy.backends.ebpf import links as ebpf_links

    assert links.selected(patterns, name) is selected
    assert links.matching(patterns, [name]) == ([name] if selected else [])
    found = {1: ebpf_links.Link(1, name, 14)}
    assert list(ebpf_links.matching_links(patterns, found)) == ([1] if selected else [])


def test_the_ebpf_datapath_leaves_out_bridge_ports():
    from ipmasq_legacy.backends.ebpf import links as ebpf_links

    found = {1: ebpf_links.Link(1, "br0", 14, kind="bridge"), 2: ebpf_links.Link(2, "eth0", 14, master=1)}
    assert list(ebpf_links.matching_links((), found)) == [1]
