"""The nftables backend's decisions, without root: the real NftablesBackend and real
Plans against FakeNft (tests/fakes/nft.py) behind the kernel seam. Each test asserts the
state a command left (the fake's canonical dump, its listing, its history of commits),
not just the calls made. What only packets prove stays in test_nftables_render.py's
namespace tests and test_traffic.py.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from ipmasq_legacy import config, kernel, state
from ipmasq_legacy import plan as planmod
from ipmasq_legacy.backends import nftdriver
from ipmasq_legacy.backends.nftables import CLI_ENV, NftablesBackend, _first_error, chain_rules, parse_table
from ipmasq_legacy.backends.selection import NFT_PROBE
from ipmasq_legacy.errors import ApplyError
from ipmasq_legacy.plan import FamilyPlan, Plan
from tests.fakes.nft import FakeNft

T = "\t"
BASE = "egress-masquerade-interfaces: [eth+]\nipv4-pod-cidr: 10.244.0.0/16\n"
EXEMPT_OLD = BASE + "ipv4-native-routing-cidr: [10.0.0.0/8, 172.16.0.0/12]\n"
EXEMPT_NEW = BASE + "ipv4-native-routing-cidr: [10.0.0.0/8, 192.168.0.0/16]\n"

COLD = f"""\
table ip ipmasq_legacy {{
{T}set exempt_a {{
{T}{T}type ipv4_addr
{T}{T}flags interval
{T}{T}elements = {{ 10.0.0.0/8, 224.0.0.0/4 }}
{T}}}

{T}set exempt_b {{
{T}{T}type ipv4_addr
{T}{T}flags interval
{T}{T}elements = {{ 10.0.0.0/8, 224.0.0.0/4 }}
{T}}}

{T}chain postrouting {{
{T}{T}type nat hook postrouting priority srcnat + 10; policy accept;
{T}{T}iif 0 fib saddr type != local return
{T}{T}ct mark & 0x00200000 == 0x00200000 return
{T}{T}fib daddr type local return
{T}{T}ip daddr @exempt_a return
{T}{T}oifname "eth*" ip saddr 10.244.0.0/16 counter packets 0 bytes 0 masquerade
{T}}}

{T}chain prerouting {{
{T}{T}type filter hook prerouting priority dstnat - 10; policy accept;
{T}{T}ct state new fib daddr type local ct mark set ct mark | 0x00200000
{T}}}
}}
table ip6 ipmasq_legacy {{
{T}set exempt_a {{
{T}{T}type ipv6_addr
{T}{T}flags interval
{T}{T}elements = {{ ff00::/8 }}
{T}}}

{T}set exempt_b {{
{T}{T}type ipv6_addr
{T}{T}flags interval
{T}{T}elements = {{ ff00::/8 }}
{T}}}

{T}chain postrouting {{
{T}{T}type nat hook postrouting priority srcnat + 10; policy accept;
{T}{T}iif 0 fib saddr type != local return
{T}{T}ct mark & 0x00200000 == 0x00200000 return
{T}{T}fib daddr type local return
{T}{T}ip6 daddr @exempt_a return
{T}{T}oifname "eth*" counter packets 0 bytes 0 masquerade
{T}}}

{T}chain prerouting {{
{T}{T}type filter hook prerouting priority dstnat - 10; policy accept;
{T}{T}ct state new fib daddr type local ct mark set ct mark | 0x00200000
{T}}}
}}
"""

# Other engines' tables, as they print them (iptables-nft for Docker, firewalld, netavark)
FOREIGN = """\
table ip nat {
\tchain POSTROUTING {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname != "docker0" ip saddr 172.17.0.0/16 counter packets 12 bytes 720 masquerade
\t}

\tchain DOCKER {
\t\tiifname "docker0" counter packets 0 bytes 0 return
\t}

\tchain PREROUTING {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tfib daddr type local counter packets 3 bytes 180 jump DOCKER
\t}
}
table inet firewalld {
\tset allowed {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 192.0.2.0/24, 198.51.100.7 }
\t}

