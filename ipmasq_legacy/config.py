"""Configuration: defaults, load, validate (spec sections 1 and 2).

Read top to bottom: the key table, the value parsers, the ip-masq-agent file,
then `load()`, which merges CLI options over the file over the defaults.
Every error is a ConfigError with one line naming the key, the value and the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from . import prefixes
from .errors import ConfigError
from .prefixes import Prefix
from .ruledata import DEFAULTS

# libyaml's loader when PyYAML has it: ten times faster on long prefix lists.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

DATAPATHS = ("auto", "iptables", "iptables-legacy", "iptables-nft", "nftables", "ebpf")


@dataclass(frozen=True)
class MasqAgentConfig:
    """ip-masq-agent's ConfigMap `config` key, as its users write it."""

    non_masquerade_cidrs: tuple = ()
    masq_link_local: bool = False
    masq_link_local_ipv6: bool = False
    resync_interval: float = 60.0
    cidr_limit: int | None = None
    source: str = "<defaults>"


@dataclass(frozen=True)
class Config:
    enable_ipv4_masquerade: bool = True
    enable_ipv6_masquerade: bool = True
    egress_masquerade_interfaces: tuple = ()
    ipv4_native_routing_cidr: tuple = ()
    ipv6_native_routing_cidr: tuple = ()
    ipv4_pod_cidr: tuple = ()
    ipv6_pod_cidr: tuple = ()
    enable_ip_masq_agent: bool = False
    ip_masq_agent_config_path: str = DEFAULTS["ip_masq_agent_config_path"]
    datapath: str = "auto"
    iptables_random_fully: bool = False
    masquerade_to_ports: tuple = ()
    # Loaded from ip_masq_agent_config_path when enable_ip_masq_agent is on.
    masq_agent: MasqAgentConfig | None = None
    source: str = "<defaults>"


# ---------------------------------------------------------------- value parsers
# Each takes (value, where) and returns the typed value or raises ConfigError.
# `where` reads like "key 'x' in /etc/ipmasq-legacy/config.yaml".


def _show(value: Any) -> str:
    """A value as it appears in an error: quoted, control characters escaped."""
    return repr(value)


def parse_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
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


# ---------------------------------------------------------------- the key table
# key -> (Config field, parser). Options on the CLI carry the same names.
KEYS: dict[str, tuple[str, Callable]] = {
    "enable-ipv4-masquerade": ("enable_ipv4_masquerade", parse_bool),
    "enable-ipv6-masquerade": ("enable_ipv6_masquerade", parse_bool),
    "egress-masquerade-interfaces": ("egress_masquerade_interfaces", parse_interfaces),
    "ipv4-native-routing-cidr": ("ipv4_native_routing_cidr", lambda v, w: parse_networks(v, w, 4)),
    "ipv6-native-routing-cidr": ("ipv6_native_routing_cidr", lambda v, w: parse_networks(v, w, 6)),
    "ipv4-pod-cidr": ("ipv4_pod_cidr", lambda v, w: parse_networks(v, w, 4)),
    "ipv6-pod-cidr": ("ipv6_pod_cidr", lambda v, w: parse_networks(v, w, 6)),
    "enable-ip-masq-agent": ("enable_ip_masq_agent", parse_bool),
    "ip-masq-agent-config-path": ("ip_masq_agent_config_path", parse_path),
    "datapath": ("datapath", parse_datapath),
    "iptables-random-fully": ("iptables_random_fully", parse_bool),
    "masquerade-to-ports": ("masquerade_to_ports", parse_port_ranges),
}
# The seed's Helm name: `bpf-masquerade: true` means `datapath: ebpf`.
ALIASES = {"bpf-masquerade"}


def _unknown(key: Any, known, where: str) -> ConfigError:
    hint = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    suggestion = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"{where}: unknown key {_show(key)}{suggestion}")


