"""python -m ipmasq_legacy.backends.ebpf stats|reap: the datapath's counters, or finish a drain."""

from __future__ import annotations

import json
import sys

from . import EbpfBackend, stats


def _main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["stats"]:
        print(json.dumps(stats(), indent=2, sort_keys=True))
        return 0
    if args[:1] == ["reap"]:
        print("\n".join(EbpfBackend().reap()))
        return 0
    print("usage: python -m ipmasq_legacy.backends.ebpf stats|reap", file=sys.stderr)
    return 2


raise SystemExit(_main())
