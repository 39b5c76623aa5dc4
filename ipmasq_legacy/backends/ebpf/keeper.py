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
  inet ipmasq_legacy_notrack   instead of the keeper, with `ebpf-conntrack: false` (the
                            fast path) once nothing of netfilter's drains: in the raw
                            prerouting hook, `notrack` for the forwarded TCP, UDP and ICMP
                            echo packets routed out of a link the tc programs are on (and
                            those entering one, bound for a link no pattern matches), so
                            conntrack neither tracks nor NATs what the programs translate.
                            Its comment is a digest of what it was written from (drift).

Asked for by name over ..netlink (one NFT_MSG_GETTABLE each), written with `nft -f -`
(kernel.current().nft).
"""

from __future__ import annotations

import hashlib

from ... import kernel, netlink
from ...errors import ApplyError
from .names import SHAPES

KEEPER_TABLE = f"{SHAPES['filter_name']}_ebpf"
DRAIN_TABLE = f"{SHAPES['filter_name']}_drain"
KEEPER = (f"table inet {KEEPER_TABLE} {{\n\tchain conntrack {{\n"
          "\t\ttype filter hook prerouting priority filter; policy accept;\n"
          "\t\tct state untracked accept\n\t}\n}\n")


def _nft(text: str) -> tuple[int, str]:
    """(exit status, stderr) of `nft -f -` on `text`, through the kernel seam."""
    try:
        proc = kernel.current().nft(text)
    except ApplyError as exc:  # the binary is missing
        return 127, str(exc)
    return proc.returncode, proc.stderr


def _have_nft() -> bool:
    return kernel.current().which("nft") is not None


DRAIN_TABLES = (("ip", DRAIN_TABLE), ("ip6", DRAIN_TABLE))
KEEPER_TABLES = (("inet", KEEPER_TABLE),)
NOTRACK_TABLE = f"{SHAPES['filter_name']}_notrack"
NOTRACK_TABLES = (("inet", NOTRACK_TABLE),)
NFTA_TABLE_USERDATA = 6


def notrack_text(links: list[int], patterns: tuple[str, ...], families: tuple[int, ...]) -> str:
    """The fast path's table (rules/ebpf.yaml `notrack`): `links` the ifindexes the tc
    programs are attached to, `patterns` egress-masquerade-interfaces (empty: every link
    but lo), `families` those masqueraded. A flow entering an attached link bound for a
    link no pattern matches is a reply the ingress program translated back (or traffic
    none masquerades): untracked too, so both directions of a flow agree."""
    body = ["\tset links {\n\t\ttype iface_index\n"
            + (f"\t\telements = {{ {', '.join(map(str, sorted(links)))} }}\n" if links else "") + "\t}"]
    pre = ["type filter hook prerouting priority raw; policy accept;"]
    if tuple(families) != (4, 6):
        pre += [f"meta nfproto {'ipv6' if fam == 6 else 'ipv4'} return" for fam in (4, 6) if fam not in families]
    pre += ["meta l4proto { tcp, udp } goto forwarded", "icmp type { echo-request, echo-reply } goto forwarded",
            "icmpv6 type { echo-request, echo-reply } goto forwarded"]
    flow = ["fib daddr type local return", "fib daddr oif @links notrack"]
    chains = [("prerouting", pre), ("forwarded", flow)]
    if patterns:
        flow.append("iif @links goto entered")
        chains.append(("entered", [f'fib daddr oifname "{p[:-1] + "*" if p.endswith("+") else p}" return'
                                 for p in patterns] + ["notrack"]))
    for name, rules in chains:
        body.append(f"\tchain {name} {{\n" + "".join(f"\t\t{r}\n" for r in rules) + "\t}")
    digest = hashlib.sha256("\n".join(body).encode()).hexdigest()[:32]
    return (f"table inet {NOTRACK_TABLE} {{\n\tcomment \"ipmasq-legacy {digest}\"\n" + "\n".join(body) + "\n}\n")


def notrack_digest(text: str) -> bytes:
    return text.split("ipmasq-legacy ", 1)[1].split('"', 1)[0].encode()


def notrack_in_sync(text: str) -> bool:
    """Whether our notrack table is there as `text` writes it (its comment, over netlink)."""
    if not _have_nft():
        return False
    try:
        found = netlink.nft_tables(NOTRACK_TABLES)
    except OSError:
        return False
    attrs = found.get(("inet", NOTRACK_TABLE))
    return attrs is not None and notrack_digest(text) in attrs.get(NFTA_TABLE_USERDATA, b"")


def write_notrack(text: str) -> tuple[int, str]:
    """Replace the table in one transaction (old or new, never none in between)."""
    if not _have_nft():
        return 127, "nft: command not found"
    return _nft(f"add table inet {NOTRACK_TABLE}\ndelete table inet {NOTRACK_TABLE}\n" + text)


def nft_tables(wanted=DRAIN_TABLES + KEEPER_TABLES + NOTRACK_TABLES) -> set[tuple[str, str]]:
    """Which of the tables `wanted` exist (none when nft is missing or nf_tables cannot
    be asked, as `nft list tables` failing said before)."""
    if not _have_nft():
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
    if not _have_nft():
        return False
    return _nft(f"add table inet {KEEPER_TABLE}\ndelete table inet {KEEPER_TABLE}\n" + KEEPER)[0] == 0


def add_drain_tables() -> bool:
    if not _have_nft():
        return False
    text = ""
    for fam in ("ip", "ip6"):
        text += (f"table {fam} {DRAIN_TABLE} {{\n\tchain postrouting {{\n"
                 "\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t}\n}\n")
    return _nft(text)[0] == 0


def notrack_present(tables: set | None = None) -> bool:
    tables = nft_tables(NOTRACK_TABLES) if tables is None else tables
    return ("inet", NOTRACK_TABLE) in tables


def delete_tables(drain: bool = True, keeper: bool = True, notrack: bool = True) -> list[str]:
    tables = nft_tables()
    text = ""
    gone = []
    if notrack and notrack_present(tables):  # first: from here on conntrack sees every flow
        text += f"delete table inet {NOTRACK_TABLE}\n"
        gone.append(f"inet {NOTRACK_TABLE}")
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
