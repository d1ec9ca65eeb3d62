"""SIGHUP reloads the config of a real `calmline serve` process for new sessions only."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

from conftest import run
from fake_asterisk import bridged_caller, environment, run_session
from serve_process import ServeProcess, environment as child_environment

from calmline import config as config_module
from calmline.reload import fingerprint


OLD, NEW = "calmline/warn-1", "calmline/warn-1-new"


def write_config(path: Path, tmp_path: Path, *, prompt: str = OLD, extra: str = "", port: int = 0) -> None:
    path.write_text(
        f'[server]\nport = {port}\nanswer_timeout = 5.0\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "calmline.sqlite3"}"\n'
        f'[mail]\nport = 1\n'
        f'[warn]\nstages = [{{ prompt = "{prompt}" }}, {{ prompt = "calmline/warn-final" }}]\n'
        + extra
    )


def caller():
    channel = bridged_caller()
    channel.prompts[NEW] = 24000
    return channel


def played(channel) -> list[str]:
    return [c.split('"')[1] for c in channel.commands if c.startswith("STREAM FILE")]


async def held_session(port: int, channel, gate: asyncio.Event, started: asyncio.Event):
    """A session whose Asterisk side answers nothing until `gate` is set: one in flight."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write("".join(environment()).encode())
    await writer.drain()
    first = True
    try:
        async with asyncio.timeout(20):
            while line := await reader.readline():
                if first:
                    started.set()
                    await gate.wait()
                    first = False
                for reply in channel.answer(line.decode().rstrip("\n")):
                    writer.write(reply.encode())
                await writer.drain()
    finally:
        writer.close()
    return channel


def test_sighup_under_load_changes_the_prompt_for_the_next_session_without_failing_one(tmp_path):
    path = tmp_path / "calmline.toml"
    write_config(path, tmp_path)
    with ServeProcess(path) as proc:
        port = proc.port
        before = fingerprint(config_module.load(path)[0])
        assert proc.wait_for("service_started")["fingerprint"] == before

        async def main():
            stop = asyncio.Event()
            channels = []

            async def load_loop():
                while not stop.is_set():
                    channel = caller()
                    channels.append(channel)
                    await run_session(port, channel)

            gate, in_flight = asyncio.Event(), asyncio.Event()
            held = asyncio.create_task(held_session(port, caller(), gate, in_flight))
            workers = [asyncio.create_task(load_loop()) for _ in range(8)]
            await in_flight.wait()
            while len(channels) < 40:
                await asyncio.sleep(0.01)
            write_config(path, tmp_path, prompt=NEW)
            mark = len(proc.events)
            proc.signal(signal.SIGHUP)
            reloaded = await asyncio.to_thread(proc.wait_for, "config_reloaded", after=mark)
            count = len(channels)
            while len(channels) < count + 40:
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.gather(*workers)
            gate.set()
            return reloaded, channels, await held

        reloaded, channels, held = run(main())
        after = fingerprint(config_module.load(path)[0])
        assert reloaded["fingerprint"] == after != before
        assert reloaded["previous_fingerprint"] == before
        assert reloaded["changed"] == ["warn.stages"]

        # Every session under load completed; each played one prompt, old then new, never back.
        assert all(c.variables.get("CALMLINE_STATUS") == "ok" for c in channels)
        prompts = [played(c) for c in channels]
        assert all(len(p) == 1 and p[0] in (OLD, NEW) for p in prompts)
        flat = [p[0] for p in prompts]
        first_new = flat.index(NEW)
        assert OLD in flat[:first_new]
        # Sessions end out of order under load, so a few old ones may finish after the first new
        # one; all of the last 30 started after the reload was announced.
        assert set(flat[-30:]) == {NEW}

        # The session that was running at the reload finished on the config it started with.
        assert played(held) == [OLD] and held.variables["CALMLINE_STATUS"] == "ok"

        # And the next single session after all that hears the new prompt.
        fresh = caller()
        run(run_session(port, fresh))
        assert played(fresh) == [NEW]
    ends = [e for e in proc.events if e.get("event") == "session_end"]
    assert ends and all(e["outcome"] == "completed" for e in ends)
    assert not any(e.get("level") in ("error", "critical") for e in proc.events)


