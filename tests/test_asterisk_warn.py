"""The warn ladder on a real Asterisk 22: Dial and Queue calls, the agent presses real DTMF.

Every call is checked from both sides: calmline's audit trail (what it believes it did) and
Asterisk's own AMI events (what the PBX saw: AGI commands on the caller's channel, the
variables set there, the lab dialplan's `CalmlineLab` user event once the agent has hung up,
and every DTMF digit with its direction).
"""

from __future__ import annotations

import sqlite3
import time

import pytest

pytestmark = pytest.mark.asterisk

CALLER = "Local/caller@sim-caller-"
CALLER_NUMBER = "+15551234567"
GAP = "w" * 24  # SendDTMF: 24 half-second pauses, so the second *1 comes after warn-1 (9.15 s)


class Call:
    """One lab call: its AMI events and calmline's audit events, picked out by linkedid."""

    def __init__(self, lab, scen: str, events: list[dict[str, str]]):
        scen_set = [e for e in events if e.get("Event") == "VarSet" and e.get("Variable") == "SCEN"
                    and e.get("Value") == scen and e.get("Channel", "").startswith(CALLER)]
        assert scen_set, f"no call for scenario {scen} was seen"
        self.linkedid = scen_set[0]["Linkedid"]
        self.events = [e for e in events if e.get("Linkedid") == self.linkedid]
        self.caller = next(e["Channel"] for e in self.events
                           if e.get("Event") == "Newchannel" and e["Channel"].startswith(CALLER)
                           and e["Channel"].endswith(";1"))
        entered = [e["Channel"] for e in self.events
                   if e.get("Event") == "BridgeEnter" and not e["Channel"].startswith(CALLER)]
        self.agent = entered[0] if entered else None
        self.audit = [e for e in lab.audit_events() if e.get("linkedid") == self.linkedid]

    def on_caller(self, event: str, **headers: str) -> list[dict[str, str]]:
        return [e for e in self.events if e.get("Event") == event and e.get("Channel") == self.caller
                and all(e.get(k) == v for k, v in headers.items())]

    def values(self, variable: str) -> list[str]:
        return [e["Value"] for e in self.on_caller("VarSet", Variable=variable)]

    def lab_event(self, where: str) -> list[dict[str, str]]:
        return [e for e in self.events if e.get("Event") == "UserEvent"
                and e.get("UserEvent") == "CalmlineLab" and e.get("Where") == where]

    def steps(self, step: str) -> list[dict]:
        return [e for e in self.audit if e.get("event") == "step" and e.get("step") == step]

    def session_ends(self) -> list[dict]:
        return [e for e in self.audit if e.get("event") == "session_end"]

    def digits(self, prefix: str, direction: str | None = None) -> list[str]:
        """DTMF digits (one per DTMFEnd) on channels whose name starts with `prefix`."""
        return [e["Digit"] for e in self.events if e.get("Event") == "DTMFEnd"
                and e.get("Channel", "").startswith(prefix)
                and (direction is None or e.get("Direction") == direction)]

    def caller_dtmf(self) -> list[dict[str, str]]:
        return [e for e in self.events if e.get("Event") in ("DTMFBegin", "DTMFEnd")
                and e.get("Channel", "").startswith(CALLER)]

    def agent_phone_hangup(self) -> dict[str, str]:
        """The agent's phone starting to hang up: what ends the call when the caller's leg is
        still there. A dialplan marker, not a Hangup event: Asterisk orders neither Local
        half's Hangup against the caller's BridgeLeave (CI saw the ;2 half's come after it)."""
        return next(iter(self.lab_event("agent-hangs-up")))

    def index(self, event: dict[str, str]) -> int:
        return next(i for i, e in enumerate(self.events) if e is event)


def place(lab, *specs: dict) -> dict[str, Call]:
    """Originate the calls at once, wait until every channel has hung up, split the events."""
    mark = lab.ami.mark()
    for spec in specs:
        lab.originate(**spec)
    events = lab.ami.wait_idle(mark, timeout=60)
    return {spec["scen"]: Call(lab, spec["scen"], events) for spec in specs}


