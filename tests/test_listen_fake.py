"""Listen-in on the fake Asterisk: the Originate the agent's press starts, the audit of its end,
what `calmline dialplan` renders and what the config refuses."""

from __future__ import annotations

import pytest
from conftest import run
from fake_asterisk import bridged_caller, environment, run_session

from calmline.actions import catalog
from calmline.admin import check, dialplan
from calmline.config import Config, parse
from calmline.errors import ConfigError

AGENT = "Local/listenscn@sim-agent-00000017;1"


def agent_channel(**overrides):
    channel = bridged_caller(name=AGENT)
    channel.functions["BRIDGEPEER"] = channel.variables["BRIDGEPEER"] = "Local/caller@sim-caller-00000016;1"
    for key, value in overrides.items():
        setattr(channel, key, value)
    return channel


def test_listen_originates_the_spy_and_returns_without_holding_the_agent(serving):
    async def main():
        async with serving(listen={"dial": "Local/sup@targets", "ring_seconds": 12}) as svc:
            channel = agent_channel()
            await run_session(svc.port, channel, environment("listen", channel=AGENT, uniqueid="1795350790.51",
                                                             callerid="+1555,(x)|y"))
            return svc, channel

    svc, channel = run(main())
    [(app, data)] = [(a, d) for a, d in channel.apps_run if a == "Originate"]
    # Local/<agent uniqueid>@<context>-spy spies; the other half rings [listen] dial in <context>,ring
    assert data.startswith("Local/1795350790.51@calmline-listen-spy/n,exten,calmline-listen,ring,1,12,av(")
    variables = dict(v.split("=", 1) for v in data.split("av(", 1)[1].rstrip(")").split("^"))
    assert variables["__CALMLINE_LISTEN_AGENT"] == AGENT
    assert variables["__CALMLINE_LISTEN_LINKEDID"] == "1795350788.44"
    # caller-supplied text cannot split Originate's arguments or its v() list
    assert variables["__CALMLINE_LISTEN_CALLER"] == "+1555__x__y"
    # no prompt, no wait: the agent's channel only ran the Originate (async: option a)
    assert not any(c.startswith(("STREAM FILE", "GET DATA")) for c in channel.commands)
    steps = svc.events(event="step")
    assert [s["step"] for s in steps] == ["listen_requested"]
    assert steps[0]["dial"] == "Local/sup@targets" and steps[0]["agent"] == AGENT
    assert svc.events(event="session_end")[0]["outcome"] == "completed"


def test_an_unexpected_uniqueid_never_reaches_the_dialplan(serving):
    async def main():
        async with serving() as svc:
            channel = agent_channel()
            await run_session(svc.port, channel, environment("listen", channel=AGENT, uniqueid="1@x/y,z"))
            return svc, channel

    svc, channel = run(main())
    assert not any(a == "Originate" for a, _ in channel.apps_run)
    assert svc.events(event="session_end")[0]["outcome"] == "unsafe_argument"


def result_channel(**variables):
    channel = bridged_caller(name="Local/1795350790.51@calmline-listen-spy-00000020;1")
    channel.functions = {"CHANNEL(linkedid)": "1795350799.60", "BRIDGEPEER": ""}
    channel.variables = {"CALMLINE_LISTEN_LINKEDID": "1795350788.44", "CALMLINE_LISTEN_AGENT": AGENT,
                         "CALMLINE_LISTEN_CALLER": "+15551234567", **variables}
    return channel


