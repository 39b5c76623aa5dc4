"""deploy/Containerfile, built and run on this machine for tests/test_image.py.

No image registry is reachable here, so the base the Containerfile names (Debian bookworm)
is made locally: mmdebstrap (minbase and ca-certificates, like debian:bookworm-slim) with
what this machine's apt and pip need to reach their registries (tests/vm/hostcfg.py, as
the VM guests get it: the Debian mirror, apt's options, the extra CA certificates, pip's
configuration and PIP_* settings). The tarball is cached under /var/cache/ipmasq-image
(IPMASQ_IMAGE_CACHE), keyed by its content, and imported into each run's own storage.
The Containerfile is built unchanged but for `--build-arg BASE=`: its RUN steps run
apt-get and pip against the real registries, and setup.py compiles masq.o with clang.

podman runs in a neighbours sandbox (tests/neighbours.py: private mount namespace,
private /run, private storage and network configuration, its own cgroups, all removed
afterwards) inside a private network namespace `ipmq-<pid>x<hex>-image`, whose only way
out is slirp4netns: user-mode NAT through sockets of an ordinary process, as the VMs'
qemu does. Nothing is created in the machine's own network namespace: `--network host`
for the build's RUN steps means that private namespace (netavark is never asked for a
network), and containers run with `--network none`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import textwrap
import time
import types
from pathlib import Path

from tests.neighbours import Sandbox, _ulimits, wait_until
from tests.vm import hostcfg

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
FORMAT = 1  # bump when the base's build steps change what it holds
SUITE = "bookworm"  # the Containerfile's BASE
BASE = "localhost/ipmasq-test-base:bookworm"
BASE_PACKAGES = ("ca-certificates",)
# debian:bookworm-slim's dpkg excludes: no manuals, documentation or translations
SLIM = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/info/*", "/usr/share/locale/*",
        "/usr/share/lintian/*", "/usr/share/linda/*")
ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROGRAMS = ("podman", "mmdebstrap", "slirp4netns", "runc", "conmon", "git")


def missing() -> str | None:
    """Why the image cannot be built here (None: it can)."""
    gone = [p for p in PROGRAMS if shutil.which(p) is None]
    if gone:
        return f"not installed: {', '.join(gone)}; run bash scripts/setup-image"
    if not (ROOT / ".git").exists():
        return f"{ROOT} is not a git checkout (the build context is its tracked files)"
    return None


# ---------------------------------------------------------------- the base


def cache_root() -> Path:
    return Path(os.environ.get("IPMASQ_IMAGE_CACHE", "/var/cache/ipmasq-image"))


def sources() -> list[str]:
    archive, security = hostcfg.mirrors()
    return [f"deb {archive} {SUITE} main", f"deb {archive} {SUITE}-updates main",
            f"deb {security} {SUITE}-security main"]


def pip_user_conf() -> bytes | None:
    """hostcfg's PIP_* and CA-bundle variables as root's pip.conf (RUN steps get no host
    environment): PIP_DEFAULT_TIMEOUT=180 -> default-timeout = 180; a CA bundle variable ->
    cert = the image's bundle, which update-ca-certificates builds with the same CAs."""
    env = hostcfg.environment()
    lines = [f"{k[4:].lower().replace('_', '-')} = {v}" for k, v in sorted(env.items())
             if k.startswith("PIP_") and k != "PIP_CERT"]
    if any(k in env for k in hostcfg.CA_VARS):
        lines.append("cert = /etc/ssl/certs/ca-certificates.crt")
    return ("[global]\n" + "\n".join(lines) + "\n").encode() if lines else None


def baked_files() -> dict[str, bytes]:
    """What the base gets from this machine, by path in the image."""
    files = {**hostcfg.ca_certificates(), **hostcfg.pip_files()}
    options = hostcfg.apt_options()
    if options:
        files["/etc/apt/apt.conf.d/00ipmasq-image-host"] = ("\n".join(options) + "\n").encode()
    conf = pip_user_conf()
    if conf:
        files["/root/.config/pip/pip.conf"] = conf
    return files


def base_key() -> str:
    h = hashlib.sha256(json.dumps([FORMAT, SUITE, BASE_PACKAGES, SLIM, sources(),
                                   hostcfg.apt_options()]).encode())
    for path, data in sorted(baked_files().items()):
        h.update(path.encode() + b"\0" + data)
    return h.hexdigest()[:12]


def ensure_base(log=print) -> Path:
    """The base's rootfs tarball, built first if the cache has none of this content."""
    path = cache_root() / f"{SUITE}-{base_key()}.tar"
    if path.exists():
        return path
    cache_root().mkdir(parents=True, exist_ok=True)
    for old in cache_root().glob(f"{SUITE}-*.tar"):
        log(f"removing the stale base {old}")
        old.unlink()
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache_root()) as tmp:
        stage = Path(tmp) / "stage"
        for image_path, data in baked_files().items():
            dest = stage / image_path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        stage.mkdir(exist_ok=True)
        out = Path(tmp) / "base.tar"
        argv = ["mmdebstrap", "--mode=root", "--variant=minbase", "--format=tar",
                *[f"--aptopt={line}" for line in hostcfg.apt_options()],
                *[f"--dpkgopt=path-exclude={p}" for p in SLIM],
                "--include=" + ",".join(BASE_PACKAGES),
                f"--customize-hook=cp -a {stage}/. \"$1\"/",
                "--customize-hook=chroot \"$1\" update-ca-certificates --fresh >/dev/null",
                "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin",
                SUITE, str(out), *sources()]
        log(f"building the base {path.name} (mmdebstrap {SUITE} minbase)")
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError("mmdebstrap failed: " + " | ".join(tail))
        out.rename(path)
    return path


