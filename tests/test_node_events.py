"""Node events (README "Running in production"), proven with packets, for every backend: a node is not static.

Each row of the issue is a test here, run against every backend (the BPF datapath
included) with the same expectations; the expectations are the netfilter column of the
issue, written out by hand:

1. an uplink matching `eth+` hot-plugged after apply is masqueraded at once, no reconcile;
2. an uplink deleted and re-created is masqueraded at once;
3. an uplink's address changed: the new address is used (after `reconcile`; under
   `watch` within 1 s), the old one no longer routes back, so a stale source is a lost reply;
4. a node socket and a pod flow on the same (address, port, destination), UDP, in both
   orders: both get their replies;
5. SCTP (and a protocol without ports) from two pods with the same ports to the same
   server: both arrive, masqueraded;
6. the default config on a node with a Linux bridge: bridged traffic passes untouched;
7. a wiped state dir: exactly one NAT engine of ours stays live.

Every test builds its own bed (pod -> node -> ext namespaces, tenths of a second) and
node (private state dir and bpffs, everything flushed afterwards); links are only ever
made inside the bed's namespaces, and extra namespaces (bridge ports) carry the bed's
prefix and are deleted afterwards, also on failure.
"""

from __future__ import annotations

import json
import random
import secrets
import selectors
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

from ipmasq_legacy import backends

from .nodeutil import UdpReporter, WatchAgent, driven_node, extra_namespaces, live_engines
from .test_traffic import BACKENDS, NETFILTER_BACKENDS
from .testbed import ReplyLostError, TestBed

pytestmark = pytest.mark.traffic

ETH_PLUS = {"egress-masquerade-interfaces": "eth+"}

# the hot-plugged uplink: node side eth2, ext side up3, and a destination routed through it
NEW_UPLINK = ("eth2", "up3", "172.23.0", "fd00:23::")
NEW_DEST = {4: "198.20.2.10", 6: "2001:db8:22::10"}

# the address eth1 moves to in the address-change tests
MOVED = {4: ("172.31.0", 24), 6: ("fd00:31::", 64)}


def _ebpf_reason() -> str | None:
    return backends.get("ebpf").unavailable_reason() if "ebpf" in backends.NAMES else "not registered"


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def node(bed):
    with driven_node(bed) as node:
        yield node


@pytest.fixture
def node2():
    """A node with two pods (10.244.1.2 and 10.244.2.2)."""
    with TestBed(ipv6=True, pods=2) as bed, driven_node(bed) as node:
        yield node


# ---------------------------------------------------------------- helpers


def af(family: int) -> int:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def family_of(address: str) -> int:
    return 6 if ":" in address else 4


def ext_sh(bed: TestBed, script: str) -> None:
    proc = bed.ext_exec(["sh", "-ec", script])
    assert proc.returncode == 0, f"in ext: {script}: {proc.stderr}"


def probe(bed: TestBed, dst: str, proto: str = "udp", timeout: float = 2.0, pod: int = 0) -> str:
    """One new flow from the pod: the source ext saw when the reply came back, else
    'lost (ext saw X)' when the probe arrived but the reply did not, else 'nothing arrived'."""
    try:
        seen = bed.source_seen(dst, proto=proto, timeout=timeout, pod=pod)
    except ReplyLostError as exc:
        return f"lost (ext saw {exc.seen})"
    return seen if seen is not None else "nothing arrived"


def probe_all(bed: TestBed, dsts: dict[int, str], want: dict[int, str], what: str) -> list[str]:
    """UDP and TCP, each family: every answer must come back with source want[family]."""
    wrong = []
    for proto in ("udp", "tcp"):
        for family, dst in dsts.items():
            seen = probe(bed, dst, proto)
            if seen != want[family]:
                wrong.append(f"{what}: {proto} to {dst}: {seen}, want {want[family]}")
    return wrong


def leaked_by_pod(bed: TestBed, seen: str, family: int, pod: int = 0) -> bool:
    pod_addr = bed.pod_addrs(pod)[family]
    return seen == pod_addr or f"ext saw {pod_addr})" in seen


def add_uplink(node, name: str, peer: str, v4: str, v6: str, dests: dict[int, str]) -> None:
    """A veth `name` in the node whose peer `peer` lives in ext, v4.1/24 and v6 1/64 on the
    node's side, .2 on ext's, and routes to `dests` through it: the ext side first (so the
    link has carrier the moment the node's side comes up), then the node's."""
    bed = node.bed
    node.sh(f"ip link add {name} type veth peer name {peer} netns {bed.ext}")
    ext_sh(bed, f"ip addr add {v4}.2/24 dev {peer}; ip -6 addr add {v6}2/64 dev {peer} nodad; "
                f"ip link set {peer} up")
    node.sh(f"ip addr add {v4}.1/24 dev {name} && ip -6 addr add {v6}1/64 dev {name} nodad && "
            f"ip link set {name} up && ip route add {dests[4]}/32 via {v4}.2 dev {name} && "
            f"ip -6 route add {dests[6]}/128 via {v6}2 dev {name}")


