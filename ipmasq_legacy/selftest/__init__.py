"""`ipmasq selftest`: prove masquerading with real packets in throw-away namespaces.

Builds its bed (bed.py: pod -> node -> outside, never touching this machine's own
namespace), applies representative configs with each backend through the real
CLI inside the node namespace, sends UDP, TCP and ICMP echo from the pod and checks
the source address seen outside against the expectation written out per case.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import backends
from ..errors import ConfigError
from .bed import Bed, destinations

TKE_AGENT = "nonMasqueradeCIDRs: [10.0.0.0/16, 172.18.0.0/16, 192.168.0.0/17]\nmasqLinkLocal: true\n"


@dataclass(frozen=True)
class Case:
    name: str
    config: dict
    agent: str | None  # ip-masq-agent file text; None = not enabled
    not_masqueraded: frozenset  # destinations (test bed names) whose packets keep the pod's address


CASES = (
    Case("defaults: everything masqueraded", {}, None, frozenset()),
    Case("eth+ with the TKE ip-masq-agent ConfigMap",
         {"egress-masquerade-interfaces": "eth+"}, TKE_AGENT,
         frozenset({"tke10", "tke172", "tke192_in", "public_ens3", "public6_ens3"})),
    Case("native-routing CIDRs, both families",
         {"ipv4-native-routing-cidr": "10.0.0.0/8", "ipv6-native-routing-cidr": "fd10::/16"}, None,
         frozenset({"private10", "tke10", "private6"})),
)
FEW = ("public", "public6")
# What the cases tell apart: each one's exemptions, and the address beside each exempt
# prefix that is still masqueraded (tke192_out: outside the TKE file's 192.168.0.0/17).
# {name: (address, node uplink)}; tests/testbed adds more for the tests.
DESTINATIONS = destinations({
    "public": ("198.20.0.10", "eth0"),
    "public_ens3": ("198.20.3.10", "ens3"),
    "private10": ("10.10.0.10", "eth0"),
    "tke10": ("10.0.5.10", "eth0"),
    "tke172": ("172.18.0.10", "eth1"),
    "tke192_in": ("192.168.1.10", "eth0"),
    "tke192_out": ("192.168.200.10", "eth0"),
    "public6": ("2001:db8:20::10", "eth0"),
    "public6_ens3": ("2001:db8:23::10", "ens3"),
    "private6": ("fd10::10", "eth0"),
})


@dataclass
class Row:
    backend: str
    case: str
    passed: int
    total: int
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.total > 0 and self.passed == self.total


def _ipmasq(bed: Bed, env: dict, *args: str) -> subprocess.CompletedProcess:
    return bed.node_exec([sys.executable, "-m", "ipmasq_legacy", *args], env=env)


def _run_case(bed: Bed, env: dict, workdir: Path, backend: str, case: Case) -> Row:
    cfg = dict(case.config)
    if case.agent is not None:
        agent = workdir / "ip-masq-agent"
        agent.write_text(case.agent)
        cfg.update({"enable-ip-masq-agent": True, "ip-masq-agent-config-path": str(agent)})
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _ipmasq(bed, env, "apply", "--config", str(path), "--backend", backend)
    if proc.returncode != 0:
        return Row(backend, case.name, 0, 1, f"apply failed: {proc.stderr.strip()}")
    probes = [(d, "udp") for d in bed.DESTINATIONS] + [(d, p) for d in FEW if d in bed.DESTINATIONS
                                                       for p in ("tcp", "icmp")]
    wrong = []
    for name, proto in probes:
        dest = bed.DESTINATIONS[name]
        masquerade = name not in case.not_masqueraded
        want = bed.uplink_addr[dest.uplink][dest.family] if masquerade else bed.pod_addr[dest.family]
        try:
            seen = bed.source_seen(dest.address, proto=proto)
        except Exception as exc:  # a lost reply is a failed probe, not a crash
            seen = f"error: {exc}"
        if seen != want:
            wrong.append(f"{proto} to {name}: saw {seen}, want {want}")
    return Row(backend, case.name, len(probes) - len(wrong), len(probes), "; ".join(wrong[:3]))


def bed_reason() -> str | None:
    """Why no test bed can be built here (None: it can). Its namespaces' sysctls are written
    through /proc/sys, which a container's runtime mounts read-only by default."""
    if os.access("/proc/sys/net/ipv4/ip_forward", os.W_OK):
        return None
    return ("selftest: /proc/sys is read-only here, and the test bed sets sysctls in namespaces of its own "
            "(in a container: podman run --security-opt unmask=/proc/sys, docker run --security-opt "
            "systempaths=unconfined; the agent itself does not need it)")


def run(names: list[str], ipv6: bool = True) -> list[Row]:
    reason = bed_reason()
    if reason:
        raise ConfigError(reason)
    rows = []
    runnable = []
    for name in names:
        reason = backends.get(name).unavailable_reason()
        if reason:
            rows.append(Row(name, "backend available", 0, 1, reason))
        else:
            runnable.append(name)
    if not runnable:
        return rows
    with Bed(DESTINATIONS, ipv6=ipv6) as bed, tempfile.TemporaryDirectory(prefix="ipmasq-selftest-") as tmp:
        workdir = Path(tmp)
        env = {"IPMASQ_STATE_DIR": str(workdir / "state"), "IPMASQ_CONFIG": ""}
        for name in runnable:
            for case in CASES:
                rows.append(_run_case(bed, env, workdir, name, case))
            flushed = _ipmasq(bed, env, "flush")
            after = bed.source_seen(bed.dest("public"))
            ok = flushed.returncode == 0 and after == bed.pod_addr[4]
            rows.append(Row(name, "flush: nothing masqueraded after", int(ok), 1,
                            "" if ok else f"flush rc={flushed.returncode}, saw {after}"))
    return rows


def render(rows: list[Row]) -> str:
    width = max(len(r.case) for r in rows)
    lines = [f"{'backend':<16} {'case':<{width}} {'probes':>7}  result"]
    for r in rows:
        result = "pass" if r.ok else f"FAIL  {r.detail}"
        lines.append(f"{r.backend:<16} {r.case:<{width}} {f'{r.passed}/{r.total}':>7}  {result}")
    failed = sum(1 for r in rows if not r.ok)
    lines.append(f"selftest: {len(rows) - failed} passed, {failed} failed")
    return "\n".join(lines)
