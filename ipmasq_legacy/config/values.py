"""Value parsers shared by every input shape, and the warnings a config carries.

Each parser takes (value, where) and returns the typed value or raises ConfigError;
`where` reads like "key 'x' in /etc/ipmasq-legacy/config.yaml", so every error is one
line naming the key, the value and the file.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, NamedTuple

from .. import prefixes
from ..errors import ConfigError
from ..inputs import show
from ..prefixes import Prefix

DATAPATHS = ("auto", "iptables", "iptables-legacy", "iptables-nft", "nftables", "ebpf")


class ConfigWarning(NamedTuple):
    """Something accepted that an operator should know about (logged by apply, shown by
    `status`, counted by the metric ipmasq_config_warnings{kind})."""

    kind: str  # one of WARNING_KINDS
    text: str


WARNING_KINDS = (
    "unknown-key",  # a key of the ip-masq-agent file that ip-masq-agent ignores too
    "ignored-keys",  # keys of Cilium's documents unrelated to masquerading
    "agent-difference",  # accepted here, refused by ip-masq-agent (or read differently)
    "cilium-difference",  # accepted here, refused or read differently by Cilium
    "no-effect",  # a key that changes nothing where it stands
)


def _show(value: Any) -> str:
    """A value as it appears in an error: quoted, control characters escaped, at most
    inputs.SHOW_LIMIT characters however large the value is."""
    return show(value)


# Go's strconv.ParseBool (what Cilium reads its string values with) takes 1/t/true and
# 0/f/false in three casings; YAML 1.1's yes/no/on/off are taken too.
_TRUE = ("true", "t", "yes", "on", "1")
_FALSE = ("false", "f", "no", "off", "0")


def parse_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return True
    if isinstance(value, str) and value.strip().lower() in _FALSE:
        return False
    raise ConfigError(f"{where}: expected true or false, got {_show(value)}")


def _as_list(value: Any, where: str) -> list:
    """A list, or one string split on commas and spaces (Cilium's habit)."""
    if value is None:
        return []
    if isinstance(value, str):
        if re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value):
            raise ConfigError(f"{where}: {_show(value)} contains a control character (a newline?)")
        return [part for part in re.split(r"[, \t]+", value) if part]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f"{where}: expected a list or a string, got {_show(value)}")


# Linux accepts almost any byte in a link name; we accept the ones real names use,
# so nothing that could end a token or a line in iptables-restore or nft input passes.
_IFNAME = re.compile(r"[A-Za-z0-9_.@-]+\+?|\+")


