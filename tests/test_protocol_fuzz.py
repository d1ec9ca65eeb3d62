"""Property-based fuzzing of the wire layer: whatever a peer sends, the protocol answers with a
typed result or a `CalmlineError`, never anything else, and never depends on how TCP split
the bytes. `parse_answer` is pure; the stream is driven through asyncio's protocol callbacks
with a transport that records what was written (no socket needed for these)."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calmline.errors import AGICommandError, CalmlineError, InvalidCommand, UsageError
from calmline.fastagi.protocol import AGIStream, Answer, Notice, parse_answer
from fake_asterisk import environment

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

digits = st.text(alphabet="0123456789", min_size=1, max_size=6000)
numberish = st.one_of(
    digits, st.integers().map(str), st.sampled_from(["²", "١٢", "1_0", "+1", " 1", "-", "", "0x1f", "∞"]),
)
near_answers = st.one_of(
    st.builds(lambda r: f"200 result={r}", numberish),
    st.builds(lambda r, e: f"200 result={r} endpos={e}", numberish, numberish),
    st.builds(lambda r, d, e: f"200 result={r} ({d}) endpos={e}", numberish, st.text(max_size=50), numberish),
    st.builds(lambda c, t: f"{c} {t}", numberish, st.text(max_size=40)),
    st.builds(lambda t: f"100 result=0 {t}", st.text(max_size=20)),
    st.builds(lambda t: f"520-{t}", st.text(max_size=20)),
    st.sampled_from(["HANGUP", "HANGUP ", "", "200", "200 ", "510", "511 x", "520 End of proper usage."]),
)
lines = st.one_of(near_answers, st.text(max_size=200).map(lambda t: t.replace("\n", "")))


@FUZZ
@given(lines)
def test_parse_answer_returns_a_typed_result_or_raises_a_calmline_error(line):
    try:
        parsed = parse_answer(line, "NOOP")
    except CalmlineError:
        return
    assert isinstance(parsed, (Answer, Notice))
    if isinstance(parsed, Answer):
        assert parsed.result is None or abs(parsed.result) < 10**18
        assert parsed.endpos is None or abs(parsed.endpos) < 10**19


@FUZZ
@given(st.integers(-(10**17), 10**17), st.one_of(st.none(), st.text(max_size=80).map(lambda t: t.replace("\n", ""))),
       st.one_of(st.none(), st.integers(-(10**18), 10**18)))
def test_answers_asterisk_writes_parse_back_to_their_parts(result, data, endpos):
    line = f"200 result={result}" + (f" ({data})" if data is not None else "") + (
        f" endpos={endpos}" if endpos is not None else "")
    assert parse_answer(line) == Answer(str(result), data, endpos)


# --- the stream, driven without a socket ---------------------------------------------------------


class RecordingTransport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data):
        self.written += data

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 4000) if name == "peername" else default


async def converse(chunks: list[bytes], commands: int, *, eof: bool = True, max_line: int = 1024):
    """Feed `chunks` one loop turn apart while the stream reads the environment and answers."""
    stream = AGIStream(answer_timeout=5.0, max_line=max_line)
    stream.connection_made(RecordingTransport())

    async def feed():
        for chunk in chunks:
            stream.data_received(chunk)
            await asyncio.sleep(0)
        if eof:
            stream.eof_received()

    feeder = asyncio.create_task(feed())
    outcomes: list = []
    try:
        outcomes.append(await stream.read_environment(5.0))
        for i in range(commands):
            try:
                outcomes.append(await stream.command(f"NOOP {i}"))
            except AGICommandError as exc:  # Asterisk refused it: the stream stays in step
                outcomes.append(type(exc))
    except CalmlineError as exc:
        outcomes.append(type(exc))
    await feeder
    await stream.close()
    return outcomes


WIRE = ("".join(environment()).encode()
        + b"200 result=1 (Local/x;1)\nHANGUP\n200 result=0 endpos=7040\n100 result=0 Trying...\n"
        + b"200 result=0 Gosub complete\n520-Invalid command syntax.  Proper usage follows:\nfree text\n"
        + b"520 End of proper usage.\n510 Invalid or unknown command\n200 result= (timeout)\n")
WHOLE = asyncio.run(converse([WIRE], 6))  # the environment and six answers


def test_the_conversation_read_whole():
    assert WHOLE[4:] == [UsageError, InvalidCommand, Answer("", "timeout")]
    assert WHOLE[1] == Answer("1", "Local/x;1") and WHOLE[3] == Answer("0", None, None, "Gosub complete")


def test_splitting_the_conversation_at_every_single_byte_changes_nothing():
    for cut in range(1, len(WIRE)):
        assert asyncio.run(converse([WIRE[:cut], WIRE[cut:]], 6)) == WHOLE, cut


@FUZZ
@given(st.lists(st.integers(1, len(WIRE) - 1), max_size=30, unique=True))
def test_splitting_the_conversation_anywhere_changes_nothing(cuts):
    points = [0, *sorted(cuts), len(WIRE)]
    chunks = [WIRE[a:b] for a, b in zip(points, points[1:])]
    assert asyncio.run(converse(chunks, 6)) == WHOLE


@FUZZ
@given(st.binary(max_size=3000), st.booleans())
def test_any_bytes_as_an_environment_block_end_in_a_typed_outcome(data, eof):
    outcomes = asyncio.run(asyncio.wait_for(converse([data], 3, eof=True), 5))
    assert outcomes and (isinstance(outcomes[0], dict) or issubclass(outcomes[0], CalmlineError))


@FUZZ
@given(st.lists(st.one_of(near_answers.map(lambda s: s.encode() + b"\n"), st.binary(max_size=300)), max_size=8),
       st.integers(1, 6))
def test_any_bytes_after_a_valid_environment_end_in_answers_or_a_typed_error(answers, commands):
    env = "".join(environment()).encode()
    outcomes = asyncio.run(asyncio.wait_for(converse([env, *answers], commands, max_line=16384), 5))
    assert isinstance(outcomes[0], dict)
    for outcome in outcomes[1:]:
        assert isinstance(outcome, Answer) or issubclass(outcome, CalmlineError)
