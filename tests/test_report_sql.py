"""The report's figures are SQL aggregates over the requested period, on both stores.

They must match a tally kept while bench/big_store.py generated the trail (not derived from
the store), and a report for a short period must neither read nor depend on rows outside it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

from trails import Trail, transferred, warned

from calmline.audit import report as report_module
from calmline.audit.report import KINDS, TRANSFER_RESULTS, build_report
from calmline.store import Connection, Database

ROOT = Path(__file__).resolve().parents[1]
BIG_STORE = ROOT / "bench" / "big_store.py"
END = datetime(2025, 3, 21, 18, 0, tzinfo=timezone.utc)


def generate(url: str, tmp_path: Path, events: int = 4000) -> dict:
    """A 20-day trail of 12 agents written by big_store.py; its own tally of what must be counted."""
    truth = tmp_path / "truth.json"
    done = subprocess.run([sys.executable, str(BIG_STORE), "--url", url, "--events", str(events), "--days", "20",
                           "--agents", "12", "--end", END.isoformat(), "--truth", str(truth)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(truth.read_text())


def figures(report) -> dict:
    """The report's counts in the tally's terms (zero counts left out, as the tally has none)."""
    per_day = {f"{d.day.isoformat()} {k}": getattr(d, k) for d in report.days for k in KINDS if getattr(d, k)}
    per_agent = Counter()
    for a in report.agents:
        for kind, count in (("warning", a.warnings - a.final_warnings), ("final_warning", a.final_warnings),
                            ("supervisor", a.supervisor), ("colleague", a.colleague), ("end", a.ends)):
            if count:
                per_agent[f"{a.agent} {kind}"] += count
    answered = {}
    for d in report.days:
        for result, count in (("answered", d.transfers_answered), ("fallback", d.transfers_fallback)):
            if count:
                answered[f"{d.day.isoformat()} {result}"] = count
    return {"per_day": per_day, "per_agent": dict(per_agent), "agent_calls": {a.agent: a.calls for a in report.agents},
            "outcomes": report.outcomes, "answered_per_day": answered,
            "transfer_results": {k: v for k, v in report.transfer_results.items() if v}, "calls": report.call_count}


def test_the_counts_match_a_tally_kept_while_the_trail_was_written(store_url, tmp_path):
    truth = generate(store_url, tmp_path)
    db = Database(store_url)
    report = build_report(db, since=None, until=None, now=END)
    got = figures(report)
    for key in ("per_day", "per_agent", "agent_calls", "outcomes", "answered_per_day", "transfer_results", "calls"):
        assert got[key] == truth[key], key
    # The trail has every kind, outcome and transfer result in it, so the match means something.
    assert {k.split()[1] for k in truth["per_day"]} == set(KINDS)
    assert set(truth["transfer_results"]) == set(TRANSFER_RESULTS)
    assert {"completed", "caller_hung_up", "prompt_missing", "invalid_extension"} <= set(truth["outcomes"])
    assert report.escalations == sum(truth["per_day"].values())
    assert len(report.calls) == report_module.CALLS_SHOWN < report.call_count

    # A window of whole days counts exactly the tally's escalations of those days.
    since, until = datetime(2025, 3, 9, tzinfo=timezone.utc), datetime(2025, 3, 12, tzinfo=timezone.utc)
    window = figures(build_report(db, since=since, until=until, now=END))
    days = {(since + timedelta(days=n)).date().isoformat() for n in range(3)}
    assert window["per_day"] == {k: v for k, v in truth["per_day"].items() if k.split()[0] in days}


def _full_scans(monkeypatch) -> tuple[list[str], list[str]]:
    """Records each statement the report runs and, asking the store for its plan first, every
    full scan of the events table in it."""
    statements: list[str] = []
    scans: list[str] = []
    execute = Connection.execute

    def planned(self, sql, params=()):
        if sql.lstrip().upper().startswith(("SELECT", "INSERT", "WITH")):
            statements.append(sql)
            if self.kind == "sqlite":
                plan = [row[3] for row in execute(self, "EXPLAIN QUERY PLAN " + sql, params).fetchall()]
                scans.extend(f"{line}: {sql}" for line in plan if re.match(r"SCAN (a|s|f|events)\b", line))
            else:
                execute(self, "SET enable_seqscan = off")  # a tiny table: is there an index plan at all?
                plan = [row[0] for row in execute(self, "EXPLAIN " + sql, params).fetchall()]
                scans.extend(f"{line}: {sql}" for line in plan if "Seq Scan on events" in line)
        return execute(self, sql, params)

    monkeypatch.setattr(Connection, "execute", planned)
    return statements, scans


def one_day(db: Database, day: datetime) -> None:
    """A morning on `day`: a warning ladder, a transfer that is answered, an end."""
    t = Trail(db)
    t.session(day + timedelta(hours=9), "warn", linkedid="D.1", agent="PJSIP/alice-0000002a", steps=[warned(1)])
    t.session(day + timedelta(hours=9, minutes=2), "warn", linkedid="D.1", agent="PJSIP/alice-0000002a",
              steps=[warned(2, final=True)])
    t.session(day + timedelta(hours=10), "transfer/supervisor", linkedid="D.2", agent="PJSIP/bob-0000003b",
              number="+4930222", steps=transferred("supervisor"))
    t.session(day + timedelta(hours=10, minutes=1), "transfer/result", linkedid="D.2", number="+4930222",
              steps=[("transfer_result", {"target": "supervisor", "dial_status": "ANSWER", "answered": True,
                                          "fallback": None, "transferred_by": "PJSIP/bob-0000003b"})])
    t.session(day + timedelta(hours=11), "end", linkedid="D.3", agent="PJSIP/bob-0000003b", number="+4930333")
    t.close()


def summary(report) -> tuple:
    return (figures(report), [(c.linkedid, c.ladder, c.agents, c.caller_number) for c in report.calls])


def test_a_short_period_reads_only_its_own_rows(store_url, monkeypatch):
    db = Database(store_url)
    db.open_checked()
    day = datetime(2025, 3, 12, tzinfo=timezone.utc)
    one_day(db, day)
    alone = summary(build_report(db, since=day, until=day + timedelta(days=1), now=END))
    assert alone[0]["per_day"] == {"2025-03-12 warning": 1, "2025-03-12 final_warning": 1,
                                   "2025-03-12 supervisor": 1, "2025-03-12 end": 1}
    assert alone[0]["transfer_results"] == {"answered": 1}

    # Around it: busy days before and after, on the same calls too, and a session that began
    # just before midnight and ended inside the day. None of it belongs to the day.
    t = Trail(db)
    for offset in (-3, -1, 1, 2):
        other = day + timedelta(days=offset)
        for n in range(20):
            t.session(other + timedelta(hours=8, minutes=n), "warn", linkedid=f"O{offset}.{n}",
                      agent=f"PJSIP/agent{n}-0000aaaa", steps=[warned(1)])
        t.session(other + timedelta(hours=12), "end", linkedid="D.1", agent="PJSIP/alice-0000002a")
        t.session(other + timedelta(hours=13), "transfer/result", linkedid="D.2",
                  steps=[("transfer_result", {"target": "supervisor", "dial_status": "NOANSWER", "answered": False,
                                              "fallback": "queue", "transferred_by": "x"})])
    t.session(day - timedelta(seconds=0.15), "warn", linkedid="M.1", agent="PJSIP/carol-0000004c",
              steps=[warned(1)])
    t.close()
    statements, scans = _full_scans(monkeypatch)
    assert summary(build_report(db, since=day, until=day + timedelta(days=1), now=END)) == alone
    # And it asked the store only through its indexes.
    assert statements and scans == []


def test_transfer_results_are_read_through_their_own_partial_index(tmp_path, monkeypatch):
    """The results are a few in a hundred sessions: the report must not walk every session
    start of the period to find them (migration 8's partial index, keyed on the catalog's path)."""
    from calmline.actions.catalog import TRANSFER_RESULT_ACTION
    from calmline.store.schema import MIGRATIONS

    [index] = [sql for version, _name, both in MIGRATIONS if version == 8 for sql in both["sqlite"]]
    assert f"action = '{TRANSFER_RESULT_ACTION.path}'" in index
    db = Database(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    db.open_checked()
    day = datetime(2025, 3, 12, tzinfo=timezone.utc)
    one_day(db, day)
    plans: list[tuple[str, list[str]]] = []
    execute = Connection.execute

    def planned(self, sql, params=()):
        if f"a.action = '{TRANSFER_RESULT_ACTION.path}'" in sql and "a.event = 'session_start'" in sql:
            plans.append((sql, [row[3] for row in execute(self, "EXPLAIN QUERY PLAN " + sql, params).fetchall()]))
        return execute(self, sql, params)

    monkeypatch.setattr(Connection, "execute", planned)
    assert build_report(db, since=day, until=day + timedelta(days=1), now=END).transfer_results["answered"] == 1
    [(_sql, plan)] = plans
    assert any("INDEX events_transfer_results" in line for line in plan), plan