\tchain filter_INPUT {
\t\ttype filter hook input priority filter + 10; policy accept;
\t\tct state established,related accept
\t\tip saddr @allowed accept
\t}
}
table inet netavark {
\tchain POSTROUTING {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr 10.88.0.0/16 ip daddr != 10.88.0.0/16 masquerade
\t}
}
"""


def plan_of(directory: Path, text: str, name: str = "config") -> Plan:
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return planmod.build(config.load(str(path)))


@pytest.fixture(params=["nft", "libnftables"])
def fake(request, tmp_path, monkeypatch):
    """FakeNft as the current kernel, driven through the nft binary or libnftables."""
    monkeypatch.setenv("IPMASQ_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv(CLI_ENV, raising=False)
    with kernel.use(FakeNft(library=request.param == "libnftables")) as f:
        yield f


@pytest.fixture
def plan(tmp_path):
    return plan_of(tmp_path, BASE + "ipv4-native-routing-cidr: 10.0.0.0/8\n")


def since(fake: FakeNft, mark: int, kinds=("check", "commit", "patch")) -> list[tuple[str, str]]:
    return [(kind, what) for kind, what in fake.log[mark:] if kind in kinds]


def used_members(listing: str, family: int = 4) -> tuple[str | None, tuple[str, ...]]:
    """The set our chain looks up and what it holds, from a `list table` text."""
    live = parse_table(listing, family)
    return live.exempt_set, live.exempt


def installed(tmp_path, fake: FakeNft, text: str = BASE + "ipv4-native-routing-cidr: 10.0.0.0/8\n"):
    backend = NftablesBackend()
    p = plan_of(tmp_path, text, "installed")
    backend.apply(p)
    return backend, p


# ---------------------------------------------------------------- installing


def test_cold_apply_leaves_exactly_our_tables(fake, plan):
    backend = NftablesBackend()
    assert backend.apply(plan) == ["ipv4 installed: 5 rules, 2 exempt prefixes",
                                   "ipv6 installed: 5 rules, 1 exempt prefixes"]
    assert fake.dump() == COLD
    assert backend.driver == ("libnftables" if fake.library else "nft")
    assert backend.drift(plan) == []


def test_cold_apply_fills_each_set_before_any_rule_uses_it(fake, plan):
    NftablesBackend().apply(plan)
    # per family: sets declared, the first patched, the rules checked and committed, the second patched
    kinds = [kind for kind, _ in fake.log if kind != "list"]
    assert kinds == ["commit", "patch", "check", "commit", "patch"] * 2
    for _, tables in fake.history:
        for family, name in (("ip", "ipmasq_legacy"), ("ip6", "ipmasq_legacy")):
            listing = fake.listing(family, name, tables)
            if listing and "postrouting" in listing:
                used, members = used_members(listing, 4 if family == "ip" else 6)
                assert members, f"{family}: the chain looks up {used} while it is empty"


def test_reapply_sends_no_transaction(fake, plan):
    backend = NftablesBackend()
    backend.apply(plan)
    mark, generation, dump = len(fake.log), fake.generation, fake.dump()
    assert NftablesBackend().apply(plan) == []
    assert fake.log[mark:] == []  # the record is trusted: not even a listing
    assert (fake.generation, fake.dump()) == (generation, dump)


def test_reapply_without_record_reads_and_sends_nothing(fake, plan):
    NftablesBackend().apply(plan)
    state.remove(NftablesBackend.RECORD)
    mark, dump = len(fake.log), fake.dump()
    assert NftablesBackend().apply(plan) == []
    assert [kind for kind, _ in fake.log[mark:]] == ["list", "list"]
    assert fake.dump() == dump


def test_foreign_commit_voids_the_record_but_changes_nothing(fake, plan):
    NftablesBackend().apply(plan)
    fake.seed("add table inet someone")
    mark, dump = len(fake.log), fake.dump()
    assert NftablesBackend().apply(plan) == []
    assert since(fake, mark, ("list", "check", "commit", "patch")) == [
        ("list", "list table ip ipmasq_legacy\n"), ("list", "list table ip6 ipmasq_legacy\n")]
    assert fake.dump() == dump


def test_snat_and_port_ranges_install_in_sync(fake, tmp_path):
    p = plan_of(tmp_path, "egress-masquerade-interfaces: eth0\nipv4-pod-cidr: 10.244.0.0/16\n"
                          "enable-ipv6-masquerade: false\niptables-random-fully: true\n"
                          "masquerade-to-ports: 1024-29999,32768-65535\n"
                          "egress-masquerade-addresses: {eth0: 192.0.2.1}\n")
    backend = NftablesBackend()
    backend.apply(p)
    live = parse_table(fake.listing("ip", "ipmasq_legacy"), 4)
    assert live.rules == chain_rules(p.family(4)) and any("snat to 192.0.2.1:1024-29999" in r for r in live.rules)
    assert fake.listing("ip6", "ipmasq_legacy") is None
    assert backend.drift(p) == []


def test_render_output_loads_and_is_in_sync(fake, plan):
    backend = NftablesBackend()
    fake.seed(backend.render(plan))  # comments, table blocks with elements, add commands
    assert backend.drift(plan) == []


# ---------------------------------------------------------------- changing the exempt list


def test_exempt_change_is_old_or_new_at_every_step(fake, tmp_path):
    backend, _ = installed(tmp_path, fake, EXEMPT_OLD)
    old = ("10.0.0.0/8", "172.16.0.0/12", "224.0.0.0/4")
    new = ("10.0.0.0/8", "192.168.0.0/16", "224.0.0.0/4")
    mark, start = len(fake.log), len(fake.history)
    changes = backend.apply(plan_of(tmp_path, EXEMPT_NEW))
    assert changes == ["ipv4 updated (exempt set members differ, idle exempt set exempt_b members differ): "
                       "5 rules, 3 exempt prefixes"]
    assert since(fake, mark)[0] == ("patch", "exempt_b: -1 +1")  # the idle set first, by the difference
    assert [kind for kind, _ in since(fake, mark)] == ["patch", "check", "commit", "patch"]
    steps = [used_members(fake.listing("ip", "ipmasq_legacy", tables)) for _, tables in fake.history[start:]]
    assert steps == [("exempt_a", old), ("exempt_b", new), ("exempt_b", new)]
    final = parse_table(fake.listing("ip", "ipmasq_legacy"), 4)
    assert final.sets["exempt_a"].members == final.sets["exempt_b"].members == new


def test_exempt_change_and_back_flips_the_chain_each_time(fake, tmp_path):
    backend, _ = installed(tmp_path, fake, EXEMPT_OLD)
    first = fake.dump()
    backend.apply(plan_of(tmp_path, EXEMPT_NEW))
    assert "@exempt_b" in fake.listing("ip", "ipmasq_legacy")
    backend.apply(plan_of(tmp_path, EXEMPT_OLD))
    assert fake.dump() == first  # back on exempt_a, both sets the old list again
    assert NftablesBackend().apply(plan_of(tmp_path, EXEMPT_OLD)) == []


def test_large_exempt_list_is_patched_by_difference(fake, tmp_path):
    nets = tuple(f"10.{i // 256}.{i % 256}.0/24" for i in range(2000))
    backend = NftablesBackend()
    backend.apply(Plan((FamilyPlan(4, (), (), nets),)))
    mark = len(fake.log)
    backend.apply(Plan((FamilyPlan(4, (), (), nets[1:] + ("192.168.0.0/16",)),)))
    assert [what for kind, what in since(fake, mark, ("patch",))] == ["exempt_b: -1 +1", "exempt_a: -1 +1"]
    assert len(parse_table(fake.listing("ip", "ipmasq_legacy"), 4).exempt) == 2000


# ---------------------------------------------------------------- drift and repair


def test_deleted_rule_is_reported_and_repaired(fake, plan):
    backend = NftablesBackend()
    backend.apply(plan)
    handle = fake.handle("ip", "ipmasq_legacy", "postrouting", "masquerade")
    fake.seed(f"delete rule ip ipmasq_legacy postrouting handle {handle}")
    assert backend.drift(plan) == ["ipv4: chain postrouting differs"]
    assert backend.apply(plan) == ["ipv4 updated (chain postrouting differs): 5 rules, 2 exempt prefixes"]
    assert fake.dump() == COLD


def test_changed_chain_policy_is_repaired_with_a_new_chain(fake, plan):
    backend = NftablesBackend()
    backend.apply(plan)
    fake.seed("chain ip ipmasq_legacy postrouting { type nat hook postrouting priority srcnat + 10; policy drop; }")
    assert "policy drop;" in fake.listing("ip", "ipmasq_legacy")
    assert backend.drift(plan) == ["ipv4: chain postrouting hook differs"]
    backend.apply(plan)
    assert fake.dump() == COLD
    commit = [what for kind, what in fake.log if kind == "commit"][-1]
    assert "delete chain ip ipmasq_legacy postrouting\nadd chain ip ipmasq_legacy postrouting" in commit


def test_removed_set_member_is_repaired_through_the_other_set(fake, plan):
    backend = NftablesBackend()
    backend.apply(plan)
    fake.seed("delete element ip ipmasq_legacy exempt_a { 224.0.0.0/4 }")
    assert backend.drift(plan) == ["ipv4: exempt set members differ"]
    mark = len(fake.log)
    backend.apply(plan)
    # exempt_b still held the whole list: the chain moves to it, then exempt_a is refilled
    assert since(fake, mark) == [("check", since(fake, mark)[0][1]), ("commit", since(fake, mark)[0][1]),
                                 ("patch", "exempt_a: -0 +1")]
    assert fake.dump() == COLD.replace("ip daddr @exempt_a", "ip daddr @exempt_b")
    assert backend.drift(plan) == []


def repaired(fake, plan, change: str, drift: list[str]) -> None:
    """Installed, then `change` made by hand: drift says `drift`, one apply puts back COLD."""
    backend = NftablesBackend()
    backend.apply(plan)
    fake.seed(change)
    assert backend.drift(plan) == drift
    backend.apply(plan)
    assert fake.dump() == COLD


def test_added_member_of_the_idle_set_is_repaired(fake, plan):
    repaired(fake, plan, "add element ip ipmasq_legacy exempt_b { 203.0.113.7 }", ["ipv4: idle exempt set exempt_b members differ"])


def test_deleted_table_is_installed_again(fake, plan):
    backend = NftablesBackend()
    backend.apply(plan)
    fake.seed("delete table ip ipmasq_legacy")
    assert backend.drift(plan) == ["ipv4: not installed"]
    assert backend.apply(plan) == ["ipv4 installed: 5 rules, 2 exempt prefixes"]
    assert fake.dump() == COLD


def test_deleted_inbound_chain_is_repaired(fake, plan):
    repaired(fake, plan, "delete chain ip6 ipmasq_legacy prerouting", ["ipv6: chain prerouting missing"])


def test_foreign_objects_in_our_table_are_deleted(fake, plan):
    repaired(fake, plan, "add chain ip ipmasq_legacy extra\nadd counter ip ipmasq_legacy hits\n"
             "add set ip ipmasq_legacy exempt { type ipv4_addr; flags interval; }",  # an earlier version's set
             ["ipv4: unexpected counter hits", "ipv4: unexpected chain extra", "ipv4: 1 stale sets"])


def test_dormant_table_is_replaced_whole(fake, plan):
    backend = NftablesBackend()
    backend.apply(plan)
    fake.seed("table ip ipmasq_legacy { flags dormant; }")
    assert backend.drift(plan) == ["ipv4: unexpected table attribute 'flags dormant'"]
    mark = len(fake.log)
    backend.apply(plan)
    assert fake.dump() == COLD
    commits = [what for kind, what in since(fake, mark) if kind == "commit"]
    assert len(commits) == 1 and commits[0].startswith("add table ip ipmasq_legacy\ndelete table ip ipmasq_legacy\n")


def test_set_of_our_name_declared_otherwise_replaces_the_table(fake, plan):
    repaired(fake, plan, "delete set ip ipmasq_legacy exempt_b\nadd set ip ipmasq_legacy exempt_b { type ipv4_addr; }", ["ipv4: idle exempt set exempt_b declaration differs"])


def test_disabled_family_is_removed(fake, plan, tmp_path):
    backend = NftablesBackend()
    backend.apply(plan)
    only4 = plan_of(tmp_path, BASE + "ipv4-native-routing-cidr: 10.0.0.0/8\nenable-ipv6-masquerade: false\n")
    assert backend.drift(only4) == ["ipv6: installed but disabled"]
    assert backend.apply(only4) == ["ipv6 removed (disabled)"]
    assert fake.dump() == COLD[:COLD.index("table ip6 ")]
    assert NftablesBackend().apply(only4) == []


# ---------------------------------------------------------------- other engines' tables


def test_foreign_tables_are_byte_identical_across_apply_and_remove(fake, plan):
    fake.seed(FOREIGN)
    tables = [("ip", "nat"), ("inet", "firewalld"), ("inet", "netavark")]
    before = [fake.listing(*t) for t in tables]
    foreign_dump = fake.dump()
    backend = NftablesBackend()
    backend.apply(plan)
    fake.count("ip", "nat", "POSTROUTING", "docker0", 1, 60)  # their traffic goes on
    after_apply = [fake.listing(*t) for t in tables]
    assert after_apply[1:] == before[1:]
    assert after_apply[0] == before[0].replace("packets 12 bytes 720", "packets 13 bytes 780")
    assert backend.drift(plan) == []
    assert backend.remove() == ["ipv4", "ipv6"]
    assert [fake.listing(*t) for t in tables] == after_apply
    assert fake.dump() == foreign_dump.replace("packets 12 bytes 720", "packets 13 bytes 780")
    assert not any(f"table {t}" in what for kind, what in fake.log if kind == "commit"
                   for t in ("ip nat", "inet firewalld", "inet netavark"))


def test_remove_takes_our_tables_and_record(fake, plan):
    backend = NftablesBackend()
    backend.apply(plan)
    assert state.read_json(backend.RECORD)
    assert backend.remove() == ["ipv4", "ipv6"]
    assert fake.dump() == "" and state.read_json(backend.RECORD) == {}
    assert backend.remove() == []


# ---------------------------------------------------------------- failures


def test_failed_commit_leaves_the_dump_unchanged(fake, plan, tmp_path):
    backend = NftablesBackend()
    backend.apply(plan)
    dump, generation = fake.dump(), fake.generation
    fake.fail_next("commit", "Could not process rule: Cannot allocate memory", match="add rule ip ipmasq_legacy")
    other = plan_of(tmp_path, BASE.replace("eth+", "ens3") + "ipv4-native-routing-cidr: 10.0.0.0/8\n", "other")
    with pytest.raises(ApplyError, match=r"commit of the rules of table ip ipmasq_legacy failed: "
                                         r"line 1: Could not process rule: Cannot allocate memory"):
        backend.apply(other)
    assert (fake.dump(), fake.generation) == (dump, generation)
    backend.apply(other)  # the next attempt goes through
    assert 'oifname "ens3"' in fake.listing("ip", "ipmasq_legacy") and backend.drift(other) == []


def test_failed_check_commits_nothing(fake, plan):
    fake.fail_next("check", "syntax error, unexpected masquerade", match="ip6")
    backend = NftablesBackend()
    with pytest.raises(ApplyError, match="check of the rules of table ip6 ipmasq_legacy failed"):
        backend.apply(plan)
    assert fake.listing("ip", "ipmasq_legacy") == COLD[:COLD.index("table ip6 ")]  # ipv4 went first
    # ip6: the sets were declared and filled, no rule uses them, no chain was made
    assert "chain" not in fake.listing("ip6", "ipmasq_legacy")


def test_failed_patch_keeps_the_chain_on_the_old_list(fake, tmp_path):
    backend, _ = installed(tmp_path, fake, EXEMPT_OLD)
    dump = fake.dump()
    fake.fail_next("patch", errno.ENOMEM)
    with pytest.raises(ApplyError, match="netlink: patch of set exempt_b of table ip ipmasq_legacy failed: "
                                         "Cannot allocate memory"):
        backend.apply(plan_of(tmp_path, EXEMPT_NEW))
    assert fake.dump() == dump
    backend.apply(plan_of(tmp_path, EXEMPT_NEW))
    assert used_members(fake.listing("ip", "ipmasq_legacy"))[1] == ("10.0.0.0/8", "192.168.0.0/16", "224.0.0.0/4")


def test_overlapping_prefixes_are_refused_before_any_rule(fake):
    with pytest.raises(ApplyError, match="conflicting intervals"):
        NftablesBackend().apply(Plan((FamilyPlan(4, (), (), ("10.0.0.0/8", "10.1.0.0/16")),)))
    listing = fake.listing("ip", "ipmasq_legacy")
    assert "chain" not in listing and "elements" not in listing  # declared, empty, used by nothing


def test_stale_generation_is_refused(fake, plan):
    NftablesBackend().apply(plan)
    dump, generation = fake.dump(), fake.generation
    with pytest.raises(OSError) as exc:
        kernel.current().nft_patch(4, "ipmasq_legacy", "exempt_b", add=["192.0.2.0/24"], genid=generation - 1)
    assert exc.value.errno == errno.ERESTART
    assert (fake.dump(), fake.generation) == (dump, generation)
    kernel.current().nft_patch(4, "ipmasq_legacy", "exempt_b", add=["192.0.2.0/24"], genid=generation)
    assert fake.generation == generation + 1 and "192.0.2.0/24" in fake.listing("ip", "ipmasq_legacy")


def test_commit_under_a_patch_makes_apply_read_again(fake, tmp_path):
    backend, _ = installed(tmp_path, fake, EXEMPT_OLD)
    fake.meanwhile("patch", "add table ip kube-proxy")  # someone commits between our read and the patch
    mark = len(fake.log)
    backend.apply(plan_of(tmp_path, EXEMPT_NEW))
    kinds = [kind for kind, _ in fake.log[mark:]]
    # the first patch is refused (stale generation): apply reads both tables and does it again
    assert kinds[:4] == ["patch", "seed", "list", "list"]
    assert used_members(fake.listing("ip", "ipmasq_legacy")) == (
        "exempt_b", ("10.0.0.0/8", "192.168.0.0/16", "224.0.0.0/4"))
    assert fake.listing("ip", "kube-proxy") == "table ip kube-proxy {\n}\n"
    assert NftablesBackend().apply(plan_of(tmp_path, EXEMPT_NEW)) == []


# ---------------------------------------------------------------- reading: counters, fingerprint


def test_counters_name_rule_and_interface(fake, plan):
    backend = NftablesBackend()
    backend.apply(plan)
    fake.count("ip", "ipmasq_legacy", "postrouting", "masquerade", 7, 420)
    found = backend.counters(plan)
    assert [(c.family, c.interface, c.packets, c.bytes) for c in found] == [(4, "eth+", 7, 420), (6, "eth+", 0, 0)]
    assert found[0].rule == 'oifname "eth*" ip saddr 10.244.0.0/16 counter masquerade'
    assert NftablesBackend().counters() == found  # without a plan: the rules apply recorded


def test_fingerprint_moves_with_every_commit(fake, plan):
    backend = NftablesBackend()
    backend.apply(plan)
    before = backend.fingerprint()
    assert before == f"nf_tables generation {fake.generation}"
    fake.seed("add table ip other")
    assert backend.fingerprint() != before
    fake.generation = None  # nf_tables cannot be asked
    assert backend.fingerprint() is None


# ---------------------------------------------------------------- the driver and its probe


def test_probe_asks_the_kernel_and_runs_nothing(fake):
    assert nftdriver.probe_table(NFT_PROBE) is None
    assert all(call[0] != "unshare" for call in fake.calls)
    fake.fail_next("probe", "Could not process rule: No such file or directory")
    fake.library = False
    assert nftdriver.probe_table(NFT_PROBE) == nftdriver.PROBE_FAILED.format(
        "Could not process rule: No such file or directory")
    assert fake.dump() == ""  # a probe loads nothing here


def test_without_nft_binary_or_library_nftables_is_unavailable(fake):
    del fake.tools["nft"]
    reason = NftablesBackend().unavailable_reason()
    if fake.library:
        assert reason is None
    else:
        assert reason == ("no nft binary, and the libnftables binding cannot be used: no libnftables in this "
                          "fake kernel (install the nftables package)")
    assert NftablesBackend(use_cli=True).unavailable_reason() == "no nft binary (install the nftables package)"


# ---------------------------------------------------------------- the fake itself


def test_fake_script_is_all_or_nothing_with_nfts_error(fake):
    fake.seed(FOREIGN)
    dump, generation = fake.dump(), fake.generation
    proc = kernel.current().nft("add table ip t\nadd chain ip t c\nadd rule ip t c ip daddr @missing return\n")
    assert proc.returncode == 1
    assert _first_error(proc.stderr, 1) == "line 3: No such file or directory"
    assert (fake.dump(), fake.generation) == (dump, generation)


def test_fake_dump_round_trips_through_seed(fake, plan):
    fake.seed(FOREIGN)
    NftablesBackend().apply(plan)
    other = FakeNft()
    other.seed(fake.dump())
    assert other.dump() == fake.dump()
    assert parse_table(other.listing("ip", "ipmasq_legacy"), 4).rules == chain_rules(plan.family(4))
