"""The measurements.  Everything that touches the network happens inside test beds
(`tests.testbed.TestBed`: pod -> node -> ext network namespaces); the machine's
own namespace is only read (before and after, to prove it was left alone).

Three kinds of measurement:

* CLI cost: wall time and peak RSS of whole `ipmasq` processes (Python start
  included) run in a bed's node namespace: cold apply, no-op reconcile, one-prefix
  change, against the number of exempt prefixes; `ipmasq plan` (no kernel access).
* New-connection cost: UDP packets from the pod, each to another destination port
  (a new conntrack flow, so one trip through the nat POSTROUTING rules), forwarded by
  the node to an address that ext drops (blackhole route); microseconds per packet.
* Steady throughput: iperf3 (or a Python socket pump) pod -> ext through the node.

The last two are bench/flows.py's; the suites below run all three.  Nodes are driven
through tests/testbed's Node (BenchNode: its runs timed).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ipmasq_legacy import backends
from tests.testbed import Node, TestBed

from .flows import FlowBench, add_nat_chain, delete_nat_chain, ip_masq_agent_restore, measure_throughput

REPO = Path(__file__).resolve().parent.parent


def compile_bytecode() -> None:
    """Every measured `ipmasq` run should find the package's bytecode, as a wheel install
    does (pip compiles it). An editable checkout run with PYTHONDONTWRITEBYTECODE=1 (this
    machine's environment) compiled ~100 modules from source on every run: 0.2 s of each
    CLI figure, more than the work measured."""
    import compileall

    compileall.compile_dir(str(REPO / "ipmasq_legacy"), quiet=2)


compile_bytecode()
PHASES_SCRIPT = Path(__file__).resolve().parent / "phases.py"
PYTHON = sys.executable

POD_CIDR = "10.244.0.0/16"
EXTRA_PREFIX = "60.0.0.0/24"  # the "one-prefix change"

STEPS = ("cold", "noop", "change")
FIRST_RECONCILE_TIMEOUT = 600.0
STEP_TITLES = {"cold": "cold apply", "noop": "no-op reconcile", "change": "one-prefix change"}


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    quick: bool
    sizes: tuple[int, ...]
    repeats: int  # CLI runs per (backend, size, step), at most
    cell_budget: float  # ... and no more once a cell's runs add up to this many seconds
    step_timeout: float  # one CLI run is killed after this
    conn_repeats: int
    conn_run_seconds: float  # aim of one timed burst of new connections
    conn_max_packets: int
    throughput_seconds: int
    throughput_runs: int = 1
    streams: tuple[int, ...] = (1, 4)


def settings_for(quick: bool) -> Settings:
    if quick:
        return Settings(quick=True, sizes=(10, 1_000, 10_000), repeats=1, cell_budget=5.0, step_timeout=30.0,
                        conn_repeats=3, conn_run_seconds=0.1, conn_max_packets=20_000, throughput_seconds=1)
    return Settings(quick=False, sizes=(10, 1_000, 10_000, 100_000, 1_000_000), repeats=3, cell_budget=20.0,
                    step_timeout=120.0, conn_repeats=7, conn_run_seconds=0.3, conn_max_packets=60_000,
                    throughput_seconds=5, throughput_runs=1)


# ---------------------------------------------------------------- prefixes and configs


def exempt_prefixes(n: int) -> list[str]:
    """`n` exempt prefixes that stay `n` after normalisation (no overlaps, no two that
    merge): /24s at even third octets from 20.0.0.0/8 up (32,768 per /8), every tenth
    one replaced by a /32 in the odd /24 beside it.  None is near the bed's addresses."""
    out = []
    for i in range(n):
        a, rest = 20 + i // 32768, i % 32768
        b, c = rest // 128, (rest % 128) * 2
        out.append(f"{a}.{b}.{c + 1}.7/32" if i % 10 == 9 else f"{a}.{b}.{c}.0/24")
    return out


def write_config(path: Path, prefixes: list[str]) -> str:
    """A config file as an operator writes it: YAML, one list item per prefix."""
    lines = [f"ipv4-pod-cidr: [{POD_CIDR}]", "ipv4-native-routing-cidr:"]
    lines += [f"  - {p}" for p in prefixes]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ---------------------------------------------------------------- running processes


@dataclass
class Run:
    wall: float  # seconds, fork to reap
    rss_mb: float  # ru_maxrss: the largest single process of the tree (children waited for)
    code: int | None  # None: killed at the time limit
    stdout: str
    stderr: str
    cpu: float = 0.0  # seconds of user + system CPU of the tree (children waited for), load-proof beside wall

    @property
    def timed_out(self) -> bool:
        return self.code is None


# A small launcher between us and the measured command.  ru_maxrss of a child counts
# the memory of the process it was forked from until its exec (fork and vfork alike),
# so a child forked from this big benchmark process would start at our own RSS; forked
# from a bare `python -S` it starts at ~9 MB, below any CLI run.  The launcher also
# times fork-to-reap, so its own start is not counted.
_LAUNCHER = """\
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(out, "w") as f:
    f.write(f"{wall} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)} {usage.ru_utime + usage.ru_stime}")
"""


def run_measured(argv: list[str], env: dict | None = None, timeout: float = 60.0) -> Run:
    """Run argv to completion: wall time (fork to reap) and peak RSS (wait4(2)).

    `ip netns exec` execs the command in place, so the measured child is the CLI
    itself; the tools it runs (iptables-restore, ipset, nft) are its waited-for
    children, whose peaks are folded into ru_maxrss (the largest single process, not
    a sum).  On timeout the whole process group is killed."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(prefix="ipmasq-bench-run-") as stats:
        # cwd: `python -m ipmasq_legacy` then runs this checkout's package, in a tox env too
        proc = subprocess.Popen([PYTHON, "-S", "-I", "-c", _LAUNCHER, stats.name, *argv], stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True, cwd=REPO)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            out.seek(0)
            err.seek(0)
            return Run(wall=timeout, rss_mb=0.0, code=None, stdout=out.read().decode(errors="replace"),
                       stderr=err.read().decode(errors="replace"))
        wall, maxrss_kb, code, cpu = Path(stats.name).read_text().split()
        out.seek(0)
        err.seek(0)
        return Run(wall=float(wall), rss_mb=int(maxrss_kb) / 1024.0, code=int(code),
                   stdout=out.read().decode(errors="replace"), stderr=err.read().decode(errors="replace"),
                   cpu=float(cpu))


def cli_env(workdir: Path) -> dict:
    """Environment of every CLI run: a state dir of our own, no config from the
    environment, and a bytecode cache of our own (this environment may set
    PYTHONDONTWRITEBYTECODE, and an installed package has its .pyc files)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPMASQ_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(IPMASQ_STATE_DIR=str(workdir / "state"), IPMASQ_CONFIG="",
               PYTHONPYCACHEPREFIX=str(workdir / "pycache"))
    return env


def warm_bytecode(env: dict) -> None:
    """Compile the package and what it imports into our bytecode cache (no side effects)."""
    # pyroute2 is imported lazily (only when a link or tc object changes): warm it too
    code = ("import importlib, pkgutil, ipmasq_legacy, pyroute2\n"
            "for pkg, prefix in ((ipmasq_legacy, 'ipmasq_legacy.'), (pyroute2, 'pyroute2.')):\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, prefix):\n"
            "        if not m.name.endswith('__main__'):\n"
            "            try:\n"
            "                importlib.import_module(m.name)\n"
            "            except Exception:\n"
            "                pass\n")
    subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, timeout=120, cwd=REPO)


