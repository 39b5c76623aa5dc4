"""Backends head to head, round after round, on beds side by side.

    sudo .venv/bin/python -m bench.pair                    # nftables against ebpf, 100,000 prefixes
    sudo .venv/bin/python -m bench.pair --backends iptables-nft,nftables --rounds 7
    sudo .venv/bin/python -m bench.pair --backends nftables,ebpf,ebpf-fast   # each against the first

`ebpf-fast` is the ebpf backend with `ebpf-conntrack: false` in its config (the fast path);
`floor` a bed where nothing is applied (plain forwarding: no netfilter, no BPF), the ceiling
of every throughput figure.

The full benchmark measures each backend once, minutes apart; on a shared 2-core machine
its speed drifts more than a NAT engine costs. Here both beds carry the same config and
are measured in alternation (A, B, A, B, ...), and each round's B/A ratio is taken, so
drift cancels out: new-connection cost (one burst of new UDP flows each) and TCP
throughput (iperf3, 1 and 4 streams). It prints a table and writes
bench/results/pair.json. Only throw-away network namespaces are touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import measure
from .flows import FlowBench, _iperf

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


VARIANTS = {"ebpf-fast": ("ebpf", "ebpf-conntrack: false\n"),  # name -> (backend, config lines added)
            "floor": (None, "")}


def run(names: list[str], prefixes: int, rounds: int, seconds: int, bursts: int = 1) -> dict:
    s = measure.Settings(**{**vars(measure.settings_for(False)), "throughput_seconds": seconds})
    samples: dict[str, dict[str, list[float]]] = {n: {"conn_us": [], "tcp1": [], "tcp4": []} for n in names}
    with tempfile.TemporaryDirectory(prefix="ipmasq-pair-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        measure.warm_bytecode(measure.cli_env(workdir))
        beds, flows = {}, {}
        for name in names:
            bed = stack.enter_context(measure.new_bed())
            node = measure.BenchNode(bed, workdir, 120)
            stack.callback(node.close)
            stack.callback(node.flush)
            backend, extra = VARIANTS.get(name, (name, ""))
            config = Path(node.config(prefixes))
            if extra:
                config = config.with_name(f"{name}-{config.name}")
                config.write_text(Path(node.config(prefixes)).read_text() + extra)
            if backend is not None:
                r = node.timed("apply", "--config", str(config), "--backend", backend)
                if r.code != 0:
                    raise RuntimeError(f"apply {name}: {r.stderr.strip()}")
            beds[name] = bed
            flows[name] = FlowBench(bed, s.conn_max_packets)
            stack.callback(flows[name].close)
            stack.enter_context(measure._IperfServer(bed))
            _log(f"{name}: {prefixes} prefixes installed")
        plan = {name: flows[name].calibrate(s) for name in names}
        n = min(p[0] for p in plan.values())
        for i in range(rounds):
            per: dict[str, list[float]] = {name: [] for name in names}
            for _ in range(bursts):  # interleaved; the round keeps the least disturbed (the fastest)
                for name in names:
                    per[name].append(flows[name].one(n, plan[name][1])[0])
            for name in names:
                samples[name]["conn_us"].append(min(per[name]))
            for streams in (1, 4):
                for name in names:
                    samples[name][f"tcp{streams}"].append(_iperf(beds[name], seconds, streams)["gbit_s"])
            _log(f"round {i + 1}/{rounds}: " + "; ".join(
                f"{name} {samples[name]['conn_us'][-1]:.2f} µs, {samples[name]['tcp1'][-1]:.1f}/"
                f"{samples[name]['tcp4'][-1]:.1f} Gbit/s" for name in names))
    a = names[0]
    ratios = {b: {k: [y / x for x, y in zip(samples[a][k], samples[b][k])] for k in ("conn_us", "tcp1", "tcp4")}
              for b in names[1:]}
    return {"backends": names, "prefixes": prefixes, "rounds": rounds, "seconds": seconds, "bursts": bursts,
            "machine": measure.machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "samples": samples, "ratios": ratios}


def report(res: dict) -> str:
    a, *others = res["backends"]
    rows = [("new connection, µs per flow (lower is better)", "conn_us"),
            ("TCP 1 stream, Gbit/s", "tcp1"), ("TCP 4 streams, Gbit/s", "tcp4")]
    m = res["machine"]
    ratios = res["ratios"] if len(others) > 1 or others[0] in res["ratios"] else {others[0]: res["ratios"]}
    lines = [f"{a} against {', '.join(others)}: {res['prefixes']:,} exempt prefixes, {res['rounds']} rounds in "
             f"alternation ({res['started']}; {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
             f"kernel {m.get('kernel', '?')})",
             "",
             f"| measure | {a} (median) | " + " | ".join(f"{b} (median) | {b} / {a}, per round: median (min-max)"
                                                    for b in others) + " |",
             "|---|---|" + "---|---|" * len(others)]
    for title, key in rows:
        cells = []
        for b in others:
            r = ratios[b][key]
            cells.append(f"{statistics.median(res['samples'][b][key]):.2f} | "
                         f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})")
        lines.append(f"| {title} | {statistics.median(res['samples'][a][key]):.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pair", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="nftables,ebpf",
                   help="A,B[,C...]: each measured against A (default: nftables,ebpf); ebpf-fast: ebpf with "
                        "ebpf-conntrack: false; floor: nothing applied")
    p.add_argument("--prefixes", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=5, help="per iperf3 run")
    p.add_argument("--bursts", type=int, default=1,
                   help="bursts of new flows per backend and round, interleaved; the round keeps the fastest "
                        "(on a loaded machine other work only ever adds to a burst's time)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    names = args.backends.split(",")
    if len(names) < 2:
        p.error("--backends takes at least two names")
    _, skipped = measure.available_backends(sorted({VARIANTS.get(n, (n,))[0] for n in names} - {None}))
    if skipped:
        p.error("; ".join(f"{k}: {v}" for k, v in skipped.items()))
    res = run(names, args.prefixes, args.rounds, args.seconds, args.bursts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pair.json").write_text(json.dumps(res, indent=2))
    print(report(res))
    print(f"\nwrote {out / 'pair.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
