"""A fuzz run over real sockets (slow): thousands of sessions whose Asterisk answers with
whatever a hostile peer might send. Every session must end, none with an internal error,
and the service must hold no more descriptors afterwards than before.

    PYTHONPATH=$PWD/agi python3 -m pytest -m slow -s tests/test_fuzz_socket.py
    CALMLINE_FUZZ_SESSIONS=2000 ...   # fewer sessions (default 20000)
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import socket
import struct
from pathlib import Path

import pytest
from conftest import run
from fake_asterisk import USAGE, bridged_caller, environment

SESSIONS = int(os.environ.get("CALMLINE_FUZZ_SESSIONS", "20000"))
CONCURRENCY = 50
HUGE = "9" * 5000


def hostile_line(rng: random.Random) -> bytes:
    return rng.choice([
        lambda: f"200 result=1 endpos={HUGE}\n",
        lambda: f"200 result={HUGE}\n",
        lambda: f"200 result={rng.choice(['1114112', '-5', '²', '49', '١'])} endpos=10\n",
        lambda: "² result=1\n",
        lambda: "HANGUP\n",
        lambda: "HANGUP\nHANGUP\n",
        lambda: "100 result=0 Trying...\n",
        lambda: "".join(USAGE["STREAM FILE"]),
        lambda: "520-Invalid\n" + "x\n" * rng.randint(0, 5),
        lambda: "510 Invalid or unknown command\n",
        lambda: "511 Command Not Permitted on a dead channel or intercept routine\n",
        lambda: f"{rng.randint(100, 999)} {rng.random()}\n",
        lambda: "".join(chr(rng.randint(1, 0x2FF)) for _ in range(rng.randint(0, 80))) + "\n",
        lambda: "200 result=1 (" + "v" * rng.randint(0, 20000) + ")\n",
        lambda: "200 result=1 (half",
    ])().encode("utf-8", "surrogatepass")


def hostile_environment(rng: random.Random, uniqueid: str) -> bytes:
    env = "".join(environment(uniqueid=uniqueid, calleridname=rng.choice(
        ['Angry "Bob" Smith', "x\x01\x7f", "€" * 50, HUGE]))).encode()
    kind = rng.random()
    if kind < 0.85:
        return env
    if kind < 0.9:
        return env[: rng.randint(0, len(env) - 1)]
    if kind < 0.93:
        return bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 200))) + b"\n\n"
    if kind < 0.95:
        return b"agi_request: agi://[::1/warn?x=" + rng.randbytes(rng.randint(0, 40)).hex().encode() + b"\n\n"
    return b"agi_" + b"a" * 20000 + b"\n\n"


async def fuzz_session(port: int, i: int) -> str:
    rng = random.Random(i)
    channel = bridged_caller()
    channel.variables["CALMLINE_WARNINGS"] = rng.choice(["", "1", "²", HUGE, "-1", "0"])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return "refused"
    ended = "closed_by_server"
    try:
        writer.write(hostile_environment(rng, f"fuzz.{i}"))
        async with asyncio.timeout(10):
            half_closed = False
            while line := await reader.readline():
                roll = rng.random()
                if half_closed:
                    continue  # we said all we will say: read until the server closes
                if roll < 0.6:
                    for reply in channel.answer(line.decode(errors="replace").rstrip("\n")):
                        writer.write(reply.encode())
                elif roll < 0.95:
                    writer.write(hostile_line(rng))
                elif roll < 0.97:
                    await asyncio.sleep(0.4)  # silence: longer than answer_timeout
                elif roll < 0.99:
                    writer.write(hostile_line(rng)[:5])
                    writer.write_eof()
                    half_closed = True
                else:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return "reset"
                await writer.drain()
    except TimeoutError:
        ended = "hung"  # the server never closed: a leak
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
    return ended


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.slow
def test_fuzzed_sessions_over_real_sockets_all_end_cleanly(serving):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))

    async def main():
        async with serving(server={"answer_timeout": 0.3, "environment_timeout": 0.5,
                                   "max_sessions": CONCURRENCY * 2}) as svc:
            await asyncio.sleep(0.2)
            before = fds(), rss_kib()
            ends: dict[str, int] = {}
            queue = iter(range(SESSIONS))

            async def worker():
                for i in queue:
                    end = await fuzz_session(svc.port, i)
                    ends[end] = ends.get(end, 0) + 1

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            for _ in range(300):
                if svc.svc.server.active_sessions == 0:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            after = fds(), rss_kib()
            active = svc.svc.server.active_sessions
            text = svc.stdout.getvalue()
            return before, after, ends, active, text

    before, after, ends, active, text = run(main())
    print(f"\nfuzzed {SESSIONS} sessions: {ends}; fds {before[0]} -> {after[0]}, "
          f"RSS {before[1]} -> {after[1]} KiB")
    assert ends.get("hung", 0) == 0
    assert active == 0
    assert after[0] <= before[0] + 2
    assert '"internal_error"' not in text and "Traceback" not in text
