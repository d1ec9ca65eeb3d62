"""CallerHistory: escalated calls per caller number, counted in SQL on a real store."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from stores import sqlite_db
from trails import Trail, transferred, warned

from calmline.audit.history import CallerHistory, Withheld, is_withheld
from calmline.store import Database

T0 = datetime(2026, 5, 1, 9, 0, tzinfo=timezone.utc)


def fill(db: Database) -> None:
    t = Trail(db)
    # +111: three calls, one of them with two key presses, plus one a week before.
    t.session(T0 - timedelta(days=7), "warn", linkedid="old.1", number="+111", steps=[warned(1)])
    t.session(T0, "warn", linkedid="a.1", number="+111", name="Ann", steps=[warned(1)])
    t.session(T0 + timedelta(minutes=1), "end", linkedid="a.1", number="+111", name="Ann")
    t.session(T0 + timedelta(hours=1), "warn", linkedid="a.2", number="+111", steps=[warned(1)])
    t.session(T0 + timedelta(hours=2), "transfer/supervisor", linkedid="a.3", number="+111",
              steps=transferred("supervisor"))
    # The transferred caller's hangup handler: a session, but not an escalation.
    t.session(T0 + timedelta(hours=2, minutes=3), "transfer/result", linkedid="a.4", number="+111")
    # +222: two calls.
    t.session(T0 + timedelta(hours=3), "warn", linkedid="b.1", number="+222", steps=[warned(1)])
    t.session(T0 + timedelta(hours=4), "warn", linkedid="b.2", number="+222", steps=[warned(1)])
    # +333: one call.
    t.session(T0 + timedelta(hours=5), "end", linkedid="c.1", number="+333")
    # Withheld, five different ways and five different people: never one caller.
    for i, number in enumerate(["", "anonymous", "Restricted", None, "<unknown>"]):
        t.session(T0 + timedelta(hours=6 + i), "warn", linkedid=f"w.{i}", number=number, steps=[warned(1)])
    # A refused session (no action ran) is not an escalation either.
    t.session(T0 + timedelta(hours=12), "transfer/nowhere", linkedid="x.1", number="+333", started=False,
              outcome="refused", error="no action at path")
    t.close()


def test_counts_calls_not_key_presses_within_the_range(db):
    fill(db)
    history = CallerHistory(db)
    since, until = T0 - timedelta(hours=1), T0 + timedelta(days=1)
    assert history.calls("+111", since, until) == 3
    assert history.calls("+111") == 4  # no range: the week-old call too
    assert history.calls("+111", T0 + timedelta(minutes=30), until) == 2
    assert history.calls("+333", since, until) == 1
    assert history.calls("+999", since, until) == 0


def test_withheld_numbers_are_never_one_caller(db):
    fill(db)
    history = CallerHistory(db)
    for number in ["", "anonymous", "ANONYMOUS", None, " restricted "]:
        assert is_withheld(number)
        assert history.calls(number) == 0
    assert not is_withheld("+111")
    repeat, withheld = history.callers(minimum=1)
    assert all(not is_withheld(r.number) for r in repeat)
    assert (withheld.calls, withheld.escalations) == (5, 5)
    assert history.callers(T0 + timedelta(days=300))[1] == Withheld(0, 0)  # none in the range


def test_repeat_callers_most_first_with_a_minimum(db):
    fill(db)
    history = CallerHistory(db)
    since, until = T0 - timedelta(hours=1), T0 + timedelta(days=1)
    repeat, _withheld = history.callers(since, until, minimum=2)
    assert [(r.number, r.calls, r.escalations) for r in repeat] == [("+111", 3, 4), ("+222", 2, 2)]
    assert repeat[0].name == "Ann"
    assert repeat[1].last_at.startswith("2026-05-01T13:00:00")
    assert [r.number for r in history.callers(since, until, minimum=3)[0]] == ["+111"]
    assert [r.number for r in history.callers(since, until, minimum=1)[0]] == ["+111", "+222", "+333"]
    assert [r.number for r in history.callers(since, until, minimum=1, limit=1)[0]] == ["+111"]


class Recording:
    """A store whose connections note every statement they run."""

    def __init__(self, db: Database):
        self.db, self.statements = db, []

    def connect(self):
        conn = self.db.connect()
        execute = conn.execute

        def noting(sql, params=()):
            self.statements.append((sql, tuple(params)))
            return execute(sql, params)

        conn.execute = noting
        return conn


def test_the_counts_read_through_indexes(tmp_path):
    """On SQLite, the plan of every statement CallerHistory runs searches an index."""
    db = sqlite_db(tmp_path / "store.sqlite3")
    fill(db)
    recording = Recording(db)
    history = CallerHistory(recording)
    history.calls("+111", T0, T0 + timedelta(days=1))
    history.callers(T0, T0 + timedelta(days=1), minimum=1)
    assert len(recording.statements) >= 3
    conn = db.connect()
    try:
        for sql, params in recording.statements:
            plan = " ".join(str(r[-1]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
            assert "USING" in plan and "INDEX" in plan, (sql, plan)
            # A table read whole is a defect; the scan of a grouped result (a CTE) is not.
            assert not re.search(r"SCAN (escalations|events)\b(?! USING)", plan), (sql, plan)
    finally:
        conn.close()
