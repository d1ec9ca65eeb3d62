"""Transfers on a real Asterisk 22: the caller leaves the agent's bridge and rings a target."""

from __future__ import annotations

import pytest
from asterisk_lab import caller_linkedid

pytestmark = pytest.mark.asterisk

WAIT = "w" * 4  # SendDTMF pauses 0.5 s per w


def lab_events(events, where):
    return [e for e in events if e.get("Event") == "UserEvent" and e.get("Where") == where]


def steps(lab, linkedid):
    return [e for e in lab.audit_events() if e.get("linkedid") == linkedid and e.get("event") == "step"]


def hangup_time(events, prefix):
    for e in events:
        if e.get("Event") == "Hangup" and e.get("Channel", "").startswith(prefix):
            return float(e["Timestamp"]) if "Timestamp" in e else None
    return None


@pytest.mark.parametrize("exten", ["100", "200"], ids=["dial", "queue"])
def test_supervisor_transfer_rings_the_target_and_frees_the_agent(lab, exten):
    scen = "supxfer" + exten
    mark = lab.originate(scen, exten=exten, keys="*3", caller_hold=25, agent_hold=25,
                         extra={"CALMLINE_WARNINGS": "2"})  # as if two warnings were given
    events = lab.ami.wait_idle(mark, timeout=45)
    linkedid = caller_linkedid(events)
    answered = lab_events(events, "target-answered")
    assert answered and answered[0]["Target"] == "answers"
    # whoever answers sees why before talking: the warnings so far prefix the caller's name
    assert answered[0]["CallerName"].startswith("[W2] ")
    assert answered[0]["Reason"] == "abusive caller"
    names = [s["step"] for s in steps(lab, linkedid)]
    assert names[:3] == ["transfer_prompt_played", "alert_user_event", "caller_transferred"]
    assert "transfer_result" in names
    result = next(s for s in steps(lab, linkedid) if s["step"] == "transfer_result")
    assert result["dial_status"] == "ANSWER" and result["target"] == "supervisor"
    # the agent's leg ended when the caller left, long before its 25 s hold
    agent_gone = [e for e in events if e.get("Event") == "Hangup" and "@sim-agent" in e.get("Channel", "")]
    assert agent_gone
    redirect = [e for e in events if e.get("Event") == "Newexten" and e.get("Context") == "calmline-transfer"]
    assert redirect and redirect[0]["Channel"].startswith("Local/caller@sim-caller")
    # the whisper played on the supervisor's leg before the bridge
    whisper = [e for e in events if e.get("Event") == "Newexten" and e.get("Context") == "calmline-whisper"]
    assert whisper


@pytest.mark.parametrize("exten", [pytest.param("100", id="dial"), pytest.param("200", marks=pytest.mark.slow, id="queue")])
def test_colleague_no_answer_falls_back(lab, exten):
    mark = lab.originate("colxfer" + exten, exten=exten, keys="*4", caller_hold=40, agent_hold=40)
    events = lab.ami.wait_idle(mark, timeout=70)
    linkedid = caller_linkedid(events)
    answered = lab_events(events, "target-answered")
    assert [a["Target"] for a in answered] == ["2002"]
    result = next(s for s in steps(lab, linkedid) if s["step"] == "transfer_result")
    assert result["dial_status"] == "NOANSWER"
    assert result["fallback"] == "dial Local/2002@sim-targets" and result["answered"] is False


def test_keyed_colleague_with_a_good_extension(lab):
    mark = lab.originate("keyedgood", keys=f"*5{WAIT}2001#", caller_hold=30, agent_hold=30)
    events = lab.ami.wait_idle(mark, timeout=60)
    linkedid = caller_linkedid(events)
    answered = lab_events(events, "target-answered")
    assert [a["Target"] for a in answered] == ["2001"]
    keyed = [s for s in steps(lab, linkedid) if s["step"] == "extension_keyed"]
    assert keyed and keyed[0]["extension"] == "2001"


@pytest.mark.parametrize(("keys", "why"), [(f"*5{WAIT}0#", "pattern"), pytest.param("*5", "timeout", marks=pytest.mark.slow)])
def test_keyed_colleague_bad_entry_leaves_the_call_as_it_was(lab, keys, why):
    mark = lab.originate("keyedbad" + why, keys=keys, caller_hold=30, agent_hold=16)
    events = lab.ami.wait_idle(mark, timeout=40)
    assert not lab_events(events, "target-answered")
    after = lab_events(events, "after-dial")
    assert after and after[0]["DialStatus"] == "ANSWER"
    agent_ends = [e for e in lab.audit_events() if e.get("event") == "session_end"
                  and e.get("action") == "transfer/colleague-keyed"]
    assert agent_ends[-1]["outcome"] == "invalid_extension"
    assert not any(e.get("Event") == "Newexten" and e.get("Context") == "calmline-transfer" for e in events)


def test_caller_hangs_up_during_the_transfer_prompt(lab):
    # the agent presses *3 one second after answering; the caller leaves 2.5 s later
    mark = lab.originate("xferhangup", keys="*3", caller_hold=3, agent_hold=20)
    events = lab.ami.wait_idle(mark, timeout=40)
    linkedid = caller_linkedid(events)
    assert not lab_events(events, "target-answered")
    ends = [e for e in lab.audit_events() if e.get("event") == "session_end" and e.get("linkedid") == linkedid]
    assert ends and ends[-1]["outcome"] == "caller_hung_up"


def test_agent_hangs_up_during_the_transfer_prompt(lab):
    mark = lab.originate("xferagentgone", keys="*3", caller_hold=25, agent_hold=1)
    events = lab.ami.wait_idle(mark, timeout=45)
    linkedid = caller_linkedid(events)
    ends = [e for e in lab.audit_events() if e.get("event") == "session_end" and e.get("linkedid") == linkedid]
    assert ends, "the transfer session left no outcome"
    # the caller is not dropped: the transfer still reaches the supervisor
    assert [a["Target"] for a in lab_events(events, "target-answered")] == ["answers"]
