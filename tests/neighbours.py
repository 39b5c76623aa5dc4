"""The real neighbours of a node: dockerd, podman with netavark, firewalld (with its own
dbus-daemon), run inside a test bed's node namespace, for tests/test_neighbours.py.

Everything runs in a `Sandbox`: a private mount namespace inside the node's network
namespace (never the machine's own), with

* a fresh tmpfs on /run (so /run/docker, /run/containerd, /run/containers, /run/netns,
  /run/dbus, /run/firewalld ... are private; only the host's /run/xtables.lock is bound
  in, so that iptables-legacy writers in the node stay serialised with ipmasq),
* private copies bound over /etc/firewalld and /etc/containers, private data roots under
  a temporary folder (dockerd --data-root, podman --root),
* the cgroup hierarchies mounted again (`ip netns exec` remounts /sys), and every process
  of the sandbox, containers included (`--cgroup-parent`), in cgroup /<name> of each
  hierarchy.

`Sandbox.close()` (also on failure: use the context managers) kills every process of
that cgroup and of the sandbox's mount namespace, removes the cgroups and the folder.
Nothing is written outside the sandbox but the temporary folder and the cgroups.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path

from .testbed import TestBed

IMAGE = "ipmq/busybox:1"
# the CGI every server container (and the ext server) answers with: the peer it saw
PEER_CGI = '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n%s %s\\n" "$REMOTE_ADDR" "$REMOTE_PORT"\n'
BUSYBOX = "/bin/busybox"

PROGRAMS = {
    "docker": ["dockerd", "containerd", "runc", "/usr/bin/docker", BUSYBOX],
    "podman": ["podman", "/usr/lib/podman/netavark", "conmon", BUSYBOX],
    "firewalld": ["firewalld", "firewall-cmd", "dbus-daemon"],
}


def missing(neighbour: str) -> str | None:
    """Why `neighbour` cannot run here (None: it can): programs not installed."""
    gone = [p for p in PROGRAMS[neighbour] if not (os.access(p, os.X_OK) if p.startswith("/") else shutil.which(p))]
    if gone:
        return f"{neighbour}: not installed ({', '.join(gone)}); run scripts/setup-neighbours"
    return None


# ---------------------------------------------------------------- the sandbox


def _cgroup_mounts() -> list[tuple[str, str, str]]:
    """(mount point, fstype, options) of the machine's cgroup hierarchies."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fstype, _src, opts = right.split(" ")[:3]
        if fstype in ("cgroup", "cgroup2"):
            point = left.split(" ")[4]
            keep = [o for o in opts.split(",") if o not in ("rw", "ro") and not o.startswith("seclabel")]
            out.append((point, fstype, ",".join(keep)))
    return out


