"""`ipmasq watch`: the long-running agent.

Applies on start; re-applies when the config or the ip-masq-agent file changes (inotify
on their directories, so a rename-save and a Kubernetes ConfigMap update, an atomic swap
of the `..data` symlink, are both seen); follows the node's links and addresses
(rtnetlink events: the ebpf datapath attaches to a new link and takes a new address at
once, Backend.follow); re-reads and reconciles every resyncInterval; SIGHUP reloads; SIGTERM and SIGINT exit leaving the rules in place (unless
--flush-on-exit). A bad edit keeps the last good config live and logs why.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from pathlib import Path
from typing import Callable

from inotify_simple import INotify
from inotify_simple import flags as F

from . import agent, backends, lock, state
from .config import Config, agent_file, parse_duration
from .errors import ConfigError, IpmasqError, LockTimeout
from .ruledata import DEFAULTS

log = logging.getLogger("ipmasq")

DEBOUNCE = 0.1  # seconds: one reload for the burst of events an editor or kubelet makes
WATCH_MASK = F.CLOSE_WRITE | F.MOVED_TO | F.CREATE | F.DELETE | F.MOVED_FROM | F.ATTRIB


def resync_interval(cfg: Config) -> float:
    if cfg.enable_ip_masq_agent and cfg.masq_agent is not None:
        return cfg.masq_agent.resync_interval
    return parse_duration(DEFAULTS["resync_interval"], "resync_interval")


def watched_files(config_path: str | None, cfg: Config | None) -> list[Path]:
    """The files whose change means a re-apply; their directories are watched. A config
    directory (a cilium-config ConfigMap mounted whole) is given as DIR/..data: the
    kubelet's swap of that link is an update, and any other file in DIR is a key."""
    path = Path(config_path) if config_path else Path(os.environ.get("IPMASQ_CONFIG") or DEFAULTS["config_path"])
    files = [path / "..data" if path.is_dir() else path]
    if cfg is not None and cfg.enable_ip_masq_agent and not cfg.ip_masq_agent_inline:
        files.append(agent_file(cfg.ip_masq_agent_config_path))
    return files


class NodeEvents:
    """rtnetlink's link and address groups, through pyroute2 (the project's netlink
    library; the agent runs long, so its import cost does not matter here)."""

    def __init__(self):
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK

        self.ipr = IPRoute()
        self.ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)

    def fileno(self) -> int:
        return self.ipr.fileno()

    def drain(self) -> int:
        """Read every pending event; returns how many. An overrun (ENOBUFS) counts as
        one: whatever was lost, the follow that comes reads the node whole."""
        count = 0
        while select.select([self.ipr.fileno()], [], [], 0)[0]:
            try:
                count += len(self.ipr.get()) or 1
            except OSError:
                count += 1
        return count

    def close(self) -> None:
        self.ipr.close()


NFNLGRP_NFTABLES = 7  # nf_tables' notification group: every commit, whoever makes it
LEGACY_POLL = 0.5  # seconds: iptables-legacy announces nothing; its fingerprint is looked at (README)


class RulesetEvents:
    """nf_tables' notifications: every commit of nftables and of iptables-nft (ours, a
    firewalld reload that flushed everything, a hand's `nft delete table`), so that what
    removed our rules is answered within a second, not at the next resync. None where
    nf_tables cannot be subscribed to."""

    def __init__(self):
        self.sock: socket.socket | None = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
        try:
            self.sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            self.sock = None

    def fileno(self) -> int | None:
        return self.sock.fileno() if self.sock is not None else None

    def drain(self) -> int:
        count = 0
        while self.sock is not None:
            try:
                self.sock.recv(1 << 16)
                count += 1
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: events were lost; something changed
                count += 1
        return count

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