class Stream:
    """A pod sending UDP datagrams to each of `dsts` without pause while the node changes:
    every round one from a long-lived socket (one flow throughout) and one from a fresh
    socket (a new flow each time). Sockets in ext bound to the destinations record the
    source address of every datagram that arrives, per family."""

    def __init__(self, bed: TestBed, dsts: list[str], port: int, pod: int = 0):
        self.bed, self.dsts, self.port, self.pod = bed, dsts, port, pod
        self.sources: dict[int, list[str]] = {family_of(d): [] for d in dsts}
        self.sent = 0
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._rx = []
        for d in dsts:
            s = bed.in_netns(bed.ext, socket.socket, af(family_of(d)), socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.bind((d, port))
            s.setblocking(False)
            self._sel.register(s, selectors.EVENT_READ, family_of(d))
            self._rx.append(s)
        self._long = {f: bed.in_netns(bed.pods[pod], socket.socket, af(f), socket.SOCK_DGRAM) for f in self.sources}
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]

    def _send(self):
        n = 0
        while not self._stop.is_set():
            for d in self.dsts:
                family = family_of(d)
                fresh = self.bed.in_netns(self.bed.pods[self.pod], socket.socket, af(family), socket.SOCK_DGRAM)
                for sock, kind in ((self._long[family], b"long"), (fresh, b"fresh")):
                    try:
                        sock.sendto(b"stream %s %d" % (kind, n), (d, self.port))
                    except OSError:
                        pass  # no route yet: the node says unreachable
                fresh.close()
            n += 1
            self.sent = n
            self._stop.wait(0.0005)

    def _receive(self):
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.05):
                while True:
                    try:
                        data, peer = key.fileobj.recvfrom(2048)
                    except (BlockingIOError, OSError):
                        break
                    if data.startswith(b"stream "):
                        self.sources[key.data].append(peer[0])

    def counts(self) -> dict[int, int]:
        return {f: len(v) for f, v in self.sources.items()}

    def wait_arrivals(self, more: int, timeout: float = 5.0) -> None:
        """Until `more` datagrams more of every family have arrived (or the timeout)."""
        start = self.counts()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.counts()[f] >= start[f] + more for f in start):
                return
            time.sleep(0.01)

    def __enter__(self):
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + 5
        while self.sent < 20 and time.monotonic() < deadline:
            time.sleep(0.005)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for s in self._rx + list(self._long.values()):
            s.close()
        self._sel.close()

    def problems(self, bed: TestBed, want: dict[int, str]) -> list[str]:
        out = []
        for family, sources in self.sources.items():
            pod = bed.pod_addrs(self.pod)[family]
            leaked = sources.count(pod)
            other = sorted({s for s in sources if s not in (pod, want[family])})
            if not sources:
                out.append(f"stream ipv{family}: nothing arrived in ext ({self.sent} rounds sent)")
            if leaked:
                out.append(f"stream ipv{family}: {leaked} of {len(sources)} datagrams left with the pod's "
                           f"address {pod}")
            if other:
                out.append(f"stream ipv{family}: datagrams with sources {other}, want {want[family]}")
        return out


# ---------------------------------------------------------------- 1. hot-plug


def test_hotplugged_uplink_is_masqueraded_at_once(node, backend):
    """eth2 (matching eth+) appears after apply, with an address and a route: without
    reconcile or watch, the pod's new UDP and TCP flows through it leave with eth2's
    address and get their replies, and a pod streaming datagrams through the event is
    never seen outside with its own address."""
    bed = node.bed
    node.apply(ETH_PLUS, backend)
    name, peer, v4, v6 = NEW_UPLINK
    ext_sh(bed, f"ip addr add {NEW_DEST[4]}/32 dev lo; ip -6 addr add {NEW_DEST[6]}/128 dev lo nodad")
    want = {4: f"{v4}.1", 6: f"{v6}1"}
    with Stream(bed, list(NEW_DEST.values()), 9601) as stream:
        add_uplink(node, name, peer, v4, v6, NEW_DEST)
        wrong = probe_all(bed, NEW_DEST, want, "right after eth2 appeared")
        stream.wait_arrivals(200)
    problems = wrong + stream.problems(bed, want)
    print(f"{backend}: stream sent {stream.sent} rounds, ext saw {stream.counts()}")
    assert not problems, f"{backend}:\n" + "\n".join(problems)


# ---------------------------------------------------------------- 2. re-create


def test_recreated_uplink_is_masqueraded_at_once(node, backend):
    """eth1 is deleted and made again (same name, addresses and routes; a new ifindex):
    masqueraded at once, and the pod's address is never seen outside meanwhile."""
    bed = node.bed
    dests = {4: bed.dest("public_eth1"), 6: bed.dest("public6_eth1")}
    want = bed.uplink_addr["eth1"]
    node.apply(ETH_PLUS, backend)
    before = probe_all(bed, dests, want, "before")
    assert not before, before
    with Stream(bed, list(dests.values()), 9602) as stream:
        stream.wait_arrivals(50)
        node.sh("ip link del eth1")
        node.sh(f"ip link add eth1 type veth peer name up1 netns {bed.ext}")
        ext = bed.ext_addr("eth1")
        ext_sh(bed, f"ip addr add {ext[4]}/24 dev up1; ip -6 addr add {ext[6]}/64 dev up1 nodad; ip link set up1 up")
        bed.set_uplink("eth1", True)  # the node's addresses and routes, link up
        wrong = probe_all(bed, dests, want, "right after eth1 came back")
        stream.wait_arrivals(200)
    problems = wrong + stream.problems(bed, want)
    print(f"{backend}: stream sent {stream.sent} rounds, ext saw {stream.counts()}")
    assert not problems, f"{backend}:\n" + "\n".join(problems)


# ---------------------------------------------------------------- 3. address change