def summarise(runs: list[Run]) -> dict:
    ok = [r for r in runs if not r.timed_out]
    walls = [r.wall for r in ok]
    return {
        "n": len(ok),
        "median": statistics.median(walls) if walls else None,
        "min": min(walls) if walls else None,
        "max": max(walls) if walls else None,
        "samples": walls,
        "rss_mb": max((r.rss_mb for r in ok), default=None),
        "timeout": any(r.timed_out for r in runs),
    }


def new_bed() -> TestBed:
    """An IPv4 test bed.  Building is retried: on a shared machine a namespace can
    vanish under construction (another run's clean-up of beds it thinks are stale)."""
    for attempt in range(5):
        try:
            return TestBed(ipv6=False)
        except (OSError, RuntimeError) as exc:
            if attempt == 4:
                raise
            print(f"  (test bed build failed, retrying: {exc})", file=sys.stderr, flush=True)
            time.sleep(1.0)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- machine


def _first_line(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr).strip() else "?"


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem_gb = round(kb / 1024 / 1024, 1)
    except (OSError, AttributeError):
        pass
    git = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.splitlines()
    try:
        nft_driver = backends.get("nftables").driver
    except Exception as exc:  # pragma: no cover - informative only
        nft_driver = f"? ({exc})"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "git": f"{git}{' + ' + str(len(dirty)) + ' modified files' if dirty else ''}",
        "tools": {
            "iptables": _first_line(["iptables", "--version"]),
            "iptables-restore": _first_line(["iptables-restore", "--version"]),
            "nft": _first_line(["nft", "--version"]),
            "ipset": _first_line(["ipset", "--version"]),
            "conntrack": _first_line(["conntrack", "--version"]),
            "iperf3": _first_line(["iperf3", "--version"]),
        },
        "nftables_driver": nft_driver,
    }


