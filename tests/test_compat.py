"""The configs users already have (README "Compatibility with Cilium and ip-masq-agent"): Cilium's agent keys, its Helm values.yaml and
its cilium-config ConfigMap (manifest, data, mounted directory), and ip-masq-agent files
as ip-masq-agent reads them (its own TestSyncConfig inputs). No root needed."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from ipmasq_legacy import config, plan
from ipmasq_legacy.errors import ConfigError

from .test_config import DEFAULT_11

# A TKE guide's values.yaml (one of the documents docs/spec.md grew from), verbatim, comments and all.
SEED_003_VALUES = """\
# 启用 cilium 的 IP MASQUERADE 功能
enableIPv4Masquerade: true
bpf:
  # cilium 的 IP MASQUERADE 功能有 bpf 和 iptables 两个版本，在 TKE 环境需使用 bpf 版本。参考 https://docs.cilium.io/en/stable/network/concepts/masquerading/
  masquerade: true
ipMasqAgent:
  # 使用 cilium 基于 ebpf 实现的 ipMasqAgent 来控制 IP MASQUERADE，这样可以支持配置多个 CIDR 网段不做 SNAT。
  # 说明：ipv4NativeRoutingCIDR 方式仅支持单个 CIDR，而腾讯云 VPC 支持添加辅助 CIDR 来扩展 VPC 的 CIDR，所以
  # 相同集群中的 Pod IP 可能属于不同的大内网网段（比如 Pod A 的 IP 是 172.x.x.x，而 Pod B 的 IP 是 10.x.x.x）。
  enabled: true
  config:
    # masqLinkLocal 用于控制 link local 网段（169.254.0.0/16）是否做 SNAT，该网段在腾讯云上用于公共服务使用，
    # 比如 cvm 的 metadata 服务（查询当前 cvm 的元信息），或者其它一些需要使用节点 IP 鉴权的接口，在  Pod 中
    # 调用这些接口都需要确保 SNAT 节点 IP，所以将 masqLinkLocal 置为 true，确保发送给 169.254.0.0/16 网段的流
    # 量都 SNAT 成节点 IP，避免这类接口调用失败。
    masqLinkLocal: true