class Watcher:
    def __init__(self, load: Callable[[], Config], config_path: str | None, lock_timeout: float,
                 flush_on_exit: bool = False, on_sync: Callable | None = None):
        self.load = load
        self.config_path = config_path
        self.lock_timeout = lock_timeout
        self.flush_on_exit = flush_on_exit
        self.on_sync = on_sync or (lambda result: None)
        self.stopping = False
        self.reload_requested = False
        self.inotify = INotify()
        self.watches: dict[int, Path] = {}
        self.cfg: Config | None = None
        self.synced: agent.SyncResult | None = None  # the last sync: its backend and plan

    # -- signals: the handlers only set flags; a wakeup pipe interrupts select()

    def _install_signals(self) -> int:
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        return r

    def _on_stop(self, signum, frame):
        self.stopping = True

    def _on_hup(self, signum, frame):
        self.reload_requested = True

    # -- inotify on the directories holding our files

    def _rewatch(self) -> None:
        for wd in list(self.watches):
            try:
                self.inotify.rm_watch(wd)
            except OSError:
                pass
        self.watches.clear()
        for path in watched_files(self.config_path, self.cfg):
            directory = path.parent
            if directory.is_dir() and directory not in self.watches.values():
                self.watches[self.inotify.add_watch(str(directory), WATCH_MASK)] = directory

    def _relevant(self, events) -> bool:
        files = watched_files(self.config_path, self.cfg)
        names = {p.name for p in files} | {"..data"}
        whole = {p.parent for p in files if p.name == "..data"}  # config directories: every file is a key
        return any(event.name in names or self.watches.get(event.wd) in whole for event in events)

    # -- one sync, under the node's lock

    def _sync(self, reason: str, only_if_drifted: bool) -> None:
        try:
            cfg = self.load()
        except ConfigError as exc:
            log.error("%s: config rejected, keeping the last good one live: %s", reason, exc)
            state.record_sync(ok=False)
            return
        try:
            with lock.held(self.lock_timeout):
                result = agent.sync(cfg, only_if_drifted=only_if_drifted)
        except LockTimeout as exc:
            log.warning("%s: %s; trying again at the next resync", reason, exc)
            return
        except IpmasqError as exc:
            log.error("%s: sync failed: %s", reason, exc)
            return
        config_changed = self.cfg is None or cfg != self.cfg
        self.cfg = cfg
        if result.plan is not None:
            self.synced = result
        if config_changed:
            self._rewatch()
        if result.changes:
            log.info("%s: %s: %s", reason, result.backend, "; ".join(result.changes))
        self.on_sync(result)

    def _follow(self) -> None:
        """A link or an address came or went: the backend last synced follows the node
        with the plan it applied (no config read, no plan built)."""
        if self.synced is None or self.synced.plan is None:
            return
        started = time.monotonic()
        try:
            with lock.held(self.lock_timeout):
                changes = backends.get(self.synced.backend).follow(self.synced.plan)
        except LockTimeout as exc:
            log.warning("links changed: %s; trying again at the next resync", exc)
            return
        except IpmasqError as exc:
            log.error("links changed: follow failed: %s", exc)
            return
        if changes:
            log.info("links changed: %s: %s (%.0f ms)", self.synced.backend, "; ".join(changes),
                     (time.monotonic() - started) * 1000)

    def _check_rules(self, reason: str, ruleset_events: RulesetEvents) -> None:
        """Something changed rulesets (or, for iptables-legacy, our fingerprint moved):
        repair what of ours drifted, then forget the events our own repair made."""
        started = time.monotonic()
        self._sync(reason, only_if_drifted=True)
        ruleset_events.drain()
        if self.synced is not None and self.synced.changes:
            log.info("%s: repaired in %.0f ms after the change was seen", reason, (time.monotonic() - started) * 1000)

    def _legacy_fingerprint(self) -> str | None:
        if self.synced is None or self.synced.backend != "iptables-legacy":
            return None
        try:
            return backends.get(self.synced.backend).fingerprint()
        except IpmasqError:
            return None

    def run(self) -> int:
        wake = self._install_signals()
        self.cfg = self.load()  # a bad config at start is exit 2, as for apply
        self._rewatch()
        node_events = NodeEvents()  # subscribed before the first sync: nothing in between is missed
        ruleset_events = RulesetEvents()
        self._sync("start", only_if_drifted=False)
        ruleset_events.drain()  # our own commits
        legacy_seen = self._legacy_fingerprint()
        next_poll = time.monotonic() + LEGACY_POLL
        next_resync = time.monotonic() + resync_interval(self.cfg)
        log.info("watching %s; resync every %gs", ", ".join(str(p) for p in watched_files(self.config_path, self.cfg)),
                 resync_interval(self.cfg))
        while not self.stopping:
            timeout = max(0.0, next_resync - time.monotonic())
            if legacy_seen is not None:
                timeout = min(timeout, max(0.0, next_poll - time.monotonic()))
            fds = [self.inotify.fd, wake, node_events.fileno()] + ([ruleset_events.fileno()]
                                                                  if ruleset_events.fileno() is not None else [])
            try:
                ready, _, _ = select.select(fds, [], [], timeout)
            except InterruptedError:
                ready = []
            if wake in ready:
                os.read(wake, 4096)
            if self.stopping:
                break
            if node_events.fileno() in ready:
                # at once, then again while events keep coming (a link, then its
                # address, then its route: each may matter)
                for _ in range(5):  # bounded: a follow that itself made events cannot spin
                    if not node_events.drain():
                        break
                    self._follow()
            if ruleset_events.fileno() is not None and ruleset_events.fileno() in ready:
                time.sleep(0.02)  # one check for a burst of commits (a firewalld reload makes many)
                ruleset_events.drain()
                self._check_rules("rulesets changed", ruleset_events)
            if legacy_seen is not None and time.monotonic() >= next_poll:
                now = self._legacy_fingerprint()
                if now != legacy_seen:
                    self._check_rules("iptables-legacy rules changed", ruleset_events)
                    now = self._legacy_fingerprint()
                legacy_seen, next_poll = now, time.monotonic() + LEGACY_POLL
            if self.inotify.fd in ready:
                events = self.inotify.read(timeout=0)
                time.sleep(DEBOUNCE)
                events += self.inotify.read(timeout=0)
                if self._relevant(events):
                    self._sync("config changed", only_if_drifted=False)
                    ruleset_events.drain()
                    legacy_seen = self._legacy_fingerprint()
                    continue
            if self.reload_requested:
                self.reload_requested = False
                self._sync("SIGHUP", only_if_drifted=False)
            elif time.monotonic() >= next_resync:
                self._rewatch()  # a directory that did not exist yet (a late ConfigMap mount) may now
                self._sync("resync", only_if_drifted=True)
                next_resync = time.monotonic() + resync_interval(self.cfg)
        node_events.close()
        ruleset_events.close()
        if self.flush_on_exit:
            with lock.held(self.lock_timeout):
                removed = agent.flush()
            log.info("exit: flushed %s", ", ".join(removed) or "nothing")
        else:
            log.info("exit: rules left in place")
        return 0
