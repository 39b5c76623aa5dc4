"""Pure: a plan's decision as the contents of the datapath's maps (the config value, the
port tables, the LPM trie keys of one generation), and the diff of a trie's generation
against what the plan wants. Reads nothing but the ephemeral port range (when not given)."""

from __future__ import annotations

import array
import hashlib
import ipaddress
import socket
import struct
import zlib
from itertools import repeat

from ... import kernel
from ...errors import ApplyError
from ...plan import FamilyPlan
from .layout import CFG, F_ANY_SRC4, F_ANY_SRC6, F_DRAIN, F_RANDOM, F_V4, F_V6, LPM
from .names import MAX_RETRIES, PORTS, SHAPES, TRIE_FAMILY


def local_port_range(text: str | None = None) -> tuple[int, int]:
    """The node's ephemeral range (net.ipv4.ip_local_port_range, per network namespace)."""
    if text is None:
        text = kernel.current().read_text("/proc/sys/net/ipv4/ip_local_port_range") or "32768 60999"
    lo, hi = (int(x) for x in text.split()[:2])
    return lo, hi


def parse_ranges(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in str(text).replace(",", " ").split():
        a, _, b = part.partition("-")
        out.append((int(a), int(b or a)))
    return tuple(out)


def translated_ports(to_ports, ephemeral: tuple[int, int]) -> list[int]:
    """Translated source ports: `masquerade-to-ports` (else rules/ebpf.yaml's default)
    minus the node's ephemeral range, so they never collide with the node's own."""
    ranges = to_ports or parse_ranges(SHAPES["port_ranges"])
    lo, hi = ephemeral
    ports = []
    for first, last in ranges:
        ports += [p for p in range(first, last + 1) if not lo <= p <= hi and p > 0]
    return sorted(set(ports))


def port_spans(ports: list[int]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for p in ports:
        if spans and spans[-1][1] == p - 1:
            spans[-1] = (spans[-1][0], p)
        else:
            spans.append((p, p))
    return spans


def cfg_value(families: dict[int, FamilyPlan | None], ports: list[int], drain: bool = False) -> bytes:
    flags = 0
    any_plan = next((fp for fp in families.values() if fp is not None), None)
    for family, fp in families.items():
        if fp is None:
            continue
        flags |= F_V4 if family == 4 else F_V6
        if not fp.sources:
            flags |= F_ANY_SRC4 if family == 4 else F_ANY_SRC6
    if any_plan is not None and any_plan.random_fully:
        flags |= F_RANDOM
    if drain:
        flags |= F_DRAIN
    retries = max(1, min(int(SHAPES["port_retries"]), MAX_RETRIES))
    crc = zlib.crc32(array.array("I", ports).tobytes())
    return CFG.pack(flags, retries, len(ports), crc, tries_digest(families))


def port_tables(ports: list[int]) -> tuple[array.array, array.array]:
    """One generation of `ipmq_ports` (the translated ports, then zeros) and of
    `ipmq_portidx` (port -> its place in the first, counted from 1; 0: not translated)."""
    table = array.array("I", ports) + array.array("I", [0]) * (PORTS - len(ports))
    index = array.array("I", [0]) * PORTS
    for i, port in enumerate(ports):
        index[port] = i + 1
    return table, index


def tries_digest(families: dict[int, FamilyPlan | None]) -> bytes:
    """What the LPM tries of a generation hold, as one digest: a generation goes live
    only once its tries are written, so comparing this is comparing the tries."""
    text = "\n".join(f"{family} {kind} {' '.join(getattr(fp, kind))}" for family, fp in sorted(families.items())
                     if fp is not None for kind in ("sources", "exempt"))
    return hashlib.sha256(text.encode()).digest()


def lpm_key(family: int, gen: int, prefix: str) -> bytes:
    """The trie key of a (normalised) prefix in one generation."""
    addr, _, plen = str(prefix).partition("/")
    try:
        packed = socket.inet_pton(socket.AF_INET if family == 4 else socket.AF_INET6, addr)
    except OSError:
        raise ApplyError(f"prefix {prefix} is not an IPv{family} prefix") from None
    bits = int(plen) if plen else len(packed) * 8
    return LPM[family].pack(8 + bits, gen, packed)


def lpm_key_list(family: int, gen: int, prefixes) -> list[bytes]:
    """lpm_key of many prefixes at once, in their order (100,000 in about 0.035 s)."""
    af, full = (socket.AF_INET, 32) if family == 4 else (socket.AF_INET6, 128)
    head = {str(n): struct.pack("=IB", 8 + n, gen) for n in range(full + 1)}  # prefix length and generation
    head[""] = head[str(full)]
    pton = socket.inet_pton
    try:
        return [head[plen] + pton(af, addr) for addr, _, plen in map(str.partition, map(str, prefixes), repeat("/"))]
    except (OSError, KeyError, ValueError):
        return [lpm_key(family, gen, p) for p in prefixes]  # names the bad prefix


def lpm_keys(family: int, gen: int, prefixes) -> set[bytes]:
    return set(lpm_key_list(family, gen, prefixes))


def trie_diff(want: list[bytes], have: bytes, key_size: int) -> tuple[list[bytes], list[bytes]]:
    """(missing, extra): the keys of `want` not in `have` (keys end to end, as the
    kernel hands them over), those of `have` not in `want`. A plan's prefixes are
    sorted and disjoint, the order the kernel walks a trie in: only the stretch between
    the longest common beginning and the longest common end (bisected, compared in C)
    is compared as sets, so a change costs what it changes. Any order gives the right
    answer (a longer stretch)."""
    if not have or not want:  # a first write, or all to go
        return list(want), [have[i:i + key_size] for i in range(0, len(have), key_size)]
    wanted = b"".join(want)
    if wanted == have:
        return [], []
    nw, nh = len(want), len(have) // key_size

    def common(match) -> int:  # the largest k with match(k) true, match monotone
        lo, hi = 0, min(nw, nh)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if match(mid) else (lo, mid - 1)
        return lo

    first = common(lambda k: wanted[:k * key_size] == have[:k * key_size])
    last = min(common(lambda k: wanted[len(wanted) - k * key_size:] == have[len(have) - k * key_size:]),
               min(nw, nh) - first)
    w = set(want[first:nw - last])
    h = {have[i:i + key_size] for i in range(first * key_size, (nh - last) * key_size, key_size)}
    return list(w - h), list(h - w)


def lpm_prefix(family: int, key: bytes) -> tuple[int, str]:
    plen, gen, addr = LPM[family].unpack(key)
    net = ipaddress.ip_network((addr, plen - 8), strict=False)
    return gen, str(net)


def seek_keys(name: str, gen: int, notes: dict, prefixes=()) -> list[bytes]:
    """Keys that may lie just before generation `gen` of a trie, in the kernel's order
    (generation 1 comes after the whole of generation 0; nothing comes before 0): the
    one the last apply noted, then the last prefixes of `prefixes` (sorted, as a plan's
    are) in generation 0, which mostly holds a plan one change away from this one."""
    if gen == 0:
        return []
    out = []
    try:
        out.append(bytes.fromhex(notes[name]["seek"]))
    except (KeyError, TypeError, ValueError):
        pass
    return out + [lpm_key(TRIE_FAMILY[name], 0, p) for p in prefixes[-1:-3:-1]]


def noted_count(name: str, gen: int, notes: dict) -> int | None:
    try:
        count = notes[name]["count"][gen]
    except (KeyError, IndexError, TypeError):
        return None
    return count if isinstance(count, int) and count >= 0 else None


def addr16(text: str) -> bytes:
    ip = ipaddress.ip_address(text)
    return ip.packed if ip.version == 6 else bytes(12) + ip.packed


def addr_text(raw: bytes, family: int) -> str:
    return str(ipaddress.ip_address(raw[12:] if family == 4 else raw))
