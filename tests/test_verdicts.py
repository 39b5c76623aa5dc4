"""Exceptions and masquerade-only, the pure half (no root): the LPM verdict table resolved in the plan, the new
keys' errors, and the SNAT rules each netfilter backend renders."""

from __future__ import annotations

import ipaddress
import random

import pytest

from ipmasq_legacy import config, plan, verdicts
from ipmasq_legacy.backends import iptables as ipt
from ipmasq_legacy.backends import nftables as nft
from ipmasq_legacy.errors import ConfigError
from ipmasq_legacy.prefixes import Prefix, parse


def build(tmp_path, cfg: dict, agent: str | None = None):
    import yaml

    if agent is not None:
        (tmp_path / "agent").write_text(agent)
        cfg = {**cfg, "enable-ip-masq-agent": True, "ip-masq-agent-config-path": str(tmp_path / "agent")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return plan.build(config.load(str(tmp_path / "c.yaml")))


def lpm_exempt(address: int, family: int, exempt, force) -> bool:
    """By hand: the longest prefix holding the address decides; none: masqueraded."""
    best = None
    for p, verdict in [(p, True) for p in exempt + [verdicts.MULTICAST[family]]] + [(p, False) for p in force]:
        if p.version == family and p.value <= address <= p.last and (best is None or p.length > best[0]):
            best = (p.length, verdict)
    return best is not None and best[1]


@pytest.mark.parametrize("family", [4, 6])
def test_resolution_is_longest_prefix_match(family):
    rng = random.Random(17 + family)
    bits = 32 if family == 4 else 128
    for _ in range(300):
        exempt, force = [], []
        for _ in range(rng.randint(0, 9)):
            length = rng.randint(0, 12)
            prefix = Prefix(family, rng.getrandbits(length) << (bits - length) if length else 0, length)
            (exempt if rng.random() < 0.5 else force).append(prefix)
        mc = verdicts.MULTICAST[family]
        force = [p for p in force if p not in exempt and not (p.length >= mc.length and p.value >> (bits - mc.length)
                                                                == mc.value >> (bits - mc.length))]
        out = verdicts.resolve(family, [("e", exempt)], [("f", force)])
        nets = [ipaddress.ip_network(str(p)) for p in out]
        assert nets == list(ipaddress.collapse_addresses(nets))  # disjoint, merged, sorted
        probes = {rng.getrandbits(bits) for _ in range(40)}
        for p in exempt + force + [mc]:  # every boundary, and one step outside it
            probes |= {p.value, p.last, max(0, p.value - 1), min(2**bits - 1, p.last + 1)}
        for address in probes:
            inside = any(p.value <= address <= p.last for p in out)
            assert inside == lpm_exempt(address, family, exempt, force), (exempt, force, hex(address))


def test_without_exceptions_it_is_plain_normalising():
    exempt = [parse(p) for p in ("10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8", "240.0.0.0/4")]
    assert [str(p) for p in verdicts.resolve(4, [("e", exempt)], [])] == ["10.0.0.0/7", "224.0.0.0/3"]


def test_issue_61_exception_inside_exempt(tmp_path):
    fp = build(tmp_path, {"ipv4-native-routing-cidr": "10.0.0.0/8", "force-masquerade-cidrs": "10.100.10.0/24",
                          "enable-ipv6-masquerade": False}).family(4)
    exempt = [ipaddress.ip_network(p) for p in fp.exempt]
    assert ipaddress.ip_address("10.100.10.0") not in exempt[0] and not any(
        ipaddress.ip_address(a) in n for a in ("10.100.10.0", "10.100.10.255") for n in exempt)
    assert all(any(ipaddress.ip_address(a) in n for n in exempt) for a in ("10.100.9.255", "10.100.11.0", "10.0.0.0"))
    assert len(fp.exempt) == 17  # 10.0.0.0/8 minus a /24: 16 prefixes, and multicast


def test_pr_68_ambiguity_is_resolved_by_length(tmp_path):
    """The case ip-masq-agent PR #68 was stopped on: nested lists on both sides."""
    fp = build(tmp_path, {"force-masquerade-cidrs": ["10.0.0.0/16", "10.0.0.0/24"], "enable-ipv6-masquerade": False},
               agent="nonMasqueradeCIDRs: [10.0.0.0/8, 10.0.0.0/20]\nmasqLinkLocal: true\n").family(4)
    exempt = [ipaddress.ip_network(p) for p in fp.exempt]

    def is_exempt(a: str) -> bool:
        return any(ipaddress.ip_address(a) in n for n in exempt)

    assert is_exempt("10.1.0.0") and not is_exempt("10.0.16.0")  # /8 vs /16
    assert is_exempt("10.0.1.0") and is_exempt("10.0.15.255")  # /20 inside the /16
    assert not is_exempt("10.0.0.0") and not is_exempt("10.0.0.255")  # /24 inside the /20


def test_masquerade_only_mode(tmp_path):
    p = build(tmp_path, {"masquerade-only-cidrs": ["203.0.113.0/24", "2001:db8:21::/48"],
                         "ipv4-native-routing-cidr": "203.0.113.128/25"})
    v4 = [ipaddress.ip_network(x) for x in p.family(4).exempt]
    assert not any(ipaddress.ip_address("203.0.113.5") in n for n in v4)
    assert any(ipaddress.ip_address("203.0.113.200") in n for n in v4)  # exempt inside: longer wins
    assert any(ipaddress.ip_address("8.8.8.8") in n for n in v4)
    v6 = [ipaddress.ip_network(x) for x in p.family(6).exempt]
    assert not any(ipaddress.ip_address("2001:db8:21::1") in n for n in v6)
    assert any(ipaddress.ip_address("2001:db8:20::1") in n for n in v6)
    # IPv4-only list: IPv6 is masquerade-only too, with nothing listed
    p = build(tmp_path, {"masquerade-only-cidrs": "203.0.113.0/24"})
    assert p.family(6).exempt == ("::/0",)


@pytest.mark.parametrize("cfg,agent,words", [
    ({"ipv4-native-routing-cidr": "10.0.0.0/8", "force-masquerade-cidrs": "10.0.0.0/8"}, None,
     ["'force-masquerade-cidrs'", "10.0.0.0/8", "ipv4-native-routing-cidr"]),
    ({"force-masquerade-cidrs": "169.254.0.0/16"}, "",
     ["'force-masquerade-cidrs'", "169.254.0.0/16", "masqLinkLocal"]),
    ({"ipv4-pod-cidr": "10.244.0.0/16", "masquerade-only-cidrs": "10.244.0.0/16"}, None,
     ["'masquerade-only-cidrs'", "10.244.0.0/16", "ipv4-pod-cidr"]),
    ({"force-masquerade-cidrs": "239.255.0.0/16"}, None, ["multicast", "239.255.0.0/16", "224.0.0.0/4"]),
    ({"masquerade-only-cidrs": "ff02::/16"}, None, ["multicast", "ff02::/16", "ff00::/8"]),
    ({"masquerade-only-cidrs": "0.0.0.0/0"}, None, ["'masquerade-only-cidrs'", "0.0.0.0/0"]),
    ({"egress-masquerade-addresses": {"ens3": "172.22.0.9"}, "egress-masquerade-interfaces": "eth+"}, None,
     ["egress-masquerade-addresses", "'ens3'", "eth+"]),
    ({"egress-masquerade-addresses": {"l+": "172.22.0.9"}}, None, ["egress-masquerade-addresses", "lo"]),
])
def test_ambiguous_configs_are_one_line_errors(tmp_path, cfg, agent, words):
    with pytest.raises(ConfigError) as exc:
        build(tmp_path, cfg, agent)
    text = str(exc.value)
    assert "\n" not in text and all(w in text for w in words), text


@pytest.mark.parametrize("value,words", [
    ({"eth0": "1.2.3.4/32"}, ["not an IP address"]),
    ({"eth0": ["1.2.3.4", "1.2.3.5"]}, ["two IPv4 addresses"]),
    ({"eth0\n-j ACCEPT": "1.2.3.4"}, ["interface name"]),
    ({"lo": "1.2.3.4"}, ["'lo'"]),
    ({"eth0": "224.0.0.1"}, ["cannot be a source address"]),
    ("eth0", ["INTERFACE=ADDRESS"]),
    ({"eth0": True}, ["got True"]),
])
def test_snat_address_values(value, words):
    with pytest.raises(ConfigError) as exc:
        config.KEYS["egress-masquerade-addresses"][1](value, "key 'egress-masquerade-addresses' in c.yaml")
    assert all(w in str(exc.value) for w in words) and "egress-masquerade-addresses" in str(exc.value)


def test_snat_rules_most_specific_first_in_both_spellings(tmp_path):
    p = build(tmp_path, {"egress-masquerade-interfaces": ["eth+", "ens3"], "masquerade-to-ports": "1024-65535",
                         "egress-masquerade-addresses": "eth+=172.20.0.8,eth0=172.20.0.9,eth0=fd00:20::9"})
    fp4, fp6 = p.family(4), p.family(6)
    assert fp4.snat == (("eth0", "172.20.0.9"), ("eth+", "172.20.0.8")) and fp6.snat == (("eth0", "fd00:20::9"),)
    rules4 = ipt.chain_rules(fp4, bridged=False)
    first = next(i for i, r in enumerate(rules4) if "SNAT" in r)
    assert rules4[first:first + 2] == [
        "-A IPMASQ-LEGACY -o eth0 -p tcp -j SNAT --to-source 172.20.0.9:1024-65535",
        "-A IPMASQ-LEGACY -o eth0 -p udp -j SNAT --to-source 172.20.0.9:1024-65535",
    ]
    assert rules4[first + 2] == "-A IPMASQ-LEGACY -o eth0 -j SNAT --to-source 172.20.0.9"
    assert rules4[first + 5] == "-A IPMASQ-LEGACY -o eth+ -j SNAT --to-source 172.20.0.8"
    assert rules4[-1] == "-A IPMASQ-LEGACY -o ens3 -j MASQUERADE"
    rules6 = ipt.chain_rules(fp6, bridged=False)
    assert "-A IPMASQ-LEGACY -o eth0 -p tcp -j SNAT --to-source [fd00:20::9]:1024-65535" in rules6
    assert "-A IPMASQ-LEGACY -o eth0 -j SNAT --to-source fd00:20::9" in rules6
    nft6 = nft.chain_rules(fp6)
    assert 'oifname "eth0" meta l4proto tcp counter snat to [fd00:20::9]:1024-65535' in nft6
    assert 'oifname "eth0" counter snat to fd00:20::9' in nft6
    assert 'oifname "eth*" counter snat to 172.20.0.8' in nft.chain_rules(fp4)
    # the plan's digest (state, content-addressed names) changes with the address
    other = build(tmp_path, {"egress-masquerade-interfaces": ["eth+", "ens3"], "masquerade-to-ports": "1024-65535",
                             "egress-masquerade-addresses": "eth+=172.20.0.8,eth0=172.20.0.10"})
    assert other.family(4).digest() != fp4.digest()


def test_snat_missing_addresses_are_named():
    from ipmasq_legacy import snat

    held = {"eth0": {ipaddress.ip_address("172.20.0.1")}, "eth1": {ipaddress.ip_address("172.21.0.9")}}
    wanted = [[4, "eth+", "172.21.0.9"], [4, "eth0", "172.21.0.9"]]
    assert snat.missing(wanted, held) == [
        "ipv4: SNAT address 172.21.0.9 is on no link matching eth0 (egress-masquerade-addresses)"]
    assert snat.missing([], None) == []  # nothing configured: no netlink read at all
