"""Property-based tests over the command line's inputs, not only over
config documents: what kind of file the config is, its size and encoding, the IPMASQ_*
environment, and combinations of options.

The property: exit 0 or 2 (3 only for the lock), never "internal error" nor a traceback;
an error is one line on stderr, of bounded length; a refusal changes nothing.

`plan` (no root, no change) runs in-process, so that hundreds of cases stay fast; the
options of the commands that change rules are parsed by click without running them; a
few generated configs go through `apply` in a test bed's node namespace, where a
refusal must leave every ruleset as it was.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from pathlib import Path
from unittest import mock

import click
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipmasq_legacy import cli, config

# A message: a path (tmp dirs are long), values of at most ~80 characters, and at most a
# list of the known keys (an unknown key's message names them all when none is near).
LONGEST_LINE = 1000
FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def check(code: int, out: str, err: str, allowed=(0, 2)) -> None:
    assert "Traceback" not in err and "internal error" not in err, err[:3000]
    assert code in allowed, f"exit {code}: {err[:3000]}"
    if code != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1, err[:3000]
        assert lines[0].startswith("ipmasq: ") and len(lines[0]) <= LONGEST_LINE, lines[0][:1000]


def run_inprocess(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """`ipmasq ARGS` through cli.main() in this process, with `env` laid over a clean IPMASQ_* set."""
    out, err = io.StringIO(), io.StringIO()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IPMASQ_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True), \
            mock.patch.object(sys, "argv", ["ipmasq", *args]), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------- what a config file holds

KEYS = list(config.KEYS) + list(config.CLI_ALIASES) + ["enableIPv4Masquerade", "bpf", "ipMasqAgent", "kind",
                                                        "data", "apiVersion", "identity-allocation-mode"]
scalar = st.one_of(
    st.booleans(), st.none(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
    st.sampled_from(["true", "false", "nftables", "ebpf", "auto", "eth+", "10.0.0.0/8", "fd00::/8", "1024-65535",
                     "60s", "", " ", "-", "+", "1" * 300, "10.0.0.1/8", "2001-02-30", "a\nb", "\t", "ConfigMap"]),
    st.text(max_size=20),
)
value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=3), max_leaves=10)
document = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=12), value, max_size=5)


def render(doc: dict, style: str) -> str:
    if style == "json":
        import json

        return json.dumps(doc, default=str)
    return yaml.safe_dump(doc, default_flow_style=(style == "flow"), allow_unicode=True)


# Texts YAML reads in its own ways: anchors and aliases, tags, keys twice, long numbers.
tricky_text = st.sampled_from([
    "a: &x [1, 2]\nb: *x\n", "datapath: &d nftables\nbackend: *d\n", "x: &a [*a]\n", "<<: {datapath: ebpf}\n",
    "datapath: !!binary aGVsbG8=\n", "datapath: !!python/object:os.system ls\n", "datapath: nftables\ndatapath: ebpf\n",
    "masquerade-to-ports: " + "9" * 200 + "\n", "enable-ipv4-masquerade: 2001-02-30\n", "---\n---\n", "{", "[",
    "'", "? [a, b]\n: c\n", "? {a: 1}\n: c\n", "%YAML 1.1\n---\ndatapath: auto\n", "datapath: ebpf\n...\nx\n",
    "egress-masquerade-interfaces: [" + ", ".join(["*a"] * 3) + "]\n", "ipv4-native-routing-cidr: !!set {a, b}\n",
    "a: " + "[" * 200 + "]" * 200 + "\n", '{"a": ' + "[" * 2000 + "]" * 2000 + "}",
])


@st.composite
def file_bytes(draw) -> bytes:
    text = draw(st.one_of(st.builds(render, document, st.sampled_from(["block", "flow", "json"])), tricky_text))
    data = text.encode("utf-8")
    mangle = draw(st.sampled_from(["none", "bom", "utf16", "nul", "ff", "truncate", "crlf", "random"]))
    if mangle == "bom":
        data = b"\xef\xbb\xbf" + data
    elif mangle == "utf16":
        data = text.encode("utf-16")
    elif mangle in ("nul", "ff"):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + (b"\x00" if mangle == "nul" else b"\xff") + data[at:]
    elif mangle == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif mangle == "crlf":
        data = data.replace(b"\n", b"\r\n")
    elif mangle == "random":
        data = draw(st.binary(max_size=200))
    return data


KINDS = ["regular", "empty", "fifo", "dir", "dir-with-keys", "dev-null", "dev-zero", "loop", "dangling", "missing",
         "through-a-file", "too-big"]


def make_path(base: Path, kind: str, content: bytes, name: str) -> str:
    """A path of `kind` under `base` (made fresh for each example)."""
    path = base / name
    if kind == "regular":
        path.write_bytes(content)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "dir-with-keys":  # a ConfigMap mounted whole
        path.mkdir()
        (path / "enable-ipv4-masquerade").write_bytes(content[:50])
        (path / "config").write_bytes(content)
    elif kind == "dev-null":
        return "/dev/null"
    elif kind == "dev-zero":
        return "/dev/zero"
    elif kind == "loop":
        path.symlink_to(base / f"{name}.other")
        (base / f"{name}.other").symlink_to(path)
    elif kind == "dangling":
        path.symlink_to(base / "nowhere")
    elif kind == "through-a-file":
        path.write_bytes(content)
        return str(path / "config.yaml")
    elif kind == "too-big":
        with open(path, "wb") as f:
            f.truncate(17 << 20)
    return str(path)


STATE_KINDS = ["unset", "fresh", "regular-file", "garbage-record", "fifo-record", "dir-record", "through-a-file"]


def make_state(base: Path, kind: str) -> dict[str, str]:
    d = base / "state"
    if kind == "unset":
        return {"IPMASQ_STATE_DIR": str(d)}  # (never the machine's /run/ipmasq-legacy)
    if kind == "regular-file":
        d.write_text("x")
    elif kind == "through-a-file":
        d.write_text("x")
        return {"IPMASQ_STATE_DIR": str(d / "sub")}
    elif kind != "fresh":
        d.mkdir()
        record = d / "state.json"
        if kind == "garbage-record":
            record.write_bytes(b"\xff{not json")
        elif kind == "fifo-record":
            os.mkfifo(record)
        elif kind == "dir-record":
            record.mkdir()
    return {"IPMASQ_STATE_DIR": str(d)}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("props")


_counter = iter(range(10**9))


def fresh(scratch: Path) -> Path:
    d = scratch / f"case{next(_counter)}"
    d.mkdir()
    return d


# ---------------------------------------------------------------- plan: file kinds, encodings, environment


@settings(FAST, max_examples=300)
@given(kind=st.sampled_from(KINDS), content=file_bytes(), via=st.sampled_from(["option", "env"]),
       agent_kind=st.sampled_from(["none"] + KINDS), agent_content=file_bytes(), state=st.sampled_from(STATE_KINDS),
       debug=st.booleans(), json_out=st.booleans())
def test_plan_over_file_kinds_encodings_and_environment(scratch, kind, content, via, agent_kind, agent_content,
                                                        state, debug, json_out):
    base = fresh(scratch)
    path = make_path(base, kind, content, "config.yaml")
    if agent_kind != "none" and kind == "regular":  # the config names an ip-masq-agent file of that kind
        agent = make_path(base, agent_kind, agent_content, "agent")
        Path(path).write_text(f"enable-ip-masq-agent: true\nip-masq-agent-config-path: '{agent}'\n")
    env = make_state(base, state)
    if debug:
        env["IPMASQ_DEBUG"] = "1"
    args = ["plan"] + (["-o", "json"] if json_out else [])
    if via == "option":
        args += ["--config", path]
    else:
        env["IPMASQ_CONFIG"] = path
    started = time.monotonic()
    code, out, err = run_inprocess(args, env)
    check(code, out, err)
    assert time.monotonic() - started < 5, f"{kind}: {time.monotonic() - started:.1f}s"
    if kind in ("fifo", "dev-zero", "dev-null", "loop", "through-a-file", "too-big"):
        assert code == 2, out  # never read as "missing" or as an empty document
    if code == 0:
        assert out


# ---------------------------------------------------------------- options, alone and together

OPTION_VALUES = st.one_of(
    st.sampled_from(["true", "false", "nftables", "ebpf", "iptables-nft", "auto", "eth+", "10.0.0.0/8", "fd00::/8",
                     "1024-65535", "", "nan", "-1", "1" * 5000, "a\nb", "eth0,eth1 ens3", "10.0.0.1/8", "0-0"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30),
)
KEY_OPTIONS = [f"--{key}" for key in cli.CONFIG_OPTION_KEYS] + ["--backend"]


@FAST
@given(options=st.lists(st.tuples(st.sampled_from(KEY_OPTIONS), OPTION_VALUES), max_size=5), json_out=st.booleans())
def test_plan_over_option_combinations(scratch, options, json_out):
    args = ["plan"] + (["-o", "json"] if json_out else [])
    for name, val in options:
        args += [name, val]
    code, out, err = run_inprocess(args, {"IPMASQ_STATE_DIR": str(fresh(scratch) / "state"), "IPMASQ_CONFIG": ""})
    check(code, out, err)
    if code == 0:
        assert out


@FAST
@given(options=st.lists(st.tuples(st.sampled_from(KEY_OPTIONS), st.sampled_from(
    ["nftables", "iptables-nft", "ebpf", "true", "false"])), min_size=2, max_size=4))
def test_datapath_options_decide_the_same_in_any_order(scratch, options):
    """Precedence independent of order: every permutation of the same options gives the
    same backend, or the same refusal."""
    options = [(n, v) for n, v in options if n in ("--backend", "--datapath", "--bpf-masquerade",
                                                   "--enable-bpf-masquerade")]
    env = {"IPMASQ_STATE_DIR": str(fresh(scratch) / "state"), "IPMASQ_CONFIG": ""}
    seen = set()
    for order in (options, list(reversed(options)), options[1:] + options[:1]):
        names = [n for n, _ in order]
        if len(set(names)) != len(names):
            return  # an option given twice: click keeps the last, order matters by design
        args = ["plan", "-o", "json"] + [x for pair in order for x in pair]
        code, out, err = run_inprocess(args, env)
        check(code, out, err)
        seen.add((code, out.split('"backend": ')[1].split(",")[0] if code == 0 else err))
    assert len(seen) == 1, seen


CHANGE_OPTIONS = {
    "apply": ["--lock-timeout", "--metrics-file", "--log-format", "--log-level", "--take-over"],
    "reconcile": ["--lock-timeout", "--metrics-file", "--log-format", "--log-level"],
    "flush": ["--lock-timeout"],
    "watch": ["--lock-timeout", "--metrics-file", "--metrics-port", "--metrics-address", "--log-format"],
}
PARSE_VALUES = st.one_of(OPTION_VALUES, st.sampled_from(
    ["30", "0", "0.5", "1e309", "-0", "inf", "NaN", "/nonexistent/dir/m.prom", "/tmp", "/dev/null/x", "::1",
     "127.0.0.1", "0.0.0.0", "localhost", "999999", "json", "text", "debug", "ip-masq-agent"]))


@FAST
@given(command=st.sampled_from(sorted(CHANGE_OPTIONS)), data=st.data())
def test_options_of_commands_that_change_rules_parse_or_refuse_in_one_line(command, data):
    """Parsed by click only (the command is not run here: it would change rules)."""
    names = CHANGE_OPTIONS[command]
    pairs = data.draw(st.lists(st.tuples(st.sampled_from(names), PARSE_VALUES), max_size=4))
    args = [x for pair in pairs for x in pair]
    try:
        cli.cli.commands[command].make_context(command, args)
    except click.exceptions.ClickException as exc:
        message = cli.bounded_message(exc)  # what main() prints
        assert "\n" not in message.strip() and len(message) <= LONGEST_LINE, message
        return
    given = dict(pairs)  # click keeps the last of an option given twice
    if "--lock-timeout" in given:  # accepted: then it is a value the command can use
        assert 0 <= float(given["--lock-timeout"]) < float("inf"), given
    if "--metrics-port" in given:
        assert 0 <= int(given["--metrics-port"]) <= 65535


# ---------------------------------------------------------------- a refusal changes nothing (live rules)


@pytest.mark.traffic
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(content=file_bytes(), kind=st.sampled_from(["regular", "regular", "fifo", "dev-zero", "loop", "dir"]))
def test_apply_refusals_leave_the_rules_as_they_were(node, scratch, content, kind):
    base = fresh(scratch)
    os.chmod(base, 0o755)
    path = make_path(base, kind, content, "config.yaml")
    before = node.rulesets()
    proc = node.bed.node_exec([sys.executable, "-m", "ipmasq_legacy", "apply", "--config", path, "--backend",
                               "nftables"], env=node.env, timeout=30)
    check(proc.returncode, proc.stdout, proc.stderr)
    if proc.returncode == 2:
        assert node.rulesets() == before
    else:
        node.ipmasq("flush", check=True)
