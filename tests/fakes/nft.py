"""FakeNft: nf_tables as a model (knftables' fake.go is the pattern), behind every
question NftablesBackend asks the kernel (ipmasq_legacy/kernel.py): `nft [-c] [-a] -f -`,
libnftables (`library=True`), the probe, the netlink set patch, the rule dump with its
counters and the ruleset generation.

The model: tables (family ip, ip6 or inet) holding chains (type, hook, priority, policy),
rules (handles, counters), named sets and maps (type, flags, elements) and named counters
and quotas. A script is applied all-or-nothing: a line it cannot parse or one naming a
missing object gives rc 1, an error spelled as nft spells it, and no change. `list table`
prints what nft 1.0.6 prints (checked against it in a private namespace), so
nftrender.parse_table reads it. The model and its limits: tests/fakes/nftmodel.py.

`dump()` is the canonical text of everything (sorted, no handles, counters included),
itself a script `seed()` takes. `seed(text)` is a commit by someone else (Docker's,
firewalld's tables, a hand edit). `fail_next(...)` makes the next operation of a kind
fail; `meanwhile(...)` runs someone else's commit just before it. `log` has every
operation, `history` the state after every commit.
"""

from __future__ import annotations

import copy
import errno
import os
import re
import struct

from ipmasq_legacy import netlink
from ipmasq_legacy.backends.nftdriver import PROBE_FAILED

from . import FakeKernel
from .nftmodel import _COUNTER, BY_NUMBER, Fail, Rule, Table, _kernel, _parse, _Txn, table_text

# ---------------------------------------------------------------- the fake kernel


