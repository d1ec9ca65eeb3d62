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


@pytest.mark.slow  # its fake-Asterisk twin runs every time
def test_the_webhook_of_a_real_call_arrives_once_after_an_outage_of_the_receiver(lab, monkeypatch):
    import time

    from test_alert import SECRET, Receiver, free_port

    port = free_port()  # the receiver is down when the call escalates
    monkeypatch.setenv("CALMLINE_ALERT_SECRET", SECRET)  # the service inherits it
    lab.start_service(f'\n[alert]\nurls = ["http://127.0.0.1:{port}/hook"]\n'
                      f'retry_initial_seconds = 0.5\nretry_max_seconds = 1.0\n')
    receiver = None
    try:
        mark = lab.originate("alerthook", keys="*9", caller_hold=30, agent_hold=30)
        events = lab.ami.wait_idle(mark, timeout=40)
        linkedid = caller_linkedid(events)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            failed = [e for e in lab.audit_events() if e.get("event") == "webhook_failed"
                      and e.get("url") == f"http://127.0.0.1:{port}/hook"]
            if len(failed) >= 2:
                break
            time.sleep(0.3)
        assert len(failed) >= 2 and "cannot POST" in failed[0]["error"]
        receiver = Receiver(port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not receiver.received:
            time.sleep(0.1)
        time.sleep(3)  # time enough for a duplicate to show
        mine = [r for r in receiver.received if r["body"]["linkedid"] == linkedid]
        assert receiver.bad_signatures == 0
        assert len(mine) == 1, receiver.received
        body = mine[0]["body"]
        assert (body["kind"], body["warnings"], body["caller_number"]) == ("end", 0, "+15551234567")
        assert body["agent"].startswith("Local/alerthook@sim-agent-")
        raised = escalations(events)
        assert len(raised) == 1 and raised[0]["AlertId"] == mine[0]["key"] == body["id"]
        sent = [e for e in lab.audit_events() if e.get("event") == "webhook_sent" and e.get("key") == body["id"]]
        assert len(sent) == 1 and sent[0]["http_status"] == 204
    finally:
        if receiver is not None:
            receiver.stop()
        lab.start_service("")
