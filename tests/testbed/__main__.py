"""python -m tests.testbed hold|cleanup (debugging aid; run from the checkout's root)."""

from __future__ import annotations

import signal
from collections.abc import Iterable

from .bed import TestBed, cleanup_stale


def _main(argv: Iterable[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.testbed")
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hold", help="build a bed, print its names, wait for Ctrl-C")
    h.add_argument("--no-ipv6", action="store_true")
    h.add_argument("--pods", type=int, default=1)
    sub.add_parser("cleanup", help="remove namespaces of beds whose process is gone")
    a = p.parse_args(list(argv) if argv is not None else None)
    if a.cmd == "cleanup":
        for n in cleanup_stale():
            print("removed", n)
        return 0
    with TestBed(ipv6=not a.no_ipv6, pods=a.pods) as bed:
        print("pods:", " ".join(bed.pods))
        print("node:", bed.node)
        print("ext: ", bed.ext)
        for d in bed.DESTINATIONS.values():
            print(f"  {d.name:14} {d.address:18} via {d.uplink}")
        print("Ctrl-C to tear down", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