class FakeNft(FakeKernel):
    """nf_tables behind the kernel seam. `library`: libnftables loads too (the backend
    then uses it, as on a node where the binding is safe)."""

    name = "fake-nft"

    def __init__(self, library: bool = False, generation: int = 1):
        super().__init__()
        self.tools["nft"] = self._nft_tool
        self.library = library
        self.tables: dict[tuple[str, str], Table] = {}
        self.generation: int | None = generation
        self.table_handle = 1
        self.log: list[tuple[str, str]] = []  # (list|check|commit|seed|patch|probe, what)
        self.history: list[tuple[str, dict]] = []  # (commit|seed|patch, the tables after it)
        self._failures: list[tuple[str, object, str | None]] = []
        self._meanwhile: list[tuple[str, str]] = []

    # -- test controls

    def fail_next(self, op: str = "commit", error: str | int | None = None, match: str | None = None) -> None:
        """The next `op` (list, check, commit, patch or probe; with `match`, one whose text
        holds it) fails: an nft error text, or for a patch an errno (default ENOMEM)."""
        self._failures.append((op, error, match))

    def meanwhile(self, op: str, script: str) -> None:
        """Someone else commits `script` just before the next `op` (a concurrent change)."""
        self._meanwhile.append((op, script))

    def seed(self, text: str) -> None:
        """Someone else's commit (foreign tables, a hand edit): `text` as nft -f takes it."""
        rc, _, err = self.script(text, who="seed")
        if rc != 0:
            raise AssertionError(f"seed refused: {err}")

    def dump(self) -> str:
        """Everything, canonical: tables sorted by family and name, their contents by name."""
        return "".join(table_text(t, canonical=True) for _, t in sorted(self.tables.items()))

    def listing(self, family: str, name: str, tables: dict | None = None) -> str | None:
        """`nft list table` of one table, now or in a state of `history`; None if absent."""
        t = (self.tables if tables is None else tables).get((family, name))
        return None if t is None else table_text(t)

    def handle(self, family: str, table: str, chain: str, containing: str) -> int:
        """The handle of the first rule of a chain whose text holds `containing`."""
        return next(r.handle for r in self.tables[(family, table)].chains[chain].rules if containing in r.text)

    def count(self, family: str, table: str, chain: str, containing: str, packets: int, nbytes: int) -> None:
        """Traffic: the counters of the rules holding `containing` go up (no commit)."""
        for rule in self.tables[(family, table)].chains[chain].rules:
            if containing in rule.text:
                rule.packets += packets
                rule.bytes += nbytes

    # -- nft, as the binary and as libnftables

    def script(self, text: str, check: bool = False, handles: bool = False, who: str = "") -> tuple[int, str, str]:
        try:
            stmts = _parse(text)
        except Fail as fail:
            stmts, parse_error = [], fail
        else:
            parse_error = None
        kind = who or ("list" if stmts and all(s.words[0] == "list" for s in stmts) else
                       "check" if check else "commit")
        self.log.append((kind, text))
        self._run_meanwhile(kind)
        failure = self._failure(kind, text)
        lines = text.splitlines() or [""]
        if failure is not None:
            return 1, "", _error_text(Fail(str(failure or _kernel(errno.ENOMEM))), lines)
        if parse_error is not None:
            return 1, "", _error_text(parse_error, lines)
        txn = _Txn(copy.deepcopy(self.tables), self.table_handle, handles)
        try:
            for st in stmts:
                txn.run(st)
        except Fail as fail:
            return 1, "", _error_text(fail, lines)
        if not check and txn.dirty:
            self._commit(kind, txn.tables)
            self.table_handle = txn.table_handle
        return 0, "".join(txn.out), ""

    def _nft_tool(self, argv: list[str], input: str | None) -> tuple[int, str, str]:
        check = handles = False
        text = None
        args = argv[1:]
        i = 0
        while i < len(args):
            a = args[i]
            if a in ("-c", "--check"):
                check = True
            elif a in ("-a", "--handle"):
                handles = True
            elif a in ("-f", "--file") and i + 1 < len(args):
                i += 1
                text = input if args[i] == "-" else self.files.get(args[i])
            elif a in ("-v", "--version"):
                return 0, "nftables v1.0.6 (FakeNft)\n", ""
            elif a.startswith("-"):
                return 1, "", f"nft: unrecognized option '{a}'\n"
            else:
                text = " ".join(args[i:])
                break
            i += 1
        if text is None:
            return 1, "", "Error: no command given\n"
        return self.script(text, check=check, handles=handles)

    # -- the kernel seam (ipmasq_legacy/kernel.py)

    def nft_library(self, table: str | None = None):
        if not self.library:
            return None, "no libnftables in this fake kernel"
        return _Library(self), None

    def nft_probe(self, table: str) -> str | None:
        self.log.append(("probe", table))
        failure = self._failure("probe", table)
        if failure is not None:
            return PROBE_FAILED.format(failure or "Could not process rule: Operation not supported")
        txn = _Txn({}, 1, False)  # a throw-away namespace: nothing in it
        try:
            for st in _parse(table):
                txn.run(st)
        except Fail as fail:
            return PROBE_FAILED.format(fail.message)
        return None

    def nft_generation(self) -> int | None:
        return self.generation

    def nft_rules(self, family: str, table: str, chain: str) -> list | None:
        t = self.tables.get((family, table))
        if t is None or chain not in t.chains:
            return None
        return [_expressions(rule) for rule in t.chains[chain].rules]

    def nft_patch(self, family: int, table: str, name: str, add=(), delete=(), flush: bool = False,
                  genid: int | None = None) -> None:
        add, delete = list(add), list(delete)
        self.log.append(("patch", f"{name}: {'flush, ' if flush else ''}-{len(delete)} +{len(add)}"))
        self._run_meanwhile("patch")
        failure = self._failure("patch", name)
        if failure is not None:
            code = failure if isinstance(failure, int) else errno.ENOMEM
            raise OSError(code, os.strerror(code))
        if genid is not None and genid != self.generation:
            raise OSError(errno.ERESTART, os.strerror(errno.ERESTART))
        tables = copy.deepcopy(self.tables)
        t = tables.get((BY_NUMBER[family], table))
        nset = t.sets.get(name) if t is not None else None
        if nset is None or nset.version != family:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        txn = _Txn(tables, self.table_handle, False)
        try:
            if flush:
                txn.dirty |= bool(nset.elements)
                nset.elements.clear()
            txn.elements(nset, delete, False, 1)
            txn.elements(nset, add, True, 1)
        except Fail as fail:
            code = errno.EEXIST if "conflicting" in fail.message else errno.ENOENT
            raise OSError(code, os.strerror(code)) from None
        if txn.dirty:
            self._commit("patch", tables)

    # -- inside

    def _commit(self, kind: str, tables: dict) -> None:
        self.tables = tables
        if self.generation is not None:
            self.generation = (self.generation + 1) % 2**32
        self.history.append((kind, copy.deepcopy(tables)))

    def _failure(self, op: str, text: str):
        for i, (kind, error, match) in enumerate(self._failures):
            if kind == op and (match is None or match in text):
                del self._failures[i]
                return error if error is not None else ""
        return None

    def _run_meanwhile(self, op: str) -> None:
        for i, (kind, script) in enumerate(self._meanwhile):
            if kind == op:
                del self._meanwhile[i]
                self.seed(script)
                return


