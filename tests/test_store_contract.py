"""The store's contract, one suite run against both backends: SQLite and a real PostgreSQL 15."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest

from calmline.audit.store import AuditStore, read_events, stamp
from calmline.callback.outbox import CallbackRequest, Outbox
from calmline.config import MailConfig
from calmline.errors import StoreError
from calmline.store import Database
from calmline.store.schema import MIGRATIONS, VERSION


def opened(url: str) -> Database:
    db = Database(url)
    db.open_checked()
    return db


def request(key: str, email: str | None = None) -> CallbackRequest:
    return CallbackRequest(
        key=key, created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        caller_number="+15550100", caller_name="Caller", caller_email=email, agent="PJSIP/2001",
        warnings=2, reason="abusive caller", uniqueid=key, linkedid=key, channel="PJSIP/x-1")


def test_the_store_is_created_at_the_code_version_and_migrating_again_changes_nothing(store_url):
    db = opened(store_url)
    assert db.schema_version() == VERSION
    db.open_checked()
    conn = db.connect()
    try:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()]
        assert versions == [m[0] for m in MIGRATIONS]
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0
    finally:
        conn.close()


def test_a_store_newer_than_the_code_is_refused_with_the_key_and_the_fix(store_url):
    db = opened(store_url)
    conn = db.connect()
    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (VERSION + 7,))
    conn.close()
    with pytest.raises(StoreError, match=rf"^store\.url: .* schema version {VERSION + 7}, newer than "
                                         rf"this calmline knows \({VERSION}\); upgrade calmline"):
        db.open_checked()


def test_instances_starting_at_once_migrate_the_store_exactly_once(store_url):
    starters = 6
    barrier = threading.Barrier(starters)
    errors: list[BaseException] = []

    def start() -> None:
        db = Database(store_url, busy_timeout=30.0)
        barrier.wait()
        try:
            db.open_checked()
        except BaseException as exc:  # noqa: BLE001 - the test reports whatever a starter hit
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(starters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    conn = Database(store_url).connect()
    try:
        assert conn.execute("SELECT count(*), max(version) FROM schema_version").fetchone() == (len(MIGRATIONS), VERSION)
    finally:
        conn.close()


def test_audit_events_are_durable_readable_elsewhere_and_stored_once_per_event_id(store_url):
    db = opened(store_url)
    store = AuditStore(db, commit_timeout=5.0, notice=lambda _text: None)
    store.open()
    try:
        first = stamp("info", {"event": "step", "linkedid": "L1", "uniqueid": "U1", "step": "warn"})
        again = dict(first)  # a retry of the same event (same event_id) must not store it twice
        other = stamp("info", {"event": "step", "linkedid": "L1", "uniqueid": "U1", "step": "end",
                               "caller_name": "Zo\u00eb \udcff"})
        for event in (first, again, other):
            assert store.submit(event) > 0
        assert store.flush(10)
    finally:
        assert store.close()
    events = read_events(Database(store_url), linkedid="L1")
    assert [e["event_id"] for e in events] == [first["event_id"], other["event_id"]]
    assert [e["step"] for e in events] == ["warn", "end"]
    conn = Database(store_url).connect()
    try:
        assert conn.execute("SELECT caller_name FROM events WHERE event_id = ?",
                            (other["event_id"],)).fetchone() == ("Zo\u00eb \ufffd",)
    finally:
        conn.close()


def test_the_outbox_queues_once_per_key_claims_once_and_marks(store_url):
    db = opened(store_url)
    cfg = MailConfig(retry_initial_seconds=30.0, max_attempts=2)
    with Outbox(db) as one, Outbox(Database(store_url)) as two:
        assert one.add(request("k1", "caller@example.com"), now=100.0)
        assert not two.add(request("k1"), now=101.0)  # another instance, same call: nothing more
        assert one.add(request("k2"), now=102.0)
        assert one.counts() == {"pending": 3, "sent": 0, "failed": 0}

        claimed = one.due(200.0, claim_for=60.0)
        assert sorted((i.key, i.kind) for i in claimed) == [("k1", "caller"), ("k1", "team"), ("k2", "team")]
        assert two.due(200.0, claim_for=60.0) == []  # claimed: another worker passes them over
        assert two.due(259.0, claim_for=60.0) == []
        reclaimed = two.due(261.0, claim_for=60.0)  # the claim ran out (that worker died)
        assert len(reclaimed) == 3

        team1 = next(i for i in reclaimed if (i.key, i.kind) == ("k1", "team"))
        one.mark_sent(team1, "250 ok", 262.0)
        k2 = next(i for i in reclaimed if i.key == "k2")
        after = two.mark_retry(k2, "connection refused", 262.0, cfg)
        assert (after.status, after.attempts, after.next_attempt) == ("pending", 1, 292.0)
        assert two.mark_retry(k2, "connection refused", 300.0, cfg).status == "failed"
        # a worker whose send was accepted elsewhere meanwhile does not undo "sent"
        assert one.mark_retry(team1, "late failure", 263.0, cfg).status == "sent"
        assert one.counts() == {"pending": 1, "sent": 1, "failed": 1}
        assert two.retry_now() == 2
        assert one.next_due() == 0


def test_workers_claiming_at_once_never_get_the_same_mail(store_url):
    db = opened(store_url)
    with Outbox(db) as filler:
        for n in range(120):
            filler.add(request(f"call-{n}"), now=1.0)
    workers = 4
    got: list[list[int]] = [[] for _ in range(workers)]
    barrier = threading.Barrier(workers)

    def work(slot: int) -> None:
        with Outbox(Database(store_url, busy_timeout=30.0)) as outbox:
            barrier.wait()
            while True:
                items = outbox.due(10.0, limit=7, claim_for=600.0)
                if not items:
                    return
                got[slot] += [i.id for i in items]
                time.sleep(0.001)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [i for ids in got for i in ids]
    assert len(every) == 120 and len(set(every)) == 120


def test_webhook_workers_claiming_at_once_never_get_the_same_row(store_url):
    from calmline.callback.webhooks import WebhookOutbox

    db = opened(store_url)
    filler = WebhookOutbox(db)
    for n in range(60):
        assert filler.add(f"alert-{n}", ["https://a.example/x", "https://b.example/y"], {"n": n}, now=1.0) == 2
    assert filler.add("alert-0", ["https://a.example/x"], {"n": 0}, now=1.0) == 0  # a replay adds nothing
    filler.close()
    workers = 4
    got: list[list[int]] = [[] for _ in range(workers)]
    barrier = threading.Barrier(workers)

    def work(slot: int) -> None:
        outbox = WebhookOutbox(Database(store_url, busy_timeout=30.0))
        try:
            barrier.wait()
            while items := outbox.due(10.0, limit=7, claim_for=600.0):
                got[slot] += [i.id for i in items]
                time.sleep(0.001)
        finally:
            outbox.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [i for ids in got for i in ids]
    assert len(every) == 120 and len(set(every)) == 120


def test_postgresql_options_in_the_url_query_reach_the_server(pg_database):
    db = opened(pg_database + "?application_name=calmline-a&connect_timeout=3")
    conn = db.connect()
    try:
        assert conn.execute("SELECT current_setting('application_name')").fetchone() == ("calmline-a",)
    finally:
        conn.close()
    # the test server has no TLS: sslmode=require must be refused, in one line naming the key
    with pytest.raises(StoreError, match=r"^store\.url: cannot open postgresql://postgres@127\.0\.0\.1:\d+/"
                                         r"calmline_t_\w+: .*SSL.*; check that the server is up"):
        opened(pg_database + "?sslmode=require")


class Blocker:
    """Another client holding the events table: SQLite's write lock, or PostgreSQL's table lock
    (the writer's commits then fail on one engine and hang on the other; both are outages)."""

    def __init__(self, url: str):
        self.conn = Database(url).connect()
        if self.conn.kind == "sqlite":
            self.conn.execute("BEGIN IMMEDIATE")
        else:
            self.conn.execute("BEGIN")
            self.conn.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


def test_a_store_that_holds_commits_costs_one_wait_and_keeps_a_bounded_backlog(store_url):
    import asyncio

    db = opened(store_url)
    notices: list[str] = []
    store = AuditStore(db, commit_timeout=0.5, max_pending=30, notice=notices.append)
    store.open()

    async def scenario() -> tuple[list[bool], list[float]]:
        blocker = Blocker(store_url)
        results, waits = [], []
        try:
            for n in range(40):
                seq = store.submit(stamp("info", {"event": "step", "step": "warning_played", "n": n}))
                started = time.monotonic()
                results.append(await store.wait_durable(seq))
                waits.append(time.monotonic() - started)
        finally:
            await asyncio.to_thread(blocker.release)
        return results, waits

    try:
        results, waits = asyncio.run(scenario())
        assert not any(results)
        assert 0.4 <= waits[0] < 2.0 and max(waits[1:]) < 0.1  # one wait per outage
        assert store.flush(20)
    finally:
        store.close()
    stored = [e.get("n") for e in read_events(Database(store_url), limit=1000) if e["event"] == "step"]
    assert stored == list(range(30))  # the first 30 waited in memory; the rest were refused
    outage = [e for e in read_events(Database(store_url), limit=1000) if e["event"] == "audit_store_outage"]
    assert outage and outage[0]["dropped"] == 10
    assert any("wait for the store" in n and "dropped" in n for n in notices)
    assert any("a step waited 0.5s (audit.commit_timeout)" in n for n in notices)


def test_a_new_sqlite_store_another_process_is_writing_is_waited_for_not_refused(tmp_path):
    """Switching a new file to WAL while another connection writes it makes SQLite answer
    BUSY at once, without its busy handler: six services starting together on one new file
    failed that way 2-3% of the time. The switch waits for the lock like any other."""
    import sqlite3
    import time as clock

    path = tmp_path / "store.sqlite3"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TABLE created_first (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO created_first VALUES (1)")
    outcome: list[object] = []

    def connect() -> None:
        try:
            Database(f"sqlite:///{path}", busy_timeout=10.0).connect().close()
            outcome.append("connected")
        except Exception as exc:  # noqa: BLE001 - the assertion shows it
            outcome.append(exc)

    waiting = threading.Thread(target=connect)
    waiting.start()
    clock.sleep(0.3)
    other.execute("COMMIT")
    other.close()
    waiting.join(15)
    assert outcome == ["connected"]