@pytest.fixture(scope="module")
def two_warnings(lab):
    """A Dial call and a Queue call side by side; in each the agent presses 5 (a digit that
    is no feature code, the control), then *1, then *1 again 12 s later."""
    keys = "5ww*1" + GAP + "*1"
    # the agent hangs up ~23 s after answering, the caller would at 30 s: the caller's leg
    # must still be alive when the agent leaves, or the after-dial event cannot happen
    common = {"keys": keys, "caller_hold": 30, "agent_hold": 7}
    calls = place(
        lab,
        {"scen": "dialwarn", "exten": "100", **common},
        # an admin's own dynamic feature inherited onto the agent's leg: calmline must add to it
        {"scen": "queuewarn", "exten": "200", **common, "extra": {"__DYNAMIC_FEATURES": "lab_admin_feature"}},
    )
    return calls["dialwarn"], calls["queuewarn"]


@pytest.mark.parametrize("which", ["dial", "queue"])
def test_two_warnings_in_the_audit_trail(two_warnings, which):
    call = two_warnings[0 if which == "dial" else 1]
    assert call.agent and call.agent.startswith(
        "Local/dialwarn@sim-agent-" if which == "dial" else "Local/queueagent@sim-agent-")
    assert call.agent.endswith(";1")
    played = call.steps("warning_played")
    assert [(s["warning"], s["final"], s["prompt"]) for s in played] == [
        (1, False, "calmline/warn-1"),
        (2, True, "calmline/warn-final"),
    ]
    for step in played:
        assert step["linkedid"] == call.linkedid
        assert step["channel"] == call.caller
        assert step["caller_channel"] == call.caller
        assert step["agent"] == call.agent
        assert step["caller_number"] == CALLER_NUMBER
        # exten 100 sets the name through ${IF(...)}, which drops the quotes; exten 200 sets
        # it directly, and the quotes reach calmline's audit trail intact
        assert step["caller_name"] == ("Angry Bob Smith" if which == "dial" else 'Angry "Bob" Smith')
        assert step["action"] == "warn"
    assert [(e["outcome"], e["status"]) for e in call.session_ends()] == [("completed", "ok")] * 2


@pytest.mark.parametrize("which", ["dial", "queue"])
def test_two_warnings_as_asterisk_saw_them(two_warnings, which):
    call = two_warnings[0 if which == "dial" else 1]
    # the AGI ran on the caller's channel, and each command Asterisk ran for it succeeded
    starts = call.on_caller("AGIExecStart")
    ends = call.on_caller("AGIExecEnd")
    assert starts and len(starts) == len(ends)
    assert all(e["ResultCode"] == "200" for e in ends), [(e["Command"], e["ResultCode"]) for e in ends]
    streams = [e["Command"] for e in ends if e["Command"].startswith("STREAM FILE")]
    assert streams == ['STREAM FILE "calmline/warn-1" ""', 'STREAM FILE "calmline/warn-final" ""']
    assert not [e for e in call.events if e.get("Event", "").startswith("AGIExec")
                and e.get("Channel") != call.caller], "an AGI ran on a channel that is not the caller's"
    assert call.values("CALMLINE_WARNINGS") == ["1", "2"]
    assert call.values("CALMLINE_STATUS") == ["ok", "ok"]
    assert call.values("AGISTATUS") == ["SUCCESS", "SUCCESS"]
    # the caller never left the bridge for the warnings: the agent's hangup ended it
    where = "after-dial" if which == "dial" else "after-queue"
    after = call.lab_event(where)
    assert len(after) == 1 and after[0]["Channel"] == call.caller
    assert (after[0]["Warnings"], after[0]["Status"]) == ("2", "ok")
    if which == "dial":
        assert after[0]["DialStatus"] == "ANSWER"
    left = call.on_caller("BridgeLeave")
    assert len(left) == 1
    assert call.index(left[0]) > call.index(call.agent_phone_hangup())


