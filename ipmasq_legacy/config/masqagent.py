"""The ip-masq-agent file (docs/spec.md section 2), read as ip-masq-agent v2 reads it.

The agent turns the YAML into JSON and decodes it with Go's encoding/json into a struct
that already holds the defaults: keys match its fields case-insensitively, a key it does
not know is ignored, a key left out keeps its default, `null` leaves a field as it was,
and of two spellings of one field the one decoded last wins. That is followed here, with
two differences the README's compatibility table lists: unknown keys are warned about
(ip-masq-agent issue #53: users put `enable-ipv6` in this file and nothing said it did
nothing), and where the agent refuses a value this tool can read unambiguously (a number
of seconds, the string "true", more entries than cidrLimit, IPv6 entries) it is applied
with a warning.

The same parser reads Cilium's inline `ipMasqAgent.config` (config/cilium.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import inputs, prefixes
from ..errors import ConfigError
from ..ruledata import DEFAULTS
from . import text
from . import values as v
from .values import ConfigWarning, _show, parse_bool, parse_go_duration

MASQ_AGENT_KEYS = ("nonMasqueradeCIDRs", "masqLinkLocal", "masqLinkLocalIPv6", "resyncInterval", "cidrLimit")
AGENT_CIDR_LIMIT = 64  # the agent's default cidrLimit
AGENT_KEY = "config"  # the ConfigMap key ip-masq-agent reads its settings from
WHAT = "ip-masq-agent config"  # how errors name the file
MIN_RESYNC = 1.0  # seconds: the agent resyncs back to back at 0s or less; this tool once a second


@dataclass(frozen=True)
class MasqAgentConfig:
    """ip-masq-agent's ConfigMap `config` key, as its users write it."""

    non_masquerade_cidrs: tuple = ()
    masq_link_local: bool = False
    masq_link_local_ipv6: bool = False
    resync_interval: float = 60.0
    cidr_limit: int | None = None
    source: str = "<defaults>"
    warnings: tuple = ()  # ConfigWarnings


def default_ranges() -> tuple:
    return tuple(prefixes.parse(c) for c in DEFAULTS["non_masquerade_cidrs"])


def _go_fold(key: str) -> str:
    """Go's encoding/json matches a key to a field with bytes.EqualFold: ASCII case, plus
    the two letters whose Unicode case orbit reaches an ASCII one (long s, Kelvin sign)."""
    return key.replace("\u017f", "s").replace("\u212a", "k").lower()


_FIELDS = {_go_fold(name): name for name in MASQ_AGENT_KEYS}


def agent_file(path_text: str | Path, strict: bool = False) -> Path:
    """The file the ip-masq-agent settings are read from: `path/config` where the path is a
    directory (a ConfigMap mounted without `items:` holds each key as a file), else the
    path itself. The one spelling of that rule for the loader, reconcile's input digests
    (agent.py) and the files watch follows (watch.py).

    strict (the loader): a path that cannot be looked at (a symlink loop, no permission)
    is a ConfigError, as the agent's os.Stat fails, and so is a directory without a
    `config` file. Otherwise such a path is returned as it is, for its reader to report."""
    path = Path(path_text)
    try:
        kind = inputs.path_kind(path, WHAT)
    except ConfigError:
        if strict:
            raise
        return path
    if kind != "dir":
        return path
    if strict and inputs.path_kind(path / AGENT_KEY, WHAT) == "missing":
        raise ConfigError(f"{WHAT} {inputs.show_path(path)}: a directory without a '{AGENT_KEY}' file (a ConfigMap "
                          "mounted with another key, or the wrong directory?)")
    return path / AGENT_KEY


def load_masq_agent(path_text: str, reader: str = "ip-masq-agent") -> MasqAgentConfig:
    """Missing, empty or comment-only file: the eleven default ranges (docs/spec.md section 2).
    `reader` is who else reads this file on such a node ("cilium" when the config came
    from Cilium's documents): their differences are warned about."""
    what = WHAT
    path = agent_file(path_text, strict=True)
    # As the agent: only a path that is not there (ENOENT) means the defaults; a symlink
    # loop, a path through a file, no permission are errors (its os.Stat, then ReadFile).
    if inputs.path_kind(path, what) == "missing":
        return MasqAgentConfig(non_masquerade_cidrs=default_ranges(), source=f"{path} (missing: defaults)")
    label = f"{what} {inputs.show_path(path)}"
    raw = text.read_text(path, what)
    twice: list[str] = []
    doc = text._parse_text(raw, label, duplicates=twice)
    notes = [ConfigWarning("no-effect", f"{label}: {phrase}: the last one counts, as in ip-masq-agent")
             for phrase in twice]
    # ip-masq-agent hands text starting with '{' to the JSON decoder as it is
    as_json = raw.lstrip().startswith("{")
    if as_json:
        try:
            json.loads(raw)
        except ValueError:
            notes.append(ConfigWarning("agent-difference", f"{label}: starts with '{{' but is not JSON: read as YAML "
                                       "here; ip-masq-agent refuses it"))
    if doc is None:
        return MasqAgentConfig(non_masquerade_cidrs=default_ranges(), source=f"{path} (empty: defaults)",
                               warnings=tuple(notes))
    cfg = from_document(doc, label, str(path), json_order=as_json, reader=reader)
    return dataclasses.replace(cfg, warnings=tuple(notes) + cfg.warnings)


