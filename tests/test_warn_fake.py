"""The warn ladder end to end: real server, real socket, fake Asterisk from transcripts."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from conftest import run
from fake_asterisk import bridged_caller, environment, run_session


def test_first_press_plays_stage_one_and_counts_it(serving):
    async def main():
        async with serving() as svc:
            channel = bridged_caller()
            dialogue = await run_session(svc.port, channel)
            return svc, channel, dialogue

    svc, channel, dialogue = run(main())
    assert dialogue.commands[0] == (
        'GET FULL VARIABLE "${CHANNEL(linkedid)}]|[${BRIDGEPEER}]|[${CALMLINE_WARNINGS}"'
    )
    assert 'STREAM FILE "calmline/warn-1" ""' in dialogue.commands
    assert channel.variables["CALMLINE_WARNINGS"] == "1"
    assert channel.variables["CALMLINE_STATUS"] == "ok"
    assert dialogue.closed_by_server
    steps = svc.events(event="step")
    assert [s["step"] for s in steps] == ["warning_played"]
    step = steps[0]
    assert step["warning"] == 1 and step["final"] is False
    assert step["linkedid"] == "1795350788.44"
    assert step["agent"] == "Local/warnscn@sim-agent-00000017;1"
    assert step["caller_name"] == 'Angry "Bob" Smith'
    assert step["uniqueid"] == "1795350788.44"
    end = svc.events(event="session_end")[0]
    assert end["outcome"] == "completed" and end["status"] == "ok"


@pytest.mark.parametrize(
    ("given", "prompt", "final"),
    [("1", "calmline/warn-final", True), ("2", "calmline/warn-final", True), ("7", "calmline/warn-final", True)],
)
def test_later_presses_escalate_then_repeat_the_last(serving, given, prompt, final):
    async def main():
        async with serving() as svc:
            channel = bridged_caller()
            channel.variables["CALMLINE_WARNINGS"] = given
            dialogue = await run_session(svc.port, channel)
            return svc, channel, dialogue

    svc, channel, dialogue = run(main())
    assert f'STREAM FILE "{prompt}" ""' in dialogue.commands
    assert channel.variables["CALMLINE_WARNINGS"] == str(int(given) + 1)
    step = svc.events(event="step")[0]
    assert step["final"] is final and step["warning"] == int(given) + 1


def test_missing_prompt_is_an_audited_failure_and_the_count_stays(serving):
    async def main():
        async with serving() as svc:
            channel = bridged_caller(prompts={})
            await run_session(svc.port, channel)
            return svc, channel

    svc, channel = run(main())
    assert "CALMLINE_WARNINGS" not in channel.variables
    assert channel.variables["CALMLINE_STATUS"] == "failed"
    end = svc.events(event="session_end")[0]
    assert end["outcome"] == "prompt_missing"
    assert "calmline/warn-1" in end["error"]
    assert any(c.startswith("VERBOSE ") and "prompt_missing" in c for c in channel.commands)


@pytest.mark.parametrize("step", range(4))
def test_hangup_at_every_step_ends_cleanly(serving, step):
    async def main():
        async with serving() as svc:
            channel = bridged_caller(hangup_before=step)
            dialogue = await run_session(svc.port, channel)
            return svc, channel, dialogue

    svc, channel, dialogue = run(main())
    end = svc.events(event="session_end")[0]
    # Hanging up before the last command (the status) means the action itself completed.
    expected = "completed" if step == 3 else "caller_hung_up"
    assert end["outcome"] == expected
    assert dialogue.closed_by_server
    assert not any("Traceback" in line for line in svc.stdout.getvalue().splitlines())


def test_hangup_during_the_prompt(serving):
    async def main():
        async with serving() as svc:
            channel = bridged_caller(hangup_during_prompt=1)
            await run_session(svc.port, channel)
            return svc, channel

    svc, channel = run(main())
    end = svc.events(event="session_end")[0]
    assert end["outcome"] == "caller_hung_up" and end["status"] == "hungup"
    assert channel.variables.get("CALMLINE_STATUS") == "hungup"


def test_unknown_path_is_refused_with_a_console_line(serving):
    async def main():
        async with serving() as svc:
            channel = bridged_caller()
            await run_session(svc.port, channel, environment("nonsense/../x"))
            return svc, channel

    svc, channel = run(main())
    assert channel.variables["CALMLINE_STATUS"] == "refused"
    assert any(c.startswith('VERBOSE "calmline: refused: no action at path') for c in channel.commands)
    assert not any(c.startswith("STREAM FILE") for c in channel.commands)
    end = svc.events(event="session_end")[0]
    assert end["outcome"] == "refused"


def test_a_store_that_refuses_does_not_hold_the_caller(serving, tmp_path):
    """With the audit database locked by someone else, the warning still ends within
    audit.commit_timeout, with its status set, and its step is stored once the lock goes."""

    async def main():
        async with serving(audit={"commit_timeout": 0.5}) as svc:
            blocker = sqlite3.connect(svc.svc.store.db.path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            channel = bridged_caller()
            started = time.monotonic()
            dialogue = await asyncio.wait_for(run_session(svc.port, channel), 10)
            took = time.monotonic() - started
            blocker.execute("ROLLBACK")
            blocker.close()
            return svc, channel, dialogue, took

    svc, channel, dialogue, took = run(main())
    assert took < 3
    assert dialogue.closed_by_server
    assert channel.variables["CALMLINE_STATUS"] == "ok"
    assert channel.variables["CALMLINE_WARNINGS"] == "1"
    assert [s["step"] for s in svc.events(event="step")] == ["warning_played"]
    assert svc.events(event="step_not_yet_durable")[0]["step"] == "warning_played"


def test_the_counter_moves_only_after_the_warning_is_durable(serving):
    """A service killed between the two must never leave Asterisk counting a warning the trail
    lacks: when SET VARIABLE CALMLINE_WARNINGS reaches Asterisk, the step is already committed.
    The store is held locked past the prompt, so a counter sent before the commit is caught."""
    seen_at_counter: list[list[str]] = []

    class Watching(type(bridged_caller())):
        def answer(self, line):
            if line.startswith("SET VARIABLE CALMLINE_WARNINGS"):
                reader = sqlite3.connect(db_path)
                try:
                    seen_at_counter.append([s for (s,) in reader.execute(
                        "SELECT step FROM events WHERE event = 'step'")])
                finally:
                    reader.close()
            return super().answer(line)

    async def main():
        nonlocal db_path
        async with serving(audit={"commit_timeout": 5.0}) as svc:
            db_path = svc.svc.store.db.path
            blocker = sqlite3.connect(db_path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            asyncio.get_running_loop().call_later(0.5, blocker.execute, "ROLLBACK")
            channel = bridged_caller()
            channel.__class__ = Watching
            await asyncio.wait_for(run_session(svc.port, channel), 10)
            blocker.close()
            return channel

    db_path = None
    channel = run(main())
    assert channel.variables["CALMLINE_WARNINGS"] == "1"
    assert seen_at_counter == [["warning_played"]]
