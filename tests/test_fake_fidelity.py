"""The fake Asterisk must answer exactly as the real Asterisk 22 did in the recorded transcripts.

Each transcript in ../shared/asterisk/transcripts is replayed through a `FakeChannel` set up
like the recorded call (its variables, its prompts and their length, when it hung up); the
fake's answer lines must equal the recorded ones byte for byte, the lazy `HANGUP` notice
included. When they differ, the fake is wrong: the real Asterisk wins.
"""

from __future__ import annotations

import asyncio
import copy
import random

import pytest
from conftest import run
from fake_asterisk import (
    MAX_ARGS,
    TRANSCRIPTS,
    FakeChannel,
    environment,
    load_transcript,
    parse_args,
    run_session,
)

from calmline.errors import UnsafeArgument
from calmline.fastagi.protocol import quote


def _channel_name(records: list[dict]) -> str:
    for record in records:
        if record["dir"] == "env" and record["text"].startswith("agi_channel: "):
            return record["text"].removeprefix("agi_channel: ").rstrip("\n")
    raise AssertionError("transcript has no agi_channel")


# How each recorded call stood, as far as the AGI could tell.
SCENARIOS = {
    "warn-in-bridge.jsonl": dict(
        variables={"BRIDGEPEER": "Local/warnscn@sim-agent-00000017;1"},
        functions={"CHANNEL(linkedid)": "1795350788.44"},
        prompts={"beep": 3520, "vm-goodbye": 7040},
    ),
    "agent-side-feature.jsonl": dict(
        variables={"BRIDGEPEER": "Local/caller@sim-caller-00000002;1"},
        prompts={"beep": 3520},
    ),
    # no-such-prompt is not installed; nothing else matters here.
    "errors.jsonl": dict(prompts={"beep": 3520, "vm-goodbye": 7040}),
    # The script itself hangs up after the prompt (HANGUP command).
    "server-hangs-up.jsonl": dict(prompts={"beep": 3520, "vm-goodbye": 7040}),
    # Second prompt: the caller hung up 4640 samples in.
    "caller-hangs-up-mid-prompt.jsonl": dict(
        prompts={"vm-goodbye": 7040}, hangup_during_prompt=1, hangup_endpos=4640
    ),
    # EXEC ChannelRedirect of its own channel: dead for the AGI from then on.
    "redirect-caller.jsonl": dict(prompts={"beep": 3520}),
    "feature-args.jsonl": dict(),
}


def _fake_for(name: str) -> FakeChannel:
    records = load_transcript(name)
    return FakeChannel(name=_channel_name(records), **copy.deepcopy(SCENARIOS[name]))


def _exchanges(records: list[dict]) -> list[tuple[str, list[str]]]:
    """(command, the answer lines that followed it) in order."""
    out: list[tuple[str, list[str]]] = []
    for record in records:
        if record["dir"] == "cmd":
            out.append((record["text"], []))
        elif record["dir"] == "res":
            assert out, "an answer before any command"
            out[-1][1].append(record["text"])
    return out


