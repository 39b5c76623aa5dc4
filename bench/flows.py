"""What a packet costs through a bed's node: new connections (FlowBench: UDP packets from
the pod, each a new conntrack flow, forwarded to an address ext drops) and steady
throughput (iperf3, or a Python socket pump, pod -> ext).  bench/measure.py runs them."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import socket
import statistics
import struct
import subprocess
import threading
import time
from typing import TYPE_CHECKING

from tests.testbed import TestBed

if TYPE_CHECKING:
    from .measure import Settings

# ext drops everything sent here (a blackhole route): the node forwards (and NATs)
# each packet, nobody answers, no ICMP comes back.
SINK_NET = "198.20.50.0/24"
SINK_ADDR = "198.20.50.1"
IPERF_DST = "public"  # 198.20.0.10, a destination ext holds, via the node's eth0
IPERF_PORT = 5201


# ---------------------------------------------------------------- new-connection cost

_libc = ctypes.CDLL(None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


class FlowSender:
    """Sends packet i of a burst from one UDP socket to SINK_ADDR port 1+i: every
    packet of a burst is a new flow.  Many packets per system call with sendmmsg(2)
    through ctypes (falls back to a sendto loop)."""

    BATCH = 256

    def __init__(self, sock: socket.socket, dst: str, count: int):
        self.sock = sock
        self.dst = dst
        self.count = count
        self.method = "sendmmsg"
        try:
            self._fn = _libc.sendmmsg
            self._fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
            self._fn.restype = ctypes.c_int
        except AttributeError:
            self.method = "sendto loop"
            return
        self._payload = ctypes.create_string_buffer(b"ipmq-bench", 10)
        self._iov = _Iovec(ctypes.cast(self._payload, ctypes.c_void_p), 10)
        addr = socket.inet_aton(dst)
        raw = b"".join(struct.pack("=H", socket.AF_INET) + struct.pack("!H", 1 + i) + addr + bytes(8)
                       for i in range(count))
        self._names = ctypes.create_string_buffer(raw, len(raw))
        self._msgs = (_Mmsghdr * count)()
        base = ctypes.addressof(self._names)
        iov = ctypes.addressof(self._iov)
        for i in range(count):
            h = self._msgs[i].hdr
            h.name, h.namelen, h.iov, h.iovlen = base + 16 * i, 16, iov, 1
        self._size = ctypes.sizeof(_Mmsghdr)

    def send(self, start: int, count: int) -> None:
        end = start + count
        if self.method != "sendmmsg":
            for i in range(start, end):
                self.sock.sendto(b"ipmq-bench", (self.dst, 1 + i))
            return
        fd = self.sock.fileno()
        base = ctypes.addressof(self._msgs)
        i = start
        while i < end:
            sent = self._fn(fd, base + i * self._size, min(self.BATCH, end - i), 0)
            if sent < 0:
                e = ctypes.get_errno()
                if e in (errno.EAGAIN, errno.ENOBUFS, errno.EINTR):
                    continue
                raise OSError(e, os.strerror(e))
            i += sent


def _read_forwarded() -> int:
    """IP ForwDatagrams of the calling thread's namespace (run on a bed's node thread)."""
    with open("/proc/thread-self/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Ip:")]
    return int(rows[1][rows[0].index("ForwDatagrams")])


def _read_conntrack_count() -> int:
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
            return int(f.read())
    except OSError:
        return -1


class FlowBench:
    """New-connection cost through one bed's node."""

    def __init__(self, bed: TestBed, max_packets: int):
        self.bed = bed
        for ns, argv in ((bed.ext, ["ip", "route", "replace", "blackhole", SINK_NET]),
                         (bed.node, ["ip", "route", "replace", SINK_NET, "via", bed.ext_addr("eth0")[4],
                                     "dev", "eth0"])):
            r = bed.exec_in(ns, argv)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} in {ns}: {r.stderr.strip()}")
        self.sock = bed.in_netns(bed.pod, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((bed.pod_addr[4], 40000))
        self.sender = FlowSender(self.sock, SINK_ADDR, max_packets)
        self.plan: tuple[int, bool] | None = None
        # resolve the neighbours on the way (pod -> node -> ext) before timing anything
        for _ in range(3):
            self.sender.send(0, 4)
            time.sleep(0.1)

    def close(self) -> None:
        self.sock.close()

    def forwarded(self) -> int:
        return self.bed.in_netns(self.bed.node, _read_forwarded)

    def conntrack_count(self) -> int:
        return self.bed.in_netns(self.bed.node, _read_conntrack_count)

    def flush_conntrack(self) -> None:
        self.bed.node_exec(["conntrack", "-F"])

    def burst(self, n: int, paced: bool, batch: int = 16) -> tuple[float, int]:
        """Send n new flows; (seconds until the node forwarded all of them, forwarded)."""
        f0 = self.forwarded()
        start = time.perf_counter()
        if not paced:
            # The node forwards a packet in the softirq that the sending call itself
            # runs, so the burst is normally done when the last send returns.
            self.sender.send(0, n)
        else:
            # Slow rule sets: wait for the node to catch up after every few packets
            # (else the backlog queue overflows and packets are lost uncounted).
            sent = 0
            while sent < n:
                k = min(batch, n - sent)
                self.sender.send(sent, k)
                sent += k
                deadline = time.perf_counter() + 1.0  # a lost packet must not stall the burst
                while self.forwarded() - f0 < sent and time.perf_counter() < deadline:
                    pass
        done = self.forwarded() - f0
        deadline = time.perf_counter() + 2.0
        while done < n and time.perf_counter() < deadline:
            done = self.forwarded() - f0
        return time.perf_counter() - start, done

    def calibrate(self, s: Settings) -> tuple[int, bool]:
        """(packets per burst, paced) for the rules installed now, from a short paced burst."""
        if self.plan is None:
            self.flush_conntrack()
            n_cal = 64
            while True:
                secs, done = self.burst(n_cal, paced=True)
                if secs > 0.05 or n_cal >= 4096:
                    break
                self.flush_conntrack()
                n_cal *= 4
            per = secs / max(done, 1)
            self.plan = (int(min(s.conn_max_packets, max(100, s.conn_run_seconds / per))), per > 50e-6)
        return self.plan

    def one(self, n: int, paced: bool) -> tuple[float, int, bool]:
        """One burst after a conntrack flush: (µs per packet, packets lost, paced)."""
        self.flush_conntrack()
        secs, done = self.burst(n, paced)
        if done < n and not paced:  # packets lost: redo this one paced
            paced = True
            self.flush_conntrack()
            secs, done = self.burst(n, paced)
        return secs / n * 1e6, n - done, paced

    def measure(self, s: Settings, baseline: FlowBench | None = None) -> dict:
        """µs per new connection: median of s.conn_repeats bursts.  With `baseline` (the
        floor's bed), each burst is followed by one there, so that every row has a floor
        measured at the same moment (the machine is shared: its speed drifts)."""
        self.plan = None  # the rules changed since the last call: calibrate again
        n, paced = self.calibrate(s)
        base = baseline.calibrate(s) if baseline is not None else None
        samples, floor, ratios, entries, lost = [], [], [], [], 0
        for _ in range(s.conn_repeats):
            us, missing, paced = self.one(n, paced)
            lost += missing
            entries.append(self.conntrack_count())
            samples.append(us)
            if baseline is not None:
                f, _, _ = baseline.one(*base)
                floor.append(f)
                ratios.append(us / f)
        self.flush_conntrack()
        out = {
            "us_per_conn": statistics.median(samples),
            "min": min(samples),
            "max": max(samples),
            "samples": samples,
            "packets": n,
            "paced": paced,
            "lost": lost,
            "conntrack_entries": statistics.median(entries),
            "sender": self.sender.method,
        }
        if baseline is not None:
            out.update(floor_us=statistics.median(floor), floor_samples=floor, ratio=statistics.median(ratios))
        return out


def add_nat_chain(bed: TestBed, rule: str = "") -> None:
    """A nat postrouting base chain (conntrack and NAT set-up on) holding `rule`, if any."""
    r = bed.node_exec(["nft", "-f", "-"], input=(
        "table ip bench_nat {\n"
        f"  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; {rule}{'; ' if rule else ''}}}\n"
        "}\n"))
    if r.returncode != 0:
        raise RuntimeError(f"nat chain: {r.stderr.strip()}")


def delete_nat_chain(bed: TestBed) -> None:
    bed.node_exec(["nft", "delete", "table", "ip", "bench_nat"])


def ip_masq_agent_restore(prefixes: list[str]) -> str:
    """ip-masq-agent's nat layout: one RETURN rule per prefix, then MASQUERADE."""
    lines = ["*nat", ":IP-MASQ-AGENT - [0:0]",
             '-A POSTROUTING -m comment --comment "ip-masq-agent: ensure nat POSTROUTING directs all '
             'non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain" -m addrtype ! --dst-type LOCAL '
             "-j IP-MASQ-AGENT"]
    lines += [f'-A IP-MASQ-AGENT -d {p} -m comment --comment "ip-masq-agent: local traffic is not subject to '
              'MASQUERADE" -j RETURN' for p in prefixes]
    lines.append('-A IP-MASQ-AGENT -m comment --comment "ip-masq-agent: outbound traffic is subject to '
                 'MASQUERADE (must be last in chain)" -j MASQUERADE')
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- throughput


def _iperf(bed: TestBed, seconds: int, streams: int) -> dict:
    dst = bed.dest(IPERF_DST)
    argv = ["iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t", str(seconds), "-P", str(streams), "-J"]
    import json

    for _ in range(30):
        r = bed.pod_exec(argv, timeout=seconds + 30)
        try:
            data = json.loads(r.stdout)
        except ValueError:
            data = {"error": r.stderr.strip() or r.stdout.strip()}
        if "error" in data:
            if "connect" in data["error"]:  # server not listening yet
                time.sleep(0.1)
                continue
            raise RuntimeError(f"iperf3: {data['error']}")
        end = data["end"]
        return {"gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
                "retransmits": end["sum_sent"].get("retransmits"),
                "cpu_sender_pct": end.get("cpu_utilization_percent", {}).get("host_total"),
                "tool": "iperf3"}
    raise RuntimeError("iperf3 server never answered")


def _pump(bed: TestBed, seconds: int, streams: int) -> dict:
    """Python fallback: `streams` TCP connections pod -> ext, each writing 256 KiB chunks."""
    dst = bed.dest(IPERF_DST)
    lsock = bed.in_netns(bed.ext, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((dst, IPERF_PORT + 1))
    lsock.listen(16)
    received = [0]
    lock = threading.Lock()

    def sink(conn: socket.socket) -> None:
        buf = bytearray(1 << 18)
        with conn:
            while True:
                k = conn.recv_into(buf)
                if not k:
                    return
                with lock:
                    received[0] += k

    def acceptor() -> None:
        for _ in range(streams):
            conn, _ = lsock.accept()
            threading.Thread(target=sink, args=(conn,), daemon=True).start()

    threading.Thread(target=acceptor, daemon=True).start()
    chunk = bytes(1 << 18)
    stop = time.perf_counter() + seconds

    def source() -> None:
        s = bed.in_netns(bed.pod, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
        with s:
            s.connect((dst, IPERF_PORT + 1))
            while time.perf_counter() < stop:
                s.sendall(chunk)

    start = time.perf_counter()
    threads = [threading.Thread(target=source) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    time.sleep(0.2)
    lsock.close()
    return {"gbit_s": received[0] * 8 / elapsed / 1e9, "retransmits": None, "cpu_sender_pct": None,
            "tool": "python socket pump"}


class _IperfServer:
    """`iperf3 -s` in a bed's ext namespace, for as long as the `with` lasts."""

    def __init__(self, bed: TestBed):
        self.proc = subprocess.Popen(["ip", "netns", "exec", bed.ext, "iperf3", "-s", "-B", bed.dest(IPERF_DST),
                                      "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure_throughput(bed: TestBed, s: Settings, baseline: TestBed | None = None) -> dict:
    """Gbit/s with 1 and 4 streams, median of s.throughput_runs runs.  With `baseline`
    (the floor's bed), each run is followed by the same run there, and `ratio` is the
    median of the pairs: the machine is shared and its speed drifts."""
    out = {}
    if not shutil.which("iperf3"):
        for streams in s.streams:
            out[streams] = _pump(bed, s.throughput_seconds, streams)
            if baseline is not None:
                plain = _pump(baseline, s.throughput_seconds, streams)["gbit_s"]
                out[streams].update(plain_gbit_s=plain, ratio=out[streams]["gbit_s"] / plain)
        return out
    with contextlib.ExitStack() as servers:
        for b in (bed, baseline):
            if b is not None:
                servers.enter_context(_IperfServer(b))
        for streams in s.streams:
            runs, plain = [], []
            for _ in range(s.throughput_runs):
                runs.append(_iperf(bed, s.throughput_seconds, streams))
                if baseline is not None:
                    plain.append(_iperf(baseline, s.throughput_seconds, streams)["gbit_s"])
            out[streams] = {**runs[0], "gbit_s": statistics.median(r["gbit_s"] for r in runs),
                            "samples": [r["gbit_s"] for r in runs]}
            if plain:
                out[streams].update(plain_gbit_s=statistics.median(plain), plain_samples=plain,
                                    ratio=statistics.median(r["gbit_s"] / p for r, p in zip(runs, plain)))
    return out
