"""Shared fixtures.

* ``host_netns_guard`` (session, autouse): snapshots the machine's own network
  namespace (links, addresses, routes, rules, iptables legacy+nft, nft ruleset,
  ipsets, the list of named network namespaces) before the session and
  compares after it.  Any difference fails the run (non-zero exit status) and
  the diff is printed in the terminal summary.  Only reads are done in the
  machine's namespace.
* ``bed`` / ``bed_module``: a :class:`tests.testbed.TestBed` (IPv4+IPv6).
* marker ``traffic``: tests that need root and network namespaces; skipped
  (with a reason) only when not running as root.

Set IPMASQ_HOSTCHECK_IGNORE_NETNS to a regular expression to ignore network
namespaces that other things on the machine create or delete while the tests
run (namespaces of other processes' test beds, ``ipmq-<pid>x...``, are always
ignored).
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from . import testbed as _tb  # noqa: E402

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# name -> argv; read-only commands run in the machine's own namespace
HOST_COMMANDS: dict[str, list[str]] = {
    "ip -o link": ["ip", "-o", "link", "show"],
    "ip -o addr": ["ip", "-o", "addr", "show"],
    "ip route": ["ip", "route", "show", "table", "all"],
    "ip -6 route": ["ip", "-6", "route", "show", "table", "all"],
    "ip rule": ["ip", "rule", "show"],
    "ip -6 rule": ["ip", "-6", "rule", "show"],
    "iptables-legacy-save": ["iptables-legacy-save"],
    "ip6tables-legacy-save": ["ip6tables-legacy-save"],
    "iptables-nft-save": ["iptables-nft-save"],
    "ip6tables-nft-save": ["ip6tables-nft-save"],
    "nft list ruleset": ["nft", "list", "ruleset"],
    "ipset list -n": ["ipset", "list", "-n"],
    "ip netns list": ["ip", "netns", "list"],
}


def _run(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "missing"
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return "missing"
    except subprocess.TimeoutExpired:
        return "timeout"
    if r.returncode != 0:
        return f"exit {r.returncode}: {r.stderr.strip()}\n{r.stdout}"
    return r.stdout


_COUNTERS = re.compile(r"\[\d+:\d+\]")
_NFT_COUNTER = re.compile(r"counter packets \d+ bytes \d+")
_EXPIRES = re.compile(r"\s+expires \S+")
_LFT = re.compile(r"\s+valid_lft \S+ preferred_lft \S+")
_LINK_VOLATILE = re.compile(r"\s+state \S+|\s+link-netnsid \d+")
_NETNS_ID = re.compile(r"\s*\(id: \d+\)")


# The built-in chains of each iptables table. On older kernels (5.10) loading a table's
# module (iptable_filter, ...) registers that table, empty, in every namespace, the
# machine's own included: a test bed's iptables in a namespace then "adds" an empty
# filter table here. Such a table (only its built-in chains, policy ACCEPT, no rule,
# no chain of its own) changes nothing and is left out; one with a rule, a chain or
# another policy is still a difference.
BUILTIN_CHAINS = {
    "filter": {"INPUT", "FORWARD", "OUTPUT"},
    "nat": {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
    "mangle": {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"},
    "raw": {"PREROUTING", "OUTPUT"},
    "security": {"INPUT", "FORWARD", "OUTPUT"},
}


def _drop_empty_builtin_tables(lines: list[str]) -> list[str]:
    out, block = [], None
    for line in lines:
        if line.startswith("*"):
            block = [line]
            continue
        if block is None:
            out.append(line)
            continue
        block.append(line)
        if line == "COMMIT":
            chains = BUILTIN_CHAINS.get(block[0][1:], set())
            body = block[1:-1]
            empty = all(re.fullmatch(r":(\S+) ACCEPT \[0:0\]", b) and b[1:].split()[0] in chains for b in body)
            if not empty:
                out.extend(block)
            block = None
    return out + (block or [])


def _normalise(name: str, text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if name.endswith("-save"):
            if line.startswith("#"):
                continue
            line = _COUNTERS.sub("[0:0]", line)
        elif name == "nft list ruleset":
            line = _NFT_COUNTER.sub("counter", line)
            line = _EXPIRES.sub("", line)
        elif name == "ip -o link":
            line = _LINK_VOLATILE.sub("", line)
            # carrier flags come and go on their own
            line = re.sub(r"<([^>]*)>", lambda m: "<" + ",".join(
                f for f in m.group(1).split(",") if f not in ("LOWER_UP", "NO-CARRIER", "M-DOWN", "DORMANT")
            ) + ">", line)
        elif name == "ip -o addr":
            line = _LFT.sub("", line)
        elif name in ("ip route", "ip -6 route"):
            line = _EXPIRES.sub("", line)
        elif name == "ip netns list":
            line = _NETNS_ID.sub("", line)
        lines.append(line.rstrip())
    if name == "ip netns list":
        lines = sorted(lines)
    if name.endswith("-legacy-save"):
        lines = _drop_empty_builtin_tables(lines)
    return lines


def host_snapshot() -> dict[str, list[str]]:
    return {name: _normalise(name, _run(argv)) for name, argv in HOST_COMMANDS.items()}


def _netns_ignored(name: str) -> bool:
    pid = _tb.bed_owner_pid(name)
    if pid is not None and pid != os.getpid():
        return True  # another process's test bed (a concurrent or earlier run)
    pattern = os.environ.get("IPMASQ_HOSTCHECK_IGNORE_NETNS")
    return bool(pattern and re.search(pattern, name))


def host_diff(before: dict[str, list[str]], after: dict[str, list[str]]) -> str:
    out = []
    for name in HOST_COMMANDS:
        a, b = before.get(name, []), after.get(name, [])
        if name == "ip netns list":
            a = [n for n in a if not _netns_ignored(n)]
            b = [n for n in b if not _netns_ignored(n)]
        if a != b:
            out.append(f"=== {name} changed ===")
            out.extend(difflib.unified_diff(a, b, "before", "after", lineterm="", n=1))
    return "\n".join(out)


_GUARD: dict[str, str] = {}


@pytest.fixture(scope="session", autouse=True)
def host_netns_guard():
    """Fail the session if the machine's own network namespace changed."""
    if IS_ROOT:
        _tb.cleanup_stale()  # beds left behind by killed runs (their owner is dead)
    before = host_snapshot()
    yield before
    after = host_snapshot()
    diff = host_diff(before, after)
    if diff:
        _GUARD["diff"] = diff


