"""python -m bench [--quick] [--backends a,b] [--out DIR]

Benchmarks ipmasq-legacy inside throw-away network namespaces (needs root), prints one
table per measurement and writes DIR/results.json and DIR/bench.png.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import measure, report, targets
from .flows import FlowBench

DEFAULT_OUT = measure.REPO / "bench" / "results"


def _logger(t0: float):
    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return log


def run(s: measure.Settings, names: list[str], skipped: dict[str, str], log) -> dict:
    t0 = time.monotonic()
    results: dict = {"meta": {"mode": "quick" if s.quick else "full", "settings": vars(s),
                              "machine": measure.machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S")},
                     "skipped_backends": skipped, "backends": {}}
    for name, why in skipped.items():
        log(f"skipping backend {name}: {why}")
    before = measure.host_snapshot()
    with tempfile.TemporaryDirectory(prefix="ipmasq-bench-") as tmp:
        workdir = Path(tmp)
        measure.warm_bytecode(measure.cli_env(workdir))

        def attempt(what: str, fn, *args, default=None):
            """One suite, tried twice (on a shared machine a bed can be broken under us);
            a second failure is recorded and logged, and the run goes on."""
            log(what)
            for tries in (1, 2):
                try:
                    return fn(*args)
                except Exception as exc:
                    log(f"  FAILED{' (trying once more)' if tries == 1 else ''}: {type(exc).__name__}: {exc}")
                    error = f"{type(exc).__name__}: {exc}"
            return {"error": error, **(default or {})}

        # The floor's bed lives through the whole run and never gets a netfilter rule: every
        # new-connection figure is measured in alternation with a burst there.
        with measure.new_bed() as floor_bed:
            floor = FlowBench(floor_bed, s.conn_max_packets)
            try:
                results["startup"] = attempt("CLI start-up cost", measure.measure_startup, workdir, floor_bed)
                results["plan"] = attempt("ipmasq plan (no kernel access)", measure.measure_plan, workdir, s, names,
                                          log)
                results["reference"] = attempt(
                    "references: no netfilter at all (the floor); a nat chain with no rules; one masquerade rule",
                    measure.reference_suite, s, log, floor_bed, floor)
                results["ip_masq_agent"] = attempt("reference: ip-masq-agent's rule layout",
                                                   measure.ip_masq_agent_suite, s, workdir, log, floor,
                                                   default={"sizes": {}})
                for name in names:
                    results["backends"][name] = attempt(f"backend {name}", measure.backend_suite, name, s, workdir,
                                                        log, floor)
                results["targets"] = attempt("targets: small configs against the bare commands; "
                                             "scrapes and status at scale", targets.run, names, s.quick, log, workdir)
                end = attempt("the floor again (drift of the machine over the run)",
                              measure.floor_suite, s, log, floor_bed, floor)
                if "floor" in end:
                    results["reference"]["floor_end"] = end["floor"]
                    results["reference"]["floor_end_throughput"] = end["floor_throughput"]
            finally:
                floor.close()

    changed = measure.host_diff(before, measure.host_snapshot())
    results["meta"]["host_namespace_changed"] = changed
    results["meta"]["duration_s"] = time.monotonic() - t0
    results["meta"]["machine"]["load_average_end"] = os.getloadavg()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="sizes up to 10,000 prefixes, fewer repeats (< 2 min)")
    p.add_argument("--backends", help="comma-separated backends (default: every one ipmasq_legacy knows)")
    p.add_argument("--sizes", help="comma-separated prefix counts (default: 10,1000,10000[,100000,1000000])")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default: {DEFAULT_OUT})")
    args = p.parse_args(argv)

    if os.geteuid() != 0:
        p.error("needs root: every measurement but `plan` runs in network namespaces it builds")
    s = measure.settings_for(args.quick)
    if args.sizes:
        s = measure.Settings(**{**vars(s), "sizes": tuple(int(x) for x in args.sizes.split(",") if x)})
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    names, skipped = measure.available_backends(wanted)

    # SIGTERM unwinds like Ctrl-C, so every bed is deleted on the way out.  Only in this
    # process: a forked helper (pyroute2 forks to make namespaces, then SIGTERMs the child)
    # must die at once, not run our exit handlers (they would delete the live beds).
    main_pid = os.getpid()

    def on_sigterm(*_):
        if os.getpid() != main_pid:
            os._exit(143)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    results = run(s, names, skipped, _logger(time.monotonic()))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(report.render(results))
    if "small" in results.get("targets", {}):
        print("\n" + targets.render(results["targets"]))
    report.write_json(results, out / "results.json")
    plotted = report.plot(results, out / "bench.png")
    print(f"\nwrote {out / 'results.json'}" + (f" and {out / 'bench.png'}" if plotted else
                                               " (no plot: matplotlib is not installed; pip install matplotlib)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
