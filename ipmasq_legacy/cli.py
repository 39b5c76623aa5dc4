"""The `ipmasq` command line: thin glue over config -> plan -> backend.

Exit codes (docs/spec.md section 5): 0 success, 1 change not made, 2 bad usage or config,
3 lock not had in time. A user error is one line on stderr.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import re
import sys
import traceback

import click

from . import __version__, backends, config, inputs, links, lock, logs, source, state
from . import plan as planmod
from .errors import ApplyError, ConfigError, IpmasqError

log = logging.getLogger("ipmasq")

OUTPUT = click.Choice(["text", "json"])


CONFIG_OPTION_KEYS = list(config.KEYS) + list(config.CLI_ALIASES)


def key_options(func):
    """One option per config key, named as in the file (`--egress-masquerade-interfaces`)."""
    for key in reversed(CONFIG_OPTION_KEYS):
        func = click.option(f"--{key}", key.replace("-", "_"), metavar="VALUE", default=None,
                            help=f"Config key '{key}'.")(func)
    func = click.option("--backend", metavar="NAME",
                        help=f"Datapath: {', '.join(config.DATAPATHS)} (key 'datapath').")(func)
    return click.option("--config", "config_path", metavar="FILE",
                        help=f"Config file (default: $IPMASQ_CONFIG or {config.DEFAULTS['config_path']}).")(func)


def options_of(kwargs: dict) -> dict:
    """Pop the key options out of a command's kwargs: {key: value} for those given."""
    options = {}
    for key in CONFIG_OPTION_KEYS:
        value = kwargs.pop(key.replace("-", "_"), None)
        if value is not None:
            options[key] = value
    backend = kwargs.pop("backend", None)
    if backend is not None:
        # --backend is the command line's name for --datapath: both given, they must agree
        if options.get("datapath", backend) != backend:
            raise ConfigError(f"--backend {inputs.show(backend)} contradicts --datapath {inputs.show(options['datapath'])} "
                              "(both set key 'datapath'): give one")
        options["datapath"] = backend
    return options


def config_options(func):
    """--config, --backend and the key options, loaded into `cfg` (option > file > default)."""

    @functools.wraps(func)
    def wrapper(*args, config_path=None, **kwargs):
        cfg = config.load(config_path, options_of(kwargs))
        return func(*args, cfg=cfg, **kwargs)

    return key_options(wrapper)


class Seconds(click.ParamType):
    """A finite, non-negative number of seconds: nan would wait forever, inf too."""

    name = "seconds"

    def convert(self, value, param, ctx):
        try:
            return inputs.seconds(value, "")
        except IpmasqError:
            self.fail(f"{inputs.show(value)} is not a finite, non-negative number of seconds", param, ctx)


class Address(click.ParamType):
    """An IPv4 or IPv6 address to listen on."""

    name = "address"

    def convert(self, value, param, ctx):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            self.fail(f"{inputs.show(value)} is not an IPv4 or IPv6 address", param, ctx)


class Port(click.ParamType):
    """0-65535 (click's IntRange would hand 5,000 digits to int(), which refuses them with a ValueError)."""

    name = "port"

    def convert(self, value, param, ctx):
        text = str(value).strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535):
            self.fail(f"{inputs.show(value)} is not a port (0-65535)", param, ctx)
        return int(text)


def bounded_message(exc: click.ClickException) -> str:
    """click's message for a usage error, with every quoted value cut to ~80 characters."""
    text = re.sub(r"'([^'\n]{80,})'|\"([^\"\n]{80,})\"",
                  lambda m: inputs.show((m.group(1) or m.group(2))[:77] + "..."), exc.format_message())
    return inputs.cut(text, 400)


def lock_option(func):
    return click.option("--lock-timeout", type=Seconds(), default=30.0, show_default=True, metavar="SECONDS",
                        help="How long to wait for another ipmasq to finish.")(func)


def output_option(func):
    return click.option("--output", "-o", type=OUTPUT, default="text", show_default=True)(func)