def test_every_transcript_has_a_scenario():
    names = sorted(p.name for p in TRANSCRIPTS.glob("*.jsonl"))
    assert names, f"no transcripts in {TRANSCRIPTS}"
    assert names == sorted(SCENARIOS)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_fake_answers_every_command_as_recorded(name):
    records = load_transcript(name)
    fake = _fake_for(name)
    exchanges = _exchanges(records)
    assert exchanges
    for i, (command, recorded) in enumerate(exchanges):
        answered = fake.answer(command)
        assert "".join(answered).encode() == "".join(recorded).encode(), (
            f"{name}: command #{i} {command!r}"
        )
    assert fake.commands == [c for c, _ in exchanges]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_fake_replays_transcript_over_a_socket_byte_for_byte(name):
    """The same, through run_session's real socket: env bytes in, answer bytes out, nothing more."""
    records = load_transcript(name)
    env = [r["text"] for r in records if r["dir"] == "env"]
    commands = [r["text"] for r in records if r["dir"] == "cmd"]
    expected = "".join(r["text"] for r in records if r["dir"] == "res").encode()
    seen: dict[str, bytes] = {}
    finished = asyncio.Event()

    async def asterisk_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        env_bytes = b""
        while not env_bytes.endswith(b"\n\n"):
            env_bytes += await reader.readline()
        seen["env"] = env_bytes
        for command in commands:
            writer.write(command.encode() + b"\n")
        await writer.drain()
        seen["answers"] = await reader.readexactly(len(expected))
        writer.write_eof()
        seen["extra"] = await reader.read()
        writer.close()
        finished.set()

    async def main():
        server = await asyncio.start_server(asterisk_side, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            dialogue = await run_session(port, _fake_for(name), env, timeout=5)
            await asyncio.wait_for(finished.wait(), 5)
        return dialogue

    dialogue = run(main())
    assert seen["env"] == "".join(env).encode()
    assert seen["answers"] == expected
    assert seen["extra"] == b""
    assert dialogue.commands == commands
    assert dialogue.closed_by_server


def _env_keys(lines: list[str]) -> list[str]:
    assert lines[-1] == "\n", "an environment block ends with an empty line"
    return [line.split(":", 1)[0] for line in lines[:-1]]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_environment_has_the_recorded_keys_in_the_recorded_order(name):
    recorded = [r["text"] for r in load_transcript(name) if r["dir"] == "env"]
    recorded_keys = _env_keys(recorded)
    args = [line.split(": ", 1)[1].rstrip("\n") for line in recorded if line.startswith("agi_arg_")]
    assert _env_keys(environment(args=args)) == recorded_keys
    # Every line is `key: value` with exactly one space, as Asterisk writes it.
    for line in environment(args=args)[:-1]:
        key, sep, _ = line.partition(": ")
        assert sep and key.startswith("agi_") and line.endswith("\n") and line.count("\n") == 1


def test_environment_is_byte_exact_for_the_warn_transcript():
    recorded = [r["text"] for r in load_transcript("warn-in-bridge.jsonl") if r["dir"] == "env"]
    assert environment("probe-warn?step=1", uniqueid="1795350788.44") == recorded


def test_environment_is_byte_exact_for_feature_arguments():
    recorded = [r["text"] for r in load_transcript("feature-args.jsonl") if r["dir"] == "env"]
    built = environment(
        "probe-args",
        channel="Local/caller@sim-caller-0000000c;1",
        uniqueid="1795350686.24",
        args=["first arg", "quoted", " arg", "third"],
    )
    assert built == recorded


# --- Asterisk's argument parser against calmline's quoting --------------------------------

TRICKY = [
    "",
    " ",
    "plain",
    "two words",
    'Angry "Bob" Smith',
    'has "quotes" inside',
    '"',
    '""',
    "\\",
    "trailing backslash\\",
    "\\\\double",
    '\\"',
    'ends with quote"',
    "${EXEC(System(touch /tmp/x))}",
    "${CHANNEL(linkedid)}]|[${BRIDGEPEER}",
    "a,b,c|d;e",
    "tab\there",
    "  leading and trailing  ",
    "Zoë Ångström — 李小龍 🙂",
    "\x01\x1b[31mansi\x7f",
    "(paren) endpos=12",
]


@pytest.mark.parametrize("value", TRICKY)
def test_quote_round_trips_through_asterisks_parser(value):
    assert parse_args(quote(value)) == [value]
    line = f"SET VARIABLE CALMLINE_X {quote(value)}"
    assert parse_args(line) == ["SET", "VARIABLE", "CALMLINE_X", value]
    # Asterisk parses bytes, not characters: same result on the UTF-8 bytes.
    as_bytes = parse_args(line.encode("utf-8").decode("latin-1"))
    assert [a.encode("latin-1") for a in as_bytes][-1] == value.encode("utf-8")


def test_quote_round_trips_random_strings():
    rng = random.Random(20251125)
    alphabet = ['"', "\\", " ", "\t", "$", "{", "}", "(", ")", ",", "|", "a", "é", "🙂", "\x7f"]
    for _ in range(3000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        assert parse_args(quote(value)) == [value], repr(value)
        assert parse_args(f"EXEC Set {quote(value)}") == ["EXEC", "Set", value], repr(value)


def test_quote_matches_what_the_real_asterisk_round_tripped():
    recorded = [r["text"] for r in load_transcript("errors.jsonl") if r["dir"] == "cmd"]
    assert "SET VARIABLE X " + quote('has "quotes" inside') in recorded


@pytest.mark.parametrize("bad", ["\n", "\r", "\x00", "a\nSTREAM FILE x", "x\r", "\x00y", "a\r\nb"])
def test_quote_refuses_line_breaks_and_nul(bad):
    with pytest.raises(UnsafeArgument):
        quote(bad)
    with pytest.raises(ValueError):  # UnsafeArgument is also a ValueError
        quote(bad)


@pytest.mark.parametrize(
    ("line", "argv"),
    [
        ("GET VARIABLE X", ["GET", "VARIABLE", "X"]),
        ("a  \t b", ["a", "b"]),
        ('STREAM FILE beep ""', ["STREAM", "FILE", "beep", ""]),
        ('"a"b', ["ab"]),
        ('a"b c"d', ["ab cd"]),
        ("a\\ b", ["a b"]),
        ("a\\\\b", ["a\\b"]),
        ("a\\b", ["ab"]),
        ('"unterminated arg', ["unterminated arg"]),
        ("end\\", ["end"]),
        ('\\"x\\"', ['"x"']),
        ("", []),
        ("   ", []),
    ],
)
def test_parse_args_follows_res_agi_c(line, argv):
    assert parse_args(line) == argv


def test_parse_args_truncates_at_max_args_like_asterisk():
    words = [f"w{i}" for i in range(MAX_ARGS + 20)]
    assert parse_args(" ".join(words)) == words[: MAX_ARGS - 1]


# --- the fake's own model, on points the transcripts show ---------------------------------


def test_dead_channel_refuses_before_checking_usage():
    fake = FakeChannel(name="Local/x;1", hangup_before=0)
    assert fake.answer("STREAM FILE") == [
        "HANGUP\n",
        "511 Command Not Permitted on a dead channel or intercept routine\n",
    ]
    # ...while a dead-allowed command still gets its usage block.
    assert fake.answer("GET VARIABLE")[0] == "520-Invalid command syntax.  Proper usage follows:\n"
    assert fake.answer("GET VARIABLE")[-1] == "520 End of proper usage.\n"


def test_hangup_notice_is_sent_once_in_front_of_the_next_answer():
    fake = FakeChannel(name="Local/x;1", prompts={"beep": 3520}, hangup_before=1)
    assert fake.answer('STREAM FILE beep ""') == ["200 result=0 endpos=3520\n"]
    assert fake.answer("GET VARIABLE CHANNEL") == ["HANGUP\n", "200 result=1 (Local/x;1)\n"]
    assert fake.answer("GET VARIABLE CHANNEL") == ["200 result=1 (Local/x;1)\n"]


def test_quoted_values_round_trip_through_the_fake_like_the_real_asterisk():
    fake = FakeChannel(name="Local/x;1")
    for value in TRICKY:
        assert fake.answer(f"SET VARIABLE V {quote(value)}") == ["200 result=1\n"]
        assert fake.answer("GET VARIABLE V") == [f"200 result=1 ({value})\n"]
