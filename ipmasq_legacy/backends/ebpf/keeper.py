"""Two small nft tables of our own (nothing else of netfilter is touched):

  inet ipmasq_legacy_ebpf   while ebpf is installed: one `ct state` rule, so conntrack
                            tracks flows from their first packet. A netfilter backend
                            installed later then sees our flows as established and
                            leaves them to us, instead of picking them up mid-stream
                            as new and masquerading them again with another port.
  ip/ip6 ipmasq_legacy_drain   after a switch from netfilter: an empty nat chain that
                            keeps netfilter's NAT hooks registered, so the connections
                            netfilter translated keep being translated, until conntrack
                            holds none.

Asked for by name over ..netlink (one NFT_MSG_GETTABLE each), written with `nft -f -`.
"""

from __future__ import annotations

import shutil
import subprocess

from ... import netlink
from .names import SHAPES

KEEPER_TABLE = f"{SHAPES['filter_name']}_ebpf"
DRAIN_TABLE = f"{SHAPES['filter_name']}_drain"
KEEPER = (f"table inet {KEEPER_TABLE} {{\n\tchain conntrack {{\n"
          "\t\ttype filter hook prerouting priority filter; policy accept;\n"
          "\t\tct state untracked accept\n\t}\n}\n")


def _nft(text: str) -> tuple[int, str]:
    try:
        proc = subprocess.run(["nft", "-f", "-"], input=text, capture_output=True, text=True)
    except FileNotFoundError:
        return 127, "nft: command not found"
    return proc.returncode, proc.stderr


DRAIN_TABLES = (("ip", DRAIN_TABLE), ("ip6", DRAIN_TABLE))
KEEPER_TABLES = (("inet", KEEPER_TABLE),)


def nft_tables(wanted=DRAIN_TABLES + KEEPER_TABLES) -> set[tuple[str, str]]:
    """Which of the tables `wanted` exist (none when nft is missing or nf_tables cannot
    be asked, as `nft list tables` failing said before)."""
    if shutil.which("nft") is None:
        return set()
    try:
        found = netlink.nft_tables(wanted)
    except OSError:
        return set()
    return {table for table, attrs in found.items() if attrs is not None}


def drain_tables_present(tables: set | None = None) -> list[str]:
    tables = nft_tables(DRAIN_TABLES) if tables is None else tables
    return [fam for fam in ("ip", "ip6") if (fam, DRAIN_TABLE) in tables]


def keeper_present(tables: set | None = None) -> bool:
    tables = nft_tables(KEEPER_TABLES) if tables is None else tables
    return ("inet", KEEPER_TABLE) in tables


def add_keeper() -> bool:
    if shutil.which("nft") is None:
        return False
    return _nft(f"add table inet {KEEPER_TABLE}\ndelete table inet {KEEPER_TABLE}\n" + KEEPER)[0] == 0


def add_drain_tables() -> bool:
    if shutil.which("nft") is None:
        return False
    text = ""
    for fam in ("ip", "ip6"):
        text += (f"table {fam} {DRAIN_TABLE} {{\n\tchain postrouting {{\n"
                 "\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t}\n}\n")
    return _nft(text)[0] == 0


def delete_tables(drain: bool = True, keeper: bool = True) -> list[str]:
    tables = nft_tables()
    text = ""
    gone = []
    if drain:
        for fam in drain_tables_present(tables):
            text += f"delete table {fam} {DRAIN_TABLE}\n"
            gone.append(f"{fam} {DRAIN_TABLE}")
    if keeper and keeper_present(tables):
        text += f"delete table inet {KEEPER_TABLE}\n"
        gone.append(f"inet {KEEPER_TABLE}")
    if text:
        _nft(text)
    return gone
