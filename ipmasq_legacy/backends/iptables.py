"""iptables backends: iptables-legacy and iptables-nft, through iptables-restore.

Per family, one `ipset restore` (the difference, into the exempt set no rule uses:
backends/ipsets.py) and then one `iptables-restore --noflush -w` transaction that
rewrites our chain, pointing its rule at that set, and fixes the POSTROUTING jump; then
the other set gets the same difference. The restore is the commit point: before it the
old chain with the old set is live, after it the new chain with the new set. The
shapes are in rules/iptables.yaml.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import kernel, ruledata, state
from ..errors import ApplyError
from ..plan import FamilyPlan, MasqueradeRule, Plan, masquerade_rules
from . import ipsets
from .base import FAMILIES, Backend, FamilyLive, Live, RuleCounter, missing_tools, run
from .variants import VARIANTS, legacy_tables  # noqa: F401  (ebpf's assist imports them from here)
from .variants import detect as detect_variant  # noqa: F401  (the one rule: variants.py)

SHAPES = ruledata.load("iptables")
CHAIN = SHAPES["chain"]
INBOUND = SHAPES["inbound"]
IN_CHAIN = INBOUND["chain"]
_JUMP_TARGET = f"-j {CHAIN}"
_COUNTER = re.compile(r" -c (\d+) (\d+)")


# ---------------------------------------------------------------- pure rendering


def set_name(fp: FamilyPlan, slot: str | None = None) -> str:
    """The exempt set the chain matches: `slot`, the first of the family's two by default
    (what a new install uses)."""
    return slot or ipsets.SLOTS[fp.family][0]


def content_name(fp: FamilyPlan) -> str:
    """A set named by its content: apply's when neither slot is free."""
    return SHAPES["set_content_name"].format(family=fp.family, digest=fp.exempt_digest()[:12])


def set_members(fp: FamilyPlan) -> Sequence[str]:
    """hash:net cannot hold a /0: everything is exempt, spelled as two halves. Otherwise
    the plan's own tuple, the same object each time (ipsets.difference remembers by it)."""
    if "0.0.0.0/0" not in fp.exempt and "::/0" not in fp.exempt:
        return fp.exempt
    halves = {"0.0.0.0/0": ["0.0.0.0/1", "128.0.0.0/1"], "::/0": ["::/1", "8000::/1"]}
    return [half for p in fp.exempt for half in halves.get(p, [p])]


