"""Config loading and every validation error (docs/spec.md sections 1 and 2). No root needed."""

from __future__ import annotations

import ipaddress
import textwrap
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipmasq_legacy import config
from ipmasq_legacy.errors import ConfigError

DEFAULT_11 = [
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "192.0.0.0/24", "192.0.2.0/24",
    "192.88.99.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4",
]


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("IPMASQ_CONFIG", raising=False)


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_of(tmp_path, text, options=None) -> str:
    with pytest.raises(ConfigError) as exc:
        config.load(write(tmp_path, text), options)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_defaults_when_default_file_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(config.DEFAULTS, "config_path", str(tmp_path / "absent.yaml"))
    cfg = config.load()
    assert cfg.enable_ipv4_masquerade and cfg.enable_ipv6_masquerade
    assert cfg.egress_masquerade_interfaces == ()
    assert cfg.datapath == "auto"
    assert cfg.source == "<defaults>"


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="absent.yaml: no such file"):
        config.load(str(tmp_path / "absent.yaml"))


def test_env_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("IPMASQ_CONFIG", write(tmp_path, "datapath: iptables-nft\n"))
    assert config.load().datapath == "iptables-nft"
    monkeypatch.setenv("IPMASQ_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="nope.yaml"):
        config.load()


def test_full_file_yaml_and_json(tmp_path):
    cfg = config.load(write(tmp_path, """
        enable-ipv6-masquerade: false
        egress-masquerade-interfaces: eth+, ens3
        ipv4-native-routing-cidr: 10.0.0.0/8
        ipv4-pod-cidr: [10.244.0.0/16]
        iptables-random-fully: yes
        masquerade-to-ports: "1024-29999,32768-65535"
    """))
    assert cfg.enable_ipv6_masquerade is False
    assert cfg.egress_masquerade_interfaces == ("eth+", "ens3")
    assert [str(n) for n in cfg.ipv4_native_routing_cidr] == ["10.0.0.0/8"]
    assert cfg.iptables_random_fully is True
    assert cfg.masquerade_to_ports == ((1024, 29999), (32768, 65535))
    js = config.load(write(tmp_path, '{"egress-masquerade-interfaces": ["eth0", "eth1"]}', "c.json"))
    assert js.egress_masquerade_interfaces == ("eth0", "eth1")


def test_precedence_option_over_file_over_default(tmp_path):
    path = write(tmp_path, "datapath: iptables-legacy\negress-masquerade-interfaces: eth0\n")
    cfg = config.load(path, {"datapath": "iptables-nft"})
    assert cfg.datapath == "iptables-nft"
    assert cfg.egress_masquerade_interfaces == ("eth0",)
    assert cfg.enable_ipv4_masquerade is True


def test_bpf_masquerade_alias(tmp_path):
    assert config.load(write(tmp_path, "bpf-masquerade: true\n")).datapath == "ebpf"
    assert config.load(write(tmp_path, "bpf-masquerade: false\n")).datapath == "auto"
    # Cilium's own name, with Cilium's string values
    assert config.load(write(tmp_path, 'enable-bpf-masquerade: "true"\n')).datapath == "ebpf"
    assert config.load(write(tmp_path, 'enable-bpf-masquerade: "false"\n')).datapath == "auto"


def test_bpf_masquerade_and_datapath_must_agree(tmp_path):
    message = error_of(tmp_path, "datapath: nftables\nenable-bpf-masquerade: true\n")
    assert "key 'enable-bpf-masquerade' in" in message and "contradicts key 'datapath'" in message
    # the command line beats the file, as for every key
    assert config.load(write(tmp_path, "enable-bpf-masquerade: true\n"), {"datapath": "nftables"}).datapath \
        == "nftables"


def test_empty_file_means_defaults(tmp_path):
    assert config.load(write(tmp_path, "# nothing here\n")).datapath == "auto"


@pytest.mark.parametrize("text, expected", [
    ("egress-masquerade-interface: eth0\n", "unknown key 'egress-masquerade-interface'; did you mean 'egress-masquerade-interfaces'?"),
    ("datapth: auto\n", "did you mean 'datapath'?"),
    ("zzz: 1\n", "unknown key 'zzz'; known keys:"),
    ("enable-ipv4-masquerade: maybe\n", "key 'enable-ipv4-masquerade' in"),
    ("enable-ipv4-masquerade: maybe\n", "expected true or false, got 'maybe'"),
    ("ipv4-native-routing-cidr: 10.0.0.1/8\n", "has host bits set; did you mean 10.0.0.0/8?"),
    ("ipv4-native-routing-cidr: fd00::/8\n", "'fd00::/8' is IPv6, expected an IPv4 CIDR"),
    ("ipv6-pod-cidr: 10.0.0.0/8\n", "is IPv4, expected an IPv6 CIDR"),
    ("ipv4-pod-cidr: 10.0.0.0/33\n", "'10.0.0.0/33' is not a CIDR"),
    ("ipv4-pod-cidr: 7\n", "expected a list or a string, got 7"),
    ("ipv4-pod-cidr: [7]\n", "expected a CIDR string, got 7"),
    ("egress-masquerade-interfaces: [eth0, 5]\n", "interface name must be a string, got 5"),
    ('egress-masquerade-interfaces: [""]\n', "interface name is empty"),
    ("egress-masquerade-interfaces: [abcdefghijklmnop]\n", "is longer than 15 bytes"),
    ("egress-masquerade-interfaces: [e+th]\n", "'+' is only allowed last"),
    ('egress-masquerade-interfaces: ["eth\\n0"]\n', "interface name 'eth\\n0' has a character outside"),
    ('egress-masquerade-interfaces: ["eth 0"]\n', "has a character outside"),
    ('egress-masquerade-interfaces: ["eth\\"0"]\n', "has a character outside"),
    ("egress-masquerade-interfaces: [\"eth'0\"]\n", "has a character outside"),
    ("egress-masquerade-interfaces: [eth/0]\n", "has a character outside"),
    ("egress-masquerade-interfaces: [eth:0]\n", "has a character outside"),
    ("egress-masquerade-interfaces: ['..']\n", "is not a valid interface name"),
    ("egress-masquerade-interfaces: ['-j']\n", "'-j' is not a valid interface name"),
    ('egress-masquerade-interfaces: "eth0\\n-A POSTROUTING"\n', "contains a control character"),
    ("datapath: bpf\n", "'bpf' is not one of auto, iptables"),
    ("masquerade-to-ports: 0-10\n", "must be within 1-65535"),
    ("masquerade-to-ports: 2000-1000\n", "must be within 1-65535, low to high"),
    ("masquerade-to-ports: 1000-2000,1500-3000\n", "overlap"),
    ("masquerade-to-ports: abc\n", "'abc' is not a port or a port range"),
    ("- a list\n", "expected a mapping of keys, got list"),
    ("key: [unclosed\n", "not valid YAML at line"),
])
def test_validation_errors(tmp_path, text, expected):
    message = error_of(tmp_path, text)
    assert expected in message
    assert "config.yaml" in message  # names the file


def test_option_errors_name_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match="key 'datapath' on the command line: 'nope' is not one of"):
        config.load(write(tmp_path, ""), {"datapath": "nope"})


