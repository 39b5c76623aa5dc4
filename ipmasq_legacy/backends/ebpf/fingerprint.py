"""The ebpf backend's fingerprint (reconcile's quick path): a digest of everything the
full check reads, as the kernel holds it now; see fingerprint()."""

from __future__ import annotations

import errno
import hashlib
import os
import struct

from ... import kernel
from ...bpf import loader
from . import assist
from .encode import local_port_range, noted_count, seek_keys
from .keeper import DRAIN_TABLES, KEEPER_TABLES, NOTRACK_TABLES
from .layout import CFG, F_DRAIN, LPM
from .links import IF_DRAIN, IFACE
from .maps import Background, Pinned, trie_notes
from .names import HOOKS, KNOWN_MAPS, PORTS, PROGRAMS, SHAPES, TRIE_FAMILY, WRITTEN_BY_APPLY, object_path, pin_dir


def fingerprint() -> str | None:
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
        if not _hash_inputs(h) or not _hash_pins(h):
            return None
        _hash_links(h)
    except (OSError, ValueError, struct.error):
        return None
    return f"ebpf {h.hexdigest()}"


def _hash_inputs(h) -> bool:
    try:
        obj = hashlib.sha256(object_path().read_bytes()).hexdigest()
    except OSError:
        obj = None
    _put(h, "inputs", str(pin_dir()), obj, repr(SHAPES), local_port_range(), os.environ.get("IPMASQ_BPF_DRAIN_IDLE"))
    nft = kernel.current().which("nft") is not None
    tables = kernel.current().nft_tables(DRAIN_TABLES + KEEPER_TABLES + NOTRACK_TABLES) if nft else {}
    if any(tables.get(t) is not None for t in DRAIN_TABLES):
        return False  # netfilter's connections drain: done when conntrack says so
    keeper = tables.get(KEEPER_TABLES[0])
    _put(h, "nft", nft, sorted(keeper.items()) if keeper is not None else None)
    notrack = tables.get(NOTRACK_TABLES[0])  # its comment names what it was written from
    if notrack is not None:
        _put(h, "notrack", sorted(notrack.items()))
    _put(h, "assist", assist.fingerprint_text())
    return True


def _hash_pins(h) -> bool:
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
                    runs[name] = Background(sysobj.lpm_run, fd, d.key_size, d.value_size, gen,
                                             seek_keys(name, gen, notes), noted_count(name, gen, notes))
            _hash_maps(h, pinned, gen, runs)
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
                sysobj.close(fd)
            _put(h, "program", hook, info["id"], info["tag"], info["name"], sorted(info["map_ids"]))
    return True


def _hash_maps(h, pinned: Pinned, gen: int, runs: dict) -> None:
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


def _hash_links(h) -> None:
    with kernel.current().rtnl() as rt:
        _put(h, "links", sorted(rt.links()))
        _put(h, "addresses", sorted(rt.addresses()))
        qdiscs = sorted(q for q in rt.qdiscs() if q[1] in ("clsact", "ingress"))
        _put(h, "qdiscs", qdiscs)
        for index in sorted({q[0] for q in qdiscs}):
            for hook in HOOKS:
                _put(h, "filters", index, hook, sorted(f for f in rt.filters(index, hook) if f.ours))


def _put(h, *parts) -> None:
    h.update(repr(parts).encode() + b"\n")
