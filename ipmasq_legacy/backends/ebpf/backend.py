"""EbpfBackend: the backend's verbs (render, live, drift, apply, follow, fingerprint,
remove, reap) over the package's parts; what the datapath is and how it changes: the
package's docstring (__init__.py)."""

from __future__ import annotations

import errno
import ipaddress
import os
import struct
from collections.abc import Callable

from ... import kernel, state
from ...bpf import loader
from ...errors import ApplyError
from ...plan import Plan
from ..base import FAMILIES, Backend, Live, RuleCounter
from . import assist, handover, node, programs
from .bpffs import bpffs_reason, ensure_bpffs
from .conntrack import netfilter_snat_tuples, seed_foreign, seed_pass
from .encode import cfg_value, local_port_range, lpm_key, port_spans, seek_keys, translated_ports
from .facts import EbpfDesired, EbpfFacts, EbpfFamilyLive, EbpfLive
from .fingerprint import fingerprint as read_fingerprint
from .generations import generation_problems, note_tries, write_generation
from .keeper import (
    DRAIN_TABLE,
    KEEPER_TABLE,
    NOTRACK_TABLE,
    add_drain_tables,
    add_keeper,
    delete_tables,
    drain_tables_present,
    keeper_present,
    notrack_in_sync,
    notrack_present,
    notrack_text,
    write_notrack,
)
from .layout import CFG, CTL, F_DRAIN, F_V4, F_V6
from .links import IF_DRAIN, IFACE, Link, matching_links, read_links, with_snat
from .maps import Background, Pinned, trie_notes
from .names import HOOKS, PROGRAMS, SHAPES, TRIES, filter_name, object_path, pin_dir, pin_name
from .tc import attach, detach, open_ipr, our_filters


