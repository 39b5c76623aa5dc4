"""Names and places of the ebpf datapath's objects: the pin directory, the object file,
the maps, programs, tc hooks and filters (shapes and tunables: rules/ebpf.yaml)."""

from __future__ import annotations

import os
from pathlib import Path

from ... import ruledata
from ...bpf import loader

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


KNOWN_MAPS = ("ipmq_cfg", "ipmq_ctl", "ipmq_ports", "ipmq_portidx", "ipmq_ifaces", "ipmq_local4", "ipmq_local6",
              "ipmq_exempt4", "ipmq_exempt6", "ipmq_src4", "ipmq_src6", "ipmq_nat_fwd", "ipmq_nat_rev",
              "ipmq_pass", "ipmq_frag", "ipmq_stats", "ipmq_ifstats", "ipmq_meta", "ipmq_owned", "ipmq_scratch",
              "ipmq_inbound")
# Maps only apply writes (the datapath reads them): the fingerprint reads them whole.
WRITTEN_BY_APPLY = ("ipmq_cfg", "ipmq_ctl", "ipmq_ifaces", "ipmq_local4", "ipmq_local6", "ipmq_exempt4",
                    "ipmq_exempt6", "ipmq_src4", "ipmq_src6", "ipmq_meta", "ipmq_owned")
