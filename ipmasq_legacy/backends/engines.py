"""Which NAT engines of ours are live in this network namespace, asked of the kernel.

state.json says what we installed; it can be lost (a wiped /run, a mistake) while the
rules stay. `auto`, apply, reconcile and status ask the kernel too, so that a second
engine is never installed beside the first, and one that is there is seen and removed.

Every question is scoped to objects of ours, by name, and cheap (reconcile's quick path
asks them all): nf_tables tables and chains one netlink request each, no `nft` process;
the legacy nat table through `iptables-legacy-save -t nat` only where /proc says it
exists (listing it would otherwise create it; variants.saves); the ebpf datapath by its pinned `ctl`
map, or, without pins, by a qdisc dump and the filters of the links with a clsact.
Nothing imports pyroute2 (0.1 s) and nothing is changed.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

from .. import netlink, ruledata
from ..netlink import NETLINK_NETFILTER, NETLINK_ROUTE
from . import variants
from .base import FAMILIES
from .registry import NAMES

# The names of our objects, from rules/ (iptables.CHAIN, nftrender.TABLE): this module does
# not import the backends' modules, so a run imports only the one it uses (~3-5 ms of CPU).
IPTABLES_CHAIN = variants.OUR_CHAIN
NFT_TABLE = ruledata.load("nftables")["table"]

# The ebpf datapath's netfilter assist chain belongs to ebpf, never to the iptables backends.
ASSIST_CHAIN = ruledata.load("ebpf").get("assist", {}).get("chain", "IPMASQ-EBPF")
OUR_CHAINS = (IPTABLES_CHAIN, ASSIST_CHAIN)
NFT_FAMILY = {4: "ip", 6: "ip6"}

NFT_MSG_GETCHAIN = (netlink.NFNL_SUBSYS_NFTABLES << 8) | 4
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3
RTM_GETQDISC, TCA_KIND = 38, 1
TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info


def live_engines() -> list[str]:
    """The backends of ours whose NAT is live here, in backends.NAMES order. An ebpf
    datapath draining its connections after a switch away is not live: it takes no new
    flow, and its own reap removes it."""
    chains = {"legacy": _legacy_chains(), "nft": _nft_chains()}
    found = {f"iptables-{variant}" for variant, names in chains.items() if IPTABLES_CHAIN in names}
    if _nft_tables_present():
        found.add("nftables")
    if "ebpf" in NAMES and _ebpf_live(assist=any(ASSIST_CHAIN in names for names in chains.values())):
        found.add("ebpf")
    return [name for name in NAMES if name in found]


def second_engines(live: list[str], backend: str, replaced: str | None = None) -> list[str]:
    """Drift phrases, one per engine of ours live beside `backend` (`replaced`: the
    recorded backend a migration is replacing: expected, not a second engine)."""
    return [f"second NAT engine live: {name}" for name in live if name not in (backend, replaced)]


# ---------------------------------------------------------------- netfilter


def _legacy_chains() -> set[str]:
    """Our chains in the nat table of iptables-legacy, either family (variants.saves: both
    listed at once, and only where /proc shows the table, as listing it would create it)."""
    found: set[str] = set()
    for text in variants.saves("legacy", "nat").values():
        found |= {line[1:].split(" ", 1)[0] for line in text.splitlines() if line.startswith(":")}
    return found & set(OUR_CHAINS)


def _nft_chains() -> set[str]:
    """Our chains in iptables-nft's nat tables (`table ip nat`, `table ip6 nat`), asked of
    nf_tables one chain at a time."""
    found: set[str] = set()
    try:
        with netlink.Netlink(NETLINK_NETFILTER) as nl:
            for family in FAMILIES:
                for chain in OUR_CHAINS:
                    if _nft_chain_exists(nl, NFT_FAMILY[family], "nat", chain):
                        found.add(chain)
    except OSError:
        pass  # nf_tables cannot be asked: no chain of ours there
    return found


def _nft_chain_exists(nl: netlink.Netlink, family: str, table: str, chain: str) -> bool:
    body = (struct.pack("=BBH", netlink.NFPROTO[family], 0, 0) + netlink.nla(NFTA_CHAIN_TABLE, table.encode() + b"\0")
            + netlink.nla(NFTA_CHAIN_NAME, chain.encode() + b"\0"))
    try:
        return bool(nl.request(NFT_MSG_GETCHAIN, body))
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # no such table or chain
            return False
        raise


def _nft_tables_present() -> bool:
    try:
        tables = netlink.nft_tables([(NFT_FAMILY[f], NFT_TABLE) for f in FAMILIES])
    except OSError:
        return False
    return any(attrs is not None for attrs in tables.values())


# ---------------------------------------------------------------- ebpf


def ebpf_pin_dir() -> Path:
    """ebpf.pin_dir() without importing the ebpf package (~20 ms of CPU, paid by every
    netfilter backend's run for one file test): the same answer (tests/test_engines.py)."""
    return Path(os.environ.get("IPMASQ_BPF_DIR") or ruledata.load("ebpf")["pin_dir"])


def _ebpf_live(assist: bool) -> bool:
    """Pinned: live unless the datapath drains (F_DRAIN in its live cfg). Not pinned: live
    if anything of it is left that NATs: a tc filter of ours on any link, or its assist
    chain (EbpfBackend.remove removes both)."""
    if ebpf_pin_dir().joinpath("ctl").exists():
        return not _ebpf_draining()
    return assist or _our_tc_filters()


def _ebpf_draining() -> bool:
    from .ebpf import CFG, F_DRAIN, Pinned

    try:
        with Pinned(None) as pinned:
            if pinned.open("ipmq_ctl") is None or pinned.open("ipmq_cfg") is None:
                return False
            return bool(CFG.unpack_from(pinned.cfg(pinned.gen()))[0] & F_DRAIN)
    except (OSError, struct.error):
        return False  # pinned but unreadable: counted as live, the safe side for "one engine"


def _our_tc_filters() -> bool:
    """A bpf filter named ipmasq_legacy/... on a clsact hook of any link."""
    try:
        with netlink.Netlink(NETLINK_ROUTE) as nl:
            clsact = set()
            for _kind, msg in nl.request(RTM_GETQDISC, bytes(TCMSG.size), dump=True):
                index = TCMSG.unpack_from(msg)[1]
                if netlink.text(netlink.attrs(msg, TCMSG.size).get(TCA_KIND)) == "clsact":
                    clsact.add(index)
            if not clsact:
                return False
            from .ebpf.tc import our_filters  # only here: the ebpf package is not imported for nothing

            return any(any(our_filters(index, nl).values()) for index in sorted(clsact))
    except OSError:
        return False