class Sandbox:
    """A private mount namespace inside `bed`'s node namespace; see the module doc."""

    def __init__(self, bed: TestBed):
        self.bed = bed
        self.name = f"ipmq-nb-{os.getpid()}x{secrets.token_hex(3)}"
        self.dir = Path(tempfile.mkdtemp(prefix="ipmqnb."))
        self.cgroups = [p for p, _t, _o in _cgroup_mounts()]
        # the hierarchy that tracks the sandbox's processes: v2, or v1's pids (or any)
        v2 = [p for p, t, _o in _cgroup_mounts() if t == "cgroup2" and p == "/sys/fs/cgroup"]
        v1 = [p for p, t, o in _cgroup_mounts() if t == "cgroup" and "pids" in o.split(",")]
        self.track = Path((v2 or v1 or self.cgroups)[0]) / self.name
        self.procs = self.track / "daemons" / "cgroup.procs"
        self.cgroup_parent = f"/{self.name}/ctr"
        self.holder: subprocess.Popen | None = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        (self.track / "daemons").mkdir(parents=True)
        for sub in ("etc", "data", "tmp", "log", "bin"):
            (self.dir / sub).mkdir()
        Path("/run/xtables.lock").touch()  # what iptables does anyway; shared with the sandbox
        shutil.copytree("/etc/containers", self.dir / "etc/containers", symlinks=True)
        (self.dir / "etc/containers/networks").mkdir(exist_ok=True)
        if os.path.isdir("/etc/firewalld"):
            shutil.copytree("/etc/firewalld", self.dir / "etc/firewalld", symlinks=True)
        mounts = ["mount -t tmpfs -o mode=755 ipmq-cgroup /sys/fs/cgroup"]
        for point, fstype, opts in _cgroup_mounts():
            mounts.append(f"mkdir -p {point} && mount -t {fstype} -o {opts or 'rw'} {fstype} {point}"
                          if point != "/sys/fs/cgroup" else f"mount -t {fstype} {fstype} {point}")
        host_run = self.dir / "hostrun"
        host_run.mkdir()
        mounts += [
            f"mount --bind /run {host_run}",
            "mount -t tmpfs -o mode=755 ipmq-run /run",
            "touch /run/xtables.lock",
            f"mount --bind {host_run}/xtables.lock /run/xtables.lock",
            f"umount -l {host_run}",
            "mkdir -p /run/netns /run/dbus /run/lock",
            f"mount --bind {self.dir}/etc/containers /etc/containers",
        ]
        if (self.dir / "etc/firewalld").exists():
            mounts.append(f"mount --bind {self.dir}/etc/firewalld /etc/firewalld")
        for lib in ("docker", "containerd", "containers", "firewalld"):
            if os.path.isdir(f"/var/lib/{lib}"):
                (self.dir / "data" / lib).mkdir(exist_ok=True)
                mounts.append(f"mount --bind {self.dir}/data/{lib} /var/lib/{lib}")
        script = "set -e\n" + "\n".join(mounts) + "\necho ready\nexec sleep infinity\n"
        self.holder = subprocess.Popen(
            ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.procs),
             "ip", "netns", "exec", self.bed.node, "unshare", "--mount", "--propagation", "private",
             "sh", "-c", script],
            stdout=subprocess.PIPE, stderr=open(self.dir / "log/holder.log", "w"), text=True)
        line = self.holder.stdout.readline().strip()
        if line != "ready":
            self.holder.kill()
            raise RuntimeError(f"sandbox did not start: {(self.dir / 'log/holder.log').read_text()}")
        self.mntns = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")

    def _argv(self, argv: list[str]) -> list[str]:
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.procs),
                "nsenter", "-t", str(self.holder.pid), "-m", "-n", "--", *argv]

    def prefix(self) -> list[str]:
        """argv prefix that runs a command in the sandbox (for Popen elsewhere)."""
        return self._argv([])

    def env(self, extra: dict | None = None) -> dict:
        env = {**os.environ, "TMPDIR": str(self.dir / "tmp"),
               "PATH": f"{self.dir / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin"}
        env.pop("DOCKER_HOST", None)
        env.update(extra or {})
        return env

    def run(self, argv: list[str], env: dict | None = None, input: str | bytes | None = None,
            timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run `argv` in the sandbox; text output; with `check`, a non-zero exit is an error
        that shows the command's stderr."""
        proc = subprocess.run(self._argv(argv), env=self.env(env), input=input, timeout=timeout,
                              capture_output=True, text=not isinstance(input, bytes))
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr}{proc.stdout}")
        return proc

    def popen(self, argv: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        """Start a long-running `argv` in the sandbox, its output appended to log/<log>."""
        with open(self.dir / "log" / log, "a") as out:
            return subprocess.Popen(self._argv(argv), env=self.env(env), stdout=out, stderr=subprocess.STDOUT)

    def log(self, name: str) -> str:
        path = self.dir / "log" / name
        return path.read_text(errors="replace") if path.exists() else ""

    def _pids(self) -> set[int]:
        pids = set()
        for root in [Path(p) / self.name for p in self.cgroups]:
            for procs in root.rglob("cgroup.procs") if root.exists() else []:
                with contextlib.suppress(OSError):
                    pids.update(int(x) for x in procs.read_text().split())
        if getattr(self, "mntns", None):
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{entry}/ns/mnt") == self.mntns:
                            pids.add(int(entry))
        pids.discard(os.getpid())
        return pids

    def close(self) -> None:
        """Kill every process of the sandbox (daemons, shims, containers), remove its
        cgroups and its folder. Safe to call twice."""
        deadline = time.monotonic() + 20
        while True:
            pids = self._pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise AssertionError(f"sandbox {self.name}: processes would not die: {sorted(pids)}")
            time.sleep(0.05)
        if self.holder is not None:
            with contextlib.suppress(Exception):
                self.holder.wait(5)
        errors = []
        for root in [Path(p) / self.name for p in self.cgroups]:
            if root.exists():
                for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [root]:
                    for _ in range(50):
                        try:
                            d.rmdir()
                            break
                        except FileNotFoundError:
                            break
                        except OSError as exc:  # EBUSY while the kernel lets go of a dead task
                            err = exc
                            time.sleep(0.05)
                    else:
                        errors.append(f"{d}: {err}")
        shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise AssertionError(f"sandbox {self.name}: cgroups left: {errors}")


@contextlib.contextmanager
def sandbox(bed: TestBed):
    sb = Sandbox(bed)
    try:
        yield sb
    finally:
        sb.close()


def wait_until(condition, what: str, timeout: float = 30.0, interval: float = 0.05) -> float:
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"no {what} within {timeout}s")
        time.sleep(interval)


