"""What the console's pages read, as SQL both engines run, over the store's indexes.

An *escalation* is one session whose action is an escalation (warn, a transfer, end): a row
of `escalations`, which triggers on `events` keep (its kind comes from the action and, for
a warning, from its steps: a final warning, or the ladder run out into an end). A *call* is
one linkedid. Every query is bounded by a time range, a linkedid, a caller number, a
session or a page on an index, and aggregates in SQL: nothing reads a table whole into Python.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta, timezone
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from calmline.audit.history import ESCALATION_PATHS, WITHHELD, WITHHELD_SQL, as_ts, period_sql
from calmline.store import Connection
from calmline.store.schema import endpoint

KINDS = ("warning", "final_warning", "transfer", "end")
KIND_LABELS = {"warning": "warning", "final_warning": "final warning", "transfer": "transfer",
               "supervisor": "transfer to supervisor", "colleague": "transfer to colleague", "end": "end"}
OUTCOMES = ("completed", "caller_hung_up", "prompt_missing", "other")
MAIL_STATUSES = ("pending", "sent", "failed", "none")
SORTS = {"started": "MIN(e.ts)", "last": "MAX(e.ts)", "caller": "MAX(e.caller_number)",
         "presses": "COUNT(*)"}

# Escalations are rows of the `escalations` table (schema migration 6), which triggers on
# `events` keep: its kind, agent endpoint and outcome are columns, so filters are plain
# comparisons on indexed columns.
_OTHER_OUTCOME = "(e.outcome IS NULL OR e.outcome NOT IN ('completed', 'caller_hung_up', 'prompt_missing'))"
_KIND_WHERE = {
    "warning": "e.kind = 'warning'",
    "final_warning": "e.kind = 'final_warning'",
    "transfer": "e.kind IN ('supervisor', 'colleague')",
    "end": "e.kind = 'end'",
}
KIND_GROUP_SQL = "CASE WHEN e.kind IN ('supervisor', 'colleague') THEN 'transfer' ELSE e.kind END"


def kind_group(kind: str) -> str:
    return "transfer" if kind in ("supervisor", "colleague") else kind


def _like(text: str) -> str:
    return "%" + text.lower().replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"


# ---------------------------------------------------------------------------------------------
# Filters


@dataclass(frozen=True)
class Filters:
    """The /calls filters as the query string carries them; `since`/`until` are local dates
    (or date-times), `until` inclusive of its day."""

    since: str = ""
    until: str = ""
    agent: str = ""
    caller: str = ""
    number: str = ""
    kind: str = ""
    outcome: str = ""
    mail: str = ""
    sort: str = "started"
    order: str = "desc"
    page: int = 1
    problems: tuple[str, ...] = ()

    @classmethod
    def parse(cls, query: Any, zone: ZoneInfo, *, default_days: int | None = 30,
              now: datetime | None = None) -> Filters:
        problems = []

        def get(name: str, allowed: tuple[str, ...] | None = None) -> str:
            value = (query.get(name) or "").strip()[:200]
            if allowed is not None and value and value not in allowed:
                problems.append(f"{name}: {value!r} is not one of {', '.join(allowed)}")
                return ""
            return value

        if "since" in query or default_days is None:
            since = get("since")
        else:  # no since at all (not an empty one): the last `default_days` days
            today = (datetime.now(zone) if now is None else now.astimezone(zone)).date()
            since = (today - timedelta(days=default_days - 1)).isoformat()
        try:
            page = max(1, min(int(query.get("page") or 1), 1_000_000))
        except ValueError:
            page = 1
        filters = cls(since=since, until=get("until"), agent=get("agent"), caller=get("caller"),
                      number=get("number"), kind=get("kind", KINDS), outcome=get("outcome", OUTCOMES),
                      mail=get("mail", MAIL_STATUSES), sort=get("sort", tuple(SORTS)) or "started",
                      order=get("order", ("asc", "desc")) or "desc", page=page)
        for name in ("since", "until"):
            try:
                _moment(getattr(filters, name), zone, name == "until")
            except ValueError:
                problems.append(f"{name}: {getattr(filters, name)!r} is not a date; write 2026-05-01 "
                                "or 2026-05-01T09:30")
                filters = replace(filters, **{name: ""})
        return replace(filters, problems=tuple(problems))

    def bounds(self, zone: ZoneInfo) -> tuple[datetime | None, datetime | None]:
        return _moment(self.since, zone, False), _moment(self.until, zone, True)

    def query(self, **changes: Any) -> str:
        """The query string of these filters (with changes), for links and the CSV."""
        values = {**{k: getattr(self, k) for k in ("since", "until", "agent", "caller", "number", "kind",
                                                  "outcome", "mail", "sort", "order", "page")}, **changes}
        if values["sort"] == "started":
            values.pop("sort")
        if values["order"] == "desc":
            values.pop("order")
        if values["page"] == 1:
            values.pop("page")
        out = {k: v for k, v in values.items() if v not in ("", None) or k == "since"}
        return urlencode(out)

    def where(self, zone: ZoneInfo) -> tuple[str, list[Any]]:
        """The WHERE clause over escalations `e`, and its parameters."""
        period, params = period_sql("e.ts", *self.bounds(zone))
        sql = ["1 = 1" + period]
        if self.number:
            sql.append("e.caller_number = ?")
            params.append(self.number)
        if self.caller:
            sql.append("(lower(COALESCE(e.caller_number, '')) LIKE ? ESCAPE '!' "
                       "OR lower(COALESCE(e.caller_name, '')) LIKE ? ESCAPE '!')")
            params += [_like(self.caller)] * 2
        if self.agent:
            sql.append("e.endpoint = ?")
            params.append(self.agent)
        if self.kind:
            sql.append(_KIND_WHERE[self.kind])
        if self.outcome == "other":
            sql.append(_OTHER_OUTCOME)
        elif self.outcome:
            sql.append("e.outcome = ?")
            params.append(self.outcome)
        if self.mail == "none":
            sql.append("NOT EXISTS (SELECT 1 FROM outbox o WHERE o.linkedid = e.linkedid AND o.kind = 'team')")
        elif self.mail:
            sql.append("EXISTS (SELECT 1 FROM outbox o WHERE o.linkedid = e.linkedid AND o.kind = 'team' "
                       "AND o.status = ?)")
            params.append(self.mail)
        return " AND ".join(sql), params


def _moment(text: str, zone: ZoneInfo, end: bool) -> datetime | None:
    """A local date (its midnight; with `end`, the next midnight) or date-time, in UTC."""
    if not text:
        return None
    if len(text) == 10:
        day = date.fromisoformat(text)
        local = datetime.combine(day + timedelta(days=1) if end else day, time.min, zone)
    else:
        local = datetime.fromisoformat(text)
        local = local.replace(tzinfo=zone) if local.tzinfo is None else local
        if end and local.second == 0 and local.microsecond == 0 and "T" in text and text.count(":") == 1:
            local += timedelta(minutes=1)  # 09:30 means up to the end of that minute
    return local.astimezone(timezone.utc)


# ---------------------------------------------------------------------------------------------
# Calls


@dataclass
class Escalation:
    ts: str
    session: str
    action: str
    agent: str
    kind: str
    outcome: str


@dataclass
class CallRow:
    linkedid: str
    started: str
    last: str
    presses: int
    caller_number: str
    caller_name: str
    escalations: list[Escalation] = field(default_factory=list)
    mail: str = ""  # the team's callback mail: pending, sent, failed or "" (none)
    caller_mail: str = ""

    @property
    def agents(self) -> list[str]:
        return list(dict.fromkeys(endpoint(e.agent) for e in self.escalations if e.agent))

    @property
    def outcome(self) -> str:
        return self.escalations[-1].outcome if self.escalations else ""


def _calls_sql(filters: Filters, zone: ZoneInfo) -> tuple[str, list[Any]]:
    where, params = filters.where(zone)
    order = "DESC" if filters.order == "desc" else "ASC"
    sql = (f"SELECT e.linkedid, MIN(e.ts), MAX(e.ts), COUNT(*), MAX(e.caller_number) "
           f"FROM escalations e WHERE {where} GROUP BY e.linkedid "
           f"ORDER BY {SORTS[filters.sort]} {order}, e.linkedid {order}")
    return sql, params


def _browsing(filters: Filters) -> bool:
    """Only a time range, sorted by the first or the last escalation: the list a supervisor
    pages through, answered from the time index without grouping the whole range."""
    return filters.sort in ("started", "last") and not (
        filters.agent or filters.caller or filters.number or filters.kind or filters.outcome or filters.mail)


def _edges_sql(filters: Filters, zone: ZoneInfo) -> tuple[str, list[Any]]:
    """Each call's first (or last) escalation in the range, in page order: the rows of the
    time index with no earlier (later) escalation of their call in the range, so a page reads
    about its offset plus its size of index entries, each with one probe by linkedid."""
    where, params = filters.where(zone)
    inner, inner_params = period_sql("p.ts", *filters.bounds(zone))
    before = "<" if filters.sort == "started" else ">"
    order = "DESC" if filters.order == "desc" else "ASC"
    sql = (f"SELECT e.linkedid FROM escalations e WHERE {where} AND e.linkedid IS NOT NULL "
           f"AND NOT EXISTS (SELECT 1 FROM escalations p WHERE p.linkedid = e.linkedid{inner} "
           f"AND (p.ts {before} e.ts OR (p.ts = e.ts AND p.id {before} e.id))) "
           f"ORDER BY e.ts {order}, e.linkedid {order}")
    return sql, [*params, *inner_params]


def _summaries(conn: Connection, filters: Filters, zone: ZoneInfo, linkedids: list[str]) -> list[CallRow]:
    """The calls' rows (first and last escalation in the range, presses), in the given order."""
    if not linkedids:
        return []
    where, params = filters.where(zone)
    found = {r[0]: CallRow(r[0], r[1], r[2], int(r[3]), r[4] or "", "") for r in conn.execute(
        f"SELECT e.linkedid, MIN(e.ts), MAX(e.ts), COUNT(*), MAX(e.caller_number) FROM escalations e "
        f"WHERE {where} AND e.linkedid IN ({', '.join('?' * len(linkedids))}) GROUP BY e.linkedid",
        (*params, *linkedids)).fetchall()}
    calls = [found[i] for i in linkedids if i in found]
    _details(conn, calls)
    return calls


