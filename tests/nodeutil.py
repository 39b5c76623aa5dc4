"""Around the node driver (tests/testbed/node.py): a node per test, foreign rules, `ipmasq
watch` in the node, the engines its kernel holds, extra namespaces beside a bed."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading

from .testbed import Node, TestBed


@contextlib.contextmanager
def driven_node(bed: TestBed):
    """A Node of `bed` for one test: everything the tool owns is flushed afterwards and the
    node's private bpffs unmounted, also when the test fails."""
    node = Node(bed)
    try:
        yield node
    finally:
        node.ipmasq("flush")
        node.close()


def add_foreign_rules(node: Node, backend: str, nft_table: bool = True) -> None:
    """Docker-like and kube-proxy-like rules and another nft table, added before the tool runs."""
    restore = {
        "iptables-legacy": "iptables-legacy-restore",
        "iptables-nft": "iptables-nft-restore",
    }.get(backend, "iptables-nft-restore")
    node.sh(f"{restore} --noflush -w", input=textwrap.dedent("""\
        *nat
        :DOCKER - [0:0]
        :KUBE-POSTROUTING - [0:0]
        -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
        -A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
        -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
        -A DOCKER -i docker0 -j RETURN
        -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
        -A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
        COMMIT
        *filter
        :DOCKER-USER - [0:0]
        -A FORWARD -j DOCKER-USER
        -A DOCKER-USER -j RETURN
        COMMIT
        """))
    if not nft_table:
        return
    node.sh("nft -f -", input=textwrap.dedent("""\
        table inet foreign {
            set blocked { type ipv4_addr; flags interval; elements = { 198.18.0.0/15 } }
            chain input { type filter hook input priority 0; policy accept; ip saddr @blocked counter drop; }
        }
        """))


def in_any(address: str, prefixes) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(p) for p in prefixes)


# ---------------------------------------------------------------- added for tests/test_node_events.py


class WatchAgent:
    """`ipmasq watch ARGS` running in the node namespace of `node` (with the node's env);
    its stderr goes to a log file in the node's folder. Killed by close()."""

    def __init__(self, node: Node, *args: str, name: str = "watch.log", prefix: list[str] | None = None,
                 env: dict | None = None):
        """`prefix` replaces `ip netns exec NODE` (say, to run inside a sandbox's mount
        namespace as well: tests/neighbours.py); `env` is added to the node's env."""
        import time

        self.node = node
        self.log = node.dir / name
        self._time = time
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [*(prefix or ["ip", "netns", "exec", node.bed.node]), sys.executable, "-m", "ipmasq_legacy",
                 "watch", *args],
                stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **node.env, **(env or {})})
        try:
            self.wait_for(lambda: "watching" in self.log.read_text(), "start", timeout=15)
        except BaseException:
            self.close()
            raise

    def wait_for(self, condition, what: str, timeout: float = 5.0) -> float:
        start = self._time.monotonic()
        while self._time.monotonic() - start < timeout:
            if condition():
                return self._time.monotonic() - start
            assert self.proc.poll() is None, f"watch exited ({self.proc.returncode}): {self.log.read_text()}"
            self._time.sleep(0.02)
        raise AssertionError(f"watch: no {what} within {timeout}s; log:\n{self.log.read_text()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def node_links(node: Node) -> list[str]:
    """Names of the node namespace's links."""
    out = node.bed.node_exec(["ip", "-o", "link", "show"]).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def live_engines(node: Node) -> dict[str, list[str]]:
    """The NAT engines of ours that the node's kernel holds, whatever state.json says:
    engine -> what was found. iptables-legacy / iptables-nft: chain IPMASQ-LEGACY in that
    variant's save (either family); nftables: `table ip|ip6 ipmasq_legacy`; ebpf: tc filters
    named ipmasq_legacy/ on any link of the node, pins under the node's IPMASQ_BPF_DIR, its
    conntrack keeper `table inet ipmasq_legacy_ebpf`, or its netfilter assist chain
    IPMASQ-EBPF (either iptables variant). ebpf's `ipmasq_legacy_drain`
    tables (an empty nat chain that only keeps netfilter's established translations alive
    after a switch) are not counted as an engine."""
    bed = node.bed
    found: dict[str, list[str]] = {}
    for variant in ("legacy", "nft"):
        for tool in (f"iptables-{variant}-save", f"ip6tables-{variant}-save"):
            saved = bed.node_exec([tool]).stdout
            if re.search(r"^:IPMASQ-LEGACY ", saved, re.M):
                found.setdefault(f"iptables-{variant}", []).append(f"chain IPMASQ-LEGACY in {tool}")
            if re.search(r"^:IPMASQ-EBPF ", saved, re.M):  # ebpf's netfilter assist
                found.setdefault("ebpf", []).append(f"chain IPMASQ-EBPF in {tool}")
    for line in bed.node_exec(["nft", "list", "tables"]).stdout.splitlines():
        m = re.match(r"^table (\S+) (\S+)$", line.strip())
        if not m or not m.group(2).startswith("ipmasq_legacy"):
            continue
        family, name = m.groups()
        if name == "ipmasq_legacy":
            found.setdefault("nftables", []).append(f"table {family} {name}")
        elif name == "ipmasq_legacy_ebpf":
            found.setdefault("ebpf", []).append(f"table {family} {name}")
    pins = node.env.get("IPMASQ_BPF_DIR")
    if pins and os.path.isdir(pins) and os.listdir(pins):
        found.setdefault("ebpf", []).append(f"{len(os.listdir(pins))} pins under {pins}")
    for dev in node_links(node):
        for hook in ("ingress", "egress"):
            text = bed.node_exec(["tc", "filter", "show", "dev", dev, hook]).stdout
            if "ipmasq_legacy/" in text:
                found.setdefault("ebpf", []).append(f"tc filter on {dev} {hook}")
    return found


@contextlib.contextmanager
def extra_namespaces(bed: TestBed, *suffixes: str):
    """Network namespaces `ipmq-<tag>-<suffix>` beside a bed's (containers on a bridge, say),
    each with a thread living in it for socket creation: yields {suffix: (name, thread)}.
    Deleted afterwards, also on failure (processes left inside are killed)."""
    from . import testbed

    made: dict[str, tuple[str, object]] = {}
    try:
        for suffix in suffixes:
            name = f"{testbed.NETNS_PREFIX}{bed.tag}-{suffix}"
            if not name.startswith(testbed.NETNS_PREFIX):
                raise AssertionError(name)
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
            made[suffix] = (name, None)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
            made[suffix] = (name, testbed._NsThread(name))
        yield made
    finally:
        errors = []
        for name, thread in made.values():
            if thread is not None:
                thread.stop()
            try:
                testbed._remove_netns(name)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
        if errors:
            raise AssertionError(f"could not delete extra namespaces: {errors}")


class UdpReporter:
    """A UDP server in ext that answers every datagram with `<payload> <src addr> <src port>`."""

    def __init__(self, bed: TestBed, address: str, port: int):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.sock = bed.in_netns(bed.ext, socket.socket, family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((address, port))
        self.sock.settimeout(0.2)
        self.seen: list[tuple[bytes, str, int]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(4096)
            except (socket.timeout, OSError):
                continue
            self.seen.append((data, peer[0], peer[1]))
            try:
                self.sock.sendto(data + b" %s %d" % (peer[0].encode(), peer[1]), peer[:2])
            except OSError:
                pass

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()
