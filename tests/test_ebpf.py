"""The ebpf backend: source NAT in BPF on tc, proven with packets in private namespaces.

The decision itself (every config case, both families) is proven by the equivalence
suite in test_traffic.py, which runs ebpf beside the netfilter backends. Here: what is
particular to BPF (pinned maps, in-place config changes, interfaces that come and go,
port allocation and exhaustion, ICMP errors, checksums under offload, live switching
to and from netfilter) and the load tests of the issue (100 MB through the
translation, 10,000 concurrent UDP flows).

Each node gets a private bpffs (tests/testbed/node.py); nothing is attached outside the
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
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from ipmasq_legacy import backends
from ipmasq_legacy.backends import ebpf
from ipmasq_legacy.bpf import loader
from ipmasq_legacy.plan import FamilyPlan, Plan

from .nodeutil import UdpReporter
from .testbed import Node, TestBed

REASON = backends.get("ebpf").unavailable_reason()
needs_ebpf = pytest.mark.skipif(REASON is not None, reason=f"ebpf backend cannot run here: {REASON}")


# ---------------------------------------------------------------- without packets


@pytest.mark.skipif(not ebpf.object_path().exists(), reason="masq.o not built (bash scripts/setup)")
def test_object_maps_match_the_loader():
    obj = loader.read_object(str(ebpf.object_path()))
    assert set(obj.progs) == {"ipmq_egress", "ipmq_ingress", "ipmq_nf", "ipmq_guard"}
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


@pytest.mark.skipif(os.geteuid() != 0, reason="apply needs root before it looks for the object")
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


def test_trie_diff_compares_only_what_differs():
    rng = random.Random(7)
    universe = [bytes([a, b, c]) for a in range(3) for b in range(4) for c in range(3)]
    for _ in range(2000):
        want = rng.sample(universe, rng.randint(0, 20))
        have = sorted(set(want) ^ set(rng.sample(universe, rng.randint(0, 4)))) if rng.random() < 0.7 \
            else rng.sample(universe, rng.randint(0, 20))
        for w, h in ((want, have), (sorted(want), sorted(have))):  # in order or not: the right answer
            missing, extra = ebpf.trie_diff(w, b"".join(h), 3)
            assert sorted(missing) == sorted(set(w) - set(h)) and sorted(extra) == sorted(set(h) - set(w))
    prefixes = [f"11.{i // 256}.{i % 256}.0/24" for i in range(50000)]
    keys = ebpf.lpm_key_list(4, 1, prefixes)
    assert keys[:2] == [ebpf.lpm_key(4, 1, p) for p in prefixes[:2]]
    assert ebpf.trie_diff(keys, b"".join(keys), 9) == ([], [])
    added = ebpf.lpm_key(4, 1, "11.250.0.0/24")
    missing, extra = ebpf.trie_diff(keys[:30000] + [added] + keys[30000:], b"".join(keys[:99] + keys[100:]), 9)
    assert (sorted(missing), extra) == (sorted([keys[99], added]), [])


@needs_ebpf
def test_lpm_run_reads_one_generation_of_a_trie():
    """Pinned.generation's reader, on a trie of both generations and of keys a hand may
    write (another generation byte, prefixes shorter than it): with or without a seek
    key (held or not), with or without a size, it returns what a read of the whole
    trie filtered says, and only the keys shorter than a byte are left to lpm_covering."""
    sysobj = loader.Sys()
    fd = sysobj.map_create(loader.MAP_LPM_TRIE, 9, 1, 1 << 20, 1, "ipmq_test")
    try:
        rng = random.Random(3)
        gen0 = sorted({f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.0/24" for _ in range(30000)},
                      key=lambda p: socket.inet_aton(p.split("/")[0]))
        gen1 = gen0[:20000] + [f"{rng.randrange(1, 224)}.{rng.randrange(256)}.0.0/16" for _ in range(5000)]
        for gen, prefixes in ((0, gen0), (1, gen1)):
            keys = ebpf.lpm_key_list(4, gen, prefixes)
            sysobj.update_many(fd, keys, [b"\x01"] * len(keys))
        sysobj.update(fd, struct.pack("=IB4s", 32, 2, socket.inet_aton("1.2.3.0")), b"\x01")  # generation 2
        sysobj.update(fd, struct.pack("=I", 20) + bytes(5), b"\x05")  # a /20 of generation 0
        whole = sysobj.all_keys(fd, 9, 1, 1 << 20)

        def expected(first):
            return sorted(k for k in whole if loader.lpm_rank(k, first) == 0)

        seeks = ([], [ebpf.lpm_key(4, 0, gen0[-1])], [ebpf.lpm_key(4, 0, "223.255.255.0/24"), ebpf.lpm_key(4, 0, gen0[5])])
        for first in (0, 1, 2, 3):
            for seek in seeks:
                for expect in (None, 0, 100, 25000):
                    raw, values = sysobj.lpm_run(fd, 9, 1, first, seek, expect)
                    got = sorted(raw[i:i + 9] for i in range(0, len(raw), 9))
                    assert got == expected(first), (first, seek, expect)
                    assert len(values) == len(got) and values.count(b"\x05") == (first == 0)
        if loader.trie_next_key_exact(sysobj):  # (kernels with the trie_get_next_key bug: lpm_run skips seeks)
            assert sysobj.lpm_start(fd, 9, 1, seeks[2]) == seeks[2][1]  # the first it holds
        assert sysobj.lpm_covering(fd, 9, 1, 1) == (None, [])
        sysobj.update(fd, struct.pack("=I", 6) + bytes(5), b"\x03")  # 0.0.0.0/6: generations 0 to 3
        value, candidates = sysobj.lpm_covering(fd, 9, 1, 1)
        assert value == b"\x03" and struct.pack("=I", 6) + bytes(5) in candidates
        assert len(sysobj.lpm_run(fd, 9, 1, 1, seeks[1], 25000)[0]) == 9 * len(expected(1))
    finally:
        os.close(fd)


# ---------------------------------------------------------------- helpers for traffic



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


def _short_prefix_added(node, pins, gen):
    """A prefix of length 0 (0.0.0.0/0 without the generation byte, as a hand that forgot
    it would write): outside both generations, it matches their every lookup, so every
    destination is exempt."""
    node.sh(f"bpftool map update pinned {pins}/exempt4 key hex 00 00 00 00 {gen:02x} 00 00 00 00 value hex 01")
    assert node.bed.source_seen(node.bed.dest("public")) == node.bed.pod_addr[4]


CHANGES = {
    "program detached": (_detach, "eth0: egress not attached"),
    "exempt entry removed (bpftool)": (_exempt_entry_removed, "ipv4: exempt prefixes in map exempt4 differ"),
    "exempt entry added (loader)": (_exempt_entry_added, "ipv4: exempt prefixes in map exempt4 differ"),
    "config map changed": (_config_changed, "config differs"),
    "map replaced": (_map_replaced, "uses maps that are no longer pinned"),
    "pin removed": (_pin_removed, "map local4 missing"),
    "link added": (_link_added, "eth7: egress not attached"),
    "short prefix added (bpftool)": (_short_prefix_added, "ipv4: exempt prefixes in map exempt4 differ"),
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
    """What the datapath does not read (the idle generation) is no drift: the full check
    and the fingerprint read the live generation alone, so an entry there neither moves
    the fingerprint nor shows in the full read. The next change reads the idle
    generation back before it writes there (test_stale_idle_generation_is_rewritten)."""
    pins = node.bpffs / "ipmasq_legacy"
    path = node.write_config({}, agent="")
    node.ipmasq("apply", "--config", path, "--backend", "ebpf", check=True)
    quiet_reconcile(node, path)
    assert QUICK in quiet_reconcile(node, path).stderr
    idle = 1 - live_gen(node)
    node.sh(f"bpftool map update pinned {pins}/exempt4 key hex {hexbytes(ebpf.lpm_key(4, idle, '1.2.3.0/24'))} "
            "value hex 01")
    assert QUICK in quiet_reconcile(node, path).stderr
    assert "State: in sync" in node.ipmasq("status", "--config", path, check=True).stdout


# ---------------------------------------------------------------- (b2) a change writes what differs

# The tries as the kernel holds them, read with the plain batch lookup of every entry
# (Pinned.items, not the backend's reader of one generation), grouped by generation
# ("short": prefixes shorter than the generation byte); with config paths, whether the
# live generation is exactly what each plan wants ("exact", "cfg": its cfg names that
# plan's tries), and whether the idle one is ("idle").
GENERATIONS = """
import hashlib, json, sys
from ipmasq_legacy import config, plan
from ipmasq_legacy.backends import ebpf
out = {"tries": {}, "plans": {}}
with ebpf.Pinned(None) as p:
    out["gen"] = gen = p.gen()
    cfg = p.cfg(gen)
    for name in ebpf.TRIE_FAMILY:
        by_gen = {}
        for key, value in p.items(name):
            plen = int.from_bytes(key[:4], sys.byteorder)
            by_gen.setdefault(str(key[4]) if plen >= 8 else "short", {})[key.hex()] = value.hex()
        out["tries"][name] = by_gen
    out["ports"] = [hashlib.sha256(p.sys.array_values(p.fd(n), g * ebpf.PORTS, ebpf.PORTS, 4)).hexdigest()
                    for n in ("ipmq_ports", "ipmq_portidx") for g in (0, 1)]
