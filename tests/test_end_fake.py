"""The end action on the fake Asterisk with a real SMTP server on loopback."""

from __future__ import annotations

import asyncio
import email
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from conftest import run
from fake_asterisk import bridged_caller, environment, run_session

from stores import outbox_at  # noqa: E402


class Inbox:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.rcpt_tos, email.message_from_bytes(envelope.content)))
        return "250 OK queued"


@pytest.fixture
def smtp():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    inbox.port = port
    yield inbox
    controller.stop()


async def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return False


def mail_config(port):
    return {"port": port, "team_address": "team@example.com", "sender": "calmline@example.com"}


def test_end_marks_queues_plays_hangs_up_then_mails(serving, smtp):
    async def main():
        async with serving(mail=mail_config(smtp.port)) as svc:
            channel = bridged_caller()
            channel.variables.update(CALMLINE_WARNINGS="2", CALMLINE_CALLER_EMAIL="bob@example.org")
            channel.functions["CALMLINE_CALLER_EMAIL"] = "bob@example.org"
            channel.functions["CALMLINE_WARNINGS"] = "2"
            await run_session(svc.port, channel, environment("end"))
            assert await wait_for(lambda: len(smtp.messages) == 2)
            return svc, channel

    svc, channel = run(main())
    commands = channel.commands
    order = [
        'SET VARIABLE CDR(userfield) "calmline:ended"',
        'EXEC CELGenUserEvent "CALMLINE_ENDED,calmline:ended"',
        'STREAM FILE "calmline/end" ""',
        "HANGUP",
    ]
    assert [commands.index(c) for c in order] == sorted(commands.index(c) for c in order)
    steps = [e["step"] for e in svc.events(event="step")]
    assert steps == ["callback_queued", "call_marked", "alert_user_event", "closing_prompt_played",
                     "caller_hung_up_by_agent"]
    assert svc.events(event="session_end")[0]["outcome"] == "completed"
    recipients = sorted(rcpt[0] for rcpt, _ in smtp.messages)
    assert recipients == ["bob@example.org", "team@example.com"]
    team = next(m for rcpt, m in smtp.messages if rcpt == ["team@example.com"])
    assert "+15551234567" in team["Subject"]
    body = team.get_payload(decode=True).decode()
    assert "1795350788.44" in body and "Local/warnscn@sim-agent-00000017;1" in body
    caller = next(m for rcpt, m in smtp.messages if rcpt == ["bob@example.org"])
    assert caller["Reply-To"] == "team@example.com"
    assert svc.events(event="mail_sent")


def test_hangup_before_the_prompt_ends_still_creates_the_request(serving, smtp):
    async def main():
        async with serving(mail=mail_config(smtp.port)) as svc:
            channel = bridged_caller(hangup_during_prompt=3)
            await run_session(svc.port, channel, environment("end"))
            assert await wait_for(lambda: len(smtp.messages) == 1)
            return svc, channel

    svc, channel = run(main())
    assert "HANGUP" not in channel.commands
    assert svc.events(event="session_end")[0]["outcome"] == "caller_hung_up"
    assert [e["step"] for e in svc.events(event="step")][:1] == ["callback_queued"]


def test_a_second_press_on_the_same_call_mails_once(serving, smtp):
    async def main():
        async with serving(mail=mail_config(smtp.port)) as svc:
            for _ in range(2):
                await run_session(svc.port, bridged_caller(), environment("end"))
            await wait_for(lambda: len(smtp.messages) >= 1)
            await asyncio.sleep(0.3)
            return svc

    svc = run(main())
    assert len(smtp.messages) == 1
    queued = svc.events(event="step", step="callback_queued")
    assert [q["duplicate"] for q in queued] == [False, True]


