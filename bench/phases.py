"""Run the `ipmasq` CLI once with timers around its main phases; write them as JSON.

    python bench/phases.py OUT.json apply --config FILE --backend NAME

Used by the benchmark (inside a test bed's node namespace) to explain where the
time of one CLI run goes.  Each timer is inclusive (a phase's time contains the
phases it calls) and counts the outermost call only; `subprocess.run` is every
external tool (iptables-*, ipset, nft) together.  The timed runs of the benchmark
itself use the plain CLI (`python -m ipmasq_legacy`), not this script.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# every backend class whose verbs are timed: (module, class)
BACKENDS = [("ipmasq_legacy.backends.iptables", "IptablesBackend"),
            ("ipmasq_legacy.backends.nftables", "NftablesBackend"),
            ("ipmasq_legacy.backends.ebpf", "EbpfBackend")]

# label -> list of (module, attribute path); every target shares the label's timer
TARGETS: dict[str, list[tuple[str, str]]] = {
    "config.load": [("ipmasq_legacy.config", "load")],
    "yaml": [("ipmasq_legacy.config.text", "_parse_text")],  # JSON, the fast path or libyaml
    "config.parse_networks": [("ipmasq_legacy.config.values", "parse_networks")],
    "plan.build": [("ipmasq_legacy.plan", "build")],
    "plan.normalise": [("ipmasq_legacy.plan", "normalise")],
    "agent.sync": [("ipmasq_legacy.agent", "sync")],
    "backend.drift": [(m, f"{c}.drift") for m, c in BACKENDS],
    "backend.apply": [(m, f"{c}.apply") for m, c in BACKENDS],
    "backend.live": [(m, f"{c}.live") for m, c in BACKENDS],
    "subprocess.run": [("subprocess", "run")],
    "libnftables": [("ipmasq_legacy.backends.nftables", "_LibRunner.cmd")],
    "nft.parse_table": [("ipmasq_legacy.backends.nftables", "parse_table")],
    "ipset._normalised_members": [("ipmasq_legacy.backends.iptables", "_normalised_members")],
    "render": [("ipmasq_legacy.backends.iptables", "render_set"),
               ("ipmasq_legacy.backends.iptables", "render_restore"),
               ("ipmasq_legacy.backends.nftables", "render_set"),
               ("ipmasq_legacy.backends.nftables", "render_rules")],
}

totals: dict[str, float] = {label: 0.0 for label in TARGETS}
calls: dict[str, int] = {label: 0 for label in TARGETS}
_depth: dict[str, int] = {label: 0 for label in TARGETS}


def _timed(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _depth[label] += 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _depth[label] -= 1
            if _depth[label] == 0:
                totals[label] += time.perf_counter() - start
                calls[label] += 1

    return wrapper


def _patch() -> None:
    import importlib

    for label, targets in TARGETS.items():
        for module_name, path in targets:
            try:
                owner = importlib.import_module(module_name)
            except ImportError:
                continue
            *parents, attr = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent, None)
                if owner is None:
                    break
            if owner is None or not hasattr(owner, attr):
                continue
            setattr(owner, attr, _timed(label, getattr(owner, attr)))


def main() -> int:
    out_path, argv = sys.argv[1], sys.argv[2:]
    # the package of this checkout, as `python -m ipmasq_legacy` run from its root imports it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    t_import = time.perf_counter()
    from ipmasq_legacy import agent, cli  # noqa: F401  (agent: imported so it can be patched)

    imported = time.perf_counter()
    _patch()
    sys.argv = ["ipmasq", *argv]
    code = 0
    started = time.perf_counter()
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    done = time.perf_counter()
    with open(out_path, "w") as f:
        json.dump({
            "exit_code": code,
            "in_script": done - T0,  # the rest of the wall time is interpreter start and exit
            "import_cli": imported - t_import,
            "cli_main": done - started,
            "phases": totals,
            "calls": calls,
        }, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
