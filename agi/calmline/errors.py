"""Typed errors: raised where a problem is found, caught once at the session boundary.

Each error carries the audit outcome and the dialplan status it turns into, so the
session maps any failure to the right record without a chain of isinstance checks.
"""

from __future__ import annotations


class CalmlineError(Exception):
    """Base of every error calmline raises on purpose."""

    outcome = "failed"
    status = "failed"


class ConfigError(CalmlineError):
    """A config file is missing, unreadable or invalid; `problems` are one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class UnsafeArgument(CalmlineError, ValueError):
    """A value would break or extend an AGI command (newline, NUL, bad name)."""

    outcome = "unsafe_argument"


# --- the wire -------------------------------------------------------------


class ProtocolError(CalmlineError):
    """The peer broke the FastAGI protocol: malformed, oversized, truncated or silent."""

    outcome = "protocol_error"


class MalformedAnswer(ProtocolError):
    """A line that is none of the answers Asterisk sends (or numbers no parser should trust)."""


class TruncatedInput(ProtocolError):
    """The peer closed the socket in the middle of a line or of the environment block."""


class LineTooLong(ProtocolError):
    """A line or environment block longer than `server.max_line_bytes`."""


class PeerSilent(ProtocolError):
    """No complete answer (or environment block) within its timeout; the stream is out of step."""


class ConnectionLost(ProtocolError):
    """Asterisk closed the socket; the call is gone as far as this session can tell."""

    outcome = "caller_hung_up"
    status = "hungup"


class AGICommandError(CalmlineError):
    """Asterisk refused a command; `code` is its answer code, `text` its message."""

    outcome = "agi_error"

    def __init__(self, command: str, code: int, text: str):
        self.command = command
        self.code = code
        self.text = text
        super().__init__(f"{command.split(' ', 1)[0]}: {code} {text}")


class InvalidCommand(AGICommandError):
    """510: Asterisk does not know the command."""


class UsageError(AGICommandError):
    """520: the command's syntax was wrong (the usage block has been consumed).

    `block` is true when the answer opened a multi-line usage block (`520-`), which the
    reader must consume before anything else is read.
    """

    def __init__(self, command: str, code: int, text: str, *, block: bool = False):
        self.block = block
        super().__init__(command, code, text)


class DeadChannel(AGICommandError):
    """511: the command needs a live channel and this one has hung up or left."""

    outcome = "caller_hung_up"
    status = "hungup"


# --- the call -------------------------------------------------------------


class CallerHungUp(CalmlineError):
    """The channel hung up while the action ran; the action stops, nothing else is wrong."""

    outcome = "caller_hung_up"
    status = "hungup"


class PromptMissing(CalmlineError):
    """Asterisk found no sound file for a prompt (`result=-1 endpos=0`)."""

    outcome = "prompt_missing"

    def __init__(self, prompt: str):
        self.prompt = prompt
        super().__init__(f"prompt {prompt!r} is not installed in Asterisk's sounds directory")


class ApplicationMissing(CalmlineError):
    """EXEC named an application that is not loaded (`result=-2`)."""

    outcome = "application_missing"

    def __init__(self, application: str):
        self.application = application
        super().__init__(f"Asterisk application {application!r} is not loaded")


class Refused(CalmlineError):
    """The session was refused before any action ran (unknown path, busy, not allowed)."""

    outcome = "refused"
    status = "refused"


class StoreError(ConfigError):
    """The store cannot be opened, migrated or written at start; one line naming the key."""

    def __init__(self, problem: str):
        super().__init__([problem])
