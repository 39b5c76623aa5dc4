"""The ebpf datapath's netfilter assist: iptables chains whose rules ask the pinned
socket filters of masq.c through xt_bpf.

* nat `IPMASQ-EBPF` asks `prog_nf` (ipmq_nf) and masquerades what the tc programs do not
  translate: protocols other than TCP, UDP and ICMP echo (netfilter rewrites SCTP's
  CRC32c), and new connections leaving a matching link the programs are not attached to
  yet (tc programs can only be attached to a link that exists: one that appeared since
  the last sync would otherwise let pods' packets out with their own address);
* mangle `IPMASQ-EBPF-IN` marks connections whose first packet was addressed to the node
  (published ports, NodePorts: DNATed on, never pod egress), for the nat chain and for
  the tc programs' own record of them (masq.c ipmq_inbound);
* mangle `IPMASQ-EBPF-GUARD` asks `prog_guard` (ipmq_guard) and drops packets of flows
  the tc programs translated that now leave a link they are not on (conntrack holds such
  a flow as established and untranslated: no NAT hook sees it again).

The rules read the same maps as the tc programs, so the decision stays one. The chains
live in the iptables variant the host uses (iptables.detect_variant; where they already
are, they stay), written in one `iptables-restore --noflush -w` per family; xt_bpf holds
the program it was given, so they are written again whenever the programs are reloaded.
Shapes: rules/ebpf.yaml `assist`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ... import kernel, ruledata
from ...plan import FamilyPlan, masquerade_rules
from ..base import FAMILIES, run
from ..iptables import SHAPES as IPT
from ..iptables import VARIANTS, br_netfilter, detect_variant, legacy_tables

ASSIST = ruledata.load("ebpf")["assist"]
CHAIN = ASSIST["chain"]
GUARD_CHAIN = ASSIST["guard_chain"]
IN_CHAIN = ASSIST["in_chain"]
# (table, chain, its jump): written in this order, one transaction per family
PARTS = (("mangle", IN_CHAIN, ASSIST["in_jump"]), ("nat", CHAIN, ASSIST["jump"]),
         ("mangle", GUARD_CHAIN, ASSIST["guard_jump"]))


def tool(family: int, variant: str, suffix: str = "") -> str:
    return f"{'iptables' if family == 4 else 'ip6tables'}-{variant}{suffix}"


def missing(variant: str | None = None) -> list[str]:
    variants = [variant] if variant else list(VARIANTS)
    need = [tool(f, v, s) for v in variants for f in FAMILIES for s in ("-restore", "-save")]
    return [t for t in need if kernel.current().which(t) is None]


def _out(interface: str | None) -> str:
    return IPT["out_interface"].format(interface=interface) if interface else IPT["out_interface_any"]


def chain_rules(fp: FamilyPlan, pins: Path, bridged: bool, fast: bool = False) -> dict[str, list[str]]:
    """Our chains by name, as `iptables -S CHAIN` prints them. Sources are the programs'
    business (the src tries). `bridged`: br_netfilter is loaded (read by the caller).
    `fast` (ebpf-conntrack: false): the guard also drops an untracked packet that ipmq_nf
    would have masqueraded (the notrack table foresaw an attached link; policy routing, or
    a link without an address of the family as the map says, sent it elsewhere)."""
    nat = [f"-N {CHAIN}"]
    if bridged:
        nat.append(ASSIST["bridged"])
    nat += [ASSIST["inbound"], ASSIST["local"]]
    for rule in masquerade_rules(dataclasses.replace(fp, sources=())):
        pieces = dict(
            out_interface=_out(rule.interface),
            protocol=IPT["protocol"].format(protocol=rule.protocol) if rule.protocol else "",
            port_share=IPT["port_share"].format(probability=rule.share / 2**31) if rule.share is not None else "",
            program=pins / "prog_nf",
            random_fully=IPT["random_fully"] if fp.random_fully else "",
        )
        if rule.snat is None:
            nat.append(ASSIST["masquerade"].format(
                to_ports=IPT["to_ports"].format(first=rule.ports[0], last=rule.ports[1]) if rule.ports else "",
                **pieces))
        else:  # egress-masquerade-addresses: the same address the tc programs translate to
            ported = rule.ports and fp.family == 6
            nat.append(ASSIST["snat"].format(
                address=IPT["snat_address6_ported"].format(address=rule.snat) if ported else rule.snat,
                ports=IPT["snat_ports"].format(first=rule.ports[0], last=rule.ports[1]) if rule.ports else "",
                **pieces))
    guard = [f"-N {GUARD_CHAIN}"]
    if fast:
        guard += [ASSIST["untracked_guard"].format(out_interface=_out(i), program=pins / "prog_nf")
                  for i in (fp.interfaces or (None,))]
    guard += [ASSIST["guard"].format(out_interface=_out(i), program=pins / "prog_guard")
              for i in (fp.interfaces or (None,))]
    return {IN_CHAIN: [f"-N {IN_CHAIN}", ASSIST["in_mark"]], CHAIN: nat, GUARD_CHAIN: guard}


@dataclasses.dataclass
class AssistLive:
    variant: str
    family: int
    jumps: dict[str, list[str]]  # chain -> the rules jumping to it
    rules: dict[str, list[str]]  # chain -> as -S prints it, [] when missing

    @property
    def installed(self) -> bool:
        return any(self.jumps.values()) or any(self.rules.values())


def render_restore(fp: FamilyPlan | None, pins: Path, live: AssistLive, bridged: bool, fast: bool = False) -> str:
    """One transaction: each chain rewritten (fp None: removed) with exactly one jump."""
    want = chain_rules(fp, pins, bridged, fast) if fp is not None else {}
    by_table: dict[str, list[str]] = {}
    for table, chain, jump in PARTS:
        jumps, exists = live.jumps.get(chain, []), bool(live.rules.get(chain))
        lines = by_table.setdefault(table, [])
        if fp is None:
            lines += ["-D" + j[2:] for j in jumps]
            if exists:
                lines += [f":{chain} - [0:0]", f"-X {chain}"]
        else:
            lines += [f":{chain} - [0:0]", *want[chain][1:]]
            if jumps != [jump]:
                lines += ["-D" + j[2:] for j in jumps] + [jump]
    out = [line for table, lines in by_table.items() if lines for line in (f"*{table}", *lines, "COMMIT")]
    return "\n".join(out) + "\n"


def read(variant: str, family: int) -> AssistLive:
    """Our jumps and chains in one variant, from one `-save` (which lists only the tables
    that exist: for legacy, those /proc names; it creates none)."""
    empty = AssistLive(variant, family, {}, {})
    if variant == "legacy" and not {table for table, _c, _j in PARTS} & legacy_tables(family):
        return empty
    if kernel.current().which(tool(family, variant, "-save")) is None:
        return empty
    text = run([tool(family, variant, "-save")], check=False).stdout
    live = AssistLive(variant, family, {}, {})
    for table, chain, _jump in PARTS:
        m = re.search(rf"^\*{table}\n(.*?)^COMMIT", text, re.M | re.S)
        body = m.group(1).splitlines() if m else []
        live.jumps[chain] = [ln for ln in body if ln.startswith("-A ") and ln.endswith(f" -j {chain}")]
        rules = [ln for ln in body if ln.startswith(f"-A {chain} ")]
        live.rules[chain] = [f"-N {chain}", *rules] if f":{chain} - " in "\n".join(body) else []
    return live


def read_all() -> list[AssistLive]:
    return [read(v, f) for v in VARIANTS for f in FAMILIES]


def variant_in_use(found: list[AssistLive]) -> str:
    """Where our chains are already (so a re-apply stays put), else the host's iptables."""
    return next((live.variant for live in found if live.installed), None) or detect_variant()[0]


