"""nftables backend: one table of our own per family, changed old-or-new.

Per family: two exempt interval sets, `exempt_a` and `exempt_b`; the chain looks up one
of them. A change of the exempt list (nftsets.py writes the elements over netlink):

1. the idle set is patched with the difference, in a transaction of its own;
2. one checked nft transaction for everything else: the `postrouting` nat base chain and
   its rules (now looking up the set of step 1), and the objects that are not ours any
   more (earlier versions' sets) deleted;
3. the other set, idle now, is patched with the same difference.

A kill leaves the rules on the old set (before 2) or the new one (after), each whole (a
patch is one transaction); the idle set may then hold either list, which no rule sees,
and the next apply or reconcile reads it back and patches it. Which list both sets hold is recorded after a successful
apply; it is trusted while nf_tables' generation has not moved, and each patch carries
that generation, so the kernel refuses it when anything committed since.

Why a set is never filled in the transaction that makes the rules use it: the kernel
builds an interval set's lookup structure when the transaction that filled it commits,
after the new rules have become visible. A set created in the same transaction as the
rules that use it is, for those few microseconds, a set with nothing in it: a new flow
to an exempt destination is masqueraded (measured: 70-86 of 720,000 flows over 400 such
transactions; none in 940,000 flows when the set comes first). A set that already exists
keeps answering with its committed elements throughout.

Nothing outside `table ip ipmasq_legacy` and `table ip6 ipmasq_legacy` is listed, flushed
or touched. The shapes are in rules/nftables.yaml.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import ipaddress
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__, netlink, prefixes, ruledata, state
from ..errors import ApplyError, ConfigError
from ..plan import FamilyPlan, MasqueradeRule, Plan, masquerade_rules
from . import nftsets
from .base import FAMILIES, Backend, FamilyLive, Live, RuleCounter

SHAPES = ruledata.load("nftables")
TABLE = SHAPES["table"]
SET = SHAPES["set"]["name"]  # the stem of our sets' names
# The two exempt sets of a family (nftsets.py: one live, the other patched and switched to).
SLOTS = (f"{SET}_a", f"{SET}_b")
# ours: the two slots; exempt_<digest> and bare `exempt` are earlier versions' (deleted)
_OUR_SET = re.compile(rf"{SET}(?:_[0-9a-f]{{16}}|_a|_b)?")
CHAIN = SHAPES["chain"]["name"]
CHAIN_HEADER = SHAPES["chain"]["header"]
IN_CHAIN = SHAPES["inbound_chain"]["name"]
IN_HEADER = SHAPES["inbound_chain"]["header"]
IN_RULES = [SHAPES["inbound_chain"]["rule"]]
# IPMASQ_NFT_CLI=1: drive the `nft` binary even when libnftables loads (tests, debugging).
CLI_ENV = "IPMASQ_NFT_CLI"
LIBRARY = "libnftables.so.1"

_COUNTER = re.compile(r"\bcounter packets (\d+) bytes (\d+)")
_OIFNAME = re.compile(r'oifname (!= )?"((?:[^"\\]|\\.)*)" ')
_ERROR = re.compile(r"^(?:\S*?:(\d+):[\d-]+: )?Error: (.*)$", re.M)
_ENOENT = "No such file or directory"


# ---------------------------------------------------------------- pure rendering


def table_ref(family: int) -> str:
    """`ip ipmasq_legacy` / `ip6 ipmasq_legacy`: what follows `table` in every command."""
    return f"{SHAPES['family'][family]} {TABLE}"


def _ntop(addr) -> str:
    """An address as nft prints it (glibc inet_ntop). Python agrees on RFC 5952
    compression but spells IPv4-mapped/-compatible IPv6 addresses in hex."""
    text = str(addr)
    if addr.version != 6:
        return text
    words = struct.unpack("!8H", addr.packed)
    lead = next((i for i, w in enumerate(words) if w), 8)
    if lead == 6 or (lead == 7 and words[7] != 1) or (lead == 5 and words[5] == 0xFFFF):
        dotted = str(ipaddress.IPv4Address(addr.packed[12:]))
        return ("::ffff:" if lead == 5 else "::") + dotted
    return text


_NETWORK = {4: ipaddress.IPv4Network, 6: ipaddress.IPv6Network}


def _network(prefix, family: int):
    """A plan prefix as an ipaddress object of the family (strict: no host bits)."""
    if isinstance(prefix, _NETWORK[family]):
        return prefix
    try:
        return _NETWORK[family](prefix)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"prefix {prefix!r} is not an IPv{family} network: {exc}") from None


def _net_text(net) -> str:
    """A prefix in one spelling on every Python: set names are digests of these texts."""
    if net.version == 6 and net.network_address.ipv4_mapped is not None:
        return f"{prefixes.v6_words(int(net.network_address))}/{net.prefixlen}"
    return str(net)


def _member_text(prefix: str, family: int) -> str:
    """A plan prefix, checked again (fast: 100,000 of them), in the set's element syntax."""
    try:
        net = prefixes.parse(prefix)
    except prefixes.PrefixError as exc:
        raise ConfigError(f"prefix {prefix!r} is not an IPv{family} network: {exc}") from None
    if net.version != family:
        raise ConfigError(f"prefix {prefix!r} is IPv{net.version} in the IPv{family} plan")
    return _net_text(net)


def _prefix_text(net) -> str:
    """A prefix as nft prints it in a rule: a single address without its /32 or /128."""
    addr = _ntop(net.network_address)
    return addr if net.prefixlen == net.max_prefixlen else f"{addr}/{net.prefixlen}"


