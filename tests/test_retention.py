"""Retention: `calmline audit prune` and `[audit] keep_days`, on a real store, by real processes."""

from __future__ import annotations

import asyncio
import getpass
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fake_asterisk import bridged_caller, run_session
from serve_process import ServeProcess, environment
from stores import sqlite_db

from calmline.audit.store import AuditStore, read_events, stamp
from calmline.callback.outbox import CallbackRequest, Outbox

CUT = datetime(2026, 11, 1, tzinfo=timezone.utc)


def calmline(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calmline", *args], cwd=cwd, env=environment(),
                          capture_output=True, text=True, timeout=60)


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "calmline.toml"
    path.write_text(
        f'[server]\nport = 0\n[store]\nurl = "sqlite:///{tmp_path / "calmline.sqlite3"}"\n'
        f'[mail]\nport = 1\n' + extra
    )
    return path


def seed_events(db, times: dict[str, datetime]) -> None:
    store = AuditStore(db)
    store.open()
    for name, when in times.items():
        store.submit(stamp("info", {"event": "step", "step": name, "linkedid": name}, t=when.timestamp()))
    assert store.close()


def request(key: str) -> CallbackRequest:
    return CallbackRequest(
        key=key, created_at=CUT - timedelta(days=3), caller_number="+15551234567", caller_name="Bob",
        agent="PJSIP/agent1", warnings=1, reason="abusive caller", uniqueid=key, linkedid=key,
        channel="PJSIP/caller-1",
    )


def seed_outbox(db, rows: dict[str, tuple[str, datetime]]) -> None:
    """One team mail per key, queued at the given time, in the given status."""
    outbox = Outbox(db)
    try:
        for key, (status, queued) in rows.items():
            assert outbox.add(request(key), now=queued.timestamp())
    finally:
        outbox.close()
    conn = db.connect()
    try:
        for key, (status, _queued) in rows.items():
            conn.execute("UPDATE outbox SET status = ? WHERE key = ?", (status, key))
    finally:
        conn.close()


def outbox_keys(db) -> dict[str, str]:
    conn = db.connect()
    try:
        return dict(conn.execute("SELECT key, status FROM outbox WHERE kind = 'team'").fetchall())
    finally:
        conn.close()


def test_prune_removes_exactly_the_events_before_the_cut_and_keeps_pending_mail(tmp_path):
    config = write_config(tmp_path)
    db = sqlite_db(tmp_path / "calmline.sqlite3")
    seed_events(db, {
        "long-ago": CUT - timedelta(days=400),
        "just-before": CUT - timedelta(microseconds=1),
        "at-the-cut": CUT,
        "after": CUT + timedelta(seconds=1),
    })
    seed_outbox(db, {
        "pending-old": ("pending", CUT - timedelta(days=10)),
        "sent-old": ("sent", CUT - timedelta(days=10)),
        "failed-old": ("failed", CUT - timedelta(days=10)),
        "sent-new": ("sent", CUT + timedelta(hours=1)),
    })
    result = calmline("-c", str(config), "audit", "prune", "--before", "2026-11-01", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "pruned 2 event(s) and 2 sent or failed mail(s) from before 2026-11-01T00:00:00.000000+00:00; "
        "kept 1 pending callback mail(s)"
    )
    events = read_events(db, limit=1000)
    steps = sorted(e["step"] for e in events if e["event"] == "step")
    assert steps == ["after", "at-the-cut"]
    assert outbox_keys(db) == {"pending-old": "pending", "sent-new": "sent"}
    (pruned,) = [e for e in events if e["event"] == "audit_pruned"]
    assert pruned["by"] == getpass.getuser()
    assert pruned["before"] == "2026-11-01T00:00:00.000000+00:00"
    assert (pruned["events"], pruned["outbox"], pruned["pending_kept"]) == (2, 2, 1)

    # Again: nothing left before the cut, and the prune's own record stays.
    again = calmline("-c", str(config), "audit", "prune", "--before", "2026-11-01", cwd=tmp_path)
    assert again.returncode == 0 and "pruned 0 event(s)" in again.stdout
    assert len([e for e in read_events(db, limit=1000) if e["event"] == "audit_pruned"]) == 2


