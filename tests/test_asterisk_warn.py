"""The warn ladder on a real Asterisk 22: Dial and Queue calls, agent presses real DTMF."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.asterisk


def _agi_runs(events):
    return [e for e in events if e.get("Event") == "AGIExecEnd" or e.get("Event") == "AGIExecStart"]


def test_warn_stage_one_in_a_dial_call(lab):
    mark = lab.originate("warnone", keys="*1")
    events = lab.ami.wait_idle(mark)
    after = [e for e in events if e.get("Event") == "UserEvent" and e.get("UserEvent") == "CalmlineLab"]
    print(after)
    varsets = [e for e in events if e.get("Event") == "VarSet" and e.get("Variable") in ("CALMLINE_WARNINGS", "CALMLINE_STATUS")]
    print(varsets)
    audit = lab.audit_events()
    print(audit[-5:])
    assert any(v["Variable"] == "CALMLINE_WARNINGS" and v["Value"] == "1" for v in varsets)
