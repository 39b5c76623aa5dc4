"""The exceptions' bench row: 100,000 mixed exempt and force-masquerade prefixes.

`sudo .venv/bin/python -m bench.lpm [--backends a,b] [--quick]`: per backend, in a bed of
its own, apply a config with 50,000 exempt /24s (bench.measure.exempt_prefixes) and
50,000 force-masquerade /25s, the lower half of each /24 (so the verdict table resolves
to 50,000 exempt /25s: the upper halves), then the new-connection cost through the node,
paired with bursts through a bed without netfilter (bench/README.md says how). Also the
plan's resolution alone, in-process. Prints one table; writes nothing. Measured 2026-12-05
(README "Benchmarks"): resolution 0.20 s; a new connection 0.70-1.40x the paired floor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ipmasq_legacy import prefixes, verdicts

from . import measure
from .flows import FlowBench

N = 100_000


def mixed(n: int) -> tuple[list[str], list[str]]:
    exempt = measure.exempt_prefixes(n // 2)
    force = [p.replace(".0/24", ".0/25") for p in exempt if p.endswith(".0/24")]
    exempt = [p for p in exempt if p.endswith(".0/24")]
    extra = n // 2 - len(force)  # the /32s exempt_prefixes mixes in: more /24s to reach n
    more = [p for p in measure.exempt_prefixes(n // 2 + 2 * extra)[n // 2:] if p.endswith(".0/24")][:extra]
    return exempt + more, force + [p.replace(".0/24", ".0/25") for p in more]


def resolve_time(n: int, repeats: int = 5) -> tuple[float, int]:
    exempt, force = mixed(n)
    ex, fo = prefixes.parse_batch(exempt, 4), prefixes.parse_batch(force, 4)
    times, out = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        out = verdicts.resolve(4, [("native", ex)], [("force", fo)])
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(out)


def write_config(path: Path, n: int) -> str:
    exempt, force = mixed(n)
    lines = [f"ipv4-pod-cidr: [{measure.POD_CIDR}]", "enable-ipv6-masquerade: false", "ipv4-native-routing-cidr:"]
    lines += [f"  - {p}" for p in exempt] + ["force-masquerade-cidrs:"] + [f"  - {p}" for p in force]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lpm", description=__doc__.splitlines()[0])
    ap.add_argument("--backends", help="comma-separated backends (default: every available one)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args(argv)
    s = measure.settings_for(args.quick)
    names, skipped = measure.available_backends(args.backends.split(",") if args.backends else None)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    seconds, count = resolve_time(N)
    print(f"plan: {N:,} mixed prefixes resolve to {count:,} exempt prefixes in {seconds:.2f} s (median of 5)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ipmq-bench-lpm-") as tmp, measure.new_bed() as floor_bed:
        workdir = Path(tmp)
        floor = FlowBench(floor_bed, s.conn_max_packets)
        try:
            for name in names:
                with measure.new_bed() as bed:
                    node = measure.BenchNode(bed, workdir, s.step_timeout * 2)
                    flows = FlowBench(bed, s.conn_max_packets)
                    try:
                        run = node.timed("apply", "--config", write_config(node.dir / "mixed.yaml", N),
                                          "--backend", name)
                        if run.code != 0:
                            rows.append((name, f"apply failed: {run.stderr.strip()[:120]}", "", ""))
                            continue
                        conn = flows.measure(s, floor)
                        rows.append((name, f"{run.wall:.2f} s", f"{conn['us_per_conn']:.2f}",
                                     f"{conn.get('ratio', float('nan')):.2f}x"))
                        node.flush()
                    finally:
                        flows.close()
                        node.close()
        finally:
            floor.close()
    print(f"\n| backend | apply, {N:,} mixed | µs per new connection | vs floor |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