def _emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ipmasq")
def cli():
    """Masquerade (source NAT) of pod and container traffic leaving this node."""
    inputs.check_environment()


@cli.command("plan")
@config_options
@output_option
def plan_cmd(cfg, output):
    """Print what `apply` would install, in the backend's own syntax (no root, no change)."""
    backend, why = backends.resolve(cfg.datapath, probe=False)
    the_plan = planmod.build(cfg)
    text = backend.render(the_plan)
    if output == "json":
        _emit_json({"backend": backend.name, "why": why, "plan": the_plan.to_dict(), "render": text})
    else:
        click.echo(f"# backend: {backend.name} ({why}); config: {cfg.source}")
        click.echo(text, nl=False)


def log_options(func):
    func = click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
                        help="Log lines on stderr: readable, or one JSON object each.")(func)
    return click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
                        show_default=True)(func)


def _metrics_file(ctx, param, value):
    """Checked before anything changes: its directory must exist and take a new file."""
    if value is None:
        return None
    path = os.path.abspath(value)
    directory = os.path.dirname(path)
    try:
        kind, dir_kind = inputs.path_kind(path, "path"), inputs.path_kind(directory, "directory")
    except IpmasqError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    if kind == "dir":
        raise click.BadParameter(f"{inputs.show_path(value)} is a directory", ctx, param)
    if dir_kind != "dir":
        raise click.BadParameter(f"directory {inputs.show_path(directory)} does not exist", ctx, param)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise click.BadParameter(f"directory {inputs.show_path(directory)} is not writable", ctx, param)
    return value


def metrics_file_option(func):
    return click.option("--metrics-file", metavar="PATH", callback=_metrics_file,
                        help="Write Prometheus metrics here (atomically), for node_exporter's textfile collector.")(func)


def _write_metrics(path, collector) -> None:
    """After a sync: a file that cannot be written now is a warning, not a failed sync."""
    from . import metrics

    try:
        metrics.write_file(path, collector)
    except OSError as exc:
        log.warning("metrics file %s not written: %s", inputs.show_path(path), exc.strerror or exc)


def _synced(lock_timeout, metrics_file, run):
    """Run one sync under the node's lock; write the metrics file after it, also after a failure."""
    from . import metrics

    collector = metrics.Collector()
    try:
        with lock.held(lock_timeout):
            result = run()
        collector.observe(result)
        return result
    finally:
        if metrics_file:  # the error count and the stale timestamp are news too
            _write_metrics(metrics_file, collector)


@cli.command()
@key_options
@lock_option
@metrics_file_option
@log_options
@click.option("--take-over", "take_over", multiple=True, metavar="NAME",
              help="Also remove another manager's masquerading once ours is live: ip-masq-agent "
                   "(its chain IP-MASQ-AGENT or IP-MASQ and its jump, every iptables variant and family).")
def apply(config_path, lock_timeout, metrics_file, log_format, log_level, take_over, **kwargs):
    """Install the config atomically; print one line saying what changed.

    Records where the config came from, for reconcile, status, list and watch."""
    from . import agent, others

    logs.setup(log_format, log_level)
    inputs.need_net_admin("apply")
    src = source.for_apply(config_path, options_of(kwargs))
    cfg = src.load()

    def sync_and_take_over():
        others.check_take_over(take_over)  # refused before anything changes
        result = agent.sync(cfg)
        for name in take_over:  # ours is live first: no moment without masquerading
            removed = others.take_over(name)
            result.changes.append(f"took over {name} (" + (", ".join(removed) or "nothing of it found") + ")")
        return result

    result = _synced(lock_timeout, metrics_file, sync_and_take_over)
    source.record(src, cfg)
    click.echo(f"{result.backend}: " + ("; ".join(result.changes) if result.changes else "unchanged"))


