"""The real server against bad, hostile, silent and numerous clients: it refuses, audits, keeps serving."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time

import pytest
from conftest import run
from fake_asterisk import FakeChannel, bridged_caller, environment, run_session


async def raw_exchange(port: int, data: bytes, *, eof: bool = False, timeout: float = 3.0) -> tuple[bytes, float]:
    """Connect, send `data` (then half-close if `eof`), read until the server closes."""
    started = time.monotonic()
    received = b""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionResetError:  # refused with a reset before the handshake was seen
        return received, time.monotonic() - started
    try:
        if data:
            writer.write(data)
            await writer.drain()
        if eof:
            writer.write_eof()
        async with asyncio.timeout(timeout):  # the server must close: a timeout fails the test
            while chunk := await reader.read(65536):
                received += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        writer.close()
    return received, time.monotonic() - started


async def assert_still_serves(svc, uniqueid: str = "after.1") -> None:
    channel = bridged_caller()
    dialogue = await run_session(svc.port, channel, environment(uniqueid=uniqueid), timeout=5)
    assert dialogue.closed_by_server
    assert channel.variables["CALMLINE_STATUS"] == "ok"
    assert 'STREAM FILE "calmline/warn-1" ""' in dialogue.commands


def assert_no_internal_errors(svc) -> None:
    assert svc.events(event="internal_error") == []
    assert "Traceback" not in svc.stdout.getvalue()


def stdout_events(svc) -> list[dict]:
    """The JSON lines calmline echoed: one object per '\\n'-terminated line."""
    text = svc.stdout.getvalue()
    assert text.endswith("\n")
    events = [json.loads(line) for line in text.split("\n")[:-1]]
    assert all(isinstance(e, dict) and "event" in e and "ts" in e for e in events)
    return events


# --- bad environments -----------------------------------------------------------------------

GARBAGE = {
    "hello": b"hello\n\n",
    "binary": bytes(range(256)).replace(b"\n", b"") + b"\n\n",
    "empty block": b"\n",
    "http": b"GET /warn HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "no request": b"agi_network: yes\nagi_channel: SIP/x\n\n",
    "upper-case keys": b"AGI_NETWORK_SCRIPT: warn\n\n",
}


@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_environment_is_rejected_audited_and_the_server_keeps_serving(serving, data):
    async def main():
        async with serving() as svc:
            received, elapsed = await raw_exchange(svc.port, data)
            await assert_still_serves(svc)
            return svc, received, elapsed

    svc, received, elapsed = run(main())
    assert received == b""  # not one command was sent to a client that never was Asterisk
    assert elapsed < 0.9  # rejected at once, not after environment_timeout (1 s)
    rejected = svc.events(event="session_rejected")
    assert len(rejected) == 1
    assert rejected[0]["outcome"] == "protocol_error"
    assert rejected[0]["level"] == "warning"
    assert rejected[0]["peer"].startswith("127.0.0.1:")
    assert svc.events(event="session_start", uniqueid="after.1")
    assert_no_internal_errors(svc)


@pytest.mark.parametrize("cut", [5, None], ids=["after whole lines", "mid-line"])
def test_truncated_environment_is_rejected_and_audited(serving, cut):
    env = "".join(environment())
    data = "".join(environment()[:cut]).encode() if cut else env[: len(env) // 2].encode()
    assert not data.endswith(b"\n\n")

    async def main():
        async with serving() as svc:
            received, elapsed = await raw_exchange(svc.port, data, eof=True)
            await assert_still_serves(svc)
            return svc, received, elapsed

    svc, received, elapsed = run(main())
    assert received == b""
    assert elapsed < 0.9
    rejected = svc.events(event="session_rejected")
    assert [r["outcome"] for r in rejected] == ["protocol_error"]
    assert svc.events(event="session_start", uniqueid="1795350788.44") == []
    assert_no_internal_errors(svc)


def test_oversized_environment_line_is_rejected_and_the_server_keeps_serving(serving):
    data = "".join(environment(calleridname="A" * 20_000)).encode()

    async def main():
        async with serving(server={"max_line_bytes": 1024}) as svc:
            received, _ = await raw_exchange(svc.port, data)
            await assert_still_serves(svc)
            return svc, received

    svc, received = run(main())
    assert received == b""
    rejected = svc.events(event="session_rejected")
    assert len(rejected) == 1
    assert rejected[0]["outcome"] == "protocol_error"
    assert "1024" in rejected[0]["error"]
    assert_no_internal_errors(svc)


def test_oversized_answer_line_ends_the_session_as_a_protocol_error(serving):
    async def main():
        async with serving(server={"max_line_bytes": 1024}) as svc:
            channel = bridged_caller()
            channel.variables["CALMLINE_WARNINGS"] = "9" * 5000
            dialogue = await run_session(svc.port, channel, environment(uniqueid="big.1"))
            await assert_still_serves(svc)
            return svc, channel, dialogue

    svc, channel, dialogue = run(main())
    assert dialogue.closed_by_server
    assert not any(c.startswith("STREAM FILE") for c in dialogue.commands)
    end = svc.events(event="session_end", uniqueid="big.1")
    assert len(end) == 1 and end[0]["outcome"] == "protocol_error"
    assert svc.events(event="step", uniqueid="big.1") == []
    assert_no_internal_errors(svc)


# --- silent and slow clients ---------------------------------------------------------------


def test_silent_client_is_closed_after_environment_timeout_and_audited(serving):
    async def main():
        async with serving(server={"environment_timeout": 0.3}) as svc:
            received, elapsed = await raw_exchange(svc.port, b"")
            await assert_still_serves(svc)
            return svc, received, elapsed

    svc, received, elapsed = run(main())
    assert received == b""
    assert 0.25 <= elapsed < 1.5
    rejected = svc.events(event="session_rejected")
    assert len(rejected) == 1
    assert rejected[0]["outcome"] == "protocol_error"
    assert "no complete environment block within 0.3s (0 lines received)" in rejected[0]["error"]


def test_drip_fed_environment_is_closed_after_environment_timeout(serving):
    """A client that sends one line every 0.1 s never gets more than environment_timeout in all."""

    async def main():
        async with serving(server={"environment_timeout": 0.4}) as svc:
            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            closed_after = None
            try:
                for line in environment()[:-1]:
                    writer.write(line.encode())
                    await writer.drain()
                    try:
                        if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                            closed_after = time.monotonic() - started
                            break
                    except TimeoutError:
                        pass
            except (ConnectionResetError, BrokenPipeError):
                closed_after = time.monotonic() - started
            finally:
                writer.close()
            return svc, closed_after

    svc, closed_after = run(main())
    assert closed_after is not None and 0.35 <= closed_after < 1.5
    rejected = svc.events(event="session_rejected")
    assert len(rejected) == 1 and rejected[0]["outcome"] == "protocol_error"


class MuteAfterEnvironment(FakeChannel):
    """An Asterisk that takes the environment and then never answers."""

    def answer(self, line: str) -> list[str]:
        self.commands.append(line)
        return []


def test_asterisk_that_stops_answering_ends_the_session_after_one_answer_timeout(serving):
    async def main():
        async with serving(server={"answer_timeout": 0.5}) as svc:
            channel = MuteAfterEnvironment()
            started = time.monotonic()
            dialogue = await run_session(svc.port, channel, environment(uniqueid="mute.1"), timeout=5)
            elapsed = time.monotonic() - started
            await assert_still_serves(svc)
            return svc, dialogue, elapsed

    svc, dialogue, elapsed = run(main())
    assert dialogue.closed_by_server
    # The stream is out of step after a timeout: nothing more is sent, nothing waits again.
    assert len(dialogue.commands) == 1 and dialogue.commands[0].startswith("GET FULL VARIABLE")
    assert 0.45 <= elapsed < 0.9
    end = svc.events(event="session_end", uniqueid="mute.1")
    assert len(end) == 1 and end[0]["outcome"] == "protocol_error"
    assert "0.5s" in end[0]["error"]
    assert_no_internal_errors(svc)


def test_connection_reset_mid_session_is_a_hangup_not_a_crash(serving):
    async def main():
        async with serving() as svc:
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write("".join(environment(uniqueid="rst.1")).encode())
            await writer.drain()
            first = await asyncio.wait_for(reader.readline(), 2)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST, as a crashed Asterisk host would
            for _ in range(100):  # (svc.events() blocks the loop: poll the server instead)
                if svc.svc.server.active_sessions == 0:
                    break
                await asyncio.sleep(0.02)
            await assert_still_serves(svc)
            return svc, first

    svc, first = run(main())
    assert first.startswith(b"GET FULL VARIABLE")
    end = svc.events(event="session_end", uniqueid="rst.1")
    assert len(end) == 1 and end[0]["outcome"] == "caller_hung_up" and end[0]["status"] == "hungup"
    assert_no_internal_errors(svc)


# --- limits on who and how many ------------------------------------------------------------


async def converse(reader, writer, channel: FakeChannel, env: list[str]) -> None:
    """run_session on a connection that is already open."""
    writer.write("".join(env).encode())
    await writer.drain()
    async with asyncio.timeout(5):
        while line := await reader.readline():
            for reply in channel.answer(line.decode().rstrip("\n")):
                writer.write(reply.encode())
            await writer.drain()
    writer.close()


def test_too_many_concurrent_sessions_refuses_the_extra_one_and_serves_the_others(serving):
    async def main():
        async with serving(server={"max_sessions": 2, "environment_timeout": 5.0}) as svc:
            idle = [await asyncio.open_connection("127.0.0.1", svc.port) for _ in range(2)]
            for _ in range(100):
                if svc.svc.server.active_sessions == 2:
                    break
                await asyncio.sleep(0.01)
            assert svc.svc.server.active_sessions == 2
            received, elapsed = await raw_exchange(svc.port, b"")
            # The two waiting connections are still sessions, and are served in full.
            channels = [bridged_caller(), bridged_caller()]
            await asyncio.gather(*(
                converse(r, w, ch, environment(uniqueid=f"idle.{i}"))
                for i, ((r, w), ch) in enumerate(zip(idle, channels))
            ))
            for _ in range(100):
                if svc.svc.server.active_sessions == 0:
                    break
                await asyncio.sleep(0.01)
            await assert_still_serves(svc)
            return svc, received, elapsed, channels

    svc, received, elapsed, channels = run(main())
    assert received == b"" and elapsed < 1.0  # refused at once, not after a timeout
    refused = svc.events(event="connection_refused")
    assert len(refused) == 1
    assert "max_sessions (2)" in refused[0]["reason"]
    assert refused[0]["peer"].startswith("127.0.0.1:")
    assert [ch.variables["CALMLINE_STATUS"] for ch in channels] == ["ok", "ok"]
    assert {e["uniqueid"] for e in svc.events(event="step")} == {"idle.0", "idle.1", "after.1"}
    assert_no_internal_errors(svc)


def test_address_not_in_allowlist_is_refused_and_audited(serving):
    async def main():
        async with serving(server={"allow": ["10.9.9.9"]}) as svc:
            channel = bridged_caller()
            dialogue = await run_session(svc.port, channel, timeout=3)
            return svc, channel, dialogue

    svc, channel, dialogue = run(main())
    assert dialogue.closed_by_server
    assert channel.commands == []
    refused = svc.events(event="connection_refused")
    assert len(refused) == 1
    assert refused[0]["reason"] == "address not in server.allow"
    assert refused[0]["peer"].startswith("127.0.0.1:")
    assert svc.events(event="session_start") == []
    assert svc.events(event="session_rejected") == []


def test_allowlisted_network_is_served(serving):
    async def main():
        async with serving(server={"allow": ["10.9.9.9", "127.0.0.0/8"]}) as svc:
            await assert_still_serves(svc)
            return svc

    svc = run(main())
    assert svc.events(event="connection_refused") == []


# --- hostile caller data ------------------------------------------------------------------

HOSTILE_NAMES = [
    'Evil "Bob" \\" ; HANGUP',
    "${EXEC(System(touch /tmp/calmline-pwned))}",
    'x\rSTREAM FILE "evil" ""\rHANGUP',
    '"${SHELL(id)}" \\\\ ]|[ ${CALMLINE_WARNINGS}',
    "trailing backslash\\",
    "\x1b[2J\x07 Zoë 🙂 \u2028 \x85 \x00",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_caller_name_is_audited_verbatim_and_never_sent_to_asterisk(serving, name):
    async def main():
        async with serving() as svc:
            channel = bridged_caller()
            dialogue = await run_session(svc.port, channel, environment(uniqueid="evil.1", calleridname=name))
            return svc, channel, dialogue

    svc, channel, dialogue = run(main())
    assert channel.variables["CALMLINE_STATUS"] == "ok"
    # What calmline sent is exactly the warn ladder, nothing the caller wrote.
    assert dialogue.commands == [
        'GET FULL VARIABLE "${CHANNEL(linkedid)}]|[${BRIDGEPEER}]|[${CALMLINE_WARNINGS}"',
        'STREAM FILE "calmline/warn-1" ""',
        'SET VARIABLE CALMLINE_WARNINGS "1"',
        'SET VARIABLE CALMLINE_STATUS "ok"',
    ]
    assert channel.apps_run == []
    for event_name in ("session_start", "step", "session_end"):
        events = svc.events(event=event_name, uniqueid="evil.1")
        assert len(events) == 1, event_name
        assert events[0]["caller_name"] == name
    echoed = stdout_events(svc)
    assert len(echoed) == len(svc.events())
    assert [e for e in echoed if e.get("caller_name") == name and e["event"] == "step"]


def test_separator_in_a_value_falls_back_to_one_read_per_variable(serving):
    peer = "Local/agent]|[odd@sim-agent-00000017;1"

    async def main():
        async with serving() as svc:
            channel = bridged_caller()
            channel.variables["CALMLINE_WARNINGS"] = "1]|[2"
            channel.variables["BRIDGEPEER"] = channel.functions["BRIDGEPEER"] = peer
            dialogue = await run_session(svc.port, channel, environment(uniqueid="sep.1"))
            return svc, channel, dialogue

    svc, channel, dialogue = run(main())
    assert dialogue.commands[1:4] == [
        'GET FULL VARIABLE "${CHANNEL(linkedid)}"',
        'GET FULL VARIABLE "${BRIDGEPEER}"',
        'GET FULL VARIABLE "${CALMLINE_WARNINGS}"',
    ]
    invalid = svc.events(event="warning_counter_invalid", uniqueid="sep.1")
    assert len(invalid) == 1 and invalid[0]["value"] == "1]|[2"
    step = svc.events(event="step", uniqueid="sep.1")
    assert len(step) == 1 and step[0]["warning"] == 1
    assert step[0]["agent"] == peer and step[0]["linkedid"] == "1795350788.44"
    assert 'STREAM FILE "calmline/warn-1" ""' in dialogue.commands
    assert channel.variables["CALMLINE_WARNINGS"] == "1"
    assert channel.variables["CALMLINE_STATUS"] == "ok"


# --- many at once ---------------------------------------------------------------------------


def test_two_hundred_concurrent_sessions_all_complete(serving):
    n = 200

    async def main():
        async with serving() as svc:
            channels = [bridged_caller() for _ in range(n)]
            for i, channel in enumerate(channels):
                channel.variables["CALMLINE_WARNINGS"] = str(i % 3)
            dialogues = await asyncio.gather(*(
                run_session(svc.port, ch, environment(uniqueid=f"many.{i}"), timeout=15)
                for i, ch in enumerate(channels)
            ))
            return svc, channels, dialogues

    svc, channels, dialogues = run(main())
    assert all(d.closed_by_server for d in dialogues)
    assert [ch.variables["CALMLINE_STATUS"] for ch in channels] == ["ok"] * n
    assert [ch.variables["CALMLINE_WARNINGS"] for ch in channels] == [str(i % 3 + 1) for i in range(n)]
    ends = svc.events(event="session_end")
    assert len(ends) == n and {e["status"] for e in ends} == {"ok"}
    steps = svc.events(event="step", step="warning_played")
    assert sorted(e["uniqueid"] for e in steps) == sorted(f"many.{i}" for i in range(n))
    assert svc.events(event="connection_refused") == []
    assert_no_internal_errors(svc)
