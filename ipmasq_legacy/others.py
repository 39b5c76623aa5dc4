"""Masquerading that other managers installed: found by name, reported, never touched
unless the operator asks (`apply --take-over ip-masq-agent`).

Reported by `status`, `doctor`, `reconcile` (a log line) and `flush`: ip-masq-agent's chain
(`IP-MASQ-AGENT`, or `IP-MASQ` as GKE names it with --masq-chain), flannel's
`FLANNEL-POSTRTG`, Cilium's `CILIUM_POST_nat`, netavark's `NETAVARK-*`, and every other
MASQUERADE rule in a nat table (Docker's `-s 172.17.0.0/16 ! -o docker0`), in both iptables
variants and both families; and nft tables of others with a masquerade statement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import kernel, netlink, state
from .backends import variants
from .backends.base import run
from .errors import ApplyError

# chain name (or prefix, ending in "*") -> the manager it belongs to
CHAINS = {"IP-MASQ-AGENT": "ip-masq-agent", "IP-MASQ": "ip-masq-agent", "FLANNEL-POSTRTG": "flannel",
          "CILIUM_POST_nat": "cilium", "NETAVARK-*": "netavark", "KUBE-POSTROUTING": "kube-proxy",
          "DOCKER*": "docker"}
OURS = ("IPMASQ-LEGACY", "IPMASQ-EBPF")
TAKE_OVER = {"ip-masq-agent"}  # what --take-over knows how to remove
RECORD = "taken-over.json"
IPTABLES_NFT_TABLES = {"nat", "filter", "mangle", "raw", "security"}


@dataclass(frozen=True)
class Found:
    manager: str
    where: str  # "iptables-nft ipv4", "nft table inet foo"
    what: str  # the chain, or the rule

    def text(self) -> str:
        return f"{self.manager}: {self.what} ({self.where})"


def _manager(chain: str, rule: str) -> str:
    for name, manager in CHAINS.items():
        if chain == name or (name.endswith("*") and chain.startswith(name[:-1])):
            return manager
    return "docker" if re.search(r"docker0|\bbr-[0-9a-f]{12}\b", rule) else "unknown"


def _saves() -> list[tuple[str, int, str]]:
    """(variant, family, `-save -t nat` text) where a nat table exists (a legacy one is
    never created by looking: variants.saves)."""
    return [(variant, family, text) for variant in variants.VARIANTS
            for family, text in sorted(variants.saves(variant, "nat").items())]


def find() -> list[Found]:
    found: list[Found] = []
    for variant, family, text in _saves():
        where = f"iptables-{variant} ipv{family}"
        declared = re.findall(r"^:(\S+) ", text, re.M)
        for chain in declared:
            if chain in OURS or chain in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"):
                continue
            manager = _manager(chain, "")
            if manager not in ("unknown", "docker", "kube-proxy"):
                found.append(Found(manager, where, chain))
        for line in text.splitlines():
            m = re.match(r"-A (\S+) (.*-j MASQUERADE.*)$", line)
            if m and m.group(1) not in OURS and _manager(m.group(1), line) in ("docker", "kube-proxy", "unknown"):
                found.append(Found(_manager(m.group(1), line), where, line))
    k = kernel.current()
    if k.which("nft"):
        # others' tables one by one: `nft list ruleset` would fetch our exempt set's
        # elements too (0.5-0.9 s beside 100,000 of them, on every `status`)
        try:
            tables = netlink.nft_table_names()
        except OSError:
            tables = []
        for nft_family, name in tables:
            if name.startswith("ipmasq_legacy") or name in IPTABLES_NFT_TABLES:  # ours; iptables-nft's: above
                continue
            listing = k.run(["nft", "list", "table", nft_family, name], check=False).stdout
            found += [Found(name, f"nft table {nft_family} {name}", line.strip())
                      for line in listing.splitlines() if "masquerade" in line]
    return sorted(set(found), key=lambda f: (f.manager, f.where, f.what))


def _chains_of(manager: str, found: list[Found]) -> list[Found]:
    return [f for f in found if f.manager == manager and f.where.startswith("iptables-") and " " not in f.what]


def check_take_over(names) -> None:
    """Refuse before anything changes when a manager we took over has put its chain back:
    it still runs, and would fight us."""
    taken = state.read_json(RECORD)
    for name in names:
        if name not in TAKE_OVER:
            raise ApplyError(f"--take-over {name}: unknown (known: {', '.join(sorted(TAKE_OVER))})")
        back = _chains_of(name, find()) if name in taken else []
        if back:
            raise ApplyError(f"--take-over {name}: its chain {back[0].what} came back ({back[0].where}) after it was "
                             f"taken over: {name} is still running; stop it first (its DaemonSet)")


def take_over(name: str) -> list[str]:
    """Remove the manager's jumps and chains in every variant and family (one
    iptables-restore per variant and family); returns what was removed."""
    removed = []
    for variant, family, text in _saves():
        chains = [c for c in re.findall(r"^:(\S+) ", text, re.M) if _manager(c, "") == name]
        if not chains:
            continue
        lines = ["*nat"]
        for chain in chains:
            lines += ["-D" + ln[2:] for ln in text.splitlines() if ln.startswith("-A ") and ln.endswith(f" -j {chain}")]
        for chain in chains:
            lines += [f"-F {chain}", f"-X {chain}"]
        run([variants.tool(family, variant, "-restore"), "--noflush", "-w"], input="\n".join(lines + ["COMMIT"]) + "\n")
        removed += [f"{c} (iptables-{variant} ipv{family})" for c in chains]
    record = state.read_json(RECORD)
    record[name] = sorted({r.split(" ")[0] for r in removed} | set(record.get(name, [])))
    state.write_json(RECORD, record)
    return removed
