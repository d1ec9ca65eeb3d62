"""One FastAGI session: read the environment, find the action, run it, record the outcome.

This is the boundary where every error is caught, exactly once: it becomes an audit
outcome and the `CALMLINE_STATUS` variable the dialplan can branch on. The call's identity
is bound to the log context here, once, so every event below carries it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from calmline.fastagi.contract import ActionContext, CallIdentity, Registry
from calmline.audit import trail as audit
from calmline.audit.trail import AuditTrail
from calmline.fastagi.channel import Channel
from calmline.config import Config
from calmline.errors import CalmlineError, ConnectionLost, MalformedAnswer, Refused
from calmline.fastagi.protocol import AGIStream

STATUS_VARIABLE = "CALMLINE_STATUS"
CANCELLED = "cancelled"
# How long a session cancelled by a stopping service waits for Asterisk to take its status.
FINISH_TIMEOUT = 2.0
_session_ids = itertools.count(1)
# Unique across restarts too (a service restarted as PID 1 in a container reuses its PID).
_PROCESS = os.urandom(3).hex()


@dataclass(frozen=True, slots=True)
class Request:
    """The path and query string Asterisk was asked for (`agi://host:port/PATH?QUERY`)."""

    path: str
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_environment(cls, env: dict[str, str]) -> Request:
        script = env.get("agi_network_script")
        if script is None:
            try:
                parts = urlsplit(env.get("agi_request", ""))
            except ValueError as exc:  # e.g. an unclosed "[" where an IPv6 host would be
                raise MalformedAnswer(f"agi_request is not a URL ({exc})") from None
            script = parts.path + ("?" + parts.query if parts.query else "")
        path, _, query = script.partition("?")
        params = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
        return cls(path.strip("/"), params)


class Session:
    """Runs one connection from Asterisk through to its outcome."""

    def __init__(
        self,
        stream: AGIStream,
        *,
        registry: Registry,
        config: Config,
        audit: AuditTrail,
        peer: str,
    ):
        self._stream = stream
        self._registry = registry
        self._config = config
        self._audit = audit
        self._peer = peer
        self.action: str | None = None  # the request path, once it named a known action

    async def run(self) -> str:
        """Serve the session; return its outcome. Never raises for anything Asterisk sends.

        Whatever happens, the socket is closed and its timer disarmed when this returns; a
        cancelled session (the service stopping) still records its end and tells Asterisk
        `failed`, then lets the cancellation through.
        """
        started = time.perf_counter()
        audit.clear()
        audit.bind(
            session=f"{_PROCESS}-{next(_session_ids)}", peer=self._peer
        )
        try:
            return await self._serve(started)
        finally:
            await self._stream.close()
            audit.clear()

    async def _serve(self, started: float) -> str:
        try:
            env = await self._stream.read_environment(self._config.server.environment_timeout)
            request = Request.from_environment(env)
        except ConnectionLost:
            # Nothing was asked (a port probe such as `calmline check`): not a problem.
            self._audit.event("connection_closed_before_request")
            return "no_request"
        except CalmlineError as exc:
            self._audit.problem("session_rejected", outcome=exc.outcome, error=str(exc))
            return exc.outcome

        call = CallIdentity.from_environment(env)
        audit.bind(
            action=request.path,
            uniqueid=call.uniqueid,
            channel=call.channel,
            caller_number=call.caller_number,
            caller_name=call.caller_name,
        )
        action = self._registry.resolve(request.path)
        if action is not None:
            self.action = request.path
        channel = Channel(self._stream, call.channel, dead_ok=getattr(action, "dead_ok", False))
        outcome, status, error = "completed", "ok", None
        cancelled: asyncio.CancelledError | None = None
        try:
            if action is None:
                raise Refused(
                    f"no action at path {request.path!r}; "
                    f"known paths: {', '.join(self._registry.paths()) or 'none'}"
                )
            values = await channel.snapshot(["CHANNEL(linkedid)", "BRIDGEPEER", *action.reads])
            call = call.with_bridge(values["CHANNEL(linkedid)"], values["BRIDGEPEER"], action.runs_on)
            audit.bind(
                linkedid=call.linkedid, agent=call.agent_channel, caller_channel=call.caller_channel
            )
            self._audit.event("session_start", params=request.params or None)
            context = ActionContext(
                channel=channel,
                call=call,
                values=values,
                params=request.params,
                audit=self._audit,
            )
            outcome = await action.run(context) or "completed"
        except CalmlineError as exc:
            outcome, status, error = exc.outcome, exc.status, str(exc)
        except asyncio.CancelledError as exc:
            # The service is stopping and its grace ran out: the session did not go fine.
            cancelled = exc
            outcome, status, error = CANCELLED, "failed", "the service stopped before the session finished"
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # so that the bounded finish below can use its own timeout
        except Exception as exc:  # the boundary: a bug must not take the service down
            outcome, status, error = "internal_error", "failed", f"{type(exc).__name__}: {exc}"
            self._audit.problem("internal_error", exc_info=True)
        await self._finish(channel, outcome, status, error, started, cancelled is not None)
        if cancelled is not None:
            raise cancelled
        return outcome

    async def _finish(
        self, channel: Channel, outcome: str, status: str, error: str | None, started: float,
        cancelled: bool = False,
    ) -> None:
        fields: dict[str, Any] = {
            "outcome": outcome,
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if error:
            fields["error"] = error
            self._audit.problem("session_end", **fields)
        else:
            self._audit.event("session_end", **fields)
        try:
            # A stopping service tells Asterisk the status, but waits no longer than it must.
            async with asyncio.timeout(FINISH_TIMEOUT if cancelled else None):
                if error and channel.alive and not cancelled:
                    try:
                        await channel.verbose(f"calmline: {outcome}: {' '.join(error.split())}", 1)
                    except (CalmlineError, OSError):
                        pass  # the status below still matters more than the console line
                await channel.set_status(STATUS_VARIABLE, status)
        except (CalmlineError, OSError, TimeoutError):
            pass  # the socket or channel is already gone; the outcome above says why
