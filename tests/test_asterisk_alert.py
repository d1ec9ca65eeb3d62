"""Live alert on a real Asterisk 22: the CalmlineEscalation UserEvent arrives over AMI while
the call is still on, for an end and for a transfer (the final warning: test_asterisk_warn)."""

from __future__ import annotations

import pytest
from asterisk_lab import caller_linkedid

pytestmark = pytest.mark.asterisk


def escalations(events):
    return [e for e in events if e.get("Event") == "UserEvent" and e.get("UserEvent") == "CalmlineEscalation"]


@pytest.mark.parametrize(("keys", "kind", "target"), [("*9", "end", "-"), ("*3", "transfer", "supervisor")])
def test_the_escalation_arrives_over_ami_before_the_caller_leaves(lab, keys, kind, target):
    scen = "alert" + kind
    mark = lab.originate(scen, keys=keys, caller_hold=30, agent_hold=30, extra={"CALMLINE_WARNINGS": "1"})
    events = lab.ami.wait_idle(mark, timeout=50)
    linkedid = caller_linkedid(events)
    raised = escalations(events)
    assert len(raised) == 1, raised
    event = raised[0]
    assert (event["Kind"], event["Target"], event["Warnings"]) == (kind, target, "1")
    assert event["CallLinkedid"] == linkedid == event["Linkedid"]
    assert event["Channel"].startswith("Local/caller@sim-caller-") and event["CallerNumber"] == "+15551234567"
    assert event["Agent"].startswith(f"Local/{scen}@sim-agent-")
    # raised while the caller was still in the call: before its hangup (end) or redirect (transfer)
    caller_left = next(i for i, e in enumerate(events) if e.get("Channel") == event["Channel"]
                       and (e.get("Event") == "Hangup" or
                            (e.get("Event") == "Newexten" and e.get("Context") == "calmline-transfer")))
    assert events.index(event) < caller_left
    steps = [e for e in lab.audit_events() if e.get("linkedid") == linkedid and e.get("step") == "alert_user_event"]
    assert [s["key"] for s in steps] == [event["AlertId"]]
