"""Stores on a SQLite file, as the service opens them: migrated, then used."""

from __future__ import annotations

from pathlib import Path

from calmline.callback.outbox import Outbox
from calmline.store import Database


def sqlite_db(path: Path | str) -> Database:
    db = Database(f"sqlite:///{Path(path).resolve()}")
    db.open_checked()
    return db


def outbox_at(path: Path | str) -> Outbox:
    return Outbox(sqlite_db(path))
