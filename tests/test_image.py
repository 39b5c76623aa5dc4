"""The image runs every backend.

* A wheel built from a clean tree ships masq.o, compiled by setup.py; without clang (or
  its headers) the build stops with one line naming what is missing.
* deploy/Containerfile, built from a clean tree (no masq.o in it) FROM a bookworm made here
  (tests/containerimage.py: mmdebstrap, no registry), compiles masq.o in its build stage
  and ships it; `ipmasq selftest` in that image, run as deploy/kubernetes/daemonset.yaml
  runs the agent (its capabilities, nothing else; read-only root; the bpffs mount, here
  a bpffs of its own), passes on every backend, ebpf included. The container has a
  network namespace of its own (--network none) and the selftest makes its own inside.

Slow (about 2 minutes with the base cached, 4 without): deselect with
`-m "not image"`. Nothing is left behind but the cached base under /var/cache/ipmasq-image.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ipmasq_legacy import backends
from tests import containerimage as ci

ROOT = Path(__file__).resolve().parent.parent
DAEMONSET = ROOT / "deploy" / "kubernetes" / "daemonset.yaml"
TAG = "localhost/ipmasq-legacy:test"
# EM_BPF in the ELF header: what clang -target bpf writes
EM_BPF = 247

pytestmark = pytest.mark.image


def _root():
    if os.geteuid() != 0:
        pytest.skip("needs root (podman, mmdebstrap, network namespaces)")


# ---------------------------------------------------------------- the wheel


def _wheel(tree: Path, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                           "-w", str(out), str(tree)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_wheel_from_a_clean_tree_ships_masq_o(tmp_path):
    if shutil.which("clang") is None:
        pytest.skip("no clang here: run bash scripts/setup")
    tree = ci.clean_tree(tmp_path)
    assert not (tree / "ipmasq_legacy" / "bpf" / "masq.o").exists()
    proc = _wheel(tree, tmp_path / "dist")
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("ipmasq_legacy-*.whl"))
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        data = zf.read("ipmasq_legacy/bpf/masq.o")
    assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == EM_BPF


@pytest.mark.parametrize("clang", ["missing", "no headers"])
def test_wheel_without_clang_or_headers_is_refused_in_one_line(tmp_path, clang):
    tree = ci.clean_tree(tmp_path)
    if clang == "missing":
        env = {"CLANG": str(tmp_path / "no-such-clang")}
        want = "no clang found"
    else:
        if shutil.which("clang") is None:
            pytest.skip("no clang here: run bash scripts/setup")
        fake = tmp_path / "clang"
        fake.write_text(f'#!/bin/sh\nexec {shutil.which("clang")} -nostdinc "$@"\n')
        fake.chmod(0o755)
        env = {"CLANG": str(fake)}
        want = "fatal error: 'linux/bpf.h' file not found"
    proc = _wheel(tree, tmp_path / "dist", env)
    assert proc.returncode != 0
    lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if "ipmasq-legacy: cannot build" in line]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert want in lines[0] and "apt-get install clang libbpf-dev linux-libc-dev" in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not list((tmp_path / "dist").glob("*.whl"))
    assert not (tree / "ipmasq_legacy" / "bpf" / "masq.o").exists()


# ---------------------------------------------------------------- the image


def daemonset_options(bpffs: Path) -> list[str]:
    """`podman run` options for the container deploy/kubernetes/daemonset.yaml describes:
    its capabilities (all dropped but those added), user, read-only root, RuntimeDefault
    seccomp (podman's default), its bpffs and xtables-lock mounts (the bpffs here is one
    of the run's own; the node's is never touched)."""
    spec = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert not sc.get("privileged"), "the DaemonSet is not privileged: neither is this run"
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    caps = sc["capabilities"]
    opts = ["--user", str(sc["runAsUser"]), *[f"--cap-drop={c}" for c in caps["drop"]],
            *[f"--cap-add={c}" for c in caps["add"]]]
    if sc.get("readOnlyRootFilesystem"):
        opts.append("--read-only")
    hostpaths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert hostpaths["bpffs"] == "/sys/fs/bpf" and mounts["bpffs"] == "/sys/fs/bpf"
    opts += ["-v", f"{bpffs}:{mounts['bpffs']}"]
    opts += ["-v", f"/run/xtables.lock:{mounts['xtables-lock']}"]  # the sandbox's: the node's lock
    return opts


# The selftest's test bed writes sysctls in its own namespaces: /proc/sys writable (the
# agent does not need it; Kubernetes has no such option short of privileged). The one
# addition to the DaemonSet's container.
SELFTEST = ["--security-opt", "unmask=/proc/sys"]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The image built from a clean tree; yields (builder, context, timings, build output)."""
    _root()
    reason = ci.missing()
    if reason:
        pytest.skip(reason)
    times = {}
    cached = any(ci.cache_root().glob(f"{ci.SUITE}-{ci.base_key()}.tar"))
    base, times["base (cached)" if cached else "base (built)"] = ci.timed(ci.ensure_base)
    context = ci.clean_tree(tmp_path_factory.mktemp("image"))
    with ci.builder() as b:
        _, times["import"] = ci.timed(b.import_base, base)
        proc, times["build"] = ci.timed(b.build, context, TAG)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, "podman build failed: " + " | ".join(ci.step_errors(output))
        yield b, context, times, output
    print("image test times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))


def test_build_compiles_masq_o_and_the_image_ships_it(image):
    b, context, _times, output = image
    assert not (context / "ipmasq_legacy" / "bpf" / "masq.o").exists(), "the context had a masq.o"
    assert re.search(r"Successfully installed .*ipmasq-legacy-", output), output[-2000:]
    probe = ("import importlib.resources as r, json; o = r.files('ipmasq_legacy') / 'bpf/masq.o'; "
             "import shutil; d = o.read_bytes(); "
             "print(json.dumps([str(o), d[:4].hex(), int.from_bytes(d[18:20], 'little'), shutil.which('clang')]))")
    proc = b.run(TAG, "-c", probe, options=["--entrypoint", "python3"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    path, magic, machine, clang = json.loads(proc.stdout)
    assert path.startswith("/opt/ipmasq-legacy/lib/") and magic == "7f454c46" and machine == EM_BPF
    assert clang is None  # no compiler in the runtime image: the object is the build stage's


def test_selftest_in_the_image_passes_every_backend(image):
    b, _context, times, _output = image
    opts = daemonset_options(b.bpffs()) + SELFTEST
    t0 = time.monotonic()
    proc = b.run(TAG, "selftest", options=opts, timeout=600)
    times["selftest"] = time.monotonic() - t0
    print(proc.stdout)
    rows = {}
    for line in proc.stdout.splitlines()[1:-1]:
        m = re.match(r"^(\S+)\s+(.*?)\s+(\d+)/(\d+)\s+(pass|FAIL.*)$", line)
        assert m, f"unreadable selftest line: {line!r}"
        rows.setdefault(m.group(1), []).append((m.group(2), m.group(5)))
    assert set(rows) == set(backends.NAMES), (rows, proc.stderr)
    failed = {name: [r for r in rs if r[1] != "pass"] for name, rs in rows.items()}
    assert not any(failed.values()), failed
    assert all(len(rs) >= 4 for rs in rows.values()), rows  # the cases and the flush, not just "available"
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_doctor_in_the_image(image):
    """What `doctor` says in the DaemonSet's container: every backend available, masq.o
    found in the venv, nothing pointing at a checkout's set-up script."""
    b, _context, _times, _output = image
    proc = b.run(TAG, "doctor", "--output", "json", options=daemonset_options(b.bpffs()), timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["backends"] == {name: "available" for name in backends.NAMES}, report["backends"]
    assert "scripts/setup" not in proc.stdout


def test_selftest_without_a_writable_proc_sys_says_so(image):
    """The DaemonSet's container as it is: /proc/sys read-only. One line, exit 2, no bed."""
    b = image[0]
    proc = b.run(TAG, "selftest", options=daemonset_options(b.bpffs()), timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "/proc/sys is read-only" in lines[0] and "unmask=/proc/sys" in lines[0], lines[0]
    assert proc.stdout == ""


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    """A build that fails: podman's answer is kept, and closing the builder removes its
    network namespace, slirp4netns, the sandbox's processes, cgroups and storage."""
    _root()
    reason = ci.missing()
    if reason:
        pytest.skip(reason)
    context = tmp_path / "ctx"
    (context / "deploy").mkdir(parents=True)
    (context / "deploy" / "Containerfile").write_text("ARG BASE\nFROM ${BASE}\nRUN echo ipmq-fails-here; exit 3\n")
    b = ci.Builder()
    try:
        b.import_base(ci.ensure_base())
        proc = b.build(context, "localhost/ipmasq-legacy:fails")
        assert proc.returncode != 0 and "ipmq-fails-here" in proc.stdout + proc.stderr
        netns, slirp, folder, cgroups = b.netns, b.slirp, b.sb.dir, [Path(p) / b.sb.name for p in b.sb.cgroups]
    finally:
        b.close()
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert slirp.poll() is not None
    assert not folder.exists()
    assert not [c for c in cgroups if c.exists()]
