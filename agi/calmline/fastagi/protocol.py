"""The FastAGI wire: the only code that reads from or writes to Asterisk's socket.

It knows the framing Asterisk 22 really uses (see ../shared/asterisk/README.md): the
environment block, `200 result=N (data) endpos=N` answers, the bare `HANGUP` notice that
arrives in front of the next answer, GOSUB's `100 result=0 Trying...` before its answer, the
multi-line 520 usage block, and 510/511. Each line is judged by `parse_answer`, a pure
function; everything above this module sees typed answers and typed errors, never bytes, and
nothing a peer sends raises anything but a `CalmlineError`.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable
from typing import Literal, NamedTuple

from calmline.errors import (
    AGICommandError,
    ConnectionLost,
    DeadChannel,
    InvalidCommand,
    LineTooLong,
    MalformedAnswer,
    PeerSilent,
    TruncatedInput,
    UnsafeArgument,
    UsageError,
)

# `200 result=R[ (DATA)][ endpos=N][ NOTE]`. The numbers are ASCII digits of a bounded
# length (Python refuses to convert more than 4,300 digits, and `\d` would take any script's
# digits); the NOTE is free text that Asterisk adds to some answers (`Gosub complete`).
_ANSWER = re.compile(
    r"200 result=(?P<result>[^\s()]{0,64})(?: \((?P<data>.*)\))?"
    r"(?: endpos=(?P<endpos>-?[0-9]{1,19}))?(?: (?!endpos)(?P<note>[A-Za-z][^\n]*))?"
)
_INTEGER = re.compile(r"-?[0-9]{1,18}")
_CODE = re.compile(r"[1-5][0-9][0-9]")
# Every line of the block, in one pass in C: `agi_key: value` (the space is optional).
_ENV_LINES = re.compile(r"^(agi_[a-z0-9_]+): ?([^\n]*)\n", re.MULTILINE)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*(\([A-Za-z0-9_,.-]*\))?$")
_MAX_ENV_LINES = 200
_READ_CHUNK = 4096  # bytes per socket read: Asterisk's lines and environment blocks are small
_USAGE_BLOCK_LINES = 1000


class Answer(NamedTuple):
    """A `200` answer: `result`, the optional `(data)`, `endpos` and trailing note.

    `text` is the result as sent: GET DATA answers with keyed digits (`0123`, `*1`, or
    nothing), which are not a number; `result` is its integer value where it is one.
    `note` is the free text some answers end with (a GOSUB's `Gosub complete`).
    (A named tuple: one is built per command, and it costs half a frozen dataclass.)
    """

    text: str
    data: str | None = None
    endpos: int | None = None
    note: str | None = None

    @property
    def result(self) -> int | None:
        text = self.text
        return int(text) if _INTEGER.fullmatch(text) is not None else None


class Notice(NamedTuple):
    """A line that comes before a command's answer: `hangup` (the channel hung up) or
    `trying` (a GOSUB has started; its `200` follows when the routine returns)."""

    kind: Literal["hangup", "trying"]


HANGUP = Notice("hangup")
TRYING = Notice("trying")


def _verb(command: str) -> str:
    return command.split(" ", 1)[0]


def parse_answer(line: str, command: str = "command") -> Answer | Notice:
    """One line Asterisk sent in answer to `command`, without its newline.

    Returns the `200` answer, or a `Notice` after which the real answer is still to come.
    Raises the typed error for every other code (a `UsageError` with `block` set when a
    multi-line 520 block follows), and `MalformedAnswer` for anything Asterisk never sends.
    Pure: no socket, so every line a peer could send can be tried without one.
    """
    if line.startswith("200 "):
        match = _ANSWER.fullmatch(line)
        if match is None:
            raise MalformedAnswer(f"malformed answer to {_verb(command)}: {line[:80]!r}")
        result, data, endpos, note = match.groups()
        return Answer(result, data, int(endpos) if endpos is not None else None, note)
    if line == "HANGUP":
        return HANGUP
    if line.startswith("100 result="):
        return TRYING
    if line.startswith("520-"):
        raise UsageError(command, 520, "invalid command syntax", block=True)
    code, _, text = line.partition(" ")
    if not _CODE.fullmatch(code):
        raise MalformedAnswer(f"unexpected answer to {_verb(command)}: {line[:80]!r}")
    if code == "510":
        raise InvalidCommand(command, 510, text)
    if code == "511":
        raise DeadChannel(command, 511, text)
    if code == "520":
        raise UsageError(command, 520, text)
    if code[0] in "12":
        raise MalformedAnswer(f"unexpected answer to {_verb(command)}: {line[:80]!r}")
    raise AGICommandError(command, int(code), text)


def quote(value: str) -> str:
    """Quote one argument so Asterisk's parser reads it back as exactly one argument.

    Asterisk honours `\\` escapes inside quotes; a newline, carriage return or NUL would end
    the command line early (and start another), so those are refused, never sent.
    """
    if "\n" in value or "\r" in value or "\x00" in value:
        raise UnsafeArgument(f"refusing to send a value with a line break or NUL: {value[:40]!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=256)  # the names come from code and config: a handful
def check_name(name: str) -> str:
    """A variable, function or application name: letters, digits, `_`, `.`, one `(args)`."""
    if not _NAME.match(name):
        raise UnsafeArgument(f"not a valid Asterisk variable or application name: {name[:40]!r}")
    return name


class AGIStream(asyncio.BufferedProtocol):
    """One FastAGI connection: the environment, then one command and its answer at a time.

    It is the connection's asyncio protocol itself: bytes land in one buffer and a waiting
    read is woken directly, without the StreamReader/StreamWriter layers in between (the
    wire is small, strictly request/answer, and this is the service's hot path).
    It is a buffered protocol because asyncio reads a plain protocol's socket with
    `recv(256 KiB)`: glibc may serve each such read with mmap, mremap and munmap, depending
    on how the process's heap happens to lie (bench/README.md).
    `hangup_noticed` turns true when Asterisk says `HANGUP`; the caller's channel is gone
    for the script from then on, although commands that work on dead channels still answer.
    """

    def __init__(
        self,
        *,
        answer_timeout: float,
        max_line: int,
        on_connect: Callable[[AGIStream], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        self._answer_timeout = answer_timeout
        self._max_line = max_line
        self._on_connect = on_connect
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._chunk = memoryview(bytearray(_READ_CHUNK))  # what the socket is read into
        self._eof = False
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.hangup_noticed = False
        self._broken: str | None = None  # set once a read timed out: the stream is out of step
        self._deadline = 0.0
        self._deadline_what = ""  # what the pending read waits for: an env block or a command
        self._deadline_seconds = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.peer = "?"

    # --- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peername = transport.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peername[0]}:{peername[1]}"
        if self._on_connect is not None:
            self._on_connect(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._chunk

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._chunk[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        self._buffer += data
        if len(self._buffer) > 2 * self._max_line and not self._paused:
            self._paused = True  # a flood: stop reading until a read consumes the buffer
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _more(self) -> asyncio.Future[None]:
        """A future that the next bytes, the end of input or the deadline complete.

        Awaited directly, not through a coroutine: a read waits here once per answer. A
        finished waiter left behind is harmless, as `_wake` skips it.
        """
        if self._paused:
            self._paused = False
            self._transport.resume_reading()
        waiter = self._waiter = self._loop.create_future()
        return waiter

    # --- reading --------------------------------------------------------------

    async def _read_until(self, separator: bytes, what: str) -> bytes:
        """Bytes up to and including `separator`; typed errors for EOF, size and timeouts."""
        buffer = self._buffer
        while True:
            index = buffer.find(separator, 0, self._max_line + len(separator))
            if index >= 0:
                end = index + len(separator)
                data = bytes(buffer[:end])
                del buffer[:end]
                return data
            if len(buffer) > self._max_line:
                raise LineTooLong(f"{what} longer than the {self._max_line}-byte limit")
            if self._broken:
                raise PeerSilent(self._broken)
            if self._eof:
                if buffer:
                    raise TruncatedInput(f"truncated {what}: {bytes(buffer[:80])!r}")
                raise ConnectionLost("Asterisk closed the connection")
            await self._more()

    async def read_environment(self, timeout: float) -> dict[str, str]:
        """Read the `agi_key: value` block up to its empty line; refuse anything else."""
        self._arm(timeout, "")
        try:
            while not self._buffer:
                if self._broken:
                    raise PeerSilent(f"{self._broken} (0 lines received)")
                if self._eof:
                    raise ConnectionLost("Asterisk closed the connection")
                await self._more()
            # The first byte tells an empty block or garbage (HTTP, TLS) at once.
            first = self._buffer[:1]
            if first != b"a":
                what = "an empty environment block" if first == b"\n" else f"{bytes(first)!r}"
                raise MalformedAnswer(f"not a FastAGI environment block: starts with {what}")
            try:
                raw = await self._read_until(b"\n\n", "environment block")
            except PeerSilent:
                lines = self._buffer.count(b"\n")
                raise PeerSilent(f"{self._broken} ({lines} lines received)") from None
            except TruncatedInput:
                lines = self._buffer.count(b"\n")
                raise TruncatedInput(f"environment block cut off after {lines} lines") from None
        finally:
            self._deadline = 0.0
        text = raw[:-1].decode("utf-8", "replace")
        pairs = _ENV_LINES.findall(text)
        if len(pairs) != text.count("\n"):
            bad = next(line for line in text.split("\n") if not _ENV_LINES.fullmatch(line + "\n"))
            raise MalformedAnswer(f"malformed environment line: {bad[:80]!r}")
        if len(pairs) > _MAX_ENV_LINES:
            raise MalformedAnswer("environment block has too many lines")
        env = dict(pairs)
        if "agi_network_script" not in env and "agi_request" not in env:
            raise MalformedAnswer("environment block names no request (agi_network_script)")
        return env

    async def _readline(self) -> str:
        raw = await self._read_until(b"\n", "line")
        return raw.decode("utf-8", "replace").rstrip("\r\n")

    # --- commands ---------------------------------------------------------------

    async def command(self, line: str) -> Answer:
        """Send one command line and return its `200` answer, or raise the typed error."""
        if "\n" in line or "\r" in line or "\x00" in line:
            raise UnsafeArgument(f"refusing to send a command with a line break: {line[:40]!r}")
        if self._broken:
            # A late answer may still arrive; it must not be read as this command's answer.
            raise PeerSilent(f"not sending {line.split(' ', 1)[0]}: {self._broken}")
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionLost("connection already closed")
        transport.write(line.encode() + b"\n")
        self._arm(self._answer_timeout, line)
        try:
            return await self._read_answer(line)
        finally:
            self._deadline = 0.0

    def _arm(self, seconds: float, command: str) -> None:
        """Set the deadline for the read about to start.

        One timer serves the whole session and is re-armed only when it fires early, so a
        command costs a clock read instead of scheduling and cancelling a timer. When the
        deadline passes, the stream is marked out of step and the connection aborted,
        which ends the pending read.
        """
        self._deadline = self._loop.time() + seconds
        self._deadline_what = command  # the message is built only if the deadline passes
        self._deadline_seconds = seconds
        if self._timer is None or self._timer.when() > self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._deadline:
            return
        if self._loop.time() >= self._deadline:
            what = self._deadline_what
            self._broken = (
                f"no answer to {what.split(' ', 1)[0]} within {self._deadline_seconds:g}s" if what
                else f"no complete environment block within {self._deadline_seconds:g}s"
            )
            self._eof = True
            self._wake()
            if self._transport is not None:
                self._transport.abort()
        else:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    async def _read_answer(self, command: str) -> Answer:
        """Read lines until `command`'s answer: at most one HANGUP and one `100 Trying` first."""
        seen: tuple[Notice, ...] = ()
        while True:
            line = await self._readline()
            try:
                parsed = parse_answer(line, command)
            except UsageError as exc:
                if exc.block:
                    await self._skip_usage_block()
                raise
            if type(parsed) is Answer:
                return parsed
            if parsed in seen:
                raise MalformedAnswer(f"{line[:20]!r} twice before the answer to {command.split(' ', 1)[0]}")
            seen += (parsed,)
            if parsed == HANGUP:
                self.hangup_noticed = True
            else:
                # A GOSUB runs dialplan for as long as the routine takes; its answer comes after.
                self._arm(self._answer_timeout, command)

    async def _skip_usage_block(self) -> None:
        for _ in range(_USAGE_BLOCK_LINES):
            if (await self._readline()).startswith("520 "):
                return
        raise MalformedAnswer("520 usage block never ended")

    def abort(self) -> None:
        """Drop the connection without a word (refused clients)."""
        if self._transport is not None:
            self._transport.abort()

    async def close(self) -> None:
        """Close our side; Asterisk then resumes the dialplan (or ends the feature)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()
