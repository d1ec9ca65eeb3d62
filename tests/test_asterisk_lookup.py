"""The `lookup` request path on a real Asterisk 22, through the rendered example route.

The lab's extension 300 sets the scenario's caller number and goes to the rendered
`calmline-example-inbound,300`: AGI lookup, then the normal queue, or (flagged) the notice
and the senior queue. A hangup handler reports the three variables as the channel holds them.
"""

from __future__ import annotations

import random
import time

import pytest

pytestmark = pytest.mark.asterisk

FLAG_AT = 2


@pytest.fixture(scope="module")
def looked_up(lab):
    lab.start_service(f"\n[lookup]\nwatch_at = 1\nflag_at = {FLAG_AT}\n")
    try:
        yield lab
    finally:
        lab.start_service("")


def call(lab, number: str, scen: str) -> tuple[dict, list[dict]]:
    """Place a lookup call from `number`; return the report and the call's AMI events."""
    mark = lab.originate(scen, exten="300", keys="5", caller_hold=8, agent_hold=4,
                         extra={"LOOKUP_NUM": number})
    events = lab.ami.wait_idle(mark, timeout=40)
    reports = [e for e in events if e.get("Event") == "UserEvent" and e.get("Where") == "lookup-report"
               and e.get("Scen") == scen]
    assert len(reports) == 1, [e for e in events if e.get("Event") == "UserEvent"]
    return reports[0], events


def queue_joined(events: list[dict]) -> list[str]:
    return [e["Queue"] for e in events if e.get("Event") == "QueueCallerJoin"]


def escalate(lab, number: str, scen: str) -> None:
    """A queue call from `number` whose agent presses *1 (a warning): an escalated call."""
    mark = lab.originate(scen, exten="301", keys="*1", caller_hold=10, agent_hold=10,
                         extra={"LOOKUP_NUM": number})
    lab.ami.wait_idle(mark, timeout=40)


def test_a_new_caller_then_a_repeat_caller_read_back_from_the_channel(looked_up):
    lab = looked_up
    number = f"+1888{random.randrange(10**7):07d}"
    report, events = call(lab, number, "lookupnew")
    assert (report["Escalations"], report["Last"], report["Flag"]) == ("0", "", "none")
    assert report["AgiStatus"] == "SUCCESS"
    assert queue_joined(events) == ["support"]

    escalate(lab, number, "lookupwarn1")
    report, events = call(lab, number, "lookuprepeat")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert (report["Escalations"], report["Last"], report["Flag"]) == ("1", f"warn {today}", "watch")
    assert queue_joined(events) == ["support"]

    escalate(lab, number, "lookupwarn2")
    report, events = call(lab, number, "lookupflagged")
    assert (report["Escalations"], report["Flag"]) == (str(FLAG_AT), "flagged")
    # The flagged caller heard the notice, then went to the senior queue.
    played = [e.get("AppData") for e in events if e.get("Event") == "Newexten" and e.get("Application") == "Playback"]
    assert "calmline/caller-notice" in played
    assert queue_joined(events) == ["support-senior"]
    looked = [e for e in lab.audit_events() if e.get("event") == "caller_looked_up" and e.get("caller_number") == number]
    assert [e["flag"] for e in looked] == ["none", "watch", "flagged"]


@pytest.mark.slow
def test_an_anonymous_caller_is_never_flagged(looked_up):
    lab = looked_up
    for n in range(FLAG_AT):
        escalate(lab, "anonymous", f"lookupanon{n}")
    report, events = call(lab, "anonymous", "lookupanon")
    assert (report["Escalations"], report["Flag"]) == ("0", "none")
    assert queue_joined(events) == ["support"]


def test_with_calmline_down_the_call_still_reaches_the_queue(looked_up):
    lab = looked_up
    lab.stop_service()
    try:
        report, events = call(lab, "+18880000001", "lookupdown")
    finally:
        lab.start_service()
    assert report["Flag"] == "" and report["AgiStatus"] == "FAILURE"
    assert queue_joined(events) == ["support"]