for path in sys.argv[1:]:
    families = ebpf.EbpfBackend().wanted_families(plan.build(config.load(path)))
    def exact(g):
        want = {ebpf.TRIES[kind][f]: {k.hex() for k in ebpf.lpm_keys(f, g, getattr(fp, kind) if fp else ())}
                for f, fp in families.items() for kind in ("exempt", "sources")}
        held = {name: out["tries"][name].get(str(g), {}) for name in want}
        return (all(set(held[n]) == want[n] and set(held[n].values()) <= {"01"} for n in want)
                and not any("short" in out["tries"][n] for n in want)), len(want["ipmq_exempt4"])
    (live, count), (idle, _) = exact(gen), exact(1 - gen)
    out["plans"][path] = {"exact": live, "cfg": ebpf.CFG.unpack(cfg)[4] == ebpf.tries_digest(families),
                          "exempt4": count, "idle": idle}
print(json.dumps(out))
"""

# `ipmasq apply` run in this process, counting what it writes to the tries (keys
# inserted or rewritten, keys deleted) and to the port tables (entries)
COUNTED_APPLY = """
import json, sys
from ipmasq_legacy.bpf import loader
from ipmasq_legacy import cli
writes = {"trie_put": 0, "trie_deleted": 0, "trie_single": 0, "ports": 0}
TRIE_KEY_SIZES = (9, 21)
inside = [0]  # a kernel without batch ops (LPM tries before 5.12): update_many writes one by one
def counted(fn, what):
    def wrapper(self, fd, keys, *rest):
        if keys and len(keys[0]) in TRIE_KEY_SIZES:
            writes[what] += len(keys)
        inside[0] += 1
        try:
            return fn(self, fd, keys, *rest)
        finally:
            inside[0] -= 1
    return wrapper
