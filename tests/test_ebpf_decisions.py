"""The ebpf backend's decisions, without root: the real EbpfBackend, the real BPF object
(ipmasq_legacy/bpf/masq.o, parsed, never loaded) and real Plans against FakeBpf
(tests/fakes/ebpf.py: pinned maps, programs, links, clsact and tc filters, with
FakeNft's tables and FakeIptables' chains) behind the kernel seam. Each test asserts
the state a verb left (the fake's canonical dump, the maps' generations, the filters),
not the calls it made. What only packets prove stays in test_ebpf.py and
test_ebpf_fast.py (namespaces).
"""

from __future__ import annotations

import errno
import struct
import time
from pathlib import Path

import pytest

from ipmasq_legacy import config, kernel, state
from ipmasq_legacy import plan as planmod
from ipmasq_legacy.backends.ebpf import EbpfBackend
from ipmasq_legacy.backends.ebpf.layout import CFG, F_DRAIN, NAT_KEY, NAT_VAL
from ipmasq_legacy.backends.ebpf.links import IF_DRAIN, IFACE
from ipmasq_legacy.errors import ApplyError
from ipmasq_legacy.plan import Plan
from tests.fakes.ebpf import FakeBpf

needs_object = pytest.mark.skipif(not Path(__file__).parent.parent.joinpath("ipmasq_legacy/bpf/masq.o").exists(),
                                  reason="the BPF object is not built (scripts/setup)")
pytestmark = needs_object

BASE = "egress-masquerade-interfaces: [eth+]\nipv4-pod-cidr: 10.244.0.0/16\n"
OLD = BASE + "ipv4-native-routing-cidr: [10.0.0.0/8, 172.16.0.0/12]\n"
NEW = BASE + "ipv4-native-routing-cidr: [10.0.0.0/8, 192.168.0.0/16]\n"
OLD4 = ["10.0.0.0/8", "172.16.0.0/12", "224.0.0.0/4"]
NEW4 = ["10.0.0.0/8", "192.168.0.0/16", "224.0.0.0/4"]
PIN = "/sys/fs/bpf/ipmasq_legacy"


def plan_of(directory: Path, text: str, name: str = "config") -> Plan:
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return planmod.build(config.load(str(path)))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """FakeBpf as the current kernel: lo, eth0 (IPv4 and IPv6), eth1 (IPv4)."""
    monkeypatch.setenv("IPMASQ_STATE_DIR", str(tmp_path / "state"))
    for var in ("IPMASQ_BPF_DIR", "IPMASQ_BPF_OBJECT", "IPMASQ_BPF_DRAIN_IDLE"):
        monkeypatch.delenv(var, raising=False)
    f = FakeBpf()
    f.add_link("eth0", ["192.0.2.10/24", "2001:db8::10/64"])
    f.add_link("eth1", ["198.51.100.10/24"])
    with kernel.use(f):
        yield f


@pytest.fixture
def old(tmp_path) -> Plan:
    return plan_of(tmp_path, OLD, "old")


@pytest.fixture
def new(tmp_path) -> Plan:
    return plan_of(tmp_path, NEW, "new")


def canonical(fake: FakeBpf) -> str:
    """The dump with the object's digest (in filter names, meta and cfg) spelled out."""
    digest = EbpfBackend().obj().digest
    return fake.dump().replace(digest, "<object>").replace(digest[:12], "<object12>")


def ours(fake: FakeBpf, link: str) -> dict[str, list[str]]:
    index = fake.index(link)
    return {hook: [f.name for f in fake.filters.get((index, hook), [])] for hook in ("ingress", "egress")}


def live_trie(fake: FakeBpf, name: str) -> list[str]:
    return fake.trie(name, fake.live_gen())


# ---------------------------------------------------------------- cold apply