def render_set(fp: FamilyPlan, name: str | None = None) -> str:
    """`ipset restore` input creating the exempt set of one family."""
    name = name or set_name(fp)
    members = set_members(fp)
    hashsize = 1024
    while hashsize * 4 < len(members):
        hashsize *= 2
    # maxelem is a limit, not memory: room to grow, as a full set refuses a patch's adds
    maxelem = 65536
    while maxelem < 2 * len(members):
        maxelem *= 2
    lines = [
        SHAPES["set_create"].format(
            name=name,
            ipset_family="inet" if fp.family == 4 else "inet6",
            hashsize=hashsize,
            maxelem=maxelem,
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


def br_netfilter() -> bool:
    """br_netfilter is loaded here: bridged frames meet the ip hooks (a node fact)."""
    return kernel.current().read_text("/proc/sys/net/bridge/bridge-nf-call-iptables") is not None


def chain_rules(fp: FamilyPlan, *, bridged: bool, exempt_set: str | None = None) -> list[str]:
    """Our chain, as `iptables -S CHAIN` prints it, matching set `exempt_set` (default:
    set_name's). `bridged`: br_netfilter is loaded (a node fact the backend reads,
    br_netfilter(): rendering reads nothing)."""
    rules = SHAPES["rules"]
    lines = [f"-N {CHAIN}"]
    if bridged:
        lines.append(rules["bridged"])
    lines += [rules["inbound"], rules["local"]]
    if fp.exempt:
        lines.append(rules["exempt"].format(set=exempt_set or set_name(fp)))
    return lines + [masquerade_line(r, fp.random_fully) for r in masquerade_rules(fp)]


def inbound_rules() -> list[str]:
    """The mangle chain that marks connections to the node, as -S prints it."""
    return [f"-N {IN_CHAIN}", INBOUND["mark"]]


def render_restore(fp: FamilyPlan, live_jumps: Sequence[str] = (), live_in_jumps: Sequence[str] = (), *,
                   bridged: bool, exempt_set: str | None = None) -> str:
    """One iptables-restore --noflush transaction: the mangle chain that marks connections
    to the node and the nat chain rewritten, exactly one jump to each."""
    lines = [f"*{INBOUND['table']}", f":{IN_CHAIN} - [0:0]", *inbound_rules()[1:]]
    if list(live_in_jumps) != [INBOUND["jump"]]:
        lines += ["-D" + jump[2:] for jump in live_in_jumps] + [INBOUND["jump"]]
    lines += ["COMMIT", f"*{SHAPES['table']}", f":{CHAIN} - [0:0]"]
    lines += chain_rules(fp, bridged=bridged, exempt_set=exempt_set)[1:]
    if list(live_jumps) != [SHAPES["jump"]]:
        lines += ["-D" + jump[2:] for jump in live_jumps]
        lines.append(SHAPES["jump"])
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_remove(live_jumps: Sequence[str], chain_exists: bool, live_in_jumps: Sequence[str] = (),
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
    set_name: str | None = None  # the set our chain's exempt rule matches
    heads: dict[str, ipsets.Head] = field(default_factory=dict)  # our sets of this family, as `ipset list -t` says
    slots: dict[str, tuple[str, ...]] = field(default_factory=dict)  # what each slot there is holds
    stale_sets: list[str] = field(default_factory=list)  # ours, neither a slot nor matched (a crash's leftovers)


class IptablesBackend(Backend[IptablesFamilyLive]):
    # reconcile's quick path trusts fingerprint(), which reads the sets' headers, not their
    # members (ipsets.py: what that misses); agent.py makes every DEEP_EVERY-th run a full one
    fingerprint_partial = True
    SETTLE = 2.0  # seconds remove waits for the kernel to let go of our sets (_destroy_sets)

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
                parts.append(f"# IPv{fp.family}: ipset restore (both exempt sets, before any rule uses them)")
                parts.append("".join(render_set(fp, name) for name in ipsets.SLOTS[fp.family]).rstrip("\n"))
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

    def _read_family(self, family: int, heads: dict[str, ipsets.Head], record: ipsets.Record | None,
                     members: bool = True) -> IptablesFamilyLive:
        """Our chains and sets. The slots' members (unless not `members`) come from
        `record` where it vouches for them (ipsets.py), else from `ipset save`; record
        None: always read (deep)."""
        live = IptablesFamilyLive(family=family, installed=False)
        live.heads = {n: h for n, h in heads.items() if ipsets.ours(n, family)}
        self._read_inbound(family, live)
        if self._nat_table_exists(family):
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
        if members:
            for name in ipsets.SLOTS[family]:
                held = record.members(family, name, live.heads.get(name)) if record else None
                if held is None and name in live.heads:
                    held = ipsets.read_members(name, family)
                if held is not None:
                    live.slots[name] = held
        if live.set_name in live.slots:
            live.exempt = live.slots[live.set_name]
        elif live.set_name and members:
            found = ipsets.read_members(live.set_name, family)
            if found is None:
                live.problems.append(f"set {live.set_name} missing")
            else:
                live.exempt = found
        live.stale_sets = [n for n in live.heads if n not in ipsets.SLOTS[family] and n != live.set_name]
        return live

    def fingerprint(self) -> str | None:
        """A digest of our chain, the jumps to it and our sets' headers (`ipset list -t`:
        count, size in memory, hash seed; not the members: ipsets.py says what that
        misses, and fingerprint_partial why that is enough). No counters."""
        digest = hashlib.sha256()
        heads = ipsets.heads()
        chains = self._chain_listings()
        for family in FAMILIES:
            owned = sorted((n, h.identity(), h.references) for n, h in heads.items() if ipsets.ours(n, family))
            digest.update(f"{family} {owned}".encode())
            digest.update(chains[family].encode())
            digest.update(b"bridged" if self.bridged else b"")
        return f"{self.name} {digest.hexdigest()}"

    # The listings of our chains and the built-in chains that jump to them cost 8 tool
    # processes (~25 ms of CPU, a quarter of a no-op reconcile). iptables-nft's rules are
    # nf_tables': while nf_tables' generation (one netlink question) has not moved, they
    # are what they were, so the listings are kept with the generation they were read at.
    # Only on the real node: the fakes (tests/fakes/iptables.py) model no generation.
    LISTINGS = "iptables-nft-listings.json"

    def _chain_listings(self) -> dict[int, str]:
        """Per family, `-S` of POSTROUTING and our chain (nat), of PREROUTING and our
        inbound chain (mangle), concatenated, where the table exists."""
        k = kernel.current()
        if self.variant != "nft" or k is not kernel.SYSTEM:
            return self._read_listings()
        key = [k.nft_generation(), state.netns_id()]
        record = state.read_json(self.LISTINGS)
        if key[0] is not None and record.get("key") == key:
            try:
                return {family: str(record["listings"][str(family)]) for family in FAMILIES}
            except (KeyError, TypeError):
                pass
        listings = self._read_listings()
        if key[0] is not None and k.nft_generation() == key[0]:  # nothing committed while they were read
            try:
                state.write_json(self.LISTINGS, {"key": key, "listings": {str(f): t for f, t in listings.items()}})
            except OSError:
                pass  # no state directory we may write: read them again next time
        return listings

    def _read_listings(self) -> dict[int, str]:
        out = {}
        for family in FAMILIES:
            text = ""
            if self._nat_table_exists(family):
                for chain in ("POSTROUTING", CHAIN):
                    text += run([self.tool(family), "-w", "-t", "nat", "-S", chain], check=False).stdout
            if self._nat_table_exists(family, INBOUND["table"]):
                for chain in ("PREROUTING", IN_CHAIN):
                    text += run([self.tool(family), "-w", "-t", INBOUND["table"], "-S", chain], check=False).stdout
            out[family] = text
        return out

    def live(self) -> Live:
        """Everything, the members of both slots read back (`ipset save`): what reconcile's
        full check, status and watch's resync compare."""
        heads = ipsets.heads()
        families = {f: self._read_family(f, heads, None) for f in FAMILIES}
        # A set the record vouches for that holds something else (an edit its header does
        # not show) is forgotten, so that the apply repairing it reads it too.
        record = ipsets.Record()
        for family, fam in families.items():
            for name, members in fam.slots.items():
                recorded = record.members(family, name, fam.heads[name])
                if recorded is not None and not _same_members(members, recorded):
                    record.forget(family, name)
        ipsets.forget_differences()
        return Live(self.name, dict(families))

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
        stale_sets = live.stale_sets + ([] if fp is not None and fp.exempt else
                                        [n for n in ipsets.SLOTS[live.family] if n in live.heads])
        stale = [f"{len(stale_sets)} stale sets"] if stale_sets else []
        if fp is None:
            return (["installed but disabled"] if live.installed else []) + stale
        if not live.installed:
            return ["not installed"]
        problems = list(live.problems) + stale
        used = _slot_used(live)
        if not live.chain_exists:
            problems.append(f"chain {CHAIN} missing")
        elif live.rules != chain_rules(fp, bridged=self.bridged, exempt_set=used):
            problems.append(f"chain {CHAIN} differs")
        if live.jumps != [SHAPES["jump"]]:
            problems.append(f"{len(live.jumps)} jumps from POSTROUTING instead of 1")
        if live.in_rules != inbound_rules():
            problems.append(f"chain {IN_CHAIN} " + ("missing" if not live.in_rules else "differs"))
        if live.in_jumps != [INBOUND["jump"]]:
            problems.append(f"{len(live.in_jumps)} jumps from mangle PREROUTING instead of 1")
        if fp.exempt:
            want = set_members(fp)
            idle = ipsets.other_slot(used, fp.family)
            for name, what in ((used, f"exempt set {used}"), (idle, f"idle exempt set {idle}")):
                if name not in live.slots:
                    problems.append(f"{what} missing")
                elif not live.heads[name].fits(fp.family, len(want)):
                    problems.append(f"{what} declaration differs")
                elif not _same_members(live.slots[name], want):
                    problems.append(f"{what} members differ")
        return problems

    # -- changing

    def apply(self, plan: Plan) -> list[str]:
        try:
            return self._apply(plan)
        finally:
            ipsets.forget_differences()

    def _apply(self, plan: Plan) -> list[str]:
        changes = []
        record = ipsets.Record()
        heads = ipsets.heads()
        holding: dict[int, set[str]] = {}  # per family, the slots that hold the plan's list
        for family, fp in self.wanted_families(plan).items():
            live = self._read_family(family, heads, record)
            want = set_members(fp) if fp is not None and fp.exempt else None
            holding[family] = {n for n, m in live.slots.items()
                               if want is not None and live.heads[n].fits(family, len(want)) and _same_members(m, want)}
            problems = self.family_drift(fp, live)
            if not problems:
                continue
            if live.stale_sets and len(problems) == 1 and problems[0].endswith("stale sets"):
                # Only a crash's leftovers: destroy them, leave the live chain (and its counters) alone.
                self._destroy_sets(family, keep=ipsets.SLOTS[family] if want else ())
                changes.append(f"ipv{family}: {problems[0]} destroyed")
                continue
            if fp is None:
                self._remove_family(family, live)
                changes.append(f"ipv{family} removed (disabled)")
                continue
            holding[family] = self._apply_family(fp, live, record, holding[family])
            what = "installed" if not live.installed else "updated (" + ", ".join(problems) + ")"
            changes.append(f"ipv{family} {what}: {len(chain_rules(fp, bridged=self.bridged)) - 1} rules, {len(fp.exempt)} exempt prefixes")
        after = ipsets.heads() if changes else heads
        for family, fp in self.wanted_families(plan).items():
            want = set_members(fp) if fp is not None and fp.exempt else None
            record.keep(family, want, {n: after[n] for n in holding[family] if n in after})
        return changes

    def _apply_family(self, fp: FamilyPlan, live: IptablesFamilyLive, record: ipsets.Record,
                      holding: set[str]) -> set[str]:
        """Old or new at every moment (ipsets.py): the idle slot patched, the chain pointed
        at it in one iptables-restore, then the other slot patched. Returns the slots that
        hold the plan's list now."""
        family = fp.family
        restore = [self.tool(family, "-restore"), "--noflush", "-w"]
        if not fp.exempt:
            run(restore, input=render_restore(fp, live.jumps, live.in_jumps, bridged=self.bridged))
            self._destroy_sets(family, keep=())
            return set()
        want = set_members(fp)
        slots = ipsets.SLOTS[family]
        used: str | None = live.set_name if live.set_name in slots else None
        # a slot no rule matches can be written; one that holds the list already can be
        # pointed at whoever else matches it (the other iptables variant, mid-migration)
        free = [n for n in slots if n != used and (n not in live.heads or live.heads[n].references == 0)]
        target: str | None = used if used in holding else (
            next((n for n in slots if n != used and n in holding), None) or next(iter(free), None))
        text = ""
        if target is None:  # neither slot is free: a set of its own, loaded whole
            target = content_name(fp)
            head = live.heads.get(target)
            if head is not None and head.references:
                raise ApplyError(f"ipset: no free set for the IPv{family} exempt list: {', '.join(slots)} and "
                                 f"{target} are all in use by other rules")
            text = (f"destroy {target}\n" if head is not None else "") + render_set(fp, target)
        for name in (target, ipsets.other_slot(target, family)):
            if name in slots and name not in holding and name in free:
                # the other slot too when it is idle already (a new install: both are)
                text += self._fill(fp, name, live, record, want)
                holding.add(name)
        if text:
            run(["ipset", "restore", "-exist"], input=text)
        if live.rules != chain_rules(fp, bridged=self.bridged, exempt_set=target) or (
                live.jumps != [SHAPES["jump"]] or live.in_rules != inbound_rules()
                or live.in_jumps != [INBOUND["jump"]]):
            run(restore, input=render_restore(fp, live.jumps, live.in_jumps, bridged=self.bridged,
                                              exempt_set=target))
        other = ipsets.other_slot(target, family)
        now = ipsets.heads()
        if target in slots and other not in holding:
            head = now.get(other)  # its references now that our chain left it
            if head is None or head.references == 0:
                run(["ipset", "restore", "-exist"], input=self._fill(fp, other, live, record, want))
                holding.add(other)
        self._destroy_sets(family, keep=(*slots, target), heads=now)
        return holding

    def _fill(self, fp: FamilyPlan, name: str, live: IptablesFamilyLive, record: ipsets.Record,
              want: Sequence[str]) -> str:
        """`ipset restore` input making slot `name` (idle) hold `want`: the difference
        where what it holds is known and it has room, else the set made anew."""
        record.forget(fp.family, name)
        head, have = live.heads.get(name), live.slots.get(name)
        if head is not None and have is not None and head.fits(fp.family, len(want)):
            add, delete = ipsets.difference(have, want)
            return ipsets.render_patch(name, add, delete)
        return (f"destroy {name}\n" if head is not None else "") + render_set(fp, name)

    def _other_variant_chain(self, family: int) -> bool:
        """Our chain is in the other iptables variant too (a switch between them under
        way): the sets are shared, as ipsets are the kernel's, not a variant's."""
        other = "nft" if self.variant == "legacy" else "legacy"
        tool = f"{'iptables' if family == 4 else 'ip6tables'}-{other}"
        if (other == "legacy" and "nat" not in legacy_tables(family)) or missing_tools(tool):
            return False
        return run([tool, "-w", "-t", "nat", "-S", CHAIN], check=False).returncode == 0

    def _destroy_sets(self, family: int, keep, heads: dict[str, ipsets.Head] | None = None,
                      settle: bool = False) -> None:
        """Destroy our sets of `family` but `keep`, those no rule references. The slots stay
        while the other variant has our chain (it may be pointed at them next). `settle`:
        our chain is gone, so references still counted are the kernel's late release:
        wait for it (up to SETTLE seconds)."""
        heads = ipsets.heads() if heads is None else heads
        keep = set(keep)
        if any(n in heads for n in ipsets.SLOTS[family] if n not in keep) and self._other_variant_chain(family):
            keep.update(ipsets.SLOTS[family])
        doomed = [name for name in heads if ipsets.ours(name, family) and name not in keep]
        # nf_tables frees a transaction's deleted rules in a work queue: just after
        # iptables-nft-restore returns, the xt_set matches of our deleted chain may still hold
        # the sets (Debian 11's 5.10: flush left `ipmasq4-a` behind, References: 1).
        deadline = time.monotonic() + self.SETTLE
        while settle and any(heads[n].references > 0 for n in doomed if n in heads) and time.monotonic() < deadline:
            time.sleep(0.05)
            heads = ipsets.heads()
        for name in doomed:
            if name in heads and heads[name].references == 0:
                run(["ipset", "destroy", name], check=False)

    def _remove_family(self, family: int, live: IptablesFamilyLive) -> bool:
        if live.installed:
            text = render_remove(live.jumps, live.chain_exists, live.in_jumps, bool(live.in_rules))
            run([self.tool(family, "-restore"), "--noflush", "-w"], input=text)
        self._destroy_sets(family, keep=(), settle=live.installed)
        return live.installed

    def remove(self) -> list[str]:
        if self.unavailable_reason():
            return []
        heads = ipsets.heads()
        current = [self._read_family(f, heads, None, members=False) for f in FAMILIES]
        removed = [f"ipv{live.family}" for live in current if self._remove_family(live.family, live)]
        ipsets.clear()  # the other variant, if it keeps the sets, reads them back once
        return removed


def _slot_used(live: IptablesFamilyLive) -> str:
    """The slot our chain matches (the first when it matches none of them)."""
    slots = ipsets.SLOTS[live.family]
    return live.set_name if live.set_name is not None and live.set_name in slots else slots[0]


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


def _same_members(live, planned) -> bool:
    add, delete = ipsets.difference(live, planned)
    return not add and not delete
