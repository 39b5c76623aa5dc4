"""The destination decision as an LPM verdict table, resolved once into the exempt list.

Per family, every prefix the config names carries a verdict: exempt (native-routing and
pod CIDRs, ip-masq-agent's ranges, link-local, multicast) or masquerade
(force-masquerade-cidrs, masquerade-only-cidrs). The longest prefix containing a
destination decides; where none does, it is masqueraded. resolve() turns that table into
the disjoint, normalised prefixes whose verdict is exempt, so every backend keeps
rendering one exempt set and a new connection still costs one lookup (README "The
decision"). Measured by bench/lpm.py: 100,000 mixed prefixes resolve in about 0.2 s.

Ambiguity is an error, never a guess: the same prefix with both verdicts (ip-masq-agent
PR #68 stalled on exactly that), and a masquerade prefix inside multicast, which is
exempt whatever the config.
"""

from __future__ import annotations

import gc
from itertools import repeat

from . import prefixes
from .errors import ConfigError
from .prefixes import Prefix

BITS = {4: 32, 6: 128}
EXEMPT, MASQUERADE = 0, 1
MULTICAST = {4: prefixes.parse("224.0.0.0/4"), 6: prefixes.parse("ff00::/8")}
_new = tuple.__new__
EVERYTHING = {4: Prefix(4, 0, 0), 6: Prefix(6, 0, 0)}

Groups = list  # [(where the prefixes come from: a key's name, [Prefix, ...]), ...]


def resolve(family: int, exempt: Groups, masquerade: Groups) -> list[Prefix]:
    """The exempt prefixes in effect for `family` (normalised: disjoint, merged, sorted).
    Multicast is always exempt; a masquerade prefix equal to an exempt one, or inside
    multicast, is a ConfigError naming it and the keys it comes from."""
    group_exempt = [p for _, ps in exempt for p in ps if p.version == family] + [MULTICAST[family]]
    group_masq = [p for _, ps in masquerade for p in ps if p.version == family]
    if not group_masq:  # the usual case: nothing to cut out, plain normalising
        return prefixes.normalise(group_exempt)
    _check_multicast(family, masquerade, group_masq)
    bits = BITS[family]
    # One int per entry, (value, length, verdict) packed so that int order is their order:
    # sorting 100,000 ints takes a tenth of the time sorting as many tuples does.
    entries = sorted([(p.value << 9 | p.length << 1 | EXEMPT) for p in group_exempt]
                     + [(p.value << 9 | p.length << 1 | MASQUERADE) for p in group_masq])
    found = _cover(_sweep(entries, bits, family, exempt, masquerade), bits)
    collecting = gc.isenabled()
    gc.disable()  # as in prefixes.parse_batch: hundreds of thousands of tuples at once
    try:
        return list(map(_new, repeat(Prefix), zip(repeat(family), found[0::2], found[1::2])))
    finally:
        if collecting:
            gc.enable()


def _sweep(entries: list, bits: int, family: int, exempt: Groups, masquerade: Groups) -> list:
    """The exempt address ranges [(first, last)], in address order, adjacent ones merged.

    `entries` sorted by (start, length): an enclosing prefix comes before what it holds.
    A stack holds the open prefixes that matter, each as [last, verdict, next address not
    yet decided]; a prefix whose verdict equals its nearest open ancestor's changes
    nothing and is skipped (so is a masquerade prefix with no exempt ancestor: that is the
    default). Each prefix is pushed and popped at most once: linear after the sort."""
    out: list = []

    def emit(first: int, last: int) -> None:
        if out and out[-1][1] + 1 == first:
            out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))

    stack: list = []
    previous = None
    for key in entries:
        value, length, verdict = key >> 9, key >> 1 & 0xFF, key & 1
        if previous is not None and previous >> 1 == key >> 1:
            if previous != key:
                raise _ambiguous(Prefix(family, value, length), exempt, masquerade)
            continue
        previous = key
        last = value + (1 << (bits - length)) - 1
        while stack and stack[-1][0] < value:
            end, held, cursor = stack.pop()
            if held == EXEMPT and cursor <= end:
                emit(cursor, end)
        parent = stack[-1][1] if stack else MASQUERADE
        if verdict == parent:
            continue
        if stack:
            top = stack[-1]
            if top[1] == EXEMPT and top[2] < value:
                emit(top[2], value - 1)
            top[2] = last + 1
        stack.append([last, verdict, value])
    while stack:
        end, held, cursor = stack.pop()
        if held == EXEMPT and cursor <= end:
            emit(cursor, end)
    return out


def _cover(ranges: list, bits: int) -> list[int]:
    """The fewest prefixes covering each range exactly, in address order, flat:
    [value, length, value, length, ...]."""
    out: list[int] = []
    add = out.append
    for first, last in ranges:
        while first <= last:
            align = (first & -first) if first else 1 << bits
            size = 1 << ((last - first + 1).bit_length() - 1)
            if align < size:
                size = align
            add(first)
            add(bits + 1 - size.bit_length())
            first += size
    return out


def _where(prefix: Prefix, groups: Groups) -> list[str]:
    return [name for name, ps in groups if any(p == prefix for p in ps)]


def _ambiguous(prefix: Prefix, exempt: Groups, masquerade: Groups) -> ConfigError:
    forced = " and ".join(_where(prefix, masquerade))
    exempted = " and ".join(_where(prefix, exempt) or ["multicast"])
    return ConfigError(f"key {forced!r}: {prefix} is also exempt ({exempted}); the same prefix in both lists has "
                       "no longest match: remove it from one, or name a longer prefix")


def _check_multicast(family: int, masquerade: Groups, group_masq: list[Prefix]) -> None:
    mc = MULTICAST[family]
    for p in group_masq:
        if p.length >= mc.length and p.value >> (BITS[family] - mc.length) == mc.value >> (BITS[family] - mc.length):
            keys = " and ".join(_where(p, masquerade))
            raise ConfigError(f"key {keys!r}: {p} is multicast ({mc}), which is never masqueraded")