def count_calls(conn: Connection, filters: Filters, zone: ZoneInfo) -> int:
    where, params = filters.where(zone)
    return int(conn.execute(f"SELECT COUNT(DISTINCT e.linkedid) FROM escalations e WHERE {where}",
                            params).fetchone()[0] or 0)


def calls_page(conn: Connection, filters: Filters, zone: ZoneInfo, size: int) -> list[CallRow]:
    offset = (filters.page - 1) * size
    if _browsing(filters):
        sql, params = _edges_sql(filters, zone)
        ids = [r[0] for r in conn.execute(sql + " LIMIT ? OFFSET ?", (*params, size, offset)).fetchall()]
        return _summaries(conn, filters, zone, ids)
    sql, params = _calls_sql(filters, zone)
    rows = conn.execute(sql + " LIMIT ? OFFSET ?", (*params, size, offset)).fetchall()
    calls = [CallRow(r[0], r[1], r[2], int(r[3]), r[4] or "", "") for r in rows]
    _details(conn, calls)
    return calls


def iter_calls(conn: Connection, filters: Filters, zone: ZoneInfo, chunk: int = 500) -> Iterator[CallRow]:
    """Every call of the filtered set, in the page order, a chunk at a time."""
    if _browsing(filters):
        sql, params = _edges_sql(filters, zone)
        for rows in conn.stream(sql, params, chunk):
            yield from _summaries(conn, filters, zone, [r[0] for r in rows])
        return
    sql, params = _calls_sql(filters, zone)
    for rows in conn.stream(sql, params, chunk):
        calls = [CallRow(r[0], r[1], r[2], int(r[3]), r[4] or "", "") for r in rows]
        _details(conn, calls)
        yield from calls


