"""The audit store: one writer thread owns the connection and commits events in groups.

A step waits for its own commit, so one that an action has moved past survives a SIGKILL.
Under load, events that arrive while a commit is in flight share the next one; an event
nobody waits for (a session's start and end) waits up to `LINGER` to share a step's. A store
that refuses commits (full disk, lock, PostgreSQL gone) holds a step at most
`commit_timeout` seconds, once per outage; its events wait in memory, up to `max_pending`,
and are committed when the store takes them again. Each event carries a unique
`event_id` and is inserted with ON CONFLICT DO NOTHING, so no retry stores it twice.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import os
import re
import reprlib
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from calmline.lines import LineSink
from calmline.store import DATABASE_ERRORS, Connection, Database, reason
from calmline.store.schema import EVENT_COLUMNS

# ASCII-only JSON: whatever bytes a caller's network sent, the line always encodes.
encode = json.JSONEncoder(default=str).encode
INSERT = (f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))}) "
          "ON CONFLICT (event_id) DO NOTHING")
RETRY_FIRST, RETRY_MAX = 0.05, 2.0
# An event nobody waits for may wait this long, or for this many others, to share a commit
# with the next step (bench/README.md, 2026-12-06).
LINGER, LINGER_ROWS = 0.05, 256
CLOSING_RETRY = 5.0  # seconds a store that refuses is still retried while the service stops
MAX_BATCH = 2000
_PROCESS = os.urandom(6).hex()
_ids = itertools.count(1)


def new_event_id() -> str:
    """Unique across processes and restarts: a random per-process prefix and a counter."""
    return f"{_PROCESS}-{next(_ids)}"


def _stderr(text: str) -> None:
    sys.stderr.write(text + "\n")


class AuditStore:
    """Events in, durable rows out; `submit()` never blocks, `wait_durable()` is bounded."""

    def __init__(self, db: Database, *, commit_timeout: float = 5.0, echo: LineSink | None = None,
                 max_pending: int = 100_000, notice: Callable[[str], None] = _stderr):
        self.db = db
        self._commit_timeout = commit_timeout
        self._echo = echo
        self._max_pending = max_pending
        self._notice = notice
        self._cond = threading.Condition()
        self._queue: list[tuple[int, tuple]] = []  # (seq, row) not yet taken by the writer
        self._seq = 0
        self._wanted = 0  # the highest seq a step (or a flush) waits for: commit it at once
        self._first_queued = 0.0  # when the oldest event in `_queue` arrived
        self._idle = False  # the writer waits on `_cond`: only then is a notify worth its cost
        self._durable = 0  # every seq up to this one is committed (or was dropped)
        self._dropped = 0  # events refused while `max_pending` were waiting
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[tuple[int, int, asyncio.Future[bool]]] = []
        self._tiebreak = itertools.count()
        self._late = False  # a step was let go during this outage: the next ones do not wait
        self.failing_since: float | None = None
        self.commits = 0
        self.on_commit: Callable[[float, int], None] | None = None
        self.on_error: Callable[[BaseException], None] | None = None

    # --- life ---------------------------------------------------------------------------

    def open(self) -> None:
        """Check the store (raises StoreError naming store.url) and start the writer."""
        self.db.open_checked()
        self._thread = threading.Thread(target=self._run, name="calmline-audit", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> bool:
        """Commit what was submitted (within `timeout`), then stop; False if some was lost."""
        with self._cond:
            if self._closing:
                return True
            self._closing = True
            target = self._seq
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        lost = target - self._durable
        if lost > 0:
            self._notice(f"calmline: the audit store stopped with {lost} events not committed to "
                         f"{self.db.where}")
        if self._echo is not None:
            self._echo.finish()
        return lost <= 0

    # --- submitting -----------------------------------------------------------------------

    def submit(self, event: dict[str, Any]) -> int:
        """Queue a stamped event for the store; return its seq (0 if it cannot be stored)."""
        row = _row(event)
        with self._cond:
            if self._closing:
                self._notice(f"calmline: audit store closed, event not stored: {row[-1]}")
                return 0
            if self._seq - self._durable >= self._max_pending:
                if not self._dropped:
                    self._notice(f"calmline: {self._max_pending} audit events wait for the store "
                                 f"{self.db.where}; new events are dropped from it (not from stdout) "
                                 f"until it takes them")
                self._dropped += 1
                if self._echo is not None:
                    self._echo.write(row[-1] + "\n")
                return 0
            self._seq += 1
            queue = self._queue
            queue.append((self._seq, row))
            if len(queue) == 1:  # the writer starts the linger's clock
                self._first_queued = time.monotonic()
                if self._idle:
                    self._cond.notify()
            elif len(queue) >= LINGER_ROWS and self._idle:
                self._cond.notify()
            return self._seq

    # --- waiting (on the event loop) -----------------------------------------------------

    async def wait_durable(self, seq: int) -> bool:
        """True once event `seq` is committed; False if the store refused it for
        `commit_timeout` seconds, or at once while it is known to refuse (one wait per outage)."""
        if seq == 0:  # submit() refused it: it will never be committed
            return False
        if seq <= self._durable:
            return True
        if self._late:
            return False
        with self._cond:
            if seq > self._wanted:
                self._wanted = seq
                if self._idle:
                    self._cond.notify()
        loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        heapq.heappush(self._waiters, (seq, next(self._tiebreak), future))
        timer = loop.call_later(self._commit_timeout, self._expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, future: asyncio.Future[bool]) -> None:
        if future.done():
            return
        future.set_result(False)
        if not self._late:
            self._late = True
            self._notice(
                f"calmline: a step waited {self._commit_timeout:g}s (audit.commit_timeout) for the "
                f"audit store {self.db.where}; calls go on without waiting until it commits again, "
                f"and their events stay queued (lost only if calmline stops first)")

    def _release(self) -> None:
        durable = self._durable
        waiters = self._waiters
        while waiters and waiters[0][0] <= durable:
            future = heapq.heappop(waiters)[2]
            if not future.done():
                future.set_result(True)
        if self.failing_since is None:
            self._late = False

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything submitted so far is committed (CLI, tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._seq
            self._wanted = max(self._wanted, target)
            self._cond.notify_all()
            while self._durable < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    # --- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        conn: Connection | None = None
        batch: list[tuple[int, tuple]] = []
        delay = RETRY_FIRST
        while True:
            with self._cond:
                while not batch and not self._closing:
                    queue = self._queue
                    if not queue:
                        left = None
                    elif self._wanted >= queue[0][0] or len(queue) >= LINGER_ROWS:
                        break
                    else:
                        left = self._first_queued + LINGER - time.monotonic()
                        if left <= 0:
                            break
                    self._idle = True
                    self._cond.wait(left)
                    self._idle = False
                if not self._queue and not batch and self._closing:
                    break
                room = MAX_BATCH - len(batch)
                taken, self._queue[:room] = self._queue[:room], []
            if taken and self._echo is not None:
                self._echo.write("".join(row[-1] + "\n" for _, row in taken))
            batch += taken
            started = time.perf_counter()
            try:
                if conn is None:
                    conn = self.db.connect()
                with conn.transaction():
                    conn.executemany(INSERT, [row for _, row in batch])
            except DATABASE_ERRORS as exc:
                conn = self._drop(conn)
                self._failed(exc, len(batch))
                with self._cond:
                    if self._closing and time.monotonic() - (self.failing_since or 0) > CLOSING_RETRY:
                        break  # closing, and the store still refuses: close() says what is lost
                    self._cond.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            elapsed = time.perf_counter() - started
            committed, rows, batch, delay = batch[-1][0], len(batch), [], RETRY_FIRST
            self.commits += 1
            with self._cond:
                self._durable = max(self._durable, committed)
                # an outage ends with this commit, not when the loop next runs: a step submitted
                # by whoever saw the commit (flush) waits for its own instead of being let go
                outage, self.failing_since, self._late = self.failing_since, None, False
                dropped, self._dropped = self._dropped, 0
                if outage is not None or dropped:
                    # queued ahead of anything submitted after this commit was seen
                    seconds = time.monotonic() - outage if outage is not None else 0.0
                    self._seq += 1
                    self._queue.append((self._seq, _row(stamp("warning", {
                        "event": "audit_store_outage", "seconds": round(seconds, 3), "dropped": dropped}))))
                self._cond.notify_all()
            if outage is not None or dropped:
                self._notice(f"calmline: the audit store {self.db.where} is writable again after "
                             f"{seconds:.1f}s" + (f"; {dropped} events were dropped" if dropped else ""))
            if self.on_commit is not None:
                self.on_commit(elapsed, rows)
            loop = self._loop
            if loop is not None and (self._waiters or self._late):
                try:
                    loop.call_soon_threadsafe(self._release)
                except RuntimeError:
                    pass  # the loop closed: nobody waits any more
        if conn is not None:
            conn.close()

    @staticmethod
    def _drop(conn: Connection | None) -> None:
        """Let a connection that failed go; the next attempt opens a new one."""
        if conn is not None:
            try:
                conn.close()
            except DATABASE_ERRORS:
                pass
        return None

    def _failed(self, exc: BaseException, waiting: int) -> None:
        if self.on_error is not None:
            self.on_error(exc)
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            self._notice(f"calmline: cannot write the audit store {self.db.where}: {reason(exc)}; "
                         f"retrying, {waiting} events wait in memory")


# --- rows -----------------------------------------------------------------------------------


def stamp(level: str, event: dict[str, Any], bound: dict[str, Any] | None = None,
          t: float | None = None) -> dict[str, Any]:
    """The call's identity, the level, the time and a unique id: what every event carries."""
    if bound:
        event = {**bound, **event}
    event["level"] = "warning" if level == "warn" else level
    event["ts"] = _iso(time.time() if t is None else t)
    event.setdefault("event_id", new_event_id())
    return event


