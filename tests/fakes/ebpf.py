"""FakeBpf: the node as the ebpf backend reaches it through the kernel seam
(ipmasq_legacy/kernel.py): `bpf()` (bpf(2): maps, programs, pins, fds, the pin
directory's files), `rtnl()` (links with their addresses, clsact qdiscs and tc filters)
and, as FakeNft and FakeIptables model them, the nft tables it owns and the assist's
iptables chains (the class is both).

The model: pinned objects by path (maps: type, key and value size, max entries, flags,
contents; programs: type, name, tag, the maps their instructions name), each kernel
object with an id; open fds (`open_fds()`: leaks show); links (index, name, type, kind,
master, addresses); per link a clsact qdisc or none and the filters on each of its
hooks, someone else's seedable (`seed_filter`). Semantics only as far as the backend's
reads need: an LPM trie orders its keys by (data, prefix length) and answers a lookup
with the longest prefix covering it; hash maps refuse beyond max entries; arrays hold
every index.

`dump()` is the canonical text of all of it (no ids, no fds), then FakeNft's and
FakeIptables' dumps. `fail_bpf(op, errno)` makes the next bpf operation (map_create,
update, update_many, delete_many, prog_load, pin) or tc change (tc) fail; `on_write`
callbacks run after every change of a map (a test's invariant, checked at every step).
Deleted conntrack entries are noted (`forgotten`); `conntrack -L` is a tool handler a
test may add.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from ipmasq_legacy.backends.ebpf.names import HOOKS, PARENT, pin_dir
from ipmasq_legacy.backends.ebpf.tc import TcFilter
from ipmasq_legacy.bpf import loader

from .iptables import FakeIptables
from .nft import FakeNft

ARRAYS = (loader.MAP_ARRAY, loader.MAP_PERCPU_ARRAY)
BPF_ROOT = "/sys/fs/bpf"
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
TYPE_NAMES = {**loader.MAP_TYPE_NAMES}
PROG_NAMES = {loader.PROG_SCHED_CLS: "sched_cls", loader.PROG_SOCKET_FILTER: "socket_filter"}
CLSACT = (0xFFFF0000, 0xFFFFFFF1)  # handle, parent (TC_H_CLSACT)


def _lpm_order(key: bytes) -> tuple[bytes, int]:
    return key[4:], struct.unpack_from("=I", key)[0]


def _lpm_covers(entry: bytes, key: bytes) -> bool:
    """Whether the prefix `entry` covers the key `key` (both: u32 prefix length, data)."""
    plen, want = struct.unpack_from("=I", entry)[0], struct.unpack_from("=I", key)[0]
    if plen > want:
        return False
    a, b = int.from_bytes(entry[4:], "big"), int.from_bytes(key[4:], "big")
    shift = (len(entry) - 4) * 8 - plen
    return a >> shift == b >> shift


@dataclass
class Map:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str
    data: dict[bytes, bytes] = field(default_factory=dict)

    def ordered(self) -> list[bytes]:
        if self.type == loader.MAP_LPM_TRIE:
            return sorted(self.data, key=_lpm_order)
        if self.type in ARRAYS:
            return sorted(self.data, key=lambda k: struct.unpack("=I", k)[0])
        return list(self.data)


@dataclass
class Prog:
    id: int
    type: int
    name: str
    tag: str
    map_ids: list[int]


@dataclass
class FakeLink:
    index: int
    name: str
    type: int = ARPHRD_ETHER
    kind: str | None = None
    master: int = 0
    addresses: list[str] = field(default_factory=list)  # "10.0.0.5/24"


def _err(code: int, what: str) -> loader.BpfError:
    import os

    return loader.BpfError(code, f"bpf {what}: {os.strerror(code)}")


class _Bpf:
    """What kernel.current().bpf() hands out: loader.Sys's methods over the model."""

    def __init__(self, fake: FakeBpf):
        self.fake = fake

    # -- fds and files

    def _obj(self, fd: int):
        try:
            return self.fake.fds[fd]
        except KeyError:
            raise _err(errno.EBADF, f"fd {fd}") from None

    def _map(self, fd: int) -> Map:
        obj = self._obj(fd)
        if not isinstance(obj, Map):
            raise _err(errno.EINVAL, "not a map")
        return obj

    def close(self, fd: int) -> None:
        if self.fake.fds.pop(fd, None) is None:
            raise OSError(errno.EBADF, "close: bad fd")

    def exists(self, path) -> bool:
        path = str(path)
        return path in self.fake.pins or path in self.fake.dirs

    def mkdir(self, path) -> None:
        p = Path(path)
        for d in (*reversed(p.parents), p):
            if str(d).startswith(BPF_ROOT):
                self.fake.dirs.add(str(d))

    def unlink(self, path) -> None:
        if self.fake.pins.pop(str(path), None) is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path))

    def listdir(self, path) -> list[str] | None:
        path = str(path)
        if path not in self.fake.dirs:
            return None
        return sorted(Path(p).name for p in [*self.fake.pins, *self.fake.dirs] if str(Path(p).parent) == path)

    def rmdir(self, path) -> None:
        if self.listdir(path):
            raise OSError(errno.ENOTEMPTY, "directory not empty", str(path))
        self.fake.dirs.discard(str(path))

    # -- maps

    def map_create(self, map_type, key_size, value_size, max_entries, flags, name) -> int:
        self.fake._failing("map_create")
        return self.fake._fd(Map(self.fake._id(), map_type, key_size, value_size, max_entries, flags, name))

    def lookup(self, fd: int, key: bytes, value_size: int) -> bytes | None:
        m = self._map(fd)
        if m.type in ARRAYS:
            index = struct.unpack("=I", key)[0]
            return m.data.get(key, bytes(value_size)) if index < m.max_entries else None
        if m.type == loader.MAP_LPM_TRIE:
            covering = [k for k in m.data if _lpm_covers(k, key)]
            return m.data[max(covering, key=lambda k: struct.unpack_from("=I", k)[0])] if covering else None
        return m.data.get(key)

    def _put(self, m: Map, key: bytes, value: bytes, flags: int) -> None:
        if len(key) != m.key_size:
            raise _err(errno.EINVAL, "map update")
        have = key in m.data or m.type in ARRAYS
        if flags == loader.NOEXIST and have:
            raise _err(errno.EEXIST, "map update")
        if m.type in ARRAYS and struct.unpack("=I", key)[0] >= m.max_entries:
            raise _err(errno.E2BIG, "map update")
        if not have and len(m.data) >= m.max_entries and m.type != loader.MAP_LRU_HASH:
            raise _err(errno.E2BIG, "map update")
        m.data[key] = bytes(value)

    def update(self, fd: int, key: bytes, value: bytes, flags: int = loader.ANY) -> None:
        m = self._map(fd)
        self.fake._failing("update", m)
        self._put(m, key, value, flags)
        self.fake._written(m)

    def delete(self, fd: int, key: bytes) -> bool:
        m = self._map(fd)
        if m.type in ARRAYS:
            raise _err(errno.EINVAL, "map delete")
        found = m.data.pop(key, None) is not None
        if found:
            self.fake._written(m)
        return found

    def update_many(self, fd: int, keys, values, flags: int = loader.ANY) -> None:
        if not keys:
            return
        m = self._map(fd)
        self.fake._failing("update_many", m)
        for k, v in zip(keys, values):
            self._put(m, k, v, flags)
            self.fake._written(m)

    def delete_many(self, fd: int, keys) -> None:
        if not keys:
            return
        m = self._map(fd)
        self.fake._failing("delete_many", m)
        for k in keys:
            m.data.pop(k, None)
            self.fake._written(m)

    def update_batch_u32(self, fd: int, first: int, values) -> None:
        m = self._map(fd)
        self.fake._failing("update", m)
        for i, v in enumerate(values):
            self._put(m, struct.pack("=I", first + i), struct.pack("=I", v), loader.ANY)
        self.fake._written(m)

    def array_values(self, fd: int, first: int, count: int, value_size: int) -> bytes:
        m = self._map(fd)
        return b"".join(m.data.get(struct.pack("=I", i), bytes(value_size)) for i in range(first, first + count))

    def keys(self, fd: int, key_size: int) -> list[bytes]:
        return self._map(fd).ordered()

    def all_keys(self, fd: int, key_size: int, value_size: int, max_entries: int) -> list[bytes]:
        m = self._map(fd)
        if m.type in ARRAYS:
            return [struct.pack("=I", i) for i in range(m.max_entries)]
        return m.ordered()

    def items(self, fd: int, key_size: int, value_size: int, max_entries: int) -> list[tuple[bytes, bytes]]:
        keys = self.all_keys(fd, key_size, value_size, max_entries)
        return [(k, self.lookup(fd, k, value_size) or b"") for k in keys]

    def digest(self, fd: int, key_size: int, value_size: int, max_entries: int, update) -> int:
        items = self.items(fd, key_size, value_size, max_entries)
        for k, v in items:
            update(k)
            update(v)
        return len(items)

    def next_key(self, fd: int, key: bytes | None, key_size: int) -> bytes | None:
        keys = self._map(fd).ordered()
        if key is None or key not in keys:
            return keys[0] if keys else None
        i = keys.index(key)
        return keys[i + 1] if i + 1 < len(keys) else None

    # the real ones, over next_key and lookup above
    lpm_start = loader.Sys.lpm_start
    lpm_covering = loader.Sys.lpm_covering

    def lpm_run(self, fd: int, key_size: int, value_size: int, first: int, seek=(), expect=None):
        m = self._map(fd)
        keys = [k for k in m.ordered() if k[4] == first]
        return b"".join(keys), b"".join(m.data[k] for k in keys)

    # -- objects

    def pin(self, fd: int, path: str) -> None:
        self.fake._failing("pin")
        if str(Path(path).parent) not in self.fake.dirs:
            raise _err(errno.ENOENT, f"pin {path}")
        if path in self.fake.pins:
            raise _err(errno.EEXIST, f"pin {path}")
        self.fake.pins[path] = self._obj(fd)

    def get(self, path: str) -> int:
        obj = self.fake.pins.get(str(path))
        if obj is None:
            raise _err(errno.ENOENT, f"get {path}")
        return self.fake._fd(obj)

    def map_info(self, fd: int) -> dict:
        m = self._map(fd)
        return {"type": m.type, "id": m.id, "key_size": m.key_size, "value_size": m.value_size,
                "max_entries": m.max_entries, "flags": m.flags, "name": m.name}

    def prog_info(self, fd: int) -> dict:
        p = self._obj(fd)
        if not isinstance(p, Prog):
            raise _err(errno.EINVAL, "not a program")
        return {"type": p.type, "id": p.id, "tag": p.tag, "name": p.name, "map_ids": list(p.map_ids)}

    def prog_load(self, prog_type: int, insns: bytes, license: str, name: str) -> int:
        self.fake._failing("prog_load")
        ids = []
        for off in range(0, len(insns) - 7, 8):  # ld_imm64 of a map fd (objfile.patched)
            if insns[off] == 0x18 and insns[off + 1] >> 4 == loader.PSEUDO_MAP_FD:
                ids.append(self._map(struct.unpack_from("<i", insns, off + 4)[0]).id)
        tag = hashlib.sha1(insns).hexdigest()[:16]
        return self.fake._fd(Prog(self.fake._id(), prog_type, name, tag, sorted(set(ids))))