def _details(conn: Connection, calls: list[CallRow]) -> None:
    """Each call's escalations (all of them, whatever matched) and its mail, in two queries."""
    if not calls:
        return
    by_id = {c.linkedid: c for c in calls}
    marks = ", ".join("?" * len(by_id))
    rows = conn.execute(
        f"SELECT e.linkedid, e.ts, e.session, e.action, e.agent, e.kind, e.outcome, e.caller_number, e.caller_name "
        f"FROM escalations e WHERE e.linkedid IN ({marks}) ORDER BY e.ts, e.id", tuple(by_id)).fetchall()
    for r in rows:
        call = by_id[r[0]]
        call.caller_number = call.caller_number or r[7] or ""
        call.caller_name = call.caller_name or r[8] or ""
        call.escalations.append(Escalation(r[1], r[2] or "", r[3] or "", r[4] or "", r[5],
                                                  r[6] or "unfinished"))
    for linkedid, kind, status in conn.execute(
            f"SELECT linkedid, kind, status FROM outbox WHERE linkedid IN ({marks})", tuple(by_id)).fetchall():
        if kind == "team":
            by_id[linkedid].mail = status
        else:
            by_id[linkedid].caller_mail = status


# ---------------------------------------------------------------------------------------------
# One call


@dataclass
class Leg:
    """One session: an action on one channel of the call, with its steps."""

    session: str
    action: str
    channel: str
    uniqueid: str
    agent: str
    started: str
    outcome: str = "unfinished"
    error: str = ""
    duration_ms: float | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        names = {s.get("step") for s in self.steps}
        if self.action == "warn":
            if "ladder_exhausted" in names:
                return "end"
            final = any(s.get("step") == "warning_played" and s.get("final") is True for s in self.steps)
            return "final_warning" if final else "warning"
        return {"end": "end", "transfer/supervisor": "supervisor", "transfer/result": "result"}.get(
            self.action, "colleague" if self.action.startswith("transfer/") else "other")


