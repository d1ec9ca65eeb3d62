"""Callback mail against a real SMTP server (aiosmtpd on loopback).

Covers delivery of team and caller mail, outages and refusals with backoff, restarts and a
SIGKILL between queueing and sending, duplicate keys, header injection through caller ID,
template errors, AUTH with a password from the environment, and STARTTLS.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from callbacks import CALLER, make_request
from structlog.testing import capture_logs

from calmline.callback import mail
from calmline.config import MailConfig
from calmline.errors import ConfigError
from calmline.callback.mail import (
    MailError,
    OutboxWorker,
    build_caller_message,
    build_team_message,
    check_templates,
    outbox_report,
    send,
)
from calmline.callback.outbox import Outbox
from stores import outbox_at  # noqa: E402

TEAM = "team@example.org"
SENDER = "calmline@example.org"


# --- a real SMTP server ------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.data, policy=email.policy.default)  # type: ignore[return-value]

    @property
    def header_block(self) -> bytes:
        return self.data.split(b"\r\n\r\n", 1)[0]


class Recorder:
    """aiosmtpd handler: records what it accepts; can refuse or be slow on demand."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.refuse_rcpt: str | None = None
        self.refuse_data: str | None = None
        self.delay = 0.0
        self.data_started = threading.Event()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refuse_rcpt:
            return self.refuse_rcpt
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.data_started.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.refuse_data:
            return self.refuse_data
        self.received.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content, session.ssl is not None)
        )
        return "250 OK queued as 42"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SMTPServer:
    def __init__(self, **kwargs) -> None:
        self.port = free_port()
        self.handler = Recorder()
        self.kwargs = kwargs
        self.controller: Controller | None = None

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def start(self) -> None:
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, **self.kwargs)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


@pytest.fixture
def smtp():
    server = SMTPServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def down_smtp():
    """A port where the SMTP server is not running (yet): connections are refused."""
    server = SMTPServer()
    yield server
    server.stop()


def mail_cfg(server: SMTPServer, **overrides) -> MailConfig:
    values = dict(
        host="127.0.0.1",
        port=server.port,
        timeout=5.0,
        sender=SENDER,
        team_address=TEAM,
        retry_initial_seconds=0.05,
        retry_max_seconds=0.2,
        max_attempts=5,
    )
    values.update(overrides)
    return MailConfig(**values)


@pytest.fixture
def outbox(tmp_path: Path):
    box = outbox_at(tmp_path / "outbox.sqlite3")
    yield box
    box.close()


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.01)


def body_of(received: Received) -> str:
    return received.message.get_content().replace("\r\n", "\n")


TEAM_HEADERS = {
    "from", "to", "subject", "date", "message-id", "auto-submitted", "x-calmline-key",
    "content-type", "content-transfer-encoding", "mime-version",
}
CALLER_HEADERS = TEAM_HEADERS - {"x-calmline-key"} | {"reply-to"}


def header_names(received: Received) -> set[str]:
    names = set()
    for line in received.header_block.split(b"\r\n"):
        if line and not line[:1].isspace():
            names.add(line.split(b":", 1)[0].decode().lower())
    return names


# --- delivery ------------------------------------------------------------------