def test_an_invalid_config_on_sighup_is_refused_like_check_and_the_old_one_stays(tmp_path):
    path = tmp_path / "calmline.toml"
    write_config(path, tmp_path)
    with ServeProcess(path) as proc:
        port = proc.port
        running = proc.wait_for("service_started")["fingerprint"]
        write_config(path, tmp_path, prompt="../etc/passwd", extra='[end]\ncode = "x9"\n')
        check = subprocess.run(
            [sys.executable, "-m", "calmline", "-c", str(path), "check", "--no-port"],
            env=child_environment(), capture_output=True, text=True, timeout=60,
        )
        assert check.returncode == 2
        expected = check.stderr.splitlines()
        assert len(expected) == 2 and all(line.startswith("calmline: ") for line in expected)

        mark = len(proc.events)
        proc.signal(signal.SIGHUP)
        refused = proc.wait_for("config_reload_refused", after=mark)
        assert refused["fingerprint"] == running
        assert [f"calmline: {p}" for p in refused["problems"]] == expected
        proc.wait_for_stderr(f"calmline: reload refused; still serving config {running}")
        for line in expected:
            assert line in proc.stderr

        channel = caller()
        run(run_session(port, channel))
        assert played(channel) == [OLD] and channel.variables["CALMLINE_STATUS"] == "ok"

        # Still listening to SIGHUP: a fixed file is taken.
        write_config(path, tmp_path, prompt=NEW)
        proc.signal(signal.SIGHUP)
        proc.wait_for("config_reloaded", after=mark)
        channel = caller()
        run(run_session(port, channel))
        assert played(channel) == [NEW]


def test_a_reload_that_needs_a_restart_names_the_setting_and_changes_nothing(tmp_path):
    path = tmp_path / "calmline.toml"
    write_config(path, tmp_path)
    with ServeProcess(path) as proc:
        port = proc.port
        text = path.read_text().replace(str(tmp_path / "calmline.sqlite3"), str(tmp_path / "other.sqlite3"))
        path.write_text(text.replace("port = 0\n", "port = 4999\n", 1).replace(OLD, NEW))
        proc.signal(signal.SIGHUP)
        refused = proc.wait_for("config_reload_refused")
        keys = [p.split(": ")[1].split(" ")[0] for p in refused["problems"]]
        assert keys == ["server.port", "store.url"]
        assert "cannot change without a restart" in refused["problems"][0]
        assert "(running with 0, the file says 4999)" in refused["problems"][0]
        channel = caller()
        run(run_session(port, channel))
        assert played(channel) == [OLD]


def test_the_fingerprint_is_stable_and_ignores_how_the_file_is_written(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('[warn]\ncode = "*1"\n[server]\nport = 4573\n')
    b.write_text("# same settings, other order and defaults spelled out\n[server]\nport = 4573\nhost = \"127.0.0.1\"\n")
    fa, fb = (fingerprint(config_module.load(p)[0]) for p in (a, b))
    assert fa == fb == fingerprint(config_module.Config())
    b.write_text('[server]\nport = 4574\n')
    assert fingerprint(config_module.load(b)[0]) != fa


def test_secrets_stay_out_of_the_fingerprint_and_the_refusal(tmp_path):
    from calmline.reload import refusals, shown

    base = config_module.parse('[mail]\npassword = "hunter2"\n')
    other = config_module.parse('[mail]\npassword = "correct horse"\n')
    assert fingerprint(base) == fingerprint(other)
    assert fingerprint(base) != fingerprint(config_module.Config())  # set or not still shows
    assert shown("x.url", "postgresql://calm:s3cret@db:5432/calm") == "postgresql://calm:***@db:5432/calm"
    a = config_module.parse('[server]\nhost = "127.0.0.1"\n')
    b = config_module.parse('[server]\nhost = "10.0.0.1"\n')
    (line,) = refusals(a, b, "t.toml")
    assert line.startswith("t.toml: server.host cannot change without a restart (running with '127.0.0.1', "
                           "the file says '10.0.0.1')")