class _Library:
    """libnftables over the model: what NftablesBackend gets from FakeNft(library=True)."""

    name = "libnftables"

    def __init__(self, fake: FakeNft):
        self.fake = fake

    def cmd(self, text: str, dry_run: bool = False) -> tuple[int, str, str]:
        return self.fake.script(text, check=dry_run)


def _error_text(fail: Fail, lines: list[str]) -> str:
    """As nft reports it: `/dev/stdin:LINE:FIRST-LAST: Error: ...`, the line, carets."""
    source = lines[min(fail.line, len(lines)) - 1]
    start = source.find(fail.word) if fail.word else -1
    first, last = (start + 1, start + len(fail.word)) if start >= 0 else (1, max(len(source), 1))
    carets = " " * (first - 1) + "^" * (last - first + 1)
    return f"/dev/stdin:{fail.line}:{first}-{last}: Error: {fail.message}\n{source}\n{carets}\n"


_OIFNAME = re.compile(r'oifname (!= )?"((?:[^"\\]|\\.)*)"')
NFT_META_KEY, NFT_CMP_OP, NFT_CMP_DATA, NFTA_DATA_VALUE = 2, 2, 3, 1
NFT_META_OIFNAME, IFNAMSIZ = 7, 16


def _expressions(rule: Rule) -> list[tuple[str, dict[int, bytes]]]:
    """A rule as the netlink rule dump gives it, as far as the counters need: the
    out-interface match (meta oifname + cmp), the counter, the masq/nat statement."""
    exprs: list[tuple[str, dict[int, bytes]]] = []
    m = _OIFNAME.search(rule.text)
    if m:
        pattern = m.group(2)
        prefix = pattern.endswith("*") and not pattern.endswith("\\*")
        name = (pattern[:-1] if prefix else pattern).replace("\\*", "*").encode()
        value = name if prefix else name.ljust(IFNAMSIZ, b"\0")
        exprs += [("meta", {NFT_META_KEY: struct.pack("!I", NFT_META_OIFNAME)}),
                  ("cmp", {NFT_CMP_OP: struct.pack("!I", 1 if m.group(1) else 0),
                           NFT_CMP_DATA: netlink.nla(NFTA_DATA_VALUE, value)})]
    if "@" in rule.text:
        exprs.append(("lookup", {}))
    if _COUNTER.search(rule.text):
        exprs.append(("counter", {1: struct.pack("!Q", rule.bytes), 2: struct.pack("!Q", rule.packets)}))
    if "masquerade" in rule.text:
        exprs.append(("masq", {}))
    elif re.search(r"\b[sd]nat to\b", rule.text):
        exprs.append(("nat", {}))
    else:
        exprs.append(("immediate", {}))
    return exprs
