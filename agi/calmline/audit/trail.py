"""The audit trail: every event is a structlog event, stamped with the call's identity.

The session binds the call's identity once (a contextvar), so every event logged while it
runs, by any module, carries it. In the service, events go to the `AuditStore` (durable,
echoed to stdout as JSON lines); in the CLI, they are JSON lines on stderr.
"""

from __future__ import annotations

import sys
import time
from contextvars import ContextVar
from typing import Any, TextIO

import structlog

from calmline.audit.store import AuditStore, stamp

_CALL: ContextVar[dict[str, Any] | None] = ContextVar("calmline_call", default=None)


def bind(**fields: Any) -> None:
    """Bind fields (the call's identity) to every event of the current session's task."""
    current = _CALL.get()
    _CALL.set({**current, **fields} if current else fields)


def clear() -> None:
    _CALL.set(None)


def _stamp(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog's processor: a traceback as text, then identity, level, time and id."""
    if "exc_info" in event:
        event = structlog.processors.format_exc_info(logger, name, event)
    return stamp(name, event, _CALL.get(), time.time())


def _to_store(logger: Any, name: str, event: dict[str, Any]) -> tuple[tuple, dict]:
    return (event,), {}


class _StoreLogger:
    """structlog's logger for the service: hands the stamped event to the store."""

    def __init__(self, store: AuditStore):
        self._store = store

    def msg(self, event: dict[str, Any]) -> int:
        return self._store.submit(event)

    debug = info = warning = warn = error = critical = exception = msg


_Wrapper = structlog.make_filtering_bound_logger(0)


def configure(store: AuditStore) -> None:
    """Route every structlog event in this process (mail, outbox too) to the store."""
    structlog.configure(
        processors=[_stamp, _to_store],
        wrapper_class=_Wrapper,
        logger_factory=lambda *_: _StoreLogger(store),
        cache_logger_on_first_use=False,
    )


def configure_console(stream: TextIO = sys.stderr) -> None:
    """Without a store (CLI commands), events are JSON lines on stderr."""
    structlog.configure(
        processors=[_stamp, structlog.processors.JSONRenderer(default=str)],
        wrapper_class=_Wrapper,
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


class AuditTrail:
    """What sessions and actions call: `event()` to record, `step()` to record durably."""

    def __init__(self, store: AuditStore | None):
        self._store = store
        self._log = structlog.get_logger("calmline.audit")  # without a store: the console

    def _submit(self, level: str, event: str, fields: dict[str, Any]) -> int:
        """Straight to the store, as structlog's pipeline would (`_stamp`), minus its
        per-call machinery: three of these run on the loop for every session."""
        fields["event"] = event
        if "exc_info" in fields:
            fields = structlog.processors.format_exc_info(None, level, fields)
        return self._store.submit(stamp(level, fields, _CALL.get(), time.time()))

    def event(self, event: str, **fields: Any) -> int:
        if self._store is None:
            return self._log.info(event, **fields) or 0
        return self._submit("info", event, fields)

    def problem(self, event: str, **fields: Any) -> int:
        if self._store is None:
            return self._log.warning(event, **fields) or 0
        return self._submit("warning", event, fields)

    async def step(self, step: str, **fields: Any) -> bool:
        """Record that a step finished; return once it is committed (True), or once the
        store has refused it for `audit.commit_timeout` (False, and the trail says so)."""
        fields["step"] = step
        seq = self.event("step", **fields)
        if self._store is None or not seq:
            return self._store is None
        if await self._store.wait_durable(seq):
            return True
        self.problem("step_not_yet_durable", step=step)
        return False