def interface_match(name: str) -> str:
    """The out-interface part of a rule: `eth+` is nft's prefix match `eth*`."""
    if name == "+":
        return SHAPES["out_interface_all"]
    stem, wildcard = (name[:-1], "*") if name.endswith("+") else (name, "")
    bad = [c for c in stem if c in '"\\' or c.isspace() or not c.isprintable()]
    if not stem or bad or len(stem.encode()) > 15:
        raise ConfigError(f"interface name {name!r} cannot be written as an nft oifname string")
    return SHAPES["out_interface"].format(pattern=stem.replace("*", "\\*") + wildcard)


def interface_of(rule: str) -> str:
    """The config's spelling of the interface a rule matches ("" = any but lo, "+" = any)."""
    m = _OIFNAME.match(rule)
    if not m:
        return "+"
    negated, pattern = m.group(1), m.group(2)
    if negated:
        return "" if pattern == "lo" else f"!{pattern}"
    if pattern.endswith("*") and not pattern.endswith("\\*"):
        return pattern[:-1].replace("\\*", "*") + "+"
    return pattern.replace("\\*", "*")


def masquerade_line(rule: MasqueradeRule, family: int, random_fully: bool) -> str:
    """A masquerade rule, or an snat rule where the plan names the address."""
    payload = SHAPES["payload"][family]
    pieces = dict(
        out_interface=interface_match(rule.interface) if rule.interface else SHAPES["out_interface_any"],
        source=(SHAPES["source"].format(payload=payload, prefix=_prefix_text(_network(rule.source, family)))
                if rule.source else ""),
        protocol=SHAPES["protocol"].format(protocol=rule.protocol) if rule.protocol else "",
        # iptables-nft's spelling of `-m statistic --probability p`: p as a fraction of 2^31
        port_share=SHAPES["port_share"].format(threshold=rule.share) if rule.share is not None else "",
        random_fully=SHAPES["random_fully"] if random_fully else "",
    )
    if rule.snat is None:
        return SHAPES["rules"]["masquerade"].format(
            to_ports=SHAPES["to_ports"].format(first=rule.ports[0], last=rule.ports[1]) if rule.ports else "",
            **pieces)
    address = _ntop(ipaddress.ip_address(rule.snat))  # checked again: nothing else reaches nft input
    return SHAPES["rules"]["snat"].format(
        address=SHAPES["snat_address6_ported"].format(address=address) if rule.ports and family == 6 else address,
        ports=SHAPES["snat_ports"].format(first=rule.ports[0], last=rule.ports[1]) if rule.ports else "",
        **pieces)


def set_name(fp: FamilyPlan, slot: str | None = None) -> str:
    """The exempt set the rules look up: `slot` (one of SLOTS), the first by default (what
    a new install uses)."""
    return slot or SLOTS[0]


def other_slot(slot: str | None) -> str:
    return SLOTS[1] if slot == SLOTS[0] else SLOTS[0]


def chain_rules(fp: FamilyPlan, slot: str | None = None) -> list[str]:
    """Our chain's rules, as `nft list table` prints them (counters left out), looking up
    the exempt set `slot` (default: the first)."""
    rules = SHAPES["rules"]
    lines = [rules["bridged"], rules["inbound"], rules["local"]]
    if fp.exempt:
        lines.append(rules["exempt"].format(payload=SHAPES["payload"][fp.family], set=set_name(fp, slot)))
    return lines + [masquerade_line(r, fp.family, fp.random_fully) for r in masquerade_rules(fp)]


def set_declaration(family: int) -> list[str]:
    return [line.format(type=SHAPES["set"]["type"][family]) for line in SHAPES["set"]["declaration"]]


# The characters a family's prefixes are spelled with, checked over all members at once
# (one C-speed pass over 100,000 of them, no per-member state): nothing else can reach
# nft input, so no quote, brace, space or newline of a crafted prefix can inject. A
# member that fails is then found and named by the exact check, _member_text.
_MEMBER_CHARS = {4: re.compile(r"[0-9./]*"), 6: re.compile(r"[0-9a-f:./]*")}


def member_texts(fp: FamilyPlan) -> list[str]:
    """The plan's exempt prefixes, checked, as set elements."""
    members = list(fp.exempt)
    if _MEMBER_CHARS[fp.family].fullmatch("".join(members)) and all(members):
        return members
    return [_member_text(p, fp.family) for p in members]  # raises, naming the bad one


def render_set(fp: FamilyPlan, slots=SLOTS[:1]) -> str:
    """The exempt sets `slots` filled, in a table block (which adds the table when it is
    missing and leaves everything else in it alone): what apply writes over netlink
    (nftsets.py), in nft's syntax."""
    lines = [f"table {table_ref(fp.family)} {{"]
    for slot in slots:
        lines += [f"\tset {slot} {{", *(f"\t\t{line}" for line in set_declaration(fp.family))]
        lines.append("\t\telements = { " + ",\n\t\t\t     ".join(member_texts(fp)) + " }")
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_declare(family: int, slots) -> str:
    """The sets `slots`, empty (apply fills them over netlink before any rule uses them)."""
    ref = table_ref(family)
    decl = "; ".join(set_declaration(family))
    return f"add table {ref}\n" + "".join(f"add set {ref} {slot} {{ {decl}; }}\n" for slot in slots)


def render_table(fp: FamilyPlan) -> str:
    """The whole table of one family, laid out as `nft list table` prints it."""
    lines = [f"table {table_ref(fp.family)} {{"]
    if fp.exempt:
        lines += render_set(fp, SLOTS).splitlines()[1:-1]
        lines.append("")
    lines += [f"\tchain {IN_CHAIN} {{", f"\t\t{IN_HEADER}", *(f"\t\t{rule}" for rule in IN_RULES), "\t}", ""]
    lines.append(f"\tchain {CHAIN} {{")
    lines.append(f"\t\t{CHAIN_HEADER}")
    lines += [f"\t\t{rule}" for rule in chain_rules(fp)]
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


