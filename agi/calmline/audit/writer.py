"""The audit trail's writer process: render, echo and commit the service's events in groups.

The service starts it with `python -m calmline.audit.writer DATABASE SYNCHRONOUS ACK_FD
echo|quiet` and writes frames to its stdin: a 4-byte length, then a marshalled
`(first_seq, urgent, records)`. Each record is rendered to its JSON line (echoed on stdout
when asked) and appended to SQLite; after each commit the highest committed seq goes back
on ACK_FD as 8 bytes. It commits at once for an urgent frame (someone waits), otherwise
after a short linger so that events share a commit. While the store refuses (a full disk,
a lock held elsewhere) it keeps taking and echoing events and retries with a growing delay.
It exits when stdin ends, whether the service closed it or died, once everything it
received is committed.
"""

from __future__ import annotations

import marshal
import os
import select
import signal
import sqlite3
import sys
import time

from calmline.audit.trail import INSERT, Renderer
from calmline.lines import _nonblocking_writer

LINGER = 0.05  # seconds an event nobody waits on may wait for company before its commit
RETRY_FIRST, RETRY_MAX = 0.05, 2.0  # seconds between attempts while the store refuses
# Each read allocates its whole buffer: at 1 MiB, above glibc's mmap threshold, that was an
# mmap and a munmap per read, ~10 us (bench/README.md, fourth and sixth passes).
READ_SIZE = 1 << 16
ECHO_LIMIT = 4 << 20  # bytes of JSON lines that may wait for stdout's reader before some are dropped


class Echo:
    """Prints the JSON lines on stdout, never waiting for whoever reads it.

    That reader (journald, a log shipper) may stall or go away; the store must not notice.
    On a pipe or a socket, writes do not block: what the reader has not taken yet waits
    here, up to `limit` bytes, and lines beyond that are dropped from stdout (the store has
    them) with a count on stderr. Files and terminals are written directly.
    """

    def __init__(self, fd: int = 1, limit: int = ECHO_LIMIT):
        self._fd, self._send, self._close_own = _nonblocking_writer(fd)
        self._limit = limit
        self._pending = bytearray()
        self._dropped = 0
        self._gone = False

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def behind(self) -> bool:
        """True while lines wait for the reader (the caller should `flush()` when writable)."""
        return bool(self._pending)

    def lines(self, rows: list[tuple]) -> None:
        if self._gone:
            return
        data = "".join(row[0] + "\n" for row in rows).encode()
        keep = 0  # bytes that must follow whatever happens: the rest of a line half written
        if not self._pending:
            try:
                written = self._send(data)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                self._close(exc)
                return
            data = data[written:]
            if not data:
                return
            if written:
                keep = data.find(b"\n") + 1
        if len(self._pending) + len(data) > self._limit:
            if not self._dropped:
                sys.stderr.write("calmline: stdout is not being read; JSON lines are dropped from "
                                 "it until it is (the audit store still gets every event)\n")
            self._dropped += data.count(b"\n", keep)
            data = data[:keep]
        self._pending += data
        self.flush()

    def flush(self) -> None:
        """Hand the reader what it will take now."""
        while self._pending and not self._gone:
            try:
                written = self._send(self._pending)
            except BlockingIOError:
                return
            except OSError as exc:
                self._close(exc)
                return
            del self._pending[:written]
        if self._dropped and not self._pending:
            sys.stderr.write(f"calmline: stdout is read again; {self._dropped} JSON lines were not "
                             "printed there\n")
            self._dropped = 0

    def finish(self, timeout: float = 2.0) -> None:
        """Print what waits, unless the reader takes longer than `timeout`; then let go."""
        deadline = time.monotonic() + timeout
        while self._pending and not self._gone and (left := deadline - time.monotonic()) > 0:
            select.select([], [self._fd], [], left)
            self.flush()
        self._close_own()

    def _close(self, exc: OSError) -> None:
        self._gone = True
        self._pending.clear()
        sys.stderr.write(f"calmline: stdout closed ({exc.strerror or exc}); no more JSON lines on it "
                         "(the audit store still gets every event)\n")