def test_newline_in_value_stays_one_line(tmp_path):
    message = error_of(tmp_path, 'egress-masquerade-interfaces: ["a\\nCOMMIT\\n*nat"]\n')
    assert "\n" not in message and "\\n" in message


def test_interfaces_string_split_and_deduplicated(tmp_path):
    cfg = config.load(write(tmp_path, "egress-masquerade-interfaces: 'eth+ eth+,ens3'\n"))
    assert cfg.egress_masquerade_interfaces == ("eth+", "ens3")


# ------------------------------------------------------------- the ip-masq-agent file


def agent(tmp_path, text=None, name="ip-masq-agent"):
    path = tmp_path / name
    if text is not None:
        path.write_text(textwrap.dedent(text))
    cfg_path = write(tmp_path, f"enable-ip-masq-agent: true\nip-masq-agent-config-path: {path}\n")
    return config.load(cfg_path).masq_agent


def test_agent_missing_file_gives_11_ranges(tmp_path):
    a = agent(tmp_path)
    assert [str(n) for n in a.non_masquerade_cidrs] == DEFAULT_11
    assert a.masq_link_local is False and a.resync_interval == 60.0


@pytest.mark.parametrize("text", ["", "   \n\n", "# only a comment\n"])
def test_agent_empty_file_gives_11_ranges(tmp_path, text):
    assert [str(n) for n in agent(tmp_path, text).non_masquerade_cidrs] == DEFAULT_11


def test_agent_explicit_empty_list_means_none(tmp_path):
    assert agent(tmp_path, "nonMasqueradeCIDRs: []\n").non_masquerade_cidrs == ()


def test_agent_tke_configmap(tmp_path):
    a = agent(tmp_path, """
        nonMasqueradeCIDRs:
        - 10.0.0.0/16
        - 172.18.0.0/16
        - 192.168.0.0/17
        - fd00::/8
        masqLinkLocal: true
        masqLinkLocalIPv6: true
        resyncInterval: 1m30s
        cidrLimit: 64
    """)
    assert [str(n) for n in a.non_masquerade_cidrs] == ["10.0.0.0/16", "172.18.0.0/16", "192.168.0.0/17", "fd00::/8"]
    assert a.masq_link_local and a.masq_link_local_ipv6
    assert a.resync_interval == 90.0 and a.cidr_limit == 64


