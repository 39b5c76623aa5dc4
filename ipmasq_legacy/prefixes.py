"""IP prefixes as plain integers: parsed, merged and printed fast.

100,000 exempt prefixes are a real configuration (a cloud's published ranges, a
company's routing table). ipaddress builds an object per step and costs about half
a second per 100,000 just to parse; the text is parsed here with inet_pton, and
ipaddress is asked only when the fast path cannot say (odd spellings, errors).
"""

from __future__ import annotations

import functools
import gc
import ipaddress
import re
import socket
import struct
import sys
from bisect import bisect_left
from collections.abc import Sequence
from itertools import islice, repeat
from operator import add, and_, itemgetter, le
from typing import NamedTuple

from .inputs import show

_V4 = re.compile(r"[0-9.]{7,15}/[0-9]{1,2}")
_V6 = re.compile(r"[0-9A-Fa-f:.]{2,45}/[0-9]{1,3}")
_BITS = {4: 32, 6: 128}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}

# For the batch paths below: a length as written -> the length, only for the canonical
# spelling (what `length_text == str(int(length_text))` and the range check let through),
# and per family and length the host bits and the size of a prefix.
_LENGTHS = {family: {str(n): n for n in range(bits + 1)} for family, bits in _BITS.items()}
_HOST_BITS = {family: [(1 << (bits - n)) - 1 for n in range(bits + 1)] for family, bits in _BITS.items()}
_SIZES = {family: [1 << (bits - n) for n in range(bits + 1)] for family, bits in _BITS.items()}
_SLASH_LENGTH = {n: f"/{n}" for n in range(33)}  # IPv4 lengths only
_PACK_V4 = struct.Struct("!I").pack
_new = tuple.__new__  # Prefix(a, b, c) is tuple.__new__(Prefix, (a, b, c)), minus a Python-level call
# (zip(*prefixes) would make an iterator, a container the GC scans, per prefix)
_versions, _values, _lengths = itemgetter(0), itemgetter(1), itemgetter(2)


class Prefix(NamedTuple):
    version: int  # 4 or 6
    value: int  # the network address as an integer
    length: int  # the prefix length

    def __str__(self) -> str:
        return f"{address_text(self.version, self.value)}/{self.length}"

    @property
    def last(self) -> int:
        return self.value + (1 << (_BITS[self.version] - self.length)) - 1


class PrefixError(ValueError):
    """Not a prefix; `suggestion` is the network meant when only host bits were set."""

    def __init__(self, message: str, suggestion: str | None = None):
        super().__init__(message)
        self.suggestion = suggestion


def address_text(version: int, value: int) -> str:
    if version == 4:
        return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
    if value >> 32 == 0xFFFF:  # IPv4-mapped: Python 3.13 spells it dotted, earlier ones in hex
        return v6_words(value)
    return str(ipaddress.IPv6Address(value))  # Python's RFC 5952 spelling


def v6_words(value: int) -> str:
    """RFC 5952 text of an IPv6 address in hex words, as Python before 3.13 spells every
    address: one spelling on every Python (set names are digests of these texts)."""
    words = [f"{(value >> (112 - 16 * i)) & 0xFFFF:x}" for i in range(8)]
    best_len, best_at, start = 1, -1, None
    for i in range(9):
        if i < 8 and words[i] == "0":
            start = i if start is None else start
        elif start is not None:
            if i - start > best_len:
                best_len, best_at = i - start, start
            start = None
    if best_at < 0:
        return ":".join(words)
    return ":".join(words[:best_at]) + "::" + ":".join(words[best_at + best_len:])


def parse(text: str) -> Prefix:
    """'10.0.0.0/8' -> Prefix(4, 167772160, 8); strict: host bits set is an error."""
    family = 4 if _V4.fullmatch(text) else 6 if _V6.fullmatch(text) else None
    if family is not None:
        addr, _, length_text = text.partition("/")
        length = int(length_text)
        try:
            value = int.from_bytes(socket.inet_pton(_AF[family], addr), "big")
        except OSError:
            value = None  # e.g. a leading zero: let ipaddress say why
        if value is not None and length <= _BITS[family] and length_text == str(length):
            host_bits = (1 << (_BITS[family] - length)) - 1
            if value & host_bits:
                network = Prefix(family, value & ~host_bits, length)
                raise PrefixError(f"{show(text)} has host bits set", suggestion=str(network))
            return Prefix(family, value, length)
    return _parse_slowly(text)


# A possessive repeat (3.11 on) keeps no backtracking state per repetition: 20 MB less
# at 100,000 lines. It matches what the plain one matches: nothing after it could use
# a repetition given back. Before 3.11.5 sre mismatched a possessive group that holds
# alternatives (CPython gh-106052: Debian 12's 3.11.2 declined a list ending at \Z).
POSSESSIVE = "+" if sys.version_info >= (3, 11, 5) else ""


@functools.cache  # compiled when first needed: most runs never need it
def _lines(version: int) -> re.Pattern:
    """Many texts, one a line, each one the fast path of parse() looks at (_V4, _V6)."""
    one = (_V4 if version == 4 else _V6).pattern
    return re.compile(rf"{one}(?:\n{one})*{POSSESSIVE}")


