"""The audit trail is durable: a step an action has moved past is on disk, even after kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import structlog
from conftest import run
from fake_asterisk import bridged_caller, environment, run_session

from calmline.audit.store import AuditStore
from calmline.audit.trail import AuditTrail, configure
from calmline.errors import StoreError
from calmline.lines import LineSink
from calmline.store import Database

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def trail_store(tmp_path):
    """An open AuditStore with structlog routed through it; `make(**options)` passes the
    options (echo, commit_timeout, max_pending...) to AuditStore."""
    stores: list[AuditStore] = []

    def make(**options) -> tuple[AuditStore, AuditTrail]:
        store = AuditStore(Database(f"sqlite:///{tmp_path / 'audit.sqlite3'}"), **options)
        store.open()
        configure(store)
        stores.append(store)
        return store, AuditTrail(store)

    yield make
    for store in stores:
        store.close()
    structlog.reset_defaults()


def rows(path: Path, sql: str = "SELECT event, uniqueid, step, data FROM events ORDER BY id") -> list[tuple]:
    """Read with a connection of our own, as another process would."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def locked(path: Path) -> sqlite3.Connection:
    """Someone else holds the write lock (a backup tool, an admin's sqlite3)."""
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    return blocker


def test_an_event_is_readable_by_another_connection_once_durable(trail_store, tmp_path):
    async def main():
        store, trail = trail_store()
        trail.event("probe", uniqueid="u.1")
        await trail.step("warning_played", uniqueid="u.2")
        return rows(tmp_path / "audit.sqlite3")

    got = run(main())
    assert [(r[0], r[1], r[2]) for r in got] == [("probe", "u.1", None), ("step", "u.2", "warning_played")]
    ids = [json.loads(r[3])["event_id"] for r in got]
    assert len(set(ids)) == 2 and all(ids)


def test_step_does_not_return_before_its_event_is_committed(trail_store, tmp_path):
    async def main():
        store, trail = trail_store(commit_timeout=30)
        blocker = locked(tmp_path / "audit.sqlite3")
        task = asyncio.create_task(trail.step("warning_played"))
        await asyncio.sleep(1.5)
        pending_while_locked = not task.done()
        blocker.execute("ROLLBACK")
        blocker.close()
        durable = await asyncio.wait_for(task, 10)
        return pending_while_locked, durable, rows(tmp_path / "audit.sqlite3")

    pending, durable, got = run(main())
    assert pending and durable is True
    # The lock outlasted SQLite's busy timeout, so the outage's record may follow the step.
    assert [r[2] for r in got if r[0] == "step"] == ["warning_played"]
    assert {r[0] for r in got} <= {"step", "audit_store_outage"}


def test_a_commit_whose_success_was_not_seen_is_retried_without_storing_anything_twice(trail_store, tmp_path, monkeypatch):
    """A commit can succeed while its acknowledgement is lost (a dropped connection to the
    database): the retry must not store the batch again."""
    from calmline.store import Connection

    original = Connection.transaction
    failed = []

    def flaky(self):
        cm = original(self)

        class AfterCommit:
            def __enter__(inner):
                return cm.__enter__()

            def __exit__(inner, *exc):
                result = cm.__exit__(*exc)
                if not failed and exc[0] is None:
                    failed.append(True)
                    raise OSError("connection reset after COMMIT")
                return result

        return AfterCommit()

    async def main():
        _, trail = trail_store(commit_timeout=10)
        monkeypatch.setattr(Connection, "transaction", flaky)
        await asyncio.gather(*(trail.step("probe", n=i) for i in range(20)))

    run(main())
    assert failed == [True]
    got = rows(tmp_path / "audit.sqlite3", "SELECT json_extract(data, '$.n') FROM events WHERE event = 'step'")
    assert sorted(n for (n,) in got) == list(range(20))


def test_many_concurrent_steps_share_few_commits(trail_store, tmp_path):
    async def main():
        store, trail = trail_store()
        before = store.commits
        await asyncio.gather(*(trail.step("probe", n=i) for i in range(500)))
        return store.commits - before

    commits = run(main())
    assert rows(tmp_path / "audit.sqlite3", "SELECT count(*) FROM events")[0][0] == 500
    assert commits < 100, f"500 concurrent steps took {commits} commits: group commit does not group"