def test_queue_and_deliver_team_and_caller_mail(smtp: SMTPServer, outbox: Outbox):
    cfg = mail_cfg(smtp)
    assert outbox.add(make_request())
    worker = OutboxWorker(outbox, cfg)
    with capture_logs() as logs:
        assert worker.deliver_due_now() == (2, 0)

    team, caller = sorted(smtp.received, key=lambda r: r.rcpt_tos != [TEAM])
    assert (team.mail_from, team.rcpt_tos) == (SENDER, [TEAM])
    assert (caller.mail_from, caller.rcpt_tos) == (SENDER, [CALLER])

    t = team.message
    assert header_names(team) == TEAM_HEADERS
    assert (t["From"], t["To"]) == (SENDER, TEAM)
    assert t["Subject"] == "Callback request: +15550100 (abusive caller: call ended by agent)"
    assert t["Date"] == "Wed, 01 May 2024 12:00:00 +0000"
    assert t["Auto-Submitted"] == "auto-generated"
    assert t["Message-ID"].startswith("<calmline.team.") and t["Message-ID"].endswith("@example.org>")
    assert t.get_content_type() == "text/plain" and t.get_content_charset() == "utf-8"
    body = body_of(team)
    for line in [
        "Caller:    Bob Example",
        "Number:    +15550100",
        f"E-mail:    {CALLER}",
        "Agent:     PJSIP/2001",
        "Time:      2024-05-01 12:00:00 UTC",
        "Warnings:  2 given",
        "Reason:    abusive caller: call ended by agent",
        "Unique ID: 1714564800.17",
        "Linked ID: 1714564800.17",
        "Channel:   PJSIP/trunk-00000011",
    ]:
        assert line in body
    assert "Call the customer back when" in body

    c = caller.message
    assert header_names(caller) == CALLER_HEADERS
    assert (c["From"], c["To"], c["Reply-To"]) == (SENDER, CALLER, TEAM)
    assert c["Subject"] == "Following up on your call"
    assert c["Message-ID"] != t["Message-ID"]
    cbody = body_of(caller)
    assert cbody.startswith("Hello Bob Example,\n\nThank you for calling.")
    # Nothing internal reaches the caller: not the agent, not the call ids.
    for internal in ["PJSIP", "1714564800", "abusive"]:
        assert internal not in cbody and internal not in caller.data.decode()

    items = outbox.items()
    assert [(i.kind, i.status, i.attempts, i.smtp_reply) for i in items] == [
        ("team", "sent", 1, "250 OK queued as 42"),
        ("caller", "sent", 1, "250 OK queued as 42"),
    ]
    sent = [e for e in logs if e["event"] == "mail_sent"]
    assert [(e["kind"], e["smtp_reply"]) for e in sent] == [("team", "250 OK queued as 42"), ("caller", "250 OK queued as 42")]
    # Delivered once: nothing more to do.
    worker._clock = lambda: time.time() + 10**6
    assert worker.deliver_due_now() == (0, 0)
    assert len(smtp.received) == 2


def test_no_caller_address_means_team_mail_only(smtp: SMTPServer, outbox: Outbox):
    outbox.add(make_request(caller_email="bob@example.com\r\nBcc: victim@example.com"))
    assert OutboxWorker(outbox, mail_cfg(smtp)).deliver_due_now() == (1, 0)
    [team] = smtp.received
    assert team.rcpt_tos == [TEAM]
    assert "victim" not in team.header_block.decode()
    assert "not used" in body_of(team)


def test_duplicate_key_is_mailed_once(smtp: SMTPServer, outbox: Outbox):
    worker = OutboxWorker(outbox, mail_cfg(smtp))
    assert outbox.add(make_request())
    assert not outbox.add(make_request(caller_name="pressed again"))
    assert worker.deliver_due_now() == (2, 0)
    assert not outbox.add(make_request())  # a press after delivery
    assert worker.deliver_due_now() == (0, 0)
    assert sorted(r.rcpt_tos[0] for r in smtp.received) == [CALLER, TEAM]


def test_send_returns_data_reply_and_never_uses_bcc_header(smtp: SMTPServer):
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = TEAM
    message["Bcc"] = "victim@example.com"
    message["Subject"] = "x"
    message.set_content("hello")
    assert send(message, mail_cfg(smtp)) == "250 OK queued as 42"
    [received] = smtp.received
    assert received.rcpt_tos == [TEAM]


# --- outages, refusals, restarts -------------------------------------------------


