"""The cached guest image of one release: rootfs.img (ext4), vmlinuz, initrd.img.

Built once per release and content (`key`: the release, the package list, init.sh and
what the host hands the guest) under /var/cache/ipmasq-vm (IPMASQ_VM_CACHE), never in
the checkout. A build of another content replaces the release's old one. Runs boot a
copy-on-write overlay of the image, so the cached image stays as built.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import hostcfg
from .releases import SETUP_PACKAGES, VM_PACKAGES, Release

HERE = Path(__file__).resolve().parent
FORMAT = 1  # bump when the build steps below change what an image holds
IMAGE_SIZE = "6G"  # sparse; a built image uses about 2 GiB, the venv and tests add little
# the versions the matrix reports, read from the image's dpkg database
REPORTED = ("linux-image-amd64", "iptables", "nftables", "libnftables1", "python3", "clang")


def cache_root() -> Path:
    return Path(os.environ.get("IPMASQ_VM_CACHE", "/var/cache/ipmasq-vm"))


@dataclass
class Image:
    release: Release
    path: Path

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs.img"

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @property
    def info(self) -> dict:
        return json.loads((self.path / "info.json").read_text())


def packages(release: Release) -> list[str]:
    return sorted(set(SETUP_PACKAGES) | set(VM_PACKAGES))


def key(release: Release) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT, release.codename, packages(release), hostcfg.mirrors()]).encode())
    h.update((HERE / "init.sh").read_bytes())
    for path, data in sorted(baked_files().items()):
        h.update(path.encode() + b"\0" + data)
    return h.hexdigest()[:12]


def baked_files() -> dict[str, bytes]:
    """What the image gets from the host: CA certificates, pip's and apt's options."""
    files = {**hostcfg.ca_certificates(), **hostcfg.pip_files()}
    options = hostcfg.apt_options()
    if options:
        files["/etc/apt/apt.conf.d/00ipmasq-vm-host"] = ("\n".join(options) + "\n").encode()
    return files


def sources(release: Release) -> list[str]:
    archive, security = hostcfg.mirrors()
    lines = [f"deb {archive} {suite} main" for suite in release.suites]
    if release.security_suite:
        lines.append(f"deb {security} {release.security_suite} main")
    return lines


def ensure(release: Release, log=print) -> Image:
    """The release's image, built first if the cache has none of this content."""
    path = cache_root() / f"{release.codename}-{key(release)}"
    image = Image(release, path)
    if (path / "info.json").exists():
        return image
    for old in cache_root().glob(f"{release.codename}-*"):
        log(f"{release.codename}: removing the stale image {old}")
        shutil.rmtree(old, ignore_errors=True)
    work = cache_root() / f".build-{release.codename}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        root = work / "root"
        log(f"{release.codename}: building the image (mmdebstrap, {len(packages(release))} packages)")
        bootstrap(release, root, work / "mmdebstrap.log")
        finish(release, root, work)
        path.parent.mkdir(parents=True, exist_ok=True)
        work.rename(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return image


def bootstrap(release: Release, root: Path, logfile: Path) -> None:
    aptopts = [f"--aptopt={line}" for line in hostcfg.apt_options()]
    argv = ["mmdebstrap", "--mode=root", "--variant=apt", *aptopts,
            "--include=" + ",".join(packages(release)), release.codename, str(root), *sources(release)]
    with open(logfile, "w") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"mmdebstrap {release.codename} failed: " + " | ".join(tail))


def finish(release: Release, root: Path, out: Path) -> None:
    """Host files and init into the tree; kernel and initrd out of it; the ext4 image."""
    for guest_path, data in baked_files().items():
        dest = root / guest_path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    init = root / "sbin/ipmasq-vm-init"
    shutil.copyfile(HERE / "init.sh", init)
    init.chmod(0o755)
    subprocess.run(["chroot", str(root), "update-ca-certificates"], check=True, capture_output=True)
    boot = root / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    initrds = sorted(boot.glob("initrd.img-*"))
    if not kernels or not initrds:
        raise RuntimeError(f"{release.codename}: no kernel or initrd in the image's /boot")
    shutil.copyfile(kernels[-1], out / "vmlinuz")
    shutil.copyfile(initrds[-1], out / "initrd.img")
    info = {"release": release.codename, "version": release.version,
            "kernel_package": kernels[-1].name.removeprefix("vmlinuz-"),
            "packages": versions(root)}
    rootfs = out / "rootfs.img"
    subprocess.run(["truncate", "-s", IMAGE_SIZE, str(rootfs)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "ipmasq-vm", "-d", str(root), str(rootfs)], check=True)
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(root)


def versions(root: Path) -> dict[str, str]:
    out = {}
    for name in REPORTED:
        proc = subprocess.run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Version}", name],
                              capture_output=True, text=True)
        out[name] = proc.stdout.strip() if proc.returncode == 0 else "missing"
    return out
