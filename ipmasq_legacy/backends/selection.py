"""Which backend `auto` picks, and why: keep ONE NAT engine on the node where we can.

Order (first that applies wins):
1. the backend recorded in the state file (what is installed stays installed);
1b. without a record, the engines of ours the kernel holds (engines.live_engines): the
   only one; of several, the one steps 2-6 would pick if it is among them, else the first
   in backends.NAMES order (the caller removes the others once it is applied);
2. kube-proxy's own nftables table (`table ip kube-proxy`): nftables;
3. our chain IPMASQ-LEGACY, else kubelet's hint chains (KUBE-IPTABLES-HINT,
   KUBE-KUBELET-CANARY), in an iptables variant: that variant (iptables-nft first), the
   rule `--backend iptables` follows too (variants.py, after iptables-wrapper);
4. the engine holding the most rules: iptables-legacy, iptables-nft or native nftables
   (of the two variants iptables-nft on a tie, as variants.py counts);
5. nftables, where a probe in a throw-away network namespace shows the userspace and
   the kernel can run our table (nat chain, fib, interval set, masquerade);
6. iptables-legacy.
All reads are scoped listings; the probe never runs in the node's own namespace.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import kernel, ruledata, state
from . import variants

IPTABLES_BUILTIN_TABLES = {"filter", "nat", "mangle", "raw", "security"}
OUR_TABLE = "ipmasq_legacy"

# A table using everything our nftables backend uses, for step 5's probe (rules/nftables.yaml;
# backends.availability loads it).
NFT_PROBE = ruledata.load("nftables")["probe"]


@dataclass
class HostRules:
    """Rule counts per engine, and the hints found (for doctor and for auto)."""

    counts: dict[str, int] = field(default_factory=dict)
    hints: dict[str, str] = field(default_factory=dict)  # engine -> what was found, strongest first
    errors: list[str] = field(default_factory=list)
    iptables: dict[str, variants.Held] = field(default_factory=dict)  # per variant (variants.py)

    def busiest(self) -> str:
        """The engine holding the most rules: of the iptables variants the one variants.py
        would pick (iptables-nft on a tie), then an iptables variant before nftables."""
        top = variants.busiest(self.iptables) if self.iptables else None
        return max([f"iptables-{top or 'legacy'}", "nftables"], key=lambda k: self.counts.get(k, 0))


def _native_nft_rules() -> tuple[int, bool]:
    """(rules in nft tables that iptables-nft does not manage, kube-proxy's table found)."""
    k = kernel.current()
    if k.which("nft") is None:
        return 0, False
    text = k.run(["nft", "list", "ruleset"], check=False).stdout
    count, kube_proxy, native = 0, False, False
    for line in text.splitlines():
        m = re.match(r"table (\S+) (\S+) \{", line)
        if m:
            name = m.group(2)
            native = name not in IPTABLES_BUILTIN_TABLES and not name.startswith(OUR_TABLE)
            kube_proxy = kube_proxy or name == "kube-proxy"
        elif (native and line.startswith("\t\t") and not line.startswith("\t\t\t")
              and not re.match(r"\s+(type|policy|elements|flags|typeof|comment|size|timeout|}) ?", line)):
            count += 1
    return count, kube_proxy


def host_rules() -> HostRules:
    """Rules per engine; the iptables variants' counts and hints as variants.py reads them
    (the rule `--backend iptables` decides by), in its order of strength."""
    found = HostRules(iptables=variants.read())
    for variant, held in found.iptables.items():
        found.counts[f"iptables-{variant}"] = held.rules
    for variant, what in variants.hints(found.iptables):
        found.hints.setdefault(f"iptables-{variant}", what)
    count, kube_proxy = _native_nft_rules()
    found.counts["nftables"] = count
    if kube_proxy:
        found.hints["nftables"] = "kube-proxy's nftables table"
    return found


def choose_auto(available, live: Sequence[str] = ()) -> tuple[str, str]:
    """(backend name, why). `available` maps each backend to None or why it cannot run, or
    is a function returning that map (called only when needed: the nftables probe costs a
    namespace); `live` are the engines of ours live in the kernel (engines.live_engines)."""
    availability = functools.cache(available if callable(available) else lambda: available)
    recorded = state.read().get("backend")
    if recorded and availability().get(recorded, "unknown") is None:
        return recorded, f"installed (recorded in {state.state_dir() / 'state.json'})"
    if len(live) == 1:
        return live[0], f"the only NAT engine of ours live in the kernel (no usable state record): {live[0]}"
    try:
        name, why = _heuristics(availability())
    except LookupError:
        if not live:
            raise
        name, why = "", "no backend can run here"
    if not live:
        return name, why
    keep = name if name in live else live[0]
    how = f"the choice without them ({why})" if keep == name else "the first in backend order"
    return keep, (f"{len(live)} NAT engines of ours live in the kernel ({', '.join(live)}), no usable state record: "
                  f"keeping {keep}, {how}; the others are removed")


def _heuristics(available: dict[str, str | None]) -> tuple[str, str]:
    """Steps 2-6: what a node with nothing of ours gets."""
    found = host_rules()
    if "nftables" in found.hints and available.get("nftables") is None:
        return "nftables", f"the host already uses nftables ({found.hints['nftables']})"
    for engine, what in found.hints.items():
        if engine.startswith("iptables-") and available.get(engine) is None:
            return engine, f"the host already uses {engine} ({what})"
    firewalld = _firewalld()
    if firewalld and available.get("nftables") is None:
        # its reloads and restarts flush every iptables-nft table (ours with them), never
        # another nft table: measured by tests/test_neighbours.py
        return "nftables", f"firewalld runs here ({firewalld}): its reloads flush iptables-nft's tables"
    busiest = found.busiest()
    if found.counts[busiest] > 0 and available.get(busiest) is None:
        counts = ", ".join(f"{k} {v}" for k, v in found.counts.items())
        return busiest, f"the host's existing rules are mostly {busiest} (rules: {counts})"
    if available.get("nftables") is None:
        return "nftables", "no rules on the host yet; nftables runs here (probed in a throw-away namespace)"
    if available.get("iptables-legacy") is None:
        return "iptables-legacy", f"no rules on the host yet; nftables cannot run ({available.get('nftables')})"
    raise LookupError("no backend can run here: " + "; ".join(f"{k}: {v}" for k, v in available.items() if v))


def _firewalld() -> str | None:
    """What shows firewalld runs here: its nft table, or its iptables chains."""
    try:
        from .. import netlink

        if netlink.nft_tables([("inet", "firewalld")]).get(("inet", "firewalld")) is not None:
            return "table inet firewalld"
    except OSError:
        pass
    if re.search(r"^:INPUT_direct ", "".join(variants.saves("nft", "filter").values()), re.M):
        return "chain INPUT_direct in iptables-nft"
    return None
