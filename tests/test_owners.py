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


# ---------------------------------------------------------------- the iptables variant


def iptables_node(saves: dict[str, str], *, legacy_nat: bool = True, version: str = "iptables v1.8.9 (nf_tables)"):
    """A FakeKernel whose `{ip,ip6}tables-{legacy,nft}-save` print `saves[tool]` (a
    `-t TABLE` listing: only that table's part) and whose /proc lists the legacy nat table."""
    from ipmasq_legacy import kernel

    from .fakes import FakeKernel

    fake = FakeKernel()

    def save(argv, _input):
        text = saves.get(argv[0], "")
        if "-t" in argv:
            table = argv[argv.index("-t") + 1]
            parts = text.split("*")
            text = "".join("*" + p for p in parts if p.startswith(table + "\n"))
        return 0, text, ""

    for family in ("iptables", "ip6tables"):
        for variant in ("legacy", "nft"):
            fake.tools[f"{family}-{variant}-save"] = save
    fake.tools["iptables"] = lambda argv, _input: (0, version + "\n", "")
    if legacy_nat:
        fake.files["/proc/net/ip_tables_names"] = fake.files["/proc/net/ip6_tables_names"] = "nat\nfilter\n"
    return kernel.use(fake)


def rules(n: int, table: str = "filter", chains: str = "") -> str:
    return f"*{table}\n:INPUT ACCEPT [0:0]\n{chains}" + "".join(f"-A INPUT -s 10.0.0.{i}/32 -j ACCEPT\n"
                                                                  for i in range(n)) + "COMMIT\n"


HINT = ":KUBE-IPTABLES-HINT - [0:0]\n"
OURS = ":IPMASQ-LEGACY - [0:0]\n"


@pytest.mark.parametrize("saves, variant, why", [
    ({}, "nft", "no rules anywhere; iptables-nft is the default"),
    ({"iptables-legacy-save": rules(3)}, "legacy", "iptables-legacy holds more rules (3 vs 0)"),
    ({"iptables-legacy-save": rules(2), "ip6tables-nft-save": rules(3)}, "nft", "iptables-nft holds more rules (3 vs 2)"),
    # both families count; a tie goes to iptables-nft, as iptables-wrapper decides
    ({"iptables-legacy-save": rules(2), "ip6tables-legacy-save": rules(2), "iptables-nft-save": rules(4)},
     "nft", "iptables-nft holds as many rules as iptables-legacy (4): iptables-nft on a tie"),
    # kubelet's hint beats the counts; in both variants iptables-nft's wins
    ({"iptables-legacy-save": rules(9), "iptables-nft-save": rules(0, "mangle", HINT)},
     "nft", "kubelet's KUBE-IPTABLES-HINT / KUBE-KUBELET-CANARY chain is in iptables-nft"),
    ({"iptables-legacy-save": rules(0, "mangle", HINT), "iptables-nft-save": rules(9, "mangle", HINT)},
     "nft", "kubelet's KUBE-IPTABLES-HINT / KUBE-KUBELET-CANARY chain is in iptables-nft"),
    ({"ip6tables-legacy-save": rules(0, "mangle", HINT), "iptables-nft-save": rules(9)},
     "legacy", "kubelet's KUBE-IPTABLES-HINT / KUBE-KUBELET-CANARY chain is in iptables-legacy"),
    # our own chain beats kubelet's hint
    ({"iptables-legacy-save": rules(1, "nat", OURS), "iptables-nft-save": rules(0, "mangle", HINT)},
     "legacy", "our chain IPMASQ-LEGACY is in iptables-legacy"),
])
def test_detect_variant(saves, variant, why):
    from ipmasq_legacy.backends import iptables, variants

    with iptables_node(saves):
        assert variants.detect() == (variant, why)
        assert iptables.detect_variant() == (variant, why)


def test_detect_variant_without_rules_asks_the_system_iptables():
    from ipmasq_legacy.backends import variants

    with iptables_node({}, version="iptables v1.8.7 (legacy)"):
        assert variants.detect() == ("legacy", "no rules anywhere; the system's iptables is iptables-legacy")


@pytest.mark.parametrize("saves, engine", [
    ({"iptables-legacy-save": rules(0, "mangle", HINT), "iptables-nft-save": rules(9, "mangle", HINT)}, "iptables-nft"),
    ({"iptables-legacy-save": rules(1, "nat", OURS), "iptables-nft-save": rules(0, "mangle", HINT)}, "iptables-legacy"),
    ({"iptables-legacy-save": rules(4), "iptables-nft-save": rules(4)}, "iptables-nft"),
    ({"iptables-legacy-save": rules(5), "iptables-nft-save": rules(4)}, "iptables-legacy"),
])
def test_auto_and_the_iptables_datapath_agree(saves, engine, monkeypatch):
    """`auto`'s hint and count steps pick the variant `--backend iptables` would."""
    from ipmasq_legacy.backends import selection, variants

    monkeypatch.setattr(selection, "_firewalld", lambda: None)
    with iptables_node(saves):
        found = selection.host_rules()
        assert found.counts == {"iptables-legacy": variants.read()["legacy"].rules,
                                "iptables-nft": variants.read()["nft"].rules, "nftables": 0}
        name, _why = selection._heuristics(dict.fromkeys(("iptables-legacy", "iptables-nft", "nftables")))
        assert name == engine == f"iptables-{variants.detect()[0]}"