@cli.command()
@key_options
@lock_option
@metrics_file_option
@log_options
def reconcile(config_path, lock_timeout, metrics_file, log_format, log_level, **kwargs):
    """For cron: repair drift from the config; silent when nothing drifted.

    Without --config, repairs toward the config the last apply installed (one line when a
    different one is given). Reads only what the tool owns; each repair is one log line
    naming what drifted. When the config files and the backend's fingerprint of the kernel state are unchanged
    since the last reconcile that found everything in sync, it parses nothing."""
    from . import agent

    logs.setup(log_format, log_level)
    inputs.need_net_admin("reconcile")
    src = source.for_follow(config_path, options_of(kwargs))
    if src.note:
        src.load()  # a bad config is the one line, not this note and then it (only here: cron's run has no note)
        log.warning("%s", src.note)
    result = _synced(lock_timeout, metrics_file,
                     lambda: agent.reconcile(src.path, src.options, missing_ok=src.missing_ok))
    if result is not None and (result.changes or result.drift):
        from . import others

        for f in others.find():  # with a repair: the others may be why
            log.warning("masquerading by others beside ours: %s", f.text())
    if not src.recorded and result is not None and result.changes:
        source.record(src, None)  # it installed what nothing recorded: later runs follow it


@cli.command()
@lock_option
def flush(lock_timeout):
    """Remove everything ipmasq-legacy owns, in every backend."""
    from . import agent

    inputs.need_net_admin("flush")
    with lock.held(lock_timeout):
        removed = agent.flush()
    click.echo("removed " + ", ".join(removed) if removed else "nothing to remove")
    from . import others

    for f in others.find():  # never touched: said, so nobody takes the node for unmasqueraded
        log.warning("left in place: masquerading by others: %s", f.text())


@cli.command()
@key_options
@lock_option
@click.option("--metrics-port", type=Port(), help="Serve /metrics and /healthz on this port.")
@click.option("--metrics-address", type=Address(), default="0.0.0.0", show_default=True,
              help="Address for --metrics-port (IPv4 or IPv6).")
@metrics_file_option
@click.option("--flush-on-exit", is_flag=True, help="Remove the rules on SIGTERM instead of leaving them.")
@log_options
@click.pass_context
def watch(ctx, config_path, lock_timeout, metrics_port, metrics_address, metrics_file, flush_on_exit,
          log_format, log_level, **kwargs):
    """Long-running agent: apply, then follow config changes and resync.

    Re-applies within a second of a change to the config or the ip-masq-agent file
    (including a ConfigMap update); resyncs every resyncInterval; SIGHUP reloads;
    SIGTERM leaves the rules in place."""
    from . import metrics
    from .watch import Watcher, resync_interval

    logs.setup(log_format, log_level)
    inputs.need_net_admin("watch")
    src = source.for_follow(config_path, options_of(kwargs))  # without --config: what apply installed
    loaded = []

    def load():
        loaded[:] = [src.load()]
        return loaded[0]

    first = load()  # bad config at start: exit 2 before anything runs
    if src.note:
        log.warning("%s", src.note)
    collector = metrics.Collector()
    server = None
    if metrics_port is not None:
        max_age = max(3 * resync_interval(first), 60.0)
        try:  # before anything changes: a port taken or an address not ours is bad usage
            server = metrics.Server(metrics_address, metrics_port, collector, max_age)
        except OSError as exc:
            raise ConfigError(f"--metrics-address {metrics_address} --metrics-port {metrics_port}: cannot listen: "
                              f"{exc.strerror or exc}") from None
        logging.getLogger("ipmasq").info("metrics on http://%s:%d/metrics", metrics_address, server.port)

    def on_sync(result):
        source.record(src, loaded[0] if loaded else None)  # watch applies: what it installed is the record
        collector.observe(result)
        if metrics_file:
            _write_metrics(metrics_file, collector)

    try:
        code = Watcher(load, src.path, lock_timeout, flush_on_exit, on_sync).run()
    finally:
        if server:
            server.close()
    ctx.exit(code)


