"""The one store the service, the CLI and the console share, named by `[store] url`.

`sqlite:///var/calmline.sqlite3` (a path relative to where calmline runs; four slashes for an
absolute one) is the embedded default; `postgresql://user@host:port/db?sslmode=...` lets
several instances share one store. Both speak the same SQL here, written with `?`
placeholders, so the code above this module never asks which engine it has.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from calmline.errors import StoreError
from calmline.store.schema import MIGRATIONS, VERSION

# Errors a store raises when it refuses or loses a connection, whichever engine it is.
try:
    import psycopg

    DATABASE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, psycopg.Error, OSError)
except ImportError:  # PostgreSQL support is optional
    psycopg = None  # type: ignore[assignment]
    DATABASE_ERRORS = (sqlite3.Error, OSError)

_MIGRATION_LOCK = 0x63616C6D  # "calm": the advisory lock two instances starting at once share

# A server that vanished without closing the connection (a failover, a cut network) is noticed
# within seconds, not after the kernel's TCP timeouts; the URL's query may set these otherwise.
_PG_DEFAULTS = {"keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "2",
                "keepalives_count": "3", "tcp_user_timeout": "10000", "connect_timeout": "5"}


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class Connection:
    """A connection in autocommit mode; `transaction()` groups statements into one commit."""

    def __init__(self, raw: Any, kind: str):
        self.raw = raw
        self.kind = kind

    def _sql(self, sql: str) -> str:
        return _pg_sql(sql) if self.kind == "postgresql" else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.raw.execute(self._sql(sql), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self.kind == "postgresql":
            with self.raw.cursor() as cursor:
                cursor.executemany(self._sql(sql), rows)
        else:
            self.raw.executemany(sql, rows)

    def stream(self, sql: str, params: Sequence[Any], size: int = 500) -> Iterator[list[Any]]:
        """The rows of one query a batch at a time, without holding them all in memory
        (a server-side cursor on PostgreSQL); other statements may run between batches."""
        if self.kind == "postgresql":
            with self.raw.transaction(), self.raw.cursor(name=f"calmline_{os.urandom(4).hex()}") as cursor:
                cursor.execute(self._sql(sql), params)
                while rows := cursor.fetchmany(size):
                    yield rows
            return
        cursor = self.raw.execute(sql, params)
        try:
            while rows := cursor.fetchmany(size):
                yield rows
        finally:
            cursor.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction; on SQLite it takes the write lock at once (BEGIN IMMEDIATE)."""
        if self.kind == "postgresql":
            with self.raw.transaction():
                yield self
            return
        self.raw.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.raw.execute("ROLLBACK")
            raise
        self.raw.execute("COMMIT")

    @property
    def broken(self) -> bool:
        """True once the server side is gone (PostgreSQL restarted, network cut): reconnect."""
        if self.kind == "postgresql":
            return bool(self.raw.broken or self.raw.closed)
        return False

    def close(self) -> None:
        self.raw.close()


