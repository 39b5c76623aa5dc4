"""The iptables backends' decisions, without root: the real IptablesBackend and real
Plans against FakeIptables (tests/fakes/iptables.py), each test asserting the whole state
(`fake.dump()`) a command left. What only packets prove stays in test_traffic.py.
"""

from __future__ import annotations

import re
import textwrap

import pytest

from ipmasq_legacy import config, kernel, plan
from ipmasq_legacy.backends.iptables import IptablesBackend, content_name
from ipmasq_legacy.errors import ApplyError

from .fakes.iptables import FakeIptables

V4 = "ipv4-native-routing-cidr: 10.0.0.0/8\nenable-ipv6-masquerade: false\n"
BOTH = "ipv4-native-routing-cidr: 10.0.0.0/8\nipv6-native-routing-cidr: fd00::/8\n"
JUMP = '-A POSTROUTING -m comment --comment "ipmasq-legacy: masquerade pod egress" -j IPMASQ-LEGACY'
IN_JUMP = '-A PREROUTING -m comment --comment "ipmasq-legacy: mark connections to the node" -j IPMASQ-LEGACY-IN'
MARK = ("-A IPMASQ-LEGACY-IN -m conntrack --ctstate NEW -m addrtype --dst-type LOCAL -j CONNMARK "
        "--set-xmark 0x200000/0x200000")
DOCKER = ("-N DOCKER", "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",
          "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER", "-A DOCKER -i docker0 -j RETURN")
KUBE = ("-N KUBE-MARK-MASQ", "-N KUBE-POSTROUTING", "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE '
        "--random-fully")


