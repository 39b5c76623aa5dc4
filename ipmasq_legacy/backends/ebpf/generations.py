"""The decision's two generations in the maps: one generation read back (a thread per
map: bpf(2) lets go of the GIL) and compared with the plan, or made to hold it by
writing only what differs; what the last apply noted of the tries for the next reads."""

from __future__ import annotations

import array
import struct
from typing import TYPE_CHECKING

from ... import state
from ...plan import FamilyPlan
from ..base import FAMILIES
from .encode import lpm_key_list, noted_count, port_tables, seek_keys, trie_diff
from .layout import LPM
from .maps import Background, Generation, Pinned, trie_notes
from .names import PORTS, TRIE_NOTES, TRIE_VALUE, TRIES, pin_dir, pin_name

if TYPE_CHECKING:
    from .facts import EbpfDesired


def generation_problems(pinned: Pinned, gen: int, desired: EbpfDesired, tries: bool, ports: bool,
                        known: dict[str, Generation] | None = None) -> list[str]:
    """One generation against the plan: each trie key for key (values too; read
    alone, Pinned.generation), the port tables entry for entry. `known`: tries of
    generation `gen` read already (live()), compared as they were read."""
    known = known or {}
    wanted = wanted_tries(desired.families) if tries else []
    port_thread, held = read_back(pinned, gen, [w for w in wanted if w[0] not in known], trie_notes(), ports)
    try:
        wants = {name: lpm_key_list(family, gen, prefixes) for name, _kind, family, prefixes in wanted}
        tables = port_tables(desired.ports) if ports else ()
    finally:
        for thread in (port_thread, *held.values()):
            if thread is not None:
                thread.join()
    out = []
    for name, kind, family, _prefixes in wanted:
        have, wrong, covering = known[name] if name in known else held[name].result()
        if any(trie_diff(wants[name], have, LPM[family].size)) or wrong or covering:
            out.append(f"ipv{family}: {kind} prefixes in map {pin_name(name)} differ")
    if port_thread is not None:
        for name, have, want in zip(("ipmq_ports", "ipmq_portidx"), port_thread.result(), tables):
            if have != want:
                out.append(f"map {pin_name(name)} differs")
    return out


def wanted_tries(families: dict[int, FamilyPlan | None]) -> list[tuple[str, str, int, tuple[str, ...]]]:
    """(map, kind, family, prefixes) of each trie."""
    return [(TRIES[kind][family], kind, family, getattr(families[family], kind) if families[family] else ())
            for family in FAMILIES for kind in ("exempt", "sources")]


def read_back(pinned: Pinned, gen: int, wanted, notes: dict, ports: bool = True):
    """Generation `gen` read back in the background, a thread per map (bpf(2) lets go
    of the GIL: the kernel reads while Python computes what the plan wants): the
    port tables (a Background of [ports, portidx], or None) and each trie of
    `wanted` (wanted_tries) ({map: a Background of Pinned.generation}). The caller
    joins them all before the maps may close."""
    for name in [w[0] for w in wanted] + (["ipmq_ports", "ipmq_portidx"] if ports else []):
        pinned.fd(name)  # opened here: the threads only use them
    reads = [(name, seek_keys(name, gen, notes, prefixes), len(prefixes)) for name, _kind, _family, prefixes in wanted]
    port_thread = Background(read_ports, pinned, gen) if ports else None
    held = {name: Background(pinned.generation, name, gen, seek, expect) for name, seek, expect in reads}
    return port_thread, held


def write_generation(pinned: Pinned, gen: int, desired: EbpfDesired, notes: dict) -> None:
    """Make generation `gen` (never the live one) what `desired` plans, reading back
    what it holds (read_back) and writing only what differs: the port tables, the
    four tries (batch deletes, then batch inserts), then its cfg, last since it
    names what the tries hold."""
    wanted = wanted_tries(desired.families)
    ports, held = read_back(pinned, gen, wanted, notes)
    try:
        wants = {name: lpm_key_list(family, gen, prefixes) for name, _kind, family, prefixes in wanted}
        tables = port_tables(desired.ports)
    finally:
        for thread in (ports, *held.values()):
            thread.join()
    for name, have, want in zip(("ipmq_ports", "ipmq_portidx"), ports.result(), tables):
        if have != want:  # from the first entry that differs to the last
            lo = next(i for i in range(PORTS) if have[i] != want[i])
            hi = next(i for i in range(PORTS - 1, -1, -1) if have[i] != want[i])
            pinned.update_array(name, gen * PORTS + lo, want[lo:hi + 1])
    for name, keys in wants.items():
        sync_trie(pinned, name, keys, held[name].result())
    pinned.update("ipmq_cfg", struct.pack("=I", gen), desired.cfg)


def read_ports(pinned: Pinned, gen: int) -> list[array.array]:
    return [array.array("I", pinned.sys.array_values(pinned.fd(name), gen * PORTS, PORTS, 4))
            for name in ("ipmq_ports", "ipmq_portidx")]


def sync_trie(pinned: Pinned, name: str, want: list[bytes], held: Generation) -> tuple[int, int]:
    """One generation of a trie made to hold exactly `want` (its keys, distinct,
    TRIE_VALUE each), given what it `held` (Pinned.generation): what should not be
    there deleted first (it may take the room of what comes), then what is missing
    or has another value written. Returns (written, deleted)."""
    have, wrong, covering = held
    missing, extra = trie_diff(want, have, pinned.defs[name].key_size)
    if wrong:  # in `have`: those not wanted are in `extra` already
        wanted = set(want)
        missing += [k for k in wrong if k in wanted]
    pinned.delete_many(name, extra + covering)
    pinned.update_many(name, missing, TRIE_VALUE)
    return len(missing), len(extra)


def note_tries(pinned: Pinned, desired: EbpfDesired, gen: int, notes: dict, both: bool) -> None:
    """Note for the next reads of the tries (trie_notes) where generation 0 ends and
    how large each generation is, now that `gen` (and, with `both`, the other one
    too) holds `desired`."""
    out = {}
    for name, _kind, _family, prefixes in wanted_tries(desired.families):
        count = [noted_count(name, 0, notes), noted_count(name, 1, notes)]
        for g in (0, 1) if both else (gen,):
            count[g] = len(prefixes)
        seek = pinned.sys.lpm_start(pinned.fd(name), pinned.defs[name].key_size, 1,
                                    seek_keys(name, 1, notes, prefixes))
        out[name] = {"seek": seek.hex() if seek is not None else None, "count": count}
    try:
        state.write_json(TRIE_NOTES, {"dir": str(pin_dir()), "tries": out})
    except OSError:
        pass  # hints only: the next reads read more
