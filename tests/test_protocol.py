"""AGIStream, the only wire code, against a real TCP socket and Asterisk 22's real framing."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from conftest import run
from fake_asterisk import TRANSCRIPTS, environment, load_transcript

from calmline.errors import (
    AGICommandError,
    ConnectionLost,
    DeadChannel,
    InvalidCommand,
    LineTooLong,
    MalformedAnswer,
    PeerSilent,
    ProtocolError,
    TruncatedInput,
    UnsafeArgument,
    UsageError,
)
from calmline.fastagi.protocol import HANGUP, TRYING, AGIStream, Answer, parse_answer


class Peer:
    """The Asterisk end of the socket: reads calmline's commands, writes raw bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def expect(self, command: str) -> None:
        line = await asyncio.wait_for(self.reader.readline(), 2)
        assert line == command.encode() + b"\n"

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def wire(*, max_line: int = 1024, answer_timeout: float = 2.0):
    """An AGIStream on the accepting side of a loopback TCP connection (as the server has it)."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future = loop.create_future()

    def new_stream():
        return AGIStream(answer_timeout=answer_timeout, max_line=max_line,
                         on_connect=lambda s: accepted.set_result(s))  # the test owns it from here

    server = await loop.create_server(new_stream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    peer_reader, peer_writer = await asyncio.open_connection("127.0.0.1", port)
    stream = await asyncio.wait_for(accepted, 2)
    peer = Peer(peer_reader, peer_writer)
    try:
        yield stream, peer
    finally:
        await stream.close()
        await peer.close()
        server.close()


async def ask(stream: AGIStream, peer: Peer, command: str, answer: bytes):
    """Send `command`, check the peer got exactly it, answer with `answer`; return the outcome."""
    task = asyncio.create_task(stream.command(command))
    await peer.expect(command)
    await peer.send(answer)
    return await asyncio.wait_for(task, 3)


def exchange(answer: bytes, command: str = "GET VARIABLE X", **kw):
    async def main():
        async with wire(**kw) as (stream, peer):
            return await ask(stream, peer, command, answer), stream.hangup_noticed

    return run(main())


def failure(answer: bytes, command: str = "GET VARIABLE X", *, then_close: bool = False, **kw):
    """The exception `command` raises when the peer answers `answer` (then optionally closes)."""

    async def main():
        async with wire(**kw) as (stream, peer):
            task = asyncio.create_task(stream.command(command))
            await peer.expect(command)
            await peer.send(answer)
            if then_close:
                await peer.close()
            with pytest.raises(Exception) as info:
                await asyncio.wait_for(task, 3)
            return info.value, stream.hangup_noticed

    return run(main())


# --- answers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "text", "data", "endpos", "result"),
    [
        ("200 result=1 (Local/caller@sim-caller-00000016;1)", "1", "Local/caller@sim-caller-00000016;1", None, 1),
        ("200 result=0", "0", None, None, 0),
        ("200 result=0 endpos=7040", "0", None, 7040, 0),
        ("200 result=-1 endpos=0", "-1", None, 0, -1),
        ("200 result=-1 endpos=4640", "-1", None, 4640, -1),
        ("200 result=49 endpos=1200", "49", None, 1200, 49),
        ("200 result=-2", "-2", None, None, -2),
        ("200 result=6", "6", None, None, 6),
        ('200 result=1 (has "quotes" inside)', "1", 'has "quotes" inside', None, 1),
        ("200 result=1 ()", "1", "", None, 1),
        ("200 result=1 (a (nested) value)", "1", "a (nested) value", None, 1),
        # A value cannot forge an endpos: the data runs to the last ')'.
        ("200 result=1 (v) endpos=12)", "1", "v) endpos=12", None, 1),
        ("200 result=1 (Zoë Ångström 🙂)", "1", "Zoë Ångström 🙂", None, 1),
        # GET DATA: the keyed digits are the result text, which need not be a number.
        ("200 result= (timeout)", "", "timeout", None, None),
        ("200 result=0123", "0123", None, None, 123),
        ("200 result=*1", "*1", None, None, None),
    ],
)
def test_answer_is_parsed(line, text, data, endpos, result):
    answer, noticed = exchange(line.encode() + b"\n")
    assert answer == Answer(text, data, endpos)
    assert answer.result == result
    assert noticed is False


def test_every_recorded_200_answer_parses_and_round_trips():
    lines = [
        r["text"].rstrip("\n")
        for path in sorted(TRANSCRIPTS.glob("*.jsonl"))
        for r in load_transcript(path.name)
        if r["dir"] == "res" and r["text"].startswith("200 ")
    ]
    assert len(lines) > 20

    async def main():
        async with wire() as (stream, peer):
            return [await ask(stream, peer, "NOOP", line.encode() + b"\n") for line in lines]

    for line, answer in zip(lines, run(main()), strict=True):
        rebuilt = f"200 result={answer.text}"
        if answer.data is not None:
            rebuilt += f" ({answer.data})"
        if answer.endpos is not None:
            rebuilt += f" endpos={answer.endpos}"
        assert rebuilt == line


def test_answer_split_across_tcp_segments():
    async def main():
        async with wire() as (stream, peer):
            task = asyncio.create_task(stream.command("GET VARIABLE CHANNEL"))
            await peer.expect("GET VARIABLE CHANNEL")
            for piece in (b"20", b"0 result=1 (Local/cal", b"ler;1)", b"\n"):
                await peer.send(piece)
                await asyncio.sleep(0.01)
            return await task

    assert run(main()) == Answer("1", "Local/caller;1", None)


# --- the HANGUP notice -------------------------------------------------------------------


def test_hangup_notice_in_front_of_the_answer_is_taken_as_a_notice():
    answer, noticed = exchange(b"HANGUP\n200 result=1 (Local/caller@sim-caller-00000006;1)\n", "GET VARIABLE CHANNEL")
    assert answer == Answer("1", "Local/caller@sim-caller-00000006;1", None)
    assert noticed is True


def test_hangup_notice_then_the_answer_later_as_recorded():
    """server-hangs-up.jsonl: HANGUP at 882.1 ms, the real answer at 923.7 ms."""

    async def main():
        async with wire() as (stream, peer):
            task = asyncio.create_task(stream.command("GET VARIABLE CHANNEL"))
            await peer.expect("GET VARIABLE CHANNEL")
            await peer.send(b"HANGUP\n")
            await asyncio.sleep(0.04)
            assert not task.done()
            await peer.send(b"200 result=1 (Local/x;1)\n")
            answer = await task
            # The next command on the dead channel: 511, and the notice is not needed again.
            error = None
            try:
                await ask(stream, peer, 'STREAM FILE "beep" ""',
                          b"511 Command Not Permitted on a dead channel or intercept routine\n")
            except DeadChannel as exc:
                error = exc
            return answer, stream.hangup_noticed, error

    answer, noticed, error = run(main())
    assert answer.data == "Local/x;1"
    assert noticed is True
    assert isinstance(error, DeadChannel) and error.code == 511


def test_hangup_notice_written_before_the_command_was_sent():
    async def main():
        async with wire() as (stream, peer):
            await peer.send(b"HANGUP\n")
            await asyncio.sleep(0.02)
            return await ask(stream, peer, "GET VARIABLE CHANNEL", b"200 result=1 (Local/x;1)\n"), stream.hangup_noticed

    answer, noticed = run(main())
    assert answer.data == "Local/x;1" and noticed is True


def test_hangup_notice_then_511():
    error, noticed = failure(
        b"HANGUP\n511 Command Not Permitted on a dead channel or intercept routine\n", 'STREAM FILE "x" ""'
    )
    assert type(error) is DeadChannel
    assert error.code == 511 and error.status == "hungup" and error.outcome == "caller_hung_up"
    assert noticed is True


def test_hangup_notice_then_eof_is_connection_lost():
    error, noticed = failure(b"HANGUP\n", then_close=True)
    assert type(error) is ConnectionLost
    assert noticed is True


# --- error codes and the 520 block -------------------------------------------------------

USAGE_BLOCK = "".join(
    r["text"] for r in load_transcript("errors.jsonl") if r["dir"] == "res"
)[len("200 result=-1 endpos=0\n510 Invalid or unknown command\n"):].split("520 End of proper usage.\n")[0] + (
    "520 End of proper usage.\n"
)


def test_usage_block_is_the_recorded_one():
    assert USAGE_BLOCK.startswith("520-Invalid command syntax.  Proper usage follows:\n")
    assert USAGE_BLOCK.count("\n") == 7 and USAGE_BLOCK.endswith("520 End of proper usage.\n")


def test_520_block_is_consumed_and_the_next_answer_is_read_correctly():
    async def main():
        async with wire() as (stream, peer):
            task = asyncio.create_task(stream.command("STREAM FILE"))
            await peer.expect("STREAM FILE")
            # The real block came in pieces (first line at 1.8 ms, the rest at 45.6 ms).
            data = USAGE_BLOCK.encode()
            for i in range(0, len(data), 97):
                await peer.send(data[i : i + 97])
                await asyncio.sleep(0.002)
            with pytest.raises(UsageError) as info:
                await task
            after = await ask(stream, peer, "GET VARIABLE X", b'200 result=1 (has "quotes" inside)\n')
            again = await ask(stream, peer, "NOOP", b"200 result=0\n")
            return info.value, after, again

    error, after, again = run(main())
    assert error.code == 520 and error.command == "STREAM FILE"
    assert after == Answer("1", 'has "quotes" inside', None)
    assert again == Answer("0")


def test_two_520_blocks_back_to_back_do_not_desync():
    get_usage = "".join(
        r["text"] for r in load_transcript("errors.jsonl") if r["dir"] == "res"
    ).split("520 End of proper usage.\n")[1] + "520 End of proper usage.\n"
    assert get_usage.startswith("520-")

    async def main():
        async with wire() as (stream, peer):
            results = []
            for command, answer in [
                ("STREAM FILE", USAGE_BLOCK.encode()),
                ("GET VARIABLE", get_usage.encode()),
                ("GET VARIABLE X", b"200 result=0\n"),
                ("STREAM FILE", b"HANGUP\n" + USAGE_BLOCK.encode()),
                ("GET VARIABLE CHANNEL", b"200 result=1 (Local/x;1)\n"),
            ]:
                try:
                    results.append(await ask(stream, peer, command, answer))
                except UsageError as exc:
                    results.append(exc.code)
            return results, stream.hangup_noticed

    results, noticed = run(main())
    assert results == [520, 520, Answer("0"), 520, Answer("1", "Local/x;1")]
    assert noticed is True


def test_one_line_520_is_a_usage_error():
    error, _ = failure(b"520 Invalid command syntax.  Proper usage not available.\n", "SET VARIABLE X")
    assert type(error) is UsageError and error.code == 520


def test_520_block_cut_off_by_eof_is_connection_lost():
    two_lines = "".join(USAGE_BLOCK.splitlines(keepends=True)[:2]).encode()
    error, _ = failure(two_lines, "STREAM FILE", then_close=True)
    assert type(error) is ConnectionLost
    error, _ = failure(two_lines[:70], "STREAM FILE", then_close=True)
    assert type(error) is TruncatedInput


def test_510_is_invalid_command_and_the_stream_stays_in_sync():
    async def main():
        async with wire() as (stream, peer):
            with pytest.raises(InvalidCommand) as info:
                await ask(stream, peer, "FOO BAR", b"510 Invalid or unknown command\n")
            return info.value, await ask(stream, peer, "NOOP", b"200 result=0\n")

    error, after = run(main())
    assert type(error) is InvalidCommand
    assert error.code == 510 and error.text == "Invalid or unknown command"
    assert error.outcome == "agi_error"
    assert after == Answer("0")


def test_511_is_dead_channel():
    error, noticed = failure(b"511 Command Not Permitted on a dead channel or intercept routine\n", 'STREAM FILE "beep" ""')
    assert type(error) is DeadChannel
    assert error.code == 511 and error.text == "Command Not Permitted on a dead channel or intercept routine"
    assert noticed is False


def test_unknown_non_200_code_is_a_plain_command_error():
    error, _ = failure(b"500 Something we have never seen\n")
    assert type(error) is AGICommandError
    assert error.code == 500 and error.text == "Something we have never seen"


@pytest.mark.parametrize(
    "line",
    [
        b"hello\n",
        b"\n",
        b"200\n",
        b"200result=1\n",
        b"200 result=1 endpos=\n",
        b"200 result=1 endpos=12x\n",
        b"200 result=1 (data) 5 more\n",
        b"200 result=1 (unterminated\n",
        b"200 result=1 endpos=abc\n",
        b"2000 result=1\n",
        b"-1\n",
        b"\x00\xff\xfe garbage\n",
        b"HANGUP\nHANGUP\n",
    ],
)
def test_malformed_answer_is_a_protocol_error(line):
    error, _ = failure(line)
    assert type(error) is MalformedAnswer, error


def test_truncated_answer_then_eof_is_a_protocol_error():
    error, _ = failure(b"200 result=1 (half", then_close=True)
    assert type(error) is TruncatedInput
    assert "truncated" in str(error)


def test_eof_is_connection_lost():
    error, noticed = failure(b"", then_close=True)
    assert type(error) is ConnectionLost
    assert error.outcome == "caller_hung_up" and error.status == "hungup"
    assert noticed is False


def test_line_over_max_line_is_a_protocol_error():
    error, _ = failure(b"200 result=1 (" + b"x" * 5000 + b")\n", max_line=1024)
    assert type(error) is LineTooLong
    assert "1024" in str(error)


def test_line_over_max_line_without_newline_is_a_protocol_error():
    error, _ = failure(b"y" * 4000, max_line=1024)
    assert type(error) is LineTooLong


def test_line_just_under_max_line_is_accepted():
    value = "v" * 1000
    answer, _ = exchange(f"200 result=1 ({value})\n".encode(), max_line=1024)
    assert answer.data == value


def test_silent_peer_times_out_as_a_protocol_error():
    async def main():
        async with wire(answer_timeout=0.2) as (stream, peer):
            started = time.monotonic()
            task = asyncio.create_task(stream.command('STREAM FILE "beep" ""'))
            await peer.expect('STREAM FILE "beep" ""')
            with pytest.raises(ProtocolError) as info:
                await task
            return info.value, time.monotonic() - started

    error, elapsed = run(main())
    assert type(error) is PeerSilent
    assert "STREAM" in str(error)
    assert 0.15 <= elapsed < 1.5


def test_after_a_timeout_a_late_answer_is_never_taken_for_the_next_commands():
    """Once an answer timed out the stream is out of step: later commands must fail, not misread."""

    async def main():
        async with wire(answer_timeout=0.15) as (stream, peer):
            with pytest.raises(ProtocolError):
                await ask(stream, peer, "GET VARIABLE CALMLINE_WARNINGS", b"")
            await peer.send(b"200 result=1 (late answer to the first command)\n")
            started = time.monotonic()
            try:
                outcome = await stream.command("GET VARIABLE BRIDGEPEER")
            except Exception as exc:  # noqa: BLE001
                outcome = exc
            return outcome, time.monotonic() - started

    outcome, elapsed = run(main())
    assert type(outcome) is PeerSilent, outcome
    assert elapsed < 0.1  # refused at once, not after another answer_timeout


@pytest.mark.parametrize("bad", ["SET VARIABLE X a\nHANGUP", "VERBOSE x\r", "NOOP\x00"])
def test_command_with_line_break_is_refused_and_nothing_is_sent(bad):
    async def main():
        async with wire() as (stream, peer):
            with pytest.raises(UnsafeArgument):
                await stream.command(bad)
            # The first thing the peer sees is the next, harmless command.
            return await ask(stream, peer, "NOOP", b"200 result=0\n")

    assert run(main()) == Answer("0")


def test_long_mixed_conversation_never_desyncs():
    """200 commands with every kind of answer: each command gets its own answer."""
    kinds = [
        (b"200 result=1 (v{i})\n", Answer),
        (b"510 Invalid or unknown command\n", InvalidCommand),
        (USAGE_BLOCK.encode(), UsageError),
        (b"200 result=0 endpos={i}\n", Answer),
        (b"200 result= (timeout)\n", Answer),
        (b"500 odd {i}\n", AGICommandError),
    ]

    async def main():
        outcomes = []
        async with wire() as (stream, peer):
            for i in range(200):
                template, _ = kinds[i % len(kinds)]
                try:
                    outcomes.append(await ask(stream, peer, f"NOOP {i}", template.replace(b"{i}", str(i).encode())))
                except AGICommandError as exc:
                    outcomes.append(exc)
        return outcomes

    for i, outcome in enumerate(run(main())):
        _, expected = kinds[i % len(kinds)]
        assert type(outcome) is expected, (i, outcome)
        if i % len(kinds) == 0:
            assert outcome.data == f"v{i}"
        if i % len(kinds) == 3:
            assert outcome.endpos == i
        if i % len(kinds) == 5:
            assert outcome.text == f"odd {i}"


# --- the environment block -----------------------------------------------------------------


def read_env(data: bytes, *, close: bool = False, timeout: float = 1.0, max_line: int = 1024):
    async def main():
        async with wire(max_line=max_line) as (stream, peer):
            await peer.send(data)
            if close:
                await peer.close()
            try:
                return await stream.read_environment(timeout)
            except Exception as exc:  # noqa: BLE001 - returned for the test to inspect
                return exc

    return run(main())


def test_environment_as_recorded():
    records = load_transcript("feature-args.jsonl")
    env = read_env("".join(r["text"] for r in records if r["dir"] == "env").encode())
    assert env["agi_network_script"] == "probe-args"
    assert env["agi_arg_2"] == "quoted"
    assert env["agi_arg_3"] == " arg"  # the leading space is part of the value
    assert env["agi_extension"] == "100" and env["agi_accountcode"] == ""
    assert env["agi_calleridname"] == 'Angry "Bob" Smith'
    assert len(env) == 26


def test_environment_leaves_the_commands_that_follow_unread():
    async def main():
        async with wire() as (stream, peer):
            await peer.send("".join(environment()).encode() + b"HANGUP\n")
            env = await stream.read_environment(1)
            answer = await ask(stream, peer, "GET VARIABLE CHANNEL", b"200 result=1 (c)\n")
            return env, answer, stream.hangup_noticed

    env, answer, noticed = run(main())
    assert env["agi_network_script"] == "warn"
    assert answer.data == "c" and noticed is True


@pytest.mark.parametrize(
    ("data", "close", "expected"),
    [
        (b"hello\n\n", False, MalformedAnswer),
        (b"\x00\xff\xfe\xfd\x80\n\n", False, MalformedAnswer),
        (b"\n", False, MalformedAnswer),  # no request named
        (b"agi_channel: x\n\n", False, MalformedAnswer),  # no request named
        (b"", True, ConnectionLost),  # closed before saying anything
        (b"agi_network: yes\nagi_network_script: warn\n", True, TruncatedInput),  # block cut off
        (b"agi_network: yes\nagi_network_scr", True, TruncatedInput),
        (b"AGI_NETWORK: yes\n\n", False, MalformedAnswer),
    ],
)
def test_bad_environment(data, close, expected):
    result = read_env(data, close=close)
    assert type(result) is expected, result


def test_environment_timeout_is_a_protocol_error():
    started = time.monotonic()
    result = read_env(b"agi_network: yes\n", timeout=0.2)
    assert type(result) is PeerSilent
    assert "1 lines received" in str(result)
    assert time.monotonic() - started < 1.5


def test_environment_with_too_many_lines_is_refused():
    data = "".join(environment()[:-1]) + "".join(f"agi_arg_{i}: x\n" for i in range(1, 400)) + "\n"
    assert type(read_env(data.encode(), max_line=16384)) is MalformedAnswer


def test_blocks_longer_than_one_socket_read_arrive_whole():
    """The stream reads the socket 4 KiB at a time; what spans several reads joins up exactly."""
    name = "".join(chr(0x41 + i % 26) for i in range(9000))
    value = "v" * 7000 + "]|[" + "w" * 5000

    async def main():
        async with wire(max_line=16384) as (stream, peer):
            await peer.send("".join(environment(calleridname=name)).encode()
                            + f"200 result=1 ({value})\n".encode())
            env = await stream.read_environment(1)
            return env, await stream.command("GET FULL VARIABLE x")

    env, answer = run(main())
    assert env["agi_calleridname"] == name
    assert env["agi_network_script"] == "warn"
    assert answer.data == value


def test_environment_line_over_max_line_is_refused():
    data = "".join(environment(calleridname="B" * 3000)).encode()
    result = read_env(data, max_line=1024)
    assert type(result) is LineTooLong


# --- parse_answer, without a socket ------------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    ("200 result=0 endpos=7040", Answer("0", None, 7040)),
    ("200 result=0 Gosub complete", Answer("0", None, None, "Gosub complete")),
    ("200 result=0 Gosub complete (abnormal exit)", Answer("0", None, None, "Gosub complete (abnormal exit)")),
    ("200 result=-1 Gosub label not found", Answer("-1", None, None, "Gosub label not found")),
    ("100 result=0 Trying...", TRYING),
    ("HANGUP", HANGUP),
])
def test_parse_answer_reads_what_asterisk_sends(line, expected):
    assert parse_answer(line, "GOSUB x s 1") == expected


@pytest.mark.parametrize(("line", "error", "code"), [
    ("510 Invalid or unknown command", InvalidCommand, 510),
    ("511 Command Not Permitted on a dead channel or intercept routine", DeadChannel, 511),
    ("520 Invalid command syntax.  Proper usage not available.", UsageError, 520),
    ("503 result=-2 Memory allocation failure", AGICommandError, 503),
])
def test_parse_answer_raises_the_typed_error_for_each_code(line, error, code):
    with pytest.raises(error) as info:
        parse_answer(line, "GOSUB x s 1")
    assert type(info.value) is error and info.value.code == code
    assert getattr(info.value, "block", False) is False


def test_parse_answer_says_when_a_usage_block_follows():
    with pytest.raises(UsageError) as info:
        parse_answer("520-Invalid command syntax.  Proper usage follows:", "STREAM FILE")
    assert info.value.block is True


@pytest.mark.parametrize("line", [
    "200 result=1 endpos=" + "9" * 5000, "200 result=" + "9" * 5000, "200 result=1 endpos=²",
    "200 result=1 endpos=١٢", "² result=1", "²00 result=1", "199 x", "600 x", "200", "HANGUP ",
])
def test_parse_answer_refuses_numbers_no_parser_should_trust(line):
    with pytest.raises(MalformedAnswer):
        parse_answer(line)


def test_a_result_in_another_script_is_not_a_number():
    assert parse_answer("200 result=١").result is None
    assert parse_answer("200 result=1_0").result is None
    assert parse_answer("200 result=-12").result == -12


def test_a_gosub_answers_trying_first_and_its_result_later():
    """app_stack.c: `100 result=0 Trying...` when the routine starts, `200` when it returns."""

    async def main():
        async with wire(answer_timeout=0.5) as (stream, peer):
            task = asyncio.create_task(stream.command("GOSUB calmline-sub s 1"))
            await peer.expect("GOSUB calmline-sub s 1")
            await asyncio.sleep(0.3)
            await peer.send(b"100 result=0 Trying...\n")
            await asyncio.sleep(0.4)  # 0.7 s since the command, 0.4 s since the routine started
            assert not task.done()
            await peer.send(b"200 result=0 Gosub complete\n")
            answer = await asyncio.wait_for(task, 2)
            after = await ask(stream, peer, "NOOP", b"200 result=0\n")
            return answer, after

    answer, after = run(main())
    assert answer == Answer("0", None, None, "Gosub complete") and answer.result == 0
    assert after == Answer("0")