def from_document(doc: Any, label: str, source: str, json_order: bool = False,
                  reader: str = "ip-masq-agent") -> MasqAgentConfig:
    """A parsed ip-masq-agent document -> MasqAgentConfig. `json_order`: the keys are met in
    document order (JSON text); else in byte order, as the agent's YAML-to-JSON step sorts them."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{label}: expected a mapping of keys, got {type(doc).__name__}")
    keys = list(doc) if json_order else sorted(doc, key=lambda k: str(k).encode("utf-8", "surrogatepass"))
    given: dict[str, tuple[Any, Any]] = {}  # field -> (key as written, value); the last one decoded wins
    unknown, twice, notes = [], [], []
    for key in keys:
        field = _FIELDS.get(_go_fold(str(key)))
        if field is None:
            unknown.append(str(key))
            continue
        if field in given:
            twice.append(f"{_show(given[field][0])} and {_show(key)}")
        given[field] = (key, doc[key])
    if unknown:
        import difflib  # only for an unknown key: not on every run's imports

        hints = [f"{_show(k)} (did you mean {m[0]!r}?)"
                 if (m := difflib.get_close_matches(k[:100], MASQ_AGENT_KEYS, 1, 0.6)) else _show(k)
                 for k in unknown[:10]] + ([f"(+{len(unknown) - 10} more)"] if len(unknown) > 10 else [])
        notes.append(ConfigWarning("unknown-key", f"{label}: unknown key{'s' if len(unknown) > 1 else ''} "
                                   f"{', '.join(hints)} ignored, as ip-masq-agent ignores them"))
    if twice:
        notes.append(ConfigWarning("agent-difference", f"{label}: {'; '.join(twice)} name one key: the last "
                                   "in the agent's decoding order counts, as in ip-masq-agent"))

    values: dict[str, Any] = {"source": source}
    for field, (key, value) in given.items():
        where = f"key {str(key)!r} in {label}"
        if field == "nonMasqueradeCIDRs":
            if value is not None and not isinstance(value, list):
                raise ConfigError(f"{where}: expected a list of CIDRs, got {_show(value)}")
            values["non_masquerade_cidrs"] = v.parse_networks(value or [], where)
            limit = given.get("cidrLimit", (None, None))[1]
            limit = AGENT_CIDR_LIMIT if limit is None else limit
            count = len(value) if isinstance(value, list) else 0
            if reader == "ip-masq-agent" and isinstance(limit, (int, float)) and count > limit:
                notes.append(ConfigWarning("agent-difference", f"{where}: {count} entries, more than cidrLimit "
                                           f"{limit}: applied here; ip-masq-agent refuses the file"))
            v6 = [str(p) for p in values["non_masquerade_cidrs"] if p.version == 6]
            if v6 and reader == "ip-masq-agent":
                shown = ", ".join(v6[:3]) + (f" (+{len(v6) - 3} more)" if len(v6) > 3 else "")
                notes.append(ConfigWarning("agent-difference", f"{where}: IPv6 entries {shown}: applied here; "
                                           "ip-masq-agent refuses them unless run with --enable-ipv6"))
        elif field in ("masqLinkLocal", "masqLinkLocalIPv6"):
            attr = "masq_link_local" if field == "masqLinkLocal" else "masq_link_local_ipv6"
            if value is None:  # Go leaves the field as it was
                continue
            if not isinstance(value, (bool, str)):
                raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
            values[attr] = parse_bool(value, where)
            if isinstance(value, str):
                notes.append(ConfigWarning("agent-difference", f"{where}: the string {_show(value)} read as "
                                           f"{str(values[attr]).lower()}; ip-masq-agent refuses a string here"))
        elif field == "resyncInterval":
            values["resync_interval"] = _resync(value, where, notes)
        elif field == "cidrLimit":
            if value is None:
                continue
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # YAML 64.0 reaches the agent as the JSON number 64
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}: expected a non-negative integer, got {_show(value)}")
            values["cidr_limit"] = value
    if "non_masquerade_cidrs" not in values:
        # A file that sets other keys but not nonMasqueradeCIDRs keeps the default ranges,
        # as ip-masq-agent does; `nonMasqueradeCIDRs: []` written out means none.
        values["non_masquerade_cidrs"] = default_ranges()
        if reader == "cilium" and given:
            notes.append(ConfigWarning("cilium-difference", f"{label}: no nonMasqueradeCIDRs: the eleven default "
                                       "ranges stay exempt here, as in ip-masq-agent; Cilium's ip-masq-agent "
                                       "exempts none of them once its file is not empty"))
    return MasqAgentConfig(**values, warnings=tuple(notes))


def _resync(value: Any, where: str, notes: list) -> float:
    if isinstance(value, str):
        seconds = parse_go_duration(value)
        if seconds is None:
            raise ConfigError(f"{where}: {_show(value)} is not a duration like 60s or 1m30s")
        if seconds < MIN_RESYNC:
            notes.append(ConfigWarning("agent-difference", f"{where}: {_show(value)}: resyncing every "
                                       f"{MIN_RESYNC:g}s here (ip-masq-agent resyncs back to back)"))
            seconds = MIN_RESYNC
        return seconds
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        notes.append(ConfigWarning("agent-difference", f"{where}: the number {_show(value)} read as {value:g}s; "
                                   "ip-masq-agent refuses a duration without a unit"))
        return max(float(value), MIN_RESYNC)
    raise ConfigError(f"{where}: {_show(value)} is not a duration like 60s or 1m30s")
