"""`calmline report`: the supervisor's view of the audit trail, as one self-contained HTML page.

`build_report()` has the store count, as plain data, what agents did in a period: every
key press that reached calmline is one *escalation* (a warning, a transfer or an end), dated
by when it started, whatever became of it; its outcome is counted separately. A call is
everything with one linkedid: its ladder is its escalations in order, with each transfer's
result (answered, or the fallback) attached to the transfer. The counts are GROUP BYs in the
store over the period alone; only the most recent calls' ladders are read as events.

`render_html()` draws that as inline SVG (computed here: no JavaScript, no external
resources), so the file can be mailed or archived and opened anywhere. Every string that
came from the audit trail is HTML-escaped; days are UTC days, as the trail is stored in UTC.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

from calmline.actions import catalog
from calmline.actions.catalog import (
    CALLER_TRANSFERRED,
    EXTENSION_KEYED,
    EXTENSION_REJECTED,
    LADDER_EXHAUSTED,
    TRANSFER_RESULT,
    WARNING_PLAYED,
)
from calmline.audit.history import as_ts, period_sql
from calmline.store import Connection, Database
from calmline.store.schema import endpoint, endpoint_sql

CALLS_SHOWN = 500
AGENTS_CHARTED = 30


def _kind_labels() -> dict[str, str]:
    """The catalog's escalation kinds in stacking order, a final warning as a kind of its own."""
    labels: dict[str, str] = {}
    for spec in catalog.ACTIONS:
        if spec.escalation is not None:
            labels.setdefault(spec.escalation.kind, spec.escalation.label)
            if spec is catalog.WARN:
                labels["final_warning"] = "final warning"
    return labels


# Escalation kinds, in stacking order, with their labels and colours.
KIND_LABELS = _kind_labels()
KINDS = tuple(KIND_LABELS)
KIND_COLOURS = {
    "warning": "#e6c774",
    "final_warning": "#c4862c",
    "supervisor": "#4f83b0",
    "colleague": "#96b9d6",
    "end": "#85759f",
}
OUTCOME_GROUPS = ("completed", "caller_hung_up", "prompt_missing", "failures")
OUTCOME_LABELS = {
    "completed": "completed",
    "caller_hung_up": "caller hung up first",
    "prompt_missing": "prompt missing",
    "failures": "other failures",
}
OUTCOME_COLOURS = {
    "completed": "#83ab83",
    "caller_hung_up": "#b8b8b0",
    "prompt_missing": "#dda25a",
    "failures": "#c46a62",
}
TRANSFER_RESULTS = ("answered", "fallback", "no_result", "not_transferred")
TRANSFER_LABELS = {"answered": "answered", "fallback": "not answered: fallback", "no_result": "no result recorded",
                   "not_transferred": "caller not moved (failed or rejected)"}
TRANSFER_COLOURS = {"answered": "#4f83b0", "fallback": "#d1ad6b", "no_result": "#cfcfc7", "not_transferred": "#c46a62"}

_ESCALATION_PATHS = {spec.path: spec.escalation for spec in catalog.ACTIONS if spec.escalation is not None}
# Controls, lone surrogates and bidi overrides: shown as visible escapes, never passed through.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")


# ---------------------------------------------------------------------------------------------
# The data


@dataclass
class DayCount:
    day: date
    warning: int = 0
    final_warning: int = 0
    supervisor: int = 0
    colleague: int = 0
    end: int = 0
    transfers_answered: int = 0
    transfers_fallback: int = 0

    @property
    def warnings(self) -> int:
        return self.warning + self.final_warning

    @property
    def transfers(self) -> int:
        return self.supervisor + self.colleague

    @property
    def total(self) -> int:
        return self.warnings + self.transfers + self.end


@dataclass
class AgentCount:
    agent: str
    calls: int = 0
    warnings: int = 0
    final_warnings: int = 0
    supervisor: int = 0
    colleague: int = 0
    ends: int = 0

    @property
    def transfers(self) -> int:
        return self.supervisor + self.colleague

    @property
    def total(self) -> int:
        return self.warnings + self.transfers + self.ends


@dataclass
class Step:
    """One escalation on a call (or a transfer result whose transfer is before the period)."""

    kind: str  # one of KINDS, or "result"
    label: str
    at: datetime
    agent: str
    outcome: str
    error: str = ""
    transferred: bool = False  # for transfers: the caller was moved
    result: str = ""  # for transfers: "answered", "fallback" or "" (none recorded yet)
    result_label: str = ""

    @property
    def text(self) -> str:
        text = self.label
        if self.result_label:
            text += f": {self.result_label}"
        if self.outcome != "completed":
            text += f" [{self.outcome}]"
        return text


@dataclass
class Call:
    key: str  # the linkedid (or, before the bridge was known, the uniqueid or session)
    linkedid: str
    started: datetime
    caller_number: str = ""
    caller_name: str = ""
    agents: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)

    @property
    def ladder(self) -> str:
        return " → ".join(step.text for step in self.steps)

    @property
    def outcome(self) -> str:
        """The outcome of the call's last escalation."""
        escalations = [s for s in self.steps if s.kind != "result"]
        return escalations[-1].outcome if escalations else ""