def single(fn):
    def wrapper(self, fd, key, *rest):
        writes["trie_single"] += len(key) in TRIE_KEY_SIZES and not inside[0]
        return fn(self, fd, key, *rest)
    return wrapper
def ports(fn):
    def wrapper(self, fd, first, values):
        writes["ports"] += len(values)
        return fn(self, fd, first, values)
    return wrapper
loader.Sys.update_many = counted(loader.Sys.update_many, "trie_put")
loader.Sys.delete_many = counted(loader.Sys.delete_many, "trie_deleted")
loader.Sys.update, loader.Sys.delete = single(loader.Sys.update), single(loader.Sys.delete)
loader.Sys.update_batch_u32 = ports(loader.Sys.update_batch_u32)
sys.argv = ["ipmasq", "apply", "--config", sys.argv[1], "--backend", "ebpf"]
try:
    cli.main()
except SystemExit as exc:
    writes["exit"] = exc.code
writes["pyroute2"] = "pyroute2" in sys.modules
print(json.dumps(writes))
"""


def generations(node: Node, *paths: str) -> dict:
    proc = node.bed.node_exec([sys.executable, "-c", GENERATIONS, *paths], env=node.env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def counted_apply(node: Node, path: str) -> dict:
    proc = node.bed.node_exec([sys.executable, "-c", COUNTED_APPLY, path], env=node.env)
    assert proc.returncode == 0, proc.stderr
    writes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert writes.get("exit") in (None, 0), proc.stderr
    return writes


# 100.64.0.0/10 (the bed's cgnat destination) exempt in A only, 198.20.0.0/24 (its
# public destination) in B only; 10.0.0.0/8 and 192.0.2.0/24 in both, and multicast (224.0.0.0/4) always
AGENT_A = "nonMasqueradeCIDRs: [10.0.0.0/8, 100.64.0.0/10, 192.0.2.0/24]\nmasqLinkLocal: true\n"
AGENT_B = "nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24, 198.20.0.0/24]\nmasqLinkLocal: true\n"


def assert_traffic(bed: TestBed, exempt: set[str]) -> None:
    for dest in ("public", "cgnat", "tke10"):
        want = bed.pod_addr[4] if dest in exempt else bed.uplink_addr["eth0"][4]
        assert bed.source_seen(bed.dest(dest)) == want, dest


@pytest.mark.traffic
@needs_ebpf
def test_a_change_writes_only_what_differs(node):
    """After the first install both generations hold the config; a change that adds one
    prefix and removes one writes those two keys in the idle generation (no port table
    entry, no pyroute2), flips, and leaves the old generation as it was: the new live
    generation is exactly the plan, and going back writes nothing to the tries."""
    bed = node.bed
    path_a = node.write_config({}, agent=AGENT_A, name="a.yaml")
    path_b = node.write_config({}, agent=AGENT_B, name="b.yaml")
    node.ipmasq("apply", "--config", path_a, "--backend", "ebpf", check=True)
    state = generations(node, path_a)
    assert state["plans"][path_a] == {"exact": True, "cfg": True, "exempt4": 4, "idle": True}  # both generations
    exempt4 = state["tries"]["ipmq_exempt4"]
    assert_traffic(bed, {"cgnat", "tke10"})

    writes = counted_apply(node, path_b)
    assert (writes["trie_put"], writes["trie_deleted"], writes["trie_single"], writes["ports"]) == (1, 1, 0, 0), writes
    assert not writes["pyroute2"]
    after = generations(node, path_b, path_a)
    assert after["gen"] != state["gen"]
    assert after["plans"][path_b] == {"exact": True, "cfg": True, "exempt4": 4, "idle": False}
    assert after["plans"][path_a]["idle"]
    assert after["tries"]["ipmq_exempt4"][str(state["gen"])] == exempt4[str(state["gen"])]  # the old one, untouched
    assert "State: in sync" in node.ipmasq("status", "--config", path_b, check=True).stdout
    assert_traffic(bed, {"public", "tke10"})

    back = counted_apply(node, path_a)  # the idle generation holds A already
    assert (back["trie_put"], back["trie_deleted"], back["ports"]) == (0, 0, 0), back
    assert generations(node, path_a)["plans"][path_a]["exact"]
    assert_traffic(bed, {"cgnat", "tke10"})


@pytest.mark.traffic
@needs_ebpf
def test_stale_idle_generation_is_rewritten(node):
    """Whatever the idle generation holds (entries written by hand with bpftool or the
    loader, some deleted, another value, a killed apply's half of the next config, port
    table entries and a cfg of its own) is read back by the next change: the new live
    generation is exactly the plan, and traffic follows it. The live generation is never
    written: those edits change nothing before the flip."""
    bed = node.bed
    pins = node.bpffs / "ipmasq_legacy"
    path_a = node.write_config({}, agent=AGENT_A, name="a.yaml")
    path_b = node.write_config({}, agent=AGENT_B, name="b.yaml")
    node.ipmasq("apply", "--config", path_a, "--backend", "ebpf", check=True)
    idle = 1 - live_gen(node)
    node.sh(f"bpftool map update pinned {pins}/exempt4 key hex {hexbytes(ebpf.lpm_key(4, idle, '203.0.113.0/24'))} "
            f"value hex 01 && bpftool map delete pinned {pins}/exempt4 key hex "
            f"{hexbytes(ebpf.lpm_key(4, idle, '10.0.0.0/8'))}")
    in_node_python(node, "import struct\nfrom ipmasq_legacy.backends import ebpf\n"
                         "with ebpf.Pinned(None) as p:\n"
                         f"    p.update('ipmq_exempt4', ebpf.lpm_key(4, {idle}, '192.0.2.0/24'), b'\\x07')\n"
                         f"    p.update('ipmq_exempt4', ebpf.lpm_key(4, {idle}, '198.20.0.0/24'), b'\\x01')\n"
                         f"    p.update('ipmq_src4', ebpf.lpm_key(4, {idle}, '10.99.0.0/16'), b'\\x01')\n"
                         f"    p.update('ipmq_ports', struct.pack('=I', {idle} * ebpf.PORTS + 3), struct.pack('=I', 7))\n"
                         f"    p.update('ipmq_portidx', struct.pack('=I', {idle} * ebpf.PORTS + 80), "
                         "struct.pack('=I', 9))\n"
                         f"    p.update('ipmq_cfg', struct.pack('=I', {idle}), bytes(ebpf.CFG.size))\n")
    stale = generations(node, path_a)
    assert stale["plans"][path_a]["exact"]  # the live generation: untouched
    assert len(stale["tries"]["ipmq_exempt4"][str(idle)]) == 5  # A's three, multicast, the hand's one
    assert_traffic(bed, {"cgnat", "tke10"})

    writes = counted_apply(node, path_b)
    # 10.0.0.0/8 back, 192.0.2.0/24's value, the port entries; 100.64.0.0/10,
    # 203.0.113.0/24 and 10.99.0.0/16 gone
    assert (writes["trie_put"], writes["trie_deleted"], writes["ports"]) == (2, 3, 2), writes
    after = generations(node, path_b)
    assert after["gen"] == idle and after["plans"][path_b] == {"exact": True, "cfg": True, "exempt4": 4, "idle": False}
    assert after["ports"][idle::2] == stale["ports"][1 - idle::2]  # the port tables of the plan
    assert "State: in sync" in node.ipmasq("status", "--config", path_b, check=True).stdout
    assert_traffic(bed, {"public", "tke10"})


def _prefixes(first_octet: int, count: int) -> list[str]:
    """Every other /24 of a /8 (none adjacent: the plan merges nothing)."""
    return [f"{first_octet}.{i // 128}.{i % 128 * 2}.0/24" for i in range(count)]


# `ipmasq apply` run in this process, killed (SIGKILL, by itself) right after its n-th
# write to a map (a batch or a single element): every point between two writes
KILLED_APPLY = """
import os, signal, sys, threading
from ipmasq_legacy.bpf import loader
from ipmasq_legacy import cli
path, kill_after = sys.argv[1], int(sys.argv[2])
done, depth, main = [0], [0], threading.get_ident()
# every write of the main thread (the reading threads' only write is the kernel probe's,
# into a map of its own: counting it, racing, shifted the kill points from run to run)
# but the flow maps' (40-byte keys): how many flows the node's conntrack seeds them
# with depends on the tests before (once more than the 60 kill points)
def counted_write(name, args):
    if name == "update_batch_u32":
        return True
    key = args[2][0] if name.endswith("_many") and args[2] else args[2]
    return not (isinstance(key, (bytes, bytearray)) and len(key) == 40)