def render_replace(fp: FamilyPlan) -> str:
    """The last resort, for a table of ours that cannot be patched (attributes or objects
    nft cannot delete one by one): the old table goes and the new one comes in one commit.
    This creates the set together with the rules that use it (the module's doc says why
    that is avoided everywhere else)."""
    ref = table_ref(fp.family)
    return f"add table {ref}\ndelete table {ref}\n" + render_table(fp)


def render_rules(fp: FamilyPlan, live: NftFamilyLive | None = None, slot: str | None = None) -> str:
    """The switch, against what is live (None: nothing): the chain and its rules (looking
    up set `slot`, filled already), then every object that is not ours any more deleted
    (sets of earlier versions; both slots when nothing is exempt)."""
    ref = table_ref(fp.family)
    chain = f"{ref} {CHAIN}"
    lines = [f"add table {ref}"]
    header = live.chain_header if live is not None else None
    if header is not None and header != CHAIN_HEADER:
        lines += [f"flush chain {chain}", f"delete chain {chain}"]  # another hook: a new chain
        header = None
    if header is None:
        lines.append(f"add chain {chain} {{ {CHAIN_HEADER} }}")
    else:
        lines.append(f"flush chain {chain}")
    lines += [f"add rule {chain} {rule}" for rule in chain_rules(fp, slot)]
    # the chain marking connections to the node: rewritten only when it differs
    in_chain = f"{ref} {IN_CHAIN}"
    if live is None or live.in_header != IN_HEADER or live.in_rules != IN_RULES:
        if live is not None and live.in_header is not None:
            lines += [f"flush chain {in_chain}", f"delete chain {in_chain}"]
        lines.append(f"add chain {in_chain} {{ {IN_HEADER} }}")
        lines += [f"add rule {in_chain} {rule}" for rule in IN_RULES]
    if live is not None:
        keep = SLOTS if fp.exempt else ()
        lines += [f"delete set {ref} {name}" for name in sorted(live.sets) if name not in keep]
        lines += [f"delete {kind} {ref} {name}" for kind, name in live.foreign]
    return "\n".join(lines) + "\n"


def render_delete(family: int) -> str:
    return f"delete table {table_ref(family)}\n"


# ---------------------------------------------------------------- reading back


@dataclass
class NftSet:
    declaration: list[str] = field(default_factory=list)
    members: tuple[str, ...] = ()
    # A set known from our own record (NftablesBackend._recorded) rather than read: its
    # members are the ones apply wrote last, as nf_tables' generation has not moved since.
    recorded: bool = False


@dataclass
class NftFamilyLive(FamilyLive):
    chain_header: str | None = None  # None: no chain postrouting in our table
    in_header: str | None = None  # None: no chain prerouting (IN_CHAIN) in our table
    in_rules: list[str] = field(default_factory=list)
    sets: dict[str, NftSet] = field(default_factory=dict)  # our sets (exempt_<digest>) by name
    foreign: list[tuple[str, str]] = field(default_factory=list)  # other objects: (kind, name)
    attributes: list[str] = field(default_factory=list)  # table attributes (flags dormant, ...)
    read_error: str | None = None

    @property
    def exempt_set(self) -> str | None:
        """The set our chain looks up, if any."""
        for rule in self.rules:
            m = _LOOKUP.search(rule)
            if m:
                return m.group(1)
        return None


_LOOKUP = re.compile(r"\bdaddr @(\S+) return\b")


def _statements(text: str):
    """(depth, statement) for each statement of `nft list table` output; a statement
    whose braces span lines (set elements, long anonymous sets) is joined into one.
    Linear: a 100k-element set is one statement of 50k lines."""
    depth = 0
    parts: list[str] | None = None
    balance = 0
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        opens, closes = line.count("{"), line.count("}")
        if parts is not None:
            parts.append(line)
            balance += opens - closes
            if balance > 0:
                continue
            yield depth, " ".join(parts)
            parts = None
            continue
        if line == "}":
            depth -= 1
            continue
        if line.endswith("{") and opens == closes + 1 and "=" not in line:
            yield depth, line
            depth += 1
            continue
        if opens > closes:
            parts, balance = [line], opens - closes
            continue
        yield depth, line


def _parse_elements(statement: str, family: int, name: str, problems: list[str]) -> tuple[str, ...]:
    """`elements = { 1.2.3.4, 10.0.0.0/8, 10.1.0.0-10.1.0.255 }` -> prefix strings, as
    str(ip_network) spells them: a bare address is its /32 or /128, a range the
    prefixes that cover it exactly. nft prints addresses as inet_ntop does, which is
    Python's spelling too except for ranges and IPv6 with an embedded dotted quad:
    only those go through ipaddress (100k elements read in a tenth of a second)."""
    body = statement[statement.index("{") + 1 : statement.rindex("}")]
    network = _NETWORK[family]
    full = "/32" if family == 4 else "/128"
    slow = "-" if family == 4 else "-."
    out: list[str] = []
    odd = 0
    for item in body.split(","):
        item = item.strip()
        if not item:
            continue
        word, _, extra = item.partition(" ")
        if extra:
            odd += 1  # a comment, timeout or counter on an element: not one of ours
        if not any(c in word for c in slow):
            out.append(word if "/" in word else word + full)
            continue
        try:
            if "-" in word:
                first, last = (network(a).network_address for a in word.split("-", 1))
                out += [_net_text(n) for n in ipaddress.summarize_address_range(first, last)]
            else:
                out.append(_net_text(network(word)))
        except (ValueError, TypeError):
            odd += 1
    if odd:
        problems.append(f"set {name} has {odd} elements that are not plain prefixes")
    return tuple(out)


