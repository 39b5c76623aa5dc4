"""bpf(2) from Python, and a small loader for masq.o: no libbpf, no compiler at run time.

* `Sys`: the bpf syscall through ctypes (map create/lookup/update/delete/iterate/batch,
  program load, pin, get, object info), and `Sys.lpm_run`: the keys of an LPM trie that
  start with one byte, read without reading the rest of the trie.
* `Sys.prog_load`: BPF_PROG_LOAD, the verifier's last lines in the error when it refuses.
* the object file (objfile.py: `read_object`, `patched`) is re-exported here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import resource
import struct
import sys
import threading
from functools import cache
from pathlib import Path

# the object file's reader, re-exported (objfile.py needs nothing of this module)
from .objfile import PSEUDO_MAP_FD, BpfObject, MapDef, ObjectError, ProgDef, patched, read_object  # noqa: F401

# enum bpf_cmd
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
PROG_LOAD, OBJ_PIN, OBJ_GET = 5, 6, 7
OBJ_GET_INFO_BY_FD = 15
MAP_LOOKUP_BATCH = 24
MAP_UPDATE_BATCH = 26
MAP_DELETE_BATCH = 27
# map types
MAP_HASH, MAP_ARRAY, MAP_PERCPU_HASH, MAP_PERCPU_ARRAY = 1, 2, 5, 6
MAP_LRU_HASH, MAP_LPM_TRIE = 9, 11
MAP_TYPE_NAMES = {1: "hash", 2: "array", 5: "percpu_hash", 6: "percpu_array", 9: "lru_hash", 11: "lpm_trie"}
PERCPU_TYPES = {MAP_PERCPU_HASH, MAP_PERCPU_ARRAY}
PROG_SOCKET_FILTER, PROG_SCHED_CLS = 1, 3
# update flags
ANY, NOEXIST, EXIST = 0, 1, 2

_SYSCALL = {"x86_64": 321, "aarch64": 280, "arm64": 280, "riscv64": 280, "ppc64le": 361, "ppc64": 361,
            "s390x": 351, "armv7l": 386, "armv6l": 386, "i686": 357, "i386": 357, "loongarch64": 280}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) call failed; errno and a message naming the command."""


def syscall_number() -> int | None:
    return _SYSCALL.get(platform.machine())


@cache
def possible_cpus() -> int:
    """Per-CPU map values come as one slot per *possible* CPU."""
    try:
        text = open("/sys/devices/system/cpu/possible").read().strip()
    except OSError:
        return os.cpu_count() or 1
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


# What a batch operation fails with where the kernel or the map type lacks it (524: the
# kernel's own ENOTSUPP): the caller goes key by key instead.
NO_BATCH = (errno.EINVAL, errno.EOPNOTSUPP, 524)


def _addr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def lpm_rank(key: bytes, first: int) -> int:
    """Where an LPM trie key lies, in the trie's order, against the keys whose data
    starts with the byte `first` (prefix length 8 or more): -1 before them (a lower
    first byte), 0 one of them, 1 after them (a higher first byte, or a prefix shorter
    than a byte that holds them or lies above them)."""
    plen = int.from_bytes(key[:4], sys.byteorder)
    if plen >= 8:
        return (key[4] > first) - (key[4] < first)
    return -1 if (key[4] | (0xFF >> plen)) < first else 1