def parse_batch(texts: list, version: int) -> list[Prefix] | None:
    """`[parse(t) for t in texts]` when every text is a `version` prefix that parse() takes
    on its fast path (the usual case: canonical text, no host bits), about three times
    faster; None when any one is not (not a str, another family, host bits set, an odd
    spelling, an error): the caller then parses them one by one, for the exact result or
    the first error."""
    n = len(texts)
    if n == 0:
        return []
    try:
        joined = "\n".join(texts)
    except TypeError:  # not all str
        return None
    if not _lines(version).fullmatch(joined):
        return None
    fields = joined.replace("/", "\n").split("\n")
    if len(fields) != 2 * n:  # a text held a line break
        return None
    lengths = list(map(_LENGTHS[version].get, islice(fields, 1, None, 2)))
    if None in lengths:  # a leading zero, or longer than the family's addresses
        return None
    try:
        packed = list(map(socket.inet_pton, repeat(_AF[version]), islice(fields, 0, None, 2)))
    except (OSError, ValueError):
        return None
    values: Sequence[int]
    if version == 4:
        values = struct.unpack(f"!{n}I", b"".join(packed))
    else:
        values = [int.from_bytes(b, "big") for b in packed]
    if any(map(and_, values, map(_HOST_BITS[version].__getitem__, lengths))):  # type: ignore[arg-type]
        return None
    # A Prefix, unlike a plain tuple of numbers, stays on the GC's lists: making 100,000
    # of them would run the collector some 140 times (a third of the time here).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return list(map(_new, repeat(Prefix), zip(repeat(version), values, lengths)))
    finally:
        if collecting:
            gc.enable()


def texts(prefixes) -> list[str]:
    """`[str(p) for p in prefixes]`, IPv4 lists formatted in bulk (2.5 times faster)."""
    prefixes = list(prefixes)
    if prefixes and list(map(_versions, prefixes)).count(4) == len(prefixes):
        try:
            return list(map(str.__add__, map(socket.inet_ntoa, map(_PACK_V4, map(_values, prefixes))),
                            map(_SLASH_LENGTH.__getitem__, map(_lengths, prefixes))))
        except (struct.error, KeyError, TypeError):
            pass  # not a real prefix: str() says what it says
    return [str(p) for p in prefixes]


def _parse_slowly(text: str) -> Prefix:
    """ipaddress's rules for everything else (a bare address, a netmask, an error),
    but no zone index (fe80::1%eth0): a prefix in a rule cannot carry one."""
    if "%" in text:
        raise PrefixError(f"{show(text)} is not a CIDR (a zone index has no place in a prefix)")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            why = str(exc) if len(str(exc)) <= 120 else "does not appear to be an IPv4 or IPv6 network"
            raise PrefixError(f"{show(text)} is not a CIDR ({why})") from None
        raise PrefixError(f"{show(text)} has host bits set", suggestion=str(loose)) from None
    return Prefix(net.version, int(net.network_address), net.prefixlen)


def normalise(prefixes) -> list[Prefix]:
    """Merge duplicates, contained and adjacent prefixes; sorted, IPv4 first."""
    ordered = sorted(prefixes)  # a Prefix sorts as (version, value, length): what is wanted
    out: list[Prefix] = []
    for family in (4, 6):
        chunk = ordered[bisect_left(ordered, (family,)):bisect_left(ordered, (family + 1,))]
        out += _merge(chunk, family)
    return out


def _merge(chunk: list[Prefix], family: int) -> list[Prefix]:
    """One family's prefixes, sorted, merged."""
    if len(chunk) < 2:
        return [_new(Prefix, p) for p in chunk]
    starts, lengths = list(map(_values, chunk)), list(map(_lengths, chunk))
    ends = map(add, starts, map(_SIZES[family].__getitem__, lengths))  # one past the last address
    if not any(map(le, islice(starts, 1, None), ends)):
        # Nothing starts before the previous one ends or right where it ends: no two of
        # them overlap or touch, so nothing merges (the common case, checked in C).
        return chunk if set(map(type, chunk)) == {Prefix} else [_new(Prefix, p) for p in chunk]
    bits = _BITS[family]
    merged: list[tuple[int, int]] = []
    covered_to = -1
    for start, length in zip(starts, lengths):
        if start <= covered_to:
            continue  # inside the previous prefix (prefixes never overlap partially)
        touching = start == covered_to + 1  # else it cannot be the other half of the previous
        merged.append((start, length))
        covered_to = start + (1 << (bits - length)) - 1
        # two halves of one prefix become that prefix, as often as it cascades
        while touching and len(merged) >= 2:
            (s1, p1), (s2, p2) = merged[-2], merged[-1]
            size = 1 << (bits - p1)
            if p1 != p2 or p1 == 0 or s2 != s1 + size or s1 % (size << 1):
                break
            merged[-2:] = [(s1, p1 - 1)]
    return [_new(Prefix, (family, start, length)) for start, length in merged]