def move_eth1_address(node) -> dict[int, str]:
    """eth1's node address moves to another subnet (ext gets an address there too); ext
    no longer routes the old address back (blackhole), so a flow that still leaves with
    it loses its replies. Returns the new addresses."""
    bed = node.bed
    old = bed.uplink_addr["eth1"]
    new = {f: f"{net}{'.' if f == 4 else ''}1" for f, (net, _) in MOVED.items()}
    ext_sh(bed, f"ip addr add {MOVED[4][0]}.2/24 dev up1; ip -6 addr add {MOVED[6][0]}2/64 dev up1 nodad; "
                f"ip route add blackhole {old[4]}/32; ip -6 route add blackhole {old[6]}/128")
    node.sh(f"ip addr del {old[4]}/24 dev eth1; ip addr add {new[4]}/24 dev eth1; "
            f"ip -6 addr del {old[6]}/64 dev eth1; ip -6 addr add {new[6]}/64 dev eth1 nodad; "
            f"ip route replace {bed.dest('public_eth1')}/32 via {MOVED[4][0]}.2 dev eth1; "
            f"ip -6 route replace {bed.dest('public6_eth1')}/128 via {MOVED[6][0]}2 dev eth1")
    return new


def test_address_change_is_followed_by_reconcile(node, backend):
    """Between the change and `reconcile` the pod's address never leaves (a stale source
    may: its replies are lost); after `reconcile` (exit 0) new flows use the new address."""
    bed = node.bed
    dests = {4: bed.dest("public_eth1"), 6: bed.dest("public6_eth1")}
    path = node.write_config(ETH_PLUS)
    node.ipmasq("apply", "--config", path, "--backend", backend, check=True)
    before = probe_all(bed, dests, bed.uplink_addr["eth1"], "before")
    assert not before, before
    new = move_eth1_address(node)
    problems = []
    for family, dst in dests.items():
        seen = probe(bed, dst, timeout=0.5)
        print(f"{backend}: ipv{family} before reconcile: {seen}")
        if leaked_by_pod(bed, seen, family):
            problems.append(f"before reconcile: udp to {dst} left with the pod's address: {seen}")
    proc = node.ipmasq("reconcile", "--config", path)
    if proc.returncode != 0:
        problems.append(f"reconcile exited {proc.returncode}: {proc.stderr.strip()}")
    problems += probe_all(bed, dests, new, "after reconcile")
    assert not problems, f"{backend}:\n" + "\n".join(problems)


def test_address_change_is_followed_by_watch_within_a_second(node, backend):
    """Under `ipmasq watch`, new flows use eth1's new address within 1 s of the change
    (measured: new flows until the first with the new source and its reply), and none
    leaves with the pod's address meanwhile."""
    bed = node.bed
    dests = {4: bed.dest("public_eth1"), 6: bed.dest("public6_eth1")}
    old = bed.uplink_addr["eth1"]
    path = node.write_config(ETH_PLUS)
    agent = WatchAgent(node, "--config", path, "--backend", backend)
    try:
        agent.wait_for(lambda: all(probe(bed, d, timeout=0.5) == old[f] for f, d in dests.items()),
                       "masquerading with eth1's address", timeout=20)
        start = time.monotonic()
        new = move_eth1_address(node)
        changed = time.monotonic()
        took, problems, tries = {}, [], {4: 0, 6: 0}
        for family, dst in dests.items():
            while time.monotonic() - start < 5:
                seen = probe(bed, dst, timeout=0.1)
                tries[family] += 1
                if leaked_by_pod(bed, seen, family):
                    problems.append(f"udp to {dst} left with the pod's address: {seen}")
                if seen == new[family]:
                    took[family] = time.monotonic() - start
                    break
        print(f"{backend}: the change took {changed - start:.3f} s; first new flow with the new address "
              f"after {', '.join(f'ipv{f} {t:.3f} s' for f, t in took.items())} (probes: {tries})")
        for family in dests:
            if family not in took:
                problems.append(f"ipv{family}: no new flow with {new[family]} within 5 s of the change")
            elif took[family] > 1.0:
                problems.append(f"ipv{family}: {new[family]} first used {took[family]:.3f} s after the change (> 1 s)")
        problems += probe_all(bed, dests, new, "after")
        assert agent.proc.poll() is None, f"watch exited: {agent.log.read_text()}"
    finally:
        agent.close()
    assert "Traceback" not in agent.log.read_text(), agent.log.read_text()
    assert not problems, f"{backend}:\n" + "\n".join(problems)


# ---------------------------------------------------------------- 4. node socket vs pod flow


def exchange(sock: socket.socket, payload: bytes, dst: str, port: int, timeout: float = 2.0,
             strays: list | None = None) -> tuple[str, int] | None:
    """Send `payload` to dst:port and wait for the reporter's answer to it: the (address,
    port) ext saw, or None. Answers to other payloads are put in `strays`."""
    sock.sendto(payload, (dst, port))
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except (socket.timeout, OSError):
            return None
        words = data.split()
        if words and words[0] == payload:
            return words[1].decode(), int(words[2])
        if strays is not None:
            strays.append(data)