def _bisect_left(n: int, target: int, key, lo: int = 0) -> int:
    """bisect.bisect_left(range(n), target, lo=lo, key=key): its key= is Python 3.10+."""
    hi = n
    while lo < hi:
        mid = (lo + hi) // 2
        if key(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _run_bounds(raw: bytes, n: int, key_size: int, first: int) -> tuple[int, int] | None:
    """(start, end) of the keys of lpm_rank 0 among the n keys of `raw`, found by
    bisection; None when the keys are not in lpm_rank order. The order is checked in C
    (every key's first data byte, the run's prefix lengths), key by key only where a
    prefix shorter than a byte may lie (hand-made: we write none)."""
    def rank(i):
        return lpm_rank(raw[i * key_size:(i + 1) * key_size], first)

    s = _bisect_left(n, 0, rank)
    e = _bisect_left(n, 1, rank, lo=s)
    heads = raw[4:n * key_size:key_size]
    lengths = raw[0 if sys.byteorder == "little" else 3:n * key_size:key_size]  # at most 136: one byte
    ok = (heads[s:e] == bytes([first]) * (e - s) and (e == s or min(lengths[s:e]) >= 8)
          and (s == 0 or max(heads[:s]) < first) and (e == n or min(heads[e:]) > first))
    if not ok:
        ok = all(rank(i) == (-1 if i < s else 0 if i < e else 1) for i in range(n))
    return (s, e) if ok else None


def memlock_charged(release: str | None = None) -> bool:
    """Whether this kernel charges BPF maps and programs to RLIMIT_MEMLOCK: before 5.11
    it does (after, memory cgroups account them; libbpf's FEAT_MEMCG_ACCOUNT)."""
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return m is None or (int(m.group(1)), int(m.group(2))) < (5, 11)


@cache
def raise_memlock() -> str | None:
    """What libbpf does before it creates maps (bump_rlimit_memlock): where the kernel
    charges them to RLIMIT_MEMLOCK (64 KiB by default on Debian 11, less than one of
    our maps), raise it to unlimited. None when done or not needed, else why it stays."""
    if not memlock_charged():
        return None
    inf = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == inf:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (inf, inf))
        return None
    except (ValueError, OSError):
        pass  # raising the hard limit needs CAP_SYS_RESOURCE: take what the hard limit allows
    if hard == inf:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (inf, inf))
        return None
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
    return (f"kernel {os.uname().release} charges BPF maps to RLIMIT_MEMLOCK, and its hard limit "
            f"({hard // 1024} KiB) cannot be raised here (needs CAP_SYS_RESOURCE, or `ulimit -l unlimited`)")


@cache
def _trie_next_key_exact(nr: int) -> bool:
    """Whether this kernel answers BPF_MAP_GET_NEXT_KEY on an LPM trie, for a key it does
    not hold, with the trie's first key (what lpm_start relies on). Before the fix "bpf:
    Fix exact match conditions in trie_get_next_key()" (6.13, backported to some stable
    kernels; Debian 11's 5.10.223 lacks it) a key of the same length as a node it does not
    match is taken for that node: here 1.2.3.5/32 for 1.2.3.4/32, and the answer is "no
    next key". Probed once per process on a two-entry trie."""
    sysobj = Sys()
    held = struct.pack("=I4B", 32, 1, 2, 3, 4)
    fd = sysobj.map_create(MAP_LPM_TRIE, 8, 1, 2, 1, "ipmq_probe")
    try:
        sysobj.update(fd, held, b"\x01")
        return sysobj.next_key(fd, struct.pack("=I4B", 32, 1, 2, 3, 5), 8) == held
    finally:
        os.close(fd)


_PROBE = threading.Lock()  # the tries are read in parallel threads: one probe, not one each


def trie_next_key_exact(sysobj: Sys) -> bool:
    try:
        with _PROBE:
            return _trie_next_key_exact(sysobj.nr)
    except BpfError:
        return False  # cannot tell: read from the trie's first key, which is right everywhere


def _batch_done(attr, asked: int) -> int:
    """How many elements a failed BPF_MAP_*_BATCH processed. The kernel writes the count
    back only when the map type has the batch op; where it has not (LPM tries before 5.12,
    ENOTSUPP) the count still says `asked` and nothing was done. (A batch that fails on
    its last element writes asked - 1.)"""
    count = struct.unpack_from("=I", attr, 32)[0]
    return 0 if count >= asked else count


