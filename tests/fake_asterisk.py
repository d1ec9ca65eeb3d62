"""A fake Asterisk that speaks FastAGI over a real TCP socket, modelled on real transcripts.

`FakeChannel` answers commands the way Asterisk 22 does in ../shared/asterisk/transcripts:
the same answer lines, the lazy `HANGUP` notice, 511 on a dead channel for commands that
need a live one, the 520 usage block, `result=-1 endpos=0` for a missing prompt.
`test_fake_fidelity.py` replays every transcript through it and compares byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "asterisk"
TRANSCRIPTS = SHARED / "transcripts"

# Commands Asterisk 22 allows on a dead channel (res_agi.c, the `dead` column).
DEAD_OK = {"EXEC", "GET FULL VARIABLE", "GET VARIABLE", "SET VARIABLE", "VERBOSE", "NOOP",
           "DATABASE GET", "DATABASE PUT", "DATABASE DEL", "DATABASE DELTREE", "ASYNCAGI BREAK"}
KNOWN_APPS = {"ChannelRedirect", "Set", "CELGenUserEvent", "UserEvent", "Playback", "Wait",
              "Verbose", "NoOp", "Hangup", "StartMusicOnHold", "StopMusicOnHold", "Originate"}

USAGE = {
    "STREAM FILE": [
        "520-Invalid command syntax.  Proper usage follows:\n",
        "Send the given file, allowing playback to be interrupted by the given digits, if any. "
        "Returns <literal>0</literal> if playback completes without a digit being pressed, or the "
        "ASCII numerical value of the digit if one was pressed, or <literal>-1</literal> on error or "
        "if the channel was disconnected. If musiconhold is playing before calling stream file it "
        "will be automatically stopped and will not be restarted after completion.\n",
        "It sets the following channel variables upon completion:\n",
        "<variable>PLAYBACKSTATUS</variable>: The status of the playback attempt as a text string.\n",
        "    <value>SUCCESS</value>\n",
        "    <value>FAILED</value>\n",
        "520 End of proper usage.\n",
    ],
    "GET VARIABLE": [
        "520-Invalid command syntax.  Proper usage follows:\n",
        "Returns <literal>0</literal> if <replaceable>variablename</replaceable> is not set. "
        "Returns <literal>1</literal> if <replaceable>variablename</replaceable> is set and returns "
        "the variable in parentheses.\n",
        "Example return code: 200 result=1 (testvariable)\n",
        "520 End of proper usage.\n",
    ],
}
MIN_ARGS = {"STREAM FILE": 4, "GET VARIABLE": 3, "SET VARIABLE": 4, "GET FULL VARIABLE": 4,
            "GET DATA": 3, "EXEC": 2}
COMMANDS = sorted(
    ["GET FULL VARIABLE", "GET VARIABLE", "SET VARIABLE", "STREAM FILE", "HANGUP", "EXEC",
     "VERBOSE", "NOOP", "CHANNEL STATUS", "GET DATA", "DATABASE GET", "ANSWER"],
    key=len, reverse=True,
)


MAX_ARGS = 128  # res_agi.c


def parse_args(line: str) -> list[str]:
    """Asterisk's own argument parser (res_agi.c parse_args), ported as it is."""
    argv: list[str] = []
    quoted = escaped = False
    whitespace = True
    for ch in line:
        if ch == '"' and not escaped:
            quoted = not quoted
            if quoted and whitespace:
                argv.append("")
                whitespace = False
            escaped = False
            continue
        if ch in " \t" and not quoted and not escaped:
            whitespace = True
            continue
        if ch == "\\" and not escaped:
            escaped = True
            continue
        if whitespace:
            if len(argv) >= MAX_ARGS - 1:
                continue  # "Too many arguments, truncating": the character is dropped
            argv.append("")
            whitespace = False
        argv[-1] += ch
        escaped = False
    return argv


