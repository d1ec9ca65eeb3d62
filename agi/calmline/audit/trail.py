"""The audit trail: every event is a structlog event, stored durably and echoed as JSON.

structlog's pipeline runs in two stages. In the service, a bound logger captures each event
with the call's identity (bound once per session in a contextvar) and the time; `AuditStore`
ships the captured events, a batch per event-loop turn (a step at once), to a writer process
(`calmline.audit.writer`), which renders them (the same `stamped()` + JSON as everywhere),
echoes one JSON line each to stdout for log shippers, and appends them to SQLite (WAL) in
grouped commits, acknowledging each commit. `step()` returns only once its event is
committed, so a step an action has moved past is on disk even if the service is killed.
The writer is a process, not a thread, so rendering, SQLite and fsync never hold the event
loop's GIL.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import heapq
import itertools
import json
import marshal
import os
import reprlib
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable
from contextvars import ContextVar
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import structlog

# The JSON line is the event. `ts` and `linkedid` (what reads select on) are stored beside it
# and indexed; the view `events` derives the other columns on read, so a write costs no
# JSON parsing at all.
_EXTRACTED = ("event", "level", "session", "uniqueid", "action", "step", "outcome", "agent",
              "caller_number")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS event_rows (\n    id INTEGER PRIMARY KEY,\n    data TEXT NOT NULL,\n"
    "    ts TEXT,\n    linkedid TEXT\n);\n"
    "CREATE INDEX IF NOT EXISTS event_rows_ts ON event_rows (ts);\n"
    "CREATE INDEX IF NOT EXISTS event_rows_linkedid ON event_rows (linkedid);\n"
    "CREATE VIEW IF NOT EXISTS events AS SELECT id, data, ts, linkedid"
    + "".join(f", json_extract(data, '$.{c}') AS {c}" for c in _EXTRACTED)
    + " FROM event_rows;\n"
)
INSERT = "INSERT INTO event_rows (data, ts, linkedid) VALUES (?, ?, ?)"
# Built once (dumps(default=...) builds one per call); ASCII-only JSON, so whatever bytes a
# caller's network sent, the row always encodes.
encode = json.JSONEncoder(default=str).encode


def _fast_encoder():
    """`encode` for the writer's hot path: the C encoder built once instead of per call.

    Built without a cycle check (a shared one would keep stale marks after an error); a
    cycle ends in RecursionError, which the renderer handles like any unencodable event.
    Where the C encoder is missing or disagrees with `encode`, `encode` itself is used.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encode
    try:
        chunks = make(None, str, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)
        sample = {"a": [1, 2.5, None, True, "\u00e9\n\""], "b": {"c": object}}
        if "".join(chunks(sample, 0)) != encode(sample):
            return encode
    except Exception:
        return encode
    return lambda value: "".join(chunks(value, 0))


_encode_fast = _fast_encoder()
_PIPE_SIZE = 1 << 20
_RESTART_DELAYS = (0.05, 0.2, 1.0, 2.0)


_CALL: ContextVar[dict[str, Any] | None] = ContextVar("calmline_call", default=None)


def bind(**fields: Any) -> None:
    """Bind fields (the call's identity) to every event of the current session's task."""
    current = _CALL.get()
    _CALL.set({**current, **fields} if current else fields)


def clear() -> None:
    _CALL.set(None)


# --- the pipeline -------------------------------------------------------------------------


def stamped(name: str, event: dict[str, Any], bound: dict[str, Any] | None, t: float) -> dict[str, Any]:
    """The call's identity, the level and the time: what every stored or printed event carries."""
    if bound:
        event = {**bound, **event}
    event["level"] = "warning" if name == "warn" else name
    event["ts"] = datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds")
    return event


def render(record: tuple) -> str:
    """One captured record as its JSON line: the reference `Renderer` must agree with."""
    try:
        if record[0] == "e":
            _, name, event, bound, t = record
            return encode(stamped(name, event, bound, t))
        return encode(record[1])
    except (TypeError, ValueError, RecursionError) as exc:
        return _substitute(record, exc)


