"""bench/big_store.py writes a trail shaped like the service's, and a tally that matches it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from calmline.actions import catalog
from calmline.store import Database

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "big_store.py"
STEPS = {value for name, value in vars(catalog).items() if name.isupper() and isinstance(value, str)
         and name not in ("TRANSFER_RESULT_READS",)}


def test_the_cli_builds_a_store_of_whole_sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'big.sqlite3'}"
    done = subprocess.run([sys.executable, str(SCRIPT), "--url", url, "--events", "3000", "--days", "10"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    conn = Database(url).connect()
    rows = [json.loads(data) for (data,) in conn.execute("SELECT data FROM events ORDER BY id")]
    outbox = conn.execute("SELECT key, kind, status FROM outbox").fetchall()
    conn.close()
    assert 3000 <= len(rows) < 3020 and f"{len(rows):,} events" in done.stdout
    sessions: dict[str, list[dict]] = {}
    for event in rows:
        if "session" in event:
            sessions.setdefault(event["session"], []).append(event)
    for events in sessions.values():
        kinds = [e["event"] for e in events]
        assert kinds[0] == "session_start" and kinds[-1] == "session_end", kinds
        assert kinds.count("session_start") == kinds.count("session_end") == 1
        assert {e["step"] for e in events if e["event"] == "step"} <= STEPS
        assert len({e["linkedid"] for e in events}) == 1
    # The trail is in time order, as one service writes it.
    assert [e["ts"] for e in rows] == sorted(e["ts"] for e in rows)
    assert len({e["event_id"] for e in rows}) == len(rows)
    # Every ended call has its team mail in the outbox, and the mail events match the rows.
    ended = {e["linkedid"] for e in rows if e.get("step") == "callback_queued"}
    assert {key for key, kind, _ in outbox if kind == "team"} == ended
    sent = Counter(status for _, _, status in outbox)
    mails = Counter(e["event"] for e in rows if e["event"].startswith("mail_"))
    assert sent["sent"] == mails["mail_sent"] and sent["failed"] == mails["mail_gave_up"]
    assert 1.3 < len(sessions) / len({e["linkedid"] for e in rows if "session" in e}) < 1.6