# ---------------------------------------------------------------- host guard

_HOST_READS = {
    "links": ["ip", "-o", "link", "show"],
    "addresses": ["ip", "-o", "addr", "show"],
    "routes": ["ip", "route", "show", "table", "all"],
    "routes6": ["ip", "-6", "route", "show", "table", "all"],
    "rules": ["ip", "rule", "show"],
    "iptables-legacy": ["iptables-legacy-save"],
    "iptables-nft": ["iptables-nft-save"],
    "nft": ["nft", "list", "ruleset"],
    "ipset": ["ipset", "list", "-n"],
}
_VOLATILE = [re.compile(r"\[\d+:\d+\]"), re.compile(r"counter packets \d+ bytes \d+"),
             re.compile(r"^# .*$", re.M), re.compile(r"\s+state \S+|\s+link-netnsid \d+"),
             re.compile(r"\s+valid_lft \S+ preferred_lft \S+")]


def host_snapshot() -> dict[str, str]:
    """Read-only view of the machine's own network namespace (this process's)."""
    snap = {}
    for name, argv in _HOST_READS.items():
        if shutil.which(argv[0]) is None:
            continue
        text = subprocess.run(argv, capture_output=True, text=True).stdout
        for pattern in _VOLATILE:
            text = pattern.sub("", text)
        snap[name] = text
    return snap


def host_diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [name for name in before if before[name] != after.get(name)]


# ---------------------------------------------------------------- the node, driven through the CLI


class BenchNode(Node):
    """tests/testbed's Node with the bench's configs, its CLI runs measured (wall time, peak RSS)."""

    def __init__(self, bed: TestBed, workdir: Path, timeout: float):
        super().__init__(bed, workdir=workdir, env=cli_env(workdir))
        self.timeout = timeout
        self._configs: dict[int, str] = {}

    def config(self, n: int, extra: bool = False) -> str:
        key = -n if extra else n
        if key not in self._configs:
            prefixes = exempt_prefixes(n) + ([EXTRA_PREFIX] if extra else [])
            self._configs[key] = write_config(self.dir / f"config-{n}{'-plus1' if extra else ''}.yaml", prefixes)
        return self._configs[key]

    def timed(self, *args: str, timeout: float | None = None) -> Run:
        return run_measured(self.argv(*args), env=self.env, timeout=timeout or self.timeout)

    def phases(self, out: Path, *args: str) -> tuple[Run, dict | None]:
        import json

        argv = ["ip", "netns", "exec", self.bed.node, PYTHON, str(PHASES_SCRIPT), str(out), *args]
        run = run_measured(argv, env=self.env, timeout=self.timeout)
        try:
            data = json.loads(out.read_text())
        except (OSError, ValueError):
            data = None
        return run, data

    def flush(self) -> None:
        r = self.timed("flush")
        if r.code != 0:
            raise RuntimeError(f"ipmasq flush failed: {r.stderr.strip()}")


# ---------------------------------------------------------------- CLI cost