def test_cold_apply_pins_maps_programs_and_attaches_to_matched_links(fake, old):
    out = EbpfBackend().apply(old)
    assert out == ["ipv4 installed: tc on 2 interfaces, 3 exempt prefixes",
                   "ipv6 installed: tc on 2 interfaces, 1 exempt prefixes"]
    dump = canonical(fake)
    for name in ("cfg", "ctl", "exempt4", "exempt6", "src4", "src6", "ports", "portidx", "ifaces", "local4",
                 "local6", "nat_fwd", "nat_rev", "meta", "owned"):
        assert f"map {name}: " in dump
    for hook in ("egress", "ingress", "nf", "guard"):
        assert f"prog prog_{hook}: " in dump
    assert ("link 2 eth0 192.0.2.10/24 2001:db8::10/64 clsact\n"
            "  ingress pref 49152 handle 1 bpf ipmasq_legacy/ingress/<object12> prog prog_ingress\n"
            "  egress pref 49152 handle 1 bpf ipmasq_legacy/egress/<object12> prog prog_egress\n") in dump
    assert "link 1 lo 127.0.0.1/8 ::1/128\n" in dump  # lo is never matched
    assert "table inet ipmasq_legacy_ebpf {" in dump  # the conntrack keeper
    assert f"-A IPMASQ-EBPF -o eth+ -m bpf --object-pinned {PIN}/prog_nf -j MASQUERADE" in dump
    assert fake.open_fds() == []


def test_cold_apply_writes_both_generations_and_goes_live(fake, old):
    EbpfBackend().apply(old)
    assert fake.live_gen() == 1  # the idle generation (1) written, then flipped to
    cfg = fake.map("cfg").data
    assert cfg[struct.pack("=I", 0)] == cfg[struct.pack("=I", 1)]  # the first install mirrors it
    for gen in (0, 1):
        assert fake.trie("exempt4", gen) == OLD4
        assert fake.trie("src4", gen) == ["10.244.0.0/16"]
        assert fake.trie("exempt6", gen) == ["ff00::/8"]
        assert fake.trie("src6", gen) == []


def test_node_facts_written(fake, old):
    EbpfBackend().apply(old)
    local4 = sorted(fake.map("local4").data)
    assert local4 == sorted(bytes(map(int, a.split("."))) for a in ("127.0.0.1", "192.0.2.10", "198.51.100.10"))
    a4, _a6, flags, l2len = IFACE.unpack(fake.map("ifaces").data[struct.pack("=I", fake.index("eth0"))])
    assert a4 == bytes([192, 0, 2, 10]) and flags & 0x0B == 0x0B and l2len == 14  # v4, v6, attached
    owned = sorted(struct.unpack("=I", k)[0] for k in fake.map("owned").data)
    assert owned == [fake.index("eth0"), fake.index("eth1")]  # we added their clsact qdiscs


def test_noop_reapply_writes_nothing(fake, old):
    backend = EbpfBackend()
    backend.apply(old)
    before, writes, tc, calls = canonical(fake), fake.writes, len(fake.tc_log), len(fake.calls)
    assert backend.drift(old) == []
    assert backend.apply(old) == []
    assert canonical(fake) == before
    assert fake.writes == writes and len(fake.tc_log) == tc
    assert not [c for c in fake.calls[calls:] if c[0] == "nft" or c[0].endswith("-restore")]
    assert fake.open_fds() == []


def test_live_reports_what_is_installed(fake, old):
    backend = EbpfBackend()
    backend.apply(old)
    live = backend.live()
    v4 = live.families[4]
    assert v4.installed and tuple(v4.exempt) == tuple(sorted(OLD4))
    assert sorted(v4.rules) == sorted(f"tc {hook} {link}: bpf da ipmasq_legacy/{hook}/{backend.obj().digest[:12]}"
                                      for link in ("eth0", "eth1") for hook in ("ingress", "egress"))
    assert backend.drift(old, live) == []


# ---------------------------------------------------------------- a changed decision


def test_exempt_change_switches_generation(fake, old, new):
    backend = EbpfBackend()
    backend.apply(old)
    assert backend.drift(new) == ["exempt or source prefixes differ"]
    out = backend.apply(new)
    assert out[0].startswith("ipv4 updated (exempt or source prefixes differ)")
    assert fake.live_gen() == 0
    assert fake.trie("exempt4", 0) == NEW4
    assert fake.trie("exempt4", 1) == OLD4  # the old generation left as it was
    assert backend.drift(new) == []
    assert backend.drift(old) == ["exempt or source prefixes differ"]


