"""nftables, pure: our table's shapes (rules/nftables.yaml), rendering a plan into nft
input, and parsing `nft list table` output back. No I/O; nftables.py drives it."""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass, field

from .. import netlink, prefixes, ruledata
from ..errors import ConfigError
from ..plan import FamilyPlan, MasqueradeRule, masquerade_rules
from .base import FamilyLive, RuleCounter

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


_NETWORK: dict[int, type[ipaddress.IPv4Network] | type[ipaddress.IPv6Network]] = {4: ipaddress.IPv4Network, 6: ipaddress.IPv6Network}


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