def pytest_sessionfinish(session, exitstatus):
    if _GUARD.get("diff") and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    diff = _GUARD.get("diff")
    if diff:
        terminalreporter.write_sep("=", "HOST NETWORK NAMESPACE CHANGED DURING THE TESTS", red=True, bold=True)
        terminalreporter.write_line(diff)
        terminalreporter.write_sep("=", "the session fails because of the diff above", red=True, bold=True)


_MAIN_PID = os.getpid()


def _terminate(signum, frame):
    if os.getpid() != _MAIN_PID:  # a forked child (pyroute2's netns helpers): die as before
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "traffic: needs root and builds network namespaces (never touches the machine's own)"
    )
    # SIGTERM (a CI timeout, a `kill`) unwinds like Ctrl-C: fixtures' finally blocks and the
    # nodes' finalizers run, so no test bed, bpffs mount or daemon outlives the run.
    # (Killed with the default handler, two runs left private bpffs mounts behind.)
    signal.signal(signal.SIGTERM, _terminate)


def pytest_collection_modifyitems(config, items):
    if IS_ROOT and shutil.which("ip"):
        return
    reason = "traffic test: needs root" if not IS_ROOT else "traffic test: needs the `ip` command (iproute2)"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "traffic" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fake_kernel():
    """A privileged FakeKernel (tests/fakes) as the seam the backends and the CLI's
    privilege check talk to: for tests whose backends are fakes, so they need no root."""
    from ipmasq_legacy import kernel

    from .fakes import FakeKernel

    with kernel.use(FakeKernel()) as fake:
        yield fake


def _need_root():
    if not IS_ROOT:
        pytest.skip("needs root to build network namespaces")


@pytest.fixture
def bed():
    """A fresh pod -> node -> ext bed (IPv4 + IPv6), closed after the test."""
    _need_root()
    with _tb.TestBed(ipv6=True) as b:
        yield b


@pytest.fixture(scope="module")
def bed_module():
    """One bed shared by a whole module (tests must leave the node as they found it)."""
    _need_root()
    with _tb.TestBed(ipv6=True) as b:
        yield b


@pytest.fixture
def node(bed_module):
    """The module's bed's node, driven through the real CLI; everything flushed afterwards."""
    from .nodeutil import driven_node

    with driven_node(bed_module) as node:
        yield node
