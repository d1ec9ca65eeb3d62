"""Assembles a running service from a config: audit store, actions, listener.

This is the one place that knows every part, so the parts themselves need not know
each other; the CLI and the tests start the service through it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass
from typing import TextIO

from calmline.actions import Registry
from calmline.actions.warn import Warn
from calmline.audit import AuditStore, AuditTrail, configure
from calmline.config import Config
from calmline.server import FastAGIServer


def build_registry(config: Config) -> Registry:
    """Register each enabled action at its path, explicitly."""
    registry = Registry()
    if config.warn.enabled:
        registry.add("warn", Warn(config.warn))
    return registry


@dataclass
class Service:
    config: Config
    store: AuditStore
    audit: AuditTrail
    server: FastAGIServer
    address: tuple[str, int] | None = None

    async def start(self) -> tuple[str, int]:
        self.address = await self.server.start()
        return self.address

    async def stop(self, grace: float = 30.0) -> None:
        await self.server.close(grace)
        await asyncio.to_thread(self.store.close)


def build(config: Config, *, stdout: TextIO | None = sys.stdout) -> Service:
    """A service ready to `start()` inside a running event loop."""
    store = AuditStore(
        config.audit.database,
        synchronous=config.audit.synchronous,
        stdout=stdout if config.audit.stdout else None,
    )
    store.open()
    configure(store)
    audit = AuditTrail(store)
    server = FastAGIServer(config, build_registry(config), audit)
    return Service(config, store, audit, server)


async def serve(config: Config, source: str) -> None:
    """Run until SIGINT or SIGTERM, then drain sessions and flush the audit trail."""
    service = build(config)
    host, port = await service.start()
    service.audit.event("service_started", config=source, host=host, port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    service.audit.event("service_stopping")
    await service.stop()
