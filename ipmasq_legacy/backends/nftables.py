"""nftables backend: one table of our own per family, changed old-or-new.

Per family: two exempt interval sets, `exempt_a` and `exempt_b`; the chain looks up one
of them. A change of the exempt list (nftsets.py writes the elements over netlink):

1. the idle set is patched with the difference, in a transaction of its own;
2. one checked nft transaction for everything else: the `postrouting` nat base chain and
   its rules (now looking up the set of step 1), and the objects that are not ours any
   more (earlier versions' sets) deleted;
3. the other set, idle now, is patched with the same difference.

A kill leaves the rules on the old set (before 2) or the new one (after), each whole (a
patch is one transaction); the idle set may then hold either list, which no rule sees,
and the next apply or reconcile reads it back and patches it. Which list both sets hold is recorded after a successful
apply; it is trusted while nf_tables' generation has not moved, and each patch carries
that generation, so the kernel refuses it when anything committed since.

Why a set is never filled in the transaction that makes the rules use it: the kernel
builds an interval set's lookup structure when the transaction that filled it commits,
after the new rules have become visible. A set created in the same transaction as the
rules that use it is, for those few microseconds, a set with nothing in it: a new flow
to an exempt destination is masqueraded (measured: 70-86 of 720,000 flows over 400 such
transactions; none in 940,000 flows when the set comes first). A set that already exists
keeps answering with its committed elements throughout.

Nothing outside `table ip ipmasq_legacy` and `table ip6 ipmasq_legacy` is listed, flushed
or touched. The shapes are in rules/nftables.yaml.
"""

from __future__ import annotations

import errno
import ipaddress
import re

from .. import __version__, kernel, state
from ..errors import ApplyError
from ..plan import FamilyPlan, Plan
from .base import FAMILIES, Backend, Live, RuleCounter
from .nftdriver import CLI_ENV, _cli_forced, _CliRunner, _library_missing, _LibRunner, binding_unsafe, probe_table  # noqa: F401
from .nftrender import (  # noqa: F401  (also the names the tests and engines import from here)
    _COUNTER_RULE,
    _ENOENT,
    CHAIN,
    CHAIN_HEADER,
    IN_CHAIN,
    IN_HEADER,
    IN_RULES,
    SHAPES,
    SLOTS,
    TABLE,
    NftFamilyLive,
    NftSet,
    _first_error,
    _ntop,
    _prefix_text,
    _rule_counter,
    chain_rules,
    interface_match,
    interface_of,
    masquerade_line,
    member_texts,
    other_slot,
    parse_table,
    render_declare,
    render_delete,
    render_replace,
    render_rules,
    render_set,
    render_table,
    set_declaration,
    table_ref,
)

# ---------------------------------------------------------------- the backend


