"""`calmline store migrate`: a SQLite store copied into PostgreSQL by the real command."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import psycopg
from serve_process import environment

from calmline.audit.store import INSERT, _row, stamp
from calmline.callback.outbox import CallbackRequest, Outbox
from calmline.store import Database


def sqlite_store(path, events: int, mails: int) -> Database:
    db = Database(f"sqlite:///{path}")
    db.open_checked()
    conn = db.connect()
    with conn.transaction():
        conn.executemany(INSERT, [
            _row(stamp("info", {"event": "step", "step": "warning_played", "linkedid": f"L{n}",
                                "uniqueid": f"U{n}", "caller_name": "Zo\u00eb", "n": n},
                       t=1_700_000_000 + n))
            for n in range(events)])
        if events:  # one warn session, from which the escalations table is derived
            conn.executemany(INSERT, [_row(stamp("info", {"session": "S1", "action": "warn", "linkedid": "L1",
                                                          "agent": "PJSIP/alice-0001", "caller_number": "+1555",
                                                          **e}, t=1_800_000_000 + i))
                                      for i, e in enumerate([{"event": "session_start"},
                                                             {"event": "step", "step": "warning_played", "final": True},
                                                             {"event": "session_end", "outcome": "completed"}])])
    conn.close()
    with Outbox(db) as outbox:
        for n in range(mails):
            outbox.add(CallbackRequest(
                key=f"call-{n}", created_at=datetime(2026, 1, 1, tzinfo=timezone.utc), caller_number="+1555",
                caller_name="C", caller_email="c@example.com" if n % 2 else None, agent="PJSIP/1",
                warnings=2, reason="r", uniqueid=f"U{n}", linkedid=f"L{n}", channel="PJSIP/x"), now=1.0 + n)
        conn = db.connect()
        conn.execute("INSERT INTO webhooks (key, url, queued_at, body) VALUES ('a-1', 'https://a.example/x', 1.0, "
                     "'{}'), ('a-1', 'https://b.example/y', 1.0, '{}')")
        conn.execute("INSERT INTO cooldowns (key, interface, trigger, state, created_at, due_at, next_attempt) "
                     "VALUES ('c-1', 'PJSIP/2001', 'warn', 'paused', 1.0, 2.0, 2.0)")
        conn.execute("INSERT INTO console_users (name, password_hash, created_at) VALUES ('ana', 'hash-of-ana', "
                     "'2026-01-01T00:00:00+00:00')")
        conn.close()
        if mails:
            [first] = [i for i in outbox.items() if i.key == "call-0"]
            outbox.mark_sent(first, "250 ok", 5.0)
    return db


def migrate(source: str, target: str, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "calmline", "store", "migrate", "--from", source,
                             "--to", target, *extra], env=environment(), text=True, **popen)


def rows(url: str, sql: str) -> list[tuple]:
    if url.startswith("sqlite"):
        conn = Database(url).connect()
        try:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
        finally:
            conn.close()
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


EVENTS = "SELECT event_id, ts, event, step, linkedid, caller_name, data FROM events ORDER BY id"
OUTBOX = ("SELECT key, kind, recipient, status, attempts, next_attempt, queued_at, sent_at, smtp_reply, request "
          "FROM outbox ORDER BY id")


def test_migrate_copies_everything_once_and_again_adds_nothing(tmp_path, pg_database):
    source = sqlite_store(tmp_path / "old.sqlite3", events=3000, mails=40).url
    done = migrate(source, pg_database, "--batch", "500", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    assert rows(pg_database, EVENTS) == rows(source, EVENTS)
    assert rows(pg_database, OUTBOX) == rows(source, OUTBOX)
    assert rows(pg_database, "SELECT name, password_hash FROM console_users") == [("ana", "hash-of-ana")]
    escalations = "SELECT session, linkedid, ts, action, kind, endpoint, caller_number, outcome FROM escalations"
    assert rows(pg_database, escalations) == rows(source, escalations) and len(rows(source, escalations)) == 1
    pauses = "SELECT key, interface, state, due_at FROM cooldowns"
    assert rows(pg_database, pauses) == rows(source, pauses) == [("c-1", "PJSIP/2001", "paused", 2.0)]
    hooks = "SELECT key, url, status, body FROM webhooks ORDER BY id"
    assert rows(pg_database, hooks) == rows(source, hooks) and len(rows(source, hooks)) == 2
    assert "copied" in out and "3,003 events rows" in out and "60 outbox rows" in out
    lines = err.splitlines()  # not a terminal: plain lines, no redraws
    assert "events: 3,003 rows to copy" in lines
    assert any(line.startswith("events: 3,003/3,003 rows (100%)") and "done in" in line for line in lines)
    assert "\r" not in err and "\x1b" not in err

    again = migrate(source, pg_database, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert "events: 0 rows to copy (resuming after source id 3003)" in err.splitlines()
    assert rows(pg_database, "SELECT count(*) FROM events") == [(3003,)]
    assert rows(pg_database, "SELECT count(*) FROM outbox") == [(60,)]


def test_a_migration_killed_midway_resumes_where_it_stopped_with_progress_on_a_terminal(tmp_path, pg_database):
    source = sqlite_store(tmp_path / "old.sqlite3", events=40000, mails=0).url
    total = 40003
    controller, terminal = pty.openpty()
    proc = migrate(source, pg_database, "--batch", "100", stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    screen = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            screen += os.read(controller, 4096)
            if screen.count(b"rows/s") >= 3:
                break
        copied = rows(pg_database, "SELECT count(*) FROM events")[0][0]
        assert 0 < copied < total, copied
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    text = screen.decode()
    assert f"events: {total:,} rows to copy\r\n" in text
    redraws = [part for part in text.split("\r\x1b[K") if "rows/s" in part]
    assert len(redraws) >= 3 and all(" left" in part for part in redraws[:3]), redraws[:3]
    assert redraws[0].startswith("events: ") and "/40,003 rows (" in redraws[0]

    copied = rows(pg_database, "SELECT count(*) FROM events")[0][0]
    done = migrate(source, pg_database, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    first = err.splitlines()[0]
    assert first == f"events: {total - copied:,} rows to copy (resuming after source id {copied})", first
    assert rows(pg_database, EVENTS) == rows(source, EVENTS)
    assert [json.loads(d).get("n") for (d,) in rows(pg_database, "SELECT data FROM events ORDER BY id")] == \
        [*range(total - 3), None, None, None]


def test_every_table_of_the_schema_is_copied_or_named_as_left_behind(tmp_path):
    from calmline.store.copy import NOT_COPIED, TABLES

    source = sqlite_store(tmp_path / "s.sqlite3", events=0, mails=0).url
    tables = {name for (name,) in rows(source, "SELECT name FROM sqlite_master WHERE type = 'table' "
                                               "AND name NOT LIKE 'sqlite_%'")}
    assert tables == {t.name for t in TABLES} | set(NOT_COPIED)


def test_migrate_names_the_problem_in_one_line(tmp_path, pg_database):
    missing = migrate(f"sqlite:///{tmp_path / 'nope.sqlite3'}", pg_database, stderr=subprocess.PIPE)
    _, err = missing.communicate(timeout=60)
    assert missing.returncode == 2
    assert err.startswith("calmline: --from: no store at ") and err.count("\n") == 1
    source = sqlite_store(tmp_path / "old.sqlite3", events=1, mails=0).url
    bad = migrate(source, "mysql://x/y", stderr=subprocess.PIPE)
    _, err = bad.communicate(timeout=60)
    assert bad.returncode == 2 and err.startswith("calmline: --to: ") and "names no store calmline knows" in err