@dataclass
class CallDetail:
    linkedid: str
    caller_number: str
    caller_name: str
    legs: list[Leg]
    mails: list[dict[str, Any]]
    others: list[tuple[str, str, int]]  # the same caller's other calls: linkedid, started, presses
    truncated: bool = False

    @property
    def transfers(self) -> list[dict[str, Any]]:
        """Each transfer's result, with who took the call when it was answered."""
        dialled = {}
        for leg in self.legs:
            for step in leg.steps:
                if step.get("step") == "caller_transferred":
                    dialled[step.get("target")] = step.get("extension") or step.get("dial") or ""
        out = []
        for leg in self.legs:
            for step in leg.steps:
                if step.get("step") == "transfer_result":
                    target = step.get("target") or ""
                    out.append({**step, "answered_by": dialled.get(target, "") if step.get("answered") else ""})
        return out


CALL_EVENTS_LIMIT = 5000


def call_detail(conn: Connection, linkedid: str) -> CallDetail | None:
    rows = conn.execute(
        "SELECT event, session, action, ts, data FROM events WHERE linkedid = ? ORDER BY ts, id LIMIT ?",
        (linkedid, CALL_EVENTS_LIMIT + 1)).fetchall()
    if not rows:
        return None
    legs: dict[str, Leg] = {}
    number = name = ""
    for event, session, action, ts, data in rows[:CALL_EVENTS_LIMIT]:
        if event.startswith("console_") or not session:
            continue
        try:
            fields = json.loads(data)
        except ValueError:
            fields = {}
        leg = legs.get(session)
        if leg is None:
            leg = legs[session] = Leg(session, action or "", str(fields.get("channel") or ""),
                                      str(fields.get("uniqueid") or ""), str(fields.get("agent") or ""), ts)
        number = number or str(fields.get("caller_number") or "")
        name = name or str(fields.get("caller_name") or "")
        if event == "step":
            leg.steps.append(fields)
        elif event == "session_end":
            leg.outcome = str(fields.get("outcome") or "unknown")
            leg.error = str(fields.get("error") or "")
            duration = fields.get("duration_ms")
            leg.duration_ms = duration if isinstance(duration, (int, float)) else None
        elif event != "session_start":
            leg.problems.append(fields)
    mails = []
    for kind, status, attempts, last_error, queued_at, sent_at, recipient in conn.execute(
            "SELECT kind, status, attempts, last_error, queued_at, sent_at, recipient FROM outbox "
            "WHERE linkedid = ? ORDER BY kind DESC", (linkedid,)).fetchall():
        mails.append({"kind": kind, "status": status, "attempts": attempts, "last_error": last_error or "",
                      "queued_at": _from_epoch(queued_at), "sent_at": _from_epoch(sent_at),
                      "recipient": recipient or ""})
    others: list[tuple[str, str, int]] = []
    if number and number.strip().lower() not in WITHHELD:
        others = [(r[0], r[1], int(r[2])) for r in conn.execute(
            "SELECT e.linkedid, MIN(e.ts), COUNT(*) FROM escalations e WHERE e.caller_number = ? "
            "AND e.linkedid <> ? GROUP BY e.linkedid ORDER BY MIN(e.ts) DESC LIMIT 50",
            (number, linkedid)).fetchall()]
    return CallDetail(linkedid, number, name, list(legs.values()), mails, others,
                      truncated=len(rows) > CALL_EVENTS_LIMIT)


