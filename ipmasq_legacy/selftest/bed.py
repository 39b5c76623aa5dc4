"""The selftest's bed: pod -> node -> outside namespaces, built, probed and torn down.

Everything lives in network namespaces created here, with unique names
(``ipmq-<tag>-pod``, ``ipmq-<tag>-node``, ``ipmq-<tag>-ext``).  No link, address,
route, sysctl or firewall rule is ever created in the calling process's own
network namespace::

    pod (eth0) ==veth== (vpod0) node (eth0) ==veth== (up0) ext
                                     (eth1) ==veth== (up1)
                                     (ens3) ==veth== (up2)

``ext`` holds the destination addresses it is given on ``lo`` and runs small UDP/TCP
echo servers plus ICMP / ICMPv6 listeners that record the source address each probe
arrived with (receivers.py).  :meth:`Bed.source_seen` sends one probe from the pod and
returns that address, so NAT rules installed in the node namespace can be observed
from outside.

Sockets are created *inside* a namespace by a helper thread that has switched its own
network namespace with ``setns(2)`` (netns.py); a socket stays in the namespace it was
created in, so the actual I/O can be done from any thread.  The main thread never
changes namespace.  The tests' bed (tests/testbed) extends this one: more pods, more
destinations, link events.
"""

from __future__ import annotations

import atexit
import errno
import ipaddress
import itertools
import os
import random
import re
import secrets
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass

from .netns import NETNS_PREFIX, ReplyLostError, TestBedError, _list_netns, _NsThread, _remove_netns
from .receivers import (
    DEFAULT_PORT,
    IFA_F_NODAD,
    IP_RECVERR,
    IPV6_RECVERR,
    MAGIC,
    _af,
    _family_of,
    _inet_checksum,
    _Receivers,
)


def _probe_timeout() -> float:
    """A probe's wait for its packet: 2 s, times IPMASQ_PROBE_TIMEOUT_SCALE where the
    machine is slow (tests/vm/guest.sh sets 3 in emulated guests, where a loaded TCG vCPU
    delayed one TCP handshake past 2 s). Only probes that get nothing wait that long."""
    try:
        scale = float(os.environ.get("IPMASQ_PROBE_TIMEOUT_SCALE") or 1)
    except ValueError:
        scale = 1.0
    return 2.0 * (scale if 1 <= scale <= 30 else 1.0)


# Probe source ports are handed out sequentially from this range (below the
# kernel's default ephemeral range 32768-60999) so that no probe reuses the
# 5-tuple of a recent one: every probe is a NEW conntrack entry.
_PROBE_PORT_LO = 20000
_PROBE_PORT_HI = 32767


@dataclass(frozen=True)
class Destination:
    name: str
    address: str
    family: int  # 4 or 6
    uplink: str


def destinations(table: dict[str, tuple[str, str]]) -> dict[str, Destination]:
    """{name: (address, node uplink)} as Destinations."""
    return {name: Destination(name, addr, ipaddress.ip_address(addr).version, uplink)
            for name, (addr, uplink) in table.items()}


# node uplink -> (ext peer name, v4 /24 net prefix, v6 /64 prefix)
UPLINKS: dict[str, tuple[str, str, str]] = {
    "eth0": ("up0", "172.20.0", "fd00:20::"),
    "eth1": ("up1", "172.21.0", "fd00:21::"),
    "ens3": ("up2", "172.22.0", "fd00:22::"),
}


_bed_counter = itertools.count(1)
_TAG_RE = re.compile(r"^[A-Za-z0-9_.]{1,32}$")


