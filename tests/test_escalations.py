"""The escalations table: what the triggers keep equals what migration 6 derives from the
events, on both engines, and a prune takes its rows with the events."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from trails import END_STEPS, Trail, transferred, warned

from calmline.audit import retention
from calmline.store import Database

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)
COLUMNS = "session, linkedid, ts, action, kind, endpoint, agent, caller_number, caller_name, outcome"


def fill(db: Database) -> None:
    t = Trail(db)
    t.session(T0, "warn", linkedid="A", agent="PJSIP/alice-0000002a", steps=[warned(1)])
    t.session(T0 + timedelta(minutes=1), "warn", linkedid="A", agent="PJSIP/alice-0000002a",
              steps=[warned(2, final=True)], outcome="caller_hung_up", error="gone")
    t.session(T0 + timedelta(minutes=2), "warn", linkedid="A", agent="Local/x@agents-00000001;1",
              steps=[("ladder_exhausted", {"warnings": 2}), *END_STEPS])
    t.session(T0 + timedelta(days=2), "transfer/supervisor", linkedid="B", agent="PJSIP/bob-0000002b",
              steps=transferred("supervisor"))
    t.session(T0 + timedelta(days=2, minutes=1), "transfer/result", linkedid="B")  # not an escalation
    t.session(T0 + timedelta(days=2, minutes=2), "transfer/colleague-keyed", linkedid="B", agent="PJSIP/bob",
              steps=[("extension_keyed", {"extension": "2041"})])
    t.session(T0 + timedelta(days=3), "end", linkedid="C", agent="", number=None, steps=END_STEPS)
    t.session(T0 + timedelta(days=3, minutes=1), "warn", linkedid="C", agent="PJSIP/carol-0000003c",
              name='He said "final": true', steps=[warned(1)])  # the name is not the step's key
    t.close()


def rows(db: Database) -> list[tuple]:
    conn = db.connect()
    try:
        return [tuple(r) for r in conn.execute(f"SELECT {COLUMNS} FROM escalations ORDER BY ts").fetchall()]
    finally:
        conn.close()


def test_the_triggers_keep_one_row_per_escalation(db):
    fill(db)
    got = [(r[1], r[3], r[4], r[5], r[9]) for r in rows(db)]
    assert got == [
        ("A", "warn", "warning", "PJSIP/alice", "completed"),
        ("A", "warn", "final_warning", "PJSIP/alice", "caller_hung_up"),
        ("A", "warn", "end", "Local/x@agents", "completed"),
        ("B", "transfer/supervisor", "supervisor", "PJSIP/bob", "completed"),
        ("B", "transfer/colleague-keyed", "colleague", "PJSIP/bob", "completed"),
        ("C", "end", "end", "", "completed"),
        ("C", "warn", "warning", "PJSIP/carol", "completed"),
    ]


def test_migration_6_derives_the_same_rows_from_an_older_store(db):
    fill(db)
    kept = rows(db)
    conn = db.connect()
    try:
        if db.kind == "sqlite":
            for name in ("escalation_started", "escalation_step", "escalation_ended", "escalation_pruned"):
                conn.execute(f"DROP TRIGGER {name}")
        else:
            conn.execute("DROP TRIGGER escalations_sync ON events")
            conn.execute("DROP FUNCTION calmline_escalations()")
        conn.execute("DROP TABLE escalations")
        conn.execute("DELETE FROM schema_version WHERE version >= 6")
    finally:
        conn.close()
    db.open_checked()
    assert rows(db) == kept
    # And the triggers are back: a new escalation is a new row.
    t = Trail(db)
    t.session(T0 + timedelta(days=4), "warn", linkedid="D", agent="PJSIP/dan-0000004d", steps=[warned(1)])
    t.close()
    assert [r[1] for r in rows(db)][-1] == "D"


def test_a_prune_takes_the_escalations_with_the_events(db):
    fill(db)
    retention.prune(db, T0 + timedelta(days=1))
    assert [r[1] for r in rows(db)] == ["B", "B", "C", "C"]


CHANNELS = ["PJSIP/alice-0000002a", "Local/x@agents-00000001;1", "SIP/trunk-b-0000abcd;2", "PJSIP/alice",
            "", "-00000001", "x-00000001;", "Local/a-b-00000001;12", "PJSIP/ü-0000002a", "a;b-12345678"]


def test_the_endpoint_is_the_same_in_python_and_in_the_sql_of_both_engines(db):
    """The console and the report name an agent with endpoint(); the escalations table and the
    report's counts with endpoint_sql(): one agent must not become two."""
    from calmline.store.schema import endpoint, endpoint_sql

    conn = db.connect()
    try:
        for channel in CHANNELS:
            [(in_sql,)] = conn.execute(f"SELECT {endpoint_sql('c')} FROM (SELECT ? AS c) AS t", (channel,)).fetchall()
            assert in_sql == endpoint(channel), channel
    finally:
        conn.close()
    assert endpoint("Local/x@agents-00000001;1") == "Local/x@agents" and endpoint(None) == ""
