"""The node's links and addresses as the ebpf datapath needs them, read over netlink.

Spoken through ...netlink (importing pyroute2 alone costs 0.1 s, more than all of these
requests together). A link enslaved to a bridge or a bond is never egress: what leaves
it was bridged (or is the bond's own packet, already seen on the bond), so the
datapath is attached to the master, never to its ports.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import struct
from dataclasses import dataclass, field

from ... import kernel, netlink
from ...links import matches, selected

RTM_GETLINK, RTM_GETADDR = 18, 22
IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 10, 18, 1
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_SECONDARY, IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TENTATIVE = 0x01, 0x08, 0x20, 0x40
ARPHRD_L3 = {0xFFFE, 0xFFFF, 512, 519, 768, 769, 776, 778, 823}  # none, void, ppp, rawip, ipip, ip6tnl, sit, gre, ip6gre
# Masters whose ports carry the master's traffic, not routed egress of their own.
PORT_MASTERS = {"bridge", "bond", "team", "openvswitch"}

# Mirrors of masq.c's struct iface and its flags (its _Static_asserts pin the size).
IFACE = struct.Struct("=4s16sII")
IF_HAS4, IF_HAS6, IF_DRAIN, IF_ATTACHED = 0x01, 0x02, 0x04, 0x08


@dataclass
class Link:
    index: int
    name: str
    l2len: int
    addr4: str | None = None
    addr6: str | None = None
    addresses: list[str] = field(default_factory=list)
    kind: str | None = None  # IFLA_INFO_KIND: veth, bridge, ...
    master: int = 0  # ifindex of the master, 0 for none

    def iface_value(self, drain: bool = False, attached: bool = False) -> bytes:
        flags = ((IF_HAS4 if self.addr4 else 0) | (IF_HAS6 if self.addr6 else 0) | (IF_DRAIN if drain else 0)
                 | (IF_ATTACHED if attached else 0))
        a4 = ipaddress.ip_address(self.addr4).packed if self.addr4 else bytes(4)
        a6 = ipaddress.ip_address(self.addr6).packed if self.addr6 else bytes(16)
        return IFACE.pack(a4, a6, flags, self.l2len)


def dump_links(nl) -> list[tuple[int, int, str, str | None, int]]:
    """(index, link type, name, kind, master index) of every link."""
    out = []
    for _kind, msg in nl.request(RTM_GETLINK, bytes(16), dump=True):
        _family, ifi_type, index, _flags, _change = struct.unpack_from("=BxHiII", msg)
        attrs = netlink.attrs(msg, 16)
        info = netlink.attrs(attrs[IFLA_LINKINFO]) if IFLA_LINKINFO in attrs else {}
        master = struct.unpack("=I", attrs[IFLA_MASTER])[0] if len(attrs.get(IFLA_MASTER, b"")) == 4 else 0
        out.append((index, ifi_type, netlink.text(attrs.get(IFLA_IFNAME)) or "",
                    netlink.text(info.get(IFLA_INFO_KIND)), master))
    return out


def dump_addresses(nl) -> list[tuple[int, int, int, int, int, bytes, bytes]]:
    """(index, address family, prefix length, scope, flags, IFA_LOCAL, IFA_ADDRESS) of
    every address (b"" where an attribute is missing; flags from IFA_FLAGS when set)."""
    out = []
    for _kind, msg in nl.request(RTM_GETADDR, bytes(8), dump=True):
        af, plen, flags, scope, index = struct.unpack_from("=BBBBI", msg)
        attrs = netlink.attrs(msg, 8)
        if IFA_FLAGS in attrs:
            flags = struct.unpack("=I", attrs[IFA_FLAGS])[0] or flags
        out.append((index, af, plen, scope, flags, attrs.get(IFA_LOCAL, b""), attrs.get(IFA_ADDRESS, b"")))
    return out


def read_links(rt=None) -> dict[int, Link]:
    """Every link with its primary address per family (what MASQUERADE would pick: the
    first primary global IPv4 address; the first usable global IPv6 one). `rt`: an open
    kernel.current().rtnl(), else one of its own."""
    candidates: dict[int, dict[int, list]] = {}
    if rt is None:
        with kernel.current().rtnl() as own:
            return read_links(own)
    links = {index: Link(index, name, 0 if ifi_type in ARPHRD_L3 else 14, kind=kind, master=master)
             for index, ifi_type, name, kind, master in rt.links()}
    addresses = rt.addresses()
    for index, af, _plen, scope, flags, local, address in addresses:
        link = links.get(index)
        if link is None or af not in (socket.AF_INET, socket.AF_INET6):
            continue
        family = 4 if af == socket.AF_INET else 6
        raw = (local if family == 4 else None) or address
        if not raw:
            continue
        addr = socket.inet_ntop(af, raw)
        link.addresses.append(addr)
        candidates.setdefault(index, {4: [], 6: []})[family].append((scope, flags, addr))
    for index, by_family in candidates.items():
        link = links[index]
        v4 = [(s, a) for s, f, a in by_family[4] if not f & IFA_F_SECONDARY]
        link.addr4 = next((a for s, a in v4 if s == 0), next((a for s, a in v4 if s < 254), None))
        v6 = [a for s, f, a in by_family[6]
              if s == 0 and not f & (IFA_F_TENTATIVE | IFA_F_DADFAILED | IFA_F_DEPRECATED)]
        link.addr6 = v6[0] if v6 else None
    return links


def is_port(link: Link, links: dict[int, Link]) -> bool:
    """Enslaved to a bridge (or bond, team, OVS): its traffic is the master's."""
    master = links.get(link.master) if link.master else None
    return master is not None and master.kind in PORT_MASTERS


def matching_links(patterns, links: dict[int, Link]) -> dict[int, Link]:
    """The links the datapath belongs on: those the patterns select (links.selected),
    ports of a bridge or bond left out."""
    return {i: link for i, link in links.items() if selected(patterns, link.name) and not is_port(link, links)}


def with_snat(matched: dict[int, Link], plan) -> dict[int, Link]:
    """The matched links, each translating to the address egress-masquerade-addresses gives
    its name (the plan lists the most specific pattern first; the first match decides, as
    the netfilter backends' rule order does) instead of its primary one, whether or not
    the link holds it now: snat.py says why it never falls back."""
    out = {}
    for index, link in matched.items():
        for fp in plan.families:
            address = next((a for pattern, a in fp.snat if matches(pattern, link.name)), None)
            if address is not None:
                link = dataclasses.replace(link, **{"addr4" if fp.family == 4 else "addr6": address})
        out[index] = link
    return out