def test_agent_json_and_configmap_directory(tmp_path):
    mount = tmp_path / "mount"
    mount.mkdir()
    (mount / "config").write_text('{"nonMasqueradeCIDRs": ["10.0.0.0/16"], "masqLinkLocal": false}')
    cfg = config.load(write(tmp_path, f"enable-ip-masq-agent: true\nip-masq-agent-config-path: {mount}\n"))
    assert [str(n) for n in cfg.masq_agent.non_masquerade_cidrs] == ["10.0.0.0/16"]


@pytest.mark.parametrize("text, expected", [
    ("nonMasqueradeCIDRs: 10.0.0.0/8\n", "expected a list of CIDRs"),
    ("nonMasqueradeCIDRs: [10.0.0.1/8]\n", "did you mean 10.0.0.0/8?"),
    ("masqLinkLocal: sometimes\n", "expected true or false"),
    ("resyncInterval: soon\n", "is not a duration like 60s"),
    ("cidrLimit: -1\n", "expected a non-negative integer"),
])
def test_agent_errors(tmp_path, text, expected):
    with pytest.raises(ConfigError) as exc:
        agent(tmp_path, text)
    assert expected in str(exc.value) and "ip-masq-agent" in str(exc.value)


def test_agent_unknown_key_is_a_warning_with_a_hint(tmp_path):
    """ip-masq-agent ignores keys it does not know: so does this tool, but it says so."""
    path = tmp_path / "ip-masq-agent"
    path.write_text("nonMasqueradeCIDR: []\n")
    cfg = config.load(write(tmp_path, f"enable-ip-masq-agent: true\nip-masq-agent-config-path: {path}\n"))
    assert [str(n) for n in cfg.masq_agent.non_masquerade_cidrs] == DEFAULT_11
    assert [w.kind for w in cfg.warnings] == ["unknown-key"]
    assert "unknown key 'nonMasqueradeCIDR' (did you mean 'nonMasqueradeCIDRs'?) ignored" in cfg.warnings[0].text
    assert str(path) in cfg.warnings[0].text


def test_agent_file_not_read_unless_enabled(tmp_path):
    (tmp_path / "broken").write_text("nonsense: [")
    cfg = config.load(write(tmp_path, f"ip-masq-agent-config-path: {tmp_path / 'broken'}\n"))
    assert cfg.masq_agent is None


# ------------------------------------------------------------- many networks at once

v4_network = st.builds(lambda a, n: ipaddress.ip_network(f"{a}/{n}", strict=False), st.ip_addresses(v=4), st.integers(0, 32))
v6_network = st.builds(lambda a, n: ipaddress.ip_network(f"{a}/{n}", strict=False), st.ip_addresses(v=6), st.integers(0, 128))
network_text = st.one_of(
    v4_network.map(str), v4_network.map(str), v6_network.map(str), v6_network.map(lambda n: n.exploded.upper()),
    st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(), st.integers(0, 129)),  # host bits, too long
    st.sampled_from(["10.0.0.0/08", " 10.0.0.0/8", "10.0.0.0/8 ", "010.0.0.0/8", "10.0.0.0", "10.0.0.0/8\n10.1.0.0/16",
                     "fe80::/10%eth0", "", "x", "10.0.0.0/255.0.0.0", "::ffff:10.0.0.0/104"]),
    st.sampled_from([7, None, True, 1.5, ["10.0.0.0/8"]]),
)


def networks_one_by_one(value, where, family):
    """config.parse_networks as it was: each item on its own."""
    try:
        return tuple(config.parse_network(item, where, family) for item in config._as_list(value, where))
    except ConfigError as exc:
        return str(exc)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.lists(network_text, max_size=6), st.lists(network_text, max_size=4).map(
    lambda items: ", ".join(map(str, items)))), st.sampled_from([4, 6, None]))
def test_parse_networks_agrees_with_one_by_one(value, family):
    where = "key 'k' in f.yaml"
    want = networks_one_by_one(value, where, family)
    for batch_min in (2, config.BATCH_MIN_ITEMS):
        with mock.patch.object(config.values, "BATCH_MIN_ITEMS", batch_min):
            try:
                got = config.parse_networks(value, where, family)
            except ConfigError as exc:
                got = str(exc)
        assert got == want


def test_parse_networks_many():
    texts = [str(n) for n in ipaddress.ip_network("20.0.0.0/12").subnets(new_prefix=24)]
    got = config.parse_networks(texts, "w", 4)
    assert [str(p) for p in got] == texts and isinstance(got, tuple)
    assert config.parse_networks(texts, "w", None) == got
    with pytest.raises(ConfigError, match="'20.0.1.1/24' has host bits set; did you mean 20.0.1.0/24"):
        config.parse_networks(texts[:1] + ["20.0.1.1/24"] + texts[2:], "w", 4)
    with pytest.raises(ConfigError, match="is IPv6, expected an IPv4 CIDR"):
        config.parse_networks(texts + ["fd00::/8"], "w", 4)