def test_exempt_change_is_old_or_new_at_every_step(fake, old, new):
    backend = EbpfBackend()
    backend.apply(old)
    seen = []

    def check(f: FakeBpf) -> None:
        live = live_trie(f, "exempt4")
        assert live in (OLD4, NEW4), live
        seen.append(tuple(live))

    fake.on_write.append(check)
    backend.apply(new)
    backend.apply(old)
    assert seen[0] == tuple(OLD4) and seen[-1] == tuple(OLD4) and tuple(NEW4) in seen


def test_exempt_change_writes_only_what_differs(fake, old, new):
    backend = EbpfBackend()
    backend.apply(old)
    backend.apply(new)  # generation 0 now NEW, 1 OLD
    writes = len(fake.written)
    backend.apply(old)  # generation 1 holds OLD already: its cfg, then ctl; no trie, no port
    assert fake.live_gen() == 1
    assert {"ipmq_cfg", "ipmq_ctl"} <= set(fake.written[writes:])
    assert not set(fake.written[writes:]) & {"ipmq_exempt4", "ipmq_exempt6", "ipmq_src4", "ipmq_src6",
                                             "ipmq_ports", "ipmq_portidx"}
    assert fake.trie("exempt4", 1) == OLD4 and fake.trie("exempt4", 0) == NEW4


def test_disabling_ipv6(fake, old, tmp_path):
    backend = EbpfBackend()
    backend.apply(old)
    v4only = plan_of(tmp_path, OLD + "enable-ipv6-masquerade: false\n", "v4")
    out = backend.apply(v4only)
    assert "ipv6 removed (disabled)" in out
    flags = CFG.unpack(fake.map("cfg").data[struct.pack("=I", fake.live_gen())])[0]
    assert flags & 0x01 and not flags & 0x02
    assert live_trie(fake, "exempt6") == []
    assert not backend.live().families[6].installed
    assert backend.drift(v4only) == []


# ---------------------------------------------------------------- drift and its repairs


def test_removed_filter_is_seen_and_repaired(fake, old):
    backend = EbpfBackend()
    backend.apply(old)
    before = ours(fake, "eth1")
    fake.filters[(fake.index("eth1"), "egress")].clear()  # a hand's `tc filter del`
    assert backend.drift(old) == ["eth1: egress not attached"]
    backend.apply(old)
    assert ours(fake, "eth1") == before
    assert live_trie(fake, "exempt4") == OLD4
    assert backend.drift(old) == []


def test_removed_qdisc_is_seen_and_repaired(fake, old):
    backend = EbpfBackend()
    backend.apply(old)
    index = fake.index("eth0")
    fake.clsact.discard(index)
    fake.filters.pop((index, "ingress"))
    fake.filters.pop((index, "egress"))
    assert backend.drift(old) == ["eth0: ingress not attached", "eth0: egress not attached"]
    backend.apply(old)
    assert ours(fake, "eth0")["egress"] and ours(fake, "eth0")["ingress"]
    assert backend.drift(old) == []


def test_hand_edited_live_trie_is_seen_and_repaired(fake, old):
    backend = EbpfBackend()
    backend.apply(old)
    gen = fake.live_gen()
    fake.map("exempt4").data[struct.pack("=IB4s", 8 + 24, gen, bytes([8, 8, 8, 0]))] = b"\x01"
    assert backend.drift(old) == ["ipv4: exempt prefixes in map exempt4 differ"]
    backend.apply(old)
    assert live_trie(fake, "exempt4") == OLD4
    assert backend.drift(old) == []


def test_changed_trie_value_is_seen_and_repaired(fake, old):
    backend = EbpfBackend()
    backend.apply(old)
    trie = fake.map("src4").data
    key = next(k for k in trie if k[4] == fake.live_gen())
    trie[key] = b"\x02"
    assert backend.drift(old) == ["ipv4: sources prefixes in map src4 differ"]
    backend.apply(old)
    assert all(trie[k] == b"\x01" for k in trie if k[4] == fake.live_gen())
    assert backend.drift(old) == []


