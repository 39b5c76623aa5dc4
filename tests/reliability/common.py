"""Shared by the reliability suite: scale (CI runs a reduced version, `tox -e reliability`
the full one) and a place to publish the figures."""

from __future__ import annotations

import json
import os
from pathlib import Path

FULL = os.environ.get("IPMASQ_RELIABILITY") == "full"
REPORT = os.environ.get("IPMASQ_RELIABILITY_REPORT")  # a JSON file the figures are merged into


def scale(ci: int, full: int) -> int:
    return full if FULL else ci


def publish(name: str, figures: dict) -> None:
    if not REPORT:
        return
    path = Path(REPORT)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = figures
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
