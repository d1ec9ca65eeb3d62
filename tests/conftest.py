"""Shared fixtures: a real calmline service on a free loopback port, with its audit store."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calmline import service as service_module  # noqa: E402
from calmline.audit.store import read_events  # noqa: E402
from calmline.config import Config  # noqa: E402
from postgres import db, pg_database, postgres_cluster, postgres_url, store_url  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    """Tests marked slow are collected only when the marker expression names them (`-m slow`);
    otherwise they are deselected, as `-m` would, and pytest's summary counts them."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


def make_config(tmp_path: Path, **sections) -> Config:
    data = {
        "server": {"host": "127.0.0.1", "port": 0, "environment_timeout": 1.0, "answer_timeout": 5.0},
        "store": {"url": f"sqlite:///{tmp_path / 'calmline.sqlite3'}"},
        "audit": {"stdout": True},
        "mail": {"port": 1},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return Config.model_validate(data)


class EchoFile:
    """The JSON lines the audit writer echoed to the service's stdout (a real file)."""

    def __init__(self, svc, path: Path):
        self._svc = svc
        self._path = path

    def getvalue(self) -> str:
        self._svc.store.flush()
        return self._path.read_text(encoding="utf-8")


class RunningService:
    def __init__(self, svc, stdout: EchoFile):
        self.svc = svc
        self.stdout = stdout

    @property
    def port(self) -> int:
        return self.svc.address[1]

    def events(self, **filters):
        self.svc.store.flush()
        events = read_events(self.svc.store.db, limit=100000)
        return [e for e in events if all(e.get(k) == v for k, v in filters.items())]


@pytest.fixture
def serving(tmp_path):
    """`async with serving(**config_sections) as svc:` runs calmline on a free loopback port."""

    @contextlib.asynccontextmanager
    async def serve(**sections):
        cfg = make_config(tmp_path, **sections)
        echo = tmp_path / "stdout.jsonl"
        with open(echo, "w", encoding="utf-8") as stdout:
            svc = service_module.build(cfg, stdout=stdout)
            await svc.start()
            try:
                yield RunningService(svc, EchoFile(svc, echo))
            finally:
                await svc.stop(grace=2.0)

    return serve


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """A real Asterisk 22 with calmline's rendered dialplan, and `calmline serve` beside it."""
    import os

    import asterisk_lab

    if not asterisk_lab.available():
        message = (
            f"no Asterisk at {asterisk_lab.BINARY}: build it with "
            f"`bash ../shared/asterisk/build-asterisk.sh` (about 3 minutes), then run the tests again"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    lab = asterisk_lab.Lab(tmp_path_factory.mktemp("lab"))
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()