def _from_epoch(value: float | None) -> str:
    if value is None:
        return ""
    return datetime.fromtimestamp(float(value), timezone.utc).isoformat(timespec="microseconds")


# ---------------------------------------------------------------------------------------------
# Agents, trends, live


@dataclass
class AgentRow:
    agent: str
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    presses: int = 0
    last_end: str = ""
    last: str = ""


def agents(conn: Connection, filters: Filters, zone: ZoneInfo) -> list[AgentRow]:
    """Per agent endpoint: calls with each kind, key presses, the last call they ended."""
    where, params = replace(filters, agent="", kind="").where(zone)
    rows = conn.execute(
        f"SELECT e.endpoint, {KIND_GROUP_SQL}, COUNT(DISTINCT e.linkedid), COUNT(*), MAX(e.ts) FROM escalations e "
        f"WHERE {where} GROUP BY e.endpoint, {KIND_GROUP_SQL}", params).fetchall()
    out: dict[str, AgentRow] = {}
    for ep, k, calls, presses, last in rows:
        row = out.setdefault(ep or "", AgentRow(ep or ""))
        row.calls[k] = int(calls)
        row.presses += int(presses)
        row.last = max(row.last, last or "")
        if k == "end":
            row.last_end = max(row.last_end, last or "")
    return sorted(out.values(), key=lambda a: (-a.presses, a.agent))


@dataclass
class Trends:
    days: list[tuple[date, dict[str, int]]]
    heat: list[list[int]]  # [weekday 0=Mon][hour] escalations
    markers: list[dict[str, Any]]  # config changes: at (UTC ts), kind, fingerprint


def trends(conn: Connection, filters: Filters, zone: ZoneInfo) -> Trends:
    """Escalations per local day by kind and per local hour of the week, from per-UTC-quarter-
    hour counts in SQL (every zone's offset is whole quarter hours: India's +05:30, Nepal's
    +05:45); and the times the service started or reloaded with a changed config."""
    where, params = replace(filters, kind="").where(zone)
    quarter = "CAST(substr(e.ts, 15, 2) AS INTEGER) / 15"
    rows = conn.execute(
        f"SELECT substr(e.ts, 1, 13), {quarter}, {KIND_GROUP_SQL}, COUNT(*) FROM escalations e "
        f"WHERE {where} GROUP BY substr(e.ts, 1, 13), {quarter}, {KIND_GROUP_SQL}", params).fetchall()
    per_day: dict[date, dict[str, int]] = {}
    heat = [[0] * 24 for _ in range(7)]
    for hour, part, kind, count in rows:
        try:
            local = datetime.fromisoformat(f"{hour}:{int(part) * 15:02d}:00+00:00").astimezone(zone)
        except ValueError:
            continue
        per_day.setdefault(local.date(), dict.fromkeys(KINDS, 0))[kind] += int(count)
        heat[local.weekday()][local.hour] += int(count)
    since, until = filters.bounds(zone)
    days: list[tuple[date, dict[str, int]]] = []
    if per_day or since:
        first = since.astimezone(zone).date() if since else min(per_day)
        last = (until - timedelta(microseconds=1)).astimezone(zone).date() if until else \
            max([datetime.now(zone).date(), *per_day])
        day = first
        while day <= last and len(days) < 3700:
            days.append((day, per_day.get(day, dict.fromkeys(KINDS, 0))))
            day += timedelta(days=1)
    return Trends(days, heat, config_changes(conn, since, until))


