"""The model behind FakeNft (tests/fakes/nft.py): nf_tables tables, chains, rules, sets
and their elements; nft scripts parsed and applied to a copy (all-or-nothing); tables
printed as `nft list table` prints them (nft 1.0.6, compared in a private namespace).

What it does not model: nft's full rule grammar. A rule is kept as text (our rules are
rendered as nft prints them: rules/nftables.yaml); its words must come from a vocabulary
(_WORDS) or be values (addresses, numbers, strings, @set, a jump's chain), the sets and
chains it names must exist and an address set must have the family the rule looks up.
"""

from __future__ import annotations

import bisect
import errno
import ipaddress
import os
import re
from dataclasses import dataclass, field

from ipmasq_legacy.backends.nftrender import _ntop

FAMILIES = ("ip", "ip6", "inet")
BY_NUMBER = {4: "ip", 6: "ip6"}
HOOKS = ("prerouting", "input", "forward", "output", "postrouting")
CHAIN_TYPES = {"filter": HOOKS, "nat": ("prerouting", "input", "output", "postrouting"), "route": ("output",)}
PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
PRIORITY_HOOK = {"dstnat": "prerouting", "srcnat": "postrouting"}  # the others fit every hook
ADDRESS_TYPES = {"ipv4_addr": 4, "ipv6_addr": 6}
PER_LINE = {"ipv4_addr": 2, "inet_service": 5, "mark": 5, "inet_proto": 5}  # nft's calculate_delim
NEWLINE = ",\n\t\t\t     "
_WORDS = set("""
    iif iifname oif oifname iiftype oiftype fib saddr daddr type local unicast multicast broadcast
    ct mark state status direction zone new established related invalid untracked set ip ip6 inet
    meta l4proto nfproto protocol nexthdr random counter packets bytes masquerade snat dnat redirect
    to fully-random persistent return accept drop reject jump goto continue tcp udp sctp icmp icmpv6
    th dport sport flags log prefix level comment xt target match notrack limit rate over second
    minute length ttl hoplimit dscp version vmap map pkttype priority with and or oif
""".split())
_OPS = {"==", "!=", "<", ">", "<=", ">=", "&", "|", "^", "<<", ">>", ":"}
_VALUE = re.compile(r"-?\d+|0x[0-9a-fA-F]+|:\d+(?:-\d+)?|\d+-\d+|\[[0-9a-fA-F:.]+\](?::\d+(?:-\d+)?)?")
_COUNTER = re.compile(r"\bcounter(?: packets (\d+) bytes (\d+))?")
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|\n|[{};,]|[^\s{};,"#]+|"')


class Fail(Exception):
    """A script refused: nft's message, the line and the word it points at."""

    def __init__(self, message: str, line: int = 1, word: str | None = None):
        super().__init__(message)
        self.message, self.line, self.word = message, line, word


def _kernel(code: int) -> str:
    return f"Could not process rule: {os.strerror(code)}"


# ---------------------------------------------------------------- the model


@dataclass
class Rule:
    text: str  # as nft prints it, `counter` without its numbers
    handle: int
    packets: int = 0
    bytes: int = 0
    sets: tuple[str, ...] = ()  # what it refers to: deleting those is EBUSY
    chains: tuple[str, ...] = ()

    def printed(self) -> str:
        return _COUNTER.sub(f"counter packets {self.packets} bytes {self.bytes}", self.text, count=1)


@dataclass
class Chain:
    name: str
    handle: int
    base: tuple[str, str, int] | None = None  # (type, hook, priority); None: a regular chain
    policy: str = "accept"
    rules: list[Rule] = field(default_factory=list)

    def header(self, family: str) -> str | None:
        if self.base is None:
            return None
        kind, hook, prio = self.base
        return f"type {kind} hook {hook} priority {_priority_text(prio, hook)}; policy {self.policy};"


@dataclass
class NSet:
    kind: str  # set or map
    name: str
    handle: int
    type: str
    flags: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()  # other declaration lines, as given (size, comment, ...)
    elements: list = field(default_factory=list)  # address sets: sorted (first, last); else texts

    @property
    def version(self) -> int | None:
        return ADDRESS_TYPES.get(self.type) if self.kind == "set" else None

    def declaration(self) -> tuple:
        return self.kind, self.type, self.flags, self.extra


@dataclass
class Table:
    family: str
    name: str
    handle: int
    flags: tuple[str, ...] = ()
    objects: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # counter/quota: body lines
    sets: dict[str, NSet] = field(default_factory=dict)
    chains: dict[str, Chain] = field(default_factory=dict)
    next_handle: int = 1

    def handle_next(self) -> int:
        self.next_handle += 1
        return self.next_handle - 1


def _priority(words: list[str], hook: str, line: int) -> int:
    text = " ".join(words)
    m = re.fullmatch(r"(-?\d+)|([a-z]+)(?: ([+-]) (\d+))?", text)
    if not m:
        raise Fail(f"syntax error, unexpected {words[0] if words else 'newline'}", line)
    if m.group(1):
        return int(m.group(1))
    name = m.group(2)
    if name not in PRIORITIES or PRIORITY_HOOK.get(name, hook) != hook:
        raise Fail(f"'{name}' is invalid priority in this context.", line, name)
    offset = int(m.group(4) or 0) * (-1 if m.group(3) == "-" else 1)
    return PRIORITIES[name] + offset


def _priority_text(prio: int, hook: str) -> str:
    """nft's prio2str: the standard name within 10 of it, where the hook allows it."""
    for name, value in PRIORITIES.items():
        if abs(prio - value) <= 10:
            if PRIORITY_HOOK.get(name, hook) != hook:
                break
            offset = prio - value
            return name + (f" + {offset}" if offset > 0 else f" - {-offset}" if offset < 0 else "")
    return str(prio)


def _interval(text: str, nset: NSet, line: int) -> tuple[int, int]:
    """An address set's element (address, prefix or range) as (first, last)."""
    net = ipaddress.IPv4Network if nset.version == 4 else ipaddress.IPv6Network
    try:
        if "-" in text:
            first, last = (int(net(part).network_address) for part in text.split("-", 1))
            if first > last:
                raise ValueError
            span = (first, last)
        else:
            n = net(text)
            span = (int(n.network_address), int(n.broadcast_address))
            if n.prefixlen == n.max_prefixlen:
                return span
    except ValueError:
        raise Fail(f"Could not resolve hostname: {text}", line, text) from None
    if "interval" not in nset.flags:
        raise Fail("Set member cannot be prefix, missing interval flag on declaration", line, text)
    return span


def _span_text(span: tuple[int, int], version: int) -> str:
    first, last = span
    addr = ipaddress.ip_address(first) if version == 4 else ipaddress.IPv6Address(first)
    size = last - first + 1
    bits = 32 if version == 4 else 128
    if size & (size - 1) == 0 and first % size == 0:
        length = bits - size.bit_length() + 1
        return _ntop(addr) + ("" if length == bits else f"/{length}")
    end = ipaddress.ip_address(last) if version == 4 else ipaddress.IPv6Address(last)
    return f"{_ntop(addr)}-{_ntop(end)}"


def _add_span(nset: NSet, span: tuple[int, int], line: int, text: str) -> bool:
    """Insert one interval; False when it is there already; Fail when it overlaps one."""
    spans = nset.elements
    i = bisect.bisect_left(spans, span)
    if i < len(spans) and spans[i] == span:
        return False
    if (i > 0 and spans[i - 1][1] >= span[0]) or (i < len(spans) and spans[i][0] <= span[1]):
        raise Fail("conflicting intervals specified", line, text)
    spans.insert(i, span)
    return True


# ---------------------------------------------------------------- reading scripts


@dataclass
class Stmt:
    words: list  # str, or a list of Stmt for a { block }
    line: int

    def flat(self) -> list[str]:
        out: list[str] = []
        for w in self.words:
            out += [x for s in w for x in s.flat()] if isinstance(w, list) else [w]
        return out


def _parse(text: str) -> list[Stmt]:
    top: list[Stmt] = []
    stack: list[tuple[list[Stmt], Stmt | None]] = [(top, None)]
    cur: Stmt | None = None
    line = 1
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if tok == "\n":
            line, cur = line + 1, None
        elif tok.startswith("#"):
            continue
        elif tok == '"':
            raise Fail("syntax error, unterminated string", line, tok)
        elif tok == ";":
            cur = None
        elif tok == "{":
            if cur is None:
                raise Fail("syntax error, unexpected '{'", line, tok)
            block: list[Stmt] = []
            cur.words.append(block)
            stack.append((block, cur))
            cur = None
        elif tok == "}":
            if len(stack) == 1:
                raise Fail("syntax error, unexpected '}'", line, tok)
            cur = stack.pop()[1]
        else:
            if cur is None:
                cur = Stmt([], line)
                stack[-1][0].append(cur)
            cur.words.append(tok)
    if len(stack) > 1:
        raise Fail("syntax error, unexpected end of file", line)
    return top


def _text(words: list) -> str:
    out: list[str] = []
    for w in words:
        if isinstance(w, list):
            out.append("{ " + _text([x for s in w for x in s.words]) + " }")
        elif w == "," and out:
            out[-1] += ","
        else:
            out.append(w)
    return " ".join(out)


def _items(block: list[Stmt]) -> list[str]:
    """The comma-separated items of an element block, each a text."""
    return [item for item in _text([x for s in block for x in s.words]).split(", ") if item]


def _is_value(word: str) -> bool:
    if word.startswith('"') or _VALUE.fullmatch(word):
        return True
    address = word.rsplit(":", 1)[0] if word.count(":") == 1 else word  # 192.0.2.1:1024-2047
    try:
        if "-" in address and "/" not in address:
            for part in address.split("-", 1):
                ipaddress.ip_address(part)
        else:
            ipaddress.ip_network(address, strict=True)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- applying them


class _Txn:
    """One script applied to a copy of the tables; `dirty`: the kernel would commit."""

    def __init__(self, tables: dict, table_handle: int, handles: bool):
        self.tables, self.table_handle, self.handles = tables, table_handle, handles
        self.dirty = False
        self.out: list[str] = []

    def table(self, family: str, name: str, line: int, cache: bool = True) -> Table:
        if family not in FAMILIES:
            raise Fail(f"syntax error, unexpected {family}", line, family)
        t = self.tables.get((family, name))
        if t is None:
            raise Fail("No such file or directory" if cache else _kernel(errno.ENOENT), line, name)
        return t

    def run(self, st: Stmt) -> None:
        w = st.words
        if w and w[0] in ("table", "chain", "set", "map", "counter", "quota"):
            w = ["add", *w]
        if len(w) < 2 or w[0] not in ("add", "create", "insert", "replace", "delete", "flush", "list"):
            raise Fail(f"syntax error, unexpected {w[0] if w else 'newline'}", st.line, w[0] if w else None)
        verb, kind, rest = w[0], w[1], w[2:]
        if kind in ("ruleset", "tables") and verb in ("list", "flush") and not rest:
            if verb == "flush":
                self.dirty |= bool(self.tables)
                self.tables.clear()
            elif kind == "ruleset":
                self.out += [table_text(t, handles=self.handles) for t in self.tables.values()]
            else:
                self.out += [f"table {t.family} {t.name}\n" for t in self.tables.values()]
            return
        if len(rest) < 2 or not all(isinstance(x, str) for x in rest[:2]):
            raise Fail("syntax error, unexpected newline", st.line)
        family, name = rest[0], rest[1]
        if kind == "table":
            return self.table_cmd(verb, family, name, rest[2:], st.line)
        t = self.table(family, name, st.line, cache=verb not in ("delete", "flush"))
        if len(rest) < 3 or not isinstance(rest[2], str):
            raise Fail("syntax error, unexpected newline", st.line)
        obj, tail = rest[2], rest[3:]
        handler = {"chain": self.chain_cmd, "rule": self.rule_cmd, "set": self.set_cmd, "map": self.set_cmd,
                   "element": self.element_cmd, "counter": self.object_cmd, "quota": self.object_cmd}.get(kind)
        if handler is None:
            raise Fail(f"syntax error, unexpected {kind}", st.line, kind)
        handler(verb, kind, t, obj, tail, st.line)

    def table_cmd(self, verb: str, family: str, name: str, tail: list, line: int) -> None:
        key = (family, name)
        if verb in ("add", "create"):
            if family not in FAMILIES:
                raise Fail(f"syntax error, unexpected {family}", line, family)
            if key in self.tables and verb == "create":
                raise Fail(_kernel(errno.EEXIST), line, name)
            if key not in self.tables:
                self.tables[key] = Table(family, name, self.table_handle)
                self.table_handle += 1
                self.dirty = True
            if tail:
                self.table_block(self.tables[key], tail[0] if isinstance(tail[0], list) else [], line)
        elif verb == "delete":
            self.table(family, name, line, cache=False)
            del self.tables[key]
            self.dirty = True
        elif verb == "flush":
            t = self.table(family, name, line, cache=False)
            for chain in t.chains.values():
                self.dirty |= bool(chain.rules)
                chain.rules.clear()
        elif verb == "list":
            self.out.append(table_text(self.table(family, name, line), handles=self.handles))
        else:
            raise Fail(f"syntax error, unexpected {verb}", line, verb)

    def table_block(self, t: Table, block: list[Stmt], line: int) -> None:
        """nft's order (handles tell): the table's attributes and chains, then its sets
        and objects, then the rules."""
        later = []
        for st in sorted(block, key=lambda st: st.words[0] != "chain"):
            w = st.words
            if w[0] == "flags" and len(w) > 1:
                flags = tuple(x for x in w[1:] if x != ",")
                self.dirty |= flags != t.flags
                t.flags = flags
            elif w[0] in ("counter", "quota", "set", "map") and len(w) >= 2:
                getattr(self, "set_cmd" if w[0] in ("set", "map") else "object_cmd")(
                    "add", w[0], t, w[1], w[2:], st.line)
            elif w[0] == "chain" and len(w) >= 2:
                self.chain_cmd("add", "chain", t, w[1], [], st.line, header_of=w[2:])
                later.append((w[1], w[2:]))
            else:
                raise Fail(f"syntax error, unexpected {w[0]}", st.line, w[0])
        for name, tail in later:
            for st in (tail[0] if tail and isinstance(tail[0], list) else []):
                if st.words[0] not in ("type", "policy", "comment"):
                    self.add_rule(t, t.chains[name], st.words, st.line)

    def chain_cmd(self, verb: str, kind: str, t: Table, name: str, tail: list, line: int,
                  header_of: list | None = None) -> None:
        chain = t.chains.get(name)
        if verb in ("add", "create"):
            body = (header_of if header_of is not None else tail)
            block = body[0] if body and isinstance(body[0], list) else []
            spec = [st for st in block if st.words[0] in ("type", "policy")]
            base, policy = None, None
            for st in spec:
                w = st.words
                if w[0] == "policy":
                    if len(w) != 2 or w[1] not in ("accept", "drop"):
                        raise Fail("syntax error, unexpected policy", st.line, "policy")
                    policy = w[1]
                elif len(w) < 6 or w[2] != "hook" or w[4] != "priority":
                    raise Fail("syntax error, unexpected newline", st.line)
                elif w[1] not in CHAIN_TYPES or w[3] not in CHAIN_TYPES[w[1]]:
                    raise Fail(f"Chain of type \"{w[1]}\" is not supported for this hook", st.line, w[1])
                else:
                    base = (w[1], w[3], _priority(w[5:], w[3], st.line))
            if chain is None:
                t.chains[name] = Chain(name, t.handle_next(), base, policy or "accept")
                self.dirty = True
            elif verb == "create":
                raise Fail(_kernel(errno.EEXIST), line, name)
            elif base is not None:
                if chain.base is None or chain.base[0] != base[0]:
                    raise Fail(_kernel(errno.EEXIST), line, name)
                if chain.base != base:
                    raise Fail(_kernel(errno.EOPNOTSUPP), line)
                if policy and policy != chain.policy:
                    chain.policy, self.dirty = policy, True
            if header_of is None:
                for st in block:
                    if st.words[0] not in ("type", "policy", "comment"):
                        self.add_rule(t, t.chains[name], st.words, st.line)
            return
        if chain is None:
            raise Fail("No such file or directory" if verb == "list" else _kernel(errno.ENOENT), line, name)
        if verb == "delete":
            if any(name in r.chains for c in t.chains.values() for r in c.rules):
                raise Fail(_kernel(errno.EBUSY), line, name)
            del t.chains[name]
            self.dirty = True
        elif verb == "flush":
            self.dirty |= bool(chain.rules)
            chain.rules.clear()
        elif verb == "list":
            self.out.append(table_text(t, handles=self.handles, only=("chain", name)))
        else:
            raise Fail(f"syntax error, unexpected {verb}", line, verb)

    def rule_cmd(self, verb: str, kind: str, t: Table, chain_name: str, tail: list, line: int) -> None:
        chain = t.chains.get(chain_name)
        if chain is None:
            raise Fail("No such file or directory", line, chain_name)
        where = None
        if len(tail) >= 2 and tail[0] in ("handle", "position"):
            handles = [r.handle for r in chain.rules]
            if not tail[1].isdigit() or int(tail[1]) not in handles:
                raise Fail(_kernel(errno.ENOENT), line, tail[1])
            where, tail = handles.index(int(tail[1])), tail[2:]
        if verb == "delete":
            if where is None or tail:
                raise Fail("syntax error, unexpected newline", line)
            del chain.rules[where]
            self.dirty = True
        elif verb in ("add", "insert", "replace"):
            if verb == "replace" and where is None:
                raise Fail("syntax error, unexpected newline", line)
            at = len(chain.rules) if where is None and verb == "add" else (0 if where is None else where + (verb == "add"))
            self.add_rule(t, chain, tail, line, at)
            if verb == "replace":
                del chain.rules[at + 1]
        else:
            raise Fail(f"syntax error, unexpected {verb}", line, verb)

    def add_rule(self, t: Table, chain: Chain, words: list, line: int, at: int | None = None) -> None:
        text = _text(words)
        if not text:
            raise Fail("syntax error, unexpected newline", line)
        sets, chains = [], []
        flat = [x for w in words for x in (Stmt([w], line).flat() if isinstance(w, list) else [w])]
        for i, word in enumerate(flat):
            before = flat[i - 1] if i else ""
            if before in ("jump", "goto"):
                if word not in t.chains:
                    raise Fail("No such file or directory", line, word)
                chains.append(word)
            elif word.startswith("@"):
                nset = t.sets.get(word[1:])
                if nset is None:
                    raise Fail("No such file or directory", line, word)
                wanted = {"ip": "ipv4_addr", "ip6": "ipv6_addr"}.get(flat[i - 2] if i > 1 else "")
                if wanted and before in ("saddr", "daddr") and nset.type != wanted:
                    raise Fail(f"datatype mismatch, expected {wanted}, set has type {nset.type}", line, word)
                sets.append(word[1:])
            elif not (word in _WORDS or word in _OPS or word == "," or _is_value(word)):
                raise Fail(f"syntax error, unexpected {word}", line, word)
        m = _COUNTER.search(text)
        rule = Rule(_COUNTER.sub("counter", text, count=1), t.handle_next(), sets=tuple(sets), chains=tuple(chains))
        if m and m.group(1):
            rule.packets, rule.bytes = int(m.group(1)), int(m.group(2))
        chain.rules.insert(len(chain.rules) if at is None else at, rule)
        self.dirty = True

    def set_cmd(self, verb: str, kind: str, t: Table, name: str, tail: list, line: int) -> None:
        nset = t.sets.get(name)
        if verb in ("add", "create"):
            block = tail[0] if tail and isinstance(tail[0], list) else None
            if block is None:
                raise Fail("syntax error, unexpected newline", line)
            decl, elements = {"type": "", "flags": (), "extra": []}, []
            for st in block:
                w = st.words
                if w[0] == "type":
                    decl["type"] = _text(w[1:])
                elif w[0] == "flags":
                    decl["flags"] = tuple(x for x in w[1:] if x != ",")
                elif w[0] == "elements" and len(w) == 3 and w[1] == "=" and isinstance(w[2], list):
                    elements = _items(w[2])
                else:
                    decl["extra"].append(_text(w))
            if not decl["type"] or (kind == "map") != (" : " in decl["type"]):
                raise Fail("set definition does not specify key data type", line, name)
            fresh = NSet(kind, name, 0, decl["type"], decl["flags"], tuple(decl["extra"]))
            if nset is None:
                fresh.handle = t.handle_next()
                t.sets[name] = nset = fresh
                self.dirty = True
            elif verb == "create" or nset.declaration() != fresh.declaration():
                raise Fail(_kernel(errno.EEXIST), line, name)
            self.elements(nset, elements, True, line)
            return
        if nset is None:
            raise Fail("No such file or directory", line, name)
        if verb == "delete":
            if any(name in r.sets for c in t.chains.values() for r in c.rules):
                raise Fail(_kernel(errno.EBUSY), line, name)
            del t.sets[name]
            self.dirty = True
        elif verb == "flush":
            self.dirty |= bool(nset.elements)
            nset.elements.clear()
        elif verb == "list":
            self.out.append(table_text(t, handles=self.handles, only=("set", name)))
        else:
            raise Fail(f"syntax error, unexpected {verb}", line, verb)

    def element_cmd(self, verb: str, kind: str, t: Table, name: str, tail: list, line: int) -> None:
        nset = t.sets.get(name)
        if nset is None:
            raise Fail("No such file or directory", line, name)
        if len(tail) != 1 or not isinstance(tail[0], list) or verb not in ("add", "create", "delete"):
            raise Fail("syntax error, unexpected newline", line)
        self.elements(nset, _items(tail[0]), verb != "delete", line, strict=verb == "create")

    def elements(self, nset: NSet, items: list[str], add: bool, line: int, strict: bool = False) -> None:
        for item in items:
            if nset.version is not None:
                span = _interval(item, nset, line)
                if add:
                    changed = _add_span(nset, span, line, item)
                    if strict and not changed:
                        raise Fail(_kernel(errno.EEXIST), line, item)
                elif span in nset.elements:
                    nset.elements.remove(span)
                    changed = True
                else:
                    raise Fail("element does not exist", line, item)
            elif add:
                changed = item not in nset.elements
                nset.elements += [item] if changed else []
            elif item in nset.elements:
                nset.elements.remove(item)
                changed = True
            else:
                raise Fail("element does not exist", line, item)
            self.dirty |= changed

    def object_cmd(self, verb: str, kind: str, t: Table, name: str, tail: list, line: int) -> None:
        key = (kind, name)
        if verb in ("add", "create"):
            block = tail[0] if tail and isinstance(tail[0], list) else []
            body = [_text(st.words) for st in block] or (["packets 0 bytes 0"] if kind == "counter" else [])
            if key not in t.objects:
                t.objects[key] = body
                self.dirty = True
            elif verb == "create":
                raise Fail(_kernel(errno.EEXIST), line, name)
        elif key not in t.objects:
            raise Fail(_kernel(errno.ENOENT), line, name)
        elif verb == "delete":
            del t.objects[key]
            self.dirty = True
        else:
            raise Fail(f"syntax error, unexpected {verb}", line, verb)


# ---------------------------------------------------------------- printing


def _elements_text(nset: NSet, canonical: bool) -> str:
    if nset.version is not None:
        items = [_span_text(s, nset.version) for s in nset.elements]
    else:
        items = sorted(nset.elements) if canonical else list(nset.elements)
    per = PER_LINE.get(nset.type.split(" : ")[0], 1)
    out = ""
    for i, item in enumerate(items):
        out += ("" if i == 0 else ", " if i % per else NEWLINE) + item
    return "elements = { " + out + " }"


def table_text(t: Table, handles: bool = False, canonical: bool = False, only: tuple[str, str] | None = None) -> str:
    """One table as `nft list table` prints it; `canonical`: objects, sets and chains
    sorted by name (a chain made again prints where it did before); `only`: one set or
    chain of it (`nft list chain`)."""
    def mark(handle: int) -> str:
        return f" # handle {handle}" if handles else ""

    def order(items):
        return sorted(items, key=lambda kv: kv[0]) if canonical else list(items)

    blocks = []
    for (kind, name), body in order(t.objects.items()):
        blocks.append([f"\t{kind} {name} {{", *(f"\t\t{line}" for line in body), "\t}"])
    for name, nset in order(t.sets.items()):
        if only is not None and only != ("set", name):
            continue
        lines = [f"\t{nset.kind} {name} {{{mark(nset.handle)}", f"\t\ttype {nset.type}"]
        lines += [f"\t\tflags {','.join(nset.flags)}"] if nset.flags else []
        lines += [f"\t\t{x}" for x in nset.extra]
        lines += [f"\t\t{_elements_text(nset, canonical)}"] if nset.elements else []
        blocks.append(lines + ["\t}"])
    for name, chain in order(t.chains.items()):
        if only is not None and only != ("chain", name):
            continue
        header = chain.header(t.family)
        lines = [f"\tchain {name} {{{mark(chain.handle)}"] + ([f"\t\t{header}"] if header else [])
        blocks.append(lines + [f"\t\t{r.printed()}{mark(r.handle)}" for r in chain.rules] + ["\t}"])
    if only is not None:
        blocks = blocks[-1:]
    out = [f"table {t.family} {t.name} {{{mark(t.handle)}"]
    attributes = [f"\tflags {','.join(t.flags)}"] if t.flags and only is None else []
    for i, block in enumerate(([attributes] if attributes else []) + blocks):
        out += ([""] if i else []) + block
    return "\n".join(out + ["}"]) + "\n"
