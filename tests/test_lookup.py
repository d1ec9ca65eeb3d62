"""The `lookup` request path on the fake Asterisk, over a real SQLite store of past calls."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone

from conftest import run
from fake_asterisk import FakeChannel, environment, run_session
from stores import sqlite_db

from calmline.actions.lookup import CallerLookups, flag
from calmline.audit.history import CallerHistory
from calmline.config import LookupConfig

NOW = datetime.now(timezone.utc)


def escalate(db, number: str, action: str, when: datetime, linkedid: str | None = None) -> None:
    """One escalation as the service records it: a session_start with the call's identity."""
    conn = db.connect()
    try:
        conn.execute(
            "INSERT INTO events (event_id, ts, event, level, session, action, linkedid, caller_number, data) "
            "VALUES (?, ?, 'session_start', 'info', ?, ?, ?, ?, '{}')",
            (uuid.uuid4().hex, when.isoformat(timespec="microseconds"), uuid.uuid4().hex, action,
             linkedid or uuid.uuid4().hex, number))
    finally:
        conn.close()


def inbound(number: str = "+15550001111") -> FakeChannel:
    """The caller's channel on the inbound route, before any queue: no bridge yet."""
    return FakeChannel(variables={}, functions={"CHANNEL(linkedid)": "1795350999.1", "BRIDGEPEER": ""})


def variables(channel: FakeChannel) -> dict[str, str]:
    out = {}
    for command in channel.commands:
        if command.startswith("SET VARIABLE CALMLINE_CALLER_"):
            _, _, name, value = command.split(" ", 3)
            out[name] = value.strip('"')
    return out


def lookup(serving, number: str, **lookup_config):
    async def main():
        async with serving(lookup=lookup_config) as svc:
            channel = inbound()
            started = time.monotonic()
            await run_session(svc.port, channel, environment("lookup", callerid=number))
            return svc, channel, time.monotonic() - started

    return run(main())


def test_a_new_caller_is_none_with_no_history(serving, tmp_path):
    svc, channel, _ = lookup(serving, "+15550001111")
    assert variables(channel) == {"CALMLINE_CALLER_ESCALATIONS": "0", "CALMLINE_CALLER_LAST": "",
                                  "CALMLINE_CALLER_FLAG": "none"}
    assert svc.events(event="session_end")[0]["outcome"] == "completed"
    assert svc.events(event="caller_looked_up")[0]["flag"] == "none"


def test_a_repeat_caller_is_counted_per_call_within_the_days(serving, tmp_path):
    db = sqlite_db(tmp_path / "calmline.sqlite3")
    number = "+15550002222"
    escalate(db, number, "warn", NOW - timedelta(days=200), "old")  # outside [lookup] days
    escalate(db, number, "warn", NOW - timedelta(days=3), "c1")
    escalate(db, number, "end", NOW - timedelta(days=3, minutes=-1), "c1")  # same call: one
    escalate(db, number, "transfer/supervisor", NOW - timedelta(days=1), "c2")
    escalate(db, "+19990000000", "end", NOW, "someone-else")
    escalate(db, number, "lookup", NOW, "not-an-escalation")
    svc, channel, _ = lookup(serving, number, watch_at=1, flag_at=3)
    assert variables(channel) == {"CALMLINE_CALLER_ESCALATIONS": "2",
                                  "CALMLINE_CALLER_LAST": f"supervisor {(NOW - timedelta(days=1)).date()}",
                                  "CALMLINE_CALLER_FLAG": "watch"}
    # The console's count (CallerHistory) is the same.
    assert CallerHistory(db).calls(number, NOW - timedelta(days=90)) == 2
    escalate(db, number, "end", NOW - timedelta(hours=1), "c3")
    svc, channel, _ = lookup(serving, number, watch_at=1, flag_at=3)
    assert variables(channel)["CALMLINE_CALLER_FLAG"] == "flagged"
    assert variables(channel)["CALMLINE_CALLER_ESCALATIONS"] == "3"


def test_withheld_numbers_are_never_flagged(serving, tmp_path):
    db = sqlite_db(tmp_path / "calmline.sqlite3")
    for n in range(5):
        escalate(db, "anonymous", "end", NOW - timedelta(hours=n))
    for number in ("anonymous", "", "Restricted", "unknown"):
        svc, channel, _ = lookup(serving, number)
        assert variables(channel)["CALMLINE_CALLER_FLAG"] == "none", number
        assert variables(channel)["CALMLINE_CALLER_ESCALATIONS"] == "0"


def test_a_slow_store_gives_unknown_and_the_call_goes_on(serving, tmp_path, monkeypatch):
    real = CallerLookups.record

    def slow(self, *args, **kwargs):
        time.sleep(1.0)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CallerLookups, "record", slow)
    svc, channel, took = lookup(serving, "+15550003333", timeout_ms=200)
    assert variables(channel) == {"CALMLINE_CALLER_ESCALATIONS": "", "CALMLINE_CALLER_LAST": "",
                                  "CALMLINE_CALLER_FLAG": "unknown"}
    assert took < 0.9, "the call waited for the store"
    problem = svc.events(event="caller_lookup_unknown")[0]
    assert "200 ms" in problem["reason"] and "lookup.timeout_ms" in problem["reason"]
    assert svc.events(event="session_end")[0]["outcome"] == "completed"


def test_flag_thresholds():
    cfg = LookupConfig(watch_at=2, flag_at=4)
    assert [flag(n, cfg) for n in range(6)] == ["none", "none", "watch", "watch", "flagged", "flagged"]


def test_the_lookup_counts_as_the_console_does_on_both_stores(store_url):
    from calmline.store import Database

    db = Database(store_url)
    db.open_checked()
    number = "+15550004444"
    for n, (action, days) in enumerate([("warn", 1), ("end", 2), ("transfer/colleague", 5), ("warn", 120)]):
        escalate(db, number, action, NOW - timedelta(days=days), linkedid=f"call-{n // 2 if n < 2 else n}")
    lookups = CallerLookups(db, workers=1)
    try:
        record = lookups.record(number, 90)
        nobody = lookups.record("+15550009999", 90)
    finally:
        lookups.close()
    assert record.escalations == CallerHistory(db).calls(number, NOW - timedelta(days=90)) == 2
    assert record.last_action == "warn" and record.last() == f"warn {(NOW - timedelta(days=1)).date()}"
    assert (nobody.escalations, nobody.last()) == (0, "")