def use_iptables(sb: Sandbox, variant: str) -> None:
    """`iptables` (and ip6tables, -save, -restore) on the sandbox's PATH is `variant`
    (legacy or nft): what dockerd and netavark run."""
    for tool in ("iptables", "ip6tables", "iptables-save", "ip6tables-save", "iptables-restore",
                 "ip6tables-restore"):
        base, _, rest = tool.partition("-")
        target = shutil.which(f"{base}-{variant}" + (f"-{rest}" if rest else ""))
        link = sb.dir / "bin" / tool
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(target)


def set_bridge_nf(bed: TestBed, on: bool) -> None:
    """br_netfilter's bridge-nf-call-ip(6)tables in the node (Docker sets them on; a
    kubeadm node has them on): bridged frames meet the ip/ip6 hooks."""
    for key in ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"):
        bed.node_sysctl(key, int(on))


# ---------------------------------------------------------------- the image


def image_tar(dest: Path) -> Path:
    """A rootfs tarball of busybox-static: /bin/<applets>, /www/cgi-bin/peer (the CGI that
    prints the peer's address and port), /tmp, /etc/passwd."""
    path = dest / "busybox-rootfs.tar"
    if path.exists():
        return path
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()

    def add(tar, name, data=None, mode=0o644, kind=tarfile.REGTYPE, link=""):
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.linkname = kind, mode, link
        if data is not None:
            info.size = len(data)
        tar.addfile(info, io.BytesIO(data) if data is not None else None)

    with tarfile.open(path, "w") as tar:
        for d in ("bin", "etc", "tmp", "www", "www/cgi-bin", "proc", "sys", "dev"):
            add(tar, d, kind=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        add(tar, "bin/busybox", Path(BUSYBOX).read_bytes(), mode=0o755)
        for applet in applets:
            if applet != "busybox":
                add(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox")
        add(tar, "www/cgi-bin/peer", PEER_CGI.encode(), mode=0o755)
        add(tar, "etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
        add(tar, "etc/group", b"root:x:0:\n")
    return path


def www_dir(dest: Path) -> Path:
    """A document root with the peer CGI, for a busybox httpd outside containers."""
    www = dest / "www"
    (www / "cgi-bin").mkdir(parents=True, exist_ok=True)
    cgi = www / "cgi-bin" / "peer"
    cgi.write_text(PEER_CGI)
    cgi.chmod(0o755)
    return www


@contextlib.contextmanager
def peer_server(bed: TestBed, ns: str, address: str, port: int, workdir: Path):
    """busybox httpd in bed namespace `ns` on address:port answering /cgi-bin/peer."""
    www = www_dir(workdir)
    proc = subprocess.Popen(["ip", "netns", "exec", ns, BUSYBOX, "httpd", "-f", "-p", f"{address}:{port}",
                             "-h", str(www)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: f"{address}:{port} " in bed.exec_in(ns, ["ss", "-Hltn"]).stdout
                   or proc.poll() is not None, "httpd", timeout=10)
        assert proc.poll() is None, f"httpd in {ns} exited {proc.returncode}"
        yield f"http://{address}:{port}/cgi-bin/peer"
    finally:
        proc.kill()
        proc.wait()


def fetch_from(bed: TestBed, ns: str, url: str, timeout: int = 5) -> str:
    """`wget` of `url` from bed namespace `ns`: the peer the server saw ("ADDR PORT")."""
    proc = bed.exec_in(ns, [BUSYBOX, "timeout", str(timeout), BUSYBOX, "wget", "-qO-", url], timeout=timeout + 5)
    assert proc.returncode == 0, f"wget {url} from {ns}: {proc.returncode} {proc.stderr}"
    return proc.stdout.strip()


# ---------------------------------------------------------------- dockerd


class Daemon:
    """A daemon of a sandbox (self.proc), started by start(): stopped as systemd would
    (SIGTERM, then SIGKILL after STOP_TIMEOUT), restarted as `systemctl restart` would."""

    STOP_TIMEOUT = 30
    proc: subprocess.Popen | None = None

    def start(self) -> float:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> float:
        self.stop()
        return self.start()


class Dockerd(Daemon):
    """dockerd in a sandbox: `--iptables=true`, masquerade on or off (`--ip-masq`),
    private data root, exec root, pidfile and socket; the image imported."""

    def __init__(self, sb: Sandbox, ip_masq: bool = True, iptables: str = "nft", userland_proxy: bool = True):
        self.sb = sb
        self.ip_masq = ip_masq
        self.userland_proxy = userland_proxy
        use_iptables(sb, iptables)
        self.data = sb.dir / "data" / "docker"
        self.data.mkdir(parents=True, exist_ok=True)
        (sb.dir / "etc" / "daemon.json").write_text("{}\n")
        self.cli_env = {"DOCKER_CONFIG": str(sb.dir / "etc" / "docker-cli"), "DOCKER_HOST": "unix:///run/docker.sock"}
        self.proc: subprocess.Popen | None = None
        self.start()
        self.docker("import", str(image_tar(sb.dir)), IMAGE)

    def start(self) -> float:
        """Start dockerd and wait until it answers; returns the seconds it took."""
        t0 = time.monotonic()
        self.proc = self.sb.popen([
            "dockerd", "--iptables=true", f"--ip-masq={str(self.ip_masq).lower()}",
            f"--userland-proxy={str(self.userland_proxy).lower()}",
            "--data-root", str(self.data), "--exec-root", "/run/docker", "--pidfile", "/run/docker.pid",
            "-H", "unix:///run/docker.sock", "--config-file", str(self.sb.dir / "etc" / "daemon.json"),
            "--storage-driver", "vfs", "--cgroup-parent", self.sb.cgroup_parent,
            "--exec-opt", "native.cgroupdriver=cgroupfs", "--log-level", "warn",
        ], "dockerd.log")
        wait_until(lambda: self.proc.poll() is not None
                   or self.docker("version", check=False).returncode == 0, "dockerd", timeout=60, interval=0.2)
        assert self.proc.poll() is None, f"dockerd exited {self.proc.returncode}: {self.sb.log('dockerd.log')[-3000:]}"
        return time.monotonic() - t0

    STOP_TIMEOUT = 30

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.sb.run(["/usr/bin/docker", *args], env=self.cli_env, check=check, timeout=timeout)

    def run(self, name: str, *args: str, publish: str | None = None, server: bool = True) -> str:
        """A detached container `name` (busybox httpd on :80 answering /cgi-bin/peer when
        `server`, else sleeping); returns its address on the bridge."""
        argv = ["run", "-d", "--name", name, *(["-p", publish] if publish else []), *args, IMAGE]
        argv += ["httpd", "-f", "-p", "80", "-h", "/www"] if server else ["sleep", "100000"]
        self.docker(*argv)
        return self.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name).stdout.strip()

    def fetch(self, name: str, url: str, timeout: int = 5) -> str:
        """wget `url` from container `name`: the peer the server saw ("ADDR PORT")."""
        proc = self.docker("exec", name, "timeout", str(timeout), "wget", "-qO-", url, check=False,
                           timeout=timeout + 30)
        assert proc.returncode == 0, f"wget {url} from container {name}: {proc.returncode} {proc.stderr}"
        return proc.stdout.strip()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            ids = self.docker("ps", "-aq", check=False).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False)
        self.stop()


@contextlib.contextmanager
def dockerd(sb: Sandbox, **kw):
    d = Dockerd(sb, **kw)
    try:
        yield d
    finally:
        d.close()


# ---------------------------------------------------------------- podman


def _ulimits() -> list[str]:
    """podman raises RLIMIT_NOFILE and RLIMIT_NPROC for a rootful container, which root in a
    sandboxed machine (no CAP_SYS_RESOURCE) may not: small limits that fit under anything."""
    return ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]


class Podman:
    """Rootful podman with netavark in a sandbox: private storage and run roots, private
    network config dir, cgroupfs, `--network-backend netavark`; the image imported."""

    def __init__(self, sb: Sandbox, iptables: str = "nft"):
        self.sb = sb
        use_iptables(sb, iptables)
        self.root = sb.dir / "data" / "containers"
        self.root.mkdir(parents=True, exist_ok=True)
        conf = sb.dir / "etc" / "containers.conf"
        conf.write_text(textwrap.dedent(f"""\
            [containers]
            cgroups = "enabled"
            [engine]
            cgroup_manager = "cgroupfs"
            events_logger = "file"
            events_logfile_path = "{sb.dir}/log/podman-events.log"
            tmp_dir = "/run/libpod"
            helper_binaries_dir = ["/usr/lib/podman"]
            [network]
            network_backend = "netavark"
            network_config_dir = "{sb.dir}/etc/containers/networks"
            """))
        storage = sb.dir / "etc" / "storage.conf"
        storage.write_text(f'[storage]\ndriver = "vfs"\nrunroot = "/run/containers/storage"\ngraphroot = "{self.root}"\n')
        self.env = {"CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage)}
        self.podman("import", str(image_tar(sb.dir)), IMAGE)

    def podman(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.sb.run(["podman", "--network-backend", "netavark", "--root", str(self.root),
                            "--runroot", "/run/containers/storage", "--storage-driver", "vfs",
                            "--cgroup-manager", "cgroupfs", "--events-backend", "file", *args],
                           env=self.env, check=check, timeout=timeout)

    def run(self, name: str, *args: str, publish: str | None = None, server: bool = True) -> str:
        argv = ["run", "-d", "--name", name, "--cgroup-parent", self.sb.cgroup_parent, *_ulimits(),
                "--runtime", "runc",  # crun refuses cgroup v1+v2 hybrid hosts
                *(["-p", publish] if publish else []), *args, IMAGE]
        argv += ["httpd", "-f", "-p", "80", "-h", "/www"] if server else ["sleep", "100000"]
        self.podman(*argv)
        return self.podman("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name).stdout.strip()

    def fetch(self, name: str, url: str, timeout: int = 5) -> str:
        proc = self.podman("exec", name, "timeout", str(timeout), "wget", "-qO-", url, check=False,
                           timeout=timeout + 30)
        assert proc.returncode == 0, f"wget {url} from container {name}: {proc.returncode} {proc.stderr}"
        return proc.stdout.strip()

    def reload(self) -> float:
        t0 = time.monotonic()
        self.podman("network", "reload", "--all")
        return time.monotonic() - t0

    def close(self) -> None:
        self.podman("rm", "-af", "-t", "0", check=False)


@contextlib.contextmanager
def podman(sb: Sandbox, **kw):
    p = Podman(sb, **kw)
    try:
        yield p
    finally:
        p.close()


# ---------------------------------------------------------------- firewalld

DBUS_CONF = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/>
  </policy>
</busconfig>
"""


class Firewalld(Daemon):
    """firewalld with FirewallBackend `backend` (iptables or nftables) and its own system
    bus (a dbus-daemon without service activation) in a sandbox. Default zone `trusted`,
    so that its filtering lets the bed's traffic through: what is tested is what its
    start, reload and stop do to other rules."""

    def __init__(self, sb: Sandbox, backend: str):
        self.sb = sb
        self.backend = backend
        conf = sb.dir / "etc" / "firewalld" / "firewalld.conf"
        text = conf.read_text()
        for key, value in (("FirewallBackend", backend), ("DefaultZone", "trusted")):
            text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        conf.write_text(text)
        (sb.dir / "etc" / "dbus.conf").write_text(DBUS_CONF)
        self.bus = sb.popen(["dbus-daemon", "--config-file", str(sb.dir / "etc" / "dbus.conf"), "--nofork",
                             "--nopidfile"], "dbus.log")
        wait_until(lambda: self.sb.run(["test", "-S", "/run/dbus/system_bus_socket"], check=False).returncode == 0
                   or self.bus.poll() is not None, "system bus", timeout=10)
        assert self.bus.poll() is None, f"dbus-daemon exited: {sb.log('dbus.log')}"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> float:
        t0 = time.monotonic()
        self.proc = self.sb.popen(["firewalld", "--nofork", "--nopid", "--log-target", "console"], "firewalld.log")
        wait_until(lambda: self.proc.poll() is not None or self.cmd("--state", check=False).returncode == 0,
                   "firewalld", timeout=60, interval=0.2)
        assert self.proc.poll() is None, f"firewalld exited: {self.sb.log('firewalld.log')[-3000:]}"
        return time.monotonic() - t0

    def cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.sb.run(["firewall-cmd", *args], check=check, timeout=120)

    STOP_TIMEOUT = 60

    def reload(self, complete: bool = False) -> float:
        t0 = time.monotonic()
        self.cmd("--complete-reload" if complete else "--reload")
        return time.monotonic() - t0

    def close(self) -> None:
        self.stop()
        if self.bus.poll() is None:
            self.bus.kill()
            self.bus.wait()


@contextlib.contextmanager
def firewalld(sb: Sandbox, backend: str):
    f = Firewalld(sb, backend)
    try:
        yield f
    finally:
        f.close()


# ---------------------------------------------------------------- ip-masq-agent, emulated


def ip_masq_agent_rules(cidrs: list[str], chain: str = "IP-MASQ-AGENT", masq_link_local: bool = False) -> str:
    """The IPv4 rules ip-masq-agent v2.12.6 installs (cmd/ip-masq-agent/ip-masq-agent.go:
    EnsureChain, the POSTROUTING jump by EnsureRule(Append), then one iptables-restore
    --noflush of the chain), with the real binary's default --random-fully, written
    here as iptables-restore input with the agent's exact comments. The binary itself
    cannot be built here (its Go modules are not reachable)."""
    comment = f"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom {chain} chain"
    lines = ["*nat", f":{chain} - [0:0]",
             f'-A POSTROUTING -m comment --comment "{comment}" -m addrtype ! --dst-type LOCAL -j {chain}']
    nonmasq = '-m comment --comment "ip-masq-agent: local traffic is not subject to MASQUERADE"'
    if not masq_link_local:
        lines.append(f"-A {chain} {nonmasq} -d 169.254.0.0/16 -j RETURN")
    lines += [f"-A {chain} {nonmasq} -d {c} -j RETURN" for c in cidrs if ":" not in c]
    lines.append(f'-A {chain} -m comment --comment "ip-masq-agent: outbound traffic is subject to MASQUERADE '
                 f'(must be last in chain)" -j MASQUERADE --random-fully')
    return "\n".join(lines + ["COMMIT", ""])


# ---------------------------------------------------------------- rulesets

OURS = re.compile(r"IPMASQ|ipmasq")
_NFT_SKELETON = re.compile(r"^\s*(table .*\{|chain .*\{|type .* hook .*;.*|policy \w+;|\}|)$")


def neighbour_rules(rulesets: str) -> str:
    """`Node.rulesets()` without anything of ours (lines naming IPMASQ-* chains, ipmasq_*
    tables and sets, whole nft chains and tables of ours) and without tables that hold
    nothing (iptables: only built-in chains, policy ACCEPT, no rule; nft: no rule, set or
    map): what the neighbours installed. nft chains are listed sorted by name within their
    table (their order is that of creation; packets prove precedence, not this)."""
    out = []
    for section in re.split(r"(?m)^(?=## )", rulesets):
        if not section.strip():
            continue
        header, _, body = section.partition("\n")
        out.append(header)
        out.extend(_nft_neighbours(body) if header == "## nft" else _save_neighbours(body))
    return "\n".join(out) + "\n"


def _save_neighbours(body: str) -> list[str]:
    out, block = [], None
    for line in body.splitlines():
        if OURS.search(line):
            continue
        if line.startswith("*"):
            block = [line]
        elif block is not None:
            block.append(line)
            if line == "COMMIT":
                if not all(re.fullmatch(r":[A-Z]+ ACCEPT \[0:0\]", b) for b in block[1:-1]):
                    out.extend(block)
                block = None
        else:
            out.append(line)
    return out


def _nft_neighbours(body: str) -> list[str]:
    out, table, skip_until = [], [], None
    for line in body.splitlines():
        if skip_until is not None:  # inside a chain or table of ours
            if line == skip_until:
                skip_until = None
            continue
        if OURS.search(line) and line.rstrip().endswith("{"):
            skip_until = line[: len(line) - len(line.lstrip())] + "}"
            continue
        if OURS.search(line):
            continue
        table.append(line)
        if line == "}":  # end of a table: kept if anything but its skeleton is left
            if not all(_NFT_SKELETON.match(t) for t in table):
                out.extend(_sorted_chains(table))
            table = []
    return out + table


def _sorted_chains(table: list[str]) -> list[str]:
    """A table's chains and sets in name order: nft lists them in the order they were
    made, and a neighbour's reload (firewalld's) makes them anew in another order."""
    items, item = [], []
    for line in table[1:-1]:
        if line.strip():
            item.append(line)
        elif item:
            items.append(item)
            item = []
    if item:
        items.append(item)
    return [table[0], *["\n".join(i) for i in sorted(items)], table[-1]]


def our_rules(rulesets: str) -> list[str]:
    """The lines of `rulesets` that are not the neighbours' (see neighbour_rules)."""
    theirs = set(neighbour_rules(rulesets).splitlines())
    return [line for line in rulesets.splitlines() if line not in theirs]


def masquerade_counter(node_exec, variant: str, rule: str) -> int:
    """Packets counted by the nat rule `rule` (as iptables-save prints it, without
    counters) in iptables `variant` (legacy or nft) of the node; -1 when it is not there."""
    text = node_exec([f"iptables-{variant}-save", "-c", "-t", "nat"]).stdout
    for line in text.splitlines():
        m = re.match(r"^\[(\d+):\d+\] (.*)$", line)
        if m and m.group(2) == rule:
            return int(m.group(1))
    return -1


def peer(answer: str) -> tuple[str, int]:
    """("ADDR PORT" from the peer CGI) -> (address, port); IPv4-mapped IPv6 unwrapped."""
    addr, port = answer.split()
    addr = addr.strip("[]")
    if addr.startswith("::ffff:") and "." in addr:
        addr = addr[len("::ffff:"):]
    return addr, int(port)
