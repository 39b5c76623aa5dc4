"""Where the config comes from: what apply installed, and what the later commands read.

`apply` (and `watch`, which applies) records the source it installed in the state dir
(`source.json`): the file or directory, whether it existed, the command-line options, the
ip-masq-agent file. `reconcile`, `status`, `list` and `watch` without `--config` (and
without $IPMASQ_CONFIG) read that source, so cron's plain `ipmasq reconcile` repairs
toward what was applied instead of reading the default path (docs/spec.md section 5: never
silently the defaults). Given a different config, they use it and say so in one line.

A missing default config means "all defaults" (docs/spec.md section 1) only where that is what
was applied, or where nothing of ours is installed: on a node where something was applied
from another file, or where rules of ours are live without a record (a wiped /run), it
is an error asking for --config.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from . import config, state
from .errors import ConfigError


class SourceUnknown(ConfigError):
    """No config given, none recorded, the default missing, yet something is installed."""


@dataclass(frozen=True)
class Source:
    path: str  # absolute: a file, or a ConfigMap directory
    options: dict  # command-line config options
    missing_ok: bool  # the path's absence means all defaults
    recorded: dict = field(default_factory=dict)  # apply's record ({} when none)
    note: str | None = None  # one line: how this differs from what apply installed

    def load(self) -> config.Config:
        return config.load(self.path, self.options, missing_ok=self.missing_ok)


def describe(path: str, options: dict) -> str:
    return " ".join([path] + [f"--{key} {value}" for key, value in sorted(options.items())])


def _given(config_path: str | None) -> str | None:
    return config_path if config_path is not None else (os.environ.get("IPMASQ_CONFIG") or None)


def _default_missing(path: str, recorded: dict) -> None:
    """The default config is missing: all defaults, unless that would change what is installed."""
    if recorded.get("path") and (recorded["path"] != path or recorded.get("existed")):
        raise SourceUnknown(f"config file {path}: no such file, and the last apply installed "
                            f"{describe(recorded['path'], recorded.get('options', {}))}: give --config "
                            "(a missing default config is not read as all defaults where something else was applied)")
    if not recorded:
        from .backends import engines  # only here: it asks the kernel

        live = engines.live_engines()
        if live:
            raise SourceUnknown(f"config file {path}: no such file, no apply is recorded in {state.state_dir()}, and "
                                f"{', '.join(live)} of ours is installed: give --config (a missing default config is "
                                "not read as all defaults where something is installed)")


def for_apply(config_path: str | None, options: dict) -> Source:
    """apply: the config given, else the default path."""
    recorded = state.read_source()
    given = _given(config_path)
    if given is not None:
        return Source(os.path.abspath(given), dict(options), False, recorded)
    path = os.path.abspath(config.default_config_path())
    if not os.path.exists(path):
        _default_missing(path, recorded)
    return Source(path, dict(options), True, recorded)


def for_follow(config_path: str | None, options: dict) -> Source:
    """reconcile, status, list, watch: the config given, else the one apply recorded.
    Options given are laid over the recorded ones when the file is the recorded one."""
    recorded = state.read_source()
    given = _given(config_path)
    rec_path, rec_options = recorded.get("path"), recorded.get("options") or {}
    if given is not None:
        path = os.path.abspath(given)
        merged = {**rec_options, **options} if path == rec_path else dict(options)
        source = Source(path, merged, False, recorded)
    elif rec_path:
        missing_ok = not recorded.get("existed", True)
        if not missing_ok and not os.path.exists(rec_path):
            raise ConfigError(f"config {rec_path}, which the last apply installed (recorded in "
                              f"{state.state_dir() / state.SOURCE}), is gone: give --config, or apply again")
        source = Source(rec_path, {**rec_options, **options}, missing_ok, recorded)
    else:
        path = os.path.abspath(config.default_config_path())
        if not os.path.exists(path):
            _default_missing(path, recorded)
        return Source(path, dict(options), True, recorded)
    if rec_path and (source.path, source.options) != (rec_path, rec_options):
        note = (f"config {describe(source.path, source.options)} differs from what apply installed "
                f"({describe(rec_path, rec_options)}); using {source.path}")
        source = Source(source.path, source.options, source.missing_ok, recorded, note)
    return source


def record(source: Source, cfg: config.Config | None) -> None:
    """Record `source` as what is installed (apply, watch; reconcile where none is recorded)."""
    agent = None
    if cfg is not None and cfg.enable_ip_masq_agent:
        agent = "inline" if cfg.ip_masq_agent_inline else cfg.ip_masq_agent_config_path
    data = {"path": source.path, "existed": os.path.exists(source.path), "options": source.options,
            "shape": cfg.shape if cfg is not None else None, "ip_masq_agent_config": agent}
    previous = {k: v for k, v in state.read_source().items() if k != "recorded_at"}
    if previous != data:
        state.write_source({**data, "recorded_at": time.time()})
