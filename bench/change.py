"""One-prefix change at scale, every backend in alternation.

    sudo .venv/bin/python -m bench.change                          # 100,000 prefixes, 5 rounds
    sudo .venv/bin/python -m bench.change --prefixes 1000000 --backends nftables,ebpf --rounds 3
    git archive HEAD~3 | tar -x -C /tmp/before    # an earlier tree, measured in the same run:
    sudo .venv/bin/python -m bench.change --backends iptables-nft --before /tmp/before

The full benchmark measures a change once per cold install; on a shared 2-core machine
that drifts. Here one bed per backend holds N prefixes and, round after round and
backend after backend, `ipmasq apply` toggles one prefix in and out (N -> N+1 -> N ...):
each apply is a one-prefix change of a warm node, as cron or watch makes it. Beside it,
each round, a bare `python3 -I -c pass` in the same namespace (the floor of any CLI run).
Prints median (min-max) per backend and writes bench/results/change.json. With
`--before DIR` (a source tree of the package, an earlier commit's) each backend also
gets a bed driven by that tree's CLI, in the same alternation: a before/after ratio
that the machine's load moves less than two runs' figures. Only throw-away network
namespaces are touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import measure

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_BACKENDS = "iptables-legacy,iptables-nft,nftables,ebpf"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


BEFORE = " (before)"


def run(names: list[str], prefixes: int, rounds: int, before: str | None = None) -> dict:
    backends = dict.fromkeys(names, None)
    if before:  # each backend also driven by the earlier tree, labelled "<backend> (before)"
        backends = {label: tree for name in names for label, tree in ((name + BEFORE, before), (name, None))}
    names = list(backends)
    samples: dict[str, list[float]] = {n: [] for n in names}
    rss: dict[str, list[float]] = {n: [] for n in names}
    bare: list[float] = []
    plan: list[float] = []
    cold: dict[str, float] = {}
    machine = measure.machine_info()
    with tempfile.TemporaryDirectory(prefix="ipmasq-change-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        measure.warm_bytecode(measure.cli_env(workdir))
        if before:
            measure.warm_bytecode(_from_tree(measure.cli_env(workdir), before))
        nodes = {}
        for name, tree in backends.items():
            bed = stack.enter_context(measure.new_bed())
            node = measure.BenchNode(bed, workdir, 600)
            if tree:
                node.env = _from_tree(node.env, tree)
            stack.callback(node.close)
            stack.callback(node.flush)
            r = node.timed("apply", "--config", node.config(prefixes), "--backend", name.removesuffix(BEFORE))
            if r.code != 0:
                raise RuntimeError(f"apply {name}: {r.stderr.strip()}")
            cold[name] = r.wall
            nodes[name] = node
            _log(f"{name}: {prefixes} prefixes installed in {r.wall:.2f} s")
        for i in range(rounds):
            for extra in (True, False):
                for name, node in nodes.items():
                    r = node.timed("apply", "--config", node.config(prefixes, extra=extra), "--backend",
                                    name.removesuffix(BEFORE))
                    if r.code != 0 or "unchanged" in r.stdout:
                        raise RuntimeError(f"change {name}: exit {r.code}: {(r.stdout + r.stderr).strip()[:300]}")
                    samples[name].append(r.wall)
                    rss[name].append(r.rss_mb)
            node = nodes[names[-1]]  # this checkout's
            b = measure.run_measured(["ip", "netns", "exec", node.bed.node, measure.PYTHON, "-I", "-c", "pass"],
                                     env=node.env)
            bare.append(b.wall)
            # what every backend's change pays before its backend does anything: Python,
            # the CLI's imports, the config and the plan (`plan` touches no kernel state)
            pl = measure.run_measured(node.argv("plan", "--config", node.config(prefixes, extra=True),
                                                "--backend", names[-1]), env=node.env)
            plan.append(pl.wall)
            _log(f"round {i + 1}/{rounds}: " + "; ".join(
                f"{n} {samples[n][-2]:.3f}/{samples[n][-1]:.3f} s" for n in names)
                + f"; plan {pl.wall:.3f} s; python -c pass {b.wall:.3f} s")
    return {"backends": names, "before_tree": before, "prefixes": prefixes, "rounds": rounds, "cold": cold, "samples": samples,
            "rss_mb": rss, "bare_python": bare, "plan": plan, "machine": machine,
            "load_average_end": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _from_tree(env: dict, tree: str) -> dict:
    """The CLI's environment, importing the package from `tree` (measure runs it with
    this checkout as its working directory, which -P/PYTHONSAFEPATH keeps off sys.path)."""
    return {**env, "PYTHONPATH": tree, "PYTHONSAFEPATH": "1"}


def report(res: dict) -> str:
    m = res["machine"]
    lines = [f"one-prefix change at {res['prefixes']:,} prefixes, {res['rounds']} rounds x 2 changes "
             f"({res['started']}; {m.get('cores', '?')} cores, kernel {m.get('kernel', '?')}, load "
             f"{m.get('load_average', '?')} -> {tuple(round(x, 2) for x in res['load_average_end'])})", "",
             "| backend | cold apply | change, median (min-max) | peak MB |", "|---|---|---|---|"]
    for name in res["backends"]:
        s = res["samples"][name]
        ratio = ""
        if name + BEFORE in res["samples"]:
            ratio = f"; {statistics.median(s) / statistics.median(res['samples'][name + BEFORE]):.2f}x before"
        lines.append(f"| {name} | {res['cold'][name]:.2f} s | {statistics.median(s):.3f} s ({min(s):.3f}-{max(s):.3f})"
                     f"{ratio} | {max(res['rss_mb'][name]):.0f} |")
    pl = res["plan"]
    lines.append(f"| `ipmasq plan` of the same config (no kernel) | | {statistics.median(pl):.3f} s "
                 f"({min(pl):.3f}-{max(pl):.3f}) | |")
    b = res["bare_python"]
    lines.append(f"| python3 -I -c pass | | {statistics.median(b):.3f} s ({min(b):.3f}-{max(b):.3f}) | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.change")
    p.add_argument("--backends", default=DEFAULT_BACKENDS)
    p.add_argument("--prefixes", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--before", metavar="DIR", help="a source tree of the package to measure beside this one")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (network namespaces)")
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    names, skipped = measure.available_backends(wanted)
    for name, why in skipped.items():
        _log(f"skipping {name}: {why}")
    if args.before and not (Path(args.before) / "ipmasq_legacy" / "__init__.py").is_file():
        p.error(f"--before {args.before}: no ipmasq_legacy package there")
    res = run(names, args.prefixes, args.rounds, args.before)
    print(report(res))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"change-{args.prefixes}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
