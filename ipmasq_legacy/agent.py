"""One sync: config -> plan -> the chosen backend, shared by apply, reconcile and watch.

apply always makes the live state match; reconcile first reads the live state of what
we own (scoped, cheap) and does nothing, silently, when it matches.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, backends, config, snat, state
from . import plan as planmod
from .backends import engines, tables
from .config import Config
from .errors import ApplyError, ConfigError, IpmasqError

log = logging.getLogger("ipmasq")


@dataclass
class SyncResult:
    backend: str
    changes: list[str] = field(default_factory=list)  # what apply changed, one phrase each
    drift: list[str] = field(default_factory=list)  # what reconcile found drifted
    duration: float = 0.0
    plan: planmod.Plan | None = None

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def drift_kind(phrase: str) -> str:
    """'ipv4: 2 jumps from POSTROUTING instead of 1' -> 'N jumps from POSTROUTING instead of N'."""
    return re.sub(r"\d+", "N", re.sub(r"^ipv[46]: ", "", phrase))


def note_warnings(cfg: Config, only_new: bool) -> None:
    """Log the config's warnings (unknown or ignored keys, differences from ip-masq-agent
    and Cilium) and keep them for `status` and the metric. `only_new`: those the last
    sync did not see already, so that cron's reconcile says each once, not every minute."""
    known = state.read_warnings()
    for warning in cfg.warnings:
        if not (only_new and list(warning) in known):
            log.warning("%s", warning.text)
    if known != [list(w) for w in cfg.warnings]:
        state.write_warnings(list(cfg.warnings))


def sync(cfg: Config, only_if_drifted: bool = False) -> SyncResult:
    """Sync, and record it in the sync history (metrics read it): success with the
    kinds of drift repaired, or one more error."""
    note_warnings(cfg, only_new=only_if_drifted)
    try:
        result = _sync(cfg, only_if_drifted)
    except ApplyError:
        state.record_sync(ok=False)
        raise
    state.record_sync(ok=True, repairs=[drift_kind(d) for d in result.drift])
    return result


def _sync(cfg: Config, only_if_drifted: bool) -> SyncResult:
    started = time.monotonic()
    recorded = state.read().get("backend")
    live = engines.live_engines()  # from the kernel: the record may be gone while rules stay
    backend, why = backends.resolve(cfg.datapath, live=live)
    reason = backend.unavailable_reason()
    if reason:
        raise ApplyError(f"backend {backend.name} cannot run here: {reason}")
    the_plan = planmod.build(cfg)
    # egress-masquerade-addresses not on their links: apply refuses before anything changes;
    # reconcile keeps (or repairs) the rules with the configured address and reports it
    # (snat.py says why it never falls back)
    gone = snat.missing(snat.pairs(the_plan))
    if gone and not only_if_drifted:
        raise ConfigError("; ".join(gone) + ": add the address to the link, or change the config")
    digest = "".join(f.digest() for f in the_plan.families)
    exempt = {family: len(fp.exempt) if fp else 0 for family, fp in backend.wanted_families(the_plan).items()}
    others = [name for name in live if name != backend.name]
    previous = recorded
    if previous is None and others:
        # No record, yet engines of ours are live (a wiped /run): rebuild the record from
        # the kernel before anything changes, so that what follows is an ordinary
        # migration (ebpf, for one, keeps a netfilter backend's connections NATed then).
        previous = others[0]
        state.write(previous, "")
    migrating = bool(previous) and previous != backend.name
    result = SyncResult(backend=backend.name, plan=the_plan)
    if only_if_drifted:
        result.drift = engines.second_engines(live, backend.name, replaced=recorded) + gone
        if not migrating:
            result.drift += backend.drift(the_plan)
            if not result.drift:
                if recorded != backend.name:
                    state.write(backend.name, digest, exempt)  # the record was lost; the kernel said what is there
                result.duration = time.monotonic() - started
                return result
        for phrase in result.drift:
            log.warning("drift in %s: %s", backend.name, phrase)
    log.debug("backend %s (%s)", backend.name, why)
    tables.note_before_first_apply()  # so that flush can delete the empty tables we made
    result.changes = backend.apply(the_plan)
    # Migration: the new backend is live before the old one, and every other engine of
    # ours the kernel holds, is removed.
    for name in ([previous] if previous and migrating else []) + [n for n in others if n != previous]:
        removed = backends.get(name).remove()
        result.changes.append(f"removed {name} ({', '.join(removed) or 'nothing left'})")
    state.write(backend.name, digest, exempt)
    # An earlier backend kept alive for its own connections (ebpf draining after a switch)
    # goes once they have ended.
    result.changes += [f"finished handover: {what}" for what in backends.finish_handovers(backend.name)]
    result.duration = time.monotonic() - started
    if gone:
        raise ApplyError("; ".join(gone) + ": packets leaving it are still translated to that address, never "
                         "the pod's; add the address back, or change the config")
    return result