def test_the_end_of_a_listen_in_is_filed_under_the_call_with_who_and_how_long(serving):
    async def main():
        async with serving() as svc:
            answered = result_channel()
            answered.name = "Local/sup@targets-00000021;1"
            await run_session(svc.port, answered, environment("listen/result?stage=answered", channel=answered.name))
            ended = result_channel(DIALSTATUS="ANSWER", CALMLINE_LISTEN_STATUS="ANSWER",
                                   DIALEDPEERNAME="Local/sup@targets-00000021;1", ANSWEREDTIME="42")
            ended.hung_up = True
            await run_session(svc.port, ended, environment("listen/result", channel=ended.name))
            nobody = result_channel(DIALSTATUS="NOANSWER", CALMLINE_LISTEN_STATUS="NOANSWER",
                                    CALMLINE_LISTEN_PROMPT="calmline/listen-unanswered")
            nobody.hung_up = True
            await run_session(svc.port, nobody, environment("listen/result", channel=nobody.name))
            return svc

    svc = run(main())
    steps = svc.events(event="step")
    assert [s["step"] for s in steps] == ["listen_answered", "listen_ended", "listen_ended"]
    assert all(s["linkedid"] == "1795350788.44" for s in steps)  # the call's, not the spy's
    assert steps[0]["supervisor"] == "Local/sup@targets-00000021;1"
    assert steps[1]["answered"] is True and steps[1]["listened_seconds"] == 42
    assert steps[1]["supervisor"] == "Local/sup@targets-00000021;1"
    assert steps[2]["answered"] is False and steps[2]["dial_status"] == "NOANSWER"
    assert steps[2]["prompt"] == "calmline/listen-unanswered" and steps[2]["listened_seconds"] == 0


def test_dialplan_renders_the_code_and_the_listen_contexts():
    cfg = parse('[listen]\ncode = "*7"\ndial = "PJSIP/2001"\nring_seconds = 9\n')
    features = dialplan.render_features(cfg)
    assert "calmline_listen => *7,self,AGI,agi://127.0.0.1:4573/listen,default" in features
    ext = dialplan.render_extensions(cfg)
    assert "calmline_listen" in ext.split("[calmline-agent]")[1].splitlines()[1]
    assert " same => n,Dial(PJSIP/2001,9,U(calmline-listen-answered))" in ext
    assert "exten => _[0-9A-Za-z].,1,ChanSpy(${EXTEN},uqwdE)" in ext
    assert " same => n,Playback(calmline/listen-unanswered)" in ext
    assert "exten => s,1,AGI(agi://127.0.0.1:4573/listen/result?stage=answered)" in ext
    assert "calmline/listen-unanswered" in cfg.prompt_names()
    off = parse("[listen]\nenabled = false\n")
    assert "calmline-listen" not in dialplan.render_extensions(off)
    assert "calmline_listen" not in dialplan.render_features(off)


@pytest.mark.parametrize("dial", ["PJSIP/2001,30", "Local/${EVIL}@x", "PJSIP/a b", "2001", "PJSIP/1)|x"])
def test_a_listen_dial_that_would_inject_dialplan_is_refused(dial):
    with pytest.raises(ConfigError) as info:
        parse(f'[listen]\ndial = "{dial}"\n')
    assert info.value.problems[0].startswith("<config>: listen.dial: a dial target")


def test_a_listen_code_that_clashes_is_refused():
    with pytest.raises(ConfigError) as info:
        parse('[listen]\ncode = "*1"\n')
    assert "listen.code = '*1'" in info.value.problems[0] or "warn.code = '*1'" in info.value.problems[0]


def test_check_asks_asterisk_for_the_listen_dial_target():
    cfg = Config.model_validate({"listen": {"dial": "Local/sup@nowhere"}})
    assert check._target_commands(cfg)["dialplan show sup@nowhere"] == "listen.dial"
    outputs = {"dialplan show sup@nowhere": ["There is no existence of 'sup@nowhere' extension"],
               "dialplan show calmline-listen": ["There is no existence of 'calmline-listen' context"]}
    problems, _ = check._compare_targets(cfg, outputs, "127.0.0.1:5038")
    assert "listen.dial: Asterisk at 127.0.0.1:5038 has no dialplan for 'sup@nowhere'; point it at an " \
           "extension that exists, or create it" in problems
    assert any(p.startswith("listen.context: ") and "render and include" in p for p in problems)


def test_the_catalog_declares_listen_once():
    assert catalog.LISTEN.path == "listen" and catalog.LISTEN.code(Config()) == "*6"
    assert catalog.LISTEN.activate_on == "self"
    assert catalog.LISTEN_RESULT_ACTION.dead_ok and catalog.LISTEN_RESULT_ACTION.code_key is None