class Writer:
    def __init__(self, path: str, synchronous: str, ack_fd: int, echo: bool):
        self.path = path
        self.ack_fd = ack_fd
        self.echo = Echo() if echo else None
        # Transactions are explicit: a batch is one, and a failed one is rolled back whole.
        # A lock held elsewhere is waited for briefly, then retried like any refusal, so
        # that events keep being echoed meanwhile.
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=1.0)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={synchronous}")
        self.renderer = Renderer()
        self.rows: list[tuple] = []  # INSERT parameters, one tuple per event
        self.last = 0  # the seq of the last row in `rows`
        self.urgent = False
        self.deadline = 0.0
        self.error: str | None = None
        self.retry_at = 0.0  # while the store refuses: when to try again
        self.delay = RETRY_FIRST

    def take(self, buffer: bytearray) -> None:
        """Render every whole frame in `buffer` and drop it from there."""
        lines: list[tuple] = []
        while len(buffer) >= 4:
            size = int.from_bytes(buffer[:4], "big")
            if len(buffer) < 4 + size:
                break
            first, urgent, records = marshal.loads(bytes(buffer[4:4 + size]))
            del buffer[:4 + size]
            if records:
                if not self.rows:
                    self.deadline = time.monotonic() + LINGER
                lines.extend(map(self.renderer.row, records))
                self.last = first + len(records) - 1
            self.urgent = self.urgent or urgent
        if lines:
            self.rows.extend(lines)
            if self.echo is not None:
                self.echo.lines(lines)

    def wake_at(self) -> float | None:
        """When the rows are due for a commit (None: nothing to commit, only input can make it)."""
        if not self.rows:
            return None
        if self.retry_at:
            return self.retry_at
        return 0.0 if self.urgent else self.deadline

    def commit(self) -> bool:
        """Commit the rows and acknowledge them; if the store refuses, keep them for a retry."""
        try:
            self.conn.execute("BEGIN")
            self.conn.executemany(INSERT, self.rows)
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite already rolled back (a full disk, say): nothing to undo
            if self.error != str(exc):
                self.error = str(exc)
                sys.stderr.write(
                    f"calmline: cannot write the audit store {self.path}: {exc}; "
                    f"keeping {len(self.rows)} events and retrying\n"
                )
            self.retry_at = time.monotonic() + self.delay
            self.delay = min(self.delay * 2, RETRY_MAX)
            return False
        if self.error:
            sys.stderr.write(f"calmline: audit store writable again: {self.path}\n")
            self.error = None
        self.retry_at = 0.0
        self.delay = RETRY_FIRST
        self.rows = []
        self.urgent = False
        os.write(self.ack_fd, self.last.to_bytes(8, "big"))
        return True

    def run(self) -> None:
        """Take frames as they come (rendering and echoing them even while the store refuses
        to commit), commit when due; at the end of input, commit what is left."""
        buffer = bytearray()
        while True:
            wake = self.wake_at()
            timeout = None if wake is None else max(0.0, wake - time.monotonic())
            echo_behind = self.echo is not None and self.echo.behind
            readable, writable, _ = select.select([0], [self.echo.fd] if echo_behind else [], [], timeout)
            if writable:
                self.echo.flush()
            if readable:
                data = os.read(0, READ_SIZE)
                if not data:
                    break
                buffer += data
                self.take(buffer)
                if not self.rows:
                    self.urgent = False  # a nudge with nothing left to commit
            wake = self.wake_at()
            if wake is not None and time.monotonic() >= wake:
                self.commit()
        while self.rows and not self.commit():
            time.sleep(max(0.0, self.retry_at - time.monotonic()))
        self.conn.close()
        if self.echo is not None:
            self.echo.finish()


def _batch_priority() -> None:
    """Run as a batch task: when the service's pipe wakes this process, it waits for a free
    core instead of preempting the event loop that woke it, and keeps its fair share of CPU
    (bench/README.md, fourth pass: sessions/s and latency both improved)."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass  # not Linux, or refused here: an ordinary process commits just the same


def main(argv: list[str]) -> int:
    path, synchronous, ack_fd, echo = argv
    # The service decides when this process ends (by closing stdin); a Ctrl-C or a SIGTERM
    # sent to the whole process group must not drop events it has not committed yet.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _batch_priority()
    try:
        Writer(path, synchronous, int(ack_fd), echo == "echo").run()
    except BrokenPipeError:
        return 1  # the acknowledgement pipe: the service is gone, nothing is waiting
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
