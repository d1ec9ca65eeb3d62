"""The audit trail: every event is a structlog event, stored durably and echoed as JSON.

structlog's pipeline adds the call's identity (bound once per session in contextvars) and a
timestamp; the last link hands the event to `AuditStore`, which appends it to SQLite (WAL)
from a writer thread that commits in groups, and writes one JSON line to stdout for log
shippers. `step()` returns only once its event is committed, so a step an action has moved
past is on disk even if the process is killed; under load many sessions share one commit.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import queue
import sqlite3
import sys
import threading
import time
from contextvars import ContextVar
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import structlog

_COLUMNS = ("ts", "event", "level", "session", "uniqueid", "linkedid", "action", "step",
            "outcome", "agent", "caller_number")
# Only the JSON is written; SQLite derives the columns itself (in C, in the writer thread),
# so the event loop pays for one json.dumps per event and nothing more.
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS events (\n    id INTEGER PRIMARY KEY,\n    data TEXT NOT NULL"
    + "".join(f",\n    {c} TEXT GENERATED ALWAYS AS (json_extract(data, '$.{c}')) VIRTUAL" for c in _COLUMNS)
    + "\n);\n"
    "CREATE INDEX IF NOT EXISTS events_ts ON events (ts);\n"
    "CREATE INDEX IF NOT EXISTS events_linkedid ON events (linkedid);\n"
)
_INSERT = "INSERT INTO events (data) SELECT value FROM json_each(?) ORDER BY key"
_encode = json.JSONEncoder(default=str).encode  # built once: dumps(default=...) builds one per call
_BATCH = 2000
_LINGER = 0.05  # seconds an event nobody waits on may wait for company before its commit
_STOP = object()


_CALL: ContextVar[dict[str, Any] | None] = ContextVar("calmline_call", default=None)


def bind(**fields: Any) -> None:
    """Bind fields (the call's identity) to every event of the current session's task."""
    current = _CALL.get()
    _CALL.set({**current, **fields} if current else fields)


def clear() -> None:
    _CALL.set(None)


def _passthrough(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return event


class AuditStore:
    """Appends events to SQLite from one writer thread, committing whatever has queued up.

    `submit()` never blocks the event loop; `wait_durable(seq)` resolves once the event
    numbered `seq` is committed. If the disk refuses a write, the batch is kept and retried,
    never dropped.
    """

    def __init__(self, path: Path, *, synchronous: str = "full", stdout: TextIO | None = None):
        self.path = path
        self._synchronous = synchronous.upper()
        self._stdout = stdout
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._seq = itertools.count(1)
        self._last_seq = 0
        self._committed = 0  # as the event loop knows it (waiters released up to here)
        self._durable = 0  # as the writer thread knows it: readable from any thread
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._tiebreak = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._urgent = threading.Event()
        self.commits = 0

    def open(self) -> None:
        """Create the database and start the writer thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
        conn.close()
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._thread = threading.Thread(target=self._writer, name="calmline-audit", daemon=True)
        self._thread.start()

    def submit(self, event: dict[str, Any]) -> int:
        """Queue an event for the disk (and echo it); return its sequence number."""
        seq = next(self._seq)
        self._last_seq = seq
        # ASCII-only JSON: whatever bytes a caller's network sent, the row always encodes.
        data = _encode(event)
        self._queue.put((seq, data))
        if self._stdout is not None:
            self._stdout.write(data + "\n")
        return seq

    async def wait_durable(self, seq: int) -> None:
        """Return once event `seq` (and every event before it) is committed."""
        if seq <= self._committed:
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (seq, next(self._tiebreak), future))
        self._urgent.set()
        await future

    def _release(self, committed: int) -> None:
        self._committed = committed
        waiters = self._waiters
        while waiters and waiters[0][0] <= committed:
            future = heapq.heappop(waiters)[2]
            if not future.done():
                future.set_result(None)

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything submitted so far is committed (for shutdown and the CLI)."""
        target = self._last_seq
        self._urgent.set()
        deadline = time.monotonic() + timeout
        # `_durable`, not `_committed`: the latter is advanced by the event loop, which a
        # caller inside that loop is blocking right now.
        while self._durable < target and time.monotonic() < deadline:
            time.sleep(0.002)
        return self._durable >= target

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then stop the writer."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._urgent.set()
        self._thread.join(timeout)
        self._thread = None

    def _writer(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        stop = False
        while not stop:
            batch = [self._queue.get()]
            # Nobody waits on these yet (a session start, say): linger briefly so they share
            # the commit of the step that will follow, instead of an fsync each.
            if not self._urgent.is_set():
                self._urgent.wait(_LINGER)
            self._urgent.clear()
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stop = True
                batch = [item for item in batch if item is not _STOP]
            if not batch:
                continue
            self._commit(conn, batch)
            committed = batch[-1][0]
            self._durable = committed
            if self._loop is not None and not self._loop.is_closed():
                try:
                    self._loop.call_soon_threadsafe(self._release, committed)
                except RuntimeError:
                    self._committed = committed
            else:
                self._committed = committed
        conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[tuple[int, tuple]]) -> None:
        delay = 0.05
        while True:
            try:
                # One statement for the whole batch: SQLite splits the array itself, so the
                # writer takes the GIL back once per batch rather than once per row.
                with conn:
                    conn.execute(_INSERT, ("[" + ",".join(data for _, data in batch) + "]",))
                self.commits += 1
                if self._error:
                    sys.stderr.write(f"calmline: audit store writable again: {self.path}\n")
                    self._error = None
                return
            except sqlite3.Error as exc:
                if self._error != str(exc):
                    self._error = str(exc)
                    sys.stderr.write(
                        f"calmline: cannot write the audit store {self.path}: {exc}; "
                        f"keeping {len(batch)} events in memory and retrying\n"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


class _StoreLogger:
    """structlog's final link: hands the finished event to the store, returns its seq."""

    def __init__(self, store: AuditStore):
        self._store = store

    def msg(self, **event: Any) -> int:
        return self._store.submit(event)

    debug = info = warning = warn = error = critical = exception = msg