def parse_table(text: str, family: int) -> NftFamilyLive:
    """Our table of one family from `nft list table` text (linear in its size)."""
    live = NftFamilyLive(family=family, installed=True)
    block: tuple[str, str] | None = None
    for depth, stmt in _statements(text):
        if depth == 0:
            continue  # `table ip ipmasq_legacy {`
        if depth == 1:
            words = stmt.split()
            block = None
            if stmt.endswith("{") and len(words) == 3:
                block = (words[0], words[1])
                if words[0] == "set" and _OUR_SET.fullmatch(words[1]):
                    live.sets[words[1]] = NftSet()
                elif block == ("chain", CHAIN):
                    live.chain_header = ""
                elif block == ("chain", IN_CHAIN):
                    live.in_header = ""
                else:
                    live.foreign.append(block)
                    live.problems.append(f"unexpected {words[0]} {words[1]}")
            else:
                live.attributes.append(stmt)
                live.problems.append(f"unexpected table attribute {stmt!r}")
            continue
        if block is not None and block[0] == "set" and block[1] in live.sets:
            nset = live.sets[block[1]]
            if stmt.startswith("elements = {"):
                nset.members = _parse_elements(stmt, family, block[1], live.problems)
            else:
                nset.declaration.append(stmt)
        elif block == ("chain", IN_CHAIN):
            if stmt.startswith("type ") and not live.in_header and not live.in_rules:
                live.in_header = stmt
            else:
                live.in_rules.append(_COUNTER.sub("counter", stmt))
        elif block == ("chain", CHAIN):
            if stmt.startswith("type ") and not live.chain_header and not live.rules:
                live.chain_header = stmt
                continue
            counter = _COUNTER.search(stmt)
            rule = _COUNTER.sub("counter", stmt)
            live.rules.append(rule)
            if counter and re.search(r"\b(masquerade|snat to)\b", rule):
                live.counters.append(
                    RuleCounter(family, rule, interface_of(rule), int(counter.group(1)), int(counter.group(2)))
                )
    used = live.exempt_set
    if used in live.sets:
        live.exempt = live.sets[used].members
    return live


_COUNTER_RULE = re.compile(r"\bcounter\b.*\b(masquerade|snat to)\b")
NFT_META_OIFNAME, NFT_CMP_EQ, NFT_CMP_NEQ, IFNAMSIZ = 7, 0, 1, 16


def _rule_counter(exprs: list[tuple[str, dict[int, bytes]]]) -> tuple[str, int, int] | None:
    """(interface as interface_of spells it, packets, bytes) of a rule with a counter and
    a masquerade or snat, from its netlink expressions; None for any other rule."""
    names = [name for name, _ in exprs]
    if "counter" not in names or not ({"masq", "nat"} & set(names)):
        return None
    data = dict(exprs)["counter"]
    nbytes, packets = (int.from_bytes(data.get(k, b"")[:8] or b"\0", "big") for k in (1, 2))
    interface = "+"  # no oifname match: any interface
    for i, (name, attrs) in enumerate(exprs[:-1]):
        if name == "meta" and int.from_bytes(attrs.get(2, b""), "big") == NFT_META_OIFNAME \
                and exprs[i + 1][0] == "cmp":
            cmp = exprs[i + 1][1]
            op = int.from_bytes(cmp.get(2, b""), "big")
            value = netlink.attrs(cmp.get(3, b"")).get(1, b"")
            # an exact name is compared with its padding, a prefix (`eth*`) without it
            stem, prefix = value.rstrip(b"\0").decode(errors="replace"), len(value) < IFNAMSIZ
            if op == NFT_CMP_NEQ:  # as nft prints it (interface_of keeps a negated pattern so)
                interface = "" if stem == "lo" and not prefix else "!" + stem.replace("*", "\\*") + "*" * prefix
            elif op == NFT_CMP_EQ:
                interface = stem + "+" * prefix
            break
    return interface, packets, nbytes


def _first_error(err: str, rc: int) -> str:
    m = _ERROR.search(err)
    if m:
        return f"line {m.group(1)}: {m.group(2).strip()}" if m.group(1) else m.group(2).strip()
    return next((ln.strip() for ln in err.splitlines() if ln.strip()), f"exit status {rc}")


# ---------------------------------------------------------------- talking to nftables


class _CliRunner:
    """`nft -f -` in a subprocess: the fallback when libnftables cannot be loaded."""

    name = "nft"

    def cmd(self, text: str, dry_run: bool = False) -> tuple[int, str, str]:
        argv = ["nft"] + (["-c"] if dry_run else []) + ["-f", "-"]
        try:
            proc = subprocess.run(argv, input=text, capture_output=True, text=True)
        except FileNotFoundError:
            raise ApplyError("nft: command not found") from None
        return proc.returncode, proc.stdout, proc.stderr


class _LibRunner:
    """libnftables in-process, through the `nftables` Python binding."""

    name = "libnftables"

    def __init__(self):
        import nftables  # ImportError: no binding; OSError below: no libnftables.so.1

        self._module = nftables
        self.nft = nftables.Nftables(sofile=LIBRARY)
        self._can_dry_run = self._dry_run_setter(self.nft) is not None

    @staticmethod
    def _dry_run_setter(nft):
        if hasattr(nft, "set_dry_run"):
            return nft.set_dry_run
        # Older bindings (pip-nftables 1.0.2) lack set_dry_run; the C library has it.
        ctx = getattr(nft, "_Nftables__ctx", None)
        if ctx is None:
            return None
        try:
            fn = ctypes.CDLL(LIBRARY).nft_ctx_set_dry_run
        except (OSError, AttributeError):
            return None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        fn.restype = None
        return lambda on: fn(ctx, on)

    def cmd(self, text: str, dry_run: bool = False) -> tuple[int, str, str]:
        if not dry_run:
            return self.nft.cmd(text)
        if not self._can_dry_run:
            return 0, "", ""  # cannot check apart; the commit itself is still all-or-nothing
        # A context of its own: a dry run leaves its changes in the context's cache (the
        # ruleset generation has not moved, so the cache is not fetched again), and the
        # real run would then find, say, an element to delete already gone.
        checker = self._module.Nftables(sofile=LIBRARY)
        self._dry_run_setter(checker)(True)
        return checker.cmd(text)