def test_smtp_down_keeps_the_request_pending(serving, tmp_path):
    async def main():
        async with serving(mail=mail_config(1)) as svc:
            await run_session(svc.port, bridged_caller(), environment("end"))
            await asyncio.sleep(0.3)
            return svc

    svc = run(main())
    items = outbox_at(tmp_path / "calmline.sqlite3").items()
    assert [(i.kind, i.status) for i in items] == [("team", "pending")]
    assert svc.events(event="mail_failed")
    # the caller's call was still ended
    assert svc.events(event="step", step="caller_hung_up_by_agent")


def test_missing_closing_prompt_still_ends_the_call(serving, smtp):
    async def main():
        async with serving(mail=mail_config(smtp.port)) as svc:
            channel = bridged_caller(prompts={})
            await run_session(svc.port, channel, environment("end"))
            return svc, channel

    svc, channel = run(main())
    assert "HANGUP" in channel.commands
    assert svc.events(event="session_end")[0]["outcome"] == "prompt_missing"


def test_warn_past_the_last_stage_ends_the_call_when_configured(serving, smtp):
    async def main():
        async with serving(warn={"after_last": "end"}, mail=mail_config(smtp.port)) as svc:
            channel = bridged_caller()
            channel.variables["CALMLINE_WARNINGS"] = "2"
            channel.functions["CALMLINE_WARNINGS"] = "2"
            await run_session(svc.port, channel)
            return svc, channel

    svc, channel = run(main())
    assert 'STREAM FILE "calmline/end" ""' in channel.commands and "HANGUP" in channel.commands
    steps = [e["step"] for e in svc.events(event="step")]
    assert steps[0] == "ladder_exhausted" and steps[-1] == "caller_hung_up_by_agent"


def test_warn_past_the_last_stage_queues_the_callers_mail_too(serving, smtp):
    """Warn runs End there, so it must read what End reads: the caller's address too."""
    async def main():
        async with serving(warn={"after_last": "end"}, mail=mail_config(smtp.port)) as svc:
            channel = bridged_caller()
            channel.variables.update(CALMLINE_WARNINGS="2", CALMLINE_CALLER_EMAIL="bob@example.org")
            channel.functions.update(CALMLINE_WARNINGS="2", CALMLINE_CALLER_EMAIL="bob@example.org")
            await run_session(svc.port, channel)
            assert await wait_for(lambda: len(smtp.messages) == 2)
            return svc

    svc = run(main())
    assert sorted(rcpt[0] for rcpt, _ in smtp.messages) == ["bob@example.org", "team@example.com"]
    [queued] = svc.events(event="step", step="callback_queued")
    assert queued["caller_email"] is True and queued["warnings"] == 2


def audit_cli(svc, *args):
    """`calmline audit ARGS`, run as an admin would, on the service's store."""
    url = svc.svc.config.store.url
    config = Path(url.removeprefix("sqlite:///")).with_name("cli.toml")
    config.write_text(f'[store]\nurl = "{url}"\n', encoding="utf-8")
    svc.svc.store.flush()
    done = subprocess.run([sys.executable, "-m", "calmline", "-c", str(config), "audit", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("smtp_up", [True, False])
def test_audit_by_linkedid_shows_whether_the_callback_mail_went_out(serving, smtp, smtp_up):
    async def main():
        async with serving(mail=mail_config(smtp.port if smtp_up else 1)) as svc:
            await run_session(svc.port, bridged_caller(), environment("end"))
            assert await wait_for(lambda: svc.events(event="mail_sent" if smtp_up else "mail_failed"))
            return audit_cli(svc, "--linkedid", "1795350788.44")

    events = run(main())
    mail = [(e["event"], e.get("kind")) for e in events if e["event"].startswith(("mail_", "caller_mail"))]
    if smtp_up:
        assert mail == [("caller_mail_skipped", None), ("mail_sent", "team")]
    else:
        assert mail == [("caller_mail_skipped", None), ("mail_failed", "team")]
    assert {e["linkedid"] for e in events} == {"1795350788.44"}