# ---------------------------------------------------------------- reconcile, cheaply
# A no-op reconcile must stay cheap at 100,000 prefixes, where parsing the config and
# planning alone cost a second. So a reconcile that found everything in sync records what
# it was fed (the bytes of the config and ip-masq-agent files, the options, the version)
# and the backend's fingerprint of the kernel state; the next one that finds all of them
# unchanged is done before it parses anything.

VERIFIED = "verified.json"
# Where a backend's fingerprint does not see everything its full check reads (iptables:
# the ipsets' headers, not their members; backends/ipsets.py), every DEEP_EVERY-th
# reconcile takes the full way although nothing it can see changed.
DEEP_EVERY = 10


def _file_digest(path: str) -> str:
    try:
        if Path(path).is_dir():  # a ConfigMap mounted whole: every key's file
            return config.directory_digest(Path(path))
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return "missing"
    except IpmasqError as exc:
        return f"unreadable: {exc}"
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def _inputs(cfg: Config, config_path: str | None, options: dict) -> dict:
    files = [config_path or config.default_config_path()]
    if cfg.enable_ip_masq_agent and not cfg.ip_masq_agent_inline:
        files.append(str(config.agent_file(cfg.ip_masq_agent_config_path)))
    return {"version": __version__, "options": options, "files": {f: _file_digest(f) for f in files}}


def unchanged_since_verified(config_path: str | None, options: dict, live: list[str] | None = None) -> bool:
    """The quick path's test (reconcile's, and status's): the inputs and the kernel state
    are what the last reconcile that found everything in sync saw. `live`: the engines
    of ours the kernel holds, when the caller asked already."""
    record = state.read_json(VERIFIED)
    if not _same_inputs(record, config_path, options):
        return False
    if snat.missing(record.get("snat", [])):  # an address of the node's is no file's bytes
        return False
    if record.get("backend") != state.read().get("backend") or record.get("backend") not in backends.NAMES:
        return False
    if backends.handover_pending(record["backend"]):
        return False  # a drained datapath waits for a full sync to remove it
    backend = backends.get(record["backend"])
    if getattr(backend, "fingerprint_partial", False) and record.get("quick", 0) >= DEEP_EVERY - 1:
        return False
    now = backend.fingerprint()
    if now is None or now != record.get("kernel"):
        return False
    # A backend's fingerprint sees only its own objects: a second engine added since (an
    # ebpf filter beside nftables, a legacy chain beside iptables-nft) is asked for apart.
    return set(engines.live_engines() if live is None else live) <= {record["backend"]}


def _same_inputs(record: dict, config_path: str | None, options: dict) -> bool:
    """`record` (_inputs' and the config path) was taken of the inputs as they are now."""
    if not record or record.get("version") != __version__ or record.get("options") != options:
        return False
    if record.get("config_path") != (config_path or config.default_config_path()):
        return False
    return not any(_file_digest(f) != d for f, d in record.get("files", {}).items())