def _substitute(record: tuple, exc: Exception) -> str:
    """The line for an event JSON cannot take as it is (a key that is a tuple, say).

    Its keys and odd values become text, so the event is still stored and the trail behind
    it is not held up; if even that fails, what is left is its text and why.
    """
    if record[0] == "e":
        _, name, event, bound, t = record
    else:
        name, event, bound, t = "info", record[1], None, time.time()
    try:
        return encode(stamped(name, _plain(event), _plain(bound) if bound else None, t))
    except (TypeError, ValueError, RecursionError):
        kept = _unrenderable(event, exc)
    try:  # with the call's identity, if that at least is plain
        return encode(stamped("error", kept, _plain(bound) if bound else None, t))
    except (TypeError, ValueError, RecursionError):
        return encode(stamped("error", kept, None, t))


def _unrenderable(event: Any, exc: Exception) -> dict[str, str]:
    """What is kept of an event nothing else could take: its text, bounded, and why."""
    return {"event": "unrenderable_event", "text": _TEXT.repr(event)[:2000],
            "error": f"{type(exc).__name__}: {exc}"[:300]}


_TEXT = reprlib.Repr()  # bounded in depth and length, so any structure has a text
_TEXT.maxlevel, _TEXT.maxstring, _TEXT.maxother = 8, 400, 200
_TEXT.maxdict = _TEXT.maxlist = _TEXT.maxtuple = 50


class Renderer:
    """Captured records as `INSERT` rows (JSON line, ts, linkedid), in the writer process.

    The events of a session share its bound identity, so that part of the JSON is encoded
    once and reused while it is unchanged; each line is exactly what `render()` gives.
    """

    def __init__(self, size: int = 4096):
        self._bound: dict[Any, tuple[dict[str, Any], str]] = {}
        self._levels: dict[str, str] = {}
        self._size = size
        self._second = -1  # the whole second `_prefix` spells
        self._prefix = ""

    def _ts(self, t: float) -> str:
        """`stamped()`'s `ts` for time `t`, its date and time of day formatted once a second.

        The microseconds are rounded as `datetime.fromtimestamp` rounds them (half to even
        of the fraction times 10**6), so the text is the same to the character.
        """
        whole = int(t)
        if whole < 0 or (us := round((t - whole) * 1e6)) >= 1_000_000:
            return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds")
        if whole != self._second:
            self._prefix = datetime.fromtimestamp(whole, timezone.utc).isoformat(timespec="seconds")[:-6]
            self._second = whole
        return f"{self._prefix}.{us:06d}+00:00"

    def row(self, record: tuple) -> tuple[str, Any, Any]:
        try:
            return self._row(record)
        except (TypeError, ValueError, RecursionError) as exc:
            line = _substitute(record, exc)
            event = json.loads(line)
            return line, _column(event.get("ts")), _column(event.get("linkedid"))

    def _row(self, record: tuple) -> tuple[str, Any, Any]:
        if record[0] != "e":
            event = record[1]
            return encode(event), _column(event.get("ts")), _column(event.get("linkedid"))
        _, name, event, bound, t = record
        if (not bound or not event or not bound.keys().isdisjoint(event)
                or "ts" in bound or "level" in bound or "ts" in event or "level" in event):
            event = stamped(name, event, bound, t)  # keys overlap: let the dict merge decide
            return encode(event), event["ts"], _column(event.get("linkedid"))
        key = bound.get("session")
        cached = self._bound.get(key)
        if cached is None or cached[0] != bound:
            if len(self._bound) >= self._size:
                self._bound.clear()
            cached = self._bound[key] = (bound, _encode_fast(bound)[:-1])
        level = self._levels.get(name)
        if level is None:
            level = self._levels[name] = encode("warning" if name == "warn" else name)
        ts = self._ts(t)
        line = f'{cached[1]}, {_encode_fast(event)[1:-1]}, "level": {level}, "ts": "{ts}"}}'
        return line, ts, _column(bound.get("linkedid"))


