"""Netlink, spelled out with struct: the few cheap requests the agent makes on its hot
paths (nf_tables' generation, whether a table exists, links, addresses and tc filters).

pyroute2 is the project's netlink library and does everything else; importing it costs
0.12 s, more than a no-op reconcile may spend in all, so these requests do without it.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

NETLINK_ROUTE, NETLINK_NETFILTER = 0, 12
NFNL_SUBSYS_NFTABLES = 10
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG = struct.Struct("=IHHII")


def nla(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + bytes(-len(value) % 4)


def attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """Netlink attributes from `offset` on: type (flags masked off) -> payload."""
    out = {}
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def text(raw: bytes | None) -> str | None:
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw is not None else None


class Netlink:
    """One netlink socket; request() sends one message and returns its answer."""

    def __init__(self, protocol: int):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        self.sock.settimeout(2.0)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, msg_type: int, body: bytes, dump: bool = False) -> list[tuple[int, bytes]]:
        """[(type, payload after the netlink header)]: every message of a dump, or the one
        answer to a request; an error answer raises OSError with its errno."""
        self.seq += 1
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
        self.sock.send(NLMSG.pack(NLMSG.size + len(body), msg_type, flags, self.seq, 0) + body)
        out: list = []
        while True:
            data = self.sock.recv(1 << 16)  # a dump's messages come at most 32 KiB at a time
            offset = 0
            while offset + NLMSG.size <= len(data):
                length, kind, _flags, seq, _pid = NLMSG.unpack_from(data, offset)
                if length < NLMSG.size:
                    raise OSError(errno.EPROTO, "malformed netlink message")
                payload = data[offset + NLMSG.size:offset + length]
                offset += (length + 3) & ~3
                if seq != self.seq:
                    continue
                if kind in (NLMSG_ERROR, NLMSG_DONE):
                    code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if code > 0:
                        raise OSError(code, os.strerror(code))
                    return out
                out.append((kind, payload))
                if not dump:
                    return out


# ---------------------------------------------------------------- nf_tables

NFPROTO = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}
NFT_MSG_GETTABLE, NFT_MSG_GETGEN = (NFNL_SUBSYS_NFTABLES << 8) | 1, (NFNL_SUBSYS_NFTABLES << 8) | 16
NFTA_TABLE_NAME, NFTA_GEN_ID = 1, 1


def _nfgenmsg(family: int) -> bytes:
    return struct.pack("=BBH", family, 0, 0)


def nft_generation() -> int | None:
    """nf_tables' ruleset generation in this network namespace (every commit moves it);
    None when nf_tables cannot be asked."""
    try:
        with Netlink(NETLINK_NETFILTER) as nl:
            replies = nl.request(NFT_MSG_GETGEN, _nfgenmsg(socket.AF_UNSPEC))
    except OSError:
        return None
    raw = attrs(replies[0][1], 4).get(NFTA_GEN_ID) if replies else None
    return struct.unpack("!I", raw[:4])[0] if raw is not None and len(raw) >= 4 else None


def nft_tables(wanted) -> dict[tuple[str, str], dict[int, bytes] | None]:
    """Each (family, name) of `wanted` -> the attributes of that nf_tables table (handle,
    flags, chain count), or None where there is no such table: one NFT_MSG_GETTABLE
    request per table, answered by that table alone. (`nft list tables` fetches the
    whole ruleset, every set element included: 0.7 s beside a 100,000-element set.)
    OSError when nf_tables cannot be asked at all."""
    out: dict = {}
    with Netlink(NETLINK_NETFILTER) as nl:
        for family, name in wanted:
            body = _nfgenmsg(NFPROTO[family]) + nla(NFTA_TABLE_NAME, name.encode() + b"\0")
            try:
                replies = nl.request(NFT_MSG_GETTABLE, body)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                out[(family, name)] = None
                continue
            out[(family, name)] = attrs(replies[0][1], 4) if replies else None
    return out


def nft_table_names() -> list[tuple[str, str]]:
    """(family, name) of every nf_tables table: one dump of the tables alone (their sets'
    elements are not fetched, as `nft list ruleset` would fetch them)."""
    names = {v: k for k, v in NFPROTO.items()}
    out = []
    with Netlink(NETLINK_NETFILTER) as nl:
        for _kind, msg in nl.request(NFT_MSG_GETTABLE, _nfgenmsg(socket.AF_UNSPEC), dump=True):
            name = text(attrs(msg, 4).get(NFTA_TABLE_NAME))
            if name is not None:
                out.append((names.get(msg[0], str(msg[0])), name))
    return out


NFT_MSG_GETRULE = (NFNL_SUBSYS_NFTABLES << 8) | 7
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_EXPRESSIONS = 1, 2, 3, 4
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2


def nested(data: bytes) -> list[bytes]:
    """The payloads of a nested attribute list, in order (NFTA_LIST_ELEM repeated)."""
    out, offset = [], 0
    while offset + 4 <= len(data):
        length = struct.unpack_from("=H", data, offset)[0]
        if length < 4:
            break
        out.append(data[offset + 4:offset + length])
        offset += (length + 3) & ~3
    return out


def nft_rules(family: str, table: str, chain: str) -> list[list[tuple[str, dict[int, bytes]]]] | None:
    """The rules of one nf_tables chain, in order, each as its expressions [(name, the
    expression's attributes)]: one NFT_MSG_GETRULE dump scoped to the table and chain.
    Rules reference sets by name only: no set's elements are fetched (`nft list chain`
    fetches every element of every set in the table first: 0.6-1 s and 130 MB beside a
    100,000-element set). None when there is no such table or chain; OSError when
    nf_tables cannot be asked."""
    want_table, want_chain = table.encode(), chain.encode()
    body = (_nfgenmsg(NFPROTO[family]) + nla(NFTA_RULE_TABLE, want_table + b"\0")
            + nla(NFTA_RULE_CHAIN, want_chain + b"\0"))
    try:
        with Netlink(NETLINK_NETFILTER) as nl:
            replies = nl.request(NFT_MSG_GETRULE, body, dump=True)
            if not replies and not _chain_exists(nl, family, table, chain):
                return None
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    rules = []
    for _kind, msg in replies:
        rule = attrs(msg, 4)
        # an older kernel may ignore the dump's filter: keep only this table's chain
        if text(rule.get(NFTA_RULE_TABLE)) != table or text(rule.get(NFTA_RULE_CHAIN)) != chain:
            continue
        exprs = []
        for elem in nested(rule.get(NFTA_RULE_EXPRESSIONS, b"")):
            expr = attrs(elem)
            exprs.append((text(expr.get(NFTA_EXPR_NAME)) or "", attrs(expr.get(NFTA_EXPR_DATA, b""))))
        rules.append(exprs)
    return rules


NFT_MSG_GETCHAIN = (NFNL_SUBSYS_NFTABLES << 8) | 4
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3


def _chain_exists(nl: Netlink, family: str, table: str, chain: str) -> bool:
    body = (_nfgenmsg(NFPROTO[family]) + nla(NFTA_CHAIN_TABLE, table.encode() + b"\0")
            + nla(NFTA_CHAIN_NAME, chain.encode() + b"\0"))
    try:
        return bool(nl.request(NFT_MSG_GETCHAIN, body))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
