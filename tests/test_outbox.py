"""The durable outbox: queueing, idempotency, backoff, claims, and surviving restarts.

These tests need no SMTP server; end-to-end delivery is in test_mail.py.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError
from callbacks import T0, make_request
from structlog.testing import capture_logs

from calmline.config import MailConfig
from calmline.callback.outbox import Outbox, backoff, caller_address
from stores import outbox_at  # noqa: E402


@pytest.fixture
def outbox(tmp_path: Path):
    box = outbox_at(tmp_path / "var" / "outbox.sqlite3")
    yield box
    box.close()


def cfg(**overrides) -> MailConfig:
    values = dict(retry_initial_seconds=1.0, retry_max_seconds=5.0, max_attempts=5)
    values.update(overrides)
    return MailConfig(**values)


# --- the request ------------------------------------------------------------


def test_request_requires_aware_time_and_stores_utc():
    with pytest.raises(ValidationError, match="timezone-aware"):
        make_request(created_at=datetime(2024, 5, 1, 12, 0, 0))
    berlin = timezone(timedelta(hours=2))
    request = make_request(created_at=datetime(2024, 5, 1, 14, 0, 0, tzinfo=berlin))
    assert request.created_at == T0
    assert request.created_at.utcoffset() == timedelta(0)


def test_request_is_frozen_and_rejects_bad_keys():
    request = make_request()
    with pytest.raises(ValidationError):
        request.caller_name = "changed"  # type: ignore[misc]
    for bad in ["", "a\nb", "x" * 256]:
        with pytest.raises(ValidationError):
            make_request(key=bad)
    with pytest.raises(ValidationError):
        make_request(warnings=-1)


def test_hostile_caller_text_is_stored_verbatim(outbox: Outbox):
    # Caller ID can carry any bytes; the outbox keeps them as evidence (sanitizing is the
    # mail builder's job). Undecodable bytes (lone surrogates) become U+FFFD so they can be stored.
    name = "Zoë\r\nBcc: victim@example.com \"q\" ${EXEC(System(rm -rf /))} \x00\x1b[2J"
    weird = "caf\udce9"  # what surrogateescape makes of b"caf\xe9"
    assert outbox.add(make_request(caller_name=name, caller_number=weird))
    [team, caller] = outbox.items()
    assert team.request.caller_name == name
    assert team.request.caller_number == "caf\ufffd"
    assert caller.request == team.request


# --- adding -----------------------------------------------------------------


def test_add_queues_team_and_caller_message(outbox: Outbox):
    with capture_logs() as logs:
        assert outbox.add(make_request(caller_email="  bob@example.com ")) is True
    items = outbox.items()
    assert [(i.kind, i.status, i.attempts, i.next_attempt) for i in items] == [
        ("team", "pending", 0, 0),
        ("caller", "pending", 0, 0),
    ]
    assert items[0].recipient is None
    assert items[1].recipient == "bob@example.com"
    queued = [e for e in logs if e["event"] == "callback_queued"]
    assert len(queued) == 1 and queued[0]["messages"] == ["team", "caller"]
    assert queued[0]["key"] == "1714564800.17"
    assert [i.key for i in outbox.due(now=0)] == ["1714564800.17", "1714564800.17"]


@pytest.mark.parametrize(
    "address, reason",
    [
        (None, "no e-mail address"),
        ("", "no e-mail address"),
        ("bob@example.com, victim@example.com", "exactly one @"),
        ("bob@example.com\r\nBcc: victim@example.com", "exactly one @"),
        ("Bob <bob@example.com>", "mailbox name"),
        ("bob@localhost", "domain name"),
        ("=?utf-8?q?x?=@example.com", "mailbox name"),
        ("zoë@example.com", "non-ASCII"),
        ("bob@exa mple.com", "domain name"),
        ("bob@example.com\n", None),  # surrounding whitespace is trimmed: usable
    ],
)
def test_caller_message_only_for_a_single_valid_address(outbox: Outbox, address, reason):
    with capture_logs() as logs:
        assert outbox.add(make_request(caller_email=address))
    kinds = [item.kind for item in outbox.items()]
    skipped = [e for e in logs if e["event"] == "caller_mail_skipped"]
    if reason is None:
        assert kinds == ["team", "caller"]
        assert outbox.items()[1].recipient == "bob@example.com"
        assert skipped == []
    else:
        assert kinds == ["team"]
        assert len(skipped) == 1 and reason in skipped[0]["reason"]


def test_caller_address_accepts_ordinary_addresses():
    assert caller_address("first.last+tag@mail.example.co.uk") == "first.last+tag@mail.example.co.uk"
    for bad in ["a..b@example.com", ".a@example.com", "a@-example.com", "a@example.123"]:
        with pytest.raises(ValueError):
            caller_address(bad)


def test_duplicate_key_adds_nothing(outbox: Outbox):
    assert outbox.add(make_request()) is True
    with capture_logs() as logs:
        assert outbox.add(make_request(caller_name="Second press", caller_email=None)) is False
    items = outbox.items()
    assert len(items) == 2
    assert all(item.request.caller_name == "Bob Example" for item in items)
    assert [e["event"] for e in logs] == ["callback_duplicate"]
    # Even after delivery, the key stays taken.
    for item in outbox.due(now=0):
        outbox.mark_sent(item, "250 OK", 1.0)
    assert outbox.add(make_request()) is False
    assert len(outbox.items()) == 2


def test_concurrent_adds_of_one_key_from_separate_connections(tmp_path: Path):
    path = tmp_path / "outbox.sqlite3"
    boxes = [outbox_at(path) for _ in range(8)]
    results: list[bool] = []
    barrier = threading.Barrier(len(boxes))

    def press(box: Outbox) -> None:
        barrier.wait()
        results.append(box.add(make_request()))

    threads = [threading.Thread(target=press, args=(box,)) for box in boxes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
    assert len(boxes[0].items()) == 2
    for box in boxes:
        box.close()


# --- retries ----------------------------------------------------------------


def test_backoff_doubles_and_caps():
    c = cfg(retry_initial_seconds=1.0, retry_max_seconds=5.0)
    assert [backoff(n, c) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff(10_000, c) == 5.0  # no overflow


def test_mark_retry_schedules_backoff_then_gives_up(outbox: Outbox):
    c = cfg()
    outbox.add(make_request(caller_email=None))
    now = 1000.0
    delays = []
    for attempt in range(1, 5):
        [item] = outbox.due(now)
        updated = outbox.mark_retry(item, f"451 try later ({attempt})", now, c)
        assert updated.status == "pending"
        assert updated.attempts == attempt
        assert updated.last_error == f"451 try later ({attempt})"
        delays.append(updated.next_attempt - now)
        assert outbox.due(now + delays[-1] - 0.001) == []  # not before its time
        now += delays[-1]
    assert delays == [1.0, 2.0, 4.0, 5.0]
    [item] = outbox.due(now)
    final = outbox.mark_retry(item, "550 no", now, c)
    assert (final.status, final.attempts, final.last_error) == ("failed", 5, "550 no")
    assert outbox.due(now + 10_000) == []
    assert outbox.next_due() is None


def test_mark_sent_records_the_reply(outbox: Outbox):
    outbox.add(make_request(caller_email=None))
    [item] = outbox.due(0)
    outbox.mark_sent(item, "250 OK queued as 42", 1234.5)
    [sent] = outbox.items()
    assert (sent.status, sent.attempts, sent.sent_at, sent.smtp_reply) == ("sent", 1, 1234.5, "250 OK queued as 42")
    assert outbox.due(10**12) == []
    # A late failure report from another worker must not undo a delivery.
    outbox.mark_retry(item, "timeout", 2000.0, cfg())
    assert outbox.items()[0].status == "sent"


def test_retry_now_revives_failed_and_pending(outbox: Outbox):
    c = cfg(max_attempts=1)
    outbox.add(make_request(key="a", caller_email=None))
    outbox.add(make_request(key="b", caller_email=None))
    outbox.add(make_request(key="c", caller_email=None))
    a, b, c_item = outbox.due(0)
    outbox.mark_retry(a, "550 no", 100.0, c)  # failed
    outbox.mark_retry(b, "451 later", 100.0, cfg())  # pending, not due until 101
    outbox.mark_sent(c_item, "250 OK", 100.0)
    assert [i.status for i in outbox.items()] == ["failed", "pending", "sent"]
    assert outbox.due(100.5) == []

    assert outbox.retry_now() == 2  # a and b; c was sent and stays sent
    assert [(i.key, i.status) for i in outbox.items()] == [("a", "pending"), ("b", "pending"), ("c", "sent")]
    assert [i.key for i in outbox.due(100.5)] == ["a", "b"]
    assert outbox.retry_now() == 2  # still pending: due again, nothing else changes
    assert [i.status for i in outbox.items()] == ["pending", "pending", "sent"]


# --- durability and several processes ----------------------------------------


def test_file_is_private_wal_and_survives_reopen(tmp_path: Path):
    path = tmp_path / "deep" / "dir" / "outbox.sqlite3"
    box = outbox_at(path)
    box.add(make_request())
    box.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
    reopened = outbox_at(path)
    assert [(i.kind, i.status) for i in reopened.items()] == [("team", "pending"), ("caller", "pending")]
    assert reopened.add(make_request()) is False
    reopened.close()
    with pytest.raises(RuntimeError, match="is closed"):
        reopened.items()


def test_claimed_items_are_invisible_to_other_workers_until_the_claim_expires(tmp_path: Path):
    path = tmp_path / "outbox.sqlite3"
    service, cli = outbox_at(path), outbox_at(path)
    service.add(make_request(caller_email=None))
    [claimed] = service.due(1000.0, claim_for=60.0)
    assert cli.due(1000.0) == []  # the other process does not send it too
    assert cli.due(1059.0) == []
    # The claiming worker died mid-send: after the claim the message is due again.
    [again] = cli.due(1060.0)
    assert again.id == claimed.id and again.attempts == 0
    service.close()
    cli.close()


_KILL_AFTER_CLAIM = """
import os, signal, sys
from calmline.callback.outbox import Outbox
from calmline.store import Database
db = Database("sqlite:///" + sys.argv[1])
db.open_checked()
box = Outbox(db)
[item] = box.due(1000.0, claim_for=30.0)
os.kill(os.getpid(), signal.SIGKILL)  # dies "while sending"
"""


def test_sigkill_after_claim_leaves_the_message_for_a_later_worker(tmp_path: Path):
    path = tmp_path / "outbox.sqlite3"
    box = outbox_at(path)
    box.add(make_request(caller_email=None))
    box.close()
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_CLAIM, str(path)], capture_output=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    fresh = outbox_at(path)
    assert fresh.due(1010.0) == []
    [item] = fresh.due(1030.0)
    assert item.status == "pending" and item.attempts == 0
    fresh.close()