class Bed:
    """pod -> node -> ext network made of namespaces, with ``destinations`` on ext.
    See module doc."""

    # tests/testbed's TestBed sets more before building
    _npods = 1

    def __init__(self, destinations: dict[str, Destination], ipv6: bool = True, tag: str | None = None):
        if tag is None:
            # tests/testbed's cleanup_stale reads the owner's pid back from this form
            tag = f"{os.getpid()}x{next(_bed_counter):x}{secrets.token_hex(2)}"
        if not _TAG_RE.match(tag):
            raise ValueError(f"bad tag {tag!r} (use [A-Za-z0-9_.], up to 32 chars)")
        self.ipv6 = ipv6
        self.tag = tag
        self.node = f"{NETNS_PREFIX}{tag}-node"
        self.ext = f"{NETNS_PREFIX}{tag}-ext"
        self.pods = [f"{NETNS_PREFIX}{tag}-pod" + ("" if i == 0 else str(i + 1)) for i in range(self._npods)]
        self.pod = self.pods[0]
        self.namespaces = [*self.pods, self.node, self.ext]
        self.pod_addr = self.pod_addrs(0)
        self.uplink_addr: dict[str, dict[int, str]] = {}
        for up, (_peer, v4, v6) in UPLINKS.items():
            self.uplink_addr[up] = {4: f"{v4}.1"}
            if ipv6:
                self.uplink_addr[up][6] = f"{v6}1"
        self.DESTINATIONS: dict[str, Destination] = {
            n: d for n, d in destinations.items() if ipv6 or d.family == 4
        }
        self._created: list[str] = []
        self._threads: dict[str, _NsThread] = {}
        self._rx: _Receivers | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._ports = itertools.count(random.randrange(_PROBE_PORT_HI - _PROBE_PORT_LO))
        self._port_lock = threading.Lock()
        self._icmp_ids = itertools.count(random.randrange(1, 0xFFFF))
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- addressing --------------------------------------------------------

    def pod_addrs(self, i: int) -> dict[int, str]:
        """Addresses of pod number ``i`` (0-based): 10.244.<i+1>.2, fd00:244:<i+1>::2."""
        d = {4: f"10.244.{i + 1}.2"}
        if self.ipv6:
            d[6] = f"fd00:244:{i + 1:x}::2"
        return d

    def pod_gw(self, i: int) -> dict[int, str]:
        d = {4: f"10.244.{i + 1}.1"}
        if self.ipv6:
            d[6] = f"fd00:244:{i + 1:x}::1"
        return d

    def pod_subnets(self) -> dict[int, list[str]]:
        d: dict[int, list[str]] = {4: [f"10.244.{i + 1}.0/24" for i in range(len(self.pods))]}
        if self.ipv6:
            d[6] = [f"fd00:244:{i + 1:x}::/64" for i in range(len(self.pods))]
        return d

    def ext_addr(self, uplink: str) -> dict[int, str]:
        """Address of ext's side of a node uplink."""
        _peer, v4, v6 = UPLINKS[uplink]
        d = {4: f"{v4}.2"}
        if self.ipv6:
            d[6] = f"{v6}2"
        return d

    def dest(self, name: str) -> str:
        """Address of destination ``name``."""
        return self.DESTINATIONS[name].address

    # -- building ----------------------------------------------------------

    def _ipr(self, ns: str):
        from pyroute2 import IPRoute

        if ns not in self.namespaces:
            raise TestBedError(f"{ns} is not a namespace of this bed")
        return IPRoute(netns=ns)

    def _build(self) -> None:
        from pyroute2 import netns as _netns

        existing = set(_list_netns())
        for ns in self.namespaces:
            if ns in existing:
                raise TestBedError(f"netns {ns} already exists (tag clash?)")
        for ns in self.namespaces:
            _netns.create(ns)
            self._created.append(ns)
            self._threads[ns] = _NsThread(ns)

        for ns in self.namespaces:
            t = self._threads[ns]
            if self.ipv6:
                for scope in ("all", "default"):
                    t.sysctl(f"net.ipv6.conf.{scope}.accept_dad", 0)
                    t.sysctl(f"net.ipv6.conf.{scope}.dad_transmits", 0)
                    t.sysctl(f"net.ipv6.conf.{scope}.accept_ra", 0)
            else:
                for scope in ("all", "default"):
                    t.sysctl(f"net.ipv6.conf.{scope}.disable_ipv6", 1)
            for scope in ("all", "default"):
                t.sysctl(f"net.ipv4.conf.{scope}.rp_filter", 0)
        node = self._threads[self.node]
        node.sysctl("net.ipv4.ip_forward", 1)
        # Probes to unreachable addresses fail fast thanks to the node's ICMP
        # errors; lift the per-namespace ICMP rate limits.  (IPv4 "no route"
        # errors are additionally limited by net.ipv4.route.error_cost, which
        # is not per-namespace: after a burst of ~5 they come once a second.)
        for key, val in (
            ("net.ipv4.icmp_ratelimit", 0),
            ("net.ipv4.icmp_ratemask", 0),
            ("net.ipv6.icmp.ratelimit", 0),
        ):
            try:
                node.sysctl(key, val)
            except OSError:
                pass
        if self.ipv6:
            node.sysctl("net.ipv6.conf.all.forwarding", 1)

        v6 = self.ipv6
        with self._ipr(self.node) as ipr:
            self._link_up(ipr, "lo")
            for i, pod in enumerate(self.pods):
                vname = f"vpod{i}"
                ipr.link("add", ifname=vname, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod})
                idx = self._link_up(ipr, vname)
                gw = self.pod_gw(i)
                ipr.addr("add", index=idx, address=gw[4], prefixlen=24)
                if v6:
                    ipr.addr("add", index=idx, address=gw[6], prefixlen=64, flags=IFA_F_NODAD)
            for up, (peer, _v4, _v6) in UPLINKS.items():
                ipr.link("add", ifname=up, kind="veth", peer={"ifname": peer, "net_ns_fd": self.ext})
            for up in UPLINKS:
                self._configure_uplink(ipr, up)

        for i, pod in enumerate(self.pods):
            with self._ipr(pod) as ipr:
                self._link_up(ipr, "lo")
                idx = self._link_up(ipr, "eth0")
                a, gw = self.pod_addrs(i), self.pod_gw(i)
                ipr.addr("add", index=idx, address=a[4], prefixlen=24)
                ipr.route("add", dst="0.0.0.0/0", gateway=gw[4])
                if v6:
                    ipr.addr("add", index=idx, address=a[6], prefixlen=64, flags=IFA_F_NODAD)
                    ipr.route("add", dst="::/0", gateway=gw[6], family=socket.AF_INET6)

        with self._ipr(self.ext) as ipr:
            lo = self._link_up(ipr, "lo")
            for d in self.DESTINATIONS.values():
                if d.family == 4:
                    ipr.addr("add", index=lo, address=d.address, prefixlen=32)
                else:
                    ipr.addr("add", index=lo, address=d.address, prefixlen=128, flags=IFA_F_NODAD)
            for peer, v4, v6p in UPLINKS.values():
                idx = self._link_up(ipr, peer)
                ipr.addr("add", index=idx, address=f"{v4}.2", prefixlen=24)
                if v6:
                    ipr.addr("add", index=idx, address=f"{v6p}2", prefixlen=64, flags=IFA_F_NODAD)
            back = self.uplink_addr["eth0"]
            # explicit routes back to the pod subnets, plus a default route so
            # that replies to any SNAT address also go back to the node
            for net in self.pod_subnets()[4]:
                ipr.route("add", dst=net, gateway=back[4])
            ipr.route("add", dst="0.0.0.0/0", gateway=back[4])
            if v6:
                for net in self.pod_subnets()[6]:
                    ipr.route("add", dst=net, gateway=back[6], family=socket.AF_INET6)
                ipr.route("add", dst="::/0", gateway=back[6], family=socket.AF_INET6)

        self._rx = _Receivers(self._threads[self.ext], self.ipv6)
        for fam in self._rx.families:
            for proto in ("udp", "tcp"):
                self._rx.ensure(proto, fam, DEFAULT_PORT)

    @staticmethod
    def _link_up(ipr, ifname: str) -> int:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise TestBedError(f"link {ifname} not found")
        ipr.link("set", index=idx[0], state="up")
        return idx[0]

    def _configure_uplink(self, ipr, up: str) -> None:
        """(Re-)apply addresses and destination routes of a node uplink.
        Idempotent: tests/testbed's set_uplink brings an uplink back with it."""
        from pyroute2.netlink.exceptions import NetlinkError

        def tolerant(fn, *a, **kw):
            try:
                fn(*a, **kw)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise

        idx = self._link_up(ipr, up)
        mine, theirs = self.uplink_addr[up], self.ext_addr(up)
        tolerant(ipr.addr, "add", index=idx, address=mine[4], prefixlen=24)
        if self.ipv6:
            tolerant(ipr.addr, "add", index=idx, address=mine[6], prefixlen=64, flags=IFA_F_NODAD)
        for d in self.DESTINATIONS.values():
            if d.uplink != up:
                continue
            if d.family == 4:
                tolerant(ipr.route, "add", dst=f"{d.address}/32", gateway=theirs[4], oif=idx)
            else:
                tolerant(
                    ipr.route, "add", dst=f"{d.address}/128", gateway=theirs[6], oif=idx,
                    family=socket.AF_INET6,
                )

    # -- runtime helpers ---------------------------------------------------

    def exec_in(
        self,
        ns: str,
        argv: list[str],
        env: dict | None = None,
        input: str | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` in one of the bed's namespaces (``ip netns exec``).

        Text mode, output captured, never raises on a non-zero exit status
        (a timeout still raises ``subprocess.TimeoutExpired``).  ``env`` is
        added to (not substituted for) the current environment."""
        if ns not in self.namespaces:
            raise TestBedError(f"{ns} is not a namespace of this bed")
        if self._closed:
            raise TestBedError("bed is closed")
        full_env = None
        if env is not None:
            full_env = dict(os.environ)
            full_env.update({k: str(v) for k, v in env.items()})
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            env=full_env,
            input=input,
            timeout=timeout,
            capture_output=True,
            text=True,
            check=False,
        )

    def node_exec(self, argv: list[str], env: dict | None = None, input: str | None = None,
                  timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``argv`` in the node namespace (see :meth:`exec_in`)."""
        return self.exec_in(self.node, argv, env=env, input=input, timeout=timeout)

    # -- probing -----------------------------------------------------------

    def _bind_fresh(self, sock: socket.socket, fam: int) -> int:
        """Bind ``sock`` to the next unused probe port.  Also asks for ICMP
        errors (net/host unreachable are otherwise not reported), so that an
        unreachable destination fails fast."""
        if fam == 4:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        span = _PROBE_PORT_HI - _PROBE_PORT_LO
        for _ in range(200):
            with self._port_lock:
                port = _PROBE_PORT_LO + next(self._ports) % span
            try:
                sock.bind(("0.0.0.0" if fam == 4 else "::", port))
                return port
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
        raise TestBedError("no free probe port")

    def source_seen(
        self,
        dst: str,
        proto: str = "udp",
        port: int = DEFAULT_PORT,
        timeout: float | None = None,
        pod: int = 0,
        require_reply: bool = True,
    ) -> str | None:
        """Send one probe from pod number ``pod`` to ``dst`` and return the
        source address the receiver in ext saw, or None if nothing arrived.

        ``dst`` may be an address or a destination name.  ``proto`` is one of
        udp, tcp, icmp.  Every probe is a new flow (fresh source port / echo
        id), so it goes through the NAT rules rather than an old conntrack
        entry.  If the probe reached ext but the answer did not come back to
        the pod, ReplyLostError is raised (``require_reply=False``: return
        what ext saw instead).  For tcp a lost SYN-ACK looks like "nothing
        arrived" (returns None)."""
        if self._closed:
            raise TestBedError("bed is closed")
        timeout = _probe_timeout() if timeout is None else timeout
        if dst in self.DESTINATIONS:
            dst = self.DESTINATIONS[dst].address
        fam = _family_of(dst)
        if fam == 6 and not self.ipv6:
            return None
        proto = proto.lower()
        if proto not in ("udp", "tcp", "icmp"):
            raise ValueError(f"proto must be udp, tcp or icmp, not {proto!r}")
        if not 0 <= pod < len(self.pods):
            raise ValueError(f"no pod {pod}")
        assert self._rx is not None
        token = secrets.token_hex(8)
        t_pod = self._threads[self.pods[pod]]
        if proto == "icmp":
            got = self._probe_icmp(t_pod, fam, dst, token, timeout)
        else:
            self._rx.ensure(proto, fam, port)
            if proto == "udp":
                got = self._probe_udp(t_pod, fam, dst, port, token, timeout)
            else:
                got = self._probe_tcp(t_pod, fam, dst, port, token, timeout)
        if got is not None:
            # the reply carried (or, for icmp, the kernel answered) -- get ext's record
            seen = got if proto != "icmp" else self._rx.wait_seen(token, 1.0)
            self._rx.pop_seen(token)
            if seen is None:  # pragma: no cover - should not happen
                raise TestBedError(f"{proto} reply for {dst} came back but ext recorded nothing")
            return seen
        # no (valid) reply; did the probe reach ext at all?
        seen = self._rx.wait_seen(token, 0.05)
        self._rx.pop_seen(token)
        if seen is not None and require_reply:
            raise ReplyLostError(
                f"{proto} probe from {self.pod_addrs(pod)[fam]} to {dst}:{port} reached ext "
                f"with source {seen}, but the reply never came back to the pod",
                seen,
            )
        return seen

    def _probe_udp(self, t: _NsThread, fam: int, dst: str, port: int, token: str,
                   timeout: float) -> str | None:
        s = t.socket(_af(fam), socket.SOCK_DGRAM)
        try:
            self._bind_fresh(s, fam)
            s.connect((dst, port))
            s.send(b"%s %s\n" % (MAGIC, token.encode()))
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                s.settimeout(left)
                try:
                    data = s.recv(2048)
                except socket.timeout:
                    return None
                except OSError:  # ICMP error: unreachable, refused, ...
                    return None
                parts = data.split()
                if len(parts) == 3 and parts[0] == MAGIC and parts[1].decode() == token:
                    return parts[2].decode()
        finally:
            s.close()

    def _probe_tcp(self, t: _NsThread, fam: int, dst: str, port: int, token: str,
                   timeout: float) -> str | None:
        s = t.socket(_af(fam), socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # no lingering TIME_WAIT on the pod side
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._bind_fresh(s, fam)
            deadline = time.monotonic() + timeout
            s.settimeout(timeout)
            try:
                s.connect((dst, port))
                s.sendall(b"%s %s\n" % (MAGIC, token.encode()))
                buf = b""
                while b"\n" not in buf:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    s.settimeout(left)
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
            except (socket.timeout, OSError):
                return None
            parts = buf.split()
            if len(parts) == 3 and parts[0] == MAGIC and parts[1].decode() == token:
                return parts[2].decode()
            return None
        finally:
            s.close()

    def _probe_icmp(self, t: _NsThread, fam: int, dst: str, token: str,
                    timeout: float) -> str | None:
        ident = next(self._icmp_ids) % 0xFFFF + 1
        payload = b"%s %s\n" % (MAGIC, token.encode())
        if fam == 4:
            s = t.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            hdr = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
            csum = _inet_checksum(hdr + payload)
            pkt = struct.pack("!BBHHH", 8, 0, csum, ident, 1) + payload
            reply_type, err_types = 0, (3, 11)
        else:
            s = t.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            pkt = struct.pack("!BBHHH", 128, 0, 0, ident, 1) + payload  # kernel fills checksum
            reply_type, err_types = 129, (1, 3)
        try:
            try:
                s.sendto(pkt, (dst, 0))
            except OSError:
                return None
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                s.settimeout(left)
                try:
                    data, _addr = s.recvfrom(65535)
                except (socket.timeout, OSError):
                    return None
                if fam == 4:
                    data = data[(data[0] & 0x0F) * 4:]
                if len(data) < 8:
                    continue
                if data[0] == reply_type and payload in data[8:]:
                    return "reply"
                if data[0] in err_types and payload in data:
                    # an ICMP error quoting our request: unreachable
                    return None
        finally:
            s.close()

    # -- teardown ----------------------------------------------------------

    def close(self) -> None:
        """Delete every namespace this bed created.  Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        errors = []
        if self._rx is not None:
            try:
                self._rx.close()
            except Exception as e:  # pragma: no cover
                errors.append(e)
        for t in self._threads.values():
            t.stop()
        for ns in reversed(self._created):
            try:
                _remove_netns(ns)
            except Exception as e:
                errors.append(e)
        try:
            atexit.unregister(self.close)
        except Exception:  # pragma: no cover
            pass
        if errors:
            raise TestBedError(f"errors while closing bed {self.tag}: {errors}")

    def __enter__(self) -> Bed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.tag} pods={len(self.pods)} ipv6={self.ipv6}{' closed' if self._closed else ''}>"
