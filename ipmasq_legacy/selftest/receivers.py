"""The servers in a bed's `ext` namespace that record the source address each probe arrived with."""

from __future__ import annotations

import ipaddress
import os
import queue
import selectors
import socket
import struct
import threading
import time

from .netns import _NsThread

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
IFA_F_NODAD = 0x02

MAGIC = b"IPMQ1"
DEFAULT_PORT = 9000


def _inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _family_of(addr: str) -> int:
    return ipaddress.ip_address(addr).version


def _af(family: int) -> int:
    return socket.AF_INET if family == 4 else socket.AF_INET6


# --------------------------------------------------------------------------
# ext-side receivers
# --------------------------------------------------------------------------


class _Receivers:
    """All ext-side servers, driven by one selector thread.

    * UDP: echo server on wildcard; answers ``IPMQ1 <token> <peer>`` from the
      exact address the probe was sent to (IP_PKTINFO / IPV6_PKTINFO).
    * TCP: same protocol over a connection.
    * ICMP/ICMPv6: raw sockets recording the source of echo requests whose
      payload carries a token; the kernel answers the echo itself.
    """

    def __init__(self, ns: _NsThread, ipv6: bool):
        self.ns = ns
        self.ipv6 = ipv6
        self.seen: dict[str, tuple[str, str]] = {}  # token -> (proto, source)
        self.cond = threading.Condition()
        self._sel = selectors.DefaultSelector()
        self._pending: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._socks: list[socket.socket] = []
        self._servers: set[tuple[str, int, int]] = set()
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"rx-{ns.name}", daemon=True)
        self._thread.start()
        for fam in self.families:
            self._add_icmp(fam)

    @property
    def families(self) -> tuple[int, ...]:
        return (4, 6) if self.ipv6 else (4,)

    # -- setup -------------------------------------------------------------

    def _register(self, sock: socket.socket, handler) -> None:
        sock.setblocking(False)
        self._socks.append(sock)
        self._pending.put((sock, handler))
        os.write(self._wake_w, b"x")

    def _add_icmp(self, fam: int) -> None:
        if fam == 4:
            s = self.ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        else:
            s = self.ns.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            # ICMP6_FILTER: pass only echo requests (type 128)
            filt = bytearray(b"\xff" * 32)
            filt[128 >> 5 << 2 : (128 >> 5 << 2) + 4] = struct.pack(
                "=I", 0xFFFFFFFF & ~(1 << (128 & 31))
            )
            try:
                s.setsockopt(socket.IPPROTO_ICMPV6, 1, bytes(filt))
            except OSError:
                pass
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._register(s, lambda sock, fam=fam: self._on_icmp(sock, fam))

    def ensure(self, proto: str, fam: int, port: int) -> None:
        """Start a UDP/TCP server on ``port`` for family ``fam`` (idempotent)."""
        key = (proto, fam, port)
        with self._lock:
            if key in self._servers:
                return
            af = _af(fam)
            typ = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
            s = self.ns.socket(af, typ)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == 6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if proto == "udp":
                if fam == 4:
                    s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                else:
                    s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind(("0.0.0.0" if fam == 4 else "::", port))
            if proto == "udp":
                self._register(s, lambda sock, fam=fam: self._on_udp(sock, fam))
            else:
                s.listen(512)
                self._register(s, self._on_accept)
            self._servers.add(key)

    # -- loop --------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop:
            try:
                events = self._sel.select(1.0)
            except OSError:  # pragma: no cover
                continue
            for key, _ in events:
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    while True:
                        try:
                            sock, handler = self._pending.get_nowait()
                        except queue.Empty:
                            break
                        self._sel.register(sock, selectors.EVENT_READ, handler)
                    continue
                try:
                    key.data(key.fileobj)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    pass

    def _record(self, token: str, proto: str, source: str) -> None:
        with self.cond:
            self.seen[token] = (proto, source)
            self.cond.notify_all()

    def wait_seen(self, token: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while token not in self.seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.seen[token][1]

    def pop_seen(self, token: str) -> str | None:
        with self.cond:
            v = self.seen.pop(token, None)
        return v[1] if v else None

    @staticmethod
    def _parse_request(data: bytes) -> str | None:
        parts = data.strip().split()
        if len(parts) >= 2 and parts[0] == MAGIC:
            return parts[1].decode("ascii", "replace")
        return None

    def _on_udp(self, sock: socket.socket, fam: int) -> None:
        for _ in range(64):
            try:
                data, anc, _flags, addr = sock.recvmsg(2048, 256)
            except BlockingIOError:
                return
            token = self._parse_request(data)
            if token is None:
                continue
            src = addr[0]
            self._record(token, "udp", src)
            reply = b"%s %s %s\n" % (MAGIC, token.encode(), src.encode())
            cmsgs = []
            for level, typ, cdata in anc:
                if fam == 4 and level == socket.IPPROTO_IP and typ == IP_PKTINFO:
                    # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
                    _ifi, _spec, dst = struct.unpack("=i4s4s", cdata[:12])
                    cmsgs.append((socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, dst, b"\0" * 4)))
                elif fam == 6 and level == socket.IPPROTO_IPV6 and typ == IPV6_PKTINFO:
                    # struct in6_pktinfo { in6_addr addr; int ifindex; }
                    dst = cdata[:16]
                    cmsgs.append((socket.IPPROTO_IPV6, IPV6_PKTINFO, dst + struct.pack("=i", 0)))
            try:
                sock.sendmsg([reply], cmsgs, 0, addr)
            except OSError:
                pass

    def _on_accept(self, lsock: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, addr = lsock.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            buf = bytearray()
            src = addr[0]

            def on_data(c: socket.socket, buf=buf, src=src) -> None:
                try:
                    chunk = c.recv(4096)
                except BlockingIOError:
                    return
                except OSError:
                    chunk = b""
                if chunk:
                    buf.extend(chunk)
                    if b"\n" not in buf and len(buf) < 1024:
                        return
                    token = self._parse_request(bytes(buf))
                    if token is not None:
                        self._record(token, "tcp", src)
                        try:
                            c.send(b"%s %s %s\n" % (MAGIC, token.encode(), src.encode()))
                        except OSError:
                            pass
                self._sel.unregister(c)
                c.close()

            self._sel.register(conn, selectors.EVENT_READ, on_data)

    def _on_icmp(self, sock: socket.socket, fam: int) -> None:
        for _ in range(64):
            try:
                data, addr = sock.recvfrom(65535)
            except BlockingIOError:
                return
            if fam == 4:
                ihl = (data[0] & 0x0F) * 4
                icmp = data[ihl:]
                want = 8
            else:
                icmp = data
                want = 128
            if len(icmp) < 8 + len(MAGIC) or icmp[0] != want:
                continue
            token = self._parse_request(icmp[8:])
            if token is not None:
                self._record(token, "icmp", addr[0].split("%")[0])

    def close(self) -> None:
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            if isinstance(key.fileobj, socket.socket):
                key.fileobj.close()
        for s in self._socks:
            s.close()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
