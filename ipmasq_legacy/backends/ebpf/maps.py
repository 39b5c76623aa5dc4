"""The pinned maps (and programs) of one pin directory, opened on demand; what the last
apply noted of the tries, to read one generation alone; a thread for a map read."""

from __future__ import annotations

import array
import errno
import ipaddress
import struct
import threading
from pathlib import Path
from typing import NamedTuple

from ... import kernel, state
from ...bpf import loader
from ...errors import ApplyError
from .encode import lpm_prefix, seek_keys
from .layout import CFG, CTL, STATS
from .names import SHAPES, TRIE_NOTES, TRIE_VALUE, TRIES, pin_dir, pin_name


class Generation(NamedTuple):
    """One generation of a trie as the kernel holds it (Pinned.generation)."""

    raw: bytes  # its keys end to end, in the kernel's order
    wrong: list[bytes]  # those whose value is not TRIE_VALUE
    covering: list[bytes]  # keys of shorter prefixes that hold its generation byte


class Pinned:
    """The pinned maps (and programs) of one pin directory, opened on demand."""

    def __init__(self, obj: loader.BpfObject | None, directory: Path | None = None, sysobj=None):
        self.dir = directory or pin_dir()
        self.obj = obj
        self.sys = sysobj or kernel.current().bpf()
        self.fds: dict[str, int] = {}
        self.defs: dict[str, loader.MapDef] = {}
        self.ids: dict[str, int] = {}  # kernel map id of each opened pin

    def close(self):
        for fd in self.fds.values():
            self.sys.close(fd)
        self.fds.clear()
        self.ids.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def path(self, name: str) -> Path:
        return self.dir / pin_name(name)

    def exists(self) -> bool:
        return self.sys.exists(self.path("ipmq_ctl"))

    def wanted(self, name: str) -> loader.MapDef:
        assert self.obj is not None, "the shapes come from an object"
        d = self.obj.maps[name]
        size = SHAPES["map_entries"].get(name)
        return loader.MapDef(d.name, d.type, d.key_size, d.value_size, int(size) if size else d.max_entries, d.flags)

    def open(self, name: str) -> int | None:
        """fd of a pinned map, or None when it is not pinned."""
        if name in self.fds:
            return self.fds[name]
        try:
            fd = self.sys.get(str(self.path(name)))
        except loader.BpfError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        info = self.sys.map_info(fd)
        self.defs[name] = loader.MapDef(name, info["type"], info["key_size"], info["value_size"],
                                        info["max_entries"], info["flags"])
        self.ids[name] = info["id"]
        self.fds[name] = fd
        return fd

    def fd(self, name: str) -> int:
        fd = self.open(name)
        if fd is None:
            raise ApplyError(f"BPF map {self.path(name)} is not pinned")
        return fd

    def compatible(self, name: str) -> bool:
        have, want = self.defs.get(name), self.wanted(name)
        return have is not None and (have.type, have.key_size, have.value_size, have.max_entries, have.flags) == (
            want.type, want.key_size, want.value_size, want.max_entries, want.flags)

    def ensure(self) -> list[str]:
        """Create (and pin) the maps that are missing or of another shape; reuse the rest."""
        assert self.obj is not None, "the shapes come from an object"
        self.sys.mkdir(self.dir)
        created = []
        for name in self.obj.maps:
            if self.open(name) is not None and self.compatible(name):
                continue
            if name in self.fds:
                self.sys.close(self.fds.pop(name))
                self.sys.unlink(self.path(name))
            d = self.wanted(name)
            fd = self.sys.map_create(d.type, d.key_size, d.value_size, d.max_entries, d.flags, name)
            self.sys.pin(fd, str(self.path(name)))
            self.fds[name] = fd
            self.defs[name] = d
            self.ids[name] = self.sys.map_info(fd)["id"]
            created.append(name)
        return created

    # -- values

    def value_size(self, name: str) -> int:
        d = self.defs[name]
        if d.type in loader.PERCPU_TYPES:
            return ((d.value_size + 7) // 8 * 8) * loader.possible_cpus()
        return d.value_size

    def lookup(self, name: str, key: bytes) -> bytes | None:
        fd = self.fd(name)
        return self.sys.lookup(fd, key, self.value_size(name))

    def update(self, name: str, key: bytes, value: bytes, flags: int = loader.ANY) -> None:
        self.sys.update(self.fd(name), key, value, flags)

    def delete(self, name: str, key: bytes) -> bool:
        return self.sys.delete(self.fd(name), key)

    def keys(self, name: str) -> list[bytes]:
        """Every key (BPF_MAP_LOOKUP_BATCH where the kernel has it)."""
        fd = self.fd(name)
        d = self.defs[name]
        return self.sys.all_keys(fd, d.key_size, self.value_size(name), d.max_entries)

    def update_many(self, name: str, keys: list[bytes], value: bytes) -> None:
        self.sys.update_many(self.fd(name), keys, [value] * len(keys))

    def delete_many(self, name: str, keys: list[bytes]) -> None:
        self.sys.delete_many(self.fd(name), keys)

    def items(self, name: str) -> list[tuple[bytes, bytes]]:
        fd = self.fd(name)
        d = self.defs[name]
        return self.sys.items(fd, d.key_size, self.value_size(name), d.max_entries)

    def update_array(self, name: str, first: int, values: array.array) -> None:
        """Write consecutive u32 entries of an array map, in batches."""
        fd = self.fd(name)
        self.sys.update_batch_u32(fd, first, values)

    def gen(self) -> int:
        raw = self.lookup("ipmq_ctl", struct.pack("=I", 0))
        return CTL.unpack(raw)[0] & 1 if raw else 0

    def cfg(self, gen: int) -> bytes:
        return self.lookup("ipmq_cfg", struct.pack("=I", gen)) or bytes(CFG.size)

    def trie(self, kind: str, family: int, gen: int | None = None, held: Generation | None = None
             ) -> tuple[str, ...]:
        """Prefixes of one generation of a trie, sorted (None: all generations); `held`:
        that generation as generation() read it already."""
        name = TRIES[kind][family]
        if gen is None:
            keys = self.keys(name)
        else:
            raw = (held or self.generation(name, gen, seek_keys(name, gen, trie_notes()))).raw
            size = self.defs[name].key_size
            keys = [raw[i:i + size] for i in range(0, len(raw), size)]
        out = []
        for key in keys:
            g, prefix = lpm_prefix(family, key)
            if gen is None or g == gen:
                out.append(ipaddress.ip_network(prefix))
        return tuple(str(n) for n in sorted(out))

    def generation(self, name: str, gen: int, seek=(), expect: int | None = None) -> Generation:
        """One generation of a trie as the kernel holds it, read alone (loader.lpm_run:
        the keys whose generation byte is `gen`, from the first of `seek` the trie holds):
        (its keys end to end, in the kernel's order; those whose value is not
        TRIE_VALUE; the keys of prefixes shorter than the generation byte that hold it,
        which match its every lookup: only a hand writes them, and they are returned
        only when one is there)."""
        fd = self.fd(name)
        key_size, value_size = self.defs[name].key_size, self.value_size(name)
        raw, values = self.sys.lpm_run(fd, key_size, value_size, gen, seek, expect)
        n = len(raw) // key_size
        wrong = []
        if values != TRIE_VALUE * n:
            wrong = [raw[i * key_size:(i + 1) * key_size] for i in range(n)
                     if values[i * value_size:(i + 1) * value_size] != TRIE_VALUE]
        return Generation(raw, wrong, self.sys.lpm_covering(fd, key_size, value_size, gen)[1])

    def stats(self) -> dict[str, int]:
        totals = {}
        ncpu = loader.possible_cpus()
        for slot, name in enumerate(STATS):
            raw = self.lookup("ipmq_stats", struct.pack("=I", slot))
            totals[name] = sum(struct.unpack(f"={ncpu}Q", raw)) if raw else 0
        return totals

    def if_counters(self) -> dict[tuple[int, int], tuple[int, int]]:
        out = {}
        ncpu = loader.possible_cpus()
        for key, value in self.items("ipmq_ifstats"):
            index, family = struct.unpack("=II", key)
            nums = struct.unpack(f"={2 * ncpu}Q", value)
            out[(index, family)] = (sum(nums[0::2]), sum(nums[1::2]))
        return out


def trie_notes() -> dict:
    """What the last apply noted of each trie, to read one generation alone
    (loader.lpm_run): {trie: {"seek": a key of generation 0 it held near that
    generation's end, hex; "count": [entries of generation 0, of generation 1]}}. Hints
    only, never trusted: a seek key the trie no longer holds, or a count that is wrong,
    costs reading more, never a wrong answer. In the state directory, beside the record
    of the backend (a bpffs holds BPF objects only)."""
    data = state.read_json(TRIE_NOTES)
    tries = data.get("tries") if data.get("dir") == str(pin_dir()) else None
    return tries if isinstance(tries, dict) else {}


class Background(threading.Thread):
    """fn(*args) in a thread of its own: bpf(2) lets go of the GIL, so the kernel reads
    or writes one map while Python works on another. result() waits and returns (or
    raises) what fn did. Every caller joins before the maps' fds may close."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.value, self.error = fn, args, None, None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn(*self.args)
        except BaseException as exc:  # handed to result()
            self.error = exc

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


def stats() -> dict:
    """Counters of the installed datapath (python -m ipmasq_legacy.backends.ebpf stats)."""
    with Pinned(None) as p:
        if p.open("ipmq_stats") is None:
            return {}
        out = p.stats()
        out["nat_entries"] = len(p.keys("ipmq_nat_fwd")) if p.open("ipmq_nat_fwd") is not None else 0
        return out
