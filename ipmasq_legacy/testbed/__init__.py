"""A throw-away pod -> node -> outside network test bed built from network namespaces.

Everything lives in network namespaces created here, with unique names
(``ipmq-<tag>-pod``, ``ipmq-<tag>-node``, ``ipmq-<tag>-ext``).  No link, address,
route, sysctl or firewall rule is ever created in the calling process's own
network namespace::

    pod (eth0) ==veth== (vpod0) node (eth0) ==veth== (up0) ext
                                     (eth1) ==veth== (up1)
                                     (ens3) ==veth== (up2)

``ext`` holds every destination address on ``lo`` and runs small UDP/TCP echo
servers plus ICMP / ICMPv6 listeners that record the source address each probe
arrived with.  :meth:`TestBed.source_seen` sends one probe from a pod and returns
that address, so NAT rules installed in the node namespace can be observed from
outside.

Sockets are created *inside* a namespace by a helper thread that has switched
its own network namespace with ``setns(2)`` (which only affects the calling
thread); a socket stays in the namespace it was created in, so the actual I/O
can be done from any thread.  The main thread never changes namespace.

Command line (debugging aid)::

    python -m ipmasq_legacy.testbed hold      # build a bed, print names, wait for ^C
    python -m ipmasq_legacy.testbed cleanup   # remove beds left behind by dead processes
"""

from __future__ import annotations

__all__ = [
    "Destination",
    "ALL_DESTINATIONS",
    "UPLINKS",
    "TestBed",
    "TestBedError",
    "ReplyLostError",
    "cleanup_stale",
    "bed_owner_pid",
    "NETNS_PREFIX",
]


from .bed import ALL_DESTINATIONS, UPLINKS, Destination, TestBed, _probe_timeout  # noqa: F401
from .netns import (  # noqa: F401  (the private names: tests/nodeutil.py, the reliability tests)
    NETNS_PREFIX,
    ReplyLostError,
    TestBedError,
    _netns_pids,
    _NsThread,
    _remove_netns,
    bed_owner_pid,
    cleanup_stale,
)
