"""The node's links: which ones an interface list matches."""

from __future__ import annotations

RTM_GETLINK, IFLA_IFNAME, IFINFOMSG_SIZE = 18, 3, 16


def names() -> list[str]:
    """Every link's name, sorted: one rtnetlink dump (netlink.py; pyroute2's import alone
    costs 0.1 s)."""
    from . import netlink

    with netlink.Netlink(netlink.NETLINK_ROUTE) as nl:
        return sorted(netlink.text(netlink.attrs(msg, IFINFOMSG_SIZE).get(IFLA_IFNAME)) or ""
                      for _kind, msg in nl.request(RTM_GETLINK, bytes(IFINFOMSG_SIZE), dump=True))


def matches(pattern: str, name: str) -> bool:
    """iptables' rule: a trailing '+' matches any name with that prefix."""
    return name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern


def matching(patterns, all_names: list[str] | None = None) -> list[str]:
    """Links the patterns match; no patterns means every link but lo."""
    all_names = names() if all_names is None else all_names
    if not patterns:
        return [n for n in all_names if n != "lo"]
    return [n for n in all_names if any(matches(p, n) for p in patterns)]
