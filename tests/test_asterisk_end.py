"""The last rung on a real Asterisk 22: closing prompt, hang-up, CDR/CEL mark, mail in the inbox."""

from __future__ import annotations

import email
import time

import pytest
from asterisk_lab import caller_linkedid

pytestmark = pytest.mark.asterisk


def read_csv(lab, name):
    for path in (lab.run_dir / "log").rglob(name):
        return path.read_text()
    return ""


@pytest.mark.parametrize("exten", [pytest.param("100", id="dial"), pytest.param("200", marks=pytest.mark.slow, id="queue")])
def test_end_hangs_up_both_legs_marks_the_call_and_mails_the_team(lab, exten):
    before = len(lab.smtp.messages)
    mark = lab.originate("endcall" + exten, exten=exten, keys="*9", caller_hold=40, agent_hold=40)
    started = time.monotonic()
    events = lab.ami.wait_idle(mark, timeout=40)
    # the call ended after the closing prompt (~10.6 s), not when the 40 s holds ran out
    assert time.monotonic() - started < 30
    linkedid = caller_linkedid(events)
    names = [e["step"] for e in lab.audit_events() if e.get("linkedid") == linkedid and e.get("event") == "step"]
    assert names == ["callback_queued", "call_marked", "alert_user_event", "closing_prompt_played",
                     "caller_hung_up_by_agent"]
    hangups = [e for e in events if e.get("Event") == "Hangup"]
    assert any(e["Channel"].startswith("Local/caller@sim-caller") for e in hangups)
    assert any("@sim-agent" in e["Channel"] or "queueagent" in e["Channel"] for e in hangups)
    messages = lab.smtp.wait_for(before + 1)
    assert len(messages) == before + 1
    rcpt, raw = messages[-1]
    assert rcpt == ["team@example.com"]
    mail = email.message_from_bytes(raw)
    assert "+15551234567" in mail["Subject"]
    assert linkedid in mail.get_payload(decode=True).decode()
    time.sleep(1)
    cdr = read_csv(lab, "cdr_calmline.csv")
    assert any(linkedid in line and "calmline:ended" in line for line in cdr.splitlines())
    cel = read_csv(lab, "cel_calmline.csv")
    assert any("CALMLINE_ENDED" in line and linkedid in line for line in cel.splitlines())


def test_caller_hangs_up_during_the_closing_prompt_request_still_mailed(lab):
    before = len(lab.smtp.messages)
    mark = lab.originate("endhangup", keys="*9", caller_hold=5, agent_hold=30)
    events = lab.ami.wait_idle(mark, timeout=40)
    linkedid = caller_linkedid(events)
    ends = [e for e in lab.audit_events() if e.get("event") == "session_end" and e.get("linkedid") == linkedid]
    assert ends[-1]["outcome"] == "caller_hung_up"
    messages = lab.smtp.wait_for(before + 1)
    assert len(messages) == before + 1
    assert linkedid in email.message_from_bytes(messages[-1][1]).get_payload(decode=True).decode()
