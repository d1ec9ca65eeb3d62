"""`calmline report`: numbers from a real audit store, escaping, the CLI, and a real browser."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import run
from fake_asterisk import bridged_caller, environment, run_session

from calmline.audit.report import KINDS, build_report, render_html
from calmline.store.schema import endpoint as agent_endpoint
from calmline.audit.store import AuditStore
from stores import sqlite_db
from trails import END_STEPS, Trail, result, transferred, warned

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
SINCE = datetime(2025, 3, 4, tzinfo=timezone.utc)
SCRIPT_NAME = "<script>alert(1)</script>"
QUOTED_NAME = 'Angry "Bob" O\'Neil & co'

ALICE = "PJSIP/alice-0000002a"
BOB = "Local/x@sim-agent-00000001;1"
CAROL = "PJSIP/carol-0000003b"
DAVE = "PJSIP/dave-000000ff"


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2025, 3, day, hour, minute, second, tzinfo=timezone.utc)


@pytest.fixture
def audit_db(tmp_path) -> Path:
    return week_of_escalations(tmp_path / "audit.sqlite3")


def week_of_escalations(path: Path) -> Path:
    """A week of escalations by four agents on nine calls (one before the period)."""
    t = Trail(sqlite_db(path))
    # A: just before the period starts: never counted.
    t.session(at(3, 23, 59, 58), "warn", linkedid="A.1", agent=ALICE, steps=[warned(1)])
    # B, 4 Mar: the whole ladder.
    t.session(at(4, 9, 0), "warn", linkedid="B.1", agent=ALICE, name=QUOTED_NAME, steps=[warned(1)])
    t.session(at(4, 9, 2), "warn", linkedid="B.1", agent=ALICE, name=QUOTED_NAME, steps=[warned(2, final=True)])
    t.session(at(4, 9, 3), "end", linkedid="B.1", agent=ALICE, name=QUOTED_NAME, steps=END_STEPS)
    # C, 4 Mar: to the supervisor, who answers (the result comes from the hangup handler, no agent).
    t.session(at(4, 14, 0), "transfer/supervisor", linkedid="C.1", agent=BOB, number="+4930222",
              steps=transferred("supervisor"))
    t.session(at(4, 14, 5), "transfer/result", linkedid="C.1", number="+4930222",
              steps=result("supervisor", "ANSWER", None, BOB))
    # D, 6 Mar: a warning, then a colleague nobody answers: the queue takes the caller.
    t.session(at(6, 10, 0), "warn", linkedid="D.1", agent=ALICE, number="+4930333", name=SCRIPT_NAME,
              steps=[warned(1)])
    t.session(at(6, 10, 1), "transfer/colleague", linkedid="D.1", agent=ALICE, number="+4930333",
              name=SCRIPT_NAME, steps=transferred("colleague"))
    t.session(at(6, 10, 2), "transfer/result", linkedid="D.1", number="+4930333", name=SCRIPT_NAME,
              steps=result("colleague", "NOANSWER", "queue support", ALICE))
    # E, 6 Mar: the caller hangs up during the warning.
    t.session(at(6, 16, 0), "warn", linkedid="E.1", agent=CAROL, number="+4930444",
              outcome="caller_hung_up", error="the caller hung up")
    # F, 7 Mar: a mistyped extension (nothing moves), then a good one (no result yet).
    t.session(at(7, 8, 0), "transfer/colleague-keyed", linkedid="F.1", agent=BOB, number="+4930555",
              steps=[("extension_rejected", {"keyed": "99", "reason": "no match"})],
              outcome="invalid_extension", error="'99' does not match")
    t.session(at(7, 8, 1), "transfer/colleague-keyed", linkedid="F.1", agent=BOB, number="+4930555",
              steps=[("extension_keyed", {"extension": "2041"}),
                     ("caller_transferred", {"target": "colleague_keyed", "extension": "2041"})])
    # G, 9 Mar: the warning prompt is missing; the agent ends the call.
    t.session(at(9, 10, 0), "warn", linkedid="G.1", agent=CAROL, number="+4930666",
              outcome="prompt_missing", error="calmline/warn-1 missing")
    t.session(at(9, 10, 1), "end", linkedid="G.1", agent=CAROL, number="+4930666", steps=END_STEPS)
    # H, 9 Mar: warn past the last stage with after_last = "end".
    t.session(at(9, 15, 0), "warn", linkedid="H.1", agent=ALICE, number="+4930777",
              steps=[("ladder_exhausted", {"warnings": 2}), *END_STEPS])
    # Not an escalation: a path nobody configured (refused before the call is known).
    t.session(at(9, 15, 30), "transfer/nowhere", linkedid="X.1", started=False, outcome="refused",
              error="no action at path")
    # I, 10 Mar: today.
    t.session(at(10, 11, 0), "warn", linkedid="I.1", agent=DAVE, number="+4930888", steps=[warned(1)])
    t.close()
    return path


def test_agent_channels_are_normalised_to_the_endpoint():
    assert agent_endpoint("PJSIP/alice-0000002a") == "PJSIP/alice"
    assert agent_endpoint("Local/x@sim-agent-00000001;1") == "Local/x@sim-agent"
    assert agent_endpoint("SIP/trunk-b-0000abcd;2") == "SIP/trunk-b"
    assert agent_endpoint("PJSIP/alice") == "PJSIP/alice"
    assert agent_endpoint("") == ""


def test_counts_per_day(audit_db):
    report = build_report(sqlite_db(audit_db), since=SINCE, until=None, now=NOW)
    assert report.first_day.isoformat() == "2025-03-04" and report.last_day.isoformat() == "2025-03-10"
    per_day = {d.day.isoformat(): (d.warning, d.final_warning, d.supervisor, d.colleague, d.end) for d in report.days}
    assert per_day == {
        "2025-03-04": (1, 1, 1, 0, 1),
        "2025-03-05": (0, 0, 0, 0, 0),
        "2025-03-06": (2, 0, 0, 1, 0),
        "2025-03-07": (0, 0, 0, 2, 0),
        "2025-03-08": (0, 0, 0, 0, 0),
        "2025-03-09": (1, 0, 0, 0, 2),
        "2025-03-10": (1, 0, 0, 0, 0),
    }
    answered = {d.day.isoformat(): (d.transfers_answered, d.transfers_fallback) for d in report.days if d.transfers}
    assert answered == {"2025-03-04": (1, 0), "2025-03-06": (0, 1), "2025-03-07": (0, 0)}
    assert report.escalations == 13


def test_counts_per_agent(audit_db):
    report = build_report(sqlite_db(audit_db), since=SINCE, until=None, now=NOW)
    rows = [(a.agent, a.calls, a.warnings, a.final_warnings, a.transfers, a.ends) for a in report.agents]
    assert rows == [
        ("PJSIP/alice", 3, 3, 1, 1, 2),
        ("Local/x@sim-agent", 2, 0, 0, 3, 0),
        ("PJSIP/carol", 2, 2, 0, 0, 1),
        ("PJSIP/dave", 1, 1, 0, 0, 0),
    ]


def test_outcomes_and_transfer_results(audit_db):
    report = build_report(sqlite_db(audit_db), since=SINCE, until=None, now=NOW)
    assert report.outcomes == {"completed": 10, "caller_hung_up": 1, "invalid_extension": 1, "prompt_missing": 1}
    assert report.outcome_groups() == {"completed": 10, "caller_hung_up": 1, "prompt_missing": 1, "failures": 1}
    assert report.transfer_results == {"answered": 1, "fallback": 1, "no_result": 1, "not_transferred": 1}


def test_one_row_per_call_with_its_ladder_most_recent_first(audit_db):
    report = build_report(sqlite_db(audit_db), since=SINCE, until=None, now=NOW)
    rows = [(c.linkedid, c.ladder, c.outcome) for c in report.calls]
    assert rows == [
        ("I.1", "warn 1", "completed"),
        ("H.1", "end (after the last warning)", "completed"),
        ("G.1", "warn [prompt_missing] → end", "completed"),
        ("F.1", "colleague (extension rejected) [invalid_extension] → colleague 2041", "completed"),
        ("E.1", "warn [caller_hung_up]", "caller_hung_up"),
        ("D.1", "warn 1 → colleague: noanswer → queue support", "completed"),
        ("C.1", "supervisor: answered", "completed"),
        ("B.1", "warn 1 → warn 2 (final) → end", "completed"),
    ]
    b = report.calls[-1]
    assert (b.caller_number, b.caller_name, b.agents) == ("+4930111", QUOTED_NAME, ["PJSIP/alice"])
    assert b.started == at(4, 9, 0)
    assert report.calls[-2].agents == ["Local/x@sim-agent"]  # not the result session's empty agent


def test_the_period_bounds_are_exact(audit_db):
    everything = build_report(sqlite_db(audit_db), since=None, until=None, now=NOW)
    assert everything.first_day.isoformat() == "2025-03-03" and len(everything.days) == 8
    assert [c.linkedid for c in everything.calls][-1] == "A.1"
    window = build_report(sqlite_db(audit_db), since=at(6, 0), until=at(7, 0), now=NOW)
    assert [c.linkedid for c in window.calls] == ["E.1", "D.1"]
    assert [d.day.isoformat() for d in window.days] == ["2025-03-06"]
    # A result whose transfer is before the period: not an escalation, counted nowhere.
    late = build_report(sqlite_db(audit_db), since=at(4, 14, 1), until=at(4, 15), now=NOW)
    assert late.calls == [] and late.empty


def test_the_page_escapes_everything_from_the_audit(audit_db, tmp_path):
    trail = Trail(sqlite_db(audit_db))
    nasty = 'Eve"><img src=x onerror=alert(2)>\x00\x1b[31m\u202egnp.exe'
    trail.session(at(10, 11, 30), "warn", linkedid='L"<b>', agent="PJSIP/<i>mallory</i>-00000001",
                  number="<svg onload=alert(3)>", name=nasty, steps=[warned(1)])
    trail.close()
    # Written by some other tool with ASCII-escaped JSON: a lone surrogate reads back as one.
    conn = sqlite3.connect(audit_db)
    with conn:
        for event in ("session_start", "session_end"):
            data = {"event": event, "ts": at(10, 11, 40).isoformat(), "session": "other-1", "action": "warn",
                    "linkedid": "S.1", "agent": ALICE, "caller_name": "bad\udc80byte", "outcome": "completed"}
            conn.execute("INSERT INTO events (event_id, event, data, ts, linkedid, session, action, outcome) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (f"other-{event}", event, json.dumps(data), data["ts"], data["linkedid"], data["session"],
                          data["action"], data["outcome"] if event == "session_end" else None))
    conn.close()
    page = render_html(build_report(sqlite_db(audit_db), since=SINCE, until=None, now=NOW))
    page.encode("utf-8")  # lone surrogates would make writing the file fail
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for raw in ("<img", "<svg onload", "<i>mallory", 'L"<b>', "\x00", "\x1b", "\u202e", "\udc80"):
        assert raw not in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;\\u0000\\u001b[31m\\u202egnp.exe" in page
    assert "bad\\udc80byte" in page
    assert "Angry &quot;Bob&quot; O&#x27;Neil &amp; co" in page
    assert "&lt;svg onload=alert(3)&gt;" in page and "PJSIP/&lt;i&gt;mallory&lt;/i&gt;" in page
    # The only tags in the page are ours.
    tags = set(re.findall(r"<([a-zA-Z][a-zA-Z0-9]*)", page))
    assert tags <= {"html", "head", "meta", "title", "style", "body", "main", "header", "h1", "h2", "h3", "p",
                    "section", "div", "span", "b", "svg", "line", "text", "rect", "ul", "li", "code", "table",
                    "thead", "tbody", "tr", "th", "td", "bdi", "br", "details", "summary", "footer"}
    assert "<script" not in page.lower() and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    # And if an escape were ever missed, the page's own policy forbids scripts and fetches.
    assert "content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\"" in page


class _Structure(HTMLParser):
    """Counts what the page is made of, as a parser sees it."""

    def __init__(self):
        super().__init__()
        self.svgs: list[str] = []
        self.bars: dict[str, int] = {}
        self.rows = 0
        self._svg = ""
        self._in_calls = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "svg":
            self._svg = classes[-1]
            self.svgs.append(self._svg)
        elif tag == "rect" and "bar" in classes:
            self.bars[self._svg] = self.bars.get(self._svg, 0) + 1
        elif tag == "table" and "calls" in classes:
            self._in_calls = True
        elif tag == "tr" and self._in_calls:
            self.rows += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_calls = False


def test_the_page_has_the_charts_and_the_table(audit_db):
    page = render_html(build_report(sqlite_db(audit_db), since=SINCE, until=None, now=NOW))
    structure = _Structure()
    structure.feed(page)
    assert structure.svgs == ["daily", "agents", "outcomes", "transfer-results"]
    # daily: 4 kinds on 4 Mar, 2 on 6 Mar, 1 on 7 Mar, 2 on 9 Mar, 1 on 10 Mar;
    # agents: alice 4 kinds, bob 2, carol 2, dave 1
    # outcomes: completed, caller hung up, prompt missing, other failures; transfers: all four results
    assert structure.bars == {"daily": 10, "agents": 9, "outcomes": 4, "transfer-results": 4}
    assert structure.rows == 1 + 8  # the header and one row per call
    assert "Tue 4 Mar 2025 – Mon 10 Mar 2025 (UTC, 7 days)" in page
    assert "Generated 2025-03-10 12:00 UTC" in page
    assert "No escalations" not in page


def test_an_empty_trail_is_a_calm_page_not_a_crash(tmp_path, audit_db):
    empty = tmp_path / "empty.sqlite3"
    store = AuditStore(sqlite_db(empty))
    store.open()
    store.close()
    for path in (empty, audit_db):  # nothing at all; nothing in the period
        report = build_report(sqlite_db(path), since=datetime(2024, 1, 1, tzinfo=timezone.utc),
                              until=datetime(2024, 1, 8, tzinfo=timezone.utc), now=NOW)
        assert report.empty and report.escalations == 0 and len(report.days) == 7
        page = render_html(report)
        assert "No escalations in this period" in page and "<svg" not in page
    never = build_report(sqlite_db(empty), since=None, until=None, now=NOW)
    assert never.days == [] and "No escalations in this period" in render_html(never)


def test_a_trail_without_a_table_yet_is_empty(tmp_path):
    blank = tmp_path / "blank.sqlite3"
    sqlite3.connect(blank).close()
    assert build_report(sqlite_db(blank), since=None, until=None, now=NOW).empty


def test_events_from_the_real_service_make_the_ladder(serving):
    """Not hand-written events: what the service records for three presses on one call."""

    async def main():
        async with serving() as svc:
            channel = bridged_caller()
            await run_session(svc.port, channel)
            await run_session(svc.port, channel)
            await run_session(svc.port, channel, environment("transfer/supervisor"))
            svc.svc.store.flush()
            return svc

    svc = run(main())
    report = build_report(svc.svc.store.db, since=None, until=None)
    [call] = report.calls
    assert call.linkedid == "1795350788.44"
    assert call.ladder == "warn 1 → warn 2 (final) → supervisor"
    assert call.agents == ["Local/warnscn@sim-agent"]
    assert call.caller_name == 'Angry "Bob" Smith'
    assert report.transfer_results["no_result"] == 1
    assert [(a.agent, a.warnings, a.final_warnings, a.transfers) for a in report.agents] == [
        ("Local/warnscn@sim-agent", 2, 1, 1)]


def _cli(tmp_path: Path, db: Path, command: str, *args: str) -> subprocess.CompletedProcess:
    """`calmline COMMAND ARGS` with a config whose store is `db`."""
    config = tmp_path / "calmline.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{db}"\n', encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "calmline", "-c", str(config), command, *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_cli_writes_the_report(tmp_path):
    db = tmp_path / "live.sqlite3"
    trail = Trail(sqlite_db(db))
    now = datetime.now(timezone.utc)
    trail.session(now - timedelta(hours=1), "warn", linkedid="N.1", agent=ALICE, name=SCRIPT_NAME,
                  steps=[warned(1)])
    trail.session(now - timedelta(days=40), "warn", linkedid="OLD.1", agent=ALICE, steps=[warned(1)])
    trail.close()
    out = tmp_path / "out" / "report.html"
    done = _cli(tmp_path, db, "report", "--days", "7", "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert "1 call(s)" in done.stdout and str(out) in done.stdout
    page = out.read_text(encoding="utf-8")
    assert "N.1" in page and "OLD.1" not in page and "&lt;script&gt;" in page
    assert "(UTC, 7 days)" in page
    default = _cli(tmp_path, db, "report")
    assert default.returncode == 0, default.stderr
    page = (tmp_path / "calmline-report.html").read_text(encoding="utf-8")
    assert "(UTC, 30 days)" in page and "OLD.1" not in page


def test_cli_without_an_audit_trail_exits_1_naming_the_key(tmp_path):
    done = _cli(tmp_path, tmp_path / "nowhere.sqlite3", "report")
    assert done.returncode == 1
    assert "store.url" in done.stderr and "nowhere.sqlite3" in done.stderr
    assert not (tmp_path / "calmline-report.html").exists()
    bad = _cli(tmp_path, tmp_path / "nowhere.sqlite3", "report", "--days", "0")
    assert bad.returncode == 2 and "--days" in bad.stderr


# ---------------------------------------------------------------------------------------------
# A real browser


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture
def browser():
    if CHROMIUM is None:
        message = "no chromium: `apt-get install -y chromium` to render the report in a real browser"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return chromium


def test_a_real_browser_renders_the_charts_and_the_table(audit_db, tmp_path, browser):
    page = tmp_path / "report.html"
    page.write_text(render_html(build_report(sqlite_db(audit_db), since=SINCE, until=None, now=NOW)), encoding="utf-8")
    dom = browser("--dump-dom", page.as_uri(), profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    structure = _Structure()
    structure.feed(dom.stdout)
    assert structure.svgs == ["daily", "agents", "outcomes", "transfer-results"]
    assert structure.bars == {"daily": 10, "agents": 9, "outcomes": 4, "transfer-results": 4}
    assert structure.rows == 9
    # The browser parsed the hostile name as text, not as an element.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom.stdout
    assert dom.stdout.lower().count("<script") == 0

    png = tmp_path / "report.png"
    shot = browser(f"--screenshot={png}", "--window-size=1200,1600", "--hide-scrollbars", page.as_uri(),
                   profile=tmp_path / "profile-shot")
    assert shot.returncode == 0, shot.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 1600)
    # Not a blank page: the charts' colours are in the picture.
    assert len(data) > 30_000


def month_with_a_spike(path: Path, now: datetime) -> int:
    """30 days of calls: quiet, then busier after a policy change 9 days ago. Returns the calls."""
    rng = random.Random(7)
    agents = [f"PJSIP/{name}-{rng.randrange(16**8):08x}" for name in ("alice", "bob", "carol", "dave", "erin")]
    agents.append("Local/x@sim-agent-00000001;1")
    names = ["Jordan Miller", "Sam Novak", "", "A. Okafor", "Priya Raman", "", "Lee Chen", "M. García"]
    trail, calls = Trail(sqlite_db(path)), 0
    first = (now - timedelta(days=29)).replace(hour=0, minute=0, second=0, microsecond=0)
    for day in range(30):
        for _ in range(rng.randint(0, 2) if day < 21 else rng.randint(3, 7)):
            calls += 1
            start = first + timedelta(days=day, hours=rng.randint(8, 17), minutes=rng.randint(0, 59))
            if start > now - timedelta(minutes=20):
                start = now - timedelta(minutes=rng.randint(20, 200))
            agent, linkedid = rng.choice(agents), f"{int(start.timestamp())}.{calls}"
            who = {"linkedid": linkedid, "agent": agent, "number": f"+49305550{rng.randint(100, 999)}",
                   "name": rng.choice(names)}
            t = start
            trail.session(t, "warn", steps=[warned(1)], **who)
            if rng.random() < 0.6:
                t += timedelta(minutes=1)
                trail.session(t, "warn", steps=[warned(2, final=True)], **who)
            roll = rng.random()
            t += timedelta(minutes=1)
            if roll < 0.35:
                trail.session(t, "end", steps=END_STEPS, **who)
            elif roll < 0.6:
                target = rng.choice(["supervisor", "colleague"])
                trail.session(t, f"transfer/{target}", steps=transferred(target), **who)
                answered = rng.random() < 0.7
                trail.session(t + timedelta(seconds=40), "transfer/result", **{**who, "agent": ""},
                              steps=result(target, "ANSWER" if answered else "NOANSWER",
                                           None if answered else "queue support", agent))
            elif roll < 0.66:
                trail.session(t, "warn", outcome="caller_hung_up", error="the caller hung up", **who)
    trail.close()
    return calls


def test_a_real_browser_renders_a_month_with_a_spike(tmp_path, browser):
    """A month as a supervisor sees it (`CALMLINE_REPORT_SCREENSHOT=docs/report-example.png` keeps it)."""
    calls = month_with_a_spike(tmp_path / "audit.sqlite3", NOW)
    since = datetime(2025, 2, 9, tzinfo=timezone.utc)
    report = build_report(sqlite_db(tmp_path / "audit.sqlite3"), since=since, until=None, now=NOW)
    assert len(report.days) == 30 and len(report.calls) == calls
    assert sum(d.total for d in report.days[21:]) / 9 > 2 * sum(d.total for d in report.days[:21]) / 21
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    dom = browser("--dump-dom", page.as_uri(), profile=tmp_path / "profile-dom")
    structure = _Structure()
    structure.feed(dom.stdout)
    assert structure.bars["daily"] == sum(bool(getattr(d, k)) for d in report.days for k in KINDS)
    assert structure.rows == 1 + calls
    # Every other day labelled, so the labels never touch.
    labels = re.findall(r'<text class="axis day" x="([0-9.]+)"', dom.stdout)
    assert len(labels) == 15 and min(float(b) - float(a) for a, b in itertools.pairwise(labels)) > 60
    png = tmp_path / "report.png"
    shot = browser(f"--screenshot={png}", "--window-size=1200,1600", "--hide-scrollbars", page.as_uri(),
                   profile=tmp_path / "profile-shot")
    assert shot.returncode == 0 and png.stat().st_size > 30_000
    if os.environ.get("CALMLINE_REPORT_SCREENSHOT"):
        shutil.copy(png, os.environ["CALMLINE_REPORT_SCREENSHOT"])


def test_a_real_browser_renders_the_empty_page(tmp_path, browser):
    empty = tmp_path / "empty.sqlite3"
    store = AuditStore(sqlite_db(empty))
    store.open()
    store.close()
    page = tmp_path / "empty.html"
    page.write_text(render_html(build_report(sqlite_db(empty), since=SINCE, until=None, now=NOW)), encoding="utf-8")
    dom = browser("--dump-dom", page.as_uri(), profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "No escalations in this period" in dom.stdout and "<svg" not in dom.stdout


def test_audit_cli_prints_the_trail_and_one_call(tmp_path):
    db = tmp_path / "live.sqlite3"
    trail = Trail(sqlite_db(db))
    trail.session(at(9, 0, 0), "warn", linkedid="A.1", agent=ALICE, name=SCRIPT_NAME, steps=[warned(1)])
    trail.session(at(9, 5, 0), "warn", linkedid="B.2", agent=ALICE, steps=[warned(1), warned(2)])
    trail.close()
    everything = _cli(tmp_path, db, "audit")
    assert everything.returncode == 0, everything.stderr
    events = [json.loads(line) for line in everything.stdout.splitlines()]
    assert {e["linkedid"] for e in events} == {"A.1", "B.2"}
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    one = _cli(tmp_path, db, "audit", "--linkedid", "B.2")
    steps = [json.loads(line).get("step") for line in one.stdout.splitlines()]
    assert one.returncode == 0 and steps.count("warning_played") == 2
    assert all(json.loads(line)["linkedid"] == "B.2" for line in one.stdout.splitlines())
    empty = tmp_path / "created-never-written.sqlite3"
    empty.touch()
    nothing = _cli(tmp_path, empty, "audit")
    assert (nothing.returncode, nothing.stdout, nothing.stderr) == (0, "", "")


# Characters that would make a terminal show something other than the event: escapes, C1
# controls, bidi overrides and isolates, zero-width, line separators, invisible tag letters.
HIDDEN = "\x1b[2J\x07\x7f\x85\x9b\u202e\u2066\u200b\u200e\u2028\u2029\ufeff\U000e0041"


def test_audit_cli_writes_control_and_bidi_characters_as_escapes(tmp_path):
    import unicodedata

    db = tmp_path / "live.sqlite3"
    trail = Trail(sqlite_db(db))
    name = f"Mallory {HIDDEN} gnp.exe"
    trail.session(at(9, 0, 0), "warn", linkedid="H.1", agent=ALICE, name=name, steps=[warned(1)])
    trail.close()
    done = _cli(tmp_path, db, "audit")
    assert done.returncode == 0, done.stderr
    shown = {ch for ch in done.stdout if ch != "\n" and unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")}
    assert shown == set()
    assert "\\u202e" in done.stdout and "\\udb40\\udc41" in done.stdout
    # Nothing is lost: the JSON reads back as the name that was recorded.
    assert {json.loads(line)["caller_name"] for line in done.stdout.splitlines()} == {name}


def test_audit_cli_says_on_stderr_when_the_limit_cuts_the_trail(tmp_path):
    db = tmp_path / "live.sqlite3"
    trail = Trail(sqlite_db(db))
    for minute in range(70):  # three events each: 210, past the default 200
        trail.session(at(9, minute // 60, minute % 60), "warn", linkedid="L.1", agent=ALICE, steps=[warned(1)])
    trail.close()
    newest = _cli(tmp_path, db, "audit")
    lines = newest.stdout.splitlines()
    assert newest.returncode == 0 and len(lines) == 200
    assert json.loads(lines[-1])["ts"] == "2025-03-09T01:09:00.200000+00:00"  # the newest kept
    assert newest.stderr == ("calmline: showing the newest 200 events; there are more "
                             "(pass --limit with a larger number)\n")
    first = _cli(tmp_path, db, "audit", "--linkedid", "L.1", "--limit", "4")
    assert [json.loads(line)["event"] for line in first.stdout.splitlines()] == [
        "session_start", "step", "session_end", "session_start"]
    assert "the first 4 events of call L.1" in first.stderr
    everything = _cli(tmp_path, db, "audit", "--limit", "210")
    assert len(everything.stdout.splitlines()) == 210 and everything.stderr == ""
    refused = _cli(tmp_path, db, "audit", "--limit", "0")
    assert refused.returncode == 2 and "--limit must be at least 1" in refused.stderr


@pytest.mark.parametrize("command", ["audit", "report"])
def test_cli_on_a_file_that_is_not_an_audit_trail_says_so(tmp_path, command):
    bad = tmp_path / "not-sqlite.db"
    bad.write_text("this is not a database\n" * 200, encoding="utf-8")
    done = _cli(tmp_path, bad, command)
    assert done.returncode == 1
    assert "cannot read the store" in done.stderr and "store.url" in done.stderr
    assert "Traceback" not in done.stderr
    missing = tmp_path / "nothing-here"
    missing.mkdir()
    done = _cli(tmp_path, missing, command)
    assert done.returncode == 1 and "no store at" in done.stderr and "Traceback" not in done.stderr


def test_cli_report_never_writes_through_a_planted_symlink_and_is_private(tmp_path):
    """As root, `--output DIR/report.html` wrote through a planted `report.html.partial`."""
    db = tmp_path / "live.sqlite3"
    trail = Trail(sqlite_db(db))
    trail.session(datetime.now(timezone.utc) - timedelta(hours=1), "warn", linkedid="P.1", agent=ALICE,
                  steps=[warned(1)])
    trail.close()
    shared = tmp_path / "shared"
    shared.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (shared / "report.html.partial").symlink_to(victim)
    (shared / "report.html").symlink_to(tmp_path / "dangling-target")
    done = _cli(tmp_path, db, "report", "--output", str(shared / "report.html"))
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "dangling-target").exists()
    out = shared / "report.html"
    assert not out.is_symlink() and "P.1" in out.read_text(encoding="utf-8")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # caller data
    assert sorted(p.name for p in shared.iterdir()) == ["report.html", "report.html.partial"]


def test_with_a_console_url_each_call_links_to_its_timeline(audit_db):
    trail = Trail(sqlite_db(audit_db))
    trail.session(at(10, 11, 30), "warn", linkedid='L"<b>&?/x', agent=ALICE, steps=[warned(1)])
    trail.close()
    report = build_report(sqlite_db(audit_db), since=SINCE, until=None, now=NOW,
                          console_url="https://calmline.example.com/console/")
    page = render_html(report)
    assert '<a href="https://calmline.example.com/console/calls/B.1">B.1</a>' in page
    # A hostile linkedid stays inside its path segment and is shown inert.
    assert ('<a href="https://calmline.example.com/console/calls/L%22%3Cb%3E%26%3F%2Fx">'
            'L&quot;&lt;b&gt;&amp;?/x</a>') in page
    assert len(re.findall(r"<a href=", page)) == len(report.calls) == 9
    # Without one, no links at all.
    assert "<a " not in render_html(build_report(sqlite_db(audit_db), since=SINCE, until=None, now=NOW))


def test_the_page_shows_the_most_recent_calls_and_counts_them_all(audit_db):
    report = build_report(sqlite_db(audit_db), since=SINCE, until=None, now=NOW, calls_shown=3)
    assert report.call_count == 8 and [c.linkedid for c in report.calls] == ["I.1", "H.1", "G.1"]
    assert report.escalations == 13  # the counts are over every call, not the ones shown
    page = render_html(report)
    assert "Showing the 3 most recent of 8 calls" in page and "calls escalated" in page

