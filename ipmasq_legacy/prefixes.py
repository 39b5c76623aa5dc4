"""IP prefixes as plain integers: parsed, merged and printed fast.

100,000 exempt prefixes are a real configuration (a cloud's published ranges, a
company's routing table). ipaddress builds an object per step and costs about half
a second per 100,000 just to parse; the text is parsed here with inet_pton, and
ipaddress is asked only when the fast path cannot say (odd spellings, errors).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import NamedTuple

_V4 = re.compile(r"[0-9.]{7,15}/[0-9]{1,2}")
_V6 = re.compile(r"[0-9A-Fa-f:.]{2,45}/[0-9]{1,3}")
_BITS = {4: 32, 6: 128}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


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
    return str(ipaddress.IPv6Address(value))  # Python's RFC 5952 spelling


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
                raise PrefixError(f"{text!r} has host bits set", suggestion=str(network))
            return Prefix(family, value, length)
    return _parse_slowly(text)


def _parse_slowly(text: str) -> Prefix:
    """ipaddress's rules for everything else (a bare address, a netmask, an error),
    but no zone index (fe80::1%eth0): a prefix in a rule cannot carry one."""
    if "%" in text:
        raise PrefixError(f"{text!r} is not a CIDR (a zone index has no place in a prefix)")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise PrefixError(f"{text!r} is not a CIDR ({exc})") from None
        raise PrefixError(f"{text!r} has host bits set", suggestion=str(loose)) from None
    return Prefix(net.version, int(net.network_address), net.prefixlen)


def normalise(prefixes) -> list[Prefix]:
    """Merge duplicates, contained and adjacent prefixes; sorted, IPv4 first."""
    out: list[Prefix] = []
    for family in (4, 6):
        bits = _BITS[family]
        merged: list[tuple[int, int]] = []
        covered_to = -1
        for start, length in sorted((p.value, p.length) for p in prefixes if p.version == family):
            if start <= covered_to:
                continue  # inside the previous prefix (prefixes never overlap partially)
            merged.append((start, length))
            covered_to = start + (1 << (bits - length)) - 1
            # two halves of one prefix become that prefix, as often as it cascades
            while len(merged) >= 2:
                (s1, p1), (s2, p2) = merged[-2], merged[-1]
                size = 1 << (bits - p1)
                if p1 != p2 or p1 == 0 or s2 != s1 + size or s1 % (size << 1):
                    break
                merged[-2:] = [(s1, p1 - 1)]
        out += [Prefix(family, start, length) for start, length in merged]
    return out
