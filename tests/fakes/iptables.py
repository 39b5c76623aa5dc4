"""FakeIptables: iptables-legacy and iptables-nft (IPv4 and IPv6, each its own model,
so a test can put a rule in "the other variant") and ipset, as the iptables backends
(ipmasq_legacy/backends/iptables.py, ipsets.py) and others.py call them.

What it models, as measured in a private network namespace with iptables 1.8.9 and
ipset 7.17:

- `-S`, `-v -S` (counters as ` -c P B` before the target), `-save [-t T] [-c]`, the
  direct commands (-A -I -D -N -X -F -P); a rule is stored in the form -S prints
  (`-d 10.0.0.1` becomes `-d 10.0.0.1/32`, `-p tcp --dport` gets `-m tcp`);
- `-restore [--noflush] [-w] [--test]`: each `*table ... COMMIT` block applies whole or
  not at all, the blocks before a failing one stay committed (as the real tools do);
  parse errors exit 2, others 1; a declared user chain is flushed, a declared built-in
  chain is not; without --noflush the table is rebuilt from the block;
- a legacy table comes into being when anything names it (listing too) and shows in
  /proc/net/ip_tables_names, newest first; listing an iptables-nft table creates none;
- jumps to chains that do not exist, deleting a chain that is referenced or not empty,
  a set match naming a missing set or one of the other family: refused;
- ipset: create/add/del/test/destroy/flush/swap/list [-t|-n]/save/restore [-exist];
  restore runs line by line (no transaction: the lines before a failing one stay),
  a line with an unknown command fails it before anything runs (exit 2); hash:net
  refuses a /0 and a full set; References is the number of rules matching the set,
  across both variants and families; Size in memory grows per entry (a del and an add
  leave it as it was, as ipsets.py says).

`dump()` prints everything as one canonical text; `seed()` edits a table as a foreign
tool would; `fail_next()` makes the next call of a tool fail with nothing changed.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shlex
import subprocess
from dataclasses import dataclass, field

from . import FakeKernel

VARIANTS = ("legacy", "nft")
FAMILIES = (4, 6)
BUILTIN = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
# the order iptables-nft-save prints the tables that exist
NFT_SAVE_ORDER = ("mangle", "raw", "filter", "nat", "security")
TARGETS = frozenset(
    "ACCEPT DROP RETURN QUEUE MASQUERADE SNAT DNAT REDIRECT NETMAP MARK CONNMARK LOG NFLOG REJECT CT NOTRACK "
    "TPROXY TCPMSS CHECKSUM NFQUEUE TRACE CLASSIFY DSCP TOS TTL HL SET AUDIT".split())
NAT_ONLY = frozenset({"MASQUERADE", "SNAT", "DNAT", "REDIRECT", "NETMAP"})
VERSION = "v1.8.9"
IPSET_VERSION = "v7.17"
SAVE_DATE = "Thu Jan  1 00:00:00 1970"
WRITES = frozenset({"-A", "-I", "-D", "-N", "-X", "-F", "-P", "-R", "-E"})
SET_COMMANDS = frozenset({"create", "add", "del", "test", "destroy", "flush", "swap", "list", "save", "restore"})
SET_WRITES = frozenset({"create", "add", "del", "destroy", "flush", "swap", "restore"})
# ipset's Size in memory of an empty hash:net set and its growth per entry (measured)
SET_MEMORY = {"inet": (456, 48), "inet6": (1240, 72)}


class Refused(Exception):
    """A command the real tool refuses: its exit status and its message."""

    def __init__(self, message: str, rc: int = 1):
        super().__init__(message)
        self.rc = rc


@dataclass
class Rule:
    spec: str  # after "-A CHAIN ", as -S prints it
    packets: int = 0
    bytes: int = 0

    def tokens(self) -> list[str]:
        return shlex.split(self.spec)


@dataclass
class Table:
    name: str
    policies: dict[str, str] = field(default_factory=dict)  # the built-in chains'
    chains: dict[str, list[Rule]] = field(default_factory=dict)  # built-ins first, then user chains

    @classmethod
    def new(cls, name: str) -> Table:
        return cls(name, {c: "ACCEPT" for c in BUILTIN[name]}, {c: [] for c in BUILTIN[name]})

    def ordered(self, variant: str) -> list[str]:
        """Chains in the order -S lists them: built-ins, then user chains (libiptc keeps
        those sorted by name; iptables-nft lists them as created)."""
        users = [c for c in self.chains if c not in self.policies]
        return list(self.policies) + (sorted(users) if variant == "legacy" else users)

    def referenced(self, chain: str) -> bool:
        return any(_target(r.tokens()) == chain for rules in self.chains.values() for r in rules)


@dataclass
class IpSet:
    name: str
    kind: str
    family: str  # inet, inet6
    hashsize: int
    maxelem: int
    initval: int
    members: list = field(default_factory=list)  # ip_network objects, in insertion order

    def header(self) -> str:
        return (f"family {self.family} hashsize {self.hashsize} maxelem {self.maxelem} bucketsize 12 "
                f"initval 0x{self.initval:08x}")

    def memory(self) -> int:
        base, per = SET_MEMORY[self.family]
        return base + per * len(self.members)


def _target(tokens: list[str]) -> str | None:
    for i, tok in enumerate(tokens[:-1]):
        if tok in ("-j", "--jump", "-g", "--goto"):
            return tokens[i + 1]
    return None


def _quote(token: str) -> str:
    return f'"{token}"' if not token or re.search(r"\s", token) else token


def _show_member(net) -> str:
    """ipset prints a single address without its /32 or /128."""
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


class FakeIptables(FakeKernel):
    name = "fake-iptables"

    def __init__(self, variants=VARIANTS, default: str = "nft", bridged: bool = False) -> None:
        super().__init__()
        self.default = default  # the variant plain `iptables` is
        self.bridged = bridged  # br_netfilter loaded
        self.nets: dict[tuple[str, int], dict[str, Table]] = {(v, f): {} for v in VARIANTS for f in FAMILIES}
        self.sets: dict[str, IpSet] = {}
        self._initval = 0x1ce58589
        self._fail: dict[str, list] = {}
        for variant in variants:
            for base in ("iptables", "ip6tables"):
                for suffix in ("", "-save", "-restore"):
                    self.tools[f"{base}-{variant}{suffix}"] = self._iptables
                    if variant == default:
                        self.tools[f"{base}{suffix}"] = self._iptables
        self.tools["ipset"] = self._ipset

    # ------------------------------------------------------------ the seam

    def exec(self, argv, input=None):
        tool = str(argv[0]).rsplit("/", 1)[-1]
        pending = self._fail.get(tool)
        if pending:
            skip, rc, stderr = pending[0]
            if skip:
                pending[0][0] -= 1
            else:
                pending.pop(0)
                self.calls.append(tuple(argv))
                return subprocess.CompletedProcess(list(argv), rc, "", stderr)
        return super().exec(argv, input)

    def read_text(self, path):
        path = str(path)
        names = {"/proc/net/ip_tables_names": 4, "/proc/net/ip6_tables_names": 6}
        if path in names and any(f"iptables-legacy{s}" in self.tools for s in ("", "-save")):
            return "".join(f"{t}\n" for t in reversed(self.nets[("legacy", names[path])]))
        if path == "/proc/sys/net/bridge/bridge-nf-call-iptables":
            return "1\n" if self.bridged else None
        return super().read_text(path)

    # ------------------------------------------------------------ test knobs

    def fail_next(self, tool: str, stderr: str = "fake: refused", rc: int = 1, after: int = 0) -> None:
        """The next call of `tool` (argv[0]'s name; `after` calls of it first run as
        usual) fails with `rc` and `stderr`, having changed nothing."""
        self._fail.setdefault(tool, []).append([after, rc, stderr if stderr.endswith("\n") else stderr + "\n"])

    def seed(self, variant: str, family: int, table: str, *lines: str) -> None:
        """Edit a table as another tool would: `-A/-I/-D/-N/-X/-F/-P` lines, or `:CHAIN -`
        (create it). The table comes into being. A refused line raises Refused."""
        tables = self.nets[(variant, family)]
        work = copy.deepcopy(tables.get(table) or Table.new(table))
        for line in lines:
            if line.startswith(":"):
                name = line[1:].split()[0]
                work.chains.setdefault(name, [])
            else:
                self._op(work, variant, family, shlex.split(line))
        tables[table] = work

    edit = seed

    def seed_set(self, name: str, family: int, *members: str, maxelem: int = 65536) -> IpSet:
        """An ipset someone made (or a leftover of ours)."""
        self.sets[name] = s = IpSet(name, "hash:net", "inet" if family == 4 else "inet6", 1024, maxelem,
                                    self._next_initval())
        s.members = [ipaddress.ip_network(m, strict=False) for m in members]
        return s

    def count(self, variant: str, family: int, table: str, chain: str, index: int, packets: int, nbytes: int) -> None:
        """Traffic: the counters of rule `index` (0-based) of a chain."""
        rule = self.nets[(variant, family)][table].chains[chain][index]
        rule.packets, rule.bytes = packets, nbytes

    def rules(self, variant: str, family: int, table: str, chain: str | None = None) -> list[str]:
        """What `-S [chain]` prints (without creating a legacy table); [] when absent."""
        tab = self.nets[(variant, family)].get(table)
        if tab is None or (chain is not None and chain not in tab.chains):
            return []
        return self._list(tab, variant, chain, verbose=False)

    def writes(self) -> list[tuple[str, ...]]:
        """The calls that change (or try to change) something."""
        out = []
        for call in self.calls:
            tool = call[0].rsplit("/", 1)[-1]
            args = [a for a in call[1:] if not a.startswith("-") or a in WRITES]
            if tool.endswith("-restore") or (tool == "ipset" and args and args[0] in SET_WRITES):
                out.append(call)
            elif "tables" in tool and not tool.endswith("-save") and WRITES & set(call[1:]):
                out.append(call)
        return out

    def dump(self) -> str:
        """Everything, canonical: per variant, family and table (by name) the chains in
        -S order, `:CHAIN POLICY` (`-` for a user chain) then its rules (no counters);
        then the ipsets by name, each with its members sorted."""
        lines = []
        for variant in VARIANTS:
            for family in FAMILIES:
                tables = self.nets[(variant, family)]
                for name in sorted(tables):
                    tab = tables[name]
                    lines.append(f"*{variant} ipv{family} {name}")
                    order = tab.ordered(variant)
                    lines += [f":{c} {tab.policies.get(c, '-')}" for c in order]
                    lines += [f"-A {c} {r.spec}" for c in order for r in tab.chains[c]]
        for name in sorted(self.sets):
            s = self.sets[name]
            lines.append(f"ipset {name} {s.kind} family {s.family} hashsize {s.hashsize} maxelem {s.maxelem}")
            lines += [f"add {name} {m}" for m in sorted(s.members, key=lambda n: (n.version, n))]
        return "\n".join(lines) + "\n"

    def references(self, name: str) -> int:
        """Rules matching set `name`, in every variant, family and table (the kernel's count)."""
        n = 0
        for tables in self.nets.values():
            for tab in tables.values():
                for rules in tab.chains.values():
                    for r in rules:
                        toks = r.tokens()
                        n += any(t == "--match-set" and toks[i + 1:i + 2] == [name] for i, t in enumerate(toks))
        return n

    # ------------------------------------------------------------ iptables

    def _iptables(self, argv: list[str], input: str | None):
        tool = argv[0].rsplit("/", 1)[-1]
        m = re.fullmatch(r"(ip6?)tables(?:-(legacy|nft))?(-save|-restore)?", tool)
        assert m, tool
        family = 6 if m.group(1) == "ip6" else 4
        variant = m.group(2) or self.default
        try:
            if m.group(3) == "-save":
                return self._save(variant, family, argv[1:])
            if m.group(3) == "-restore":
                return self._restore(variant, family, tool, argv[1:], input or "")
            return self._command(variant, family, tool, argv[1:])
        except Refused as exc:
            return exc.rc, "", str(exc) + "\n"

    def _warning(self, variant: str, family: int, what: str) -> str:
        if variant == "nft" and self.nets[("legacy", family)]:
            return f"# Warning: iptables-legacy tables present, use iptables-legacy{what} to see them\n"
        return ""

    def _table(self, variant: str, family: int, name: str, create: bool) -> Table | None:
        if name not in BUILTIN:
            raise Refused(f"iptables {VERSION}: can't initialize iptables table `{name}': Table does not exist "
                          "(do you need to insmod?)", 3)
        tables = self.nets[(variant, family)]
        if name not in tables and create:
            tables[name] = Table.new(name)
        return tables.get(name)

    def _command(self, variant: str, family: int, tool: str, args: list[str]):
        table, verbose, i = "filter", False, 0
        while i < len(args):
            a = args[i]
            if a in ("-w", "--wait"):
                i += 1 if i + 1 < len(args) and args[i + 1].isdigit() else 0
            elif a in ("-W", "--wait-interval"):
                i += 1
            elif a in ("-t", "--table"):
                table, i = args[i + 1], i + 1
            elif a in ("-v", "--verbose"):
                verbose = True
            elif a in ("-n", "--numeric", "-x", "--exact"):
                pass
            elif a in ("-V", "--version"):
                return 0, f"{tool} {VERSION} ({'nf_tables' if variant == 'nft' else 'legacy'})\n", ""
            elif a in ("-S", "--list-rules"):
                chain = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("-") else None
                # a legacy table is created by naming it; iptables-nft lists what is there
                tab = self._table(variant, family, table, create=variant == "legacy") or Table.new(table)
                if chain is not None and chain not in tab.chains:
                    raise Refused("iptables: No chain/target/match by that name.", 1)
                out = self._list(tab, variant, chain, verbose)
                return 0, "".join(f"{ln}\n" for ln in out), self._warning(variant, family, "")
            elif a in WRITES:
                rest = [x for x in args[i:] if x not in ("-w", "--wait")]
                tables = self.nets[(variant, family)]
                work = copy.deepcopy(self._table(variant, family, table, create=False) or Table.new(table))
                self._op(work, variant, family, rest)
                tables[table] = work
                return 0, "", ""
            else:
                raise Refused(f"{tool} {VERSION}: unknown option \"{a}\" (the fake models -S, -v -S and the "
                              "rule commands)", 2)
            i += 1
        raise Refused(f"{tool} {VERSION}: no command specified", 2)

    def _list(self, tab: Table, variant: str, chain: str | None, verbose: bool) -> list[str]:
        chains = [chain] if chain is not None else tab.ordered(variant)
        out = [f"-P {c} {tab.policies[c]}" + (" -c 0 0" if verbose else "") for c in chains if c in tab.policies]
        out += [f"-N {c}" for c in chains if c not in tab.policies]
        for c in chains:
            for r in tab.chains[c]:
                spec = r.spec
                if verbose:  # the counters go before the target
                    toks = r.tokens()
                    k = next((i for i, t in enumerate(toks) if t in ("-j", "-g")), len(toks))
                    spec = " ".join([*map(_quote, toks[:k]), "-c", str(r.packets), str(r.bytes),
                                     *map(_quote, toks[k:])])
                out.append(f"-A {c} {spec}")
        return out

    def _save(self, variant: str, family: int, args: list[str]):
        only = args[args.index("-t") + 1] if "-t" in args else None
        counters = "-c" in args or "--counters" in args
        tables = self.nets[(variant, family)]
        if only is not None:
            # naming a legacy table creates it; iptables-nft prints an absent one's built-ins
            tab = self._table(variant, family, only, create=variant == "legacy")
            names, shown = [only], {only: tab or Table.new(only)}
        elif variant == "legacy":
            names, shown = list(reversed(tables)), tables
        else:
            names, shown = [t for t in NFT_SAVE_ORDER if t in tables], tables
        base = "ip6tables" if family == 6 else "iptables"
        tool = f"{base}-nft-save {VERSION} (nf_tables)" if variant == "nft" else f"{base}-save {VERSION}"
        out = []
        for name in names:
            tab = shown[name]
            out += [f"# Generated by {tool} on {SAVE_DATE}", f"*{name}"]
            order = tab.ordered(variant)
            out += [f":{c} {tab.policies[c]} [0:0]" if c in tab.policies else f":{c} - [0:0]" for c in order]
            out += [(f"[{r.packets}:{r.bytes}] " if counters else "") + f"-A {c} {r.spec}"
                    for c in order for r in tab.chains[c]]
            out += ["COMMIT", f"# Completed on {SAVE_DATE}"]
        return 0, "".join(f"{ln}\n" for ln in out), self._warning(variant, family, "-save")

    def _restore(self, variant: str, family: int, tool: str, args: list[str], text: str):
        noflush = "--noflush" in args or "-n" in args
        test = "--test" in args or "-t" in args
        tables = self.nets[(variant, family)]
        block: Table | None = None
        lineno = 0
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                if block is None:
                    if not line.startswith("*"):
                        raise Refused(f"Bad argument `{line.split()[0]}'", 2)
                    name = line[1:].strip()
                    old = self._table(variant, family, name, create=False)
                    block = copy.deepcopy(old) if old is not None and noflush else Table.new(name)
                elif line == "COMMIT":
                    if not test:
                        tables[block.name] = block
                    block = None
                elif line.startswith(":"):
                    parts = line[1:].split()
                    if parts[0] in block.policies:
                        if len(parts) > 1 and parts[1] != "-":
                            block.policies[parts[0]] = parts[1]
                    else:
                        block.chains[parts[0]] = []  # declared: created, or flushed
                elif line.startswith("-") or line.startswith("["):
                    tokens = shlex.split(re.sub(r"^\[\d+:\d+\]\s*", "", line))
                    self._op(block, variant, family, tokens)
                else:
                    raise Refused(f"Bad argument `{line.split()[0]}'", 2)
            except ValueError as exc:  # shlex: an unbalanced quote
                return 2, "", f"{tool} {VERSION}: {exc}\nError occurred at line: {lineno}\n"
            except Refused as exc:
                if exc.rc == 2:
                    return 2, "", f"{tool} {VERSION}: {exc}\nError occurred at line: {lineno}\n"
                return exc.rc, "", f"{tool}: line {lineno} failed: {exc}\n"
        if block is not None:
            return 1, "", f"{tool}: COMMIT expected at line {lineno + 1}\n"
        return 0, "", ""

    def _op(self, tab: Table, variant: str, family: int, tokens: list[str]) -> None:
        """One rule command on a table being built (the caller commits it)."""
        cmd, rest = tokens[0], tokens[1:]
        chain = rest[0] if rest else None
        if cmd in ("-A", "-I", "-D", "-R", "-F", "-X", "-P", "-E") and chain is not None and chain not in tab.chains:
            raise Refused("No chain/target/match by that name.", 1)
        if cmd == "-N":
            if chain in tab.chains:
                raise Refused("Chain already exists.", 1)
            tab.chains[chain] = []
        elif cmd == "-X":
            for name in [chain] if chain else [c for c in tab.chains if c not in tab.policies]:
                if name in tab.policies:
                    raise Refused("Invalid argument: cannot delete a built-in chain", 1)
                if tab.chains[name] or tab.referenced(name):
                    raise Refused(f"CHAIN_DEL failed (Device or resource busy): chain {name}", 1)
                del tab.chains[name]
        elif cmd == "-F":
            for name in [chain] if chain else list(tab.chains):
                tab.chains[name] = []
        elif cmd == "-P":
            if chain not in tab.policies or len(rest) < 2:
                raise Refused("Bad built-in chain name", 1)
            tab.policies[chain] = rest[1]
        elif cmd in ("-A", "-I", "-D", "-R"):
            rules = tab.chains[chain]
            spec = rest[1:]
            index = None
            if cmd in ("-I", "-R", "-D") and spec and spec[0].isdigit():
                index, spec = int(spec[0]) - 1, spec[1:]
            if cmd == "-D":
                if index is None:
                    want = self._canonical(tab, family, spec)
                    index = next((i for i, r in enumerate(rules) if r.spec == want), None)
                if index is None or not 0 <= index < len(rules):
                    raise Refused("Bad rule (does a matching rule exist in that chain?).", 1)
                del rules[index]
                return
            rule = Rule(self._canonical(tab, family, spec))
            if cmd == "-A":
                rules.append(rule)
            elif cmd == "-I":
                rules.insert(index or 0, rule)
            else:
                if index is None or not 0 <= index < len(rules):
                    raise Refused("Index of replacement too big.", 1)
                rules[index] = rule
        else:
            raise Refused(f"unknown command {cmd}", 2)

    def _canonical(self, tab: Table, family: int, spec: list[str]) -> str:
        """A rule spec as -S prints it back, or Refused where the real tool refuses it."""
        out: list[str] = []
        i = 0
        while i < len(spec):
            tok = spec[i]
            nxt = spec[i + 1] if i + 1 < len(spec) else None
            if tok in ("-s", "--source", "-d", "--destination") and nxt is not None:
                try:
                    net = ipaddress.ip_network(nxt, strict=False)
                except ValueError:
                    raise Refused(f"host/network `{nxt}' not found", 2) from None
                if net.version != family:
                    raise Refused(f"host/network `{nxt}' not found", 2)
                out += [{"--source": "-s", "--destination": "-d"}.get(tok, tok), str(net)]
                i += 2
                continue
            if tok in ("-p", "--protocol") and nxt in ("tcp", "udp", "sctp", "dccp"):
                out += ["-p", nxt]
                if i + 2 < len(spec) and spec[i + 2] in ("--dport", "--sport", "--destination-port",
                                                         "--source-port", "--tcp-flags", "--syn"):
                    out += ["-m", nxt]
                i += 2
                continue
            if tok == "--match-set" and nxt is not None:
                s = self.sets.get(nxt)
                if s is None:
                    raise Refused(f"Set {nxt} doesn't exist.", 2)
                if s.family != ("inet" if family == 4 else "inet6"):
                    raise Refused(f"The protocol family of set {nxt} is {s.family}, which is not applicable.", 2)
            if tok in ("-j", "--jump", "-g", "--goto") and nxt is not None:
                if nxt not in TARGETS and nxt not in tab.chains:
                    raise Refused(f"Couldn't load target `{nxt}':No such file or directory", 2)
                if nxt in NAT_ONLY and tab.name != "nat":
                    raise Refused(f"x_tables: ip_tables: {nxt} target: only valid in nat table", 1)
                out += ["-j" if tok in ("-j", "--jump") else "-g", nxt]
                i += 2
                continue
            out.append(tok)
            i += 1
        return " ".join(_quote(t) for t in out)

    # ------------------------------------------------------------ ipset

    def _next_initval(self) -> int:
        self._initval = (self._initval * 1103515245 + 12345) % 2**32
        return self._initval

    def _ipset(self, argv: list[str], input: str | None):
        args = list(argv[1:])
        exist = "-exist" in args or "-!" in args
        args = [a for a in args if a not in ("-exist", "-!", "-q", "-quiet")]
        flags = {a for a in args if a in ("-t", "-terse", "-n", "-name")}
        args = [a for a in args if a not in flags]
        if not args or args[0] in ("version", "-v", "--version", "-V"):
            return 0, f"ipset {IPSET_VERSION}, protocol version: 7\n", ""
        try:
            cmd = args[0]
            if cmd == "restore":
                return self._set_restore(input or "", exist)
            if cmd == "list":
                return 0, self._set_list(args[1:], terse=bool(flags & {"-t", "-terse"}),
                                         names_only=bool(flags & {"-n", "-name"})), ""
            if cmd == "save":
                return 0, self._set_save(args[1:]), ""
            if cmd not in SET_COMMANDS:
                raise Refused(f"No command specified: unknown argument {cmd}", 2)
            return self._set_command(args, exist)
        except Refused as exc:
            return exc.rc, "", f"ipset {IPSET_VERSION}: {exc}\n"

    def _named(self, name: str) -> IpSet:
        if name not in self.sets:
            raise Refused("The set with the given name does not exist", 1)
        return self.sets[name]

    def _set_list(self, names: list[str], terse: bool, names_only: bool) -> str:
        chosen = [self._named(n) for n in names] if names else list(self.sets.values())
        if names_only:
            return "".join(f"{s.name}\n" for s in chosen)
        blocks = []
        for s in chosen:
            text = (f"Name: {s.name}\nType: {s.kind}\nRevision: 7\nHeader: {s.header()}\n"
                    f"Size in memory: {s.memory()}\nReferences: {self.references(s.name)}\n"
                    f"Number of entries: {len(s.members)}\n")
            if not terse:
                text += "Members:\n" + "".join(f"{_show_member(m)}\n" for m in s.members)
            blocks.append(text)
        return "\n".join(blocks)

    def _set_save(self, names: list[str]) -> str:
        chosen = [self._named(n) for n in names] if names else list(self.sets.values())
        return "".join(f"create {s.name} {s.kind} {s.header()}\n"
                       + "".join(f"add {s.name} {_show_member(m)}\n" for m in s.members) for s in chosen)

    def _set_restore(self, text: str, exist: bool):
        lines = [(n, ln.split()) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()
                 and not ln.lstrip().startswith("#")]
        for _n, words in lines:  # an unknown command fails the whole input before any line runs
            if words[0] not in SET_WRITES - {"restore"}:
                return 2, "", (f"ipset {IPSET_VERSION}: No command specified: unknown argument {words[0]}\n"
                               "Try `ipset help' for more information.\n")
        for n, words in lines:
            try:
                self._set_command(words, exist or "-exist" in words)
            except Refused as exc:
                return exc.rc, "", f"ipset {IPSET_VERSION}: Error in line {n}: {exc}\n"
        return 0, "", ""

    def _set_command(self, words: list[str], exist: bool):
        words = [w for w in words if w not in ("-exist", "-!")]
        cmd, rest = words[0], words[1:]
        if cmd == "create":
            name, kind = rest[0], rest[1]
            opts = dict(zip(rest[2::2], rest[3::2]))
            new = IpSet(name, kind, opts.get("family", "inet"), int(opts.get("hashsize", 1024)),
                        int(opts.get("maxelem", 65536)), self._next_initval())
            old = self.sets.get(name)
            if old is not None:
                same = (old.kind, old.family, old.hashsize, old.maxelem) == (new.kind, new.family, new.hashsize,
                                                                             new.maxelem)
                if not (exist and same):
                    raise Refused("Set cannot be created: set with the same name already exists", 1)
                return 0, "", ""
            self.sets[name] = new
        elif cmd in ("add", "del", "test"):
            s = self._named(rest[0])
            net = self._parse_member(s, rest[1])
            if cmd == "test":
                held = net in s.members
                return (0, "", "") if held else (1, "", f"{rest[1]} is NOT in set {s.name}.\n")
            if cmd == "add":
                if net in s.members:
                    if not exist:
                        raise Refused("Element cannot be added to the set: it's already added", 1)
                elif len(s.members) >= s.maxelem:
                    raise Refused("Hash is full, cannot add more elements", 1)
                else:
                    s.members.append(net)
            elif net in s.members:
                s.members.remove(net)
            elif not exist:
                raise Refused("Element cannot be deleted from the set: it's not added", 1)
        elif cmd == "destroy":
            for s in [self._named(n) for n in rest] or list(self.sets.values()):
                if self.references(s.name):
                    raise Refused("Set cannot be destroyed: it is in use by a kernel component", 1)
                del self.sets[s.name]
        elif cmd == "flush":
            for s in [self._named(n) for n in rest] or list(self.sets.values()):
                s.members = []
        elif cmd == "swap":
            a, b = self._named(rest[0]), self._named(rest[1])
            if (a.kind, a.family) != (b.kind, b.family):
                raise Refused("The sets cannot be swapped: their type does not match", 1)
            # rules match a set by its index in the kernel: the names trade places, so a
            # rule naming `a` matches what was `b`'s
            self.sets[a.name], self.sets[b.name] = b, a
            a.name, b.name = b.name, a.name
        return 0, "", ""

    def _parse_member(self, s: IpSet, text: str):
        want = 4 if s.family == "inet" else 6
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            net = None
        if net is None or net.version != want:
            raise Refused(f"Syntax error: cannot parse {text}: resolving to IPv{want} address failed", 1)
        if s.kind == "hash:net" and net.prefixlen == 0:
            raise Refused(f"Syntax error: '0' is out of range 1-{net.max_prefixlen}", 1)
        return net
