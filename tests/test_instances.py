"""Two `calmline serve` processes on one PostgreSQL: one trail, one outbox, one warning ladder."""

from __future__ import annotations

import asyncio
import email
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from aiosmtpd.controller import Controller
from calmline.callback.mail import message_id
from fake_asterisk import bridged_caller, environment, run_session
from postgres import free_port
import serve_process
from serve_process import ServeProcess

TEAM = "team@example.com"


class CountingInbox:
    """A real SMTP server's handler that keeps every message it accepted, a little slowly, so
    mail is still being sent when an instance is killed."""

    def __init__(self, delay: float):
        self.delay = delay
        self.lock = threading.Lock()
        self.received: list[tuple[list[str], email.message.Message]] = []

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(self.delay)
        with self.lock:
            self.received.append((list(envelope.rcpt_tos), email.message_from_bytes(envelope.content)))
        return "250 OK queued"

    def team(self) -> list[email.message.Message]:
        with self.lock:
            return [m for rcpt, m in self.received if rcpt == [TEAM]]


@pytest.fixture
def inbox():
    handler = CountingInbox(delay=0.03)
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    handler.port = port
    yield handler
    controller.stop()


def instance_config(path: Path, store_url: str, smtp_port: int, *, lease: float) -> Path:
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {free_port()}
environment_timeout = 2.0
answer_timeout = 5.0

[store]
url = "{store_url}"

[audit]
stdout = true