# ---------------------------------------------------------------- the build context


def clean_tree(dest: Path) -> Path:
    """The checkout's files as a clean clone has them (tracked, plus new files not yet
    committed; nothing git ignores: no masq.o, .venv or caches) under dest/src."""
    src = dest / "src"
    names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in names)):
        source = ROOT / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    return src


# ---------------------------------------------------------------- podman in its sandbox


class Builder:
    """podman with private storage in a sandbox in a private network namespace with
    user-mode NAT; see the module doc. close() removes everything (also on failure)."""

    def __init__(self, log=print):
        self.log = log
        self.netns = f"ipmq-{os.getpid()}x{secrets.token_hex(3)}-image"
        self.slirp: subprocess.Popen | None = None
        self.exit_w: int | None = None
        self.sb: Sandbox | None = None
        self.mounted: list[str] = []
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True, capture_output=True)
        # tap0 in the private namespace (10.0.2.100/24, gateway 10.0.2.2, DNS 10.0.2.3);
        # the host's loopback is not reachable through it. It exits when this process's
        # end of the exit pipe closes: also when this process is killed.
        exit_r, self.exit_w = os.pipe()
        try:
            self.slirp = subprocess.Popen(
                ["slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback", f"--exit-fd={exit_r}",
                 "--netns-type=path", f"/run/netns/{self.netns}", "tap0"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, pass_fds=(exit_r,))
        finally:
            os.close(exit_r)

        def up() -> bool:
            out = subprocess.run(["ip", "-n", self.netns, "-4", "route", "show", "default"],
                                 capture_output=True, text=True).stdout
            return "tap0" in out or self.slirp.poll() is not None

        wait_until(up, "slirp4netns's tap0", timeout=20)
        if self.slirp.poll() is not None:
            raise RuntimeError(f"slirp4netns exited {self.slirp.returncode}: {self.slirp.stderr.read()}")
        self.sb = Sandbox(types.SimpleNamespace(node=self.netns))
        d = self.sb.dir
        (d / "etc" / "resolv.conf").write_text("nameserver 10.0.2.3\n")
        self.sb.run(["mount", "--bind", str(d / "etc" / "resolv.conf"), "/etc/resolv.conf"])
        self.root = d / "data" / "storage"
        self.root.mkdir(parents=True)
        conf = d / "etc" / "containers.conf"
        conf.write_text(textwrap.dedent(f"""\
            [containers]
            cgroups = "enabled"
            [engine]
            cgroup_manager = "cgroupfs"
            events_logger = "file"
            events_logfile_path = "{d}/log/podman-events.log"
            tmp_dir = "/run/libpod"
            [network]
            network_backend = "netavark"
            network_config_dir = "{d}/etc/containers/networks"
            """))
        storage = d / "etc" / "storage.conf"
        storage.write_text(f'[storage]\ndriver = "overlay"\nrunroot = "/run/containers/storage"\n'
                           f'graphroot = "{self.root}"\n')
        self.env = {"CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage)}

    def podman(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return self.sb.run(["podman", "--root", str(self.root), "--runroot", "/run/containers/storage",
                            "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs",
                            "--events-backend", "file", *args], env=self.env, timeout=timeout, check=check)

    def import_base(self, tarball: Path) -> None:
        self.podman("import", "--change", f"ENV PATH={ENV_PATH}", "--change", 'CMD ["bash"]',
                    str(tarball), BASE)

    def build(self, context: Path, tag: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """deploy/Containerfile (the context's copy) FROM the local base; RUN steps on the
        private namespace's user-mode network."""
        return self.podman("build", "--network", "host", "--runtime", "runc", "--layers=false",
                           "--cgroup-parent", self.sb.cgroup_parent, "--pull=never",
                           "--build-arg", f"BASE={BASE}", "-f", str(context / "deploy" / "Containerfile"),
                           "-t", tag, str(context), timeout=timeout, check=False)

    def bpffs(self) -> Path:
        """A bpf filesystem of its own (mounted in the sandbox), for a container's /sys/fs/bpf
        as the DaemonSet mounts the node's."""
        path = Path(tempfile.mkdtemp(prefix="bpffs-", dir=self.sb.dir))
        self.sb.run(["mount", "-t", "bpf", "ipmq-bpffs", str(path)])
        return path

    def run(self, image: str, *args: str, options: list[str] = (), timeout: float = 600,
            check: bool = False) -> subprocess.CompletedProcess:
        """`podman run --rm` of `image` in a network namespace of its own (--network none)."""
        return self.podman("run", "--rm", "--network", "none", "--runtime", "runc",
                           "--cgroup-parent", self.sb.cgroup_parent, "--pull=never", *_ulimits(),
                           *options, image, *args, timeout=timeout, check=check)

    def close(self) -> None:
        errors = []
        if self.sb is not None:
            try:
                self.sb.close()  # every process of the sandbox (podman, conmon, containers), its mounts
            except AssertionError as exc:
                errors.append(str(exc))
        if self.exit_w is not None:
            os.close(self.exit_w)
            self.exit_w = None
        if self.slirp is not None:
            try:
                self.slirp.wait(5)
            except subprocess.TimeoutExpired:
                self.slirp.kill()
                self.slirp.wait()
        if self.netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        if errors:
            raise AssertionError("; ".join(errors))


@contextlib.contextmanager
def builder(log=print):
    b = Builder(log)
    try:
        yield b
    finally:
        b.close()


def timed(fn, *args, **kw):
    t0 = time.monotonic()
    out = fn(*args, **kw)
    return out, time.monotonic() - t0


def step_errors(output: str) -> list[str]:
    """The lines of a build's output that say why it failed."""
    return [line for line in output.splitlines() if re.search(r"error|Error|E: |exit status", line)][-8:]
