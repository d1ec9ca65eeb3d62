"""Copy one store into another (`calmline store migrate`): idempotent, resumable, with progress.

Rows go in id order, one batch per transaction, each inserted with ON CONFLICT DO NOTHING on
its natural key (an event's `event_id`, a mail's `(key, kind)`), so running it again adds
nothing twice. What has been copied is always a prefix of the source in id order, so a run
finds where the last one stopped by a binary search over the source's ids, asking the target
whether it already holds the row there: years of history are not read twice.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from calmline.store import Connection, Database
from calmline.store.schema import EVENT_COLUMNS


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[str, ...]  # copied as they are; `id` is the target's own
    key: tuple[str, ...]  # unique in both stores: what makes a row the same row
    order: str = "id"  # copied in this order; a small table without ids goes by its key


OUTBOX_COLUMNS = ("key", "kind", "recipient", "linkedid", "status", "attempts", "next_attempt",
                  "last_error", "smtp_reply", "queued_at", "sent_at", "request")
WEBHOOK_COLUMNS = ("key", "url", "linkedid", "status", "attempts", "next_attempt", "last_error",
                   "http_status", "queued_at", "sent_at", "body")
COOLDOWN_COLUMNS = ("key", "interface", "linkedid", "trigger", "state", "queues", "created_at", "due_at",
                    "next_attempt", "attempts", "owner", "outcome", "last_error")
# The console's accounts come along; its failed-login counters (a lockout in progress) do not.
TABLES = (Table("events", EVENT_COLUMNS, ("event_id",)), Table("outbox", OUTBOX_COLUMNS, ("key", "kind")),
          Table("webhooks", WEBHOOK_COLUMNS, ("key", "url")),
          Table("cooldowns", COOLDOWN_COLUMNS, ("key",)),
          Table("console_users", ("name", "password_hash", "created_at"), ("name",), order="name"))
# escalations is derived from events by the target's own triggers as they are copied in
NOT_COPIED = ("schema_version", "console_failures", "escalations")


@dataclass
class Copied:
    table: str
    resumed_after: int | str  # the source id the copy started after (0: from the start)
    rows: int  # rows read from the source and offered to the target this run


def _present(target: Connection, table: Table, values: tuple) -> bool:
    where = " AND ".join(f"{column} = ?" for column in table.key)
    return target.execute(f"SELECT 1 FROM {table.name} WHERE {where} LIMIT 1", values).fetchone() is not None


def resume_point(source: Connection, target: Connection, table: Table) -> int | str:
    """The highest source id at or below which every row is in the target already."""
    if table.order != "id":
        return ""  # a small table: offered whole again
    keys = ", ".join(table.key)
    low, high = source.execute(f"SELECT min(id), max(id) FROM {table.name}").fetchone()
    if low is None:
        return 0

    def copied_up_to(bound: int) -> bool:
        row = source.execute(f"SELECT {keys} FROM {table.name} WHERE id <= ? ORDER BY id DESC LIMIT 1",
                             (bound,)).fetchone()
        return row is None or _present(target, table, tuple(row))

    if not copied_up_to(low):
        return 0
    # copied_up_to(low) holds; find the largest id for which it does
    while low < high:
        middle = (low + high + 1) // 2
        if copied_up_to(middle):
            low = middle
        else:
            high = middle - 1
    return low


class Progress:
    """Rows copied, rate and time left: one line redrawn on a terminal, plain lines elsewhere."""

    def __init__(self, out: TextIO, *, every: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.out = out
        self.tty = out.isatty()
        self.every = every if every is not None else (0.25 if self.tty else 5.0)
        self.clock = clock
        self._last = 0.0
        self._drawn = False

    def start(self, table: str, total: int, resumed_after: int | str) -> None:
        self.table, self.total, self.done, self.began = table, total, 0, self.clock()
        where = f" (resuming after source id {resumed_after})" if resumed_after else ""
        self._line(f"{table}: {total:,} rows to copy{where}", final=True)

    def advance(self, rows: int) -> None:
        self.done += rows
        now = self.clock()
        if now - self._last >= self.every:
            self._last = now
            self._line(self._status(now), final=False)

    def finish(self) -> None:
        now = self.clock()
        self._line(self._status(now, finished=True), final=True)

    def _status(self, now: float, finished: bool = False) -> str:
        elapsed = max(now - self.began, 1e-9)
        rate = self.done / elapsed
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        text = f"{self.table}: {self.done:,}/{self.total:,} rows{share}, {rate:,.0f} rows/s"
        if finished:
            return text + f", done in {_duration(elapsed)}"
        left = (self.total - self.done) / rate if rate > 0 else None
        return text + (f", {_duration(left)} left" if left is not None else "")

    def _line(self, text: str, *, final: bool) -> None:
        if self.tty:
            self.out.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.out.write(text + "\n")
        self.out.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def copy_store(source_db: Database, target_db: Database, *, batch: int = 2000,
               progress: Progress | None = None) -> list[Copied]:
    """Copy every table of `source_db` into `target_db` (both migrated to this code's schema)."""
    source_db.open_checked()
    target_db.open_checked()
    progress = progress or Progress(sys.stderr)
    source, target = source_db.connect(), target_db.connect()
    results = []
    try:
        for table in TABLES:
            after = resume_point(source, target, table)
            order = table.order
            total = source.execute(f"SELECT count(*) FROM {table.name} WHERE {order} > ?", (after,)).fetchone()[0]
            progress.start(table.name, total, after)
            columns = ", ".join(table.columns)
            insert = (f"INSERT INTO {table.name} ({columns}) VALUES ({', '.join('?' * len(table.columns))}) "
                      f"ON CONFLICT ({', '.join(table.key)}) DO NOTHING")
            copied, last = 0, after
            while True:
                rows = source.execute(f"SELECT {order}, {columns} FROM {table.name} WHERE {order} > ? "
                                      f"ORDER BY {order} LIMIT ?", (last, batch)).fetchall()
                if not rows:
                    break
                with target.transaction():
                    target.executemany(insert, [tuple(row[1:]) for row in rows])
                last = rows[-1][0]
                copied += len(rows)
                progress.advance(len(rows))
            progress.finish()
            results.append(Copied(table.name, after, copied))
    finally:
        source.close()
        target.close()
    return results