"""

# The seed's ip-masq-agent ConfigMap's `config` key
SEED_003_AGENT = """\
nonMasqueradeCIDRs:
- 10.0.0.0/16
- 172.18.0.0/16
- 192.168.0.0/17
masqLinkLocal: true
"""


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("IPMASQ_CONFIG", raising=False)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def exempt(cfg, family: int = 4) -> list[str]:
    families = plan.build(cfg).to_dict()["families"]
    return families[f"ipv{family}"]["exempt"] if f"ipv{family}" in families else None


def kinds(cfg) -> list[str]:
    return [w.kind for w in cfg.warnings]


# ---------------------------------------------------------------- Helm values.yaml


def test_seed_003_values_verbatim(tmp_path):
    cfg = config.load(write(tmp_path, SEED_003_VALUES, "values.yaml"))
    assert cfg.shape == "helm-values"
    assert cfg.datapath == "ebpf"  # bpf.masquerade
    assert cfg.enable_ipv4_masquerade and cfg.enable_ip_masq_agent and cfg.ip_masq_agent_inline
    assert cfg.masq_agent.masq_link_local is True
    # masqLinkLocal: 169.254.0.0/16 is masqueraded (the TKE metadata service needs the node's address);
    # the default ranges stay exempt, as in ip-masq-agent
    # (240.0.0.0/4 merged with multicast, exempt whatever the config: 224.0.0.0/3)
    assert exempt(cfg) == sorted([c if c != "240.0.0.0/4" else "224.0.0.0/3" for c in DEFAULT_11],
                                 key=lambda c: tuple(int(x) for x in c.split("/")[0].split(".")))
    assert "169.254.0.0/16" not in exempt(cfg)
    # the chart runs no IPv6 unless ipv6.enabled: nothing of IPv6 is masqueraded
    assert cfg.enable_ipv6_masquerade is False and exempt(cfg, 6) is None
    # where Cilium reads this differently, it says so (README: Compatibility)
    assert kinds(cfg) == ["cilium-difference"] and "exempts none of them" in cfg.warnings[0].text


def test_helm_values_every_masquerading_key(tmp_path):
    cfg = config.load(write(tmp_path, """
        enableIPv4Masquerade: true
        enableIPv6Masquerade: true
        ipv6:
          enabled: true
        egressMasqueradeInterfaces: eth+ ens3
        ipv4NativeRoutingCIDR: 10.0.0.0/8
        ipv6NativeRoutingCIDR: fd00::/8
        iptablesRandomFully: true
        enableMasqueradeRouteSource: false
        egressGateway:
          enabled: false
        ipMasqAgent:
          enabled: false
    """, "values.yaml"))
    assert cfg.shape == "helm-values" and cfg.warnings == ()
    assert cfg.egress_masquerade_interfaces == ("eth+", "ens3")
    assert [str(p) for p in cfg.ipv4_native_routing_cidr] == ["10.0.0.0/8"]
    assert [str(p) for p in cfg.ipv6_native_routing_cidr] == ["fd00::/8"]
    assert cfg.iptables_random_fully and cfg.enable_ipv6_masquerade and cfg.datapath == "auto"
    assert not cfg.enable_ip_masq_agent


def test_helm_unrelated_keys_one_warning_listing_them(tmp_path):
    cfg = config.load(write(tmp_path, """
        kubeProxyReplacement: true
        hubble:
          relay: {enabled: true}
        bpf:
          masquerade: false
          hostLegacyRouting: true
        ipMasqAgent:
          enabled: true
        extraConfig:
          enable-ipv4-masquerade: "false"
          foo-bar: "1"
        enableIPv4Masquerade: true
    """, "values.yaml"))
    assert kinds(cfg).count("ignored-keys") == 1
    text = next(w.text for w in cfg.warnings if w.kind == "ignored-keys")
    assert "4 keys unrelated to masquerading ignored: kubeProxyReplacement, hubble, bpf.hostLegacyRouting, " \
           "extraConfig.foo-bar" in text
    assert cfg.enable_ipv4_masquerade is False  # extraConfig is written after the chart's own keys
    # ipMasqAgent.enabled without config: the file at ip-masq-agent-config-path (here: missing, defaults)
    assert not cfg.ip_masq_agent_inline and cfg.masq_agent.source.endswith("(missing: defaults)")
    # Cilium refuses ip-masq-agent without BPF masquerading: here it applies, and says so
    assert "cilium-difference" in kinds(cfg)


@pytest.mark.parametrize("text, expected", [
    ("enableMasqueradeRouteSource: true\n", "key 'enableMasqueradeRouteSource' in Helm values"),
    ("egressGateway: {enabled: true}\n", "key 'egressGateway.enabled' in Helm values"),
    ("bpf: true\n", "key 'bpf' in Helm values"),
    ("ipMasqAgent: {enabled: true, config: {nonMasqueradeCIDRs: [10.0.0.1/8]}}\n", "did you mean 10.0.0.0/8?"),
    ("ipMasqAgent: {enabled: true, config: [1]}\n", "expected a mapping of ip-masq-agent keys"),
    ("ipv4NativeRoutingCIDR: 10.0.0.1/8\n", "key 'ipv4NativeRoutingCIDR' in Helm values"),
    ("enableIPv4Masquerade: maybe\n", "expected true or false, got 'maybe'"),
    ("bpf: {masquerade: true}\ndatapath: nftables\n", "mixes Helm values (bpf) with agent keys (datapath)"),
])
def test_helm_errors_name_key_value_file(tmp_path, text, expected):
    with pytest.raises(ConfigError) as exc:
        config.load(write(tmp_path, text, "values.yaml"))
    assert expected in str(exc.value) and "values.yaml" in str(exc.value) and "\n" not in str(exc.value)


def test_helm_eni_mode_leaves_ipv4_masquerading_off(tmp_path):
    assert config.load(write(tmp_path, "eni: {enabled: true}\n")).enable_ipv4_masquerade is False
    assert config.load(write(tmp_path, "eni: {enabled: true}\nenableIPv4Masquerade: true\n")).enable_ipv4_masquerade


def test_helm_devices_are_the_bpf_masquerading_interfaces(tmp_path):
    cfg = config.load(write(tmp_path, "bpf: {masquerade: true}\ndevices: eth+\n"))
    assert cfg.egress_masquerade_interfaces == ("eth+",) and cfg.datapath == "ebpf"
    cfg = config.load(write(tmp_path, "bpf: {masquerade: false}\ndevices: eth+\n"))
    assert cfg.egress_masquerade_interfaces == () and "devices" in cfg.warnings[0].text


# ---------------------------------------------------------------- Cilium's agent keys


def test_agent_keys_as_cilium_spells_them(tmp_path):
    cfg = config.load(write(tmp_path, """
        enable-ipv4-masquerade: "true"
        enable-ipv6-masquerade: "False"
        enable-bpf-masquerade: "T"
        egress-masquerade-interfaces: "eth0 eth1"
        native-routing-cidr: 10.0.0.0/8
        enable-ip-masq-agent: "false"
        iptables-random-fully: "true"
        enable-masquerade-to-route-source: "false"
        enable-ipv4-egress-gateway: "false"
    """))
    assert cfg.shape == "ipmasq-legacy" and cfg.warnings == ()
    assert (cfg.enable_ipv4_masquerade, cfg.enable_ipv6_masquerade, cfg.datapath) == (True, False, "ebpf")
    assert [str(p) for p in cfg.ipv4_native_routing_cidr] == ["10.0.0.0/8"] and cfg.iptables_random_fully


@pytest.mark.parametrize("text, expected", [
    ("enable-bpf-masqerade: true\n", "unknown key 'enable-bpf-masqerade'; did you mean 'enable-bpf-masquerade'?"),
    ('enable-masquerade-to-route-source: "true"\n', "is not supported by ipmasq-legacy"),
    ('derive-masquerade-ip-addr-from-device: eth0\n', "'eth0' is not supported"),
    ("native-routing-cidr: 10.0.0.0/8\nipv4-native-routing-cidr: 10.1.0.0/16\n", "contradicts"),
    ("masquerade: false\nenable-ipv4-masquerade: true\n", "contradicts key 'masquerade'"),
])
def test_agent_key_errors(tmp_path, text, expected):
    with pytest.raises(ConfigError) as exc:
        config.load(write(tmp_path, text))
    assert expected in str(exc.value) and "config.yaml" in str(exc.value)


def test_enable_ipv6_false_turns_its_masquerading_off(tmp_path):
    cfg = config.load(write(tmp_path, 'enable-ipv6: "false"\nenable-ipv6-masquerade: "true"\n'))
    assert cfg.enable_ipv6_masquerade is False and cfg.enable_ipv4_masquerade is True


# ---------------------------------------------------------------- cilium-config


CILIUM_CONFIG = {
    "identity-allocation-mode": "crd",
    "cluster-name": "default",
    "enable-ipv4": "true",
    "enable-ipv6": "false",
    "enable-ipv4-masquerade": "true",
    "enable-ipv6-masquerade": "true",
    "enable-bpf-masquerade": "true",
    "enable-masquerade-to-route-source": "false",
    "enable-ip-masq-agent": "true",
    "egress-masquerade-interfaces": "",
    "ipv4-native-routing-cidr": "10.0.0.0/8",
    "routing-mode": "native",
    "debug": "false",
}


def test_cilium_config_manifest(tmp_path):
    manifest = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cilium-config"},
                "data": {**CILIUM_CONFIG, "ip-masq-agent-config-path": str(tmp_path / "ip-masq-agent")}}
    (tmp_path / "ip-masq-agent").write_text(SEED_003_AGENT)
    cfg = config.load(write(tmp_path, json.dumps(manifest), "cilium-config.json"))
    assert cfg.shape == "cilium-config" and cfg.datapath == "ebpf"
    assert cfg.enable_ipv6_masquerade is False and cfg.egress_masquerade_interfaces == ()
    assert exempt(cfg) == ["10.0.0.0/8", "172.18.0.0/16", "192.168.0.0/17", "224.0.0.0/4"]
    ignored = [w.text for w in cfg.warnings if w.kind == "ignored-keys"]
    assert len(ignored) == 1 and ignored[0].endswith(
        "4 keys unrelated to masquerading ignored: identity-allocation-mode, cluster-name, routing-mode, debug")


def test_cilium_config_data_alone(tmp_path):
    cfg = config.load(write(tmp_path, json.dumps(CILIUM_CONFIG)))
    assert cfg.shape == "cilium-config" and cfg.datapath == "ebpf"


def kubelet_configmap(directory: Path, data: dict, version: int) -> None:
    """What the kubelet's atomic writer makes of a ConfigMap volume: the files in
    `..<timestamp>/`, `..data` -> it, and each key a symlink through `..data`; an update
    writes a new timestamped directory and renames a new `..data` over the old."""
    directory.mkdir(exist_ok=True)
    stamp = f"..2026_01_0{version}_00_00_00.{version}"
    (directory / stamp).mkdir()
    for key, value in data.items():
        (directory / stamp / key).write_text(value)
    (directory / "..data_tmp").symlink_to(stamp)
    os.rename(directory / "..data_tmp", directory / "..data")
    for key in data:
        if not (directory / key).is_symlink():
            (directory / key).symlink_to(f"..data/{key}")
    for old in directory.iterdir():
        if old.name.startswith("..2026") and old.name != stamp:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


def test_cilium_config_directory_with_kubelet_layout(tmp_path):
    mount = tmp_path / "cilium-config"
    kubelet_configmap(mount, CILIUM_CONFIG, 1)
    cfg = config.load(str(mount))
    assert cfg.shape == "cilium-config" and cfg.datapath == "ebpf" and cfg.source == str(mount)
    assert [str(p) for p in cfg.ipv4_native_routing_cidr] == ["10.0.0.0/8"]
    before = config.directory_digest(mount)
    kubelet_configmap(mount, {**CILIUM_CONFIG, "enable-bpf-masquerade": "false",
                              "egress-masquerade-interfaces": "eth+"}, 2)
    cfg = config.load(str(mount))
    assert cfg.datapath == "auto" and cfg.egress_masquerade_interfaces == ("eth+",)
    assert config.directory_digest(mount) != before


def test_configmap_directory_of_this_tools_own_config(tmp_path):
    mount = tmp_path / "ipmasq-legacy"
    kubelet_configmap(mount, {"config.yaml": "egress-masquerade-interfaces: eth+\n"}, 1)
    cfg = config.load(str(mount))
    assert cfg.shape == "ipmasq-legacy" and cfg.egress_masquerade_interfaces == ("eth+",)


def test_ip_masq_agent_configmap_given_as_config_is_explained(tmp_path):
    manifest = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ip-masq-agent"},
                "data": {"config": SEED_003_AGENT}}
    with pytest.raises(ConfigError, match="this is an ip-masq-agent ConfigMap"):
        config.load(write(tmp_path, json.dumps(manifest)))


# ---------------------------------------------------------------- ip-masq-agent files


def agent(tmp_path: Path, text: str | None, name: str = "ip-masq-agent"):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    cfg = config.load(write(tmp_path, f"enable-ip-masq-agent: true\nip-masq-agent-config-path: {path}\n"))
    return cfg.masq_agent, cfg.warnings


# ip-masq-agent's TestSyncConfig inputs (cmd/ip-masq-agent/ip-masq-agent_test.go), each with
# what ip-masq-agent makes of it there and what this tool makes of it (the same but where
# noted): (description, file or None for no file, CIDRs, masqLinkLocal, resync seconds).
AGENT_3 = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]  # the agent's default without flags
SYNC_CONFIG_CASES = [
    ("valid yaml file, all keys",
     "\nnonMasqueradeCIDRs:\n  - 172.16.0.0/12\n  - 10.0.0.0/8\ncidrLimit: 64\nmasqLinkLocal: true\nresyncInterval: 5s\n",
     ["172.16.0.0/12", "10.0.0.0/8"], True, 5.0),
    ("valid yaml file, just nonMasqueradeCIDRs", "\nnonMasqueradeCIDRs:\n  - 192.168.0.0/16\n",
     ["192.168.0.0/16"], False, 60.0),
    # the agent keeps its default ranges: three without --nomasq-all-reserved-ranges; here the
    # eleven it keeps with it (docs/spec.md section 2)
    ("valid yaml file, just masqLinkLocal", "\nmasqLinkLocal: true\n", DEFAULT_11, True, 60.0),
    ("valid yaml file, just resyncInterval", "\nresyncInterval: 5m\n", DEFAULT_11, False, 300.0),
    ("valid json file, all keys",
     '\n{\n  "nonMasqueradeCIDRs": ["172.16.0.0/12", "10.0.0.0/8"],\n  "masqLinkLocal": true,\n'
     '  "resyncInterval": "5s"\n}\n', ["172.16.0.0/12", "10.0.0.0/8"], True, 5.0),
    ("valid json file, just nonMasqueradeCIDRs", '\n{\n\t"nonMasqueradeCIDRs": ["192.168.0.0/16"]\n}\n',
     ["192.168.0.0/16"], False, 60.0),
    ("valid json file, just masqLinkLocal", '\n{\n\t"masqLinkLocal": true\n}\n', DEFAULT_11, True, 60.0),
    ("valid json file, just resyncInterval but escaped", '\n{\n\t"resyncInterval": "\\u0035\\u006d"\n}\n',
     DEFAULT_11, False, 300.0),
    ("valid json file, just resyncInterval", '\n{\n\t"resyncInterval": "5m"\n}\n', DEFAULT_11, False, 300.0),
    ("no config file", None, DEFAULT_11, False, 60.0),
    ("valid json file, all keys with ipv6 cidr",
     '\n\t\t{\n\t\t  "nonMasqueradeCIDRs": ["172.16.0.0/12", "10.0.0.0/8", "fc00::/7"],\n'
     '\t\t  "masqLinkLocal": true,\n\t\t  "resyncInterval": "5s"\n\t\t}\n\t\t',
     ["172.16.0.0/12", "10.0.0.0/8", "fc00::/7"], True, 5.0),
]


@pytest.mark.parametrize("desc, text, cidrs, link_local, resync", SYNC_CONFIG_CASES,
                         ids=[c[0] for c in SYNC_CONFIG_CASES])
def test_ip_masq_agent_sync_config_cases(tmp_path, desc, text, cidrs, link_local, resync):
    masq, warnings = agent(tmp_path, text)
    assert [str(n) for n in masq.non_masquerade_cidrs] == cidrs
    assert (masq.masq_link_local, masq.resync_interval) == (link_local, resync)
    # the agent test runs with --enable-ipv6; without it the agent refuses fc00::/7, and this tool says so
    assert [w.kind for w in warnings] == (["agent-difference"] if "fc00::/7" in cidrs else [])


@pytest.mark.parametrize("text", ["*", "{*"], ids=["invalid yaml file", "invalid json file"])
def test_ip_masq_agent_sync_config_invalid(tmp_path, text):
    with pytest.raises(ConfigError, match="ip-masq-agent config .*: not valid YAML"):
        agent(tmp_path, text)


# TestConfigValidate: the CIDRs the agent refuses, this tool refuses too
@pytest.mark.parametrize("cidr, expected", [
    ("abcdefg", "'abcdefg'"), ("10.256.0.0/16", "'10.256.0.0/16'"), ("10.0.0.1/8", "did you mean 10.0.0.0/8?")])
def test_ip_masq_agent_config_validate_cases(tmp_path, cidr, expected):
    with pytest.raises(ConfigError) as exc:
        agent(tmp_path, f"nonMasqueradeCIDRs: [{cidr}]\n")
    assert expected in str(exc.value) and "key 'nonMasqueradeCIDRs' in ip-masq-agent config" in str(exc.value)


def test_ip_masq_agent_config_validate_empty_list(tmp_path):
    assert agent(tmp_path, "nonMasqueradeCIDRs: []\ncidrLimit: 64\n")[0].non_masquerade_cidrs == ()


def test_keys_match_case_insensitively_as_go_json(tmp_path):
    masq, warnings = agent(tmp_path, textwrap.dedent("""\
        NonMasqueradeCIDRs: [10.1.0.0/16]
        masqlinklocal: true
        MASQLINKLOCALIPV6: true
        ResyncInterval: 2m
        CIDRLIMIT: 8
    """))
    assert [str(n) for n in masq.non_masquerade_cidrs] == ["10.1.0.0/16"]
    assert (masq.masq_link_local, masq.masq_link_local_ipv6, masq.resync_interval, masq.cidr_limit) == \
        (True, True, 120.0, 8)
    assert warnings == ()
    # Go's fold also takes the Kelvin sign for k and the long s for s
    assert agent(tmp_path, "masqLin\u212aLocal: true\n")[0].masq_link_local is True
    assert agent(tmp_path, "ma\u017fqLinkLocal: true\n")[0].masq_link_local is True


def test_two_spellings_of_one_key_last_decoded_wins(tmp_path):
    # YAML reaches the agent's decoder with its keys sorted (upper case first) ...
    masq, warnings = agent(tmp_path, "masqLinkLocal: true\nMasqLinkLocal: false\n")
    assert masq.masq_link_local is True and [w.kind for w in warnings] == ["agent-difference"]
    # ... JSON in the order written
    masq, _ = agent(tmp_path, '{"masqLinkLocal": true, "MasqLinkLocal": false}')
    assert masq.masq_link_local is False


def test_unknown_keys_warned_never_refused(tmp_path):
    """ip-masq-agent issue #53: `enable-ipv6` in the file; the agent ignores it."""
    masq, warnings = agent(tmp_path, "nonMasqueradeCIDRs: [10.0.0.0/8]\nenable-ipv6: true\nfoo: 1\n")
    assert [str(n) for n in masq.non_masquerade_cidrs] == ["10.0.0.0/8"]
    assert [w.kind for w in warnings] == ["unknown-key"]
    assert "unknown keys 'enable-ipv6', 'foo' ignored, as ip-masq-agent ignores them" in warnings[0].text


