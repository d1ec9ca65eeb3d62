"""listen: ring a supervisor who, on answering, hears the call and can whisper to the agent.

The agent is never put on hold: the action only starts an asynchronous `Originate` of a Local
channel and returns within milliseconds. The Local channel's second half runs ChanSpy on the
agent's channel (by uniqueid, whisper mode, DTMF 4/5/6 switch listen/whisper/barge); its first
half rings `[listen] dial` in the rendered listen context, and when nobody answers it plays the
unanswered prompt, which reaches the agent through the same whisper. The rendered dialplan runs
`listen/result` on the supervisor's answer and when the listen-in ends, so the trail has who
listened and for how long.
"""

from __future__ import annotations

import re
import time

from calmline.actions.catalog import LISTEN_ANSWERED, LISTEN_ENDED, LISTEN_REQUESTED
from calmline.audit import trail
from calmline.config import ListenConfig
from calmline.errors import UnsafeArgument
from calmline.fastagi.channel import channel_argument
from calmline.fastagi.contract import ActionContext

# What the originated channel carries; `__` so the supervisor's leg inherits them too.
LISTEN_VARIABLES = ("CALMLINE_LISTEN_LINKEDID", "CALMLINE_LISTEN_AGENT", "CALMLINE_LISTEN_CALLER",
                    "CALMLINE_LISTEN_AT")
LISTEN_RESULT_READS = (*LISTEN_VARIABLES, "CALMLINE_LISTEN_STATUS", "CALMLINE_LISTEN_PROMPT",
                       "DIALSTATUS", "DIALEDPEERNAME", "ANSWEREDTIME", "DIALEDTIME")

_UNIQUEID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,79}$")
_NUMBER_UNSAFE = re.compile(r"[^A-Za-z0-9+*#._-]")


def spy_context(config: ListenConfig) -> str:
    """The context whose extensions (the agent's uniqueid) run ChanSpy."""
    return f"{config.context}-spy"


def _uniqueid(value: str) -> str:
    if not _UNIQUEID.match(value):
        raise UnsafeArgument(f"refusing to pass an unexpected uniqueid to Originate: {value[:60]!r}")
    return value


class Listen:
    """Run on the agent's own channel (feature `self`): originate the listen-in and return."""

    def __init__(self, config: ListenConfig):
        self._config = config

    async def run(self, context: ActionContext) -> str:
        cfg, call = self._config, context.call
        agent_id = _uniqueid(call.uniqueid)
        values = {
            "CALMLINE_LISTEN_LINKEDID": _uniqueid(call.linkedid or call.uniqueid),
            "CALMLINE_LISTEN_AGENT": channel_argument(call.channel),
            # Caller ID is caller-supplied: only characters that cannot split an argument.
            "CALMLINE_LISTEN_CALLER": _NUMBER_UNSAFE.sub("_", call.caller_number)[:40],
            "CALMLINE_LISTEN_AT": f"{time.time():.3f}",
        }
        variables = "^".join(f"__{name}={value}" for name, value in values.items())
        local = f"Local/{agent_id}@{spy_context(cfg)}/n"
        await context.channel.exec(
            "Originate",
            f"{local},exten,{cfg.context},ring,1,{cfg.ring_seconds},av({variables})",
        )
        await context.audit.step(LISTEN_REQUESTED, dial=cfg.dial, ring_seconds=cfg.ring_seconds,
                                 agent=call.channel)
        return "completed"


def _seconds(raw: str) -> int | None:
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 10 else None


class ListenResult:
    """Run by the rendered listen context: on the supervisor's answer (`?stage=answered`, on
    the supervisor's channel) and from the hangup handler when the listen-in ends."""

    async def run(self, context: ActionContext) -> str:
        values = context.values
        linkedid = values.get("CALMLINE_LISTEN_LINKEDID", "")
        agent = values.get("CALMLINE_LISTEN_AGENT", "")
        # The originated channel has a linkedid of its own: file the steps under the call's.
        trail.bind(linkedid=linkedid, agent=agent, caller_number=values.get("CALMLINE_LISTEN_CALLER", ""))
        if context.params.get("stage") == "answered":
            await context.audit.step(LISTEN_ANSWERED, supervisor=context.call.channel, agent=agent)
            return "completed"
        status = values.get("CALMLINE_LISTEN_STATUS") or values.get("DIALSTATUS") or "UNKNOWN"
        answered = status == "ANSWER"
        await context.audit.step(
            LISTEN_ENDED,
            answered=answered,
            dial_status=status,
            supervisor=values.get("DIALEDPEERNAME") or None,
            listened_seconds=_seconds(values.get("ANSWEREDTIME", "")) if answered else 0,
            prompt=values.get("CALMLINE_LISTEN_PROMPT") or None,
            agent=agent,
        )
        return "completed"
