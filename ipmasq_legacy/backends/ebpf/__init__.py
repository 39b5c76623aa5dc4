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

The package's modules: names.py (where things are, what they are called), layout.py
(masq.c's structs), encode.py (pure: plan -> map contents, trie diffs), maps.py (pinned
maps), generations.py (the two generations), facts.py (the typed state between the
verbs), programs.py, tc.py, links.py and node.py (the node's links and addresses),
keeper.py (our nft tables), conntrack.py, handover.py (drain and reap), assist.py (the
netfilter assist), fingerprint.py, bpffs.py, and backend.py (the verbs). The names below
are the package's interface to the rest of ipmasq_legacy, its tests and bench/.
"""

from __future__ import annotations

from . import keeper, links
from .backend import EbpfBackend
from .encode import lpm_key, lpm_key_list, lpm_keys, port_spans, translated_ports, trie_diff, tries_digest
from .facts import EbpfDesired, EbpfFacts, EbpfFamilyLive, EbpfLive
from .keeper import DRAIN_TABLE, DRAIN_TABLES, KEEPER_TABLE, KEEPER_TABLES, drain_tables_present, keeper_present
from .layout import CFG, F_DRAIN, F_RANDOM, LPM, NAT_KEY, NAT_VAL
from .links import IFACE, read_links
from .maps import Pinned, stats
from .names import KNOWN_MAPS, PORTS, SHAPES, TRIE_FAMILY, TRIES, object_path, pin_dir

__all__ = [
    "CFG", "DRAIN_TABLE", "DRAIN_TABLES", "EbpfBackend", "EbpfDesired", "EbpfFacts", "EbpfFamilyLive", "EbpfLive",
    "F_DRAIN", "F_RANDOM", "IFACE", "KEEPER_TABLE", "KEEPER_TABLES", "KNOWN_MAPS", "LPM", "NAT_KEY", "NAT_VAL", "PORTS",
    "Pinned", "SHAPES", "TRIES", "TRIE_FAMILY", "drain_tables_present", "keeper", "keeper_present", "links", "lpm_key",
    "lpm_key_list", "lpm_keys", "object_path", "pin_dir", "port_spans", "read_links", "stats", "translated_ports",
    "trie_diff", "tries_digest",
]
