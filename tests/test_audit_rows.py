"""What the audit writer stores: rows equal to the reference rendering, and old stores upgraded."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import time

import pytest
import structlog
from conftest import run

from calmline.audit import trail as audit
from calmline.audit.trail import AuditStore, AuditTrail, Renderer, configure, read_events, render
from calmline.audit.writer import Echo

T = 1795350788.123456
CALL = {"session": "ab12cd-7", "peer": "127.0.0.1:40000", "action": "warn", "uniqueid": "1795350788.44",
        "channel": "PJSIP/caller-00000001", "caller_number": "5551234", "caller_name": "Eve",
        "linkedid": "1795350788.40", "agent": "PJSIP/agent-00000002"}

RECORDS = [
    ("e", "info", {"event": "session_start", "params": None}, CALL, T),
    ("e", "info", {"event": "step", "step": "warning_played", "warning": 1, "final": False}, CALL, T + 1),
    ("e", "warn", {"event": "prompt_missing", "prompt": "calmline/x"}, CALL, T + 2),
    # The same session, its identity grown (bound again after the bridge was read).
    ("e", "info", {"event": "session_end"}, {**CALL, "caller_channel": "PJSIP/caller-00000001"}, T + 3),
    # Another session with the same session id (a restart): the cached identity must not leak.
    ("e", "info", {"event": "session_end"}, {**CALL, "caller_name": "Mallory"}, T + 4),
    # An event field that is also bound: the event's value wins, in the bound key's place.
    ("e", "info", {"event": "x", "linkedid": "override", "action": "end"}, CALL, T),
    # Fields that clash with what stamping adds.
    ("e", "info", {"event": "x", "level": "custom", "ts": "then"}, CALL, T),
    ("e", "info", {"event": "x"}, {**CALL, "ts": "bound-ts"}, T),
    # Outside a session: nothing bound, or an empty binding.
    ("e", "info", {"event": "mail_sent", "to": "a@example.org"}, None, T),
    ("e", "info", {"event": "mail_sent"}, {}, T),
    # Caller-supplied text that must stay inert: quotes, newlines, controls, non-ASCII.
    ("e", "info", {"event": "x", "note": 'a"b\\c\n}{'}, {**CALL, "caller_name": '"}\n\u202e\x00é'}, T),
    ("e", "info", {"event": "x", "nested": {"a": [1, 2.5, None, True]}}, CALL, T),
    ("d", {"event": "finished", "ts": "2026-01-01T00:00:00+00:00", "linkedid": "L.1", "level": "info"}),
]


def test_every_row_is_the_reference_rendering():
    renderer = Renderer(size=2)  # small, so the cache is also cleared on the way
    for record in RECORDS * 2:
        line, ts, linkedid = renderer.row(record)
        assert line == render(record), record
        event = json.loads(line)
        assert (ts, linkedid) == (event["ts"], event.get("linkedid"))


def test_timestamps_are_spelled_as_datetime_spells_them():
    """The writer formats a second once and adds the microseconds: rounding and carries
    into the next second must come out as `datetime.fromtimestamp` has them."""
    import random

    rng = random.Random(7)
    times = [T, 0.0, 1.0, 59.9999995, 59.9999994, 1795350788.9999996, 1795350799.0000005,
             1795350788.0000025, 1795350788.0000035, -1.25, 1795350788]
    times += [1795350788 + rng.random() * 5 for _ in range(3000)]
    times += [1795350788 + n / 128 for n in range(128)]  # exact halves of a microsecond: n/128 s
    times += [1795350788 + rng.randrange(5_000_000) / 1e6 + 5e-7 for _ in range(3000)]
    renderer = Renderer()
    for t in times:
        record = ("e", "info", {"event": "x"}, CALL, t)
        line, ts, _ = renderer.row(record)
        assert line == render(record), t
        assert ts == json.loads(render(record))["ts"], t


def test_an_event_too_deep_for_json_and_repr_is_kept_as_bounded_text():
    """Deep enough for marshal to carry it to the writer, too deep for JSON and for repr():
    the writer must still give it a row, or it would die on it and be sent it again."""
    deep: list = []
    for _ in range(1500):
        deep = [deep]
    line, ts, linkedid = Renderer().row(("e", "info", {"event": "deep", "data": deep}, CALL, T))
    event = json.loads(line)
    assert (event["event"], event["level"]) == ("unrenderable_event", "error")
    assert "'event': 'deep'" in event["text"] and len(event["text"]) <= 2000
    assert ts == event["ts"] and linkedid == event["linkedid"] == CALL["linkedid"]  # whose call


def test_column_values_are_always_bindable_and_the_json_keeps_the_original():
    odd = [
        ("d", {"event": "a", "ts": {"not": "text"}, "linkedid": ["x"]}),
        ("d", {"event": "b", "ts": 5, "linkedid": "bad\udc80byte"}),
        ("e", "info", {"event": "c"}, {"session": "s", "linkedid": 42}, T),
    ]
    conn = sqlite3.connect(":memory:")
    conn.executescript(audit._SCHEMA)
    renderer = Renderer()
    conn.executemany(audit.INSERT, [renderer.row(r) for r in odd])
    rows = conn.execute("SELECT ts, linkedid, event, data FROM events ORDER BY id").fetchall()
    assert rows[0][:3] == ('{"not": "text"}', '["x"]', "a")
    assert rows[1][:3] == ("5", "bad?byte", "b")
    assert rows[2][1:3] == ("42", "c")
    assert json.loads(rows[0][3])["ts"] == {"not": "text"}
    assert json.loads(rows[1][3])["linkedid"] == "bad\udc80byte"


# The layout calmline used before `event_rows`: every column generated from the JSON.
OLD_SCHEMA = (
    "CREATE TABLE events (id INTEGER PRIMARY KEY, data TEXT NOT NULL"
    + "".join(f", {c} TEXT GENERATED ALWAYS AS (json_extract(data, '$.{c}')) VIRTUAL"
              for c in ("ts", "event", "level", "session", "uniqueid", "linkedid", "action", "step",
                        "outcome", "agent", "caller_number"))
    + ");\nCREATE INDEX events_ts ON events (ts);\nCREATE INDEX events_linkedid ON events (linkedid);\n"
)


def test_a_store_in_the_old_layout_is_moved_once_and_keeps_every_event(tmp_path, capfd):
    path = tmp_path / "audit.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SCHEMA)
    old = [{"event": "step", "step": "warning_played", "ts": f"2026-01-0{i}T00:00:00+00:00",
            "linkedid": f"L.{i % 2}", "level": "info"} for i in range(1, 6)]
    with conn:
        conn.executemany("INSERT INTO events (data) VALUES (?)", [(json.dumps(e),) for e in old])
    conn.close()

    async def main():
        store = AuditStore(path)
        store.open()
        configure(store)
        try:
            await asyncio.wait_for(AuditTrail(store).step("after_the_upgrade"), 5)
        finally:
            store.close()
            structlog.reset_defaults()

    run(main())
    assert "moving the 5 events of" in capfd.readouterr().err
    events = read_events(path)
    assert [e["ts"] for e in events[:5]] == [e["ts"] for e in old]
    assert events[5]["step"] == "after_the_upgrade"
    assert [e["ts"] for e in read_events(path, linkedid="L.1")] == [old[0]["ts"], old[2]["ts"], old[4]["ts"]]
    conn = sqlite3.connect(path)
    try:
        kinds = dict(conn.execute("SELECT name, type FROM sqlite_master WHERE name LIKE 'event%'"))
        plan = " ".join(r[3] for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT data FROM events WHERE ts >= '2026-01-03'"))
        ids = [r[0] for r in conn.execute("SELECT id FROM events ORDER BY id")]
    finally:
        conn.close()
    assert kinds == {"events": "view", "event_rows": "table", "event_rows_ts": "index",
                     "event_rows_linkedid": "index"}
    assert "event_rows_ts" in plan
    assert ids == list(range(1, 7))

    # Opening it again finds nothing to move.
    store = AuditStore(path)
    store.open()
    store.close()
    assert "moving" not in capfd.readouterr().err
    assert len(read_events(path)) == 6


@pytest.mark.parametrize("name", ["event_rows_ts", "event_rows_linkedid"])
def test_reads_by_time_and_by_call_use_an_index(tmp_path, name):
    conn = sqlite3.connect(tmp_path / "a.sqlite3")
    conn.executescript(audit._SCHEMA)
    column = "ts" if name.endswith("ts") else "linkedid"
    plan = " ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN SELECT data FROM events WHERE {column} = ?", ("x",)))
    conn.close()
    assert name in plan


def test_the_view_derives_the_columns_the_report_filters_on(tmp_path):
    path = tmp_path / "a.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(audit._SCHEMA)
    conn.executemany(audit.INSERT, [Renderer().row(r) for r in RECORDS[:3]])
    got = conn.execute("SELECT event, level, step, session, uniqueid, action, agent, caller_number FROM events").fetchall()
    conn.close()
    assert got[1] == ("step", "info", "warning_played", CALL["session"], CALL["uniqueid"], "warn",
                      CALL["agent"], CALL["caller_number"])
    assert got[2][1] == "warning"


class _Unprintable:
    def __str__(self):
        raise ValueError("no text for this one")

    def __repr__(self):
        return "<unprintable>"


def test_what_json_cannot_take_is_kept_as_text_not_dropped():
    keyed = ("e", "info", {"event": "odd", "counts": {("warn", 1): 2}}, CALL, T)
    line, ts, linkedid = Renderer().row(keyed)
    assert line == render(keyed)
    assert json.loads(line)["counts"] == {"('warn', 1)": 2}
    assert (ts, linkedid) == (json.loads(line)["ts"], CALL["linkedid"])
    hopeless = ("e", "info", {"event": "odd", "thing": _Unprintable()}, None, T)
    kept = json.loads(render(hopeless))
    assert kept["event"] == "unrenderable_event" and kept["level"] == "error"
    assert "<unprintable>" in kept["text"] and "no text for this one" in kept["error"]


def _dropped(err: str) -> int:
    return sum(int(part.split()[0]) for part in err.split("stdout is read again; ")[1:])


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_the_echo_never_blocks_on_a_stdout_nobody_reads(capfd, kind):
    if kind == "pipe":
        read_end, write_end = os.pipe()
    else:
        reader, writer = socket.socketpair()
        read_end, write_end = reader.detach(), writer.detach()
    blocking_before = os.get_blocking(write_end)
    echo = Echo(write_end, limit=100_000)
    line = ('{"event": "x", "pad": "' + "p" * 1000 + '"}',)
    started = time.monotonic()
    for _ in range(1000):  # 1 MB: far more than the pipe or socket and the limit hold
        echo.lines([line])
    assert time.monotonic() - started < 1.0
    assert os.get_blocking(write_end) == blocking_before  # the service's stdout is left as it was
    err = capfd.readouterr().err
    assert "stdout is not being read" in err
    # Now someone reads: what waited comes out, and stderr counts what was dropped.
    os.set_blocking(read_end, False)
    got = b""
    deadline = time.monotonic() + 5
    while "stdout is read again" not in err and time.monotonic() < deadline:
        try:
            got += os.read(read_end, 1 << 16)
        except BlockingIOError:
            time.sleep(0.01)
        echo.flush()
        err += capfd.readouterr().err
    echo.finish()
    os.close(write_end)
    os.set_blocking(read_end, True)
    while chunk := os.read(read_end, 1 << 16):
        got += chunk
    os.close(read_end)
    printed = got.splitlines()
    assert all(json.loads(p)["event"] == "x" for p in printed)  # whole lines only
    assert len(printed) + _dropped(err) == 1000 and _dropped(err) > 0


def test_the_echo_stops_quietly_when_stdout_is_closed(capfd):
    read_end, write_end = os.pipe()
    os.close(read_end)
    echo = Echo(write_end)
    echo.lines([('{"event": "x"}',)])
    echo.lines([('{"event": "y"}',)])  # after it has gone: nothing, and no exception
    echo.finish()
    os.close(write_end)
    err = capfd.readouterr().err
    assert err.count("stdout closed") == 1


def test_a_line_half_written_when_the_echo_starts_dropping_is_still_completed(capfd):
    read_end, write_end = os.pipe()
    echo = Echo(write_end, limit=10)  # less than one line: everything unsent is over the limit
    big = [(f'{{"event": "x", "n": {i}, "pad": "{"p" * 3000}"}}',) for i in range(40)]
    echo.lines(big)  # 120 kB at once: the pipe takes part of it, ending inside a line
    os.set_blocking(read_end, False)
    got = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (echo.behind or not got):
        try:
            got += os.read(read_end, 1 << 16)
        except BlockingIOError:
            time.sleep(0.01)
        echo.flush()
    try:
        got += os.read(read_end, 1 << 16)
    except BlockingIOError:
        pass
    echo.finish()
    os.close(write_end)
    os.close(read_end)
    assert got.endswith(b"\n")
    printed = [json.loads(line)["n"] for line in got.splitlines()]  # every line whole
    assert printed == list(range(len(printed))) and 0 < len(printed) < 40
    assert f"stdout is read again; {40 - len(printed)} JSON lines" in capfd.readouterr().err
