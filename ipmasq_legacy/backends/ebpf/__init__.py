"""ebpf backend: source NAT in BPF programs on tc (clsact), the way Cilium's eBPF mode does.

What it installs (shapes and tunables: rules/ebpf.yaml; the datapath: bpf/masq.c):

* maps pinned under IPMASQ_BPF_DIR (default /sys/fs/bpf/ipmasq_legacy), one file each,
  created from the definitions in the object's BTF (sizes from rules/ebpf.yaml) or
  reused when already pinned with the same shape, so NAT entries survive every apply;
* the two programs of bpf/masq.o, loaded with bpf(2) from Python (bpf/loader.py) and
  pinned beside the maps; reloaded only when the object changed;
* one direct-action bpf filter per hook (ingress and egress) of every interface that
  matches `egress-masquerade-interfaces`, named `ipmasq_legacy/<hook>/<digest>`, on a
  clsact qdisc that is added where none exists (and only then removed again).

Atomic config changes: the decision's data (flags, ports, the exempt and source LPM
tries) exists in two generations; apply reads the idle one back and writes only what
differs from the plan there, then flips `ipmq_ctl.gen` with one map write. Packets see
the old config or the new one, never a mix, and no program is reloaded and no NAT entry
lost. The old generation stays as it was (the idle one of the next change).

Switching: to ebpf from netfilter, the programs go live while netfilter still
masquerades (packets netfilter already translated are left alone); an empty nat chain
(`table ip ipmasq_legacy_drain`) keeps netfilter's NAT of its established connections
working after its rules are gone, until conntrack holds no such connection. From ebpf to
netfilter, `remove` (called after the new backend is live) keeps the programs in drain
mode: the flows they translate keep being translated, no new flow is; `reap` removes
them once those flows have gone quiet, `flush` at once.
"""

from __future__ import annotations

import array
import errno
import hashlib
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import NamedTuple

from ... import netlink, ruledata, state
from ...bpf import loader
from ...errors import ApplyError
from ...netlink import NETLINK_ROUTE
from ...plan import FamilyPlan, Plan
from ..base import FAMILIES, Backend, FamilyLive, Live, RuleCounter
from . import assist, node
from .layout import (
    CFG,
    CTL,
    F_ANY_SRC4,
    F_ANY_SRC6,
    F_DRAIN,
    F_RANDOM,
    F_V4,
    F_V6,
    LPM,
    N_CLOSED,
    N_FOREIGN,
    NAT_KEY,
    NAT_VAL,
    STATS,
)
from .links import IF_DRAIN, IFACE, Link, dump_addresses, dump_links, matching_links, read_links

SHAPES = ruledata.load("ebpf")
PIN_ENV = "IPMASQ_BPF_DIR"
OBJECT_ENV = "IPMASQ_BPF_OBJECT"
MAP_PREFIX = "ipmq_"
HOOKS = ("ingress", "egress")
PROGRAMS = {"ingress": "ipmq_ingress", "egress": "ipmq_egress", "nf": "ipmq_nf", "guard": "ipmq_guard"}  # pinned as prog_<key>
PROG_TYPES = {"ingress": loader.PROG_SCHED_CLS, "egress": loader.PROG_SCHED_CLS, "nf": loader.PROG_SOCKET_FILTER,
              "guard": loader.PROG_SOCKET_FILTER}
PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}  # TC_H_CLSACT:TC_H_MIN_{INGRESS,EGRESS}
FILTER = SHAPES["filter_name"]
BPF_FS_MAGIC = 0xCAFE4A11
PORTS = 65536
MAX_RETRIES = 64  # masq.c's bound

TRIES = {"exempt": {4: "ipmq_exempt4", 6: "ipmq_exempt6"}, "sources": {4: "ipmq_src4", 6: "ipmq_src6"}}
TRIE_FAMILY = {name: family for kinds in TRIES.values() for family, name in kinds.items()}
TRIE_VALUE = b"\x01"  # the value of every trie entry (the datapath looks for the key only)
TRIE_NOTES = "ebpf-tries.json"  # in the state directory: see trie_notes()


def pin_dir() -> Path:
    return Path(os.environ.get(PIN_ENV) or SHAPES["pin_dir"])


def object_path() -> Path:
    env = os.environ.get(OBJECT_ENV)
    return Path(env) if env else Path(loader.__file__).with_name(SHAPES["object"])


def pin_name(map_name: str) -> str:
    return map_name.removeprefix(MAP_PREFIX)


def filter_name(hook: str, digest: str) -> str:
    return f"{FILTER}/{hook}/{digest[:12]}"


# ---------------------------------------------------------------- pure: plan -> map contents


def local_port_range(text: str | None = None) -> tuple[int, int]:
    """The node's ephemeral range (net.ipv4.ip_local_port_range, per network namespace)."""
    if text is None:
        try:
            text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        except OSError:
            text = "32768 60999"
    lo, hi = (int(x) for x in text.split()[:2])
    return lo, hi