def killing(name, fn):
    def wrapper(*args, **kwargs):
        if threading.get_ident() != main:
            return fn(*args, **kwargs)
        depth[0] += 1
        try:
            result = fn(*args, **kwargs)
        finally:
            depth[0] -= 1
        # a write call (also where it falls back to one element at a time: 5.10)
        if depth[0] == 0 and counted_write(name, args):
            done[0] += 1
            if done[0] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapper
for name in ("update", "delete", "update_many", "delete_many", "update_batch_u32"):
    setattr(loader.Sys, name, killing(name, getattr(loader.Sys, name)))
sys.argv = ["ipmasq", "apply", "--config", path, "--backend", "ebpf"]
cli.main()
"""


@pytest.mark.traffic
@needs_ebpf
def test_a_killed_apply_leaves_the_old_or_the_new_generation_live(node):
    """A change (2,000 of 4,000 exempt prefixes replaced) killed (SIGKILL) after its
    first map write, then again toward the same config after its second, its third...:
    each run makes the same writes (whatever is left to write) in the same order, so
    every point between two writes is a kill point. The live generation is always
    exactly one of the plans, with the cfg that names it, never a mix; what a killed
    apply left half-written in the idle generation, the next one reads back; the first
    apply that is not killed finds the change live, or makes it so."""
    bed = node.bed
    common = _prefixes(11, 2000)
    paths = [node.write_config({}, agent="nonMasqueradeCIDRs: [" + ", ".join(common + _prefixes(12 + i, 2000))
                               + (", 198.20.0.0/24" if i == 2 else "") + "]\n", name=f"{i}.yaml") for i in range(3)]
    for path in paths[1], paths[0]:  # live: 0; idle: 1; the change: to 2
        node.ipmasq("apply", "--config", path, "--backend", "ebpf", check=True)
    outcomes = []
    for kill_after in range(1, 60):
        proc = node.bed.node_exec([sys.executable, "-c", KILLED_APPLY, paths[2], str(kill_after)], env=node.env)
        state = generations(node, *paths)
        live = [path for path, verdict in state["plans"].items() if verdict["exact"] and verdict["cfg"]]
        assert len(live) == 1, (kill_after, proc.returncode, state["plans"])
        torn = not any(verdict["idle"] for verdict in state["plans"].values())  # the idle one half-written
        outcomes.append((proc.returncode, live[0] == paths[2], torn))
        if proc.returncode == 0:
            break
    assert outcomes[-1] == (0, True, False), outcomes
    killed = outcomes[:-1]
    seen = repr(outcomes)  # the whole list in each message (pytest's repr cuts it short)
    assert all(code == -signal.SIGKILL for code, _new, _torn in killed), seen
    assert (-signal.SIGKILL, False, True) in killed, seen  # killed while writing the idle generation: the old one live
    assert (-signal.SIGKILL, True, False) in killed, seen  # killed after the flip: the new one live
    assert killed.index((-signal.SIGKILL, True, False)) > 3, seen
    assert "State: in sync" in node.ipmasq("status", "--config", paths[2], check=True).stdout
    assert bed.source_seen(bed.dest("public")) == bed.pod_addr[4]
    assert bed.source_seen(bed.dest("cgnat")) == bed.uplink_addr["eth0"][4]


READ_LINKS_WITH_PYROUTE2 = """
import json, socket
from pyroute2 import IPRoute
from ipmasq_legacy.backends import ebpf
old = {}
with IPRoute() as ipr:
    for msg in ipr.get_links():
        old[msg["index"]] = [msg.get_attr("IFLA_IFNAME"), 0 if msg["ifi_type"] in ebpf.links.ARPHRD_L3 else 14, [], []]
    for msg in ipr.get_addr():
        if msg["index"] not in old:
            continue
        family = 4 if msg["family"] == socket.AF_INET else 6
        addr = (msg.get_attr("IFA_LOCAL") if family == 4 else None) or msg.get_attr("IFA_ADDRESS")
        old[msg["index"]][2].append(addr)
        old[msg["index"]][3].append([family, msg["scope"], msg.get_attr("IFA_FLAGS") or msg["flags"], addr])