def test_outage_keeps_mail_pending_with_backoff_then_sends_once(down_smtp: SMTPServer, outbox: Outbox):
    cfg = mail_cfg(down_smtp)
    worker = OutboxWorker(outbox, cfg, clock=lambda: 1000.0)
    outbox.add(make_request(caller_email=None))

    with capture_logs() as logs:
        assert worker.deliver_due_now() == (0, 1)
    [item] = outbox.items()
    assert (item.status, item.attempts, item.next_attempt) == ("pending", 1, pytest.approx(1000.05))
    assert "cannot connect to 127.0.0.1" in item.last_error
    [failed] = [e for e in logs if e["event"] == "mail_failed"]
    assert failed["attempt"] == 1 and failed["next_attempt_in"] == pytest.approx(0.05)
    assert failed["log_level"] == "warning"

    worker._clock = lambda: 1000.04
    assert worker.deliver_due_now() == (0, 0)  # not due yet: no hammering
    worker._clock = lambda: 1000.06
    assert worker.deliver_due_now() == (0, 1)
    assert outbox.items()[0].next_attempt == pytest.approx(1000.06 + 0.1)  # doubled

    down_smtp.start()
    worker._clock = lambda: 1000.2
    assert worker.deliver_due_now() == (1, 0)
    [item] = outbox.items()
    assert (item.status, item.attempts, item.last_error) == ("sent", 3, None)
    worker._clock = lambda: 10**9
    assert worker.deliver_due_now() == (0, 0)
    assert len(down_smtp.received) == 1


def test_refusals_record_smtp_code_then_give_up_then_retry_now(smtp: SMTPServer, outbox: Outbox):
    cfg = mail_cfg(smtp, max_attempts=2)
    clock = [5000.0]
    worker = OutboxWorker(outbox, cfg, clock=lambda: clock[0])
    outbox.add(make_request(caller_email=None))

    smtp.handler.refuse_data = "451 4.3.0 try later"
    with capture_logs() as logs:
        assert worker.deliver_due_now() == (0, 1)
    [item] = outbox.items()
    assert item.status == "pending"
    assert item.last_error == "DATA: 451 4.3.0 try later"
    [event] = [e for e in logs if e["event"] == "mail_failed"]
    assert event["smtp_code"] == 451 and "try later" in event["error"]

    smtp.handler.refuse_data = "550 5.7.1 no"
    clock[0] += 1
    with capture_logs() as logs:
        assert worker.deliver_due_now() == (0, 1)
    [item] = outbox.items()
    assert (item.status, item.attempts, item.last_error) == ("failed", 2, "DATA: 550 5.7.1 no")
    [event] = [e for e in logs if e["event"] == "mail_gave_up"]
    assert event["log_level"] == "error" and event["smtp_code"] == 550
    clock[0] += 1000
    assert worker.deliver_due_now() == (0, 0)  # failed stays failed
    assert smtp.received == []

    report = outbox_report(outbox)
    assert "1714564800.17" in report and "failed" in report and "550 5.7.1 no" in report

    smtp.handler.refuse_data = None
    assert outbox.retry_now() == 1
    assert worker.deliver_due_now() == (1, 0)
    assert len(smtp.received) == 1
    assert outbox_report(outbox) == "outbox is empty (1 sent)"


def test_rcpt_refusal_is_a_mail_error_with_code(smtp: SMTPServer):
    smtp.handler.refuse_rcpt = "550 5.1.1 no such user"
    with pytest.raises(MailError) as caught:
        send(build_team_message(make_request(), mail_cfg(smtp)), mail_cfg(smtp))
    assert caught.value.code == 550 and caught.value.permanent
    assert str(caught.value) == f"RCPT TO <{TEAM}>: 550 5.1.1 no such user"
    assert smtp.received == []


def test_async_worker_recovers_from_outage_after_restart(down_smtp: SMTPServer, tmp_path: Path):
    path = tmp_path / "outbox.sqlite3"
    cfg = mail_cfg(down_smtp)
    first = outbox_at(path)
    first.add(make_request())
    assert OutboxWorker(first, cfg).deliver_due_now() == (0, 2)
    first.close()  # the service stops with mail still pending

    down_smtp.start()

    async def service_restarts() -> None:
        box = outbox_at(path)
        worker = OutboxWorker(box, cfg, max_sleep=5.0)
        task = asyncio.create_task(worker.run())
        await until(lambda: len(down_smtp.received) == 2)
        await worker.stop()
        await task
        assert [(i.status, i.attempts) for i in box.items()] == [("sent", 2), ("sent", 2)]
        box.close()

    asyncio.run(service_restarts())
    assert sorted(r.rcpt_tos[0] for r in down_smtp.received) == [CALLER, TEAM]


