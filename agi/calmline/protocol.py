"""The FastAGI wire: the only code that reads from or writes to Asterisk's socket.

It knows the framing Asterisk 22 really uses (see ../shared/asterisk/README.md): the
environment block, `200 result=N (data) endpos=N` answers, the bare `HANGUP` notice that
arrives in front of the next answer, the multi-line 520 usage block, and 510/511.
Everything above this module sees typed answers and typed errors, never bytes.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from calmline.errors import (
    AGICommandError,
    ConnectionLost,
    DeadChannel,
    InvalidCommand,
    ProtocolError,
    UnsafeArgument,
    UsageError,
)

_ANSWER = re.compile(
    r"^200 result=(?P<result>\S*)(?: \((?P<data>.*)\))?(?: endpos=(?P<endpos>-?\d+))?$"
)
_ENV_LINE = re.compile(r"^(agi_[a-z0-9_]+): ?(.*)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*(\([A-Za-z0-9_,.-]*\))?$")
_COMMAND_WORD = re.compile(r"^[A-Z][A-Z ]*[A-Z]$")
_MAX_ENV_LINES = 200


@dataclass(frozen=True, slots=True)
class Answer:
    """A `200` answer: `result`, the optional `(data)` and the optional `endpos`.

    `text` is the result as sent: GET DATA answers with keyed digits (`0123`, `*1`, or
    nothing), which are not a number; `result` is its integer value where it is one.
    """

    text: str
    data: str | None = None
    endpos: int | None = None

    @property
    def result(self) -> int | None:
        try:
            return int(self.text)
        except ValueError:
            return None


def quote(value: str) -> str:
    """Quote one argument so Asterisk's parser reads it back as exactly one argument.

    Asterisk honours `\\` escapes inside quotes; a newline, carriage return or NUL would end
    the command line early (and start another), so those are refused, never sent.
    """
    if any(c in value for c in "\r\n\x00"):
        raise UnsafeArgument(f"refusing to send a value with a line break or NUL: {value[:40]!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_name(name: str) -> str:
    """A variable, function or application name: letters, digits, `_`, `.`, one `(args)`."""
    if not _NAME.match(name):
        raise UnsafeArgument(f"not a valid Asterisk variable or application name: {name[:40]!r}")
    return name


class AGIStream:
    """One FastAGI connection: the environment, then one command and its answer at a time.

    `hangup_noticed` turns true when Asterisk says `HANGUP`; the caller's channel is gone
    for the script from then on, although commands that work on dead channels still answer.
    """

    __slots__ = ("_reader", "_writer", "_answer_timeout", "_max_line", "hangup_noticed", "_broken")

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        answer_timeout: float,
        max_line: int,
    ):
        self._reader = reader
        self._max_line = max_line
        self._writer = writer
        self._answer_timeout = answer_timeout
        self.hangup_noticed = False
        self._broken: str | None = None  # set once an answer timed out: the stream is out of step

    async def read_environment(self, timeout: float) -> dict[str, str]:
        """Read `agi_key: value` lines up to the empty line; refuse anything else."""
        env: dict[str, str] = {}
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        line = await self._readline()
                    except ConnectionLost:
                        if env:
                            raise ProtocolError(
                                f"environment block cut off after {len(env)} lines"
                            ) from None
                        raise
                    if line == "":
                        break
                    match = _ENV_LINE.match(line)
                    if match is None:
                        raise ProtocolError(f"malformed environment line: {line[:80]!r}")
                    if len(env) >= _MAX_ENV_LINES:
                        raise ProtocolError("environment block has too many lines")
                    env[match.group(1)] = match.group(2)
        except TimeoutError:
            raise ProtocolError(
                f"no complete environment block within {timeout:g}s "
                f"({len(env)} lines received)"
            ) from None
        if "agi_network_script" not in env and "agi_request" not in env:
            raise ProtocolError("environment block names no request (agi_network_script)")
        return env

    async def command(self, line: str) -> Answer:
        """Send one command line and return its `200` answer, or raise the typed error."""
        if any(c in line for c in "\r\n\x00"):
            raise UnsafeArgument(f"refusing to send a command with a line break: {line[:40]!r}")
        if self._broken:
            # A late answer may still arrive; it must not be read as this command's answer.
            raise ProtocolError(f"not sending {line.split(' ', 1)[0]}: {self._broken}")
        self._writer.write(line.encode() + b"\n")
        try:
            async with asyncio.timeout(self._answer_timeout):
                await self._writer.drain()
                return await self._read_answer(line)
        except TimeoutError:
            self._broken = f"no answer to {line.split(' ', 1)[0]} within {self._answer_timeout:g}s"
            raise ProtocolError(self._broken) from None
        except (ConnectionError, OSError) as exc:
            raise ConnectionLost(f"connection lost: {exc}") from None

    async def _read_answer(self, command: str) -> Answer:
        line = await self._readline()
        if line == "HANGUP":
            self.hangup_noticed = True
            line = await self._readline()
        if line.startswith("200"):
            match = _ANSWER.match(line)
            if match is None:
                raise ProtocolError(f"malformed answer to {command.split(' ', 1)[0]}: {line[:80]!r}")
            endpos = match.group("endpos")
            return Answer(
                match.group("result"),
                match.group("data"),
                int(endpos) if endpos is not None else None,
            )
        if line.startswith("520-"):
            await self._skip_usage_block()
            raise UsageError(command, 520, "invalid command syntax")
        code, _, text = line.partition(" ")
        if code == "510":
            raise InvalidCommand(command, 510, text)
        if code == "511":
            raise DeadChannel(command, 511, text)
        if code == "520":
            raise UsageError(command, 520, text)
        if code.isdigit():
            raise AGICommandError(command, int(code), text)
        raise ProtocolError(f"unexpected answer to {command.split(' ', 1)[0]}: {line[:80]!r}")

    async def _skip_usage_block(self) -> None:
        for _ in range(1000):
            if (await self._readline()).startswith("520 "):
                return
        raise ProtocolError("520 usage block never ended")

    async def _readline(self) -> str:
        try:
            raw = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise ProtocolError(f"truncated line: {exc.partial[:80]!r}") from None
            raise ConnectionLost("Asterisk closed the connection") from None
        except asyncio.LimitOverrunError:
            raise ProtocolError(f"line longer than the {self._max_line}-byte limit") from None
        except (ConnectionError, OSError) as exc:
            raise ConnectionLost(f"connection lost: {exc}") from None
        return raw.decode("utf-8", "replace").rstrip("\r\n")

    async def close(self) -> None:
        """Close our side; Asterisk then resumes the dialplan (or ends the feature)."""
        try:
            self._writer.close()
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass
