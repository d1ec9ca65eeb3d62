"""Transfers on the fake Asterisk: labels on the caller, the redirect, bad keyed input."""

from __future__ import annotations

import pytest
from conftest import run
from fake_asterisk import bridged_caller, environment, run_session

from calmline.config import ColleagueKeyedConfig, TransferTarget, parse
from calmline.errors import ConfigError


@pytest.mark.parametrize(("path", "exten", "prompt"), [
    ("transfer/supervisor", "supervisor", "calmline/transfer-supervisor"),
    ("transfer/colleague", "colleague", "calmline/transfer-colleague"),
])
def test_transfer_labels_the_caller_then_redirects(serving, path, exten, prompt):
    async def main():
        async with serving() as svc:
            channel = bridged_caller()
            channel.variables["CALMLINE_WARNINGS"] = "2"
            await run_session(svc.port, channel, environment(path))
            return svc, channel

    svc, channel = run(main())
    commands = channel.commands
    assert commands.index(f'STREAM FILE "{prompt}" ""') < commands.index(
        f'EXEC ChannelRedirect "{channel.name},calmline-transfer,{exten},1"')
    assert channel.variables["CALMLINE_XFER_TARGET"] == exten
    assert channel.variables["CALMLINE_XFER_WARNINGS"] == "2"
    assert channel.variables["CALMLINE_XFER_BY"] == "Local/warnscn@sim-agent-00000017;1"
    assert ("ChannelRedirect", f"{channel.name},calmline-transfer,{exten},1") in channel.apps_run
    steps = [e["step"] for e in svc.events(event="step")]
    assert steps == ["transfer_prompt_played", "alert_user_event", "caller_transferred"]
    end = svc.events(event="session_end")[0]
    # The redirect takes the channel away from the AGI: that is success, not a hangup.
    assert end["outcome"] == "completed"


def test_hangup_during_the_transfer_prompt_does_not_redirect(serving):
    async def main():
        async with serving() as svc:
            channel = bridged_caller(hangup_during_prompt=1)
            await run_session(svc.port, channel, environment("transfer/supervisor"))
            return svc, channel

    svc, channel = run(main())
    assert not any(app == "ChannelRedirect" for app, _ in channel.apps_run)
    assert svc.events(event="session_end")[0]["outcome"] == "caller_hung_up"


def agent_channel(digits):
    channel = bridged_caller(name="Local/keyscn@sim-agent-00000003;1")
    channel.functions["BRIDGEPEER"] = channel.variables["BRIDGEPEER"] = "Local/caller@sim-caller-00000002;1"
    channel.digits = list(digits)
    return channel


def test_keyed_colleague_with_a_good_extension_moves_the_caller(serving):
    async def main():
        async with serving() as svc:
            channel = agent_channel(["2002"])
            await run_session(svc.port, channel, environment("transfer/colleague-keyed", channel=channel.name))
            return svc, channel

    svc, channel = run(main())
    assert 'GET DATA "calmline/enter-extension" 6000 6' in channel.commands
    assert ("ChannelRedirect", "Local/caller@sim-caller-00000002;1,calmline-transfer,k2002,1") in channel.apps_run
    assert ("Local/caller@sim-caller-00000002;1", "CALMLINE_XFER_BY", "Local/keyscn@sim-agent-00000003;1") in channel.exported
    assert ("Local/caller@sim-caller-00000002;1", "CALMLINE_XFER_TARGET", "colleague 2002") in channel.exported
    step = svc.events(event="step", step="caller_transferred")[0]
    assert step["extension"] == "2002"
    assert step["agent"] == channel.name and step["caller_channel"] == "Local/caller@sim-caller-00000002;1"


@pytest.mark.parametrize("digits", [[], ["0"], ["12345678"]], ids=["timeout", "pattern", "too-long"])
def test_keyed_colleague_bad_entry_leaves_the_call_as_it_was(serving, digits):
    async def main():
        async with serving() as svc:
            channel = agent_channel(digits)
            await run_session(svc.port, channel, environment("transfer/colleague-keyed", channel=channel.name))
            return svc, channel

    svc, channel = run(main())
    assert channel.apps_run == [] and channel.exported == []  # nothing set on the caller, no redirect
    assert 'STREAM FILE "calmline/extension-invalid" ""' in channel.commands
    end = svc.events(event="session_end")[0]
    assert end["outcome"] == "invalid_extension"
    assert channel.variables["CALMLINE_STATUS"] == "failed"


def test_transfer_result_records_the_dial_status(serving):
    async def main():
        async with serving() as svc:
            channel = bridged_caller()
            channel.functions["BRIDGEPEER"] = ""
            channel.variables.update(CALMLINE_XFER_STATUS="NOANSWER", CALMLINE_XFER_TARGET="colleague",
                                     CALMLINE_XFER_FALLBACK="queue support")
            channel.hung_up = True  # it runs from the caller's hangup handler
            await run_session(svc.port, channel, environment("transfer/result"))
            return svc

    svc = run(main())
    step = svc.events(event="step", step="transfer_result")[0]
    assert step["dial_status"] == "NOANSWER" and step["fallback"] == "queue support"
    assert step["target"] == "colleague" and step["answered"] is False
    assert svc.events(event="session_end")[0]["outcome"] == "completed"


@pytest.mark.parametrize("dial", ["PJSIP/1,2", "PJSIP/1|PJSIP/2", "PJSIP/${EVIL}", "PJSIP/1\nexten", "PJSIP/a b", "nodial"])
def test_config_rejects_a_target_that_injects_dialplan(dial):
    toml = f'[transfer.supervisor]\ncode = "*3"\ndial = {dial!r}\nprompt = "p"\nreason = "r"\n'.replace("'", '"')
    with pytest.raises(ConfigError) as info:
        parse(toml, "t.toml")
    assert "transfer.supervisor.dial" in str(info.value)


def test_keyed_template_must_be_a_safe_dial_string():
    with pytest.raises(ValueError):
        ColleagueKeyedConfig(dial_template="PJSIP/{ext},tT")
    with pytest.raises(ValueError):
        TransferTarget(code="*3", dial="PJSIP/1", prompt="p", reason="r", fallback_queue="a,b")


@pytest.mark.parametrize("step", range(8))
def test_hangup_at_every_step_of_a_transfer_never_moves_a_dead_caller(serving, step):
    async def main():
        async with serving() as svc:
            channel = bridged_caller(hangup_before=step)
            await run_session(svc.port, channel, environment("transfer/supervisor"))
            return svc, channel

    svc, channel = run(main())
    end = svc.events(event="session_end")[0]
    assert end["outcome"] == "caller_hung_up"
    assert not any(e["step"] == "caller_transferred" for e in svc.events(event="step"))
    # Commands after the hangup notice are not sent: the action stops at the step it was on.
    assert len(channel.commands) == step + 2  # up to the one that saw HANGUP, then the status
