"""egress-masquerade-addresses against the node: each address must be on a link its
interface pattern matches (README "SNAT to a chosen address").

apply refuses a plan whose address is not there (exit 2, nothing changed). Once applied,
an address that goes away later is drift for reconcile and status, never a reason to
fall back: the rules keep translating to the configured address, so a pod's address
never leaves the node, and neither does an address the operator did not choose.
"""

from __future__ import annotations

import ipaddress

from .links import matches
from .plan import Plan

KEY = "egress-masquerade-addresses"


def pairs(plan: Plan) -> list[list]:
    """[[family, pattern, address], ...] of the plan (JSON-able: reconcile records them)."""
    return [[fp.family, pattern, address] for fp in plan.families for pattern, address in fp.snat]


def node_addresses() -> dict[str, set]:
    """{link name: {ip_address, ...}} of this network namespace, over netlink."""
    from .backends.ebpf.links import read_links

    return {link.name: {ipaddress.ip_address(a) for a in link.addresses} for link in read_links().values()}


def missing(wanted: list[list], addresses: dict[str, set] | None = None) -> list[str]:
    """One phrase per address that is on no link its pattern matches; [] when all are."""
    if not wanted:
        return []
    addresses = node_addresses() if addresses is None else addresses
    out = []
    for family, pattern, address in wanted:
        ip = ipaddress.ip_address(address)
        if not any(matches(pattern, name) and ip in held for name, held in addresses.items()):
            out.append(f"ipv{family}: SNAT address {address} is on no link matching {pattern} ({KEY})")
    return out
