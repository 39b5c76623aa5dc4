"""`ipmasq doctor`: what this node can run, and why not.

Reads versions, the host's rule counts (read-only listings) and kernel config; every
probe that has to create something runs in a throw-away network namespace.
"""

from __future__ import annotations

import ctypes.util
import gzip
import os
import platform
from pathlib import Path

from . import backends, kernel
from .backends import engines, selection


def _version(argv: list[str]) -> str | None:
    k = kernel.current()
    if k.which(argv[0]) is None:
        return None
    proc = k.run(argv, check=False)
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def _kernel_config() -> dict[str, str]:
    release = platform.release()
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{release}")):
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except OSError:
            continue
        return dict(
            line.split("=", 1) for line in raw.decode(errors="replace").splitlines() if line.startswith("CONFIG_")
        )
    return {}


def _bpffs_mounted() -> bool:
    try:
        return any(line.split()[2] == "bpf" for line in Path("/proc/mounts").read_text().splitlines())
    except (OSError, IndexError):
        return False


def _probe_clsact() -> str | None:
    """None when a clsact qdisc can be added (in a throw-away namespace), else why not."""
    k = kernel.current()
    if k.which("tc") is None or k.which("unshare") is None:
        return "tc or unshare missing"
    proc = k.run(["unshare", "--net", "tc", "qdisc", "add", "dev", "lo", "clsact"], check=False)
    return None if proc.returncode == 0 else (proc.stderr.strip() or "failed")


def _ebpf_detail() -> str:
    """`available` (with the object and pin directory), or why the ebpf backend cannot run."""
    from .backends import ebpf

    reason = ebpf.EbpfBackend().unavailable_reason()
    if reason:
        return reason
    return f"available (object {ebpf.object_path()}, maps pinned under {ebpf.pin_dir()})"


def report() -> dict:
    kconfig = _kernel_config()
    rules = selection.host_rules()
    available = backends.availability()
    live = engines.live_engines()
    try:
        auto, why = selection.choose_auto(available, live)
    except LookupError as exc:
        auto, why = None, str(exc)
    libnft = ctypes.util.find_library("nftables")
    try:
        import nftables  # noqa: F401

        binding = True
    except Exception:
        binding = False
    wanted = ("CONFIG_BPF_SYSCALL", "CONFIG_NET_CLS_BPF", "CONFIG_NET_SCH_INGRESS", "CONFIG_NF_TABLES",
              "CONFIG_NFT_MASQ", "CONFIG_NFT_FIB_IPV4", "CONFIG_IP_NF_IPTABLES_LEGACY", "CONFIG_IP_SET_HASH_NET")
    from . import others

    return {
        "others": [vars(f) for f in others.find()],
        "kernel": platform.release(),
        "root": os.geteuid() == 0,
        "tools": {
            "iptables-legacy": _version(["iptables-legacy", "--version"]),
            "iptables-nft": _version(["iptables-nft", "--version"]),
            "nft": _version(["nft", "--version"]),
            "libnftables": libnft,
            "nftables python binding": binding,
            "ipset": _version(["ipset", "--version"]),
            "tc": _version(["tc", "-V"]),
        },
        "host rules": {"counts": rules.counts, "hints": rules.hints},
        "engines": live,  # NAT engines of ours live in the kernel (more than one is drift)
        "bpf": {
            "bpffs mounted at /sys/fs/bpf": _bpffs_mounted(),
            "clsact": _probe_clsact() or "ok",
            "ebpf backend": _ebpf_detail(),
            "kernel config": {k: kconfig.get(k, "unknown") for k in wanted} if kconfig else "not readable",
        },
        "backends": {name: ("available" if reason is None else reason) for name, reason in available.items()},
        "auto": {"backend": auto, "why": why},
    }


def render_text(data: dict) -> str:
    lines = [f"kernel: {data['kernel']}" + ("" if data["root"] else " (not root: probes may fail)")]
    for name, value in data["tools"].items():
        lines.append(f"{name}: {value if value not in (None, False) else 'missing'}")
    counts = ", ".join(f"{k} {v}" for k, v in data["host rules"]["counts"].items())
    lines.append(f"rules on the host: {counts}")
    for engine, hint in data["host rules"]["hints"].items():
        lines.append(f"  {engine}: {hint}")
    live = data["engines"]
    lines.append("engines of ours live: " + (", ".join(live) or "none")
                 + (" (more than one: reconcile or apply removes all but one)" if len(live) > 1 else ""))
    for f in data["others"]:
        lines.append(f"masquerading by others: {f['manager']}: {f['what']} ({f['where']})")
    bpf = data["bpf"]
    lines.append(f"bpffs: {'mounted' if bpf['bpffs mounted at /sys/fs/bpf'] else 'not mounted'}; clsact: {bpf['clsact']}")
    lines.append(f"ebpf: {bpf['ebpf backend']}")
    if isinstance(bpf["kernel config"], dict):
        lines.append("kernel config: " + ", ".join(f"{k}={v}" for k, v in bpf["kernel config"].items()))
    lines.append("backends:")
    for name, state in data["backends"].items():
        lines.append(f"  {name:<16} {state}")
    auto = data["auto"]
    lines.append(f"auto: {auto['backend'] or 'nothing'} ({auto['why']})")
    return "\n".join(lines)
