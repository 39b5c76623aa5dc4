"""Prometheus metrics, with the official client: a textfile for node_exporter (cron)
or an HTTP endpoint with /metrics and /healthz (watch).

Packet and byte counts are read from the backend's own rule counters when scraped
(Backend.counters: our masquerade rules' counters alone, never the exempt set's
members); the exempt prefix count is the one the last sync recorded (state.json).
The client and the HTTP server are imported when first used, not with this module.
"""

from __future__ import annotations

import logging
import time

from . import backends, state

log = logging.getLogger("ipmasq")


class Collector:
    """Everything is read at collect time: the sync history, the last result, the live counters."""

    def __init__(self):
        self.last = None  # agent.SyncResult of the last successful sync in this process
        self.last_success = 0.0  # and when it ended (time.time())

    def observe(self, result) -> None:
        """A successful sync; `result` None when reconcile found nothing changed."""
        self.last = result or self.last
        self.last_success = time.time()

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        history = state.read_history()
        recorded = state.read().get("backend")
        ts = GaugeMetricFamily("ipmasq_last_sync_success_timestamp_seconds",
                               "Unix time of the last sync that succeeded")
        ts.add_metric([], history.get("last_success", 0))
        yield ts
        errors = CounterMetricFamily("ipmasq_sync_errors", "Syncs that failed")
        errors.add_metric([], history.get("errors", 0))
        yield errors
        repairs = CounterMetricFamily("ipmasq_drift_repairs", "Drift found and repaired, by kind", labels=["kind"])
        for kind, count in sorted(history.get("repairs", {}).items()):
            repairs.add_metric([kind], count)
        yield repairs
        warnings = GaugeMetricFamily("ipmasq_config_warnings",
                                     "Warnings about the config the last sync read (unknown or ignored keys, "
                                     "differences from ip-masq-agent and Cilium), by kind", labels=["kind"])
        from .config import WARNING_KINDS

        kinds = dict.fromkeys(WARNING_KINDS, 0)  # every kind, 0 too: `> 0` alerts need the series
        for kind, _text in state.read_warnings():
            kinds[kind] = kinds.get(kind, 0) + 1
        for kind, count in sorted(kinds.items()):
            warnings.add_metric([kind], count)
        yield warnings
        info = GaugeMetricFamily("ipmasq_backend_info", "The backend in use", labels=["backend"])
        if recorded:
            info.add_metric([recorded], 1)
        yield info
        if self.last is not None:
            duration = GaugeMetricFamily("ipmasq_apply_duration_seconds", "How long the last sync took")
            duration.add_metric([], self.last.duration)
            yield duration
        if not recorded:
            return
        try:
            counters = backends.get(recorded).counters()
        except Exception as exc:  # a scrape must not die with the backend
            log.warning("metrics: cannot read %s counters: %s", recorded, exc)
            return
        prefixes = GaugeMetricFamily("ipmasq_exempt_prefixes", "Exempt prefixes installed", labels=["family"])
        packets = CounterMetricFamily("ipmasq_masqueraded_packets", "Packets masqueraded (new connections)",
                                      labels=["interface", "family"])
        nbytes = CounterMetricFamily("ipmasq_masqueraded_bytes", "Bytes of masqueraded packets",
                                     labels=["interface", "family"])
        # as the last sync recorded them (a record written before counts were kept: none)
        exempt = state.read().get("exempt")
        if isinstance(exempt, dict):
            for family in backends.base.FAMILIES:
                prefixes.add_metric([f"ipv{family}"], int(exempt.get(str(family), 0)))
        totals: dict = {}
        for c in counters:
            key = (c.interface or "any", f"ipv{c.family}")
            p, b = totals.get(key, (0, 0))
            totals[key] = (p + c.packets, b + c.bytes)
        for key, (p, b) in sorted(totals.items()):
            packets.add_metric(list(key), p)
            nbytes.add_metric(list(key), b)
        yield from (prefixes, packets, nbytes)


def registry_with(collector: Collector):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def write_file(path: str, collector: Collector) -> None:
    """Atomic (temp file + rename), as node_exporter's textfile collector needs."""
    from prometheus_client import write_to_textfile

    write_to_textfile(path, registry_with(collector))


class Server:
    """/metrics, and /healthz: 200 while this agent's last successful sync is younger than
    `max_age` (its own, not another process's: a cron reconcile must not keep it green)."""

    def __init__(self, address: str, port: int, collector: Collector, max_age: float):
        import socket
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from prometheus_client import generate_latest
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        class _Server(ThreadingHTTPServer):
            daemon_threads = True

        class _Server6(_Server):
            address_family = socket.AF_INET6

        registry = registry_with(collector)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/metrics"):
                    body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
                elif self.path.startswith("/healthz"):
                    age = time.time() - collector.last_success
                    ok = age <= max_age
                    body = (f"ok: last sync {age:.0f}s ago\n" if ok else f"stale: last sync {age:.0f}s ago\n").encode()
                    status, ctype = (200 if ok else 503), "text/plain"
                else:
                    body, status, ctype = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes are not news
                pass

        self.httpd = (_Server6 if ":" in address else _Server)((address, port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
