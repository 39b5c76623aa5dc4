"""Small configs, scrapes and status (README "Benchmarks"), as ratios measured in the same run (python -m bench.targets, or
the `targets` table of python -m bench):

* small configs (10 prefixes): cold apply, no-op reconcile and one-prefix change, each
  run alternating with its floor: a bare `python -I -c pass` plus the bare commands
  the backend needs, run as processes of their own on an empty node of a second bed
  (what a compiled agent would run): the commands `ipmasq plan` prints for the config
  (nftables: `nft -f -` per transaction; iptables: `ipset restore` and
  `ip(6)tables-restore --noflush -w` per family); ebpf: `bpftool prog loadall` of the
  object (cold apply only: the programs stay loaded otherwise), the conntrack keeper's
  `nft -f -` and an assist-sized `ip(6)tables-restore` per family. Target: <= 2x.
  Each is measured twice: wall time (fork to reap) and CPU time (user + system of the
  process and the tools it ran); on a machine loaded by others the CPU ratio is the
  steadier one (a wall ratio there counts waits for a CPU).
* at `big` prefixes (100,000; quick: 10,000): a /metrics scrape of a `watch` agent
  (ms each, 20 scrapes; the agent's RSS before and after them; target < 50 ms and no
  growth) and `status` as a whole process (target < 0.3 s), each beside a bare
  `python -I -c pass` measured alternately.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import measure

BARE_PYTHON = getattr(sys, "_base_executable", None) or sys.executable
SCRAPES = 20


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(node: measure.BenchNode, argv: list[str], input: str | None = None) -> tuple[float, float]:
    """(wall, CPU) of one command in the node, fork to reap (a bare tool: not through the
    launcher's RSS bookkeeping, which it does not need); CPU as the CLI's (user + system,
    `ip netns exec` included in both)."""
    full = ["ip", "netns", "exec", node.bed.node, *argv]
    cpu = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(full, input=input, capture_output=True, text=True, env=node.env, timeout=120)
    wall = time.perf_counter() - start
    cpu = _children_cpu() - cpu
    if proc.returncode != 0:
        raise RuntimeError(f"floor command {' '.join(argv)} failed: {proc.stderr.strip()[:300]}")
    return wall, cpu


def _wall(node: measure.BenchNode, argv: list[str], input: str | None = None) -> float:
    return _timed(node, argv, input)[0]


def floor_commands(node: measure.BenchNode, backend: str, config: str) -> list[tuple[list[str], str]]:
    """[(argv, stdin)]: the bare commands installing `config` on an empty node, as
    `ipmasq plan` names them (comment lines `# IPvN: COMMAND ...` head each input)."""
    if backend == "ebpf":
        keeper = ("table inet bench_keeper {\n\tchain conntrack {\n"
                  "\t\ttype filter hook prerouting priority filter; policy accept;\n"
                  "\t\tct state untracked accept\n\t}\n}\n")
        out = [(["nft", "-f", "-"], keeper)]
        for tool in ("iptables-nft-restore", "ip6tables-nft-restore"):
            out.append(([tool, "--noflush", "-w"], "*nat\n:BENCH-EBPF - [0:0]\n-A BENCH-EBPF ! -o lo -j MASQUERADE\n"
                                                   "-A POSTROUTING -j BENCH-EBPF\nCOMMIT\n"))
        return out
    r = node.timed("plan", "--config", config, "--backend", backend)
    if r.code != 0:
        raise RuntimeError(f"plan failed: {r.stderr.strip()[:300]}")
    out: list[tuple[list[str], str]] = []
    for line in r.stdout.splitlines():
        m = re.match(r"# IPv[46]: .*?(nft -f -|ipset restore|ip6?tables-\S+-restore --noflush -w)", line)
        if m:
            out.append((m.group(1).split(), ""))
        elif out and not line.startswith("#"):
            out[-1] = (out[-1][0], out[-1][1] + line + "\n")
    if not out:
        raise RuntimeError(f"no commands found in the plan of {backend}")
    return out


def _floor_reset(node: measure.BenchNode, backend: str) -> None:
    """An empty node for the floor's commands (untimed)."""
    node.flush()
    if backend == "ebpf":
        subprocess.run(["ip", "netns", "exec", node.bed.node, "sh", "-c",
                        "nft delete table inet bench_keeper; for t in iptables-nft ip6tables-nft; do "
                        "$t -w -t nat -D POSTROUTING -j BENCH-EBPF; $t -w -t nat -F BENCH-EBPF; "
                        "$t -w -t nat -X BENCH-EBPF; done; rm -rf " + str(node.dir / "progs")],
                       capture_output=True)


def _floor_once(node: measure.BenchNode, backend: str, commands, step: str) -> tuple[float, float]:
    """(wall, CPU) of the floor's commands, summed."""
    _floor_reset(node, backend)
    runs = [_timed(node, [BARE_PYTHON, "-I", "-c", "pass"])]
    if backend == "ebpf" and step == "cold" and node.bpffs is not None:
        obj = str(measure.REPO / "ipmasq_legacy" / "bpf" / "masq.o")
        runs.append(_timed(node, ["bpftool", "prog", "loadall", obj, str(node.bpffs / "bench-progs"), "type",
                                  "classifier"]))
        subprocess.run(["rm", "-rf", str(node.bpffs / "bench-progs")], capture_output=True)
    for argv, text in commands:
        runs.append(_timed(node, argv, input=text))
    return sum(w for w, _ in runs), sum(c for _, c in runs)


def small_configs(backend: str, workdir: Path, rounds: int, log) -> dict:
    """cold / noop / change at 10 prefixes, each round: the step, then its floor."""
    out: dict = {step: {"cli": [], "floor": [], "cli_cpu": [], "floor_cpu": []} for step in measure.STEPS}
    with measure.new_bed() as bed, measure.new_bed() as floor_bed:
        node = measure.BenchNode(bed, workdir, 60)
        floor = measure.BenchNode(floor_bed, workdir, 60)
        try:
            commands = {False: floor_commands(floor, backend, floor.config(10)),
                        True: floor_commands(floor, backend, floor.config(10, extra=True))}
            args = {"cold": ("apply", "--config", node.config(10), "--backend", backend),
                    "noop": ("reconcile", "--config", node.config(10), "--backend", backend),
                    "change": ("apply", "--config", node.config(10, extra=True), "--backend", backend)}
            for _ in range(rounds):
                node.flush()
                for step in measure.STEPS:
                    if step == "noop":
                        node.timed(*args[step])  # the first after an apply verifies; the next is the no-op
                    r = node.timed(*args[step])
                    why = measure._check(step, r, 10)
                    if why:
                        out[step]["problem"] = why
                    out[step]["cli"].append(r.wall)
                    out[step]["cli_cpu"].append(r.cpu)
                    wall, cpu = _floor_once(floor, backend, commands[step == "change"], step)
                    out[step]["floor"].append(wall)
                    out[step]["floor_cpu"].append(cpu)
            for step in measure.STEPS:
                st = out[step]
                st["ratio"] = statistics.median(c / f for c, f in zip(st["cli"], st["floor"]))
                st["cpu_ratio"] = statistics.median(c / f for c, f in zip(st["cli_cpu"], st["floor_cpu"]))
                log(f"  {backend} 10 {measure.STEP_TITLES[step]}: {statistics.median(st['cli']) * 1000:.0f} ms, "
                    f"floor {statistics.median(st['floor']) * 1000:.0f} ms, {st['ratio']:.2f}x; CPU "
                    f"{statistics.median(st['cli_cpu']) * 1000:.0f} ms, floor "
                    f"{statistics.median(st['floor_cpu']) * 1000:.0f} ms, {st['cpu_ratio']:.2f}x")
            floor.flush()
            node.flush()
        finally:
            node.close()
            floor.close()
    return out


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _get(bed, url: str, timeout: float = 30.0) -> tuple[int, bytes, float]:
    def fetch():
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = resp.read()
                return resp.status, body, time.perf_counter() - start
        except urllib.error.HTTPError as exc:
            return exc.code, b"", time.perf_counter() - start

    return bed.in_netns(bed.node, fetch)


def at_scale(backend: str, n: int, workdir: Path, rounds: int, log) -> dict:
    """A watch agent's scrapes and `status` at n prefixes."""
    out: dict = {"prefixes": n}
    with measure.new_bed() as bed:
        node = measure.BenchNode(bed, workdir, 300)
        agent = None
        try:
            config = node.config(n)
            port = 19847
            argv = node.argv("watch", "--config", config, "--backend", backend, "--metrics-port", str(port),
                             "--metrics-address", "127.0.0.1")
            agent = subprocess.Popen(argv, env=node.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     cwd=measure.REPO, start_new_session=True)
            deadline = time.monotonic() + 300
            while True:
                if agent.poll() is not None:
                    raise RuntimeError(f"watch exited: {agent.stderr.read().decode()[:300]}")
                try:
                    if _get(bed, f"http://127.0.0.1:{port}/healthz", 2)[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("watch did not come up")
                time.sleep(0.2)
            time.sleep(0.5)
            before = _rss_kb(agent.pid)
            scrapes, sizes = [], []
            for _ in range(SCRAPES):
                code, body, secs = _get(bed, f"http://127.0.0.1:{port}/metrics")
                if code != 200 or b"ipmasq_masqueraded_packets_total" not in body:
                    out["scrape_problem"] = f"HTTP {code}, {len(body)} bytes"
                scrapes.append(secs)
                sizes.append(len(body))
            after = _rss_kb(agent.pid)
            out.update(scrape_ms=[s * 1000 for s in scrapes], rss_before_mb=before / 1024, rss_after_mb=after / 1024)
            log(f"  {backend} {n} scrape: median {statistics.median(scrapes) * 1000:.1f} ms, RSS "
                f"{before / 1024:.0f} -> {after / 1024:.0f} MB over {SCRAPES} scrapes")
            agent.terminate()
            agent.wait(30)
            agent = None
            # status as cron's steady state sees it: after an apply and the reconcile that verified it
            node.timed("reconcile", "--config", config, "--backend", backend)
            node.timed("reconcile", "--config", config, "--backend", backend)
            status, floor, status_cpu, floor_cpu = [], [], [], []
            for _ in range(rounds):
                r = node.timed("status", "--config", config, "--backend", backend)
                if r.code != 0 or "State: in sync" not in r.stdout:
                    out["status_problem"] = (r.stdout + r.stderr).strip()[-300:]
                status.append(r.wall)
                status_cpu.append(r.cpu)
                wall, cpu = _timed(node, [BARE_PYTHON, "-I", "-c", "pass"])
                floor.append(wall)
                floor_cpu.append(cpu)
            deep = node.timed("status", "--deep", "--config", config, "--backend", backend)
            out.update(status_s=status, status_floor_s=floor, status_cpu_s=status_cpu, status_floor_cpu_s=floor_cpu,
                       status_deep_s=deep.wall, status_deep_rss_mb=deep.rss_mb)
            log(f"  {backend} {n} status: median {statistics.median(status):.3f} s (python -I -c pass "
                f"{statistics.median(floor):.3f} s), CPU {statistics.median(status_cpu):.3f} s "
                f"({statistics.median(floor_cpu):.3f} s); --deep {deep.wall:.2f} s")
            node.flush()
        finally:
            if agent is not None:
                agent.kill()
                agent.wait()
            node.close()
    return out


def run(names: list[str], quick: bool, log, workdir: Path, rounds: int | None = None) -> dict:
    rounds = rounds or (3 if quick else 5)
    big = 10_000 if quick else 100_000
    res: dict = {"rounds": rounds, "big": big, "small": {}, "scale": {}}
    for name in names:
        log(f"targets: {name}, 10 prefixes, against the bare commands")
        try:
            res["small"][name] = small_configs(name, workdir, rounds, log)
        except Exception as exc:
            res["small"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"  FAILED: {exc}")
        log(f"targets: {name}, scrapes and status at {big:,} prefixes")
        try:
            res["scale"][name] = at_scale(name, big, workdir, rounds, log)
        except Exception as exc:
            res["scale"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"  FAILED: {exc}")
    return res


def render(res: dict) -> str:
    def ms(x):
        return f"{x * 1000:.0f}"

    lines = [f"Targets ({res['rounds']} rounds, each CLI run beside its floor; median; ratio = median of "
             "per-round ratios)", "",
             "| backend | step (10 prefixes) | CLI ms | floor ms | ratio | CLI CPU ms | floor CPU ms | CPU ratio "
             "| target <= 2x (wall; CPU) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, steps in res["small"].items():
        if "error" in steps:
            lines.append(f"| {name} | | | | | FAIL: {steps['error'][:80]} |")
            continue
        for step in measure.STEPS:
            st = steps[step]
            def verdict(ratio):
                return "PASS" if ratio <= 2 else f"MISS ({ratio / 2:.2f}x over)"

            cpu = st.get("cpu_ratio")
            verdicts = "FAIL: " + st["problem"][:60] if st.get("problem") else (
                verdict(st["ratio"]) + "; " + (verdict(cpu) if cpu is not None else "-"))
            cpu_cells = (f"{ms(statistics.median(st['cli_cpu']))} | {ms(statistics.median(st['floor_cpu']))} | "
                         f"{cpu:.2f}x" if cpu is not None else "- | - | -")
            lines.append(f"| {name} | {measure.STEP_TITLES[step]} | {ms(statistics.median(st['cli']))} | "
                         f"{ms(statistics.median(st['floor']))} | {st['ratio']:.2f}x | {cpu_cells} | {verdicts} |")
    lines += ["", f"| backend | scrape at {res['big']:,} (median, max ms) | RSS before -> after {SCRAPES} scrapes | "
              "status s (python -I -c pass s) | status CPU s (python -I -c pass) | status --deep s | "
              "targets: scrape < 50 ms, no growth; status < 0.3 s |",
              "|---|---|---|---|---|---|---|"]
    for name, st in res["scale"].items():
        if "error" in st:
            lines.append(f"| {name} | | | | | | FAIL: {st['error'][:80]} |")
            continue
        scrape = statistics.median(st["scrape_ms"])
        status = statistics.median(st["status_s"])
        grew = st["rss_after_mb"] - st["rss_before_mb"]
        verdicts = ["scrape " + ("PASS" if scrape < 50 else "MISS"), "RSS " + ("PASS" if grew < 2 else "MISS"),
                    "status " + ("PASS" if status < 0.3 else "MISS")]
        if st.get("scrape_problem") or st.get("status_problem"):
            verdicts.append("FAIL: " + (st.get("scrape_problem") or st.get("status_problem"))[:60])
        cpu = (f"{statistics.median(st['status_cpu_s']):.3f} ({statistics.median(st['status_floor_cpu_s']):.3f})"
               if st.get("status_cpu_s") else "-")
        lines.append(f"| {name} | {scrape:.1f}, {max(st['scrape_ms']):.1f} | {st['rss_before_mb']:.0f} -> "
                     f"{st['rss_after_mb']:.0f} MB | {status:.3f} ({statistics.median(st['status_floor_s']):.3f}) | "
                     f"{cpu} | {st['status_deep_s']:.2f} | {', '.join(verdicts)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--backends")
    p.add_argument("--rounds", type=int, help="rounds per figure (default: 3 with --quick, else 5)")
    p.add_argument("--out", default=str(measure.REPO / "bench" / "results"))
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root")
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    names, skipped = measure.available_backends(wanted)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ipmasq-bench-") as tmp:
        workdir = Path(tmp)
        measure.warm_bytecode(measure.cli_env(workdir))
        res = run(names, args.quick, log, workdir, args.rounds)
    res["load_average"] = [load, os.getloadavg()]
    print(render(res))
    print(f"\nload average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "targets.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