@pytest.mark.parametrize("text, check, fragment", [
    ("nonMasqueradeCIDRs: [" + ", ".join(f"10.{i}.0.0/16" for i in range(65)) + "]\n",
     lambda m: len(m.non_masquerade_cidrs) == 65, "more than cidrLimit 64"),
    ("nonMasqueradeCIDRs: [10.0.0.0/8, 10.1.0.0/16]\ncidrLimit: 1\n",
     lambda m: len(m.non_masquerade_cidrs) == 2, "more than cidrLimit 1"),
    ("resyncInterval: 30\n", lambda m: m.resync_interval == 30.0, "the number 30 read as 30s"),
    ('masqLinkLocal: "true"\n', lambda m: m.masq_link_local is True, "the string 'true' read as true"),
    ("nonMasqueradeCIDRs: [fd00::/8]\n", lambda m: str(m.non_masquerade_cidrs[0]) == "fd00::/8", "--enable-ipv6"),
    ("{nonMasqueradeCIDRs: [10.0.0.0/8]}\n", lambda m: len(m.non_masquerade_cidrs) == 1, "is not JSON"),
    ("resyncInterval: 0s\n", lambda m: m.resync_interval == 1.0, "resyncing every 1s here"),
])
def test_more_permissive_than_the_agent_warns(tmp_path, text, check, fragment):
    masq, warnings = agent(tmp_path, text)
    assert check(masq)
    assert [w.kind for w in warnings] == ["agent-difference"] and fragment in warnings[0].text


