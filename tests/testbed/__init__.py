"""The tests' and the bench's test bed and node driver, built on the selftest's bed
(ipmasq_legacy/selftest/bed.py: pod -> node -> outside in namespaces of its own).

* bed.py: TestBed, the selftest's Bed with more pods, every destination the tests probe
  (ALL_DESTINATIONS), uplinks set down and up, and the clean-up of beds left by dead runs.
* node.py: Node, the `ipmasq` CLI run in a bed's node namespace with a state dir (and a
  bpffs) of its own: tests/nodeutil.py and bench/measure.py drive nodes through it.

Command line (debugging aid)::

    python -m tests.testbed hold      # build a bed, print names, wait for ^C
    python -m tests.testbed cleanup   # remove beds left behind by dead processes
"""

from __future__ import annotations

__all__ = [
    "ALL_DESTINATIONS",
    "NETNS_PREFIX",
    "UPLINKS",
    "Destination",
    "Node",
    "ReplyLostError",
    "TestBed",
    "TestBedError",
    "bed_owner_pid",
    "cleanup_stale",
]

from ipmasq_legacy.selftest.bed import UPLINKS, Destination
from ipmasq_legacy.selftest.netns import (  # noqa: F401  (the private names: tests/nodeutil.py, the reliability tests)
    NETNS_PREFIX,
    ReplyLostError,
    TestBedError,
    _netns_pids,
    _NsThread,
    _remove_netns,
)

from .bed import ALL_DESTINATIONS, TestBed, bed_owner_pid, cleanup_stale
from .node import Node