class Database:
    """Where the store is and how to reach it; every `connect()` is a new connection."""

    def __init__(self, url: str, *, password: str | None = None, busy_timeout: float = 1.0):
        self.url = url
        self._password = password
        self._busy_timeout = busy_timeout
        parts = urlsplit(url)
        if parts.scheme == "sqlite":
            raw = unquote(parts.path)
            if parts.netloc or not raw.startswith("/") or len(raw) < 2:
                raise StoreError(
                    f"store.url: {url!r} is not a SQLite URL; write sqlite:///relative/path.sqlite3 "
                    "or sqlite:////absolute/path.sqlite3")
            self.kind = "sqlite"
            self.path: Path | None = Path(raw[1:])
        elif parts.scheme in ("postgresql", "postgres"):
            if psycopg is None:
                raise StoreError("store.url: PostgreSQL needs psycopg; run `pip install 'calmline[postgresql]'`")
            self.kind = "postgresql"
            self.path = None
        else:
            raise StoreError(
                f"store.url: {url!r} names no store calmline knows; use sqlite:///path.sqlite3 or "
                "postgresql://user@host:5432/dbname")

    @property
    def where(self) -> str:
        """The store as an admin would name it, without a password."""
        if self.path is not None:
            return str(self.path)
        parts = urlsplit(self.url)
        host = parts.hostname or "localhost"
        return f"postgresql://{parts.username + '@' if parts.username else ''}{host}" \
               f"{':' + str(parts.port) if parts.port else ''}{parts.path}"

    def connect(self) -> Connection:
        if self.kind == "postgresql":
            given = psycopg.conninfo.conninfo_to_dict(self.url)
            kwargs = {k: v for k, v in _PG_DEFAULTS.items() if k not in given}
            if self._password:
                kwargs["password"] = self._password
            raw = psycopg.connect(self.url, autocommit=True, **kwargs)
            return Connection(raw, "postgresql")
        assert self.path is not None
        self._create_private(self.path)
        raw = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                              timeout=self._busy_timeout)
        try:
            raw.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            mode = self._wal(raw)
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL (got {mode})")
            raw.execute("PRAGMA synchronous = FULL")
        except BaseException:
            raw.close()
            raise
        return Connection(raw, "sqlite")

    def _wal(self, raw: sqlite3.Connection) -> str:
        """Switch to WAL. While another process creates the same new file, SQLite answers
        BUSY at once, without its busy handler (2-3% of six simultaneous first starts did):
        so wait here, up to the busy timeout, as for any other lock."""
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                return raw.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)

    @staticmethod
    def _create_private(path: Path) -> None:
        """Create the file 0600 before SQLite does (its WAL and SHM files copy the mode):
        it holds callers' numbers and names."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
        except FileExistsError:
            pass

    def open_checked(self) -> None:
        """Create or migrate the schema, and refuse a store that cannot be written or is damaged."""
        try:
            conn = self.connect()
        except DATABASE_ERRORS as exc:
            raise StoreError(f"store.url: cannot open {self.where}: {reason(exc)}; "
                             f"{self.fix_hint()}") from None
        try:
            if self.kind == "sqlite":
                found = conn.execute("PRAGMA quick_check").fetchall()
                if [row[0] for row in found] != ["ok"]:
                    raise StoreError(
                        f"store.url: {self.where} is damaged (quick_check: {found[0][0]}); restore it "
                        "from a backup, or move it away to start a new one")
            self._migrate(conn)
        except StoreError:
            raise
        except DATABASE_ERRORS as exc:
            raise StoreError(f"store.url: cannot write {self.where}: {reason(exc)}; {self.fix_hint()}") from None
        finally:
            conn.close()

    def fix_hint(self) -> str:
        """What an admin checks when the store cannot be opened or written."""
        if self.kind == "sqlite":
            return "point it at a file in a directory calmline can write"
        return ("check that the server is up, the database exists, the user may create tables in it "
                "and its password (store.password_env) is right")

    def _migrate(self, conn: Connection) -> None:
        """Apply the missing migrations in one transaction, under a lock two instances share."""
        with conn.transaction():
            if self.kind == "postgresql":
                conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            if current > VERSION:
                raise StoreError(
                    f"store.url: {self.where} has schema version {current}, newer than this calmline "
                    f"knows ({VERSION}); upgrade calmline, or point store.url at another store")
            for version, _name, statements in MIGRATIONS:
                if version > current:
                    for statement in statements[self.kind]:
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    def schema_version(self) -> int:
        conn = self.connect()
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            return conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
        finally:
            conn.close()


class SharedTable:
    """A table several threads and processes share over one connection, opened again when the
    database drops it (a restart or a failover)."""

    what = "table"

    def __init__(self, db: Database):
        self.db = db
        self._lock = threading.RLock()
        self._db: Connection | None = db.connect()
        self._closed = False

    def _conn(self) -> Connection:
        if self._closed:
            raise RuntimeError(f"the {self.what} of {self.db.where} is closed")
        if self._db is None or self._db.broken:
            self._forget()
            self._db = self.db.connect()
        return self._db

    def _forget(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except DATABASE_ERRORS:
                pass
            self._db = None

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self._read() as conn, conn.transaction() as db:
            yield db

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._lock:
            try:
                yield self._conn()
            except DATABASE_ERRORS:
                if self._db is not None and self._db.broken:
                    self._forget()  # the next call connects again
                raise

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._forget()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reason(exc: BaseException) -> str:
    """An error from a store as one line."""
    return " ".join(str(exc).split()) or type(exc).__name__
