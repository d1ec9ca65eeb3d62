"""The channel an action works on: what it can ask Asterisk to do, in call terms.

Actions speak to a `Channel`, never to the socket. It turns answers into meaning: a missing
prompt, a caller who hung up, an application that is not loaded. Caller-supplied text may go
into `set_variable` values (Asterisk stores them verbatim) but never into `exec` arguments,
which the application splits at commas. (Asterisk 22 does not expand `${...}` in EXEC
arguments unless the channel sets AGIEXECFULL, so channel names are passed literally.)
"""

from __future__ import annotations

import re

from calmline.errors import (
    ApplicationMissing,
    CallerHungUp,
    MalformedAnswer,
    PromptMissing,
    UnsafeArgument,
)
from calmline.fastagi.protocol import AGIStream, Answer, check_name, quote

_SNAPSHOT_SEPARATOR = "]|["
_CHANNEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9/@;._+:#*-]*$")


def channel_argument(name: str) -> str:
    """A channel name safe to place in an application's argument list (no commas, spaces)."""
    if not _CHANNEL_NAME.match(name):
        raise UnsafeArgument(f"refusing to pass an unexpected channel name to an application: {name[:60]!r}")
    return name


class Channel:
    """Commands on the channel the AGI runs on, with hangups turned into `CallerHungUp`."""

    __slots__ = ("_stream", "name", "_released")

    def __init__(self, stream: AGIStream, name: str, *, dead_ok: bool = False):
        self._stream = stream
        self.name = name
        # An action run from a hangup handler works on a channel that is already gone.
        self._released = dead_ok

    @property
    def alive(self) -> bool:
        """False once Asterisk said HANGUP or this session let the channel go."""
        return not (self._stream.hangup_noticed or self._released)

    async def _run(self, line: str) -> Answer:
        answer = await self._stream.command(line)
        if self._stream.hangup_noticed and not self._released:
            raise CallerHungUp(f"channel hung up (noticed during {line.split(' ', 1)[0]})")
        return answer

    async def evaluate(self, expression: str) -> str:
        """Evaluate a dialplan expression such as `${CHANNEL(linkedid)}` on this channel."""
        answer = await self._run(f"GET FULL VARIABLE {quote(expression)}")
        return (answer.data or "") if answer.result == 1 else ""

    async def snapshot(self, names: list[str]) -> dict[str, str]:
        """Read several variables or functions in one round trip (unset ones read as "")."""
        for name in names:
            check_name(name)
        joined = _SNAPSHOT_SEPARATOR.join("${%s}" % name for name in names)
        values = (await self.evaluate(joined)).split(_SNAPSHOT_SEPARATOR)
        if len(values) != len(names):
            # A value contained the separator: fall back to one question per name.
            values = [await self.evaluate("${%s}" % name) for name in names]
        return dict(zip(names, values, strict=True))

    async def set_variable(self, name: str, value: str) -> None:
        """Set a channel variable (or a writable function such as `CDR(userfield)`)."""
        await self._run(f"SET VARIABLE {check_name(name)} {quote(value)}")

    async def set_variable_on(self, other: str, name: str, value: str) -> None:
        """Set a variable on another channel (the caller, from the agent's channel).

        Uses Asterisk's EXPORT() function (func_export, loaded by default with autoload).
        """
        await self._run(
            f"SET VARIABLE EXPORT({channel_argument(other)},{check_name(name)}) {quote(value)}"
        )

    async def stream_file(self, prompt: str) -> None:
        """Play a prompt to the end; no digit interrupts it."""
        answer = await self._run(f'STREAM FILE {quote(prompt)} ""')
        if answer.result == -1:
            if answer.endpos:
                raise CallerHungUp(f"channel hung up during prompt {prompt!r}")
            raise PromptMissing(prompt)
        if answer.result != 0:
            # No escape digits were offered: any other answer is not one Asterisk gives.
            raise MalformedAnswer(f"STREAM FILE answered result={answer.text[:20]!r}, which is not one of its escape digits (none were offered)")

    async def get_data(self, prompt: str, timeout_ms: int, max_digits: int) -> str | None:
        """Play a prompt and collect digits ending in `#`; None on timeout with nothing keyed."""
        answer = await self._run(f"GET DATA {quote(prompt)} {timeout_ms:d} {max_digits:d}")
        if answer.text == "-1":
            raise CallerHungUp("channel hung up while keying digits")
        if answer.data == "timeout" and not answer.text:
            return None
        return answer.text

    async def exec(self, application: str, arguments: str = "") -> int:
        """Run a dialplan application; `arguments` must hold no caller-supplied text."""
        line = f"EXEC {check_name(application)}"
        if arguments:
            line += " " + quote(arguments)
        answer = await self._run(line)
        if answer.result == -2:
            raise ApplicationMissing(application)
        return answer.result or 0

    async def redirect(self, context: str, exten: str, *, other: str | None = None) -> None:
        """Move this channel (or `other`) out of its bridge to a dialplan location.

        Redirecting this channel takes it away from the AGI: later hangup notices are expected.
        """
        target = other if other is not None else self.name
        await self.exec("ChannelRedirect", f"{channel_argument(target)},{context},{exten},1")
        if other is None:
            self._released = True

    async def hangup(self) -> None:
        """Hang this channel up; the bridge ends and the other party's leg is freed."""
        self._released = True
        await self._stream.command("HANGUP")

    async def verbose(self, message: str, level: int = 1) -> None:
        """A line on the Asterisk console, for admins watching `core set verbose`."""
        await self._stream.command(f"VERBOSE {quote(message)} {level:d}")

    async def set_status(self, name: str, value: str) -> None:
        """Set a variable even after a hangup (SET VARIABLE works on dead channels)."""
        await self._stream.command(f"SET VARIABLE {check_name(name)} {quote(value)}")