def _read_yaml(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: is a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc}") from None
    return _parse_text(text, f"{what} {path}")


def _parse_text(text: str, label: str) -> Any:
    """The document in `text`, exactly as `yaml.load(text, Loader=SAFE_LOADER)` has it;
    `label` ("config file /etc/...") starts the error message."""
    if text.lstrip().startswith("{"):
        try:  # JSON is YAML, and json parses a 100,000-prefix list fifty times faster
            return json.loads(text)
        except ValueError:
            pass  # YAML flow style that is not JSON
    try:
        doc = _yaml_fast(text)
        if doc is not None:
            return doc
        return yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{label}: not valid YAML{at}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{label}: nested too deeply") from None


# ------------------------------------------------------------- the YAML fast path
# libyaml takes 0.35 s for a list of 100,000 prefixes written one a line, nearly all of
# it building the list. Such a list is cut out of the text here, the rest (other keys,
# comments) is left to libyaml with a placeholder where the list was, and the list is
# put back into what libyaml returns. A list is cut only where its meaning is beyond
# doubt: the whole value of a top-level `key:` (nothing after the colon but a comment),
# every item a plain `- 10.0.0.0/24` (hex digits, ':' and '.', then '/' and a length: a
# plain scalar that YAML 1.1 can only read as a string) at one indentation, between
# them only blank lines and comments, and after it a line that starts a new top-level
# key. libyaml then checks that every placeholder came back as the plain value of a
# top-level key on its line, in a block mapping, with no key twice. Anything else, or
# any error (libyaml's, on the whole text, says what it is), is left to libyaml whole.

FAST_YAML_MIN_ITEMS = 256  # shorter lists are not worth it
_FAST_SCALAR = r"[0-9A-Fa-f:.]+/[0-9]{1,3}"
_FAST_COMMENT = r"#[\x20-\x7e]*"  # printable ASCII: no line break libyaml sees, no control character
_FAST_KEY = (  # (compiled when first needed: a short file never needs it)
    rf"^([A-Za-z0-9_][A-Za-z0-9_.-]*):((?:[ ]+{_FAST_COMMENT})?)[ ]*\n"  # `key:`, maybe a comment
    rf"(?=(?:[ ]*(?:{_FAST_COMMENT})?\n)*([ ]{{0,8}})- {_FAST_SCALAR}(?:[ \n]|\Z))"  # then a list item
)
_FAST_BODY: dict[str, tuple[re.Pattern, re.Pattern]] = {}  # indentation -> (plain lines, all lines)
_FAST_ITEM = rf"^[ ]*- ({_FAST_SCALAR})"
_FAST_PLACEHOLDER = "ipmasq-legacy-fast-yaml-list-"
_FAST_STR_TAG = "tag:yaml.org,2002:str"


def _fast_body(indent: str) -> tuple[re.Pattern, re.Pattern]:
    """The lines of a list at `indent`: those that are just `- item`, and all it may have
    (items with trailing spaces or a comment, blank lines, comments)."""
    if indent not in _FAST_BODY:
        plain = rf"{indent}- {_FAST_SCALAR}\n"
        item = rf"{indent}- {_FAST_SCALAR}(?:[ ]+{_FAST_COMMENT})?[ ]*"
        blank = rf"[ ]*(?:{_FAST_COMMENT})?"
        # (plain)+ first: sre runs through a plain stretch seven times faster that way
        more = prefixes.POSSESSIVE  # keep no state per line (20 MB at 100,000)
        _FAST_BODY[indent] = (re.compile(rf"(?:{plain})*{more}"),
                              re.compile(rf"(?:(?:{plain})+{more}|{item}(?:\n|\Z)|{blank}\n)*{more}(?:{blank}\Z)?"))
    return _FAST_BODY[indent]


def _yaml_fast(text: str, min_items: int | None = None) -> Any:
    """`yaml.load(text, Loader=SAFE_LOADER)` with the long prefix lists cut out and read
    without libyaml; None when that does not apply (then libyaml reads the text whole)."""
    min_items = FAST_YAML_MIN_ITEMS if min_items is None else min_items
    if len(text) < 6 * min_items:
        return None
    pieces: list[str] = []  # the text libyaml reads
    lists: list[list[str]] = []
    copied = pos = 0  # text[:copied] is in pieces; the next `key:` is looked for from pos
    key_line = re.compile(_FAST_KEY, re.M)  # re's cache: compiled once
    while (m := key_line.search(text, pos)) is not None:
        indent = m.group(3)
        start = m.end()  # the line after `key:`
        plain, lines = _fast_body(indent)
        plain_end = plain.match(text, start).end()
        pos = end = lines.match(text, plain_end).end()  # no `key:` line in between
        if end < len(text) and not ("!" <= text[end] <= "~" and text[end] not in "-#"):
            continue  # what follows might belong to the list: leave it to libyaml
        lead = indent + "- "
        if plain_end > start and "- " not in text[plain_end:end]:  # all items `- item` lines, one after another
            items = text[start + len(lead):plain_end - 1].split("\n" + lead)
        else:
            items = re.compile(_FAST_ITEM, re.M).findall(text, start, end)
        if len(items) < min_items:
            continue
        pieces += [text[copied:m.end(1)], f": {_FAST_PLACEHOLDER}{len(lists)}{m.group(2)}\n"]
        lists.append(items)
        copied = end
    if not lists:
        return None
    pieces.append(text[copied:])
    placeholders = {f"{_FAST_PLACEHOLDER}{i}": items for i, items in enumerate(lists)}
    rest = "".join(pieces)  # what was cut out is printable ASCII: these checks can skip it
    if rest.count(_FAST_PLACEHOLDER) != len(lists) or any(c in rest for c in "&*!"):
        return None  # the text had the placeholder already; anchors, aliases, tags: not worth the thought
    # Only '\n' ends a line here; libyaml also ends one at these. And no document markers.
    if "\r" in rest or (not rest.isascii() and re.search("[\x85\u2028\u2029\ufeff]", rest)):
        return None
    if rest.startswith(("---", "...")) or "\n---" in rest or "\n..." in rest:
        return None
    try:
        loader = SAFE_LOADER(rest)
        try:
            root = loader.get_single_node()
            if not isinstance(root, yaml.MappingNode) or root.flow_style:
                return None
            found = {
                value.value
                for key, value in root.value
                if isinstance(value, yaml.ScalarNode) and not value.style and value.tag == _FAST_STR_TAG
                and value.value in placeholders and key.start_mark.column == 0
                and key.start_mark.line == value.start_mark.line
            }
            if len(found) != len(placeholders):
                return None
            doc = loader.construct_document(root)
        finally:
            loader.dispose()
    except Exception:  # a YAMLError, a RecursionError, a date that is not (2001-02-30): ValueError
        return None  # libyaml says it again, on the whole text
    if not isinstance(doc, dict) or len(doc) != len(root.value):
        return None  # a key twice (or a merge key): leave it to libyaml
    placed = 0
    for key, value in doc.items():
        if isinstance(value, str) and value in placeholders:
            doc[key] = placeholders[value]
            placed += 1
    return doc if placed == len(placeholders) else None


# ---------------------------------------------------------------- ip-masq-agent file

MASQ_AGENT_KEYS = ("nonMasqueradeCIDRs", "masqLinkLocal", "masqLinkLocalIPv6", "resyncInterval", "cidrLimit")


