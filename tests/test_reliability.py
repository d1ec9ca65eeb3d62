"""`calmline serve` as a process under hostile load (issue 18): descriptors running out, a
stderr nobody reads, silent peers beyond max_sessions, SIGTERM with sessions in flight.

Each test starts the real service in a subprocess with its own config in a temporary
directory (the store is the default one under `var/`) and reads the trail back with
`calmline audit`. The longer variants are marked `slow` (README, "Reliability").
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run
from fake_asterisk import FakeChannel, bridged_caller, environment, run_session

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "agi"), "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, port: int, server: str = "") -> Path:
    path = tmp_path / "calmline.toml"
    path.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\n{server}\n\n[mail]\nenabled = false\n',
                    encoding="utf-8")
    return path


def start(tmp_path: Path, config: Path, *, stderr=None, nofile: int | None = None) -> subprocess.Popen:
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen(
        [sys.executable, "-m", "calmline", "-c", str(config), "serve", "--no-uvloop"],
        cwd=tmp_path, env=ENV, stdout=open(tmp_path / "stdout.jsonl", "wb"),  # noqa: SIM115
        stderr=stderr if stderr is not None else open(tmp_path / "stderr.txt", "wb"),  # noqa: SIM115
        preexec_fn=limit,
    )
    return proc


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"calmline serve exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"calmline serve did not listen on {port} within {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def trail(tmp_path: Path, config: Path) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-m", "calmline", "-c", str(config), "audit", "--limit", "100000"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def silent_peers(port: int, count: int) -> list:
    """Connections that never say a word (the kernel queues those not yet accepted)."""
    peers = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        peers.append(sock)
    return peers


async def slowloris_peer(port: int, seconds: float) -> None:
    """One environment line every 0.2 s: never a whole block."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    try:
        for line in environment() * 20:
            writer.write(line.encode())
            await writer.drain()
            await asyncio.sleep(0.2)
            seconds -= 0.2
            if seconds <= 0:
                break
    except OSError:
        pass
    finally:
        writer.close()


def run_load(tmp_path: Path, *, nofile: int, silent: int, slowloris: int, max_sessions: int,
             stderr=None) -> dict:
    """Silent and slowloris peers beyond max_sessions and the fd limit; then one real session."""
    port = free_port()
    config = write_config(tmp_path, port, f"max_sessions = {max_sessions}\nenvironment_timeout = 1.0\n"
                                          f"answer_timeout = 5.0")
    proc = start(tmp_path, config, stderr=stderr, nofile=nofile)
    try:
        wait_listening(proc, port)
        time.sleep(0.3)
        before = fds(proc.pid), rss_kib(proc.pid)

        async def main():
            peers = await silent_peers(port, silent)
            loris = [asyncio.create_task(slowloris_peer(port, 3.0)) for _ in range(slowloris)]
            await asyncio.sleep(1.5)
            during = fds(proc.pid)
            await asyncio.gather(*loris)
            for sock in peers:
                sock.close()
            channel = bridged_caller()
            dialogue = await run_session(port, channel, environment(uniqueid="legit.1"), timeout=15)
            return during, channel, dialogue

        during, channel, dialogue = run(main())
        time.sleep(1.5)  # the last silent peers time out
        after = fds(proc.pid), rss_kib(proc.pid)
        assert proc.poll() is None, "the service died"
    finally:
        code = stop(proc)
    print(f"\n{silent} silent + {slowloris} slowloris peers, RLIMIT_NOFILE {nofile}, max_sessions "
          f"{max_sessions}: service fds {before[0]} -> {during} (under load) -> {after[0]}, "
          f"RSS {before[1]} -> {after[1]} KiB")
    return {"config": config, "before": before, "during": during, "after": after, "channel": channel,
            "dialogue": dialogue, "code": code, "port": port}


def test_out_of_descriptors_pauses_accepting_says_so_once_and_serves_again(tmp_path):
    """With 64 descriptors and 150 silent peers, accept() fails with EMFILE over and over."""
    result = run_load(tmp_path, nofile=64, silent=150, slowloris=5, max_sessions=500)
    assert result["channel"].variables.get("CALMLINE_STATUS") == "ok"
    assert result["code"] == 0
    stderr = (tmp_path / "stderr.txt").read_bytes()
    assert len(stderr) < 20_000, stderr[-2000:]  # not a flood of tracebacks
    assert b"Traceback" not in stderr
    events = trail(tmp_path, result["config"])
    paused = [e for e in events if e["event"] == "accepting_paused"]
    assert 1 <= len(paused) <= 10, len(paused)  # once per episode, not once per accept
    assert "Too many open files" in paused[0]["error"]
    assert any(e["event"] == "accepting_again" for e in events)
    assert result["after"][0] <= result["before"][0] + 2  # every peer's descriptor was closed


def test_silent_and_slow_peers_beyond_max_sessions_are_refused_then_a_real_call_is_served(tmp_path):
    result = run_load(tmp_path, nofile=4096, silent=60, slowloris=10, max_sessions=20)
    assert result["channel"].variables.get("CALMLINE_STATUS") == "ok"
    events = trail(tmp_path, result["config"])
    refused = [e for e in events if e["event"] == "connection_refused"]
    assert refused and all("max_sessions (20)" in e["reason"] for e in refused)
    assert result["during"] <= result["before"][0] + 20 + 2  # never more sessions than allowed
    assert result["after"][0] <= result["before"][0] + 2