@dataclass
class Report:
    since: datetime | None
    until: datetime | None
    generated_at: datetime
    first_day: date | None
    last_day: date | None
    days: list[DayCount]
    agents: list[AgentCount]  # most escalations first
    outcomes: dict[str, int]  # outcome as recorded -> escalations
    transfer_results: dict[str, int]  # TRANSFER_RESULTS -> transfers
    calls: list[Call]  # the most recent (CALLS_SHOWN of them), most recent first
    call_count: int = 0  # every escalated call in the period
    console_url: str | None = None  # where each call's page is: {console_url}/calls/{linkedid}

    @property
    def escalations(self) -> int:
        return sum(day.total for day in self.days)

    @property
    def empty(self) -> bool:
        return not self.call_count

    def totals(self) -> DayCount:
        total = DayCount(self.first_day or date.min)
        for day in self.days:
            for name in (*KINDS, "transfers_answered", "transfers_fallback"):
                setattr(total, name, getattr(total, name) + getattr(day, name))
        return total

    def outcome_groups(self) -> dict[str, int]:
        groups = dict.fromkeys(OUTCOME_GROUPS, 0)
        for outcome, count in self.outcomes.items():
            groups[outcome_group(outcome)] += count
        return groups


def outcome_group(outcome: str) -> str:
    return outcome if outcome in ("completed", "caller_hung_up", "prompt_missing") else "failures"


# ---------------------------------------------------------------------------------------------
# Reading the trail: the database counts, Python only draws
#
# An escalation is one session of an escalation action (the catalog's) that started in the
# period: its `session_start`, or its `session_end` when it never got that far (no linkedid
# yet). `_collect()` puts one row per escalation and per transfer result of the period in a
# temporary table: the escalations from the `escalations` table (kind and outcome kept by the
# triggers), the results and the sessions that never started through the (event, ts, ...)
# index and each session's steps through the (session, event, step, outcome) index; each
# figure is then one GROUP BY over that table. No query reads a row outside the period, except the
# steps and end of a session that began in it.

_SCRATCH = "calmline_report"
_CHUNK = 500  # call keys per IN list
_RESULT_PATH = catalog.TRANSFER_RESULT_ACTION.path
_TRANSFER_KINDS = ("supervisor", "colleague")
# Bits of a session's flags: what its steps recorded.
_TRANSFERRED, _ANSWERED, _RESULT = 1, 2, 4
# A step's `"final": true` or `"answered": true`, as `audit.store.encode` writes it: a string
# value cannot hold that text (its quotes are escaped), so only the key itself matches, and the
# partial index events_final_warning answers the first without reading the row.
_FINAL_SQL = "f.data LIKE '%\"final\": true%'"
_ANSWERED_SQL = "f.data LIKE '%\"answered\": true%'"
# A row's `state`: its kind's code (one character), 100 + its flags (three digits), its outcome.
_KIND_CODES = {kind: str(n) for n, kind in enumerate(KINDS)} | {"result": "r"}
_CODE_KINDS = {code: kind for kind, code in _KIND_CODES.items()}
_FLAGS = "(CAST(substr(state, 2, 3) AS INTEGER) - 100)"


def _kind_code_sql() -> str:
    """The kind's code from the session's action (the catalog) and its steps, in `_collect`'s probe."""
    warn = catalog.WARN.path
    cases = [f"WHEN a.action = '{warn}' AND MAX(CASE WHEN s.step = '{LADDER_EXHAUSTED}' THEN 1 ELSE 0 END) = 1 "
             f"THEN '{_KIND_CODES['end']}'",
             f"WHEN a.action = '{warn}' AND EXISTS (SELECT 1 FROM events f WHERE f.session = a.session "
             f"AND f.step = '{WARNING_PLAYED}' AND {_FINAL_SQL}) THEN '{_KIND_CODES['final_warning']}'"]
    cases += [f"WHEN a.action = '{path}' THEN '{_KIND_CODES[e.kind]}'" for path, e in _ESCALATION_PATHS.items()]
    return f"(CASE {' '.join(cases)} ELSE 'r' END)"


