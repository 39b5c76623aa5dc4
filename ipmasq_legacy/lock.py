"""One exclusive lock serialises apply, flush, reconcile and watch on a node."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

from . import state
from .errors import ConfigError, LockTimeout


@contextlib.contextmanager
def held(timeout: float):
    directory = state.state_dir()
    path = directory / "lock"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # nothing was changed yet
        raise ConfigError(f"cannot open the lock {path}: {exc.strerror or exc} (run as root; "
                          "IPMASQ_STATE_DIR moves the state dir)") from None
    if not (timeout >= 0 and timeout != float("inf")):  # nan never reaches a deadline
        os.close(fd)
        raise ConfigError(f"lock timeout {timeout!r}: not a finite, non-negative number of seconds")
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
