"""Assembles a running service from a config: audit store, actions, listener.

This is the one place that knows every part, so the parts themselves need not know
each other; the CLI and the tests start the service through it.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from calmline.fastagi.contract import Registry
from calmline.actions import catalog
from calmline.audit.store import AuditStore
from calmline.audit.trail import AuditTrail, configure
from calmline.config import Config
from calmline.errors import ConfigError, StoreError
from calmline.store import DATABASE_ERRORS, Database, reason
from calmline.actions.cooldown import CooldownStore, CooldownWorker
from calmline.actions.lookup import CallerLookups
from calmline.callback.mail import OutboxWorker
from calmline.callback.outbox import Outbox
from calmline.callback.webhooks import WebhookOutbox, WebhookWorker
from calmline.actions.alert import Alerter
from calmline.fastagi.server import FastAGIServer
from calmline.lines import LineSink
from calmline import reload as reloading
from calmline.audit import retention

if TYPE_CHECKING:
    from calmline.metrics import Metrics


def build_registry(config: Config, outbox: Outbox | None = None, worker: OutboxWorker | None = None,
                   webhooks: WebhookWorker | None = None, cooldowns: CooldownWorker | None = None,
                   lookups: CallerLookups | None = None) -> Registry:
    """Every action the config enables, at its path in the catalog, wired to the outboxes."""
    alert = Alerter(lambda: config.alert, webhooks.outbox if webhooks else None,
                    webhooks.wake if webhooks else (lambda: None))
    wiring = catalog.Wiring(outbox, worker.wake if worker else (lambda: None), alert,
                            cooldowns.starter_store if cooldowns else None,
                            cooldowns.wake if cooldowns else (lambda: None), lookups)
    registry = Registry()
    for spec in catalog.enabled(config):
        registry.add(spec.path, spec.build(config, wiring), runs_on=spec.runs_on,
                     reads=spec.reads(config), dead_ok=spec.dead_ok)
    return registry


@dataclass
class Service:
    config: Config
    store: AuditStore
    audit: AuditTrail
    server: FastAGIServer
    outbox: Outbox | None = None
    worker: OutboxWorker | None = None
    address: tuple[str, int] | None = None
    metrics: Metrics | None = None
    metrics_address: tuple[str, int] | None = None
    webhooks: WebhookWorker | None = None
    cooldowns: CooldownWorker | None = None
    lookups: CallerLookups | None = None
    _cooldown_task: asyncio.Task | None = None
    _worker_task: asyncio.Task | None = None
    _webhook_task: asyncio.Task | None = None
    _retention_task: asyncio.Task | None = None
    _retention_wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> tuple[str, int]:
        cfg = self.config.server
        if self.metrics is not None:
            self.metrics_address = self.metrics.serve(self.config.metrics)
            host, port = self.metrics_address
            self.audit.event("metrics_listening", host=host, port=port, path="/metrics")
        try:
            self.address = await self.server.start()
        except OSError as exc:
            raise ConfigError([
                f"server.host/server.port: cannot listen on {cfg.host}:{cfg.port}: "
                f"{exc.strerror or exc}; choose a free port or stop what is using it"
            ]) from None
        if self.worker is not None:
            self._worker_task = asyncio.create_task(self.worker.run(), name="calmline-mail")
        if self.webhooks is not None:
            self._webhook_task = asyncio.create_task(self.webhooks.run(), name="calmline-webhooks")
        if self.cooldowns is not None:
            self._cooldown_task = asyncio.create_task(self.cooldowns.run(), name="calmline-cooldown")
        # keep_days is asked each round; a reload that changes it starts one at once.
        self._retention_task = asyncio.create_task(
            retention.schedule(self.store.db, lambda: self.config.audit.keep_days, self.audit,
                               wake=self._retention_wake),
            name="calmline-retention")
        return self.address

    def reload(self, load: Callable[[], tuple[Config, str]]) -> bool:
        """Swap in the config `load` returns for new sessions, or keep the running one.

        A refusal prints the same one-line problems as `calmline check` on stderr, names
        any key that needs a restart, and is audited; so is a reload, with the fingerprint.
        """
        old = self.config
        try:
            new, source = load()
            problems = reloading.refusals(old, new, source, has_outbox=self.outbox is not None)
        except ConfigError as exc:
            new, problems = None, exc.problems
        if not problems:
            try:
                registry = build_registry(new, self.outbox, self.worker, self.webhooks, self.cooldowns,
                                          self.lookups)
            except ConfigError as exc:
                problems = exc.problems
        running = reloading.fingerprint(old)
        if problems:
            for problem in problems:
                sys.stderr.write(f"calmline: {problem}\n")
            sys.stderr.write(f"calmline: reload refused; still serving config {running}\n")
            sys.stderr.flush()
            self.audit.problem("config_reload_refused", problems=problems, fingerprint=running)
            if self.metrics is not None:
                self.metrics.reloaded(False)
            return False
        self.server.swap(new, registry)
        if self.worker is not None:
            self.worker.cfg = new.mail
        if self.webhooks is not None:
            self.webhooks.cfg = new.alert
        self.config = new
        if self.metrics is not None:
            self.metrics.config_in_use(reloading.fingerprint(new), registry.paths())
            self.metrics.reloaded(True)
        self.audit.event(
            "config_reloaded", config=source, fingerprint=reloading.fingerprint(new),
            previous_fingerprint=running, changed=reloading.changed_keys(old, new),
        )
        if new.audit.keep_days != old.audit.keep_days:
            self._retention_wake.set()  # the new retention applies now, not within the hour
        self.warn_if_exposed()
        return True

    def warn_if_exposed(self) -> None:
        """Say on stderr and in the trail when any host may connect (a wildcard bind with an
        empty `server.allow`): at start, and after a reload that emptied the allowlist."""
        exposure = self.config.server.exposure_warning()
        if exposure:
            self.audit.problem("open_to_the_network", warning=exposure)
            sys.stderr.write(f"calmline: WARNING: {exposure}\n")

    async def stop(self, grace: float = 30.0) -> None:
        if self._retention_task is not None:
            self._retention_task.cancel()
            await asyncio.gather(self._retention_task, return_exceptions=True)
        await self.server.close(grace)
        if self.cooldowns is not None and self._cooldown_task is not None:
            await self.cooldowns.stop()
            await self._cooldown_task
        if self.worker is not None and self._worker_task is not None:
            await self.worker.stop()
            await self._worker_task
        if self.webhooks is not None and self._webhook_task is not None:
            await self.webhooks.stop()
            await self._webhook_task
        if self.outbox is not None:
            self.outbox.close()
        if self.webhooks is not None:
            self.webhooks.outbox.close()
        if self.lookups is not None:
            self.lookups.close()
        self.store.close()
        if self.metrics is not None:
            self.metrics.close()


def build(config: Config, *, stdout: TextIO | None = sys.stdout) -> Service:
    """A service ready to `start()` inside a running event loop."""
    db = Database(config.store.url, password=config.store.resolved_password())
    echo = None
    if stdout is not None and config.audit.stdout:
        echo = LineSink(stdout.fileno(), "stdout", notice=lambda text: sys.stderr.write(text + "\n"))
    store = AuditStore(db, commit_timeout=config.audit.commit_timeout, echo=echo)
    store.open()
    configure(store)
    audit = AuditTrail(store)
    outbox = worker = None
    if config.end.enabled:
        try:
            outbox = Outbox(db)
        except DATABASE_ERRORS as exc:
            store.close()
            raise StoreError(f"store.url: cannot open the outbox in {db.where}: {reason(exc)}") from None
        if config.mail.enabled:
            worker = OutboxWorker(outbox, config.mail)
    try:
        # Always there (a reload may add alert.urls); it sleeps while nothing is queued.
        webhooks = WebhookWorker(WebhookOutbox(db), config.alert)
    except DATABASE_ERRORS as exc:
        store.close()
        raise StoreError(f"store.url: cannot open the webhook outbox in {db.where}: {reason(exc)}") from None
    cooldowns = None
    if config.cooldown.enabled:
        holder: list[Service] = []
        cooldowns = CooldownWorker(CooldownStore(db), lambda: holder[0].config if holder else config, audit)
    # Built whatever lookup.enabled says, so that a reload may turn the lookup on.
    lookups = CallerLookups(db)
    registry = build_registry(config, outbox, worker, webhooks, cooldowns, lookups)
    server = FastAGIServer(config, registry, audit)
    metrics = None
    if config.metrics.enabled:
        from calmline.metrics import Metrics  # prometheus_client only when asked for

        metrics = Metrics(registry.paths())
        metrics.config_in_use(reloading.fingerprint(config), registry.paths())
        metrics.in_flight.set_function(lambda: server.active_sessions)
        server.on_session_end = metrics.session_ended
        server.on_refused = metrics.connection_refused
        store.on_commit = metrics.committed
        store.on_error = metrics.store_failed
        metrics.watch_outbox(db, mail=outbox is not None)
    service = Service(config, store, audit, server, outbox, worker, metrics=metrics, webhooks=webhooks,
                      cooldowns=cooldowns, lookups=lookups)
    if cooldowns is not None:
        holder.append(service)  # the worker reads the config a reload swapped in
    return service


def tune_gc() -> None:
    """Collect cyclic garbage less often, and never walk again what startup built.

    Each connection leaves a little cyclic garbage (asyncio's transport refers to itself
    through a bound method), so collections must run; with Python's defaults each full one
    walked all of pydantic and structlog and stalled every call in flight
    (bench/README.md has the measurements).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(5_000)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one; return (soft, hard) after.

    Each session holds one descriptor; the soft limit is often 1,024 while the hard one
    allows far more, and only the hard one needs privilege to raise.
    """
    try:
        import resource
    except ImportError:  # not on this platform
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, hard
    return target, hard


STDERR_BACKLOG = 256 << 10  # bytes of stderr held for a slow reader before lines are dropped


class _StderrLines:
    """`sys.stderr` for the service: whole lines to a `LineSink`, so that a stderr nobody
    reads (a pipe) drops lines, counted, instead of blocking the event loop."""

    def __init__(self, sink: LineSink, original: TextIO):
        self._sink = sink
        self._partial = ""
        self.encoding = "utf-8"
        self.errors = "replace"
        self._original = original

    def write(self, text: str) -> int:
        written = len(text)
        text = self._partial + text
        cut = text.rfind("\n") + 1
        lines, self._partial = text[:cut], text[cut:]
        if len(self._partial) > 65536:  # never hold an endless line back
            lines, self._partial = lines + self._partial + "\n", ""
        if lines:
            self._sink.write(lines)
        return written

    def flush(self) -> None:
        self._sink.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._original.fileno()

    def writable(self) -> bool:
        return True


def guard_stderr() -> LineSink | None:
    """Route `sys.stderr` (tracebacks, warnings, logging, asyncio's handler) through a
    non-blocking `LineSink` on fd 2; the sink's own notices about drops go there too."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        return None
    holder: list[LineSink] = []
    sink = LineSink(fd, "stderr", limit=STDERR_BACKLOG, notice=lambda text: holder[0].write(text + "\n"))
    holder.append(sink)
    sys.stderr = _StderrLines(sink, sys.stderr)  # type: ignore[assignment]
    return sink


async def serve(config: Config, source: str, load: Callable[[], tuple[Config, str]] | None = None) -> None:
    """Run until SIGINT or SIGTERM, then drain sessions and flush the audit trail.

    SIGHUP calls `load` again (the CLI's, which re-applies its overrides) and swaps the
    config in for new sessions (`Service.reload`).
    """
    stderr = guard_stderr()
    soft, _hard = raise_fd_limit()
    service = build(config)
    # Handlers go in before the port opens: whoever sees it listening may already stop us.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if load is not None:
        loop.add_signal_handler(signal.SIGHUP, service.reload, load)
    host, port = await service.start()
    tune_gc()
    # A SIGHUP taken before this line has already swapped `service.config` in.
    service.audit.event("service_started", config=source, host=host, port=port, fd_limit=soft,
                        fingerprint=reloading.fingerprint(service.config))
    service.warn_if_exposed()
    if stderr is not None:
        # A stalled reader is retried now and then; lines wait in the sink meanwhile.
        loop.call_later(1.0, _flush_every_second, loop, stderr)
    await stop.wait()
    service.audit.event("service_stopping")
    await service.stop(service.config.server.shutdown_grace)
    if stderr is not None:
        stderr.finish(timeout=1.0)


def _flush_every_second(loop: asyncio.AbstractEventLoop, sink: LineSink) -> None:
    if sink.behind:
        sink.flush()
    loop.call_later(1.0, _flush_every_second, loop, sink)
