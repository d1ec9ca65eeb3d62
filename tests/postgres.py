"""A real PostgreSQL 15 for tests: one throwaway cluster per session, one database per test.

`postgres_url` (session) starts a cluster with ../shared/postgres/run-postgres.sh (initdb into
a fresh temp name, run as the unprivileged `postgres` user, on a free loopback port) and stops
it at the end; `CALMLINE_TEST_POSTGRES_URL` names an existing server to use instead. When no
server can be had, tests that need one fail under CI (CI=true) and skip, saying why, elsewhere.
`fresh_database(url)` creates an empty database of its own and gives its URL.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "postgres" / "run-postgres.sh"
if not SCRIPT.exists():  # a clone beside ../shared, as CI has it, or the lab's /work/shared
    SCRIPT = Path("/work/shared/postgres/run-postgres.sh")
ENV_URL = "CALMLINE_TEST_POSTGRES_URL"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable(reason: str) -> None:
    """No PostgreSQL: a failure under CI (it must run there), a skip with the reason elsewhere."""
    message = f"PostgreSQL unavailable: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class Cluster:
    """A cluster started by run-postgres.sh, which can be stopped and started again (outages)."""

    def __init__(self, datadir: str, port: int):
        self.datadir = datadir
        self.port = port
        self.url = ""

    def start(self) -> str:
        done = subprocess.run(["bash", str(SCRIPT), "start", self.datadir, str(self.port)],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{SCRIPT} start failed ({done.returncode}): {done.stderr.strip()[-800:]}")
        self.url = done.stdout.strip().splitlines()[-1]
        return self.url

    def stop(self) -> None:
        subprocess.run(["bash", str(SCRIPT), "stop", self.datadir], capture_output=True, timeout=120)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def admin_execute(url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql)


def fresh_database(url: str) -> str:
    """A new, empty database on the server of `url`; its URL."""
    name = "calmline_t_" + secrets.token_hex(6)
    admin_execute(url, f'CREATE DATABASE "{name}"')
    return with_database(url, name)


def drop_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with contextlib.suppress(Exception):
        admin_execute(with_database(url, "postgres"), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def started_cluster(prefix: str, missing: str) -> Iterator[Cluster]:
    """A cluster started with run-postgres.sh on a free port, stopped and removed afterwards;
    `missing` is what is said when the script is not there."""
    if not SCRIPT.exists():
        unavailable(missing)
    cluster = Cluster(tempfile.mktemp(prefix=prefix), free_port())
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        cluster.stop()
        unavailable(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()
        subprocess.run(["rm", "-rf", cluster.datadir], check=False)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster | None]:
    """The session's own cluster (None when CALMLINE_TEST_POSTGRES_URL names a server)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("psycopg is not installed; run `pip install -e '.[test]'`")
    if os.environ.get(ENV_URL):
        yield None
        return
    with started_cluster("calmline-pg-", f"no {SCRIPT}; set {ENV_URL} to a server's URL") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster) -> str:
    """The URL of a PostgreSQL 15 server the session may create databases on."""
    if postgres_cluster is None:
        return os.environ[ENV_URL]
    return postgres_cluster.url


@pytest.fixture
def pg_database(postgres_url) -> Iterator[str]:
    """A database of this test's own on the session's server, dropped afterwards."""
    url = fresh_database(postgres_url)
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """One store URL per backend, empty: the store contract runs against both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite3'}"
    return request.getfixturevalue("pg_database")


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """An opened store on each engine: SQLite in tmp_path, and this test's own PostgreSQL database."""
    from calmline.store import Database

    database = Database(f"sqlite:///{(tmp_path / 'store.sqlite3').resolve()}" if request.param == "sqlite"
                        else request.getfixturevalue("pg_database"))
    database.open_checked()
    return database
