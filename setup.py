"""The eBPF datapath is part of the package: every build (wheel, `pip install`, an editable
install) compiles ipmasq_legacy/bpf/masq.c to masq.o with clang first, or stops with one
line saying what is missing. Everything else is in setup.cfg and pyproject.toml.

$CLANG names the compiler (default: clang on PATH). An up-to-date masq.o (newer than
masq.c) is kept, so a tree that `scripts/setup` compiled builds without clang."""

import os
import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HINT = "clang and the headers of libbpf-dev and linux-libc-dev (Debian, Ubuntu: apt-get install clang libbpf-dev linux-libc-dev)"


def compile_bpf(bpf: Path) -> None:
    src, obj = bpf / "masq.c", bpf / "masq.o"
    if obj.exists() and obj.stat().st_mtime >= src.stat().st_mtime:
        return
    clang = shutil.which(os.environ.get("CLANG") or "clang")
    if clang is None:
        raise SystemExit(f"ipmasq-legacy: cannot build the eBPF datapath {obj}: no clang found; it needs {HINT}")
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    argv = [clang, "-O2", "-g", "-Wall", "-target", "bpf", f"-I/usr/include/{multiarch}", "-c", str(src),
            "-o", str(obj)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        obj.unlink(missing_ok=True)
        lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
        first = next((line for line in lines if "error" in line), lines[0])
        raise SystemExit(f"ipmasq-legacy: cannot build the eBPF datapath {obj}: {first.strip()[:300]}; it needs {HINT}")


class BuildPy(build_py):
    def run(self):
        compile_bpf(Path(__file__).resolve().parent / "ipmasq_legacy" / "bpf")
        super().run()


setup(cmdclass={"build_py": BuildPy})