def test_changed_config_is_seen_and_repaired(fake, old):
    backend = EbpfBackend()
    backend.apply(old)
    key = struct.pack("=I", fake.live_gen())
    right = fake.map("cfg").data[key]
    fake.map("cfg").data[key] = bytes(4) + right[4:]  # flags cleared: nothing masqueraded
    assert "config differs" in backend.drift(old)
    backend.apply(old)
    assert fake.map("cfg").data[struct.pack("=I", fake.live_gen())] == right
    assert backend.drift(old) == []


def test_unpinned_map_is_recreated_and_programs_reloaded(fake, old):
    backend = EbpfBackend()
    backend.apply(old)
    egress_before = fake.filters[(fake.index("eth0"), "egress")][0].prog_id
    del fake.pins[f"{PIN}/exempt4"]
    assert backend.drift(old) == ["map exempt4 missing"]
    backend.apply(old)
    assert live_trie(fake, "exempt4") == OLD4
    egress = fake.filters[(fake.index("eth0"), "egress")][0].prog_id
    assert egress != egress_before  # the old program would go on reading the lost map
    assert canonical(fake).count(" prog prog_egress\n") == 2  # both links run the pinned one
    assert fake.map("exempt4").id in fake.pins[f"{PIN}/prog_egress"].map_ids
    assert backend.drift(old) == []


def test_unpinned_program_is_reloaded(fake, old):
    backend = EbpfBackend()
    backend.apply(old)
    del fake.pins[f"{PIN}/prog_egress"]
    problems = backend.drift(old)
    assert "program egress not loaded" in problems
    backend.apply(old)
    assert f"{PIN}/prog_egress" in fake.pins
    assert backend.drift(old) == []


def test_removed_assist_chain_is_seen_and_repaired(fake, old):
    backend = EbpfBackend()
    backend.apply(old)
    before = canonical(fake).split("-- iptables")[1]
    fake.nets[("nft", 4)].pop("nat")
    assert backend.drift(old) == ["ipv4: netfilter assist chains differ"]
    backend.apply(old)
    assert canonical(fake).split("-- iptables")[1] == before
    assert backend.drift(old) == []


def test_removed_keeper_is_seen_and_repaired(fake, old):
    backend = EbpfBackend()
    backend.apply(old)
    fake.tables.clear()
    assert backend.drift(old) == ["nft table inet ipmasq_legacy_ebpf missing"]
    backend.apply(old)
    assert ("inet", "ipmasq_legacy_ebpf") in fake.tables


# ---------------------------------------------------------------- links come and go (follow)


def test_link_added_is_followed(fake, old):
    backend = EbpfBackend()
    backend.apply(old)
    fake.add_link("eth2", ["203.0.113.10/24"])
    assert backend.drift(old) == ["eth2: ingress not attached", "eth2: egress not attached",
                                  "eth2: address or type changed", "ipv4: node addresses changed"]
    out = backend.follow(old)
    assert "3 interfaces" in out
    assert ours(fake, "eth2") == ours(fake, "eth0")
    assert bytes([203, 0, 113, 10]) in fake.map("local4").data
    assert backend.drift(old) == []
    assert fake.live_gen() == 1  # the decision's generations are not touched


def test_link_removed_is_forgotten(fake, old):
    backend = EbpfBackend()
    backend.apply(old)
    index = fake.index("eth1")
    fake.remove_link("eth1")
    out = backend.follow(old)
    assert "1 deleted links forgotten" in out
    assert struct.pack("=I", index) not in fake.map("ifaces").data
    assert bytes([198, 51, 100, 10]) not in fake.map("local4").data
    assert backend.drift(old) == []


def test_address_change_is_followed(fake, old):
    backend = EbpfBackend()
    backend.apply(old)
    fake.links[fake.index("eth0")].addresses[0] = "192.0.2.99/24"
    assert "eth0: address or type changed" in backend.drift(old)
    backend.follow(old)
    a4 = IFACE.unpack(fake.map("ifaces").data[struct.pack("=I", fake.index("eth0"))])[0]
    assert a4 == bytes([192, 0, 2, 99])
    assert backend.drift(old) == []


