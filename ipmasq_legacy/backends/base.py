"""The one small interface every backend implements, and the command runner they share.

A backend has four verbs: render (pure text from a plan), apply (one transaction per
family), live (read back only what it owns) and remove. `available` says why not.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .. import kernel
from ..plan import FamilyPlan, Plan

FAMILIES = (4, 6)


@dataclass
class RuleCounter:
    family: int
    rule: str  # the rule as the backend prints it
    interface: str  # out-interface it matches ("" = any but lo)
    packets: int
    bytes: int


@dataclass
class FamilyLive:
    """What the backend found installed for one family, in its canonical text."""

    family: int
    installed: bool
    rules: list[str] = field(default_factory=list)
    exempt: tuple[str, ...] = ()
    counters: list[RuleCounter] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # drift found while reading


F = TypeVar("F", bound=FamilyLive)  # a backend's own FamilyLive, with what only it reads


@dataclass
class Live(Generic[F]):
    backend: str
    families: dict[int, F]

    @property
    def installed(self) -> bool:
        return any(f.installed for f in self.families.values())


def run(argv: list[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a tool through the current kernel seam (kernel.py); a failure becomes an
    ApplyError naming the tool and its first error line."""
    return kernel.current().run(argv, input=input, check=check)


def missing_tools(*names: str) -> list[str]:
    return [n for n in names if kernel.current().which(n) is None]


class Backend(Generic[F]):
    name = "base"

    def unavailable_reason(self) -> str | None:
        """None when this node can run the backend, else why not (for doctor and errors)."""
        raise NotImplementedError

    def render(self, plan: Plan) -> str:
        """The backend's own input text for the plan: what `plan` prints. No I/O."""
        raise NotImplementedError

    def apply(self, plan: Plan) -> list[str]:
        """Make the live state match the plan, one transaction per family.
        Returns what changed, one phrase per family touched; empty when in sync."""
        raise NotImplementedError

    def live(self) -> Live[F]:
        raise NotImplementedError

    def remove(self) -> list[str]:
        """Remove everything this backend owns; returns what was removed."""
        raise NotImplementedError

    def counters(self, plan: Plan | None = None) -> list[RuleCounter]:
        """The packet counters of our masquerade rules, and nothing else: what a metrics
        scrape and status read (never the exempt set's members, which live() lists).
        `plan`: one the caller knows is installed (its rules' texts may name the
        counters). This default reads everything; backends override it cheaply."""
        return [c for f in self.live().families.values() for c in f.counters]

    def follow(self, plan: Plan) -> list[str]:
        """After a link or an address came or went (watch): bring what depends on the
        node's links up to date. Netfilter decides at packet time: nothing to do."""
        return []

    def fingerprint(self) -> str | None:
        """A cheap digest of what this backend owns, as the kernel holds it now (counters
        left out); None where there is no cheap way. reconcile trusts an unchanged one."""
        return None

    def drift(self, plan: Plan, live: Live[F] | None = None) -> list[str]:
        """What differs between the plan and the live state, one phrase each ('ipv4: ...');
        empty = in sync. Backends that read per family implement family_drift."""
        live = live or self.live()
        out = []
        for family, fp in self.wanted_families(plan).items():
            out += [f"ipv{family}: {p}" for p in self.family_drift(fp, live.families[family])]
        return out

    def family_drift(self, fp: FamilyPlan | None, live: F) -> list[str]:
        raise NotImplementedError

    @staticmethod
    def wanted_families(plan: Plan) -> dict[int, FamilyPlan | None]:
        """Every family, with None for those the plan disables (their objects must go)."""
        return {family: plan.family(family) for family in FAMILIES}
