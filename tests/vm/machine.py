"""One boot of a guest in qemu: the image's kernel and initrd, a copy-on-write overlay
of its root filesystem, the payload (a tar of the checkout) as a second disk and an
empty third disk the guest writes its results to (a tar), read back afterwards.

Network: qemu's user-mode stack (slirp) only: the guest's traffic leaves as this
machine's own sockets from the qemu process; no tap or bridge device is made.

Acceleration: KVM when /dev/kvm opens and the kernel reaches init in time (on a nested
/dev/kvm Debian's kernels may hang early), else TCG, automatically.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from .image import Image

BOOTED = "ipmasq-vm: booted"
# A working KVM prints the kernel's first line at once and reaches init in seconds; on
# this kind of machine the nested /dev/kvm printed nothing in a minute (Debian 12's
# kernel), so a silent console ends the attempt early and the run falls back to TCG.
FIRST_OUTPUT_SECONDS = {"kvm": 20, "tcg": 120}
BOOT_SECONDS = {"kvm": 90, "tcg": 600}
RESULTS_SIZE = "256M"


@dataclass
class Boot:
    accel: str
    seconds: float
    how: str  # "powered off", "timed out", "did not boot"
    console: Path
    results: Path  # the unpacked /root/out of the guest (may be empty)


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


def payload(checkout: Path, dest: Path, env: dict[str, str]) -> None:
    """The checkout as git sees it (tracked and new files, not ignored ones: no .venv,
    no compiled masq.o) plus .vm-env, the environment for the guest's steps."""
    names = subprocess.run(["git", "-C", str(checkout), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True, check=True).stdout.split(b"\0")
    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted({n.decode() for n in names if n}):
            path = checkout / name
            if path.is_symlink() or path.is_file():  # ipmasq_legacy/rules is a symlink: kept as one
                tar.add(path, arcname=name, recursive=False)
        data = "".join(f"export {k}='{v}'\n" for k, v in sorted(env.items())).encode()
        info = tarfile.TarInfo(".vm-env")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def qemu_argv(image: Image, work: Path, accel: str, cpus: int, memory: str) -> list[str]:
    # -arch-capabilities: nested KVM here refuses that MSR and qemu aborts at start
    cpu = (["-accel", "kvm", "-cpu", "host,-arch-capabilities"] if accel == "kvm"
           else ["-accel", "tcg,thread=multi", "-cpu", "max"])
    return [
        "qemu-system-x86_64", *cpu, "-smp", str(cpus), "-m", memory,
        "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{work / 'console.log'}",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", "root=/dev/vda rw console=ttyS0 panic=-1 net.ifnames=0 init=/sbin/ipmasq-vm-init",
        "-drive", f"file={work / 'overlay.qcow2'},if=virtio,format=qcow2",
        "-drive", f"file={work / 'payload.tar'},if=virtio,format=raw,readonly=on",
        "-drive", f"file={work / 'results.img'},if=virtio,format=raw",
        "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
        "-device", "virtio-rng-pci",
    ]


def boot(image: Image, work: Path, accel: str, timeout: float, cpus: int = 2, memory: str = "2560M",
         log=print) -> Boot:
    """Boot once; follow the console's `ipmasq-vm:` lines; end at power-off or timeout."""
    for name in ("overlay.qcow2", "results.img", "console.log"):
        (work / name).unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.rootfs),
                    str(work / "overlay.qcow2")], check=True)
    subprocess.run(["truncate", "-s", RESULTS_SIZE, str(work / "results.img")], check=True)
    (work / "console.log").touch()
    start = time.monotonic()
    with open(work / "qemu.log", "w") as qlog:
        proc = subprocess.Popen(qemu_argv(image, work, accel, cpus, memory), stdout=qlog, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    seen, booted, how = 0, False, "powered off"
    try:
        while proc.poll() is None:
            time.sleep(2)
            elapsed = time.monotonic() - start
            text = (work / "console.log").read_text(errors="replace")
            lines = text.splitlines()
            for line in lines[seen:]:
                if "ipmasq-vm:" in line:
                    log(f"  [{elapsed:6.0f} s {accel}] {line[line.index('ipmasq-vm:'):][:200]}")
                    booted = booted or BOOTED in line
            seen = len(lines) if text.endswith("\n") else max(0, len(lines) - 1)
            if not booted and (elapsed > BOOT_SECONDS[accel] or (not text and elapsed > FIRST_OUTPUT_SECONDS[accel])):
                how = "did not boot"
                break
            if elapsed > timeout:
                how = "timed out"
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if not booted and how == "powered off":
        how = "did not boot"  # qemu itself ended before init ran (see qemu.log)
    results = work / "results"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir()
    with open(work / "results.img", "rb") as disk:
        written = disk.read(512)[257:262] == b"ustar"  # else all zeros: the guest never got there
    if written:
        with tarfile.open(work / "results.img", "r:") as tar:
            tar.extractall(results)
    return Boot(accel, time.monotonic() - start, how, work / "console.log", results)
