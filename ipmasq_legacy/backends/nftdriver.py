"""Talking to nftables: the libnftables binding where it is safe here (probed in a child
process, recorded per library and binding version), else `nft -f -`."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .. import kernel, ruledata, state

CLI_ENV = "IPMASQ_NFT_CLI"
LIBRARY = "libnftables.so.1"


# ---------------------------------------------------------------- talking to nftables


class _CliRunner:
    """`nft -f -` in a subprocess: the fallback when libnftables cannot be loaded."""

    name = "nft"

    def cmd(self, text: str, dry_run: bool = False) -> tuple[int, str, str]:
        proc = kernel.current().nft(text, *(["-c"] if dry_run else []))  # ApplyError when there is no nft
        return proc.returncode, proc.stdout, proc.stderr


class _LibRunner:
    """libnftables in-process, through the `nftables` Python binding."""

    name = "libnftables"

    def __init__(self):
        import nftables  # ImportError: no binding; OSError below: no libnftables.so.1

        self._module = nftables
        self.nft = nftables.Nftables(sofile=LIBRARY)
        self._can_dry_run = self._dry_run_setter(self.nft) is not None

    @staticmethod
    def _dry_run_setter(nft):
        if hasattr(nft, "set_dry_run"):
            return nft.set_dry_run
        # Older bindings (pip-nftables 1.0.2) lack set_dry_run; the C library has it.
        ctx = getattr(nft, "_Nftables__ctx", None)
        if ctx is None:
            return None
        try:
            fn = ctypes.CDLL(LIBRARY).nft_ctx_set_dry_run
        except (OSError, AttributeError):
            return None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        fn.restype = None
        return lambda on: fn(ctx, on)

    def cmd(self, text: str, dry_run: bool = False) -> tuple[int, str, str]:
        if not dry_run:
            return self.nft.cmd(text)
        if not self._can_dry_run:
            return 0, "", ""  # cannot check apart; the commit itself is still all-or-nothing
        # A context of its own: a dry run leaves its changes in the context's cache (the
        # ruleset generation has not moved, so the cache is not fetched again), and the
        # real run would then find, say, an element to delete already gone.
        checker = self._module.Nftables(sofile=LIBRARY)
        self._dry_run_setter(checker)(True)
        return checker.cmd(text)


def _library_missing() -> str | None:
    """Why the libnftables binding cannot be used, or None."""
    try:
        import nftables  # noqa: F401
    except ImportError:
        return "no nftables Python module"
    try:
        ctypes.CDLL(LIBRARY)
    except OSError:
        return f"no {LIBRARY}"
    return None


# ---------------------------------------------------------------- is the binding safe here?
#
# The binding (pip-nftables, a copy of nftables' py/nftables.py) is written for one
# nftables release's libnftables. Older libraries crash under it in C, where Python
# cannot catch it: libnftables 0.9.8 (Debian 11) aborts with "double free or corruption"
# after the transaction committed, so apply died half done. So the binding is used only
#   1. with a library at least as new as the binding (`nft --version` tells the
#      library's release: the nftables package ships both), and
#   2. after a child process ran it the way apply does (a checked transaction through a
#      second context, the commit, both contexts freed) in a throw-away network
#      namespace (without the right to make one: the check alone) and exited normally.
# Otherwise `nft -f -` drives the kernel. The verdict is kept in the state directory
# (tmpfs), keyed by the library file and the binding's file: one child per boot. (Keyed
# by the binding's file, not its version: importlib.metadata, which tells the version,
# costs ~25 ms of CPU to import, a fifth of a small config's apply; it is asked only
# when there is no verdict yet.)

BINDING_RECORD = "nft-binding.json"
PROBE_TIMEOUT = 20


def _release(text: str) -> tuple[int, ...] | None:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(g or 0) for g in m.groups()) if m else None


def binding_version() -> str | None:
    from importlib import metadata

    for dist in ("pip-nftables", "nftables"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def library_version() -> str | None:
    """The nftables release of the installed library, from `nft --version`."""
    if shutil.which("nft") is None:
        return None
    try:
        out = subprocess.run(["nft", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    release = _release(out)
    return ".".join(map(str, release)) if release else None


def _library_file() -> str:
    """The loaded libnftables' path, size and mtime: a new library gets a new verdict."""
    ctypes.CDLL(LIBRARY)
    for line in Path("/proc/self/maps").read_text().splitlines():
        if "libnftables.so" in line:
            path = line.split(None, 5)[-1]
            st = os.stat(path)
            return f"{path}:{st.st_size}:{st.st_mtime_ns}"
    return LIBRARY