# What the config the last verifying reconcile read makes, kept for `status` (cron's steady
# state): at 100,000 prefixes reading and planning it again is ~0.15 s of CPU, half of
# status's budget (0.3 s), and loading this ~15 ms. It depends on the inputs alone (the
# files' bytes, the options, the version), and is used only while they are unchanged.
CONFIG_CACHE = "verified-config.json"


def _cache_config(cfg: Config, the_plan: planmod.Plan, inputs: dict, config_path: str) -> None:
    s = summary(cfg)
    state.write_json(CONFIG_CACHE, {**inputs, "config_path": config_path, "plan": planmod.to_record(the_plan),
                                    "config": {"datapath": s.datapath, "shape": s.shape, "source": s.source,
                                               "ip_masq_agent": s.ip_masq_agent,
                                               "warnings": [list(w) for w in s.warnings]}})


@dataclass(frozen=True)
class ConfigSummary:
    """What `status` shows of a Config (CONFIG_CACHE)."""

    datapath: str
    shape: str
    source: str
    ip_masq_agent: str | None  # where the ip-masq-agent settings came from, when they apply
    warnings: tuple


def summary(cfg: Config) -> ConfigSummary:
    agent = cfg.masq_agent.source if cfg.enable_ip_masq_agent and cfg.masq_agent is not None else None
    return ConfigSummary(cfg.datapath, cfg.shape, cfg.source, agent, tuple(cfg.warnings))


def cached_config(config_path: str | None, options: dict) -> tuple[ConfigSummary, planmod.Plan] | None:
    """(the config's summary, its plan) as the last verifying reconcile made them, where
    the inputs are unchanged since; else None (then the config is read)."""
    record = state.read_json(CONFIG_CACHE)
    if not _same_inputs(record, config_path, options):
        return None
    try:
        summary = record["config"]
        warnings = tuple(config.ConfigWarning(kind, text) for kind, text in summary["warnings"])
        return (ConfigSummary(summary["datapath"], summary["shape"], summary["source"], summary["ip_masq_agent"],
                              warnings), planmod.from_record(record["plan"]))
    except (KeyError, TypeError, ValueError):
        return None  # not a record of this version's: read the config


def reconcile(config_path: str | None, options: dict, missing_ok: bool | None = None) -> SyncResult | None:
    """Repair drift; None when the inputs and the kernel state are unchanged since the
    last reconcile that found everything in sync (nothing was parsed or read in full).
    `config_path` and `options` are the source to repair toward (source.for_follow)."""
    if unchanged_since_verified(config_path, options):
        log.debug("in sync: config files and kernel state unchanged since the last verified reconcile")
        verified = state.read_json(VERIFIED)
        state.write_json(VERIFIED, {**verified, "quick": verified.get("quick", 0) + 1})
        state.record_sync(ok=True)
        return None
    cfg = config.load(config_path, options, missing_ok=missing_ok)
    recorded = state.read().get("backend")
    before = backends.get(recorded).fingerprint() if recorded in backends.NAMES else None
    result = sync(cfg, only_if_drifted=True)
    if not result.drift and not result.changes and before is not None and result.backend == recorded:
        # The fingerprint was taken before the full read: a change made during it is seen next time.
        inputs = _inputs(cfg, config_path, options)
        state.write_json(VERIFIED, {**inputs, "backend": recorded, "kernel": before,
                                    "config_path": config_path or config.default_config_path(),
                                    "snat": snat.pairs(result.plan) if result.plan is not None else []})
        if result.plan is not None:
            _cache_config(cfg, result.plan, inputs, config_path or config.default_config_path())
    return result


def flush() -> list[str]:
    removed = []
    for backend in backends.all_backends():
        families = backend.remove()
        if families:
            removed.append(f"{backend.name} ({', '.join(families)})")
    gone = tables.remove_created()
    if gone:
        removed.append("empty tables our applies created (" + ", ".join(gone) + ")")
    state.clear()
    return removed
