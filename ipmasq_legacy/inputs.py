"""What the operator hands us, read with bounds (README "Command line": exit codes and the inputs refused): files, values in messages,
privileges, the environment.

- Files are read only when they are regular files (a FIFO would block, /dev/zero never
  ends), opened without blocking, and only up to MAX_FILE_BYTES.
- A value quoted in a message is at most SHOW_LIMIT characters, however large or deeply
  nested it is (reprlib: the cost is bounded too, not only the text).
- The commands that change or read the rules say that they need root (or CAP_NET_ADMIN)
  before anything else happens, instead of failing halfway.

Every refusal is a ConfigError (exit 2): one line naming the file or the value.
"""

from __future__ import annotations

import errno
import math
import os
import reprlib
import stat
from pathlib import Path
from typing import Any

from .errors import ConfigError

MAX_FILE_BYTES = 64 << 20  # 64 MiB: 1,000,000 IPv4 prefixes one a line are 16-19 MB, IPv6 ~30 MB
SHOW_LIMIT = 80  # characters of a value quoted in a message
PATH_LIMIT = 200  # characters of a path named in a message

_repr = reprlib.Repr()
_repr.maxstring = SHOW_LIMIT
_repr.maxother = SHOW_LIMIT
_repr.maxlong = 40
_repr.maxlevel = 3
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = _repr.maxfrozenset = 6


def show(value: Any, limit: int = SHOW_LIMIT) -> str:
    """`value` as a message quotes it: its repr (control characters escaped), at most `limit`
    characters, computed in bounded time (a nested alias bomb, a 5,000-digit number)."""
    try:
        text = _repr.repr(value)
    except Exception:  # a repr that fails is no reason to lose the message
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def cut(text: str, limit: int = PATH_LIMIT) -> str:
    """Text for a message (unquoted): one line, at most `limit` characters."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def show_path(path: Any) -> str:
    """A path as a message names it (unquoted, as before), cut to PATH_LIMIT characters and one line."""
    return cut(str(path))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


class Missing(ConfigError):
    """The file is not there (ENOENT)."""


def _os_error(exc: OSError, what: str, path: Any) -> ConfigError:
    if exc.errno == errno.ELOOP:
        why = "too many levels of symbolic links (a symlink loop?)"
    elif exc.errno == errno.ENOENT:
        return Missing(f"{what} {show_path(path)}: no such file")
    elif exc.errno == errno.ENOTDIR:
        why = "a part of the path is not a directory"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied"
    else:
        why = f"cannot read: {exc.strerror or exc}"
    return ConfigError(f"{what} {show_path(path)}: {why}")


def path_kind(path: Path, what: str) -> str:
    """'missing' (nothing there, or a symlink to nothing), 'dir', or 'file' (anything else:
    read_bytes decides); a symlink loop, a path through a file or no permission: ConfigError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        raise _os_error(exc, what, path) from None
    except ValueError:  # an embedded NUL byte
        raise ConfigError(f"{what} {show(str(path))}: not a valid path") from None
    return "dir" if stat.S_ISDIR(st.st_mode) else "file"


def read_bytes(path: Path, what: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file, at most `limit` of them; anything else is a ConfigError
    whose message starts with `what` ("config file") and the path."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO's open does not wait
    except OSError as exc:
        raise _os_error(exc, what, path) from None
    except ValueError:
        raise ConfigError(f"{what} {show(str(path))}: not a valid path") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {show_path(path)}: is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise ConfigError(f"{what} {show_path(path)}: {st.st_size} bytes, more than the limit of "
                              f"{limit >> 20} MiB")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # grew while read (procfs files report size 0)
            raise ConfigError(f"{what} {show_path(path)}: more than the limit of {limit >> 20} MiB")
        return b"".join(chunks)
    except OSError as exc:
        raise _os_error(exc, what, path) from None
    finally:
        os.close(fd)


def read_text(path: Path, what: str, limit: int = MAX_FILE_BYTES) -> str:
    """read_bytes, decoded as UTF-8 (a leading byte order mark is dropped)."""
    raw = read_bytes(path, what, limit)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {show_path(path)}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset "
                          f"{exc.start})") from None
    return text[1:] if text.startswith("\ufeff") else text


# ---------------------------------------------------------------- privileges


def has_net_admin() -> bool:
    """Whether this process may change (and read) the rulesets of the kernel it talks to
    (kernel.current(): the node, or a test's fake, which needs no root)."""
    from . import kernel

    return kernel.current().privileged()


def need_net_admin(command: str, why: str = "to change the rules") -> None:
    if not has_net_admin():
        raise ConfigError(f"{command} needs root (or CAP_NET_ADMIN) {why}: run it as root")


def seconds(value: Any, what: str) -> float:
    """A finite, non-negative number of seconds (nan, inf and negatives refused)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{what}: {show(value)} is not a number of seconds") from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{what}: {show(value)} is not a finite, non-negative number of seconds")
    return number


def check_environment() -> None:
    """The environment's numbers, before any command changes anything."""
    raw = os.environ.get("IPMASQ_BPF_DRAIN_IDLE")
    if raw:
        seconds(raw, "IPMASQ_BPF_DRAIN_IDLE")