def parse_interface(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: interface name must be a string, got {_show(value)}")
    if value == "":
        raise ConfigError(f"{where}: interface name is empty")
    if len(value.encode()) > 15:
        raise ConfigError(f"{where}: interface name {_show(value)} is longer than 15 bytes")
    if value in (".", "..") or value[0] in "-!":
        raise ConfigError(f"{where}: {_show(value)} is not a valid interface name")
    if "+" in value[:-1]:
        raise ConfigError(
            f"{where}: interface name {_show(value)}: '+' is only allowed last, as a prefix match (eth+)"
        )
    if not _IFNAME.fullmatch(value):
        raise ConfigError(
            f"{where}: interface name {_show(value)} has a character outside A-Z a-z 0-9 _ . @ - "
            "(no whitespace, quotes, '/', ':' or control characters)"
        )
    return value


def parse_interfaces(value: Any, where: str) -> tuple:
    names = [parse_interface(item, where) for item in _as_list(value, where)]
    return tuple(dict.fromkeys(names))  # order kept, duplicates dropped


def parse_network(value: Any, where: str, family: int | None = None) -> Prefix:
    if isinstance(value, bool) or not isinstance(value, str):
        raise ConfigError(f"{where}: expected a CIDR string, got {_show(value)}")
    try:
        net = prefixes.parse(value.strip())
    except prefixes.PrefixError as exc:
        if exc.suggestion:
            raise ConfigError(f"{where}: {_show(value)} has host bits set; did you mean {exc.suggestion}?") from None
        raise ConfigError(f"{where}: {exc}") from None
    if family is not None and net.version != family:
        raise ConfigError(f"{where}: {_show(value)} is IPv{net.version}, expected an IPv{family} CIDR")
    return net


BATCH_MIN_ITEMS = 32  # fewer networks are parsed one by one (the batch's regex costs 0.2 ms to compile)


def parse_networks(value: Any, where: str, family: int | None = None) -> tuple:
    items = _as_list(value, where)
    if len(items) >= BATCH_MIN_ITEMS:  # all at once when all are plain (IPv4 when the family may be either)
        parsed = prefixes.parse_batch(items, family or 4)
        if parsed is not None:
            return tuple(parsed)
    return tuple(parse_network(item, where, family) for item in items)


def parse_snat_addresses(value: Any, where: str) -> tuple:
    """egress-masquerade-addresses: {pattern: address or [addresses]}, or the command line's
    "eth0=203.0.113.7,eth0=2001:db8::7" -> ((pattern, address), ...), sorted, at most one
    address per family and pattern. The address text is ipaddress's, so nothing else can
    reach iptables-restore or nft input."""
    if value is None:
        return ()
    pairs: list = []
    if isinstance(value, dict):
        for pattern, addresses in value.items():
            items = addresses if isinstance(addresses, (list, tuple)) else _as_list(addresses, where)
            pairs += [(pattern, a) for a in items]
    else:
        for item in _as_list(value, where):
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(f"{where}: {_show(item)} is not INTERFACE=ADDRESS (or use a mapping "
                                  "interface: address)")
            pattern, _, address = item.partition("=")
            pairs.append((pattern, address))
    out: dict = {}
    for pattern, address in pairs:
        pattern = parse_interface(pattern, where)
        if pattern == "lo":
            raise ConfigError(f"{where}: nothing leaving 'lo' is masqueraded; no address can be given for it")
        if isinstance(address, bool) or not isinstance(address, str):
            raise ConfigError(f"{where}: {pattern}: expected an IP address, got {_show(address)}")
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            raise ConfigError(f"{where}: {pattern}: {_show(address)} is not an IP address (no prefix length)") from None
        if ip.is_multicast or ip.is_unspecified or ip.is_loopback or getattr(ip, "ipv4_mapped", None):
            raise ConfigError(f"{where}: {pattern}: {_show(address)} cannot be a source address")
        key = (pattern, ip.version)
        if key in out and out[key] != str(ip):
            raise ConfigError(f"{where}: {pattern}: two IPv{ip.version} addresses ({out[key]}, {ip}); give one")
        out[key] = str(ip)
    return tuple(sorted((pattern, address) for (pattern, _family), address in out.items()))


def parse_datapath(value: Any, where: str) -> str:
    if value not in DATAPATHS:
        raise ConfigError(f"{where}: {_show(value)} is not one of {', '.join(DATAPATHS)}")
    return value


def parse_path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{where}: expected a file path, got {_show(value)}")
    return value


def parse_port_ranges(value: Any, where: str) -> tuple:
    """"1024-29999,32768-65535" -> ((1024, 29999), (32768, 65535))."""
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a port range string like 1024-65535, got {_show(value)}")
    ranges = []
    for part in [p for p in re.split(r"[,\s]+", value) if p]:
        m = re.fullmatch(r"(\d{1,5})(?:-(\d{1,5}))?", part)
        if not m:
            raise ConfigError(f"{where}: {_show(part)} is not a port or a port range like 1024-65535")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if not (1 <= first <= last <= 65535):
            raise ConfigError(f"{where}: port range {_show(part)} must be within 1-65535, low to high")
        ranges.append((first, last))
    ranges.sort()
    for (_, a_last), (b_first, _) in zip(ranges, ranges[1:]):
        if b_first <= a_last:
            raise ConfigError(f"{where}: port ranges in {_show(value)} overlap")
    return tuple(ranges)


# Go's time.ParseDuration: an optional sign, then "0" or number-unit pairs; a number may
# be "5", "5.", ".5" or "1.5"; µ is U+00B5 or U+03BC.
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)"
_GO_DURATION = re.compile(rf"([-+]?)(0|(?:{_GO_PART})+)")


def parse_go_duration(text: str) -> float | None:
    """Seconds, as Go's time.ParseDuration reads `text` (negative allowed); None when Go refuses it."""
    m = _GO_DURATION.fullmatch(text)
    if m is None:
        return None
    seconds = sum(float(n) * _GO_UNITS[u] for n, u in re.findall(_GO_PART, m.group(2)))
    return -seconds if m.group(1) == "-" else seconds


def parse_duration(value: Any, where: str) -> float:
    """A positive duration: a Go duration string (60s, 1m30s, 500ms, 1h), or seconds as a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (parsed := parse_go_duration(value.strip())) is not None:
        seconds = parsed
    else:
        raise ConfigError(f"{where}: {_show(value)} is not a duration like 60s or 1m30s")
    if seconds <= 0:
        raise ConfigError(f"{where}: duration must be positive, got {_show(value)}")
    return seconds
