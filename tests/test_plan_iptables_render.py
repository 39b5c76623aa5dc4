"""The pure half: config -> plan -> iptables-restore text. Golden renders for the seeds' examples."""

from __future__ import annotations

import ipaddress
import textwrap

from hypothesis import given, settings
from hypothesis import strategies as st

from ipmasq_legacy import config, plan
from ipmasq_legacy.backends import iptables as ipt

MC4, MC6 = "224.0.0.0/4", "ff00::/8"  # multicast: exempt whatever the config (README "The decision")


def build(tmp_path, text, agent_text=None):
    cfg_text = textwrap.dedent(text)
    if agent_text is not None:
        agent_path = tmp_path / "ip-masq-agent"
        agent_path.write_text(textwrap.dedent(agent_text))
        cfg_text += f"enable-ip-masq-agent: true\nip-masq-agent-config-path: {agent_path}\n"
    path = tmp_path / "config.yaml"
    path.write_text(cfg_text)
    return plan.build(config.load(str(path)))


def test_normalise_merges_duplicates_contained_and_adjacent():
    assert plan.normalise(["10.0.0.0/8", "10.1.0.0/16", "10.0.0.0/8", "12.0.0.0/8", "fd00::/8", "fd00:1::/32"]) == (
        "10.0.0.0/8", "12.0.0.0/8", "fd00::/8",
    )
    assert plan.normalise(["10.0.0.0/8", "11.0.0.0/8"]) == ("10.0.0.0/7",)


def test_tke_configmap_golden(tmp_path):
    p = build(tmp_path, "enable-ipv6-masquerade: false\n", agent_text="""
        nonMasqueradeCIDRs:
        - 10.0.0.0/16
        - 172.18.0.0/16
        - 192.168.0.0/17
        masqLinkLocal: true
    """)
    fp = p.family(4)
    assert p.family(6) is None
    assert fp.exempt == ("10.0.0.0/16", "172.18.0.0/16", "192.168.0.0/17", MC4)
    name = ipt.set_name(fp)
    assert ipt.render_set(fp) == textwrap.dedent(f"""\
        create {name} hash:net family inet hashsize 1024 maxelem 65536
        add {name} 10.0.0.0/16
        add {name} 172.18.0.0/16
        add {name} 192.168.0.0/17
        add {name} 224.0.0.0/4
    """)
    assert ipt.render_restore(fp, bridged=True) == textwrap.dedent(f"""\
        *mangle
        :IPMASQ-LEGACY-IN - [0:0]
        -A IPMASQ-LEGACY-IN -m conntrack --ctstate NEW -m addrtype --dst-type LOCAL -j CONNMARK --set-xmark 0x200000/0x200000
        -A PREROUTING -m comment --comment "ipmasq-legacy: mark connections to the node" -j IPMASQ-LEGACY-IN
        COMMIT
        *nat
        :IPMASQ-LEGACY - [0:0]
        -A IPMASQ-LEGACY -m physdev --physdev-is-bridged -j RETURN
        -A IPMASQ-LEGACY -m connmark --mark 0x200000/0x200000 -j RETURN
        -A IPMASQ-LEGACY -m addrtype --dst-type LOCAL -j RETURN
        -A IPMASQ-LEGACY -m set --match-set {name} dst -j RETURN
        -A IPMASQ-LEGACY ! -o lo -j MASQUERADE
        -A POSTROUTING -m comment --comment "ipmasq-legacy: masquerade pod egress" -j IPMASQ-LEGACY
        COMMIT
    """)


def test_empty_agent_file_gives_11_ranges_plus_link_local(tmp_path):
    p = build(tmp_path, "", agent_text="")
    assert p.family(4).exempt == (
        "10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24",
        "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
        "224.0.0.0/3",  # 240.0.0.0/4 and multicast, merged
    )
    assert p.family(6).exempt == ("fe80::/10", MC6)


def test_masq_link_local_ipv6_drops_fe80(tmp_path):
    p = build(tmp_path, "", agent_text="nonMasqueradeCIDRs: [fd00::/8]\nmasqLinkLocalIPv6: true\n")
    assert p.family(6).exempt == ("fd00::/8", MC6)
    assert "169.254.0.0/16" in p.family(4).exempt


