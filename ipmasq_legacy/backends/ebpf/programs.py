"""The datapath's programs: loaded from the object (bpf/loader.py) and pinned beside the
maps, reused while they came from the same object and use the maps pinned now; whether
this kernel's verifier takes them at all."""

from __future__ import annotations

import os
import struct

from ... import kernel, state
from ...bpf import loader
from ...errors import ApplyError
from .maps import Pinned
from .names import PROG_TYPES, PROGRAMS, pin_dir

VERIFIER_RECORD = "ebpf-verifier.json"


def verifier_reason(obj: loader.BpfObject, sysobj: loader.Sys) -> str | None:
    """Whether this kernel's verifier takes every program of the object: each loaded
    once against throw-away maps of the object's shapes (hash maps of one entry: their
    size does not change what the verifier sees), then closed. An older verifier may
    refuse what a newer one takes (Debian 11's 5.10: "The sequence of 8193 jumps is
    too complex"), which only a load tells. Kept in the state directory per kernel and
    object: a load costs the verifier's time (0.1-2 s)."""
    key = f"{os.uname().release} {obj.digest}"
    record = state.read_json(VERIFIER_RECORD)
    if key in record:
        return record[key]
    fds, verdict = {}, None
    try:
        for name, d in obj.maps.items():
            small = d.type in (loader.MAP_HASH, loader.MAP_LRU_HASH, loader.MAP_PERCPU_HASH, loader.MAP_LPM_TRIE)
            fds[name] = sysobj.map_create(d.type, d.key_size, d.value_size, 1 if small else d.max_entries,
                                          d.flags, "ipmq_probe")
        for hook, prog_name in PROGRAMS.items():
            prog = obj.progs[prog_name]
            try:
                sysobj.close(sysobj.prog_load(PROG_TYPES[hook], loader.patched(prog, fds), obj.license, prog.name))
            except loader.BpfError as exc:
                verdict = f"kernel {os.uname().release}'s verifier refuses program {prog.name}: {exc.strerror}"
                break
    except loader.BpfError as exc:
        return f"the kernel refuses BPF maps of the object: {exc.strerror}"  # not kept: may be passing
    finally:
        for fd in fds.values():
            sysobj.close(fd)
    try:
        state.write_json(VERIFIER_RECORD, {**record, key: verdict})
    except OSError:
        pass
    return verdict


def programs_on_stale_maps(pinned: Pinned, obj: loader.BpfObject) -> list[str]:
    """Hooks whose pinned program uses a map other than the one pinned under its name
    now (a pin replaced: the program would go on using the old map, apply would write
    the new one). `pinned` has every map of `obj` opened."""
    stale = []
    for hook in PROGRAMS:
        try:
            fd = pinned.sys.get(str(pin_dir() / f"prog_{hook}"))
        except loader.BpfError:
            continue  # not pinned: "not loaded"
        try:
            used = set(pinned.sys.prog_info(fd)["map_ids"])
        finally:
            pinned.sys.close(fd)
        if used != {pinned.ids.get(name) for _, name in obj.progs[PROGRAMS[hook]].relocs}:
            stale.append(hook)
    return stale


def prog_pinned(hook: str, obj: loader.BpfObject) -> int | None:
    """Id of the pinned program of a hook when it came from this object, else None."""
    path = pin_dir() / f"prog_{hook}"
    try:
        sysobj = kernel.current().bpf()
        if not sysobj.exists(path):
            return None
        fd = sysobj.get(str(path))
    except loader.BpfError:
        return None
    try:
        info = sysobj.prog_info(fd)
        ok = info["name"] == PROGRAMS[hook] and loaded_digest() == obj.digest
        return info["id"] if ok else None
    finally:
        sysobj.close(fd)


def loaded_digest() -> str | None:
    """The object digest the pinned programs came from (kept in the `ipmq_meta` map)."""
    try:
        with Pinned(None) as p:
            fd = p.open("ipmq_meta")
            if fd is None:
                return None
            raw = p.sys.lookup(fd, struct.pack("=I", 0), p.defs["ipmq_meta"].value_size)
            return raw.hex() if raw and any(raw) else None
    except loader.BpfError:
        return None


def load(pinned: Pinned, obj: loader.BpfObject, force: bool = False) -> tuple[dict[str, int], bool]:
    """fds of the programs: the pinned ones when they came from this object (and no
    map was recreated), else freshly loaded (and pinned in their place); and whether
    any was loaded anew (the assist must then take the new one)."""
    sysobj = pinned.sys
    fds = {}
    reloaded = False
    fresh = force or loaded_digest() != obj.digest or bool(programs_on_stale_maps(pinned, obj))
    for hook in PROGRAMS:
        path = pin_dir() / f"prog_{hook}"
        if not fresh and sysobj.exists(path):
            try:
                fds[hook] = sysobj.get(str(path))
                continue
            except loader.BpfError:
                pass
        map_fds = {name: pinned.fd(name) for name in obj.maps}
        prog = obj.progs[PROGRAMS[hook]]
        try:
            fd = sysobj.prog_load(PROG_TYPES[hook], loader.patched(prog, map_fds), obj.license, prog.name)
        except loader.BpfError as exc:
            for other in fds.values():
                sysobj.close(other)
            raise ApplyError(f"ebpf: the kernel refused program {prog.name}: {exc.strerror}") from None
        if sysobj.exists(path):  # (bpffs refuses rename; the attached filter holds the program)
            sysobj.unlink(path)
        sysobj.pin(fd, str(path))
        fds[hook] = fd
        reloaded = True
    pinned.update("ipmq_meta", struct.pack("=I", 0), bytes.fromhex(obj.digest))
    return fds, reloaded
