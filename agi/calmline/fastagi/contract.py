"""The contract between the FastAGI layer and an action: what an action gets and implements.

An action is a small object with a `run(context)` coroutine that talks to a `Channel`
and records its steps; it knows nothing of sockets, so it can be tested with a fake channel.
The registry holds each action with what the session needs before running it (the leg it
runs on, the variables to read); `service.build_registry()` fills it from the action catalog:
no import side effects, no module globals.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Literal, Protocol

from calmline.audit.trail import AuditTrail
from calmline.fastagi.channel import Channel

RunsOn = Literal["caller", "agent"]
_COUNT = re.compile(r"[0-9]{1,6}")


def parse_count(raw: str) -> int | None:
    """A count kept in a channel variable (the warnings so far), or None if it is not one.

    The variable lives on the caller's channel, where anything may have written it: only 1-6
    ASCII digits count (`str.isdigit` also accepts `²`, which `int` refuses, and `int`
    refuses more than 4,300 digits).
    """
    return int(raw) if _COUNT.fullmatch(raw) else None



@dataclass(frozen=True, slots=True)
class CallIdentity:
    """Who and what the session is about, for the audit trail and the callback request."""

    uniqueid: str
    channel: str
    caller_number: str
    caller_name: str
    linkedid: str = ""
    agent_channel: str = ""
    caller_channel: str = ""

    @classmethod
    def from_environment(cls, env: dict[str, str]) -> CallIdentity:
        name = env.get("agi_calleridname", "")
        return cls(
            uniqueid=env.get("agi_uniqueid", ""),
            channel=env.get("agi_channel", ""),
            caller_number=env.get("agi_callerid", ""),
            caller_name="" if name == "unknown" else name,
        )

    def with_bridge(self, linkedid: str, bridge_peer: str, runs_on: RunsOn) -> CallIdentity:
        """Fill in the call's linkedid and which leg is the agent's, from BRIDGEPEER."""
        agent, caller = (bridge_peer, self.channel) if runs_on == "caller" else (self.channel, bridge_peer)
        return CallIdentity(self.uniqueid, self.channel, self.caller_number, self.caller_name,
                            linkedid, agent, caller)


@dataclass(frozen=True, slots=True)
class ActionContext:
    """Everything an action may use: the channel, the call, prefetched values, the audit."""

    channel: Channel
    call: CallIdentity
    values: dict[str, str]
    params: dict[str, str]
    audit: AuditTrail


class Action(Protocol):
    """A keypad action: runs on the channel of the session, returns its outcome."""

    async def run(self, context: ActionContext) -> str: ...


@dataclass(frozen=True, slots=True)
class Route:
    """An action as a session runs it: on which leg, with which variables fetched first (in
    one trip, with the call's identity), and whether its channel is already hung up."""

    action: Action
    runs_on: RunsOn
    reads: tuple[str, ...] = ()
    dead_ok: bool = False

    def run(self, context: ActionContext) -> Awaitable[str]:
        return self.action.run(context)


class Registry:
    """Maps request paths (`warn`, `transfer/supervisor`) to routes."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}

    def add(self, path: str, action: Action, *, runs_on: RunsOn, reads: tuple[str, ...] = (),
            dead_ok: bool = False) -> None:
        if path in self._routes:
            raise ValueError(f"two actions registered at path {path!r}")
        self._routes[path] = Route(action, runs_on, reads, dead_ok)

    def resolve(self, path: str) -> Route | None:
        return self._routes.get(path)

    def paths(self) -> list[str]:
        return sorted(self._routes)
