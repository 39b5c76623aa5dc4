"""The ebpf backend: source NAT in BPF on tc, proven with packets in private namespaces.

The decision itself (every config case, both families) is proven by the equivalence
suite in test_traffic.py, which runs ebpf beside the netfilter backends. Here: what is
particular to BPF (pinned maps, in-place config changes, interfaces that come and go,
port allocation and exhaustion, ICMP errors, checksums under offload, live switching
to and from netfilter) and the load tests of the issue (100 MB through the
translation, 10,000 concurrent UDP flows).

Each node gets a private bpffs (tests/nodeutil.py); nothing is attached outside the
test bed's namespaces.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from ipmasq_legacy import backends
from ipmasq_legacy.backends import ebpf
from ipmasq_legacy.bpf import loader
from ipmasq_legacy.plan import FamilyPlan, Plan
from ipmasq_legacy.testbed import TestBed

from .nodeutil import Node

REASON = backends.get("ebpf").unavailable_reason()
needs_ebpf = pytest.mark.skipif(REASON is not None, reason=f"ebpf backend cannot run here: {REASON}")


# ---------------------------------------------------------------- without packets


@pytest.mark.skipif(not ebpf.object_path().exists(), reason="masq.o not built (bash scripts/setup)")
def test_object_maps_match_the_loader():
    obj = loader.read_object(str(ebpf.object_path()))
    assert set(obj.progs) == {"ipmq_egress", "ipmq_ingress"}
    assert set(obj.maps) == set(ebpf.KNOWN_MAPS)
    assert obj.maps["ipmq_nat_fwd"].key_size == ebpf.NAT_KEY.size
    assert obj.maps["ipmq_nat_fwd"].value_size == ebpf.NAT_VAL.size
    assert obj.maps["ipmq_cfg"].value_size == ebpf.CFG.size
    assert obj.maps["ipmq_ifaces"].value_size == ebpf.IFACE.size
    assert obj.maps["ipmq_exempt4"].key_size == ebpf.LPM[4].size
    assert obj.maps["ipmq_exempt6"].key_size == ebpf.LPM[6].size
    assert obj.maps["ipmq_exempt4"].type == loader.MAP_LPM_TRIE
    assert obj.maps["ipmq_nat_rev"].type == loader.MAP_LRU_HASH
    for prog in obj.progs.values():
        assert prog.relocs and all(name in obj.maps for _, name in prog.relocs)


def test_translated_ports_leave_out_the_ephemeral_range():
    ports = ebpf.translated_ports((), (32768, 60999))
    assert ebpf.port_spans(ports) == [(1024, 32767), (61000, 65535)]
    ports = ebpf.translated_ports(((1024, 29999), (32768, 65535)), (32768, 60999))
    assert ebpf.port_spans(ports) == [(1024, 29999), (61000, 65535)]
    assert ebpf.translated_ports(((40000, 40100),), (32768, 60999)) == []


def test_render_is_bpftool_batch_lines():
    fp = FamilyPlan(4, ("eth+",), ("10.244.0.0/16",), ("10.0.0.0/8", "192.168.0.0/16"))
    text = ebpf.EbpfBackend().render(Plan((fp,)))
    assert "eth+" in text and "# IPv6: disabled" in text
    assert text.count("/exempt4 key hex") == 2 and text.count("/src4 key hex") == 1
    # prefix length 8 (generation byte) + 8, generation 0, 10.0.0.0
    assert "key hex 10 00 00 00 00 0a 00 00 00 value hex 01  # 10.0.0.0/8" in text


def test_missing_object_is_explained(tmp_path):
    env = {**os.environ, "IPMASQ_BPF_OBJECT": str(tmp_path / "masq.o"), "IPMASQ_CONFIG": "",
           "IPMASQ_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run([sys.executable, "-m", "ipmasq_legacy", "apply", "--backend", "ebpf"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "backend ebpf cannot run here" in proc.stderr and "scripts/setup" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    doctor = subprocess.run([sys.executable, "-m", "ipmasq_legacy", "doctor", "-o", "json"], env=env,
                            capture_output=True, text=True)
    data = json.loads(doctor.stdout)
    assert "not built" in data["backends"]["ebpf"] and "not built" in data["bpf"]["ebpf backend"]
    assert data["auto"]["backend"] != "ebpf"


# ---------------------------------------------------------------- helpers for traffic



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


class TcpEcho:
    """A TCP server in ext echoing everything back; records each peer; optionally hashes."""

    def __init__(self, bed: TestBed, address: str, port: int, sink: bool = False):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.sock = bed.in_netns(bed.ext, socket.socket, family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.sink = sink
        self.peers: list[tuple[str, int]] = []
        self.digests: list[tuple[int, str]] = []
        self._stop = False
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self):
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.peers.append(peer[:2])
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn):
        conn.settimeout(30)
        digest, count = hashlib.sha256(), 0
        try:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                if self.sink:
                    digest.update(data)
                    count += len(data)
                else:
                    conn.sendall(data)
        except OSError:
            pass
        finally:
            if self.sink:
                self.digests.append((count, digest.hexdigest()))
                try:
                    conn.sendall(digest.hexdigest().encode())
                except OSError:
                    pass
            conn.close()

    def close(self):
        self._stop = True
        for t in self._threads:
            t.join(2)
        self.sock.close()


def pod_socket(bed: TestBed, family: int, kind=socket.SOCK_DGRAM, pod: int = 0, port: int = 0) -> socket.socket:
    s = bed.in_netns(bed.pods[pod], socket.socket, socket.AF_INET if family == 4 else socket.AF_INET6, kind)
    if port:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0" if family == 4 else "::", port))
    return s


def tc_prog_ids(node: Node, dev: str) -> list[int]:
    out = node.bed.node_exec(["tc", "-j", "filter", "show", "dev", dev, "egress"]).stdout
    ids = []
    for entry in json.loads(out or "[]"):
        prog = entry.get("options", {}).get("prog", {})
        if "id" in prog:
            ids.append(prog["id"])
    return ids


def stats(node: Node) -> dict:
    proc = node.bed.node_exec([sys.executable, "-m", "ipmasq_legacy.backends.ebpf", "stats"], env=node.env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# the module's bed and its `node` come from tests/conftest.py


# ---------------------------------------------------------------- (a) basics


@pytest.mark.traffic
@needs_ebpf
def test_pinned_maps_list_and_status(node):
    bed = node.bed
    node.apply({}, "ebpf", agent="")
    pins = set(os.listdir(node.bpffs / "ipmasq_legacy"))
    assert {"exempt4", "exempt6", "nat_fwd", "nat_rev", "cfg", "ctl", "prog_egress", "prog_ingress"} <= pins
    listed = node.ipmasq("list", check=True).stdout.splitlines()
    assert listed[0] == "IP PREFIX/ADDRESS" and "10.0.0.0/8" in listed and "fe80::/10" in listed
    assert bed.source_seen(bed.dest("public")) == bed.uplink_addr["eth0"][4]
    assert bed.source_seen(bed.dest("tke10")) == bed.pod_addr[4]  # 10.0.0.0/8 exempt
    assert bed.source_seen(bed.dest("public6"), proto="tcp") == bed.uplink_addr["eth0"][6]
    status = json.loads(node.ipmasq("status", "-o", "json", check=True).stdout)
    assert status["backend"] == "ebpf" and status["installed"]
    assert "ipmasq_legacy_ebpf" in node.bed.node_exec(["nft", "list", "tables"]).stdout
    node.ipmasq("flush", check=True)
    assert not (node.bpffs / "ipmasq_legacy").exists()
    assert "ipmasq_legacy" not in bed.node_exec(["tc", "filter", "show", "dev", "eth0", "egress"]).stdout
    assert "clsact" not in bed.node_exec(["tc", "qdisc", "show", "dev", "eth0"]).stdout
    assert "ipmasq_legacy" not in bed.node_exec(["nft", "list", "tables"]).stdout
    assert bed.source_seen(bed.dest("public")) == bed.pod_addr[4]


@pytest.mark.traffic
@needs_ebpf
def test_config_change_updates_maps_in_place(node):
    """No program reload, no NAT entry lost, an established connection unaffected."""
    bed = node.bed
    server = TcpEcho(bed, bed.dest("public"), 9410)
    try:
        node.apply({}, "ebpf")
        ids = tc_prog_ids(node, "eth0")
        conn = pod_socket(bed, 4, socket.SOCK_STREAM)
        conn.settimeout(5)
        conn.connect((bed.dest("public"), 9410))
        conn.sendall(b"before")
        assert conn.recv(100) == b"before"
        entries = stats(node)["nat_entries"]
        node.apply({"ipv4-native-routing-cidr": "198.20.0.0/16"}, "ebpf")
        assert tc_prog_ids(node, "eth0") == ids
        assert stats(node)["nat_entries"] >= entries
        conn.sendall(b"after")
        assert conn.recv(100) == b"after"  # established: keeps its translation
        assert server.peers[0][0] == bed.uplink_addr["eth0"][4]
        assert bed.source_seen(bed.dest("public")) == bed.pod_addr[4]  # new flows: exempt now
        conn.close()
    finally:
        server.close()


@pytest.mark.traffic
@needs_ebpf
def test_interfaces_that_come_and_go_follow_reconcile(node):
    cfg = {"egress-masquerade-interfaces": "eth+"}
    node.apply(cfg, "ebpf")
    assert tc_prog_ids(node, "eth0") and tc_prog_ids(node, "eth1") and not tc_prog_ids(node, "ens3")
    node.sh("ip link add eth7 type veth peer name x-eth7 && ip link set eth7 up && ip addr add 172.27.0.1/24 dev eth7")
    try:
        path = node.write_config(cfg)
        assert "eth7" in node.ipmasq("status", "--config", path, check=True).stdout
        assert "drifted" in node.ipmasq("status", "--config", path, check=True).stdout
        repaired = node.ipmasq("reconcile", "--config", path, check=True)
        assert "eth7" in repaired.stderr
        assert tc_prog_ids(node, "eth7")
        assert "State: in sync" in node.ipmasq("status", "--config", path, check=True).stdout
    finally:
        node.sh("ip link del eth7")
    node.ipmasq("reconcile", "--config", path, check=True)
    assert "State: in sync" in node.ipmasq("status", "--config", path, check=True).stdout
    quiet = node.ipmasq("reconcile", "--config", path, check=True)
    assert quiet.stdout == "" and quiet.stderr == ""


@pytest.mark.traffic
@needs_ebpf
def test_node_own_traffic_is_never_translated(node):
    """Only forwarded packets are translated: a socket of the node itself bound to the
    pod-facing address leaves as it is (netfilter's MASQUERADE would rewrite it)."""
    bed = node.bed
    reporter = UdpReporter(bed, bed.dest("public"), 9420)
    try:
        node.apply({}, "ebpf")
        code = ("import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('10.244.1.1', 0)); "
                "s.settimeout(3); s.sendto(b'node', ('198.20.0.10', 9420)); print(s.recv(200).decode())")
        out = bed.node_exec([sys.executable, "-c", code]).stdout.split()
        assert out[:2] == ["node", "10.244.1.1"]
    finally:
        reporter.close()


# ---------------------------------------------------------------- (b) reconcile's quick path

QUICK = "unchanged since the last verified reconcile"


def quiet_reconcile(node: Node, path: str) -> subprocess.CompletedProcess:
    return node.ipmasq("reconcile", "--config", path, "--log-level", "debug", check=True)


def bpftool_json(node: Node, *args: str):
    return json.loads(node.sh("bpftool -j " + " ".join(args)))


def live_gen(node: Node) -> int:
    value = bpftool_json(node, "map lookup pinned", str(node.bpffs / "ipmasq_legacy" / "ctl"), "key 0 0 0 0")["value"]
    return int(value[0], 16) & 1


def hexbytes(raw: bytes) -> str:
    return " ".join(f"{b:02x}" for b in raw)


def in_node_python(node: Node, code: str) -> str:
    proc = node.bed.node_exec([sys.executable, "-c", code], env=node.env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _detach(node, pins, gen):
    node.sh("tc filter del dev eth0 egress pref 49152")


def _exempt_entry_removed(node, pins, gen):
    """10.0.0.0/8 gone from the live generation: 10.0.5.10 would be masqueraded."""
    node.sh(f"bpftool map delete pinned {pins}/exempt4 key hex {hexbytes(ebpf.lpm_key(4, gen, '10.0.0.0/8'))}")
    assert node.bed.source_seen(node.bed.dest("tke10")) == node.bed.uplink_addr["eth0"][4]


def _exempt_entry_added(node, pins, gen):
    """With the loader, an entry that exempts the public destination."""
    in_node_python(node, "from ipmasq_legacy.backends import ebpf\n"
                         "with ebpf.Pinned(None) as p:\n"
                         f"    p.update('ipmq_exempt4', ebpf.lpm_key(4, {gen}, '198.20.0.0/16'), b'\\x01')\n")
    assert node.bed.source_seen(node.bed.dest("public")) == node.bed.pod_addr[4]


def _config_changed(node, pins, gen):
    key = f"key hex {gen:02x} 00 00 00"
    value = [int(b, 16) for b in bpftool_json(node, "map lookup pinned", f"{pins}/cfg", key)["value"]]
    value[0] ^= ebpf.F_RANDOM
    node.sh(f"bpftool map update pinned {pins}/cfg {key} value hex {hexbytes(bytes(value))}")


def _map_replaced(node, pins, gen):
    """A new, empty map of the same shape pinned in the exempt trie's place: the
    programs still hold the old one."""
    size = ebpf.SHAPES["map_entries"]["ipmq_exempt4"]
    node.sh(f"rm {pins}/exempt4 && bpftool map create {pins}/exempt4 type lpm_trie key 9 value 1 "
            f"entries {size} name ipmq_exempt4 flags 1")


def _pin_removed(node, pins, gen):
    node.sh(f"rm {pins}/local4")


def _link_added(node, pins, gen):
    node.sh("ip link add eth7 type veth peer name x-eth7 && ip link set eth7 up && ip addr add 172.27.0.1/24 dev eth7")


CHANGES = {
    "program detached": (_detach, "eth0: egress not attached"),
    "exempt entry removed (bpftool)": (_exempt_entry_removed, "ipv4: exempt prefixes in map exempt4 differ"),
    "exempt entry added (loader)": (_exempt_entry_added, "ipv4: exempt prefixes in map exempt4 differ"),
    "config map changed": (_config_changed, "config differs"),
    "map replaced": (_map_replaced, "uses maps that are no longer pinned"),
    "pin removed": (_pin_removed, "map local4 missing"),
    "link added": (_link_added, "eth7: egress not attached"),
}


@pytest.mark.traffic
@needs_ebpf
@pytest.mark.parametrize("change", list(CHANGES))
def test_noop_reconcile_is_quick_until_something_of_ours_changes(node, change):
    """After a reconcile that verified everything, the next one trusts the unchanged
    fingerprint and reads nothing; each kind of change to what we own moves the
    fingerprint, so the reconcile after it reads everything and repairs."""
    bed = node.bed
    pins = node.bpffs / "ipmasq_legacy"
    path = node.write_config({}, agent="")
    node.ipmasq("apply", "--config", path, "--backend", "ebpf", check=True)
    assert QUICK not in quiet_reconcile(node, path).stderr  # the first one reads everything, then records
    assert QUICK in quiet_reconcile(node, path).stderr
    make, drift = CHANGES[change]
    try:
        make(node, pins, live_gen(node))
        repair = quiet_reconcile(node, path)
        assert QUICK not in repair.stderr and drift in repair.stderr, repair.stderr
        after = quiet_reconcile(node, path)  # a repair records nothing: this one reads all, finds nothing
        assert QUICK not in after.stderr and "drift" not in after.stderr, after.stderr
        assert QUICK in quiet_reconcile(node, path).stderr
        # repaired for the packets too
        assert tc_prog_ids(node, "eth0")
        assert bed.source_seen(bed.dest("public")) == bed.uplink_addr["eth0"][4]
        assert bed.source_seen(bed.dest("tke10")) == bed.pod_addr[4]
        if change == "map replaced":
            exempt4 = bpftool_json(node, "map show pinned", str(pins / "exempt4"))["id"]
            prog = bpftool_json(node, "prog show id", str(tc_prog_ids(node, "eth0")[0]))
            assert exempt4 in prog["map_ids"]
        if change == "link added":
            assert tc_prog_ids(node, "eth7")
    finally:
        if change == "link added":
            node.sh("ip link del eth7 2>/dev/null; true")


@pytest.mark.traffic
@needs_ebpf
def test_idle_generation_edits_need_no_repair(node):
    """What the datapath does not read (the idle generation) is no drift: an entry there
    moves the fingerprint (the tries are read whole), the full read finds nothing."""
    pins = node.bpffs / "ipmasq_legacy"
    path = node.write_config({}, agent="")
    node.ipmasq("apply", "--config", path, "--backend", "ebpf", check=True)
    quiet_reconcile(node, path)
    assert QUICK in quiet_reconcile(node, path).stderr
    idle = 1 - live_gen(node)
    node.sh(f"bpftool map update pinned {pins}/exempt4 key hex {hexbytes(ebpf.lpm_key(4, idle, '1.2.3.0/24'))} "
            "value hex 01")
    full = quiet_reconcile(node, path)
    assert QUICK not in full.stderr and "drift" not in full.stderr, full.stderr
    assert QUICK in quiet_reconcile(node, path).stderr


@pytest.mark.traffic
@needs_ebpf
def test_fingerprint_is_cheap_and_none_while_draining(node):
    """No pyroute2, no nft process; stable while nothing changes; None (a full read)
    while netfilter's connections drain, since their end is not in any of our objects."""
    wrapper_dir = node.dir / "bin"
    wrapper_dir.mkdir()
    calls = node.dir / "nft-calls"
    (wrapper_dir / "nft").write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\nexec /usr/sbin/nft \"$@\"\n")
    (wrapper_dir / "nft").chmod(0o755)
    node.apply({}, "ebpf", agent="")
    code = ("import json, sys; from ipmasq_legacy.backends import ebpf; b = ebpf.EbpfBackend(); "
            "print(json.dumps([b.fingerprint(), b.fingerprint(), 'pyroute2' in sys.modules]))")
    env = {**node.env, "PATH": f"{wrapper_dir}:{os.environ['PATH']}"}
    first, second, pyroute2 = json.loads(node.bed.node_exec([sys.executable, "-c", code], env=env).stdout)
    assert first and first.startswith("ebpf ") and first == second and not pyroute2
    assert not calls.exists() or calls.read_text() == ""
    node.sh(f"nft add table ip {ebpf.DRAIN_TABLE}")
    draining, _, _ = json.loads(node.bed.node_exec([sys.executable, "-c", code], env=env).stdout)
    assert draining is None
    node.sh(f"nft delete table ip {ebpf.DRAIN_TABLE}")


@pytest.mark.traffic
@needs_ebpf
def test_our_nft_tables_are_asked_by_name(node):
    """drain_tables_present / keeper_present ask nf_tables for those tables alone (one
    NFT_MSG_GETTABLE each) and agree with `nft list tables`; a reap with nothing of
    ours installed runs no nft and imports no pyroute2."""
    def ask(then: str = "None"):
        code = ("import json, sys; from ipmasq_legacy.backends import ebpf; "
                "print(json.dumps([sorted(ebpf._nft_tables()), ebpf.drain_tables_present(), ebpf.keeper_present(), "
                f"{then}, 'pyroute2' in sys.modules]))")
        return json.loads(in_node_python(node, code))

    def listed():
        words = [line.split() for line in node.sh("nft list tables").splitlines()]
        return sorted([w[1], w[2]] for w in words if len(w) == 3 and w[2].startswith("ipmasq_legacy"))

    assert ask(then="ebpf.EbpfBackend().reap()") == [[], [], False, [], False]
    node.sh("nft -f -", input=f"table inet {ebpf.KEEPER_TABLE} {{}}\ntable ip6 {ebpf.DRAIN_TABLE} {{}}\n"
                              f"table ip {ebpf.DRAIN_TABLE}x {{}}\ntable ip6 {ebpf.KEEPER_TABLE} {{}}\n"
                              "table ip other { set s { type ipv4_addr; flags interval; "
                              "elements = { 10.1.0.0/16, 10.3.0.0/16 }; }; }\n")
    try:
        tables, drain, keeper, _, _ = ask()
        assert tables == [t for t in listed() if tuple(t) in ebpf.DRAIN_TABLES + ebpf.KEEPER_TABLES]
        assert tables == [["inet", ebpf.KEEPER_TABLE], ["ip6", ebpf.DRAIN_TABLE]]
        assert drain == ["ip6"] and keeper
    finally:
        node.sh(f"nft delete table ip6 {ebpf.DRAIN_TABLE}; nft delete table inet {ebpf.KEEPER_TABLE}; "
                f"nft delete table ip {ebpf.DRAIN_TABLE}x; nft delete table ip6 {ebpf.KEEPER_TABLE}; "
                "nft delete table ip other")


# ---------------------------------------------------------------- (c) ports


@pytest.mark.traffic
@needs_ebpf
@pytest.mark.parametrize("family", [4, 6])
def test_source_port_kept_when_free_else_allocated(node, family):
    bed = node.bed
    dest = bed.dest("public" if family == 4 else "public6")
    reporter = UdpReporter(bed, dest, 9430)
    socks = []
    try:
        node.apply({}, "ebpf")
        lo, hi = (int(x) for x in bed.node_sysctl("net.ipv4.ip_local_port_range").split())
        seen = []
        for port in (20431, 40431):  # inside the translated ranges / inside the node's ephemeral range
            s = pod_socket(bed, family, port=port)
            socks.append(s)
            s.settimeout(3)
            s.sendto(b"p%d" % port, (dest, 9430))
            words = s.recv(200).split()
            seen.append((words[1].decode(), int(words[2])))
        assert seen[0] == (bed.uplink_addr["eth0"][family], 20431)  # kept
        assert seen[1][0] == bed.uplink_addr["eth0"][family]
        assert not lo <= seen[1][1] <= hi and seen[1][1] >= 1024  # never where the node's own ports are
    finally:
        for s in socks:
            s.close()
        reporter.close()


@pytest.mark.traffic
@needs_ebpf
def test_port_exhaustion_is_counted_not_corrupting(node):
    bed = node.bed
    reporter = UdpReporter(bed, bed.dest("public"), 9440)
    socks = []
    try:
        node.apply({"masquerade-to-ports": "20100-20109"}, "ebpf")
        for i in range(30):
            s = pod_socket(bed, 4, port=30100 + i)
            s.setblocking(False)
            socks.append(s)
            s.sendto(b"flow%02d" % i, (bed.dest("public"), 9440))
        time.sleep(0.5)
        answered = {}
        for s in socks:
            try:
                answered[s.getsockname()[1]] = s.recv(200).split()
            except BlockingIOError:
                pass
        assert len(answered) == 10
        ports = sorted(int(words[2]) for words in answered.values())
        assert ports == list(range(20100, 20110))
        assert all(words[1].decode() == bed.uplink_addr["eth0"][4] for words in answered.values())
        # outside saw exactly those ten, intact, and never the pod's address
        assert sorted((a, p) for _, a, p in reporter.seen) == [(bed.uplink_addr["eth0"][4], p) for p in ports]
        assert all(data.startswith(b"flow") and len(data) == 6 for data, _, _ in reporter.seen)
        counters = stats(node)
        assert counters["exhausted"] >= 20 and counters["new_flows"] >= 10
        # the flows that got a port keep working
        for s in socks:
            if s.getsockname()[1] in answered:
                s.sendto(b"again", (bed.dest("public"), 9440))
        time.sleep(0.3)
        again = sum(1 for s in socks if s.getsockname()[1] in answered and s.recv(200).startswith(b"again"))
        assert again == 10
    finally:
        for s in socks:
            s.close()
        reporter.close()


# ---------------------------------------------------------------- (e) ICMP errors


@pytest.mark.traffic
@needs_ebpf
@pytest.mark.parametrize("family", [4, 6])
def test_icmp_errors_about_translated_flows_are_translated(node, family):
    bed = node.bed
    dest = bed.dest("public" if family == 4 else "public6")
    node.apply({}, "ebpf")
    before = stats(node)["icmp_errors"]
    # inbound: outside answers a translated datagram with "port unreachable"; the pod's
    # socket must get it (outer destination and the quoted source both translated back)
    s = pod_socket(bed, family)
    s.settimeout(3)
    s.connect((dest, 9449))  # nobody listens
    s.send(b"anyone?")
    with pytest.raises(ConnectionRefusedError):
        s.recv(100)
    s.close()
    # outbound: the pod answers for a closed socket; outside must match it to its flow
    reporter_sock = bed.in_netns(bed.ext, socket.socket, socket.AF_INET if family == 4 else socket.AF_INET6,
                                 socket.SOCK_DGRAM)
    try:
        reporter_sock.bind((dest, 9450))
        reporter_sock.settimeout(3)
        p = pod_socket(bed, family)
        p.sendto(b"hello", (dest, 9450))
        _, peer = reporter_sock.recvfrom(100)
        assert peer[0] == bed.uplink_addr["eth0"][family]
        p.close()
        reporter_sock.connect(peer[:2])
        reporter_sock.send(b"still there?")
        with pytest.raises(ConnectionRefusedError):
            reporter_sock.recv(100)
    finally:
        reporter_sock.close()
    assert stats(node)["icmp_errors"] >= before + 2


# ---------------------------------------------------------------- (d) live switching


class LiveTcp:
    """One TCP connection from the pod, echoing a message every few milliseconds."""

    def __init__(self, bed: TestBed, address: str, port: int):
        self.sock = pod_socket(bed, 6 if ":" in address else 4, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect((address, port))
        self.echoed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        n = 0
        while not self._stop.is_set():
            msg = b"message %08d;" % n
            try:
                self.sock.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = self.sock.recv(len(msg) - len(got))
                    if not chunk:
                        raise ConnectionError("closed")
                    got += chunk
                if got != msg:
                    raise ValueError(f"echo {got!r} for {msg!r}")
                self.echoed += 1
            except (OSError, ValueError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                return
            n += 1
            self._stop.wait(0.005)

    def wait_echoes(self, more: int, timeout: float = 5.0) -> None:
        target = self.echoed + more
        deadline = time.monotonic() + timeout
        while self.echoed < target and not self.errors and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class NewFlows:
    """New UDP flows (IPv4 and IPv6) from the pod until stopped; what outside saw."""

    def __init__(self, bed: TestBed):
        self.bed = bed
        self.seen: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        flip = 0
        while not self._stop.is_set():
            family = 4 if flip % 2 == 0 else 6
            flip += 1
            try:
                seen = self.bed.source_seen(self.bed.dest("public" if family == 4 else "public6"), timeout=1.0)
            except Exception as exc:  # a lost reply counts as lost
                seen = f"lost: {exc}"
            self.seen.append((family, str(seen)))
            self._stop.wait(0.003)  # paced: the bed's probe ports must not wrap around

    def __enter__(self):
        self._thread.start()
        while len(self.seen) < 10:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        count = len(self.seen)
        while len(self.seen) < count + 10:
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(5)

    def leaked(self) -> list:
        """Flows that left with the pod's own address."""
        return [(f, s) for f, s in self.seen if s == self.bed.pod_addr[f] or f"with source {self.bed.pod_addr[f]}," in s]

    def lost(self) -> list:
        want = {4: self.bed.uplink_addr["eth0"][4], 6: self.bed.uplink_addr["eth0"][6]}
        return [(f, s) for f, s in self.seen if s != want[f] and (f, s) not in self.leaked()]


@pytest.mark.traffic
@needs_ebpf
@pytest.mark.parametrize("old, new", [("nftables", "ebpf"), ("ebpf", "nftables"), ("iptables-nft", "ebpf"),
                                      ("ebpf", "iptables-legacy")])
def test_switch_keeps_established_tcp_and_never_leaks(node, old, new):
    bed = node.bed
    server = TcpEcho(bed, bed.dest("public"), 9460)
    server6 = TcpEcho(bed, bed.dest("public6"), 9460)
    conns = []
    # Earlier tests' flows live on in conntrack (and keep their decision, exempt or
    # not, for 30 s): start from an empty table so that every probe here is new.
    node.sh("conntrack -F 2>/dev/null; conntrack -F -f ipv6 2>/dev/null; true")
    try:
        node.apply({}, old)
        conns = [LiveTcp(bed, bed.dest("public"), 9460), LiveTcp(bed, bed.dest("public6"), 9460)]
        for c in conns:
            c.wait_echoes(20)
        with NewFlows(bed) as flows:
            proc = node.apply({}, new)
        assert f"removed {old}" in proc.stdout
        for c in conns:
            c.wait_echoes(50)
        assert not flows.leaked(), f"flows left untranslated during the switch: {flows.leaked()[:5]}"
        # Creating a clsact qdisc makes the kernel reset the device's queues
        # (qdisc_graft -> dev_deactivate): what is in flight on that link at that instant
        # is dropped, once per link, the first time ebpf attaches to it. Nothing else may
        # be lost, and nothing at all when leaving ebpf (no qdisc changes then).
        allowed = 4 if new == "ebpf" else 0
        assert len(flows.lost()) <= allowed, f"flows lost during the switch: {flows.lost()[:5]}"
        for c in conns:
            assert not c.errors, c.errors
            assert c.echoed >= 70
        # the connections kept the address they started with
        assert server.peers[0][0] == bed.uplink_addr["eth0"][4]
        assert server6.peers[0][0] == bed.uplink_addr["eth0"][6]
        status = json.loads(node.ipmasq("status", "-o", "json", check=True).stdout)
        assert status["backend"] == new and status["in_sync"]
        if old == "ebpf":
            # still translating its own connections (drain), none of the new ones
            assert tc_prog_ids(node, "eth0")
            assert "ebpf (ipv4 (draining" in proc.stdout
            reap = [sys.executable, "-m", "ipmasq_legacy.backends.ebpf", "reap"]
            assert bed.node_exec(reap, env=node.env).stdout.strip() == ""  # still in use
        else:
            assert "ipmasq_legacy_drain" in bed.node_exec(["nft", "list", "tables"]).stdout
    finally:
        for c in conns:
            c.close()
        server.close()
        server6.close()
    if old == "ebpf":
        # once its connections are over, the drained datapath goes
        reaped = bed.node_exec(reap, env={**node.env, "IPMASQ_BPF_DRAIN_IDLE": "0"})
        assert "drained datapath removed" in reaped.stdout, reaped.stderr
        assert not tc_prog_ids(node, "eth0") and not (node.bpffs / "ipmasq_legacy").exists()
        status = json.loads(node.ipmasq("status", "-o", "json", check=True).stdout)
        assert status["backend"] == new and status["in_sync"]
        assert bed.source_seen(bed.dest("public")) == bed.uplink_addr["eth0"][4]
    # flush removes whatever is left
    node.ipmasq("flush", check=True)
    assert not tc_prog_ids(node, "eth0")
    assert "ipmasq_legacy" not in bed.node_exec(["nft", "list", "tables"]).stdout


# ---------------------------------------------------------------- (f) load


@pytest.mark.traffic
@needs_ebpf
def test_100mb_tcp_transfer_arrives_intact(node):
    """Through the translation, with veth's checksum offload on (TCP segments leave the
    pod CHECKSUM_PARTIAL and are rewritten before the checksum is computed)."""
    bed = node.bed
    offload = bed.pod_exec(["ethtool", "-k", "eth0"]).stdout if shutil.which("ethtool") else ""
    if offload:
        assert "tx-checksumming: on" in offload  # the pod's packets leave CHECKSUM_PARTIAL
    server = TcpEcho(bed, bed.dest("public"), 9470, sink=True)
    try:
        node.apply({}, "ebpf")
        rng = random.Random(7)
        block = rng.randbytes(1 << 20)
        digest = hashlib.sha256()
        conn = pod_socket(bed, 4, socket.SOCK_STREAM)
        conn.settimeout(30)
        conn.connect((bed.dest("public"), 9470))
        started = time.monotonic()
        for i in range(100):
            chunk = block[i:] + block[:i]  # every MiB different
            digest.update(chunk)
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)
        answer = conn.recv(100).decode()
        elapsed = time.monotonic() - started
        conn.close()
        assert server.digests == [(100 << 20, digest.hexdigest())]
        assert answer == digest.hexdigest()
        assert server.peers == [(bed.uplink_addr["eth0"][4], server.peers[0][1])]
        print(f"100 MiB in {elapsed:.2f}s ({838.9 / elapsed:.0f} Mbit/s)")
    finally:
        server.close()


@pytest.fixture(scope="module")
def bed4():
    if os.geteuid() != 0:
        pytest.skip("needs root to build network namespaces")
    with TestBed(ipv6=False, pods=4) as bed:
        yield bed


@pytest.mark.traffic
@needs_ebpf
def test_ten_thousand_concurrent_udp_flows(bed4):
    """2,500 sockets in each of 4 pods, on the same source ports (so most collide and get
    another port): every flow gets its own mapping and its own reply."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 12000:
        if hard != resource.RLIM_INFINITY and hard < 12000:
            pytest.skip(f"needs 12000 open files (hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (12000, hard))
    bed = bed4
    node = Node(bed)
    reporter = UdpReporter(bed, bed.dest("public"), 9480)
    socks: dict[tuple[int, int], socket.socket] = {}
    try:
        node.apply({}, "ebpf")
        for pod in range(4):
            for port in range(21000, 23500):
                s = pod_socket(bed, 4, pod=pod, port=port)
                s.setblocking(False)
                socks[(pod, port)] = s
        replies: dict[tuple[int, int], tuple[str, int]] = {}
        sel = selectors.DefaultSelector()
        for key, s in socks.items():
            sel.register(s, selectors.EVENT_READ, key)
        pending = list(socks)
        for _attempt in range(4):
            for i in range(0, len(pending), 500):
                for key in pending[i:i + 500]:
                    socks[key].sendto(b"%d:%d" % key, (bed.dest("public"), 9480))
                deadline = time.monotonic() + 0.3
                while time.monotonic() < deadline:
                    for k, _ in sel.select(0.05):
                        try:
                            words = k.fileobj.recv(200).split()
                        except BlockingIOError:
                            continue
                        assert words[0] == b"%d:%d" % k.data, (words, k.data)  # its own reply
                        replies[k.data] = (words[1].decode(), int(words[2]))
            pending = [key for key in socks if key not in replies]
            if not pending:
                break
        assert not pending, f"{len(pending)} flows got no reply"
        mappings = set(replies.values())
        assert len(mappings) == 10000
        assert {a for a, _ in mappings} == {bed.uplink_addr["eth0"][4]}
        kept = sum(1 for (pod, port), (_, nport) in replies.items() if port == nport)
        assert kept >= 2500  # the first of each colliding port keeps it
        counters = stats(node)
        assert counters["new_flows"] >= 10000 and counters["exhausted"] == 0
        sel.close()
    finally:
        for s in socks.values():
            s.close()
        reporter.close()
        node.ipmasq("flush")
        node.close()