def test_pre_dial_handler_appends_to_the_agents_dynamic_features(two_warnings):
    dial, queue = two_warnings
    names = ("calmline_warn#calmline_supervisor#calmline_colleague#calmline_colleague_keyed#calmline_end"
             "#calmline_listen")

    def agent_features(call):
        return [e["Value"] for e in call.events if e.get("Event") == "VarSet"
                and e.get("Channel") == call.agent and e.get("Variable") == "DYNAMIC_FEATURES"]

    assert agent_features(dial)[-1] == names
    assert agent_features(queue)[-1] == "lab_admin_feature#" + names


def test_feature_digits_never_reach_the_caller(two_warnings):
    for call in two_warnings:
        # the agent's keys did arrive at the agent's leg in the bridge, in order...
        assert call.digits(call.agent, "Received") == ["5", "*", "1", "*", "1"]
        # ...and of them only the control digit went on to the caller: sent out of the
        # caller's leg of the bridge and received by the caller's phone
        assert call.digits(call.caller, "Sent") == ["5"]
        assert call.digits(call.caller[:-1] + "2", "Received") == ["5"]
        leaked = [(e["Channel"], e["Digit"]) for e in call.caller_dtmf() if e["Digit"] != "5"]
        assert leaked == []


def test_misplaced_b_option_in_queue_leaks_the_digits(lab):
    """The lab's exten 201 has b() in Queue's third argument: Asterisk ignores it there, so
    the feature never fires and the agent's *1 reaches the caller as tones."""
    call = place(lab, {"scen": "wrongqueue", "exten": "201", "keys": "*1", "caller_hold": 8, "agent_hold": 3})["wrongqueue"]
    assert call.digits(call.agent, "Received") == ["*", "1"]
    assert call.digits(call.caller, "Sent") == ["*", "1"]
    assert not [e for e in call.events if e.get("Event") == "VarSet" and e.get("Variable") == "DYNAMIC_FEATURES"]
    assert not [e for e in call.events if e.get("Event", "").startswith("AGIExec")]
    assert call.audit == []


def _log_size(lab) -> int:
    path = lab.run_dir / "log" / "full"
    return path.stat().st_size if path.exists() else 0


