"""lookup: tell the inbound route what calmline remembers of this caller, before queueing.

It sets CALMLINE_CALLER_ESCALATIONS (escalated calls in `[lookup] days`),
CALMLINE_CALLER_LAST (the last escalation and its date) and CALMLINE_CALLER_FLAG
(none, watch, flagged; `unknown` when the store did not answer in time). The counts are
`calmline.audit.history`'s, so the console's repeat-callers page and the route agree.
The query runs on its own threads with its own connections, and the call never waits for
it longer than `[lookup] timeout_ms`.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from calmline.actions import catalog
from calmline.audit.history import ESCALATION_PATHS, ESCALATION_WHERE, as_ts, is_withheld
from calmline.config import LookupConfig
from calmline.fastagi.contract import ActionContext
from calmline.store import DATABASE_ERRORS, Connection, Database, reason

ESCALATIONS = "CALMLINE_CALLER_ESCALATIONS"
LAST = "CALMLINE_CALLER_LAST"
FLAG = "CALMLINE_CALLER_FLAG"
WORKERS = 4

# The word for each escalation's request path ("warn", "supervisor", "colleague", "end").
_WORDS = {spec.path: spec.escalation.ladder for spec in catalog.ACTIONS if spec.escalation is not None}
_COUNT_SQL = (f"SELECT COUNT(DISTINCT COALESCE(linkedid, session)) FROM events "
              f"WHERE caller_number = ? AND {ESCALATION_WHERE} AND ts >= ?")
_LAST_SQL = (f"SELECT action, ts FROM events WHERE caller_number = ? AND {ESCALATION_WHERE} "
             f"ORDER BY ts DESC LIMIT 1")


@dataclass(frozen=True)
class CallerRecord:
    escalations: int
    last_action: str  # "" when the caller has none
    last_at: str  # the stored UTC timestamp, "" when none

    def last(self) -> str:
        """`end 2026-12-06`: the last escalation and its date (UTC), or ""."""
        return f"{self.last_action} {self.last_at[:10]}" if self.last_action else ""


def flag(escalations: int, config: LookupConfig) -> str:
    if escalations >= config.flag_at:
        return "flagged"
    if escalations >= config.watch_at:
        return "watch"
    return "none"


class CallerLookups:
    """The queries, each on a connection its worker thread keeps (no connect per call)."""

    def __init__(self, db: Database, workers: int = WORKERS):
        self.db = db
        self._local = threading.local()
        self._connections: list[Connection] = []
        self._lock = threading.Lock()
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="calmline-lookup")

    def _connection(self) -> Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self.db.connect()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def record(self, number: str, days: int, now: datetime | None = None) -> CallerRecord:
        """This number's escalated calls since `days` ago and its last escalation (blocking)."""
        since = (now or datetime.now(timezone.utc)) - timedelta(days=days)
        try:
            conn = self._connection()
            count = conn.execute(_COUNT_SQL, (number, *ESCALATION_PATHS, as_ts(since))).fetchone()[0]
            last = conn.execute(_LAST_SQL, (number, *ESCALATION_PATHS)).fetchone()
        except DATABASE_ERRORS:
            self._drop()
            raise
        if last is None:
            return CallerRecord(int(count or 0), "", "")
        return CallerRecord(int(count or 0), _WORDS.get(last[0], last[0]), last[1] or "")

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)
            try:
                conn.close()
            except DATABASE_ERRORS:
                pass

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for conn in self._connections:
                try:
                    conn.close()
                except DATABASE_ERRORS:
                    pass
            self._connections.clear()


class Lookup:
    """Set the three variables on the caller's channel; never hold the call past the timeout."""

    def __init__(self, config: LookupConfig, lookups: CallerLookups | None):
        self._config = config
        self._lookups = lookups

    async def run(self, context: ActionContext) -> str:
        cfg, number = self._config, context.call.caller_number
        if is_withheld(number):
            await self._set(context, "0", "", "none")
            context.audit.event("caller_looked_up", withheld=True, escalations=0, flag="none")
            return "completed"
        if self._lookups is None:  # a registry built without a store (tests, `calmline check`)
            await self._set(context, "", "", "unknown")
            context.audit.problem("caller_lookup_unknown", reason="no store to look in", flag="unknown")
            return "completed"
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._lookups.executor, self._lookups.record, number, cfg.days)
        try:
            async with asyncio.timeout(cfg.timeout_ms / 1000):
                record = await asyncio.shield(future)
        except TimeoutError:
            future.add_done_callback(_consume)
            await self._set(context, "", "", "unknown")
            context.audit.problem("caller_lookup_unknown", reason=f"the store did not answer within "
                                  f"{cfg.timeout_ms} ms (lookup.timeout_ms)", flag="unknown")
            return "completed"
        except DATABASE_ERRORS as exc:
            await self._set(context, "", "", "unknown")
            context.audit.problem("caller_lookup_unknown", reason=f"the store failed: {reason(exc)}",
                                  flag="unknown")
            return "completed"
        result = flag(record.escalations, cfg)
        await self._set(context, str(record.escalations), record.last(), result)
        context.audit.event("caller_looked_up", escalations=record.escalations, last=record.last() or None,
                            flag=result, days=cfg.days)
        return "completed"

    @staticmethod
    async def _set(context: ActionContext, escalations: str, last: str, result: str) -> None:
        channel = context.channel
        await channel.set_variable(ESCALATIONS, escalations)
        await channel.set_variable(LAST, last)
        await channel.set_variable(FLAG, result)


def _consume(future: asyncio.Future) -> None:
    """A lookup that finished after the call went on: its answer (or error) is not needed."""
    if not future.cancelled():
        future.exception()
