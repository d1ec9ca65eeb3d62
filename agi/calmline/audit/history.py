"""A caller's history of escalated calls, counted in SQL over the store's indexes.

The counts read `escalations` (one row per escalation, kept by triggers on the events, schema
migration 6) through its (caller_number, ts, linkedid) and (ts, linkedid) indexes.

An *escalated call* is one linkedid on which an agent pressed a calmline code (a warning,
a transfer or an end) at least once. The console's repeat-callers page and any action that
wants to know "has this number been abusive before?" count the same way, here.

A withheld number (empty, `anonymous`, `restricted`, ...) names nobody: it is never counted
as one caller, and `calls()` says 0 for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from calmline.actions import catalog
from calmline.store import Database

# The request paths whose sessions are escalations (the transfer result is not one).
ESCALATION_PATHS: tuple[str, ...] = tuple(s.path for s in catalog.ACTIONS if s.escalation is not None)
# What networks and PBXes put in the caller number when it is withheld (compared lower-case).
WITHHELD = ("", "anonymous", "restricted", "private", "withheld", "unknown", "<unknown>",
            "unavailable")

_PATHS = ", ".join("?" * len(ESCALATION_PATHS))
# An escalation's session_start, on the (event, ts) index.
ESCALATION_WHERE = f"event = 'session_start' AND action IN ({_PATHS})"
WITHHELD_SQL = (f"(caller_number IS NULL OR lower(trim(caller_number)) IN "
                f"({', '.join('?' * len(WITHHELD))}))")


def as_ts(when: datetime) -> str:
    """`when` in the store's `ts` format (UTC, microseconds), which sorts as text."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="microseconds")


def period_sql(column: str, since: datetime | str | None, until: datetime | str | None) -> tuple[str, list[str]]:
    """` AND column >= ? AND column < ?` for the bounds given (a datetime, or already in the
    store's `ts` format), and its parameters: every period in the store is since <= ts < until."""
    sql, params = "", []
    for bound, op in ((since, ">="), (until, "<")):
        if bound is not None:
            sql += f" AND {column} {op} ?"
            params.append(as_ts(bound) if isinstance(bound, datetime) else bound)
    return sql, params


def is_withheld(number: str | None) -> bool:
    return number is None or number.strip().lower() in WITHHELD


@dataclass(frozen=True, slots=True)
class RepeatCaller:
    number: str
    calls: int  # escalated calls (distinct linkedids) in the range
    escalations: int  # key presses on them
    last_at: str  # the latest escalation, as stored (UTC)
    name: str  # one caller name seen with the number (the greatest, for a stable answer)


@dataclass(frozen=True, slots=True)
class Withheld:
    calls: int
    escalations: int


class CallerHistory:
    """Counts of escalated calls per caller number over a time range (since ≤ ts < until)."""

    def __init__(self, db: Database):
        self.db = db

    @staticmethod
    def _range(since: datetime | None, until: datetime | None) -> tuple[str, list[str]]:
        return period_sql("ts", since, until)

    def calls(self, number: str | None, since: datetime | None = None,
              until: datetime | None = None) -> int:
        """How many escalated calls this number made in the range (0 for a withheld one)."""
        if is_withheld(number):
            return 0
        bounds, params = self._range(since, until)
        conn = self.db.connect()
        try:
            row = conn.execute(
                f"SELECT COUNT(DISTINCT COALESCE(linkedid, session)) FROM escalations "
                f"WHERE caller_number = ?{bounds}", (number, *params)).fetchone()
        finally:
            conn.close()
        return int(row[0] or 0)

    def callers(self, since: datetime | None = None, until: datetime | None = None, *,
                minimum: int = 2, limit: int = 200) -> tuple[list[RepeatCaller], Withheld]:
        """Numbers with at least `minimum` escalated calls in the range, most calls first; and
        the withheld numbers as one group. One scan of the range grouped by number serves both
        (a withheld call is counted once per spelling of its withheld number)."""
        bounds, params = self._range(since, until)
        conn = self.db.connect()
        try:
            rows = conn.execute(
                f"WITH g AS (SELECT caller_number, COUNT(DISTINCT linkedid) AS calls, COUNT(*) AS n, "
                f"MAX(ts) AS last, CASE WHEN {WITHHELD_SQL} THEN 1 ELSE 0 END AS w FROM escalations "
                f"WHERE 1 = 1{bounds} GROUP BY caller_number) "
                f"SELECT caller_number, calls, n, last, w FROM (SELECT caller_number, calls, n, last, w FROM g "
                f"WHERE w = 0 AND calls >= ? ORDER BY calls DESC, caller_number LIMIT ?) AS repeat "
                f"UNION ALL SELECT NULL, SUM(calls), SUM(n), NULL, 1 FROM g WHERE w = 1",
                (*WITHHELD, *params, max(1, minimum), limit)).fetchall()
            names = {}
            for number, *_, w in rows:  # one name per number shown: the greatest, for a stable answer
                if not w:
                    names[number] = conn.execute(
                        f"SELECT MAX(caller_name) FROM escalations WHERE caller_number = ?{bounds}",
                        (number, *params)).fetchone()[0] or ""
        finally:
            conn.close()
        repeat = [RepeatCaller(number=r[0], calls=int(r[1]), escalations=int(r[2]), last_at=r[3],
                               name=names[r[0]]) for r in rows if not r[4]]
        withheld = [Withheld(calls=int(r[1] or 0), escalations=int(r[2] or 0)) for r in rows if r[4]]
        return repeat, withheld[0] if withheld else Withheld(0, 0)
