"""What the guest is given of this machine's set-up, so that apt and pip in the guest
reach the same registries the same way: the Debian mirror, apt's proxy and validity
options, pip's configuration and PIP_* variables, proxies, and the extra CA
certificates of the TLS trust store (a machine that intercepts TLS has its own CA;
the guest trusts it the same way instead of turning verification off)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY = "http://deb.debian.org/debian-security"
# apt options that decide whether and how a mirror is reached (the rest is local taste)
APT_KEYS = re.compile(r"^Acquire::((https?|ftp)::Proxy\S*|Check-Valid-Until|Check-Date) ")
# variables naming host paths that do not exist in the guest (a local wheel directory)
PIP_SKIP = {"PIP_FIND_LINKS"}
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
# point at the guest's own bundle, which update-ca-certificates builds with the same CAs
CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE")


def _source_uris() -> list[str]:
    uris = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if not path.is_file() or not path.name.endswith((".list", ".sources")):
            continue
        for line in path.read_text(errors="replace").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("URIs:"):
                uris += line.split()[1:]
            elif line.startswith("deb "):
                uris += [w for w in line.split()[1:] if "://" in w][:1]
    return uris


def mirrors() -> tuple[str, str]:
    """(Debian archive, security archive) as the host's apt sources name them."""
    uris = [u.rstrip("/") for u in _source_uris()]
    archive = next((u for u in uris if u.endswith("/debian")), DEFAULT_MIRROR)
    security = next((u for u in uris if u.endswith("/debian-security")), DEFAULT_SECURITY)
    return archive, security


def apt_options() -> list[str]:
    """The host's proxy and validity options, as apt.conf lines."""
    try:
        dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line for line in dump.splitlines() if APT_KEYS.match(line)]


def ca_certificates() -> dict[str, bytes]:
    """The host's local CA certificates: guest path -> content."""
    root = Path("/usr/local/share/ca-certificates")
    if not root.is_dir():
        return {}
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*.crt")) if p.is_file()}


def pip_files() -> dict[str, bytes]:
    """pip's system-wide configuration files (and what they name, e.g. constraints)."""
    out = {}
    for path in [Path("/etc/pip.conf"), *sorted(Path("/etc/xdg/pip").glob("*"))]:
        if path.is_file():
            out[str(path)] = path.read_bytes()
    return out


def environment() -> dict[str, str]:
    """PIP_*, proxy and CA-bundle variables for the guest's steps."""
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_") and k not in PIP_SKIP}
    env.update({k: os.environ[k] for k in PROXY_VARS if k in os.environ})
    env.update({k: "/etc/ssl/certs/ca-certificates.crt" for k in CA_VARS if k in os.environ})
    return env


def guest_files() -> dict[str, bytes]:
    """Every file the guest image gets from the host, by guest path."""
    files = {**ca_certificates(), **pip_files()}
    options = apt_options()
    if options:
        files["/etc/apt/apt.conf.d/00ipmasq-vm-host"] = ("\n".join(options) + "\n").encode()
    env = environment()
    files["/etc/ipmasq-vm/env"] = "".join(f"export {k}={_quote(v)}\n" for k, v in sorted(env.items())).encode()
    return files


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"