class _Rtnl:
    """What kernel.current().rtnl() hands out: tc.Rtnl's methods over the model."""

    def __init__(self, fake: FakeBpf):
        self.fake = fake

    def links(self):
        return [(i, ln.type, ln.name, ln.kind, ln.master) for i, ln in sorted(self.fake.links.items())]

    def addresses(self):
        out = []
        for index, link in sorted(self.fake.links.items()):
            for text in link.addresses:
                iface = ipaddress.ip_interface(text)
                af = socket.AF_INET if iface.version == 4 else socket.AF_INET6
                scope = 254 if iface.ip.is_loopback else (253 if iface.ip.is_link_local else 0)
                packed = iface.ip.packed
                out.append((index, af, iface.network.prefixlen, scope, 0, packed if af == socket.AF_INET else b"",
                            packed))
        return out

    def qdiscs(self):
        return [(i, "clsact", *CLSACT) for i in sorted(self.fake.clsact)]

    def filters(self, index: int, hook: str) -> list[TcFilter]:
        if index not in self.fake.clsact:
            return []
        return sorted(self.fake.filters.get((index, hook), []), key=lambda f: (f.prio, f.handle))

    def tc(self, command: str, kind: str, index: int | None = None, **kw) -> None:
        fake = self.fake
        fake.tc_log.append((command, index, kw.get("parent"), kw.get("name")))
        if fake.bpf_failures.get("tc"):
            raise NetlinkError(fake.bpf_failures["tc"].pop(0)[0], "fake: refused")
        if index not in fake.links:
            raise NetlinkError(errno.ENODEV, "No such device")
        if command in ("add", "del"):
            if command == "add" and index in fake.clsact:
                raise NetlinkError(errno.EEXIST, "File exists")
            if command == "del" and index not in fake.clsact:
                raise NetlinkError(errno.EINVAL, "Invalid argument")
            (fake.clsact.add if command == "add" else fake.clsact.discard)(index)
            if command == "del":
                for hook in HOOKS:
                    fake.filters.pop((index, hook), None)
            return
        hook = next(h for h, p in PARENT.items() if p == kw["parent"])
        if index not in fake.clsact:
            raise NetlinkError(errno.EINVAL, "Invalid argument")
        on = fake.filters.setdefault((index, hook), [])
        at = [f for f in on if f.prio == kw["prio"] and f.handle == kw["handle"]]
        if command == "del-filter":
            if not at:
                raise NetlinkError(errno.ENOENT, "No such file or directory")
            on.remove(at[0])
            return
        if command == "add-filter" and at:
            raise NetlinkError(errno.EEXIST, "File exists")
        prog = fake.fds[kw["fd"]]
        new = TcFilter(kw["prio"], kw.get("protocol", 3), kw["handle"], kind, kw["name"], prog.id, prog.tag)
        fake.progs_held[prog.id] = prog  # a filter holds its program
        if at:
            on[on.index(at[0])] = new
        else:
            on.append(new)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FakeBpf(FakeIptables, FakeNft):
    """The node of the ebpf backend: bpf(2), rtnetlink, nf_tables, iptables. Starts with
    lo (index 1) and bpffs mounted at /sys/fs/bpf."""

    name = "fake-ebpf"

    def __init__(self) -> None:
        super().__init__()
        self.pins: dict[str, Map | Prog] = {}
        self.dirs: set[str] = {BPF_ROOT}
        self.fds: dict[int, Map | Prog] = {}
        self.links: dict[int, FakeLink] = {}
        self.clsact: set[int] = set()
        self.filters: dict[tuple[int, str], list[TcFilter]] = {}
        self.progs_held: dict[int, Prog] = {}
        self.tc_log: list[tuple] = []
        self.forgotten: list[tuple] = []  # flows whose conntrack entries were deleted
        self.on_write: list[Callable[[FakeBpf], None]] = []
        self.writes = 0
        self.written: list[str] = []  # the map (kernel name) of each write
        self.bpf_failures: dict[str, list[tuple[int, str | None]]] = {}
        self._next_fd, self._next_id = 100, 1
        self._bpf, self._rtnl = _Bpf(self), _Rtnl(self)
        self.files.update({
            "/proc/self/mountinfo": "22 1 0:20 / /sys rw - sysfs sysfs rw\n"
                                    "40 22 0:33 / /sys/fs/bpf rw - bpf bpf rw,mode=700\n",
            "/proc/filesystems": "nodev\tsysfs\nnodev\tbpf\n",
            "/proc/sys/net/ipv4/ip_local_port_range": "32768\t60999\n",
        })
        self.add_link("lo", ["127.0.0.1/8", "::1/128"], type=ARPHRD_LOOPBACK)

    # -- the seam

    def bpf(self):
        return self._bpf

    def rtnl(self):
        return self._rtnl

    def nft_tables(self, wanted) -> dict:
        return {t: ({1: t[1].encode()} if t in self.tables else None) for t in wanted}

    def conntrack_forget(self, flows: list) -> int:
        self.forgotten += flows
        return len(flows)

    # -- test controls

    def add_link(self, name: str, addresses=(), type: int = ARPHRD_ETHER, kind: str | None = None,
                 master: int = 0) -> int:
        index = max(self.links, default=0) + 1
        self.links[index] = FakeLink(index, name, type, kind, master, list(addresses))
        return index

    def remove_link(self, name: str) -> None:
        index = self.index(name)
        del self.links[index]
        self.clsact.discard(index)
        for hook in HOOKS:
            self.filters.pop((index, hook), None)

    def index(self, name: str) -> int:
        return next(i for i, ln in self.links.items() if ln.name == name)

    def seed_filter(self, link: str, hook: str, prio: int, name: str, kind: str = "bpf") -> None:
        """Someone else's filter (Cilium's, a hand's) on a link, with the clsact it needs."""
        index = self.index(link)
        self.clsact.add(index)
        prog = Prog(self._id(), loader.PROG_SCHED_CLS, name.split("/")[-1][:15], "f0f0f0f0f0f0f0f0", [])
        self.progs_held[prog.id] = prog
        self.filters.setdefault((index, hook), []).append(TcFilter(prio, 3, 1, kind, name, prog.id, prog.tag))

    def fail_bpf(self, op: str, error: int = errno.ENOMEM, map: str | None = None) -> None:
        """The next bpf `op` (map_create, update, update_many, delete_many, prog_load, pin;
        with `map`, one on the map of that kernel name, ipmq_ctl) or tc change (`tc`) fails
        with errno `error` (fail_next: iptables' tools)."""
        self.bpf_failures.setdefault(op, []).append((error, map))

    def map(self, name: str) -> Map:
        """A pinned map by its pin name (cfg, exempt4, ...)."""
        obj = self.pins[f"{pin_dir()}/{name}"]
        assert isinstance(obj, Map)
        return obj

    def live_gen(self) -> int:
        return struct.unpack("=I", self.map("ctl").data.get(bytes(4), bytes(4)))[0] & 1

    def trie(self, name: str, gen: int) -> list[str]:
        """The prefixes of one generation of a trie (exempt4, src6, ...)."""
        m = self.map(name)
        return [p for g, p in map(_prefix, m.ordered()) if g == gen]

    def open_fds(self) -> list[int]:
        return sorted(self.fds)

    def dump(self) -> str:
        """Everything, canonical: node_text (the pins, the links with their qdisc and
        filters), then the nft tables and the iptables rules."""
        text = node_text(self._bpf, self._rtnl, pin_dir())
        return text + "-- nft\n" + FakeNft.dump(self) + "-- iptables\n" + FakeIptables.dump(self)

    # -- internals

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _fd(self, obj) -> int:
        self._next_fd += 1
        self.fds[self._next_fd] = obj
        return self._next_fd

    def _failing(self, op: str, on: Map | None = None) -> None:
        pending = self.bpf_failures.get(op, [])
        for i, (code, name) in enumerate(pending):
            if name is None or (on is not None and on.name == name):
                del pending[i]
                raise _err(code, op)

    def _written(self, m: Map) -> None:
        self.writes += 1
        self.written.append(m.name)
        for check in self.on_write:
            check(self)