def _installed_backend(cfg, live_engines: list[str] | None = None):
    recorded = state.read().get("backend")
    if recorded:
        return backends.get(recorded)
    if cfg is None:  # no config to ask: the engine the kernel holds, if any
        return backends.get(live_engines[0]) if live_engines else None
    return backends.resolve(cfg.datapath, live=live_engines)[0]


def _status_source(config_path, options, deep: bool):
    """(source, cfg, plan, why not) for status: the config the last apply installed unless
    one is given; when none can be known, the live state is still shown. Unless `deep`,
    cfg and plan as the last verifying reconcile made them while the inputs are unchanged
    (agent.cached_config: cfg is then an agent.ConfigSummary)."""
    from . import agent

    try:
        src = source.for_follow(config_path, options)
    except source.SourceUnknown as exc:
        return None, None, None, str(exc)
    cached = None if deep else agent.cached_config(src.path, src.options)
    if cached is not None:
        return src, cached[0], cached[1], None
    cfg = src.load()
    return src, agent.summary(cfg), planmod.build(cfg), None


@cli.command()
@key_options
@output_option
@click.option("--deep", is_flag=True,
              help="Read back everything installed (the exempt sets' members too) even when the last reconcile "
                   "verified it and nothing changed since.")
def status(config_path, output, deep, **kwargs):
    """Backend in use, matched interfaces, exempt prefixes, counters, in sync or drifted.

    Without --config, against the config the last apply installed. When the config files
    and the backend's fingerprint of the kernel state are unchanged since the last
    reconcile that verified everything (reconcile's quick path), that verdict is trusted
    and only the counters are read; --deep reads and compares everything."""
    from . import snat

    inputs.need_net_admin("status", "to read the rules")  # never "none installed" for want of a look
    src, cfg, the_plan, unknown = _status_source(config_path, options_of(kwargs), deep)
    ours = backends.engines.live_engines()  # asked of the kernel: state.json may be gone
    backend = _installed_backend(cfg, ours) or backends.resolve("auto", probe=False, live=ours)[0]
    # every other engine of ours the kernel holds is drift (reconcile removes it)
    drift = backends.engines.second_engines(ours, backend.name)
    if the_plan is not None and not deep and _verified(src, backend.name, ours):
        # in sync as verified: what is installed is the plan; its counters are read
        installed = bool(the_plan.families)
        # a family's exempt prefixes are normalised, so in address order, and IPv4 comes first
        exempt = [p for f in the_plan.families for p in f.exempt]
        counters = backend.counters(the_plan)
    else:
        live = backend.live()
        drift += backend.drift(the_plan, live) if the_plan is not None else [f"config source unknown: {unknown}"]
        installed = live.installed
        exempt = planmod.sort_prefixes(p for f in live.families.values() for p in f.exempt)
        counters = [c for f in live.families.values() for c in f.counters]
    if the_plan is not None:
        drift += snat.missing(snat.pairs(the_plan))
    patterns = list(the_plan.interfaces) if the_plan is not None else []
    matched = links.matching(the_plan.interfaces) if the_plan is not None else []
    warnings = [w.text for w in cfg.warnings] if cfg is not None else []
    from . import others

    foreign = others.find()
    if output == "json":
        _emit_json({
            "backend": backend.name,
            "installed": installed,
            "engines": ours,
            "interfaces": matched,
            "interface_patterns": patterns,
            "exempt": exempt,
            "in_sync": not drift,
            "drift": drift,
            "counters": [vars(c) for c in counters],
            "config": None if src is None else {
                "path": src.path, "options": src.options, "shape": cfg.shape, "source": cfg.source,
                "ip_masq_agent": cfg.ip_masq_agent, "recorded": src.recorded or None, "note": src.note},
            "warnings": warnings,
            "others": [vars(f) for f in foreign],
        })
        return
    shown = f"{exempt[0]} (+{len(exempt) - 1} more)" if len(exempt) > 1 else (exempt[0] if exempt else "none")
    if not installed:
        click.echo(f"Masquerading: none installed (config wants {backend.name})")
    else:
        click.echo(f"Masquerading: {backend.name} [{', '.join(matched)}] exempt: {shown}")
    totals: dict = {}
    for c in counters:
        key = (c.family, c.interface or "(any but lo)")
        packets, nbytes = totals.get(key, (0, 0))
        totals[key] = (packets + c.packets, nbytes + c.bytes)
    for (family, interface), (packets, nbytes) in sorted(totals.items()):
        click.echo(f"  masqueraded ipv{family} via {interface}: {packets} packets, {nbytes} bytes")
    if src is not None:
        agent = cfg.ip_masq_agent
        click.echo(f"Config: {source.describe(src.path, src.options)} ({config.SHAPES[cfg.shape]}"
                   + (f"; ip-masq-agent: {agent}" if agent else "") + ")")
        if src.note:
            click.echo(f"  {src.note}")
    for text in warnings:
        click.echo(f"Warning: {text}")
    for f in foreign:
        click.echo(f"Masquerading by others: {f.text()}")
    click.echo("State: in sync" if not drift else "State: drifted: " + "; ".join(drift))


