"""/metrics of a real `calmline serve`, scraped over HTTP, against the sessions driven through it."""

from __future__ import annotations

import asyncio
import signal
import time
import socket
import urllib.request
from pathlib import Path

from conftest import run
from fake_asterisk import bridged_caller, environment, run_session
from prometheus_client.parser import text_string_to_metric_families
from serve_process import ServeProcess

from calmline import config as config_module
from calmline.config import MetricsConfig
from calmline.reload import fingerprint



def write_config(path: Path, tmp_path: Path, extra: str = "") -> None:
    path.write_text(
        f'[server]\nport = 0\nanswer_timeout = 5.0\nmax_sessions = 3\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "calmline.sqlite3"}"\n'
        f'[mail]\nport = 1\n'
        f'[metrics]\nenabled = true\nport = 0\n' + extra
    )


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sessions(samples, action: str, outcome: str) -> float:
    return samples.get(("calmline_sessions_total", (("action", action), ("outcome", outcome))), 0.0)


async def held(port: int, gate: asyncio.Event, started: asyncio.Event):
    channel = bridged_caller()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write("".join(environment()).encode())
    await writer.drain()
    first = True
    try:
        while line := await reader.readline():
            if first:
                started.set()
                await gate.wait()
                first = False
            for reply in channel.answer(line.decode().rstrip("\n")):
                writer.write(reply.encode())
            await writer.drain()
    finally:
        writer.close()


