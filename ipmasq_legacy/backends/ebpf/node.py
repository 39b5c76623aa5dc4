"""What the datapath knows of the node, kept current: the node's addresses, each matched
link's address and type, and the flows translated to an address a link no longer has.

Written by every apply, and on its own (EbpfBackend.follow) when `watch` sees a link or
an address come or go: no generation of the decision is written then, the config is
the same.
"""

from __future__ import annotations

import ipaddress
import struct

from ...bpf import loader
from .layout import N_FOREIGN, NAT_KEY, NAT_VAL
from .links import IFACE, Link

FAMILY_ADDR = {4: "addr4", 6: "addr6"}


def write_locals(pinned, wanted: dict[int, list[bytes]]) -> int:
    """`ipmq_local4/6` made to hold exactly the node's addresses. Returns the writes."""
    writes = 0
    for family, name in ((4, "ipmq_local4"), (6, "ipmq_local6")):
        want = set(wanted[family])
        have = set(pinned.keys(name))
        for addr in want - have:
            pinned.update(name, addr, b"\x01")
        for addr in have - want:
            pinned.delete(name, addr)
        writes += len(want ^ have)
    return writes


def old_address(value: bytes | None, family: int) -> str | None:
    """The address an `ipmq_ifaces` entry translates to, for one family."""
    if value is None:
        return None
    a4, a6, flags, _l2len = IFACE.unpack(value)
    if not flags & (0x01 if family == 4 else 0x02):
        return None
    return str(ipaddress.ip_address(a4 if family == 4 else a6))


def _packed16(addr: str) -> bytes:
    ip = ipaddress.ip_address(addr)
    return ip.packed if ip.version == 6 else bytes(12) + ip.packed


def repoint_flows(pinned, targets: dict[tuple[int, int], str], local: set[bytes]) -> tuple[int, int]:
    """Flows translated to an address that is no longer the node's, on a link that has
    a new one ({(ifindex, family): new address}), moved to it, as netfilter's masquerade
    forgets such connections and translates their next packet anew: the reply tuple is
    claimed on the new address with the same port (BPF_NOEXIST, as the datapath claims);
    where that port is taken there, the flow is forgotten and its next packet starts it
    anew. Returns (moved, forgotten)."""
    if not targets:
        return 0, 0
    want = {(index, 4 if family == 4 else 6): _packed16(new) for (index, family), new in targets.items()}
    done = forgotten = 0
    for key, value in pinned.items("ipmq_nat_fwd"):
        addr, port, flags, ifindex, seen = NAT_VAL.unpack(value)
        saddr, daddr, sport, dport, proto, family = NAT_KEY.unpack(key)
        new = want.get((ifindex, family))
        if new is None or addr == new or flags & N_FOREIGN or _local_key(addr, family) in local:
            continue
        icmp = proto in (1, 58)
        old_rev = NAT_KEY.pack(daddr, addr, port if icmp else dport, port, proto, family)
        new_rev = NAT_KEY.pack(daddr, new, port if icmp else dport, port, proto, family)
        rev_value = pinned.lookup("ipmq_nat_rev", old_rev) or NAT_VAL.pack(saddr, sport, 0, ifindex, seen)
        try:
            pinned.update("ipmq_nat_rev", new_rev, rev_value, loader.NOEXIST)
        except loader.BpfError:
            pinned.delete("ipmq_nat_fwd", key)
            forgotten += 1
        else:
            pinned.update("ipmq_nat_fwd", key, NAT_VAL.pack(new, port, flags, ifindex, seen))
            done += 1
        pinned.delete("ipmq_nat_rev", old_rev)
    return done, forgotten


def _local_key(addr16: bytes, family: int) -> bytes:
    """An address as `ipmq_local4/6` holds it (4 bytes for IPv4)."""
    return addr16[12:] if family == 4 else addr16


def changed_addresses(ifaces: dict[int, bytes], matched: dict[int, Link]) -> dict[tuple[int, int], str]:
    """{(ifindex, family): address} for matched links whose address is not the one their
    entry holds (a new link, a new address, an address back after none); a link that
    lost its address keeps its flows: no reply can come back to a pod through another."""
    out = {}
    for index, link in matched.items():
        for family, attr in FAMILY_ADDR.items():
            new = getattr(link, attr)
            if new and old_address(ifaces.get(index), family) != new:
                out[(index, family)] = new
    return out


def write_ifaces(pinned, matched: dict[int, Link], attached: dict) -> None:
    """Each matched link's entry: its addresses and header length, with IF_ATTACHED where
    our egress program is on it already (ipmq_nf leaves those links to the tc programs)."""
    for index, link in matched.items():
        on = bool(attached.get(index, {}).get("egress"))
        pinned.update("ipmq_ifaces", struct.pack("=I", index), link.iface_value(attached=on))