def test_null_values_leave_the_defaults(tmp_path):
    """Go's decoder leaves a field as it was for null (a YAML key with no value)."""
    masq, warnings = agent(tmp_path, "masqLinkLocal:\ncidrLimit:\nmasqLinkLocalIPv6: ~\n")
    assert (masq.masq_link_local, masq.masq_link_local_ipv6, masq.cidr_limit) == (False, False, None)
    assert [str(n) for n in masq.non_masquerade_cidrs] == DEFAULT_11 and warnings == ()
    assert agent(tmp_path, "nonMasqueradeCIDRs:\n")[0].non_masquerade_cidrs == ()  # nil: no ranges


@pytest.mark.parametrize("duration, seconds", [
    ("1h30m", 5400.0), ("1.5h", 5400.0), ("500ms", 1.0), (".5m", 30.0), ("90s", 90.0), ("1m0s", 60.0),
    ("2\u00b5s", 1.0), ("+5s", 5.0)])
def test_go_durations(tmp_path, duration, seconds):
    assert agent(tmp_path, f"resyncInterval: '{duration}'\n")[0].resync_interval == seconds


@pytest.mark.parametrize("duration", ["60", "5 s", "1d", "s", "1.2.3s", ""])
def test_go_refuses_these_durations_and_so_does_this_tool(tmp_path, duration):
    with pytest.raises(ConfigError, match="is not a duration like 60s"):
        agent(tmp_path, f"resyncInterval: '{duration}'\n")
