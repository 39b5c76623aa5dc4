"""masq.o read without libbpf: its programs (instructions, and the map each relocation
names) and its map definitions (from the BTF of the `.maps` section, the libbpf
convention), so the C source stays the one place that defines them; `patched` writes
the map fds into a program's relocations for BPF_PROG_LOAD (loader.Sys.prog_load)."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

PSEUDO_MAP_FD = 1  # BPF_PSEUDO_MAP_FD: an ld_imm64's src_reg when its immediate is a map fd


@dataclass
class MapDef:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


@dataclass
class ProgDef:
    name: str
    section: str
    insns: bytes
    relocs: list[tuple[int, str]] = field(default_factory=list)  # (instruction index, map name)


@dataclass
class BpfObject:
    path: str
    digest: str
    license: str
    maps: dict[str, MapDef]
    progs: dict[str, ProgDef]


class ObjectError(ValueError):
    pass


_SHT_SYMTAB, _SHT_REL = 2, 9
_SHF_EXECINSTR = 0x4
_R_BPF_64_64 = 1
_BTF_KIND_TAIL = {1: 4, 2: 0, 3: 12, 4: -12, 5: -12, 6: -8, 7: 0, 8: 0, 9: 0, 10: 0, 11: 0, 12: 0, 13: -8,
                  14: 4, 15: -12, 16: 0, 17: 4, 18: 0, 19: -12}


def _btf_maps(btf: bytes) -> dict[str, MapDef]:
    """Map definitions of the `.maps` DATASEC (libbpf's __uint/__type convention)."""
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", btf, 0)
    if magic != 0xEB9F:
        raise ObjectError("bad BTF magic")
    strings = btf[hdr_len + str_off: hdr_len + str_off + str_len]

    def name(off):
        return strings[off: strings.index(b"\0", off)].decode()

    types: list = [None]  # id 0 is void
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    while pos < end:
        name_off, info, size_type = struct.unpack_from("<III", btf, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        tail = _BTF_KIND_TAIL.get(kind)
        if tail is None:
            raise ObjectError(f"unknown BTF kind {kind}")
        tail_len = -tail * vlen if tail < 0 else tail
        types.append((kind, name_off, size_type, btf[pos + 12: pos + 12 + tail_len], vlen))
        pos += 12 + tail_len

    def resolve(tid):
        while types[tid][0] in (8, 9, 10, 11, 18):  # typedef, volatile, const, restrict, type tag
            tid = types[tid][2]
        return tid

    def size(tid):
        tid = resolve(tid)
        kind, _, size_type, tail, _ = types[tid]
        if kind in (1, 4, 5, 6, 16, 19):
            return size_type
        if kind == 2:
            return 8
        if kind == 3:
            elem, _idx, nelems = struct.unpack_from("<III", tail, 0)
            return size(elem) * nelems
        raise ObjectError(f"cannot size BTF kind {kind}")

    maps = {}
    for kind, name_off, _st, tail, vlen in types[1:]:
        if kind != 15 or name(name_off) != ".maps":
            continue
        for i in range(vlen):
            var_id, _off, _size = struct.unpack_from("<III", tail, i * 12)
            vkind, vname_off, vtype, _vtail, _ = types[var_id]
            if vkind != 14:
                continue
            st = types[resolve(vtype)]
            if st[0] != 4:
                raise ObjectError(f"map {name(vname_off)}: definition is not a struct")
            fields = {}
            for m in range(st[4]):
                mname_off, mtype, _moff = struct.unpack_from("<III", st[3], m * 12)
                ptr = types[resolve(mtype)]
                if ptr[0] != 2:
                    continue
                target = resolve(ptr[2])
                mname = name(mname_off)
                if mname in ("key", "value"):
                    fields[mname] = size(target)
                elif types[target][0] == 3:  # __uint(x, N): int (*x)[N]
                    fields[mname] = struct.unpack_from("<III", types[target][3], 0)[2]
            mapname = name(vname_off)
            try:
                maps[mapname] = MapDef(mapname, fields["type"], fields["key"], fields["value"],
                                       fields["max_entries"], fields.get("map_flags", 0))
            except KeyError as exc:
                raise ObjectError(f"map {mapname}: no {exc.args[0]} in its definition") from None
    return maps


def read_object(path: str) -> BpfObject:
    """Programs and map definitions of a BPF ELF object (little-endian ELF64)."""
    try:
        data = open(path, "rb").read()
    except OSError as exc:
        raise ObjectError(f"cannot read {path}: {exc.strerror}") from None
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ObjectError(f"{path} is not a little-endian ELF64 object")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = []
    for i in range(shnum):
        sh = struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
        sections.append({"name_off": sh[0], "type": sh[1], "flags": sh[2], "offset": sh[4], "size": sh[5],
                         "link": sh[6], "info": sh[7]})
    shstr = sections[shstrndx]
    for s in sections:
        start = shstr["offset"] + s["name_off"]
        s["name"] = data[start: data.index(b"\0", start)].decode()
        s["data"] = data[s["offset"]: s["offset"] + s["size"]]
    by_name = {s["name"]: i for i, s in enumerate(sections)}
    symtab = next((s for s in sections if s["type"] == _SHT_SYMTAB), None)
    if symtab is None or ".BTF" not in by_name or ".maps" not in by_name:
        raise ObjectError(f"{path}: no symbol table, .BTF or .maps section (compile with clang -g)")
    strtab = sections[symtab["link"]]["data"]
    symbols = []
    for off in range(0, len(symtab["data"]), 24):
        st_name, st_info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", symtab["data"], off)
        name = strtab[st_name: strtab.index(b"\0", st_name)].decode()
        symbols.append((name, st_info, shndx, value, size))
    maps_idx = by_name[".maps"]
    maps = _btf_maps(sections[by_name[".BTF"]]["data"])

    progs = {}
    for idx, sec in enumerate(sections):
        if not (sec["flags"] & _SHF_EXECINSTR) or not sec["size"]:
            continue
        rel = next((s for s in sections if s["type"] == _SHT_REL and s["info"] == idx), None)
        relocs = []
        if rel is not None:
            for off in range(0, len(rel["data"]), 16):
                r_offset, r_info = struct.unpack_from("<QQ", rel["data"], off)
                sym = symbols[r_info >> 32]
                if (r_info & 0xFFFFFFFF) != _R_BPF_64_64 or sym[2] != maps_idx:
                    raise ObjectError(f"{path}: section {sec['name']}: unsupported relocation to {sym[0]!r} "
                                      "(only map references; inline every function)")
                relocs.append((r_offset, sym[0]))
        for name, info, shndx, value, size in symbols:
            if shndx != idx or (info & 0xF) != 2:  # STT_FUNC
                continue
            own = [((o - value) // 8, m) for o, m in relocs if value <= o < value + size]
            progs[name] = ProgDef(name, sec["name"], sec["data"][value: value + size], own)
    lic = sections[by_name["license"]]["data"].split(b"\0", 1)[0].decode() if "license" in by_name else ""
    return BpfObject(path, hashlib.sha256(data).hexdigest(), lic, maps, progs)


def patched(prog: ProgDef, map_fds: dict[str, int]) -> bytes:
    """The program's instructions with every map reference turned into its fd."""
    insns = bytearray(prog.insns)
    for index, map_name in prog.relocs:
        off = index * 8
        if insns[off] != 0x18:  # BPF_LD | BPF_IMM | BPF_DW
            raise ObjectError(f"{prog.name}: relocation at instruction {index} is not a 64-bit load")
        insns[off + 1] = (insns[off + 1] & 0x0F) | (PSEUDO_MAP_FD << 4)
        struct.pack_into("<i", insns, off + 4, map_fds[map_name])
    return bytes(insns)
