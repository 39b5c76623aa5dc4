"""iptables backends: iptables-legacy and iptables-nft, through iptables-restore.

Per family, one `ipset restore` (the exempt set, named by its content) and then one
`iptables-restore --noflush -w` transaction that rewrites our chain and fixes the
POSTROUTING jump. The restore is the commit point: before it the old chain with the
old set is live, after it the new chain with the new set. The shapes are in
rules/iptables.yaml.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import ruledata
from ..plan import FamilyPlan, MasqueradeRule, Plan, masquerade_rules
from .base import FAMILIES, Backend, FamilyLive, Live, RuleCounter, missing_tools, run

SHAPES = ruledata.load("iptables")
CHAIN = SHAPES["chain"]
INBOUND = SHAPES["inbound"]
IN_CHAIN = INBOUND["chain"]
VARIANTS = ("legacy", "nft")
_JUMP_TARGET = f"-j {CHAIN}"
_COUNTER = re.compile(r" -c (\d+) (\d+)")


# ---------------------------------------------------------------- pure rendering


def set_name(fp: FamilyPlan) -> str:
    return SHAPES["set_name"].format(family=fp.family, digest=fp.exempt_digest()[:12])


def set_members(fp: FamilyPlan) -> list[str]:
    """hash:net cannot hold a /0: everything is exempt, spelled as two halves."""
    if not any(p.endswith("/0") for p in fp.exempt):
        return list(fp.exempt)
    halves = {"0.0.0.0/0": ["0.0.0.0/1", "128.0.0.0/1"], "::/0": ["::/1", "8000::/1"]}
    return [half for p in fp.exempt for half in halves.get(p, [p])]


def render_set(fp: FamilyPlan, name: str | None = None) -> str:
    """`ipset restore` input creating the exempt set of one family."""
    name = name or set_name(fp)
    members = set_members(fp)
    hashsize = 1024
    while hashsize * 4 < len(members):
        hashsize *= 2
    lines = [
        SHAPES["set_create"].format(
            name=name,
            ipset_family="inet" if fp.family == 4 else "inet6",
            hashsize=hashsize,
            maxelem=max(65536, len(members)),
        )
    ]
    lines += [SHAPES["set_add"].format(name=name, prefix=m) for m in members]
    return "\n".join(lines) + "\n"


def masquerade_line(rule: MasqueradeRule, random_fully: bool) -> str:
    """A masquerade rule, or an SNAT rule where the plan names the address
    (egress-masquerade-addresses)."""
    shapes = SHAPES
    pieces = dict(
        source=shapes["source"].format(prefix=rule.source) if rule.source else "",
        out_interface=(shapes["out_interface"].format(interface=rule.interface) if rule.interface
                       else shapes["out_interface_any"]),
        protocol=shapes["protocol"].format(protocol=rule.protocol) if rule.protocol else "",
        # xt_statistic keeps the probability as a fraction of 2^31 and prints that back
        port_share=shapes["port_share"].format(probability=rule.share / 2**31) if rule.share is not None else "",
        random_fully=shapes["random_fully"] if random_fully else "",
    )
    if rule.snat is None:
        return shapes["rules"]["masquerade"].format(
            to_ports=shapes["to_ports"].format(first=rule.ports[0], last=rule.ports[1]) if rule.ports else "",
            **pieces)
    ported = rule.ports and ":" in rule.snat
    return shapes["rules"]["snat"].format(
        address=shapes["snat_address6_ported"].format(address=rule.snat) if ported else rule.snat,
        ports=shapes["snat_ports"].format(first=rule.ports[0], last=rule.ports[1]) if rule.ports else "",
        **pieces)


def legacy_tables(family: int) -> set[str]:
    """The iptables-legacy tables that exist in this namespace, from /proc: listing a
    legacy table would create it, so every reader asks here first."""
    names = Path("/proc/net/ip_tables_names" if family == 4 else "/proc/net/ip6_tables_names")
    try:
        return set(names.read_text().split())
    except OSError:  # ip_tables not loaded
        return set()


def br_netfilter() -> bool:
    """br_netfilter is loaded here: bridged frames meet the ip hooks (a node fact)."""
    return Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists()


def chain_rules(fp: FamilyPlan, *, bridged: bool) -> list[str]:
    """Our chain, as `iptables -S CHAIN` prints it. `bridged`: br_netfilter is loaded
    (a node fact the backend reads, br_netfilter(): rendering reads nothing)."""
    rules = SHAPES["rules"]
    lines = [f"-N {CHAIN}"]
    if bridged:
        lines.append(rules["bridged"])
    lines += [rules["inbound"], rules["local"]]
    if fp.exempt:
        lines.append(rules["exempt"].format(set=set_name(fp)))
    return lines + [masquerade_line(r, fp.random_fully) for r in masquerade_rules(fp)]


def inbound_rules() -> list[str]:
    """The mangle chain that marks connections to the node, as -S prints it."""
    return [f"-N {IN_CHAIN}", INBOUND["mark"]]


def render_restore(fp: FamilyPlan, live_jumps: list[str] = (), live_in_jumps: list[str] = (), *,
                   bridged: bool) -> str:
    """One iptables-restore --noflush transaction: the mangle chain that marks connections
    to the node and the nat chain rewritten, exactly one jump to each."""
    lines = [f"*{INBOUND['table']}", f":{IN_CHAIN} - [0:0]", *inbound_rules()[1:]]
    if list(live_in_jumps) != [INBOUND["jump"]]:
        lines += ["-D" + jump[2:] for jump in live_in_jumps] + [INBOUND["jump"]]
    lines += ["COMMIT", f"*{SHAPES['table']}", f":{CHAIN} - [0:0]"]
    lines += chain_rules(fp, bridged=bridged)[1:]
    if list(live_jumps) != [SHAPES["jump"]]:
        lines += ["-D" + jump[2:] for jump in live_jumps]
        lines.append(SHAPES["jump"])
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_remove(live_jumps: list[str], chain_exists: bool, live_in_jumps: list[str] = (),
                  in_chain_exists: bool = False) -> str:
    lines = []
    if live_in_jumps or in_chain_exists:
        lines += [f"*{INBOUND['table']}", *("-D" + jump[2:] for jump in live_in_jumps)]
        if in_chain_exists:
            lines += [f":{IN_CHAIN} - [0:0]", f"-X {IN_CHAIN}"]
        lines.append("COMMIT")
    if live_jumps or chain_exists:
        lines += [f"*{SHAPES['table']}", *("-D" + jump[2:] for jump in live_jumps)]
        if chain_exists:
            lines += [f":{CHAIN} - [0:0]", f"-X {CHAIN}"]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _interface_of(rule: str) -> str:
    m = re.search(r"(?<!!) -o (\S+)", rule)
    return m.group(1) if m else ""


# ---------------------------------------------------------------- the backend


@dataclass
class IptablesFamilyLive(FamilyLive):
    jumps: list[str] = field(default_factory=list)  # POSTROUTING rules targeting our chain
    chain_exists: bool = False
    in_jumps: list[str] = field(default_factory=list)  # mangle PREROUTING rules targeting IN_CHAIN
    in_rules: list[str] = field(default_factory=list)  # IN_CHAIN as -S prints it ([]: missing)
    set_name: str | None = None
    stale_sets: list[str] = field(default_factory=list)  # ours, referenced by nothing (a crash's leftovers)


class IptablesBackend(Backend):
    def __init__(self, variant: str):
        assert variant in VARIANTS
        self.variant = variant
        self.name = f"iptables-{variant}"
        self.bridged = br_netfilter()  # read once: render and drift compare against the same

    def tool(self, family: int, suffix: str = "") -> str:
        base = "iptables" if family == 4 else "ip6tables"
        return f"{base}-{self.variant}{suffix}"

    def unavailable_reason(self) -> str | None:
        tools = [self.tool(f, s) for f in FAMILIES for s in ("", "-restore", "-save")] + ["ipset"]
        missing = missing_tools(*tools)
        if missing:
            return f"missing {', '.join(missing)} (install the iptables and ipset packages)"
        return None

    # -- rendering

    def render(self, plan: Plan) -> str:
        parts = []
        for fp in plan.families:
            if fp.exempt:
                parts.append(f"# IPv{fp.family}: ipset restore")
                parts.append(render_set(fp).rstrip("\n"))
            parts.append(f"# IPv{fp.family}: {self.tool(fp.family, '-restore')} --noflush -w")
            parts.append(render_restore(fp, bridged=self.bridged).rstrip("\n"))
        return "\n".join(parts) + "\n"

    # -- reading what we own

    def _nat_table_exists(self, family: int, table: str = "nat") -> bool:
        if self.variant == "legacy":
            return table in legacy_tables(family)
        return True  # iptables-nft lists without creating anything

    def _read_inbound(self, family: int, live: IptablesFamilyLive) -> None:
        if not self._nat_table_exists(family, INBOUND["table"]):
            return
        ipt = self.tool(family)
        pre = run([ipt, "-w", "-t", INBOUND["table"], "-S", "PREROUTING"], check=False)
        live.in_jumps = [ln for ln in pre.stdout.splitlines() if ln.endswith(f" -j {IN_CHAIN}")]
        chain = run([ipt, "-w", "-t", INBOUND["table"], "-S", IN_CHAIN], check=False)
        live.in_rules = chain.stdout.splitlines() if chain.returncode == 0 else []

    def _read_family(self, family: int, all_sets: list[str]) -> FamilyLive:
        live = IptablesFamilyLive(family=family, installed=False)
        owned = [n for n in all_sets if n.startswith(SHAPES["set_name"].format(family=family, digest=""))]
        self._read_inbound(family, live)
        if not self._nat_table_exists(family):
            live.stale_sets = owned
            live.installed = bool(live.in_jumps or live.in_rules)
            return live
        ipt = self.tool(family)
        post = run([ipt, "-w", "-t", "nat", "-S", "POSTROUTING"], check=False)
        live.jumps = [ln for ln in post.stdout.splitlines() if ln.endswith(" " + _JUMP_TARGET)]
        chain = run([ipt, "-w", "-t", "nat", "-v", "-S", CHAIN], check=False)
        live.chain_exists = chain.returncode == 0
        if live.chain_exists:
            live.rules, live.counters = _chain_rules_counted(family, chain.stdout)
        live.installed = live.chain_exists or bool(live.jumps or live.in_jumps or live.in_rules)
        live.set_name = next(
            (m.group(1) for ln in live.rules if (m := re.search(r"--match-set (\S+) dst", ln))), None
        )
        if live.set_name:
            saved = run(["ipset", "save", live.set_name], check=False)
            if saved.returncode == 0:
                members = [ln.split()[2] for ln in saved.stdout.splitlines() if ln.startswith("add ")]
                live.exempt = _as_prefixes(members, family)
            else:
                live.problems.append(f"set {live.set_name} missing")
        live.stale_sets = [n for n in owned if n != live.set_name]
        return live

    def fingerprint(self) -> str | None:
        """A digest of the same reads as live(), without counters: our chain, the jumps to
        it, the members of the sets we own. At 100,000 prefixes this costs the reads
        (about 0.1 s), not the parsing, planning and comparing a full check adds."""
        digest = hashlib.sha256()
        all_sets = run(["ipset", "list", "-n"], check=False).stdout.split()
        for family in FAMILIES:
            owned = sorted(n for n in all_sets if n.startswith(SHAPES["set_name"].format(family=family, digest="")))
            digest.update(f"{family} {owned}".encode())
            if self._nat_table_exists(family):
                for chain in ("POSTROUTING", CHAIN):
                    digest.update(run([self.tool(family), "-w", "-t", "nat", "-S", chain], check=False).stdout.encode())
            if self._nat_table_exists(family, INBOUND["table"]):
                for chain in ("PREROUTING", IN_CHAIN):
                    digest.update(run([self.tool(family), "-w", "-t", INBOUND["table"], "-S", chain],
                                      check=False).stdout.encode())
            digest.update(b"bridged" if self.bridged else b"")
            for name in owned:
                digest.update(run(["ipset", "save", name], check=False).stdout.encode())
        return f"{self.name} {digest.hexdigest()}"

    def live(self) -> Live:
        all_sets = run(["ipset", "list", "-n"], check=False).stdout.split()
        return Live(self.name, {f: self._read_family(f, all_sets) for f in FAMILIES})

    def counters(self, plan: Plan | None = None) -> list[RuleCounter]:
        """Our chain's masquerade and snat counters: `-v -S` of our chain per family (an
        ipset's members are never listed)."""
        out: list[RuleCounter] = []
        for family in FAMILIES:
            if self._nat_table_exists(family):
                chain = run([self.tool(family), "-w", "-t", "nat", "-v", "-S", CHAIN], check=False)
                if chain.returncode == 0:
                    out += _chain_rules_counted(family, chain.stdout)[1]
        return out

    # -- comparing

    def family_drift(self, fp: FamilyPlan | None, live: IptablesFamilyLive) -> list[str]:
        stale = [f"{len(live.stale_sets)} stale sets"] if live.stale_sets else []
        if fp is None:
            return (["installed but disabled"] if live.installed else []) + stale
        if not live.installed:
            return ["not installed"]
        problems = list(live.problems) + stale
        if not live.chain_exists:
            problems.append(f"chain {CHAIN} missing")
        elif live.rules != chain_rules(fp, bridged=self.bridged):
            problems.append(f"chain {CHAIN} differs")
        if live.jumps != [SHAPES["jump"]]:
            problems.append(f"{len(live.jumps)} jumps from POSTROUTING instead of 1")
        if live.in_rules != inbound_rules():
            problems.append(f"chain {IN_CHAIN} " + ("missing" if not live.in_rules else "differs"))
        if live.in_jumps != [INBOUND["jump"]]:
            problems.append(f"{len(live.in_jumps)} jumps from mangle PREROUTING instead of 1")
        if fp.exempt and live.set_name == set_name(fp) and not live.problems:
            if not _same_members(live.exempt, set_members(fp)):
                problems.append(f"set {live.set_name} members differ")
        return problems

    # -- changing

    def _ensure_set(self, fp: FamilyPlan, live: IptablesFamilyLive) -> None:
        name = set_name(fp)
        exists = run(["ipset", "list", "-n", name], check=False).returncode == 0
        if exists and live.set_name == name and not live.problems:
            if _same_members(live.exempt, set_members(fp)):
                return
        if exists:
            # The name is taken by a set whose members drifted: build the right
            # members aside and swap them in atomically.
            tmp = f"{name[:25]}-tmp"
            text = f"destroy {tmp}\n" if run(["ipset", "list", "-n", tmp], check=False).returncode == 0 else ""
            text += render_set(fp, tmp) + f"swap {tmp} {name}\ndestroy {tmp}\n"
        else:
            text = render_set(fp)
        run(["ipset", "restore"], input=text)

    def _destroy_stale_sets(self, family: int, keep: str | None) -> None:
        listed = run(["ipset", "list", "-n"], check=False).stdout.split()
        prefix = SHAPES["set_name"].format(family=family, digest="")
        for name in listed:
            if name.startswith(prefix) and name != keep:
                # A set still referenced (by the other iptables variant, mid-migration)
                # refuses to go; it is removed by whichever apply or flush frees it.
                run(["ipset", "destroy", name], check=False)

    def apply(self, plan: Plan) -> list[str]:
        changes = []
        current = self.live()
        for family, fp in self.wanted_families(plan).items():
            live = current.families[family]
            problems = self.family_drift(fp, live)
            if not problems:
                continue
            if live.stale_sets and len(problems) == 1 and problems[0].endswith("stale sets"):
                # Only a crash's leftovers: destroy them, leave the live chain (and its counters) alone.
                self._destroy_stale_sets(family, live.set_name)
                changes.append(f"ipv{family}: {problems[0]} destroyed")
                continue
            if fp is None:
                self._remove_family(family, live)
                changes.append(f"ipv{family} removed (disabled)")
                continue
            if fp.exempt:
                self._ensure_set(fp, live)
            run([self.tool(family, "-restore"), "--noflush", "-w"],
                input=render_restore(fp, live.jumps, live.in_jumps, bridged=self.bridged))
            self._destroy_stale_sets(family, set_name(fp) if fp.exempt else None)
            what = "installed" if not live.installed else "updated (" + ", ".join(problems) + ")"
            changes.append(f"ipv{family} {what}: {len(chain_rules(fp, bridged=self.bridged)) - 1} rules, {len(fp.exempt)} exempt prefixes")
        return changes

    def _remove_family(self, family: int, live: IptablesFamilyLive) -> bool:
        if live.installed:
            text = render_remove(live.jumps, live.chain_exists, live.in_jumps, bool(live.in_rules))
            run([self.tool(family, "-restore"), "--noflush", "-w"], input=text)
        self._destroy_stale_sets(family, None)
        return live.installed

    def remove(self) -> list[str]:
        if self.unavailable_reason():
            return []
        current = self.live()
        return [f"ipv{f}" for f in FAMILIES if self._remove_family(f, current.families[f])]