def _verified(src, backend: str, live_engines: list[str]) -> bool:
    """Whether the last reconcile's verdict (in sync) still holds for `src` and `backend`:
    its inputs and the backend's fingerprint unchanged since (agent's quick path)."""
    from . import agent

    return live_engines == [backend] and agent.unchanged_since_verified(src.path, src.options, live_engines)


@cli.command("list")
@key_options
@output_option
def list_cmd(config_path, output, **kwargs):
    """The exempt prefixes in effect (as `cilium bpf ipmasq list` prints them)."""
    inputs.need_net_admin("list", "to read the rules")  # never "No entries found." for want of a look
    options = options_of(kwargs)
    recorded = state.read().get("backend")
    backend = backends.get(recorded) if recorded else _installed_backend(None, backends.engines.live_engines())
    if backend is None:  # nothing of ours live: the backend the config would use
        cfg = source.for_follow(config_path, options).load()
        backend = _installed_backend(cfg, [])
    live = backend.live()
    exempt = planmod.sort_prefixes(p for f in live.families.values() for p in f.exempt)
    if output == "json":
        _emit_json({"exempt": exempt})
    elif not exempt:
        click.echo("No entries found.")
    else:
        click.echo("IP PREFIX/ADDRESS")
        for prefix in exempt:
            click.echo(prefix)


@cli.command()
@output_option
def doctor(output):
    """Which backends this node can run, and why not; what `auto` would pick."""
    from . import doctor as doctormod

    data = doctormod.report()
    if output == "json":
        _emit_json(data)
    else:
        click.echo(doctormod.render_text(data))


@cli.command()
@click.option("--backend", "names", multiple=True, type=click.Choice(backends.NAMES),
              help="Backend to prove (repeatable); default: every netfilter backend.")
@click.option("--ipv6/--no-ipv6", default=True, show_default=True, help="Also prove IPv6.")
def selftest(names, ipv6):
    """Prove masquerading with real packets in throw-away network namespaces."""
    from . import selftest as selftestmod

    if os.geteuid() != 0:
        raise ApplyError("selftest needs root (it builds network namespaces)")
    rows = selftestmod.run(list(names) or list(backends.NAMES), ipv6=ipv6)
    click.echo(selftestmod.render(rows))
    if not all(r.ok for r in rows):
        raise click.exceptions.Exit(1)


def main() -> None:
    try:
        # without standalone mode, click returns the code of an Exit instead of raising it
        code = cli.main(prog_name="ipmasq", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("ipmasq: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        click.echo(f"ipmasq: {bounded_message(exc)}", err=True)
        sys.exit(2)
    except IpmasqError as exc:
        click.echo(f"ipmasq: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: one line for the operator, the traceback on request
        if os.environ.get("IPMASQ_DEBUG"):
            traceback.print_exc()
        click.echo(f"ipmasq: internal error: {type(exc).__name__}: {exc} (set IPMASQ_DEBUG=1 for details)",
                   err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