def test_eth_plus_interfaces_and_native_routing_golden(tmp_path):
    p = build(tmp_path, """
        egress-masquerade-interfaces: [eth+, ens3]
        ipv4-native-routing-cidr: 10.0.0.0/8
        ipv4-pod-cidr: 10.244.0.0/16
        enable-ipv6-masquerade: false
        iptables-random-fully: true
    """)
    fp = p.family(4)
    assert fp.exempt == ("10.0.0.0/8", MC4)  # native routing replaces the pod cidr as exemption
    assert ipt.chain_rules(fp, bridged=False)[4:] == [
        "-A IPMASQ-LEGACY -s 10.244.0.0/16 -o eth+ -j MASQUERADE --random-fully",
        "-A IPMASQ-LEGACY -s 10.244.0.0/16 -o ens3 -j MASQUERADE --random-fully",
    ]


def test_pod_cidr_exempt_without_native_routing(tmp_path):
    p = build(tmp_path, "ipv4-pod-cidr: 10.244.0.0/16\nipv6-pod-cidr: fd00:244::/48\n")
    assert p.family(4).exempt == ("10.244.0.0/16", MC4)
    assert p.family(6).sources == ("fd00:244::/48",)


def test_to_ports_split_by_protocol_and_range_size(tmp_path):
    p = build(tmp_path, "masquerade-to-ports: 1024-29999,32768-65535\nenable-ipv6-masquerade: false\n")
    rules = ipt.chain_rules(p.family(4), bridged=False)[4:]  # after the set rule (multicast)
    assert rules[0] == ("-A IPMASQ-LEGACY ! -o lo -p tcp -m statistic --mode random --probability 0.46929256292"
                        " -j MASQUERADE --to-ports 1024-29999")
    assert rules[1] == "-A IPMASQ-LEGACY ! -o lo -p tcp -j MASQUERADE --to-ports 32768-65535"
    assert rules[2].startswith("-A IPMASQ-LEGACY ! -o lo -p udp -m statistic")
    assert rules[-1] == "-A IPMASQ-LEGACY ! -o lo -j MASQUERADE"


def test_two_slots_per_family_and_a_content_name_for_the_fallback(tmp_path):
    a = build(tmp_path, "ipv4-native-routing-cidr: 10.0.0.0/8\n").family(4)
    b = build(tmp_path, "ipv4-native-routing-cidr: 10.0.0.0/8\negress-masquerade-interfaces: eth0\n").family(4)
    c = build(tmp_path, "ipv4-native-routing-cidr: 10.0.0.0/9\n").family(4)
    assert ipt.set_name(a) == ipt.set_name(c) == "ipmasq4-a"
    assert ipt.set_name(a, "ipmasq4-b") == "ipmasq4-b"
    assert ipt.ipsets.SLOTS[6] == ("ipmasq6-a", "ipmasq6-b")
    assert ipt.content_name(a) == ipt.content_name(b) != ipt.content_name(c)
    assert len(ipt.content_name(a) + "-tmp") <= 31  # ipset's name limit
    # ours: the slots and content-named sets; a look-alike is someone else's
    assert [ipt.ipsets.ours(n, 4) for n in ("ipmasq4-a", ipt.content_name(a), "ipmasq4-c", "ipmasq4-foo",
                                            "ipmasq6-a")] == [True, True, False, False, False]
    assert "--match-set ipmasq4-b dst" in ipt.chain_rules(a, bridged=False, exempt_set="ipmasq4-b")[3]


def test_set_patch_is_the_difference_deletions_first():
    add, delete = ipt.ipsets.difference(("10.0.0.0/8", "fd00::/8", "2001:db8::1/128"),
                                        ["10.0.0.0/8", "11.0.0.0/8", "fd00:0::/8", "2001:db8::1/128"])
    assert (add, delete) == (["11.0.0.0/8"], [])  # fd00:0::/8 is fd00::/8, spelled otherwise
    assert ipt.ipsets.render_patch("ipmasq4-b", ["11.0.0.0/8"], ["12.0.0.0/8"]) == (
        "del ipmasq4-b 12.0.0.0/8\nadd ipmasq4-b 11.0.0.0/8\n")


def test_set_header_parsed_and_checked():
    head = ipt.ipsets.Head("hash:net", "7", "family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1",
                           600, 1, 3)
    assert head.fits(4, 65536) and not head.fits(4, 65537) and not head.fits(6, 1)
    assert head.identity() == ["hash:net", "7", head.header, 600, 3]  # references left out


