"""The node's links, through pyroute2: which ones an interface list matches."""

from __future__ import annotations


def names() -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())


def matches(pattern: str, name: str) -> bool:
    """iptables' rule: a trailing '+' matches any name with that prefix."""
    return name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern


def matching(patterns, all_names: list[str] | None = None) -> list[str]:
    """Links the patterns match; no patterns means every link but lo."""
    all_names = names() if all_names is None else all_names
    if not patterns:
        return [n for n in all_names if n != "lo"]
    return [n for n in all_names if any(matches(p, n) for p in patterns)]