def parse_ranges(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in str(text).replace(",", " ").split():
        a, _, b = part.partition("-")
        out.append((int(a), int(b or a)))
    return tuple(out)


def translated_ports(to_ports, ephemeral: tuple[int, int]) -> list[int]:
    """Translated source ports: `masquerade-to-ports` (else rules/ebpf.yaml's default)
    minus the node's ephemeral range, so they never collide with the node's own."""
    ranges = to_ports or parse_ranges(SHAPES["port_ranges"])
    lo, hi = ephemeral
    ports = []
    for first, last in ranges:
        ports += [p for p in range(first, last + 1) if not lo <= p <= hi and p > 0]
    return sorted(set(ports))


def port_spans(ports: list[int]) -> list[tuple[int, int]]:
    spans = []
    for p in ports:
        if spans and spans[-1][1] == p - 1:
            spans[-1] = (spans[-1][0], p)
        else:
            spans.append((p, p))
    return spans


def cfg_value(families: dict[int, FamilyPlan | None], ports: list[int], drain: bool = False) -> bytes:
    flags = 0
    any_plan = next((fp for fp in families.values() if fp is not None), None)
    for family, fp in families.items():
        if fp is None:
            continue
        flags |= F_V4 if family == 4 else F_V6
        if not fp.sources:
            flags |= F_ANY_SRC4 if family == 4 else F_ANY_SRC6
    if any_plan is not None and any_plan.random_fully:
        flags |= F_RANDOM
    if drain:
        flags |= F_DRAIN
    retries = max(1, min(int(SHAPES["port_retries"]), MAX_RETRIES))
    crc = zlib.crc32(array.array("I", ports).tobytes())
    return CFG.pack(flags, retries, len(ports), crc, tries_digest(families))


def port_tables(ports: list[int]) -> tuple[array.array, array.array]:
    """One generation of `ipmq_ports` (the translated ports, then zeros) and of
    `ipmq_portidx` (port -> its place in the first, counted from 1; 0: not translated)."""
    table = array.array("I", ports) + array.array("I", [0]) * (PORTS - len(ports))
    index = array.array("I", [0]) * PORTS
    for i, port in enumerate(ports):
        index[port] = i + 1
    return table, index


def tries_digest(families: dict[int, FamilyPlan | None]) -> bytes:
    """What the LPM tries of a generation hold, as one digest: a generation goes live
    only once its tries are written, so comparing this is comparing the tries."""
    text = "\n".join(f"{family} {kind} {' '.join(getattr(fp, kind))}" for family, fp in sorted(families.items())
                     if fp is not None for kind in ("sources", "exempt"))
    return hashlib.sha256(text.encode()).digest()


def lpm_key(family: int, gen: int, prefix: str) -> bytes:
    """The trie key of a (normalised) prefix in one generation."""
    addr, _, plen = str(prefix).partition("/")
    try:
        packed = socket.inet_pton(socket.AF_INET if family == 4 else socket.AF_INET6, addr)
    except OSError:
        raise ApplyError(f"prefix {prefix} is not an IPv{family} prefix") from None
    bits = int(plen) if plen else len(packed) * 8
    return LPM[family].pack(8 + bits, gen, packed)


def lpm_key_list(family: int, gen: int, prefixes) -> list[bytes]:
    """lpm_key of many prefixes at once, in their order (100,000 in about 0.035 s)."""
    af, full = (socket.AF_INET, 32) if family == 4 else (socket.AF_INET6, 128)
    head = {str(n): struct.pack("=IB", 8 + n, gen) for n in range(full + 1)}  # prefix length and generation
    head[""] = head[str(full)]
    pton = socket.inet_pton
    try:
        return [head[plen] + pton(af, addr) for addr, _, plen in map(str.partition, map(str, prefixes), repeat("/"))]
    except (OSError, KeyError, ValueError):
        return [lpm_key(family, gen, p) for p in prefixes]  # names the bad prefix


def lpm_keys(family: int, gen: int, prefixes) -> set[bytes]:
    return set(lpm_key_list(family, gen, prefixes))


def trie_diff(want: list[bytes], have: bytes, key_size: int) -> tuple[list[bytes], list[bytes]]:
    """(missing, extra): the keys of `want` not in `have` (keys end to end, as the
    kernel hands them over), those of `have` not in `want`. A plan's prefixes are
    sorted and disjoint, the order the kernel walks a trie in: only the stretch between
    the longest common beginning and the longest common end (bisected, compared in C)
    is compared as sets, so a change costs what it changes. Any order gives the right
    answer (a longer stretch)."""
    if not have or not want:  # a first write, or all to go
        return list(want), [have[i:i + key_size] for i in range(0, len(have), key_size)]
    wanted = b"".join(want)
    if wanted == have:
        return [], []
    nw, nh = len(want), len(have) // key_size

    def common(match) -> int:  # the largest k with match(k) true, match monotone
        lo, hi = 0, min(nw, nh)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if match(mid) else (lo, mid - 1)
        return lo

    first = common(lambda k: wanted[:k * key_size] == have[:k * key_size])
    last = min(common(lambda k: wanted[len(wanted) - k * key_size:] == have[len(have) - k * key_size:]),
               min(nw, nh) - first)
    w = set(want[first:nw - last])
    h = {have[i:i + key_size] for i in range(first * key_size, (nh - last) * key_size, key_size)}
    return list(w - h), list(h - w)


def lpm_prefix(family: int, key: bytes) -> tuple[int, str]:
    plen, gen, addr = LPM[family].unpack(key)
    net = ipaddress.ip_network((addr, plen - 8), strict=False)
    return gen, str(net)


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


def seek_keys(name: str, gen: int, notes: dict, prefixes=()) -> list[bytes]:
    """Keys that may lie just before generation `gen` of a trie, in the kernel's order
    (generation 1 comes after the whole of generation 0; nothing comes before 0): the
    one the last apply noted, then the last prefixes of `prefixes` (sorted, as a plan's
    are) in generation 0, which mostly holds a plan one change away from this one."""
    if gen == 0:
        return []
    out = []
    try:
        out.append(bytes.fromhex(notes[name]["seek"]))
    except (KeyError, TypeError, ValueError):
        pass
    return out + [lpm_key(TRIE_FAMILY[name], 0, p) for p in prefixes[-1:-3:-1]]


def noted_count(name: str, gen: int, notes: dict) -> int | None:
    try:
        count = notes[name]["count"][gen]
    except (KeyError, IndexError, TypeError):
        return None
    return count if isinstance(count, int) and count >= 0 else None


def addr16(text: str) -> bytes:
    ip = ipaddress.ip_address(text)
    return ip.packed if ip.version == 6 else bytes(12) + ip.packed


def addr_text(raw: bytes, family: int) -> str:
    return str(ipaddress.ip_address(raw[12:] if family == 4 else raw))


# ---------------------------------------------------------------- netlink, spelled out
#
# The reads (the nft tables we own; links, addresses, qdiscs and tc filters, for the
# fingerprint and for every apply) speak netlink through ..netlink: importing pyroute2
# alone costs 0.1 s, more than all of those requests together. pyroute2 does the
# writes (tc filters and qdiscs, conntrack).

RTM_GETQDISC, RTM_GETTFILTER = 38, 46
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_NAME, TCA_BPF_TAG, TCA_BPF_ID = 7, 10, 11
TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info


# ---------------------------------------------------------------- the node's links


class _LazyIPRoute:
    """pyroute2's IPRoute, imported (0.1 s) and opened at its first use: what apply
    reads (links, addresses, qdiscs, filters) it asks over ..netlink; only a tc change
    (or conntrack) needs pyroute2."""

    def __init__(self):
        self._ipr = None

    def __getattr__(self, name):
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return getattr(self._ipr, name)

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()


def _ipr() -> _LazyIPRoute:
    return _LazyIPRoute()


class TcFilter(NamedTuple):
    prio: int
    protocol: int
    handle: int
    kind: str | None
    name: str | None  # a bpf filter's name
    prog_id: int | None  # a bpf filter's program
    tag: str  # a bpf filter's program tag, hex ("" for others)

    @property
    def ours(self) -> bool:
        return self.kind == "bpf" and bool(self.name) and self.name.startswith(FILTER + "/")


def _tc_filters(nl, index: int, hook: str) -> list[TcFilter]:
    """The filters on one clsact hook of a link; none where the link has no clsact qdisc."""
    try:
        msgs = nl.request(RTM_GETTFILTER, TCMSG.pack(0, index, 0, PARENT[hook], 0), dump=True)
    except OSError:  # no clsact qdisc: nothing attached
        return []
    out = []
    for _kind, msg in msgs:
        _family, _index, handle, _parent, info = TCMSG.unpack_from(msg)
        attrs = netlink.attrs(msg, TCMSG.size)
        opts = netlink.attrs(attrs[TCA_OPTIONS]) if TCA_OPTIONS in attrs else {}
        prog_id = struct.unpack("=I", opts[TCA_BPF_ID])[0] if len(opts.get(TCA_BPF_ID, b"")) == 4 else None
        out.append(TcFilter(info >> 16, info & 0xFFFF, handle, netlink.text(attrs.get(TCA_KIND)),
                            netlink.text(opts.get(TCA_BPF_NAME)), prog_id, opts.get(TCA_BPF_TAG, b"").hex()))
    return out


def _filters(index: int, nl=None) -> dict[str, list[dict]]:
    """Our bpf filters on each hook of a link: [{prio, handle, name, id}]."""
    if nl is None:
        with netlink.Netlink(NETLINK_ROUTE) as own:
            return _filters(index, own)
    out: dict[str, list[dict]] = {h: [] for h in HOOKS}
    for hook in HOOKS:
        out[hook] = [{"prio": f.prio, "handle": f.handle, "name": f.name, "id": f.prog_id}
                     for f in _tc_filters(nl, index, hook) if f.ours]
    return out


def _dump_qdiscs(nl) -> list[tuple[int, str | None, int, int]]:
    """(index, kind, handle, parent) of every qdisc."""
    out = []
    for _kind, msg in nl.request(RTM_GETQDISC, bytes(TCMSG.size), dump=True):
        _family, index, handle, parent, _info = TCMSG.unpack_from(msg)
        out.append((index, netlink.text(netlink.attrs(msg, TCMSG.size).get(TCA_KIND)), handle, parent))
    return out


def _has_clsact(index: int) -> bool:
    with netlink.Netlink(NETLINK_ROUTE) as nl:
        return any(i == index and kind == "clsact" for i, kind, _handle, _parent in _dump_qdiscs(nl))


def _other_filters(index: int) -> int:
    """Filters on the clsact hooks of a link that are not ours."""
    with netlink.Netlink(NETLINK_ROUTE) as nl:
        return sum(1 for hook in HOOKS for f in _tc_filters(nl, index, hook) if f.kind and not f.ours)


# ---------------------------------------------------------------- pinned maps


class Pinned:
    """The pinned maps (and programs) of one pin directory, opened on demand."""

    def __init__(self, obj: loader.BpfObject | None, directory: Path | None = None, sysobj=None):
        self.dir = directory or pin_dir()
        self.obj = obj
        self.sys = sysobj or loader.Sys()
        self.fds: dict[str, int] = {}
        self.defs: dict[str, loader.MapDef] = {}
        self.ids: dict[str, int] = {}  # kernel map id of each opened pin

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.ids.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def path(self, name: str) -> Path:
        return self.dir / pin_name(name)

    def exists(self) -> bool:
        return self.path("ipmq_ctl").exists()

    def wanted(self, name: str) -> loader.MapDef:
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
        self.dir.mkdir(parents=True, exist_ok=True)
        created = []
        for name in self.obj.maps:
            if self.open(name) is not None and self.compatible(name):
                continue
            if name in self.fds:
                os.close(self.fds.pop(name))
                self.path(name).unlink()
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

    def trie(self, kind: str, family: int, gen: int | None = None) -> tuple[str, ...]:
        """Prefixes of one generation of a trie, sorted (None: all generations)."""
        name = TRIES[kind][family]
        if gen is None:
            keys = self.keys(name)
        else:
            raw = self.generation(name, gen, seek_keys(name, gen, trie_notes()))[0]
            size = self.defs[name].key_size
            keys = [raw[i:i + size] for i in range(0, len(raw), size)]
        out = []
        for key in keys:
            g, prefix = lpm_prefix(family, key)
            if gen is None or g == gen:
                out.append(ipaddress.ip_network(prefix))
        return tuple(str(n) for n in sorted(out))

    def generation(self, name: str, gen: int, seek=(), expect: int | None = None
                   ) -> tuple[bytes, list[bytes], list[bytes]]:
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
        return raw, wrong, self.sys.lpm_covering(fd, key_size, value_size, gen)[1]

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


# ---------------------------------------------------------------- helpers: netfilter side
#
# Two small nft tables of our own (nothing else of netfilter is touched):
#   inet ipmasq_legacy_ebpf   while ebpf is installed: one `ct state` rule, so conntrack
#                             tracks flows from their first packet. A netfilter backend
#                             installed later then sees our flows as established and
#                             leaves them to us, instead of picking them up mid-stream
#                             as new and masquerading them again with another port.
#   ip/ip6 ipmasq_legacy_drain   after a switch from netfilter: an empty nat chain that
#                             keeps netfilter's NAT hooks registered, so the connections
#                             netfilter translated keep being translated, until conntrack
#                             holds none.

KEEPER_TABLE = f"{SHAPES['filter_name']}_ebpf"
DRAIN_TABLE = f"{SHAPES['filter_name']}_drain"
KEEPER = (f"table inet {KEEPER_TABLE} {{\n\tchain conntrack {{\n"
          "\t\ttype filter hook prerouting priority filter; policy accept;\n"
          "\t\tct state untracked accept\n\t}\n}\n")


def _nft(text: str) -> tuple[int, str]:
    try:
        proc = subprocess.run(["nft", "-f", "-"], input=text, capture_output=True, text=True)
    except FileNotFoundError:
        return 127, "nft: command not found"
    return proc.returncode, proc.stderr


DRAIN_TABLES = (("ip", DRAIN_TABLE), ("ip6", DRAIN_TABLE))
KEEPER_TABLES = (("inet", KEEPER_TABLE),)


def _nft_tables(wanted=DRAIN_TABLES + KEEPER_TABLES) -> set[tuple[str, str]]:
    """Which of the tables `wanted` exist (none when nft is missing or nf_tables cannot
    be asked, as `nft list tables` failing said before)."""
    if shutil.which("nft") is None:
        return set()
    try:
        found = netlink.nft_tables(wanted)
    except OSError:
        return set()
    return {table for table, attrs in found.items() if attrs is not None}


def drain_tables_present(tables: set | None = None) -> list[str]:
    tables = _nft_tables(DRAIN_TABLES) if tables is None else tables
    return [fam for fam in ("ip", "ip6") if (fam, DRAIN_TABLE) in tables]


def keeper_present(tables: set | None = None) -> bool:
    tables = _nft_tables(KEEPER_TABLES) if tables is None else tables
    return ("inet", KEEPER_TABLE) in tables


def add_keeper() -> bool:
    if shutil.which("nft") is None:
        return False
    return _nft(f"add table inet {KEEPER_TABLE}\ndelete table inet {KEEPER_TABLE}\n" + KEEPER)[0] == 0


def add_drain_tables() -> bool:
    if shutil.which("nft") is None:
        return False
    text = ""
    for fam in ("ip", "ip6"):
        text += (f"table {fam} {DRAIN_TABLE} {{\n\tchain postrouting {{\n"
                 "\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t}\n}\n")
    return _nft(text)[0] == 0


def delete_tables(drain: bool = True, keeper: bool = True) -> list[str]:
    tables = _nft_tables()
    text = ""
    gone = []
    if drain:
        for fam in drain_tables_present(tables):
            text += f"delete table {fam} {DRAIN_TABLE}\n"
            gone.append(f"{fam} {DRAIN_TABLE}")
    if keeper and keeper_present(tables):
        text += f"delete table inet {KEEPER_TABLE}\n"
        gone.append(f"inet {KEEPER_TABLE}")
    if text:
        _nft(text)
    return gone


def netfilter_snat_tuples() -> list[tuple[int, int, bytes, bytes, int, int]]:
    """Reply tuples of the connections conntrack source-NATs."""
    return conntrack_tuples(["--src-nat"], reply=True)


def conntrack_tuples(filters: list[str], reply: bool) -> list[tuple[int, int, bytes, bytes, int, int]]:
    """(family, proto, src, dst, sport, dport) of conntrack's entries (`conntrack -L` with
    `filters`), the original or the reply tuple, ports (ICMP: the echo id) in host order."""
    if shutil.which("conntrack") is None:
        return []
    out = []
    which = 1 if reply else 0
    for fam, family in (("ipv4", 4), ("ipv6", 6)):
        proc = subprocess.run(["conntrack", "-L", "-f", fam, *filters], capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            words = line.split()
            if len(words) < 6 or not words[1].isdigit():
                continue
            proto = int(words[1])
            found: dict[str, list[str]] = {"src": [], "dst": [], "sport": [], "dport": [], "id": []}
            for word in words[2:]:
                key, sep, value = word.partition("=")
                if sep and key in found:
                    found[key].append(value)
            if len(found["src"]) < 2 or len(found["dst"]) < 2:
                continue
            ports = found["id"] * 2 if proto in (socket.IPPROTO_ICMP, 58) else None
            if ports is None:
                if len(found["sport"]) < 2:
                    sport = dport = 0  # a protocol without ports
                else:
                    sport, dport = int(found["sport"][which]), int(found["dport"][which])
            else:
                sport = dport = int(found["id"][min(which, len(found["id"]) - 1)]) if found["id"] else 0
            try:
                out.append((family, proto, addr16(found["src"][which]), addr16(found["dst"][which]), sport, dport))
            except ValueError:
                continue
    return out


def forget_conntrack(flows) -> int:
    """Delete conntrack's entries of flows we translated (original tuples), so that a
    netfilter backend sees their next packet as new and masquerades it, instead of
    taking them for established connections without NAT (our conntrack keeper made
    conntrack track them untranslated). Returns how many went."""
    try:
        from pyroute2 import Conntrack
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
    except ImportError:
        return 0
    flows = list(flows)
    if not flows:
        return 0
    gone = 0
    sockets = {}
    try:
        for family, proto, src, dst, sport, dport in flows:
            af = socket.AF_INET if family == 4 else socket.AF_INET6
            if af not in sockets:
                sockets[af] = Conntrack(nfgen_family=af)
            kw = {"family": af, "saddr": addr_text(src, family), "daddr": addr_text(dst, family), "proto": proto}
            if proto in (socket.IPPROTO_ICMP, 58):
                kw.update(icmp_id=sport, icmp_type=8 if family == 4 else 128, icmp_code=0)
            else:
                kw.update(sport=sport, dport=dport)
            try:
                sockets[af].entry("del", tuple_orig=NFCTAttrTuple(**kw))
                gone += 1
            except Exception:
                continue
    finally:
        for sock in sockets.values():
            sock.close()
    return gone


class _Background(threading.Thread):
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


# ---------------------------------------------------------------- the backend


@dataclass
class EbpfFamilyLive(FamilyLive):
    attached: dict[str, dict[str, str]] = field(default_factory=dict)  # link -> hook -> filter name


class EbpfBackend(Backend):
    name = "ebpf"

    def __init__(self):
        self._obj: loader.BpfObject | None = None
        self.reloaded = False  # _programs loaded programs anew (the assist must take the new one)

    # -- availability

    def obj(self) -> loader.BpfObject:
        if self._obj is None:
            try:
                self._obj = loader.read_object(str(object_path()))
            except loader.ObjectError as exc:
                raise ApplyError(f"BPF object: {exc}") from None
        return self._obj

    def unavailable_reason(self) -> str | None:
        if loader.syscall_number() is None:
            return f"no bpf(2) syscall number known for this machine ({os.uname().machine})"
        path = object_path()
        if not path.exists():
            return (f"the BPF object {path} is not built: run `bash scripts/setup` (it installs clang, llvm "
                    "and libbpf-dev and compiles ipmasq_legacy/bpf/masq.c)")
        try:
            self.obj()
        except ApplyError as exc:
            return str(exc)
        if memlock := loader.raise_memlock():
            return memlock
        try:
            sysobj = loader.Sys()
            for map_type, key, value, flags in ((loader.MAP_LPM_TRIE, 9, 1, 1), (loader.MAP_LRU_HASH, 40, 32, 0),
                                                (loader.MAP_PERCPU_ARRAY, 4, 8, 0)):
                os.close(sysobj.map_create(map_type, key, value, 4, flags, "ipmq_probe"))
        except loader.BpfError as exc:
            why = "not permitted (needs root: CAP_BPF and CAP_NET_ADMIN)" if exc.errno == errno.EPERM else exc.strerror
            return f"the kernel refuses BPF maps: {why}"
        if verifier := self._verifier_reason(sysobj):
            return verifier
        if lacking := assist.missing():
            return f"missing {', '.join(lacking)} (the netfilter assist: install the iptables package)"
        bpffs = _bpffs_reason(pin_dir())
        if bpffs and bpffs != "mount":
            return bpffs
        return None

    VERIFIER_RECORD = "ebpf-verifier.json"

    def _verifier_reason(self, sysobj: loader.Sys) -> str | None:
        """Whether this kernel's verifier takes every program of the object: each loaded
        once against throw-away maps of the object's shapes (hash maps of one entry: their
        size does not change what the verifier sees), then closed. An older verifier may
        refuse what a newer one takes (Debian 11's 5.10: "The sequence of 8193 jumps is
        too complex"), which only a load tells. Kept in the state directory per kernel and
        object: a load costs the verifier's time (0.1-2 s)."""
        obj = self.obj()
        key = f"{os.uname().release} {obj.digest}"
        record = state.read_json(self.VERIFIER_RECORD)
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
                    os.close(sysobj.prog_load(PROG_TYPES[hook], loader.patched(prog, fds), obj.license, prog.name))
                except loader.BpfError as exc:
                    verdict = f"kernel {os.uname().release}'s verifier refuses program {prog.name}: {exc.strerror}"
                    break
        except loader.BpfError as exc:
            return f"the kernel refuses BPF maps of the object: {exc.strerror}"  # not kept: may be passing
        finally:
            for fd in fds.values():
                os.close(fd)
        try:
            state.write_json(self.VERIFIER_RECORD, {**record, key: verdict})
        except OSError:
            pass
        return verdict

    # -- rendering

    def render(self, plan: Plan) -> str:
        families = self.wanted_families(plan)
        ports = translated_ports(next((fp.to_ports for fp in plan.families), ()), local_port_range())
        d = str(pin_dir())
        lines = [
            f"# ebpf: programs ipmq_egress / ipmq_ingress of {object_path()} on tc clsact (direct action),",
            f"# pref {SHAPES['tc_priority']} handle {SHAPES['tc_handle']}, of every interface matching "
            + (", ".join(plan.interfaces) if plan.interfaces else "any but lo"),
            f"# maps pinned under {d}; bpftool batch syntax, generation 0 shown (apply writes the idle one, then",
            "# flips ctl). Translated source ports: "
            + (", ".join(f"{a}-{b}" if a != b else str(a) for a, b in port_spans(ports)) or "none"),
            f"map update pinned {d}/cfg key hex 00 00 00 00 value hex {cfg_value(families, ports).hex(' ')}",
        ]
        for family in FAMILIES:
            fp = families[family]
            if fp is None:
                lines.append(f"# IPv{family}: disabled")
                continue
            lines.append(f"# IPv{family}: sources " + (", ".join(fp.sources) or "any")
                         + f"; {len(fp.exempt)} exempt prefixes")
            for kind, prefixes in (("sources", fp.sources), ("exempt", fp.exempt)):
                pin = pin_name(TRIES[kind][family])
                for prefix in prefixes:
                    lines.append(f"map update pinned {d}/{pin} key hex {lpm_key(family, 0, prefix).hex(' ')} "
                                 f"value hex 01  # {prefix}")
        lines.append(f"map update pinned {d}/ctl key hex 00 00 00 00 value hex 00 00 00 00")
        return "\n".join(lines) + "\n"

    # -- reading

    def _read(self) -> tuple[dict, Pinned | None]:
        """(facts, pinned-or-None). Facts: gen, cfg, tries, attached filters, iface map.
        Over ..netlink and bpf(2): no pyroute2."""
        facts: dict = {"attached": {}, "ifaces": {}, "installed": False}
        links = read_links()
        facts["links"] = links
        with netlink.Netlink(NETLINK_ROUTE) as nl:
            for index in links:
                f = _filters(index, nl)
                if any(f.values()):
                    facts["attached"][index] = {h: [(x["name"], x["id"]) for x in v] for h, v in f.items()}
        pinned = None
        if pin_dir().joinpath("ctl").exists():
            try:
                pinned = Pinned(self.obj())
            except ApplyError:
                pinned = Pinned(None)
            if pinned.open("ipmq_ctl") is None:
                pinned.close()
                pinned = None
        if pinned is not None:
            facts["installed"] = True
            gen = pinned.gen()
            facts["gen"] = gen
            facts["cfg"] = pinned.cfg(gen)
            if pinned.open("ipmq_ifaces") is not None:
                facts["ifaces"] = {struct.unpack("=I", k)[0]: v for k, v in pinned.items("ipmq_ifaces")}
        return facts, pinned

    def live(self) -> Live:
        facts, pinned = self._read()
        families = {}
        try:
            flags = CFG.unpack(facts["cfg"])[0] if facts.get("installed") else 0
            drain = bool(flags & F_DRAIN)
            links = facts["links"]
            attached_names = {links[i].name if i in links else f"if{i}": hooks for i, hooks in facts["attached"].items()}
            counters = pinned.if_counters() if pinned is not None and pinned.open("ipmq_ifstats") is not None else {}
            for family in FAMILIES:
                on = bool(flags & (F_V4 if family == 4 else F_V6)) and not drain
                fl = EbpfFamilyLive(family=family, installed=on)
                if on and pinned is not None:
                    gen = facts["gen"]
                    fl.exempt = pinned.trie("exempt", family, gen) if pinned.open(TRIES["exempt"][family]) is not None else ()
                    fl.attached = attached_names
                    for name, hooks in sorted(attached_names.items()):
                        for hook in HOOKS:
                            for fname, _id in hooks.get(hook, []):
                                fl.rules.append(f"tc {hook} {name}: bpf da {fname}")
                    for (index, fam), (packets, nbytes) in sorted(counters.items()):
                        if fam != family:
                            continue
                        name = links[index].name if index in links else f"if{index}"
                        fl.counters.append(RuleCounter(family, f"tc egress {name}: bpf {PROGRAMS['egress']}", name,
                                                       packets, nbytes))
                families[family] = fl
        finally:
            if pinned is not None:
                pinned.close()
        return Live(self.name, families)

    # -- comparing

    def _desired(self, plan: Plan, links: dict[int, Link]) -> dict:
        families = self.wanted_families(plan)
        enabled = [fp for fp in families.values() if fp is not None]
        ports = translated_ports(enabled[0].to_ports if enabled else (), local_port_range())
        if enabled and not ports:
            raise ApplyError("no translated source port left: masquerade-to-ports lies inside the node's "
                             f"ephemeral range {'-'.join(map(str, local_port_range()))} (ip_local_port_range)")
        matched = matching_links(plan.interfaces, links) if enabled else {}
        for fp in enabled:  # both generations live in one trie: each may use half of it
            for kind in ("exempt", "sources"):
                name = TRIES[kind][fp.family]
                room = int(SHAPES["map_entries"].get(name, self.obj().maps[name].max_entries)) // 2
                if len(getattr(fp, kind)) > room:
                    raise ApplyError(f"ebpf: {len(getattr(fp, kind))} IPv{fp.family} {kind} prefixes do not fit "
                                     f"(at most {room}: map_entries.{name} in rules/ebpf.yaml holds two generations)")
        return {
            "families": families,
            "ports": ports,
            "cfg": cfg_value(families, ports),
            "matched": matched,
            "local": {family: sorted({ipaddress.ip_address(a).packed for link in links.values()
                                      for a in link.addresses if ipaddress.ip_address(a).version == family})
                      for family in FAMILIES},
        }

    def _problems(self, plan: Plan, facts: dict, pinned: Pinned | None, desired: dict,
                  thorough: bool = True) -> list[str]:
        """What differs from the plan. thorough=False (apply): the tries and port tables
        are read back only when nothing else differs, since the apply that follows any
        problem rewrites whatever differs in them anyway."""
        obj = self.obj()
        wanted_any = any(fp is not None for fp in desired["families"].values())
        if pinned is None:
            return ["not installed"] if wanted_any else (["programs attached but no maps pinned"]
                                                          if facts["attached"] else [])
        problems = []
        for name in obj.maps:
            if pinned.open(name) is None:
                problems.append(f"map {pin_name(name)} missing")
            elif not pinned.compatible(name):
                problems.append(f"map {pin_name(name)} has another shape")
        if problems:
            return problems
        have, want = CFG.unpack(facts["cfg"]), CFG.unpack(desired["cfg"])
        if have[:4] != want[:4]:
            problems.append("config differs")
        # cfg says what apply wrote; the maps hold what is there now (a hand edit shows)
        if have[4] != want[4]:
            problems.append("exempt or source prefixes differ")
        # the live generation, read back below (when thorough or when nothing else differs)
        deep = (have[4] == want[4], have[2:4] == want[2:4])
        prog_ids = {}
        for hook in PROGRAMS:
            prog_ids[hook] = self._prog_pinned(hook, obj)
            if prog_ids[hook] is None:
                problems.append(f"program {hook} not loaded")
        problems += [f"program {hook} uses maps that are no longer pinned"
                     for hook in self._programs_on_stale_maps(pinned, obj)]
        links = facts["links"]
        for index, link in desired["matched"].items():
            hooks = facts["attached"].get(index, {})
            for hook in HOOKS:
                if hooks.get(hook) != [(filter_name(hook, obj.digest), prog_ids[hook])]:
                    problems.append(f"{link.name}: {hook} not attached" if not hooks.get(hook)
                                    else f"{link.name}: {hook} runs another program")
            if facts["ifaces"].get(index) != link.iface_value(attached=True):
                problems.append(f"{link.name}: address or type changed")
        for index in facts["attached"]:
            if index not in desired["matched"]:
                value = facts["ifaces"].get(index)
                if value is None or not IFACE.unpack(value)[2] & IF_DRAIN:
                    problems.append(f"{links[index].name if index in links else index}: attached but not matched")
        for index in facts["ifaces"]:
            if index not in desired["matched"] and index not in facts["attached"]:
                problems.append(f"stale interface entry {index}")
        for family, name in ((4, "ipmq_local4"), (6, "ipmq_local6")):
            if sorted(pinned.keys(name)) != desired["local"][family]:
                problems.append(f"ipv{family}: node addresses changed")
        problems += assist.problems(desired["families"], pin_dir(), assist.read_all())
        if SHAPES["conntrack_keeper"] and shutil.which("nft") and not keeper_present():
            problems.append(f"nft table inet {KEEPER_TABLE} missing")
        # drains that are done: reconcile removes what is left of them
        if drain_tables_present() and not netfilter_snat_tuples():
            problems.append(f"nft tables {DRAIN_TABLE}: netfilter's connections have ended")
        draining = [i for i, v in facts["ifaces"].items() if IFACE.unpack(v)[2] & IF_DRAIN]
        if draining:
            busy = self._busy_ifindexes(pinned)
            for index in draining:
                if index not in busy:
                    problems.append(f"{links[index].name if index in links else index}: drained")
        if any(deep) and (thorough or not problems):
            problems += self._generation_problems(pinned, facts["gen"], desired, *deep)
        return problems

    def _generation_problems(self, pinned: Pinned, gen: int, desired: dict, tries: bool, ports: bool) -> list[str]:
        """One generation against the plan: each trie key for key (values too; read
        alone, Pinned.generation), the port tables entry for entry."""
        wanted = self._wanted_tries(desired["families"]) if tries else []
        port_thread, held = self._read_back(pinned, gen, wanted, trie_notes(), ports)
        try:
            wants = {name: lpm_key_list(family, gen, prefixes) for name, _kind, family, prefixes in wanted}
            tables = port_tables(desired["ports"]) if ports else ()
        finally:
            for thread in (port_thread, *held.values()):
                if thread is not None:
                    thread.join()
        out = []
        for name, kind, family, _prefixes in wanted:
            have, wrong, covering = held[name].result()
            if any(trie_diff(wants[name], have, LPM[family].size)) or wrong or covering:
                out.append(f"ipv{family}: {kind} prefixes in map {pin_name(name)} differ")
        if port_thread is not None:
            for name, have, want in zip(("ipmq_ports", "ipmq_portidx"), port_thread.result(), tables):
                if have != want:
                    out.append(f"map {pin_name(name)} differs")
        return out

    @staticmethod
    def _wanted_tries(families: dict[int, FamilyPlan | None]) -> list[tuple[str, str, int, tuple[str, ...]]]:
        """(map, kind, family, prefixes) of each trie."""
        return [(TRIES[kind][family], kind, family, getattr(families[family], kind) if families[family] else ())
                for family in FAMILIES for kind in ("exempt", "sources")]

    def _read_back(self, pinned: Pinned, gen: int, wanted, notes: dict, ports: bool = True):
        """Generation `gen` read back in the background, a thread per map (bpf(2) lets go
        of the GIL: the kernel reads while Python computes what the plan wants): the
        port tables (a _Background of [ports, portidx], or None) and each trie of
        `wanted` (_wanted_tries) ({map: a _Background of Pinned.generation}). The caller
        joins them all before the maps may close."""
        for name in [w[0] for w in wanted] + (["ipmq_ports", "ipmq_portidx"] if ports else []):
            pinned.fd(name)  # opened here: the threads only use them
        reads = [(name, seek_keys(name, gen, notes, prefixes), len(prefixes)) for name, _kind, _family, prefixes in wanted]
        port_thread = _Background(self._read_ports, pinned, gen) if ports else None
        held = {name: _Background(pinned.generation, name, gen, seek, expect) for name, seek, expect in reads}
        return port_thread, held

    @staticmethod
    def _programs_on_stale_maps(pinned: Pinned, obj: loader.BpfObject) -> list[str]:
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
                os.close(fd)
            if used != {pinned.ids.get(name) for _, name in obj.progs[PROGRAMS[hook]].relocs}:
                stale.append(hook)
        return stale

    def _prog_pinned(self, hook: str, obj: loader.BpfObject) -> int | None:
        """Id of the pinned program of a hook when it came from this object, else None."""
        path = pin_dir() / f"prog_{hook}"
        if not path.exists():
            return None
        try:
            sysobj = loader.Sys()
            fd = sysobj.get(str(path))
        except loader.BpfError:
            return None
        try:
            info = sysobj.prog_info(fd)
            ok = info["name"] == PROGRAMS[hook] and self._loaded_digest() == obj.digest
            return info["id"] if ok else None
        finally:
            os.close(fd)

    def _loaded_digest(self) -> str | None:
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

    def drift(self, plan: Plan, live: Live | None = None) -> list[str]:
        facts, pinned = self._read()
        try:
            desired = self._desired(plan, facts["links"])
            return self._problems(plan, facts, pinned, desired)
        finally:
            if pinned is not None:
                pinned.close()

    # -- the fingerprint (reconcile's quick path)

    def fingerprint(self) -> str | None:
        """A digest of everything the full check (drift) reads, as the kernel holds it now:

        * every pin: map id and shape, so a map replaced or a pin removed shows; the
          programs' ids, tags and the ids of the maps their instructions hold (a program
          reloaded or left on a replaced map shows);
        * the whole contents of every map only apply writes (the datapath only reads
          them): cfg, ctl, both tries of both kinds and families, ifaces, local4/6, meta,
          owned; of the port tables the live generation. A BPF map has no generation
          or change counter, and the tries hold both generations (apply writes the idle
          one, then flips ctl), so they cannot be frozen (BPF_MAP_FREEZE): they are read,
          one BPF_MAP_LOOKUP_BATCH per 65,536 entries hashed as the kernel hands them
          over (about 0.06 s at 100,000 prefixes);
        * the maps the datapath writes (NAT entries, fragments, counters): their ids only;
        * our tc filters on every link with a clsact (or ingress) qdisc: hook, priority,
          handle, name, program id and tag; those qdiscs;
        * what the plan is matched against: every link's index, name and type, every
          address with its scope and flags, the node's ephemeral port range, the object
          file's sha256 and rules/ebpf.yaml; the nft tables we own (handle, chains).

        None (a full read) when it cannot be had cheaply or would not settle the
        question: no bpf(2), a read refused, or something draining (a link, the whole
        datapath, netfilter's connections in the drain table), whose end depends on time
        and conntrack, not on anything here. Netlink and bpf(2) are spoken directly:
        importing pyroute2 alone would cost more (0.12 s) than all of it."""
        if loader.syscall_number() is None:
            return None
        h = hashlib.sha256()
        try:
            if not self._fingerprint_inputs(h) or not self._fingerprint_pins(h):
                return None
            self._fingerprint_links(h)
        except (OSError, ValueError, struct.error):
            return None
        return f"ebpf {h.hexdigest()}"

    @staticmethod
    def _fingerprint_inputs(h) -> bool:
        try:
            obj = hashlib.sha256(object_path().read_bytes()).hexdigest()
        except OSError:
            obj = None
        _put(h, "inputs", str(pin_dir()), obj, repr(SHAPES), local_port_range(), os.environ.get("IPMASQ_BPF_DRAIN_IDLE"))
        nft = shutil.which("nft") is not None
        tables = netlink.nft_tables(DRAIN_TABLES + KEEPER_TABLES) if nft else {}
        if any(tables.get(t) is not None for t in DRAIN_TABLES):
            return False  # netfilter's connections drain: done when conntrack says so
        keeper = tables.get(KEEPER_TABLES[0])
        _put(h, "nft", nft, sorted(keeper.items()) if keeper is not None else None)
        _put(h, "assist", assist.fingerprint_text())
        return True

    @staticmethod
    def _fingerprint_pins(h) -> bool:
        with Pinned(None) as pinned:
            sysobj = pinned.sys
            if pinned.open("ipmq_ctl") is not None and pinned.open("ipmq_cfg") is not None:
                gen = pinned.gen()
                if CFG.unpack(pinned.cfg(gen))[0] & F_DRAIN:
                    return False  # the whole datapath drains after a switch away
            else:
                gen = 0
            if pinned.open("ipmq_ifaces") is not None and any(
                    IFACE.unpack(v)[2] & IF_DRAIN for _, v in pinned.items("ipmq_ifaces")):
                return False  # a link no longer matched drains
            # the live generation of each trie, as the full check reads it (the idle one
            # is read back and rewritten where it differs before it goes live), in the
            # background while the other maps are read
            notes, runs = trie_notes(), {}
            try:
                for name in TRIE_FAMILY:
                    fd, d = pinned.open(name), pinned.defs.get(name)
                    if fd is not None and d.type == loader.MAP_LPM_TRIE and d.key_size == LPM[TRIE_FAMILY[name]].size:
                        runs[name] = _Background(sysobj.lpm_run, fd, d.key_size, d.value_size, gen,
                                                 seek_keys(name, gen, notes), noted_count(name, gen, notes))
                EbpfBackend._fingerprint_maps(h, pinned, gen, runs)
            finally:
                for thread in runs.values():
                    thread.join()
            for hook in PROGRAMS:
                try:
                    fd = sysobj.get(str(pin_dir() / f"prog_{hook}"))
                except loader.BpfError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    _put(h, "program", hook, None)
                    continue
                try:
                    info = sysobj.prog_info(fd)
                finally:
                    os.close(fd)
                _put(h, "program", hook, info["id"], info["tag"], info["name"], sorted(info["map_ids"]))
        return True

    @staticmethod
    def _fingerprint_maps(h, pinned: Pinned, gen: int, runs: dict) -> None:
        """Every map's id and shape; the contents of those only apply writes (of the
        tries the live generation: `runs`, lpm_run in the background); of the port
        tables the live generation."""
        sysobj = pinned.sys
        for name in KNOWN_MAPS:
            fd = pinned.open(name)
            if fd is None:
                _put(h, "map", name, None)
                continue
            d = pinned.defs[name]
            _put(h, "map", name, pinned.ids[name], d.type, d.key_size, d.value_size, d.max_entries, d.flags)
            if name in runs:
                keys, values = runs[name].result()
                h.update(keys)
                h.update(values)
                _put(h, "generation", gen, len(keys), sysobj.lpm_covering(fd, d.key_size, d.value_size, gen)[0])
            elif name in WRITTEN_BY_APPLY:
                count = sysobj.digest(fd, d.key_size, d.value_size, d.max_entries, h.update)
                _put(h, "entries", count)
            elif name in ("ipmq_ports", "ipmq_portidx") and d.key_size == 4 and d.max_entries >= 2 * PORTS:
                h.update(sysobj.array_values(fd, gen * PORTS, PORTS, d.value_size))

    @staticmethod
    def _fingerprint_links(h) -> None:
        with netlink.Netlink(NETLINK_ROUTE) as nl:
            _put(h, "links", sorted(dump_links(nl)))
            _put(h, "addresses", sorted(dump_addresses(nl)))
            qdiscs = sorted(q for q in _dump_qdiscs(nl) if q[1] in ("clsact", "ingress"))
            _put(h, "qdiscs", qdiscs)
            for index in sorted({q[0] for q in qdiscs}):
                for hook in HOOKS:
                    _put(h, "filters", index, hook, sorted(f for f in _tc_filters(nl, index, hook) if f.ours))

    # -- changing

    def apply(self, plan: Plan) -> list[str]:
        ensure_bpffs(pin_dir())
        ipr = _ipr()
        facts, pinned = self._read()
        try:
            desired = self._desired(plan, facts["links"])
            problems = self._problems(plan, facts, pinned, desired, thorough=False)
            if not problems:
                self._reap(facts, pinned, ipr)
                return []
            previous = state.read().get("backend")
            if previous and previous != self.name:
                add_drain_tables()  # netfilter's translated connections keep working after it goes
            if SHAPES["conntrack_keeper"] and not keeper_present():
                add_keeper()
            if pinned is None:
                pinned = Pinned(self.obj())
            try:
                changes = self._install(plan, facts, pinned, desired, ipr)
            except (loader.BpfError, OSError) as exc:
                raise ApplyError(f"ebpf: {exc}") from None
            self._reap(facts, pinned, ipr)
        finally:
            if pinned is not None:
                pinned.close()
            ipr.close()
        installed = "installed" if not facts["installed"] else "updated (" + ", ".join(problems[:3]) + (
            ", ..." if len(problems) > 3 else "") + ")"
        out = []
        for family, fp in desired["families"].items():
            if fp is None:
                continue
            out.append(f"ipv{family} {installed}: tc on {len(desired['matched'])} interfaces, "
                       f"{len(fp.exempt)} exempt prefixes")
        disabled = [f for f, fp in desired["families"].items() if fp is None]
        if disabled and facts["installed"]:
            flags = CFG.unpack(facts["cfg"])[0]
            out += [f"ipv{f} removed (disabled)" for f in disabled if flags & (F_V4 if f == 4 else F_V6)]
        return out or changes

    def _install(self, plan: Plan, facts: dict, pinned: Pinned, desired: dict, ipr) -> list[str]:
        obj = self.obj()
        created = pinned.ensure()
        if "ipmq_nat_fwd" in created or "ipmq_nat_rev" in created:
            self._seed_foreign(pinned)
        live_gen = pinned.gen()
        idle = 1 - live_gen
        notes = trie_notes()
        # the live generation never had a config: a first install (or maps just created)
        first = not any(pinned.cfg(live_gen))
        # 1. the idle generation: read back, only what differs from the plan written
        # (whatever it holds: the config before the last change, what a killed apply
        # left half-written, a hand's edits)
        self._write_generation(pinned, idle, desired, notes)
        # 2. node facts: local addresses, the matched interfaces' addresses (flows
        # translated to an address a link no longer has move to its new one)
        self._write_node(facts, pinned, desired)
        # 3. the switch: one write. The old generation is left as it is: the next change
        # writes there what differs from it. After a first install it gets the config
        # too (it never held one), so that the next change writes only what it changes;
        # in the background, while programs load and filters attach.
        pinned.update("ipmq_ctl", struct.pack("=I", 0), CTL.pack(idle))
        mirror = _Background(self._write_generation, pinned, live_gen, desired, notes) if first else None
        try:
            changes = self._attach_all(plan, facts, pinned, desired, ipr, obj, created)
        finally:
            if mirror is not None:
                mirror.join()
        if mirror is not None:
            mirror.result()
        self._note_tries(pinned, desired, idle, notes, both=first)
        return changes

    @staticmethod
    def _write_node(facts: dict, pinned: Pinned, desired: dict) -> list[str]:
        node.write_locals(pinned, desired["local"])
        changed = node.changed_addresses(facts["ifaces"], desired["matched"])
        node.write_ifaces(pinned, desired["matched"], facts["attached"])
        local = {a for family in FAMILIES for a in desired["local"][family]}
        done, forgotten = node.repoint_flows(pinned, changed, local) if pinned.open("ipmq_nat_fwd") is not None else (0, 0)
        return [f"{done} flows moved to a new address, {forgotten} forgotten"] if done or forgotten else []

    def follow(self, plan: Plan) -> list[str]:
        """After a link or an address came or went (watch): the node facts written, the
        programs attached to every matched link and taken off links gone, flows moved
        off addresses gone; the decision's generations are not touched (the config is
        the same). Nothing when ebpf is not installed."""
        if not pin_dir().joinpath("ctl").exists():
            return []
        ipr = _ipr()
        facts, pinned = self._read()
        try:
            if pinned is None or not facts["installed"] or CFG.unpack(facts["cfg"])[0] & F_DRAIN:
                return []
            desired = self._desired(plan, facts["links"])
            pinned.obj = self.obj()
            created = pinned.ensure()  # every map open: the programs are checked against them all
            changes = self._write_node(facts, pinned, desired)
            changes += self._attach_all(plan, facts, pinned, desired, ipr, self.obj(), created)
            gone = [i for i in facts["ifaces"] if i not in facts["links"]]
            for index in gone:  # deleted links: their entries (and drains) go with them
                pinned.delete("ipmq_ifaces", struct.pack("=I", index))
            return changes + ([f"{len(gone)} deleted links forgotten"] if gone else [])
        except (loader.BpfError, OSError) as exc:
            raise ApplyError(f"ebpf: {exc}") from None
        finally:
            if pinned is not None:
                pinned.close()
            ipr.close()

    def _attach_all(self, plan: Plan, facts: dict, pinned: Pinned, desired: dict, ipr, obj: loader.BpfObject,
                    created: list[str]) -> list[str]:
        """Steps 4 and 5 of _install: programs and filters, links no longer matched."""
        # 4. programs, then the filters
        self.reloaded = False
        fds = self._programs(pinned, obj, force=bool(created))  # new maps: programs must use them
        changes = assist.sync(desired["families"], pin_dir(), force=self.reloaded)
        try:
            # Ingress first: from then on every UDP (or other) flow entering is recorded,
            # and flows already under way are taken from conntrack, so that no reply
            # leaving a pod-facing interface is ever mistaken for a new flow.
            fresh = [i for i in desired["matched"] if "egress" not in facts["attached"].get(i, {})
                     or not facts["attached"][i]["egress"]]
            for link in desired["matched"].values():
                self._attach(ipr, pinned, link, fds, obj, hooks=("ingress",))
            if fresh:
                self._seed_pass(pinned)
            for link in desired["matched"].values():
                self._attach(ipr, pinned, link, fds, obj, hooks=("egress",))
                # from now on the tc programs translate its TCP, UDP and echo flows, not ipmq_nf
                pinned.update("ipmq_ifaces", struct.pack("=I", link.index), link.iface_value(attached=True))
        finally:
            for fd in fds.values():
                os.close(fd)
        # 5. links no longer matched: drain (flows keep their decision) or detach
        stale = [i for i in facts["attached"] if i not in desired["matched"]]
        stale += [i for i in facts["ifaces"] if i not in desired["matched"] and i not in facts["attached"]]
        if stale:
            busy = self._busy_ifindexes(pinned)
            for index in set(stale):
                link = facts["links"].get(index)
                if link is not None and index in busy and index in facts["attached"]:
                    pinned.update("ipmq_ifaces", struct.pack("=I", index), link.iface_value(drain=True))
                else:
                    self._detach(ipr, pinned, index)
        return [f"{len(desired['matched'])} interfaces", *changes]

    def _write_generation(self, pinned: Pinned, gen: int, desired: dict, notes: dict) -> None:
        """Make generation `gen` (never the live one) what `desired` plans, reading back
        what it holds (_read_back) and writing only what differs: the port tables, the
        four tries (batch deletes, then batch inserts), then its cfg, last since it
        names what the tries hold."""
        wanted = self._wanted_tries(desired["families"])
        ports, held = self._read_back(pinned, gen, wanted, notes)
        try:
            wants = {name: lpm_key_list(family, gen, prefixes) for name, _kind, family, prefixes in wanted}
            tables = port_tables(desired["ports"])
        finally:
            for thread in (ports, *held.values()):
                thread.join()
        for name, have, want in zip(("ipmq_ports", "ipmq_portidx"), ports.result(), tables):
            if have != want:  # from the first entry that differs to the last
                lo = next(i for i in range(PORTS) if have[i] != want[i])
                hi = next(i for i in range(PORTS - 1, -1, -1) if have[i] != want[i])
                pinned.update_array(name, gen * PORTS + lo, want[lo:hi + 1])
        for name, want in wants.items():
            self._sync_trie(pinned, name, want, held[name].result())
        pinned.update("ipmq_cfg", struct.pack("=I", gen), desired["cfg"])

    @staticmethod
    def _read_ports(pinned: Pinned, gen: int) -> list[array.array]:
        return [array.array("I", pinned.sys.array_values(pinned.fd(name), gen * PORTS, PORTS, 4))
                for name in ("ipmq_ports", "ipmq_portidx")]

    @staticmethod
    def _sync_trie(pinned: Pinned, name: str, want: list[bytes], held) -> tuple[int, int]:
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

    def _note_tries(self, pinned: Pinned, desired: dict, gen: int, notes: dict, both: bool) -> None:
        """Note for the next reads of the tries (trie_notes) where generation 0 ends and
        how large each generation is, now that `gen` (and, with `both`, the other one
        too) holds `desired`."""
        out = {}
        for name, _kind, _family, prefixes in self._wanted_tries(desired["families"]):
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

    def _programs(self, pinned: Pinned, obj: loader.BpfObject, force: bool = False) -> dict[str, int]:
        """fds of the programs: the pinned ones when they came from this object (and no
        map was recreated), else freshly loaded (and pinned in their place)."""
        sysobj = pinned.sys
        fds = {}
        fresh = force or self._loaded_digest() != obj.digest or bool(self._programs_on_stale_maps(pinned, obj))
        for hook in PROGRAMS:
            path = pin_dir() / f"prog_{hook}"
            if not fresh and path.exists():
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
                    os.close(other)
                raise ApplyError(f"ebpf: the kernel refused program {prog.name}: {exc.strerror}") from None
            if path.exists():  # (bpffs refuses rename; the attached filter holds the program)
                path.unlink()
            sysobj.pin(fd, str(path))
            fds[hook] = fd
            self.reloaded = True
        pinned.update("ipmq_meta", struct.pack("=I", 0), bytes.fromhex(obj.digest))
        return fds

    def _attach(self, ipr, pinned: Pinned, link: Link, fds: dict[str, int], obj: loader.BpfObject,
                hooks=HOOKS) -> None:
        if not _has_clsact(link.index):
            from pyroute2.netlink.exceptions import NetlinkError

            try:
                ipr.tc("add", "clsact", link.index)
                pinned.update("ipmq_owned", struct.pack("=I", link.index), struct.pack("=I", 1))
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise ApplyError(f"ebpf: cannot add a clsact qdisc to {link.name}: {exc}") from None
        current = _filters(link.index)
        for hook in hooks:
            want = filter_name(hook, obj.digest)
            ours = current[hook]
            if [(f["name"], f["id"]) for f in ours] == [(want, pinned.sys.prog_info(fds[hook])["id"])]:
                continue
            from pyroute2.netlink.exceptions import NetlinkError

            # replace in place (one netlink message: the old program or the new one, never none)
            cmd = "replace-filter" if any(f["prio"] == SHAPES["tc_priority"] for f in ours) else "add-filter"
            try:
                ipr.tc(cmd, "bpf", index=link.index, handle=SHAPES["tc_handle"], parent=PARENT[hook],
                       prio=SHAPES["tc_priority"], fd=fds[hook], name=want, direct_action=True,
                       protocol=0x0003)  # ETH_P_ALL
            except NetlinkError as exc:
                raise ApplyError(f"ebpf: cannot attach to {link.name} {hook}: {exc}") from None
            for f in ours:  # filters of ours at another priority (a changed rules/ebpf.yaml)
                if f["prio"] != SHAPES["tc_priority"]:
                    self._del_filter(ipr, link.index, hook, f)

    @staticmethod
    def _del_filter(ipr, index: int, hook: str, f: dict) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            ipr.tc("del-filter", "bpf", index=index, handle=f["handle"], parent=PARENT[hook], prio=f["prio"],
                   protocol=0x0003)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise

    def _detach(self, ipr, pinned: Pinned | None, index: int) -> bool:
        """Our filters off one link, its interface entry gone, and the clsact qdisc too
        when we added it and nobody else uses it."""
        found = False
        try:
            current = _filters(index)
        except OSError:
            current = {h: [] for h in HOOKS}
        for hook in HOOKS:
            for f in current[hook]:
                self._del_filter(ipr, index, hook, f)
                found = True
        key = struct.pack("=I", index)
        if pinned is not None:
            if pinned.open("ipmq_ifaces") is not None:
                pinned.delete("ipmq_ifaces", key)
            owned = pinned.open("ipmq_owned") is not None and pinned.lookup("ipmq_owned", key)
            if owned:
                try:
                    if _has_clsact(index) and _other_filters(index) == 0:
                        from pyroute2.netlink.exceptions import NetlinkError

                        try:
                            ipr.tc("del", "clsact", index)
                        except NetlinkError:
                            pass
                except OSError:
                    pass
                pinned.delete("ipmq_owned", key)
        return found

    def _seed_pass(self, pinned: Pinned) -> None:
        """Flows conntrack already knows (UDP and other handshake-less protocols), as
        seen entering: their replies are replies, not new flows."""
        for family, proto, src, dst, sport, dport in conntrack_tuples(["-p", "udp"], reply=False):
            key = NAT_KEY.pack(src, dst, struct.pack("!H", sport), struct.pack("!H", dport), proto, family)
            try:
                pinned.update("ipmq_pass", key, b"\x01", loader.NOEXIST)
            except loader.BpfError:
                pass

    def _seed_foreign(self, pinned: Pinned) -> None:
        """Reply tuples of connections netfilter translated: never handed out by us."""
        for family, proto, src, dst, sport, dport in netfilter_snat_tuples():
            key = NAT_KEY.pack(src, dst, struct.pack("!H", sport), struct.pack("!H", dport), proto, family)
            value = NAT_VAL.pack(bytes(16), b"\0\0", N_FOREIGN, 0, time.monotonic_ns())
            try:
                pinned.update("ipmq_nat_rev", key, value, loader.NOEXIST)
            except loader.BpfError:
                pass

    def _our_flows(self, pinned: Pinned, ifindexes: set[int] | None = None):
        """(family, proto, src, dst, sport, dport) of the flows we translate (host-order ports)."""
        if pinned.open("ipmq_nat_fwd") is None:
            return []
        out = []
        for key, value in pinned.items("ipmq_nat_fwd"):
            saddr, daddr, sport, dport, proto, family = NAT_KEY.unpack(key)
            _addr, _port, flags, ifindex, _seen = NAT_VAL.unpack(value)
            if flags & N_FOREIGN or (ifindexes is not None and ifindex not in ifindexes):
                continue
            out.append((family, proto, saddr, daddr, struct.unpack("!H", sport)[0], struct.unpack("!H", dport)[0]))
        return out

    def _busy_ifindexes(self, pinned: Pinned) -> set[int]:
        """Out-interfaces of translated flows that are still in use (rules/ebpf.yaml drain_idle;
        IPMASQ_BPF_DRAIN_IDLE=SECONDS overrides all three, for tests and impatient operators)."""
        idle = dict(SHAPES["drain_idle"])
        if os.environ.get("IPMASQ_BPF_DRAIN_IDLE"):
            idle = dict.fromkeys(idle, float(os.environ["IPMASQ_BPF_DRAIN_IDLE"]))
        now = time.monotonic_ns()
        busy = set()
        for key, value in pinned.items("ipmq_nat_fwd"):
            proto = key[36]
            _addr, _port, flags, ifindex, seen = NAT_VAL.unpack(value)
            if flags & N_FOREIGN:
                continue
            if proto == socket.IPPROTO_TCP:
                limit = idle["tcp_closed"] if flags & N_CLOSED else idle["tcp"]
            else:
                limit = idle["other"]
            if now - seen < limit * 1e9:
                busy.add(ifindex)
        return busy

    def _reap(self, facts: dict, pinned: Pinned | None, ipr) -> list[str]:
        """Finish what drains: netfilter's old connections (the drain table), links no
        longer matched, and the whole datapath after a switch away from ebpf."""
        done = []
        if drain_tables_present() and not netfilter_snat_tuples():
            if delete_tables(drain=True, keeper=False):
                done.append("netfilter drain table removed")
        if pinned is None or pinned.open("ipmq_ifaces") is None:
            return done
        draining = [struct.unpack("=I", k)[0] for k, v in pinned.items("ipmq_ifaces") if IFACE.unpack(v)[2] & IF_DRAIN]
        whole = bool(CFG.unpack(pinned.cfg(pinned.gen()))[0] & F_DRAIN)
        if not draining and not whole:
            return done
        busy = self._busy_ifindexes(pinned)
        if whole and not busy:
            self._remove_all(ipr)
            return done + ["drained datapath removed"]
        for index in draining:
            if index not in busy:
                forget_conntrack(self._our_flows(pinned, {index}))
                self._detach(ipr, pinned, index)
                done.append(f"link {index} detached")
        return done

    def reap(self) -> list[str]:
        """For callers after a switch away from ebpf: remove the drained datapath once
        its flows are quiet. Cheap when nothing of ours is installed."""
        if not pin_dir().joinpath("ctl").exists() and not drain_tables_present():
            return []
        ipr = _ipr()
        facts, pinned = self._read()
        try:
            return self._reap(facts, pinned, ipr)
        finally:
            if pinned is not None:
                pinned.close()
            ipr.close()

    def _other_backend_live(self) -> bool:
        from .. import NAMES, get

        for name in NAMES:
            if name == self.name:
                continue
            try:
                backend = get(name)
                if backend.unavailable_reason() is None and backend.live().installed:
                    return True
            except Exception:
                continue
        return False

    def remove(self) -> list[str]:
        if loader.syscall_number() is None:
            return []
        ipr = _ipr()
        try:
            facts, pinned = self._read()
            try:
                if not facts["installed"] and not facts["attached"]:
                    gone = [*assist.remove(), *(["nft tables " + ", ".join(t)] if (t := delete_tables()) else [])]
                    return gone
                flags = CFG.unpack(facts["cfg"])[0] if facts["installed"] else 0
                families = [f"ipv{f}" for f in FAMILIES if flags & (F_V4 if f == 4 else F_V6)] or ["programs"]
                if pinned is not None and facts["attached"] and not flags & F_DRAIN and self._other_backend_live():
                    # a switch: another backend masquerades new flows now; ours keep theirs
                    busy = self._busy_ifindexes(pinned)
                    if busy:
                        self._enter_drain(pinned)
                        return [f + " (draining its connections)" for f in families]
                if pinned is not None:
                    pinned.close()
                    pinned = None
                self._remove_all(ipr)
                return families
            finally:
                if pinned is not None:
                    pinned.close()
        finally:
            ipr.close()

    def _enter_drain(self, pinned: Pinned) -> None:
        live_gen = pinned.gen()
        idle = 1 - live_gen
        flags, retries, total, crc, digest = CFG.unpack(pinned.cfg(live_gen))
        for name in ("ipmq_ports", "ipmq_portidx"):
            values = array.array("I", [0]) * PORTS
            for key, value in pinned.items(name):
                index = struct.unpack("=I", key)[0] - live_gen * PORTS
                if 0 <= index < PORTS:
                    values[index] = struct.unpack("=I", value)[0]
            pinned.update_array(name, idle * PORTS, values)
        notes = trie_notes()
        for name in TRIE_FAMILY:  # the same tries in the idle generation
            raw = pinned.generation(name, live_gen, seek_keys(name, live_gen, notes),
                                    noted_count(name, live_gen, notes))[0]
            size, gen_byte = pinned.defs[name].key_size, bytes([idle])
            want = [raw[i:i + 4] + gen_byte + raw[i + 5:i + size] for i in range(0, len(raw), size)]
            self._sync_trie(pinned, name, want, pinned.generation(name, idle, seek_keys(name, idle, notes), len(want)))
        pinned.update("ipmq_cfg", struct.pack("=I", idle), CFG.pack(flags | F_DRAIN, retries, total, crc, digest))
        pinned.update("ipmq_ctl", struct.pack("=I", 0), CTL.pack(idle))

    def _remove_all(self, ipr) -> None:
        """Every filter of ours off every link, qdiscs we added, pins, drain tables; and
        conntrack's entries of the flows we translated (see forget_conntrack)."""
        pinned = None
        if pin_dir().joinpath("ctl").exists() or pin_dir().joinpath("owned").exists():
            pinned = Pinned(None)
        try:
            flows = self._our_flows(pinned) if pinned is not None else []
            for index in read_links():
                self._detach(ipr, pinned, index)
            forget_conntrack(flows)
        finally:
            if pinned is not None:
                pinned.close()
        assist.remove()
        delete_tables()
        state.remove(TRIE_NOTES)
        directory = pin_dir()
        if directory.is_dir():
            for entry in directory.iterdir():
                if entry.name in {pin_name(m) for m in KNOWN_MAPS} or entry.name.startswith("prog_"):
                    entry.unlink()
            try:
                directory.rmdir()
            except OSError:
                pass


# Maps only apply writes (the datapath reads them): the fingerprint reads them whole.
WRITTEN_BY_APPLY = ("ipmq_cfg", "ipmq_ctl", "ipmq_ifaces", "ipmq_local4", "ipmq_local6", "ipmq_exempt4",
                    "ipmq_exempt6", "ipmq_src4", "ipmq_src6", "ipmq_meta", "ipmq_owned")


def _put(h, *parts) -> None:
    h.update(repr(parts).encode() + b"\n")


KNOWN_MAPS = ("ipmq_cfg", "ipmq_ctl", "ipmq_ports", "ipmq_portidx", "ipmq_ifaces", "ipmq_local4", "ipmq_local6",
              "ipmq_exempt4", "ipmq_exempt6", "ipmq_src4", "ipmq_src6", "ipmq_nat_fwd", "ipmq_nat_rev",
              "ipmq_pass", "ipmq_frag", "ipmq_stats", "ipmq_ifstats", "ipmq_meta", "ipmq_owned", "ipmq_scratch",
              "ipmq_inbound")


BPFFS_ROOT = Path("/sys/fs/bpf")


def _bpffs_mountable(directory: Path) -> bool:
    """The pin directory is under /sys/fs/bpf, where we may mount bpffs ourselves (as
    Cilium does) when the system has not: the kernel has the filesystem."""
    if not (directory == BPFFS_ROOT or BPFFS_ROOT in directory.parents) or not BPFFS_ROOT.is_dir():
        return False
    try:
        return any(line.split()[-1] == "bpf" for line in Path("/proc/filesystems").read_text().splitlines())
    except OSError:
        return False


def ensure_bpffs(directory: Path) -> None:
    """Mount bpffs at /sys/fs/bpf when the pin directory needs it and none is mounted."""
    if _bpffs_reason(directory, allow_mount=False) is None or not _bpffs_mountable(directory):
        return  # already on bpffs, or not ours to mount (the error comes with the first pin)
    proc = subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS_ROOT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ApplyError(f"ebpf: cannot mount bpffs at {BPFFS_ROOT}: {proc.stderr.strip() or proc.returncode}")


def _bpffs_reason(directory: Path, allow_mount: bool = True) -> str | None:
    """None when `directory` is (or would be created) on a bpffs mount, or when apply may
    mount one for it (allow_mount)."""
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    target = str(directory.resolve() if directory.exists() else directory)
    for line in mounts:
        parts = line.split()
        try:
            sep = parts.index("-")
        except ValueError:
            continue
        point = parts[4].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, parts[sep + 1]
    if fstype != "bpf" and not (allow_mount and _bpffs_mountable(directory)):
        where = directory.parent if not directory.exists() else directory
        return (f"no bpf filesystem at {where} to pin maps in (mount -t bpf bpf /sys/fs/bpf, or set "
                f"{PIN_ENV} to a directory on one)")
    if fstype != "bpf":
        return "mount"
    return None


def stats() -> dict:
    """Counters of the installed datapath (python -m ipmasq_legacy.backends.ebpf stats)."""
    with Pinned(None) as p:
        if p.open("ipmq_stats") is None:
            return {}
        out = p.stats()
        out["nat_entries"] = len(p.keys("ipmq_nat_fwd")) if p.open("ipmq_nat_fwd") is not None else 0
        return out
