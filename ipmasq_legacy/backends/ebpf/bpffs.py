"""bpffs: whether the pin directory is on a bpf filesystem, and mounting one at
/sys/fs/bpf where the system has not."""

from __future__ import annotations

from pathlib import Path

from ... import kernel
from ...errors import ApplyError
from .names import PIN_ENV

BPFFS_ROOT = Path("/sys/fs/bpf")


def _bpffs_mountable(directory: Path) -> bool:
    """The pin directory is under /sys/fs/bpf, where we may mount bpffs ourselves (as
    Cilium does) when the system has not: the kernel has the filesystem."""
    if not (directory == BPFFS_ROOT or BPFFS_ROOT in directory.parents) or not kernel.current().bpf().exists(BPFFS_ROOT):
        return False
    text = kernel.current().read_text("/proc/filesystems") or ""
    return any(line.split()[-1] == "bpf" for line in text.splitlines() if line.split())


def ensure_bpffs(directory: Path) -> None:
    """Mount bpffs at /sys/fs/bpf when the pin directory needs it and none is mounted."""
    if bpffs_reason(directory, allow_mount=False) is None or not _bpffs_mountable(directory):
        return  # already on bpffs, or not ours to mount (the error comes with the first pin)
    try:
        proc = kernel.current().exec(["mount", "-t", "bpf", "bpf", str(BPFFS_ROOT)])
    except FileNotFoundError:
        raise ApplyError(f"ebpf: cannot mount bpffs at {BPFFS_ROOT}: mount: command not found") from None
    if proc.returncode != 0:
        raise ApplyError(f"ebpf: cannot mount bpffs at {BPFFS_ROOT}: {proc.stderr.strip() or proc.returncode}")


def bpffs_reason(directory: Path, allow_mount: bool = True) -> str | None:
    """None when `directory` is (or would be created) on a bpffs mount, or when apply may
    mount one for it (allow_mount)."""
    text = kernel.current().read_text("/proc/self/mountinfo")
    if text is None:
        return None
    mounts = text.splitlines()
    exists = kernel.current().bpf().exists(directory)
    best, fstype = "", None
    target = str(directory.resolve() if exists else directory)
    for line in mounts:
        parts = line.split()
        try:
            sep = parts.index("-")
        except ValueError:
            continue
        point = parts[4].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, parts[sep + 1]
    if fstype != "bpf" and not (allow_mount and _bpffs_mountable(directory)):
        where = directory.parent if not exists else directory
        return (f"no bpf filesystem at {where} to pin maps in (mount -t bpf bpf /sys/fs/bpf, or set "
                f"{PIN_ENV} to a directory on one)")
    if fstype != "bpf":
        return "mount"
    return None
