"""The cool-down's logic against a fake AMI (tests/fake_ami.py) and a real SQLite store.

The same flows run on the real Asterisk 22 in test_asterisk_cooldown.py; here the AMI can be
taken down and brought back at will, and the clock of the worker is the test's.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from conftest import make_config, run
from fake_ami import FakeAMI, Member
from fake_asterisk import bridged_caller, environment, run_session
from stores import sqlite_db

from calmline.actions.cooldown import REASON, CooldownStore, CooldownWorker
from calmline.audit.trail import AuditTrail

IFACE = "Local/queueagent@sim-agent/n"


@pytest.fixture
def ami(monkeypatch):
    fake = FakeAMI(queues={"support": {IFACE: Member()}, "sales": {IFACE: Member()},
                           "other": {"PJSIP/9": Member()}})
    fake.start()
    monkeypatch.setenv("CALMLINE_AMI_SECRET", fake.secret)
    yield fake
    fake.stop()


def cooldown_sections(ami: FakeAMI, **cooldown):
    return {
        "ami": {"port": ami.port, "username": ami.username, "timeout": 2.0},
        "cooldown": {"enabled": True, "seconds": 1, "poll_seconds": 0.05, "retry_seconds": 0.1, **cooldown},
    }


async def wait_for(predicate, timeout=8.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return False


def queue_caller(**functions):
    channel = bridged_caller()
    channel.functions.update(functions)
    return channel


def test_end_on_a_queue_call_pauses_in_every_queue_then_unpauses_when_due(serving, ami):
    async def main():
        async with serving(**cooldown_sections(ami)) as svc:
            await run_session(svc.port, queue_caller(MEMBERINTERFACE=IFACE), environment("end"))
            assert await wait_for(lambda: len(ami.pauses()) == 2)
            paused_at = time.monotonic()
            assert {m.reason for q in ("support", "sales") for m in [ami.queues[q][IFACE]]} == {REASON}
            assert await wait_for(lambda: len(ami.pauses()) == 4)
            return svc, time.monotonic() - paused_at

    svc, waited = run(main())
    assert sorted(ami.pauses()[:2]) == [(IFACE, "sales", "true", REASON), (IFACE, "support", "true", REASON)]
    assert sorted(p[:3] for p in ami.pauses()[2:]) == [(IFACE, "sales", "false"), (IFACE, "support", "false")]
    assert 0.5 < waited < 3.0  # seconds = 1
    assert not ami.queues["support"][IFACE].paused and not ami.queues["sales"][IFACE].paused
    assert not ami.queues["other"]["PJSIP/9"].paused
    steps = [e["step"] for e in svc.events(event="step")]
    assert steps[-1] == "cooldown_scheduled"
    scheduled = svc.events(step="cooldown_scheduled")[0]
    assert scheduled["interface"] == IFACE and scheduled["trigger"] == "end" and scheduled["seconds"] == 1
    assert sorted(svc.events(event="cooldown_paused")[0]["queues"]) == ["sales", "support"]
    assert sorted(svc.events(event="cooldown_unpaused")[0]["queues"]) == ["sales", "support"]
    assert svc.events(event="cooldown_paused")[0]["linkedid"] == "1795350788.44"


def test_a_dial_call_without_a_queue_is_not_paused_and_the_trail_says_so(serving, ami):
    async def main():
        async with serving(**cooldown_sections(ami)) as svc:
            await run_session(svc.port, queue_caller(), environment("end"))
            await asyncio.sleep(0.3)
            return svc

    svc = run(main())
    assert ami.pauses() == []
    step = svc.events(step="cooldown_not_started")[0]
    assert "MEMBERINTERFACE is unset" in step["reason"] and "setinterfacevar = yes" in step["reason"]
    assert svc.events(event="session_end")[0]["outcome"] == "completed"


def test_the_final_warning_starts_one_only_when_after_names_it(serving, ami):
    async def main(after):
        async with serving(**cooldown_sections(ami, after=after)) as svc:
            channel = queue_caller(MEMBERINTERFACE=IFACE, CALMLINE_WARNINGS="1")
            await run_session(svc.port, channel, environment("warn"))
            await asyncio.sleep(0.3)
            return svc

    svc = run(main(["end"]))
    assert ami.pauses() == [] and not svc.events(step="cooldown_scheduled")
    svc = run(main(["end", "final_warning"]))
    assert svc.events(step="cooldown_scheduled")[0]["trigger"] == "final_warning"
    assert len(ami.pauses()) == 2


def test_one_call_pauses_once_even_after_the_final_warning_and_the_end(serving, ami):
    async def main():
        async with serving(**cooldown_sections(ami, seconds=30, after=["end", "final_warning"])) as svc:
            channel = queue_caller(MEMBERINTERFACE=IFACE, CALMLINE_WARNINGS="1")
            await run_session(svc.port, channel, environment("warn"))
            await run_session(svc.port, queue_caller(MEMBERINTERFACE=IFACE), environment("end"))
            await asyncio.sleep(0.4)
            return svc

    svc = run(main())
    assert len(ami.pauses()) == 2
    assert "already started a cool-down" in svc.events(step="cooldown_not_started")[0]["reason"]


def worker_for(tmp_path, ami, **cooldown):
    cfg = make_config(tmp_path, **cooldown_sections(ami, **cooldown))
    db = sqlite_db(tmp_path / "calmline.sqlite3")
    store = CooldownStore(db)
    events: list[tuple[str, dict]] = []

    class Trail(AuditTrail):
        def __init__(self):
            super().__init__(None)

        def event(self, event, **fields):
            events.append((event, fields))
            return 0

        problem = event

    return CooldownWorker(store, lambda: cfg, Trail()), store, events


def test_an_agent_who_unpaused_by_hand_is_not_paused_again_nor_unpaused(tmp_path, ami):
    worker, store, events = worker_for(tmp_path, ami)
    store.schedule(IFACE, "call-1", "end", 60)
    assert run(worker.run_once()) == 1
    assert len(ami.pauses()) == 2
    ami.queues["support"][IFACE] = Member(False, "")  # the agent unpaused by hand here
    ami.queues["sales"][IFACE] = Member(True, "lunch")  # and a supervisor paused them for lunch there
    assert run(worker.run_once(time.time() + 30)) == 0  # nothing due yet, nothing re-paused
    assert run(worker.run_once(time.time() + 61)) == 1
    assert len(ami.pauses()) == 2, "no QueuePause after the manual unpause"
    left = dict(events)["cooldown_left_alone"]["queues"]
    assert left == {"support": "unpaused already (by hand)", "sales": "paused for another reason (lunch)"}
    assert ami.queues["sales"][IFACE].paused and ami.queues["sales"][IFACE].reason == "lunch"
    assert store.rows()[0]["state"] == "done" and store.rows()[0]["outcome"] == "left_alone"


def test_an_agent_already_paused_for_a_break_is_left_paused(tmp_path, ami):
    ami.queues["support"][IFACE] = Member(True, "break")
    worker, store, events = worker_for(tmp_path, ami)
    store.schedule(IFACE, "call-1", "end", 60)
    run(worker.run_once())
    assert ami.pauses() == [(IFACE, "sales", "true", REASON)]
    run(worker.run_once(time.time() + 61))
    assert ami.pauses()[1:] == [(IFACE, "sales", "false", REASON)]
    assert ami.queues["support"][IFACE].reason == "break" and ami.queues["support"][IFACE].paused


def test_ami_down_is_retried_until_it_is_back_and_the_trail_says_what_happened(tmp_path, ami):
    worker, store, events = worker_for(tmp_path, ami)
    ami.stop()
    store.schedule(IFACE, "call-1", "end", 60)
    for n in range(3):
        run(worker.run_once(time.time() + 1 + n))
    names = [name for name, _ in events]
    assert names.count("cooldown_ami_failed") == 1, "one line per outage, not one per retry"
    failed = dict(events)["cooldown_ami_failed"]
    assert failed["action"] == "pause" and "127.0.0.1" in failed["error"]
    assert store.rows()[0]["state"] == "pausing" and store.rows()[0]["attempts"] == 3
    ami.start()
    run(worker.run_once(time.time() + 5))
    assert len(ami.pauses()) == 2
    assert "cooldown_ami_back" in [name for name, _ in events]
    ami.stop()
    run(worker.run_once(time.time() + 61))  # the unpause is due, AMI is down again
    assert store.rows()[0]["state"] == "paused"
    ami.start()
    run(worker.run_once(time.time() + 62))
    assert [p[2] for p in ami.pauses()] == ["true", "true", "false", "false"]
    assert store.rows()[0]["outcome"] == "unpaused"


def test_ami_down_for_the_whole_cooldown_never_pauses_late(tmp_path, ami):
    worker, store, events = worker_for(tmp_path, ami)
    ami.stop()
    store.schedule(IFACE, "call-1", "end", 5)
    run(worker.run_once())
    ami.start()
    run(worker.run_once(time.time() + 6))
    assert ami.pauses() == []
    assert store.rows()[0]["outcome"] == "not_paused_too_late"
    assert dict(events)["cooldown_not_paused"]["reason"] == "AMI was unavailable until the cool-down was over"


def test_a_restarted_worker_unpauses_an_overdue_cooldown_at_once(tmp_path, ami):
    first, store, _ = worker_for(tmp_path, ami)
    store.schedule(IFACE, "call-1", "end", 2)
    run(first.run_once())
    store.close()  # the first instance is gone (its lease on the row ended with the pause)
    second, store2, events = worker_for(tmp_path, ami)
    assert run(second.run_once(time.time() + 1)) == 0
    assert run(second.run_once(time.time() + 10)) == 1
    assert [p[2] for p in ami.pauses()] == ["true", "true", "false", "false"]
    assert dict(events)["cooldown_unpaused"]["late_seconds"] >= 7


def test_of_several_instances_exactly_one_takes_each_due_cooldown(store_url):
    """Four instances claim at once: SKIP LOCKED on PostgreSQL, BEGIN IMMEDIATE on SQLite."""
    from calmline.store import Database

    def database() -> Database:
        db = Database(store_url)
        db.open_checked()
        return db

    scheduler = CooldownStore(database())
    scheduler.schedule(IFACE, "call-1", "end", 60)
    for n in range(20):
        scheduler.schedule(f"PJSIP/{n}", f"call-{n}", "end", 60)
    scheduler.close()
    taken: list[list[int]] = []
    barrier = threading.Barrier(4)

    def instance():
        store = CooldownStore(database())
        barrier.wait()
        mine = []
        for _ in range(10):
            mine += [row.id for row in store.claim(time.time(), lease=30, limit=3)]
        taken.append(mine)
        store.close()

    threads = [threading.Thread(target=instance) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = sorted(i for mine in taken for i in mine)
    assert len(everything) == 21 and len(set(everything)) == 21, "each row taken once, none twice"


def test_a_later_cooldown_of_the_same_agent_keeps_them_paused(tmp_path, ami):
    worker, store, events = worker_for(tmp_path, ami)
    store.schedule(IFACE, "call-1", "end", 10)
    run(worker.run_once())
    store.schedule(IFACE, "call-2", "end", 100)
    run(worker.run_once())
    assert len(ami.pauses()) == 2  # already paused by the first: not paused again
    assert sorted(dict(events)["cooldown_paused"]["extended"]) == ["sales", "support"]
    run(worker.run_once(time.time() + 11))
    assert len(ami.pauses()) == 2, "the first cool-down's end does not unpause"
    run(worker.run_once(time.time() + 101))
    assert [p[2] for p in ami.pauses()] == ["true", "true", "false", "false"]


def test_check_logs_in_with_ami_and_names_each_queue_without_setinterfacevar(tmp_path, ami):
    from calmline.admin.check import _check_ami_config

    ami.queues_conf = {"general": ["persistentmembers=yes"],
                       "support": ["strategy=ringall", "setinterfacevar=yes", "member=PJSIP/1"],
                       "sales": ["strategy=ringall", "member=PJSIP/2"]}
    cfg = make_config(tmp_path, **cooldown_sections(ami))
    problems, notes = _check_ami_config(cfg)
    assert f"AMI login to 127.0.0.1:{ami.port} as 'calmline' works" in notes
    assert len(problems) == 1 and problems[0].startswith("cooldown.enabled: queue 'sales' has no `setinterfacevar = yes`")
    ami.queues_conf["sales"].append("setinterfacevar = Yes")
    problems, notes = _check_ami_config(cfg)
    assert problems == [] and "every queue in queues.conf has setinterfacevar = yes (2 queues)" in notes[-1]


def test_check_names_a_failed_ami_login(tmp_path, ami, monkeypatch):
    from calmline.admin.check import _check_ami_config

    monkeypatch.setenv("CALMLINE_AMI_SECRET", "wrong")
    problems, _ = _check_ami_config(make_config(tmp_path, **cooldown_sections(ami)))
    assert problems[0].startswith("ami.host/ami.port/ami.username: AMI login to 127.0.0.1:")
    assert "as 'calmline' failed" in problems[0]
    monkeypatch.delenv("CALMLINE_AMI_SECRET")
    problems, _ = _check_ami_config(make_config(tmp_path, **cooldown_sections(ami)))
    assert problems[0].startswith("ami.secret_env: CALMLINE_AMI_SECRET is not set")
