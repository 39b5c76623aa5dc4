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

from . import netlink
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

    # ---- nf_tables besides the nft binary: what backends/nftables.py asks, each a
    # question to this kernel, so that a fake (tests/fakes/nft.py) can answer all of them.

    def nft_library(self, table: str | None = None) -> tuple[object | None, str | None]:
        """(libnftables in this process: `.name`, `.cmd(text, dry_run)`; None) where the
        binding may drive this kernel, else (None, why not). The binding is probed first,
        in a child (backends/nftdriver.py says why); `table`: what the probe loads."""
        from .backends import nftdriver

        why = nftdriver.binding_unsafe(table)
        if why is None:
            try:
                return nftdriver._LibRunner(), None
            except (ImportError, OSError) as exc:
                why = f"libnftables cannot be loaded: {exc}"
        return None, why

    def nft_probe(self, table: str) -> str | None:
        """Whether `table` loads through the nft binary here (in a throw-away network
        namespace where one can be made, else checked in place): None, else why not."""
        from .backends import nftdriver

        return nftdriver.probe_cli(table)

    def nft_generation(self) -> int | None:
        """nf_tables' ruleset generation (netlink.nft_generation)."""
        return netlink.nft_generation()

    def nft_rules(self, family: str, table: str, chain: str) -> list | None:
        """One chain's rules as netlink expressions (netlink.nft_rules): the counters."""
        return netlink.nft_rules(family, table, chain)

    def nft_patch(self, family: int, table: str, name: str, add=(), delete=(), flush: bool = False,
                  genid: int | None = None) -> None:
        """One netlink transaction on a set's elements (backends/nftsets.patch); OSError
        (ERESTART: the generation is not `genid` any more) when it did not commit."""
        from .backends import nftsets

        nftsets.patch(family, table, name, add=add, delete=delete, flush=flush, genid=genid)

    # ---- the ebpf datapath (backends/ebpf/): bpf(2) with the pin directory, rtnetlink
    # (links, addresses, tc), and the nft tables it owns asked for by name; each an
    # object of this kernel, so that tests/fakes/ebpf.py can stand in for all of them.

    def bpf(self):
        """A bpf(2) handle (bpf/loader.Sys): maps, programs, pins, their fds and the pin
        directory's files. BpfError (ENOSYS) where this machine has no bpf(2) known."""
        from .bpf import loader

        return loader.Sys()

    def rtnl(self):
        """A route netlink handle (backends/ebpf/tc.Rtnl): links, addresses, qdiscs and tc
        filters read over ..netlink, tc changed through pyroute2; close() it."""
        from .backends.ebpf.tc import Rtnl

        return Rtnl()

    def nft_tables(self, wanted) -> dict:
        """Each (family, name) of `wanted` -> its table's attributes or None (netlink.nft_tables)."""
        return netlink.nft_tables(wanted)

    def conntrack_forget(self, flows: list) -> int:
        """conntrack's entries of these flows deleted (backends/ebpf/conntrack.forget_conntrack)."""
        from .backends.ebpf.conntrack import delete_conntrack

        return delete_conntrack(flows)


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