def _column(value: Any) -> str | None:
    """A column value SQLite binds whatever the event held (the JSON keeps the value itself)."""
    if isinstance(value, str):
        return value if value.isascii() else value.encode("utf-8", "replace").decode("utf-8")
    return None if value is None else encode(value)


def _stamp(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    """The console pipeline's stage: stamp the event here and now."""
    if "exc_info" in event:
        event = structlog.processors.format_exc_info(logger, name, event)
    return stamped(name, event, _CALL.get(), time.time())


def _capture(logger: Any, name: str, event: dict[str, Any]) -> tuple[tuple[tuple], dict]:
    """The service pipeline's stage: keep what the writer needs to stamp and render it.

    A traceback can only be formatted where the exception is, so that happens here.
    """
    if "exc_info" in event:
        event = structlog.processors.format_exc_info(logger, name, event)
    return (("e", name, event, _CALL.get(), time.time()),), {}


class _StoreLogger:
    """structlog's logger: hands the captured event to the store, returns its seq.

    A durable logger marks its events urgent: their waiter follows at once.
    """

    def __init__(self, store: AuditStore, *, urgent: bool = False):
        self._store = store
        self._urgent = urgent

    def msg(self, record: tuple) -> int:
        return self._store.submit_record(record, urgent=self._urgent)

    debug = info = warning = warn = error = critical = exception = msg


_Wrapper = structlog.make_filtering_bound_logger(0)


def configure(store: AuditStore) -> None:
    """Route every structlog event in this process (mail, outbox too) through the store."""
    structlog.configure(
        processors=[_capture],
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


# --- the store ----------------------------------------------------------------------------


def _upgrade(conn: sqlite3.Connection, path: Path) -> None:
    """Move the rows of a store from an earlier calmline (an `events` table) into `event_rows`.

    That table derived every column from the JSON as it was written; it is copied once, in
    one transaction, and replaced by the view of the same name.
    """
    if not _old_layout(conn):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if _old_layout(conn):  # another instance may have moved it meanwhile
            count = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            sys.stderr.write(f"calmline: moving the {count} events of {path} to the current table layout (once)\n")
            conn.execute(_SCHEMA.split(";", 1)[0])
            conn.execute(
                "INSERT INTO event_rows (id, data, ts, linkedid) SELECT id, data, "
                "json_extract(data, '$.ts'), json_extract(data, '$.linkedid') FROM events ORDER BY id"
            )
            conn.execute("DROP TABLE events")
        conn.execute("COMMIT")
    except Exception:
        conn.execute("ROLLBACK")
        raise


def _old_layout(conn: sqlite3.Connection) -> bool:
    found = conn.execute("SELECT type FROM sqlite_master WHERE name = 'events'").fetchone()
    return found is not None and found[0] == "table"


def _plain(value: Any, _inside: set[int] | None = None) -> Any:
    """`value` as plain data, which both marshal and JSON take: text keys, and anything but
    containers and scalars as its str (what the JSON encoder would have written anyway).
    A container met again inside itself becomes `{...}` or `[...]`, as `repr` shows it."""
    if isinstance(value, (dict, list, tuple)):
        inside = _inside if _inside is not None else set()
        if id(value) in inside:
            return "{...}" if isinstance(value, dict) else "[...]"
        inside.add(id(value))
        try:
            if isinstance(value, dict):
                return {str(k): _plain(v, inside) for k, v in value.items()}
            plain = [_plain(v, inside) for v in value]
            return plain if isinstance(value, list) else tuple(plain)
        finally:
            inside.discard(id(value))
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _frame(first: int, urgent: bool, records: list[tuple]) -> bytes:
    try:
        body = marshal.dumps((first, urgent, records))
    except ValueError:  # a value marshal refuses: only that record changes
        body = marshal.dumps((first, urgent, [_marshallable(r) for r in records]))
    return len(body).to_bytes(4, "big") + body


def _marshallable(record: tuple) -> tuple:
    """`record`, or as plain data, or (nested beyond any use) its text: never lost, so the
    seqs of the batch and the steps waiting on them stay as they were."""
    try:
        marshal.dumps(record)
        return record
    except ValueError:
        pass
    try:
        plain = _plain(record)
        marshal.dumps(plain)
        return plain
    except (ValueError, RecursionError) as exc:
        if record[0] == "e":
            bound = record[3]
            try:
                marshal.dumps(bound)
            except ValueError:
                bound = None
            return ("e", "error", _unrenderable(record[2], exc), bound, record[4])
        return ("d", stamped("error", _unrenderable(record[1], exc), None, time.time()))


class AuditStore:
    """The service's side of the audit trail: batches events to the writer process.

    `submit_record()` never blocks the event loop (what the pipe does not take yet waits in
    memory); `wait_durable(seq)` resolves once event `seq` is committed, or, if the store
    refuses it for `commit_timeout` seconds, resolves anyway, so that no call hangs on a
    full disk: the event stays queued. Until the writer acknowledges a batch it is kept,
    and sent again to a new writer if the writer dies.
    The store is used from its event loop's thread; `flush()` alone may be called from any.
    """

    def __init__(
        self, path: Path, *, synchronous: str = "full", stdout: TextIO | None = None,
        commit_timeout: float = 5.0,
    ):
        self.path = Path(path)
        self._commit_timeout = commit_timeout
        self._synchronous = synchronous.upper()
        self._stdout = stdout
        self._seq = 0
        self._pending: list[tuple] = []
        self._scheduled = False
        self._unacked: collections.deque[tuple[int, bytes]] = collections.deque()
        self._out = bytearray()  # what the pipe has not taken yet
        self._acks = bytearray()
        self._durable = 0
        self._waiters: list[tuple[int, int, asyncio.Future[bool | None]]] = []
        self._tiebreak = itertools.count()
        self._deadlines: collections.deque[tuple[float, asyncio.Future[bool | None]]] = collections.deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._late_told = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._child: subprocess.Popen[bytes] | None = None
        self._in_fd = -1
        self._ack_fd = -1
        self._closing = False
        self._restarts = 0
        self.commits = 0

    @property
    def writer_pid(self) -> int | None:
        """The writer process's pid (for CPU accounting), while it runs."""
        return self._child.pid if self._child is not None else None

    # --- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Create the database (so a bad path fails here, in words) and start the writer."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            _upgrade(conn, self.path)
            conn.executescript(_SCHEMA)
        finally:
            conn.close()
        try:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        except RuntimeError:
            self._loop = None
        self._spawn()

    def _echo_fd(self) -> int | None:
        if self._stdout is None:
            return None
        self._stdout.flush()
        try:
            return self._stdout.fileno()
        except (AttributeError, OSError, ValueError) as exc:
            raise ValueError("the audit echo needs a stream with a file descriptor, such as sys.stdout") from exc

    def _spawn(self, *, register: bool = True) -> None:
        echo = self._echo_fd()
        ack_r, ack_w = os.pipe()
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)}
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "calmline.audit.writer", str(self.path), self._synchronous,
                 str(ack_w), "echo" if echo is not None else "quiet"],
                stdin=subprocess.PIPE, stdout=echo if echo is not None else subprocess.DEVNULL,
                pass_fds=(ack_w,), env=env,
            )
        except Exception:
            os.close(ack_r)
            raise
        finally:
            os.close(ack_w)
        self._ack_fd = ack_r
        assert self._child.stdin is not None
        self._in_fd = self._child.stdin.fileno()
        try:
            import fcntl

            fcntl.fcntl(self._in_fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        except (ImportError, AttributeError, OSError):
            pass  # a smaller pipe only means more waiting in memory
        if register and self._loop is not None and not self._loop.is_closed():
            os.set_blocking(self._in_fd, False)
            os.set_blocking(self._ack_fd, False)
            self._loop.add_reader(self._ack_fd, self._on_ack)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, let the writer commit it, wait for it to exit.

        A writer found dead here (killed, say) is replaced once, for what it did not commit.
        """
        if self._closing or (self._child is None and not self._unacked and not self._pending):
            return
        self._closing = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._send()
        if self._child is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._ack_fd)
            self._loop.remove_writer(self._in_fd)
        for _attempt in range(2):
            if self._child is None:
                if not self._unacked:
                    break
                self._spawn(register=False)
                self._out = bytearray(b"".join(frame for _, frame in self._unacked))
            self._finish_child(timeout)
            if self._durable >= self._seq:
                break
        if self._durable < self._seq:
            sys.stderr.write(
                f"calmline: the audit writer stopped with {self._seq - self._durable} events "
                f"not committed to {self.path}\n"
            )

    def _finish_child(self, timeout: float) -> None:
        """Hand the writer the rest, end its input, read its last acknowledgements."""
        child = self._child
        assert child is not None and child.stdin is not None
        try:
            os.set_blocking(self._in_fd, True)
            if self._out:
                os.write(self._in_fd, bytes(self._out))
        except OSError:
            pass  # the writer is gone; the caller sees what it did not acknowledge
        self._out.clear()
        try:
            child.stdin.close()
        except OSError:
            pass
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        os.set_blocking(self._ack_fd, True)
        while data := os.read(self._ack_fd, 65536):
            self._take_acks(data)
        os.close(self._ack_fd)
        self._child = None

    # --- submitting ------------------------------------------------------------------------

    def submit(self, event: dict[str, Any], *, urgent: bool = False) -> int:
        """Queue a finished event (its own `ts`, `level`...) for the disk; return its seq."""
        return self.submit_record(("d", event), urgent=urgent)

    def submit_record(self, record: tuple, *, urgent: bool = False) -> int:
        """Queue a captured event; it is sent with the others of this event-loop turn, or,
        if urgent (a step someone will wait for), at once with those queued before it."""
        loop = self._loop
        if loop is not None and loop.is_closed():
            loop = None  # after the loop: sent from here, at once
        elif loop is not None and threading.get_ident() != self._loop_thread:
            # Logged from a worker thread (mail delivery): the loop's thread does the rest, so
            # the batch is never changed under its feet and its selector wakes up for it.
            try:
                loop.call_soon_threadsafe(functools.partial(self.submit_record, record, urgent=urgent))
                return 0
            except RuntimeError:
                loop = None  # closed just now
        if self._closing:
            sys.stderr.write(f"calmline: audit store closed, event not stored: {render(record)}\n")
            return 0
        self._seq += 1
        self._pending.append(record)
        if urgent:
            self._send(urgent=True)
        elif not self._scheduled:
            if loop is not None:
                self._scheduled = True
                loop.call_soon(self._send)
            else:
                self._send()
        return self._seq

    def _send(self, urgent: bool = False) -> None:
        """Frame what is pending and write it; urgent: to be committed on arrival, and sent
        even if nothing is pending (a nudge for what the writer already holds)."""
        self._scheduled = False
        records = self._pending
        if records:
            self._pending = []
            frame = _frame(self._seq - len(records) + 1, urgent, records)
            self._unacked.append((self._seq, frame))
        elif urgent:
            frame = _frame(self._seq + 1, True, [])
        else:
            return
        self._write(frame)

    def _write(self, data: bytes) -> None:
        if self._child is None:
            return
        if not self._out:
            try:
                written = os.write(self._in_fd, data)
            except BlockingIOError:
                written = 0
            except OSError:
                return  # the writer died: its restart sends every unacknowledged batch
            if written == len(data):
                return
            data = data[written:]
            if self._loop is not None:
                self._loop.add_writer(self._in_fd, self._drain)
        self._out += data

    def _drain(self) -> None:
        try:
            written = os.write(self._in_fd, self._out)
        except BlockingIOError:
            return
        except OSError:
            written = len(self._out)
        del self._out[:written]
        if not self._out and self._loop is not None:
            self._loop.remove_writer(self._in_fd)

    # --- acknowledgements -------------------------------------------------------------------

    def _on_ack(self) -> None:
        try:
            data = os.read(self._ack_fd, 65536)
        except BlockingIOError:
            return
        if data:
            self._take_acks(data)
        else:
            self._writer_died()

    def _take_acks(self, data: bytes) -> None:
        acks = self._acks
        acks += data
        whole = len(acks) - len(acks) % 8
        if not whole:
            return
        committed = int.from_bytes(acks[whole - 8:whole], "big")
        self.commits += whole // 8
        self._restarts = 0  # this writer works: the next restart need not wait long
        self._late_told = False
        del acks[:whole]
        self._durable = max(self._durable, committed)
        unacked = self._unacked
        while unacked and unacked[0][0] <= committed:
            unacked.popleft()
        self._release(self._durable)

    def _release(self, committed: int) -> None:
        waiters = self._waiters
        while waiters and waiters[0][0] <= committed:
            future = heapq.heappop(waiters)[2]
            if not future.done():
                future.set_result(None)

    def _writer_died(self) -> None:
        assert self._loop is not None and self._child is not None
        self._loop.remove_reader(self._ack_fd)
        self._loop.remove_writer(self._in_fd)
        os.close(self._ack_fd)
        code = self._child.wait()
        self._child = None
        if self._closing:
            return
        delay = self._schedule_restart()
        sys.stderr.write(
            f"calmline: the audit writer exited with {code}; restarting it in {delay:g}s and "
            f"sending again the {self._seq - self._durable} events it had not committed\n"
        )

    def _schedule_restart(self) -> float:
        """Start a writer again later, the later the more restarts in a row have failed."""
        assert self._loop is not None
        delay = _RESTART_DELAYS[min(self._restarts, len(_RESTART_DELAYS) - 1)]
        self._restarts += 1
        self._loop.call_later(delay, self._restart)
        return delay

    def _restart(self) -> None:
        if self._closing:
            return
        self._out.clear()
        self._acks.clear()
        try:
            self._spawn()
        except OSError as exc:
            delay = self._schedule_restart()
            sys.stderr.write(f"calmline: cannot start the audit writer ({exc}); trying again in {delay:g}s\n")
            return
        for _, frame in self._unacked:
            self._write(frame)
        if self._waiters:
            self._send(urgent=True)

    # --- waiting ----------------------------------------------------------------------------

    def wait_for(self, seq: int) -> asyncio.Future[bool | None]:
        """A future for event `seq`'s commit; the event must have been submitted urgent.

        Its result is None once the event is committed, True if `commit_timeout` passed first
        (or at once, while the store is known to refuse: one wait per outage is enough).
        """
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        future = loop.create_future()
        if seq <= self._durable:
            future.set_result(None)
            return future
        if self._late_told:
            future.set_result(True)
            return future
        heapq.heappush(self._waiters, (seq, next(self._tiebreak), future))
        self._deadlines.append((time.monotonic() + self._commit_timeout, future))
        if self._expiry is None:
            self._expiry = loop.call_later(self._check_every(), self._expire)
        return future

    def _check_every(self) -> float:
        return min(1.0, max(0.05, self._commit_timeout / 4))

    def _expire(self) -> None:
        """Let go the waiters whose commit is overdue (their events stay queued)."""
        self._expiry = None
        now = time.monotonic()
        deadlines = self._deadlines
        late = 0
        while deadlines and (deadlines[0][0] <= now or deadlines[0][1].done()):
            future = deadlines.popleft()[1]
            if not future.done():
                future.set_result(True)
                late += 1
        if late and not self._late_told:
            self._late_told = True
            sys.stderr.write(
                f"calmline: steps waited {self._commit_timeout:g}s (audit.commit_timeout) for the "
                f"audit store {self.path}; their calls go on, and their events stay queued until "
                f"the store takes them (they are lost if calmline stops first)\n"
            )
        if deadlines and not self._closing and self._loop is not None and not self._loop.is_closed():
            self._expiry = self._loop.call_later(self._check_every(), self._expire)

    async def wait_durable(self, seq: int) -> bool:
        """Wait until event `seq` (and every event before it) is committed; False if the store
        refused it for `commit_timeout` seconds instead (it stays queued)."""
        if seq <= self._durable:
            return True
        future = self.wait_for(seq)
        self._send(urgent=True)
        return not await future

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything submitted so far is committed (for shutdown, CLI, tests)."""
        target = self._seq
        deadline = time.monotonic() + timeout
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._send, True)
            while self._durable < target and time.monotonic() < deadline:
                time.sleep(0.002)
            return self._durable >= target
        # On the loop's own thread (or without a loop) nobody else reads the acks: read here.
        import select

        self._send(urgent=True)
        while self._durable < target and self._child is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            readable, writable, _ = select.select([self._ack_fd], [self._in_fd] if self._out else [], [], remaining)
            if writable:
                self._drain()
            if readable:
                try:
                    data = os.read(self._ack_fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    break
                self._take_acks(data)
        return self._durable >= target


class AuditTrail:
    """What sessions and actions call: `event()` to record, `step()` to record durably.

    It holds loggers bound to its store once, so the hot path skips structlog's lazy
    proxy and global configuration lookups on every event.
    """

    def __init__(self, store: AuditStore | None):
        self._store = store
        if store is not None:
            self._log = self._wrap(_StoreLogger(store))
            self._durable_log = self._wrap(_StoreLogger(store, urgent=True))
        else:
            self._log = self._durable_log = structlog.get_logger("calmline.audit.trail")

    @staticmethod
    def _wrap(logger: _StoreLogger) -> Any:
        return structlog.wrap_logger(logger, processors=[_capture], wrapper_class=_Wrapper).bind()

    def event(self, event: str, **fields: Any) -> int:
        return self._log.info(event, **fields) or 0

    def problem(self, event: str, **fields: Any) -> int:
        return self._log.warning(event, **fields) or 0

    async def step(self, step: str, **fields: Any) -> None:
        """Record that a step finished; return once the record is on disk."""
        await self.record_step(step, **fields)

    def record_step(self, step: str, **fields: Any) -> Awaitable[None]:
        """Record that a step finished, now; await the result before acknowledging it.

        For an action whose bookkeeping can go on while the commit is in flight: what it
        must not do before awaiting is tell Asterisk (or anyone) that the step is done.
        """
        seq = self._durable_log.info("step", step=step, **fields)
        if self._store is not None and seq:
            return _Commit(self, self._store.wait_for(seq), step)
        return _DONE


class _Commit:
    """A step's commit to await; a step let go before its commit says so in the trail."""

    __slots__ = ("_trail", "_future", "_step")

    def __init__(self, trail: AuditTrail, future: asyncio.Future[bool | None], step: str):
        self._trail = trail
        self._future = future
        self._step = step

    def __await__(self):
        late = yield from self._future.__await__()
        if late:
            self._trail.problem("step_not_yet_durable", step=self._step)


class _Done:
    """An already-finished awaitable, for a trail without a store."""

    def __await__(self):
        yield from ()


_DONE = _Done()


def read_events(path: Path, *, linkedid: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Events from the store, oldest first (for tests, `calmline audit` and reports)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone() is None:
            return []  # created, never written to
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
