"""The command line as an operator meets it: names, options, output forms, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from ipmasq_legacy import __version__

IPMASQ = [sys.executable, "-m", "ipmasq_legacy"]


def run(*args, env=None, user=None):
    full_env = {**os.environ, "IPMASQ_CONFIG": "", **(env or {})}
    argv = [*IPMASQ, *args]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, env=full_env)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_version_and_help():
    assert run("--version").stdout.strip() == f"ipmasq, version {__version__}"
    out = run("--help").stdout
    for command in ("plan", "apply", "flush", "status", "list", "reconcile"):
        assert command in out
    assert "--egress-masquerade-interfaces" in run("apply", "--help").stdout


def test_plan_default_config_prints_rules(tmp_path):
    proc = run("plan", env={"IPMASQ_STATE_DIR": str(tmp_path)})
    assert proc.returncode == 0
    assert "-A IPMASQ-LEGACY ! -o lo -j MASQUERADE" in proc.stdout or "masquerade" in proc.stdout


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root to drop to nobody")
def test_plan_needs_no_root(tmp_path):
    # (how fast it is, is measured in bench/, not asserted here)
    proc = run("plan", env={"IPMASQ_STATE_DIR": str(tmp_path / "state")}, user="65534")
    assert proc.returncode == 0, proc.stderr
    assert "COMMIT" in proc.stdout or "table" in proc.stdout
    assert not (tmp_path / "state").exists()  # touched nothing


def test_plan_json(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("egress-masquerade-interfaces: eth+\nipv4-native-routing-cidr: 10.0.0.0/8\n")
    data = json.loads(run("plan", "--config", str(cfg), "--backend", "iptables-legacy", "-o", "json").stdout)
    assert data["backend"] == "iptables-legacy"
    assert data["plan"]["families"]["ipv4"]["exempt"] == ["10.0.0.0/8", "224.0.0.0/4"]  # multicast: always
    assert data["plan"]["families"]["ipv4"]["interfaces"] == ["eth+"]
    assert "-A IPMASQ-LEGACY -o eth+ -j MASQUERADE" in data["render"]


@pytest.mark.parametrize("args, fragment", [
    (["plan", "--datapath", "bogus"], "key 'datapath' on the command line"),
    (["plan", "--backend", "bogus"], "'bogus' is not one of"),
    (["plan", "--ipv4-native-routing-cidr", "10.0.0.1/8"], "did you mean 10.0.0.0/8"),
    (["plan", "--config", "/nonexistent/c.yaml"], "/nonexistent/c.yaml: no such file"),
    (["plan", "--no-such-option"], "No such option"),
    (["nosuchcommand"], "No such command"),
])
def test_usage_and_config_errors_exit_2_with_one_line(args, fragment):
    proc = run(*args)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
