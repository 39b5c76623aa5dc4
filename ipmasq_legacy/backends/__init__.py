"""Backend registry and selection: one module per backend, one small interface (base.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import kernel, netlink, ruledata, state
from ..errors import BackendUnavailable
from . import engines
from .registry import NAMES

if TYPE_CHECKING:
    from .base import Backend

# Each backend's module is imported when that backend is asked for: a run imports the
# one it uses (the iptables modules or the nftables ones: ~3-5 ms of CPU each).


def get(name: str) -> Backend:
    if name.startswith("iptables-"):
        from .iptables import IptablesBackend

        return IptablesBackend(name.removeprefix("iptables-"))
    if name == "nftables":
        from .nftables import NftablesBackend

        return NftablesBackend()
    if name == "ebpf":
        from .ebpf import EbpfBackend

        return EbpfBackend(another_live=lambda: _another_live("ebpf"))
    raise BackendUnavailable(f"backend {name!r} is not available in this version (known: {', '.join(NAMES)})")


def _another_live(but: str) -> bool:
    """Whether a backend other than `but` is available and installed here (ebpf's remove:
    then a switch, and its datapath drains its flows instead of dropping them)."""
    for name in NAMES:
        if name == but:
            continue
        try:
            backend = get(name)
            if backend.unavailable_reason() is None and backend.live().installed:
                return True
        except Exception:
            continue
    return False


def availability() -> dict[str, str | None]:
    """Each backend: None when it can run here, else the reason (doctor, and `auto`). The
    nftables backend also loads a table like ours (rules/nftables.yaml `probe`) through
    the driver apply would use (nftdriver.probe_table: the libnftables binding, itself run
    first in a child, or `nft -f -`) in a throw-away namespace; without the right to make
    one (no CAP_SYS_ADMIN) it is only checked, which commits nothing."""
    from . import selection
    from .nftdriver import probe_table

    result = {}
    for name in NAMES:
        reason = get(name).unavailable_reason()
        if reason is None and name == "nftables":
            reason = probe_table(selection.NFT_PROBE)
        result[name] = reason
    return result


def resolve(datapath: str, probe: bool = True, live: list[str] | None = None) -> tuple[Backend, str]:
    """(backend, why) for a configured datapath. `probe=False` reads nothing from the
    kernel (for `plan`, which needs no root): `auto` then trusts the state record, or
    names the backend a node with no rules would get (nftables). `live`: the engines of
    ours live in the kernel, when the caller has asked already (engines.live_engines)."""
    if datapath in NAMES:
        return get(datapath), "configured"
    if datapath == "iptables":
        from .iptables import IptablesBackend, detect_variant

        if not probe:
            return IptablesBackend("nft"), "iptables-nft assumed (plan probes nothing)"
        variant, why = detect_variant()
        return IptablesBackend(variant), why
    if datapath == "auto":
        try:
            recorded = state.read().get("backend")
        except state.StateDirError as exc:
            if probe:
                raise
            # plan needs no root: a record it may not read (0600) is said, not fatal
            return get("nftables"), f"auto on a node with no rules assumed: {exc}"
        if recorded in NAMES:
            return get(recorded), f"installed (recorded in {state.state_dir() / 'state.json'})"
        if not probe:
            return get("nftables"), "auto on a node with no rules (plan probes nothing)"
        from . import selection

        try:
            name, why = selection.choose_auto(availability, engines.live_engines() if live is None else live)
        except LookupError as exc:
            raise BackendUnavailable(str(exc)) from None
        return get(name), why
    return get(datapath), "configured"


def all_backends() -> list[Backend]:
    return [get(name) for name in NAMES]


def handover_pending(current: str) -> bool:
    """Cheap (one file test): does an earlier ebpf datapath still drain beside `current`?"""
    if current == "ebpf" or "ebpf" not in NAMES:
        return False
    return engines.ebpf_pin_dir().joinpath("ctl").exists()


def finish_handovers(current: str) -> list[str]:
    """After a sync with backend `current`: remove what an earlier backend still keeps
    alive for its own connections once they have ended (the ebpf datapath drains after a
    switch to netfilter). Cheap when there is nothing of the kind; meant for agent.sync."""
    if current == "ebpf" or "ebpf" not in NAMES:
        return []
    if kernel.current() is kernel.SYSTEM and not _ebpf_left():
        return []  # what reap would find first, asked without importing the ebpf package (~20 ms of CPU)
    from .ebpf import EbpfBackend

    return EbpfBackend().reap()


def _ebpf_left() -> bool:
    """On the real node: the ebpf datapath's pins or its netfilter drain tables are there
    (EbpfBackend.reap does nothing without either)."""
    if engines.ebpf_pin_dir().joinpath("ctl").exists():
        return True
    drain = ruledata.load("ebpf")["nft_tables"]["drain"]
    try:
        found = netlink.nft_tables([(family, drain["table"]) for family in drain["families"]])
    except OSError:
        return False  # nf_tables cannot be asked: reap finds no table either
    return any(attrs is not None for attrs in found.values())