new = {i: [l.name, l.l2len, l.addresses, l.addr4, l.addr6] for i, l in ebpf.read_links().items()}
print(json.dumps({"old": old, "new": new}))
"""


@pytest.mark.traffic
@needs_ebpf
def test_links_are_read_over_netlink_as_pyroute2_reads_them(node):
    """read_links speaks netlink itself (apply imports no pyroute2): the same links,
    names, header lengths and addresses as pyroute2 reports, and the addresses picked
    are the first primary global IPv4 one and the first usable global IPv6 one."""
    node.sh("ip addr add 172.20.0.77/24 dev eth0 && ip -6 addr add fd00:20::77/64 dev eth0 nodad")
    try:
        seen = json.loads(in_node_python(node, READ_LINKS_WITH_PYROUTE2))
    finally:
        node.sh("ip addr del 172.20.0.77/24 dev eth0; ip -6 addr del fd00:20::77/64 dev eth0")
    old, new = seen["old"], seen["new"]
    assert sorted(old) == sorted(new)
    for index, (name, l2len, addresses, picks) in old.items():
        assert new[index][:3] == [name, l2len, addresses]
        v4 = [a for f, scope, flags, a in picks if f == 4 and not flags & ebpf.links.IFA_F_SECONDARY and scope == 0]
        v6 = [a for f, scope, flags, a in picks if f == 6 and scope == 0 and not flags & 0x68]
        assert new[index][3] == (v4[0] if v4 else new[index][3]) and new[index][4] == (v6[0] if v6 else None)
    eth0 = next(v for v in new.values() if v[0] == "eth0")
    assert eth0[3] == node.bed.uplink_addr["eth0"][4] and "172.20.0.77" in eth0[2]


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
                "print(json.dumps([sorted(ebpf.keeper.nft_tables()), ebpf.drain_tables_present(), ebpf.keeper_present(), "
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
