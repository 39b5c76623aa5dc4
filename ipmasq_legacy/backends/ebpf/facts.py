"""The backend's state as it travels between its verbs: what one read of the kernel found
(EbpfFacts), what a plan wants of the maps (EbpfDesired), and the answer of live(), which
carries its facts on to drift (EbpfLive), so that `status` reads the node once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...plan import FamilyPlan
from ..base import FamilyLive, Live
from .layout import CFG, F_DRAIN
from .links import Link
from .maps import Generation

# Our filters on one link: hook -> [(filter name, program id)], in the kernel's order.
Hooks = dict[str, list[tuple[Optional[str], Optional[int]]]]  # (Optional: evaluated, and Python 3.9)


@dataclass
class EbpfFacts:
    """One read of the node (EbpfBackend._read): its links, our filters on them, and,
    when the maps are pinned (installed), the live generation, its config and the
    interface entries."""

    links: dict[int, Link]
    attached: dict[int, Hooks] = field(default_factory=dict)  # links with a filter of ours
    ifaces: dict[int, bytes] = field(default_factory=dict)  # ipmq_ifaces: ifindex -> struct iface
    installed: bool = False
    gen: int = 0  # the live generation
    cfg: bytes = b""  # its ipmq_cfg value (layout.CFG)
    # Tries of the live generation live() read already (maps.Pinned.generation), by map
    # name: drift compares them instead of reading them again.
    generations: dict[str, Generation] = field(default_factory=dict)

    @property
    def flags(self) -> int:
        """The live config's flags (layout.F_*); 0 when nothing is installed."""
        return CFG.unpack(self.cfg)[0] if self.installed else 0

    @property
    def draining(self) -> bool:
        return bool(self.flags & F_DRAIN)


@dataclass
class EbpfDesired:
    """What a plan wants of the maps (EbpfBackend._desired), on the node `facts` read."""

    families: dict[int, FamilyPlan | None]  # None: the family disabled
    ports: list[int]  # translated source ports (encode.translated_ports)
    cfg: bytes  # the ipmq_cfg value (encode.cfg_value)
    matched: dict[int, Link]  # the links the programs belong on
    local: dict[int, list[bytes]]  # family -> the node's addresses, packed and sorted (ipmq_local4/6)
    fast: bool = False  # ebpf-conntrack: false (keeper.py notrack table instead of the keeper)
    interfaces: tuple[str, ...] = ()  # the plan's egress-masquerade-interfaces (the notrack table's patterns)


@dataclass
class EbpfFamilyLive(FamilyLive):
    attached: dict[str, Hooks] = field(default_factory=dict)  # link name -> hook -> [(filter name, program id)]


@dataclass
class EbpfLive(Live):
    facts: EbpfFacts | None = field(default=None, repr=False, compare=False)