def test_a_stderr_nobody_reads_does_not_stall_the_service(tmp_path):
    """stderr is a pipe that is never read; EMFILE once made asyncio fill it and hang."""
    read_end, write_end = os.pipe()
    try:
        result = run_load(tmp_path, nofile=64, silent=150, slowloris=0, max_sessions=500, stderr=write_end)
    finally:
        os.close(write_end)
        os.close(read_end)
    assert result["channel"].variables.get("CALMLINE_STATUS") == "ok"


def test_stderr_lines_are_dropped_and_counted_when_nobody_reads_them(tmp_path):
    """Tracebacks, warnings and logging go through the non-blocking sink in `calmline serve`."""
    script = (
        "import logging, sys, warnings\n"
        "from calmline.service import guard_stderr\n"
        "sink = guard_stderr()\n"
        "for i in range(3000):\n"
        "    sys.stderr.write(f'line {i} ' + 'x' * 100 + '\\n')\n"
        "    warnings.warn(f'warning {i}')\n"
        "    logging.getLogger('asyncio').error('from logging %d', i)\n"
        "print('done', sink.dropped_total > 0, flush=True)\n"
        "input()\n"
        "sys.stderr.write('after\\n')\n"
        "sink.finish()\n"
    )
    proc = subprocess.Popen([sys.executable, "-W", "always", "-c", script], env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = asyncio.run(asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20))
        assert line == b"done True\n"  # it did not block on the full pipe, and it counted
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        err = proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    # (The notice that dropping starts is itself dropped: the pipe is full when it is written.)
    assert b"stderr is read again;" in err and b"lines were not written to it" in err
    assert err.rstrip().endswith(b"after") or b"after\n" in err


# --- SIGTERM with sessions in flight ---------------------------------------------------------


class PromptPlays(FakeChannel):
    """STREAM FILE answers only after `seconds` (a prompt that long)."""

    def __init__(self, seconds: float):
        base = bridged_caller()
        super().__init__(variables=base.variables, functions=base.functions, prompts=base.prompts)
        self.seconds = seconds


async def converse(port: int, channel: PromptPlays, uniqueid: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write("".join(environment(uniqueid=uniqueid)).encode())
    try:
        async with asyncio.timeout(20):
            while line := await reader.readline():
                text = line.decode().rstrip("\n")
                if text.startswith("STREAM FILE"):
                    await asyncio.sleep(channel.seconds)
                for reply in channel.answer(text):
                    writer.write(reply.encode())
                await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def sigterm_under_load(tmp_path: Path, sessions: int) -> None:
    port = free_port()
    config = write_config(tmp_path, port, "shutdown_grace = 0.5\nanswer_timeout = 30.0")
    proc = start(tmp_path, config)
    wait_listening(proc, port)

    async def main():
        channels = [PromptPlays(0.05 if i % 2 else 4.0) for i in range(sessions)]
        tasks = [asyncio.create_task(converse(port, ch, f"term.{i}")) for i, ch in enumerate(channels)]
        for _ in range(500):
            if sum(any(c.startswith("STREAM FILE") for c in ch.commands) for ch in channels) >= sessions // 2:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*tasks)
        return channels

    channels = run(main())
    assert proc.wait(30) == 0
    events = trail(tmp_path, config)
    ends = {e["uniqueid"]: e for e in events if e["event"] == "session_end"}
    for i, channel in enumerate(channels):
        uniqueid = f"term.{i}"
        status = channel.variables.get("CALMLINE_STATUS")
        if i % 2:  # a short prompt: finished within the grace
            assert status == "ok", (uniqueid, channel.commands)
            assert ends[uniqueid]["outcome"] == "completed"
        else:  # still playing when the grace ran out: never told "ok"
            assert status == "failed", (uniqueid, status)
            assert ends[uniqueid]["outcome"] == "cancelled", ends.get(uniqueid)
            assert ends[uniqueid]["status"] == "failed"
    assert sum(1 for e in events if e["event"] == "sessions_cancelled") == 1


def test_sigterm_with_sessions_in_flight_records_and_reports_each_outcome(tmp_path):
    sigterm_under_load(tmp_path, 10)


@pytest.mark.slow
def test_sigterm_under_heavy_load(tmp_path):
    sigterm_under_load(tmp_path, 300)


def test_serve_warns_loudly_when_any_host_may_connect(tmp_path):
    port = free_port()
    config = tmp_path / "calmline.toml"
    config.write_text(f'[server]\nhost = "0.0.0.0"\nport = {port}\n\n[mail]\nenabled = false\n', encoding="utf-8")
    proc = start(tmp_path, config)
    try:
        wait_listening(proc, port)
    finally:
        assert stop(proc) == 0
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "calmline: WARNING: server.host = '0.0.0.0' with an empty server.allow" in stderr
    assert any(e["event"] == "open_to_the_network" for e in trail(tmp_path, config))


def test_serve_raises_its_soft_open_file_limit_to_the_hard_one(tmp_path):
    port = free_port()
    config = write_config(tmp_path, port)

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))

    proc = subprocess.Popen(
        [sys.executable, "-m", "calmline", "-c", str(config), "serve", "--no-uvloop"],
        cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=limits,
    )
    try:
        wait_listening(proc, port)
        line = next(l for l in Path(f"/proc/{proc.pid}/limits").read_text().splitlines()
                    if l.startswith("Max open files"))
    finally:
        assert stop(proc) == 0
    assert line.split()[3:5] == ["2048", "2048"], line