[mail]
port = {smtp_port}
team_address = "{TEAM}"
sender = "calmline@example.com"
timeout = 2.0
lease_seconds = {lease}
retry_initial_seconds = 1.0
""", encoding="utf-8")
    return path


def end_channel(n: int):
    linkedid = f"1795350{n:03d}.{n}"
    channel = bridged_caller()
    channel.functions["CHANNEL(linkedid)"] = linkedid
    channel.variables["CALMLINE_WARNINGS"] = "2"
    return linkedid, channel


def store_rows(url: str, sql: str, params=()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def test_two_instances_share_the_trail_the_outbox_and_the_ladder(tmp_path, pg_database, inbox):
    lease = 4.0
    a = ServeProcess(instance_config(tmp_path / "a.toml", pg_database, inbox.port, lease=lease), cwd=tmp_path)
    b = ServeProcess(instance_config(tmp_path / "b.toml", pg_database, inbox.port, lease=lease), cwd=tmp_path)
    try:
        ports = [a.port, b.port]

        # One call's presses go to each instance in turn: the count lives on the channel.
        async def presses():
            channel = bridged_caller()
            for press in range(4):
                channel.hung_up = channel.notice_sent = False
                await run_session(ports[press % 2], channel, environment("warn"))
            return channel

        ladder = asyncio.run(presses())
        assert ladder.variables["CALMLINE_WARNINGS"] == "4"
        streamed = [c for c in ladder.commands if c.startswith("STREAM FILE")]
        assert streamed == ['STREAM FILE "calmline/warn-1" ""'] + ['STREAM FILE "calmline/warn-final" ""'] * 3

        # 200 ended calls, alternating; B is SIGKILLed midway, and its calls fail over to A
        # as Asterisk does with the next SRV target of hagi://.
        calls = 200
        done: list[str] = []
        killed_at: list[float] = []

        async def call(n: int) -> None:
            linkedid, channel = end_channel(n)
            order = [ports[n % 2], ports[(n + 1) % 2]]
            for port in order:
                if port == ports[1] and killed_at:
                    continue
                try:
                    dialogue = await run_session(port, channel, environment("end", uniqueid=linkedid), timeout=10)
                except OSError:
                    continue
                if "HANGUP" in dialogue.commands:
                    done.append(linkedid)
                    return
                channel = end_channel(n)[1]  # the instance died under this call: Asterisk retries

        async def drive():
            limit = asyncio.Semaphore(8)

            async def one(n: int) -> None:
                async with limit:
                    await call(n)
                    if n == calls // 2 and not killed_at:
                        b.signal(signal.SIGKILL)
                        killed_at.append(time.monotonic())

            await asyncio.gather(*(one(n) for n in range(calls)))

        asyncio.run(drive())
        assert b.proc.wait(10) == -signal.SIGKILL
        assert len(set(done)) == calls

        # Every mail goes out, the dead instance's claimed one after its lease, exactly once
        # per Message-ID (a mail accepted just as B died may arrive twice, with the same id).
        deadline = time.monotonic() + 60
        sent = "SELECT count(*) FROM outbox WHERE status = 'sent'"
        while store_rows(pg_database, sent) != [(calls,)] and time.monotonic() < deadline:
            time.sleep(0.2)
        print(f"all mail sent {time.monotonic() - killed_at[0]:.1f}s after the kill")
        team = inbox.team()  # a row marked sent is never sent again: this is the final count
        ids = {m["Message-ID"] for m in team}
        assert len(ids) == calls, (len(ids), len(team))
        assert len(team) - len(ids) <= 1
        assert ids == {message_id(linkedid, "team", "calmline@example.com") for linkedid in done}
        assert store_rows(pg_database, "SELECT status, count(*) FROM outbox GROUP BY status") == [("sent", calls)]

        # Every step of every call lands once, whichever instance served it.
        # A call B was serving when it died ran again on A, which found the request queued.
        queued = store_rows(pg_database, "SELECT linkedid, data FROM events WHERE step = 'callback_queued'")
        first = [linkedid for linkedid, data in queued if json.loads(data)["duplicate"] is False]
        assert {linkedid for linkedid, _ in queued} == set(done)
        assert len(first) == len(set(first))  # queued once per call, whichever instance ran it
        # only the calls in flight at the kill (8 at most) may have run twice, or lost B's
        # unacknowledged step when B died between the outbox commit and the step's commit
        assert len(queued) - len(first) <= 8 and len(done) - len(first) <= 8
        ended = store_rows(pg_database, "SELECT DISTINCT linkedid FROM events WHERE event = 'session_end' "
                                        "AND outcome = 'completed' AND session IS NOT NULL")
        # B may die after its last command to a call and before that session's end is stored
        assert len(set(done) - {linkedid for (linkedid,) in ended}) <= 8
        warns = store_rows(pg_database, "SELECT data FROM events WHERE step = 'warning_played' ORDER BY id")
        assert sorted(json.loads(d)["warning"] for (d,) in warns) == [1, 2, 3, 4]
        a_events = {e["event_id"] for e in a.events}
        served_by_b = [d for (d,) in warns if json.loads(d)["event_id"] not in a_events]
        assert len(served_by_b) == 2
        # `calmline audit`, run with either config, shows the call whatever instance served it
        shown = subprocess.run([sys.executable, "-m", "calmline", "-c", str(tmp_path / "a.toml"), "audit",
                                "--linkedid", "1795350788.44"], env=serve_process.environment(), capture_output=True,
                               text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        steps = [json.loads(line) for line in shown.stdout.splitlines()]
        assert [e["warning"] for e in steps if e.get("step") == "warning_played"] == [1, 2, 3, 4]
    finally:
        a.stop()
        b.stop()


def test_a_mail_claimed_by_an_instance_that_died_is_sent_by_another_after_the_lease(tmp_path, pg_database, inbox):
    lease = 4.0
    connected = threading.Event()
    blackhole = socket.socket()  # an SMTP server that accepts and never greets: B hangs mid-send
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen()
    held = []

    def accept() -> None:
        conn, _ = blackhole.accept()
        held.append(conn)
        connected.set()

    threading.Thread(target=accept, daemon=True).start()
    b = ServeProcess(instance_config(tmp_path / "b.toml", pg_database, blackhole.getsockname()[1], lease=lease),
                     cwd=tmp_path)
    a = None
    try:
        linkedid, channel = end_channel(7)
        dialogue = asyncio.run(run_session(b.port, channel, environment("end", uniqueid=linkedid)))
        assert "HANGUP" in dialogue.commands
        assert connected.wait(10), "B's worker never tried to send"
        claimed_by = time.monotonic()  # B claimed the mail just before it connected
        b.signal(signal.SIGKILL)
        assert b.proc.wait(10) == -signal.SIGKILL
        a = ServeProcess(instance_config(tmp_path / "a.toml", pg_database, inbox.port, lease=lease), cwd=tmp_path)
        a.wait_for("mail_worker_started")
        a.wait_for("mail_sent", timeout=lease + 10)
        waited = time.monotonic() - claimed_by
        assert lease - 1.0 <= waited <= lease + 5.0, waited
        [mail] = inbox.team()
        assert mail["Message-ID"] == message_id(linkedid, "team", "calmline@example.com")
    finally:
        for proc in (a, b):
            if proc is not None:
                proc.stop()
        for conn in held:
            conn.close()
        blackhole.close()
