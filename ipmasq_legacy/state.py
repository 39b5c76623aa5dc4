"""What is installed, recorded on disk (netavark's habit): /run/ipmasq-legacy/state.json.

The record lets `flush`, `status` and the next `apply` know which backend holds the
rules without probing every backend. It lives on tmpfs: after a reboot the rules are
gone too. IPMASQ_STATE_DIR moves it (tests run one node per network namespace).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

DEFAULT_DIR = "/run/ipmasq-legacy"


def state_dir() -> Path:
    return Path(os.environ.get("IPMASQ_STATE_DIR") or DEFAULT_DIR)


def read() -> dict:
    try:
        data = json.loads((state_dir() / "state.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write(backend: str, fingerprint: str) -> None:
    """Atomically (rename) record the backend and the digest of the plan it holds."""
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    record = {"backend": backend, "fingerprint": fingerprint, "applied_at": time.time()}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".state.")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, directory / "state.json")


def clear() -> None:
    try:
        (state_dir() / "state.json").unlink()
    except FileNotFoundError:
        pass