@pytest.mark.parametrize(("before", "message"), [
    ("yesterday", "--before: 'yesterday' is not a date"),
    ("2999-01-01", "is in the future"),
])
def test_a_bad_cut_is_refused_with_one_line(tmp_path, before, message):
    config = write_config(tmp_path)
    sqlite_db(tmp_path / "calmline.sqlite3")
    result = calmline("-c", str(config), "audit", "prune", "--before", before, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.strip().count("\n") == 0


def test_the_service_prunes_on_schedule_and_says_so(tmp_path):
    config = write_config(tmp_path, "[audit]\nkeep_days = 30\n")
    db = sqlite_db(tmp_path / "calmline.sqlite3")
    now = datetime.now(timezone.utc)
    seed_events(db, {"old": now - timedelta(days=31), "recent": now - timedelta(days=29)})
    seed_outbox(db, {"pending-old": ("pending", now - timedelta(days=60)),
                     "sent-old": ("sent", now - timedelta(days=60))})
    with ServeProcess(config, cwd=tmp_path) as proc:
        pruned = proc.wait_for("audit_pruned")
    assert pruned["by"] == "schedule" and pruned["keep_days"] == 30
    assert (pruned["events"], pruned["outbox"], pruned["pending_kept"]) == (1, 1, 1)
    cut = datetime.fromisoformat(pruned["before"])
    assert now - timedelta(days=30) <= cut <= datetime.now(timezone.utc) - timedelta(days=30)
    steps = [e["step"] for e in read_events(db, limit=1000) if e["event"] == "step"]
    assert steps == ["recent"]
    assert outbox_keys(db) == {"pending-old": "pending"}


def test_without_keep_days_the_service_keeps_everything(tmp_path):
    config = write_config(tmp_path)
    db = sqlite_db(tmp_path / "calmline.sqlite3")
    seed_events(db, {"ancient": datetime(2001, 1, 1, tzinfo=timezone.utc)})
    with ServeProcess(config, cwd=tmp_path) as proc:
        # A whole session after the start: the schedule's first round has long run by then.
        channel = bridged_caller()
        asyncio.run(run_session(proc.port, channel))
        assert channel.variables["CALMLINE_STATUS"] == "ok"
    assert [e["step"] for e in read_events(db, limit=1000) if e["event"] == "step"][0] == "ancient"
    assert not any(e.get("event") == "audit_pruned" for e in proc.events)


def test_pruned_caller_data_is_gone_from_the_file_itself(tmp_path):
    """SQLite keeps deleted rows' bytes in free pages unless secure_delete is on (Debian builds
    it on by default; the prune turns it on for builds that do not)."""
    config = write_config(tmp_path)
    db = sqlite_db(tmp_path / "calmline.sqlite3")
    store = AuditStore(db)
    store.open()
    for i in range(300):
        store.submit(stamp("info", {"event": "step", "caller_name": f"Zebulon Quintavius {i}"},
                           t=(CUT - timedelta(days=1)).timestamp()))
    assert store.close()
    result = calmline("-c", str(config), "audit", "prune", "--before", "2026-11-01", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    conn = db.connect()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = b"".join(p.read_bytes() for p in tmp_path.glob("calmline.sqlite3*"))
    assert b"Zebulon Quintavius" not in data


def test_a_reload_that_sets_keep_days_prunes_at_once(tmp_path):
    config = write_config(tmp_path)
    db = sqlite_db(tmp_path / "calmline.sqlite3")
    now = datetime.now(timezone.utc)
    seed_events(db, {"old": now - timedelta(days=10), "recent": now - timedelta(days=1)})
    seed_outbox(db, {"pending-old": ("pending", now - timedelta(days=20))})
    with ServeProcess(config, cwd=tmp_path) as proc:
        proc.port
        config.write_text(config.read_text() + "[audit]\nkeep_days = 7\n")
        proc.signal(signal.SIGHUP)
        assert proc.wait_for("config_reloaded")["changed"] == ["audit.keep_days"]
        pruned = proc.wait_for("audit_pruned")
    assert pruned["by"] == "schedule" and pruned["keep_days"] == 7
    assert (pruned["events"], pruned["outbox"], pruned["pending_kept"]) == (1, 0, 1)
    assert [e["step"] for e in read_events(db, limit=1000) if e["event"] == "step"] == ["recent"]
    assert outbox_keys(db) == {"pending-old": "pending"}