def test_a_legacy_table_is_listed_by_name_only_where_it_exists():
    from ipmasq_legacy import kernel
    from ipmasq_legacy.backends import engines, variants

    with iptables_node({"iptables-legacy-save": rules(1, "nat", OURS)}, legacy_nat=False):
        assert variants.saves("legacy", "nat") == {}
        assert engines._legacy_chains() == set()
        assert not any("-t" in call for call in kernel.current().calls)
    with iptables_node({"iptables-legacy-save": rules(1, "nat", OURS)}):
        assert variants.saves("legacy", "nat") == {4: rules(1, "nat", OURS), 6: ""}
        assert engines._legacy_chains() == {"IPMASQ-LEGACY"}


def test_others_read_both_variants_through_the_seam():
    from ipmasq_legacy import others

    docker = rules(0, "nat", ":DOCKER - [0:0]\n").replace(
        "COMMIT", "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\nCOMMIT")
    with iptables_node({"iptables-nft-save": docker, "ip6tables-legacy-save": docker}):
        found = others.find()
    assert {(f.manager, f.where) for f in found} == {("docker", "iptables-nft ipv4"), ("docker", "iptables-legacy ipv6")}


# ---------------------------------------------------------------- nft through the kernel seam


def nft_node():
    """A FakeKernel with an `nft` that records (argv, input) and succeeds, listing `table ip
    nat` as iptables-nft leaves it empty."""
    from .fakes import FakeKernel

    fake = FakeKernel()
    fake.scripts = []
    empty_nat = ('{"nftables": [{"metainfo": {}}, {"table": {"family": "ip", "name": "nat"}}, '
                 '{"chain": {"family": "ip", "table": "nat", "name": "POSTROUTING", "policy": "accept"}}]}')

    def nft(argv, input):
        fake.scripts.append((argv, input))
        if argv[1:3] == ["-j", "list"]:
            return (0, empty_nat, "") if argv[4:] == ["ip", "nat"] else (1, "", "Error: No such file or directory")
        if argv[1:] == ["--version"]:
            return 0, "nftables v1.0.9 (Old Doc Yak #3)\n", ""
        return 0, "", ""

    fake.tools["nft"] = nft
    return fake


def test_ebpf_keeper_tables_are_written_through_the_seam():
    from ipmasq_legacy import kernel
    from ipmasq_legacy.backends.ebpf import keeper

    fake = nft_node()
    with kernel.use(fake):
        assert keeper.add_keeper()
        assert keeper.add_drain_tables()
        assert keeper.write_notrack(keeper.notrack_text([3], ("eth+",), (4,))) == (0, "")
    assert [argv for argv, _ in fake.scripts] == [["nft", "-f", "-"]] * 3
    keeper_script, drain_script, notrack_script = (text for _, text in fake.scripts)
    assert keeper_script == (f"add table inet {keeper.KEEPER_TABLE}\ndelete table inet {keeper.KEEPER_TABLE}\n"
                             + keeper.KEEPER)
    assert "table ip6 ipmasq_legacy_drain {" in drain_script
    assert 'fib daddr oifname "eth*" return' in notrack_script and "meta nfproto ipv6 return" in notrack_script


def test_ebpf_keeper_without_nft():
    from ipmasq_legacy import kernel
    from ipmasq_legacy.backends.ebpf import keeper

    from .fakes import FakeKernel

    with kernel.use(FakeKernel()):
        assert not keeper.add_keeper()
        assert keeper._nft("flush ruleset\n") == (127, "nft: command not found")
        assert keeper.nft_tables() == set()


def test_flush_deletes_the_nat_table_it_created_through_the_seam(tmp_path, monkeypatch):
    from ipmasq_legacy import kernel, state
    from ipmasq_legacy.backends import tables

    monkeypatch.setenv("IPMASQ_STATE_DIR", str(tmp_path))
    state.write_json(tables.RECORD, {"existed": [["ip6", "nat"]]})
    monkeypatch.setattr(tables, "_present", lambda: [["ip", "nat"], ["ip6", "nat"]])
    fake = nft_node()
    with kernel.use(fake):
        assert tables.remove_created() == ["table ip nat"]
    assert fake.scripts[-1] == (["nft", "-f", "-"], "delete chain ip nat POSTROUTING\ndelete table ip nat\n")


def test_doctor_asks_versions_of_the_seam():
    from ipmasq_legacy import doctor, kernel

    with kernel.use(nft_node()):
        assert doctor._version(["nft", "--version"]) == "nftables v1.0.9 (Old Doc Yak #3)"
        assert doctor._version(["ipset", "--version"]) is None


