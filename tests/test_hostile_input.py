"""Hostile input: every row of the hostile tester's table gets one clear line and the
documented exit code, and nothing changes.

Rows that only read (plan, option parsing, non-root refusals) run the real CLI in a
subprocess with a private state dir; every row where rules could be installed runs in a
test bed's node namespace (tests/nodeutil.py), never in the machine's own.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipmasq_legacy import config, inputs
from ipmasq_legacy.errors import ConfigError

IPMASQ = [sys.executable, "-m", "ipmasq_legacy"]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
NO_NET_ADMIN = ["setpriv", "--bounding-set=-net_admin"]  # root, without CAP_NET_ADMIN
LONGEST_LINE = 400  # a message quotes values of at most ~80 characters


def one_line(proc, code: int = 2, *fragments: str) -> str:
    """The run failed with `code` and said so in one bounded line naming `fragments`."""
    err = proc.stderr
    assert "Traceback" not in err and "internal error" not in err, err
    assert proc.returncode == code, f"exit {proc.returncode}, stderr: {err[:2000]}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[:2000]
    assert len(lines[0]) <= LONGEST_LINE, lines[0][:600]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def run(*args, env=None, prefix=(), timeout=20, cwd=None):
    """The CLI in a subprocess (no rules can change: plan, or options refused first)."""
    full = {**os.environ, "IPMASQ_CONFIG": "", **(env or {})}
    return subprocess.run([*prefix, *IPMASQ, *args], capture_output=True, text=True, env=full, timeout=timeout,
                          cwd=cwd)


@pytest.fixture
def state(tmp_path):
    d = tmp_path / "state"
    return {"IPMASQ_STATE_DIR": str(d)}


def in_node(node, *args, env=None, prefix=(), timeout=30):
    proc = node.bed.node_exec([*prefix, *IPMASQ, *args], env={**node.env, **(env or {})}, timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


ALIAS_BOMB = ("[&a [lol,lol,lol,lol,lol,lol,lol,lol,lol], " + ", ".join(
    f"&{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")) + "]")


# ---------------------------------------------------------------- files that are not files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_fifo_as_config_or_agent_file_is_refused_at_once(tmp_path, state):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    one_line(run("plan", "--config", str(fifo), env=state), 2, f"config file {fifo}: is a FIFO, not a regular file")
    agent = tmp_path / "c.yaml"
    agent.write_text(f"enable-ip-masq-agent: true\nip-masq-agent-config-path: {fifo}\n")
    one_line(run("plan", "--config", str(agent), env=state), 2, f"ip-masq-agent config {fifo}: is a FIFO")
    with pytest.raises(ConfigError, match="is a FIFO"):  # a ConfigMap directory with a FIFO as a key
        d = tmp_path / "cm"
        d.mkdir()
        os.mkfifo(d / "enable-ipv4-masquerade")
        config.load(str(d))
    assert time.monotonic() - started < 10


def test_dev_zero_and_a_directory_as_config(tmp_path, state):
    one_line(run("plan", "--config", "/dev/zero", env=state), 2, "config file /dev/zero: is a character device")
    one_line(run("plan", "--config", "/dev/null", env=state), 2, "/dev/null: is a character device")
    empty = tmp_path / "empty"
    empty.mkdir()
    agent = tmp_path / "c.yaml"
    agent.write_text(f"enable-ip-masq-agent: true\nip-masq-agent-config-path: {empty}\n")
    one_line(run("plan", "--config", str(agent), env=state), 2, f"ip-masq-agent config {empty}: a directory "
             "without a 'config' file")


def test_a_file_over_the_size_limit(tmp_path, state):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(inputs.MAX_FILE_BYTES + 1)  # sparse: costs no disk
    one_line(run("plan", "--config", str(big), env=state), 2, "more than the limit of 64 MiB")


def test_symlink_loops(tmp_path, state):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    one_line(run("plan", "--config", str(tmp_path / "a"), env=state), 2, "symlink loop")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"enable-ip-masq-agent: true\nip-masq-agent-config-path: {tmp_path / 'a'}\n")
    one_line(run("plan", "--config", str(cfg), env=state), 2, f"ip-masq-agent config {tmp_path / 'a'}: too many "
             "levels of symbolic links")
    # the default config path a loop: never "missing, so all defaults"
    one_line(run("plan", env={**state, "IPMASQ_CONFIG": str(tmp_path / "a")}), 2, "symlink loop")
    # a dangling symlink is what the agent calls missing: its defaults, as before
    cfg.write_text(f"enable-ip-masq-agent: true\nip-masq-agent-config-path: {tmp_path / 'nowhere'}\n")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    proc = run("plan", "--config", str(cfg), "-o", "json", env=state)
    assert proc.returncode == 0, proc.stderr
    assert "10.0.0.0/8" in json.loads(proc.stdout)["plan"]["families"]["ipv4"]["exempt"]


@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xfe e: 1\n", "not UTF-8 text (byte 0xff at offset 0)"),
    (b"datapath: nft\x00ables\n", "not valid YAML"),
])
def test_bytes_that_are_not_text(tmp_path, state, content, fragment):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    one_line(run("plan", "--config", str(path), env=state), 2, fragment)


def test_a_byte_order_mark_is_read_past(tmp_path, state):
    path = tmp_path / "c.yaml"
    path.write_bytes("\ufeffdatapath: iptables-nft\n".encode())
    proc = run("plan", "--config", str(path), env=state)
    assert proc.returncode == 0 and "backend: iptables-nft" in proc.stdout, proc.stderr


# ---------------------------------------------------------------- documents built to hurt


@pytest.mark.parametrize("key", ["enable-ipv4-masquerade", "datapath", "masquerade-to-ports", "resyncInterval"])
def test_yaml_alias_bomb_under_a_scalar_key_is_refused_fast(tmp_path, state, key):
    cfg = tmp_path / "c.yaml"
    if key == "resyncInterval":
        agent = tmp_path / "agent"
        agent.write_text(f"resyncInterval: {ALIAS_BOMB}\n")
        cfg.write_text(f"enable-ip-masq-agent: true\nip-masq-agent-config-path: {agent}\n")
    else:
        cfg.write_text(f"{key}: {ALIAS_BOMB}\n")
    started = time.monotonic()
    one_line(run("plan", "--config", str(cfg), env=state), 2, "YAML aliases expand the document", "alias bomb")
    assert time.monotonic() - started < 5


def test_recursive_alias_and_a_fair_use_of_aliases(tmp_path, state):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ipv4-native-routing-cidr: &a [*a]\n")
    one_line(run("plan", "--config", str(cfg), env=state), 2, "alias inside the node it names")
    cfg.write_text("ipv4-pod-cidr: &p 10.244.0.0/16\nipv4-native-routing-cidr: *p\n")
    assert run("plan", "--config", str(cfg), env=state).returncode == 0


def test_masquerade_to_ports_with_5000_digits(tmp_path, state):
    digits = "1" * 5000
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"masquerade-to-ports: {digits}\n")
    one_line(run("plan", "--config", str(cfg), env=state), 2, "a number of 5000 characters: too long")
    cfg.write_text(f'masquerade-to-ports: "{digits}"\n')
    one_line(run("plan", "--config", str(cfg), env=state), 2, "key 'masquerade-to-ports'", "...")
    one_line(run("plan", "--masquerade-to-ports", digits, env=state), 2, "on the command line", "...")
    cfg.write_text(f'{{"masquerade-to-ports": {digits}}}')  # JSON: Python's int() refuses 4,300 digits
    one_line(run("plan", "--config", str(cfg), env=state), 2, "too long")


def test_impossible_date_and_a_huge_value_in_a_message(tmp_path, state):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("enable-ipv4-masquerade: 2001-02-30\n")
    one_line(run("plan", "--config", str(cfg), env=state), 2, "day is out of range for month")
    cfg.write_text("egress-masquerade-interfaces: [" + ", ".join(["[x]"] * 20000) + "]\n")
    one_line(run("plan", "--config", str(cfg), env=state), 2, "interface name must be a string")
    cfg.write_text("ipv4-native-routing-cidr: " + "9" * 100000 + "x\n")
    one_line(run("plan", "--config", str(cfg), env=state), 2, "is not a CIDR")


# ---------------------------------------------------------------- keys given twice


@pytest.mark.parametrize("text, fragment", [
    ("enable-ipv4-masquerade: true\nenable-ipv4-masquerade: false\n",
     "key 'enable-ipv4-masquerade' is given twice in one mapping (lines 1 and 2)"),
    ('{"datapath": "nftables", "datapath": "ebpf"}', "key 'datapath' is given twice in one mapping"),
    ("bpf:\n  masquerade: true\n  masquerade: false\n", "key 'masquerade' is given twice"),  # Helm values
])
def test_duplicate_keys_in_our_config_are_an_error(tmp_path, state, text, fragment):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    one_line(run("plan", "--config", str(cfg), env=state), 2, fragment)


@pytest.mark.parametrize("text, twice", [
    ("masqLinkLocal: false\nmasqLinkLocal: true\n", "key 'masqLinkLocal' is given twice (lines 1 and 2)"),
    ('{"masqLinkLocal": false, "masqLinkLocal": true}', "key 'masqLinkLocal' is given twice"),
])
def test_duplicate_keys_in_the_agent_file_last_wins_with_a_warning(tmp_path, text, twice):
    """As ip-masq-agent: sigs.k8s.io/yaml's YAMLToJSON (go-yaml v2, not strict) and Go's
    encoding/json both keep the last value of a key given twice."""
    agent = tmp_path / "agent"
    agent.write_text(text)
    cfg = config.load(None, {"enable-ip-masq-agent": "true", "ip-masq-agent-config-path": str(agent)},
                      missing_ok=True)
    assert cfg.masq_agent.masq_link_local is True
    texts = [w.text for w in cfg.warnings if w.kind == "no-effect"]
    assert len(texts) == 1 and twice in texts[0] and "the last one counts, as in ip-masq-agent" in texts[0]


# ---------------------------------------------------------------- options and environment


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "-inf", "soon"])
def test_lock_timeout_must_be_finite_and_non_negative(node, value):
    """Refused before the lock is asked for (nan used to wait forever on a held lock)."""
    lock_dir = Path(node.env["IPMASQ_STATE_DIR"])
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        before = node.rulesets()
        started = time.monotonic()
        one_line(in_node(node, "apply", "--backend", "nftables", "--lock-timeout", value, timeout=20), 2,
                 "--lock-timeout", "finite, non-negative number of seconds")
        assert time.monotonic() - started < 10
        proc = in_node(node, "flush", "--lock-timeout", "0.2")  # the same lock, a real timeout: exit 3
        one_line(proc, 3, "could not lock")
        assert node.rulesets() == before


def test_metrics_file_in_a_missing_directory_changes_nothing(node, tmp_path):
    before = node.rulesets()
    for command in ("apply", "reconcile"):
        one_line(in_node(node, command, "--backend", "nftables", "--metrics-file", "/nonexistent/dir/m.prom"), 2,
                 "--metrics-file", "directory /nonexistent/dir does not exist")
    one_line(in_node(node, "apply", "--backend", "nftables", "--metrics-file", str(tmp_path)), 2, "is a directory")
    assert node.rulesets() == before
    # a good one is written after the change
    proc = in_node(node, "apply", "--backend", "nftables", "--metrics-file", str(tmp_path / "m.prom"))
    assert proc.returncode == 0, proc.stderr
    assert "ipmasq_backend_info" in (tmp_path / "m.prom").read_text()


@pytest.mark.parametrize("command", ["apply", "flush", "status", "list", "reconcile"])
def test_state_dir_that_is_a_regular_file(node, tmp_path, command):
    bad = tmp_path / "state-file"
    bad.write_text("not a directory\n")
    before = node.rulesets()
    one_line(in_node(node, command, env={"IPMASQ_STATE_DIR": str(bad)}), 2,
             f"state dir {bad} (IPMASQ_STATE_DIR): not a directory")
    assert node.rulesets() == before
    assert bad.read_text() == "not a directory\n"


def test_metrics_address_not_an_address_or_not_ours(node):
    before = node.rulesets()
    one_line(in_node(node, "watch", "--backend", "nftables", "--metrics-address", "not-an-address",
                     "--metrics-port", "0"), 2, "--metrics-address", "'not-an-address' is not an IPv4 or IPv6 address")
    # an address the node does not have: refused before the first apply
    one_line(in_node(node, "watch", "--backend", "nftables", "--metrics-address", "192.0.2.77",
                     "--metrics-port", "0"), 2, "cannot listen")
    assert node.rulesets() == before


# ---------------------------------------------------------------- privileges


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root to drop privileges")
@pytest.mark.parametrize("who", ["nobody", "root without CAP_NET_ADMIN"])
@pytest.mark.parametrize("command", ["apply", "reconcile", "flush", "watch", "status", "list"])
def test_non_root_is_told_root_is_needed(tmp_path, who, command):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(state, 0o777)  # writable: it used to get further and print several lines
    prefix = NOBODY if who == "nobody" else NO_NET_ADMIN
    proc = run(command, env={"IPMASQ_STATE_DIR": str(state)}, prefix=prefix, cwd=tmp_path)
    one_line(proc, 2, f"{command} needs root (or CAP_NET_ADMIN)")
    assert os.listdir(state) == []  # not even the lock


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_status_and_list_never_say_none_installed_when_they_could_not_look(node):
    assert in_node(node, "apply", "--backend", "nftables", "--ipv4-native-routing-cidr", "10.0.0.0/8").returncode == 0
    assert "10.0.0.0/8" in in_node(node, "list").stdout
    for prefix in (NOBODY, NO_NET_ADMIN):
        for command in ("status", "list"):
            proc = in_node(node, command, prefix=prefix)
            one_line(proc, 2, f"{command} needs root (or CAP_NET_ADMIN) to read the rules")
            assert "none installed" not in proc.stdout and "No entries found" not in proc.stdout


def test_unreadable_state_record_is_an_error_not_nothing(tmp_path, monkeypatch):
    """A record that is there but cannot be read (a directory in its place here; 0600 for
    a non-root reader) is never taken for "nothing recorded"."""
    from ipmasq_legacy import state as statemod

    monkeypatch.setenv("IPMASQ_STATE_DIR", str(tmp_path))
    (tmp_path / "state.json").mkdir()
    with pytest.raises(statemod.StateDirError, match="state.json: is a directory"):
        statemod.read()
    (tmp_path / "state.json").rmdir()
    assert statemod.read() == {}


# ---------------------------------------------------------------- option precedence


def _backend(proc) -> str:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["backend"]


@pytest.mark.parametrize("args", [
    ["--backend", "nftables", "--bpf-masquerade", "true"],
    ["--bpf-masquerade", "true", "--backend", "nftables"],
    ["--backend", "nftables", "--bpf-masquerade", "true", "--datapath", "iptables-nft"],
    ["--datapath", "iptables-nft", "--bpf-masquerade", "true", "--backend", "nftables"],
    ["--bpf-masquerade", "true", "--datapath", "iptables-nft"],
    ["--datapath", "iptables-nft", "--enable-bpf-masquerade", "true"],
    ["--backend", "nftables", "--datapath", "iptables-nft"],
    ["--datapath", "iptables-nft", "--backend", "nftables"],
    ["--backend", "ebpf", "--bpf-masquerade", "false"],
])
def test_contradicting_datapath_options_are_an_error_in_any_order(state, args):
    one_line(run("plan", *args, "-o", "json", env=state), 2, "contradicts")


@pytest.mark.parametrize("args, backend", [
    (["--backend", "ebpf", "--bpf-masquerade", "true"], "ebpf"),
    (["--bpf-masquerade", "true", "--backend", "ebpf"], "ebpf"),
    (["--backend", "nftables", "--bpf-masquerade", "false"], "nftables"),
    (["--bpf-masquerade", "false", "--backend", "nftables"], "nftables"),
    (["--datapath", "nftables", "--backend", "nftables"], "nftables"),
    (["--bpf-masquerade", "true"], "ebpf"),
])
def test_agreeing_datapath_options_in_any_order(state, args, backend):
    assert _backend(run("plan", *args, "-o", "json", env=state)) == backend


@pytest.mark.parametrize("file_text, args, outcome", [
    ("bpf-masquerade: true\n", ["--backend", "nftables"], "nftables"),  # option > file
    ("datapath: nftables\n", ["--bpf-masquerade", "true"], "ebpf"),
    ("enable-bpf-masquerade: true\n", ["--datapath", "iptables-nft"], "iptables-nft"),
    ("datapath: ebpf\n", ["--bpf-masquerade", "false"], "error"),  # says "not ebpf", names no backend
    ("datapath: ebpf\n", ["--bpf-masquerade", "false", "--backend", "nftables"], "nftables"),
])
def test_an_option_beats_the_file_whatever_it_is_spelled_as(tmp_path, state, file_text, args, outcome):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(file_text)
    proc = run("plan", "--config", str(cfg), *args, "-o", "json", env=state)
    if outcome == "error":
        one_line(proc, 2, "give --backend NAME")
    else:
        assert _backend(proc) == outcome


# ---------------------------------------------------------------- where rules would be installed


def test_apply_with_hostile_files_changes_nothing(node, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cfg = tmp_path / "c.yaml"
    before = node.rulesets()
    cases = [
        (str(fifo), "is a FIFO"),
        ("/dev/zero", "is a character device"),
    ]
    for text, fragment in [(f"datapath: {ALIAS_BOMB}\n", "alias bomb"),
                           ("datapath: nftables\ndatapath: iptables-nft\n", "given twice"),
                           (f"enable-ip-masq-agent: true\nip-masq-agent-config-path: {fifo}\n", "is a FIFO")]:
        path = tmp_path / f"case{len(cases)}.yaml"
        path.write_text(text)
        cases.append((str(path), fragment))
    for path, fragment in cases:
        one_line(in_node(node, "apply", "--config", path, "--backend", "nftables", timeout=20), 2, fragment)
    assert node.rulesets() == before
    cfg.write_text("ipv4-native-routing-cidr: 10.0.0.0/8\n")
    assert in_node(node, "apply", "--config", str(cfg), "--backend", "nftables").returncode == 0
    applied = node.rulesets()
    for path, fragment in cases:  # over an installed config: it stays
        one_line(in_node(node, "reconcile", "--config", path, "--backend", "nftables", timeout=20), 2, fragment)
    assert node.rulesets() == applied


def test_watch_keeps_applying_after_a_fifo_replaced_the_config(node, tmp_path):
    from .nodeutil import WatchAgent

    cfg = tmp_path / "c.yaml"
    cfg.write_text("ipv4-native-routing-cidr: 10.0.0.0/8\n")
    agent = WatchAgent(node, "--config", str(cfg), "--backend", "nftables")
    try:
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        os.rename(fifo, cfg)  # the config is now a FIFO
        agent.wait_for(lambda: "is a FIFO" in agent.log.read_text(), "FIFO refused", timeout=5)
        new = tmp_path / "c.new"
        new.write_text("ipv4-native-routing-cidr: 198.51.100.0/24\n")
        os.rename(new, cfg)
        agent.wait_for(lambda: "198.51.100.0/24" in node.sh("nft list table ip ipmasq_legacy"), "valid config applied",
                       timeout=5)
        log = agent.log.read_text()
        assert "Traceback" not in log and "internal error" not in log, log
    finally:
        agent.close()


# ---------------------------------------------------------------- the environment


@pytest.mark.parametrize("value", ["garbage", "nan", "-1", "inf", "9" * 5000])
@pytest.mark.parametrize("command", [("plan",), ("status",), ("flush",)])
def test_bpf_drain_idle_from_the_environment_is_checked_first(state, command, value):
    """IPMASQ_BPF_DRAIN_IDLE (the ebpf handover's idle limit) is read mid-apply: a bad one
    is refused before any command starts, in one bounded line, whoever runs it."""
    line = one_line(run(*command, env={**state, "IPMASQ_BPF_DRAIN_IDLE": value}), 2, "IPMASQ_BPF_DRAIN_IDLE: ")
    assert len(line) < 200 and "number of seconds" in line, line