def measure_startup(workdir: Path, bed: TestBed, repeats: int = 5) -> dict:
    """What every CLI run pays before it does anything (in the node namespace, as the runs)."""
    env = cli_env(workdir)
    nocache = {k: v for k, v in env.items() if k != "PYTHONPYCACHEPREFIX"}
    nocache["PYTHONDONTWRITEBYTECODE"] = "1"
    cases = {
        "ip netns exec true": (["true"], env),
        "python -c pass": ([PYTHON, "-c", "pass"], env),
        "python -c 'import ipmasq_legacy.cli'": ([PYTHON, "-c", "import ipmasq_legacy.cli"], env),
        "ipmasq --version": ([PYTHON, "-m", "ipmasq_legacy", "--version"], env),
        "ipmasq --version, no bytecode cache": ([PYTHON, "-m", "ipmasq_legacy", "--version"], nocache),
    }
    out = {}
    for name, (argv, e) in cases.items():
        runs = [run_measured(["ip", "netns", "exec", bed.node, *argv], env=e, timeout=30) for _ in range(repeats)]
        out[name] = summarise(runs)
    return out


def measure_plan(workdir: Path, s: Settings, names: list[str], log: Callable[[str], None]) -> dict:
    """`ipmasq plan`: the default config, then each size per backend (no kernel access,
    run in this process's namespace: plan reads and changes nothing there)."""
    env = cli_env(workdir)
    env["IPMASQ_STATE_DIR"] = str(workdir / "plan-state")  # no state record: `auto` as on a new node
    default = [run_measured([PYTHON, "-m", "ipmasq_legacy", "plan"], env=env, timeout=s.step_timeout)
               for _ in range(max(3, s.repeats))]
    result = {"default": summarise(default), "default_ok": all(r.code == 0 for r in default),
              "default_config_file_exists": os.path.exists("/etc/ipmasq-legacy/config.yaml"), "sizes": {}}
    cfgdir = workdir / "plan-configs"
    cfgdir.mkdir(exist_ok=True)
    for name in names:
        result["sizes"][name] = {}
        for n in s.sizes:
            cfg = write_config(cfgdir / f"{n}.yaml", exempt_prefixes(n))
            runs: list[Run] = []
            while len(runs) < s.repeats and sum(r.wall for r in runs) < s.cell_budget:
                r = run_measured([PYTHON, "-m", "ipmasq_legacy", "plan", "--config", cfg, "--backend", name],
                                 env=env, timeout=s.step_timeout)
                runs.append(r)
                if r.timed_out or r.code != 0:
                    break
            result["sizes"][name][n] = summarise(runs)
            log(f"  plan {name} {n}: {_fmt_s(result['sizes'][name][n])}")
    return result


def _fmt_s(st: dict) -> str:
    if st.get("timeout") and not st.get("n"):
        return "timeout"
    return f"{st['median']:.3f} s (n={st['n']}, {st['rss_mb']:.0f} MB)" if st.get("median") is not None else "-"


def _check(step: str, run: Run, n: int) -> str | None:
    """Why a run is not what the step expects, or None."""
    if run.timed_out:
        return "timeout"
    if run.code != 0:
        return f"exit {run.code}: {run.stderr.strip()[:200]}"
    if step == "noop" and (run.stdout.strip() or run.stderr.strip()):
        return f"not silent: {(run.stdout + run.stderr).strip()[:200]}"
    if step in ("cold", "change") and (not run.stdout.strip() or "unchanged" in run.stdout):
        return f"changed nothing: {run.stdout.strip()[:200]}"
    return None