def _collect(conn: Connection, since: str | None, until: str | None) -> None:
    """One row per escalation and transfer result of the period, in a temporary table."""
    if conn.kind == "sqlite":
        conn.execute("PRAGMA temp_store = FILE")  # the period's rows spill to disk: memory stays flat
    else:
        # A one-off read of the period: no JIT compile (a second of its own), sorts in memory,
        # and the range read through the index rather than the whole table.
        for setting in ("jit = off", "work_mem = '64MB'", "temp_buffers = '64MB'", "random_page_cost = 1.1"):
            conn.execute(f"SET {setting}")
    paths = (*_ESCALATION_PATHS, _RESULT_PATH)
    bounds, params = period_sql("a.ts", since, until)
    conn.execute(f"DROP TABLE IF EXISTS {_SCRATCH}")
    conn.execute(f"CREATE TEMP TABLE {_SCRATCH} (session TEXT, started TEXT, action TEXT, "
                 "agent TEXT, call TEXT, state TEXT)")
    # One look at the session's events (its steps and end) through the covering index.
    select = (
        f"INSERT INTO {_SCRATCH} SELECT a.session, a.ts, a.action, "
        f"COALESCE(NULLIF({endpoint_sql('a.agent')}, ''), '(unknown agent)'), "
        f"COALESCE(NULLIF(a.linkedid, ''), NULLIF(a.uniqueid, ''), 'session ' || a.session), "
        f"(SELECT {_kind_code_sql()} "
        f"  || CAST(100 + MAX(CASE WHEN s.step = '{CALLER_TRANSFERRED}' THEN {_TRANSFERRED} ELSE 0 END) "
        f"  + MAX(CASE WHEN s.step = '{TRANSFER_RESULT}' THEN {_RESULT} ELSE 0 END) "
        f"  + (CASE WHEN a.action = '{_RESULT_PATH}' AND EXISTS (SELECT 1 FROM events f "
        f"    WHERE f.session = a.session AND f.step = '{TRANSFER_RESULT}' AND {_ANSWERED_SQL}) "
        f"    THEN {_ANSWERED} ELSE 0 END) AS TEXT) "
        f"  || COALESCE(MAX(CASE WHEN s.event = 'session_end' THEN COALESCE(NULLIF(s.outcome, ''), 'unknown') END), "
        f"    'unfinished') "
        f"  FROM events s WHERE s.session = a.session) "
        f"FROM events a WHERE {{anchor}}{bounds} AND a.action IN ({', '.join('?' * len(paths))})")
    # The escalations themselves from the `escalations` table, which the triggers keep with each
    # one's kind and outcome; only a transfer (was the caller moved?) and an escalation not yet
    # ended (or ended without an outcome) look at their session's events.
    flags = (f"(CASE WHEN a.kind IN ({', '.join(repr(k) for k in _TRANSFER_KINDS)}) AND EXISTS (SELECT 1 FROM events s "
             f"WHERE s.session = a.session AND s.step = '{CALLER_TRANSFERRED}') THEN '{100 + _TRANSFERRED}' ELSE '100' END)")
    outcome = ("(CASE WHEN a.outcome IS NOT NULL THEN COALESCE(NULLIF(a.outcome, ''), 'unknown') "
               "ELSE COALESCE((SELECT MAX(COALESCE(NULLIF(s.outcome, ''), 'unknown')) FROM events s "
               "WHERE s.session = a.session AND s.event = 'session_end'), 'unfinished') END)")
    kind_code = "(CASE a.kind " + " ".join(f"WHEN '{k}' THEN '{c}'" for k, c in _KIND_CODES.items() if k != "result")
    call = ("COALESCE(NULLIF(a.linkedid, ''), (SELECT NULLIF(u.uniqueid, '') FROM events u WHERE u.session = a.session "
            "AND u.event = 'session_start' ORDER BY u.id LIMIT 1), 'session ' || a.session)")
    conn.execute(
        f"INSERT INTO {_SCRATCH} SELECT a.session, a.ts, a.action, "
        f"COALESCE(NULLIF(a.endpoint, ''), '(unknown agent)'), {call}, "
        f"{kind_code} END) || {flags} || {outcome} FROM escalations a WHERE 1 = 1{bounds}", params)
    # Transfer results, from the transferred caller's hangup handler: a few in a hundred, read
    # through their own partial index (migration 8), which needs the path written as a literal.
    conn.execute(select.replace("{anchor}", "a.event = 'session_start'").replace(
        f"a.action IN ({', '.join('?' * len(paths))})", f"a.action = '{_RESULT_PATH}'"), params)
    # Sessions that ended before they learned the call (the caller hung up at once): rare.
    conn.execute(select.replace("{anchor}", "a.event = 'session_end' AND a.linkedid IS NULL"), (*params, *paths))


def _per_day(conn: Connection) -> tuple[dict[date, DayCount], dict[str, int], int]:
    """Escalations per UTC day and kind; escalations per outcome; transfers that moved nobody."""
    days: dict[date, DayCount] = {}
    outcomes: dict[str, int] = {}
    stayed = 0
    for day, state, count in conn.execute(
            f"SELECT substr(started, 1, 10), state, COUNT(*) FROM {_SCRATCH} WHERE action <> ? "
            f"GROUP BY substr(started, 1, 10), state", (_RESULT_PATH,)):
        kind, flags, outcome = _CODE_KINDS[state[0]], int(state[1:4]) - 100, state[4:]
        moment, count = date.fromisoformat(day), int(count)
        counts = days.setdefault(moment, DayCount(moment))
        setattr(counts, kind, getattr(counts, kind) + count)
        outcomes[outcome] = outcomes.get(outcome, 0) + count
        if kind in _TRANSFER_KINDS and not flags & _TRANSFERRED:
            stayed += count
    return days, dict(sorted(outcomes.items(), key=lambda item: (-item[1], item[0]))), stayed


def _per_agent(conn: Connection) -> list[AgentCount]:
    """Escalations per agent endpoint and kind, and the calls each agent escalated."""
    sums = ", ".join(f"SUM(CASE WHEN substr(state, 1, 1) = '{_KIND_CODES[k]}' THEN 1 ELSE 0 END)" for k in KINDS)
    agents = []
    for agent, calls, *counts in conn.execute(
            f"SELECT agent, COUNT(DISTINCT call), {sums} FROM {_SCRATCH} WHERE action <> ? GROUP BY agent",
            (_RESULT_PATH,)):
        n = dict(zip(KINDS, map(int, counts)))
        agents.append(AgentCount(agent, calls=int(calls), warnings=n["warning"] + n["final_warning"],
                                 final_warnings=n["final_warning"], supervisor=n["supervisor"],
                                 colleague=n["colleague"], ends=n["end"]))
    return sorted(agents, key=lambda a: (-a.total, -a.calls, a.agent))


def _transfer_results(conn: Connection, days: dict[date, DayCount]) -> dict[str, int]:
    """Each transfer that moved the caller, with the result its call's hangup handler recorded:
    a call's results go to its transfers first come first served, and each pair counts on the
    transfer's day; a result whose transfer is before the period is counted nowhere. Pairing is
    sequential, so it runs here, over the transfer rows alone (a few in a hundred)."""
    results = dict.fromkeys(TRANSFER_RESULTS, 0)
    codes = ", ".join(f"'{_KIND_CODES[k]}'" for k in _TRANSFER_KINDS)
    waiting: list[str] = []  # the days of the current call's transfers still waiting for a result
    call = None
    for key, started, code, flags in conn.execute(
            f"SELECT call, started, substr(state, 1, 1), {_FLAGS} FROM {_SCRATCH} "
            f"WHERE (substr(state, 1, 1) IN ({codes}) AND ({_FLAGS} & {_TRANSFERRED}) <> 0) "
            f"OR (substr(state, 1, 1) = 'r' AND ({_FLAGS} & {_RESULT}) <> 0) ORDER BY call, started, session"):
        if key != call:
            results["no_result"] += len(waiting)
            call, waiting = key, []
        if code != "r":
            waiting.append(started[:10])
            continue
        if not waiting:
            continue
        result = "answered" if int(flags) & _ANSWERED else "fallback"
        results[result] += 1
        moment = date.fromisoformat(waiting.pop(0))
        counts = days.setdefault(moment, DayCount(moment))
        if result == "answered":
            counts.transfers_answered += 1
        else:
            counts.transfers_fallback += 1
    results["no_result"] += len(waiting)
    return results


