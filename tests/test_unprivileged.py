"""The suite as an unprivileged user (nobody): the decision tests (fakes of the kernel,
renders, config, the CLI over a fake) pass without root, and the tests that need root
skip, never fail.

The checkout and the venv's libraries are copied to a world-readable directory first: a
CI clone under /root is not readable by nobody, and the venv's interpreter may live
there too (pyenv), so the copy runs under a system interpreter of the same version.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
MIN_PASSED = 250  # the floor README "Set up, run, test" promises
SKIPPED_FILES = ("tests/test_image.py", "tests/reliability")  # root-only whole files, slow to collect


def _interpreter(env: dict) -> str:
    """An interpreter of this Python's version that nobody may run."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    # the real file, not a venv's link to it (a link into /root can run once and then
    # refuse the tests' own `sys.executable` children); the check spawns such a child too
    check = "import subprocess, sys; subprocess.run([sys.executable, '-c', ''], check=True); print(sys.version_info[:2])"
    for candidate in (os.path.realpath(sys.executable), f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        try:
            proc = subprocess.run([*NOBODY, candidate, "-c", check],
                                  capture_output=True, text=True, env=env, timeout=60)
        except OSError:
            continue
        if proc.returncode == 0 and proc.stdout.strip() == str(sys.version_info[:2]):
            return candidate
    pytest.fail(f"no Python {version} that nobody may run (tried {sys.executable}, /usr/bin, /usr/local/bin)")


def _tracked(root: Path) -> list[str]:
    proc = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, text=True)
    if proc.returncode == 0 and proc.stdout:
        return [p for p in proc.stdout.split("\0") if p]
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not {".git", ".venv", "__pycache__"} & set(p.relative_to(root).parts)]


def _summary(output: str) -> dict[str, int]:
    """pytest -q's last line: '3 failed, 393 passed, 485 skipped, ... in 59.3s'."""
    last = next((ln for ln in reversed(output.splitlines()) if re.search(r" in [0-9.]+s", ln)), "")
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last)}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody (and this run is unprivileged already)")
def test_suite_passes_as_nobody():
    stage = Path(tempfile.mkdtemp(prefix="ipmasq-unprivileged-", dir="/tmp"))
    try:
        stage.chmod(0o755)
        tree, libs = stage / "checkout", stage / "site-packages"
        for rel in _tracked(CHECKOUT):
            src = CHECKOUT / rel
            if src.is_file() or src.is_symlink():  # ipmasq_legacy/rules is a link to ../rules
                (tree / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, tree / rel, follow_symlinks=False)
        shutil.copytree(sysconfig.get_paths()["purelib"], libs, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "__editable__*", "*.pth", "ipmasq_legacy*"))
        subprocess.run(["chmod", "-R", "a+rX", str(stage)], check=True)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": str(tree),
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": f"{tree}:{libs}"}
        python = _interpreter(env)
        ignores = [f"--ignore={p}" for p in SKIPPED_FILES]
        proc = subprocess.run([*NOBODY, python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ignores],
                              cwd=tree, env=env, capture_output=True, text=True, timeout=1200)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    counts = _summary(proc.stdout)
    print("as nobody:", counts)
    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith("E ")][:30]  # the first failures' causes
    tail = "\n".join(errors + proc.stdout.splitlines()[-25:])
    assert counts, f"no pytest summary (exit {proc.returncode}): {proc.stderr[-2000:]}\n{tail}"
    assert counts.get("failed", 0) == 0 and counts.get("error", 0) + counts.get("errors", 0) == 0, tail
    assert counts.get("passed", 0) >= MIN_PASSED, tail
    assert counts.get("skipped", 0) > 0, "the root-only tests should have been skipped, not run"