def test_follow_does_nothing_when_not_installed(fake, old):
    before = canonical(fake)
    assert EbpfBackend().follow(old) == []
    assert canonical(fake) == before


def test_link_no_longer_matched_is_detached(fake, old, tmp_path):
    backend = EbpfBackend()
    backend.apply(old)
    only_eth0 = plan_of(tmp_path, OLD.replace("[eth+]", "[eth0]"), "eth0")
    assert "eth1: egress runs another program" not in backend.drift(only_eth0)
    backend.apply(only_eth0)
    index = fake.index("eth1")
    assert index not in fake.clsact  # we added it, nobody else uses it
    assert struct.pack("=I", index) not in fake.map("ifaces").data
    assert struct.pack("=I", index) not in fake.map("owned").data
    assert backend.drift(only_eth0) == []


def test_link_no_longer_matched_drains_while_its_flows_are_busy(fake, old, tmp_path):
    backend = EbpfBackend()
    backend.apply(old)
    index = fake.index("eth1")
    seed_flow(fake, index)
    only_eth0 = plan_of(tmp_path, OLD.replace("[eth+]", "[eth0]"), "eth0")
    backend.apply(only_eth0)
    assert IFACE.unpack(fake.map("ifaces").data[struct.pack("=I", index)])[2] & IF_DRAIN
    assert ours(fake, "eth1")["egress"]  # still translating its flows


# ---------------------------------------------------------------- others' filters, remove


def test_foreign_filters_untouched(fake, old):
    fake.seed_filter("eth0", "egress", 1, "cil_to_netdev-eth0")
    fake.seed_filter("eth0", "ingress", 1, "cil_from_netdev-eth0")
    backend = EbpfBackend()
    backend.apply(old)
    index = fake.index("eth0")
    assert [f.name for f in fake.filters[(index, "egress")]][0] == "cil_to_netdev-eth0"
    assert struct.pack("=I", index) not in fake.map("owned").data  # its clsact is not ours
    assert backend.drift(old) == []
    backend.remove()
    assert index in fake.clsact
    assert [f.name for f in fake.filters[(index, "egress")]] == ["cil_to_netdev-eth0"]
    assert [f.name for f in fake.filters[(index, "ingress")]] == ["cil_from_netdev-eth0"]
    assert fake.index("eth1") not in fake.clsact


def test_remove_leaves_nothing_of_ours(fake, old):
    pristine = canonical(fake)
    backend = EbpfBackend()
    backend.apply(old)
    assert backend.remove() == ["ipv4", "ipv6"]
    after = canonical(fake)
    # iptables keeps the tables our chains were in (empty, as on a node)
    assert after.split("-- iptables")[0] == pristine.split("-- iptables")[0]
    assert "IPMASQ" not in after
    assert fake.open_fds() == []
    assert backend.remove() == []  # nothing left to remove
    assert backend.drift(old) == ["not installed"]


def test_switch_away_drains_then_reaps(fake, old, monkeypatch):
    backend = EbpfBackend(another_live=lambda: True)
    backend.apply(old)
    seed_flow(fake, fake.index("eth0"))
    out = backend.remove()
    assert out == ["ipv4 (draining its connections)", "ipv6 (draining its connections)"]
    flags = CFG.unpack(fake.map("cfg").data[struct.pack("=I", fake.live_gen())])[0]
    assert flags & F_DRAIN
    assert live_trie(fake, "exempt4") == OLD4  # the drained flows keep their decision
    assert ours(fake, "eth0")["egress"]
    assert backend.reap() == []  # still busy
    monkeypatch.setenv("IPMASQ_BPF_DRAIN_IDLE", "0")
    assert backend.reap() == ["drained datapath removed"]
    assert not any(p.startswith(PIN) for p in fake.pins) and not fake.clsact
    assert [(f[0], f[1], f[4], f[5]) for f in fake.forgotten] == [(4, 17, 12345, 53)]  # for netfilter to take


