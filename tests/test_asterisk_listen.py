"""Listen-in on a real Asterisk 22: the agent presses *6, a supervisor (the lab's `listener`)
is rung and hears the call through ChanSpy in whisper mode; the caller hears nothing of it.

What each party heard is recorded by MixMonitor on the lab's own halves of the Local channels
(`r()`: the audio the call sends that party) and measured as seconds of speech.
"""

from __future__ import annotations

import time
import wave
from array import array
from pathlib import Path

import pytest
from asterisk_lab import caller_linkedid

pytestmark = pytest.mark.asterisk

LOUD = 300  # RMS of a 20 ms block that is speech, not silence (the prompts peak at -3 dBFS)


def set_listener(lab, how: str) -> None:
    response = lab.ami.manager.send_action({"Action": "Setvar", "Variable": "LISTENER", "Value": how})
    assert response.get_header("Response") == "Success", response.headers


def speech_seconds(path: Path) -> float:
    """Seconds of audio louder than silence in a WAV that MixMonitor wrote (8 kHz, 16 bit)."""
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not path.exists():
        return 0.0
    with wave.open(str(path)) as w:
        rate, samples = w.getframerate(), array("h", w.readframes(w.getnframes()))
    block = rate // 50
    loud = 0
    for start in range(0, len(samples) - block + 1, block):
        chunk = samples[start:start + block]
        if (sum(s * s for s in chunk) / block) ** 0.5 > LOUD:
            loud += 1
    return loud / 50


def listen_call(lab, tmp_path: Path, how: str, scen: str):
    set_listener(lab, how)
    record = tmp_path / scen
    record.mkdir()
    mark = lab.originate(scen, keys="*6", caller_hold=20, agent_hold=16, extra={
        "CALLER_RECORD": str(record / "caller"), "__AGENT_RECORD": str(record / "agent")})
    events = lab.ami.wait_idle(mark, timeout=45)
    linkedid = caller_linkedid(events)
    steps = [e for e in lab.audit_events() if e.get("linkedid") == linkedid and e.get("event") == "step"]
    heard = {who: speech_seconds(record / f"{who}-heard.wav") for who in ("caller", "agent")}
    return events, steps, heard


def agent_channel(events, scen):
    return next(e["Channel"] for e in events if e.get("Event") == "BridgeEnter"
                and e.get("Channel", "").startswith(f"Local/{scen}@sim-agent-"))


def lab_event(events, where):
    return [e for e in events if e.get("Event") == "UserEvent" and e.get("Where") == where]


def test_the_supervisor_whispers_to_the_agent_and_the_caller_hears_nothing(lab, tmp_path):
    events, steps, heard = listen_call(lab, tmp_path, "whisper", "listenwhisper")
    agent = agent_channel(events, "listenwhisper")
    spies = [e for e in events if e.get("Event") == "ChanSpyStart"]
    # ChanSpy ran on the agent's channel, and on no other
    assert spies and {e["SpyeeChannel"] for e in spies} == {agent}
    assert all("@calmline-listen-spy-" in e["SpyerChannel"] for e in spies)
    assert lab_event(events, "listener-answered")
    # the supervisor's prompt (3.8 s of speech in it) reached the agent; the caller heard none of it
    assert heard["agent"] >= 2.5, heard
    assert heard["caller"] < 0.3, heard
    # the agent was never on hold: the action ran one command (Originate) on the agent's
    # channel, and it was over before the supervisor answered
    on_agent = [e for e in events if e.get("Event") == "AGIExecEnd" and e.get("Channel") == agent]
    assert [e["Command"].split('"')[0].strip() for e in on_agent
            if not e["Command"].startswith(("GET FULL VARIABLE", "SET VARIABLE CALMLINE_STATUS"))] == \
        ["EXEC Originate"]
    assert events.index(on_agent[-1]) < events.index(lab_event(events, "listener-answered")[0])
    # the trail: asked, answered by whom, ended after how long
    names = [s["step"] for s in steps]
    assert names == ["listen_requested", "listen_answered", "listen_ended"], names
    answered, ended = steps[1], steps[2]
    assert answered["supervisor"].startswith("Local/listener@sim-targets-")
    assert ended["answered"] is True and ended["dial_status"] == "ANSWER"
    assert ended["supervisor"] == answered["supervisor"] and ended["agent"] == agent
    assert 5 <= ended["listened_seconds"] <= 10


@pytest.mark.slow  # its fake-Asterisk twin runs every time
def test_the_supervisor_presses_6_to_barge_and_then_the_caller_hears_them(lab, tmp_path):
    events, steps, heard = listen_call(lab, tmp_path, "barge", "listenbarge")
    assert lab_event(events, "listener-barged")
    spy_digits = [e["Digit"] for e in events if e.get("Event") == "DTMFEnd"
                  and "@calmline-listen-spy-" in e.get("Channel", "") and e.get("Direction") == "Received"]
    assert "6" in spy_digits
    # before the 6 only the agent heard the supervisor (3.8 s of speech); after it both did
    assert heard["agent"] >= 5.0, heard
    assert 2.0 <= heard["caller"] <= 6.0, heard
    assert [s["step"] for s in steps] == ["listen_requested", "listen_answered", "listen_ended"]


def test_nobody_answers_and_the_agent_hears_the_prompt(lab, tmp_path):
    events, steps, heard = listen_call(lab, tmp_path, "noanswer", "listennobody")
    assert not lab_event(events, "listener-answered")
    # listen-unanswered (1.8 s of speech) is whispered: the agent hears it, the caller does not
    assert heard["agent"] >= 1.0, heard
    assert heard["caller"] < 0.3, heard
    ended = [s for s in steps if s["step"] == "listen_ended"]
    assert len(ended) == 1 and ended[0]["answered"] is False
    assert ended[0]["dial_status"] == "NOANSWER" and ended[0]["prompt"] == "calmline/listen-unanswered"
    assert ended[0]["listened_seconds"] == 0 and ended[0]["supervisor"] is None