class NftablesBackend(Backend[NftFamilyLive]):
    name = "nftables"

    # Above this many exempt prefixes a batch goes to the nft binary when there is one:
    # libnftables in-process keeps its cache in the agent (about +120 MB at 100,000
    # prefixes, never given back to the system), a child process frees it on exit.
    LARGE = 20_000

    def __init__(self, use_cli: bool | None = None):
        """use_cli: True drives the nft binary, False libnftables; None decides by
        IPMASQ_NFT_CLI, then by whether libnftables loads (and the size of the plan)."""
        self.use_cli = use_cli
        self._runner_obj: _CliRunner | _LibRunner | None = None
        self._commits = 0  # transactions committed by this object (see _record)

    def _size_hint(self, plan: Plan) -> None:
        """A large plan is read and written through the nft binary (see LARGE)."""
        large = max((len(f.exempt) for f in plan.families), default=0) > self.LARGE
        if large and self.use_cli is None and kernel.current().which("nft"):
            self._runner_obj = _CliRunner()

    def _runner(self):
        if self._runner_obj is None:
            use_cli = _cli_forced() if self.use_cli is None else self.use_cli
            if not use_cli:  # the kernel probes the binding first: a crash in C must never cut an apply short
                self._runner_obj = kernel.current().nft_library()[0]
            if self._runner_obj is None:
                self._runner_obj = _CliRunner()
        return self._runner_obj

    @property
    def driver(self) -> str:
        """"libnftables" or "nft": what talks to the kernel."""
        return self._runner().name

    def unavailable_reason(self) -> str | None:
        have_nft = kernel.current().which("nft") is not None
        use_cli = _cli_forced() if self.use_cli is None else self.use_cli
        if use_cli and not have_nft:
            return "no nft binary (install the nftables package)"
        if not use_cli and not have_nft:
            unsafe = kernel.current().nft_library()[1]
            if unsafe:
                return f"no nft binary, and the libnftables binding cannot be used: {unsafe} (install the nftables package)"
        return self._kernel_probe_reason()

    def _kernel_probe_reason(self) -> str | None:
        """Hook for a kernel probe (nf_tables, nat, fib, masquerade support); None for now."""
        return None

    # -- rendering

    def render(self, plan: Plan) -> str:
        """What an install on a node without our tables runs, transaction by transaction."""
        parts = []
        for fp in plan.families:
            if fp.exempt:
                parts.append(f"# IPv{fp.family}: the exempt sets, declared (nft -f -) and filled (netlink), "
                             "before any rule uses them")
                parts.append(render_set(fp, SLOTS).rstrip("\n"))
                parts.append(f"# IPv{fp.family}: nft -f - (one transaction: the chain that uses {SLOTS[0]})")
            else:
                parts.append(f"# IPv{fp.family}: nft -f - (one transaction)")
            parts.append(render_rules(fp).rstrip("\n"))
        return "\n".join(parts) + "\n"

    # -- reading what we own

    def _read_family(self, family: int) -> NftFamilyLive:
        rc, out, err = self._runner().cmd(f"list table {table_ref(family)}\n")
        if rc == 0:
            return parse_table(out, family)
        live = NftFamilyLive(family=family, installed=False)
        if _ENOENT not in err:
            live.read_error = _first_error(err, rc)
        return live

    def live(self) -> Live:
        return Live(self.name, {f: self._read_family(f) for f in FAMILIES})

    def counters(self, plan: Plan | None = None) -> list[RuleCounter]:
        """The counters of our chain's masquerade and snat rules, read over netlink (one
        rule dump per family, scoped to our chain; no set's elements, no nft, no
        libnftables). A rule's text is the plan's (`plan`: the one the caller knows is
        installed) or the one apply recorded, matched by position."""
        record = state.read_json(self.RECORD).get("families", {}) if plan is None else {}
        out = []
        for family in FAMILIES:
            try:
                rules = kernel.current().nft_rules(SHAPES["family"][family], TABLE, CHAIN)
            except OSError:
                rules = None
            if not rules:
                continue
            found = [c for c in map(_rule_counter, rules) if c is not None]
            fp = plan.family(family) if plan is not None else None
            texts = chain_rules(fp) if fp is not None else record.get(str(family), {}).get("rules", [])
            texts = [t for t in texts if _COUNTER_RULE.search(t)]
            if len(texts) != len(found):
                texts = [""] * len(found)
            out += [RuleCounter(family, text, interface, packets, nbytes)
                    for text, (interface, packets, nbytes) in zip(texts, found)]
        return out

    # -- comparing

    def family_drift(self, fp: FamilyPlan | None, live: NftFamilyLive) -> list[str]:
        if live.read_error:
            return [f"cannot read table {table_ref(live.family)}: {live.read_error}"]
        if fp is None:
            return ["installed but disabled"] if live.installed else []
        if not live.installed:
            return ["not installed"]
        problems = list(live.problems)
        if live.chain_header is None:
            problems.append(f"chain {CHAIN} missing")
        else:
            if live.chain_header != CHAIN_HEADER:
                problems.append(f"chain {CHAIN} hook differs")
            if live.rules != chain_rules(fp, _live_slot(live)):
                problems.append(f"chain {CHAIN} differs")
        if live.in_header != IN_HEADER or live.in_rules != IN_RULES:
            problems.append(f"chain {IN_CHAIN} " + ("missing" if live.in_header is None else "differs"))
        if fp.exempt:
            used = _live_slot(live)
            for name, what in ((used, "exempt set"), (other_slot(used), f"idle exempt set {other_slot(used)}")):
                nset = live.sets.get(name)
                if nset is None:
                    problems.append(f"{what} missing")
                elif nset.declaration != set_declaration(fp.family):
                    problems.append(f"{what} declaration differs")
                elif not _same_prefixes(nset.members, fp.exempt):
                    problems.append(f"{what} members differ")
        stale = [name for name in live.sets if name not in (SLOTS if fp.exempt else ())]
        if stale:
            problems.append(f"{len(stale)} stale sets")
        return problems

    def drift(self, plan: Plan, live: Live | None = None) -> list[str]:
        if live is None:
            self._size_hint(plan)
        return super().drift(plan, live)

    def fingerprint(self) -> str | None:
        """nf_tables' ruleset generation: every committed change in the namespace (ours,
        kube-proxy's, a hand edit of our set) moves it, and reading it lists nothing (at
        100,000 prefixes a listing of our table costs about a second, most of it in the
        kernel)."""
        genid = kernel.current().nft_generation()
        return None if genid is None else f"nf_tables generation {genid}"

    # -- changing

    def _run(self, family: int, text: str, what: str, check: bool = True) -> None:
        """One transaction; with `check`, dry-run first (cheap for a chain's worth of
        rules; the big set is loaded unchecked: its commit is all-or-nothing and, until
        the rules use it, harmless)."""
        runner = self._runner()
        for dry_run in (True, False) if check else (False,):
            rc, _, err = runner.cmd(text, dry_run=dry_run)
            self._commits += rc == 0 and not dry_run
            if rc != 0:
                step = "check of" if dry_run else "commit of"
                raise ApplyError(f"{runner.name}: {step} {what} of table {table_ref(family)} failed: "
                                 f"{_first_error(err, rc)}")

    def _delete_table(self, family: int) -> bool:
        """Delete our table of one family; False when there was none."""
        runner = self._runner()
        rc, _, err = runner.cmd(render_delete(family))
        if rc == 0:
            self._commits += 1
            return True
        if _ENOENT in err:
            return False
        raise ApplyError(f"{runner.name}: delete table {table_ref(family)} failed: {_first_error(err, rc)}")

    def _apply_family(self, fp: FamilyPlan, live: NftFamilyLive, genid: int | None) -> str | None:
        """Old or new at every moment (nftsets.py): the idle slot patched to the plan and
        committed, then the rules switched to it in one checked transaction, then the
        other slot patched too. `genid`: the generation `live` was true at (None: unknown);
        a set patch is refused by the kernel when anything committed since."""
        if live.read_error:
            raise ApplyError(f"cannot read table {table_ref(fp.family)}: {live.read_error}")
        odd = [n for n in SLOTS if n in live.sets and live.sets[n].declaration != set_declaration(fp.family)]
        if live.attributes or odd:
            # Table attributes (dormant, ...) or a set of our name re-declared by someone:
            # nothing to patch in place; the last resort (render_replace) it is.
            self._run(fp.family, render_replace(fp), "the table")
            return SLOTS[0]
        current = live if live.installed else None
        used = live.exempt_set if live.exempt_set in SLOTS else None  # None: a new install uses the first
        target = used
        if fp.exempt:
            wanted = member_texts(fp)
            missing = [n for n in SLOTS if n not in live.sets]
            if missing:
                self._run(fp.family, render_declare(fp.family, missing), "the exempt sets", check=False)
                genid = None if genid is None else genid + 1
            contents = {n: (live.sets[n].members if n in live.sets else ()) for n in SLOTS}
            patched = used if used in live.sets and _same_prefixes(contents[used], fp.exempt) else other_slot(used)
            target = patched
            genid = self._patch(fp.family, patched, contents[patched], wanted, genid)
        try:
            self._run(fp.family, render_rules(fp, current, target), "the rules")
        except ApplyError:
            if current is None or not current.foreign:
                raise
            self._run(fp.family, render_replace(fp), "the table")  # a foreign object nft would not delete
            return SLOTS[0]
        if fp.exempt:
            genid = None if genid is None else genid + 1
            idle = other_slot(target)
            self._patch(fp.family, idle, live.sets[idle].members if idle in live.sets else (), wanted, genid)
        return target

    def _patch(self, family: int, name: str, members, wanted: list[str], genid: int | None) -> int | None:
        """Set `name`, holding `members`, made to hold `wanted` in one netlink transaction;
        the generation after it (None: unknown)."""
        have = set(members)
        add: list[str]
        delete: list[str]
        if len(have) != len(members) or not _plain(members, family):
            add, delete, flush = wanted, [], True  # spelled oddly: rewritten whole
        else:
            want = set(wanted)
            add, delete, flush = [p for p in wanted if p not in have], [p for p in members if p not in want], False
        if not (add or delete or flush):
            return genid
        try:
            kernel.current().nft_patch(family, TABLE, name, add=add, delete=delete, flush=flush, genid=genid)
        except OSError as exc:
            if exc.errno == errno.ERESTART:
                raise _Moved() from None
            why = "conflicting intervals" if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) else exc.strerror
            raise ApplyError(f"netlink: patch of set {name} of table {table_ref(family)} failed: {why}") from None
        self._commits += 1
        return None if genid is None else genid + 1

    def apply(self, plan: Plan) -> list[str]:
        self._size_hint(plan)
        try:
            return self._apply(plan, trust_record=True)
        except _Moved:  # someone committed since our record: read, and do it again
            return self._apply(plan, trust_record=False)

    def _apply(self, plan: Plan, trust_record: bool) -> list[str]:
        changes = []
        self._commits = 0
        generation = kernel.current().nft_generation()
        current = self._recorded(generation) if trust_record else None
        if current is None:
            current = self.live()
            if kernel.current().nft_generation() != generation:
                generation = None  # someone committed while we read: nothing to record
        start = generation
        slots: dict[int, str | None] = {}
        for family, fp in self.wanted_families(plan).items():
            live = current.families[family]
            slots[family] = _live_slot(live)
            problems = self.family_drift(fp, live)
            if not problems:
                continue
            if fp is None:
                if self._delete_table(family):
                    changes.append(f"ipv{family} removed (disabled)")
                continue
            slots[family] = self._apply_family(fp, live, None if start is None else start + self._commits)
            what = "installed" if not live.installed else "updated (" + ", ".join(problems) + ")"
            changes.append(f"ipv{family} {what}: {len(chain_rules(fp))} rules, {len(fp.exempt)} exempt prefixes")
        self._record(plan, generation, slots)
        return changes

    # -- our record of what we wrote
    #
    # Reading our table back costs about a second at 100,000 prefixes (nft fetches every
    # element), so apply trusts a record of what it wrote last as long as nf_tables'
    # generation has not moved since: every commit in the namespace moves it, ours and
    # anyone else's. The record is taken only when the generation moved by exactly our
    # own commits (each of which changes something, so moves it by one).

    RECORD = "nftables.json"

    def _recorded(self, generation: int | None) -> Live | None:
        record = state.read_json(self.RECORD)
        if (generation is None or record.get("generation") != generation or record.get("netns") != state.netns_id()
                or record.get("version") != __version__):
            return None
        families = {}
        for family in FAMILIES:
            fam = record.get("families", {}).get(str(family))
            if fam is None:
                families[family] = NftFamilyLive(family=family, installed=False)
                continue
            sets = {}
            if fam.get("set"):
                members = state.read_list(_members_file(family), fam.get("members"))
                if members is None:
                    return None
                # both slots hold the list: apply records only after it patched the idle one too
                sets = {name: NftSet(set_declaration(family), members, recorded=True) for name in SLOTS}
            families[family] = NftFamilyLive(family=family, installed=True, chain_header=CHAIN_HEADER,
                                             rules=list(fam["rules"]), sets=sets, in_header=IN_HEADER,
                                             in_rules=list(IN_RULES))
        return Live(self.name, families)

    def _record(self, plan: Plan | None, generation: int | None, slots: dict[int, str | None] | None = None) -> None:
        now = kernel.current().nft_generation()
        if plan is None or generation is None or now is None or (now - generation) % 2**32 != self._commits:
            state.remove(self.RECORD)
            return
        families = {}
        for fp in plan.families:
            slot = (slots or {}).get(fp.family) or SLOTS[0]
            families[str(fp.family)] = {"set": slot if fp.exempt else None, "rules": chain_rules(fp, slot),
                                        "members": state.write_list(_members_file(fp.family), member_texts(fp)) if fp.exempt else None}
        state.write_json(self.RECORD, {"generation": now, "netns": state.netns_id(), "version": __version__,
                                       "families": families})

    def remove(self) -> list[str]:
        if self.unavailable_reason():
            return []
        removed = [f"ipv{f}" for f in FAMILIES if self._delete_table(f)]
        state.remove(self.RECORD)
        for family in FAMILIES:
            state.remove(_members_file(family))
        return removed


