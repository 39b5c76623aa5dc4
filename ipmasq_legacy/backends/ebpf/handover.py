"""Handover: the datapath's flows after a switch. Away from ebpf, the programs keep
translating the flows they translate (drain mode: the idle generation is the live one
with F_DRAIN, then flipped to) and take no new one; a link no longer matched drains the
same way. Reaped once those flows are quiet: conntrack's entries of them forgotten, the
filters, qdiscs we added, pins and nft tables removed. netfilter's own connections after
a switch to ebpf drain in keeper.py's drain table."""

from __future__ import annotations

import array
import os
import socket
import struct
import time

from ... import inputs, kernel, state
from . import assist
from .conntrack import forget_conntrack, netfilter_snat_tuples
from .encode import noted_count, seek_keys
from .generations import sync_trie
from .keeper import delete_tables, drain_tables_present
from .layout import CFG, CTL, F_DRAIN, N_CLOSED, N_FOREIGN, NAT_KEY, NAT_VAL
from .links import IF_DRAIN, IFACE, read_links
from .maps import Pinned, trie_notes
from .names import KNOWN_MAPS, PORTS, SHAPES, TRIE_FAMILY, TRIE_NOTES, pin_dir, pin_name
from .tc import detach


def our_flows(pinned: Pinned, ifindexes: set[int] | None = None):
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


def busy_ifindexes(pinned: Pinned) -> set[int]:
    """Out-interfaces of translated flows that are still in use (rules/ebpf.yaml drain_idle;
    IPMASQ_BPF_DRAIN_IDLE=SECONDS overrides all three, for tests and impatient operators)."""
    idle = dict(SHAPES["drain_idle"])
    if os.environ.get("IPMASQ_BPF_DRAIN_IDLE"):
        idle = dict.fromkeys(idle, inputs.seconds(os.environ["IPMASQ_BPF_DRAIN_IDLE"], "IPMASQ_BPF_DRAIN_IDLE"))
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


def reap(pinned: Pinned | None, ipr) -> list[str]:
    """Finish what drains: netfilter's old connections (the drain table), links no
    longer matched, and the whole datapath after a switch away from ebpf."""
    done = []
    if drain_tables_present() and not netfilter_snat_tuples():
        if delete_tables(drain=True, keeper=False, notrack=False):
            done.append("netfilter drain table removed")
    if pinned is None or pinned.open("ipmq_ifaces") is None:
        return done
    draining = [struct.unpack("=I", k)[0] for k, v in pinned.items("ipmq_ifaces") if IFACE.unpack(v)[2] & IF_DRAIN]
    whole = bool(CFG.unpack(pinned.cfg(pinned.gen()))[0] & F_DRAIN)
    if not draining and not whole:
        return done
    busy = busy_ifindexes(pinned)
    if whole and not busy:
        remove_all(ipr)
        return done + ["drained datapath removed"]
    for index in draining:
        if index not in busy:
            forget_conntrack(our_flows(pinned, {index}))
            detach(ipr, pinned, index)
            done.append(f"link {index} detached")
    return done


def enter_drain(pinned: Pinned) -> None:
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
        sync_trie(pinned, name, want, pinned.generation(name, idle, seek_keys(name, idle, notes), len(want)))
    pinned.update("ipmq_cfg", struct.pack("=I", idle), CFG.pack(flags | F_DRAIN, retries, total, crc, digest))
    pinned.update("ipmq_ctl", struct.pack("=I", 0), CTL.pack(idle))


def remove_all(ipr) -> None:
    """Every filter of ours off every link, qdiscs we added, pins, drain tables; and
    conntrack's entries of the flows we translated (see forget_conntrack)."""
    pinned = None
    sysobj = kernel.current().bpf()
    if sysobj.exists(pin_dir() / "ctl") or sysobj.exists(pin_dir() / "owned"):
        pinned = Pinned(None, sysobj=sysobj)
    try:
        flows = our_flows(pinned) if pinned is not None else []
        for index in read_links(ipr):
            detach(ipr, pinned, index)
        forget_conntrack(flows)
    finally:
        if pinned is not None:
            pinned.close()
    assist.remove()
    delete_tables()
    state.remove(TRIE_NOTES)
    directory = pin_dir()
    names = sysobj.listdir(directory)
    if names is not None:
        for name in names:
            if name in {pin_name(m) for m in KNOWN_MAPS} or name.startswith("prog_"):
                sysobj.unlink(directory / name)
        try:
            sysobj.rmdir(directory)
        except OSError:
            pass