def _library_missing() -> str | None:
    """Why the libnftables binding cannot be used, or None."""
    try:
        import nftables  # noqa: F401
    except ImportError:
        return "no nftables Python module"
    try:
        ctypes.CDLL(LIBRARY)
    except OSError:
        return f"no {LIBRARY}"
    return None


# ---------------------------------------------------------------- is the binding safe here?
#
# The binding (pip-nftables, a copy of nftables' py/nftables.py) is written for one
# nftables release's libnftables. Older libraries crash under it in C, where Python
# cannot catch it: libnftables 0.9.8 (Debian 11) aborts with "double free or corruption"
# after the transaction committed, so apply died half done. So the binding is used only
#   1. with a library at least as new as the binding (`nft --version` tells the
#      library's release: the nftables package ships both), and
#   2. after a child process ran it the way apply does (a checked transaction through a
#      second context, the commit, both contexts freed) in a throw-away network
#      namespace (without the right to make one: the check alone) and exited normally.
# Otherwise `nft -f -` drives the kernel. The verdict is kept in the state directory
# (tmpfs), keyed by the library file and the binding's version: one child per boot.

BINDING_RECORD = "nft-binding.json"
PROBE_TIMEOUT = 20


def _release(text: str) -> tuple[int, ...] | None:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(g or 0) for g in m.groups()) if m else None


