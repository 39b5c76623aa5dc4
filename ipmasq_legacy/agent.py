"""One sync: config -> plan -> the chosen backend, shared by apply, reconcile and watch.

apply always makes the live state match; reconcile first reads the live state of what
we own (scoped, cheap) and does nothing, silently, when it matches.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

from . import backends, state
from . import plan as planmod
from .config import Config
from .errors import ApplyError

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


def sync(cfg: Config, only_if_drifted: bool = False) -> SyncResult:
    """Sync, and record it in the sync history (metrics read it): success with the
    kinds of drift repaired, or one more error."""
    try:
        result = _sync(cfg, only_if_drifted)
    except ApplyError:
        state.record_sync(ok=False)
        raise
    state.record_sync(ok=True, repairs=[drift_kind(d) for d in result.drift])
    return result


def _sync(cfg: Config, only_if_drifted: bool) -> SyncResult:
    started = time.monotonic()
    backend, why = backends.resolve(cfg.datapath)
    reason = backend.unavailable_reason()
    if reason:
        raise ApplyError(f"backend {backend.name} cannot run here: {reason}")
    the_plan = planmod.build(cfg)
    previous = state.read().get("backend")
    migrating = bool(previous) and previous != backend.name
    result = SyncResult(backend=backend.name, plan=the_plan)
    if only_if_drifted and not migrating:
        result.drift = backend.drift(the_plan)
        if not result.drift:
            result.duration = time.monotonic() - started
            return result
        for phrase in result.drift:
            log.warning("drift in %s: %s", backend.name, phrase)
    log.debug("backend %s (%s)", backend.name, why)
    result.changes = backend.apply(the_plan)
    # Migration: the new backend is live before the old one is removed.
    if migrating:
        removed = backends.get(previous).remove()
        result.changes.append(f"removed {previous} ({', '.join(removed) or 'nothing left'})")
    state.write(backend.name, "".join(f.digest() for f in the_plan.families))
    result.duration = time.monotonic() - started
    return result


def flush() -> list[str]:
    removed = []
    for backend in backends.all_backends():
        families = backend.remove()
        if families:
            removed.append(f"{backend.name} ({', '.join(families)})")
    state.clear()
    return removed
