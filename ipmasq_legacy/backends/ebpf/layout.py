"""Mirrors of bpf/masq.c's map keys, values and flags (its _Static_asserts pin the sizes)."""

from __future__ import annotations

import struct

F_V4, F_V6, F_ANY_SRC4, F_ANY_SRC6, F_RANDOM, F_DRAIN = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
N_FOREIGN, N_CLOSED, N_NODE = 0x01, 0x02, 0x04
CFG = struct.Struct("=IIII32s")  # flags, retries, total ports, crc32 of the port list, sha256 of the tries
CTL = struct.Struct("=I")
NAT_KEY = struct.Struct("=16s16s2s2sBB2x")  # saddr, daddr, sport, dport, proto, family
NAT_VAL = struct.Struct("=16s2sHIQ")  # addr, port, flags, ifindex, seen
STATS = ("new_flows", "exhausted", "no_address", "replies", "icmp_errors", "fragments", "fragment_misses",
         "foreign_reserved", "port_retries", "failed", "node_remapped")
LPM = {4: struct.Struct("=IB4s"), 6: struct.Struct("=IB16s")}