def test_events_nobody_waits_for_share_the_next_steps_commit(trail_store, tmp_path):
    """One session after the other, as on a quiet service: its start and end need no commit
    of their own (the benchmark measured 2.6 commits per session before they waited)."""
    async def main():
        store, trail = trail_store()
        before = store.commits
        for i in range(30):
            trail.event("session_start", uniqueid=f"q.{i}")
            await asyncio.sleep(0.003)  # the prompt's commands go to Asterisk and back
            await trail.step("warning_played", uniqueid=f"q.{i}")
            trail.event("session_end", uniqueid=f"q.{i}")
            await asyncio.sleep(0.003)  # the status, the close, the next call's connect
        assert store.flush(10)
        return store.commits - before

    commits = run(main())
    got = rows(tmp_path / "audit.sqlite3")
    assert [(r[0], r[1]) for r in got[:3]] == [("session_start", "q.0"), ("step", "q.0"), ("session_end", "q.0")]
    assert len(got) == 90
    assert commits <= 45, f"30 sessions took {commits} commits: events nobody waits for commit alone"


def test_flush_works_from_the_loop_and_from_another_thread(trail_store, tmp_path):
    async def main():
        store, trail = trail_store()
        trail.event("from_loop")
        assert store.flush(5)
        from_loop = rows(tmp_path / "audit.sqlite3")
        done = []
        thread = threading.Thread(target=lambda: (trail.event("from_thread"), done.append(store.flush(5))))
        thread.start()
        thread.join(10)
        return from_loop, done

    from_loop, done = run(main())
    assert [r[0] for r in from_loop] == ["from_loop"]
    assert done == [True]
    assert [r[0] for r in rows(tmp_path / "audit.sqlite3")] == ["from_loop", "from_thread"]


def test_events_json_cannot_take_are_stored_as_text_and_the_trail_goes_on(trail_store, tmp_path):
    async def main():
        _, trail = trail_store()
        looped: list = []
        looped.append(looped)
        trail.event("tuple_key", odd={("a", 1): "b"})
        trail.event("cycle", data=looped)
        trail.event("surrogate", caller_name="\udcff\udcfeName", caller_number=10**30)
        return await asyncio.wait_for(trail.step("after_them"), 5)

    assert run(main()) is True
    got = rows(tmp_path / "audit.sqlite3", "SELECT event, caller_name, caller_number, data FROM events ORDER BY id")
    assert [g[0] for g in got] == ["tuple_key", "cycle", "surrogate", "step"]
    assert json.loads(got[0][3])["odd"] == {"('a', 1)": "b"}
    assert json.loads(got[1][3])["data"] == ["[...]"]
    assert got[2][1] == "\ufffd\ufffdName" and got[2][2] == str(10**30)


def test_events_logged_from_a_worker_thread_reach_the_store_while_the_loop_sleeps(trail_store, tmp_path):
    async def main():
        store, _ = trail_store()
        log = structlog.get_logger("calmline.callback.mail")
        thread = threading.Thread(target=lambda: log.info("mail_sent", key="k"))
        thread.start()
        thread.join()
        await asyncio.sleep(0.5)  # the loop does nothing for it
        return rows(tmp_path / "audit.sqlite3")

    assert [r[0] for r in run(main())] == ["mail_sent"]


def test_a_store_that_cannot_be_written_or_is_damaged_is_refused_at_start(tmp_path):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    db = Database(f"sqlite:///{readonly / 'calmline.sqlite3'}")
    db.open_checked()
    os.chmod(readonly / "calmline.sqlite3", 0o400)
    os.chmod(readonly, 0o500)
    try:
        if os.geteuid() != 0:  # root writes through any mode bits
            with pytest.raises(StoreError, match="store.url: cannot"):
                AuditStore(db).open()
    finally:
        os.chmod(readonly, 0o700)

    smashed = tmp_path / "smashed.sqlite3"
    Database(f"sqlite:///{smashed}").open_checked()
    conn = sqlite3.connect(smashed)
    conn.executemany("INSERT INTO events (event_id, ts, event, data) VALUES (?, ?, 'x', ?)",
                     [(str(i), "t", "d" * 500) for i in range(200)])
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with open(smashed, "r+b") as f:
        f.seek(4096 * 3)
        f.write(os.urandom(4096 * 2))
    with pytest.raises(StoreError, match="damaged|cannot"):
        AuditStore(Database(f"sqlite:///{smashed}")).open()