def binding_version() -> str | None:
    from importlib import metadata

    for dist in ("pip-nftables", "nftables"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def library_version() -> str | None:
    """The nftables release of the installed library, from `nft --version`."""
    if shutil.which("nft") is None:
        return None
    try:
        out = subprocess.run(["nft", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    release = _release(out)
    return ".".join(map(str, release)) if release else None


def _library_file() -> str:
    """The loaded libnftables' path, size and mtime: a new library gets a new verdict."""
    ctypes.CDLL(LIBRARY)
    for line in Path("/proc/self/maps").read_text().splitlines():
        if "libnftables.so" in line:
            path = line.split(None, 5)[-1]
            st = os.stat(path)
            return f"{path}:{st.st_size}:{st.st_mtime_ns}"
    return LIBRARY


def _probe_binding(table: str) -> str | None:
    """Run the binding on `table` in a child the way apply does; None if it survived and
    loaded it, else why not (a crash, or nft's own error)."""
    child = [sys.executable, "-c", "import sys; from ipmasq_legacy.backends import nftables as n; "
             "sys.exit(n._probe_main(sys.argv[1] == 'check'))"]
    attempts = ([["unshare", "--net", "--", *child, "commit"]] if shutil.which("unshare") else []) + [[*child, "check"]]
    for argv in attempts:
        try:
            proc = subprocess.run(argv, input=table, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            return "the libnftables binding did not finish a probe transaction"
        if argv[0] == "unshare" and proc.returncode != 0 and proc.stderr.startswith("unshare:"):
            continue  # no right to make a namespace: check in place (commits nothing)
        if proc.returncode < 0:
            return (f"libnftables {library_version() or '?'} crashed under the binding {binding_version() or '?'} "
                    f"(signal {-proc.returncode}) in a probe")
        if proc.returncode != 0:
            first = next((ln for ln in proc.stderr.splitlines() if ln.strip()), f"exit status {proc.returncode}")
            return f"a probe table did not load through libnftables: {first.strip()}"
        return None
    return "the libnftables probe could not run"


def binding_unsafe(table: str | None = None) -> str | None:
    """None when the in-process binding may drive the kernel here, else why not."""
    missing = _library_missing()
    if missing:
        return missing
    bind = binding_version()
    key = f"{_library_file()} {bind} {sys.version_info[0]}.{sys.version_info[1]}"
    record = state.read_json(BINDING_RECORD)
    if key in record:
        return record[key]
    lib = library_version()
    if lib and bind and _release(lib) < (_release(bind) or ()):
        verdict = f"libnftables {lib} is older than the binding {bind} (written for nftables {bind})"
    else:
        from .selection import NFT_PROBE

        verdict = _probe_binding(table or NFT_PROBE)
    if verdict is None or "crashed" in verdict or "older" in verdict:  # nft's own error: no verdict kept
        try:
            state.write_json(BINDING_RECORD, {**record, key: verdict})
        except OSError:
            pass  # no state directory we may write: probe again next time
    return verdict


def _probe_main(check_only: bool) -> int:
    """The child of _probe_binding: stdin's table through the binding as apply does it."""
    import gc

    runner = _LibRunner()
    text = sys.stdin.read()
    rc, _, err = runner.cmd(text, dry_run=True)
    if rc == 0 and not check_only:
        rc, _, err = runner.cmd(text)
    del runner
    gc.collect()  # the contexts are freed here, where 0.9.8 crashed
    if rc != 0:
        sys.stderr.write(err)
    return 0 if rc == 0 else 1


def probe_table(table: str) -> str | None:
    """Whether a table like ours loads, through the driver apply would use: None, else
    why not. (selection's probe for `auto`: the same path as apply.)"""
    if not _cli_forced() and binding_unsafe(table) is None:
        return None  # the binding loaded `table` in its probe
    if shutil.which("nft") is None:
        return "the nft command is missing (install the nftables package)"
    attempts = [["unshare", "--net", "nft", "-f", "-"], ["nft", "--check", "-f", "-"]]
    if shutil.which("unshare") is None:
        attempts = attempts[1:]
    for argv in attempts:
        try:
            proc = subprocess.run(argv, input=table, capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return "probe timed out"
        if argv[0] == "unshare" and proc.returncode != 0 and "unshare" in proc.stderr:
            continue  # could not make the namespace (e.g. no CAP_SYS_ADMIN): check in place instead
        if proc.returncode != 0:
            first = next((ln for ln in proc.stderr.splitlines() if ln.strip()), f"exit status {proc.returncode}")
            return f"a nat table with fib, an interval set and masquerade did not load: {first.strip()}"
        return None
    return "probe could not run"


def _cli_forced() -> bool:
    return os.environ.get(CLI_ENV, "").strip().lower() not in ("", "0", "false", "no")


# ---------------------------------------------------------------- the backend


class NftablesBackend(Backend):
    name = "nftables"

    # Above this many exempt prefixes a batch goes to the nft binary when there is one:
    # libnftables in-process keeps its cache in the agent (about +120 MB at 100,000
    # prefixes, never given back to the system), a child process frees it on exit.
    LARGE = 20_000

    def __init__(self, use_cli: bool | None = None):
        """use_cli: True drives the nft binary, False libnftables; None decides by
        IPMASQ_NFT_CLI, then by whether libnftables loads (and the size of the plan)."""
        self.use_cli = use_cli
        self._runner_obj = None
        self._commits = 0  # transactions committed by this object (see _record)

    def _size_hint(self, plan: Plan) -> None:
        """A large plan is read and written through the nft binary (see LARGE)."""
        large = max((len(f.exempt) for f in plan.families), default=0) > self.LARGE
        if large and self.use_cli is None and shutil.which("nft"):
            self._runner_obj = _CliRunner()

    def _runner(self):
        if self._runner_obj is None:
            use_cli = _cli_forced() if self.use_cli is None else self.use_cli
            if not use_cli and binding_unsafe() is None:  # a crash in C must never cut an apply short
                try:
                    self._runner_obj = _LibRunner()
                except (ImportError, OSError):
                    self._runner_obj = None
            if self._runner_obj is None:
                self._runner_obj = _CliRunner()
        return self._runner_obj

    @property
    def driver(self) -> str:
        """"libnftables" or "nft": what talks to the kernel."""
        return self._runner().name

    def unavailable_reason(self) -> str | None:
        have_nft = shutil.which("nft") is not None
        use_cli = _cli_forced() if self.use_cli is None else self.use_cli
        if use_cli and not have_nft:
            return "no nft binary (install the nftables package)"
        if not use_cli and not have_nft:
            unsafe = binding_unsafe()
            if unsafe:
                return f"no nft binary, and the libnftables binding cannot be used: {unsafe} (install the nftables package)"
        return self._kernel_probe_reason()

    def _kernel_probe_reason(self) -> str | None:
        """Hook for a kernel probe (nf_tables, nat, fib, masquerade support); None for now."""
        return None

    # -- rendering

    def render(self, plan: Plan) -> str:
        """What an install on a node without our tables runs, transaction by transaction."""
        parts = []
        for fp in plan.families:
            if fp.exempt:
                parts.append(f"# IPv{fp.family}: the exempt sets, declared (nft -f -) and filled (netlink), "
                             "before any rule uses them")
                parts.append(render_set(fp, SLOTS).rstrip("\n"))
                parts.append(f"# IPv{fp.family}: nft -f - (one transaction: the chain that uses {SLOTS[0]})")
            else:
                parts.append(f"# IPv{fp.family}: nft -f - (one transaction)")
            parts.append(render_rules(fp).rstrip("\n"))
        return "\n".join(parts) + "\n"

    # -- reading what we own

    def _read_family(self, family: int) -> NftFamilyLive:
        rc, out, err = self._runner().cmd(f"list table {table_ref(family)}\n")
        if rc == 0:
            return parse_table(out, family)
        live = NftFamilyLive(family=family, installed=False)
        if _ENOENT not in err:
            live.read_error = _first_error(err, rc)
        return live

    def live(self) -> Live:
        return Live(self.name, {f: self._read_family(f) for f in FAMILIES})

    def counters(self, plan: Plan | None = None) -> list[RuleCounter]:
        """The counters of our chain's masquerade and snat rules, read over netlink (one
        rule dump per family, scoped to our chain; no set's elements, no nft, no
        libnftables). A rule's text is the plan's (`plan`: the one the caller knows is
        installed) or the one apply recorded, matched by position."""
        record = state.read_json(self.RECORD).get("families", {}) if plan is None else {}
        out = []
        for family in FAMILIES:
            try:
                rules = netlink.nft_rules(SHAPES["family"][family], TABLE, CHAIN)
            except OSError:
                rules = None
            if not rules:
                continue
            found = [c for c in map(_rule_counter, rules) if c is not None]
            fp = plan.family(family) if plan is not None else None
            texts = chain_rules(fp) if fp is not None else record.get(str(family), {}).get("rules", [])
            texts = [t for t in texts if _COUNTER_RULE.search(t)]
            if len(texts) != len(found):
                texts = [""] * len(found)
            out += [RuleCounter(family, text, interface, packets, nbytes)
                    for text, (interface, packets, nbytes) in zip(texts, found)]
        return out

    # -- comparing

    def family_drift(self, fp: FamilyPlan | None, live: NftFamilyLive) -> list[str]:
        if live.read_error:
            return [f"cannot read table {table_ref(live.family)}: {live.read_error}"]
        if fp is None:
            return ["installed but disabled"] if live.installed else []
        if not live.installed:
            return ["not installed"]
        problems = list(live.problems)
        if live.chain_header is None:
            problems.append(f"chain {CHAIN} missing")
        else:
            if live.chain_header != CHAIN_HEADER:
                problems.append(f"chain {CHAIN} hook differs")
            if live.rules != chain_rules(fp, _live_slot(live)):
                problems.append(f"chain {CHAIN} differs")
        if live.in_header != IN_HEADER or live.in_rules != IN_RULES:
            problems.append(f"chain {IN_CHAIN} " + ("missing" if live.in_header is None else "differs"))
        if fp.exempt:
            used = _live_slot(live)
            for name, what in ((used, "exempt set"), (other_slot(used), f"idle exempt set {other_slot(used)}")):
                nset = live.sets.get(name)
                if nset is None:
                    problems.append(f"{what} missing")
                elif nset.declaration != set_declaration(fp.family):
                    problems.append(f"{what} declaration differs")
                elif not _same_prefixes(nset.members, fp.exempt):
                    problems.append(f"{what} members differ")
        stale = [name for name in live.sets if name not in (SLOTS if fp.exempt else ())]
        if stale:
            problems.append(f"{len(stale)} stale sets")
        return problems

    def drift(self, plan: Plan, live: Live | None = None) -> list[str]:
        if live is None:
            self._size_hint(plan)
        return super().drift(plan, live)

    def fingerprint(self) -> str | None:
        """nf_tables' ruleset generation: every committed change in the namespace (ours,
        kube-proxy's, a hand edit of our set) moves it, and reading it lists nothing (at
        100,000 prefixes a listing of our table costs about a second, most of it in the
        kernel)."""
        genid = netlink.nft_generation()
        return None if genid is None else f"nf_tables generation {genid}"

    # -- changing

    def _run(self, family: int, text: str, what: str, check: bool = True) -> None:
        """One transaction; with `check`, dry-run first (cheap for a chain's worth of
        rules; the big set is loaded unchecked: its commit is all-or-nothing and, until
        the rules use it, harmless)."""
        runner = self._runner()
        for dry_run in (True, False) if check else (False,):
            rc, _, err = runner.cmd(text, dry_run=dry_run)
            self._commits += rc == 0 and not dry_run
            if rc != 0:
                step = "check of" if dry_run else "commit of"
                raise ApplyError(f"{runner.name}: {step} {what} of table {table_ref(family)} failed: "
                                 f"{_first_error(err, rc)}")

    def _delete_table(self, family: int) -> bool:
        """Delete our table of one family; False when there was none."""
        runner = self._runner()
        rc, _, err = runner.cmd(render_delete(family))
        if rc == 0:
            self._commits += 1
            return True
        if _ENOENT in err:
            return False
        raise ApplyError(f"{runner.name}: delete table {table_ref(family)} failed: {_first_error(err, rc)}")

    def _apply_family(self, fp: FamilyPlan, live: NftFamilyLive, genid: int | None) -> str | None:
        """Old or new at every moment (nftsets.py): the idle slot patched to the plan and
        committed, then the rules switched to it in one checked transaction, then the
        other slot patched too. `genid`: the generation `live` was true at (None: unknown);
        a set patch is refused by the kernel when anything committed since."""
        if live.read_error:
            raise ApplyError(f"cannot read table {table_ref(fp.family)}: {live.read_error}")
        odd = [n for n in SLOTS if n in live.sets and live.sets[n].declaration != set_declaration(fp.family)]
        if live.attributes or odd:
            # Table attributes (dormant, ...) or a set of our name re-declared by someone:
            # nothing to patch in place; the last resort (render_replace) it is.
            self._run(fp.family, render_replace(fp), "the table")
            return SLOTS[0]
        current = live if live.installed else None
        used = live.exempt_set if live.exempt_set in SLOTS else None  # None: a new install uses the first
        target = used
        if fp.exempt:
            wanted = member_texts(fp)
            missing = [n for n in SLOTS if n not in live.sets]
            if missing:
                self._run(fp.family, render_declare(fp.family, missing), "the exempt sets", check=False)
                genid = None if genid is None else genid + 1
            contents = {n: (live.sets[n].members if n in live.sets else ()) for n in SLOTS}
            if used not in live.sets or not _same_prefixes(contents[used], fp.exempt):
                target = other_slot(used)
            genid = self._patch(fp.family, target, contents[target], wanted, genid)
        try:
            self._run(fp.family, render_rules(fp, current, target), "the rules")
        except ApplyError:
            if current is None or not current.foreign:
                raise
            self._run(fp.family, render_replace(fp), "the table")  # a foreign object nft would not delete
            return SLOTS[0]
        if fp.exempt:
            genid = None if genid is None else genid + 1
            idle = other_slot(target)
            self._patch(fp.family, idle, live.sets[idle].members if idle in live.sets else (), wanted, genid)
        return target

    def _patch(self, family: int, name: str, members, wanted: list[str], genid: int | None) -> int | None:
        """Set `name`, holding `members`, made to hold `wanted` in one netlink transaction;
        the generation after it (None: unknown)."""
        have = set(members)
        if len(have) != len(members) or not _plain(members, family):
            add, delete, flush = wanted, (), True  # spelled oddly: rewritten whole
        else:
            want = set(wanted)
            add, delete, flush = [p for p in wanted if p not in have], [p for p in members if p not in want], False
        if not (add or delete or flush):
            return genid
        try:
            nftsets.patch(family, TABLE, name, add=add, delete=delete, flush=flush, genid=genid)
        except OSError as exc:
            if exc.errno == errno.ERESTART:
                raise _Moved() from None
            why = "conflicting intervals" if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) else exc.strerror
            raise ApplyError(f"netlink: patch of set {name} of table {table_ref(family)} failed: {why}") from None
        self._commits += 1
        return None if genid is None else genid + 1

    def apply(self, plan: Plan) -> list[str]:
        self._size_hint(plan)
        try:
            return self._apply(plan, trust_record=True)
        except _Moved:  # someone committed since our record: read, and do it again
            return self._apply(plan, trust_record=False)

    def _apply(self, plan: Plan, trust_record: bool) -> list[str]:
        changes = []
        self._commits = 0
        generation = netlink.nft_generation()
        current = self._recorded(generation) if trust_record else None
        if current is None:
            current = self.live()
            if netlink.nft_generation() != generation:
                generation = None  # someone committed while we read: nothing to record
        start = generation
        slots = {}
        for family, fp in self.wanted_families(plan).items():
            live = current.families[family]
            slots[family] = _live_slot(live)
            problems = self.family_drift(fp, live)
            if not problems:
                continue
            if fp is None:
                if self._delete_table(family):
                    changes.append(f"ipv{family} removed (disabled)")
                continue
            slots[family] = self._apply_family(fp, live, None if start is None else start + self._commits)
            what = "installed" if not live.installed else "updated (" + ", ".join(problems) + ")"
            changes.append(f"ipv{family} {what}: {len(chain_rules(fp))} rules, {len(fp.exempt)} exempt prefixes")
        self._record(plan, generation, slots)
        return changes

    # -- our record of what we wrote
    #
    # Reading our table back costs about a second at 100,000 prefixes (nft fetches every
    # element), so apply trusts a record of what it wrote last as long as nf_tables'
    # generation has not moved since: every commit in the namespace moves it, ours and
    # anyone else's. The record is taken only when the generation moved by exactly our
    # own commits (each of which changes something, so moves it by one).

    RECORD = "nftables.json"

    def _recorded(self, generation: int | None) -> Live | None:
        record = state.read_json(self.RECORD)
        if (generation is None or record.get("generation") != generation or record.get("netns") != _netns_id()
                or record.get("version") != __version__):
            return None
        families = {}
        for family in FAMILIES:
            fam = record.get("families", {}).get(str(family))
            if fam is None:
                families[family] = NftFamilyLive(family=family, installed=False)
                continue
            sets = {}
            if fam.get("set"):
                members = _read_members(family, fam.get("members"))
                if members is None:
                    return None
                # both slots hold the list: apply records only after it patched the idle one too
                sets = {name: NftSet(set_declaration(family), members, recorded=True) for name in SLOTS}
            families[family] = NftFamilyLive(family=family, installed=True, chain_header=CHAIN_HEADER,
                                             rules=list(fam["rules"]), sets=sets, in_header=IN_HEADER,
                                             in_rules=list(IN_RULES))
        return Live(self.name, families)

    def _record(self, plan: Plan | None, generation: int | None, slots: dict[int, str | None] | None = None) -> None:
        now = netlink.nft_generation()
        if plan is None or generation is None or now is None or (now - generation) % 2**32 != self._commits:
            state.remove(self.RECORD)
            return
        families = {}
        for fp in plan.families:
            slot = (slots or {}).get(fp.family) or SLOTS[0]
            families[str(fp.family)] = {"set": slot if fp.exempt else None, "rules": chain_rules(fp, slot),
                                        "members": _write_members(fp) if fp.exempt else None}
        state.write_json(self.RECORD, {"generation": now, "netns": _netns_id(), "version": __version__,
                                       "families": families})

    def remove(self) -> list[str]:
        if self.unavailable_reason():
            return []
        removed = [f"ipv{f}" for f in FAMILIES if self._delete_table(f)]
        state.remove(self.RECORD)
        for family in FAMILIES:
            state.remove(_members_file(family))
        return removed


class _Moved(ApplyError):
    """nf_tables' generation moved under a set patch (someone committed): read again."""

    def __init__(self):
        super().__init__("the nf_tables ruleset changed during the apply")


def _live_slot(live: NftFamilyLive) -> str:
    """The slot our chain looks up (the first when it looks up none of them)."""
    used = live.exempt_set
    return used if used in SLOTS else SLOTS[0]


_PLAIN = {4: re.compile(r"[0-9./]*"), 6: re.compile(r"[0-9a-f:./]*")}


def _plain(members, family: int) -> bool:
    """Every member a prefix spelled plainly (what a set read back or recorded holds), so
    a diff of texts is a diff of prefixes (an odd spelling only rewrites the set whole)."""
    return bool(_PLAIN[family].fullmatch("".join(members))) and all("/" in m for m in members)


def _members_file(family: int) -> str:
    return f"nftables-exempt{family}.txt"


def _write_members(fp: FamilyPlan) -> str:
    """The exempt list both slots hold, kept beside the record (100,000 prefixes: 1.5 MB,
    a few ms); its digest goes into the record, which names it."""
    text = "\n".join(member_texts(fp))
    path = state.state_dir() / _members_file(fp.family)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_members(family: int, digest: str | None) -> tuple[str, ...] | None:
    """The list _write_members kept, if it is the one the record names."""
    try:
        text = (state.state_dir() / _members_file(family)).read_text()
    except OSError:
        return None
    if digest is None or hashlib.sha256(text.encode()).hexdigest() != digest:
        return None
    return tuple(text.split("\n")) if text else ()


def _netns_id() -> str:
    """This network namespace in this boot (a generation is a namespace's, and counts
    again from the start after a reboot, when a state dir on disk would still be there)."""
    st = os.stat("/proc/self/ns/net")
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{boot}:{st.st_dev}:{st.st_ino}"


def _same_prefixes(live: tuple[str, ...], planned: tuple[str, ...]) -> bool:
    """The live set's prefixes against the plan's normalised ones: a tuple comparison
    when they agree (the usual case, linear); as sorted networks otherwise."""
    if tuple(live) == tuple(planned):
        return True
    if len(live) != len(planned):
        return False
    try:
        return sorted(map(ipaddress.ip_network, live)) == sorted(map(ipaddress.ip_network, planned))
    except (ValueError, TypeError):
        return False
