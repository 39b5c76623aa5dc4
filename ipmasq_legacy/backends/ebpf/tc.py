"""tc: our direct-action bpf filters on the clsact hooks of the node's links, through
kernel.current().rtnl() (Rtnl here: read over ..netlink, written through pyroute2,
imported only to write)."""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, NamedTuple

from ... import kernel, netlink
from ...bpf import loader
from ...errors import ApplyError
from ...netlink import NETLINK_ROUTE
from .links import Link
from .names import FILTER, HOOKS, PARENT, SHAPES, filter_name

if TYPE_CHECKING:
    from .maps import Pinned

# ---------------------------------------------------------------- netlink, spelled out
#
# The reads (the nft tables we own; links, addresses, qdiscs and tc filters, for the
# fingerprint and for every apply) speak netlink through ..netlink: importing pyroute2
# alone costs 0.1 s, more than all of those requests together. pyroute2 does the
# writes (tc filters and qdiscs, conntrack).

RTM_GETQDISC, RTM_GETTFILTER = 38, 46
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_NAME, TCA_BPF_TAG, TCA_BPF_ID = 7, 10, 11
TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info


class Rtnl:
    """The node's rtnetlink as the datapath uses it (kernel.current().rtnl()): reads over
    ..netlink, one socket opened at the first; tc changes through pyroute2's IPRoute,
    imported (0.1 s) and opened at the first change. Errors of a change: pyroute2's
    NetlinkError."""

    def __init__(self) -> None:
        self._nl: netlink.Netlink | None = None
        self._ipr = None

    def _socket(self) -> netlink.Netlink:
        if self._nl is None:
            self._nl = netlink.Netlink(NETLINK_ROUTE)
        return self._nl

    def links(self) -> list[tuple[int, int, str, str | None, int]]:
        from .links import dump_links

        return dump_links(self._socket())

    def addresses(self) -> list[tuple[int, int, int, int, int, bytes, bytes]]:
        from .links import dump_addresses

        return dump_addresses(self._socket())

    def qdiscs(self) -> list[tuple[int, str | None, int, int]]:
        return dump_qdiscs(self._socket())

    def filters(self, index: int, hook: str) -> list[TcFilter]:
        return tc_filters(self._socket(), index, hook)

    def tc(self, *args, **kwargs):
        """pyroute2's IPRoute.tc (add/del clsact, add-filter, replace-filter, del-filter)."""
        if self._ipr is None:
            from pyroute2 import IPRoute  # type: ignore[import-untyped]

            self._ipr = IPRoute()
        return self._ipr.tc(*args, **kwargs)

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
        if self._ipr is not None:
            self._ipr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_ipr() -> Rtnl:
    return kernel.current().rtnl()


class TcFilter(NamedTuple):
    prio: int
    protocol: int
    handle: int
    kind: str | None
    name: str | None  # a bpf filter's name
    prog_id: int | None  # a bpf filter's program
    tag: str  # a bpf filter's program tag, hex ("" for others)

    @property
    def ours(self) -> bool:
        return self.kind == "bpf" and self.name is not None and self.name.startswith(FILTER + "/")


def tc_filters(nl, index: int, hook: str) -> list[TcFilter]:
    """The filters on one clsact hook of a link; none where the link has no clsact qdisc."""
    try:
        msgs = nl.request(RTM_GETTFILTER, TCMSG.pack(0, index, 0, PARENT[hook], 0), dump=True)
    except OSError:  # no clsact qdisc: nothing attached
        return []
    out = []
    for _kind, msg in msgs:
        _family, _index, handle, _parent, info = TCMSG.unpack_from(msg)
        attrs = netlink.attrs(msg, TCMSG.size)
        opts = netlink.attrs(attrs[TCA_OPTIONS]) if TCA_OPTIONS in attrs else {}
        prog_id = struct.unpack("=I", opts[TCA_BPF_ID])[0] if len(opts.get(TCA_BPF_ID, b"")) == 4 else None
        out.append(TcFilter(info >> 16, info & 0xFFFF, handle, netlink.text(attrs.get(TCA_KIND)),
                            netlink.text(opts.get(TCA_BPF_NAME)), prog_id, opts.get(TCA_BPF_TAG, b"").hex()))
    return out


