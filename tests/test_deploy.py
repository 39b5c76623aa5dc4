"""deploy/: every manifest parses, and names only real subcommands, options and config keys.

Each file is parsed with the format's own rules (systemd units, cron.d, Kubernetes YAML,
Containerfile), every `ipmasq ...` command line in it (live lines, and commands quoted in
backticks in comments and in deploy/README.md) is parsed by click exactly as `ipmasq`
would parse it, without running it, and every config key is checked against
ipmasq_legacy.config. The checkers return lists of problems, so the last part of this
module feeds them broken samples to prove they can fail.

No root, no network, nothing is run but `sh -n`, `od` and `systemd-analyze verify`.
"""

from __future__ import annotations

import configparser
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
import yaml

from ipmasq_legacy import config, state
from ipmasq_legacy.cli import cli
from ipmasq_legacy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SERVICE = DEPLOY / "systemd" / "ipmasq-legacy.service"
RECONCILE_SERVICE = DEPLOY / "systemd" / "ipmasq-legacy-reconcile.service"
TIMER = DEPLOY / "systemd" / "ipmasq-legacy-reconcile.timer"
CRON = DEPLOY / "cron" / "ipmasq-legacy"
K8S = DEPLOY / "kubernetes"
CONTAINERFILE = DEPLOY / "Containerfile"
README = DEPLOY / "README.md"

INSTALLED = "/usr/local/bin/ipmasq"  # where the host files expect the console script
XTABLES_LOCK = "/run/xtables.lock"
BPFFS = "/sys/fs/bpf"
MASQ_AGENT_FILE = "/etc/config/ip-masq-agent"


# ============================================================== `ipmasq` command lines


@dataclass
class Invocation:
    where: str  # file and line, for messages
    argv: list  # what follows `ipmasq`


def _here(arg: str, before: str) -> str:
    """--metrics-file's directory must exist where the command runs (a node with
    node_exporter), which this machine is not: the file, in a directory that exists."""
    if before == "--metrics-file":
        return os.path.join(tempfile.gettempdir(), os.path.basename(arg))
    if arg.startswith("--metrics-file="):
        return "--metrics-file=" + os.path.join(tempfile.gettempdir(), os.path.basename(arg.split("=", 1)[1]))
    return arg


def parse_invocation(argv: list) -> tuple[dict | None, list[str]]:
    """(click's parsed params, problems) for `ipmasq ARGV`. Parsing runs no command."""
    shown = "ipmasq " + shlex.join(argv)
    if not argv:
        return None, [f"`{shown}`: no subcommand"]
    if argv[0].startswith("-"):  # group options only: --version, --help
        group_opts = {o for p in cli.params for o in p.opts} | {"--help", "-h"}
        bad = [a for a in argv if a not in group_opts]
        return None, ([f"`{shown}`: {bad[0]!r} is not an option of `ipmasq` itself"] if bad else [])
    name, args = argv[0], [_here(a, argv[i]) for i, a in enumerate(argv[1:])]
    command = cli.commands.get(name)
    if command is None:
        return None, [f"`{shown}`: no subcommand {name!r} (known: {', '.join(sorted(cli.commands))})"]
    try:
        ctx = command.make_context(name, args)
    except click.exceptions.Exit:  # --help: valid, nothing to check
        return None, []
    except click.ClickException as exc:
        return None, [f"`{shown}`: {exc.format_message()}"]
    problems = []
    for param, value in ctx.params.items():
        key = param.replace("_", "-")
        if value is None:
            continue
        try:
            if key in config.KEYS:
                config.KEYS[key][1](value, f"option --{key}")
            elif key in config.ALIASES:
                config.parse_bool(value, f"option --{key}")
            elif param == "backend" and name != "selftest":
                config.parse_datapath(value, "option --backend")
        except ConfigError as exc:
            problems.append(f"`{shown}`: {exc}")
    return dict(ctx.params), problems


def check_invocation(argv: list) -> list[str]:
    return parse_invocation(argv)[1]


def is_ipmasq(token: str) -> bool:
    return os.path.basename(token) == "ipmasq"


def _is_operator(token: str) -> bool:
    return bool(token) and all(c in "();<>|&" for c in token)


