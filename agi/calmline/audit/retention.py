"""Retention: audit events older than a cut leave the store; a pending callback mail never does.

The service prunes on a schedule (`[audit] keep_days`), an admin on demand
(`calmline audit prune --before DATE`). Deletes run in batches, each its own short
transaction, so the service's own commits never wait long for a prune.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from calmline.store import DATABASE_ERRORS, Connection, Database, reason

BATCH = 2000
EVERY = 3600.0  # seconds between scheduled prunes: a day's cut moves by at most an hour

_EVENTS = "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE ts < ? LIMIT ?)"
# The status test is repeated outside the subquery so that a row a concurrent `retry-now`
# has just made pending again is re-checked, and kept, at the moment it would be deleted.
_OUTBOX = ("DELETE FROM outbox WHERE status <> 'pending' AND id IN "
           "(SELECT id FROM outbox WHERE status <> 'pending' AND queued_at < ? LIMIT ?)")
_PENDING = "SELECT COUNT(*) FROM outbox WHERE status = 'pending' AND queued_at < ?"


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one prune removed, and the pending mail from before the cut that it kept."""

    before: str
    events: int
    outbox: int
    pending_kept: int

    def fields(self) -> dict[str, object]:
        return {"before": self.before, "events": self.events, "outbox": self.outbox,
                "pending_kept": self.pending_kept}


def as_ts(when: datetime) -> str:
    """`when` in the store's `ts` format (UTC, microseconds), which sorts as text."""
    return when.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _batched(conn: Connection, sql: str, value: object) -> int:
    total = 0
    while True:
        with conn.transaction():
            removed = conn.execute(sql, (value, BATCH)).rowcount
        total += removed
        if removed < BATCH:
            return total


def prune(db: Database, before: datetime) -> Pruned:
    """Delete events with `ts` before `before`, and sent or failed mail queued before it."""
    conn = db.connect()
    try:
        if db.kind == "sqlite":
            # Overwrite what is deleted instead of leaving it in the file's free pages.
            conn.execute("PRAGMA secure_delete = ON")
        events = _batched(conn, _EVENTS, as_ts(before))
        outbox = _batched(conn, _OUTBOX, before.timestamp())
        (pending,) = conn.execute(_PENDING, (before.timestamp(),)).fetchone()
    finally:
        conn.close()
    return Pruned(as_ts(before), events, outbox, pending)


async def schedule(db: Database, keep_days: Callable[[], int | None], audit, *,
                   wake: asyncio.Event | None = None, every: float = EVERY,
                   now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
    """Prune what is older than `keep_days()` days now and every `every` seconds, until cancelled.

    `keep_days` is asked each round; setting `wake` (a reload that changed it) starts the
    next round at once. A round that removed something is audited (`by="schedule"`); one
    that failed says why.
    """
    wake = wake or asyncio.Event()
    while True:
        wake.clear()
        days = keep_days()
        if days:
            try:
                pruned = await asyncio.to_thread(prune, db, now() - timedelta(days=days))
            except DATABASE_ERRORS as exc:
                audit.problem("audit_prune_failed", by="schedule", keep_days=days, error=reason(exc))
            else:
                if pruned.events or pruned.outbox:
                    audit.event("audit_pruned", by="schedule", keep_days=days, **pruned.fields())
        try:
            await asyncio.wait_for(wake.wait(), every)
        except TimeoutError:
            pass