def our_filters(index: int, nl=None) -> dict[str, list[TcFilter]]:
    """Our bpf filters on each hook of a link; `nl`: an Rtnl, or a bare ..netlink socket
    (engines.py asks with one)."""
    if nl is None:
        with kernel.current().rtnl() as own:
            return our_filters(index, own)
    if isinstance(nl, netlink.Netlink):
        return {hook: [f for f in tc_filters(nl, index, hook) if f.ours] for hook in HOOKS}
    return {hook: [f for f in nl.filters(index, hook) if f.ours] for hook in HOOKS}


def dump_qdiscs(nl) -> list[tuple[int, str | None, int, int]]:
    """(index, kind, handle, parent) of every qdisc."""
    out = []
    for _kind, msg in nl.request(RTM_GETQDISC, bytes(TCMSG.size), dump=True):
        _family, index, handle, parent, _info = TCMSG.unpack_from(msg)
        out.append((index, netlink.text(netlink.attrs(msg, TCMSG.size).get(TCA_KIND)), handle, parent))
    return out


def has_clsact(rt, index: int) -> bool:
    return any(i == index and kind == "clsact" for i, kind, _handle, _parent in rt.qdiscs())


def other_filters(rt, index: int) -> int:
    """Filters on the clsact hooks of a link that are not ours."""
    return sum(1 for hook in HOOKS for f in rt.filters(index, hook) if f.kind and not f.ours)


def attach(ipr, pinned: Pinned, link: Link, fds: dict[str, int], obj: loader.BpfObject,
            hooks=HOOKS) -> None:
    if not has_clsact(ipr, link.index):
        from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

        try:
            ipr.tc("add", "clsact", link.index)
            pinned.update("ipmq_owned", struct.pack("=I", link.index), struct.pack("=I", 1))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise ApplyError(f"ebpf: cannot add a clsact qdisc to {link.name}: {exc}") from None
    current = our_filters(link.index, ipr)
    for hook in hooks:
        want = filter_name(hook, obj.digest)
        ours = current[hook]
        if [(f.name, f.prog_id) for f in ours] == [(want, pinned.sys.prog_info(fds[hook])["id"])]:
            continue
        from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

        # replace in place (one netlink message: the old program or the new one, never none)
        cmd = "replace-filter" if any(f.prio == SHAPES["tc_priority"] for f in ours) else "add-filter"
        try:
            ipr.tc(cmd, "bpf", index=link.index, handle=SHAPES["tc_handle"], parent=PARENT[hook],
                   prio=SHAPES["tc_priority"], fd=fds[hook], name=want, direct_action=True,
                   protocol=0x0003)  # ETH_P_ALL
        except NetlinkError as exc:
            raise ApplyError(f"ebpf: cannot attach to {link.name} {hook}: {exc}") from None
        for f in ours:  # filters of ours at another priority (a changed rules/ebpf.yaml)
            if f.prio != SHAPES["tc_priority"]:
                del_filter(ipr, link.index, hook, f)


def del_filter(ipr, index: int, hook: str, f: TcFilter) -> None:
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

    try:
        ipr.tc("del-filter", "bpf", index=index, handle=f.handle, parent=PARENT[hook], prio=f.prio,
               protocol=0x0003)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            raise


def detach(ipr, pinned: Pinned | None, index: int) -> bool:
    """Our filters off one link, its interface entry gone, and the clsact qdisc too
    when we added it and nobody else uses it."""
    found = False
    current: dict[str, list[TcFilter]]
    try:
        current = our_filters(index, ipr)
    except OSError:
        current = {h: [] for h in HOOKS}
    for hook in HOOKS:
        for f in current[hook]:
            del_filter(ipr, index, hook, f)
            found = True
    key = struct.pack("=I", index)
    if pinned is not None:
        if pinned.open("ipmq_ifaces") is not None:
            pinned.delete("ipmq_ifaces", key)
        owned = pinned.open("ipmq_owned") is not None and pinned.lookup("ipmq_owned", key)
        if owned:
            try:
                if has_clsact(ipr, index) and other_filters(ipr, index) == 0:
                    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

                    try:
                        ipr.tc("del", "clsact", index)
                    except NetlinkError:
                        pass
            except OSError:
                pass
            pinned.delete("ipmq_owned", key)
    return found