def measure_apply_size(node: BenchNode, name: str, n: int, s: Settings, disabled: set[str],
                       log: Callable[[str], None]) -> dict:
    """Cold apply, no-op reconcile and one-prefix change at `n` prefixes; leaves the
    n+1-prefix config installed (for the datapath measurements that follow)."""
    args = {
        "cold": ("apply", "--config", node.config(n), "--backend", name),
        "noop": ("reconcile", "--config", node.config(n), "--backend", name),
        "change": ("apply", "--config", node.config(n, extra=True), "--backend", name),
    }
    runs: dict[str, list[Run]] = {step: [] for step in STEPS}
    problems: dict[str, str] = {}
    first_reconcile: list[float] = []

    def wants(step: str) -> bool:
        if step == "noop" and runs[step] and sum(first_reconcile) > s.cell_budget:
            return False  # one sample: each costs a first reconcile that long
        return (step not in disabled and step not in problems and len(runs[step]) < s.repeats
                and sum(r.wall for r in runs[step]) < s.cell_budget)

    while any(wants(step) for step in STEPS):
        node.flush()
        for step in STEPS:
            if step != "cold" and not wants(step):
                continue
            if step == "noop":
                # cron's steady state: the first reconcile after an apply reads everything
                # and records what it verified; the ones after it are the no-op case. The
                # first may take long (nftables at 1,000,000: 148 s, README "Scale"): it
                # gets FIRST_RECONCILE_TIMEOUT, and its time is kept beside the no-op's
                first = node.timed(*args[step], timeout=max(FIRST_RECONCILE_TIMEOUT, s.step_timeout))
                first_reconcile.append(first.wall)
            r = node.timed(*args[step])
            runs[step].append(r)
            why = _check(step, r, n)
            if why:
                problems[step] = why
                if step == "cold":
                    break  # nothing installed to reconcile or change
        if "cold" in problems:
            break
    out = {}
    for step in STEPS:
        st = summarise(runs[step])
        st["problem"] = problems.get(step)
        if step in disabled:
            st["problem"] = "skipped (slower than the time limit at a smaller size)"
        elif step != "cold" and "cold" in problems and not runs[step]:
            st["problem"] = "not run (cold apply failed)"
        if step == "noop" and first_reconcile:
            st["first_reconcile_s"] = statistics.median(first_reconcile)
        out[step] = st
        first = f"  (the first after the apply: {st['first_reconcile_s']:.2f} s)" if "first_reconcile_s" in st else ""
        log(f"  {name} {n:>7} {STEP_TITLES[step]:18} {_fmt_s(st)}{first}"
            f"{'  ' + st['problem'] if st['problem'] else ''}")
    return out


def measure_breakdown(node: BenchNode, name: str, n: int, skip: set[str], log: Callable[[str], None]) -> dict:
    """One instrumented run of each step (bench/phases.py) at `n` prefixes, but those in
    `skip` (steps that failed or timed out at that size: cold always runs, as set-up)."""
    out: dict = {"prefixes": n}
    node.flush()
    args = {
        "cold": ("apply", "--config", node.config(n), "--backend", name),
        "noop": ("reconcile", "--config", node.config(n), "--backend", name),
        "change": ("apply", "--config", node.config(n, extra=True), "--backend", name),
    }
    for step in STEPS:
        if step in skip and step != "cold":
            continue
        run, data = node.phases(node.dir / f"phases-{step}.json", *args[step])
        if run.timed_out or data is None:
            out[step] = {"wall": run.wall, "problem": "timeout" if run.timed_out else "no phase data"}
            if step == "cold":
                break
            continue
        data["wall"] = run.wall
        data["rss_mb"] = run.rss_mb
        data["problem"] = _check(step, run, n)
        out[step] = data
        log(f"  {name} {n} {STEP_TITLES[step]} breakdown: wall {run.wall:.2f} s")
    return out


# ---------------------------------------------------------------- the suites


