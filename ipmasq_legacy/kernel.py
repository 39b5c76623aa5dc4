"""The one seam between ipmasq and the node: every command a backend runs, every file of
/proc or /sys it reads and the privilege check go through a `Kernel`.

`SYSTEM` is the real node. Tests swap in a fake (tests/fakes/: FakeIptables, FakeNft,
each with a canonical dump) with `use()`, so the decisions (which transaction for which
drift, reconcile's repairs, take-over, selection) run without root; what only packets
prove stays in the namespace tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import ApplyError

CAP_NET_ADMIN = 12


class Kernel:
    """The real node: subprocess, shutil.which and the files under /proc and /sys."""

    name = "system"

    def exec(self, argv: Sequence[str], input: str | None = None) -> subprocess.CompletedProcess:
        """Run one tool to completion (text in, text out); FileNotFoundError when absent."""
        return subprocess.run(list(argv), input=input, capture_output=True, text=True)

    def run(self, argv: Sequence[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """exec, with a failure (or a missing tool) as an ApplyError naming the tool and its
        first error line."""
        try:
            proc = self.exec(argv, input)
        except FileNotFoundError:
            raise ApplyError(f"{argv[0]}: command not found") from None
        if check and proc.returncode != 0:
            first = next((ln for ln in proc.stderr.splitlines() if ln.strip()), f"exit status {proc.returncode}")
            raise ApplyError(f"{argv[0]} failed: {first.strip()}")
        return proc

    def nft(self, text: str, *options: str) -> subprocess.CompletedProcess:
        """The nft binary on one script (`nft [options] -f -`): the one way the CLI is run."""
        return self.run(["nft", *options, "-f", "-"], input=text, check=False)

    def which(self, tool: str) -> str | None:
        return shutil.which(tool)

    def read_text(self, path: str | Path) -> str | None:
        """A file of /proc or /sys; None when it is not there (a module not loaded)."""
        try:
            return Path(path).read_text()
        except OSError:
            return None

    def privileged(self) -> bool:
        """CAP_NET_ADMIN in the effective set (root without it cannot change rules either)."""
        status = self.read_text("/proc/self/status") or ""
        for line in status.splitlines():
            if line.startswith("CapEff:"):
                try:
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
                except (IndexError, ValueError):
                    break
        return os.geteuid() == 0


SYSTEM = Kernel()
_current: Kernel = SYSTEM


def current() -> Kernel:
    """The kernel the backends and the CLI's privilege check talk to now."""
    return _current


@contextlib.contextmanager
def use(kernel: Kernel) -> Iterator[Kernel]:
    """Talk to `kernel` (a fake) inside the block; the real node again after it."""
    global _current
    before, _current = _current, kernel
    try:
        yield kernel
    finally:
        _current = before
