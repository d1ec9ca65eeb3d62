"""What an adversarial run broke (issue 18): peers whose answers no parser should trust,
a stopping service, the limits on who may hold how many sessions. Real sockets throughout."""

from __future__ import annotations

import asyncio
import socket

import pytest
from conftest import run
from fake_asterisk import FakeChannel, bridged_caller, environment, run_session
from test_server_robustness import assert_no_internal_errors, assert_still_serves

HUGE = "9" * 5000  # Python refuses to convert more than 4,300 digits to an int


class AnswersEverything(FakeChannel):
    """A peer that answers every command with the same line."""

    def __init__(self, line: str):
        super().__init__()
        self.line = line

    def answer(self, line: str) -> list[str]:
        self.commands.append(line)
        return [self.line + "\n"]


class StreamAnswers(FakeChannel):
    """The caller's channel, except that STREAM FILE answers with a line of our choosing."""

    def __init__(self, stream_answer: str, **kw):
        base = bridged_caller()
        super().__init__(variables=base.variables, functions=base.functions, prompts=base.prompts, **kw)
        self.stream_answer = stream_answer

    def answer(self, line: str) -> list[str]:
        if line.startswith("STREAM FILE"):
            self.commands.append(line)
            return [self.stream_answer + "\n"]
        return super().answer(line)


async def wait_idle(svc) -> None:
    for _ in range(200):
        if svc.svc.server.active_sessions == 0:
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("line", [
    f"200 result=1 endpos={HUGE}",
    f"200 result={HUGE}",
    "200 result=1 (x) endpos=²",
    "² result=1",
    "100 result=0 Trying...\n100 result=0 Trying...",
    "HANGUP\nHANGUP",
], ids=["huge endpos", "huge result", "superscript endpos", "superscript code", "two 100s", "two HANGUPs"])
def test_an_unparseable_answer_ends_the_session_and_closes_its_socket(serving, line):
    """Every answer is the same bad line, so the session's own closing commands get it too."""

    async def main():
        async with serving(server={"answer_timeout": 3.0}) as svc:
            channel = AnswersEverything(line)
            dialogue = await run_session(svc.port, channel, environment(uniqueid="bad.1"), timeout=2.5)
            await wait_idle(svc)
            active = svc.svc.server.active_sessions
            await assert_still_serves(svc)
            return svc, dialogue, active

    svc, dialogue, active = run(main())
    assert dialogue.closed_by_server  # not left open with its timer armed
    assert active == 0
    end = svc.events(event="session_end", uniqueid="bad.1")
    assert len(end) == 1 and end[0]["outcome"] == "protocol_error", end
    assert_no_internal_errors(svc)


@pytest.mark.parametrize("result", ["1114112", "-5", "49"])
def test_a_prompt_answered_with_a_digit_nobody_offered_is_a_protocol_error(serving, result):
    async def main():
        async with serving() as svc:
            channel = StreamAnswers(f"200 result={result} endpos=100")
            dialogue = await run_session(svc.port, channel, environment(uniqueid="esc.1"), timeout=3)
            return svc, channel, dialogue

    svc, channel, dialogue = run(main())
    assert dialogue.closed_by_server
    end = svc.events(event="session_end", uniqueid="esc.1")
    assert len(end) == 1 and end[0]["outcome"] == "protocol_error", end
    assert "not one of its escape digits" in end[0]["error"]
    assert channel.variables["CALMLINE_STATUS"] == "failed"
    assert "CALMLINE_WARNINGS" not in channel.variables  # the warning was not counted
    assert_no_internal_errors(svc)


@pytest.mark.parametrize("counter", ["²", "١", HUGE, "+1", " 1", "1_0"],
                         ids=["superscript", "arabic-indic", "5000 digits", "plus", "space", "underscore"])
def test_a_counter_that_is_not_a_plain_number_counts_as_none(serving, counter):
    async def main():
        async with serving() as svc:
            channel = bridged_caller()
            channel.variables["CALMLINE_WARNINGS"] = counter
            dialogue = await run_session(svc.port, channel, environment(uniqueid="ctr.1"), timeout=3)
            return svc, channel, dialogue

    svc, channel, dialogue = run(main())
    assert dialogue.closed_by_server
    assert 'STREAM FILE "calmline/warn-1" ""' in dialogue.commands
    assert channel.variables["CALMLINE_WARNINGS"] == "1"
    assert channel.variables["CALMLINE_STATUS"] == "ok"
    assert len(svc.events(event="warning_counter_invalid", uniqueid="ctr.1")) == 1
    assert_no_internal_errors(svc)


