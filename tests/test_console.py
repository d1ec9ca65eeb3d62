"""The supervisors' console over HTTP: a real store filled through the real write path, the
real application (Starlette's TestClient), the real CLI for accounts."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs

import pytest
from itsdangerous import TimestampSigner
from serve_process import environment
from starlette.routing import Mount, Route
from starlette.testclient import TestClient
from stores import sqlite_db
from trails import END_STEPS, Trail, result, transferred, warned

from calmline.audit.store import AuditStore, read_events
from calmline.callback.outbox import CallbackRequest, Outbox
from calmline.config import parse
from calmline.console.accounts import Accounts
from calmline.console.app import COOKIE, create_app
from calmline.store import Database

SECRET = "s" * 48
PASSWORD = "correct horse battery"
NOW = datetime.now(timezone.utc).replace(microsecond=0)
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>\u202eevil\u2066 \"quoted\" & co"
AGENTS = ["PJSIP/alice-0000002a", "PJSIP/bob-0000002b", "Local/carol@agents-00000001;1"]


def _config(**console):
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {"timezone": "Europe/Berlin", **console}.items())
    return parse(f'[console]\n{lines}\n')


@pytest.fixture
def sqlite(tmp_path) -> Database:
    return sqlite_db(tmp_path / "store.sqlite3")


def app_for(db: Database, **console):
    audit = AuditStore(db)
    audit.open()
    Accounts(db).add("alice", PASSWORD) if not Accounts(db).exists("alice") else None
    return create_app(_config(**console), db, SECRET, audit), audit


def login(client: TestClient, name: str = "alice", password: str = PASSWORD, next_: str = "/calls"):
    page = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    return client.post("/login", data={"username": name, "password": password, "csrf": csrf, "next": next_},
                       follow_redirects=False)


def signed_in(db: Database, **console) -> tuple[TestClient, AuditStore]:
    app, audit = app_for(db, **console)
    client = TestClient(app)
    assert login(client).status_code == 303
    return client, audit


def mail_for(db: Database, linkedid: str, status: str, email: str | None = None) -> None:
    outbox = Outbox(db)
    outbox.add(CallbackRequest(key=linkedid, created_at=NOW, caller_number="+1", caller_name="x",
                               caller_email=email, agent="PJSIP/alice-0000002a", warnings=2, reason="abusive",
                               uniqueid=linkedid, linkedid=linkedid, channel="PJSIP/c-1"))
    if status != "pending":
        conn = db.connect()
        try:
            conn.execute("UPDATE outbox SET status = ?, attempts = 3, last_error = ? WHERE linkedid = ?",
                         (status, "550 no" if status == "failed" else None, linkedid))
        finally:
            conn.close()
    outbox.close()


# ---------------------------------------------------------------------------------------------
# Logged out


def test_every_route_refuses_a_logged_out_client(sqlite):
    app, audit = app_for(sqlite)
    fill_small(sqlite)
    client = TestClient(app)
    paths = ["/", "/calls", "/calls?kind=end", "/calls.csv", "/calls/B.1", "/agents", "/callers", "/trends",
             "/live", "/live/stream", "/static/console.css", "/static/live.js", "/static/login.css", "/nope"]
    # Every route the application has is in the list (a new one must be added here).
    declared = {r.path for r in app.routes if isinstance(r, (Route, Mount))} - {"/login", "/logout"}
    covered = {p.split("?")[0] for p in paths} | {"/calls/{linkedid:path}"}
    assert {d for d in declared if not any(c.startswith(d) for c in covered)} == set()
    for path in paths:
        plain = client.get(path, follow_redirects=False)
        assert plain.status_code == 401, path
        assert "B.1" not in plain.text and "alice" not in plain.text
        browser = client.get(path, headers={"accept": "text/html,application/xhtml+xml"}, follow_redirects=False)
        assert browser.status_code == 303, path
        assert browser.headers["location"].startswith("/login?next=%2F")
    assert client.post("/logout", follow_redirects=False).headers["location"] == "/login"
    audit.close()


def test_login_then_every_page_answers_and_the_cookie_is_strict(sqlite):
    fill_small(sqlite)
    app, audit = app_for(sqlite)
    client = TestClient(app)
    page = client.get("/login?next=/agents")
    assert page.status_code == 200
    answer = login(client, next_="/agents")
    assert answer.status_code == 303 and answer.headers["location"] == "/agents"
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    for path in ["/calls", "/calls.csv", "/calls/B.1", "/agents", "/callers", "/trends", "/live",
                 "/static/console.css", "/static/live.js"]:
        assert client.get(path).status_code == 200, path
    # A login page never sends a supervisor off-site afterwards.
    client.cookies.clear()
    assert login(client, next_="//evil.example/x").headers["location"] == "/calls"
    assert audit.flush()
    audit.close()


def test_wrong_password_is_refused_slowed_and_locked_and_every_try_is_audited(sqlite):
    app, audit = app_for(sqlite, lockout_after=2, lockout_minutes=5.0)
    client = TestClient(app)
    started = time.monotonic()
    first = login(client, password="wrong password!")
    assert first.status_code == 401 and "Wrong name or password" in first.text
    assert client.get("/calls").status_code == 401
    second = login(client, password="still wrong!!")
    assert second.status_code == 401 and "locked for 5 more minute" in second.text
    # Locked: the right password is refused too, until the lock runs out.
    third = login(client)
    assert third.status_code == 401 and "locked" in third.text
    assert client.get("/calls").status_code == 401
    # Each failure in a row answers later than the last (0.5 s, 1 s, then 1 s while locked).
    assert time.monotonic() - started >= 2.5
    # Another name is not locked by alice's failures.
    Accounts(sqlite).add("bob", PASSWORD)
    assert login(client, "bob").status_code == 303
    assert audit.flush()
    events = [e for e in read_events(sqlite, limit=100) if e["event"].startswith("console_login")]
    assert [(e["event"], e["supervisor"], e["outcome"]) for e in events] == [
        ("console_login_failed", "alice", "refused"),
        ("console_login_failed", "alice", "locked"),
        ("console_login_failed", "alice", "locked"),
        ("console_login", "bob", "ok"),
    ]
    audit.close()


def test_a_login_without_the_forms_csrf_token_is_refused(sqlite):
    app, audit = app_for(sqlite)
    client = TestClient(app)
    client.get("/login")
    answer = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf": "guess"},
                         follow_redirects=False)
    assert answer.status_code == 400
    assert client.get("/calls").status_code == 401
    audit.close()


def _cookie(payload: dict, secret: str = SECRET, age: float = 0.0) -> str:
    import base64

    class Signer(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time() - age)

    data = base64.b64encode(json.dumps(payload).encode())
    return Signer(secret).sign(data).decode()


def test_forged_and_expired_cookies_are_refused(sqlite):
    app, audit = app_for(sqlite, session_hours=1.0)
    Accounts(sqlite).add("bob", PASSWORD)
    client = TestClient(app)
    assert login(client).status_code == 303
    real = client.cookies[COOKIE]
    good = {"user": "alice", "at": time.time(), "csrf": "x"}
    cases = {
        "the real cookie": (real, 200),
        "one we signed ourselves, to prove the forgeries below fail for their own reason": (_cookie(good), 200),
        "another user's name under alice's signature": (
            __import__("base64").b64encode(json.dumps({**good, "user": "bob"}).encode()).decode()
            + "." + real.split(".", 1)[1], 401),
        "signed with another key": (_cookie({**good, "user": "bob"}, secret="k" * 48), 401),
        "unsigned": (__import__("base64").b64encode(json.dumps(good).encode()).decode(), 401),
        "expired signature (older than session_hours)": (_cookie(good, age=3700), 401),
        "fresh signature on a login older than session_hours": (_cookie({**good, "at": time.time() - 3700}), 401),
        "a user that does not exist": (_cookie({**good, "user": "mallory"}), 401),
    }
    for name, (value, status) in cases.items():
        fresh = TestClient(app)
        fresh.cookies.set(COOKIE, value)
        assert fresh.get("/calls").status_code == status, name
    # Removing an account ends its sessions at once.
    Accounts(sqlite).remove("alice")
    assert client.get("/calls").status_code == 401
    audit.close()


# ---------------------------------------------------------------------------------------------
# Escaping


def fill_small(db: Database) -> None:
    t = Trail(db)
    base = NOW - timedelta(hours=3)
    t.session(base, "warn", linkedid="B.1", agent=AGENTS[0], number="+4930111", name=HOSTILE, steps=[warned(1)])
    t.session(base + timedelta(minutes=1), "warn", linkedid="B.1", agent=AGENTS[0], number="+4930111",
              name=HOSTILE, steps=[warned(2, final=True)])
    t.session(base + timedelta(minutes=2), "end", linkedid="B.1", agent=AGENTS[0], number="+4930111",
              name=HOSTILE, steps=END_STEPS)
    t.session(base + timedelta(hours=1), "transfer/supervisor", linkedid="C.1", agent=AGENTS[1],
              number="=HYPERLINK(\"http://evil\")", steps=transferred("supervisor"))
    t.session(base + timedelta(hours=1, minutes=3), "transfer/result", linkedid="C.1", number="+4930222",
              steps=result("supervisor", "ANSWER", None, AGENTS[1]))
    t.session(base + timedelta(hours=2), "warn", linkedid="D.1", agent=AGENTS[2], number="+4930111",
              steps=[warned(1)])
    t.close()
    mail_for(db, "B.1", "sent", email="caller@example.com")


def test_a_hostile_caller_name_is_inert_everywhere_under_a_strict_csp(sqlite):
    fill_small(sqlite)
    client, audit = signed_in(sqlite)
    for path in ["/calls", "/calls/B.1", "/calls/D.1", "/callers?min=1", "/agents", "/trends"]:
        page = client.get(path)
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "<script>alert" not in page.text and "<img src=x" not in page.text, path
        assert "\u202e" not in page.text and "\u2066" not in page.text, path
        assert re.search(r"<script(?! src=\"/static/live\.js\")", page.text) is None, path
        if path in ("/calls", "/calls/B.1", "/callers?min=1"):
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text, path
            assert "\\u202eevil\\u2066" in page.text, path
    # The one inline style the login page has is allowed by its hash, nothing else.
    login_page = TestClient(client.app).get("/login")
    style = re.search(r"<style>(.*?)</style>", login_page.text, re.S).group(1)
    digest = __import__("base64").b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in login_page.headers["content-security-policy"]
    audit.close()


def test_the_csv_defuses_formulas_and_shows_controls(sqlite):
    fill_small(sqlite)
    client, audit = signed_in(sqlite)
    answer = client.get("/calls.csv")
    assert answer.headers["content-type"].startswith("text/csv")
    assert "attachment" in answer.headers["content-disposition"]
    rows = {r["linkedid"]: r for r in csv.DictReader(io.StringIO(answer.text))}
    assert rows["C.1"]["caller number"] == "'=HYPERLINK(\"http://evil\")"
    assert rows["B.1"]["caller number"] == "+4930111"  # a phone number stays a phone number
    assert "\u202e" not in answer.text and "\\u202eevil" in rows["B.1"]["caller name"]
    assert rows["B.1"]["escalations"] == "warning > final warning > end"
    assert rows["B.1"]["callback mail"] == "sent" and rows["B.1"]["caller mail"] == "sent"
    audit.close()


# ---------------------------------------------------------------------------------------------
# The call page


def test_a_call_page_shows_every_leg_the_transfer_and_the_mail_and_is_audited(sqlite):
    fill_small(sqlite)
    client, audit = signed_in(sqlite)
    page = client.get("/calls/B.1").text
    assert page.count('class="leg"') == 3
    for step in ("warning_played", "callback_queued", "call_marked", "closing_prompt_played"):
        assert step in page
    assert page.index("final=True") > page.index("warning=1")
    mail = re.search(r'<table id="mail">.*?</table>', page, re.S).group(0)
    assert "callback to the team" in mail and "follow-up to the caller" in mail
    assert "caller@example.com" in mail and mail.count("b-sent") == 2
    assert '<a href="/calls/D.1">' in page  # the same caller's other call
    transfer = client.get("/calls/C.1").text
    row = re.search(r'<table id="transfers">.*?</table>', transfer, re.S).group(0)
    assert "answered" in row and "PJSIP/sup" in row and "PJSIP/bob" in row
    assert "No callback mail" in transfer
    assert client.get("/calls/none-such").status_code == 404
    assert audit.flush()
    viewed = [e for e in read_events(sqlite, limit=200) if e["event"] == "console_call_viewed"]
    assert [(e["supervisor"], e["linkedid"], e["caller_number"]) for e in viewed] == [
        ("alice", "B.1", "+4930111"), ("alice", "C.1", "=HYPERLINK(\"http://evil\")")]
    # Opening the page is in the trail, not in the call's timeline.
    assert "console_call_viewed" not in client.get("/calls/B.1").text
    audit.close()


# ---------------------------------------------------------------------------------------------
# Filters, paging, CSV


CALLERS = [("+4930100", "Ann Example"), ("+4930200", "Bo Jones"), ("+4930300", ""), ("anonymous", ""),
           ("+4930400", "Ann Other")]
OUTCOME_OF = {0: "completed", 1: "caller_hung_up", 2: "prompt_missing", 3: "agi_error"}


def fill_grid(db: Database, calls: int = 90) -> dict[str, dict]:
    """Calls over ten days with every combination of agent, caller, kind, outcome and mail;
    returns what each call is, to compute the expected answers independently."""
    rng = random.Random(7)
    t = Trail(db)
    truth: dict[str, dict] = {}
    start = NOW - timedelta(days=10)
    for i in range(calls):
        linkedid = f"G.{i}"
        at = start + timedelta(hours=i * 2.6 + rng.random())
        number, name = CALLERS[i % len(CALLERS)]
        agent = AGENTS[i % 3]
        escalations = []
        for j in range(1 + i % 3):
            kind = ["warning", "final_warning", "transfer", "end"][(i + j) % 4]
            outcome = OUTCOME_OF[(i // 4 + j) % 4]
            when = at + timedelta(minutes=j)
            if kind in ("warning", "final_warning"):
                steps = [warned(j + 1, final=kind == "final_warning")]
                action = "warn"
            elif kind == "transfer":
                steps, action = transferred("colleague"), "transfer/colleague"
            else:
                steps, action = END_STEPS, "end"
            t.session(when, action, linkedid=linkedid, agent=agent, number=number, name=name, steps=steps,
                      outcome=outcome, error=None if outcome == "completed" else outcome)
            escalations.append({"at": when, "kind": kind, "outcome": outcome, "agent": agent})
        truth[linkedid] = {"number": number, "name": name, "escalations": escalations,
                           "mail": ["pending", "sent", "failed", "none"][i % 4]}
    t.close()
    for linkedid, call in truth.items():
        if call["mail"] != "none":
            mail_for(db, linkedid, call["mail"])
    return truth


def expected(truth: dict, zone, *, since=None, until=None, agent="", caller="", kind="", outcome="", mail=""):
    out = set()
    for linkedid, call in truth.items():
        if mail and call["mail"] != mail:
            continue
        if caller and caller.lower() not in call["number"].lower() and caller.lower() not in call["name"].lower():
            continue
        for e in call["escalations"]:
            local = e["at"].astimezone(zone)
            if since and local.date() < since or until and local.date() > until:
                continue
            if agent and not e["agent"].startswith(agent + "-"):
                continue
            if kind and e["kind"] != kind:
                continue
            if outcome == "other" and e["outcome"] in ("completed", "caller_hung_up", "prompt_missing"):
                continue
            if outcome and outcome != "other" and e["outcome"] != outcome:
                continue
            out.add(linkedid)
            break
    return out


def csv_ids(client: TestClient, query: str) -> list[str]:
    answer = client.get("/calls.csv?" + query)
    assert answer.status_code == 200
    return [r["linkedid"] for r in csv.DictReader(io.StringIO(answer.text))]


def page_ids(client: TestClient, query: str) -> tuple[int, list[str]]:
    ids, page = [], 1
    while True:
        text = client.get(f"/calls?{query}&page={page}").text
        total = int(re.search(r'<span id="count">(\d+) call', text).group(1))
        found = re.findall(r'<td class="mono"><a href="/calls/([^"]+)">', text)
        ids += found
        if 'rel="next"' not in text:
            return total, ids
        page += 1


def test_filters_combine_and_the_csv_holds_exactly_the_filtered_set(db):
    truth = fill_grid(db)
    client, audit = signed_in(db, page_size=7)
    zone = client.app.state.console.zone
    today = NOW.astimezone(zone).date()
    d = lambda n: (today - timedelta(days=n)).isoformat()  # noqa: E731
    cases = [
        dict(),
        dict(since=d(6)),
        dict(since=d(8), until=d(3)),
        dict(agent="PJSIP/alice"),
        dict(agent="Local/carol@agents"),
        dict(caller="ann"),
        dict(caller="30200"),
        dict(kind="final_warning"),
        dict(kind="transfer", agent="PJSIP/bob"),
        dict(kind="end", outcome="caller_hung_up"),
        dict(outcome="other"),
        dict(mail="failed"),
        dict(mail="none", kind="warning"),
        dict(since=d(7), until=d(2), agent="PJSIP/alice", kind="warning", outcome="completed"),
        dict(caller="ann", mail="pending", since=d(9)),
    ]
    for case in cases:
        query = "&".join(f"{k}={v}" for k, v in {"since": "", **case}.items())
        want = expected(truth, zone, **{k: (datetime.fromisoformat(v).date() if k in ("since", "until") else v)
                                        for k, v in case.items() if v})
        got = csv_ids(client, query)
        assert len(got) == len(set(got)), case
        assert set(got) == want, case
        total, listed = page_ids(client, query)
        assert total == len(want), case
        assert listed == got, case  # the pages, in order, are the CSV
    assert len(expected(truth, zone, kind="end", outcome="caller_hung_up")) > 0
    # Sorting: by caller number, ascending, across pages.
    total, listed = page_ids(client, "since=&sort=caller&order=asc")
    numbers = [truth[i]["number"] for i in listed]
    assert numbers == sorted(numbers) and total == len(truth)
    # Exact number (the links from /callers and a call's page).
    assert set(csv_ids(client, "since=&number=%2B4930100")) == {i for i, c in truth.items() if c["number"] == "+4930100"}
    audit.close()


def test_paging_through_a_time_range_orders_calls_by_their_first_or_last_escalation_in_it(db):
    """A time range alone takes the index path (no grouping of the range): its pages must list
    the same calls, in the same order, as the escalations themselves say."""
    truth = fill_grid(db)
    # Long calls that overlap the others, so first-escalation and last-escalation orders differ,
    # and a range's edge can fall inside a call.
    t = Trail(db)
    for n in range(6):
        linkedid = f"L.{n}"
        times = [NOW - timedelta(days=9 - n, hours=3), NOW - timedelta(days=9 - 2 * n, hours=1)]
        for when in times:
            t.session(when, "warn", linkedid=linkedid, agent=AGENTS[0], number="+4930999", name="",
                      steps=[warned(1)], outcome="completed", error=None)
        truth[linkedid] = {"escalations": [{"at": when} for when in times]}
    t.close()
    client, audit = signed_in(db, page_size=7)
    zone = client.app.state.console.zone
    today = NOW.astimezone(zone).date()
    for since, until in ((None, None), (5, None), (8, 3), (6, 6)):
        lo = today - timedelta(days=since) if since is not None else None
        hi = today - timedelta(days=until) if until is not None else None
        edges = {}
        for linkedid, call in truth.items():
            times = [e["at"] for e in call["escalations"]
                     if not (lo and e["at"].astimezone(zone).date() < lo or hi and e["at"].astimezone(zone).date() > hi)]
            if times:
                edges[linkedid] = (min(times), max(times), len(times))
        assert edges, (since, until)
        for sort, edge in (("started", 0), ("last", 1)):
            for order in ("desc", "asc"):
                query = f"since={lo or ''}&until={hi or ''}&sort={sort}&order={order}"
                want = sorted(edges, key=lambda i: (edges[i][edge], i), reverse=order == "desc")
                total, listed = page_ids(client, query)
                assert (total, listed) == (len(want), want), query
                assert csv_ids(client, query) == want, query
        # Each call of the range comes with all its escalations, inside the range or not.
        text = client.get(f"/calls.csv?since={lo or ''}&until={hi or ''}").text
        presses = {r["linkedid"]: len(r["escalations"].split(" > ")) for r in csv.DictReader(io.StringIO(text))}
        assert presses == {i: len(truth[i]["escalations"]) for i in edges}
    audit.close()


def test_bad_filters_are_said_not_crashed(sqlite):
    client, audit = signed_in(sqlite)
    page = client.get("/calls?since=yesterday&kind=rude&page=x")
    assert page.status_code == 200
    assert "since: &#39;yesterday&#39; is not a date" in page.text
    assert "kind: &#39;rude&#39; is not one of" in page.text
    audit.close()


def test_agents_counts_link_to_exactly_their_calls(db):
    truth = fill_grid(db, calls=40)
    client, audit = signed_in(db)
    page = client.get("/agents?since=").text
    zone = client.app.state.console.zone
    links = re.findall(r'<td class="num"><a href="/calls\?([^"]+)">(\d+)</a></td>', page)
    assert len(links) >= 9
    for query, count in links:
        query = query.replace("&amp;", "&")
        asked = {k: v[0] for k, v in parse_qs(query).items()}
        want = expected(truth, zone, agent=asked.get("agent", ""), kind=asked.get("kind", ""))
        assert len(csv_ids(client, query)) == int(count) == len(want), query
    assert "PJSIP/alice" in page and "Local/carol@agents" in page and "0000002a" not in page
    audit.close()


def test_repeat_callers_link_to_their_calls_and_withheld_stay_apart(db):
    truth = fill_grid(db, calls=40)
    client, audit = signed_in(db)
    page = client.get("/callers?since=&min=2").text
    numbers = re.findall(r'<a class="mono" href="/calls\?([^"]+)"><bdi>([^<]+)</bdi>', page)
    counts = {}
    for c in truth.values():
        counts[c["number"]] = counts.get(c["number"], 0) + 1
    assert [n for _, n in numbers] == sorted((n for n in counts if n != "anonymous"), key=lambda n: (-counts[n], n))
    for query, number in numbers:
        assert len(csv_ids(client, query.replace("&amp;", "&"))) == counts[number]
    assert f"Withheld numbers: {counts['anonymous']} escalated calls" in page
    audit.close()


def test_trends_count_per_day_and_mark_config_changes(sqlite):
    truth = fill_grid(sqlite, calls=40)
    t = Trail(sqlite)
    t.event(NOW - timedelta(days=20), "service_started", fingerprint="f1")
    t.event(NOW - timedelta(days=6), "service_started", fingerprint="f1")  # same config: no marker
    t.event(NOW - timedelta(days=4), "config_reloaded", fingerprint="f2", previous_fingerprint="f1")
    t.event(NOW - timedelta(days=2), "service_started", fingerprint="f3")
    t.close()
    client, audit = signed_in(sqlite)
    page = client.get("/trends").text
    total = sum(len(c["escalations"]) for c in truth.values())
    shown = sum(int(n) for n in re.findall(r"<title>\d{4}-\d\d-\d\d: (\d+) ", page))
    assert shown == total
    markers = re.search(r'<ul id="markers">(.*?)</ul>', page, re.S).group(1)
    assert markers.count("<li>") == 2 and "f2" in markers and "f3" in markers
    assert page.count('class="marker"') == 2
    heat = sum(int(n) for n in re.findall(r"<title>\w{3} \d\d:00-\d\d:59: (\d+)</title>", page))
    assert heat == total
    audit.close()


def test_trends_put_each_escalation_in_its_local_day_and_hour_in_a_half_hour_zone(db):
    """India is UTC+05:30: 18:20 UTC is 23:50 there, 18:40 UTC is 00:10 the next day."""
    day = (NOW - timedelta(days=3)).replace(hour=0, minute=0, second=0)
    t = Trail(db)
    for minute in (20, 40):
        t.session(day + timedelta(hours=18, minutes=minute), "warn", linkedid=f"K.{minute}", agent=AGENTS[0],
                  number="+4930100", name="", steps=[warned(1)], outcome="completed", error=None)
    t.close()
    client, audit = signed_in(db, timezone="Asia/Kolkata")
    page = client.get("/trends").text
    days = dict(re.findall(r"<title>(\d{4}-\d\d-\d\d): (\d+) warning</title>", page))
    first, second = day.date(), day.date() + timedelta(days=1)
    assert (days.get(first.isoformat()), days.get(second.isoformat())) == ("1", "1")
    names = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    hours = {k: v for k, v in re.findall(r"<title>(\w{3} \d\d):00-\d\d:59: (\d+)</title>", page) if v != "0"}
    assert hours == {f"{names[first.weekday()]} 23": "1", f"{names[second.weekday()]} 00": "1"}
    audit.close()


# ---------------------------------------------------------------------------------------------
# The CLI


def _cli(tmp_path, *args, stdin=""):
    config = tmp_path / "calmline.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "store.sqlite3"}"\n'
                      f'[console]\nsecret_file = "{tmp_path / "console.key"}"\n')
    return subprocess.run([sys.executable, "-m", "calmline", "-c", str(config), "console", *args],
                          input=stdin, capture_output=True, text=True, env=environment(), timeout=60)


def test_cli_adds_and_removes_accounts_with_the_password_on_stdin(tmp_path):
    added = _cli(tmp_path, "add-user", "sam", "--password-stdin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert "account sam added" in added.stdout
    db = sqlite_db(tmp_path / "store.sqlite3")
    assert Accounts(db).login("sam", PASSWORD).ok
    assert not Accounts(db).login("sam", PASSWORD + "x").ok
    again = _cli(tmp_path, "add-user", "sam", "--password-stdin", stdin="another long one\n")
    assert again.returncode == 1 and "--replace" in again.stderr
    short = _cli(tmp_path, "add-user", "kim", "--password-stdin", stdin="short\n")
    assert short.returncode == 2 and "shorter than 10" in short.stderr
    bad = _cli(tmp_path, "add-user", "<b>", "--password-stdin", stdin=PASSWORD + "\n")
    assert bad.returncode == 2 and "not an account name" in bad.stderr
    no_stdin = _cli(tmp_path, "add-user", "kim")
    assert no_stdin.returncode == 2 and "--password-stdin" in no_stdin.stderr
    assert _cli(tmp_path, "users").stdout.split() == ["sam"]
    removed = _cli(tmp_path, "remove-user", "sam")
    assert removed.returncode == 0 and not Accounts(db).exists("sam")
    assert _cli(tmp_path, "remove-user", "sam").returncode == 1
    stored = [e for e in read_events(db) if e["event"].startswith("console_user")]
    assert [(e["event"], e["supervisor"]) for e in stored] == [("console_user_added", "sam"),
                                                              ("console_user_removed", "sam")]
    conn = db.connect()
    try:
        assert PASSWORD not in str(conn.execute("SELECT * FROM console_users").fetchall())
    finally:
        conn.close()


def test_the_console_without_its_extra_says_which_package_to_install(tmp_path):
    config = tmp_path / "calmline.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/store.sqlite3"\n')
    hide = ("import sys; sys.modules['uvicorn'] = None; "
            "from calmline.cli import main; sys.exit(main(['-c', sys.argv[1], 'console']))")
    done = subprocess.run([sys.executable, "-c", hide, str(config)], capture_output=True, text=True,
                          env=environment(), timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "pip install 'calmline[console]'" in done.stderr
