"""conntrack: the connections it knows, read with `conntrack -L` (to seed the datapath's
maps with flows already under way), and entries of our flows deleted through pyroute2
(a handover to netfilter)."""

from __future__ import annotations

import socket
import struct
import time
from typing import TYPE_CHECKING

from ... import kernel
from ...bpf import loader
from .encode import addr16, addr_text
from .layout import N_FOREIGN, NAT_KEY, NAT_VAL

if TYPE_CHECKING:
    from .maps import Pinned


def netfilter_snat_tuples() -> list[tuple[int, int, bytes, bytes, int, int]]:
    """Reply tuples of the connections conntrack source-NATs."""
    return conntrack_tuples(["--src-nat"], reply=True)


def conntrack_tuples(filters: list[str], reply: bool) -> list[tuple[int, int, bytes, bytes, int, int]]:
    """(family, proto, src, dst, sport, dport) of conntrack's entries (`conntrack -L` with
    `filters`), the original or the reply tuple, ports (ICMP: the echo id) in host order."""
    if kernel.current().which("conntrack") is None:
        return []
    out = []
    which = 1 if reply else 0
    for fam, family in (("ipv4", 4), ("ipv6", 6)):
        proc = kernel.current().exec(["conntrack", "-L", "-f", fam, *filters])
        for line in proc.stdout.splitlines():
            words = line.split()
            if len(words) < 6 or not words[1].isdigit():
                continue
            proto = int(words[1])
            found: dict[str, list[str]] = {"src": [], "dst": [], "sport": [], "dport": [], "id": []}
            for word in words[2:]:
                key, sep, value = word.partition("=")
                if sep and key in found:
                    found[key].append(value)
            if len(found["src"]) < 2 or len(found["dst"]) < 2:
                continue
            ports = found["id"] * 2 if proto in (socket.IPPROTO_ICMP, 58) else None
            if ports is None:
                if len(found["sport"]) < 2:
                    sport = dport = 0  # a protocol without ports
                else:
                    sport, dport = int(found["sport"][which]), int(found["dport"][which])
            else:
                sport = dport = int(found["id"][min(which, len(found["id"]) - 1)]) if found["id"] else 0
            try:
                out.append((family, proto, addr16(found["src"][which]), addr16(found["dst"][which]), sport, dport))
            except ValueError:
                continue
    return out


def forget_conntrack(flows) -> int:
    """Delete conntrack's entries of flows we translated (original tuples), so that a
    netfilter backend sees their next packet as new and masquerades it, instead of
    taking them for established connections without NAT (our conntrack keeper made
    conntrack track them untranslated). Returns how many went. Through the kernel
    seam (kernel.conntrack_forget: delete_conntrack below on a node)."""
    flows = list(flows)
    return kernel.current().conntrack_forget(flows) if flows else 0


def delete_conntrack(flows) -> int:
    """forget_conntrack on the node: one pyroute2 Conntrack socket per family."""
    try:
        from pyroute2 import Conntrack  # type: ignore[import-untyped]
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple  # type: ignore[import-untyped]
    except ImportError:
        return 0
    flows = list(flows)
    if not flows:
        return 0
    gone = 0
    sockets = {}
    try:
        for family, proto, src, dst, sport, dport in flows:
            af = socket.AF_INET if family == 4 else socket.AF_INET6
            if af not in sockets:
                sockets[af] = Conntrack(nfgen_family=af)
            kw = {"family": af, "saddr": addr_text(src, family), "daddr": addr_text(dst, family), "proto": proto}
            if proto in (socket.IPPROTO_ICMP, 58):
                kw.update(icmp_id=sport, icmp_type=8 if family == 4 else 128, icmp_code=0)
            else:
                kw.update(sport=sport, dport=dport)
            try:
                sockets[af].entry("del", tuple_orig=NFCTAttrTuple(**kw))
                gone += 1
            except Exception:
                continue
    finally:
        for sock in sockets.values():
            sock.close()
    return gone


def seed_pass(pinned: Pinned) -> None:
    """Flows conntrack already knows (UDP and other handshake-less protocols), as
    seen entering: their replies are replies, not new flows."""
    for family, proto, src, dst, sport, dport in conntrack_tuples(["-p", "udp"], reply=False):
        key = NAT_KEY.pack(src, dst, struct.pack("!H", sport), struct.pack("!H", dport), proto, family)
        try:
            pinned.update("ipmq_pass", key, b"\x01", loader.NOEXIST)
        except loader.BpfError:
            pass


def seed_foreign(pinned: Pinned) -> None:
    """Reply tuples of connections netfilter translated: never handed out by us."""
    for family, proto, src, dst, sport, dport in netfilter_snat_tuples():
        key = NAT_KEY.pack(src, dst, struct.pack("!H", sport), struct.pack("!H", dport), proto, family)
        value = NAT_VAL.pack(bytes(16), b"\0\0", N_FOREIGN, 0, time.monotonic_ns())
        try:
            pinned.update("ipmq_nat_rev", key, value, loader.NOEXIST)
        except loader.BpfError:
            pass
