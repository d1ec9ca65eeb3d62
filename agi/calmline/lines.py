"""Lines to a stream whose reader may stall or vanish (stdout to journald, stderr to a pipe).

A blocked write on stdout or stderr would stop the whole service, so `LineSink` never waits:
what the reader has not taken yet waits here up to `limit` bytes, lines beyond that are
dropped and counted, and a reader that went away is left alone.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable

DEFAULT_LIMIT = 4 << 20


def _nonblocking_writer(fd: int) -> tuple[int, Callable[[bytes | bytearray], int], Callable[[], None]]:
    """A descriptor for `fd`'s file, a write on it that never blocks where one can stall,
    and how to let go of that descriptor.

    O_NONBLOCK is shared by every descriptor of one open file, so it is not set on the fd
    others hold: a pipe is opened again (a file of its own), a socket is sent to with
    MSG_DONTWAIT. Files and terminals do not stall and are written directly.
    """
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode):
        try:
            own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            pass  # no /proc: a plain write, which may wait for the reader
        else:
            return own, lambda data: os.write(own, data), lambda: os.close(own)
    elif stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=os.dup(fd))
        return sock.fileno(), lambda data: sock.send(data, socket.MSG_DONTWAIT), sock.close
    return fd, lambda data: os.write(fd, data), lambda: None


class LineSink:
    """Writes whole lines to `fd` without ever blocking; thread-safe.

    `notice` receives the one-line messages about drops and a reader that went away (for
    stdout that is stderr; for stderr itself, pass a no-op or another sink).
    """

    def __init__(self, fd: int, name: str, *, limit: int = DEFAULT_LIMIT,
                 notice: Callable[[str], None] | None = None):
        self._fd, self._send, self._close_own = _nonblocking_writer(fd)
        self.name = name
        self._limit = limit
        self._notice = notice if notice is not None else (lambda text: None)
        self._pending = bytearray()
        self._lock = threading.Lock()
        self.dropped = 0  # lines dropped since the reader last kept up
        self.dropped_total = 0
        self.gone = False

    def write(self, text: str) -> None:
        """Queue `text` (one or more lines, each ending in a newline) and hand over what fits."""
        self.write_bytes(text.encode("utf-8", "replace"))

    def write_bytes(self, data: bytes) -> None:
        messages: list[str] = []
        with self._lock:
            if self.gone:
                return
            keep = 0  # bytes that must follow whatever happens: the rest of a half-written line
            if not self._pending:
                try:
                    written = self._send(data)
                except BlockingIOError:
                    written = 0
                except OSError as exc:
                    messages.append(self._lose(exc))
                    written = len(data)
                data = data[written:]
                if data and written:
                    keep = data.find(b"\n") + 1
            if data:
                if len(self._pending) + len(data) > self._limit:
                    lost = data.count(b"\n", keep)
                    if lost and not self.dropped:
                        messages.append(f"calmline: {self.name} is not being read; lines are dropped "
                                        f"from it until it is")
                    self.dropped += lost
                    self.dropped_total += lost
                    data = data[:keep]
                self._pending += data
            messages += self._flush_locked()
        for message in messages:
            self._notice(message)

    def flush(self) -> None:
        """Hand the reader what it will take now (call when the fd may be writable again)."""
        with self._lock:
            messages = self._flush_locked()
        for message in messages:
            self._notice(message)

    @property
    def behind(self) -> bool:
        return bool(self._pending)

    def _flush_locked(self) -> list[str]:
        messages: list[str] = []
        while self._pending and not self.gone:
            try:
                written = self._send(self._pending)
            except BlockingIOError:
                return messages
            except OSError as exc:
                messages.append(self._lose(exc))
                return messages
            del self._pending[:written]
        if self.dropped and not self._pending and not self.gone:
            messages.append(f"calmline: {self.name} is read again; {self.dropped} lines were not "
                            f"written to it")
            self.dropped = 0
        return messages

    def _lose(self, exc: OSError) -> str:
        self.gone = True
        self._pending.clear()
        return f"calmline: {self.name} closed ({exc.strerror or exc}); nothing more is written to it"

    def finish(self, timeout: float = 2.0) -> None:
        """Write what waits unless the reader takes longer than `timeout`; then let go."""
        deadline = time.monotonic() + timeout
        while self.behind and not self.gone and (left := deadline - time.monotonic()) > 0:
            select.select([], [self._fd], [], left)
            self.flush()
        self._close_own()