async def refused_connection(port: int) -> bool:
    """Whether the server closed a new connection without a word (a refusal, with a reset
    that may arrive before the handshake is seen)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionResetError:
        return True
    writer.write("".join(environment()).encode())
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()


def test_scraped_counts_match_the_sessions_driven_through_the_service(tmp_path):
    path = tmp_path / "calmline.toml"
    write_config(path, tmp_path)
    with ServeProcess(path) as proc:
        port = proc.port
        listening = proc.wait_for("metrics_listening")
        assert listening["host"] == "127.0.0.1" and listening["path"] == "/metrics"
        mport = listening["port"]

        before = scrape(mport)
        assert sessions(before, "warn", "completed") == 0
        assert before[("calmline_config_info", (("fingerprint", fingerprint(config_module.load(path)[0])),))] == 1
        assert before[("calmline_outbox_pending", (("channel", "mail"),))] == 0
        assert before[("calmline_outbox_oldest_pending_age_seconds", (("channel", "mail"),))] == 0

        async def drive():
            for _ in range(5):
                await run_session(port, bridged_caller())
            for _ in range(2):
                await run_session(port, bridged_caller(prompts={}))
            await run_session(port, bridged_caller(), environment("nonsense"))
            await run_session(port, bridged_caller(hangup_before=1))
            await run_session(port, bridged_caller(), environment("end"))
            # Three sessions held open fill server.max_sessions; the fourth connection is refused.
            gate, starts = asyncio.Event(), [asyncio.Event() for _ in range(3)]
            holders = [asyncio.create_task(held(port, gate, s)) for s in starts]
            for s in starts:
                await s.wait()
            was_refused = await refused_connection(port)
            during = await asyncio.to_thread(scrape, mport)
            gate.set()
            await asyncio.gather(*holders)
            return was_refused, during

        driven_from = time.monotonic()
        was_refused, during = run(drive())
        assert was_refused
        assert during[("calmline_sessions_in_flight", ())] == 3
        assert during[("calmline_connections_refused_total", (("reason", "max_sessions"),))] == 1

        after = scrape(mport)
        assert sessions(after, "warn", "completed") == 5 + 3
        assert sessions(after, "warn", "prompt_missing") == 2
        assert sessions(after, "warn", "caller_hung_up") == 1
        assert sessions(after, "none", "refused") == 1
        assert sessions(after, "end", "completed") == 1
        assert after[("calmline_sessions_in_flight", ())] == 0
        # Every session the audit trail saw end is counted, and nothing else.
        # A session's end reaches stdout with the next commit, within the store's linger.
        deadline = time.monotonic() + 5
        while len(ends := [e for e in proc.events if e.get("event") == "session_end"]) < 13 \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        total = sum(v for (name, _), v in after.items() if name == "calmline_sessions_total")
        assert total == len(ends) == 13
        # The ended call queued a team mail that cannot go out (SMTP port 1): one pending.
        assert after[("calmline_outbox_pending", (("channel", "mail"),))] == 1
        # Its age grows from the moment it was queued, and no further back than the drive.
        age = after[("calmline_outbox_oldest_pending_age_seconds", (("channel", "mail"),))]
        assert 0 < age <= time.monotonic() - driven_from
        time.sleep(0.3)
        later = scrape(mport)[("calmline_outbox_oldest_pending_age_seconds", (("channel", "mail"),))]
        assert later >= age + 0.25
        assert after[("process_open_fds", ())] > 0

        # A reload shows as a new fingerprint and a counted reload.
        write_config(path, tmp_path, '[warn]\ncode = "*7"\n')
        proc.signal(signal.SIGHUP)
        reloaded = proc.wait_for("config_reloaded")
        path.write_text("[server\n")
        proc.signal(signal.SIGHUP)
        proc.wait_for("config_reload_refused")
        last = scrape(mport)
        assert last[("calmline_config_info", (("fingerprint", reloaded["fingerprint"]),))] == 1
        assert not any(name == "calmline_config_info" and dict(labels)["fingerprint"] != reloaded["fingerprint"]
                       for (name, labels) in last)
        assert last[("calmline_config_reloads_total", (("result", "applied"),))] == 1
        assert last[("calmline_config_reloads_total", (("result", "refused"),))] == 1


def test_metrics_are_off_by_default_and_on_loopback_when_on(tmp_path):
    assert MetricsConfig().enabled is False and MetricsConfig().host == "127.0.0.1"
    path = tmp_path / "calmline.toml"
    write_config(path, tmp_path)
    path.write_text(path.read_text().replace("enabled = true", "enabled = false"))
    with ServeProcess(path) as proc:
        proc.port
        assert not any(e.get("event") == "metrics_listening" for e in proc.events)


def test_a_metrics_port_in_use_is_one_line_naming_the_key(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    path = tmp_path / "calmline.toml"
    write_config(path, tmp_path)
    path.write_text(path.read_text().replace("enabled = true\nport = 0", f"enabled = true\nport = {taken.getsockname()[1]}"))
    with ServeProcess(path) as proc:
        code = proc.proc.wait(30)
    taken.close()
    assert code == 2
    lines = [line for line in proc.stderr if line]
    assert len(lines) == 1 and lines[0].startswith("calmline: metrics.host/metrics.port: cannot listen on 127.0.0.1:")


def test_commit_latency_and_store_errors_are_scraped(tmp_path):
    """A store someone else holds locked shows as errors; commits show in the histogram."""
    import sqlite3

    path = tmp_path / "calmline.toml"
    write_config(path, tmp_path, "[audit]\ncommit_timeout = 0.5\n")
    with ServeProcess(path) as proc:
        port = proc.port
        mport = proc.wait_for("metrics_listening")["port"]
        run(run_session(port, bridged_caller()))
        first = scrape(mport)
        commits = first[("calmline_audit_commit_seconds_count", ())]
        assert commits >= 1
        assert first[("calmline_audit_commit_seconds_bucket", (("le", "+Inf"),))] == commits
        assert first[("calmline_audit_store_errors_total", ())] == 0

        blocker = sqlite3.connect(tmp_path / "calmline.sqlite3", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            channel = bridged_caller()
            run(run_session(port, channel))
            assert channel.variables["CALMLINE_STATUS"] == "ok"  # the call went on
            deadline = time.monotonic() + 10
            while scrape(mport)[("calmline_audit_store_errors_total", ())] < 1:
                assert time.monotonic() < deadline, "no store error counted while the store was locked"
                time.sleep(0.1)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        proc.wait_for("audit_store_outage")
        last = scrape(mport)
        assert last[("calmline_audit_commit_seconds_count", ())] > commits
