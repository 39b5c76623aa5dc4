"""The ebpf datapath's netfilter assist: one iptables nat chain per family whose
MASQUERADE rules ask the pinned socket filter `prog_nf` (masq.c ipmq_nf) through xt_bpf.

Why it exists (rules/ebpf.yaml `assist`): tc programs can only be attached to a link
that exists, so a link that appears after a sync would let pods' packets out with their
own address until the next sync; and netfilter already rewrites what BPF cannot cheaply
(SCTP's CRC32c) or may not share (a protocol without ports: one tuple per destination).
The rule asks the same maps as the tc programs, so the decision stays one.

The chain lives in the iptables variant the host uses (iptables.detect_variant) and is
written in one `iptables-restore --noflush -w` transaction per family, like the
iptables backend's; xt_bpf holds the program it was given, so the chain is written again
whenever the program is reloaded.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

from ... import ruledata
from ...plan import FamilyPlan, masquerade_rules
from ..base import FAMILIES, run
from ..iptables import SHAPES as IPT
from ..iptables import VARIANTS, detect_variant

ASSIST = ruledata.load("ebpf")["assist"]
CHAIN = ASSIST["chain"]


def tool(family: int, variant: str, suffix: str = "") -> str:
    return f"{'iptables' if family == 4 else 'ip6tables'}-{variant}{suffix}"


def missing(variant: str | None = None) -> list[str]:
    variants = [variant] if variant else list(VARIANTS)
    need = [tool(f, v, s) for v in variants for f in FAMILIES for s in ("-restore", "-save")]
    return [t for t in need if shutil.which(t) is None]


def chain_rules(fp: FamilyPlan, program: Path) -> list[str]:
    """Our chain, as `iptables -S CHAIN` prints it. Sources are the program's (src tries)."""
    lines = [f"-N {CHAIN}", ASSIST["local"]]
    for rule in masquerade_rules(dataclasses.replace(fp, sources=())):
        lines.append(ASSIST["masquerade"].format(
            out_interface=(IPT["out_interface"].format(interface=rule.interface) if rule.interface
                           else IPT["out_interface_any"]),
            protocol=IPT["protocol"].format(protocol=rule.protocol) if rule.protocol else "",
            port_share=IPT["port_share"].format(probability=rule.share / 2**31) if rule.share is not None else "",
            program=program,
            to_ports=IPT["to_ports"].format(first=rule.ports[0], last=rule.ports[1]) if rule.ports else "",
            random_fully=IPT["random_fully"] if fp.random_fully else "",
        ))
    return lines


def render_restore(fp: FamilyPlan | None, program: Path, live_jumps: list[str], chain_exists: bool) -> str:
    """One transaction: the chain rewritten (or, fp None, removed) and exactly one jump."""
    lines = ["*nat"]
    if fp is None:
        lines += ["-D" + j[2:] for j in live_jumps]
        if chain_exists:
            lines += [f":{CHAIN} - [0:0]", f"-X {CHAIN}"]
    else:
        lines += [f":{CHAIN} - [0:0]", *chain_rules(fp, program)[1:]]
        if live_jumps != [ASSIST["jump"]]:
            lines += ["-D" + j[2:] for j in live_jumps] + [ASSIST["jump"]]
    return "\n".join(lines + ["COMMIT"]) + "\n"


@dataclasses.dataclass
class AssistLive:
    variant: str
    family: int
    jumps: list[str]
    rules: list[str]  # the chain as -S prints it, [] when it does not exist

    @property
    def installed(self) -> bool:
        return bool(self.jumps or self.rules)


def read(variant: str, family: int) -> AssistLive:
    """Our jumps and chain in one variant, from one `-save -t nat` (which, for legacy,
    does not create the table: it lists what /proc says exists)."""
    if variant == "legacy":
        names = Path("/proc/net/ip_tables_names" if family == 4 else "/proc/net/ip6_tables_names")
        try:
            if "nat" not in names.read_text().split():
                return AssistLive(variant, family, [], [])
        except OSError:
            return AssistLive(variant, family, [], [])
    if shutil.which(tool(family, variant, "-save")) is None:
        return AssistLive(variant, family, [], [])
    text = run([tool(family, variant, "-save"), "-t", "nat"], check=False).stdout
    jumps = [ln for ln in text.splitlines() if ln.startswith("-A POSTROUTING ") and ln.endswith(f" -j {CHAIN}")]
    rules = [ln for ln in text.splitlines() if ln.startswith(f"-A {CHAIN} ")]
    if re.search(rf"^:{re.escape(CHAIN)} ", text, re.M):
        rules = [f"-N {CHAIN}", *rules]
    return AssistLive(variant, family, jumps, rules)


def read_all() -> list[AssistLive]:
    return [read(v, f) for v in VARIANTS for f in FAMILIES]


def variant_in_use(found: list[AssistLive]) -> str:
    """Where our chain is already (so a re-apply stays put), else the host's iptables."""
    for live in found:
        if live.installed:
            return live.variant
    return detect_variant()[0]


def problems(families: dict[int, FamilyPlan | None], program: Path, found: list[AssistLive]) -> list[str]:
    variant = variant_in_use(found)
    out = []
    for live in found:
        fp = families.get(live.family) if live.variant == variant else None
        if fp is None:
            if live.installed:
                out.append(f"ipv{live.family}: netfilter assist in iptables-{live.variant} not wanted")
            continue
        if live.rules != chain_rules(fp, program):
            out.append(f"ipv{live.family}: netfilter assist chain {CHAIN} "
                       + ("missing" if not live.rules else "differs"))
        if live.jumps != [ASSIST["jump"]]:
            out.append(f"ipv{live.family}: {len(live.jumps)} jumps to {CHAIN} instead of 1")
    return out


def sync(families: dict[int, FamilyPlan | None], program: Path, force: bool = False) -> list[str]:
    """Make the chains what the plan wants (force: rewrite them even when they look right,
    for a reloaded program); remove them from the other variant. Returns what changed."""
    found = read_all()
    variant = variant_in_use(found)
    changed = []
    for live in found:
        fp = families.get(live.family) if live.variant == variant else None
        if fp is None and not live.installed:
            continue
        if fp is not None and not force and live.rules == chain_rules(fp, program) and live.jumps == [ASSIST["jump"]]:
            continue
        run([tool(live.family, live.variant, "-restore"), "--noflush", "-w"],
            input=render_restore(fp, program, live.jumps, bool(live.rules)))
        changed.append(f"ipv{live.family} netfilter assist {'removed' if fp is None else 'written'} "
                       f"(iptables-{live.variant})")
    return changed


def remove() -> list[str]:
    return sync({}, Path("/"))


def fingerprint_text() -> str:
    return "\n".join(f"{a.variant} {a.family} {a.jumps} {a.rules}" for a in read_all())
