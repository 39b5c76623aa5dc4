"""One exclusive lock serialises apply, flush, reconcile and watch on a node."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

from . import state
from .errors import LockTimeout


@contextlib.contextmanager
def held(timeout: float):
    directory = state.state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"could not lock {path} within {timeout:g}s (another ipmasq is running)") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