# ---------------------------------------------------------------- nft table shapes in rules/


def test_the_ebpf_tables_are_rules_data():
    """keeper.py writes the tables of rules/ebpf.yaml `nft_tables`, as `nft list` prints them."""
    from ipmasq_legacy import ruledata
    from ipmasq_legacy.backends.ebpf import keeper

    spec = ruledata.load("ebpf")["nft_tables"]
    assert keeper.KEEPER == ("table inet ipmasq_legacy_ebpf {\n\tchain conntrack {\n"
                             "\t\ttype filter hook prerouting priority filter; policy accept;\n"
                             "\t\tct state untracked accept\n\t}\n}\n")
    assert keeper.KEEPER_TABLES == (("inet", spec["keeper"]["table"]),)
    assert keeper.DRAIN_TABLES == (("ip", "ipmasq_legacy_drain"), ("ip6", "ipmasq_legacy_drain"))
    assert keeper.DRAIN.count("type nat hook postrouting priority srcnat; policy accept;") == 2


@pytest.mark.parametrize("links, patterns, families, digest", [
    # digests of the tables as written before the shapes moved to rules/: unchanged, so an
    # upgrade rewrites nothing
    ([7, 2, 11], ("eth0", "ens+", "wg0"), (4,), "d0f3fee3c3af99acdd8b3feab9bc73b6"),
])
def test_the_notrack_table(links, patterns, families, digest):
    from ipmasq_legacy.backends.ebpf import keeper

    text = keeper.notrack_text(links, patterns, families)
    assert keeper.notrack_digest(text) == digest.encode()
    assert text == (
        "table inet ipmasq_legacy_notrack {\n"
        f'\tcomment "ipmasq-legacy {digest}"\n'
        "\tset links {\n\t\ttype iface_index\n\t\telements = { 2, 7, 11 }\n\t}\n"
        "\tchain prerouting {\n\t\ttype filter hook prerouting priority raw; policy accept;\n"
        "\t\tmeta nfproto ipv6 return\n\t\tmeta l4proto { tcp, udp } goto forwarded\n"
        "\t\ticmp type { echo-request, echo-reply } goto forwarded\n"
        "\t\ticmpv6 type { echo-request, echo-reply } goto forwarded\n\t}\n"
        "\tchain forwarded {\n\t\tfib daddr type local return\n\t\tfib daddr oif @links notrack\n"
        "\t\tiif @links goto entered\n\t}\n"
        '\tchain entered {\n\t\tfib daddr oifname "eth0" return\n\t\tfib daddr oifname "ens*" return\n'
        '\t\tfib daddr oifname "wg0" return\n\t\tnotrack\n\t}\n}\n')


def test_the_notrack_table_without_patterns_links_or_a_family_off():
    from ipmasq_legacy.backends.ebpf import keeper

    text = keeper.notrack_text([], (), (4, 6))
    assert "entered" not in text and "nfproto" not in text and "elements" not in text
    assert "\tset links {\n\t\ttype iface_index\n\t}\n" in text


def test_the_nftables_probe_is_rules_data():
    from ipmasq_legacy import ruledata
    from ipmasq_legacy.backends import selection

    assert selection.NFT_PROBE == ruledata.load("nftables")["probe"]
    assert selection.NFT_PROBE.startswith("table ip ipmasq_probe {\n    set exempt {")
    assert "masquerade to :1024-65535 fully-random" in selection.NFT_PROBE


# ---------------------------------------------------------------- import circles


def _imports() -> dict[str, dict[str, bool]]:
    """module -> {module it imports: at the top (True) or only inside a function}."""
    import ast

    import ipmasq_legacy

    root = Path(ipmasq_legacy.__file__).parent
    mods = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, dict[str, bool]] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                for n in ast.walk(f)}
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + (node.module or "").split(".")).strip(".") \
                    if node.level else node.module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                if target in mods and target != mod:
                    edges = graph.setdefault(mod, {})
                    edges[target] = edges.get(target, False) or id(node) not in lazy
    return graph


def test_no_module_imports_back_at_the_top():
    graph = _imports()
    top = {m: {t for t, at_top in edges.items() if at_top} for m, edges in graph.items()}

    def reaches(start, goal, seen):
        return any(t == goal or (t not in seen and not seen.add(t) and reaches(t, goal, seen))
                   for t in top.get(start, ()))

    assert [m for m in top if reaches(m, m, set())] == []


def test_the_backends_never_import_their_package_or_doctor():
    """The registry (backends/__init__.py) imports the backends, doctor imports it: a
    backend module importing either, even inside a function, is a circle."""
    graph = _imports()
    back = {(m, t) for m, edges in graph.items() if m.startswith("ipmasq_legacy.backends.")
            for t in edges if t in ("ipmasq_legacy.backends", "ipmasq_legacy.doctor")}
    assert back == set()
    assert "ipmasq_legacy.doctor" not in graph["ipmasq_legacy.backends"]
