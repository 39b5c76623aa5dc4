"""Three small nft tables of our own (nothing else of netfilter is touched):

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

Shapes: rules/ebpf.yaml `nft_tables`. Asked for by name over ..netlink (one
NFT_MSG_GETTABLE each), written with `nft -f -` (kernel.current().nft).
"""

from __future__ import annotations

import hashlib

from ... import kernel
from ...errors import ApplyError
from .names import SHAPES

# The tables' shapes: rules/ebpf.yaml `nft_tables`. {name} placeholders are filled by
# str.replace, as nft's own braces ({ tcp, udp }) are literal.
TABLES = SHAPES["nft_tables"]
KEEPER_SPEC, DRAIN_SPEC, NOTRACK_SPEC = TABLES["keeper"], TABLES["drain"], TABLES["notrack"]
KEEPER_TABLE = KEEPER_SPEC["table"]
DRAIN_TABLE = DRAIN_SPEC["table"]
NOTRACK_TABLE = NOTRACK_SPEC["table"]
ENTERED = "entered"  # notrack's chain (and the rule jumping to it) only with patterns
NFPROTO = {4: "ipv4", 6: "ipv6"}


def _fill(line: str, **values: str) -> str:
    for key, value in values.items():
        line = line.replace(f"{{{key}}}", value)
    return line


def _block(kind: str, name: str, lines: list[str]) -> str:
    """A set or a chain, indented as `nft list table` prints it."""
    return f"\t{kind} {name} {{\n" + "".join(f"\t\t{line}\n" for line in lines) + "\t}"


def _table(family: str, name: str, body: list[str], comment: str | None = None) -> str:
    return (f"table {family} {name} {{\n" + (f'\tcomment "{comment}"\n' if comment else "")
            + "\n".join(body) + "\n}\n")


def _chains(spec: dict) -> list[str]:
    return [_block("chain", name, lines) for name, lines in spec["chains"].items()]


KEEPER = _table(KEEPER_SPEC["family"], KEEPER_TABLE, _chains(KEEPER_SPEC))
DRAIN = "".join(_table(family, DRAIN_TABLE, _chains(DRAIN_SPEC)) for family in DRAIN_SPEC["families"])


def _nft(text: str) -> tuple[int, str]:
    """(exit status, stderr) of `nft -f -` on `text`, through the kernel seam."""
    try:
        proc = kernel.current().nft(text)
    except ApplyError as exc:  # the binary is missing
        return 127, str(exc)
    return proc.returncode, proc.stderr


def _replacing(table: tuple[str, str], text: str) -> str:
    """`text` (the table) replacing the table of that name in one transaction: old or
    new, never none in between (`add` first, so that `delete` finds one)."""
    family, name = table
    return f"add table {family} {name}\ndelete table {family} {name}\n" + text


def _have_nft() -> bool:
    return kernel.current().which("nft") is not None


DRAIN_TABLES = tuple((family, DRAIN_TABLE) for family in DRAIN_SPEC["families"])
KEEPER_TABLES = ((KEEPER_SPEC["family"], KEEPER_TABLE),)
NOTRACK_TABLES = ((NOTRACK_SPEC["family"], NOTRACK_TABLE),)
NFTA_TABLE_USERDATA = 6


