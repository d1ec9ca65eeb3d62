"""Prometheus metrics for `calmline serve`, with the official client, on their own registry.

Counters are fed by hooks (the server's session and refusal callbacks, the audit store's
commit and error observers); what lives elsewhere (sessions in flight, the outbox backlog)
is read when Prometheus scrapes, so the numbers are never stale. Label values come from
closed sets (configured paths, outcomes), never from what a peer sends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from calmline.config import MetricsConfig
from calmline.errors import ConfigError
from calmline.store import DATABASE_ERRORS, Connection, Database

# A step's commit waits for an fsync: sub-millisecond on a quiet SSD, seconds on a sick disk.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class OutboxCollector(Collector):
    """The callback backlog, read from the store at scrape time on a connection of its own."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time, *, mail: bool = True):
        self._db = db
        self._mail = mail
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: Connection | None = None

    def _read(self, table: str) -> tuple[int, int, float | None]:
        if self._conn is None:
            self._conn = self._db.connect()
        pending, oldest = self._conn.execute(
            f"SELECT COUNT(*), MIN(queued_at) FROM {table} WHERE status = 'pending'").fetchone()
        (failed,) = self._conn.execute(f"SELECT COUNT(*) FROM {table} WHERE status = 'failed'").fetchone()
        return pending, failed, oldest

    def collect(self) -> Iterable[GaugeMetricFamily]:
        pending = GaugeMetricFamily(
            "calmline_outbox_pending", "Messages waiting to be sent (callback mail, alert webhooks).",
            labels=["channel"])
        failed = GaugeMetricFamily(
            "calmline_outbox_failed", "Messages given up on after mail.max_attempts or alert.max_attempts.",
            labels=["channel"])
        age = GaugeMetricFamily(
            "calmline_outbox_oldest_pending_age_seconds",
            "Age of the oldest message still waiting to be sent; 0 when none waits.", labels=["channel"])
        tables = ([("mail", "outbox")] if self._mail else []) + [("webhook", "webhooks")]
        with self._lock:
            try:
                read = [(channel, self._read(table)) for channel, table in tables]
            except DATABASE_ERRORS:
                self.close()
                return  # no sample beats a wrong one (an absent series alerts as such)
        now = self._clock()
        for channel, (count, given_up, oldest) in read:
            pending.add_metric([channel], count)
            failed.add_metric([channel], given_up)
            age.add_metric([channel], max(0.0, now - oldest) if oldest is not None else 0.0)
        yield from (pending, failed, age)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except DATABASE_ERRORS:
                pass
            self._conn = None


class Metrics:
    """Everything `/metrics` shows, on a registry of its own (so tests can run several)."""

    def __init__(self, paths: Iterable[str]):
        self.registry = CollectorRegistry()
        r = self.registry
        self._paths = frozenset(paths)
        self.sessions = Counter(
            "calmline_sessions", "Sessions served, by action (request path) and outcome.",
            ["action", "outcome"], registry=r)
        self.refused = Counter(
            "calmline_connections_refused", "Connections refused before a session started.",
            ["reason"], registry=r)
        self.in_flight = Gauge("calmline_sessions_in_flight", "Sessions running now.", registry=r)
        self.commit_seconds = Histogram(
            "calmline_audit_commit_seconds", "Time to commit a batch of audit events (a step waits for it).",
            buckets=COMMIT_BUCKETS, registry=r)
        self.store_errors = Counter(
            "calmline_audit_store_errors", "Commits the audit store refused (full disk, lock, lost database).",
            registry=r)
        self.config = Info("calmline_config", "Fingerprint of the config in use (changes on reload).", registry=r)
        self.reloads = Counter(
            "calmline_config_reloads", "SIGHUP reloads, applied or refused.", ["result"], registry=r)
        ProcessCollector(registry=r)
        self._http = None
        self._outbox: OutboxCollector | None = None

    def watch_outbox(self, db: Database, *, mail: bool = True) -> None:
        self._outbox = OutboxCollector(db, mail=mail)
        self.registry.register(self._outbox)

    # --- hooks ---

    def session_ended(self, action: str | None, outcome: str) -> None:
        label = action if action in self._paths else ("none" if action is None else "unknown")
        self.sessions.labels(label, outcome).inc()

    def connection_refused(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def committed(self, seconds: float, rows: int) -> None:
        self.commit_seconds.observe(seconds)

    def store_failed(self, exc: BaseException) -> None:
        self.store_errors.inc()

    def config_in_use(self, fingerprint: str, paths: Iterable[str]) -> None:
        self.config.info({"fingerprint": fingerprint})
        self._paths = frozenset(paths)

    def reloaded(self, applied: bool) -> None:
        self.reloads.labels("applied" if applied else "refused").inc()

    # --- serving ---

    def serve(self, cfg: MetricsConfig) -> tuple[str, int]:
        """Listen for scrapes in a thread of the client's own; return the bound address."""
        try:
            server, _thread = start_http_server(cfg.port, addr=cfg.host, registry=self.registry)
        except OSError as exc:
            raise ConfigError([
                f"metrics.host/metrics.port: cannot listen on {cfg.host}:{cfg.port}: "
                f"{exc.strerror or exc}; choose a free port or stop what is using it"
            ]) from None
        self._http = server
        host, port = server.server_address[:2]
        return host, port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._outbox is not None:
            with self._outbox._lock:
                self._outbox.close()
