"""The iptables backends' exempt ipsets: two per family, and a record of what they hold.

Per family two `hash:net` sets, `ipmasq4-a` and `ipmasq4-b` (`ipmasq6-...`); our chain's
rule matches one (backends/iptables.py). A change of the exempt list:

1. the idle set (no rule references it: the kernel's own reference count, `References`
   in `ipset list -t`, says so) gets only the difference, `del` and `add` lines in one
   `ipset restore`;
2. one `iptables-restore` transaction points the rule at it;
3. the other set, idle now, gets the same difference.

`ipset restore` is no transaction: each line is its own netlink request, so a kill in
step 1 or 3 leaves a set half-patched. That set is referenced by no rule, so no packet
is matched against it; the record below has forgotten it before the first line is
written, and the next apply reads it back (`ipset save`) and patches it from there. A set
some rule references is never written.

The record (state dir): the list both sets hold, and per set the header `ipset list -t`
prints (type, revision, family, hashsize, maxelem, initval), its size in memory and its
number of entries, taken after our last write. There is no generation counter and no
checksum of a hash:net set's members, so the record is trusted while each set's header
is what it was: a listing of headers costs milliseconds, `ipset save` of 100,000 members
70 ms and parsing them more. What that misses: an edit that leaves the header, the size
in memory and the count as they were, such as `ipset del` of one member and `ipset add`
of another of the same size (measured: neither the size nor anything else in the header
moves). apply trusts the record; reconcile's full check, `status --deep` and watch's
resync read the members (live() is always deep), and reconcile's quick path, which
trusts a fingerprint made of the same headers, goes the full way every
agent.DEEP_EVERY runs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .. import __version__, ruledata, state
from .base import run

RECORD = "ipsets.json"
_SHAPES = ruledata.load("iptables")
SLOTS = {family: tuple(_SHAPES["set_name"].format(family=family, slot=s) for s in _SHAPES["set_slots"])
         for family in (4, 6)}
# Ours besides the slots: sets named by a digest of their content (earlier versions', and
# their swap temporaries; apply's when no slot is free). Anything else, `ipmasq4-foo`
# included, is someone else's and never touched.
_EARLIER = {family: re.compile(re.escape(_SHAPES["set_content_name"].format(family=family, digest="@"))
                               .replace("@", "[0-9a-f]{12}") + "(?:-tmp)?") for family in (4, 6)}
_IPSET_FAMILY = {4: "inet", 6: "inet6"}


def ours(name: str, family: int) -> bool:
    return name in SLOTS[family] or bool(_EARLIER[family].fullmatch(name))


def other_slot(name: str | None, family: int) -> str:
    a, b = SLOTS[family]
    return b if name == a else a


@dataclass(frozen=True)
class Head:
    """One set as `ipset list -t` prints it."""

    kind: str  # hash:net
    revision: str
    header: str  # family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x...
    memory: int
    references: int
    entries: int

    def identity(self) -> list:
        """What the record is checked against: all but the references (a rule that starts
        or stops matching the set changes no member)."""
        return [self.kind, self.revision, self.header, self.memory, self.entries]

    def option(self, name: str) -> str | None:
        m = re.search(rf"(?:^| ){name} (\S+)", self.header)
        return m.group(1) if m else None

    def fits(self, family: int, count: int) -> bool:
        """A hash:net set of the family with room for `count` members (a patch cannot
        change a set's type, family or maxelem: one that does not fit is made anew)."""
        maxelem = self.option("maxelem")
        return (self.kind == "hash:net" and self.option("family") == _IPSET_FAMILY[family]
                and maxelem is not None and maxelem.isdigit() and int(maxelem) >= count)


_FIELDS = {"Type": "kind", "Revision": "revision", "Header": "header", "Size in memory": "memory",
           "References": "references", "Number of entries": "entries"}


def heads() -> dict[str, Head]:
    """Every set's header, one `ipset list -t` (members are not listed)."""
    out: dict[str, Head] = {}
    name: str | None = None
    values: dict[str, str] = {}
    for line in run(["ipset", "list", "-t"], check=False).stdout.splitlines() + ["Name: "]:
        key, _, value = line.partition(": ")
        if key == "Name":
            if name:
                out[name] = _head(values)
            name, values = value.strip(), {}
        elif key in _FIELDS:
            values[_FIELDS[key]] = value.strip()
    return out


def _head(values: dict) -> Head:
    def number(key: str) -> int:
        text = values.get(key, "")
        return int(text) if text.isdigit() else -1

    return Head(values.get("kind", ""), values.get("revision", ""), values.get("header", ""),
                number("memory"), number("references"), number("entries"))


def read_members(name: str, family: int) -> tuple[str, ...] | None:
    """The members of set `name` (`ipset save`), as prefixes; None when it is not there."""
    saved = run(["ipset", "save", name], check=False)
    if saved.returncode != 0:
        return None
    host = "/32" if family == 4 else "/128"  # ipset prints a single address without it
    members = [ln.split()[2] for ln in saved.stdout.splitlines() if ln.startswith("add ")]
    return tuple(m if "/" in m else m + host for m in members)


_DIFFS: dict[tuple[int, int], tuple] = {}


def difference(have, want) -> tuple[list[str], list[str]]:
    """(to add, to delete) to make a set holding `have` hold `want`. Compared as text;
    what differs is also compared as networks, in case ipset spells a prefix differently
    from Python (only the difference is parsed). An apply asks this of the same lists
    several times (drift, then the patches; both slots hold the record's one tuple):
    at 100,000 prefixes each answer costs tens of milliseconds, so the last few are kept."""
    key = (id(have), id(want))
    if key in _DIFFS:
        return _DIFFS[key][2]
    if len(_DIFFS) >= 4:
        _DIFFS.clear()
    result = _difference(have, want)
    _DIFFS[key] = (have, want, result)  # holding both: their ids stay theirs
    return result


def forget_differences() -> None:
    """At the end of an apply or a read: a watch agent keeps no 100,000-prefix lists alive."""
    _DIFFS.clear()


def _difference(have, want) -> tuple[list[str], list[str]]:
    held, wanted = set(have), set(want)
    add = [p for p in want if p not in held]
    delete = [p for p in have if p not in wanted]
    if add and delete:
        added = {ipaddress.ip_network(p): p for p in add}
        deleted = {ipaddress.ip_network(p): p for p in delete}
        same = added.keys() & deleted.keys()
        add = [p for n, p in added.items() if n not in same]
        delete = [p for n, p in deleted.items() if n not in same]
    return add, delete


def render_patch(name: str, add, delete) -> str:
    """`ipset restore -exist` input: deletions first (they make room under maxelem)."""
    return "".join(f"del {name} {p}\n" for p in delete) + "".join(f"add {name} {p}\n" for p in add)


# ---------------------------------------------------------------- the record


def _members_file(family: int) -> str:
    return f"ipsets-exempt{family}.txt"


class Record:
    """What apply last wrote into the slots: per family the list, and the slots holding
    it with the header each had after the write."""

    def __init__(self) -> None:
        data = state.read_json(RECORD)
        valid = data.get("netns") == state.netns_id() and data.get("version") == __version__
        self.families: dict[str, dict] = data.get("families", {}) if valid else {}
        self._lists: dict[int, tuple[str, ...] | None] = {}

    def members(self, family: int, name: str, head: Head | None) -> tuple[str, ...] | None:
        """What slot `name` holds by the record, if its header is still the recorded one."""
        fam = self.families.get(str(family), {})
        if head is None or fam.get("slots", {}).get(name) != head.identity():
            return None
        if family not in self._lists:
            self._lists[family] = state.read_list(_members_file(family), fam.get("digest"))
        return self._lists[family]

    def forget(self, family: int, name: str) -> None:
        """Before a write into `name`: the record stops vouching for it (a kill halfway
        leaves it half-written, possibly with its count and size unchanged)."""
        fam = self.families.get(str(family), {})
        if name in fam.get("slots", {}):
            del fam["slots"][name]
            self._save()

    def keep(self, family: int, members: Sequence[str] | None, slots: dict[str, Head]) -> None:
        """After apply: `slots` (name -> header now) hold `members`; None: nothing recorded."""
        before = self.families.get(str(family))
        if members is None or not slots:
            self.families.pop(str(family), None)
        else:
            digest = (before or {}).get("digest")
            if digest is None or self._lists.get(family) != tuple(members):
                digest = state.write_list(_members_file(family), members)
                self._lists[family] = tuple(members)
            self.families[str(family)] = {"digest": digest,
                                          "slots": {name: h.identity() for name, h in sorted(slots.items())}}
        if self.families.get(str(family)) != before:
            self._save()

    def _save(self) -> None:
        if self.families:
            state.write_json(RECORD, {"netns": state.netns_id(), "version": __version__, "families": self.families})
        else:
            clear()


def clear() -> None:
    state.remove(RECORD)
    for family in (4, 6):
        state.remove(_members_file(family))