def test_a_store_newer_than_the_code_is_refused(tmp_path):
    path = tmp_path / "new.sqlite3"
    db = Database(f"sqlite:///{path}")
    db.open_checked()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_version (version) VALUES (999)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 999, newer than this calmline"):
        db.open_checked()


def test_the_store_file_is_private(trail_store, tmp_path):
    async def main():
        _, trail = trail_store()
        await trail.step("probe")

    run(main())
    for name in ("audit.sqlite3", "audit.sqlite3-wal"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == "0o600", name


# --- kill -9 under load -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_listening(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
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


def test_sigkill_mid_load_loses_no_step_a_client_saw_completed(tmp_path):
    port = free_port()
    db = tmp_path / "audit.sqlite3"
    config = tmp_path / "calmline.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
environment_timeout = 2.0
answer_timeout = 5.0

[store]
url = "sqlite:///{db}"

[audit]
stdout = false

[mail]
enabled = false
""",
        encoding="utf-8",
    )
    stderr = open(tmp_path / "stderr.txt", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "calmline", "-c", str(config), "serve", "--no-uvloop"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr,
        env={**os.environ, "PYTHONPATH": str(REPO / "agi")},
    )
    sessions: list[tuple[str, object]] = []  # (uniqueid, channel)

    async def load() -> None:
        killed = asyncio.Event()

        def acknowledged() -> int:
            return sum('SET VARIABLE CALMLINE_STATUS "ok"' in ch.commands for _, ch in sessions)

        async def worker(w: int) -> None:
            n = 0
            while not killed.is_set():
                uniqueid = f"kill.{w}.{n}"
                n += 1
                channel = bridged_caller()
                sessions.append((uniqueid, channel))
                try:
                    await run_session(port, channel, environment(uniqueid=uniqueid), timeout=5)
                except OSError:  # refused or reset once the server is gone
                    await asyncio.sleep(0.01)

        async def killer() -> None:
            deadline = time.monotonic() + 10
            while acknowledged() < 300 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
            killed.set()

        await asyncio.gather(killer(), *(worker(w) for w in range(48)))

    try:
        wait_until_listening(port, proc)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children == [], "calmline serve is one process: it starts no writer or helper"
        run(load())
        assert proc.wait(5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()

    acked = {uid for uid, ch in sessions if 'SET VARIABLE CALMLINE_STATUS "ok"' in ch.commands}
    # The kill landed under load (48 clients running, over 300 sessions acknowledged). Whether
    # one was caught mid-session is timing, so it is not asserted (it made the test flaky).
    assert len(acked) >= 300, len(acked)

    # Opening the database recovers the WAL, as the restarted service would.
    conn = sqlite3.connect(db)
    try:
        durable = {
            uid for (uid,) in conn.execute(
                "SELECT uniqueid FROM events WHERE event = 'step' AND step = 'warning_played'"
            )
        }
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    assert integrity == "ok"
    assert oct(db.stat().st_mode & 0o777) == "0o600", "the store holds callers' data: private"
    lost = sorted(acked - durable)
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged steps lost after kill -9, e.g. {lost[:5]}"


def test_a_store_that_refuses_for_long_lets_the_call_go_on_and_keeps_the_events(trail_store, tmp_path, capfd):
    """A full disk must not hold a caller in silence: after commit_timeout the step goes on,
    the events are still echoed meanwhile, and they are all committed once the store is back."""
    echo_path = tmp_path / "echo.jsonl"
    echo_file = echo_path.open("w", encoding="utf-8")

    async def main():
        store, trail = trail_store(echo=LineSink(echo_file.fileno(), "stdout"), commit_timeout=0.4)
        blocker = locked(tmp_path / "audit.sqlite3")
        started = time.monotonic()
        await asyncio.wait_for(trail.step("warning_played", warning=1), 5)
        waited = time.monotonic() - started
        trail.event("after_the_step")
        started = time.monotonic()
        await asyncio.wait_for(trail.step("warning_played", warning=2), 5)
        waited_again = time.monotonic() - started
        await asyncio.sleep(1.5)
        echoed_while_refused = [json.loads(x)["event"] for x in echo_path.read_text().splitlines()]
        on_disk_while_refused = rows(tmp_path / "audit.sqlite3")
        blocker.execute("ROLLBACK")
        blocker.close()
        assert store.flush(10)
        again = await asyncio.wait_for(trail.step("warning_played", warning=3), 5)
        return waited, waited_again, echoed_while_refused, on_disk_while_refused, again

    waited, waited_again, echoed, while_refused, again = run(main())
    assert 0.4 <= waited < 0.7, "commit_timeout is kept to within the loop's own latency"
    assert waited_again < 0.1  # one wait per outage, not one per step
    late = ["step", "step_not_yet_durable", "after_the_step", "step", "step_not_yet_durable"]
    assert echoed == late
    assert while_refused == []
    assert again is True
    after = rows(tmp_path / "audit.sqlite3")
    assert [r[0] for r in after] == [*late, "audit_store_outage", "step"]
    assert [json.loads(r[3]).get("warning") for r in after if r[0] == "step"] == [1, 2, 3]
    err = capfd.readouterr().err
    assert "waited 0.4s (audit.commit_timeout)" in err and "calls go on" in err
    assert "cannot write the audit store" in err and "database is locked" in err
    assert "is writable again" in err


def test_each_outage_gets_its_one_wait_even_when_nobody_waited_as_the_last_one_ended(trail_store, tmp_path):
    async def main():
        store, trail = trail_store(commit_timeout=0.3)
        waits = []
        for _outage in range(2):
            blocker = locked(tmp_path / "audit.sqlite3")
            started = time.monotonic()
            await trail.step("probe")
            waits.append(time.monotonic() - started)
            blocker.execute("ROLLBACK")
            blocker.close()
            assert store.flush(10)  # the outage ends while no step waits
            await asyncio.sleep(0.1)
            trail.event("between")
            assert store.flush(10)
            await asyncio.sleep(0.1)
        return waits

    waits = run(main())
    assert all(0.3 <= w < 0.6 for w in waits), waits


def test_a_long_outage_keeps_a_bounded_number_of_events_and_says_how_many_it_dropped(trail_store, tmp_path, capfd):
    async def main():
        store, trail = trail_store(commit_timeout=0.2, max_pending=50)
        blocker = locked(tmp_path / "audit.sqlite3")
        for i in range(80):
            trail.event("probe", n=i)
        await asyncio.sleep(1.5)  # past SQLite's busy timeout: the store refuses
        blocker.execute("ROLLBACK")
        blocker.close()
        assert store.flush(10)
        await asyncio.sleep(0.1)
        assert store.flush(10)

    run(main())
    got = rows(tmp_path / "audit.sqlite3", "SELECT event, data FROM events ORDER BY id")
    probes = [json.loads(d)["n"] for e, d in got if e == "probe"]
    assert len(probes) >= 50 and probes == list(range(len(probes)))
    outage = [json.loads(d) for e, d in got if e == "audit_store_outage"]
    assert outage and outage[0]["dropped"] == 80 - len(probes)
    assert "new events are dropped from it" in capfd.readouterr().err


@pytest.mark.parametrize("reader", ["stalled", "gone"])
def test_a_stdout_reader_that_stalls_or_goes_away_never_holds_up_the_store(trail_store, tmp_path, capfd, reader):
    """The JSON lines are for log shippers; if one stops reading or exits, steps must stay
    as quick as ever and every event must still be committed."""
    read_end, write_end = os.pipe()
    if reader == "gone":
        os.close(read_end)
    n = 2500  # 5 MB of JSON lines: more than the pipe and the echo's limit together

    async def main():
        _, trail = trail_store(echo=LineSink(write_end, "stdout", notice=lambda t: sys.stderr.write(t + "\n")),
                               commit_timeout=60)
        for i in range(n):
            await asyncio.wait_for(trail.step("probe", n=i, pad="p" * 2000), 10)

    run(main())
    os.close(write_end)
    if reader == "stalled":
        os.close(read_end)
    assert rows(tmp_path / "audit.sqlite3", "SELECT count(*) FROM events WHERE event = 'step'") == [(n,)]
    err = capfd.readouterr().err
    assert ("stdout is not being read" if reader == "stalled" else "stdout closed") in err
    assert "waited" not in err
