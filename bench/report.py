"""Tables, targets, JSON and the plot, from the results dict that bench/__main__.py builds."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .measure import STEP_TITLES, STEPS

# The targets the numbers are held against (PASS/MISS).
TARGET_SIZE = 100_000
TARGET_TIME = {"cold": 1.5, "noop": 0.3, "change": 0.3}  # seconds, whole CLI process
TARGET_RSS_MB = 150.0
# New-connection cost at 100,000 prefixes over the floor: masquerading with no
# exemptions at all (one masquerade rule). The bed with no netfilter is shown too, to
# see what NAT itself costs.
TARGET_CONN_RATIO = 1.2

PHASE_ROWS = [  # (label in phases.py, shown as); indentation shows nesting (times are inclusive)
    ("config.load", "config.load"),
    ("yaml", "  reading the config text (YAML fast path, libyaml)"),
    ("config.parse_networks", "  parse CIDRs (integers, batched)"),
    ("agent.sync", "agent.sync"),
    ("plan.build", "  plan.build"),
    ("plan.normalise", "    plan.normalise (merge, one sort)"),
    ("backend.drift", "  backend.drift (reconcile: read + compare)"),
    ("backend.apply", "  backend.apply (read + compare + write)"),
    ("backend.live", "    backend.live (read what we own)"),
    ("nft.parse_table", "      parse nft listing"),
    ("ipset._normalised_members", "      normalise ipset members"),
    ("render", "    render (set/table/restore text)"),
    ("subprocess.run", "external tools, all (iptables/ipset/nft)"),
    ("libnftables", "libnftables calls, all"),
]


# ---------------------------------------------------------------- formatting


def table(title: str, headers: list[str], rows: list[list], left: int = 1, left_last: bool = False) -> str:
    """Plain-text table; the first `left` columns (and with `left_last` the last one) are
    left-aligned, the rest right-aligned."""
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    last = len(headers) - 1

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left or (left_last and i == last) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([f"\n{title}", line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _s(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def _n(n) -> str:
    return f"{int(n):,}"


def floor_us(results: dict) -> float | None:
    ref = results.get("reference", {})
    samples = ref.get("floor", {}).get("samples", []) + ref.get("floor_end", {}).get("samples", [])
    return statistics.median(samples) if samples else None


# ---------------------------------------------------------------- targets


def apply_verdict(step: str, n: int, st: dict) -> tuple[str, list[str]]:
    """('PASS'|'MISS'|'-', reasons) for one apply row."""
    misses, checked = [], False
    problem = st.get("problem") or ""
    if problem.startswith(("exit", "timeout", "changed nothing", "not silent")):
        return "FAIL", []  # the run did not do its job: its time says nothing (the problem is in the notes)
    if st.get("median") is None:
        if n == TARGET_SIZE and st.get("timeout"):
            return "MISS", ["timed out"]
        return "-", []
    if n == TARGET_SIZE:
        checked = True
        limit = TARGET_TIME[step]
        if st["median"] >= limit:
            misses.append(f"{st['median']:.2f} s vs < {limit} s ({st['median'] / limit:.1f}x)")
    if st.get("rss_mb") is not None:
        checked = True
        if st["rss_mb"] >= TARGET_RSS_MB:
            misses.append(f"{st['rss_mb']:.0f} MB vs < {TARGET_RSS_MB:.0f} MB")
    if not checked:
        return "-", []
    return ("MISS", misses) if misses else ("PASS", [])


def conn_vs_no_exemptions(results: dict, c: dict) -> float | None:
    """A row's new-connection cost over one masquerade rule with no exemptions, both taken
    in no-netfilter floors measured alongside (so a slow moment of the machine is no cost)."""
    masq = results.get("reference", {}).get("masquerade_only", {})
    floor = floor_us(results)
    ratio = c.get("ratio") or (c["us_per_conn"] / floor if floor else None)
    if ratio and masq.get("ratio"):
        return ratio / masq["ratio"]
    return c["us_per_conn"] / masq["us_per_conn"] if masq.get("us_per_conn") else None


def target_summary(results: dict) -> list[list]:
    rows = []
    for name, b in results.get("backends", {}).items():
        if "error" in b:
            rows.append([name, "all", "ERROR", b["error"]])
            continue
        at = b["apply"].get(TARGET_SIZE) or b["apply"].get(str(TARGET_SIZE))
        for step in STEPS:
            what = f"{STEP_TITLES[step]} at {_n(TARGET_SIZE)} < {TARGET_TIME[step]} s"
            if not at:
                rows.append([name, what, "not measured", "(quick mode or --sizes)"])
                continue
            st = at[step]
            if st.get("problem") or st.get("median") is None:
                timed_out = st.get("timeout") or (st.get("problem") or "").startswith(("timeout", "skipped"))
                rows.append([name, what, "MISS" if timed_out else "FAIL",
                             st.get("problem") or ("timed out" if timed_out else "no data")])
                continue
            ok = st["median"] < TARGET_TIME[step]
            rows.append([name, what, "PASS" if ok else "MISS",
                         f"{st['median']:.3f} s ({st['median'] / TARGET_TIME[step]:.1f}x the target)"])
        peak = max((st.get("rss_mb") or 0 for per in b["apply"].values() for st in per.values()), default=0)
        rows.append([name, f"peak memory < {TARGET_RSS_MB:.0f} MB (every step, every size)",
                     "PASS" if peak < TARGET_RSS_MB else "MISS", f"{peak:.0f} MB"])
        conn = b["conn"].get(TARGET_SIZE) or b["conn"].get(str(TARGET_SIZE))
        what = f"new connection at {_n(TARGET_SIZE)} <= {TARGET_CONN_RATIO}x no exemptions"
        ratio = conn_vs_no_exemptions(results, conn) if conn else None
        if ratio:
            rows.append([name, what, "PASS" if ratio <= TARGET_CONN_RATIO else "MISS",
                         f"{conn['us_per_conn']:.2f} µs = {ratio:.2f}x one masquerade rule with no exemptions"])
        else:
            why = "cold apply failed" if at and (at["cold"].get("problem") or at["cold"].get("median") is None) else ""
            rows.append([name, what, "not measured", why])
    return rows


# ---------------------------------------------------------------- the report


def render(results: dict) -> str:
    parts = [_machine(results), _startup(results), _plan(results), _apply(results), _breakdown(results),
             _conn(results), _throughput(results),
             table("Targets", ["backend", "target", "result", "measured"], target_summary(results), left=4)]
    return "\n".join(p for p in parts if p)


def _machine(results: dict) -> str:
    meta = results["meta"]
    m = meta["machine"]
    lines = [
        f"ipmasq-legacy benchmarks ({meta['mode']} mode, {meta.get('duration_s', 0):.0f} s, started {meta['started']})",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, kernel {m['kernel']}, Python {m['python']}",
        f"load average at start {', '.join(f'{x:.2f}' for x in m['load_average'])}; at end "
        f"{', '.join(f'{x:.2f}' for x in m.get('load_average_end', ()))}",
        f"code: {m['git']}; nftables backend talks through {m['nftables_driver']}",
        "tools: " + "; ".join(f"{v}" for v in m["tools"].values()),
        "machine's own network namespace: " + ("unchanged" if not meta.get("host_namespace_changed")
                                              else "CHANGED: " + ", ".join(meta["host_namespace_changed"])),
    ]
    for name, why in results.get("skipped_backends", {}).items():
        lines.append(f"skipped backend {name}: {why}")
    return "\n".join(lines)


def _startup(results: dict) -> str:
    rows = [[name, _ms(st["median"]), _ms(st["min"]), _ms(st["max"]), _s(st["rss_mb"], 1)]
            for name, st in results.get("startup", {}).items()]
    return table("Start-up cost of a process in the node namespace (ms; 5 runs)",
                 ["command (ip netns exec NODE ...)", "median", "min", "max", "peak RSS MB"], rows)


def _plan(results: dict) -> str:
    plan = results.get("plan")
    if not plan:
        return ""
    d = plan["default"]
    rows = [["(default config)", "auto", "-", _s(d["median"]), _s(d["min"]), _s(d["max"]), d["n"],
             _s(d["rss_mb"], 0), "ok" if plan.get("default_ok") else "FAILED"]]
    for name, sizes in plan["sizes"].items():
        for n, st in sizes.items():
            rows.append(["", name, _n(n), _s(st["median"]), _s(st["min"]), _s(st["max"]), st["n"],
                         _s(st["rss_mb"], 0), "timeout" if st.get("timeout") else ""])
    return table("ipmasq plan: wall time of the whole process (s), no kernel access",
                 ["config", "backend", "prefixes", "median", "min", "max", "n", "peak RSS MB", ""], rows, left=2)


def _apply(results: dict) -> str:
    rows = []
    for name, b in results.get("backends", {}).items():
        if "error" in b:
            rows.append([name, "", "ERROR: " + b["error"]] + [""] * 7)
            continue
        for n, per in b["apply"].items():
            for step in STEPS:
                st = per[step]
                verdict, why = apply_verdict(step, int(n), st)
                note = "; ".join(why) if why else ""
                if st.get("problem"):
                    note = (note + "; " if note else "") + st["problem"]
                rows.append([name, _n(n), STEP_TITLES[step], _s(st.get("median")), _s(st.get("min")),
                             _s(st.get("max")), st.get("n", 0), _s(st.get("rss_mb"), 0), verdict, note])
    return table(f"CLI cost in the node namespace: wall time (s, Python start included) and peak RSS; targets "
                 f"at {_n(TARGET_SIZE)}: cold < {TARGET_TIME['cold']} s, no-op/change < {TARGET_TIME['noop']} s; "
                 f"RSS < {TARGET_RSS_MB:.0f} MB",
                 ["backend", "prefixes", "step", "median", "min", "max", "n", "RSS MB", "target", "why / notes"],
                 rows, left=3, left_last=True)


def _breakdown(results: dict) -> str:
    out = []
    named = {name: b.get("breakdown") for name, b in results.get("backends", {}).items() if b.get("breakdown")}
    if not named:
        return ""
    for step in STEPS:
        cols = [(name, bd[step]) for name, bd in named.items() if isinstance(bd.get(step), dict)]
        if not cols:
            continue
        rows = [["wall (instrumented run)"] + [_s(d.get("wall")) for _, d in cols],
                ["  interpreter start + exit, ip netns exec"] + [
                    _s(d["wall"] - d["in_script"]) if "in_script" in d else "-" for _, d in cols],
                ["  import ipmasq_legacy.cli"] + [_s(d.get("import_cli")) for _, d in cols]]
        for label, shown in PHASE_ROWS:
            vals = []
            for _, d in cols:
                t = d.get("phases", {}).get(label)
                calls = d.get("calls", {}).get(label, 0)
                vals.append(_s(t) if calls else "")
            if any(vals):
                rows.append([shown] + vals)
        title = (f"Where the time goes: {STEP_TITLES[step]} at the largest size each backend installed "
                 "(s, one instrumented run; inclusive: indented rows are part of the row above)")
        out.append(table(title, ["phase"] + [f"{name} @ {_n(named[name]['prefixes'])}" for name, _ in cols], rows))
        out += [f"note: the {name} run did not go as expected: {d['problem'][:200]}"
                for name, d in cols if d.get("problem")]
    return "\n".join(out)


def _conn(results: dict) -> str:
    floor = floor_us(results)
    ref = results.get("reference", {})
    masq_ref = ref.get("masquerade_only", {})
    masq = masq_ref.get("us_per_conn")
    masq_ratio = masq_ref.get("ratio")  # one masquerade rule, in floors
    rows = []

    def row(config: str, n, c: dict, verdict: str = "") -> list:
        us = c["us_per_conn"]
        f = c.get("floor_us", floor)  # the floor measured alongside, when there is one
        ratio = c.get("ratio", us / f if f else None)
        return [config, n, f"{us:.2f}", f"{c['min']:.2f}-{c['max']:.2f}", "-" if f is None else f"{f:.2f}",
                "-" if f is None else f"{us - f:+.2f}", "-" if ratio is None else f"{ratio:.2f}",
                *_vs_masq(us, f, ratio, masq, masq_ratio),
                _n(c["packets"]), "yes" if c["paced"] else "", c["lost"], verdict]

    for key, label in (("floor", "floor: no netfilter (start)"), ("floor_end", "floor: no netfilter (end)"),
                       ("empty_nat", "nat chain, no rules"), ("masquerade_only", "one masquerade rule, no exemptions")):
        if key in ref:
            rows.append(row(label, "-", ref[key]))
    ima = results.get("ip_masq_agent", {})
    for n, c in ima.get("sizes", {}).items():
        if "us_per_conn" in c:
            rows.append(row("ip-masq-agent layout", _n(n), c))
        else:
            rows.append(["ip-masq-agent layout", _n(n), "-", "", "", "", "", "", "", "", "", "", c.get("problem", "")])
    for name, b in results.get("backends", {}).items():
        for n, c in b.get("conn", {}).items():
            verdict = ""
            ratio = conn_vs_no_exemptions(results, c)
            if int(n) == TARGET_SIZE and ratio:
                verdict = "PASS" if ratio <= TARGET_CONN_RATIO else "MISS"
            rows.append(row(name, _n(n), c, verdict))
    sender = next((c.get("sender") for c in ref.values() if isinstance(c, dict) and "sender" in c), "?")
    floor_text = "-" if floor is None else f"{floor:.2f}"
    return table(f"Cost of a new connection through the node (µs per new UDP flow, median of bursts; sender: "
                 f"{sender}). floor = the no-netfilter bed, burst for burst in alternation with each row (x floor: "
                 f"median of the pairs); whole-run floor {floor_text} µs. Target at {_n(TARGET_SIZE)}: "
                 f"<= {TARGET_CONN_RATIO}x one masquerade rule with no exemptions",
                 ["config", "prefixes", "µs/conn", "min-max", "floor µs", "+µs vs floor", "x floor",
                  "+µs vs 1 masq rule", "x 1 masq rule", "packets/burst", "paced", "lost", "target"], rows, left=1)


def _vs_masq(us: float, f: float | None, ratio: float | None, masq: float | None,
             masq_ratio: float | None) -> list[str]:
    """(+µs, x) against one masquerade rule.  Both are taken in floors when they can be
    (each row's ratio to the floor measured alongside it over the masquerade rule's), so
    that a slow moment of the machine does not show as a cost."""
    if masq_ratio and ratio and f:
        return [f"{us - f * masq_ratio:+.2f}", f"{ratio / masq_ratio:.2f}"]
    if masq:
        return [f"{us - masq:+.2f}", f"{us / masq:.2f}"]
    return ["-", "-"]


def _throughput(results: dict) -> str:
    ref = results.get("reference", {})
    plain = ref.get("floor_throughput")
    if not plain:
        return ""
    end = ref.get("floor_end_throughput") or {}
    # the base of the ratios: plain forwarding, start and end runs together
    base = {k: statistics.mean([v["gbit_s"]] + ([end[k]["gbit_s"]] if k in end else [])) for k, v in plain.items()}
    rows = []

    def row(config: str, n, tp: dict) -> list:
        r = [config, n]
        for streams in plain:
            got = tp.get(streams) or tp.get(str(streams))
            if not got:
                r += ["-", "-", "-"]
                continue
            ratio = got.get("ratio", got["gbit_s"] / base[streams])
            r += [f"{got['gbit_s']:.2f}", _s(got.get("plain_gbit_s"), 2), f"{ratio:.2f}"]
        return r

    rows.append(row("plain forwarding, no NAT (start)", "-", plain))
    if end:
        rows.append(row("plain forwarding, no NAT (end)", "-", end))
    if "empty_nat_throughput" in ref:
        rows.append(row("nat chain, no rules", "-", ref["empty_nat_throughput"]))
    if "masquerade_only_throughput" in ref:
        rows.append(row("one masquerade rule", "-", ref["masquerade_only_throughput"]))
    for name, b in results.get("backends", {}).items():
        tp = b.get("throughput")
        if tp:
            rows.append(row(name, _n(tp["prefixes"]), tp))
    headers = ["config", "prefixes"]
    for streams in plain:
        headers += [f"{streams} stream{'s' if int(streams) > 1 else ''} Gbit/s", "plain alongside", "x plain"]
    tool = next(iter(plain.values()))["tool"]
    st = results["meta"]["settings"]
    return table(f"Steady TCP throughput pod -> ext through the node ({tool}, {st['throughput_seconds']} s per run). "
                 "x plain: against plain forwarding run right after it in the floor's bed (the plain rows: against "
                 "start and end together)", headers, rows)


# ---------------------------------------------------------------- files


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, sort_keys=False, default=str) + "\n")


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    backends = {n: b for n, b in results.get("backends", {}).items() if "apply" in b}
    colours = dict(zip(backends, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = {"cold": "-", "noop": "--", "change": ":"}
    fig, (ax_t, ax_m, ax_c) = plt.subplots(1, 3, figsize=(18, 5.5))

    for name, b in backends.items():
        for step in STEPS:
            good = [(int(n), per[step]) for n, per in b["apply"].items()
                    if per[step].get("median") and not per[step].get("problem")]  # failed runs are not plotted
            if good:
                label = f"{name}: {STEP_TITLES[step]}"
                ax_t.plot([n for n, _ in good], [st["median"] for _, st in good], styles[step], marker="o",
                          color=colours[name], label=label)
                ax_m.plot([n for n, _ in good], [st["rss_mb"] for _, st in good], styles[step], marker="o",
                          color=colours[name], label=label)
    ax_t.axhline(TARGET_TIME["cold"], color="grey", lw=0.8, ls="-.", label=f"target cold apply {TARGET_TIME['cold']} s")
    ax_t.axhline(TARGET_TIME["noop"], color="grey", lw=0.8, ls=":", label=f"target no-op / change {TARGET_TIME['noop']} s")
    ax_t.set(xscale="log", yscale="log", xlabel="exempt prefixes", ylabel="wall time of the CLI process (s)",
             title="apply / reconcile time")
    ax_m.axhline(TARGET_RSS_MB, color="grey", lw=0.8, ls="-.", label=f"target {TARGET_RSS_MB:.0f} MB")
    ax_m.set(xscale="log", xlabel="exempt prefixes", ylabel="peak RSS (MB)", title="peak memory")

    floor = floor_us(results)
    if floor:
        ax_c.axhline(floor, color="black", lw=1, label=f"floor: no netfilter ({floor:.2f} µs)")
        ax_c.axhline(floor * TARGET_CONN_RATIO, color="grey", lw=0.8, ls="-.",
                     label=f"target {TARGET_CONN_RATIO}x floor")
    masq = results.get("reference", {}).get("masquerade_only")
    if masq:
        ax_c.axhline(masq["us_per_conn"], color="black", lw=1, ls="--",
                     label=f"one masquerade rule, no exemptions ({masq['us_per_conn']:.2f} µs)")
    ima = [(int(n), c["us_per_conn"]) for n, c in results.get("ip_masq_agent", {}).get("sizes", {}).items()
           if "us_per_conn" in c]
    if ima:
        ax_c.plot(*zip(*ima), "-s", color="red", label="ip-masq-agent layout (one rule per prefix)")
    for name, b in backends.items():
        pts = [(int(n), c["us_per_conn"]) for n, c in b.get("conn", {}).items()]
        if pts:
            ax_c.plot(*zip(*pts), "-o", color=colours[name], label=name)
    ax_c.set(xscale="log", yscale="log", xlabel="exempt prefixes", ylabel="µs per new connection",
             title="new-connection cost through the node")
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    for ax in (ax_t, ax_m, ax_c):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        if ax.get_yscale() == "log":
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(NullFormatter())
    m = results["meta"]["machine"]
    fig.suptitle(f"ipmasq-legacy ({results['meta']['mode']} mode) on {m['cpu']}, {m['cores']} cores, "
                 f"kernel {m['kernel']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
