"""Backend registry and selection: one module per backend, one small interface (base.py)."""

from __future__ import annotations

from .. import state
from ..errors import BackendUnavailable
from .base import Backend
from .iptables import IptablesBackend, detect_variant

NAMES = ("iptables-legacy", "iptables-nft")


def get(name: str) -> Backend:
    if name.startswith("iptables-"):
        return IptablesBackend(name.removeprefix("iptables-"))
    raise BackendUnavailable(f"backend {name!r} is not available in this version (known: {', '.join(NAMES)})")


def resolve(datapath: str, probe: bool = True) -> tuple[Backend, str]:
    """(backend, why) for a configured datapath. `probe=False` reads nothing from the
    kernel (for `plan`, which needs no root): it then trusts the state record or defaults."""
    if datapath in NAMES:
        return get(datapath), "configured"
    if datapath == "iptables":
        if probe:
            variant, why = detect_variant()
            return IptablesBackend(variant), why
        return IptablesBackend("nft"), "not probed (plan reads nothing); iptables-nft assumed"
    if datapath == "auto":
        recorded = state.read().get("backend")
        if recorded in NAMES:
            return get(recorded), f"recorded in {state.state_dir()}"
        if probe:
            variant, why = detect_variant()
            return IptablesBackend(variant), why
        return IptablesBackend("nft"), "not probed (plan reads nothing); iptables-nft assumed"
    return get(datapath), "configured"


def all_backends() -> list[Backend]:
    return [get(name) for name in NAMES]