@pytest.mark.parametrize("order", ["pod-first", "node-first"])
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_node_socket_and_pod_flow_on_one_port_both_get_replies(node, backend, family, order):
    """A pod's UDP flow from port P and a node socket bound to (node address, the port the
    pod's flow leaves with) talk to the same server port: each gets its own replies, in
    either order of creation (node first: the pod's flow must leave with another port)."""
    bed = node.bed
    dst, port = bed.dest("public" if family == 4 else "public6"), 9530
    node_addr = bed.uplink_addr["eth0"][family]
    node.apply(ETH_PLUS, backend)
    server = UdpReporter(bed, dst, port)
    pod = bed.in_netns(bed.pod, socket.socket, af(family), socket.SOCK_DGRAM)
    mine = bed.in_netns(bed.node, socket.socket, af(family), socket.SOCK_DGRAM)
    token = secrets.token_hex(4).encode()
    pod_strays, node_strays, problems = [], [], []

    def node_round(n: int) -> None:
        answered = sum(exchange(mine, b"node-%d-%d-%s" % (n, i, token), dst, port, strays=node_strays) is not None
                       for i in range(4))
        if answered != 4:
            problems.append(f"node socket {mine.getsockname()[:2]}, round {n}: {answered} of 4 replies")

    def pod_round(n: int) -> tuple[str, int] | None:
        seen = exchange(pod, b"pod-%d-%s" % (n, token), dst, port, strays=pod_strays)
        if seen is None:
            problems.append(f"pod flow from port {want_port}, round {n}: no reply")
        elif seen[0] != node_addr:
            problems.append(f"pod flow, round {n}: ext saw source {seen}, want {node_addr}")
        return seen

    try:
        for _ in range(20):  # a free P inside the translated ranges (1024-32767)
            want_port = random.randrange(20000, 30000)
            try:
                pod.bind(("0.0.0.0" if family == 4 else "::", want_port))
                break
            except OSError:
                continue
        if order == "pod-first":
            seen = pod_round(1)
            assert seen is not None and seen[0] == node_addr, problems
            print(f"{backend}: the pod's flow from port {want_port} left as {seen} "
                  f"({'port kept' if seen[1] == want_port else 'port NOT kept'})")
            mine.bind((node_addr, seen[1]))  # the very (address, port) the pod's flow uses
            node_round(1)
            again = pod_round(2)
            if again is not None and again != seen:
                problems.append(f"the pod's flow moved from {seen} to {again}")
        else:
            mine.bind((node_addr, want_port))
            node_round(1)
            seen = pod_round(1)
            print(f"{backend}: with the node's socket on port {want_port}, the pod's flow from {want_port} "
                  f"left as {seen}")
            if seen is not None and seen == (node_addr, want_port):
                problems.append(f"the pod's flow took ({node_addr}, {want_port}), which the node's socket uses")
            node_round(2)
            pod_round(2)
        node_seen = {(a, p) for data, a, p in server.seen if data.startswith(b"node-")}
        print(f"{backend}: ext saw the node's socket as {sorted(node_seen)}")
        if pod_strays:
            problems.append(f"the pod's socket got answers meant for another: {pod_strays[:3]}")
        if node_strays:
            problems.append(f"the node's socket got answers meant for another: {node_strays[:3]}")
    finally:
        pod.close()
        mine.close()
        server.close()
    assert not problems, f"{backend}:\n" + "\n".join(problems)


# ---------------------------------------------------------------- 5. SCTP, and no ports at all


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def sctp_init(sport: int, dport: int, tag: int) -> bytes:
    """An SCTP packet with one INIT chunk (verification tag 0, initiate tag `tag`), its
    CRC32c filled in (RFC 9260: computed with the field zero, stored little-endian)."""
    chunk = struct.pack("!BBHIIHHI", 1, 0, 20, tag, 65536, 10, 10, tag)
    packet = struct.pack("!HHII", sport, dport, 0, 0) + chunk
    return packet[:8] + struct.pack("<I", crc32c(packet)) + packet[12:]


def sctp_crc_ok(packet: bytes) -> bool:
    return struct.unpack("<I", packet[8:12])[0] == crc32c(packet[:8] + b"\0\0\0\0" + packet[12:])