def _binding_file() -> str:
    """The binding module's path, size and mtime: a new binding gets a new verdict."""
    import nftables

    path = getattr(nftables, "__file__", None) or "nftables"
    try:
        st = os.stat(path)
    except OSError:
        return path
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _probe_binding(table: str) -> str | None:
    """Run the binding on `table` in a child the way apply does; None if it survived and
    loaded it, else why not (a crash, or nft's own error)."""
    child = [sys.executable, "-c", "import sys; from ipmasq_legacy.backends import nftdriver as n; "
             "sys.exit(n._probe_main(sys.argv[1] == 'check'))"]
    attempts = ([["unshare", "--net", "--", *child, "commit"]] if shutil.which("unshare") else []) + [[*child, "check"]]
    for argv in attempts:
        try:
            proc = subprocess.run(argv, input=table, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            return "the libnftables binding did not finish a probe transaction"
        if argv[0] == "unshare" and proc.returncode != 0 and proc.stderr.startswith("unshare:"):
            continue  # no right to make a namespace: check in place (commits nothing)
        if proc.returncode < 0:
            return (f"libnftables {library_version() or '?'} crashed under the binding {binding_version() or '?'} "
                    f"(signal {-proc.returncode}) in a probe")
        if proc.returncode != 0:
            first = next((ln for ln in proc.stderr.splitlines() if ln.strip()), f"exit status {proc.returncode}")
            return f"a probe table did not load through libnftables: {first.strip()}"
        return None
    return "the libnftables probe could not run"


def binding_unsafe(table: str | None = None) -> str | None:
    """None when the in-process binding may drive the kernel here, else why not."""
    missing = _library_missing()
    if missing:
        return missing
    key = f"{_library_file()} {_binding_file()} {sys.version_info[0]}.{sys.version_info[1]}"
    record = state.read_json(BINDING_RECORD)
    if key in record:
        return record[key]
    bind = binding_version()
    lib = library_version()
    verdict: str | None
    lib_release, bind_release = _release(lib or ""), _release(bind or "")
    if lib_release and bind_release and lib_release < bind_release:
        verdict = f"libnftables {lib} is older than the binding {bind} (written for nftables {bind})"
    else:
        verdict = _probe_binding(table or ruledata.load("nftables")["probe"])
    if verdict is None or "crashed" in verdict or "older" in verdict:  # nft's own error: no verdict kept
        try:
            state.write_json(BINDING_RECORD, {**record, key: verdict})
        except OSError:
            pass  # no state directory we may write: probe again next time
    return verdict


def _probe_main(check_only: bool) -> int:
    """The child of _probe_binding: stdin's table through the binding as apply does it."""
    import gc

    runner = _LibRunner()
    text = sys.stdin.read()
    rc, _, err = runner.cmd(text, dry_run=True)
    if rc == 0 and not check_only:
        rc, _, err = runner.cmd(text)
    del runner
    gc.collect()  # the contexts are freed here, where 0.9.8 crashed
    if rc != 0:
        sys.stderr.write(err)
    return 0 if rc == 0 else 1


def probe_table(table: str) -> str | None:
    """Whether a table like ours loads, through the driver apply would use: None, else
    why not. (selection's probe for `auto`: the same path as apply.) Asked of the current
    kernel (kernel.py), so a fake one answers without running anything."""
    k = kernel.current()
    if not _cli_forced() and k.nft_library(table)[1] is None:
        return None  # the binding loaded `table` in its probe
    if k.which("nft") is None:
        return "the nft command is missing (install the nftables package)"
    return k.nft_probe(table)


PROBE_FAILED = "a nat table with fib, an interval set and masquerade did not load: {}"


def probe_cli(table: str) -> str | None:
    """Kernel.nft_probe on the real node: `table` through the nft binary in a throw-away
    network namespace, or checked in place where none can be made."""
    attempts = [["unshare", "--net", "nft", "-f", "-"], ["nft", "--check", "-f", "-"]]
    if shutil.which("unshare") is None:
        attempts = attempts[1:]
    for argv in attempts:
        try:
            proc = subprocess.run(argv, input=table, capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return "probe timed out"
        if argv[0] == "unshare" and proc.returncode != 0 and "unshare" in proc.stderr:
            continue  # could not make the namespace (e.g. no CAP_SYS_ADMIN): check in place instead
        if proc.returncode != 0:
            first = next((ln for ln in proc.stderr.splitlines() if ln.strip()), f"exit status {proc.returncode}")
            return PROBE_FAILED.format(first.strip())
        return None
    return "probe could not run"


def _cli_forced() -> bool:
    return os.environ.get(CLI_ENV, "").strip().lower() not in ("", "0", "false", "no")