@dataclass
class FakeChannel:
    """One channel's state as the AGI sees it, and how Asterisk answers each command."""

    name: str = "Local/caller@sim-caller-00000016;1"
    variables: dict[str, str] = field(default_factory=dict)
    functions: dict[str, str] = field(default_factory=dict)
    prompts: dict[str, int] = field(default_factory=dict)
    hangup_before: int | None = None
    hangup_during_prompt: int | None = None
    hangup_endpos: int | None = None  # where the prompt stood when the caller hung up
    digits: list[str] = field(default_factory=list)
    hung_up: bool = False
    notice_sent: bool = False
    commands: list[str] = field(default_factory=list)
    apps_run: list[tuple[str, str]] = field(default_factory=list)
    exported: list[tuple[str, str, str]] = field(default_factory=list)
    max_command_len: int = 8192

    def _expand(self, text: str) -> str:
        def one(match: re.Match) -> str:
            name = match.group(1)
            if name == "CHANNEL":
                return self.name
            if name in self.functions:
                return self.functions[name]
            return self.variables.get(name, "")

        return re.sub(r"\$\{([^}]+)\}", one, text)

    def answer(self, line: str) -> list[str]:
        """The lines Asterisk would write in reply to one command line."""
        index = len(self.commands)
        self.commands.append(line)
        if self.hangup_before is not None and index >= self.hangup_before:
            self.hung_up = True
        out: list[str] = []
        if self.hung_up and not self.notice_sent:
            out.append("HANGUP\n")
            self.notice_sent = True
        argv = parse_args(line[: self.max_command_len])
        upper = [a.upper() for a in argv]
        command = next((c for c in COMMANDS if upper[: len(c.split())] == c.split()), None)
        if command is None:
            return out + ["510 Invalid or unknown command\n"]
        # res_agi.c agi_handle_command: a dead channel refuses before the handler checks usage.
        if self.hung_up and command not in DEAD_OK:
            return out + ["511 Command Not Permitted on a dead channel or intercept routine\n"]
        if len(argv) < MIN_ARGS.get(command, 1):
            return out + USAGE.get(command, ["520 Invalid command syntax.  Proper usage not available.\n"])
        return out + [self._run(command, argv, index)]

    def _run(self, command: str, argv: list[str], index: int) -> str:
        if command == "GET VARIABLE":
            name = argv[2]
            if name == "CHANNEL":
                return f"200 result=1 ({self.name})\n"
            if name in self.variables:
                return f"200 result=1 ({self.variables[name]})\n"
            return "200 result=0\n"
        if command == "GET FULL VARIABLE":
            return f"200 result=1 ({self._expand(argv[3])})\n"
        if command == "SET VARIABLE":
            exported = re.match(r"^EXPORT\(([^,]+),(.+)\)$", argv[2])
            if exported:
                self.exported.append((exported.group(1), exported.group(2).lstrip("_"), argv[3]))
                return "200 result=1\n"
            # `__NAME` (inherited) is read back as NAME, as on Asterisk.
            self.variables[argv[2].lstrip("_")] = argv[3]
            return "200 result=1\n"
        if command == "STREAM FILE":
            name = argv[2]
            if name not in self.prompts:
                return "200 result=-1 endpos=0\n"
            if self.hangup_during_prompt is not None and index >= self.hangup_during_prompt:
                self.hung_up = True
                endpos = self.hangup_endpos if self.hangup_endpos is not None else self.prompts[name] // 2
                return f"200 result=-1 endpos={endpos}\n"
            return f"200 result=0 endpos={self.prompts[name]}\n"
        if command == "HANGUP":
            self.hung_up = True
            return "200 result=1\n"
        if command == "EXEC":
            app = argv[1]
            data = argv[2] if len(argv) > 2 else ""
            if app not in KNOWN_APPS:
                return "200 result=-2\n"
            # Asterisk 22 passes EXEC arguments literally (no ${...} expansion) unless the
            # channel sets AGIEXECFULL: seen on the real one as "No such channel: ${CHANNEL}".
            if self.variables.get("AGIEXECFULL", "").lower() == "yes":
                data = self._expand(data)
            self.apps_run.append((app, data))
            if app == "ChannelRedirect":
                target = data.split(",")[0]
                if target == self.name:
                    self.hung_up = True
            if app == "Set" and "=" in data:
                key, _, value = data.partition("=")
                self.variables[key] = value
            return "200 result=0\n"
        if command == "GET DATA":
            if not self.digits:
                return "200 result= (timeout)\n"
            return f"200 result={self.digits.pop(0)}\n"
        if command == "VERBOSE":
            return "200 result=1\n"
        if command == "CHANNEL STATUS":
            return "200 result=6\n"
        if command in {"NOOP", "DATABASE GET", "ANSWER"}:
            return "200 result=0\n"
        return "510 Invalid or unknown command\n"