def available_backends(wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    names, skipped = [], {}
    for name in wanted or list(backends.NAMES):
        if name not in backends.NAMES:
            skipped[name] = f"not a backend of this version (known: {', '.join(backends.NAMES)})"
            continue
        try:
            reason = backends.get(name).unavailable_reason()
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if reason is None:
            names.append(name)
        else:
            skipped[name] = reason
    return names, skipped


def _tp_text(tp: dict) -> str:
    return ", ".join(f"{k}x {v['gbit_s']:.1f} Gbit/s" for k, v in tp.items() if k != "prefixes")


def floor_suite(s: Settings, log: Callable[[str], None], floor_bed: TestBed, floor: FlowBench) -> dict:
    """The floor: plain forwarding, no netfilter at all in the node (this bed never gets any)."""
    out = {"floor": floor.measure(s)}
    log(f"  floor: {out['floor']['us_per_conn']:.2f} µs per new connection")
    out["floor_throughput"] = measure_throughput(floor_bed, s)
    log(f"  floor throughput: {_tp_text(out['floor_throughput'])}")
    return out


def reference_suite(s: Settings, log: Callable[[str], None], floor_bed: TestBed, floor: FlowBench) -> dict:
    """The floor, then in a bed of their own a nat chain with no rules, and one
    masquerade rule with no exemptions."""
    out: dict = floor_suite(s, log, floor_bed, floor)
    with new_bed() as bed:
        flows = FlowBench(bed, s.conn_max_packets)
        try:
            add_nat_chain(bed)
            out["empty_nat"] = flows.measure(s, floor)
            log(f"  nat chain, no rules: {out['empty_nat']['us_per_conn']:.2f} µs per new connection")
            out["empty_nat_throughput"] = measure_throughput(bed, s, floor_bed)
            delete_nat_chain(bed)
            add_nat_chain(bed, 'oifname != "lo" masquerade')
            out["masquerade_only"] = flows.measure(s, floor)
            log(f"  one masquerade rule: {out['masquerade_only']['us_per_conn']:.2f} µs per new connection")
            out["masquerade_only_throughput"] = measure_throughput(bed, s, floor_bed)
        finally:
            flows.close()
    return out


# One rule per prefix: a new connection walks them all (3 ms at 100,000 in the README's
# run), so 1,000,000 would take minutes to load and ~30 ms a connection to show the same line.
IP_MASQ_AGENT_MAX = 100_000


def ip_masq_agent_suite(s: Settings, workdir: Path, log: Callable[[str], None], floor: FlowBench) -> dict:
    """ip-masq-agent's rule layout, loaded with the system's iptables-restore."""
    out: dict = {"tool": _first_line(["iptables-restore", "--version"]), "sizes": {}}
    with new_bed() as bed:
        flows = FlowBench(bed, s.conn_max_packets)
        try:
            for n in s.sizes:
                if n > IP_MASQ_AGENT_MAX:
                    out["sizes"][n] = {"problem": f"not measured above {IP_MASQ_AGENT_MAX:,} (linear in rules)"}
                    continue
                text = ip_masq_agent_restore(exempt_prefixes(n))
                path = workdir / f"ip-masq-agent-{n}.rules"
                path.write_text(text)
                load = run_measured(["ip", "netns", "exec", bed.node, "sh", "-c",
                                     f"iptables-restore -w < {path}"], timeout=s.step_timeout * 2)
                row: dict = {"load_s": load.wall, "load_rss_mb": load.rss_mb}
                if load.timed_out or load.code != 0:
                    row["problem"] = "timeout" if load.timed_out else load.stderr.strip()[:200]
                    out["sizes"][n] = row
                    log(f"  ip-masq-agent {n}: load failed: {row['problem']}")
                    break
                row.update(flows.measure(s, floor))
                out["sizes"][n] = row
                log(f"  ip-masq-agent {n:>7}: load {load.wall:.2f} s, {row['us_per_conn']:.2f} µs per new connection")
        finally:
            flows.close()
    return out


def backend_suite(name: str, s: Settings, workdir: Path, log: Callable[[str], None], floor: FlowBench) -> dict:
    """One fresh bed: for each size the CLI steps, then the new-connection cost with
    that many prefixes installed; at the end throughput and the phase breakdown."""
    out: dict = {"apply": {}, "conn": {}, "throughput": None, "breakdown": None}
    disabled: set[str] = set()
    with new_bed() as bed:
        node = BenchNode(bed, workdir, s.step_timeout)
        flows = None
        try:
            flows = FlowBench(bed, s.conn_max_packets)
            installed = None
            for n in s.sizes:
                if "cold" in disabled:
                    out["apply"][n] = {step: {"n": 0, "problem": "skipped (cold apply too slow at a smaller size)"}
                                       for step in STEPS}
                    continue
                res = measure_apply_size(node, name, n, s, disabled, log)
                out["apply"][n] = res
                for step in STEPS:
                    if res[step].get("timeout"):
                        disabled.add(step)
                if res["cold"]["problem"]:
                    disabled.add("cold")
                    continue
                # what is installed now: n prefixes, plus one if the change step ran
                installed = n
                if res["change"]["n"] == 0:
                    node.timed("apply", "--config", node.config(n, extra=True), "--backend", name)
                out["conn"][n] = flows.measure(s, floor)
                log(f"  {name} {n:>7}: {out['conn'][n]['us_per_conn']:.2f} µs per new connection")
            if installed is not None:
                out["throughput"] = {"prefixes": installed, **measure_throughput(bed, s, floor.bed)}
                log(f"  {name} throughput ({installed} prefixes): {_tp_text(out['throughput'])}")
                failed = {step for step, st in out["apply"][installed].items() if st.get("problem")}
                out["breakdown"] = measure_breakdown(node, name, installed, failed, log)
            node.flush()
        finally:
            if flows is not None:
                flows.close()
            node.close()
    return out