def _recent_calls(conn: Connection, limit: int) -> tuple[int, list[str]]:
    """How many calls had an escalation in the period, and the `limit` whose first escalation in
    it is the most recent.

    PostgreSQL groups the period's rows per call in one hash aggregate (0.3-0.5 s at 1M
    events). SQLite sorts to group, which is slower than this: index the rows, then read the
    newest ones, twice as many each time, until the oldest of them is older than the calls
    they give (all of those calls' rows are among them). Same calls, same order."""
    if conn.kind != "sqlite":
        rows = conn.execute(
            f"SELECT call, first, COUNT(*) OVER () FROM (SELECT call, MIN(started) AS first FROM {_SCRATCH} "
            f"WHERE action <> ? GROUP BY call) AS calls ORDER BY first DESC, call DESC LIMIT ?",
            (_RESULT_PATH, limit)).fetchall()
        return (int(rows[0][2]) if rows else 0), [row[0] for row in rows]
    conn.execute(f"CREATE INDEX {_SCRATCH}_started ON {_SCRATCH} (started)")
    conn.execute(f"CREATE INDEX {_SCRATCH}_call ON {_SCRATCH} (call, started)")
    (count,) = conn.execute(f"SELECT COUNT(DISTINCT call) FROM {_SCRATCH} WHERE action <> ?",
                            (_RESULT_PATH,)).fetchone()
    window = limit * 4
    while True:
        newest = conn.execute(f"SELECT call, started FROM {_SCRATCH} WHERE action <> ? "
                              "ORDER BY started DESC LIMIT ?", (_RESULT_PATH, window)).fetchall()
        keys = list(dict.fromkeys(key for key, _ in newest))
        firsts = []
        for chunk in range(0, len(keys), _CHUNK * 10):
            some = keys[chunk:chunk + _CHUNK * 10]
            firsts += conn.execute(
                f"SELECT call, MIN(started) FROM {_SCRATCH} WHERE action <> ? "
                f"AND call IN ({', '.join('?' * len(some))}) GROUP BY call", (_RESULT_PATH, *some)).fetchall()
        firsts.sort(key=lambda row: (row[1], row[0]), reverse=True)
        chosen = firsts[:limit]
        if len(newest) < window or not chosen or newest[-1][1] < chosen[-1][1] and len(chosen) == limit:
            return int(count), [key for key, _ in chosen]
        window *= 2


# --- the calls shown: their sessions' events, grouped into ladders ---------------------------