class PromptPlaysOn(FakeChannel):
    """A caller's channel whose prompt is still playing: STREAM FILE is not answered yet."""

    def __init__(self):
        base = bridged_caller()
        super().__init__(variables=base.variables, functions=base.functions, prompts=base.prompts)

    def answer(self, line: str) -> list[str]:
        if line.startswith("STREAM FILE"):
            self.commands.append(line)
            return []
        return super().answer(line)


def test_a_session_cancelled_by_a_stopping_service_is_failed_not_ok(serving):
    """SIGTERM while a prompt plays and the grace runs out: Asterisk hears `failed`, and the
    session's end is in the store before it closes."""

    async def main():
        async with serving() as svc:
            channel = PromptPlaysOn()
            session = asyncio.create_task(
                run_session(svc.port, channel, environment(uniqueid="cut.1"), timeout=8))
            for _ in range(200):
                if any(c.startswith("STREAM FILE") for c in channel.commands):
                    break
                await asyncio.sleep(0.01)
            await svc.svc.stop(grace=0.2)
            dialogue = await session
            return svc, channel, dialogue

    svc, channel, dialogue = run(main())
    assert dialogue.closed_by_server
    assert channel.variables["CALMLINE_STATUS"] == "failed"
    end = svc.events(event="session_end", uniqueid="cut.1")
    assert len(end) == 1, end
    assert end[0]["outcome"] == "cancelled" and end[0]["status"] == "failed"


# --- who may hold how many sessions --------------------------------------------------------


def test_one_peer_cannot_hold_more_than_max_sessions_per_peer(serving):
    async def main():
        async with serving(server={"max_sessions": 10, "max_sessions_per_peer": 2,
                                   "environment_timeout": 5.0}) as svc:
            silent = [await asyncio.open_connection("127.0.0.1", svc.port) for _ in range(2)]
            for _ in range(100):
                if svc.svc.server.active_sessions == 2:
                    break
                await asyncio.sleep(0.01)
            third = await run_session(svc.port, bridged_caller(), environment(uniqueid="third"), timeout=3)
            # Another address of the same host is another peer (127.0.0.2 is loopback too).
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port, local_addr=("127.0.0.2", 0))
            other = bridged_caller()
            writer.write("".join(environment(uniqueid="other.1")).encode())
            async with asyncio.timeout(5):
                while line := await reader.readline():
                    for reply in other.answer(line.decode().rstrip("\n")):
                        writer.write(reply.encode())
            writer.close()
            for _, w in silent:
                w.close()
            return svc, third, other

    svc, third, other = run(main())
    assert third.closed_by_server and third.commands == []
    refused = svc.events(event="connection_refused")
    assert len(refused) == 1 and "max_sessions_per_peer (2)" in refused[0]["reason"]
    assert other.variables["CALMLINE_STATUS"] == "ok"


def test_a_dual_stack_bind_serves_ipv4_peers_and_the_allowlist_sees_ipv4(serving):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")

    async def main():
        async with serving(server={"host": "::", "allow": ["127.0.0.1"]}) as svc:
            channel = bridged_caller()
            v4 = await run_session(svc.port, channel, environment(uniqueid="v4.1"), timeout=3)
            try:  # ::1 is not in the allowlist
                reader, writer = await asyncio.open_connection("::1", svc.port)
                refused = await reader.read()
                writer.close()
            except ConnectionResetError:
                refused = b""
            return svc, channel, v4, refused

    svc, channel, v4, refused = run(main())
    assert channel.variables["CALMLINE_STATUS"] == "ok"
    start = svc.events(event="session_start", uniqueid="v4.1")
    assert start and start[0]["peer"].startswith("127.0.0.1:")
    assert refused == b""
    reasons = [e["reason"] for e in svc.events(event="connection_refused")]
    assert reasons == ["address not in server.allow"]


def test_a_request_url_python_cannot_split_is_refused_not_an_internal_error(serving):
    env = [line for line in environment(uniqueid="url.1") if not line.startswith(("agi_network_script",
                                                                                  "agi_request"))]
    env.insert(0, "agi_request: agi://[::1/warn\n")

    async def main():
        async with serving() as svc:
            channel = bridged_caller()
            dialogue = await run_session(svc.port, channel, env, timeout=3)
            await wait_idle(svc)
            return svc, channel, dialogue

    svc, channel, dialogue = run(main())
    assert dialogue.closed_by_server
    rejected = svc.events(event="session_rejected")
    assert len(rejected) == 1 and rejected[0]["outcome"] == "protocol_error", rejected
    assert_no_internal_errors(svc)