def _prefix(key: bytes) -> tuple[int, str]:
    plen, gen = struct.unpack_from("=IB", key)
    addr = key[5:]
    return gen, str(ipaddress.ip_network((addr, plen - 8), strict=False))


def _contents(m: Map) -> list[str]:
    """A map's entries as lines: trie keys as generation and prefix; arrays without their
    zero entries (the port tables, 131072 entries: a count and a digest)."""
    if m.type == loader.MAP_LPM_TRIE and m.key_size in (9, 21):
        return [f"gen {g} {p} = {m.data[k].hex()}" for k, (g, p) in
                sorted(((k, _prefix(k)) for k in m.data), key=lambda kv: (kv[1][0], kv[0][5:], kv[0][:4]))]
    keys = [k for k in m.ordered() if any(m.data[k])] if m.type in ARRAYS else sorted(m.data)
    if len(keys) > 64:
        h = hashlib.sha256(b"".join(k + m.data[k] for k in keys)).hexdigest()[:16]
        return [f"{len(keys)} entries sha256 {h}"]
    return [f"{k.hex()} = {m.data[k].hex()}" for k in keys]


def node_text(sysobj, rt, directory: Path) -> str:
    """The canonical text of what the ebpf backend keeps in a kernel, asked through the
    seam's handles (kernel.current().bpf(), .rtnl()): FakeBpf's or a real node's alike
    (test_ebpf_decisions.py compares the two). The pins under `directory` by name (maps
    with shape and contents, programs with the pinned maps they use), then each link with
    its addresses (not link-local ones), its clsact qdisc and the filters on it."""
    out = [f"pins {'none' if sysobj.listdir(directory) is None else ''}".rstrip()]
    progs: dict[int, str] = {}
    maps: dict[int, str] = {}
    shown: list[tuple[str, object]] = []
    for name in sorted(sysobj.listdir(directory) or []):
        fd = sysobj.get(str(Path(directory) / name))
        try:
            if name.startswith("prog_"):
                info = sysobj.prog_info(fd)
                progs[info["id"]] = name
                shown.append((name, info))
                continue
            info = sysobj.map_info(fd)
            maps[info["id"]] = name
            size = info["value_size"]
            if info["type"] in loader.PERCPU_TYPES:
                size = (size + 7) // 8 * 8 * loader.possible_cpus()
            items = dict(sysobj.items(fd, info["key_size"], size, info["max_entries"]))
            m = Map(info["id"], info["type"], info["key_size"], info["value_size"], info["max_entries"],
                    info["flags"], name, items)
            shown.append((name, m))
        finally:
            sysobj.close(fd)
    for name, obj in shown:
        if isinstance(obj, Map):
            out.append(f"map {name}: {TYPE_NAMES.get(obj.type, obj.type)} key {obj.key_size} value "
                       f"{obj.value_size} max {obj.max_entries} flags {obj.flags}")
            out += [f"  {line}" for line in _contents(obj)]
        else:
            assert isinstance(obj, dict)
            used = sorted(maps[i] for i in obj["map_ids"] if i in maps)
            out.append(f"prog {name}: {PROG_NAMES.get(obj['type'], obj['type'])} {obj['name']} maps {','.join(used)}")
    addresses: dict[int, list[tuple[int, bytes, int]]] = {}
    for index, af, plen, scope, _flags, _local, address in rt.addresses():
        if scope != 253:
            addresses.setdefault(index, []).append((af, address, plen))
    clsact = {q[0] for q in rt.qdiscs() if q[1] == "clsact"}
    for index, _type, name, kind, master in sorted(rt.links()):
        shown_addrs = [f"{socket.inet_ntop(af, a)}/{plen}" for af, a, plen in sorted(addresses.get(index, []))]
        out.append(f"link {index} {name}" + (f" {kind}" if kind else "") + (f" master {master}" if master else "")
                   + "".join(f" {a}" for a in shown_addrs) + (" clsact" if index in clsact else ""))
        for hook in HOOKS if index in clsact else ():
            for f in rt.filters(index, hook):
                if f.name is None and f.prog_id is None:
                    continue  # the kernel's line for a priority itself (handle 0)
                prog = progs.get(f.prog_id or -1) or ("unpinned" if f.ours else "foreign")
                out.append(f"  {hook} pref {f.prio} handle {f.handle} {f.kind} {f.name} prog {prog}")
    return "\n".join(out) + "\n"