def test_take_over_while_netfilter_connections_last(fake, old):
    """netfilter's translated connections (conntrack -L --src-nat): their reply tuples
    are never handed out by us, and its NAT hooks stay (the drain table) until they end."""
    line = ("udp      17 29 src=10.244.0.7 dst=9.9.9.9 sport=5000 dport=53 src=9.9.9.9 dst=192.0.2.10 "
            "sport=53 dport=61000 mark=0 use=1\n")
    fake.tools["conntrack"] = lambda argv, _in: (0, line if "--src-nat" in argv and "ipv4" in argv else "", "")
    state.write("nftables", "nftables x")
    backend = EbpfBackend()
    backend.apply(old)
    assert ("ip", "ipmasq_legacy_drain") in fake.tables
    (key, value), = fake.map("nat_rev").data.items()
    assert NAT_KEY.unpack(key)[2:] == (b"\x00\x35", b"\xee\x48", 17, 4)  # the reply tuple: 53 -> 61000
    assert NAT_VAL.unpack(value)[2] & 0x01  # N_FOREIGN
    assert backend.drift(old) == []
    del fake.tools["conntrack"]  # they ended
    assert backend.drift(old) == ["nft tables ipmasq_legacy_drain: netfilter's connections have ended"]
    backend.apply(old)
    assert ("ip", "ipmasq_legacy_drain") not in fake.tables and backend.drift(old) == []


def test_take_over_from_netfilter_keeps_its_connections_first(fake, old):
    state.write("nftables", "nftables x")
    order = []
    fake.on_write.append(lambda f: order.append(("ip", "ipmasq_legacy_drain") in f.tables))
    EbpfBackend().apply(old)
    assert order and order[0]  # the drain table was there before the first map write
    assert ("ip", "ipmasq_legacy_drain") not in fake.tables  # conntrack holds none of netfilter's: reaped
    committed = [text.split(" {")[0].split("\n")[0] for kind, text in fake.log if kind == "commit"]
    # netfilter's NAT hooks held, the keeper, then (none of netfilter's connections left) released
    assert committed == ["table ip ipmasq_legacy_drain", "add table inet ipmasq_legacy_ebpf",
                         "delete table ip ipmasq_legacy_drain"]


# ---------------------------------------------------------------- failures


def test_failed_idle_write_leaves_the_live_generation(fake, old, new):
    backend = EbpfBackend()
    backend.apply(old)
    fake.fail_bpf("update_many", errno.ENOMEM, map="ipmq_exempt4")
    with pytest.raises((ApplyError, OSError)):
        backend.apply(new)
    assert fake.live_gen() == 1 and live_trie(fake, "exempt4") == OLD4
    assert backend.drift(old) == []  # what runs is the old decision, whole
    assert fake.open_fds() == []
    backend.apply(new)
    assert live_trie(fake, "exempt4") == NEW4


def test_failed_switch_leaves_the_old_generation(fake, old, new):
    backend = EbpfBackend()
    backend.apply(old)
    fake.fail_bpf("update", errno.EPERM, map="ipmq_ctl")
    with pytest.raises((ApplyError, OSError)):
        backend.apply(new)
    assert fake.live_gen() == 1 and live_trie(fake, "exempt4") == OLD4
    assert backend.drift(new) == ["exempt or source prefixes differ"]
    backend.apply(new)
    assert fake.live_gen() == 0 and live_trie(fake, "exempt4") == NEW4


def test_failed_attach_is_reported_and_repaired(fake, old):
    backend = EbpfBackend()
    fake.fail_bpf("tc", errno.EPERM)
    with pytest.raises(ApplyError, match="clsact|attach"):
        backend.apply(old)
    assert fake.open_fds() == []
    assert backend.drift(old)  # not in sync: the next apply (or reconcile) repairs
    backend.apply(old)
    assert backend.drift(old) == []