def parse_duration(value: Any, where: str) -> float:
    """Go's time.ParseDuration subset: 60s, 1m30s, 500ms, 1h."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", value.strip()):
        units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
        seconds = sum(
            float(n) * units[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)(ns|us|µs|ms|s|m|h)", value.strip())
        )
    else:
        raise ConfigError(f"{where}: {_show(value)} is not a duration like 60s or 1m30s")
    if seconds <= 0:
        raise ConfigError(f"{where}: duration must be positive, got {_show(value)}")
    return seconds


def load_masq_agent(path_text: str) -> MasqAgentConfig:
    """Missing, empty or comment-only file: the eleven default ranges (spec section 2)."""
    path = Path(path_text)
    if path.is_dir():  # a ConfigMap mounted without `items:` holds the key as a file
        path = path / "config"
    defaults = tuple(prefixes.parse(c) for c in DEFAULTS["non_masquerade_cidrs"])
    if not path.exists():
        return MasqAgentConfig(non_masquerade_cidrs=defaults, source=f"{path} (missing: defaults)")
    doc = _read_yaml(path, "ip-masq-agent config")
    if doc is None:
        return MasqAgentConfig(non_masquerade_cidrs=defaults, source=f"{path} (empty: defaults)")
    if not isinstance(doc, dict):
        raise ConfigError(f"ip-masq-agent config {path}: expected a mapping of keys, got {type(doc).__name__}")
    values: dict[str, Any] = {"source": str(path)}
    for key, value in doc.items():
        where = f"key '{key}' in {path}"
        if key == "nonMasqueradeCIDRs":
            if value is not None and not isinstance(value, list):
                raise ConfigError(f"{where}: expected a list of CIDRs, got {_show(value)}")
            values["non_masquerade_cidrs"] = parse_networks(value or [], where)
        elif key == "masqLinkLocal":
            values["masq_link_local"] = parse_bool(value, where)
        elif key == "masqLinkLocalIPv6":
            values["masq_link_local_ipv6"] = parse_bool(value, where)
        elif key == "resyncInterval":
            values["resync_interval"] = parse_duration(value, where)
        elif key == "cidrLimit":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}: expected a non-negative integer, got {_show(value)}")
            values["cidr_limit"] = value
        else:
            raise _unknown(key, MASQ_AGENT_KEYS, f"ip-masq-agent config {path}")
    # A file that sets other keys but not nonMasqueradeCIDRs keeps the default ranges,
    # as ip-masq-agent does; `nonMasqueradeCIDRs: []` written out means none.
    values.setdefault("non_masquerade_cidrs", defaults)
    return MasqAgentConfig(**values)


# ---------------------------------------------------------------- load


def default_config_path() -> str:
    return os.environ.get("IPMASQ_CONFIG") or DEFAULTS["config_path"]


def load(path: str | None = None, options: dict[str, Any] | None = None) -> Config:
    """Defaults < file < options. `path` None means IPMASQ_CONFIG or the default path,
    whose absence is fine; a path named explicitly must exist."""
    explicit = path is not None or bool(os.environ.get("IPMASQ_CONFIG"))
    file_path = Path(path if path is not None else default_config_path())
    doc: Any = {}
    source = "<defaults>"
    if file_path.exists() or explicit:
        doc = _read_yaml(file_path, "config file")
        source = str(file_path)
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise ConfigError(f"config file {file_path}: expected a mapping of keys, got {type(doc).__name__}")

    values: dict[str, Any] = {}
    for layer, origin in ((doc, f"in {file_path}"), (options or {}, "on the command line")):
        for key, value in layer.items():
            where = f"key '{key}' {origin}"
            if key in ALIASES:
                if parse_bool(value, where):
                    values["datapath"] = "ebpf"
                continue
            if key not in KEYS:
                raise _unknown(key, list(KEYS) + sorted(ALIASES), f"config {origin.removeprefix('in ')}")
            attr, parser = KEYS[key]
            values[attr] = parser(value, where)

    cfg = Config(**values, source=source)
    if cfg.enable_ip_masq_agent:
        cfg = dataclasses.replace(cfg, masq_agent=load_masq_agent(cfg.ip_masq_agent_config_path))
    return cfg