class EbpfBackend(Backend[EbpfFamilyLive]):
    name = "ebpf"

    def __init__(self, another_live: Callable[[], bool] | None = None):
        self._obj: loader.BpfObject | None = None
        # Whether another backend masquerades here now (remove: a switch, so ours drain);
        # the registry (backends.get) passes its check, which this package cannot import.
        self._another_live = another_live or (lambda: False)

    # -- availability

    def obj(self) -> loader.BpfObject:
        if self._obj is None:
            try:
                self._obj = loader.read_object(str(object_path()))
            except loader.ObjectError as exc:
                raise ApplyError(f"BPF object: {exc}") from None
        return self._obj

    def unavailable_reason(self) -> str | None:
        if loader.syscall_number() is None:
            return f"no bpf(2) syscall number known for this machine ({os.uname().machine})"
        path = object_path()
        if not path.exists():
            return (f"the BPF object {path} is not built: run `bash scripts/setup` (it installs clang, llvm "
                    "and libbpf-dev and compiles ipmasq_legacy/bpf/masq.c)")
        try:
            self.obj()
        except ApplyError as exc:
            return str(exc)
        if memlock := loader.raise_memlock():
            return memlock
        try:
            sysobj = kernel.current().bpf()
            for map_type, key, value, flags in ((loader.MAP_LPM_TRIE, 9, 1, 1), (loader.MAP_LRU_HASH, 40, 32, 0),
                                                (loader.MAP_PERCPU_ARRAY, 4, 8, 0)):
                sysobj.close(sysobj.map_create(map_type, key, value, 4, flags, "ipmq_probe"))
        except loader.BpfError as exc:
            why = "not permitted (needs root: CAP_BPF and CAP_NET_ADMIN)" if exc.errno == errno.EPERM else exc.strerror
            return f"the kernel refuses BPF maps: {why}"
        if verifier := programs.verifier_reason(self.obj(), sysobj):
            return verifier
        if lacking := assist.missing():
            return f"missing {', '.join(lacking)} (the netfilter assist: install the iptables package)"
        bpffs = bpffs_reason(pin_dir())
        if bpffs and bpffs != "mount":
            return bpffs
        return None

    # -- rendering

    def render(self, plan: Plan) -> str:
        families = self.wanted_families(plan)
        ports = translated_ports(next((fp.to_ports for fp in plan.families), ()), local_port_range())
        d = str(pin_dir())
        lines = [
            f"# ebpf: programs ipmq_egress / ipmq_ingress of {object_path()} on tc clsact (direct action),",
            f"# pref {SHAPES['tc_priority']} handle {SHAPES['tc_handle']}, of every interface matching "
            + (", ".join(plan.interfaces) if plan.interfaces else "any but lo"),
            f"# maps pinned under {d}; bpftool batch syntax, generation 0 shown (apply writes the idle one, then",
            "# flips ctl). Translated source ports: "
            + (", ".join(f"{a}-{b}" if a != b else str(a) for a, b in port_spans(ports)) or "none"),
            f"map update pinned {d}/cfg key hex 00 00 00 00 value hex {cfg_value(families, ports).hex(' ')}",
        ]
        for family in FAMILIES:
            fp = families[family]
            if fp is None:
                lines.append(f"# IPv{family}: disabled")
                continue
            lines.append(f"# IPv{family}: sources " + (", ".join(fp.sources) or "any")
                         + f"; {len(fp.exempt)} exempt prefixes")
            for kind, prefixes in (("sources", fp.sources), ("exempt", fp.exempt)):
                pin = pin_name(TRIES[kind][family])
                for prefix in prefixes:
                    lines.append(f"map update pinned {d}/{pin} key hex {lpm_key(family, 0, prefix).hex(' ')} "
                                 f"value hex 01  # {prefix}")
        lines.append(f"map update pinned {d}/ctl key hex 00 00 00 00 value hex 00 00 00 00")
        if not plan.ebpf_conntrack:  # the fast path: its table instead of the keeper (links: as attached)
            text = notrack_text([], plan.interfaces, tuple(fp.family for fp in plan.families))
            lines.append("# ebpf-conntrack: false: nft -f of this table (set links: the links the programs are on),")
            lines.append(f"# instead of table inet {KEEPER_TABLE}")
            lines += ["# " + line for line in text.splitlines()]
        return "\n".join(lines) + "\n"

    # -- reading

    def _read(self, rt=None) -> tuple[EbpfFacts, Pinned | None]:
        """(facts, pinned-or-None): the links, our filters on them, and what the pinned
        maps say (the live generation, its cfg, the iface entries). Over the kernel's
        rtnl() (its reads: ..netlink, no pyroute2) and bpf(2); `rt` an open rtnl()."""
        if rt is None:
            with kernel.current().rtnl() as own:
                return self._read(own)
        facts = EbpfFacts(read_links(rt))
        for index in facts.links:
            f = our_filters(index, rt)
            if any(f.values()):
                facts.attached[index] = {h: [(x.name, x.prog_id) for x in v] for h, v in f.items()}
        pinned = self._pinned()
        if pinned is not None:
            facts.installed = True
            facts.gen = pinned.gen()
            facts.cfg = pinned.cfg(facts.gen)
            if pinned.open("ipmq_ifaces") is not None:
                facts.ifaces = {struct.unpack("=I", k)[0]: v for k, v in pinned.items("ipmq_ifaces")}
        return facts, pinned

    def _pinned(self) -> Pinned | None:
        """The pinned maps, None when nothing is pinned."""
        if self._pinned_nothing():
            return None
        try:
            pinned = Pinned(self.obj())
        except ApplyError:
            pinned = Pinned(None)
        if pinned.open("ipmq_ctl") is None:
            pinned.close()
            return None
        return pinned

    @staticmethod
    def _pinned_nothing() -> bool:
        """No maps pinned here (or no bpf(2) on this machine to have pinned any)."""
        return loader.syscall_number() is None or not kernel.current().bpf().exists(pin_dir() / "ctl")

    def live(self) -> EbpfLive:
        facts, pinned = self._read()
        families: dict[int, EbpfFamilyLive] = {}
        try:
            links = facts.links
            attached_names = {links[i].name if i in links else f"if{i}": hooks for i, hooks in facts.attached.items()}
            counters = pinned.if_counters() if pinned is not None and pinned.open("ipmq_ifstats") is not None else {}
            notes = trie_notes() if pinned is not None else {}
            for family in FAMILIES:
                on = bool(facts.flags & (F_V4 if family == 4 else F_V6)) and not facts.draining
                fl = EbpfFamilyLive(family=family, installed=on)
                if on and pinned is not None:
                    name = TRIES["exempt"][family]
                    if pinned.open(name) is not None:
                        # kept for drift, which compares the same generation
                        held = pinned.generation(name, facts.gen, seek_keys(name, facts.gen, notes))
                        facts.generations[name] = held
                        fl.exempt = pinned.trie("exempt", family, facts.gen, held)
                    fl.attached = attached_names
                    for link_name, hooks in sorted(attached_names.items()):
                        for hook in HOOKS:
                            for fname, _id in hooks.get(hook, []):
                                fl.rules.append(f"tc {hook} {link_name}: bpf da {fname}")
                    for (index, fam), (packets, nbytes) in sorted(counters.items()):
                        if fam != family:
                            continue
                        link_name = links[index].name if index in links else f"if{index}"
                        fl.counters.append(RuleCounter(family, f"tc egress {link_name}: bpf {PROGRAMS['egress']}",
                                                       link_name, packets, nbytes))
                families[family] = fl
        finally:
            if pinned is not None:
                pinned.close()
        return EbpfLive(self.name, families, facts=facts)

    def counters(self, plan: Plan | None = None) -> list[RuleCounter]:
        """The per-interface statistics map only (no trie, no filter listing)."""
        pinned = self._pinned()
        if pinned is None:
            return []
        try:
            flags = CFG.unpack(pinned.cfg(pinned.gen()))[0]
            if pinned.open("ipmq_ifstats") is None or not (counts := pinned.if_counters()):
                return []
            links = read_links()
        finally:
            pinned.close()
        on = {family for family, bit in ((4, F_V4), (6, F_V6)) if flags & bit and not flags & F_DRAIN}
        out = []
        for (index, family), (packets, nbytes) in sorted(counts.items()):
            if family not in on:  # as live(): a family off, or a datapath draining, counts nothing
                continue
            link_name = links[index].name if index in links else f"if{index}"
            out.append(RuleCounter(family, f"tc egress {link_name}: bpf {PROGRAMS['egress']}", link_name, packets,
                                   nbytes))
        return out

    # -- comparing

    def _desired(self, plan: Plan, links: dict[int, Link]) -> EbpfDesired:
        families = self.wanted_families(plan)
        enabled = [fp for fp in families.values() if fp is not None]
        ports = translated_ports(enabled[0].to_ports if enabled else (), local_port_range())
        if enabled and not ports:
            raise ApplyError("no translated source port left: masquerade-to-ports lies inside the node's "
                             f"ephemeral range {'-'.join(map(str, local_port_range()))} (ip_local_port_range)")
        matched = with_snat(matching_links(plan.interfaces, links), plan) if enabled else {}
        for fp in enabled:  # both generations live in one trie: each may use half of it
            for kind in ("exempt", "sources"):
                name = TRIES[kind][fp.family]
                room = int(SHAPES["map_entries"].get(name, self.obj().maps[name].max_entries)) // 2
                if len(getattr(fp, kind)) > room:
                    raise ApplyError(f"ebpf: {len(getattr(fp, kind))} IPv{fp.family} {kind} prefixes do not fit "
                                     f"(at most {room}: map_entries.{name} in rules/ebpf.yaml holds two generations)")
        local = {family: sorted({ipaddress.ip_address(a).packed for link in links.values()
                                 for a in link.addresses if ipaddress.ip_address(a).version == family})
                 for family in FAMILIES}
        return EbpfDesired(families, ports, cfg_value(families, ports), matched, local,
                           fast=not plan.ebpf_conntrack and bool(enabled), interfaces=plan.interfaces)

    def _problems(self, facts: EbpfFacts, pinned: Pinned | None, desired: EbpfDesired,
                  thorough: bool = True) -> list[str]:
        """What differs from the plan. thorough=False (apply): the tries and port tables
        are read back only when nothing else differs, since the apply that follows any
        problem rewrites whatever differs in them anyway."""
        obj = self.obj()
        wanted_any = any(fp is not None for fp in desired.families.values())
        if pinned is None:
            return ["not installed"] if wanted_any else (["programs attached but no maps pinned"]
                                                          if facts.attached else [])
        problems = []
        for name in obj.maps:
            if pinned.open(name) is None:
                problems.append(f"map {pin_name(name)} missing")
            elif not pinned.compatible(name):
                problems.append(f"map {pin_name(name)} has another shape")
        if problems:
            return problems
        have, want = CFG.unpack(facts.cfg), CFG.unpack(desired.cfg)
        if have[:4] != want[:4]:
            problems.append("config differs")
        # cfg says what apply wrote; the maps hold what is there now (a hand edit shows)
        if have[4] != want[4]:
            problems.append("exempt or source prefixes differ")
        # the live generation, read back below (when thorough or when nothing else differs)
        deep = (have[4] == want[4], have[2:4] == want[2:4])
        prog_ids = {}
        for hook in PROGRAMS:
            prog_ids[hook] = programs.prog_pinned(hook, obj)
            if prog_ids[hook] is None:
                problems.append(f"program {hook} not loaded")
        problems += [f"program {hook} uses maps that are no longer pinned"
                     for hook in programs.programs_on_stale_maps(pinned, obj)]
        links = facts.links
        for index, link in desired.matched.items():
            hooks = facts.attached.get(index, {})
            for hook in HOOKS:
                if hooks.get(hook) != [(filter_name(hook, obj.digest), prog_ids[hook])]:
                    problems.append(f"{link.name}: {hook} not attached" if not hooks.get(hook)
                                    else f"{link.name}: {hook} runs another program")
            if facts.ifaces.get(index) != link.iface_value(attached=True):
                problems.append(f"{link.name}: address or type changed")
        for index in facts.attached:
            if index not in desired.matched:
                value = facts.ifaces.get(index)
                if value is None or not IFACE.unpack(value)[2] & IF_DRAIN:
                    problems.append(f"{links[index].name if index in links else index}: attached but not matched")
        for index in facts.ifaces:
            if index not in desired.matched and index not in facts.attached:
                problems.append(f"stale interface entry {index}")
        for family, name in ((4, "ipmq_local4"), (6, "ipmq_local6")):
            if sorted(pinned.keys(name)) != desired.local[family]:
                problems.append(f"ipv{family}: node addresses changed")
        problems += assist.problems(desired.families, pin_dir(), assist.read_all(), fast=desired.fast)
        netfilter_drains = drain_tables_present()
        problems += self._conntrack_problems(desired, netfilter_drains)
        # drains that are done: reconcile removes what is left of them
        if netfilter_drains and not netfilter_snat_tuples():
            problems.append(f"nft tables {DRAIN_TABLE}: netfilter's connections have ended")
        draining = [i for i, v in facts.ifaces.items() if IFACE.unpack(v)[2] & IF_DRAIN]
        if draining:
            busy = handover.busy_ifindexes(pinned)
            for index in draining:
                if index not in busy:
                    problems.append(f"{links[index].name if index in links else index}: drained")
        if any(deep) and (thorough or not problems):
            problems += generation_problems(pinned, facts.gen, desired, *deep, known=facts.generations)
        return problems

    # -- conntrack: the keeper, or (ebpf-conntrack: false) the notrack table

    @staticmethod
    def _notrack_wanted(desired: EbpfDesired, netfilter_drains: list[str]) -> str | None:
        """The notrack table's text when the fast path is wanted now, else None. Not while
        netfilter's own connections drain: untracked, their packets would meet neither
        netfilter's NAT nor a translation of ours and leave with the pod's address."""
        if not desired.fast or netfilter_drains:
            return None
        return notrack_text(sorted(desired.matched), desired.interfaces,
                            tuple(f for f, fp in desired.families.items() if fp is not None))

    def _conntrack_problems(self, desired: EbpfDesired, netfilter_drains: list[str]) -> list[str]:
        if not kernel.current().which("nft"):
            return []
        text = self._notrack_wanted(desired, netfilter_drains)
        if text is not None:
            out = [] if notrack_in_sync(text) else [f"nft table inet {NOTRACK_TABLE} "
                                                    + ("differs" if notrack_present() else "missing")]
            return out + ([f"nft table inet {KEEPER_TABLE} not wanted (ebpf-conntrack: false)"]
                          if keeper_present() else [])
        out = [f"nft table inet {NOTRACK_TABLE} not wanted"] if notrack_present() else []
        if SHAPES["conntrack_keeper"] and not keeper_present():
            out.append(f"nft table inet {KEEPER_TABLE} missing")
        return out

    def _sync_conntrack(self, desired: EbpfDesired) -> list[str]:
        """After the programs are on their links: the notrack table names the links they
        are on (written whole, in one transaction), else the keeper. The one wanted is
        written before the other goes."""
        if not kernel.current().which("nft"):
            return []
        text = self._notrack_wanted(desired, drain_tables_present())
        if text is None:
            if SHAPES["conntrack_keeper"] and not keeper_present():
                add_keeper()
            return [f"nft table inet {NOTRACK_TABLE} removed"] if delete_tables(drain=False, keeper=False) else []
        if notrack_in_sync(text):
            return []
        code, err = write_notrack(text)
        if code != 0:
            raise ApplyError(f"ebpf: nft table inet {NOTRACK_TABLE}: {err.strip()[:300]}")
        delete_tables(drain=False, keeper=True, notrack=False)
        return [f"nft table inet {NOTRACK_TABLE} written ({len(desired.matched)} links)"]

    def drift(self, plan: Plan, live: Live | None = None) -> list[str]:
        """`live`, when live() gave it, is not read again: its facts (links, filters, the
        live generation, the exempt tries it read); the maps are opened again for what
        only drift reads."""
        facts = live.facts if isinstance(live, EbpfLive) else None
        pinned = None
        try:
            if facts is not None:
                pinned = self._pinned()
                if (pinned is not None) != facts.installed:  # installed or removed since
                    facts = None
            if facts is None:
                if pinned is not None:
                    pinned.close()
                facts, pinned = self._read()
            desired = self._desired(plan, facts.links)
            return self._problems(facts, pinned, desired)
        finally:
            if pinned is not None:
                pinned.close()

    # -- the fingerprint (reconcile's quick path)

    def fingerprint(self) -> str | None:
        """fingerprint.py: a digest of everything drift reads, as the kernel holds it now."""
        return read_fingerprint()

    # -- changing

    def apply(self, plan: Plan) -> list[str]:
        ensure_bpffs(pin_dir())
        ipr = open_ipr()
        facts, pinned = self._read(ipr)
        try:
            desired = self._desired(plan, facts.links)
            problems = self._problems(facts, pinned, desired, thorough=False)
            if not problems:
                handover.reap(pinned, ipr)
                return []
            previous = state.read().get("backend")
            if previous and previous != self.name:
                add_drain_tables()  # netfilter's translated connections keep working after it goes
            if SHAPES["conntrack_keeper"] and not keeper_present() and not notrack_present():
                add_keeper()  # (the fast path's table is written once the programs are on)
            if pinned is None:
                pinned = Pinned(self.obj())
            try:
                changes = self._install(facts, pinned, desired, ipr)
            except (loader.BpfError, OSError) as exc:
                raise ApplyError(f"ebpf: {exc}") from None
            handover.reap(pinned, ipr)
            changes += self._sync_conntrack(desired)  # after reap: netfilter's drain may be over
        finally:
            if pinned is not None:
                pinned.close()
            ipr.close()
        installed = "installed" if not facts.installed else "updated (" + ", ".join(problems[:3]) + (
            ", ..." if len(problems) > 3 else "") + ")"
        out = []
        for family, fp in desired.families.items():
            if fp is None:
                continue
            out.append(f"ipv{family} {installed}: tc on {len(desired.matched)} interfaces, "
                       f"{len(fp.exempt)} exempt prefixes")
        disabled = [f for f, fp in desired.families.items() if fp is None]
        if disabled and facts.installed:
            out += [f"ipv{f} removed (disabled)" for f in disabled if facts.flags & (F_V4 if f == 4 else F_V6)]
        return out or changes

    def _install(self, facts: EbpfFacts, pinned: Pinned, desired: EbpfDesired, ipr) -> list[str]:
        obj = self.obj()
        created = pinned.ensure()
        if "ipmq_nat_fwd" in created or "ipmq_nat_rev" in created:
            seed_foreign(pinned)
        live_gen = pinned.gen()
        idle = 1 - live_gen
        notes = trie_notes()
        # the live generation never had a config: a first install (or maps just created)
        first = not any(pinned.cfg(live_gen))
        # 1. the idle generation: read back, only what differs from the plan written
        # (whatever it holds: the config before the last change, what a killed apply
        # left half-written, a hand's edits)
        write_generation(pinned, idle, desired, notes)
        # 2. node facts: local addresses, the matched interfaces' addresses (flows
        # translated to an address a link no longer has move to its new one)
        self._write_node(facts, pinned, desired)
        # 3. the switch: one write. The old generation is left as it is: the next change
        # writes there what differs from it. After a first install it gets the config
        # too (it never held one), so that the next change writes only what it changes;
        # in the background, while programs load and filters attach.
        pinned.update("ipmq_ctl", struct.pack("=I", 0), CTL.pack(idle))
        mirror = Background(write_generation, pinned, live_gen, desired, notes) if first else None
        try:
            changes = self._attach_all(facts, pinned, desired, ipr, obj, created)
        finally:
            if mirror is not None:
                mirror.join()
        if mirror is not None:
            mirror.result()
        note_tries(pinned, desired, idle, notes, both=first)
        return changes

    @staticmethod
    def _write_node(facts: EbpfFacts, pinned: Pinned, desired: EbpfDesired) -> list[str]:
        node.write_locals(pinned, desired.local)
        changed = node.changed_addresses(facts.ifaces, desired.matched)
        node.write_ifaces(pinned, desired.matched, facts.attached)
        local = {a for family in FAMILIES for a in desired.local[family]}
        done, forgotten = node.repoint_flows(pinned, changed, local) if pinned.open("ipmq_nat_fwd") is not None else (0, 0)
        return [f"{done} flows moved to a new address, {forgotten} forgotten"] if done or forgotten else []

    def follow(self, plan: Plan) -> list[str]:
        """After a link or an address came or went (watch): the node facts written, the
        programs attached to every matched link and taken off links gone, flows moved
        off addresses gone; the decision's generations are not touched (the config is
        the same). Nothing when ebpf is not installed."""
        if self._pinned_nothing():
            return []
        ipr = open_ipr()
        facts, pinned = self._read(ipr)
        try:
            if pinned is None or not facts.installed or facts.draining:
                return []
            desired = self._desired(plan, facts.links)
            pinned.obj = self.obj()
            created = pinned.ensure()  # every map open: the programs are checked against them all
            changes = self._write_node(facts, pinned, desired)
            changes += self._attach_all(facts, pinned, desired, ipr, self.obj(), created)
            changes += self._sync_conntrack(desired)  # the fast path's links
            gone = [i for i in facts.ifaces if i not in facts.links]
            for index in gone:  # deleted links: their entries (and drains) go with them
                pinned.delete("ipmq_ifaces", struct.pack("=I", index))
            return changes + ([f"{len(gone)} deleted links forgotten"] if gone else [])
        except (loader.BpfError, OSError) as exc:
            raise ApplyError(f"ebpf: {exc}") from None
        finally:
            if pinned is not None:
                pinned.close()
            ipr.close()

    def _attach_all(self, facts: EbpfFacts, pinned: Pinned, desired: EbpfDesired, ipr, obj: loader.BpfObject,
                    created: list[str]) -> list[str]:
        """Steps 4 and 5 of _install: programs and filters, links no longer matched."""
        # 4. programs, then the filters
        fds, reloaded = programs.load(pinned, obj, force=bool(created))  # new maps: programs must use them
        try:
            # in the try: a failing iptables-restore must not leak the programs' fds
            changes = assist.sync(desired.families, pin_dir(), force=reloaded, fast=desired.fast)
            # Ingress first: from then on every UDP (or other) flow entering is recorded,
            # and flows already under way are taken from conntrack, so that no reply
            # leaving a pod-facing interface is ever mistaken for a new flow.
            fresh = [i for i in desired.matched if "egress" not in facts.attached.get(i, {})
                     or not facts.attached[i]["egress"]]
            for link in desired.matched.values():
                attach(ipr, pinned, link, fds, obj, hooks=("ingress",))
            if fresh:
                seed_pass(pinned)
            for link in desired.matched.values():
                attach(ipr, pinned, link, fds, obj, hooks=("egress",))
                # from now on the tc programs translate its TCP, UDP and echo flows, not ipmq_nf
                pinned.update("ipmq_ifaces", struct.pack("=I", link.index), link.iface_value(attached=True))
        finally:
            for fd in fds.values():
                pinned.sys.close(fd)
        # 5. links no longer matched: drain (flows keep their decision) or detach
        stale = [i for i in facts.attached if i not in desired.matched]
        stale += [i for i in facts.ifaces if i not in desired.matched and i not in facts.attached]
        if stale:
            busy = handover.busy_ifindexes(pinned)
            for index in set(stale):
                still = facts.links.get(index)  # None: the link is gone
                if still is not None and index in busy and index in facts.attached:
                    pinned.update("ipmq_ifaces", struct.pack("=I", index), still.iface_value(drain=True))
                else:
                    detach(ipr, pinned, index)
        return [f"{len(desired.matched)} interfaces", *changes]

    def reap(self) -> list[str]:
        """For callers after a switch away from ebpf: remove the drained datapath once
        its flows are quiet. Cheap when nothing of ours is installed."""
        if self._pinned_nothing() and not drain_tables_present():
            return []
        ipr = open_ipr()
        pinned = self._pinned()
        try:
            return handover.reap(pinned, ipr)
        finally:
            if pinned is not None:
                pinned.close()
            ipr.close()

    def remove(self) -> list[str]:
        if loader.syscall_number() is None:
            return []
        ipr = open_ipr()
        try:
            facts, pinned = self._read(ipr)
            try:
                if not facts.installed and not facts.attached:
                    gone = [*assist.remove(), *(["nft tables " + ", ".join(t)] if (t := delete_tables()) else [])]
                    return gone
                families = [f"ipv{f}" for f in FAMILIES if facts.flags & (F_V4 if f == 4 else F_V6)] or ["programs"]
                if pinned is not None and facts.attached and not facts.draining and self._another_live():
                    # a switch: another backend masquerades new flows now; ours keep theirs
                    busy = handover.busy_ifindexes(pinned)
                    if busy:
                        # the fast path ends first: the new backend must see new flows
                        # (ours are picked up mid-stream: README, ebpf-conntrack)
                        delete_tables(drain=False, keeper=False, notrack=True)
                        handover.enter_drain(pinned)
                        return [f + " (draining its connections)" for f in families]
                if pinned is not None:
                    pinned.close()
                    pinned = None
                handover.remove_all(ipr)
                return families
            finally:
                if pinned is not None:
                    pinned.close()
        finally:
            ipr.close()
