"""The iptables-nft tables our applies brought into being, removed by `flush` when empty.

`iptables-nft-restore` creates the whole `nat` (or `mangle`) table of a family the first
time a rule goes there: after a flush the empty table would stay, and every
`iptables-nft` listing would show it (and iptables-nft warns about legacy tables beside
it). So the first apply on a node notes which of these tables existed before it, and
flush deletes those that did not and are empty again: only iptables-nft's own base
chains, no rule, no other chain (one nft transaction that deletes each base chain,
which the kernel refuses for a chain with rules, then the table; it changes nothing when
anything is in use). iptables-legacy's tables cannot be deleted from userspace: they
live until the network namespace does (README "Known limits").
"""

from __future__ import annotations

import json

from .. import kernel, netlink, state

RECORD = "tables-before.json"
# (nft family, table) that iptables-nft creates for our chains (nat: the iptables
# backends and ebpf's assist; mangle: ebpf's guard)
TABLES = (("ip", "nat"), ("ip6", "nat"), ("ip", "mangle"), ("ip6", "mangle"))
BASE_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}


def _present() -> list[list[str]]:
    try:
        found = netlink.nft_tables(TABLES)
    except OSError:
        return []
    return [list(t) for t in TABLES if found.get(t) is not None]


def note_before_first_apply() -> None:
    """Once per node (until a flush): which of TABLES exist before we add anything."""
    if not state.read_json(RECORD):
        state.write_json(RECORD, {"existed": _present()})


def _empty(family: str, table: str) -> list[str] | None:
    """The base chains of the table when it holds nothing else (else None)."""
    proc = kernel.current().run(["nft", "-j", "list", "table", family, table], check=False)
    if proc.returncode != 0:
        return None
    try:
        items = json.loads(proc.stdout).get("nftables", [])
    except ValueError:
        return None
    chains = [i["chain"] for i in items if "chain" in i]
    if any(k not in ("metainfo", "table", "chain") for i in items for k in i):
        return None  # rules, sets, maps, ...: in use
    if any(c.get("name") not in BASE_CHAINS or c.get("policy", "accept") != "accept" for c in chains):
        return None
    return [c["name"] for c in chains]


def remove_created() -> list[str]:
    """Delete the tables of TABLES that did not exist before our first apply and are
    empty now; forget the note. Returns what was deleted."""
    record = state.read_json(RECORD)
    state.remove(RECORD)
    if not record or kernel.current().which("nft") is None:
        return []
    existed = {tuple(t) for t in record.get("existed", [])}
    deleted = []
    for family, table in TABLES:
        if (family, table) in existed or [family, table] not in _present():
            continue
        chains = _empty(family, table)
        if chains is None:
            continue
        text = "".join(f"delete chain {family} {table} {c}\n" for c in chains) + f"delete table {family} {table}\n"
        if kernel.current().nft(text).returncode == 0:
            deleted.append(f"table {family} {table}")
    return deleted