def test_failed_program_load_attaches_nothing(fake, old):
    backend = EbpfBackend()
    fake.fail_bpf("prog_load", errno.EACCES)
    with pytest.raises(ApplyError, match="refused program"):
        backend.apply(old)
    assert not fake.filters and not fake.clsact
    assert fake.open_fds() == []
    backend.apply(old)
    assert backend.drift(old) == []


def test_failed_assist_restore_is_an_error(fake, old):
    backend = EbpfBackend()
    fake.fail_next("iptables-nft-restore")
    with pytest.raises(ApplyError, match="iptables-nft-restore"):
        backend.apply(old)
    assert fake.open_fds() == []
    backend.apply(old)
    assert backend.drift(old) == []


# ---------------------------------------------------------------- the fingerprint


def test_fingerprint_follows_every_change(fake, old, new):
    backend = EbpfBackend()
    backend.apply(old)
    first = backend.fingerprint()
    assert first is not None and first == backend.fingerprint()
    fake.filters[(fake.index("eth1"), "egress")].clear()
    second = backend.fingerprint()
    assert second != first
    backend.apply(old)
    backend.apply(new)
    third = backend.fingerprint()
    assert third not in (first, second)
    fake.add_link("eth9")  # a link the plan may match
    assert backend.fingerprint() != third


# ---------------------------------------------------------------- helpers


def seed_flow(fake: FakeBpf, ifindex: int) -> None:
    """A flow the datapath translated out of `ifindex`, seen just now."""
    key = NAT_KEY.pack(bytes(10) + b"\xff\xff" + bytes([10, 244, 0, 5]), bytes(10) + b"\xff\xff" + bytes([1, 1, 1, 1]),
                       b"\x30\x39", b"\x00\x35", 17, 4)
    value = NAT_VAL.pack(bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 10]), b"\x80\x00", 0, ifindex,
                         time.monotonic_ns())
    fake.map("nat_fwd").data[key] = value


# ---------------------------------------------------------------- selection (unavailable_reason)


def test_available_on_the_fake(fake):
    assert EbpfBackend().unavailable_reason() is None
    assert fake.open_fds() == []  # the probes' maps and programs closed


def test_unavailable_when_maps_are_refused(fake):
    fake.fail_bpf("map_create", errno.EPERM)
    assert EbpfBackend().unavailable_reason() == ("the kernel refuses BPF maps: not permitted (needs root: "
                                                  "CAP_BPF and CAP_NET_ADMIN)")
    assert fake.open_fds() == []


def test_unavailable_when_the_verifier_refuses(fake):
    fake.fail_bpf("prog_load", errno.EINVAL)
    reason = EbpfBackend().unavailable_reason()
    assert reason is not None and "verifier refuses program ipmq_" in reason
    assert fake.open_fds() == []


def test_unavailable_without_iptables(fake):
    for tool in [t for t in fake.tools if t.startswith(("iptables", "ip6tables"))]:
        del fake.tools[tool]
    reason = EbpfBackend().unavailable_reason()
    assert reason is not None and reason.startswith("missing iptables-")


def test_unavailable_without_bpffs_outside_sys_fs_bpf(fake, monkeypatch):
    monkeypatch.setenv("IPMASQ_BPF_DIR", "/run/ipmasq/bpf")  # not on bpffs, not ours to mount
    reason = EbpfBackend().unavailable_reason()
    assert reason is not None and reason.startswith("no bpf filesystem at /run/ipmasq")


def test_bpffs_mounted_by_apply_when_missing(fake, old):
    fake.files["/proc/self/mountinfo"] = "22 1 0:20 / /sys rw - sysfs sysfs rw\n"
    fake.tools["mount"] = lambda argv, input: (fake.files.__setitem__(
        "/proc/self/mountinfo", fake.files["/proc/self/mountinfo"] + "40 22 0:33 / /sys/fs/bpf rw - bpf bpf rw\n")
        or (0, "", ""))
    assert EbpfBackend().unavailable_reason() is None  # apply may mount it
    EbpfBackend().apply(old)
    assert ("mount", "-t", "bpf", "bpf", "/sys/fs/bpf") in fake.calls
    assert live_trie(fake, "exempt4") == OLD4


# ---------------------------------------------------------------- the fake against a kernel

CHILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
from ipmasq_legacy import config, kernel, plan as planmod
from ipmasq_legacy.backends.ebpf import EbpfBackend
from ipmasq_legacy.backends.ebpf.names import pin_dir
from tests.fakes.ebpf import node_text

def step():
    k = kernel.current()
    with k.rtnl() as rt:
        print(node_text(k.bpf(), rt, pin_dir()) + "-- step")

backend, last = EbpfBackend(), None
for path in sys.argv[2:]:
    if path == "follow":
        os.system("ip link del eth1")
        backend.follow(last)
    elif path == "remove":
        backend.remove()
    else:
        last = planmod.build(config.load(path))
        backend.apply(last)
    step()
"""


def scenario(fake: FakeBpf, backend: EbpfBackend, steps: list[str]) -> list[str]:
    """CHILD's steps against the fake."""
    out, last = [], None
    for path in steps:
        if path == "follow":
            fake.remove_link("eth1")
            fake.remove_link("p1")  # with its peer
            assert last is not None
            backend.follow(last)
        elif path == "remove":
            backend.remove()
        else:
            last = planmod.build(config.load(path))
            backend.apply(last)
        out.append(fake.dump().split("-- nft")[0])
    return out


@pytest.mark.traffic
def test_fake_holds_what_a_kernel_holds(tmp_path, monkeypatch):
    """The same applies (a cold one, an exempt change, a link gone and followed, remove)
    on a kernel, in a network and mount namespace of its own with bpffs mounted there,
    and on FakeBpf: the same pins, shapes, contents (both generations), programs and
    their maps, links and filters after every step (node_text on both)."""
    import subprocess
    import sys

    old_path, new_path = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old_path.write_text(OLD)
    new_path.write_text(NEW)
    steps = [str(old_path), str(new_path), "follow", "remove"]
    bpffs = tmp_path / "bpf"
    bpffs.mkdir()
    setup = " && ".join([
        "mount --make-rprivate /", f"mount -t bpf bpf {bpffs}", "ip link set lo up",
        "ip link add eth0 type veth peer name p0", "ip link set eth0 up", "ip addr add 192.0.2.10/24 dev eth0",
        "ip addr add 2001:db8::10/64 dev eth0 nodad", "ip link add eth1 type veth peer name p1",
        "ip link set eth1 up",
        "ip addr add 198.51.100.10/24 dev eth1",
        'exec "$@"'])
    env = {**__import__("os").environ, "IPMASQ_STATE_DIR": str(tmp_path / "real-state"),
           "IPMASQ_BPF_DIR": str(bpffs / "ipmasq_legacy")}
    repo = str(Path(__file__).parent.parent)
    proc = subprocess.run(["unshare", "-m", "-n", "sh", "-c", setup, "sh", sys.executable, "-c", CHILD, repo, *steps],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    real = [s.lstrip("\n") for s in proc.stdout.split("-- step\n")[:-1]]

    monkeypatch.setenv("IPMASQ_STATE_DIR", str(tmp_path / "fake-state"))
    for var in ("IPMASQ_BPF_DIR", "IPMASQ_BPF_OBJECT", "IPMASQ_BPF_DRAIN_IDLE"):
        monkeypatch.delenv(var, raising=False)
    fake = FakeBpf()
    fake.add_link("p0", kind="veth")  # a veth's peer comes first
    fake.add_link("eth0", ["192.0.2.10/24", "2001:db8::10/64"], kind="veth")
    fake.add_link("p1", kind="veth")
    fake.add_link("eth1", ["198.51.100.10/24"], kind="veth")
    with kernel.use(fake):
        mine = scenario(fake, EbpfBackend(), steps)
    assert len(real) == len(mine) == len(steps)
    assert "gen 1 172.16.0.0/12 = 01" in real[0] and "egress pref 49152 handle 1 bpf" in real[0]
    assert "gen 0 192.168.0.0/16 = 01" in real[1] and " eth1 " not in real[2] and real[3].startswith("pins none")
    for step, a, b in zip(steps, real, mine):
        assert a == b, Path(step).name
