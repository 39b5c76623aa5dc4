"""The exempt sets' elements written over netlink: one nf_tables batch of
NFT_MSG_DELSETELEM / NFT_MSG_NEWSETELEM messages, no nft in between.

Why not `nft add element`: nft 1.0.6 first reads every element of every interval set of
the table back from the kernel (measured in a bed with two 100,000-prefix sets: 1.0 s for
`add element` of one prefix to a third, empty set; the dump is most of it). Here a
one-prefix patch is one small batch (a few ms), and a whole set's 100,000 prefixes go in
one batch of about 4.8 MB.

An interval set (flags interval, a plain address key: the rbtree backend) holds a prefix
as two elements, as nft writes them (`nft --debug=netlink add element`): its first
address, and the address after its last one flagged NFT_SET_ELEM_INTERVAL_END; a prefix
reaching the top of the address space has no end element, and its start carries nft's
"open interval" element user data, so that `nft list` prints it as the prefix it is. nft
also writes an end element at address 0 into a set it fills; it is no part of any prefix
(no lookup finds an element at or below a key where there is none) and these sets never
hold it, so a patch never has to care for it.

A batch may carry the generation it was computed against (NFNL_BATCH_GENID): the kernel
then refuses it (ERESTART) when anything committed since, which is how a record of the
sets' contents is verified at no cost: it was true at the generation recorded.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from .. import netlink, prefixes

NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM = (netlink.NFNL_SUBSYS_NFTABLES << 8) | 12
NFT_MSG_DELSETELEM = (netlink.NFNL_SUBSYS_NFTABLES << 8) | 14
NLM_F_ACK, NLM_F_CREATE = 0x4, 0x400
NFNL_BATCH_GENID = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_USERDATA = 1, 3, 6
NFTA_DATA_VALUE = 1
NFT_SET_ELEM_INTERVAL_END = 1
NLA_F_NESTED = 0x8000
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
FAMILY = {4: netlink.NFPROTO["ip"], 6: netlink.NFPROTO["ip6"]}
BITS = {4: 32, 6: 128}
MAX_NESTED = 60_000  # an attribute's length is 16 bits: elements per message stay under it

# One element's attributes, by kind: (start, end, open start); the key's bytes follow each
# header. nla() pads, and every piece here is 4-aligned already, so they are plain concatenations.
_OPEN = netlink.nla(NFTA_SET_ELEM_USERDATA, b"\x01\x04\x01\x00\x00\x00")  # NFTNL_UDATA_SET_ELEM_FLAGS: open
_END_FLAGS = netlink.nla(NFTA_SET_ELEM_FLAGS, struct.pack("!I", NFT_SET_ELEM_INTERVAL_END))


def _element_heads(family: int) -> tuple[bytes, bytes, bytes]:
    size = BITS[family] // 8
    key = struct.pack("=HH", 4 + 4 + size, NFTA_SET_ELEM_KEY | NLA_F_NESTED) + struct.pack(
        "=HH", 4 + size, NFTA_DATA_VALUE)
    start = struct.pack("=HH", 4 + len(key) + size, NFTA_LIST_ELEM | NLA_F_NESTED) + key
    end = struct.pack("=HH", 4 + len(key) + size + len(_END_FLAGS), NFTA_LIST_ELEM | NLA_F_NESTED) + key
    opened = struct.pack("=HH", 4 + len(key) + size + len(_OPEN), NFTA_LIST_ELEM | NLA_F_NESTED) + key
    return start, end, opened


_HEADS = {f: _element_heads(f) for f in BITS}


_LAST: list = []  # [members, family, elements]: a whole list is written into both slots


def elements(family: int, members) -> list[bytes]:
    """The set elements of prefixes ("10.0.0.0/8", ...; already checked by the plan), each
    as the bytes of one NFTA_LIST_ELEM attribute. The same list object twice in a row (a
    new install fills both slots with it) is encoded once."""
    if _LAST and _LAST[0] is members and _LAST[1] == family:
        return _LAST[2]
    out = _encode(family, members)
    if len(out) > 1000:
        _LAST[:] = [members, family, out]
    return out


def _encode(family: int, members) -> list[bytes]:
    start, end, opened = _HEADS[family]
    bits, size = BITS[family], BITS[family] // 8
    top = 1 << bits
    out = []
    for text in members:
        p = prefixes.parse(text)
        if p.version != family:
            raise ValueError(f"{text} is not an IPv{family} prefix")
        value = p.value
        after = value + (1 << (bits - p.length))
        if after == top:
            out.append(opened + value.to_bytes(size, "big") + _OPEN)
        else:
            out.append(start + value.to_bytes(size, "big"))
            out.append(end + after.to_bytes(size, "big") + _END_FLAGS)
    return out


def _message(kind: int, flags: int, seq: int, family: int, body: bytes) -> bytes:
    payload = struct.pack("=BBH", FAMILY[family], 0, 0) + body
    return netlink.NLMSG.pack(netlink.NLMSG.size + len(payload), kind, netlink.NLM_F_REQUEST | flags, seq, 0) + payload


def _list_head(table: str, name: str) -> bytes:
    return netlink.nla(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0") + netlink.nla(
        NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")


def patch(family: int, table: str, name: str, add=(), delete=(), flush: bool = False,
          genid: int | None = None) -> None:
    """One transaction on set `name` of `table` (family 4: ip, 6: ip6): all of it
    flushed (when `flush`), the prefixes `delete` removed, the prefixes `add` added; with
    `genid`, only if nf_tables' generation is still that one. OSError (errno from the
    kernel: ERESTART when the generation moved, ENOENT, EEXIST, ...) when it did not commit."""
    head = _list_head(table, name)
    messages: list[tuple[int, list[bytes]]] = []
    if flush:
        messages.append((NFT_MSG_DELSETELEM, []))
    for kind, items in ((NFT_MSG_DELSETELEM, elements(family, delete)), (NFT_MSG_NEWSETELEM, elements(family, add))):
        chunk: list[bytes] = []
        size = 0
        for item in items:
            if size + len(item) > MAX_NESTED:
                messages.append((kind, chunk))
                chunk, size = [], 0
            chunk.append(item)
            size += len(item)
        if chunk:
            messages.append((kind, chunk))
    if not messages:
        return
    seq = int.from_bytes(os.urandom(3), "big") << 8
    begin_body = netlink.nla(NFNL_BATCH_GENID, struct.pack("!I", genid)) if genid is not None else b""
    begin = netlink.NLMSG.pack(netlink.NLMSG.size + 4 + len(begin_body), NFNL_MSG_BATCH_BEGIN,
                               netlink.NLM_F_REQUEST, seq, 0) + struct.pack(
        "=BBH", socket.AF_UNSPEC, 0, socket.htons(netlink.NFNL_SUBSYS_NFTABLES)) + begin_body
    parts = [begin]
    for i, (kind, chunk) in enumerate(messages, 1):
        body = head
        if chunk:
            body += struct.pack("=HH", 4 + sum(map(len, chunk)), NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED) + b"".join(chunk)
        flags = NLM_F_ACK | (NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0)
        parts.append(_message(kind, flags, seq + i, family, body))
    end_seq = seq + len(messages) + 1
    parts.append(netlink.NLMSG.pack(netlink.NLMSG.size + 4, NFNL_MSG_BATCH_END, netlink.NLM_F_REQUEST, end_seq, 0)
                 + struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(netlink.NFNL_SUBSYS_NFTABLES)))
    batch = b"".join(parts)
    _send(batch, seq, len(messages))


def _send(batch: bytes, seq: int, acks: int) -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, netlink.NETLINK_NETFILTER)
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # errors without a copy of a 60 KB request
        if len(batch) > 200_000:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(batch) + 65536)
        if acks > 64:
            # the kernel queues every message's ack before we read one: at the default
            # 208 KiB a 1,000,000-prefix fill (about 1,100 messages) failed with ENOBUFS
            # while 300,000 (about 330) fit: under 650 bytes an ack; 2 KiB each leaves room.
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, acks * 2048 + 65536)
        sock.settimeout(30.0)
        sock.send(batch)
        pending = set(range(seq, seq + acks + 1))  # the BEGIN's seq: only its error (ERESTART) comes
        pending.discard(seq)
        while pending:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + netlink.NLMSG.size <= len(data):
                length, kind, _flags, mseq, _pid = netlink.NLMSG.unpack_from(data, offset)
                if length < netlink.NLMSG.size:
                    raise OSError(errno.EPROTO, "malformed netlink message")
                payload = data[offset + netlink.NLMSG.size:offset + length]
                offset += (length + 3) & ~3
                if kind != netlink.NLMSG_ERROR:
                    continue
                code = -struct.unpack_from("=i", payload)[0]
                if code:
                    raise OSError(code, os.strerror(code))
                pending.discard(mseq - seq + seq)
    finally:
        sock.close()
