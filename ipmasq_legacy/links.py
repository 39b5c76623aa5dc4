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


def selected(patterns, name: str) -> bool:
    """Whether egress-masquerade-interfaces `patterns` select the link `name`: one of them
    matches it, or, with no patterns, it is not lo. The one test for the status listing
    (matching) and the links the ebpf datapath goes on (backends/ebpf/links.py)."""
    return any(matches(p, name) for p in patterns) if patterns else name != "lo"


def matching(patterns, all_names: list[str] | None = None) -> list[str]:
    """The link names the patterns select (`selected`), of every link by default."""
    all_names = names() if all_names is None else all_names
    return [n for n in all_names if selected(patterns, n)]
