"""The code checks the project holds itself to, in the suite so CI runs them: mypy over
the package (its settings in setup.cfg) and ruff over the package and the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]


def _tool(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=CHECKOUT, capture_output=True, text=True,
                          timeout=600)


def test_mypy_is_clean():
    proc = _tool("mypy", "--no-error-summary", "--cache-dir", "/dev/null", "ipmasq_legacy")
    assert "No module named mypy" not in proc.stderr, "mypy missing: run `bash scripts/setup` (extra 'lint')"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff_is_clean():
    try:
        from ruff.__main__ import find_ruff_bin  # the binary the ruff package installs beside the interpreter
    except ImportError:
        pytest.fail("ruff missing: run `bash scripts/setup` (extra 'lint')")
    try:
        find_ruff_bin()
    except Exception:  # the suite as nobody runs from a copy of the libraries, without their binaries
        pytest.skip(f"ruff's binary is not installed for {sys.executable}")
    proc = _tool("ruff", "check", "ipmasq_legacy", "tests", "bench")
    assert "No module named ruff" not in proc.stderr, "ruff missing: run `bash scripts/setup` (extra 'lint')"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