def _chain_rules_counted(family: int, text: str) -> tuple[list[str], list[RuleCounter]]:
    """Our chain as `-v -S` prints it: its rules (counters taken out) and the counters
    of its masquerade and snat rules."""
    rules, counters = [], []
    for line in text.splitlines():
        m = _COUNTER.search(line)
        rule = _COUNTER.sub("", line)
        rules.append(rule)
        if m and ("-j MASQUERADE" in rule or "-j SNAT" in rule):
            counters.append(RuleCounter(family, rule, _interface_of(rule), int(m.group(1)), int(m.group(2))))
    return rules, counters


def _as_prefixes(members: list[str], family: int) -> tuple[str, ...]:
    """ipset prints a single address without its /32 or /128."""
    host = "/32" if family == 4 else "/128"
    return tuple(m if "/" in m else m + host for m in members)


def _same_members(live: tuple[str, ...], planned: list[str]) -> bool:
    """Compared as text first (100,000 prefixes in milliseconds); only when the text differs
    are both parsed, in case ipset spells an address differently from Python."""
    if set(live) == set(planned):
        return True
    return {ipaddress.ip_network(m) for m in live} == {ipaddress.ip_network(m) for m in planned}


# ---------------------------------------------------------------- which variant the host uses


def detect_variant() -> tuple[str, str]:
    """(variant, why): the iptables the host already uses, as iptables-wrapper decides,
    except that where our own chain already lives wins (so re-apply stays put)."""
    saves = {}
    for variant in VARIANTS:
        text = ""
        for family in FAMILIES:
            base = "iptables" if family == 4 else "ip6tables"
            if not missing_tools(f"{base}-{variant}-save"):
                text += run([f"{base}-{variant}-save"], check=False).stdout
        saves[variant] = text
    for variant in VARIANTS:
        if f":{CHAIN} " in saves[variant]:
            return variant, f"our chain {CHAIN} is installed with iptables-{variant}"
    for variant in VARIANTS:
        if re.search(r"^:KUBE-(IPTABLES-HINT|KUBELET-CANARY) ", saves[variant], re.M):
            return variant, f"kubelet's hint chain is in iptables-{variant}"
    counts = {v: sum(1 for ln in saves[v].splitlines() if ln.startswith("-")) for v in VARIANTS}
    if counts["legacy"] > counts["nft"]:
        return "legacy", f"iptables-legacy holds more rules ({counts['legacy']} vs {counts['nft']})"
    if counts["nft"] > 0:
        return "nft", f"iptables-nft holds more rules ({counts['nft']} vs {counts['legacy']})"
    version = run(["iptables", "--version"], check=False).stdout if not missing_tools("iptables") else ""
    if "legacy" in version:
        return "legacy", "no rules anywhere; the system's iptables is iptables-legacy"
    return "nft", "no rules anywhere; iptables-nft is the default"