def shell_words(text: str) -> list[str]:
    """A POSIX sh command line as words, with operators (`&&`, `|`, `>`, `(`) as words of their own."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


_PREFIX_COMMANDS = {"exec", "sudo", "env", "nice", "nohup", "command", "time", "--"}


def invocations_in_words(words: list[str], where: str) -> list[Invocation]:
    """Every `ipmasq ...` (any path to it) up to the end of its simple command. `ipmasq` is
    a command where a command goes (first, after an operator, after exec/sudo/env/--/VAR=x),
    or where a subcommand follows it (`docker exec NAME ipmasq status`); not a path
    argument (`ln -s /opt/x/bin/ipmasq /usr/local/bin/ipmasq`)."""
    found = []
    for i, word in enumerate(words):
        if not is_ipmasq(word):
            continue
        before = words[i - 1] if i else None
        after = words[i + 1] if i + 1 < len(words) else None
        command_position = (before is None or _is_operator(before) or before in _PREFIX_COMMANDS
                            or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", before) is not None)
        subcommand_follows = after is not None and not _is_operator(after) and "/" not in after
        if not (command_position or subcommand_follows):
            continue
        argv = []
        for nxt in words[i + 1:]:
            if _is_operator(nxt):
                if nxt[0] in "<>" and argv and argv[-1].isdigit():
                    argv.pop()  # the 2 of 2>&1
                break
            argv.append(nxt)
        found.append(Invocation(where, argv))
    return found


def invocations_in_shell(text: str, where: str) -> list[Invocation]:
    return invocations_in_words(shell_words(text), where)


def quoted_commands(text: str, where: str) -> list[Invocation]:
    """`ipmasq ...` quoted in backticks in prose (comments, README)."""
    found = []
    for span in re.findall(r"`([^`\n]+)`", text):
        if re.search(r"(^|[\s/])ipmasq(\s|$)", span):  # a bare `ipmasq` in prose is a name
            found += [inv for inv in invocations_in_shell(span, f"{where} (`{span}`)") if inv.argv]
    return found


# ============================================================== systemd units


@dataclass
class Unit:
    path: str
    sections: dict = field(default_factory=dict)  # section -> [(key, value, line number)]
    comments: list = field(default_factory=list)  # (line number, text)
    problems: list = field(default_factory=list)

    def values(self, section: str, key: str) -> list[str]:
        return [v for k, v, _ in self.sections.get(section, []) if k == key]

    def value(self, section: str, key: str, default: str | None = None) -> str | None:
        found = self.values(section, key)
        return found[-1] if found else default

    def line(self, section: str, key: str) -> int:
        return next((n for k, _, n in self.sections.get(section, []) if k == key), 0)


def parse_unit(text: str, path: str = "<unit>") -> Unit:
    """systemd.syntax(7): [Section], Key=Value (repeatable), # and ; comments, `\\` continuations."""
    unit = Unit(path)
    current = None
    pending, pending_no = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            if line:
                unit.comments.append((number, line.lstrip("#;").strip()))
            continue
        if pending and line[:1] in "#;":  # comments may sit between continuation lines
            continue
        if line.endswith("\\"):
            pending, pending_no = pending + line[:-1] + " ", pending_no or number
            continue
        line, pending, number = pending + line, "", pending_no or number
        pending_no = 0
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            unit.sections.setdefault(current, [])
        elif current is None:
            unit.problems.append(f"{path}:{number}: {line!r} before any [Section]")
        elif "=" not in line:
            unit.problems.append(f"{path}:{number}: {line!r} is not Key=Value")
        else:
            key, value = line.split("=", 1)
            if not re.fullmatch(r"[A-Za-z0-9-]+", key.strip()):
                unit.problems.append(f"{path}:{number}: bad key {key.strip()!r}")
            unit.sections[current].append((key.strip(), value.strip(), number))
    if pending:
        unit.problems.append(f"{path}: ends inside a continuation line")
    # A second opinion: the same text as an INI file (repeated keys allowed).
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        unit.problems.append(f"{path}: not INI-shaped: {exc}")
    return unit


EXEC_KEYS = ("ExecStart", "ExecStartPre", "ExecStartPost", "ExecReload", "ExecStop", "ExecStopPost", "ExecCondition")


def exec_argv(value: str) -> list[str]:
    """An Exec*= value as argv: prefixes @-:+! dropped, systemd's shell-like quoting."""
    return shlex.split(value.lstrip("@-:+!"))


def unit_invocations(unit: Unit) -> list[Invocation]:
    found = []
    for entries in unit.sections.values():
        for key, value, number in entries:
            if key in EXEC_KEYS and value:
                argv = exec_argv(value)
                where = f"{unit.path}:{number} {key}="
                if argv and argv[0] in ("/bin/sh", "/usr/bin/sh", "sh") and "-c" in argv:
                    found += invocations_in_shell(argv[argv.index("-c") + 1], where)
                else:
                    found += invocations_in_words(argv, where)
    for number, text in unit.comments:
        found += quoted_commands(text, f"{unit.path}:{number} (comment)")
    return found


_SPAN_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800, "weeks": 604800,
}