_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def _iso(t: float) -> str:
    """`datetime.fromtimestamp(t, utc).isoformat(timespec="microseconds")`, with the date and
    time formatted once a second instead of once an event."""
    global _second
    whole = int(t)
    if whole != _second[0]:
        _second = (whole, datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second[1]}.{int((t - whole) * 1_000_000):06d}+00:00"


def _row(event: dict[str, Any]) -> tuple:
    if not event.get("event_id"):
        event = {**event, "event_id": new_event_id()}
    try:
        line = encode(event)
    except (TypeError, ValueError, RecursionError) as exc:
        line = _substitute(event, exc)
        event = json.loads(line)
    return (*[v if v.__class__ is str and v.isascii() else _column(v) for v in map(event.get, _COLUMNS)],
            line)


_COLUMNS = EVENT_COLUMNS[:-1]  # every column but `data`, the line itself


_SURROGATE = re.compile("[\ud800-\udfff]")


def _column(value: Any) -> str | None:
    """A value every engine binds (lone surrogates from a caller's bytes become U+FFFD)."""
    if isinstance(value, str):
        return value if value.isascii() else _SURROGATE.sub("\ufffd", value)
    return None if value is None else encode(value)


_TEXT = reprlib.Repr()  # bounded in depth and length, so any structure has a text
_TEXT.maxlevel, _TEXT.maxstring, _TEXT.maxother = 8, 400, 200