_Wrapper = structlog.make_filtering_bound_logger(0)
def _stamp(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    """The call's identity, the level and the time, in one processor (it runs per event)."""
    bound = _CALL.get()
    if bound:
        event = {**bound, **event}
    event["level"] = "warning" if name == "warn" else name
    event["ts"] = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    if "exc_info" in event:
        event = structlog.processors.format_exc_info(logger, name, event)
    return event


_PIPELINE = [_stamp]


def configure(store: AuditStore) -> None:
    """Route every structlog event in this process (mail, outbox too) through the store."""
    structlog.configure(
        processors=[*_PIPELINE, _passthrough],
        wrapper_class=_Wrapper,
        logger_factory=lambda *_: _StoreLogger(store),
        cache_logger_on_first_use=False,
    )


def configure_console(stream: TextIO = sys.stderr) -> None:
    """Without a store (CLI commands), events are JSON lines on stderr."""
    structlog.configure(
        processors=[*_PIPELINE, structlog.processors.JSONRenderer(default=str)],
        wrapper_class=_Wrapper,
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


class AuditTrail:
    """What sessions and actions call: `event()` to record, `step()` to record durably.

    It holds a logger bound to its store once, so the hot path skips structlog's lazy
    proxy and global configuration lookups on every event.
    """

    def __init__(self, store: AuditStore | None):
        self._store = store
        if store is not None:
            self._log = structlog.wrap_logger(
                _StoreLogger(store), processors=[*_PIPELINE, _passthrough], wrapper_class=_Wrapper
            ).bind()
        else:
            self._log = structlog.get_logger("calmline.audit")

    def event(self, event: str, **fields: Any) -> int:
        return self._log.info(event, **fields) or 0

    def problem(self, event: str, **fields: Any) -> int:
        return self._log.warning(event, **fields) or 0

    async def step(self, step: str, **fields: Any) -> None:
        """Record that a step finished; return once the record is on disk."""
        seq = self._log.info("step", step=step, **fields)
        if self._store is not None and seq:
            await self._store.wait_durable(seq)


def read_events(path: Path, *, linkedid: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Events from the store, oldest first (for tests, `calmline audit` and reports)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if linkedid:
            rows = conn.execute(
                "SELECT data FROM events WHERE linkedid = ? ORDER BY id LIMIT ?", (linkedid, limit)
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT data FROM (SELECT id, data FROM events ORDER BY id DESC LIMIT ?) ORDER BY id",
                (limit,),
            ).fetchall()
    finally:
        conn.close()
    return [json.loads(data) for (data,) in rows]