def timespan(text: str) -> float:
    """systemd.time(7) time span in seconds: `50s`, `1min 30s`, `90` (seconds)."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([a-z]+)", "", text).strip():
        raise ValueError(f"not a time span: {text!r}")
    return sum(float(n) * _SPAN_UNITS[u] for n, u in parts)


def service_problems(unit: Unit) -> list[str]:
    """The agent unit: `ipmasq watch`, reload by SIGHUP, restart on failure, room to write."""
    p = list(unit.problems)
    starts = unit.values("Service", "ExecStart")
    if len(starts) != 1:
        return p + [f"{unit.path}: expected one ExecStart=, found {len(starts)}"]
    argv = exec_argv(starts[0])
    if not argv or argv[0] != INSTALLED or argv[1:2] != ["watch"]:
        p.append(f"{unit.path}: ExecStart= should run `{INSTALLED} watch`, runs {starts[0]!r}")
    if unit.value("Service", "Type", "simple") != "simple":
        p.append(f"{unit.path}: Type= should be simple (watch does not notify)")
    reload = exec_argv(unit.value("Service", "ExecReload", "") or "")
    if not (reload and os.path.basename(reload[0]) == "kill" and "$MAINPID" in reload
            and any(a in ("-HUP", "-SIGHUP", "-1") or a == "HUP" for a in reload)):
        p.append(f"{unit.path}: ExecReload= should send SIGHUP to $MAINPID, is {reload}")
    if unit.value("Service", "Restart") not in ("on-failure", "always"):
        p.append(f"{unit.path}: Restart= should be on-failure")
    if "network-online.target" not in " ".join(unit.values("Unit", "After")):
        p.append(f"{unit.path}: should start After=network-online.target")
    return p + sandbox_problems(unit)


def sandbox_problems(unit: Unit) -> list[str]:
    """Capabilities it needs, and the state dir and the xtables lock writable under ProtectSystem."""
    p = []
    caps = " ".join(unit.values("Service", "CapabilityBoundingSet")).split()
    for cap in ("CAP_NET_ADMIN", "CAP_NET_RAW"):
        if caps and cap not in caps:
            p.append(f"{unit.path}: CapabilityBoundingSet= lacks {cap}")
    env = dict(v.split("=", 1) for e in unit.values("Service", "Environment") for v in shlex.split(e) if "=" in v)
    state_dir = env.get("IPMASQ_STATE_DIR", state.DEFAULT_DIR)
    runtime = ["/run/" + d for d in " ".join(unit.values("Service", "RuntimeDirectory")).split()]
    writable = [w.lstrip("-+") for w in " ".join(unit.values("Service", "ReadWritePaths")).split()] + runtime
    if unit.value("Service", "ProtectSystem") in ("strict",):
        if state_dir not in writable:
            p.append(f"{unit.path}: ProtectSystem=strict but the state dir {state_dir} is not writable")
        if XTABLES_LOCK not in writable:
            p.append(f"{unit.path}: ProtectSystem=strict but {XTABLES_LOCK} is not in ReadWritePaths=")
        pre = " ".join(v for v in unit.values("Service", "ExecStartPre") if v.lstrip("-@:!").startswith("+"))
        if XTABLES_LOCK not in pre:
            p.append(f"{unit.path}: with a read-only /run, {XTABLES_LOCK} must be created by an "
                     "unsandboxed (+) ExecStartPre= (iptables opens it with O_CREAT)")
    if runtime and state_dir in runtime and unit.value("Service", "RuntimeDirectoryPreserve") not in ("yes", "true"):
        p.append(f"{unit.path}: RuntimeDirectory= without RuntimeDirectoryPreserve=yes deletes state.json on stop")
    return p


def reconcile_service_problems(unit: Unit) -> list[str]:
    p = list(unit.problems)
    starts = unit.values("Service", "ExecStart")
    argv = exec_argv(starts[0]) if len(starts) == 1 else []
    if argv[:2] != [INSTALLED, "reconcile"]:
        p.append(f"{unit.path}: ExecStart= should run `{INSTALLED} reconcile`")
    if unit.value("Service", "Type") != "oneshot":
        p.append(f"{unit.path}: Type= should be oneshot")
    return p + sandbox_problems(unit)


def timer_problems(unit: Unit, unit_dir: Path) -> list[str]:
    p = list(unit.problems)
    timer = dict((k, v) for k, v, _ in unit.sections.get("Timer", []))
    if not any(k in timer for k in ("OnCalendar", "OnUnitActiveSec", "OnUnitInactiveSec", "OnBootSec")):
        p.append(f"{unit.path}: no trigger (OnCalendar= or OnUnitActiveSec=)")
    try:
        splay = timespan(timer.get("RandomizedDelaySec", "0"))
    except (ValueError, KeyError) as exc:
        return p + [f"{unit.path}: RandomizedDelaySec=: {exc}"]
    if not 0 < splay <= 60:
        p.append(f"{unit.path}: RandomizedDelaySec= should splay runs by up to a minute, is {splay:g}s")
    if "OnCalendar" in timer and timer.get("Persistent") not in ("true", "yes"):
        p.append(f"{unit.path}: Persistent=true catches up a run missed while the node was down")
    target = timer.get("Unit", Path(unit.path).stem + ".service")
    if not (unit_dir / target).exists():
        p.append(f"{unit.path}: triggers {target}, which is not in {unit_dir}")
    if "timers.target" not in (unit.value("Install", "WantedBy") or ""):
        p.append(f"{unit.path}: [Install] WantedBy=timers.target missing")
    return p


# ============================================================== cron.d


@dataclass
class CronEntry:
    number: int
    schedule: str
    user: str
    command: str  # as sh sees it: \% turned into %


_CRON_FIELD = re.compile(r"(\*|\d+(-\d+)?|[a-z]{3}(-[a-z]{3})?)(/\d+)?(,(\*|\d+(-\d+)?|[a-z]{3}(-[a-z]{3})?)(/\d+)?)*",
                         re.I)


def parse_cron(text: str, path: str = "<cron.d>") -> tuple[dict, list[CronEntry], list[str], list]:
    """(environment, entries, problems, comments) of an /etc/cron.d file (crontab(5), system format)."""
    env, entries, problems, comments = {}, [], [], []
    if not re.fullmatch(r"[A-Za-z0-9_-]+", Path(path).name):
        problems.append(f"{path}: cron ignores files in /etc/cron.d whose names have other than A-Za-z0-9_-")
    if text and not text.endswith("\n"):
        problems.append(f"{path}: the last line has no newline: cron ignores it")
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            comments.append((number, line.lstrip("#").strip()))
            continue
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)", line)
        if m:
            env[m.group(1)] = m.group(2).strip("'\"")
            continue
        if line.startswith("@"):
            parts = line.split(None, 2)
            schedule, rest = parts[0], parts[1:]
            if schedule not in ("@reboot", "@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
                                "@hourly"):
                problems.append(f"{path}:{number}: unknown schedule {schedule!r}")
        else:
            parts = line.split(None, 6)
            schedule, rest = " ".join(parts[:5]), parts[5:]
            bad = [f for f in parts[:5] if not _CRON_FIELD.fullmatch(f)]
            if len(parts) < 7 or bad:
                problems.append(f"{path}:{number}: expected 5 time fields, a user and a command: {line!r}")
                continue
        if len(rest) < 2 or not re.fullmatch(r"[a-z_][a-z0-9_-]*\$?", rest[0]) or is_ipmasq(rest[0]):
            problems.append(f"{path}:{number}: no user field (cron.d lines are: schedule, user, command)")
            continue
        user, command = rest
        if re.search(r"(?<!\\)%", command):
            problems.append(f"{path}:{number}: a bare % is a newline in cron: write \\%")
        entries.append(CronEntry(number, schedule, user, command.replace("\\%", "%")))
    return env, entries, problems, comments


def cron_problems(text: str, path: str = "<cron.d>") -> list[str]:
    env, entries, problems, _ = parse_cron(text, path)
    if env.get("SHELL", "/bin/sh") != "/bin/sh":
        problems.append(f"{path}: SHELL should be /bin/sh (the commands are POSIX sh)")
    if not entries:
        problems.append(f"{path}: no entries")
    for entry in entries:
        where = f"{path}:{entry.number}"
        if "$RANDOM" in entry.command or "${RANDOM" in entry.command:
            problems.append(f"{where}: $RANDOM is not POSIX sh (dash has none)")
        sh = shutil.which("dash") or shutil.which("sh")
        if sh:
            proc = subprocess.run([sh, "-n", "-c", entry.command], capture_output=True, text=True)
            if proc.returncode:
                problems.append(f"{where}: sh -n rejects the command: {proc.stderr.strip()}")
        invocations = invocations_in_shell(entry.command, where)
        if not any(inv.argv[:1] == ["reconcile"] for inv in invocations):
            problems.append(f"{where}: does not run `ipmasq reconcile`")
        before = entry.command.split("ipmasq", 1)[0]
        if not re.search(r"\bsleep\b", before) or "/dev/urandom" not in before:
            problems.append(f"{where}: no random splay (a `sleep` drawn from /dev/urandom) before ipmasq")
    return problems


def splay_expression(command: str) -> str | None:
    m = re.search(r"\bsleep\s+(\$\(\(.*?\)\))\s*(&&|;)", command)
    return m.group(1) if m else None


# ============================================================== Kubernetes


def load_k8s() -> dict:
    """{(kind, name): document} over deploy/kubernetes/*.yaml."""
    docs = {}
    for path in sorted(K8S.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a Kubernetes object: {doc}"
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in docs, f"{path}: {key} defined twice"
            docs[key] = {**doc, "_path": str(path.relative_to(ROOT))}
    return docs


SAMPLE_FIELD_VALUES = {"status.hostIP": "192.0.2.10", "status.podIP": "192.0.2.10", "spec.nodeName": "node-1"}


def container_argv(container: dict) -> tuple[list[str], list[str]]:
    """(command + args with $(VAR) expanded from env, problems)."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            path = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            env[item["name"]] = SAMPLE_FIELD_VALUES.get(path, "sample")
    problems = []

    def expand(word):
        def sub(m):
            if m.group(1) not in env:
                problems.append(f"container {container['name']}: $({m.group(1)}) is not in env (stays literal)")
                return m.group(0)
            return env[m.group(1)]
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, str(word))

    return [expand(w) for w in container.get("command", []) + container.get("args", [])], problems


def pod_invocations(pod: dict, where: str) -> list[tuple[dict, Invocation, list[str]]]:
    found = []
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        argv, problems = container_argv(container)
        if argv[:1] and os.path.basename(argv[0]) in ("sh", "bash") and "-c" in argv:
            invs = invocations_in_shell(argv[argv.index("-c") + 1], f"{where} {container['name']}")
        else:
            invs = invocations_in_words(argv, f"{where} {container['name']}")
        found += [(container, inv, problems) for inv in invs]
    return found


def configmap_file(pod: dict, container: dict, path: str) -> tuple[str | None, str | None, list[str]]:
    """Which ConfigMap key appears at `path` in the container: (configmap, key, problems)."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
    for mount in mounts:
        base = mount["mountPath"].rstrip("/")
        if path != base and not path.startswith(base + "/"):
            continue
        cm = volumes.get(mount["name"], {}).get("configMap")
        if cm is None:
            return None, None, [f"{path} is under mount {base}, which is not a ConfigMap"]
        if "subPath" in mount:
            return cm["name"], None, [f"ConfigMap {cm['name']} is mounted with subPath at {base}: "
                                      "updates never reach the container (no `..data` swap to follow)"]
        relative = path[len(base) + 1:]
        if "items" in cm:
            key = next((i["key"] for i in cm["items"] if i["path"] == relative), None)
            if key is None:
                return cm["name"], None, [f"ConfigMap {cm['name']} at {base} has no item with path {relative!r}"]
            return cm["name"], key, []
        return cm["name"], relative, []
    return None, None, [f"nothing is mounted at {path}"]


def config_keys_problems(text: str, where: str) -> list[str]:
    """Every key of a config.yaml text, commented examples (`# key: value`) included, is real."""
    known = set(config.KEYS) | set(config.ALIASES)
    problems = []
    doc = yaml.safe_load(text) or {}
    if not isinstance(doc, dict):
        return [f"{where}: not a mapping"]
    commented = re.findall(r"^\s*#\s*([a-z0-9][a-z0-9-]*):", text, re.M)
    for key in list(doc) + commented:
        if key not in known:
            problems.append(f"{where}: {key!r} is not a config key")
    for line in re.findall(r"^\s*#\s*([a-z0-9][a-z0-9-]*:.*)$", text, re.M):
        key, value = line.split(":", 1)
        if key in config.KEYS:
            try:
                config.KEYS[key][1](yaml.safe_load(value), f"commented example {key!r} in {where}")
            except ConfigError as exc:
                problems.append(str(exc))
    return problems


def load_config_text(text: str, tmp_path: Path, options: dict | None = None) -> config.Config:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return config.load(str(path), options or {})


def daemonset_problems(ds: dict, docs: dict, tmp_path: Path) -> list[str]:
    name = f"{ds.get('_path', 'DaemonSet')} ({ds['metadata']['name']})"
    p = []
    spec = ds["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"].get("labels", {})
    if not spec["selector"].get("matchLabels") or any(labels.get(k) != v for k, v in spec["selector"]["matchLabels"].items()):
        p.append(f"{name}: selector does not match the template's labels")
    if pod.get("hostNetwork") is not True:
        p.append(f"{name}: hostNetwork must be true (the rules belong in the node's network namespace)")
    if pod.get("priorityClassName") != "system-node-critical":
        p.append(f"{name}: priorityClassName should be system-node-critical")
    if not any(t.get("operator") == "Exists" and "key" not in t and "effect" not in t for t in pod.get("tolerations", [])):
        p.append(f"{name}: should tolerate every taint (operator: Exists, no key)")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}

    found = pod_invocations(pod, name)
    if len([f for f in found if f[1].argv[:1] == ["watch"]]) != 1:
        return p + [f"{name}: expected one container running `ipmasq watch`, found {[f[1].argv for f in found]}"]
    container, inv, argv_problems = next(f for f in found if f[1].argv[:1] == ["watch"])
    p += [f"{name}: {m}" for m in argv_problems]
    params, problems = parse_invocation(inv.argv)
    p += [f"{name}: {m}" for m in problems]
    if params is None:
        return p
    cname = f"{name} container {container['name']}"

    for mount in container.get("volumeMounts", []):
        if mount["name"] not in volumes:
            p.append(f"{cname}: mounts volume {mount['name']!r}, which is not defined")

    sc = container.get("securityContext", {})
    added = sc.get("capabilities", {}).get("add", [])
    for cap in ("NET_ADMIN", "NET_RAW"):
        if cap not in added and not sc.get("privileged"):
            p.append(f"{cname}: capabilities.add lacks {cap}")
    if sc.get("allowPrivilegeEscalation") is False and ("CAP_SYS_ADMIN" in added or sc.get("privileged")):
        p.append(f"{cname}: the API server rejects allowPrivilegeEscalation: false with privileged / CAP_SYS_ADMIN")

    def host_mount(host_path, mount_path, types):
        for mount in container.get("volumeMounts", []):
            hp = volumes.get(mount["name"], {}).get("hostPath")
            if hp and hp["path"] == host_path and mount["mountPath"] == mount_path:
                if types and hp.get("type") not in types:
                    p.append(f"{cname}: hostPath {host_path} should have type {' or '.join(types)}")
                return mount
        p.append(f"{cname}: hostPath {host_path} is not mounted at {mount_path}")
        return None

    host_mount(XTABLES_LOCK, XTABLES_LOCK, ["FileOrCreate"])
    host_mount(BPFFS, BPFFS, ["Directory", "DirectoryOrCreate"])
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    state_dir = env.get("IPMASQ_STATE_DIR") or state.DEFAULT_DIR
    host_mount(state_dir, state_dir, ["Directory", "DirectoryOrCreate"])
    modules = host_mount("/lib/modules", "/lib/modules", [])
    if modules is not None and not modules.get("readOnly"):
        p.append(f"{cname}: /lib/modules should be mounted readOnly")

    # The config file: a ConfigMap key; its keys real; it loads.
    options = {k.replace("_", "-"): v for k, v in params.items() if v is not None
               and (k.replace("_", "-") in config.KEYS or k.replace("_", "-") in config.ALIASES)}
    config_path = params.get("config_path") or env.get("IPMASQ_CONFIG") or config.DEFAULTS["config_path"]
    cm_name, key, problems = configmap_file(pod, container, config_path)
    p += [f"{cname}: config {config_path}: {m}" for m in problems]
    text = None
    if key is not None:
        data = docs.get(("ConfigMap", cm_name), {}).get("data", {})
        if key not in data:
            p.append(f"{cname}: config {config_path} is key {key!r} of ConfigMap {cm_name}, not in deploy/kubernetes")
        else:
            text = data[key]
            p += config_keys_problems(text, f"ConfigMap {cm_name} key {key}")
    try:
        cfg = load_config_text(text or "", tmp_path, {**options, "enable-ip-masq-agent": "false"})
        doc = yaml.safe_load(text or "") or {}
        enabled = config.parse_bool(options.get("enable-ip-masq-agent", doc.get("enable-ip-masq-agent", False)), "x")
    except ConfigError as exc:
        return p + [f"{cname}: config does not load: {exc}"]

    # The ip-masq-agent ConfigMap, where ip-masq-agent mounts it.
    if not enabled:
        p.append(f"{cname}: enable-ip-masq-agent is off: the ip-masq-agent ConfigMap would be ignored")
    if cfg.ip_masq_agent_config_path != MASQ_AGENT_FILE:
        p.append(f"{cname}: ip-masq-agent-config-path is {cfg.ip_masq_agent_config_path}, not {MASQ_AGENT_FILE}")
    cm_name, key, problems = configmap_file(pod, container, cfg.ip_masq_agent_config_path)
    p += [f"{cname}: ip-masq-agent file: {m}" for m in problems]
    if (cm_name, key) != ("ip-masq-agent", "config") and not problems:
        p.append(f"{cname}: {cfg.ip_masq_agent_config_path} is key {key!r} of ConfigMap {cm_name!r}, "
                 "not key 'config' of ConfigMap 'ip-masq-agent'")

    # Liveness (and readiness) from the agent's own /healthz, on the port given to --metrics-port.
    port = params.get("metrics_port")
    if port is None:
        p.append(f"{cname}: watch runs without --metrics-port: no /healthz to probe")
    named = {cp.get("name"): cp["containerPort"] for cp in container.get("ports", [])}
    for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = container.get(probe_name)
        if probe is None:
            if probe_name == "livenessProbe":
                p.append(f"{cname}: no livenessProbe")
            continue
        http = probe.get("httpGet")
        if not http or http.get("path") != "/healthz":
            p.append(f"{cname}: {probe_name} should be httpGet /healthz")
            continue
        probe_port = named.get(http["port"], http["port"])
        if probe_port != port:
            p.append(f"{cname}: {probe_name} probes port {http['port']!r} ({probe_port}), --metrics-port is {port}")
        address = params.get("metrics_address")
        if address and address.startswith("127.") and not str(http.get("host", "")).startswith("127."):
            p.append(f"{cname}: metrics on {address} but {probe_name} probes the pod address")
    if port is not None and port not in named.values():
        p.append(f"{cname}: no containerPort {port} declared for the metrics")
    annotated = spec["template"]["metadata"].get("annotations", {}).get("prometheus.io/port")
    if annotated is not None and str(annotated) != str(port):
        p.append(f"{name}: prometheus.io/port is {annotated}, --metrics-port is {port}")
    if not container.get("resources", {}).get("requests"):
        p.append(f"{cname}: no resources.requests")
    return p


# ============================================================== Containerfile


def parse_containerfile(text: str) -> list[tuple[int, str, str]]:
    """[(line, INSTRUCTION, arguments)]: comments dropped, `\\` continuations joined."""
    instructions, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending, start = pending + line[:-1] + " ", start or number
            continue
        line, pending, start = pending + line, "", start or number
        instr, _, args = line.partition(" ")
        instructions.append((start, instr.upper(), args.strip()))
        start = 0
    assert not pending, "Containerfile ends inside a continuation line"
    return instructions


def containerfile_problems(text: str, path: str = "<Containerfile>") -> tuple[list[str], list[Invocation]]:
    known = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
             "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
    p, invocations = [], []
    instructions = parse_containerfile(text)
    stages = [i for i, (_, instr, _) in enumerate(instructions) if instr == "FROM"]
    if not stages or stages[0] != next((i for i, ins in enumerate(instructions) if ins[1] != "ARG"), None):
        p.append(f"{path}: must start with FROM")
        return p, invocations
    final = instructions[stages[-1]:]
    # FROM ${BASE}: the default of an ARG before the first FROM
    args_before = dict(re.match(r"(\w+)(?:=(\S*))?", a).groups("") for _, ins, a in instructions[:stages[0]])
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args_before.get(m.group(1), m.group(0)), final[0][2])
    if "debian:bookworm-slim" not in base:
        p.append(f"{path}: the final stage should be based on debian:bookworm-slim, is {base!r}")
    entrypoint, cmd, env_path, copied_from, venvs = None, None, "", [], []
    for number, instr, args in instructions:
        where = f"{path}:{number}"
        if instr not in known:
            p.append(f"{where}: unknown instruction {instr}")
        if instr == "RUN":
            invocations += invocations_in_shell(args, where)
            venvs += re.findall(r"-m venv\s+(\S+)", args)
        if instr in ("COPY", "ADD") and "--from=" not in args:
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            for source in words[:-1]:
                if not (ROOT / source).exists():
                    p.append(f"{where}: COPY source {source!r} is not in the repository (the build context)")
    for number, instr, args in final:
        where = f"{path}:{number}"
        if instr in ("ENTRYPOINT", "CMD"):
            try:
                value = json.loads(args)
            except ValueError:
                p.append(f"{where}: {instr} should be exec form (a JSON array): signals must reach ipmasq")
                continue
            if instr == "ENTRYPOINT":
                entrypoint = value
            else:
                cmd = value
        if instr == "ENV":
            m = re.search(r"\bPATH=(\S+)", args)
            env_path = m.group(1) if m else env_path
        if instr == "COPY" and "--from=" in args:
            copied_from += shlex.split(args)[1:-1]
        if instr == "RUN" and "apt-get install" in args:
            packages = set(re.findall(r"(?<![-\w])([a-z0-9][a-z0-9.+-]+)", args.split("install", 1)[1]))
            missing = {"iptables", "nftables", "libnftables1", "ipset", "iproute2", "conntrack", "python3"} - packages
            if missing:
                p.append(f"{where}: the runtime stage does not install {', '.join(sorted(missing))}")
    if not entrypoint or not is_ipmasq(entrypoint[0]):
        p.append(f"{path}: ENTRYPOINT should be [\"ipmasq\"], is {entrypoint}")
    else:
        invocations.append(Invocation(f"{path} ENTRYPOINT+CMD", entrypoint[1:] + (cmd or [])))
        if (entrypoint[1:] + (cmd or []))[:1] != ["watch"]:
            p.append(f"{path}: the default command should be `ipmasq watch`")
        if "/" not in entrypoint[0]:
            if not venvs or f"{venvs[-1]}/bin" not in env_path.split(":"):
                p.append(f"{path}: ENTRYPOINT [\"ipmasq\"] needs the venv's bin ({venvs}) on ENV PATH ({env_path})")
            if venvs and venvs[-1] not in copied_from and len(stages) > 1:
                p.append(f"{path}: the final stage does not COPY --from the venv {venvs[-1]}")
    return p, invocations


# ============================================================== every command line in deploy/


def all_invocations() -> list[Invocation]:
    found = []
    for unit_path in sorted((DEPLOY / "systemd").glob("*")):
        found += unit_invocations(parse_unit(unit_path.read_text(), str(unit_path.relative_to(ROOT))))
    for cron_path in sorted((DEPLOY / "cron").glob("*")):
        rel = str(cron_path.relative_to(ROOT))
        _, entries, _, comments = parse_cron(cron_path.read_text(), rel)
        for entry in entries:
            found += invocations_in_shell(entry.command, f"{rel}:{entry.number}")
        for number, text in comments:
            found += quoted_commands(text, f"{rel}:{number} (comment)")
    for doc in load_k8s().values():
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if pod:
            found += [inv for _, inv, _ in pod_invocations(pod, doc["_path"])]
    for path in sorted(K8S.glob("*.y*ml")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "#" in line:
                found += quoted_commands(line.split("#", 1)[1], f"{path.relative_to(ROOT)}:{number} (comment)")
    text = CONTAINERFILE.read_text()
    found += containerfile_problems(text, "deploy/Containerfile")[1]
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            found += quoted_commands(line, f"deploy/Containerfile:{number} (comment)")
            m = re.match(r"#\s+((?:podman|docker|sudo|ipmasq|/\S+/ipmasq)\b.*)", line.strip())
            if m:
                found += invocations_in_shell(m.group(1), f"deploy/Containerfile:{number} (comment)")
    found += readme_invocations(README.read_text(), "deploy/README.md")
    return found


def readme_invocations(text: str, where: str) -> list[Invocation]:
    """Commands in fenced shell blocks (continuations joined) and in backticks."""
    found = []
    for block in re.findall(r"^```(?:sh|bash|shell|console)?\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"^\s*[$#]\s+", "", line)
            if line.strip() and not line.lstrip().startswith("#"):
                found += invocations_in_shell(line, f"{where} (code block)")
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return found + quoted_commands(prose, where)


INVOCATIONS = all_invocations()


# ============================================================== the tests


def test_every_file_in_deploy_is_checked():
    checked = {SERVICE, RECONCILE_SERVICE, TIMER, CRON, CONTAINERFILE, README, *K8S.glob("*.y*ml")}
    present = {p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert present - checked == set(), "files in deploy/ that no test parses: give them a checker"
    assert not (checked - present), f"expected files missing: {sorted(map(str, checked - present))}"


def test_there_are_command_lines_to_check():
    subcommands = {inv.argv[0] for inv in INVOCATIONS if inv.argv}
    assert {"watch", "reconcile", "flush"} <= subcommands, subcommands


@pytest.mark.parametrize("invocation", INVOCATIONS, ids=lambda inv: inv.where)
def test_command_line_uses_only_real_subcommands_and_options(invocation):
    assert check_invocation(invocation.argv) == [], invocation.where


def test_agent_service():
    assert service_problems(parse_unit(SERVICE.read_text(), "deploy/systemd/ipmasq-legacy.service")) == []


def test_reconcile_service_and_timer():
    assert reconcile_service_problems(parse_unit(RECONCILE_SERVICE.read_text(), RECONCILE_SERVICE.name)) == []
    assert timer_problems(parse_unit(TIMER.read_text(), TIMER.name), TIMER.parent) == []


def test_units_pass_systemd_analyze_verify(tmp_path):
    """systemd's own parser, where there is one: unknown keys, bad values, missing targets."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    script = Path(sys.executable).with_name("ipmasq")
    if not script.exists():
        pytest.skip("the ipmasq console script is not installed beside this python")
    for unit_path in (SERVICE, RECONCILE_SERVICE, TIMER):
        (tmp_path / unit_path.name).write_text(unit_path.read_text().replace(INSTALLED, str(script)))
    names = [f"./{p.name}" for p in (SERVICE, RECONCILE_SERVICE, TIMER)]
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    output = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                       if "ipmasq-legacy" in line)
    assert proc.returncode == 0 and not output, proc.stdout + proc.stderr


def test_cron_file():
    assert cron_problems(CRON.read_text(), "deploy/cron/ipmasq-legacy") == []


def test_cron_splay_is_a_random_number_of_seconds_below_a_minute():
    _, entries, _, _ = parse_cron(CRON.read_text(), CRON.name)
    expression = splay_expression(entries[0].command)
    assert expression, entries[0].command
    values = set()
    for _ in range(12):
        proc = subprocess.run(["sh", "-c", f"echo {expression}"], capture_output=True, text=True, check=True)
        values.add(int(proc.stdout))
    assert all(0 <= v < 60 for v in values), values
    assert len(values) > 1, f"the splay did not vary: {values}"


def test_kubernetes_manifests_parse():
    docs = load_k8s()
    kinds = {kind for kind, _ in docs}
    assert {"DaemonSet", "ConfigMap"} <= kinds, kinds
    for (kind, name), doc in docs.items():
        assert doc["metadata"].get("namespace"), f"{doc['_path']}: {kind} {name} has no namespace"


def test_daemonset(tmp_path):
    docs = load_k8s()
    daemonsets = [d for (kind, _), d in docs.items() if kind == "DaemonSet"]
    assert len(daemonsets) == 1
    assert daemonset_problems(daemonsets[0], docs, tmp_path) == []


def test_config_configmap_has_only_real_keys_and_loads(tmp_path):
    data = load_k8s()[("ConfigMap", "ipmasq-legacy")]["data"]
    assert list(data) == ["config.yaml"]
    assert config_keys_problems(data["config.yaml"], "ConfigMap ipmasq-legacy") == []
    masq = tmp_path / "ip-masq-agent"
    masq.write_text(load_k8s()[("ConfigMap", "ip-masq-agent")]["data"]["config"])
    cfg = load_config_text(data["config.yaml"], tmp_path, {"ip-masq-agent-config-path": str(masq)})
    assert cfg.enable_ip_masq_agent and cfg.masq_agent.source == str(masq)


def test_ip_masq_agent_configmap_loads(tmp_path):
    data = load_k8s()[("ConfigMap", "ip-masq-agent")]["data"]
    assert list(data) == ["config"], "ip-masq-agent reads the key `config`"
    path = tmp_path / "ip-masq-agent"
    path.write_text(data["config"])
    masq = config.load_masq_agent(str(path))
    assert masq.non_masquerade_cidrs and masq.resync_interval == 60.0
    assert set(yaml.safe_load(data["config"])) <= set(config.MASQ_AGENT_KEYS)


def test_containerfile():
    problems, _ = containerfile_problems(CONTAINERFILE.read_text(), "deploy/Containerfile")
    assert problems == []


def test_one_metrics_port_everywhere():
    ports = {}
    for inv in INVOCATIONS:
        params, _ = parse_invocation(inv.argv)
        if params and params.get("metrics_port") is not None:
            ports[inv.where] = params["metrics_port"]
    assert len(set(ports.values())) == 1, ports
    port = next(iter(ports.values()))
    assert f"EXPOSE {port}" in CONTAINERFILE.read_text()


def test_host_files_agree_on_where_ipmasq_is_installed():
    for inv_where in (SERVICE, RECONCILE_SERVICE):
        unit = parse_unit(inv_where.read_text(), inv_where.name)
        assert exec_argv(unit.value("Service", "ExecStart"))[0] == INSTALLED
    _, entries, _, _ = parse_cron(CRON.read_text(), CRON.name)
    assert all(INSTALLED in e.command for e in entries)
    assert INSTALLED in README.read_text()


# ============================================================== the checkers can fail


@pytest.mark.parametrize("argv, expected", [
    (["reconcile", "--no-such-option", "1"], "no-such-option"),
    (["frobnicate"], "no subcommand 'frobnicate'"),
    (["reconcile", "--egress-masquerade-interface", "eth+"], "egress-masquerade-interface"),  # missing s
    (["apply", "--enable-ip-masq-agent", "maybe"], "expected true or false"),
    (["apply", "--ipv4-native-routing-cidr", "10.0.0.1/8"], "host bits"),
    (["apply", "--backend", "pf"], "not one of"),
    (["reconcile", "--lock-timeout", "soon"], "soon"),
    (["watch", "--metrics-port", "http"], "http"),
    (["watch", "--log-format", "xml"], "xml"),
    (["reconcile", "extra"], "extra"),
    (["--verbose"], "not an option"),
])
def test_checker_flags_wrong_command_lines(argv, expected):
    problems = check_invocation(argv)
    assert problems and expected in problems[0], problems


def test_checker_passes_right_command_lines():
    assert check_invocation(["reconcile", "--lock-timeout", "8", "--enable-ip-masq-agent", "true"]) == []
    assert check_invocation(["--version"]) == []


def test_unit_checker_finds_wrong_lines():
    sample = (
        "[Unit]\nAfter=network-online.target\n"
        "[Service]\nType=notify\n"
        "ExecStart=/usr/local/bin/ipmasq watch --metrics-prot 9847\n"
        "# then `ipmasq reconcile --lock-timout 5`\n"
        "ExecReload=/bin/kill -TERM $MAINPID\n"
        "ProtectSystem=strict\nRuntimeDirectory=ipmasq-legacy\n"
    )
    unit = parse_unit(sample, "sample.service")
    wrong = [p for inv in unit_invocations(unit) for p in check_invocation(inv.argv)]
    assert any("metrics-prot" in p for p in wrong) and any("lock-timout" in p for p in wrong), wrong
    problems = service_problems(unit)
    for expected in ("Type=", "SIGHUP", "Restart=", "xtables.lock", "RuntimeDirectoryPreserve"):
        assert any(expected in p for p in problems), (expected, problems)
    assert parse_unit("ExecStart=/bin/true\n[Service\n", "x").problems


def test_timer_checker_wants_a_splay(tmp_path):
    (tmp_path / "x.service").write_text("[Service]\n")
    assert any("RandomizedDelaySec" in p for p in timer_problems(
        parse_unit("[Timer]\nOnCalendar=minutely\nPersistent=true\n[Install]\nWantedBy=timers.target\n", "x.timer"),
        tmp_path))
    assert timer_problems(parse_unit("[Timer]\nOnCalendar=minutely\nRandomizedDelaySec=1min\nPersistent=true\n"
                                     "[Install]\nWantedBy=timers.target\n", "x.timer"), tmp_path) == []
    assert timespan("1min 30s") == 90 and timespan("45") == 45


def test_cron_checker_finds_wrong_lines():
    bare_percent = "* * * * * root sleep $(( $(od -An -N2 -tu2 /dev/urandom) % 50 )) && ipmasq reconcile\n"
    assert any("bare %" in p for p in cron_problems(bare_percent, "ipmasq-legacy"))
    no_user = "* * * * * ipmasq reconcile\n"
    assert any("user" in p or "5 time fields" in p for p in cron_problems(no_user, "ipmasq-legacy"))
    no_splay = "* * * * * root /usr/local/bin/ipmasq reconcile\n"
    assert any("splay" in p for p in cron_problems(no_splay, "ipmasq-legacy"))
    bashism = "* * * * * root sleep $((RANDOM \\% 50)); ipmasq reconcile\n"
    assert cron_problems(bashism, "ipmasq-legacy")
    assert any("newline" in p for p in cron_problems(no_splay.rstrip("\n"), "ipmasq-legacy"))
    assert any("names" in p for p in cron_problems(no_splay, "ipmasq-legacy.cron"))
    wrong_option = "* * * * * root ipmasq reconcile --lock-timeout 8 --quiet 2>&1 | logger\n"
    invs = invocations_in_shell(parse_cron(wrong_option)[1][0].command, "x")
    assert invs[0].argv == ["reconcile", "--lock-timeout", "8", "--quiet"]
    assert any("--quiet" in p for p in check_invocation(invs[0].argv))


@pytest.mark.parametrize("mutation, expected", [
    (lambda pod, c: pod.pop("hostNetwork"), "hostNetwork"),
    (lambda pod, c: c["securityContext"]["capabilities"].update(add=["NET_RAW"]), "NET_ADMIN"),
    (lambda pod, c: c["livenessProbe"]["httpGet"].update(port=9999), "livenessProbe probes port"),
    (lambda pod, c: c.pop("livenessProbe"), "no livenessProbe"),
    (lambda pod, c: [v for v in pod["volumes"] if v["name"] == "ip-masq-agent"][0]["configMap"]["items"][0]
     .update(path="config"), "ip-masq-agent"),
    (lambda pod, c: [m for m in c["volumeMounts"] if m["name"] == "config"][0].update(subPath="config.yaml"),
     "subPath"),
    (lambda pod, c: c["volumeMounts"].__setitem__(slice(None), [m for m in c["volumeMounts"]
                                                                if m["mountPath"] != "/run/xtables.lock"]),
     "xtables.lock"),
    (lambda pod, c: c["volumeMounts"].__setitem__(slice(None), [m for m in c["volumeMounts"]
                                                                if m["mountPath"] != "/sys/fs/bpf"]),
     "/sys/fs/bpf"),
    (lambda pod, c: c["args"].extend(["--metrics-portt", "1"]), "metrics-portt"),
    (lambda pod, c: c["args"].extend(["--log-format", "$(LOG_FORMAT)"]), "LOG_FORMAT"),
])
def test_daemonset_checker_finds_wrong_manifests(tmp_path, mutation, expected):
    docs = load_k8s()
    ds = copy.deepcopy(next(d for (kind, _), d in docs.items() if kind == "DaemonSet"))
    pod = ds["spec"]["template"]["spec"]
    mutation(pod, pod["containers"][0])
    problems = daemonset_problems(ds, docs, tmp_path)
    assert any(expected in p for p in problems), problems


def test_configmap_checker_finds_wrong_keys(tmp_path):
    text = "egress-masquerade-interface: eth+\n# ipv4-native-routing-cidrs: 10.0.0.0/8\n# ipv4-pod-cidr: 10.0.0.1/8\n"
    problems = config_keys_problems(text, "sample")
    assert any("egress-masquerade-interface'" in p for p in problems)
    assert any("ipv4-native-routing-cidrs" in p for p in problems)
    assert any("host bits" in p for p in problems)
    with pytest.raises(ConfigError):
        load_config_text("egress-masquerade-interface: eth+\n", tmp_path)


def test_containerfile_checker_finds_wrong_lines():
    sample = ('FROM docker.io/library/debian:bookworm-slim\n'
              'RUN apt-get install -y iptables python3\n'
              'COPY no-such-dir /src\n'
              'ENTRYPOINT ipmasq\n'
              'CMD ["watch", "--bogus"]\n')
    problems, invocations = containerfile_problems(sample)
    assert any("exec form" in p for p in problems)
    assert any("nftables" in p for p in problems)
    assert any("no-such-dir" in p for p in problems)
    sample = sample.replace("ENTRYPOINT ipmasq", 'ENTRYPOINT ["/opt/venv/bin/ipmasq"]')
    problems, invocations = containerfile_problems(sample)
    assert any("--bogus" in p for inv in invocations for p in check_invocation(inv.argv))


def test_readme_extraction_finds_commands():
    text = "Run `ipmasq flush --lock-timeout 3`.\n\n```sh\nsudo ipmasq reconcile \\\n  --log-level warning\n```\n"
    argvs = [inv.argv for inv in readme_invocations(text, "x")]
    assert ["reconcile", "--log-level", "warning"] in argvs and ["flush", "--lock-timeout", "3"] in argvs
