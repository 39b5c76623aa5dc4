"""Network namespaces of a bed: made, entered by a helper thread (setns(2) in that
thread only), and removed (finding beds left by dead processes is tests/testbed's)."""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import queue
import signal
import socket
import subprocess
import threading
from typing import Callable

NETNS_PREFIX = "ipmq-"
NETNS_RUN_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000


_libc = ctypes.CDLL(None, use_errno=True)


class TestBedError(RuntimeError):
    """The bed could not be built or used."""

    __test__ = False  # not a pytest test class


class ReplyLostError(TestBedError):
    """The probe reached ext, but the reply never made it back to the pod."""

    __test__ = False

    def __init__(self, msg: str, seen: str):
        super().__init__(msg)
        self.seen = seen


def _netns_path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def _own_netns_ino() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


# inode of the namespace the process started in; used to refuse ever
# configuring it by mistake.
_HOST_NETNS_INO = os.stat("/proc/self/ns/net").st_ino


class _NsThread:
    """A daemon thread that lives in network namespace ``name`` and runs
    callables there (socket creation, /proc/sys writes)."""

    def __init__(self, name: str):
        self.name = name
        self.ino = os.stat(_netns_path(name)).st_ino
        if self.ino == _HOST_NETNS_INO:
            raise TestBedError(f"netns {name} is the host namespace?!")
        self._q: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"netns-{name}", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise TestBedError(f"cannot enter netns {name}: {self._error}")

    def _run(self) -> None:
        try:
            fd = os.open(_netns_path(self.name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, os.strerror(e))
            finally:
                os.close(fd)
            if _own_netns_ino() != self.ino:
                raise OSError("setns did not take effect")
        except BaseException as e:  # pragma: no cover - setup failure
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, args, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                # paranoia: never run anything in the wrong namespace
                if _own_netns_ino() != self.ino:
                    raise TestBedError(f"thread left netns {self.name}")
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)

    def call(self, fn: Callable, *args):
        if not self._thread.is_alive():
            raise TestBedError(f"netns thread for {self.name} is gone")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put((fn, args, fut))
        return fut.result()

    def socket(self, family: int, type_: int, proto: int = 0) -> socket.socket:
        return self.call(socket.socket, family, type_, proto)

    def sysctl(self, key: str, value: str | int) -> None:
        """Write a sysctl inside this namespace.  As a safety net, the same key
        is read in the caller's (host) namespace before and after: if the host
        value moved (a sysctl that is not per-namespace), it is put back and
        TestBedError is raised."""
        if _own_netns_ino() != _HOST_NETNS_INO:
            raise TestBedError("sysctl() must be called from a thread in the host namespace")
        try:
            before = self._read_sysctl(key)
        except OSError:
            before = None
        self.call(self._write_sysctl, key, str(value))
        try:
            after = self._read_sysctl(key)
        except OSError:
            after = None
        if before != after:  # pragma: no cover - would be a kernel surprise
            if before is not None:
                with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                    f.write(before)
            raise TestBedError(f"sysctl {key} is not per-namespace; host value restored")

    def read_sysctl(self, key: str) -> str:
        return self.call(self._read_sysctl, key)

    def _write_sysctl(self, key: str, value: str) -> None:
        if _own_netns_ino() in (_HOST_NETNS_INO,) or _own_netns_ino() != self.ino:
            raise TestBedError("refusing to write a sysctl outside the bed")
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)

    @staticmethod
    def _read_sysctl(key: str) -> str:
        with open("/proc/sys/" + key.replace(".", "/")) as f:
            return f.read().strip()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(5)


def _netns_pids(name: str) -> list[int]:
    """Pids of processes whose network namespace is ``name``."""
    try:
        ino = os.stat(_netns_path(name)).st_ino
        dev = os.stat(_netns_path(name)).st_dev
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if st.st_ino == ino and st.st_dev == dev:
            pids.append(int(entry))
    return pids


def _remove_netns(name: str, kill: bool = True) -> None:
    """Delete a bed namespace; with ``kill``, first SIGKILL the processes left
    running inside it (processes a test started in its own bed)."""
    if not name.startswith(NETNS_PREFIX):
        raise TestBedError(f"refusing to delete foreign netns {name!r}")
    me = os.getpid()
    for pid in _netns_pids(name) if kill else ():
        if pid != me:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    path = _netns_path(name)
    if not os.path.exists(path):
        return
    from pyroute2 import netns as _netns

    try:
        _netns.remove(name)
    except OSError:
        r = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
        if r.returncode != 0 and os.path.exists(path):
            raise TestBedError(f"cannot delete netns {name}: {r.stderr.strip()}") from None