def notrack_text(links: list[int], patterns: tuple[str, ...], families: tuple[int, ...]) -> str:
    """The fast path's table (rules/ebpf.yaml `nft_tables.notrack`): `links` the ifindexes the tc
    programs are attached to, `patterns` egress-masquerade-interfaces (empty: every link
    but lo), `families` those masqueraded. A flow entering an attached link bound for a
    link no pattern matches is a reply the ingress program translated back (or traffic
    none masquerades): untracked too, so both directions of a flow agree."""
    spec = NOTRACK_SPEC
    elements = [_fill(spec["set"]["elements"], links=", ".join(map(str, sorted(links))))] if links else []
    body = [_block("set", spec["set"]["name"], [f"type {spec['set']['type']}", *elements])]
    for name, lines in spec["chains"].items():
        if name == ENTERED and not patterns:
            continue
        rules: list[str] = []
        for line in lines:
            if "{nfproto}" in line:  # once per family not masqueraded
                rules += [_fill(line, nfproto=NFPROTO[fam]) for fam in (4, 6) if fam not in families]
            elif "{pattern}" in line:  # once per pattern, eth+ as nft's eth*
                rules += [_fill(line, pattern=p[:-1] + "*" if p.endswith("+") else p) for p in patterns]
            elif patterns or f"goto {ENTERED}" not in line:
                rules.append(line)
        body.append(_block("chain", name, rules))
    digest = hashlib.sha256("\n".join(body).encode()).hexdigest()[:32]
    return _table(spec["family"], NOTRACK_TABLE, body, _fill(spec["comment"], digest=digest))


def notrack_digest(text: str) -> bytes:
    """The digest in the comment of a table notrack_text wrote."""
    before, after = NOTRACK_SPEC["comment"].split("{digest}")
    return text.split(f'comment "{before}', 1)[1].split(f'{after}"', 1)[0].encode()


def notrack_in_sync(text: str) -> bool:
    """Whether our notrack table is there as `text` writes it (its comment, over netlink)."""
    if not _have_nft():
        return False
    try:
        found = kernel.current().nft_tables(NOTRACK_TABLES)
    except OSError:
        return False
    attrs = found.get(NOTRACK_TABLES[0])
    return attrs is not None and notrack_digest(text) in attrs.get(NFTA_TABLE_USERDATA, b"")


def write_notrack(text: str) -> tuple[int, str]:
    """Replace the table in one transaction (old or new, never none in between)."""
    if not _have_nft():
        return 127, "nft: command not found"
    return _nft(_replacing(NOTRACK_TABLES[0], text))


def nft_tables(wanted=DRAIN_TABLES + KEEPER_TABLES + NOTRACK_TABLES) -> set[tuple[str, str]]:
    """Which of the tables `wanted` exist (none when nft is missing or nf_tables cannot
    be asked, as `nft list tables` failing said before)."""
    if not _have_nft():
        return set()
    try:
        found = kernel.current().nft_tables(wanted)
    except OSError:
        return set()
    return {table for table, attrs in found.items() if attrs is not None}


def drain_tables_present(tables: set | None = None) -> list[str]:
    tables = nft_tables(DRAIN_TABLES) if tables is None else tables
    return [fam for fam, name in DRAIN_TABLES if (fam, name) in tables]


def keeper_present(tables: set | None = None) -> bool:
    tables = nft_tables(KEEPER_TABLES) if tables is None else tables
    return KEEPER_TABLES[0] in tables


def add_keeper() -> bool:
    if not _have_nft():
        return False
    return _nft(_replacing(KEEPER_TABLES[0], KEEPER))[0] == 0


def add_drain_tables() -> bool:
    if not _have_nft():
        return False
    return _nft(DRAIN)[0] == 0


def notrack_present(tables: set | None = None) -> bool:
    tables = nft_tables(NOTRACK_TABLES) if tables is None else tables
    return NOTRACK_TABLES[0] in tables


def delete_tables(drain: bool = True, keeper: bool = True, notrack: bool = True) -> list[str]:
    tables = nft_tables()
    gone = []
    if notrack and notrack_present(tables):  # first: from here on conntrack sees every flow
        gone.append(NOTRACK_TABLES[0])
    if drain:
        gone += [(fam, DRAIN_TABLE) for fam in drain_tables_present(tables)]
    if keeper and keeper_present(tables):
        gone.append(KEEPER_TABLES[0])
    if gone:
        _nft("".join(f"delete table {fam} {name}\n" for fam, name in gone))
    return [f"{fam} {name}" for fam, name in gone]
