"""cool-down: pause the agent in their queues after an abusive call, unpause them when due.

The action only records the cool-down in the store (the `cooldowns` table) and wakes the
worker; the worker pauses over AMI at once and unpauses at `due_at`. Because the pending
unpause lives in the store, a restarted service still unpauses on time (or at once when
overdue), and of several instances sharing the store exactly one takes each due row.
The worker never pauses twice and only unpauses queues that still carry its own reason,
so an agent who unpaused by hand (or was paused for something else) is left as they are.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from calmline import ami
from calmline.store import DATABASE_ERRORS, Connection, Database, reason

if TYPE_CHECKING:
    from calmline.audit.trail import AuditTrail
    from calmline.config import Config, CooldownConfig
    from calmline.fastagi.contract import ActionContext

REASON = "calmline cool-down"
INTERFACE_VARIABLE = "MEMBERINTERFACE"
NO_QUEUE = (
    "no queue member interface on the channel (MEMBERINTERFACE is unset): a Dial call with no "
    "queue, or a queue without `setinterfacevar = yes` in queues.conf"
)

CLAIM_BATCH = 5  # rows one instance takes at a time

# Steps and events, by name.
COOLDOWN_SCHEDULED = "cooldown_scheduled"
COOLDOWN_NOT_STARTED = "cooldown_not_started"

_COLUMNS = "id, key, interface, linkedid, trigger, state, queues, created_at, due_at, attempts"


@dataclass(frozen=True)
class Cooldown:
    """One row of `cooldowns`, as a worker claimed it."""

    id: int
    key: str
    interface: str
    linkedid: str
    trigger: str
    state: str
    queues: list[str]
    created_at: float
    due_at: float
    attempts: int

    @classmethod
    def from_row(cls, row: tuple) -> Cooldown:
        return cls(int(row[0]), row[1], row[2], row[3] or "", row[4], row[5],
                   json.loads(row[6]) if row[6] else [], float(row[7]), float(row[8]), int(row[9]))


class CooldownStore:
    """The `cooldowns` table: schedule, claim what is due (one instance per row), finish."""

    def __init__(self, db: Database, owner: str | None = None):
        self.db = db
        self.owner = owner or f"{os.uname().nodename}-{os.getpid()}-{os.urandom(3).hex()}"
        self._conn: Connection | None = None
        self._lock = threading.Lock()  # one connection, used from worker threads in turn

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = self.db.connect()
        return self._conn

    def _run(self, work: Callable[[Connection], Any]) -> Any:
        with self._lock:
            try:
                return work(self._connection())
            except DATABASE_ERRORS:
                self._close()  # the next call opens a new connection
                raise

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except DATABASE_ERRORS:
                pass
            self._conn = None

    def schedule(self, interface: str, linkedid: str, trigger: str, seconds: float,
                 now: float | None = None) -> tuple[bool, float]:
        """Record a cool-down to start now; (False, its due time) if this call already has one
        for this interface (the final warning and then the end of one call pause once)."""
        now = time.time() if now is None else now
        key = f"{linkedid}|{interface}"
        due = now + seconds

        def work(conn: Connection) -> tuple[bool, float]:
            with conn.transaction():
                row = conn.execute("SELECT due_at FROM cooldowns WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    return False, float(row[0])
                conn.execute(
                    "INSERT INTO cooldowns (key, interface, linkedid, trigger, state, created_at, "
                    "due_at, next_attempt) VALUES (?, ?, ?, ?, 'pausing', ?, ?, ?)",
                    (key, interface, linkedid, trigger, now, due, now))
            return True, due

        return self._run(work)

    def claim(self, now: float, lease: float, limit: int = 20) -> list[Cooldown]:
        """Take the due rows for this instance for `lease` seconds; another instance skips
        them (FOR UPDATE SKIP LOCKED on PostgreSQL, the write lock of BEGIN IMMEDIATE on SQLite)."""

        def work(conn: Connection) -> list[Cooldown]:
            lock = " FOR UPDATE SKIP LOCKED" if conn.kind == "postgresql" else ""
            with conn.transaction():
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM cooldowns WHERE state IN ('pausing', 'paused') "
                    f"AND next_attempt <= ? ORDER BY next_attempt LIMIT ?{lock}",
                    (now, limit)).fetchall()
                for row in rows:
                    conn.execute("UPDATE cooldowns SET next_attempt = ?, owner = ? WHERE id = ?",
                                 (now + lease, self.owner, row[0]))
            return [Cooldown.from_row(row) for row in rows]

        return self._run(work)

    def paused(self, row: Cooldown, queues: list[str]) -> None:
        self._update(row, "UPDATE cooldowns SET state = 'paused', queues = ?, next_attempt = due_at, "
                          "last_error = NULL WHERE id = ? AND owner = ?",
                     (json.dumps(queues), row.id, self.owner))

    def done(self, row: Cooldown, outcome: str) -> None:
        self._update(row, "UPDATE cooldowns SET state = 'done', outcome = ? WHERE id = ? AND owner = ?",
                     (outcome, row.id, self.owner))

    def failed(self, row: Cooldown, error: str, retry_at: float) -> None:
        self._update(row, "UPDATE cooldowns SET attempts = attempts + 1, last_error = ?, "
                          "next_attempt = ? WHERE id = ? AND owner = ?",
                     (error[:500], retry_at, row.id, self.owner))

    def later_cooldown(self, row: Cooldown) -> float | None:
        """The due time of another running cool-down of the same interface that ends later."""

        def work(conn: Connection) -> float | None:
            found = conn.execute(
                "SELECT max(due_at) FROM cooldowns WHERE interface = ? AND state = 'paused' "
                "AND id <> ? AND due_at > ?", (row.interface, row.id, row.due_at)).fetchone()
            return float(found[0]) if found and found[0] is not None else None

        return self._run(work)

    def _update(self, row: Cooldown, sql: str, params: tuple) -> None:
        self._run(lambda conn: conn.execute(sql, params))

    def rows(self) -> list[dict[str, Any]]:
        """Every cool-down, oldest first (for `calmline` and the tests)."""

        def work(conn: Connection) -> list[dict[str, Any]]:
            cursor = conn.execute(
                "SELECT id, interface, linkedid, trigger, state, queues, created_at, due_at, "
                "attempts, owner, outcome, last_error FROM cooldowns ORDER BY id")
            names = ["id", "interface", "linkedid", "trigger", "state", "queues", "created_at",
                     "due_at", "attempts", "owner", "outcome", "last_error"]
            return [dict(zip(names, r)) for r in cursor.fetchall()]

        return self._run(work)


class CooldownStarter:
    """What an action calls once its escalation is done: record the cool-down, wake the worker."""

    def __init__(self, config: CooldownConfig, store: CooldownStore, wake: Callable[[], None]):
        self._config = config
        self._store = store
        self._wake = wake

    def wants(self, trigger: str) -> bool:
        return self._config.enabled and trigger in self._config.after

    async def begin(self, context: ActionContext, trigger: str) -> None:
        """Never raises: the call's action is done, and a cool-down that cannot start is a
        line in the trail, not a failed session."""
        if not self.wants(trigger):
            return
        interface = context.values.get(INTERFACE_VARIABLE, "")
        if not interface:
            await context.audit.step(COOLDOWN_NOT_STARTED, trigger=trigger, reason=NO_QUEUE)
            return
        seconds = self._config.seconds
        try:
            added, due = await asyncio.to_thread(
                self._store.schedule, interface, context.call.linkedid or context.call.uniqueid,
                trigger, seconds)
        except DATABASE_ERRORS as exc:
            await context.audit.step(COOLDOWN_NOT_STARTED, trigger=trigger, interface=interface,
                                     reason=f"the store refused it: {reason(exc)}")
            return
        if not added:
            await context.audit.step(COOLDOWN_NOT_STARTED, trigger=trigger, interface=interface,
                                     reason="this call already started a cool-down for this agent",
                                     due_at=_iso(due))
            return
        await context.audit.step(COOLDOWN_SCHEDULED, trigger=trigger, interface=interface,
                                 seconds=seconds, due_at=_iso(due))
        self._wake()


def _iso(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


class CooldownWorker:
    """Pauses and unpauses over AMI what the store says is due; one per service instance."""

    def __init__(self, store: CooldownStore, config: Callable[[], Config], audit: AuditTrail,
                 secret: Callable[[], str | None] | None = None):
        self._store = store
        # The actions schedule on their own connection, not the worker's.
        self.starter_store = CooldownStore(store.db, store.owner)
        self._config = config
        self._audit = audit
        self._secret = secret or (lambda: self._config().ami.resolved_secret())
        self._wake = asyncio.Event()
        self._stopping = False
        self._failing_since: float | None = None

    def wake(self) -> None:
        """Look at the store now (an action scheduled a cool-down); call it on the loop."""
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        self._audit.event("cooldown_worker_started", owner=self._store.owner)
        while not self._stopping:
            cfg = self._config()
            try:
                await self.run_once()
            except DATABASE_ERRORS as exc:
                self._audit.problem("cooldown_store_failed", error=reason(exc))
            except Exception:  # a bug must not stop the unpausing for good
                self._audit.problem("cooldown_worker_error", exc_info=True)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), cfg.cooldown.poll_seconds)
            except TimeoutError:
                pass
        await asyncio.to_thread(self._store.close)
        await asyncio.to_thread(self.starter_store.close)

    async def run_once(self, now: float | None = None) -> int:
        """Handle every row due now; return how many were taken."""
        cfg = self._config()
        now = time.time() if now is None else now
        # Long enough for every AMI exchange of the batch to time out (each is bounded by
        # twice [ami] timeout): no other instance takes a row while this one may still act.
        lease = 10.0 + CLAIM_BATCH * cfg.ami.timeout * 2
        rows = await asyncio.to_thread(self._store.claim, now, lease, CLAIM_BATCH)
        for row in rows:
            await self._handle(row, cfg, now)
        return len(rows)

    async def _handle(self, row: Cooldown, cfg: Config, now: float) -> None:
        from calmline.audit import trail

        trail.clear()
        trail.bind(linkedid=row.linkedid or None, interface=row.interface, cooldown=row.id)
        try:
            if row.state == "pausing":
                await self._pause(row, cfg, now)
            else:
                await self._unpause(row, cfg, now)
        except ami.AMIUnavailable as exc:
            await self._ami_failed(row, cfg, str(exc), now)
        finally:
            trail.clear()

    async def _ami(self, cfg: Config, work: Callable[[ami.Session], Any]) -> Any:
        secret = self._secret()
        result = await asyncio.to_thread(ami.run, cfg.ami, secret, work)
        if self._failing_since is not None:
            self._audit.event("cooldown_ami_back",
                              down_seconds=round(max(0.0, time.time() - self._failing_since), 1))
            self._failing_since = None
        return result

    async def _ami_failed(self, row: Cooldown, cfg: Config, error: str, now: float) -> None:
        if self._failing_since is None:
            self._failing_since = now
        retry_at = now + cfg.cooldown.retry_seconds
        await asyncio.to_thread(self._store.failed, row, error, retry_at)
        what = "pause" if row.state == "pausing" else "unpause"
        if row.attempts == 0:
            self._audit.problem("cooldown_ami_failed", action=what, error=error,
                                retry_seconds=cfg.cooldown.retry_seconds,
                                note="retried until AMI answers; a pause that comes too late is skipped")

    async def _pause(self, row: Cooldown, cfg: Config, now: float) -> None:
        if now >= row.due_at:
            # AMI was away for the whole cool-down: pausing now would only be wrong.
            await asyncio.to_thread(self._store.done, row, "not_paused_too_late")
            self._audit.problem("cooldown_not_paused", reason="AMI was unavailable until the cool-down was over",
                                attempts=row.attempts)
            return

        def work(session: ami.Session) -> tuple[list[str], list[ami.Membership]]:
            members = session.memberships(row.interface)
            paused = []
            for member in members:
                if member.paused:
                    continue  # paused already (a break, or another cool-down): not paused again
                session.queue_pause(row.interface, True, REASON, member.queue)
                paused.append(member.queue)
            return paused, members

        queues, members = await self._ami(cfg, work)
        if not members:
            await asyncio.to_thread(self._store.done, row, "not_a_member")
            self._audit.problem("cooldown_not_paused", reason=f"{row.interface} is a member of no queue")
            return
        # Queues an earlier cool-down paused: this one takes them over and unpauses them later.
        adopted = [m.queue for m in members if m.paused and m.reason == REASON]
        if not queues and not adopted:
            await asyncio.to_thread(self._store.done, row, "already_paused")
            self._audit.event("cooldown_not_paused", reason="the agent is already paused in every queue",
                              queues={m.queue: m.reason for m in members})
            return
        await asyncio.to_thread(self._store.paused, row, queues + adopted)
        self._audit.event("cooldown_paused", queues=queues, extended=adopted or None, reason=REASON,
                          until=_iso(row.due_at), late_seconds=round(max(0.0, now - row.created_at), 1))

    async def _unpause(self, row: Cooldown, cfg: Config, now: float) -> None:
        later = await asyncio.to_thread(self._store.later_cooldown, row)
        if later is not None:
            await asyncio.to_thread(self._store.done, row, "extended")
            self._audit.event("cooldown_extended", until=_iso(later),
                              note="a later cool-down of the same agent unpauses them")
            return

        def work(session: ami.Session) -> tuple[list[str], dict[str, str]]:
            members = {m.queue: m for m in session.memberships(row.interface)}
            unpaused, left = [], {}
            for queue in row.queues:
                member = members.get(queue)
                if member is None:
                    left[queue] = "no longer a member"
                elif not member.paused:
                    left[queue] = "unpaused already (by hand)"
                elif member.reason != REASON:
                    left[queue] = f"paused for another reason ({member.reason or 'none given'})"
                else:
                    session.queue_pause(row.interface, False, REASON, queue)
                    unpaused.append(queue)
            return unpaused, left

        unpaused, left = await self._ami(cfg, work)
        outcome = "unpaused" if unpaused else "left_alone"
        await asyncio.to_thread(self._store.done, row, outcome)
        late = round(max(0.0, now - row.due_at), 1)
        if unpaused:
            self._audit.event("cooldown_unpaused", queues=unpaused, late_seconds=late,
                              left_alone=left or None)
        else:
            self._audit.event("cooldown_left_alone", queues=left, late_seconds=late)