def _log_since(lab, offset: int) -> str:
    with (lab.run_dir / "log" / "full").open("rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


@pytest.fixture
def missing_prompt_service(lab):
    lab.start_service(extra_config='\n[warn]\nstages = [{ prompt = "calmline/not-installed" }]\n')
    try:
        yield
    finally:
        lab.start_service(extra_config="")


def test_missing_prompt_fails_the_action_not_the_call(lab, missing_prompt_service):
    log_at = _log_size(lab)
    call = place(lab, {"scen": "nowarnprompt", "keys": "*1", "caller_hold": 10, "agent_hold": 4})["nowarnprompt"]
    # calmline: the outcome says why, and no warning is recorded as played
    assert [(e["outcome"], e["status"]) for e in call.session_ends()] == [("prompt_missing", "failed")]
    assert "calmline/not-installed" in call.session_ends()[0]["error"]
    assert call.steps("warning_played") == []
    # Asterisk: the playback failed, the status says so, the counter was not advanced
    streams = [e for e in call.on_caller("AGIExecEnd") if e["Command"].startswith("STREAM FILE")]
    assert [(e["Command"], e["ResultCode"]) for e in streams] == [('STREAM FILE "calmline/not-installed" ""', "-1")]
    assert call.values("CALMLINE_STATUS") == ["failed"]
    assert call.values("CALMLINE_WARNINGS") == []
    # the call went on: the caller's leg was still there when the agent hung up
    after = call.lab_event("after-dial")
    assert len(after) == 1 and (after[0]["DialStatus"], after[0]["Status"]) == ("ANSWER", "failed")
    assert "calmline: prompt_missing: prompt 'calmline/not-installed'" in _log_since(lab, log_at)


@pytest.fixture
def service_down(lab):
    lab.stop_service()
    try:
        yield
    finally:
        lab.start_service()


def test_service_down_the_call_stays_bridged(lab, service_down):
    log_at = _log_size(lab)
    audit_before = len(lab.audit_events())
    call = place(lab, {"scen": "servicedown", "keys": "*1ww5", "caller_hold": 9, "agent_hold": 4})["servicedown"]
    # the feature fired (its digits were taken) but the AGI could not connect
    assert call.values("AGISTATUS") == ["FAILURE"]
    assert not [e for e in call.events if e.get("Event", "").startswith("AGIExec")]
    assert call.values("CALMLINE_STATUS") == []
    log = _log_since(lab, log_at)
    url = f"agi://127.0.0.1:{lab.port}/warn"
    assert f"Connecting to '127.0.0.1:{lab.port}' failed for url '{url}': Connection refused" in log
    assert "FastAGI failed" in log
    # nothing the caller can notice: still bridged until the agent hangs up, no tones of the code
    left = call.on_caller("BridgeLeave")
    assert len(left) == 1 and call.index(left[0]) > call.index(call.agent_phone_hangup())
    after = call.lab_event("after-dial")
    assert len(after) == 1 and (after[0]["DialStatus"], after[0]["Status"]) == ("ANSWER", "")
    assert call.digits(call.caller, "Sent") == ["5"]
    assert len(lab.audit_events()) == audit_before



@pytest.fixture
def audit_store_locked(lab):
    """Someone holds a write lock on the audit database (a backup tool, an admin's sqlite3)."""
    blocker = sqlite3.connect(lab.audit_db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield blocker
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()


def test_a_locked_audit_store_does_not_keep_the_caller_out_of_the_call(lab, audit_store_locked):
    """The warning plays, the step waits audit.commit_timeout (5 s) for its commit, then the
    caller and the agent talk again; the step reaches the store once the lock is gone."""
    service_log_at = lab.service_log.stat().st_size
    # warn-1 lasts about 9 s and the commit wait 5 s more: the agent stays on well past both
    call = place(lab, {"scen": "auditlocked", "keys": "*1", "caller_hold": 30, "agent_hold": 20})["auditlocked"]
    audit_store_locked.execute("ROLLBACK")
    assert call.values("CALMLINE_WARNINGS") == ["1"]
    assert call.values("CALMLINE_STATUS") == ["ok"]
    # the caller stays in the bridge while the feature runs (its audio goes to the AGI, and
    # the agent hears silence); the call went on until the agent hung up
    left = call.on_caller("BridgeLeave")
    assert len(left) == 1 and call.index(left[0]) > call.index(call.agent_phone_hangup())
    after = call.lab_event("after-dial")
    assert len(after) == 1 and (after[0]["DialStatus"], after[0]["Status"]) == ("ANSWER", "ok")
    log = _service_log_since(lab, service_log_at)
    assert "cannot write the audit store" in log and "database is locked" in log
    assert "(audit.commit_timeout)" in log and "calls go on without waiting" in log
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        audit = [e for e in lab.audit_events() if e.get("linkedid") == call.linkedid]
        if any(e["event"] == "session_end" for e in audit):
            break
    assert [e["step"] for e in audit if e["event"] == "step"] == ["warning_played"]
    assert [e["step"] for e in audit if e["event"] == "step_not_yet_durable"] == ["warning_played"]
    assert "is writable again" in _service_log_since(lab, service_log_at)


def _service_log_since(lab, offset: int) -> str:
    """What calmline serve printed (stdout and stderr) since `offset`."""
    with lab.service_log.open("rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


@pytest.mark.parametrize("which", ["dial", "queue"])
def test_the_final_warning_raises_the_escalation_user_event_over_ami(two_warnings, which):
    call = two_warnings[0 if which == "dial" else 1]
    raised = [e for e in call.events if e.get("Event") == "UserEvent" and e.get("UserEvent") == "CalmlineEscalation"]
    # one event: the final warning (the first warning is no escalation)
    assert len(raised) == 1, raised
    event = raised[0]
    assert (event["Kind"], event["Warnings"], event["Target"]) == ("final_warning", "2", "-")
    assert event["Channel"] == call.caller and event["CallLinkedid"] == call.linkedid
    assert event["Agent"] == call.agent and event["CallerNumber"] == CALLER_NUMBER
    assert event["CallUniqueid"] == event["Uniqueid"]
    step = call.steps("alert_user_event")
    assert len(step) == 1 and step[0]["key"] == event["AlertId"] and step[0]["kind"] == "final_warning"
