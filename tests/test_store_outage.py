"""PostgreSQL stopped and started again under load: calls go on, nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import json
import time

import psycopg
import pytest
from fake_asterisk import bridged_caller, environment, run_session
from postgres import SCRIPT, fresh_database, free_port, started_cluster
from serve_process import ServeProcess


@pytest.fixture
def own_cluster(postgres_url):
    """A cluster of this test's own, since it is stopped and started under load."""
    with started_cluster("calmline-pg-outage-", f"no {SCRIPT} to start a cluster this test may stop") as cluster:
        yield cluster


ACK = 'SET VARIABLE CALMLINE_STATUS "ok"'


def test_a_database_restart_under_load_holds_a_step_once_and_loses_nothing(tmp_path, own_cluster):
    url = fresh_database(own_cluster.url)
    commit_timeout = 1.5
    config = tmp_path / "calmline.toml"
    config.write_text(f"""
[server]
host = "127.0.0.1"
port = {free_port()}
environment_timeout = 2.0
answer_timeout = 5.0

[store]
url = "{url}"

[audit]
stdout = true
commit_timeout = {commit_timeout}

[mail]
port = 1
""", encoding="utf-8")
    svc = ServeProcess(config, cwd=tmp_path)
    sessions: list[tuple[str, object, float, float]] = []  # uniqueid, channel, started, took
    phase = {"down_at": 0.0, "up_at": 0.0}
    try:
        port = svc.port

        async def load() -> None:
            stop = asyncio.Event()

            async def caller(w: int) -> None:
                n = 0
                while not stop.is_set():
                    uniqueid = f"outage.{w}.{n}"
                    n += 1
                    channel = bridged_caller()
                    channel.functions["CHANNEL(linkedid)"] = uniqueid
                    started = time.monotonic()
                    await run_session(port, channel, environment(uniqueid=uniqueid), timeout=15)
                    sessions.append((uniqueid, channel, started, time.monotonic() - started))
                    await asyncio.sleep(0.01)

            async def operator() -> None:
                await asyncio.sleep(1.0)
                phase["down_at"] = time.monotonic()
                await asyncio.to_thread(own_cluster.stop)
                await asyncio.sleep(4.0)  # calls keep coming while the database is down
                await asyncio.to_thread(own_cluster.start)
                phase["up_at"] = time.monotonic()
                await asyncio.sleep(2.0)
                stop.set()

            await asyncio.gather(operator(), *(caller(w) for w in range(6)))

        asyncio.run(load())

        # The outbox's connection broke with the restart; the next ended call queues its mail.
        ended = bridged_caller()
        ended.functions["CHANNEL(linkedid)"] = "after.outage"
        asyncio.run(run_session(port, ended, environment("end", uniqueid="after.outage")))
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT key, kind FROM outbox").fetchall() == [("after.outage", "team")]

        # Calls went on: every session was acknowledged, during the outage too.
        during = [s for s in sessions if phase["down_at"] < s[2] < phase["up_at"]]
        assert len(during) >= 20, len(during)
        assert all(ACK in ch.commands for _, ch, _, _ in sessions)
        # A step waited at most commit_timeout, and only the steps in flight when the wait
        # began waited at all (6 callers): the others went on at once.
        slow = [took for _, _, _, took in sessions if took >= commit_timeout * 0.9]
        assert max(took for _, _, _, took in sessions) < commit_timeout + 2.0
        assert 1 <= len(slow) <= 6, slow

        # Once the database is back, everything acknowledged is committed, once.
        wanted = {uid for uid, *_ in sessions}
        deadline = time.monotonic() + 30
        while True:
            with psycopg.connect(url, autocommit=True) as conn:
                stored = conn.execute("SELECT uniqueid, count(*) FROM events WHERE event = 'step' AND step = 'warning_played' "
                                      "GROUP BY uniqueid").fetchall()
                outage = conn.execute("SELECT data FROM events WHERE event = 'audit_store_outage'").fetchall()
            if {uid for uid, _ in stored} >= wanted and outage or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert wanted - {uid for uid, _ in stored} == set()
        assert [s for s in stored if s[1] != 1] == []
        [(data,)] = outage
        assert json.loads(data)["seconds"] >= 3.0 and json.loads(data)["dropped"] == 0
        # stderr and the trail say what happened
        svc.wait_for_stderr("cannot write the audit store")
        svc.wait_for_stderr(f"a step waited {commit_timeout:g}s (audit.commit_timeout)")
        svc.wait_for_stderr("is writable again after")
        with psycopg.connect(url, autocommit=True) as conn:
            late = conn.execute("SELECT count(*) FROM events WHERE event = 'step_not_yet_durable'").fetchone()[0]
        # each step that went on before its commit says so (those that began just before
        # the restart returned may have committed in time)
        assert len(during) * 0.8 <= late <= len(sessions)
    finally:
        svc.stop()
    assert svc.proc.returncode == 0, svc.stderr[-10:]