class Sys:
    """Thin wrappers over bpf(2). Every call raises BpfError with errno on failure."""

    ATTR = 128

    def __init__(self):
        nr = syscall_number()
        if nr is None:
            raise BpfError(errno.ENOSYS, f"no bpf syscall number known for {platform.machine()}")
        self.nr = nr
        raise_memlock()  # before any map is made (kernels < 5.11); unavailable_reason reports a failure

    # -- what else the ebpf backend does to its objects: fds closed, and the pin
    # directory's files (bpffs). Here so that a fake (tests/fakes/ebpf.py), handed out by
    # kernel.current().bpf(), models pins and fds in one place.

    def close(self, fd: int) -> None:
        os.close(fd)

    @staticmethod
    def exists(path) -> bool:
        return Path(path).exists()

    @staticmethod
    def mkdir(path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def unlink(path) -> None:
        Path(path).unlink()

    @staticmethod
    def listdir(path) -> list[str] | None:
        """Names in a directory; None when it is not one."""
        return [e.name for e in Path(path).iterdir()] if Path(path).is_dir() else None

    @staticmethod
    def rmdir(path) -> None:
        Path(path).rmdir()

    def call(self, cmd: int, attr, what: str) -> int:
        ret = _libc.syscall(self.nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
        if ret < 0:
            err = ctypes.get_errno()
            raise BpfError(err, f"bpf {what}: {os.strerror(err)}")
        return ret

    def call_found(self, cmd: int, attr, what: str) -> bool:
        """call(), with ENOENT (no such key, no next key) as False."""
        try:
            self.call(cmd, attr, what)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    # -- maps

    def map_create(self, map_type: int, key_size: int, value_size: int, max_entries: int, flags: int,
                   name: str) -> int:
        attr = ctypes.create_string_buffer(self.ATTR)
        struct.pack_into("=7I16s", attr, 0, map_type, key_size, value_size, max_entries, flags, 0, 0,
                         name.encode()[:15])
        return self.call(MAP_CREATE, attr, f"map create {name}")

    def _elem(self, fd: int, key, value, flags: int = 0):
        attr = ctypes.create_string_buffer(self.ATTR)
        struct.pack_into("=IIQQQ", attr, 0, fd, 0, _addr(key), _addr(value), flags)
        return attr

    def lookup(self, fd: int, key: bytes, value_size: int) -> bytes | None:
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value_size)
        return v.raw if self.call_found(MAP_LOOKUP_ELEM, self._elem(fd, k, v), "map lookup") else None

    def update(self, fd: int, key: bytes, value: bytes, flags: int = ANY) -> None:
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value, len(value))
        self.call(MAP_UPDATE_ELEM, self._elem(fd, k, v, flags), "map update")

    def delete(self, fd: int, key: bytes) -> bool:
        k = ctypes.create_string_buffer(key, len(key))
        return self.call_found(MAP_DELETE_ELEM, self._elem(fd, k, None), "map delete")

    def keys(self, fd: int, key_size: int) -> list[bytes]:
        out: list[bytes] = []
        cur = None
        nxt = ctypes.create_string_buffer(key_size)
        while True:
            if not self.call_found(MAP_GET_NEXT_KEY, self._elem(fd, cur, nxt), "map get next key"):
                return out
            out.append(nxt.raw)
            cur = ctypes.create_string_buffer(nxt.raw, key_size)

    def items(self, fd: int, key_size: int, value_size: int, max_entries: int) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of a hash-like map: BPF_MAP_LOOKUP_BATCH where the kernel has
        it, else key by key. `value_size` is the full size (per-CPU: all slots)."""
        try:
            return self._items_batch(fd, key_size, value_size, max_entries)
        except BpfError as exc:
            if exc.errno not in NO_BATCH:
                raise
        out = []
        for key in self.keys(fd, key_size):
            value = self.lookup(fd, key, value_size)
            if value is not None:
                out.append((key, value))
        return out

    def _items_batch(self, fd, key_size, value_size, max_entries):
        out = []
        for count, kr, vr in self.batches(fd, key_size, value_size, max(1, min(max_entries, 4096))):
            for i in range(count):
                out.append((kr[i * key_size:(i + 1) * key_size], vr[i * value_size:(i + 1) * value_size]))
        return out

    def batches(self, fd: int, key_size: int, value_size: int, chunk: int, after: bytes | None = None,
                limit: int | None = None):
        """BPF_MAP_LOOKUP_BATCH, raw: (count, keys, values) per call, the buffers as the
        kernel filled them (only the first count entries of each are meant). `after`: the
        key to start after (array maps: its index; None: from the first); `limit`: stop
        after that many entries. Raises BpfError (one of NO_BATCH where the
        kernel or the map type lacks batches) before yielding anything."""
        keys = ctypes.create_string_buffer(key_size * chunk)
        values = ctypes.create_string_buffer(value_size * chunk)
        in_batch = ctypes.create_string_buffer(after, len(after)) if after is not None else None
        # the cursor: a bucket index for hash maps, a whole key for the generic batch ops
        cursor = max(8, key_size)
        out_batch = ctypes.create_string_buffer(cursor)
        left = limit
        while left is None or left > 0:
            want = chunk if left is None else min(chunk, left)
            count, done = self._lookup_batch(fd, in_batch, out_batch, keys, values, want)
            if count:
                yield count, keys.raw, values.raw
            if left is not None:
                left -= count
            if done:
                return
            in_batch = ctypes.create_string_buffer(out_batch.raw, cursor)

    def _lookup_batch(self, fd: int, in_batch, out_batch, keys, values, count: int) -> tuple[int, bool]:
        """One BPF_MAP_LOOKUP_BATCH: (entries copied, whether the map's end was reached)."""
        attr = ctypes.create_string_buffer(self.ATTR)
        struct.pack_into("=QQQQIIQQ", attr, 0, _addr(in_batch), _addr(out_batch), _addr(keys), _addr(values),
                         count, fd, 0, 0)
        done = False
        try:
            self.call(MAP_LOOKUP_BATCH, attr, "map lookup batch")
        except BpfError as exc:
            if exc.errno != errno.ENOENT:
                raise
            done = True
        return struct.unpack_from("=I", attr, 32)[0], done

    def next_key(self, fd: int, key: bytes | None, key_size: int) -> bytes | None:
        """BPF_MAP_GET_NEXT_KEY: the key after `key` (None: the first key); None after the
        last. An LPM trie answers a key it does not hold with its first key."""
        cur = ctypes.create_string_buffer(key, len(key)) if key is not None else None
        nxt = ctypes.create_string_buffer(key_size)
        return nxt.raw if self.call_found(MAP_GET_NEXT_KEY, self._elem(fd, cur, nxt), "map get next key") else None

    # -- LPM tries: the keys that start with one byte

    def lpm_start(self, fd: int, key_size: int, first: int, seek) -> bytes | None:
        """The first key of `seek` that the trie holds and that comes before every key
        starting with the byte `first` (lpm_rank -1), or None: where lpm_run may start."""
        leftmost: bytes | None = b""
        for key in seek:
            if len(key) != key_size or lpm_rank(key, first) >= 0:
                continue
            if leftmost == b"":
                leftmost = self.next_key(fd, None, key_size)
                if leftmost is None:
                    return None  # an empty trie
            # a key the trie holds is followed by another one or by nothing; one it does
            # not hold is answered with the first key
            if self.next_key(fd, key, key_size) != leftmost:
                return key
        return None

    def lpm_run(self, fd: int, key_size: int, value_size: int, first: int, seek=(),
                expect: int | None = None) -> tuple[bytes, bytes]:
        """The entries of an LPM trie whose data starts with the byte `first` (prefix
        length 8 or more: struct bpf_lpm_trie_key, a u32 prefix length, then the data):
        (their keys, their values), each end to end, in the trie's order.

        The kernel walks a trie in postorder (kernel/bpf/lpm_trie.c, trie_get_next_key:
        a prefix after the longer ones it holds), so those keys come in one run, after
        every key whose first byte is lower: the read starts after the first key of
        `seek` the trie holds (`lpm_start`; from the trie's first key when none is) and
        stops at the first key past the run. `expect` (how many the run should hold)
        sizes the batches so that little past it is read. One BPF_MAP_LOOKUP_BATCH per
        65,536 entries (key by key where the kernel lacks it); the order is checked in
        every batch, and a trie walked in another order is read whole."""
        after = self.lpm_start(fd, key_size, first, seek) if seek and trie_next_key_exact(self) else None
        keys, values = [], []
        got, step = 0, 1024
        most = 65536 if expect is None else max(1024, min(65536, expect + 64))
        kb = ctypes.create_string_buffer(key_size * most)
        vb = ctypes.create_string_buffer(value_size * most)
        out_batch = ctypes.create_string_buffer(max(8, key_size))
        first_call = True
        while True:
            if expect is None:
                count, step = step, min(step * 4, most)
            elif first_call:  # small: the run may be far shorter than expected
                count = min(1024, expect + 64)
            else:
                count = min(most, max(1024, expect - got + 64))
            in_batch = ctypes.create_string_buffer(after, key_size) if after is not None else None
            try:
                n, done = self._lookup_batch(fd, in_batch, out_batch, kb, vb, count)
            except BpfError as exc:
                if not first_call or exc.errno not in NO_BATCH:
                    raise
                return self._lpm_run_by_key(fd, key_size, value_size, first, after)
            first_call = False
            kr, vr = kb.raw, vb.raw
            bounds = _run_bounds(kr, n, key_size, first)
            if bounds is None:  # not the order this relies on
                return self._lpm_run_by_key(fd, key_size, value_size, first, None, stop=False)
            s, e = bounds
            keys.append(kr[s * key_size:e * key_size])
            values.append(vr[s * value_size:e * value_size])
            got += e - s
            if done or e < n or n == 0:
                return b"".join(keys), b"".join(values)
            after = kr[(n - 1) * key_size:n * key_size]

    def _lpm_run_by_key(self, fd: int, key_size: int, value_size: int, first: int, after: bytes | None,
                        stop: bool = True) -> tuple[bytes, bytes]:
        """lpm_run with BPF_MAP_GET_NEXT_KEY and lookups (stop=False: the whole trie is
        read, for a kernel that walks it in another order)."""
        keys, values = [], []
        cur = after
        while (cur := self.next_key(fd, cur, key_size)) is not None:
            rank = lpm_rank(cur, first)
            if rank > 0 and stop:
                break
            value = self.lookup(fd, cur, value_size) if rank == 0 else None  # (its own: the longest match)
            if value is not None:
                keys.append(cur)
                values.append(value)
        return b"".join(keys), b"".join(values)

    def lpm_covering(self, fd: int, key_size: int, value_size: int, first: int) -> tuple[bytes | None, list[bytes]]:
        """Prefixes shorter than one byte (prefix length 0-7) that hold the byte `first`:
        (the value the longest of them maps to, or None when there is none; the eight keys
        one of them would have). They match every lookup of the run lpm_run reads, yet
        lie outside it."""
        probe = struct.pack("=I", 7) + bytes([first]) + bytes(key_size - 5)
        value = self.lookup(fd, probe, value_size)
        if value is None:
            return None, []
        return value, [struct.pack("=I", p) + bytes([first & (0xFF00 >> p) & 0xFF]) + bytes(key_size - 5)
                       for p in range(8)]

    def all_keys(self, fd: int, key_size: int, value_size: int, max_entries: int) -> list[bytes]:
        """Every key of a map (BPF_MAP_LOOKUP_BATCH where the kernel has it, else
        BPF_MAP_GET_NEXT_KEY); `value_size` is the full size (per-CPU: all slots)."""
        out = []
        try:
            for count, kr, _vr in self.batches(fd, key_size, value_size, max(1, min(max_entries, 65536))):
                out += [kr[i:i + key_size] for i in range(0, count * key_size, key_size)]
            return out
        except BpfError as exc:
            if exc.errno not in NO_BATCH or out:
                raise
        return self.keys(fd, key_size)

    def digest(self, fd: int, key_size: int, value_size: int, max_entries: int, update) -> int:
        """Every (key, value) of a map fed to `update` (a hash's update) as raw bytes, in
        the map's own order, without a Python object per entry; returns how many. One
        BPF_MAP_LOOKUP_BATCH per 65,536 entries (key by key where the kernel lacks it)."""
        total = 0
        try:
            for count, kr, vr in self.batches(fd, key_size, value_size, max(1, min(max_entries, 65536))):
                update(struct.pack("=I", count) + kr[:count * key_size] + vr[:count * value_size])
                total += count
            return total
        except BpfError as exc:
            if exc.errno not in NO_BATCH or total:
                raise
        for key in self.keys(fd, key_size):
            value = self.lookup(fd, key, value_size)
            if value is not None:
                update(struct.pack("=I", 1) + key + value)
                total += 1
        return total

    def array_values(self, fd: int, first: int, count: int, value_size: int) -> bytes:
        """Entries first .. first+count-1 of an array map, their values end to end."""
        out = []
        try:
            after = struct.pack("=I", first - 1) if first else None
            got = 0
            for n, _kr, vr in self.batches(fd, 4, value_size, count, after=after, limit=count):
                out.append(vr[:n * value_size])
                got += n
            if got == count:
                return b"".join(out)
        except BpfError as exc:
            if exc.errno not in NO_BATCH:
                raise
        return b"".join(self.lookup(fd, struct.pack("=I", i), value_size) or bytes(value_size)
                        for i in range(first, first + count))

    def update_many(self, fd: int, keys: list[bytes], values: list[bytes], flags: int = ANY) -> None:
        """Many elements in one BPF_MAP_UPDATE_BATCH (one by one where the kernel lacks it)."""
        if not keys:
            return
        kb = ctypes.create_string_buffer(b"".join(keys))
        vb = ctypes.create_string_buffer(b"".join(values))
        attr = ctypes.create_string_buffer(self.ATTR)
        struct.pack_into("=QQQQIIQQ", attr, 0, 0, 0, _addr(kb), _addr(vb), len(keys), fd, flags, 0)
        try:
            self.call(MAP_UPDATE_BATCH, attr, "map update batch")
            return
        except BpfError as exc:
            if exc.errno not in NO_BATCH:
                raise
            done = _batch_done(attr, len(keys))
        for k, v in zip(keys[done:], values[done:]):
            self.update(fd, k, v, flags)

    def delete_many(self, fd: int, keys: list[bytes]) -> None:
        """Many (existing) elements in one BPF_MAP_DELETE_BATCH (one by one without it)."""
        if not keys:
            return
        kb = ctypes.create_string_buffer(b"".join(keys))
        attr = ctypes.create_string_buffer(self.ATTR)
        struct.pack_into("=QQQQIIQQ", attr, 0, 0, 0, _addr(kb), 0, len(keys), fd, 0, 0)
        try:
            self.call(MAP_DELETE_BATCH, attr, "map delete batch")
            return
        except BpfError as exc:
            if exc.errno not in (*NO_BATCH, errno.ENOENT):
                raise
            done = _batch_done(attr, len(keys))
        for k in keys[done:]:
            self.delete(fd, k)

    def update_batch_u32(self, fd: int, first: int, values) -> None:
        """Array map: entries first, first+1, ... set to `values` (u32), in few syscalls
        (BPF_MAP_UPDATE_BATCH; one by one where the kernel lacks it)."""
        import array

        n = len(values)
        keys = array.array("I", range(first, first + n))
        vals = array.array("I", values)
        kb = ctypes.create_string_buffer(keys.tobytes(), len(keys) * 4)
        vb = ctypes.create_string_buffer(vals.tobytes(), len(vals) * 4)
        attr = ctypes.create_string_buffer(self.ATTR)
        struct.pack_into("=QQQQIIQQ", attr, 0, 0, 0, _addr(kb), _addr(vb), n, fd, 0, 0)
        try:
            self.call(MAP_UPDATE_BATCH, attr, "map update batch")
            return
        except BpfError as exc:
            if exc.errno not in NO_BATCH:
                raise
        for k, v in zip(keys, vals):
            self.update(fd, struct.pack("=I", k), struct.pack("=I", v))

    # -- objects

    def pin(self, fd: int, path: str) -> None:
        p = ctypes.create_string_buffer(os.fsencode(path))
        attr = ctypes.create_string_buffer(self.ATTR)
        struct.pack_into("=QI", attr, 0, _addr(p), fd)
        self.call(OBJ_PIN, attr, f"pin {path}")

    def get(self, path: str) -> int:
        p = ctypes.create_string_buffer(os.fsencode(path))
        attr = ctypes.create_string_buffer(self.ATTR)
        struct.pack_into("=QI", attr, 0, _addr(p), 0)
        return self.call(OBJ_GET, attr, f"get {path}")

    def _info(self, fd: int, size: int, init: bytes = b"") -> bytes:
        info = ctypes.create_string_buffer(init.ljust(size, b"\0"), size)
        attr = ctypes.create_string_buffer(self.ATTR)
        struct.pack_into("=IIQ", attr, 0, fd, size, _addr(info))
        self.call(OBJ_GET_INFO_BY_FD, attr, "object info")
        return info.raw

    def map_info(self, fd: int) -> dict:
        raw = self._info(fd, 88)
        type_, id_, key_size, value_size, max_entries, flags = struct.unpack_from("=6I", raw, 0)
        name = raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
        return {"type": type_, "id": id_, "key_size": key_size, "value_size": value_size,
                "max_entries": max_entries, "flags": flags, "name": name}

    def prog_info(self, fd: int) -> dict:
        """type, id, tag, name, and map_ids: the ids of the maps the program uses (its
        instructions hold those maps, whatever is pinned where today)."""
        ids = (ctypes.c_uint32 * 64)()
        init = bytearray(96)
        struct.pack_into("=IQ", init, 52, len(ids), ctypes.addressof(ids))  # nr_map_ids, map_ids
        raw = self._info(fd, 96, bytes(init))
        type_, id_ = struct.unpack_from("=II", raw, 0)
        tag = raw[8:16].hex()
        nr_map_ids = struct.unpack_from("=I", raw, 52)[0]
        name = raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
        return {"type": type_, "id": id_, "tag": tag, "name": name, "map_ids": list(ids[:min(nr_map_ids, len(ids))])}

    def prog_load(self, prog_type: int, insns: bytes, license: str, name: str) -> int:
        ins = ctypes.create_string_buffer(insns, len(insns))
        lic = ctypes.create_string_buffer(license.encode())

        def attempt(log_level: int, log_size: int):
            log = ctypes.create_string_buffer(log_size) if log_size else None
            attr = ctypes.create_string_buffer(self.ATTR)
            struct.pack_into("=IIQQIIQII16s", attr, 0, prog_type, len(insns) // 8, _addr(ins), _addr(lic),
                             log_level, log_size, _addr(log), 0, 0, name.encode()[:15])
            try:
                return self.call(PROG_LOAD, attr, f"load program {name}"), None
            except BpfError as exc:
                text = log.value.decode(errors="replace") if log is not None else ""
                return None, (exc, text)

        fd, failure = attempt(0, 0)
        if fd is not None:
            return fd
        fd, failure2 = attempt(1, 16 << 20)
        if fd is not None:
            return fd
        exc, text = failure2 or failure
        if failure2 and exc.errno == errno.ENOSPC:
            # Kernels before 6.4 fail a load whose verifier log fills the buffer (ENOSPC) and
            # keep its start, not its end: the load without a log has the real errno, and
            # a log of statistics and errors only (BPF_LOG_STATS, 4) says why, in a few lines.
            _, failure3 = attempt(4, 1 << 20)
            stats = ("verification time", "stack depth", "processed ")
            lines = (failure3[1] if failure3 else "").strip().splitlines()
            exc, text = failure[0], "\n".join([ln for ln in lines if not ln.startswith(stats)]
                                              + [ln for ln in lines if ln.startswith("processed ")])
        tail = [ln for ln in text.strip().splitlines() if ln.strip()][-3:]
        raise BpfError(exc.errno, f"{exc.strerror}" + (f"; verifier: {' | '.join(tail)}" if tail else ""))

