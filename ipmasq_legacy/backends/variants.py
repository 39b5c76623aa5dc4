"""The two iptables variants (iptables-legacy, iptables-nft): which one the host uses, and
their `-save` listings. The one reader of those listings for `auto` (selection.host_rules),
the `iptables` datapath and ebpf's assist (iptables.detect_variant), the engines of ours
(engines.py) and others' masquerading (others.py).

Which variant, as iptables-wrapper decides (kubernetes-sigs/iptables-wrappers), with our
own chain first so that a re-apply stays where it is:
1. our chain (IPMASQ-LEGACY) in a variant: that variant;
2. kubelet's hint chains (KUBE-IPTABLES-HINT, KUBE-KUBELET-CANARY): that variant;
   (1 and 2: iptables-nft before iptables-legacy, as the wrapper asks)
3. the rules, counted as the wrapper counts them (lines starting with '-' in every
   table of both families): iptables-legacy where it holds more, else iptables-nft;
4. with no rules at all (`detect` only): the system's `iptables`.

A legacy table is created by listing it by name, so a `-save -t TABLE` of iptables-legacy
is only run where /proc lists that table; a `-save` of every table creates none.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from .. import kernel, ruledata
from ..errors import ApplyError
from .base import FAMILIES

VARIANTS = ("legacy", "nft")
PRECEDENCE = ("nft", "legacy")  # who wins a hint found in both (steps 1 and 2)
OUR_CHAIN = ruledata.load("iptables")["chain"]
_HINT = re.compile(r"^:KUBE-(IPTABLES-HINT|KUBELET-CANARY) ", re.M)
KUBELET_HINT = "kubelet's KUBE-IPTABLES-HINT / KUBE-KUBELET-CANARY chain"


def tool(family: int, variant: str, suffix: str = "-save") -> str:
    return f"{'iptables' if family == 4 else 'ip6tables'}-{variant}{suffix}"


def legacy_tables(family: int) -> set[str]:
    """The iptables-legacy tables that exist in this namespace, from /proc (none where
    ip_tables is not loaded)."""
    names = kernel.current().read_text("/proc/net/ip_tables_names" if family == 4 else "/proc/net/ip6_tables_names")
    return set((names or "").split())


def saves(variant: str, table: str | None = None) -> dict[int, str]:
    """The `-save` text of each family (of `table`; None: every table), where the tool is
    there and, for a legacy table, where the table exists. The families are listed at
    once (reconcile's quick path asks engines.live_engines on every run)."""
    k = kernel.current()
    argvs = {}
    for family in FAMILIES:
        if table is not None and variant == "legacy" and table not in legacy_tables(family):
            continue
        if k.which(tool(family, variant)) is not None:
            argvs[family] = [tool(family, variant)] + (["-t", table] if table else [])
    out = dict.fromkeys(argvs, "")

    def one(family: int) -> None:
        try:
            out[family] = k.run(argvs[family], check=False).stdout
        except ApplyError:  # gone since `which`: nothing listed
            pass

    threads = [threading.Thread(target=one, args=(family,)) for family in argvs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def count_rules(text: str) -> int:
    """Rules in a `-save` listing, counted as iptables-wrapper counts them."""
    return sum(1 for line in text.splitlines() if line.startswith("-"))


@dataclass(frozen=True)
class Held:
    """What one variant holds, in both families."""

    variant: str
    rules: int = 0
    hint: bool = False  # kubelet's hint chains
    ours: bool = False  # our chain


def held(variant: str, texts: dict[int, str] | None = None) -> Held:
    """From the listings of every table (`texts`: per family, as `saves` returns them)."""
    text = "".join((saves(variant) if texts is None else texts).values())
    return Held(variant, count_rules(text), bool(_HINT.search(text)), f":{OUR_CHAIN} " in text)


def read() -> dict[str, Held]:
    return {variant: held(variant) for variant in VARIANTS}


def hints(found: dict[str, Held]) -> list[tuple[str, str]]:
    """(variant, what was found) for each hint a variant holds, strongest first (steps 1
    and 2)."""
    return ([(v, f"our chain {OUR_CHAIN}") for v in PRECEDENCE if found[v].ours]
            + [(v, KUBELET_HINT) for v in PRECEDENCE if found[v].hint])


def busiest(found: dict[str, Held]) -> str | None:
    """Step 3: the variant holding more rules (iptables-nft on a tie); None with none."""
    legacy, nft = found["legacy"].rules, found["nft"].rules
    if not legacy and not nft:
        return None
    return "legacy" if legacy > nft else "nft"


def choose(found: dict[str, Held]) -> tuple[str, str] | None:
    """Steps 1-3: (variant, why), or None where no variant holds anything."""
    hinted = hints(found)
    if hinted:
        variant, what = hinted[0]
        return variant, f"{what} is in iptables-{variant}"
    top = busiest(found)
    if top is None:
        return None
    variant, other = (top, "nft" if top == "legacy" else "legacy")
    return variant, (f"iptables-{variant} holds more rules ({found[variant].rules} vs {found[other].rules})"
                     if found[variant].rules > found[other].rules else
                     f"iptables-{variant} holds as many rules as iptables-{other} ({found[variant].rules}): "
                     "iptables-nft on a tie")


def detect() -> tuple[str, str]:
    """(variant, why): the iptables the host uses (steps 1-4)."""
    chosen = choose(read())
    if chosen is not None:
        return chosen
    k = kernel.current()
    version = k.run(["iptables", "--version"], check=False).stdout if k.which("iptables") else ""
    if "legacy" in version:
        return "legacy", "no rules anywhere; the system's iptables is iptables-legacy"
    return "nft", "no rules anywhere; iptables-nft is the default"