@dataclass
class _Session:
    id: str = ""
    action: str = ""
    agent: str = ""
    linkedid: str = ""
    uniqueid: str = ""
    caller_number: str = ""
    caller_name: str = ""
    started: datetime | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    outcome: str = ""
    error: str = ""


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _parse_ts(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return _utc(datetime.fromisoformat(value))
    except ValueError:
        return None


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def _recent_sessions(conn: Connection, calls: list[str]) -> list[tuple[str, _Session]]:
    """The sessions of these calls in the period, as (call, session), oldest first."""
    shown = []
    for chunk in range(0, len(calls), _CHUNK):
        keys = calls[chunk:chunk + _CHUNK]
        shown += conn.execute(
            f"SELECT session, call, started, action, substr(state, 5) FROM {_SCRATCH} "
            f"WHERE call IN ({', '.join('?' * len(keys))})", keys).fetchall()
    shown.sort(key=lambda row: (row[2], row[0]))
    events: dict[str, list[tuple[str, str]]] = {}
    for chunk in range(0, len(shown), _CHUNK):
        ids = [row[0] for row in shown[chunk:chunk + _CHUNK]]
        for sid, kind, data in conn.execute(
                f"SELECT session, event, data FROM events WHERE session IN ({', '.join('?' * len(ids))}) "
                "AND event IN ('session_start', 'step', 'session_end') ORDER BY id", ids):
            events.setdefault(sid, []).append((kind, data))
    rows = [(call, sid, started, action, outcome, kind, data)
            for sid, call, started, action, outcome in shown for kind, data in events.get(sid, [])]
    sessions: dict[str, tuple[str, _Session]] = {}
    for call, sid, started, action, outcome, kind, data in rows:
        if sid not in sessions:
            sessions[sid] = (call, _Session(id=sid, action=action, started=_parse_ts(started),
                                            outcome="" if outcome == "unfinished" else outcome))
        session = sessions[sid][1]
        try:
            event = json.loads(data)
        except (TypeError, ValueError):
            continue
        if not isinstance(event, dict):
            continue
        for name in ("agent", "linkedid", "uniqueid", "caller_number", "caller_name"):
            if not getattr(session, name) and event.get(name):
                setattr(session, name, _str(event.get(name)))
        if kind == "step":
            session.steps.append(event)
        elif kind == "session_end":
            session.error = _str(event.get("error"))
    return list(sessions.values())


def _step(session: _Session, name: str) -> dict[str, Any] | None:
    for step in session.steps:
        if step.get("step") == name:
            return step
    return None


def _escalation(session: _Session, escalation: catalog.Escalation) -> Step:
    """What this key press was, as a ladder step."""
    outcome = session.outcome or "unfinished"
    kind, label = escalation.kind, escalation.ladder
    if session.action == catalog.WARN.path:
        played = _step(session, WARNING_PLAYED)
        if _step(session, LADDER_EXHAUSTED) is not None:
            kind, label = "end", "end (after the last warning)"
        elif played is not None:
            label = f"warn {_str(played.get('warning'))}".strip()
            if played.get("final") is True:
                kind, label = "final_warning", label + " (final)"
    elif session.action == catalog.COLLEAGUE_KEYED.path:
        keyed = _step(session, EXTENSION_KEYED)
        if keyed is not None:
            label = f"colleague {_str(keyed.get('extension'))}"
        elif _step(session, EXTENSION_REJECTED) is not None:
            label = "colleague (extension rejected)"
    return Step(kind=kind, label=label, at=session.started, agent=endpoint(session.agent),
                outcome=outcome, error=session.error,
                transferred=_step(session, CALLER_TRANSFERRED) is not None)


def _transfer_result(step: dict[str, Any]) -> tuple[str, str]:
    status = _str(step.get("dial_status")) or "UNKNOWN"
    if step.get("answered") is True:
        return "answered", "answered"
    fallback = _str(step.get("fallback"))
    return "fallback", f"{status.lower()} → {fallback}" if fallback else status.lower()


def _ladders(sessions: list[tuple[str, _Session]]) -> list[Call]:
    """Sessions grouped into calls, each transfer result attached to the transfer it ended
    (first come first served, as the counts match them), most recent call first."""
    calls: dict[str, Call] = {}
    pending: dict[str, list[Step]] = {}  # transfers on a call still waiting for their result
    for key, session in sessions:
        call = calls.get(key)
        if call is None:
            call = calls[key] = Call(key=key, linkedid=session.linkedid, started=session.started)
        call.caller_number = call.caller_number or session.caller_number
        call.caller_name = call.caller_name or session.caller_name
        escalation = _ESCALATION_PATHS.get(session.action)
        if escalation is None:  # a transfer's result, from the transferred caller's hangup handler
            recorded = _step(session, TRANSFER_RESULT)
            if recorded is None:
                continue
            result, result_label = _transfer_result(recorded)
            waiting = pending.get(key)
            if waiting:
                transfer = waiting.pop(0)
                transfer.result, transfer.result_label = result, result_label
            else:  # its transfer is before the period
                target = _str(recorded.get("target")) or "transfer"
                call.steps.append(Step(kind="result", label=f"{target} result", at=session.started,
                                       agent="", outcome="completed", result=result, result_label=result_label))
            continue
        step = _escalation(session, escalation)
        if not call.steps or all(s.kind == "result" for s in call.steps):
            call.started = step.at
        call.steps.append(step)
        if step.kind in _TRANSFER_KINDS and step.transferred:
            pending.setdefault(key, []).append(step)
        agent = step.agent or "(unknown agent)"
        if agent not in call.agents:
            call.agents.append(agent)
    escalated = [call for call in calls.values() if any(s.kind != "result" for s in call.steps)]
    return sorted(escalated, key=lambda c: (c.started, c.key), reverse=True)


def _day_range(days: dict[date, DayCount], since: datetime | None, until: datetime | None,
               now: datetime) -> tuple[date | None, date | None, list[DayCount]]:
    first_day = since.date() if since else (min(days) if days else None)
    if until is not None:
        last_day = (until - timedelta(microseconds=1)).date()
    else:
        last_day = max([now.date(), *days]) if first_day else None
    day_list = []
    if first_day is not None and last_day is not None:
        current = first_day
        while current <= last_day:
            day_list.append(days.get(current, DayCount(current)))
            current += timedelta(days=1)
    return first_day, last_day, day_list


def build_report(
    db: Database,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    now: datetime | None = None,
    console_url: str | None = None,
    calls_shown: int = CALLS_SHOWN,
) -> Report:
    """Count the escalations recorded in the store from `since` (inclusive) to `until`
    (exclusive), and read the ladders of the `calls_shown` most recent calls."""
    since, until = _utc(since), _utc(until)
    now = _utc(now) or datetime.now(timezone.utc)
    conn = db.connect()
    try:
        if not _has_events(conn):
            days, agents, outcomes, transfers, count, calls = {}, [], {}, dict.fromkeys(TRANSFER_RESULTS, 0), 0, []
        else:
            _collect(conn, as_ts(since) if since else None, as_ts(until) if until else None)
            days, outcomes, stayed = _per_day(conn)
            agents = _per_agent(conn)
            transfers = _transfer_results(conn, days)
            transfers["not_transferred"] = stayed
            count, keys = _recent_calls(conn, calls_shown)
            calls = _ladders(_recent_sessions(conn, keys))
    finally:
        conn.close()
    first_day, last_day, day_list = _day_range(days, since, until, now)
    return Report(
        since=since,
        until=until,
        generated_at=now,
        first_day=first_day,
        last_day=last_day,
        days=day_list,
        agents=agents,
        outcomes=outcomes,
        transfer_results=transfers,
        calls=calls,
        call_count=count,
        console_url=console_url.rstrip("/") if console_url else None,
    )


def _has_events(conn: Connection) -> bool:
    """False for a store whose schema was never created (an empty file)."""
    if conn.kind == "sqlite":
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone() is not None
    return conn.execute("SELECT to_regclass('events')").fetchone()[0] is not None


# ---------------------------------------------------------------------------------------------
# The page


def _esc(value: Any) -> str:
    """Audit text as HTML: escaped, with control and bidi-override characters made visible."""
    text = _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", _str(value))
    return html.escape(text, quote=True)


def _n(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _nice_max(value: int) -> tuple[int, int]:
    """An axis maximum ≥ value and a tick step, both round numbers, with at most ~5 ticks."""
    value = max(value, 1)
    magnitude = 10 ** max(0, math.floor(math.log10(value)) - 1)
    for step in (1, 2, 5, 10, 20, 25, 50, 100):
        step *= magnitude
        if math.ceil(value / step) <= 5:
            return math.ceil(value / step) * step, step
    return value, value  # unreachable for positive ints


def _day_label(day: date) -> str:
    return f"{day:%b} {day.day}"


def _period(report: Report) -> str:
    if report.first_day is None:
        return "no events recorded yet"
    first, last = report.first_day, report.last_day or report.first_day
    text = f"{first:%a} {first.day} {first:%b %Y} – {last:%a} {last.day} {last:%b %Y}"
    return f"{text} (UTC, {_plural(len(report.days), 'day')})"


def _legend(items: Iterable[tuple[str, str, str]]) -> str:
    parts = [
        f'<span class="key"><span class="swatch" style="background:{colour}"></span>{_esc(label)}'
        f'{f" <b>{_esc(count)}</b>" if count != "" else ""}</span>'
        for label, colour, count in items
    ]
    return f'<div class="legend">{"".join(parts)}</div>'


def _daily_chart(report: Report) -> str:
    width, height = 1040, 280
    left, right, top, bottom = 44, 12, 22, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    days = report.days
    top_value, step = _nice_max(max((d.total for d in days), default=0))
    slot = plot_w / max(len(days), 1)
    bar_w = slot * (0.72 if slot >= 6 else 0.9)
    out = [f'<svg class="chart daily" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="Escalations per day" xmlns="http://www.w3.org/2000/svg">']
    for tick in range(0, top_value + 1, step):
        y = top + plot_h - tick / top_value * plot_h
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{_n(y)}" y2="{_n(y)}"/>')
        out.append(f'<text class="axis" x="{left - 8}" y="{_n(y + 4)}" text-anchor="end">{tick}</text>')
    label_every = max(1, math.ceil(len(days) / max(1, plot_w // 58)))
    for index, day in enumerate(days):
        x = left + index * slot + (slot - bar_w) / 2
        y = top + plot_h
        for kind in KINDS:
            count = getattr(day, kind)
            if not count:
                continue
            h = count / top_value * plot_h
            y -= h
            out.append(
                f'<rect class="bar bar-{kind}" x="{_n(x)}" y="{_n(y)}" width="{_n(bar_w)}" height="{_n(h)}" '
                f'fill="{KIND_COLOURS[kind]}"><title>{day.day.isoformat()}: '
                f'{_esc(_plural(count, KIND_LABELS[kind]))}</title></rect>'
            )
        if day.total and slot >= 16:
            out.append(f'<text class="value" x="{_n(x + bar_w / 2)}" y="{_n(y - 5)}" '
                       f'text-anchor="middle">{day.total}</text>')
        if index % label_every == 0:
            out.append(f'<text class="axis day" x="{_n(left + index * slot + slot / 2)}" y="{height - bottom + 18}" '
                       f'text-anchor="middle">{_day_label(day.day)}</text>')
    out.append(f'<line class="baseline" x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}"/>')
    out.append("</svg>")
    return "".join(out)


def _agent_chart(agents: list[AgentCount]) -> str:
    row, label_w, value_w, width = 30, 230, 56, 1040
    top = 6
    height = top * 2 + row * len(agents)
    plot_w = width - label_w - value_w
    top_value = max((a.total for a in agents), default=1) or 1
    out = [f'<svg class="chart agents" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="Escalations per agent" xmlns="http://www.w3.org/2000/svg">']
    for index, agent in enumerate(agents):
        y = top + index * row
        name = agent.agent if len(agent.agent) <= 30 else agent.agent[:29] + "…"
        out.append(f'<text class="name" x="{label_w - 12}" y="{y + row / 2 + 5}" text-anchor="end">'
                   f'<title>{_esc(agent.agent)}</title>{_esc(name)}</text>')
        x = float(label_w)
        parts = (("warning", agent.warnings - agent.final_warnings), ("final_warning", agent.final_warnings),
                 ("supervisor", agent.supervisor), ("colleague", agent.colleague), ("end", agent.ends))
        for kind, count in parts:
            if not count:
                continue
            w = count / top_value * plot_w
            out.append(f'<rect class="bar bar-{kind}" x="{_n(x)}" y="{y + 6}" width="{_n(w)}" height="{row - 12}" '
                       f'fill="{KIND_COLOURS[kind]}"><title>{_esc(agent.agent)}: '
                       f'{_esc(_plural(count, KIND_LABELS[kind]))}</title></rect>')
            x += w
        out.append(f'<text class="value" x="{_n(x + 8)}" y="{y + row / 2 + 5}">{agent.total}</text>')
    out.append("</svg>")
    return "".join(out)


def _share_bar(name: str, parts: list[tuple[str, int, str]]) -> str:
    """A single 100% bar: how a total splits (outcomes, transfer results)."""
    width, height = 1040, 26
    total = sum(count for _, count, _ in parts) or 1
    out = [f'<svg class="chart share {name}" viewBox="0 0 {width} {height}" preserveAspectRatio="none" '
           f'role="img" aria-label="{_esc(name)}" xmlns="http://www.w3.org/2000/svg">']
    x = 0.0
    for label, count, colour in parts:
        if not count:
            continue
        w = count / total * width
        out.append(f'<rect class="bar" x="{_n(x)}" y="0" width="{_n(w)}" height="{height}" fill="{colour}">'
                   f'<title>{_esc(label)}: {count}</title></rect>')
        x += w
    out.append("</svg>")
    return "".join(out)


def _tile(number: int, label: str, detail: str = "") -> str:
    detail_html = f'<div class="detail">{_esc(detail)}</div>' if detail else ""
    return (f'<div class="tile"><div class="number">{number}</div>'
            f'<div class="label">{_esc(label)}</div>{detail_html}</div>')


def _outcome_section(report: Report) -> str:
    groups = report.outcome_groups()
    parts = [(OUTCOME_LABELS[g], groups[g], OUTCOME_COLOURS[g]) for g in OUTCOME_GROUPS]
    failures = [(o, c) for o, c in report.outcomes.items() if outcome_group(o) == "failures"]
    failure_list = ""
    if failures:
        items = "".join(f"<li><code>{_esc(o)}</code> {c}</li>" for o, c in failures)
        failure_list = f'<p class="note">Other failures, as recorded:</p><ul class="failures">{items}</ul>'
    transfers = report.transfer_results
    transfer_html = ""
    if sum(transfers.values()):
        tparts = [(TRANSFER_LABELS[r], transfers[r], TRANSFER_COLOURS[r]) for r in TRANSFER_RESULTS]
        transfer_html = (
            '<h3>Transfers: did someone pick up?</h3>'
            + _share_bar("transfer-results", tparts)
            + _legend((label, colour, count) for label, count, colour in tparts)
        )
    return (
        '<h3>How each escalation went</h3>'
        + _share_bar("outcomes", parts)
        + _legend((label, colour, count) for label, count, colour in parts)
        + failure_list
        + transfer_html
    )


def _ladder_html(call: Call) -> str:
    chips = []
    for step in call.steps:
        classes = f"step step-{step.kind}"
        if step.outcome != "completed":
            classes += " failed"
        title = f"{step.at:%Y-%m-%d %H:%M:%S} UTC"
        if step.agent:
            title += f" by {step.agent}"
        if step.error:
            title += f": {step.error}"
        text = _esc(step.label)
        if step.result_label:
            text += f' <span class="result result-{_esc(step.result)}">{_esc(step.result_label)}</span>'
        if step.outcome != "completed":
            text += f' <span class="outcome-note">{_esc(step.outcome)}</span>'
        chips.append(f'<span class="{classes}" title="{_esc(title)}">{text}</span>')
    return '<span class="arrow">→</span>'.join(chips)


def _call_link(report: Report, call: Call) -> str:
    """The call's linkedid, as a link to its page in the console when `[console] url` is set."""
    if not report.console_url or not call.linkedid:
        return _esc(call.linkedid)
    href = f"{report.console_url}/calls/{quote(call.linkedid, safe='')}"
    return f'<a href="{_esc(href)}">{_esc(call.linkedid)}</a>'


def _calls_table(report: Report) -> str:
    rows = []
    for call in report.calls[:CALLS_SHOWN]:
        outcome = call.outcome
        name = f'<div class="sub"><bdi>{_esc(call.caller_name)}</bdi></div>' if call.caller_name else ""
        rows.append(
            "<tr>"
            f'<td class="when">{call.started:%Y-%m-%d %H:%M}<div class="sub mono">{_call_link(report, call)}</div></td>'
            f'<td class="caller"><bdi class="mono">{_esc(call.caller_number) or "—"}</bdi>{name}</td>'
            f'<td class="agent mono">{"<br>".join(_esc(a) for a in call.agents)}</td>'
            f'<td class="ladder">{_ladder_html(call)}</td>'
            f'<td><span class="badge badge-{outcome_group(outcome)}">{_esc(outcome)}</span></td>'
            "</tr>"
        )
    shown = len(rows)
    if report.call_count > shown:
        where = (f'open <a href="{_esc(report.console_url)}/calls">the console</a> to find any call, or use '
                 if report.console_url else "use ")
        note = (f'<p class="note">Showing the {shown} most recent of {report.call_count} calls; '
                f'{where}<code>calmline report --days</code> for a shorter period.</p>')
    else:
        note = ""
    return (
        f'{note}<table class="calls"><thead><tr><th>Started (UTC)</th><th>Caller</th><th>Agent</th>'
        f'<th>What happened</th><th>Outcome</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _agent_table(agents: list[AgentCount]) -> str:
    rows = "".join(
        f'<tr><td class="mono">{_esc(a.agent)}</td><td class="num">{a.calls}</td>'
        f'<td class="num">{a.warnings}</td><td class="num">{a.final_warnings}</td>'
        f'<td class="num">{a.transfers}</td><td class="num">{a.ends}</td></tr>'
        for a in agents
    )
    return ('<details><summary>Per-agent numbers</summary><table class="agents-table"><thead><tr><th>Agent</th>'
            '<th class="num">Calls escalated</th><th class="num">Warnings</th><th class="num">of them final</th>'
            '<th class="num">Transfers</th><th class="num">Ends</th></tr></thead>'
            f'<tbody>{rows}</tbody></table></details>')


_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f3ef; color: #2d3136; font: 15px/1.5 "Segoe UI", system-ui, -apple-system,
  "Liberation Sans", "DejaVu Sans", sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 24px 48px; }
header h1 { font-size: 26px; font-weight: 600; margin: 0 0 4px; letter-spacing: .01em; }
header p { margin: 0; color: #5f656b; }
section { background: #fff; border: 1px solid #e3e1da; border-radius: 12px; padding: 18px 22px 20px; margin-top: 20px; }
h2 { font-size: 18px; font-weight: 600; margin: 0 0 4px; }
h3 { font-size: 15px; font-weight: 600; margin: 18px 0 6px; color: #3e444a; }
h3:first-child { margin-top: 0; }
.note { color: #6b7176; font-size: 13.5px; margin: 2px 0 10px; }
.tiles { display: grid; grid-template-columns: repeat(4, 1fr); gap: 14px; margin-top: 20px; }
.tile { background: #fff; border: 1px solid #e3e1da; border-radius: 12px; padding: 14px 18px; }
.tile .number { font-size: 30px; font-weight: 600; line-height: 1.2; }
.tile .label { color: #4a5056; }
.tile .detail { color: #7a8086; font-size: 13px; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 18px; margin: 8px 0 4px; font-size: 13.5px; color: #40464c; }
.key { display: inline-flex; align-items: center; gap: 6px; }
.swatch { width: 12px; height: 12px; border-radius: 3px; display: inline-block; }
svg.chart { display: block; width: 100%; height: auto; margin-top: 8px; }
svg.share { height: 26px; border-radius: 6px; overflow: hidden; }
svg text { font-family: "Segoe UI", system-ui, "Liberation Sans", "DejaVu Sans", sans-serif; }
svg .axis { font-size: 12px; fill: #7a8086; }
svg .value { font-size: 12px; fill: #40464c; font-weight: 600; }
svg .name { font-size: 13.5px; fill: #2d3136; }
svg .grid { stroke: #ecebe6; stroke-width: 1; }
svg .baseline { stroke: #b9b7ae; stroke-width: 1; }
ul.failures { margin: 0; padding-left: 20px; font-size: 13.5px; }
table { width: 100%; border-collapse: collapse; font-size: 14px; }
th { text-align: left; font-weight: 600; color: #5a6066; font-size: 13px; border-bottom: 1px solid #dddbd3;
  padding: 6px 8px; }
td { border-bottom: 1px solid #efeee9; padding: 8px; vertical-align: top; }
tbody tr:nth-child(even) td { background: #fbfaf7; }
td.when { white-space: nowrap; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.mono { font-family: "DejaVu Sans Mono", "Liberation Mono", ui-monospace, monospace; font-size: 12.5px; }
.sub { color: #7a8086; font-size: 12.5px; overflow-wrap: anywhere; }
td.caller { min-width: 170px; max-width: 240px; overflow-wrap: anywhere; }
td.agent { overflow-wrap: break-word; min-width: 150px; }
td.ladder { line-height: 2; }
.step { display: inline-block; padding: 0 8px; border-radius: 6px; font-size: 13px; line-height: 1.7;
  border: 1px solid transparent; white-space: nowrap; }
.step-warning { background: #fbf1d2; border-color: #eedb9f; }
.step-final_warning { background: #f5dfbd; border-color: #dcb274; }
.step-supervisor, .step-colleague, .step-result { background: #e3edf6; border-color: #bcd0e3; }
.step-end { background: #ebe6f2; border-color: #cdc3dd; }
.step.failed { border-style: dashed; border-color: #c46a62; }
.step .result { color: #3d6a92; }
.step .result-fallback { color: #8a6420; }
.step .outcome-note { color: #a6493f; font-size: 12px; }
.arrow { color: #a3a8ad; margin: 0 5px; }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12.5px; white-space: nowrap; }
.badge-completed { background: #e4efe4; color: #35613a; }
.badge-caller_hung_up { background: #eeeeea; color: #55595d; }
.badge-prompt_missing { background: #f8e8d2; color: #85531a; }
.badge-failures { background: #f6e0dd; color: #8e3b33; }
details { margin-top: 14px; }
summary { cursor: pointer; color: #4a5056; }
.agents-table { margin-top: 8px; }
.empty { text-align: center; padding: 56px 22px; }
.empty h2 { font-size: 22px; }
footer { margin-top: 22px; color: #8a9096; font-size: 12.5px; }
"""


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, no scripts)."""
    generated = f"{report.generated_at:%Y-%m-%d %H:%M} UTC"
    head = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # Even a missed escape could not run a script or fetch anything from this page.
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        f"<title>calmline report: {_esc(_period(report))}</title><style>{_CSS}</style></head><body><main>"
        f'<header><h1>Abusive-call escalations</h1><p class="period">{_esc(_period(report))}</p></header>'
    )
    foot = (f'<footer>Generated {generated} by <code>calmline report</code> from the audit trail. '
            "Each escalation is one key press by an agent; days are UTC.</footer></main></body></html>\n")
    if report.empty:
        return head + (
            '<section class="empty"><h2>No escalations in this period</h2>'
            '<p class="note">No agent pressed a calmline code between these dates, '
            "or the audit trail has no events for them.</p></section>"
        ) + foot

    totals = report.totals()
    transfers = report.transfer_results
    tiles = (
        '<div class="tiles">'
        + _tile(report.call_count, "calls escalated", _plural(report.escalations, "key press", "key presses"))
        + _tile(totals.warnings, "warnings", f"{totals.final_warning} final")
        + _tile(totals.transfers, "transfers",
                f"{transfers['answered']} answered, {transfers['fallback']} to fallback")
        + _tile(totals.end, "calls ended by agents")
        + "</div>"
    )
    kind_totals = [(KIND_LABELS[k], KIND_COLOURS[k], getattr(totals, k)) for k in KINDS]
    daily = (
        '<section class="per-day"><h2>Escalations per day</h2>'
        '<p class="note">A change in policy or in callers shows here first.</p>'
        + _legend(kind_totals) + _daily_chart(report) + "</section>"
    )
    charted = report.agents[:AGENTS_CHARTED]
    more = len(report.agents) - len(charted)
    agents = (
        '<section class="per-agent"><h2>Escalations per agent</h2>'
        f'<p class="note">Key presses by agent endpoint'
        f'{f", the {len(charted)} busiest of {len(report.agents)}" if more else ""}.</p>'
        + _legend((KIND_LABELS[k], KIND_COLOURS[k], "") for k in KINDS)
        + _agent_chart(charted) + _agent_table(report.agents) + "</section>"
    )
    outcomes = f'<section class="outcomes"><h2>Outcomes</h2>{_outcome_section(report)}</section>'
    calls = (
        '<section class="calls-section"><h2>Calls</h2>'
        '<p class="note">Most recent first. Hover a step for its time, agent and any error; '
        "<code>calmline audit --linkedid ID</code> shows every event of a call.</p>"
        + _calls_table(report) + "</section>"
    )
    return head + tiles + daily + agents + outcomes + calls + foot
