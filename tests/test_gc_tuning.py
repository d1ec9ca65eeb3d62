"""`calmline serve` tunes Python's cyclic garbage collector; cycles are still collected."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import weakref

import pytest

from calmline import service as service_module
from conftest import make_config


@pytest.fixture
def restored_gc():
    """Whatever a test does to the collector, the rest of the suite gets it back as it was."""
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_serve_tunes_the_collector_once_it_listens(tmp_path, restored_gc):
    config = make_config(tmp_path, audit={"stdout": False})
    gc.unfreeze()
    seen: dict[str, object] = {}

    async def main():
        task = asyncio.create_task(service_module.serve(config, "test"))
        for _ in range(500):
            if gc.get_threshold()[0] != 700 or task.done():
                break
            await asyncio.sleep(0.01)
        seen["threshold"] = gc.get_threshold()
        seen["frozen"] = gc.get_freeze_count()
        os.kill(os.getpid(), signal.SIGTERM)  # serve() stops on it, as under systemd
        await asyncio.wait_for(task, 15)

    gc.set_threshold(700, 10, 10)
    asyncio.run(main())
    assert seen["threshold"] == (5_000, 10, 10)
    assert seen["frozen"] > 1000  # what startup built: modules, config, pydantic models


def test_cycles_are_still_collected_after_tuning(restored_gc):
    service_module.tune_gc()

    class Node:
        pass

    collected = []
    for i in range(20_000):  # more net new objects than the tuned first threshold
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: only the collector can free it
        if i == 0:
            weakref.finalize(a, collected.append, "first cycle")
        del a, b
        if collected:
            break
    assert collected == ["first cycle"], "a cycle survived 20,000 more: the collector never ran"
