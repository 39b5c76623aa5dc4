"""What is installed, recorded on disk (netavark's habit): /run/ipmasq-legacy/state.json.

The record lets `flush`, `status` and the next `apply` know which backend holds the
rules without probing every backend. It lives on tmpfs: after a reboot the rules are
gone too. IPMASQ_STATE_DIR moves it (tests run one node per network namespace).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError
from .inputs import Missing, read_bytes, show_path

DEFAULT_DIR = "/run/ipmasq-legacy"


class StateDirError(ConfigError):
    """The state dir (or a record in it) cannot be used: nothing was touched."""


def state_dir() -> Path:
    """The state dir; something there that is not a directory (IPMASQ_STATE_DIR naming a
    file, say) is an error, never a reason to act as if nothing were recorded."""
    env = os.environ.get("IPMASQ_STATE_DIR")
    path = Path(env or DEFAULT_DIR)
    where = f"state dir {show_path(path)}" + (" (IPMASQ_STATE_DIR)" if env else "")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path  # made by the first write
    except (OSError, ValueError) as exc:
        raise StateDirError(f"{where}: cannot use it: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"{where}: not a directory")
    return path


def read() -> dict:
    return read_json("state.json")


def _new_file(directory: Path, name: str) -> tuple[int, Path]:
    """A new file of our own beside `name` (0600; as tempfile.mkstemp makes one, without
    importing tempfile: ~3 ms of CPU, and every run writes a record)."""
    directory.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        path = directory / f".{name}.{os.urandom(6).hex()}"
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no new file name beside {directory / name}")


def write_json(name: str, data: dict) -> None:
    """Write atomically: a reader sees the old file or the new one."""
    directory = state_dir()
    fd, tmp = _new_file(directory, name)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, directory / name)


def write_list(name: str, lines) -> str:
    """A list of lines kept in the state dir beside a record, written atomically; returns
    its digest, which the record keeps so that read_list knows it is the list it names."""
    text = "\n".join(lines)
    directory = state_dir()
    fd, tmp = _new_file(directory, name)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, directory / name)
    return hashlib.sha256(text.encode()).hexdigest()


def read_list(name: str, digest: str | None) -> tuple[str, ...] | None:
    """The list write_list kept, if it is the one `digest` names; else None."""
    try:
        text = (state_dir() / name).read_text()
    except OSError:
        return None
    if digest is None or hashlib.sha256(text.encode()).hexdigest() != digest:
        return None
    return tuple(text.split("\n")) if text else ()


def netns_id() -> str:
    """This network namespace in this boot: a record about a namespace's kernel objects
    (nf_tables generations, ipset headers) is void in another one, or after a reboot,
    when a state dir on disk would still be there."""
    st = os.stat("/proc/self/ns/net")
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{boot}:{st.st_dev}:{st.st_ino}"


def write(backend: str, fingerprint: str, exempt: dict[int, int] | None = None) -> None:
    """Record the backend and the digest of the plan it holds; `exempt`: how many exempt
    prefixes per family it installed (the metrics' gauge reads it, not the sets)."""
    record: dict = {"backend": backend, "fingerprint": fingerprint, "applied_at": time.time()}
    if exempt is not None:
        record["exempt"] = {str(family): count for family, count in exempt.items()}
    write_json("state.json", record)


def read_json(name: str) -> dict:
    """A record; {} when there is none (or it is not JSON: it is rewritten). One that is
    there but cannot be read (not root: the records are 0600) is an error: a command
    must not report "nothing installed" because it could not look."""
    path = state_dir() / name
    try:
        data = json.loads(read_bytes(path, "state record"))
        return data if isinstance(data, dict) else {}
    except Missing:
        return {}
    except ValueError:
        return {}
    except ConfigError as exc:
        raise StateDirError(str(exc)) from None


def remove(name: str) -> None:
    """Remove one record (a backend's own, say); fine when there is none."""
    try:
        (state_dir() / name).unlink()
    except FileNotFoundError:
        pass


def clear() -> None:
    """What flush forgets: the installed backend and the last verification. The config
    source apply recorded stays (source.py): a reconcile after a flush reinstalls what
    was applied, never the defaults."""
    for name in ("state.json", "verified.json"):
        remove(name)


# ---------------------------------------------------------------- where the config came from
# apply records the config source it installed (ipmasq_legacy/source.py reads it back).

SOURCE = "source.json"


def read_source() -> dict:
    return read_json(SOURCE)


def write_source(record: dict) -> None:
    write_json(SOURCE, record)


# ---------------------------------------------------------------- the config's warnings
# Those of the config last read by a sync, kept so that a cron reconcile logs a warning
# once rather than every minute, and so that the metric counts them between runs.

WARNINGS = "warnings.json"


def read_warnings() -> list[list[str]]:
    """[[kind, text], ...] of the config the last sync read."""
    items = read_json(WARNINGS).get("warnings", [])
    return [list(w) for w in items if isinstance(w, (list, tuple)) and len(w) == 2]


def write_warnings(warnings: list) -> None:
    write_json(WARNINGS, {"warnings": [list(w) for w in warnings]})


# ---------------------------------------------------------------- sync history
# Kept beside the state so that counters stay monotonic across cron runs
# (each `reconcile` is a new process writing a node_exporter textfile).


def read_history() -> dict:
    return read_json("history.json")


def record_sync(ok: bool, repairs: Sequence[str] = ()) -> dict:
    history = read_history()
    history.setdefault("repairs", {})
    history.setdefault("errors", 0)
    if ok:
        history["last_success"] = time.time()
    else:
        history["errors"] += 1
    for kind in repairs:
        history["repairs"][kind] = history["repairs"].get(kind, 0) + 1
    write_json("history.json", history)
    return history