def test_slash_zero_is_split_for_hash_net(tmp_path):
    fp = build(tmp_path, "ipv4-native-routing-cidr: 0.0.0.0/0\n").family(4)
    assert ipt.set_members(fp) == ["0.0.0.0/1", "128.0.0.0/1"]


def test_restore_replaces_stale_jumps_once(tmp_path):
    fp = build(tmp_path, "").family(4)
    old = '-A POSTROUTING -m comment --comment "ipmasq-legacy v0" -j IPMASQ-LEGACY'
    text = ipt.render_restore(fp, [old, old], bridged=False)
    assert text.count("-D POSTROUTING") == 2
    assert text.count("-A POSTROUTING") == 1
    assert "-A POSTROUTING" not in ipt.render_restore(fp, [ipt.SHAPES["jump"]], bridged=False)


def test_bridged_return_only_where_br_netfilter_is_loaded(tmp_path):
    """The physdev match would load br_netfilter (and send every bridged frame of the node
    through iptables): rendered only where it is loaded already."""
    fp = build(tmp_path, "").family(4)
    bridged = ipt.SHAPES["rules"]["bridged"]
    assert bridged in ipt.chain_rules(fp, bridged=True) and bridged not in ipt.chain_rules(fp, bridged=False)


def test_large_prefix_list_sizes_the_set(tmp_path):
    prefixes = [f"10.{i // 256}.{i % 256}.0/24" for i in range(0, 20000, 2)]
    fp = plan.FamilyPlan(family=4, interfaces=(), sources=(), exempt=plan.normalise(prefixes))
    first = ipt.render_set(fp).splitlines()[0]
    assert "maxelem 65536" in first and "hashsize 4096" in first
    # room to grow: a full set refuses a patch's adds
    fp = plan.FamilyPlan(family=4, interfaces=(), sources=(), exempt=tuple(f"10.{i // 256}.{i % 256}.0/24"
                                                                            for i in range(0, 80000, 2)))
    assert "maxelem 131072" in ipt.render_set(fp).splitlines()[0]
    assert len(ipt.chain_rules(fp, bridged=False)) == 5  # one set lookup, not one rule per prefix


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([4, 6]), st.integers(0, 2**16 - 1), st.integers(0, 16)), max_size=60))
def test_normalise_equals_collapse_addresses(items):
    """The integer merge gives exactly what ipaddress.collapse_addresses gives, per family."""
    nets = []
    for family, bits16, plen16 in items:
        bits = 32 if family == 4 else 128
        plen = bits - 16 + plen16 if plen16 else 0
        addr = (bits16 << (bits - 16)) >> (bits - plen) << (bits - plen) if plen else 0
        nets.append(ipaddress.ip_network((addr, plen)))
    want = [str(n) for f in (4, 6) for n in ipaddress.collapse_addresses(x for x in nets if x.version == f)]
    assert list(plan.normalise(nets)) == want


def test_set_record_vouches_only_while_the_header_is_unchanged(tmp_path, monkeypatch):
    """apply's record of what the slots hold (backends/ipsets.py): trusted for a slot whose
    `ipset list -t` header is what it was after the write, forgotten before a write."""
    monkeypatch.setenv("IPMASQ_STATE_DIR", str(tmp_path))
    ipsets = ipt.ipsets
    head = ipsets.Head("hash:net", "7", "family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1", 600, 0, 2)
    record = ipsets.Record()
    record.keep(4, ("10.0.0.0/8", "11.0.0.0/8"), {"ipmasq4-a": head, "ipmasq4-b": head})
    again = ipsets.Record()
    assert again.members(4, "ipmasq4-b", head) == ("10.0.0.0/8", "11.0.0.0/8")
    assert again.members(4, "ipmasq4-a", ipsets.Head(*head.identity()[:4], 1, 2)) is not None  # a reference more
    assert again.members(4, "ipmasq4-a", ipsets.Head(*head.identity()[:3], 640, 0, 2)) is None  # the size moved
    assert again.members(4, "ipmasq4-a", None) is None  # gone
    again.forget(4, "ipmasq4-b")
    assert ipsets.Record().members(4, "ipmasq4-b", head) is None
    assert ipsets.Record().members(4, "ipmasq4-a", head) is not None
    (tmp_path / "ipsets-exempt4.txt").write_text("12.0.0.0/8")  # the list no longer the one recorded
    assert ipsets.Record().members(4, "ipmasq4-a", head) is None
