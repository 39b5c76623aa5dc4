"""Fake kernels for tests that need no root (knftables' Fake is the model): each fake
holds a model of what it owns and prints it as one canonical dump, so a test asserts the
whole state a command left, not the calls it made.

`FakeKernel` is the base: tools are handlers by name (argv[0]), files are a dict, every
call is recorded, and it is privileged (a fake needs no root). Use it with
`ipmasq_legacy.kernel.use(fake)`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from ipmasq_legacy.kernel import Kernel

Handler = Callable[[list[str], "str | None"], "tuple[int, str, str]"]


class FakeKernel(Kernel):
    name = "fake"

    def __init__(self) -> None:
        self.tools: dict[str, Handler] = {}
        self.files: dict[str, str] = {}
        self.calls: list[tuple[str, ...]] = []
        self.is_privileged = True

    def exec(self, argv: Sequence[str], input: str | None = None) -> subprocess.CompletedProcess:
        argv = list(argv)
        self.calls.append(tuple(argv))
        handler = self.tools.get(Path(argv[0]).name)
        if handler is None:
            raise FileNotFoundError(argv[0])
        rc, out, err = handler(argv, input)
        return subprocess.CompletedProcess(argv, rc, out, err)

    def which(self, tool: str) -> str | None:
        return f"/usr/sbin/{tool}" if tool in self.tools else None

    def read_text(self, path: str | Path) -> str | None:
        return self.files.get(str(path))

    def privileged(self) -> bool:
        return self.is_privileged