def test_async_worker_retries_with_backoff_until_server_returns(down_smtp: SMTPServer, outbox: Outbox):
    cfg = mail_cfg(down_smtp, max_attempts=100)

    async def scenario() -> None:
        worker = OutboxWorker(outbox, cfg, max_sleep=5.0)
        task = asyncio.create_task(worker.run())
        outbox.add(make_request(caller_email=None))
        worker.wake()
        await until(lambda: outbox.items()[0].attempts >= 3)
        assert outbox.items()[0].status == "pending"
        down_smtp.start()
        await until(lambda: outbox.items()[0].status == "sent", timeout=3.0)
        await asyncio.sleep(0.3)  # more than the backoff: nothing is sent twice
        await worker.stop()
        await task

    asyncio.run(scenario())
    assert len(down_smtp.received) == 1


_QUEUE_THEN_DIE = """
import os, signal, sys
from datetime import datetime, timezone
from calmline.callback.outbox import CallbackRequest, Outbox
from calmline.store import Database
db = Database("sqlite:///" + sys.argv[1])
db.open_checked()
box = Outbox(db)
box.add(CallbackRequest(
    key="kill-1", created_at=datetime.now(timezone.utc), caller_number="+15550199",
    caller_name="Killed Before Send", caller_email="bob@example.com", agent="PJSIP/2001",
    warnings=1, reason="abusive", uniqueid="1.1", linkedid="kill-1", channel="PJSIP/x-1"))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_between_queueing_and_sending_delivers_exactly_once(smtp: SMTPServer, tmp_path: Path):
    path = tmp_path / "outbox.sqlite3"
    proc = subprocess.run([sys.executable, "-c", _QUEUE_THEN_DIE, str(path)], capture_output=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert smtp.received == []

    cfg = mail_cfg(smtp)

    async def fresh_service() -> None:
        box = outbox_at(path)
        worker = OutboxWorker(box, cfg, max_sleep=5.0)
        task = asyncio.create_task(worker.run())
        await until(lambda: [i.status for i in box.items()] == ["sent", "sent"])
        await worker.stop()
        await task
        assert OutboxWorker(box, cfg, clock=lambda: time.time() + 10**6).deliver_due_now() == (0, 0)
        box.close()

    asyncio.run(fresh_service())
    assert sorted(r.rcpt_tos[0] for r in smtp.received) == [CALLER, TEAM]
    team = next(r for r in smtp.received if r.rcpt_tos == [TEAM])
    assert "Killed Before Send" in body_of(team)


def test_crash_after_accept_resends_with_the_same_message_id(smtp: SMTPServer, outbox: Outbox):
    """The known exactly-once limit: the server accepted, the process died before mark_sent."""
    cfg = mail_cfg(smtp)
    outbox.add(make_request(caller_email=None))
    worker = OutboxWorker(outbox, cfg, clock=lambda: 100.0)
    [claimed] = outbox.due(100.0, claim_for=worker.claim_seconds)
    message, recipient = mail.build_message(claimed, cfg)
    send(message, cfg, recipients=[recipient])  # ...and the process dies here
    worker._clock = lambda: 100.0 + worker.claim_seconds
    assert worker.deliver_due_now() == (1, 0)
    first, second = smtp.received
    assert first.message["Message-ID"] == second.message["Message-ID"]
    assert first.data == second.data  # byte-identical: the receiver can drop the duplicate


# --- the event loop is never blocked -------------------------------------------


def test_slow_smtp_does_not_block_the_event_loop_and_wake_is_prompt(smtp: SMTPServer, outbox: Outbox):
    smtp.handler.delay = 0.4

    async def scenario() -> tuple[float, float]:
        worker = OutboxWorker(outbox, mail_cfg(smtp), max_sleep=10.0)
        task = asyncio.create_task(worker.run())
        await asyncio.sleep(0.05)  # the worker is idle, asleep for up to 10 s
        outbox.add(make_request())
        start = last = time.monotonic()
        worker.wake()
        biggest_gap = 0.0
        while len(smtp.received) < 2:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            biggest_gap = max(biggest_gap, now - last)
            last = now
            assert now - start < 5, "not delivered"
        elapsed = time.monotonic() - start
        await worker.stop()
        await task
        return biggest_gap, elapsed

    gap, elapsed = asyncio.run(scenario())
    assert gap < 0.3  # each SMTP exchange took 0.4 s, in a thread
    assert 0.8 <= elapsed < 3  # woken at once, not after max_sleep
    assert [i.status for i in outbox.items()] == ["sent", "sent"]


def test_stop_finishes_the_message_in_flight(smtp: SMTPServer, outbox: Outbox):
    smtp.handler.delay = 0.4

    async def scenario() -> None:
        worker = OutboxWorker(outbox, mail_cfg(smtp), max_sleep=10.0)
        outbox.add(make_request())
        task = asyncio.create_task(worker.run())
        await until(smtp.handler.data_started.is_set)
        await worker.stop()
        await asyncio.wait_for(task, timeout=1.0)

    asyncio.run(scenario())
    team, caller = outbox.items()
    assert team.status == "sent"  # the one in flight was finished and recorded
    assert caller.status == "pending"  # the next one waits for the next start
    assert len(smtp.received) == 1


# --- header injection through caller ID -------------------------------------------


@pytest.mark.parametrize(
    "name, in_subject",
    [
        ("Bob\r\nBcc: victim@example.com", "Bob Bcc: victim@example.com"),
        ("Bob\nTo: victim@example.com\n\nfake body", "Bob To: victim@example.com fake body"),
        ("=?utf-8?q?x?=", "= ?utf-8?q?x?="),
        ("=?utf-8?q?a=0D=0ABcc:_victim@example.com?=", "= ?utf-8?q?a=0D=0ABcc:_victim@example.com?="),
        ("${EXEC(System(mail victim@example.com))}", "${EXEC(System(mail victim@example.com))}"),
        ('"Bob" <victim@example.com>', '"Bob" <victim@example.com>'),
        ("{reason} {0} {caller_name.__class__}", "{reason} {0} {caller_name.__class__}"),
        ("Zoë \u202eevil\x00\x1b[2J", "Zoë evil [2J"),
        ("A" * 5000, "A" * 199 + "\u2026"),
    ],
)
def test_caller_name_cannot_inject_headers(smtp: SMTPServer, outbox: Outbox, name: str, in_subject: str):
    cfg = mail_cfg(smtp, subject="Callback: {caller_name} / {caller_number}")
    outbox.add(make_request(caller_name=name, caller_number="+1555\r\nCc: victim@example.com"))
    assert OutboxWorker(outbox, cfg).deliver_due_now() == (2, 0)
    team, caller = sorted(smtp.received, key=lambda r: r.rcpt_tos != [TEAM])

    assert team.rcpt_tos == [TEAM] and caller.rcpt_tos == [CALLER]
    assert header_names(team) == TEAM_HEADERS
    assert header_names(caller) == CALLER_HEADERS
    for received in (team, caller):
        parsed = received.message
        assert parsed["Bcc"] is None and parsed["Cc"] is None
        assert parsed.defects == []
        assert "\n" not in parsed["Subject"] and "\r" not in parsed["Subject"]
        assert received.header_block.isascii()

    subject = team.message["Subject"].strip()  # a folded Subject parses with a leading space
    assert subject == f"Callback: {in_subject} / +1555 Cc: victim@example.com"[: len(subject)]
    assert subject.startswith(f"Callback: {in_subject}")
    assert len(subject) <= mail.SUBJECT_LIMIT

    body = body_of(team)
    [caller_line] = [line for line in body.splitlines() if line.startswith("Caller:")]
    assert all(ch not in caller_line for ch in "\x00\x1b\u202e")
    assert not any(line.startswith(("Bcc:", "To:", "Cc:")) for line in body.splitlines())
    assert "Number:    +1555 Cc: victim@example.com" in body
    if len(name) < 100:
        assert caller_line.startswith("Caller:    " + in_subject.replace("= ?", "=?"))
    else:
        assert len(caller_line) <= 11 + mail.BODY_VALUE_LIMIT
    assert body_of(caller).startswith("Hello ")


def test_subject_template_boundary_cannot_form_an_encoded_word(smtp: SMTPServer):
    cfg = mail_cfg(smtp, subject="Callback ={caller_name}")
    message = build_team_message(make_request(caller_name="?utf-8?q?a=0D=0ABcc:_v@x?="), cfg)
    send(message, cfg)
    [received] = smtp.received
    assert received.message["Bcc"] is None
    assert "=?" not in received.message["Subject"]
    assert header_names(received) == TEAM_HEADERS


def test_last_line_of_defence_refuses_a_multi_line_header(monkeypatch: pytest.MonkeyPatch):
    # Even if sanitizing were skipped, the builder refuses what the email package would do
    # with an encoded word hiding CR/LF (it decodes it into the header value).
    monkeypatch.setattr(mail, "sanitize_header", lambda value, limit=200: str(value))
    cfg = MailConfig(subject="Callback: {caller_name}")
    request = make_request(caller_name="=?utf-8?q?a=0D=0ABcc:_victim@example.com?=")
    with pytest.raises(MailError, match="header Subject would span lines"):
        build_team_message(request, cfg)


def test_deliver_due_now_tries_each_message_once_per_call(down_smtp: SMTPServer, outbox: Outbox):
    outbox.add(make_request())
    worker = OutboxWorker(outbox, mail_cfg(down_smtp, max_attempts=100), clock=lambda: time.time() + 10**6)
    assert worker.deliver_due_now() == (0, 2)
    assert [i.attempts for i in outbox.items()] == [1, 1]


def test_message_ids_are_deterministic_per_key_and_kind():
    cfg = MailConfig(sender=SENDER)
    a = build_team_message(make_request(), cfg)["Message-ID"]
    assert a == build_team_message(make_request(caller_name="other"), cfg)["Message-ID"]
    assert a != build_team_message(make_request(key="other"), cfg)["Message-ID"]
    assert a != build_caller_message(make_request(), cfg)["Message-ID"]


# --- templates ---------------------------------------------------------------------


def test_default_templates_are_valid():
    assert check_templates(MailConfig()) == []


def test_unknown_placeholder_raises_config_error_naming_the_key():
    cfg = MailConfig(subject="Callback for {caller}")
    with pytest.raises(ConfigError) as caught:
        build_team_message(make_request(), cfg)
    [problem] = caught.value.problems
    assert problem.startswith("mail.subject: unknown placeholder {caller};")
    assert "{caller_name}" in problem and "{caller_number}" in problem

    cfg = MailConfig(caller_template="Hello {caller_name}, agent {agent} ended the call.")
    with pytest.raises(ConfigError, match=r"mail\.caller_template: unknown placeholder \{agent\}"):
        build_caller_message(make_request(), cfg)

    problems = check_templates(
        MailConfig(subject="{warnings:q}", caller_subject="Hi {0}", caller_template="Hello {caller_name")
    )
    assert [p.split(":", 1)[0] for p in problems] == ["mail.subject", "mail.caller_subject", "mail.caller_template"]
    assert "{0}" in problems[1]


@pytest.mark.parametrize("template", ["{caller_name:>50000000}", "{caller_name!r}", "{caller_number:0100000}",
                                      "{caller_name!s:>9}", "{time:%Y}"])
def test_format_specs_and_conversions_are_refused_before_any_mail_is_built(template):
    """`{caller_name:>50000000}` passed check, then took 15 s and 553 MB per mail."""
    problems = check_templates(MailConfig(caller_template=f"Hello {template}"))
    assert len(problems) == 1 and problems[0].startswith("mail.caller_template: placeholder {")
    assert "format spec or conversion" in problems[0]
    with pytest.raises(ConfigError):
        build_caller_message(make_request(caller_email="c@example.com"),
                             MailConfig(caller_template=f"Hello {template}"))


def test_worker_records_a_template_error_instead_of_crashing(smtp: SMTPServer, outbox: Outbox):
    cfg = mail_cfg(smtp, subject="{nope}")
    outbox.add(make_request(caller_email=None))
    assert OutboxWorker(outbox, cfg).deliver_due_now() == (0, 1)
    [item] = outbox.items()
    assert item.status == "pending" and "mail.subject: unknown placeholder {nope}" in item.last_error
    assert smtp.received == []


# --- AUTH and STARTTLS ----------------------------------------------------------------


@pytest.fixture
def auth_smtp():
    seen: list[tuple[str, bytes, bytes]] = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        seen.append((mechanism, auth_data.login, auth_data.password))
        ok = (auth_data.login, auth_data.password) == (b"calm", b"s3cret pw")
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 235/535

    server = SMTPServer(authenticator=authenticator, auth_require_tls=False, auth_required=True)
    server.seen = seen  # type: ignore[attr-defined]
    server.start()
    yield server
    server.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_login_with_password_from_environment(auth_smtp: SMTPServer, monkeypatch: pytest.MonkeyPatch):
    cfg = mail_cfg(auth_smtp, username="calm", password="not this one", password_env="CALMLINE_TEST_SMTP_PW")
    message = build_team_message(make_request(), cfg)

    monkeypatch.setenv("CALMLINE_TEST_SMTP_PW", "s3cret pw")
    assert send(message, cfg).startswith("250 ")
    assert [(login, pw) for _, login, pw in auth_smtp.seen] == [(b"calm", b"s3cret pw")]
    assert len(auth_smtp.received) == 1

    monkeypatch.setenv("CALMLINE_TEST_SMTP_PW", "wrong")
    with pytest.raises(MailError) as caught:
        send(message, cfg)
    assert caught.value.code == 535 and str(caught.value).startswith("AUTH: 535")

    monkeypatch.delenv("CALMLINE_TEST_SMTP_PW")
    auth_smtp.seen.clear()
    with pytest.raises(MailError, match="environment variable CALMLINE_TEST_SMTP_PW gives no password"):
        send(message, cfg)
    assert auth_smtp.seen == []  # no AUTH attempted with an empty password

    with pytest.raises(MailError) as caught:  # the server requires AUTH
        send(message, mail_cfg(auth_smtp))
    assert caught.value.code == 530
    assert len(auth_smtp.received) == 1


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture
def tls_smtp(tls_cert):
    cert, key = tls_cert
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = SMTPServer(tls_context=context, require_starttls=True)
    server.start()
    yield server
    server.stop()


def test_starttls_verifies_the_certificate(tls_smtp: SMTPServer, tls_cert, monkeypatch: pytest.MonkeyPatch):
    cfg = mail_cfg(tls_smtp, starttls=True)
    message = build_team_message(make_request(), cfg)

    with pytest.raises(MailError, match="CERTIFICATE_VERIFY_FAILED"):  # self-signed: not trusted by default
        send(message, cfg)
    assert tls_smtp.received == []

    monkeypatch.setattr(mail, "_tls_context", lambda: ssl.create_default_context(cafile=str(tls_cert[0])))
    assert send(message, cfg).startswith("250 ")
    [received] = tls_smtp.received
    assert received.tls


def test_starttls_required_but_not_offered_sends_nothing(smtp: SMTPServer):
    cfg = mail_cfg(smtp, starttls=True)
    with pytest.raises(MailError, match="does not offer STARTTLS"):
        send(build_team_message(make_request(), cfg), cfg)
    assert smtp.received == []


# --- the CLI's report ------------------------------------------------------------------


def test_outbox_report_lists_pending_and_failed(down_smtp: SMTPServer, outbox: Outbox):
    assert outbox_report(outbox) == "outbox is empty"
    outbox.add(make_request(key="call-a"))
    outbox.add(make_request(key="call-b", caller_email=None))
    worker = OutboxWorker(outbox, mail_cfg(down_smtp, max_attempts=1), clock=lambda: 1_700_000_000.0)
    [first] = outbox.due(0, limit=1)  # call-a/team: leave it untried
    outbox.mark_sent(first, "250 OK", 1_700_000_000.0)
    assert worker.deliver_due_now() == (0, 2)
    report = outbox_report(outbox)
    lines = report.splitlines()
    assert lines[0].split() == ["KEY", "KIND", "STATUS", "ATTEMPTS", "NEXT", "ATTEMPT", "LAST", "ERROR"]
    assert lines[1].split()[:4] == ["call-a", "caller", "failed", "1"]
    assert lines[2].split()[:4] == ["call-b", "team", "failed", "1"]
    assert "cannot connect to 127.0.0.1" in lines[1]
    assert lines[-1] == "0 pending, 2 failed, 1 sent"
    outbox.retry_now()
    assert "call-b  team    pending  1         now" in outbox_report(outbox)