def environment(
    script: str = "warn",
    *,
    channel: str = "Local/caller@sim-caller-00000016;1",
    uniqueid: str = "1795350788.44",
    callerid: str = "+15551234567",
    calleridname: str = 'Angry "Bob" Smith',
    args: list[str] | None = None,
    port: int = 4573,
) -> list[str]:
    """An environment block as Asterisk 22 sends it over FastAGI (warn-in-bridge.jsonl)."""
    lines = [
        "agi_network: yes",
        f"agi_network_script: {script}",
        f"agi_request: agi://127.0.0.1:{port}/{script}",
        f"agi_channel: {channel}",
        "agi_language: en",
        "agi_type: Local",
        f"agi_uniqueid: {uniqueid}",
        "agi_version: 22.10.1",
        f"agi_callerid: {callerid}",
        f"agi_calleridname: {calleridname}",
        "agi_callingpres: 0",
        "agi_callingani2: 0",
        "agi_callington: 0",
        "agi_callingtns: 0",
        "agi_dnid: unknown",
        "agi_rdnis: unknown",
        "agi_context: support",
        "agi_extension: 100",
        "agi_priority: 4",
        "agi_enhanced: 0.0",
        "agi_accountcode: ",
        "agi_threadid: 139738911827648",
    ]
    lines += [f"agi_arg_{i}: {a}" for i, a in enumerate(args or [], 1)]
    return [line + "\n" for line in lines] + ["\n"]


def bridged_caller(**overrides) -> FakeChannel:
    """The caller's channel in a Dial bridge with an agent, prompts installed."""
    channel = FakeChannel(
        variables={"BRIDGEPEER": "Local/warnscn@sim-agent-00000017;1"},
        functions={"CHANNEL(linkedid)": "1795350788.44", "BRIDGEPEER": "Local/warnscn@sim-agent-00000017;1"},
        prompts={p: 24000 for p in (
            "calmline/warn-1", "calmline/warn-final", "calmline/end", "calmline/transfer-supervisor",
            "calmline/transfer-colleague", "calmline/enter-extension", "calmline/extension-invalid",
            "beep", "vm-goodbye")},
    )
    for key, value in overrides.items():
        setattr(channel, key, value)
    return channel


@dataclass
class Dialogue:
    """What one fake session saw: the commands the server sent and how it ended."""

    commands: list[str]
    closed_by_server: bool


async def run_session(
    port: int,
    channel: FakeChannel,
    env: list[str] | None = None,
    *,
    raw: bytes | None = None,
    timeout: float = 10.0,
) -> Dialogue:
    """Connect as Asterisk would, send the environment, answer commands until the server hangs up."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionResetError:  # refused with a reset before the handshake was seen
        return Dialogue(channel.commands, True)
    writer.write(raw if raw is not None else "".join(env or environment()).encode())
    await writer.drain()
    closed = False
    try:
        async with asyncio.timeout(timeout):
            while True:
                line = await reader.readline()
                if not line:
                    closed = True
                    break
                for reply in channel.answer(line.decode().rstrip("\n")):
                    writer.write(reply.encode())
                await writer.drain()
    except (ConnectionResetError, BrokenPipeError):
        closed = True
    finally:
        writer.close()
    return Dialogue(channel.commands, closed)


def load_transcript(name: str) -> list[dict]:
    return [json.loads(line) for line in (TRANSCRIPTS / name).read_text().splitlines() if line.strip()]