def _wanted(live: AssistLive, families: dict[int, FamilyPlan | None], variant: str) -> FamilyPlan | None:
    return families.get(live.family) if live.variant == variant else None


def _in_sync(live: AssistLive, fp: FamilyPlan, pins: Path, bridged: bool, fast: bool = False) -> bool:
    return live.rules == chain_rules(fp, pins, bridged, fast) and all(live.jumps.get(chain) == [jump] for _t, chain, jump in PARTS)


def problems(families: dict[int, FamilyPlan | None], pins: Path, found: list[AssistLive],
             fast: bool = False) -> list[str]:
    bridged = br_netfilter()
    variant = variant_in_use(found)
    out = []
    for live in found:
        fp = _wanted(live, families, variant)
        if fp is None and live.installed:
            out.append(f"ipv{live.family}: netfilter assist in iptables-{live.variant} not wanted")
        elif fp is not None and not _in_sync(live, fp, pins, bridged, fast):
            out.append(f"ipv{live.family}: netfilter assist chains " + ("missing" if not live.installed else "differ"))
    return out


def sync(families: dict[int, FamilyPlan | None], pins: Path, force: bool = False, fast: bool = False) -> list[str]:
    """Make the chains what the plan wants (force: rewrite them even when they look right,
    for reloaded programs); remove them from the other variant. Returns what changed."""
    found = read_all()
    variant = variant_in_use(found)
    bridged = br_netfilter()
    changed = []
    for live in found:
        fp = _wanted(live, families, variant)
        if (fp is None and not live.installed) or (fp is not None and not force
                                                   and _in_sync(live, fp, pins, bridged, fast)):
            continue
        run([tool(live.family, live.variant, "-restore"), "--noflush", "-w"],
            input=render_restore(fp, pins, live, bridged, fast))
        changed.append(f"ipv{live.family} netfilter assist {'removed' if fp is None else 'written'} "
                       f"(iptables-{live.variant})")
    return changed


def remove() -> list[str]:
    return sync({}, Path("/"))


def fingerprint_text() -> str:
    return "\n".join(f"{a.variant} {a.family} {sorted(a.jumps.items())} {sorted(a.rules.items())}" for a in read_all())