LEGACY_EMPTY = ("*legacy ipv4 mangle\n:PREROUTING ACCEPT\n:INPUT ACCEPT\n:FORWARD ACCEPT\n:OUTPUT ACCEPT\n"
                ":POSTROUTING ACCEPT\n*legacy ipv4 nat\n:PREROUTING ACCEPT\n:INPUT ACCEPT\n:OUTPUT ACCEPT\n"
                ":POSTROUTING ACCEPT\n")


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("IPMASQ_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("IPMASQ_CONFIG", raising=False)


@pytest.fixture
def fake():
    with kernel.use(FakeIptables()) as f:
        yield f


def make_plan(tmp_path, text: str) -> plan.Plan:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return plan.build(config.load(str(path)))


def ours(dump: str) -> list[str]:
    return [ln for ln in dump.splitlines() if re.search("IPMASQ|ipmasq", ln)]


def foreign(dump: str) -> list[tuple[str, str]]:
    """Every rule and user chain not ours, with the table it is in (order kept)."""
    out, where = [], ""
    for ln in dump.splitlines():
        if ln.startswith("*") or ln.startswith("ipset "):
            where = ln
        elif not re.search("IPMASQ|ipmasq", ln + where) and (ln.startswith("-A ") or ln.endswith(" -")
                                                               or ln.startswith("add ")):
            out.append((where, ln))
    return out


def cold(variant: str, tmp_path, text: str = V4) -> tuple[IptablesBackend, plan.Plan, str]:
    backend, p = IptablesBackend(variant), make_plan(tmp_path, text)
    backend.apply(p)
    return backend, p, kernel.current().dump()


def expected_v4(variant: str, bridged: bool = False) -> str:
    physdev = "-A IPMASQ-LEGACY -m physdev --physdev-is-bridged -j RETURN\n" if bridged else ""
    return (f"""\
*{variant} ipv4 mangle
:PREROUTING ACCEPT
:INPUT ACCEPT
:FORWARD ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
:IPMASQ-LEGACY-IN -
{IN_JUMP}
{MARK}
*{variant} ipv4 nat
:PREROUTING ACCEPT
:INPUT ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
:IPMASQ-LEGACY -
{JUMP}
{physdev}-A IPMASQ-LEGACY -m connmark --mark 0x200000/0x200000 -j RETURN
-A IPMASQ-LEGACY -m addrtype --dst-type LOCAL -j RETURN
-A IPMASQ-LEGACY -m set --match-set ipmasq4-a dst -j RETURN
-A IPMASQ-LEGACY ! -o lo -j MASQUERADE
ipset ipmasq4-a hash:net family inet hashsize 1024 maxelem 65536
add ipmasq4-a 10.0.0.0/8
add ipmasq4-a 224.0.0.0/4
ipset ipmasq4-b hash:net family inet hashsize 1024 maxelem 65536
add ipmasq4-b 10.0.0.0/8
add ipmasq4-b 224.0.0.0/4
""")


# ---------------------------------------------------------------- apply from nothing


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_cold_apply_installs_exactly_the_chain_the_jumps_and_both_slots(fake, tmp_path, variant):
    backend, p = IptablesBackend(variant), make_plan(tmp_path, V4)
    changes = backend.apply(p)
    assert changes == ["ipv4 installed: 4 rules, 2 exempt prefixes"]
    assert fake.dump() == expected_v4(variant)
    # one ipset restore and one iptables-restore: the transaction, and nothing else written
    assert [c[0] for c in fake.writes()] == ["ipset", f"iptables-{variant}-restore"]


def test_cold_apply_with_br_netfilter_returns_bridged_frames_first(tmp_path):
    with kernel.use(FakeIptables(bridged=True)) as fake:
        IptablesBackend("nft").apply(make_plan(tmp_path, V4))
        assert fake.dump() == expected_v4("nft", bridged=True)


def test_cold_apply_both_families_each_in_its_own_tool(fake, tmp_path):
    backend, p, dump = cold("nft", tmp_path, BOTH)
    assert "ipset ipmasq6-a hash:net family inet6 hashsize 1024 maxelem 65536\nadd ipmasq6-a fd00::/8\n" in dump
    assert fake.rules("nft", 6, "nat", "IPMASQ-LEGACY")[3] == "-A IPMASQ-LEGACY -m set --match-set ipmasq6-a dst -j RETURN"
    assert [c[0] for c in fake.writes()] == ["ipset", "iptables-nft-restore", "ipset", "ip6tables-nft-restore"]
    assert backend.drift(p) == []


def test_plan_options_survive_the_round_trip_through_the_tool(fake, tmp_path):
    """Every rule as the backend writes it is what -S prints back: no drift after apply."""
    backend, p, _ = cold("nft", tmp_path, """\
        egress-masquerade-interfaces: [eth+, ens3]
        ipv4-pod-cidr: 10.244.0.0/16
        ipv6-pod-cidr: fd00:244::/48
        iptables-random-fully: true
        masquerade-to-ports: 1024-29999,32768-65535
    """)
    assert backend.drift(p) == []
    rules = fake.rules("nft", 4, "nat", "IPMASQ-LEGACY")
    assert "-A IPMASQ-LEGACY -s 10.244.0.0/16 -o eth+ -j MASQUERADE --random-fully" in rules
    assert any("-p tcp -m statistic --mode random --probability" in r for r in rules)


def test_nothing_of_legacy_is_created_by_looking(fake, tmp_path):
    p = make_plan(tmp_path, BOTH)
    for variant in ("legacy", "nft"):
        backend = IptablesBackend(variant)
        assert not backend.live().installed
        assert backend.drift(p) == ["ipv4: not installed", "ipv6: not installed"]
        backend.fingerprint()
        backend.counters()
    assert fake.dump() == "\n"  # no table listed into being, no set
    assert fake.read_text("/proc/net/ip_tables_names") == ""


# ---------------------------------------------------------------- re-apply and drift


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_reapply_of_the_same_plan_writes_nothing(fake, tmp_path, variant):
    backend, p, dump = cold(variant, tmp_path, BOTH)
    before = len(fake.writes())
    assert backend.apply(p) == []
    assert len(fake.writes()) == before and fake.dump() == dump


def drifted(fake, backend, p, dump, phrase):
    """The drift is seen as `phrase`, repaired by one apply, and the state is the cold one."""
    assert backend.drift(p) == [phrase]
    changes = backend.apply(p)
    assert changes == [f"{phrase.split(':')[0]} updated ({phrase.split(': ', 1)[1]}): 4 rules, 2 exempt prefixes"]
    assert fake.dump() == dump
    assert backend.drift(p) == [] and backend.apply(p) == []


def test_deleted_rule_in_our_chain_is_rewritten(fake, tmp_path):
    backend, p, dump = cold("nft", tmp_path)
    fake.seed("nft", 4, "nat", "-D IPMASQ-LEGACY -m addrtype --dst-type LOCAL -j RETURN")
    drifted(fake, backend, p, dump, "ipv4: chain IPMASQ-LEGACY differs")


def test_missing_jump_is_put_back_once(fake, tmp_path):
    backend, p, dump = cold("legacy", tmp_path)
    fake.seed("legacy", 4, "nat", f"-D{JUMP[2:]}")
    drifted(fake, backend, p, dump, "ipv4: 0 jumps from POSTROUTING instead of 1")


def test_two_jumps_become_one(fake, tmp_path):
    backend, p, dump = cold("nft", tmp_path)
    fake.seed("nft", 4, "nat", f"-I{JUMP[2:]}")
    drifted(fake, backend, p, dump, "ipv4: 2 jumps from POSTROUTING instead of 1")


def test_extra_rule_in_our_chain_is_dropped(fake, tmp_path):
    backend, p, dump = cold("nft", tmp_path)
    fake.seed("nft", 4, "nat", "-I IPMASQ-LEGACY 1 -s 192.0.2.0/24 -j RETURN")
    drifted(fake, backend, p, dump, "ipv4: chain IPMASQ-LEGACY differs")


def test_missing_mangle_jump_is_put_back(fake, tmp_path):
    backend, p, dump = cold("nft", tmp_path)
    fake.seed("nft", 4, "mangle", f"-D{IN_JUMP[2:]}")
    drifted(fake, backend, p, dump, "ipv4: 0 jumps from mangle PREROUTING instead of 1")


def test_inbound_chain_deleted_whole_is_rebuilt(fake, tmp_path):
    backend, p, dump = cold("legacy", tmp_path)
    fake.seed("legacy", 4, "mangle", f"-D{IN_JUMP[2:]}", "-F IPMASQ-LEGACY-IN", "-X IPMASQ-LEGACY-IN")
    assert backend.drift(p) == ["ipv4: chain IPMASQ-LEGACY-IN missing",
                                "ipv4: 0 jumps from mangle PREROUTING instead of 1"]
    backend.apply(p)
    assert fake.dump() == dump


def test_changed_member_of_the_live_set_is_found_by_the_deep_read_and_repaired(fake, tmp_path):
    """A del and an add leave the set's header as it was: apply trusts the record then
    (ipsets.py says so); the full read (drift, status, reconcile) sees it, forgets the
    record, and the next apply repairs it."""
    backend, p, dump = cold("nft", tmp_path)
    fake._ipset(["ipset", "del", "ipmasq4-a", "10.0.0.0/8"], None)
    fake._ipset(["ipset", "add", "ipmasq4-a", "11.0.0.0/8"], None)
    tampered = fake.dump()
    assert backend.apply(p) == [] and fake.dump() == tampered  # the record vouched for it
    assert backend.drift(p) == ["ipv4: exempt set ipmasq4-a members differ"]
    assert backend.apply(p)[0].startswith("ipv4 updated (exempt set ipmasq4-a members differ)")
    # the chain moved to b, which held the list, and a was refilled after it
    assert fake.dump() == dump.replace("--match-set ipmasq4-a", "--match-set ipmasq4-b")
    assert backend.drift(p) == []


def test_a_member_gone_from_the_idle_slot_shows_in_its_header_and_apply_refills_it(fake, tmp_path):
    backend, p, dump = cold("nft", tmp_path)
    fake._ipset(["ipset", "del", "ipmasq4-b", "224.0.0.0/4"], None)
    assert backend.apply(p) == ["ipv4 updated (idle exempt set ipmasq4-b members differ): 4 rules, 2 exempt prefixes"]
    assert fake.dump() == dump
    # only the idle set was written: the live chain was left alone
    assert fake.writes()[-1] == ("ipset", "restore", "-exist")


def test_new_exempt_list_switches_the_chain_to_the_patched_idle_slot(fake, tmp_path):
    backend, p, _ = cold("nft", tmp_path)
    initvals = {n: fake.sets[n].initval for n in ("ipmasq4-a", "ipmasq4-b")}
    n = len(fake.calls)
    p2 = make_plan(tmp_path, "ipv4-native-routing-cidr: [10.0.0.0/8, 192.168.0.0/16]\nenable-ipv6-masquerade: false\n")
    assert backend.apply(p2) == [
        "ipv4 updated (exempt set ipmasq4-a members differ, "
        "idle exempt set ipmasq4-b members differ): 4 rules, 3 exempt prefixes"]
    dump = fake.dump()
    assert "-A IPMASQ-LEGACY -m set --match-set ipmasq4-b dst -j RETURN" in dump
    assert dump.count("add ipmasq4-a 192.168.0.0/16") == dump.count("add ipmasq4-b 192.168.0.0/16") == 1
    # the difference only, into the idle set first, then the switch, then the other set
    writes = [c for c in fake.calls[n:] if c in fake.writes()]
    assert [c[0] for c in writes] == ["ipset", "iptables-nft-restore", "ipset"]
    assert {n: fake.sets[n].initval for n in initvals} == initvals  # patched, never made anew
    assert backend.drift(p2) == []
    backend.apply(p)  # and back: the chain returns to slot a
    assert fake.rules("nft", 4, "nat", "IPMASQ-LEGACY")[3] == "-A IPMASQ-LEGACY -m set --match-set ipmasq4-a dst -j RETURN"
    assert backend.drift(p) == []


def test_a_set_too_small_for_the_new_list_is_made_anew(fake, tmp_path):
    backend, p, _ = cold("nft", tmp_path)
    fake.sets["ipmasq4-b"].maxelem = 1  # as if an older version had made it so
    backend.apply(p)
    assert fake.sets["ipmasq4-b"].maxelem == 65536
    assert backend.drift(p) == []


def test_disabled_family_is_removed_with_its_sets(fake, tmp_path):
    backend, _, _ = cold("nft", tmp_path, BOTH)
    p4 = make_plan(tmp_path, V4)
    assert backend.drift(p4) == ["ipv6: installed but disabled", "ipv6: 2 stale sets"]
    assert backend.apply(p4) == ["ipv6 removed (disabled)"]
    assert not [ln for ln in ours(fake.dump()) if "6" in ln.split()[0] or "ipmasq6" in ln]
    assert fake.rules("nft", 6, "nat") == ["-P PREROUTING ACCEPT", "-P INPUT ACCEPT", "-P OUTPUT ACCEPT",
                                           "-P POSTROUTING ACCEPT"]
    assert backend.drift(p4) == []


def test_stale_sets_alone_are_destroyed_and_the_chain_keeps_its_counters(fake, tmp_path):
    backend, p, dump = cold("nft", tmp_path)
    fake.count("nft", 4, "nat", "IPMASQ-LEGACY", 3, 7, 700)
    leftover = content_name(p.family(4))
    fake.seed_set(leftover, 4, "10.0.0.0/8")
    fake.seed_set("ipmasq4-foo", 4, "10.9.0.0/16")  # a look-alike: someone else's
    assert backend.drift(p) == ["ipv4: 1 stale sets"]
    assert backend.apply(p) == ["ipv4: 1 stale sets destroyed"]
    assert leftover not in fake.sets and "ipmasq4-foo" in fake.sets
    assert [(c.packets, c.bytes) for c in backend.counters()] == [(7, 700)]
    del fake.sets["ipmasq4-foo"]
    assert fake.dump() == dump


def test_counters_and_fingerprint(fake, tmp_path):
    backend, p, _ = cold("nft", tmp_path, "egress-masquerade-interfaces: eth0\nenable-ipv6-masquerade: false\n")
    fake.count("nft", 4, "nat", "IPMASQ-LEGACY", 3, 5, 420)
    [counter] = backend.counters()
    assert (counter.family, counter.interface, counter.packets, counter.bytes) == (4, "eth0", 5, 420)
    assert counter.rule == "-A IPMASQ-LEGACY -o eth0 -j MASQUERADE"
    first = backend.fingerprint()
    assert backend.fingerprint() == first  # counters are left out
    fake.seed("nft", 4, "nat", "-A IPMASQ-LEGACY -j RETURN")
    assert backend.fingerprint() != first


# ---------------------------------------------------------------- the other variant


def test_other_variant_holding_our_chain_shares_the_sets_and_keeps_them_on_its_removal(fake, tmp_path):
    legacy, p, _ = cold("legacy", tmp_path)
    nft = IptablesBackend("nft")
    assert nft.apply(p) == ["ipv4 installed: 4 rules, 2 exempt prefixes"]
    assert fake.rules("nft", 4, "nat", "IPMASQ-LEGACY") == fake.rules("legacy", 4, "nat", "IPMASQ-LEGACY")
    assert fake.references("ipmasq4-a") == 2
    assert legacy.remove() == ["ipv4"]  # the migration's second half
    # legacy tables live as long as the namespace; the sets stay for the nft chain
    assert fake.dump() == LEGACY_EMPTY + expected_v4("nft")
    assert set(fake.sets) == {"ipmasq4-a", "ipmasq4-b"} and nft.drift(p) == []


def test_new_list_while_the_other_variant_holds_slot_a_goes_to_slot_b(fake, tmp_path):
    cold("legacy", tmp_path)
    nft = IptablesBackend("nft")
    p2 = make_plan(tmp_path, "ipv4-native-routing-cidr: 10.0.0.0/9\nenable-ipv6-masquerade: false\n")
    nft.apply(p2)
    assert "-m set --match-set ipmasq4-b dst" in fake.rules("nft", 4, "nat", "IPMASQ-LEGACY")[3]
    assert "-m set --match-set ipmasq4-a dst" in fake.rules("legacy", 4, "nat", "IPMASQ-LEGACY")[3]
    dump = fake.dump()
    assert "add ipmasq4-a 10.0.0.0/8" in dump and "add ipmasq4-b 10.0.0.0/9" in dump  # a, in use, untouched
    assert nft.drift(p2) == ["ipv4: idle exempt set ipmasq4-a members differ"]


def test_both_slots_in_use_elsewhere_gives_a_set_named_by_content(fake, tmp_path):
    cold("legacy", tmp_path)
    fake.seed("legacy", 4, "filter", "-A INPUT -m set --match-set ipmasq4-b src -j ACCEPT")
    nft = IptablesBackend("nft")
    p2 = make_plan(tmp_path, "ipv4-native-routing-cidr: 10.0.0.0/9\nenable-ipv6-masquerade: false\n")
    nft.apply(p2)
    name = content_name(p2.family(4))
    assert f"-m set --match-set {name} dst" in fake.rules("nft", 4, "nat", "IPMASQ-LEGACY")[3]
    assert [str(m) for m in fake.sets[name].members] == ["10.0.0.0/9", "224.0.0.0/4"]
    assert fake.sets["ipmasq4-a"].members == fake.sets["ipmasq4-b"].members  # neither written


def test_no_free_set_at_all_is_refused_before_anything_changes(fake, tmp_path):
    cold("legacy", tmp_path)
    p2 = make_plan(tmp_path, "ipv4-native-routing-cidr: 10.0.0.0/9\nenable-ipv6-masquerade: false\n")
    name = content_name(p2.family(4))
    fake.seed_set(name, 4, "10.0.0.0/9")
    fake.seed("legacy", 4, "filter", "-A INPUT -m set --match-set ipmasq4-b src -j ACCEPT",
              f"-A INPUT -m set --match-set {name} src -j ACCEPT")
    before = fake.dump()
    with pytest.raises(ApplyError, match="no free set for the IPv4 exempt list"):
        IptablesBackend("nft").apply(p2)
    assert fake.dump() == before


# ---------------------------------------------------------------- foreign rules, remove


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_foreign_rules_are_byte_identical_across_apply_reapply_and_remove(fake, tmp_path, variant):
    for v in ("legacy", "nft"):
        fake.seed(v, 4, "nat", *DOCKER, *KUBE)
        fake.seed(v, 6, "nat", "-A POSTROUTING -s fd00:17::/64 ! -o docker0 -j MASQUERADE")
    fake.seed(variant, 4, "mangle", "-A PREROUTING -i cni0 -j MARK --set-xmark 0x1/0x1")
    fake.seed_set("KUBE-CLUSTER-IP", 4, "10.96.0.1")
    before = foreign(fake.dump())
    backend = IptablesBackend(variant)
    p = make_plan(tmp_path, BOTH)
    backend.apply(p)
    assert foreign(fake.dump()) == before
    # ours goes after what was there: Docker's and kube-proxy's rules keep their places
    post = fake.rules(variant, 4, "nat", "POSTROUTING")
    assert post[1:] == [DOCKER[1], KUBE[3], JUMP]
    backend.apply(make_plan(tmp_path, V4))
    assert foreign(fake.dump()) == before
    assert backend.remove() == ["ipv4"]
    assert foreign(fake.dump()) == before and ours(fake.dump()) == []


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_remove_leaves_nothing_of_ours(fake, tmp_path, variant):
    backend, _, _ = cold(variant, tmp_path, BOTH)
    fake.seed_set("ipmasq4-0123456789ab", 4)  # an earlier version's set
    assert backend.remove() == ["ipv4", "ipv6"]
    assert ours(fake.dump()) == []
    n = len(fake.writes())
    assert backend.remove() == [] and len(fake.writes()) == n  # nothing left: nothing written


def test_remove_waits_while_the_kernel_still_holds_the_sets(fake, tmp_path):
    """nf_tables frees a deleted chain's rules in a work queue: for a moment after
    iptables-nft-restore returned, `ipset list -t` still counts the chain's references
    (Debian 11's 5.10 left a set behind on flush). remove waits for the release."""
    backend, _, _ = cold("nft", tmp_path, V4)
    real, late = fake.references, {"reads": 3}

    def references(name: str) -> int:
        n = real(name)
        if n == 0 and name.startswith("ipmasq4") and late["reads"] > 0:
            late["reads"] -= 1
            return 1
        return n

    fake.references = references
    assert backend.remove() == ["ipv4"]
    assert ours(fake.dump()) == [] and late["reads"] == 0


def test_remove_of_leftovers_a_jump_without_its_chain_gone_too(fake, tmp_path):
    fake.seed("nft", 4, "nat", "-N IPMASQ-LEGACY", JUMP, *DOCKER)
    assert IptablesBackend("nft").remove() == ["ipv4"]
    assert ours(fake.dump()) == []
    assert fake.rules("nft", 4, "nat", "POSTROUTING")[1] == DOCKER[1]


def test_remove_without_the_tools_does_nothing(tmp_path):
    with kernel.use(FakeIptables()) as fake:
        cold("nft", tmp_path)
        del fake.tools["ipset"]
        backend = IptablesBackend("nft")
        assert "missing ipset" in backend.unavailable_reason()
        assert backend.remove() == [] and ours(fake.dump())


# ---------------------------------------------------------------- failures


def test_failing_iptables_restore_on_a_cold_apply_leaves_no_rule(fake, tmp_path):
    fake.fail_next("iptables-nft-restore", "iptables-nft-restore: line 3 failed: Resource busy")
    with pytest.raises(ApplyError, match="iptables-nft-restore failed: iptables-nft-restore: line 3 failed"):
        IptablesBackend("nft").apply(make_plan(tmp_path, V4))
    # the sets were filled first (no rule uses them); no table, no chain, no jump
    assert [ln for ln in fake.dump().splitlines() if not ln.startswith(("ipset", "add"))] == []


def test_failing_iptables_restore_on_a_change_leaves_the_old_ruleset_live(fake, tmp_path):
    backend, p, dump = cold("nft", tmp_path)
    tables = dump.split("ipset ", 1)[0]
    fake.fail_next("iptables-nft-restore", "iptables-nft-restore: line 9 failed")
    p2 = make_plan(tmp_path, "ipv4-native-routing-cidr: 10.0.0.0/9\nenable-ipv6-masquerade: false\n")
    with pytest.raises(ApplyError):
        backend.apply(p2)
    assert fake.dump().split("ipset ", 1)[0] == tables
    assert [str(m) for m in fake.sets["ipmasq4-a"].members] == ["10.0.0.0/8", "224.0.0.0/4"]  # still the live one
    backend.apply(p2)  # the next apply completes the change
    assert backend.drift(p2) == []


def test_failing_ipset_restore_changes_nothing(fake, tmp_path):
    fake.fail_next("ipset", "ipset v7.17: Kernel error received: Operation not permitted", after=1)
    with pytest.raises(ApplyError, match="ipset failed: ipset v7.17: Kernel error"):
        IptablesBackend("nft").apply(make_plan(tmp_path, V4))
    assert fake.dump() == "\n"


def test_failing_fill_of_the_other_slot_after_the_switch_is_repaired_next_time(fake, tmp_path):
    backend, _, _ = cold("nft", tmp_path)
    p2 = make_plan(tmp_path, "ipv4-native-routing-cidr: 10.0.0.0/9\nenable-ipv6-masquerade: false\n")
    # list -t, restore (idle b), list -t after the switch, then the restore of a: that one fails
    fake.fail_next("ipset", "ipset v7.17: Error in line 1: Hash is full", after=3)
    with pytest.raises(ApplyError):
        backend.apply(p2)
    assert "--match-set ipmasq4-b dst" in fake.rules("nft", 4, "nat", "IPMASQ-LEGACY")[3]  # the switch held
    assert backend.drift(p2) == ["ipv4: idle exempt set ipmasq4-a members differ"]
    backend.apply(p2)
    assert backend.drift(p2) == []


# ---------------------------------------------------------------- the fake itself


def test_fake_restore_commits_block_by_block_as_the_real_tool_does(fake):
    text = "*mangle\n:T1 - [0:0]\n-A T1 -j RETURN\nCOMMIT\n*nat\n:T2 - [0:0]\n-D POSTROUTING -j T2\nCOMMIT\n"
    rc, _, err = fake._iptables(["iptables-nft-restore", "--noflush", "-w"], text)
    assert rc == 1 and "line 7 failed" in err
    assert fake.rules("nft", 4, "mangle", "T1") == ["-N T1", "-A T1 -j RETURN"]
    assert "nat" not in fake.nets[("nft", 4)]
    rc, _, err = fake._iptables(["iptables-legacy-restore", "--noflush"], "*nat\n:T3 - [0:0]\nbogus\nCOMMIT\n")
    assert rc == 2 and "Bad argument `bogus'" in err and fake.rules("legacy", 4, "nat", "T3") == []
    rc, _, err = fake._iptables(["iptables-nft-restore", "--noflush"], "*nat\n-A POSTROUTING -j NOPE\nCOMMIT\n")
    assert rc == 2 and "NOPE" in err
    rc, _, err = fake._iptables(["ip6tables-nft-restore"], "*nat\n-A POSTROUTING -s 10.0.0.0/8 -j RETURN\nCOMMIT\n")
    assert rc == 2


def test_fake_ipset_restore_runs_line_by_line(fake):
    fake._ipset(["ipset", "create", "s", "hash:net", "family", "inet"], None)
    rc, _, err = fake._ipset(["ipset", "restore", "-exist"], "add s 12.0.0.0/8\ncreate s hash:net family inet "
                                                              "maxelem 9\nadd s 13.0.0.0/8\n")
    assert rc == 1 and "Error in line 2" in err and [str(m) for m in fake.sets["s"].members] == ["12.0.0.0/8"]
    rc, _, _ = fake._ipset(["ipset", "restore"], "add s 14.0.0.0/8\nbogus s\n")
    assert rc == 2 and len(fake.sets["s"].members) == 1
    assert fake._ipset(["ipset", "add", "s", "0.0.0.0/0"], None)[0] == 1  # hash:net holds no /0
    assert fake._ipset(["ipset", "save", "s"], None)[1].startswith("create s hash:net family inet hashsize 1024")


# ---------------------------------------------------------------- the command line over the fake


@pytest.fixture
def node(fake, tmp_path, monkeypatch):
    """`ipmasq` in-process over the fake. What the CLI still asks of the node itself,
    not through kernel.current(), is answered here, from the fake or as a node without
    the other engines: engines.live_engines (netlink), the nftables and ebpf backends
    flush would also clear, ebpf's handover, the nft tables tables.py notes (netlink),
    and the links status lists."""
    import logging
    from types import SimpleNamespace

    from ipmasq_legacy import backends, links
    from ipmasq_legacy.backends import engines, tables

    def live_engines():
        return [f"iptables-{v}" for v in ("legacy", "nft")
                if any("IPMASQ-LEGACY" in fake.nets[(v, f)].get("nat", SimpleNamespace(chains={})).chains
                       for f in (4, 6))]

    monkeypatch.setattr(engines, "live_engines", live_engines)
    monkeypatch.setattr(backends, "all_backends", lambda: [backends.get("iptables-legacy"), backends.get("iptables-nft")])
    monkeypatch.setattr(backends, "finish_handovers", lambda current: [])
    monkeypatch.setattr(backends, "handover_pending", lambda current: False)
    monkeypatch.setattr(tables, "_present", lambda: [])
    monkeypatch.setattr(links, "names", lambda: ["lo", "eth0"])
    logger = logging.getLogger("ipmasq")  # logs.setup points it at the runner's stderr
    for attr in ("handlers", "propagate", "level"):
        monkeypatch.setattr(logger, attr, list(logger.handlers) if attr == "handlers" else getattr(logger, attr))
    path = tmp_path / "config.yaml"
    path.write_text(V4)
    return SimpleNamespace(fake=fake, config=str(path))


def ipmasq(*args):
    from click.testing import CliRunner

    from ipmasq_legacy.cli import cli

    return CliRunner().invoke(cli, list(args))


def test_cli_apply_installs_and_a_second_apply_is_unchanged(node):
    result = ipmasq("apply", "--config", node.config, "--backend", "iptables-nft")
    assert result.exit_code == 0, result.output
    assert result.stdout == "iptables-nft: ipv4 installed: 4 rules, 2 exempt prefixes\n"
    assert node.fake.dump() == expected_v4("nft")
    writes = len(node.fake.writes())
    result = ipmasq("apply", "--config", node.config, "--backend", "iptables-nft")
    assert result.stdout == "iptables-nft: unchanged\n"
    assert len(node.fake.writes()) == writes and node.fake.dump() == expected_v4("nft")


def test_cli_reconcile_repairs_drift_then_stays_silent(node):
    ipmasq("apply", "--config", node.config, "--backend", "iptables-nft")
    node.fake.seed("nft", 4, "nat", f"-D{JUMP[2:]}", "-A IPMASQ-LEGACY -j RETURN")
    result = ipmasq("reconcile")  # the source apply recorded
    assert result.exit_code == 0, result.output
    assert "drift in iptables-nft: ipv4: chain IPMASQ-LEGACY differs" in result.stderr
    assert node.fake.dump() == expected_v4("nft")
    for _ in range(2):  # in sync, then the quick path: nothing written, nothing said
        writes = len(node.fake.writes())
        result = ipmasq("reconcile")
        assert (result.exit_code, result.output) == (0, "")
        assert len(node.fake.writes()) == writes


def test_cli_status_says_in_sync_drifted_and_whose_masquerading_is_beside_ours(node):
    node.fake.seed("nft", 4, "nat", *DOCKER)
    ipmasq("apply", "--config", node.config, "--backend", "iptables-nft")
    node.fake.count("nft", 4, "nat", "IPMASQ-LEGACY", 3, 3, 180)
    lines = ipmasq("status").stdout.splitlines()
    assert lines[0] == "Masquerading: iptables-nft [eth0] exempt: 10.0.0.0/8 (+1 more)"
    assert "  masqueraded ipv4 via (any but lo): 3 packets, 180 bytes" in lines
    assert f"Masquerading by others: docker: {DOCKER[1]} (iptables-nft ipv4)" in lines
    assert lines[-1] == "State: in sync"
    node.fake.seed("nft", 4, "nat", f"-D{JUMP[2:]}")
    assert ipmasq("status").stdout.splitlines()[-1] == "State: drifted: ipv4: 0 jumps from POSTROUTING instead of 1"


def test_cli_status_from_the_verified_config_says_what_reading_it_says(node):
    """After a verifying reconcile, status takes the config and plan it kept
    (agent.cached_config) instead of reading the config: the same output, text and JSON,
    in sync and drifted; a changed config file is read again."""
    from ipmasq_legacy import agent, state

    node.fake.seed("nft", 4, "nat", *DOCKER)
    ipmasq("apply", "--config", node.config, "--backend", "iptables-nft")
    ipmasq("reconcile")
    assert (state.state_dir() / agent.CONFIG_CACHE).exists()

    def both(*args):
        cached = [ipmasq("status", *args).stdout, ipmasq("status", "-o", "json", *args).stdout]
        kept = (state.state_dir() / agent.CONFIG_CACHE).read_bytes()
        state.remove(agent.CONFIG_CACHE)
        read = [ipmasq("status", *args).stdout, ipmasq("status", "-o", "json", *args).stdout]
        (state.state_dir() / agent.CONFIG_CACHE).write_bytes(kept)
        return cached, read

    cached, read = both()
    assert cached == read and cached[0].splitlines()[-1] == "State: in sync"
    node.fake.seed("nft", 4, "nat", f"-D{JUMP[2:]}")
    cached, read = both()
    assert cached == read and "drifted" in cached[0]
    with open(node.config, "w") as f:
        f.write(V4.replace("10.0.0.0/8", "10.9.0.0/16"))
    cached, read = both()
    assert cached == read and "exempt set ipmasq4-a members differ" in cached[0]  # the new file was read


def test_plan_record_round_trips():
    import json

    from ipmasq_legacy import plan as planmod

    the_plan = planmod.Plan(families=(
        planmod.FamilyPlan(4, ("eth+",), ("10.244.0.0/16",), ("10.0.0.0/8",), True, ((1024, 2047), (3000, 4000)),
                           (("eth0", "192.0.2.1"),)),
        planmod.FamilyPlan(6, (), (), ())), ebpf_conntrack=False)
    assert planmod.from_record(json.loads(json.dumps(planmod.to_record(the_plan)))) == the_plan


def test_cli_flush_removes_ours_and_nothing_else(node):
    for v in ("legacy", "nft"):
        node.fake.seed(v, 4, "nat", *DOCKER, *KUBE)
    before = foreign(node.fake.dump())
    ipmasq("apply", "--config", node.config, "--backend", "iptables-nft")
    result = ipmasq("flush")
    assert result.exit_code == 0, result.output
    assert result.stdout == "removed iptables-nft (ipv4)\n"
    assert ours(node.fake.dump()) == [] and foreign(node.fake.dump()) == before
    assert ipmasq("status", "--config", node.config, "--backend", "iptables-nft").stdout.startswith(
        "Masquerading: none installed (config wants iptables-nft)")


def test_cli_switch_of_variant_installs_the_new_before_removing_the_old(node):
    ipmasq("apply", "--config", node.config, "--backend", "iptables-legacy")
    result = ipmasq("apply", "--config", node.config, "--backend", "iptables-nft")
    assert result.exit_code == 0, result.output
    assert result.stdout == ("iptables-nft: ipv4 installed: 4 rules, 2 exempt prefixes; "
                             "removed iptables-legacy (ipv4)\n")
    assert node.fake.dump() == LEGACY_EMPTY + expected_v4("nft")


def test_cli_apply_with_a_failing_restore_exits_1_and_leaves_the_rules(node):
    ipmasq("apply", "--config", node.config, "--backend", "iptables-nft")
    before = node.fake.dump()
    node.fake.seed("nft", 4, "nat", f"-D{JUMP[2:]}")
    drifted_dump = node.fake.dump()
    node.fake.fail_next("iptables-nft-restore", "iptables-nft-restore: line 1 failed: Resource busy")
    result = ipmasq("apply", "--config", node.config, "--backend", "iptables-nft")
    assert isinstance(result.exception, ApplyError) and result.exception.exit_code == 1
    assert node.fake.dump() == drifted_dump != before
    assert ipmasq("reconcile").exit_code == 0 and node.fake.dump() == before


def test_cli_without_net_admin_is_refused_before_anything_is_asked(node):
    node.fake.is_privileged = False
    for command in ("apply", "reconcile", "flush", "status"):
        result = ipmasq(command)
        assert result.exit_code != 0 and "needs root (or CAP_NET_ADMIN)" in str(result.exception)
    assert node.fake.calls == [] and node.fake.dump() == "\n"


@pytest.mark.traffic
def test_fake_prints_what_the_real_tools_print(tmp_path):
    """The fake against iptables, ip6tables (both variants) and ipset in a namespace of
    its own: the same restore input, then every listing the backends read, byte for byte
    (but dates, hash seeds and ipset save's hash order)."""
    import os
    import subprocess

    from ipmasq_legacy.backends import iptables as ipt

    p = make_plan(tmp_path, """\
        egress-masquerade-interfaces: [eth+, ens3]
        ipv4-pod-cidr: 10.244.0.0/16
        ipv6-pod-cidr: fd00:244::/48
        iptables-random-fully: true
        masquerade-to-ports: 1024-29999,32768-65535
        egress-masquerade-addresses: {ens3: 192.0.2.1, eth+: "2001:db8::1"}
    """)
    ns, fake = f"ipmq-{os.getpid()}xfake", FakeIptables()

    def both(argv, text=None):
        real = subprocess.run(["ip", "netns", "exec", ns, *argv], input=text, capture_output=True, text=True)
        mine = fake.exec(argv, text)
        return [(r.returncode, re.sub(r"^#.*\n|initval 0x[0-9a-f]+", "", r.stdout, flags=re.M))
                for r in (real, mine)]

    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for fp in p.families:
            sets = "".join(ipt.render_set(fp, n) for n in ipt.ipsets.SLOTS[fp.family])
            assert both(["ipset", "restore", "-exist"], sets) == [(0, "")] * 2
            for variant in ("legacy", "nft"):
                tool = f"{'iptables' if fp.family == 4 else 'ip6tables'}-{variant}"
                real, mine = both([f"{tool}-restore", "--noflush", "-w"], ipt.render_restore(fp, bridged=True))
                assert real == mine == (0, "")
                for args in (["-t", "nat", "-S"], ["-t", "nat", "-v", "-S", "IPMASQ-LEGACY"],
                             ["-t", "nat", "-v", "-S", "POSTROUTING"], ["-t", "mangle", "-S"],
                             ["-t", "nat", "-S", "NOPE"]):
                    real, mine = both([tool, "-w", *args])
                    assert real == mine, args
                for args in (["-t", "nat"], ["-c", "-t", "mangle"]):
                    real, mine = both([f"{tool}-save", *args])
                    assert real == mine, args
                real, mine = both(["ipset", "list", "-t"])
                assert real == mine
                real, mine = both(["ipset", "save"])
                assert sorted(real[1].splitlines()) == sorted(mine[1].splitlines())
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