class RawReceiver:
    """A raw socket of IP protocol `proto` in ext: (source address, L4 bytes) of every
    packet that arrives for it."""

    def __init__(self, bed: TestBed, family: int, proto: int):
        self.family = family
        self.sock = bed.in_netns(bed.ext, socket.socket, af(family), socket.SOCK_RAW, proto)
        self.sock.settimeout(0.05)
        self.got: list[tuple[str, bytes]] = []

    def poll(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except (socket.timeout, OSError):
                return
            if self.family == 4:
                self.got.append((socket.inet_ntoa(data[12:16]), data[(data[0] & 0x0F) * 4:]))
            else:
                self.got.append((peer[0].split("%")[0], data))


def send_until_seen(tx: socket.socket, packet: bytes, dst: str, rx: RawReceiver, match, timeout: float = 2.0):
    """Send `packet` every 0.2 s (a retransmitted INIT) until ext received one that
    `match`es; returns that (source, bytes) or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tx.sendto(packet, (dst, 0))
        until = min(deadline, time.monotonic() + 0.2)
        while time.monotonic() < until:
            rx.poll()
            for item in rx.got:
                if match(item[1]):
                    return item
    return None


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_sctp_from_two_pods_same_ports_both_arrive(node2, backend, family):
    """SCTP INITs from two pods, same source and destination ports, same server: ext gets
    both (told apart by their initiate tags), each with the node's address, on different
    source ports, with a valid CRC32c."""
    bed = node2.bed
    node2.apply(ETH_PLUS, backend)
    dst = bed.dest("public" if family == 4 else "public6")
    want = bed.uplink_addr["eth0"][family]
    sport, dport = 5000 + random.randrange(1000), 7000 + random.randrange(1000)
    rx = RawReceiver(bed, family, socket.IPPROTO_SCTP if hasattr(socket, "IPPROTO_SCTP") else 132)
    problems, arrived = [], {}
    try:
        for i in (0, 1):
            tag = random.randrange(1, 1 << 32)
            tx = bed.in_netns(bed.pods[i], socket.socket, af(family), socket.SOCK_RAW, 132)
            try:
                got = send_until_seen(tx, sctp_init(sport, dport, tag), dst, rx,
                                      lambda pkt, tag=tag: len(pkt) >= 20 and struct.unpack("!I", pkt[16:20])[0] == tag)
            finally:
                tx.close()
            if got is None:
                problems.append(f"pod {i} ({bed.pod_addrs(i)[family]}): its INIT (tag {tag:#x}) never reached ext")
                continue
            source, pkt = got
            arrived[i] = (source, struct.unpack("!H", pkt[:2])[0])
            if source != want:
                problems.append(f"pod {i}: its INIT arrived from {source}, want {want}")
            if struct.unpack("!H", pkt[2:4])[0] != dport:
                problems.append(f"pod {i}: destination port {struct.unpack('!H', pkt[2:4])[0]}, want {dport}")
            if not sctp_crc_ok(pkt):
                problems.append(f"pod {i}: its INIT arrived with a bad CRC32c")
    finally:
        rx.sock.close()
    print(f"{backend}: ext saw the two INITs as {arrived} (both sent from port {sport})")
    if len(arrived) == 2 and arrived[0] == arrived[1]:
        problems.append(f"both INITs arrived as {arrived[0]}: ext cannot tell the two associations apart")
    if problems:
        problems.append("node's conntrack -S: " + " | ".join(bed.node_exec(["conntrack", "-S"]).stdout.split("\n")))
    assert not problems, f"{backend}:\n" + "\n".join(problems)


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_portless_protocol_from_two_pods_is_masqueraded_never_leaked(node2, backend, family):
    """IP protocol 253 (experimental, no ports) from two pods to the same server. The
    first pod's packets arrive with the node's address. The second pod's flow has the
    same reply tuple once masqueraded (server -> node address, protocol 253: nothing to
    tell them apart), so conntrack refuses it while the first lives (`insert_failed`),
    in every backend alike (ebpf hands such protocols to netfilter, README "Known
    limits"): whatever arrives from it must carry the node's address, never the pod's."""
    bed = node2.bed
    node2.apply(ETH_PLUS, backend)
    dst = bed.dest("public" if family == 4 else "public6")
    want = bed.uplink_addr["eth0"][family]
    rx = RawReceiver(bed, family, 253)
    problems, arrived = [], {}
    try:
        for i in (0, 1):
            payload = b"ipmq-253 pod %d %s" % (i, secrets.token_hex(4).encode())
            tx = bed.in_netns(bed.pods[i], socket.socket, af(family), socket.SOCK_RAW, 253)
            try:
                got = send_until_seen(tx, payload, dst, rx, lambda pkt, p=payload: pkt == p,
                                      timeout=3.0 if i == 0 else 1.0)
            finally:
                tx.close()
            if got is None:
                if i == 0:
                    problems.append(f"pod 0 ({bed.pod_addrs(0)[family]}): nothing arrived in ext")
                continue
            arrived[i] = got[0]
            if got[0] != want:
                problems.append(f"pod {i}: arrived from {got[0]}, want {want}")
    finally:
        rx.sock.close()
    print(f"{backend}: protocol 253 arrived from {arrived}")
    if problems:
        problems.append("node's conntrack -S: " + " | ".join(bed.node_exec(["conntrack", "-S"]).stdout.split("\n")))
    assert not problems, f"{backend}:\n" + "\n".join(problems)


# ---------------------------------------------------------------- 6. a Linux bridge under {}


BRIDGE_V4, BRIDGE_V6 = "10.99.0", "fd99::"


def bridge_port(node, ns: str, i: int) -> dict[int, str]:
    """Port vbr<i> of br0 whose peer is eth0 of namespace `ns` (a container), with
    10.99.0.<i+2>/24 and fd99::<i+2>/64; returns those addresses."""
    node.sh(f"ip link add vbr{i} type veth peer name eth0 netns {ns} && ip link set vbr{i} master br0 && "
            f"ip link set vbr{i} up")
    addrs = {4: f"{BRIDGE_V4}.{i + 2}", 6: f"{BRIDGE_V6}{i + 2}"}
    for argv in (["addr", "add", f"{addrs[4]}/24", "dev", "eth0"],
                 ["-6", "addr", "add", f"{addrs[6]}/64", "dev", "eth0", "nodad"],
                 ["link", "set", "eth0", "up"]):
        proc = subprocess.run(["ip", "-n", ns, *argv], capture_output=True, text=True)
        assert proc.returncode == 0, f"ip -n {ns} {' '.join(argv)}: {proc.stderr}"
    return addrs


def bridged_problems(a, b, what: str) -> list[str]:
    """UDP, TCP and ping between containers a and b (name, thread, addresses), both ways,
    both families: each must arrive, with the sender's own address, and be answered."""
    problems = []
    for family in (4, 6):
        for (_, src_t, src_addr), (_, dst_t, dst_addr) in ((a, b), (b, a)):
            here = f"{what}: ipv{family} {src_addr[family]} -> {dst_addr[family]}"
            token = secrets.token_hex(6).encode()
            # UDP
            srv = dst_t.socket(af(family), socket.SOCK_DGRAM)
            cli = src_t.socket(af(family), socket.SOCK_DGRAM)
            try:
                srv.bind((dst_addr[family], 0))
                srv.settimeout(1)
                cli.settimeout(1)
                cli.sendto(b"udp " + token, srv.getsockname()[:2])
                try:
                    data, peer = srv.recvfrom(100)
                    if peer[0] != src_addr[family]:
                        problems.append(f"{here} udp: the receiver saw source {peer[0]}")
                    srv.sendto(data, peer[:2])
                    if cli.recv(100) != data:
                        problems.append(f"{here} udp: wrong answer")
                except (socket.timeout, OSError) as exc:
                    problems.append(f"{here} udp: {exc}")
            finally:
                srv.close()
                cli.close()
            # TCP
            lsn = dst_t.socket(af(family), socket.SOCK_STREAM)
            cli = src_t.socket(af(family), socket.SOCK_STREAM)
            try:
                lsn.bind((dst_addr[family], 0))
                lsn.listen(1)
                lsn.settimeout(1)
                cli.settimeout(1)
                try:
                    cli.connect(lsn.getsockname()[:2])
                    cli.sendall(b"tcp " + token)
                    conn, peer = lsn.accept()
                    with conn:
                        conn.settimeout(1)
                        if peer[0] != src_addr[family]:
                            problems.append(f"{here} tcp: the receiver saw source {peer[0]}")
                        conn.sendall(conn.recv(100))
                    if cli.recv(100) != b"tcp " + token:
                        problems.append(f"{here} tcp: wrong answer")
                except (socket.timeout, OSError) as exc:
                    problems.append(f"{here} tcp: {exc}")
            finally:
                lsn.close()
                cli.close()
            # ping: ext records the echo request's source, the kernel answers
            problems += _ping_problems(src_t, dst_t, family, src_addr[family], dst_addr[family], token, here)
    return problems


def inet_checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ping_problems(src_t, dst_t, family, src, dst, token, here) -> list[str]:
    proto = socket.IPPROTO_ICMP if family == 4 else socket.IPPROTO_ICMPV6
    request, reply = (8, 0) if family == 4 else (128, 129)
    ident = random.randrange(1, 0xFFFF)
    payload = b"ping " + token
    header = struct.pack("!BBHHH", request, 0, 0, ident, 1)
    if family == 4:  # (the kernel fills in ICMPv6's checksum, not ICMP's)
        header = struct.pack("!BBHHH", request, 0, inet_checksum(header + payload), ident, 1)
    watcher = dst_t.socket(af(family), socket.SOCK_RAW, proto)
    pinger = src_t.socket(af(family), socket.SOCK_RAW, proto)
    problems, saw = [], None
    try:
        watcher.settimeout(0.2)
        pinger.settimeout(0.2)
        pinger.sendto(header + payload, (dst, 0))
        deadline, answered = time.monotonic() + 1, False
        while time.monotonic() < deadline and not (answered and saw):
            for sock, kind in ((watcher, "request"), (pinger, "reply")):
                try:
                    data, peer = sock.recvfrom(2048)
                except (socket.timeout, OSError):
                    continue
                icmp = data[(data[0] & 0x0F) * 4:] if family == 4 else data
                if payload not in icmp[8:]:
                    continue
                if kind == "request" and icmp[0] == request:
                    saw = peer[0].split("%")[0]
                elif kind == "reply" and icmp[0] == reply:
                    answered = True
        if saw is None:
            problems.append(f"{here} ping: the request never arrived")
        elif saw != src:
            problems.append(f"{here} ping: the receiver saw source {saw}")
        if not answered:
            problems.append(f"{here} ping: no echo reply")
    finally:
        watcher.close()
        pinger.close()
    return problems


# br-nf-call on: bridged frames meet the ip/ip6 hooks (nat POSTROUTING with the bridge as
# out-interface); every backend returns for them (README "The decision").
@pytest.mark.parametrize("br_nf", [1, 0], ids=["br-nf-call-on", "br-nf-call-off"])
@pytest.mark.parametrize("br_address", [True, False], ids=["br0-addressed", "br0-no-address"])
def test_bridged_traffic_passes_untouched_under_default_config(node, backend, br_address, br_nf):
    """`{}` on a node with bridge br0 and containers on veth ports: UDP, TCP and ping
    between them work both ways with their own source addresses, after apply, after
    status and reconcile (exit 0), and through a port added after apply (then reconcile).
    Both with br0 addressed (docker0-like) and without an address; with br_netfilter's
    bridge-nf-call-ip(6)tables on (this kernel's default in a new namespace, and what
    Docker and kubeadm require) and off (bridged frames never meet the ip/ip6 hooks)."""
    bed = node.bed
    for key in ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"):
        assert bed.node_sysctl(key, br_nf) == str(br_nf)
    with extra_namespaces(bed, "c1", "c2", "c3") as ns:
        node.sh("ip link add br0 type bridge && ip link set br0 up")
        if br_address:
            node.sh(f"ip addr add {BRIDGE_V4}.1/24 dev br0 && ip -6 addr add {BRIDGE_V6}1/64 dev br0 nodad")
        c = {}
        for i, key in enumerate(("c1", "c2")):
            name, thread = ns[key]
            c[key] = (name, thread, bridge_port(node, name, i))
        node.apply({}, backend)
        problems = _bridge_rounds(node, ns, c)
        # and the node still masquerades its pod
        for family, dst in ((4, bed.dest("public")), (6, bed.dest("public6"))):
            seen = probe(bed, dst)
            if seen != bed.uplink_addr["eth0"][family]:
                problems.append(f"pod egress to {dst}: {seen}, want {bed.uplink_addr['eth0'][family]}")
    assert not problems, f"{backend}: {len(problems)} problems:\n" + "\n".join(problems)


def _bridge_rounds(node, ns, c) -> list[str]:
    """The rounds of the bridge test; stops at the first round with problems (a dropped
    packet costs its timeout, and the first round says what is wrong)."""
    problems = bridged_problems(c["c1"], c["c2"], "after apply")
    if problems:
        return problems
    for args in (["status"], ["reconcile"]):
        proc = node.ipmasq(*args)
        if proc.returncode != 0:
            problems.append(f"{args[0]} exited {proc.returncode}: {proc.stderr.strip()}")
    problems += bridged_problems(c["c1"], c["c2"], "after status and reconcile")
    if problems:
        return problems
    name, thread = ns["c3"]
    c["c3"] = (name, thread, bridge_port(node, name, 2))
    proc = node.ipmasq("reconcile")
    if proc.returncode != 0:
        problems.append(f"reconcile after a new port exited {proc.returncode}: {proc.stderr.strip()}")
    problems += bridged_problems(c["c3"], c["c1"], "a port added after apply, after reconcile")
    if problems:
        return problems
    return bridged_problems(c["c1"], c["c2"], "the first ports, after the new port's reconcile")


# ---------------------------------------------------------------- 7. state wiped


def engine_problems(node, cfg_path: str, want: str | None) -> list[str]:
    """Exactly one engine of ours live (`want`, when given); status does not claim in sync
    while more are live; new flows masqueraded (UDP and TCP, both families)."""
    bed = node.bed
    problems = []
    engines = live_engines(node)
    status_proc = node.ipmasq("status", "--config", cfg_path, "-o", "json")
    try:
        status = json.loads(status_proc.stdout)
    except ValueError:
        status = {}
        problems.append(f"status -o json exited {status_proc.returncode}: {status_proc.stderr.strip()}")
    if len(engines) != 1:
        problems.append(f"{len(engines)} engines of ours live: {engines}")
    if len(engines) > 1 and status.get("in_sync"):
        problems.append(f"status says in sync (backend {status.get('backend')}) while {sorted(engines)} are live")
    if len(engines) == 1:
        (live,) = engines
        if want is not None and live != want:
            problems.append(f"the live engine is {live}, want {want}")
        if status and (status.get("backend") != live or not status.get("in_sync")):
            problems.append(f"status: backend {status.get('backend')}, in_sync {status.get('in_sync')}, "
                            f"drift {status.get('drift')}; live: {live}")
    dests = {4: bed.dest("public"), 6: bed.dest("public6")}
    problems += probe_all(bed, dests, bed.uplink_addr["eth0"], "new flows")
    return problems


def wipe_state(node, installed: str) -> None:
    node.ipmasq("status", check=True)
    engines = live_engines(node)
    assert set(engines) == {installed}, f"after apply --backend {installed}: {engines}"
    assert probe(node.bed, node.bed.dest("public")) == node.bed.uplink_addr["eth0"][4]
    shutil.rmtree(node.env["IPMASQ_STATE_DIR"])


def test_state_wipe_then_reconcile_auto_keeps_one_engine(node, backend):
    """Backend B installed, the state dir wiped, then `reconcile` with `datapath: auto`:
    one engine of ours live afterwards, new flows masqueraded, status truthful."""
    # a drained ebpf datapath (after a switch away from it) goes at once once idle
    node.env["IPMASQ_BPF_DRAIN_IDLE"] = "0"
    node.apply({}, backend)
    wipe_state(node, backend)
    path = node.write_config({"datapath": "auto"}, name="auto.yaml")
    proc = node.ipmasq("reconcile", "--config", path)
    problems = [] if proc.returncode == 0 else [f"reconcile exited {proc.returncode}: {proc.stderr.strip()}"]
    print(f"{backend}: reconcile said: {proc.stdout.strip()} {proc.stderr.strip()}")
    problems += engine_problems(node, path, None)
    assert not problems, f"{backend}, state wiped, reconcile (auto):\n" + "\n".join(problems)


def _pairs():
    pairs = [(a, b) for a, b in zip(NETFILTER_BACKENDS, NETFILTER_BACKENDS[1:] + NETFILTER_BACKENDS[:1])]
    pairs += [("ebpf", "nftables"), ("nftables", "ebpf"), ("ebpf", "iptables-legacy")]
    out = []
    for old, new in pairs:
        reason = _ebpf_reason() if "ebpf" in (old, new) else None
        marks = [pytest.mark.skip(reason=f"ebpf: {reason}")] if reason else []
        out.append(pytest.param(old, new, id=f"{old}-to-{new}", marks=marks))
    return out


@pytest.mark.parametrize("old, new", _pairs())
def test_state_wipe_then_apply_another_backend_leaves_only_it(node, old, new):
    """Backend OLD installed, the state dir wiped, then `apply --backend NEW`: only NEW is
    live afterwards, new flows masqueraded, status truthful."""
    node.env["IPMASQ_BPF_DRAIN_IDLE"] = "0"
    node.apply({}, old)
    wipe_state(node, old)
    path = node.write_config({}, name="new.yaml")
    proc = node.ipmasq("apply", "--config", path, "--backend", new)
    problems = [] if proc.returncode == 0 else [f"apply exited {proc.returncode}: {proc.stderr.strip()}"]
    print(f"{old} -> {new}: apply said: {proc.stdout.strip()} {proc.stderr.strip()}")
    problems += engine_problems(node, path, new)
    assert not problems, f"{old} installed, state wiped, apply --backend {new}:\n" + "\n".join(problems)


# ---------------------------------------------------------------- connections to the node, DNATed on


PUBLISHED = 8080  # the node's port, DNATed to the pod's SERVER port (a published port, a NodePort)
SERVER = 8081
CLUSTER_IP = {4: "10.96.0.10", 6: "fd00:96::10"}  # a Service address DNATed to a destination outside


def _dnat_rules(bed: TestBed) -> str:
    """A neighbour's DNAT (its own nft table, as Docker's or kube-proxy's would be): the
    node's port PUBLISHED to the pod, and a Service address to a destination in ext."""
    pod, out = bed.pod_addr, {4: bed.dest("public"), 6: bed.dest("public6")}
    text = ""
    for family, nft, host in ((4, "ip", pod[4]), (6, "ip6", f"[{pod[6]}]")):
        text += (f"table {nft} neighbour {{\n\tchain pre {{\n\t\ttype nat hook prerouting priority dstnat;\n"
                 f"\t\ttcp dport {PUBLISHED} dnat to {host}:{SERVER}\n"
                 f"\t\tudp dport {PUBLISHED} dnat to {host}:{SERVER}\n"
                 f"\t\t{nft} daddr {CLUSTER_IP[family]} dnat to {out[family]}\n\t}}\n}}\n")
    return text


def _client_seen_by_pod(bed: TestBed, family: int, proto: str) -> str | None:
    """A client in ext calls the node's PUBLISHED port; the address the pod's server saw."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    server = bed.in_netns(bed.pod, socket.socket, af(family), kind)
    client = bed.in_netns(bed.ext, socket.socket, af(family), kind)
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the last round's TIME_WAIT
        server.bind(("::" if family == 6 else "0.0.0.0", SERVER))
        server.settimeout(3)
        client.settimeout(3)
        target = (bed.uplink_addr["eth0"][family], PUBLISHED)
        if proto == "tcp":
            server.listen(1)
            client.connect(target)
            conn, peer = server.accept()
            conn.close()
        else:
            client.sendto(b"hello", target)
            _data, peer = server.recvfrom(100)
        return peer[0]
    except OSError:
        return None
    finally:
        server.close()
        client.close()


def test_connections_to_the_node_dnated_to_a_pod_keep_the_clients_address(node, backend):
    """`{}`: a client outside calls a published port of the node (DNATed to the pod): the
    pod sees the client's own address, not the node's (not pod egress, README "The
    decision"); the pod's own connection to a Service address DNATed to a destination
    outside is still masqueraded."""
    bed = node.bed
    node.sh("nft -f -", input=_dnat_rules(bed))
    node.apply({}, backend)
    problems = []
    for family in (4, 6):
        client = bed.ext_addr("eth0")[family]
        for proto in ("tcp", "udp"):
            seen = _client_seen_by_pod(bed, family, proto)
            if seen != client:
                problems.append(f"ipv{family} {proto}: the pod saw {seen}, want the client's {client}")
        seen = probe(bed, CLUSTER_IP[family], "udp")
        if seen != bed.uplink_addr["eth0"][family]:
            problems.append(f"ipv{family}: the pod's flow to a Service left as {seen}, "
                            f"want {bed.uplink_addr['eth0'][family]}")
    assert not problems, f"{backend}:\n" + "\n".join(problems)


# ---------------------------------------------------------------- our rules removed under watch


# What removes our rules the way a firewall reload does, per backend, and how to see them back.
# (wipe, [(look, ours)] per family): the repair is one transaction per family, so a probe
# of both families waits for both to be back (IPv6's probe once ran ahead of its repair)
WIPES = {
    "iptables-legacy": ("iptables-legacy -t nat -F POSTROUTING && ip6tables-legacy -t nat -F POSTROUTING",
                        [("iptables-legacy -t nat -S POSTROUTING", "IPMASQ-LEGACY"),
                         ("ip6tables-legacy -t nat -S POSTROUTING", "IPMASQ-LEGACY")]),
    "iptables-nft": ("nft delete table ip nat && nft delete table ip6 nat",
                     [("iptables-nft -t nat -S POSTROUTING", "IPMASQ-LEGACY"),
                      ("ip6tables-nft -t nat -S POSTROUTING", "IPMASQ-LEGACY")]),
    "nftables": ("nft delete table ip ipmasq_legacy && nft delete table ip6 ipmasq_legacy",
                 [("nft list tables", "table ip ipmasq_legacy"), ("nft list tables", "table ip6 ipmasq_legacy")]),
    "ebpf": ("nft delete table ip nat && nft delete table ip6 nat",
             [("iptables-nft -t nat -S POSTROUTING", "IPMASQ-EBPF"),
              ("ip6tables-nft -t nat -S POSTROUTING", "IPMASQ-EBPF")]),
}


def test_watch_repairs_removed_rules_within_a_second(node, backend):
    """`ipmasq watch` answers a wipe of our rules (what `firewall-cmd --reload` does to
    iptables-nft's tables, a hand's `nft delete table`, a flush of iptables-legacy's
    POSTROUTING) within a second: nf_tables announces every commit; iptables-legacy's
    fingerprint is looked at once a second. Then pods are masqueraded again."""
    bed = node.bed
    config = node.write_config(ETH_PLUS)
    agent = WatchAgent(node, "--config", config, "--backend", backend)
    try:
        wipe, looks = WIPES[backend]

        def ours() -> bool:
            return all(mark in node.sh(look) for look, mark in looks)

        agent.wait_for(ours, "rules installed")
        node.sh(wipe)
        took = agent.wait_for(ours, "repair", timeout=5)
        print(f"{backend}: rules back {took:.3f} s after the wipe")
        assert took <= 1.0, f"{backend}: repaired after {took:.3f} s (> 1 s)"
        for family, dst in ((4, bed.dest("public")), (6, bed.dest("public6"))):
            assert probe(bed, dst) == bed.uplink_addr["eth0"][family]
    finally:
        agent.close()