def config_changes(conn: Connection, since: datetime | None, until: datetime | None) -> list[dict[str, Any]]:
    """Starts and reloads whose config fingerprint differs from the one in use before."""
    where = "event IN ('service_started', 'config_reloaded')"
    previous = None
    if since is not None:
        row = conn.execute(f"SELECT data FROM events WHERE {where} AND ts < ? ORDER BY ts DESC LIMIT 1",
                           (as_ts(since),)).fetchone()
        previous = _fingerprint(row[0]) if row else None
    period, params = period_sql("ts", since, until)
    where += period
    markers = []
    for event, ts, data in conn.execute(f"SELECT event, ts, data FROM events WHERE {where} ORDER BY ts LIMIT 10000",
                                        params).fetchall():
        fingerprint = _fingerprint(data)
        if fingerprint and previous and fingerprint != previous:  # the first start changes nothing
            markers.append({"at": ts, "event": event, "fingerprint": fingerprint, "previous": previous or ""})
        previous = fingerprint or previous
    return markers


def _fingerprint(data: str) -> str:
    try:
        return str(json.loads(data).get("fingerprint") or "")
    except (ValueError, AttributeError):
        return ""


_LIVE = "e.session, e.ts, e.action, e.agent, e.caller_number, e.caller_name, e.linkedid, e.kind, e.outcome"


def live_since(conn: Connection, since: datetime) -> tuple[list[dict[str, Any]], int]:
    """Escalations started since `since` (at most 500, newest last), and the newest event id."""
    last_id = conn.execute("SELECT MAX(id) FROM events").fetchone()[0] or 0
    rows = conn.execute(
        f"SELECT {_LIVE} FROM escalations e WHERE e.ts >= ? ORDER BY e.ts DESC LIMIT 500",
        (as_ts(since),)).fetchall()
    items = [_live_item(r) for r in reversed(rows)]
    return items, int(last_id)


def live_after(conn: Connection, after_id: int) -> tuple[list[dict[str, Any]], int]:
    """Escalations that started, moved on (a step) or ended since event `after_id`."""
    rows = conn.execute(
        "SELECT id, session FROM events WHERE id > ? AND event IN ('session_start', 'step', 'session_end') "
        "AND action IN (" + ", ".join("?" * len(ESCALATION_PATHS)) + ") ORDER BY id LIMIT 2000",
        (after_id, *ESCALATION_PATHS)).fetchall()
    if not rows:
        return [], after_id
    sessions = list(dict.fromkeys(r[1] for r in rows if r[1]))
    marks = ", ".join("?" * len(sessions))
    found = conn.execute(f"SELECT {_LIVE} FROM escalations e WHERE e.session IN ({marks}) ORDER BY e.ts",
                         sessions).fetchall()
    return [_live_item(r) for r in found], int(rows[-1][0])


def _live_item(r: tuple) -> dict[str, Any]:
    return {"session": r[0], "ts": r[1], "action": r[2], "agent": endpoint(r[3]), "caller_number": r[4] or "",
            "caller_name": r[5] or "", "linkedid": r[6] or "", "kind": r[7], "outcome": r[8] or ""}


def withheld_sql() -> tuple[str, tuple[str, ...]]:
    return WITHHELD_SQL, WITHHELD