def _substitute(event: dict[str, Any], exc: BaseException) -> str:
    """The line for an event JSON cannot take as it is: keys and odd values as text, or,
    failing that, its text and why, so the trail behind it is never held up."""
    try:
        return encode(_plain(event))
    except (TypeError, ValueError, RecursionError):
        keep = {k: event.get(k) for k in ("event_id", "ts", "level", "session", "linkedid")
                if isinstance(event.get(k), str)}
        return encode({**keep, "event": "unrenderable_event", "text": _TEXT.repr(event)[:2000],
                       "error": f"{type(exc).__name__}: {exc}"[:300]})


def _plain(value: Any, inside: frozenset[int] = frozenset()) -> Any:
    if isinstance(value, (dict, list, tuple)):
        if id(value) in inside:
            return "{...}" if isinstance(value, dict) else "[...]"
        inner = inside | {id(value)}
        if isinstance(value, dict):
            return {str(k): _plain(v, inner) for k, v in value.items()}
        return [_plain(v, inner) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# --- reading --------------------------------------------------------------------------------


def read_events(db: Database, *, linkedid: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Events from the store, oldest first (the newest `limit` of them)."""
    conn = db.connect()
    try:
        if linkedid:
            rows = conn.execute("SELECT data FROM events WHERE linkedid = ? ORDER BY id LIMIT ?",
                                (linkedid, limit)).fetchall()
        else:
            rows = conn.execute("SELECT data FROM (SELECT id, data FROM events ORDER BY id DESC LIMIT ?) "
                                "AS newest ORDER BY id", (limit,)).fetchall()
    finally:
        conn.close()
    return [json.loads(data) for (data,) in rows]