class _Moved(ApplyError):
    """nf_tables' generation moved under a set patch (someone committed): read again."""

    def __init__(self):
        super().__init__("the nf_tables ruleset changed during the apply")


def _live_slot(live: NftFamilyLive) -> str:
    """The slot our chain looks up (the first when it looks up none of them)."""
    used = live.exempt_set
    return used if used in SLOTS else SLOTS[0]


_PLAIN = {4: re.compile(r"[0-9./]*"), 6: re.compile(r"[0-9a-f:./]*")}


def _plain(members, family: int) -> bool:
    """Every member a prefix spelled plainly (what a set read back or recorded holds), so
    a diff of texts is a diff of prefixes (an odd spelling only rewrites the set whole)."""
    return bool(_PLAIN[family].fullmatch("".join(members))) and all("/" in m for m in members)


def _members_file(family: int) -> str:
    return f"nftables-exempt{family}.txt"


def _same_prefixes(live: tuple[str, ...], planned: tuple[str, ...]) -> bool:
    """The live set's prefixes against the plan's normalised ones: a tuple comparison
    when they agree (the usual case, linear); as sorted networks otherwise."""
    if tuple(live) == tuple(planned):
        return True
    if len(live) != len(planned):
        return False
    try:
        return sorted(map(ipaddress.ip_network, live)) == sorted(map(ipaddress.ip_network, planned))
    except (ValueError, TypeError):
        return False
